//! Floods at full size against one berth on loopback, with the listener's defaults: RSS before,
//! at the peak and after, and the latency of a legitimate client meanwhile. Not a test: it
//! measures and prints a markdown report (also target/bench/flood.md).
//!
//!     cargo bench --bench flood
//!
//! Floods (from 10 loopback addresses unless said, BENCH_FLOOD_CONNS connections in all, 1000
//! by default):
//!   1. slow heads: every connection sends a request line, then one 1 KiB header line every
//!      300 ms (a per-read timeout never fires; the head deadline does)
//!   2. idle connections: connect and send nothing
//!   3. large heads: 60 KiB of header lines at once, never finished
//!   4. slow heads, all from one address (the per-address cap answers most of them)
//!
//! A legitimate client on its own address sends `GET /v2/` on one kept-alive connection
//! throughout; its p50/p99 are reported per flood.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::env_or;
#[path = "hot/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .sum::<f64>()
        / 1024.0
}

async fn connect_from(ip: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(format!("{ip}:0").parse::<SocketAddr>().unwrap())?;
    s.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// One flooding connection until it is closed or `stop` is set.
async fn flood_one(kind: u8, ip: String, port: u16, stop: Arc<AtomicBool>) {
    let Ok(mut s) = connect_from(&ip, port).await else { return };
    let line = format!("X-Pad: {}\r\n", "p".repeat(1016));
    match kind {
        1 => {
            if s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n").await.is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if s.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
        2 => {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf)).await;
        }
        _ => {
            let head = format!("GET /v2/ HTTP/1.1\r\nHost: a\r\n{}", line.repeat(60));
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf)).await;
        }
    }
}

/// Sequential `GET /v2/` on one connection from its own address until `stop`: latencies.
async fn legit(port: u16, stop: Arc<AtomicBool>) -> (Vec<Duration>, usize) {
    let mut lat = Vec::new();
    let mut failures = 0;
    let mut conn: Option<tokio::net::TcpStream> = None;
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = async {
            if conn.is_none() {
                conn = Some(connect_from("127.0.0.250", port).await.ok()?);
            }
            let s = conn.as_mut()?;
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n").await.ok()?;
            let mut got = Vec::new();
            loop {
                let n = s.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"{}") {
                    return Some(());
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), ok).await {
            Ok(Some(())) => lat.push(t.elapsed()),
            _ => {
                failures += 1;
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (lat, failures)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let conns: usize = env_or("BENCH_FLOOD_CONNS", 1000);
    let secs: u64 = env_or("BENCH_FLOOD_SECS", 15);
    let out_dir = PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let b = common::Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let pids = procs::tree(&b.config_path.display().to_string());
    let mut md = String::new();
    let _ = writeln!(md, "{conns} connections per flood, {secs} s each, berth's default limits\n");
    let _ = writeln!(md, "| flood | RSS before MiB | peak MiB | after MiB | legitimate p50 ms | p99 ms | failed |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let floods = [
        (1u8, 10usize, "slow heads (1 KiB line / 300 ms)"),
        (2, 10, "idle connections"),
        (3, 10, "60 KiB unfinished heads"),
        (1, 1, "slow heads, all from one address"),
    ];
    for (kind, addrs, name) in floods {
        let before = rss_mib(&pids);
        procs::reset_peak(&pids);
        let stop = Arc::new(AtomicBool::new(false));
        let (lat, failures) = rt.block_on(async {
            let l = tokio::spawn(legit(b.port, stop.clone()));
            let floods: Vec<_> =
                (0..conns).map(|i| tokio::spawn(flood_one(kind, format!("127.0.1.{}", 1 + i % addrs), b.port, stop.clone()))).collect();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.store(true, Ordering::Relaxed);
            for f in floods {
                f.abort();
            }
            l.await.unwrap()
        });
        let peak = procs::peak_rss_mib(&pids);
        // Freed memory goes back on berth's next trim (every 10 s).
        std::thread::sleep(Duration::from_secs(12));
        let after = rss_mib(&pids);
        let mut lat = lat;
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        eprintln!("{name}: rss {before:.0} -> {peak:.0} -> {after:.0} MiB, legit p50 {p50:.2} ms p99 {p99:.2} ms, {failures} failed");
        let _ = writeln!(md, "| {name} | {before:.0} | {peak:.0} | {after:.0} | {p50:.2} | {p99:.2} | {failures} |");
    }
    let m = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap();
    let refused: f64 = m
        .lines()
        .filter(|l| l.starts_with("berth_connections_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let _ = writeln!(md, "\nConnections answered 503 at a cap during the run: {}.", refused.max(0.0) as u64);
    std::fs::write(out_dir.join("flood.md"), &md).unwrap();
    println!("{md}");
}
