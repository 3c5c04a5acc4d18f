//! The storage interface: a content-addressed blob store and a metadata store. Everything
//! above `store` reaches storage through these (via [`super::Store`]); a backend implements
//! both. Methods block (disk, database commits): the `Store` facade calls them from blocking
//! threads, never from the async workers, except the point reads marked as cheap.

use super::error::{Result, StoreError};
use crate::oci::{Digest, Hasher};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;

/// What berth records about a manifest beside its bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// See [`MetaStore::repo_summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoSummary {
    pub bytes: u64,
    /// The newest tag write; None without tags.
    pub updated_ms: Option<u64>,
}

/// A tag: where it points and when it was last written (milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRec {
    pub digest: Digest,
    pub updated_ms: u64,
}

/// A committed blob: its size, when it was first stored and when it was last reused (the
/// GC grace period and the cache's recency both count from `used_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRec {
    pub size: u64,
    pub created_ms: u64,
    pub used_ms: u64,
}

/// An open upload session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRec {
    pub repo: String,
    /// The client address that opened it, for the per-client cap.
    pub client: String,
    pub created_ms: u64,
    pub active_ms: u64,
}

/// A tag write's precondition (compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagExpect {
    Any,
    Absent,
    Is(Digest),
}

/// Bytes held, by class: content some hosted repository holds, and everything else
/// (mirrored content, orphans awaiting GC).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub hosted: u64,
    pub cache: u64,
}

/// How a blob's bytes reach the client.
pub enum BlobBody {
    /// A local file (sent with sendfile where the connection allows).
    File { file: File, len: u64 },
    /// Bytes as a backend streams them.
    Stream { stream: futures::stream::BoxStream<'static, std::io::Result<Bytes>>, len: u64 },
    /// The client fetches it elsewhere (a presigned URL).
    Redirect { url: String, len: u64 },
}

impl BlobBody {
    /// The blob's size (not what is left to send).
    pub fn size(&self) -> u64 {
        match self {
            BlobBody::File { len, .. } | BlobBody::Stream { len, .. } | BlobBody::Redirect { len, .. } => *len,
        }
    }
}

/// Which accounting group a repository belongs to: the hosted namespace it is in, or the
/// mirror cache. Usage and quota are counted per group.
#[derive(Debug, Clone, Default)]
pub struct Classes {
    /// First path components of mirrored repositories (upstream names).
    pub cache_roots: Vec<String>,
    /// Hosted namespace prefixes.
    pub namespaces: Vec<String>,
}

pub const CACHE_GROUP: &str = "@cache";
/// Hosted repositories outside every configured namespace.
pub const OTHER_GROUP: &str = "@other";

impl Classes {
    pub fn is_cache(&self, repo: &str) -> bool {
        let first = repo.split('/').next().unwrap_or_default();
        self.cache_roots.iter().any(|r| r == first)
    }

    /// The namespace prefix holding `repo` (the longest that matches), `@cache`, or `@other`
    /// for a hosted repository outside every configured namespace.
    pub fn group(&self, repo: &str) -> String {
        if self.is_cache(repo) {
            return CACHE_GROUP.to_string();
        }
        self.namespaces
            .iter()
            .filter(|p| repo == p.as_str() || (repo.starts_with(p.as_str()) && repo.as_bytes().get(p.len()) == Some(&b'/')))
            .max_by_key(|p| p.len())
            .cloned()
            .unwrap_or_else(|| OTHER_GROUP.to_string())
    }

    /// Changes when the grouping changes, so counters kept under another grouping are rebuilt.
    pub fn fingerprint(&self) -> String {
        let mut c = self.cache_roots.clone();
        c.sort();
        let mut n = self.namespaces.clone();
        n.sort();
        format!("cache={};ns={}", c.join(","), n.join(","))
    }
}

/// A manifest write: the repository must hold `blobs` and `children` (their links are
/// refreshed, so GC cannot take them from under the manifest), no tag matching `immutable` may
/// move, `quota` bounds the repository's group, and `expect` applies to every tag.
pub struct ManifestPut<'a> {
    pub meta: &'a ManifestMeta,
    pub tags: &'a [&'a str],
    pub expect: TagExpect,
    pub blobs: &'a [Digest],
    pub children: &'a [Digest],
    pub immutable: &'a dyn Fn(&str) -> bool,
    pub quota: Option<u64>,
    pub now_ms: u64,
    /// An event outbox entry (key, body) written in the same transaction, by a metadata store
    /// that `keeps_outbox`; others leave it to the caller.
    pub outbox: Option<(&'a str, &'a [u8])>,
}

