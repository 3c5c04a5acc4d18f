//! The pull-through mirror against a hand-written fake upstream that counts requests and
//! injects faults.

mod common;

use common::fake::{Fake, Fault};
use common::Berth;
use reqwest::blocking::Client;
use std::io::Read;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn mirror_config(fake: &Fake, extra_upstream: &str) -> String {
    format!(
        "[[namespace]]\nprefix = \"team\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\naliases = [\"index.docker.io\"]\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n{extra_upstream}\n",
        fake.url()
    )
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn oci_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn pulls_through_and_serves_digests_from_the_store() {
    let fake = Fake::start();
    let layer = vec![7u8; 300_000];
    let (md, mbytes, ld) = fake.add_image("library/app", "v1", &layer);
    let b = Berth::start(&mirror_config(&fake, ""));
    let c = client();

    // Default upstream; a one-component name gets `library/`.
    let r = c.get(format!("{}/v2/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert_eq!(r.headers()["content-type"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(r.headers()["x-berth-cache"], "miss");
    assert_eq!(r.bytes().unwrap().as_ref(), mbytes.as_slice(), "manifest bytes are served exactly as the upstream sent them");

    // The same repository through the path-prefix form, ?ns= (containerd) and an alias.
    for url in [
        format!("{}/v2/docker.io/library/app/manifests/v1", b.url()),
        format!("{}/v2/library/app/manifests/v1?ns=docker.io", b.url()),
        format!("{}/v2/index.docker.io/library/app/manifests/{md}", b.url()),
    ] {
        let r = c.get(&url).send().unwrap();
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.headers()["x-berth-cache"], "hit", "{url}");
    }
    assert_eq!(fake.count("GET manifest"), 1);

    // HEAD carries digest, type and length (containerd resolves with HEAD).
    let r = c.head(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert_eq!(r.headers()["content-length"], mbytes.len().to_string().as_str());
    assert!(r.headers().contains_key("content-type"));

    // Blob: one upstream GET, then from the store.
    for expect in ["miss", "hit"] {
        let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-berth-cache"], expect);
        assert_eq!(common::digest(&r.bytes().unwrap()), ld);
    }
    assert_eq!(fake.count("GET blob"), 1);

    // Range on a cached mirrored blob.
    let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).header("Range", "bytes=10-19").send().unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &layer[10..20]);

    // Everything addressed by digest is served with the upstream gone.
    let mut fake = fake;
    fake.stop();
    let r = c.get(format!("{}/v2/library/app/manifests/{md}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);

    // The catalog lists what is cached, under the upstream's name.
    let v: serde_json::Value = c.get(format!("{}/v2/_catalog", b.url())).send().unwrap().json().unwrap();
    assert!(v["repositories"].as_array().unwrap().iter().any(|r| r == "docker.io/library/app"), "{v}");
}

#[test]
fn mirrors_are_read_only_and_unknown_registries_are_named() {
    let fake = Fake::start();
    let b = Berth::start(&mirror_config(&fake, ""));
    let c = client();
    for (method, path) in [
        ("POST", "/v2/library/app/blobs/uploads/"),
        ("PUT", "/v2/docker.io/library/app/manifests/v1"),
        ("DELETE", "/v2/library/app/manifests/v1"),
    ] {
        let r = c.request(method.parse().unwrap(), format!("{}{path}", b.url())).body("{}").send().unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(oci_code(&r.bytes().unwrap()), "DENIED");
    }
    let r = c.get(format!("{}/v2/library/app/manifests/v1?ns=quay.io", b.url())).send().unwrap();
    assert_eq!(r.status(), 404);
    let body = r.bytes().unwrap();
    assert_eq!(oci_code(&body), "NAME_UNKNOWN");
    assert!(String::from_utf8_lossy(&body).contains("quay.io"));
    assert_eq!(fake.count("POST blob") + fake.count("PUT manifest") + fake.count("DELETE manifest"), 0);
    // A missing tag upstream is a 404, not an outage.
    let r = c.get(format!("{}/v2/library/app/manifests/nope", b.url())).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(oci_code(&r.bytes().unwrap()), "MANIFEST_UNKNOWN");
}

#[test]
fn bearer_tokens_are_fetched_once_and_reused() {
    let fake = Fake::start();
    fake.state.lock().unwrap().require_token = true;
    let (_, _, ld) = fake.add_image("library/app", "v1", b"layer-bytes");
    let b = Berth::start(&mirror_config(&fake, ""));
    let c = client();
    let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), b"layer-bytes");
    assert_eq!(fake.count("GET token"), 1, "one token for the repository scope, reused");
}

#[test]
fn herd_of_64_on_a_cold_blob_makes_one_upstream_get_and_everyone_streams_early() {
    let fake = Fake::start();
    let size = 64 << 20;
    let blob: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let d = fake.add_blob(&blob);
    fake.add_manifest("library/big", Some("v1"), "application/vnd.oci.image.manifest.v1+json", b"{}");
    // Slow enough that the fill outlasts every client's first byte.
    fake.state.lock().unwrap().blob_piece_delay = Some(Duration::from_millis(40));
    let b = Arc::new(Berth::start(&mirror_config(&fake, "")));
    let n = 64;
    let barrier = Arc::new(Barrier::new(n));
    let url = format!("{}/v2/library/big/blobs/{d}", b.url());
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url) = (barrier.clone(), url.clone());
            std::thread::spawn(move || {
                let c = client();
                barrier.wait();
                let mut r = c.get(&url).send().unwrap();
                assert_eq!(r.status(), 200);
                let mut first = [0u8; 1];
                r.read_exact(&mut first).unwrap();
                let first_at = Instant::now();
                let mut rest = Vec::with_capacity(64 << 20);
                r.read_to_end(&mut rest).unwrap();
                let mut all = vec![first[0]];
                all.extend(rest);
                (first_at, common::digest(&all))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(fake.count("GET blob"), 1, "exactly one upstream GET for {n} clients");
    let done = fake.state.lock().unwrap().blob_done_at.clone();
    assert_eq!(done.len(), 1);
    for (first_at, digest) in &results {
        assert_eq!(digest, &d);
        assert!(*first_at < done[0], "every client's first byte arrives before the upstream finished sending");
    }
    let r = client().get(&url).send().unwrap();
    assert_eq!(r.headers()["x-berth-cache"], "hit");
}

#[test]
fn fill_continues_when_the_first_client_disconnects() {
    let fake = Fake::start();
    let blob: Vec<u8> = (0..(8 << 20)).map(|i| (i % 13) as u8).collect();
    let d = fake.add_blob(&blob);
    fake.state.lock().unwrap().blob_piece_delay = Some(Duration::from_millis(30));
    let b = Berth::start(&mirror_config(&fake, ""));
    {
        let mut r = client().get(format!("{}/v2/library/x/blobs/{d}", b.url())).send().unwrap();
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        // Dropped here: the client goes away mid-transfer.
    }
    // The fill goes on without its client and commits: wait for that, with a deadline.
    let cached = || {
        let r = client().head(format!("{}/v2/library/x/blobs/{d}", b.url())).send().unwrap();
        r.headers().get("x-berth-cache").is_some_and(|v| v == "hit")
    };
    assert!(common::eventually(Duration::from_secs(30), cached), "the fill finished and was kept");
    let r = client().get(format!("{}/v2/library/x/blobs/{d}", b.url())).send().unwrap();
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(common::digest(&r.bytes().unwrap()), d);
    assert_eq!(fake.count("GET blob"), 1);
}

#[test]
fn stale_tags_are_served_during_an_outage_and_revalidate_after() {
    let mut fake = Fake::start();
    let (md1, _, _) = fake.add_image("library/app", "v1", b"one");
    fake.add_image("library/app", "other", b"other");
    // Watching is off: its background checks would open the circuit while the upstream is down.
    let b = Berth::start(&mirror_config(&fake, "tag_ttl = \"100ms\"\nwatch_window = \"0s\""));
    let c = client();
    let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);

    // Past the TTL with the upstream down: the cached tag is served stale. The sleep waits for
    // the 100ms TTL to run out on the clock; there is nothing else to wait for.
    let heads = fake.count("HEAD manifest");
    fake.stop();
    std::thread::sleep(Duration::from_millis(200));
    let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200, "cached tag still pulls with the upstream down");
    assert_eq!(r.headers()["x-berth-cache"], "stale");
    assert_eq!(r.headers()["docker-content-digest"], md1.as_str());
    // An uncached tag is an outage (5xx naming the upstream), never a 404.
    let r = c.get(format!("{}/v2/library/app/manifests/other", b.url())).send().unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert!(String::from_utf8_lossy(&r.bytes().unwrap()).contains("docker.io"));

    // Back up with v1 moved: the tag revalidates (HEAD) and berth fetches the new manifest.
    let (md2, _, _) = fake.add_image("library/app", "v1", b"two");
    fake.resume();
    let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md2.as_str());
    assert!(fake.count("HEAD manifest") > heads);

    // Unchanged after the TTL (again a wait on the clock): a HEAD confirms it, no GET.
    std::thread::sleep(Duration::from_millis(200));
    let gets = fake.count("GET manifest");
    let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(fake.count("GET manifest"), gets);

    // Upstream answering 503 or 429 also serves the cached copy.
    for s in [503, 429] {
        // The TTL runs out, so berth asks the upstream.
        std::thread::sleep(Duration::from_millis(200));
        fake.set_fault(Fault::Status(s));
        let r = c.get(format!("{}/v2/library/app/manifests/v1", b.url())).send().unwrap();
        assert_eq!(r.status(), 200, "upstream {s}");
        assert_eq!(r.headers()["x-berth-cache"], "stale");
    }
    let metrics = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    assert!(metrics.contains("berth_cache_requests_total{kind=\"manifest\",result=\"stale\"} 3"), "{metrics}");
}

