//! Outcome delivery end to end: the real `worker` binary, a real Azurite, real
//! webhook receivers on 127.0.0.1. What is proven here is the contract with
//! backends: run → report → settle, one `webhook-id` per outcome whatever
//! happens in between, the outbox (`<client>-webhooks`) for backends that are
//! away, its poison queue, and deliveries that never hold a task slot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::azurite::Azurite;
use common::consume::{hook, task, Client};
use common::queues::{wait_count, wait_empty, wait_one, ARRIVAL};
use common::receiver::{Receiver, Reply};
use common::worker::Worker;

#[tokio::test]
async fn a_task_redelivered_after_a_crash_reports_again_with_the_same_webhook_id() {
    let az = Azurite::shared();
    let c = Client::new(az, "redeliver").await;
    // The backend hangs on the first delivery (the worker is killed while
    // waiting for it), then answers at once.
    let rx = Receiver::start([
        Reply::status(200).delay(Duration::from_secs(120)),
        Reply::status(200),
    ]);
    c.send_task(&task("t-crash", "echo", json!({"n": 1}), Some(&hook(&rx))))
        .await;
    let first = c
        .worker()
        .env("WORKER_VISIBILITY_TIMEOUT", "4")
        .env("WORKER_WEBHOOK_TIMEOUT", "100")
        .spawn();
    let before = rx.recv(ARRIVAL).expect("the first delivery starts");
    // The outcome has not been acknowledged, so the message must still be there.
    assert_eq!(
        c.count().await,
        1,
        "deleted before the webhook was delivered"
    );
    let _ = first.kill();

    // The message comes back when its lease runs out; the task runs again and
    // reports again, under the same id.
    let second = c.worker().spawn();
    let again = rx
        .recv(ARRIVAL)
        .expect("the redelivered task reports again");
    assert_eq!(
        again.webhook_id(),
        before.webhook_id(),
        "one outcome, one webhook-id"
    );
    assert_eq!(before.json()["type"], "task.succeeded");
    assert_eq!(again.json()["type"], "task.succeeded");
    assert_eq!(before.json()["data"]["attempt"], 1);
    assert_eq!(again.json()["data"]["attempt"], 2);
    wait_empty(&c.tasks, "the task message after delivery").await;
    assert_eq!(c.outbox.clone().approximate_count().await.unwrap_or(0), 0);
    second.signal(Signal::SIGTERM);
    second.finish().assert_code(0);
}

#[tokio::test]
async fn single_task_mode_keeps_an_undelivered_outcome_in_the_outbox_for_worker_deliver() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "single-outbox");
    // Down for the two in-process attempts, then back.
    let rx = Receiver::start([Reply::status(503), Reply::status(503), Reply::status(200)]);
    let base = || {
        Worker::new()
            .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
            .env("WORKER_CLIENT", &c.name)
            .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "2")
            .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s")
    };
    let out = base()
        .task(&task("t-single", "echo", json!({"x": 1}), Some(&hook(&rx))))
        .run();
    out.assert_code(0);
    let first = rx.collect(2, ARRIVAL);
    assert_eq!(first.len(), 2, "two in-process attempts");
    let text = wait_one(&c.outbox.clone(), "the outboxed outcome").await;
    let entry: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(entry["webhook_id"], first[0].webhook_id());
    assert_eq!(entry["attempts"], 2);
    assert!(
        entry["last_error"].as_str().unwrap().contains("503"),
        "{entry}"
    );

    let out = base().args(["deliver", "--exit-when-empty"]).run();
    out.assert_code(0);
    let later = rx.recv(ARRIVAL).expect("delivered from the outbox");
    assert_eq!(
        later.webhook_id(),
        first[0].webhook_id(),
        "same id from the outbox"
    );
    assert_ne!(
        later.header("webhook-timestamp"),
        None,
        "a fresh timestamp is sent"
    );
    assert_eq!(later.json(), first[0].json(), "the same body");
    wait_empty(&c.outbox.clone(), "the delivered entry").await;

    // A failed task keeps its exit code; its outcome is kept the same way.
    let down = Receiver::start([Reply::status(500)]);
    let out = base()
        .task(&task("t-fails", "fail", json!({}), Some(&hook(&down))))
        .run();
    out.assert_code(1);
    let text = wait_one(&c.outbox.clone(), "the failed task's outcome").await;
    let entry: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(entry["event_type"], "task.failed");
    assert_eq!(entry["task_id"], "t-fails");
}

