//! A received message's lease, from receive to settlement.
//!
//! The service hands out a new pop receipt on every visibility update, and
//! only the newest one can delete or release the message. [`Lease`] is the
//! one owner of that receipt: it renews the visibility at half-life from the
//! moment it is taken until the message is settled, through the handler run
//! *and* the webhook delivery that follows it, and each settlement
//! ([`Lease::delete`], [`Lease::poison`], [`Lease::retry_in`],
//! [`Lease::release`]) first stops the renewal, waiting for an update in
//! flight so its receipt is not lost, then uses the newest receipt. Nothing
//! else touches a pop receipt of a consumed message.
//!
//! A settlement call that keeps failing leaves the message to its visibility
//! timeout: it reappears and is processed again, which is the at-least-once
//! safety net.
//!
//! Every call can lose its answer (the SDK then tries again, and so does
//! [`settle_call`] on transient errors). What that means, call by call:
//!
//! | call | a lost answer means | so the worker |
//! |---|---|---|
//! | receive | messages leased to nobody we know of | nothing to do: they reappear after the visibility timeout (the poller never drops a receive in flight at shutdown) |
//! | renew | the service may hold a newer receipt than ours | the next renewal gets `PopReceiptMismatch`: treated as a lost lease, the task is cancelled and runs again later |
//! | release / retry | it may have worked, with a receipt we never saw | a retry gets `PopReceiptMismatch`; the message is visible (or will be) either way |
//! | delete | it may have worked | a retry gets `404 MessageNotFound`: counted as deleted |
//! | poison copy | a copy may exist | a retry may leave two copies in the poison queue (never none: the original is deleted only after a copy was acknowledged) |
//! | send (enqueue, outbox) | a message may exist | a retry may send it twice: receivers dedupe on task id / `webhook-id` |

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::queue::{Message, Queue, QueueError};
use crate::retry::{self, Decision};

/// How a message was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Deleted after its outcome was delivered (or handed to the outbox).
    Succeeded,
    /// Left on the queue for another attempt.
    Retried,
    /// Moved to the poison queue.
    Poisoned,
    /// Made visible again at once (shutdown).
    Released,
    /// The lease was lost; the message belongs to someone else now.
    LeaseLost,
    /// A queue call kept failing; the message will reappear when its lease expires.
    Unsettled,
}

/// What settling did: the settlement and how often the lease was renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    pub settlement: Settlement,
    pub renewals: u64,
}

