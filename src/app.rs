//! The parts every mode shares, built once in `main` and passed in.
//!
//! [`App`] owns the handler registry and the webhook notifier; single-task,
//! polling and job mode all run tasks through [`App::run`] and report through
//! [`App::notify`], so there is exactly one implementation of "run a task"
//! and one of "tell the backend".

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use url::Url;

use crate::execute::{execute, Outcome};
use crate::registry::Registry;
use crate::task::Task;
use crate::webhook::{Delivery, Event, Notifier, WebhookError};

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

    /// Sends `event` to `url` when there is one; the result is logged by the
    /// notifier and never changes the task's outcome.
    pub async fn notify(
        &self,
        url: Option<&Url>,
        event: &Event,
    ) -> Option<Result<Delivery, WebhookError>> {
        match url {
            Some(url) => Some(self.notifier.notify(url, event).await),
            None => None,
        }
    }
}
