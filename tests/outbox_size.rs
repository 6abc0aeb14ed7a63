//! Outcomes of any size through the webhook outbox, end to end: the real
//! `worker` binary, a real Azurite (queue and blob services), real webhook
//! receivers. An outbox entry is a queue message (64 KiB); an outcome larger
//! than that is kept as a blob in `<client>-webhooks` and the entry points to
//! it. Whatever the size of the result or of the task id, the backend gets
//! the very body the in-process attempt sent, under the same `webhook-id`,
//! also after the entry was poisoned and replayed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use worker::queue::ClaimStore;

use common::azurite::Azurite;
use common::consume::{hook, task, Client};
use common::queues::{wait_empty, wait_visible, ARRIVAL};
use common::receiver::{Receiver, Reply, Request};
use common::worker::{Output, Worker};

fn claims(az: &Azurite, c: &Client) -> ClaimStore {
    az.claims(&format!("{}-webhooks", c.name))
}

/// The worker for client `c` with one in-process attempt and one outbox
/// attempt a second later.
fn base(az: &Azurite, c: &Client) -> Worker {
    Worker::new()
        .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
        .env("WORKER_CLIENT", &c.name)
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s")
}

/// Runs `task` in single-task mode, read from stdin (no size limit short of
/// 16 MiB, unlike an environment variable).
fn run_single(az: &Azurite, c: &Client, task: &Value) -> Output {
    base(az, c)
        .args(["run", "--task-file", "-"])
        .stdin(task.to_string())
        .run()
}

fn deliver(az: &Azurite, c: &Client) -> Output {
    let out = base(az, c).args(["deliver", "--exit-when-empty"]).run();
    out.assert_code(0);
    out
}

fn entry(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// A payload of about `n` bytes with characters that need escaping at every
/// layer (JSON twice, then XML), so sizes and bytes are both put to the test.
fn payload(n: usize) -> Value {
    let head = "<&\"'>é😀\\";
    json!({"blob": format!("{head}{}", "x".repeat(n.saturating_sub(head.len())))})
}

#[tokio::test]
async fn results_of_any_size_reach_the_backend_whole_from_the_outbox() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "size-results");
    // (task id, result size, whether it fits in an entry)
    let cases = [
        ("t-50k", 50_000, true),
        ("t-61k", 61_000, false),
        ("t-100k", 100 * 1024, false),
        ("t-1m", 1024 * 1024, false),
    ];
    // Down for each in-process attempt, then back.
    let rx = Receiver::start([
        Reply::status(503),
        Reply::status(503),
        Reply::status(503),
        Reply::status(503),
        Reply::status(200),
    ]);
    let mut first = Vec::new();
    for (id, size, _) in cases {
        run_single(az, &c, &task(id, "echo", payload(size), Some(&hook(&rx)))).assert_code(0);
        first.push(rx.recv(ARRIVAL).expect("the in-process attempt"));
    }
    let texts = wait_visible(&c.outbox.clone(), cases.len(), "the outboxed outcomes").await;
    let mut claimed = Vec::new();
    for text in &texts {
        let e = entry(text);
        let task_id = e["task_id"].as_str().unwrap();
        let (_, size, fits) = cases.iter().find(|(id, ..)| *id == task_id).unwrap();
        if *fits {
            assert_eq!(e["v"], 1, "{size}: an entry as before");
            assert!(e["body"].as_str().unwrap().len() > *size, "{size}: inline");
        } else {
            assert_eq!(e["v"], 2, "{size}: claimed");
            assert!(text.len() < 2048, "{size}: a small entry: {text}");
            let name = e["claim"].as_str().unwrap().to_owned();
            assert!(claims(az, &c).get(&name).await.unwrap().is_some());
            claimed.push(name);
        }
    }
    assert_eq!(claimed.len(), 3);

    deliver(az, &c);
    let later = rx.collect(cases.len(), ARRIVAL);
    assert_eq!(later.len(), cases.len(), "every outcome from the outbox");
    for before in &first {
        let task_id = before.json()["data"]["task_id"].clone();
        let after: Vec<&Request> = later
            .iter()
            .filter(|r| r.json()["data"]["task_id"] == task_id)
            .collect();
        assert_eq!(after.len(), 1, "{task_id}: delivered once");
        assert_eq!(
            after[0].webhook_id(),
            before.webhook_id(),
            "{task_id}: the same id"
        );
        assert!(
            after[0].body == before.body,
            "{task_id}: byte-identical body"
        );
        let (_, size, _) = cases.iter().find(|(id, ..)| *id == task_id).unwrap();
        assert_eq!(
            after[0].json()["data"]["result"],
            payload(*size),
            "{task_id}: the whole result"
        );
    }
    wait_empty(&c.outbox.clone(), "the outbox after delivery").await;
    for name in claimed {
        assert_eq!(
            claims(az, &c).get(&name).await.unwrap(),
            None,
            "{name}: deleted once delivered"
        );
    }
}

