//! Command line and environment.
//!
//! Every option is both a flag and an environment variable (containers are
//! configured through env, developers through flags). Options are global so
//! that `worker --concurrency 4`, `worker poll --concurrency 4` and
//! `WORKER_CONCURRENCY=4 worker` mean the same thing.
//!
//! Secrets (`WORKER_WEBHOOK_SECRET`, `AZURE_STORAGE_CONNECTION_STRING`) are
//! held in [`Secret`], whose `Debug` is redacted, are hidden from `--help`, and
//! are validated after parsing so that no error message echoes their value
//! (clap's own "invalid value" errors would).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::egress::{EgressPolicy, HostRule};
use crate::queue::{tasks_queue, validate_queue_name, webhooks_queue, StorageSettings};
pub use crate::secret::Secret;
use crate::webhook::{RetryPolicy, SigningSecret};

const AFTER_HELP: &str = "\
Modes:
  TASK_DATA set         run that one task, notify its webhook, exit 0 (succeeded) or 1
  no TASK_DATA          poll the queue(s) <client>-tasks (same as `worker poll`)
  WORKER_MODE=job       lease one message, settle it, exit (same as `worker job`)

TASK_DATA holds a task envelope as JSON or standard base64 of that JSON:
  {\"task_id\":\"t1\",\"task_type\":\"echo\",\"payload\":{...},\"webhook_url\":\"https://...\",\"client\":\"acme\"}

Exit codes: 0 succeeded (or queue drained), 1 task failed / timed out / cancelled / invalid,
2 invalid flags or environment. Logs go to stderr (RUST_LOG sets the level, default info).";

#[derive(Parser, Debug)]
#[command(name = "worker", version, about = "Runs tasks from Azure Storage Queues: one task per container (TASK_DATA) or a polling consumer", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Options,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one task from --task, --task-file or TASK_DATA; with none of them, a built-in example echo task.
    Run(RunArgs),
    /// Poll the client queue(s) until stopped (the default without TASK_DATA).
    Poll(PollArgs),
    /// Lease one message, process and settle it, exit (Container Apps jobs).
    Job,
    /// List every registered task type.
    Handlers,
    /// Put a task on <client>-tasks the way a backend would.
    Enqueue(EnqueueArgs),
    /// Validate the configuration and reach every configured queue.
    Check,
    /// Inspect or replay messages in <client>-tasks-poison (or, with --webhooks, <client>-webhooks-poison).
    #[command(subcommand)]
    Poison(PoisonCommand),
    /// Deliver the webhooks waiting in <client>-webhooks (the outbox) until stopped.
    Deliver(DeliverArgs),
    /// Print every environment variable the binary reads, as JSON lines.
    EnvVars,
    /// Print the Python runtime for long-lived handlers (save it as worker_runtime.py).
    PythonRuntime,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Task envelope JSON (or base64 of it).
    #[arg(long, conflicts_with = "task_file")]
    pub task: Option<String>,
    /// File holding the task envelope (no 128 KiB env limit); `-` reads stdin.
    #[arg(long)]
    pub task_file: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
pub struct PollArgs {
    /// Stop after this many tasks have been settled.
    #[arg(long)]
    pub max_tasks: Option<u64>,
    /// Exit 0 once every queue is empty and nothing is in flight.
    #[arg(long)]
    pub exit_when_empty: bool,
}

#[derive(Args, Debug, Default)]
pub struct DeliverArgs {
    /// Exit 0 once no outbox entry is due and nothing is in flight.
    #[arg(long)]
    pub exit_when_empty: bool,
}

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub task_type: String,
    /// Payload JSON.
    #[arg(long)]
    pub payload: Option<String>,
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Task id; a UUID is generated when absent.
    #[arg(long)]
    pub task_id: Option<String>,
    /// Base64-encode the message (as Azure Functions and the Python SDK's base64 policy do).
    #[arg(long)]
    pub base64: bool,
    /// Seconds before the message becomes visible (up to 7 days).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub delay: Option<u64>,
    /// Message time-to-live in seconds (-1: never expires).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i64).range(-1..))]
    pub ttl: Option<i64>,
}