#[test]
fn nothing_cached_and_upstream_down_is_a_5xx() {
    let mut fake = Fake::start();
    let b = Berth::start(&mirror_config(&fake, ""));
    fake.stop();
    let c = client();
    let d = common::digest(b"whatever");
    for path in ["/v2/library/app/manifests/latest".to_string(), format!("/v2/library/app/blobs/{d}")] {
        let r = c.get(format!("{}{path}", b.url())).send().unwrap();
        assert_eq!(r.status(), 502, "{path}");
        let body = r.bytes().unwrap();
        assert!(String::from_utf8_lossy(&body).contains("docker.io"), "the error names the upstream");
    }
    fake.resume();
    fake.set_fault(Fault::Status(500));
    let r = c.get(format!("{}/v2/library/app/manifests/latest", b.url())).send().unwrap();
    assert_eq!(r.status(), 502);
    // Three failures in a row open the upstream's circuit: berth answers at once, 503 naming
    // the upstream, without asking it.
    let asked = fake.count("GET manifest");
    let r = c.get(format!("{}/v2/library/app/manifests/latest", b.url())).send().unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body = r.bytes().unwrap();
    assert_eq!(oci_code(&body), "UNAVAILABLE");
    assert!(String::from_utf8_lossy(&body).contains("docker.io"));
    assert_eq!(fake.count("GET manifest"), asked, "an open circuit does not contact the upstream");
    // An upstream that refuses berth is a denial naming it, not "not found"; a rate limit is
    // passed on as one. (After the open period one probe goes through; any answer closes the
    // circuit.)
    fake.set_fault(Fault::Status(403));
    let mut r = c.get(format!("{}/v2/library/app/manifests/latest", b.url())).send().unwrap();
    assert!(common::eventually(Duration::from_secs(15), || {
        r = c.get(format!("{}/v2/library/app/manifests/latest", b.url())).send().unwrap();
        r.status() != 503
    }));
    assert_eq!(r.status(), 403);
    let body = r.bytes().unwrap();
    assert_eq!(oci_code(&body), "DENIED");
    assert!(String::from_utf8_lossy(&body).contains("docker.io"));
    fake.set_fault(Fault::Status(429));
    let r = c.get(format!("{}/v2/library/app/manifests/latest", b.url())).send().unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "37", "the upstream's Retry-After, as sent");
    assert_eq!(oci_code(&r.bytes().unwrap()), "TOOMANYREQUESTS");
}

