//! Claim checks: payloads too large for a queue message, kept as blobs in a
//! container of the same storage account.
//!
//! A queue message holds 64 KiB; a task's outcome may be far larger. The
//! outbox stores such an outcome here first and queues a small pointer to it
//! (see `outbox.rs`). [`ClaimStore`] is that container: put a payload under a
//! name, get it back (a missing one is `None`, so the caller can tell "gone"
//! from "unreachable"), delete it (already gone counts as done). The container
//! is created on the first put that finds it missing, as queues are on the
//! first send.
//!
//! It reaches the account the way the queue client does, from the same
//! settings: the same HTTP client, timeouts and short SDK retries, the same
//! Shared Key or SAS policy, or the same managed identity (which then also
//! needs the "Storage Blob Data Contributor" role). Only the endpoint differs:
//! `BlobEndpoint=` in the connection string or derived from it (see
//! `connection.rs`), or for a managed identity the account's
//! `https://ACCOUNT.blob.SUFFIX`. When no blob endpoint can be known, the
//! store still exists and every call fails with a configuration error naming
//! what to set, so small payloads (which never need it) keep working.
//!
//! Large blobs move in parts of at most [`PART`], one request at a time: each
//! request then fits the client's 10 s request timeout down to about 4 Mbit/s
//! (the SDK's default of 8+ parts in parallel would need eight times that).

use std::num::NonZero;
use std::sync::Arc;

use azure_core::http::{NoFormat, RequestContent, Url};
use azure_core::Bytes;
use azure_storage_blob::models::{BlobClientDownloadOptions, BlobClientUploadOptions};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};

use super::connection::{self, blob_endpoint_beside, CONNECTION_STRING_VAR};
use super::error::{classify_error, describe_azure_error, error_code, ErrorContext, QueueError};
use super::names::validate_queue_name;
use super::service::{access, Access, AuthMode};
use super::settings::{StorageSettings, ACCOUNT_VAR, CLIENT_ID_VAR, QUEUE_ENDPOINT_VAR};

/// Largest part of a blob one request carries (the SDK's default).
const PART: usize = 4 * 1024 * 1024;
/// Parts in flight at once for one blob.
const ONE: NonZero<usize> = NonZero::<usize>::MIN;

/// One blob container of claim-checked payloads. Cheap to clone.
#[derive(Clone)]
pub struct ClaimStore {
    container: Arc<str>,
    /// The client, or why there is none (a configuration error's text).
    client: Result<Arc<Client>, Arc<str>>,
}

struct Client {
    container: BlobContainerClient,
    name: String,
    errors: ErrorContext,
}

impl std::fmt::Debug for ClaimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClaimStore").field(&self.container).finish()
    }
}

impl ClaimStore {
    /// The container `container` (named like a queue: 3–63 lowercase letters,
    /// digits and single hyphens) of the account `s` reaches. No request is
    /// made. Fails only for settings the queue client would refuse too, or a
    /// bad container name; an unknown blob endpoint surfaces on first use.
    pub fn new(s: &StorageSettings, container: &str) -> Result<Self, QueueError> {
        validate_queue_name(container)
            .map_err(|e| QueueError::config(format!("blob container: {e}")))?;
        let (access, options) = access(s)?;
        let client = match blob_endpoint(s, &access) {
            Ok(endpoint) => Ok(Arc::new(Client::new(endpoint, container, access, options)?)),
            Err(why) => Err(Arc::from(why)),
        };
        Ok(Self {
            container: Arc::from(container),
            client,
        })
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// Writes `bytes` as blob `name`, replacing any blob of that name, and
    /// creates the container when it is missing.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), QueueError> {
        let c = self.client()?;
        let blob = c.container.blob_client(name);
        let bytes = Bytes::from(bytes);
        match blob
            .upload(content(bytes.clone()), Some(upload_options()))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if error_code(&e).as_deref() == Some("ContainerNotFound") => {}
            Err(e) => return Err(c.classify("write blob", name, e)),
        }
        match c.container.create(None).await {
            Ok(_) => {}
            Err(e) if error_code(&e).as_deref() == Some("ContainerAlreadyExists") => {}
            Err(e) => return Err(c.classify("create container", "", e)),
        }
        blob.upload(content(bytes), Some(upload_options()))
            .await
            .map(|_| ())
            .map_err(|e| c.classify("write blob", name, e))
    }

    /// The content of blob `name`; `None` when it (or the container) does
    /// not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let c = self.client()?;
        let options = BlobClientDownloadOptions {
            parallel: Some(ONE),
            partition_size: NonZero::new(PART),
            ..Default::default()
        };
        let rsp = match c.container.blob_client(name).download(Some(options)).await {
            Ok(rsp) => rsp,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(c.classify("read blob", name, e)),
        };
        let body = rsp
            .body
            .collect()
            .await
            .map_err(|e| c.classify("read blob", name, e))?;
        Ok(Some(body.to_vec()))
    }

    /// Deletes blob `name`; one that does not exist counts as deleted.
    pub async fn delete(&self, name: &str) -> Result<(), QueueError> {
        let c = self.client()?;
        match c.container.blob_client(name).delete(None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(c.classify("delete blob", name, e)),
        }
    }

    fn client(&self) -> Result<&Client, QueueError> {
        self.client
            .as_deref()
            .map_err(|why| QueueError::config(why.to_string()))
    }
}

