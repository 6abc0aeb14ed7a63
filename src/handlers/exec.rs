//! Exec handlers: existing Python/Node/shell handlers, run as child processes.
//!
//! The operator declares them in a TOML file (`WORKER_HANDLERS_FILE`); a task
//! can only pick one by `task_type`, never supply a command. The child gets
//! the whole task JSON on stdin, a scrubbed environment (PATH, HOME, LANG plus
//! the variables the operator lists), and its own process group so that a
//! timeout or cancellation kills everything it started, not just the first
//! process. The kill lives in a `Drop` guard because [`crate::execute`]
//! aborts the handler future on timeout: whatever path ends the future, the
//! group dies with it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::handler::{Handler, HandlerError, HandlerFuture, TaskContext};

/// Variables every child inherits; everything else must be listed.
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG"];
/// Stderr lines kept for the error message of a failed run.
const STDERR_TAIL: usize = 20;
/// Cap on a child's stdout (the task result).
const MAX_STDOUT_BYTES: usize = 16 * 1024 * 1024;
/// Largest `timeout_seconds`: a year, the same bound as `WORKER_TASK_TIMEOUT`.
const MAX_TIMEOUT_SECONDS: f64 = 31_536_000.0;
/// Largest `kill_grace_seconds`: the grace delays the worker's exit.
const MAX_KILL_GRACE_SECONDS: f64 = 60.0;

#[derive(Debug, thiserror::Error)]
pub enum HandlersFileError {
    #[error("cannot read handlers file {path} (WORKER_HANDLERS_FILE): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("handlers file {path} (WORKER_HANDLERS_FILE) is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    handlers: BTreeMap<String, Spec>,
}

/// One `[handlers.NAME]` table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// argv; no shell is involved.
    pub command: Vec<String>,
    pub working_dir: Option<PathBuf>,
    /// Names of env vars passed through to the child (values never logged).
    #[serde(default)]
    pub env: Vec<String>,
    /// Capped by the task timeout.
    pub timeout_seconds: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when the child must stop.
    pub kill_grace_seconds: Option<f64>,
    /// Shown by `worker handlers`.
    pub description: Option<String>,
    /// Exit codes that mean "retrying cannot help": poison at once.
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only names of pass-through variables, never their values.
        f.debug_struct("Spec")
            .field("command", &self.command)
            .field("working_dir", &self.working_dir)
            .field("env", &self.env)
            .field("timeout_seconds", &self.timeout_seconds)
            .field("kill_grace_seconds", &self.kill_grace_seconds)
            .field("permanent_exit_codes", &self.permanent_exit_codes)
            .finish()
    }
}

/// A task type and the handler that serves it.
pub type NamedHandler = (String, Arc<dyn Handler>);

/// Reads and validates a handlers file.
pub fn load(path: &Path) -> Result<Vec<NamedHandler>, HandlersFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| HandlersFileError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|message| HandlersFileError::Invalid {
        path: path.into(),
        message,
    })
}

/// Parses handlers-file text; the error says which handler and field is wrong.
pub fn parse(text: &str) -> Result<Vec<NamedHandler>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Vec<NamedHandler> = Vec::new();
    for (name, spec) in file.handlers {
        if spec.command.is_empty() || spec.command[0].is_empty() {
            return Err(format!("[handlers.{name}]: `command` must name a program"));
        }
        check_range(
            &name,
            "timeout_seconds",
            spec.timeout_seconds,
            |t| t > 0.0 && t <= MAX_TIMEOUT_SECONDS,
            &format!(
                "a number of seconds greater than 0 and at most {MAX_TIMEOUT_SECONDS} (a year)"
            ),
        )?;
        check_range(
            &name,
            "kill_grace_seconds",
            spec.kill_grace_seconds,
            |g| (0.0..=MAX_KILL_GRACE_SECONDS).contains(&g),
            &format!("a number of seconds from 0 to {MAX_KILL_GRACE_SECONDS}"),
        )?;
        if let Some(c) = spec
            .permanent_exit_codes
            .iter()
            .find(|c| !(1..=255).contains(*c))
        {
            return Err(format!(
                "[handlers.{name}]: `permanent_exit_codes` holds {c}, which is out of range: \
                 exit codes of a failed run are 1 to 255"
            ));
        }
        out.push((name.clone(), Arc::new(Exec { name, spec })));
    }
    Ok(out)
}

