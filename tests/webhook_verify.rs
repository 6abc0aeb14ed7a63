//! Signatures checked by an implementation that is not ours: the official
//! Standard Webhooks library for Python, installed pinned into a venv under
//! `target/` the first time (like Azurite from npm), receiving a real webhook
//! from the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

use base64::Engine;
use serde_json::json;

use common::worker::Worker;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhook-verify");

/// A venv with the pinned library, made once per test process.
fn venv_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(install_venv).clone()
}

/// Creates the venv, or reuses it while requirements.txt is unchanged.
fn install_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/webhook-verify-venv");
    let python = venv.join("bin/python");
    let requirements =
        std::fs::read_to_string(Path::new(FIXTURES).join("requirements.txt")).unwrap();
    let stamp = venv.join("requirements.txt");
    if python.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(requirements.as_str())
    {
        return python;
    }
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    assert!(
        created.is_ok_and(|s| s.success()),
        "this test needs Python 3 with the venv module: install it (Debian: apt-get install python3 python3-venv)"
    );
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(Path::new(FIXTURES).join("requirements.txt"))
        .status()
        .unwrap();
    assert!(
        installed.success(),
        "pip could not install tests/fixtures/webhook-verify/requirements.txt"
    );
    std::fs::write(&stamp, requirements).unwrap();
    python
}

/// A Standard Webhooks secret of 32 `byte`s.
fn signing_secret(byte: u8) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    )
}

/// `receiver.py` running, with the port it printed.
struct PythonReceiver {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

impl PythonReceiver {
    fn start(secret: &str) -> Self {
        let mut child = Command::new(venv_python())
            .arg(Path::new(FIXTURES).join("receiver.py"))
            .arg(secret)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
        Self { child, lines, port }
    }

    /// The `VERIFIED …` or `REJECTED …` line for the one request it handles.
    fn verdict(&mut self) -> String {
        let line = self.lines.next().unwrap().unwrap();
        let _ = self.child.wait();
        line
    }
}

#[test]
fn official_python_library_verifies_the_signature() {
    let secret = signing_secret(7);
    let mut receiver = PythonReceiver::start(&secret);

    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", &secret)
        .task(&json!({
            "task_id": "py-1",
            "task_type": "echo",
            // Non-ASCII and escapes: the signed bytes must be exactly the body sent.
            "payload": {"text": "héllo \"wörld\" ✓", "n": 1.5},
            "webhook_url": format!("http://127.0.0.1:{}/hooks?x=1", receiver.port),
        }))
        .run();
    out.assert_code(0);
    let verdict = receiver.verdict();
    let event: serde_json::Value = serde_json::from_str(
        verdict
            .strip_prefix("VERIFIED ")
            .unwrap_or_else(|| panic!("{verdict}\n{}", out.describe())),
    )
    .unwrap();
    assert_eq!(event["type"], "task.succeeded");
    assert_eq!(event["data"]["result"]["text"], "héllo \"wörld\" ✓");
}

#[test]
fn official_python_library_rejects_a_different_secret() {
    let secret = signing_secret(7);
    let other = signing_secret(8);
    let mut receiver = PythonReceiver::start(&other);
    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", &secret)
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .task(&json!({"task_id": "py-2", "task_type": "echo",
                      "webhook_url": format!("http://127.0.0.1:{}/", receiver.port)}))
        .run();
    // A rejected webhook never changes the task's outcome.
    out.assert_code(0);
    let verdict = receiver.verdict();
    assert!(verdict.starts_with("REJECTED"), "{verdict}");
}
