//! Long-lived handler processes end to end: the real `worker` binary, real
//! Python processes running the embedded runtime with the handlers in
//! `tests/fixtures/persistent/handlers.py`, and, where several tasks must run
//! at once, polling mode on a real Azurite with a real webhook receiver.
//!
//! Every fault has its test: a crash mid-task, a task past its timeout
//! (SIGTERM, SIGKILL after the grace, its neighbours retried), malformed,
//! oversized and noisy replies, a process that never says it is ready,
//! recycling after `max_tasks` and above `max_memory_mib`, worker shutdown
//! and `kill -9`. No test sleeps for a fixed time and then expects an exact
//! state: each waits for a file, a webhook, a log line or the worker's exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::azurite::Azurite;
use common::consume::{event_for, events, hook, task, Client};
use common::receiver::Receiver;
use common::worker::{Output, Worker};

/// How long a condition polled for may take to come true.
const BOUND: Duration = Duration::from_secs(60);

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/persistent/handlers.py"
);

/// Fails the test with install instructions when there is no Python 3.
fn require_python() {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests run real Python handler processes: install Python 3.9+ as `python3` \
         (Debian: apt-get install python3)"
    );
}

/// A worker whose directory holds the fixture handlers and `handlers_toml`.
fn with_handlers(w: Worker, handlers_toml: &str) -> Worker {
    require_python();
    std::fs::copy(FIXTURE, w.path("handlers.py")).unwrap();
    let file = w.write("handlers.toml", handlers_toml);
    w.env("WORKER_HANDLERS_FILE", file)
}

/// `[handlers.NAME]` running `handlers:FUNCTION` with the embedded runtime.
fn function(name: &str, function: &str, extra: &str) -> String {
    format!("[handlers.{name}]\nfunction = \"handlers:{function}\"\n{extra}\n")
}

/// Runs one task in single-task mode; its outcome event and the output.
fn run_one(w: Worker, task: Value) -> (Value, Output) {
    let out = w.task(&task).spawn().finish_within(BOUND);
    let event = out.event();
    (event, out)
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
        }
    }
}

fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_dies_within(pid: i32, bound: Duration, what: &str) {
    if eventually(bound, || !alive(pid)) {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    panic!("{what} {pid} still running after {bound:?}");
}

fn read_pid(p: &Path) -> i32 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{} was not written: {e}", p.display()))
        .trim()
        .parse()
        .expect("a pid")
}

fn pid_of(event: &Value) -> i64 {
    event["data"]["result"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in {event:#}"))
}

#[test]
fn python_functions_run_unchanged_sync_async_and_failing() {
    let handlers = [
        function("add", "add", ""),
        function("info", "info", "env = [\"ALLOWED_VAR\"]"),
        function("failing", "fail", ""),
    ]
    .concat();
    let w = || {
        with_handlers(Worker::new(), &handlers)
            .env("ALLOWED_VAR", "1")
            .env("WORKER_TEST_SECRET", "must-not-reach-the-child")
    };

    // A plain function, its print() in the log and not in the reply.
    let (e, out) = run_one(
        w(),
        json!({"task_id": "t-add", "task_type": "add", "payload": {"a": 2, "b": 3}}),
    );
    assert_eq!(e["type"], "task.succeeded", "{}", out.describe());
    assert_eq!(e["data"]["result"]["sum"], 5);
    assert_eq!(
        out.count_logs("a print() from the handler goes to the log"),
        1,
        "{}",
        out.describe()
    );

    // An `async def` that takes the envelope as `task=`; the env allow-list.
    let (e, out) = run_one(w(), json!({"task_id": "t-info", "task_type": "info"}));
    assert_eq!(
        e["data"]["result"]["task_id"],
        "t-info",
        "{}",
        out.describe()
    );
    let env: Vec<&str> = e["data"]["result"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"ALLOWED_VAR") && env.contains(&"PATH"),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|v| v.starts_with("WORKER_")),
        "only allowed variables reach the process: {env:?}"
    );

    // An exception is a retryable failure, unless it says it is permanent.
    for (permanent, needle) in [
        (
            false,
            "handler `failing` failed: RuntimeError: the backend is down",
        ),
        (
            true,
            "handler `failing` failed: PermanentError: bad input, never retry",
        ),
    ] {
        let (e, out) = run_one(
            w(),
            json!({"task_id": "t-fail", "task_type": "failing", "payload": {"permanent": permanent}}),
        );
        assert_eq!(e["type"], "task.failed", "{}", out.describe());
        assert_eq!(e["data"]["error"], needle);
        assert_eq!(
            out.count_logs(&format!("permanent={permanent}")),
            1,
            "{}",
            out.describe()
        );
        assert!(
            out.count_logs("Traceback") >= 1,
            "the traceback is logged: {}",
            out.describe()
        );
    }
}

