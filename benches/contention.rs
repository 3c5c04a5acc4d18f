//! One worker, heavy disk work: does any request wait for another's disk work? The release
//! `berth` binary runs with `[server] threads = 1` and a hosted namespace `team`; a probe
//! client asks for `GET /v2/` over and over (sequentially, one keep-alive connection), and a
//! second probe opens a new connection per request, while berth
//!
//!   1. re-hashes a 2 GiB upload session after a restart (the running hash lives in memory; the
//!      first request for the session after a restart reads the whole file again), once with the
//!      file evicted from the page cache (read from disk) and once with it cached; then commits
//!      it with `PUT ?digest=`;
//!   2. collects 100,000 orphan blobs (`POST /gc` on the admin listener);
//!   3. takes pushes from 64 clients at once (1 MiB blobs, a config and a manifest each round).
//!
//! and at idle, as a baseline. CNCF distribution 2.8 (`docker-registry`), when installed, runs
//! scenario 3 too (it cannot be limited to one thread; it is Go). Target (from the issue):
//! `GET /v2/` p99 ≤ 20 ms in every scenario. Not a test: it measures, writes
//! target/bench/contention.md and prints it.
//!
//!     cargo bench --bench contention
//!
//! Work directories are under target/bench/contention-work/ (the real disk, not tmpfs) and are
//! removed afterwards. Knobs (environment): BENCH_RESUME_MIB (2048), BENCH_GC_BLOBS (100000),
//! BENCH_PUSH_CLIENTS (64), BENCH_PUSH_SECS (10), BENCH_PUSH_BLOB_KIB (1024), BENCH_IDLE_SECS
//! (3), BENCH_PROBE_GAP_MS (1; the pause between two probe requests; the new-connection probe
//! pauses 10× as long), BENCH_ONLY (scenario numbers, e.g. "1,3"), BENCH_OUT (target/bench).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::{env_or, Rng};
#[path = "common/http1.rs"]
mod http1;

use berth::oci::Digest;
use berth::store::local::meta::RedbMeta;
use berth::store::{Classes, ManifestMeta, MetaStore};
use http1::Conn;
use sha2::Digest as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The target: `GET /v2/` p99 in milliseconds.
const TARGET_P99_MS: f64 = 20.0;

fn out_dir() -> PathBuf {
    PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// A path from a `Location` header: distribution sends absolute URLs, berth paths.
fn location_path(loc: &str) -> String {
    match loc.strip_prefix("http://").or_else(|| loc.strip_prefix("https://")) {
        Some(rest) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_else(|| "/".into()),
        None => loc.to_string(),
    }
}

fn with_param(path: &str, kv: &str) -> String {
    format!("{path}{}{kv}", if path.contains('?') { '&' } else { '?' })
}

// ---- the probe ----

#[derive(Clone, Copy)]
struct Pct {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
    /// Requests slower than the target.
    over: usize,
    errors: u64,
}

fn pct(mut v: Vec<f64>, errors: u64) -> Pct {
    if v.is_empty() {
        return Pct { p50: f64::NAN, p99: f64::NAN, max: f64::NAN, n: 0, over: 0, errors };
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    let over = v.iter().filter(|&&x| x > TARGET_P99_MS).count();
    Pct { p50: at(0.50), p99: at(0.99), max: *v.last().unwrap(), n: v.len(), over, errors }
}

/// Sequential `GET /v2/` requests until stopped: on one keep-alive connection, or on a new
/// connection each (connect included in the latency). A request in flight when the stop comes
/// is completed and counted.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ProbeLog>,
}

/// Latencies (ms), failed requests, and (start offset s, ms) of each request over the target.
type ProbeLog = (Vec<f64>, u64, Vec<(f64, f64)>);

impl Probe {
    fn start(port: u16, fresh: bool, gap: Duration) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut slow = Vec::new();
            let mut errors = 0u64;
            let mut conn: Option<Conn> = None;
            let start = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let t0 = Instant::now();
                let c = match conn.take() {
                    Some(c) => Ok(c),
                    None => Conn::connect(port, Duration::from_secs(600)),
                };
                let res = c.and_then(|mut c| c.request("GET", "/v2/", &[], b"").map(|r| (c, r)));
                match res {
                    Ok((c, r)) if r.status == 200 => {
                        let ms = t0.elapsed().as_secs_f64() * 1000.0;
                        lat.push(ms);
                        if ms > TARGET_P99_MS {
                            slow.push(((t0 - start).as_secs_f64(), ms));
                        }
                        if !fresh && r.header("connection").is_none_or(|v| !v.eq_ignore_ascii_case("close")) {
                            conn = Some(c);
                        }
                    }
                    _ => {
                        errors += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                std::thread::sleep(gap);
            }
            (lat, errors, slow)
        });
        Probe { stop, thread }
    }

    fn finish(self) -> Pct {
        self.stop.store(true, Ordering::SeqCst);
        let (lat, errors, slow) = self.thread.join().expect("probe thread");
        if !slow.is_empty() {
            let list: Vec<String> = slow.iter().take(40).map(|(at, ms)| format!("{ms:.0} ms at {at:.1} s")).collect();
            eprintln!("  probe requests over {TARGET_P99_MS} ms (start offset): {}", list.join(", "));
        }
        pct(lat, errors)
    }
}

