//! Slow and stalled clients: downloads nobody reads (plain, trickling, over TLS) and an upload
//! whose body stops are ended by berth within `[server] write_timeout` and
//! `body_read_timeout`, while other clients keep being answered by its one worker thread.

mod common;
mod support;

use common::{free_port, Berth};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Several times what loopback socket buffers take from a client that does not read (the
/// server's send buffer grows to a few MiB; the client's receive buffer grows only as it reads).
const BLOB: usize = 32 << 20;
/// What the drop may take beyond its timeout: filling the socket buffers, a loaded machine.
const SLACK: Duration = Duration::from_secs(8);
/// One worker thread: a client held on it would starve every other.
const SERVER: &str = "threads = 1\nwrite_timeout = \"2s\"\nmin_send_rate = \"64KiB\"\nbody_read_timeout = \"2s\"\n";
const HOSTED: &str = "[[namespace]]\nprefix = \"team\"\n\n[log]\nformat = \"json\"\n";

fn start(server_extra: &str) -> Berth {
    Berth::start_in_with_server(tempfile::tempdir().unwrap(), &format!("{SERVER}{server_extra}"), HOSTED)
}

fn blob() -> Vec<u8> {
    (0..BLOB).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// The `fields` of berth's access lines once `done` holds for them (each is written when its
/// request ends), or whatever there is at the deadline.
fn access_when(b: &Berth, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let lines: Vec<Value> = b
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .map(|v| v["fields"].clone())
            .collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn failed_blob_gets(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|f| f["route"] == "blob" && f["method"] == "GET" && f["error"].as_str().is_some_and(|e| !e.is_empty())).collect()
}

fn duration(f: &Value) -> Duration {
    Duration::from_secs_f64(f["duration_ms"].as_f64().expect("duration_ms") / 1000.0)
}

/// Reads what berth had queued before it closed, up to the close: the count of bytes, or a
/// panic if the connection is still open after `limit`.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let (mut total, mut buf) = (0, vec![0u8; 1 << 20]);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return total,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
    panic!("connection still open {limit:?} after berth logged it ended ({total} bytes read)");
}

#[test]
fn downloads_nobody_reads_are_dropped_within_write_timeout() {
    let b = start("");
    let data = blob();
    let digest = support::push_blob(&b.url(), "team/app", &data);
    let request = format!("GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: {}\r\n\r\n", b.host());

    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    // A client reading 100 bytes a second: as good as stalled for a 32 MiB blob.
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (mut s, stop) = (TcpStream::connect(("127.0.0.1", b.port)).unwrap(), stop.clone());
        s.write_all(request.as_bytes()).unwrap();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut byte = [0u8; 1];
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && matches!(s.read(&mut byte), Ok(1)) {
                // Pacing: this is the slow client under test.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // While those hold their connections, everyone else is answered, big bodies included.
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(format!("{}/v2/", b.url())).send().unwrap().status(), 200);
        let r = c.get(format!("{}/v2/team/app/blobs/{digest}", b.url())).send().unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().unwrap() == data);
    }

    let lines = access_when(&b, WRITE_TIMEOUT + SLACK + Duration::from_secs(10), |l| failed_blob_gets(l).len() >= 3);
    let seen = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let failed = failed_blob_gets(&lines);
    assert_eq!(failed.len(), 3, "three stalled downloads should have been ended: {lines:#?}\n{}", b.log());
    for f in &failed {
        let took = duration(f);
        eprintln!("stalled download ended after {took:?}: {}", f["error"]);
        assert!(took >= WRITE_TIMEOUT - Duration::from_millis(50), "ended before write_timeout: {f}");
        assert!(took <= WRITE_TIMEOUT + SLACK, "took too long to end: {f}");
        assert!(f["bytes"].as_u64().unwrap_or(0) < BLOB as u64, "{f}");
    }
    eprintln!("all three stalled downloads ended {seen:?} after they were sent");
    // The clients see it too: after what berth had queued, the connection is closed.
    for s in &mut stalled {
        let n = read_to_close(s, Duration::from_secs(20));
        assert!(n < BLOB, "a stalled client still got the whole blob ({n} bytes)");
    }
    trickler.join().unwrap();
    // And berth still serves.
    assert_eq!(c.get(format!("{}/v2/team/app/blobs/{digest}", b.url())).send().unwrap().bytes().unwrap().len(), BLOB);
}

#[test]
fn a_download_nobody_reads_over_tls_is_dropped_too() {
    // TLS bodies go through pingora's writer rather than sendfile: the other pacing path.
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::TestCa::new().write(&dir.path().join("tls"));
    let tls_port = free_port();
    let tls = format!("tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display());
    let b = support::start(dir, &format!("{SERVER}{tls}"), HOSTED);
    let data = blob();
    let digest = support::push_blob(&b.url(), "team/app", &data);
    let c = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{tls_port}/v2/team/app/blobs/{digest}");
    // The response is held, its body never read.
    let held = c.get(&url).send().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(c.get(&url).send().unwrap().bytes().unwrap().len(), BLOB, "another TLS client is served meanwhile");

    let lines = access_when(&b, WRITE_TIMEOUT + SLACK + Duration::from_secs(10), |l| !failed_blob_gets(l).is_empty());
    let failed = failed_blob_gets(&lines);
    assert_eq!(failed.len(), 1, "the held download should have been ended: {lines:#?}\n{}", b.log());
    let took = duration(failed[0]);
    eprintln!("stalled TLS download ended after {took:?}: {}", failed[0]["error"]);
    assert!(took >= WRITE_TIMEOUT - Duration::from_millis(50) && took <= WRITE_TIMEOUT + SLACK, "{}", failed[0]);
    // Cut off mid-body (an error) is what a dropped connection looks like; a short body too.
    if let Ok(body) = held.bytes() {
        assert!(body.len() < BLOB, "the held client still got the whole blob");
    }
}

#[test]
fn an_upload_whose_body_stops_is_ended_within_body_read_timeout() {
    let b = start("");
    let c = client();
    let r = c.post(format!("{}/v2/team/app/blobs/uploads/", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let path = location.strip_prefix(&b.url()).unwrap_or(&location).to_string();

    let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    write!(s, "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n", b.host())
        .unwrap();
    s.write_all(&[7u8; 10]).unwrap();
    let started = Instant::now();
    // The stalled upload holds nobody else up.
    assert_eq!(c.get(format!("{}/v2/", b.url())).send().unwrap().status(), 200);

    // berth answers the broken upload and closes the connection.
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let deadline = started + BODY_READ_TIMEOUT + SLACK;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let took = loop {
        assert!(Instant::now() < deadline, "stalled upload still open after {:?}", started.elapsed());
        match s.read(&mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break started.elapsed(),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading: {e}"),
        }
    };
    eprintln!("stalled upload ended after {took:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(took >= BODY_READ_TIMEOUT - Duration::from_millis(50), "ended before body_read_timeout: {answer}");
    assert!(answer.starts_with("HTTP/1.1 4"), "the client is told why: {answer:?}\n{}", b.log());
    let lines = access_when(&b, Duration::from_secs(10), |l| l.iter().any(|f| f["method"] == "PATCH"));
    let patch = lines.iter().find(|f| f["method"] == "PATCH").expect("an access line for the PATCH");
    assert!(patch["error"].as_str().is_some_and(|e| e.is_empty()), "the answer itself went out: {patch}");
}
