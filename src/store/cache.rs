//! The bound on mirrored content: least recently used digests go first. Only digests no hosted
//! repository holds are tracked (hosted content is never evicted and does not count). Readers
//! hold open file handles, so removing a file never cuts a transfer in progress; fills only
//! enter the accounting once committed. Eviction runs on a blocking thread, one pass at a
//! time, never on the request that pushed the cache over its bound.
//!
//! Pinned digests (an upstream's prefetched content with `pin = true`) count against the
//! bound but are kept out of the recency order, so eviction never reaches them. Pins live in
//! memory: prefetching sets them again after every start.

use super::error::Result;
use super::Store;
use crate::oci::Digest;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Lru {
    inner: Mutex<LruInner>,
    max: AtomicU64,
    evicting: AtomicBool,
}

impl Default for Lru {
    fn default() -> Self {
        Lru { inner: Mutex::default(), max: AtomicU64::new(u64::MAX), evicting: AtomicBool::new(false) }
    }
}

#[derive(Default)]
struct LruInner {
    entries: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    /// Bytes of everything accounted, pinned included.
    bytes: u64,
    tick: u64,
    /// What eviction must not remove, whether accounted yet or not.
    pins: HashSet<Digest>,
    /// Accounted pinned digests and their sizes: outside `order`.
    pinned: HashMap<Digest, u64>,
}

impl LruInner {
    fn next_tick(&mut self) -> u64 {
        self.tick = self.tick.max(LIVE_TICKS) + 1;
        self.tick
    }
}

/// Live uses count from here; entries seeded from the records at start-up sit below, so they
/// are always older than anything used since.
const LIVE_TICKS: u64 = 1 << 40;

impl Lru {
    /// Adds a digest found at start-up at recency `ordinal` (0 = least recent), unless it was
    /// used live meanwhile.
    fn seed(&self, d: &Digest, size: u64, ordinal: u64) {
        let mut g = self.inner.lock();
        if g.entries.contains_key(d) || g.pinned.contains_key(d) {
            return;
        }
        if g.pins.contains(d) {
            g.pinned.insert(d.clone(), size);
            g.bytes += size;
            return;
        }
        let mut tick = ordinal.min(LIVE_TICKS - 1);
        // Seeding again (a cluster's leader recounting what other nodes filled) must not take
        // the place of an entry already in the order.
        while g.order.contains_key(&tick) && tick < LIVE_TICKS - 1 {
            tick += 1;
        }
        g.entries.insert(d.clone(), (size, tick));
        g.order.insert(tick, d.clone());
        g.bytes += size;
    }

    fn touch(&self, d: &Digest, size: u64) {
        let mut g = self.inner.lock();
        if g.pins.contains(d) {
            if let Some(old) = g.pinned.insert(d.clone(), size) {
                g.bytes -= old;
            }
            g.bytes += size;
            return;
        }
        let tick = g.next_tick();
        if let Some((old_size, old_tick)) = g.entries.insert(d.clone(), (size, tick)) {
            g.order.remove(&old_tick);
            g.bytes -= old_size;
        }
        g.order.insert(tick, d.clone());
        g.bytes += size;
    }

    pub(super) fn remove(&self, d: &Digest) {
        let mut g = self.inner.lock();
        if let Some((size, tick)) = g.entries.remove(d) {
            g.order.remove(&tick);
            g.bytes -= size;
        }
        if let Some(size) = g.pinned.remove(d) {
            g.bytes -= size;
        }
    }

    /// Replaces the pinned set: newly pinned digests leave the recency order, unpinned ones
    /// enter it as just used (they were kept on purpose until now).
    fn set_pins(&self, pins: HashSet<Digest>) {
        let mut g = self.inner.lock();
        let unpinned: Vec<Digest> = g.pinned.keys().filter(|d| !pins.contains(*d)).cloned().collect();
        for d in unpinned {
            let size = g.pinned.remove(&d).unwrap_or(0);
            let tick = g.next_tick();
            g.entries.insert(d.clone(), (size, tick));
            g.order.insert(tick, d);
        }
        for d in &pins {
            if let Some((size, tick)) = g.entries.remove(d) {
                g.order.remove(&tick);
                g.pinned.insert(d.clone(), size);
            }
        }
        g.pins = pins;
    }

    fn pinned_bytes(&self) -> u64 {
        self.inner.lock().pinned.values().sum()
    }

    fn is_pinned(&self, d: &Digest) -> bool {
        self.inner.lock().pins.contains(d)
    }

    fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    fn oldest(&self) -> Option<Digest> {
        self.inner.lock().order.values().next().cloned()
    }
}

impl Store {
    fn hosted_holds(&self, d: &Digest) -> Result<bool> {
        Ok(self.meta.holders(d)?.iter().any(|r| !self.is_cache_repo(r)))
    }

