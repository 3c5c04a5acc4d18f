//! Brute-force throttling: after `max` failed password checks from one client within a
//! window, further password checks from it are refused until the window ends. Refusing the
//! correct password too is the point: otherwise guessing simply continues at full speed.

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

/// IPv6 clients get a /64 each from their provider, so one address per /64 is counted.
fn bucket(ip: IpAddr) -> IpAddr {
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
        if clients.len() >= PRUNE_AT {
            let window = self.window;
            clients.retain(|_, (start, _)| now.duration_since(*start) < window);
            if clients.len() >= 2 * PRUNE_AT {
                clients.clear();
            }
        }
        let e = clients.entry(bucket(ip)).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
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
