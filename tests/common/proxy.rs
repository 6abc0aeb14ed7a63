//! A TCP proxy on 127.0.0.1 in front of Azurite that can hold back the
//! answer to a receive that brings messages, so a test can act (send SIGTERM)
//! while the worker waits for an answer the service has already committed to.
//! Azurite still does all the work; the proxy only delays bytes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What a receive answer with messages contains (a send's answer does not).
const MESSAGES_MARKER: &[u8] = b"<MessageText>";

pub struct Proxy {
    port: u16,
    armed: Arc<AtomicBool>,
    hold: Arc<Mutex<Duration>>,
    held: mpsc::Receiver<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(Mutex::new(Duration::ZERO));
        let (tx, held) = mpsc::channel();
        let (a, h) = (armed.clone(), hold.clone());
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
                std::thread::spawn(move || pump(client, server, None));
                let (a, h, tx) = (a.clone(), h.clone(), tx.clone());
                std::thread::spawn(move || pump(s2, c2, Some((a, h, tx))));
            }
        });
        Self {
            port,
            armed,
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

    /// Waits until an answer with messages is being held.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        self.held.recv_timeout(timeout).is_ok()
    }
}

type Hold = (Arc<AtomicBool>, Arc<Mutex<Duration>>, mpsc::Sender<()>);

fn pump(mut from: TcpStream, mut to: TcpStream, hold: Option<Hold>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
