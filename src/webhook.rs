//! The webhook notifier, shared by every mode.
//!
//! Deliveries follow the Standard Webhooks spec so that receivers can verify
//! them with the official libraries: `webhook-id`, `webhook-timestamp` and,
//! with a secret, `webhook-signature: v1,<base64 HMAC-SHA256>` computed by the
//! official `standardwebhooks` crate.
//!
//! The `webhook-id` is derived from the task id and event type only, so it is
//! the same on every retry of one notification, when a crashed worker's
//! message is redelivered and run again, after a restart, from the outbox and
//! in every mode: receivers use it as their idempotency key.
//!
//! The notifier makes the *in-process* attempts (a few, seconds apart). What
//! they cannot deliver the caller hands to the outbox ([`crate::outbox`]),
//! which keeps trying for about a day; a webhook never changes the task's
//! outcome. Every request passes the egress guard and the destination's
//! learned concurrency limit ([`crate::limiter`]): a backend gets as many
//! requests at once as it answers well, and an outcome bound for a backend
//! that is failing, or that already holds its share of the backlog, goes to
//! the outbox at once instead of waiting ([`WebhookError::Deferred`]), so one
//! slow backend never holds up another's deliveries.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rand::RngExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use url::Url;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::egress::{
    egress_error_in, error_chain, redact_url, truncate, EgressError, EgressPolicy,
};
use crate::limiter::{self, Busy, Claim, Limiter, Permit, Signal};
use crate::outcome::{Outcome, Status};
use crate::retry::{self, Decision, GaveUp};
use crate::shutdown::Shutdown;

/// A Standard Webhooks signing secret: `whsec_` + base64 of 24–64 bytes.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

impl std::str::FromStr for SigningSecret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // The messages never echo the value: it is a secret even when malformed.
        let rest = s
            .strip_prefix("whsec_")
            .ok_or("must start with `whsec_` followed by base64 of 24 to 64 random bytes (Standard Webhooks format)")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| "the part after `whsec_` is not valid standard base64")?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "decodes to {} bytes; the key must be 24 to 64 bytes",
                key.len()
            ));
        }
        Ok(SigningSecret(key))
    }
}

/// How the notifier retries.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: u32,
    /// Delay before the second try; doubles after each try.
    pub initial_backoff: Duration,
    /// Upper bound on any single delay (also caps `Retry-After`).
    pub max_backoff: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests in flight at once over all destinations, and outcomes that
    /// may wait for delivery.
    pub concurrency: usize,
    /// Bytes of outcomes that may wait for delivery.
    pub backlog_bytes: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            concurrency: 512,
            backlog_bytes: 64 << 20,
        }
    }
}

impl RetryPolicy {
    /// Delay before try `n + 1` (n ≥ 1): exponential with ±50% jitter, so a
    /// burst of failed deliveries does not come back in lockstep.
    fn backoff(&self, n: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(n.saturating_sub(1)));
        let jitter = rand::rng().random_range(0.5..1.5);
        base.mul_f64(jitter).min(self.max_backoff)
    }
}

/// The body of a notification.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub timestamp: String,
    pub data: EventData,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EventData {
    pub task_id: String,
    pub task_type: String,
    pub client: Option<String>,
    pub status: &'static str,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub attempt: u32,
    pub duration_ms: u64,
}

impl Event {
    /// The event for an outcome. A cancelled task is reported as `failed`
    /// with error `cancelled`.
    pub fn from_outcome(
        task_id: &str,
        task_type: &str,
        client: Option<&str>,
        attempt: u32,
        outcome: &Outcome,
    ) -> Self {
        let (kind, status) = match outcome.status() {
            Status::Succeeded => ("task.succeeded", "succeeded"),
            Status::TimedOut => ("task.timed_out", "timed_out"),
            Status::Failed | Status::Cancelled => ("task.failed", "failed"),
        };
        Event {
            kind,
            timestamp: now_rfc3339(),
            data: EventData {
                task_id: task_id.to_owned(),
                task_type: task_type.to_owned(),
                client: client.map(str::to_owned),
                status,
                result: outcome.result().cloned(),
                error: outcome.error(),
                attempt,
                duration_ms: u64::try_from(outcome.duration().as_millis()).unwrap_or(u64::MAX),
            },
        }
    }

