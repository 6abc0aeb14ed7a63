//! One received message, from lease to settlement.
//!
//! [`process_message`] is the unit both the poller and job mode run for every
//! message: decode, refuse what can never succeed, run the rest, **report,
//! then settle**. The message is deleted (or poisoned) only once its outcome
//! has reached the backend or been written to the outbox
//! ([`crate::outbox`]): a crash anywhere before that means redelivery, a new
//! run and the same webhook again, under the same `webhook-id`.
//!
//! | outcome                                   | webhook (delivered or outboxed) | then                                |
//! |-------------------------------------------|---------------------------------|-------------------------------------|
//! | succeeded                                 | `task.succeeded`                | delete                              |
//! | failed / timed out, attempts left         | none (retrying)                 | visible again after a growing delay |
//! | failed / timed out, at the dequeue limit  | failed / timed_out              | copy verbatim to poison, delete     |
//! | permanent error, undecodable, unknown type| `task.failed`                   | copy verbatim to poison, delete     |
//! | cancelled by shutdown                     | none                            | visible again at once               |
//! | received after shutdown began (not run)   | none                            | visible again at once               |
//! | lease lost                                | none                            | nothing (another worker owns it)    |
//! | neither delivered nor outboxed            | —                               | visible again at once (runs again)  |
//!
//! The [`Lease`] is renewed from receive to settlement, through the handler
//! and the delivery. The task's concurrency slot ([`RunSlot`]) is freed as
//! soon as the handler is done: a slow backend holds a leased message and a
//! backlog permit, never a slot another task could run in.
//!
//! Finished tasks waiting to settle are bounded too: the poller receives
//! only while fewer than `WORKER_CONCURRENCY` plus the notifier's backlog
//! (four outcomes per `WORKER_WEBHOOK_CONCURRENCY` slot) messages are held
//! ([`Consumer::has_room`]), and at most [`OUTBOX_WRITERS`] outbox writes run at once. Without that, a client
//! whose backend fails has every task's outcome deferred at once, and the
//! poller (slots free again within milliseconds) would receive its whole
//! queue and fire one outbox write per message at the storage account: the
//! calls time out, and every client's settlement with them. While other
//! queues have work, a queue whose outcomes were deferred lately
//! ([`Deferring`]) is received from in small batches a few times a second,
//! so a client whose backend cannot take its outcomes does not take the
//! storage account's capacity from clients whose backends can.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::execute::{Outcome, Status};
use crate::handler::Retry;
pub use crate::lease::Settlement;
use crate::lease::{Lease, Settled};
use crate::metrics as names;
use crate::outbox::Outbox;
use crate::queue::{Message, Queue};
use crate::shutdown::Shutdown;
use crate::task;
use crate::webhook::{Event, WebhookError};

/// A consumed queue, where its poisoned messages go, and the outbox its
/// undelivered webhooks go to.
#[derive(Clone)]
pub struct Target {
    /// The client the queue belongs to (from `WORKER_CLIENT`), if known.
    pub client: Option<String>,
    pub queue: Queue,
    pub poison: Queue,
    pub outbox: Outbox,
    /// Whether this queue's outcomes were deferred lately.
    pub deferring: Deferring,
}

/// When a queue's outcome was last deferred to the outbox because its
/// destination could not take it (failing, or holding its share of the
/// backlog). The poller receives such a queue in small batches for
/// [`Deferring::WINDOW`] after, so other clients keep the storage account's
/// capacity; a delivered outcome ends it at once.
#[derive(Clone, Debug, Default)]
pub struct Deferring(Arc<Mutex<Option<Instant>>>);

impl Deferring {
    const WINDOW: Duration = Duration::from_secs(5);

    fn set(&self, deferred: bool) {
        if let Ok(mut at) = self.0.lock() {
            *at = deferred.then(Instant::now);
        }
    }

    /// An outcome was deferred within the last [`Deferring::WINDOW`].
    pub fn lately(&self) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < Self::WINDOW)
    }
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

/// What happened to one message.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    pub settlement: Settlement,
    /// The task's outcome, when it was decoded (and possibly run).
    pub status: Option<Status>,
    /// `unknown` when the message was not a valid task or its type is not
    /// registered (it is a metric label).
    pub task_type: String,
    /// Handler run time, when the handler ran.
    pub duration: Option<Duration>,
    /// The outcome reported to the backend, when there was one to report.
    pub event: Option<Event>,
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

