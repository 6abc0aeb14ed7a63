//! One received message, from lease to settlement.
//!
//! [`process_message`] is the unit both the poller and job mode run for every
//! message: decode, refuse what can never succeed, keep the lease alive while
//! the handler runs, then settle exactly once:
//!
//! | outcome                                   | queue action                         | webhook            |
//! |-------------------------------------------|--------------------------------------|--------------------|
//! | succeeded                                 | delete                               | `task.succeeded`   |
//! | failed / timed out, attempts left         | visible again after a growing delay  | none (retrying)    |
//! | failed / timed out, at the dequeue limit  | copy verbatim to poison, delete      | failed / timed_out |
//! | permanent error, undecodable, unknown type| copy verbatim to poison, delete      | `task.failed`      |
//! | cancelled by shutdown                     | visible again at once                | none               |
//! | received after shutdown began (not run)   | visible again at once                | none               |
//! | lease lost                                | nothing (another worker owns it)     | none               |
//!
//! The pop receipt changes on every visibility update. The renewal task owns
//! the latest one and is always awaited (never dropped mid-request) before
//! settling, so the delete uses the receipt the service last handed out — a
//! stale receipt is a classic source of double processing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::execute::{Outcome, Status};
use crate::exporter::names;
use crate::handler::Retry;
use crate::queue::{Message, Queue, QueueError};
use crate::task;
use crate::webhook::Event;

/// A consumed queue and where its poisoned messages go.
#[derive(Clone)]
pub struct Target {
    /// The client the queue belongs to (from `WORKER_CLIENT`), if known.
    pub client: Option<String>,
    pub queue: Queue,
    pub poison: Queue,
}

/// Settlement knobs shared by every message.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Lease taken on receive and renewed at half-life.
    pub visibility_timeout: Duration,
    /// Deliveries before a failing message is poisoned.
    pub max_dequeue_count: u32,
    /// Base delay before a failed message is visible again; doubles per attempt.
    pub retry_delay: Duration,
}

/// How a message was settled; the caller counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Deleted after success.
    Succeeded,
    /// Left on the queue for another attempt.
    Retried,
    /// Moved to the poison queue.
    Poisoned,
    /// Made visible again at once (shutdown).
    Released,
    /// The lease was lost; the message belongs to someone else now.
    LeaseLost,
    /// A queue call kept failing; the message will reappear when its lease expires.
    Unsettled,
}

/// What happened to one message.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    pub settlement: Settlement,
    /// The task's outcome, when it was decoded (and possibly run).
    pub status: Option<Status>,
    /// `unknown` when the message was not a valid task.
    pub task_type: String,
    /// Handler run time, when the handler ran.
    pub duration: Option<Duration>,
}

impl Processed {
    fn new(
        settlement: Settlement,
        status: Status,
        task_type: &str,
        duration: Option<Duration>,
    ) -> Self {
        Self {
            settlement,
            status: Some(status),
            task_type: task_type.to_owned(),
            duration,
        }
    }
}

/// Counters shared by the poller, job mode, the summary line and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
    pub retried: AtomicU64,
    pub poisoned: AtomicU64,
    pub released: AtomicU64,
    pub lease_lost: AtomicU64,
    pub renewals: AtomicU64,
    pub queue_errors: AtomicU64,
    pub in_flight: AtomicU64,
}