#[tokio::test]
async fn the_outbox_retries_on_its_schedule_then_poisons_and_replay_delivers() {
    let az = Azurite::shared();
    let c = Client::new(az, "outbox-poison").await;
    // In-process: 1 attempt; outbox: 2 attempts; all fail. After that, 200.
    let rx = Receiver::start([
        Reply::status(500),
        Reply::status(502),
        Reply::status(503),
        Reply::status(200),
    ]);
    let mut w = c
        .worker()
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s,1s")
        .spawn();
    c.send_task(&task("t-away", "echo", json!({}), Some(&hook(&rx))))
        .await;
    let tries = rx.collect(3, ARRIVAL);
    assert_eq!(tries.len(), 3, "one in-process and two outbox attempts");
    let id = tries[0].webhook_id();
    assert!(
        tries.iter().all(|r| r.webhook_id() == id),
        "one id throughout"
    );
    wait_one(&c.outbox_poison.clone(), "the given-up entry").await;
    wait_empty(&c.outbox.clone(), "the outbox after giving up").await;
    wait_empty(&c.tasks, "the task message").await;
    w.wait_for_log("webhook given up on");

    let list = c.worker().args(["poison", "list", "--webhooks"]).run();
    list.assert_code(0);
    assert!(
        list.stdout.contains("task_id=t-away"),
        "{}",
        list.describe()
    );
    let replay = c
        .worker()
        .args(["poison", "replay", "--webhooks", "--task-id", "t-away"])
        .run();
    replay.assert_code(0);
    let back = rx.recv(ARRIVAL).expect("the replayed entry is delivered");
    assert_eq!(back.webhook_id(), id);
    wait_empty(&c.outbox.clone(), "the outbox after replay").await;
    wait_empty(&c.outbox_poison.clone(), "the webhook poison queue").await;
    w.signal(Signal::SIGTERM);
    w.finish().assert_code(0);
}

#[tokio::test]
async fn a_refused_webhook_url_goes_straight_to_the_webhook_poison_queue() {
    let az = Azurite::shared();
    let c = Client::new(az, "refused").await;
    let rx = Receiver::ok();
    // Loopback is not allowed without WORKER_WEBHOOK_ALLOWED_HOSTS.
    let w = c
        .worker()
        .env_remove("WORKER_WEBHOOK_ALLOWED_HOSTS")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s,1s,1s")
        .spawn();
    c.send_task(&task("t-refused", "echo", json!({}), Some(&hook(&rx))))
        .await;
    let text = wait_one(&c.outbox_poison.clone(), "the refused outcome").await;
    let entry: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(entry["task_id"], "t-refused");
    assert!(
        entry["last_error"].as_str().unwrap().contains("egress"),
        "{entry}"
    );
    wait_empty(&c.tasks, "the task message").await;
    assert_eq!(c.outbox.clone().approximate_count().await.unwrap_or(0), 0);
    assert!(rx.drain().is_empty(), "a refused URL is never called");
    w.signal(Signal::SIGTERM);
    w.finish().assert_code(0);
}

