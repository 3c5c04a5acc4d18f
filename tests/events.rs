//! Events, webhooks and the audit log against the real binary: a receiver on loopback that
//! checks every delivery's signature and counts events by id; it turns slow, goes away, berth
//! is killed with -9 and restarted meanwhile, and every push is then delivered as recorded.
//! Filters, dead letters and their replay, and the audit log with its rotation; in a cluster
//! (S3 only), a dead node's events delivered by the lease holder.

mod common;

use common::Berth;
use reqwest::blocking::Client;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SECRET: &str = "a-webhook-secret-of-some-length";

fn client() -> Client {
    Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

// ---- the receiver ----

#[derive(Default)]
struct Seen {
    /// Deliveries per event id.
    by_id: HashMap<String, usize>,
    events: HashMap<String, Value>,
    bad_signatures: usize,
    bad_content_types: usize,
}

/// 0: answers 200; 1: holds the request without answering (a slow receiver).
const UP: u8 = 0;
const SLOW: u8 = 1;

struct Receiver {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn signature(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

fn handle(mut s: TcpStream, seen: &Mutex<Seen>, mode: &AtomicU8) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if mode.load(Ordering::SeqCst) == SLOW {
        std::thread::sleep(Duration::from_secs(3));
        return;
    }
    let body = &buf[head_end..head_end + len];
    {
        let mut seen = seen.lock().unwrap();
        if header("x-berth-signature-256").as_deref() != Some(signature(body).as_str()) {
            seen.bad_signatures += 1;
        } else {
            if header("content-type").as_deref() != Some("application/cloudevents+json") {
                seen.bad_content_types += 1;
            }
            let ev: Value = serde_json::from_slice(body).unwrap();
            let id = ev["id"].as_str().unwrap().to_string();
            *seen.by_id.entry(id.clone()).or_default() += 1;
            seen.events.insert(id, ev);
        }
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

impl Receiver {
    fn start(port: u16, seen: Arc<Mutex<Seen>>, mode: Arc<AtomicU8>) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, m, st) = (seen.clone(), mode.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let (s, m) = (s.clone(), m.clone());
                        std::thread::spawn(move || handle(conn, &s, &m));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver { port, seen, mode, stop, thread: Some(thread) }
    }

    fn new() -> Receiver {
        Receiver::start(common::free_port(), Arc::default(), Arc::new(AtomicU8::new(UP)))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Stops listening: connections are refused until `restarted`.
    fn stop(mut self) -> (u16, Arc<Mutex<Seen>>, Arc<AtomicU8>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (self.port, self.seen.clone(), self.mode.clone())
    }

    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().by_id.len()
    }

    /// Events received, by type.
    fn of_type(&self, kind: &str) -> Vec<Value> {
        self.seen.lock().unwrap().events.values().filter(|e| e["type"] == format!("dev.berth.{kind}")).cloned().collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---- berth ----

fn secret_file(dir: &Path) -> String {
    let p = dir.join("hook.secret");
    std::fs::write(&p, format!("{SECRET}\n")).unwrap();
    p.display().to_string()
}

fn webhook(dir: &Path, url: &str, extra: &str) -> String {
    format!("[[webhook]]\nurl = \"{url}\"\nsecret_file = \"{}\"\n{extra}\n", secret_file(dir))
}

fn push_blob(c: &Client, base: &str, repo: &str, data: &[u8]) -> u16 {
    let d = common::digest(data);
    c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap().status().as_u16()
}

/// Pushes a manifest (over a config blob it pushes first) as `repo:tag`; returns its digest.
fn push(c: &Client, base: &str, repo: &str, tag: &str) -> String {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    assert_eq!(push_blob(c, base, repo, config), 201);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[],"annotations":{{"t":"{repo}:{tag}"}}}}"#,
        common::digest(config),
        config.len()
    );
    let r = c.put(format!("{base}/v2/{repo}/manifests/{tag}")).header("Content-Type", OCI_MANIFEST).body(m.clone()).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    common::digest(m.as_bytes())
}

fn admin_json(c: &Client, b: &Berth, path: &str) -> Value {
    c.get(format!("{}{path}", b.admin_url())).send().unwrap().json().unwrap()
}

fn metric(c: &Client, b: &Berth, name: &str) -> f64 {
    let text = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(-1.0)
}

#[test]
fn every_push_is_delivered_across_a_dead_receiver_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::new();
    let hook = webhook(dir.path(), &r.url(), "timeout = \"1s\"\n");
    let mut b = Berth::start_in(dir, &format!("[[namespace]]\nprefix = \"team\"\n\n{hook}"));
    let c = client();
    let mut expected: HashMap<String, String> = HashMap::new();
    let mut push_tag = |b: &Berth, i: usize| {
        let tag = format!("t{i}");
        let d = push(&c, &b.url(), "team/app", &tag);
        expected.insert(tag, d);
    };

    // Receiver up.
    for i in 0..10 {
        push_tag(&b, i);
    }
    assert!(common::eventually(Duration::from_secs(20), || r.distinct() == 10), "delivered {} of 10", r.distinct());

    // Receiver slow: it holds every delivery; pushes do not wait for it.
    r.mode.store(SLOW, Ordering::SeqCst);
    let t = Instant::now();
    for i in 10..15 {
        push_tag(&b, i);
    }
    assert!(t.elapsed() < Duration::from_secs(3), "5 pushes took {:?} with a slow receiver", t.elapsed());

    // Receiver gone; berth killed with -9 and restarted meanwhile.
    let (port, seen, mode) = r.stop();
    for i in 15..20 {
        push_tag(&b, i);
    }
    b.kill();
    b.spawn();
    for i in 20..25 {
        push_tag(&b, i);
    }
    mode.store(UP, Ordering::SeqCst);
    let r = Receiver::start(port, seen, mode);

    let ok = common::eventually(Duration::from_secs(60), || r.distinct() >= 25);
    let pushed = r.of_type("manifest.pushed");
    assert!(ok, "delivered {} of 25 events; log:\n{}", pushed.len(), b.log());
    // Exactly the pushes as recorded: one event per push, each naming its tag and digest.
    let mut got: HashMap<String, String> = HashMap::new();
    for e in &pushed {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["subject"], "team/app");
        assert_eq!(e["datacontenttype"], "application/json");
        assert!(e["source"].as_str().is_some_and(|s| !s.is_empty()) && e["time"].as_str().is_some());
        assert_eq!(e["data"]["repository"], "team/app");
        assert_eq!(e["data"]["mediaType"], OCI_MANIFEST);
        let tag = e["data"]["tag"].as_str().unwrap().to_string();
        let d = e["data"]["digest"].as_str().unwrap().to_string();
        assert!(got.insert(tag.clone(), d).is_none(), "two different events for {tag}");
    }
    assert_eq!(got, expected);
    assert_eq!(r.distinct(), 25, "events beyond the pushes");
    let seen = r.seen.lock().unwrap();
    assert_eq!(seen.bad_signatures, 0);
    assert_eq!(seen.bad_content_types, 0);
    drop(seen);
    assert!(metric(&c, &b, "berth_webhook_delivered_total") >= 5.0);
    assert!(metric(&c, &b, "berth_webhook_retried_total") >= 1.0);
    // The outbox drains: nothing left to deliver.
    assert!(common::eventually(Duration::from_secs(10), || metric(&c, &b, "berth_webhook_queue_age_seconds") == 0.0));
    let deliveries = admin_json(&c, &b, "/events/deliveries");
    assert!(deliveries.as_array().unwrap().iter().any(|d| d["status"] == "delivered" && d["subject"] == "team/app"), "{deliveries}");
}

