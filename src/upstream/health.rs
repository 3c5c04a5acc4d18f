//! What berth knows about an upstream's state: a circuit breaker over its failures, and the
//! pull budget its rate-limit headers announce. Plain state machines, driven by the client.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures (unreachable, timeout, 5xx) that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How long an open circuit refuses requests before one probe may try.
pub const OPEN_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One request is probing; the others are refused until it answers.
    Probing,
}

/// What a request to the upstream may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// This request is the single probe of a half-open circuit.
    Probe,
    /// The circuit is open: fail at once, without contacting the upstream.
    Refuse {
        retry_in: Duration,
    },
}

pub struct Breaker {
    phase: Mutex<Phase>,
    failures_to_open: u32,
    open_for: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new(FAILURES_TO_OPEN, OPEN_FOR)
    }
}

impl Breaker {
    pub fn new(failures_to_open: u32, open_for: Duration) -> Breaker {
        Breaker { phase: Mutex::new(Phase::Closed { failures: 0 }), failures_to_open: failures_to_open.max(1), open_for }
    }

    pub fn gate(&self) -> Gate {
        let mut p = self.phase.lock();
        match *p {
            Phase::Closed { .. } => Gate::Go,
            Phase::Open { until } => {
                let now = Instant::now();
                if now < until {
                    Gate::Refuse { retry_in: until - now }
                } else {
                    *p = Phase::Probing;
                    Gate::Probe
                }
            }
            Phase::Probing => Gate::Refuse { retry_in: Duration::from_secs(1) },
        }
    }

    /// The upstream answered (any status below 500 but 429).
    pub fn succeeded(&self) {
        *self.phase.lock() = Phase::Closed { failures: 0 };
    }

    pub fn failed(&self) {
        let mut p = self.phase.lock();
        *p = match *p {
            Phase::Closed { failures } if failures + 1 < self.failures_to_open => Phase::Closed { failures: failures + 1 },
            Phase::Open { until } => Phase::Open { until },
            _ => Phase::Open { until: Instant::now() + self.open_for },
        };
    }

    /// A request that passed the gate ended without an answer either way (cancelled): a probe
    /// gives its turn back.
    pub fn abandoned(&self, gate: Gate) {
        let mut p = self.phase.lock();
        if gate == Gate::Probe && *p == Phase::Probing {
            *p = Phase::Open { until: Instant::now() };
        }
    }

    /// 0 closed, 1 probing, 2 open (the `berth_upstream_state` gauge).
    pub fn state(&self) -> i64 {
        match *self.phase.lock() {
            Phase::Closed { .. } => 0,
            Phase::Probing => 1,
            Phase::Open { .. } => 2,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state() != 0
    }
}

/// The pull budget as the upstream last announced it (Docker Hub: `ratelimit-limit: 100;w=21600`,
/// `ratelimit-remaining: 76;w=21600`), and a 429's `Retry-After`.
pub struct Budget {
    state: Mutex<BudgetState>,
    /// The share of the limit kept for content berth has no cached answer for.
    reserve: f64,
}

#[derive(Default)]
struct BudgetState {
    limit: Option<u64>,
    remaining: Option<u64>,
    window: Option<Duration>,
    seen: Option<Instant>,
    /// After a 429: nothing but the cache until then.
    blocked_until: Option<Instant>,
}

/// The number before `;` in a rate-limit header, and its `w=` window.
fn parse_quota(v: &str) -> Option<(u64, Option<Duration>)> {
    let mut parts = v.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let w = parts.find_map(|p| p.trim().strip_prefix("w=")?.trim().parse::<u64>().ok()).map(Duration::from_secs);
    Some((n, w))
}

impl Budget {
    pub fn new(reserve: f64) -> Budget {
        Budget { state: Mutex::new(BudgetState::default()), reserve: reserve.clamp(0.0, 1.0) }
    }

