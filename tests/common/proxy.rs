//! A TCP proxy on 127.0.0.1 in front of Azurite that can hold back the
//! answer to a receive that brings messages, so a test can act (send SIGTERM)
//! while the worker waits for an answer the service has already committed to,
//! or lose the answer to a delete the service has already carried out (the
//! connection is cut instead), so the client's retry meets the consequence.
//! Azurite still does all the work; the proxy only delays or drops bytes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What a receive answer with messages contains (a send's answer does not).
const MESSAGES_MARKER: &[u8] = b"<MessageText>";

pub struct Proxy {
    port: u16,
    refuse: Arc<Mutex<Option<Vec<u8>>>>,
    armed: Arc<AtomicBool>,
    drop_delete: Arc<AtomicBool>,
    hold: Arc<Mutex<Duration>>,
    held: mpsc::Receiver<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let drop_delete = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(Mutex::new(Duration::ZERO));
        let (tx, held) = mpsc::channel();
        let refuse: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let (a, h, d, r) = (
            armed.clone(),
            hold.clone(),
            drop_delete.clone(),
            refuse.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                // Set when this connection carries the delete whose answer is lost.
                let cut = Arc::new(AtomicBool::new(false));
                let (d, cut2, r) = (d.clone(), cut.clone(), r.clone());
                std::thread::spawn(move || pump_requests(client, server, r, (d, cut2)));
                let (a, h, tx) = (a.clone(), h.clone(), tx.clone());
                std::thread::spawn(move || {
                    pump(s2, c2, Some((a, h, tx)), Some((Arc::default(), cut)))
                });
            }
        });
        Self {
            port,
            refuse,
            armed,
            drop_delete,
            hold,
            held,
        }
    }

    /// The connection string for Azurite's account through this proxy.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};QueueEndpoint=http://127.0.0.1:{}/{}",
            super::azurite::ACCOUNT,
            super::azurite::ACCOUNT_KEY,
            self.port,
            super::azurite::ACCOUNT
        )
    }

    /// Holds the next answer that carries messages for `hold`.
    pub fn hold_next_messages(&self, hold: Duration) {
        *self.hold.lock().expect("lock") = hold;
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Cuts the connection instead of forwarding the answer to the next
    /// DELETE request (Azurite has carried it out by then).
    pub fn lose_next_delete_answer(&self) {
        self.drop_delete.store(true, Ordering::SeqCst);
    }

    /// Cuts every connection whose request line contains `needle` (before
    /// it reaches Azurite) until called again with `None`.
    pub fn refuse_requests_containing(&self, needle: Option<&str>) {
        *self.refuse.lock().expect("lock") = needle.map(|n| n.as_bytes().to_vec());
    }

    /// Waits until an answer with messages is being held.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        self.held.recv_timeout(timeout).is_ok()
    }
}

type Hold = (Arc<AtomicBool>, Arc<Mutex<Duration>>, mpsc::Sender<()>);

/// Client to Azurite: cuts the connection when a request line contains the
/// refused text (checked for every request on a kept-alive connection),
/// else forwards like [`pump`], marking the armed delete.
fn pump_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    refuse: Arc<Mutex<Option<Vec<u8>>>>,
    (armed, cutting): Cut,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let line = &chunk[..chunk.iter().position(|b| *b == b'\n').unwrap_or(n)];
        let refused = refuse
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|needle| line.windows(needle.len()).any(|w| w == needle.as_slice()));
        if refused {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if chunk.starts_with(b"DELETE ") && armed.swap(false, Ordering::SeqCst) {
            cutting.store(true, Ordering::SeqCst);
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// (armed: cut the next delete's answer, this connection is being cut).
type Cut = (Arc<AtomicBool>, Arc<AtomicBool>);

fn pump(mut from: TcpStream, mut to: TcpStream, hold: Option<Hold>, cut: Option<Cut>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((armed, cutting)) = &cut {
            // Requests: mark the connection that carries the armed delete.
            if buf[..n].starts_with(b"DELETE ") && armed.swap(false, Ordering::SeqCst) {
                cutting.store(true, Ordering::SeqCst);
            }
            // Answers: on a marked connection, drop it instead of forwarding.
            if hold.is_some() && cutting.load(Ordering::SeqCst) {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        if let Some((armed, delay, held)) = &hold {
            let chunk = &buf[..n];
            if chunk
                .windows(MESSAGES_MARKER.len())
                .any(|w| w == MESSAGES_MARKER)
                && armed.swap(false, Ordering::SeqCst)
            {
                let _ = held.send(());
                std::thread::sleep(*delay.lock().expect("lock"));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