#[test]
fn webhooks_take_only_their_events_and_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let deletes = Receiver::new();
    let team = Receiver::new();
    let hooks = format!(
        "{}{}",
        webhook(dir.path(), &deletes.url(), "events = [\"tag.deleted\"]\n"),
        webhook(dir.path(), &team.url(), "namespaces = [\"team\"]\n")
    );
    let b = Berth::start_in(dir, &format!("[[namespace]]\nprefix = \"team\"\n\n[[namespace]]\nprefix = \"other\"\n\n{hooks}"));
    let c = client();
    let team_digest = push(&c, &b.url(), "team/app", "v1");
    push(&c, &b.url(), "other/app", "v1");
    for repo in ["team/app", "other/app"] {
        assert_eq!(c.delete(format!("{}/v2/{repo}/manifests/v1", b.url())).send().unwrap().status(), 202);
    }
    // Every recorded delivery done: 2 for the deletes hook, 2 for the team hook.
    let done = common::eventually(Duration::from_secs(20), || {
        let d = admin_json(&c, &b, "/events/deliveries");
        let d = d.as_array().unwrap();
        d.len() == 4 && d.iter().all(|x| x["status"] == "delivered")
    });
    assert!(done, "{}", admin_json(&c, &b, "/events/deliveries"));
    assert_eq!(deletes.distinct(), 2);
    let mut deleted: Vec<String> = deletes.of_type("tag.deleted").iter().map(|e| e["subject"].as_str().unwrap().to_string()).collect();
    deleted.sort();
    assert_eq!(deleted, vec!["other/app", "team/app"]);
    assert_eq!(team.distinct(), 2);
    let pushed = team.of_type("manifest.pushed");
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0]["data"]["digest"], team_digest.as_str());
    let untagged = team.of_type("tag.deleted");
    assert_eq!(untagged.len(), 1);
    assert_eq!(untagged[0]["subject"], "team/app");
    assert_eq!(untagged[0]["data"]["tag"], "v1");
    assert_eq!(untagged[0]["data"]["digest"], team_digest.as_str());

    // A manifest deleted by digest is its own event; the deletes hook does not take it.
    let v2 = push(&c, &b.url(), "team/app", "v2");
    assert_eq!(c.delete(format!("{}/v2/team/app/manifests/{v2}", b.url())).send().unwrap().status(), 202);
    assert!(common::eventually(Duration::from_secs(20), || team.distinct() == 4), "{}", admin_json(&c, &b, "/events/deliveries"));
    let gone = team.of_type("manifest.deleted");
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["subject"], "team/app");
    assert_eq!(gone[0]["data"]["digest"], v2.as_str());
    assert_eq!(gone[0]["data"]["tags"], serde_json::json!(["v2"]));
    assert_eq!(deletes.distinct(), 2);

    // Deliveries yield the CPU to serving: the sender's thread runs at nice 10.
    let pid = b.child.as_ref().unwrap().id();
    let nices = thread_nices(pid, "BG events");
    assert!(!nices.is_empty() && nices.iter().all(|n| *n == 10), "the event sender's threads have nice {nices:?}");
}

