//! The operations on one queue: receive, update, delete, send, peek, and the
//! message types they return. Each call's error is classified here, so the
//! caller sees a [`QueueError`] it can act on.

use std::sync::Arc;
use std::time::Duration;

use azure_core::http::headers::HeaderName;
use azure_storage_queue::models::{
    QueueClientGetPropertiesResultHeaders, QueueClientPeekMessagesOptions,
    QueueClientReceiveMessagesOptions, QueueClientSendMessageOptions,
    QueueClientUpdateMessageOptions, QueueMessage,
};
use azure_storage_queue::QueueClient;

use super::error::{classify_error, describe_azure_error, error_code, ErrorContext, QueueError};

/// Most messages one receive or peek can return (a service limit).
pub const MAX_BATCH: u8 = 32;
/// Longest visibility timeout the service accepts: 7 days.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(7 * 24 * 3600);

const X_MS_POPRECEIPT: HeaderName = HeaderName::from_static("x-ms-popreceipt");

/// A received message, leased until its visibility timeout ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub pop_receipt: String,
    pub dequeue_count: u32,
    pub text: String,
    pub insertion_time: Option<time::OffsetDateTime>,
}

/// What the service returns for a sent message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentMessage {
    pub message_id: String,
    pub pop_receipt: String,
}

/// A message seen without leasing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeekedMessage {
    pub id: String,
    pub dequeue_count: u32,
    pub text: String,
    pub insertion_time: Option<time::OffsetDateTime>,
}

/// One queue. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    name: Arc<str>,
    client: Arc<QueueClient>,
    errors: Arc<ErrorContext>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Queue").field(&self.name).finish()
    }
}

fn secs_i32(d: Duration, min: u64, max: u64) -> i32 {
    // Clamped into range, so the conversion cannot fail.
    i32::try_from(d.as_secs().clamp(min, max)).unwrap_or(i32::MAX)
}

