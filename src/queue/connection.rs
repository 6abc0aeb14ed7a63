//! Where the queue service is and how to authorize against it, from
//! `AZURE_STORAGE_CONNECTION_STRING` or from an endpoint for Entra ID.
//!
//! Connection strings come in several shapes depending on who handed them out:
//! the portal (`DefaultEndpointsProtocol=https;AccountName=…;AccountKey=…;EndpointSuffix=…`),
//! Azurite and other emulators (an explicit `QueueEndpoint=` with the account
//! as the first path segment, or the `UseDevelopmentStorage=true` shorthand),
//! and SAS-based strings (`SharedAccessSignature=…` with an endpoint or an
//! account name). Keys are case-insensitive and values may contain `=` (base64
//! keys end with it), so each `;`-separated part is split at its first `=`.
//!
//! The blob service of the same account (where the outbox keeps outcomes too
//! large for a queue message) comes from `BlobEndpoint=`, or is derived the
//! same way: from the account name and suffix, from a `QueueEndpoint` of the
//! form `ACCOUNT.queue.SUFFIX`, or Azurite's port 10000. A string that names
//! only a custom `QueueEndpoint` has no blob service; the outbox says so when
//! it needs one.
//!
//! No error in this module includes any part of the connection string: a
//! typo'd key name next to the account key must not put the key in a log.

use base64::Engine;
use url::Url;

use crate::secret::Secret;

/// The variable that holds the connection string; errors name it.
pub const CONNECTION_STRING_VAR: &str = "AZURE_STORAGE_CONNECTION_STRING";

/// Azurite's (and the old storage emulator's) fixed account.
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known account key. Public by design: it is printed in
/// Microsoft's documentation and only opens a local emulator.
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Azurite's default queue endpoint (path-style: account in the path).
pub const DEV_QUEUE_ENDPOINT: &str = "http://127.0.0.1:10001/devstoreaccount1";
/// Azurite's default blob endpoint.
pub const DEV_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

const DEV_QUEUE_PORT: u16 = 10001;
const DEV_BLOB_PORT: u16 = 10000;
const DEFAULT_ENDPOINT_SUFFIX: &str = "core.windows.net";

/// How requests are authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Storage Shared Key: every request signed with the account key.
    SharedKey { account: String, key: Secret },
    /// A shared access signature: a query string appended to every request.
    Sas(Secret),
}

/// A parsed connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionString {
    /// Queue service URL, normalized (no trailing slash, no query).
    pub endpoint: Url,
    /// Blob service URL of the same account, when the string gives or implies one.
    pub blob_endpoint: Option<Url>,
    /// The account name, when the string names one.
    pub account: Option<String>,
    pub credential: Credential,
}

/// Parses a connection string. Errors name [`CONNECTION_STRING_VAR`] and what
/// is missing or malformed, never a value.
pub fn parse(raw: &str) -> Result<ConnectionString, String> {
    let fields = Fields(split(raw)?);
    if fields
        .get("usedevelopmentstorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return development_storage(&fields);
    }
    let account = account_name(&fields)?;
    let endpoint = endpoint(&fields, account.as_deref())?;
    let blob_endpoint = blob_endpoint(&fields, &endpoint)?;
    let credential = credential(&fields, account.as_deref())?;
    Ok(ConnectionString {
        endpoint,
        blob_endpoint,
        account,
        credential,
    })
}

/// The parts of a connection string, keys lowercased.
struct Fields(Vec<(String, String)>);

