//! The pingora side, thin: adapts a `ServerSession` to the registry's request/response types,
//! writes bodies in large pieces, and logs one access line per request. Policy lives in
//! `registry`, bytes in `store`.

pub mod admin;
pub mod front;
mod sendfile;

use crate::config::ClientLimits;
use crate::metrics;
use crate::oci::{ErrorCode, OciError};
use crate::registry::{Body, Outcome, Registry, Request, RequestBody, Response};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pingora::apps::{HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Blob bodies are read and written in pieces this large: few syscalls and wakeups per GB,
/// and with one piece read ahead, 1 MiB of buffers per download.
const CHUNK: usize = 512 << 10;

pub struct RegistryApp {
    pub registry: Arc<Registry>,
    pub in_flight: Arc<InFlight>,
    /// The cluster's peer listener: every request must carry a member's signature.
    pub peer: bool,
}

/// Requests between their head arriving and their response finishing: what a graceful stop
/// waits for.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
    /// Returns once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a guard dropped in between still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

struct SessionBody<'a> {
    session: &'a mut ServerSession,
    expect_continue: bool,
    limits: ClientLimits,
    /// A read failed (timed out, cut off): the body's position is lost, draining it is moot.
    broken: bool,
}

#[async_trait]
impl RequestBody for SessionBody<'_> {
    async fn chunk(&mut self) -> Result<Option<Bytes>, OciError> {
        if self.expect_continue {
            // Only now that the body is wanted: a request refused before reading never
            // makes the client send it.
            self.expect_continue = false;
            within(self.limits.write_timeout, self.session.write_continue_response())
                .await
                .map_err(|e| OciError::msg(ErrorCode::BlobUploadInvalid, format!("cannot answer 100-continue: {e}")))?;
        }
        // pingora's read timeout covers HTTP/1 only; this one covers HTTP/2 streams too.
        within(self.limits.body_read_timeout, self.session.read_request_body()).await.map_err(|e| {
            self.broken = true;
            OciError::msg(ErrorCode::BlobUploadInvalid, format!("request body interrupted: {e}"))
        })
    }
}

