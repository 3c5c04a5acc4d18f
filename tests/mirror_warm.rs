//! Keeping the mirror warm: `prefetch` fetches the listed images (globs resolved through
//! `tags/list`) for `prefetch_platforms` at start and every `tag_ttl`, retries a failing
//! upstream without holding up serving, and with `pin = true` keeps them from eviction; a tag
//! clients pulled is watched, and when the upstream moves it the new content of the platforms
//! pulled before is fetched ahead of the next pull. Every check of what reached the upstream
//! uses the fake's request counts.

mod common;

use common::fake::{Fake, Fault, PlatformImage};
use common::{eventually, Berth};
use reqwest::blocking::Client;
use std::time::Duration;

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/s390x"];

fn upstream(fake: &Fake, extra: &str) -> String {
    format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n{extra}\n", fake.url())
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// The value of one series of berth's metrics (0 if absent).
fn metric(b: &Berth, series: &str) -> f64 {
    let text = client().get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

fn prefetched(b: &Berth, result: &str) -> f64 {
    metric(b, &format!("berth_prefetch_images_total{{result=\"{result}\",upstream=\"docker.io\"}}"))
}

/// GETs `path` from berth; returns the status, the X-Berth-Cache header and the digest.
fn get(b: &Berth, path: &str) -> (u16, String, String) {
    let r = client().get(format!("{}/v2/{path}", b.url())).header("Accept", ACCEPT).send().unwrap();
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let out = (r.status().as_u16(), h("x-berth-cache"), h("docker-content-digest"));
    r.bytes().unwrap();
    out
}

/// Pulls one platform of `repo:tag` as a client does: the index by tag, then the platform's
/// manifest, config and layer by digest. Returns what each answer's X-Berth-Cache said.
fn pull_platform(b: &Berth, repo: &str, tag: &str, index: &str, image: &PlatformImage) -> Vec<String> {
    let (status, cache, d) = get(b, &format!("{repo}/manifests/{tag}"));
    assert_eq!((status, d.as_str()), (200, index), "{repo}:{tag}");
    let mut caches = vec![cache];
    let (status, cache, _) = get(b, &format!("{repo}/manifests/{}", image.manifest));
    assert_eq!(status, 200);
    caches.push(cache);
    for blob in [&image.config, &image.layer] {
        let (status, cache, d) = get(b, &format!("{repo}/blobs/{blob}"));
        assert_eq!((status, d.as_str()), (200, blob.as_str()));
        caches.push(cache);
    }
    caches
}

#[test]
fn prefetch_resolves_globs_and_fetches_only_the_listed_platforms() {
    let fake = Fake::start();
    let mut wanted = Vec::new();
    for (repo, tag) in [("library/nginx", "1.27"), ("library/alpine", "3.19"), ("library/alpine", "3.20")] {
        let (index, images) = fake.add_index(repo, tag, &PLATFORMS, &format!("{repo}:{tag}"));
        wanted.push((repo, tag, index, images));
    }
    let (_, unlisted) = fake.add_index("library/alpine", "4.0", &PLATFORMS, "alpine 4");
    let (_, other_nginx) = fake.add_index("library/nginx", "1.28", &PLATFORMS, "nginx 1.28");
    let b = Berth::start(&upstream(
        &fake,
        "tag_ttl = \"1h\"\nprefetch = [\"library/nginx:1.27\", \"library/alpine:3.*\"]\nprefetch_platforms = [\"linux/amd64\", \"linux/arm64\"]",
    ));
    assert!(eventually(Duration::from_secs(30), || prefetched(&b, "ok") >= 3.0), "prefetch did not finish; log:\n{}", b.log());
    assert_eq!(prefetched(&b, "ok"), 3.0);
    assert_eq!(prefetched(&b, "failed"), 0.0);
    assert!(metric(&b, "berth_prefetch_last_run_timestamp_seconds{upstream=\"docker.io\"}") > 1.7e9);

    // The glob was resolved from the upstream's tag list; the plain tag needed none.
    assert!(fake.count_path("GET", "/v2/library/alpine/tags/list") >= 1);
    assert_eq!(fake.count_path("GET", "/v2/library/nginx/tags/list"), 0);
    for (repo, tag, _, images) in &wanted {
        assert_eq!(fake.count_path("GET", &format!("/v2/{repo}/manifests/{tag}")), 1, "{repo}:{tag}");
        for image in images {
            let want = if image.platform == "linux/s390x" { 0 } else { 1 };
            for d in image.digests() {
                assert_eq!(fake.count_path("GET", d), want, "{repo}:{tag} {} {d}", image.platform);
            }
        }
    }
    for image in unlisted.iter().chain(&other_nginx) {
        for d in image.digests() {
            assert_eq!(fake.count_path("GET", d), 0, "an image no pattern names was fetched");
        }
    }
    assert_eq!(fake.count_path("GET", "/v2/library/alpine/manifests/4.0"), 0);
    assert!(metric(&b, "berth_prefetch_bytes_total{upstream=\"docker.io\"}") > 0.0);

    // Pulling any prefetched platform is all hits: the upstream sends no blob.
    let blob_gets = fake.count("GET blob");
    for (repo, tag, index, images) in &wanted {
        for image in images.iter().filter(|i| i.platform != "linux/s390x") {
            let caches = pull_platform(&b, repo, tag, index, image);
            assert!(caches.iter().all(|c| c == "hit"), "{repo}:{tag} {}: {caches:?}", image.platform);
        }
    }
    assert_eq!(fake.count("GET blob"), blob_gets);
}

/// skopeo pulls a prefetched image over plain HTTP without berth asking the upstream for a blob.
#[test]
fn skopeo_pulls_a_prefetched_image_without_upstream_blob_gets() {
    if !common::require("skopeo") {
        return;
    }
    let fake = Fake::start();
    let (_, images) = fake.add_index("library/alpine", "3.20", &PLATFORMS, "alpine");
    let b = Berth::start(&upstream(&fake, "prefetch = [\"library/alpine:3.*\"]\nprefetch_platforms = [\"linux/arm64\"]"));
    assert!(eventually(Duration::from_secs(30), || prefetched(&b, "ok") >= 1.0), "log:\n{}", b.log());
    let blob_gets = fake.count("GET blob");
    let out = tempfile::tempdir().unwrap();
    common::cmd::run(
        std::process::Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--retry-times=0",
            "--override-os=linux",
            "--override-arch=arm64",
            &format!("docker://{}/library/alpine:3.20", b.host()),
            &format!("oci:{}:3.20", out.path().join("img").display()),
        ]),
        Duration::from_secs(120),
    )
    .expect_ok();
    assert_eq!(fake.count("GET blob"), blob_gets, "skopeo's pull reached the upstream for a blob");
    let arm64 = images.iter().find(|i| i.platform == "linux/arm64").unwrap();
    // The arm64 image's config as berth served it (skopeo may rewrite the layer's encoding and
    // so the manifest, never the config).
    let copied = |d: &str| out.path().join("img/blobs/sha256").join(d.trim_start_matches("sha256:")).exists();
    assert!(copied(&arm64.config), "skopeo did not copy the arm64 image");
}

