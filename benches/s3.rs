//! The S3 backend side by side, in one run, on loopback: berth on a Ceph RADOS Gateway started
//! here (scripts/rgw) against berth on local disk, against the gateway itself (curl), and
//! against CNCF distribution 2.8 with `storage: s3` on the same gateway. Not a test: it
//! measures and prints a markdown report (also written to target/bench/s3.md).
//!
//!     cargo bench --bench s3
//!
//! Workloads:
//!   1. hot-tier hits: a 64 MiB blob at 8 connections (GB/s) and manifest GET by tag at 64
//!      connections (requests/s), berth on S3 with the blob in its hot tier vs berth on disk
//!   2. cold read of the largest blob from the bucket (a node with no hot tier): first byte and
//!      throughput of `curl` through berth vs `curl` straight from the gateway
//!   3. push of the image with skopeo: berth on S3 vs distribution on S3 (and berth on disk)
//!   4. peak RSS of berth during 64 concurrent downloads of the largest blob from the bucket
//!
//! Knobs: BENCH_SIZES_MIB ("1,64,1024"), BENCH_SECS (4), BENCH_OUT (target/bench), BENCH_ONLY
//! (comma list of workload numbers; the push to berth on S3 always runs, it loads the data).
//! Needs: radosgw ceph-mon ceph-osd ceph-common docker-registry skopeo curl.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::{env_list, env_or};
#[path = "common/rgw.rs"]
mod rgw;
use rgw::Rgw;
#[path = "hot/image.rs"]
mod image;
#[path = "hot/load.rs"]
#[allow(dead_code)]
mod load;
#[path = "hot/procs.rs"]
mod procs;

use common::distribution::{Options, Registry};
use image::Image;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn var(k: &str) -> String {
    std::env::var(k).unwrap()
}

/// `curl` of a URL: (seconds to the first byte, total seconds, bytes).
fn curl(url: &str, sign: bool) -> (f64, f64, u64) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total} %{size_download}"]);
    if sign {
        c.arg("--aws-sigv4").arg(format!("aws:amz:{}:s3", var("BERTH_TEST_S3_REGION")));
        c.arg("--user").arg(format!("{}:{}", var("BERTH_TEST_S3_ACCESS_KEY"), var("BERTH_TEST_S3_SECRET_KEY")));
        c.args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
    }
    let out = common::cmd::run(c.arg(url), Duration::from_secs(600)).expect_ok();
    let v: Vec<f64> = out.stdout.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2] as u64)
}

