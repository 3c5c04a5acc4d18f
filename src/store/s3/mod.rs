//! The S3 backend: the bucket is the truth, the local disk a bounded cache of it (the hot
//! tier). Blobs live under `<prefix>blobs/<algo>/<2 hex>/<hex>` ([`blobs`]); upload sessions
//! under `<prefix>uploads/<id>/`; metadata is a journal of writes under `<prefix>journal/`
//! that every node replays into a local redb index ([`journal`]).
//!
//! The S3 client runs on a runtime of its own, so requests progress whatever the server's
//! workers are doing, and blocking callers (the store's methods run on blocking threads) wait
//! on a channel, never inside a runtime.

pub mod blobs;
pub mod journal;

use super::error::{Result, StoreError};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the bucket is and how to sign for it (`[storage.s3]`).
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Unset: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    /// Unset: the standard AWS environment and instance credentials.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Metadata journal entries between snapshots of the index.
    pub snapshot_every: u64,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            bucket: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            snapshot_every: 10_000,
        }
    }
}

impl S3Settings {
    /// How logs and errors name the storage (never with credentials).
    pub fn describe(&self) -> String {
        let at = self.endpoint.as_deref().unwrap_or("AWS");
        format!("bucket {:?} (prefix {:?}) at {at}", self.bucket, self.prefix)
    }
}

pub struct Bucket {
    s3: Arc<AmazonS3>,
    rt: Option<tokio::runtime::Runtime>,
    prefix: String,
    describe: String,
    /// The engine honours `If-None-Match: *` on PUT (detected at start).
    create_only: AtomicBool,
    healthy: AtomicBool,
}

impl Drop for Bucket {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime's workers.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether an error is the object being absent.
fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Bucket {
    /// Builds the client (no request yet). Requests that fail with 5xx, `SlowDown`, resets or
    /// timeouts are retried with exponential backoff and jitter for up to `retry_for`.
    pub fn new(s: &S3Settings, retry_for: Duration) -> Result<Arc<Bucket>> {
        // reqwest's rustls needs a process-wide provider; ring is the only one berth ships.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::new().with_bucket_name(&s.bucket).with_region(&s.region);
        if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        } else {
            // The standard AWS environment (keys, profile-less web identity, instance role).
            for (k, v) in std::env::vars() {
                if let Ok(key) = k.to_ascii_lowercase().parse() {
                    if k.starts_with("AWS_") && !matches!(k.as_str(), "AWS_BUCKET" | "AWS_BUCKET_NAME" | "AWS_ENDPOINT" | "AWS_REGION") {
                        b = b.with_config(key, v);
                    }
                }
            }
        }
        if let Some(ep) = &s.endpoint {
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 8,
            retry_timeout: retry_for,
        };
        let client = object_store::ClientOptions::new()
            .with_timeout(Duration::from_secs(60))
            .with_connect_timeout(Duration::from_secs(5))
            .with_pool_idle_timeout(Duration::from_secs(30))
            .with_allow_http(s.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
        let s3 = b
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("storage {}: {e}", s.describe())))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("berth-s3")
            .enable_all()
            .build()
            .map_err(StoreError::from)?;
        let prefix = match s.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(Arc::new(Bucket {
            s3: Arc::new(s3),
            rt: Some(rt),
            prefix,
            describe: s.describe(),
            create_only: AtomicBool::new(true),
            healthy: AtomicBool::new(true),
        }))
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn key(&self, k: &str) -> Key {
        Key::from(format!("{}{k}", self.prefix))
    }

