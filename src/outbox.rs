//! The webhook outbox: outcomes whose backend did not answer in time, kept in
//! the storage account the tasks already live in until it does.
//!
//! When the notifier's in-process attempts are used up (or shutdown cuts them
//! short), the event goes to the queue `<client>-webhooks` as an [`Entry`]:
//! URL, the exact body, the `webhook-id` and the attempt history. Only after
//! that write succeeded is the task's own message settled, so an outcome is
//! always either delivered, in the outbox, or still on the tasks queue (where
//! a redelivery runs the task and reports it again, under the same id).
//!
//! An entry is invisible until its next attempt is due: the message's
//! visibility timeout is the timer (up to 7 days per step), so waiting costs
//! nothing and survives any restart. [`run`] drains the outbox (polling mode
//! beside the task queues, job mode after its task, `worker deliver` on its
//! own): one attempt per due entry, through the same notifier (egress guard,
//! signing with a fresh timestamp, the destination's learned limit). A failed attempt rewrites
//! the entry with one more attempt recorded and hides it for the next delay of
//! `WORKER_WEBHOOK_OUTBOX_SCHEDULE`; after the last one, or at once for a URL
//! the egress guard refuses, the entry goes to `<client>-webhooks-poison`,
//! where `worker poison list|replay --webhooks` finds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use url::Url;

use crate::egress::redact_url;
use crate::lease::{send_creating, settle_call};
use crate::queue::{Message, Queue, QueueError, MAX_BATCH};
use crate::schedule::Schedule;
use crate::shutdown::Shutdown;
use crate::webhook::{count, results, AttemptError, Event, Notifier, WebhookError};

/// Largest entry, as the service counts it (XML-escaped): queue messages
/// hold 64 KiB.
const MAX_ENTRY: usize = 60 * 1024;
/// Receives of one entry beyond its recorded attempts (crashed deliverers)
/// before it is given up on.
const CRASH_SLACK: u32 = 5;
/// Lease on an entry beyond its one attempt's timeout (three of them: the
/// wait for a request slot and the reschedule call come on top). Short on
/// purpose: it is also how long an entry stays hidden when the worker
/// delivering it dies. Should a lease run out under load, another worker
/// delivers the same entry again, under the same id.
const LEASE_MARGIN: Duration = Duration::from_secs(15);
/// How often the drain loop samples each outbox's depth for the metric.
const DEPTH_EVERY: Duration = Duration::from_secs(30);
/// When an outcome the notifier deferred (its backend is failing, or holds
/// its share of the backlog) is first due, and the step by which a deferred
/// outbox entry's wait grows (up to [`MAX_DEFER`]). Deferrals are not
/// attempts: they do not use up the schedule.
pub const DEFER_STEP: Duration = Duration::from_secs(30);
const MAX_DEFER: Duration = Duration::from_secs(300);

/// One undelivered event. Serialized as the outbox message's text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Format version.
    pub v: u8,
    pub webhook_id: String,
    pub event_type: String,
    pub task_id: String,
    pub url: String,
    /// The exact body of every attempt (signed afresh each time).
    pub body: String,
    /// Attempts made so far, in-process ones included.
    pub attempts: u32,
    /// How many of those the outbox made: the position in the schedule.
    pub outbox_attempts: u32,
    /// When the outcome was first handed to the outbox (RFC 3339).
    pub outboxed_at: String,
    pub last_error: String,
    /// Which delay of the schedule follows the next failed attempt (absent
    /// in entries written before it existed: the number of outbox attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_delay: Option<u32>,
    /// Times the entry was put back without an attempt (its destination
    /// could not take a request then).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferrals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Entry {
    /// The entry for `event`, undelivered after `attempts` with `last_error`.
    /// A body too large for a queue message loses its `result` (replaced by
    /// a note), so the outcome itself still reaches the backend.
    pub fn new(url: &Url, event: &Event, attempts: u32, last_error: String) -> Self {
        let body = serde_json::to_string(event).unwrap_or_default();
        let mut entry = Self::with_body(url, event, attempts, last_error, body);
        let size = xml_len(&entry.to_text());
        if size > MAX_ENTRY {
            let mut slim = event.clone();
            slim.data.result = Some(serde_json::json!({
                "truncated": true,
                "reason": format!("the outcome ({size} bytes as a queue message) is too large for the webhook outbox; the result was left out of this delivery"),
            }));
            slim.data.error = slim.data.error.map(|e| e.chars().take(4096).collect());
            entry.body = serde_json::to_string(&slim).unwrap_or_default();
        }
        entry
    }

    fn with_body(
        url: &Url,
        event: &Event,
        attempts: u32,
        last_error: String,
        body: String,
    ) -> Self {
        Self {
            v: 1,
            webhook_id: event.webhook_id(),
            event_type: event.kind.to_owned(),
            task_id: event.data.task_id.clone(),
            url: url.to_string(),
            body,
            attempts,
            outbox_attempts: 0,
            outboxed_at: now_rfc3339(),
            last_error,
            next_delay: None,
            deferrals: 0,
        }
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not an outbox entry: {e}"))
    }
}

