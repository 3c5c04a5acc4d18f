//! One upstream fetch per digest, however many clients ask and from however many
//! repositories (each repository that asked is linked when the fill commits). The first request
//! starts a fill task that writes a temp file while hashing and publishes progress on a watch
//! channel; every request, first or later, streams from that growing file through its own
//! read handle. The last byte is held back until the digest verifies, so a corrupt fill ends
//! every client's transfer early instead of completing it. Only a verified file is renamed
//! into the store. The task outlives the client that started it.

use crate::metrics;
use crate::oci::{Digest, ErrorCode, OciError};
use crate::store::Store;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, StreamExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const CHUNK: u64 = 1 << 20;
/// Bytes gathered from the upstream before one write.
const BATCH: usize = 256 << 10;

/// Where a fill's bytes come from: the total length if known, and the body.
pub struct Source {
    pub total: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, OciError>>,
}

#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Set once the upstream answered with a body (its length may still be unknown).
    pub started: bool,
    pub total: Option<u64>,
    pub written: u64,
    pub done: Option<Result<(), OciError>>,
}

/// Opens the upstream body from a byte offset. A fill opens it once from 0; when the disk is
/// full, each reader opens it again from where it got to and streams the rest uncached.
pub type Opener = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<Source, OciError>> + Send + Sync>;

pub struct Fill {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    open: Opener,
    /// Repositories that asked for this digest while it filled: each is linked at the end.
    repos: Mutex<Vec<String>>,
}

#[derive(Default)]
pub struct Fills {
    active: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl Fills {
    pub fn in_flight(&self) -> usize {
        self.active.lock().len()
    }

    /// Whether a fill of `digest` started by other repositories is running.
    pub fn filling_for_others(&self, repo: &str, digest: &Digest) -> bool {
        self.active.lock().get(digest).is_some_and(|f| !f.repos.lock().iter().any(|r| r == repo))
    }

    fn join(&self, repo: &str, digest: &Digest) -> Option<Arc<Fill>> {
        let f = self.active.lock().get(digest).cloned()?;
        let mut repos = f.repos.lock();
        if !repos.iter().any(|r| r == repo) {
            repos.push(repo.to_string());
        }
        drop(repos);
        Some(f)
    }

    /// Joins the fill of `digest`, or starts one with `open` as its source. Returns the fill
    /// and whether this call started it. After a successful fill the blob is in the store and
    /// linked into every repository that joined.
    pub async fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        repo: &str,
        digest: &Digest,
        stall_timeout: Duration,
        source_label: &'static str,
        open: Opener,
    ) -> Result<(Arc<Fill>, bool), OciError> {
        self.join_or_start_with(store, repo, digest, stall_timeout, source_label, open, false).await
    }