impl Queue {
    pub(super) fn new(name: &str, client: QueueClient, errors: Arc<ErrorContext>) -> Self {
        Queue {
            name: Arc::from(name),
            client: Arc::new(client),
            errors,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the queue; an existing queue is fine.
    pub async fn create_if_missing(&self) -> Result<(), QueueError> {
        match self.client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("QueueAlreadyExists") => Ok(()),
            Err(e) => Err(self.classify("create queue", e)),
        }
    }

    /// The service's approximate message count (never lower than the real one).
    pub async fn approximate_count(&self) -> Result<u64, QueueError> {
        let rsp = self
            .client
            .get_properties(None)
            .await
            .map_err(|e| self.classify("get queue properties", e))?;
        let count = rsp
            .approximate_messages_count()
            .map_err(|e| self.classify("read the message count", e))?;
        Ok(count.and_then(|c| u64::try_from(c).ok()).unwrap_or(0))
    }

    /// Leases up to `max` (1–32) messages for `visibility` (1 s – 7 days).
    /// An empty queue gives an empty `Vec`.
    pub async fn receive(&self, max: u8, visibility: Duration) -> Result<Vec<Message>, QueueError> {
        let options = QueueClientReceiveMessagesOptions {
            number_of_messages: Some(i32::from(max.clamp(1, MAX_BATCH))),
            visibility_timeout: Some(secs_i32(visibility, 1, MAX_VISIBILITY.as_secs())),
            ..Default::default()
        };
        let rsp = self
            .client
            .receive_messages(Some(options))
            .await
            .map_err(|e| self.classify("receive messages", e))?;
        let items = rsp
            .into_model()
            .map_err(|e| self.classify("read received messages", e))?
            .items
            .unwrap_or_default();
        items
            .into_iter()
            .map(|m| {
                let (Some(id), Some(pop_receipt)) = (m.message_id, m.pop_receipt) else {
                    return Err(QueueError::Other {
                        detail: format!(
                            "queue `{}` returned a message without id or pop receipt",
                            self.name
                        ),
                    });
                };
                Ok(Message {
                    id,
                    pop_receipt,
                    dequeue_count: count_u32(m.dequeue_count),
                    text: m.message_text.unwrap_or_default(),
                    insertion_time: m.insertion_time,
                })
            })
            .collect()
    }

    /// Sets a leased message's visibility timeout (0 s – 7 days; 0 releases
    /// it at once) and returns the new pop receipt, which replaces the old one.
    pub async fn update_visibility(
        &self,
        id: &str,
        pop_receipt: &str,
        visibility: Duration,
    ) -> Result<String, QueueError> {
        self.update(id, pop_receipt, visibility, None).await
    }

    /// Like [`Queue::update_visibility`], replacing the message text as well
    /// when `text` is given (the outbox records each attempt this way).
    pub async fn update(
        &self,
        id: &str,
        pop_receipt: &str,
        visibility: Duration,
        text: Option<&str>,
    ) -> Result<String, QueueError> {
        let options = match text {
            None => None,
            Some(t) => Some(QueueClientUpdateMessageOptions {
                queue_message: Some(
                    QueueMessage {
                        message_text: Some(t.to_owned()),
                    }
                    .try_into()
                    .map_err(|e: azure_core::Error| QueueError::Other {
                        detail: format!("cannot encode the message: {}", describe_azure_error(&e)),
                    })?,
                ),
                ..Default::default()
            }),
        };
        let rsp = self
            .client
            .update_message(
                id,
                pop_receipt,
                secs_i32(visibility, 0, MAX_VISIBILITY.as_secs()),
                options,
            )
            .await
            .map_err(|e| self.classify("update message visibility", e))?;
        rsp.headers()
            .get_optional_str(&X_MS_POPRECEIPT)
            .map(str::to_owned)
            .ok_or_else(|| QueueError::Other {
                detail: format!(
                    "queue `{}` accepted the visibility update of message {id} but returned no x-ms-popreceipt",
                    self.name
                ),
            })
    }

    /// Deletes a leased message.
    pub async fn delete(&self, id: &str, pop_receipt: &str) -> Result<(), QueueError> {
        self.client
            .delete_message(id, pop_receipt, None)
            .await
            .map(|_| ())
            .map_err(|e| self.classify("delete message", e))
    }

    /// Sends `text` as is (callers base64-encode it if they want to).
    /// `initial_visibility` delays it (up to 7 days); `ttl_seconds` is -1 for
    /// "never expires", otherwise positive; the service default is 7 days.
    pub async fn send(
        &self,
        text: &str,
        initial_visibility: Option<Duration>,
        ttl_seconds: Option<i64>,
    ) -> Result<SentMessage, QueueError> {
        let ttl = match ttl_seconds {
            None => None,
            Some(t) if t == -1 || t > 0 => Some(i32::try_from(t).map_err(|_| {
                QueueError::config(format!(
                    "message time-to-live {t}s is too large (use -1 for no expiry)"
                ))
            })?),
            Some(t) => {
                return Err(QueueError::config(format!(
                    "message time-to-live must be -1 (never expires) or positive, not {t}"
                )))
            }
        };
        let options = QueueClientSendMessageOptions {
            visibility_timeout: initial_visibility
                .map(|d| secs_i32(d, 0, MAX_VISIBILITY.as_secs())),
            message_time_to_live: ttl,
            ..Default::default()
        };
        let body = QueueMessage {
            message_text: Some(text.to_owned()),
        }
        .try_into()
        .map_err(|e: azure_core::Error| QueueError::Other {
            detail: format!("cannot encode the message: {}", describe_azure_error(&e)),
        })?;
        let rsp = self
            .client
            .send_message(body, Some(options))
            .await
            .map_err(|e| self.classify("send message", e))?;
        let sent = rsp
            .into_model()
            .and_then(|l| l.into_message())
            .map_err(|e| self.classify("read the sent message", e))?;
        match (sent.message_id, sent.pop_receipt) {
            (Some(message_id), Some(pop_receipt)) => Ok(SentMessage {
                message_id,
                pop_receipt,
            }),
            _ => Err(QueueError::Other {
                detail: format!(
                    "queue `{}` accepted a message but returned no message id",
                    self.name
                ),
            }),
        }
    }

    /// Up to `max` (1–32) visible messages, without leasing them.
    pub async fn peek(&self, max: u8) -> Result<Vec<PeekedMessage>, QueueError> {
        let options = QueueClientPeekMessagesOptions {
            number_of_messages: Some(i32::from(max.clamp(1, MAX_BATCH))),
            ..Default::default()
        };
        let rsp = self
            .client
            .peek_messages(Some(options))
            .await
            .map_err(|e| self.classify("peek messages", e))?;
        let items = rsp
            .into_model()
            .map_err(|e| self.classify("read peeked messages", e))?
            .items
            .unwrap_or_default();
        Ok(items
            .into_iter()
            .map(|m| PeekedMessage {
                id: m.message_id.unwrap_or_default(),
                dequeue_count: count_u32(m.dequeue_count),
                text: m.message_text.unwrap_or_default(),
                insertion_time: m.insertion_time,
            })
            .collect())
    }

    /// Maps an SDK error to a [`QueueError`] and logs it (with `Display`).
    fn classify(&self, op: &str, e: azure_core::Error) -> QueueError {
        let err = classify_error(op, &self.name, &self.errors, &e);
        tracing::debug!(queue = %self.name, op, error = %err, "queue operation failed");
        err
    }
}

fn count_u32(n: Option<i64>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}
