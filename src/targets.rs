//! The queues a worker serves, built from its settings: for each client its
//! tasks queue, that queue's poison queue and the client's outbox (with the
//! blob container for outcomes too large for a message).
//!
//! Every mode that touches the queues starts here, so a setting is read and
//! checked in one place. A setting the operator got wrong is a
//! [`TargetsError::Config`] (the binary exits 2 with its message, which
//! names the variable); a queue service that cannot be reached yet is not an
//! error at all: the receive loop keeps trying, so a worker starts while the
//! storage account is down.

use crate::config::Options;
use crate::consumer::{Deferring, Target};
use crate::outbox::Outbox;
use crate::queue::{self, ClaimStore, QueueError, QueueService, StorageSettings};

#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    /// A setting is missing or malformed; the message names it.
    #[error("{0}")]
    Config(String),
    /// A queue exists in no usable form (for example a name the service
    /// refuses), or a non-transient answer while creating it.
    #[error("cannot prepare queue {queue}")]
    Prepare {
        queue: String,
        #[source]
        source: QueueError,
    },
}

/// The targets of `WORKER_CLIENT` / `WORKER_QUEUE_NAME`. With `create`,
/// missing task and poison queues are created (polling mode); job mode and
/// a handed-over message skip that round trip per task (their queue holds
/// the message they were started for; a missing poison queue is created
/// on first use).
pub async fn connect(opts: &Options, create: bool) -> Result<Vec<Target>, TargetsError> {
    let settings = opts.storage();
    let service = QueueService::new(&settings).map_err(|e| TargetsError::Config(e.to_string()))?;
    let names = opts.queues().map_err(TargetsError::Config)?;
    tracing::info!(storage = %service.describe(), "queue service");
    let mut targets = Vec::new();
    for names in names {
        let outbox_name = names.outbox().map_err(TargetsError::Config)?;
        let (client, name) = (names.client, names.queue);
        let outbox =
            outbox(&service, &settings, &outbox_name, opts).map_err(prepare(&outbox_name))?;
        let queue = service.queue(&name).map_err(prepare(&name))?;
        let poison_name = queue::names::poison_queue(&name);
        let poison = service.queue(&poison_name).map_err(prepare(&poison_name))?;
        if create {
            let (q_made, p_made) =
                tokio::join!(queue.create_if_missing(), poison.create_if_missing());
            for (q, made) in [(&queue, q_made), (&poison, p_made)] {
                match made {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => {
                        tracing::warn!(queue = %q.name(), error = %e, "cannot reach the queue yet; will keep trying")
                    }
                    Err(e) => return Err(prepare(q.name())(e)),
                }
            }
        }
        targets.push(Target {
            client,
            queue,
            poison,
            outbox,
            deferring: Deferring::default(),
        });
    }
    Ok(targets)
}

fn prepare(queue: &str) -> impl Fn(QueueError) -> TargetsError + '_ {
    move |source| TargetsError::Prepare {
        queue: queue.to_owned(),
        source,
    }
}

/// The outbox `name`, with the configured schedule and its blob container
/// (named like the queue).
fn outbox(
    service: &QueueService,
    settings: &StorageSettings,
    name: &str,
    opts: &Options,
) -> Result<Outbox, QueueError> {
    Ok(Outbox {
        queue: service.queue(name)?,
        poison: service.queue(&queue::names::poison_queue(name))?,
        schedule: opts.webhook_outbox_schedule.0.clone().into(),
        claims: ClaimStore::new(settings, name)?,
    })
}

/// Single-task mode keeps undelivered webhooks in the first configured
/// client's outbox, when storage and a client are configured; otherwise the
/// reason there is none (the outcome is then delivered or lost with the
/// process, as README's guarantees say).
pub fn single_outbox(opts: &Options) -> Result<Outbox, String> {
    let settings = opts.storage();
    if !settings.is_configured() {
        return Err("no storage settings (AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with a managed identity)".into());
    }
    let service = QueueService::new(&settings).map_err(|e| e.to_string())?;
    let names = opts
        .queues()?
        .into_iter()
        .next()
        .ok_or("no client configured")?;
    let name = names.outbox()?;
    outbox(&service, &settings, &name, opts).map_err(|e| format!("outbox {name}: {e}"))
}
