//! What only the S3 backend has: the bucket as the truth (a node with an empty disk serves
//! everything), sessions that continue anywhere, ranged reads from the bucket, the hot tier,
//! outages of the bucket, `berth check` naming what is wrong, and the storage metrics. These
//! run when the suite runs on S3 (`BERTH_TEST_BACKEND=s3`, see `scripts/test`); on the local
//! backend they return at once.

mod common;

use common::fake::Fake;
use common::{backend_is_s3, digest, eventually, Berth};
use reqwest::blocking::Client;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// Bytes that do not repeat within a part, so a part stored in the wrong place shows.
fn data(n: usize, seed: u32) -> Vec<u8> {
    common::random_bytes(n, seed as u64)
}

fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    d
}

/// Pushes a one-layer image with a monolithic layer upload; returns the manifest digest.
fn push_image(c: &Client, base: &str, repo: &str, tag: &str, layer: &[u8]) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, digest(layer));
    let cd = push_blob(c, base, repo, config.as_bytes());
    let ld = push_blob(c, base, repo, layer);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = c.put(format!("{base}/v2/{repo}/manifests/{tag}")).header("Content-Type", OCI_MANIFEST).body(m.clone()).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    digest(m.as_bytes())
}

fn get_blob(c: &Client, base: &str, repo: &str, d: &str) -> Vec<u8> {
    let r = c.get(format!("{base}/v2/{repo}/blobs/{d}")).send().unwrap();
    assert_eq!(r.status(), 200, "{d}");
    r.bytes().unwrap().to_vec()
}

/// PATCHes `blob[from..to]` into the session at `loc` through node `b`; it must be accepted and
/// the session then hold everything up to `to`.
fn patch_range(c: &Client, b: &Berth, loc: &str, blob: &[u8], from: usize, to: usize) {
    let r = c
        .patch(format!("{}{loc}", b.url()))
        .header("Content-Range", format!("{from}-{}", to - 1))
        .header("Content-Type", "application/octet-stream")
        .body(blob[from..to].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "PATCH {from}-{to}: {}", r.text().unwrap());
    assert_eq!(r.headers()["range"], format!("0-{}", to - 1).as_str());
}

/// `berth fsck` on a stopped berth's store passes.
fn fsck_clean(b: &Berth) {
    let mut fsck = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    fsck.args(["fsck", "--config"]).arg(&b.config_path);
    common::cmd::run(&mut fsck, Duration::from_secs(120)).expect_ok();
}

/// Kills berth and removes everything it kept on local disk: what it serves next comes from
/// the bucket alone.
fn wipe_local(b: &mut Berth) {
    b.kill();
    std::fs::remove_dir_all(b.data_dir()).unwrap();
}

