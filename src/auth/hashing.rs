//! The bcrypt work of password checks, shared fairly between client addresses and spent so
//! that a wrong password costs the same whatever the user.
//!
//! A plain semaphore served checks first come, first served: one address sending a hundred bad
//! logins queued a hundred hashes in front of everyone else's login. Here each address may run
//! at most `per_client` checks at once, and a free slot goes to the waiting address with the
//! fewest checks running, the one served longest ago first: an address that floods waits
//! behind its own guesses, and a newcomer waits for at most one check to finish.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

pub struct FairPool {
    inner: Arc<Inner>,
}

struct Inner {
    slots: usize,
    per_client: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    busy: usize,
    /// Addresses with checks running or waiting; idle ones are dropped, so the map is bounded
    /// by the requests in flight.
    clients: HashMap<IpAddr, Client>,
    next: u64,
}

#[derive(Default)]
struct Client {
    running: usize,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
    /// When this address was last given a slot (0: never since it was idle).
    served: u64,
}

/// A slot of the pool, held for one check; released on drop, wherever the check runs.
pub struct Permit {
    inner: Arc<Inner>,
    client: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.release(self.client);
    }
}

/// A request in the queue; if it is cancelled (the client went away) it leaves the queue, or
/// gives back the slot it was granted meanwhile.
struct Waiting<'a> {
    inner: &'a Arc<Inner>,
    client: IpAddr,
    id: u64,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut s = self.inner.state.lock();
        if let Some(c) = s.clients.get_mut(&self.client) {
            if let Some(i) = c.waiting.iter().position(|(id, _)| *id == self.id) {
                c.waiting.remove(i);
                s.forget_if_idle(self.client);
                return;
            }
        }
        // Not queued any more: the slot was handed over just before the cancellation.
        drop(s);
        self.inner.release(self.client);
    }
}

impl State {
    fn grant(&mut self, client: IpAddr) {
        self.busy += 1;
        self.next += 1;
        let c = self.clients.entry(client).or_default();
        c.running += 1;
        c.served = self.next;
    }

    fn forget_if_idle(&mut self, client: IpAddr) {
        if self.clients.get(&client).is_some_and(|c| c.running == 0 && c.waiting.is_empty()) {
            self.clients.remove(&client);
        }
    }
}

impl Inner {
    fn release(&self, client: IpAddr) {
        let mut s = self.state.lock();
        s.busy -= 1;
        if let Some(c) = s.clients.get_mut(&client) {
            c.running -= 1;
        }
        s.forget_if_idle(client);
        self.dispatch(&mut s);
    }

    /// Hands free slots to waiting addresses, fewest running first, then least recently served.
    fn dispatch(&self, s: &mut State) {
        while s.busy < self.slots {
            let next = s
                .clients
                .iter()
                .filter(|(_, c)| !c.waiting.is_empty() && c.running < self.per_client)
                .min_by_key(|(_, c)| (c.running, c.served))
                .map(|(ip, _)| *ip);
            let Some(ip) = next else { return };
            let (_, tx) = s.clients.get_mut(&ip).and_then(|c| c.waiting.pop_front()).expect("chosen for its waiters");
            s.grant(ip);
            if tx.send(()).is_err() {
                // Its waiter is gone without having removed itself; cannot happen, but the slot
                // must not leak if it does.
                s.busy -= 1;
                if let Some(c) = s.clients.get_mut(&ip) {
                    c.running -= 1;
                }
                s.forget_if_idle(ip);
            }
        }
    }
}

impl FairPool {
    /// `slots` checks at once in all, at most `per_client` of them for one address.
    pub fn new(slots: usize, per_client: usize) -> FairPool {
        FairPool { inner: Arc::new(Inner { slots: slots.max(1), per_client: per_client.max(1), state: Mutex::default() }) }
    }

    /// Waits for a slot for `client` (an address as the throttle counts it).
    pub async fn acquire(&self, client: IpAddr) -> Permit {
        let (id, rx) = {
            let mut s = self.inner.state.lock();
            let running = s.clients.get(&client).map_or(0, |c| c.running);
            if s.busy < self.inner.slots && running < self.inner.per_client {
                // Free slots with nobody eligible waiting (dispatch hands them out at once).
                s.grant(client);
                return Permit { inner: self.inner.clone(), client };
            }
            s.next += 1;
            let id = s.next;
            let (tx, rx) = oneshot::channel();
            s.clients.entry(client).or_default().waiting.push_back((id, tx));
            (id, rx)
        };
        let mut waiting = Waiting { inner: &self.inner, client, id, granted: false };
        // The sender is only ever dropped after sending (or by our own Drop), so an error here
        // would mean the pool itself is gone; treat the slot as ours either way, since the
        // accounting was done when it was handed over.
        let _ = rx.await;
        waiting.granted = true;
        Permit { inner: self.inner.clone(), client }
    }

