//! The task envelope: what a backend puts on the queue and what `TASK_DATA` holds.
//!
//! Both modes decode through [`decode`], so a message that single-task mode
//! refuses is refused the same way by the poller. Decoding parses to a
//! [`serde_json::Value`] first and validates fields by hand: that is what lets
//! an error name the offending field, and serde_json's recursion limit (128)
//! turns hostile nesting into an error instead of a stack overflow.
//!
//! Messages arrive either as the JSON text itself or as its standard base64
//! encoding (what Azure Functions and the Python SDK's `BinaryBase64EncodePolicy`
//! produce). JSON envelopes always start with `{`, which is not a base64
//! character, so the first non-blank byte tells the two apart.

use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use url::Url;

/// Largest envelope accepted from any source. Azure queue messages are capped
/// at 64 KiB and `TASK_DATA` at 128 KiB by Linux, but `worker run --task-file`
/// has no natural limit; this bound keeps a stray multi-gigabyte file from
/// exhausting memory.
pub const MAX_TASK_BYTES: usize = 16 * 1024 * 1024;

/// A decoded, validated task.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Task {
    /// Identifier chosen by the backend; echoed in every webhook and log line.
    pub task_id: String,
    /// Selects the handler in the registry.
    pub task_type: String,
    /// Handler input; `null` when absent.
    pub payload: Value,
    /// Where the outcome is POSTed, if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<Url>,
    /// The backend's customer this task belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// Which encoding a message used; reported in logs, useful when a backend
/// switches SDKs and its messages start to look different.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Base64,
}

/// Why a message is not a task. Every variant names what is wrong so the
/// operator (or the backend team reading the webhook) can fix the producer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("task data is empty")]
    Empty,
    #[error("task data is {len} bytes, above the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("task data is not valid UTF-8 (first invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("task data is neither JSON nor base64-encoded JSON: {0}")]
    Base64(String),
    #[error("task data is neither JSON nor base64-encoded JSON: as base64 it decodes to bytes that are not valid UTF-8 (first invalid byte at offset {offset})")]
    Base64NotUtf8 { offset: usize },
    #[error("task data is not valid JSON: {0}")]
    Json(String),
    #[error("task data starts with a byte-order mark (U+FEFF); write it as UTF-8 without a BOM")]
    ByteOrderMark,
    #[error("task data must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("field `{0}` is required")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{0}` must not be empty")]
    EmptyField(&'static str),
    #[error("field `webhook_url` is invalid: {0}")]
    WebhookUrl(String),
}

/// Decodes raw bytes (env var, file, or queue message text) into a [`Task`].
pub fn decode(raw: &[u8]) -> Result<(Task, Encoding), DecodeError> {
    let (value, encoding) = decode_value(raw)?;
    let task = from_value(value)?;
    Ok((task, encoding))
}

/// The best-effort parts of a message that failed validation: enough to send
/// a `task.failed` webhook for a task whose envelope is otherwise broken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Salvage {
    pub task_id: Option<String>,
    pub task_type: Option<String>,
    pub client: Option<String>,
    pub webhook_url: Option<Url>,
}

/// Reads whatever can still be read from an invalid envelope.
/// The task id reported for a message that carries none (or is not even
/// JSON): `invalid-` and 32 hex digits of the SHA-256 of its bytes. Derived
/// from the content, it is the same on every redelivery, in every mode and
/// after a poison replay, and differs between different messages, so a
/// backend that dedupes on it (or on the `webhook-id` made from it) keeps
/// every one.
pub fn content_id(raw: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(raw);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("invalid-{hex}")
}

