//! Several berth nodes on one bucket (`[cluster]`): membership and the maintenance lease from
//! objects in the bucket, one upstream fetch per cold blob for the whole cluster with every
//! client streaming, the owner killed mid-fill, read-your-writes across nodes, uploads and
//! pulls by real clients through an nginx round robin, and GC on one node while others push.
//! These run when the suite runs on S3 (`BERTH_TEST_BACKEND=s3`, see `scripts/test`); on the
//! local backend they return at once.

mod common;

use common::cluster::{metric, metric_sum, Nodes};
use common::dockerd::Dockerd;
use common::fake::Fake;
use common::{backend_is_s3, cmd, digest, eventually, oci_layout, Berth};
use reqwest::blocking::Client;
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CLIENT_LIMIT: Duration = Duration::from_secs(180);

/// Clusters are heavy (three servers each); one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn upstream(fake: &Fake) -> String {
    format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url())
}

fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> u16 {
    let d = digest(data);
    c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap().status().as_u16()
}

/// Pushes a one-layer image through `base` (its config names the tag, so images sharing a
/// layer are still distinct); returns the manifest PUT's status and digest.
fn push_image(c: &Client, base: &str, repo: &str, tag: &str, layer: &[u8]) -> (u16, String) {
    let config =
        format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, digest(layer));
    for blob in [config.as_bytes(), layer] {
        let s = push_blob(c, base, repo, blob);
        if s != 201 {
            return (s, String::new());
        }
    }
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest(config.as_bytes()),
        config.len(),
        digest(layer),
        layer.len()
    );
    let r = c.put(format!("{base}/v2/{repo}/manifests/{tag}")).header("Content-Type", OCI_MANIFEST).body(m.clone()).send().unwrap();
    (r.status().as_u16(), digest(m.as_bytes()))
}

/// Reads a response body while hashing it; returns (first byte time, digest, length).
fn drain(mut r: reqwest::blocking::Response) -> (Option<Instant>, String, u64) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut first, mut n) = (None, 0u64);
    loop {
        let k = r.read(&mut buf).unwrap_or(0);
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        h.update(&buf[..k]);
        n += k as u64;
    }
    (first, format!("sha256:{}", hex::encode(h.finalize())), n)
}

#[test]
fn members_lease_and_read_your_writes_across_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = Nodes::start(3, "", "[[namespace]]\nprefix = \"team\"\n") else { return };
    // Exactly one node holds the maintenance lease.
    assert!(
        eventually(Duration::from_secs(10), || c.nodes.iter().filter(|b| metric(b, "berth_cluster_lease_held") == Some(1.0)).count() == 1)
    );
    let http = client();
    for round in 0..5 {
        let (writer, readers) = (round % 3, [(round + 1) % 3, (round + 2) % 3]);
        let tag = format!("r{round}");
        let (s, md) = push_image(&http, &c.nodes[writer].url(), "team/app", &tag, format!("layer {round}").repeat(500).as_bytes());
        assert_eq!(s, 201);
        // No waiting: the writer told the others before it answered.
        for r in readers {
            let got = http.get(format!("{}/v2/team/app/manifests/{tag}", c.nodes[r].url())).send().unwrap();
            assert_eq!(got.status(), 200, "{tag} pushed through node {writer}, read through node {r}");
            assert_eq!(got.headers()["docker-content-digest"], md.as_str());
        }
        // A tag moved through another node is moved everywhere at once, and so is a delete.
        let (s, md2) = push_image(&http, &c.nodes[readers[0]].url(), "team/app", &tag, format!("moved {round}").repeat(500).as_bytes());
        assert_eq!(s, 201);
        for b in &c.nodes {
            let got = http.get(format!("{}/v2/team/app/manifests/{tag}", b.url())).send().unwrap();
            assert_eq!(got.headers()["docker-content-digest"], md2.as_str());
        }
        assert_eq!(http.delete(format!("{}/v2/team/app/manifests/{tag}", c.nodes[readers[1]].url())).send().unwrap().status(), 202);
        for b in &c.nodes {
            assert_eq!(http.get(format!("{}/v2/team/app/manifests/{tag}", b.url())).send().unwrap().status(), 404);
        }
    }
    assert!(metric_sum(&c.nodes[0], "berth_cluster_notifications_total{result=\"ok\"}") > 0.0);
    // The peer listener serves members only.
    let r = http.get(format!("{}/v2/team/app/tags/list", c.peers[0])).send().unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{}/v2/team/app/tags/list", c.peers[0])).header("x-berth-peer", "1.00").send().unwrap();
    assert_eq!(r.status(), 401);
    // A node that stops heartbeating leaves; the lease moves if it held it.
    let holder = c.nodes.iter().position(|b| metric(b, "berth_cluster_lease_held") == Some(1.0)).unwrap();
    c.nodes[holder].kill();
    let rest: Vec<&Berth> = c.nodes.iter().enumerate().filter(|(i, _)| *i != holder).map(|(_, b)| b).collect();
    for b in &rest {
        assert!(eventually(Duration::from_secs(10), || metric(b, "berth_cluster_members") == Some(2.0)), "{}", b.log());
    }
    assert!(eventually(Duration::from_secs(15), || rest.iter().filter(|b| metric(b, "berth_cluster_lease_held") == Some(1.0)).count() == 1));
}

