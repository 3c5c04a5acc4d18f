//! Upload sessions. A session's record (repository, client, times) is in the metadata store and
//! its data in the blob store; no descriptor stays open between requests. The running sha256
//! lives in memory, so a PATCH never re-reads what earlier PATCHes sent; a session picked up
//! after a restart is hashed once, on a blocking thread. Open sessions are capped per client
//! address and per repository.

use super::error::{Result, StoreError};
use super::traits::{BlobStore, MetaStore, UploadRec, UploadWriter};
use super::{blocking, hash_into, now_ms, Limits, Store};
use crate::oci::{Algorithm, Digest, Hasher};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Session {
    pub id: String,
    pub repo: String,
    client: String,
    created_ms: u64,
    /// None until the data written before a restart has been hashed again.
    hasher: Option<Hasher>,
    offset: u64,
    /// Set when the session was committed, cancelled or expired under a waiting request.
    gone: bool,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Picked up after a restart and not hashed again yet: its offset is not known.
    pub fn needs_rehash(&self) -> bool {
        self.hasher.is_none()
    }
}

pub type SessionHandle = Arc<tokio::sync::Mutex<Session>>;

/// One request's appends to a session.
#[derive(Default)]
pub struct Appender {
    file: Option<Box<dyn UploadWriter>>,
    received: u64,
}

impl Appender {
    /// Bytes this request has appended so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

#[derive(Default)]
struct Counts {
    by_client: HashMap<String, usize>,
    by_repo: HashMap<String, usize>,
    total: usize,
}

impl Counts {
    fn add(&mut self, client: &str, repo: &str) {
        *self.by_client.entry(client.to_string()).or_default() += 1;
        *self.by_repo.entry(repo.to_string()).or_default() += 1;
        self.total += 1;
    }
    fn sub(&mut self, client: &str, repo: &str) {
        for (m, k) in [(&mut self.by_client, client), (&mut self.by_repo, repo)] {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        self.total = self.total.saturating_sub(1);
    }
}

pub struct Uploads {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    live: Mutex<HashMap<String, SessionHandle>>,
    counts: Mutex<Counts>,
    per_client: usize,
    per_repo: usize,
}

fn unknown(id: &str) -> StoreError {
    StoreError::UploadUnknown(id.to_string())
}

impl Uploads {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: &Limits) -> Result<Uploads> {
        let mut counts = Counts::default();
        for (_, rec) in meta.uploads()? {
            counts.add(&rec.client, &rec.repo);
        }
        Ok(Uploads {
            blobs,
            meta,
            live: Mutex::new(HashMap::new()),
            counts: Mutex::new(counts),
            per_client: limits.uploads_per_client,
            per_repo: limits.uploads_per_repository,
        })
    }

    /// Open sessions. O(1).
    pub fn in_progress(&self) -> usize {
        self.counts.lock().total
    }

