//! The pull-through mirror with real clients (the docker daemon, containerd's `ctr`, skopeo)
//! against real upstream registries: CNCF distribution with token auth as the fake docker.io,
//! and one with htpasswd whose blob GETs are 307s to a static file server (a CDN). Images are
//! multi-arch indexes built offline; each test counts what every upstream server was asked.
//!
//! A missing client skips its test with a message, unless BERTH_REQUIRE_CLIENTS=1.

mod common;

use common::distribution::{Options, Registry};
use common::dockerd::Dockerd;
use common::oci_layout::{self, Layout};
use common::{cmd, Berth};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const USER: &str = "ci-bot";
const PASSWORD: &str = "s3cret-upstream-pw";

/// The fake Docker Hub: token auth, like registry-1.docker.io.
fn fake_hub() -> Registry {
    Registry::start(Options { token: true, ..Default::default() })
}

/// The fake GHCR-like upstream: basic auth, blobs redirected to another port.
fn fake_redirecting() -> Registry {
    Registry::start(Options { htpasswd: Some((USER.into(), PASSWORD.into())), redirect: true, ..Default::default() })
}

/// Builds a multi-arch image labelled `label` and pushes it to `reg` as `repo:tag`.
fn seed(reg: &Registry, repo: &str, tag: &str, label: &str) -> Layout {
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_layout::multi_arch(&dir.path().join("layout"), tag, label);
    reg.push(&layout.skopeo_ref(), &format!("{repo}:{tag}"));
    layout
}

fn upstream_toml(name: &str, reg: &Registry, default: bool, secrets: &Path) -> String {
    let mut s = format!("[[upstream]]\nname = \"{name}\"\nurl = \"{}\"\n", reg.url());
    if default {
        s += "default = true\naliases = [\"index.docker.io\", \"registry-1.docker.io\"]\n";
    }
    if let Some((user, pw)) = &reg.creds {
        let pw_file = secrets.join(format!("{name}.pw"));
        std::fs::write(&pw_file, pw).unwrap();
        s += &format!("username = \"{user}\"\npassword_file = \"{}\"\n", pw_file.display());
    }
    s + "\n"
}

/// Requests the registry finished after the first `skip` (the ones seeding it).
fn since(reg: &Registry, skip: usize) -> Vec<common::distribution::Access> {
    reg.access().into_iter().skip(skip).collect()
}

/// Requests that got past authentication (a 401 is the challenge that precedes a token).
fn count(log: &[common::distribution::Access], method: &str, suffix: &str) -> usize {
    log.iter().filter(|a| a.method == method && a.path.ends_with(suffix) && a.status != 401).count()
}