#[async_trait]
impl HttpServerApp for RegistryApp {
    async fn process_new_http(self: &Arc<Self>, mut session: ServerSession, shutdown: &ShutdownWatch) -> Option<ReusedHttpStream> {
        let limits = self.registry.config.clients;
        // The whole head within the deadline: a client trickling header lines does not get
        // to hold the connection and its buffer.
        let refused = match tokio::time::timeout(limits.head_timeout, session.read_request()).await {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => return None,
            Ok(Err(e)) if e.etype() == &pingora::ErrorType::InvalidHTTPHeader => Some(unreadable_head(&e.to_string())),
            Ok(Err(_)) => return None,
            Err(_) => {
                Some(OciError::msg(ErrorCode::RequestTimeout, format!("the request head did not arrive within {:?}", limits.head_timeout)))
            }
        };
        let refused = refused.or_else(|| {
            let h = session.req_header();
            head_problem(h.version, &h.headers, head_size(h), limits.max_head_bytes)
        });
        if let Some(e) = refused {
            let _ = within(Duration::from_secs(2), answer_and_close(&mut session, &e)).await;
            return None;
        }
        let _in_flight = self.in_flight.enter();
        session.set_read_timeout(Some(limits.body_read_timeout));
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let started = Instant::now();
        let head = session.req_header();
        let method = head.method.clone();
        let path = head.uri.path().to_string();
        let query = head.uri.query().map(str::to_string);
        let mut headers = head.headers.clone();
        if !headers.contains_key(http::header::HOST) {
            // HTTP/2 carries the host as :authority; the token realm is built from it.
            if let Some(v) = head.uri.authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) {
                headers.insert(http::header::HOST, v);
            }
        }
        let expect_continue =
            headers.get(http::header::EXPECT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if self.peer {
            let signed = head.uri.path_and_query().map_or(path.as_str(), |pq| pq.as_str());
            let member = self
                .registry
                .cluster()
                .is_some_and(|c| c.verify(headers.get(crate::cluster::PEER_HEADER).and_then(|v| v.to_str().ok()), method.as_str(), signed));
            if !member {
                let e = OciError::msg(ErrorCode::Unauthorized, "the peer listener serves cluster members only (bad or missing signature)");
                let _ = within(Duration::from_secs(2), answer_and_close(&mut session, &e)).await;
                return None;
            }
        }
        let req = Request { method: &method, path: &path, query: query.as_deref(), headers: &headers, client, tls, peer: self.peer };
        let mut outcome = Outcome::default();
        let (resp, continue_withheld, body_broken) = {
            let mut body = SessionBody { session: &mut session, expect_continue, limits, broken: false };
            let resp = self.registry.handle(&req, &mut body, &mut outcome).await;
            (resp, body.expect_continue, body.broken)
        };
        // A body that already stalled would only stall the drain too.
        if !continue_withheld && !body_broken && !session.is_body_done() {
            drain_unread_body(&mut session).await;
        }
        let status = resp.status;
        let written = write_response(&mut session, resp, method == http::Method::HEAD, &limits).await;
        let bytes = written.as_ref().map(|n| *n).unwrap_or(0);
        if self.peer {
            crate::cluster::PEER_BYTES.inc_by(bytes);
        }
        metrics::record_request(method.as_str(), outcome.route, status, started.elapsed());
        // Hosted content is counted here, from what was written; the mirror counts its own.
        let hosted = outcome.repository.is_some() && outcome.upstream.is_none();
        if hosted && bytes > 0 && (200..300).contains(&status) && matches!(outcome.route, "blob" | "manifest") {
            metrics::SERVED_BYTES.with_label_values(&["hosted"]).inc_by(bytes);
        }
        crate::telemetry::access(&crate::telemetry::Access {
            method: method.as_str(),
            route: outcome.route,
            repository: outcome.repository.as_deref().unwrap_or("-"),
            user: outcome.user.as_deref().unwrap_or("-"),
            status,
            bytes,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            cache: outcome.cache.unwrap_or("-"),
            upstream: outcome.upstream.as_deref().unwrap_or("-"),
            error: written.as_ref().err().map(|e| e.as_str()).unwrap_or(""),
        });
        if written.is_err() {
            return None;
        }
        if !session.is_body_done() {
            // The body was refused unread (an early error): don't reuse a connection whose
            // request stream position is unknown.
            session.set_keepalive(None);
        }
        let mut settings = pingora::apps::HttpPersistentSettings::for_session(&session);
        // finish() flushes what pingora still buffers: a client that stopped reading could
        // hold it there forever.
        match within(limits.write_timeout, session.finish()).await {
            Ok(Some(s)) => {
                let (stream, pipelined) = s.into_parts();
                if let Some(p) = pipelined {
                    // The next request is already here: the front must not wait for it.
                    settings.set_pipelined_prefix(p);
                    settings.set_user_context(Box::new(front::Pipelined));
                }
                Some(ReusedHttpStream::new(stream, Some(settings)))
            }
            _ => None,
        }
    }
}

/// Runs a pingora read or write that pingora itself does not bound (response heads, flushes,
/// `100 Continue`, HTTP/2 body reads), failing it after `limit`.
async fn within<T>(limit: Duration, op: impl std::future::Future<Output = pingora::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(limit, op).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("client stalled: nothing moved for {limit:?}")),
    }
}

/// The smallest pacing window: finer slices would cost a write call per few bytes, and a client
/// that cannot take 16 KiB within `write_timeout` is stalled by any measure.
const MIN_WINDOW: u64 = 16 << 10;

/// Paces response body writes against `[server] write_timeout` and `min_send_rate`. Bytes are
/// counted in windows of what the minimum rate allows in `write_timeout`; a client that takes
/// longer than `write_timeout` to accept one window loses the connection. So a stalled client
/// and one slower than the rate are both dropped within `write_timeout`, whatever the write
/// sizes, and only time spent waiting on the client counts: not the disk, not an upstream
/// still filling the blob. (pingora's own `min_send_rate` scales the timeout with each write's
/// size instead, so a stalled client holds a 512 KiB chunk for 64 s at 8 KiB/s, and it does
/// nothing on HTTP/2.)
struct SendMeter {
    timeout: Duration,
    window: u64,
    bytes: u64,
    spent: Duration,
}

impl SendMeter {
    fn new(limits: &ClientLimits) -> SendMeter {
        let by_rate = limits.min_send_rate.map_or(0, |r| (r as f64 * limits.write_timeout.as_secs_f64()) as u64);
        SendMeter { timeout: limits.write_timeout, window: by_rate.max(MIN_WINDOW), bytes: 0, spent: Duration::ZERO }
    }

