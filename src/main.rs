//! The `worker` binary: parse the command line, build the shared parts, pick
//! the mode, map the result to an exit code. Everything else is in the library.

use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser};

use worker::app::App;
use worker::config::{Cli, Command, Mode, Options, PollArgs};
use worker::consumer::{Consumer, Settings, Settlement, Stats, Target};
use worker::exporter::{self, Health};
use worker::outbox::{self, DrainConfig, DrainStats, Outbox};
use worker::outcome::Status;
use worker::registry::Registry;
use worker::shutdown::{Shutdown, ONE_MESSAGE_SHUTDOWN_BUDGET, SETTLE_MARGIN};
use worker::targets::{self, TargetsError};
use worker::webhook::Notifier;
use worker::{job, poller, single, telemetry};

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| with_env_tip(e).exit());
    // Validated here rather than by clap so no error message echoes the value.
    let secret = match cli.opts.signing_secret() {
        Ok(s) => s,
        Err(msg) => Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit(),
    };
    match run(cli, secret) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// clap's "invalid value" error names the flag, but in a container the value
/// came from an environment variable: add which one, so the operator knows
/// what to fix.
fn with_env_tip(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let Some(long) = arg
        .strip_prefix("--")
        .and_then(|a| a.split([' ', '=']).next())
    else {
        return e;
    };
    let cmd = Cli::command();
    let Some(env) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
    else {
        return e;
    };
    let tip = format!(
        "the value comes from --{long} or the environment variable {}",
        env.to_string_lossy()
    );
    let mut tips = match e.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(v)) => v.clone(),
        _ => Vec::new(),
    };
    tips.push(tip.into());
    e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    e
}

