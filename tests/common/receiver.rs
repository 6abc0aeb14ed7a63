//! A real HTTP server on 127.0.0.1 that records every request it gets and
//! answers from a script, for webhook and `http`-handler tests.
//!
//! It runs on its own thread with its own tokio runtime, so tests can stay
//! plain `#[test]` functions that spawn the `worker` binary and block on it.
//! A request is recorded *before* it is answered: once the worker has exited,
//! everything it managed to send is already in the channel.

// Test support: a failure here should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
    /// Wait this long before answering (to trip the client's timeout).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            content_type: None,
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            content_type: Some("application/json".into()),
            body: body.to_string(),
            ..Self::status(status)
        }
    }
    pub fn retry_after(mut self, v: &str) -> Self {
        self.retry_after = Some(v.into());
        self
    }
    pub fn body(mut self, b: &str) -> Self {
        self.body = b.into();
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The `webhook-id` header, which every webhook carries.
    pub fn webhook_id(&self) -> String {
        self.header("webhook-id")
            .expect("every webhook has a webhook-id")
            .to_owned()
    }
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("request body is not UTF-8")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("request body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Answers from `script` in order; once it runs out, the last reply repeats
/// (an empty script answers 200 to everything).
pub struct Receiver {
    addr: SocketAddr,
    requests: mpsc::Receiver<Request>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct Script {
    replies: VecDeque<Reply>,
    last: Reply,
}

impl Script {
    fn next(&mut self) -> Reply {
        match self.replies.pop_front() {
            Some(r) => {
                self.last = r.clone();
                r
            }
            None => self.last.clone(),
        }
    }
}

impl Receiver {
    /// Always answers 200.
    pub fn ok() -> Self {
        Self::start([])
    }

    pub fn start(script: impl IntoIterator<Item = Reply>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let script = Arc::new(Mutex::new(Script {
            replies: script.into_iter().collect(),
            last: Reply::status(200),
        }));
        let (tx, requests) = mpsc::channel();
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("from_std");
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                        _ = &mut stop => return,
                    };
                    let tx = tx.clone();
                    let script = script.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let tx = tx.clone();
                            let script = script.clone();
                            async move { Ok::<_, Infallible>(answer(req, &tx, &script).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Self {
            addr,
            requests,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next request, waiting up to `timeout` for it.
    pub fn recv(&self, timeout: Duration) -> Option<Request> {
        self.requests.recv_timeout(timeout).ok()
    }

    /// The next `n` requests, waiting up to `timeout` for all of them; fewer
    /// when they do not arrive in time (the caller asserts the count).
    pub fn collect(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.requests.recv_timeout(left) {
                Ok(r) => got.push(r),
                Err(_) => break,
            }
        }
        got
    }

    /// Every request received so far and not yet taken.
    pub fn drain(&self) -> Vec<Request> {
        self.requests.try_iter().collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    tx: &mpsc::Sender<Request>,
    script: &Mutex<Script>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let reply = script.lock().expect("script lock").next();
    let _ = tx.send(Request {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), ToString::to_string),
        headers: parts.headers,
        body,
    });
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = hyper::Response::builder().status(reply.status);
    if let Some(v) = &reply.retry_after {
        resp = resp.header("retry-after", v);
    }
    if let Some(v) = &reply.content_type {
        resp = resp.header("content-type", v);
    }
    resp.body(Full::new(Bytes::from(reply.body)))
        .expect("valid response")
}
