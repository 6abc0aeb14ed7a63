//! Long-lived handler processes (`mode = "persistent"`): a small pool of
//! children that each serve many tasks, so a Python or Node handler pays for
//! its interpreter and imports once instead of once per task.
//!
//! The protocol is JSON lines (README, "Long-lived handlers"): the process
//! writes `{"ready": true}` on stdout once it can take tasks; the worker
//! writes one request per line on its stdin, `{"id": N, "attempt": A,
//! "task": {envelope}}`, and the process answers each with one line,
//! `{"id": N, "result": ...}` or `{"id": N, "error": "...", "permanent":
//! false}`, in any order, so one process runs several tasks at once. Other
//! stdout lines are logged as noise, stderr is logged; both within the caps
//! of exec children, renewed every minute.
//!
//! Everything else stays with the worker: leases, timeouts, webhooks,
//! shutdown. A process is a child like an exec child (the env allow-list, its
//! own process group, the parent-death signal, SIGTERM then SIGKILL after
//! `kill_grace_seconds`; all from [`super::exec`]), and a process that
//! crashes, hangs or leaks costs the tasks it holds, never the worker:
//! - it exits: its in-flight tasks fail retryably; the next task starts a
//!   new one;
//! - a task passes its timeout or is cancelled: the task's process is stopped
//!   (the request cannot be taken back from a process that may be stuck in
//!   it), its other tasks fail retryably once it is gone;
//! - it does not say it is ready within `startup_timeout_seconds`: it is
//!   stopped and the tasks waiting for it fail retryably;
//! - it served `max_tasks` tasks or its RSS is above `max_memory_mib`: it
//!   takes no new task and is stopped once its last one is done.
//!
//! Processes start when a task needs one, not with the worker: single-task
//! and job mode run one task and so start one process, `worker handlers`
//! starts none, and a crashing handler is not restarted in a loop while no
//! task asks for it. A process no task holds any more (recycled, or its pool
//! dropped) gets SIGTERM and SIGKILL after the grace (`Process`'s `Drop`); an
//! idle process dies with the worker at exit, as on `kill -9`, by the
//! parent-death signal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::exec::{self, Group, Origin, StderrLog};
use crate::handler::NamedHandler;
use crate::handler::{Handler, HandlerError, HandlerFuture, HandlerResult, TaskContext};
use crate::metrics as names;

/// The reference Python runtime (`worker python-runtime` prints it): a
/// module or `async` function as a long-lived handler process.
pub const PYTHON_RUNTIME: &str = include_str!("python/worker_runtime.py");
/// What `function = "pkg.mod:func"` runs with `python -c`: the runtime from
/// the environment (not argv, so `ps` stays readable), importable by the
/// handler as `worker_runtime`.
const PYTHON_BOOTSTRAP: &str = "import os, sys, types\n\
m = types.ModuleType('worker_runtime')\n\
m.__file__ = 'worker_runtime.py'\n\
sys.modules['worker_runtime'] = m\n\
exec(compile(os.environ.pop('WORKER_PYTHON_RUNTIME'), 'worker_runtime.py', 'exec'), m.__dict__)\n\
m.main()\n";
/// Largest reply line; a longer one fails its task (exec's stdout cap).
const MAX_REPLY_BYTES: usize = exec::MAX_STDOUT_BYTES;
/// Longest error text taken from a reply into the task's outcome.
const MAX_ERROR_BYTES: usize = 4 * 1024;
/// A process's stderr and stdout noise are logged within exec's caps per window.
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// How long past its grace a task waits for its stopped process to be gone
/// (SIGKILL is immediate; this only bounds a process stuck in the kernel).
const GONE_MARGIN: Duration = Duration::from_secs(2);
const DEFAULT_MAX_IN_FLIGHT: u32 = 16;
const MAX_PROCESSES: i64 = 256;
const MAX_IN_FLIGHT: i64 = 1024;
const DEFAULT_STARTUP_TIMEOUT_SECONDS: f64 = 30.0;
const MAX_STARTUP_TIMEOUT_SECONDS: f64 = 3600.0;
/// 1 TiB: above any machine this runs on, below an overflow.
const MAX_MEMORY_MIB: i64 = 1 << 20;