    /// See [`webhook_id`].
    pub fn webhook_id(&self) -> String {
        webhook_id(&self.data.task_id, self.kind)
    }
}

/// `msg_` + 32 hex chars of SHA-256(task id, event type): one id per task
/// outcome, whatever the attempt, redelivery, worker or mode that reports it.
/// Receivers use it as their idempotency key.
pub fn webhook_id(task_id: &str, kind: &str) -> String {
    let mut h = Sha256::new();
    for part in [task_id.as_bytes(), kind.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Why a notification was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL may never be called: not worth retrying, ever.
    #[error("webhook URL refused by egress policy: {0}")]
    Refused(#[from] EgressError),
    #[error("receiver answered HTTP {status}: {body}")]
    Rejected {
        status: u16,
        body: String,
        attempts: u32,
    },
    #[error("gave up after {attempts} attempts; last error: {last}")]
    Exhausted { attempts: u32, last: String },
    /// Shutdown began: no further attempt was made.
    #[error("stopped by shutdown after {attempts} attempts; last error: {last}")]
    Stopped { attempts: u32, last: String },
    /// Not tried further now: the destination is failing or holds its share
    /// of the backlog (see [`crate::limiter`]).
    #[error("deferred after {attempts} attempts: {busy}")]
    Deferred { attempts: u32, busy: Busy },
    #[error("cannot build HTTP client: {0}")]
    Client(String),
}

impl WebhookError {
    /// Attempts made before giving up.
    pub fn attempts(&self) -> u32 {
        match self {
            WebhookError::Exhausted { attempts, .. }
            | WebhookError::Stopped { attempts, .. }
            | WebhookError::Rejected { attempts, .. }
            | WebhookError::Deferred { attempts, .. } => *attempts,
            WebhookError::Refused(_) | WebhookError::Client(_) => 0,
        }
    }
}

/// A successful delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub webhook_id: String,
    pub attempts: u32,
    pub status: u16,
}

/// How one request ended, when it did not succeed.
#[derive(Debug)]
pub enum AttemptError {
    Refused(EgressError),
    /// 408, 429, 5xx, timeouts, connection and DNS errors: try again later.
    Retryable {
        last: String,
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx answer.
    Rejected {
        status: u16,
        body: String,
    },
    /// No request was made: the destination may not take one now.
    Busy(Busy),
    Client(String),
}

impl AttemptError {
    /// One line for logs and the outbox's attempt history.
    pub fn describe(&self) -> String {
        match self {
            AttemptError::Refused(e) => format!("refused by egress policy: {e}"),
            AttemptError::Retryable { last, .. } => last.clone(),
            AttemptError::Rejected { status, body } if body.is_empty() => format!("HTTP {status}"),
            AttemptError::Rejected { status, body } => format!("HTTP {status}: {body}"),
            AttemptError::Busy(b) => format!("not attempted: {b}"),
            AttemptError::Client(e) => format!("cannot build HTTP client: {e}"),
        }
    }
}

/// Delivery results, as counted in `worker_webhook_deliveries_total{result}`.
pub mod results {
    /// The backend answered 2xx.
    pub const DELIVERED: &str = "delivered";
    /// An attempt failed and another one is scheduled.
    pub const RETRIED: &str = "retried";
    /// The in-process attempts are over; the event waits in the outbox.
    pub const OUTBOXED: &str = "outboxed";
    /// Not attempted now (the backend is failing or holds its share of the
    /// backlog): the event waits in the outbox without using up the schedule.
    pub const DEFERRED: &str = "deferred";
    /// Given up on: the event is in `<client>-webhooks-poison`.
    pub const POISONED: &str = "poisoned";
    /// Neither delivered nor kept anywhere but the log (no outbox configured).
    pub const DROPPED: &str = "dropped";
}

/// Counts one delivery result.
pub fn count(result: &'static str) {
    ::metrics::counter!(crate::metrics::WEBHOOKS, "result" => result).increment(1);
}

/// Sends task outcomes to webhooks; built once and shared by every mode.
pub struct Notifier {
    policy: EgressPolicy,
    retry: RetryPolicy,
    signer: Option<standardwebhooks::Webhook>,
    client: tokio::sync::OnceCell<reqwest::Client>,
    limiter: Arc<Limiter>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .field("signed", &self.signer.is_some())
            .finish()
    }
}

/// The destination an URL's requests count against: `host:port`.
pub fn destination(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

/// How many request timeouts an outcome may wait for room in the backlog
/// or for a request slot before it goes to the outbox.
const CLAIM_WAIT_TIMEOUTS: u32 = 6;

/// How many outcomes may wait for delivery per request slot
/// (`WORKER_WEBHOOK_CONCURRENCY`). A slow but healthy backend's limit starts
/// small and grows over a few round trips; while it grows, finished tasks
/// queue here. With room for only as many outcomes as request slots, the
/// poller stopped receiving for the whole ramp and the queue service sat
/// idle, so a 500 ms backend got its outcomes in waves. Memory stays bounded
/// by `WORKER_WEBHOOK_BACKLOG_MB` whatever the count.
const BACKLOG_PER_SLOT: usize = 4;

impl Notifier {
    /// Fails when a secret was given but cannot sign: webhooks must never
    /// go out unsigned because of a bad key.
    pub fn new(
        policy: EgressPolicy,
        retry: RetryPolicy,
        secret: Option<SigningSecret>,
    ) -> Result<Self, String> {
        let signer = match secret {
            None => None,
            Some(s) => Some(standardwebhooks::Webhook::from_bytes(s.0).map_err(|e| {
                format!("WORKER_WEBHOOK_SECRET (--webhook-secret) cannot be used to sign: {e}")
            })?),
        };
        let limiter = Limiter::new(limiter::Config {
            max_in_flight: retry.concurrency.max(1),
            backlog: retry.concurrency.max(1) * BACKLOG_PER_SLOT,
            backlog_bytes: retry.backlog_bytes.max(1),
            // An outcome waiting for room behind a healthy, slow backend is
            // better off waiting than in the outbox (due 30 s later); the
            // poller stops receiving meanwhile.
            max_wait: retry.timeout * CLAIM_WAIT_TIMEOUTS,
            max_pause: retry.max_backoff,
            ..limiter::Config::default()
        });
        Ok(Self {
            policy,
            retry,
            signer,
            client: tokio::sync::OnceCell::new(),
            limiter,
        })
    }

    /// How many outcomes may wait for delivery at once
    /// ([`BACKLOG_PER_SLOT`] × `WORKER_WEBHOOK_CONCURRENCY`).
    pub fn backlog(&self) -> usize {
        self.limiter.backlog()
    }

    /// The per-request timeout, which bounds one attempt.
    pub fn request_timeout(&self) -> Duration {
        self.retry.timeout
    }

    /// Whether another outcome could wait for delivery now (the poller stops
    /// receiving while it cannot).
    pub fn has_room(&self) -> bool {
        self.limiter.has_room()
    }

    /// The learned concurrency limit for `url`'s destination, if it was used.
    pub fn limit_for(&self, url: &Url) -> Option<f64> {
        self.limiter.limit(&destination(url))
    }

    /// Delivers `event` to `url` with the in-process attempts, logging the
    /// result. After shutdown is requested no new attempt starts (the first
    /// always does, unless it would have to wait); once the grace is over the
    /// attempt in flight is given up too. Never fails the caller: returns the
    /// delivery or the reason it did not happen, for the caller to hand to
    /// the outbox.
    pub async fn notify(
        &self,
        url: &Url,
        event: &Event,
        shutdown: &Shutdown,
    ) -> Result<Delivery, WebhookError> {
        let result = self.deliver(url, event, shutdown).await;
        let target = redact_url(url);
        match &result {
            Ok(d) => {
                count(results::DELIVERED);
                tracing::info!(webhook = %target, webhook_id = %d.webhook_id, event = event.kind,
                attempts = d.attempts, status = d.status, "webhook delivered")
            }
            Err(e) => {
                tracing::warn!(webhook = %target, webhook_id = %event.webhook_id(), event = event.kind, error = %e, "webhook not delivered in-process")
            }
        }
        result
    }

    async fn deliver(
        &self,
        url: &Url,
        event: &Event,
        shutdown: &Shutdown,
    ) -> Result<Delivery, WebhookError> {
        let body = Bytes::from(
            serde_json::to_vec(event).map_err(|e| WebhookError::Client(e.to_string()))?,
        );
        let webhook_id = event.webhook_id();
        self.policy.check(url)?;
        let host = destination(url);
        // The first attempt goes out after a shutdown request too, unless it
        // would have to wait for room.
        let claim = tokio::select! {
            biased;
            claim = self.limiter.claim(&host, body.len()) => claim,
            () = shutdown.requested().cancelled() => Err(Busy::Waited),
        }
        .map_err(|busy| WebhookError::Deferred { attempts: 0, busy })?;
        let delays: Vec<Duration> = (1..self.retry.attempts.max(1))
            .map(|n| self.retry.backoff(n))
            .collect();
        let abort = shutdown.grace_over();
        let attempt = |n: u32| {
            let (webhook_id, body, claim) = (&webhook_id, &body, &claim);
            async move {
                if n > 1 {
                    count(results::RETRIED);
                }
                self.attempt(claim, url, webhook_id, body.clone(), abort)
                    .await
                    .map(|status| (status, n))
            }
        };
        // Only connection and DNS errors, timeouts, 408, 429 and 5xx are
        // retried here; any other answer goes to the outbox, which asks
        // again later on its longer schedule rather than hammering the
        // backend now.
        let decide = |e: &AttemptError| match e {
            AttemptError::Retryable { last, retry_after } => {
                tracing::warn!(error = %last, "webhook attempt failed; retrying");
                retry_after.map_or(Decision::Retry, |d| {
                    Decision::RetryAfter(d.min(self.retry.max_backoff))
                })
            }
            _ => Decision::Stop,
        };
        match retry::run(delays, attempt, decide, shutdown.requested()).await {
            Ok((status, attempts)) => Ok(Delivery {
                webhook_id,
                attempts,
                status,
            }),
            Err(GaveUp {
                error,
                attempts,
                stopped,
            }) => Err(match error {
                AttemptError::Refused(e) => WebhookError::Refused(e),
                AttemptError::Client(e) => WebhookError::Client(e),
                AttemptError::Rejected { status, body } => WebhookError::Rejected {
                    status,
                    body,
                    attempts,
                },
                AttemptError::Busy(busy) => WebhookError::Deferred {
                    attempts: attempts - 1,
                    busy,
                },
                AttemptError::Retryable { last, .. } if stopped || abort.is_cancelled() => {
                    WebhookError::Stopped { attempts, last }
                }
                AttemptError::Retryable { last, .. } => WebhookError::Exhausted { attempts, last },
            }),
        }
    }

    /// One attempt under `claim`: wait for a request slot at the destination
    /// (or be told it cannot have one now), then send. `abort` gives up the
    /// wait and the request in flight.
    async fn attempt(
        &self,
        claim: &Claim,
        url: &Url,
        webhook_id: &str,
        body: Bytes,
        abort: &CancellationToken,
    ) -> Result<u16, AttemptError> {
        let given_up = || AttemptError::Retryable {
            last: "the shutdown budget ran out during the request".into(),
            retry_after: None,
        };
        let permit = tokio::select! {
            biased;
            p = claim.start() => p.map_err(AttemptError::Busy)?,
            () = abort.cancelled() => return Err(given_up()),
        };
        tokio::select! {
            biased;
            sent = self.request(permit, url, webhook_id, body) => sent,
            () = abort.cancelled() => Err(given_up()),
        }
    }

    /// One signed POST of `body` under `webhook_id`, with a fresh timestamp
    /// and signature, through the egress guard and the destination's limit.
    /// No retry. Used by the outbox for each of its attempts; `abort` gives
    /// up the wait and the request.
    pub async fn send(
        &self,
        url: &Url,
        webhook_id: &str,
        body: Bytes,
        abort: &CancellationToken,
    ) -> Result<u16, AttemptError> {
        self.policy.check(url).map_err(AttemptError::Refused)?;
        let host = destination(url);
        let claim = tokio::select! {
            biased;
            c = self.limiter.claim(&host, body.len()) => c.map_err(AttemptError::Busy)?,
            () = abort.cancelled() => return Err(AttemptError::Busy(Busy::Waited)),
        };
        self.attempt(&claim, url, webhook_id, body, abort).await
    }

    /// The request itself; tells the permit what the answer says about load.
    async fn request(
        &self,
        permit: Permit,
        url: &Url,
        webhook_id: &str,
        body: Bytes,
    ) -> Result<u16, AttemptError> {
        let client = self
            .client
            .get_or_try_init(|| async { self.policy.client(self.retry.timeout, false) })
            .await
            .map_err(|e| AttemptError::Client(e.to_string()))?;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut req = client
            .post(url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(signer) = &self.signer {
            let sig = signer
                .sign(webhook_id, timestamp, &body)
                .map_err(|e| AttemptError::Client(e.to_string()))?;
            req = req.header("webhook-signature", sig);
        }
        let (signal, result) = match req.body(body).send().await {
            Ok(resp) => answered(resp).await,
            Err(e) => failed(e),
        };
        permit.finish(signal);
        result
    }
}

/// What an answer means: the result, and the signal for the limit.
async fn answered(resp: reqwest::Response) -> (Signal, Result<u16, AttemptError>) {
    let status = resp.status().as_u16();
    let answer = Signal::Answered {
        rtt: Duration::ZERO,
        closed: closes_connection(&resp),
    };
    if resp.status().is_success() {
        return (answer, Ok(status));
    }
    let retry_after = parse_retry_after(resp.headers());
    let text = truncate(&read_capped(resp, ERROR_BODY_LIMIT).await, 200);
    let signal = match (status, retry_after) {
        (429 | 503, Some(d)) => Signal::RetryAfter(d),
        (408 | 429 | 502 | 503 | 504, _) => Signal::Overloaded,
        _ => answer,
    };
    let result = if status == 408 || status == 429 || (500..600).contains(&status) {
        Err(AttemptError::Retryable {
            last: format!("HTTP {status}"),
            retry_after,
        })
    } else {
        Err(AttemptError::Rejected { status, body: text })
    };
    (signal, result)
}

/// Whether the server closes the connection after this answer: HTTP/1.0
/// unless it asked for keep-alive (Python's `http.server` by default), or
/// `Connection: close`.
fn closes_connection(resp: &reqwest::Response) -> bool {
    let mut tokens = resp
        .headers()
        .get_all(reqwest::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    if resp.version() == reqwest::Version::HTTP_10 {
        !tokens.any(|t| t.eq_ignore_ascii_case("keep-alive"))
    } else {
        tokens.any(|t| t.eq_ignore_ascii_case("close"))
    }
}

/// What a failed request means. A refusal by the egress guard is final; a
/// name that did not resolve says nothing about the backend's load; a
/// timeout or a refused or reset connection says it is overloaded (or gone).
fn failed(e: reqwest::Error) -> (Signal, Result<u16, AttemptError>) {
    if let Some(refused) = egress_error_in(&e) {
        return (Signal::Ignored, Err(AttemptError::Refused(refused)));
    }
    let unresolved = crate::egress::resolve_error_in(&e).is_some();
    let signal = if unresolved {
        Signal::Ignored
    } else {
        Signal::Overloaded
    };
    // Without the URL: its query may hold a token (the redacted form is in
    // the log line).
    let last = error_chain(&e.without_url());
    (
        signal,
        Err(AttemptError::Retryable {
            last,
            retry_after: None,
        }),
    )
}

/// Most bytes of an error response read (for the log line).
const ERROR_BODY_LIMIT: usize = 4096;

/// Reads at most `limit` bytes of a response body: a hostile backend cannot
/// make the worker buffer an endless error page.
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk[..chunk.len().min(limit - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(version: http::Version, connection: Option<&str>) -> reqwest::Response {
        let mut b = http::Response::builder().status(200).version(version);
        if let Some(c) = connection {
            b = b.header("connection", c);
        }
        reqwest::Response::from(b.body("").expect("a valid response"))
    }

    /// The limiter paces a destination that closes every connection more
    /// gently (each request is a new connection to its accept queue).
    #[test]
    fn an_answer_says_whether_the_server_closed_the_connection() {
        use http::Version;
        // Python's http.server by default: HTTP/1.0, no Connection header.
        assert!(closes_connection(&response(Version::HTTP_10, None)));
        assert!(!closes_connection(&response(
            Version::HTTP_10,
            Some("Keep-Alive")
        )));
        assert!(!closes_connection(&response(Version::HTTP_11, None)));
        assert!(closes_connection(&response(
            Version::HTTP_11,
            Some("close")
        )));
        assert!(closes_connection(&response(
            Version::HTTP_11,
            Some("upgrade, Close")
        )));
        assert!(!closes_connection(&response(Version::HTTP_2, None)));
    }

    #[test]
    fn secret_format_is_enforced_and_never_echoed() {
        let good = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        assert!(good.parse::<SigningSecret>().is_ok());
        for bad in ["nope", "whsec_!!!", "whsec_AAAA"] {
            let e = bad.parse::<SigningSecret>().unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
        let short = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 16])
        );
        assert!(short
            .parse::<SigningSecret>()
            .unwrap_err()
            .contains("16 bytes"));
        let s: SigningSecret = good.parse().unwrap();
        assert_eq!(format!("{s:?}"), "SigningSecret(<redacted>)");
    }

    #[test]
    fn webhook_id_depends_on_task_and_event_only() {
        let o = Outcome::failed("x", crate::handler::Retry::Transient, Duration::ZERO);
        let a = Event::from_outcome("t1", "echo", None, 1, &o);
        let b = Event::from_outcome("t1", "sleep", Some("acme"), 7, &o);
        assert_eq!(
            a.webhook_id(),
            b.webhook_id(),
            "attempt and mode do not matter"
        );
        let ok = Outcome::Succeeded {
            result: Value::Null,
            duration: Duration::ZERO,
        };
        let c = Event::from_outcome("t1", "echo", None, 1, &ok);
        assert_ne!(a.webhook_id(), c.webhook_id(), "one id per event type");
        let d = Event::from_outcome("t2", "echo", None, 1, &o);
        assert_ne!(a.webhook_id(), d.webhook_id());
        assert!(a.webhook_id().starts_with("msg_") && a.webhook_id().len() == 36);
        assert_eq!(webhook_id("t1", "task.failed"), a.webhook_id());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ..Default::default()
        };
        assert!(
            p.backoff(1) <= Duration::from_millis(1500)
                && p.backoff(1) >= Duration::from_millis(500)
        );
        assert!(p.backoff(3) >= Duration::from_secs(2));
        assert!(p.backoff(10) <= Duration::from_secs(5));
    }

    #[test]
    fn signature_verifies_with_the_official_library() {
        let raw = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([9u8; 32])
        );
        let secret: SigningSecret = raw.parse().unwrap();
        let signer = standardwebhooks::Webhook::from_bytes(secret.0.clone()).unwrap();
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let sig = signer.sign("msg_1", ts, b"{}").unwrap();
        let verifier = standardwebhooks::Webhook::new(&raw).unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("webhook-id", "msg_1".parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        verifier.verify(b"{}", &h).unwrap();
    }
}
