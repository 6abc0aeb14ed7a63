//! Built-in handlers, one file each, and the exec and long-lived handlers
//! an operator declares in `WORKER_HANDLERS_FILE` (`file`).

pub mod echo;
pub mod exec;
pub mod fail;
pub mod file;
pub mod http;
pub mod persistent;
pub mod sleep;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::egress::EgressPolicy;
use crate::handler::{Handler, HandlerError};

/// `echo`, `sleep`, `fail` and `http`, by task type. The registry builds
/// itself from this list; the handlers know nothing of the registry.
pub fn builtins(egress: &EgressPolicy) -> Vec<(&'static str, Arc<dyn Handler>)> {
    vec![
        ("echo", Arc::new(echo::Echo)),
        ("sleep", Arc::new(sleep::Sleep)),
        ("fail", Arc::new(fail::Fail)),
        ("http", Arc::new(http::Http::new(egress.clone()))),
    ]
}

/// Parses a payload into a handler's input type; a mismatch can never succeed
/// on retry, so it is a permanent error naming the handler.
pub(crate) fn parse_payload<T: DeserializeOwned>(
    handler: &str,
    payload: &Value,
) -> Result<T, HandlerError> {
    T::deserialize(payload)
        .map_err(|e| HandlerError::permanent(format!("invalid `{handler}` payload: {e}")))
}
