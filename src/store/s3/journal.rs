//! Metadata on S3: a journal of writes in the bucket, replayed into a local redb index.
//!
//! Every metadata write becomes an entry `journal/<seq>` created with `If-None-Match: *`
//! inside the local transaction that applies it (redb's commit hook), so an entry is in the
//! bucket before the write is acknowledged, and a node whose write loses the race for `<seq>`
//! catches up and retries: the journal is one order of writes for every node. A node with
//! an empty disk replays the journal and serves everything written before.
//!
//! Entries are the write with its preconditions already checked (compare-and-swap,
//! immutability, quota): replaying one on the state it was written against has the same
//! effect without depending on this node's configuration. Reads never touch the bucket.
//! Access times (`touch_*`) stay local: they only order eviction and expiry on this node.

use super::Bucket;
use crate::oci::Digest;
use crate::store::error::{Result, StoreError};
use crate::store::local::meta::RedbMeta;
use crate::store::traits::{BlobRec, Classes, ManifestMeta, ManifestPut, MetaStore, TagExpect, TagRec, UploadRec, Usage};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Op {
    RecordBlob {
        d: String,
        size: u64,
        now: u64,
        link: Option<String>,
    },
    /// `until`: when the sweep that wrote it stops deleting (0 in entries from before sweeps
    /// were announced).
    ForgetBlobs {
        ds: Vec<String>,
        #[serde(default)]
        until: u64,
    },
    PurgeBlob {
        d: String,
        #[serde(default)]
        until: u64,
    },
    /// The sweep's deletions of these blobs are done.
    SweepDone {
        ds: Vec<String>,
    },
    Link {
        repo: String,
        d: String,
        now: u64,
    },
    Unlink {
        repo: String,
        d: String,
    },
    UnlinkIfStale {
        repo: String,
        d: String,
        cutoff: u64,
    },
    PutManifest {
        repo: String,
        d: String,
        meta: ManifestMeta,
        tags: Vec<String>,
        blobs: Vec<String>,
        children: Vec<String>,
        now: u64,
    },
    DeleteManifest {
        repo: String,
        d: String,
    },
    SetTag {
        repo: String,
        tag: String,
        d: String,
        now: u64,
    },
    DeleteTag {
        repo: String,
        tag: String,
    },
    PutUpload {
        id: String,
        rec: UploadRec,
    },
    RemoveUpload {
        id: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// Unique per write: a retried create that the bucket had already stored is recognised.
    id: String,
    node: String,
    op: Op,
}

enum Pending {
    /// Journal this entry as `seq`, then commit.
    Write { seq: u64, id: String, body: Bytes },
    /// Replaying `seq`: record it as applied.
    Replay { seq: u64 },
}

thread_local! {
    // The commit hook runs on the thread that called the write, inside redb's transaction;
    // the write in progress on this thread tells it what to journal.
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
    static BEHIND: RefCell<bool> = const { RefCell::new(false) };
}

const SEQ: &str = "journal.seq";
/// Written by `SweepDone` entries, which change nothing else in the index.
const SWEPT: &str = "journal.swept";
/// The sequence number of the last snapshot this node wrote or loaded.
const SNAPSHOT: &str = "journal.snapshot";
const SOURCE: &str = "journal.source";
/// Where the index keeps the grouping its counters were computed under.
const CLASSES: &str = "classes";

fn seq_key(seq: u64) -> String {
    format!("journal/{seq:020}")
}

fn snapshot_key(seq: u64) -> String {
    format!("snapshots/{seq:020}")
}

fn seq_of(k: &str) -> Option<u64> {
    k.rsplit('/').next()?.parse().ok()
}

fn digest(s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| StoreError::Meta(format!("journal entry names a bad digest {s:?}: {e}")))
}