/// Each event is counted here once: into the counters above (the summary
/// line, job mode) and into the Prometheus metrics (no-ops unless
/// `WORKER_METRICS_ADDR` installed a recorder).
impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A message from `queue` starts being processed.
    fn started(&self, queue: &str) {
        Self::inc(&self.received);
        ::metrics::counter!(names::RECEIVED, "queue" => queue.to_owned()).increment(1);
        let running = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        ::metrics::gauge!(names::IN_FLIGHT).set(running as f64);
    }

    /// A message from `queue` is done with, however it ended.
    fn finished(&self, p: &Processed, queue: &str) {
        let running = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        ::metrics::gauge!(names::IN_FLIGHT).set(running as f64);
        match p.settlement {
            Settlement::Succeeded => Self::inc(&self.succeeded),
            Settlement::Retried => Self::inc(&self.retried),
            Settlement::Poisoned => {
                Self::inc(&self.poisoned);
                ::metrics::counter!(names::POISONED, "queue" => queue.to_owned()).increment(1);
            }
            Settlement::Released => Self::inc(&self.released),
            Settlement::LeaseLost => {
                Self::inc(&self.lease_lost);
                ::metrics::counter!(names::LEASES_LOST).increment(1);
            }
            Settlement::Unsettled => {}
        }
        match p.status {
            Some(Status::Failed) => Self::inc(&self.failed),
            Some(Status::TimedOut) => Self::inc(&self.timed_out),
            _ => {}
        }
        let outcome = match (p.settlement, p.status) {
            (Settlement::Poisoned, _) => Some("poisoned"),
            (Settlement::Retried, _) => Some("retried"),
            (_, Some(Status::Succeeded)) => Some("succeeded"),
            (_, Some(Status::Failed)) => Some("failed"),
            (_, Some(Status::TimedOut)) => Some("timed_out"),
            _ => None,
        };
        if let Some(outcome) = outcome {
            ::metrics::counter!(names::TASKS, "task_type" => p.task_type.clone(), "outcome" => outcome)
                .increment(1);
        }
        if let Some(d) = p.duration {
            ::metrics::histogram!(names::TASK_DURATION, "task_type" => p.task_type.clone())
                .record(d.as_secs_f64());
        }
    }

    fn renewed(&self, times: u64) {
        self.renewals.fetch_add(times, Ordering::Relaxed);
        ::metrics::counter!(names::RENEWALS).increment(times);
    }

    /// A call to `queue` failed (receive, or a settlement that gave up).
    pub fn queue_error(&self, queue: &str) {
        Self::inc(&self.queue_errors);
        ::metrics::counter!(names::QUEUE_ERRORS, "queue" => queue.to_owned()).increment(1);
    }
}

