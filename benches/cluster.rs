//! A cluster simulation at small scale: two cores cannot show a cluster scaling, but they can
//! show what it costs. For each node count N and client count C, N berth nodes with
//! `[cluster]` share one bucket prefix on a Ceph RADOS Gateway started here (scripts/rgw), in
//! front of one fake upstream; C clients, spread round-robin over the nodes, all pull the same
//! cold image (a mirrored tag's manifest, its config and its layers) and check every digest.
//! N = 1 is a plain node without `[cluster]`, the baseline. Not a test: it prints a markdown
//! report (also written to target/bench/cluster.md).
//!
//!     cargo bench --bench cluster
//!
//! Per (N, C) it reports, from the fake upstream's counts and the nodes' admin /metrics:
//! upstream GETs, bucket requests per client request, bytes written to the bucket, bytes sent
//! between nodes on the peer listeners, requests forwarded to owners, and wall time.
//! Heartbeats and journal polling reach the bucket whether or not clients pull; their rate is
//! measured over an idle window before each workload and subtracted from the workload's
//! bucket figures (and shown on its own).
//!
//! Knobs: BENCH_NODES ("1,2,4,8"), BENCH_CLIENTS ("8,32"), BENCH_BLOB_MIB (8; each layer),
//! BENCH_LAYERS (4), BENCH_IDLE_SECS (2; the idle window), BENCH_OUT (target/bench).
//! Needs: radosgw ceph-mon ceph-osd ceph-common.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/rgw.rs"]
mod rgw;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;

use common::cluster::{metric_sum, Nodes};
use common::fake::Fake;
use common::Berth;
use rgw::Rgw;
use sha2::{Digest as _, Sha256};
use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use util::{env_list, env_or};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REPO: &str = "library/sim";
const TAG: &str = "1.0";
const MIB: f64 = (1u64 << 20) as f64;

/// The image every client pulls; the fake upstream serves it.
struct Image {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
    digest: String,
}

impl Image {
    fn generate(layers: usize, mib: usize) -> Image {
        let layers: Vec<Vec<u8>> = (0..layers).map(|i| common::random_bytes(mib << 20, 1000 + i as u64)).collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| format!("\"{}\"", common::digest(l))).collect();
        let config = format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#, diff_ids.join(","))
            .into_bytes();
        let descs: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#, common::digest(l), l.len())
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
            common::digest(&config),
            config.len(),
            descs.join(",")
        )
        .into_bytes();
        let digest = common::digest(&manifest);
        Image { config, layers, manifest, digest }
    }

    /// (digest, size) of every blob: the config first, then the layers.
    fn blobs(&self) -> Vec<(String, u64)> {
        std::iter::once(&self.config).chain(&self.layers).map(|b| (common::digest(b), b.len() as u64)).collect()
    }

    /// Bytes of one pull: the manifest and every blob once.
    fn bytes(&self) -> u64 {
        self.manifest.len() as u64 + self.blobs().iter().map(|(_, n)| n).sum::<u64>()
    }

    fn serve_from(&self, fake: &Fake) {
        for b in std::iter::once(&self.config).chain(&self.layers) {
            fake.add_blob(b);
        }
        fake.add_manifest(REPO, Some(TAG), OCI_MANIFEST, &self.manifest);
    }
}

/// The nodes of one run: a plain node, or a cluster (which keeps its shared secret).
enum Deployment {
    Single(Berth),
    Cluster(Nodes),
}

impl Deployment {
    fn nodes(&self) -> Vec<&Berth> {
        match self {
            Deployment::Single(b) => vec![b],
            Deployment::Cluster(c) => c.nodes.iter().collect(),
        }
    }
}

/// Counters summed over every node.
#[derive(Clone, Copy, Default, Debug)]
struct Counters {
    bucket_requests: f64,
    bucket_out: f64,
    bucket_in: f64,
    /// Blob reads served from the bucket, not from a local copy.
    bucket_reads: f64,
    peer_bytes: f64,
    forwards_blob: f64,
    forwards_manifest: f64,
    fallbacks: f64,
}

impl Counters {
    fn read(nodes: &[&Berth]) -> Counters {
        let mut c = Counters::default();
        for b in nodes {
            c.bucket_requests += metric_sum(b, "berth_storage_requests_total{");
            c.bucket_out += metric_sum(b, "berth_storage_bytes_total{direction=\"out\"}");
            c.bucket_in += metric_sum(b, "berth_storage_bytes_total{direction=\"in\"}");
            c.bucket_reads += metric_sum(b, "berth_hot_tier_reads_total{result=\"miss\"}");
            c.peer_bytes += metric_sum(b, "berth_cluster_peer_bytes_total");
            c.forwards_blob += metric_sum(b, "berth_cluster_forwards_total{kind=\"blob\",result=\"ok\"}");
            c.forwards_manifest += metric_sum(b, "berth_cluster_forwards_total{kind=\"manifest\",result=\"ok\"}");
            c.fallbacks += metric_sum(b, "berth_cluster_forwards_total{kind=\"blob\",result=\"fallback\"}")
                + metric_sum(b, "berth_cluster_forwards_total{kind=\"manifest\",result=\"fallback\"}");
        }
        c
    }

