//! Polling mode.
//!
//! The loop receives batches from each client queue in turn and hands every
//! message to [`consumer::process_message`] in its own task. It never holds a
//! message it cannot start at once: a receive asks for at most as many
//! messages as there are free slots, and waits until half the slots are free
//! before asking again (as the Azure Functions queue trigger does), so no
//! message sits leased but idle while others could take it. A task frees its
//! slot when its handler is done; its webhook is delivered beside the running
//! tasks, and receiving also waits while the delivery backlog is full.
//!
//! Empty queues back off exponentially from 100 ms to `WORKER_MAX_POLL_INTERVAL`
//! (randomized, per queue) and snap back on the first message; failing queue
//! calls back off up to 10 s and never stop the loop. That bookkeeping is
//! [`Schedule`] (shared with the outbox drain), plain state a unit test drives
//! with paused time; [`run`] is a loop over [`Poller::step`], one receive (or
//! one wait) per step.
//!
//! Shutdown ([`Shutdown`], one deadline computed at the signal): receiving
//! stops at once; running tasks get `WORKER_SHUTDOWN_GRACE` from the signal,
//! then are cancelled and their messages released for another worker,
//! pending webhooks are handed to the outbox, and settling gets
//! [`SETTLE_MARGIN`] more, up to the deadline, which every stage (the
//! receive in flight, the tasks, the outbox loop) reads. Messages brought by
//! a receive that was in flight when the signal came are released without
//! being started.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::{self, Consumer, RunSlot, Stats, Target};
use crate::exporter::Health;
use crate::outbox::{self, DrainConfig};
use crate::queue::{Message, QueueError};

/// Messages asked for at once from a queue whose outcomes were deferred
/// lately (see [`consumer::Deferring`]) while other queues have work, and
/// the pause before it is received from again.
const DEFERRING_BATCH: u8 = 2;
const DEFERRING_PAUSE: Duration = Duration::from_millis(250);
pub use crate::schedule::{Schedule, MAX_ERROR_BACKOFF, MIN_POLL_INTERVAL};

pub use crate::shutdown::SETTLE_MARGIN;

#[derive(Clone, Debug)]
pub struct Config {
    pub batch_size: u8,
    pub concurrency: usize,
    pub max_poll_interval: Duration,
    pub shutdown_grace: Duration,
    /// Stop receiving after this many messages (then drain and return).
    pub max_tasks: Option<u64>,
    /// Return once every queue answered empty and nothing is running.
    pub exit_when_empty: bool,
    /// Interval of the summary log line.
    pub summary_every: Duration,
    /// Outbox entries delivered at once beside the tasks.
    pub outbox_in_flight: usize,
}

/// What a run of the loop did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub received: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub retried: u64,
    pub poisoned: u64,
    pub released: u64,
}

impl Summary {
    fn of(stats: &Stats) -> Self {
        Summary {
            received: Stats::get(&stats.received),
            succeeded: Stats::get(&stats.succeeded),
            failed: Stats::get(&stats.failed),
            timed_out: Stats::get(&stats.timed_out),
            retried: Stats::get(&stats.retried),
            poisoned: Stats::get(&stats.poisoned),
            released: Stats::get(&stats.released),
        }
    }

    /// Attempts that ran to an outcome.
    fn ran(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }
}

/// Whether the loop goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    Stop,
}

/// The receive loop's state: what one [`Poller::step`] needs.
pub struct Poller {
    consumer: Arc<Consumer>,
    targets: Vec<Target>,
    cfg: Config,
    health: Arc<Health>,
    schedule: Schedule,
    slots: Arc<Semaphore>,
    /// Half the slots (all, with one): when to ask for more messages.
    refill_at: usize,
    tracker: TaskTracker,
    /// When the last task was settled: "empty" only counts for receives after
    /// it, since a settled task may have made its message visible again.
    last_settled: Arc<Mutex<Instant>>,
    started: u64,
}

impl Poller {
    fn new(
        consumer: Arc<Consumer>,
        targets: Vec<Target>,
        cfg: Config,
        health: Arc<Health>,
    ) -> Self {
        Self {
            schedule: Schedule::new(targets.len(), cfg.max_poll_interval),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            refill_at: cfg.concurrency.div_ceil(2).max(1),
            tracker: TaskTracker::new(),
            last_settled: Arc::new(Mutex::new(Instant::now())),
            started: 0,
            consumer,
            targets,
            cfg,
            health,
        }
    }

    /// Nothing running and nothing waiting to report or settle: only then
    /// can an empty receive end a --exit-when-empty run (a message whose
    /// outcome could not be handed over is released and must be received).
    fn idle(&self) -> bool {
        self.tracker.is_empty()
    }

    fn freed(&self) -> Arc<Notify> {
        self.consumer.freed.clone()
    }