#[test]
fn python_dash_m_worker_runtime_serves_a_function() {
    require_python();
    // `worker python-runtime` prints the module a team saves next to its code.
    let w = Worker::new();
    let printed = Worker::new()
        .arg("python-runtime")
        .spawn()
        .finish_within(BOUND);
    printed.assert_code(0);
    w.write("worker_runtime.py", &printed.stdout);
    let handlers = "[handlers.add]\nmode = \"persistent\"\n\
                    command = [\"python3\", \"-m\", \"worker_runtime\", \"handlers:add\"]\n";
    let (e, out) = run_one(
        with_handlers(w, handlers),
        json!({"task_id": "t-m", "task_type": "add", "payload": {"a": 40, "b": 2}}),
    );
    assert_eq!(e["data"]["result"]["sum"], 42, "{}", out.describe());
}

#[test]
fn a_process_that_never_says_ready_is_stopped_at_its_startup_timeout() {
    let w = Worker::new();
    let pid_file = w.path("child.pid");
    let script = format!(
        "echo $$ > '{p}.tmp' && mv '{p}.tmp' '{p}'; echo 'loading…' >&2; exec sleep 600",
        p = pid_file.display()
    );
    let handlers = format!(
        "[handlers.mute]\nmode = \"persistent\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         startup_timeout_seconds = 1\nkill_grace_seconds = 1\n"
    );
    let (e, out) = run_one(
        with_handlers(w, &handlers),
        json!({"task_id": "t-mute", "task_type": "mute"}),
    );
    assert_eq!(e["type"], "task.failed", "{}", out.describe());
    let error = e["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("did not write {\"ready\": true} within 1s (startup_timeout_seconds)"),
        "{error}"
    );
    assert_eq!(
        out.count_logs("permanent=false"),
        1,
        "retryable: {}",
        out.describe()
    );
    assert_eq!(out.count_logs("stderr=loading…"), 1, "{}", out.describe());
    assert_dies_within(
        read_pid(&out.dir.path().join("child.pid")),
        BOUND,
        "silent process",
    );
}

/// A process that speaks the protocol by hand: its reply depends on the
/// task's payload `kind`.
const RAW: &str = r#"
import json, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    r = json.loads(line)
    kind = r["task"]["payload"]["kind"]
    if kind == "malformed":
        print(json.dumps({"id": r["id"], "resul": 1}), flush=True)
    elif kind == "oversized":
        sys.stdout.write('{"id": %d, "result": "' % r["id"])
        for _ in range(17):
            sys.stdout.write("x" * (1024 * 1024))
        sys.stdout.write('"}\n')
        sys.stdout.flush()
    else:
        for noise in ["starting up", "[1, 2]", '{"not": "a reply"}', "", "\x00\xff binary"]:
            print(noise, flush=True)
        print(json.dumps({"id": r["id"], "result": {"ok": True}}), flush=True)
"#;

