//! Azure Storage Queue access: the one place that talks to the queue service.
//!
//! Built on `azure_storage_queue` 1.x, which covers the REST calls but leaves
//! out what a long-running consumer needs around them; this module adds:
//!
//! - **Authorization from a connection string.** The SDK only knows Entra ID
//!   tokens; Shared Key signing ([`shared_key::SharedKeyPolicy`]) and SAS
//!   tokens are added as pipeline policies. Without a connection string,
//!   `AZURE_STORAGE_QUEUE_ENDPOINT` / `AZURE_STORAGE_ACCOUNT` select Entra ID
//!   with a managed identity.
//! - **Bounded failure.** The SDK's default retry gave up on a closed port
//!   only after 82 s. Here each try has a connect and a total timeout and the
//!   SDK retries at most twice, quickly, so the caller's own backoff decides
//!   what happens next: a refused connection is reported within a second or
//!   two, an unresponsive host within about 10 s (two connect timeouts), a
//!   hung server within about 20 s (two request timeouts).
//! - **Errors the caller can act on.** [`QueueError`] separates "someone else
//!   owns this message now" ([`QueueError::LeaseLost`]) from a missing queue,
//!   bad credentials, transient trouble and configuration mistakes. Messages
//!   never contain a key or SAS token: `azure_core::Error` is rendered with
//!   `Display` (its `Debug` prints a backtrace) and request URLs are left out.
//! - **What the SDK hides.** The new pop receipt after an update lives only in
//!   the `x-ms-popreceipt` response header; an empty queue comes back as
//!   `items: None`; `receive` returns one message unless told otherwise.

pub mod connection;
pub mod names;
pub mod shared_key;

pub use names::{poison_queue, tasks_queue, validate_queue_name, webhooks_queue};

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_core::http::headers::HeaderName;
use azure_core::http::{
    ClientOptions, ExponentialRetryOptions, RetryOptions, StatusCode, Transport, Url,
};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_queue::models::{
    QueueClientGetPropertiesResultHeaders, QueueClientPeekMessagesOptions,
    QueueClientReceiveMessagesOptions, QueueClientSendMessageOptions,
    QueueClientUpdateMessageOptions, QueueMessage,
};
use azure_storage_queue::{QueueClient, QueueServiceClient, QueueServiceClientOptions};

use crate::secret::Secret;
use connection::{Credential, CONNECTION_STRING_VAR};
use shared_key::{SasPolicy, SharedKeyPolicy};

/// Env var for the Entra ID queue endpoint.
pub const QUEUE_ENDPOINT_VAR: &str = "AZURE_STORAGE_QUEUE_ENDPOINT";
/// Env var for the Entra ID account name (endpoint derived from it).
pub const ACCOUNT_VAR: &str = "AZURE_STORAGE_ACCOUNT";
/// Env var for a user-assigned managed identity's client id.
pub const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";

/// Longest a TCP (and TLS) connection may take to establish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one try of a request may take, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Quick retries inside the SDK before an error reaches the caller.
pub const SDK_RETRIES: u32 = 2;
/// No new SDK retry starts once this long has passed since the first try
/// failed (the SDK starts its clock there). Quick failures such as a refused
/// connection get both retries; a try that timed out gets one more at most.
const SDK_RETRY_BUDGET: Duration = Duration::from_secs(5);

/// Most messages one receive or peek can return (a service limit).
pub const MAX_BATCH: u8 = 32;
/// Longest visibility timeout the service accepts: 7 days.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(7 * 24 * 3600);

const X_MS_POPRECEIPT: HeaderName = HeaderName::from_static("x-ms-popreceipt");

/// How to reach the storage account; `config` builds it from the options.
#[derive(Clone, Debug, Default)]
pub struct StorageSettings {
    pub connection_string: Option<Secret>,
    pub queue_endpoint: Option<String>,
    pub account: Option<String>,
    pub managed_identity_client_id: Option<String>,
}

