//! The store at scale: one million tags in 10,000 hosted repositories, written with berth's own
//! library code (not through HTTP), then served by the real `berth` binary. Measures how long
//! berth takes to become ready (after a clean start, and after `kill -9`, which makes redb
//! repair the database), its resident memory, and the latency of `/metrics`, tag listings and
//! catalog pages, against the targets. Side by side on a smaller store both can read (1,000
//! repositories × 100 tags), CNCF distribution 2.8 (`docker-registry`) answers the same
//! listings, when it is installed. Not a test: it measures, writes target/bench/scale.md and
//! prints it.
//!
//!     cargo bench --bench scale
//!
//! The generated stores are kept under target/bench/scale-store/<version>-<shape>/ and reused
//! by the next run; BENCH_SCALE_REGEN=1 generates them again. Knobs (environment):
//! BENCH_SCALE_REPOS (10000), BENCH_SCALE_TAGS (100 per repository), BENCH_SCALE_MANIFESTS (10
//! distinct manifests per repository), BENCH_SCALE_SIDE_REPOS (1000; 0 skips the side by side),
//! BENCH_SCALE_REQUESTS (2000 per listing case), BENCH_OUT (target/bench).

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
use http1::{Conn, Resp};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bump when the generated shape changes: stores of another version are not reused.
const STORE_VERSION: &str = "v1";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Repositories per metadata transaction.
const CHUNK: usize = 100;

// Targets (from the issue).
const READY_S: f64 = 10.0;
const RSS_MIB: f64 = 512.0;
const METRICS_MS: f64 = 20.0;
const TAGS_MS: f64 = 5.0;
const CATALOG_MS: f64 = 5.0;

// ---- generation ----

#[derive(Clone, Copy)]
struct Shape {
    repos: usize,
    tags: usize,
    manifests: usize,
}

impl Shape {
    fn key(&self) -> String {
        format!("{STORE_VERSION}-r{}-t{}-m{}", self.repos, self.tags, self.manifests)
    }
    fn total_tags(&self) -> usize {
        self.repos * self.tags
    }
}

fn repo_name(i: usize) -> String {
    format!("team/r{i:05}")
}

fn tag_name(i: usize) -> String {
    format!("v{i:03}")
}

struct Blob {
    digest: Digest,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob { digest: Digest::sha256_of(&bytes), bytes }
    }
    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": self.digest.to_string(), "size": self.bytes.len()})
    }
}

struct GenManifest {
    config: Blob,
    layer: Blob,
    manifest: Blob,
}

struct GenRepo {
    name: String,
    manifests: Vec<GenManifest>,
}

/// One repository's content: `manifests` images, each a config and a layer of its own on top of
/// a base layer every repository shares, as OCI image manifests with their exact bytes.
fn gen_repo(i: usize, shape: Shape, base: &Blob) -> GenRepo {
    let name = repo_name(i);
    let mut rng = Rng(i as u64 * 7919 + 1);
    let manifests = (0..shape.manifests)
        .map(|m| {
            let layer_len = 256 + rng.below(768);
            let layer = Blob::new((0..layer_len).map(|_| rng.next() as u8).collect());
            let config = Blob::new(
                serde_json::to_vec(&serde_json::json!({
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {"Labels": {"repository": name, "build": m.to_string()}},
                    "rootfs": {"type": "layers", "diff_ids": [base.digest.to_string(), layer.digest.to_string()]},
                }))
                .unwrap(),
            );
            let manifest = Blob::new(
                serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": config.descriptor(OCI_CONFIG),
                    "layers": [base.descriptor(OCI_LAYER), layer.descriptor(OCI_LAYER)],
                }))
                .unwrap(),
            );
            GenManifest { config, layer, manifest }
        })
        .collect();
    GenRepo { name, manifests }
}

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex())
}

