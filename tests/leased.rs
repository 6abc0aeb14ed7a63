//! Single-task mode holding its queue message, as on Azure Container
//! Instances: the test plays the Logic App (receives the message, starts the
//! real binary with TASK_DATA and the message's coordinates, never deletes
//! it) against a real Azurite and a real webhook receiver. The worker must
//! settle the message itself, and a container that dies without settling must
//! leave it to reappear.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::azurite::Azurite;
use common::consume::{hook, task, Client};
use common::receiver::Receiver;
use common::worker::Worker;

const ARRIVAL: Duration = Duration::from_secs(60);
/// How long to listen for a webhook that must not come.
const QUIET: Duration = Duration::from_millis(500);

/// What the Logic App hands to a container group: the message text as
/// TASK_DATA and the coordinates to hold it with.
struct Handed {
    text: String,
    id: String,
    receipt: String,
}

/// Sends `task` and receives it the way the Logic App trigger does.
async fn hand_over(c: &Client, task: &Value, lease: Duration) -> Handed {
    c.send_task(task).await;
    let mut got = c.receive(lease).await;
    assert_eq!(got.len(), 1, "the test's own queue holds one message");
    let m = got.remove(0);
    Handed {
        text: m.text,
        id: m.id,
        receipt: m.pop_receipt,
    }
}

fn container(c: &Client, h: &Handed, attempt: u32) -> Worker {
    c.worker()
        .env("TASK_DATA", &h.text)
        .env("WORKER_MESSAGE_ID", &h.id)
        .env("WORKER_POP_RECEIPT", &h.receipt)
        .env("WORKER_DEQUEUE_COUNT", attempt.to_string())
}