/// 48 clients spread over three nodes ask for one cold blob: one upstream GET for the
/// cluster, and every client streams before the fill ends.
#[test]
fn a_herd_on_a_cold_blob_costs_one_upstream_get() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mib: usize = std::env::var("BERTH_TEST_HERD_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let fake = Fake::start();
    let blob = common::random_bytes(mib << 20, 77);
    let d = fake.add_blob(&blob);
    drop(blob);
    // The upstream sends 1 MiB pieces 5 ms apart: the fill takes over a second.
    fake.state.lock().unwrap().blob_piece_delay = Some(Duration::from_millis(5));
    let Some(c) = Nodes::start(3, "", &upstream(&fake)) else { return };
    let urls: Vec<String> = c.nodes.iter().map(|b| b.url()).collect();
    let start = Arc::new(std::sync::Barrier::new(48));
    let handles: Vec<_> = (0..48)
        .map(|i| {
            let (url, d, start) = (urls[i % 3].clone(), d.clone(), start.clone());
            std::thread::spawn(move || {
                let http = client();
                start.wait();
                let r = http.get(format!("{url}/v2/library/big/blobs/{d}")).send().unwrap();
                assert_eq!(r.status(), 200);
                drain(r)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let done = fake.state.lock().unwrap().blob_done_at.clone();
    assert_eq!(fake.count("GET blob"), 1, "one upstream fetch for the whole cluster");
    assert_eq!(done.len(), 1);
    for (i, (first, got, n)) in results.iter().enumerate() {
        assert_eq!((got, *n), (&d, (mib as u64) << 20), "client {i} got verified bytes");
        assert!(first.unwrap() < done[0], "client {i} (node {}) streamed before the fill ended", i % 3);
    }
    let forwards: f64 = c.nodes.iter().map(|b| metric_sum(b, "berth_cluster_forwards_total{kind=\"blob\",result=\"ok\"}")).sum();
    assert_eq!(forwards, 2.0, "each non-owner node asked the owner once");
    // The owner uploads the blob; the nodes that streamed its fill do not upload it again.
    let uploaded: f64 = c.nodes.iter().map(|b| metric_sum(b, "berth_storage_bytes_total{direction=\"out\"}")).sum();
    assert!(uploaded < 1.5 * (mib << 20) as f64, "{uploaded} bytes went to the bucket for one {mib} MiB blob");
}

/// The owner dies mid-fill: clients on the other nodes finish with verified bytes (their
/// nodes continue from the upstream at the byte they reached).
#[test]
fn the_owner_killed_mid_fill_costs_a_second_fetch_not_a_client() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fake = Fake::start();
    let blob = common::random_bytes(64 << 20, 78);
    let d = fake.add_blob(&blob);
    fake.state.lock().unwrap().blob_piece_delay = Some(Duration::from_millis(40));
    let Some(mut c) = Nodes::start(3, "", &upstream(&fake)) else { return };
    let owner = c.owner(&d);
    let others: Vec<String> = (0..3).filter(|i| *i != owner).map(|i| c.nodes[i].url()).collect();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (url, d, progress) = (others[i % 2].clone(), d.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut r = client().get(format!("{url}/v2/library/big/blobs/{d}")).send().unwrap();
                assert_eq!(r.status(), 200);
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0u64;
                loop {
                    let k = r.read(&mut buf).expect("the stream survives the owner");
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    n += k as u64;
                    progress.fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
                }
                (format!("sha256:{}", hex::encode(h.finalize())), n)
            })
        })
        .collect();
    // Every client is streaming before the owner goes.
    assert!(eventually(Duration::from_secs(30), || progress.load(std::sync::atomic::Ordering::Relaxed) >= 8 * (2 << 20)));
    assert!(fake.state.lock().unwrap().blob_done_at.is_empty(), "the fill was still running");
    c.nodes[owner].kill();
    for h in handles {
        assert_eq!(h.join().unwrap(), (d.clone(), 64 << 20));
    }
    assert!(fake.count("GET blob") >= 2, "the survivors fetched the rest themselves");
    // What the survivors stored is whole.
    let r = client().get(format!("{}/v2/library/big/blobs/{d}", others[0])).send().unwrap();
    assert_eq!(drain(r).1, d);
}

