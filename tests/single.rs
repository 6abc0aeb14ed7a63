//! Single-task mode end to end: the real `worker` binary, a real HTTP receiver
//! on 127.0.0.1, real child processes. Each test gets its own temp dir (the
//! worker's working directory) and a scrubbed environment, so a developer's
//! own `RUST_LOG` or `TASK_DATA` cannot leak in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use common::receiver::{Receiver, Reply, Request};
use common::worker::Worker;
/// How long to wait for a webhook that should arrive (it normally has by the
/// time the worker exits, because delivery happens before exit).
const ARRIVAL: Duration = Duration::from_secs(5);

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A valid Standard Webhooks secret (32 bytes).
fn secret() -> String {
    format!("whsec_{}", b64([0x5au8; 32]))
}

// ---------------------------------------------------------------------------
// Webhook checks

/// Checked by the official Python library, not by the crate that signs.
fn verify_signature(req: &Request, secret: &str) {
    common::standard_webhooks::assert_verifies(req, secret);
}

/// The Standard Webhooks headers and ours, on every delivery.
fn assert_delivery_headers(req: &Request) {
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.header("user-agent"),
        Some(concat!("worker/", env!("CARGO_PKG_VERSION")))
    );
    let id = req.header("webhook-id").expect("webhook-id header");
    assert!(
        id.starts_with("msg_") && id.len() == 36,
        "webhook-id {id:?}"
    );
    let ts: i64 = req
        .header("webhook-timestamp")
        .expect("webhook-timestamp header")
        .parse()
        .expect("webhook-timestamp is an integer");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (now - ts).abs() < 300,
        "webhook-timestamp {ts} vs now {now}"
    );
}

/// The event body, checked against the contract's exact shape.
fn assert_event_shape(event: &Value) {
    let obj = event.as_object().expect("event is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["data", "timestamp", "type"], "{event}");
    let ts = event["timestamp"].as_str().expect("timestamp is a string");
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {ts:?} is not RFC 3339: {e}"));
    let data = event["data"].as_object().expect("data is an object");
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempt",
            "client",
            "duration_ms",
            "error",
            "result",
            "status",
            "task_id",
            "task_type"
        ],
        "{event}"
    );
    assert_eq!(data["attempt"], 1);
    assert!(data["duration_ms"].is_u64(), "{event}");
    let kind = event["type"].as_str().expect("type is a string");
    let status = data["status"].as_str().expect("status is a string");
    assert_eq!(kind, format!("task.{status}"), "{event}");
}

fn hook(receiver: &Receiver) -> String {
    receiver.url("/hooks/task")
}

// ---------------------------------------------------------------------------
// Outcomes

#[test]
fn echo_success_notifies_per_contract() {
    let rx = Receiver::ok();
    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", secret())
        .task(&json!({
            "task_id": "t-echo-1",
            "task_type": "echo",
            "payload": {"greeting": "héllo", "n": [1, 2, 3]},
            "webhook_url": hook(&rx),
            "client": "acme",
        }))
        .run();
    out.assert_code(0);
    let event = out.event();
    let req = rx.recv(ARRIVAL).expect("a webhook request");
    assert_eq!(req.uri, "/hooks/task");
    assert_delivery_headers(&req);
    verify_signature(&req, &secret());
    // The webhook body is exactly what stdout reports.
    assert_eq!(req.text(), out.stdout.trim_end());
    let body = req.json();
    assert_eq!(body, event);
    assert_event_shape(&body);
    assert_eq!(body["type"], "task.succeeded");
    assert_eq!(
        body["data"],
        json!({
            "task_id": "t-echo-1",
            "task_type": "echo",
            "client": "acme",
            "status": "succeeded",
            "result": {"greeting": "héllo", "n": [1, 2, 3]},
            "error": null,
            "attempt": 1,
            "duration_ms": body["data"]["duration_ms"],
        })
    );
    assert!(rx.drain().is_empty(), "exactly one delivery");
}

