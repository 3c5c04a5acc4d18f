//! Graceful stop: SIGTERM turns readiness to 503 at once, stops accepting, lets in-flight
//! requests finish within the grace period and exits as soon as they have; a request still
//! running when the grace ends is cut off; nothing half-written is visible after a restart.
//! Bounds here are generous: they tell "exits when drained" from "sleeps the whole grace".

mod common;
mod support;

use common::Berth;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::{admin_status, signal, wait_exit};

const HOSTED: &str = "[[namespace]]\nprefix = \"team\"\n";

fn start(grace: &str) -> Berth {
    support::start(tempfile::tempdir().unwrap(), &format!("grace_period = \"{grace}\"\n"), HOSTED)
}

/// Sends a GET for a blob and reads the response head; the body is left to the caller.
fn begin_download(b: &Berth, digest: &str) -> (BufReader<TcpStream>, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /v2/team/big/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut len = None;
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok();
            }
        }
    }
    (r, len.expect("content-length"))
}

/// Larger than loopback socket buffers can hold, so the server is still writing when the
/// signal arrives.
fn big_blob() -> Vec<u8> {
    (0..48u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

fn new_connection_is_served(b: &Berth) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&format!("127.0.0.1:{}", b.port).parse().unwrap(), Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
    if write!(s, "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 200"))
}

