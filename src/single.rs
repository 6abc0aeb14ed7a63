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
//!
//! On Azure Container Instances the Logic App also hands over the queue
//! message `TASK_DATA` came from (`WORKER_MESSAGE_ID`, `WORKER_POP_RECEIPT`,
//! `WORKER_DEQUEUE_COUNT`) and does not delete it. [`run_leased`] then takes
//! over the lease and runs the message through the same consumer as job mode
//! (renewal, report, then delete / retry / poison / release), so a container
//! that dies before settling leaves the message to reappear: the ACI path is
//! at-least-once like the others.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;
use url::Url;

use crate::app::App;
use crate::config::{Options, RunArgs};
use crate::consumer::{self, Consumer, Processed, RunSlot, Target};
use crate::execute::{Outcome, Status};
use crate::handler::Retry;
use crate::lease::settle_call;
use crate::outbox::Outbox;
use crate::queue::{Message, QueueError};
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use crate::task;
use crate::webhook::{count, results, Event};

/// What single-task mode ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub event: Event,
    pub succeeded: bool,
}

/// Decodes `raw`, runs it, notifies (or hands the event to `outbox`), and
/// returns the report (also printed to stdout by `main`). When shutdown is
/// requested the running handler is cancelled at once and no further
/// webhook attempt starts; the attempt in flight is given up when the grace
/// is over (and the event handed to the outbox, when there is one). The
/// caller bounds the whole by the shutdown's deadline.
pub async fn run(
    app: &App,
    raw: &[u8],
    outbox: Result<&Outbox, &str>,
    shutdown: &Shutdown,
) -> Report {
    let (task, encoding) = match task::decode(raw) {
        Ok(ok) => ok,
        Err(e) => {
            let salvage = task::salvage(raw);
            let task_id = salvage.task_id.unwrap_or_else(|| task::content_id(raw));
            let task_type = salvage.task_type.unwrap_or_else(|| "unknown".into());
            tracing::error!(%task_id, error = %e, "invalid task data; nothing was run");
            let outcome = Outcome::failed(
                format!("invalid task: {e}"),
                Retry::Permanent,
                Duration::ZERO,
            );
            let event =
                Event::from_outcome(&task_id, &task_type, salvage.client.as_deref(), 1, &outcome);
            report(app, salvage.webhook_url.as_ref(), &event, outbox, shutdown).await;
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
        let outcome = app.run(task.clone(), 1, shutdown.requested()).await;
        let event = Event::from_outcome(
            &task.task_id,
            &task.task_type,
            task.client.as_deref(),
            1,
            &outcome,
        );
        report(app, task.webhook_url.as_ref(), &event, outbox, shutdown).await;
        Report {
            succeeded: outcome.status() == Status::Succeeded,
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
    shutdown: &Shutdown,
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

/// The queue message a Logic App started this container for.
#[derive(Debug)]
pub struct Handed {
    pub message_id: String,
    pub pop_receipt: Secret,
    /// The attempt, as the Logic App counted it (it sees no dequeue count).
    pub dequeue_count: u32,
}

impl Handed {
    /// The message a Logic App handed over with `TASK_DATA`
    /// (`WORKER_MESSAGE_ID`, `WORKER_POP_RECEIPT`, `WORKER_DEQUEUE_COUNT`),
    /// when it did; an error (a configuration mistake) when only half of it
    /// is there.
    pub fn from_options(opts: &Options) -> Result<Option<Self>, String> {
        let Some(id) = opts
            .message_id
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        let receipt = opts
            .pop_receipt
            .as_ref()
            .filter(|r| !r.expose().trim().is_empty())
            .ok_or("WORKER_MESSAGE_ID is set but WORKER_POP_RECEIPT is not: both are needed to hold the message (or neither, to run the task alone)")?;
        Ok(Some(Self {
            message_id: id.to_owned(),
            pop_receipt: receipt.clone(),
            dequeue_count: opts.dequeue_count,
        }))
    }
}

/// What `worker run` runs when given no task: an echo, so a newcomer sees a
/// whole run (decode, execute, outcome event on stdout) with nothing set up.
pub const EXAMPLE_TASK: &str =
    r#"{"task_id":"example-1","task_type":"echo","payload":{"hello":"world"}}"#;

/// The task for `worker run`: `--task`, `--task-file` (or `-` for stdin),
/// else `TASK_DATA`, else [`EXAMPLE_TASK`]. A file is read up to one byte
/// past [`task::MAX_TASK_BYTES`], so decoding reports it as too large
/// without reading it whole.
pub fn run_input(args: &RunArgs, task_data: Option<Vec<u8>>) -> Result<Vec<u8>, InputError> {
    if let Some(t) = &args.task {
        return Ok(t.clone().into_bytes());
    }
    if let Some(path) = &args.task_file {
        let limit = task::MAX_TASK_BYTES as u64 + 1;
        let mut buf = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin()
                .take(limit)
                .read_to_end(&mut buf)
                .map_err(|source| InputError {
                    what: "read the task from stdin".into(),
                    source,
                })?;
        } else {
            let file = std::fs::File::open(path).map_err(|source| InputError {
                what: format!("open task file {}", path.display()),
                source,
            })?;
            file.take(limit)
                .read_to_end(&mut buf)
                .map_err(|source| InputError {
                    what: format!("read task file {}", path.display()),
                    source,
                })?;
        }
        return Ok(buf);
    }
    Ok(task_data.unwrap_or_else(|| {
        tracing::info!("no --task, --task-file or TASK_DATA: running the built-in example task");
        EXAMPLE_TASK.as_bytes().to_vec()
    }))
}

/// A task file (or stdin) that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct InputError {
    what: String,
    source: std::io::Error,
}

/// Why a handed-over message could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("the message's lease was gone before the task started (the container started after WORKER_VISIBILITY_TIMEOUT's first lease ran out, or another attempt owns it); nothing was run, and the message will be run by the next attempt")]
    LeaseGone,
    #[error("cannot take over the message's lease: {0}")]
    Queue(QueueError),
}

/// Takes over the lease on the handed-over message (one renewal, which also
/// proves it is still ours), then processes it exactly as job mode does.
pub async fn run_leased(
    consumer: Arc<Consumer>,
    target: Target,
    handed: Handed,
    raw: &[u8],
) -> Result<Processed, TakeOverError> {
    let visibility = consumer.settings.visibility_timeout;
    let renewed = settle_call(|| {
        target
            .queue
            .update_visibility(&handed.message_id, handed.pop_receipt.expose(), visibility)
    })
    .await;
    let pop_receipt = match renewed {
        Ok(r) => r,
        Err(QueueError::LeaseLost { .. }) => return Err(TakeOverError::LeaseGone),
        Err(e) => return Err(TakeOverError::Queue(e)),
    };
    tracing::info!(message_id = %handed.message_id, attempt = handed.dequeue_count,
        visibility_s = visibility.as_secs(), "holding the queue message until the task is settled");
    let msg = Message {
        id: handed.message_id,
        pop_receipt,
        dequeue_count: handed.dequeue_count,
        // Queue messages are text; TASK_DATA came from one.
        text: String::from_utf8_lossy(raw).into_owned(),
        insertion_time: None,
    };
    Ok(consumer::process_message(consumer, target, msg, RunSlot::none()).await)
}
