//! Metadata in one redb database (`meta.redb`): every write is one ACID transaction, durable
//! when it returns, and redb serializes writers, so a tag's compare-and-swap, an immutability
//! check and the write they guard happen in one critical section. Opening is O(1) in the store
//! size; listings read key ranges.
//!
//! Keys join their parts with NUL, which no repository name, tag or digest contains and which
//! sorts before every character they do contain: `repo\0tag` ranges over one repository only.

use crate::oci::Digest;
use crate::store::error::{Result, StoreError};
use crate::store::traits::{
    BlobRec, Classes, ManifestMeta, ManifestPut, MetaStore, RepoSummary, TagExpect, TagRec, UploadRec, Usage, CACHE_GROUP,
};
use bytes::Bytes;
use parking_lot::RwLock;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// digest -> size, created, used (3 × u64 LE).
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// repo\0digest -> link time.
const LINKS: TableDefinition<&str, u64> = TableDefinition::new("links");
/// repo\0digest -> ManifestMeta JSON.
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// repo\0tag -> "<ms> <digest>".
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// repo\0subject\0digest.
const REFERRERS: TableDefinition<&str, ()> = TableDefinition::new("referrers");
/// digest\0repo: which repositories hold a digest (a link, a manifest, or both).
const HOLDERS: TableDefinition<&str, ()> = TableDefinition::new("holders");
/// repo -> how many digests it holds; a repository exists while this is above zero.
const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// group\0digest -> how many repositories of the group hold it.
const GROUP_REFS: TableDefinition<&str, u64> = TableDefinition::new("group_refs");
/// group -> unique bytes it holds; `@total`: every recorded blob; `@hosted`: unique bytes
/// held by any hosted repository.
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// repo\0digest -> how many manifests of the repository reference it (a blob or a child): a
/// link that is referenced is never swept, whatever its age.
const MREFS: TableDefinition<&str, u64> = TableDefinition::new("mrefs");
/// repo\0manifest -> the digests it references, space-separated (to undo MREFS on delete).
const MREFS_OF: TableDefinition<&str, &str> = TableDefinition::new("mrefs_of");
/// Pending events by `<node>/<name>` (see `store::outbox`), written in the transaction of the
/// change they record.
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

const TOTAL: &str = "@total";
const HOSTED: &str = "@hosted";

pub(crate) fn k2(a: &str, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + b.len() + 1);
    s.push_str(a);
    s.push('\0');
    s.push_str(b);
    s
}

/// The bounds of every key under `prefix\0`, optionally after `after` (exclusive).
fn under(prefix: &str, after: Option<&str>) -> (Bound<String>, Bound<String>) {
    let lo = match after {
        Some(a) => Bound::Excluded(k2(prefix, a)),
        None => Bound::Included(k2(prefix, "")),
    };
    (lo, Bound::Excluded(format!("{prefix}\u{1}")))
}

fn encode_blob(r: &BlobRec) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&r.size.to_le_bytes());
    b[8..16].copy_from_slice(&r.created_ms.to_le_bytes());
    b[16..].copy_from_slice(&r.used_ms.to_le_bytes());
    b
}

fn decode_blob(b: &[u8]) -> Result<BlobRec> {
    if b.len() != 24 {
        return Err(StoreError::Meta("blob record of the wrong length".into()));
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(BlobRec { size: u(0), created_ms: u(8), used_ms: u(16) })
}

fn encode_tag(d: &Digest, ms: u64) -> String {
    format!("{ms} {d}")
}

fn decode_tag(v: &str) -> Result<TagRec> {
    let (ms, d) = v.split_once(' ').ok_or_else(|| StoreError::Meta(format!("bad tag record {v:?}")))?;
    Ok(TagRec {
        digest: Digest::parse(d).map_err(|e| StoreError::Meta(e.message))?,
        updated_ms: ms.parse().map_err(|_| StoreError::Meta(format!("bad tag time {ms:?}")))?,
    })
}

fn parse_digest(s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| StoreError::Meta(e.message))
}

/// Runs inside every durable write transaction, after its changes and before its commit; an
/// error aborts the transaction. The S3 backend journals the write to the bucket here.
pub type CommitHook = Box<dyn Fn(&WriteTransaction) -> Result<()> + Send + Sync>;

pub struct RedbMeta {
    db: Database,
    classes: RwLock<Classes>,
    hook: Option<CommitHook>,
}

impl RedbMeta {
    /// `cache_bytes` bounds redb's page cache (the metadata's share of memory).
    pub fn open(path: &Path, cache_bytes: usize) -> Result<RedbMeta> {
        let db = Database::builder().set_cache_size(cache_bytes).create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(META)?;
        create_tables(&tx)?;
        tx.commit()?;
        Ok(RedbMeta { db, classes: RwLock::new(Classes::default()), hook: None })
    }

    pub fn set_commit_hook(&mut self, hook: CommitHook) {
        self.hook = Some(hook);
    }