pub struct JournalMeta {
    inner: Arc<RedbMeta>,
    b: Arc<Bucket>,
    node: String,
    /// This node's journal writers, one at a time (they append at the same tail).
    writer: Mutex<()>,
    path: std::path::PathBuf,
    /// Entries between snapshots of the index.
    snapshot_every: u64,
    snapshotting: std::sync::atomic::AtomicBool,
    me: std::sync::OnceLock<std::sync::Weak<JournalMeta>>,
    /// Told when entries written elsewhere were applied (the facade drops what it cached).
    on_replay: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Told the sequence number of each write readers elsewhere must see (the cluster tells
    /// its peers before the client is answered).
    on_write: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// Blobs a sweep (GC or eviction, on any node) forgot and may still be deleting from the
    /// bucket, until when. A node's stripe locks cannot order its publishers against another
    /// node's deletes: the journal does. Recording one of these again is refused until the
    /// sweep says it is done (or its time is up), so a push never counts on content that is
    /// about to go. Kept in memory: a sweep lasts seconds.
    sweeping: Mutex<std::collections::HashMap<Digest, u64>>,
}

impl JournalMeta {
    /// Opens the local index at `path` (rebuilt if it was built from another bucket) and
    /// replays what the journal holds beyond it.
    pub fn open(path: &Path, cache_bytes: usize, b: Arc<Bucket>, node: &str, snapshot_every: u64) -> Result<Arc<JournalMeta>> {
        let source = b.describe().to_string();
        let stale = match RedbMeta::open(path, cache_bytes) {
            Ok(m) => m.get_meta(SOURCE)?.is_some_and(|s| s != source),
            Err(_) => true,
        };
        if stale {
            tracing::info!(index = %path.display(), "local metadata index belongs to other storage: rebuilding it from the journal");
            let _ = std::fs::remove_file(path);
        }
        let mut inner = RedbMeta::open(path, cache_bytes)?;
        inner.set_meta(SOURCE, &source)?;
        let hb = b.clone();
        inner.set_commit_hook(Box::new(move |tx| hook(&hb, tx)));
        let j = Arc::new(JournalMeta {
            inner: Arc::new(inner),
            b,
            node: node.to_string(),
            writer: Mutex::new(()),
            path: path.to_path_buf(),
            snapshot_every: snapshot_every.max(1),
            snapshotting: std::sync::atomic::AtomicBool::new(false),
            me: std::sync::OnceLock::new(),
            on_replay: std::sync::OnceLock::new(),
            on_write: std::sync::OnceLock::new(),
            sweeping: Mutex::new(std::collections::HashMap::new()),
        });
        let _ = j.me.set(Arc::downgrade(&j));
        let t = std::time::Instant::now();
        let n = {
            let _g = j.writer.lock();
            if j.applied()? == 0 {
                j.load_snapshot(0)?;
            }
            j.catch_up()?
        };
        if n > 0 {
            tracing::info!(entries = n, seconds = t.elapsed().as_secs_f64(), "metadata journal replayed");
            // Replayed before the configuration said how repositories group: the counters are
            // rebuilt when it does.
            j.inner.set_meta(CLASSES, "")?;
        }
        Ok(j)
    }

    /// Calls `f` whenever writes made elsewhere (another node, an offline command) have been
    /// applied to the index.
    pub fn on_replay(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_replay.set(f);
    }

    /// Calls `f` with the sequence number of every write other readers must see at once
    /// (everything but upload-session bookkeeping, which a node looks up when asked).
    pub fn on_write(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.on_write.set(f);
    }

    /// Applies the journal up to at least `seq` (a peer wrote it and is waiting to answer its
    /// client). Returns whether the index got there.
    pub fn catch_up_to(&self, seq: u64) -> Result<bool> {
        if self.applied()? >= seq {
            return Ok(true);
        }
        let _g = self.writer.lock();
        self.catch_up()?;
        Ok(self.applied()? >= seq)
    }

