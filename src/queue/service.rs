//! Reaching the queue service: the HTTP client with its timeouts and short
//! retries, and how requests are authorized (Shared Key or SAS policies in
//! the pipeline, or an Entra ID token from a managed identity).

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport, Url};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_queue::{QueueServiceClient, QueueServiceClientOptions};

use super::connection::{self, Credential, CONNECTION_STRING_VAR};
use super::error::{describe_azure_error, ErrorContext, QueueError};
use super::names::validate_queue_name;
use super::operations::Queue;
use super::settings::{StorageSettings, ACCOUNT_VAR, CLIENT_ID_VAR, QUEUE_ENDPOINT_VAR};
use super::shared_key::{SasPolicy, SharedKeyPolicy};
use super::startup::StartupPatience;
use crate::secret::Secret;

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

/// How requests are authorized; kept for descriptions and error hints.
#[derive(Clone, Debug)]
pub(super) enum AuthMode {
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
    account: Option<String>,
    auth: AuthMode,
    /// Shared with every [`Queue`] of this account.
    errors: Arc<ErrorContext>,
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
        let (access, options) = access(s)?;
        let Access {
            endpoint,
            account,
            auth,
            credential,
        } = access;
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
                account,
                errors: Arc::new(ErrorContext {
                    endpoint,
                    auth_hint: auth.fix_hint(),
                }),
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
        Ok(Queue::new(name, client, self.inner.errors.clone()))
    }

    /// One line for logs and `worker check`; never contains a secret.
    pub fn describe(&self) -> String {
        let endpoint = self.inner.errors.endpoint.as_str().trim_end_matches('/');
        let auth = self.inner.auth.label();
        match &self.inner.account {
            Some(a) => format!("account {a} at {endpoint} ({auth})"),
            None => format!("{endpoint} ({auth})"),
        }
    }
}

/// Where requests go and how they are authorized, before the client exists.
pub(super) struct Access {
    pub(super) endpoint: Url,
    pub(super) account: Option<String>,
    pub(super) auth: AuthMode,
    /// Only for Entra ID; a connection string's key or SAS is applied by a
    /// pipeline policy instead, because the SDK knows only tokens.
    pub(super) credential: Option<Arc<dyn TokenCredential>>,
}

/// How to reach the account's queue service from the settings, and the
/// client options with the timeouts, short retries and any signing policy:
/// a connection string when set, otherwise Entra ID with a managed identity.
/// The blob client (`blob.rs`) starts from the same and swaps the endpoint.
pub(super) fn access(s: &StorageSettings) -> Result<(Access, ClientOptions), QueueError> {
    let mut options = client_options()?;
    let access = if let Some(cs) = &s.connection_string {
        Access::connection_string(cs, &mut options)?
    } else if s.queue_endpoint.is_some() || s.account.is_some() {
        // Outside the SDK's retries and the token policy: see `startup`.
        options
            .per_call_policies
            .push(StartupPatience::new(s.identity_wait));
        Access::managed_identity(s)?
    } else {
        return Err(QueueError::config(format!(
            "no storage account configured: set {CONNECTION_STRING_VAR}, or {QUEUE_ENDPOINT_VAR} \
             (or {ACCOUNT_VAR}) to use a managed identity"
        )));
    };
    Ok((access, options))
}

impl Access {
    /// Adds the Shared Key or SAS policy to `options`.
    fn connection_string(cs: &Secret, options: &mut ClientOptions) -> Result<Self, QueueError> {
        let parsed = connection::parse(cs.expose()).map_err(QueueError::config)?;
        let auth = match &parsed.credential {
            Credential::SharedKey { account, key } => {
                let policy = SharedKeyPolicy::new(account, key)
                    .map_err(|e| QueueError::config(format!("{CONNECTION_STRING_VAR}: {e}")))?;
                // Per try: the signature covers x-ms-date, which each retry renews.
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
        Ok(Access {
            endpoint: parsed.endpoint,
            account: parsed.account,
            auth,
            credential: None,
        })
    }

    fn managed_identity(s: &StorageSettings) -> Result<Self, QueueError> {
        let endpoint = managed_identity_endpoint(s)?;
        let client_id = s.managed_identity_client_id.clone();
        let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
            client_options: credential_client_options()?,
        }))
        .map_err(|e| {
            QueueError::config(format!(
                "cannot set up the managed identity credential ({CLIENT_ID_VAR}): {}",
                describe_azure_error(&e)
            ))
        })?;
        Ok(Access {
            endpoint,
            account: s.account.clone(),
            auth: AuthMode::ManagedIdentity { client_id },
            credential: Some(credential),
        })
    }
}

/// The explicit endpoint wins over one derived from the account name; either
/// must be https, because a bearer token must never cross the wire in clear.
fn managed_identity_endpoint(s: &StorageSettings) -> Result<Url, QueueError> {
    let endpoint = match &s.queue_endpoint {
        Some(e) => connection::parse_endpoint(e, QUEUE_ENDPOINT_VAR).map_err(QueueError::config)?,
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
    Ok(endpoint)
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
    fn managed_identity_endpoint_prefers_the_explicit_one() {
        let both = StorageSettings {
            queue_endpoint: Some("https://q.example.net/".into()),
            account: Some("acme".into()),
            ..Default::default()
        };
        let url = managed_identity_endpoint(&both).unwrap();
        assert_eq!(url.as_str(), "https://q.example.net/");
        let account_only = StorageSettings {
            account: Some("acme".into()),
            ..Default::default()
        };
        let url = managed_identity_endpoint(&account_only).unwrap();
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some("acme.queue.core.windows.net"));
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
}