/// Mirrored tags: one node per tag talks to the upstream, however many nodes are asked.
#[test]
fn a_tag_is_fetched_and_checked_by_its_owner_only() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fake = Fake::start();
    let (md, _, _) = fake.add_image("library/app", "1.0", b"layer of a mirrored image");
    // Watching is off: this counts the checks that pulls make.
    let extra = upstream(&fake) + "tag_ttl = \"1s\"\nwatch_window = \"0s\"\n";
    let Some(c) = Nodes::start(3, "", &extra) else { return };
    let http = client();
    let pull = |node: usize| {
        let r = http.get(format!("{}/v2/library/app/manifests/1.0", c.nodes[node].url())).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    };
    for n in 0..3 {
        pull(n);
    }
    assert_eq!(fake.count("GET manifest"), 1, "one fetch for the cluster");
    // Past the TTL, each node is asked again: one check upstream per TTL, not one per node.
    let heads = fake.count("HEAD manifest");
    let since = Instant::now();
    assert!(eventually(Duration::from_secs(5), || since.elapsed() > Duration::from_millis(1100)));
    for n in 0..3 {
        pull(n);
    }
    assert_eq!(fake.count("HEAD manifest") - heads, 1, "the owner checked the tag once for every node");
    assert_eq!(fake.count("GET manifest"), 1);
    // 16 clients at once on a node that does not own a new tag: one question to its owner.
    let (md2, _, _) = fake.add_image("library/app", "2.0", b"another mirrored layer");
    let owner = c.owner("docker.io/library/app:2.0");
    let other = (owner + 1) % 3;
    let asked = |b: &Berth| metric_sum(b, "berth_cluster_forwards_total{kind=\"manifest\",result=\"ok\"}");
    let before = asked(&c.nodes[other]);
    let url = c.nodes[other].url();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = client().get(format!("{url}/v2/library/app/manifests/2.0")).header("Accept", OCI_MANIFEST).send().unwrap();
                (r.status().as_u16(), r.headers()["docker-content-digest"].to_str().unwrap().to_string())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), (200, md2.clone()));
    }
    let forwarded = asked(&c.nodes[other]) - before;
    assert_eq!(forwarded, 1.0, "questions to the owner for 16 concurrent pulls");
    assert_eq!(fake.count("GET manifest"), 2);
}