#[test]
fn malformed_oversized_and_noisy_replies() {
    let run = |kind: &str| {
        let w = Worker::new();
        w.write("raw.py", RAW);
        let handlers =
            "[handlers.raw]\nmode = \"persistent\"\ncommand = [\"python3\", \"raw.py\"]\n";
        run_one(
            with_handlers(w, handlers),
            json!({"task_id": format!("t-{kind}"), "task_type": "raw", "payload": {"kind": kind}}),
        )
    };

    let (e, out) = run("malformed");
    assert_eq!(e["type"], "task.failed", "{}", out.describe());
    let error = e["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("sent a malformed reply") && error.contains("\"resul\""),
        "{error}"
    );

    let (e, out) = run("oversized");
    assert_eq!(e["type"], "task.failed", "{}", out.describe());
    assert_eq!(
        e["data"]["error"],
        "handler `raw` replied with more than 16777216 bytes; return a smaller result \
         (store large data elsewhere and return its address)"
    );
    assert_eq!(out.count_logs("permanent=true"), 1, "{}", out.describe());
    assert!(
        out.stderr.len() < 256 * 1024,
        "{} bytes of log",
        out.stderr.len()
    );

    let (e, out) = run("noise");
    assert_eq!(e["type"], "task.succeeded", "{}", out.describe());
    assert_eq!(e["data"]["result"], json!({"ok": true}));
    assert_eq!(
        out.count_logs("is not a reply"),
        4,
        "every non-blank line that is not a reply is logged: {}",
        out.describe()
    );
}

/// A polling worker on `c`'s queue with `handlers_toml`, quick retries.
fn poller(c: &Client, handlers_toml: &str, concurrency: u32) -> Worker {
    with_handlers(c.worker(), handlers_toml)
        .env("WORKER_RETRY_DELAY", "0")
        .env("WORKER_CONCURRENCY", concurrency.to_string())
        .env("WORKER_BATCH_SIZE", concurrency.to_string())
        .arg("poll")
}

/// Stops a polling worker with SIGTERM and collects its output.
fn stop(running: common::worker::Running) -> Output {
    running.signal(Signal::SIGTERM);
    running.finish_within(BOUND)
}