/// What every message needs besides itself; shared by the tasks of one loop.
pub struct Consumer {
    pub app: Arc<App>,
    pub settings: Settings,
    pub stats: Arc<Stats>,
    /// The process's shutdown: at `requested` deliveries make no new
    /// attempt (what they could not deliver goes to the outbox at once); at
    /// `grace_over` running tasks are cancelled and released.
    pub shutdown: Shutdown,
    /// Signalled whenever a run slot is freed or a message is settled.
    pub freed: Arc<Notify>,
    /// Outbox writes in flight.
    hand_overs: Arc<Semaphore>,
}

/// Outbox writes one process makes at once.
pub const OUTBOX_WRITERS: usize = 16;

impl Consumer {
    pub fn new(app: Arc<App>, settings: Settings, stats: Arc<Stats>, shutdown: Shutdown) -> Self {
        Self {
            app,
            settings,
            stats,
            shutdown,
            freed: Arc::new(Notify::new()),
            hand_overs: Arc::new(Semaphore::new(OUTBOX_WRITERS)),
        }
    }

    /// Whether another message may be received besides the `running` tasks:
    /// the notifier's backlog, bounded in count and bytes, has room, and the
    /// finished messages not yet settled are fewer than that backlog.
    pub fn has_room(&self, running: usize) -> bool {
        let held = Stats::get(&self.stats.in_flight) as usize;
        self.app.notifier.has_room() && held.saturating_sub(running) < self.app.notifier.backlog()
    }
}

/// A task's concurrency slot, freed as soon as its handler is done (the
/// delivery that follows does not hold it).
pub struct RunSlot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Option<Arc<Notify>>,
}

impl RunSlot {
    pub fn new(permit: OwnedSemaphorePermit, freed: Arc<Notify>) -> Self {
        Self {
            permit: Some(permit),
            freed: Some(freed),
        }
    }

    /// No slot to free (job mode runs one message).
    pub fn none() -> Self {
        Self {
            permit: None,
            freed: None,
        }
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(freed) = &self.freed {
            freed.notify_one();
        }
    }
}

