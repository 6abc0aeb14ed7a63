//! Single-task mode: one task from `TASK_DATA` (or a file), one webhook, one
//! exit code. This is what each Azure Container Instances group runs.
//!
//! Exit 0 only when the task succeeded, so the container group's state tells
//! the operator the outcome. Invalid input still produces a `task.failed`
//! webhook when a webhook URL can be read from it, so a backend never waits
//! forever on a task it sent with a typo.
//!
//! A webhook the in-process attempts cannot deliver goes to the client's
//! outbox (`<client>-webhooks`) when storage settings and `WORKER_CLIENT` are
//! given, where `worker deliver` (or any polling worker) retries it for about
//! a day under the same `webhook-id`. Without them the outcome is only in the
//! log and on stdout. Either way the exit code is the task's own outcome.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;

use crate::app::App;
use crate::execute::{Outcome, Status};
use crate::handler::Retry;
use crate::outbox::Outbox;
use crate::task;
use crate::webhook::{count, results, Event};

/// What single-task mode ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub event: Event,
    pub succeeded: bool,
}

/// Decodes `raw`, runs it, notifies (or hands the event to `outbox`), and
/// returns the report (also printed to stdout by `main`). `shutdown` cancels
/// the running handler and stops further webhook attempts.
pub async fn run(
    app: &App,
    raw: &[u8],
    outbox: Result<&Outbox, &str>,
    shutdown: CancellationToken,
) -> Report {
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
            report(app, salvage.webhook_url.as_ref(), &event, outbox, &shutdown).await;
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
        report(app, task.webhook_url.as_ref(), &event, outbox, &shutdown).await;
        Report {
            succeeded: outcome.status == Status::Succeeded,
            event,
        }
    }
    .instrument(span)
    .await
}

/// Delivers `event` to `url`, or keeps it in the outbox; logs what happened.
async fn report(
    app: &App,
    url: Option<&Url>,
    event: &Event,
    outbox: Result<&Outbox, &str>,
    shutdown: &CancellationToken,
) {
    let Some(url) = url else { return };
    let Err(e) = app.notifier.notify(url, event, shutdown).await else {
        return;
    };
    let outbox = match outbox {
        Ok(o) => o,
        Err(why) => {
            count(results::DROPPED);
            tracing::error!(webhook_id = %event.webhook_id(), error = %e, no_outbox = why,
                "webhook not delivered and there is no outbox to keep it: the outcome is only in this log");
            return;
        }
    };
    if let Err(qe) = outbox.hand_over(url, event, &e).await {
        count(results::DROPPED);
        tracing::error!(webhook_id = %event.webhook_id(), outbox = %outbox.queue.name(), error = %qe,
            "webhook not delivered and the outbox cannot be written: the outcome is only in this log");
    }
}