    #[cfg(test)]
    fn running(&self) -> (usize, usize) {
        let s = self.inner.state.lock();
        (s.busy, s.clients.values().map(|c| c.waiting.len()).sum())
    }
}

/// Does `password` match `stored` (a bcrypt hash, `None` for an unknown user)? A mismatch
/// costs the bcrypt work of `max_cost` whatever the entry's cost, so that neither an unknown
/// user nor the cost of a user's hash shows in the time a wrong password takes. A match
/// returns as soon as it is known: it reveals nothing the answer does not.
pub fn verify_evenly(password: &str, stored: Option<&str>, max_cost: u32) -> bool {
    let (matched, cost) = match stored {
        Some(hash) => (bcrypt::verify(password, hash).unwrap_or(false), crate::auth::htpasswd::hash_cost(hash).unwrap_or(max_cost)),
        None => (false, 0),
    };
    if matched {
        return true;
    }
    if cost == 0 {
        std::hint::black_box(bcrypt::hash_with_salt(password, max_cost, [0; 16]).ok());
        return false;
    }
    // bcrypt's work doubles with each step of cost, so hashing once at each cost from the
    // entry's up to max_cost - 1 adds up to the work of max_cost less what the entry took.
    for c in cost..max_cost {
        std::hint::black_box(bcrypt::hash_with_salt(password, c, [0; 16]).ok());
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_newcomer_is_served_before_a_flooding_address() {
        let pool = Arc::new(FairPool::new(2, 2));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let p1 = pool.acquire(a).await;
        let p2 = pool.acquire(a).await;
        // Ten more from `a` queue up, then one from `b`.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for who in std::iter::repeat_n(a, 10).chain([b]) {
            let (pool, tx) = (pool.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let p = pool.acquire(who).await;
                tx.send((who, p)).unwrap();
            }));
            tokio::task::yield_now().await;
        }
        while pool.running().1 < 11 {
            tokio::task::yield_now().await;
        }
        drop(p1);
        let (first, p) = rx.recv().await.unwrap();
        assert_eq!(first, b, "the address with nothing running goes first");
        drop((p, p2));
        for _ in 0..10 {
            let (who, p) = rx.recv().await.unwrap();
            assert_eq!(who, a);
            drop(p);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(pool.running(), (0, 0));
        assert!(pool.inner.state.lock().clients.is_empty());
    }

    #[tokio::test]
    async fn one_address_never_runs_more_than_its_cap() {
        let pool = Arc::new(FairPool::new(4, 2));
        let a = ip("192.0.2.1");
        let _p1 = pool.acquire(a).await;
        let _p2 = pool.acquire(a).await;
        let third = tokio::time::timeout(Duration::from_millis(50), pool.acquire(a)).await;
        assert!(third.is_err(), "a third check from one address waits although slots are free");
        // The cancelled waiter left the queue; others still get the free slots.
        assert_eq!(pool.running(), (2, 0));
        let _other = pool.acquire(ip("192.0.2.2")).await;
        assert_eq!(pool.running(), (3, 0));
    }

    #[test]
    fn wrong_passwords_cost_the_same_whatever_the_entry() {
        let low = bcrypt::hash("pw", 4).unwrap();
        let high = bcrypt::hash("pw", 8).unwrap();
        assert!(verify_evenly("pw", Some(&low), 8) && verify_evenly("pw", Some(&high), 8));
        assert!(!verify_evenly("nope", Some(&low), 8) && !verify_evenly("pw", None, 8));
        // The fastest of several runs: other work on a shared machine only ever adds time.
        let fastest = |f: &dyn Fn()| {
            let mut t: Vec<Duration> = (0..9)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed()
                })
                .collect();
            t.sort();
            t[0]
        };
        let unknown = fastest(&|| assert!(!verify_evenly("x", None, 8)));
        let cheap = fastest(&|| assert!(!verify_evenly("x", Some(&low), 8)));
        // Cost 4 against 8 is a 16-fold difference without the padding.
        let ratio = cheap.as_secs_f64() / unknown.as_secs_f64();
        assert!((0.7..1.4).contains(&ratio), "{cheap:?} against {unknown:?}");
    }
}