/// Length of `s` once XML-escaped, which is what the service's size limit counts.
fn xml_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\'' => 6,
            b'&' => 5,
            b'<' | b'>' => 4,
            _ => 1,
        })
        .sum()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// A client's outbox and its poison queue, with the retry schedule.
#[derive(Clone, Debug)]
pub struct Outbox {
    pub queue: Queue,
    pub poison: Queue,
    /// Delay before each outbox attempt; its length is the number of attempts.
    pub schedule: Arc<[Duration]>,
}

impl Outbox {
    /// Hands over an event the notifier could not deliver: into the outbox,
    /// due after the first scheduled delay; at once when shutdown cut the
    /// in-process attempts short, after [`DEFER_STEP`] when the notifier
    /// deferred it (in both cases the whole schedule still follows); or, for
    /// a URL the egress guard refuses, straight to the poison queue. `Ok`
    /// means the event is durably kept.
    pub async fn hand_over(
        &self,
        url: &Url,
        event: &Event,
        why: &WebhookError,
    ) -> Result<(), QueueError> {
        let mut entry = Entry::new(url, event, why.attempts(), why.to_string());
        if let WebhookError::Refused(_) = why {
            self.bury(&entry, &entry.to_text()).await?;
            return Ok(());
        }
        let (delay, next) = match why {
            WebhookError::Stopped { .. } => (Duration::ZERO, 0),
            WebhookError::Deferred { .. } => (DEFER_STEP, 0),
            _ => (self.schedule.first().copied().unwrap_or(Duration::ZERO), 1),
        };
        entry.next_delay = Some(next);
        let id = send_creating(&self.queue, &entry.to_text(), Some(delay)).await?;
        count(match why {
            WebhookError::Deferred { .. } => results::DEFERRED,
            _ => results::OUTBOXED,
        });
        tracing::warn!(outbox = %self.queue.name(), outbox_message_id = %id, webhook_id = %entry.webhook_id,
            task_id = %entry.task_id, next_attempt_in_s = delay.as_secs(), "webhook handed to the outbox");
        Ok(())
    }

    /// Gives up on an entry: `text` goes to the poison queue.
    async fn bury(&self, entry: &Entry, text: &str) -> Result<(), QueueError> {
        let id = send_creating(&self.poison, text, None).await?;
        count(results::POISONED);
        tracing::error!(poison_queue = %self.poison.name(), poison_message_id = %id, webhook_id = %entry.webhook_id,
            task_id = %entry.task_id, attempts = entry.attempts, last_error = %entry.last_error,
            "webhook given up on; replay it with `worker poison replay --webhooks`");
        Ok(())
    }
}

/// How the drain loop runs.
#[derive(Clone, Debug)]
pub struct DrainConfig {
    /// Entries being delivered at once (they also pass the notifier's per-destination limits).
    pub max_in_flight: usize,
    /// Longest pause between polls of an empty outbox.
    pub max_poll_interval: Duration,
    /// Return once every outbox answered empty and nothing is in flight.
    pub exit_when_empty: bool,
    /// Return after this many entries were taken.
    pub max_entries: Option<u64>,
}

/// What a drain did.
#[derive(Debug, Default)]
pub struct DrainStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub poisoned: AtomicU64,
    pub queue_errors: AtomicU64,
}

