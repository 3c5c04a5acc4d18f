//! Shared harness: runs the real `berth` binary on loopback with a generated config and ports.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod cmd;
pub mod distribution;
pub mod dockerd;
pub mod fake;
pub mod oci_layout;
pub mod ports;

pub use ports::free_port;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub struct Berth {
    pub child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// The storage backend the suite runs against: `BERTH_TEST_BACKEND=s3` (with the
/// `BERTH_TEST_S3_*` settings `scripts/rgw start` prints) puts every berth the tests start on
/// the bucket, each under a prefix of its own.
pub fn backend_is_s3() -> bool {
    std::env::var("BERTH_TEST_BACKEND").is_ok_and(|v| v == "s3")
}

/// The `[storage.s3]` section for a berth whose files live in `dir` (empty for local disk).
pub fn s3_section(dir: &Path) -> String {
    if !backend_is_s3() {
        return String::new();
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("BERTH_TEST_BACKEND=s3 needs {k} (scripts/rgw start prints it)"));
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, var("BERTH_TEST_S3_SECRET_KEY")).unwrap();
    let prefix = s3_prefix(dir);
    format!(
        "hot_tier_bytes = \"1GiB\"\n\n[storage.s3]\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\nprefix = \"{prefix}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        var("BERTH_TEST_S3_BUCKET"),
        var("BERTH_TEST_S3_ENDPOINT"),
        var("BERTH_TEST_S3_REGION"),
        var("BERTH_TEST_S3_ACCESS_KEY"),
        secret.display()
    )
}

fn s3_prefix(dir: &Path) -> String {
    format!("t/{}/", dir.file_name().unwrap().to_string_lossy().trim_start_matches('.'))
}