/// What the message owes before it may go, decided once the task has run
/// (or was refused).
enum Then {
    /// Report, then delete.
    Delete,
    /// Report, then move verbatim to the poison queue.
    Poison,
    /// No report yet: visible again after the delay.
    RetryIn(Duration),
    /// No report: visible again after the delay (the time a cancelled
    /// handler's child may still take to die, so no second copy runs beside
    /// it), with the reason logged.
    Release(Duration, &'static str),
}

/// The outcome of the run step.
struct Step {
    then: Then,
    webhook: Option<url::Url>,
    event: Option<Event>,
    status: Status,
    task_type: String,
    duration: Option<Duration>,
}

/// Processes one received message to settlement: run, report, settle (in
/// that order). Never panics, never returns an error: whatever happens is
/// logged, counted and settled (or left to the visibility timeout, which is
/// the at-least-once safety net). `slot` is dropped when the handler is done.
/// The task is cancelled when the shutdown's grace is over or its lease is lost.
pub async fn process_message(
    consumer: Arc<Consumer>,
    target: Target,
    msg: Message,
    slot: RunSlot,
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
    consumer.stats.started(target.queue.name());
    let result = process(&consumer, &target, msg, slot)
        .instrument(span)
        .await;
    consumer.stats.finished(&result, target.queue.name());
    consumer.freed.notify_one();
    result
}

async fn process(consumer: &Consumer, target: &Target, msg: Message, slot: RunSlot) -> Processed {
    // The one token of this task: the grace is over, or the lease was lost.
    let cancel = consumer.shutdown.grace_over().child_token();
    // Held from now until settlement: through the run and the delivery.
    let lease = Lease::start(
        target.queue.clone(),
        &msg,
        consumer.settings.visibility_timeout,
        cancel.clone(),
    );
    let step = run(consumer, target, &msg, &cancel).await;
    drop(slot);
    let settled = settle(consumer, target, &msg, lease, &step).await;
    consumer.stats.renewed(settled.renewals);
    Processed {
        settlement: settled.settlement,
        status: Some(step.status),
        task_type: step.task_type,
        duration: step.duration,
        event: step.event,
    }
}

/// What the message owes, in order: report (for a delete or a poison), then
/// the queue call.
async fn settle(
    consumer: &Consumer,
    target: &Target,
    msg: &Message,
    lease: Lease,
    step: &Step,
) -> Settled {
    if lease.is_lost() {
        return lease.forfeit().await;
    }
    match step.then {
        Then::RetryIn(delay) => {
            let settled = lease.retry_in(delay).await;
            if settled.settlement == Settlement::Retried {
                tracing::info!(
                    retry_in_s = delay.as_secs(),
                    attempt = msg.dequeue_count,
                    max = consumer.settings.max_dequeue_count,
                    "task will be retried"
                );
            }
            settled
        }
        Then::Release(delay, why) => lease.release_after(delay, why).await,
        Then::Delete | Then::Poison => {
            let reported = match (&step.webhook, &step.event) {
                (Some(url), Some(event)) => report(consumer, target, url, event, &lease).await,
                _ => true,
            };
            if !reported {
                lease
                    .release_after(Duration::ZERO, "outcome neither delivered nor written to the outbox before shutdown; released to run and report again")
                    .await
            } else if let Then::Poison = step.then {
                lease.poison(&target.poison, &msg.text).await
            } else {
                lease.delete().await
            }
        }
    }
}

/// Waits between attempts to write the outbox while the task message is held.
const HAND_OVER_RETRY: [u64; 6] = [1, 2, 4, 8, 16, 30];

/// Delivers `event`, or hands it to the outbox. A failing outbox write is
/// tried again (the message stays leased meanwhile, so the task does not
/// run again for nothing) until it works, the lease is lost, or shutdown is
/// requested; `false` then: the task message must stay, so a redelivery
/// reports again.
async fn report(
    consumer: &Consumer,
    target: &Target,
    url: &url::Url,
    event: &Event,
    lease: &Lease,
) -> bool {
    let delivered = consumer
        .app
        .notifier
        .notify(url, event, &consumer.shutdown)
        .await;
    target
        .deferring
        .set(matches!(delivered, Err(WebhookError::Deferred { .. })));
    let Err(e) = delivered else {
        return true;
    };
    let requested = consumer.shutdown.requested();
    for n in 0.. {
        // Biased: after a shutdown request the hand-over still happens (that
        // is what shutdown cuts deliveries short for); only a wait for a
        // writer ends with it.
        let permit = tokio::select! {
            biased;
            permit = consumer.hand_overs.acquire() => permit,
            () = requested.cancelled() => return false,
            () = lease.lost() => return false,
        };
        let handed = target.outbox.hand_over(url, event, &e).await;
        drop(permit);
        let qe = match handed {
            Ok(()) => return true,
            Err(qe) => qe,
        };
        consumer.stats.queue_error(target.outbox.queue.name());
        let wait = Duration::from_secs(HAND_OVER_RETRY[n.min(HAND_OVER_RETRY.len() - 1)]);
        tracing::error!(error = %qe, outbox = %target.outbox.queue.name(), retry_in_s = wait.as_secs(),
            "webhook not delivered and the outbox cannot be written; holding the task message and trying again");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = requested.cancelled() => return false,
            () = lease.lost() => return false,
        }
    }
    false
}

/// Decodes, refuses what can never succeed, runs the rest; decides what the
/// message owes.
async fn run(
    consumer: &Consumer,
    target: &Target,
    msg: &Message,
    cancel: &CancellationToken,
) -> Step {
    let settings = &consumer.settings;
    let task = match task::decode(msg.text.as_bytes()) {
        Ok((task, _)) => Arc::new(task),
        Err(e) => return refuse_undecodable(target, msg, &e),
    };
    let span = tracing::Span::current();
    span.record("task_id", task.task_id.as_str());
    span.record("task_type", task.task_type.as_str());
    let client = task.client.as_deref().or(target.client.as_deref());
    let event_for = |outcome: &Outcome| {
        Event::from_outcome(
            &task.task_id,
            &task.task_type,
            client,
            msg.dequeue_count,
            outcome,
        )
    };
    let step = |then: Then, outcome: &Outcome, ran: bool| Step {
        event: matches!(then, Then::Delete | Then::Poison).then(|| event_for(outcome)),
        webhook: task.webhook_url.clone(),
        then,
        status: outcome.status(),
        task_type: metric_label(consumer, &task.task_type),
        duration: ran.then(|| outcome.duration()),
    };

    if msg.dequeue_count > settings.max_dequeue_count {
        let error = format!(
            "delivered {} times, above WORKER_MAX_DEQUEUE_COUNT={} (earlier attempts crashed or lost their lease); not run again",
            msg.dequeue_count, settings.max_dequeue_count
        );
        tracing::error!(%error, "moving message to the poison queue before running it");
        let outcome = Outcome::failed(error, Retry::Permanent, Duration::ZERO);
        return step(Then::Poison, &outcome, false);
    }
    let outcome = consumer
        .app
        .run(task.clone(), msg.dequeue_count, cancel)
        .await;
    step(
        then_for(
            &outcome,
            msg.dequeue_count,
            settings,
            stop_grace(consumer, &task.task_type),
        ),
        &outcome,
        true,
    )
}

