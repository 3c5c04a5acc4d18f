//! The store under concurrency, crashes and limits, driven over HTTP against the real binary:
//! racing tag writers then kill -9, racing pushes to an immutable tag, open upload sessions
//! under a small descriptor limit, a large upload resumed after a restart with one worker,
//! and a store written in the 0.1 layout.

mod common;

use common::Berth;
use reqwest::blocking::Client;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> u16 {
    let d = common::digest(data);
    c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap().status().as_u16()
}

/// A manifest over one config blob (already pushed); different `label`s give different digests.
fn manifest(config_digest: &str, config_len: usize, label: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_len}}},"layers":[],"annotations":{{"label":"{label}"}}}}"#
    )
}

fn put_manifest(c: &Client, base: &str, repo: &str, tag: &str, m: &str) -> u16 {
    c.put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.to_string())
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn tag_digest(c: &Client, base: &str, repo: &str, tag: &str) -> Option<String> {
    let r = c.head(format!("{base}/v2/{repo}/manifests/{tag}")).header("Accept", OCI_MANIFEST).send().unwrap();
    (r.status() == 200).then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_string())
}

#[test]
fn racing_tag_writers_then_kill_9_agree_after_restart() {
    let mut b = Berth::start_in_with_server(tempfile::tempdir().unwrap(), "threads = 4\n", "[[namespace]]\nprefix = \"team\"\n");
    let base = b.url();
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    assert_eq!(push_blob(&c, &base, "team/race", config), 201);
    let cd = common::digest(config);
    let tags = 300;
    // Two writers push different manifests to the same tags at the same time.
    let writers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|w| {
            let (base, cd) = (base.clone(), cd.clone());
            std::thread::spawn(move || {
                let c = client();
                for i in 0..tags {
                    let m = manifest(&cd, config.len(), &format!("{w}{i}"));
                    assert_eq!(put_manifest(&c, &base, "team/race", &format!("t{i}"), &m), 201);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let before: Vec<String> = (0..tags).map(|i| tag_digest(&c, &base, "team/race", &format!("t{i}")).unwrap()).collect();
    for (i, d) in before.iter().enumerate() {
        let a = common::digest(manifest(&cd, config.len(), &format!("a{i}")).as_bytes());
        let bb = common::digest(manifest(&cd, config.len(), &format!("b{i}")).as_bytes());
        assert!(*d == a || *d == bb, "t{i} names neither write");
    }
    b.kill(); // SIGKILL: no orderly shutdown
    b.spawn();
    let after: Vec<String> = (0..tags).map(|i| tag_digest(&c, &b.url(), "team/race", &format!("t{i}")).unwrap()).collect();
    let differ = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} of {tags} tags changed across the restart");
}

#[test]
fn racing_pushes_to_one_immutable_tag_exactly_one_wins() {
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\nimmutable_tags = [\"v*\"]\n");
    let base = b.url();
    let c = client();
    let config = br#"{"architecture":"arm64","os":"linux"}"#;
    assert_eq!(push_blob(&c, &base, "team/imm", config), 201);
    let cd = common::digest(config);
    for round in 0..5 {
        let tag = format!("v{round}");
        let go = Arc::new(std::sync::Barrier::new(16));
        let pushers: Vec<_> = (0..16)
            .map(|i| {
                let (base, cd, tag, go) = (base.clone(), cd.clone(), tag.clone(), go.clone());
                std::thread::spawn(move || {
                    let c = client();
                    let m = manifest(&cd, config.len(), &format!("{tag}-{i}"));
                    go.wait();
                    (put_manifest(&c, &base, "team/imm", &tag, &m), common::digest(m.as_bytes()))
                })
            })
            .collect();
        let results: Vec<(u16, String)> = pushers.into_iter().map(|p| p.join().unwrap()).collect();
        let winners: Vec<&String> = results.iter().filter(|(s, _)| *s == 201).map(|(_, d)| d).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|(s, _)| *s == 201 || *s == 403), "{results:?}");
        assert_eq!(tag_digest(&c, &base, "team/imm", &tag).as_ref(), Some(winners[0]));
    }
}

/// Starts berth with at most `nofile` open descriptors.
fn spawn_limited(config: &std::path::Path, log: &std::path::Path, nofile: u64) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(["serve", "--config"]).arg(config).stdout(Stdio::null()).stderr(log);
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn wait_ready(admin: &str) {
    let c = Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if c.get(format!("{admin}/readyz")).send().is_ok_and(|r| r.status() == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("berth did not become ready");
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_thousand_open_sessions_under_256_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let (config, port, admin) = Berth::write_config(
        dir.path(),
        "",
        "upload_sessions_per_client = 100\nupload_sessions_per_repository = 100\n",
        "[[namespace]]\nprefix = \"team\"\n",
    );
    let _berth = Killed(spawn_limited(&config, &dir.path().join("berth.log"), 256));
    let (base, admin) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{admin}"));
    wait_ready(&admin);
    // Ten client addresses on loopback, a hundred sessions each, over ten repositories.
    let opened = Arc::new(AtomicUsize::new(0));
    let openers: Vec<_> = (0..10u8)
        .map(|a| {
            let (base, opened) = (base.clone(), opened.clone());
            std::thread::spawn(move || {
                let ip: IpAddr = format!("127.0.0.{}", a + 2).parse().unwrap();
                let c = Client::builder().local_address(ip).timeout(Duration::from_secs(30)).build().unwrap();
                for _ in 0..100 {
                    let r = c.post(format!("{base}/v2/team/r{a}/blobs/uploads/")).body(vec![a; 100]).send().unwrap();
                    assert_eq!(r.status(), 202);
                    opened.fetch_add(1, Ordering::SeqCst);
                }
                // Over the cap: a clear 429, nothing opened.
                let r = c.post(format!("{base}/v2/team/other{a}/blobs/uploads/")).send().unwrap();
                assert_eq!(r.status(), 429);
                let v: serde_json::Value = r.json().unwrap();
                assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
            })
        })
        .collect();
    // Meanwhile others push and pull.
    let c = client();
    let mut pushed = Vec::new();
    for i in 0..40 {
        let data = format!("pushed while sessions pile up {i}").repeat(1000).into_bytes();
        assert_eq!(push_blob(&c, &base, "team/busy", &data), 201);
        pushed.push(data);
    }
    for o in openers {
        o.join().unwrap();
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1000);
    for data in &pushed {
        let r = c.get(format!("{base}/v2/team/busy/blobs/{}", common::digest(data))).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().unwrap().len(), data.len());
    }
    // The repository cap: a hundred sessions in one repository, from any address.
    let r = c.post(format!("{base}/v2/team/r0/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 429);
    let m = c.get(format!("{admin}/metrics")).send().unwrap().text().unwrap();
    assert!(
        m.lines().any(|l| l == "berth_uploads_in_progress 1000"),
        "{}",
        m.lines().filter(|l| l.contains("uploads")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn a_resumed_large_upload_does_not_hold_the_only_worker() {
    let mut b = Berth::start_in_with_server(tempfile::tempdir().unwrap(), "threads = 1\n", "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let r = c.post(format!("{}/v2/team/big/blobs/uploads/", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // 768 MiB in chunks: enough that hashing it again takes a while.
    let chunk: Vec<u8> = (0..(32 << 20)).map(|i| (i % 253) as u8).collect();
    let n = 24;
    for i in 0..n {
        let start = i * chunk.len();
        let r = c
            .patch(format!("{}{loc}", b.url()))
            .header("Content-Range", format!("{start}-{}", start + chunk.len() - 1))
            .body(chunk.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    b.restart();
    let base = b.url();
    // The first request for the session after the restart hashes its data again.
    let done = Arc::new(AtomicBool::new(false));
    let resume = {
        let (url, done) = (format!("{base}{loc}"), done.clone());
        std::thread::spawn(move || {
            let r = client().get(url).send().unwrap();
            done.store(true, Ordering::SeqCst);
            (r.status().as_u16(), r.headers().get("range").map(|v| v.to_str().unwrap().to_string()))
        })
    };
    let mut answered_meanwhile = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        if c.get(format!("{base}/v2/")).send().unwrap().status() == 200 && !done.load(Ordering::SeqCst) {
            answered_meanwhile += 1;
        }
    }
    let (status, range) = resume.join().unwrap();
    assert_eq!(status, 204);
    assert_eq!(range.as_deref(), Some(format!("0-{}", n * chunk.len() - 1).as_str()));
    assert!(answered_meanwhile >= 3, "only {answered_meanwhile} requests were answered while the session was re-hashed");
    // And the resumed session completes with the right digest.
    let mut whole = Vec::with_capacity(n * chunk.len());
    for _ in 0..n {
        whole.extend_from_slice(&chunk);
    }
    let d = common::digest(&whole);
    drop(whole);
    let r = c.put(format!("{base}{loc}?digest={d}")).send().unwrap();
    assert_eq!(r.status(), 201);
}

/// Writes a store as berth 0.1 laid it out: one file per fact.
fn write_v1_store(data: &std::path::Path) -> (String, String, Vec<u8>) {
    let put_blob = |bytes: &[u8]| -> String {
        let hex = common::sha256_hex(bytes);
        let dir = data.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    };
    let layer = b"a layer from the old days".to_vec();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let ld = put_blob(&layer);
    let cd = put_blob(config);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let md = put_blob(m.as_bytes());
    let repo = data.join("repositories/team/old");
    for d in [&ld, &cd] {
        let p = repo.join("_layers/sha256");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(d.strip_prefix("sha256:").unwrap()), b"").unwrap();
    }
    let p = repo.join("_manifests/sha256");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join(md.strip_prefix("sha256:").unwrap()), format!(r#"{{"media_type":"{OCI_MANIFEST}","size":{}}}"#, m.len()))
        .unwrap();
    std::fs::create_dir_all(repo.join("_tags")).unwrap();
    std::fs::write(repo.join("_tags/v1"), &md).unwrap();
    (md, ld, m.into_bytes())
}

#[test]
fn a_store_written_by_berth_0_1_opens() {
    if common::backend_is_s3() {
        // The 0.1 layout was on local disk only.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (md, ld, m) = write_v1_store(&dir.path().join("data"));
    let b = Berth::start_in(dir, "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let r = c.get(format!("{}/v2/team/old/manifests/v1", b.url())).header("Accept", OCI_MANIFEST).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert_eq!(r.bytes().unwrap().to_vec(), m, "byte-exact");
    let r = c.get(format!("{}/v2/team/old/blobs/{ld}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), b"a layer from the old days");
    let v: serde_json::Value = c.get(format!("{}/v2/team/old/tags/list", b.url())).send().unwrap().json().unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    let v: serde_json::Value = c.get(format!("{}/v2/_catalog", b.url())).send().unwrap().json().unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["team/old"]));
    assert!(b.data_dir().join("repositories.v1").is_dir(), "the old files are kept aside");
    assert!(!b.data_dir().join("repositories").exists());
    // Pushes land in the imported repository as in any other.
    let config = br#"{"architecture":"riscv64","os":"linux"}"#;
    assert_eq!(push_blob(&c, &b.url(), "team/old", config), 201);
    let m2 = manifest(&common::digest(config), config.len(), "new");
    assert_eq!(put_manifest(&c, &b.url(), "team/old", "v2", &m2), 201);
    let mut b = b;
    b.kill();
    let o = Command::new(env!("CARGO_BIN_EXE_berth")).args(["fsck", "--config"]).arg(&b.config_path).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}");
}

#[test]
fn a_patch_body_must_match_its_content_range() {
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let r = c.post(format!("{}/v2/team/cr/blobs/uploads/", b.url())).send().unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let url = format!("{}{loc}", b.url());
    // Announced by Content-Length: refused before anything is read.
    let r = c.patch(&url).header("Content-Range", "0-99").body(vec![1u8; 50]).send().unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["range"], "0-0", "the session is as it was");
    // A chunked body shorter than its range: what arrived in order is kept, and the client
    // learns where to resume.
    // (a reader of unknown length goes out chunked, without Content-Length)
    let r = c
        .patch(&url)
        .header("Content-Range", "0-99")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(vec![2u8; 50])))
        .send()
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["range"], "0-49");
    // Longer than its range: nothing past it is written.
    let r = c
        .patch(&url)
        .header("Content-Range", "50-59")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(vec![3u8; 500])))
        .send()
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = c.get(&url).send().unwrap();
    let end: u64 = r.headers()["range"].to_str().unwrap().split('-').nth(1).unwrap().parse().unwrap();
    assert!(end < 60, "bytes past the range were stored: {end}");
}

#[test]
fn an_upload_status_does_not_wait_for_a_stalled_patch() {
    use std::io::Write;
    if common::backend_is_s3() {
        // A PATCH's bytes reach the bucket in whole parts or at its end, so a status during it
        // reports what was stored before it (the client's next offset either way).
        return;
    }
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let r = c.post(format!("{}/v2/team/st/blobs/uploads/", b.url())).send().unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // A PATCH that sends 300 KiB of its 1 MiB, then nothing. Its first 256 KiB reach the disk
    // (berth writes in batches of that size), which shows that it holds the session.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    write!(stalled, "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Range: 0-1048575\r\nContent-Length: 1048576\r\n\r\n").unwrap();
    stalled.write_all(&vec![7u8; 300 << 10]).unwrap();
    // Status requests answer at once (each within the client's 5 s) while the PATCH holds it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while answered < 3 {
        let r = c.get(format!("{}{loc}", b.url())).send().expect("status answered while a PATCH holds the session");
        assert_eq!(r.status(), 204);
        let end: u64 = r.headers()["range"].to_str().unwrap().split('-').nth(1).unwrap().parse().unwrap();
        if end >= (256 << 10) - 1 {
            assert!(end < 300 << 10, "more than was sent: {end}");
            answered += 1;
        }
        assert!(Instant::now() < deadline, "the stalled PATCH's first batch never showed");
    }
    drop(stalled);
}
