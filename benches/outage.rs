//! Pulls of a cached tag past its TTL while the upstream is down (connections reset) or hung
//! (connections accepted, never answered), through berth and through CNCF distribution 2.8 in
//! proxy mode, side by side against the same upstream (a plain distribution registry behind a
//! switch that this benchmark turns from up to hung to down). Not a test: it measures and
//! prints a markdown table (also written to target/bench/outage.md).
//!
//!     cargo bench --bench outage
//!
//! Knobs: BENCH_SECS (5, per scenario and peer), BENCH_CLIENTS (32), BENCH_OUT (target/bench).
//! Needs: docker-registry.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::env_or;

use common::distribution::{push_blob, Options, Registry};
use common::Berth;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const UP: u8 = 0;
const DOWN: u8 = 1;
const HUNG: u8 = 2;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A TCP front for the upstream: forwards, resets every connection, or holds them unanswered.
/// Leaving "up" also cuts the connections it was forwarding, so a kept-alive connection does
/// not outlive the outage.
async fn switch(upstream: u16, mode: Arc<AtomicU8>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else { continue };
            match mode.load(Ordering::SeqCst) {
                UP => {
                    let mode = mode.clone();
                    tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                            let cut = async {
                                while mode.load(Ordering::SeqCst) == UP {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut sock, &mut up) => {}
                                _ = cut => {}
                            }
                        }
                    });
                }
                DOWN => drop(sock),
                _ => {
                    // Hung: keep the connection open and silent until the run ends.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(sock);
                    });
                }
            }
        }
    });
    port
}

struct Row {
    scenario: &'static str,
    peer: &'static str,
    done: usize,
    ok: usize,
    lat: Vec<Duration>,
    secs: f64,
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
}

/// `clients` loops of sequential GETs for `secs`; requests still running at the end finish
/// (or time out after 15 s) and count.
async fn load(url: String, clients: usize, secs: f64) -> (usize, usize, Vec<Duration>) {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(15)).pool_max_idle_per_host(clients).build().unwrap();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let ok = match c.get(&url).header("Accept", OCI_MANIFEST).send().await {
                        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    out.push((t.elapsed(), ok));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let ok = all.iter().filter(|(_, ok)| *ok).count();
    let mut lat: Vec<Duration> = all.iter().map(|(d, _)| *d).collect();
    lat.sort();
    (all.len(), ok, lat)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::have("docker-registry") {
        eprintln!("the outage bench needs docker-registry");
        std::process::exit(1);
    }
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    let clients: usize = env_or("BENCH_CLIENTS", 32usize);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let upstream = Registry::start(Options::default());
    let layer = b"one layer of the image pulled during the outage".to_vec();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let (ld, cd) = (common::digest(&layer), common::digest(&config));
    push_blob(&upstream.url(), "library/app", &ld, layer.clone());
    push_blob(&upstream.url(), "library/app", &cd, config.clone());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/v2/library/app/manifests/1", upstream.url()))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);

    let mode = Arc::new(AtomicU8::new(UP));
    let front = rt.block_on(switch(upstream.port, mode.clone()));
    let front_url = format!("http://127.0.0.1:{front}");
    let berth = Berth::start(&format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{front_url}\"\ndefault = true\ntag_ttl = \"1s\"\nwatch_window = \"0s\"\n"
    ));
    let dist = Registry::start(Options { proxy: Some(front_url.clone()), ..Default::default() });
    let peers = [
        ("berth", format!("{}/v2/library/app/manifests/1", berth.url())),
        ("distribution", format!("{}/v2/library/app/manifests/1", dist.url())),
    ];
    for (name, url) in &peers {
        let r = reqwest::blocking::Client::new().get(url).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(r.status(), 200, "{name} caches the tag while the upstream is up");
    }
    let cached = Instant::now();
    while cached.elapsed() < Duration::from_millis(1200) {
        // Past berth's tag_ttl of 1 s, so every pull below is a revalidation.
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut rows = Vec::new();
    for (scenario, m) in [("hung (never answers)", HUNG), ("down (connections reset)", DOWN)] {
        mode.store(m, Ordering::SeqCst);
        for (peer, url) in &peers {
            let t = Instant::now();
            let (done, ok, lat) = rt.block_on(load(url.clone(), clients, secs));
            rows.push(Row { scenario, peer, done, ok, lat, secs: t.elapsed().as_secs_f64() });
            eprintln!("{scenario} {peer}: {done} pulls, {ok} ok");
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cached tag past its TTL, {clients} clients pulling for {secs} s per row; the upstream is up when the tag is cached, then hung, then down.\n"
    );
    let _ = writeln!(out, "| upstream | peer | pulls | answered 200 | p50 ms | p99 ms | max ms | wall s |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.scenario,
            r.peer,
            r.done,
            r.ok,
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            r.lat.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
            r.secs
        );
    }
    println!("{out}");
    let dir = std::path::PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench".into()));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("outage.md"), &out);
    rt.shutdown_background();
}
