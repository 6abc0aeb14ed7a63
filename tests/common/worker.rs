//! Running the real `worker` binary: a builder with a scrubbed environment,
//! a handle on the running process that follows its stderr line by line, and
//! the collected output once it exits.
//!
//! Every worker gets its own temp dir as working directory and an environment
//! holding only PATH plus what the test sets, so a developer's own `RUST_LOG`,
//! `TASK_DATA` or storage settings cannot leak in.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_worker");
/// A worker still running after this is hung; the test fails and kills it.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

pub struct Worker {
    cmd: Command,
    dir: tempfile::TempDir,
    stdin: Option<Vec<u8>>,
}

impl Worker {
    /// The binary with a clean environment: PATH, plus the settings every
    /// webhook test needs (loopback allowed, quick retries).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .current_dir(dir.path())
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("WORKER_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1")
            .env("WORKER_WEBHOOK_INITIAL_BACKOFF", "0.05")
            .env("WORKER_WEBHOOK_TIMEOUT", "5")
            .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "3");
        Self {
            cmd,
            dir,
            stdin: None,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write file");
        p
    }

    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn env_remove(mut self, k: &str) -> Self {
        self.cmd.env_remove(k);
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn task(self, task: &Value) -> Self {
        self.env("TASK_DATA", task.to_string())
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn spawn(mut self) -> Running {
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.cmd.spawn().expect("spawn worker");
        if let Some(bytes) = self.stdin.take() {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let mut out = child.stdout.take().expect("stdout pipe");
        let stdout = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        });
        let err = child.stderr.take().expect("stderr pipe");
        let (tx, lines) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(err).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
            stderr: Some(stderr),
            dir: Some(self.dir),
        }
    }

    pub fn run(self) -> Output {
        self.spawn().finish()
    }
}

impl Default for Worker {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<()>>,
    /// `Some` until the output is collected (`Running` has a `Drop`).
    dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Blocks until a stderr line contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str) {
        self.wait_for_logs(needle, 1);
    }

    /// Blocks until `n` stderr lines (counted from the start) contain `needle`.
    pub fn wait_for_logs(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + HANG_GUARD;
        let mut hits = self.seen.iter().filter(|l| l.contains(needle)).count();
        while hits < n && Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    hits += usize::from(line.contains(needle));
                    self.seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if hits >= n {
            return;
        }
        let _ = self.child.kill();
        panic!(
            "worker never logged {needle:?} {n} times; stderr so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// Every stderr line so far.
    pub fn logs(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count_logs(&mut self, needle: &str) -> usize {
        self.seen.extend(self.lines.try_iter());
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        nix::sys::signal::kill(pid, sig).expect("send signal");
    }

    /// SIGKILL: no destructor, no settlement, nothing.
    pub fn kill(mut self) -> Output {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let status = self.child.wait().expect("wait");
        self.collect(status)
    }

    /// Waits for exit (killing the worker and failing the test past the hang guard).
    pub fn finish(self) -> Output {
        self.finish_within(HANG_GUARD)
    }

    /// Waits for exit, failing the test (and killing the worker) after `guard`.
    pub fn finish_within(mut self, guard: Duration) -> Output {
        let deadline = Instant::now() + guard;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let rest: Vec<String> = self.lines.try_iter().collect();
                panic!(
                    "worker still running after {guard:?}; killed. stderr:\n{}\n{}",
                    self.seen.join("\n"),
                    rest.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = self.collect(status);
        assert!(
            !out.stderr.contains("panicked") && !out.stdout.contains("panicked"),
            "the worker panicked:\n{}",
            out.describe()
        );
        out
    }

    fn collect(mut self, status: ExitStatus) -> Output {
        // The pipes close when the worker and every child holding them are
        // gone; a child left behind must fail the test, not hang it.
        let deadline = Instant::now() + HANG_GUARD;
        let done = |a: &Option<JoinHandle<Vec<u8>>>, b: &Option<JoinHandle<()>>| {
            a.as_ref().is_none_or(JoinHandle::is_finished)
                && b.as_ref().is_none_or(JoinHandle::is_finished)
        };
        while !done(&self.stdout, &self.stderr) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !done(&self.stdout, &self.stderr) {
            self.seen.extend(self.lines.try_iter());
            panic!(
                "the worker exited ({status}) but its stdout or stderr is still open {HANG_GUARD:?} later (a child process left behind?); stderr:\n{}",
                self.seen.join("\n")
            );
        }
        let stdout = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        self.seen.extend(self.lines.try_iter());
        Output {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: self.seen.join("\n"),
            dir: self.dir.take().expect("output collected once"),
        }
    }
}

impl Drop for Running {
    /// A test that fails half-way must not leave a worker behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub dir: tempfile::TempDir,
}

impl Output {
    pub fn describe(&self) -> String {
        format!(
            "exit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }

    /// The single JSON line single-task mode prints on stdout.
    pub fn event(&self) -> Value {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "stdout should be one event line:\n{}",
            self.describe()
        );
        serde_json::from_str(lines[0]).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}", self.describe());
        })
    }

    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// How many stderr lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.stderr.lines().filter(|l| l.contains(needle)).count()
    }
}