/// A blob being written, not yet visible under any digest.
pub trait BlobTemp: Send {
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// A read handle on the bytes written so far (readers follow a fill while it runs).
    fn follower(&self) -> Result<File>;
    /// Makes the (already verified) content durable under `d`. Idempotent: the same content
    /// may be published twice.
    fn publish(self: Box<Self>, d: &Digest) -> Result<()>;
}

/// One request's appends to an upload session.
pub trait UploadWriter: Send {
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Makes what was written part of the session (durable where the backend says so).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Content-addressed bytes.
pub trait BlobStore: Send + Sync {
    /// Size of a committed blob. Cheap.
    fn stat(&self, d: &Digest) -> Result<Option<u64>>;
    /// Whether the durable copy exists, whatever this node keeps nearer.
    fn stat_stored(&self, d: &Digest) -> Result<Option<u64>> {
        self.stat(d)
    }
    /// A committed blob of `size` bytes, or the `(first, last)` bytes of it. A `File` body is
    /// the whole file (the caller seeks); a `Stream` carries only the range asked for.
    fn open(&self, d: &Digest, size: u64, range: Option<(u64, u64)>) -> Result<Option<BlobBody>>;
    /// A whole (small) blob: manifests.
    fn read(&self, d: &Digest) -> Result<Option<Bytes>>;
    fn reader(&self, d: &Digest) -> Result<Option<Box<dyn Read + Send>>>;
    /// A writer for content expected to hash to `expected` (a backend may stream it towards
    /// that name; nothing becomes visible before [`BlobTemp::publish`]).
    fn create(&self, expected: &Digest) -> Result<Box<dyn BlobTemp>>;
    /// As `create`, for content another writer is expected to publish first (a cluster node
    /// streaming the owner's fill): a shared backend stores it only if, at publish, it is
    /// still missing.
    fn create_deferred(&self, expected: &Digest) -> Result<Box<dyn BlobTemp>> {
        self.create(expected)
    }
    fn delete(&self, d: &Digest) -> Result<()>;
    /// Every committed blob with its size; a name that is not a digest comes as `Err(name)`.
    fn walk(&self, visit: &mut dyn FnMut(std::result::Result<Digest, String>, u64)) -> Result<()>;
    /// Writers in progress (or left by a crash before the last restart).
    fn temp_count(&self) -> usize;

    // Small named objects beside the content, shared by every node on the same storage (the
    // token signing key). Names are relative paths such as `auth/token-key.pem`.
    fn object(&self, name: &str) -> Result<Option<Bytes>>;
    /// Stores `data` under `name` unless something is there; false if something was (the
    /// caller reads that instead). Private to berth's user where the backend has modes.
    fn put_object_new(&self, name: &str, data: &[u8]) -> Result<bool>;
    /// The small objects under the folder `dir`, as names relative to it, in name order.
    fn objects(&self, dir: &str) -> Result<Vec<String>>;
    /// Removes a small object; absent is not an error. The removal may be undone by a crash
    /// (callers must tolerate an object coming back).
    fn delete_object(&self, name: &str) -> Result<()>;

    /// Other processes (nodes on the same bucket) may append to the same upload sessions, so
    /// what this process remembers of a session must be checked against the store.
    fn shared(&self) -> bool {
        false
    }

