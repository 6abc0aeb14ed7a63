//! How many webhook requests each backend gets at once, learned from its
//! answers, and how many outcomes may wait for one.
//!
//! Backends are often one small web process. A fixed per-host cap is wrong
//! in both directions: high enough for a backend that answers in 500 ms it
//! overflows a small server's accept queue (requests time out and come back
//! as retries), low enough for the small server it starves the slow one.
//! So each destination (`host:port`) has a limit that is *learned*, the way
//! TCP congestion control and Netflix's `concurrency-limits` do it:
//!
//! - it starts at [`Config::initial`] and doubles per round trip while
//!   answers come back fast and fine (slow start; it triples while the
//!   smoothed round trip stays within a quarter of the best one), then grows
//!   by a tenth (at least one) per round trip, and only while the limit is
//!   used;
//! - a timeout, a refused or reset connection, 429 or 503 halve it
//!   (multiplicative decrease, at most once per round trip), and so does a
//!   smoothed round trip more than twice the best one seen lately, gently
//!   (×0.9);
//! - `Retry-After` also pauses the destination until then;
//! - request starts are paced at the rate the limit and the smoothed round
//!   trip sustain (twice that over kept-alive connections), so a burst of
//!   answers never becomes a burst of new connections.
//!
//! The same module bounds what waits: an outcome *claims* room before its
//! first attempt and keeps it until it is delivered or handed to the outbox.
//! Claims are bounded in count and bytes over all destinations (the backlog:
//! when it is full, finished tasks wait and the poller stops receiving), and
//! a destination that others are waiting beside may hold only its share
//! (an outcome beyond it waits a moment, [`SHARE_WAIT`], for its own
//! destination to drain, then goes to the outbox). Room a destination took
//! while it was alone goes back the same way: once another finds the
//! backlog full, its outcomes beyond its share that cannot start yet go to
//! the outbox, so a newcomer waits a quarter second, not until the first
//! destination is judged failing. A destination that is failing (its last answer was an overload signal, or
//! nothing has come back for a while) gets room for only two rounds of its
//! limit: the caller hands everything beyond that to the outbox at once
//! ([`Busy`]), so a black-holed backend costs other clients nothing, and
//! memory stays bounded whatever it does.
//!
//! Everything here is plain state behind one mutex ([`State`]), driven by a
//! clock the caller passes in, so unit tests run the algorithm without time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Above this many remembered destinations, idle ones are forgotten.
const PRUNE_AT: usize = 1024;
/// Growth per round trip after slow start, as a fraction of the limit.
const AVOIDANCE_GROWTH: f64 = 0.1;
/// A smoothed round trip within this factor of the baseline is flat: slow
/// start grows faster.
const FLAT: f64 = 1.25;
/// A smoothed round trip this much above the baseline (×2 + 1 ms) means
/// queueing.
const LATENCY_SLACK: Duration = Duration::from_millis(1);
/// How long the lowest round trip seen is remembered (two windows of this).
const BASELINE_WINDOW: Duration = Duration::from_secs(10);
/// Nothing back from a destination for this long (or four smoothed round
/// trips, if longer) while requests are in flight: it is failing.
const STALL_FLOOR: Duration = Duration::from_secs(2);
/// Overload signals in a row (no good answer between) that make a
/// destination failing.
const FAILING_STREAK: u32 = 5;
/// How long an outcome whose destination holds its share of the backlog
/// waits for room before it goes to the outbox.
const SHARE_WAIT: Duration = Duration::from_secs(1);
const SHARE_RECHECK: Duration = Duration::from_millis(20);
/// Spacing of the first requests to a destination, before any round trip
/// is known.
const FIRST_PACE: Duration = Duration::from_millis(1);
/// Longest spacing between two request starts to one destination.
const MAX_PACE: Duration = Duration::from_millis(20);
/// Longest a request waiting for a slot sleeps before it looks again.
const RECHECK: Duration = Duration::from_millis(250);
/// How long an outcome that found the backlog full counts as wanting room
/// (two [`RECHECK`]s: every waiting request looks again meanwhile).
const ROOM_WANTED_FOR: Duration = Duration::from_millis(500);

