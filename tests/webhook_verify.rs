//! Signatures checked by an implementation that is not ours: the official
//! Standard Webhooks library for Python (see `common::standard_webhooks`),
//! receiving a real webhook from the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use serde_json::json;

use common::standard_webhooks::{signing_secret, PythonReceiver};
use common::worker::Worker;

/// How long `receiver.py` waits for the webhook; the worker has sent it
/// before it exits, so this only bounds a failure.
const BOUND: Duration = Duration::from_secs(60);

/// The library's reason when the signature was made with another secret.
const WRONG_SECRET: &str = "WebhookVerificationError: No matching signature found";

#[test]
fn official_python_library_verifies_the_signature() {
    let secret = signing_secret(7);
    let mut receiver = PythonReceiver::start(&secret, BOUND);

    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", &secret)
        .task(&json!({
            "task_id": "py-1",
            "task_type": "echo",
            // Non-ASCII and escapes: the signed bytes must be exactly the body sent.
            "payload": {"text": "héllo \"wörld\" ✓", "n": 1.5},
            "webhook_url": format!("http://127.0.0.1:{}/hooks?x=1", receiver.port),
        }))
        .run();
    out.assert_code(0);
    let event = receiver
        .verdict(&out.describe())
        .unwrap_or_else(|e| panic!("rejected: {e}\n{}", out.describe()));
    assert_eq!(event["type"], "task.succeeded");
    assert_eq!(event["data"]["result"]["text"], "héllo \"wörld\" ✓");
}

#[test]
fn official_python_library_rejects_a_different_secret() {
    let secret = signing_secret(7);
    let other = signing_secret(8);
    let mut receiver = PythonReceiver::start(&other, BOUND);
    let out = Worker::new()
        .env("WORKER_WEBHOOK_SECRET", &secret)
        .env("WORKER_WEBHOOK_MAX_ATTEMPTS", "1")
        .task(&json!({"task_id": "py-2", "task_type": "echo",
                      "webhook_url": format!("http://127.0.0.1:{}/", receiver.port)}))
        .run();
    // A rejected webhook never changes the task's outcome.
    out.assert_code(0);
    // Rejected for the signature itself: the headers were all there and the
    // timestamp was fresh, only the secret differs.
    match receiver.verdict(&out.describe()) {
        Err(reason) => assert_eq!(reason, WRONG_SECRET, "{}", out.describe()),
        Ok(event) => panic!("verified with the wrong secret: {event}"),
    }
}
