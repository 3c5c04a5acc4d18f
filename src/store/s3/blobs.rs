//! Blobs in the bucket, with local copies in a bounded hot tier.
//!
//! Writes stream to the bucket as they arrive: a fill or a monolithic push is a multipart
//! upload straight to the blob's key (parts of [`PART`] bytes, one in flight while the next
//! fills), completed only by `publish` after the store verified the digest, so nothing is
//! visible under a digest before it is whole and checked. The same bytes go to a local temp
//! file that readers follow during the fill and that becomes the hot copy.
//!
//! Upload sessions keep their data in a multipart upload under `uploads/<id>/data`, a tail
//! object for the bytes short of a whole part, and a state object with the parts' ETags and
//! the SHA-256 state after them. Any node can continue a session after a restart by reading
//! only the state and the tail.

use super::Bucket;
use crate::oci::sha256_raw::{Midstate, Sha256Raw};
use crate::oci::{Digest, Hasher};
use crate::store::error::{Result, StoreError};
use crate::store::traits::{BlobBody, BlobStore, BlobTemp, UploadWriter};
use bytes::Bytes;
use futures::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Multipart part size: above S3's 5 MiB minimum, a multiple of SHA-256's block, and all parts
/// but the last the same size (R2 requires it).
pub const PART: usize = 8 << 20;

pub fn blob_key(d: &Digest) -> String {
    format!("blobs/{}/{}/{}", d.algorithm().as_str(), &d.hex()[..2], d.hex())
}

/// Local copies of bucket objects, least recently used first out.
pub struct HotTier {
    dir: PathBuf,
    tmp: PathBuf,
    bound: u64,
    state: Mutex<HotState>,
}

#[derive(Default)]
struct HotState {
    used: u64,
    tick: u64,
    by_digest: HashMap<Digest, (u64, u64)>,
    by_tick: BTreeMap<u64, Digest>,
}

impl HotState {
    fn touch(&mut self, d: &Digest) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, t)) = self.by_digest.get_mut(d) {
            self.by_tick.remove(t);
            *t = tick;
            self.by_tick.insert(tick, d.clone());
        }
    }

    fn insert(&mut self, d: &Digest, size: u64) {
        self.remove(d);
        self.tick += 1;
        self.by_digest.insert(d.clone(), (size, self.tick));
        self.by_tick.insert(self.tick, d.clone());
        self.used += size;
    }

    fn remove(&mut self, d: &Digest) -> bool {
        match self.by_digest.remove(d) {
            Some((size, t)) => {
                self.by_tick.remove(&t);
                self.used -= size;
                true
            }
            None => false,
        }
    }
}