/// Why a request or an outcome cannot go ahead now; the caller hands the
/// outcome to the outbox, which tries again later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("the destination is failing and already has its share of outcomes waiting")]
    Failing,
    #[error("the destination already has its share of the delivery backlog")]
    Share,
    #[error("no room for the outcome within the wait bound")]
    Waited,
}

/// How a request ended, as far as the destination's limit is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// An answer (2xx, or a client error that says nothing about load);
    /// `closed`: the server closed the connection after it (HTTP/1.0, or
    /// `Connection: close`), so the next request opens a new one.
    Answered { rtt: Duration, closed: bool },
    /// Timeout, refused or reset connection, 429, 502, 503, 504.
    Overloaded,
    /// 429 or 503 with `Retry-After`.
    RetryAfter(Duration),
    /// Nothing to learn (the request was given up by us).
    Ignored,
}

/// The knobs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Limit a destination starts with.
    pub initial: f64,
    /// Requests in flight over all destinations, and the most one may get.
    pub max_in_flight: usize,
    /// Outcomes that may wait for delivery over all destinations.
    pub backlog: usize,
    /// Bytes of outcome bodies that may wait over all destinations (a
    /// single larger one is admitted alone).
    pub backlog_bytes: usize,
    /// Longest wait for room (a claim or a request slot) before [`Busy::Waited`].
    pub max_wait: Duration,
    /// Longest pause a `Retry-After` can impose.
    pub max_pause: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            initial: 8.0,
            max_in_flight: 512,
            backlog: 512,
            backlog_bytes: 64 << 20,
            max_wait: Duration::from_secs(10),
            max_pause: Duration::from_secs(30),
        }
    }
}

/// One destination's learned limit and what it holds.
#[derive(Debug)]
struct Dest {
    limit: f64,
    /// Slow start ends at this limit (set by the first cut).
    ssthresh: f64,
    in_flight: usize,
    claims: usize,
    claim_bytes: usize,
    /// Lowest round trip of the current and the previous window.
    best: [Option<Duration>; 2],
    window_start: Instant,
    srtt: Option<Duration>,
    last_cut: Option<Instant>,
    /// Last answer, or when the first request of a busy period started.
    progress: Instant,
    /// Overload signals since the last good answer.
    streak: u32,
    paused_until: Option<Instant>,
    /// Earliest start of the next request (pacing).
    next_start: Instant,
    /// The last answer closed its connection: every request is a new one.
    closes: bool,
    notify: Arc<Notify>,
}

impl Dest {
    fn new(cfg: &Config, now: Instant) -> Self {
        Self {
            limit: cfg.initial.max(1.0),
            ssthresh: cfg.max_in_flight as f64,
            in_flight: 0,
            claims: 0,
            claim_bytes: 0,
            best: [None, None],
            window_start: now,
            srtt: None,
            last_cut: None,
            progress: now,
            streak: 0,
            paused_until: None,
            next_start: now,
            closes: false,
            notify: Arc::new(Notify::new()),
        }
    }

    fn slots(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    fn baseline(&self) -> Option<Duration> {
        match self.best {
            [Some(a), Some(b)] => Some(a.min(b)),
            [a, b] => a.or(b),
        }
    }

    /// Failing: [`FAILING_STREAK`] overload signals in a row, or requests
    /// are out and nothing has come back for a while. (A single 503 or 429
    /// between good answers is a busy backend asking for less, which the
    /// limit takes care of; outcomes then wait rather than go to the outbox.)
    fn failing(&self, now: Instant) -> bool {
        let stall = self.srtt.map_or(STALL_FLOOR, |s| (s * 4).max(STALL_FLOOR));
        self.streak >= FAILING_STREAK
            || (self.in_flight > 0 && now.duration_since(self.progress) > stall)
    }

    /// Spacing between request starts: the rate the limit and the smoothed
    /// round trip sustain, twice that over kept-alive connections (so the
    /// limit fills faster as it grows). A server that closes every
    /// connection gets each request as a new connection, and its accept
    /// queue (five on a small server) sees every burst: a connection beyond
    /// it waits a second for its SYN to be sent again, and a few of them
    /// several seconds. Measured against such a server answering in 500 ms
    /// (`tests/bench/webhook.sh`, d), pacing those at twice the rate gave
    /// outcomes in a long tail, once the rate none.
    fn pace(&self) -> Duration {
        let rate = if self.closes { 1.0 } else { 2.0 };
        self.srtt
            .map_or(FIRST_PACE, |srtt| srtt.div_f64(rate * self.limit.max(1.0)))
            .min(MAX_PACE)
    }

    fn paused(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|t| *t > now)
    }

