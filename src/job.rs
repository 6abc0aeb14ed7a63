//! Job mode (Azure Container Apps event jobs): each execution leases at most
//! one task message, runs it through the same consumer as the poller, then
//! delivers the outbox entries that are due, and exits.
//!
//! Executions are started by KEDA's queue scaler, one per message; the
//! platform never retries them (the queue's dequeue count does). An execution
//! started for the outbox finds no task and does only the outbox's work.

use std::sync::Arc;
use std::time::Duration;

use crate::consumer::{self, Consumer, Processed, RunSlot, Target};
use crate::outbox::{self, DrainConfig};
use crate::poller::SETTLE_MARGIN;
use crate::queue::QueueError;

/// From SIGTERM to exit in job mode and for a held single task: the task is
/// cancelled at once (execute gives it 2 s), webhook requests in flight are
/// given up and handed to the outbox, and settling gets [`SETTLE_MARGIN`].
/// Container Apps' default termination grace (30 s) covers it with room
/// (tests/infra.rs).
pub const ONE_MESSAGE_SHUTDOWN_BUDGET: Duration = Duration::from_secs(2 + SETTLE_MARGIN.as_secs());

/// Outbox entries a job-mode execution delivers after its task.
pub const JOB_OUTBOX_ENTRIES: u64 = 32;

/// Leases at most one message, settle it, then deliver up to
/// [`JOB_OUTBOX_ENTRIES`] due outbox entries (so executions started for the
/// outbox do its work too). `Ok(None)` means the tasks queue was empty.
pub async fn run(consumer: Arc<Consumer>, target: Target) -> Result<Option<Processed>, QueueError> {
    let received = target
        .queue
        .receive(1, consumer.settings.visibility_timeout)
        .await;
    let processed = match received {
        Ok(mut messages) => match messages.pop() {
            Some(msg) => Some(
                consumer::process_message(
                    consumer.clone(),
                    target.clone(),
                    msg,
                    consumer.shutdown.clone(),
                    RunSlot::none(),
                )
                .await,
            ),
            None => None,
        },
        Err(e) => return Err(e),
    };
    if !consumer.shutdown.is_cancelled() {
        let drained = outbox::run(
            consumer.app.notifier.clone(),
            vec![target.outbox.clone()],
            DrainConfig {
                max_in_flight: JOB_OUTBOX_ENTRIES as usize,
                max_poll_interval: Duration::from_secs(1),
                exit_when_empty: true,
                max_entries: Some(JOB_OUTBOX_ENTRIES),
            },
            consumer.shutdown.clone(),
        )
        .await;
        tracing::debug!(?drained, "outbox entries handled");
    }
    Ok(processed)
}
