//! The delivery contract's second layer, end to end: the real `worker`
//! binary, a real Azurite, real webhook backends on 127.0.0.1. Each test
//! pins one fault the first layer did not survive: a name that stops
//! resolving, a small backend flooded, a black-holed backend beside a healthy
//! one, an outbox that cannot be written for a while, the shutdown budget,
//! and the smaller breaks (ids of invalid messages, attempts of a rejected
//! delivery, the outbox schedule after a shutdown hand-over, releases beside
//! a dying exec child, a dropped lease).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::azurite::{unique_name, Azurite};
use common::backend::{Backend, Mode};
use common::consume::{hook, task, Client};
use common::proxy::Proxy;
use common::queues::{count, wait_count, ARRIVAL};
use common::receiver::{Receiver, Reply};
use common::worker::Worker;

/// Waits until `cond` holds, polling; fails with `what` after `bound`.
async fn wait_until(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} (after {bound:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- 1. DNS failures are transient ----

/// Under the production default (public addresses only, no allow list), a
/// webhook host that does not resolve is DNS trouble, not a policy refusal:
/// the outcome waits in the outbox for the name to come back instead of
/// being buried in the poison queue after one try; an `http` task whose host
/// does not resolve is retried, not poisoned.
#[tokio::test]
async fn a_name_that_does_not_resolve_is_retried_not_refused() {
    let az = Azurite::shared();
    let c = Client::new(az, "dns-transient").await;
    c.send_task(&task(
        "t-dns",
        "echo",
        json!({}),
        Some("http://backend.invalid/hooks"),
    ))
    .await;
    c.send_task(&task(
        "t-http",
        "http",
        json!({"url": "http://api.invalid/x"}),
        None,
    ))
    .await;
    let out = c
        .worker()
        .env_remove("WORKER_WEBHOOK_ALLOWED_HOSTS")
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "2")
        .env("WORKER_RETRY_DELAY", "600")
        .args(["poll", "--max-tasks", "2"])
        .run();
    out.assert_code(0);
    // The outcome is kept for later attempts, not given up on.
    wait_count(&c.outbox.clone(), 1, "the outcome waits in the outbox").await;
    assert_eq!(
        count(&c.outbox_poison.clone()).await,
        Some(0),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("did not resolve") && !out.stderr.contains("refused by egress"),
        "{}",
        out.describe()
    );
    // The http task failed transiently: it waits for its retry, not in poison.
    assert!(c.poisoned().await.is_empty(), "{}", out.describe());
    assert_eq!(c.count().await, 1, "the http task waits for its retry");
}

/// A backend whose name stops resolving for a while (a hosts file the test
/// edits, not the machine's DNS) still gets every outcome, under one id,
/// once it resolves again.
#[tokio::test]
async fn a_backend_whose_name_stops_resolving_gets_its_outcomes_when_it_is_back() {
    let az = Azurite::shared();
    let c = Client::new(az, "dns-back").await;
    let backend = Backend::start(Duration::from_secs(1));
    let url = format!("http://backend.invalid:{}/hooks", backend.port());
    for i in 0..5 {
        c.send_task(&task(
            &format!("t-{i}"),
            "echo",
            json!({ "i": i }),
            Some(&url),
        ))
        .await;
    }
    let w = c.worker();
    let hosts = w.write("hosts", "# backend.invalid is away\n");
    let run = w
        .env("WORKER_HOSTS_FILE", &hosts)
        .env(
            "WORKER_WEBHOOK_ALLOWED_HOSTS",
            format!("backend.invalid:{}", backend.port()),
        )
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "2")
        .env(
            "WORKER_WEBHOOK_OUTBOX_SCHEDULE",
            "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
        )
        .arg("poll")
        .spawn();
    wait_count(&c.outbox.clone(), 5, "every outcome waits in the outbox").await;
    wait_count(&c.tasks, 0, "task messages settled once outboxed").await;
    assert_eq!(backend.hit_count(), 0);
    std::fs::write(&hosts, "127.0.0.1 backend.invalid\n").unwrap();
    wait_until(
        ARRIVAL,
        "every outcome delivered once the name resolves",
        || backend.succeeded_count() == 5,
    )
    .await;
    wait_count(&c.outbox.clone(), 0, "the outbox after delivery").await;
    assert_eq!(count(&c.outbox_poison.clone()).await, Some(0));
    let ids: HashSet<_> = backend
        .hits()
        .into_iter()
        .filter_map(|h| h.webhook_id)
        .collect();
    assert_eq!(ids.len(), 5, "one webhook-id per outcome");
    run.signal(Signal::SIGTERM);
    run.finish().assert_code(0);
}

