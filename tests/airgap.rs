//! Air-gapped sites: `berth export` writes images from a berth's store (every platform, with
//! their signatures) as an OCI image layout tar; `berth import` loads it into another berth
//! whose upstream is never contacted, every digest verified, and real clients pull from there.
//!
//! A missing client skips the client test with a message, unless BERTH_REQUIRE_CLIENTS=1.

mod common;

use common::dockerd::{self, Dockerd};
use common::fake::Fake;
use common::{cmd, digest, oci_layout, Berth};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn berth(args: &[&str]) -> cmd::Output {
    cmd::run(Command::new(env!("CARGO_BIN_EXE_berth")).args(args), LIMIT)
}

fn skopeo(args: &[&str]) -> cmd::Output {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy").args(args).env("CONTAINERS_REGISTRIES_CONF", "/dev/null");
    dockerd::no_internet(&mut c);
    cmd::run(&mut c, LIMIT)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every blob of an OCI layout directory, by digest.
fn blobs_in(layout: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| (format!("sha256:{}", e.file_name().to_string_lossy()), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// A berth whose only upstream, docker.io, is offline (and its URL a closed port), with a hosted
/// namespace `team`. Written, not started, so bundles can be imported first.
fn offline_berth() -> Berth {
    let dir = tempfile::tempdir().unwrap();
    let dead = common::free_port();
    let extra = format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:{dead}\"\ndefault = true\noffline = true\n\n[[namespace]]\nprefix = \"team\"\n"
    );
    let (config_path, port, admin_port) = Berth::write_config(dir.path(), "", "", &extra);
    Berth { child: None, port, admin_port, config_path, log_path: dir.path().join("berth.log"), dir }
}

fn mirror_of(hub: &Fake) -> Berth {
    Berth::start(&format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", hub.url()))
}

fn get(url: &str, accept: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new().get(url).header("Accept", accept).send().unwrap()
}

/// Waits until berth has stored a blob it served (a fill is committed as it ends, which may be
/// just after the client has the last byte).
fn wait_cached(b: &Berth, repo: &str, d: &str) {
    let url = format!("{}/v2/{repo}/blobs/{d}", b.url());
    let hit = || {
        let r = reqwest::blocking::Client::new().head(&url).send().unwrap();
        r.headers().get("x-berth-cache").is_some_and(|v| v == "hit")
    };
    assert!(common::eventually(Duration::from_secs(30), hit), "{d} was not stored");
}

/// Fetches a manifest and its blobs through a mirror, so the berth caches them.
fn fetch_through(b: &Berth, repo: &str, reference: &str) -> Vec<u8> {
    let r = get(&format!("{}/v2/{repo}/manifests/{reference}", b.url()), &format!("{OCI_INDEX}, {OCI_MANIFEST}"));
    assert_eq!(r.status(), 200, "{reference}");
    let bytes = r.bytes().unwrap().to_vec();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    for d in
        v["config"]["digest"].as_str().into_iter().chain(v["layers"].as_array().into_iter().flatten().filter_map(|l| l["digest"].as_str()))
    {
        let r = get(&format!("{}/v2/{repo}/blobs/{d}", b.url()), "*/*");
        assert_eq!(r.status(), 200, "{d}");
        wait_cached(b, repo, d);
    }
    bytes
}

#[test]
fn an_exported_multi_arch_image_is_pulled_by_docker_and_skopeo_from_an_offline_berth() {
    if !oci_layout::require_runnable(&["skopeo", "dockerd", "docker"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = oci_layout::multi_arch(&work.path().join("layout"), "latest", "air-gapped");
    let source = blobs_in(&layout.dir);

    // The upstream: the image, a signature referring to it (OCI 1.1 subject) and a cosign
    // signature under its tag scheme.
    let hub = Fake::start();
    for bytes in source.values() {
        hub.add_blob(bytes);
    }
    hub.add_manifest("library/busybox", Some("latest"), OCI_INDEX, &source[&layout.index]);
    for img in &layout.images {
        hub.add_manifest("library/busybox", None, OCI_MANIFEST, &source[&img.manifest]);
    }
    let empty = hub.add_blob(b"{}");
    let signature = |payload: &[u8], subject: bool| {
        let layer = hub.add_blob(payload);
        let mut m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": layer, "size": payload.len()}],
        });
        if subject {
            m["subject"] = json!({"mediaType": OCI_INDEX, "digest": layout.index, "size": source[&layout.index].len()});
        }
        serde_json::to_vec(&m).unwrap()
    };
    let referrer = signature(b"a signature with a subject", true);
    let referrer_digest = hub.add_manifest("library/busybox", None, OCI_MANIFEST, &referrer);
    let cosign_tag = format!("sha256-{}.sig", layout.index.trim_start_matches("sha256:"));
    let cosign = signature(b"a signature under cosign's tag", false);
    hub.add_manifest("library/busybox", Some(&cosign_tag), OCI_MANIFEST, &cosign);

    // The connected berth caches every platform and both signatures.
    let mut online = mirror_of(&hub);
    let pulled = work.path().join("pulled");
    let src = format!("docker://{}/library/busybox:latest", online.host());
    skopeo(&["copy", "--all", "--retry-times=0", "--src-tls-verify=false", &src, &format!("oci:{}:latest", path(&pulled))]).expect_ok();
    for img in &layout.images {
        for d in img.blobs() {
            wait_cached(&online, "library/busybox", &d);
        }
    }
    fetch_through(&online, "library/busybox", &referrer_digest);
    fetch_through(&online, "library/busybox", &cosign_tag);
    online.kill();

    let bundle = work.path().join("bundle.tar");
    let config = path(&online.config_path).to_string();
    let out = berth(&["export", "--config", &config, "docker.io/library/busybox:latest", "-o", path(&bundle)]).expect_ok();
    assert!(out.stdout.contains("3 entries, 5 manifests"), "{}", out.stdout);
    // A valid OCI layout: skopeo finds the image by its entry's name, byte for byte.
    let raw = skopeo(&["inspect", "--raw", &format!("oci-archive:{}:docker.io/library/busybox:latest", path(&bundle))]).expect_ok();
    assert_eq!(raw.stdout.as_bytes(), source[&layout.index].as_slice());

    // The air-gapped berth: into the offline upstream's cache, and into the hosted namespace.
    let mut air = offline_berth();
    let config = path(&air.config_path).to_string();
    berth(&["import", "--config", &config, path(&bundle)]).expect_ok();
    berth(&["import", "--config", &config, path(&bundle), "--to", "team"]).expect_ok();
    air.spawn();
    let hub_requests = hub.state.lock().unwrap().counts.values().sum::<usize>();

    // The docker daemon pulls it through the offline mirror and runs it.
    let d = Dockerd::start(Some(&air.url()));
    d.docker(&["pull", "busybox"]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", "busybox"]).expect_ok();
    assert_eq!(run.stdout.trim(), "linux/amd64 air-gapped");
    let digests = d.docker(&["image", "inspect", "--format", "{{json .RepoDigests}}", "busybox"]).expect_ok();
    assert!(digests.stdout.contains(&layout.index), "{}", digests.stdout);

    // skopeo copies every platform back out, byte-exact.
    let back = work.path().join("back");
    let src = format!("docker://{}/library/busybox:latest", air.host());
    skopeo(&["copy", "--all", "--retry-times=0", "--src-tls-verify=false", &src, &format!("oci:{}:latest", path(&back))]).expect_ok();
    let back = blobs_in(&back);
    for (d, bytes) in &source {
        assert_eq!(back.get(d), Some(bytes), "{d} came back as it went in");
    }

    // The signatures came along: the referrer by the referrers API, cosign's by its tag.
    let r = get(&format!("{}/v2/library/busybox/referrers/{}", air.url(), layout.index), OCI_INDEX);
    let list: serde_json::Value = r.json().unwrap();
    assert_eq!(list["manifests"][0]["digest"], referrer_digest);
    let r = get(&format!("{}/v2/library/busybox/manifests/{cosign_tag}", air.url()), OCI_MANIFEST);
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), cosign.as_slice());
    // And the hosted copy.
    let r = get(&format!("{}/v2/team/docker.io/library/busybox/manifests/latest", air.url()), OCI_INDEX);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), layout.index);
    assert_eq!(hub.state.lock().unwrap().counts.values().sum::<usize>(), hub_requests, "nothing asked the upstream");
}

