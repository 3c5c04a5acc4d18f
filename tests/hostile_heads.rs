//! Hostile and malformed request heads on the registry listener: every malformed head gets an
//! OCI JSON answer with the right status and the connection closes; a head that trickles in
//! is cut at the head deadline; idle kept-alive connections go; connections are capped per
//! address and in all; absolute-form targets and pipelined requests are served.

mod common;

use common::{eventually, Berth};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const LIMITS: &str = "head_timeout = \"1s\"\nidle_timeout = \"1s\"\nmax_connections = 120\nmax_connections_per_address = 40\n";

fn start() -> Berth {
    Berth::start_in_with_server(tempfile::tempdir().unwrap(), LIMITS, "[[namespace]]\nprefix = \"team\"\n")
}

fn connect(b: &Berth) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything the server sends until it closes the connection.
fn until_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn malformed_heads_get_an_answer_and_the_connection_closes() {
    let b = start();
    let big = format!("GET /v2/ HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    let many: String = (0..300).map(|i| format!("X-{i}: 1\r\n")).collect();
    let cases: Vec<(String, u16, &str)> = vec![
        ("GET /v2/ HTTP/1.1\r\n\r\n".into(), 400, "without Host"),
        ("GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), 400, "Host"),
        ("POST /v2/team/x/blobs/uploads/ HTTP/1.1\r\nHost: a\r\nContent-Length: 12abc\r\n\r\n".into(), 400, ""),
        ("POST /v2/team/x/blobs/uploads/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(), 400, ""),
        ("POST /v2/team/x/blobs/uploads/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 501, "chunked"),
        (big, 431, "too large"),
        (format!("GET /v2/ HTTP/1.1\r\nHost: a\r\n{many}\r\n"), 431, "too large"),
        ("\u{1}\u{2}garbage\r\n\r\n".into(), 400, "malformed"),
    ];
    for (head, want, says) in cases {
        let mut s = connect(&b);
        s.write_all(head.as_bytes()).unwrap();
        let answer = until_close(&mut s);
        assert_eq!(status_of(&answer), want, "{:?}: {answer}", &head[..head.len().min(80)]);
        assert!(answer.contains("Connection: close") || answer.contains("connection: close"), "{answer}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(v["errors"][0]["message"].as_str().unwrap().contains(says), "{body}");
    }
    // Nothing was created by any of them, and the server still answers.
    let r = reqwest::blocking::get(format!("{}/v2/_catalog", b.url())).unwrap();
    assert_eq!(r.text().unwrap(), r#"{"repositories":[]}"#);
}

#[test]
fn absolute_form_targets_and_pipelined_requests_are_served() {
    let b = start();
    let mut s = connect(&b);
    let host = format!("127.0.0.1:{}", b.port);
    s.write_all(format!("GET http://{host}/v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let answer = until_close(&mut s);
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("Docker-Distribution-Api-Version"), "{answer}");
    // Two requests in one write: two answers, in order.
    let mut s = connect(&b);
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\nGET /v2/_catalog HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    let answer = until_close(&mut s);
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(answer.find("{}").unwrap() < answer.find("repositories").unwrap(), "in order: {answer}");
}

#[test]
fn a_trickled_head_is_cut_at_the_deadline_and_idle_connections_go() {
    let b = start();
    let mut s = connect(&b);
    let t = Instant::now();
    s.write_all(b"GET /v2/ HTTP/1.1\r\n").unwrap();
    let mut answer = String::new();
    // One header line every 200 ms would keep a per-read timeout alive forever: the pause is
    // the trickling client under test.
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = s.read(&mut buf) {
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
            if n == 0 || !answer.is_empty() {
                break;
            }
        }
        s.set_nonblocking(false).unwrap();
    }
    s.set_nonblocking(false).unwrap();
    answer.push_str(&until_close(&mut s));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "cut at the 1 s deadline, not after {took:?}");
    assert!(answer.is_empty() || status_of(&answer) == 408, "{answer}");

    // A kept-alive connection that sends nothing more is closed after the idle timeout.
    let mut s = connect(&b);
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let t = Instant::now();
    let answer = until_close(&mut s);
    assert_eq!(status_of(&answer), 200);
    assert!(t.elapsed() < Duration::from_secs(5), "closed after the 1 s idle timeout, not {:?}", t.elapsed());
}

#[test]
fn connections_are_capped_per_address_and_in_all() {
    // Idle connections must outlive the test's steps here.
    let b = Berth::start_in_with_server(
        tempfile::tempdir().unwrap(),
        &LIMITS.replace("idle_timeout = \"1s\"", "idle_timeout = \"60s\""),
        "[[namespace]]\nprefix = \"team\"\n",
    );
    let from = |ip: &str| {
        let sock = socket2_connect(ip, b.port);
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        sock
    };
    // An answered request proves a connection was admitted.
    let admitted = |ip: &str| {
        let mut s = from(ip);
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{ip}");
        s
    };
    // 40 from one address are admitted...
    let mut held: Vec<TcpStream> = (0..40).map(|_| admitted("127.0.0.1")).collect();
    // ...the 41st is answered 503 with an OCI body and closed, while another address is not
    // affected.
    let mut extra = from("127.0.0.1");
    let answer = until_close(&mut extra);
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("Retry-After: 1") && answer.contains("TOOMANYREQUESTS"), "{answer}");
    held.push(admitted("127.0.0.2"));
    // The total cap (120) holds across addresses.
    held.extend((0..40).map(|_| admitted("127.0.0.3")));
    held.extend((0..39).map(|_| admitted("127.0.0.4")));
    let mut over = from("127.0.0.5");
    let answer = until_close(&mut over);
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    // Closing them frees the slots.
    drop(held);
    assert!(eventually(Duration::from_secs(10), || {
        let mut s = from("127.0.0.1");
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").is_ok() && status_of(&until_close(&mut s)) == 200
    }));
    let m = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap();
    assert!(m.contains("berth_connections_refused_total{cap=\"too many connections from this address\"}"), "{m}");
}

/// A connection from a chosen loopback address (127.0.0.0/8 is all local on Linux).
fn socket2_connect(ip: &str, port: u16) -> TcpStream {
    let local: SocketAddr = format!("{ip}:0").parse().unwrap();
    let s = tcp_from(local, SocketAddr::from(([127, 0, 0, 1], port)));
    s.set_nodelay(true).unwrap();
    s
}

fn tcp_from(local: SocketAddr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    // std has no bind-before-connect: the socket is made with libc.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sa = |a: SocketAddr| {
            let SocketAddr::V4(v4) = a else { panic!("IPv4 only") };
            libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            }
        };
        let l = sa(local);
        assert_eq!(libc::bind(fd, &l as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32), 0);
        let t = sa(to);
        assert_eq!(libc::connect(fd, &t as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32), 0);
        TcpStream::from_raw_fd(fd)
    }
}
