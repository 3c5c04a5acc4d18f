//! The TLS listener: h2 and http/1.1 by ALPN, real clients trusting a test CA, and bad
//! certificate or key files refused by name before anything starts.

mod common;
mod support;

use common::dockerd::Dockerd;
use common::{free_port, require, Berth};
use std::path::Path;
use std::process::Command;
use support::{run, TestCa};

struct TlsBerth {
    berth: Berth,
    tls_port: u16,
    ca: std::path::PathBuf,
}

/// berth with a TLS listener on `host` (127.0.0.1 or [::1]) beside the plain one.
fn start_tls(host: &str, extra: &str) -> TlsBerth {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new().write(&dir.path().join("tls"));
    let tls_port = free_port();
    let server = format!("tls_listen = \"{host}:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display());
    TlsBerth { berth: support::start(dir, &server, extra), tls_port, ca }
}

fn curl(args: &[&str]) -> (bool, String, String) {
    run(Command::new("curl").args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"]).args(args))
}

#[test]
fn curl_negotiates_h2_and_http1_over_tls() {
    if !require("curl") {
        return;
    }
    let b = start_tls("127.0.0.1", "[[namespace]]\nprefix = \"team\"\n");
    let url = format!("https://127.0.0.1:{}/v2/", b.tls_port);
    let ca = b.ca.to_str().unwrap();
    let (ok, out, err) = curl(&["--cacert", ca, &url]);
    assert!(ok, "{err}");
    assert_eq!(out, "2 200", "ALPN should pick h2");
    let (ok, out, err) = curl(&["--http1.1", "--cacert", ca, &url]);
    assert!(ok, "{err}");
    assert_eq!(out, "1.1 200", "a client offering only http/1.1 still gets served");
    // Trust matters: without the test CA the certificate is refused.
    let (ok, _, err) = curl(&[&url]);
    assert!(!ok, "curl accepted a certificate from an unknown CA: {err}");
    // Requests over TLS get their access lines like any other (written just after the answer).
    let base_lines = |log: &str| log.lines().filter(|l| l.contains("route=\"base\"")).count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while base_lines(&b.berth.log()) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(base_lines(&b.berth.log()) >= 2, "{}", b.berth.log());
}

#[test]
fn reqwest_pushes_and_pulls_a_blob_over_tls() {
    let b = start_tls("127.0.0.1", "[[namespace]]\nprefix = \"team\"\n");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&b.ca).unwrap()).unwrap();
    let base = format!("https://127.0.0.1:{}", b.tls_port);
    let c = reqwest::blocking::Client::builder().add_root_certificate(ca).build().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = common::digest(&data);
    let r = c.post(format!("{base}/v2/team/tls/blobs/uploads/?digest={d}")).body(data.clone()).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap_or_default());
    let got = c.get(format!("{base}/v2/team/tls/blobs/{d}")).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(common::digest(&got.bytes().unwrap()), d);
}

#[test]
fn skopeo_copies_to_and_from_berth_over_tls() {
    if !require("skopeo") {
        return;
    }
    let b = start_tls("127.0.0.1", "[[namespace]]\nprefix = \"team\"\n");
    let work = tempfile::tempdir().unwrap();
    let manifest = support::oci_layout(work.path(), "v1", "hello over TLS\n");
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&b.ca, certs.join("ca.crt")).unwrap();
    let dest = format!("docker://127.0.0.1:{}/team/tls-app:v1", b.tls_port);
    let src = format!("oci:{}:v1", work.path().join("layout").display());
    let (ok, _, err) = run(Command::new("skopeo").args(["copy", "--dest-cert-dir"]).arg(&certs).args([&src, &dest]));
    assert!(ok, "push over TLS: {err}\nberth log:\n{}", b.berth.log());
    let back = work.path().join("back");
    let (ok, _, err) = run(Command::new("skopeo")
        .args(["copy", "--preserve-digests", "--src-cert-dir"])
        .arg(&certs)
        .arg(&dest)
        .arg(format!("oci:{}:v1", back.display())));
    assert!(ok, "pull over TLS: {err}");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], manifest.as_str());
    // Without the CA, skopeo must refuse the certificate rather than fall back to anything.
    let (ok, _, err) = run(Command::new("skopeo").args(["inspect", "--raw", &dest]));
    assert!(!ok, "skopeo trusted an unknown CA");
    assert!(err.contains("x509") || err.contains("certificate"), "{err}");
}

