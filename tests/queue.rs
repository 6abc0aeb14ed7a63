//! The queue access layer and the queue commands against a real Azurite.

// Support functions outside #[test] ones panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::azurite::{unique_name, Azurite, ACCOUNT, ACCOUNT_KEY};
use worker::config::Secret;
use worker::queue::{QueueError, QueueService, StorageSettings};

fn settings(connection_string: &str) -> StorageSettings {
    StorageSettings {
        connection_string: Some(Secret::new(connection_string)),
        ..Default::default()
    }
}

fn service(az: &Azurite) -> QueueService {
    az.service()
}

async fn fresh_queue(az: &Azurite, prefix: &str) -> worker::queue::Queue {
    let q = service(az).queue(&unique_name(prefix)).unwrap();
    q.create_if_missing().await.unwrap();
    q
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// An account SAS for Azurite, built by hand from the documented
/// string-to-sign (version 2019-12-12 layout), so that the SAS path is tested
/// against a token the worker did not produce.
fn account_sas(expiry: &str) -> String {
    account_sas_for("q", expiry)
}

/// [`account_sas`] for the services `ss` (`q` queue, `b` blob).
fn account_sas_for(ss: &str, expiry: &str) -> String {
    let (sp, srt, spr, sv) = ("rwdlacup", "sco", "https,http", "2019-12-12");
    let sts = format!("{ACCOUNT}\n{sp}\n{ss}\n{srt}\n\n{expiry}\n\n{spr}\n{sv}\n");
    let key = base64::engine::general_purpose::STANDARD
        .decode(ACCOUNT_KEY)
        .unwrap();
    let sig = worker::queue::shared_key::signature(&key, &sts);
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={}&spr={}&sig={}",
        enc(expiry),
        enc(spr),
        enc(&sig)
    )
}

