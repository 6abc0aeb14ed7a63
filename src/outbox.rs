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
//!
//! # Outcomes of any size
//!
//! An entry is a queue message, at most 64 KiB, while a result may be 16 MiB
//! and a task id has no length limit. Cutting the result would lose the
//! outcome, and an entry that does not fit can never be written. So an entry
//! whose text would come near the limit (room is kept for the recorded error
//! to grow) is split: the part that never changes and may be large, the
//! [`Delivery`] (URL, body, task id, event type), goes to a blob in the
//! container `<client>-webhooks` of the same account first (a claim check),
//! and only then is the entry written, holding the blob's name, a cut copy of
//! the task id and the small fields that change. A crash between the two
//! leaves a blob nothing points to, never an entry pointing to nothing. The
//! drain reads the blob before the attempt; once delivered and the entry
//! deleted, it deletes the blob (should that fail, the blob is left behind
//! unreferenced, and the log names it). A poisoned entry keeps its blob, so a
//! replay still delivers it; an entry whose blob is gone is poisoned saying
//! so. Small entries keep the format every earlier worker wrote (`v: 1`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use url::Url;

use crate::egress::redact_url;
use crate::lease::{send_creating, settle_call};
use crate::queue::{ClaimStore, Message, Queue, QueueError, MAX_BATCH};
use crate::schedule::Schedule;
use crate::shutdown::Shutdown;
use crate::webhook::{count, results, AttemptError, Event, Notifier, WebhookError};

/// Largest entry, as the service counts it (XML-escaped): queue messages
/// hold 64 KiB.
const MAX_ENTRY: usize = 60 * 1024;
/// Longest `last_error` an entry keeps (bytes, cut at a character boundary).
const MAX_ERROR: usize = 1024;
/// Longest task id a claimed entry keeps for logs and `poison list`.
const MAX_TASK_SHOWN: usize = 128;
/// Room an inline entry keeps for what changes while it waits: the error
/// (each byte up to 7 once JSON- and XML-escaped) and the counters (four
/// of them, each up to ten digits, two written only once set). An entry
/// that fits with this room still fits after any number of attempts.
const GROWTH_ROOM: usize = 7 * MAX_ERROR + 160;
/// Longest claim (blob) name a parsed entry may point to.
const MAX_CLAIM_NAME: usize = 200;
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

/// What an entry delivers: never changes, and may be large (the body holds
/// the task's result, the task id has no length limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub event_type: String,
    pub task_id: String,
    pub url: String,
    /// The exact body of every attempt (signed afresh each time).
    pub body: String,
}

/// Where an entry's [`Delivery`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// In the queue message itself (format `v: 1`).
    Inline(Delivery),
    /// Too large for a queue message: in blob `claim` of the outbox's
    /// container, written before the entry (format `v: 2`). `task_id` is a
    /// copy cut to [`MAX_TASK_SHOWN`] bytes, for logs and `poison list`.
    Claimed { claim: String, task_id: String },
}

/// One undelivered event: its delivery (inline or claimed) and the attempt
/// history. Serialized as the outbox message's text, which stays within a
/// queue message whatever the outcome's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub webhook_id: String,
    pub payload: Payload,
    /// Attempts made so far, in-process ones included.
    pub attempts: u32,
    /// How many of those the outbox made: the position in the schedule.
    pub outbox_attempts: u32,
    /// When the outcome was first handed to the outbox (RFC 3339).
    pub outboxed_at: String,
    /// Cut to [`MAX_ERROR`] bytes; set it with [`Entry::set_error`].
    pub last_error: String,
    /// Which delay of the schedule follows the next failed attempt (absent
    /// in entries written before it existed: the number of outbox attempts).
    pub next_delay: Option<u32>,
    /// Times the entry was put back without an attempt (its destination
    /// could not take a request then).
    pub deferrals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The entry as its JSON text has it. Version 1 (inline) is the format
