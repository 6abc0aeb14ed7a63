//! Admission for outgoing webhook requests: a bounded number in flight, and
//! no destination able to take them all.
//!
//! Webhook URLs come from tasks, so one backend that answers slowly (or
//! never) would otherwise fill every delivery slot and delay every other
//! client's outcomes. [`HostGate`] holds one permit per request *in flight*
//! (never across a backoff sleep), at most `total` over all hosts and at most
//! three quarters of them for any one host. A lone busy host can therefore
//! use three quarters of the slots (it is not throttled to a "fair share"
//! while nobody else is waiting), and a tarpit host always leaves a quarter
//! free, so another backend's delivery starts at once. Waiters are served
//! first come, first served (tokio's semaphores are fair), so no host is
//! starved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Above this many remembered hosts, idle ones are forgotten.
const PRUNE_AT: usize = 1024;

#[derive(Debug)]
pub struct HostGate {
    all: Arc<Semaphore>,
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Held while one request is in flight.
#[derive(Debug)]
pub struct Pass {
    _host: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl HostGate {
    /// `total` requests in flight at once (at least 2), three quarters of
    /// them (at least one) per host.
    pub fn new(total: usize) -> Self {
        let total = total.max(2);
        Self {
            all: Arc::new(Semaphore::new(total)),
            per_host: (total - total / 4).min(total - 1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot for one request to `host` (`host:port`).
    pub async fn enter(&self, host: &str) -> Pass {
        let host_sem = self.host(host);
        // Neither semaphore is ever closed, so acquiring cannot fail; should it,
        // a fresh permit keeps the request going rather than losing it.
        let host_permit = match host_sem.acquire_owned().await {
            Ok(p) => p,
            Err(_) => fresh_permit(),
        };
        let all_permit = match self.all.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => fresh_permit(),
        };
        Pass {
            _host: host_permit,
            _all: all_permit,
        }
    }

    /// Requests in flight now, over all hosts.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        let hosts = self.hosts.lock().map_or(0, |h| {
            h.values()
                .map(|s| self.per_host - s.available_permits())
                .sum()
        });
        hosts
    }

    fn host(&self, host: &str) -> Arc<Semaphore> {
        let Ok(mut hosts) = self.hosts.lock() else {
            return Arc::new(Semaphore::new(self.per_host));
        };
        if hosts.len() >= PRUNE_AT {
            let per_host = self.per_host;
            hosts.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < per_host);
        }
        hosts
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
            .clone()
    }
}

fn fresh_permit() -> OwnedSemaphorePermit {
    Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .unwrap_or_else(|_| unreachable!("a new semaphore has a permit"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_smallest_gate_still_leaves_a_slot_to_others() {
        assert_eq!(HostGate::new(2).per_host, 1);
        assert_eq!(HostGate::new(512).per_host, 384);
    }

    #[tokio::test]
    async fn one_host_gets_three_quarters_and_others_still_get_in() {
        let gate = HostGate::new(8);
        let mut slow = Vec::new();
        for _ in 0..6 {
            slow.push(gate.enter("tarpit:443").await);
        }
        // The seventh request to the same host waits...
        let blocked =
            tokio::time::timeout(Duration::from_millis(50), gate.enter("tarpit:443")).await;
        assert!(
            blocked.is_err(),
            "a host must not exceed three quarters of the slots"
        );
        // ...while another host gets all of the rest at once.
        let mut other = Vec::new();
        for _ in 0..2 {
            other.push(
                tokio::time::timeout(Duration::from_millis(50), gate.enter("fast:443"))
                    .await
                    .expect("another host must not wait behind the tarpit"),
            );
        }
        assert_eq!(gate.in_flight(), 8);
        drop(slow.pop());
        let again = tokio::time::timeout(Duration::from_millis(50), gate.enter("tarpit:443")).await;
        assert!(again.is_ok(), "a freed slot goes back to the host");
    }
}