impl DrainStats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The drain loop's state: what one [`Drain::step`] needs.
struct Drain {
    notifier: Arc<Notifier>,
    /// Entries in flight give up their request when the grace is over.
    abort: CancellationToken,
    outboxes: Vec<Outbox>,
    cfg: DrainConfig,
    stats: Arc<DrainStats>,
    schedule: Schedule,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    /// Signalled whenever an entry is done with.
    settled: Arc<Notify>,
    /// When the last entry was done with: "empty" counts only after it.
    last_settled: Arc<Mutex<Instant>>,
    /// When each outbox's depth is sampled next (for the metric).
    depth_at: Vec<Instant>,
    lease: Duration,
    taken: u64,
}

impl Drain {
    fn idle(&self) -> bool {
        self.slots.available_permits() == self.cfg.max_in_flight.max(1)
    }

    /// One turn: wait for room or for the next outbox to be due, or receive
    /// its due entries and start one delivery each. `false`: stop.
    async fn step(&mut self, shutdown: &CancellationToken) -> bool {
        if shutdown.is_cancelled() || self.cfg.max_entries.is_some_and(|m| self.taken >= m) {
            return false;
        }
        let settled = self
            .last_settled
            .lock()
            .map_or_else(|p| *p.into_inner(), |g| *g);
        if self.cfg.exit_when_empty && self.idle() && self.schedule.all_empty_since(settled) {
            return false;
        }
        let Some((i, due)) = self.schedule.next() else {
            return false;
        };
        if due > Instant::now() || self.slots.available_permits() == 0 {
            let notify = self.settled.clone();
            tokio::select! {
                () = tokio::time::sleep_until(due.max(Instant::now() + Duration::from_millis(1))) => {}
                () = notify.notified() => {}
                () = shutdown.cancelled() => return false,
            }
            return true;
        }
        self.schedule.picked(i);
        self.sample_depth(i).await;
        let free = self.slots.available_permits() as u64;
        let remaining = self.cfg.max_entries.map_or(u64::MAX, |m| m - self.taken);
        let want = free.min(remaining).min(u64::from(MAX_BATCH)).max(1) as u8;
        match self.outboxes[i].queue.receive(want, self.lease).await {
            Ok(batch) if batch.is_empty() => {
                self.schedule.empty(i);
            }
            Ok(batch) => {
                self.schedule.brought(i);
                self.start(i, batch);
            }
            // Nothing was ever outboxed for this client yet.
            Err(QueueError::QueueNotFound { .. }) => {
                self.schedule.empty(i);
            }
            Err(e) => {
                DrainStats::inc(&self.stats.queue_errors);
                let retry_in_ms = self.schedule.failed(i).as_millis() as u64;
                tracing::warn!(queue = %self.outboxes[i].queue.name(), error = %e, retry_in_ms, "outbox receive failed; retrying");
            }
        }
        true
    }

    /// Samples outbox `i`'s depth for the metric (and the log, when it holds
    /// entries) every [`DEPTH_EVERY`].
    async fn sample_depth(&mut self, i: usize) {
        if self.depth_at[i] > Instant::now() {
            return;
        }
        self.depth_at[i] = Instant::now() + DEPTH_EVERY;
        let queue = &self.outboxes[i].queue;
        if let Ok(depth) = queue.approximate_count().await {
            ::metrics::gauge!(crate::metrics::OUTBOX_DEPTH, "queue" => queue.name().to_owned())
                .set(depth as f64);
            if depth > 0 {
                tracing::info!(queue = %queue.name(), depth, "outbox depth");
            }
        }
    }

    fn start(&mut self, i: usize, batch: Vec<Message>) {
        for msg in batch {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Cannot happen (we asked for at most the free slots); the
                // entry reappears when its lease ends.
                continue;
            };
            self.taken += 1;
            let (notifier, outbox, stats, abort) = (
                self.notifier.clone(),
                self.outboxes[i].clone(),
                self.stats.clone(),
                self.abort.clone(),
            );
            let (settled, last_settled) = (self.settled.clone(), self.last_settled.clone());
            let span =
                tracing::info_span!("outbox", queue = %outbox.queue.name(), message_id = %msg.id);
            self.tracker.spawn(
                async move {
                    deliver_entry(&notifier, &outbox, msg, &stats, &abort).await;
                    if let Ok(mut t) = last_settled.lock() {
                        *t = Instant::now();
                    }
                    drop(permit);
                    settled.notify_one();
                }
                .instrument(span),
            );
        }
    }
}