// ---- 3 and 4. A considerate client ----

/// A backend that can serve four requests at once (more get 503) is not
/// flooded: the worker learns its limit instead of opening a connection per
/// finished task, and every outcome arrives.
#[tokio::test]
async fn a_small_backend_is_not_flooded() {
    let az = Azurite::shared();
    let c = Client::new(az, "considerate").await;
    let backend = Backend::start(Duration::from_secs(1));
    backend.set_mode(Mode::Limited {
        capacity: 4,
        latency_ms: 50,
    });
    let n = 120;
    for i in 0..n {
        c.send_task(&task(
            &format!("t-{i}"),
            "echo",
            json!({}),
            Some(&backend.url("/hooks")),
        ))
        .await;
    }
    let out = c
        .worker()
        .env("WORKER_CONCURRENCY", "64")
        .env("WORKER_BATCH_SIZE", "32")
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "10")
        .args(["poll", "--exit-when-empty"])
        .run();
    out.assert_code(0);
    assert_eq!(backend.succeeded_count(), n, "{}", out.describe());
    let hits = backend.hits();
    let refused = hits.iter().filter(|h| !h.accepted()).count();
    assert!(
        backend.peak_in_flight() <= 12,
        "a 4-slot backend saw {} requests at once ({refused} refused of {})",
        backend.peak_in_flight(),
        hits.len()
    );
    assert!(
        refused * 4 < hits.len(),
        "{refused} of {} requests refused: the worker kept overloading the backend",
        hits.len()
    );
}

/// A black-holed backend (it accepts and never answers) beside a healthy
/// one: the healthy client's outcomes keep flowing while the black hole's
/// first requests still hang, and the black hole's outcomes go to its
/// outbox instead of filling the backlog (each holding a slot for the
/// whole request timeout, as the shared backlog once did).
#[tokio::test]
async fn a_black_holed_backend_does_not_hold_up_another_clients_outcomes() {
    let az = Azurite::shared();
    let (a, b) = (
        Client::new(az, "healthy").await,
        Client::new(az, "blackhole").await,
    );
    let healthy = Backend::start(Duration::from_secs(1));
    let hole = Backend::start(Duration::from_secs(600));
    hole.set_mode(Mode::Hang);
    let n = 80;
    for i in 0..n {
        let hook = hole.url("/h");
        b.send_task(&task(&format!("b-{i}"), "echo", json!({}), Some(&hook)))
            .await;
    }
    for i in 0..n {
        let hook = healthy.url("/h");
        a.send_task(&task(&format!("a-{i}"), "echo", json!({}), Some(&hook)))
            .await;
    }
    let timeout = Duration::from_secs(30);
    let run = Worker::new()
        .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
        .env("WORKER_CLIENT", format!("{},{}", b.name, a.name))
        .env("WORKER_MAX_POLL_INTERVAL", "0.5")
        // A small backlog (64 outcomes), so one host could fill it.
        .env("WORKER_WEBHOOK_CONCURRENCY", "16")
        .env("WORKER_WEBHOOK_TIMEOUT", timeout.as_secs().to_string())
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .arg("poll")
        .spawn();
    // Eighty echo tasks take a second or two; the bound is what a shared
    // backlog filled by the black hole would need at the very least.
    let deadline = Instant::now() + timeout - Duration::from_secs(5);
    while healthy.succeeded_count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if healthy.succeeded_count() < n {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("black-hole-worker.log");
        let _ = std::fs::write(&path, run.kill().stderr);
        panic!(
            "{} of {n} healthy outcomes arrived while the black hole's requests hung; worker log: {}",
            healthy.succeeded_count(),
            path.display()
        );
    }
    // Its task messages are settled, which happens only once an outcome is
    // delivered (impossible here) or kept in the outbox: nothing is lost.
    // The requests in flight when the host went silent end at the timeout.
    wait_count(&b.tasks, 0, "the black hole's task messages are settled").await;
    let kept = count(&b.outbox.clone()).await.unwrap_or(0);
    assert_eq!(kept, n as u64, "every black-holed outcome is in the outbox");
    assert!(hole.peak_in_flight() <= 8, "{}", hole.peak_in_flight());
    run.signal(Signal::SIGTERM);
    run.finish_within(ARRIVAL).assert_code(0);
}

