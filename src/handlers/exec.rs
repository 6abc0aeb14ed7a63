//! Exec handlers: existing Python/Node/shell handlers, run as child processes.
//!
//! The operator declares them in a TOML file (`WORKER_HANDLERS_FILE`); a task
//! can only pick one by `task_type`, never supply a command. The child gets
//! the whole task JSON on stdin, a scrubbed environment (PATH, HOME, LANG plus
//! the variables the operator lists), and its own process group, so that
//! stopping it reaches everything it started, not just the first process.
//!
//! How a run ends:
//! - The child exits: the task ends with it. Pipes still held open by
//!   processes it left in the background are read for [`PIPE_DRAIN`] more and
//!   then closed; what is left of its group is stopped as below.
//! - The handler's `timeout_seconds` expires or the task is cancelled: the
//!   group gets SIGTERM, and SIGKILL if the child is still there after
//!   `kill_grace_seconds`.
//! - The task timeout expires: [`crate::execute`] aborts the handler future,
//!   so the same SIGTERM-then-SIGKILL also lives in [`Group`]'s `Drop`, which
//!   sends SIGTERM at once and leaves the SIGKILL after the grace to a
//!   blocking-pool task that does not depend on the dropped future (the
//!   runtime waits for it before the worker exits).
//! - The worker dies, `kill -9` included: the kernel kills the child (a
//!   parent-death signal, see [`die_with_worker`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use crate::handler::NamedHandler;
use crate::handler::{Handler, HandlerError, HandlerFuture, TaskContext};

/// Variables every child inherits; everything else must be listed.
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG"];
/// Longest stderr line logged or kept, in bytes; the rest of a longer line
/// is counted, not stored.
pub(super) const STDERR_LINE_BYTES: usize = 1024;
/// Stderr logged per task, in bytes and in lines (each log record adds its
/// own overhead); past either, lines are counted and one summary is logged.
const STDERR_LOG_BYTES: usize = 64 * 1024;
const STDERR_LOG_LINES: usize = 1000;
/// Last stderr lines kept for the error of a failed run, and their cap in bytes.
const STDERR_TAIL: usize = 20;
const STDERR_TAIL_BYTES: usize = 4 * 1024;
/// Cap on a child's stdout (the task result).
pub(super) const MAX_STDOUT_BYTES: usize = 16 * 1024 * 1024;
/// Largest `timeout_seconds`: a year, the same bound as `WORKER_TASK_TIMEOUT`.
const MAX_TIMEOUT_SECONDS: f64 = 31_536_000.0;
/// `kill_grace_seconds` when the handler sets none.
const DEFAULT_KILL_GRACE_SECONDS: f64 = 5.0;
/// Largest `kill_grace_seconds`: the grace can delay the worker's exit.
const MAX_KILL_GRACE_SECONDS: f64 = 60.0;
/// How long pipes are still read after the child exited: enough for output
/// in flight, short enough that a background process holding stdout open
/// cannot keep the task running.
pub(super) const PIPE_DRAIN: Duration = Duration::from_secs(1);
/// How often a group waiting out its grace is checked.
const GRACE_POLL: Duration = Duration::from_millis(20);

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

/// Checks an exec table's settings; the error names the handler and field.
pub(super) fn build(name: String, spec: Spec) -> Result<NamedHandler, String> {
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(format!("[handlers.{name}]: `command` must name a program"));
    }
    check_timeouts(&name, spec.timeout_seconds, spec.kill_grace_seconds)?;
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
    Ok((name.clone(), Arc::new(Exec { name, spec })))
}

/// The range checks of `timeout_seconds` and `kill_grace_seconds`, shared by
/// exec and long-lived handlers.
pub(super) fn check_timeouts(
    name: &str,
    timeout_seconds: Option<f64>,
    kill_grace_seconds: Option<f64>,
) -> Result<(), String> {
    check_range(
        name,
        "timeout_seconds",
        timeout_seconds,
        |t| t > 0.0 && t <= MAX_TIMEOUT_SECONDS,
        &format!("a number of seconds greater than 0 and at most {MAX_TIMEOUT_SECONDS} (a year)"),
    )?;
    check_range(
        name,
        "kill_grace_seconds",
        kill_grace_seconds,
        |g| (0.0..=MAX_KILL_GRACE_SECONDS).contains(&g),
        &format!("a number of seconds from 0 to {MAX_KILL_GRACE_SECONDS}"),
    )
}

