//! One retry loop for everything that retries in-process: webhook attempts
//! and settlement calls on the queue.
//!
//! The caller states its policy as data: the delays between attempts (their
//! count is the number of retries), and for each error whether it is worth
//! another attempt and, optionally, a delay the other side asked for
//! (`Retry-After`). A cancellation token ends the waiting: once it fires no
//! new attempt starts. (The outbox retries on a much longer schedule with the
//! queue's visibility timeout as the timer; it does not sleep here.)

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What the predicate says about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not worth another attempt.
    Stop,
    /// Try again after the schedule's next delay.
    Retry,
    /// Try again after this delay instead (the other side asked for it).
    RetryAfter(Duration),
}

/// Why [`run`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub struct GaveUp<E> {
    pub error: E,
    /// Attempts made, the failing one included.
    pub attempts: u32,
    /// `stop` fired before the next attempt could start.
    pub stopped: bool,
}

/// Runs `op(attempt)` (attempt counts from 1) until it succeeds, the
/// predicate says stop, the delays run out, or `stop` fires during a wait.
pub async fn run<T, E, F, Fut>(
    delays: impl IntoIterator<Item = Duration>,
    mut op: F,
    decide: impl Fn(&E) -> Decision,
    stop: &CancellationToken,
) -> Result<T, GaveUp<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = delays.into_iter();
    let mut attempt = 1;
    loop {
        let error = match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let give_up = |error, stopped| GaveUp {
            error,
            attempts: attempt,
            stopped,
        };
        // The predicate is asked only when a retry is still possible, so it
        // may log "retrying" truthfully.
        let Some(scheduled) = delays.next() else {
            return Err(give_up(error, false));
        };
        let delay = match decide(&error) {
            Decision::Stop => return Err(give_up(error, false)),
            Decision::Retry => scheduled,
            Decision::RetryAfter(d) => d,
        };
        if stop.is_cancelled() {
            return Err(give_up(error, true));
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return Err(give_up(error, true)),
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn secs(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_on_the_schedule_until_success() {
        let calls = Cell::new(0);
        let start = tokio::time::Instant::now();
        let r: Result<u32, GaveUp<&str>> = run(
            secs(&[1, 2, 4]),
            |n| {
                calls.set(n);
                async move {
                    if n < 3 {
                        Err("no")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| Decision::Retry,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(r, Ok(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3), "1 s then 2 s");
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_a_final_error_when_delays_run_out_or_when_told() {
        let never = CancellationToken::new();
        let r: Result<(), _> =
            run(secs(&[1]), |_| async { Err(7) }, |_| Decision::Stop, &never).await;
        assert_eq!(
            r,
            Err(GaveUp {
                error: 7,
                attempts: 1,
                stopped: false
            })
        );
        let r: Result<(), _> = run(
            secs(&[1, 1]),
            |_| async { Err(7) },
            |_| Decision::Retry,
            &never,
        )
        .await;
        assert_eq!(r.unwrap_err().attempts, 3);
        let stop = CancellationToken::new();
        stop.cancel();
        let r: Result<(), _> = run(
            secs(&[60]),
            |_| async { Err(7) },
            |_| Decision::Retry,
            &stop,
        )
        .await;
        let e = r.unwrap_err();
        assert!(e.stopped && e.attempts == 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_other_sides_delay_replaces_the_schedules() {
        let start = tokio::time::Instant::now();
        let r: Result<(), _> = run(
            secs(&[100]),
            |_| async { Err(()) },
            |_| Decision::RetryAfter(Duration::from_secs(2)),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(r.unwrap_err().attempts, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
