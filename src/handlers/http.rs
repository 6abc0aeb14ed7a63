//! `http`: one outbound HTTP request described by the payload.
//!
//! The URL comes from a task, so the request goes through the same
//! [`EgressPolicy`] as webhooks. Non-2xx answers are failures: 408, 429 and
//! 5xx are worth retrying, other 4xx are not.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::egress::{egress_error_in, error_chain, truncate, EgressPolicy};
use crate::handler::{Handler, HandlerError, HandlerFuture, TaskContext};

/// Response bodies larger than this are refused rather than buffered.
const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Headers copied into the result; the rest are rarely useful and can be large.
const KEPT_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "location",
    "etag",
    "last-modified",
    "retry-after",
];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Http {
    policy: EgressPolicy,
    /// Built lazily so that start-up never pays for a TLS stack it may not use.
    client: tokio::sync::OnceCell<reqwest::Client>,
}

impl Http {
    pub fn new(policy: EgressPolicy) -> Self {
        Self {
            policy,
            client: tokio::sync::OnceCell::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default = "default_method")]
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

fn default_method() -> String {
    "GET".into()
}

impl Input {
    /// Everything the payload can get wrong is refused here, before a
    /// request is made, as a permanent error.
    fn check(&self, policy: &EgressPolicy) -> Result<Checked, HandlerError> {
        let bad = |m: String| HandlerError::permanent(format!("invalid `http` payload: {m}"));
        let url = url::Url::parse(&self.url).map_err(|e| bad(format!("url: {e}")))?;
        policy
            .check(&url)
            .map_err(|e| HandlerError::permanent(format!("request refused: {e}")))?;
        let method = reqwest::Method::from_bytes(self.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad(format!("method `{}` is not an HTTP method", self.method)))?;
        if self.json.is_some() && self.body.is_some() {
            return Err(bad("give `json` or `body`, not both".into()));
        }
        let timeout = match self.timeout_seconds {
            None => DEFAULT_TIMEOUT,
            Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(bad(format!(
                    "timeout_seconds must be in (0, 3600], got {s}"
                )))
            }
        };
        Ok(Checked {
            url,
            method,
            timeout,
        })
    }
}

/// The parts of [`Input`] that needed checking, in the types reqwest takes.
struct Checked {
    url: url::Url,
    method: reqwest::Method,
    timeout: Duration,
}

impl Handler for Http {
    fn description(&self) -> String {
        "makes the HTTP request in the payload (method, url, headers, json|body, timeout_seconds); non-2xx fails".into()
    }

    fn run<'a>(&'a self, _ctx: &'a TaskContext, payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(async move {
            let input: Input = super::parse_payload("http", payload)?;
            let Checked {
                url,
                method,
                timeout,
            } = input.check(&self.policy)?;
            let client = self
                .client
                .get_or_try_init(|| async { self.policy.client(DEFAULT_TIMEOUT, true) })
                .await
                .map_err(|e| HandlerError::transient(format!("cannot build HTTP client: {e}")))?;
            // reqwest quotes the full URL in its errors; the query may hold a
            // SAS signature or token, so errors carry this form instead.
            let shown = crate::egress::redact_url(&url);
            let mut req = client.request(method, url).timeout(timeout);
            for (k, v) in &input.headers {
                req = req.header(k, v);
            }
            if let Some(j) = &input.json {
                req = req.json(j);
            } else if let Some(b) = input.body {
                req = req.body(b);
            }
            let resp = req.send().await.map_err(|e| match egress_error_in(&e) {
                Some(refused) => HandlerError::permanent(format!("request refused: {refused}")),
                None => HandlerError::transient(format!(
                    "request to {shown} failed: {}",
                    error_chain(&e.without_url())
                )),
            })?;
            let status = resp.status();
            let result = read_response(resp, &shown).await?;
            judge(status, result)
        })
    }
}

/// Status, the [`KEPT_HEADERS`] and the body (JSON when it parses, text
/// otherwise), read up to [`MAX_BODY_BYTES`].
async fn read_response(mut resp: reqwest::Response, shown: &str) -> Result<Value, HandlerError> {
    let status = resp.status();
    let mut headers = serde_json::Map::new();
    for name in KEPT_HEADERS {
        if let Some(v) = resp.headers().get(*name).and_then(|v| v.to_str().ok()) {
            headers.insert((*name).into(), Value::String(v.into()));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        HandlerError::transient(format!(
            "reading the response from {shown} failed: {}",
            error_chain(&e.without_url())
        ))
    })? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(HandlerError::permanent(format!(
                "response body exceeds {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let body = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok(json!({"status": status.as_u16(), "headers": headers, "body": body}))
}

/// A 2xx answer is the task's result; 408, 429 and 5xx may go away on a
/// retry, any other status will not.
fn judge(status: reqwest::StatusCode, result: Value) -> Result<Value, HandlerError> {
    if status.is_success() {
        return Ok(result);
    }
    let message = format!(
        "HTTP {status}: {}",
        truncate(&result["body"].to_string(), 500)
    );
    let retryable = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
    Err(if retryable {
        HandlerError::transient(message)
    } else {
        HandlerError::permanent(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Retry;
    use reqwest::StatusCode;

    #[test]
    fn only_408_429_and_5xx_are_retried() {
        let body = json!({"body": "nope"});
        assert!(judge(StatusCode::CREATED, body.clone()).is_ok());
        for (status, retry) in [
            (StatusCode::REQUEST_TIMEOUT, Retry::Transient),
            (StatusCode::TOO_MANY_REQUESTS, Retry::Transient),
            (StatusCode::BAD_GATEWAY, Retry::Transient),
            (StatusCode::NOT_FOUND, Retry::Permanent),
            (StatusCode::CONFLICT, Retry::Permanent),
        ] {
            let e = judge(status, body.clone()).unwrap_err();
            assert_eq!(e.retry, retry, "{status}");
            assert_eq!(e.message, format!("HTTP {status}: \"nope\""));
        }
    }

    #[test]
    fn payload_mistakes_are_permanent() {
        let input = |v: Value| serde_json::from_value::<Input>(v).unwrap();
        let policy = EgressPolicy::default();
        for v in [
            json!({"url": "not a url"}),
            json!({"url": "https://example.com", "method": "GE T"}),
            json!({"url": "https://example.com", "json": {}, "body": "x"}),
            json!({"url": "https://example.com", "timeout_seconds": 0}),
            json!({"url": "https://example.com", "timeout_seconds": 3601}),
        ] {
            let e = input(v.clone()).check(&policy).err().unwrap();
            assert_eq!(e.retry, Retry::Permanent, "{v}");
            assert!(e.message.starts_with("invalid `http` payload"), "{v}: {e}");
        }
        let ok = input(json!({"url": "https://example.com", "method": "post"}))
            .check(&policy)
            .unwrap();
        assert_eq!(ok.method, reqwest::Method::POST);
        assert_eq!(ok.timeout, DEFAULT_TIMEOUT);
    }
}
