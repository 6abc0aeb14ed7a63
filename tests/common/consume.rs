//! Support for tests of the queue-consuming modes (polling and job): a client
//! with its own `<client>-tasks` and poison queue on Azurite, a `worker`
//! configured to consume it, task envelopes and webhook events.

use std::time::Duration;

use serde_json::{json, Value};
use worker::queue::{Message, Queue};

use super::azurite::{unique_name, Azurite};
use super::receiver::Receiver;
use super::worker::Worker;

/// A client of its own: `<name>-tasks` and `<name>-tasks-poison`, both
/// created, and its outbox `<name>-webhooks` with its poison queue (created
/// by the worker at its first entry).
pub struct Client {
    pub name: String,
    pub tasks: Queue,
    pub poison: Queue,
    pub outbox: Queue,
    pub outbox_poison: Queue,
    connection_string: String,
}

impl Client {
    pub async fn new(az: &Azurite, prefix: &str) -> Self {
        let c = Self::without_queues(az, prefix);
        c.tasks.create_if_missing().await.unwrap();
        c.poison.create_if_missing().await.unwrap();
        c
    }

    /// A client whose queues do not exist yet (create them as the test needs).
    pub fn without_queues(az: &Azurite, prefix: &str) -> Self {
        let name = unique_name(prefix);
        let svc = az.service();
        let tasks = svc.queue(&format!("{name}-tasks")).unwrap();
        let poison = svc.queue(&format!("{name}-tasks-poison")).unwrap();
        let outbox = svc.queue(&format!("{name}-webhooks")).unwrap();
        let outbox_poison = svc.queue(&format!("{name}-webhooks-poison")).unwrap();
        Self {
            name,
            tasks,
            poison,
            outbox,
            outbox_poison,
            connection_string: az.connection_string(),
        }
    }

    /// A worker consuming this client's queue: debug logs from the worker
    /// (lease renewals show there), quick polling of an empty queue, and a
    /// visibility timeout short enough that a lost message comes back within
    /// a test's time.
    pub fn worker(&self) -> Worker {
        Worker::new()
            .env("AZURE_STORAGE_CONNECTION_STRING", &self.connection_string)
            .env("WORKER_CLIENT", &self.name)
            .env("RUST_LOG", "info,worker=debug")
            .env("WORKER_MAX_POLL_INTERVAL", "0.5")
            .env("WORKER_VISIBILITY_TIMEOUT", "30")
    }

    /// Sends `text` exactly as given; returns the message id.
    pub async fn send(&self, text: &str) -> String {
        self.tasks.send(text, None, None).await.unwrap().message_id
    }

    /// Sends the envelope as JSON text; returns that text.
    pub async fn send_task(&self, task: &Value) -> String {
        let text = task.to_string();
        self.send(&text).await;
        text
    }

    /// Messages on the tasks queue, visible or not.
    pub async fn count(&self) -> u64 {
        self.tasks.approximate_count().await.unwrap()
    }

    /// The texts on the poison queue, sorted.
    pub async fn poisoned(&self) -> Vec<String> {
        let mut texts: Vec<String> = self
            .poison
            .peek(32)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.text)
            .collect();
        texts.sort();
        texts
    }

    /// Receives whatever is visible now (leasing it for `lease`).
    pub async fn receive(&self, lease: Duration) -> Vec<Message> {
        self.tasks.receive(32, lease).await.unwrap()
    }
}

/// A task envelope; `payload` and `hook` are left out when `None`/`null`.
pub fn task(task_id: &str, task_type: &str, payload: Value, hook: Option<&str>) -> Value {
    let mut t = json!({"task_id": task_id, "task_type": task_type});
    if !payload.is_null() {
        t["payload"] = payload;
    }
    if let Some(h) = hook {
        t["webhook_url"] = h.into();
    }
    t
}

/// Where tasks send their webhooks.
pub fn hook(rx: &Receiver) -> String {
    rx.url("/hooks/task")
}

/// The next `n` webhook bodies, failing the test if they do not all arrive
/// within `timeout`.
pub fn events(rx: &Receiver, n: usize, timeout: Duration) -> Vec<Value> {
    let got: Vec<Value> = rx.collect(n, timeout).iter().map(|r| r.json()).collect();
    assert_eq!(
        got.len(),
        n,
        "expected {n} webhooks within {timeout:?}, got {}: {got:#?}",
        got.len()
    );
    got
}

/// The one webhook for `task_id` among `events`, failing unless exactly one.
pub fn event_for<'a>(events: &'a [Value], task_id: &str) -> &'a Value {
    let found: Vec<&Value> = events
        .iter()
        .filter(|e| e["data"]["task_id"] == task_id)
        .collect();
    assert_eq!(found.len(), 1, "webhooks for {task_id}: {events:#?}");
    found[0]
}