// ---- 2 and 6c. An outbox that cannot be written for a while ----

/// While the outbox cannot be written, the task message is held (not
/// released to run again in a hot loop), and `--exit-when-empty` does not
/// end the run while its outcome is pending: once the outbox works again
/// the outcome is kept and the message deleted, before the worker exits.
#[tokio::test]
async fn an_unwritable_outbox_holds_the_task_until_it_can_be_written() {
    let az = Azurite::shared();
    let c = Client::new(az, "outbox-down").await;
    let proxy = Proxy::start(az.port());
    let rx = Receiver::start(std::iter::repeat_n(Reply::status(503), 100));
    c.send_task(&task("t-held", "echo", json!({}), Some(&hook(&rx))))
        .await;
    proxy.refuse_requests_containing(Some(&format!("/{}-webhooks", c.name)));
    let mut run = c
        .worker()
        .env("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string())
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .args(["poll", "--exit-when-empty"])
        .spawn();
    run.wait_for_logs("the outbox cannot be written", 2);
    assert!(
        run.is_running(),
        "--exit-when-empty ended with an outcome pending"
    );
    proxy.refuse_requests_containing(None);
    let out = run.finish_within(ARRIVAL);
    out.assert_code(0);
    assert_eq!(
        out.count_logs("task started"),
        1,
        "the task ran again while its outcome was pending:\n{}",
        out.describe()
    );
    assert_eq!(c.count().await, 0, "{}", out.describe());
    wait_count(&c.outbox.clone(), 1, "the outcome in the outbox").await;
}

// ---- 5. One shutdown deadline ----

/// Polling mode with no grace and a queue service that does not answer
/// (Azurite stopped with SIGSTOP): SIGTERM to exit stays within the budget
/// (grace + the settle margin), whatever is in flight.
#[tokio::test]
async fn polling_mode_exits_within_its_budget_when_the_queue_service_hangs() {
    let az = Azurite::start();
    let c = Client::new(&az, "budget").await;
    let mut run = c
        .worker()
        .env("WORKER_SHUTDOWN_GRACE", "0")
        .arg("poll")
        .spawn();
    run.wait_for_log("polling");
    let pid = nix::unistd::Pid::from_raw(az.pid());
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    // Let calls hang: the receive loop and the outbox loop are both waiting.
    std::thread::sleep(Duration::from_secs(1));
    let signalled = Instant::now();
    run.signal(Signal::SIGTERM);
    let out = run.finish_within(ARRIVAL);
    let took = signalled.elapsed();
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    out.assert_code(0);
    let budget = worker::poller::SETTLE_MARGIN;
    assert!(
        took < budget + Duration::from_millis(2500),
        "SIGTERM to exit took {took:?}, budget {budget:?}:\n{}",
        out.describe()
    );
}

/// Job mode: SIGTERM while the execution delivers outbox entries after a
/// successful task still exits 0 (the task's outcome), within the budget.
#[tokio::test]
async fn job_mode_exits_0_after_a_success_when_stopped_during_its_outbox_work() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-drain").await;
    let hole = Backend::start(Duration::from_secs(600));
    hole.set_mode(Mode::Hang);
    let entry = json!({
        "v": 1, "webhook_id": "msg_0123456789abcdef0123456789abcdef",
        "event_type": "task.succeeded", "task_id": "earlier",
        "url": hole.url("/h"), "body": "{}", "attempts": 3, "outbox_attempts": 0,
        "outboxed_at": "2026-12-01T00:00:00Z", "last_error": "HTTP 503"
    });
    let ob = c.outbox.clone();
    ob.create_if_missing().await.unwrap();
    ob.send(&entry.to_string(), None, Some(-1)).await.unwrap();
    c.send_task(&task("t-ok", "echo", json!({}), None)).await;
    let run = c
        .worker()
        .env("WORKER_WEBHOOK_TIMEOUT", "100")
        .arg("job")
        .spawn();
    wait_until(ARRIVAL, "the outbox entry's request is in flight", || {
        hole.hit_count() == 1
    })
    .await;
    assert_eq!(c.count().await, 0, "the task was settled first");
    let signalled = Instant::now();
    run.signal(Signal::SIGTERM);
    let out = run.finish_within(ARRIVAL);
    out.assert_code(0);
    let budget = worker::job::ONE_MESSAGE_SHUTDOWN_BUDGET;
    assert!(
        signalled.elapsed() < budget + Duration::from_secs(2),
        "{:?}:\n{}",
        signalled.elapsed(),
        out.describe()
    );
    // The entry stays in the outbox for a later attempt.
    wait_count(&ob, 1, "the entry after the stopped attempt").await;
}