impl Client {
    fn new(
        endpoint: Url,
        container: &str,
        access: Access,
        options: azure_core::http::ClientOptions,
    ) -> Result<Self, QueueError> {
        let mut url = endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| {
                QueueError::config(format!("the blob endpoint {endpoint} cannot hold a path"))
            })?
            .pop_if_empty()
            .push(container);
        let client = BlobContainerClient::new(
            url,
            access.credential,
            Some(BlobContainerClientOptions {
                client_options: options,
                ..Default::default()
            }),
        )
        .map_err(|e| {
            QueueError::config(format!(
                "cannot create the blob client: {}",
                describe_azure_error(&e)
            ))
        })?;
        Ok(Self {
            container: client,
            name: container.to_owned(),
            errors: ErrorContext {
                endpoint,
                auth_hint: auth_hint(&access.auth, container),
            },
        })
    }

    fn classify(&self, op: &str, blob: &str, e: azure_core::Error) -> QueueError {
        let what = if blob.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{blob}", self.name)
        };
        let err = classify_error(op, &what, &self.errors, &e);
        tracing::debug!(blob = %what, op, error = %err, "blob operation failed");
        err
    }
}

fn upload_options() -> BlobClientUploadOptions<'static> {
    BlobClientUploadOptions {
        parallel: Some(ONE),
        partition_size: NonZero::new(PART as u64),
        ..Default::default()
    }
}

/// The request body, shared (not copied) between a write and its retry.
fn content(bytes: Bytes) -> RequestContent<Bytes, NoFormat> {
    <RequestContent<Bytes, NoFormat> as From<Bytes>>::from(bytes)
}

fn is_not_found(e: &azure_core::Error) -> bool {
    matches!(
        error_code(e).as_deref(),
        Some("BlobNotFound" | "ContainerNotFound")
    ) || (e.http_status() == Some(azure_core::http::StatusCode::NotFound)
        && error_code(e).is_none())
}

/// The blob service next to the queue service `access` reaches, or why it
/// cannot be known (a message naming what to set).
fn blob_endpoint(s: &StorageSettings, access: &Access) -> Result<Url, String> {
    if let Some(cs) = &s.connection_string {
        // `access` parsed the same string already, so this cannot fail here.
        let parsed = connection::parse(cs.expose())?;
        return parsed.blob_endpoint.ok_or_else(|| {
            format!(
                "{CONNECTION_STRING_VAR} names a QueueEndpoint but no BlobEndpoint; outcomes too \
                 large for a queue message are kept in a blob container of the same account: add \
                 BlobEndpoint=… (Azurite serves blobs on port 10000 by default)"
            )
        });
    }
    let derived = blob_endpoint_beside(&access.endpoint).or_else(|| {
        let account = s.account.as_deref()?;
        let queue = connection::account_endpoint(account, "https", "core.windows.net").ok()?;
        blob_endpoint_beside(&queue)
    });
    derived.ok_or_else(|| {
        format!(
            "{QUEUE_ENDPOINT_VAR} is not of the form https://ACCOUNT.queue.SUFFIX, so the blob \
             endpoint of the account is unknown; outcomes too large for a queue message are kept \
             in a blob container there: set {ACCOUNT_VAR} as well"
        )
    })
}

