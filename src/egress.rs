//! Where task-supplied URLs may go.
//!
//! A task is data from a queue, so its `webhook_url` and its `http` handler
//! URL are attacker-controllable. Without a guard, a task could make the
//! worker call the cloud metadata service (169.254.169.254, which hands out
//! managed-identity tokens) or services on the private network.
//!
//! The rule lives in the HTTP client, not at call sites: every client built by
//! [`EgressPolicy::client`] resolves names through [`GuardedResolver`], which
//! refuses a name if *any* address it resolves to is not public and hands
//! reqwest exactly the addresses it checked, so there is no window between
//! check and connect for DNS rebinding. IP literals never reach a resolver, so
//! [`EgressPolicy::check`] covers them (and redirects) before a request leaves.
//!
//! `WORKER_WEBHOOK_ALLOWED_HOSTS` replaces the address rule with an explicit
//! list of hosts, allowed whatever they resolve to (local development).
//!
//! A refusal ([`EgressError`]) is a policy decision and final. A name that
//! does not resolve (NXDOMAIN, SERVFAIL, a resolver timeout) is not: DNS
//! blips, and a backend's record may be back in a minute, so it surfaces as a
//! [`ResolveError`], which callers treat like a refused connection (try
//! again later). `WORKER_HOSTS_FILE` names a hosts file (the `/etc/hosts`
//! format) consulted before the system resolver, re-read on every lookup:
//! it pins a backend's address without touching the machine's DNS, and lets
//! tests make a name resolve and stop resolving. Names under `.invalid`
//! never resolve (RFC 6761), without asking any resolver.
//!
//! The Azure SDK's own traffic (queues, managed identity) does not go through
//! here: those endpoints come from the operator, not from tasks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use url::Url;

/// Why a URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("scheme `{0}` is not allowed; only http and https")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("host `{0}` is not in WORKER_WEBHOOK_ALLOWED_HOSTS")]
    NotAllowed(String),
    #[error("host `{host}` resolves to non-public address {addr}; set WORKER_WEBHOOK_ALLOWED_HOSTS to allow it explicitly")]
    Blocked { host: String, addr: IpAddr },
}

/// A name that did not resolve: transient (DNS trouble passes), never a refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host `{host}` did not resolve: {reason} (DNS trouble is retried)")]
pub struct ResolveError {
    pub host: String,
    pub reason: String,
}

/// One entry of the allow list: a host, optionally pinned to a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    host: String,
    port: Option<u16>,
}

impl std::str::FromStr for HostRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty host".into());
        }
        // `[::1]:8080`, `[::1]`, `host:8080`, `host`
        let parsed = Url::parse(&format!("http://{s}/"))
            .map_err(|e| format!("`{s}` is not a host or host:port ({e})"))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        let explicit_port = s
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !s.ends_with(']');
        Ok(HostRule {
            host: host.trim_matches(['[', ']']).to_ascii_lowercase(),
            port: if explicit_port {
                parsed.port_or_known_default()
            } else {
                None
            },
        })
    }
}

/// The egress rule shared by the webhook notifier and the `http` handler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// `None`: only public addresses. `Some`: exactly these hosts.
    allowed_hosts: Option<Vec<HostRule>>,
    /// `WORKER_HOSTS_FILE`: names listed there resolve to its addresses.
    hosts_file: Option<PathBuf>,
}

impl EgressPolicy {
    pub fn public_only() -> Self {
        Self::default()
    }

    pub fn allow_hosts(rules: Vec<HostRule>) -> Self {
        Self {
            allowed_hosts: Some(rules),
            hosts_file: None,
        }
    }

    /// Resolves names listed in `path` (hosts-file format) to its addresses
    /// before asking the system resolver.
    pub fn with_hosts_file(mut self, path: Option<PathBuf>) -> Self {
        self.hosts_file = path;
        self
    }

