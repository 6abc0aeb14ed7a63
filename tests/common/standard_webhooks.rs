//! Signatures checked by an implementation that is not ours: the official
//! Standard Webhooks library for Python (pinned in
//! `tests/fixtures/webhook-verify/requirements.txt`), installed into a venv
//! under `target/` the first time a test needs it, like Azurite from npm.
//!
//! Every read from a Python process is bounded: a webhook that never comes,
//! or a verifier that hangs, fails the test with a message instead of
//! holding it until CI's limit.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::receiver::Request;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhook-verify");

/// Python start-up plus the import; only guards against a hang.
const START_BOUND: Duration = Duration::from_secs(60);

/// A Standard Webhooks secret of 32 `byte`s.
pub fn signing_secret(byte: u8) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    )
}

/// The venv's Python with the pinned library, made once per test process.
pub fn venv_python() -> PathBuf {
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
        "the signature checks need Python 3 with the venv module: install it (Debian: apt-get install python3 python3-venv)"
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

/// A child's stdout lines, readable with a bound.
struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn follow(child: &mut Child) -> Self {
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// The next line, or why there is none within `bound`.
    fn next(&self, bound: Duration) -> Result<String, String> {
        self.rx.recv_timeout(bound).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => format!("nothing within {bound:?}"),
            mpsc::RecvTimeoutError::Disconnected => "the process exited without a line".into(),
        })
    }
}

/// Verifies `req` as a Standard Webhooks receiver would: `Ok(event)` or
/// `Err("<error type>: <reason>")` from the official library.
pub fn verify(req: &Request, secret: &str) -> Result<Value, String> {
    let headers: serde_json::Map<String, Value> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                Value::from(v.to_str().expect("ASCII header")),
            )
        })
        .collect();
    let input = json!({
        "secret": secret,
        "headers": headers,
        "body": base64::engine::general_purpose::STANDARD.encode(&req.body),
    });
    let mut child = Command::new(venv_python())
        .arg(Path::new(FIXTURES).join("verify.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start verify.py");
    let lines = Lines::follow(&mut child);
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.to_string().as_bytes()).unwrap();
    drop(stdin);
    let line = lines.next(START_BOUND);
    let _ = child.kill();
    let _ = child.wait();
    let line = line.unwrap_or_else(|e| panic!("verify.py gave no verdict: {e}"));
    parse_verdict(&line)
}

/// Fails the test unless the official library accepts `req`'s signature.
pub fn assert_verifies(req: &Request, secret: &str) -> Value {
    verify(req, secret).unwrap_or_else(|e| {
        panic!("the official Standard Webhooks library rejects the signature: {e}\n{req:#?}")
    })
}

fn parse_verdict(line: &str) -> Result<Value, String> {
    if let Some(event) = line.strip_prefix("VERIFIED ") {
        return Ok(serde_json::from_str(event).expect("the verified event is JSON"));
    }
    match line.strip_prefix("REJECTED ") {
        Some(reason) => Err(reason.to_owned()),
        None => panic!("unexpected verifier output: {line:?}"),
    }
}

/// `receiver.py`: a webhook endpoint that verifies the one request it gets.
pub struct PythonReceiver {
    child: Child,
    lines: Lines,
    pub port: u16,
    bound: Duration,
}

impl PythonReceiver {
    /// Listens on a free port for one webhook signed with `secret`, for at
    /// most `bound`.
    pub fn start(secret: &str, bound: Duration) -> Self {
        let mut child = Command::new(venv_python())
            .arg(Path::new(FIXTURES).join("receiver.py"))
            .arg(secret)
            .arg(bound.as_secs_f64().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start receiver.py");
        let lines = Lines::follow(&mut child);
        let port = lines
            .next(START_BOUND)
            .unwrap_or_else(|e| panic!("receiver.py printed no port: {e}"));
        let port = port
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("receiver.py printed {port:?} for its port: {e}"));
        Self {
            child,
            lines,
            port,
            bound,
        }
    }

    /// The verdict on the one request: `Ok(event)` or `Err(reason)`; fails the
    /// test (with `context`, e.g. the worker's output) when no webhook came.
    pub fn verdict(&mut self, context: &str) -> Result<Value, String> {
        let line = self
            .lines
            .next(self.bound + START_BOUND)
            .unwrap_or_else(|e| panic!("receiver.py gave no verdict: {e}\n{context}"));
        if line == "NO REQUEST" {
            panic!(
                "no webhook reached receiver.py within {:?}\n{context}",
                self.bound
            );
        }
        parse_verdict(&line)
    }
}

impl Drop for PythonReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