/// Neither the blob nor a temp file of its fill is on disk.
fn not_cached(b: &Berth, d: &str) -> bool {
    let hex = d.strip_prefix("sha256:").unwrap();
    !b.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex).exists()
        && std::fs::read_dir(b.data_dir().join("tmp")).unwrap().count() == 0
}

fn assert_not_cached(b: &Berth, d: &str) {
    let hex = d.strip_prefix("sha256:").unwrap();
    assert!(!b.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex).exists(), "corrupt blob was cached");
    let tmp = std::fs::read_dir(b.data_dir().join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "no temp file survives a failed fill");
}

#[test]
fn blob_faults_never_cache_or_complete() {
    let fake = Fake::start();
    let blob: Vec<u8> = (0..(3 << 20)).map(|i| (i % 7) as u8).collect();
    let d = fake.add_blob(&blob);
    let b = Berth::start(&mirror_config(&fake, ""));
    let url = format!("{}/v2/library/f/blobs/{d}", b.url());
    for fault in [Fault::WrongBytes, Fault::ResetMidBlob, Fault::StallMidBlob] {
        fake.set_fault(fault.clone());
        let before = fake.count("GET blob");
        let result = client().get(&url).send().and_then(|r| r.bytes());
        // An aborted transfer (Err) is what the client must see; a completed one must not
        // carry the right bytes.
        if let Ok(body) = result {
            assert_ne!(common::digest(&body), d, "{fault:?}: a faulty transfer must not complete with the right bytes");
        }
        assert_eq!(fake.count("GET blob"), before + 1);
        // The fill task notices after its client does: wait for its temp file to go.
        assert!(
            common::eventually(Duration::from_secs(20), || not_cached(&b, &d)),
            "{fault:?}: the failed fill was cached or left a temp file"
        );
        assert_not_cached(&b, &d);
    }
    let metrics = client().get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    assert!(metrics.contains("berth_digest_mismatch_total{source=\"blob\"} 1"), "{metrics}");
    // Healthy again: the next request fetches afresh and caches.
    fake.set_fault(Fault::None);
    let r = client().get(&url).send().unwrap();
    assert_eq!(common::digest(&r.bytes().unwrap()), d);
    let r = client().get(&url).send().unwrap();
    assert_eq!(r.headers()["x-berth-cache"], "hit");
}

