//! `sleep`: waits `payload.seconds`, cancellably. Checks timeouts, lease
//! renewal and shutdown end to end without any external dependency.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::handler::{Handler, HandlerError, HandlerFuture, TaskContext};

pub struct Sleep;

#[derive(Deserialize)]
struct Input {
    seconds: f64,
}

impl Handler for Sleep {
    fn description(&self) -> String {
        "sleeps payload.seconds (cancellable) and returns how long it slept".into()
    }
    fn run<'a>(&'a self, ctx: &'a TaskContext, payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(async move {
            let input: Input = super::parse_payload("sleep", payload)?;
            if !input.seconds.is_finite() || input.seconds < 0.0 || input.seconds > 7.0 * 86_400.0 {
                return Err(HandlerError::permanent(format!(
                    "invalid `sleep` payload: seconds must be a number from 0 to 604800, got {}",
                    input.seconds
                )));
            }
            let started = Instant::now();
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs_f64(input.seconds)) => {
                    Ok(json!({"slept_seconds": started.elapsed().as_secs_f64()}))
                }
                () = ctx.cancel.cancelled() => Err(HandlerError::transient("cancelled")),
            }
        })
    }
}