/// Both probes at once.
struct Probes {
    keep: Probe,
    fresh: Probe,
    t0: Instant,
}

#[derive(Clone, Copy)]
struct Measured {
    secs: f64,
    keep: Pct,
    fresh: Pct,
}

impl Probes {
    fn start(port: u16) -> Probes {
        let gap = Duration::from_micros((env_or("BENCH_PROBE_GAP_MS", 1.0f64) * 1000.0) as u64);
        Probes { keep: Probe::start(port, false, gap), fresh: Probe::start(port, true, gap * 10), t0: Instant::now() }
    }
    fn finish(self) -> Measured {
        let secs = self.t0.elapsed().as_secs_f64();
        Measured { secs, keep: self.keep.finish(), fresh: self.fresh.finish() }
    }
}

fn idle(port: u16) -> Measured {
    let p = Probes::start(port);
    std::thread::sleep(Duration::from_secs_f64(env_or("BENCH_IDLE_SECS", 3.0)));
    p.finish()
}

// ---- berth ----

struct Berth {
    child: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    admin_port: u16,
}

impl Berth {
    /// Writes the config (`threads = 1`, namespace `team`, GC only when asked) into `dir` and
    /// starts berth on it.
    fn start(dir: &Path) -> Berth {
        let (config, port, admin_port) = common::Berth::write_config(
            dir,
            "threads = 1\n",
            "gc_grace = \"1s\"\ngc_interval = \"24h\"\n",
            "[[namespace]]\nprefix = \"team\"\n",
        );
        let mut b = Berth { child: None, dir: dir.to_path_buf(), config, port, admin_port };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("berth.log")).unwrap();
        let t0 = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("berth starts");
        loop {
            let ready = Conn::connect(self.admin_port, Duration::from_secs(5))
                .and_then(|mut c| c.request("GET", "/readyz", &[], b""))
                .is_ok_and(|r| r.status == 200);
            if ready {
                break;
            }
            if let Some(s) = child.try_wait().unwrap() {
                panic!("berth exited with {s}; see {}", self.dir.join("berth.log").display());
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "berth not ready after 2 minutes");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the grace period is 1 s).
    fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A fresh work directory on the real disk.
fn work_dir(name: &str) -> PathBuf {
    let d = out_dir().join("contention-work").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn is_tmpfs(p: &Path) -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("tmpfs"))
        .unwrap_or(false)
}