#[test]
fn docker_daemon_pulls_busybox_from_token_auth_hub_through_berth_and_runs_it() {
    if !oci_layout::require_runnable(&["docker-registry", "skopeo", "dockerd", "docker"]) {
        return;
    }
    let hub = fake_hub();
    let img = seed(&hub, "library/busybox", "latest", "from-hub");
    let seeded = hub.access().len();
    let tokens_seeded = hub.token.as_ref().unwrap().count();
    let secrets = tempfile::tempdir().unwrap();
    let berth = Berth::start(&upstream_toml("docker.io", &hub, true, secrets.path()));
    let d = Dockerd::start(Some(&berth.url()));

    // The daemon asks the mirror for /v2/library/busybox/... with no ns; berth routes that to
    // the default upstream. A failing mirror would make it fall back to the (dead) real hub.
    d.docker(&["pull", "busybox"]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", "busybox"]).expect_ok();
    assert_eq!(run.stdout.trim(), "linux/amd64 from-hub", "the index resolved to the amd64 image");
    let arch = d.docker(&["image", "inspect", "--format", "{{.Architecture}}", "busybox"]).expect_ok();
    assert_eq!(arch.stdout.trim(), "amd64");
    assert!(!d.log_text().contains("Attempting next endpoint"), "the daemon gave up on the mirror at some point:\n{}", d.log_text());

    let up = since(&hub, seeded);
    let amd64 = img.image("amd64");
    let arm64 = img.image("arm64");
    assert_eq!(count(&up, "GET", "/v2/library/busybox/manifests/latest"), 1, "{up:#?}");
    assert_eq!(count(&up, "GET", &format!("/manifests/{}", amd64.manifest)), 1, "{up:#?}");
    for b in amd64.blobs() {
        let gets: Vec<_> = up.iter().filter(|a| a.method == "GET" && a.path.ends_with(&b)).collect();
        assert_eq!(gets.len(), 1, "one upstream GET of {b}: {up:#?}");
        assert_eq!(gets[0].status, 200);
    }
    for other in std::iter::once(&arm64.manifest).chain(arm64.blobs().iter()) {
        assert!(!up.iter().any(|a| a.path.contains(other.as_str())), "the arm64 image is never fetched: {up:#?}");
    }
    // One anonymous token for repository:library/busybox:pull, reused for every request.
    let token = hub.token.as_ref().unwrap();
    assert_eq!(token.count() - tokens_seeded, 1, "token requests: {:?}", token.scopes.lock().unwrap());
    assert_eq!(token.scopes.lock().unwrap().last().map(String::as_str), Some("repository:library/busybox:pull"));

    // Pulled again from scratch: the tag is within tag_ttl and everything else is addressed by
    // digest, so the upstream hears nothing.
    d.docker(&["rmi", "busybox"]).expect_ok();
    d.docker(&["pull", "busybox"]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", "busybox", "cat", "/etc/platform"]).expect_ok();
    assert_eq!(run.stdout.trim(), "linux/amd64 from-hub");
    assert_eq!(since(&hub, seeded).len(), up.len(), "second pull reached the upstream: {:#?}", since(&hub, seeded));
    assert_eq!(token.count() - tokens_seeded, 1);
}

#[test]
fn containerd_hosts_toml_mirrors_docker_io_and_ghcr_io_through_berth() {
    if !oci_layout::require_runnable(&["docker-registry", "skopeo", "dockerd", "ctr"]) {
        return;
    }
    let hub = fake_hub();
    let ghcr = fake_redirecting();
    let hub_img = seed(&hub, "library/busybox", "1.36", "from-hub");
    let ghcr_img = seed(&ghcr, "acme/tool", "v1", "from-ghcr");
    let (hub_seeded, ghcr_seeded) = (hub.access().len(), ghcr.access().len());
    let files = ghcr.files.as_ref().unwrap();
    let cdn_seeded = files.requests().len();
    let secrets = tempfile::tempdir().unwrap();
    let berth = Berth::start(&format!(
        "{}{}",
        upstream_toml("docker.io", &hub, true, secrets.path()),
        upstream_toml("ghcr.io", &ghcr, false, secrets.path())
    ));
    let d = Dockerd::start(None);

    // What k3s writes from registries.yaml `mirrors:` entries.
    let hosts = tempfile::tempdir().unwrap();
    for registry in ["docker.io", "ghcr.io"] {
        let dir = hosts.path().join(registry);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), format!("[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", berth.url())).unwrap();
    }
    let hosts_dir = hosts.path().to_str().unwrap();
    for image in ["docker.io/library/busybox:1.36", "ghcr.io/acme/tool:v1"] {
        d.ctr("berth-test", &["images", "pull", "--plain-http", "--hosts-dir", hosts_dir, "--snapshotter", "native", image]).expect_ok();
    }
    let listed = d.ctr("berth-test", &["images", "ls"]).expect_ok().stdout;
    for (image, index) in [("docker.io/library/busybox:1.36", &hub_img.index), ("ghcr.io/acme/tool:v1", &ghcr_img.index)] {
        let line = listed.lines().find(|l| l.starts_with(image)).unwrap_or_else(|| panic!("{image} not listed:\n{listed}"));
        assert!(line.contains(index.as_str()), "{image} resolved to the upstream's index {index}: {line}");
    }

    // Each registry was reached through berth (containerd adds ?ns=, which berth keeps to
    // itself) and only for the host's platform.
    let up = since(&hub, hub_seeded);
    for b in hub_img.image("amd64").blobs() {
        assert_eq!(count(&up, "GET", &format!("/v2/library/busybox/blobs/{b}")), 1, "{up:#?}");
    }
    assert!(!up.iter().any(|a| a.path.contains("ns=")), "{up:#?}");
    let up = since(&ghcr, ghcr_seeded);
    let cdn: Vec<String> = files.requests().into_iter().skip(cdn_seeded).collect();
    for b in ghcr_img.image("amd64").blobs() {
        // 307 and not 401: berth authenticated with its configured credentials.
        let hits: Vec<_> = up.iter().filter(|a| a.method == "GET" && a.path == format!("/v2/acme/tool/blobs/{b}")).collect();
        assert_eq!(hits.iter().map(|a| a.status).collect::<Vec<_>>(), [307], "{up:#?}");
        let hex = b.trim_start_matches("sha256:");
        assert_eq!(cdn.iter().filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/{hex}/data"))).count(), 1, "{cdn:#?}");
    }
    for b in ghcr_img.image("arm64").blobs() {
        assert!(!up.iter().any(|a| a.path.contains(b.as_str())), "{up:#?}");
    }
}

#[test]
fn skopeo_pulls_path_prefix_form_from_basic_auth_upstream_that_redirects_blobs() {
    if !oci_layout::require_runnable(&["docker-registry", "skopeo"]) {
        return;
    }
    let mut ghcr = fake_redirecting();
    let img = seed(&ghcr, "acme/tool", "v1", "from-ghcr");
    let files = ghcr.files.as_ref().unwrap();
    let cdn_auth_seeded = files.with_auth.load(Ordering::SeqCst);
    let secrets = tempfile::tempdir().unwrap();
    let berth = Berth::start(&upstream_toml("ghcr.io", &ghcr, false, secrets.path()));
    // A HEAD berth cannot answer from its store is answered from the upstream's HEAD (here
    // redirected to the CDN too), with the real length: clients size their downloads by it.
    let amd64 = img.image("amd64");
    let r =
        reqwest::blocking::Client::new().head(format!("{}/v2/ghcr.io/acme/tool/blobs/{}", berth.url(), amd64.layers[0])).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], img.sizes[&amd64.layers[0]].to_string().as_str());
    let seeded = ghcr.access().len();
    let cdn_seeded = files.requests().len();

    let out = tempfile::tempdir().unwrap();
    let pull = |dest: &str| {
        cmd::run(
            Command::new("skopeo").args([
                "copy",
                "--src-tls-verify=false",
                "--retry-times=0",
                "--override-os=linux",
                "--override-arch=amd64",
                &format!("docker://{}/ghcr.io/acme/tool:v1", berth.host()),
                &format!("oci:{}:v1", out.path().join(dest).display()),
            ]),
            Duration::from_secs(120),
        )
        .expect_ok()
    };
    pull("first");

    let up = since(&ghcr, seeded);
    let cdn: Vec<String> = files.requests().into_iter().skip(cdn_seeded).collect();
    for b in amd64.blobs() {
        // 307 and not 401: berth authenticated with its configured credentials.
        let hits: Vec<_> = up.iter().filter(|a| a.method == "GET" && a.path == format!("/v2/acme/tool/blobs/{b}")).collect();
        assert_eq!(hits.iter().map(|a| a.status).collect::<Vec<_>>(), [307], "{up:#?}");
        let hex = b.trim_start_matches("sha256:");
        let gets = cdn.iter().filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/{hex}/data"))).count();
        assert_eq!(gets, 1, "the redirect target served {b} once: {cdn:#?}");
    }
    // Credentials are for the registry only; the redirect goes to another host:port.
    assert_eq!(files.with_auth.load(Ordering::SeqCst), cdn_auth_seeded, "Authorization was sent to the redirect target");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("first/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], amd64.manifest.as_str(), "skopeo got the amd64 manifest byte for byte");

    // The same pull again touches neither the registry nor its CDN.
    let (reg_before, cdn_before) = (ghcr.access().len(), files.requests().len());
    pull("second");
    assert_eq!(ghcr.access().len(), reg_before, "{:#?}", since(&ghcr, reg_before));
    assert_eq!(files.requests().len(), cdn_before);

    // tags/list passes through to the upstream, which has tags berth never pulled; _catalog
    // lists what berth has cached.
    for tag in ["v2", "v3"] {
        ghcr.retag("acme/tool", "v1", tag);
    }
    let tags = cmd::run(
        Command::new("skopeo").args(["list-tags", "--tls-verify=false", &format!("docker://{}/ghcr.io/acme/tool", berth.host())]),
        Duration::from_secs(60),
    )
    .expect_ok();
    let tags: serde_json::Value = serde_json::from_str(&tags.stdout).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2", "v3"]));
    assert_eq!(count(&since(&ghcr, reg_before), "GET", "/v2/acme/tool/tags/list"), 1);
    let catalog: serde_json::Value = reqwest::blocking::get(format!("{}/v2/_catalog", berth.url())).unwrap().json().unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["ghcr.io/acme/tool"]));

    // Upstream gone: the image still pulls from the cache, and tags/list answers with the
    // tags berth has cached.
    ghcr.stop();
    pull("third");
    let tags = reqwest::blocking::get(format!("{}/v2/ghcr.io/acme/tool/tags/list", berth.url())).unwrap();
    assert_eq!(tags.status(), 200);
    assert_eq!(tags.headers()["x-berth-cache"], "stale");
    let tags: serde_json::Value = tags.json().unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}