/// every worker so far wrote and read; version 2 replaces `url`, `body` and
/// `event_type` with `claim` and keeps a cut copy of `task_id`.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    webhook_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claim: Option<String>,
    attempts: u32,
    outbox_attempts: u32,
    outboxed_at: String,
    last_error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_delay: Option<u32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    deferrals: u32,
}

impl Entry {
    /// The entry for `event`, undelivered after `attempts` with `last_error`;
    /// inline until [`Entry::claim_if_large`] moves its delivery out.
    pub fn new(url: &Url, event: &Event, attempts: u32, last_error: String) -> Self {
        let mut entry = Self {
            webhook_id: event.webhook_id(),
            payload: Payload::Inline(Delivery {
                event_type: event.kind.to_owned(),
                task_id: event.data.task_id.clone(),
                url: url.to_string(),
                body: serde_json::to_string(event).unwrap_or_default(),
            }),
            attempts,
            outbox_attempts: 0,
            outboxed_at: now_rfc3339(),
            last_error: String::new(),
            next_delay: None,
            deferrals: 0,
        };
        entry.set_error(last_error);
        entry
    }

    /// An unreadable outbox message, for the poison queue's log line.
    fn unreadable(error: String) -> Self {
        let mut entry = Self {
            webhook_id: "-".into(),
            payload: Payload::Claimed {
                claim: String::new(),
                task_id: "-".into(),
            },
            attempts: 0,
            outbox_attempts: 0,
            outboxed_at: String::new(),
            last_error: String::new(),
            next_delay: None,
            deferrals: 0,
        };
        entry.set_error(error);
        entry
    }

    /// Records `error`, cut to [`MAX_ERROR`] bytes.
    pub fn set_error(&mut self, error: String) {
        self.last_error = cut(error, MAX_ERROR);
    }

    /// The task id for logs, cut to [`MAX_TASK_SHOWN`] bytes.
    pub fn task_shown(&self) -> String {
        match &self.payload {
            Payload::Inline(d) => cut(d.task_id.clone(), MAX_TASK_SHOWN),
            Payload::Claimed { task_id, .. } => task_id.clone(),
        }
    }

    /// The blob this entry's delivery is in, if it is claimed.
    pub fn claim(&self) -> Option<&str> {
        match &self.payload {
            Payload::Inline(_) => None,
            Payload::Claimed { claim, .. } => Some(claim),
        }
    }

    /// The split decision: when this inline entry, with room for its error
    /// and counters to grow, would not fit in a queue message, its delivery
    /// becomes a claim. Returns the claim's blob name and content, which
    /// must be stored before the entry is written; `None` when the entry
    /// stays as it is.
    pub fn claim_if_large(&mut self) -> Option<(String, Vec<u8>)> {
        let Payload::Inline(delivery) = &self.payload else {
            return None;
        };
        // Escaping only lengthens text: the raw sizes alone can settle it.
        let raw = delivery.body.len() + delivery.task_id.len() + delivery.url.len();
        if raw + GROWTH_ROOM <= MAX_ENTRY {
            let error_len = xml_len(&serde_json::to_string(&self.last_error).unwrap_or_default());
            if xml_len(&self.to_text()).saturating_sub(error_len) + GROWTH_ROOM <= MAX_ENTRY {
                return None;
            }
        }
        let bytes = serde_json::to_vec(delivery).unwrap_or_default();
        let claim = claim_name(&self.webhook_id, &bytes);
        let task_id = cut(delivery.task_id.clone(), MAX_TASK_SHOWN);
        // The inline copy (as large as the blob) is dropped here.
        self.payload = Payload::Claimed {
            claim: claim.clone(),
            task_id,
        };
        Some((claim, bytes))
    }