impl StorageSettings {
    /// Empty values count as unset (`AZURE_CLIENT_ID=` in a template is common).
    /// Whether any way to reach storage is configured.
    pub fn is_configured(&self) -> bool {
        self.connection_string.is_some() || self.queue_endpoint.is_some() || self.account.is_some()
    }
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// `400 PopReceiptMismatch` or `404 MessageNotFound`: the message was
    /// received again by someone else, or already deleted (`gone`).
    #[error("message lease lost: {detail}")]
    LeaseLost {
        detail: String,
        /// `404 MessageNotFound`: the message no longer exists. For a delete
        /// whose first try's answer was lost (the SDK retries), this is the
        /// earlier try having worked.
        gone: bool,
    },
    /// `404 QueueNotFound`.
    #[error("queue `{queue}` does not exist")]
    QueueNotFound { queue: String },
    /// `401`/`403`, or no token from the managed identity.
    #[error("storage authorization failed: {detail}")]
    Auth { detail: String },
    /// Connection errors, timeouts, `5xx`, throttling: worth retrying later.
    #[error("storage temporarily unavailable: {detail}")]
    Transient { detail: String },
    /// The settings cannot work as given.
    #[error("storage configuration: {detail}")]
    Config { detail: String },
    /// Anything else the service refused.
    #[error("storage error: {detail}")]
    Other { detail: String },
}

impl QueueError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Transient { .. })
    }

    fn config(detail: impl Into<String>) -> Self {
        QueueError::Config {
            detail: detail.into(),
        }
    }
}

/// How requests are authorized; kept for descriptions and error hints.
#[derive(Clone, Debug)]
enum AuthMode {
    SharedKey,
    Sas,
    ManagedIdentity { client_id: Option<String> },
}

impl AuthMode {
    fn label(&self) -> String {
        match self {
            AuthMode::SharedKey => "shared key".into(),
            AuthMode::Sas => "SAS".into(),
            AuthMode::ManagedIdentity { client_id: None } => {
                "managed identity, system-assigned".into()
            }
            AuthMode::ManagedIdentity {
                client_id: Some(id),
            } => format!("managed identity, client id {id}"),
        }
    }

    /// What to check when the service refuses the credentials.
    fn fix_hint(&self) -> String {
        match self {
            AuthMode::SharedKey => format!(
                "check the AccountName/AccountKey in {CONNECTION_STRING_VAR} (was the key rotated?) \
                 and that the machine clock is correct"
            ),
            AuthMode::Sas => format!(
                "the SharedAccessSignature in {CONNECTION_STRING_VAR} is expired, not yet valid, \
                 or lacks permissions (queue operations need r, a, u and p)"
            ),
            AuthMode::ManagedIdentity { .. } => format!(
                "give the managed identity (system-assigned, or {CLIENT_ID_VAR} for a user-assigned one) \
                 the \"Storage Queue Data Contributor\" role on the storage account, or set \
                 {CONNECTION_STRING_VAR}"
            ),
        }
    }
}

struct ServiceInner {
    client: QueueServiceClient,
    endpoint: Url,
    account: Option<String>,
    auth: AuthMode,
}

/// A connection to one storage account's queue service. Cheap to clone.
#[derive(Clone)]
pub struct QueueService {
    inner: Arc<ServiceInner>,
}

impl std::fmt::Debug for QueueService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("QueueService")
            .field(&self.describe())
            .finish()
    }
}