/// What to check when the blob service refuses the credentials.
fn auth_hint(auth: &AuthMode, container: &str) -> String {
    let why =
        format!("outcomes too large for a queue message are kept in blob container `{container}`");
    match auth {
        AuthMode::SharedKey => format!(
            "check the AccountName/AccountKey in {CONNECTION_STRING_VAR} (was the key rotated?) \
             and that the machine clock is correct"
        ),
        AuthMode::Sas => format!(
            "the SharedAccessSignature in {CONNECTION_STRING_VAR} is expired or does not cover \
             the blob service ({why}: it needs ss to include b, srt=co, and permissions r, w, c \
             and d)"
        ),
        AuthMode::ManagedIdentity { .. } => format!(
            "give the managed identity (system-assigned, or {CLIENT_ID_VAR} for a user-assigned one) \
             the \"Storage Blob Data Contributor\" role on the storage account, next to \"Storage \
             Queue Data Contributor\" ({why})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn with_cs(cs: &str) -> StorageSettings {
        StorageSettings {
            connection_string: Some(Secret::new(cs)),
            ..Default::default()
        }
    }

    fn url_of(store: &ClaimStore) -> String {
        store.client.as_ref().unwrap().container.url().to_string()
    }

    #[test]
    fn container_urls_from_each_kind_of_setting() {
        let s = ClaimStore::new(&with_cs("UseDevelopmentStorage=true"), "acme-webhooks").unwrap();
        assert_eq!(
            url_of(&s),
            "http://127.0.0.1:10000/devstoreaccount1/acme-webhooks"
        );
        let s = ClaimStore::new(
            &with_cs("AccountName=acme;SharedAccessSignature=sv=1&sig=x"),
            "acme-webhooks",
        )
        .unwrap();
        assert_eq!(
            url_of(&s),
            "https://acme.blob.core.windows.net/acme-webhooks"
        );
        for mi in [
            StorageSettings {
                account: Some("acme".into()),
                ..Default::default()
            },
            StorageSettings {
                queue_endpoint: Some("https://acme.queue.core.windows.net/".into()),
                ..Default::default()
            },
            StorageSettings {
                queue_endpoint: Some("https://private.example.net/".into()),
                account: Some("acme".into()),
                ..Default::default()
            },
        ] {
            let s = ClaimStore::new(&mi, "acme-webhooks").unwrap();
            assert_eq!(
                url_of(&s),
                "https://acme.blob.core.windows.net/acme-webhooks",
                "{mi:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_blob_endpoint_fails_on_use_naming_the_setting() {
        let s = ClaimStore::new(
            &with_cs(&format!(
                "AccountName=acme;AccountKey={};QueueEndpoint=http://127.0.0.1:1/acme",
                connection::DEV_ACCOUNT_KEY
            )),
            "acme-webhooks",
        )
        .unwrap();
        let e = s.put("x", b"y".to_vec()).await.unwrap_err();
        assert!(matches!(e, QueueError::Config { .. }), "{e}");
        assert!(e.to_string().contains("BlobEndpoint"), "{e}");
        assert!(!e.to_string().contains(connection::DEV_ACCOUNT_KEY), "{e}");
        let mi = StorageSettings {
            queue_endpoint: Some("https://private.example.net/".into()),
            ..Default::default()
        };
        let e = ClaimStore::new(&mi, "acme-webhooks")
            .unwrap()
            .get("x")
            .await
            .unwrap_err();
        assert!(e.to_string().contains(ACCOUNT_VAR), "{e}");
        assert!(ClaimStore::new(&mi, "Bad_Name").is_err());
    }

    #[test]
    fn managed_identity_hint_names_the_blob_role() {
        let hint = auth_hint(
            &AuthMode::ManagedIdentity { client_id: None },
            "acme-webhooks",
        );
        assert!(hint.contains("Storage Blob Data Contributor"), "{hint}");
        assert!(hint.contains("acme-webhooks"), "{hint}");
    }
}