#[tokio::test]
async fn one_process_runs_many_tasks_at_once() {
    let az = Azurite::shared();
    let c = Client::new(az, "pers-many").await;
    let rx = Receiver::ok();
    let handlers = [
        function(
            "concurrent",
            "concurrent",
            "processes = 1\nmax_in_flight = 8",
        ),
        function("blocking", "blocking", "processes = 1\nmax_in_flight = 8"),
    ]
    .concat();
    for i in 0..16 {
        let kind = if i % 2 == 0 { "concurrent" } else { "blocking" };
        c.send_task(&task(
            &format!("t{i}"),
            kind,
            json!({"s": 0.5}),
            Some(&hook(&rx)),
        ))
        .await;
    }
    let running = poller(&c, &handlers, 8).spawn();
    let got = events(&rx, 16, BOUND);
    let out = stop(running);
    let mut pids: HashMap<&str, BTreeSet<i64>> = HashMap::new();
    let mut most: HashMap<&str, i64> = HashMap::new();
    for e in &got {
        assert_eq!(e["type"], "task.succeeded", "{e:#}\n{}", out.describe());
        let kind = e["data"]["task_type"].as_str().unwrap();
        pids.entry(kind).or_default().insert(pid_of(e));
        let m = e["data"]["result"]["max_running"].as_i64().unwrap();
        most.entry(kind)
            .and_modify(|x| *x = (*x).max(m))
            .or_insert(m);
    }
    for kind in ["concurrent", "blocking"] {
        assert_eq!(
            pids[kind].len(),
            1,
            "{kind}: one process for all its tasks: {pids:?}"
        );
        // An `async def` awaits on the loop, a plain function runs in a thread.
        assert!(
            most[kind] >= 2,
            "{kind}: never two tasks at once in its process: {most:?}"
        );
    }
    assert_eq!(
        out.count_logs("handler process ready"),
        2,
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn a_crash_fails_its_task_retryably_and_the_process_is_replaced() {
    let az = Azurite::shared();
    let c = Client::new(az, "pers-crash").await;
    let rx = Receiver::ok();
    // One task per process, so a crash holds no task but its own.
    let handlers = function("crash", "crash_once", "processes = 2\nmax_in_flight = 1");
    c.send_task(&task(
        "t-crash",
        "crash",
        json!({"id": "c", "crash": true, "s": 0.2}),
        Some(&hook(&rx)),
    ))
    .await;
    for i in 0..6 {
        let t = task(
            &format!("t-ok{i}"),
            "crash",
            json!({"id": i, "s": 0.3}),
            Some(&hook(&rx)),
        );
        c.send_task(&t).await;
    }
    let running = poller(&c, &handlers, 2).spawn();
    let got = events(&rx, 7, BOUND);
    let out = stop(running);
    let crashed = i64::from(read_pid(&out.dir.path().join("crashed-c")));
    let e = event_for(&got, "t-crash");
    assert_eq!(e["type"], "task.succeeded", "{e:#}\n{}", out.describe());
    assert_eq!(e["data"]["attempt"], 2, "{e:#}");
    assert_ne!(pid_of(e), crashed, "the retry ran in a new process");
    for i in 0..6 {
        let e = event_for(&got, &format!("t-ok{i}"));
        assert_eq!(e["type"], "task.succeeded", "{e:#}");
        assert_eq!(
            e["data"]["attempt"], 1,
            "a task on another process was affected: {e:#}"
        );
    }
    let failed = format!("handler process {crashed} of `crash` exited (exit status: 3)");
    assert_eq!(
        out.count_logs(&failed),
        2,
        "logged when it exits and as the task's error: {}",
        out.describe()
    );
    assert_eq!(out.count_logs("status=\"failed\""), 1, "{}", out.describe());
    assert!(
        out.count_logs("handler process ready") >= 3,
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn a_task_past_its_timeout_stops_its_process_and_its_neighbours_are_retried() {
    let az = Azurite::shared();
    let c = Client::new(az, "pers-timeout").await;
    let rx = Receiver::ok();
    let extra = "processes = 1\nmax_in_flight = 4\ntimeout_seconds = 5\nkill_grace_seconds = 1\nenv = [\"ON_TERM\"]";
    // The neighbours are tasks of the same handler (another name would be
    // another pool), whose first attempt hangs too.
    let handlers = function("hang", "hang_once", extra);
    c.send_task(&task(
        "t-hang",
        "hang",
        json!({"id": "h"}),
        Some(&hook(&rx)),
    ))
    .await;
    let running = poller(&c, &handlers, 4).env("ON_TERM", "ignore").spawn();
    // The neighbours start at least two seconds after the hanging task, so
    // their own timeout comes after its timeout plus the grace.
    let beat = running_dir(&running).join("heartbeat-h");
    assert!(
        eventually(BOUND, || std::fs::read_to_string(&beat)
            .is_ok_and(|n| n.trim().parse::<u32>().is_ok_and(|n| n >= 20))),
        "the hanging task never ran"
    );
    for i in 0..2 {
        c.send_task(&task(
            &format!("t-n{i}"),
            "hang",
            json!({"id": format!("n{i}")}),
            Some(&hook(&rx)),
        ))
        .await;
    }
    let got = events(&rx, 3, BOUND);
    let out = stop(running);
    let hung = read_pid(&out.dir.path().join("hang-h"));
    for e in &got {
        assert_eq!(e["type"], "task.succeeded", "{e:#}\n{}", out.describe());
        assert_eq!(e["data"]["attempt"], 2, "{e:#}");
        assert_ne!(pid_of(e), i64::from(hung), "{e:#}");
    }
    // SIGTERM first (the handler recorded it), SIGKILL after the grace.
    assert!(
        out.dir.path().join(format!("term-{hung}")).exists(),
        "{}",
        out.describe()
    );
    assert_dies_within(hung, BOUND, "the timed-out process");
    assert_eq!(
        out.count_logs("handler `hang` timed out after 5.0s"),
        1,
        "{}",
        out.describe()
    );
    let neighbours =
        "was stopped because task `t-hang` did not finish in time (timeout or shutdown); \
                      SIGKILL: still running after SIGTERM";
    assert_eq!(
        out.count_logs(neighbours),
        4,
        "the process's end, the task's and its two neighbours' errors: {}",
        out.describe()
    );
}

/// The directory of a running worker (its working directory).
fn running_dir(running: &common::worker::Running) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{}/cwd", running.pid())).unwrap()
}

#[tokio::test]
async fn processes_are_recycled_after_max_tasks_and_above_max_memory() {
    let az = Azurite::shared();
    let c = Client::new(az, "pers-recycle").await;
    let rx = Receiver::ok();
    let handlers = [
        function("counted", "pid", "processes = 1\nmax_tasks = 3"),
        function("grow", "grow", "processes = 1\nmax_memory_mib = 48"),
    ]
    .concat();
    for i in 0..7 {
        c.send_task(&task(
            &format!("t-c{i}"),
            "counted",
            Value::Null,
            Some(&hook(&rx)),
        ))
        .await;
    }
    for i in 0..3 {
        c.send_task(&task(
            &format!("t-g{i}"),
            "grow",
            json!({"mib": 64}),
            Some(&hook(&rx)),
        ))
        .await;
    }
    // One task at a time: each process's tasks are counted exactly.
    let running = poller(&c, &handlers, 1).spawn();
    let got = events(&rx, 10, BOUND);
    let out = stop(running);
    let mut served: HashMap<i64, usize> = HashMap::new();
    let mut grown = BTreeSet::new();
    for e in &got {
        assert_eq!(e["type"], "task.succeeded", "{e:#}\n{}", out.describe());
        assert_eq!(e["data"]["attempt"], 1, "{e:#}");
        if e["data"]["task_type"] == "counted" {
            *served.entry(pid_of(e)).or_default() += 1;
        } else {
            grown.insert(pid_of(e));
        }
    }
    let mut counts: Vec<usize> = served.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![1, 3, 3], "tasks per process: {served:?}");
    assert_eq!(
        grown.len(),
        3,
        "each 64 MiB task left its process above 48 MiB"
    );
    assert_eq!(
        out.count_logs("recycling the handler process: it served max_tasks = 3 tasks"),
        2,
        "{}",
        out.describe()
    );
    assert_eq!(
        out.count_logs("recycling the handler process: its RSS of"),
        3,
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn worker_shutdown_stops_the_processes_with_sigterm_first() {
    let az = Azurite::shared();
    let c = Client::new(az, "pers-shutdown").await;
    let extra = "processes = 2\nenv = [\"ON_TERM\"]";
    let handlers = [
        function("wait", "wait_once", extra),
        function("pid", "pid", extra),
    ]
    .concat();
    // One process busy with a task at the signal, one idle after its task.
    c.send_task(&task("t-idle", "pid", Value::Null, None)).await;
    c.send_task(&task("t-wait", "wait", json!({"id": "w"}), None))
        .await;
    let mut running = poller(&c, &handlers, 2)
        .env("ON_TERM", "cleanup")
        .env("WORKER_SHUTDOWN_GRACE", "1")
        .spawn();
    let dir = running_dir(&running);
    assert!(
        eventually(BOUND, || dir.join("wait-w").exists()),
        "the task never started:\n{}",
        running.logs()
    );
    running.wait_for_log("task succeeded");
    let idle: i32 = running
        .logs()
        .lines()
        .find(|l| l.contains("handler process ready handler=pid"))
        .and_then(|l| l.rsplit("pid=").next())
        .and_then(|p| p.trim().parse().ok())
        .expect("the idle process's pid in the log");
    let busy = read_pid(&dir.join("wait-w"));
    let out = stop(running);
    out.assert_code(0);
    // The busy process's SIGTERM trap ran to the end before the worker exited.
    assert!(
        out.dir.path().join(format!("cleaned-{busy}")).exists(),
        "busy process {busy} did not clean up: {}",
        out.describe()
    );
    // Both are gone with the worker (the idle one holds no task: no grace).
    for (what, pid) in [("busy", busy), ("idle", idle)] {
        assert_dies_within(pid, Duration::from_secs(5), what);
    }
}

#[test]
fn kill_9_of_the_worker_takes_its_processes_along() {
    let w = with_handlers(Worker::new(), &function("wait", "wait_once", ""));
    let marker = w.path("wait-k");
    let mut running = w
        .task(&json!({"task_id": "t-k", "task_type": "wait", "payload": {"id": "k"}}))
        .spawn();
    assert!(
        eventually(BOUND, || marker.exists()),
        "the task never started:\n{}",
        running.logs()
    );
    let child = read_pid(&marker);
    let out = running.kill();
    assert_eq!(out.code, None, "killed by a signal: {}", out.describe());
    // The kernel's parent-death signal: normally within milliseconds.
    assert_dies_within(
        child,
        Duration::from_secs(5),
        "process of the killed worker",
    );
}