    /// Opens a session for `repo` on behalf of `client`, unless either is at its cap.
    pub async fn create(&self, repo: &str, client: &str) -> Result<SessionHandle> {
        {
            let mut c = self.counts.lock();
            if c.by_client.get(client).copied().unwrap_or(0) >= self.per_client {
                return Err(StoreError::TooManyUploads(format!(
                    "this client has {} upload sessions open; finish or cancel some first",
                    self.per_client
                )));
            }
            if c.by_repo.get(repo).copied().unwrap_or(0) >= self.per_repo {
                return Err(StoreError::TooManyUploads(format!("{repo} has {} upload sessions open; try again later", self.per_repo)));
            }
            c.add(client, repo);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let rec = UploadRec { repo: repo.to_string(), client: client.to_string(), created_ms: now, active_ms: now };
        let (b, m, idc, recc) = (self.blobs.clone(), self.meta.clone(), id.clone(), rec.clone());
        if let Err(e) = blocking(move || {
            b.upload_create(&idc)?;
            m.put_upload(&idc, &recc)
        })
        .await
        {
            self.counts.lock().sub(client, repo);
            return Err(e);
        }
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.clone(),
            repo: rec.repo,
            client: rec.client,
            created_ms: now,
            hasher: Some(Hasher::new(Algorithm::Sha256)),
            offset: 0,
            gone: false,
        }));
        self.live.lock().insert(id, s.clone());
        Ok(s)
    }

    /// The session `id`, which must belong to `repo`.
    pub async fn get(&self, id: &str, repo: &str) -> Result<SessionHandle> {
        if let Some(s) = self.live.lock().get(id).cloned() {
            return Ok(s);
        }
        // Off the workers: a shared store may look in the bucket for a session another node
        // opened.
        let (m, idc) = (self.meta.clone(), id.to_string());
        let rec = blocking(move || m.upload(&idc)).await?.ok_or_else(|| unknown(id))?;
        if rec.repo != repo {
            return Err(unknown(id));
        }
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.to_string(),
            repo: rec.repo,
            client: rec.client,
            created_ms: rec.created_ms,
            hasher: None,
            offset: 0,
            gone: false,
        }));
        Ok(self.live.lock().entry(id.to_string()).or_insert(s).clone())
    }

    /// Checks that the session is still open and belongs to `repo`.
    pub fn check(&self, s: &Session, repo: &str) -> Result<()> {
        if s.gone || s.repo != repo {
            return Err(unknown(&s.id));
        }
        Ok(())
    }

    /// The bytes of session `id` (of `repo`) on disk, without waiting for a request that holds
    /// the session.
    pub async fn stored_len(&self, id: &str, repo: &str) -> Result<u64> {
        let (m, b, idc, repo) = (self.meta.clone(), self.blobs.clone(), id.to_string(), repo.to_string());
        blocking(move || match m.upload(&idc)? {
            Some(rec) if rec.repo == repo => b.upload_len(&idc)?.ok_or_else(|| unknown(&idc)),
            _ => Err(unknown(&idc)),
        })
        .await
    }

    /// Checks that the locked session is still open and belongs to `repo`, and hashes the data
    /// of a session resumed after a restart (on a blocking thread).
    pub async fn ready(&self, s: &mut Session, repo: &str) -> Result<()> {
        self.check(s, repo)?;
        if s.hasher.is_some() && self.blobs.shared() {
            // Another node may have appended since this one last saw the session.
            let (b, id) = (self.blobs.clone(), s.id.clone());
            if blocking(move || b.upload_len(&id)).await? != Some(s.offset) {
                s.hasher = None;
            }
        }
        if s.hasher.is_none() {
            let (b, id) = (self.blobs.clone(), s.id.clone());
            let (h, n) = blocking(move || b.upload_hasher(&id)?.ok_or_else(|| unknown(&id))).await?;
            s.hasher = Some(h);
            s.offset = n;
        }
        Ok(())
    }

    /// Appends one chunk of a request's body. The data file is opened at the request's first
    /// chunk and closed with the [`Appender`]; writes and hashing run on a blocking thread.
    pub async fn write(&self, s: &mut Session, a: &mut Appender, chunk: Bytes) -> Result<()> {
        let f = match a.file.take() {
            Some(f) => f,
            None => {
                let (b, id) = (self.blobs.clone(), s.id.clone());
                blocking(move || b.upload_appender(&id)).await?
            }
        };
        let mut h = s.hasher.take().ok_or_else(|| unknown(&s.id))?;
        let n = chunk.len() as u64;
        let res = blocking(move || {
            let mut f = f;
            f.write(&chunk)?;
            h.update(&chunk);
            Ok((f, h))
        })
        .await;
        match res {
            Ok((f, h)) => {
                a.file = Some(f);
                s.hasher = Some(h);
                s.offset += n;
                a.received += n;
                Ok(())
            }
            Err(e) => {
                // The hash no longer matches the data: the session cannot continue. A full
                // disk frees what the session held at once.
                self.remove_locked(s).await;
                Err(e)
            }
        }
    }

    /// Ends a request's appends: closes the file and records the session's activity.
    pub async fn finish(&self, s: &mut Session, a: Appender) -> Result<u64> {
        if let Some(f) = a.file {
            if let Err(e) = blocking(move || f.finish()).await {
                // What this request sent may or may not be part of the session now: the next
                // request starts from what the backend holds.
                s.hasher = None;
                return Err(e);
            }
        }
        if a.received > 0 {
            let rec = UploadRec { repo: s.repo.clone(), client: s.client.clone(), created_ms: s.created_ms, active_ms: now_ms() };
            let (m, id) = (self.meta.clone(), s.id.clone());
            blocking(move || m.touch_upload(&id, &rec)).await?;
        }
        Ok(a.received)
    }

    /// Removes a locked session and its data.
    pub async fn remove_locked(&self, s: &mut Session) {
        if s.gone {
            return;
        }
        s.gone = true;
        self.forget(&s.id, &s.client, &s.repo).await;
    }

    async fn forget(&self, id: &str, client: &str, repo: &str) {
        self.live.lock().remove(id);
        let (b, m, idc) = (self.blobs.clone(), self.meta.clone(), id.to_string());
        let removed = blocking(move || {
            // Data first: on a full disk it frees the space the record's removal may need.
            b.upload_remove(&idc)?;
            m.remove_upload(&idc)
        })
        .await;
        match removed {
            Ok(true) => self.counts.lock().sub(client, repo),
            Ok(false) => {}
            Err(e) => tracing::warn!(upload = id, error = %e, "removing an upload session"),
        }
    }

    /// Removes a session by id (expiry), waiting for a request that holds it.
    pub async fn remove(&self, id: &str) {
        let handle = self.live.lock().get(id).cloned();
        match handle {
            Some(h) => self.remove_locked(&mut *h.lock().await).await,
            None => {
                if let Ok(Some(rec)) = self.meta.upload(id) {
                    self.forget(id, &rec.client, &rec.repo).await;
                }
            }
        }
    }

    /// Verifies the session's content against `expected` and publishes it as a blob linked
    /// into the session's repository. The session is gone afterwards either way: a failed
    /// commit stores nothing.
    pub async fn commit(&self, store: &Arc<Store>, s: &mut Session, expected: &Digest, quota: Option<u64>) -> Result<u64> {
        let hasher = s.hasher.take().ok_or_else(|| unknown(&s.id))?;
        let (st, id, d, repo, size) = (store.clone(), s.id.clone(), expected.clone(), s.repo.clone(), s.offset);
        let result = blocking(move || {
            let actual = if d.algorithm() == Algorithm::Sha256 {
                hasher.finish()
            } else {
                let mut r = st.blobs.upload_reader(&id)?.ok_or_else(|| unknown(&id))?;
                let mut h = Hasher::new(d.algorithm());
                hash_into(&mut r, &mut h)?;
                h.finish()
            };
            if actual != d {
                return Err(StoreError::DigestMismatch { expected: d, actual });
            }
            let b = st.blobs.clone();
            st.publish(&d, size, Some((&repo, quota)), |d| b.upload_publish(&id, d))?;
            Ok(size)
        })
        .await;
        self.remove_locked(s).await;
        result
    }

    /// Whether sessions may be continued by other nodes (their state is checked on each use).
    pub fn shared(&self) -> bool {
        self.blobs.shared()
    }

    /// Ids and last-activity times of every session, for expiry.
    pub fn list(&self) -> Result<Vec<(String, u64)>> {
        Ok(self.meta.uploads()?.into_iter().map(|(id, r)| (id, r.active_ms)).collect())
    }
}
