//! Real clients against a hosted namespace: skopeo copies a multi-arch OCI index and a Docker
//! v2 image into berth and back with every digest unchanged, and the docker daemon pushes an
//! image, forgets it, pulls it back and runs it. Test images are built offline inside the tests.
//!
//! A missing client skips its test with a message, unless BERTH_REQUIRE_CLIENTS=1.

mod common;

use common::dockerd::{self, Dockerd};
use common::{cmd, digest, oci_layout, Berth};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const NAMESPACE: &str = "[[namespace]]\nprefix = \"team\"\n";
const CLIENT_LIMIT: Duration = Duration::from_secs(180);

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn skopeo(args: &[&str]) -> cmd::Output {
    let mut c = Command::new("skopeo");
    // The machine's signature policy and registry mirrors are not part of the test.
    c.arg("--insecure-policy").args(args).env("CONTAINERS_REGISTRIES_CONF", "/dev/null");
    dockerd::no_internet(&mut c);
    cmd::run(&mut c, CLIENT_LIMIT)
}

fn get(url: &str) -> reqwest::blocking::Response {
    reqwest::blocking::get(url).unwrap()
}

fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// Every blob file of an OCI layout (or skopeo `dir:`) directory, by digest.
fn blobs_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit()) {
            out.insert(format!("sha256:{name}"), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// A gzipped tar of `root`, reproducible.
fn tar_gz(root: &Path, out: &Path) -> Vec<u8> {
    let tar = out.with_extension("tar");
    cmd::run(
        Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
            .arg(root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        CLIENT_LIMIT,
    )
    .expect_ok();
    let gz = Command::new("gzip").args(["-n", "-c"]).arg(&tar).output().unwrap();
    assert!(gz.status.success());
    gz.stdout
}

#[test]
fn skopeo_copies_a_multi_arch_oci_index_into_berth_and_back() {
    if !oci_layout::require_runnable(&["skopeo"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = oci_layout::multi_arch(&work.path().join("src"), "1", "hosted");
    let berth = Berth::start(NAMESPACE);
    let dest = format!("docker://{}/team/multi:1", berth.host());

    skopeo(&["copy", "--all", "--preserve-digests", "--retry-times=0", "--dest-tls-verify=false", &layout.skopeo_ref(), &dest]).expect_ok();

    // berth serves the index exactly as skopeo pushed it, under the tag and by digest.
    let src_blobs = blobs_in(&layout.dir.join("blobs/sha256"));
    let r = get(&format!("{}/v2/team/multi/manifests/1", berth.url()));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), layout.index);
    assert_eq!(header(&r, "content-type"), oci_layout::OCI_INDEX);
    assert_eq!(r.bytes().unwrap().as_ref(), src_blobs[&layout.index].as_slice());
    for img in &layout.images {
        let r = get(&format!("{}/v2/team/multi/manifests/{}", berth.url(), img.manifest));
        assert_eq!(header(&r, "content-type"), oci_layout::OCI_MANIFEST);
        assert_eq!(r.bytes().unwrap().as_ref(), src_blobs[&img.manifest].as_slice());
        for b in img.blobs() {
            let r = get(&format!("{}/v2/team/multi/blobs/{b}", berth.url()));
            assert_eq!(r.status(), 200, "{b}");
            assert_eq!(r.bytes().unwrap().as_ref(), src_blobs[&b].as_slice(), "{b}");
        }
    }
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]).expect_ok();
    assert_eq!(raw.stdout.as_bytes(), src_blobs[&layout.index].as_slice());

    // And back out into a fresh layout: the same index digest and every blob byte for byte.
    let back = work.path().join("back");
    skopeo(&["copy", "--all", "--retry-times=0", "--src-tls-verify=false", &dest, &format!("oci:{}:1", back.display())]).expect_ok();
    let index: Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], layout.index);
    assert_eq!(index["manifests"][0]["mediaType"], oci_layout::OCI_INDEX);
    assert_eq!(blobs_in(&back.join("blobs/sha256")), src_blobs);

    // One platform by digest, as `docker pull --platform` would resolve it.
    let arm = layout.image("arm64");
    let by_digest = format!("docker://{}/team/multi@{}", berth.host(), arm.manifest);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &by_digest]).expect_ok();
    assert_eq!(digest(raw.stdout.as_bytes()), arm.manifest);
}

