//! Helpers for the operations tests (TLS, metrics, logs, shutdown): a test CA, a berth with
//! extra `[server]` keys, signals, and a small OCI image layout for real clients.
#![allow(dead_code)]

use crate::common::{self, Berth};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A throwaway CA and a server certificate it signed, for 127.0.0.1, ::1 and localhost.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "berth test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "::1".to_string(), "localhost".to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "berth test server");
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        TestCa { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// Writes `ca.crt`, `server.crt` and `server.key` into `dir`.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (ca, cert, key) = (dir.join("ca.crt"), dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&ca, &self.ca_pem).unwrap();
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (ca, cert, key)
    }
}

/// Starts berth with `server_extra` added to its `[server]` section and `extra` after it.
/// Files the config names (certificates) can be put in `dir` first.
pub fn start(dir: tempfile::TempDir, server_extra: &str, extra: &str) -> Berth {
    Berth::start_in_with_server(dir, server_extra, extra)
}

pub fn signal(b: &Berth, sig: &str) {
    let pid = b.child.as_ref().expect("berth runs").id();
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits up to `limit` for berth to exit; its exit status, or None if it is still running.
pub fn wait_exit(b: &mut Berth, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    let child = b.child.as_mut().expect("berth runs");
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            b.child = None;
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Status of a GET on the admin listener, or None when nothing answers.
pub fn admin_status(b: &Berth, path: &str) -> Option<u16> {
    let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    c.get(format!("{}{path}", b.admin_url())).send().ok().map(|r| r.status().as_u16())
}

pub fn metrics(b: &Berth) -> String {
    reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap()
}

/// The value of one sample, `name{labels}` exactly as Prometheus text prints it (labels sorted).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Pushes `data` as a blob to a hosted repository with a monolithic upload; returns its digest.
pub fn push_blob(base: &str, repo: &str, data: &[u8]) -> String {
    let c = reqwest::blocking::Client::new();
    let d = common::digest(data);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202, "upload start");
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let url = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{url}{sep}digest={d}")).body(data.to_vec()).send().unwrap();
    assert_eq!(r.status(), 201, "upload commit: {}", r.text().unwrap_or_default());
    d
}

/// A one-layer image as an OCI layout at `dir` tagged `tag`: a file `/hello` saying `text`.
/// Returns the manifest digest.
pub fn oci_layout(dir: &Path, tag: &str, text: &str) -> String {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello"), text).unwrap();
    let tar = dir.join("layer.tar");
    let ok = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("hello")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar");
    let layer_tar = std::fs::read(&tar).unwrap();
    let ok = Command::new("gzip").args(["-n", "-f"]).arg(&tar).status().unwrap().success();
    assert!(ok, "gzip");
    let layer = std::fs::read(dir.join("layer.tar.gz")).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [common::digest(&layer_tar)]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": common::digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": common::digest(&layer), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in [&layer, &config, &manifest] {
        std::fs::write(blobs.join(common::sha256_hex(b)), b).unwrap();
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": common::digest(&manifest),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    common::digest(&manifest)
}

/// Runs a command with a deadline (a hung client fails the test), returning (success, stdout,
/// stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = common::cmd::run(cmd, Duration::from_secs(180));
    (out.ok, out.stdout, out.stderr)
}
