//! Job mode end to end (one leased message per execution, as an Azure
//! Container Apps job runs it): the real `worker` binary against a shared
//! Azurite, with a real webhook receiver on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use common::azurite::Azurite;
use common::consume::{event_for, events, hook, task, Client};
use common::receiver::Receiver;
use common::worker::HANG_GUARD;

const ARRIVAL: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_millis(500);
const EMPTY: &str = "queue is empty; nothing to do (exit 0)";

#[tokio::test]
async fn empty_queue_exits_0_and_says_so() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-empty").await;
    let out = c.worker().arg("job").run();
    out.assert_code(0);
    assert!(out.stderr.contains(EMPTY), "{}", out.describe());
    assert!(out.stderr.contains(&c.name), "{}", out.describe());
}

#[tokio::test]
async fn success_deletes_the_message_and_exits_0() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-ok").await;
    let rx = Receiver::ok();
    c.send_task(&task("j-ok", "echo", json!({"k": "v"}), Some(&hook(&rx))))
        .await;
    let out = c.worker().arg("job").run();
    out.assert_code(0);
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.succeeded", "{e:#}");
    assert_eq!(e["data"]["result"], json!({"k": "v"}));
    assert_eq!(e["data"]["attempt"], 1);
    assert_eq!(c.count().await, 0, "{}", out.describe());
    assert_eq!(out.count_logs("task started"), 1);
}

#[tokio::test]
async fn failure_below_the_limit_leaves_the_message_for_a_later_execution() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-retry").await;
    let rx = Receiver::ok();
    let text = c
        .send_task(&task(
            "j-retry",
            "fail",
            json!({"message": "try later"}),
            Some(&hook(&rx)),
        ))
        .await;
    let out = c
        .worker()
        .arg("job")
        .env("WORKER_MAX_DEQUEUE_COUNT", "3")
        .env("WORKER_RETRY_DELAY", "2")
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains("retry_in_s=2 attempt=1"),
        "{}",
        out.describe()
    );
    assert!(
        rx.recv(QUIET).is_none(),
        "no webhook while retries are left"
    );
    assert_eq!(c.count().await, 1, "still on the queue");
    assert!(c.poisoned().await.is_empty());

    // Hidden for WORKER_RETRY_DELAY, then visible to the next execution.
    let deadline = Instant::now() + HANG_GUARD;
    let again = loop {
        let got = c.receive(Duration::from_secs(30)).await;
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(again.len(), 1, "the message never came back");
    assert_eq!(again[0].text, text);
    assert_eq!(again[0].dequeue_count, 2);
}

#[tokio::test]
async fn failure_at_the_limit_poisons_notifies_and_exits_1() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-poison").await;
    let rx = Receiver::ok();
    let text = c
        .send_task(&task(
            "j-poison",
            "fail",
            json!({"message": "still broken"}),
            Some(&hook(&rx)),
        ))
        .await;
    // An earlier execution failed once already.
    let m = c.receive(Duration::from_secs(30)).await.remove(0);
    c.tasks
        .update_visibility(&m.id, &m.pop_receipt, Duration::ZERO)
        .await
        .unwrap();

    let out = c
        .worker()
        .arg("job")
        .env("WORKER_MAX_DEQUEUE_COUNT", "2")
        .run();
    out.assert_code(1);
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.failed", "{e:#}");
    assert_eq!(e["data"]["attempt"], 2);
    assert_eq!(e["data"]["error"], "still broken");
    assert!(rx.recv(QUIET).is_none());
    assert_eq!(c.poisoned().await, [text]);
    assert_eq!(c.count().await, 0);
}

