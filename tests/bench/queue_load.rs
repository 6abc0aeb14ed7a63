//! Queue load tool for `tests/bench/poll.sh` and `tests/bench/webhook.sh`,
//! built on the library's own queue client (`worker::queue`) so that it speaks
//! to the service exactly as the worker does.
//!
//! - `fill QUEUE N [C] [WEBHOOK_URL]`: creates QUEUE and sends N `echo`
//!   envelopes (another task type with `TASK_TYPE`), C at a time (default
//!   32), so that filling does not dominate a benchmark round; with
//!   WEBHOOK_URL, each envelope carries it as its `webhook_url`.
//! - `drain QUEUE [B]`: the ceiling for polling mode: receive up to B (default
//!   32) messages, delete them all concurrently, repeat until a receive comes
//!   back empty. No task is decoded or run; this is what the SDK and the
//!   service allow, and the worker is measured against it.
//! - `count QUEUE`: the queue's approximate message count.
//!
//! The storage account comes from `AZURE_STORAGE_CONNECTION_STRING`. `fill`
//! and `drain` print one line `messages=N seconds=S rate=R` on stdout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use worker::config::Secret;
use worker::queue::{Queue, QueueService, StorageSettings};

const USAGE: &str = "usage: queue-load fill QUEUE N [CONCURRENCY] [WEBHOOK_URL] | drain QUEUE [BATCH] | count QUEUE";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let num = |i: usize, default: u64| -> anyhow::Result<u64> {
        arg(i).map_or(Ok(default), |s| {
            s.parse()
                .with_context(|| format!("`{s}` is not a number\n{USAGE}"))
        })
    };
    let (Some(cmd), Some(queue)) = (arg(0), arg(1)) else {
        bail!("{USAGE}");
    };
    let cs = std::env::var("AZURE_STORAGE_CONNECTION_STRING")
        .context("set AZURE_STORAGE_CONNECTION_STRING")?;
    let queue = QueueService::new(&StorageSettings {
        connection_string: Some(Secret::new(cs)),
        ..Default::default()
    })?
    .queue(queue)?;
    match cmd {
        "fill" => fill(queue, num(2, 0)?, num(3, 32)?, arg(4)).await,
        "drain" => drain(queue, u8::try_from(num(2, 32)?.clamp(1, 32))?).await,
        "count" => {
            println!("{}", queue.approximate_count().await?);
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn report(messages: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "messages={messages} seconds={secs:.3} rate={:.1}",
        messages as f64 / secs.max(1e-9)
    );
}

async fn fill(
    queue: Queue,
    n: u64,
    concurrency: u64,
    webhook_url: Option<&str>,
) -> anyhow::Result<()> {
    // `,"webhook_url":"…"` (JSON-escaped) or nothing.
    let hook: Arc<str> = match webhook_url {
        Some(url) => format!(r#","webhook_url":{}"#, serde_json::to_string(url)?).into(),
        None => "".into(),
    };
    let task_type: Arc<str> =
        serde_json::to_string(&std::env::var("TASK_TYPE").unwrap_or_else(|_| "echo".into()))?
            .into();
    queue.create_if_missing().await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (queue, next, hook) = (queue.clone(), next.clone(), hook.clone());
        let task_type = task_type.clone();
        senders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, worker::queue::QueueError>(());
                }
                let text = format!(
                    r#"{{"task_id":"bench-{i}","task_type":{task_type},"payload":{{"i":{i}}}{hook}}}"#
                );
                // A busy Azurite can let a call time out: try again (a
                // duplicate carries the same task id, so the same webhook-id).
                let mut tries = 0;
                while let Err(e) = queue.send(&text, None, None).await {
                    tries += 1;
                    if !e.is_transient() || tries == 5 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    report(n, started);
    Ok(())
}

async fn drain(queue: Queue, batch: u8) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut done = 0u64;
    loop {
        let messages = queue.receive(batch, Duration::from_secs(30)).await?;
        if messages.is_empty() {
            break;
        }
        let mut deletes = tokio::task::JoinSet::new();
        for m in messages {
            let queue = queue.clone();
            deletes.spawn(async move { queue.delete(&m.id, &m.pop_receipt).await });
        }
        while let Some(r) = deletes.join_next().await {
            r??;
            done += 1;
        }
    }
    report(done, started);
    Ok(())
}