#[test]
fn unsigned_without_secret() {
    let rx = Receiver::ok();
    let out = Worker::new()
        .task(&json!({"task_id": "t-u", "task_type": "echo", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(0);
    let req = rx.recv(ARRIVAL).expect("a webhook request");
    assert_delivery_headers(&req);
    assert_eq!(req.header("webhook-signature"), None);
    assert_eq!(req.json()["data"]["client"], Value::Null);
    assert_eq!(req.json()["data"]["result"], Value::Null);
}

#[test]
fn fail_handler_reports_task_failed() {
    let rx = Receiver::ok();
    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", secret())
        .task(&json!({
            "task_id": "t-fail",
            "task_type": "fail",
            "payload": {"message": "the disk is on fire"},
            "webhook_url": hook(&rx),
        }))
        .run();
    out.assert_code(1);
    let req = rx.recv(ARRIVAL).expect("a webhook request");
    verify_signature(&req, &secret());
    let body = req.json();
    assert_event_shape(&body);
    assert_eq!(body, out.event());
    assert_eq!(body["type"], "task.failed");
    assert_eq!(body["data"]["status"], "failed");
    assert_eq!(body["data"]["error"], "the disk is on fire");
    assert_eq!(body["data"]["result"], Value::Null);
    assert_eq!(body["data"]["task_type"], "fail");
}

#[test]
fn timeout_reports_timed_out_and_exits() {
    let rx = Receiver::ok();
    // The sleep is far longer than the hang guard: finishing at all proves
    // the worker stopped the handler instead of waiting for it.
    let out = Worker::new()
        .env("WORKER_TASK_TIMEOUT", "1")
        .task(&json!({
            "task_id": "t-slow",
            "task_type": "sleep",
            "payload": {"seconds": 600},
            "webhook_url": hook(&rx),
        }))
        .run();
    out.assert_code(1);
    let body = rx.recv(ARRIVAL).expect("a webhook request").json();
    assert_event_shape(&body);
    assert_eq!(body["type"], "task.timed_out");
    assert_eq!(body["data"]["status"], "timed_out");
    assert_eq!(body["data"]["error"], "timed out after 1s");
    assert!(
        body["data"]["duration_ms"].as_u64().unwrap() >= 1000,
        "{body}"
    );
    assert_eq!(out.event()["type"], "task.timed_out");
}

#[test]
fn sigterm_cancels_the_running_task() {
    let rx = Receiver::ok();
    let mut running = Worker::new()
        .task(&json!({
            "task_id": "t-term",
            "task_type": "sleep",
            "payload": {"seconds": 600},
            "webhook_url": hook(&rx),
        }))
        .spawn();
    running.wait_for_log("task started");
    running.signal(nix::sys::signal::Signal::SIGTERM);
    let out = running.finish();
    out.assert_code(1);
    let body = rx.recv(ARRIVAL).expect("a webhook request").json();
    assert_event_shape(&body);
    assert_eq!(body["type"], "task.failed");
    assert_eq!(body["data"]["error"], "cancelled");
    assert!(out.stderr.contains("signal received"), "{}", out.describe());
}

#[test]
fn base64_task_data() {
    let rx = Receiver::ok();
    let envelope = json!({
        "task_id": "t-b64",
        "task_type": "echo",
        "payload": {"via": "base64"},
        "webhook_url": hook(&rx),
    });
    let out = Worker::new()
        .env("TASK_DATA", b64(envelope.to_string()))
        .run();
    out.assert_code(0);
    let body = rx.recv(ARRIVAL).expect("a webhook request").json();
    assert_eq!(body["type"], "task.succeeded");
    assert_eq!(body["data"]["task_id"], "t-b64");
    assert_eq!(body["data"]["result"], json!({"via": "base64"}));
}

#[test]
fn run_subcommand_reads_flag_file_and_stdin() {
    let task = json!({"task_id": "t-run", "task_type": "echo", "payload": 42});
    // --task
    let out = Worker::new()
        .arg("run")
        .arg("--task")
        .arg(task.to_string())
        .run();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["result"], 42);
    // --task with base64
    let out = Worker::new()
        .arg("run")
        .arg("--task")
        .arg(b64(task.to_string()))
        .run();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["task_id"], "t-run");
    // --task-file
    let w = Worker::new();
    let f = w.write("task.json", task.to_string());
    let out = w.arg("run").arg("--task-file").arg(f).run();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["result"], 42);
    // --task-file - (stdin)
    let out = Worker::new()
        .arg("run")
        .arg("--task-file")
        .arg("-")
        .stdin(task.to_string())
        .run();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["result"], 42);
    // `run` without a flag falls back to TASK_DATA
    let out = Worker::new().arg("run").task(&task).run();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["result"], 42);
}

#[test]
fn large_valid_task_file_is_accepted() {
    let blob = "x".repeat(8 * 1024 * 1024);
    let w = Worker::new();
    let f = w.write(
        "big.json",
        json!({"task_id": "t-big", "task_type": "echo", "payload": {"blob": blob}}).to_string(),
    );
    let out = w.arg("run").arg("--task-file").arg(f).run();
    out.assert_code(0);
    assert_eq!(
        out.event()["data"]["result"]["blob"].as_str().map(str::len),
        Some(blob.len())
    );
}

// ---------------------------------------------------------------------------
// Webhook delivery and retries

