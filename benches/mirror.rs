//! Cold and warm pulls of one large blob through berth and through CNCF distribution 2.8 in
//! proxy mode (`proxy.remoteurl`), side by side against the same upstream (a plain distribution
//! registry on loopback), by 1, 16 and 64 concurrent clients. Not a test: it measures and prints
//! a markdown table.
//!
//!     cargo bench --bench mirror
//!
//! Knobs (environment): BENCH_BLOB_MIB (64), BENCH_CLIENTS ("1,16,64"), BENCH_UPSTREAM_MIBPS
//! (unset: loopback speed; a number: every byte from the upstream to either peer goes through
//! one shared link of that many MiB/s, like a site's uplink).
//!
//! Each round pushes a fresh random blob to the upstream so both peers start cold; the
//! upstream's access log says how many GETs and bytes each peer cost it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::{env_list, env_or, seed, Rng};

use common::distribution::{Options, Registry};
use futures::StreamExt;
use sha2::Digest as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Round {
    peer: &'static str,
    clients: usize,
    phase: &'static str,
    upstream_gets: usize,
    upstream_bytes: u64,
    ttfb: Vec<Duration>,
    total: Duration,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one only runs under `cargo bench`.
    }
    for tool in ["docker-registry"] {
        if !common::have(tool) {
            eprintln!("mirror bench needs {tool}");
            std::process::exit(1);
        }
    }
    let size = env_or("BENCH_BLOB_MIB", 64usize) << 20;
    let clients = env_list("BENCH_CLIENTS", "1,16,64");
    let mibps: Option<f64> = std::env::var("BENCH_UPSTREAM_MIBPS").ok().and_then(|v| v.parse().ok());

    // Clients and servers share the machine: other work running at the same time shows here.
    let load_at_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("").to_string();
    let upstream = Registry::start(Options::default());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // The address both peers fetch from: the upstream itself, or a shared throttled link to it.
    let origin = match mibps {
        Some(r) => format!("http://127.0.0.1:{}", rt.block_on(throttle::start(upstream.port, r))),
        None => upstream.url(),
    };
    let berth = common::Berth::start(&format!("[[upstream]]\nname = \"origin\"\nurl = \"{origin}\"\ndefault = true\n"));
    let proxy = Registry::start(Options { proxy: Some(origin.clone()), ..Default::default() });

    let mut rounds = Vec::new();
    for &n in &clients {
        let repo = format!("bench/c{n}");
        let blob = random_blob(size);
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
        common::distribution::push_blob(&upstream.url(), &repo, &digest, blob);
        let path = format!("/v2/{repo}/blobs/{digest}");
        for (peer, base) in [("berth", berth.url()), ("distribution 2.8 proxy", proxy.url())] {
            for phase in ["cold", "warm"] {
                let before = upstream.access().len();
                let started = Instant::now();
                let ttfb = rt.block_on(pull(&format!("{base}{path}"), &digest, n, size as u64));
                let total = started.elapsed();
                // distribution keeps filling its cache after its clients finish; let it settle so
                // the next phase starts from what it stored.
                let log = upstream.settle(before);
                let gets: Vec<_> = log.iter().filter(|a| a.method == "GET" && a.path == path).collect();
                rounds.push(Round {
                    peer,
                    clients: n,
                    phase,
                    upstream_gets: gets.len(),
                    upstream_bytes: gets.iter().map(|a| a.bytes).sum(),
                    ttfb,
                    total,
                });
                eprintln!("{peer} {phase} x{n}: {total:?}");
            }
        }
    }
    print_report(&rounds, size, mibps, &load_at_start);
}

fn random_blob(size: usize) -> Vec<u8> {
    // Distinct per round and incompressible enough.
    let mut v = vec![0u8; size];
    Rng(seed()).fill(&mut v);
    v
}

/// `n` clients GET `url` at once; each body must hash to `digest`. Returns each client's time
/// to first body byte.
async fn pull(url: &str, digest: &str, n: usize, size: u64) -> Vec<Duration> {
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (url, digest, go) = (url.to_string(), digest.to_string(), go.clone());
            tokio::spawn(async move {
                // One client each, as separate machines would be: no shared connection pool.
                let c = reqwest::Client::builder().timeout(Duration::from_secs(600)).build().unwrap();
                go.wait().await;
                let t0 = Instant::now();
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{url}");
                let mut body = r.bytes_stream();
                let mut h = sha2::Sha256::new();
                let mut first = None;
                let mut got = 0u64;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.unwrap();
                    if first.is_none() && !chunk.is_empty() {
                        first = Some(t0.elapsed());
                    }
                    got += chunk.len() as u64;
                    h.update(&chunk);
                }
                assert_eq!(got, size);
                assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest, "body verifies");
                first.unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn print_report(rounds: &[Round], size: usize, mibps: Option<f64>, load_at_start: &str) {
    let sh = |c: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "Blob: {} MiB, random. Upstream: CNCF distribution {} (filesystem storage) on loopback, {}.",
        size >> 20,
        sh("docker-registry --version | awk '{print $3}'"),
        match mibps {
            Some(r) => format!("reached through one shared link throttled to {r} MiB/s"),
            None => "unthrottled".to_string(),
        }
    );
    println!(
        "Machine: {} cores ({}), {} RAM, Linux {}; load average {} at the start, {} at the end.\n",
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh("free -h | awk '/Mem:/{print $2}'"),
        sh("uname -r"),
        load_at_start,
        sh("cut -d' ' -f1 /proc/loadavg")
    );
    println!("| peer | pull | clients | upstream GETs | bytes from upstream | first byte p50 / max (ms) | all clients done (ms) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rounds {
        let mut t = r.ttfb.clone();
        t.sort();
        println!(
            "| {} | {} | {} | {} | {:.0} MiB | {} / {} | {} |",
            r.peer,
            r.phase,
            r.clients,
            r.upstream_gets,
            r.upstream_bytes as f64 / (1 << 20) as f64,
            ms(t[t.len() / 2]),
            ms(*t.last().unwrap()),
            ms(r.total)
        );
    }
}

/// A TCP relay whose upstream-to-client direction, summed over all connections, is limited to
/// a rate: the shared uplink a mirror sits behind.
mod throttle {
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Mutex;
    use tokio::time::Instant;

    struct Bucket {
        next_free: Instant,
        bytes_per_sec: f64,
    }

    pub async fn start(upstream_port: u16, mibps: f64) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let bucket = Arc::new(Mutex::new(Bucket { next_free: Instant::now(), bytes_per_sec: mibps * 1048576.0 }));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else { continue };
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let req = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Reserve this chunk's slot on the shared link, then wait for it. Waits
                        // shorter than a few timer ticks are skipped (the debt carries over in
                        // `next_free`): sleeping a millisecond per chunk would cap one stream
                        // far below the rate.
                        let at = {
                            let mut b = bucket.lock().await;
                            let now = Instant::now();
                            let start = b.next_free.max(now);
                            b.next_free = start + Duration::from_secs_f64(n as f64 / b.bytes_per_sec);
                            b.next_free
                        };
                        if at > Instant::now() + Duration::from_millis(5) {
                            tokio::time::sleep_until(at).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                    req.abort();
                });
            }
        });
        port
    }
}
