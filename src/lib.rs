//! `worker`: runs tasks from Azure Storage Queues, either one task per
//! container (`TASK_DATA`, Azure Container Instances started by a Logic App)
//! or as a long-running polling consumer (the VPS service), or one leased
//! message per execution (Azure Container Apps jobs).
//!
//! Every mode shares one handler registry, one execution path and one webhook
//! notifier; modes differ only in where a task comes from and how its outcome
//! is settled.
//!
//! # Layout
//!
//! - [`secret`]: `Secret`, a string whose `Debug` is redacted (a leaf).
//! - [`config`]: flags and env vars (clap), the storage settings built from them, the env-var listing.
//! - [`task`]: the task envelope; decoding plain or base64 JSON, with errors that name the field.
//! - [`handler`]: the `Handler` trait, `TaskContext`, `HandlerError` (transient vs permanent).
//! - [`registry`]: `task_type` → handler; built-ins plus the operator's exec and long-lived handlers.
//! - [`handlers`]: `echo`, `sleep`, `fail`, `http`; exec handlers (a child per task) and long-lived ones (a pool of processes, JSON lines).
//! - [`outcome`]: how one attempt ended (`Outcome`, `Status`); a leaf every mode shares.
//! - [`execute`]: the only place a handler runs: lookup, timeout, cancellation, panics.
//! - [`egress`]: where task-supplied URLs may go (no metadata service, no private hosts).
//! - [`webhook`]: Standard Webhooks delivery: stable ids, signing, the in-process attempts.
//! - [`retry`]: the one in-process retry loop (delays as data, a "should retry" predicate, a stop token).
//! - [`limiter`]: how many webhook requests each destination gets at once (learned from its answers), and how many outcomes may wait.
//! - [`shutdown`]: one shutdown, one deadline: `requested`, `grace_over`, `exit_by`.
//! - [`outbox`]: `<client>-webhooks`, where undelivered outcomes wait (for about a day) and are drained from.
//! - [`app`]: the shared parts (registry + notifier) handed to every mode.
//! - [`single`]: single-task mode (`TASK_DATA`, `worker run`).
//! - [`queue`]: Azure Storage Queue access: settings, auth (Shared Key, SAS, managed identity), typed errors.
//! - [`ops`]: operator commands on the queues: `enqueue`, `check`.
//! - [`poison`]: `poison list|replay`, for tasks and (`--webhooks`) for undeliverable webhooks.
//! - [`lease`]: a received message's lease: renewal, the newest pop receipt, delete / release / retry / poison.
//! - [`targets`]: the queues a worker serves (tasks, poison, outbox) built from its settings, in every mode.
//! - [`consumer`]: one received message: run, report (deliver or outbox), settle; shared by poller and job mode.
//! - [`schedule`]: which of several queues to poll next (backoff when empty or failing, round-robin).
//! - [`poller`]: polling mode's receive loop (batches, bounded concurrency, backoff, shutdown).
//! - [`job`]: job mode: one leased message per execution, then the due outbox entries.
//! - [`metrics`]: metric names (a leaf shared by what counts and what serves).
//! - [`exporter`]: Prometheus `/metrics` and `/healthz` for polling mode.
//! - [`telemetry`]: tracing setup, text or JSON lines.

pub mod app;
pub mod config;
pub mod consumer;
pub mod egress;
pub mod execute;
pub mod exporter;
pub mod handler;
pub mod handlers;
pub mod job;
pub mod lease;
pub mod limiter;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod outcome;
pub mod poison;
pub mod poller;
pub mod queue;
pub mod registry;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod shutdown;
pub mod single;
pub mod targets;
pub mod task;
pub mod telemetry;
pub mod webhook;
