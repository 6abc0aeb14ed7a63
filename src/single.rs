//! Single-task mode: one task from `TASK_DATA` (or a file), one webhook, one
//! exit code. This is what each Azure Container Instances group runs.
//!
//! Exit 0 only when the task succeeded, so the container group's state tells
//! the operator the outcome. Invalid input still produces a `task.failed`
//! webhook when a webhook URL can be read from it, so a backend never waits
//! forever on a task it sent with a typo.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::execute::{Outcome, Status};
use crate::handler::Retry;
use crate::task;
use crate::webhook::Event;

/// What single-task mode ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub event: Event,
    pub succeeded: bool,
}

/// Decodes `raw`, runs it, notifies, and returns the report (also printed to
/// stdout by `main`). `shutdown` cancels the running handler.
pub async fn run(app: &App, raw: &[u8], shutdown: CancellationToken) -> Report {
    let (task, encoding) = match task::decode(raw) {
        Ok(ok) => ok,
        Err(e) => {
            let salvage = task::salvage(raw);
            let task_id = salvage.task_id.unwrap_or_else(|| "unknown".into());
            let task_type = salvage.task_type.unwrap_or_else(|| "unknown".into());
            tracing::error!(%task_id, error = %e, "invalid task data; nothing was run");
            let outcome = Outcome::failed(
                format!("invalid task: {e}"),
                Retry::Permanent,
                Duration::ZERO,
            );
            let event =
                Event::from_outcome(&task_id, &task_type, salvage.client.as_deref(), 1, &outcome);
            app.notify(salvage.webhook_url.as_ref(), &event).await;
            return Report {
                event,
                succeeded: false,
            };
        }
    };
    let span = tracing::info_span!("task", task_id = %task.task_id, task_type = %task.task_type,
        client = task.client.as_deref().unwrap_or(""));
    async move {
        tracing::debug!(?encoding, "task decoded");
        let task = Arc::new(task);
        let outcome = app.run(task.clone(), 1, &shutdown).await;
        let event = Event::from_outcome(
            &task.task_id,
            &task.task_type,
            task.client.as_deref(),
            1,
            &outcome,
        );
        app.notify(task.webhook_url.as_ref(), &event).await;
        Report {
            succeeded: outcome.status == Status::Succeeded,
            event,
        }
    }
    .instrument(span)
    .await
}