    pub fn to_text(&self) -> String {
        let (event_type, task_id, url, body, claim) = match &self.payload {
            Payload::Inline(d) => (
                Some(d.event_type.clone()),
                d.task_id.clone(),
                Some(d.url.clone()),
                Some(d.body.clone()),
                None,
            ),
            Payload::Claimed { claim, task_id } => {
                (None, task_id.clone(), None, None, Some(claim.clone()))
            }
        };
        let wire = Wire {
            v: if claim.is_some() { 2 } else { 1 },
            webhook_id: self.webhook_id.clone(),
            event_type,
            task_id,
            url,
            body,
            claim,
            attempts: self.attempts,
            outbox_attempts: self.outbox_attempts,
            outboxed_at: self.outboxed_at.clone(),
            last_error: self.last_error.clone(),
            next_delay: self.next_delay,
            deferrals: self.deferrals,
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let w: Wire =
            serde_json::from_str(text).map_err(|e| format!("not an outbox entry: {e}"))?;
        let payload = match (w.v, w.claim, w.event_type, w.url, w.body) {
            (1, None, Some(event_type), Some(url), Some(body)) => Payload::Inline(Delivery {
                event_type,
                task_id: w.task_id,
                url,
                body,
            }),
            (2, Some(claim), None, None, None) if valid_claim_name(&claim) => Payload::Claimed {
                claim,
                task_id: cut(w.task_id, MAX_TASK_SHOWN),
            },
            (1 | 2, ..) => {
                return Err(format!(
                    "not an outbox entry: fields do not match format v{}",
                    w.v
                ))
            }
            (v, ..) => {
                return Err(format!(
                    "outbox entry format v{v} is unknown to this worker (written by a newer one?)"
                ))
            }
        };
        let mut entry = Self {
            webhook_id: w.webhook_id,
            payload,
            attempts: w.attempts,
            outbox_attempts: w.outbox_attempts,
            outboxed_at: w.outboxed_at,
            last_error: String::new(),
            next_delay: w.next_delay,
            deferrals: w.deferrals,
        };
        entry.set_error(w.last_error);
        Ok(entry)
    }
}

/// `<webhook-id>-<16 hex of SHA-256(content)>.json`: the same delivery
/// written again (a retried hand-over) lands on the same blob, while two
/// entries of one outcome (a task run twice) never share one, so delivering
/// one and deleting its blob cannot strand the other.
fn claim_name(webhook_id: &str, content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let id: String = webhook_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    format!("{id}-{hex}.json")
}

/// Only names [`claim_name`] makes: nothing that reaches outside the container.
fn valid_claim_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CLAIM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
}

/// `s` cut to at most `max` bytes at a character boundary, `…` marking a cut.
fn cut(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    format!("{}…", cut_str(&s, max - '…'.len_utf8()))
}

fn cut_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