/// A message that is not a task can never succeed: poison it, and report
/// `task.failed` when a webhook URL can still be read from it.
fn refuse_undecodable(target: &Target, msg: &Message, e: &task::DecodeError) -> Step {
    let salvage = task::salvage(msg.text.as_bytes());
    tracing::error!(message_id = %msg.id, error = %e, "message is not a valid task; moving it to the poison queue");
    let outcome = Outcome::failed(
        format!("invalid task: {e}"),
        Retry::Permanent,
        Duration::ZERO,
    );
    let event = Event::from_outcome(
        &salvage
            .task_id
            .clone()
            .unwrap_or_else(|| task::content_id(msg.text.as_bytes())),
        salvage.task_type.as_deref().unwrap_or("unknown"),
        salvage.client.as_deref().or(target.client.as_deref()),
        msg.dequeue_count,
        &outcome,
    );
    Step {
        then: Then::Poison,
        webhook: salvage.webhook_url,
        event: Some(event),
        status: Status::Failed,
        task_type: "unknown".into(),
        duration: None,
    }
}

/// What a run's outcome means for its message.
fn then_for(
    outcome: &Outcome,
    dequeue_count: u32,
    settings: &Settings,
    stop_grace: Duration,
) -> Then {
    match outcome.status() {
        Status::Succeeded => Then::Delete,
        Status::Cancelled => Then::Release(
            stop_grace,
            "task cancelled by shutdown; message released for another worker",
        ),
        Status::Failed | Status::TimedOut if outcome.is_permanent() => {
            tracing::error!(
                error = outcome.error().unwrap_or_default(),
                "permanent failure; moving message to the poison queue"
            );
            Then::Poison
        }
        Status::Failed | Status::TimedOut if dequeue_count >= settings.max_dequeue_count => {
            tracing::error!(
                attempts = dequeue_count,
                "last attempt failed; moving message to the poison queue"
            );
            Then::Poison
        }
        Status::Failed | Status::TimedOut => {
            Then::RetryIn(retry_delay(settings.retry_delay, dequeue_count))
        }
    }
}

/// How long a cancelled run of `task_type` may leave something running.
fn stop_grace(consumer: &Consumer, task_type: &str) -> Duration {
    consumer
        .app
        .registry
        .get(task_type)
        .map_or(Duration::ZERO, |h| h.stop_grace())
}

/// The task type as a metric label: only registered types, so that messages
/// (which anyone with queue access writes) cannot grow the label set.
fn metric_label(consumer: &Consumer, task_type: &str) -> String {
    if consumer.app.registry.get(task_type).is_some() {
        task_type.to_owned()
    } else {
        "unknown".to_owned()
    }
}

/// Delay before attempt `n + 1`: `base · 2^(n-1)`, capped at one hour.
pub fn retry_delay(base: Duration, dequeue_count: u32) -> Duration {
    let factor = 2u32.saturating_pow(dequeue_count.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(Duration::from_secs(3600))
}

/// Hands back a message that was received but will not be started (it
/// arrived after shutdown began): visible again at once, counted as released.
pub async fn release_unstarted(target: &Target, msg: &Message, stats: &Stats) -> Settlement {
    let settlement = crate::lease::release_unstarted(&target.queue, msg).await;
    if settlement == Settlement::Released {
        Stats::inc(&stats.released);
    }
    settlement
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