/// The docker daemon treats every 127.0.0.0/8 registry as insecure and would skip
/// verification there, so this test serves TLS on [::1], which it does verify against
/// `certs.d/[::1]:PORT/ca.crt`.
#[test]
fn docker_pulls_through_a_tls_mirror_trusting_the_test_ca() {
    if !require("dockerd") || !require("docker") || !require("skopeo") {
        return;
    }
    // Hosted `library/...` stands in for Docker Hub content, so no upstream is involved.
    let b = start_tls("[::1]", "[[namespace]]\nprefix = \"library\"\n");
    let work = tempfile::tempdir().unwrap();
    support::oci_layout(work.path(), "latest", "hello from a TLS mirror\n");
    let (ok, _, err) = run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", work.path().join("layout").display()))
        .arg(format!("docker://127.0.0.1:{}/library/berthtls:latest", b.berth.port)));
    assert!(ok, "{err}");

    let host = format!("[::1]:{}", b.tls_port);
    let certs_d = Path::new("/etc/docker/certs.d").join(&host);
    std::fs::create_dir_all(&certs_d).unwrap();
    std::fs::copy(&b.ca, certs_d.join("ca.crt")).unwrap();
    let _cleanup = RemoveOnDrop(certs_d.clone());
    let d = Dockerd::start(Some(&format!("https://{host}")));
    let pull = d.docker(&["pull", "berthtls:latest"]);
    assert!(
        pull.ok,
        "docker pull through the TLS mirror: {}{}\ndockerd log:\n{}\nberth log:\n{}",
        pull.stdout,
        pull.stderr,
        d.log_text(),
        b.berth.log()
    );
    let id = d.docker(&["image", "inspect", "--format", "{{.Id}}", "berthtls:latest"]).expect_ok();
    assert!(id.stdout.starts_with("sha256:"), "{}", id.stdout);
    let log = b.berth.log();
    assert!(log.contains("library/berthtls"), "the pull did not go through berth:\n{log}");
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn berth_cmd(args: &[&str], config: &Path) -> (bool, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_berth")).args(args).arg("--config").arg(config))
}

#[test]
fn bad_certificate_or_key_fails_check_and_serve_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let other = TestCa::new();
    let (_, cert, key) = ca.write(&dir.path().join("good"));
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let cases = [
        ("missing cert", &missing, &key, &missing),
        ("garbage cert", &garbage, &key, &garbage),
        ("missing key", &cert, &missing, &missing),
        ("garbage key", &cert, &garbage, &garbage),
        ("key of another cert", &cert, &other_key, &other_key),
    ];
    for (what, c, k, named) in cases {
        let config = dir.path().join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\ntls_listen = \"127.0.0.1:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[storage]\nroot = \"{}\"\n",
                free_port(),
                free_port(),
                free_port(),
                c.display(),
                k.display(),
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        for cmd in ["check", "serve"] {
            let (ok, _, err) = berth_cmd(&[cmd], &config);
            assert!(!ok, "{what}: berth {cmd} succeeded");
            assert!(err.contains(&named.display().to_string()), "{what}: berth {cmd} must name {}: {err}", named.display());
            assert!(!err.contains("panicked"), "{what}: berth {cmd} panicked: {err}");
            assert!(!err.contains("PRIVATE KEY") && !err.contains(other.key_pem.lines().nth(1).unwrap()), "{what}: key material in {err}");
        }
    }
    // And the good pair passes.
    let config = dir.path().join("good.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_listen = \"127.0.0.1:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[storage]\nroot = \"{}\"\n",
            free_port(),
            cert.display(),
            key.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (ok, out, err) = berth_cmd(&["check"], &config);
    assert!(ok, "{out}{err}");
}

#[test]
fn tls_alone_without_a_plain_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new().write(&dir.path().join("tls"));
    let tls_port = free_port();
    let admin_port = free_port();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[storage]\nroot = \"{}\"\n[[namespace]]\nprefix = \"team\"\n",
            cert.display(),
            key.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("berth.log");
    let mut b = Berth { child: None, port: tls_port, admin_port, config_path: config, log_path, dir };
    b.spawn();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let c = reqwest::blocking::Client::builder().add_root_certificate(ca).build().unwrap();
    let r = c.get(format!("https://localhost:{tls_port}/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
}
