//! Managed identity at start-up, end to end: the real binary authenticates
//! with an Entra ID bearer token (no key, no connection string) against a real
//! Azurite, and the token comes from a real HTTP server in the test standing in
//! for the container's identity endpoint, which is not ready at first.
//!
//! How the pieces meet:
//!
//! - `azure_identity` 1.x's `ManagedIdentityCredential` asks IMDS
//!   (169.254.169.254) unless `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set;
//!   then it asks that endpoint (the App Service protocol: `GET
//!   ?api-version=2019-08-01&resource=…&client_id=…` with the header value in
//!   `x-identity-header`, answer `{access_token, expires_on, token_type,
//!   resource}`). The worker's code path is the same either way: the storage
//!   pipeline with its bearer-token policy and the start-up patience.
//! - The SDK refuses to send a bearer token over plain http, and Azurite
//!   accepts one only over HTTPS (`--oauth basic`, which checks the token's
//!   lifetime, issuer and audience but not its signature). So Azurite serves
//!   HTTPS with a certificate made here by `openssl` for 127.0.0.1, signed by a
//!   throw-away CA that the worker trusts through `SSL_CERT_FILE` (rustls'
//!   platform verifier reads the system roots from there on Linux).
//!
//! The identity endpoint answers 400 ("identity not found", what IMDS answers
//! while a new group's identity is not attached yet) to the first requests:
//! the SDK does not retry that, so only the worker's own start-up patience
//! (`WORKER_IDENTITY_WAIT`) can ride it out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;

use common::azurite::Azurite;
use common::consume::{hook, task, Client};
use common::receiver::{Receiver, Reply};
use common::worker::{Worker, HANG_GUARD};

const ARRIVAL: Duration = Duration::from_secs(60);
/// The header value the identity endpoint expects (`IDENTITY_HEADER`).
const IDENTITY_SECRET: &str = "identity-header-of-this-test";
const CLIENT_ID: &str = "00000000-1111-2222-3333-444444444444";
/// Answers 400 before the first token: longer than the old first renewal's
/// ~3 s of retries, well inside the default `WORKER_IDENTITY_WAIT`.
const NOT_READY_ANSWERS: usize = 4;

const OPENSSL_HELP: &str = "tests/identity.rs makes a TLS certificate for Azurite with the \
`openssl` command line tool: install it (e.g. `apt-get install openssl`) and run the tests again.";

/// The CA and the server certificate, made once per test process.
struct Tls {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}). {OPENSSL_HELP}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=worker test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(d, &ca);
        let mut csr = vec!["req", "-nodes"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        let tls = Tls {
            ca: d.join("ca.pem"),
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            _dir: dir,
        };
        // The test's own queue client (the Logic App's part) trusts the CA
        // the same way the worker does. Set once, before any client exists.
        std::env::set_var("SSL_CERT_FILE", &tls.ca);
        tls
    })
}

/// One HTTPS Azurite with bearer tokens for this test binary.
fn azurite() -> &'static Azurite {
    static AZ: OnceLock<Azurite> = OnceLock::new();
    let tls = tls();
    AZ.get_or_init(|| Azurite::start_tls_oauth(&tls.cert, &tls.key))
}

/// A token Azurite's basic OAuth accepts: storage audience, an Entra issuer,
/// valid now. Unsigned in effect (Azurite does not check the signature).
fn token_reply() -> Reply {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let jwt = format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(json!({"alg": "HS256", "typ": "JWT"})),
        b64(json!({
            "aud": "https://storage.azure.com",
            "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
            "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
        }))
    );
    Reply::json(
        200,
        &json!({
            "access_token": jwt,
            "expires_on": (now + 3600).to_string(),
            "token_type": "Bearer",
            "resource": "https://storage.azure.com",
        }),
    )
}

fn not_ready_reply() -> Reply {
    Reply::json(
        400,
        &json!({"error": "invalid_request", "error_description": "Identity not found"}),
    )
}

/// An identity endpoint that says "not found" `not_ready` times, then hands
/// out tokens (or never, with `None`).
fn identity_endpoint(not_ready: usize, then_token: bool) -> Receiver {
    let mut script = vec![not_ready_reply(); not_ready];
    if then_token {
        script.push(token_reply());
    }
    Receiver::start(script)
}

