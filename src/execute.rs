//! The only place a handler runs.
//!
//! Single-task mode, the poller and job mode all call [`execute`], so lookup,
//! the task timeout, cancellation and panic isolation behave identically in
//! every mode. The handler runs in its own tokio task: a panic becomes a failed
//! outcome instead of taking the process (and every other in-flight task) down,
//! and on timeout the future is aborted, which runs the handler's `Drop`
//! cleanup (exec handlers kill their child's process group there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::{HandlerResult, Retry, TaskContext};
pub use crate::outcome::{Outcome, Status};
use crate::registry::Registry;
use crate::task::Task;

/// Runs `task` with its registered handler under `timeout`, stopping early
/// when `cancel` fires. Never panics and never outlives `timeout` by more than
/// the time an aborted handler needs to drop.
pub async fn execute(
    registry: &Registry,
    task: Arc<Task>,
    attempt: u32,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Outcome {
    let started = Instant::now();
    let Some(handler) = registry.get(&task.task_type).cloned() else {
        let error = format!(
            "unknown task type `{}`; registered types: {}",
            task.task_type,
            registry.names().join(", ")
        );
        tracing::error!(%error, "task refused");
        return Outcome::failed(error, Retry::Permanent, started.elapsed());
    };

    let task_cancel = cancel.child_token();
    let ctx = TaskContext {
        task: task.clone(),
        attempt,
        cancel: task_cancel.clone(),
        deadline: started + timeout,
    };
    let span = tracing::Span::current();
    let mut join = tokio::spawn(
        async move {
            let payload = ctx.task.payload.clone();
            handler.run(&ctx, &payload).await
        }
        .instrument(span),
    );

    tracing::info!(attempt, timeout_s = timeout.as_secs_f64(), "task started");
    let joined = tokio::select! {
        joined = &mut join => Some(joined),
        () = tokio::time::sleep(timeout) => None,
        () = cancel.cancelled() => {
            let outcome = stop_cancelled(join, &task_cancel, started).await;
            tracing::warn!(duration_ms = outcome.duration().as_millis() as u64, "task cancelled");
            return outcome;
        }
    };
    let duration = started.elapsed();
    let outcome = match joined {
        None => {
            task_cancel.cancel();
            join.abort();
            let _ = join.await;
            Outcome::TimedOut { timeout }
        }
        Some(joined) => finished(joined, cancel, duration),
    };
    log_outcome(&outcome, duration);
    outcome
}

/// Shutdown: the handler gets a moment to observe its cancelled token and
/// clean up, then its future is aborted.
async fn stop_cancelled(
    mut join: JoinHandle<HandlerResult>,
    task_cancel: &CancellationToken,
    started: Instant,
) -> Outcome {
    task_cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(2), &mut join).await {
        Ok(_) | Err(_) => {}
    }
    join.abort();
    Outcome::Cancelled {
        duration: started.elapsed(),
    }
}

/// The outcome of a handler that ended within its timeout.
fn finished(
    joined: Result<HandlerResult, JoinError>,
    cancel: &CancellationToken,
    duration: Duration,
) -> Outcome {
    match joined {
        Ok(Ok(result)) => Outcome::Succeeded { result, duration },
        // The handler saw the shutdown before `select!` did.
        Ok(Err(_)) if cancel.is_cancelled() => Outcome::Cancelled { duration },
        Ok(Err(e)) => Outcome::failed(e.message, e.retry, duration),
        Err(join_error) => {
            let what = if join_error.is_panic() {
                "handler panicked"
            } else {
                "handler was aborted"
            };
            Outcome::failed(what, Retry::Transient, duration)
        }
    }
}

fn log_outcome(outcome: &Outcome, duration: Duration) {
    let duration_ms = duration.as_millis() as u64;
    match outcome.status() {
        Status::Succeeded => tracing::info!(duration_ms, "task succeeded"),
        status => tracing::warn!(
            duration_ms,
            status = status.as_str(),
            error = outcome.error().unwrap_or_default(),
            permanent = outcome.is_permanent(),
            "task did not succeed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::EgressPolicy;
    use serde_json::{json, Value};

    fn task(t: &str, payload: Value) -> Arc<Task> {
        Arc::new(Task {
            task_id: "t1".into(),
            task_type: t.into(),
            payload,
            webhook_url: None,
            client: None,
        })
    }

    fn registry() -> Registry {
        Registry::standard(&EgressPolicy::default(), None).unwrap()
    }

    #[tokio::test]
    async fn echo_succeeds() {
        let o = execute(
            &registry(),
            task("echo", json!({"a":1})),
            1,
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(o.status(), Status::Succeeded);
        assert_eq!(o.result(), Some(&json!({"a":1})));
    }

    #[tokio::test]
    async fn unknown_type_is_permanent() {
        let o = execute(
            &registry(),
            task("nope", Value::Null),
            1,
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(o.status(), Status::Failed);
        assert!(o.is_permanent());
        assert!(o.error().unwrap().contains("unknown task type `nope`"));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_is_reported() {
        let o = execute(
            &registry(),
            task("sleep", json!({"seconds": 60})),
            1,
            Duration::from_secs(1),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(o.status(), Status::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_is_reported() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let o = execute(
            &registry(),
            task("sleep", json!({"seconds": 60})),
            1,
            Duration::from_secs(30),
            &cancel,
        )
        .await;
        assert_eq!(o.status(), Status::Cancelled);
    }

    #[test]
    fn an_error_after_shutdown_counts_as_cancelled() {
        let d = Duration::from_millis(5);
        let err = || Ok(Err(crate::handler::HandlerError::permanent("stopped")));
        let cancel = CancellationToken::new();
        assert_eq!(finished(err(), &cancel, d).status(), Status::Failed);
        cancel.cancel();
        assert_eq!(finished(err(), &cancel, d).status(), Status::Cancelled);
    }

    #[tokio::test]
    async fn failure_carries_message() {
        let o = execute(
            &registry(),
            task("fail", json!({"message":"boom"})),
            1,
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(o.status(), Status::Failed);
        assert_eq!(o.error().as_deref(), Some("boom"));
    }
}