/// A skopeo `dir:` image holding a Docker v2 schema 2 manifest (an OCI layout cannot carry
/// Docker media types). Returns the manifest bytes.
fn docker_v2_dir(dir: &Path, scratch: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let root = scratch.join("rootfs");
    oci_layout::busybox_rootfs(&root, "docker-v2");
    let layer = tar_gz(&root, &scratch.join("layer"));
    let diff_id = {
        let tar = std::fs::read(scratch.join("layer.tar")).unwrap();
        digest(&tar)
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["cat", "/etc/marker"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": DOCKER_LAYER, "digest": digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    for blob in [&config, &layer] {
        std::fs::write(dir.join(digest(blob).trim_start_matches("sha256:")), blob).unwrap();
    }
    std::fs::write(dir.join("manifest.json"), &manifest).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    manifest
}

#[test]
fn skopeo_copies_a_docker_v2_image_into_berth_and_back() {
    if !oci_layout::require_runnable(&["skopeo"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let manifest = docker_v2_dir(&src, work.path());
    let berth = Berth::start(NAMESPACE);
    let dest = format!("docker://{}/team/docker/app:v2", berth.host());

    skopeo(&["copy", "--preserve-digests", "--retry-times=0", "--dest-tls-verify=false", &format!("dir:{}", src.display()), &dest])
        .expect_ok();

    let r = get(&format!("{}/v2/team/docker/app/manifests/v2", berth.url()));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), DOCKER_MANIFEST);
    assert_eq!(header(&r, "docker-content-digest"), digest(&manifest));
    assert_eq!(r.bytes().unwrap().as_ref(), manifest.as_slice());

    let back = work.path().join("back");
    skopeo(&["copy", "--retry-times=0", "--src-tls-verify=false", &dest, &format!("dir:{}", back.display())]).expect_ok();
    assert_eq!(std::fs::read(back.join("manifest.json")).unwrap(), manifest);
    assert_eq!(blobs_in(&back), blobs_in(&src));
    let inspect = skopeo(&["inspect", "--tls-verify=false", &dest]).expect_ok();
    let v: Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(v["Digest"], digest(&manifest));

    // Registry to registry, into a second repository of the namespace.
    let second = format!("docker://{}/team/docker/copy:v2", berth.host());
    skopeo(&["copy", "--preserve-digests", "--retry-times=0", "--src-tls-verify=false", "--dest-tls-verify=false", &dest, &second])
        .expect_ok();
    let r = get(&format!("{}/v2/team/docker/copy/manifests/v2", berth.url()));
    assert_eq!(header(&r, "docker-content-digest"), digest(&manifest));
    assert_eq!(r.bytes().unwrap().as_ref(), manifest.as_slice());
}

#[test]
fn docker_daemon_pushes_pulls_and_runs_a_hosted_image() {
    if !oci_layout::require_runnable(&["dockerd", "docker"]) {
        return;
    }
    let berth = Berth::start(NAMESPACE);
    let host = berth.host();
    let d = Dockerd::start_with(None, &[format!("--insecure-registry={host}")]);

    // The image: a root filesystem with the static busybox, imported offline.
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("rootfs");
    oci_layout::busybox_rootfs(&root, "pushed through berth");
    let tar = work.path().join("rootfs.tar");
    cmd::run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), CLIENT_LIMIT).expect_ok();
    let image = format!("{host}/team/app:1");
    d.docker(&["import", "--change", r#"CMD ["cat", "/etc/marker"]"#, &tar.display().to_string(), &image]).expect_ok();

    let push = d.docker(&["push", &image]).expect_ok();
    let pushed = push
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in push output:\n{}", push.stdout))
        .to_string();
    let r = get(&format!("{}/v2/team/app/manifests/1", berth.url()));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), pushed);
    assert_eq!(header(&r, "content-type"), DOCKER_MANIFEST);
    let manifest: Value = r.json().unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let r = reqwest::blocking::Client::new()
            .head(format!("{}/v2/team/app/blobs/{}", berth.url(), layer["digest"].as_str().unwrap()))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), layer["size"].to_string());
    }

    // Forget it locally, then pull it back from berth and run it.
    d.docker(&["rmi", &image]).expect_ok();
    assert!(!d.docker(&["image", "inspect", &image]).ok, "the image is gone before the pull");
    let pull = d.docker(&["pull", &image]).expect_ok();
    assert!(pull.stdout.contains(&pushed), "pulled a different digest:\n{}", pull.stdout);
    let run = d.docker(&["run", "--rm", "--network", "none", &image]).expect_ok();
    assert_eq!(run.stdout.trim(), "pushed through berth");
    let digests = d.docker(&["image", "inspect", "--format", "{{json .RepoDigests}}", &image]).expect_ok();
    assert!(digests.stdout.contains(&format!("{host}/team/app@{pushed}")), "{}", digests.stdout);

    // The same image under another repository of the namespace: the daemon mounts its layers
    // from team/app and the manifest is byte-identical, so the digest is too.
    let other = format!("{host}/team/other:2");
    d.docker(&["tag", &image, &other]).expect_ok();
    let push = d.docker(&["push", &other]).expect_ok();
    assert!(push.stdout.contains(&pushed), "{}", push.stdout);
    let r = get(&format!("{}/v2/team/other/manifests/2", berth.url()));
    assert_eq!(header(&r, "docker-content-digest"), pushed);
    let tags: Value = get(&format!("{}/v2/team/other/tags/list", berth.url())).json().unwrap();
    assert_eq!(tags["tags"], json!(["2"]));
}
