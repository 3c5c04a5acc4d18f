//! Side by side, in one run, on loopback, with the same data: berth, CNCF distribution 2.8
//! (plain, and in proxy mode for cold pulls), and nginx with `sendfile` serving berth's own
//! blob files (the static ceiling). Not a test: it measures, writes a CSV and a markdown
//! report, and prints the report.
//!
//!     benches/run.sh            (or: cargo bench --bench hot)
//!
//! Workloads (see the README's Performance section):
//!   1. hot blobs at 1, 8, 64 connections: GB/s, server CPU-seconds per GB
//!   2. manifest GET/HEAD by digest and by tag at 64 connections: requests/s, p50, p99
//!   3. a cold 64 MiB blob pulled by 1, 16, 64 clients at once: upstream GETs and bytes,
//!      first byte, total time (berth vs distribution's proxy; benches/mirror.rs has the
//!      longer cold/warm comparison with a throttled uplink)
//!   4. push of the image holding all the blobs with skopeo: seconds
//!   5. peak RSS of each server during the 64-connection run of the largest blob
//!
//! Knobs (environment): BENCH_SIZES_MIB ("1,64,1024"), BENCH_CONNS ("1,8,64"), BENCH_SECS (3,
//! per cell and server), BENCH_COLD_MIB (64), BENCH_COLD_CLIENTS ("1,16,64"), BENCH_OUT
//! (target/bench), BENCH_ONLY (comma list of workload numbers).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../common/util.rs"]
#[allow(dead_code)]
mod util;
use util::{env_list, env_or};
mod image;
mod load;
mod procs;

use common::distribution::{Options, Registry};
use image::{check_pushed, random_blob, Image};
use sha2::Digest as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server under test: where it listens and which processes are it.
struct Server {
    name: &'static str,
    port: u16,
    needle: String,
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        procs::tree(&self.needle)
    }
}

#[derive(Default, Clone)]
struct Row {
    workload: &'static str,
    server: &'static str,
    case: String,
    conns: usize,
    secs: f64,
    requests: u64,
    errors: u64,
    bytes: u64,
    gbps: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s: f64,
    cpu_s_per_gb: f64,
    peak_rss_mib: f64,
    upstream_gets: usize,
    upstream_mib: f64,
    ttfb_p50_ms: f64,
    ttfb_max_ms: f64,
}