/// Processes one received message to settlement. Never panics, never returns
/// an error: whatever happens is logged, counted and settled (or left to the
/// visibility timeout, which is the at-least-once safety net).
pub async fn process_message(
    app: Arc<App>,
    target: Target,
    settings: Settings,
    msg: Message,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Processed {
    let span = tracing::info_span!(
        "task",
        task_id = tracing::field::Empty,
        task_type = tracing::field::Empty,
        client = target.client.as_deref().unwrap_or(""),
        queue = %target.queue.name(),
        message_id = %msg.id,
        dequeue_count = msg.dequeue_count,
    );
    stats.started(target.queue.name());
    let result = process(app, &target, &settings, msg, cancel, &stats)
        .instrument(span)
        .await;
    stats.finished(&result, target.queue.name());
    result
}

async fn process(
    app: Arc<App>,
    target: &Target,
    settings: &Settings,
    msg: Message,
    cancel: CancellationToken,
    stats: &Stats,
) -> Processed {
    let span = tracing::Span::current();
    let client = target.client.as_deref();

    let task = match task::decode(msg.text.as_bytes()) {
        Ok((task, _)) => task,
        Err(e) => {
            let salvage = task::salvage(msg.text.as_bytes());
            tracing::error!(message_id = %msg.id, error = %e, "message is not a valid task; moving it to the poison queue");
            let outcome = Outcome::failed(
                format!("invalid task: {e}"),
                Retry::Permanent,
                Duration::ZERO,
            );
            let event = Event::from_outcome(
                salvage.task_id.as_deref().unwrap_or("unknown"),
                salvage.task_type.as_deref().unwrap_or("unknown"),
                salvage.client.as_deref().or(client),
                msg.dequeue_count,
                &outcome,
            );
            let settlement = poison_and_report(
                &app,
                target,
                &msg,
                &msg.pop_receipt,
                stats,
                salvage.webhook_url.as_ref(),
                &event,
            )
            .await;
            return Processed::new(settlement, Status::Failed, "unknown", None);
        }
    };
    span.record("task_id", task.task_id.as_str());
    span.record("task_type", task.task_type.as_str());
    let client = task.client.as_deref().or(client).map(str::to_owned);
    let task = Arc::new(task);
    let event_for = |outcome: &Outcome| {
        Event::from_outcome(
            &task.task_id,
            &task.task_type,
            client.as_deref(),
            msg.dequeue_count,
            outcome,
        )
    };

    if msg.dequeue_count > settings.max_dequeue_count {
        let error = format!(
            "delivered {} times, above WORKER_MAX_DEQUEUE_COUNT={} (earlier attempts crashed or lost their lease); not run again",
            msg.dequeue_count, settings.max_dequeue_count
        );
        tracing::error!(%error, "moving message to the poison queue before running it");
        let outcome = Outcome::failed(error, Retry::Permanent, Duration::ZERO);
        let settlement = poison_and_report(
            &app,
            target,
            &msg,
            &msg.pop_receipt,
            stats,
            task.webhook_url.as_ref(),
            &event_for(&outcome),
        )
        .await;
        return Processed::new(settlement, Status::Failed, &task.task_type, None);
    }

    // Lease renewal runs beside the handler and owns the latest pop receipt.
    let receipt = Arc::new(Mutex::new(msg.pop_receipt.clone()));
    let task_cancel = cancel.child_token();
    let lease_lost = CancellationToken::new();
    let stop_renewal = CancellationToken::new();
    let renewal = tokio::spawn(
        renew_lease(
            target.queue.clone(),
            msg.id.clone(),
            receipt.clone(),
            settings.visibility_timeout,
            stop_renewal.clone(),
            lease_lost.clone(),
            task_cancel.clone(),
        )
        .instrument(span.clone()),
    );

    let outcome = app.run(task.clone(), msg.dequeue_count, &task_cancel).await;
    stop_renewal.cancel();
    let renewals = renewal.await.unwrap_or(0);
    stats.renewed(renewals);
    let receipt = receipt.lock().await.clone();

    if lease_lost.is_cancelled() {
        tracing::warn!(
            status = outcome.status.as_str(),
            "lease lost while the task ran; not settling (the message is another worker's now and will be delivered again)"
        );
        return Processed::new(
            Settlement::LeaseLost,
            outcome.status,
            &task.task_type,
            Some(outcome.duration),
        );
    }

    let status = outcome.status;
    let settlement = match status {
        Status::Succeeded => {
            let s = delete(target, &msg.id, &receipt).await;
            app.notify(task.webhook_url.as_ref(), &event_for(&outcome))
                .await;
            s
        }
        Status::Cancelled => {
            let why = "task cancelled by shutdown; message released for another worker";
            release(target, &msg.id, &receipt, why).await
        }
        Status::Failed | Status::TimedOut
            if outcome.retry == Retry::Permanent
                || msg.dequeue_count >= settings.max_dequeue_count =>
        {
            if outcome.retry == Retry::Permanent {
                tracing::error!(
                    error = outcome.error.as_deref().unwrap_or_default(),
                    "permanent failure; moving message to the poison queue"
                );
            } else {
                tracing::error!(
                    attempts = msg.dequeue_count,
                    "last attempt failed; moving message to the poison queue"
                );
            }
            poison_and_report(
                &app,
                target,
                &msg,
                &receipt,
                stats,
                task.webhook_url.as_ref(),
                &event_for(&outcome),
            )
            .await
        }
        Status::Failed | Status::TimedOut => {
            let delay = retry_delay(settings.retry_delay, msg.dequeue_count);
            match settle_call(|| target.queue.update_visibility(&msg.id, &receipt, delay)).await {
                Ok(_) => {
                    tracing::info!(
                        retry_in_s = delay.as_secs(),
                        attempt = msg.dequeue_count,
                        max = settings.max_dequeue_count,
                        "task will be retried"
                    );
                    Settlement::Retried
                }
                Err(e) => unsettled(&e, "schedule the retry"),
            }
        }
    };
    Processed::new(settlement, status, &task.task_type, Some(outcome.duration))
}

/// Delay before attempt `n + 1`: `base · 2^(n-1)`, capped at one hour.
pub fn retry_delay(base: Duration, dequeue_count: u32) -> Duration {
    let factor = 2u32.saturating_pow(dequeue_count.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(Duration::from_secs(3600))
}

/// Renews the visibility at half-life until stopped; returns how many times.
/// The update in flight is never cancelled: its new receipt must be kept.
async fn renew_lease(
    queue: Queue,
    id: String,
    receipt: Arc<Mutex<String>>,
    visibility: Duration,
    stop: CancellationToken,
    lease_lost: CancellationToken,
    task_cancel: CancellationToken,
) -> u64 {
    let half = (visibility / 2).max(Duration::from_millis(500));
    let mut renewed = 0;
    let mut wait = half;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return renewed,
        }
        let current = receipt.lock().await.clone();
        match queue.update_visibility(&id, &current, visibility).await {
            Ok(new_receipt) => {
                *receipt.lock().await = new_receipt;
                renewed += 1;
                wait = half;
                tracing::debug!(visibility_s = visibility.as_secs(), "lease renewed");
            }
            Err(QueueError::LeaseLost { detail }) => {
                tracing::warn!(%detail, "lease lost; cancelling the task");
                lease_lost.cancel();
                task_cancel.cancel();
                return renewed;
            }
            Err(e) => {
                // Retry well before the lease runs out.
                wait = (visibility / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "lease renewal failed; retrying");
            }
        }
    }
}