/// `kill_grace_seconds`, or its default.
pub(super) fn grace(kill_grace_seconds: Option<f64>) -> Duration {
    Duration::from_secs_f64(kill_grace_seconds.unwrap_or(DEFAULT_KILL_GRACE_SECONDS))
}

/// Refuses a numeric setting outside its range (NaN and infinities included),
/// naming the handler and the field.
pub(super) fn check_range(
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

/// Asks the kernel to SIGKILL the child when the worker dies, `kill -9`
/// included, so that a redelivered task never runs beside an orphaned copy.
///
/// This is the crate's only `unsafe` (the lint is `deny`, not `forbid`, for
/// this one function). `pre_exec` is unsafe because its closure runs between
/// fork and exec in a copy of a multi-threaded process, where only
/// async-signal-safe calls are sound. The closure makes two system calls,
/// `prctl(PR_SET_PDEATHSIG)` and `getppid`, through nix's thin wrappers; it
/// allocates nothing and takes no lock. The `getppid` check covers a worker
/// that died between fork and prctl: the signal would never come, so the
/// child does not start.
///
/// The kernel sends the signal when the *thread* that forked the child ends,
/// not the process. Tokio polls a task on whichever thread is free, and
/// blocking-pool threads exit when idle, so every child is forked by one
/// thread that lives as long as the process ([`spawn`]).
///
/// Only the child is covered: processes it starts do not inherit the setting,
/// so after a `kill -9` of the worker a background helper can outlive it. A
/// handler that starts helpers should wait for them, or `exec` the last one.
#[allow(unsafe_code)]
fn die_with_worker(cmd: &mut Command) {
    let worker = nix::unistd::getpid();
    let arm = move || -> std::io::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        if nix::unistd::getppid() != worker {
            return Err(Errno::ESRCH.into());
        }
        Ok(())
    };
    // SAFETY: `arm` only makes the two async-signal-safe system calls above.
    unsafe {
        cmd.pre_exec(arm);
    }
}

/// A child's command (`argv`, no shell): piped stdin, stdout and stderr, its
/// own process group, dying with the worker, and only the environment it is
/// meant to see (PATH, HOME, LANG and the variables listed in `env`). Exec
/// and long-lived handlers both start their children from this.
pub(super) fn child_command(
    argv: &[String],
    env: &[String],
    working_dir: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(argv.first().map_or("", String::as_str));
    cmd.args(argv.iter().skip(1))
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_worker(&mut cmd);
    for var in BASE_ENV
        .iter()
        .copied()
        .chain(env.iter().map(String::as_str))
    {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    if let Some(dir) = working_dir {
        cmd.current_dir(dir);
    }
    cmd
}

struct SpawnRequest {
    cmd: Command,
    /// The caller's runtime: the child's pipes and exit belong to it.
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<std::io::Result<Child>>,
}

/// The thread that forks every exec child (see [`die_with_worker`]); `None`
/// when it could not be started. It lives until the process ends: the sender
/// is never dropped.
static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

/// Starts `cmd` on the spawner thread.
pub(super) async fn spawn(cmd: Command) -> std::io::Result<Child> {
    let gone = || std::io::Error::other("the thread that starts exec children is not running");
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("exec-spawner".into())
            .spawn(move || {
                for SpawnRequest {
                    mut cmd,
                    runtime,
                    reply,
                } in rx
                {
                    let _entered = runtime.enter();
                    if let Err(Ok(orphan)) = reply.send(cmd.spawn()) {
                        // The task went away while its child started.
                        drop(Group::new(orphan, Duration::ZERO));
                    }
                }
            })
            .ok()
            .map(|_| tx)
    });
    let spawner = spawner.as_ref().ok_or_else(gone)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let (reply, answer) = oneshot::channel();
    spawner
        .send(SpawnRequest {
            cmd,
            runtime,
            reply,
        })
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// A child and its process group. Dropping it stops what is left of the
/// group: SIGTERM at once, SIGKILL when the grace has passed.
pub(super) struct Group {
    /// `None` only once handed over by `drop`.
    child: Option<Child>,
    /// The child's pid, which is its group's id (`process_group(0)`).
    pgid: Option<Pid>,
    grace: Duration,
    /// When the group got SIGTERM.
    terminated: Option<Instant>,
}