impl HotTier {
    /// Opens the hot tier under `root`, recounting what a previous run left (oldest first by
    /// modification time) and dropping temp files.
    pub fn open(root: &Path, bound: u64) -> Result<Arc<HotTier>> {
        let (dir, tmp) = (root.join("hot"), root.join("tmp"));
        fs::create_dir_all(&dir)?;
        fs::create_dir_all(&tmp)?;
        for e in fs::read_dir(&tmp)? {
            let _ = fs::remove_file(e?.path());
        }
        let hot = Arc::new(HotTier { dir, tmp, bound, state: Mutex::new(HotState::default()) });
        let mut found = Vec::new();
        for algo in fs::read_dir(&hot.dir)? {
            let algo = algo?;
            for pre in fs::read_dir(algo.path())? {
                for f in fs::read_dir(pre?.path())? {
                    let f = f?;
                    let name = format!("{}:{}", algo.file_name().to_string_lossy(), f.file_name().to_string_lossy());
                    let m = f.metadata()?;
                    match Digest::parse(&name) {
                        Ok(d) => found.push((m.modified().ok(), d, m.len())),
                        Err(_) => {
                            let _ = fs::remove_file(f.path());
                        }
                    }
                }
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        {
            let mut s = hot.state.lock();
            for (_, d, size) in found {
                s.insert(&d, size);
            }
        }
        hot.evict();
        Ok(hot)
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
    }

    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// The local copy, if there is one of the right size.
    fn get(&self, d: &Digest, size: u64) -> Option<File> {
        if !self.state.lock().by_digest.contains_key(d) {
            return None;
        }
        match File::open(self.path(d)) {
            Ok(f) if f.metadata().map(|m| m.len()).ok() == Some(size) => {
                self.state.lock().touch(d);
                Some(f)
            }
            _ => {
                self.remove(d);
                None
            }
        }
    }

    fn temp(&self) -> Result<(File, PathBuf)> {
        let path = self.tmp.join(uuid::Uuid::new_v4().to_string());
        Ok((File::options().write(true).create_new(true).open(&path)?, path))
    }

    /// Moves a complete local copy of `d` into the tier.
    fn insert(&self, from: &Path, d: &Digest, size: u64) -> Result<()> {
        if self.bound == 0 {
            let _ = fs::remove_file(from);
            return Ok(());
        }
        let dest = self.path(d);
        fs::create_dir_all(dest.parent().expect("hot path has a parent"))?;
        fs::rename(from, &dest)?;
        self.state.lock().insert(d, size);
        self.evict();
        Ok(())
    }

    fn remove(&self, d: &Digest) {
        if self.state.lock().remove(d) {
            let _ = fs::remove_file(self.path(d));
        }
    }

    /// Open handles keep their bytes: removing a copy never cuts a read in progress.
    fn evict(&self) {
        loop {
            let victim = {
                let mut s = self.state.lock();
                if s.used <= self.bound {
                    return;
                }
                let Some((_, d)) = s.by_tick.iter().next().map(|(t, d)| (*t, d.clone())) else { return };
                s.remove(&d);
                d
            };
            let _ = fs::remove_file(self.path(&victim));
        }
    }
}

pub struct S3Blobs {
    b: Arc<Bucket>,
    hot: Arc<HotTier>,
}

impl S3Blobs {
    fn temp(&self, expected: &Digest, deferred: bool) -> Result<Box<dyn BlobTemp>> {
        let (file, path) = self.hot.temp()?;
        Ok(Box::new(S3Temp {
            b: self.b.clone(),
            hot: self.hot.clone(),
            key: blob_key(expected),
            file,
            path,
            buf: Vec::new(),
            mp: None,
            parts: Vec::new(),
            inflight: None,
            written: 0,
            done: false,
            deferred,
        }))
    }

    pub fn new(b: Arc<Bucket>, hot: Arc<HotTier>) -> S3Blobs {
        S3Blobs { b, hot }
    }

    pub fn hot(&self) -> &Arc<HotTier> {
        &self.hot
    }

    /// Streams an object (or a range of it) from the bucket through a small channel, so a slow
    /// client holds a few chunks of memory, not the object. With `keep`, the whole object is
    /// also written to the hot tier and kept if its digest checks.
    fn stream(
        &self,
        k: String,
        range: Option<(u64, u64)>,
        keep: Option<(Digest, u64)>,
    ) -> futures::channel::mpsc::Receiver<io::Result<Bytes>> {
        let (mut tx, rx) = futures::channel::mpsc::channel::<io::Result<Bytes>>(4);
        let (b, hot) = (self.b.clone(), self.hot.clone());
        let s3 = b.client();
        self.b.spawn(async move {
            use futures::SinkExt;
            let key = b.key(&k);
            let opts = GetOptions { range: range.map(|(a, z)| GetRange::Bounded(a..z + 1)), ..Default::default() };
            let t = Instant::now();
            let got = b.account("get", t, 0, s3.get_opts(&key, opts).await);
            let mut body = match got {
                // What has arrived is sent as one piece: fewer wake-ups and writes per byte.
                Ok(r) => r.into_stream().ready_chunks(64).map(join_chunks),
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(b.unavailable(&format!("reading {k}"), e).to_string()))).await;
                    return;
                }
            };
            let mut copy = keep.and_then(|(d, size)| hot.temp().ok().map(|(f, p)| (f, p, Hasher::new(d.algorithm()), d, size, 0u64)));
            let mut sent = 0u64;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(bytes) => {
                        sent += bytes.len() as u64;
                        if let Some((f, p, h, ..)) = copy.as_mut() {
                            h.update(&bytes);
                            if f.write_all(&bytes).is_err() {
                                let _ = fs::remove_file(&*p);
                                copy = None;
                            }
                        }
                        if tx.send(Ok(bytes)).await.is_err() {
                            // The client left: the copy is incomplete.
                            if let Some((_, p, ..)) = copy {
                                let _ = fs::remove_file(p);
                            }
                            return;
                        }
                    }
                    Err(e) => {
                        if let Some((_, p, ..)) = copy {
                            let _ = fs::remove_file(p);
                        }
                        let _ = tx.send(Err(io::Error::other(b.unavailable(&format!("reading {k}"), e).to_string()))).await;
                        return;
                    }
                }
            }
            b.received(sent);
            if let Some((f, p, h, d, size, _)) = copy {
                drop(f);
                if sent == size && h.finish() == d {
                    if let Err(e) = hot.insert(&p, &d, size) {
                        tracing::warn!(digest = %d, error = %e, "keeping a hot copy");
                        let _ = fs::remove_file(&p);
                    }
                } else {
                    tracing::error!(digest = %d, "the bucket's copy does not match its digest: not kept");
                    let _ = fs::remove_file(&p);
                }
            }
        });
        rx
    }

    fn upload_key(id: &str, what: &str) -> String {
        format!("uploads/{id}/{what}")
    }

    fn session(&self, id: &str) -> Result<Option<SessionState>> {
        self.b.get(&Self::upload_key(id, "state"))?.map(|b| Ok(serde_json::from_slice(&b)?)).transpose()
    }

    fn tail(&self, id: &str, st: &SessionState) -> Result<Vec<u8>> {
        if st.tail_len == 0 {
            return Ok(Vec::new());
        }
        let k = Self::upload_key(id, &format!("tail.{}", st.tail_gen));
        let mut t =
            self.b.get(&k)?.ok_or_else(|| StoreError::Unavailable(format!("upload {id}: its tail object {k} is missing")))?.to_vec();
        t.truncate(st.tail_len as usize);
        Ok(t)
    }

    /// Turns a session's data into one readable object, `uploads/<id>/data` (the tail becomes
    /// the last part). No more appends after this.
    fn seal(&self, id: &str, st: &mut SessionState) -> Result<()> {
        if st.sealed {
            return Ok(());
        }
        let tail = self.tail(id, st)?;
        let data = Self::upload_key(id, "data");
        match st.mp.clone() {
            None => {
                self.b.put(&data, Bytes::from(tail), false)?;
            }
            Some(mp) => {
                let (s3, key) = (self.b.client(), self.b.key(&data));
                let mut parts: Vec<PartId> = st.parts.iter().map(|e| PartId { content_id: e.clone() }).collect();
                let idx = parts.len();
                let t = Instant::now();
                let n = tail.len() as u64;
                let r = self.b.run(async move {
                    if !tail.is_empty() || parts.is_empty() {
                        parts.push(s3.put_part(&key, &mp, idx, PutPayload::from(tail)).await?);
                    }
                    s3.complete_multipart(&key, &mp, parts).await
                });
                self.b.account("complete", t, n, r).map_err(|e| self.b.unavailable(&format!("completing upload {id}"), e))?;
            }
        }
        st.sealed = true;
        self.b.put(&Self::upload_key(id, "state"), Bytes::from(serde_json::to_vec(st)?), false)?;
        Ok(())
    }

    /// A blocking reader over an object.
    fn object_reader(&self, k: String) -> Box<dyn Read + Send> {
        Box::new(ChannelReader { rx: self.stream(k, None, None), cur: Bytes::new() })
    }
}