/// Drains `outboxes` until shutdown is requested (or the stop conditions in
/// `cfg` hold), then waits for the entries in flight: each is one request,
/// given up when the grace is over. The caller bounds the whole by the
/// shutdown's deadline.
pub async fn run(
    notifier: Arc<Notifier>,
    outboxes: Vec<Outbox>,
    cfg: DrainConfig,
    shutdown: &Shutdown,
) -> Arc<DrainStats> {
    let now = Instant::now();
    let mut drain = Drain {
        abort: shutdown.grace_over().clone(),
        lease: notifier.request_timeout() * 3 + LEASE_MARGIN,
        schedule: Schedule::new(outboxes.len(), cfg.max_poll_interval),
        depth_at: vec![now; outboxes.len()],
        slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        stats: Arc::new(DrainStats::default()),
        tracker: TaskTracker::new(),
        settled: Arc::new(Notify::new()),
        last_settled: Arc::new(Mutex::new(now)),
        taken: 0,
        notifier,
        outboxes,
        cfg,
    };
    while drain.step(shutdown.requested()).await {}
    drain.tracker.close();
    drain.tracker.wait().await;
    drain.stats
}

/// One attempt at one entry, then delete, reschedule or poison it; or, when
/// its destination cannot take a request now, put it back for later
/// without counting an attempt.
pub async fn deliver_entry(
    notifier: &Notifier,
    outbox: &Outbox,
    msg: Message,
    stats: &DrainStats,
    abort: &CancellationToken,
) {
    let (mut entry, url) = match deliverable(outbox, &msg) {
        Ok(ok) => ok,
        Err(refused) => {
            let (entry, text) = *refused;
            return give_up(outbox, &msg, &entry, &text, stats).await;
        }
    };
    let body = bytes::Bytes::from(entry.body.clone());
    let result = notifier.send(&url, &entry.webhook_id, body, abort).await;
    let target = redact_url(&url);
    let error = match result {
        Ok(status) => {
            entry.attempts += 1;
            count(results::DELIVERED);
            DrainStats::inc(&stats.delivered);
            tracing::info!(webhook = %target, webhook_id = %entry.webhook_id, task_id = %entry.task_id,
                event = %entry.event_type, attempts = entry.attempts, status, "webhook delivered from the outbox");
            if let Err(e) = settle_call(|| outbox.queue.delete(&msg.id, &msg.pop_receipt)).await {
                // Delivered, but it will be delivered again (same id) when
                // the entry reappears: harmless for an idempotent receiver.
                tracing::warn!(error = %e, "could not delete a delivered outbox entry; it will be delivered again");
            }
            return;
        }
        Err(AttemptError::Busy(busy)) => {
            count(results::DEFERRED);
            entry.deferrals += 1;
            let wait = DEFER_STEP.saturating_mul(entry.deferrals).min(MAX_DEFER);
            let why = format!("not attempted: {busy}");
            return put_back(outbox, &msg, &entry, wait, &why, stats).await;
        }
        Err(e) => e,
    };
    entry.attempts += 1;
    entry.last_error = error.describe();
    entry.outbox_attempts += 1;
    let index = entry.next_delay.unwrap_or(entry.outbox_attempts);
    let next = outbox.schedule.get(index as usize).copied();
    let (Some(delay), false) = (next, matches!(error, AttemptError::Refused(_))) else {
        let text = entry.to_text();
        return give_up(outbox, &msg, &entry, &text, stats).await;
    };
    entry.next_delay = Some(index + 1);
    count(results::RETRIED);
    DrainStats::inc(&stats.retried);
    put_back(outbox, &msg, &entry, delay, &entry.last_error, stats).await;
}

/// Rewrites the entry and hides it for `delay`.
async fn put_back(
    outbox: &Outbox,
    msg: &Message,
    entry: &Entry,
    delay: Duration,
    why: &str,
    stats: &DrainStats,
) {
    let text = entry.to_text();
    let rescheduled = settle_call(|| {
        outbox
            .queue
            .update(&msg.id, &msg.pop_receipt, delay, Some(&text))
    })
    .await;
    match rescheduled {
        Ok(_) => {
            tracing::warn!(webhook_id = %entry.webhook_id, task_id = %entry.task_id,
                attempts = entry.attempts, deferrals = entry.deferrals, error = %why,
                next_attempt_in_s = delay.as_secs(), "outbox entry not delivered; rescheduled");
        }
        Err(e) => {
            DrainStats::inc(&stats.queue_errors);
            tracing::warn!(error = %e, "could not reschedule an outbox entry; it reappears when its lease ends");
        }
    }
}

