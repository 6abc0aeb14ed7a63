//! The `worker` binary: parse the command line, build the shared parts, pick
//! the mode, map the result to an exit code. Everything else is in the library.

use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use tokio_util::sync::CancellationToken;

use worker::app::App;
use worker::config::{Cli, Command, Options, RunArgs};
use worker::registry::Registry;
use worker::task::MAX_TASK_BYTES;
use worker::webhook::Notifier;
use worker::{single, telemetry};

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
            tracing::error!("{e:#}");
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
    match &cli.command {
        Some(Command::EnvVars) => {
            for v in worker::config::env_vars() {
                println!("{}", serde_json::to_string(&v)?);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Handlers) => {
            let registry = build_registry(&opts)?;
            let rows = registry.describe();
            let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            for (name, description) in rows {
                println!("{name:width$}  {description}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    telemetry::init(opts.log_format);

    let task_data = std::env::var_os("TASK_DATA").map(OsStringExt::into_vec);
    let single_input = match &cli.command {
        Some(Command::Run(args)) => Some(read_run_input(args, task_data)?),
        None if task_data.is_some() => task_data,
        _ => None,
    };
    let registry = build_registry(&opts)?;
    let notifier = Notifier::new(opts.egress(), opts.webhook_retry(), secret);
    let app = App::new(registry, notifier, opts.task_timeout());

    if let Some(raw) = single_input {
        // One task needs no thread pool; a current-thread runtime starts faster
        // and keeps the container's memory small.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(async {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            let report = single::run(&app, &raw, shutdown).await;
            println!("{}", serde_json::to_string(&report.event)?);
            Ok(if report.succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        });
    }
    anyhow::bail!(
        "no TASK_DATA: polling mode needs a queue. Set AZURE_STORAGE_CONNECTION_STRING and WORKER_CLIENT \
         (or pass a task with TASK_DATA / `worker run --task-file F`)"
    )
}

fn build_registry(opts: &Options) -> anyhow::Result<Registry> {
    Registry::standard(&opts.egress(), opts.handlers_file.as_deref())
        .context("cannot build the handler registry")
}

/// The task for `worker run`: --task, --task-file (or `-` for stdin), else TASK_DATA.
fn read_run_input(args: &RunArgs, task_data: Option<Vec<u8>>) -> anyhow::Result<Vec<u8>> {
    if let Some(t) = &args.task {
        return Ok(t.clone().into_bytes());
    }
    if let Some(path) = &args.task_file {
        let limit = MAX_TASK_BYTES as u64 + 1;
        let mut buf = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin()
                .take(limit)
                .read_to_end(&mut buf)
                .context("cannot read the task from stdin")?;
        } else {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open task file {}", path.display()))?;
            f.take(limit)
                .read_to_end(&mut buf)
                .with_context(|| format!("cannot read task file {}", path.display()))?;
        }
        return Ok(buf);
    }
    task_data.context("`worker run` needs --task, --task-file or TASK_DATA")
}

/// First SIGTERM/SIGINT cancels `token`; a second one exits at once.
///
/// The handlers are installed here, before the task starts, not inside the
/// spawned task: on a current-thread runtime that task is first polled only
/// when the task itself yields, and a SIGTERM arriving before then would kill
/// the process with the default action, without a webhook.
fn spawn_signal_handler(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut first = true;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if !first {
                tracing::warn!("second signal: exiting immediately");
                std::process::exit(1);
            }
            first = false;
            tracing::warn!("signal received: stopping");
            token.cancel();
        }
    });
    Ok(())
}