    fn can_cut(&self, now: Instant) -> bool {
        let spacing = self
            .srtt
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(100));
        self.last_cut
            .is_none_or(|t| now.duration_since(t) >= spacing)
    }

    fn cut(&mut self, factor: f64, now: Instant) {
        if self.can_cut(now) {
            self.limit = (self.limit * factor).max(1.0);
            self.ssthresh = self.limit;
            self.last_cut = Some(now);
        }
    }

    /// Learns from one finished request that started with `used` in flight.
    /// `true` when every waiter should look again (the limit or the health
    /// changed), not just the next one.
    fn learn(&mut self, signal: Signal, used: usize, max: f64, now: Instant) -> bool {
        let (slots, failing) = (self.slots(), self.streak >= FAILING_STREAK);
        match signal {
            Signal::Answered { rtt, closed } => {
                self.progress = now;
                self.closes = closed;
                self.streak = 0;
                self.sample(rtt, now);
                // The smoothed round trip, not one sample: a connection
                // whose SYN was dropped once (a small server's accept queue
                // overflowing for a moment) takes a second longer, and is
                // no sign that requests queue up.
                let queueing = self
                    .baseline()
                    .zip(self.srtt)
                    .is_some_and(|(b, srtt)| srtt > b * 2 + LATENCY_SLACK);
                if queueing {
                    self.cut(0.9, now);
                } else if used as f64 >= self.limit / 2.0 {
                    // Slow start: double per round trip, triple while the
                    // round trip has not moved at all from the best one.
                    let flat = self
                        .baseline()
                        .zip(self.srtt)
                        .is_some_and(|(b, srtt)| srtt.as_secs_f64() <= b.as_secs_f64() * FLAT);
                    self.limit += if self.limit >= self.ssthresh {
                        // About a tenth per round trip, at least one: back
                        // within seconds after a cut, even at a 500 ms
                        // round trip and a limit in the hundreds.
                        (self.limit * AVOIDANCE_GROWTH).max(1.0) / self.limit
                    } else if flat {
                        2.0
                    } else {
                        1.0
                    };
                    self.limit = self.limit.min(max);
                }
            }
            Signal::Overloaded => {
                self.progress = now;
                self.streak += 1;
                self.cut(0.5, now);
            }
            Signal::RetryAfter(pause) => {
                self.progress = now;
                self.streak += 1;
                self.cut(0.5, now);
                self.paused_until = Some(now + pause);
            }
            Signal::Ignored => {}
        }
        self.slots() > slots
            || (self.streak >= FAILING_STREAK) != failing
            || matches!(signal, Signal::RetryAfter(_))
    }

    fn sample(&mut self, rtt: Duration, now: Instant) {
        if now.duration_since(self.window_start) > BASELINE_WINDOW {
            self.best = [self.best[1], None];
            self.window_start = now;
        }
        self.best[1] = Some(self.best[1].map_or(rtt, |b| b.min(rtt)));
        self.srtt = Some(self.srtt.map_or(rtt, |s| (s * 7 + rtt) / 8));
    }
}

/// Whether a request may start now.
enum Start {
    /// Yes; this many are in flight to the destination, this one included.
    Started(usize, Instant),
    /// Not yet: wait for the pause to end (if any) or for the notifier.
    Wait(Option<Instant>, Arc<Notify>),
}