/// A client's outbox and its poison queue, with the retry schedule, and the
/// blob container that holds the deliveries too large for an entry.
#[derive(Clone, Debug)]
pub struct Outbox {
    pub queue: Queue,
    pub poison: Queue,
    /// Delay before each outbox attempt; its length is the number of attempts.
    pub schedule: Arc<[Duration]>,
    /// Container `<client>-webhooks`, named like the outbox queue.
    pub claims: ClaimStore,
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
        self.store_claim(&mut entry).await?;
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
            task_id = %entry.task_shown(), claim = entry.claim().unwrap_or("-"),
            next_attempt_in_s = delay.as_secs(), "webhook handed to the outbox");
        Ok(())
    }

    /// Moves a delivery too large for a queue message to its blob, before
    /// the entry pointing to it is written: a crash in between leaves an
    /// unreferenced blob, never an entry pointing to nothing.
    async fn store_claim(&self, entry: &mut Entry) -> Result<(), QueueError> {
        let Some((name, bytes)) = entry.claim_if_large() else {
            return Ok(());
        };
        let size = bytes.len();
        settle_call(|| self.claims.put(&name, bytes.clone())).await?;
        tracing::info!(container = %self.claims.container(), claim = %name, bytes = size,
            webhook_id = %entry.webhook_id, "outcome too large for a queue message; stored as a blob");
        Ok(())
    }

    /// Gives up on an entry: `text` goes to the poison queue. A claimed
    /// entry keeps its blob, so a replay can still deliver it.
    async fn bury(&self, entry: &Entry, text: &str) -> Result<(), QueueError> {
        let id = send_creating(&self.poison, text, None).await?;
        count(results::POISONED);
        tracing::error!(poison_queue = %self.poison.name(), poison_message_id = %id, webhook_id = %entry.webhook_id,
            task_id = %entry.task_shown(), claim = entry.claim().unwrap_or("-"), attempts = entry.attempts,
            last_error = %entry.last_error,
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
    let mut entry = match deliverable(outbox, &msg) {
        Ok(entry) => entry,
        Err(refused) => {
            let (entry, text) = *refused;
            return give_up(outbox, &msg, &entry, &text, stats).await;
        }
    };
    let (mut delivery, url) = match load(outbox, &entry).await {
        Ok(loaded) => loaded,
        Err(Unloadable::Poison(why)) => {
            entry.set_error(why);
            let text = entry.to_text();
            return give_up(outbox, &msg, &entry, &text, stats).await;
        }
        Err(Unloadable::Later(e)) => {
            DrainStats::inc(&stats.queue_errors);
            tracing::warn!(error = %e, "cannot read an outbox entry's claimed delivery; it reappears when its lease ends");
            return;
        }
    };
    let body = bytes::Bytes::from(std::mem::take(&mut delivery.body));
    let result = notifier.send(&url, &entry.webhook_id, body, abort).await;
    let target = redact_url(&url);
    let error = match result {
        Ok(status) => {
            entry.attempts += 1;
            count(results::DELIVERED);
            DrainStats::inc(&stats.delivered);
            tracing::info!(webhook = %target, webhook_id = %entry.webhook_id, task_id = %entry.task_shown(),
                event = %delivery.event_type, attempts = entry.attempts, status, "webhook delivered from the outbox");
            match settle_call(|| outbox.queue.delete(&msg.id, &msg.pop_receipt)).await {
                Ok(()) => forget_claim(outbox, &entry).await,
                // Delivered, but it will be delivered again (same id) when
                // the entry reappears: harmless for an idempotent receiver.
                // Its claim stays for that delivery.
                Err(e) => {
                    tracing::warn!(error = %e, "could not delete a delivered outbox entry; it will be delivered again")
                }
            }
            return;
        }
        Err(AttemptError::Busy(busy)) => {
            count(results::DEFERRED);
            entry.deferrals = entry.deferrals.saturating_add(1);
            let wait = DEFER_STEP.saturating_mul(entry.deferrals).min(MAX_DEFER);
            let why = format!("not attempted: {busy}");
            return put_back(outbox, &msg, &entry, wait, &why, stats).await;
        }
        Err(e) => e,
    };
    entry.attempts += 1;
    entry.set_error(error.describe());
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
            tracing::warn!(webhook_id = %entry.webhook_id, task_id = %entry.task_shown(),
                attempts = entry.attempts, deferrals = entry.deferrals, error = %why,
                next_attempt_in_s = delay.as_secs(), "outbox entry not delivered; rescheduled");
        }
        Err(e) => {
            DrainStats::inc(&stats.queue_errors);
            tracing::warn!(error = %e, "could not reschedule an outbox entry; it reappears when its lease ends");
        }
    }
}

/// The entry, or what to poison instead: an unreadable message (verbatim),
/// or an entry whose deliverers kept dying.
fn deliverable(outbox: &Outbox, msg: &Message) -> Result<Entry, Box<(Entry, String)>> {
    let mut entry = match Entry::parse(&msg.text) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "outbox message is not an entry; moving it to the poison queue");
            return Err(Box::new((Entry::unreadable(e), msg.text.clone())));
        }
    };
    let schedule_len = u32::try_from(outbox.schedule.len()).unwrap_or(u32::MAX);
    let accounted = schedule_len
        .saturating_add(1)
        .saturating_add(entry.deferrals)
        .saturating_add(CRASH_SLACK);
    if msg.dequeue_count > accounted {
        entry.set_error(format!(
            "taken {} times without a recorded result (deliverers crashed); last error: {}",
            msg.dequeue_count, entry.last_error
        ));
        let text = entry.to_text();
        return Err(Box::new((entry, text)));
    }
    Ok(entry)
}