impl Fields {
    /// The value of `key`; when a key repeats, the last one counts.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `UseDevelopmentStorage=true`: Azurite's fixed account and key, on the
/// proxy's host when one is given.
fn development_storage(fields: &Fields) -> Result<ConnectionString, String> {
    let on_port = |default: &str, port: u16| match fields.get("developmentstorageproxyuri") {
        Some(proxy) => {
            let mut url = parse_endpoint(proxy, "DevelopmentStorageProxyUri").map_err(in_var)?;
            url.set_port(Some(port)).map_err(|()| {
                format!("DevelopmentStorageProxyUri in {CONNECTION_STRING_VAR} cannot take a port")
            })?;
            url.set_path(&format!("/{DEV_ACCOUNT}"));
            Ok(url)
        }
        None => parse_endpoint(default, "UseDevelopmentStorage").map_err(in_var),
    };
    Ok(ConnectionString {
        endpoint: on_port(DEV_QUEUE_ENDPOINT, DEV_QUEUE_PORT)?,
        blob_endpoint: Some(on_port(DEV_BLOB_ENDPOINT, DEV_BLOB_PORT)?),
        account: Some(DEV_ACCOUNT.into()),
        credential: Credential::SharedKey {
            account: DEV_ACCOUNT.into(),
            key: Secret::new(DEV_ACCOUNT_KEY),
        },
    })
}

fn account_name(fields: &Fields) -> Result<Option<String>, String> {
    let account = fields
        .get("accountname")
        .filter(|a| !a.is_empty())
        .map(str::to_owned);
    if let Some(a) = &account {
        if !a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "AccountName in {CONNECTION_STRING_VAR} contains characters an account name cannot have"
            ));
        }
    }
    Ok(account)
}

/// An explicit `QueueEndpoint` wins; otherwise the endpoint is derived from
/// the account name, protocol and suffix, as the portal's strings expect.
fn endpoint(fields: &Fields, account: Option<&str>) -> Result<Url, String> {
    if let Some(e) = fields.get("queueendpoint").filter(|e| !e.is_empty()) {
        return parse_endpoint(e, "QueueEndpoint").map_err(in_var);
    }
    let Some(account) = account else {
        return Err(format!(
            "{CONNECTION_STRING_VAR} has neither QueueEndpoint nor AccountName, so the queue \
             service address is unknown; copy the full connection string from the storage \
             account's Access keys page, or use UseDevelopmentStorage=true for Azurite"
        ));
    };
    let protocol = fields
        .get("defaultendpointsprotocol")
        .unwrap_or("https")
        .to_ascii_lowercase();
    if protocol != "https" && protocol != "http" {
        return Err(format!(
            "DefaultEndpointsProtocol in {CONNECTION_STRING_VAR} must be https or http"
        ));
    }
    let suffix = fields
        .get("endpointsuffix")
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_ENDPOINT_SUFFIX);
    account_endpoint(account, &protocol, suffix)
        .map_err(|e| format!("{CONNECTION_STRING_VAR}: {e}"))
}

/// An explicit `BlobEndpoint` wins; otherwise the one next to the queue
/// endpoint (`ACCOUNT.queue.SUFFIX` becomes `ACCOUNT.blob.SUFFIX`, which
/// covers endpoints derived from the account name too).
fn blob_endpoint(fields: &Fields, queue: &Url) -> Result<Option<Url>, String> {
    if let Some(e) = fields.get("blobendpoint").filter(|e| !e.is_empty()) {
        return parse_endpoint(e, "BlobEndpoint").map(Some).map_err(in_var);
    }
    Ok(blob_endpoint_beside(queue))
}

/// The blob endpoint of the account whose queue endpoint is `queue`, when
/// its host says so (`ACCOUNT.queue.SUFFIX`, scheme, port and path kept).
pub fn blob_endpoint_beside(queue: &Url) -> Option<Url> {
    let host = queue.host_str()?;
    let (account, rest) = host.split_once('.')?;
    let suffix = rest.strip_prefix("queue.")?;
    if account.is_empty() || suffix.is_empty() {
        return None;
    }
    let mut blob = queue.clone();
    blob.set_host(Some(&format!("{account}.blob.{suffix}")))
        .ok()?;
    Some(blob)
}