/// The worker with a managed identity only: no connection string, the queue
/// endpoint over HTTPS, the identity endpoint of the test.
fn with_identity(c: &Client, endpoint: &Receiver) -> Worker {
    c.worker()
        .env_remove("AZURE_STORAGE_CONNECTION_STRING")
        .env("AZURE_STORAGE_QUEUE_ENDPOINT", azurite().endpoint())
        .env("AZURE_CLIENT_ID", CLIENT_ID)
        .env("IDENTITY_ENDPOINT", endpoint.url("/msi/token"))
        .env("IDENTITY_HEADER", IDENTITY_SECRET)
        .env("SSL_CERT_FILE", &tls().ca)
}

/// Every token request asked for storage, for this identity, with the header.
fn assert_token_requests(endpoint: &Receiver, at_least: usize) {
    let requests = endpoint.drain();
    assert!(
        requests.len() >= at_least,
        "expected at least {at_least} token requests, got {}",
        requests.len()
    );
    for r in &requests {
        assert_eq!(r.header("x-identity-header"), Some(IDENTITY_SECRET));
        assert!(
            r.uri.contains("resource=https%3A%2F%2Fstorage.azure.com")
                && r.uri.contains(&format!("client_id={CLIENT_ID}")),
            "token request {}",
            r.uri
        );
    }
}

const PATIENCE_LOG: &str = "not available yet at start-up; retrying";

#[tokio::test]
async fn single_task_mode_waits_for_the_identity_before_taking_the_message_over() {
    let c = Client::new(azurite(), "mi-single").await;
    let rx = Receiver::ok();
    c.send_task(&task("mi-1", "echo", json!({"n": 1}), Some(&hook(&rx))))
        .await;
    // The Logic App's receive: the worker gets the message's coordinates.
    let m = c
        .receive(Duration::from_secs(600))
        .await
        .pop()
        .expect("the task");
    let endpoint = identity_endpoint(NOT_READY_ANSWERS, true);
    let out = with_identity(&c, &endpoint)
        .env("TASK_DATA", &m.text)
        .env("WORKER_MESSAGE_ID", &m.id)
        .env("WORKER_POP_RECEIPT", &m.pop_receipt)
        .env("WORKER_DEQUEUE_COUNT", "1")
        .spawn()
        .finish_within(HANG_GUARD);
    out.assert_code(0);
    assert_eq!(
        out.count_logs(PATIENCE_LOG),
        NOT_READY_ANSWERS,
        "{}",
        out.describe()
    );
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.succeeded", "{e:#}");
    // Settled with the token: the message is gone.
    assert_eq!(c.count().await, 0, "{}", out.describe());
    assert_token_requests(&endpoint, NOT_READY_ANSWERS + 1);
}

#[tokio::test]
async fn job_mode_waits_for_the_identity_before_its_first_receive() {
    let c = Client::new(azurite(), "mi-job").await;
    let rx = Receiver::ok();
    c.send_task(&task("mi-2", "echo", json!({"n": 2}), Some(&hook(&rx))))
        .await;
    let endpoint = identity_endpoint(NOT_READY_ANSWERS, true);
    let out = with_identity(&c, &endpoint)
        .arg("job")
        .spawn()
        .finish_within(HANG_GUARD);
    out.assert_code(0);
    assert_eq!(out.count_logs(PATIENCE_LOG), NOT_READY_ANSWERS);
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.succeeded", "{e:#}");
    assert_eq!(c.count().await, 0, "{}", out.describe());
    assert_token_requests(&endpoint, NOT_READY_ANSWERS + 1);
}

#[tokio::test]
async fn the_wait_is_bounded_and_names_its_setting() {
    let c = Client::new(azurite(), "mi-never").await;
    c.send_task(&task("mi-3", "echo", json!({}), None)).await;
    let endpoint = identity_endpoint(1, false);
    let started = std::time::Instant::now();
    let out = with_identity(&c, &endpoint)
        .env("WORKER_IDENTITY_WAIT", "3")
        .arg("job")
        .spawn()
        .finish_within(HANG_GUARD);
    out.assert_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up only after {:?}",
        started.elapsed()
    );
    assert!(
        out.stderr.contains("WORKER_IDENTITY_WAIT") && out.count_logs(PATIENCE_LOG) >= 2,
        "{}",
        out.describe()
    );
    // Nothing was received, run or lost: the message is still there, visible.
    let left = c.tasks.peek(1).await.unwrap();
    assert_eq!(left.len(), 1, "{}", out.describe());
    assert_eq!(out.count_logs("task started"), 0);
}