/// The chunks a read had ready, as one (or the first error).
fn join_chunks(v: Vec<object_store::Result<Bytes>>) -> object_store::Result<Bytes> {
    if v.len() == 1 {
        return v.into_iter().next().expect("one chunk");
    }
    let mut out = bytes::BytesMut::with_capacity(v.iter().map(|c| c.as_ref().map_or(0, |b| b.len())).sum());
    for c in v {
        out.extend_from_slice(&c?);
    }
    Ok(out.freeze())
}

/// Reads a channel of chunks as a byte stream (blocking).
struct ChannelReader {
    rx: futures::channel::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match futures::executor::block_on(self.rx.next()) {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// A blob being written: a local temp file (followers read it; it becomes the hot copy) and
/// a multipart upload to the final key, completed only by `publish`.
struct S3Temp {
    b: Arc<Bucket>,
    hot: Arc<HotTier>,
    key: String,
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    mp: Option<String>,
    parts: Vec<PartId>,
    inflight: Option<std::sync::mpsc::Receiver<std::result::Result<PartId, object_store::Error>>>,
    written: u64,
    done: bool,
    /// Nothing goes to the bucket while writing; `publish` uploads the local file only if
    /// the object is still missing then.
    deferred: bool,
}

impl S3Temp {
    fn wait_inflight(&mut self) -> Result<()> {
        if let Some(rx) = self.inflight.take() {
            let r = rx.recv().map_err(|_| StoreError::Unavailable("an upload part was lost".into()))?;
            let p = r.map_err(|e| self.b.unavailable(&format!("uploading a part of {}", self.key), e))?;
            self.parts.push(p);
        }
        Ok(())
    }

    /// Sends one part; the previous one must have finished first (one in flight, bounded
    /// memory).
    fn send_part(&mut self, data: Vec<u8>) -> Result<()> {
        self.wait_inflight()?;
        let (s3, key) = (self.b.client(), self.b.key(&self.key));
        if self.mp.is_none() {
            let t = Instant::now();
            let k2 = key.clone();
            let s = s3.clone();
            let r = self.b.run(async move { s.create_multipart(&k2).await });
            self.mp =
                Some(self.b.account("create_multipart", t, 0, r).map_err(|e| self.b.unavailable(&format!("starting {}", self.key), e))?);
        }
        let (mp, idx) = (self.mp.clone().expect("just created"), self.parts.len());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let b = self.b.clone();
        let n = data.len() as u64;
        self.b.spawn(async move {
            let t = Instant::now();
            let r = s3.put_part(&key, &mp, idx, PutPayload::from(data)).await;
            let _ = tx.send(b.account("put_part", t, n, r));
        });
        self.inflight = Some(rx);
        Ok(())
    }
}

impl BlobTemp for S3Temp {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data)?;
        self.written += data.len() as u64;
        if self.deferred {
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        while self.buf.len() >= PART {
            let rest = self.buf.split_off(PART);
            let part = std::mem::replace(&mut self.buf, rest);
            self.send_part(part)?;
        }
        Ok(())
    }

    fn follower(&self) -> Result<File> {
        Ok(File::open(&self.path)?)
    }

    fn publish(mut self: Box<Self>, d: &Digest) -> Result<()> {
        if self.deferred {
            if self.b.head(&self.key)?.is_none() {
                self.file.sync_data()?;
                self.b.put_file(&self.key, &self.path)?;
            }
        } else if self.mp.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            self.b.put(&self.key, data, true)?;
        } else {
            let last = std::mem::take(&mut self.buf);
            if !last.is_empty() {
                self.send_part(last)?;
            }
            self.wait_inflight()?;
            let (s3, key, mp) = (self.b.client(), self.b.key(&self.key), self.mp.clone().expect("multipart started"));
            if self.b.head(&self.key)?.is_some() {
                // Another writer published the same content: ours is not needed.
                // Best effort: one left behind only takes space until a bucket lifecycle rule aborts it.
                let t = Instant::now();
                let r = self.b.run(async move { s3.abort_multipart(&key, &mp).await });
                let _ = self.b.account("abort_multipart", t, 0, r);
            } else {
                let parts = std::mem::take(&mut self.parts);
                let t = Instant::now();
                let r = self.b.run(async move { s3.complete_multipart(&key, &mp, parts).await });
                self.b.account("complete", t, 0, r).map_err(|e| self.b.unavailable(&format!("completing {}", self.key), e))?;
            }
        }
        self.done = true;
        self.file.sync_data()?;
        if let Err(e) = self.hot.insert(&self.path, d, self.written) {
            tracing::warn!(digest = %d, error = %e, "keeping a hot copy");
            let _ = fs::remove_file(&self.path);
        }
        Ok(())
    }
}