    /// Applies other writers' entries every `every` while the store lives, so a node serves
    /// what another one wrote within about that long without writing itself.
    pub fn follow(self: &Arc<Self>, every: std::time::Duration) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("berth-journal".into()).spawn(move || loop {
            std::thread::sleep(every);
            let Some(j) = weak.upgrade() else { return };
            let r = {
                let _g = j.writer.lock();
                j.catch_up()
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "following the metadata journal");
            }
        });
    }

    pub fn applied(&self) -> Result<u64> {
        Ok(self.inner.get_meta(SEQ)?.and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    /// Applies the journal's entries beyond what this index holds, and tells the facade if
    /// there were any. Caller holds `writer`.
    fn catch_up(&self) -> Result<usize> {
        let n = self.catch_up_entries()?;
        if n > 0 {
            if let Some(f) = self.on_replay.get() {
                f();
            }
        }
        Ok(n)
    }

    fn catch_up_entries(&self) -> Result<usize> {
        let mut applied = 0;
        loop {
            let from = self.applied()?;
            let mut keys = Vec::new();
            self.b.list("journal/", Some(&seq_key(from)), &mut |k, _| {
                keys.push(k.to_string());
                keys.len() < 1024
            })?;
            if keys.is_empty() {
                return Ok(applied);
            }
            if keys.first().and_then(|k| seq_of(k)).is_some_and(|first| first > from + 1) {
                // Entries this index still needs were pruned: they are in a snapshot.
                if self.load_snapshot(from)? {
                    continue;
                }
                return Err(StoreError::Meta(format!("the metadata journal lacks entries after {from} and no snapshot covers them")));
            }
            let bodies = self.fetch(&keys)?;
            for (expect, (k, body)) in (from + 1..).zip(keys.iter().zip(bodies)) {
                let seq: u64 =
                    k.trim_start_matches("journal/").parse().map_err(|_| StoreError::Meta(format!("unexpected journal key {k}")))?;
                if seq != expect {
                    // A gap: the writer of `expect` has not finished; stop before it.
                    return Ok(applied);
                }
                let Some(body) = body else { return Ok(applied) };
                let entry: Entry = serde_json::from_slice(&body)?;
                self.replay(seq, &entry.op)?;
                applied += 1;
            }
        }
    }

    /// Replaces the index with the newest snapshot in the bucket if it is beyond `applied`.
    /// Caller holds `writer`.
    fn load_snapshot(&self, applied: u64) -> Result<bool> {
        let mut latest = None;
        self.b.list("snapshots/", None, &mut |k, _| {
            latest = Some(k.to_string());
            true
        })?;
        let Some(k) = latest.filter(|k| seq_of(k).is_some_and(|s| s > applied)) else { return Ok(false) };
        let t = std::time::Instant::now();
        let tmp = self.path.with_extension(format!("snapshot.{}", uuid::Uuid::new_v4()));
        let loaded = (|| -> Result<u64> {
            if !self.b.get_file(&k, &tmp)? {
                return Err(StoreError::Meta(format!("snapshot {k} vanished")));
            }
            let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&tmp)?);
            self.inner.load(SEQ, &mut r)
        })();
        let _ = std::fs::remove_file(&tmp);
        let seq = loaded?;
        self.inner.set_meta(SNAPSHOT, &seq.to_string())?;
        // Counters in the snapshot were grouped by the writer's configuration.
        self.inner.set_meta(CLASSES, "")?;
        tracing::info!(snapshot = %k, seconds = t.elapsed().as_secs_f64(), "metadata index loaded from a snapshot");
        Ok(true)
    }

    /// Starts a snapshot in the background when enough entries were applied since the last.
    fn maybe_snapshot(&self) {
        let (Ok(applied), Ok(last)) = (self.applied(), self.inner.get_meta(SNAPSHOT)) else { return };
        let last: u64 = last.and_then(|s| s.parse().ok()).unwrap_or(0);
        if applied < last + self.snapshot_every || self.snapshotting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let spawned = std::thread::Builder::new().name("berth-snapshot".into()).spawn(move || {
            if let Err(e) = me.snapshot() {
                tracing::warn!(error = %e, "writing a metadata snapshot");
            }
            me.snapshotting.store(false, std::sync::atomic::Ordering::Release);
        });
        if spawned.is_err() {
            self.snapshotting.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Writes the index as `snapshots/<seq>`, then prunes what two snapshots cover: journal
    /// entries up to the previous snapshot (a node that far behind loads a snapshot instead)
    /// and older snapshots.
    pub fn snapshot(&self) -> Result<u64> {
        let tmp = self.path.with_extension(format!("snapshot.{}", uuid::Uuid::new_v4()));
        let written = (|| -> Result<u64> {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            let seq = self.inner.dump(SEQ, &mut w)?;
            std::io::Write::flush(&mut w)?;
            drop(w);
            if seq > 0 {
                self.b.put_file(&snapshot_key(seq), &tmp)?;
            }
            Ok(seq)
        })();
        let _ = std::fs::remove_file(&tmp);
        let seq = written?;
        if seq == 0 {
            return Ok(0);
        }
        let prev: u64 = self.inner.get_meta(SNAPSHOT)?.and_then(|s| s.parse().ok()).unwrap_or(0);
        self.inner.set_meta(SNAPSHOT, &seq.to_string())?;
        tracing::info!(seq, "metadata snapshot written");
        if prev > 0 && prev < seq {
            let mut old = Vec::new();
            self.b.list("journal/", None, &mut |k, _| match seq_of(k) {
                Some(s) if s <= prev => {
                    old.push(k.to_string());
                    true
                }
                _ => false,
            })?;
            self.b.list("snapshots/", None, &mut |k, _| {
                if seq_of(k).is_some_and(|s| s < prev) {
                    old.push(k.to_string());
                }
                true
            })?;
            for k in old {
                self.b.delete(&k)?;
            }
        }
        Ok(seq)
    }

    /// Fetches entries in parallel, in order.
    fn fetch(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        let s3 = self.b.client();
        let paths: Vec<_> = keys.iter().map(|k| self.b.key(k)).collect();
        let r = self.b.run(async move {
            use object_store::ObjectStoreExt;
            futures::stream::iter(paths)
                .map(|p| {
                    let s3 = s3.clone();
                    async move {
                        match s3.get(&p).await {
                            Ok(g) => g.bytes().await.map(Some),
                            Err(object_store::Error::NotFound { .. }) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffered(16)
                .collect::<Vec<_>>()
                .await
        });
        r.into_iter().map(|x| x.map_err(|e| self.b.unavailable("reading the metadata journal", e))).collect()
    }

    fn mark(&self, ds: impl Iterator<Item = Digest>, until: u64) {
        if until == 0 {
            return;
        }
        let now = crate::store::now_ms();
        let mut s = self.sweeping.lock();
        s.retain(|_, u| *u > now);
        s.extend(ds.map(|d| (d, until)));
    }

    fn unmark(&self, ds: &[Digest]) {
        let mut s = self.sweeping.lock();
        for d in ds {
            s.remove(d);
        }
    }

    fn refuse_if_sweeping(&self, d: &Digest) -> Result<()> {
        match self.sweeping.lock().get(d) {
            Some(&until) if until > crate::store::now_ms() => Err(StoreError::Sweeping(d.clone())),
            _ => Ok(()),
        }
    }

    fn replay(&self, seq: u64, op: &Op) -> Result<()> {
        PENDING.with(|p| *p.borrow_mut() = Some(Pending::Replay { seq }));
        let r = self.apply(op);
        PENDING.with(|p| p.borrow_mut().take());
        if let Err(e) = r {
            // The entry was valid when written; applying it here failed (a local fault or an
            // index built differently). Record it as applied so the node is not stuck on it.
            tracing::error!(seq, error = %e, "metadata journal entry could not be applied");
            self.inner.set_meta(SEQ, &seq.to_string())?;
        }
        Ok(())
    }

    /// The effect of an entry on the index, without preconditions.
    fn apply(&self, op: &Op) -> Result<()> {
        let m = &*self.inner;
        match op {
            Op::RecordBlob { d, size, now, link } => m.record_blob(&digest(d)?, *size, *now, link.as_deref().map(|r| (r, None))),
            Op::ForgetBlobs { ds, until } => {
                let ds: Vec<Digest> = ds.iter().map(|d| digest(d)).collect::<Result<_>>()?;
                let gone = m.forget_blobs_if_unused(&ds, u64::MAX)?;
                self.mark(gone.into_iter().map(|(d, _)| d), *until);
                Ok(())
            }
            Op::PurgeBlob { d, until } => {
                let d = digest(d)?;
                m.purge_blob(&d)?;
                self.mark(std::iter::once(d), *until);
                Ok(())
            }
            Op::SweepDone { ds } => {
                let ds: Vec<Digest> = ds.iter().map(|d| digest(d)).collect::<Result<_>>()?;
                m.set_meta_hooked(SWEPT, &ds.len().to_string())?;
                self.unmark(&ds);
                Ok(())
            }
            Op::Link { repo, d, now } => m.link(repo, &digest(d)?, *now, None),
            Op::Unlink { repo, d } => m.unlink(repo, &digest(d)?).map(drop),
            Op::UnlinkIfStale { repo, d, cutoff } => m.unlink_if_stale(repo, &digest(d)?, *cutoff).map(drop),
            Op::PutManifest { repo, d, meta, tags, blobs, children, now } => {
                let blobs: Vec<Digest> = blobs.iter().map(|d| digest(d)).collect::<Result<_>>()?;
                let children: Vec<Digest> = children.iter().map(|d| digest(d)).collect::<Result<_>>()?;
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                let put = ManifestPut {
                    meta,
                    tags: &tags,
                    expect: TagExpect::Any,
                    blobs: &blobs,
                    children: &children,
                    immutable: &|_| false,
                    quota: None,
                    now_ms: *now,
                    outbox: None,
                };
                m.put_manifest(repo, &digest(d)?, &put)
            }
            Op::DeleteManifest { repo, d } => m.delete_manifest(repo, &digest(d)?, &|_| false).map(drop),
            Op::SetTag { repo, tag, d, now } => m.set_tag(repo, tag, &digest(d)?, &TagExpect::Any, false, *now),
            Op::DeleteTag { repo, tag } => m.delete_tag(repo, tag, false).map(drop),
            Op::PutUpload { id, rec } => m.put_upload(id, rec),
            Op::RemoveUpload { id } => m.remove_upload(id).map(drop),
        }
    }

    /// Runs a write on the index with `op` journaled inside its transaction; when another
    /// node took the next sequence number first, catches up and runs it again (its
    /// preconditions are checked again on the newer state).
    fn write<T>(&self, op: Op, f: impl Fn(&RedbMeta) -> Result<T>) -> Result<T> {
        let tell = !matches!(op, Op::PutUpload { .. } | Op::RemoveUpload { .. });
        let g = self.writer.lock();
        let id = uuid::Uuid::new_v4().to_string();
        let body = Bytes::from(serde_json::to_vec(&Entry { id: id.clone(), node: self.node.clone(), op })?);
        for _ in 0..64 {
            let seq = self.applied()? + 1;
            PENDING.with(|p| *p.borrow_mut() = Some(Pending::Write { seq, id: id.clone(), body: body.clone() }));
            BEHIND.with(|b| *b.borrow_mut() = false);
            let r = f(&self.inner);
            // The commit hook takes the pending entry: still here, nothing was journaled.
            let journaled = PENDING.with(|p| p.borrow_mut().take()).is_none();
            if BEHIND.with(|b| std::mem::take(&mut *b.borrow_mut())) {
                self.catch_up()?;
                continue;
            }
            if r.is_ok() && journaled {
                self.maybe_snapshot();
                drop(g);
                if let (true, Some(f)) = (tell, self.on_write.get()) {
                    f(seq);
                }
            }
            return r;
        }
        Err(StoreError::Unavailable("the metadata journal is too busy: retry".into()))
    }
}

/// redb's commit hook: journals the pending write (or records a replayed one) in the same
/// transaction that applies it.
fn hook(b: &Bucket, tx: &redb::WriteTransaction) -> Result<()> {
    let Some(p) = PENDING.with(|p| p.borrow_mut().take()) else { return Ok(()) };
    match p {
        Pending::Replay { seq } => RedbMeta::set_meta_in(tx, SEQ, &seq.to_string()),
        Pending::Write { seq, id, body } => {
            let k = seq_key(seq);
            if !b.put(&k, body, true)? {
                // Taken: by another node, or by this write's own retried request.
                let theirs = b.get(&k)?.map(|x| serde_json::from_slice::<Entry>(&x)).transpose()?;
                if theirs.map(|e| e.id) != Some(id) {
                    BEHIND.with(|x| *x.borrow_mut() = true);
                    return Err(StoreError::Meta("journal moved on".into()));
                }
            }
            RedbMeta::set_meta_in(tx, SEQ, &seq.to_string())
        }
    }
}

/// When a sweep starting now stops deleting: `SWEEP_WINDOW` from now.
fn sweep_deadline() -> u64 {
    crate::store::now_ms() + crate::store::SWEEP_WINDOW.as_millis() as u64
}

fn ds(v: &[Digest]) -> Vec<String> {
    v.iter().map(|d| d.to_string()).collect()
}

impl MetaStore for JournalMeta {
    fn blob(&self, d: &Digest) -> Result<Option<BlobRec>> {
        self.inner.blob(d)
    }

    fn record_blob(&self, d: &Digest, size: u64, now_ms: u64, link: Option<(&str, Option<u64>)>) -> Result<()> {
        let op = Op::RecordBlob { d: d.to_string(), size, now: now_ms, link: link.map(|(r, _)| r.to_string()) };
        self.write(op, |m| {
            self.refuse_if_sweeping(d)?;
            m.record_blob(d, size, now_ms, link)
        })
    }

    fn touch_blob(&self, d: &Digest, now_ms: u64) -> Result<bool> {
        self.inner.touch_blob(d, now_ms)
    }

    fn forget_blobs_if_unused(&self, ds_: &[Digest], cutoff_ms: u64) -> Result<Vec<(Digest, u64)>> {
        // Decided here, where the local access times are, and journaled as the list decided.
        let _g = self.writer.lock();
        let mut chosen = Vec::new();
        for d in ds_ {
            if let Some(rec) = self.inner.blob(d)? {
                if rec.used_ms <= cutoff_ms && self.inner.holders(d)?.is_empty() {
                    chosen.push(d.clone());
                }
            }
        }
        drop(_g);
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let until = sweep_deadline();
        let gone = self.write(Op::ForgetBlobs { ds: ds(&chosen), until }, |m| m.forget_blobs_if_unused(&chosen, u64::MAX))?;
        self.mark(gone.iter().map(|(d, _)| d.clone()), until);
        Ok(gone)
    }

    fn purge_blob(&self, d: &Digest) -> Result<Vec<String>> {
        let until = sweep_deadline();
        let held = self.write(Op::PurgeBlob { d: d.to_string(), until }, |m| m.purge_blob(d))?;
        self.mark(std::iter::once(d.clone()), until);
        Ok(held)
    }

    fn reuse_blob(&self, d: &Digest, size: u64, now_ms: u64, link: Option<(&str, Option<u64>)>) -> Result<bool> {
        let op = Op::RecordBlob { d: d.to_string(), size, now: now_ms, link: link.map(|(r, _)| r.to_string()) };
        self.write(op, |m| {
            self.refuse_if_sweeping(d)?;
            if m.blob(d)?.is_none() {
                return Ok(false);
            }
            m.record_blob(d, size, now_ms, link)?;
            Ok(true)
        })
    }

    fn await_sweeps(&self, d: &Digest) -> Result<()> {
        // Bounded: every mark expires at its sweep's deadline.
        while self.sweeping.lock().get(d).is_some_and(|&until| until > crate::store::now_ms()) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let _g = self.writer.lock();
            self.catch_up()?;
        }
        Ok(())
    }

    fn swept(&self, done: &[Digest]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        self.write(Op::SweepDone { ds: ds(done) }, |m| m.set_meta_hooked(SWEPT, &done.len().to_string()))?;
        self.unmark(done);
        Ok(())
    }

    fn blobs(&self, visit: &mut dyn FnMut(Digest, BlobRec)) -> Result<()> {
        self.inner.blobs(visit)
    }

    fn link(&self, repo: &str, d: &Digest, now_ms: u64, quota: Option<u64>) -> Result<()> {
        self.write(Op::Link { repo: repo.to_string(), d: d.to_string(), now: now_ms }, |m| m.link(repo, d, now_ms, quota))
    }

    fn holds(&self, repo: &str, d: &Digest) -> Result<bool> {
        self.inner.holds(repo, d)
    }

    fn unlink(&self, repo: &str, d: &Digest) -> Result<bool> {
        self.write(Op::Unlink { repo: repo.to_string(), d: d.to_string() }, |m| m.unlink(repo, d))
    }

    fn unlink_if_stale(&self, repo: &str, d: &Digest, cutoff_ms: u64) -> Result<bool> {
        self.write(Op::UnlinkIfStale { repo: repo.to_string(), d: d.to_string(), cutoff: cutoff_ms }, |m| {
            m.unlink_if_stale(repo, d, cutoff_ms)
        })
    }

    fn links(&self, repo: &str) -> Result<Vec<(Digest, u64)>> {
        self.inner.links(repo)
    }

    fn repo_summary(&self, repo: &str) -> Result<crate::store::traits::RepoSummary> {
        self.inner.repo_summary(repo)
    }

    fn holders(&self, d: &Digest) -> Result<Vec<String>> {
        self.inner.holders(d)
    }

    fn repositories(&self, after: Option<&str>, n: usize) -> Result<(Vec<String>, bool)> {
        self.inner.repositories(after, n)
    }

    fn repo_exists(&self, repo: &str) -> Result<bool> {
        self.inner.repo_exists(repo)
    }

    fn put_manifest(&self, repo: &str, d: &Digest, put: &ManifestPut<'_>) -> Result<()> {
        let op = Op::PutManifest {
            repo: repo.to_string(),
            d: d.to_string(),
            meta: put.meta.clone(),
            tags: put.tags.iter().map(|t| t.to_string()).collect(),
            blobs: ds(put.blobs),
            children: ds(put.children),
            now: put.now_ms,
        };
        // The outbox is objects in the bucket here, which every node sees; the caller writes it.
        let put = ManifestPut {
            meta: put.meta,
            tags: put.tags,
            expect: put.expect.clone(),
            blobs: put.blobs,
            children: put.children,
            immutable: put.immutable,
            quota: put.quota,
            now_ms: put.now_ms,
            outbox: None,
        };
        self.write(op, |m| m.put_manifest(repo, d, &put))
    }

    fn manifest(&self, repo: &str, d: &Digest) -> Result<Option<ManifestMeta>> {
        self.inner.manifest(repo, d)
    }

    fn delete_manifest(&self, repo: &str, d: &Digest, immutable: &dyn Fn(&str) -> bool) -> Result<bool> {
        self.write(Op::DeleteManifest { repo: repo.to_string(), d: d.to_string() }, |m| m.delete_manifest(repo, d, immutable))
    }

    fn manifests(&self, repo: &str) -> Result<Vec<(Digest, ManifestMeta)>> {
        self.inner.manifests(repo)
    }

    fn all_manifests(&self, visit: &mut dyn FnMut(&str, Digest, &ManifestMeta)) -> Result<()> {
        self.inner.all_manifests(visit)
    }

    fn set_tag(&self, repo: &str, tag: &str, d: &Digest, expect: &TagExpect, immutable: bool, now_ms: u64) -> Result<()> {
        let op = Op::SetTag { repo: repo.to_string(), tag: tag.to_string(), d: d.to_string(), now: now_ms };
        self.write(op, |m| m.set_tag(repo, tag, d, expect, immutable, now_ms))
    }

    fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRec>> {
        self.inner.tag(repo, tag)
    }

    fn delete_tag(&self, repo: &str, tag: &str, immutable: bool) -> Result<bool> {
        self.write(Op::DeleteTag { repo: repo.to_string(), tag: tag.to_string() }, |m| m.delete_tag(repo, tag, immutable))
    }

    fn tags(&self, repo: &str, after: Option<&str>, n: usize) -> Result<Option<(Vec<String>, bool)>> {
        self.inner.tags(repo, after, n)
    }

    fn tags_with_times(&self, repo: &str) -> Result<Vec<(String, TagRec)>> {
        self.inner.tags_with_times(repo)
    }

    fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<(Digest, ManifestMeta)>> {
        self.inner.referrers(repo, subject)
    }

    fn put_upload(&self, id: &str, rec: &UploadRec) -> Result<()> {
        self.write(Op::PutUpload { id: id.to_string(), rec: rec.clone() }, |m| m.put_upload(id, rec))
    }

    fn touch_upload(&self, id: &str, rec: &UploadRec) -> Result<()> {
        self.inner.touch_upload(id, rec)
    }

    fn upload(&self, id: &str) -> Result<Option<UploadRec>> {
        if let Some(r) = self.inner.upload(id)? {
            return Ok(Some(r));
        }
        // Opened at another node, perhaps a moment ago: look at the journal before saying no.
        {
            let _g = self.writer.lock();
            self.catch_up()?;
        }
        self.inner.upload(id)
    }

    fn remove_upload(&self, id: &str) -> Result<bool> {
        self.write(Op::RemoveUpload { id: id.to_string() }, |m| m.remove_upload(id))
    }

    fn uploads(&self) -> Result<Vec<(String, UploadRec)>> {
        self.inner.uploads()
    }

    fn set_classes(&self, classes: Classes) -> Result<()> {
        self.inner.set_classes(classes.clone())?;
        {
            let _g = self.writer.lock();
            self.catch_up()?;
        }
        // Again, in case the catch-up loaded a snapshot counted under other groups.
        self.inner.set_classes(classes)
    }

    fn usage(&self) -> Result<Usage> {
        self.inner.usage()
    }

    fn group_bytes(&self, group: &str) -> Result<u64> {
        self.inner.group_bytes(group)
    }

    fn recount(&self, repair: bool) -> Result<Vec<String>> {
        self.inner.recount(repair)
    }

    fn note(&self, key: &str) -> Result<Option<String>> {
        self.inner.note(key)
    }

    fn set_note(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.inner.set_note(key, value)
    }
}
