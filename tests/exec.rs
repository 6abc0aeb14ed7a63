//! Exec children at the edges, end to end: the real `worker` binary in
//! single-task mode, real shell children. How a child is stopped (SIGTERM,
//! then SIGKILL after `kill_grace_seconds`), on the handler's own timeout and
//! on the task timeout (where the handler future is aborted); a background
//! helper holding stdout; a `kill -9` of the worker; the handlers file's
//! range checks; megabytes of stderr.
//!
//! No test sleeps for a fixed time and then expects an exact state: each one
//! waits for a file, a log line or the worker's exit, or polls with a bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use common::receiver::Receiver;
use common::worker::Worker;

/// How long to wait for a webhook that should arrive (it normally has by the
/// time the worker exits, because delivery happens before exit).
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long a condition polled for may take to come true.
const BOUND: Duration = Duration::from_secs(30);

/// `[handlers.NAME]` with `command = ["sh", "-c", script]`.
fn sh_handler(name: &str, script: &str, extra: &str) -> String {
    format!("[handlers.{name}]\ncommand = [\"sh\", \"-c\", {script:?}]\n{extra}\n")
}

/// Shell that writes its own pid to `file` (atomically, so a reader never
/// sees half of it).
fn write_pid(file: &Path) -> String {
    let f = file.display();
    format!("echo $$ > '{f}.tmp' && mv '{f}.tmp' '{f}'")
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

/// Polls `cond` every 10 ms until it holds; false after `bound`.
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

/// Fails the test (and kills the process) unless `pid` is gone within `bound`.
fn assert_dies_within(pid: i32, bound: Duration, what: &str) {
    if eventually(bound, || !alive(pid)) {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    panic!("{what} {pid} still running after {bound:?}");
}

/// The two ways a running child is stopped: the handler's own
/// `timeout_seconds` (the handler sends SIGTERM and waits; `task.failed`) and
/// the task timeout (`execute` aborts the handler future, the group's `Drop`
/// takes over; `task.timed_out`).
const STOPS: [(&str, &str, &str); 2] = [
    ("timeout_seconds = 1.0", "600", "task.failed"),
    ("", "1.5", "task.timed_out"),
];

#[test]
fn sigterm_comes_first_so_a_handler_can_clean_up() {
    for (timeout, task_timeout, kind) in STOPS {
        let rx = Receiver::ok();
        let w = Worker::new();
        let ready = w.path("child.pid");
        let cleaned = w.path("cleaned");
        // `wait` returns when the trapped SIGTERM arrives; the helper gets
        // SIGTERM too (same group) and dies by it.
        let script = format!(
            "trap 'echo cleaned > \"{}\"; exit 0' TERM; sleep 600 & {}; wait",
            cleaned.display(),
            write_pid(&ready)
        );
        // A grace far longer than the test: SIGKILL would fail it by the bound.
        let extra = format!("{timeout}\nkill_grace_seconds = 60");
        let handlers = w.write("handlers.toml", sh_handler("tidy", &script, &extra));
        let started = Instant::now();
        let out = w
            .env("WORKER_HANDLERS_FILE", handlers)
            .env("WORKER_TASK_TIMEOUT", task_timeout)
            .task(&json!({"task_id": "t-tidy", "task_type": "tidy", "webhook_url": rx.url("/h")}))
            .spawn()
            .finish_within(BOUND);
        out.assert_code(1);
        let body = rx.recv(ARRIVAL).expect("webhook").json();
        assert_eq!(body["type"], kind, "{body}");
        if kind == "task.failed" {
            let error = body["data"]["error"].as_str().unwrap();
            assert!(
                error.contains("timed out after 1.0s") && error.contains("exited on SIGTERM"),
                "{error}"
            );
        }
        // The worker exits only after the child did: the cleanup is done.
        let marker = std::fs::read_to_string(out.dir.path().join("cleaned")).unwrap_or_else(|e| {
            panic!(
                "{kind}: the SIGTERM trap did not run ({e})\n{}",
                out.describe()
            )
        });
        assert_eq!(marker.trim(), "cleaned");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{kind}: the worker waited out the grace: {:?}",
            started.elapsed()
        );
        assert_dies_within(read_pid(&out.dir.path().join("child.pid")), BOUND, "child");
    }
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
    for (timeout, task_timeout, kind) in STOPS {
        let rx = Receiver::ok();
        let w = Worker::new();
        let pid_file = w.path("child.pid");
        // SIG_IGN is inherited by `sleep` too: nothing in the group obeys SIGTERM.
        let script = format!(
            "trap '' TERM; {}; while :; do sleep 1; done",
            write_pid(&pid_file)
        );
        let extra = format!("{timeout}\nkill_grace_seconds = 1.5");
        let handlers = w.write("handlers.toml", sh_handler("stubborn", &script, &extra));
        let out = w
            .env("WORKER_HANDLERS_FILE", handlers)
            .env("WORKER_TASK_TIMEOUT", task_timeout)
            .task(&json!({"task_id": "t-stubborn", "task_type": "stubborn", "webhook_url": rx.url("/h")}))
            .spawn()
            .finish_within(BOUND);
        out.assert_code(1);
        let body = rx.recv(ARRIVAL).expect("webhook").json();
        assert_eq!(body["type"], kind, "{body}");
        if kind == "task.failed" {
            // The handler itself waited out the grace before reporting.
            let error = body["data"]["error"].as_str().unwrap();
            assert!(
                error.contains("process group was killed")
                    && error.contains("SIGKILL: still running 1.5s after SIGTERM"),
                "{error}"
            );
            let ms = body["data"]["duration_ms"].as_u64().unwrap();
            assert!(
                ms >= 2_400,
                "reported after {ms} ms, before timeout + grace"
            );
        } else {
            // The aborted future left the SIGKILL to the group's `Drop`.
            assert_eq!(
                out.count_logs("still running after SIGTERM and its grace; sent SIGKILL"),
                1,
                "{}",
                out.describe()
            );
        }
        assert_dies_within(read_pid(&out.dir.path().join("child.pid")), BOUND, "child");
    }
}

#[test]
fn a_background_helper_holding_stdout_does_not_hold_the_task() {
    let w = Worker::new();
    let helper = w.path("helper.pid");
    // The helper inherits stdout and stderr and keeps both open for 600 s.
    let script = format!(
        "sleep 600 & echo $! > '{}'; echo '{{\"ok\": true}}'",
        helper.display()
    );
    let handlers = w.write("handlers.toml", sh_handler("bg", &script, ""));
    let started = Instant::now();
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .env("WORKER_TASK_TIMEOUT", "600")
        .task(&json!({"task_id": "t-bg", "task_type": "bg"}))
        .spawn()
        .finish_within(BOUND);
    out.assert_code(0);
    assert_eq!(out.event()["data"]["result"], json!({"ok": true}));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.count_logs("still holds its stdout or stderr"),
        1,
        "{}",
        out.describe()
    );
    // What the child left behind went with its task.
    assert_dies_within(
        read_pid(&out.dir.path().join("helper.pid")),
        BOUND,
        "helper",
    );
}

