//! Lifecycle and crash safety: the mirror cache bound, online GC racing pushes, upload expiry,
//! fsck, kill -9 during pushes and fills, a full disk, and namespace policies.

mod common;

use common::fake::Fake;
use common::{eventually, Berth};
use reqwest::blocking::Client;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn code(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().unwrap_or_default();
    (status, v["errors"][0]["code"].as_str().unwrap_or("").to_string())
}

fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> reqwest::blocking::Response {
    let d = common::digest(data);
    c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap()
}

/// Pushes a one-layer image; returns (status of the manifest PUT, manifest digest, layer digest).
fn push_image(c: &Client, base: &str, repo: &str, tag: &str, layer: &[u8]) -> (u16, String, String) {
    let config =
        format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, common::digest(layer));
    for blob in [config.as_bytes(), layer] {
        let r = push_blob(c, base, repo, blob);
        if r.status() != 201 {
            return (r.status().as_u16(), String::new(), String::new());
        }
    }
    let ld = common::digest(layer);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        common::digest(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let r = c.put(format!("{base}/v2/{repo}/manifests/{tag}")).header("Content-Type", OCI_MANIFEST).body(m.clone()).send().unwrap();
    (r.status().as_u16(), common::digest(m.as_bytes()), ld)
}

fn store_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(store_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn blob_bytes(b: &Berth) -> u64 {
    store_files(&b.data_dir().join("blobs")).iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

fn berth_cmd(args: &[&str], config: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).args(args).arg("--config").arg(config).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn mirror_cache_stays_within_its_bound_least_recently_used_first() {
    let fake = Fake::start();
    let blobs: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1 << 20]).collect();
    let digests: Vec<String> = blobs.iter().map(|b| fake.add_blob(b)).collect();
    let b = Berth::start_with_storage(
        "max_cache_bytes = \"3MiB\"\n",
        &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url()),
    );
    let c = client();
    let get = |i: usize| {
        let r = c.get(format!("{}/v2/library/x/blobs/{}", b.url(), digests[i])).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(common::digest(&r.bytes().unwrap()), digests[i]);
    };
    for i in 0..3 {
        get(i);
    }
    get(0); // a hit refreshes blob 0
    for i in 3..6 {
        get(i);
        assert!(blob_bytes(&b) <= 3 << 20, "the store never holds more than the bound");
    }
    assert_eq!(fake.count("GET blob"), 6);
    // Blob 0 was used after 1 and 2, but the three newest fills pushed everything older out.
    let before = fake.count("GET blob");
    get(5);
    assert_eq!(fake.count("GET blob"), before, "the most recent blob is still cached");
    get(1);
    assert_eq!(fake.count("GET blob"), before + 1, "an evicted blob is fetched again");
    assert!(blob_bytes(&b) <= 3 << 20);
}

#[test]
fn lru_prefers_recently_hit_blobs() {
    let fake = Fake::start();
    let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1 << 20]).collect();
    let digests: Vec<String> = blobs.iter().map(|b| fake.add_blob(b)).collect();
    let b = Berth::start_with_storage(
        "max_cache_bytes = \"2MiB\"\n",
        &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url()),
    );
    let c = client();
    let get = |i: usize| c.get(format!("{}/v2/library/x/blobs/{}", b.url(), digests[i])).send().unwrap().bytes().unwrap();
    get(0);
    get(1);
    get(0); // 0 is now more recent than 1
    get(2); // evicts 1, not 0
    let n = fake.count("GET blob");
    get(0);
    assert_eq!(fake.count("GET blob"), n, "recently hit blob survived");
    get(1);
    assert_eq!(fake.count("GET blob"), n + 1, "least recently used blob was evicted");
}