    /// One turn of the loop: wait for room or for the next queue to be due,
    /// or receive from it and start what it brought.
    pub async fn step(&mut self) -> Step {
        let shutdown = self.consumer.shutdown.requested().clone();
        if shutdown.is_cancelled() || self.cfg.max_tasks.is_some_and(|m| self.started >= m) {
            return Step::Stop;
        }
        let settled = self
            .last_settled
            .lock()
            .map_or_else(|p| *p.into_inner(), |g| *g);
        if self.cfg.exit_when_empty && self.idle() && self.schedule.all_empty_since(settled) {
            tracing::info!("all queues are empty and nothing is running; exiting");
            return Step::Stop;
        }
        // Wait for half the slots to be free and for room in the delivery
        // backlog. Waiting by choice is healthy.
        let running = self.cfg.concurrency - self.slots.available_permits();
        if self.slots.available_permits() < self.refill_at || !self.consumer.has_room(running) {
            let freed = self.freed();
            tokio::select! {
                () = freed.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return Step::Stop,
            }
            self.health.progress();
            return Step::Continue;
        }
        let Some((i, due)) = self.schedule.next() else {
            return Step::Stop;
        };
        if due > Instant::now() {
            return self.wait_until(due).await;
        }
        self.schedule.picked(i);
        let free = self.slots.available_permits() as u64;
        let remaining = self.cfg.max_tasks.map_or(u64::MAX, |m| m - self.started);
        // While other queues have work, a queue whose outcomes cannot be
        // delivered now gets small batches, a few times a second.
        let yielding = self.targets[i].deferring.lately() && self.schedule.others_busy(i);
        let batch = if yielding {
            DEFERRING_BATCH
        } else {
            self.cfg.batch_size
        };
        let want = u64::from(batch).min(free).min(remaining).max(1) as u8;
        let Some(received) = self.receive(i, want).await else {
            return Step::Stop;
        };
        match received {
            Ok(messages) if !messages.is_empty() && shutdown.is_cancelled() => {
                for msg in &messages {
                    consumer::release_unstarted(&self.targets[i], msg, &self.consumer.stats).await;
                }
                Step::Stop
            }
            Ok(messages) if messages.is_empty() => {
                let backoff = self.schedule.empty(i);
                tracing::trace!(queue = %self.targets[i].queue.name(), backoff_ms = backoff.as_millis() as u64, "queue empty");
                Step::Continue
            }
            Ok(messages) => {
                self.schedule.brought(i);
                if yielding {
                    self.schedule.hold(i, DEFERRING_PAUSE);
                }
                self.start(i, messages);
                Step::Continue
            }
            Err(e) => {
                self.receive_failed(i, e).await;
                Step::Continue
            }
        }
    }

    /// Sleeps until `due`. A finished task wakes the loop early with
    /// --exit-when-empty: at once when it was the last one running, since
    /// only a receive after it can end the run.
    async fn wait_until(&mut self, due: Instant) -> Step {
        let (shutdown, freed) = (self.consumer.shutdown.requested().clone(), self.freed());
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = shutdown.cancelled() => return Step::Stop,
            () = freed.notified(), if self.cfg.exit_when_empty => {
                let soon = if self.idle() {
                    Instant::now()
                } else {
                    Instant::now() + MIN_POLL_INTERVAL
                };
                self.schedule.poll_by(soon);
            }
        }
        Step::Continue
    }

    /// Receives from queue `i`. A receive in flight is not abandoned on
    /// shutdown: the service may already have leased messages to it, and
    /// dropping the answer would hide them for the whole visibility timeout.
    /// Its answer is awaited until half the settle margin is left before the
    /// deadline (the rest is for handing back what it brings, which the
    /// caller does); `None` when even that ran out.
    async fn receive(&mut self, i: usize, want: u8) -> Option<Result<Vec<Message>, QueueError>> {
        let shutdown = self.consumer.shutdown.clone();
        let receive = self.targets[i]
            .queue
            .receive(want, self.consumer.settings.visibility_timeout);
        tokio::pin!(receive);
        let received = tokio::select! {
            r = &mut receive => r,
            () = shutdown.requested().cancelled() => {
                let by = shutdown.exit_by().unwrap_or_else(Instant::now);
                tokio::time::timeout_at(by - SETTLE_MARGIN / 2, &mut receive).await.ok()?
            }
        };
        if received.is_ok() {
            self.health.progress();
        }
        Some(received)
    }

    /// Starts one task per message, each holding a slot until its handler is done.
    fn start(&mut self, i: usize, messages: Vec<Message>) {
        for msg in messages {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Cannot happen (we asked for at most the free slots); if it
                // did, the message reappears after its lease.
                tracing::error!(message_id = %msg.id, "no free slot for a received message; leaving it to its lease");
                continue;
            };
            self.started += 1;
            let (consumer, target) = (self.consumer.clone(), self.targets[i].clone());
            let run_slot = RunSlot::new(permit, self.freed());
            let last_settled = self.last_settled.clone();
            self.tracker.spawn(async move {
                let _ = consumer::process_message(consumer, target, msg, run_slot).await;
                if let Ok(mut t) = last_settled.lock() {
                    *t = Instant::now();
                }
            });
        }
    }

    async fn receive_failed(&mut self, i: usize, e: QueueError) {
        let target = &self.targets[i];
        self.consumer.stats.queue_error(target.queue.name());
        let retry_in_ms = self.schedule.failed(i).as_millis() as u64;
        let queue = target.queue.name().to_owned();
        if let QueueError::QueueNotFound { .. } = e {
            tracing::warn!(%queue, "queue disappeared; creating it again");
            if let Err(e) = target.queue.create_if_missing().await {
                tracing::warn!(%queue, error = %e, "cannot create queue");
            }
            let _ = target.poison.create_if_missing().await;
        } else if e.is_transient() {
            tracing::warn!(%queue, error = %e, retry_in_ms, "receive failed; retrying");
        } else {
            tracing::error!(%queue, error = %e, retry_in_ms, "receive failed; retrying");
        }
    }

    /// After the loop: wait for the running tasks (and their webhooks). A
    /// signal cancels them when the grace is over (each task's token is a
    /// child of it), and nothing waits past the shutdown's deadline.
    async fn drain_tasks(&self) {
        self.tracker.close();
        if self.tracker.is_empty() {
            return;
        }
        tracing::info!(
            in_flight = self.tracker.len(),
            grace_s = self.cfg.shutdown_grace.as_secs_f64(),
            "waiting for running tasks (and their webhooks)"
        );
        let shutdown = &self.consumer.shutdown;
        let grace_over = async {
            shutdown.grace_over().cancelled().await;
            tracing::warn!(
                in_flight = self.tracker.len(),
                "grace period over; cancelling running tasks (their messages are released) and handing pending webhooks to the outbox"
            );
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = self.tracker.wait() => {}
            () = grace_over => {}
            () = shutdown.deadline() => {
                tracing::error!(
                    unsettled = self.tracker.len(),
                    "messages not settled within the shutdown budget; they reappear when their leases expire"
                );
            }
        }
    }
}