/// One `[handlers.NAME]` table with `mode = "persistent"` (or `function`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// argv of a program that speaks the protocol; no shell.
    pub command: Option<Vec<String>>,
    /// `package.module:function`, run by the embedded Python runtime.
    pub function: Option<String>,
    /// The interpreter for `function` (default `python3`).
    pub python: Option<String>,
    pub working_dir: Option<PathBuf>,
    /// Names of env vars passed through (values never logged).
    #[serde(default)]
    pub env: Vec<String>,
    /// Per task, capped by the task timeout.
    pub timeout_seconds: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when a process must stop.
    pub kill_grace_seconds: Option<f64>,
    /// Shown by `worker handlers`.
    pub description: Option<String>,
    /// Processes at most (default: half the CPUs, at least 1).
    pub processes: Option<i64>,
    /// Tasks one process runs at once (default 16).
    pub max_in_flight: Option<i64>,
    /// Tasks a process serves before it is replaced (default: no limit).
    pub max_tasks: Option<i64>,
    /// RSS above which a process is replaced after its current tasks.
    pub max_memory_mib: Option<i64>,
    /// How long a new process may take to write `{"ready": true}` (default 30).
    pub startup_timeout_seconds: Option<f64>,
}

/// A checked [`Spec`].
struct Settings {
    name: String,
    argv: Vec<String>,
    /// Whether argv runs the embedded Python runtime.
    python_runtime: bool,
    env: Vec<String>,
    working_dir: Option<PathBuf>,
    timeout_seconds: Option<f64>,
    grace: Duration,
    max_in_flight: usize,
    max_tasks: Option<u64>,
    max_memory_kib: Option<u64>,
    startup_timeout: Duration,
    description: String,
}

/// The default pool: one process per two CPUs. A process runs Python on
/// about one core (the GIL), the worker needs some too, and each process
/// costs its interpreter's memory; `processes` sets it for CPU-bound handlers.
fn default_processes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Checks a long-lived table's settings; the error names the handler and field.
pub(super) fn build(name: String, spec: Spec) -> Result<NamedHandler, String> {
    let at = |msg: String| format!("[handlers.{name}]: {msg}");
    let (argv, python_runtime) = argv(&spec).map_err(at)?;
    exec::check_timeouts(&name, spec.timeout_seconds, spec.kill_grace_seconds)?;
    exec::check_range(
        &name,
        "startup_timeout_seconds",
        spec.startup_timeout_seconds,
        |t| t > 0.0 && t <= MAX_STARTUP_TIMEOUT_SECONDS,
        &format!("a number of seconds greater than 0 and at most {MAX_STARTUP_TIMEOUT_SECONDS}"),
    )?;
    let count = |field: &str, value: Option<i64>, max: i64| -> Result<Option<u64>, String> {
        match value {
            Some(v) if !(1..=max).contains(&v) => Err(at(format!(
                "`{field}` = {v} is out of range: use a whole number from 1 to {max}"
            ))),
            v => Ok(v.and_then(|v| u64::try_from(v).ok())),
        }
    };
    let processes = count("processes", spec.processes, MAX_PROCESSES)?;
    let max_in_flight = count("max_in_flight", spec.max_in_flight, MAX_IN_FLIGHT)?;
    let max_tasks = count("max_tasks", spec.max_tasks, i64::MAX)?;
    let max_memory_mib = count("max_memory_mib", spec.max_memory_mib, MAX_MEMORY_MIB)?;
    let processes = processes.map_or_else(default_processes, |p| p as usize);
    let max_in_flight = max_in_flight.map_or(DEFAULT_MAX_IN_FLIGHT as usize, |m| m as usize);
    let description = describe(&spec, &argv, processes, max_in_flight);
    let settings = Settings {
        name: name.clone(),
        argv,
        python_runtime,
        env: spec.env,
        working_dir: spec.working_dir,
        timeout_seconds: spec.timeout_seconds,
        grace: exec::grace(spec.kill_grace_seconds),
        max_in_flight,
        max_tasks,
        max_memory_kib: max_memory_mib.map(|m| m * 1024),
        startup_timeout: Duration::from_secs_f64(
            spec.startup_timeout_seconds
                .unwrap_or(DEFAULT_STARTUP_TIMEOUT_SECONDS),
        ),
        description,
    };
    Ok((name, Arc::new(Persistent::new(settings, processes))))
}

