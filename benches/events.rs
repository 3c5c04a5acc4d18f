//! Push throughput with events on: two release `berth` binaries on this machine, one with no
//! webhook and no replication, one with three webhooks (receivers on loopback that answer 200)
//! and a replication rule to a CNCF distribution registry (`docker-registry`). Rounds alternate
//! between them; each round, BENCH_CLIENTS clients push BENCH_PUSHES small images each (a layer,
//! a config, a tagged manifest). Reports pushes per second per round and the median of the
//! rounds' ratios. Target (from the issue): within 5% of none. Not a test: it measures, writes
//! target/bench/events.md and prints it.
//!
//! Deliveries run while the pushes do. After each round with events the benchmark waits until
//! every webhook and the replication rule has every event of the round, and reports how long
//! that took after the last push (the delivery lag), so one round's deliveries never run in
//! the next round's time. The replication target stands in for another site, so it runs at
//! nice 19 with its storage in memory: on a machine of its own it would take neither this
//! machine's CPU nor its disk. The webhook receivers' threads run at nice 19 for the same
//! reason.
//!
//!     cargo bench --bench events
//!
//! Knobs (environment): BENCH_CLIENTS (8), BENCH_PUSHES (25 per client per round),
//! BENCH_ROUNDS (32 per server), BENCH_HOOKS (3), BENCH_REPLICATE (1 rule; 0 for none),
//! BENCH_OUT (target/bench).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/util.rs"]
#[allow(dead_code)]
mod util;
use util::env_or;

use common::distribution::{HttpResp, HttpServer, Options, Registry};
use common::{digest, Berth};
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

fn push_round(base: &str, clients: usize, pushes: usize, round: usize) -> f64 {
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let base = base.to_string();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                for i in 0..pushes {
                    let repo = format!("team/app{c}");
                    let layer = format!("round {round} client {c} push {i}").into_bytes();
                    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]}})
                        .to_string()
                        .into_bytes();
                    for b in [&layer, &config] {
                        let r = http.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={}", digest(b))).body(b.clone()).send().unwrap();
                        assert_eq!(r.status(), 201);
                    }
                    let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
                        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&layer), "size": layer.len()}]});
                    let r = http
                        .put(format!("{base}/v2/{repo}/manifests/v{round}.{i}"))
                        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        .body(serde_json::to_vec(&m).unwrap())
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    (clients * pushes) as f64 / t.elapsed().as_secs_f64()
}

/// A webhook receiver's answer. Receivers stand in for other machines, so the thread serving
/// a connection runs at nice 19 and does not take the CPU from what is measured.
fn receive() -> HttpResp {
    // SAFETY: setpriority only reads its arguments; the calling thread's id names that thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    HttpResp::bytes(200, "text/plain", Vec::new())
}

/// A sample's value in a Prometheus text exposition (0 if absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs bench targets; this one only measures
        // under `cargo bench`.
        return;
    }
    let clients: usize = env_or("BENCH_CLIENTS", 8);
    let pushes: usize = env_or("BENCH_PUSHES", 25);
    let rounds: usize = env_or("BENCH_ROUNDS", 32);
    let hooks: usize = env_or("BENCH_HOOKS", 3);
    let replicate: usize = env_or("BENCH_REPLICATE", 1);
    let receivers: Vec<HttpServer> = (0..hooks).map(|_| HttpServer::start(Arc::new(|_| receive()))).collect();
    let target = Registry::start(Options { remote: true, ..Options::default() });
    let plain = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "a-secret-of-enough-length").unwrap();
    let mut extra = String::from("[[namespace]]\nprefix = \"team\"\n");
    for r in &receivers {
        let _ = write!(extra, "\n[[webhook]]\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\n", r.port, secret.display());
    }
    if replicate > 0 {
        let _ = write!(extra, "\n[[replication]]\nnamespace = \"team\"\ntarget = \"{}\"\n", target.url());
    }
    let evented = Berth::start_in(dir, &extra);

    let (mut none, mut with, mut lags) = (Vec::new(), Vec::new(), Vec::new());
    let http = reqwest::blocking::Client::new();
    for round in 0..rounds {
        // Which server goes first alternates, so a machine getting faster or slower over a
        // pair of rounds favours neither.
        let (a, b) = if round % 2 == 0 {
            let a = push_round(&plain.url(), clients, pushes, round);
            (a, push_round(&evented.url(), clients, pushes, round))
        } else {
            let b = push_round(&evented.url(), clients, pushes, round);
            (push_round(&plain.url(), clients, pushes, round), b)
        };
        none.push(a);
        with.push(b);
        let done = Instant::now();
        let want = ((round + 1) * clients * pushes) as u64;
        let drained = common::eventually(std::time::Duration::from_secs(300), || {
            let m = http.get(format!("{}/metrics", evented.admin_url())).send().and_then(|r| r.text()).unwrap_or_default();
            metric(&m, "berth_webhook_delivered_total") >= want * hooks as u64
                && metric(&m, "berth_replication_total{result=\"ok\"}") >= want * replicate.min(1) as u64
        });
        assert!(drained, "deliveries of round {round} did not finish within 300 s");
        lags.push(done.elapsed().as_secs_f64());
    }
    let what = format!("{hooks} webhooks + {replicate} replication rule");
    let mut md = String::new();
    let _ = writeln!(md, "Pushes per second, {clients} clients × {pushes} small images per round, rounds alternating:\n");
    let _ = writeln!(md, "| round | no events | {what} | ratio | deliveries done after the last push |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    for (i, ((a, b), l)) in none.iter().zip(&with).zip(&lags).enumerate() {
        let _ = writeln!(md, "| {} | {a:.0} | {b:.0} | {:.2} | {l:.2} s |", i + 1, b / a);
    }
    let mut ratios: Vec<f64> = none.iter().zip(&with).map(|(a, b)| b / a).collect();
    let (a, b, r, l) = (median(&mut none), median(&mut with), median(&mut ratios), median(&mut lags));
    let _ = writeln!(md, "| median | {a:.0} | {b:.0} | {r:.2} | {l:.2} s |");
    let _ = writeln!(
        md,
        "\nThe ratio is the median of the rounds' ratios (each round's two servers ran back to back). Target: ≥ 0.95 — {}.",
        if r >= 0.95 { "met" } else { "**missed**" }
    );
    let out = std::path::PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("events.md"), &md).unwrap();
    println!("{md}");
}
