//! The mirror when its upstream is slow, down or rate-limiting: cached tags past their TTL are
//! served without waiting for the upstream (past `stale_after`, or at once while its circuit is
//! open), one check per tag however many clients ask, and a pull budget read from Docker Hub's
//! rate-limit headers that stops spending pulls on what has a cached answer.

mod common;

use common::fake::Fake;
use common::{eventually, Berth};
use reqwest::blocking::Client;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Watching is off: these tests count the checks that pulls make.
fn config(fake: &Fake, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\ntag_ttl = \"1s\"\nwatch_window = \"0s\"\n{extra}\n",
        fake.url()
    )
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn pull(c: &Client, b: &Berth, tag: &str) -> reqwest::blocking::Response {
    c.get(format!("{}/v2/library/app/manifests/{tag}", b.url())).header("Accept", OCI_MANIFEST).send().unwrap()
}

/// Waits (bounded) until the tag cached at `since` is past its 1 s TTL.
fn past_ttl(since: Instant) {
    assert!(eventually(Duration::from_secs(5), || since.elapsed() > Duration::from_millis(1100)));
}

/// `n` concurrent pulls of `tag`; returns (status, X-Berth-Cache, digest) of each.
fn herd(b: &Berth, tag: &str, n: usize) -> Vec<(u16, String, String)> {
    let start = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, tag, start) = (b.url(), tag.to_string(), start.clone());
            std::thread::spawn(move || {
                let c = client();
                start.wait();
                let r = c.get(format!("{url}/v2/library/app/manifests/{tag}")).header("Accept", OCI_MANIFEST).send().unwrap();
                let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                (r.status().as_u16(), h("x-berth-cache"), h("docker-content-digest"))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn cached_tags_do_not_wait_for_a_slow_or_dead_upstream() {
    let mut fake = Fake::start();
    let (md, _, _) = fake.add_image("library/app", "1", b"layer one");
    // A first byte may take a minute: berth must not wait that long for a tag it has.
    let b = Berth::start(&config(&fake, "timeout = \"60s\"\nstale_after = \"3s\""));
    let c = client();
    assert_eq!(pull(&c, &b, "1").status(), 200);
    let cached = Instant::now();
    past_ttl(cached);

    // Slow: every answer takes 30 s. 50 clients are served from the cache after
    // `stale_after`, and one check runs for all of them.
    fake.state.lock().unwrap().manifest_delay = Some(Duration::from_secs(30));
    let heads = fake.count("HEAD manifest");
    let t = Instant::now();
    let got = herd(&b, "1", 50);
    assert!(t.elapsed() < Duration::from_secs(20), "50 pulls took {:?}: they waited for the upstream", t.elapsed());
    for (status, cache, d) in &got {
        assert_eq!((*status, cache.as_str(), d.as_str()), (200, "stale", md.as_str()));
    }
    assert_eq!(fake.count("HEAD manifest") - heads, 1, "one check for 50 clients");
    // The check is still running, known to be slow: later pulls do not wait for it again (each
    // would take the whole `stale_after` if they did).
    for _ in 0..10 {
        let t = Instant::now();
        let r = pull(&c, &b, "1");
        assert_eq!(r.headers()["x-berth-cache"], "stale");
        assert!(t.elapsed() < Duration::from_millis(2900), "a pull waited {:?} for a check known to be slow", t.elapsed());
    }
    assert_eq!(fake.count("HEAD manifest") - heads, 1);

    // Down: refused connections. Pulls go on from the cache.
    fake.stop();
    fake.state.lock().unwrap().manifest_delay = None;
    let t = Instant::now();
    for (status, cache, d) in herd(&b, "1", 50) {
        assert_eq!((status, cache.as_str(), d.as_str()), (200, "stale", md.as_str()));
    }
    assert!(t.elapsed() < Duration::from_secs(20), "50 pulls took {:?}", t.elapsed());
    // Three failures opened the circuit: berth no longer even tries, and says so for what it
    // has no copy of.
    assert!(eventually(Duration::from_secs(10), || {
        let m = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
        m.contains("berth_upstream_state{upstream=\"docker.io\"} 2")
    }));
    let r = pull(&c, &b, "never-cached");
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains("docker.io"));
}

#[test]
fn one_check_per_expired_tag_however_many_ask() {
    let fake = Fake::start();
    let (md, _, _) = fake.add_image("library/app", "1", b"layer one");
    let b = Berth::start(&config(&fake, ""));
    let c = client();
    assert_eq!(pull(&c, &b, "1").status(), 200);
    past_ttl(Instant::now());
    // Each answer takes a moment, so the 100 requests overlap the one check.
    fake.state.lock().unwrap().manifest_delay = Some(Duration::from_millis(300));
    let heads = fake.count("HEAD manifest");
    for (status, cache, d) in herd(&b, "1", 100) {
        assert_eq!((status, cache.as_str(), d.as_str()), (200, "hit", md.as_str()));
    }
    assert_eq!(fake.count("HEAD manifest") - heads, 1, "100 requests for one expired tag, one HEAD");
}

#[test]
fn the_pull_budget_keeps_cached_answers_at_its_reserve() {
    let fake = Fake::start();
    let (v1, _, _) = fake.add_image("library/app", "1", b"layer one");
    let headers = |remaining: u32| {
        vec![
            ("ratelimit-limit".to_string(), "100;w=21600".to_string()),
            ("ratelimit-remaining".to_string(), format!("{remaining};w=21600")),
        ]
    };
    fake.state.lock().unwrap().manifest_headers = headers(50);
    let b = Berth::start(&config(&fake, "ratelimit_reserve = \"10%\""));
    let c = client();
    assert_eq!(pull(&c, &b, "1").status(), 200);
    let cached = Instant::now();
    // The upstream moves the tag while only 5 pulls are left: berth sees it with a HEAD (free)
    // but keeps serving its cached copy rather than spend a pull.
    let (v2, _, _) = fake.add_image("library/app", "1", b"layer two");
    assert_ne!(v1, v2);
    fake.state.lock().unwrap().manifest_headers = headers(5);
    assert_eq!(c.get(format!("{}/v2/library/app/manifests/other", b.url())).send().unwrap().status(), 404);
    let gets = fake.count("GET manifest");
    past_ttl(cached);
    for _ in 0..5 {
        let r = pull(&c, &b, "1");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], v1.as_str());
    }
    assert_eq!(fake.count("GET manifest"), gets, "no pull spent on a tag with a cached answer");
    assert!(fake.count("HEAD manifest") >= 1);
    let m = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    assert!(m.contains("berth_upstream_pulls_saved_total{upstream=\"docker.io\"} 1"), "{m}");
    assert!(m.contains("berth_upstream_ratelimit_remaining{upstream=\"docker.io\"} 5"), "{m}");

    // At zero, nothing but the cache: a cached tag is served, an uncached one is refused with
    // 429 naming the upstream, and nothing is asked of it.
    fake.state.lock().unwrap().manifest_headers = headers(0);
    let cached = Instant::now();
    let r = pull(&c, &b, "1");
    assert_eq!(r.status(), 200);
    past_ttl(cached);
    assert_eq!(pull(&c, &b, "1").status(), 200);
    let asked = fake.count("GET manifest");
    let r = pull(&c, &b, "2");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().unwrap().contains("docker.io"));
    assert_eq!(fake.count("GET manifest"), asked);
}