/// Refuses a numeric setting outside its range (NaN and infinities included),
/// naming the handler and the field.
fn check_range(
    name: &str,
    field: &str,
    value: Option<f64>,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<(), String> {
    match value {
        Some(v) if !(v.is_finite() && ok(v)) => Err(format!(
            "[handlers.{name}]: `{field}` = {v} is out of range: use {expected}"
        )),
        _ => Ok(()),
    }
}

pub struct Exec {
    name: String,
    spec: Spec,
}

impl Exec {
    pub fn spec(&self) -> &Spec {
        &self.spec
    }
}

/// Kills the child's whole process group when dropped.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (group already gone) is the normal case after a clean exit.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Handler for Exec {
    fn description(&self) -> String {
        let argv = self.spec.command.join(" ");
        match &self.spec.description {
            Some(d) => format!("{d} (exec: {argv})"),
            None => format!("exec: {argv}"),
        }
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext, _payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(self.run_child(ctx))
    }
}

impl Exec {
    async fn run_child(&self, ctx: &TaskContext) -> Result<Value, HandlerError> {
        let spec = &self.spec;
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for var in BASE_ENV
            .iter()
            .copied()
            .chain(spec.env.iter().map(String::as_str))
        {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        cmd.env("WORKER_TASK_ID", &ctx.task.task_id)
            .env("WORKER_TASK_TYPE", &ctx.task.task_type)
            .env("WORKER_ATTEMPT", ctx.attempt.to_string());
        if let Some(dir) = &spec.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| {
            HandlerError::transient(format!(
                "cannot start `{}` for handler `{}`: {e} (check WORKER_HANDLERS_FILE and PATH)",
                spec.command[0], self.name
            ))
        })?;
        let _group = GroupGuard(child.id().and_then(|p| i32::try_from(p).ok()));

        let stdin = child.stdin.take();
        let input = ctx.task.to_json();
        let writer = async move {
            if let Some(mut stdin) = stdin {
                // A child that ignores stdin closes the pipe early: not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
        };
        let stdout = child.stdout.take();
        let reader = async move {
            let mut buf = Vec::new();
            if let Some(out) = stdout {
                let mut limited = out.take(MAX_STDOUT_BYTES as u64 + 1);
                let _ = limited.read_to_end(&mut buf).await;
            }
            buf
        };
        let stderr = child.stderr.take();
        let task_id = ctx.task.task_id.clone();
        let handler = self.name.clone();
        let logger = async move {
            let mut tail = VecDeque::with_capacity(STDERR_TAIL);
            if let Some(err) = stderr {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "worker::exec", %task_id, handler = %handler, stderr = %line);
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
            tail
        };

        // The task deadline is enforced by `execute`, which reports it as
        // timed_out and drops this future (the group guard then kills the
        // children). A timer here for the same instant would race it and turn
        // some task timeouts into failures, so only a handler timeout stricter
        // than the deadline gets one.
        let remaining = ctx
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        let limit = spec
            .timeout_seconds
            .map(Duration::from_secs_f64)
            .filter(|t| *t < remaining);
        let expired = async move {
            match limit {
                Some(l) => tokio::time::sleep(l).await,
                None => std::future::pending::<()>().await,
            }
        };
        let work = async {
            let ((), out, tail, status) = tokio::join!(writer, reader, logger, child.wait());
            (out, tail, status)
        };
        let (out, tail, status) = tokio::select! {
            r = work => r,
            () = expired => {
                let secs = limit.map_or(0.0, |l| l.as_secs_f64());
                return Err(HandlerError::transient(format!(
                    "handler `{}` timed out after {secs:.1}s; its process group was killed", self.name
                )));
            }
            () = ctx.cancel.cancelled() => return Err(HandlerError::transient("cancelled")),
        };
        let status = status.map_err(|e| {
            HandlerError::transient(format!("waiting for `{}` failed: {e}", self.name))
        })?;
        if !status.success() {
            let code = status.code();
            let what = match code {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_owned(),
            };
            let tail: Vec<String> = tail.into_iter().collect();
            let message = if tail.is_empty() {
                format!("handler `{}` failed with {what}", self.name)
            } else {
                format!(
                    "handler `{}` failed with {what}: {}",
                    self.name,
                    tail.join("\n")
                )
            };
            let permanent = code.is_some_and(|c| spec.permanent_exit_codes.contains(&c));
            return Err(if permanent {
                HandlerError::permanent(message)
            } else {
                HandlerError::transient(message)
            });
        }
        if out.len() > MAX_STDOUT_BYTES {
            return Err(HandlerError::permanent(format!(
                "handler `{}` wrote more than {MAX_STDOUT_BYTES} bytes to stdout",
                self.name
            )));
        }
        Ok(serde_json::from_slice(&out)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out).trim_end().to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Task;
    use std::time::Instant;
    use tokio_util::sync::CancellationToken;

    fn ctx(timeout: Duration) -> TaskContext {
        TaskContext {
            task: Arc::new(Task {
                task_id: "t1".into(),
                task_type: "x".into(),
                payload: serde_json::json!({"n": 2}),
                webhook_url: None,
                client: None,
            }),
            attempt: 1,
            cancel: CancellationToken::new(),
            deadline: Instant::now() + timeout,
        }
    }

    fn handler(toml_text: &str) -> Arc<dyn Handler> {
        parse(toml_text).unwrap().remove(0).1
    }

    #[test]
    fn file_errors_are_specific() {
        assert!(parse("[handlers.a]\ncommand = []")
            .err()
            .unwrap()
            .contains("[handlers.a]"));
        assert!(parse("[handlers.a]\ncommand = [\"x\"]\nbogus = 1")
            .err()
            .unwrap()
            .contains("bogus"));
        assert!(parse("[handlers.a]\ncommand = [\"x\"]\ntimeout_seconds = -1").is_err());
    }

    #[test]
    fn numeric_settings_are_range_checked() {
        for (line, field) in [
            (
                "timeout_seconds = 1e20",
                "`timeout_seconds` = 100000000000000000000",
            ),
            ("timeout_seconds = 0", "`timeout_seconds` = 0"),
            ("timeout_seconds = nan", "`timeout_seconds` = NaN"),
            ("timeout_seconds = inf", "`timeout_seconds` = inf"),
            ("kill_grace_seconds = -0.5", "`kill_grace_seconds` = -0.5"),
            ("kill_grace_seconds = 61", "`kill_grace_seconds` = 61"),
            (
                "permanent_exit_codes = [2, 0]",
                "`permanent_exit_codes` holds 0",
            ),
            (
                "permanent_exit_codes = [256]",
                "`permanent_exit_codes` holds 256",
            ),
        ] {
            let e = parse(&format!("[handlers.h]\ncommand = [\"x\"]\n{line}"))
                .err()
                .unwrap_or_else(|| panic!("{line} was accepted"));
            assert!(
                e.starts_with("[handlers.h]: ") && e.contains(field) && e.contains("out of range"),
                "{line}: {e}"
            );
        }
        for line in [
            "timeout_seconds = 31536000",
            "timeout_seconds = 0.001",
            "kill_grace_seconds = 0",
            "kill_grace_seconds = 60",
            "permanent_exit_codes = [1, 255]",
        ] {
            assert!(
                parse(&format!("[handlers.h]\ncommand = [\"x\"]\n{line}")).is_ok(),
                "{line} was refused"
            );
        }
    }

    #[tokio::test]
    async fn stdin_to_stdout_json() {
        let h = handler("[handlers.cat]\ncommand = [\"cat\"]");
        let c = ctx(Duration::from_secs(10));
        let v = h.run(&c, &Value::Null).await.unwrap();
        assert_eq!(v["payload"]["n"], 2);
        assert_eq!(v["task_id"], "t1");
    }

    #[tokio::test]
    async fn failure_carries_stderr_tail_and_permanence() {
        let h = handler(
            "[handlers.f]\ncommand = [\"sh\", \"-c\", \"echo one >&2; echo two >&2; exit 3\"]\npermanent_exit_codes = [3]",
        );
        let e = h
            .run(&ctx(Duration::from_secs(10)), &Value::Null)
            .await
            .unwrap_err();
        assert!(
            e.message.contains("exit status 3") && e.message.contains("one\ntwo"),
            "{}",
            e.message
        );
        assert_eq!(e.retry, crate::handler::Retry::Permanent);
    }

    #[tokio::test]
    async fn environment_is_scrubbed() {
        std::env::set_var("WORKER_TEST_SECRET_NOT_PASSED", "s3cret");
        let h = handler("[handlers.e]\ncommand = [\"sh\", \"-c\", \"env\"]");
        let v = h
            .run(&ctx(Duration::from_secs(10)), &Value::Null)
            .await
            .unwrap();
        let text = v.as_str().unwrap();
        assert!(!text.contains("s3cret"));
        assert!(text.contains("WORKER_TASK_ID=t1"));
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", marker.display());
        let h = handler(&format!(
            "[handlers.s]\ncommand = [\"sh\", \"-c\", {script:?}]\ntimeout_seconds = 0.5"
        ));
        let e = h
            .run(&ctx(Duration::from_secs(10)), &Value::Null)
            .await
            .unwrap_err();
        assert!(e.message.contains("timed out"), "{}", e.message);
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild must be gone (allow the kernel a moment to reap it).
        let mut alive = true;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            alive = !stat.is_empty() && !stat.contains(") Z ");
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive, "grandchild {pid} survived the timeout");
    }
}