impl Drop for S3Temp {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
            if let Some(mp) = self.mp.take() {
                let (s3, key, b) = (self.b.client(), self.b.key(&self.key), self.b.clone());
                self.b.spawn(async move {
                    let t = Instant::now();
                    let r = s3.abort_multipart(&key, &mp).await;
                    let _ = b.account("abort_multipart", t, 0, r);
                });
            }
        }
    }
}

/// What the bucket holds about an upload session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SessionState {
    mp: Option<String>,
    /// ETags of the whole parts, in order.
    parts: Vec<String>,
    /// SHA-256 state after the whole parts.
    mid: Midstate,
    /// The tail object's generation: a new tail never overwrites the one the state names.
    tail_gen: u64,
    tail_len: u64,
    /// The data has been made one object (no more appends).
    sealed: bool,
}

impl SessionState {
    fn len(&self) -> u64 {
        self.parts.len() as u64 * PART as u64 + self.tail_len
    }
}

/// One request's appends to a session kept in the bucket.
struct SessionWriter {
    b: Arc<Bucket>,
    id: String,
    st: SessionState,
    buf: Vec<u8>,
    hasher: Sha256Raw,
    dirty: bool,
}

impl UploadWriter for SessionWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        self.dirty = true;
        while self.buf.len() >= PART {
            let rest = self.buf.split_off(PART);
            let part = std::mem::replace(&mut self.buf, rest);
            self.hasher.update(&part);
            let data_key = self.b.key(&S3Blobs::upload_key(&self.id, "data"));
            let s3 = self.b.client();
            if self.st.mp.is_none() {
                let (s, k) = (s3.clone(), data_key.clone());
                let t = Instant::now();
                let r = self.b.run(async move { s.create_multipart(&k).await });
                self.st.mp = Some(self.b.account("create_multipart", t, 0, r).map_err(|e| self.b.unavailable("starting an upload", e))?);
            }
            let (mp, idx) = (self.st.mp.clone().expect("just created"), self.st.parts.len());
            let t = Instant::now();
            let r = self.b.run(async move { s3.put_part(&data_key, &mp, idx, PutPayload::from(part)).await });
            let p = self.b.account("put_part", t, PART as u64, r).map_err(|e| self.b.unavailable("uploading a part", e))?;
            self.st.parts.push(p.content_id);
            self.st.mid = self.hasher.midstate().expect("parts end on a block boundary");
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let old = (self.st.tail_gen, self.st.tail_len);
        self.st.tail_gen += 1;
        self.st.tail_len = self.buf.len() as u64;
        if !self.buf.is_empty() {
            let k = S3Blobs::upload_key(&self.id, &format!("tail.{}", self.st.tail_gen));
            self.b.put(&k, Bytes::from(std::mem::take(&mut self.buf)), false)?;
        }
        // The state names the new tail only once it is stored: a crash before this leaves the
        // previous state whole.
        self.b.put(&S3Blobs::upload_key(&self.id, "state"), Bytes::from(serde_json::to_vec(&self.st)?), false)?;
        if old.1 > 0 {
            let _ = self.b.delete(&S3Blobs::upload_key(&self.id, &format!("tail.{}", old.0)));
        }
        Ok(())
    }
}