/// The docker daemon, with berth as its registry mirror, pulls an image berth prefetched from a
/// token-auth upstream (CNCF distribution, a multi-arch image built offline): the upstream is
/// asked for no blob, and the platform not listed was never fetched.
#[test]
fn the_docker_daemon_pulls_a_prefetched_image_without_upstream_blob_gets() {
    use common::distribution::{Options, Registry};
    if !common::oci_layout::require_runnable(&["docker-registry", "skopeo", "dockerd", "docker"]) {
        return;
    }
    let hub = Registry::start(Options { token: true, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let img = common::oci_layout::multi_arch(&dir.path().join("layout"), "1.36", "prefetched");
    hub.push(&img.skopeo_ref(), "library/busybox:1.36");
    let seeded = hub.access().len();
    let b = Berth::start(&format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\nprefetch = [\"library/busybox:1.*\"]\nprefetch_platforms = [\"linux/amd64\"]\n",
        hub.url()
    ));
    assert!(eventually(Duration::from_secs(60), || prefetched(&b, "ok") >= 1.0), "log:\n{}", b.log());
    let prefetch = hub.settle(seeded);
    let gets = |log: &[common::distribution::Access], d: &str| {
        log.iter().filter(|a| a.method == "GET" && a.status != 401 && a.path.ends_with(d)).count()
    };
    for d in img.image("amd64").blobs() {
        assert_eq!(gets(&prefetch, &d), 1, "{d}: {prefetch:#?}");
    }
    assert!(gets(&prefetch, "/tags/list") >= 1);
    let arm64 = img.image("arm64");
    for d in std::iter::once(&arm64.manifest).chain(arm64.blobs().iter()) {
        assert!(!prefetch.iter().any(|a| a.path.contains(d.as_str())), "arm64 was fetched: {prefetch:#?}");
    }

    let before = hub.access().len();
    let d = common::dockerd::Dockerd::start(Some(&b.url()));
    d.docker(&["pull", "busybox:1.36"]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", "busybox:1.36"]).expect_ok();
    assert_eq!(run.stdout.trim(), "linux/amd64 prefetched");
    let pulled = hub.settle(before);
    assert!(
        !pulled.iter().any(|a| a.method == "GET" && a.path.contains("/blobs/")),
        "the pull reached the upstream for a blob: {pulled:#?}"
    );
}

#[test]
fn pinned_prefetched_content_survives_eviction_and_restarts() {
    let fake = Fake::start();
    let big = |seed: u64| common::random_bytes(64 << 10, seed);
    let (_, _, kept_layer) = fake.add_image("library/kept", "1", &big(1));
    let mut others = Vec::new();
    for i in 0..2u64 {
        others.push(fake.add_image("library/other", &i.to_string(), &big(10 + i)).2);
    }
    let mut b = Berth::start_with_storage(
        "max_cache_bytes = \"100KiB\"",
        &upstream(&fake, "tag_ttl = \"1h\"\nprefetch = [\"library/kept:1\"]\npin = true"),
    );
    assert!(eventually(Duration::from_secs(30), || prefetched(&b, "ok") >= 1.0), "log:\n{}", b.log());
    assert!(b.stored_blob(&kept_layer).is_some());

    // Another image pushes the cache over its bound: the prefetched image is older, yet the
    // other one's layer is what goes.
    let evict = |b: &Berth, tag: &str, layer: &str| {
        assert_eq!(get(b, &format!("library/other/manifests/{tag}")).0, 200);
        assert_eq!(get(b, &format!("library/other/blobs/{layer}")).0, 200);
        assert!(eventually(Duration::from_secs(10), || b.stored_blob(layer).is_none()), "nothing was evicted");
        assert!(b.stored_blob(&kept_layer).is_some(), "the pinned layer was evicted");
    };
    evict(&b, "0", &others[0]);

    // Pins are in memory: the prefetch at start sets them again (from the cache, the upstream
    // only confirms the tag).
    b.restart();
    assert!(eventually(Duration::from_secs(30), || prefetched(&b, "ok") >= 1.0), "log:\n{}", b.log());
    evict(&b, "1", &others[1]);
    let gets = fake.count_path("GET", &kept_layer);
    let (status, cache, _) = get(&b, &format!("library/kept/blobs/{kept_layer}"));
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert_eq!(fake.count_path("GET", &kept_layer), gets);
}

#[test]
fn a_failing_upstream_at_start_is_retried_and_serving_goes_on() {
    let fake = Fake::start();
    let (_, images) = fake.add_index("library/app", "1", &PLATFORMS[..1], "app");
    fake.set_fault(Fault::Status(503));
    let b = Berth::start(&upstream(&fake, "tag_ttl = \"2s\"\nprefetch = [\"library/app:1\"]"));
    // Ready and answering while the prefetch fails: a pull says the upstream fails, not 404.
    assert_eq!(client().get(format!("{}/v2/", b.url())).send().unwrap().status(), 200);
    assert!(eventually(Duration::from_secs(30), || prefetched(&b, "failed") >= 2.0), "no retry; log:\n{}", b.log());
    let (status, _, _) = get(&b, "library/app/manifests/1");
    assert!((500..600).contains(&status), "{status}");
    assert_eq!(prefetched(&b, "ok"), 0.0);

    // The upstream recovers: a retry (after the circuit lets a probe through) fetches it all.
    fake.set_fault(Fault::None);
    assert!(eventually(Duration::from_secs(60), || prefetched(&b, "ok") >= 1.0), "log:\n{}", b.log());
    let blob_gets = fake.count("GET blob");
    for d in [&images[0].config, &images[0].layer] {
        assert_eq!(fake.count_path("GET", d), 1);
        let (status, cache, _) = get(&b, &format!("library/app/blobs/{d}"));
        assert_eq!((status, cache.as_str()), (200, "hit"));
    }
    assert_eq!(fake.count("GET blob"), blob_gets);
}

#[test]
fn a_moved_tag_is_fetched_for_the_platforms_pulled_before_the_next_pull() {
    let fake = Fake::start();
    let (v1, images) = fake.add_index("library/app", "1", &PLATFORMS[..2], "v1");
    let b = Berth::start(&upstream(&fake, "tag_ttl = \"1s\"\nwatch_window = \"1h\""));
    let amd64 = &images[0];
    let caches = pull_platform(&b, "library/app", "1", &v1, amd64);
    assert_eq!(caches, ["miss", "miss", "miss", "miss"]);
    assert!(eventually(Duration::from_secs(10), || metric(&b, "berth_watched_tags") == 1.0));

    // A release: the upstream moves the tag to a new index.
    let (v2, new_images) = fake.add_index("library/app", "1", &PLATFORMS[..2], "v2");
    assert_ne!(v1, v2);
    let (new_amd64, new_arm64) = (&new_images[0], &new_images[1]);
    let warmed = || metric(&b, "berth_watch_refreshes_total{result=\"warmed\",upstream=\"docker.io\"}");
    assert!(eventually(Duration::from_secs(20), || warmed() >= 1.0), "the moved tag was not fetched; log:\n{}", b.log());
    for d in new_amd64.digests() {
        assert_eq!(fake.count_path("GET", d), 1, "{d}");
    }
    for d in new_arm64.digests() {
        assert_eq!(fake.count_path("GET", d), 0, "a platform nobody pulled was fetched");
    }
    assert!(metric(&b, "berth_watch_bytes_total{upstream=\"docker.io\"}") > 0.0);

    // The next pull after the release is warm: no blob from the upstream.
    let blob_gets = fake.count("GET blob");
    let caches = pull_platform(&b, "library/app", "1", &v2, new_amd64);
    assert_eq!(&caches[1..], ["hit", "hit", "hit"]);
    assert_eq!(fake.count("GET blob"), blob_gets);
    let r = client().get(format!("{}/v2/library/app/manifests/1", b.url())).header("Accept", ACCEPT).send().unwrap();
    assert_eq!(r.headers()["content-type"], INDEX);
}