/// Every destination's state and the shared bounds.
#[derive(Debug)]
struct State {
    dests: HashMap<String, Dest>,
    in_flight: usize,
    claims: usize,
    claim_bytes: usize,
    /// When an outcome within its destination's share last found the
    /// backlog full, and for which destination: outcomes of a destination
    /// beyond its share that have not started yet then give their room back.
    room_wanted: Option<(Instant, String)>,
}

/// Adaptive limits per destination, shared by every delivery of a process.
#[derive(Debug)]
pub struct Limiter {
    cfg: Config,
    state: Mutex<State>,
    /// Signalled when a claim or a request slot is given back.
    freed: Notify,
}

/// Room for one outcome bound for one destination, held until it is
/// delivered or handed over.
#[derive(Debug)]
pub struct Claim {
    limiter: Arc<Limiter>,
    host: String,
    bytes: usize,
}

/// One request in flight to a destination.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    host: String,
    used: usize,
    started: Instant,
    signal: Signal,
}

impl Limiter {
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::new(State {
                dests: HashMap::new(),
                in_flight: 0,
                claims: 0,
                claim_bytes: 0,
                room_wanted: None,
            }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the backlog has room for another outcome now.
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        s.claims < self.cfg.backlog && s.claim_bytes < self.cfg.backlog_bytes
    }

    /// How many outcomes may wait over all destinations ([`Config::backlog`]).
    pub fn backlog(&self) -> usize {
        self.cfg.backlog
    }

    /// The current limit of `host` (for logs and tests).
    pub fn limit(&self, host: &str) -> Option<f64> {
        self.lock().dests.get(host).map(|d| d.limit)
    }