impl Group {
    pub(super) fn new(child: Child, grace: Duration) -> Self {
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        Self {
            child: Some(child),
            pgid,
            grace,
            terminated: None,
        }
    }

    pub(super) fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits for the child itself (not its group) to exit.
    pub(super) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.wait().await,
            None => Err(std::io::Error::other("the child was handed over")),
        }
    }

    /// SIGTERM to the whole group, once.
    fn terminate(&mut self) {
        if self.terminated.is_none() {
            if let Some(pgid) = self.pgid {
                // ESRCH: the group is gone already.
                let _ = killpg(pgid, Signal::SIGTERM);
            }
            self.terminated = Some(Instant::now());
        }
    }

    /// SIGTERM to the group, a wait for the child of at most the grace, then
    /// SIGKILL to the group if the child is still there. True when SIGKILL
    /// was needed.
    async fn stop(&mut self) -> bool {
        self.terminate();
        if tokio::time::timeout(self.grace, self.wait()).await.is_ok() {
            return false;
        }
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = self.wait().await;
        true
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let (Some(child), Some(pgid)) = (self.child.take(), self.pgid) else {
            return;
        };
        let mut rest = Remnant {
            child,
            pgid,
            deadline: Instant::now(),
            grace: self.grace,
            span: tracing::Span::current(),
            done: false,
        };
        if rest.gone() {
            // The usual end: the child exited and left nothing behind.
            rest.done = true;
            return;
        }
        self.terminate();
        rest.deadline = self.terminated.unwrap_or_else(Instant::now) + self.grace;
        match tokio::runtime::Handle::try_current() {
            // A blocking task, so that the runtime waits for it on shutdown.
            Ok(runtime) => drop(runtime.spawn_blocking(move || rest.wait_out())),
            // No runtime to wait for the grace: SIGKILL now (`Remnant::drop`).
            Err(_) => drop(rest),
        }
    }
}

/// What is left of a group after SIGTERM, waiting out its grace without the
/// handler's future. The unreaped child keeps its pid, and so the group id,
/// from being reused; a group id is not reused either while any member of
/// the group is alive, so the SIGKILL cannot reach an unrelated process.
struct Remnant {
    child: Child,
    pgid: Pid,
    deadline: Instant,
    grace: Duration,
    span: tracing::Span,
    done: bool,
}

impl Remnant {
    /// Whether the child was reaped and no live member of its group is left.
    fn gone(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None)) && !has_live_member(self.pgid)
    }

    /// Polls until the group is gone or the grace is over (then `drop` sends
    /// SIGKILL).
    fn wait_out(mut self) {
        loop {
            if self.gone() {
                self.done = true;
                return;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(GRACE_POLL));
        }
    }
}

/// Whether process group `pgid` has a member that is not a zombie. `killpg`
/// with no signal also finds zombies, which no signal can touch and which
/// stay until their new parent reaps them (late or, when the worker itself is
/// PID 1 of a container, never), so a group it finds is looked at in `/proc`.
pub(super) fn has_live_member(pgid: Pid) -> bool {
    if matches!(killpg(pgid, None), Err(Errno::ESRCH)) {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold anything but ')'
        // is its last byte.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_ascii_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
        pgrp == Some(pgid.as_raw()) && !matches!(state, "Z" | "X")
    })
}

