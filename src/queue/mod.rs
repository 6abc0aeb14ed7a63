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
//!
//! # Layout
//!
//! - `settings`: [`StorageSettings`], how to reach the account, as `config` builds it.
//! - `service`: [`QueueService`], the HTTP client with timeouts and short
//!   retries, and authorization (Shared Key, SAS, managed identity).
//! - `operations`: [`Queue`], the calls on one queue and the messages they return.
//! - `error`: [`QueueError`], how SDK errors map to it, SAS-free error texts.
//! - `blob`: [`ClaimStore`], the account's blob container for outbox entries
//!   too large for a queue message (`azure_storage_blob` 1.x, same client
//!   setup and authorization as the queues).
//! - [`connection`]: connection strings and endpoints.
//! - [`shared_key`]: the Shared Key signing and SAS pipeline policies.
//! - [`names`]: queue names: the per-client tasks, poison and outbox queues, Azure's rules.
//! - `startup`: patience with a managed identity whose endpoint is not ready
//!   when the container starts (token and connection failures are retried for
//!   `WORKER_IDENTITY_WAIT` until the service first answers).

mod blob;
pub mod connection;
mod error;
pub mod names;
mod operations;
mod service;
mod settings;
pub mod shared_key;
mod startup;

pub use blob::ClaimStore;
pub use error::{describe_azure_error, QueueError};
pub use names::{poison_queue, tasks_queue, validate_queue_name, webhooks_queue};
pub use operations::{Message, PeekedMessage, Queue, SentMessage, MAX_BATCH, MAX_VISIBILITY};
pub use service::{QueueService, CONNECT_TIMEOUT, REQUEST_TIMEOUT, SDK_RETRIES};
pub use settings::{StorageSettings, ACCOUNT_VAR, CLIENT_ID_VAR, QUEUE_ENDPOINT_VAR};
pub use startup::IDENTITY_WAIT_VAR;