/// The process's argv, and whether it runs the embedded Python runtime.
fn argv(spec: &Spec) -> Result<(Vec<String>, bool), String> {
    match (&spec.command, &spec.function) {
        (Some(_), None) if spec.python.is_some() => {
            Err("`python` goes with `function`, not `command`".into())
        }
        (Some(c), None) if c.first().is_some_and(|p| !p.is_empty()) => Ok((c.clone(), false)),
        (Some(_), None) => Err("`command` must name a program".into()),
        (None, Some(f)) => {
            let ok = f
                .split_once(':')
                .is_some_and(|(m, a)| !m.is_empty() && !a.is_empty());
            if !ok {
                return Err(format!(
                    "`function` = {f:?} is not `package.module:function`"
                ));
            }
            let python = spec.python.clone().unwrap_or_else(|| "python3".into());
            Ok((
                vec![python, "-c".into(), PYTHON_BOOTSTRAP.into(), f.clone()],
                true,
            ))
        }
        _ => Err(
            "set exactly one of `command` (a program that speaks the protocol) and \
                  `function` (a Python function, `package.module:function`)"
                .into(),
        ),
    }
}

/// The line for `worker handlers`.
fn describe(spec: &Spec, argv: &[String], processes: usize, max_in_flight: usize) -> String {
    let what = match &spec.function {
        Some(f) => format!("Python function {f}"),
        None => argv.join(" "),
    };
    let plural = if processes == 1 { "" } else { "es" };
    let pool = format!("persistent: {what}, {processes} process{plural} × {max_in_flight} tasks");
    match &spec.description {
        Some(d) => format!("{d} ({pool})"),
        None => pool,
    }
}

/// A long-lived handler: its settings and its pool of processes.
pub struct Persistent {
    settings: Settings,
    /// Tasks admitted at once: `processes × max_in_flight`.
    permits: Semaphore,
    /// Tasks assigned to each slot, so a task goes to the least busy one.
    loads: Mutex<Vec<usize>>,
    slots: Vec<Slot>,
    next_id: AtomicU64,
}

