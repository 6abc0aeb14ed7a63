//! What a failed queue call means for the caller: [`QueueError`], the mapping
//! from the SDK's errors to it, and error texts that never carry a key or SAS
//! token.

use azure_core::http::{StatusCode, Url};

use super::connection::CONNECTION_STRING_VAR;
use super::settings::CLIENT_ID_VAR;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// `400 PopReceiptMismatch` or `404 MessageNotFound`: the message was
    /// received again by someone else, or already deleted (`gone`).
    #[error("message lease lost: {detail}")]
    LeaseLost {
        detail: String,
        /// `404 MessageNotFound`: the message no longer exists. For a delete
        /// whose first try's answer was lost (the SDK retries), this is the
        /// earlier try having worked.
        gone: bool,
    },
    /// `404 QueueNotFound`.
    #[error("queue `{queue}` does not exist")]
    QueueNotFound { queue: String },
    /// `401`/`403`, or no token from the managed identity.
    #[error("storage authorization failed: {detail}")]
    Auth { detail: String },
    /// Connection errors, timeouts, `5xx`, throttling: worth retrying later.
    #[error("storage temporarily unavailable: {detail}")]
    Transient { detail: String },
    /// The settings cannot work as given.
    #[error("storage configuration: {detail}")]
    Config { detail: String },
    /// Anything else the service refused.
    #[error("storage error: {detail}")]
    Other { detail: String },
}

impl QueueError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Transient { .. })
    }

    pub(super) fn config(detail: impl Into<String>) -> Self {
        QueueError::Config {
            detail: detail.into(),
        }
    }
}

/// What error messages say about the account a queue belongs to.
#[derive(Debug)]
pub(super) struct ErrorContext {
    pub(super) endpoint: Url,
    /// What to check when the service refuses the credentials; depends on
    /// how requests are authorized.
    pub(super) auth_hint: String,
}

/// The service's error code (`x-ms-error-code`), if the error is a response.
pub(super) fn error_code(e: &azure_core::Error) -> Option<String> {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

pub(super) fn classify_error(
    op: &str,
    queue: &str,
    context: &ErrorContext,
    e: &azure_core::Error,
) -> QueueError {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => classify_response(
            op,
            queue,
            &context.auth_hint,
            *status,
            error_code.as_deref().unwrap_or(""),
        ),
        ErrorKind::Connection | ErrorKind::Io => {
            let host = context.endpoint.host_str().unwrap_or("");
            let port = context
                .endpoint
                .port_or_known_default()
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            QueueError::Transient {
                detail: format!(
                    "{op} on `{queue}`: cannot reach {host}{port}: {}",
                    describe_azure_error(e)
                ),
            }
        }
        ErrorKind::Credential => QueueError::Auth {
            detail: format!(
                "{op} on `{queue}`: no token from the managed identity ({}); assign a managed \
                 identity to this container or VM (for a user-assigned one set {CLIENT_ID_VAR} to \
                 its client id), or set {CONNECTION_STRING_VAR} instead",
                describe_azure_error(e),
            ),
        },
        ErrorKind::DataConversion | ErrorKind::Other => QueueError::Other {
            detail: format!("{op} on `{queue}`: {}", describe_azure_error(e)),
        },
        #[allow(unreachable_patterns)]
        _ => QueueError::Other {
            detail: format!("{op} on `{queue}`: {}", describe_azure_error(e)),
        },
    }
}

/// The service answered: its status and `x-ms-error-code` (`code`, empty
/// when absent) decide whether the lease is lost, the queue is missing, the
/// credentials are refused, or a retry may help.
fn classify_response(
    op: &str,
    queue: &str,
    auth_hint: &str,
    status: StatusCode,
    code: &str,
) -> QueueError {
    let status_num = u16::from(status);
    let what = if code.is_empty() {
        format!("{status_num}")
    } else {
        format!("{status_num} {code}")
    };
    match (status, code) {
        (StatusCode::BadRequest, "PopReceiptMismatch") => QueueError::LeaseLost {
            detail: format!("{op} on `{queue}`: {what}"),
            gone: false,
        },
        (StatusCode::NotFound, "MessageNotFound") => QueueError::LeaseLost {
            detail: format!("{op} on `{queue}`: {what}"),
            gone: true,
        },
        (StatusCode::NotFound, "QueueNotFound") => QueueError::QueueNotFound {
            queue: queue.to_owned(),
        },
        (StatusCode::Unauthorized | StatusCode::Forbidden, _) => QueueError::Auth {
            detail: format!("{op} on `{queue}` was refused ({what}): {auth_hint}"),
        },
        (StatusCode::Conflict, "QueueBeingDeleted") => QueueError::Transient {
            detail: format!(
                "{op} on `{queue}`: {what} (the queue is being deleted; retry in a minute)"
            ),
        },
        (
            StatusCode::RequestTimeout
            | StatusCode::TooManyRequests
            | StatusCode::InternalServerError
            | StatusCode::BadGateway
            | StatusCode::ServiceUnavailable
            | StatusCode::GatewayTimeout,
            _,
        ) => QueueError::Transient {
            detail: format!("{op} on `{queue}`: {what}"),
        },
        (_, "OutOfRangeInput" | "InvalidResourceName") if status_num < 500 => QueueError::Other {
            detail: format!(
                "{op} on `{queue}` was rejected ({what}); check the queue name and endpoint path"
            ),
        },
        (_, "RequestBodyTooLarge" | "MessageTooLarge") => QueueError::Other {
            detail: format!(
                "{op} on `{queue}` was rejected ({what}): queue messages are limited to 64 KiB"
            ),
        },
        _ => QueueError::Other {
            detail: format!("{op} on `{queue}` failed: {what}"),
        },
    }
}

