//! The load client: HTTP/1.1 over keep-alive connections, reading bodies in 1 MiB pieces and
//! discarding them. wrk and friends read 8-16 KiB at a time and cannot keep up with blobs on
//! loopback; this client spends its time in `read(2)` on big buffers, so what it measures is
//! the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ: usize = 1 << 20;

#[derive(Clone)]
pub struct Target {
    pub port: u16,
    pub method: &'static str,
    pub path: String,
}

impl Target {
    fn request(&self) -> Vec<u8> {
        format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: berth-bench\r\nAccept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json\r\n\r\n",
            self.method, self.path, self.port
        )
        .into_bytes()
    }
}

#[derive(Default)]
pub struct Totals {
    pub elapsed: Duration,
    /// Body bytes received, including a response cut off by the deadline.
    pub bytes: u64,
    pub requests: u64,
    pub errors: u64,
    /// Latency of every completed request, microseconds.
    pub latencies: Vec<u32>,
}

impl Totals {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut v = self.latencies.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    }
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e9
    }
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

struct Head {
    status: u16,
    content_length: u64,
    /// Bytes after the head already read into the buffer.
    body_start: usize,
    filled: usize,
    close: bool,
}

/// Reads one response head into `buf`. Only `Content-Length` bodies: every server here sends
/// one for blobs and manifests.
async fn read_head(s: &mut TcpStream, buf: &mut [u8], mut filled: usize) -> std::io::Result<Head> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) =
            r.parse(&buf[..filled]).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            let mut content_length = 0;
            let mut close = false;
            for h in r.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    content_length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                } else if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(std::io::Error::other("chunked responses are not expected here"));
                }
            }
            return Ok(Head { status: r.code.unwrap_or(0), content_length, body_start: n, filled, close });
        }
        if filled == buf.len() {
            return Err(std::io::Error::other("response head too large"));
        }
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
}

/// One request/response on `s`; `on_body` sees the body length of each read. Returns whether
/// the connection can be reused.
async fn exchange(
    s: &mut TcpStream,
    req: &[u8],
    head_only: bool,
    buf: &mut [u8],
    mut on_body: impl FnMut(usize),
) -> std::io::Result<(u16, bool)> {
    s.write_all(req).await?;
    let h = read_head(s, buf, 0).await?;
    let mut remaining = if head_only { 0 } else { h.content_length };
    let already = (h.filled - h.body_start) as u64;
    if already > remaining {
        return Err(std::io::Error::other("more bytes than the body: pipelining is not used"));
    }
    if already > 0 {
        on_body(already as usize);
        remaining -= already;
    }
    while remaining > 0 {
        let want = buf.len().min(remaining as usize);
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        on_body(n);
        remaining -= n as u64;
    }
    Ok((h.status, !h.close))
}

/// `conns` keep-alive connections each asking for `target` back to back for `secs`.
pub async fn run(target: &Target, conns: usize, secs: f64) -> Totals {
    let bytes = Arc::new(AtomicU64::new(0));
    let req = Arc::new(target.request());
    let head_only = target.method == "HEAD";
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (bytes, req, port) = (bytes.clone(), req.clone(), target.port);
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut buf = vec![0u8; READ];
                let work = async {
                    'conn: loop {
                        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let _ = s.set_nodelay(true);
                        loop {
                            let t0 = Instant::now();
                            match exchange(&mut s, &req, head_only, &mut buf, |n| {
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                            })
                            .await
                            {
                                Ok((status, reusable)) => {
                                    if (200..300).contains(&status) {
                                        ok += 1;
                                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                                    } else {
                                        errors += 1;
                                    }
                                    if !reusable {
                                        continue 'conn;
                                    }
                                }
                                Err(_) => {
                                    errors += 1;
                                    continue 'conn;
                                }
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout_at(deadline, work).await;
                (lat, ok, errors)
            })
        })
        .collect();
    let mut t = Totals::default();
    for task in tasks {
        let (lat, ok, errors) = task.await.unwrap();
        t.latencies.extend(lat);
        t.requests += ok;
        t.errors += errors;
    }
    t.elapsed = start.elapsed();
    t.bytes = bytes.load(Ordering::Relaxed);
    t
}

/// One GET of `path` by each of `n` clients at once, each on its own connection: time to the
/// first body byte and to the last, per client.
pub async fn herd(port: u16, path: &str, n: usize, size: u64) -> Vec<(Duration, Duration)> {
    let target = Target { port, method: "GET", path: path.to_string() };
    let req = Arc::new(target.request());
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (req, go) = (req.clone(), go.clone());
            tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let mut buf = vec![0u8; READ];
                go.wait().await;
                let t0 = Instant::now();
                let mut first = None;
                let mut got = 0u64;
                let (status, _) = exchange(&mut s, &req, false, &mut buf, |k| {
                    if first.is_none() {
                        first = Some(t0.elapsed());
                    }
                    got += k as u64;
                })
                .await
                .unwrap();
                assert_eq!(status, 200, "herd GET");
                assert_eq!(got, size, "whole body");
                (first.unwrap(), t0.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
