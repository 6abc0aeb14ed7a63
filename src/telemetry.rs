//! Logging: human-readable lines for a terminal, JSON lines for Azure Monitor.
//!
//! Logs go to stderr so that stdout stays machine-readable (task reports,
//! `worker enqueue` output). In JSON mode each line carries the fields of the
//! span it was logged in, so every line written during a task has `task_id`
//! and `task_type` for Log Analytics queries.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` sets the filter (default info).
pub fn init(format: LogFormat) {
    // The Azure SDK logs every failed try at info; our own error lines carry
    // the cause once, so its per-try lines only show up at debug.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,typespec_client_core=warn,azure_core=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