    /// Claims room for an outcome of `bytes` bound for `host`, waiting (at
    /// most [`Config::max_wait`]) while the whole backlog is full. [`Busy`]
    /// when the destination may not hold more: hand the outcome over.
    pub async fn claim(self: &Arc<Self>, host: &str, bytes: usize) -> Result<Claim, Busy> {
        let until = Instant::now() + self.cfg.max_wait;
        // From the first time the destination is found at its share.
        let mut share_until = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_claim(host, bytes, Instant::now()) {
                Ok(true) => {
                    return Ok(Claim {
                        limiter: self.clone(),
                        host: host.to_owned(),
                        bytes,
                    })
                }
                Ok(false) => {}
                // A burst to a destination that drains fast passes in a
                // moment; one that does not drain goes to the outbox.
                Err(Busy::Share) => {
                    let now = Instant::now();
                    let end = *share_until.get_or_insert(now + SHARE_WAIT.min(self.cfg.max_wait));
                    if now >= end {
                        return Err(Busy::Share);
                    }
                }
                Err(busy) => return Err(busy),
            }
            let now = Instant::now();
            if now >= until {
                return Err(Busy::Waited);
            }
            // A release wakes one waiter, maybe one bound elsewhere: while
            // waiting for its share, look again often.
            let wake = match share_until {
                Some(end) if now < end => (now + SHARE_RECHECK).min(end),
                _ => until,
            };
            let _ = tokio::time::timeout_at(wake, freed).await;
        }
    }

    /// `Ok(true)`: claimed; `Ok(false)`: the backlog is full, wait.
    fn try_claim(&self, host: &str, bytes: usize, now: Instant) -> Result<bool, Busy> {
        let mut s = self.lock();
        if s.dests.len() >= PRUNE_AT {
            s.dests
                .retain(|_, d| d.claims > 0 || d.in_flight > 0 || d.paused(now).is_some());
        }
        let active = s.dests.values().filter(|d| d.claims > 0).count();
        let cfg = &self.cfg;
        let dest = s
            .dests
            .entry(host.to_owned())
            .or_insert_with(|| Dest::new(cfg, now));
        let others = active - usize::from(dest.claims > 0);
        if (dest.failing(now) || dest.paused(now).is_some()) && dest.claims >= 2 * dest.slots() {
            return Err(Busy::Failing);
        }
        // Beside others, a destination holds at most its share of the
        // backlog; alone, it may fill it (and then the task waits).
        let share = cfg.backlog / (others + 1);
        let byte_share = cfg.backlog_bytes / (others + 1);
        if others > 0 && (dest.claims >= share.max(1) || dest.claim_bytes >= byte_share) {
            return Err(Busy::Share);
        }
        let fits =
            s.claims < cfg.backlog && (s.claims == 0 || s.claim_bytes + bytes <= cfg.backlog_bytes);
        if !fits {
            if others > 0 {
                s.room_wanted = Some((now, host.to_owned()));
            }
            return Ok(false);
        }
        s.claims += 1;
        s.claim_bytes += bytes;
        if let Some(d) = s.dests.get_mut(host) {
            d.claims += 1;
            d.claim_bytes += bytes;
        }
        Ok(true)
    }

    fn release_claim(&self, host: &str, bytes: usize) {
        let mut s = self.lock();
        s.claims = s.claims.saturating_sub(1);
        s.claim_bytes = s.claim_bytes.saturating_sub(bytes);
        if let Some(d) = s.dests.get_mut(host) {
            d.claims = d.claims.saturating_sub(1);
            d.claim_bytes = d.claim_bytes.saturating_sub(bytes);
        }
        drop(s);
        self.freed.notify_one();
    }

    /// `Ok(Started)`, or what to wait for; `Err` when the destination is
    /// failing and already has a request out.
    fn try_start(&self, host: &str, now: Instant) -> Result<Start, Busy> {
        let mut s = self.lock();
        let total = s.in_flight;
        let cfg = &self.cfg;
        // The destinations sharing the backlog: those holding room, and
        // the one that lately found it full, if it holds none.
        let wanting = match &s.room_wanted {
            Some((t, h)) if h != host && now.saturating_duration_since(*t) < ROOM_WANTED_FOR => {
                Some(s.dests.get(h).map_or(0, |d| d.claims))
            }
            _ => None,
        };
        let sharing =
            s.dests.values().filter(|d| d.claims > 0).count() + usize::from(wanting == Some(0));
        let dest = s
            .dests
            .entry(host.to_owned())
            .or_insert_with(|| Dest::new(cfg, now));
        // Room filled while this destination was alone goes back to the
        // others once they want it: an outcome that cannot start now goes
        // to the outbox.
        let over_share = wanting.is_some() && sharing > 1 && dest.claims > cfg.backlog / sharing;
        let blocked = dest.paused(now).is_some()
            || dest.in_flight >= dest.slots()
            || total >= cfg.max_in_flight;
        if over_share && blocked {
            return Err(Busy::Share);
        }
        if let Some(until) = dest.paused(now) {
            return Ok(Start::Wait(Some(until), dest.notify.clone()));
        }
        if dest.in_flight >= dest.slots() || total >= cfg.max_in_flight {
            if dest.failing(now) && dest.in_flight > 0 {
                return Err(Busy::Failing);
            }
            return Ok(Start::Wait(None, dest.notify.clone()));
        }
        if dest.in_flight == 0 {
            dest.progress = now;
        }
        // Each request reserves its own start time: waiters never wake
        // together to race for the next one.
        let at = dest.next_start.max(now);
        dest.next_start = at + dest.pace();
        dest.in_flight += 1;
        let used = dest.in_flight;
        s.in_flight += 1;
        Ok(Start::Started(used, at))
    }

    fn finish(&self, host: &str, used: usize, signal: Signal, now: Instant) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        let max = self.cfg.max_in_flight as f64;
        let pause_cap = self.cfg.max_pause;
        if let Some(d) = s.dests.get_mut(host) {
            d.in_flight = d.in_flight.saturating_sub(1);
            let signal = match signal {
                Signal::RetryAfter(p) => Signal::RetryAfter(p.min(pause_cap)),
                other => other,
            };
            if d.learn(signal, used, max, now) {
                d.notify.notify_waiters();
            } else {
                d.notify.notify_one();
            }
        }
        drop(s);
        self.freed.notify_one();
    }
}