/// The nice values of a process's threads named `name` (pingora names a background service's
/// thread "BG <service>").
fn thread_nices(pid: u32, name: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = t.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // The fields after the command's closing parenthesis start at the 3rd; nice is the 19th.
        if let Some(n) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(16)).and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out
}

#[test]
fn undelivered_events_become_dead_letters_that_replay_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let hook = webhook(dir.path(), &format!("http://127.0.0.1:{port}/hook"), "max_age = \"2s\"\n");
    let b = Berth::start_in(dir, &format!("[[namespace]]\nprefix = \"team\"\n\n{hook}"));
    let c = client();
    let digest = push(&c, &b.url(), "team/app", "v1");
    let dead = common::eventually(Duration::from_secs(20), || admin_json(&c, &b, "/events/dead").as_array().unwrap().len() == 1);
    assert!(dead, "no dead letter; log:\n{}", b.log());
    assert_eq!(metric(&c, &b, "berth_webhook_dead_total"), 1.0);
    let letter = admin_json(&c, &b, "/events/dead")[0].clone();
    assert_eq!(letter["type"], "dev.berth.manifest.pushed");
    assert_eq!(letter["subject"], "team/app");
    assert!(letter["attempts"].as_u64().unwrap() >= 2, "{letter}");

    let r = Receiver::start(port, Arc::default(), Arc::new(AtomicU8::new(UP)));
    let missing = c.post(format!("{}/events/dead/nope/replay", b.admin_url())).send().unwrap();
    assert_eq!(missing.status(), 404);
    let name = letter["name"].as_str().unwrap();
    let replay = c.post(format!("{}/events/dead/{name}/replay", b.admin_url())).send().unwrap();
    assert_eq!(replay.status(), 200);
    assert!(common::eventually(Duration::from_secs(20), || r.distinct() == 1));
    let seen = r.seen.lock().unwrap();
    // The same event, under the same id.
    let ev = &seen.events[letter["id"].as_str().unwrap()];
    assert_eq!(ev["data"]["digest"], digest.as_str());
    assert_eq!(seen.bad_signatures, 0);
    drop(seen);
    assert!(admin_json(&c, &b, "/events/dead").as_array().unwrap().is_empty());
}