    /// As `join_or_start`; with `deferred`, a fill whose source publishes the blob itself (a
    /// cluster owner) stores it only if it is still missing when the fill ends.
    #[allow(clippy::too_many_arguments)]
    pub async fn join_or_start_with(
        self: &Arc<Self>,
        store: &Arc<Store>,
        repo: &str,
        digest: &Digest,
        stall_timeout: Duration,
        source_label: &'static str,
        open: Opener,
        deferred: bool,
    ) -> Result<(Arc<Fill>, bool), OciError> {
        if let Some(f) = self.join(repo, digest) {
            return Ok((f, false));
        }
        let writer = store.writer_with(digest, deferred).await?;
        let file = Arc::new(writer.follower()?);
        let (tx, rx) = watch::channel(Progress::default());
        let fill = Arc::new(Fill { file, progress: rx, open: open.clone(), repos: Mutex::new(vec![repo.to_string()]) });
        let raced = {
            let mut active = self.active.lock();
            let raced = active.contains_key(digest);
            if !raced {
                active.insert(digest.clone(), fill.clone());
            }
            raced
        };
        if raced {
            // Another request started it while this one made its temp file.
            return match self.join(repo, digest) {
                Some(f) => Ok((f, false)),
                None => Box::pin(self.join_or_start_with(store, repo, digest, stall_timeout, source_label, open, deferred)).await,
            };
        }
        let fills = self.clone();
        let store = store.clone();
        let source = open(0);
        let task_fill = fill.clone();
        let digest = digest.clone();
        metrics::FILLS_IN_FLIGHT.inc();
        tokio::spawn(async move {
            let mut result = run(&store, &digest, repo_of(&task_fill), writer, source, &tx, stall_timeout).await;
            if let Err(e) = &result {
                if e.code == ErrorCode::DigestInvalid {
                    metrics::DIGEST_MISMATCH.with_label_values(&[source_label]).inc();
                }
                if e.code == ErrorCode::InsufficientStorage {
                    metrics::FILLS_UNCACHED.inc();
                }
                tracing::warn!(digest = %digest, error = %e, "fill failed; nothing cached");
            }
            // Leave the table before announcing the end: a request that arrives now finds
            // the blob in the store (or starts a fresh fill after a failure). No repository
            // can join after this, so every one that did is linked below.
            fills.active.lock().remove(&digest);
            if result.is_ok() {
                let repos: Vec<String> = task_fill.repos.lock().iter().skip(1).cloned().collect();
                for r in repos {
                    if let Err(e) = store.link_blob(&r, &digest, None).await {
                        result = Err(e.into());
                    }
                }
            }
            metrics::FILLS_IN_FLIGHT.dec();
            tx.send_modify(|p| p.done = Some(result));
        });
        Ok((fill, true))
    }
}

fn repo_of(fill: &Fill) -> String {
    fill.repos.lock()[0].clone()
}