/// An `AccountKey` wins over a `SharedAccessSignature` given next to it.
fn credential(fields: &Fields, account: Option<&str>) -> Result<Credential, String> {
    if let Some(key) = fields.get("accountkey").filter(|k| !k.is_empty()) {
        let Some(account) = account else {
            return Err(format!(
                "{CONNECTION_STRING_VAR} has an AccountKey but no AccountName; Shared Key signing needs both"
            ));
        };
        if base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_err()
        {
            return Err(format!(
                "AccountKey in {CONNECTION_STRING_VAR} is not valid base64; copy the key again \
                 from the storage account's Access keys page"
            ));
        }
        return Ok(Credential::SharedKey {
            account: account.to_owned(),
            key: Secret::new(key),
        });
    }
    if let Some(sas) = fields
        .get("sharedaccesssignature")
        .filter(|s| !s.is_empty())
    {
        let sas = sas.trim_start_matches('?');
        if !sas.split('&').any(|p| p.starts_with("sig=")) {
            return Err(format!(
                "SharedAccessSignature in {CONNECTION_STRING_VAR} has no `sig=` parameter; \
                 copy the whole SAS token"
            ));
        }
        return Ok(Credential::Sas(Secret::new(sas)));
    }
    Err(format!(
        "{CONNECTION_STRING_VAR} has neither AccountKey nor SharedAccessSignature; add one, \
         or unset it and use a managed identity (AZURE_STORAGE_QUEUE_ENDPOINT or AZURE_STORAGE_ACCOUNT)"
    ))
}

fn in_var(e: String) -> String {
    format!("{e} (in {CONNECTION_STRING_VAR})")
}

/// `Key=Value;…` into lowercase keys and raw values.
fn split(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut s = raw.trim();
    // .env files and shell habits leave the whole string quoted.
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            s = s[1..s.len() - 1].trim();
        }
    }
    if s.is_empty() {
        return Err(format!("{CONNECTION_STRING_VAR} is empty"));
    }
    let mut out = Vec::new();
    for (i, part) in s.split(';').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!(
                "part {} of {CONNECTION_STRING_VAR} has no `=`; expected Key=Value pairs separated by `;`",
                i + 1
            ));
        };
        out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(out)
}

/// The queue endpoint of a named account: `PROTOCOL://ACCOUNT.queue.SUFFIX`.
pub fn account_endpoint(account: &str, protocol: &str, suffix: &str) -> Result<Url, String> {
    if account.is_empty() || !account.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!(
            "storage account name `{account}` is invalid (lowercase letters and digits only)"
        ));
    }
    let raw = format!(
        "{protocol}://{}.queue.{suffix}",
        account.to_ascii_lowercase()
    );
    Url::parse(&raw)
        .map_err(|e| format!("cannot build the queue endpoint from the account name: {e}"))
}