fn write_file(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

/// distribution's filesystem layout for one repository, its blobs hard-linked from berth's.
fn write_distribution_repo(dist: &Path, berth_root: &Path, r: &GenRepo, shape: Shape, base: &Blob) {
    let v2 = dist.join("docker/registry/v2");
    let repo = v2.join("repositories").join(&r.name);
    let link = |dir: PathBuf, d: &Digest| {
        std::fs::create_dir_all(&dir).unwrap();
        write_file(&dir.join("link"), d.to_string().as_bytes());
    };
    let blob = |d: &Digest| {
        let dir = v2.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex());
        if !dir.join("data").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::hard_link(blob_path(berth_root, d), dir.join("data")).unwrap();
        }
    };
    blob(&base.digest);
    link(repo.join("_layers/sha256").join(base.digest.hex()), &base.digest);
    for m in &r.manifests {
        for b in [&m.config, &m.layer, &m.manifest] {
            blob(&b.digest);
        }
        for b in [&m.config, &m.layer] {
            link(repo.join("_layers/sha256").join(b.digest.hex()), &b.digest);
        }
        link(repo.join("_manifests/revisions/sha256").join(m.manifest.digest.hex()), &m.manifest.digest);
    }
    for t in 0..shape.tags {
        let d = &r.manifests[t % shape.manifests].manifest.digest;
        let tag = repo.join("_manifests/tags").join(tag_name(t));
        link(tag.join("current"), d);
        link(tag.join("index/sha256").join(d.hex()), d);
    }
}

/// Writes the store (and, with `dist`, the same content in distribution's layout) under `dir`.
/// Blob files are written by a second thread while this one records the metadata, one
/// transaction per 100 repositories.
fn generate(dir: &Path, shape: Shape, dist: bool) {
    let root = dir.join("data");
    for h in 0..256 {
        std::fs::create_dir_all(root.join("blobs/sha256").join(format!("{h:02x}"))).unwrap();
    }
    let meta = RedbMeta::open(&root.join("meta.redb"), 64 << 20).expect("open meta.redb");
    meta.set_classes(Classes { cache_roots: vec![], namespaces: vec!["team".into()] }).expect("set_classes");
    let now = berth::store::now_ms();
    let base = Blob::new((0..4096u32).map(|i| (i * 31 % 251) as u8).collect());
    write_file(&blob_path(&root, &base.digest), &base.bytes);
    meta.batch(|b| b.record_blob(&base.digest, base.bytes.len() as u64, now)).expect("record base");

    let (tx, rx) = mpsc::sync_channel::<Vec<GenRepo>>(2);
    let writer = {
        let (root, dir) = (root.clone(), dir.to_path_buf());
        let base = Blob::new(base.bytes.clone());
        std::thread::spawn(move || {
            for start in (0..shape.repos).step_by(CHUNK) {
                let chunk: Vec<GenRepo> = (start..(start + CHUNK).min(shape.repos)).map(|i| gen_repo(i, shape, &base)).collect();
                for r in &chunk {
                    for m in &r.manifests {
                        for b in [&m.config, &m.layer, &m.manifest] {
                            write_file(&blob_path(&root, &b.digest), &b.bytes);
                        }
                    }
                    if dist {
                        write_distribution_repo(&dir.join("dist"), &root, r, shape, &base);
                    }
                }
                if tx.send(chunk).is_err() {
                    return;
                }
            }
        })
    };
    let tags: Vec<String> = (0..shape.tags).map(tag_name).collect();
    let mut done = 0;
    let t0 = Instant::now();
    for chunk in rx {
        meta.batch(|b| {
            for r in &chunk {
                b.import_link(&r.name, &base.digest, now)?;
                for m in &r.manifests {
                    for blob in [&m.config, &m.layer, &m.manifest] {
                        b.record_blob(&blob.digest, blob.bytes.len() as u64, now)?;
                    }
                    b.import_link(&r.name, &m.config.digest, now)?;
                    b.import_link(&r.name, &m.layer.digest, now)?;
                    let mm = ManifestMeta { media_type: OCI_MANIFEST.into(), size: m.manifest.bytes.len() as u64, ..Default::default() };
                    b.import_manifest(&r.name, &m.manifest.digest, &mm)?;
                }
                for (t, tag) in tags.iter().enumerate() {
                    b.import_tag(&r.name, tag, &r.manifests[t % shape.manifests].manifest.digest, now)?;
                }
            }
            Ok(())
        })
        .expect("import batch");
        done += chunk.len();
        if done % (CHUNK * 20) == 0 || done == shape.repos {
            eprintln!("  {done}/{} repositories, {:.0} s", shape.repos, t0.elapsed().as_secs_f64());
        }
    }
    writer.join().expect("blob writer");
    meta.set_meta("layout", "2").expect("layout");
    let problems = meta.recount(false).expect("recount");
    assert!(problems.is_empty(), "counters disagree with the records: {problems:?}");
}