    // Upload session data: appended across requests, published as a blob at the end.
    fn upload_create(&self, id: &str) -> Result<()>;
    fn upload_appender(&self, id: &str) -> Result<Box<dyn UploadWriter>>;
    fn upload_reader(&self, id: &str) -> Result<Option<Box<dyn Read + Send>>>;
    fn upload_len(&self, id: &str) -> Result<Option<u64>>;
    /// The SHA-256 state of a session's data and its length, for a session this process has
    /// not seen (after a restart). By default the data is read back and hashed whole.
    fn upload_hasher(&self, id: &str) -> Result<Option<(Hasher, u64)>> {
        let Some(mut r) = self.upload_reader(id)? else { return Ok(None) };
        let mut h = Hasher::new(crate::oci::Algorithm::Sha256);
        let n = super::hash_into(&mut r, &mut h)?;
        Ok(Some((h, n)))
    }
    /// Makes a verified session's data durable as blob `d`.
    fn upload_publish(&self, id: &str, d: &Digest) -> Result<()>;
    fn upload_remove(&self, id: &str) -> Result<()>;
}

/// Repositories, manifests, tags, links, sessions and counters. Every method is atomic; writes
/// are durable when they return.
pub trait MetaStore: Send + Sync {
    // ---- blobs ----
    fn blob(&self, d: &Digest) -> Result<Option<BlobRec>>;
    /// Records a published blob, or refreshes `used_ms` of a known one; with `link`, links it
    /// into that repository in the same transaction (checking `quota` for its group).
    fn record_blob(&self, d: &Digest, size: u64, now_ms: u64, link: Option<(&str, Option<u64>)>) -> Result<()>;
    /// Refreshes a blob's grace period; false if it is not recorded.
    fn touch_blob(&self, d: &Digest, now_ms: u64) -> Result<bool>;
    /// GC: forgets a blob no repository holds and unused since `cutoff_ms`. Returns its size
    /// if it was forgotten.
    fn forget_blob_if_unused(&self, d: &Digest, cutoff_ms: u64) -> Result<Option<u64>> {
        Ok(self.forget_blobs_if_unused(std::slice::from_ref(d), cutoff_ms)?.pop().map(|(_, size)| size))
    }
    /// The same for many blobs in one transaction (one commit, not one per blob): returns
    /// those forgotten with their sizes.
    fn forget_blobs_if_unused(&self, ds: &[Digest], cutoff_ms: u64) -> Result<Vec<(Digest, u64)>>;
    /// Forgets a blob whatever holds it, with every link and manifest naming it (eviction,
    /// fsck repair). Returns the repositories that held it.
    fn purge_blob(&self, d: &Digest) -> Result<Vec<String>>;
    /// Records another use of a blob that is already recorded (a push of content the store
    /// has): false, writing nothing, when it is not recorded (any more), so the caller stores
    /// the content first.
    fn reuse_blob(&self, d: &Digest, size: u64, now_ms: u64, link: Option<(&str, Option<u64>)>) -> Result<bool> {
        if self.blob(d)?.is_none() {
            return Ok(false);
        }
        self.record_blob(d, size, now_ms, link)?;
        Ok(true)
    }
    /// Waits until no sweep that forgot `d` is still deleting its content (where writers on
    /// other nodes can sweep; one process orders this with its stripe locks).
    fn await_sweeps(&self, _d: &Digest) -> Result<()> {
        Ok(())
    }
    /// Tells that the content of blobs forgotten or purged is deleted: recording them again
    /// is safe from here on.
    fn swept(&self, _ds: &[Digest]) -> Result<()> {
        Ok(())
    }
    /// Every recorded blob (a consistent snapshot).
    fn blobs(&self, visit: &mut dyn FnMut(Digest, BlobRec)) -> Result<()>;

    // ---- repositories ----
    /// Links a recorded blob into `repo` (or refreshes the link's time); `quota` bounds the
    /// repository's group.
    fn link(&self, repo: &str, d: &Digest, now_ms: u64, quota: Option<u64>) -> Result<()>;
    /// A link or a manifest of `repo` names `d`. Cheap.
    fn holds(&self, repo: &str, d: &Digest) -> Result<bool>;
    fn unlink(&self, repo: &str, d: &Digest) -> Result<bool>;
    /// GC: removes the link if it was last refreshed before `cutoff_ms` and no manifest of the
    /// repository references the blob (checked in the same transaction).
    fn unlink_if_stale(&self, repo: &str, d: &Digest, cutoff_ms: u64) -> Result<bool>;
    fn links(&self, repo: &str) -> Result<Vec<(Digest, u64)>>;
    /// Repositories that hold `d`. Cheap.
    fn holders(&self, d: &Digest) -> Result<Vec<String>>;
    /// Up to `n` repository names after `after`, and whether more follow.
    fn repositories(&self, after: Option<&str>, n: usize) -> Result<(Vec<String>, bool)>;
    fn repo_exists(&self, repo: &str) -> Result<bool>;