#[test]
fn a_node_with_an_empty_disk_serves_everything_pushed_and_mirrored_before() {
    if !backend_is_s3() {
        return;
    }
    let fake = Fake::start();
    let upstream_layer = data(3 << 20, 7);
    fake.add_image("library/alpine", "3.20", &upstream_layer);
    let mut b = Berth::start(&format!(
        "[[namespace]]\nprefix = \"team\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        fake.url()
    ));
    let c = client();
    // Larger than a multipart part (8 MiB), so it is stored in several.
    let big = data(19 << 20, 1);
    let md = push_image(&c, &b.url(), "team/app", "v1", &big);
    let small_md = push_image(&c, &b.url(), "team/app", "v2", b"small layer");
    let r = c.get(format!("{}/v2/library/alpine/manifests/3.20", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    let mirrored_md = r.headers()["docker-content-digest"].to_str().unwrap().to_string();
    let ld = digest(&upstream_layer);
    assert_eq!(get_blob(&c, &b.url(), "library/alpine", &ld), upstream_layer);
    let upstream_gets = fake.count("GET blob");

    wipe_local(&mut b);
    b.spawn();
    let r = c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert_eq!(get_blob(&c, &b.url(), "team/app", &digest(&big)), big);
    let r = c.get(format!("{}/v2/team/app/manifests/v2", b.url())).send().unwrap();
    assert_eq!(r.headers()["docker-content-digest"], small_md.as_str());
    let tags: serde_json::Value = c.get(format!("{}/v2/team/app/tags/list", b.url())).send().unwrap().json().unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1", "v2"]));
    // The mirrored image is served from the bucket, not fetched again.
    let r = c.get(format!("{}/v2/library/alpine/manifests/{mirrored_md}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_blob(&c, &b.url(), "library/alpine", &ld), upstream_layer);
    assert_eq!(fake.count("GET blob"), upstream_gets, "no second upstream fetch");
    b.kill();
    fsck_clean(&b);
}

#[test]
fn a_chunked_push_continues_after_a_restart_on_an_empty_disk() {
    if !backend_is_s3() {
        return;
    }
    let mut b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let blob = data((9 << 20) + 12_345, 3);
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", b.url())).send().unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // Chunks that do not line up with parts: the first crosses a part boundary.
    let cuts = [0usize, 8_400_000, 9_000_000, blob.len()];
    patch_range(&c, &b, &loc, &blob, cuts[0], cuts[1]);
    patch_range(&c, &b, &loc, &blob, cuts[1], cuts[2]);
    wipe_local(&mut b);
    b.spawn();
    let r = c.get(format!("{}{loc}", b.url())).send().unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", cuts[2] - 1).as_str());
    patch_range(&c, &b, &loc, &blob, cuts[2], cuts[3]);
    let d = digest(&blob);
    let r = c.put(format!("{}{loc}?digest={d}", b.url())).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(get_blob(&c, &b.url(), "team/app", &d), blob);
    assert!(b.stored_uploads().is_empty(), "nothing of the session is left in the bucket");
    // A wrong digest stores nothing and reports the mismatch.
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", b.url())).send().unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let other = data(6 << 20, 4);
    let r = c.patch(format!("{}{loc}", b.url())).body(other.clone()).send().unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(format!("{}{loc}?digest={}", b.url(), digest(b"something else"))).send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(b.stored_blob(&digest(b"something else")).is_none() && b.stored_blob(&digest(&other)).is_none());
}

#[test]
fn ranged_reads_come_from_the_bucket_and_whole_reads_fill_the_hot_tier() {
    if !backend_is_s3() {
        return;
    }
    let mut b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    let blob = data(10 << 20, 5);
    let d = push_blob(&c, &b.url(), "team/app", &blob);
    wipe_local(&mut b);
    b.spawn();
    let hot = b.data_dir().join("hot/sha256").join(&d[7..9]).join(&d[7..]);
    let r = c.get(format!("{}/v2/team/app/blobs/{d}", b.url())).header("Range", "bytes=8388000-8389000").send().unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 8388000-8389000/{}", blob.len()).as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &blob[8_388_000..=8_389_000]);
    assert!(!hot.exists(), "a range is not a copy");
    assert_eq!(get_blob(&c, &b.url(), "team/app", &d), blob);
    assert!(eventually(Duration::from_secs(10), || hot.exists()), "a whole read leaves a local copy");
    assert_eq!(std::fs::read(&hot).unwrap(), blob);
    let hits = metric(&b, "berth_hot_tier_reads_total{result=\"hit\"}");
    assert_eq!(get_blob(&c, &b.url(), "team/app", &d), blob);
    assert_eq!(metric(&b, "berth_hot_tier_reads_total{result=\"hit\"}"), hits + 1.0);
    assert!(metric(&b, "berth_storage_requests_total{op=\"get\",result=\"ok\"}") >= 1.0);
}

#[test]
fn the_hot_tier_stays_within_its_bound() {
    if !backend_is_s3() {
        return;
    }
    let b =
        Berth::start_edited("[[namespace]]\nprefix = \"team\"\n", |t| t.replace("hot_tier_bytes = \"1GiB\"", "hot_tier_bytes = \"3MiB\""));
    let c = client();
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| data(1 << 20, 10 + i)).collect();
    for blob in &blobs {
        push_blob(&c, &b.url(), "team/app", blob);
    }
    let used = metric(&b, "berth_hot_tier_bytes");
    assert!(used > 0.0 && used <= (3 << 20) as f64, "{used}");
    for blob in &blobs {
        assert_eq!(&get_blob(&c, &b.url(), "team/app", &digest(blob)), blob, "evicted copies are read from the bucket");
    }
    assert!(metric(&b, "berth_hot_tier_bytes") <= (3 << 20) as f64);
}

/// A TCP forwarder to the bucket that can cut it off: an outage without stopping the engine
/// the other tests share.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    /// New connections answered `503 SlowDown` (then closed) before forwarding resumes.
    slow_down: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    fn start(to: &str) -> Gate {
        let target = url::Url::parse(to).unwrap();
        let target = format!("{}:{}", target.host_str().unwrap(), target.port().unwrap());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let slow_down = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (o, sd) = (open.clone(), slow_down.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut client) = s else { continue };
                if !o.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                if sd.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    // What S3 engines answer when overloaded: the client must back off and retry.
                    let mut head = [0u8; 8192];
                    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = client.read(&mut head);
                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                    let _ = write!(
                        client,
                        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let o2 = o.clone();
                let pipe = move |mut a: TcpStream, mut b: TcpStream, open: Arc<AtomicBool>| {
                    let mut buf = [0u8; 65536];
                    a.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    loop {
                        if !open.load(Ordering::SeqCst) {
                            let _ = a.shutdown(std::net::Shutdown::Both);
                            let _ = b.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match a.read(&mut buf) {
                            Ok(0) => {
                                let _ = b.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if b.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                            Err(_) => return,
                        }
                    }
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let o3 = o2.clone();
                std::thread::spawn(move || pipe(client, server, o2));
                std::thread::spawn(move || pipe(s2, c2, o3));
            }
        });
        Gate { port, open, slow_down }
    }
}

#[test]
fn a_bucket_outage_is_a_clear_503_reads_of_hot_blobs_go_on_and_work_resumes_by_itself() {
    if !backend_is_s3() {
        return;
    }
    let endpoint = std::env::var("BERTH_TEST_S3_ENDPOINT").unwrap();
    let gate = Gate::start(&endpoint);
    let via = format!("http://127.0.0.1:{}", gate.port);
    let b = Berth::start_edited("[[namespace]]\nprefix = \"team\"\n", |t| t.replace(&endpoint, &via));
    let c = client();
    let layer = data(2 << 20, 9);
    push_image(&c, &b.url(), "team/app", "v1", &layer);
    let ld = digest(&layer);

    gate.open.store(false, Ordering::SeqCst);
    let t = Instant::now();
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/?digest={}", b.url(), digest(b"during")).as_str()).body("during").send().unwrap();
    let status = r.status().as_u16();
    let body = r.text().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage") && body.contains("bucket"), "names the storage: {body}");
    assert!(!body.contains("berthtestsecret"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(40), "bounded by the retry budget: {:?}", t.elapsed());
    // What is in the hot tier is still served; the index answers tags.
    assert_eq!(get_blob(&c, &b.url(), "team/app", &ld), layer);
    assert_eq!(c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap().status(), 200);
    let ready = |b: &Berth| c.get(format!("{}/readyz", b.admin_url())).send().map(|r| r.status().as_u16()).unwrap_or(0);
    assert!(eventually(Duration::from_secs(15), || ready(&b) == 503), "not ready while the bucket is away");
    assert!(!b.log().contains("berthtestsecret"));

    gate.open.store(true, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(15), || ready(&b) == 200), "ready again by itself");
    // An engine that answers 503 SlowDown a few times (to whichever requests come first: the
    // push's or the readiness check's): berth backs off and retries, and the push succeeds.
    gate.open.store(false, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(5), || ready(&b) == 503), "pooled connections cut");
    gate.slow_down.store(3, Ordering::SeqCst);
    gate.open.store(true, Ordering::SeqCst);
    push_image(&c, &b.url(), "team/app", "v3", b"pushed through SlowDown answers");
    assert_eq!(gate.slow_down.load(Ordering::SeqCst), 0, "the SlowDown answers were met and retried past");
    push_image(&c, &b.url(), "team/app", "v2", b"after the outage");
    // The refused push may have stored its (verified, complete) bytes before the metadata
    // write failed; never anything partial, and it is not part of the repository.
    assert!(b.stored_blob(&digest(b"during")).is_none_or(|x| x == b"during"), "nothing half-written became visible");
    let r = c.head(format!("{}/v2/team/app/blobs/{}", b.url(), digest(b"during"))).send().unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn check_names_what_is_wrong_with_the_bucket() {
    if !backend_is_s3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = Berth::write_config(dir.path(), "", "", "");
    let good = std::fs::read_to_string(&config).unwrap();
    let check = |text: String| {
        std::fs::write(&config, text).unwrap();
        let out = common::cmd::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_berth")).args(["check", "--config"]).arg(&config),
            Duration::from_secs(60),
        );
        (out.ok, format!("{}{}", out.stdout, out.stderr))
    };
    let (ok, out) = check(good.clone());
    assert!(ok, "{out}");
    std::fs::write(dir.path().join("s3-secret"), "not the secret").unwrap();
    let (ok, out) = check(good.clone());
    assert!(!ok && out.contains("credentials") && out.contains("secret_access_key_file"), "{out}");
    assert!(!out.contains("not the secret"), "{out}");
    std::fs::write(dir.path().join("s3-secret"), std::env::var("BERTH_TEST_S3_SECRET_KEY").unwrap()).unwrap();
    let (ok, out) = check(good.replace("bucket = \"berth\"", "bucket = \"no-such-bucket\""));
    assert!(!ok && out.contains("does not exist") && out.contains("bucket"), "{out}");
    let closed = common::free_port();
    let endpoint = std::env::var("BERTH_TEST_S3_ENDPOINT").unwrap();
    let (ok, out) = check(good.replace(&endpoint, &format!("http://127.0.0.1:{closed}")));
    assert!(!ok && out.contains("unreachable") && out.contains("endpoint"), "{out}");
}

fn metric(b: &Berth, name: &str) -> f64 {
    let text = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[test]
fn tokens_signed_before_outlive_the_local_disk() {
    if !backend_is_s3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    std::fs::write(&ht, format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap())).unwrap();
    let mut b = Berth::start_in(
        dir,
        &format!("[auth]\nhtpasswd = \"{}\"\n\n[[namespace]]\nprefix = \"team\"\npull = [\"alice\"]\npush = [\"alice\"]\n", ht.display()),
    );
    let c = client();
    let r = c
        .get(format!("{}/token?service=berth&scope=repository:team/app:pull,push", b.url()))
        .basic_auth("alice", Some("wonderland"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().unwrap()["token"].as_str().unwrap().to_string();
    let tags = |b: &Berth| c.get(format!("{}/v2/team/app/tags/list", b.url())).bearer_auth(&token).send().unwrap().status().as_u16();
    assert_eq!(tags(&b), 404, "authorized; the repository does not exist yet");
    // The signing key is in the bucket, not on the disk that is gone.
    b.kill();
    for e in std::fs::read_dir(b.data_dir()).unwrap().flatten() {
        let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
    }
    b.spawn();
    assert_eq!(tags(&b), 404, "a token issued before is still accepted");
}

#[test]
fn snapshots_bound_the_journal_and_a_new_node_starts_from_one() {
    if !backend_is_s3() {
        return;
    }
    let mut b =
        Berth::start_edited("[[namespace]]\nprefix = \"team\"\n", |t| t.replace("[storage.s3]\n", "[storage.s3]\nsnapshot_every = 8\n"));
    let c = client();
    let mut pushed = Vec::new();
    for i in 0..12 {
        pushed.push((format!("v{i}"), push_image(&c, &b.url(), "team/app", &format!("v{i}"), format!("layer {i}").as_bytes())));
    }
    let bucket = common::s3_bucket(b.dir.path()).unwrap();
    let keys = |dir: &str| {
        let mut v = Vec::new();
        bucket
            .list(dir, None, &mut |k, _| {
                v.push(k.to_string());
                true
            })
            .unwrap();
        v
    };
    // Each image is several journal entries: snapshots are due every 8, at most the newest two
    // are kept, and the entries the older of them covers are pruned.
    let pruned = || {
        let snaps = keys("snapshots/");
        (1..=2).contains(&snaps.len()) && keys("journal/").first().is_some_and(|k| k != "journal/00000000000000000001")
    };
    assert!(eventually(Duration::from_secs(20), pruned), "{:?} {:?}", keys("snapshots/"), keys("journal/").first());

    wipe_local(&mut b);
    b.spawn();
    assert!(b.log().contains("metadata index loaded from a snapshot"), "{}", b.log());
    for (tag, md) in &pushed {
        let r = c.get(format!("{}/v2/team/app/manifests/{tag}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    }
    push_image(&c, &b.url(), "team/app", "after", b"after the snapshot");
    b.kill();
    fsck_clean(&b);
}

/// The `[storage.s3] prefix = ...` line of a berth's config.
fn s3_prefix_line(b: &Berth) -> String {
    std::fs::read_to_string(&b.config_path).unwrap().lines().find(|l| l.starts_with("prefix = \"t/")).unwrap().to_string()
}

#[test]
fn two_nodes_on_one_bucket_see_each_others_writes_and_continue_each_others_uploads() {
    if !backend_is_s3() {
        return;
    }
    let a = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let line = s3_prefix_line(&a);
    let b = Berth::start_edited("[[namespace]]\nprefix = \"team\"\n", |t| {
        let own = t.lines().find(|l| l.starts_with("prefix = \"t/")).unwrap().to_string();
        t.replace(&own, &line)
    });
    let c = client();
    let digest_at = |n: &Berth, tag: &str| {
        let r = c.get(format!("{}/v2/team/app/manifests/{tag}", n.url())).send().unwrap();
        (r.status() == 200).then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_string())
    };
    // A push through one node is served by the other within the journal's follow interval.
    let v1 = push_image(&c, &a.url(), "team/app", "v1", b"first layer");
    assert!(eventually(Duration::from_secs(10), || digest_at(&b, "v1").as_deref() == Some(v1.as_str())));
    // A tag moved through the other node: the first stops serving what it had cached.
    assert_eq!(digest_at(&a, "v1").as_deref(), Some(v1.as_str()));
    let v1b = push_image(&c, &b.url(), "team/app", "v1", b"second layer");
    assert!(eventually(Duration::from_secs(10), || digest_at(&a, "v1").as_deref() == Some(v1b.as_str())));

    // One chunked upload, its requests spread over both nodes as a round robin would.
    let blob = data((9 << 20) + 777, 21);
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", a.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let cuts = [0usize, 8_500_000, 9_200_000, blob.len()];
    for (i, node) in [&b, &a, &b].into_iter().enumerate() {
        patch_range(&c, node, &loc, &blob, cuts[i], cuts[i + 1]);
    }
    let r = c.get(format!("{}{loc}", a.url())).send().unwrap();
    assert_eq!(r.headers()["range"], format!("0-{}", blob.len() - 1).as_str(), "the status on the node that did not see the last PATCH");
    let d = digest(&blob);
    let r = c.put(format!("{}{loc}?digest={d}", a.url())).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert!(eventually(Duration::from_secs(10), || c.head(format!("{}/v2/team/app/blobs/{d}", b.url())).send().unwrap().status() == 200));
    assert_eq!(get_blob(&c, &b.url(), "team/app", &d), blob);
}

/// Two stores on one bucket, as two nodes are: a sweep on one forgets a blob while the other
/// stores the same content again. The second must not count on the copy the sweep is about to
/// delete: when its store is acknowledged, the content is in the bucket.
#[test]
fn content_stored_again_during_a_sweep_on_another_node_is_not_lost() {
    if !backend_is_s3() {
        return;
    }
    use berth::oci::Digest;
    use berth::store::{Limits, Store};
    let var = |k: &str| std::env::var(k).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let settings = berth::store::s3::S3Settings {
        bucket: var("BERTH_TEST_S3_BUCKET"),
        endpoint: Some(var("BERTH_TEST_S3_ENDPOINT")),
        region: var("BERTH_TEST_S3_REGION"),
        prefix: format!("t/sweep-{}/", std::process::id()),
        access_key_id: Some(var("BERTH_TEST_S3_ACCESS_KEY")),
        secret_access_key: Some(var("BERTH_TEST_S3_SECRET_KEY")),
        snapshot_every: 1000,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = Store::open_s3(&tmp.path().join("a"), &settings, 1 << 30, Limits::default()).unwrap();
    let b = Store::open_s3(&tmp.path().join("b"), &settings, 1 << 30, Limits::default()).unwrap();
    let data = bytes::Bytes::from(vec![7u8; 300_000]);
    let d = Digest::sha256_of(&data);
    let store = |s: Arc<Store>, data: bytes::Bytes, d: Digest| async move {
        let mut w = s.writer(&d).await?;
        w.write(data).await?;
        s.commit(w, &d, None).await
    };
    rt.block_on(store(a.clone(), data.clone(), d.clone())).unwrap();
    b.journal().unwrap().catch_up_to(a.journal().unwrap().applied().unwrap()).unwrap();
    assert!(b.meta().blob(&d).unwrap().is_some(), "the second node knows the blob");

    // The sweep's first half on the first node: the blob is forgotten, its content not yet
    // deleted.
    assert_eq!(a.meta().forget_blobs_if_unused(std::slice::from_ref(&d), u64::MAX).unwrap().len(), 1);
    let forgot = a.journal().unwrap().applied().unwrap();
    // The second node stores the same content meanwhile, and learns of the sweep doing so.
    let pushing = rt.spawn(store(b.clone(), data.clone(), d.clone()));
    assert!(eventually(Duration::from_secs(30), || b.journal().unwrap().applied().unwrap() >= forgot));
    // It waits for the sweep: were it acknowledged now, the delete below would take its content.
    let acknowledged_during_the_sweep = eventually(Duration::from_secs(5), || pushing.is_finished());
    // The sweep's second half.
    a.blobs().delete(&d).unwrap();
    a.meta().swept(std::slice::from_ref(&d)).unwrap();

    let stored = rt.block_on(pushing).unwrap();
    assert!(!acknowledged_during_the_sweep, "the push was acknowledged while a sweep was deleting its content: {stored:?}");
    match stored {
        Ok(n) => {
            assert_eq!(n, data.len() as u64);
            assert!(b.meta().blob(&d).unwrap().is_some());
            assert_eq!(b.blobs().stat_stored(&d).unwrap(), Some(data.len() as u64), "acknowledged but not in the bucket");
        }
        // Refused, with nothing recorded, is also correct: the client pushes again.
        Err(berth::store::StoreError::Sweeping(_)) => assert!(b.meta().blob(&d).unwrap().is_none()),
        Err(e) => panic!("{e}"),
    }
}
