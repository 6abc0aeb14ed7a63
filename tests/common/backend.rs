//! A webhook backend whose behaviour the test switches over time, for the
//! chaos test: a real HTTP server on 127.0.0.1 that answers 200, answers 503,
//! hangs past the worker's webhook timeout, or is away (drops connections
//! without an answer), as [`Backend::set_mode`] says.
//!
//! It records every request it reads (webhook-id header, body, how it was
//! answered) before answering, and keeps the set of tasks whose
//! `task.succeeded` it accepted with a 200. It runs on its own thread with its
//! own tokio runtime, like [`super::receiver::Receiver`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// How the backend answers right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 to everything.
    Ok,
    /// 503 to everything.
    Unavailable,
    /// Reads the request, waits the backend's `hang`, then answers 503.
    Hang,
    /// Closes every connection without an answer (new ones at once, before
    /// reading anything; kept-alive ones after reading the request).
    Away,
    /// A small server: answers 200 after `latency_ms`, but 503 at once to
    /// any request beyond `capacity` in flight.
    Limited { capacity: usize, latency_ms: u64 },
}

/// One request as the backend read it.
#[derive(Clone, Debug)]
pub struct Hit {
    /// Since the backend started.
    pub at: Duration,
    /// How it was answered: only [`Mode::Ok`] means accepted.
    pub answer: Mode,
    pub webhook_id: Option<String>,
    /// `type` and `data.task_id` of the body, when it is such JSON.
    pub event_type: Option<String>,
    pub task_id: Option<String>,
    pub body: Vec<u8>,
}

impl Hit {
    pub fn accepted(&self) -> bool {
        self.answer == Mode::Ok
    }
}

struct State {
    mode: Mode,
    hits: Vec<Hit>,
    /// Connections closed on accept while away.
    dropped: usize,
    /// Task ids whose `task.succeeded` was answered 200.
    succeeded: HashSet<String>,
    /// Requests being answered now, and the most at once so far.
    in_flight: usize,
    peak: usize,
}

pub struct Backend {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts in [`Mode::Ok`]; in [`Mode::Hang`] it answers after `hang`.
    pub fn start(hang: Duration) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Ok,
            hits: Vec::new(),
            dropped: 0,
            succeeded: HashSet::new(),
            in_flight: 0,
            peak: 0,
        }));
        let started = Instant::now();
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
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
                    {
                        let mut s = shared.lock().expect("backend state");
                        if s.mode == Mode::Away {
                            s.dropped += 1;
                            drop(stream);
                            continue;
                        }
                    }
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let state = state.clone();
                            async move { answer(req, &state, started, hang).await }
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
            state,
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

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Every request read so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.lock().hits.clone()
    }

    /// How many requests were read so far.
    pub fn hit_count(&self) -> usize {
        self.lock().hits.len()
    }

    /// Connections closed on accept while away.
    pub fn dropped(&self) -> usize {
        self.lock().dropped
    }

    /// The most requests the backend was answering at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.lock().peak
    }

    /// How many distinct tasks had a `task.succeeded` accepted so far.
    pub fn succeeded_count(&self) -> usize {
        self.lock().succeeded.len()
    }

    /// The distinct tasks whose `task.succeeded` was accepted so far.
    pub fn succeeded(&self) -> HashSet<String> {
        self.lock().succeeded.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("backend state")
    }
}

impl Drop for Backend {
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
    state: &Mutex<State>,
    started: Instant,
    hang: Duration,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let field = |f: &dyn Fn(&serde_json::Value) -> &serde_json::Value| {
        json.as_ref().and_then(|j| f(j).as_str()).map(str::to_owned)
    };
    let hit = Hit {
        at: started.elapsed(),
        answer: Mode::Ok,
        webhook_id: parts
            .headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        event_type: field(&|j| &j["type"]),
        task_id: field(&|j| &j["data"]["task_id"]),
        body,
    };
    let mode = {
        let mut s = state.lock().expect("backend state");
        s.in_flight += 1;
        s.peak = s.peak.max(s.in_flight);
        let mode = match s.mode {
            Mode::Limited { capacity, .. } if s.in_flight > capacity => Mode::Unavailable,
            Mode::Limited { .. } => Mode::Ok,
            m => m,
        };
        if mode == Mode::Ok && hit.event_type.as_deref() == Some("task.succeeded") {
            if let Some(id) = &hit.task_id {
                s.succeeded.insert(id.clone());
            }
        }
        s.hits.push(Hit {
            answer: mode,
            ..hit
        });
        (mode, s.mode)
    };
    let status = match mode {
        (Mode::Ok, Mode::Limited { latency_ms, .. }) => {
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
            200
        }
        (Mode::Ok, _) => 200,
        (Mode::Hang, _) => {
            tokio::time::sleep(hang).await;
            503
        }
        (Mode::Away, _) => {
            state.lock().expect("backend state").in_flight -= 1;
            // An error from the service makes hyper close the connection unanswered.
            return Err(std::io::Error::other("backend away"));
        }
        _ => 503,
    };
    state.lock().expect("backend state").in_flight -= 1;
    Ok(hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("valid response"))
}
