//! Several URLs per upstream: tried in order, a failing URL (refused, hanging, 5xx) passes the
//! request to the next, each URL with its own circuit and credentials, and a 404 is an answer.

mod common;

use common::fake::{Fake, Fault};
use common::Berth;
use reqwest::blocking::Client;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn config(urls: &str, extra: &str) -> String {
    format!("[[upstream]]\nname = \"docker.io\"\ndefault = true\nurls = [{urls}]\n{extra}\n")
}

fn quoted(f: &Fake) -> String {
    format!("\"{}\"", f.url())
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// The same `n` images in each fake; returns (tag, manifest digest, layer digest) of each.
fn images(fakes: &[&Fake], n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let tag = format!("v{i}");
        let layer = common::random_bytes(64 * 1024, i as u64 + 1);
        let mut got = None;
        for f in fakes {
            let (md, _, ld) = f.add_image("library/app", &tag, &layer);
            got = Some((tag.clone(), md, ld));
        }
        out.push(got.unwrap());
    }
    out
}

/// Pulls each image through berth (manifest, then layer) and checks the bytes.
fn pull_all(b: &Berth, imgs: &[(String, String, String)]) {
    let c = client();
    for (tag, md, ld) in imgs {
        let r = c.get(format!("{}/v2/library/app/manifests/{tag}", b.url())).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(r.status(), 200, "{tag}: {}", r.text().unwrap_or_default());
        assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), md);
        let r = c.get(format!("{}/v2/library/app/blobs/{ld}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(common::digest(&r.bytes().unwrap()), *ld);
    }
}

fn upstream_requests(f: &Fake) -> usize {
    f.state.lock().unwrap().counts.iter().filter(|(k, _)| k.contains(' ')).map(|(_, n)| n).sum()
}

#[test]
fn a_refused_first_url_passes_every_pull_to_the_second() {
    let mut first = Fake::start();
    let second = Fake::start();
    let imgs = images(&[&first, &second], 4);
    first.stop();
    let b = Berth::start(&config(&format!("{}, {}", quoted(&first), quoted(&second)), ""));
    pull_all(&b, &imgs);
    assert_eq!(second.count("GET manifest"), 4);
    assert_eq!(second.count("GET blob"), 4);
    assert_eq!(upstream_requests(&first), 0, "the first URL's port is closed");
    assert!(b.log().contains("upstream URL failed; trying the next"), "the failover is logged");
}

#[test]
fn a_hanging_first_url_costs_a_timeout_only_until_its_circuit_opens() {
    let first = Fake::start();
    let second = Fake::start();
    let imgs = images(&[&first, &second], 5);
    first.set_fault(Fault::Hang);
    let b = Berth::start(&config(&format!("{}, {}", quoted(&first), quoted(&second)), "timeout = \"1s\""));
    let started = Instant::now();
    pull_all(&b, &imgs);
    let took = started.elapsed();
    // Ten upstream requests: three wait out the first URL's timeout and open its circuit; the
    // rest go straight to the second.
    assert_eq!(second.count("GET manifest") + second.count("GET blob"), 10);
    assert_eq!(upstream_requests(&first), 3, "the open circuit keeps requests off the first URL");
    assert!(took < Duration::from_secs(5), "{took:?}: only the first three requests wait for a timeout");
}

#[test]
fn a_failing_first_url_passes_to_the_second_and_a_healthy_one_serves_everything() {
    let first = Fake::start();
    let second = Fake::start();
    let imgs = images(&[&first, &second], 4);
    first.set_fault(Fault::Status(503));
    let b = Berth::start(&config(&format!("{}, {}", quoted(&first), quoted(&second)), ""));
    pull_all(&b, &imgs[..2]);
    assert_eq!(second.count("GET manifest") + second.count("GET blob"), 4);
    assert_eq!(upstream_requests(&first), 3, "three 503s open the first URL's circuit");

    // A healthy first URL serves everything; the second gets nothing.
    let first = Fake::start();
    let second = Fake::start();
    let imgs = images(&[&first, &second], 4);
    let b = Berth::start(&config(&format!("{}, {}", quoted(&first), quoted(&second)), ""));
    pull_all(&b, &imgs);
    assert_eq!(first.count("GET manifest") + first.count("GET blob"), 8);
    assert_eq!(upstream_requests(&second), 0);

    // A 404 is the upstream's answer, not a failure: the second URL is not asked.
    second.add_image("library/app", "only-second", b"elsewhere");
    let r = client().get(format!("{}/v2/library/app/manifests/only-second", b.url())).header("Accept", OCI_MANIFEST).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(upstream_requests(&second), 0);
}

#[test]
fn each_url_gets_its_own_credentials() {
    let mut first = Fake::start();
    let second = Fake::start();
    let imgs = images(&[&first, &second], 2);
    first.state.lock().unwrap().require_basic = Some("corp:corp-secret".into());
    second.state.lock().unwrap().require_basic = Some("hub:hub-secret".into());
    let dir = tempfile::tempdir().unwrap();
    let (corp, hub) = (dir.path().join("corp"), dir.path().join("hub"));
    std::fs::write(&corp, "corp-secret\n").unwrap();
    std::fs::write(&hub, "hub-secret\n").unwrap();
    // The table entry has its own; the plain one gets the upstream's.
    let urls = format!("{{ url = \"{}\", username = \"corp\", password_file = \"{}\" }}, {}", first.url(), corp.display(), quoted(&second));
    let b = Berth::start(&config(&urls, &format!("username = \"hub\"\npassword_file = \"{}\"", hub.display())));
    pull_all(&b, &imgs[..1]);
    assert_eq!(first.count("GET manifest"), 2, "one challenge, then the corp credentials");
    assert_eq!(upstream_requests(&second), 0);
    first.stop();
    pull_all(&b, &imgs[1..]);
    assert_eq!(second.count("GET manifest"), 2, "one challenge, then the hub credentials");
    assert_eq!(second.count("GET blob"), 1);
}