const CSV_HEAD: &str = "workload,server,case,conns,secs,requests,errors,bytes,gbps,rps,p50_ms,p99_ms,cpu_s,cpu_s_per_gb,peak_rss_mib,upstream_gets,upstream_mib,ttfb_p50_ms,ttfb_max_ms";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{},{},{},{},{:.3},{},{},{},{:.3},{:.0},{:.3},{:.3},{:.3},{:.3},{:.1},{},{:.1},{:.1},{:.1}",
            self.workload,
            self.server,
            self.case,
            self.conns,
            self.secs,
            self.requests,
            self.errors,
            self.bytes,
            self.gbps,
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.cpu_s,
            self.cpu_s_per_gb,
            self.peak_rss_mib,
            self.upstream_gets,
            self.upstream_mib,
            self.ttfb_p50_ms,
            self.ttfb_max_ms
        )
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs bench targets; this one only measures
        // under `cargo bench`.
        return;
    }
    for tool in ["docker-registry", "nginx", "skopeo"] {
        if !common::have(tool) {
            eprintln!("the hot bench needs {tool} (apt-get install docker-registry nginx skopeo)");
            std::process::exit(1);
        }
    }
    let only = env_list("BENCH_ONLY", "1,2,3,4,5");
    let sizes = env_list("BENCH_SIZES_MIB", "1,64,1024");
    let conns = env_list("BENCH_CONNS", "1,8,64");
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let out_dir = PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let work = tempfile::tempdir().unwrap();
    eprintln!("generating the image ({sizes:?} MiB layers)");
    let image = Image::generate(&work.path().join("layout"), &sizes);

    let upstream = Registry::start(Options::default());
    let berth = common::Berth::start(&format!(
        "[[namespace]]\nprefix = \"bench\"\n\n[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\n",
        upstream.url()
    ));
    let dist = Registry::start(Options::default());
    let berth_s = Server { name: "berth", port: berth.port, needle: berth.config_path.display().to_string() };
    let dist_s = Server { name: "distribution", port: dist.port, needle: dist.dir.path().join("config.yml").display().to_string() };

    let mut rows = Vec::new();

    // 4: the push also loads the data every other workload reads.
    for s in [&berth_s, &dist_s] {
        let pids = s.pids();
        let cpu0 = procs::cpu_secs(&pids);
        let t0 = Instant::now();
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false", "--retry-times=0"])
            .arg(format!("oci:{}:latest", image.dir.display()))
            .arg(format!("docker://127.0.0.1:{}/bench/img:latest", s.port));
        common::cmd::run(&mut cmd, Duration::from_secs(900)).expect_ok();
        let took = t0.elapsed().as_secs_f64();
        let cpu = procs::cpu_secs(&pids) - cpu0;
        eprintln!("push to {}: {took:.2}s", s.name);
        rows.push(Row {
            workload: "4-push",
            server: s.name,
            case: format!("{} MiB image", image.total >> 20),
            conns: 1,
            secs: took,
            bytes: image.total,
            gbps: image.total as f64 / took / 1e9,
            cpu_s: cpu,
            cpu_s_per_gb: cpu / (image.total as f64 / 1e9),
            ..Default::default()
        });
    }
    check_pushed(&berth.url(), &image);
    check_pushed(&dist.url(), &image);

    // nginx serves berth's blob files themselves (hard links), and the manifest bytes as
    // files named by digest and by tag.
    let www = work.path().join("www");
    let repo_dir = www.join("v2/bench/img");
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("manifests")).unwrap();
    for l in &image.layers {
        let hex = l.digest.trim_start_matches("sha256:");
        let src = berth.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex);
        std::fs::hard_link(&src, repo_dir.join("blobs").join(&l.digest)).unwrap();
    }
    std::fs::write(repo_dir.join("manifests").join(&image.manifest_digest), &image.manifest).unwrap();
    std::fs::write(repo_dir.join("manifests/latest"), &image.manifest).unwrap();
    let nginx = Nginx::start(work.path(), &www);
    let nginx_s = Server { name: "nginx", port: nginx.port, needle: nginx.conf.display().to_string() };
    let hot = [&berth_s, &nginx_s, &dist_s];

    // 1 and 5.
    if only.contains(&1) || only.contains(&5) {
        for l in &image.layers {
            for &c in &conns {
                let rss_cell = c == *conns.iter().max().unwrap() && l.size == image.largest();
                if !only.contains(&1) && !rss_cell {
                    continue;
                }
                for s in hot {
                    let t = load::Target { port: s.port, method: "GET", path: format!("/v2/bench/img/blobs/{}", l.digest) };
                    let row = measure(&rt, s, &t, c, secs, "1-blob", format!("{} MiB", l.size >> 20));
                    eprintln!(
                        "blob {} MiB x{c} {}: {:.2} GB/s, {:.2} cpu-s/GB, {:.0} MiB peak, {} errors",
                        l.size >> 20,
                        s.name,
                        row.gbps,
                        row.cpu_s_per_gb,
                        row.peak_rss_mib,
                        row.errors
                    );
                    rows.push(row);
                }
            }
        }
    }

    // 2.
    if only.contains(&2) {
        let c = 64;
        for (method, by) in [("GET", "digest"), ("GET", "tag"), ("HEAD", "digest"), ("HEAD", "tag")] {
            let reference = if by == "tag" { "latest".to_string() } else { image.manifest_digest.clone() };
            for s in hot {
                let t = load::Target { port: s.port, method, path: format!("/v2/bench/img/manifests/{reference}") };
                let row = measure(&rt, s, &t, c, secs, "2-manifest", format!("{method} by {by}"));
                eprintln!(
                    "manifest {method} by {by} {}: {:.0} req/s p50 {:.2} ms p99 {:.2} ms, {} errors",
                    s.name, row.rps, row.p50_ms, row.p99_ms, row.errors
                );
                rows.push(row);
            }
        }
    }

    // 3.
    if only.contains(&3) {
        let proxy = Registry::start(Options { proxy: Some(upstream.url()), ..Default::default() });
        let size = env_or("BENCH_COLD_MIB", 64usize) << 20;
        for n in env_list("BENCH_COLD_CLIENTS", "1,16,64") {
            let repo = format!("cold/c{n}");
            let blob = random_blob(size, n as u64);
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
            common::distribution::push_blob(&upstream.url(), &repo, &digest, blob);
            let path = format!("/v2/{repo}/blobs/{digest}");
            for (name, port) in [("berth", berth.port), ("distribution", proxy.port)] {
                let before = upstream.access().len();
                let t0 = Instant::now();
                let mut times = rt.block_on(load::herd(port, &path, n, size as u64));
                let total = t0.elapsed();
                let log = upstream.settle(before);
                let gets: Vec<_> = log.iter().filter(|a| a.method == "GET" && a.path == path).collect();
                times.sort();
                let ttfb: Vec<f64> = {
                    let mut v: Vec<f64> = times.iter().map(|t| t.0.as_secs_f64() * 1000.0).collect();
                    v.sort_by(f64::total_cmp);
                    v
                };
                let row = Row {
                    workload: "3-cold",
                    server: name,
                    case: format!("{} MiB", size >> 20),
                    conns: n,
                    secs: total.as_secs_f64(),
                    requests: n as u64,
                    bytes: (size * n) as u64,
                    upstream_gets: gets.len(),
                    upstream_mib: gets.iter().map(|a| a.bytes).sum::<u64>() as f64 / 1048576.0,
                    ttfb_p50_ms: ttfb[ttfb.len() / 2],
                    ttfb_max_ms: *ttfb.last().unwrap(),
                    ..Default::default()
                };
                eprintln!("cold x{n} {name}: {:.0} ms, {} upstream GETs", row.secs * 1000.0, row.upstream_gets);
                rows.push(row);
            }
        }
    }

    let mut csv = format!("{CSV_HEAD}\n");
    for r in &rows {
        csv += &r.csv();
        csv.push('\n');
    }
    std::fs::write(out_dir.join("hot.csv"), &csv).unwrap();
    let md = report(&rows, secs, &image);
    std::fs::write(out_dir.join("hot.md"), &md).unwrap();
    println!("{md}");
    eprintln!("wrote {} and {}", out_dir.join("hot.csv").display(), out_dir.join("hot.md").display());
}