#[test]
fn kill_9_of_the_worker_leaves_no_orphan() {
    let w = Worker::new();
    let pid_file = w.path("child.pid");
    let script = format!("{}; exec sleep 600", write_pid(&pid_file));
    let handlers = w.write("handlers.toml", sh_handler("long", &script, ""));
    let mut running = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .env("WORKER_TASK_TIMEOUT", "600")
        .task(&json!({"task_id": "t-long", "task_type": "long"}))
        .spawn();
    assert!(
        eventually(BOUND, || pid_file.exists()),
        "the child never started:\n{}",
        running.logs()
    );
    let child = read_pid(&pid_file);
    assert!(alive(child), "the child died before the worker");
    let out = running.kill();
    assert_eq!(out.code, None, "killed by a signal: {}", out.describe());
    // The kernel's parent-death signal: normally within milliseconds.
    assert_dies_within(child, Duration::from_secs(5), "child of the killed worker");
}

#[test]
fn an_absurd_timeout_is_refused_at_start() {
    let w = Worker::new();
    let handlers = w.write(
        "handlers.toml",
        "[handlers.big]\ncommand = [\"true\"]\ntimeout_seconds = 1e20\n",
    );
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .task(&json!({"task_id": "t-big", "task_type": "big"}))
        .spawn()
        .finish_within(BOUND);
    // A configuration error, like any other invalid handlers file (tests/single.rs).
    out.assert_code(2);
    assert!(out.stdout.is_empty(), "no task ran: {}", out.describe());
    for needle in [
        "WORKER_HANDLERS_FILE",
        "[handlers.big]",
        "`timeout_seconds` = 100000000000000000000 is out of range",
    ] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.describe());
    }
}

#[test]
fn megabytes_of_stderr_are_bounded_in_the_log_and_the_error() {
    let rx = Receiver::ok();
    let w = Worker::new();
    // One 3 MB line with no newline for a long time, then 100 000 short lines.
    let script = "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo >&2; \
                  yes 'a line of stderr, again and again' | head -n 100000 >&2; \
                  echo 'last words' >&2; exit 3";
    let handlers = w.write("handlers.toml", sh_handler("loud", script, ""));
    let out = w
        .env("WORKER_HANDLERS_FILE", handlers)
        .task(&json!({"task_id": "t-loud", "task_type": "loud", "webhook_url": rx.url("/h")}))
        .spawn()
        .finish_within(BOUND);
    out.assert_code(1);

    // The webhook's error: the exit and a capped tail of stderr.
    let body = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(body["type"], "task.failed", "{body}");
    let error = body["data"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("handler `loud` failed with exit status 3: a line of stderr")
            && error.ends_with("\nlast words"),
        "{error}"
    );
    assert!(error.len() <= 4096 + 100, "{} bytes of error", error.len());

    // The log: the long line cut at 1 KiB, at most 1000 lines, one summary.
    let logged: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("stderr=") && l.contains("t-loud"))
        .collect();
    assert!(
        (2..=1000).contains(&logged.len()),
        "{} stderr lines logged",
        logged.len()
    );
    let cut = format!(
        "{} … [line cut: {} more bytes]",
        "x".repeat(1024),
        3_000_000 - 1024
    );
    assert!(logged[0].contains(&cut), "{}", &logged[0][..200]);
    assert!(!out.stderr.contains(&"x".repeat(1025)));
    let summary = format!("… {} more stderr lines (", 100_002 - logged.len());
    assert_eq!(out.count_logs(&summary), 1, "{summary}");
    assert_eq!(out.count_logs("more stderr lines"), 1);
    assert!(
        out.stderr.len() < 512 * 1024,
        "{} bytes of worker log",
        out.stderr.len()
    );
}