/// Runs until shutdown is requested (or the stop conditions in `cfg` hold),
/// and returns by the shutdown's deadline. The targets' outboxes are drained
/// beside the task queues, by a loop of their own that takes no task slot.
pub async fn run(
    consumer: Arc<Consumer>,
    targets: Vec<Target>,
    cfg: Config,
    health: Arc<Health>,
) -> Summary {
    let shutdown = consumer.shutdown.clone();
    let stats = consumer.stats.clone();
    let mut drain = tokio::spawn({
        let (notifier, shutdown) = (consumer.app.notifier.clone(), shutdown.clone());
        let outboxes = targets.iter().map(|t| t.outbox.clone()).collect();
        let drain_cfg = DrainConfig {
            max_in_flight: cfg.outbox_in_flight,
            max_poll_interval: cfg.max_poll_interval,
            exit_when_empty: cfg.exit_when_empty || cfg.max_tasks.is_some(),
            max_entries: None,
        };
        async move { outbox::run(notifier, outboxes, drain_cfg, &shutdown).await }
    });
    let summary_task = tokio::spawn(summary_loop(
        stats.clone(),
        targets.iter().map(|t| t.queue.clone()).collect(),
        cfg.summary_every,
        shutdown.requested().clone(),
    ));
    let mut poller = Poller::new(consumer, targets, cfg, health);
    while poller.step().await == Step::Continue {}
    poller.drain_tasks().await;
    tokio::select! {
        joined = &mut drain => {
            if let Err(e) = joined {
                tracing::error!(error = %e, "the outbox loop failed");
            }
        }
        () = shutdown.deadline() => {
            // Entries still in flight reappear when their short leases expire.
            drain.abort();
        }
    }
    summary_task.abort();
    let summary = Summary::of(&stats);
    tracing::info!(?summary, "worker stopped");
    summary
}

/// Logs one line with the counters every `every`, and one `queue depth` line
/// per consumed queue (approximate count, visible or not): the backlog a
/// dashboard charts.
async fn summary_loop(
    stats: Arc<Stats>,
    queues: Vec<crate::queue::Queue>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut last = (Summary::of(&stats).ran(), Instant::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        for q in &queues {
            if let Ok(depth) = q.approximate_count().await {
                tracing::info!(queue = %q.name(), depth, "queue depth");
            }
        }
        let now = Summary::of(&stats);
        let elapsed = last.1.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            received = now.received,
            succeeded = now.succeeded,
            failed = now.failed,
            timed_out = now.timed_out,
            retried = now.retried,
            poisoned = now.poisoned,
            in_flight = stats.in_flight.load(Ordering::Relaxed),
            queue_errors = Stats::get(&stats.queue_errors),
            rate_per_s = format!("{:.2}", (now.ran() - last.0) as f64 / elapsed),
            "summary"
        );
        last = (now.ran(), Instant::now());
    }
}