#[test]
fn manifest_with_wrong_digest_is_refused_and_not_cached() {
    let fake = Fake::start();
    let good = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
    let d = common::digest(good);
    // The upstream serves other bytes under this digest.
    fake.state.lock().unwrap().manifests.insert(
        ("library/m".into(), d.clone()),
        ("application/vnd.oci.image.manifest.v1+json".into(), bytes::Bytes::from_static(b"{\"tampered\":true}")),
    );
    let b = Berth::start(&mirror_config(&fake, ""));
    let r = client().get(format!("{}/v2/library/m/manifests/{d}", b.url())).send().unwrap();
    assert_eq!(r.status(), 502);
    let r = client().get(format!("{}/v2/library/m/manifests/{d}", b.url())).send().unwrap();
    assert_eq!(r.status(), 502, "still not cached");
    assert_eq!(fake.count("GET manifest"), 2);
    let metrics = client().get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    assert!(metrics.contains("berth_digest_mismatch_total{source=\"manifest\"} 2"), "{metrics}");
}

#[test]
fn tags_list_passes_through() {
    let fake = Fake::start();
    fake.add_image("library/app", "a", b"1");
    fake.add_image("library/app", "b", b"2");
    let b = Berth::start(&mirror_config(&fake, ""));
    let v: serde_json::Value = client().get(format!("{}/v2/library/app/tags/list", b.url())).send().unwrap().json().unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
}