/// `offline = true`: never contacted; what berth cached is served as it is (tags do not go
/// stale), anything else is a 503 naming the upstream.
#[test]
fn an_offline_upstream_is_never_contacted() {
    let fake = Fake::start();
    let (md, _, ld) = fake.add_image("library/app", "1", b"layer one");
    let mut b = Berth::start(&config(&fake, ""));
    let c = client();
    assert_eq!(pull(&c, &b, "1").status(), 200);
    assert_eq!(c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap().status(), 200);
    let text = std::fs::read_to_string(&b.config_path).unwrap();
    std::fs::write(&b.config_path, text.replace("tag_ttl = \"1s\"", "tag_ttl = \"1s\"\noffline = true")).unwrap();
    b.restart();
    let asked: usize = fake.state.lock().unwrap().counts.values().sum();
    past_ttl(Instant::now());
    for _ in 0..3 {
        let r = pull(&c, &b, "1");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        assert_eq!(r.headers()["x-berth-cache"], "hit");
    }
    let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(format!("{}/v2/library/app/tags/list", b.url())).send().unwrap().status(), 200);
    let r = pull(&c, &b, "2");
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains("offline"));
    let now: usize = fake.state.lock().unwrap().counts.values().sum();
    assert_eq!(now, asked, "an offline upstream was contacted");
}