#[test]
fn hosted_gc_races_pushes_without_losing_referenced_blobs() {
    let mut b = Berth::start_with_storage("gc_interval = \"50ms\"\ngc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\n");
    let base = b.url();
    let handles: Vec<_> = (0..4)
        .map(|w| {
            let base = base.clone();
            std::thread::spawn(move || {
                let c = client();
                let mut ok = Vec::new();
                for i in 0..15 {
                    let layer = format!("worker {w} layer {i} ").repeat(2000);
                    let tag = format!("w{w}-{i}");
                    let (status, md, _) = push_image(&c, &base, "team/race", &tag, layer.as_bytes());
                    // With no grace period a push may lose its layers before its manifest
                    // arrives; that push fails cleanly. What succeeded must stay whole.
                    match status {
                        201 => ok.push((tag, md)),
                        400 => {}
                        s => panic!("unexpected push status {s}"),
                    }
                    if i % 3 == 0 {
                        // Deletions give GC something to collect while pushes run.
                        if let Some((_, md)) = ok.pop() {
                            c.delete(format!("{base}/v2/team/race/manifests/{md}")).send().unwrap();
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let kept: Vec<(String, String)> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(!kept.is_empty());
    // Two more collections end, so at least one ran wholly after the last push.
    let collections = || b.log().matches("garbage collection done").count();
    let before = collections();
    assert!(eventually(Duration::from_secs(20), || collections() >= before + 2), "GC stopped running:\n{}", b.log());
    let c = client();
    for (tag, md) in &kept {
        let r = c.get(format!("{base}/v2/team/race/manifests/{tag}")).send().unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        let m: serde_json::Value = r.json().unwrap();
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
            let d = d["digest"].as_str().unwrap();
            let r = c.get(format!("{base}/v2/team/race/blobs/{d}")).send().unwrap();
            assert_eq!(r.status(), 200, "blob {d} of {tag} was collected");
            assert_eq!(common::digest(&r.bytes().unwrap()), d);
        }
    }
    b.kill();
    let (rc, out) = berth_cmd(&["fsck"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
}

#[test]
fn deleted_content_is_collected_by_the_gc_command() {
    let mut b = Berth::start_with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let (s, md, ld) = push_image(&c, &b.url(), "team/app", "v1", &vec![9u8; 50_000]);
    assert_eq!(s, 201);
    let (s, _, keep) = push_image(&c, &b.url(), "team/app", "v2", &vec![8u8; 50_000]);
    assert_eq!(s, 201);
    assert_eq!(c.delete(format!("{}/v2/team/app/manifests/{md}", b.url())).send().unwrap().status(), 202);
    b.kill();
    let stored = |d: &str| b.stored_blob(d).is_some();
    let (rc, out) = berth_cmd(&["gc", "--dry-run"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("\"dry_run\": true"), "{out}");
    assert!(stored(&ld), "dry run removes nothing");
    let (rc, out) = berth_cmd(&["gc"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
    assert!(!stored(&ld) && !stored(&md), "{out}");
    assert!(stored(&keep));
    b.spawn();
    let r = c.get(format!("{}/v2/team/app/manifests/v2", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn upload_sessions_expire() {
    let b = Berth::start_with_storage("upload_ttl = \"1s\"\n", "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(format!("{}{loc}", b.url())).header("Content-Range", "0-3").body("abcd").send().unwrap();
    assert_eq!(r.status(), 202);
    assert!(eventually(Duration::from_secs(10), || b.stored_uploads().is_empty()), "session data removed");
    let r = c.patch(format!("{}{loc}", b.url())).header("Content-Range", "4-7").body("efgh").send().unwrap();
    assert_eq!(code(r), (404, "BLOB_UPLOAD_UNKNOWN".to_string()));
}

#[test]
fn fsck_finds_and_repairs_corruption() {
    let mut b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let (s, _, ld) = push_image(&c, &b.url(), "team/app", "v1", b"some layer bytes");
    assert_eq!(s, 201);
    b.kill();
    assert_eq!(berth_cmd(&["fsck"], &b.config_path).0, 0);
    b.corrupt_blob(&ld, b"bit rot");
    let (rc, out) = berth_cmd(&["fsck"], &b.config_path);
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains(&ld), "{out}");
    let (rc, _) = berth_cmd(&["fsck", "--repair"], &b.config_path);
    assert_ne!(rc, 0, "repair reports what it found");
    let (rc, out) = berth_cmd(&["fsck"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
    b.spawn();
    // The untrustworthy image is gone, not served corrupt.
    let r = c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn kill_9_during_pushes_and_fills_leaves_a_consistent_store() {
    let fake = Fake::start();
    let cold: Vec<Vec<u8>> = (0..8u8).map(|i| (0..(4 << 20)).map(|j| (j as u8).wrapping_mul(i + 1)).collect()).collect();
    let cold_digests: Vec<String> = cold.iter().map(|b| fake.add_blob(b)).collect();
    // Slow enough that a fill is still running when the pushes below have gone in.
    fake.state.lock().unwrap().blob_piece_delay = Some(Duration::from_millis(100));
    let mut b = Berth::start(&format!(
        "[[namespace]]\nprefix = \"team\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        fake.url()
    ));
    let mut pushed: Vec<(String, String)> = Vec::new();
    for (round, cold_digest) in cold_digests.iter().enumerate() {
        let base = b.url();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pushers: Vec<_> = (0..2)
            .map(|w| {
                let (base, stop, done) = (base.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let c = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                    let mut ok = Vec::new();
                    for i in 0.. {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let layer = format!("round {round} worker {w} push {i} ").repeat(20_000);
                        let tag = format!("r{round}-w{w}-{i}");
                        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            push_image(&c, &base, "team/crash", &tag, layer.as_bytes())
                        }));
                        match res {
                            Ok((201, md, _)) => {
                                ok.push((tag, md));
                                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            _ => break,
                        }
                    }
                    ok
                })
            })
            .collect();
        let fills = fake.count("GET blob");
        let puller = {
            let (base, d) = (base.clone(), cold_digest.clone());
            std::thread::spawn(move || {
                let c = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                let _ = c.get(format!("{base}/v2/library/cold/blobs/{d}")).send().and_then(|r| r.bytes());
            })
        };
        // Kill once the fill has reached the upstream (its 4 MiB take 400 ms there) and a few
        // images went in, a different number each round, so the kill lands at different points
        // of the pushes.
        let pushes = 1 + round % 3;
        let busy = || fake.count("GET blob") > fills && done.load(std::sync::atomic::Ordering::SeqCst) >= pushes;
        assert!(eventually(Duration::from_secs(30), busy), "round {round}: neither fill nor pushes got going:\n{}", b.log());
        b.kill(); // SIGKILL mid-push and mid-fill
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for p in pushers {
            pushed.extend(p.join().unwrap());
        }
        let _ = puller.join();
        b.spawn();
        assert!(store_files(&b.data_dir().join("tmp")).is_empty(), "no temp file survives the start-up sweep");
    }
    b.kill();
    let (rc, out) = berth_cmd(&["fsck"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
    b.spawn();
    let c = client();
    assert!(!pushed.is_empty());
    for (tag, md) in &pushed {
        let r = c.get(format!("{}/v2/team/crash/manifests/{tag}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200, "{tag} was acknowledged, so it survives");
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    }
    for (d, data) in cold_digests.iter().zip(&cold) {
        let r = c.get(format!("{}/v2/library/cold/blobs/{d}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().unwrap().len(), data.len());
    }
    let (s, _, _) = push_image(&c, &b.url(), "team/crash", "after", b"a full round trip after the crashes");
    assert_eq!(s, 201);
}

struct Tmpfs(std::path::PathBuf);

/// A temp dir whose `data` is a tmpfs of `size`: a disk that fills up. None (the test skips)
/// where mounting is not allowed, unless the real clients are required.
fn small_disk(size: &str) -> Option<(tempfile::TempDir, std::path::PathBuf, Tmpfs)> {
    if !common::require("mount") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted =
        Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&data).status().is_ok_and(|s| s.success());
    if !mounted {
        assert!(std::env::var("BERTH_REQUIRE_CLIENTS").ok().as_deref() != Some("1"), "cannot mount a tmpfs (needs root)");
        eprintln!("skipping: cannot mount a tmpfs here");
        return None;
    }
    let guard = Tmpfs(data.clone());
    Some((dir, data, guard))
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_fails_pushes_cleanly_and_keeps_reads_working() {
    if common::backend_is_s3() {
        // Pushes go to the bucket there; a full local disk only costs hot copies (below).
        return;
    }
    let Some((dir, _data, _guard)) = small_disk("3m") else { return };
    let b = Berth::start_in(dir, "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let (s, _, small) = push_image(&c, &b.url(), "team/app", "v1", b"small layer");
    assert_eq!(s, 201);
    // Monolithic and chunked pushes that cannot fit.
    let big = vec![1u8; 4 << 20];
    let r = push_blob(&c, &b.url(), "team/app", &big);
    let status = r.status().as_u16();
    let body = r.text().unwrap();
    assert!(status == 507 || status == 503, "{status} {body}");
    assert!(body.contains("space"), "a clear message: {body}");
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", b.url())).send().unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(format!("{}{loc}", b.url())).body(big.clone()).send().unwrap();
    assert!(r.status() == 507 || r.status() == 503, "{}", r.status());
    // Temp data is gone and reads keep working.
    assert!(store_files(&b.data_dir().join("tmp")).is_empty());
    assert!(store_files(&b.data_dir().join("uploads")).is_empty());
    let r = c.get(format!("{}/v2/team/app/blobs/{small}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), b"small layer");
    let (s, _, _) = push_image(&c, &b.url(), "team/app", "v2", b"still room for this");
    assert_eq!(s, 201, "the registry recovers once the failed push's data is gone");
}

#[test]
fn namespace_policies_retention_immutability_quota() {
    // Retention is not grace-gated; a long grace keeps the frequent GC from sweeping the
    // layers of a push whose manifest has not arrived yet.
    let b = Berth::start_with_storage("gc_interval = \"200ms\"\ngc_grace = \"1h\"\n", "[[namespace]]\nprefix = \"team\"\nkeep_tags = 2\nkeep_patterns = [\"v*\"]\nimmutable_tags = [\"v*\"]\n\n[[namespace]]\nprefix = \"small\"\nquota_bytes = \"20KiB\"\n");
    let c = client();
    let base = b.url();
    let (s, v1, _) = push_image(&c, &base, "team/app", "v1.0", b"release");
    assert_eq!(s, 201);
    // Immutable: the same bytes again are fine, different bytes are refused, no deletion.
    assert_eq!(push_image(&c, &base, "team/app", "v1.0", b"release").0, 201);
    let (s, _, _) = push_image(&c, &base, "team/app", "v1.0", b"moved");
    assert_eq!(s, 403);
    assert_eq!(code(c.delete(format!("{base}/v2/team/app/manifests/v1.0")).send().unwrap()), (403, "DENIED".to_string()));
    assert_eq!(code(c.delete(format!("{base}/v2/team/app/manifests/{v1}")).send().unwrap()).0, 403);
    let r = c.get(format!("{base}/v2/team/app/manifests/v1.0")).send().unwrap();
    assert_eq!(r.headers()["docker-content-digest"], v1.as_str());
    // Retention: the newest two tags plus v* survive.
    for t in ["a", "b", "c", "d"] {
        assert_eq!(push_image(&c, &base, "team/app", t, format!("build {t}").as_bytes()).0, 201);
        // Retention orders tags by their push time in milliseconds: the pause keeps those
        // times apart. It waits on the clock, not on the server.
        std::thread::sleep(Duration::from_millis(20));
    }
    let tags = || -> Vec<String> {
        let v: serde_json::Value = c.get(format!("{base}/v2/team/app/tags/list")).send().unwrap().json().unwrap();
        v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    };
    assert!(eventually(Duration::from_secs(10), || tags() == ["c", "d", "v1.0"]), "{:?}", tags());
    // Quota: pushes beyond it are refused with DENIED and nothing is stored.
    assert_eq!(push_blob(&c, &base, "small/x", &[1u8; 10_000]).status(), 201);
    let too_much = vec![2u8; 15_000];
    assert_eq!(code(push_blob(&c, &base, "small/y", &too_much)), (403, "DENIED".to_string()));
    let hex = common::sha256_hex(&too_much);
    assert!(!b.data_dir().join("blobs/sha256").join(&hex[..2]).join(&hex).exists());
    assert_eq!(push_blob(&c, &base, "team/big", &too_much).status(), 201, "other namespaces are not limited");
}

#[test]
fn full_disk_fill_still_streams_to_clients_uncached() {
    let fake = Fake::start();
    let blob: Vec<u8> = (0..(5 << 20)).map(|i| (i % 241) as u8).collect();
    let d = fake.add_blob(&blob);
    let Some((dir, _data, _guard)) = small_disk("2m") else { return };
    let b = Berth::start_in(dir, &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url()));
    let c = client();
    for _ in 0..2 {
        let r = c.get(format!("{}/v2/library/big/blobs/{d}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(common::digest(&r.bytes().unwrap()), d, "the client gets every byte although the disk is full");
    }
    assert!(store_files(&b.data_dir().join("blobs")).is_empty(), "nothing cached");
    assert!(store_files(&b.data_dir().join("tmp")).is_empty(), "no partial file left");
    let m = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    assert!(m.lines().any(|l| l.starts_with("berth_fills_uncached_total ") && !l.ends_with(" 0")), "counted");
}

#[test]
fn gc_command_runs_inside_a_running_server() {
    let b = Berth::start_with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let (s, md, ld) = push_image(&c, &b.url(), "team/app", "old", &vec![5u8; 40_000]);
    assert_eq!(s, 201);
    let (s, _, keep) = push_image(&c, &b.url(), "team/app", "new", &vec![6u8; 40_000]);
    assert_eq!(s, 201);
    assert_eq!(c.delete(format!("{}/v2/team/app/manifests/{md}", b.url())).send().unwrap().status(), 202);
    let (rc, out) = berth_cmd(&["gc"], &b.config_path);
    assert_eq!(rc, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(report["blobs_removed"].as_u64().unwrap() >= 2, "{out}");
    // The running server saw the collection: the swept layer is gone, the kept one served.
    assert_eq!(c.get(format!("{}/v2/team/app/blobs/{ld}", b.url())).send().unwrap().status(), 404);
    let r = c.get(format!("{}/v2/team/app/blobs/{keep}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(common::digest(&r.bytes().unwrap()), keep);
    assert_eq!(c.get(format!("{}/v2/team/app/manifests/new", b.url())).send().unwrap().status(), 200);
    // Collection is a POST; a repair needs the server stopped.
    assert_eq!(c.get(format!("{}/gc", b.admin_url())).send().unwrap().status(), 405);
    let (rc, out) = berth_cmd(&["fsck", "--repair"], &b.config_path);
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("stop it"), "{out}");
}

#[test]
fn quota_counts_upload_bytes_and_mounts_and_immutable_images_keep_their_blobs() {
    let b = Berth::start(
        "[[namespace]]\nprefix = \"team\"\nimmutable_tags = [\"v*\"]\n\n[[namespace]]\nprefix = \"small\"\nquota_bytes = \"20KiB\"\n",
    );
    let c = client();
    let base = b.url();
    // A chunked upload is refused as soon as its bytes would pass the quota, not at its PUT.
    let r = c.post(format!("{base}/v2/small/x/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(format!("{base}{loc}")).header("Content-Range", "0-14999").body(vec![1u8; 15_000]).send().unwrap();
    assert_eq!(r.status(), 202);
    let r = c.patch(format!("{base}{loc}")).header("Content-Range", "15000-24999").body(vec![1u8; 10_000]).send().unwrap();
    assert_eq!(code(r), (403, "DENIED".to_string()));
    assert_eq!(code(c.get(format!("{base}{loc}")).send().unwrap()).0, 404, "the session is gone with its data");
    // A mount is content entering the namespace like any other.
    let big = vec![7u8; 30_000];
    assert_eq!(push_blob(&c, &base, "team/big", &big).status(), 201);
    let d = common::digest(&big);
    let r = c.post(format!("{base}/v2/small/x/blobs/uploads/?mount={d}&from=team/big")).send().unwrap();
    assert_eq!(code(r), (403, "DENIED".to_string()));
    assert_eq!(c.head(format!("{base}/v2/small/x/blobs/{d}")).send().unwrap().status(), 404);
    // The blobs of an image under an immutable tag cannot be deleted; others can.
    let (s, _, ld) = push_image(&c, &base, "team/app", "v1", b"immutable layer");
    assert_eq!(s, 201);
    assert_eq!(code(c.delete(format!("{base}/v2/team/app/blobs/{ld}")).send().unwrap()), (403, "DENIED".to_string()));
    assert_eq!(c.get(format!("{base}/v2/team/app/blobs/{ld}")).send().unwrap().status(), 200);
    let (s, _, mutable_layer) = push_image(&c, &base, "team/app", "latest", b"mutable layer");
    assert_eq!(s, 201);
    assert_eq!(c.delete(format!("{base}/v2/team/app/blobs/{mutable_layer}")).send().unwrap().status(), 202);
}

#[test]
fn full_disk_every_concurrent_client_of_a_cold_blob_gets_the_bytes() {
    let fake = Fake::start();
    let small: Vec<u8> = (0..(1 << 20)).map(|i| (i % 239) as u8).collect();
    let big: Vec<u8> = (0..(8 << 20)).map(|i| (i % 233) as u8).collect();
    let digests = [fake.add_blob(&small), fake.add_blob(&big)];
    let Some((dir, data, _guard)) = small_disk("4m") else { return };
    let b = Berth::start_in(dir, &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url()));
    // Take every byte that is left.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(data.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    for (round, d) in digests.iter().enumerate() {
        let clients: Vec<_> = (0..5)
            .map(|_| {
                let (url, d) = (format!("{}/v2/library/full/blobs/{d}", b.url()), d.clone());
                std::thread::spawn(move || {
                    let r = client().get(url).send().unwrap();
                    let status = r.status().as_u16();
                    (status, common::digest(&r.bytes().unwrap()) == d)
                })
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap(), (200, true), "round {round}: every client gets every byte");
        }
    }
}