/// Why an entry's delivery is not at hand.
enum Unloadable {
    /// It never will be (its blob is gone or unreadable, its URL invalid):
    /// poison the entry, saying why.
    Poison(String),
    /// Storage trouble: the entry reappears when its lease ends.
    Later(QueueError),
}

/// The entry's delivery, read from its blob when it is claimed, and its URL.
async fn load(outbox: &Outbox, entry: &Entry) -> Result<(Delivery, Url), Unloadable> {
    let delivery = match &entry.payload {
        Payload::Inline(d) => d.clone(),
        Payload::Claimed { claim, .. } => {
            let where_ = format!("blob `{}/{claim}`", outbox.claims.container());
            let bytes = match settle_call(|| outbox.claims.get(claim)).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    return Err(Unloadable::Poison(format!(
                    "its delivery ({where_}) is gone: deleted after another entry of webhook-id {} \
                     with the same content was delivered (check the receiver), or removed by hand; \
                     nothing is left to deliver", entry.webhook_id)))
                }
                Err(e) if e.is_transient() => return Err(Unloadable::Later(e)),
                Err(e) => {
                    return Err(Unloadable::Poison(format!(
                        "cannot read its delivery ({where_}): {e}; fix that, then replay it"
                    )))
                }
            };
            serde_json::from_slice(&bytes).map_err(|e| {
                Unloadable::Poison(format!("{where_} does not hold an outbox delivery: {e}"))
            })?
        }
    };
    match Url::parse(&delivery.url) {
        Ok(url) => Ok((delivery, url)),
        Err(e) => Err(Unloadable::Poison(format!(
            "the entry's URL is invalid: {e}"
        ))),
    }
}

