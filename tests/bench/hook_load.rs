//! Load generator for `tests/bench/webhook.sh`: how many webhook-shaped POSTs
//! per second a receiver answers on its own, with no worker involved.
//!
//! `hook-load URL CONCURRENCY SECONDS`: CONCURRENCY connections each send
//! `POST` requests one after another for SECONDS, every one with a distinct
//! `webhook-id` (`<path>-<n>`) and a small JSON body, like the worker's. A
//! connection is reused while the server keeps it open (HTTP/1.1 keep-alive);
//! a server that closes it after each answer (HTTP/1.0, Python's
//! `BaseHTTPRequestHandler` by default) gets a new one per request. A reset,
//! refused or timed-out connection (a full accept queue) counts as an error and
//! the generator connects again; it never stops early.
//!
//! `hook-load URL CONCURRENCY SECONDS SPREAD_MS`: the connections start
//! SPREAD_MS apart in all (evenly), not at once, so a receiver that answers
//! after a fixed delay sees a steady stream of new connections instead of
//! CONCURRENCY of them every delay (a burst a listen queue of 5 cannot hold).
//!
//! Prints one line: `concurrency=C ok=N errors=E connections=K seconds=S
//! rate=R` where rate counts only 2xx answers.
//!
//! Plain HTTP to an IP literal only (a loopback receiver); a hand-written client
//! on tokio's TCP stream, so that the generator costs little CPU next to the
//! receiver it measures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const USAGE: &str = "usage: hook-load http://IP:PORT/PATH CONCURRENCY SECONDS [SPREAD_MS]";
/// A request that takes longer than this is abandoned and counted as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    errors: AtomicU64,
    connections: AtomicU64,
    next_id: AtomicU64,
}

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, concurrency, seconds, spread) = match args.as_slice() {
        [u, c, s] => (u, c, s, "0"),
        [u, c, s, spread] => (u, c, s, spread.as_str()),
        _ => bail!("{USAGE}"),
    };
    let spread: u64 = spread
        .parse()
        .with_context(|| format!("SPREAD_MS `{spread}` is not a number\n{USAGE}"))?;
    let target = parse_url(url)?;
    let concurrency: u64 = concurrency
        .parse()
        .with_context(|| format!("CONCURRENCY `{concurrency}` is not a number\n{USAGE}"))?;
    let seconds: f64 = seconds
        .parse()
        .with_context(|| format!("SECONDS `{seconds}` is not a number\n{USAGE}"))?;
    let target = Arc::new(target);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut clients = tokio::task::JoinSet::new();
    let concurrency = concurrency.max(1);
    for i in 0..concurrency {
        let start = Duration::from_millis(spread * i / concurrency);
        let (target, counters) = (target.clone(), counters.clone());
        clients.spawn(async move {
            tokio::time::sleep(start).await;
            client(target, counters, deadline).await
        });
    }
    while clients.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let ok = counters.ok.load(Ordering::Relaxed);
    println!(
        "concurrency={concurrency} ok={ok} errors={} connections={} seconds={secs:.3} rate={:.1}",
        counters.errors.load(Ordering::Relaxed),
        counters.connections.load(Ordering::Relaxed),
        ok as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}` is not an http:// URL\n{USAGE}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("`{host}` is not IP:PORT\n{USAGE}"))?;
    Ok(Target {
        addr,
        host: host.to_string(),
        path: format!("/{path}"),
    })
}

/// One connection's loop: requests until the deadline, reconnecting whenever
/// the server closes the connection or it fails.
async fn client(target: Arc<Target>, counters: Arc<Counters>, deadline: Instant) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    // The id's prefix: the path without its query.
    let run = target.path.trim_start_matches('/');
    let run = run.split('?').next().unwrap_or(run).to_string();
    while Instant::now() < deadline {
        let id = counters.next_id.fetch_add(1, Ordering::Relaxed);
        let stream = match conn.take() {
            Some(s) => s,
            None => match timeout(REQUEST_TIMEOUT, TcpStream::connect(target.addr)).await {
                Ok(Ok(s)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    s
                }
                _ => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    // Refused at once: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let request = request(&target, &format!("{run}-{id}"));
        match timeout(REQUEST_TIMEOUT, exchange(stream, &request, &mut buf)).await {
            Ok(Ok((status, keep))) => {
                let counter = if (200..300).contains(&status) {
                    &counters.ok
                } else {
                    &counters.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                conn = keep;
            }
            _ => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn request(target: &Target, id: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"type":"task.succeeded","timestamp":"2026-01-01T00:00:00Z","data":{{"task_id":"{id}","result":{{"i":1}}}}}}"#
    );
    format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nwebhook-id: {id}\r\n\
         webhook-timestamp: 1767225600\r\ncontent-length: {}\r\n\r\n{body}",
        target.path,
        target.host,
        body.len()
    )
    .into_bytes()
}

/// Sends one request and reads its answer; returns the status and the
/// connection if the server keeps it open.
async fn exchange(
    mut stream: TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, Option<TcpStream>)> {
    stream.write_all(request).await?;
    buf.clear();
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if read_more(&mut stream, buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let keep_alive = head.starts_with("http/1.1") && !head.contains("\r\nconnection: close");
    match length {
        Some(len) => {
            while buf.len() < head_end + len {
                if read_more(&mut stream, buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok((status, keep_alive.then_some(stream)))
        }
        // No length: the body ends when the server closes.
        None => {
            while read_more(&mut stream, buf).await? > 0 {}
            Ok((status, None))
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