async fn run(
    store: &Arc<Store>,
    digest: &Digest,
    repo: String,
    mut writer: crate::store::BlobWriter,
    source: BoxFuture<'static, Result<Source, OciError>>,
    tx: &watch::Sender<Progress>,
    stall_timeout: Duration,
) -> Result<(), OciError> {
    let Source { total, mut body } = source.await?;
    tx.send_modify(|p| {
        p.started = true;
        p.total = total;
    });
    // The body ended while a batch was gathered: never poll it again.
    let mut ended = false;
    loop {
        if ended {
            break;
        }
        let next = tokio::time::timeout(stall_timeout, body.next())
            .await
            .map_err(|_| OciError::msg(ErrorCode::UpstreamTimeout, "upstream stalled mid-blob"))?;
        let Some(chunk) = next else { break };
        let mut chunk = chunk?;
        // Whatever else has already arrived goes to disk in the same blocking call: upstream
        // bodies come in pieces of a few KiB, and a round trip to the blocking pool per piece
        // would cost more than the write.
        if chunk.len() < BATCH {
            let mut batch = bytes::BytesMut::from(&chunk[..]);
            while batch.len() < BATCH {
                match body.next().now_or_never() {
                    Some(Some(Ok(more))) => batch.extend_from_slice(&more),
                    Some(Some(Err(e))) => return Err(e),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            chunk = batch.freeze();
        }
        if total.is_some_and(|t| writer.written() + chunk.len() as u64 > t) {
            return Err(OciError::msg(ErrorCode::UpstreamUnavailable, "upstream sent more bytes than it announced"));
        }
        writer.write(chunk).await?;
        let w = writer.written();
        tx.send_modify(|p| p.written = w);
    }
    if let Some(t) = total {
        if writer.written() != t {
            return Err(OciError::msg(
                ErrorCode::UpstreamUnavailable,
                format!("upstream ended the blob at {} of {t} bytes", writer.written()),
            ));
        }
    }
    store.commit(writer, digest, Some((&repo, None))).await?;
    store.cache_filled(digest).await;
    Ok(())
}

impl Fill {
    /// Waits for the upstream's answer; returns the total length (None if it sent no length).
    pub async fn started(&self) -> Result<Option<u64>, OciError> {
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                if let Some(Err(e)) = &p.done {
                    return Err(e.clone());
                }
                if p.started {
                    return Ok(p.total);
                }
            }
            if rx.changed().await.is_err() {
                return Err(OciError::msg(ErrorCode::Internal, "fill ended without a result"));
            }
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Bytes `[start, end)` (end None: to the end) as they arrive.
    pub fn stream(self: &Arc<Self>, start: u64, end: Option<u64>) -> BoxStream<'static, std::io::Result<Bytes>> {
        struct St {
            fill: Arc<Fill>,
            rx: watch::Receiver<Progress>,
            pos: u64,
            end: Option<u64>,
            finished: bool,
            direct: Option<BoxStream<'static, Result<Bytes, OciError>>>,
        }
        let st = St { fill: self.clone(), rx: self.progress.clone(), pos: start, end, finished: false, direct: None };
        futures::stream::unfold(st, |mut st| async move {
            if st.finished {
                return None;
            }
            loop {
                if let Some(direct) = st.direct.as_mut() {
                    // The disk is full: the rest comes straight from upstream, uncached.
                    let want = st.end.map(|e| e - st.pos);
                    return match direct.next().await {
                        _ if want == Some(0) => None,
                        None => None,
                        Some(Err(e)) => {
                            st.finished = true;
                            Some((Err(std::io::Error::other(e.to_string())), st))
                        }
                        Some(Ok(mut b)) => {
                            if let Some(w) = want {
                                b.truncate(w.min(b.len() as u64) as usize);
                            }
                            st.pos += b.len() as u64;
                            Some((Ok(b), st))
                        }
                    };
                }
                let seen: Result<(u64, bool, Option<u64>), OciError> = {
                    let p = st.rx.borrow_and_update();
                    match &p.done {
                        Some(Err(e)) => Err(e.clone()),
                        _ => {
                            let verified = matches!(p.done, Some(Ok(())));
                            // A whole body holds back its final byte until the digest
                            // verifies, so a corrupt fill never completes a transfer. A range
                            // cannot be cut short that way (it may end before the last byte):
                            // it waits for the verified blob.
                            let avail = match (verified, st.end) {
                                (true, _) => p.written,
                                (false, Some(_)) => 0,
                                (false, None) => p.written.saturating_sub(1),
                            };
                            let end = st.end.or(if verified { Some(p.written) } else { None });
                            Ok((end.map_or(avail, |e| e.min(avail)), verified, end))
                        }
                    }
                };
                let (limit, verified, end) = match seen {
                    Ok(x) => x,
                    Err(e) if e.code == ErrorCode::InsufficientStorage => match (st.fill.open)(st.pos).await {
                        Ok(src) => {
                            st.direct = Some(src.body);
                            continue;
                        }
                        Err(e2) => {
                            st.finished = true;
                            return Some((Err(std::io::Error::other(e2.to_string())), st));
                        }
                    },
                    Err(e) => {
                        st.finished = true;
                        return Some((Err(std::io::Error::other(e.to_string())), st));
                    }
                };
                if st.pos < limit {
                    let n = (limit - st.pos).min(CHUNK) as usize;
                    let f = st.fill.file.clone();
                    let at = st.pos;
                    let res = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n];
                        f.read_exact_at(&mut buf, at).map(|_| Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match res {
                        Ok(b) => {
                            st.pos += b.len() as u64;
                            return Some((Ok(b), st));
                        }
                        Err(e) => {
                            st.finished = true;
                            return Some((Err(e), st));
                        }
                    }
                }
                if end.is_some_and(|e| st.pos >= e) && (verified || st.end.is_some()) {
                    return None;
                }
                if st.rx.changed().await.is_err() {
                    st.finished = true;
                    return Some((Err(std::io::Error::other("fill ended without a result")), st));
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn source(
        chunks: Vec<Result<Bytes, OciError>>,
        total: Option<u64>,
        gate: Arc<tokio::sync::Semaphore>,
    ) -> BoxFuture<'static, Result<Source, OciError>> {
        Box::pin(async move {
            let body = futures::stream::iter(chunks)
                .then(move |c| {
                    let gate = gate.clone();
                    async move {
                        gate.acquire().await.unwrap().forget();
                        c
                    }
                })
                .boxed();
            Ok(Source { total, body })
        })
    }

    async fn collect(s: BoxStream<'static, std::io::Result<Bytes>>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_share_one_fill_and_stream_before_it_completes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let data: Vec<u8> = (0..3 * CHUNK as usize).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(Algorithm::Sha256, &data);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let chunks: Vec<_> = data.chunks(CHUNK as usize).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let n = chunks.len();
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = data.len() as u64;
        let chunks = Arc::new(parking_lot::Mutex::new(Some(chunks)));
        let (o, g) = (opened.clone(), gate.clone());
        let opener: Opener = Arc::new(move |_| {
            o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            source(chunks.lock().take().unwrap(), Some(total), g.clone())
        });
        let (f1, started1) = fills.join_or_start(&store, "m/r", &d, Duration::from_secs(5), "blob", opener.clone()).await.unwrap();
        // Another repository asking for the same digest joins the same fill.
        let (f2, started2) = fills.join_or_start(&store, "m/other", &d, Duration::from_secs(5), "blob", opener).await.unwrap();
        assert!(started1 && !started2 && opened.load(std::sync::atomic::Ordering::SeqCst) == 1);
        let mut s1 = f1.stream(0, None);
        let r2 = tokio::spawn(collect(f2.stream(0, None)));
        // First chunk released: the follower gets bytes while the fill is still running.
        gate.add_permits(1);
        let first = s1.next().await.unwrap().unwrap();
        assert!(!first.is_empty());
        assert!(f1.progress().done.is_none());
        for _ in 1..n {
            gate.add_permits(1);
        }
        let mut rest = first.to_vec();
        rest.extend(collect(s1).await.unwrap());
        assert_eq!(rest, data);
        assert_eq!(r2.await.unwrap().unwrap(), data);
        assert!(store.blob_linked("m/r", &d).unwrap());
        assert!(store.blob_linked("m/other", &d).unwrap(), "every repository that joined is linked");
        assert_eq!(fills.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_bytes_are_never_cached_and_readers_see_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let d = Digest::sha256_of(b"right");
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (f, _) = fills
            .join_or_start(&store, "m/r", &d, Duration::from_secs(5), "blob", {
                let g = gate.clone();
                Arc::new(move |_| source(vec![Ok(Bytes::from_static(b"wrong"))], Some(5), g.clone()))
            })
            .await
            .unwrap();
        gate.add_permits(1);
        let got = collect(f.stream(0, None)).await;
        assert!(got.is_err());
        assert!(store.blob_size(&d).unwrap().is_none());
        assert!(!store.blob_linked("m/r", &d).unwrap());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranges_of_a_filling_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let data = b"0123456789".to_vec();
        let d = Digest::sha256_of(&data);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (f, _) = fills
            .join_or_start(&store, "m/r", &d, Duration::from_secs(5), "blob", {
                let g = gate.clone();
                Arc::new(move |_| source(vec![Ok(Bytes::from_static(b"01234")), Ok(Bytes::from_static(b"56789"))], Some(10), g.clone()))
            })
            .await
            .unwrap();
        let r = tokio::spawn(collect(f.stream(2, Some(7))));
        gate.add_permits(1);
        gate.add_permits(1);
        assert_eq!(r.await.unwrap().unwrap(), b"23456");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_of_a_corrupt_fill_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let d = Digest::sha256_of(b"0123456789");
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (f, _) = fills
            .join_or_start(&store, "m/r", &d, Duration::from_secs(5), "blob", {
                let g = gate.clone();
                // The range 2..7 is complete after the first piece, but the blob is corrupt.
                Arc::new(move |_| source(vec![Ok(Bytes::from_static(b"01X3456")), Ok(Bytes::from_static(b"789"))], Some(10), g.clone()))
            })
            .await
            .unwrap();
        let r = tokio::spawn(collect(f.stream(2, Some(7))));
        gate.add_permits(2);
        assert!(r.await.unwrap().is_err(), "unverified bytes were served");
    }
}