/// Drops a file's pages from the page cache (after writing back any dirty ones), so the next
/// read of it comes from the disk.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// Pages of `path` resident in the page cache, as a fraction (mincore over a mapping).
fn resident_fraction(path: &Path) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0.0;
    }
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        if p == libc::MAP_FAILED {
            return f64::NAN;
        }
        let pages = len.div_ceil(page);
        let mut v = vec![0u8; pages];
        let rc = libc::mincore(p, len, v.as_mut_ptr());
        libc::munmap(p, len);
        if rc != 0 {
            return f64::NAN;
        }
        v.iter().filter(|b| **b & 1 == 1).count() as f64 / pages as f64
    }
}

// ---- scenario 1: a resumed 2 GiB upload session ----

struct ResumeResult {
    mib: u64,
    upload_secs: f64,
    cold: Measured,
    cold_resident: f64,
    warm: Measured,
    warm_resident: f64,
    commit: Measured,
}

/// Restarts berth (kill -9), optionally evicts the session's file from the page cache, then
/// probes while the first GET of the session re-hashes it; the scenario lasts until the 204.
fn resume_once(b: &mut Berth, session: &str, data_file: &Path, total: u64, cold: bool) -> (Measured, f64) {
    b.kill9();
    if cold {
        evict(data_file);
    }
    let resident = resident_fraction(data_file);
    b.spawn();
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Conn::connect(b.port, Duration::from_secs(600)).unwrap();
    let probes = Probes::start(b.port);
    let r = c.request("GET", session, &[], b"").unwrap();
    let m = probes.finish();
    assert_eq!(r.status, 204, "upload status after restart: {}", r.text());
    assert_eq!(r.header("range"), Some(format!("0-{}", total - 1).as_str()), "session length after the re-hash");
    (m, resident)
}

fn scenario_resume() -> ResumeResult {
    let mib: u64 = env_or("BENCH_RESUME_MIB", 2048);
    let chunk: usize = 64 << 20;
    let total = mib << 20;
    let dir = work_dir("resume");
    assert!(!is_tmpfs(&dir), "{} is on tmpfs; the scenario needs the real disk", dir.display());
    let mut b = Berth::start(&dir);
    let mut c = Conn::connect(b.port, Duration::from_secs(600)).unwrap();
    let r = c.request("POST", "/v2/team/big/blobs/uploads/", &[], b"").unwrap();
    assert_eq!(r.status, 202, "start upload: {}", r.text());
    let session = location_path(r.header("location").expect("Location"));
    let id = session.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let data_file = dir.join("data/uploads").join(&id).join("data");
    eprintln!("resume: uploading {mib} MiB in 64 MiB PATCHes to {session}");
    let mut buf = vec![0u8; chunk];
    Rng(2024).fill(&mut buf);
    let mut hasher = sha2::Sha256::new();
    let t0 = Instant::now();
    let mut off = 0u64;
    let mut i = 0u64;
    while off < total {
        let n = (total - off).min(chunk as u64) as usize;
        buf[..8].copy_from_slice(&i.to_le_bytes());
        hasher.update(&buf[..n]);
        let range = format!("{off}-{}", off + n as u64 - 1);
        let r =
            c.request("PATCH", &session, &[("Content-Type", "application/octet-stream"), ("Content-Range", &range)], &buf[..n]).unwrap();
        assert_eq!(r.status, 202, "PATCH {range}: {}", r.text());
        off += n as u64;
        i += 1;
    }
    let upload_secs = t0.elapsed().as_secs_f64();
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    drop(buf);
    drop(c);
    eprintln!("resume: uploaded in {upload_secs:.1} s; digest {digest}");
    assert_eq!(std::fs::metadata(&data_file).map(|m| m.len()).unwrap_or(0), total, "session file {}", data_file.display());

    let (cold, cold_resident) = resume_once(&mut b, &session, &data_file, total, true);
    eprintln!(
        "resume (file evicted, {:.0}% cached): re-hash answered in {:.2} s; /v2/ p99 {:.2} ms max {:.2} ms",
        cold_resident * 100.0,
        cold.secs,
        cold.keep.p99,
        cold.keep.max
    );
    let (warm, warm_resident) = resume_once(&mut b, &session, &data_file, total, false);
    eprintln!(
        "resume (file {:.0}% cached): re-hash answered in {:.2} s; /v2/ p99 {:.2} ms max {:.2} ms",
        warm_resident * 100.0,
        warm.secs,
        warm.keep.p99,
        warm.keep.max
    );

    // Finish the session: the digest must match what was sent.
    let mut c = Conn::connect(b.port, Duration::from_secs(600)).unwrap();
    let probes = Probes::start(b.port);
    let r = c.request("PUT", &with_param(&session, &format!("digest={digest}")), &[], b"").unwrap();
    let commit = probes.finish();
    assert_eq!(r.status, 201, "PUT ?digest=: {}", r.text());
    let r = c.request("HEAD", &format!("/v2/team/big/blobs/{digest}"), &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(total.to_string().as_str()), "committed blob's length");
    eprintln!("resume: committed in {:.2} s; /v2/ p99 {:.2} ms", commit.secs, commit.keep.p99);
    b.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    ResumeResult { mib, upload_secs, cold, cold_resident, warm, warm_resident, commit }
}