/// The store for `shape`, generated unless a complete one from an earlier run is there.
/// Returns its directory and how long generating it took (now or then).
fn store_for(shape: Shape, dist: bool) -> (PathBuf, f64, bool) {
    let dir = out_dir().join("scale-store").join(shape.key());
    let marker = dir.join("generated-secs");
    let regen = std::env::var("BENCH_SCALE_REGEN").is_ok_and(|v| v == "1");
    let complete = marker.exists() && (!dist || dir.join("dist").is_dir());
    if complete && !regen {
        let secs = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap_or(f64::NAN);
        eprintln!("reusing {} (generated in {secs:.1} s; BENCH_SCALE_REGEN=1 regenerates)", dir.display());
        return (dir, secs, true);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!(
        "generating {} repositories × {} tags ({} manifests each){} in {}",
        shape.repos,
        shape.tags,
        shape.manifests,
        if dist { ", and distribution's layout" } else { "" },
        dir.display()
    );
    let t0 = Instant::now();
    generate(&dir, shape, dist);
    let secs = t0.elapsed().as_secs_f64();
    write_file(&marker, format!("{secs:.3}\n").as_bytes());
    eprintln!("generated in {secs:.1} s");
    (dir, secs, false)
}

fn out_dir() -> PathBuf {
    PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()))
}

fn du_mib(p: &Path) -> f64 {
    Command::new("du")
        .args(["-sk"])
        .arg(p)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|k| k.parse::<f64>().ok()))
        .map(|k| k / 1024.0)
        .unwrap_or(f64::NAN)
}

/// One GET on a fresh connection; None when nothing answers.
fn get_once(port: u16, path: &str) -> Option<Resp> {
    Conn::connect(port, Duration::from_secs(60)).ok()?.get(path).ok()
}

/// Latencies (ms) of sequential GETs of `paths` on one keep-alive connection; every answer
/// must be a 200.
fn latencies(port: u16, paths: &[String]) -> Vec<f64> {
    let mut c = Conn::connect(port, Duration::from_secs(60)).expect("connect");
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let t0 = Instant::now();
        let r = c.get(p).unwrap_or_else(|e| panic!("GET {p}: {e}"));
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200, "GET {p}: {}", String::from_utf8_lossy(&r.body));
    }
    out
}

/// Latency (ms) of one GET on a connection of its own, connect included.
fn fresh_latency(port: u16, path: &str) -> f64 {
    let t0 = Instant::now();
    let r = Conn::connect(port, Duration::from_secs(60)).and_then(|mut c| c.get(path)).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}");
    t0.elapsed().as_secs_f64() * 1000.0
}