impl Claim {
    /// Waits for a request slot at the destination: at most
    /// [`Config::max_wait`], and not at all once it is failing with a
    /// request already out.
    pub async fn start(&self) -> Result<Permit, Busy> {
        let limiter = &self.limiter;
        let until = Instant::now() + limiter.cfg.max_wait;
        loop {
            let (pause, notify) = match limiter.try_start(&self.host, Instant::now())? {
                Start::Started(used, at) => return Ok(self.permit(used, at).await),
                Start::Wait(pause, notify) => (pause, notify),
            };
            let changed = notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Re-check: the state may have changed before `enable`.
            if let Ok(Start::Started(used, at)) = limiter.try_start(&self.host, Instant::now()) {
                return Ok(self.permit(used, at).await);
            }
            // Look again at least every RECHECK: a destination starts failing
            // by staying silent, which wakes nobody, and the all-destinations
            // cap is freed by others.
            let wake = pause
                .unwrap_or(until)
                .min(until)
                .min(Instant::now() + RECHECK);
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= until {
                return Err(Busy::Waited);
            }
        }
    }

    /// The permit of a started request (`used` in flight to the destination
    /// with it), once its paced start time `at` has come; the round trip is
    /// measured from then. Dropped while it waits, it frees its slot.
    async fn permit(&self, used: usize, at: Instant) -> Permit {
        let permit = Permit {
            limiter: self.limiter.clone(),
            host: self.host.clone(),
            used,
            started: at,
            signal: Signal::Ignored,
        };
        tokio::time::sleep_until(at).await;
        permit
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.limiter.release_claim(&self.host, self.bytes);
    }
}