/// A GC running on one node while the others push: what a push was acknowledged for stays
/// whole.
#[test]
fn gc_on_one_node_while_others_push() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Nodes::start(3, "gc_grace = \"0s\"", "[[namespace]]\nprefix = \"team\"\n") else { return };
    // GC runs where the maintenance lease is held; the other two push.
    let holder = lease_holder(&c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (admin, stop) = (c.nodes[holder].admin_url(), stop.clone());
        std::thread::spawn(move || {
            let http = client();
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(http.post(format!("{admin}/gc")).send().unwrap().status(), 200);
                runs += 1;
            }
            runs
        })
    };
    let pushers: Vec<_> = (0..3usize)
        .filter(|n| *n != holder)
        .map(|node| {
            let base = c.nodes[node].url();
            std::thread::spawn(move || {
                let http = client();
                let mut ok = Vec::new();
                for i in 0..12 {
                    // Layers repeat across pushes, so pushes reuse what GC may be sweeping.
                    let layer = format!("node {node} layer {} ", i % 4).repeat(3000);
                    let tag = format!("n{node}-{i}");
                    let (status, md) = push_image(&http, &base, "team/race", &tag, layer.as_bytes());
                    match status {
                        201 => ok.push((tag, md)),
                        // With no grace period a push may lose a layer before its manifest
                        // arrives; that push fails cleanly.
                        400 | 404 => {}
                        s => panic!("unexpected push status {s}"),
                    }
                    if i % 3 == 2 {
                        if let Some((_, md)) = ok.pop() {
                            http.delete(format!("{base}/v2/team/race/manifests/{md}")).send().unwrap();
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let kept: Vec<(String, String)> = pushers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(gc.join().unwrap() > 0);
    assert!(!kept.is_empty());
    let http = client();
    for b in &c.nodes {
        for (tag, md) in &kept {
            let r = http.get(format!("{}/v2/team/race/manifests/{tag}", b.url())).send().unwrap();
            assert_eq!(r.status(), 200, "{tag}");
            assert_eq!(r.headers()["docker-content-digest"], md.as_str());
            let m: serde_json::Value = r.json().unwrap();
            for x in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
                let x = x["digest"].as_str().unwrap();
                let r = http.get(format!("{}/v2/team/race/blobs/{x}", b.url())).send().unwrap();
                assert_eq!(r.status(), 200, "blob {x} of {tag} was collected");
                assert_eq!(digest(&r.bytes().unwrap()), x);
            }
        }
    }
}

// ---- real clients through a round robin ----

struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    /// A round robin over `backends`, streaming both ways as a registry needs.
    fn start(work: &Path, backends: &[String]) -> Nginx {
        let port = common::free_port();
        let dir = work.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let d = dir.display();
        let servers: String = backends.iter().map(|b| format!("    server {};\n", b.trim_start_matches("http://"))).collect();
        let conf = format!(
            "worker_processes 1;\nuser root;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
               fastcgi_temp_path {d}/tmp/fcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               upstream berth {{\n{servers}  }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 0;\n    proxy_request_buffering off;\n    proxy_buffering off;\n\
                 proxy_http_version 1.1;\n    location / {{\n      proxy_pass http://berth;\n      proxy_set_header Host $http_host;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("nginx starts");
        assert!(common::wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10)), "nginx did not start");
        Nginx { child, port }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; SIGKILL of the master would orphan the workers.
        let _ = Command::new("kill").arg("-QUIT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) -> cmd::Output {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy").args(args).env("CONTAINERS_REGISTRIES_CONF", "/dev/null");
    common::dockerd::no_internet(&mut c);
    cmd::run(&mut c, CLIENT_LIMIT)
}

/// skopeo, the docker daemon and containerd through nginx round-robining over three nodes:
/// each upload's POST, PATCHes and PUT land on different nodes; pulls come back byte-exact.
#[test]
fn real_clients_through_a_round_robin() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !backend_is_s3() {
        eprintln!("skipping: the cluster runs on S3 only (BERTH_TEST_BACKEND=s3)");
        return;
    }
    if !oci_layout::require_runnable(&["nginx", "skopeo", "dockerd", "docker", "ctr"]) {
        return;
    }
    let fake = Fake::start();
    // A layer containerd can unpack: a tar of one file.
    let layer_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(layer_dir.path().join("root/etc")).unwrap();
    std::fs::write(layer_dir.path().join("root/etc/marker"), common::random_bytes(300_000, 5)).unwrap();
    let tar = layer_dir.path().join("layer.tar");
    cmd::run(Command::new("tar").arg("-C").arg(layer_dir.path().join("root")).arg("-cf").arg(&tar).arg("."), CLIENT_LIMIT).expect_ok();
    let (mirrored, _, _) = fake.add_image("library/tool", "2", &std::fs::read(&tar).unwrap());
    let extra = format!("[[namespace]]\nprefix = \"team\"\n\n{}", upstream(&fake));
    let Some(c) = Nodes::start(3, "", &extra) else { return };
    let work = tempfile::tempdir().unwrap();
    let lb = Nginx::start(work.path(), &c.nodes.iter().map(|b| b.url()).collect::<Vec<_>>());
    let host = lb.host();

    // skopeo: a multi-arch index in, and back out byte-exact.
    let layout = oci_layout::multi_arch(&work.path().join("src"), "1", "round-robin");
    let dest = format!("docker://{host}/team/multi:1");
    skopeo(&["copy", "--all", "--preserve-digests", "--retry-times=0", "--dest-tls-verify=false", &layout.skopeo_ref(), &dest]).expect_ok();
    let back = work.path().join("back");
    skopeo(&["copy", "--all", "--retry-times=0", "--src-tls-verify=false", &dest, &format!("oci:{}:1", back.display())]).expect_ok();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], layout.index);
    for b in &c.nodes {
        let r = client().get(format!("{}/v2/team/multi/manifests/1", b.url())).send().unwrap();
        assert_eq!(r.headers()["docker-content-digest"], layout.index.as_str());
    }

    // The docker daemon: push, forget, pull back, run.
    let d = Dockerd::start_with(None, &[format!("--insecure-registry={host}")]);
    let root = work.path().join("rootfs");
    oci_layout::busybox_rootfs(&root, "through three nodes");
    let tar = work.path().join("rootfs.tar");
    cmd::run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), CLIENT_LIMIT).expect_ok();
    let image = format!("{host}/team/app:1");
    d.docker(&["import", "--change", r#"CMD ["cat", "/etc/marker"]"#, &tar.display().to_string(), &image]).expect_ok();
    d.docker(&["push", &image]).expect_ok();
    d.docker(&["rmi", &image]).expect_ok();
    d.docker(&["pull", &image]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", &image]).expect_ok();
    assert_eq!(run.stdout.trim(), "through three nodes");

    // containerd with hosts.toml, pulling a mirrored image through the balancer.
    let hosts = work.path().join("hosts").join("docker.io");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(hosts.join("hosts.toml"), format!("[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")).unwrap();
    let hosts_dir = work.path().join("hosts");
    d.ctr(
        "berth-cluster",
        &[
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--snapshotter",
            "native",
            "docker.io/library/tool:2",
        ],
    )
    .expect_ok();
    let listed = d.ctr("berth-cluster", &["images", "ls"]).expect_ok().stdout;
    assert!(listed.lines().any(|l| l.starts_with("docker.io/library/tool:2") && l.contains(mirrored.as_str())), "{listed}");
    assert_eq!(fake.count("GET manifest"), 1, "one upstream fetch of the tag through three nodes");
}

// ---- lifecycle under the lease, the engine check, the hot path, uploads losing a node ----

/// The node holding the maintenance lease, once exactly one does.
fn lease_holder(c: &Nodes) -> usize {
    let held = |b: &Berth| metric(b, "berth_cluster_lease_held") == Some(1.0);
    assert!(eventually(Duration::from_secs(15), || c.nodes.iter().filter(|b| held(b)).count() == 1), "no single lease holder");
    c.nodes.iter().position(held).unwrap()
}

/// A GC asked for on the admin listener or with `berth gc` runs only on the lease holder:
/// elsewhere it is refused with 409 naming the holder, and `berth gc` says so and fails.
#[test]
fn a_manual_gc_runs_only_where_the_maintenance_lease_is_held() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Nodes::start(2, "", "[[namespace]]\nprefix = \"team\"\n") else { return };
    let holder = lease_holder(&c);
    let other = 1 - holder;
    let http = client();
    let r = http.post(format!("{}/gc", c.nodes[other].admin_url())).send().unwrap();
    assert_eq!(r.status(), 409, "a GC on the node without the lease");
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["lease_holder"], c.peers[holder].as_str(), "{body}");
    let why = body["error"].as_str().unwrap();
    assert!(why.contains("maintenance lease") && why.contains(&c.peers[holder]), "{why}");
    // A dry run is a run too: one at a time, on the holder.
    assert_eq!(http.post(format!("{}/gc?dry_run=true", c.nodes[other].admin_url())).send().unwrap().status(), 409);
    let r = http.post(format!("{}/gc", c.nodes[holder].admin_url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().unwrap()["dry_run"], false);

    let berth_gc = |node: usize| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("gc").arg("--config").arg(&c.nodes[node].config_path);
        cmd::run(&mut cmd, Duration::from_secs(60))
    };
    let refused = berth_gc(other);
    assert!(!refused.ok, "berth gc on the node without the lease must fail: {}", refused.stdout);
    assert!(
        refused.stderr.contains("409") && refused.stderr.contains("maintenance lease") && refused.stderr.contains(&c.peers[holder]),
        "{}",
        refused.stderr
    );
    berth_gc(holder).expect_ok();
    // Still one holder: a manual run did not take the lease from it.
    assert_eq!(lease_holder(&c), holder);
}

/// A loopback S3 endpoint that ignores `If-None-Match: *` on PUT, built on the real one: each
/// request goes to `upstream` unchanged (the header is signed, so it cannot be dropped), and a
/// create-only PUT the real engine refuses with 412 is answered 200, as an engine that
/// overwrote would. Returns the endpoint and how many refusals it turned into successes.
fn engine_ignoring_conditional_writes(upstream: &str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let overruled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = overruled.clone();
    // One request per connection, each relayed on a fresh upstream connection that the
    // upstream closes after its answer: no response framing to parse.
    let relay = move |mut client: TcpStream, upstream: String, counter: Arc<std::sync::atomic::AtomicUsize>| -> std::io::Result<()> {
        client.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = Vec::new();
        let mut piece = [0u8; 65536];
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = client.read(&mut piece)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&piece[..n]);
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&buf[..head_len]).map_err(std::io::Error::other)?;
        let method = req.method.unwrap_or("").to_string();
        let header = |name: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let conditional = method == "PUT" && header("if-none-match").is_some();
        assert!(header("transfer-encoding").is_none(), "the stand-in engine reads sized bodies only");
        let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_len + length {
            let n = client.read(&mut piece)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&piece[..n]);
        }
        let line_end = buf.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        let mut up = TcpStream::connect(&upstream)?;
        up.set_read_timeout(Some(Duration::from_secs(30)))?;
        // Connection is not a signed header; it makes the upstream close after answering.
        up.write_all(&buf[..line_end])?;
        up.write_all(b"Connection: close\r\n")?;
        up.write_all(&buf[line_end..head_len + length])?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        if conditional && answer.starts_with(b"HTTP/1.1 412") {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            answer =
                b"HTTP/1.1 200 OK\r\nETag: \"00000000000000000000000000000000\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
        }
        client.write_all(&answer)?;
        client.shutdown(std::net::Shutdown::Both)
    };
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (upstream, counter) = (upstream.clone(), counter.clone());
            std::thread::spawn(move || {
                let _ = relay(conn, upstream, counter);
            });
        }
    });
    (url, overruled)
}