    /// Bounds mirrored content to `max` bytes from now on. With a bound, the recency order is
    /// rebuilt from the recorded use times on a thread of its own (a walk of the blob records),
    /// so start-up does not wait for it; until it is done eviction sees fewer bytes than there
    /// are, and catches up when it is.
    pub fn set_cache_limit(self: &Arc<Self>, max: Option<u64>) -> Result<()> {
        self.lru.max.store(max.unwrap_or(u64::MAX), Ordering::Relaxed);
        if max.is_none() {
            return Ok(());
        }
        let s = self.clone();
        std::thread::Builder::new().name("berth-cache-index".into()).spawn(move || {
            if let Err(e) = s.rebuild_lru() {
                tracing::warn!(error = %e, "rebuilding the mirror cache's recency order");
            }
        })?;
        Ok(())
    }

    /// Blocking: reads every blob record once.
    pub fn rebuild_lru(&self) -> Result<()> {
        let mut cached: Vec<(u64, Digest, u64)> = Vec::new();
        let mut all = Vec::new();
        self.meta.blobs(&mut |d, r| all.push((d, r)))?;
        for (d, r) in all {
            let holders = self.meta.holders(&d)?;
            if !holders.is_empty() && holders.iter().all(|h| self.is_cache_repo(h)) {
                cached.push((r.used_ms, d, r.size));
            }
        }
        cached.sort();
        for (i, (_, d, size)) in cached.into_iter().enumerate() {
            self.lru.seed(&d, size, i as u64);
        }
        Ok(())
    }