/// The entry and its URL, or what to poison instead: an unreadable message
/// (verbatim), an entry whose deliverers kept dying, or one with a bad URL.
fn deliverable(outbox: &Outbox, msg: &Message) -> Result<(Entry, Url), Box<(Entry, String)>> {
    let mut entry = match Entry::parse(&msg.text) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "outbox message is not an entry; moving it to the poison queue");
            let junk = Entry {
                v: 0,
                webhook_id: "-".into(),
                event_type: "-".into(),
                task_id: "-".into(),
                url: String::new(),
                body: String::new(),
                attempts: 0,
                outbox_attempts: 0,
                outboxed_at: String::new(),
                last_error: e,
                next_delay: None,
                deferrals: 0,
            };
            return Err(Box::new((junk, msg.text.clone())));
        }
    };
    let schedule_len = u32::try_from(outbox.schedule.len()).unwrap_or(u32::MAX);
    let accounted = schedule_len
        .saturating_add(1)
        .saturating_add(entry.deferrals)
        .saturating_add(CRASH_SLACK);
    if msg.dequeue_count > accounted {
        entry.last_error = format!(
            "taken {} times without a recorded result (deliverers crashed); last error: {}",
            msg.dequeue_count, entry.last_error
        );
        let text = entry.to_text();
        return Err(Box::new((entry, text)));
    }
    match Url::parse(&entry.url) {
        Ok(url) => Ok((entry, url)),
        Err(e) => {
            entry.last_error = format!("the entry's URL is invalid: {e}");
            let text = entry.to_text();
            Err(Box::new((entry, text)))
        }
    }
}

/// Moves an entry (as `text`) to the poison queue, then deletes it from the
/// outbox; never deletes unless the copy was accepted.
async fn give_up(outbox: &Outbox, msg: &Message, entry: &Entry, text: &str, stats: &DrainStats) {
    match outbox.bury(entry, text).await {
        Ok(()) => {
            DrainStats::inc(&stats.poisoned);
            if let Err(e) = settle_call(|| outbox.queue.delete(&msg.id, &msg.pop_receipt)).await {
                tracing::warn!(error = %e, "could not delete a poisoned outbox entry; it may be poisoned twice");
            }
        }
        Err(e) => {
            DrainStats::inc(&stats.queue_errors);
            tracing::error!(error = %e, "could not move an outbox entry to the poison queue; it reappears when its lease ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;

    fn event(result: serde_json::Value) -> Event {
        let outcome = Outcome::Succeeded {
            result,
            duration: Duration::from_millis(5),
        };
        Event::from_outcome("t1", "echo", Some("acme"), 2, &outcome)
    }

    #[test]
    fn entry_round_trips_and_keeps_the_id_and_body() {
        let url = Url::parse("https://h.example/hook?token=x").unwrap();
        let ev = event(serde_json::json!({"a": 1}));
        let e = Entry::new(&url, &ev, 5, "HTTP 503".into());
        assert_eq!(e.webhook_id, ev.webhook_id());
        assert_eq!(e.body, serde_json::to_string(&ev).unwrap());
        assert_eq!(Entry::parse(&e.to_text()).unwrap(), e);
        assert!(Entry::parse("{\"task_id\":\"t1\"}").is_err());
    }

    #[test]
    fn a_huge_result_is_left_out_but_the_outcome_kept() {
        let url = Url::parse("https://h.example/hook").unwrap();
        let ev = event(serde_json::json!({"blob": "x".repeat(100_000)}));
        let e = Entry::new(&url, &ev, 1, String::new());
        assert!(xml_len(&e.to_text()) < MAX_ENTRY, "{}", e.to_text().len());
        let body: serde_json::Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(body["type"], "task.succeeded");
        assert_eq!(body["data"]["result"]["truncated"], true);
        assert_eq!(e.webhook_id, ev.webhook_id());
    }
}