pub fn salvage(raw: &[u8]) -> Salvage {
    let Ok((Value::Object(map), _)) = decode_value(raw) else {
        return Salvage::default();
    };
    let text = |k: &str| {
        map.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Salvage {
        task_id: text("task_id"),
        task_type: text("task_type"),
        client: text("client"),
        webhook_url: text("webhook_url").and_then(|u| parse_webhook_url(&u).ok()),
    }
}

fn decode_value(raw: &[u8]) -> Result<(Value, Encoding), DecodeError> {
    if raw.len() > MAX_TASK_BYTES {
        return Err(DecodeError::TooLarge {
            len: raw.len(),
            max: MAX_TASK_BYTES,
        });
    }
    let text = std::str::from_utf8(raw).map_err(|e| DecodeError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DecodeError::Empty);
    }
    if trimmed.starts_with('{') || !looks_like_base64(trimmed) {
        return parse_json(trimmed).map(|v| (v, Encoding::Json));
    }
    // `null`, `true` or `42` are made of base64 characters too; report them as
    // the wrong kind of JSON, not as broken base64. Base64 of an object starts
    // with `e` (or `I`, `C`, `D`, `G` for leading blanks), which no JSON
    // scalar does, so this never shadows a real base64 envelope.
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Ok((v, Encoding::Json));
    }
    let compact: String = trimmed.split_ascii_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| DecodeError::Base64(e.to_string()))?;
    let decoded = std::str::from_utf8(&bytes).map_err(|e| DecodeError::Base64NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    parse_json(decoded.trim()).map(|v| (v, Encoding::Base64))
}

fn looks_like_base64(s: &str) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') || b.is_ascii_whitespace()
    })
}

fn parse_json(s: &str) -> Result<Value, DecodeError> {
    // Editors on Windows add one; serde_json would only say "expected value".
    if s.starts_with('\u{feff}') {
        return Err(DecodeError::ByteOrderMark);
    }
    serde_json::from_str(s).map_err(|e| DecodeError::Json(e.to_string()))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn from_value(value: Value) -> Result<Task, DecodeError> {
    let Value::Object(mut map) = value else {
        return Err(DecodeError::NotAnObject(kind(&value)));
    };
    let mut required = |field: &'static str| -> Result<String, DecodeError> {
        match map.remove(field) {
            None | Some(Value::Null) => Err(DecodeError::Missing(field)),
            Some(Value::String(s)) if s.trim().is_empty() => Err(DecodeError::EmptyField(field)),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(DecodeError::WrongType {
                field,
                expected: "a string",
                found: kind(&other),
            }),
        }
    };
    let task_id = required("task_id")?;
    let task_type = required("task_type")?;
    let payload = map.remove("payload").unwrap_or(Value::Null);
    let webhook_url = match map.remove("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_webhook_url(&s).map_err(DecodeError::WebhookUrl)?),
        Some(other) => {
            return Err(DecodeError::WrongType {
                field: "webhook_url",
                expected: "a string",
                found: kind(&other),
            })
        }
    };
    let client = match map.remove("client") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(DecodeError::WrongType {
                field: "client",
                expected: "a string",
                found: kind(&other),
            })
        }
    };
    Ok(Task {
        task_id,
        task_type,
        payload,
        webhook_url,
        client,
    })
}

/// Validates a webhook URL: absolute, `http` or `https`, with a host.
pub fn parse_webhook_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{e} (expected an absolute http(s) URL)"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not allowed (expected http or https)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".into());
    }
    Ok(url)
}

impl Task {
    /// The envelope as JSON text: what exec handlers receive on stdin.
    pub fn to_json(&self) -> String {
        // Serializing a tree of owned JSON values and strings cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str) -> Task {
        decode(s.as_bytes()).unwrap().0
    }
    fn err(s: &[u8]) -> DecodeError {
        decode(s).unwrap_err()
    }