    fn minus(self, o: Counters) -> Counters {
        Counters {
            bucket_requests: self.bucket_requests - o.bucket_requests,
            bucket_out: self.bucket_out - o.bucket_out,
            bucket_in: self.bucket_in - o.bucket_in,
            bucket_reads: self.bucket_reads - o.bucket_reads,
            peer_bytes: self.peer_bytes - o.peer_bytes,
            forwards_blob: self.forwards_blob - o.forwards_blob,
            forwards_manifest: self.forwards_manifest - o.forwards_manifest,
            fallbacks: self.fallbacks - o.fallbacks,
        }
    }
}

struct Row {
    nodes: usize,
    clients: usize,
    wall: f64,
    upstream_blob_gets: usize,
    upstream_manifest_gets: usize,
    upstream_manifest_heads: usize,
    client_requests: usize,
    /// Bucket requests per second with no client (heartbeats, lease, journal polling).
    idle_rate: f64,
    /// The workload's counters, the idle rate over the workload's time taken out of the
    /// bucket figures.
    work: Counters,
    start_secs: f64,
}

fn upstream(fake: &Fake) -> String {
    format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", fake.url())
}

/// Reads a body while hashing it: (digest, length).
fn drain(mut r: reqwest::blocking::Response) -> Result<(String, u64), String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| format!("body: {e}"))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// One client's pull through `base`: the tag, then every blob, starting at blob `first` so the
/// clients are spread over the blobs rather than all on the same one. Every digest checked.
fn pull(base: &str, manifest_digest: &str, blobs: &[(String, u64)], first: usize) -> Result<(), String> {
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let r = http.get(format!("{base}/v2/{REPO}/manifests/{TAG}")).header("Accept", OCI_MANIFEST).send().map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("manifest: status {}", r.status()));
    }
    let header = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (got, _) = drain(r)?;
    if got != manifest_digest || header != manifest_digest {
        return Err(format!("manifest: got {got} (header {header}), want {manifest_digest}"));
    }
    for i in 0..blobs.len() {
        let (d, size) = &blobs[(first + i) % blobs.len()];
        let r = http.get(format!("{base}/v2/{REPO}/blobs/{d}")).send().map_err(|e| e.to_string())?;
        if r.status() != 200 {
            return Err(format!("blob {d}: status {}", r.status()));
        }
        let got = drain(r)?;
        if got != (d.clone(), *size) {
            return Err(format!("blob {d}: got {} ({} bytes), want {size} bytes", got.0, got.1));
        }
    }
    Ok(())
}