#[tokio::test]
async fn killed_execution_leaves_the_message_to_the_next_one() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-kill").await;
    let rx = Receiver::ok();
    c.send_task(&task(
        "j-kill",
        "sleep",
        json!({"seconds": 2}),
        Some(&hook(&rx)),
    ))
    .await;
    // The first execution's short lease lapses soon after it is killed; the
    // later ones renew at 5 s, long after the 2 s task is done.
    let job = |lease: &str| {
        c.worker()
            .arg("job")
            .env("WORKER_VISIBILITY_TIMEOUT", lease)
    };
    let mut first = job("2").spawn();
    first.wait_for_log("task started");
    assert_eq!(first.kill().code, None);

    // Executions keep coming (as a scheduled job's would); the ones before
    // the lease runs out find the queue empty.
    let deadline = Instant::now() + HANG_GUARD;
    let out = loop {
        let out = job("10").run();
        out.assert_code(0);
        if !out.stderr.contains(EMPTY) || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(out.count_logs("task started"), 1, "{}", out.describe());
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.succeeded", "{e:#}");
    assert_eq!(e["data"]["attempt"], 2);
    assert_eq!(c.count().await, 0);
    assert!(rx.recv(QUIET).is_none());
}

#[tokio::test]
async fn concurrent_executions_never_take_the_same_message() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-race").await;
    let rx = Receiver::ok();
    // Three rounds of two, then one of six: each execution holds its lease
    // for a second, so all of a round's leases overlap.
    for (round, n) in [2, 2, 2, 6].into_iter().enumerate() {
        let ids: BTreeSet<String> = (0..n).map(|i| format!("r{round}-{i}")).collect();
        for id in &ids {
            c.send_task(&task(id, "sleep", json!({"seconds": 1}), Some(&hook(&rx))))
                .await;
        }
        let running: Vec<_> = (0..n).map(|_| c.worker().arg("job").spawn()).collect();
        for r in running {
            let out = r.finish();
            out.assert_code(0);
            assert_eq!(out.count_logs("task started"), 1, "{}", out.describe());
        }
        let got = events(&rx, n, ARRIVAL);
        let seen: BTreeSet<String> = got
            .iter()
            .map(|e| e["data"]["task_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(seen, ids, "round {round}: {got:#?}");
        for id in &ids {
            assert_eq!(event_for(&got, id)["data"]["attempt"], 1);
        }
        assert_eq!(c.count().await, 0);
    }
    assert!(rx.recv(QUIET).is_none());
}

#[tokio::test]
async fn worker_mode_env_selects_job_mode() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-env").await;
    let rx = Receiver::ok();
    c.send_task(&task("j-env", "echo", json!(7), Some(&hook(&rx))))
        .await;
    c.send_task(&task("j-env-2", "echo", json!(8), Some(&hook(&rx))))
        .await;
    // No subcommand: WORKER_MODE decides. One message per execution.
    let out = c.worker().env("WORKER_MODE", "job").run();
    out.assert_code(0);
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.succeeded", "{e:#}");
    assert_eq!(e["data"]["task_id"], "j-env");
    assert!(rx.recv(QUIET).is_none(), "one message per execution");
    assert_eq!(c.count().await, 1);

    let out = c.worker().env("WORKER_MODE", "job").run();
    out.assert_code(0);
    assert_eq!(events(&rx, 1, ARRIVAL)[0]["data"]["task_id"], "j-env-2");
    let out2 = c.worker().env("WORKER_MODE", "job").run();
    out2.assert_code(0);
    assert!(out2.stderr.contains(EMPTY), "{}", out2.describe());
    assert_eq!(c.count().await, 0, "{}", out.describe());
}

#[tokio::test]
async fn sigterm_releases_the_message_and_exits_1() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-term").await;
    let rx = Receiver::ok();
    let text = c
        .send_task(&task(
            "j-term",
            "sleep",
            json!({"seconds": 60}),
            Some(&hook(&rx)),
        ))
        .await;
    let mut w = c.worker().arg("job").spawn();
    w.wait_for_log("task started");
    w.signal(Signal::SIGTERM);
    let out = w.finish();
    out.assert_code(1);
    assert!(rx.recv(QUIET).is_none(), "a released task sends no webhook");
    let again = c.receive(Duration::from_secs(30)).await;
    assert_eq!(again.len(), 1, "released at once:\n{}", out.describe());
    assert_eq!(again[0].text, text);
}

#[tokio::test]
async fn job_mode_refuses_several_clients() {
    let az = Azurite::shared();
    let a = Client::new(az, "job-two-a").await;
    let b = Client::new(az, "job-two-b").await;
    let out = a
        .worker()
        .arg("job")
        .env("WORKER_CLIENT", format!("{},{}", a.name, b.name))
        .run();
    out.assert_code(1);
    assert!(
        out.stderr.contains("job mode consumes exactly one queue")
            && out.stderr.contains("WORKER_CLIENT"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn a_missing_poison_queue_is_created_when_first_needed() {
    // Job executions do not create queues up front (a round trip per task).
    let az = Azurite::shared();
    let c = Client::without_queues(az, "job-nopoison");
    c.tasks.create_if_missing().await.unwrap();
    let rx = Receiver::ok();
    let text = c
        .send_task(&task(
            "j-nopoison",
            "fail",
            json!({"message": "never", "permanent": true}),
            Some(&hook(&rx)),
        ))
        .await;
    let out = c.worker().arg("job").run();
    out.assert_code(1);
    let e = rx.recv(ARRIVAL).expect("webhook").json();
    assert_eq!(e["type"], "task.failed", "{e:#}");
    assert_eq!(c.poisoned().await, [text], "{}", out.describe());
    assert_eq!(c.count().await, 0);
}

#[tokio::test]
async fn a_missing_tasks_queue_fails_and_names_the_setting() {
    let az = Azurite::shared();
    let c = Client::without_queues(az, "job-noqueue");
    let out = c.worker().arg("job").run();
    out.assert_code(1);
    assert!(
        out.stderr.contains("does not exist") && out.stderr.contains("WORKER_CLIENT"),
        "{}",
        out.describe()
    );
}

#[tokio::test]
async fn a_delete_whose_answer_is_lost_counts_as_done() {
    let az = Azurite::shared();
    let c = Client::new(az, "job-lost-delete").await;
    let rx = Receiver::ok();
    let proxy = common::proxy::Proxy::start(az.port());
    c.send_task(&task("j-lost", "echo", json!({}), Some(&hook(&rx))))
        .await;
    // Azurite deletes the message, but the worker never hears so: the
    // connection is cut and the client's retry finds the message gone.
    proxy.lose_next_delete_answer();
    let out = c
        .worker()
        .arg("job")
        .env("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string())
        .run();
    out.assert_code(0);
    assert!(
        out.stderr.contains("already gone when deleting it"),
        "{}",
        out.describe()
    );
    events(&rx, 1, ARRIVAL);
    assert_eq!(c.count().await, 0);
}