fn push(image: &Image, port: u16, needle: &str) -> (f64, f64) {
    let pids = procs::tree(needle);
    let cpu0 = procs::cpu_secs(&pids);
    let t0 = Instant::now();
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--dest-tls-verify=false", "--retry-times=0"])
        .arg(format!("oci:{}:latest", image.dir.display()))
        .arg(format!("docker://127.0.0.1:{port}/bench/img:latest"));
    common::cmd::run(&mut cmd, Duration::from_secs(1800)).expect_ok();
    (t0.elapsed().as_secs_f64(), procs::cpu_secs(&pids) - cpu0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

fn berth() -> common::Berth {
    common::Berth::start("[[namespace]]\nprefix = \"bench\"\n")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for tool in ["radosgw", "docker-registry", "skopeo", "curl"] {
        if !common::have(tool) {
            eprintln!("the s3 bench needs {tool} (apt-get install radosgw ceph-mon ceph-osd ceph-common docker-registry skopeo curl)");
            std::process::exit(1);
        }
    }
    let sizes = env_list("BENCH_SIZES_MIB", "1,64,1024");
    let secs: f64 = env_or("BENCH_SECS", 4.0);
    let only = env_list("BENCH_ONLY", "1,2,3,4");
    let out_dir = PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let work = tempfile::tempdir().unwrap();
    eprintln!("generating the image ({sizes:?} MiB layers)");
    let image = Image::generate(&work.path().join("layout"), &sizes);
    let largest = image.layers.iter().max_by_key(|l| l.size).unwrap();
    let hot_layer = image.layers.iter().find(|l| l.size == 64 << 20).unwrap_or(largest);

    std::env::remove_var("BERTH_TEST_BACKEND");
    let local = berth();
    let rgw = Rgw::start();
    let s3 = berth();
    let dist = Registry::start(Options {
        s3: Some([
            var("BERTH_TEST_S3_ENDPOINT"),
            var("BERTH_TEST_S3_BUCKET"),
            var("BERTH_TEST_S3_REGION"),
            var("BERTH_TEST_S3_ACCESS_KEY"),
            var("BERTH_TEST_S3_SECRET_KEY"),
            "distribution".into(),
        ]),
        ..Default::default()
    });
    let mut md = String::new();
    let _ = writeln!(md, "Image: {} MiB in {} layers; each figure from one run on this machine.\n", image.total >> 20, image.layers.len());

    // 3. Push (also loads every server).
    let (t_s3, cpu_s3) = push(&image, s3.port, &s3.config_path.display().to_string());
    let local_push = (only.contains(&1) || only.contains(&3)).then(|| push(&image, local.port, &local.config_path.display().to_string()));
    if let (true, Some((t_local, cpu_local))) = (only.contains(&3), local_push) {
        let (t_dist, cpu_dist) = push(&image, dist.port, &dist.dir.path().join("config.yml").display().to_string());
        eprintln!("push: berth s3 {t_s3:.2}s, berth disk {t_local:.2}s, distribution s3 {t_dist:.2}s");
        let mib = (image.total >> 20) as f64;
        let _ = writeln!(md, "**Push** (skopeo, one image)\n");
        let _ = writeln!(md, "| server | seconds | MiB/s | server CPU-s | throughput vs distribution on S3 |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for (name, t, cpu) in
            [("berth, S3", t_s3, cpu_s3), ("distribution 2.8, S3", t_dist, cpu_dist), ("berth, local disk", t_local, cpu_local)]
        {
            let _ = writeln!(md, "| {name} | {t:.2} | {:.0} | {cpu:.2} | {} |", mib / t, ratio(t_dist, t));
        }
    }

    // 1. Hot-tier hits against the local backend.
    if only.contains(&1) {
        let read_all = |b: &common::Berth, d: &str| {
            let c = reqwest::blocking::Client::new();
            let r = c.get(format!("{}/v2/bench/img/blobs/{d}", b.url())).send().unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().unwrap().len()
        };
        // The push left local copies; one read makes sure the hot layer is one.
        read_all(&s3, &hot_layer.digest);
        let _ = writeln!(md, "\n**Hot-tier hits** (berth on S3 with the content in its hot tier, against berth on local disk; best of 3 alternating rounds)\n");
        let _ = writeln!(md, "| workload | berth, S3 (hot) | berth, local disk | ratio |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        let blob_path = format!("/v2/bench/img/blobs/{}", hot_layer.digest);
        let tag_path = "/v2/bench/img/manifests/latest".to_string();
        let run = |b: &common::Berth, path: &str, conns: usize| {
            let t = load::Target { port: b.port, method: "GET", path: path.to_string() };
            rt.block_on(load::run(&t, conns, secs))
        };
        // Alternating rounds, best of three each: the gateway's own background work after the
        // pushes must not land on one side only.
        let pair = |path: &str, conns: usize, key: fn(&load::Totals) -> f64| {
            let (mut a, mut b) = (run(&s3, path, conns), run(&local, path, conns));
            for _ in 0..2 {
                let (x, y) = (run(&s3, path, conns), run(&local, path, conns));
                if key(&x) > key(&a) {
                    a = x;
                }
                if key(&y) > key(&b) {
                    b = y;
                }
            }
            (a, b)
        };
        let (bs3, bloc) = pair(&blob_path, 8, load::Totals::gbps);
        let _ = writeln!(
            md,
            "| {} MiB blob, 8 connections, GB/s | {:.2} | {:.2} | {} |",
            hot_layer.size >> 20,
            bs3.gbps(),
            bloc.gbps(),
            ratio(bs3.gbps(), bloc.gbps())
        );
        let (ms3, mloc) = pair(&tag_path, 64, load::Totals::rps);
        let _ = writeln!(
            md,
            "| manifest GET by tag, 64 connections, requests/s | {:.0} | {:.0} | {} |",
            ms3.rps(),
            mloc.rps(),
            ratio(ms3.rps(), mloc.rps())
        );
        eprintln!("hot: blob {:.2} vs {:.2} GB/s, manifest {:.0} vs {:.0} req/s", bs3.gbps(), bloc.gbps(), ms3.rps(), mloc.rps());
    }

    // 2 and 4: a node on the same bucket without a hot tier reads everything from the bucket.
    let cold_dir = tempfile::tempdir().unwrap();
    let (cfg, port, admin) = common::Berth::write_config(cold_dir.path(), "", "", "[[namespace]]\nprefix = \"bench\"\n");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let s3_prefix = |t: &str| t.lines().find(|l| l.starts_with("prefix = ")).unwrap().to_string();
    let text = text
        .replace(&s3_prefix(&text), &s3_prefix(&std::fs::read_to_string(&s3.config_path).unwrap()))
        .replace("hot_tier_bytes = \"1GiB\"", "hot_tier_bytes = \"0B\"");
    std::fs::write(&cfg, text).unwrap();
    let mut cold = common::Berth { child: None, port, admin_port: admin, dir: cold_dir, log_path: PathBuf::new(), config_path: cfg };
    cold.log_path = cold.dir.path().join("berth.log");
    cold.spawn();
    let key = format!("{}blobs/sha256/{}/{}", s3_prefix_value(&s3.config_path), &largest.digest[7..9], &largest.digest[7..]);
    let direct = format!("{}/{}/{key}", var("BERTH_TEST_S3_ENDPOINT"), var("BERTH_TEST_S3_BUCKET"));
    let mut direct_runs = Vec::new();
    let mut berth_runs = Vec::new();
    for _ in 0..5 {
        direct_runs.push(curl(&direct, true));
        berth_runs.push(curl(&format!("{}/v2/bench/img/blobs/{}", cold.url(), largest.digest), false));
    }
    let best = |v: &[(f64, f64, u64)]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
        v[v.len() / 2]
    };
    let (d, b) = (best(&direct_runs), best(&berth_runs));
    assert_eq!(d.2, largest.size);
    assert_eq!(b.2, largest.size);
    let _ = writeln!(md, "\n**Cold read** of the {} MiB blob from the bucket (median of 5 alternating runs, curl)\n", largest.size >> 20);
    let _ = writeln!(md, "| path | first byte ms | MiB/s |");
    let _ = writeln!(md, "|---|---:|---:|");
    let _ = writeln!(md, "| gateway directly | {:.1} | {:.0} |", d.0 * 1e3, (d.2 >> 20) as f64 / d.1);
    let _ = writeln!(md, "| through berth | {:.1} | {:.0} |", b.0 * 1e3, (b.2 >> 20) as f64 / b.1);
    let _ = writeln!(
        md,
        "| berth against the gateway | +{:.1} ms | {} |",
        (b.0 - d.0) * 1e3,
        ratio((b.2 >> 20) as f64 / b.1, (d.2 >> 20) as f64 / d.1)
    );

    // 4.
    let pids = procs::tree(&cold.config_path.display().to_string());
    procs::reset_peak(&pids);
    let t = load::Target { port: cold.port, method: "GET", path: format!("/v2/bench/img/blobs/{}", largest.digest) };
    let many = rt.block_on(load::run(&t, 64, secs));
    let peak = procs::peak_rss_mib(&pids);
    let _ = writeln!(
        md,
        "\n**Memory**: peak RSS {peak:.0} MiB with 64 concurrent downloads of the {} MiB blob from the bucket ({:.2} GB/s in total over {secs} s)",
        largest.size >> 20,
        many.gbps()
    );
    eprintln!("rss: {peak:.0} MiB");
    drop(cold);
    drop(s3);
    drop(dist);
    drop(rgw);
    std::fs::write(out_dir.join("s3.md"), &md).unwrap();
    println!("{md}");
}

/// The `[storage.s3] prefix` a config file names.
fn s3_prefix_value(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("prefix = ")).unwrap();
    line.trim_start_matches("prefix = ").trim_matches('"').to_string()
}