#[test]
fn audit_log_has_every_event_and_rotates_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    std::fs::write(&ht, format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap())).unwrap();
    let audit = dir.path().join("audit").join("audit.log");
    let b = Berth::start_in(
        dir,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n\n[[namespace]]\nprefix = \"team\"\n\n[[namespace]]\nprefix = \"small\"\nquota_bytes = 64\n\n[events]\naudit_file = \"{}\"\naudit_max_size = \"4KiB\"\naudit_keep = 2\n",
            ht.display(),
            audit.display()
        ),
    );
    let c = client();
    let as_alice = |r: reqwest::blocking::RequestBuilder| r.basic_auth("alice", Some("wonderland"));
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let d = common::digest(config);
    let up = as_alice(c.post(format!("{}/v2/team/app/blobs/uploads/?digest={d}", b.url()))).body(config.to_vec()).send().unwrap();
    assert_eq!(up.status(), 201);
    for i in 0..30 {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":{}}},"layers":[],"annotations":{{"n":"{i}"}}}}"#,
            config.len()
        );
        let r =
            as_alice(c.put(format!("{}/v2/team/app/manifests/t{i}", b.url()))).header("Content-Type", OCI_MANIFEST).body(m).send().unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(as_alice(c.delete(format!("{}/v2/team/app/manifests/t29", b.url()))).send().unwrap().status(), 202);
    let big = vec![7u8; 200];
    let refused =
        as_alice(c.post(format!("{}/v2/small/x/blobs/uploads/?digest={}", b.url(), common::digest(&big)))).body(big).send().unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(c.post(format!("{}/gc", b.admin_url())).send().unwrap().status(), 200);

    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let numbered = |n: usize| audit.with_file_name(format!("audit.log.{n}"));
    assert!(common::eventually(Duration::from_secs(10), || read(&audit).iter().any(|l| l["type"] == "dev.berth.gc.completed")));
    assert!(std::fs::metadata(&audit).unwrap().len() <= 4096);
    assert!(numbered(1).exists() && numbered(2).exists(), "not rotated");
    assert!(!numbered(3).exists(), "kept more than audit_keep");
    let lines: Vec<Value> = [numbered(2), numbered(1), audit.clone()].iter().flat_map(|p| read(p)).collect();
    let last_push = lines.iter().find(|l| l["type"] == "dev.berth.manifest.pushed" && l["data"]["tag"] == "t28").expect("t28 pushed");
    assert_eq!(last_push["actor"], "alice");
    assert_eq!(last_push["client"], "127.0.0.1");
    assert_eq!(last_push["subject"], "team/app");
    assert!(last_push["time"].as_str().is_some_and(|t| t.starts_with("20")));
    let deleted = lines.iter().find(|l| l["type"] == "dev.berth.tag.deleted").expect("tag delete audited");
    assert_eq!(deleted["data"]["tag"], "t29");
    assert_eq!(deleted["actor"], "alice");
    let quota = lines.iter().find(|l| l["type"] == "dev.berth.quota.refused").expect("quota refusal audited");
    assert_eq!(quota["subject"], "small/x");
    // The oldest pushes were rotated away, the newest kept, in order.
    assert!(!lines.iter().any(|l| l["data"]["tag"] == "t0"));
    let tags: Vec<&str> = lines.iter().filter_map(|l| l["data"]["tag"].as_str()).filter(|t| *t != "t29").collect();
    let mut sorted = tags.clone();
    sorted.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    assert_eq!(tags, sorted);
}