fn run(cli: Cli, secret: Option<worker::webhook::SigningSecret>) -> anyhow::Result<ExitCode> {
    let opts = cli.opts;
    if print_listing(cli.command.as_ref(), &opts)? {
        return Ok(ExitCode::SUCCESS);
    }
    telemetry::init(opts.log_format);
    if let Some(cmd @ (Command::Enqueue(_) | Command::Check | Command::Poison(_))) = &cli.command {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ok = rt.block_on(run_ops(cmd, &opts, &mut std::io::stdout()))?;
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    // Unlike other settings, an empty TASK_DATA is not "unset": a container
    // started to run one task whose data went missing must fail loudly
    // (exit 1, "task data is empty"), never turn into a poller.
    let task_data = std::env::var_os("TASK_DATA").map(OsStringExt::into_vec);
    // `worker run` always runs one task; bare `worker` only in auto mode
    // (WORKER_MODE=poll or job ignores a stray TASK_DATA).
    let single_input = match &cli.command {
        Some(Command::Run(args)) => Some(single::run_input(args, task_data)?),
        None if opts.mode == Mode::Auto => task_data,
        _ => None,
    };
    let registry = build_registry(&opts)?;
    // A secret that cannot sign refuses to start (exit 2): never unsigned webhooks.
    let notifier = Notifier::new(opts.egress(), opts.webhook_retry(), secret)
        .unwrap_or_else(|e| usage_error(e));
    let app = Arc::new(App::new(registry, notifier, opts.task_timeout()));
    // Checked in every mode that runs tasks or delivers webhooks.
    for w in opts.timing_warnings() {
        tracing::warn!("{w}");
    }
    // One task (single-task, job, deliver) needs no thread pool: a
    // current-thread runtime starts faster and keeps a container small.
    let current_thread = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    if let Some(raw) = single_input {
        return current_thread()?.block_on(run_single(&opts, app, &raw));
    }
    match cli.command {
        Some(Command::Deliver(args)) => {
            current_thread()?.block_on(deliver(&opts, app, args.exit_when_empty))
        }
        Some(Command::Job) => current_thread()?.block_on(run_job(&opts, app)),
        None if opts.mode == Mode::Job => current_thread()?.block_on(run_job(&opts, app)),
        command => {
            let poll_args = match command {
                Some(Command::Poll(args)) => args,
                _ => PollArgs::default(),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run_poll(&opts, app, poll_args))
        }
    }
}

/// `worker enqueue`, `check` and `poison`; `Ok(false)` means "exit 1".
async fn run_ops(
    command: &Command,
    opts: &Options,
    out: &mut dyn std::io::Write,
) -> Result<bool, worker::ops::OpsError> {
    use worker::config::PoisonCommand;
    match command {
        Command::Enqueue(args) => worker::ops::enqueue(opts, args, out).await.map(|()| true),
        Command::Check => worker::ops::check(opts, out).await,
        Command::Poison(PoisonCommand::List(args)) => {
            worker::poison::list(opts, args.webhooks, out)
                .await
                .map(|()| true)
        }
        Command::Poison(PoisonCommand::Replay(args)) => {
            worker::poison::replay(opts, args, out).await
        }
        _ => Err(worker::ops::OpsError::Usage(
            "not a queue command (expected enqueue, check or poison)".into(),
        )),
    }
}

/// `worker env-vars`, `worker handlers` and `worker python-runtime`: listings on stdout, no logging
/// set up. `false` for every other command.
fn print_listing(command: Option<&Command>, opts: &Options) -> anyhow::Result<bool> {
    match command {
        Some(Command::EnvVars) => {
            for v in worker::config::env_vars() {
                println!("{}", serde_json::to_string(&v)?);
            }
        }
        Some(Command::PythonRuntime) => {
            print!("{}", worker::handlers::persistent::PYTHON_RUNTIME);
        }
        Some(Command::Handlers) => {
            let rows = build_registry(opts)?.describe();
            let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            for (name, description) in rows {
                println!("{name:width$}  {description}");
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Single-task mode: the task alone, or holding the message it came from.
async fn run_single(opts: &Options, app: Arc<App>, raw: &[u8]) -> anyhow::Result<ExitCode> {
    if let Some(handed) = single::Handed::from_options(opts).unwrap_or_else(|e| usage_error(e)) {
        let shutdown = Shutdown::new(Duration::ZERO, ONE_MESSAGE_SHUTDOWN_BUDGET);
        shutdown.on_signals()?;
        return run_leased(opts, app, handed, raw, shutdown).await;
    }
    // The handler stops at the signal; a webhook request in flight gets the
    // first part of the budget, the outbox hand-over the rest.
    let shutdown = Shutdown::new(ONE_MESSAGE_SHUTDOWN_BUDGET - SETTLE_MARGIN, SETTLE_MARGIN);
    shutdown.on_signals()?;
    let outbox = targets::single_outbox(opts);
    let run = single::run(
        &app,
        raw,
        outbox.as_ref().map_err(String::as_str),
        &shutdown,
    );
    let Some(report) = shutdown.within(run).await else {
        anyhow::bail!(
            "the task did not end within {}s of the signal; its outcome was not reported",
            shutdown.budget().as_secs()
        );
    };
    println!("{}", serde_json::to_string(&report.event)?);
    Ok(if report.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn consumer(opts: &Options, app: Arc<App>, shutdown: &Shutdown) -> Arc<Consumer> {
    Arc::new(Consumer::new(
        app,
        settings(opts),
        Arc::new(Stats::default()),
        shutdown.clone(),
    ))
}

/// Job mode: one message, then the due outbox entries.
async fn run_job(opts: &Options, app: Arc<App>) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::new(Duration::ZERO, ONE_MESSAGE_SHUTDOWN_BUDGET);
    shutdown.on_signals()?;
    // A job execution was started because its queue holds messages: it
    // skips creating queues (a round trip per task); a missing poison queue
    // is still created on first use.
    let targets = connect(opts, false).await?;
    let [target] = <[Target; 1]>::try_from(targets).map_err(|t| {
        anyhow::anyhow!(
            "job mode consumes exactly one queue, but {} are configured (WORKER_CLIENT)",
            t.len()
        )
    })?;
    let queue = target.queue.name().to_owned();
    let consumer = consumer(opts, app, &shutdown);
    match job::run(consumer, target).await {
        Ok(job::Ended::Empty) => {
            tracing::info!(%queue, "queue is empty; nothing to do (exit 0)");
            Ok(ExitCode::SUCCESS)
        }
        Ok(job::Ended::Processed(p)) => Ok(exit_code(&p)),
        Ok(job::Ended::OutOfTime) => Err(out_of_time(&shutdown)),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot receive from {queue} (check WORKER_CLIENT / WORKER_QUEUE_NAME and the storage settings)"
        ))),
    }
}

fn out_of_time(shutdown: &Shutdown) -> anyhow::Error {
    anyhow::anyhow!(
        "not settled within {}s of the signal; the message reappears when its lease expires",
        shutdown.budget().as_secs()
    )
}

/// Polling mode, until a signal (or --max-tasks / --exit-when-empty).
async fn run_poll(opts: &Options, app: Arc<App>, args: PollArgs) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::new(Duration::from_secs_f64(opts.shutdown_grace), SETTLE_MARGIN);
    shutdown.on_signals()?;
    let targets = connect(opts, true).await?;
    let consumer = consumer(opts, app, &shutdown);
    let health = Arc::new(Health::new(exporter::health_threshold(
        Duration::from_secs_f64(opts.max_poll_interval),
    )));
    if let Some(addr) = opts.metrics_addr {
        exporter::serve(addr, health.clone(), shutdown.requested().clone()).await?;
    }
    let cfg = poller::Config {
        batch_size: opts.batch_size,
        concurrency: opts.concurrency as usize,
        max_poll_interval: Duration::from_secs_f64(opts.max_poll_interval),
        shutdown_grace: Duration::from_secs_f64(opts.shutdown_grace),
        max_tasks: args.max_tasks,
        exit_when_empty: args.exit_when_empty,
        summary_every: Duration::from_secs(60),
        // A quarter of the webhook slots for retries from the outbox; the
        // rest stay free for fresh outcomes.
        outbox_in_flight: (opts.webhook_concurrency as usize / 4).max(1),
    };
    tracing::info!(queues = ?cfg_queues(&targets), config = ?opts, "polling");
    if shutdown
        .within(poller::run(consumer, targets, cfg, health))
        .await
        .is_none()
    {
        tracing::error!(
            budget_s = shutdown.budget().as_secs_f64(),
            "shutdown deadline reached; what was not settled reappears when its lease expires"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The queue targets; a setting the operator got wrong exits 2 naming it.
async fn connect(opts: &Options, create: bool) -> anyhow::Result<Vec<Target>> {
    match targets::connect(opts, create).await {
        Err(TargetsError::Config(msg)) => usage_error(msg),
        other => Ok(other?),
    }
}

fn cfg_queues(targets: &[Target]) -> Vec<&str> {
    targets.iter().map(|t| t.queue.name()).collect()
}

/// Single-task mode holding the handed-over message: settled like job mode.
async fn run_leased(
    opts: &Options,
    app: Arc<App>,
    handed: single::Handed,
    raw: &[u8],
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    let targets = connect(opts, false).await?;
    let [target] = <[Target; 1]>::try_from(targets).map_err(|t| {
        anyhow::anyhow!(
            "the handed-over message belongs to one queue, but {} are configured (WORKER_CLIENT)",
            t.len()
        )
    })?;
    let consumer = consumer(opts, app, &shutdown);
    let queue = target.queue.name().to_owned();
    let p = shutdown
        .within(single::run_leased(consumer, target, handed, raw))
        .await
        .ok_or_else(|| out_of_time(&shutdown))?
        .map_err(|e| anyhow::Error::new(e).context(format!("message on {queue}")))?;
    if let Some(event) = &p.event {
        println!("{}", serde_json::to_string(event)?);
    }
    Ok(exit_code(&p))
}

/// Job mode and held single tasks: 0 only for a success whose message is gone.
fn exit_code(p: &worker::consumer::Processed) -> ExitCode {
    if p.status == Some(Status::Succeeded) && p.settlement == Settlement::Succeeded {
        ExitCode::SUCCESS
    } else {
        tracing::info!(settlement = ?p.settlement, status = ?p.status, "finished without success (exit 1)");
        ExitCode::FAILURE
    }
}

fn settings(opts: &Options) -> Settings {
    Settings {
        visibility_timeout: Duration::from_secs(u64::from(opts.visibility_timeout)),
        max_dequeue_count: opts.max_dequeue_count,
        retry_delay: Duration::from_secs(u64::from(opts.retry_delay)),
    }
}

/// `worker deliver`: drains the configured clients' outboxes.
async fn deliver(opts: &Options, app: Arc<App>, exit_when_empty: bool) -> anyhow::Result<ExitCode> {
    // Requests in flight are given up at the signal (each entry stays in the
    // outbox); rescheduling them gets the settle margin.
    let shutdown = Shutdown::new(Duration::ZERO, SETTLE_MARGIN);
    shutdown.on_signals()?;
    let targets = connect(opts, false).await?;
    let outboxes: Vec<Outbox> = targets.into_iter().map(|t| t.outbox).collect();
    tracing::info!(outboxes = ?outboxes.iter().map(|o| o.queue.name()).collect::<Vec<_>>(), "delivering from the outbox");
    let drain = outbox::run(
        app.notifier.clone(),
        outboxes,
        DrainConfig {
            max_in_flight: opts.webhook_concurrency as usize,
            max_poll_interval: Duration::from_secs_f64(opts.max_poll_interval),
            exit_when_empty,
            max_entries: None,
        },
        &shutdown,
    );
    let Some(stats) = shutdown.within(drain).await else {
        tracing::warn!(
            "shutdown deadline reached; entries in flight reappear when their leases end"
        );
        return Ok(ExitCode::SUCCESS);
    };
    tracing::info!(
        delivered = DrainStats::get(&stats.delivered),
        retried = DrainStats::get(&stats.retried),
        poisoned = DrainStats::get(&stats.poisoned),
        queue_errors = DrainStats::get(&stats.queue_errors),
        "outbox drained"
    );
    Ok(ExitCode::SUCCESS)
}

/// Exits 2 with clap's usage-error format.
fn usage_error(msg: String) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, msg)
        .exit()
}

/// A handlers file that cannot be used is a configuration error: exit 2,
/// naming WORKER_HANDLERS_FILE and the offending handler and field.
fn build_registry(opts: &Options) -> anyhow::Result<Registry> {
    match Registry::standard(&opts.egress(), opts.handlers_file.as_deref()) {
        Ok(r) => Ok(r),
        Err(e @ worker::registry::RegistryError::HandlersFile(_)) => usage_error(e.to_string()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot build the handler registry")),
    }
}
