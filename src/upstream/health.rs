//! What berth knows about an upstream's state: a circuit breaker over its failures, and the
//! pull budget its rate-limit headers announce. Plain state machines, driven by the client.

use parking_lot::Mutex;
use std::sync::Arc;
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

/// What berth knows of one of an upstream's URLs: each has its own circuit and budget, so a
/// dead first URL costs a timeout only until its circuit opens, and a corporate mirror's
/// answers say nothing about Docker Hub's pull budget.
pub struct UrlHealth {
    pub breaker: Breaker,
    pub budget: Budget,
}

/// The upstream's circuits, one per URL, seen as one: the upstream is failing only when every
/// URL is.
#[derive(Clone)]
pub struct Breakers(Arc<[UrlHealth]>);

/// The upstream's pull budgets, one per URL, seen as one: only the URLs a request could go to
/// now (circuit closed) count, so a healthy URL's budget is what decides; with every circuit
/// open, all of them.
#[derive(Clone)]
pub struct Budgets(Arc<[UrlHealth]>);

/// The per-URL state, and its two views.
pub fn per_url(n: usize, reserve: f64) -> (Arc<[UrlHealth]>, Breakers, Budgets) {
    let all: Arc<[UrlHealth]> = (0..n.max(1)).map(|_| UrlHealth { breaker: Breaker::default(), budget: Budget::new(reserve) }).collect();
    (all.clone(), Breakers(all.clone()), Budgets(all))
}

impl Breakers {
    /// 0 when any URL's circuit is closed, else 1 when one is probing, else 2.
    pub fn state(&self) -> i64 {
        self.0.iter().map(|h| h.breaker.state()).min().unwrap_or(0)
    }

    pub fn is_open(&self) -> bool {
        self.state() != 0
    }
}

impl Budgets {
    fn usable(&self) -> Vec<&Budget> {
        let open: Vec<&Budget> = self.0.iter().filter(|h| !h.breaker.is_open()).map(|h| &h.budget).collect();
        if open.is_empty() {
            self.0.iter().map(|h| &h.budget).collect()
        } else {
            open
        }
    }

    /// Every usable URL's budget is spent: `Some(wait)` until the first comes back.
    pub fn exhausted(&self) -> Option<Duration> {
        let waits: Option<Vec<Duration>> = self.usable().iter().map(|b| b.exhausted()).collect();
        waits.and_then(|w| w.into_iter().min())
    }

    /// Every usable URL is at or below its reserve.
    pub fn thrifty(&self) -> bool {
        self.usable().iter().all(|b| b.thrifty())
    }

    /// The pulls left at the URLs that announced a figure, together.
    pub fn remaining(&self) -> Option<u64> {
        self.0.iter().filter_map(|h| h.budget.remaining()).reduce(|a, b| a + b)
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

    #[test]
    fn an_upstream_is_down_and_thrifty_only_when_every_usable_url_is() {
        let (all, breakers, budgets) = per_url(2, 0.1);
        assert_eq!(breakers.state(), 0);
        for _ in 0..FAILURES_TO_OPEN {
            all[0].breaker.failed();
        }
        assert_eq!(breakers.state(), 0, "the second URL still answers");
        // The open first URL's spent budget does not count while the second is usable.
        all[0].budget.observe(Some("100;w=21600"), Some("0;w=21600"));
        assert!(budgets.exhausted().is_none() && !budgets.thrifty());
        all[1].budget.observe(Some("100;w=21600"), Some("5;w=21600"));
        assert!(budgets.thrifty() && budgets.exhausted().is_none());
        assert_eq!(budgets.remaining(), Some(5));
        for _ in 0..FAILURES_TO_OPEN {
            all[1].breaker.failed();
        }
        assert_eq!(breakers.state(), 2);
        assert!(budgets.exhausted().is_none(), "with every circuit open, all budgets count: one has pulls left");
        all[1].budget.observe(None, Some("0;w=21600"));
        assert!(budgets.exhausted().is_some());
    }
}