/// A client on the bucket a berth started in `dir` uses (S3 backend only).
pub fn s3_bucket(dir: &Path) -> Option<std::sync::Arc<berth::store::s3::Bucket>> {
    if !backend_is_s3() {
        return None;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let s = berth::store::s3::S3Settings {
        bucket: var("BERTH_TEST_S3_BUCKET"),
        endpoint: Some(var("BERTH_TEST_S3_ENDPOINT")),
        region: var("BERTH_TEST_S3_REGION"),
        prefix: s3_prefix(dir),
        access_key_id: Some(var("BERTH_TEST_S3_ACCESS_KEY")),
        secret_access_key: Some(var("BERTH_TEST_S3_SECRET_KEY")),
        ..Default::default()
    };
    Some(berth::store::s3::Bucket::new(&s, Duration::from_secs(10)).unwrap())
}

/// Files under `dir`, as paths relative to it (none if it does not exist).
pub fn local_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// Polls `f` until it returns true, for at most `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Reproducible bytes that do not compress or repeat (xorshift).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Berth {
    /// Blobs in the store's content-addressed space, as `<algo>/<2 hex>/<hex>`, whichever the
    /// backend.
    pub fn stored_blobs(&self) -> std::collections::BTreeSet<String> {
        match s3_bucket(self.dir.path()) {
            None => local_files(&self.data_dir().join("blobs")).into_iter().collect(),
            Some(b) => {
                let mut out = std::collections::BTreeSet::new();
                b.list("blobs/", None, &mut |k, _| {
                    out.insert(k.trim_start_matches("blobs/").to_string());
                    true
                })
                .unwrap();
                out
            }
        }
    }

    /// Ids of upload sessions whose data the storage holds.
    pub fn stored_uploads(&self) -> std::collections::BTreeSet<String> {
        let id = |k: &str| k.split('/').next().unwrap().to_string();
        match s3_bucket(self.dir.path()) {
            None => local_files(&self.data_dir().join("uploads")).iter().map(|k| id(k)).collect(),
            Some(b) => {
                let mut out = std::collections::BTreeSet::new();
                b.list("uploads/", None, &mut |k, _| {
                    out.insert(id(k.trim_start_matches("uploads/")));
                    true
                })
                .unwrap();
                out
            }
        }
    }

    /// Replaces a stored blob's bytes (bit rot), in the store and in any local copy.
    pub fn corrupt_blob(&self, digest: &str, bytes: &[u8]) {
        let (algo, hex) = digest.split_once(':').unwrap();
        let rel = format!("{algo}/{}/{hex}", &hex[..2]);
        match s3_bucket(self.dir.path()) {
            None => std::fs::write(self.data_dir().join("blobs").join(rel), bytes).unwrap(),
            Some(b) => {
                b.put(&format!("blobs/{rel}"), bytes.to_vec().into(), false).unwrap();
                let _ = std::fs::remove_file(self.data_dir().join("hot").join(rel));
            }
        }
    }

    /// A stored blob's bytes.
    pub fn stored_blob(&self, digest: &str) -> Option<Vec<u8>> {
        let (algo, hex) = digest.split_once(':').unwrap();
        let rel = format!("{algo}/{}/{hex}", &hex[..2]);
        match s3_bucket(self.dir.path()) {
            None => std::fs::read(self.data_dir().join("blobs").join(rel)).ok(),
            Some(b) => b.get(&format!("blobs/{rel}")).unwrap().map(|b| b.to_vec()),
        }
    }

    /// Starts berth with `[server]` listeners on fresh ports, `[storage] root` in a temp dir,
    /// and `extra` appended (namespaces, upstreams, ...).
    pub fn start(extra: &str) -> Berth {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Berth {
        Self::start_in_with_server(dir, "", extra)
    }

    /// As `start_in`, with `server_extra` added to `[server]` (TLS keys, a longer
    /// `grace_period`, which then replaces the short default the tests use).
    pub fn start_in_with_server(dir: tempfile::TempDir, server_extra: &str, extra: &str) -> Berth {
        Self::start_configured(dir, server_extra, "", extra)
    }

    /// As `start`, with the written config passed through `edit` first.
    pub fn start_edited(extra: &str, edit: impl FnOnce(String) -> String) -> Berth {
        let dir = tempfile::tempdir().unwrap();
        let (config_path, port, admin_port) = Self::write_config(dir.path(), "", "", extra);
        let text = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(&config_path, edit(text)).unwrap();
        let mut b = Berth { child: None, port, admin_port, config_path, log_path: dir.path().join("berth.log"), dir };
        b.spawn();
        b
    }

    /// As `start`, with `storage_extra` added to `[storage]` (cache bound, GC, upload expiry).
    pub fn start_with_storage(storage_extra: &str, extra: &str) -> Berth {
        Self::start_configured(tempfile::tempdir().unwrap(), "", storage_extra, extra)
    }

    fn start_configured(dir: tempfile::TempDir, server_extra: &str, storage_extra: &str, extra: &str) -> Berth {
        let (config_path, port, admin_port) = Self::write_config(dir.path(), server_extra, storage_extra, extra);
        let mut b = Berth { child: None, port, admin_port, config_path, log_path: dir.path().join("berth.log"), dir };
        b.spawn();
        b
    }

    /// Writes `dir/berth.toml` with listeners on fresh ports and storage under `dir/data`, for
    /// tests that start the binary themselves (other flags, environment). Returns the path and
    /// the registry and admin ports.
    pub fn write_config(dir: &Path, server_extra: &str, storage_extra: &str, extra: &str) -> (PathBuf, u16, u16) {
        let port = free_port();
        let admin_port = free_port();
        let grace = if server_extra.contains("grace_period") { "" } else { "grace_period = \"1s\"\n" };
        let s3 = s3_section(dir);
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{grace}{server_extra}\n\n[storage]\nroot = \"{}\"\n{storage_extra}\n{s3}\n{extra}\n",
            dir.join("data").display()
        );
        let config_path = dir.join("berth.toml");
        std::fs::write(&config_path, config).unwrap();
        (config_path, port, admin_port)
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("berth starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // A berth that exited (a port taken by another process, say) must not pass for ready
            // because something else answers on its admin port.
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("berth exited ({status}) before it was ready; log:\n{}", self.log());
            }
            if let Ok(r) = http_get(&format!("http://127.0.0.1:{}/readyz", self.admin_port)) {
                if r == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("berth did not become ready; log:\n{}", self.log());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A status-only GET with std (no client crate), for readiness polling.
fn http_get(url: &str) -> std::io::Result<u16> {
    use std::io::Write;
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect_timeout(&host.parse().unwrap(), Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("bad response"))
}

/// Is `cmd` on PATH?
pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Real-client tests need their client installed; CI installs them all, and BERTH_REQUIRE_CLIENTS=1
/// (set by .ci/run) turns a missing client into a failure instead of a skip.
pub fn require(cmd: &str) -> bool {
    if have(cmd) {
        return true;
    }
    if std::env::var("BERTH_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{cmd} is required (BERTH_REQUIRE_CLIENTS=1) but not installed");
    }
    eprintln!("skipping: {cmd} not installed");
    false
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