impl BlobStore for S3Blobs {
    fn stat(&self, d: &Digest) -> Result<Option<u64>> {
        if let Some(&(size, _)) = self.hot.state.lock().by_digest.get(d) {
            return Ok(Some(size));
        }
        self.b.head(&blob_key(d))
    }

    fn stat_stored(&self, d: &Digest) -> Result<Option<u64>> {
        self.b.head(&blob_key(d))
    }

    fn open(&self, d: &Digest, size: u64, range: Option<(u64, u64)>) -> Result<Option<BlobBody>> {
        if let Some(file) = self.hot.get(d, size) {
            crate::metrics::HOT_TIER.with_label_values(&["hit"]).inc();
            return Ok(Some(BlobBody::File { file, len: size }));
        }
        crate::metrics::HOT_TIER.with_label_values(&["miss"]).inc();
        let keep = (range.is_none() && self.hot.bound >= size).then(|| (d.clone(), size));
        let rx = self.stream(blob_key(d), range, keep);
        Ok(Some(BlobBody::Stream { stream: rx.boxed(), len: size }))
    }

    fn read(&self, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(&(size, _)) = self.hot.state.lock().by_digest.get(d) {
            if let Ok(b) = fs::read(self.hot.path(d)) {
                if b.len() as u64 == size {
                    return Ok(Some(Bytes::from(b)));
                }
            }
        }
        self.b.get(&blob_key(d))
    }