#[derive(Clone, Copy)]
struct Pct {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn pct(mut v: Vec<f64>) -> Pct {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    Pct { p50: at(0.50), p99: at(0.99), max: *v.last().unwrap(), n: v.len() }
}

// ---- processes ----

fn status_kib(pid: u32, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

struct Berth {
    child: Child,
    port: u16,
    admin_port: u16,
}

impl Berth {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn rss_mib(&self) -> f64 {
        status_kib(self.pid(), "VmRSS:") / 1024.0
    }
    fn peak_mib(&self) -> f64 {
        status_kib(self.pid(), "VmHWM:") / 1024.0
    }
    /// SIGTERM and wait: the database is closed cleanly, so the cached store needs no repair.
    fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts berth on `dir/berth.toml` and returns it with the seconds from spawn until the admin
/// listener's /readyz answers 200.
fn start_berth(dir: &Path, config: &Path, port: u16, admin_port: u16) -> (Berth, f64) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("berth.log")).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("berth starts");
    loop {
        if get_once(admin_port, "/readyz").is_some_and(|r| r.status == 200) {
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("berth exited with {s}; see {}", dir.join("berth.log").display());
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "berth not ready after 10 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    (Berth { child, port, admin_port }, secs)
}

fn berth_config(dir: &Path) -> (PathBuf, u16, u16) {
    common::Berth::write_config(dir, "threads = 2\n", "", "[[namespace]]\nprefix = \"team\"\n")
}

/// Opens and closes the database once in this process: a store left by an interrupted run is
/// repaired here, so the clean start below measures a clean start.
fn settle_database(root: &Path) -> f64 {
    let t0 = Instant::now();
    drop(RedbMeta::open(&root.join("meta.redb"), 64 << 20).expect("open meta.redb"));
    t0.elapsed().as_secs_f64()
}

struct Distribution {
    child: Child,
    port: u16,
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_distribution(dir: &Path) -> Distribution {
    let port = common::free_port();
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: berth-bench-secret\n",
        dir.join("dist").display()
    );
    let config_path = dir.join("distribution.yml");
    write_file(&config_path, config.as_bytes());
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config_path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("distribution.log")).unwrap())
        .spawn()
        .expect("docker-registry starts");
    let d = Distribution { child, port };
    let t0 = Instant::now();
    while get_once(port, "/v2/").is_none_or(|r| r.status != 200) {
        assert!(t0.elapsed() < Duration::from_secs(30), "docker-registry did not become ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    d
}

// ---- workloads ----

struct Paths {
    tags: Vec<String>,
    tags_last: Vec<String>,
    catalog: Vec<String>,
    catalog_last: Vec<String>,
}

fn paths(shape: Shape, requests: usize, seed: u64) -> Paths {
    let mut rng = Rng(seed);
    let mut tags = Vec::new();
    let mut tags_last = Vec::new();
    let mut catalog_last = Vec::new();
    for _ in 0..requests {
        tags.push(format!("/v2/{}/tags/list?n=100", repo_name(rng.below(shape.repos))));
        tags_last.push(format!("/v2/{}/tags/list?n=100&last={}", repo_name(rng.below(shape.repos)), tag_name(rng.below(shape.tags))));
        catalog_last.push(format!("/v2/_catalog?n=100&last={}", repo_name(rng.below(shape.repos)).replace('/', "%2F")));
    }
    let catalog = vec!["/v2/_catalog?n=100".to_string(); requests / 4];
    Paths { tags, tags_last, catalog, catalog_last }
}

/// The web UI's pages on the big store: home pages, repository pages, a search that matches
/// nothing. Each page reads a bounded slice of the store, whatever its size.
fn ui_latencies(port: u16, shape: Shape, requests: usize) -> [Pct; 3] {
    let mut rng = Rng(45);
    let mut home = Vec::new();
    let mut repo = Vec::new();
    for _ in 0..requests {
        home.push(format!("/ui/?after={}", repo_name(rng.below(shape.repos)).replace('/', "%2F")));
        repo.push(format!("/ui/r/{}", repo_name(rng.below(shape.repos))));
    }
    let search = vec!["/ui/?q=no-such-name".to_string(); requests];
    let _ = latencies(port, &repo[..requests.min(20)]);
    [pct(latencies(port, &home)), pct(latencies(port, &repo)), pct(latencies(port, &search))]
}

/// Checks that the server lists what was generated before anything is timed. distribution 2.8
/// lists a repository's tags in directory order, not sorted.
fn check_listing(port: u16, shape: Shape, sorted_tags: bool) {
    let mut c = Conn::connect(port, Duration::from_secs(60)).unwrap();
    let r = c.get("/v2/team/r00000/tags/list?n=100").unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let tags = v["tags"].as_array().unwrap();
    assert_eq!(tags.len(), shape.tags.min(100), "tags of team/r00000");
    if sorted_tags {
        assert_eq!(tags[0], "v000");
    } else {
        assert!(tags.iter().any(|t| t == "v000"));
    }
    let r = c.get("/v2/_catalog?n=100").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["repositories"][0], "team/r00000");
    assert_eq!(v["repositories"].as_array().unwrap().len(), shape.repos.min(100));
    assert_eq!(r.header("link").is_some(), shape.repos > 100, "catalog Link header");
}

/// Walks the whole catalog in pages of 100 following the Link headers; returns the names
/// seen and the time taken.
fn walk_catalog(port: u16) -> (usize, f64) {
    let mut c = Conn::connect(port, Duration::from_secs(60)).unwrap();
    let mut path = "/v2/_catalog?n=100".to_string();
    let mut n = 0;
    let t0 = Instant::now();
    loop {
        let r = c.get(&path).unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        n += v["repositories"].as_array().unwrap().len();
        match r.header("link") {
            Some(l) => path = l.trim_start_matches('<').split('>').next().unwrap().to_string(),
            None => return (n, t0.elapsed().as_secs_f64()),
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs bench targets; this one only measures
        // under `cargo bench`.
        return;
    }
    let shape = Shape {
        repos: env_or("BENCH_SCALE_REPOS", 10_000),
        tags: env_or("BENCH_SCALE_TAGS", 100),
        manifests: env_or("BENCH_SCALE_MANIFESTS", 10),
    };
    assert!(shape.tags <= 1000 && shape.manifests >= 1 && shape.manifests <= shape.tags && shape.repos <= 100_000);
    let side_repos: usize = env_or("BENCH_SCALE_SIDE_REPOS", 1000);
    let requests: usize = env_or("BENCH_SCALE_REQUESTS", 2000);
    std::fs::create_dir_all(out_dir()).unwrap();

    let (dir, gen_secs, reused) = store_for(shape, false);
    let root = dir.join("data");
    let settle_secs = settle_database(&root);
    let redb_mib = std::fs::metadata(root.join("meta.redb")).map(|m| m.len() as f64 / (1 << 20) as f64).unwrap_or(f64::NAN);
    let store_mib = du_mib(&root);
    eprintln!("store: meta.redb {redb_mib:.0} MiB, {store_mib:.0} MiB in all; opened in-process in {settle_secs:.2} s");

    // ---- the big store ----
    let (config, port, admin_port) = berth_config(&dir);
    let (berth, ready_clean) = start_berth(&dir, &config, port, admin_port);
    eprintln!("berth ready in {ready_clean:.2} s (clean start)");
    let rss_at_ready = berth.rss_mib();
    check_listing(berth.port, shape, true);

    let metrics = pct(latencies(berth.admin_port, &vec!["/metrics".to_string(); 200]));
    let metrics_fresh = pct((0..200).map(|_| fresh_latency(berth.admin_port, "/metrics")).collect());
    eprintln!(
        "/metrics p50 {:.2} ms p99 {:.2} ms (keep-alive); p50 {:.2} ms p99 {:.2} ms (a connection each)",
        metrics.p50, metrics.p99, metrics_fresh.p50, metrics_fresh.p99
    );
    let p = paths(shape, requests, 42);
    // Untimed warm-up pass over other repositories, as a server in use would have had.
    let _ = latencies(berth.port, &paths(shape, requests / 4, 7).tags);
    let tags = pct(latencies(berth.port, &p.tags));
    let tags_last = pct(latencies(berth.port, &p.tags_last));
    let catalog = pct(latencies(berth.port, &p.catalog));
    let catalog_last = pct(latencies(berth.port, &p.catalog_last));
    let (walked, walk_secs) = walk_catalog(berth.port);
    assert_eq!(walked, shape.repos, "catalog walk");
    let metrics_after = pct(latencies(berth.admin_port, &vec!["/metrics".to_string(); 200]));
    let ui = ui_latencies(berth.port, shape, (requests / 10).max(20));
    for (what, v) in [("tags/list", tags), ("tags/list last=", tags_last), ("catalog", catalog), ("catalog last=", catalog_last)] {
        eprintln!("{what}: p50 {:.3} ms p99 {:.3} ms max {:.2} ms over {}", v.p50, v.p99, v.max, v.n);
    }
    let (rss, peak) = (berth.rss_mib(), berth.peak_mib());
    eprintln!("RSS {rss:.0} MiB (at ready {rss_at_ready:.0}), peak {peak:.0} MiB; catalog walk {walked} names in {walk_secs:.2} s");

    // kill -9: the next open finds the database not closed cleanly and repairs it.
    berth.kill9();
    let (berth, ready_repair) = start_berth(&dir, &config, port, admin_port);
    check_listing(berth.port, shape, true);
    let (rss_repair, peak_repair) = (berth.rss_mib(), berth.peak_mib());
    eprintln!("berth ready in {ready_repair:.2} s after kill -9; RSS {rss_repair:.0} MiB, peak {peak_repair:.0} MiB");
    berth.stop();

    // ---- side by side with distribution ----
    let side = if side_repos == 0 {
        Err("skipped (BENCH_SCALE_SIDE_REPOS=0)".to_string())
    } else if !common::have("docker-registry") {
        Err("skipped: docker-registry (CNCF distribution) is not installed (apt-get install docker-registry)".to_string())
    } else {
        let small = Shape { repos: side_repos, ..shape };
        let (sdir, sgen, _) = store_for(small, true);
        settle_database(&sdir.join("data"));
        let (config, port, admin_port) = berth_config(&sdir);
        let (b, _) = start_berth(&sdir, &config, port, admin_port);
        let d = start_distribution(&sdir);
        check_listing(b.port, small, true);
        check_listing(d.port, small, false);
        let sp = paths(small, requests / 2, 43);
        let mut rows = Vec::new();
        for (what, list) in [
            ("tags/list?n=100", &sp.tags),
            ("tags/list?n=100&last=", &sp.tags_last),
            ("_catalog?n=100", &sp.catalog),
            ("_catalog?n=100&last=", &sp.catalog_last),
        ] {
            // Warm both once, then time them in turns of 100 requests.
            let _ = latencies(b.port, &list[..list.len().min(50)]);
            let _ = latencies(d.port, &list[..list.len().min(50)]);
            let (mut lb, mut ld) = (Vec::new(), Vec::new());
            for part in list.chunks(100) {
                lb.extend(latencies(b.port, part));
                ld.extend(latencies(d.port, part));
            }
            let (pb, pd) = (pct(lb), pct(ld));
            eprintln!("side by side {what}: berth p99 {:.3} ms, distribution p99 {:.3} ms", pb.p99, pd.p99);
            rows.push((what, pb, pd));
        }
        let (_, bwalk) = walk_catalog(b.port);
        let (dn, dwalk) = walk_catalog(d.port);
        assert_eq!(dn, small.repos, "distribution's catalog walk");
        b.stop();
        drop(d);
        Ok((small, sgen, rows, bwalk, dwalk))
    };

    // ---- report ----
    let mut md = String::new();
    let machine = format!(
        "{} cores, {} MiB RAM, Linux {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        (status_kib_meminfo() / 1024.0).round(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    writeln!(md, "Machine: {machine}; berth `threads = 2`, client on the same machine, one keep-alive connection, sequential requests.\n")
        .unwrap();
    writeln!(
        md,
        "Store: {} tags in {} repositories under the hosted namespace `team` ({} tags and {} distinct manifests per repository, each manifest with its own config and layer over one shared base layer): meta.redb {redb_mib:.0} MiB, {store_mib:.0} MiB on disk in all. Generated with berth's library code in {gen_secs:.0} s{}.\n",
        shape.total_tags(),
        shape.repos,
        shape.tags,
        shape.manifests,
        if reused { " (by an earlier run; reused)" } else { "" }
    )
    .unwrap();
    writeln!(md, "| measure | target | result | |").unwrap();
    writeln!(md, "|---|---|---:|---|").unwrap();
    let mut row = |m: &str, t: &str, r: String, ok: bool| writeln!(md, "| {m} | {t} | {r} | {} |", verdict(ok)).unwrap();
    row("ready after start (spawn → /readyz 200)", "≤ 10 s", format!("{ready_clean:.2} s"), ready_clean <= READY_S);
    row("ready after `kill -9` and restart (redb repair)", "≤ 10 s", format!("{ready_repair:.2} s"), ready_repair <= READY_S);
    row("RSS after the measurements (VmRSS)", "≤ 512 MiB", format!("{rss:.0} MiB"), rss <= RSS_MIB);
    row("peak RSS (VmHWM), clean start and measurements", "≤ 512 MiB", format!("{peak:.0} MiB"), peak <= RSS_MIB);
    row("peak RSS (VmHWM), restart after `kill -9`", "≤ 512 MiB", format!("{peak_repair:.0} MiB"), peak_repair <= RSS_MIB);
    let f = |p: Pct| format!("{:.2} / {:.2} ms", p.p50, p.p99);
    row("`/metrics` p50 / p99 (200 GETs, one keep-alive connection)", "≤ 20 ms", f(metrics), metrics.p99 <= METRICS_MS);
    row("`/metrics` p50 / p99 (200 GETs, a new connection each)", "≤ 20 ms", f(metrics_fresh), metrics_fresh.p99 <= METRICS_MS);
    row("`/metrics` p50 / p99, keep-alive, after the listings", "≤ 20 ms", f(metrics_after), metrics_after.p99 <= METRICS_MS);
    row(&format!("`tags/list?n=100` p50 / p99 ({} random repositories)", tags.n), "p99 ≤ 5 ms", f(tags), tags.p99 <= TAGS_MS);
    row(&format!("`tags/list?n=100&last=<tag>` p50 / p99 ({})", tags_last.n), "p99 ≤ 5 ms", f(tags_last), tags_last.p99 <= TAGS_MS);
    row(&format!("`_catalog?n=100` p50 / p99 ({})", catalog.n), "p99 ≤ 5 ms", f(catalog), catalog.p99 <= CATALOG_MS);
    row(
        &format!("`_catalog?n=100&last=<repo>` p50 / p99 ({})", catalog_last.n),
        "p99 ≤ 5 ms",
        f(catalog_last),
        catalog_last.p99 <= CATALOG_MS,
    );
    writeln!(
        md,
        "\nAlso: the whole catalog walked by its `Link` headers ({} pages of 100) in {walk_secs:.2} s; RSS right after the clean start {rss_at_ready:.0} MiB, after the restart {rss_repair:.0} MiB; max latencies: tags/list {:.2} ms, catalog {:.2} ms.\n",
        shape.repos.div_ceil(100),
        tags.max.max(tags_last.max),
        catalog.max.max(catalog_last.max)
    )
    .unwrap();
    writeln!(
        md,
        "Web UI on this store, p50 / p99 ms over {} GETs each: home page (50 repositories and their tag counts, from a random `after=`) {:.2} / {:.2}; a repository page (50 tags with digest, media type, platform, size, date) {:.2} / {:.2}; a search matching nothing (looks at 5000 names, then offers to go on) {:.2} / {:.2}.\n",
        ui[0].n, ui[0].p50, ui[0].p99, ui[1].p50, ui[1].p99, ui[2].p50, ui[2].p99
    )
    .unwrap();
    match &side {
        Err(why) => writeln!(md, "Side by side with distribution: {why}.").unwrap(),
        Ok((small, sgen, rows, bwalk, dwalk)) => {
            writeln!(
                md,
                "Side by side, same run, on a store of {} tags in {} repositories generated the same way for both (berth's store and distribution's filesystem layout, blobs hard-linked, in {sgen:.0} s); the servers take turns every 100 requests:\n",
                small.total_tags(),
                small.repos
            )
            .unwrap();
            writeln!(md, "| request | berth p50 / p99 ms | distribution p50 / p99 ms | p99 berth/distribution |").unwrap();
            writeln!(md, "|---|---:|---:|---:|").unwrap();
            for (what, b, d) in rows {
                writeln!(md, "| `{what}` ({}) | {:.2} / {:.2} | {:.2} / {:.2} | {:.3} |", b.n, b.p50, b.p99, d.p50, d.p99, b.p99 / d.p99)
                    .unwrap();
            }
            writeln!(
                md,
                "| whole catalog by `Link` ({} pages) | {:.2} s | {:.2} s | {:.3} |",
                small.repos.div_ceil(100),
                bwalk,
                dwalk,
                bwalk / dwalk
            )
            .unwrap();
        }
    }
    std::fs::write(out_dir().join("scale.md"), &md).unwrap();
    println!("{md}");
}

fn status_kib_meminfo() -> f64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}