fn run(n: usize, clients: usize, image: &Image, idle: Duration) -> Row {
    let fake = Fake::start();
    image.serve_from(&fake);
    let extra = upstream(&fake);
    let t0 = Instant::now();
    // The configuration reference's default heartbeat and member timeout: the bucket traffic
    // they cost is part of what a cluster costs.
    let deployment = if n == 1 {
        Deployment::Single(Berth::start(&extra))
    } else {
        Deployment::Cluster(Nodes::start_with_heartbeat(n, "1s", "5s", "", &extra).expect("the S3 backend is set up"))
    };
    let start_secs = t0.elapsed().as_secs_f64();
    let nodes = deployment.nodes();
    let urls: Vec<String> = nodes.iter().map(|b| b.url()).collect();

    // The idle window: a measurement, nothing waits on it.
    let before_idle = Counters::read(&nodes);
    let idle_t = Instant::now();
    std::thread::sleep(idle);
    let before = Counters::read(&nodes);
    let idle_rate = (before.bucket_requests - before_idle.bucket_requests) / idle_t.elapsed().as_secs_f64();
    let idle_out_rate = (before.bucket_out - before_idle.bucket_out) / idle_t.elapsed().as_secs_f64();
    let idle_in_rate = (before.bucket_in - before_idle.bucket_in) / idle_t.elapsed().as_secs_f64();

    let blobs = image.blobs();
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (base, md, blobs, start) = (urls[i % n].clone(), image.digest.clone(), blobs.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                pull(&base, &md, &blobs, i % blobs.len())
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let failures: Vec<String> = handles
        .into_iter()
        .enumerate()
        .filter_map(|(i, h)| h.join().unwrap().err().map(|e| format!("client {i} (node {}): {e}", i % n)))
        .collect();
    let wall = t.elapsed().as_secs_f64();
    assert!(failures.is_empty(), "N={n} C={clients}: {} clients failed:\n{}", failures.len(), failures.join("\n"));
    // A fill may still be storing its last part after its clients have every byte.
    let settled = common::eventually(Duration::from_secs(30), || nodes.iter().all(|b| metric_sum(b, "berth_fills_in_flight ") == 0.0));
    assert!(settled, "N={n} C={clients}: fills still in flight 30 s after the clients finished");
    let last = Counters::read(&nodes);
    let elapsed = t.elapsed().as_secs_f64();
    let mut work = last.minus(before);
    work.bucket_requests = (work.bucket_requests - idle_rate * elapsed).max(0.0);
    work.bucket_out = (work.bucket_out - idle_out_rate * elapsed).max(0.0);
    work.bucket_in = (work.bucket_in - idle_in_rate * elapsed).max(0.0);
    let ops: Vec<String> = nodes
        .iter()
        .map(|b| {
            let text = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap();
            text.lines()
                .filter(|l| {
                    [
                        "berth_storage_requests_total{",
                        "berth_cache_requests_total{",
                        "berth_hot_tier_reads_total{",
                        "berth_served_bytes_total{",
                    ]
                    .iter()
                    .any(|p| l.starts_with(p))
                })
                .map(|l| l.trim_start_matches("berth_"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    eprintln!("N={n} C={clients}: by node since start: {ops:#?}");
    let row = Row {
        nodes: n,
        clients,
        wall,
        upstream_blob_gets: fake.count("GET blob"),
        upstream_manifest_gets: fake.count("GET manifest"),
        upstream_manifest_heads: fake.count("HEAD manifest"),
        client_requests: clients * (1 + blobs.len()),
        idle_rate,
        work,
        start_secs,
    };
    eprintln!(
        "N={n} C={clients}: {wall:.2} s, upstream {} blob / {} manifest GETs, {:?}, idle {idle_rate:.1} bucket req/s",
        row.upstream_blob_gets, row.upstream_manifest_gets, row.work
    );
    drop(deployment);
    row
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for tool in ["radosgw", "ceph-mon", "ceph-osd"] {
        if !common::have(tool) {
            eprintln!("the cluster bench needs {tool} (apt-get install radosgw ceph-mon ceph-osd ceph-common)");
            std::process::exit(1);
        }
    }
    let node_counts = env_list("BENCH_NODES", "1,2,4,8");
    let client_counts = env_list("BENCH_CLIENTS", "8,32");
    let mib: usize = env_or("BENCH_BLOB_MIB", 8);
    let layers: usize = env_or("BENCH_LAYERS", 4);
    let idle = Duration::from_secs_f64(env_or("BENCH_IDLE_SECS", 2.0));
    let out_dir = PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let began = Instant::now();

    let image = Image::generate(layers, mib);
    let workload = image.bytes() as f64;
    let rgw = Rgw::start();
    eprintln!("gateway up after {:.1} s", began.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    for &n in &node_counts {
        for &c in &client_counts {
            rows.push(run(n, c, &image, idle));
        }
    }
    drop(rgw);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Workload: one mirrored tag, its manifest, a config and {layers} layers of {mib} MiB ({:.1} MiB, {} blobs), cold; each client \
         pulls all of it ({} requests) through node (client mod N). N = 1 is a plain node without `[cluster]`; N > 1 are cluster \
         nodes with the default 1 s heartbeat. Bucket figures leave out the idle rate (heartbeats, lease, journal polling) \
         measured over {:.0} s before each workload; bytes written count every PUT and uploaded part, \
         uploads later abandoned included. \"× image\" is a multiple of the image's bytes. One run each.\n",
        workload / MIB,
        1 + layers,
        2 + layers,
        idle.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| nodes | clients | wall s | client MiB/s | upstream GETs blob / manifest | bucket req per client req | bucket MiB written (× image) | bucket MiB read | peer MiB (× image) | blob reads from the bucket | owner forwards blob / manifest | idle bucket req/s |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let w = &r.work;
        let fallbacks = if w.fallbacks > 0.0 { format!(" (+{:.0} fallback)", w.fallbacks) } else { String::new() };
        let heads = if r.upstream_manifest_heads > 0 { format!(" (+{} HEAD)", r.upstream_manifest_heads) } else { String::new() };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.0} | {} / {}{heads} | {:.2} | {:.1} ({:.2}×) | {:.1} | {:.1} ({:.2}×) | {:.0} | {:.0} / {:.0}{fallbacks} | {:.1} |",
            r.nodes,
            r.clients,
            r.wall,
            r.clients as f64 * workload / MIB / r.wall,
            r.upstream_blob_gets,
            r.upstream_manifest_gets,
            w.bucket_requests / r.client_requests as f64,
            w.bucket_out / MIB,
            w.bucket_out / workload,
            w.bucket_in / MIB,
            w.peer_bytes / MIB,
            w.peer_bytes / workload,
            w.bucket_reads,
            w.forwards_blob,
            w.forwards_manifest,
            r.idle_rate,
        );
    }
    let starts: Vec<String> =
        rows.iter().filter(|r| r.clients == client_counts[0]).map(|r| format!("N={}: {:.1} s", r.nodes, r.start_secs)).collect();
    let _ = writeln!(
        md,
        "\nNodes up and every member seen by every node after: {}. Whole run: {:.0} s.",
        starts.join(", "),
        began.elapsed().as_secs_f64()
    );
    std::fs::write(out_dir.join("cluster.md"), &md).unwrap();
    println!("{md}");
}