// ---- scenario 2: GC over 100k orphan blobs ----

struct GcResult {
    orphans: usize,
    referenced: usize,
    gen_secs: f64,
    m: Measured,
    blobs_removed: u64,
    bytes_freed: u64,
}

fn blob_path(root: &Path, hex: &str) -> PathBuf {
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Writes `orphans` small blobs nobody links (recorded as used at the epoch, so long past the
/// grace period) and `repos` repositories each holding one tagged image (config, layer and
/// manifest, recorded now), with berth's library code.
fn generate_gc_store(root: &Path, orphans: usize, repos: usize) {
    for h in 0..256 {
        std::fs::create_dir_all(root.join("blobs/sha256").join(format!("{h:02x}"))).unwrap();
    }
    let meta = RedbMeta::open(&root.join("meta.redb"), 64 << 20).expect("open meta.redb");
    meta.set_classes(Classes { cache_roots: vec![], namespaces: vec!["team".into()] }).expect("set_classes");
    let now = berth::store::now_ms();

    // Referenced content.
    let mut rng = Rng(99);
    meta.batch(|b| {
        for i in 0..repos {
            let repo = format!("team/kept{i:03}");
            let mut layer = vec![0u8; 4096];
            rng.fill(&mut layer);
            let config = serde_json::to_vec(
                &serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Labels": {"i": i.to_string()}}}),
            )
            .unwrap();
            let (ld, cd) = (Digest::sha256_of(&layer), Digest::sha256_of(&config));
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": config.len()},
                "layers": [{"mediaType": OCI_LAYER, "digest": ld.to_string(), "size": layer.len()}],
            }))
            .unwrap();
            let md = Digest::sha256_of(&manifest);
            for (d, bytes) in [(&ld, &layer), (&cd, &config), (&md, &manifest)] {
                std::fs::write(blob_path(root, d.hex()), bytes).unwrap();
                b.record_blob(d, bytes.len() as u64, now)?;
            }
            b.import_link(&repo, &ld, now)?;
            b.import_link(&repo, &cd, now)?;
            let mm = ManifestMeta { media_type: OCI_MANIFEST.into(), size: manifest.len() as u64, ..Default::default() };
            b.import_manifest(&repo, &md, &mm)?;
            b.import_tag(&repo, "latest", &md, now)?;
        }
        Ok(())
    })
    .expect("referenced content");

    // Orphans: files written by a second thread, records in transactions of 10,000.
    let (tx, rx) = mpsc::sync_channel::<Vec<(Digest, u64)>>(4);
    let writer = {
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            let mut buf = vec![0u8; 2048];
            let mut i = 0;
            while i < orphans {
                let n = (orphans - i).min(10_000);
                let mut batch = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = 256 + (rng.next() % 1792) as usize;
                    rng.fill(&mut buf[..len]);
                    let d = Digest::sha256_of(&buf[..len]);
                    std::fs::write(blob_path(&root, d.hex()), &buf[..len]).unwrap();
                    batch.push((d, len as u64));
                }
                i += n;
                if tx.send(batch).is_err() {
                    return;
                }
            }
        })
    };
    for batch in rx {
        meta.batch(|b| {
            for (d, size) in &batch {
                b.record_blob(d, *size, 1)?;
            }
            Ok(())
        })
        .expect("orphan batch");
    }
    writer.join().expect("orphan writer");
    meta.set_meta("layout", "2").expect("layout");
    let problems = meta.recount(false).expect("recount");
    assert!(problems.is_empty(), "counters disagree with the records: {problems:?}");
}