    /// Puts a use of `d` in the recency order, or takes it out if a hosted repository holds it.
    fn account(&self, d: &Digest) {
        match (self.hosted_holds(d), self.blob_size(d)) {
            (Ok(true), _) => self.lru.remove(d),
            (Ok(false), Ok(Some(size))) => self.lru.touch(d, size),
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "cache accounting"),
            _ => {}
        }
    }

    /// Records a use of mirrored content; past the bound, starts an eviction pass in the
    /// background. Free when no bound is configured.
    pub fn cache_used(self: &Arc<Self>, d: &Digest) {
        let max = self.lru.max.load(Ordering::Relaxed);
        if max == u64::MAX {
            return;
        }
        self.account(d);
        if self.lru.bytes() > max && self.evicts.load(Ordering::Relaxed) && !self.lru.evicting.swap(true, Ordering::AcqRel) {
            let s = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = s.enforce_cache_bound(max) {
                    tracing::warn!(error = %e, "cache eviction failed");
                }
                s.lru.evicting.store(false, Ordering::Release);
            });
        }
    }

    /// Accounts newly filled mirrored content and, past the bound, evicts before returning
    /// (on a blocking thread): a fill announces its end only once the cache is back within
    /// its bound, so the store never holds more than the bound plus the fills in flight.
    pub async fn cache_filled(self: &Arc<Self>, d: &Digest) {
        let max = self.lru.max.load(Ordering::Relaxed);
        if max == u64::MAX {
            return;
        }
        self.account(d);
        if self.lru.bytes() > max && self.evicts.load(Ordering::Relaxed) {
            let s = self.clone();
            if let Err(e) = super::blocking(move || s.enforce_cache_bound(max)).await {
                tracing::warn!(error = %e, "cache eviction failed");
            }
        }
    }

    /// In a cluster only the lease holder evicts, so two nodes never evict the same bytes twice
    /// over; the others still count what they fill.
    pub fn set_evicts(&self, on: bool) {
        self.evicts.store(on, Ordering::Relaxed);
    }

    /// Recounts the cache from the whole index (blobs other nodes filled included) and
    /// enforces the bound. Blocking. Returns the bytes evicted.
    pub fn enforce_cache_bound_from_index(&self) -> Result<u64> {
        let max = self.lru.max.load(Ordering::Relaxed);
        if max == u64::MAX {
            return Ok(0);
        }
        self.rebuild_lru()?;
        if self.lru.bytes() <= max {
            return Ok(0);
        }
        self.enforce_cache_bound(max)
    }

    pub fn cache_bytes(&self) -> u64 {
        self.lru.bytes()
    }

    /// Sets what `owner` (an upstream's prefetch) keeps from eviction, replacing what it kept
    /// before; the store keeps the union over owners.
    pub fn set_pins(&self, owner: &str, digests: HashSet<Digest>) {
        let mut all = self.pins.lock();
        all.insert(owner.to_string(), digests);
        self.lru.set_pins(all.values().flatten().cloned().collect());
    }

    /// Accounted bytes eviction leaves alone.
    pub fn pinned_bytes(&self) -> u64 {
        self.lru.pinned_bytes()
    }

    /// Evicts least recently used mirrored content until the cache is within `max` bytes.
    /// Returns the bytes freed. Blocking.
    pub fn enforce_cache_bound(&self, max: u64) -> Result<u64> {
        let mut freed = 0;
        while self.lru.bytes() > max {
            let Some(d) = self.lru.oldest() else { break };
            self.lru.remove(&d);
            let _g = self.stripe(&d).lock();
            if self.hosted_holds(&d)? {
                continue;
            }
            if self.lru.is_pinned(&d) {
                // Pinned since it was picked: accounted again, as pinned.
                self.account(&d);
                continue;
            }
            let size = self.blob_size(&d)?.unwrap_or(0);
            let res = self.meta.purge_blob(&d);
            self.reads.changed(super::Changed::Everything);
            res?;
            self.manifest_bytes.invalidate(&d);
            let deleted = self.blobs.delete(&d);
            self.meta.swept(std::slice::from_ref(&d))?;
            deleted?;
            freed += size;
            tracing::debug!(digest = %d, size, "evicted from the mirror cache");
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Classes, TagExpect};
    use bytes::Bytes;

    #[tokio::test]
    async fn evicts_least_recently_used_mirrored_content_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.set_classes(Classes { cache_roots: vec!["docker.io".into()], namespaces: vec!["team".into()] }).unwrap();
        s.set_cache_limit(Some(1 << 40)).unwrap();
        s.rebuild_lru().unwrap();
        let put = |repo: &'static str, data: Vec<u8>| {
            let s = s.clone();
            async move {
                let d = Digest::sha256_of(&data);
                s.put_blob_bytes(Bytes::from(data), &d).await.unwrap();
                s.link_blob(repo, &d, None).await.unwrap();
                s.cache_used(&d);
                d
            }
        };
        let a = put("docker.io/library/a", vec![1u8; 100]).await;
        let b = put("docker.io/library/a", vec![2u8; 100]).await;
        let hosted = put("team/app", vec![3u8; 500]).await;
        let shared = put("docker.io/library/a", vec![3u8; 500]).await;
        assert_eq!(hosted, shared);
        assert_eq!(s.cache_bytes(), 200, "hosted content does not count");
        s.cache_used(&a); // a is now more recent than b
        let c = put("docker.io/library/c", vec![4u8; 100]).await;
        assert_eq!(s.enforce_cache_bound(200).unwrap(), 100);
        assert!(s.blob_size(&b).unwrap().is_none(), "least recently used goes first");
        assert!(s.blob_size(&a).unwrap().is_some() && s.blob_size(&c).unwrap().is_some());
        assert!(!s.blob_linked("docker.io/library/a", &b).unwrap());
        s.enforce_cache_bound(0).unwrap();
        assert!(s.blob_size(&hosted).unwrap().is_some(), "hosted content is never evicted");
        // A mirrored manifest goes with its tags.
        let m = Digest::sha256_of(b"{}");
        s.put_manifest(
            "docker.io/library/m",
            &m,
            Bytes::from_static(b"{}"),
            Default::default(),
            vec!["v1".into()],
            TagExpect::Any,
            (vec![], vec![]),
            Arc::new(|_: &str| false),
            None,
            None,
        )
        .await
        .unwrap();
        s.cache_used(&m);
        s.enforce_cache_bound(0).unwrap();
        assert!(s.tag_digest("docker.io/library/m", "v1").unwrap().is_none());
        assert!(s.meta().recount(false).unwrap().is_empty());
    }

    #[tokio::test]
    async fn pinned_content_counts_but_is_never_evicted_until_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.set_classes(Classes { cache_roots: vec!["docker.io".into()], namespaces: vec![] }).unwrap();
        s.set_cache_limit(Some(1 << 40)).unwrap();
        s.rebuild_lru().unwrap();
        let mut ds = Vec::new();
        for i in 0..3u8 {
            let d = Digest::sha256_of(&[i; 100]);
            s.put_blob_bytes(Bytes::from(vec![i; 100]), &d).await.unwrap();
            s.link_blob("docker.io/library/a", &d, None).await.unwrap();
            s.cache_used(&d);
            ds.push(d);
        }
        // The oldest is pinned: eviction takes the next ones instead, and stops when only
        // pinned content is left, however far over the bound.
        s.set_pins("docker.io", [ds[0].clone()].into());
        assert_eq!((s.cache_bytes(), s.pinned_bytes()), (300, 100));
        assert_eq!(s.enforce_cache_bound(150).unwrap(), 200);
        assert!(s.blob_size(&ds[0]).unwrap().is_some());
        assert!(s.blob_size(&ds[1]).unwrap().is_none() && s.blob_size(&ds[2]).unwrap().is_none());
        assert_eq!(s.enforce_cache_bound(0).unwrap(), 0);
        // A rebuilt order (a restart, a cluster's recount) keeps the pins.
        s.rebuild_lru().unwrap();
        assert_eq!(s.enforce_cache_bound(0).unwrap(), 0);
        s.set_pins("docker.io", Default::default());
        assert_eq!((s.cache_bytes(), s.pinned_bytes()), (100, 0));
        assert_eq!(s.enforce_cache_bound(0).unwrap(), 100);
        assert!(s.blob_size(&ds[0]).unwrap().is_none());
    }
}
