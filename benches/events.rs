//! Push throughput with events on: two release `berth` binaries on this machine, one with no
//! webhook and no replication, one with three webhooks (receivers on loopback that answer 200)
//! and a replication rule to a CNCF distribution registry (`docker-registry`). Rounds alternate
//! between them; each round, BENCH_CLIENTS clients push BENCH_PUSHES small images each (a layer,
//! a config, a tagged manifest). Reports pushes per second per round and the ratio of the
//! medians. Target (from the issue): within 5% of none. Not a test: it measures, writes
//! target/bench/events.md and prints it.
//!
//!     cargo bench --bench events
//!
//! Knobs (environment): BENCH_CLIENTS (8), BENCH_PUSHES (25 per client per round),
//! BENCH_ROUNDS (4 per server), BENCH_OUT (target/bench).

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
    let rounds: usize = env_or("BENCH_ROUNDS", 4);
    let receivers: Vec<HttpServer> =
        (0..3).map(|_| HttpServer::start(Arc::new(|_| HttpResp::bytes(200, "text/plain", Vec::new())))).collect();
    let target = Registry::start(Options::default());
    let plain = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "a-secret-of-enough-length").unwrap();
    let mut extra = String::from("[[namespace]]\nprefix = \"team\"\n");
    for r in &receivers {
        let _ = write!(extra, "\n[[webhook]]\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\n", r.port, secret.display());
    }
    let _ = write!(extra, "\n[[replication]]\nnamespace = \"team\"\ntarget = \"{}\"\n", target.url());
    let evented = Berth::start_in(dir, &extra);

    let (mut none, mut with) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        none.push(push_round(&plain.url(), clients, pushes, round));
        with.push(push_round(&evented.url(), clients, pushes, round));
    }
    let mut md = String::new();
    let _ = writeln!(md, "Pushes per second, {clients} clients × {pushes} small images per round, rounds alternating:\n");
    let _ = writeln!(md, "| round | no events | 3 webhooks + 1 replication rule | ratio |");
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    for (i, (a, b)) in none.iter().zip(&with).enumerate() {
        let _ = writeln!(md, "| {} | {a:.0} | {b:.0} | {:.2} |", i + 1, b / a);
    }
    let (a, b) = (median(&mut none), median(&mut with));
    let _ = writeln!(md, "| median | {a:.0} | {b:.0} | {:.2} |", b / a);
    let _ = writeln!(md, "\nTarget: ratio ≥ 0.95 — {}.", if b / a >= 0.95 { "met" } else { "**missed**" });
    let out = std::path::PathBuf::from(env_or("BENCH_OUT", common::repo_root().join("target/bench").display().to_string()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("events.md"), &md).unwrap();
    println!("{md}");
}