fn scenario_gc() -> GcResult {
    let orphans: usize = env_or("BENCH_GC_BLOBS", 100_000);
    let referenced = 100;
    let dir = work_dir("gc");
    let root = dir.join("data");
    eprintln!("gc: generating {orphans} orphan blobs and {referenced} tagged images in {}", root.display());
    let t0 = Instant::now();
    generate_gc_store(&root, orphans, referenced);
    let gen_secs = t0.elapsed().as_secs_f64();
    eprintln!("gc: generated in {gen_secs:.1} s");
    let b = Berth::start(&dir);
    // Let whatever berth does after start (the cache's recency order) settle first.
    std::thread::sleep(Duration::from_secs(2));
    let mut admin = Conn::connect(b.admin_port, Duration::from_secs(3600)).unwrap();
    let probes = Probes::start(b.port);
    let r = admin.request("POST", "/gc", &[], b"").unwrap();
    let m = probes.finish();
    assert_eq!(r.status, 200, "POST /gc: {}", r.text());
    let report: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let blobs_removed = report["blobs_removed"].as_u64().unwrap_or(0);
    let bytes_freed = report["bytes_freed"].as_u64().unwrap_or(0);
    eprintln!("gc: {blobs_removed} blobs removed ({bytes_freed} bytes) in {:.1} s; /v2/ p99 {:.2} ms", m.secs, m.keep.p99);
    // What the manifests reference is still served.
    let mut c = Conn::connect(b.port, Duration::from_secs(30)).unwrap();
    let r = c.request("GET", "/v2/team/kept000/manifests/latest", &[("Accept", OCI_MANIFEST)], b"").unwrap();
    assert_eq!(r.status, 200, "a kept manifest after GC: {}", r.text());
    b.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    GcResult { orphans, referenced, gen_secs, m, blobs_removed, bytes_freed }
}

// ---- scenario 3: 64 clients pushing ----

#[derive(Clone, Copy, PartialEq)]
enum Flow {
    /// `POST /blobs/uploads/?digest=` with the blob as the body.
    SinglePost,
    /// `POST /blobs/uploads/` then `PUT <location>?digest=` with the blob as the body
    /// (distribution 2.8 has no single-POST upload).
    PostPut,
}

impl Flow {
    fn label(self) -> &'static str {
        match self {
            Flow::SinglePost => "single `POST ?digest=`",
            Flow::PostPut => "`POST` + `PUT ?digest=`",
        }
    }
}

struct PushResult {
    m: Measured,
    clients: usize,
    blobs: u64,
    manifests: u64,
    bytes: u64,
    errors: u64,
}

fn push_blob(c: &mut Conn, repo: &str, digest: &str, body: &[u8], flow: Flow) -> std::io::Result<bool> {
    let ct = [("Content-Type", "application/octet-stream")];
    match flow {
        Flow::SinglePost => {
            let r = c.request("POST", &format!("/v2/{repo}/blobs/uploads/?digest={digest}"), &ct, body)?;
            Ok(r.status == 201)
        }
        Flow::PostPut => {
            let r = c.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")?;
            if r.status != 202 {
                return Ok(false);
            }
            let Some(loc) = r.header("location") else { return Ok(false) };
            let r = c.request("PUT", &with_param(&location_path(loc), &format!("digest={digest}")), &ct, body)?;
            Ok(r.status == 201)
        }
    }
}