    /// How many of `n` bytes the next write may carry (it never crosses a window boundary, so
    /// one budget applies to all of it), and how long it may take.
    fn next(&self, n: u64) -> (u64, Duration) {
        (n.min(self.window - self.bytes), self.timeout.saturating_sub(self.spent))
    }

    fn record(&mut self, n: u64, took: Duration) {
        self.bytes += n;
        self.spent += took;
        if self.bytes >= self.window {
            self.bytes = 0;
            self.spent = Duration::ZERO;
        }
    }
}

/// Writes a body piece through pingora in slices the meter allows, each under pingora's write
/// timeout set to what is left of the window's budget.
///
/// The body is ended separately, by a bounded `finish_body`: ending it here would make pingora
/// flush without a timeout.
async fn write_paced(session: &mut ServerSession, meter: &mut SendMeter, mut data: Bytes) -> Result<(), String> {
    while !data.is_empty() {
        let (n, budget) = meter.next(data.len() as u64);
        let piece = data.split_to(n as usize);
        session.set_write_timeout(Some(budget));
        let started = Instant::now();
        session.write_response_body(piece, false).await.map_err(|e| format!("{e} (write_timeout/min_send_rate)"))?;
        meter.record(n, started.elapsed());
    }
    Ok(())
}

/// An early refusal (bad name, out-of-order chunk, oversized manifest) leaves the request body
/// on the wire. Closing a socket with unread data makes the kernel reset the connection, and
/// the client may lose the answer with it; so read and discard a bounded amount first (a
/// "lingering close"). If the body is longer than that, the answer goes out with
/// `Connection: close`. A client still waiting for `100 Continue` never sends it: not drained.
async fn drain_unread_body(session: &mut ServerSession) {
    const LIMIT: u64 = 16 << 20;
    let drain = async {
        let mut read = 0u64;
        while read <= LIMIT {
            match session.read_request_body().await {
                Ok(Some(b)) => read += b.len() as u64,
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
}

/// Smaller files go through the buffered path: one chunk, no descriptor juggling.
const ZERO_COPY_MIN: u64 = 64 << 10;

/// The socket of a plain-text HTTP/1 session; `None` for TLS and HTTP/2, whose bytes must go
/// through pingora.
fn plain_http1_fd(session: &ServerSession) -> Option<std::os::fd::RawFd> {
    if session.is_http2() || session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
        return None;
    }
    Some(session.stream()?.id())
}

/// Plain HTTP/1 blob bodies go from the page cache to the socket with sendfile(2): no copy
/// through user space and no blocking-pool hop per chunk.
async fn write_file_zero_copy(
    session: &mut ServerSession,
    header: Box<ResponseHeader>,
    fd: std::os::fd::RawFd,
    file: &File,
    offset: u64,
    len: u64,
    limits: &ClientLimits,
) -> Result<u64, String> {
    // pingora counts body bytes through its own writer and will not finish a response whose
    // Content-Length it did not see written. Answering as if to HEAD makes it send our header
    // (Content-Length included) and expect no body, so the connection stays reusable after we
    // send the body ourselves.
    let method = session.req_header().method.clone();
    session.req_header_mut().set_method(http::Method::HEAD);
    let wrote = within(limits.write_timeout, session.write_response_header(header)).await;
    session.req_header_mut().set_method(method);
    wrote?;
    sendfile::send(fd, file, offset, len, &mut SendMeter::new(limits)).await.map_err(|e| format!("sending blob: {e}"))
}

/// Writes a response; returns the body bytes sent.
pub async fn write_response(session: &mut ServerSession, resp: Response, head_only: bool, limits: &ClientLimits) -> Result<u64, String> {
    let Response { status, headers, body, content_length } = resp;
    let mut h = ResponseHeader::build(status, Some(headers.len() + 3)).map_err(|e| e.to_string())?;
    h.insert_header("Docker-Distribution-Api-Version", "registry/2.0").map_err(|e| e.to_string())?;
    for (k, v) in headers {
        h.append_header(k, v).map_err(|e| e.to_string())?;
    }
    let len = content_length.or(body.len());
    match len {
        Some(n) => h.insert_header("Content-Length", n.to_string()).map_err(|e| e.to_string())?,
        None if !head_only => h.insert_header("Transfer-Encoding", "chunked").map_err(|e| e.to_string())?,
        None => {}
    }
    let zero_copy = match (&body, head_only) {
        (Body::File { len, .. }, false) if *len >= ZERO_COPY_MIN => plain_http1_fd(session),
        _ => None,
    };
    if let (Some(fd), Body::File { file, offset, len }) = (zero_copy, &body) {
        return write_file_zero_copy(session, Box::new(h), fd, file, *offset, *len, limits).await;
    }
    within(limits.write_timeout, session.write_response_header(Box::new(h))).await?;
    if head_only {
        within(limits.write_timeout, session.finish_body()).await?;
        return Ok(0);
    }
    let mut meter = SendMeter::new(limits);
    let mut sent = 0u64;
    match body {
        Body::Empty => {}
        Body::Full(b) => {
            sent = b.len() as u64;
            write_paced(session, &mut meter, b).await?;
        }
        Body::File { file, offset, len } => {
            let file = Arc::new(file);
            // One chunk is read on a blocking thread while the previous one is written, into
            // buffers that come back once the socket has taken them: no allocation (and no
            // fresh pages to fault in) per chunk, and the disk read overlaps the send.
            let read = |at: u64, n: usize, buf: Option<BytesMut>| {
                let f = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = buf.unwrap_or_else(|| BytesMut::with_capacity(CHUNK));
                    buf.resize(n, 0);
                    f.read_exact_at(&mut buf, at).map(|_| buf)
                })
            };
            let mut spare = None;
            let mut next = (len > 0).then(|| read(offset, CHUNK.min(len as usize), None));
            while let Some(pending) = next.take() {
                let chunk = pending.await.map_err(|e| e.to_string())?.map_err(|e| format!("reading blob: {e}"))?.freeze();
                sent += chunk.len() as u64;
                if sent < len {
                    next = Some(read(offset + sent, CHUNK.min((len - sent) as usize), spare.take()));
                }
                write_paced(session, &mut meter, chunk.clone()).await?;
                // Unique again once written out (HTTP/1); HTTP/2 may still hold it queued.
                spare = chunk.try_into_mut().ok();
            }
        }
        Body::Stream { mut stream, .. } => {
            while let Some(item) = stream.next().await {
                let chunk = item.map_err(|e| format!("upstream body: {e}"))?;
                sent += chunk.len() as u64;
                write_paced(session, &mut meter, chunk).await?;
            }
        }
    }
    within(limits.write_timeout, session.finish_body()).await?;
    Ok(sent)
}

