//! Storage Shared Key authorization, as an `azure_core` pipeline policy.
//!
//! `azure_storage_queue` 1.x authenticates only with Entra ID tokens (or
//! anonymously, for SAS URLs); it has no account-key credential. Connection
//! strings with an `AccountKey` are what Azurite, the portal and most existing
//! backends use, so this policy signs each request the way the Storage REST
//! documentation ("Authorize with Shared Key") specifies:
//!
//! ```text
//! VERB \n Content-Encoding \n Content-Language \n Content-Length \n Content-MD5 \n
//! Content-Type \n Date \n If-Modified-Since \n If-Match \n If-None-Match \n
//! If-Unmodified-Since \n Range \n CanonicalizedHeaders CanonicalizedResource
//! ```
//!
//! It runs per try (after the retry policy), so a retried request gets a fresh
//! `x-ms-date` and a signature over exactly the headers that are sent.
//!
//! [`SasPolicy`] is the other connection-string authorization: it appends the
//! SAS token to the request's query. It runs once per call, before the retry
//! policy, so a retry does not append it twice.

use std::sync::Arc;

use azure_core::http::headers::HeaderName;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::secret::Secret;

const AUTHORIZATION: HeaderName = HeaderName::from_static("authorization");
const X_MS_DATE: HeaderName = HeaderName::from_static("x-ms-date");

/// The standard headers in string-to-sign order.
const SIGNED_STANDARD_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

const RFC1123: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// Signs every request with the account key.
pub struct SharedKeyPolicy {
    account: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeyPolicy")
            .field("account", &self.account)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SharedKeyPolicy {
    /// `key` is the base64 account key; the error never contains it.
    pub fn new(account: &str, key: &Secret) -> Result<Self, String> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| "the account key is not valid base64".to_owned())?;
        Ok(Self {
            account: account.to_owned(),
            key,
        })
    }

    /// Sets `x-ms-date` to `now` and `authorization` to the signature.
    pub fn sign(&self, request: &mut Request, now: OffsetDateTime) {
        let date = now
            .to_offset(time::UtcOffset::UTC)
            .format(RFC1123)
            .unwrap_or_default();
        request.insert_header(X_MS_DATE, date);
        let signature = signature(&self.key, &string_to_sign(request, &self.account));
        request.insert_header(
            AUTHORIZATION,
            format!("SharedKey {}:{signature}", self.account),
        );
    }
}

#[async_trait::async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.sign(request, OffsetDateTime::now_utc());
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// The Shared Key string-to-sign of `request` for `account`.
pub fn string_to_sign(request: &Request, account: &str) -> String {
    let headers = request.headers();
    let mut out = String::with_capacity(256);
    out.push_str(request.method().as_ref());
    out.push('\n');
    for name in SIGNED_STANDARD_HEADERS {
        let value = match name {
            // Since version 2015-02-21 a zero length is signed as empty. The
            // SDK leaves Content-Length to the HTTP client, which derives it
            // from the body.
            "content-length" => {
                let len = headers
                    .get_optional_str(&HeaderName::from_static("content-length"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .or_else(|| request.body().len())
                    .unwrap_or(0);
                if len == 0 {
                    String::new()
                } else {
                    len.to_string()
                }
            }
            // `x-ms-date` is always set, which makes `Date` empty.
            "date" => String::new(),
            _ => headers
                .get_optional_str(&HeaderName::from_static(name))
                .unwrap_or("")
                .to_owned(),
        };
        out.push_str(&value);
        out.push('\n');
    }

    let mut ms: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.as_str()))
        .filter(|(k, _)| k.starts_with("x-ms-"))
        .map(|(k, v)| (k, unfold(v)))
        .collect();
    ms.sort();
    for (k, v) in ms {
        out.push_str(&k);
        out.push(':');
        out.push_str(&v);
        out.push('\n');
    }

    out.push('/');
    out.push_str(account);
    out.push_str(request.url().path());
    let mut params: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (k, v) in request.url().query_pairs() {
        params
            .entry(k.to_lowercase())
            .or_default()
            .push(v.into_owned());
    }
    for (k, mut values) in params {
        values.sort();
        out.push('\n');
        out.push_str(&k);
        out.push(':');
        out.push_str(&values.join(","));
    }
    out
}