fn scenario_push(port: u16, flow: Flow, tag: &str) -> PushResult {
    let clients: usize = env_or("BENCH_PUSH_CLIENTS", 64);
    let secs: f64 = env_or("BENCH_PUSH_SECS", 10.0);
    let blob_len: usize = env_or::<usize>("BENCH_PUSH_BLOB_KIB", 1024) << 10;
    let (blobs, manifests, bytes, errors) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let go = Arc::new(std::sync::Barrier::new(clients + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let (blobs, manifests, bytes, errors, go, deadline) =
                (blobs.clone(), manifests.clone(), bytes.clone(), errors.clone(), go.clone(), deadline.clone());
            let tag = tag.to_string();
            std::thread::spawn(move || {
                let repo = format!("team/{tag}{t:02}");
                let mut layer = vec![0u8; blob_len];
                Rng(1000 + t as u64).fill(&mut layer);
                let mut c: Option<Conn> = None;
                go.wait();
                let end = *deadline.get().unwrap();
                let mut i = 0u64;
                while Instant::now() < end {
                    let conn = match c.take() {
                        Some(c) => c,
                        None => match Conn::connect(port, Duration::from_secs(120)) {
                            Ok(c) => c,
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        },
                    };
                    let mut conn = conn;
                    layer[..16].copy_from_slice(&[(t as u64).to_le_bytes(), i.to_le_bytes()].concat());
                    let ld = sha256_digest(&layer);
                    let config = format!(r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"client":"{t}","round":"{i}"}}}}}}"#);
                    let cd = sha256_digest(config.as_bytes());
                    let manifest = format!(
                        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"{OCI_LAYER}","digest":"{ld}","size":{}}}]}}"#,
                        config.len(),
                        layer.len()
                    );
                    let round = (|| -> std::io::Result<bool> {
                        if !push_blob(&mut conn, &repo, &ld, &layer, flow)? {
                            return Ok(false);
                        }
                        blobs.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(layer.len() as u64, Ordering::Relaxed);
                        if !push_blob(&mut conn, &repo, &cd, config.as_bytes(), flow)? {
                            return Ok(false);
                        }
                        blobs.fetch_add(1, Ordering::Relaxed);
                        let r = conn.request(
                            "PUT",
                            &format!("/v2/{repo}/manifests/r{i}"),
                            &[("Content-Type", OCI_MANIFEST)],
                            manifest.as_bytes(),
                        )?;
                        if r.status != 201 {
                            return Ok(false);
                        }
                        manifests.fetch_add(1, Ordering::Relaxed);
                        Ok(true)
                    })();
                    match round {
                        Ok(true) => c = Some(conn),
                        Ok(false) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            c = Some(conn);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let probes = Probes::start(port);
    deadline.set(Instant::now() + Duration::from_secs_f64(secs)).unwrap();
    go.wait();
    for t in threads {
        t.join().expect("pusher");
    }
    let m = probes.finish();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    PushResult { m, clients, blobs: load(&blobs), manifests: load(&manifests), bytes: load(&bytes), errors: load(&errors) }
}

// ---- report ----

fn verdict(p: &Pct) -> &'static str {
    if p.n > 0 && p.p99 <= TARGET_P99_MS {
        "met"
    } else {
        "**missed**"
    }
}

