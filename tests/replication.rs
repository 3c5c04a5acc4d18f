//! Push replication to a CNCF distribution registry (`docker-registry`) on loopback, with Basic
//! auth: pushes matching a rule arrive byte-exact (skopeo reads the same digests from the
//! target), others do not; a target that is down catches up when it returns, across a kill -9
//! of berth (the copies are driven by the events outbox); deletes follow
//! with `delete = true`; `berth replicate` copies what was there before the rule.

mod common;

use common::distribution::{Options, Registry, REGISTRY_BIN};
use common::{digest, eventually, Berth};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const USER: &str = "robot";
const PASSWORD: &str = "robot-password";

fn have_tools() -> bool {
    let ok = [REGISTRY_BIN, "skopeo"].iter().all(|b| Command::new(b).arg("--version").output().is_ok());
    if !ok && std::env::var("BERTH_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("docker-registry and skopeo are required (BERTH_REQUIRE_CLIENTS=1)");
    }
    ok
}

fn blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> Value {
    let d = digest(data);
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap();
    assert_eq!(r.status(), 201);
    json!({"digest": d, "size": data.len()})
}

fn manifest(c: &Client, base: &str, repo: &str, reference: &str, media_type: &str, body: &Value) -> String {
    let bytes = serde_json::to_vec(body).unwrap();
    let r = c.put(format!("{base}/v2/{repo}/manifests/{reference}")).header("Content-Type", media_type).body(bytes.clone()).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    digest(&bytes)
}

/// A two-platform index under `tag`, with layers shared by every image `seed` names alike.
fn push_index(c: &Client, base: &str, repo: &str, tag: &str, seed: &str) -> String {
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layer = blob(c, base, repo, format!("{seed} layer {arch} ").repeat(2000).as_bytes());
        let config = blob(
            c,
            base,
            repo,
            json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}})
                .to_string()
                .as_bytes(),
        );
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config["digest"], "size": config["size"]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer["digest"], "size": layer["size"]}]});
        let bytes = serde_json::to_vec(&m).unwrap();
        let d = manifest(c, base, repo, &digest(&bytes), OCI_MANIFEST, &m);
        entries
            .push(json!({"mediaType": OCI_MANIFEST, "digest": d, "size": bytes.len(), "platform": {"os": "linux", "architecture": arch}}));
    }
    manifest(c, base, repo, tag, OCI_INDEX, &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
}

/// The digest of `repo:tag` at the target as skopeo reads it (None if it is not there).
fn skopeo_digest(target: &Registry, repo_tag: &str) -> Option<String> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--retry-times=0", &format!("--creds={USER}:{PASSWORD}")])
        .arg(format!("docker://{}/{repo_tag}", target.host()))
        .output()
        .unwrap();
    out.status.success().then(|| digest(&out.stdout))
}

fn start_berth(target_url: &str, extra: &str) -> Berth {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("target.pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    Berth::start_in(
        dir,
        &format!(
            "[[namespace]]\nprefix = \"team\"\n\n[[replication]]\nnamespace = \"team\"\ntarget = \"{target_url}\"\nprefix = \"mirror/team\"\ntags = [\"v*\"]\nusername = \"{USER}\"\npassword_file = \"{}\"\n{extra}",
            pw.display()
        ),
    )
}