/// Header values are signed trimmed, with folded whitespace collapsed.
fn unfold(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Base64 HMAC-SHA256 of `data` under the decoded account key.
pub fn signature(key: &[u8], data: &str) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Appends a SAS token to every request's query string.
pub struct SasPolicy {
    sas: Secret,
}

impl std::fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SasPolicy(<redacted>)")
    }
}

impl SasPolicy {
    pub fn new(sas: Secret) -> Self {
        Self { sas }
    }

    /// Appends the token verbatim: re-encoding it through a query builder
    /// could change its `sig`, which was computed over the exact string.
    pub fn apply(&self, request: &mut Request) {
        let sas = self.sas.expose().trim_start_matches('?');
        let url = request.url_mut();
        let query = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{sas}"),
            _ => sas.to_owned(),
        };
        url.set_query(Some(&query));
    }
}

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.apply(request);
        next[0].send(ctx, request, &next[1..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{Method, Url};

    const DEV_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn update_message_request() -> Request {
        let url = Url::parse(
            "http://127.0.0.1:10001/devstoreaccount1/jobs-tasks/messages/0f5c6a2e-1d9b-4e47-9d7c-3f0e6f9e2b11\
             ?popreceipt=AgAAAAMAAAAAAAAA%2BAbC%3D%3D&visibilitytimeout=30&timeout=20",
        )
        .unwrap();
        let mut r = Request::new(url, Method::Put);
        r.insert_header("x-ms-version", "2026-04-06");
        r.insert_header(
            "x-ms-client-request-id",
            "11111111-2222-3333-4444-555555555555",
        );
        r.insert_header("content-type", "application/xml");
        r.insert_header("user-agent", "azsdk-rust-storage_queue/1.1.0");
        r.set_body(azure_core::Bytes::from_static(
            b"<QueueMessage><MessageText>hi</MessageText></QueueMessage>",
        ));
        r
    }

    /// Expected values computed independently with Python's `hmac` module,
    /// building the string-to-sign from the documented rules:
    ///
    /// ```python
    /// import base64, hashlib, hmac
    /// from urllib.parse import urlsplit, parse_qsl
    /// key = "Eby8vdM0…GMGw=="   # Azurite's well-known key
    /// account = "devstoreaccount1"
    /// url = "http://127.0.0.1:10001/devstoreaccount1/jobs-tasks/messages/0f5c…2b11?popreceipt=AgAAAAMAAAAAAAAA%2BAbC%3D%3D&visibilitytimeout=30&timeout=20"
    /// body = b"<QueueMessage><MessageText>hi</MessageText></QueueMessage>"
    /// headers = {"x-ms-version": "2026-04-06", "x-ms-date": "Mon, 02 Mar 2026 10:00:00 GMT",
    ///            "x-ms-client-request-id": "11111111-…-555555555555",
    ///            "content-type": "application/xml", "user-agent": "azsdk-rust-storage_queue/1.1.0"}
    /// std = ["content-encoding", "content-language", "content-length", "content-md5", "content-type",
    ///        "date", "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range"]
    /// h = dict(headers); h["content-length"] = str(len(body)) if body else ""
    /// parts = ["PUT"] + [h.get(n, "") for n in std]
    /// canon_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(k for k in headers if k.startswith("x-ms-")))
    /// u = urlsplit(url); q = {}
    /// for k, v in parse_qsl(u.query, keep_blank_values=True):
    ///     q.setdefault(k.lower(), []).append(v)
    /// canon_res = f"/{account}{u.path}" + "".join(f"\n{k}:{','.join(sorted(q[k]))}" for k in sorted(q))
    /// sts = "\n".join(parts) + "\n" + canon_headers + canon_res
    /// print(base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()).decode())
    /// # 6CikHWLOxI3oNHw2+TOIXGXNfHg/Swgt6I/OaBOMhH0=
    /// ```
    #[test]
    fn known_vector() {
        let policy = SharedKeyPolicy::new("devstoreaccount1", &Secret::new(DEV_KEY)).unwrap();
        let mut r = update_message_request();
        policy.sign(&mut r, time::macros::datetime!(2026-03-02 10:00:00 UTC));
        let expected_sts = "PUT\n\n\n58\n\napplication/xml\n\n\n\n\n\n\n\
            x-ms-client-request-id:11111111-2222-3333-4444-555555555555\n\
            x-ms-date:Mon, 02 Mar 2026 10:00:00 GMT\n\
            x-ms-version:2026-04-06\n\
            /devstoreaccount1/devstoreaccount1/jobs-tasks/messages/0f5c6a2e-1d9b-4e47-9d7c-3f0e6f9e2b11\n\
            popreceipt:AgAAAAMAAAAAAAAA+AbC==\n\
            timeout:20\n\
            visibilitytimeout:30";
        assert_eq!(string_to_sign(&r, "devstoreaccount1"), expected_sts);
        assert_eq!(
            r.headers()
                .get_optional_str(&HeaderName::from_static("authorization")),
            Some("SharedKey devstoreaccount1:6CikHWLOxI3oNHw2+TOIXGXNfHg/Swgt6I/OaBOMhH0=")
        );
        assert_eq!(
            r.headers()
                .get_optional_str(&HeaderName::from_static("x-ms-date")),
            Some("Mon, 02 Mar 2026 10:00:00 GMT")
        );
    }

    #[test]
    fn empty_body_signs_empty_length_and_query_values_are_grouped() {
        let url =
            Url::parse("https://acme.queue.core.windows.net/q?B=2&a=x&b=1&comp=metadata").unwrap();
        let mut r = Request::new(url, Method::Get);
        r.insert_header("x-ms-version", "2026-04-06");
        r.insert_header("x-ms-meta-note", "  two   words ");
        r.insert_header("x-ms-date", "Mon, 02 Mar 2026 10:00:00 GMT");
        let sts = string_to_sign(&r, "acme");
        assert_eq!(
            sts,
            "GET\n\n\n\n\n\n\n\n\n\n\n\n\
             x-ms-date:Mon, 02 Mar 2026 10:00:00 GMT\n\
             x-ms-meta-note:two words\n\
             x-ms-version:2026-04-06\n\
             /acme/q\na:x\nb:1,2\ncomp:metadata"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let p = SharedKeyPolicy::new("acme", &Secret::new(DEV_KEY)).unwrap();
        assert!(!format!("{p:?}").contains("Eby8"));
        let s = SasPolicy::new(Secret::new("sv=1&sig=topsecret"));
        assert!(!format!("{s:?}").contains("topsecret"));
        assert!(SharedKeyPolicy::new("acme", &Secret::new("not base64!"))
            .unwrap_err()
            .contains("base64"));
    }

    #[test]
    fn sas_is_appended_verbatim() {
        let p = SasPolicy::new(Secret::new("?sv=2022-11-02&sig=a%2Bb%3D"));
        let mut r = Request::new(
            Url::parse("https://acme.queue.core.windows.net/q/messages?numofmessages=2").unwrap(),
            Method::Get,
        );
        p.apply(&mut r);
        assert_eq!(
            r.url().as_str(),
            "https://acme.queue.core.windows.net/q/messages?numofmessages=2&sv=2022-11-02&sig=a%2Bb%3D"
        );
        let mut r = Request::new(
            Url::parse("https://acme.queue.core.windows.net/q").unwrap(),
            Method::Put,
        );
        p.apply(&mut r);
        assert_eq!(r.url().query(), Some("sv=2022-11-02&sig=a%2Bb%3D"));
    }
}