#[test]
fn a_mirror_fill_of_a_new_tag_is_an_event() {
    let fake = common::fake::Fake::start();
    let (md, _, _) = fake.add_image("library/alpine", "3", b"a layer");
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::new();
    let hook = webhook(dir.path(), &r.url(), "events = [\"mirror.filled\"]\n");
    let b = Berth::start_in(dir, &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n\n{hook}", fake.url()));
    let c = client();
    // The second pull is served from the cache: no new tag, no event.
    for _ in 0..2 {
        let resp = c.get(format!("{}/v2/docker.io/library/alpine/manifests/3", b.url())).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(resp.status(), 200);
    }
    let done = common::eventually(Duration::from_secs(20), || {
        let d = admin_json(&c, &b, "/events/deliveries");
        d.as_array().unwrap().iter().all(|x| x["status"] == "delivered") && r.distinct() >= 1
    });
    assert!(done, "{}", admin_json(&c, &b, "/events/deliveries"));
    assert_eq!(r.distinct(), 1);
    let e = &r.of_type("mirror.filled")[0];
    assert!(e["subject"].as_str().unwrap().ends_with("library/alpine"), "{e}");
    assert_eq!(e["data"]["upstream"], "docker.io");
    assert_eq!(e["data"]["tag"], "3");
    assert_eq!(e["data"]["digest"], md.as_str());
}

/// In a cluster, the events a node recorded and could not deliver before it died are
/// delivered by the lease holder: none is lost with the node. Runs on S3 only.
#[test]
fn a_dead_nodes_events_are_delivered_by_the_lease_holder() {
    let keep = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let hook = webhook(keep.path(), &format!("http://127.0.0.1:{port}/hook"), "timeout = \"1s\"\n");
    let Some(mut c) = common::cluster::Nodes::start(2, "", &format!("[[namespace]]\nprefix = \"team\"\n\n{hook}")) else { return };
    let holder =
        |c: &common::cluster::Nodes| c.nodes.iter().position(|b| common::cluster::metric(b, "berth_cluster_lease_held") == Some(1.0));
    assert!(common::eventually(Duration::from_secs(15), || holder(&c).is_some()));
    let leader = holder(&c).unwrap();
    let doomed = 1 - leader;
    let http = client();
    // Recorded on the node that dies, while the receiver is away.
    let mut expected: HashMap<String, String> = HashMap::new();
    for i in 0..5 {
        let tag = format!("t{i}");
        expected.insert(tag.clone(), push(&http, &c.nodes[doomed].url(), "team/app", &tag));
    }
    c.nodes[doomed].kill();
    let r = Receiver::start(port, Arc::default(), Arc::new(AtomicU8::new(UP)));
    let ok = common::eventually(Duration::from_secs(90), || r.distinct() >= 5);
    assert!(ok, "delivered {} of 5; the lease holder's log:\n{}", r.distinct(), c.nodes[leader].log());
    let got: HashMap<String, String> = r
        .of_type("manifest.pushed")
        .iter()
        .map(|e| (e["data"]["tag"].as_str().unwrap().to_string(), e["data"]["digest"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(r.seen.lock().unwrap().bad_signatures, 0);
}