    /// The key relative to the prefix (for listings).
    pub fn unprefix<'a>(&self, k: &'a str) -> &'a str {
        k.strip_prefix(self.prefix.as_str()).unwrap_or(k)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn create_only(&self) -> bool {
        self.create_only.load(Ordering::Relaxed)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime lives as long as the bucket").handle()
    }

    /// Runs `fut` on the bucket's runtime and waits for it. Only from blocking threads.
    pub fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("bucket runtime alive while the bucket is")
    }

    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.handle().spawn(fut);
    }

    pub fn client(&self) -> Arc<AmazonS3> {
        self.s3.clone()
    }

    /// Counts one request in the metrics (`bytes` sent; reads count theirs with
    /// [`Bucket::received`]). Absence and lost create-only races are answers, not errors.
    pub fn account<T>(
        &self,
        op: &'static str,
        started: Instant,
        bytes: u64,
        r: std::result::Result<T, object_store::Error>,
    ) -> Result<T, object_store::Error> {
        let result = match &r {
            Ok(_) => "ok",
            Err(e) if is_not_found(e) => "not_found",
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => "exists",
            Err(_) => "error",
        };
        crate::metrics::STORAGE_REQUESTS.with_label_values(&[op, result]).inc();
        crate::metrics::STORAGE_DURATION.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
        if bytes > 0 {
            crate::metrics::STORAGE_BYTES.with_label_values(&["out"]).inc_by(bytes);
        }
        if result == "error" {
            // Retries are behind us: readiness reports it until the watcher sees an answer.
            self.healthy.store(false, Ordering::Relaxed);
        }
        r
    }

    pub fn received(&self, bytes: u64) {
        crate::metrics::STORAGE_BYTES.with_label_values(&["in"]).inc_by(bytes);
    }

    pub fn unavailable(&self, what: &str, e: object_store::Error) -> StoreError {
        StoreError::Unavailable(format!("storage {} failed {what}: {}", self.describe, scrub(&e.to_string())))
    }

    /// GET a whole object; `None` if absent.
    pub fn get(&self, k: &str) -> Result<Option<Bytes>> {
        let (s3, key) = (self.s3.clone(), self.key(k));
        let t = Instant::now();
        let r = self.run(async move {
            match s3.get(&key).await {
                Ok(g) => g.bytes().await,
                Err(e) => Err(e),
            }
        });
        self.received(r.as_ref().map(|b| b.len() as u64).unwrap_or(0));
        match self.account("get", t, 0, r) {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.unavailable(&format!("reading {k}"), e)),
        }
    }

    /// Size of an object; `None` if absent.
    pub fn head(&self, k: &str) -> Result<Option<u64>> {
        let (s3, key) = (self.s3.clone(), self.key(k));
        let t = Instant::now();
        let r = self.run(async move { s3.head(&key).await });
        match self.account("head", t, 0, r) {
            Ok(m) => Ok(Some(m.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.unavailable(&format!("looking up {k}"), e)),
        }
    }

    /// PUT; with `create`, only if nothing is there yet (`Ok(false)` when something was).
    pub fn put(&self, k: &str, data: Bytes, create: bool) -> Result<bool> {
        if create && !self.create_only() && self.head(k)?.is_some() {
            return Ok(false);
        }
        let (s3, key) = (self.s3.clone(), self.key(k));
        let n = data.len() as u64;
        let mode = if create && self.create_only() { PutMode::Create } else { PutMode::Overwrite };
        let t = Instant::now();
        let r = self.run(async move { s3.put_opts(&key, PutPayload::from(data), PutOptions { mode, ..Default::default() }).await });
        match self.account("put", t, n, r) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) if create => Ok(false),
            Err(e) => Err(self.unavailable(&format!("writing {k}"), e)),
        }
    }

    pub fn delete(&self, k: &str) -> Result<()> {
        let (s3, key) = (self.s3.clone(), self.key(k));
        let t = Instant::now();
        let r = self.run(async move { s3.delete(&key).await });
        match self.account("delete", t, 0, r) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.unavailable(&format!("deleting {k}"), e)),
        }
    }

    /// Uploads a local file (a snapshot) as one object, in parts.
    pub fn put_file(&self, k: &str, path: &std::path::Path) -> Result<()> {
        let (s3, key, path) = (self.s3.clone(), self.key(k), path.to_path_buf());
        let t = Instant::now();
        let n = std::fs::metadata(&path)?.len();
        let r = self.run(async move {
            use std::io::Read;
            let upload = s3.put_multipart(&key).await?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, blobs::PART);
            let mut f = std::fs::File::open(&path).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = f.read(&mut buf).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
                if k == 0 {
                    break;
                }
                w.wait_for_capacity(2).await?;
                w.write(&buf[..k]);
            }
            w.finish().await.map(drop)
        });
        self.account("put_file", t, n, r).map_err(|e| self.unavailable(&format!("writing {k}"), e))
    }

    /// Downloads an object into a local file; false if it is absent.
    pub fn get_file(&self, k: &str, path: &std::path::Path) -> Result<bool> {
        let (s3, key, path) = (self.s3.clone(), self.key(k), path.to_path_buf());
        let t = Instant::now();
        let r = self.run(async move {
            use std::io::Write;
            let local = |e: std::io::Error| object_store::Error::Generic { store: "local", source: Box::new(e) };
            let mut body = s3.get(&key).await?.into_stream();
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).map_err(local)?);
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                f.write_all(&chunk).map_err(local)?;
            }
            f.flush().map_err(local)?;
            Ok(n)
        });
        match self.account("get_file", t, 0, r) {
            Ok(n) => {
                self.received(n);
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.unavailable(&format!("reading {k}"), e)),
        }
    }

    /// Server-side copy.
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (s3, a, b) = (self.s3.clone(), self.key(from), self.key(to));
        let t = Instant::now();
        let r = self.run(async move { s3.copy(&a, &b).await });
        self.account("copy", t, 0, r).map_err(|e| self.unavailable(&format!("copying {from}"), e))
    }

    /// Keys (relative to the prefix) and sizes under `dir`, after `after` if given, in key
    /// order; `visit` returns false to stop.
    pub fn list(&self, dir: &str, after: Option<&str>, visit: &mut dyn FnMut(&str, u64) -> bool) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::result::Result<Vec<(String, u64)>, object_store::Error>>(2);
        let (s3, key, off) = (self.s3.clone(), self.key(dir), after.map(|a| self.key(a)));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        self.spawn(async move {
            let mut s = match &off {
                Some(o) => s3.list_with_offset(Some(&key), o),
                None => s3.list(Some(&key)),
            }
            .chunks(256);
            while let Some(batch) = s.next().await {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let out: std::result::Result<Vec<_>, _> = batch.into_iter().map(|m| m.map(|m| (m.location.to_string(), m.size))).collect();
                let failed = out.is_err();
                if tx.send(out).is_err() || failed {
                    return;
                }
            }
        });
        let t = Instant::now();
        for batch in rx {
            let batch = self.account("list", t, 0, batch).map_err(|e| self.unavailable(&format!("listing {dir}"), e))?;
            for (k, size) in batch {
                if !visit(self.unprefix(&k), size) {
                    stop.store(true, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Keys under `dir` (relative to the prefix) with their last-modified times in the
    /// bucket's clock (milliseconds): for small listings such as the cluster's members.
    pub fn list_modified(&self, dir: &str) -> Result<Vec<(String, i64)>> {
        let (s3, key) = (self.s3.clone(), self.key(dir));
        let t = Instant::now();
        let r = self.run(async move {
            s3.list(Some(&key)).map(|m| m.map(|m| (m.location.to_string(), m.last_modified.timestamp_millis()))).collect::<Vec<_>>().await
        });
        let r: std::result::Result<Vec<_>, _> = r.into_iter().collect();
        let r = self.account("list", t, 0, r).map_err(|e| self.unavailable(&format!("listing {dir}"), e))?;
        Ok(r.into_iter().map(|(k, m)| (self.unprefix(&k).to_string(), m)).collect())
    }

    /// Reaches the bucket and writes, reads and deletes a probe object; detects whether the
    /// engine honours create-only PUTs. The error says what is wrong and which setting to look
    /// at.
    pub fn probe(&self, node: &str) -> std::result::Result<(), String> {
        let k = format!("probe/{node}-{}", uuid::Uuid::new_v4());
        let (s3, key) = (self.s3.clone(), self.key(&k));
        let r = self.run(async move {
            let put = |mode| PutOptions { mode, ..Default::default() };
            s3.put_opts(&key, PutPayload::from_static(b"probe"), put(PutMode::Create)).await.map_err(|e| ("write", e))?;
            let second = s3.put_opts(&key, PutPayload::from_static(b"probe"), put(PutMode::Create)).await;
            let create_only = matches!(second, Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }));
            if let Err(e) = second {
                if !create_only {
                    return Err(("write", e));
                }
            }
            s3.get(&key).await.map_err(|e| ("read", e))?.bytes().await.map_err(|e| ("read", e))?;
            s3.delete(&key).await.map_err(|e| ("delete", e))?;
            Ok(create_only)
        });
        match r {
            Ok(create_only) => {
                let before = self.create_only.swap(create_only, Ordering::Relaxed);
                if !create_only && before {
                    tracing::warn!(
                        storage = %self.describe,
                        "the object store ignores If-None-Match on PUT: blobs are published after a HEAD finds nothing (safe for one node, not for several writing the same journal)"
                    );
                }
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err((what, e)) => {
                self.healthy.store(false, Ordering::Relaxed);
                Err(explain(&self.describe, what, &e))
            }
        }
    }

    /// Marks the bucket healthy or not from a request's outcome (readiness).
    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
    }
}

/// How this process names itself in the journal and in probe objects.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{}-{}", if host.is_empty() { "berth" } else { &host }, std::process::id())
}