/// What a head pingora could not parse gets: too large (or too many headers) is 431, a
/// transfer coding berth does not implement 501, anything else 400, each saying why.
fn unreadable_head(why: &str) -> OciError {
    let reason = why.rsplit("context: ").next().unwrap_or(why).trim();
    if why.contains("larger than") || why.contains("TooManyHeaders") || why.contains("too many headers") {
        OciError::msg(ErrorCode::HeadTooLarge, "request head too large")
    } else if why.contains("Transfer-Encoding") {
        OciError::msg(ErrorCode::NotImplemented, format!("{reason} (only chunked is supported)"))
    } else {
        OciError::msg(ErrorCode::BadRequest, format!("malformed request head: {reason}"))
    }
}

/// Roughly the bytes of a parsed head.
fn head_size(h: &pingora::http::RequestHeader) -> usize {
    h.raw_path().len() + h.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>() + 16
}

/// What is wrong with a parsed request head, if anything (RFC 9112): more than `max` bytes
/// (431), HTTP/1.1 without exactly one `Host` (400), a `Content-Length` that is not one number
/// (400), a transfer coding other than chunked (501).
fn head_problem(version: http::Version, headers: &http::HeaderMap, size: usize, max: usize) -> Option<OciError> {
    use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
    if size > max {
        return Some(OciError::msg(ErrorCode::HeadTooLarge, format!("request head too large: about {size} bytes, at most {max}")));
    }
    let hosts = headers.get_all(HOST).iter().count();
    if version == http::Version::HTTP_11 && hosts == 0 {
        return Some(OciError::msg(ErrorCode::BadRequest, "HTTP/1.1 request without Host"));
    }
    if hosts > 1 {
        return Some(OciError::msg(ErrorCode::BadRequest, "more than one Host header"));
    }
    // Every value (and every comma-separated item in one) must be the same number.
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for item in v.to_str().unwrap_or("x").split(',').map(str::trim) {
            let n: Option<u64> = (!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit())).then(|| item.parse().ok()).flatten();
            let Some(n) = n else { return Some(OciError::msg(ErrorCode::BadRequest, "Content-Length is not a number")) };
            if length.is_some_and(|l| l != n) {
                return Some(OciError::msg(ErrorCode::BadRequest, "conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    for te in headers.get_all(TRANSFER_ENCODING) {
        let codings = te.to_str().unwrap_or("?");
        if codings.split(',').any(|c| !c.trim().eq_ignore_ascii_case("chunked")) {
            return Some(OciError::msg(ErrorCode::NotImplemented, format!("transfer coding {codings:?} is not supported (only chunked)")));
        }
    }
    None
}

/// Answers a request berth will not serve and ends the connection: after a bad head, where
/// the next request would start is unknown.
async fn answer_and_close(session: &mut ServerSession, e: &OciError) -> pingora::Result<()> {
    session.set_keepalive(None);
    let body = Bytes::from(e.to_json());
    let mut h = ResponseHeader::build(e.status(), Some(4))?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", body.len().to_string())?;
    h.insert_header("Connection", "close")?;
    session.write_error_response(h, body).await?;
    session.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn head_problems_by_rfc_9112() {
        use http::{HeaderMap, HeaderValue, Version};
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        let status = |v, m: &HeaderMap| head_problem(v, m, 100, 1000).map(|e| e.status());
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a")])), None);
        assert_eq!(status(Version::HTTP_10, &h(&[])), None, "HTTP/1.0 needs no Host");
        assert_eq!(status(Version::HTTP_11, &h(&[])), Some(400));
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("host", "b")])), Some(400));
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("content-length", "1x")])), Some(400));
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("content-length", "3, 3")])), None);
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("content-length", "3, 4")])), Some(400));
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("transfer-encoding", "chunked")])), None);
        assert_eq!(status(Version::HTTP_11, &h(&[("host", "a"), ("transfer-encoding", "gzip, chunked")])), Some(501));
        assert_eq!(head_problem(Version::HTTP_11, &h(&[("host", "a")]), 2000, 1000).map(|e| e.status()), Some(431));
        assert_eq!(unreadable_head("InvalidHTTPHeader context: Request header larger than 1048575").status(), 431);
        assert_eq!(unreadable_head("InvalidHTTPHeader context: non-chunked final Transfer-Encoding").status(), 501);
        assert_eq!(unreadable_head("InvalidHTTPHeader context: invalid token").status(), 400);
    }

    use super::*;

    fn limits(write_timeout: u64, min_send_rate: Option<u64>) -> ClientLimits {
        ClientLimits {
            write_timeout: Duration::from_secs(write_timeout),
            min_send_rate,
            ..crate::config::Config::embedded_default().clients
        }
    }

    #[test]
    fn a_window_is_what_the_minimum_rate_sends_in_write_timeout() {
        let mut m = SendMeter::new(&limits(30, Some(8 << 10)));
        assert_eq!(m.next(512 << 10), (240 << 10, Duration::from_secs(30)));
        // A client that took 20 s for 100 KiB has 10 s left for the rest of the window...
        m.record(100 << 10, Duration::from_secs(20));
        assert_eq!(m.next(512 << 10), (140 << 10, Duration::from_secs(10)));
        // ...and a full window starts the budget over.
        m.record(140 << 10, Duration::from_secs(9));
        assert_eq!(m.next(512 << 10), (240 << 10, Duration::from_secs(30)));
        // Waiting that moved nothing still uses the budget up.
        m.record(0, Duration::from_secs(31));
        assert_eq!(m.next(1).1, Duration::ZERO);
    }

    #[test]
    fn without_a_rate_only_stalls_count() {
        // 16 KiB per write_timeout: a floor so low that only a stalled client falls below it, and
        // small enough slices not to cost a write call per few bytes.
        for l in [limits(30, None), limits(30, Some(1))] {
            let m = SendMeter::new(&l);
            assert_eq!(m.next(512 << 10), (MIN_WINDOW, Duration::from_secs(30)));
        }
    }
}