/// Retries a settlement call a few times on transient errors.
async fn settle_call<T, F, Fut>(mut op: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_transient() && attempt < 5 => {
                tracing::warn!(error = %e, attempt, "queue call failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn unsettled(e: &QueueError, what: &str) -> Settlement {
    if let QueueError::LeaseLost { detail } = e {
        tracing::warn!(%detail, "could not {what}: lease lost; the message will be delivered again");
        return Settlement::LeaseLost;
    }
    tracing::error!(error = %e, "could not {what}; the message reappears when its lease expires");
    Settlement::Unsettled
}

async fn delete(target: &Target, id: &str, receipt: &str) -> Settlement {
    match settle_call(|| target.queue.delete(id, receipt)).await {
        Ok(()) => Settlement::Succeeded,
        Err(e) => unsettled(&e, "delete the message"),
    }
}

/// Makes a leased message visible again at once, for another worker; `why`
/// is logged when that worked.
async fn release(target: &Target, id: &str, receipt: &str, why: &str) -> Settlement {
    match settle_call(|| target.queue.update_visibility(id, receipt, Duration::ZERO)).await {
        Ok(_) => {
            tracing::info!(queue = %target.queue.name(), message_id = %id, "{why}");
            Settlement::Released
        }
        Err(e) => unsettled(&e, "release the message"),
    }
}

/// Hands back a message that was received but will not be started (it
/// arrived after shutdown began): visible again at once, counted as released.
pub async fn release_unstarted(target: &Target, msg: &Message, stats: &Stats) -> Settlement {
    let why = "received while stopping; released without running it";
    let settlement = release(target, &msg.id, &msg.pop_receipt, why).await;
    if settlement == Settlement::Released {
        Stats::inc(&stats.released);
    }
    settlement
}

/// Poisons the message and, once it is in the poison queue, tells the
/// backend (a message that could not be moved will be delivered again, and
/// reported then).
async fn poison_and_report(
    app: &App,
    target: &Target,
    msg: &Message,
    receipt: &str,
    stats: &Stats,
    webhook_url: Option<&url::Url>,
    event: &Event,
) -> Settlement {
    let settlement = poison(target, msg, receipt, stats).await;
    if settlement == Settlement::Poisoned {
        app.notify(webhook_url, event).await;
    }
    settlement
}

/// Copies the original text verbatim to the poison queue, then deletes the
/// original. Never deletes unless the copy was accepted.
async fn poison(target: &Target, msg: &Message, receipt: &str, stats: &Stats) -> Settlement {
    let sent = settle_call(|| async {
        match target.poison.send(&msg.text, None, Some(-1)).await {
            Err(QueueError::QueueNotFound { .. }) => {
                target.poison.create_if_missing().await?;
                target.poison.send(&msg.text, None, Some(-1)).await
            }
            other => other,
        }
    })
    .await;
    match sent {
        Ok(copy) => {
            tracing::error!(poison_queue = %target.poison.name(), poison_message_id = %copy.message_id,
                message_id = %msg.id, "message moved to the poison queue");
            match delete(target, &msg.id, receipt).await {
                Settlement::Succeeded => Settlement::Poisoned,
                other => other,
            }
        }
        Err(e) => {
            stats.queue_error(target.poison.name());
            unsettled(&e, "copy the message to the poison queue")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let b = Duration::from_secs(10);
        assert_eq!(retry_delay(b, 1), Duration::from_secs(10));
        assert_eq!(retry_delay(b, 2), Duration::from_secs(20));
        assert_eq!(retry_delay(b, 4), Duration::from_secs(80));
        assert_eq!(retry_delay(b, 40), Duration::from_secs(3600));
        assert_eq!(retry_delay(Duration::ZERO, 3), Duration::ZERO);
    }
}
