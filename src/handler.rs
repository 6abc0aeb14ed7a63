//! The contract between the runtime and the code that does a task's work.
//!
//! A handler is a `dyn Handler` in a map because `task_type` is only known at
//! run time. It receives a [`TaskContext`] (identity, attempt, cancellation)
//! and the payload, and answers with a JSON result or a [`HandlerError`] that
//! says whether another attempt could help: the poller turns a permanent error
//! into an immediate move to the poison queue, a transient one into a retry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::task::Task;

/// What a handler's future resolves to.
pub type HandlerResult = Result<Value, HandlerError>;

/// A boxed handler future; boxing keeps `Handler` object safe.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'a>>;

/// Everything a handler may know about the run it is part of.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The whole envelope; exec handlers forward it to their child's stdin.
    pub task: Arc<Task>,
    /// 1 for the first delivery; the queue's dequeue count in polling mode.
    pub attempt: u32,
    /// Fires when the task times out or the worker shuts down. Handlers that
    /// hold resources outside the future (child processes) must watch it.
    pub cancel: CancellationToken,
    /// When the task's timeout expires; exec handlers cap their own timeout by it.
    pub deadline: Instant,
}

/// Whether retrying the same task could succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// A later attempt may succeed (network blip, dependency down).
    Transient,
    /// No attempt will succeed (bad payload, unknown type): poison at once.
    Permanent,
}

/// A handler's failure, with the retry semantics the runtime needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    pub retry: Retry,
}

impl HandlerError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Transient,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Permanent,
        }
    }
}

/// A task type and the handler that serves it (what a handlers file
/// declares).
pub type NamedHandler = (String, Arc<dyn Handler>);

/// A piece of code that performs one kind of task.
pub trait Handler: Send + Sync {
    /// One line for `worker handlers`.
    fn description(&self) -> String;
    /// Performs the task. Must return promptly once `ctx.cancel` fires; the
    /// runtime also drops the future on timeout, so cleanup belongs in `Drop`.
    fn run<'a>(&'a self, ctx: &'a TaskContext, payload: &'a Value) -> HandlerFuture<'a>;
    /// How long what a cancelled run started may outlive it (an exec
    /// child's kill grace): a released message stays hidden that long, so
    /// no second copy runs beside the first one's leftovers.
    fn stop_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}