/// Parses and normalizes a queue service URL named by `setting`.
///
/// A trailing slash is removed: the SDK appends the queue name as a new path
/// segment, and `…/devstoreaccount1/` would become `…/devstoreaccount1//queue`,
/// which the service rejects with `400 InvalidResourceName`.
pub fn parse_endpoint(raw: &str, setting: &str) -> Result<Url, String> {
    let mut url = Url::parse(raw.trim())
        .map_err(|e| format!("{setting} is not a valid URL ({e}); expected e.g. https://ACCOUNT.queue.core.windows.net"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{setting} must be an http or https URL, not `{}:`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{setting} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{setting} must not contain a query string; put a SAS token in SharedAccessSignature= instead"
        ));
    }
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(if trimmed.is_empty() { "/" } else { &trimmed });
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM9PQ==";

    fn key_of(c: &ConnectionString) -> (&str, &str) {
        match &c.credential {
            Credential::SharedKey { account, key } => (account, key.expose()),
            Credential::Sas(_) => panic!("expected shared key"),
        }
    }

    #[test]
    fn portal_form() {
        let c = parse(&format!(
            "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={KEY};EndpointSuffix=core.windows.net"
        ))
        .unwrap();
        assert_eq!(c.endpoint.as_str(), "https://acme.queue.core.windows.net/");
        assert_eq!(key_of(&c), ("acme", KEY));
        assert_eq!(c.account.as_deref(), Some("acme"));
    }

    #[test]
    fn account_key_wins_over_sas_and_the_last_repeat_counts() {
        let c = parse(&format!(
            "AccountName=acme;SharedAccessSignature=sv=1&sig=x;AccountKey={KEY}"
        ))
        .unwrap();
        assert_eq!(key_of(&c), ("acme", KEY));
        let c = parse(&format!(
            "AccountName=old;AccountName=acme;AccountKey={KEY}"
        ))
        .unwrap();
        assert_eq!(key_of(&c), ("acme", KEY));
        assert_eq!(c.endpoint.as_str(), "https://acme.queue.core.windows.net/");
    }

    #[test]
    fn defaults_and_other_clouds() {
        let c = parse(&format!("AccountName=acme;AccountKey={KEY}")).unwrap();
        assert_eq!(c.endpoint.as_str(), "https://acme.queue.core.windows.net/");
        let c = parse(&format!(
            "defaultendpointsprotocol=HTTP;accountname=acme;accountkey={KEY};endpointsuffix=core.chinacloudapi.cn;"
        ))
        .unwrap();
        assert_eq!(
            c.endpoint.as_str(),
            "http://acme.queue.core.chinacloudapi.cn/"
        );
    }

    #[test]
    fn azurite_path_style_and_trailing_slash() {
        for ep in [
            "http://127.0.0.1:10001/devstoreaccount1",
            "http://127.0.0.1:10001/devstoreaccount1/",
            "http://127.0.0.1:10001/devstoreaccount1//",
        ] {
            let c = parse(&format!(
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};QueueEndpoint={ep};"
            ))
            .unwrap();
            assert_eq!(
                c.endpoint.as_str(),
                "http://127.0.0.1:10001/devstoreaccount1"
            );
            assert_eq!(key_of(&c), (DEV_ACCOUNT, DEV_ACCOUNT_KEY));
        }
        // Only QueueEndpoint matters; other services' endpoints are ignored.
        let c = parse(&format!(
            "AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:5555/devstoreaccount1"
        ))
        .unwrap();
        assert_eq!(c.endpoint.port(), Some(5555));
    }

    #[test]
    fn development_storage() {
        let c = parse("UseDevelopmentStorage=true").unwrap();
        assert_eq!(c.endpoint.as_str(), DEV_QUEUE_ENDPOINT);
        assert_eq!(key_of(&c), (DEV_ACCOUNT, DEV_ACCOUNT_KEY));
        let c =
            parse("UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://azurite").unwrap();
        assert_eq!(c.endpoint.as_str(), "http://azurite:10001/devstoreaccount1");
    }

    #[test]
    fn blob_endpoints_given_or_derived() {
        let blob = |raw: &str| parse(raw).unwrap().blob_endpoint.map(|u| u.to_string());
        assert_eq!(
            blob(&format!(
                "AccountName=acme;AccountKey={KEY};EndpointSuffix=core.chinacloudapi.cn"
            )),
            Some("https://acme.blob.core.chinacloudapi.cn/".into())
        );
        assert_eq!(
            blob(&format!(
                "AccountName={DEV_ACCOUNT};AccountKey={KEY};QueueEndpoint=http://127.0.0.1:5555/{DEV_ACCOUNT};BlobEndpoint=http://127.0.0.1:4444/{DEV_ACCOUNT}/"
            )),
            Some(format!("http://127.0.0.1:4444/{DEV_ACCOUNT}"))
        );
        assert_eq!(
            blob("QueueEndpoint=https://acme.queue.core.windows.net/;SharedAccessSignature=sv=1&sig=x"),
            Some("https://acme.blob.core.windows.net/".into())
        );
        // A custom queue endpoint says nothing about the blob service.
        assert_eq!(
            blob(&format!(
                "AccountName=acme;AccountKey={KEY};QueueEndpoint=http://127.0.0.1:5555/acme"
            )),
            None
        );
        assert_eq!(
            blob("UseDevelopmentStorage=true"),
            Some(DEV_BLOB_ENDPOINT.into())
        );
        assert_eq!(
            blob("UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://azurite"),
            Some("http://azurite:10000/devstoreaccount1".into())
        );
        let e = parse(&format!(
            "AccountName=acme;AccountKey={KEY};BlobEndpoint=ftp://x"
        ))
        .unwrap_err();
        assert!(
            e.contains("BlobEndpoint") && e.contains(CONNECTION_STRING_VAR),
            "{e}"
        );
    }

    #[test]
    fn sas_forms() {
        let c = parse("QueueEndpoint=https://acme.queue.core.windows.net/;SharedAccessSignature=?sv=2022-11-02&ss=q&sig=abc%2Bdef%3D").unwrap();
        assert_eq!(c.endpoint.as_str(), "https://acme.queue.core.windows.net/");
        assert_eq!(
            c.credential,
            Credential::Sas(Secret::new("sv=2022-11-02&ss=q&sig=abc%2Bdef%3D"))
        );
        assert_eq!(c.account, None);
        let c = parse("AccountName=acme;SharedAccessSignature=sv=1&sig=x").unwrap();
        assert_eq!(c.endpoint.as_str(), "https://acme.queue.core.windows.net/");
        assert_eq!(c.account.as_deref(), Some("acme"));
    }

    #[test]
    fn quoted_string_and_whitespace() {
        let c = parse(&format!("\"AccountName=acme ; AccountKey={KEY} ;\"")).unwrap();
        assert_eq!(key_of(&c), ("acme", KEY));
    }

    #[test]
    fn errors_name_the_variable_and_never_the_secret() {
        let cases = [
            ("".to_owned(), "is empty"),
            (
                format!("AccountKey={KEY}"),
                "neither QueueEndpoint nor AccountName",
            ),
            (
                format!("QueueEndpoint=http://h/a;AccountKey={KEY}"),
                "no AccountName",
            ),
            (
                "AccountName=acme".to_owned(),
                "neither AccountKey nor SharedAccessSignature",
            ),
            (
                "AccountName=acme;AccountKey=not*base64!".to_owned(),
                "not valid base64",
            ),
            ("AccountName=acme;secretpart".to_owned(), "has no `=`"),
            (
                "AccountName=acme;SharedAccessSignature=sv=1&secretpart".to_owned(),
                "no `sig=`",
            ),
            (
                format!("AccountName=acme;AccountKey={KEY};QueueEndpoint=ftp://x"),
                "http or https",
            ),
            (
                format!("AccountName=acme;AccountKey={KEY};QueueEndpoint=https://x/?sv=1"),
                "query string",
            ),
            (
                format!("AccountName=acme;AccountKey={KEY};DefaultEndpointsProtocol=gopher"),
                "https or http",
            ),
        ];
        for (raw, expected) in cases {
            let e = parse(&raw).unwrap_err();
            assert!(e.contains(expected), "{raw}: {e}");
            assert!(e.contains(CONNECTION_STRING_VAR), "{e}");
            assert!(
                !e.contains(KEY) && !e.contains("c2VjcmV0") && !e.contains("secretpart"),
                "{e}"
            );
        }
    }

    #[test]
    fn endpoint_normalization() {
        let u = parse_endpoint("https://acme.queue.core.windows.net/", "X").unwrap();
        assert_eq!(u.as_str(), "https://acme.queue.core.windows.net/");
        let u = parse_endpoint(" http://127.0.0.1:1/devstoreaccount1/ ", "X").unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:1/devstoreaccount1");
        assert!(parse_endpoint(
            "acme.queue.core.windows.net",
            "AZURE_STORAGE_QUEUE_ENDPOINT"
        )
        .unwrap_err()
        .contains("AZURE_STORAGE_QUEUE_ENDPOINT"));
        assert_eq!(
            account_endpoint("acme", "https", "core.windows.net")
                .unwrap()
                .as_str(),
            "https://acme.queue.core.windows.net/"
        );
        assert!(account_endpoint("ac/me", "https", "x").is_err());
    }
}