#[test]
fn webhook_5xx_is_retried_with_the_same_id() {
    let rx = Receiver::start([Reply::status(500), Reply::status(200)]);
    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", secret())
        .task(&json!({"task_id": "t-retry", "task_type": "echo", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(0);
    let first = rx.recv(ARRIVAL).expect("first attempt");
    let second = rx.recv(ARRIVAL).expect("second attempt");
    assert!(rx.drain().is_empty(), "no third attempt after a 200");
    for r in [&first, &second] {
        assert_delivery_headers(r);
        verify_signature(r, &secret());
    }
    assert_eq!(first.header("webhook-id"), second.header("webhook-id"));
    assert_eq!(first.body, second.body, "a retry resends the same event");
    assert!(
        out.stderr.contains("webhook delivered"),
        "{}",
        out.describe()
    );
}

#[test]
fn webhook_429_with_retry_after_is_retried() {
    let rx = Receiver::start([
        Reply::status(429).retry_after("0"),
        Reply::status(503).retry_after("0"),
        Reply::status(204),
    ]);
    let out = Worker::new()
        .task(&json!({"task_id": "t-429", "task_type": "echo", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(0);
    let ids: Vec<String> = (0..3)
        .map(|_| {
            rx.recv(ARRIVAL)
                .expect("an attempt")
                .header("webhook-id")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(rx.drain().is_empty());
}

#[test]
fn webhook_4xx_is_not_retried() {
    let rx = Receiver::start([Reply::status(400).body("no such task"), Reply::status(200)]);
    let out = Worker::new()
        .task(&json!({"task_id": "t-400", "task_type": "echo", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(0); // the task succeeded; the webhook's fate does not change that
    assert!(rx.recv(ARRIVAL).is_some());
    assert!(rx.drain().is_empty(), "a 400 must not be retried");
    assert!(
        out.stderr.contains("webhook not delivered")
            && out.stderr.contains("400")
            && out.stderr.contains("no such task"),
        "{}",
        out.describe()
    );
}

#[test]
fn webhook_gives_up_after_max_attempts_without_changing_exit_code() {
    for (task_type, code) in [("echo", 0), ("fail", 1)] {
        let rx = Receiver::start([Reply::status(503)]);
        let out = Worker::new()
            .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "4")
            .task(&json!({"task_id": "t-down", "task_type": task_type, "webhook_url": hook(&rx)}))
            .run();
        out.assert_code(code);
        let reqs: Vec<Request> =
            std::iter::from_fn(|| rx.recv(Duration::from_millis(500))).collect();
        assert_eq!(reqs.len(), 4, "exactly WORKER_WEBHOOK_MAX_ATTEMPTS tries");
        assert!(reqs
            .iter()
            .all(|r| r.header("webhook-id") == reqs[0].header("webhook-id")));
        assert!(
            out.stderr.contains("gave up after 4 attempts"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn webhook_timeout_is_retried() {
    let rx = Receiver::start([
        Reply::status(200).delay(Duration::from_secs(10)),
        Reply::status(200),
    ]);
    let out = Worker::new()
        .env("WORKER_WEBHOOK_TIMEOUT", "0.5")
        .task(&json!({"task_id": "t-slowhook", "task_type": "echo", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(0);
    let a = rx.recv(ARRIVAL).expect("first attempt");
    let b = rx.recv(ARRIVAL).expect("second attempt");
    assert_eq!(a.header("webhook-id"), b.header("webhook-id"));
    assert!(
        out.stderr.contains("webhook delivered"),
        "{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// Egress guard

#[test]
fn webhooks_to_private_addresses_are_refused_without_allow_list() {
    let rx = Receiver::ok();
    for url in [
        rx.url("/a"),
        format!("http://localhost:{}/b", rx.port()),
        "http://169.254.169.254/metadata/identity/oauth2/token".to_owned(),
    ] {
        for (task_type, code) in [("echo", 0), ("fail", 1)] {
            let out = Worker::new()
                .env_remove("WORKER_WEBHOOK_ALLOWED_HOSTS")
                .task(&json!({"task_id": "t-egress", "task_type": task_type, "webhook_url": url}))
                .run();
            out.assert_code(code);
            assert!(
                out.stderr.contains("webhook not delivered")
                    && out.stderr.contains("non-public address"),
                "{url}: {}",
                out.describe()
            );
            assert!(
                rx.recv(Duration::from_millis(200)).is_none(),
                "{url}: a request reached the receiver"
            );
        }
    }
}

#[test]
fn http_handler_refuses_loopback_without_allow_list() {
    let rx = Receiver::ok();
    for url in [rx.url("/x"), format!("http://localhost:{}/y", rx.port())] {
        let out = Worker::new()
            .env_remove("WORKER_WEBHOOK_ALLOWED_HOSTS")
            .task(&json!({"task_id": "t-ssrf", "task_type": "http", "payload": {"url": url}}))
            .run();
        out.assert_code(1);
        let error = out.event()["data"]["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains("request refused") && error.contains("non-public address"),
            "{error}"
        );
        assert!(rx.recv(Duration::from_millis(200)).is_none(), "{url}");
    }
}

#[test]
fn http_handler_reaches_allowed_host() {
    let rx = Receiver::start([Reply::json(201, &json!({"created": true}))]);
    let out = Worker::new()
        .task(&json!({
            "task_id": "t-http",
            "task_type": "http",
            "payload": {
                "method": "post",
                "url": rx.url("/api/things?x=1"),
                "headers": {"x-trace": "abc"},
                "json": {"name": "thing"},
            },
        }))
        .run();
    out.assert_code(0);
    let req = rx.recv(ARRIVAL).expect("the http task's request");
    assert_eq!(req.method, "POST");
    assert_eq!(req.uri, "/api/things?x=1");
    assert_eq!(req.header("x-trace"), Some("abc"));
    assert_eq!(req.json(), json!({"name": "thing"}));
    let result = &out.event()["data"]["result"];
    assert_eq!(result["status"], 201);
    assert_eq!(result["body"], json!({"created": true}));
    assert_eq!(result["headers"]["content-type"], "application/json");
}

#[test]
fn http_handler_4xx_fails_with_the_answer() {
    let rx = Receiver::start([Reply::status(404).body("gone")]);
    let out = Worker::new()
        .task(
            &json!({"task_id": "t-404", "task_type": "http", "payload": {"url": rx.url("/nope")}}),
        )
        .run();
    out.assert_code(1);
    let error = out.event()["data"]["error"].as_str().unwrap().to_owned();
    assert!(error.contains("404") && error.contains("gone"), "{error}");
}

// ---------------------------------------------------------------------------
// Exec handlers

/// `[handlers.NAME]` with `command = ["sh", "-c", script]`.
fn sh_handler(name: &str, script: &str, extra: &str) -> String {
    format!("[handlers.{name}]\ncommand = [\"sh\", \"-c\", {script:?}]\n{extra}\n")
}

#[test]
fn exec_handler_success_stdin_to_stdout() {
    let rx = Receiver::ok();
    let w = Worker::new();
    let toml = sh_handler(
        "wrap",
        r#"IFS= read -r line || true; printf '{"got":%s,"id":"%s","attempt":%s}' "$line" "$WORKER_TASK_ID" "$WORKER_ATTEMPT""#,
        "description = \"wraps the task\"",
    );
    let handlers = w.write("handlers.toml", toml);
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .task(&json!({
            "task_id": "t-exec",
            "task_type": "wrap",
            "payload": {"items": [1, 2], "s": "a \"quoted\" string"},
            "webhook_url": hook(&rx),
            "client": "acme",
        }))
        .run();
    out.assert_code(0);
    let body = rx.recv(ARRIVAL).expect("webhook").json();
    assert_event_shape(&body);
    assert_eq!(body["type"], "task.succeeded");
    let result = &body["data"]["result"];
    assert_eq!(result["id"], "t-exec");
    assert_eq!(result["attempt"], 1);
    assert_eq!(result["got"]["task_id"], "t-exec");
    assert_eq!(result["got"]["task_type"], "wrap");
    assert_eq!(result["got"]["client"], "acme");
    assert_eq!(
        result["got"]["payload"],
        json!({"items": [1, 2], "s": "a \"quoted\" string"})
    );
}

#[test]
fn exec_handler_failure_carries_stderr_tail() {
    let rx = Receiver::ok();
    let w = Worker::new();
    let toml = sh_handler(
        "noisy",
        r#"i=1; while [ $i -le 25 ]; do echo "stderr line $i" >&2; i=$((i+1)); done; exit 7"#,
        "",
    );
    let handlers = w.write("handlers.toml", toml);
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .task(&json!({"task_id": "t-noisy", "task_type": "noisy", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(1);
    let body = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(body["type"], "task.failed");
    let error = body["data"]["error"].as_str().unwrap();
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("handler `noisy` failed with exit status 7: stderr line 6"),
        "{error}"
    );
    assert_eq!(lines.last().copied(), Some("stderr line 25"), "{error}");
    assert_eq!(lines.len(), 20, "the last 20 stderr lines: {error}");
}

/// Whether `pid` is still a live process (a zombie counts as dead).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
        }
    }
}

fn read_pid(p: &Path) -> i32 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{} was not written: {e}", p.display()))
        .trim()
        .parse()
        .expect("a pid")
}

fn assert_dies(pid: i32, what: &str) {
    // SIGKILL is asynchronous: give the kernel a moment to finish the job.
    for _ in 0..200 {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    panic!("{what} {pid} survived the worker");
}

#[test]
fn exec_timeouts_kill_the_whole_process_group() {
    // Once by the task timeout (task.timed_out), once by the handler's own
    // timeout_seconds (task.failed): either way no descendant survives.
    for (extra, timeout, kind) in [
        ("", "2", "task.timed_out"),
        ("timeout_seconds = 1.0", "60", "task.failed"),
    ] {
        let rx = Receiver::ok();
        let w = Worker::new();
        let child_pid = w.path("child.pid");
        let grandchild_pid = w.path("grandchild.pid");
        let script = format!(
            "echo $$ > '{}'; sleep 600 & echo $! > '{}'; wait",
            child_pid.display(),
            grandchild_pid.display()
        );
        let handlers = w.write("handlers.toml", sh_handler("stuck", &script, extra));
        let out = w
            .env("WORKER_HANDLERS_FILE", handlers)
            .env("WORKER_TASK_TIMEOUT", timeout)
            .task(&json!({"task_id": "t-stuck", "task_type": "stuck", "webhook_url": hook(&rx)}))
            .run();
        out.assert_code(1);
        let body = rx.recv(ARRIVAL).expect("webhook").json();
        assert_eq!(body["type"], kind, "{body}");
        if kind == "task.failed" {
            let error = body["data"]["error"].as_str().unwrap();
            assert!(error.contains("process group was killed"), "{error}");
        }
        assert_dies(read_pid(&out.dir.path().join("child.pid")), "child");
        assert_dies(
            read_pid(&out.dir.path().join("grandchild.pid")),
            "grandchild",
        );
    }
}

#[test]
fn exec_environment_is_scrubbed_and_values_never_logged() {
    let listed = "listed-value-7f3a9c";
    let unlisted = "unlisted-value-2b8e41";
    let w = Worker::new();
    let dump = w.path("env.dump");
    let script = format!(
        "env > '{}'; if [ -n \"${{WORKER_TEST_UNLISTED+x}}\" ]; then u=true; else u=false; fi; \
         printf '{{\"unlisted_visible\":%s,\"listed_len\":%s}}' $u ${{#WORKER_TEST_LISTED}}",
        dump.display()
    );
    let handlers = w.write(
        "handlers.toml",
        sh_handler("envcheck", &script, "env = [\"WORKER_TEST_LISTED\"]"),
    );
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .env("RUST_LOG", "trace")
        .env("WORKER_TEST_LISTED", listed)
        .env("WORKER_TEST_UNLISTED", unlisted)
        .env("WORKER_WEBHOOK_SECRET", secret())
        .env(
            "AZURE_STORAGE_CONNECTION_STRING",
            "AccountName=x;AccountKey=ZmFrZWtleQ==",
        )
        .task(&json!({"task_id": "t-env", "task_type": "envcheck"}))
        .run();
    out.assert_code(0);
    assert_eq!(
        out.event()["data"]["result"],
        json!({"unlisted_visible": false, "listed_len": listed.len()})
    );
    let env = std::fs::read_to_string(out.dir.path().join("env.dump")).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    assert!(
        env.contains(&format!("WORKER_TEST_LISTED={listed}")),
        "{env}"
    );
    for hidden in [
        "WORKER_TEST_UNLISTED",
        "WORKER_WEBHOOK_SECRET",
        "AZURE_STORAGE_CONNECTION_STRING",
        "WORKER_HANDLERS_FILE",
        "RUST_LOG",
    ] {
        assert!(
            !names.contains(&hidden),
            "{hidden} leaked to the child: {env}"
        );
    }
    assert!(
        names.contains(&"PATH") && names.contains(&"WORKER_TASK_ID"),
        "{env}"
    );
    for value in [listed, unlisted] {
        assert!(
            !out.stderr.contains(value),
            "{value} appears in the logs:\n{}",
            out.stderr
        );
    }
}

#[test]
fn handlers_subcommand_lists_exec_handlers() {
    let w = Worker::new();
    let handlers = w.write(
        "handlers.toml",
        "[handlers.resize]\ncommand = [\"python3\", \"resize.py\"]\ndescription = \"resizes images\"\n",
    );
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .arg("handlers")
        .run();
    out.assert_code(0);
    let names: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        ["echo", "fail", "http", "resize", "sleep"],
        "{}",
        out.stdout
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("resize"))
        .unwrap();
    assert!(
        line.contains("resizes images") && line.contains("exec: python3 resize.py"),
        "{line}"
    );
}

#[test]
fn invalid_handlers_file_is_reported() {
    let w = Worker::new();
    let handlers = w.write("handlers.toml", "[handlers.x]\ncommand = []\n");
    let out = w
        .env("WORKER_HANDLERS_FILE", &handlers)
        .task(&json!({"task_id": "t", "task_type": "echo"}))
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("WORKER_HANDLERS_FILE") && out.stderr.contains("[handlers.x]"),
        "{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// Malformed input

enum Input {
    /// TASK_DATA, raw bytes.
    Env(Vec<u8>),
    /// `worker run --task-file F`.
    File(Vec<u8>),
    /// `worker run --task-file -`.
    Stdin(Vec<u8>),
    /// `worker run --task-file` naming a file that does not exist.
    MissingFile,
}

struct Case {
    name: &'static str,
    input: Input,
    /// Must appear in stdout or stderr.
    says: &'static str,
    /// The input carries a readable webhook URL, so a task.failed must arrive.
    webhook: bool,
}

fn env(s: impl Into<Vec<u8>>) -> Input {
    Input::Env(s.into())
}

fn malformed_cases() -> Vec<Case> {
    let c = |name, input, says, webhook| Case {
        name,
        input,
        says,
        webhook,
    };
    let deep = "[".repeat(100_000);
    let deep_payload = format!(
        r#"{{"task_id":"d","task_type":"echo","webhook_url":"{{HOOK}}","payload":{}"#,
        r#"{"a":"#.repeat(100_000)
    );
    let big_missing_id = format!(
        r#"{{"task_type":"echo","webhook_url":"{{HOOK}}","payload":"{}"}}"#,
        "y".repeat(5 * 1024 * 1024)
    );
    let mut over_limit = br#"{"task_id":"big","task_type":"echo","payload":""#.to_vec();
    over_limit.resize(16 * 1024 * 1024 + 10, b'z');
    over_limit.extend_from_slice(b"\"}");
    vec![
        c("empty", env(""), "task data is empty", false),
        c("whitespace", env(" \n\t \r\n"), "task data is empty", false),
        c(
            "invalid UTF-8",
            env(&b"\xff\xfe\xfd"[..]),
            "not valid UTF-8",
            false,
        ),
        c(
            "invalid UTF-8 inside JSON",
            env(&b"{\"task_id\":\"\xc3\x28\",\"task_type\":\"echo\"}"[..]),
            "not valid UTF-8 (first invalid byte at offset 12)",
            false,
        ),
        c(
            "truncated JSON",
            env(r#"{"task_id":"a","task_type":"ec"#),
            "not valid JSON: EOF while parsing",
            false,
        ),
        c("lone brace", env("{"), "not valid JSON", false),
        c(
            "array",
            env("[1,2,3]"),
            "must be a JSON object, found an array",
            false,
        ),
        c(
            "string",
            env(r#""echo""#),
            "must be a JSON object, found a string",
            false,
        ),
        c(
            "number",
            env("42"),
            "must be a JSON object, found a number",
            false,
        ),
        c(
            "null",
            env("null"),
            "must be a JSON object, found null",
            false,
        ),
        c(
            "boolean",
            env("true"),
            "must be a JSON object, found a boolean",
            false,
        ),
        c(
            "missing task_id",
            env(r#"{"task_type":"echo","webhook_url":"{HOOK}"}"#),
            "field `task_id` is required",
            true,
        ),
        c(
            "null task_id",
            env(r#"{"task_id":null,"task_type":"echo","webhook_url":"{HOOK}"}"#),
            "field `task_id` is required",
            true,
        ),
        c(
            "missing task_type",
            env(r#"{"task_id":"a","webhook_url":"{HOOK}"}"#),
            "field `task_type` is required",
            true,
        ),
        c(
            "empty task_type",
            env(r#"{"task_id":"a","task_type":"","webhook_url":"{HOOK}"}"#),
            "field `task_type` must not be empty",
            true,
        ),
        c(
            "blank task_id",
            env(r#"{"task_id":"   ","task_type":"echo","webhook_url":"{HOOK}"}"#),
            "field `task_id` must not be empty",
            true,
        ),
        c(
            "non-string task_id",
            env(r#"{"task_id":17,"task_type":"echo","webhook_url":"{HOOK}"}"#),
            "field `task_id` must be a string, found a number",
            true,
        ),
        c(
            "non-string task_type",
            env(r#"{"task_id":"x","task_type":7,"webhook_url":"{HOOK}"}"#),
            "field `task_type` must be a string, found a number",
            true,
        ),
        c(
            "non-string client",
            env(r#"{"task_id":"x","task_type":"echo","client":["a"],"webhook_url":"{HOOK}"}"#),
            "field `client` must be a string, found an array",
            true,
        ),
        c(
            "bad webhook scheme",
            env(r#"{"task_id":"x","task_type":"echo","webhook_url":"ftp://127.0.0.1/x"}"#),
            "scheme `ftp` is not allowed",
            false,
        ),
        c(
            "relative webhook URL",
            env(r#"{"task_id":"x","task_type":"echo","webhook_url":"/hooks/done"}"#),
            "field `webhook_url` is invalid: relative URL without a base",
            false,
        ),
        c(
            "webhook URL without host",
            env(r#"{"task_id":"x","task_type":"echo","webhook_url":"http://"}"#),
            "field `webhook_url` is invalid: empty host",
            false,
        ),
        c(
            "non-string webhook URL",
            env(r#"{"task_id":"x","task_type":"echo","webhook_url":{"url":"x"}}"#),
            "field `webhook_url` must be a string, found an object",
            false,
        ),
        c(
            "invalid base64 (length)",
            env("abcde"),
            "neither JSON nor base64-encoded JSON",
            false,
        ),
        c(
            "invalid base64 (padding)",
            env("eyJ0YXNrX2lkIjoiYSJ9="),
            "neither JSON nor base64-encoded JSON",
            false,
        ),
        c(
            "base64 of non-JSON",
            env(b64("hello, world")),
            "not valid JSON",
            false,
        ),
        c(
            "base64 of invalid UTF-8",
            env(b64([0xffu8, 0xfe, 0x00, 0x41])),
            "as base64 it decodes to bytes that are not valid UTF-8",
            false,
        ),
        c(
            "base64 of an envelope missing task_type",
            env(b64(r#"{"task_id":"b","webhook_url":"{HOOK}"}"#)),
            "field `task_type` is required",
            true,
        ),
        c(
            "100 000 levels of nesting",
            Input::File(deep.into_bytes()),
            "recursion limit exceeded",
            false,
        ),
        c(
            "100 000 levels of nesting in the payload",
            Input::File(deep_payload.into_bytes()),
            "recursion limit exceeded",
            false,
        ),
        c(
            "5 MB envelope missing task_id",
            Input::File(big_missing_id.into_bytes()),
            "field `task_id` is required",
            true,
        ),
        c(
            "file above the 16 MiB limit",
            Input::File(over_limit),
            "above the 16777216-byte limit",
            false,
        ),
        c(
            "UTF-8 byte-order mark",
            Input::File(
                [
                    &b"\xef\xbb\xbf"[..],
                    br#"{"task_id":"a","task_type":"echo"}"#,
                ]
                .concat(),
            ),
            "byte-order mark",
            false,
        ),
        c(
            "NUL bytes",
            Input::File(vec![0, 0, 0, 0]),
            "not valid JSON",
            false,
        ),
        c(
            "NUL inside a string",
            Input::File(b"{\"task_id\":\"a\0b\",\"task_type\":\"echo\"}".to_vec()),
            "control character",
            false,
        ),
        c(
            "trailing garbage",
            env(r#"{"task_id":"a","task_type":"echo"} {"#),
            "trailing characters",
            false,
        ),
        c(
            "prose on stdin",
            Input::Stdin(b"please run the echo task".to_vec()),
            "neither JSON nor base64-encoded JSON",
            false,
        ),
        c(
            "unknown task type",
            env(r#"{"task_id":"u","task_type":"nope","webhook_url":"{HOOK}"}"#),
            "unknown task type `nope`; registered types: echo, fail, http, sleep",
            true,
        ),
        c(
            "invalid sleep payload",
            env(
                r#"{"task_id":"s","task_type":"sleep","payload":{"seconds":"soon"},"webhook_url":"{HOOK}"}"#,
            ),
            "invalid `sleep` payload",
            true,
        ),
        c(
            "missing task file",
            Input::MissingFile,
            "cannot open task file",
            false,
        ),
    ]
}

#[test]
fn malformed_inputs_fail_cleanly() {
    let rx = Receiver::ok();
    let cases = malformed_cases();
    assert!(cases.len() >= 20);
    for (i, case) in cases.into_iter().enumerate() {
        let url = rx.url(&format!("/case/{i}"));
        let fill = |b: Vec<u8>| -> Vec<u8> {
            // `{HOOK}` only ever appears in ASCII inputs.
            match String::from_utf8(b) {
                Ok(s) => s.replace("{HOOK}", &url).into_bytes(),
                Err(e) => e.into_bytes(),
            }
        };
        let w = Worker::new();
        let w = match case.input {
            // Base64 inputs were encoded with the placeholder inside: re-encode.
            Input::Env(b) if case.name.starts_with("base64 of an envelope") => {
                let inner = base64::engine::general_purpose::STANDARD
                    .decode(&b)
                    .unwrap();
                w.env("TASK_DATA", b64(fill(inner)))
            }
            Input::Env(b) => w.env("TASK_DATA", OsStr::from_bytes(&fill(b))),
            Input::File(b) => {
                let f = w.write("task.json", fill(b));
                w.arg("run").arg("--task-file").arg(f)
            }
            Input::Stdin(b) => w.arg("run").arg("--task-file").arg("-").stdin(fill(b)),
            Input::MissingFile => {
                let f = w.path("no-such-task.json");
                w.arg("run").arg("--task-file").arg(f)
            }
        };
        let out = w.run();
        assert_eq!(
            out.code,
            Some(1),
            "case {:?}:\n{}",
            case.name,
            out.describe()
        );
        assert!(
            out.output().contains(case.says),
            "case {:?}: output should say {:?}:\n{}",
            case.name,
            case.says,
            out.describe()
        );
        if !out.stdout.is_empty() {
            let event = out.event();
            assert_event_shape(&event);
            assert_eq!(event["type"], "task.failed", "case {:?}", case.name);
        }
        if case.webhook {
            let req = rx
                .recv(ARRIVAL)
                .unwrap_or_else(|| panic!("case {:?}: no webhook arrived", case.name));
            assert_eq!(req.uri, format!("/case/{i}"), "case {:?}", case.name);
            let body = req.json();
            assert_event_shape(&body);
            assert_eq!(body["type"], "task.failed");
            assert!(
                body["data"]["error"].as_str().unwrap().contains(case.says),
                "case {:?}: {body}",
                case.name
            );
        } else {
            let stray = rx.drain();
            assert!(
                stray.is_empty(),
                "case {:?}: unexpected {stray:?}",
                case.name
            );
        }
    }
}

#[test]
fn salvaged_webhook_carries_what_could_be_read() {
    let rx = Receiver::ok();
    let out = Worker::new()
        .task(&json!({"task_id": "x", "task_type": 7, "client": "acme", "webhook_url": hook(&rx)}))
        .run();
    out.assert_code(1);
    let body = rx.recv(ARRIVAL).expect("webhook").json();
    assert_event_shape(&body);
    assert_eq!(body["data"]["task_id"], "x");
    assert_eq!(body["data"]["task_type"], "unknown");
    assert_eq!(body["data"]["client"], "acme");
    assert_eq!(
        body["data"]["error"],
        "invalid task: field `task_type` must be a string, found a number"
    );
}

// ---------------------------------------------------------------------------
// Usage errors and secrets

#[test]
fn usage_errors_exit_2_and_name_the_setting() {
    let rx = Receiver::ok();
    let task = json!({"task_id": "t-usage", "task_type": "echo", "webhook_url": hook(&rx)});
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "WORKER_WEBHOOK_SECRET",
            "whsec_!!!not-base64-SECRETPART".into(),
            "SECRETPART",
        ),
        (
            "WORKER_WEBHOOK_SECRET",
            format!("whsec_{}", b64(b"tenbytes!!")),
            "dGVuYnl0ZXMhIQ",
        ),
        (
            "WORKER_WEBHOOK_SECRET",
            "hunter2-plain-password".into(),
            "hunter2",
        ),
        ("WORKER_TASK_TIMEOUT", "abc".into(), ""),
        ("WORKER_TASK_TIMEOUT", "-5".into(), ""),
        ("WORKER_WEBHOOK_MAX_ATTEMPTS", "0".into(), ""),
        ("WORKER_WEBHOOK_INITIAL_BACKOFF", "soon".into(), ""),
        ("WORKER_LOG_FORMAT", "xml".into(), ""),
        ("WORKER_WEBHOOK_ALLOWED_HOSTS", "not a host".into(), ""),
    ];
    for (var, value, must_not_show) in cases {
        let out = Worker::new().env(var, &value).task(&task).run();
        out.assert_code(2);
        assert!(
            out.stderr.contains(var),
            "{var}={value}: stderr should name {var}:\n{}",
            out.describe()
        );
        if !must_not_show.is_empty() {
            assert!(
                !out.output().contains(must_not_show),
                "{var}: the secret value was printed:\n{}",
                out.describe()
            );
        }
        assert!(
            rx.drain().is_empty(),
            "{var}: nothing may run on a usage error"
        );
    }
    for args in [
        vec!["run", "--bogus"],
        vec!["run", "--task", "{}", "--task-file", "x.json"],
    ] {
        let out = Worker::new().task(&task);
        let out = args.iter().fold(out, |w, a| w.arg(a)).run();
        out.assert_code(2);
    }
}

#[test]
fn secrets_never_reach_logs_and_json_lines_carry_the_task() {
    let rx = Receiver::start([Reply::status(500), Reply::status(200)]);
    let account_key = "QWNjb3VudEtleVRoYXRNdXN0TmV2ZXJCZUxvZ2dlZDEyMzQ=";
    let conn = format!(
        "DefaultEndpointsProtocol=http;AccountName=devaccount;AccountKey={account_key};\
         QueueEndpoint=http://127.0.0.1:1/devaccount"
    );
    let token = "tok-d41d8cd98f00b204";
    let out = Worker::new()
        .env("RUST_LOG", "trace")
        .env("WORKER_LOG_FORMAT", "json")
        .env("WORKER_WEBHOOK_SECRET", secret())
        .env("AZURE_STORAGE_CONNECTION_STRING", &conn)
        .task(&json!({
            "task_id": "t-secret",
            "task_type": "echo",
            "payload": {"ok": true},
            "webhook_url": format!("{}?token={token}", hook(&rx)),
            "client": "acme",
        }))
        .run();
    out.assert_code(0);
    assert_eq!(
        rx.recv(ARRIVAL).expect("first attempt").uri,
        format!("/hooks/task?token={token}")
    );
    verify_signature(&rx.recv(ARRIVAL).expect("second attempt"), &secret());
    let secret_key = secret();
    let secret_body = secret_key.trim_start_matches("whsec_");
    for needle in [secret_body, account_key, &conn, token] {
        assert!(
            !out.output().contains(needle),
            "{needle:?} appears in the output:\n{}",
            out.describe()
        );
    }
    let mut worker_lines = 0;
    let mut seen = Vec::new();
    for line in out.stderr.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        let target = v["target"].as_str().unwrap_or_default();
        if target.starts_with("worker") {
            worker_lines += 1;
            assert_eq!(v["span"]["task_id"], "t-secret", "{line}");
            assert_eq!(v["span"]["task_type"], "echo", "{line}");
            assert_eq!(v["span"]["client"], "acme", "{line}");
            seen.push(v["message"].as_str().unwrap_or_default().to_owned());
        }
    }
    for msg in [
        "task started",
        "task succeeded",
        "webhook attempt failed; retrying",
        "webhook delivered",
    ] {
        assert!(seen.iter().any(|m| m == msg), "no {msg:?} line in {seen:?}");
    }
    assert!(worker_lines >= 4);
}

#[test]
fn env_var_listing_is_json_lines() {
    let out = Worker::new().arg("env-vars").run();
    out.assert_code(0);
    let vars: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let find = |n: &str| vars.iter().find(|v| v["name"] == n).cloned();
    assert_eq!(find("WORKER_WEBHOOK_SECRET").unwrap()["secret"], true);
    assert_eq!(
        find("AZURE_STORAGE_CONNECTION_STRING").unwrap()["secret"],
        true
    );
    assert_eq!(find("WORKER_TASK_TIMEOUT").unwrap()["secret"], false);
    assert!(find("TASK_DATA").is_some());
}

#[test]
fn url_query_tokens_stay_out_of_logs_when_requests_fail() {
    // Transport errors (here: timeouts) are where an HTTP client likes to
    // quote the whole URL, query string and all.
    let rx = Receiver::start([Reply::status(200).delay(Duration::from_secs(30))]);
    let hook_token = "hooktoken-93be1c";
    let sas_sig = "sig=SASsignature-5d1f0a";
    let out = Worker::new()
        .env("RUST_LOG", "trace")
        .env("WORKER_WEBHOOK_TIMEOUT", "1")
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "2")
        .task(&json!({
            "task_id": "t-tokens",
            "task_type": "http",
            "payload": {"url": rx.url(&format!("/blob?sv=2024&{sas_sig}")), "timeout_seconds": 1},
            "webhook_url": rx.url(&format!("/hook?token={hook_token}")),
        }))
        .run();
    out.assert_code(1);
    let event = out.event();
    let error = event["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("/blob?redacted failed") && error.contains("timed out"),
        "{error}"
    );
    assert!(
        out.stderr.contains("webhook not delivered"),
        "{}",
        out.describe()
    );
    for needle in [hook_token, sas_sig] {
        assert!(
            !out.output().contains(needle),
            "{needle:?} appears in the output:\n{}",
            out.describe()
        );
    }
    // Both requests did go out, with their query strings intact.
    let uris: Vec<String> = std::iter::from_fn(|| rx.recv(Duration::from_millis(500)))
        .map(|r| r.uri)
        .collect();
    assert_eq!(uris.len(), 3, "{uris:?}");
    assert!(
        uris[0].contains(sas_sig) && uris[1].contains(hook_token),
        "{uris:?}"
    );
}

#[test]
fn worker_run_without_a_task_runs_the_built_in_example() {
    // README's first command: no TASK_DATA, no --task, no Azure account.
    let out = Worker::new().arg("run").run();
    out.assert_code(0);
    let event = out.event();
    assert_eq!(event["type"], "task.succeeded", "{}", out.describe());
    assert_eq!(event["data"]["task_id"], "example-1");
    assert_eq!(event["data"]["result"], json!({"hello": "world"}));
}
