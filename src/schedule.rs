//! When each of several queues is polled next: the task queues in polling
//! mode, the outboxes in the outbox drain.
//!
//! Plain state, no I/O: the loop reports what each receive brought and asks
//! which queue is due. Empty queues back off exponentially from 100 ms to a
//! cap (randomized, per queue, so workers do not poll in lockstep) and snap
//! back on the first message; failing calls back off up to 10 s. Queues due
//! at the same time take turns, so no client's queue waits behind another's.

use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;

/// The first pause after an empty receive.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Cap on the pause after failing queue calls: the service should be picked
/// up again promptly once it is back.
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(10);

/// One queue's polling state.
#[derive(Clone, Debug)]
struct QueueState {
    next_poll: Instant,
    /// Current empty-queue pause (0 = poll again at once).
    idle_backoff: Duration,
    error_backoff: Duration,
    /// When the last receive came back empty (`None`: it did not).
    empty_at: Option<Instant>,
}

/// When each queue is polled next. No I/O: the poller reports what each
/// receive brought and asks which queue is due.
#[derive(Debug)]
pub struct Schedule {
    queues: Vec<QueueState>,
    /// Where the round-robin among queues due at the same time resumes.
    cursor: usize,
    max_poll_interval: Duration,
}

impl Schedule {
    pub fn new(queues: usize, max_poll_interval: Duration) -> Self {
        let now = Instant::now();
        let state = QueueState {
            next_poll: now,
            idle_backoff: Duration::ZERO,
            error_backoff: Duration::ZERO,
            empty_at: None,
        };
        Self {
            queues: vec![state; queues],
            cursor: 0,
            max_poll_interval,
        }
    }

    /// The queue due first and when; ties go round-robin from the last pick,
    /// so no client's queue waits behind another's.
    pub fn next(&self) -> Option<(usize, Instant)> {
        let n = self.queues.len();
        (0..n)
            .map(|k| (self.cursor + k) % n)
            .min_by_key(|&i| self.queues[i].next_poll)
            .map(|i| (i, self.queues[i].next_poll))
    }

    /// Queue `i` is being polled now.
    pub fn picked(&mut self, i: usize) {
        self.cursor = (i + 1) % self.queues.len().max(1);
    }

    /// Queue `i` answered empty: back off (randomized, doubling, capped).
    pub fn empty(&mut self, i: usize) -> Duration {
        let max = self.max_poll_interval;
        let q = &mut self.queues[i];
        q.empty_at = Some(Instant::now());
        q.error_backoff = Duration::ZERO;
        q.idle_backoff = grow(q.idle_backoff, MIN_POLL_INTERVAL, max);
        q.next_poll = Instant::now() + q.idle_backoff;
        q.idle_backoff
    }

    /// Whether any queue but `i` brought messages at its last receive (or
    /// was not polled yet).
    pub fn others_busy(&self, i: usize) -> bool {
        self.queues
            .iter()
            .enumerate()
            .any(|(j, q)| j != i && q.empty_at.is_none())
    }

    /// Queue `i` is not polled again for `pause`, whatever it brought.
    pub fn hold(&mut self, i: usize, pause: Duration) {
        let q = &mut self.queues[i];
        q.next_poll = q.next_poll.max(Instant::now() + pause);
    }

    /// Queue `i` brought messages: poll it again as soon as there is room.
    pub fn brought(&mut self, i: usize) {
        let q = &mut self.queues[i];
        q.empty_at = None;
        q.error_backoff = Duration::ZERO;
        q.idle_backoff = Duration::ZERO;
        q.next_poll = Instant::now();
    }

    /// A call to queue `i` failed: back off up to [`MAX_ERROR_BACKOFF`].
    pub fn failed(&mut self, i: usize) -> Duration {
        let q = &mut self.queues[i];
        q.empty_at = None;
        q.error_backoff = grow(q.error_backoff, MIN_POLL_INTERVAL, MAX_ERROR_BACKOFF);
        q.next_poll = Instant::now() + q.error_backoff;
        q.error_backoff
    }

    /// Every queue answered empty after `since`.
    pub fn all_empty_since(&self, since: Instant) -> bool {
        self.queues
            .iter()
            .all(|q| q.empty_at.is_some_and(|t| t > since))
    }

    /// Poll every queue no later than `at`.
    pub fn poll_by(&mut self, at: Instant) {
        for q in &mut self.queues {
            q.next_poll = q.next_poll.min(at);
        }
    }
}

/// The randomized exponential step: double (×1–2 randomized), capped.
fn grow(current: Duration, min: Duration, max: Duration) -> Duration {
    if current.is_zero() {
        return min.min(max);
    }
    let factor = rand::rng().random_range(1.0..2.0);
    current.mul_f64(2.0 * factor / 1.5).max(min).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_small_and_caps() {
        let max = Duration::from_secs(30);
        let mut d = Duration::ZERO;
        d = grow(d, MIN_POLL_INTERVAL, max);
        assert_eq!(d, MIN_POLL_INTERVAL);
        for _ in 0..30 {
            let next = grow(d, MIN_POLL_INTERVAL, max);
            assert!(next >= d.min(max), "{next:?} < {d:?}");
            d = next;
        }
        assert_eq!(d, max);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_backs_off_to_the_cap_and_a_message_snaps_it_back() {
        let max = Duration::from_secs(5);
        let mut s = Schedule::new(1, max);
        let mut waits = Vec::new();
        for _ in 0..20 {
            let (i, due) = s.next().unwrap();
            tokio::time::sleep_until(due).await;
            s.picked(i);
            waits.push(s.empty(i));
        }
        assert_eq!(waits[0], MIN_POLL_INTERVAL);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), max);
        let before = Instant::now();
        assert!(s.all_empty_since(before - Duration::from_millis(1)));
        s.brought(0);
        assert_eq!(s.next().unwrap().1, Instant::now(), "polled again at once");
        assert!(!s.all_empty_since(before));
    }

    #[tokio::test(start_paused = true)]
    async fn queues_due_together_take_turns_and_errors_back_off_to_ten_seconds() {
        let mut s = Schedule::new(3, Duration::from_secs(30));
        let mut order = Vec::new();
        for _ in 0..6 {
            let (i, _) = s.next().unwrap();
            s.picked(i);
            s.brought(i);
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = s.failed(1);
        }
        assert_eq!(last, MAX_ERROR_BACKOFF);
        // The failing queue waits; the others are polled meanwhile.
        let (i, _) = s.next().unwrap();
        assert_ne!(i, 1);
        tokio::time::advance(MAX_ERROR_BACKOFF).await;
        s.brought(0);
        s.brought(2);
        s.poll_by(Instant::now());
        assert!(s.next().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_queue_waits_out_its_pause_while_the_others_are_polled() {
        let mut s = Schedule::new(2, Duration::from_secs(30));
        assert!(s.others_busy(0), "a queue not polled yet may have work");
        s.picked(0);
        s.brought(0);
        s.hold(0, Duration::from_millis(250));
        let (i, _) = s.next().unwrap();
        assert_eq!(i, 1, "the held queue is not due");
        s.picked(1);
        s.empty(1);
        assert!(!s.others_busy(0), "the only other queue is empty");
        assert!(s.others_busy(1));
        let start = Instant::now();
        let (i, due) = s.next().unwrap();
        assert_eq!(
            (i, due),
            (1, start + MIN_POLL_INTERVAL),
            "the empty one first"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        s.picked(1);
        s.brought(1);
        let (i, due) = s.next().unwrap();
        assert_eq!(
            (i, due),
            (0, start + Duration::from_millis(250)),
            "then the held one"
        );
    }
}