    /// Sets a `meta` entry inside a transaction (for a commit hook).
    pub fn set_meta_in(tx: &WriteTransaction, key: &str, value: &str) -> Result<()> {
        tx.open_table(META)?.insert(key, value)?;
        Ok(())
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a `meta` entry in a transaction the commit hook sees (a journaled write with no
    /// other effect on the index).
    pub fn set_meta_hooked(&self, key: &str, value: &str) -> Result<()> {
        self.batch(|b| Self::set_meta_in(b.tx, key, value))
    }

    /// A batch of writes in one transaction (migration, bulk generation).
    pub fn batch<T>(&self, f: impl FnOnce(&mut Batch<'_>) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write()?;
        let classes = self.classes.read().clone();
        let out = f(&mut Batch { tx: &tx, classes: &classes })?;
        if let Some(h) = &self.hook {
            h(&tx)?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn write<T>(&self, f: impl FnOnce(&mut Batch<'_>) -> Result<T>) -> Result<T> {
        self.batch(f)
    }

    /// A write whose loss in a crash costs nothing but a timestamp: not synced on its own,
    /// made durable by the next durable commit.
    fn write_lazy<T>(&self, f: impl FnOnce(&mut Batch<'_>) -> Result<T>) -> Result<T> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None);
        let classes = self.classes.read().clone();
        let out = f(&mut Batch { tx: &tx, classes: &classes })?;
        tx.commit()?;
        Ok(out)
    }
}

/// Creates every table but `meta` that does not exist yet.
fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(BLOBS)?;
    tx.open_table(LINKS)?;
    tx.open_table(MANIFESTS)?;
    tx.open_table(TAGS)?;
    tx.open_table(REFERRERS)?;
    tx.open_table(HOLDERS)?;
    tx.open_table(REPOS)?;
    tx.open_table(GROUP_REFS)?;
    tx.open_table(USAGE)?;
    tx.open_table(UPLOADS)?;
    tx.open_table(MREFS)?;
    tx.open_table(MREFS_OF)?;
    tx.open_table(OUTBOX)?;
    Ok(())
}

const SNAPSHOT_MAGIC: &[u8] = b"berth-index-snapshot 1\n";

fn snap_record(w: &mut dyn std::io::Write, id: u8, key: &str, val: &[u8]) -> std::io::Result<()> {
    w.write_all(&[id])?;
    w.write_all(&(key.len() as u32).to_le_bytes())?;
    w.write_all(key.as_bytes())?;
    w.write_all(&(val.len() as u32).to_le_bytes())?;
    w.write_all(val)
}

/// Every record of one table, its value as bytes.
macro_rules! dump_table {
    ($rx:expr, $w:expr, $id:expr, $def:expr, $bytes:expr) => {{
        let t = $rx.open_table($def)?;
        for e in t.iter()? {
            let (k, v) = e?;
            let b = $bytes(v.value());
            snap_record($w, $id, k.value(), AsRef::<[u8]>::as_ref(&b))?;
        }
    }};
}

impl RedbMeta {
    /// Writes every table but `meta` as one stream, at the sequence number recorded under
    /// `seq_key` in the same read transaction. Returns that number.
    pub fn dump(&self, seq_key: &str, w: &mut dyn std::io::Write) -> Result<u64> {
        let rx = self.db.begin_read()?;
        let seq: u64 = rx.open_table(META)?.get(seq_key)?.and_then(|v| v.value().parse().ok()).unwrap_or(0);
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&seq.to_le_bytes())?;
        let bytes = |v: &[u8]| v.to_vec();
        let num = |v: u64| v.to_le_bytes();
        let text = |v: &str| v.as_bytes().to_vec();
        let unit = |_: ()| [0u8; 0];
        dump_table!(rx, w, 1, BLOBS, bytes);
        dump_table!(rx, w, 2, LINKS, num);
        dump_table!(rx, w, 3, MANIFESTS, bytes);
        dump_table!(rx, w, 4, TAGS, text);
        dump_table!(rx, w, 5, REFERRERS, unit);
        dump_table!(rx, w, 6, HOLDERS, unit);
        dump_table!(rx, w, 7, REPOS, num);
        dump_table!(rx, w, 8, GROUP_REFS, num);
        dump_table!(rx, w, 9, USAGE, num);
        dump_table!(rx, w, 10, UPLOADS, bytes);
        dump_table!(rx, w, 11, MREFS, num);
        dump_table!(rx, w, 12, MREFS_OF, text);
        w.flush()?;
        Ok(seq)
    }

    /// Replaces every table but `meta` with a snapshot's content and records its sequence
    /// number under `seq_key`, in one transaction. Returns that number.
    pub fn load(&self, seq_key: &str, r: &mut dyn std::io::Read) -> Result<u64> {
        let bad = |m: &str| StoreError::Meta(format!("snapshot: {m}"));
        let mut magic = vec![0u8; SNAPSHOT_MAGIC.len()];
        r.read_exact(&mut magic)?;
        if magic != SNAPSHOT_MAGIC {
            return Err(bad("not a berth index snapshot"));
        }
        let mut n8 = [0u8; 8];
        r.read_exact(&mut n8)?;
        let seq = u64::from_le_bytes(n8);
        let tx = self.db.begin_write()?;
        tx.delete_table(BLOBS)?;
        tx.delete_table(LINKS)?;
        tx.delete_table(MANIFESTS)?;
        tx.delete_table(TAGS)?;
        tx.delete_table(REFERRERS)?;
        tx.delete_table(HOLDERS)?;
        tx.delete_table(REPOS)?;
        tx.delete_table(GROUP_REFS)?;
        tx.delete_table(USAGE)?;
        tx.delete_table(UPLOADS)?;
        tx.delete_table(MREFS)?;
        tx.delete_table(MREFS_OF)?;
        {
            // Every table open once for the whole load, not per record; opening recreates the
            // ones the snapshot has no record for.
            let mut blobs = tx.open_table(BLOBS)?;
            let mut links = tx.open_table(LINKS)?;
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut tags = tx.open_table(TAGS)?;
            let mut referrers = tx.open_table(REFERRERS)?;
            let mut holders = tx.open_table(HOLDERS)?;
            let mut repos = tx.open_table(REPOS)?;
            let mut group_refs = tx.open_table(GROUP_REFS)?;
            let mut usage = tx.open_table(USAGE)?;
            let mut uploads = tx.open_table(UPLOADS)?;
            let mut mrefs = tx.open_table(MREFS)?;
            let mut mrefs_of = tx.open_table(MREFS_OF)?;
            let (mut key, mut val) = (Vec::new(), Vec::new());
            loop {
                let mut id = [0u8; 1];
                if r.read(&mut id)? == 0 {
                    break;
                }
                let mut n4 = [0u8; 4];
                r.read_exact(&mut n4)?;
                key.resize(u32::from_le_bytes(n4) as usize, 0);
                r.read_exact(&mut key)?;
                r.read_exact(&mut n4)?;
                val.resize(u32::from_le_bytes(n4) as usize, 0);
                r.read_exact(&mut val)?;
                let k = std::str::from_utf8(&key).map_err(|_| bad("a key is not UTF-8"))?;
                let num =
                    || -> Result<u64> { Ok(u64::from_le_bytes(val.as_slice().try_into().map_err(|_| bad("a number is not 8 bytes"))?)) };
                let text = || std::str::from_utf8(&val).map_err(|_| bad("a text value is not UTF-8"));
                match id[0] {
                    1 => drop(blobs.insert(k, val.as_slice())?),
                    2 => drop(links.insert(k, num()?)?),
                    3 => drop(manifests.insert(k, val.as_slice())?),
                    4 => drop(tags.insert(k, text()?)?),
                    5 => drop(referrers.insert(k, ())?),
                    6 => drop(holders.insert(k, ())?),
                    7 => drop(repos.insert(k, num()?)?),
                    8 => drop(group_refs.insert(k, num()?)?),
                    9 => drop(usage.insert(k, num()?)?),
                    10 => drop(uploads.insert(k, val.as_slice())?),
                    11 => drop(mrefs.insert(k, num()?)?),
                    12 => drop(mrefs_of.insert(k, text()?)?),
                    other => return Err(bad(&format!("unknown table {other}"))),
                }
            }
        }
        Self::set_meta_in(&tx, seq_key, &seq.to_string())?;
        tx.commit()?;
        Ok(seq)
    }
}

/// Writes inside one transaction, keeping the holder index and the counters in step.
pub struct Batch<'a> {
    tx: &'a WriteTransaction,
    classes: &'a Classes,
}

impl Batch<'_> {
    fn blob(&self, d: &str) -> Result<Option<BlobRec>> {
        let t = self.tx.open_table(BLOBS)?;
        let v = t.get(d)?;
        v.map(|v| decode_blob(v.value())).transpose()
    }

    fn add_usage(&self, key: &str, delta: i128) -> Result<()> {
        let mut t = self.tx.open_table(USAGE)?;
        let cur = t.get(key)?.map(|v| v.value()).unwrap_or(0) as i128;
        t.insert(key, (cur + delta).max(0) as u64)?;
        Ok(())
    }

    /// Counts `d` into `group`; the first holder in the group adds its size.
    fn group_inc(&self, group: &str, d: &str, size: u64, quota: Option<u64>) -> Result<()> {
        let key = k2(group, d);
        let mut t = self.tx.open_table(GROUP_REFS)?;
        let c = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
        if c == 0 {
            if let Some(q) = quota {
                let used = self.tx.open_table(USAGE)?.get(group)?.map(|v| v.value()).unwrap_or(0);
                if used + size > q {
                    return Err(StoreError::Quota { namespace: group.to_string(), would_use: used + size, quota: q });
                }
            }
        }
        t.insert(key.as_str(), c + 1)?;
        drop(t);
        if c == 0 {
            self.add_usage(group, size as i128)?;
        }
        Ok(())
    }

    fn group_dec(&self, group: &str, d: &str, size: u64) -> Result<()> {
        let key = k2(group, d);
        let mut t = self.tx.open_table(GROUP_REFS)?;
        let c = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
        if c <= 1 {
            t.remove(key.as_str())?;
            drop(t);
            if c == 1 {
                self.add_usage(group, -(size as i128))?;
            }
        } else {
            t.insert(key.as_str(), c - 1)?;
        }
        Ok(())
    }

    /// Records that `repo` holds `d` (idempotent).
    fn hold(&self, repo: &str, d: &str, quota: Option<u64>) -> Result<()> {
        let hk = k2(d, repo);
        if self.tx.open_table(HOLDERS)?.get(hk.as_str())?.is_some() {
            return Ok(());
        }
        let size = self.blob(d)?.map(|b| b.size).unwrap_or(0);
        let group = self.classes.group(repo);
        self.group_inc(&group, d, size, quota)?;
        if group != CACHE_GROUP {
            self.group_inc(HOSTED, d, size, None)?;
        }
        self.tx.open_table(HOLDERS)?.insert(hk.as_str(), ())?;
        let mut repos = self.tx.open_table(REPOS)?;
        let n = repos.get(repo)?.map(|v| v.value()).unwrap_or(0);
        repos.insert(repo, n + 1)?;
        Ok(())
    }

    /// Drops `repo`'s hold on `d` once neither a link nor a manifest names it.
    fn release_if_unheld(&self, repo: &str, d: &str) -> Result<()> {
        let rk = k2(repo, d);
        if self.tx.open_table(LINKS)?.get(rk.as_str())?.is_some() || self.tx.open_table(MANIFESTS)?.get(rk.as_str())?.is_some() {
            return Ok(());
        }
        let hk = k2(d, repo);
        if self.tx.open_table(HOLDERS)?.remove(hk.as_str())?.is_none() {
            return Ok(());
        }
        let size = self.blob(d)?.map(|b| b.size).unwrap_or(0);
        let group = self.classes.group(repo);
        self.group_dec(&group, d, size)?;
        if group != CACHE_GROUP {
            self.group_dec(HOSTED, d, size)?;
        }
        let mut repos = self.tx.open_table(REPOS)?;
        let n = repos.get(repo)?.map(|v| v.value()).unwrap_or(0);
        if n <= 1 {
            repos.remove(repo)?;
        } else {
            repos.insert(repo, n - 1)?;
        }
        Ok(())
    }

    pub fn record_blob(&self, d: &Digest, size: u64, now_ms: u64) -> Result<()> {
        let ds = d.to_string();
        let mut t = self.tx.open_table(BLOBS)?;
        let existing = t.get(ds.as_str())?.map(|v| decode_blob(v.value())).transpose()?;
        match existing {
            Some(mut r) => {
                r.used_ms = r.used_ms.max(now_ms);
                t.insert(ds.as_str(), encode_blob(&r).as_slice())?;
            }
            None => {
                t.insert(ds.as_str(), encode_blob(&BlobRec { size, created_ms: now_ms, used_ms: now_ms }).as_slice())?;
                drop(t);
                self.add_usage(TOTAL, size as i128)?;
            }
        }
        Ok(())
    }

    fn touch_blob(&self, d: &str, now_ms: u64) -> Result<bool> {
        let mut t = self.tx.open_table(BLOBS)?;
        let existing = t.get(d)?.map(|v| decode_blob(v.value())).transpose()?;
        match existing {
            Some(mut r) => {
                if r.used_ms < now_ms {
                    r.used_ms = now_ms;
                    t.insert(d, encode_blob(&r).as_slice())?;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub fn link(&self, repo: &str, d: &Digest, now_ms: u64, quota: Option<u64>) -> Result<()> {
        let ds = d.to_string();
        if !self.touch_blob(&ds, now_ms)? {
            return Err(StoreError::BlobMissing(d.clone()));
        }
        self.hold(repo, &ds, quota)?;
        self.tx.open_table(LINKS)?.insert(k2(repo, &ds).as_str(), now_ms)?;
        Ok(())
    }

    fn set_tag(&self, repo: &str, tag: &str, d: &Digest, expect: &TagExpect, immutable: bool, now_ms: u64) -> Result<()> {
        let key = k2(repo, tag);
        let mut t = self.tx.open_table(TAGS)?;
        let cur = t.get(key.as_str())?.map(|v| decode_tag(v.value())).transpose()?;
        let ok = match (expect, &cur) {
            (TagExpect::Any, _) => true,
            (TagExpect::Absent, c) => c.is_none(),
            (TagExpect::Is(want), Some(c)) => &c.digest == want,
            (TagExpect::Is(_), None) => false,
        };
        if !ok {
            return Err(StoreError::Conflict { repo: repo.to_string(), tag: tag.to_string() });
        }
        if let Some(c) = &cur {
            if immutable && &c.digest != d {
                return Err(StoreError::Immutable { repo: repo.to_string(), tag: tag.to_string(), current: c.digest.clone() });
            }
        }
        t.insert(key.as_str(), encode_tag(d, now_ms).as_str())?;
        Ok(())
    }

    pub fn put_manifest(&self, repo: &str, d: &Digest, put: &ManifestPut<'_>) -> Result<()> {
        let ds = d.to_string();
        {
            let manifests = self.tx.open_table(MANIFESTS)?;
            let holders = self.tx.open_table(HOLDERS)?;
            for b in put.blobs {
                let bs = b.to_string();
                if holders.get(k2(&bs, repo).as_str())?.is_none() || self.blob(&bs)?.is_none() {
                    return Err(StoreError::NotInRepo { repo: repo.to_string(), what: "blob", digest: b.clone() });
                }
            }
            for c in put.children {
                if manifests.get(k2(repo, &c.to_string()).as_str())?.is_none() {
                    return Err(StoreError::NotInRepo { repo: repo.to_string(), what: "manifest", digest: c.clone() });
                }
            }
        }
        // Refresh what the manifest references: a GC that marked from an older snapshot sees
        // fresh times and leaves them.
        for b in put.blobs {
            let bs = b.to_string();
            self.touch_blob(&bs, put.now_ms)?;
            let mut links = self.tx.open_table(LINKS)?;
            let lk = k2(repo, &bs);
            if links.get(lk.as_str())?.is_some() {
                links.insert(lk.as_str(), put.now_ms)?;
            }
        }
        if !self.touch_blob(&ds, put.now_ms)? {
            return Err(StoreError::BlobMissing(d.clone()));
        }
        self.hold(repo, &ds, put.quota)?;
        let mk = k2(repo, &ds);
        let existed = self.tx.open_table(MANIFESTS)?.insert(mk.as_str(), serde_json::to_vec(put.meta)?.as_slice())?.is_some();
        if !existed {
            let mut refs: Vec<String> = put.blobs.iter().chain(put.children).map(|d| d.to_string()).collect();
            refs.sort();
            refs.dedup();
            self.add_refs(repo, &refs, 1)?;
            if !refs.is_empty() {
                self.tx.open_table(MREFS_OF)?.insert(mk.as_str(), refs.join(" ").as_str())?;
            }
        }
        if let Some(s) = &put.meta.subject {
            self.tx.open_table(REFERRERS)?.insert(format!("{repo}\0{s}\0{ds}").as_str(), ())?;
        }
        for t in put.tags {
            self.set_tag(repo, t, d, &put.expect, (put.immutable)(t), put.now_ms)?;
        }
        if let Some((key, body)) = put.outbox {
            if !self.outbox_put(key, body)? {
                return Err(StoreError::Meta(format!("outbox entry {key} exists already")));
            }
        }
        Ok(())
    }

    /// False if the key exists.
    fn outbox_put(&self, key: &str, body: &[u8]) -> Result<bool> {
        let mut t = self.tx.open_table(OUTBOX)?;
        if t.get(key)?.is_some() {
            return Ok(false);
        }
        t.insert(key, body)?;
        Ok(true)
    }

    fn add_refs(&self, repo: &str, refs: &[String], delta: i64) -> Result<()> {
        let mut t = self.tx.open_table(MREFS)?;
        for r in refs {
            let key = k2(repo, r);
            let c = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0) as i64 + delta;
            if c <= 0 {
                t.remove(key.as_str())?;
            } else {
                t.insert(key.as_str(), c as u64)?;
            }
        }
        Ok(())
    }

    fn referenced_in(&self, repo: &str, d: &str) -> Result<bool> {
        Ok(self.tx.open_table(MREFS)?.get(k2(repo, d).as_str())?.is_some())
    }

    fn tags_pointing_at(&self, repo: &str, d: &Digest) -> Result<Vec<String>> {
        let t = self.tx.open_table(TAGS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            let (k, v) = e?;
            if &decode_tag(v.value())?.digest == d {
                out.push(k.value()[repo.len() + 1..].to_string());
            }
        }
        Ok(out)
    }

    fn delete_manifest(&self, repo: &str, d: &Digest, immutable: &dyn Fn(&str) -> bool) -> Result<bool> {
        let ds = d.to_string();
        let mk = k2(repo, &ds);
        let meta: Option<ManifestMeta> =
            self.tx.open_table(MANIFESTS)?.get(mk.as_str())?.map(|v| serde_json::from_slice(v.value())).transpose()?;
        let Some(meta) = meta else { return Ok(false) };
        let tags = self.tags_pointing_at(repo, d)?;
        if let Some(t) = tags.iter().find(|t| immutable(t)) {
            return Err(StoreError::Immutable { repo: repo.to_string(), tag: t.clone(), current: d.clone() });
        }
        let mut tt = self.tx.open_table(TAGS)?;
        for t in &tags {
            tt.remove(k2(repo, t).as_str())?;
        }
        drop(tt);
        self.tx.open_table(MANIFESTS)?.remove(mk.as_str())?;
        let refs: Option<String> = self.tx.open_table(MREFS_OF)?.remove(mk.as_str())?.map(|v| v.value().to_string());
        if let Some(refs) = refs {
            let refs: Vec<String> = refs.split(' ').map(str::to_string).collect();
            self.add_refs(repo, &refs, -1)?;
        }
        if let Some(s) = &meta.subject {
            self.tx.open_table(REFERRERS)?.remove(format!("{repo}\0{s}\0{ds}").as_str())?;
        }
        self.release_if_unheld(repo, &ds)?;
        Ok(true)
    }

    fn unlink(&self, repo: &str, d: &str) -> Result<bool> {
        let removed = self.tx.open_table(LINKS)?.remove(k2(repo, d).as_str())?.is_some();
        if removed {
            self.release_if_unheld(repo, d)?;
        }
        Ok(removed)
    }

    fn holders(&self, d: &str) -> Result<Vec<String>> {
        let t = self.tx.open_table(HOLDERS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(d, None)))? {
            out.push(e?.0.value()[d.len() + 1..].to_string());
        }
        Ok(out)
    }

    /// Imports a tag as found on disk (migration): no preconditions.
    pub fn import_tag(&self, repo: &str, tag: &str, d: &Digest, ms: u64) -> Result<()> {
        self.tx.open_table(TAGS)?.insert(k2(repo, tag).as_str(), encode_tag(d, ms).as_str())?;
        Ok(())
    }

    /// Imports a manifest record as found on disk (migration).
    pub fn import_manifest(&self, repo: &str, d: &Digest, meta: &ManifestMeta) -> Result<()> {
        let ds = d.to_string();
        self.hold(repo, &ds, None)?;
        self.tx.open_table(MANIFESTS)?.insert(k2(repo, &ds).as_str(), serde_json::to_vec(meta)?.as_slice())?;
        if let Some(s) = &meta.subject {
            self.tx.open_table(REFERRERS)?.insert(format!("{repo}\0{s}\0{ds}").as_str(), ())?;
        }
        Ok(())
    }

    /// Imports a link as found on disk (migration); the blob need not be recorded yet.
    pub fn import_link(&self, repo: &str, d: &Digest, ms: u64) -> Result<()> {
        let ds = d.to_string();
        self.hold(repo, &ds, None)?;
        self.tx.open_table(LINKS)?.insert(k2(repo, &ds).as_str(), ms)?;
        Ok(())
    }

    pub fn put_upload(&self, id: &str, rec: &UploadRec) -> Result<()> {
        self.tx.open_table(UPLOADS)?.insert(id, serde_json::to_vec(rec)?.as_slice())?;
        Ok(())
    }
}

fn as_ref_bounds(b: &(Bound<String>, Bound<String>)) -> (Bound<&str>, Bound<&str>) {
    (b.0.as_ref().map(String::as_str), b.1.as_ref().map(String::as_str))
}

impl MetaStore for RedbMeta {
    fn keeps_outbox(&self) -> bool {
        true
    }

    fn outbox_put(&self, key: &str, body: &[u8]) -> Result<bool> {
        self.write(|b| b.outbox_put(key, body))
    }

    fn outbox_keys(&self) -> Result<Vec<String>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(e?.0.value().to_string());
        }
        Ok(out)
    }

    fn outbox_get(&self, key: &str) -> Result<Option<Bytes>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(OUTBOX)?;
        Ok(t.get(key)?.map(|v| Bytes::copy_from_slice(v.value())))
    }

    fn outbox_delete(&self, keys: &[String]) -> Result<()> {
        // Not synced: a removal a crash undoes only repeats a delivery.
        self.write_lazy(|b| {
            let mut t = b.tx.open_table(OUTBOX)?;
            for k in keys {
                t.remove(k.as_str())?;
            }
            Ok(())
        })
    }

    fn blob(&self, d: &Digest) -> Result<Option<BlobRec>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(BLOBS)?;
        let v = t.get(d.to_string().as_str())?;
        v.map(|v| decode_blob(v.value())).transpose()
    }

    fn record_blob(&self, d: &Digest, size: u64, now_ms: u64, link: Option<(&str, Option<u64>)>) -> Result<()> {
        self.write(|b| {
            b.record_blob(d, size, now_ms)?;
            if let Some((repo, quota)) = link {
                b.link(repo, d, now_ms, quota)?;
            }
            Ok(())
        })
    }

    fn touch_blob(&self, d: &Digest, now_ms: u64) -> Result<bool> {
        self.write_lazy(|b| b.touch_blob(&d.to_string(), now_ms))
    }

    fn forget_blobs_if_unused(&self, ds: &[Digest], cutoff_ms: u64) -> Result<Vec<(Digest, u64)>> {
        self.write(|b| {
            let mut out = Vec::new();
            for d in ds {
                let s = d.to_string();
                if !b.holders(&s)?.is_empty() {
                    continue;
                }
                let Some(rec) = b.blob(&s)? else { continue };
                if rec.used_ms > cutoff_ms {
                    continue;
                }
                b.tx.open_table(BLOBS)?.remove(s.as_str())?;
                b.add_usage(TOTAL, -(rec.size as i128))?;
                out.push((d.clone(), rec.size));
            }
            Ok(out)
        })
    }

    fn purge_blob(&self, d: &Digest) -> Result<Vec<String>> {
        self.write(|b| {
            let ds = d.to_string();
            let repos = b.holders(&ds)?;
            for r in &repos {
                b.tx.open_table(LINKS)?.remove(k2(r, &ds).as_str())?;
                b.delete_manifest(r, d, &|_| false)?;
                b.release_if_unheld(r, &ds)?;
            }
            if let Some(rec) = b.blob(&ds)? {
                b.tx.open_table(BLOBS)?.remove(ds.as_str())?;
                b.add_usage(TOTAL, -(rec.size as i128))?;
            }
            Ok(repos)
        })
    }

    fn blobs(&self, visit: &mut dyn FnMut(Digest, BlobRec)) -> Result<()> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(BLOBS)?;
        for e in t.iter()? {
            let (k, v) = e?;
            visit(parse_digest(k.value())?, decode_blob(v.value())?);
        }
        Ok(())
    }

