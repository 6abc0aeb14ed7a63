//! The parts every mode shares, built once in `main` and passed in.
//!
//! [`App`] owns the handler registry and the webhook notifier; single-task,
//! polling and job mode all run tasks through [`App::run`] and report through
//! its notifier (and, for what it cannot deliver, the outbox), so there is
//! exactly one implementation of "run a task" and one of "tell the backend".

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::execute::{execute, Outcome};
use crate::registry::Registry;
use crate::task::Task;
use crate::webhook::Notifier;

pub struct App {
    pub registry: Arc<Registry>,
    pub notifier: Arc<Notifier>,
    /// `WORKER_TASK_TIMEOUT`: the bound on any single run of a handler.
    pub task_timeout: Duration,
}

impl App {
    pub fn new(registry: Registry, notifier: Notifier, task_timeout: Duration) -> Self {
        Self {
            registry: Arc::new(registry),
            notifier: Arc::new(notifier),
            task_timeout,
        }
    }

    /// Runs one attempt of `task`.
    pub async fn run(&self, task: Arc<Task>, attempt: u32, cancel: &CancellationToken) -> Outcome {
        execute(&self.registry, task, attempt, self.task_timeout, cancel).await
    }
}