/// A place for one process; empty until a task needs it.
#[derive(Default)]
struct Slot {
    /// Held while a process starts, so the tasks of a slot start one.
    process: tokio::sync::Mutex<Option<Arc<Process>>>,
    /// Failed starts, and the last one's error: the tasks that waited for a
    /// start that failed fail with its error instead of each trying again.
    failures: AtomicU64,
    last_failure: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Persistent {
    fn new(settings: Settings, processes: usize) -> Self {
        Self {
            permits: Semaphore::new(processes * settings.max_in_flight),
            loads: Mutex::new(vec![0; processes]),
            slots: (0..processes).map(|_| Slot::default()).collect(),
            next_id: AtomicU64::new(1),
            settings,
        }
    }

    /// Sends the task to a process of the pool and waits for its reply, its
    /// own timeout or its cancellation. A task that leaves without its reply
    /// stops its process (`Abandon`): the process may be stuck in it and a
    /// request cannot be taken back. `execute` dropping this future at the
    /// task timeout does the same.
    async fn run_task(&self, ctx: &TaskContext) -> HandlerResult {
        let limit = exec::stricter_limit(self.settings.timeout_seconds, ctx.deadline);
        let ended = async {
            let expired = async {
                match limit {
                    Some(l) => tokio::time::sleep(l).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = expired => Early::TimedOut(limit.unwrap_or_default()),
                () = ctx.cancel.cancelled() => Early::Cancelled,
            }
        };
        tokio::pin!(ended);
        let _permit = tokio::select! {
            permit = self.permits.acquire() => permit
                .map_err(|_| HandlerError::transient("the handler's pool is closed"))?,
            early = &mut ended => return Err(self.early(early, None)),
        };
        let load = self.assign();
        let process = tokio::select! {
            process = self.process(load.slot) => process?,
            early = &mut ended => return Err(self.early(early, None)),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reply = process.shared.register(id)?;
        let mut abandon = Abandon {
            shared: &process.shared,
            task_id: &ctx.task.task_id,
            done: false,
        };
        let request = format!(
            "{{\"id\":{id},\"attempt\":{},\"task\":{}}}\n",
            ctx.attempt,
            ctx.task.to_json()
        );
        tokio::select! {
            sent = process.send(request.as_bytes()) => sent?,
            early = &mut ended => return Err(self.leave(early, abandon).await),
        }
        let result = tokio::select! {
            reply = reply => reply
                .unwrap_or_else(|_| Err(HandlerError::transient(process.shared.closed_reason()))),
            early = &mut ended => return Err(self.leave(early, abandon).await),
        };
        abandon.done = true;
        self.after_reply(load.slot, &process);
        result
    }

    /// Stops the task's process and waits until it is gone (SIGTERM, then
    /// SIGKILL after the grace), so that, as with an exec child, the outcome
    /// is reported once the process has ended.
    async fn leave(&self, early: Early, abandon: Abandon<'_>) -> HandlerError {
        let shared = abandon.shared;
        drop(abandon);
        let bound = self.settings.grace + GONE_MARGIN;
        let _ = tokio::time::timeout(bound, shared.gone.cancelled()).await;
        self.early(early, Some(shared.closed_reason()))
    }

    fn early(&self, early: Early, process: Option<String>) -> HandlerError {
        let Early::TimedOut(limit) = early else {
            return HandlerError::transient("cancelled");
        };
        let secs = limit.as_secs_f64();
        let name = &self.settings.name;
        HandlerError::transient(match process {
            Some(why) => format!("handler `{name}` timed out after {secs:.1}s; {why}"),
            None => format!(
                "handler `{name}` timed out after {secs:.1}s waiting for a process to take the task"
            ),
        })
    }

    /// The least busy slot; the permit guarantees it has room.
    fn assign(&self) -> Load<'_> {
        let mut loads = lock(&self.loads);
        let slot = (0..loads.len()).min_by_key(|&i| loads[i]).unwrap_or(0);
        if let Some(l) = loads.get_mut(slot) {
            *l += 1;
        }
        Load { pool: self, slot }
    }

    /// The slot's process, started when there is none or it can take no task.
    async fn process(&self, slot: usize) -> Result<Arc<Process>, HandlerError> {
        let Some(s) = self.slots.get(slot) else {
            return Err(HandlerError::transient("no such slot"));
        };
        let seen = s.failures.load(Ordering::SeqCst);
        let mut current = s.process.lock().await;
        if let Some(p) = current.as_ref().filter(|p| p.shared.usable()) {
            return Ok(p.clone());
        }
        if s.failures.load(Ordering::SeqCst) != seen {
            return Err(HandlerError::transient(lock(&s.last_failure).clone()));
        }
        *current = None;
        match self.start().await {
            Ok(p) => {
                *current = Some(p.clone());
                Ok(p)
            }
            Err(e) => {
                *lock(&s.last_failure) = e.clone();
                s.failures.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(handler = %self.settings.name, error = %e, "handler process did not start");
                Err(HandlerError::transient(e))
            }
        }
    }

    /// Starts a process and waits until it says it is ready.
    async fn start(&self) -> Result<Arc<Process>, String> {
        let s = &self.settings;
        let mut cmd = exec::child_command(&s.argv, &s.env, s.working_dir.as_deref());
        if s.python_runtime {
            cmd.env("WORKER_PYTHON_RUNTIME", PYTHON_RUNTIME);
        }
        let child = exec::spawn(cmd).await.map_err(|e| {
            format!(
                "cannot start `{}` for handler `{}`: {e} (check WORKER_HANDLERS_FILE and PATH)",
                s.argv[0], s.name
            )
        })?;
        let mut group = Group::new(child, s.grace);
        let (pid, stdin, stdout, stderr) = match group.child() {
            Some(c) => (
                c.id().unwrap_or(0),
                c.stdin.take(),
                c.stdout.take(),
                c.stderr.take(),
            ),
            None => (0, None, None, None),
        };
        let (ready, is_ready) = oneshot::channel();
        let shared = Arc::new(Shared::new(s.name.clone(), pid, ready));
        tokio::spawn(supervise(group, stdout, stderr, shared.clone()));
        let process = Arc::new(Process {
            stdin: tokio::sync::Mutex::new(stdin),
            grace: s.grace,
            shared: shared.clone(),
        });
        ::metrics::counter!(names::HANDLER_PROCESSES_STARTED, "handler" => s.name.clone())
            .increment(1);
        match tokio::time::timeout(s.startup_timeout, is_ready).await {
            Ok(Ok(())) => {
                tracing::info!(handler = %s.name, pid, "handler process ready");
                Ok(process)
            }
            Ok(Err(_)) => Err(shared.closed_reason()),
            Err(_) => {
                let why = format!(
                    "handler `{}`: process {pid} did not write {{\"ready\": true}} within {}s \
                     (startup_timeout_seconds) and was stopped; see its stderr in the log",
                    s.name,
                    s.startup_timeout.as_secs_f64()
                );
                shared.stop(&why, "startup");
                Err(why)
            }
        }
    }

    /// Counts a served task and retires the process once it reached
    /// `max_tasks` or its RSS is above `max_memory_mib`.
    fn after_reply(&self, slot: usize, process: &Arc<Process>) {
        let shared = &process.shared;
        let served = shared.served.fetch_add(1, Ordering::Relaxed) + 1;
        let s = &self.settings;
        let (why, reason) = if let Some(max) = s.max_tasks.filter(|m| served >= *m) {
            (format!("it served max_tasks = {max} tasks"), "max_tasks")
        } else if let Some((rss, max)) = s
            .max_memory_kib
            .and_then(|max| rss_kib(shared.pid).filter(|r| *r > max).map(|r| (r, max)))
        {
            (
                format!(
                    "its RSS of {} MiB is above max_memory_mib = {}",
                    rss / 1024,
                    max / 1024
                ),
                "max_memory",
            )
        } else {
            return;
        };
        if shared.retiring.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(handler = %s.name, pid = shared.pid, served, "recycling the handler process: {why}");
        shared.set_stop_reason(&format!("recycled: {why}"), reason);
        // A slot that is busy is starting or handing out a process, and
        // replaces this one there since it is retiring.
        if let Some(Ok(mut current)) = self.slots.get(slot).map(|s| s.process.try_lock()) {
            if current.as_ref().is_some_and(|p| Arc::ptr_eq(p, process)) {
                *current = None;
            }
        }
    }
}

/// Why a task left before its reply.
#[derive(Clone, Copy)]
enum Early {
    TimedOut(Duration),
    Cancelled,
}

/// A task's share of a slot, released when the task ends however it ends.
struct Load<'a> {
    pool: &'a Persistent,
    slot: usize,
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        if let Some(l) = lock(&self.pool.loads).get_mut(self.slot) {
            *l = l.saturating_sub(1);
        }
    }
}