#[derive(Subcommand, Debug)]
pub enum PoisonCommand {
    /// One line per poisoned message (peeks at most 32).
    List(PoisonListArgs),
    /// Send poisoned messages back to <client>-tasks (or the outbox), then delete them from poison.
    Replay(ReplayArgs),
}

#[derive(Args, Debug, Default)]
pub struct PoisonListArgs {
    /// Work on <client>-webhooks-poison (undeliverable webhooks) instead of <client>-tasks-poison.
    #[arg(long)]
    pub webhooks: bool,
}

#[derive(Args, Debug)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["task_id", "message_id", "all"])))]
pub struct ReplayArgs {
    #[arg(long)]
    pub task_id: Option<String>,
    #[arg(long)]
    pub message_id: Option<String>,
    #[arg(long)]
    pub all: bool,
    /// Replay undeliverable webhooks from <client>-webhooks-poison into the outbox, due at once.
    #[arg(long)]
    pub webhooks: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (Azure Monitor / Log Analytics).
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// TASK_DATA decides: single task when set, polling otherwise.
    Auto,
    Poll,
    Job,
}

/// Every option, flag and env var alike.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Log format.
    #[arg(long, env = "WORKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Seconds a task may run before it is stopped and reported timed_out.
    #[arg(long, env = "WORKER_TASK_TIMEOUT", default_value_t = 1800.0, value_parser = positive_secs, global = true)]
    pub task_timeout: f64,
    /// TOML file declaring exec handlers.
    #[arg(long, env = "WORKER_HANDLERS_FILE", global = true)]
    pub handlers_file: Option<PathBuf>,
    /// Standard Webhooks signing secret: whsec_ + base64 of 24-64 bytes.
    #[arg(
        long,
        env = "WORKER_WEBHOOK_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub webhook_secret: Option<Secret>,
    /// Comma-separated host or host:port allowed for webhooks and `http` tasks, whatever they resolve to. Unset: public addresses only.
    #[arg(
        long,
        env = "WORKER_WEBHOOK_ALLOWED_HOSTS",
        value_delimiter = ',',
        global = true
    )]
    pub webhook_allowed_hosts: Option<Vec<HostRule>>,
    /// Hosts file (/etc/hosts format) consulted before DNS for webhook and `http` task hosts; re-read on every lookup.
    #[arg(long, env = "WORKER_HOSTS_FILE", global = true)]
    pub hosts_file: Option<PathBuf>,
    /// Per-request webhook timeout in seconds.
    #[arg(long, env = "WORKER_WEBHOOK_TIMEOUT", default_value_t = 10.0, value_parser = positive_secs, global = true)]
    pub webhook_timeout: f64,
    /// Webhook delivery attempts (the first included).
    #[arg(long, env = "WORKER_WEBHOOK_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20), global = true)]
    pub webhook_max_attempts: u32,
    /// Seconds before the second webhook attempt; doubles each time (with jitter).
    #[arg(long, env = "WORKER_WEBHOOK_INITIAL_BACKOFF", default_value_t = 1.0, value_parser = positive_secs, global = true)]
    pub webhook_initial_backoff: f64,
    /// Most webhook requests in flight over all destinations (four times as many outcomes may wait for delivery); each destination's own limit is learned from its answers.
    #[arg(long, env = "WORKER_WEBHOOK_CONCURRENCY", default_value_t = 512, value_parser = clap::value_parser!(u32).range(2..=4096), global = true)]
    pub webhook_concurrency: u32,
    /// Megabytes of outcomes that may wait for delivery (beyond it finished tasks wait); a single larger outcome waits alone.
    #[arg(long, env = "WORKER_WEBHOOK_BACKLOG_MB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536), global = true)]
    pub webhook_backlog_mb: u32,
    /// Delays between the outbox's delivery attempts once the in-process attempts failed (s, m, h or d; each at most 7d).
    #[arg(long, env = "WORKER_WEBHOOK_OUTBOX_SCHEDULE", default_value = DEFAULT_OUTBOX_SCHEDULE, value_parser = parse_schedule, global = true)]
    pub webhook_outbox_schedule: Schedule,

    /// Which way in (see Modes below).
    #[arg(long, env = "WORKER_MODE", value_enum, default_value_t = Mode::Auto, global = true)]
    pub mode: Mode,
    /// Storage connection string (AccountName/AccountKey, SharedAccessSignature or UseDevelopmentStorage=true).
    #[arg(
        long,
        env = "AZURE_STORAGE_CONNECTION_STRING",
        hide_env_values = true,
        global = true
    )]
    pub connection_string: Option<Secret>,
    /// Queue service endpoint for Entra ID auth (https://ACCOUNT.queue.core.windows.net).
    #[arg(long, env = "AZURE_STORAGE_QUEUE_ENDPOINT", global = true)]
    pub queue_endpoint: Option<String>,
    /// Storage account name for Entra ID auth (endpoint derived from it).
    #[arg(long, env = "AZURE_STORAGE_ACCOUNT", global = true)]
    pub storage_account: Option<String>,
    /// Client id of a user-assigned managed identity (Entra ID auth).
    #[arg(long, env = "AZURE_CLIENT_ID", global = true)]
    pub managed_identity_client_id: Option<String>,
    /// With a managed identity: seconds after start-up during which token and connection failures are retried until the queue service first answers (ACI may start a container before its identity endpoint is ready); 0 = no such retries.
    #[arg(long, env = "WORKER_IDENTITY_WAIT", default_value_t = 120, value_parser = clap::value_parser!(u32).range(0..=900), global = true)]
    pub identity_wait: u32,
    /// Client name(s): the worker consumes <client>-tasks. Comma-separated or repeated.
    #[arg(
        long = "client",
        env = "WORKER_CLIENT",
        value_delimiter = ',',
        global = true
    )]
    pub clients: Vec<String>,
    /// Queue name override (instead of <client>-tasks; one client only).
    #[arg(long, env = "WORKER_QUEUE_NAME", global = true)]
    pub queue_name: Option<String>,
    /// Messages fetched per receive call (1-32).
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=32), global = true)]
    pub batch_size: u8,
    /// Tasks run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024), global = true)]
    pub concurrency: u32,
    /// Longest pause between polls of an empty queue, in seconds.
    #[arg(long, env = "WORKER_MAX_POLL_INTERVAL", default_value_t = 30.0, value_parser = positive_secs, global = true)]
    pub max_poll_interval: f64,
    /// Seconds a received message stays invisible; renewed at half-life while the task runs.
    #[arg(long, env = "WORKER_VISIBILITY_TIMEOUT", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=604_800), global = true)]
    pub visibility_timeout: u32,
    /// Deliveries before a failing message goes to the poison queue.
    #[arg(long, env = "WORKER_MAX_DEQUEUE_COUNT", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub max_dequeue_count: u32,
    /// Base seconds before a failed message is retried; grows with the attempt.
    #[arg(long, env = "WORKER_RETRY_DELAY", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=604_800), global = true)]
    pub retry_delay: u32,
    /// Seconds running tasks get to finish after SIGTERM before they are released.
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE", default_value_t = 30.0, value_parser = nonneg_secs, global = true)]
    pub shutdown_grace: f64,
    /// Single-task mode on ACI: id of the queue message TASK_DATA came from; with WORKER_POP_RECEIPT the worker holds and settles it.
    #[arg(long, env = "WORKER_MESSAGE_ID", global = true)]
    pub message_id: Option<String>,
    /// Single-task mode on ACI: the pop receipt the Logic App received the message with.
    #[arg(
        long,
        env = "WORKER_POP_RECEIPT",
        hide_env_values = true,
        global = true
    )]
    pub pop_receipt: Option<Secret>,
    /// Single-task mode on ACI: this attempt's number as the Logic App counted it.
    #[arg(long, env = "WORKER_DEQUEUE_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub dequeue_count: u32,
    /// Serve Prometheus /metrics and /healthz on this address (e.g. 127.0.0.1:9090).
    #[arg(long, env = "WORKER_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The outbox's retry delays, modelled on Standard Webhooks / svix: after