#[test]
fn a_slow_download_finishes_after_sigterm_and_berth_exits_once_it_has() {
    let grace = 60;
    let mut b = start(&format!("{grace}s"));
    let data = big_blob();
    let d = support::push_blob(&b.url(), "team/big", &data);
    assert!(new_connection_is_served(&b));

    let (mut body, len) = begin_download(&b, &d);
    assert_eq!(len, data.len() as u64);
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 << 10];
    // A rate-limited reader: 64 KiB per 5 ms, about 12 MiB/s. The pause paces this client (the
    // download must still be running at SIGTERM); it synchronizes nothing.
    let mut read_some = |got: &mut Vec<u8>, until: usize| {
        while got.len() < until {
            let n = body.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed after {} of {} bytes", got.len(), len);
            got.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    read_some(&mut got, 4 << 20);

    let term_at = Instant::now();
    signal(&b, "TERM");
    // Readiness flips at once (the admin listener keeps answering during the drain).
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin_status(&b, "/readyz") != Some(503) {
        assert!(Instant::now() < deadline, "readiness did not turn 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(admin_status(&b, "/healthz"), Some(200), "still alive while draining");
    // No new work is taken on.
    assert!(!new_connection_is_served(&b), "a new connection was served while draining");
    assert!(got.len() < data.len() / 2, "the download was not in flight at SIGTERM");

    read_some(&mut got, data.len());
    assert_eq!(common::digest(&got), d, "the in-flight download must complete intact");
    // Drained: berth exits now, long before the grace period would end.
    let status = wait_exit(&mut b, Duration::from_secs(grace / 2)).expect("berth did not exit after its last request finished");
    assert!(status.success(), "{status:?}");
    assert!(term_at.elapsed() < Duration::from_secs(grace), "exit took the whole grace period");
    let log = b.log();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn an_idle_berth_exits_promptly_on_sigterm() {
    let mut b = start("60s");
    signal(&b, "TERM");
    let status = wait_exit(&mut b, Duration::from_secs(20)).expect("an idle berth waited out its grace period");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_stalled_client_is_cut_off_when_the_grace_period_ends() {
    let mut b = start("2s");
    let data = big_blob();
    let d = support::push_blob(&b.url(), "team/big", &data);
    // The client reads the head and then nothing: the response can never finish. Its head
    // having arrived, the request is in flight.
    let (_body, _) = begin_download(&b, &d);
    let term_at = Instant::now();
    signal(&b, "TERM");
    let status = wait_exit(&mut b, Duration::from_secs(30)).expect("berth outlived its grace period");
    assert!(status.success(), "{status:?}");
    assert!(term_at.elapsed() >= Duration::from_secs(2), "berth did not wait for the in-flight request");
    assert!(b.log().contains("grace period"), "{}", b.log());
}

#[test]
fn a_partial_upload_is_not_visible_after_a_restart() {
    let mut b = start("1s");
    let data = big_blob();
    let d = common::digest(&data);
    let c = reqwest::blocking::Client::new();
    let r = c.post(format!("{}/v2/team/big/blobs/uploads/", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let path = if loc.starts_with("http") { loc.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap() } else { loc };
    let sep = if path.contains('?') { '&' } else { '?' };
    // A monolithic PUT that announces the whole blob but sends only part of it.
    let stored = upload_bytes_stored(&b);
    let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    write!(
        s,
        "PUT {path}{sep}digest={d} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        data.len()
    )
    .unwrap();
    s.write_all(&data[..data.len() / 3]).unwrap();
    assert!(common::eventually(Duration::from_secs(20), || upload_bytes_stored(&b) > stored), "berth never stored the partial body");
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(30)).is_some(), "berth did not exit");
    drop(s);
    b.spawn();
    let r = c.head(format!("{}/v2/team/big/blobs/{d}", b.url())).send().unwrap();
    assert_eq!(r.status(), 404, "a partial upload became a blob");
    let leftovers: Vec<_> = std::fs::read_dir(b.data_dir().join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "temp files survived the restart: {leftovers:?}");
}

/// Bytes berth has stored so far: session data and temp files on the local disk, and whatever
/// it sent to the bucket with `[storage.s3]`.
fn upload_bytes_stored(b: &Berth) -> u64 {
    let sent = support::sample(&support::metrics(b), "berth_storage_bytes_total{direction=\"out\"}").unwrap_or(0.0) as u64;
    let on_disk: u64 = ["uploads", "tmp"]
        .iter()
        .flat_map(|d| {
            let dir = b.data_dir().join(d);
            common::local_files(&dir).into_iter().map(move |f| dir.join(f))
        })
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    sent + on_disk
}

#[test]
fn systemd_hears_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (config_path, port, admin_port) = Berth::write_config(dir.path(), "grace_period = \"5s\"", "", "");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log_path = dir.path().join("berth.log");
    let mut b = Berth { child: Some(child), port, admin_port, config_path, log_path, dir };
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no READY=1 from berth");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // READY=1 means the listeners are bound: the registry answers right away.
    assert!(new_connection_is_served(&b), "READY=1 before the registry listener accepts");
    assert_eq!(admin_status(&b, "/readyz"), Some(200));
    signal(&b, "TERM");
    let n = sock.recv(&mut buf).expect("no STOPPING=1 from berth");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    assert!(wait_exit(&mut b, Duration::from_secs(20)).is_some());
}

#[test]
fn a_fill_cut_off_by_the_stop_leaves_no_partial_blob() {
    use common::fake::{Fake, Fault};
    let mut up = Fake::start();
    let data = big_blob();
    let d = up.add_blob(&data);
    // The upstream sends half the blob and then nothing: the fill is mid-way at SIGTERM.
    up.set_fault(Fault::StallMidBlob);
    let dir = tempfile::tempdir().unwrap();
    let mirror = format!("[[upstream]]\nname = \"fake.example\"\nurl = \"{}\"\n", up.url());
    let mut b = support::start(dir, "grace_period = \"1s\"\n", &mirror);
    let port = b.port;
    let path = format!("/v2/fake.example/app/blobs/{d}");
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let tmp = b.data_dir().join("tmp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&tmp).unwrap().filter_map(|e| e.ok()).all(|e| e.metadata().map(|m| m.len()).unwrap_or(0) == 0) {
        assert!(Instant::now() < deadline, "the fill never started writing:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(30)).is_some(), "berth did not exit");
    let got = client.join().unwrap();
    assert!(got < data.len(), "the client cannot have received the whole blob");
    // Restart with the upstream gone: only the store could answer now.
    up.stop();
    b.spawn();
    let hex = &d["sha256:".len()..];
    assert!(!b.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex).exists(), "a partial fill was published");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(leftovers.is_empty(), "temp files survived the restart: {leftovers:?}");
    let r = reqwest::blocking::get(format!("{}/v2/fake.example/app/blobs/{d}", b.url())).unwrap();
    assert_ne!(r.status(), 200, "a blob was served with its upstream gone");
}
