//! One shutdown, one deadline.
//!
//! Platforms give a process a fixed time between SIGTERM and SIGKILL
//! (systemd's `TimeoutStopSec`, Compose's `stop_grace_period`, Container
//! Apps' termination grace). When every stage of the exit adds a margin of
//! its own (a receive in flight, then the running tasks, then the outbox
//! loop), the margins stack up past that budget. So the moment the process
//! must be gone is computed once, at the signal, and every stage reads it:
//!
//! - [`Shutdown::requested`] fires at the signal: nothing new starts (no
//!   receive, no task, no further webhook attempt);
//! - [`Shutdown::grace_over`] fires `grace` later: running tasks are
//!   cancelled and their messages released, webhook requests in flight are
//!   given up and handed to the outbox;
//! - [`Shutdown::exit_by`] is `grace + settle` after the signal: settling
//!   (deletes, releases, outbox writes) must be done by then, and whatever
//!   is still running is dropped (its message reappears when its lease
//!   expires, the at-least-once safety net).
//!
//! Two tokens with one meaning each, and one instant. Tests pass a
//! `Shutdown` they trigger themselves (mini-redis style injection).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What settling may take after the grace period in polling mode, so that
/// SIGTERM to exit stays within WORKER_SHUTDOWN_GRACE plus this whatever is
/// running (the platforms' kill budgets are checked against it in
/// tests/infra.rs).
pub const SETTLE_MARGIN: Duration = Duration::from_secs(4);

/// From SIGTERM to exit in job mode and for a held single task: the task is
/// cancelled at once (execute gives it 2 s), webhook requests in flight are
/// given up and handed to the outbox, and settling gets [`SETTLE_MARGIN`].
/// Container Apps' default termination grace (30 s) covers it with room
/// (tests/infra.rs).
pub const ONE_MESSAGE_SHUTDOWN_BUDGET: Duration = Duration::from_secs(2 + SETTLE_MARGIN.as_secs());

/// The process's shutdown: when it was asked for and when it must be done.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requested: CancellationToken,
    grace_over: CancellationToken,
    exit_by: OnceLock<Instant>,
    grace: Duration,
    settle: Duration,
}

impl Shutdown {
    /// Running work gets `grace` after the signal; settling gets `settle` more.
    pub fn new(grace: Duration, settle: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                requested: CancellationToken::new(),
                grace_over: CancellationToken::new(),
                exit_by: OnceLock::new(),
                grace,
                settle,
            }),
        }
    }

    /// Starts the shutdown (the first call counts): fixes the deadline and
    /// schedules the end of the grace. Must be called within a tokio runtime.
    pub fn trigger(&self) {
        let now = Instant::now();
        let inner = &self.inner;
        if inner.exit_by.set(now + inner.grace + inner.settle).is_err() {
            return;
        }
        inner.requested.cancel();
        if inner.grace.is_zero() {
            inner.grace_over.cancel();
            return;
        }
        let (grace_over, at) = (inner.grace_over.clone(), now + inner.grace);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            grace_over.cancel();
        });
    }

    /// Fires at the signal: start nothing new.
    pub fn requested(&self) -> &CancellationToken {
        &self.inner.requested
    }

    pub fn is_requested(&self) -> bool {
        self.inner.requested.is_cancelled()
    }

    /// Fires when the grace is over: stop what is running.
    pub fn grace_over(&self) -> &CancellationToken {
        &self.inner.grace_over
    }

    /// The moment the process must be gone; `None` before the signal.
    pub fn exit_by(&self) -> Option<Instant> {
        self.inner.exit_by.get().copied()
    }

    /// Time from the signal to the deadline.
    pub fn budget(&self) -> Duration {
        self.inner.grace + self.inner.settle
    }

    /// Resolves at the deadline; never before the signal.
    pub async fn deadline(&self) {
        self.inner.requested.cancelled().await;
        if let Some(at) = self.exit_by() {
            tokio::time::sleep_until(at).await;
        }
    }

    /// Runs `fut` to its end, or until the deadline (then `None`).
    pub async fn within<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            out = fut => Some(out),
            () = self.deadline() => None,
        }
    }

    /// The first SIGTERM or SIGINT triggers this shutdown (and fixes its
    /// deadline); a second one exits at once, with 1.
    ///
    /// The handlers are installed here, before the caller goes on, not
    /// inside the spawned task: on a current-thread runtime that task is
    /// first polled only when the caller yields, and a SIGTERM arriving
    /// before then would kill the process with the default action, without
    /// a webhook. Needs a tokio runtime.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
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
                shutdown.trigger();
                tracing::warn!(
                    budget_s = shutdown.budget().as_secs_f64(),
                    "signal received: stopping"
                );
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_deadline_from_the_first_signal() {
        let s = Shutdown::new(Duration::from_secs(10), Duration::from_secs(4));
        assert_eq!(s.exit_by(), None);
        let start = Instant::now();
        s.trigger();
        assert!(s.is_requested() && !s.grace_over().is_cancelled());
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.trigger(); // a second signal does not move the deadline
        assert_eq!(s.exit_by(), Some(start + Duration::from_secs(14)));
        s.grace_over().cancelled().await;
        assert_eq!(Instant::now(), start + Duration::from_secs(10));
        assert_eq!(s.within(std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), start + Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_grace_stops_running_work_at_once() {
        let s = Shutdown::new(Duration::ZERO, Duration::from_secs(4));
        s.trigger();
        assert!(s.grace_over().is_cancelled());
        assert_eq!(s.within(async { 7 }).await, Some(7));
    }
}