    fn link(&self, repo: &str, d: &Digest, now_ms: u64, quota: Option<u64>) -> Result<()> {
        self.write(|b| b.link(repo, d, now_ms, quota))
    }

    fn holds(&self, repo: &str, d: &Digest) -> Result<bool> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(HOLDERS)?;
        Ok(t.get(k2(&d.to_string(), repo).as_str())?.is_some())
    }

    fn unlink(&self, repo: &str, d: &Digest) -> Result<bool> {
        self.write(|b| b.unlink(repo, &d.to_string()))
    }

    fn unlink_if_stale(&self, repo: &str, d: &Digest, cutoff_ms: u64) -> Result<bool> {
        self.write(|b| {
            let ds = d.to_string();
            let t = b.tx.open_table(LINKS)?.get(k2(repo, &ds).as_str())?.map(|v| v.value());
            match t {
                // A manifest that references the blob keeps its link, whatever the GC's
                // snapshot said (the manifest may have arrived after it).
                Some(t) if t <= cutoff_ms && !b.referenced_in(repo, &ds)? => b.unlink(repo, &ds),
                _ => Ok(false),
            }
        })
    }

    fn links(&self, repo: &str) -> Result<Vec<(Digest, u64)>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(LINKS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            let (k, v) = e?;
            out.push((parse_digest(&k.value()[repo.len() + 1..])?, v.value()));
        }
        Ok(out)
    }

    fn holders(&self, d: &Digest) -> Result<Vec<String>> {
        let ds = d.to_string();
        let rx = self.db.begin_read()?;
        let t = rx.open_table(HOLDERS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(&ds, None)))? {
            out.push(e?.0.value()[ds.len() + 1..].to_string());
        }
        Ok(out)
    }

    fn repositories(&self, after: Option<&str>, n: usize) -> Result<(Vec<String>, bool)> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(REPOS)?;
        let lo = after.map(Bound::Excluded).unwrap_or(Bound::Unbounded);
        let mut out = Vec::new();
        for e in t.range::<&str>((lo, Bound::Unbounded))? {
            if out.len() == n {
                return Ok((out, true));
            }
            out.push(e?.0.value().to_string());
        }
        Ok((out, false))
    }

    fn repo_exists(&self, repo: &str) -> Result<bool> {
        let rx = self.db.begin_read()?;
        Ok(rx.open_table(REPOS)?.get(repo)?.is_some())
    }

    fn put_manifest(&self, repo: &str, d: &Digest, put: &ManifestPut<'_>) -> Result<()> {
        self.write(|b| b.put_manifest(repo, d, put))
    }

    fn manifest(&self, repo: &str, d: &Digest) -> Result<Option<ManifestMeta>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(MANIFESTS)?;
        let v = t.get(k2(repo, &d.to_string()).as_str())?;
        Ok(v.map(|v| serde_json::from_slice(v.value())).transpose()?)
    }

    fn delete_manifest(&self, repo: &str, d: &Digest, immutable: &dyn Fn(&str) -> bool) -> Result<bool> {
        self.write(|b| b.delete_manifest(repo, d, immutable))
    }

    fn manifests(&self, repo: &str) -> Result<Vec<(Digest, ManifestMeta)>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            let (k, v) = e?;
            out.push((parse_digest(&k.value()[repo.len() + 1..])?, serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    fn all_manifests(&self, visit: &mut dyn FnMut(&str, Digest, &ManifestMeta)) -> Result<()> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(MANIFESTS)?;
        for e in t.iter()? {
            let (k, v) = e?;
            let key = k.value();
            let Some((repo, d)) = key.split_once('\0') else { continue };
            let meta: ManifestMeta = serde_json::from_slice(v.value())?;
            visit(repo, parse_digest(d)?, &meta);
        }
        Ok(())
    }

    fn set_tag(&self, repo: &str, tag: &str, d: &Digest, expect: &TagExpect, immutable: bool, now_ms: u64) -> Result<()> {
        self.write(|b| {
            if b.tx.open_table(MANIFESTS)?.get(k2(repo, &d.to_string()).as_str())?.is_none() {
                return Err(StoreError::NotInRepo { repo: repo.to_string(), what: "manifest", digest: d.clone() });
            }
            b.set_tag(repo, tag, d, expect, immutable, now_ms)
        })
    }

    fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRec>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(TAGS)?;
        let v = t.get(k2(repo, tag).as_str())?;
        v.map(|v| decode_tag(v.value())).transpose()
    }

    fn delete_tag(&self, repo: &str, tag: &str, immutable: bool) -> Result<bool> {
        self.write(|b| {
            let key = k2(repo, tag);
            let mut t = b.tx.open_table(TAGS)?;
            let cur = t.get(key.as_str())?.map(|v| decode_tag(v.value())).transpose()?;
            let Some(cur) = cur else { return Ok(false) };
            if immutable {
                return Err(StoreError::Immutable { repo: repo.to_string(), tag: tag.to_string(), current: cur.digest });
            }
            t.remove(key.as_str())?;
            Ok(true)
        })
    }

    fn tags(&self, repo: &str, after: Option<&str>, n: usize) -> Result<Option<(Vec<String>, bool)>> {
        let rx = self.db.begin_read()?;
        if rx.open_table(REPOS)?.get(repo)?.is_none() {
            return Ok(None);
        }
        let t = rx.open_table(TAGS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(repo, after)))? {
            if out.len() == n {
                return Ok(Some((out, true)));
            }
            out.push(e?.0.value()[repo.len() + 1..].to_string());
        }
        Ok(Some((out, false)))
    }

    fn repo_summary(&self, repo: &str) -> Result<RepoSummary> {
        // One read transaction, sizes from the blob records (a manifest's bytes are a blob
        // too): what a page showing 50 repositories can afford.
        let rx = self.db.begin_read()?;
        let blobs = rx.open_table(BLOBS)?;
        let size =
            |d: &str| -> Result<u64> { blobs.get(d)?.map(|v| decode_blob(v.value()).map(|b| b.size)).transpose().map(|s| s.unwrap_or(0)) };
        let mut bytes = 0;
        for e in rx.open_table(LINKS)?.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            bytes += size(&e?.0.value()[repo.len() + 1..])?;
        }
        for e in rx.open_table(MANIFESTS)?.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            bytes += size(&e?.0.value()[repo.len() + 1..])?;
        }
        let mut updated_ms = None;
        for e in rx.open_table(TAGS)?.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            let (_, v) = e?;
            let ms = v.value().split_once(' ').and_then(|(ms, _)| ms.parse::<u64>().ok());
            updated_ms = updated_ms.max(ms);
        }
        Ok(RepoSummary { bytes, updated_ms })
    }

    fn tags_with_times(&self, repo: &str) -> Result<Vec<(String, TagRec)>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(TAGS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(repo, None)))? {
            let (k, v) = e?;
            out.push((k.value()[repo.len() + 1..].to_string(), decode_tag(v.value())?));
        }
        Ok(out)
    }

    fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<(Digest, ManifestMeta)>> {
        let prefix = k2(repo, &subject.to_string());
        let rx = self.db.begin_read()?;
        let t = rx.open_table(REFERRERS)?;
        let m = rx.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for e in t.range::<&str>(as_ref_bounds(&under(&prefix, None)))? {
            let (k, _) = e?;
            let ds = &k.value()[prefix.len() + 1..];
            if let Some(v) = m.get(k2(repo, ds).as_str())? {
                out.push((parse_digest(ds)?, serde_json::from_slice(v.value())?));
            }
        }
        Ok(out)
    }

    fn put_upload(&self, id: &str, rec: &UploadRec) -> Result<()> {
        self.write(|b| b.put_upload(id, rec))
    }

    fn touch_upload(&self, id: &str, rec: &UploadRec) -> Result<()> {
        // A crash that loses it loses only the session's last activity time.
        self.write_lazy(|b| b.put_upload(id, rec))
    }

    fn upload(&self, id: &str) -> Result<Option<UploadRec>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(UPLOADS)?;
        let v = t.get(id)?;
        Ok(v.map(|v| serde_json::from_slice(v.value())).transpose()?)
    }

    fn remove_upload(&self, id: &str) -> Result<bool> {
        self.write(|b| Ok(b.tx.open_table(UPLOADS)?.remove(id)?.is_some()))
    }

    fn uploads(&self) -> Result<Vec<(String, UploadRec)>> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(UPLOADS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    fn set_classes(&self, classes: Classes) -> Result<()> {
        let fp = classes.fingerprint();
        *self.classes.write() = classes;
        if self.get_meta("classes")?.as_deref() != Some(fp.as_str()) {
            let fixed = self.recount(true)?;
            if !fixed.is_empty() {
                tracing::info!(changes = fixed.len(), "usage counters rebuilt for the configured namespaces and upstreams");
            }
            self.set_meta("classes", &fp)?;
        }
        Ok(())
    }

    fn usage(&self) -> Result<Usage> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(USAGE)?;
        let get = |k: &str| -> Result<u64> { Ok(t.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        let (total, hosted) = (get(TOTAL)?, get(HOSTED)?);
        Ok(Usage { hosted, cache: total.saturating_sub(hosted) })
    }

    fn group_bytes(&self, group: &str) -> Result<u64> {
        let rx = self.db.begin_read()?;
        let t = rx.open_table(USAGE)?;
        Ok(t.get(group)?.map(|v| v.value()).unwrap_or(0))
    }

    fn note(&self, key: &str) -> Result<Option<String>> {
        self.get_meta(&format!("note.{key}"))
    }

    fn set_note(&self, key: &str, value: Option<&str>) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            let k = format!("note.{key}");
            match value {
                Some(v) => t.insert(k.as_str(), v)?,
                None => t.remove(k.as_str())?,
            };
        }
        tx.commit()?;
        Ok(())
    }

    fn recount(&self, repair: bool) -> Result<Vec<String>> {
        let write = |b: &mut Batch<'_>| -> Result<Vec<String>> {
            // Holders from links and manifests.
            let mut holders: std::collections::BTreeSet<(String, String)> = Default::default();
            for table in [LINKS] {
                for e in b.tx.open_table(table)?.iter()? {
                    let (k, _) = e?;
                    if let Some((r, d)) = k.value().split_once('\0') {
                        holders.insert((d.to_string(), r.to_string()));
                    }
                }
            }
            for e in b.tx.open_table(MANIFESTS)?.iter()? {
                let (k, _) = e?;
                if let Some((r, d)) = k.value().split_once('\0') {
                    holders.insert((d.to_string(), r.to_string()));
                }
            }
            let mut sizes: HashMap<String, u64> = HashMap::new();
            let mut total = 0u64;
            for e in b.tx.open_table(BLOBS)?.iter()? {
                let (k, v) = e?;
                let r = decode_blob(v.value())?;
                total += r.size;
                sizes.insert(k.value().to_string(), r.size);
            }
            let mut repos: HashMap<String, u64> = HashMap::new();
            let mut group_refs: HashMap<String, u64> = HashMap::new();
            for (d, r) in &holders {
                *repos.entry(r.clone()).or_default() += 1;
                let g = b.classes.group(r);
                if g != CACHE_GROUP {
                    *group_refs.entry(k2(HOSTED, d)).or_default() += 1;
                }
                *group_refs.entry(k2(&g, d)).or_default() += 1;
            }
            let mut usage: HashMap<String, u64> = HashMap::new();
            usage.insert(TOTAL.to_string(), total);
            usage.insert(HOSTED.to_string(), 0);
            for k in group_refs.keys() {
                let (g, d) = k.split_once('\0').expect("group key");
                *usage.entry(g.to_string()).or_default() += sizes.get(d).copied().unwrap_or(0);
            }
            let mut diffs = Vec::new();
            macro_rules! compare {
                ($table:expr, $want:expr, $what:literal) => {{
                    let mut have: HashMap<String, u64> = HashMap::new();
                    for e in b.tx.open_table($table)?.iter()? {
                        let (k, v) = e?;
                        have.insert(k.value().to_string(), v.value());
                    }
                    let want: &HashMap<String, u64> = $want;
                    for (k, v) in want {
                        if have.get(k) != Some(v) {
                            diffs.push(format!("{} {:?}: recorded {:?}, actual {}", $what, k.replace('\0', " "), have.get(k), v));
                        }
                    }
                    for (k, v) in &have {
                        if !want.contains_key(k) && *v != 0 {
                            diffs.push(format!("{} {:?}: recorded {}, actual none", $what, k.replace('\0', " "), v));
                        }
                    }
                    if repair && (want.len() != have.len() || want.iter().any(|(k, v)| have.get(k) != Some(v))) {
                        let mut t = b.tx.open_table($table)?;
                        t.retain(|_, _| false)?;
                        for (k, v) in want {
                            t.insert(k.as_str(), *v)?;
                        }
                    }
                }};
            }
            compare!(REPOS, &repos, "repository");
            compare!(GROUP_REFS, &group_refs, "reference count");
            compare!(USAGE, &usage, "usage");
            let have_holders = b.tx.open_table(HOLDERS)?.len()?;
            if have_holders != holders.len() as u64 {
                diffs.push(format!("holder index has {have_holders} entries, actual {}", holders.len()));
            }
            if repair {
                let mut t = b.tx.open_table(HOLDERS)?;
                t.retain(|_, _| false)?;
                for (d, r) in &holders {
                    t.insert(k2(d, r).as_str(), ())?;
                }
            }
            Ok(diffs)
        };
        self.write(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, RedbMeta) {
        let dir = tempfile::tempdir().unwrap();
        let m = RedbMeta::open(&dir.path().join("meta.redb"), 1 << 20).unwrap();
        m.set_classes(Classes { cache_roots: vec!["docker.io".into()], namespaces: vec!["team".into()] }).unwrap();
        (dir, m)
    }

    fn put(m: &RedbMeta, repo: &str, d: &Digest, tags: &[&str], expect: TagExpect, immutable: bool) -> Result<()> {
        let meta = ManifestMeta { media_type: "x".into(), size: 2, ..Default::default() };
        let imm = move |_: &str| immutable;
        m.put_manifest(
            repo,
            d,
            &ManifestPut { meta: &meta, tags, expect, blobs: &[], children: &[], immutable: &imm, quota: None, now_ms: 1, outbox: None },
        )
    }

    #[test]
    fn tags_compare_and_swap_and_immutability() {
        let (_d, m) = db();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        m.record_blob(&a, 1, 1, None).unwrap();
        m.record_blob(&b, 1, 1, None).unwrap();
        put(&m, "team/x", &a, &["v1"], TagExpect::Absent, false).unwrap();
        assert!(matches!(put(&m, "team/x", &b, &["v1"], TagExpect::Absent, false), Err(StoreError::Conflict { .. })));
        assert!(matches!(put(&m, "team/x", &b, &["v1"], TagExpect::Any, true), Err(StoreError::Immutable { .. })));
        // The refused write left nothing behind: not the manifest, not the tag.
        assert_eq!(m.tag("team/x", "v1").unwrap().unwrap().digest, a);
        assert!(m.manifest("team/x", &b).unwrap().is_none());
        put(&m, "team/x", &b, &["v1"], TagExpect::Is(a.clone()), false).unwrap();
        assert_eq!(m.tag("team/x", "v1").unwrap().unwrap().digest, b);
    }

    #[test]
    fn counters_follow_links_and_recount_agrees() {
        let (_d, m) = db();
        let a = Digest::sha256_of(b"a");
        let c = Digest::sha256_of(b"c");
        m.record_blob(&a, 100, 1, Some(("team/x", None))).unwrap();
        m.link("team/y", &a, 1, None).unwrap();
        m.record_blob(&c, 10, 1, Some(("docker.io/library/c", None))).unwrap();
        assert_eq!(m.usage().unwrap(), Usage { hosted: 100, cache: 10 });
        assert_eq!(m.group_bytes("team").unwrap(), 100);
        assert!(matches!(m.link("team/z", &c, 1, Some(105)), Err(StoreError::Quota { .. })));
        m.link("team/z", &a, 1, Some(100)).unwrap(); // already counted in the namespace
        assert!(m.recount(false).unwrap().is_empty(), "{:?}", m.recount(false).unwrap());
        m.unlink("team/x", &a).unwrap();
        m.unlink("team/y", &a).unwrap();
        m.unlink("team/z", &a).unwrap();
        assert_eq!(m.usage().unwrap(), Usage { hosted: 0, cache: 110 });
        assert_eq!(m.repositories(None, 10).unwrap(), (vec!["docker.io/library/c".to_string()], false));
        assert_eq!(m.forget_blob_if_unused(&a, 1).unwrap(), Some(100));
        assert_eq!(m.forget_blob_if_unused(&c, 1).unwrap(), None, "held by a repository");
        assert!(m.recount(false).unwrap().is_empty());
    }

    #[test]
    fn pages_by_range() {
        let (_d, m) = db();
        let a = Digest::sha256_of(b"a");
        m.record_blob(&a, 1, 1, None).unwrap();
        let tags: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        put(&m, "team/a", &a, &refs, TagExpect::Any, false).unwrap();
        put(&m, "team/a/b", &a, &["other"], TagExpect::Any, false).unwrap();
        let (p, more) = m.tags("team/a", None, 10).unwrap().unwrap();
        assert_eq!((p.len(), more, p[0].as_str()), (10, true, "t00"));
        let (p, more) = m.tags("team/a", Some("t19"), 10).unwrap().unwrap();
        assert_eq!((p.len(), more, p[0].as_str()), (5, false, "t20"));
        assert!(m.tags("team/none", None, 10).unwrap().is_none());
        assert_eq!(m.repositories(Some("team/a"), 10).unwrap().0, vec!["team/a/b".to_string()]);
    }

    #[test]
    fn a_snapshot_loads_into_an_empty_index_as_it_was() {
        let (_d, m) = db();
        let (x, y) = (Digest::sha256_of(b"x"), Digest::sha256_of(b"y"));
        m.record_blob(&x, 1, 5, Some(("team/a", None))).unwrap();
        m.record_blob(&y, 2, 5, None).unwrap();
        put(&m, "team/a", &x, &["v1", "latest"], TagExpect::Any, false).unwrap();
        m.put_upload("u1", &UploadRec { repo: "team/a".into(), client: "c".into(), created_ms: 1, active_ms: 2 }).unwrap();
        m.set_meta("seq", "42").unwrap();
        let mut snap = Vec::new();
        assert_eq!(m.dump("seq", &mut snap).unwrap(), 42);
        let (_d2, n) = db();
        n.record_blob(&Digest::sha256_of(b"stale"), 9, 1, None).unwrap();
        assert_eq!(n.load("seq", &mut snap.as_slice()).unwrap(), 42);
        assert_eq!(n.get_meta("seq").unwrap().as_deref(), Some("42"));
        assert!(n.blob(&Digest::sha256_of(b"stale")).unwrap().is_none(), "what the index held before is replaced");
        assert_eq!(n.tags("team/a", None, 10).unwrap(), m.tags("team/a", None, 10).unwrap());
        assert_eq!(n.tag("team/a", "v1").unwrap(), m.tag("team/a", "v1").unwrap());
        assert_eq!(n.manifests("team/a").unwrap(), m.manifests("team/a").unwrap());
        assert_eq!(n.holders(&x).unwrap(), m.holders(&x).unwrap());
        assert_eq!(n.blob(&y).unwrap(), m.blob(&y).unwrap());
        assert_eq!(n.uploads().unwrap(), m.uploads().unwrap());
        assert!(n.referrers("team/a", &x).unwrap().is_empty(), "a table without records is there, empty");
        assert_eq!(n.usage().unwrap(), m.usage().unwrap());
        assert!(n.recount(false).unwrap().is_empty());
        assert!(n.load("seq", &mut &b"not a snapshot at all......"[..]).is_err());
    }
}
