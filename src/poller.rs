//! Polling mode.
//!
//! The loop receives batches from each client queue in turn and hands every
//! message to [`consumer::process_message`] in its own task. It never holds a
//! message it cannot start at once: a receive asks for at most as many
//! messages as there are free slots, and waits until half the slots are free
//! before asking again (as the Azure Functions queue trigger does), so no
//! message sits leased but idle while others could take it.
//!
//! Empty queues back off exponentially from 100 ms to `WORKER_MAX_POLL_INTERVAL`
//! (randomized, per queue) and snap back on the first message; failing queue
//! calls back off up to 10 s and never stop the loop.
//!
//! Shutdown: the `shutdown` token stops receiving; running tasks get
//! `WORKER_SHUTDOWN_GRACE`, then are cancelled and their messages released
//! (visibility 0) for another worker. Messages brought by a receive that was
//! in flight when the signal came are released without being started.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::{self, Consumer, RunSlot, Stats, Target};
use crate::exporter::Health;
use crate::outbox::{self, DrainConfig};
use crate::queue::QueueError;

/// The first pause after an empty receive.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Cap on the pause after failing queue calls: the service should be picked
/// up again promptly once it is back.
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(10);
/// What settling may take after the grace period, so that SIGTERM to exit
/// stays within WORKER_SHUTDOWN_GRACE plus a few seconds whatever is running
/// (the platforms' kill budgets are checked against this in tests/infra.rs).
pub const SETTLE_MARGIN: Duration = Duration::from_secs(4);
/// From SIGTERM to exit in job mode and for a held single task: the task is
/// cancelled at once (execute gives it 2 s), webhook requests in flight are
/// given up and handed to the outbox, and settling gets [`SETTLE_MARGIN`].
/// Container Apps' default termination grace (30 s) covers it with room
/// (tests/infra.rs).
pub const ONE_MESSAGE_SHUTDOWN_BUDGET: Duration = Duration::from_secs(2 + SETTLE_MARGIN.as_secs());
/// Least time a receive in flight at shutdown gets to bring its answer.
const RECEIVE_ON_SHUTDOWN: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Config {
    pub batch_size: u8,
    pub concurrency: usize,
    pub max_poll_interval: Duration,
    pub shutdown_grace: Duration,
    /// Stop receiving after this many messages (then drain and return).
    pub max_tasks: Option<u64>,
    /// Return once every queue answered empty and nothing is running.
    pub exit_when_empty: bool,
    /// Interval of the summary log line.
    pub summary_every: Duration,
    /// Outbox entries delivered at once beside the tasks.
    pub outbox_in_flight: usize,
}

/// What a run of the loop did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub received: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub retried: u64,
    pub poisoned: u64,
    pub released: u64,
}

impl Summary {
    fn of(stats: &Stats) -> Self {
        Summary {
            received: Stats::get(&stats.received),
            succeeded: Stats::get(&stats.succeeded),
            failed: Stats::get(&stats.failed),
            timed_out: Stats::get(&stats.timed_out),
            retried: Stats::get(&stats.retried),
            poisoned: Stats::get(&stats.poisoned),
            released: Stats::get(&stats.released),
        }
    }

    /// Attempts that ran to an outcome.
    fn ran(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }
}

/// Per-queue polling state.
struct Slot {
    target: Target,
    next_poll: Instant,
    /// Current empty-queue pause (0 = poll again at once).
    idle_backoff: Duration,
    error_backoff: Duration,
    /// When the last receive came back empty (`None`: it did not).
    empty_at: Option<Instant>,
}

/// The randomized exponential step: double (×1–2 randomized), capped.
fn grow(current: Duration, min: Duration, max: Duration) -> Duration {
    if current.is_zero() {
        return min.min(max);
    }
    let factor = rand::rng().random_range(1.0..2.0);
    current.mul_f64(2.0 * factor / 1.5).max(min).min(max)
}