#[tokio::test]
async fn send_and_receive_plain_base64_and_backend_messages() {
    let az = Azurite::shared();
    let q = fresh_queue(az, "send-receive").await;
    let plain = r#"{"task_id":"t1","task_type":"echo","payload":{"x":"<&>'\""}}"#;
    let encoded = b64(r#"{"task_id":"t2","task_type":"echo"}"#);
    q.send(plain, None, None).await.unwrap();
    q.send(&encoded, None, Some(-1)).await.unwrap();

    // A backend that does not use this crate: a bare HTTP POST with its own
    // XML and a SAS token, the message base64-encoded as Azure Functions does.
    let backend_text = b64(r#"{"task_id":"t3","task_type":"echo"}"#);
    let url = format!(
        "{}/{}/messages?{}",
        az.endpoint(),
        q.name(),
        account_sas("2099-01-01T00:00:00Z")
    );
    let rsp = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(url)
        .header("x-ms-version", "2019-12-12")
        .header("content-type", "application/xml")
        .body(format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessage><MessageText>{backend_text}</MessageText></QueueMessage>"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status().as_u16(), 201, "{:?}", rsp.text().await);

    assert_eq!(q.approximate_count().await.unwrap(), 3);
    let got = q.receive(3, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 3, "number_of_messages must be sent explicitly");
    assert_eq!(got[0].text, plain, "XML special characters round-trip");
    assert_eq!(got[1].text, encoded);
    assert_eq!(got[2].text, backend_text);
    let mut ids = Vec::new();
    for m in &got {
        assert_eq!(m.dequeue_count, 1);
        assert!(m.insertion_time.is_some());
        let (task, _) = worker::task::decode(m.text.as_bytes()).unwrap();
        ids.push(task.task_id);
    }
    assert_eq!(ids, ["t1", "t2", "t3"]);
    assert_eq!(
        worker::task::decode(got[2].text.as_bytes()).unwrap().1,
        worker::task::Encoding::Base64
    );
    // Leased messages are invisible to the next receive.
    assert!(q
        .receive(32, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn visibility_update_renews_the_receipt_and_old_receipts_lose_the_lease() {
    let az = Azurite::shared();
    let q = fresh_queue(az, "lease").await;
    q.send("hello", None, None).await.unwrap();
    let m = q
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);

    let renewed = q
        .update_visibility(&m.id, &m.pop_receipt, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!renewed.is_empty());
    assert_ne!(renewed, m.pop_receipt);

    let e = q
        .update_visibility(&m.id, &m.pop_receipt, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::LeaseLost { .. }), "{e:?}");
    let e = q.delete(&m.id, &m.pop_receipt).await.unwrap_err();
    assert!(matches!(e, QueueError::LeaseLost { .. }), "{e:?}");
    assert!(!e.is_transient());

    q.delete(&m.id, &renewed).await.unwrap();
    let e = q.delete(&m.id, &renewed).await.unwrap_err();
    assert!(matches!(e, QueueError::LeaseLost { .. }), "{e:?}");
    assert_eq!(q.approximate_count().await.unwrap(), 0);
}

#[tokio::test]
async fn release_with_zero_visibility_makes_the_message_visible_again() {
    let az = Azurite::shared();
    let q = fresh_queue(az, "release").await;
    q.send("again", None, None).await.unwrap();
    let m = q
        .receive(1, Duration::from_secs(300))
        .await
        .unwrap()
        .remove(0);
    q.update_visibility(&m.id, &m.pop_receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = q.receive(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, m.id);
    assert_eq!(again[0].dequeue_count, 2);
}

#[tokio::test]
async fn peek_count_delay_and_empty_queue() {
    let az = Azurite::shared();
    let q = fresh_queue(az, "peek").await;
    assert!(q
        .receive(32, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert!(q.peek(32).await.unwrap().is_empty());

    for i in 0..3 {
        q.send(&format!("m{i}"), None, None).await.unwrap();
    }
    q.send("later", Some(Duration::from_secs(3600)), None)
        .await
        .unwrap();
    let peeked = q.peek(32).await.unwrap();
    assert_eq!(
        peeked.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
        ["m0", "m1", "m2"],
        "delayed messages are not visible"
    );
    assert!(peeked
        .iter()
        .all(|p| p.dequeue_count == 0 && !p.id.is_empty()));
    assert_eq!(q.approximate_count().await.unwrap(), 4);
    // Peeking leases nothing.
    assert_eq!(
        q.receive(32, Duration::from_secs(30)).await.unwrap().len(),
        3
    );
}

#[tokio::test]
async fn create_is_idempotent_and_a_missing_queue_is_reported() {
    let az = Azurite::shared();
    let svc = service(az);
    let q = svc.queue(&unique_name("create")).unwrap();
    q.create_if_missing().await.unwrap();
    q.create_if_missing().await.unwrap();

    let missing = svc.queue(&unique_name("missing")).unwrap();
    let e = missing
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, QueueError::QueueNotFound { queue } if queue == missing.name()),
        "{e:?}"
    );
    let e = missing.approximate_count().await.unwrap_err();
    assert!(matches!(e, QueueError::QueueNotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn wrong_key_is_an_auth_error_that_does_not_show_the_key() {
    let az = Azurite::shared();
    let wrong_key = b64("this is not the account key of devstoreaccount1");
    let cs = format!(
        "AccountName={ACCOUNT};AccountKey={wrong_key};QueueEndpoint={}",
        az.endpoint()
    );
    let q = QueueService::new(&settings(&cs))
        .unwrap()
        .queue(&unique_name("auth"))
        .unwrap();
    let e = q.create_if_missing().await.unwrap_err();
    assert!(matches!(e, QueueError::Auth { .. }), "{e:?}");
    let shown = format!("{e} {e:?}");
    assert!(shown.contains("AZURE_STORAGE_CONNECTION_STRING"), "{shown}");
    assert!(
        !shown.contains(&wrong_key) && !shown.contains(ACCOUNT_KEY),
        "{shown}"
    );
    assert!(!e.is_transient());
}

#[tokio::test]
async fn sas_connection_strings_work_and_expired_ones_are_auth_errors() {
    let az = Azurite::shared();
    let sas = account_sas("2099-01-01T00:00:00Z");
    let cs = format!(
        "QueueEndpoint={}/;SharedAccessSignature=?{sas}",
        az.endpoint()
    );
    let svc = QueueService::new(&settings(&cs)).unwrap();
    assert!(svc.describe().ends_with("(SAS)"), "{}", svc.describe());
    let q = svc.queue(&unique_name("sas")).unwrap();
    q.create_if_missing().await.unwrap();
    q.send("via sas", None, None).await.unwrap();
    let m = q
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let receipt = q
        .update_visibility(&m.id, &m.pop_receipt, Duration::from_secs(10))
        .await
        .unwrap();
    q.delete(&m.id, &receipt).await.unwrap();

    let expired = account_sas("2001-01-01T00:00:00Z");
    let sig = expired.split("sig=").nth(1).unwrap().to_owned();
    let cs = format!(
        "QueueEndpoint={};SharedAccessSignature={expired}",
        az.endpoint()
    );
    let e = QueueService::new(&settings(&cs))
        .unwrap()
        .queue(q.name())
        .unwrap()
        .approximate_count()
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Auth { .. }), "{e:?}");
    let shown = format!("{e} {e:?}");
    assert!(
        shown.contains("SharedAccessSignature") && !shown.contains(&sig),
        "{shown}"
    );
}

/// The outbox's blob container: written (created on first use), read back
/// byte for byte (above the SDK's 4 MiB partition size, so staged blocks and
/// ranged reads are signed too), overwritten, deleted; missing is `None`.
#[tokio::test]
async fn claim_store_puts_gets_and_deletes_blobs_with_shared_key_and_sas() {
    let az = Azurite::shared();
    let container = unique_name("claims");
    let store = az.claims(&container);
    assert_eq!(store.get("a.json").await.unwrap(), None, "no container yet");
    store.delete("a.json").await.unwrap();
    let big: Vec<u8> = (0..5 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    store.put("a.json", big.clone()).await.unwrap();
    assert!(
        store.get("a.json").await.unwrap() == Some(big),
        "read back whole"
    );
    store.put("a.json", b"again".to_vec()).await.unwrap();
    assert_eq!(store.get("a.json").await.unwrap(), Some(b"again".to_vec()));
    store.delete("a.json").await.unwrap();
    assert_eq!(store.get("a.json").await.unwrap(), None);

    let with_sas = |ss: &str| {
        let cs = format!(
            "QueueEndpoint={};BlobEndpoint={};SharedAccessSignature={}",
            az.endpoint(),
            az.blob_endpoint(),
            account_sas_for(ss, "2099-01-01T00:00:00Z")
        );
        worker::queue::ClaimStore::new(&settings(&cs), &container).unwrap()
    };
    let store = with_sas("bq");
    store.put("b.json", b"via sas".to_vec()).await.unwrap();
    assert_eq!(
        store.get("b.json").await.unwrap(),
        Some(b"via sas".to_vec())
    );
    store.delete("b.json").await.unwrap();
    // A SAS for queues only: refused, saying what the blob service needs.
    let e = with_sas("q")
        .put("c.json", b"x".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Auth { .. }), "{e:?}");
    assert!(
        e.to_string().contains("ss to include b") && !e.to_string().contains("sig="),
        "{e}"
    );
}

#[tokio::test]
async fn use_development_storage_reaches_azurite_on_its_default_port() {
    // UseDevelopmentStorage=true means Azurite's account on 127.0.0.1:10001.
    let svc = QueueService::new(&settings("UseDevelopmentStorage=true")).unwrap();
    assert_eq!(
        svc.describe(),
        "account devstoreaccount1 at http://127.0.0.1:10001/devstoreaccount1 (shared key)"
    );
    // End to end without taking port 10001, which another test run (or
    // anything else) may hold: the worker's storage client honours
    // HTTP_PROXY, and the proxy, on a port of its own, forwards to the shared
    // Azurite. The URLs it is asked for prove the address; Azurite accepting
    // the requests proves the well-known account key.
    let az = Azurite::shared();
    let (proxy, urls) = forward_proxy(az.port());
    let client = unique_name("devstorage");
    let mut cmd = worker_command(Some("UseDevelopmentStorage=true"));
    cmd.env("HTTP_PROXY", format!("http://127.0.0.1:{proxy}"))
        .args(["enqueue", "--client", &client, "--task-type", "echo"])
        .args(["--task-id", "dev-1"]);
    let o = run_bounded(cmd);
    assert!(o.status.success(), "{}", explain(&o));
    let urls: Vec<String> = urls.try_iter().collect();
    assert!(
        !urls.is_empty()
            && urls
                .iter()
                .all(|u| u.starts_with("http://127.0.0.1:10001/devstoreaccount1/")),
        "{urls:?}"
    );
    let q = service(az).queue(&format!("{client}-tasks")).unwrap();
    let got = q.receive(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 1, "{}", explain(&o));
    let task: serde_json::Value = serde_json::from_str(&got[0].text).unwrap();
    assert_eq!(task["task_id"], "dev-1");
}

/// An HTTP forward proxy on a free port that sends every request, whatever
/// absolute URL it names, to 127.0.0.1:`upstream` with the same method,
/// path, query, headers and body. Returns its port and the URLs asked for.
fn forward_proxy(upstream: u16) -> (u16, mpsc::Receiver<String>) {
    use http_body_util::{BodyExt, Full};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, urls) = mpsc::channel();
    // Its own thread and runtime: the test blocks on the worker meanwhile.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (tx, http) = (tx.clone(), http.clone());
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (tx, http) = (tx.clone(), http.clone());
                        async move {
                            let _ = tx.send(req.uri().to_string());
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                            let mut headers = parts.headers;
                            for h in ["host", "proxy-connection", "connection"] {
                                headers.remove(h);
                            }
                            let rsp = http
                                .request(parts.method, format!("http://127.0.0.1:{upstream}{path}"))
                                .headers(headers)
                                .body(body)
                                .send()
                                .await
                                .unwrap();
                            let mut out = hyper::Response::builder().status(rsp.status());
                            for (k, v) in rsp.headers() {
                                if !matches!(
                                    k.as_str(),
                                    "content-length" | "transfer-encoding" | "connection"
                                ) {
                                    out = out.header(k, v);
                                }
                            }
                            let bytes = rsp.bytes().await.unwrap();
                            Ok::<_, std::convert::Infallible>(out.body(Full::new(bytes)).unwrap())
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    (port, urls)
}

#[tokio::test]
async fn closed_port_is_a_transient_error_without_a_long_wait() {
    // Bound but not listening: connections are refused, and nothing else can
    // take the port while the test holds it.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let cs = format!(
        "AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT}"
    );
    let q = QueueService::new(&settings(&cs))
        .unwrap()
        .queue("unreachable")
        .unwrap();
    let started = Instant::now();
    let e = q.receive(1, Duration::from_secs(30)).await.unwrap_err();
    // A hang guard, not a performance assertion: the SDK default took 82 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(e.is_transient(), "{e:?}");
    let shown = e.to_string();
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(
        shown.contains("refused"),
        "a closed port, not something else: {shown}"
    );
    assert!(!shown.contains(ACCOUNT_KEY), "{shown}");
    drop(closed);
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_transient_error() {
    // Accepts connections and reads requests, but never responds.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            open.push(sock);
        }
    });
    let cs = format!(
        "AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT}"
    );
    let q = QueueService::new(&settings(&cs))
        .unwrap()
        .queue("hung")
        .unwrap();
    let started = Instant::now();
    let e = q.approximate_count().await.unwrap_err();
    // Hang guard only (expected: about two 10 s tries).
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );
    assert!(e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
    server.abort();
}

#[tokio::test]
async fn messages_survive_an_azurite_restart() {
    let mut az = Azurite::start_persistent();
    let port = az.port();
    let q = fresh_queue(&az, "restart").await;
    q.send("durable", None, None).await.unwrap();

    az.stop();
    let e = q.approximate_count().await.unwrap_err();
    assert!(e.is_transient(), "while stopped: {e:?}");

    az.restart();
    assert_eq!(az.port(), port);
    // The same client keeps working once the service is back.
    let m = q.receive(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(m.len(), 1, "{}", az.output());
    assert_eq!(m[0].text, "durable");
}

// ---- the `worker` binary ------------------------------------------------

const STORAGE_VARS: &[&str] = &[
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_QUEUE_ENDPOINT",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_CLIENT_ID",
    "WORKER_CLIENT",
    "WORKER_QUEUE_NAME",
    "WORKER_HANDLERS_FILE",
    "WORKER_WEBHOOK_SECRET",
    "WORKER_MODE",
    "TASK_DATA",
];

/// A developer's proxy settings would reroute the worker's storage calls.
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// A worker still running after this is hung; the test fails and kills it.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn worker_command(connection_string: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    for v in STORAGE_VARS.iter().chain(PROXY_VARS) {
        cmd.env_remove(v);
    }
    if let Some(cs) = connection_string {
        cmd.env("AZURE_STORAGE_CONNECTION_STRING", cs);
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn worker(connection_string: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = worker_command(connection_string);
    cmd.args(args);
    run_bounded(cmd)
}

/// Runs `cmd` to completion like `Command::output`, but kills it and fails
/// the test if it is still running after [`HANG_GUARD`].
fn run_bounded(mut cmd: Command) -> Output {
    use std::io::Read;

    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {HANG_GUARD:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    let take = |rx: mpsc::Receiver<Vec<u8>>, what: &str| {
        rx.recv_timeout(left)
            .unwrap_or_else(|_| panic!("{cmd:?} exited but its {what} stayed open"))
    };
    let stdout = take(stdout, "stdout");
    let stderr = take(stderr, "stderr");
    Output {
        status,
        stdout,
        stderr,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn explain(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `task_id=… message_id=…` → (task id, message id).
fn parse_enqueue(o: &Output) -> (String, String) {
    let out = stdout(o);
    let line = out.trim();
    let mut task_id = None;
    let mut message_id = None;
    for part in line.split(' ') {
        if let Some(v) = part.strip_prefix("task_id=") {
            task_id = Some(v.to_owned());
        } else if let Some(v) = part.strip_prefix("message_id=") {
            message_id = Some(v.to_owned());
        }
    }
    (
        task_id.unwrap_or_else(|| panic!("{}", explain(o))),
        message_id.unwrap_or_else(|| panic!("{}", explain(o))),
    )
}

#[tokio::test]
async fn enqueue_sends_a_valid_envelope_plain_or_base64() {
    let az = Azurite::shared();
    let cs = az.connection_string();
    let client = unique_name("enq");
    let o = worker(
        Some(&cs),
        &[
            "enqueue",
            "--client",
            &client,
            "--task-type",
            "echo",
            "--payload",
            r#"{"n":1}"#,
            "--webhook-url",
            "https://example.com/hook",
            "--task-id",
            "given-id",
        ],
    );
    assert!(o.status.success(), "{}", explain(&o));
    let (task_id, message_id) = parse_enqueue(&o);
    assert_eq!(task_id, "given-id");

    let o = worker(
        Some(&cs),
        &[
            "enqueue",
            "--client",
            &client,
            "--task-type",
            "sleep",
            "--base64",
            "--ttl",
            "-1",
        ],
    );
    assert!(o.status.success(), "{}", explain(&o));
    let (generated_id, _) = parse_enqueue(&o);
    assert!(
        uuid::Uuid::parse_str(&generated_id).is_ok(),
        "{generated_id}"
    );

    let q = service(az).queue(&format!("{client}-tasks")).unwrap();
    let got = q.receive(32, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, message_id);
    let (t, enc) = worker::task::decode(got[0].text.as_bytes()).unwrap();
    assert_eq!(enc, worker::task::Encoding::Json);
    assert_eq!(
        (
            t.task_id.as_str(),
            t.task_type.as_str(),
            t.client.as_deref()
        ),
        ("given-id", "echo", Some(client.as_str()))
    );
    assert_eq!(t.payload, serde_json::json!({"n": 1}));
    assert_eq!(t.webhook_url.unwrap().as_str(), "https://example.com/hook");
    assert!(!got[1].text.starts_with('{'));
    let (t, enc) = worker::task::decode(got[1].text.as_bytes()).unwrap();
    assert_eq!(enc, worker::task::Encoding::Base64);
    assert_eq!(t.task_id, generated_id);

    // Refused before anything is sent.
    let o = worker(
        Some(&cs),
        &[
            "enqueue",
            "--client",
            &client,
            "--task-type",
            "echo",
            "--payload",
            "{oops",
        ],
    );
    assert!(!o.status.success(), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--payload"),
        "{}",
        explain(&o)
    );
    let o = worker(
        Some(&cs),
        &["enqueue", "--client", "a1,b1", "--task-type", "echo"],
    );
    assert!(!o.status.success(), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exactly one"),
        "{}",
        explain(&o)
    );
}

#[tokio::test]
async fn check_reports_each_item() {
    let az = Azurite::shared();
    let cs = az.connection_string();
    let client = unique_name("check");
    let o = worker(
        Some(&cs),
        &["enqueue", "--client", &client, "--task-type", "echo"],
    );
    assert!(o.status.success(), "{}", explain(&o));

    let o = worker(Some(&cs), &["check", "--client", &client]);
    assert!(o.status.success(), "{}", explain(&o));
    let out = stdout(&o);
    assert!(out.contains("ok   handlers"), "{out}");
    assert!(
        out.contains("ok   storage: account devstoreaccount1 at http://127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains(&format!("ok   queue {client}-tasks: about 1 messages")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok   queue {client}-tasks-poison: not created yet"
        )),
        "{out}"
    );
    assert!(!out.contains(ACCOUNT_KEY), "{out}");

    // A second client whose queue does not exist.
    let absent = unique_name("absent");
    let o = worker(
        Some(&cs),
        &["check", "--client", &format!("{client},{absent}")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("ok   queue {client}-tasks")), "{out}");
    assert!(
        out.contains(&format!("FAIL queue {absent}-tasks: does not exist")),
        "{out}"
    );

    // A wrong key.
    let bad = format!(
        "AccountName={ACCOUNT};AccountKey={};QueueEndpoint={}",
        b64("wrong key"),
        az.endpoint()
    );
    let o = worker(Some(&bad), &["check", "--client", &client]);
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "FAIL queue {client}-tasks: storage authorization failed"
        )),
        "{out}"
    );
    assert!(!out.contains(&b64("wrong key")), "{out}");

    // Valid configuration but no queue named.
    let o = worker(Some(&cs), &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    let out = stdout(&o);
    assert!(out.contains("ok   storage"), "{out}");
    assert!(
        out.contains("FAIL queues: no queue configured: set WORKER_CLIENT"),
        "{out}"
    );

    // Nothing configured at all.
    let o = worker(None, &["check", "--client", &client]);
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    let out = stdout(&o);
    assert!(
        out.contains("FAIL storage: ") && out.contains("AZURE_STORAGE_CONNECTION_STRING"),
        "{out}"
    );

    // A broken handlers file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("handlers.toml");
    std::fs::write(&file, "this is not toml = = =").unwrap();
    let o = worker(
        Some(&cs),
        &[
            "check",
            "--client",
            &client,
            "--handlers-file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    assert!(
        stdout(&o).contains(&format!("FAIL handlers file {}", file.display())),
        "{}",
        explain(&o)
    );
}

#[tokio::test]
async fn poison_list_and_replay() {
    let az = Azurite::shared();
    let cs = az.connection_string();
    let client = unique_name("poison");
    let svc = service(az);
    let tasks = svc.queue(&format!("{client}-tasks")).unwrap();
    let poison = svc.queue(&format!("{client}-tasks-poison")).unwrap();

    // Nothing poisoned yet.
    let o = worker(Some(&cs), &["poison", "list", "--client", &client]);
    assert!(o.status.success(), "{}", explain(&o));
    assert!(stdout(&o).contains("does not exist"), "{}", explain(&o));

    poison.create_if_missing().await.unwrap();
    let texts = [
        r#"{"task_id":"p1","task_type":"fail"}"#.to_owned(),
        b64(r#"{"task_id":"p2","task_type":"echo"}"#),
        "not a task at all".to_owned(),
        r#"{"task_id":"p4","task_type":"echo"}"#.to_owned(),
    ];
    let mut ids = Vec::new();
    for t in &texts {
        ids.push(poison.send(t, None, Some(-1)).await.unwrap().message_id);
    }

    let o = worker(Some(&cs), &["poison", "list", "--client", &client]);
    assert!(o.status.success(), "{}", explain(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with('#')
            && lines[0].contains("about 4 messages")
            && lines[0].contains("at most 32"),
        "{out}"
    );
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[1].starts_with(&ids[0]) && lines[1].contains("task_id=p1 task_type=fail"),
        "{out}"
    );
    assert!(lines[2].contains("task_id=p2 task_type=echo"), "{out}");
    assert!(
        lines[3].contains("task=undecodable") && lines[3].ends_with("not a task at all"),
        "{out}"
    );

    // By task id (the base64 one): moved, the rest stays and is released at once.
    let o = worker(
        Some(&cs),
        &["poison", "replay", "--client", &client, "--task-id", "p2"],
    );
    assert!(o.status.success(), "{}", explain(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "replayed {} task_id=p2 -> {client}-tasks message_id=",
            ids[1]
        )),
        "{out}"
    );
    let back = tasks.receive(32, Duration::from_secs(30)).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(
        back[0].text, texts[1],
        "the original text, encoding included"
    );
    assert_eq!(back[0].dequeue_count, 1, "a new message with a fresh count");
    assert_eq!(
        poison.peek(32).await.unwrap().len(),
        3,
        "the others are visible again"
    );

    // By message id.
    let o = worker(
        Some(&cs),
        &[
            "poison",
            "replay",
            "--client",
            &client,
            "--message-id",
            &ids[2],
        ],
    );
    assert!(o.status.success(), "{}", explain(&o));
    assert!(
        stdout(&o).contains(&format!("replayed {} task_id=- ", ids[2])),
        "{}",
        explain(&o)
    );

    // No match: exit 1, nothing moved.
    let o = worker(
        Some(&cs),
        &["poison", "replay", "--client", &client, "--task-id", "nope"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    assert!(stdout(&o).contains("no message"), "{}", explain(&o));
    assert_eq!(poison.peek(32).await.unwrap().len(), 2, "{}", explain(&o));

    // Everything else.
    let o = worker(
        Some(&cs),
        &["poison", "replay", "--client", &client, "--all"],
    );
    assert!(o.status.success(), "{}", explain(&o));
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.starts_with("replayed "))
            .count(),
        2,
        "{}",
        explain(&o)
    );
    assert!(poison.peek(32).await.unwrap().is_empty());
    assert_eq!(poison.approximate_count().await.unwrap(), 0);
    let mut back: Vec<String> = tasks
        .receive(32, Duration::from_secs(30))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    back.sort();
    let mut expected = vec![texts[0].clone(), texts[2].clone(), texts[3].clone()];
    expected.sort();
    assert_eq!(back, expected, "p2 is still leased from the first check");

    // Empty poison queue: --all succeeds with nothing to do.
    let o = worker(
        Some(&cs),
        &["poison", "replay", "--client", &client, "--all"],
    );
    assert!(o.status.success(), "{}", explain(&o));
    assert!(stdout(&o).contains("nothing to replay"), "{}", explain(&o));
}