impl Drop for Remnant {
    fn drop(&mut self) {
        if self.done || self.gone() {
            return;
        }
        let _ = killpg(self.pgid, Signal::SIGKILL);
        tracing::warn!(
            parent: &self.span,
            pgid = self.pgid.as_raw(),
            grace_s = self.grace.as_secs_f64(),
            "exec process group still running after SIGTERM and its grace; sent SIGKILL"
        );
        // Reap the child if it goes at once; tokio's orphan queue does it otherwise.
        for _ in 0..20 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
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

    fn stop_grace(&self) -> Duration {
        self.kill_grace()
    }
}

/// Writes the task JSON to the child's stdin and closes it.
async fn write_stdin(stdin: Option<ChildStdin>, input: String) {
    if let Some(mut stdin) = stdin {
        // A child that ignores stdin closes the pipe early: not an error.
        let _ = stdin.write_all(input.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
}

/// Reads stdout into `out`, keeping at most one byte past the cap (so an
/// overflow shows) and discarding the rest, so the child never blocks on a
/// full pipe.
async fn read_stdout(stdout: Option<impl AsyncRead + Unpin>, out: &mut Vec<u8>) {
    let Some(mut pipe) = stdout else { return };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let room = (MAX_STDOUT_BYTES + 1).saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// Whose lines a [`StderrLog`] logs.
pub(super) enum Origin {
    /// An exec child: one task's stderr.
    Task { task_id: String },
    /// A long-lived handler process: its stderr, or (`stdout: true`) lines on
    /// its stdout that are not replies.
    Process { pid: u32, stdout: bool },
}

/// A child's stderr: logged line by line with the task id (or the pid of a
/// long-lived process), within the caps, and its last lines kept for the
/// error of a failed run. Untrusted output cannot flood the logs or the
/// webhook.
pub(super) struct StderrLog {
    origin: Origin,
    handler: String,
    /// The caps apply per window for a long-lived process, so that one that
    /// was loud once is heard again later; an exec child's caps cover its run.
    window: Option<(Duration, Instant)>,
    logged_bytes: usize,
    logged_lines: usize,
    suppressed_lines: u64,
    suppressed_bytes: u64,
    tail: VecDeque<String>,
    tail_bytes: usize,
}

impl StderrLog {
    fn new(task_id: String, handler: String) -> Self {
        Self::with_origin(Origin::Task { task_id }, handler, None)
    }

    /// The log of a long-lived process, its caps renewed every `window`.
    pub(super) fn for_process(origin: Origin, handler: String, window: Duration) -> Self {
        Self::with_origin(origin, handler, Some((window, Instant::now())))
    }

    fn with_origin(origin: Origin, handler: String, window: Option<(Duration, Instant)>) -> Self {
        Self {
            origin,
            handler,
            window,
            logged_bytes: 0,
            logged_lines: 0,
            suppressed_lines: 0,
            suppressed_bytes: 0,
            tail: VecDeque::with_capacity(STDERR_TAIL),
            tail_bytes: 0,
        }
    }

    /// One line: its first bytes (at most [`STDERR_LINE_BYTES`]) and how many
    /// more it had.
    pub(super) fn line(&mut self, kept: &[u8], more: u64) {
        self.renew_window();
        let (mut text, dropped) = utf8_prefix(&kept[..kept.len().min(STDERR_LINE_BYTES)]);
        let cut = more + (kept.len().saturating_sub(STDERR_LINE_BYTES) + dropped) as u64;
        if cut > 0 {
            text.push_str(&format!(" … [line cut: {cut} more bytes]"));
        }
        let fits = self.suppressed_lines == 0
            && self.logged_lines < STDERR_LOG_LINES
            && self.logged_bytes + text.len() <= STDERR_LOG_BYTES;
        if fits {
            self.emit(&text);
            self.logged_lines += 1;
            self.logged_bytes += text.len();
        } else {
            self.suppressed_lines += 1;
            self.suppressed_bytes += kept.len() as u64 + more + 1;
        }
        // Counted with the newline that joins it to the next.
        self.tail_bytes += text.len() + 1;
        self.tail.push_back(text);
        while self.tail.len() > STDERR_TAIL
            || (self.tail_bytes > STDERR_TAIL_BYTES && self.tail.len() > 1)
        {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.len() + 1;
            }
        }
    }

    fn emit(&self, text: &str) {
        let handler = &self.handler;
        match &self.origin {
            Origin::Task { task_id } => {
                tracing::info!(target: "worker::exec", task_id = %task_id, handler = %handler, stderr = %text)
            }
            Origin::Process { pid, stdout: false } => {
                tracing::info!(target: "worker::persistent", handler = %handler, pid, stderr = %text)
            }
            Origin::Process { pid, stdout: true } => tracing::warn!(
                target: "worker::persistent",
                handler = %handler,
                pid,
                stdout = %text,
                "a line on the handler process's stdout is not a reply (print to stderr instead)"
            ),
        }
    }

    /// A new window once the current one is over, after the summary of what
    /// the last one suppressed.
    fn renew_window(&mut self) {
        let Some((length, start)) = self.window else {
            return;
        };
        if start.elapsed() < length {
            return;
        }
        self.summarize();
        self.window = Some((length, Instant::now()));
        self.logged_bytes = 0;
        self.logged_lines = 0;
        self.suppressed_lines = 0;
        self.suppressed_bytes = 0;
    }

    /// One line saying how much was not logged, if anything was not.
    fn summarize(&self) {
        if self.suppressed_lines == 0 {
            return;
        }
        let (lines, bytes, handler) = (self.suppressed_lines, self.suppressed_bytes, &self.handler);
        let kib = STDERR_LOG_BYTES / 1024;
        match &self.origin {
            Origin::Task { task_id } => tracing::warn!(
                target: "worker::exec",
                task_id = %task_id,
                handler = %handler,
                "… {lines} more stderr lines ({bytes} bytes) suppressed: at most {STDERR_LOG_LINES} lines \
                 and {kib} KiB of a task's stderr are logged"
            ),
            Origin::Process { pid, stdout } => tracing::warn!(
                target: "worker::persistent",
                handler = %handler,
                pid,
                "… {lines} more {} lines ({bytes} bytes) suppressed: at most {STDERR_LOG_LINES} lines \
                 and {kib} KiB per {}s of a handler process's output are logged",
                if *stdout { "stdout" } else { "stderr" },
                self.window.map_or(0, |(w, _)| w.as_secs())
            ),
        }
    }

    /// The last lines, for the error of a failed run.
    pub(super) fn tail(&self) -> String {
        self.tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for StderrLog {
    /// The summary of what was not logged, on every way the run ends.
    fn drop(&mut self) {
        self.summarize();
    }
}

/// `bytes` as text, and how many bytes at its end were dropped: a character
/// cut in two by the line cap is dropped rather than shown as U+FFFD; other
/// invalid bytes become U+FFFD.
fn utf8_prefix(bytes: &[u8]) -> (String, usize) {
    let end = match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => bytes.len(),
    };
    (
        String::from_utf8_lossy(&bytes[..end]).into_owned(),
        bytes.len() - end,
    )
}

/// Reads stderr line by line into `log`, never holding more than
/// [`STDERR_LINE_BYTES`] of a line however long it is.
async fn read_stderr(stderr: Option<impl AsyncRead + Unpin>, log: &mut StderrLog) {
    if let Some(pipe) = stderr {
        read_lines(pipe, STDERR_LINE_BYTES, |line, cut| log.line(line, cut)).await;
    }
}

/// Reads `pipe` line by line, handing each line to `on_line` with at most
/// `max` of its bytes (a `\r` before the newline removed) and the count of
/// the bytes past them, so that a line however long never takes more than
/// `max` bytes of memory. A last line without a newline is handed over too.
pub(super) async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    max: usize,
    mut on_line: impl FnMut(&[u8], u64),
) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::with_capacity(256);
    let mut cut = 0u64;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = max.saturating_sub(line.len()).min(chunk.len());
        line.extend_from_slice(&chunk[..room]);
        cut += (chunk.len() - room) as u64;
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            if cut == 0 && line.last() == Some(&b'\r') {
                line.pop();
            }
            on_line(&line, cut);
            line.clear();
            cut = 0;
        }
    }
    if !line.is_empty() || cut > 0 {
        on_line(&line, cut);
    }
}