#[tokio::test]
async fn a_huge_task_id_goes_through_the_outbox_whole() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "size-task-id");
    let rx = Receiver::start([Reply::status(503), Reply::status(200)]);
    let task_id = format!("t-{}", "\"<id>&".repeat(100 * 1024 / 7));
    run_single(
        az,
        &c,
        &task(&task_id, "echo", json!({"n": 1}), Some(&hook(&rx))),
    )
    .assert_code(0);
    let before = rx.recv(ARRIVAL).expect("the in-process attempt");
    let text = wait_visible(&c.outbox.clone(), 1, "the outboxed outcome").await;
    let e = entry(&text[0]);
    assert_eq!(e["v"], 2, "{}", &text[0][..200.min(text[0].len())]);
    assert!(text[0].len() < 2048, "a small entry: {}", text[0].len());
    assert!(e["task_id"].as_str().unwrap().len() <= 128);

    deliver(az, &c);
    let after = rx.recv(ARRIVAL).expect("delivered from the outbox");
    assert_eq!(after.webhook_id(), before.webhook_id());
    assert_eq!(after.json()["data"]["task_id"], task_id.as_str());
    assert!(after.body == before.body, "byte-identical body");
    wait_empty(&c.outbox.clone(), "the outbox after delivery").await;
}

/// Polling mode, where the task itself arrives in a queue message: a result
/// about as large as that message still reaches the backend whole, and the
/// task is settled once, with no `task.failed` in its place.
#[tokio::test]
async fn polling_mode_outboxes_a_result_near_the_queue_message_limit() {
    let az = Azurite::shared();
    let c = Client::new(az, "size-poll").await;
    let rx = Receiver::start([Reply::status(503), Reply::status(200)]);
    let w = c
        .worker()
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", "1s")
        .spawn();
    let p = payload(60_000);
    c.send_task(&task("t-near", "echo", p.clone(), Some(&hook(&rx))))
        .await;
    let before = rx.recv(ARRIVAL).expect("the in-process attempt");
    let after = rx.recv(ARRIVAL).expect("delivered from the outbox");
    assert_eq!(after.webhook_id(), before.webhook_id());
    assert_eq!(after.json()["type"], "task.succeeded");
    assert_eq!(after.json()["data"]["result"], p);
    assert!(after.body == before.body, "byte-identical body");
    wait_empty(&c.tasks, "the task message").await;
    wait_empty(&c.outbox.clone(), "the outbox").await;
    assert!(c.poisoned().await.is_empty(), "nothing poisoned");
    w.signal(Signal::SIGTERM);
    w.finish().assert_code(0);
    assert!(rx.drain().is_empty(), "one outcome, delivered once");
}

#[tokio::test]
async fn a_claimed_outcome_keeps_its_blob_through_poison_and_replay() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "size-replay");
    // Fails in-process and on its one outbox attempt, then answers.
    let rx = Receiver::start([Reply::status(503), Reply::status(502), Reply::status(200)]);
    let p = payload(200 * 1024);
    run_single(az, &c, &task("t-big", "echo", p.clone(), Some(&hook(&rx)))).assert_code(0);
    let before = rx.recv(ARRIVAL).expect("the in-process attempt");
    let text = wait_visible(&c.outbox.clone(), 1, "the outboxed outcome").await;
    let claim = entry(&text[0])["claim"].as_str().unwrap().to_owned();

    deliver(az, &c);
    rx.recv(ARRIVAL).expect("the outbox attempt");
    wait_visible(&c.outbox_poison.clone(), 1, "the given-up entry").await;
    wait_empty(&c.outbox.clone(), "the outbox after giving up").await;
    assert!(
        claims(az, &c).get(&claim).await.unwrap().is_some(),
        "a poisoned entry keeps its blob"
    );
    let list = c.worker().args(["poison", "list", "--webhooks"]).run();
    list.assert_code(0);
    assert!(
        list.stdout.contains("task_id=t-big")
            && list.stdout.contains(&format!("delivery=blob:{claim}"))
            && list.stdout.contains("502"),
        "{}",
        list.describe()
    );
    c.worker()
        .args(["poison", "replay", "--webhooks", "--task-id", "t-big"])
        .run()
        .assert_code(0);
    wait_visible(&c.outbox.clone(), 1, "the replayed entry").await;

    deliver(az, &c);
    let after = rx.recv(ARRIVAL).expect("the replayed entry is delivered");
    assert_eq!(after.webhook_id(), before.webhook_id());
    assert_eq!(after.json()["data"]["result"], p);
    assert!(after.body == before.body, "byte-identical body");
    wait_empty(&c.outbox.clone(), "the outbox").await;
    wait_empty(&c.outbox_poison.clone(), "the webhook poison queue").await;
    assert_eq!(claims(az, &c).get(&claim).await.unwrap(), None);
}

#[tokio::test]
async fn an_entry_whose_blob_is_gone_is_poisoned_saying_so() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "size-gone");
    let rx = Receiver::start([Reply::status(503), Reply::status(200)]);
    run_single(
        az,
        &c,
        &task("t-gone", "echo", payload(100 * 1024), Some(&hook(&rx))),
    )
    .assert_code(0);
    rx.recv(ARRIVAL).expect("the in-process attempt");
    let text = wait_visible(&c.outbox.clone(), 1, "the outboxed outcome").await;
    let claim = entry(&text[0])["claim"].as_str().unwrap().to_owned();
    claims(az, &c).delete(&claim).await.unwrap();
    // Deleting what is already gone counts as done.
    claims(az, &c).delete(&claim).await.unwrap();

    deliver(az, &c);
    let poisoned = wait_visible(&c.outbox_poison.clone(), 1, "the entry with no blob").await;
    let e = entry(&poisoned[0]);
    let why = e["last_error"].as_str().unwrap();
    assert!(why.contains(&claim) && why.contains("is gone"), "{why}");
    wait_empty(&c.outbox.clone(), "the outbox").await;
    assert!(rx.drain().is_empty(), "nothing sent without the body");
}