/// On an engine that ignores conditional writes, a `[cluster]` node refuses to start and
/// says why.
#[test]
fn a_cluster_refuses_an_engine_without_conditional_writes() {
    if !backend_is_s3() {
        eprintln!("skipping: the cluster runs on S3 only (BERTH_TEST_BACKEND=s3)");
        return;
    }
    let real = std::env::var("BERTH_TEST_S3_ENDPOINT").unwrap();
    let (endpoint, overruled) = engine_ignoring_conditional_writes(&real);
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = Berth::write_config(dir.path(), "", "", "");
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, "a-shared-secret-for-the-test-cluster\n").unwrap();
    let peer = common::free_port();
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(&format!("endpoint = \"{real}\""), &format!("endpoint = \"{endpoint}\""));
    assert!(text.contains(&endpoint), "the config points at the stand-in engine");
    let text = format!(
        "{text}\n[cluster]\nadvertise = \"http://127.0.0.1:{peer}\"\nlisten = \"127.0.0.1:{peer}\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    std::fs::write(&config, text).unwrap();
    let log_path = dir.path().join("berth.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    eventually(Duration::from_secs(60), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("berth kept running on an engine without conditional writes; log:\n{log}");
    };
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(overruled.load(std::sync::atomic::Ordering::SeqCst) > 0, "the stand-in engine overruled no create-only PUT");
    assert!(log.contains("ignores conditional writes") && log.contains("cluster refuses to start"), "{log}");
}