/// How the wait for the child ended.
enum End {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

impl Exec {
    fn kill_grace(&self) -> Duration {
        Duration::from_secs_f64(
            self.spec
                .kill_grace_seconds
                .unwrap_or(DEFAULT_KILL_GRACE_SECONDS),
        )
    }

    async fn run_child(&self, ctx: &TaskContext) -> Result<Value, HandlerError> {
        let spec = &self.spec;
        let child = spawn(self.command(ctx)).await.map_err(|e| {
            HandlerError::transient(format!(
                "cannot start `{}` for handler `{}`: {e} (check WORKER_HANDLERS_FILE and PATH)",
                spec.command[0], self.name
            ))
        })?;
        let mut group = Group::new(child, self.kill_grace());
        let (stdin, stdout, stderr) = match group.child() {
            Some(c) => (c.stdin.take(), c.stdout.take(), c.stderr.take()),
            None => (None, None, None),
        };

        let mut out = Vec::new();
        let mut log = StderrLog::new(ctx.task.task_id.clone(), self.name.clone());
        let mut io = Box::pin(async {
            tokio::join!(
                write_stdin(stdin, ctx.task.to_json()),
                read_stdout(stdout, &mut out),
                read_stderr(stderr, &mut log),
            );
        });
        let mut io_done = false;

        let limit = stricter_limit(spec.timeout_seconds, ctx.deadline);
        let expired = async move {
            match limit {
                Some(l) => tokio::time::sleep(l).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(expired);
        // Output is read all along, so a child never blocks on a full pipe,
        // not even while it cleans up after SIGTERM.
        let end = loop {
            tokio::select! {
                () = &mut io, if !io_done => io_done = true,
                status = group.wait() => break End::Exited(status),
                () = &mut expired => break End::TimedOut,
                () = ctx.cancel.cancelled() => break End::Cancelled,
            }
        };
        let killed = match end {
            End::Exited(_) => false,
            End::TimedOut | End::Cancelled => stop_reading(&mut group, &mut io, &mut io_done).await,
        };
        if !io_done && tokio::time::timeout(PIPE_DRAIN, &mut io).await.is_err() {
            tracing::warn!(
                handler = %self.name,
                "the child exited but a process it started still holds its stdout or stderr; \
                 stopped reading after {}s",
                PIPE_DRAIN.as_secs_f64()
            );
        }
        drop(io);

        let status = match end {
            End::Exited(status) => status,
            End::TimedOut => return Err(self.timed_out(limit, killed, self.kill_grace())),
            End::Cancelled => return Err(HandlerError::transient("cancelled")),
        };
        let status = status.map_err(|e| {
            HandlerError::transient(format!("waiting for `{}` failed: {e}", self.name))
        })?;
        self.result(status, &log, &out)
    }

    /// The child's command, with the task's identity in its environment.
    fn command(&self, ctx: &TaskContext) -> Command {
        let spec = &self.spec;
        let mut cmd = child_command(&spec.command, &spec.env, spec.working_dir.as_deref());
        cmd.env("WORKER_TASK_ID", &ctx.task.task_id)
            .env("WORKER_TASK_TYPE", &ctx.task.task_type)
            .env("WORKER_ATTEMPT", ctx.attempt.to_string());
        cmd
    }

    fn timed_out(&self, limit: Option<Duration>, killed: bool, grace: Duration) -> HandlerError {
        let secs = limit.map_or(0.0, |l| l.as_secs_f64());
        let how = if killed {
            format!(
                "SIGKILL: still running {}s after SIGTERM",
                grace.as_secs_f64()
            )
        } else {
            "it exited on SIGTERM".to_owned()
        };
        HandlerError::transient(format!(
            "handler `{}` timed out after {secs:.1}s; its process group was killed ({how})",
            self.name
        ))
    }

    /// A child that exited by itself: its stdout (JSON when it parses) on
    /// success, otherwise an error with the tail of its stderr, permanent for
    /// the exit codes the spec names.
    fn result(
        &self,
        status: ExitStatus,
        log: &StderrLog,
        out: &[u8],
    ) -> Result<Value, HandlerError> {
        if !status.success() {
            let code = status.code();
            let what = match code {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_owned(),
            };
            let tail = log.tail();
            let message = if tail.is_empty() {
                format!("handler `{}` failed with {what}", self.name)
            } else {
                format!("handler `{}` failed with {what}: {tail}", self.name)
            };
            let permanent = code.is_some_and(|c| self.spec.permanent_exit_codes.contains(&c));
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
        Ok(serde_json::from_slice(out)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(out).trim_end().to_owned())))
    }
}

/// The handler's own `timeout_seconds`, when it ends before the task
/// deadline. The deadline itself is enforced by `execute`, which reports it
/// as timed_out and drops this future (the group's `Drop` then stops the
/// children); a timer here for the same instant would race it and turn some
/// task timeouts into failures.
pub(super) fn stricter_limit(timeout_seconds: Option<f64>, deadline: Instant) -> Option<Duration> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    timeout_seconds
        .map(Duration::from_secs_f64)
        .filter(|t| *t < remaining)
}

/// Stops the process group (SIGTERM, then SIGKILL after the grace) while
/// still reading its output; `true` when SIGKILL was needed.
pub(super) async fn stop_reading(
    group: &mut Group,
    io: &mut (impl std::future::Future<Output = ()> + Unpin),
    io_done: &mut bool,
) -> bool {
    let stop = group.stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut *io, if !*io_done => *io_done = true,
            killed = &mut stop => break killed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::file::parse;
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
    fn only_a_handler_timeout_before_the_deadline_gets_a_timer() {
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            stricter_limit(Some(5.0), deadline),
            Some(Duration::from_secs(5))
        );
        assert_eq!(stricter_limit(Some(120.0), deadline), None);
        assert_eq!(stricter_limit(None, deadline), None);
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

    /// The parent-death signal follows the thread that forked the child:
    /// a child started while its task ran on a thread that then ended must
    /// live on (see `die_with_worker`).
    #[test]
    fn children_outlive_the_thread_that_started_them() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let script = format!(
            "echo $$ > '{p}.tmp' && mv '{p}.tmp' '{p}'; exec sleep 30",
            p = pid.display()
        );
        let h = handler(&format!(
            "[handlers.s]\ncommand = [\"sh\", \"-c\", {script:?}]\ntimeout_seconds = 2"
        ));
        let c = ctx(Duration::from_secs(60));
        let mut run = h.run(&c, &Value::Null);
        std::thread::scope(|s| {
            s.spawn(|| {
                rt.block_on(async {
                    tokio::select! {
                        r = &mut run => panic!("ended early: {r:?}"),
                        () = async {
                            while !pid.exists() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        } => {}
                    }
                });
            })
            .join()
            .unwrap();
        });
        // Had the child died with that thread, it would be reported "killed by a signal".
        let e = rt.block_on(run).unwrap_err();
        assert!(e.message.contains("exited on SIGTERM"), "{}", e.message);
    }

