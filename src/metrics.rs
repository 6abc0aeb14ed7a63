//! Metric names, in one place so docs and dashboards can rely on them.
//!
//! A leaf: the code that counts (consumer, webhook, outbox) and the exporter
//! that serves `/metrics` both import these names, never each other. The
//! recorder they feed is the one process-global (installed by the exporter
//! when `WORKER_METRICS_ADDR` is set; without it the counters are no-ops).

pub const TASKS: &str = "worker_tasks_total";
pub const TASK_DURATION: &str = "worker_task_duration_seconds";
pub const IN_FLIGHT: &str = "worker_tasks_in_flight";
pub const RECEIVED: &str = "worker_messages_received_total";
pub const RENEWALS: &str = "worker_lease_renewals_total";
pub const LEASES_LOST: &str = "worker_leases_lost_total";
pub const POISONED: &str = "worker_messages_poisoned_total";
pub const WEBHOOKS: &str = "worker_webhook_deliveries_total";
pub const QUEUE_ERRORS: &str = "worker_queue_errors_total";
pub const OUTBOX_DEPTH: &str = "worker_webhook_outbox_depth";
/// Long-lived handler processes started, by handler.
pub const HANDLER_PROCESSES_STARTED: &str = "worker_handler_processes_started_total";
/// Long-lived handler processes ended, by handler and reason (`crash`,
/// `timeout`, `startup`, `max_tasks`, `max_memory`, `shutdown`).
pub const HANDLER_PROCESSES_STOPPED: &str = "worker_handler_processes_stopped_total";