    /// The checks that need no DNS: scheme, allow list, IP literals.
    pub fn check(&self, url: &Url) -> Result<(), EgressError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EgressError::Scheme(url.scheme().to_owned()));
        }
        let host = url.host().ok_or(EgressError::NoHost)?;
        let host_str = match &host {
            url::Host::Domain(d) => d.to_ascii_lowercase(),
            url::Host::Ipv4(a) => a.to_string(),
            url::Host::Ipv6(a) => a.to_string(),
        };
        if let Some(rules) = &self.allowed_hosts {
            let port = url.port_or_known_default();
            let allowed = rules
                .iter()
                .any(|r| r.host == host_str && (r.port.is_none() || r.port == port));
            return if allowed {
                Ok(())
            } else {
                Err(EgressError::NotAllowed(host_str))
            };
        }
        let literal = match host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(_) => None,
        };
        match literal {
            Some(addr) if !is_public(addr) => Err(EgressError::Blocked {
                host: host_str,
                addr,
            }),
            _ => Ok(()),
        }
    }

    /// An HTTP client that enforces this policy on every connection.
    /// `follow_redirects` re-checks each hop; webhooks pass `false`.
    pub fn client(
        &self,
        timeout: Duration,
        follow_redirects: bool,
    ) -> Result<reqwest::Client, reqwest::Error> {
        let redirect = if follow_redirects {
            let policy = self.clone();
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("too many redirects (limit 5)");
                }
                match policy.check(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            })
        } else {
            reqwest::redirect::Policy::none()
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("worker/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A proxy would resolve names itself, out of the guard's sight.
            .no_proxy()
            .redirect(redirect);
        builder = builder.dns_resolver(Arc::new(GuardedResolver {
            public_only: self.allowed_hosts.is_none(),
            hosts_file: self.hosts_file.clone(),
        }));
        builder.build()
    }
}

/// Finds an [`EgressError`] in a reqwest error's cause chain: a refusal is
/// final, not something to retry. A [`ResolveError`] is not one.
pub fn egress_error_in(err: &(dyn std::error::Error + 'static)) -> Option<EgressError> {
    find_in(err)
}

/// Finds a [`ResolveError`] in an error's cause chain.
pub fn resolve_error_in(err: &(dyn std::error::Error + 'static)) -> Option<ResolveError> {
    find_in(err)
}

fn find_in<T: std::error::Error + Clone + 'static>(
    err: &(dyn std::error::Error + 'static),
) -> Option<T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found.clone());
        }
        cur = e.source();
    }
    None
}

/// Resolves names (hosts file first, then the system resolver) and, under
/// the public-only rule, refuses any whose addresses are not all public.
struct GuardedResolver {
    public_only: bool,
    hosts_file: Option<PathBuf>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let (public_only, hosts_file) = (self.public_only, self.hosts_file.clone());
        Box::pin(async move {
            let addrs = resolve(&host, hosts_file.as_deref()).await?;
            if public_only {
                if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                    return Err(EgressError::Blocked {
                        host,
                        addr: bad.ip(),
                    }
                    .into());
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses of `host`: from `hosts_file` when it lists the name, else
/// from the system resolver. Never empty.
pub async fn resolve(
    host: &str,
    hosts_file: Option<&Path>,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let failed = |reason: String| ResolveError {
        host: host.to_owned(),
        reason,
    };
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if let Some(path) = hosts_file {
        // Re-read on every lookup (lookups happen per new connection): an
        // edit takes effect at once, with no cache to go stale.
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                let listed = hosts_lookup(&text, &lower);
                if !listed.is_empty() {
                    return Ok(listed
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, 0))
                        .collect());
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "cannot read WORKER_HOSTS_FILE; using the system resolver"),
        }
    }
    if lower == "invalid" || lower.ends_with(".invalid") {
        return Err(failed(
            "names under .invalid never resolve (RFC 6761)".into(),
        ));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| failed(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(failed("no addresses".into()));
    }
    Ok(addrs)
}

/// The addresses a hosts file (`ADDRESS NAME [ALIAS...]`, `#` comments) gives `name`.
fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let addr: IpAddr = fields.next()?.parse().ok()?;
            fields
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
                .then_some(addr)
        })
        .collect()
}

/// Whether an address is reachable on the public internet (and so is not the
/// metadata service, a loopback service or a private network peer).
pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [b0, b1, b2, _] = a.octets();
    !(a.is_unspecified()
        || b0 == 0 // "this network"
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local() // 169.254.0.0/16, metadata service included
        || (b0 == 100 && (64..128).contains(&b1)) // CGNAT 100.64.0.0/10
        || (b0 == 192 && b1 == 0 && b2 == 0) // IETF protocol assignments
        || (b0 == 192 && b1 == 0 && b2 == 2) // documentation
        || (b0 == 198 && b1 == 51 && b2 == 100)
        || (b0 == 203 && b1 == 0 && b2 == 113)
        || (b0 == 198 && (18..20).contains(&b1)) // benchmarking
        || a.is_multicast()
        || b0 >= 240) // reserved and broadcast
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = a.segments();
    // NAT64 (64:ff9b::/96) embeds an IPv4 address: judge that one.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
        let [a, b] = seg[6].to_be_bytes();
        let [c, d] = seg[7].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    !(a.is_unspecified()
        || a.is_loopback()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || a.is_multicast()
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || seg[..6].iter().all(|s| *s == 0)) // IPv4-compatible (deprecated)
}

