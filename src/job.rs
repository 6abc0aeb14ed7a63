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
use crate::queue::QueueError;
pub use crate::shutdown::ONE_MESSAGE_SHUTDOWN_BUDGET;

/// Outbox entries a job-mode execution delivers after its task.
pub const JOB_OUTBOX_ENTRIES: u64 = 32;

/// How an execution ended.
#[derive(Debug)]
pub enum Ended {
    /// The tasks queue was empty.
    Empty,
    /// One message, processed to settlement.
    Processed(Box<Processed>),
    /// The shutdown deadline came first: what was not settled reappears
    /// when its lease expires.
    OutOfTime,
}

/// Leases at most one message, settles it, then delivers up to
/// [`JOB_OUTBOX_ENTRIES`] due outbox entries (so executions started for the
/// outbox do its work too). Everything is bounded by the shutdown's one
/// deadline; the outcome of the message does not depend on the outbox work
/// that follows it.
pub async fn run(consumer: Arc<Consumer>, target: Target) -> Result<Ended, QueueError> {
    let shutdown = consumer.shutdown.clone();
    let receive = target
        .queue
        .receive(1, consumer.settings.visibility_timeout);
    let Some(received) = shutdown.within(receive).await else {
        return Ok(Ended::OutOfTime);
    };
    let ended = match received?.pop() {
        None => Ended::Empty,
        Some(msg) => {
            let process =
                consumer::process_message(consumer.clone(), target.clone(), msg, RunSlot::none());
            match shutdown.within(process).await {
                Some(p) => Ended::Processed(Box::new(p)),
                None => return Ok(Ended::OutOfTime),
            }
        }
    };
    if !shutdown.is_requested() {
        let drain = outbox::run(
            consumer.app.notifier.clone(),
            vec![target.outbox.clone()],
            DrainConfig {
                max_in_flight: JOB_OUTBOX_ENTRIES as usize,
                max_poll_interval: Duration::from_secs(1),
                exit_when_empty: true,
                max_entries: Some(JOB_OUTBOX_ENTRIES),
            },
            &shutdown,
        );
        match shutdown.within(drain).await {
            Some(drained) => tracing::debug!(?drained, "outbox entries handled"),
            None => tracing::warn!("shutdown deadline reached while delivering outbox entries; they reappear when their leases end"),
        }
    }
    Ok(ended)
}