// ---- 7. Single-task mode's shutdown is bounded ----

/// A single task whose webhook hangs: SIGTERM ends the run within the
/// budget, and the outcome is handed to the outbox rather than lost.
#[tokio::test]
async fn single_task_mode_stops_within_its_budget_and_keeps_the_outcome() {
    let az = Azurite::shared();
    let name = unique_name("single-budget");
    let hole = Backend::start(Duration::from_secs(600));
    hole.set_mode(Mode::Hang);
    let run = Worker::new()
        .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
        .env("WORKER_CLIENT", &name)
        .env("WORKER_WEBHOOK_TIMEOUT", "100")
        .task(&task("t-single", "echo", json!({}), Some(&hole.url("/h"))))
        .spawn();
    wait_until(ARRIVAL, "the webhook request is in flight", || {
        hole.hit_count() == 1
    })
    .await;
    let signalled = Instant::now();
    run.signal(Signal::SIGTERM);
    let out = run.finish_within(ARRIVAL);
    let budget = worker::job::ONE_MESSAGE_SHUTDOWN_BUDGET;
    assert!(
        signalled.elapsed() < budget + Duration::from_secs(2),
        "{:?}:\n{}",
        signalled.elapsed(),
        out.describe()
    );
    // The task itself succeeded; its outcome waits in the outbox.
    out.assert_code(0);
    let ob = az.service().queue(&format!("{name}-webhooks")).unwrap();
    wait_count(&ob, 1, "the outcome in the outbox").await;
}

// ---- 6. Smaller breaks ----

/// Invalid messages without a task id each get an id of their own (derived
/// from their content), so a backend deduping on `webhook-id` keeps both.
#[tokio::test]
async fn invalid_messages_without_an_id_report_under_distinct_ids() {
    let az = Azurite::shared();
    let c = Client::new(az, "no-id").await;
    let rx = Receiver::ok();
    for n in 0..2 {
        c.send(&json!({"task_type": 7, "n": n, "webhook_url": hook(&rx)}).to_string())
            .await;
    }
    let out = c.worker().args(["poll", "--exit-when-empty"]).run();
    out.assert_code(0);
    let got = rx.collect(2, ARRIVAL);
    assert_eq!(got.len(), 2, "{}", out.describe());
    let ids: HashSet<String> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "both invalid messages reported under one id");
    for r in &got {
        let task_id = r.json()["data"]["task_id"].as_str().unwrap().to_owned();
        assert!(task_id.starts_with("invalid-"), "{task_id}");
    }
}