/// On a node that has served a tag once, more pulls of the manifest by tag send nothing to
/// the bucket. Heartbeats, journal polling and health probes still do, so the check looks for
/// a window of pulls with no storage request at all; a pull that touched the bucket would
/// show in every window.
#[test]
fn the_hot_path_does_not_touch_the_bucket() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A slow heartbeat leaves room for windows without background requests.
    let Some(c) = Nodes::start_with_heartbeat(2, "5s", "10s", "", "[[namespace]]\nprefix = \"team\"\n") else { return };
    let http = client();
    let (s, md) = push_image(&http, &c.nodes[0].url(), "team/hot", "1", &common::random_bytes(100_000, 9));
    assert_eq!(s, 201);
    let reader = &c.nodes[1];
    let pull = || {
        let r = http.get(format!("{}/v2/team/hot/manifests/1", reader.url())).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        r.bytes().unwrap();
    };
    pull();
    const PULLS: usize = 50;
    let mut deltas = Vec::new();
    for _ in 0..20 {
        let before = metric_sum(reader, "berth_storage_requests_total");
        for _ in 0..PULLS {
            pull();
        }
        let after = metric_sum(reader, "berth_storage_requests_total");
        deltas.push(after - before);
        if after == before {
            break;
        }
    }
    assert!(deltas.contains(&0.0), "storage requests per window of {PULLS} pulls: {deltas:?}");
    assert!(deltas.iter().all(|d| *d < PULLS as f64), "some window's pulls touched the bucket: {deltas:?}");
}