fn measure(
    rt: &tokio::runtime::Runtime,
    s: &Server,
    t: &load::Target,
    conns: usize,
    secs: f64,
    workload: &'static str,
    case: String,
) -> Row {
    let pids = s.pids();
    std::thread::sleep(Duration::from_millis(200));
    procs::reset_peak(&pids);
    let cpu0 = procs::cpu_secs(&pids);
    let r = rt.block_on(load::run(t, conns, secs));
    let cpu = procs::cpu_secs(&pids) - cpu0;
    let gb = r.bytes as f64 / 1e9;
    Row {
        workload,
        server: s.name,
        case,
        conns,
        secs: r.elapsed.as_secs_f64(),
        requests: r.requests,
        errors: r.errors,
        bytes: r.bytes,
        gbps: r.gbps(),
        rps: r.rps(),
        p50_ms: r.percentile_ms(0.5),
        p99_ms: r.percentile_ms(0.99),
        cpu_s: cpu,
        cpu_s_per_gb: if gb > 0.0 { cpu / gb } else { f64::NAN },
        peak_rss_mib: procs::peak_rss_mib(&pids),
        ..Default::default()
    }
}

// ---- nginx ----

struct Nginx {
    child: Child,
    port: u16,
    conf: PathBuf,
}

impl Nginx {
    fn start(work: &Path, www: &Path) -> Nginx {
        let port = common::free_port();
        let dir = work.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let d = dir.display();
        // One worker per core, sendfile, and keep-alive that never runs out mid-run: nginx at
        // its best as a static file server.
        let conf = format!(
            "worker_processes auto;\nuser root;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log {d}/access.log;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
               client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {};\n\
                 location ~ /manifests/ {{ types {{ }} default_type application/vnd.oci.image.manifest.v1+json; }}\n\
                 location ~ /blobs/ {{ types {{ }} default_type application/octet-stream; }}\n  }}\n}}\n",
            www.display()
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
        Nginx { child, port, conf: conf_path }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; SIGKILL of the master would orphan the workers.
        let _ = Command::new("kill").arg("-QUIT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

// ---- report ----

fn machine() -> String {
    let sh = |c: &str| {
        Command::new("sh").arg("-c").arg(c).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    };
    format!(
        "{} cores ({}), {} RAM, Linux {}; nginx {}, CNCF distribution {}; all on loopback, client in the same machine.",
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs"),
        sh("free -h | awk '/Mem:/{print $2}'"),
        sh("uname -r"),
        sh("nginx -v 2>&1 | cut -d/ -f2"),
        sh("docker-registry --version | awk '{print $3}'")
    )
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn report(rows: &[Row], secs: f64, image: &Image) -> String {
    let find =
        |w: &str, s: &str, case: &str, c: usize| rows.iter().find(|r| r.workload == w && r.server == s && r.case == case && r.conns == c);
    let mut md = String::new();
    let _ = writeln!(md, "Machine: {}\n", machine());
    let _ = writeln!(md, "Each cell runs {secs} s per server; servers take turns within a cell.\n");

    let _ = writeln!(md, "**1. Hot blobs** (GB/s; CPU = server CPU-seconds per GB served)\n");
    let _ = writeln!(md, "| blob | conns | berth GB/s | nginx GB/s | distribution GB/s | berth/nginx | berth/distribution | berth CPU/GB | nginx CPU/GB | distribution CPU/GB | CPU berth/nginx |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.workload == "1-blob" && r.server == "berth") {
        let (Some(n), Some(d)) = (find("1-blob", "nginx", &r.case, r.conns), find("1-blob", "distribution", &r.case, r.conns)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            r.case,
            r.conns,
            r.gbps,
            n.gbps,
            d.gbps,
            ratio(r.gbps, n.gbps),
            ratio(r.gbps, d.gbps),
            r.cpu_s_per_gb,
            n.cpu_s_per_gb,
            d.cpu_s_per_gb,
            ratio(r.cpu_s_per_gb, n.cpu_s_per_gb)
        );
    }

    let _ = writeln!(md, "\n**2. Manifests** at 64 connections (requests/s; p50/p99 in ms)\n");
    let _ = writeln!(md, "| request | berth req/s | nginx req/s | distribution req/s | berth/nginx | berth/distribution | berth p50/p99 | nginx p50/p99 | distribution p50/p99 |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.workload == "2-manifest" && r.server == "berth") {
        let (Some(n), Some(d)) = (find("2-manifest", "nginx", &r.case, r.conns), find("2-manifest", "distribution", &r.case, r.conns))
        else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.2}/{:.2} | {:.2}/{:.2} | {:.2}/{:.2} |",
            r.case,
            r.rps,
            n.rps,
            d.rps,
            ratio(r.rps, n.rps),
            ratio(r.rps, d.rps),
            r.p50_ms,
            r.p99_ms,
            n.p50_ms,
            n.p99_ms,
            d.p50_ms,
            d.p99_ms
        );
    }

    let _ = writeln!(md, "\n**3. Cold blob** pulled by N clients at once (berth mirror vs distribution proxy; same upstream)\n");
    let _ = writeln!(md, "| blob | N | berth upstream GETs | distribution upstream GETs | berth MiB from upstream | distribution MiB from upstream | berth first byte p50/max ms | distribution first byte p50/max ms | berth total ms | distribution total ms | total berth/distribution |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.workload == "3-cold" && r.server == "berth") {
        let Some(d) = find("3-cold", "distribution", &r.case, r.conns) else { continue };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0}/{:.0} | {:.0}/{:.0} | {:.0} | {:.0} | {} |",
            r.case,
            r.conns,
            r.upstream_gets,
            d.upstream_gets,
            r.upstream_mib,
            d.upstream_mib,
            r.ttfb_p50_ms,
            r.ttfb_max_ms,
            d.ttfb_p50_ms,
            d.ttfb_max_ms,
            r.secs * 1000.0,
            d.secs * 1000.0,
            ratio(r.secs, d.secs)
        );
    }

    let _ = writeln!(md, "\n**4. Push** with skopeo of a {} MiB image ({} layers)\n", image.total >> 20, image.layers.len());
    let _ = writeln!(md, "| berth s | distribution s | throughput berth/distribution | berth CPU s | distribution CPU s |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    if let (Some(b), Some(d)) = (
        rows.iter().find(|r| r.workload == "4-push" && r.server == "berth"),
        rows.iter().find(|r| r.workload == "4-push" && r.server == "distribution"),
    ) {
        let _ = writeln!(md, "| {:.2} | {:.2} | {} | {:.2} | {:.2} |", b.secs, d.secs, ratio(d.secs, b.secs), b.cpu_s, d.cpu_s);
    }

    let maxc = rows.iter().filter(|r| r.workload == "1-blob").map(|r| r.conns).max().unwrap_or(0);
    let _ = writeln!(
        md,
        "\n**5. Peak RSS** during the {maxc}-connection run of the {} MiB blob (MiB, whole process tree)\n",
        image.largest() >> 20
    );
    let _ = writeln!(md, "| berth | nginx | distribution |");
    let _ = writeln!(md, "|---:|---:|---:|");
    let case = format!("{} MiB", image.largest() >> 20);
    if let (Some(b), Some(n), Some(d)) =
        (find("1-blob", "berth", &case, maxc), find("1-blob", "nginx", &case, maxc), find("1-blob", "distribution", &case, maxc))
    {
        let _ = writeln!(md, "| {:.0} | {:.0} | {:.0} |", b.peak_rss_mib, n.peak_rss_mib, d.peak_rss_mib);
    }
    md
}