#[test]
fn pushes_arrive_at_the_target_byte_exact_and_a_target_that_was_down_catches_up() {
    if !have_tools() {
        return;
    }
    // The target is down when the first push arrives: nothing listens on its port yet.
    let port = common::free_port();
    let mut b = start_berth(&format!("http://127.0.0.1:{port}"), "delete = true\n");
    let c = Client::new();
    let v1 = push_index(&c, &b.url(), "team/app", "v1", "one");
    let dev = push_index(&c, &b.url(), "team/app", "dev", "two");
    // Killed meanwhile: what a push was acknowledged for is in the outbox, not in memory.
    b.kill();
    b.restart();
    let target = Registry::start(Options { htpasswd: Some((USER.into(), PASSWORD.into())), port: Some(port), ..Default::default() });
    assert!(
        eventually(Duration::from_secs(60), || skopeo_digest(&target, "mirror/team/app:v1").is_some()),
        "v1 never reached the target after it came back"
    );
    assert_eq!(skopeo_digest(&target, "mirror/team/app:v1").as_deref(), Some(v1.as_str()), "the index arrived byte-exact");
    // Every platform's manifest is there under its digest: a pull of any platform works.
    let index: Value =
        serde_json::from_slice(&c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap().bytes().unwrap()).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let d = m["digest"].as_str().unwrap();
        assert_eq!(skopeo_digest(&target, &format!("mirror/team/app@{d}")).as_deref(), Some(d));
    }

    // Pushed while the target is up: there within a bounded wait; a tag no rule matches never.
    let v2 = push_index(&c, &b.url(), "team/app", "v2", "three");
    assert!(eventually(Duration::from_secs(30), || skopeo_digest(&target, "mirror/team/app:v2").as_deref() == Some(v2.as_str())));
    assert_eq!(skopeo_digest(&target, "mirror/team/app:dev"), None, "dev matches no rule: {dev}");

    // A manifest deleted in berth goes from the target too (delete = true).
    let r = c.delete(format!("{}/v2/team/app/manifests/{v2}", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    assert!(eventually(Duration::from_secs(30), || skopeo_digest(&target, &format!("mirror/team/app@{v2}")).is_none()));
    assert!(skopeo_digest(&target, "mirror/team/app:v1").is_some(), "v1 stays");
}

#[test]
fn berth_replicate_copies_what_was_pushed_before_the_rule() {
    if !have_tools() {
        return;
    }
    let target = Registry::start(Options { htpasswd: Some((USER.into(), PASSWORD.into())), ..Default::default() });
    // Pushed with no rule.
    let mut b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = Client::new();
    let v1 = push_index(&c, &b.url(), "team/app", "v1", "old");
    let v2 = push_index(&c, &b.url(), "team/tools/lint", "v2", "old");
    push_index(&c, &b.url(), "team/app", "dev", "old");
    assert_eq!(skopeo_digest(&target, "mirror/team/app:v1"), None);
    b.kill();

    // The rule added; `berth replicate` against the stopped berth's store.
    let pw = b.dir.path().join("target.pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    let config = std::fs::read_to_string(&b.config_path).unwrap()
        + &format!(
            "\n[[replication]]\nnamespace = \"team\"\ntarget = \"{}\"\nprefix = \"mirror/team\"\ntags = [\"v*\"]\nusername = \"{USER}\"\npassword_file = \"{}\"\n",
            target.url(),
            pw.display()
        );
    std::fs::write(&b.config_path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).args(["replicate", "--config"]).arg(&b.config_path).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r[0]["tags_copied"], 2, "{report}");
    assert_eq!(r[0]["manifests"], 6, "two indexes and their four images: {report}");
    // The second repository holds the same layers and configs: mounted from the first, not sent.
    assert_eq!((r[0]["blobs_sent"].as_u64(), r[0]["blobs_mounted"].as_u64()), (Some(4), Some(4)), "{report}");
    assert_eq!(skopeo_digest(&target, "mirror/team/app:v1").as_deref(), Some(v1.as_str()));
    assert_eq!(skopeo_digest(&target, "mirror/team/tools/lint:v2").as_deref(), Some(v2.as_str()));
    assert_eq!(skopeo_digest(&target, "mirror/team/app:dev"), None);

    // Again: everything is there, so nothing is sent.
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).args(["replicate", "--config"]).arg(&b.config_path).output().unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r[0]["blobs_sent"].as_u64(), r[0]["blobs_present"].as_u64()), (Some(0), Some(8)), "{r}");

    // A rule that does not exist is a clear error.
    let out =
        Command::new(env!("CARGO_BIN_EXE_berth")).args(["replicate", "--rule", "3", "--config"]).arg(&b.config_path).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no replication rule 3"));
}