    fn reader(&self, d: &Digest) -> Result<Option<Box<dyn Read + Send>>> {
        if self.b.head(&blob_key(d))?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.object_reader(blob_key(d))))
    }

    fn create(&self, expected: &Digest) -> Result<Box<dyn BlobTemp>> {
        self.temp(expected, false)
    }

    fn create_deferred(&self, expected: &Digest) -> Result<Box<dyn BlobTemp>> {
        self.temp(expected, true)
    }

    fn delete(&self, d: &Digest) -> Result<()> {
        self.hot.remove(d);
        self.b.delete(&blob_key(d))
    }

    fn walk(&self, visit: &mut dyn FnMut(std::result::Result<Digest, String>, u64)) -> Result<()> {
        self.b.list("blobs/", None, &mut |k, size| {
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["blobs", algo, pre, hex] if hex.starts_with(pre) => match Digest::parse(&format!("{algo}:{hex}")) {
                    Ok(d) => visit(Ok(d), size),
                    Err(_) => visit(Err(k.to_string()), size),
                },
                _ => visit(Err(k.to_string()), size),
            }
            true
        })
    }

    fn temp_count(&self) -> usize {
        fs::read_dir(&self.hot.tmp).map(|d| d.count()).unwrap_or(0)
    }

    fn object(&self, name: &str) -> Result<Option<Bytes>> {
        self.b.get(name)
    }

    fn put_object_new(&self, name: &str, data: &[u8]) -> Result<bool> {
        self.b.put(name, Bytes::copy_from_slice(data), true)
    }

    fn objects(&self, dir: &str) -> Result<Vec<String>> {
        let dir = format!("{}/", dir.trim_end_matches('/'));
        let mut out = Vec::new();
        self.b.list(&dir, None, &mut |k, _| {
            out.push(k.strip_prefix(dir.as_str()).unwrap_or(k).to_string());
            true
        })?;
        out.sort();
        Ok(out)
    }

    fn delete_object(&self, name: &str) -> Result<()> {
        self.b.delete(name)
    }

    fn shared(&self) -> bool {
        true
    }

    fn upload_create(&self, id: &str) -> Result<()> {
        let st = SessionState::default();
        self.b.put(&Self::upload_key(id, "state"), Bytes::from(serde_json::to_vec(&st)?), true)?;
        Ok(())
    }

    fn upload_appender(&self, id: &str) -> Result<Box<dyn UploadWriter>> {
        let st = self.session(id)?.ok_or_else(|| StoreError::UploadUnknown(id.to_string()))?;
        if st.sealed {
            return Err(StoreError::UploadUnknown(id.to_string()));
        }
        let buf = self.tail(id, &st)?;
        let hasher = Sha256Raw::from_midstate(st.mid);
        Ok(Box::new(SessionWriter { b: self.b.clone(), id: id.to_string(), st, buf, hasher, dirty: false }))
    }

    fn upload_reader(&self, id: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let Some(mut st) = self.session(id)? else { return Ok(None) };
        self.seal(id, &mut st)?;
        Ok(Some(self.object_reader(Self::upload_key(id, "data"))))
    }

    fn upload_len(&self, id: &str) -> Result<Option<u64>> {
        Ok(self.session(id)?.map(|s| s.len()))
    }

    fn upload_hasher(&self, id: &str) -> Result<Option<(Hasher, u64)>> {
        let Some(st) = self.session(id)? else { return Ok(None) };
        if st.sealed {
            let mut r = self.object_reader(Self::upload_key(id, "data"));
            let mut h = Hasher::new(crate::oci::Algorithm::Sha256);
            let n = crate::store::hash_into(&mut r, &mut h)?;
            return Ok(Some((h, n)));
        }
        let mut h = Sha256Raw::from_midstate(st.mid);
        h.update(&self.tail(id, &st)?);
        Ok(Some((Hasher::Sha256Raw(h), st.len())))
    }

    fn upload_publish(&self, id: &str, d: &Digest) -> Result<()> {
        let mut st = self.session(id)?.ok_or_else(|| StoreError::UploadUnknown(id.to_string()))?;
        let key = blob_key(d);
        if !st.sealed && st.mp.is_none() {
            // Smaller than a part: one create-only PUT, no copy.
            let tail = self.tail(id, &st)?;
            self.b.put(&key, Bytes::from(tail), true)?;
            return Ok(());
        }
        self.seal(id, &mut st)?;
        if self.b.head(&key)?.is_none() {
            self.b.copy(&Self::upload_key(id, "data"), &key)?;
        }
        Ok(())
    }

    fn upload_remove(&self, id: &str) -> Result<()> {
        if let Some(st) = self.session(id)? {
            if let (Some(mp), false) = (st.mp.clone(), st.sealed) {
                let (s3, key) = (self.b.client(), self.b.key(&Self::upload_key(id, "data")));
                let t = Instant::now();
                let r = self.b.run(async move { s3.abort_multipart(&key, &mp).await });
                let _ = self.b.account("abort_multipart", t, 0, r);
            }
        }
        let mut keys = Vec::new();
        self.b.list(&format!("uploads/{id}/"), None, &mut |k, _| {
            keys.push(k.to_string());
            true
        })?;
        // The state last: while it exists the session can still be found and removed.
        keys.sort_by_key(|k| k.ends_with("/state"));
        for k in keys {
            self.b.delete(&k)?;
        }
        Ok(())
    }
}