// ---- HTTP helpers shared by the webhook notifier and the `http` handler ----

/// A URL for logs: scheme, host, port and path, never query or credentials
/// (backends sometimes put tokens there).
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("redacted"));
    }
    u.set_fragment(None);
    u.to_string()
}

/// `Display` of an error and its causes on one line (reqwest's top-level
/// message alone rarely says what failed).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_lose_query_and_credentials() {
        let u = Url::parse("https://user:pw@h.example/p?token=abc#f").unwrap();
        assert_eq!(redact_url(&u), "https://h.example/p?redacted");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(ip(a)), "{a} should be refused");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1"] {
            assert!(is_public(ip(a)), "{a} should be allowed");
        }
    }

    #[test]
    fn literal_urls_are_checked() {
        let p = EgressPolicy::public_only();
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(matches!(
            p.check(&u("http://169.254.169.254/metadata")),
            Err(EgressError::Blocked { .. })
        ));
        assert!(matches!(
            p.check(&u("http://[::1]:80/")),
            Err(EgressError::Blocked { .. })
        ));
        assert!(matches!(
            p.check(&u("file:///etc/passwd")),
            Err(EgressError::Scheme(_))
        ));
        assert!(p.check(&u("https://example.com/hook")).is_ok());
    }

    #[test]
    fn allow_list_replaces_address_rule() {
        let rules = vec![
            "127.0.0.1".parse().unwrap(),
            "hooks.local:8080".parse().unwrap(),
        ];
        let p = EgressPolicy::allow_hosts(rules);
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(p.check(&u("http://127.0.0.1:9999/x")).is_ok());
        assert!(p.check(&u("http://hooks.local:8080/x")).is_ok());
        assert!(matches!(
            p.check(&u("http://hooks.local:8081/x")),
            Err(EgressError::NotAllowed(_))
        ));
        assert!(matches!(
            p.check(&u("https://example.com/")),
            Err(EgressError::NotAllowed(_))
        ));
    }

    #[test]
    fn host_rules_parse() {
        let r: HostRule = "[::1]:8080".parse().unwrap();
        assert_eq!(
            r,
            HostRule {
                host: "::1".into(),
                port: Some(8080)
            }
        );
        let r: HostRule = "Example.COM".parse().unwrap();
        assert_eq!(
            r,
            HostRule {
                host: "example.com".into(),
                port: None
            }
        );
        assert!("".parse::<HostRule>().is_err());
    }

    #[test]
    fn hosts_files_are_read_like_etc_hosts() {
        let text = "# pinned\n127.0.0.1 hook.test other.test\n::1 hook.test # v6\n\nbad line\n10.0.0.1 Upper.Test.\n";
        assert_eq!(
            hosts_lookup(text, "hook.test"),
            vec![ip("127.0.0.1"), ip("::1")]
        );
        assert_eq!(hosts_lookup(text, "upper.test"), vec![ip("10.0.0.1")]);
        assert!(hosts_lookup(text, "pinned").is_empty());
        assert!(hosts_lookup(text, "missing.test").is_empty());
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_not_a_refusal() {
        let client = EgressPolicy::public_only()
            .client(Duration::from_secs(2), false)
            .unwrap();
        let err = client
            .post("http://backend.invalid/hook")
            .send()
            .await
            .unwrap_err();
        assert_eq!(egress_error_in(&err), None, "{err:?}");
        assert!(error_chain(&err).contains("did not resolve"), "{err:?}");
    }

    #[tokio::test]
    async fn the_hosts_file_decides_first_and_its_edits_count_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "127.0.0.1 backend.invalid\n").unwrap();
        let found = resolve("backend.invalid", Some(&path)).await.unwrap();
        assert_eq!(found[0].ip(), ip("127.0.0.1"));
        std::fs::write(&path, "# gone\n").unwrap();
        assert!(resolve("backend.invalid", Some(&path)).await.is_err());
        // The egress rule still applies to the file's addresses.
        std::fs::write(&path, "127.0.0.1 backend.invalid\n").unwrap();
        let client = EgressPolicy::public_only()
            .with_hosts_file(Some(path))
            .client(Duration::from_secs(2), false)
            .unwrap();
        let err = client
            .get("http://backend.invalid:9/")
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(egress_error_in(&err), Some(EgressError::Blocked { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn resolver_refuses_localhost() {
        let client = EgressPolicy::public_only()
            .client(Duration::from_secs(2), false)
            .unwrap();
        let err = client.get("http://localhost:9/").send().await.unwrap_err();
        assert!(
            matches!(egress_error_in(&err), Some(EgressError::Blocked { .. })),
            "{err:?}"
        );
    }
}