/// Wrappers the SDK puts around the actual cause; they add nothing for an operator.
const SDK_BOILERPLATE: &[&str] = &[
    "retry policy expired and the request will no longer be retried",
    "non-transport error occurred which will not be retried",
    "failed to execute `reqwest` request",
    "client error (Connect)",
];

/// An error and its causes on one line, without request URLs (which would
/// carry a SAS token) and without the `Debug` backtrace.
pub fn describe_azure_error(e: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        let text = if let Some(r) = s.downcast_ref::<reqwest::Error>() {
            // reqwest's Display includes the URL; say what kind of failure it was instead.
            if r.is_timeout() {
                "timed out".to_owned()
            } else if r.is_connect() {
                "connection failed".to_owned()
            } else if r.is_request() {
                "request failed".to_owned()
            } else {
                "HTTP error".to_owned()
            }
        } else {
            s.to_string()
        };
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty()
            && !SDK_BOILERPLATE.contains(&text.as_str())
            && parts.last() != Some(&text)
        {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.kind().to_string());
    }
    redact_sas(&parts.join(": "))
}

/// Replaces the value of any `sig=` query parameter: a last guard in case a
/// URL with a SAS token ends up in an error text.
fn redact_sas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("sig=") {
        let (head, tail) = rest.split_at(i + 4);
        out.push_str(head);
        out.push_str("REDACTED");
        let end = tail.find(['&', ')', ' ', '"', '\'']).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_signatures_are_redacted() {
        assert_eq!(
            redact_sas("error sending request for url (http://h/q?sv=1&sig=abc%2B&se=2) x"),
            "error sending request for url (http://h/q?sv=1&sig=REDACTED&se=2) x"
        );
        assert_eq!(redact_sas("no secret here"), "no secret here");
        assert_eq!(redact_sas("a sig=x"), "a sig=REDACTED");
    }

    fn response(status: StatusCode, code: &str) -> QueueError {
        classify_response(
            "delete message",
            "acme-tasks",
            "check the key",
            status,
            code,
        )
    }

    #[test]
    fn responses_map_to_what_the_caller_does_next() {
        assert!(matches!(
            response(StatusCode::BadRequest, "PopReceiptMismatch"),
            QueueError::LeaseLost { gone: false, .. }
        ));
        assert!(matches!(
            response(StatusCode::NotFound, "MessageNotFound"),
            QueueError::LeaseLost { gone: true, .. }
        ));
        assert!(matches!(
            response(StatusCode::NotFound, "QueueNotFound"),
            QueueError::QueueNotFound { queue } if queue == "acme-tasks"
        ));
        let e = response(StatusCode::Forbidden, "AuthorizationFailure");
        assert!(matches!(e, QueueError::Auth { .. }), "{e}");
        assert!(e.to_string().contains("check the key"), "{e}");
        for (status, code) in [
            (StatusCode::Conflict, "QueueBeingDeleted"),
            (StatusCode::TooManyRequests, ""),
            (StatusCode::ServiceUnavailable, "ServerBusy"),
        ] {
            assert!(response(status, code).is_transient(), "{status:?} {code}");
        }
        // Any other refusal is not worth retrying.
        let e = response(StatusCode::BadRequest, "InvalidQueryParameterValue");
        assert_eq!(
            e.to_string(),
            "storage error: delete message on `acme-tasks` failed: 400 InvalidQueryParameterValue"
        );
        let e = response(StatusCode::PayloadTooLarge, "RequestBodyTooLarge");
        assert!(e.to_string().contains("64 KiB"), "{e}");
    }

    #[test]
    fn transient_classification() {
        assert!(QueueError::Transient { detail: "x".into() }.is_transient());
        assert!(!QueueError::LeaseLost {
            detail: "x".into(),
            gone: false
        }
        .is_transient());
        assert!(!QueueError::Auth { detail: "x".into() }.is_transient());
    }
}