#[test]
fn a_chunked_manifest_over_the_cap_is_refused_and_not_cached() {
    let mut fake = Fake::start();
    fake.state.lock().unwrap().chunked_manifests = true;
    let max = berth::oci::manifest::MAX_MANIFEST_BYTES;
    // Valid JSON of any size: trailing whitespace pads it.
    let manifest = |size: usize| {
        let mut m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#.to_vec();
        m.resize(size, b' ');
        m
    };
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let over = fake.add_manifest("library/big", Some("over"), mt, &manifest(max + 1));
    let at = manifest(max);
    fake.add_manifest("library/big", Some("at"), mt, &at);
    let b = Berth::start(&mirror_config(&fake, ""));
    let c = client();

    for reference in ["over", over.as_str(), "over"] {
        let r = c.get(format!("{}/v2/library/big/manifests/{reference}", b.url())).send().unwrap();
        assert_eq!(r.status(), 502, "{reference}: an oversized manifest is an upstream failure, not a 404 or a 200");
        let body = r.bytes().unwrap();
        assert_eq!(oci_code(&body), "UNAVAILABLE");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("docker.io") && text.contains(&format!("manifest over {max} bytes")), "{text}");
    }
    assert_eq!(fake.count("GET manifest"), 3, "nothing was cached: every request went upstream");

    // Exactly at the cap is a manifest like any other.
    let r = c.get(format!("{}/v2/library/big/manifests/at", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-berth-cache"], "miss");
    assert_eq!(r.bytes().unwrap().as_ref(), at.as_slice());

    // With the upstream gone, the oversized one is still not there to serve.
    fake.stop();
    let r = c.get(format!("{}/v2/library/big/manifests/{over}", b.url())).send().unwrap();
    assert_eq!(r.status(), 502);
    let r = c.get(format!("{}/v2/library/big/manifests/{}", b.url(), common::digest(&at))).send().unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn range_headers_off_the_grammar_are_ignored_on_mirrored_blobs() {
    let fake = Fake::start();
    let cold: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let cold_d = fake.add_blob(&cold);
    let other: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let other_d = fake.add_blob(&other);
    let b = Berth::start(&mirror_config(&fake, ""));
    let c = client();
    let url = |d: &str| format!("{}/v2/library/ranged/blobs/{d}", b.url());

    // Cold (the fill path), then cached (the store path): the whole blob either way.
    for expect in ["miss", "hit"] {
        let r = c.get(url(&cold_d)).header("Range", "bytes=x-1").send().unwrap();
        assert_eq!(r.status(), 200, "{expect}");
        assert_eq!(r.headers()["x-berth-cache"], expect);
        assert!(r.headers().get("content-range").is_none(), "{expect}");
        assert_eq!(r.bytes().unwrap().as_ref(), cold.as_slice(), "{expect}");
    }
    let r = c.get(url(&cold_d)).header("Range", "bytes=1-2-3").send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), cold.len());
    // A range that parses still selects bytes, and one past the end is still 416.
    let r = c.get(url(&cold_d)).header("Range", "bytes=10-19").send().unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &cold[10..20]);
    let r = c.get(url(&cold_d)).header("Range", format!("bytes={}-", cold.len())).send().unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], format!("bytes */{}", cold.len()).as_str());

    // An unsatisfiable range on a cold blob is 416 too, with the length the upstream announced.
    let r = c.get(url(&other_d)).header("Range", "bytes=400000-500000").send().unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], format!("bytes */{}", other.len()).as_str());
    assert_eq!(oci_code(&r.bytes().unwrap()), "BLOB_UPLOAD_INVALID");
    assert_eq!(fake.count("GET blob"), 2, "one fill per blob");
}

/// The manifest `auth_upstream` serves for `repo:tag`.
fn auth_manifest(repo: &str, tag: &str) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}},"layers":[],"annotations":{{"at":"{repo}:{tag}"}}}}"#
    )
    .into_bytes()
}

type AuthLog = Arc<std::sync::Mutex<Vec<String>>>;

/// An upstream that guards each repository its own way, as one registry may: `basic/*` takes
/// Basic `bot:pw` and challenges with Basic; the others take tokens from its `/token` realm and
/// challenge with Bearer, alone (`token/*`), after Basic in one header (`both/one-header`) or in
/// a second header after a Basic one (`both/two-headers`). Logs `<repo> <auth sent> <status>`
/// for each manifest request and `token` for each token request.
fn auth_upstream() -> (common::distribution::HttpServer, AuthLog) {
    use common::distribution::{HttpReq, HttpResp, HttpServer};
    let log: AuthLog = Arc::default();
    let seen = log.clone();
    let server = HttpServer::start(Arc::new(move |req: &HttpReq| {
        let header = |k: &str| req.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or("");
        if req.path() == "/token" {
            seen.lock().unwrap().push("token".into());
            return HttpResp::json(200, serde_json::json!({"token": "tok-1", "expires_in": 300}));
        }
        let Some((repo, tag)) = req.path().strip_prefix("/v2/").and_then(|p| p.split_once("/manifests/")) else {
            return HttpResp::json(200, serde_json::json!({}));
        };
        let auth = header("authorization");
        let sent = if auth.starts_with("Basic ") {
            "basic"
        } else if auth.starts_with("Bearer ") {
            "bearer"
        } else {
            "none"
        };
        let realm = format!("http://{}/token", header("host"));
        let (ok, challenges) = match repo {
            "basic/app" => (auth == "Basic Ym90OnB3", vec!["Basic realm=\"upstream\"".to_string()]),
            "token/app" => (auth == "Bearer tok-1", vec![format!("Bearer realm=\"{realm}\",service=\"upstream\"")]),
            "both/one-header" => (auth == "Bearer tok-1", vec![format!("Basic realm=upstream, Bearer realm=\"{realm}\",service=upstream")]),
            "both/two-headers" => (
                auth == "Bearer tok-1",
                vec!["Basic realm=\"upstream\"".to_string(), format!("Bearer realm=\"{realm}\", service=upstream")],
            ),
            _ => (false, vec![]),
        };
        let status = if ok { 200 } else { 401 };
        seen.lock().unwrap().push(format!("{repo} {sent} {status}"));
        if !ok {
            let body = serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]});
            return challenges.into_iter().fold(HttpResp::json(401, body), |r, c| r.header("WWW-Authenticate", c));
        }
        let m = auth_manifest(repo, tag);
        HttpResp::bytes(200, "application/vnd.oci.image.manifest.v1+json", m.clone()).header("Docker-Content-Digest", common::digest(&m))
    }));
    (server, log)
}