impl Permit {
    /// Records how the request ended; the destination's limit learns from it
    /// when the permit is dropped.
    pub fn finish(mut self, signal: Signal) {
        self.signal = match signal {
            Signal::Answered { closed, .. } => Signal::Answered {
                rtt: self.started.elapsed(),
                closed,
            },
            other => other,
        };
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter
            .finish(&self.host, self.used, self.signal, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The algorithm's tests start from a limit of 4.
    fn test_config() -> Config {
        Config {
            initial: 4.0,
            ..Config::default()
        }
    }

    fn dest() -> (Dest, Instant) {
        let now = Instant::now();
        (Dest::new(&test_config(), now), now)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `n` round trips with the limit fully used (every slot refilled
    /// as soon as it frees, as under a backlog), each answered by `rtt(limit)`.
    fn rounds(d: &mut Dest, mut now: Instant, n: usize, rtt: impl Fn(f64) -> Signal) -> Instant {
        for _ in 0..n {
            let slots = d.slots();
            let signal = rtt(d.limit);
            let step = match signal {
                Signal::Answered { rtt, .. } => rtt,
                _ => ms(100),
            };
            now += step;
            for _ in 0..slots {
                d.learn(signal, slots, 512.0, now);
            }
        }
        now
    }

    #[test]
    fn a_slow_healthy_backend_gets_the_parallelism_it_needs_within_seconds() {
        let (mut d, now) = dest();
        // 500 ms per answer whatever the load: a flat round trip, so slow
        // start triples the limit per round trip.
        rounds(&mut d, now, 7, |_| Signal::Answered {
            rtt: ms(500),
            closed: false,
        });
        assert!(d.limit >= 256.0, "{}", d.limit);
    }

    #[test]
    fn a_server_that_closes_every_connection_gets_new_ones_at_the_sustained_rate() {
        let (mut d, now) = dest();
        let answer = |closed| Signal::Answered {
            rtt: ms(500),
            closed,
        };
        let now = rounds(&mut d, now, 3, |_| answer(false));
        let kept_alive = d.pace();
        d.learn(answer(true), d.slots(), 512.0, now);
        let closing = d.pace();
        // One start per srtt / limit: the rate the limit sustains, not twice it.
        let sustained = d.srtt.expect("answered").div_f64(d.limit);
        assert_eq!(closing, sustained.min(MAX_PACE));
        assert!(closing > kept_alive, "{closing:?} vs {kept_alive:?}");
        d.learn(answer(false), d.slots(), 512.0, now);
        assert!(d.pace() < closing);
    }

    #[test]
    fn queueing_latency_holds_the_limit_near_the_backend_capacity() {
        let (mut d, now) = dest();
        // A backend that serves 4 at once in 1 ms; more queue up.
        let rtt = |limit: f64| Signal::Answered {
            rtt: ms(1).mul_f64((limit / 4.0).max(1.0)),
            closed: false,
        };
        rounds(&mut d, now, 400, rtt);
        assert!((2.0..=40.0).contains(&d.limit), "{}", d.limit);
    }

    #[test]
    fn overload_halves_once_per_round_trip_and_retry_after_pauses() {
        let (mut d, now) = dest();
        let now = rounds(&mut d, now, 3, |_| Signal::Answered {
            rtt: ms(200),
            closed: false,
        });
        let before = d.limit;
        for used in 0..8 {
            d.learn(Signal::Overloaded, used, 512.0, now);
        }
        assert_eq!(d.limit, before / 2.0, "one cut for one burst of failures");
        assert!(d.failing(now), "eight overloads in a row");
        let later = now + ms(300);
        d.learn(Signal::RetryAfter(Duration::from_secs(5)), 1, 512.0, later);
        assert_eq!(d.limit, before / 4.0);
        assert_eq!(d.paused(later), Some(later + Duration::from_secs(5)));
        assert_eq!(d.paused(later + Duration::from_secs(6)), None);
        // Growth after a cut is additive: no return to slow start.
        let l = d.limit;
        rounds(&mut d, later + Duration::from_secs(6), 2, |_| {
            Signal::Answered {
                rtt: ms(200),
                closed: false,
            }
        });
        assert!(d.limit <= l + 2.5 && d.limit > l, "{l} -> {}", d.limit);
        assert!(!d.failing(later + Duration::from_secs(7)));
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let (mut d, now) = dest();
        for i in 0..100 {
            d.learn(
                Signal::Answered {
                    rtt: ms(10),
                    closed: false,
                },
                1,
                512.0,
                now + ms(10 * i),
            );
        }
        assert_eq!(d.limit, 4.0);
    }

    #[test]
    fn a_single_overload_between_good_answers_is_not_failing() {
        let (mut d, now) = dest();
        d.learn(
            Signal::Answered {
                rtt: ms(10),
                closed: false,
            },
            4,
            512.0,
            now,
        );
        d.learn(Signal::Overloaded, 4, 512.0, now + ms(5));
        assert!(!d.failing(now + ms(6)));
        d.learn(
            Signal::Answered {
                rtt: ms(10),
                closed: false,
            },
            4,
            512.0,
            now + ms(20),
        );
        for i in 0..FAILING_STREAK - 1 {
            d.learn(Signal::Overloaded, 4, 512.0, now + ms(30 + u64::from(i)));
        }
        assert!(!d.failing(now + ms(40)));
    }

    #[test]
    fn a_silent_destination_is_failing_after_the_stall_bound() {
        let (mut d, now) = dest();
        d.in_flight = 1;
        d.progress = now;
        assert!(!d.failing(now + Duration::from_secs(1)));
        assert!(d.failing(now + Duration::from_secs(3)));
    }

    fn limiter(backlog: usize, bytes: usize) -> Arc<Limiter> {
        Limiter::new(Config {
            backlog,
            backlog_bytes: bytes,
            max_wait: Duration::from_millis(200),
            ..test_config()
        })
    }

    #[tokio::test]
    async fn beside_others_a_destination_holds_only_its_share() {
        let l = limiter(8, 1 << 20);
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(l.claim("tarpit:80", 10).await.unwrap());
        }
        // Alone, it may fill the backlog; the next one waits, then gives up.
        assert_eq!(l.claim("tarpit:80", 10).await.unwrap_err(), Busy::Waited);
        // Another destination is not refused for its share... (it waits for room)
        held.truncate(4);
        let other = l.claim("fast:80", 10).await.unwrap();
        // ...and now the first one is over its half: handed over after a moment.
        assert_eq!(l.claim("tarpit:80", 10).await.unwrap_err(), Busy::Share);
        drop(other);
    }

    #[tokio::test]
    async fn the_backlog_is_bounded_in_bytes_but_admits_one_large_outcome() {
        let l = limiter(100, 1000);
        let big = l.claim("h:80", 5000).await.unwrap();
        assert_eq!(l.claim("h:80", 10).await.unwrap_err(), Busy::Waited);
        drop(big);
        let a = l.claim("h:80", 600).await.unwrap();
        assert!(!l.has_room() || l.claim("h:80", 600).await.is_err());
        drop(a);
        assert!(l.has_room());
    }

    #[tokio::test]
    async fn a_failing_destination_gets_two_rounds_then_the_rest_is_handed_over() {
        let l = limiter(100, 1 << 20);
        let claim = l.claim("dead:80", 1).await.unwrap();
        for _ in 0..FAILING_STREAK {
            let permit = claim.start().await.unwrap();
            permit.finish(Signal::Overloaded);
        }
        // limit 4 -> 2 after the cut (one per round trip); claims beyond
        // 2 * 2 are refused.
        let mut held = vec![claim];
        while let Ok(c) = l.claim("dead:80", 1).await {
            held.push(c);
            assert!(held.len() < 10, "claims must be refused");
        }
        assert_eq!(held.len(), 4);
        assert_eq!(l.claim("dead:80", 1).await.unwrap_err(), Busy::Failing);
        // Requests: up to the cut limit go out, the next is refused at once
        // rather than waiting behind a failing destination.
        let a = held[0].start().await.unwrap();
        let b = held[1].start().await.unwrap();
        assert_eq!(held[2].start().await.unwrap_err(), Busy::Failing);
        drop((a, b));
    }

    #[tokio::test]
    async fn slots_follow_the_limit_and_waiters_get_them_in_turn() {
        let l = limiter(100, 1 << 20);
        let claims: Vec<Claim> = futures_claims(&l, "h:80", 6).await;
        let mut permits = Vec::new();
        for c in &claims[..4] {
            permits.push(c.start().await.unwrap());
        }
        // The fifth waits for a slot (initial limit 4)...
        let fifth = tokio::time::timeout(Duration::from_millis(50), claims[4].start()).await;
        assert!(fifth.is_err(), "the initial limit is 4");
        // ...and gets the one given back.
        let done = permits.pop().unwrap();
        done.finish(Signal::Answered {
            rtt: ms(1),
            closed: false,
        });
        let got = tokio::time::timeout(Duration::from_secs(1), claims[4].start()).await;
        assert!(matches!(got, Ok(Ok(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn room_filled_alone_goes_back_to_a_destination_that_wants_it() {
        let l = Limiter::new(Config {
            backlog: 8,
            max_wait: Duration::from_secs(60),
            ..test_config()
        });
        let mut claims = futures_claims(&l, "hole:80", 8).await;
        let mut out = Vec::new();
        for c in &claims[..4] {
            out.push(c.start().await.unwrap());
        }
        // Alone, its outcomes beyond the limit wait for a slot...
        let alone = tokio::time::timeout(ms(600), claims[7].start()).await;
        assert!(alone.is_err(), "alone, it keeps its room");
        // ...until another destination finds the backlog full.
        let other = l.clone();
        let wanting = tokio::spawn(async move { other.claim("fast:80", 1).await.map(drop) });
        tokio::time::sleep(ms(1)).await;
        let last = claims.pop().unwrap();
        assert_eq!(last.start().await.unwrap_err(), Busy::Share);
        drop(last);
        assert_eq!(wanting.await.unwrap(), Ok(()), "the room went to the other");
        drop(out);
    }

    async fn futures_claims(l: &Arc<Limiter>, host: &str, n: usize) -> Vec<Claim> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(l.claim(host, 1).await.unwrap());
        }
        v
    }
}