/// A chunked upload whose node dies between PATCHes, continued on another node: it either
/// completes with the exact bytes on every live node, or fails with an OCI error; never a
/// 201 for other bytes.
#[test]
fn an_upload_whose_node_dies_continues_or_fails_cleanly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = Nodes::start(3, "", "[[namespace]]\nprefix = \"team\"\n") else { return };
    let http = client();
    let data = common::random_bytes(3 << 20, 31);
    let (first, rest) = data.split_at(1 << 20);
    let d = digest(&data);
    let r = http.post(format!("{}/v2/team/up/blobs/uploads/", c.nodes[0].url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let path = location.trim_start_matches(&c.nodes[0].url()).to_string();
    let r = http
        .patch(format!("{}{path}", c.nodes[0].url()))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("0-{}", first.len() - 1))
        .body(first.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap());
    c.nodes[0].kill();
    let oci_error = |r: reqwest::blocking::Response, step: &str| {
        let status = r.status();
        assert!(status.is_client_error() || status.is_server_error(), "{step}: {status}");
        let body: serde_json::Value = r.json().unwrap_or_else(|e| panic!("{step}: {status} without an OCI error body: {e}"));
        let code = body["errors"][0]["code"].as_str().unwrap_or_else(|| panic!("{step}: {status} {body}"));
        let message = body["errors"][0]["message"].as_str().unwrap_or("");
        assert!(!code.is_empty() && !message.is_empty(), "{step}: {body}");
        eprintln!("{step} after the node died: {status} {code}: {message}");
    };
    let b = c.nodes[1].url();
    let r = http
        .patch(format!("{b}{path}"))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("{}-{}", first.len(), data.len() - 1))
        .body(rest.to_vec())
        .send()
        .unwrap();
    if r.status() != 202 {
        return oci_error(r, "PATCH");
    }
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http.put(format!("{b}{path}{sep}digest={d}")).send().unwrap();
    if r.status() != 201 {
        return oci_error(r, "PUT");
    }
    for node in &c.nodes[1..] {
        let r = http.get(format!("{}/v2/team/up/blobs/{d}", node.url())).send().unwrap();
        assert_eq!(r.status(), 200, "a blob acknowledged with 201 reads back on {}", node.url());
        assert!(r.bytes().unwrap() == data, "the blob on {} is the bytes uploaded", node.url());
    }
}