impl QueueService {
    /// Builds the client from the settings: a connection string when set,
    /// otherwise Entra ID with a managed identity. No request is made; the
    /// error names the setting to fix.
    pub fn new(s: &StorageSettings) -> Result<Self, QueueError> {
        let mut options = client_options()?;
        let (endpoint, account, auth, credential): (
            Url,
            Option<String>,
            AuthMode,
            Option<Arc<dyn TokenCredential>>,
        ) = if let Some(cs) = &s.connection_string {
            let parsed = connection::parse(cs.expose()).map_err(QueueError::config)?;
            let auth = match &parsed.credential {
                Credential::SharedKey { account, key } => {
                    let policy = SharedKeyPolicy::new(account, key)
                        .map_err(|e| QueueError::config(format!("{CONNECTION_STRING_VAR}: {e}")))?;
                    options.per_try_policies.push(Arc::new(policy));
                    AuthMode::SharedKey
                }
                Credential::Sas(sas) => {
                    options
                        .per_call_policies
                        .push(Arc::new(SasPolicy::new(sas.clone())));
                    AuthMode::Sas
                }
            };
            (parsed.endpoint, parsed.account, auth, None)
        } else if s.queue_endpoint.is_some() || s.account.is_some() {
            let endpoint = match &s.queue_endpoint {
                Some(e) => {
                    connection::parse_endpoint(e, QUEUE_ENDPOINT_VAR).map_err(QueueError::config)?
                }
                None => {
                    let a = s.account.as_deref().unwrap_or_default();
                    connection::account_endpoint(a, "https", "core.windows.net")
                        .map_err(|e| QueueError::config(format!("{ACCOUNT_VAR}: {e}")))?
                }
            };
            if endpoint.scheme() != "https" {
                return Err(QueueError::config(format!(
                    "{QUEUE_ENDPOINT_VAR} must use https with managed identity (Entra ID tokens are \
                     never sent over plain http); for Azurite use {CONNECTION_STRING_VAR}=UseDevelopmentStorage=true"
                )));
            }
            let client_id = s.managed_identity_client_id.clone();
            let credential =
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: credential_client_options()?,
                }))
                .map_err(|e| {
                    QueueError::config(format!(
                        "cannot set up the managed identity credential ({CLIENT_ID_VAR}): {}",
                        describe_azure_error(&e)
                    ))
                })?;
            (
                endpoint,
                s.account.clone(),
                AuthMode::ManagedIdentity { client_id },
                Some(credential),
            )
        } else {
            return Err(QueueError::config(format!(
                "no storage account configured: set {CONNECTION_STRING_VAR}, or {QUEUE_ENDPOINT_VAR} \
                 (or {ACCOUNT_VAR}) to use a managed identity"
            )));
        };

        let client = QueueServiceClient::new(
            endpoint.clone(),
            credential,
            Some(QueueServiceClientOptions {
                client_options: options,
                ..Default::default()
            }),
        )
        .map_err(|e| {
            QueueError::config(format!(
                "cannot create the queue client: {}",
                describe_azure_error(&e)
            ))
        })?;
        Ok(Self {
            inner: Arc::new(ServiceInner {
                client,
                endpoint,
                account,
                auth,
            }),
        })
    }

    /// A handle on one queue; the name is checked against Azure's rules.
    pub fn queue(&self, name: &str) -> Result<Queue, QueueError> {
        validate_queue_name(name).map_err(QueueError::config)?;
        let client = self.inner.client.queue_client(name).map_err(|e| {
            QueueError::config(format!(
                "cannot address queue `{name}`: {}",
                describe_azure_error(&e)
            ))
        })?;
        Ok(Queue {
            name: Arc::from(name),
            client: Arc::new(client),
            service: self.inner.clone(),
        })
    }

    /// One line for logs and `worker check`; never contains a secret.
    pub fn describe(&self) -> String {
        let endpoint = self.inner.endpoint.as_str().trim_end_matches('/');
        let auth = self.inner.auth.label();
        match &self.inner.account {
            Some(a) => format!("account {a} at {endpoint} ({auth})"),
            None => format!("{endpoint} ({auth})"),
        }
    }
}

/// The HTTP client with timeouts, and retries kept short.
fn client_options() -> Result<ClientOptions, QueueError> {
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| QueueError::config(format!("cannot build the HTTP client: {e}")))?;
    Ok(ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: time::Duration::milliseconds(200),
            max_retries: SDK_RETRIES,
            max_total_elapsed: time::Duration::try_from(SDK_RETRY_BUDGET)
                .unwrap_or(time::Duration::seconds(5)),
            max_delay: time::Duration::seconds(2),
        }),
        ..Default::default()
    })
}

/// The token endpoint (IMDS and friends) gets the same timeouts; its retry
/// policy stays the SDK's, which knows the managed-identity-specific codes.
fn credential_client_options() -> Result<ClientOptions, QueueError> {
    let base = client_options()?;
    Ok(ClientOptions {
        transport: base.transport,
        ..Default::default()
    })
}

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
    service: Arc<ServiceInner>,
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
        let err = classify_error(
            op,
            &self.name,
            &self.service.auth,
            &self.service.endpoint,
            &e,
        );
        tracing::debug!(queue = %self.name, op, error = %err, "queue operation failed");
        err
    }
}

