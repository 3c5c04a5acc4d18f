//! The bound on mirrored content: least recently used digests go first. Only digests no hosted
//! repository links are tracked (hosted content is never evicted and does not count). Readers
//! hold open file handles, so removing a file never cuts a transfer in progress; fills are
//! temp files and only enter the accounting once committed.

use super::Store;
use crate::oci::Digest;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io;

pub struct Lru {
    inner: Mutex<LruInner>,
    max: std::sync::atomic::AtomicU64,
}

impl Default for Lru {
    fn default() -> Self {
        Lru { inner: Mutex::default(), max: std::sync::atomic::AtomicU64::new(u64::MAX) }
    }
}

#[derive(Default)]
struct LruInner {
    entries: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    bytes: u64,
    tick: u64,
}

impl Lru {
    pub fn touch(&self, d: &Digest, size: u64) {
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        if let Some((old_size, old_tick)) = g.entries.insert(d.clone(), (size, tick)) {
            g.order.remove(&old_tick);
            g.bytes -= old_size;
        }
        g.order.insert(tick, d.clone());
        g.bytes += size;
    }

    pub fn remove(&self, d: &Digest) {
        let mut g = self.inner.lock();
        if let Some((size, tick)) = g.entries.remove(d) {
            g.order.remove(&tick);
            g.bytes -= size;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    fn oldest(&self) -> Option<Digest> {
        self.inner.lock().order.values().next().cloned()
    }
}

impl Store {
    /// Repositories under these first components are mirrored (cache class).
    pub fn set_cache_roots(&self, roots: Vec<String>) {
        *self.cache_roots.write() = roots;
        self.rebuild_lru();
    }

    pub fn is_cache_repo(&self, repo: &str) -> bool {
        let first = repo.split('/').next().unwrap_or_default();
        self.cache_roots.read().iter().any(|r| r == first)
    }

    fn hosted_links(&self, d: &Digest) -> bool {
        self.repos.read().iter().any(|(name, r)| !self.is_cache_repo(name) && (r.blobs.contains(d) || r.manifests.contains_key(d)))
    }

    fn rebuild_lru(&self) {
        let mut digests: Vec<(std::time::SystemTime, Digest, u64)> = Vec::new();
        let cached: Vec<Digest> = {
            let repos = self.repos.read();
            let mut v: Vec<Digest> = repos
                .iter()
                .filter(|(name, _)| self.is_cache_repo(name))
                .flat_map(|(_, r)| r.blobs.iter().chain(r.manifests.keys()).cloned().collect::<Vec<_>>())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        for d in cached {
            if self.hosted_links(&d) {
                continue;
            }
            if let Ok(m) = std::fs::metadata(self.blob_path(&d)) {
                // Access times are often disabled (noatime); modification time is the best
                // persisted approximation of recency.
                digests.push((m.accessed().or_else(|_| m.modified()).unwrap_or(std::time::UNIX_EPOCH), d, m.len()));
            }
        }
        digests.sort();
        for (_, d, size) in digests {
            self.lru.touch(&d, size);
        }
    }

    /// Bounds mirrored content to `max` bytes from now on.
    pub fn set_cache_limit(&self, max: Option<u64>) {
        self.lru.max.store(max.unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a use of mirrored content and evicts what the bound no longer allows. Called
    /// on every hit and after every fill, so eviction keeps pace with fills.
    pub fn cache_used(&self, d: &Digest) {
        let max = self.lru.max.load(std::sync::atomic::Ordering::Relaxed);
        if max == u64::MAX {
            // Unbounded: no accounting on the hit path (it scans repositories and stats the blob).
            return;
        }
        if self.hosted_links(d) {
            self.lru.remove(d);
            return;
        }
        if let Some(size) = self.blob_size(d) {
            self.lru.touch(d, size);
        }
        if self.lru.bytes() > max {
            if let Err(e) = self.enforce_cache_bound(max) {
                tracing::warn!(error = %e, "cache eviction failed");
            }
        }
    }

    /// Bytes and digests of the unique content linked in repositories `matches` selects.
    pub fn usage_of(&self, matches: &dyn Fn(&str) -> bool) -> (u64, std::collections::HashSet<Digest>) {
        let digests: std::collections::HashSet<Digest> = self
            .repos
            .read()
            .iter()
            .filter(|(name, _)| matches(name))
            .flat_map(|(_, r)| r.blobs.iter().chain(r.manifests.keys()).cloned().collect::<Vec<_>>())
            .collect();
        (digests.iter().filter_map(|d| self.blob_size(d)).sum(), digests)
    }

    pub fn cache_bytes(&self) -> u64 {
        self.lru.bytes()
    }

    /// Evicts least recently used mirrored content until the cache is within `max` bytes.
    /// Returns the bytes freed.
    pub fn enforce_cache_bound(&self, max: u64) -> io::Result<u64> {
        let mut freed = 0;
        while self.lru.bytes() > max {
            let Some(d) = self.lru.oldest() else { break };
            self.lru.remove(&d);
            if self.hosted_links(&d) {
                continue;
            }
            let repos: Vec<String> = self
                .repos
                .read()
                .iter()
                .filter(|(_, r)| r.blobs.contains(&d) || r.manifests.contains_key(&d))
                .map(|(n, _)| n.clone())
                .collect();
            for r in repos {
                self.delete_manifest(&r, &d)?;
                self.unlink_blob(&r, &d)?;
            }
            let size = self.blob_size(&d).unwrap_or(0);
            self.remove_blob_file(&d)?;
            freed += size;
            tracing::debug!(digest = %d, size, "evicted from the mirror cache");
        }
        Ok(freed)
    }

    pub(crate) fn remove_blob_file(&self, d: &Digest) -> io::Result<()> {
        self.manifest_bytes.invalidate(d);
        match std::fs::remove_file(self.blob_path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn evicts_least_recently_used_mirrored_content_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.set_cache_roots(vec!["docker.io".into()]);
        s.set_cache_limit(Some(1 << 40));
        let put = |repo: &str, data: &[u8]| {
            let d = Digest::sha256_of(data);
            s.put_blob_bytes(data, &d).unwrap();
            s.link_blob(repo, &d).unwrap();
            s.cache_used(&d);
            d
        };
        let a = put("docker.io/library/a", &[1u8; 100]);
        let b = put("docker.io/library/a", &[2u8; 100]);
        let hosted = put("team/app", &[3u8; 500]);
        let shared = put("docker.io/library/a", &[3u8; 500]);
        assert_eq!(hosted, shared);
        assert_eq!(s.cache_bytes(), 200, "hosted content does not count");
        s.cache_used(&a); // a is now more recent than b
        let c = put("docker.io/library/c", &[4u8; 100]);
        assert_eq!(s.enforce_cache_bound(200).unwrap(), 100);
        assert!(s.blob_size(&b).is_none(), "least recently used goes first");
        assert!(s.blob_size(&a).is_some() && s.blob_size(&c).is_some());
        assert!(!s.blob_linked("docker.io/library/a", &b));
        s.enforce_cache_bound(0).unwrap();
        assert!(s.blob_size(&hosted).is_some(), "hosted content is never evicted");
        // A mirrored manifest goes with its tags.
        let m = Digest::sha256_of(b"{}");
        s.put_manifest("docker.io/library/m", &m, Bytes::from_static(b"{}"), Default::default(), Some("v1")).unwrap();
        s.cache_used(&m);
        s.enforce_cache_bound(0).unwrap();
        assert!(s.tag_digest("docker.io/library/m", "v1").is_none());
    }
}
