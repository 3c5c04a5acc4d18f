//! Storage: the interface ([`traits`]: a content-addressed [`BlobStore`] and a [`MetaStore`]),
//! its local backend ([`local`]: files plus redb), and what is written once against the
//! interface: verify-then-publish, upload sessions, GC, fsck, the cache bound and usage.
//! Blocking work (hashing, fsync, commits, walks) runs on blocking threads; the async workers
//! only do point reads. Never imports pingora, the registry or the upstream client.

mod cache;
pub mod error;
pub mod fsck;
pub mod gc;
pub mod local;
pub mod outbox;
pub mod policy;
pub mod s3;
pub mod traits;
pub mod upload;

pub use error::StoreError;
pub use traits::{BlobBody, BlobStore, Classes, ManifestMeta, MetaStore, RepoSummary, TagExpect, Usage};

use crate::oci::{Digest, Hasher};
use bytes::Bytes;
use error::Result;
use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use traits::{BlobTemp, ManifestPut};

/// How long a sweep (GC, eviction) may go on deleting the content it forgot. Writers on other
/// nodes wait for its end before storing that content again, at most this long; the sweep
/// stops deleting at half of it, so clocks a little apart still keep the two apart.
pub const SWEEP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Feeds everything `r` yields into `h`; returns how many bytes. Blocking.
pub(crate) fn hash_into(r: &mut dyn std::io::Read, h: &mut Hasher) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Runs blocking storage work off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Limits of the store that come from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub uploads_per_client: usize,
    pub uploads_per_repository: usize,
    /// The metadata database's page cache.
    pub meta_cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { uploads_per_client: 128, uploads_per_repository: 512, meta_cache_bytes: 64 << 20 }
    }
}

const STRIPES: usize = 64;

pub struct Store {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    /// Manifest bodies are small and hot; keep them in memory, bounded by bytes.
    manifest_bytes: moka::sync::Cache<Digest, Bytes>,
    pub uploads: upload::Uploads,
    lru: cache::Lru,
    classes: RwLock<Classes>,
    /// Publishing a blob and sweeping it take the digest's stripe, so a sweep never deletes
    /// a file that a writer has just published or is reusing.
    blob_locks: Vec<Mutex<()>>,
    /// One collection at a time.
    gc_running: tokio::sync::Mutex<()>,
    reads: ReadCache,
    /// The bucket and the local hot tier, with the S3 backend (readiness, metrics).
    bucket: Option<(Arc<s3::Bucket>, Arc<s3::blobs::HotTier>)>,
    /// The metadata journal, with the S3 backend (the cluster follows and announces it).
    journal: std::sync::OnceLock<Arc<s3::journal::JournalMeta>>,
    /// Whether this node enforces the cache bound (in a cluster, only the lease holder).
    evicts: std::sync::atomic::AtomicBool,
    /// Digests kept from eviction, by who asked (an upstream's prefetch).
    pins: Mutex<std::collections::HashMap<String, std::collections::HashSet<Digest>>>,
}

/// Tags and manifest records as the metadata store last said, for the hot read path (a
/// lookup in the database costs a fifth of a manifest GET). Never ahead of the store: an entry
/// is only inserted if no write has completed since the read that produced it began
/// (`generation`), and every write invalidates what it changed after it commits, under the
/// same lock, so a stale read can neither be inserted after the invalidation nor survive it.
struct ReadCache {
    tags: moka::sync::Cache<String, Digest>,
    manifests: moka::sync::Cache<String, Arc<ManifestMeta>>,
    generation: std::sync::atomic::AtomicU64,
    lock: Mutex<()>,
}

/// What a write changed, for the read cache.
enum Changed<'a> {
    Tags(&'a str, &'a [String]),
    Manifest(&'a str, &'a Digest),
    /// Deletions of manifests (and the tags pointing at them): rare, so everything goes.
    Everything,
}

/// Roughly the heap a manifest record holds.
fn meta_weight(m: &ManifestMeta) -> usize {
    let annotations = m.annotations.as_ref().map_or(0, |a| a.iter().map(|(k, v)| k.len() + v.to_string().len() + 64).sum());
    m.media_type.len() + m.subject.as_ref().map_or(0, String::len) + m.artifact_type.as_ref().map_or(0, String::len) + annotations
}