/// the in-process attempts, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (about 28 h).
pub const DEFAULT_OUTBOX_SCHEDULE: &str = "5m,30m,2h,5h,10h,10h";

/// Longest single delay: the longest a queue message can stay invisible
/// (7 days, the service's limit on a visibility timeout).
const MAX_SCHEDULE_STEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// A list of delays, one per outbox attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

impl Schedule {
    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }
}

/// `5m,30m,2h` (units s, m, h, d; a bare number is seconds), each 1 s to 7 days.
pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (num, unit) = match part.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => part.split_at(i),
            None => (part, "s"),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{part}` is not a delay like 30s, 5m, 2h or 1d"))?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("`{part}`: the unit must be s, m, h or d")),
        };
        let d = Duration::from_secs(n.saturating_mul(unit_secs));
        if d.is_zero() || d > MAX_SCHEDULE_STEP {
            return Err(format!(
                "`{part}`: each delay must be between 1s and 7d (the longest a queue message can stay invisible)"
            ));
        }
        out.push(d);
    }
    Ok(Schedule(out))
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 31_536_000.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be a positive number of seconds"))
    }
}

fn nonneg_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && (0.0..=31_536_000.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} must be zero or a positive number of seconds"))
    }
}

impl Options {
    /// The storage settings, empty values counting as unset (an empty
    /// variable in a container template is how "not set" often looks).
    pub fn storage(&self) -> StorageSettings {
        fn nonempty(s: &Option<String>) -> Option<String> {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        }
        StorageSettings {
            connection_string: self
                .connection_string
                .clone()
                .filter(|s| !s.expose().trim().is_empty()),
            queue_endpoint: nonempty(&self.queue_endpoint),
            account: nonempty(&self.storage_account),
            managed_identity_client_id: nonempty(&self.managed_identity_client_id),
            identity_wait: Duration::from_secs(u64::from(self.identity_wait)),
        }
    }

    pub fn task_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.task_timeout)
    }

    pub fn egress(&self) -> EgressPolicy {
        let policy = match &self.webhook_allowed_hosts {
            Some(rules) if !rules.is_empty() => EgressPolicy::allow_hosts(rules.clone()),
            _ => EgressPolicy::public_only(),
        };
        let hosts_file = self
            .hosts_file
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        policy.with_hosts_file(hosts_file)
    }

    pub fn webhook_retry(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.webhook_max_attempts,
            initial_backoff: Duration::from_secs_f64(self.webhook_initial_backoff),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs_f64(self.webhook_timeout),
            concurrency: self.webhook_concurrency as usize,
            backlog_bytes: (self.webhook_backlog_mb as usize) << 20,
        }
    }

    /// The signing secret, validated; the error names the variable, never the value.
    pub fn signing_secret(&self) -> Result<Option<SigningSecret>, String> {
        match &self.webhook_secret {
            None => Ok(None),
            Some(s) if s.expose().is_empty() => Ok(None),
            Some(s) => {
                s.expose().parse().map(Some).map_err(|e| {
                    format!("WORKER_WEBHOOK_SECRET (--webhook-secret) is invalid: {e}")
                })
            }
        }
    }

    /// Inconsistent timings that would make the consumer misbehave quietly;
    /// logged as warnings at start-up (svix-style invariant checks).
    pub fn timing_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let vis = f64::from(self.visibility_timeout);
        if vis < 60.0 {
            w.push(format!(
                "WORKER_VISIBILITY_TIMEOUT={vis}s is short: the lease is renewed every {:.1}s, and a renewal delayed by a slow queue call (up to 30s) lets another worker take the message",
                vis / 2.0
            ));
        }
        if self.max_dequeue_count == 1 {
            w.push("WORKER_MAX_DEQUEUE_COUNT=1: a failed task is never retried".into());
        }
        if self.webhook_timeout > self.shutdown_grace + 5.0 {
            w.push(format!(
                "WORKER_WEBHOOK_TIMEOUT={}s is longer than WORKER_SHUTDOWN_GRACE={}s plus 5s: after SIGTERM a webhook request in flight may hold the exit that long (raise the platform's kill timeout, or lower the webhook timeout)",
                self.webhook_timeout, self.shutdown_grace
            ));
        }
        if f64::from(self.visibility_timeout) / 2.0 > self.task_timeout * 10.0
            && self.visibility_timeout > 600
        {
            w.push(format!(
                "WORKER_VISIBILITY_TIMEOUT={}s is long for WORKER_TASK_TIMEOUT={}s: a worker that dies hides its message that long before another attempt",
                self.visibility_timeout, self.task_timeout
            ));
        }
        let outbox = self.webhook_outbox_schedule.total();
        if outbox < Duration::from_secs(86_400) {
            w.push(format!(
                "WORKER_WEBHOOK_OUTBOX_SCHEDULE spans {}s in all, under a day: a backend that is away longer loses outcomes to <client>-webhooks-poison (replay them with `worker poison replay --webhooks`)",
                outbox.as_secs()
            ));
        }
        w
    }
}

/// A queue the worker consumes, and the client it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueNames {
    pub client: Option<String>,
    pub queue: String,
}

impl QueueNames {
    /// The webhook outbox: `<client>-webhooks`, or `<queue>-webhooks` for a
    /// `WORKER_QUEUE_NAME` without a client.
    pub fn outbox(&self) -> Result<String, String> {
        webhooks_queue(self.client.as_deref().unwrap_or(&self.queue))
            .map_err(|e| format!("WORKER_CLIENT / WORKER_QUEUE_NAME: {e}"))
    }
}

impl Options {
    /// The queues the configuration names: `<client>-tasks` for each client in
    /// `WORKER_CLIENT`, or `WORKER_QUEUE_NAME` (with at most one client).
    pub fn queues(&self) -> Result<Vec<QueueNames>, String> {
        let mut clients: Vec<String> = Vec::new();
        for c in self
            .clients
            .iter()
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
        {
            if !clients.iter().any(|seen| seen == c) {
                clients.push(c.to_owned());
            }
        }
        if let Some(q) = self
            .queue_name
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
        {
            validate_queue_name(q).map_err(|e| format!("WORKER_QUEUE_NAME: {e}"))?;
            if clients.len() > 1 {
                return Err(format!(
                    "WORKER_QUEUE_NAME names one queue but WORKER_CLIENT lists {} clients; \
                     set one client or unset WORKER_QUEUE_NAME",
                    clients.len()
                ));
            }
            return Ok(vec![QueueNames {
                client: clients.pop(),
                queue: q.to_owned(),
            }]);
        }
        if clients.is_empty() {
            return Err(
                "no queue configured: set WORKER_CLIENT (--client) to use <client>-tasks, \
                 or WORKER_QUEUE_NAME to name the queue"
                    .into(),
            );
        }
        clients
            .into_iter()
            .map(|c| {
                let queue = tasks_queue(&c).map_err(|e| format!("WORKER_CLIENT: {e}"))?;
                Ok(QueueNames {
                    client: Some(c),
                    queue,
                })
            })
            .collect()
    }
}

/// One environment variable the binary reads.
#[derive(Debug, serde::Serialize)]
pub struct EnvVar {
    pub name: String,
    pub flag: Option<String>,
    pub secret: bool,
    pub default: Option<String>,
    pub help: String,
}

/// Every env var the binary reads, from clap's own definitions plus the few
/// read outside clap. `worker env-vars` prints this; infra tests compare the
/// templates against it so the two cannot drift.
pub fn env_vars() -> Vec<EnvVar> {
    let cmd = Cli::command();
    let mut out: Vec<EnvVar> = cmd
        .get_arguments()
        .filter_map(|a| {
            let name = a.get_env()?.to_str()?.to_owned();
            Some(EnvVar {
                secret: a.is_hide_env_values_set(),
                flag: a.get_long().map(|l| format!("--{l}")),
                default: a
                    .get_default_values()
                    .first()
                    .and_then(|d| d.to_str())
                    .map(str::to_owned),
                help: a.get_help().map(|h| h.to_string()).unwrap_or_default(),
                name,
            })
        })
        .collect();
    for (name, help) in [
        (
            "TASK_DATA",
            "the task envelope for single-task mode (JSON or base64 JSON)",
        ),
        (
            "RUST_LOG",
            "log filter, e.g. info or worker=debug (default info)",
        ),
    ] {
        out.push(EnvVar {
            name: name.into(),
            flag: None,
            secret: false,
            default: None,
            help: help.into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_options_ignore_empty_values() {
        let cli = Cli::try_parse_from([
            "worker",
            "--connection-string",
            " ",
            "--storage-account",
            "acme",
            "--managed-identity-client-id",
            "",
        ])
        .unwrap();
        let s = cli.opts.storage();
        assert!(s.connection_string.is_none());
        assert_eq!(s.account.as_deref(), Some("acme"));
        assert!(s.managed_identity_client_id.is_none());
        assert!(s.is_configured());
    }

    fn opts(args: &[&str]) -> Options {
        let mut v = vec!["worker"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().opts
    }

    #[test]
    fn queues_from_clients_and_queue_name() {
        let t = opts(&["--client", "acme,beta,acme"]).queues().unwrap();
        assert_eq!(
            t.iter().map(|t| t.queue.as_str()).collect::<Vec<_>>(),
            ["acme-tasks", "beta-tasks"]
        );
        let t = opts(&["--queue-name", "jobs", "--client", "acme"])
            .queues()
            .unwrap();
        assert_eq!(
            t,
            [QueueNames {
                client: Some("acme".into()),
                queue: "jobs".into()
            }]
        );
        let e = opts(&[]).queues().unwrap_err();
        assert!(
            e.contains("WORKER_CLIENT") && e.contains("WORKER_QUEUE_NAME"),
            "{e}"
        );
        let e = opts(&["--queue-name", "jobs", "--client", "a1,b1"])
            .queues()
            .unwrap_err();
        assert!(e.contains("one client"), "{e}");
        let e = opts(&["--client", "Acme"]).queues().unwrap_err();
        assert!(
            e.contains("WORKER_CLIENT") && e.contains("lowercase"),
            "{e}"
        );
        let e = opts(&["--queue-name", "x"]).queues().unwrap_err();
        assert!(e.contains("WORKER_QUEUE_NAME"), "{e}");
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let cli = Cli::try_parse_from([
            "worker",
            "--webhook-secret",
            "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
            "--connection-string",
            "AccountName=a;AccountKey=c2VjcmV0a2V5",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        assert!(!dbg.contains("c2VjcmV0"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn env_var_listing_marks_secrets() {
        let vars = env_vars();
        let secret = vars
            .iter()
            .find(|v| v.name == "WORKER_WEBHOOK_SECRET")
            .unwrap();
        assert!(secret.secret);
        assert!(vars.iter().any(|v| v.name == "TASK_DATA"));
        assert!(vars
            .iter()
            .any(|v| v.name == "WORKER_CONCURRENCY" && v.default.as_deref() == Some("16")));
    }

    #[test]
    fn timing_warnings_flag_inconsistencies() {
        let cli = Cli::try_parse_from(["worker"]).unwrap();
        assert!(
            cli.opts.timing_warnings().is_empty(),
            "defaults must be consistent"
        );
        let cli = Cli::try_parse_from([
            "worker",
            "--visibility-timeout",
            "4",
            "--max-dequeue-count",
            "1",
        ])
        .unwrap();
        let w = cli.opts.timing_warnings().join("\n");
        assert!(
            w.contains("WORKER_VISIBILITY_TIMEOUT=4s is short") && w.contains("never retried"),
            "{w}"
        );
    }

    #[test]
    fn outbox_schedule_parses_and_is_bounded() {
        let s = parse_schedule(DEFAULT_OUTBOX_SCHEDULE).unwrap();
        assert_eq!(s.0.len(), 6);
        assert!(s.total() >= Duration::from_secs(86_400), "{s:?}");
        assert_eq!(
            parse_schedule("1, 2s,1m").unwrap().0,
            [1, 2, 60].map(Duration::from_secs)
        );
        for bad in ["", "0s", "8d", "5x", "m", "1,,2"] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_secret_error_does_not_echo_it() {
        let cli =
            Cli::try_parse_from(["worker", "--webhook-secret", "whsec_tooshortvalue"]).unwrap();
        let e = cli.opts.signing_secret().unwrap_err();
        assert!(
            e.contains("WORKER_WEBHOOK_SECRET") && !e.contains("tooshortvalue"),
            "{e}"
        );
    }
}