fn count_u32(n: Option<i64>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// The service's error code (`x-ms-error-code`), if the error is a response.
fn error_code(e: &azure_core::Error) -> Option<String> {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

fn classify_error(
    op: &str,
    queue: &str,
    auth: &AuthMode,
    endpoint: &Url,
    e: &azure_core::Error,
) -> QueueError {
    use azure_core::error::ErrorKind;
    let host = endpoint.host_str().unwrap_or("");
    let port = endpoint
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let code = error_code.as_deref().unwrap_or("");
            let status_num = u16::from(*status);
            let what = if code.is_empty() {
                format!("{status_num}")
            } else {
                format!("{status_num} {code}")
            };
            match (*status, code) {
                (StatusCode::BadRequest, "PopReceiptMismatch") => QueueError::LeaseLost {
                    detail: format!("{op} on `{queue}`: {what}"),
                    gone: false,
                },
                (StatusCode::NotFound, "MessageNotFound") => QueueError::LeaseLost {
                    detail: format!("{op} on `{queue}`: {what}"),
                    gone: true,
                },
                (StatusCode::NotFound, "QueueNotFound") => QueueError::QueueNotFound {
                    queue: queue.to_owned(),
                },
                (StatusCode::Unauthorized | StatusCode::Forbidden, _) => QueueError::Auth {
                    detail: format!("{op} on `{queue}` was refused ({what}): {}", auth.fix_hint()),
                },
                (StatusCode::Conflict, "QueueBeingDeleted") => QueueError::Transient {
                    detail: format!("{op} on `{queue}`: {what} (the queue is being deleted; retry in a minute)"),
                },
                (
                    StatusCode::RequestTimeout
                    | StatusCode::TooManyRequests
                    | StatusCode::InternalServerError
                    | StatusCode::BadGateway
                    | StatusCode::ServiceUnavailable
                    | StatusCode::GatewayTimeout,
                    _,
                ) => QueueError::Transient {
                    detail: format!("{op} on `{queue}`: {what}"),
                },
                (_, "OutOfRangeInput" | "InvalidResourceName") if status_num < 500 => {
                    QueueError::Other {
                        detail: format!(
                            "{op} on `{queue}` was rejected ({what}); check the queue name and endpoint path"
                        ),
                    }
                }
                (_, "RequestBodyTooLarge" | "MessageTooLarge") => QueueError::Other {
                    detail: format!(
                        "{op} on `{queue}` was rejected ({what}): queue messages are limited to 64 KiB"
                    ),
                },
                _ => QueueError::Other {
                    detail: format!("{op} on `{queue}` failed: {what}"),
                },
            }
        }
        ErrorKind::Connection | ErrorKind::Io => QueueError::Transient {
            detail: format!(
                "{op} on `{queue}`: cannot reach {host}{port}: {}",
                describe_azure_error(e)
            ),
        },
        ErrorKind::Credential => QueueError::Auth {
            detail: format!(
                "{op} on `{queue}`: no token from the managed identity ({}); assign a managed \
                 identity to this container or VM (for a user-assigned one set {CLIENT_ID_VAR} to \
                 its client id), or set {CONNECTION_STRING_VAR} instead",
                describe_azure_error(e),
            ),
        },
        ErrorKind::DataConversion | ErrorKind::Other => QueueError::Other {
            detail: format!("{op} on `{queue}`: {}", describe_azure_error(e)),
        },
        #[allow(unreachable_patterns)]
        _ => QueueError::Other {
            detail: format!("{op} on `{queue}`: {}", describe_azure_error(e)),
        },
    }
}

/// Wrappers the SDK puts around the actual cause; they add nothing for an operator.
const SDK_BOILERPLATE: &[&str] = &[
    "retry policy expired and the request will no longer be retried",
    "non-transport error occurred which will not be retried",
    "failed to execute `reqwest` request",
    "client error (Connect)",
];