/// A delivery that failed with 503 twice and then got a 400 made three
/// attempts, and the outbox entry says so.
#[tokio::test]
async fn a_rejected_delivery_records_every_attempt() {
    let az = Azurite::shared();
    let c = Client::new(az, "rejected").await;
    let rx = Receiver::start([Reply::status(503), Reply::status(503), Reply::status(400)]);
    c.send_task(&task("t-rej", "echo", json!({}), Some(&hook(&rx))))
        .await;
    let out = c
        .worker()
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "5")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s,1h")
        .args(["poll", "--max-tasks", "1"])
        .run();
    out.assert_code(0);
    // Due after a second: read the entry once it is visible.
    let ob = c.outbox.clone();
    let deadline = Instant::now() + ARRIVAL;
    let entry: Value = loop {
        if let Some(m) = ob.peek(1).await.unwrap_or_default().pop() {
            break serde_json::from_str(&m.text).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no entry in the outbox:\n{}",
            out.describe()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(entry["attempts"], 3, "{entry:#}");
    assert_eq!(rx.collect(3, ARRIVAL).len(), 3);
}

/// An outcome handed to the outbox at shutdown (due at once) still gets the
/// schedule's first delay after its first outbox attempt fails, not the
/// second's.
#[tokio::test]
async fn a_shutdown_hand_over_keeps_the_schedules_first_step() {
    let az = Azurite::shared();
    let c = Client::new(az, "first-step").await;
    let backend = Backend::start(Duration::from_secs(600));
    backend.set_mode(Mode::Hang);
    c.send_task(&task("t-step", "echo", json!({}), Some(&backend.url("/h"))))
        .await;
    let schedule = "2s,1h";
    let run = c
        .worker()
        .env("WORKER_SHUTDOWN_GRACE", "0")
        .env("WORKER_WEBHOOK_TIMEOUT", "100")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", schedule)
        .arg("poll")
        .spawn();
    wait_until(ARRIVAL, "the webhook is in flight", || {
        backend.hit_count() == 1
    })
    .await;
    run.signal(Signal::SIGTERM);
    run.finish_within(ARRIVAL).assert_code(0);
    wait_count(&c.outbox.clone(), 1, "handed over at shutdown").await;
    // The first outbox attempt fails (503); the next comes after 2 s, not 1 h.
    backend.set_mode(Mode::Unavailable);
    let deliver = c
        .worker()
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", schedule)
        .arg("deliver")
        .spawn();
    wait_until(ARRIVAL, "the first outbox attempt", || {
        backend.hit_count() >= 2
    })
    .await;
    backend.set_mode(Mode::Ok);
    wait_until(
        Duration::from_secs(30),
        "the second outbox attempt follows the schedule's first delay",
        || backend.succeeded_count() == 1,
    )
    .await;
    deliver.signal(Signal::SIGTERM);
    let _ = deliver.finish_within(ARRIVAL);
}

/// A task cancelled at shutdown whose exec child is still inside its kill
/// grace: the message is released only after that grace, so no second copy
/// can start beside the first one's child.
#[tokio::test]
async fn a_release_waits_out_the_exec_childs_kill_grace() {
    let az = Azurite::shared();
    let c = Client::new(az, "kill-grace").await;
    let text = c
        .send_task(&task("t-stubborn", "stubborn", json!({}), None))
        .await;
    let w = c.worker();
    let handlers = w.write(
        "handlers.toml",
        "[handlers.stubborn]\ncommand = [\"sh\", \"-c\", \"trap '' TERM; sleep 120\"]\nkill_grace_seconds = 20\n",
    );
    let mut run = w
        .env("WORKER_HANDLERS_FILE", &handlers)
        .env("WORKER_SHUTDOWN_GRACE", "0")
        .env("WORKER_CONCURRENCY", "1")
        .arg("poll")
        .spawn();
    run.wait_for_log("task started");
    run.signal(Signal::SIGTERM);
    let out = run.finish_within(ARRIVAL);
    out.assert_code(0);
    // Not visible yet: its first copy's child could still be running.
    let early = c.receive(Duration::from_secs(30)).await;
    assert!(early.is_empty(), "released at once:\n{}", out.describe());
    // ...and back once the grace is over.
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let got = c.receive(Duration::from_secs(30)).await;
        if let Some(m) = got.first() {
            assert_eq!(m.text, text);
            break;
        }
        assert!(Instant::now() < deadline, "the message never came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A lease whose owner is dropped unsettled (as at the shutdown deadline)
/// stops renewing: the message reappears when its visibility runs out.
#[tokio::test]
async fn a_dropped_lease_stops_renewing() {
    let az = Azurite::shared();
    let c = Client::new(az, "dropped-lease").await;
    c.send("payload").await;
    let mut got = c.receive(Duration::from_secs(2)).await;
    let msg = got.pop().unwrap();
    let lease = worker::lease::Lease::start(
        c.tasks.clone(),
        &msg,
        Duration::from_secs(2),
        tokio_util::sync::CancellationToken::new(),
    );
    drop(lease);
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if !c.receive(Duration::from_secs(30)).await.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the message stayed hidden: the dropped lease kept renewing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A message that expires while its task runs: the renewal's 404 is
/// reported as the message being gone, not as another worker owning it.
#[tokio::test]
async fn an_expired_message_is_not_reported_as_owned_by_another_worker() {
    let az = Azurite::shared();
    let c = Client::new(az, "expired").await;
    let text = task("t-exp", "sleep", json!({"seconds": 8}), None).to_string();
    c.tasks.send(&text, None, Some(3)).await.unwrap();
    let out = c
        .worker()
        .env("WORKER_VISIBILITY_TIMEOUT", "2")
        .args(["poll", "--max-tasks", "1"])
        .run();
    out.assert_code(0);
    assert!(
        out.stderr.contains("the message is gone"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("another worker's now")
            && !out.stderr.contains("will be delivered again"),
        "{}",
        out.describe()
    );
}