    #[tokio::test]
    async fn stderr_lines_and_tail_are_capped() {
        let mut long = vec![b'a'; STDERR_LINE_BYTES - 1];
        long.extend_from_slice("é and more".as_bytes()); // 'é' straddles the cap
        let mut input = b"short\r\n".to_vec();
        input.extend_from_slice(&long);
        input.push(b'\n');
        for i in 0..30 {
            input.extend_from_slice(format!("{i}:{}\n", "z".repeat(400)).as_bytes());
        }
        input.extend_from_slice(b"no newline at the end");
        let mut log = StderrLog::new("t".into(), "h".into());
        read_stderr(Some(&input[..]), &mut log).await;
        assert_eq!(log.logged_lines, 33, "every line fits the log caps");
        let tail = log.tail();
        assert!(tail.len() <= STDERR_TAIL_BYTES, "{}", tail.len());
        assert!(tail.ends_with("\nno newline at the end"), "{tail}");
        assert!(tail.starts_with("20:zz"), "the last lines that fit: {tail}");

        let mut log = StderrLog::new("t".into(), "h".into());
        read_stderr(Some(&long[..]), &mut log).await;
        let expected = format!(
            "{} … [line cut: {} more bytes]",
            "a".repeat(STDERR_LINE_BYTES - 1),
            long.len() - (STDERR_LINE_BYTES - 1)
        );
        assert_eq!(log.tail(), expected, "the cut 'é' is dropped, not U+FFFD");

        let mut log = StderrLog::new("t".into(), "h".into());
        let many = "x\n".repeat(STDERR_LOG_LINES + 5);
        read_stderr(Some(many.as_bytes()), &mut log).await;
        assert_eq!(
            (log.logged_lines, log.suppressed_lines, log.suppressed_bytes),
            (STDERR_LOG_LINES, 5, 10)
        );
    }

    #[tokio::test]
    async fn a_process_log_gets_its_caps_back_every_window() {
        let many = "x\n".repeat(STDERR_LOG_LINES + 5);
        let origin = || Origin::Process {
            pid: 1,
            stdout: false,
        };
        let mut log = StderrLog::for_process(origin(), "h".into(), Duration::from_secs(3600));
        read_stderr(Some(many.as_bytes()), &mut log).await;
        assert_eq!(
            (log.logged_lines, log.suppressed_lines),
            (STDERR_LOG_LINES, 5)
        );
        // A window that is always over: every line starts a new one.
        let mut log = StderrLog::for_process(origin(), "h".into(), Duration::ZERO);
        read_stderr(Some(many.as_bytes()), &mut log).await;
        assert_eq!((log.logged_lines, log.suppressed_lines), (1, 0));
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