/// An error and its causes on one line, without request URLs (which would
/// carry a SAS token) and without the `Debug` backtrace.
pub fn describe_azure_error(e: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        let text = if let Some(r) = s.downcast_ref::<reqwest::Error>() {
            // reqwest's Display includes the URL; say what kind of failure it was instead.
            if r.is_timeout() {
                "timed out".to_owned()
            } else if r.is_connect() {
                "connection failed".to_owned()
            } else if r.is_request() {
                "request failed".to_owned()
            } else {
                "HTTP error".to_owned()
            }
        } else {
            s.to_string()
        };
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty()
            && !SDK_BOILERPLATE.contains(&text.as_str())
            && parts.last() != Some(&text)
        {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.kind().to_string());
    }
    redact_sas(&parts.join(": "))
}

/// Replaces the value of any `sig=` query parameter: a last guard in case a
/// URL with a SAS token ends up in an error text.
fn redact_sas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("sig=") {
        let (head, tail) = rest.split_at(i + 4);
        out.push_str(head);
        out.push_str("REDACTED");
        let end = tail.find(['&', ')', ' ', '"', '\'']).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cs: &str) -> StorageSettings {
        StorageSettings {
            connection_string: Some(Secret::new(cs)),
            ..Default::default()
        }
    }

    #[test]
    fn describe_names_account_endpoint_and_auth_but_no_secret() {
        let s = QueueService::new(&settings("UseDevelopmentStorage=true")).unwrap();
        assert_eq!(
            s.describe(),
            "account devstoreaccount1 at http://127.0.0.1:10001/devstoreaccount1 (shared key)"
        );
        let s = QueueService::new(&settings(
            "QueueEndpoint=https://acme.queue.core.windows.net/;SharedAccessSignature=sv=1&sig=topsecret",
        ))
        .unwrap();
        assert_eq!(s.describe(), "https://acme.queue.core.windows.net (SAS)");
        assert!(!format!("{s:?}").contains("topsecret"));
    }

    #[test]
    fn managed_identity_settings() {
        let s = QueueService::new(&StorageSettings {
            account: Some("acme".into()),
            managed_identity_client_id: Some("0000-1111".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.describe(),
            "account acme at https://acme.queue.core.windows.net (managed identity, client id 0000-1111)"
        );
        let s = QueueService::new(&StorageSettings {
            queue_endpoint: Some("https://acme.queue.core.windows.net/".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.describe(),
            "https://acme.queue.core.windows.net (managed identity, system-assigned)"
        );
        let e = QueueService::new(&StorageSettings {
            queue_endpoint: Some("http://127.0.0.1:10001/devstoreaccount1".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, QueueError::Config { .. }));
        assert!(e.to_string().contains(QUEUE_ENDPOINT_VAR), "{e}");
    }

    #[test]
    fn connection_string_wins_and_errors_name_settings() {
        let e = QueueService::new(&StorageSettings::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(CONNECTION_STRING_VAR) && msg.contains(QUEUE_ENDPOINT_VAR),
            "{msg}"
        );
        let e =
            QueueService::new(&settings("AccountName=acme;AccountKey=bm90IGEga2V5!")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(CONNECTION_STRING_VAR) && !msg.contains("bm90IGEga2V5"),
            "{msg}"
        );
        let s = QueueService::new(&StorageSettings {
            connection_string: Some(Secret::new("UseDevelopmentStorage=true")),
            account: Some("other".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(s.describe().contains("shared key"));
    }

    #[test]
    fn queue_names_are_checked() {
        let s = QueueService::new(&settings("UseDevelopmentStorage=true")).unwrap();
        assert_eq!(s.queue("acme-tasks").unwrap().name(), "acme-tasks");
        let e = s.queue("Acme").unwrap_err();
        assert!(matches!(e, QueueError::Config { .. }), "{e}");
    }

    #[test]
    fn sas_signatures_are_redacted() {
        assert_eq!(
            redact_sas("error sending request for url (http://h/q?sv=1&sig=abc%2B&se=2) x"),
            "error sending request for url (http://h/q?sv=1&sig=REDACTED&se=2) x"
        );
        assert_eq!(redact_sas("no secret here"), "no secret here");
        assert_eq!(redact_sas("a sig=x"), "a sig=REDACTED");
    }

    #[test]
    fn transient_classification() {
        assert!(QueueError::Transient { detail: "x".into() }.is_transient());
        assert!(!QueueError::LeaseLost {
            detail: "x".into(),
            gone: false
        }
        .is_transient());
        assert!(!QueueError::Auth { detail: "x".into() }.is_transient());
    }
}