/// Watches the bucket while the store lives: readiness follows whether it answers.
pub fn watch(b: &Arc<Bucket>, every: Duration) {
    let weak = Arc::downgrade(b);
    std::thread::Builder::new()
        .name("berth-s3-health".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(b) = weak.upgrade() else { return };
            let ok = b.head("health").is_ok();
            if ok != b.healthy() {
                if ok {
                    tracing::info!(storage = %b.describe, "storage answers again");
                } else {
                    tracing::warn!(storage = %b.describe, "storage does not answer: not ready");
                }
            }
            b.set_healthy(ok);
        })
        .expect("spawning the storage watcher");
}

/// Removes anything that looks like a signature or credential from an error text.
fn scrub(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for part in s.split_inclusive(['&', '?', ' ']) {
        let lower = part.to_ascii_lowercase();
        if lower.starts_with("x-amz-signature=") || lower.starts_with("x-amz-credential=") || lower.starts_with("x-amz-security-token=") {
            out.push_str("[redacted]");
            if part.ends_with(['&', ' ']) {
                out.push(part.chars().last().unwrap_or(' '));
            }
        } else {
            out.push_str(part);
        }
    }
    out
}

/// What an operator should look at for a failed probe.
fn explain(describe: &str, what: &str, e: &object_store::Error) -> String {
    let text = scrub(&format!("{e:?} {e}"));
    let hint = if text.contains("NoSuchBucket") {
        "the bucket does not exist: create it or fix [storage.s3] bucket"
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("403") && what == "write" && text.contains("Forbidden") && !text.contains("AccessDenied")
    {
        "the credentials are refused: check [storage.s3] access_key_id and secret_access_key_file"
    } else if text.contains("AccessDenied") {
        "the credentials may not write to the bucket: grant PutObject, GetObject, DeleteObject and ListBucket"
    } else if text.contains("onnect") || text.contains("dns") || text.contains("timed out") || text.contains("error sending request") {
        "the endpoint is unreachable: check [storage.s3] endpoint (and region)"
    } else {
        "check [storage.s3]"
    };
    format!("storage {describe}: cannot {what} a probe object: {hint} ({})", text.lines().next().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrub_removes_signatures() {
        let s = super::scrub("GET http://h/b/k?X-Amz-Credential=AK%2F2026&X-Amz-Signature=abc&x=1 failed");
        assert!(!s.contains("abc") && !s.contains("AK%2F"), "{s}");
        assert!(s.contains("x=1"));
    }
}