    #[test]
    fn minimal_envelope() {
        let t = ok(r#"{"task_id":"t1","task_type":"echo"}"#);
        assert_eq!(t.task_id, "t1");
        assert_eq!(t.payload, Value::Null);
        assert_eq!(t.webhook_url, None);
    }

    #[test]
    fn full_envelope_and_unknown_fields() {
        let t = ok(r#"{"task_id":"t1","task_type":"echo","payload":{"a":1},
            "webhook_url":"https://example.com/hook","client":"acme","future":true}"#);
        assert_eq!(t.payload, json!({"a":1}));
        assert_eq!(t.client.as_deref(), Some("acme"));
        assert_eq!(t.webhook_url.unwrap().as_str(), "https://example.com/hook");
    }

    #[test]
    fn base64_is_detected() {
        let raw = r#"{"task_id":"t1","task_type":"echo","payload":[1,2]}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let (t, enc) = decode(b64.as_bytes()).unwrap();
        assert_eq!(enc, Encoding::Base64);
        assert_eq!(t.payload, json!([1, 2]));
        let (_, enc) = decode(raw.as_bytes()).unwrap();
        assert_eq!(enc, Encoding::Json);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(err(b""), DecodeError::Empty);
        assert_eq!(err(b"  \n"), DecodeError::Empty);
        assert!(matches!(
            err(b"\xff\xfe"),
            DecodeError::NotUtf8 { offset: 0 }
        ));
        assert_eq!(err(b"[]"), DecodeError::NotAnObject("an array"));
        assert_eq!(
            err(br#"{"task_type":"x"}"#),
            DecodeError::Missing("task_id")
        );
        assert_eq!(
            err(br#"{"task_id":"","task_type":"x"}"#),
            DecodeError::EmptyField("task_id")
        );
        assert_eq!(
            err(br#"{"task_id":7,"task_type":"x"}"#),
            DecodeError::WrongType {
                field: "task_id",
                expected: "a string",
                found: "a number"
            }
        );
        assert!(matches!(
            err(br#"{"task_id":"a","task_type":"x","webhook_url":"ftp://h/x"}"#),
            DecodeError::WebhookUrl(_)
        ));
        assert!(matches!(
            err(br#"{"task_id":"a","task_type":"x","webhook_url":"/relative"}"#),
            DecodeError::WebhookUrl(_)
        ));
        let DecodeError::Json(msg) = err(br#"{"task_id":"a",}"#) else {
            panic!()
        };
        assert!(msg.contains("line 1 column"), "{msg}");
    }

    #[test]
    fn json_scalars_are_not_mistaken_for_base64() {
        assert_eq!(err(b"null"), DecodeError::NotAnObject("null"));
        assert_eq!(err(b" true "), DecodeError::NotAnObject("a boolean"));
        assert_eq!(err(b"42"), DecodeError::NotAnObject("a number"));
        assert!(matches!(err(b"abcde"), DecodeError::Base64(_)));
    }

    #[test]
    fn byte_order_mark_is_named() {
        let raw = "\u{feff}{\"task_id\":\"a\",\"task_type\":\"b\"}";
        assert_eq!(err(raw.as_bytes()), DecodeError::ByteOrderMark);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(err(b64.as_bytes()), DecodeError::ByteOrderMark);
    }

    #[test]
    fn payload_numbers_survive_the_round_trip_to_handlers() {
        // A long decimal that a fast, not correctly rounded float parser
        // reads one bit off; exec handlers get the task as `to_json`.
        let raw = format!(
            r#"{{"task_id":"a","task_type":"b","payload":[18446755{}44073709551615,-0.0,1e308]}}"#,
            "5".repeat(120)
        );
        let task = ok(&raw);
        assert_eq!(ok(&task.to_json()), task);
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(matches!(err(deep.as_bytes()), DecodeError::Json(_)));
        let deep_obj = format!(
            "{}{}",
            r#"{"task_id":"a","task_type":"b","payload":"#,
            "{\"x\":".repeat(100_000)
        );
        assert!(matches!(err(deep_obj.as_bytes()), DecodeError::Json(_)));
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let big = vec![b' '; MAX_TASK_BYTES + 1];
        assert!(matches!(err(&big), DecodeError::TooLarge { .. }));
    }

    #[test]
    fn salvage_reads_webhook_from_invalid_envelope() {
        let s = salvage(br#"{"task_id":"t9","task_type":7,"webhook_url":"http://h/x"}"#);
        assert_eq!(s.task_id.as_deref(), Some("t9"));
        assert_eq!(s.webhook_url.unwrap().as_str(), "http://h/x");
        assert_eq!(salvage(b"garbage"), Salvage::default());
    }

    #[test]
    fn messages_without_an_id_get_one_from_their_content() {
        let a = content_id(b"garbage");
        assert_eq!(a, content_id(b"garbage"));
        assert_ne!(a, content_id(b"garbage 2"));
        assert!(a.starts_with("invalid-") && a.len() == 40, "{a}");
    }
}