    /// Reads the rate-limit headers of any upstream answer.
    pub fn observe(&self, limit: Option<&str>, remaining: Option<&str>) {
        let (limit, remaining) = (limit.and_then(parse_quota), remaining.and_then(parse_quota));
        if limit.is_none() && remaining.is_none() {
            return;
        }
        let mut s = self.state.lock();
        if let Some((l, w)) = limit {
            s.limit = Some(l);
            s.window = w.or(s.window);
        }
        if let Some((r, w)) = remaining {
            s.remaining = Some(r);
            s.window = w.or(s.window);
        }
        s.seen = Some(Instant::now());
    }

    /// A 429: only the cache until `retry_after` (or the announced window, or a minute).
    pub fn refused(&self, retry_after: Option<Duration>) {
        let mut s = self.state.lock();
        let wait = retry_after.or(s.window).unwrap_or(Duration::from_secs(60));
        s.blocked_until = Some(Instant::now() + wait);
        s.remaining = Some(0);
        s.seen = Some(Instant::now());
    }

    fn fresh(s: &BudgetState) -> bool {
        // Past its window the announced figures say nothing about now.
        match (s.seen, s.window) {
            (Some(seen), Some(w)) => seen.elapsed() < w,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// No pull at all: the budget is spent or the upstream said 429. `Some(wait)` until when.
    pub fn exhausted(&self) -> Option<Duration> {
        let s = self.state.lock();
        if let Some(until) = s.blocked_until {
            let now = Instant::now();
            if now < until {
                return Some(until - now);
            }
        }
        if Self::fresh(&s) && s.remaining == Some(0) {
            let left = s.window.zip(s.seen).map(|(w, seen)| w.saturating_sub(seen.elapsed())).unwrap_or(Duration::from_secs(60));
            return Some(left);
        }
        None
    }

    /// At or below the reserve: pulls only for content without a cached answer.
    pub fn thrifty(&self) -> bool {
        if self.exhausted().is_some() {
            return true;
        }
        let s = self.state.lock();
        match (Self::fresh(&s), s.limit, s.remaining) {
            (true, Some(l), Some(r)) => (r as f64) <= (l as f64) * self.reserve,
            _ => false,
        }
    }

    pub fn remaining(&self) -> Option<u64> {
        self.state.lock().remaining
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_failures_and_probes_once() {
        let b = Breaker::new(3, Duration::from_millis(30));
        b.failed();
        b.failed();
        assert_eq!(b.gate(), Gate::Go);
        b.failed();
        assert!(matches!(b.gate(), Gate::Refuse { .. }));
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            std::thread::yield_now();
        }
        assert_eq!(b.gate(), Gate::Probe);
        assert!(matches!(b.gate(), Gate::Refuse { .. }), "one probe at a time");
        b.failed();
        assert!(matches!(b.gate(), Gate::Refuse { .. }), "a failed probe opens it again");
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            std::thread::yield_now();
        }
        assert_eq!(b.gate(), Gate::Probe);
        b.succeeded();
        assert_eq!(b.gate(), Gate::Go);
        assert_eq!(b.state(), 0);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let b = Breaker::new(1, Duration::ZERO);
        b.failed();
        let g = b.gate();
        assert_eq!(g, Gate::Probe);
        b.abandoned(g);
        assert_eq!(b.gate(), Gate::Probe);
    }

    #[test]
    fn budget_reads_docker_hub_headers() {
        let b = Budget::new(0.1);
        assert!(!b.thrifty() && b.exhausted().is_none(), "nothing known: spend");
        b.observe(Some("100;w=21600"), Some("76;w=21600"));
        assert_eq!(b.remaining(), Some(76));
        assert!(!b.thrifty());
        b.observe(Some("100;w=21600"), Some("10;w=21600"));
        assert!(b.thrifty() && b.exhausted().is_none(), "at the reserve");
        b.observe(None, Some("0;w=21600"));
        assert!(b.exhausted().is_some_and(|w| w > Duration::from_secs(21000)));
        let b = Budget::new(0.1);
        b.refused(Some(Duration::from_secs(37)));
        assert!(b.exhausted().is_some_and(|w| w <= Duration::from_secs(37) && w > Duration::from_secs(30)));
        assert!(b.thrifty());
        assert_eq!(parse_quota("garbage"), None);
    }
}