#[test]
fn a_tampered_bundle_is_refused_and_stores_nothing() {
    let hub = Fake::start();
    // Past what import reads whole: this layer streams.
    let layer = common::random_bytes(6 << 20, 7);
    let (md, _, ld) = hub.add_image("library/app", "1", &layer);
    let mut online = mirror_of(&hub);
    fetch_through(&online, "library/app", "1");
    // The store is taken while berth runs.
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle.tar");
    let config = path(&online.config_path).to_string();
    let out = berth(&["export", "--config", &config, "docker.io/library/app:1", "-o", path(&bundle)]);
    assert!(!out.ok && out.stderr.contains("berth is running"), "{}", out.stderr);
    online.kill();
    berth(&["export", "--config", &config, "docker.io/library/app:1", "-o", path(&bundle)]).expect_ok();
    let out = berth(&["export", "--config", &config, "docker.io/library/nothing:1", "-o", path(&work.path().join("x.tar"))]);
    assert!(!out.ok && out.stderr.contains("not in the store"), "{}", out.stderr);

    // One byte of the layer flipped.
    let good = std::fs::read(&bundle).unwrap();
    let at = tar::Archive::new(&good[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_string_lossy().ends_with(ld.trim_start_matches("sha256:")))
        .map(|e| e.raw_file_position() as usize)
        .unwrap();
    let mut bad = good.clone();
    bad[at + (1 << 20)] ^= 0x01;
    let tampered = work.path().join("tampered.tar");
    std::fs::write(&tampered, &bad).unwrap();

    let mut air = offline_berth();
    let config = path(&air.config_path).to_string();
    let out = berth(&["import", "--config", &config, path(&tampered)]);
    assert!(!out.ok, "a tampered bundle was imported");
    assert!(out.stderr.contains(ld.trim_start_matches("sha256:")) && out.stderr.contains("nothing was imported"), "{}", out.stderr);
    assert!(air.stored_blobs().is_empty(), "{:?}", air.stored_blobs());
    air.spawn();
    let r = get(&format!("{}/v2/library/app/manifests/1", air.url()), OCI_MANIFEST);
    assert_eq!(r.status(), 503, "nothing cached, and the upstream is offline");
    let out = berth(&["import", "--config", &config, path(&bundle)]);
    assert!(!out.ok && out.stderr.contains("berth is running"), "{}", out.stderr);

    // The good bundle, with berth stopped.
    air.kill();
    berth(&["import", "--config", &config, path(&bundle)]).expect_ok();
    air.spawn();
    let r = get(&format!("{}/v2/library/app/manifests/1", air.url()), OCI_MANIFEST);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), md);
    let r = get(&format!("{}/v2/library/app/blobs/{ld}", air.url()), "*/*");
    assert_eq!(digest(&r.bytes().unwrap()), ld);
}