/// Stops the process when a task leaves without its reply: timed out or
/// cancelled. The process may be stuck in the task, and a request cannot be
/// taken back, so it is replaced.
struct Abandon<'a> {
    shared: &'a Shared,
    task_id: &'a str,
    done: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.stop(
                &format!(
                    "handler process {} was stopped because task `{}` did not finish in time \
                     (timeout or shutdown)",
                    self.shared.pid, self.task_id
                ),
                "timeout",
            );
        }
    }
}

/// One running process, shared by its slot and the tasks it runs. Dropping
/// the last reference closes its stdin and stops it.
struct Process {
    shared: Arc<Shared>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    grace: Duration,
}

impl Drop for Process {
    /// No task holds the process any more (recycled, or the pool is
    /// dropped at exit): SIGTERM now, and SIGKILL after the grace from a
    /// blocking-pool thread, which the runtime waits for before the worker
    /// exits. Done here rather than by the supervisor, which the runtime may
    /// drop at exit before it runs again. Stdin closes with it (EOF).
    fn drop(&mut self) {
        let shared = &self.shared;
        if shared.gone.is_cancelled() || shared.stop.is_cancelled() {
            return; // already gone, or the supervisor is stopping it
        }
        let Ok(raw) = i32::try_from(shared.pid) else {
            return;
        };
        let pgid = Pid::from_raw(raw);
        shared.set_stop_reason(
            &format!(
                "handler process {} of `{}` was stopped: the pool closed",
                shared.pid, shared.handler
            ),
            "shutdown",
        );
        shared.terminated.store(true, Ordering::SeqCst);
        let _ = killpg(pgid, Signal::SIGTERM);
        let (gone, grace) = (shared.gone.clone(), self.grace);
        let wait_out =
            move || {
                let deadline = std::time::Instant::now() + grace;
                // A group id is not reused while a member of the group lives.
                while exec::has_live_member(pgid) && !gone.is_cancelled() {
                    if std::time::Instant::now() >= deadline {
                        let _ = killpg(pgid, Signal::SIGKILL);
                        tracing::warn!(pgid = raw, grace_s = grace.as_secs_f64(),
                        "handler process still running after SIGTERM and its grace; sent SIGKILL");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn_blocking(wait_out));
        }
    }
}

impl Process {
    async fn send(&self, line: &[u8]) -> Result<(), HandlerError> {
        let mut stdin = self.stdin.lock().await;
        let written = match stdin.as_mut() {
            Some(pipe) => pipe.write_all(line).await,
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        written.map_err(|e| {
            let why = format!(
                "cannot write a task to handler process {} of `{}`: {e}",
                self.shared.pid, self.shared.handler
            );
            self.shared.stop(&why, "crash");
            HandlerError::transient(why)
        })
    }
}

/// What the tasks and the process's supervisor share.
struct Shared {
    handler: String,
    pid: u32,
    /// Fires when the process must stop; its supervisor then stops it.
    stop: CancellationToken,
    /// Fires once the process is gone and its waiting tasks have failed.
    gone: CancellationToken,
    state: Mutex<State>,
    served: AtomicU64,
    /// Set once it takes no new tasks (`max_tasks`, `max_memory_mib`).
    retiring: AtomicBool,
    /// Set when its last reference sent it SIGTERM (`Process`'s `Drop`).
    terminated: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Tasks waiting for their reply, by request id.
    pending: HashMap<u64, oneshot::Sender<HandlerResult>>,
    /// Fires on `{"ready": true}`; dropped if the process ends first.
    ready: Option<oneshot::Sender<()>>,
    /// Why it is stopped, for the tasks it fails and the log.
    stop_reason: Option<(String, &'static str)>,
    /// Set once the process is gone: the tasks still waiting get this error.
    closed: Option<String>,
}

impl Shared {
    fn new(handler: String, pid: u32, ready: oneshot::Sender<()>) -> Self {
        Self {
            handler,
            pid,
            stop: CancellationToken::new(),
            gone: CancellationToken::new(),
            state: Mutex::new(State {
                ready: Some(ready),
                ..State::default()
            }),
            served: AtomicU64::new(0),
            retiring: AtomicBool::new(false),
            terminated: AtomicBool::new(false),
        }
    }