fn rows(md: &mut String, server: &str, scenario: &str, m: &Measured, target: bool) {
    for (probe, p) in [("keep-alive", &m.keep), ("new connection", &m.fresh)] {
        writeln!(
            md,
            "| {server} | {scenario} | {:.2} | {probe} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            m.secs,
            p.n,
            p.p50,
            p.p99,
            p.max,
            p.over,
            p.errors,
            if target { verdict(p) } else { "–" }
        )
        .unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs bench targets; this one only measures
        // under `cargo bench`.
        return;
    }
    let only: Vec<u32> = env_or("BENCH_ONLY", "1,2,3".to_string()).split(',').filter_map(|s| s.trim().parse().ok()).collect();
    std::fs::create_dir_all(out_dir()).unwrap();
    let load_start = loadavg();
    let started = Instant::now();

    // Idle baseline, on a fresh berth.
    let idle_berth = {
        let dir = work_dir("idle");
        let b = Berth::start(&dir);
        std::thread::sleep(Duration::from_millis(200));
        let m = idle(b.port);
        eprintln!("idle: /v2/ p50 {:.3} ms p99 {:.3} ms max {:.2} ms over {}", m.keep.p50, m.keep.p99, m.keep.max, m.keep.n);
        b.stop();
        std::fs::remove_dir_all(&dir).unwrap();
        m
    };

    let resume = only.contains(&1).then(scenario_resume);
    let gc = only.contains(&2).then(scenario_gc);
    let push = only.contains(&3).then(|| {
        let dir = work_dir("push");
        let b = Berth::start(&dir);
        eprintln!("push: {} clients, berth, single POST", env_or("BENCH_PUSH_CLIENTS", 64));
        let single = scenario_push(b.port, Flow::SinglePost, "s");
        eprintln!(
            "push (single POST): {} blobs, {} manifests, {} errors in {:.1} s; /v2/ p99 {:.2} ms",
            single.blobs, single.manifests, single.errors, single.m.secs, single.m.keep.p99
        );
        let pp = scenario_push(b.port, Flow::PostPut, "p");
        eprintln!(
            "push (POST + PUT): {} blobs, {} manifests, {} errors in {:.1} s; /v2/ p99 {:.2} ms",
            pp.blobs, pp.manifests, pp.errors, pp.m.secs, pp.m.keep.p99
        );
        b.stop();
        std::fs::remove_dir_all(&dir).unwrap();
        let dist = if common::have("docker-registry") {
            let reg = common::distribution::Registry::start(common::distribution::Options::default());
            let idle_d = idle(reg.port);
            let d = scenario_push(reg.port, Flow::PostPut, "p");
            eprintln!(
                "push (distribution, POST + PUT): {} blobs, {} manifests, {} errors in {:.1} s; /v2/ p99 {:.2} ms",
                d.blobs, d.manifests, d.errors, d.m.secs, d.m.keep.p99
            );
            drop(reg);
            Ok((idle_d, d))
        } else {
            Err("skipped: docker-registry (CNCF distribution) is not installed (apt-get install docker-registry)")
        };
        (single, pp, dist)
    });
    let _ = std::fs::remove_dir(out_dir().join("contention-work"));
    let load_end = loadavg();

    let mut md = String::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    writeln!(
        md,
        "Machine: {cores} cores, Linux {}; berth `[server] threads = 1`, hosted namespace `team`; data on the real disk (not tmpfs); probes and load clients on the same machine. Load average (1/5/15 min) {load_start} at the start, {load_end} at the end; {:.0} s in all.\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        started.elapsed().as_secs_f64()
    )
    .unwrap();
    writeln!(
        md,
        "Probes: sequential `GET /v2/`, one on a keep-alive connection ({} ms pause between requests), one opening a new connection per request (connect included; {} ms pause). Target: p99 ≤ {TARGET_P99_MS} ms. Latencies in ms; \"> 20 ms\" counts probe requests slower than 20 ms.\n",
        env_or("BENCH_PROBE_GAP_MS", 1.0f64),
        env_or("BENCH_PROBE_GAP_MS", 1.0f64) * 10.0
    )
    .unwrap();
    writeln!(md, "| server | scenario | s | probe | requests | p50 | p99 | max | > 20 ms | errors | target p99 ≤ 20 ms |").unwrap();
    writeln!(md, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|").unwrap();
    rows(&mut md, "berth", "idle", &idle_berth, true);
    if let Some(r) = &resume {
        rows(&mut md, "berth", &format!("1. resume a {} MiB session: re-hash, file read from disk", r.mib), &r.cold, true);
        rows(&mut md, "berth", &format!("1. resume a {} MiB session: re-hash, file in page cache", r.mib), &r.warm, true);
        rows(&mut md, "berth", "1. commit the session (`PUT ?digest=`)", &r.commit, true);
    }
    if let Some(g) = &gc {
        rows(&mut md, "berth", &format!("2. GC over {} orphan blobs (`POST /gc`)", g.orphans), &g.m, true);
    }
    if let Some((single, pp, dist)) = &push {
        rows(&mut md, "berth", &format!("3. {} clients pushing, {}", single.clients, Flow::SinglePost.label()), &single.m, true);
        rows(&mut md, "berth", &format!("3. {} clients pushing, {}", pp.clients, Flow::PostPut.label()), &pp.m, true);
        if let Ok((idle_d, d)) = dist {
            rows(&mut md, "distribution", "idle", idle_d, false);
            rows(&mut md, "distribution", &format!("3. {} clients pushing, {}", d.clients, Flow::PostPut.label()), &d.m, false);
        }
    }
    writeln!(md).unwrap();
    if let Some(r) = &resume {
        writeln!(
            md,
            "1. {} MiB sent in 64 MiB `PATCH`es (`Content-Range`) in {:.1} s, then berth killed (`kill -9`) and started again; the scenario runs from the session's status `GET` to its 204 (the re-hash): {:.2} s with the file evicted from the page cache first ({:.0} % of it cached), {:.2} s with it cached ({:.0} %). The commit (`PUT ?digest=`, digest checked) took {:.2} s.",
            r.mib,
            r.upload_secs,
            r.cold.secs,
            r.cold_resident * 100.0,
            r.warm.secs,
            r.warm_resident * 100.0,
            r.commit.secs
        )
        .unwrap();
    }
    if let Some(g) = &gc {
        writeln!(
            md,
            "2. {} orphan blobs (256–2047 bytes, recorded as last used at the epoch) and {} tagged images, generated with berth's library code in {:.1} s; `gc_grace = \"1s\"`. `POST /gc` answered after {:.1} s: {} blobs removed, {} bytes freed.",
            g.orphans, g.referenced, g.gen_secs, g.m.secs, g.blobs_removed, g.bytes_freed
        )
        .unwrap();
    }
    if let Some((single, pp, dist)) = &push {
        let line = |who: &str, flow: Flow, p: &PushResult| {
            format!(
                "{who}, {}: {} blobs ({:.0} MiB, {:.0} MiB/s), {} manifests, {} errors in {:.1} s",
                flow.label(),
                p.blobs,
                p.bytes as f64 / (1 << 20) as f64,
                p.bytes as f64 / (1 << 20) as f64 / p.m.secs,
                p.manifests,
                p.errors,
                p.m.secs
            )
        };
        writeln!(
            md,
            "3. Each client pushes to a repository of its own, round after round: a {} KiB layer, a config and a manifest (tagged). {}; {}.",
            env_or::<usize>("BENCH_PUSH_BLOB_KIB", 1024),
            line("berth", Flow::SinglePost, single),
            line("berth", Flow::PostPut, pp)
        )
        .unwrap();
        match dist {
            Ok((_, d)) => writeln!(
                md,
                "   {}. `GET /v2/` p99 under 64 pushers, berth / distribution (same flow, keep-alive probe): {:.2} / {:.2} ms = {:.3}; new-connection probe: {:.2} / {:.2} ms = {:.3}.",
                line("distribution", Flow::PostPut, d),
                pp.m.keep.p99,
                d.m.keep.p99,
                pp.m.keep.p99 / d.m.keep.p99,
                pp.m.fresh.p99,
                d.m.fresh.p99,
                pp.m.fresh.p99 / d.m.fresh.p99
            )
            .unwrap(),
            Err(why) => writeln!(md, "   Distribution: {why}.").unwrap(),
        }
    }
    std::fs::write(out_dir().join("contention.md"), &md).unwrap();
    println!("{md}");
}
