#!/bin/sh
# Side-by-side benchmarks: berth vs nginx (sendfile) vs CNCF distribution 2.8, on loopback.
# Builds release, runs every workload, writes target/bench/hot.csv and target/bench/hot.md and
# prints the markdown. Knobs are environment variables, listed at the top of benches/hot/main.rs
# (e.g. BENCH_SECS=5, BENCH_SIZES_MIB=1,64, BENCH_ONLY=1,2).
# Needs: apt-get install docker-registry nginx skopeo
set -eu
cd "$(dirname "$0")/.."
cargo bench --bench hot "$@"
