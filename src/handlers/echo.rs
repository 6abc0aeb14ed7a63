//! `echo`: returns its payload. The smoke test of a deployment.

use serde_json::Value;

use crate::handler::{Handler, HandlerFuture, TaskContext};

pub struct Echo;

impl Handler for Echo {
    fn description(&self) -> String {
        "returns the payload unchanged (deployment smoke test)".into()
    }
    fn run<'a>(&'a self, _ctx: &'a TaskContext, payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(async move { Ok(payload.clone()) })
    }
}