    /// Whether a new task may go to this process.
    fn usable(&self) -> bool {
        !self.stop.is_cancelled()
            && !self.retiring.load(Ordering::SeqCst)
            && lock(&self.state).closed.is_none()
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<HandlerResult>, HandlerError> {
        let mut state = lock(&self.state);
        if let Some(why) = &state.closed {
            return Err(HandlerError::transient(why.clone()));
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    fn set_stop_reason(&self, why: &str, reason: &'static str) {
        lock(&self.state)
            .stop_reason
            .get_or_insert_with(|| (why.to_owned(), reason));
    }

    /// Asks the supervisor to stop the process (SIGTERM, then SIGKILL).
    fn stop(&self, why: &str, reason: &'static str) {
        self.set_stop_reason(why, reason);
        self.stop.cancel();
    }

    fn closed_reason(&self) -> String {
        let state = lock(&self.state);
        state.closed.clone().unwrap_or_else(|| {
            format!(
                "handler process {} of `{}` ended without answering",
                self.pid, self.handler
            )
        })
    }

    /// The process is gone: every task still waiting fails with `why`.
    fn close(&self, why: String) {
        let (pending, ready) = {
            let mut state = lock(&self.state);
            state.closed = Some(why.clone());
            (std::mem::take(&mut state.pending), state.ready.take())
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(HandlerError::transient(why.clone())));
        }
        drop(ready);
        self.gone.cancel();
    }

    /// Hands a reply to the task waiting for it; false if none is.
    fn answer(&self, id: u64, result: HandlerResult) -> bool {
        match lock(&self.state).pending.remove(&id) {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }

    /// One stdout line: a reply, the ready line, or noise for the log.
    fn on_stdout(&self, line: &[u8], cut: u64, noise: &mut StderrLog) {
        if cut > 0 {
            let failed = leading_id(line).is_some_and(|id| {
                self.answer(
                    id,
                    Err(HandlerError::permanent(format!(
                        "handler `{}` replied with more than {MAX_REPLY_BYTES} bytes; \
                         return a smaller result (store large data elsewhere and return its address)",
                        self.handler
                    ))),
                )
            });
            if !failed {
                noise.line(line, cut);
            }
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(line) else {
            noise.line(line, 0);
            return;
        };
        match reply.remove("id") {
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                let id = n.as_u64().unwrap_or_default();
                if !self.answer(id, decode_reply(&self.handler, reply)) {
                    tracing::warn!(
                        handler = %self.handler,
                        pid = self.pid,
                        id,
                        "a reply for a request that is not waiting (its task ended before it came, or the id is wrong); dropped"
                    );
                }
            }
            None if reply.get("ready") == Some(&Value::Bool(true)) => {
                if let Some(ready) = lock(&self.state).ready.take() {
                    let _ = ready.send(());
                }
            }
            _ => noise.line(line, 0),
        }
    }
}

/// A reply's outcome: `result`, or `error` with `permanent`; anything else
/// fails the task with a message that says what a reply must hold.
fn decode_reply(handler: &str, mut reply: Map<String, Value>) -> HandlerResult {
    match (reply.remove("result"), reply.remove("error")) {
        (Some(result), None) => Ok(result),
        (None, Some(Value::String(error))) => {
            let message = format!("handler `{handler}` failed: {}", truncate(&error));
            if reply.get("permanent") == Some(&Value::Bool(true)) {
                Err(HandlerError::permanent(message))
            } else {
                Err(HandlerError::transient(message))
            }
        }
        (result, error) => {
            let keys: Vec<&str> = result
                .iter()
                .map(|_| "result")
                .chain(error.iter().map(|_| "error"))
                .chain(reply.keys().map(String::as_str))
                .collect();
            Err(HandlerError::transient(format!(
                "handler `{handler}` sent a malformed reply (keys besides `id`: {keys:?}): \
                 a reply holds `id` and either `result` or `error` (a string, with \
                 `permanent`: true when a retry cannot help)"
            )))
        }
    }
}

/// `text` cut at [`MAX_ERROR_BYTES`], on a character boundary.
fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} … [{} more bytes]", &text[..end], text.len() - end)
}

/// The id of a reply too long to parse, from its first bytes (`{"id": 12,
/// ...`), so that its task fails at once instead of at its timeout.
fn leading_id(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(&line[..line.len().min(64)]).ok()?;
    let rest = text.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest
        .strip_prefix("\"id\"")?
        .trim_start()
        .strip_prefix(':')?;
    let rest = rest.trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// A process's resident memory in KiB (`/proc/PID/status`), when readable.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// How a process's supervision ended.
enum End {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stopped,
}

/// Owns the process: reads its replies and stderr until it exits or must
/// stop, stops it (SIGTERM, then SIGKILL after the grace), and fails what is
/// still waiting. If the runtime drops this future (the worker exits), the
/// group's `Drop` stops the process instead.
async fn supervise(
    mut group: Group,
    stdout: Option<impl AsyncRead + Unpin>,
    stderr: Option<impl AsyncRead + Unpin>,
    shared: Arc<Shared>,
) {
    let (pid, handler) = (shared.pid, shared.handler.clone());
    let stream_log = |stdout| {
        StderrLog::for_process(Origin::Process { pid, stdout }, handler.clone(), LOG_WINDOW)
    };
    let (mut errors, mut noise) = (stream_log(false), stream_log(true));
    let replies = &shared;
    let mut io = Box::pin(async {
        let out = async {
            if let Some(pipe) = stdout {
                exec::read_lines(pipe, MAX_REPLY_BYTES, |line, cut| {
                    replies.on_stdout(line, cut, &mut noise)
                })
                .await;
            }
        };
        let err = async {
            if let Some(pipe) = stderr {
                exec::read_lines(pipe, exec::STDERR_LINE_BYTES, |line, cut| {
                    errors.line(line, cut)
                })
                .await;
            }
        };
        tokio::join!(out, err);
    });
    let mut io_done = false;
    let end = loop {
        tokio::select! {
            () = &mut io, if !io_done => io_done = true,
            status = group.wait() => break End::Exited(status),
            () = shared.stop.cancelled() => break End::Stopped,
        }
    };
    let killed = match end {
        End::Exited(_) => false,
        End::Stopped => exec::stop_reading(&mut group, &mut io, &mut io_done).await,
    };
    if !io_done {
        // Replies written just before the exit are still in the pipe.
        let _ = tokio::time::timeout(exec::PIPE_DRAIN, &mut io).await;
    }
    drop(io);
    let (why, reason) = ended(&shared, &end, killed, &errors.tail());
    ::metrics::counter!(names::HANDLER_PROCESSES_STOPPED, "handler" => handler.clone(), "reason" => reason)
        .increment(1);
    if reason == "crash" {
        tracing::warn!(handler = %handler, pid, "{why}");
    } else {
        tracing::info!(handler = %handler, pid, "{why}");
    }
    shared.close(why);
}

/// Why a process ended, for its waiting tasks and the log, and the reason
/// label of the metric.
fn ended(shared: &Shared, end: &End, killed: bool, tail: &str) -> (String, &'static str) {
    let asked = lock(&shared.state).stop_reason.clone();
    let (pid, handler) = (shared.pid, &shared.handler);
    let terminated = shared.terminated.load(Ordering::SeqCst);
    let (mut why, reason) = match (end, asked) {
        (End::Exited(status), asked) => {
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            match asked {
                Some((why, reason)) if terminated => {
                    (format!("{why}; it exited ({status})"), reason)
                }
                _ => (
                    format!("handler process {pid} of `{handler}` exited ({status})"),
                    "crash",
                ),
            }
        }
        (End::Stopped, Some((why, reason))) => (why, reason),
        (End::Stopped, None) => (
            format!("handler process {pid} of `{handler}` was stopped: the pool closed"),
            "shutdown",
        ),
    };
    if matches!(end, End::Stopped) {
        why.push_str(if killed {
            "; SIGKILL: still running after SIGTERM and the grace (kill_grace_seconds)"
        } else {
            "; it exited on SIGTERM"
        });
    }
    if !tail.is_empty() && reason == "crash" {
        why.push_str(": ");
        why.push_str(tail);
    }
    (why, reason)
}

impl Handler for Persistent {
    fn description(&self) -> String {
        self.settings.description.clone()
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext, _payload: &'a Value) -> HandlerFuture<'a> {
        Box::pin(self.run_task(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::file::parse;
    use serde_json::json;

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn settings_are_checked() {
        let base = "[handlers.p]\nmode = \"persistent\"\ncommand = [\"x\"]\n";
        for (line, needle) in [
            ("processes = 0", "`processes` = 0 is out of range"),
            ("processes = 257", "`processes` = 257 is out of range"),
            ("max_in_flight = -1", "`max_in_flight` = -1 is out of range"),
            ("max_tasks = 0", "`max_tasks` = 0 is out of range"),
            ("max_memory_mib = 0", "`max_memory_mib` = 0 is out of range"),
            (
                "startup_timeout_seconds = 0",
                "`startup_timeout_seconds` = 0 is out of range",
            ),
            ("timeout_seconds = 1e20", "`timeout_seconds`"),
            ("kill_grace_seconds = 61", "`kill_grace_seconds` = 61"),
            (
                "permanent_exit_codes = [3]",
                "unknown field `permanent_exit_codes`",
            ),
            ("function = \"m:f\"", "exactly one of `command`"),
        ] {
            let e = err(&format!("{base}{line}"));
            assert!(
                e.starts_with("[handlers.p]: ") && e.contains(needle),
                "{line}: {e}"
            );
        }
        assert!(err("[handlers.p]\nmode = \"pool\"\ncommand = [\"x\"]").contains("unknown `mode`"));
        assert!(err("[handlers.p]\nfunction = \"nocolon\"").contains("package.module:function"));
        assert!(err("[handlers.p]\ncommand = [\"x\"]\nprocesses = 2")
            .contains("unknown field `processes`"));
        assert!(
            err("[handlers.p]\nmode = \"persistent\"\ncommand = [\"x\"]\npython = \"p\"")
                .contains("`python` goes with `function`")
        );
        let ok = parse(&format!(
            "{base}processes = 2\nmax_in_flight = 4\nmax_tasks = 100\nmax_memory_mib = 512\n\
             startup_timeout_seconds = 5\n[handlers.f]\nfunction = \"pkg.mod:resize\"\npython = \"/venv/bin/python\""
        ))
        .unwrap();
        assert_eq!(ok[0].0, "f");
        assert!(ok[0]
            .1
            .description()
            .contains("Python function pkg.mod:resize"));
        assert!(
            ok[1].1.description().contains("2 processes × 4 tasks"),
            "{}",
            ok[1].1.description()
        );
    }

    #[test]
    fn replies_decode_to_outcomes() {
        let map = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(
            decode_reply("h", map(json!({"result": null}))),
            Ok(Value::Null)
        );
        let e = decode_reply("h", map(json!({"error": "boom", "permanent": true}))).unwrap_err();
        assert_eq!(
            (e.message.as_str(), e.retry),
            ("handler `h` failed: boom", crate::handler::Retry::Permanent)
        );
        let e = decode_reply("h", map(json!({"error": "boom"}))).unwrap_err();
        assert_eq!(e.retry, crate::handler::Retry::Transient);
        for bad in [
            json!({}),
            json!({"result": 1, "error": "x"}),
            json!({"error": 5}),
        ] {
            let e = decode_reply("h", map(bad.clone())).unwrap_err();
            assert!(
                e.message.contains("malformed reply"),
                "{bad}: {}",
                e.message
            );
        }
        let long = "é".repeat(MAX_ERROR_BYTES);
        let e = decode_reply("h", map(json!({"error": long}))).unwrap_err();
        assert!(e.message.len() < MAX_ERROR_BYTES + 100 && e.message.ends_with("more bytes]"));
    }

    #[test]
    fn an_oversized_reply_is_attributed_by_its_leading_id() {
        assert_eq!(leading_id(br#"{"id":12,"result":"xxxx"#), Some(12));
        assert_eq!(leading_id(br#"  { "id" : 7 , "result"#), Some(7));
        assert_eq!(leading_id(br#"{"result":"x","id":3"#), None);
        assert_eq!(leading_id(b"garbage"), None);
    }

    #[test]
    fn the_python_runtime_is_embedded() {
        assert!(PYTHON_RUNTIME.contains("def main("));
        assert!(PYTHON_BOOTSTRAP.contains("m.main()"));
    }
}