/// A message held invisible by periodic renewal until it is settled.
/// Dropped unsettled (its future was dropped at the shutdown deadline), it
/// stops renewing, and the message reappears when its visibility runs out.
pub struct Lease {
    queue: Queue,
    id: String,
    receipt: Arc<Mutex<String>>,
    stop: CancellationToken,
    lost: CancellationToken,
    renewal: Option<JoinHandle<u64>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Lease {
    /// Starts renewing `msg`'s lease every `visibility / 2`. When the lease is
    /// lost, `on_lost` is cancelled too (the running handler stops: its work
    /// is another worker's now).
    pub fn start(
        queue: Queue,
        msg: &Message,
        visibility: Duration,
        on_lost: CancellationToken,
    ) -> Self {
        let receipt = Arc::new(Mutex::new(msg.pop_receipt.clone()));
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let renewal = tokio::spawn(
            renew(
                queue.clone(),
                msg.id.clone(),
                receipt.clone(),
                visibility,
                stop.clone(),
                lost.clone(),
                on_lost,
            )
            .instrument(tracing::Span::current()),
        );
        Self {
            queue,
            id: msg.id.clone(),
            receipt,
            stop,
            lost,
            renewal: Some(renewal),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// Stops renewing; `None` when the lease was lost meanwhile.
    async fn end(mut self) -> (Option<(Queue, String, String)>, u64) {
        self.stop.cancel();
        let renewals = match self.renewal.take() {
            Some(r) => r.await.unwrap_or(0),
            None => 0,
        };
        if self.lost.is_cancelled() {
            return (None, renewals);
        }
        let receipt = self.receipt.lock().await.clone();
        (
            Some((self.queue.clone(), self.id.clone(), receipt)),
            renewals,
        )
    }

    /// Settles nothing: the lease was lost while the task ran, so the
    /// message is another worker's now and will be delivered again.
    pub async fn forfeit(self) -> Settled {
        let (_, renewals) = self.end().await;
        Settled {
            settlement: lost(),
            renewals,
        }
    }

    /// Deletes the message: everything it owed the outside world is done.
    pub async fn delete(self) -> Settled {
        let (held, renewals) = self.end().await;
        let settlement = match held {
            None => lost(),
            Some((queue, id, receipt)) => delete(&queue, &id, &receipt).await,
        };
        Settled {
            settlement,
            renewals,
        }
    }

    /// Makes the message visible again after `delay`, for another attempt.
    pub async fn retry_in(self, delay: Duration) -> Settled {
        let (held, renewals) = self.end().await;
        let settlement = match held {
            None => lost(),
            Some((queue, id, receipt)) => {
                match settle_call(|| queue.update_visibility(&id, &receipt, delay)).await {
                    Ok(_) => Settlement::Retried,
                    Err(e) => unsettled(&e, "schedule the retry"),
                }
            }
        };
        Settled {
            settlement,
            renewals,
        }
    }

    /// Makes the message visible again after `delay` (at once for zero),
    /// for another worker; `why` is logged when that worked.
    pub async fn release_after(self, delay: Duration, why: &str) -> Settled {
        let (held, renewals) = self.end().await;
        let settlement = match held {
            None => lost(),
            Some((queue, id, receipt)) => release(&queue, &id, &receipt, delay, why).await,
        };
        Settled {
            settlement,
            renewals,
        }
    }

    /// Copies `text` (the message as received) verbatim to `poison`, creating
    /// it when missing, then deletes the original. Never deletes unless the
    /// copy was accepted.
    pub async fn poison(self, poison: &Queue, text: &str) -> Settled {
        let (held, renewals) = self.end().await;
        let settlement = match held {
            None => lost(),
            Some((queue, id, receipt)) => match send_creating(poison, text, None).await {
                Ok(copy) => {
                    tracing::error!(poison_queue = %poison.name(), poison_message_id = %copy,
                        message_id = %id, "message moved to the poison queue");
                    match delete(&queue, &id, &receipt).await {
                        Settlement::Succeeded => Settlement::Poisoned,
                        other => other,
                    }
                }
                Err(e) => unsettled(&e, "copy the message to the poison queue"),
            },
        };
        Settled {
            settlement,
            renewals,
        }
    }
}

/// Releases a message that was received but will not be started (it arrived
/// after shutdown began); no lease was taken on it.
pub async fn release_unstarted(queue: &Queue, msg: &Message) -> Settlement {
    let why = "received while stopping; released without running it";
    release(queue, &msg.id, &msg.pop_receipt, Duration::ZERO, why).await
}

/// Sends `text` to `queue`, creating the queue when it does not exist yet
/// (poison queues and outboxes appear on first use). Returns the new
/// message's id. Retried like a settlement call.
pub async fn send_creating(
    queue: &Queue,
    text: &str,
    initial_visibility: Option<Duration>,
) -> Result<String, QueueError> {
    settle_call(|| async {
        let sent = match queue.send(text, initial_visibility, Some(-1)).await {
            Err(QueueError::QueueNotFound { .. }) => {
                queue.create_if_missing().await?;
                queue.send(text, initial_visibility, Some(-1)).await
            }
            other => other,
        };
        sent.map(|s| s.message_id)
    })
    .await
}

/// Renews the visibility at half-life until stopped; returns how many times.
/// The update in flight is never cancelled: its new receipt must be kept.
async fn renew(
    queue: Queue,
    id: String,
    receipt: Arc<Mutex<String>>,
    visibility: Duration,
    stop: CancellationToken,
    lost: CancellationToken,
    on_lost: CancellationToken,
) -> u64 {
    let half = (visibility / 2).max(Duration::from_millis(500));
    let mut renewed = 0;
    let mut wait = half;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return renewed,
        }
        let current = receipt.lock().await.clone();
        match queue.update_visibility(&id, &current, visibility).await {
            Ok(new_receipt) => {
                *receipt.lock().await = new_receipt;
                renewed += 1;
                wait = half;
                tracing::debug!(visibility_s = visibility.as_secs(), "lease renewed");
            }
            Err(QueueError::LeaseLost { detail, gone }) => {
                if gone {
                    tracing::warn!(%detail, "the message is gone (deleted by someone else, or expired past its time-to-live); cancelling the task");
                } else {
                    tracing::warn!(%detail, "lease lost (another receive took the message); cancelling the task");
                }
                lost.cancel();
                on_lost.cancel();
                return renewed;
            }
            Err(e) => {
                // Retry well before the lease runs out.
                wait = (visibility / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "lease renewal failed; retrying");
            }
        }
    }
}

/// Retries a settlement call a few times on transient errors (0.2, 0.4,
/// 0.8, 1.6 s apart: about 3 s of waiting, so settling fits the shutdown
/// margin).
pub async fn settle_call<T, F, Fut>(mut op: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let delays = [200, 400, 800, 1600].map(Duration::from_millis);
    let decide = |e: &QueueError| {
        if e.is_transient() {
            tracing::warn!(error = %e, "queue call failed; retrying");
            Decision::Retry
        } else {
            Decision::Stop
        }
    };
    retry::run(delays, |_| op(), decide, &CancellationToken::new())
        .await
        .map_err(|gave_up| gave_up.error)
}

fn lost() -> Settlement {
    tracing::warn!("lease lost before settling; not settling (see the renewal's warning for why)");
    Settlement::LeaseLost
}

fn unsettled(e: &QueueError, what: &str) -> Settlement {
    if let QueueError::LeaseLost { detail, gone } = e {
        if *gone {
            tracing::warn!(%detail, "could not {what}: the message is gone (deleted by someone else, or expired)");
        } else {
            tracing::warn!(%detail, "could not {what}: lease lost; the message is another receive's now and will be processed again");
        }
        return Settlement::LeaseLost;
    }
    tracing::error!(error = %e, "could not {what}; the message reappears when its lease expires");
    Settlement::Unsettled
}

/// Deletes with the newest receipt. What a lost answer means: the SDK (and
/// `settle_call`) try again, and a retry of a delete that had worked finds
/// the message gone (`404 MessageNotFound`). A message that is gone is what a
/// delete wants, so that counts as done; only a receipt mismatch (someone
/// else received the message meanwhile) is a lost lease.
async fn delete(queue: &Queue, id: &str, receipt: &str) -> Settlement {
    match settle_call(|| queue.delete(id, receipt)).await {
        Ok(()) => Settlement::Succeeded,
        Err(QueueError::LeaseLost { gone: true, detail }) => {
            tracing::info!(%detail, "message already gone when deleting it (an earlier try worked); counted as deleted");
            Settlement::Succeeded
        }
        Err(e) => unsettled(&e, "delete the message"),
    }
}

async fn release(queue: &Queue, id: &str, receipt: &str, delay: Duration, why: &str) -> Settlement {
    match settle_call(|| queue.update_visibility(id, receipt, delay)).await {
        Ok(_) => {
            tracing::info!(queue = %queue.name(), message_id = %id, visible_in_s = delay.as_secs_f64(), "{why}");
            Settlement::Released
        }
        Err(e) => unsettled(&e, "release the message"),
    }
}