    // ---- manifests and tags ----
    /// Records a manifest (its bytes already a blob) and points its tags at it, atomically.
    fn put_manifest(&self, repo: &str, d: &Digest, put: &ManifestPut<'_>) -> Result<()>;
    fn manifest(&self, repo: &str, d: &Digest) -> Result<Option<ManifestMeta>>;
    /// Removes a manifest and every tag pointing at it; refused if an immutable tag does.
    fn delete_manifest(&self, repo: &str, d: &Digest, immutable: &dyn Fn(&str) -> bool) -> Result<bool>;
    fn manifests(&self, repo: &str) -> Result<Vec<(Digest, ManifestMeta)>>;
    /// Every manifest of every repository (a consistent snapshot): GC marks from it.
    fn all_manifests(&self, visit: &mut dyn FnMut(&str, Digest, &ManifestMeta)) -> Result<()>;
    /// Points a tag at a manifest the repository holds, if `expect` holds.
    fn set_tag(&self, repo: &str, tag: &str, d: &Digest, expect: &TagExpect, immutable: bool, now_ms: u64) -> Result<()>;
    fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRec>>;
    fn delete_tag(&self, repo: &str, tag: &str, immutable: bool) -> Result<bool>;
    /// Up to `n` tags of `repo` after `after`, and whether more follow; None if no such repo.
    fn tags(&self, repo: &str, after: Option<&str>, n: usize) -> Result<Option<(Vec<String>, bool)>>;
    fn tags_with_times(&self, repo: &str) -> Result<Vec<(String, TagRec)>>;
    /// The bytes of the blobs `repo` links and of its manifests (content shared with other
    /// repositories counts in each), and its newest tag write. Reads every link, manifest and
    /// tag of the repository.
    fn repo_summary(&self, repo: &str) -> Result<RepoSummary> {
        let mut bytes = 0;
        for (d, _) in self.links(repo)? {
            bytes += self.blob(&d)?.map_or(0, |b| b.size);
        }
        bytes += self.manifests(repo)?.iter().map(|(_, m)| m.size).sum::<u64>();
        let updated_ms = self.tags_with_times(repo)?.iter().map(|(_, t)| t.updated_ms).max();
        Ok(RepoSummary { bytes, updated_ms })
    }
    fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<(Digest, ManifestMeta)>>;

    // ---- upload sessions ----
    fn put_upload(&self, id: &str, rec: &UploadRec) -> Result<()>;
    /// Records a session's activity; may be lost in a crash.
    fn touch_upload(&self, id: &str, rec: &UploadRec) -> Result<()>;
    fn upload(&self, id: &str) -> Result<Option<UploadRec>>;
    fn remove_upload(&self, id: &str) -> Result<bool>;
    fn uploads(&self) -> Result<Vec<(String, UploadRec)>>;

    // ---- counters ----
    /// Sets how repositories are grouped; counters kept under another grouping are rebuilt.
    fn set_classes(&self, classes: Classes) -> Result<()>;
    /// Store-wide bytes by class. O(1).
    fn usage(&self) -> Result<Usage>;
    /// Bytes held by one group (a hosted namespace). O(1).
    fn group_bytes(&self, group: &str) -> Result<u64>;
    /// Recomputes every counter from the records; returns what differed (fsck).
    fn recount(&self, repair: bool) -> Result<Vec<String>>;

    // ---- this node's operational notes (not content: never replicated) ----
    /// Whether the event outbox lives here, so that an event is written in the transaction of
    /// what it records (one commit instead of two). Otherwise it is objects in the blob store.
    fn keeps_outbox(&self) -> bool {
        false
    }

    /// Adds an outbox entry; false if the key exists. Only where `keeps_outbox`.
    fn outbox_put(&self, _key: &str, _body: &[u8]) -> Result<bool> {
        Err(StoreError::Meta("this metadata store keeps no event outbox".into()))
    }

    fn outbox_keys(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn outbox_get(&self, _key: &str) -> Result<Option<Bytes>> {
        Ok(None)
    }

    fn outbox_delete(&self, _keys: &[String]) -> Result<()> {
        Ok(())
    }

    fn note(&self, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }
    fn set_note(&self, _key: &str, _value: Option<&str>) -> Result<()> {
        Ok(())
    }
}