/// Waits until the tasks queue has a visible message; returns its text and
/// dequeue count.
async fn wait_visible(c: &Client) -> (String, u32) {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if let Some(m) = c.tasks.peek(1).await.unwrap().pop() {
            return (m.text, m.dequeue_count);
        }
        assert!(
            Instant::now() < deadline,
            "the message did not reappear within {ARRIVAL:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_gone(c: &Client) {
    let deadline = Instant::now() + ARRIVAL;
    while c.count().await != 0 {
        assert!(
            Instant::now() < deadline,
            "the message was not deleted within {ARRIVAL:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn holds_renews_reports_then_deletes() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-ok").await;
    let rx = Receiver::ok();
    // A 2 s lease from the "Logic App", a task longer than it: only the
    // worker's renewals keep the message hidden.
    let h = hand_over(
        &c,
        &task("t-held", "sleep", json!({"seconds": 8}), Some(&hook(&rx))),
        Duration::from_secs(2),
    )
    .await;
    // Renewed every 3 s: 3 s of slack for a renewal on a busy machine.
    let mut w = container(&c, &h, 1)
        .env("WORKER_VISIBILITY_TIMEOUT", "6")
        .spawn();
    w.wait_for_log("lease renewed");
    assert!(
        c.tasks.peek(1).await.unwrap().is_empty(),
        "the message must stay hidden while the task runs"
    );
    let event = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(event["type"], "task.succeeded");
    let out = w.finish();
    out.assert_code(0);
    assert_eq!(out.event()["data"]["task_id"], "t-held");
    wait_gone(&c).await;
    assert!(c.poisoned().await.is_empty());
}

#[tokio::test]
async fn a_failure_with_attempts_left_makes_the_message_visible_again_without_a_webhook() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-retry").await;
    let rx = Receiver::ok();
    let t = task("t-retry", "fail", json!({}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(30)).await;
    let out = container(&c, &h, 1).env("WORKER_RETRY_DELAY", "1").run();
    out.assert_code(1);
    let (text, _) = wait_visible(&c).await;
    assert_eq!(
        text, h.text,
        "the same message comes back for the next attempt"
    );
    assert!(rx.recv(QUIET).is_none(), "no webhook while retrying");
}

#[tokio::test]
async fn the_last_attempt_poisons_verbatim_and_reports() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-poison").await;
    let rx = Receiver::ok();
    let t = task("t-last", "fail", json!({}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(30)).await;
    container(&c, &h, 3)
        .env("WORKER_MAX_DEQUEUE_COUNT", "3")
        .run()
        .assert_code(1);
    let event = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(event["type"], "task.failed");
    assert_eq!(event["data"]["attempt"], 3);
    wait_gone(&c).await;
    assert_eq!(c.poisoned().await, vec![h.text]);
}

// The Logic App hands every message over without validating it: what is no
// valid task, and what was delivered more often than allowed, are the
// worker's to poison, with the task.failed webhook only the worker can send.

#[tokio::test]
async fn an_invalid_task_is_poisoned_with_task_failed_to_the_salvaged_url() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-invalid").await;
    let rx = Receiver::ok();
    // A webhook URL can be read, the task type is missing.
    let t = json!({"task_id": "t-invalid", "webhook_url": hook(&rx)});
    let h = hand_over(&c, &t, Duration::from_secs(30)).await;
    container(&c, &h, 1).run().assert_code(1);
    let event = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(event["type"], "task.failed", "{event:#}");
    assert_eq!(event["data"]["task_id"], "t-invalid");
    wait_gone(&c).await;
    assert_eq!(c.poisoned().await, vec![h.text]);
}

#[tokio::test]
async fn a_message_delivered_too_often_is_poisoned_before_it_runs() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-exhausted").await;
    let rx = Receiver::ok();
    let t = task("t-exhausted", "echo", json!({}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(30)).await;
    let out = container(&c, &h, 4)
        .env("WORKER_MAX_DEQUEUE_COUNT", "3")
        .run();
    out.assert_code(1);
    assert_eq!(out.count_logs("task started"), 0, "{}", out.describe());
    let event = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(event["type"], "task.failed", "{event:#}");
    assert_eq!(event["data"]["task_id"], "t-exhausted");
    wait_gone(&c).await;
    assert_eq!(c.poisoned().await, vec![h.text]);
}

#[tokio::test]
async fn sigterm_releases_the_message_at_once() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-term").await;
    let rx = Receiver::ok();
    let t = task("t-term", "sleep", json!({"seconds": 60}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(300)).await;
    let mut w = container(&c, &h, 1).spawn();
    w.wait_for_log("task started");
    w.signal(Signal::SIGTERM);
    w.finish().assert_code(1);
    // Visible again at once, not after the 300 s lease.
    let (text, _) = wait_visible(&c).await;
    assert_eq!(text, h.text);
    assert!(rx.recv(QUIET).is_none(), "a released task is not reported");
}

#[tokio::test]
async fn kill_9_leaves_the_message_to_reappear_after_its_lease() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-kill").await;
    let rx = Receiver::ok();
    let t = task("t-kill", "sleep", json!({"seconds": 60}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(300)).await;
    let mut w = container(&c, &h, 1)
        .env("WORKER_VISIBILITY_TIMEOUT", "3")
        .spawn();
    w.wait_for_log("task started");
    let _ = w.kill();
    let (text, count) = wait_visible(&c).await;
    assert_eq!(text, h.text);
    assert_eq!(count, 1, "it was received once, by the Logic App");
    assert!(rx.recv(QUIET).is_none());
}

#[tokio::test]
async fn a_stale_pop_receipt_runs_nothing() {
    let az = Azurite::shared();
    let c = Client::new(az, "held-stale").await;
    let rx = Receiver::ok();
    let t = task("t-stale", "echo", json!({}), Some(&hook(&rx)));
    let h = hand_over(&c, &t, Duration::from_secs(1)).await;
    // The lease ran out and another attempt received the message meanwhile.
    let (_, _) = wait_visible(&c).await;
    let again = c.receive(Duration::from_secs(60)).await;
    assert_eq!(again.len(), 1);
    let out = container(&c, &h, 1).run();
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("lease was gone before the task started"),
        "{}",
        out.describe()
    );
    assert!(rx.recv(QUIET).is_none(), "nothing ran, nothing is reported");
    assert_eq!(c.count().await, 1, "the other attempt still holds it");
}

#[tokio::test]
async fn a_message_id_without_a_pop_receipt_is_a_usage_error() {
    let out = Worker::new()
        .env("TASK_DATA", r#"{"task_id":"t","task_type":"echo"}"#)
        .env("WORKER_MESSAGE_ID", "abc")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("WORKER_POP_RECEIPT"),
        "{}",
        out.describe()
    );
}