use local::meta::k2 as key2;

impl ReadCache {
    fn new() -> ReadCache {
        ReadCache {
            // Bounded by bytes, not entries: names and annotations are the client's to choose.
            tags: moka::sync::Cache::builder()
                .weigher(|k: &String, _v: &Digest| (k.len() + 160).try_into().unwrap_or(u32::MAX))
                .max_capacity(32 << 20)
                .build(),
            manifests: moka::sync::Cache::builder()
                .weigher(|k: &String, v: &Arc<ManifestMeta>| (k.len() + 160 + meta_weight(v)).try_into().unwrap_or(u32::MAX))
                .max_capacity(32 << 20)
                .build(),
            generation: std::sync::atomic::AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Inserts what a read that began at `generation` found, unless a write completed since.
    fn fill(&self, generation: u64, insert: impl FnOnce()) {
        let _g = self.lock.lock();
        if self.generation() == generation {
            insert();
        }
    }

    /// Called after a write has committed.
    fn changed(&self, what: Changed<'_>) {
        let _g = self.lock.lock();
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        match what {
            Changed::Tags(repo, tags) => {
                for t in tags {
                    self.tags.invalidate(&key2(repo, t));
                }
            }
            Changed::Manifest(repo, d) => self.manifests.invalidate(&key2(repo, &d.to_string())),
            Changed::Everything => {
                self.tags.invalidate_all();
                self.manifests.invalidate_all();
            }
        }
    }
}

/// A blob being written: backend temp plus running hash. Nothing is visible under a digest
/// until [`Store::commit`] has verified it.
pub struct BlobWriter {
    temp: Option<Box<dyn BlobTemp>>,
    hasher: Option<Hasher>,
    written: u64,
}

impl BlobWriter {
    /// Appends on a blocking thread (the write and the hash of the chunk).
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let (mut temp, mut hasher) = match (self.temp.take(), self.hasher.take()) {
            (Some(t), Some(h)) => (t, h),
            _ => return Err(StoreError::Meta("write after a failed write".into())),
        };
        let n = data.len() as u64;
        let (temp, hasher) = blocking(move || {
            temp.write(&data)?;
            hasher.update(&data);
            Ok((temp, hasher))
        })
        .await?;
        self.written += n;
        self.temp = Some(temp);
        self.hasher = Some(hasher);
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// A read handle on what has been written so far.
    pub fn follower(&self) -> Result<std::fs::File> {
        self.temp.as_ref().ok_or_else(|| StoreError::Meta("writer failed".into()))?.follower()
    }
}

impl Store {
    /// Opens (or creates) the local store under `root`, importing a 0.1 layout if present.
    pub fn open(root: &Path) -> Result<Arc<Store>> {
        Self::open_with_limits(root, Limits::default())
    }

    pub fn open_with_limits(root: &Path, limits: Limits) -> Result<Arc<Store>> {
        let blobs = local::LocalBlobs::open(root)?;
        let meta = local::meta::RedbMeta::open(&root.join("meta.redb"), limits.meta_cache_bytes)?;
        local::migrate::run(root, &blobs, &meta)?;
        Self::with_backends(Arc::new(blobs), Arc::new(meta), limits)
    }

    /// Opens the S3 backend: the bucket is the truth; `root` holds the hot tier (bounded by
    /// `hot_bytes`) and the local metadata index, both rebuilt from the bucket if lost. The
    /// bucket must answer at start (the index catches up from its journal).
    pub fn open_s3(root: &Path, settings: &s3::S3Settings, hot_bytes: u64, limits: Limits) -> Result<Arc<Store>> {
        std::fs::create_dir_all(root)?;
        let bucket = s3::Bucket::new(settings, std::time::Duration::from_secs(20))?;
        let node = s3::node_name();
        bucket.probe(&node).map_err(StoreError::Unavailable)?;
        let hot = s3::blobs::HotTier::open(root, hot_bytes)?;
        let meta = s3::journal::JournalMeta::open(
            &root.join("index.redb"),
            limits.meta_cache_bytes,
            bucket.clone(),
            &node,
            settings.snapshot_every,
        )?;
        let blobs = s3::blobs::S3Blobs::new(bucket.clone(), hot.clone());
        let store = Self::build(Arc::new(blobs), meta.clone(), limits, Some((bucket, hot)))?;
        let _ = store.journal.set(meta.clone());
        let weak = Arc::downgrade(&store);
        meta.on_replay(Box::new(move || {
            if let Some(s) = weak.upgrade() {
                // Tags and manifests changed by another node: forget what was cached.
                s.reads.changed(Changed::Everything);
            }
        }));
        meta.follow(std::time::Duration::from_secs(1));
        Ok(store)
    }

    /// The bucket behind the store, if it is on S3.
    pub fn bucket(&self) -> Option<&Arc<s3::Bucket>> {
        self.bucket.as_ref().map(|(b, _)| b)
    }

    /// The metadata journal (S3 only).
    pub fn journal(&self) -> Option<&Arc<s3::journal::JournalMeta>> {
        self.journal.get()
    }

    /// Bytes of local copies in the hot tier (S3 only).
    pub fn hot_tier_bytes(&self) -> Option<u64> {
        self.bucket.as_ref().map(|(_, h)| h.used())
    }

    /// Whether the storage answers (always, for local disk).
    pub fn storage_ready(&self) -> bool {
        self.bucket.as_ref().is_none_or(|(b, _)| b.healthy())
    }

    pub fn with_backends(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: Limits) -> Result<Arc<Store>> {
        Self::build(blobs, meta, limits, None)
    }

    fn build(
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        limits: Limits,
        bucket: Option<(Arc<s3::Bucket>, Arc<s3::blobs::HotTier>)>,
    ) -> Result<Arc<Store>> {
        let uploads = upload::Uploads::new(blobs.clone(), meta.clone(), &limits)?;
        Ok(Arc::new(Store {
            blobs,
            meta,
            manifest_bytes: moka::sync::Cache::builder()
                .weigher(|_k: &Digest, v: &Bytes| v.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(64 * 1024 * 1024)
                .build(),
            uploads,
            lru: cache::Lru::default(),
            classes: RwLock::new(Classes::default()),
            blob_locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            gc_running: tokio::sync::Mutex::new(()),
            reads: ReadCache::new(),
            bucket,
            journal: std::sync::OnceLock::new(),
            evicts: std::sync::atomic::AtomicBool::new(true),
            pins: Mutex::default(),
        }))
    }

    /// The metadata store itself, for reads the facade does not offer. Writes through it
    /// bypass the read cache: tests and tools only.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    fn stripe_index(&self, d: &Digest) -> usize {
        let h = d.hex().as_bytes();
        (u16::from_str_radix(std::str::from_utf8(&h[..4]).unwrap_or("0"), 16).unwrap_or(0) as usize) % STRIPES
    }

    fn stripe(&self, d: &Digest) -> &Mutex<()> {
        &self.blob_locks[self.stripe_index(d)]
    }

    /// Tells the store which repositories are mirrored and which namespaces are hosted.
    pub fn set_classes(&self, classes: Classes) -> Result<()> {
        self.meta.set_classes(classes.clone())?;
        *self.classes.write() = classes;
        Ok(())
    }

    pub fn is_cache_repo(&self, repo: &str) -> bool {
        self.classes.read().is_cache(repo)
    }

    /// The accounting group (hosted namespace) of a repository.
    pub fn group_of(&self, repo: &str) -> String {
        self.classes.read().group(repo)
    }

    // ---- blobs ----

    /// Size of a committed blob, if the store has it. A point read.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        Ok(self.meta.blob(d)?.map(|b| b.size))
    }

    /// A committed blob, whole or the `(first, last)` bytes of it (see [`BlobStore::open`]).
    pub fn open_blob(&self, d: &Digest, range: Option<(u64, u64)>) -> Result<Option<BlobBody>> {
        let Some(rec) = self.meta.blob(d)? else { return Ok(None) };
        self.blobs.open(d, rec.size, range)
    }

    /// A writer for content expected to hash to `expected` ([`Store::commit`] verifies it).
    pub async fn writer(&self, expected: &Digest) -> Result<BlobWriter> {
        self.writer_with(expected, false).await
    }

    /// A writer for content another node is publishing at the same time (see
    /// [`BlobStore::create_deferred`]).
    pub async fn writer_with(&self, expected: &Digest, deferred: bool) -> Result<BlobWriter> {
        let (blobs, d) = (self.blobs.clone(), expected.clone());
        let temp = blocking(move || if deferred { blobs.create_deferred(&d) } else { blobs.create(&d) }).await?;
        Ok(BlobWriter { temp: Some(temp), hasher: Some(Hasher::new(expected.algorithm())), written: 0 })
    }

    /// Verifies a written blob against `expected` and publishes it; with `link`, links it into
    /// that repository (quota-checked) in the same step. A mismatch stores nothing.
    pub async fn commit(self: &Arc<Self>, mut w: BlobWriter, expected: &Digest, link: Option<(&str, Option<u64>)>) -> Result<u64> {
        let (temp, hasher) = match (w.temp.take(), w.hasher.take()) {
            (Some(t), Some(h)) => (t, h),
            _ => return Err(StoreError::Meta("commit after a failed write".into())),
        };
        let written = w.written;
        let (s, d) = (self.clone(), expected.clone());
        let link = link.map(|(r, q)| (r.to_string(), q));
        blocking(move || {
            let actual = hasher.finish();
            if actual != d {
                return Err(StoreError::DigestMismatch { expected: d, actual });
            }
            s.publish(&d, written, link.as_ref().map(|(r, q)| (r.as_str(), *q)), move |d| temp.publish(d))?;
            Ok(written)
        })
        .await
    }

    /// Publishes verified content under `d` (or reuses the copy already there, refreshing its
    /// grace period) and records it, under the digest's stripe lock. Blocking.
    fn publish(&self, d: &Digest, size: u64, link: Option<(&str, Option<u64>)>, put: impl FnOnce(&Digest) -> Result<()>) -> Result<()> {
        let _g = self.stripe(d).lock();
        // Reusing recorded content is decided again where the reuse is recorded: a sweep on
        // another node may forget it in between, and then the content is stored anew.
        for _ in 0..3 {
            self.meta.await_sweeps(d)?;
            if self.meta.blob(d)?.is_none() || self.blobs.stat(d)?.is_none() {
                break;
            }
            match self.meta.reuse_blob(d, size, now_ms(), link) {
                Ok(true) => return Ok(()),
                Ok(false) | Err(StoreError::Sweeping(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        put(d)?;
        match self.meta.record_blob(d, size, now_ms(), link) {
            Ok(()) => Ok(()),
            Err(StoreError::Sweeping(_)) => {
                // A sweep elsewhere forgot this content while it was being stored again: its
                // delete may have come before the store or after. Once the sweep is done the
                // bucket says which.
                self.meta.await_sweeps(d)?;
                if self.blobs.stat_stored(d)?.is_none() {
                    return Err(StoreError::Sweeping(d.clone()));
                }
                self.meta.record_blob(d, size, now_ms(), link)
            }
            Err(e) => {
                if self.meta.blob(d)?.is_none() {
                    // Refused (quota): take back the file nothing records.
                    let _ = self.blobs.delete(d);
                }
                Err(e)
            }
        }
    }

    /// Stores small content (a manifest's bytes) as a blob, optionally linking it.
    pub async fn put_blob_bytes(self: &Arc<Self>, data: Bytes, d: &Digest) -> Result<()> {
        if self.meta.blob(d)?.is_some() {
            // Reuse refreshes the grace period; a sweep that won the race means store it again.
            let (m, dd) = (self.meta.clone(), d.clone());
            if blocking(move || m.touch_blob(&dd, now_ms())).await? {
                return Ok(());
            }
        }
        let mut w = self.writer(d).await?;
        w.write(data).await?;
        self.commit(w, d, None).await?;
        Ok(())
    }

    /// Links a committed blob into `repo`, refreshing its grace period.
    pub async fn link_blob(self: &Arc<Self>, repo: &str, d: &Digest, quota: Option<u64>) -> Result<()> {
        let (s, repo, d) = (self.clone(), repo.to_string(), d.clone());
        blocking(move || {
            let _g = s.stripe(&d).lock();
            s.meta.link(&repo, &d, now_ms(), quota)
        })
        .await
    }

    /// A link or a manifest of `repo` names `d`. A point read.
    pub fn blob_linked(&self, repo: &str, d: &Digest) -> Result<bool> {
        self.meta.holds(repo, d)
    }

    pub async fn unlink_blob(self: &Arc<Self>, repo: &str, d: &Digest) -> Result<bool> {
        let (m, repo, d) = (self.meta.clone(), repo.to_string(), d.clone());
        blocking(move || m.unlink(&repo, &d)).await
    }

    // ---- manifests and tags ----

    /// Stores a manifest's exact bytes, records it and points `tags` at it in one transaction
    /// (see [`ManifestPut`]). Visible only once its bytes are durable. `event` (an outbox
    /// entry) is recorded with it: in the same transaction where the metadata store keeps the
    /// outbox, right after it otherwise; either way it is durable when this returns Ok.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_manifest(
        self: &Arc<Self>,
        repo: &str,
        d: &Digest,
        bytes: Bytes,
        meta: ManifestMeta,
        tags: Vec<String>,
        expect: TagExpect,
        refs: (Vec<Digest>, Vec<Digest>),
        immutable: Arc<dyn Fn(&str) -> bool + Send + Sync>,
        quota: Option<u64>,
        event: Option<(outbox::OutboxRef, Vec<u8>)>,
    ) -> Result<()> {
        // Read-only checks first, so that refused input stores nothing; the transaction below
        // checks again, atomically with the write.
        for b in &refs.0 {
            if !self.meta.holds(repo, b)? {
                return Err(StoreError::NotInRepo { repo: repo.to_string(), what: "blob", digest: b.clone() });
            }
        }
        for c in &refs.1 {
            if self.meta.manifest(repo, c)?.is_none() {
                return Err(StoreError::NotInRepo { repo: repo.to_string(), what: "manifest", digest: c.clone() });
            }
        }
        for t in &tags {
            if let Some(cur) = self.meta.tag(repo, t)? {
                if cur.digest != *d && immutable(t) {
                    return Err(StoreError::Immutable { repo: repo.to_string(), tag: t.clone(), current: cur.digest });
                }
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.put_manifest_once(repo, d, bytes.clone(), &meta, &tags, &expect, &refs, &immutable, quota, &event).await {
                // The bytes were an old orphan that a collection swept between their refresh
                // and this write: store them again, once.
                Err(StoreError::BlobMissing(x)) if x == *d && attempts == 1 => continue,
                other => return other,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_manifest_once(
        self: &Arc<Self>,
        repo: &str,
        d: &Digest,
        bytes: Bytes,
        meta: &ManifestMeta,
        tags: &[String],
        expect: &TagExpect,
        refs: &(Vec<Digest>, Vec<Digest>),
        immutable: &Arc<dyn Fn(&str) -> bool + Send + Sync>,
        quota: Option<u64>,
        event: &Option<(outbox::OutboxRef, Vec<u8>)>,
    ) -> Result<()> {
        let created = self.meta.blob(d)?.is_none();
        self.put_blob_bytes(bytes.clone(), d).await?;
        let (s, repo_owned, dd) = (self.clone(), repo.to_string(), d.clone());
        let (meta, tags_owned, expect, refs, immutable) = (meta.clone(), tags.to_vec(), expect.clone(), refs.clone(), immutable.clone());
        let event = event.clone();
        let result = blocking(move || {
            let (repo, tags) = (repo_owned, tags_owned);
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let in_meta = s.meta.keeps_outbox();
            let key = event.as_ref().map(|(r, _)| r.key());
            let put = ManifestPut {
                meta: &meta,
                tags: &tags,
                expect,
                blobs: &refs.0,
                children: &refs.1,
                immutable: &*immutable,
                quota,
                now_ms: now_ms(),
                outbox: match (&event, &key) {
                    (Some((_, body)), Some(k)) if in_meta => Some((k.as_str(), body.as_slice())),
                    _ => None,
                },
            };
            let _g = s.stripe(&dd).lock();
            let mut res = s.meta.put_manifest(&repo, &dd, &put);
            if let (Ok(()), Some((r, body)), false) = (&res, &event, in_meta) {
                // Recorded after the manifest, so no event names a push that failed; if this
                // write fails the push is answered with an error and the client pushes again.
                res = s.outbox_append(r, body);
            }
            if res.is_err() && created && s.meta.holders(&dd)?.is_empty() {
                // Refused after all: take back the bytes this push stored.
                if s.meta.forget_blob_if_unused(&dd, u64::MAX)?.is_some() {
                    s.blobs.delete(&dd)?;
                }
            }
            res
        })
        .await;
        self.reads.changed(Changed::Tags(repo, tags));
        self.reads.changed(Changed::Manifest(repo, d));
        result?;
        self.manifest_bytes.insert(d.clone(), bytes);
        Ok(())
    }

    /// A point read, from memory when the store said it before.
    pub fn tag_digest(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let key = key2(repo, tag);
        if let Some(d) = self.reads.tags.get(&key) {
            return Ok(Some(d));
        }
        let generation = self.reads.generation();
        let d = self.meta.tag(repo, tag)?.map(|t| t.digest);
        if let Some(d) = &d {
            self.reads.fill(generation, || self.reads.tags.insert(key, d.clone()));
        }
        Ok(d)
    }

    /// A point read, from memory when the store said it before.
    pub fn manifest_meta(&self, repo: &str, d: &Digest) -> Result<Option<Arc<ManifestMeta>>> {
        let key = key2(repo, &d.to_string());
        if let Some(m) = self.reads.manifests.get(&key) {
            return Ok(Some(m));
        }
        let generation = self.reads.generation();
        let m = self.meta.manifest(repo, d)?.map(Arc::new);
        if let Some(m) = &m {
            self.reads.fill(generation, || self.reads.manifests.insert(key, m.clone()));
        }
        Ok(m)
    }

    /// The manifest bytes, from memory or from the blob store.
    /// A manifest's bytes for an answer: from memory, or read on a blocking thread (an object
    /// store's GET must not hold a worker).
    pub async fn manifest_body(self: &Arc<Self>, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(b) = self.manifest_bytes.get(d) {
            return Ok(Some(b));
        }
        let (s, d) = (self.clone(), d.clone());
        blocking(move || s.manifest_bytes(&d)).await
    }

    pub fn manifest_bytes(&self, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(b) = self.manifest_bytes.get(d) {
            return Ok(Some(b));
        }
        let b = self.blobs.read(d)?;
        if let Some(b) = &b {
            self.manifest_bytes.insert(d.clone(), b.clone());
        }
        Ok(b)
    }

    /// Removes a manifest revision and every tag pointing at it; refused (Immutable) when an
    /// immutable tag points at it.
    pub async fn delete_manifest(
        self: &Arc<Self>,
        repo: &str,
        d: &Digest,
        immutable: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<bool> {
        let (m, repo, d) = (self.meta.clone(), repo.to_string(), d.clone());
        let result = blocking(move || m.delete_manifest(&repo, &d, &*immutable)).await;
        self.reads.changed(Changed::Everything);
        result
    }

    pub async fn delete_tag(self: &Arc<Self>, repo: &str, tag: &str, immutable: bool) -> Result<bool> {
        let (m, r, t) = (self.meta.clone(), repo.to_string(), tag.to_string());
        let result = blocking(move || m.delete_tag(&r, &t, immutable)).await;
        self.reads.changed(Changed::Tags(repo, &[tag.to_string()]));
        result
    }

    /// The tags of `repo` pointing at `d` (blocking).
    pub fn tags_pointing_at(&self, repo: &str, d: &Digest) -> Result<Vec<String>> {
        Ok(self.meta.tags_with_times(repo)?.into_iter().filter(|(_, t)| t.digest == *d).map(|(name, _)| name).collect())
    }

    /// One page of a repository's tags; None when the repository is unknown.
    pub fn tags(&self, repo: &str, after: Option<&str>, n: usize) -> Result<Option<(Vec<String>, bool)>> {
        self.meta.tags(repo, after, n)
    }

    /// What a repository holds, for people (the web UI): see [`MetaStore::repo_summary`].
    pub fn repository_summary(&self, repo: &str) -> Result<RepoSummary> {
        self.meta.repo_summary(repo)
    }

    /// One page of repository names.
    pub fn repositories(&self, after: Option<&str>, n: usize) -> Result<(Vec<String>, bool)> {
        self.meta.repositories(after, n)
    }

    /// Manifests in `repo` whose subject is `subject`, as descriptors.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<crate::oci::manifest::Descriptor>> {
        let mut v: Vec<_> = self
            .meta
            .referrers(repo, subject)?
            .into_iter()
            .map(|(d, m)| crate::oci::manifest::Descriptor {
                media_type: Some(m.media_type),
                digest: d.to_string(),
                size: m.size as i64,
                artifact_type: m.artifact_type,
                annotations: m.annotations,
                urls: None,
                platform: None,
            })
            .collect();
        v.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(v)
    }

    /// Bytes held by class. O(1).
    pub fn usage(&self) -> Result<Usage> {
        self.meta.usage()
    }

    /// Bytes held by a hosted namespace. O(1).
    pub fn group_bytes(&self, group: &str) -> Result<u64> {
        self.meta.group_bytes(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imm_none() -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
        Arc::new(|_: &str| false)
    }

    #[tokio::test]
    async fn commit_verifies_and_two_writers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        let mut w1 = s.writer(&d).await.unwrap();
        let mut w2 = s.writer(&d).await.unwrap();
        w1.write(Bytes::from_static(b"hello")).await.unwrap();
        w2.write(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(s.commit(w1, &d, None).await.unwrap(), 5);
        assert_eq!(s.commit(w2, &d, None).await.unwrap(), 5);
        assert_eq!(s.blob_size(&d).unwrap(), Some(5));
        let mut w3 = s.writer(&d).await.unwrap();
        w3.write(Bytes::from_static(b"wrong")).await.unwrap();
        let bad = Digest::sha256_of(b"other");
        assert!(matches!(s.commit(w3, &bad, None).await.unwrap_err(), StoreError::DigestMismatch { .. }));
        assert!(s.blob_size(&bad).unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn metadata_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"{}");
        let x = Digest::sha256_of(b"x");
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_blob_bytes(Bytes::from_static(b"x"), &x).await.unwrap();
            s.link_blob("team/a", &x, None).await.unwrap();
            let meta = ManifestMeta { media_type: "application/json".into(), size: 2, ..Default::default() };
            s.put_manifest(
                "team/a",
                &d,
                Bytes::from_static(b"{}"),
                meta,
                vec!["v1".into()],
                TagExpect::Any,
                (vec![x.clone()], vec![]),
                imm_none(),
                None,
                None,
            )
            .await
            .unwrap();
            std::fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.tag_digest("team/a", "v1").unwrap(), Some(d.clone()));
        assert!(s.blob_linked("team/a", &x).unwrap());
        assert_eq!(s.manifest_bytes(&d).unwrap().unwrap(), Bytes::from_static(b"{}"));
        assert_eq!(s.repositories(None, 10).unwrap().0, vec!["team/a".to_string()]);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.delete_manifest("team/a", &d, imm_none()).await.unwrap());
        assert_eq!(s.tag_digest("team/a", "v1").unwrap(), None);
    }

    /// The read cache never answers with a tag older than a write that has returned, however
    /// readers and writers interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_cache_never_lags_a_completed_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut digests = Vec::new();
        for i in 0..2 {
            let body = Bytes::from(format!("{{\"n\":{i}}}"));
            let d = Digest::sha256_of(&body);
            let meta = ManifestMeta { media_type: "application/json".into(), size: body.len() as u64, ..Default::default() };
            s.put_manifest("team/c", &d, body, meta, vec![], TagExpect::Any, (vec![], vec![]), imm_none(), None, None).await.unwrap();
            digests.push(d);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = s.tag_digest("team/c", "t").unwrap();
                    }
                })
            })
            .collect();
        for i in 0..300 {
            let d = &digests[i % 2];
            let body = Bytes::from(format!("{{\"n\":{}}}", i % 2));
            let meta = ManifestMeta { media_type: "application/json".into(), size: body.len() as u64, ..Default::default() };
            s.put_manifest("team/c", d, body, meta, vec!["t".into()], TagExpect::Any, (vec![], vec![]), imm_none(), None, None)
                .await
                .unwrap();
            assert_eq!(s.tag_digest("team/c", "t").unwrap().as_ref(), Some(d), "write {i}");
        }
        assert!(s.delete_tag("team/c", "t", false).await.unwrap());
        assert_eq!(s.tag_digest("team/c", "t").unwrap(), None);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }
}
