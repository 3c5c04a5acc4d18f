//! Brute-force throttling: after `max` failed password checks from one client within a
//! window, further password checks from it are refused until the window ends. Refusing the
//! correct password too is the point: otherwise guessing simply continues at full speed.
//!
//! A check counts as a failure from the moment it starts and is refunded if the password
//! matches: counting only finished checks let guesses sent in parallel all pass the limit
//! while none of them had failed yet.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Past this many tracked clients, expired windows are dropped; past twice as many (a flood
/// from many addresses), everything is, so memory stays bounded.
const PRUNE_AT: usize = 1 << 16;

pub struct Throttle {
    max: u32,
    window: Duration,
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// A password check under way, counted as a failure unless `Throttle::succeeded` refunds it.
#[must_use]
pub struct Attempt {
    bucket: IpAddr,
    window: Instant,
}

/// IPv6 clients get a /64 each from their provider, so one address per /64 is counted.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl Throttle {
    pub fn new(max: u32, window: Duration) -> Throttle {
        Throttle { max, window, clients: Mutex::new(HashMap::new()) }
    }

    /// `Err(wait)` when `ip` has used up its failures for the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    pub fn fail(&self, ip: IpAddr) {
        self.fail_at(ip, Instant::now())
    }

    /// Starts a password check: `Err(wait)` when `ip` is locked out, else the attempt, already
    /// counted. Checking and counting under one lock is what keeps parallel guesses in bounds.
    pub fn begin(&self, ip: IpAddr) -> Result<Attempt, Duration> {
        self.begin_at(ip, Instant::now())
    }

    /// The password matched: the attempt was no failure.
    pub fn succeeded(&self, a: Attempt) {
        let mut clients = self.clients.lock();
        if let Some(e) = clients.get_mut(&a.bucket) {
            // An attempt from a window that has since ended was already forgotten with it.
            if e.0 == a.window {
                e.1 = e.1.saturating_sub(1);
            }
        }
    }

    fn begin_at(&self, ip: IpAddr, now: Instant) -> Result<Attempt, Duration> {
        let mut clients = self.clients.lock();
        let b = bucket(ip);
        if let Some(&(start, n)) = clients.get(&b) {
            if n >= self.max {
                if let Some(wait) = (start + self.window).checked_duration_since(now).filter(|w| !w.is_zero()) {
                    return Err(wait);
                }
            }
        }
        let window = Self::count(&mut clients, b, now, self.window);
        Ok(Attempt { bucket: b, window })
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let clients = self.clients.lock();
        match clients.get(&bucket(ip)) {
            Some(&(start, n)) if n >= self.max => match (start + self.window).checked_duration_since(now) {
                Some(wait) if !wait.is_zero() => Err(wait),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn fail_at(&self, ip: IpAddr, now: Instant) {
        let mut clients = self.clients.lock();
        Self::count(&mut clients, bucket(ip), now, self.window);
    }

    /// Counts one failure for `b`; returns the start of the window it was counted in.
    fn count(clients: &mut HashMap<IpAddr, (Instant, u32)>, b: IpAddr, now: Instant, window: Duration) -> Instant {
        if clients.len() >= PRUNE_AT {
            clients.retain(|_, (start, _)| now.duration_since(*start) < window);
            if clients.len() >= 2 * PRUNE_AT {
                clients.clear();
            }
        }
        let e = clients.entry(b).or_insert((now, 0));
        if now.duration_since(e.0) >= window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_ends() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(t.check_at(ip, t0).is_ok(), "failure {i} is still allowed");
            t.fail_at(ip, t0);
        }
        let wait = t.check_at(ip, t0 + Duration::from_secs(15)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(45));
        assert!(t.check_at(other, t0).is_ok(), "other clients are unaffected");
        assert!(t.check_at(ip, t0 + Duration::from_secs(60)).is_ok());
        t.fail_at(ip, t0 + Duration::from_secs(61));
        assert!(t.check_at(ip, t0 + Duration::from_secs(61)).is_ok(), "a new window starts counting from one");
    }

    #[test]
    fn attempts_count_while_in_flight_and_successes_are_refunded() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        let a: Vec<_> = (0..3).map(|_| t.begin_at(ip, t0).unwrap()).collect();
        assert!(t.begin_at(ip, t0).is_err(), "three checks in flight use up the limit");
        assert!(t.check_at(ip, t0).is_err());
        let mut a = a.into_iter();
        t.succeeded(a.next().unwrap());
        let again = t.begin_at(ip, t0).expect("a matched password frees its place");
        assert!(t.begin_at(ip, t0).is_err());
        // An attempt begun in an ended window is not refunded from the next one.
        let fresh = t.begin_at(ip, t0 + Duration::from_secs(60)).unwrap();
        t.succeeded(again);
        let _second = t.begin_at(ip, t0 + Duration::from_secs(60)).unwrap();
        let _third = t.begin_at(ip, t0 + Duration::from_secs(60)).unwrap();
        assert!(t.begin_at(ip, t0 + Duration::from_secs(60)).is_err());
        t.succeeded(fresh);
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t = Throttle::new(1, Duration::from_secs(60));
        let now = Instant::now();
        t.fail_at("2001:db8:1:2::1".parse().unwrap(), now);
        assert!(t.check_at("2001:db8:1:2::ffff".parse().unwrap(), now).is_err());
        assert!(t.check_at("2001:db8:1:3::1".parse().unwrap(), now).is_ok());
        t.fail_at("::ffff:192.0.2.9".parse().unwrap(), now);
        assert!(t.check_at("192.0.2.9".parse().unwrap(), now).is_err());
    }
}