/// After a delivered entry was deleted, its blob goes too. Should that
/// fail, the blob stays behind unreferenced (nothing reads it again); the
/// log names it for removal.
async fn forget_claim(outbox: &Outbox, entry: &Entry) {
    let Some(claim) = entry.claim() else {
        return;
    };
    if let Err(e) = settle_call(|| outbox.claims.delete(claim)).await {
        tracing::warn!(container = %outbox.claims.container(), claim, error = %e,
            "delivered, but could not delete its blob; it is left behind unreferenced");
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
        let Payload::Inline(d) = &e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(d.body, serde_json::to_string(&ev).unwrap());
        assert_eq!(Entry::parse(&e.to_text()).unwrap(), e);
        assert!(Entry::parse("{\"task_id\":\"t1\"}").is_err());
    }

    /// A v1 entry as every earlier worker wrote it.
    const V1: &str = r#"{"v":1,"webhook_id":"msg_0123","event_type":"task.succeeded","task_id":"t1","url":"https://h.example/hook","body":"{\"type\":\"task.succeeded\"}","attempts":3,"outbox_attempts":1,"outboxed_at":"2026-12-01T10:00:00Z","last_error":"HTTP 503"}"#;

    #[test]
    fn v1_entries_still_parse_and_small_entries_are_still_written_as_v1() {
        let e = Entry::parse(V1).unwrap();
        assert_eq!(e.attempts, 3);
        let Payload::Inline(d) = &e.payload else {
            panic!("{e:?}")
        };
        assert_eq!(d.url, "https://h.example/hook");
        assert_eq!(e.to_text(), V1, "the same text, field for field");
        let mut small = e.clone();
        assert_eq!(small.claim_if_large(), None);
        assert_eq!(small, e);
    }

    fn claimed(ev: &Event) -> (Entry, String, Vec<u8>) {
        let url = Url::parse("https://h.example/hook").unwrap();
        let mut e = Entry::new(&url, ev, 1, "HTTP 503".into());
        let (name, bytes) = e.claim_if_large().expect("too large to stay inline");
        (e, name, bytes)
    }

    #[test]
    fn a_large_result_moves_whole_to_a_claim_and_the_entry_stays_small() {
        let ev = event(serde_json::json!({"blob": "x\"<&".repeat(100_000)}));
        let (e, name, bytes) = claimed(&ev);
        let text = e.to_text();
        assert!(xml_len(&text) < 2048, "{text}");
        assert_eq!(e.claim(), Some(name.as_str()));
        assert!(
            name.starts_with(&ev.webhook_id()) && name.ends_with(".json"),
            "{name}"
        );
        let back = Entry::parse(&text).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.task_shown(), "t1");
        let d: Delivery = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            d.body,
            serde_json::to_string(&ev).unwrap(),
            "byte-identical body"
        );
        assert_eq!(
            (d.task_id.as_str(), d.event_type.as_str()),
            ("t1", "task.succeeded")
        );
        // The same delivery always gets the same name; another content another one.
        assert_eq!(claimed(&ev).1, name);
        let other = event(serde_json::json!({"blob": "y".repeat(100_000)}));
        assert_ne!(claimed(&other).1, name);
    }

    #[test]
    fn a_huge_task_id_is_claimed_and_only_a_cut_copy_stays() {
        let outcome = Outcome::Succeeded {
            result: serde_json::json!(1),
            duration: Duration::from_millis(5),
        };
        let id = "\"".repeat(100_000);
        let ev = Event::from_outcome(&id, "echo", None, 1, &outcome);
        let (mut e, _, bytes) = claimed(&ev);
        e.set_error("\"\u{1}".repeat(10_000));
        assert!(e.last_error.len() <= MAX_ERROR, "{}", e.last_error.len());
        assert!(e.task_shown().len() <= MAX_TASK_SHOWN);
        assert!(
            xml_len(&e.to_text()) < 16 * 1024,
            "{}",
            xml_len(&e.to_text())
        );
        let d: Delivery = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(d.task_id, id);
    }

    /// Around the limit, whatever stays inline still fits after its error
    /// grows to the largest one kept (the worst characters to escape).
    #[test]
    fn the_split_leaves_room_for_the_error_to_grow() {
        let url = Url::parse("https://h.example/hook").unwrap();
        let (mut inline, mut claimed) = (0, 0);
        // Plain characters, and quotes (9 bytes each once escaped twice and XML-escaped).
        let plain = (45_000..62_000).step_by(250).map(|n| "x".repeat(n));
        let quotes = (4_500..7_000).step_by(40).map(|n| "\"".repeat(n));
        for result in plain.chain(quotes) {
            let size = result.len();
            let ev = event(serde_json::json!(result));
            let mut e = Entry::new(&url, &ev, 1, String::new());
            if e.claim_if_large().is_some() {
                claimed += 1;
                continue;
            }
            inline += 1;
            e.set_error("\"".repeat(5 * MAX_ERROR));
            e.attempts = u32::MAX;
            e.outbox_attempts = u32::MAX;
            e.next_delay = Some(u32::MAX);
            e.deferrals = u32::MAX;
            assert!(
                xml_len(&e.to_text()) <= MAX_ENTRY,
                "{size}: {}",
                xml_len(&e.to_text())
            );
        }
        assert!(
            inline > 20 && claimed > 20,
            "{inline} inline, {claimed} claimed"
        );
    }

    #[test]
    fn entries_that_are_not_what_this_worker_writes_are_refused() {
        let v2 = |claim: &str| {
            format!(
                r#"{{"v":2,"webhook_id":"msg_1","task_id":"t","claim":"{claim}","attempts":1,"outbox_attempts":0,"outboxed_at":"","last_error":""}}"#
            )
        };
        assert!(Entry::parse(&v2("msg_1-00ff.json")).is_ok());
        for bad in ["../other", "a/b", "", ".hidden"] {
            assert!(Entry::parse(&v2(bad)).is_err(), "{bad}");
        }
        let e = Entry::parse(&V1.replace(r#""v":1"#, r#""v":9"#)).unwrap_err();
        assert!(e.contains("v9"), "{e}");
        assert!(Entry::parse(&V1.replace(r#""v":1"#, r#""v":2"#)).is_err());
    }
}
