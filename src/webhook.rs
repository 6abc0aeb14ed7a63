//! The webhook notifier, shared by every mode.
//!
//! Deliveries follow the Standard Webhooks spec so that receivers can verify
//! them with the official libraries: `webhook-id`, `webhook-timestamp` and,
//! with a secret, `webhook-signature: v1,<base64 HMAC-SHA256>` computed by the
//! official `standardwebhooks` crate.
//!
//! The `webhook-id` is derived from the task id, event type and attempt, so it
//! is the same on every retry of one notification *and* when a crashed worker's
//! message is redelivered and reports the same attempt again: receivers can use
//! it as their idempotency key.
//!
//! A webhook that cannot be delivered is logged as an error and never changes
//! the task's outcome: the work is done (or not) regardless of whether the
//! backend heard about it.

use std::time::Duration;

use base64::Engine;
use rand::RngExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use url::Url;

use crate::egress::{egress_error_in, EgressError, EgressPolicy};
use crate::execute::{Outcome, Status};
use crate::handlers::http::{error_chain, truncate};

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
    /// Requests in flight at once, over all destinations.
    pub concurrency: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            concurrency: 256,
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
        let (kind, status) = match outcome.status {
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
                result: outcome.result.clone(),
                error: outcome.error.clone(),
                attempt,
                duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }

    /// `msg_` + 32 hex chars of SHA-256(task id, type, attempt).
    pub fn webhook_id(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.data.task_id.as_bytes(),
            self.kind.as_bytes(),
            self.data.attempt.to_string().as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("msg_{hex}")
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Why a notification was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL refused by egress policy: {0}")]
    Refused(#[from] EgressError),
    #[error("receiver answered HTTP {status} (not retried): {body}")]
    Rejected { status: u16, body: String },
    #[error("gave up after {attempts} attempts; last error: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("cannot build HTTP client: {0}")]
    Client(String),
}

/// A successful delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub webhook_id: String,
    pub attempts: u32,
    pub status: u16,
}

/// Sends task outcomes to webhooks; built once and shared by every mode.
pub struct Notifier {
    policy: EgressPolicy,
    retry: RetryPolicy,
    signer: Option<standardwebhooks::Webhook>,
    client: tokio::sync::OnceCell<reqwest::Client>,
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

impl Notifier {
    pub fn new(policy: EgressPolicy, retry: RetryPolicy, secret: Option<SigningSecret>) -> Self {
        let signer = secret.and_then(|s| standardwebhooks::Webhook::from_bytes(s.0).ok());
        Self {
            policy,
            retry,
            signer,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// Delivers `event` to `url`, logging the result. Never fails the caller:
    /// returns the delivery or the reason it did not happen.
    pub async fn notify(&self, url: &Url, event: &Event) -> Result<Delivery, WebhookError> {
        let result = self.deliver(url, event).await;
        let target = redact_url(url);
        let label = match &result {
            Ok(_) => "delivered",
            Err(WebhookError::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        ::metrics::counter!(crate::exporter::names::WEBHOOKS, "result" => label).increment(1);
        match &result {
            Ok(d) => {
                tracing::info!(webhook = %target, webhook_id = %d.webhook_id, event = event.kind,
                attempts = d.attempts, status = d.status, "webhook delivered")
            }
            Err(e) => {
                tracing::error!(webhook = %target, event = event.kind, error = %e, "webhook not delivered")
            }
        }
        result
    }

    async fn deliver(&self, url: &Url, event: &Event) -> Result<Delivery, WebhookError> {
        self.policy.check(url)?;
        let client = self
            .client
            .get_or_try_init(|| async { self.policy.client(self.retry.timeout, false) })
            .await
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let body = serde_json::to_string(event).map_err(|e| WebhookError::Client(e.to_string()))?;
        let webhook_id = event.webhook_id();
        let attempts = self.retry.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
            let mut req = client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", &webhook_id)
                .header("webhook-timestamp", timestamp.to_string())
                .body(body.clone());
            if let Some(signer) = &self.signer {
                let sig = signer
                    .sign(&webhook_id, timestamp, body.as_bytes())
                    .map_err(|e| WebhookError::Client(e.to_string()))?;
                req = req.header("webhook-signature", sig);
            }
            let mut retry_after = None;
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if resp.status().is_success() {
                        return Ok(Delivery {
                            webhook_id,
                            attempts: attempt,
                            status,
                        });
                    }
                    retry_after = parse_retry_after(resp.headers());
                    let text = truncate(&resp.text().await.unwrap_or_default(), 200);
                    if !(status == 408 || status == 429 || (500..600).contains(&status)) {
                        return Err(WebhookError::Rejected { status, body: text });
                    }
                    last = format!("HTTP {status}");
                }
                Err(e) => {
                    if let Some(refused) = egress_error_in(&e) {
                        return Err(WebhookError::Refused(refused));
                    }
                    // Without the URL: its query may hold a token (the
                    // redacted form is already in the log line).
                    last = error_chain(&e.without_url());
                }
            }
            if attempt < attempts {
                let delay = retry_after.map_or_else(
                    || self.retry.backoff(attempt),
                    |d| d.min(self.retry.max_backoff),
                );
                tracing::warn!(attempt, error = %last, delay_ms = delay.as_millis() as u64, "webhook attempt failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
        Err(WebhookError::Exhausted { attempts, last })
    }
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

/// A URL for logs: scheme, host, port and path, never query or credentials
/// (backends sometimes put tokens there).
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("redacted"));
    }
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn webhook_id_is_stable_per_task_event_and_attempt() {
        let o = Outcome::failed("x", crate::handler::Retry::Transient, Duration::ZERO);
        let a = Event::from_outcome("t1", "echo", None, 1, &o);
        let b = Event::from_outcome("t1", "echo", None, 1, &o);
        let c = Event::from_outcome("t1", "echo", None, 2, &o);
        assert_eq!(a.webhook_id(), b.webhook_id());
        assert_ne!(a.webhook_id(), c.webhook_id());
        assert!(a.webhook_id().starts_with("msg_") && a.webhook_id().len() == 36);
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
    fn urls_in_logs_lose_query_and_credentials() {
        let u = Url::parse("https://user:pw@h.example/p?token=abc#f").unwrap();
        assert_eq!(redact_url(&u), "https://h.example/p?redacted");
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