/// Runs until the consumer's shutdown token fires (or the stop conditions in
/// `cfg` hold). The targets' outboxes are drained beside the task queues, by
/// a loop of their own that takes no task slot.
pub async fn run(
    consumer: Arc<Consumer>,
    targets: Vec<Target>,
    cfg: Config,
    health: Arc<Health>,
) -> Summary {
    let shutdown = consumer.shutdown.clone();
    let stats = consumer.stats.clone();
    let finished = consumer.freed.clone();
    // Cancelled WORKER_SHUTDOWN_GRACE after the signal, wherever the loop is
    // then: running tasks are cancelled (and released), webhook requests in
    // flight are given up (and handed to the outbox).
    let tasks_cancel = CancellationToken::new();
    tokio::spawn({
        let (shutdown, grace_over, grace) =
            (shutdown.clone(), tasks_cancel.clone(), cfg.shutdown_grace);
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            grace_over.cancel();
        }
    });
    let drain = tokio::spawn(outbox::run(
        consumer.app.notifier.clone(),
        targets.iter().map(|t| t.outbox.clone()).collect(),
        DrainConfig {
            max_in_flight: cfg.outbox_in_flight,
            max_poll_interval: cfg.max_poll_interval,
            exit_when_empty: cfg.exit_when_empty || cfg.max_tasks.is_some(),
            max_entries: None,
        },
        shutdown.clone(),
    ));
    let semaphore = Arc::new(Semaphore::new(cfg.concurrency));
    let tracker = TaskTracker::new();
    // When the last task was settled: "empty" only counts for receives after
    // it, since a settled task may have made its message visible again.
    let last_settled = Arc::new(std::sync::Mutex::new(Instant::now()));
    let now = Instant::now();
    let mut slots: Vec<Slot> = targets
        .into_iter()
        .map(|target| Slot {
            target,
            next_poll: now,
            idle_backoff: Duration::ZERO,
            error_backoff: Duration::ZERO,
            empty_at: None,
        })
        .collect();
    let mut cursor = 0usize;
    let mut started: u64 = 0;
    let refill_at = cfg.concurrency.div_ceil(2).max(1);
    let summary_task = tokio::spawn(summary_loop(
        stats.clone(),
        cfg.summary_every,
        shutdown.clone(),
    ));

    'receive: loop {
        if shutdown.is_cancelled() || cfg.max_tasks.is_some_and(|m| started >= m) {
            break;
        }
        let settled = last_settled.lock().map_or_else(|p| *p.into_inner(), |g| *g);
        // Nothing is running once every permit is back. (The tracker counts a
        // task until it has also signalled `finished`, a moment later.)
        let idle = semaphore.available_permits() == cfg.concurrency;
        if cfg.exit_when_empty
            && idle
            && slots
                .iter()
                .all(|s| s.empty_at.is_some_and(|t| t > settled))
        {
            tracing::info!("all queues are empty and nothing is running; exiting");
            break;
        }
        // Wait for half the slots (or all, when concurrency is 1) to be free,
        // and for room in the delivery backlog. Waiting by choice is healthy.
        while semaphore.available_permits() < refill_at || !consumer.backlog_has_room() {
            tokio::select! {
                () = finished.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => break 'receive,
            }
            health.progress();
        }
        // The queue due first; ties go round-robin from `cursor` for fairness.
        let n = slots.len();
        let Some(i) = (0..n)
            .map(|k| (cursor + k) % n)
            .min_by_key(|&i| slots[i].next_poll)
        else {
            break;
        };
        let due = slots[i].next_poll;
        if due > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = shutdown.cancelled() => break,
                // A task finished: with exit_when_empty, poll again to see
                // whether the queue is really drained; at once when it was
                // the last one running, since only that receive can end the run.
                () = finished.notified(), if cfg.exit_when_empty => {
                    let soon = if semaphore.available_permits() == cfg.concurrency {
                        Instant::now()
                    } else {
                        Instant::now() + MIN_POLL_INTERVAL
                    };
                    for s in &mut slots {
                        s.next_poll = s.next_poll.min(soon);
                    }
                }
            }
            continue;
        }
        cursor = (i + 1) % n;
        let free = semaphore.available_permits() as u64;
        let remaining = cfg.max_tasks.map_or(u64::MAX, |m| m - started);
        let want = u64::from(cfg.batch_size).min(free).min(remaining).max(1) as u8;
        let slot = &mut slots[i];
        // A receive in flight is not abandoned on shutdown: the service may
        // already have leased messages to it, and dropping the answer would
        // hide them for the whole visibility timeout. Its answer is awaited
        // (for at most the grace) and what it brings is handed back below.
        let receive = slot
            .target
            .queue
            .receive(want, consumer.settings.visibility_timeout);
        tokio::pin!(receive);
        let received = tokio::select! {
            r = &mut receive => r,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(cfg.shutdown_grace.max(RECEIVE_ON_SHUTDOWN), &mut receive).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
        };
        if received.is_ok() {
            health.progress();
        }
        match received {
            Ok(messages) if !messages.is_empty() && shutdown.is_cancelled() => {
                for msg in &messages {
                    consumer::release_unstarted(&slot.target, msg, &stats).await;
                }
                break;
            }
            Ok(messages) if messages.is_empty() => {
                slot.empty_at = Some(Instant::now());
                slot.error_backoff = Duration::ZERO;
                slot.idle_backoff =
                    grow(slot.idle_backoff, MIN_POLL_INTERVAL, cfg.max_poll_interval);
                slot.next_poll = Instant::now() + slot.idle_backoff;
                tracing::trace!(queue = %slot.target.queue.name(), backoff_ms = slot.idle_backoff.as_millis() as u64, "queue empty");
            }
            Ok(messages) => {
                slot.empty_at = None;
                slot.error_backoff = Duration::ZERO;
                slot.idle_backoff = Duration::ZERO;
                slot.next_poll = Instant::now();
                for msg in messages {
                    let Ok(permit) = semaphore.clone().try_acquire_owned() else {
                        // Cannot happen (we asked for at most `free`); if it
                        // did, the message reappears after its lease.
                        tracing::error!(message_id = %msg.id, "no free slot for a received message; leaving it to its lease");
                        continue;
                    };
                    started += 1;
                    let (consumer, target) = (consumer.clone(), slot.target.clone());
                    let run_slot = RunSlot::new(permit, finished.clone());
                    let (cancel, last_settled) = (tasks_cancel.clone(), last_settled.clone());
                    tracker.spawn(async move {
                        let _ = consumer::process_message(consumer, target, msg, cancel, run_slot)
                            .await;
                        if let Ok(mut t) = last_settled.lock() {
                            *t = Instant::now();
                        }
                    });
                }
            }
            Err(e) => {
                stats.queue_error(slot.target.queue.name());
                slot.empty_at = None;
                slot.error_backoff = grow(slot.error_backoff, MIN_POLL_INTERVAL, MAX_ERROR_BACKOFF);
                slot.next_poll = Instant::now() + slot.error_backoff;
                let queue = slot.target.queue.name().to_owned();
                if let QueueError::QueueNotFound { .. } = e {
                    tracing::warn!(%queue, "queue disappeared; creating it again");
                    if let Err(e) = slot.target.queue.create_if_missing().await {
                        tracing::warn!(%queue, error = %e, "cannot create queue");
                    }
                    let _ = slot.target.poison.create_if_missing().await;
                } else if e.is_transient() {
                    tracing::warn!(%queue, error = %e, retry_in_ms = slot.error_backoff.as_millis() as u64, "receive failed; retrying");
                } else {
                    tracing::error!(%queue, error = %e, retry_in_ms = slot.error_backoff.as_millis() as u64, "receive failed; retrying");
                }
            }
        }
    }

    tracker.close();
    if !tracker.is_empty() {
        // Without a signal (--exit-when-empty, --max-tasks) the tasks finish
        // in their own time; a signal starts the grace whenever it comes.
        tracing::info!(
            in_flight = tracker.len(),
            grace_s = cfg.shutdown_grace.as_secs_f64(),
            "waiting for running tasks (and their webhooks)"
        );
        tokio::select! {
            () = tracker.wait() => {}
            () = tasks_cancel.cancelled() => {
                tracing::warn!(
                    in_flight = tracker.len(),
                    "grace period over; cancelling running tasks (their messages are released) and handing pending webhooks to the outbox"
                );
                if tokio::time::timeout(SETTLE_MARGIN, tracker.wait()).await.is_err() {
                    tracing::error!(
                        unsettled = tracker.len(),
                        "messages not settled within the shutdown budget; they reappear when their leases expire"
                    );
                }
            }
        }
    }
    let mut drain = drain;
    tokio::select! {
        joined = &mut drain => {
            if let Err(e) = joined {
                tracing::error!(error = %e, "the outbox loop failed");
            }
        }
        () = async {
            tasks_cancel.cancelled().await;
            tokio::time::sleep(SETTLE_MARGIN).await;
        } => {
            // Entries still in flight reappear when their short leases expire.
            drain.abort();
        }
    }
    summary_task.abort();
    let summary = Summary::of(&stats);
    tracing::info!(?summary, "worker stopped");
    summary
}

/// Logs one line with the counters every `every`.
async fn summary_loop(stats: Arc<Stats>, every: Duration, stop: CancellationToken) {
    let mut last = (Summary::of(&stats).ran(), Instant::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let now = Summary::of(&stats);
        let elapsed = last.1.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            received = now.received,
            succeeded = now.succeeded,
            failed = now.failed,
            timed_out = now.timed_out,
            retried = now.retried,
            poisoned = now.poisoned,
            in_flight = stats.in_flight.load(Ordering::Relaxed),
            queue_errors = Stats::get(&stats.queue_errors),
            rate_per_s = format!("{:.2}", (now.ran() - last.0) as f64 / elapsed),
            "summary"
        );
        last = (now.ran(), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_small_and_caps() {
        let max = Duration::from_secs(30);
        let mut d = Duration::ZERO;
        d = grow(d, MIN_POLL_INTERVAL, max);
        assert_eq!(d, MIN_POLL_INTERVAL);
        for _ in 0..30 {
            let next = grow(d, MIN_POLL_INTERVAL, max);
            assert!(next >= d.min(max), "{next:?} < {d:?}");
            d = next;
        }
        assert_eq!(d, max);
    }
}