/// A berth mirroring `auth_upstream` as `private.example`, with its credentials or without.
fn auth_berth(upstream_port: u16, credentials: bool, dir: &std::path::Path) -> Berth {
    let creds = if credentials {
        let pw = dir.join("upstream.pw");
        std::fs::write(&pw, "pw").unwrap();
        format!("username = \"bot\"\npassword_file = \"{}\"\n", pw.display())
    } else {
        String::new()
    };
    Berth::start(&format!("[[upstream]]\nname = \"private.example\"\nurl = \"http://127.0.0.1:{upstream_port}\"\n{creds}"))
}

fn pull_auth_manifest(b: &Berth, repo: &str, tag: &str) -> reqwest::StatusCode {
    let r = client().get(format!("{}/v2/private.example/{repo}/manifests/{tag}", b.url())).send().unwrap();
    let status = r.status();
    if status == 200 {
        assert_eq!(r.bytes().unwrap().as_ref(), auth_manifest(repo, tag).as_slice(), "{repo}:{tag}");
    }
    status
}

#[test]
fn basic_auth_for_one_repository_leaves_another_on_tokens() {
    let (upstream, log) = auth_upstream();
    let dir = tempfile::tempdir().unwrap();
    let b = auth_berth(upstream.port, true, dir.path());
    let take = || std::mem::take(&mut *log.lock().unwrap());

    assert_eq!(pull_auth_manifest(&b, "basic/app", "v1"), 200);
    assert_eq!(take(), ["basic/app none 401", "basic/app basic 200"]);
    // The Basic answer above must not make berth send Basic where the upstream wants a token.
    assert_eq!(pull_auth_manifest(&b, "token/app", "v1"), 200);
    assert_eq!(take(), ["token/app none 401", "token", "token/app bearer 200"]);
    // Each repository is then asked its own way up front: no 401, no second token.
    assert_eq!(pull_auth_manifest(&b, "basic/app", "v2"), 200);
    assert_eq!(pull_auth_manifest(&b, "token/app", "v2"), 200);
    assert_eq!(take(), ["basic/app basic 200", "token/app bearer 200"]);
}

#[test]
fn an_upstream_offering_basic_and_bearer_is_answered_with_a_token() {
    let (upstream, log) = auth_upstream();
    for credentials in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let b = auth_berth(upstream.port, credentials, dir.path());
        for repo in ["both/one-header", "both/two-headers"] {
            log.lock().unwrap().clear();
            assert_eq!(pull_auth_manifest(&b, repo, "v1"), 200, "{repo}, credentials: {credentials}");
            assert_eq!(
                *log.lock().unwrap(),
                [format!("{repo} none 401"), "token".to_string(), format!("{repo} bearer 200")],
                "credentials: {credentials}"
            );
        }
        // Basic alone, with nothing to answer it: the upstream's refusal, named.
        if !credentials {
            let r = client().get(format!("{}/v2/private.example/basic/app/manifests/v1", b.url())).send().unwrap();
            assert_eq!(r.status(), 403);
            let body = r.bytes().unwrap();
            assert_eq!(oci_code(&body), "DENIED");
            assert!(String::from_utf8_lossy(&body).contains("private.example"));
        }
    }
}
