//! `fail`: always fails with the payload's `message`. Exercises the failure
//! path (webhook, exit code, retries, poison queue) end to end.

use serde::Deserialize;
use serde_json::Value;

use crate::handler::{Handler, HandlerError, HandlerFuture, TaskContext};

pub struct Fail;

#[derive(Deserialize, Default)]
struct Input {
    #[serde(default)]
    message: Option<String>,
    /// `true` marks the failure permanent (no retries, straight to poison).
    #[serde(default)]
    permanent: bool,
}

impl Handler for Fail {
    fn description(&self) -> String {
        "always fails with payload.message (failure-path test); payload.permanent=true skips retries".into()
    }
    fn run<'a>(&'a self, _ctx: &'a TaskContext, payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(async move {
            let input: Input = if payload.is_null() {
                Input::default()
            } else {
                super::parse_payload("fail", payload)?
            };
            let message = input
                .message
                .unwrap_or_else(|| "task failed on purpose".into());
            Err(if input.permanent {
                HandlerError::permanent(message)
            } else {
                HandlerError::transient(message)
            })
        })
    }
}