#[tokio::test]
async fn a_slow_backend_does_not_hold_the_task_slot() {
    let az = Azurite::shared();
    let c = Client::new(az, "slow-slot").await;
    let tarpit = Receiver::start([Reply::status(200).delay(Duration::from_secs(300))]);
    let fast = Receiver::ok();
    let w = c
        .worker()
        .env("WORKER_CONCURRENCY", "1")
        .env("WORKER_WEBHOOK_TIMEOUT", "290")
        .spawn();
    c.send_task(&task("t-slow", "echo", json!({}), Some(&hook(&tarpit))))
        .await;
    tarpit.recv(ARRIVAL).expect("the slow delivery starts");
    // With one task slot, the next task runs while the first one's webhook
    // is still waiting for its backend.
    c.send_task(&task("t-fast", "echo", json!({}), Some(&hook(&fast))))
        .await;
    let got = fast
        .recv(ARRIVAL)
        .expect("the second task ran and reported");
    assert_eq!(got.json()["data"]["task_id"], "t-fast");
    // Its message is deleted once reported; the slow task's stays held
    // until its own delivery settles.
    wait_count(&c.tasks, 1, "only the slow task's message left").await;
    w.signal(Signal::SIGKILL);
    let _ = w.kill();
}

#[tokio::test]
async fn shutdown_hands_a_pending_delivery_to_the_outbox_due_at_once() {
    let az = Azurite::shared();
    let c = Client::new(az, "shutdown-outbox").await;
    let rx = Receiver::start([Reply::status(503)]);
    let w = c
        .worker()
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "10")
        .env("WORKER_WEBHOOK_INITIAL_BACKOFF", "5")
        .spawn();
    c.send_task(&task("t-term", "echo", json!({}), Some(&hook(&rx))))
        .await;
    let first = rx.recv(ARRIVAL).expect("the first attempt");
    w.signal(Signal::SIGTERM);
    w.finish().assert_code(0);
    // Due at once, not after the schedule's first delay (5 min by default).
    let text = wait_one(&c.outbox.clone(), "the handed-over outcome").await;
    let entry: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(entry["webhook_id"], first.webhook_id());
    assert_eq!(entry["outbox_attempts"], 0);
    assert_eq!(c.count().await, 0, "the task message is settled");
}

#[tokio::test]
async fn job_mode_executions_also_deliver_due_outbox_entries() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-outbox").await;
    let rx = Receiver::start([Reply::status(503), Reply::status(200)]);
    let job = || {
        c.worker()
            .arg("job")
            .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
            .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s")
    };
    c.send_task(&task("t-job", "echo", json!({}), Some(&hook(&rx))))
        .await;
    job().run().assert_code(0);
    let first = rx.recv(ARRIVAL).expect("the in-process attempt");
    assert_eq!(c.count().await, 0, "settled after outboxing");
    wait_one(&c.outbox.clone(), "the outboxed outcome").await;
    // An execution with no task (started for the outbox) delivers it.
    job().run().assert_code(0);
    let later = rx.recv(ARRIVAL).expect("delivered by the next execution");
    assert_eq!(later.webhook_id(), first.webhook_id());
    wait_empty(&c.outbox.clone(), "the outbox").await;
}

/// SIGTERM while a webhook request hangs: the request is given up when the
/// shutdown budget ends, the outcome goes to the outbox (due at once), the
/// task message is settled, and the worker exits long before the webhook
/// timeout. `finish_within` only catches a hang: the budget is a few seconds.
#[tokio::test]
async fn a_hanging_webhook_does_not_hold_the_exit() {
    let az = Azurite::shared();
    for mode in ["poll", "job"] {
        let c = Client::new(az, &format!("hang-exit-{mode}")).await;
        let rx = Receiver::start([Reply::status(200).delay(Duration::from_secs(300))]);
        c.send_task(&task("t-hang", "echo", json!({}), Some(&hook(&rx))))
            .await;
        let w = c
            .worker()
            .arg(mode)
            .env("WORKER_SHUTDOWN_GRACE", "1")
            .env("WORKER_WEBHOOK_TIMEOUT", "250")
            .spawn();
        let first = rx.recv(ARRIVAL).expect("the delivery starts");
        w.signal(Signal::SIGTERM);
        let out = w.finish_within(Duration::from_secs(60));
        out.assert_code(0);
        let text = wait_one(&c.outbox.clone(), "the handed-over outcome").await;
        let entry: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(entry["webhook_id"], first.webhook_id(), "{mode}");
        wait_empty(&c.tasks, "the task message").await;
    }
}
