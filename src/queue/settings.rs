//! How to reach the storage account: the settings `config` fills in, and the
//! env vars that name them in error messages.

use crate::secret::Secret;

/// Env var for the Entra ID queue endpoint.
pub const QUEUE_ENDPOINT_VAR: &str = "AZURE_STORAGE_QUEUE_ENDPOINT";
/// Env var for the Entra ID account name (endpoint derived from it).
pub const ACCOUNT_VAR: &str = "AZURE_STORAGE_ACCOUNT";
/// Env var for a user-assigned managed identity's client id.
pub const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";

/// How to reach the storage account; `config` builds it from the options.
#[derive(Clone, Debug, Default)]
pub struct StorageSettings {
    pub connection_string: Option<Secret>,
    pub queue_endpoint: Option<String>,
    pub account: Option<String>,
    pub managed_identity_client_id: Option<String>,
    /// With a managed identity: how long after start-up token and
    /// connection failures are retried (`WORKER_IDENTITY_WAIT`, see
    /// `startup`). Zero: not at all.
    pub identity_wait: std::time::Duration,
}

impl StorageSettings {
    /// Empty values count as unset (`AZURE_CLIENT_ID=` in a template is common).
    /// Whether any way to reach storage is configured.
    pub fn is_configured(&self) -> bool {
        self.connection_string.is_some() || self.queue_endpoint.is_some() || self.account.is_some()
    }
}
