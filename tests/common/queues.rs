//! Waiting on what a queue holds: the observable conditions the end-to-end
//! tests wait for, each with a generous bound and a message naming the queue.

use std::time::Duration;

use tokio::time::Instant;
use worker::queue::{Queue, QueueError};

/// Generous bound for anything that should already have happened (large
/// outcomes through the blob service included).
pub const ARRIVAL: Duration = Duration::from_secs(90);

/// Messages in `queue`, visible or not; a missing queue holds none; `None`
/// when the service did not answer.
pub async fn count(queue: &Queue) -> Option<u64> {
    match queue.approximate_count().await {
        Ok(c) => Some(c),
        Err(QueueError::QueueNotFound { .. }) => Some(0),
        Err(_) => None,
    }
}

/// Waits until `queue` holds exactly `n` messages (visible or not).
pub async fn wait_count(queue: &Queue, n: u64, what: &str) {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let got = count(queue).await;
        if got == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} holds {got:?} messages, not {n}, after {ARRIVAL:?}",
            queue.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `queue` holds no message at all (visible or not).
pub async fn wait_empty(queue: &Queue, what: &str) {
    wait_count(queue, 0, what).await;
}

/// Waits until `queue` shows at least `n` visible messages (at most 32);
/// returns their texts.
pub async fn wait_visible(queue: &Queue, n: usize, what: &str) -> Vec<String> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if let Ok(m) = queue.peek(32).await {
            if m.len() >= n {
                return m.into_iter().map(|m| m.text).collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: fewer than {n} visible in {} within {ARRIVAL:?}",
            queue.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `queue` has a visible message and returns the first's text.
pub async fn wait_one(queue: &Queue, what: &str) -> String {
    wait_visible(queue, 1, what).await.swap_remove(0)
}
