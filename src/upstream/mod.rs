//! The client side: talking to one upstream registry. Bearer tokens from the
//! `WWW-Authenticate` challenge (anonymous or with the configured credentials), cached per scope
//! and fetched once for concurrent requests; Basic auth for the repositories whose challenge asks
//! for it; redirects followed with credentials dropped on a cross-host hop (reqwest's policy);
//! connect and first-byte timeouts. Never imports pingora's server types.

pub mod challenge;
pub mod health;

pub use challenge::Challenge;

use crate::config::Upstream;
use crate::metrics;
use crate::oci::{ErrorCode, OciError};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens are refreshed this long before the upstream says they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// An upstream may announce any `expires_in`; past this a token is simply fetched again, which
/// keeps `Instant` arithmetic and the cache's expiry in range.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Tokens are cached per repository scope, so a client walking many repositories would
/// otherwise grow the cache without end; past this many the least used are fetched again.
const MAX_TOKENS: u64 = 10_000;
/// The same bound for the scopes remembered as taking Basic: one forgotten costs one 401.
const MAX_BASIC_SCOPES: u64 = 10_000;

/// Caps for upstream bodies read whole into memory. Anything between berth and the upstream
/// can send a body of any size, with or without a Content-Length.
/// Token responses are a JWT or two with a little JSON around them.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * 1024;
/// Only the first few hundred characters of an error body reach a message.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// `tags/list`: some registries answer unpaginated, and gcr.io adds a manifest map per digest,
/// which runs to megabytes for large repositories.
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

/// How an upstream failed, so callers can tell an outage (serve stale) from an answer.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// Connect failure, reset, TLS error.
    Unreachable(String),
    Timeout,
    /// The upstream answered with an error status.
    Status(u16, String),
    /// 429, with the upstream's `Retry-After` as sent.
    RateLimited(Option<String>),
    /// Not sent: the upstream failed repeatedly and its circuit is open for this long yet.
    CircuitOpen(Duration),
    /// Not sent: the pull budget is spent (or the upstream said 429) for this long yet.
    BudgetSpent(Duration),
    /// Not sent: the upstream is configured `offline`.
    Offline,
    /// A body berth reads into memory passed its cap; reading stopped there.
    TooLarge {
        what: &'static str,
        limit: usize,
    },
}

impl UpstreamError {
    /// The error for an upstream answer with status `s` (read the body first, if wanted):
    /// a 429 keeps the upstream's `Retry-After`.
    pub fn from_answer(s: u16, headers: &http::HeaderMap, body: String) -> UpstreamError {
        if s == 429 {
            let after = headers.get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(|v| v.chars().take(64).collect());
            return UpstreamError::RateLimited(after);
        }
        UpstreamError::Status(s, body)
    }

    /// True for failures where a cached copy should be served instead: the upstream is down,
    /// slow, overloaded or rate-limiting.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::Timeout => true,
            UpstreamError::Status(s, _) => *s >= 500 || *s == 429,
            UpstreamError::RateLimited(_) | UpstreamError::CircuitOpen(_) | UpstreamError::BudgetSpent(_) | UpstreamError::Offline => true,
            UpstreamError::TooLarge { .. } => false,
        }
    }

    /// The client-facing error. Never a 404 for an outage.
    pub fn to_oci(&self, upstream: &str) -> OciError {
        match self {
            UpstreamError::Unreachable(e) => {
                OciError::msg(ErrorCode::UpstreamUnavailable, format!("upstream {upstream} is unreachable: {e}"))
            }
            UpstreamError::Timeout => OciError::msg(ErrorCode::UpstreamTimeout, format!("upstream {upstream} did not answer in time")),
            UpstreamError::Status(429, _) => {
                OciError::msg(ErrorCode::TooManyRequests, format!("upstream {upstream} is rate-limiting berth; retry later"))
            }
            UpstreamError::RateLimited(after) => {
                OciError::msg(ErrorCode::TooManyRequests, format!("upstream {upstream} is rate-limiting berth; retry later"))
                    .with_retry_after(after.clone())
            }
            UpstreamError::CircuitOpen(wait) => OciError::msg(
                ErrorCode::UpstreamDown,
                format!("upstream {upstream} is failing; berth stopped asking it for {}s", wait.as_secs().max(1)),
            )
            .with_retry_after(Some(wait.as_secs().max(1).to_string())),
            UpstreamError::Offline => OciError::msg(
                ErrorCode::UpstreamDown,
                format!("upstream {upstream} is offline (offline = true): only what berth has cached is served"),
            ),
            UpstreamError::BudgetSpent(wait) => OciError::msg(
                ErrorCode::TooManyRequests,
                format!("upstream {upstream}'s pull budget is spent; only cached content is served for {}s", wait.as_secs().max(1)),
            )
            .with_retry_after(Some(wait.as_secs().max(1).to_string())),
            UpstreamError::Status(s @ (401 | 403), _) => {
                OciError::msg(ErrorCode::Denied, format!("upstream {upstream} refused access ({s}); check berth's credentials for it"))
            }
            UpstreamError::Status(s, body) => {
                OciError::msg(ErrorCode::UpstreamUnavailable, format!("upstream {upstream} answered {s}: {}", truncate(body, 200)))
            }
            UpstreamError::TooLarge { what, limit } => OciError::msg(
                ErrorCode::UpstreamUnavailable,
                format!("upstream {upstream} sent a {what} over {limit} bytes; berth stopped reading it"),
            ),
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads a whole body into memory, failing as soon as the bytes received pass `limit`: a
/// chunked body announces no length, so the cap has to hold while streaming.
pub async fn read_capped<S, E>(body: S, limit: usize, what: &'static str) -> Result<Bytes, UpstreamError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        if buf.len() + chunk.len() > limit {
            return Err(UpstreamError::TooLarge { what, limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Each token lives as long as the upstream said it would (less the margin), not a fixed TTL.
struct TokenExpiry;

impl moka::Expiry<String, Token> for TokenExpiry {
    fn expire_after_create(&self, _: &String, t: &Token, now: Instant) -> Option<Duration> {
        Some(t.expires.saturating_duration_since(now))
    }

    fn expire_after_update(&self, _: &String, t: &Token, now: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(t.expires.saturating_duration_since(now))
    }
}

fn token_cache(capacity: u64) -> moka::sync::Cache<String, Token> {
    moka::sync::Cache::builder().max_capacity(capacity).expire_after(TokenExpiry).build()
}

type TokenLocks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// A claim on a scope's token lock; the last claim out removes the lock from the table, so the
/// table only ever holds scopes with a fetch in flight, even when a fetch is cancelled.
struct TokenLockClaim<'a> {
    table: &'a TokenLocks,
    key: &'a str,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> TokenLockClaim<'a> {
    fn new(table: &'a TokenLocks, key: &'a str) -> Self {
        let lock = table.lock().entry(key.to_string()).or_default().clone();
        TokenLockClaim { table, key, lock }
    }
}

impl Drop for TokenLockClaim<'_> {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        // Claims are only made under the table lock, so two references (the table's and this
        // one) mean nobody else holds or waits for it.
        if table.get(self.key).is_some_and(|l| Arc::ptr_eq(l, &self.lock)) && Arc::strong_count(&self.lock) == 2 {
            table.remove(self.key);
        }
    }
}

/// One of an upstream's URLs and the authentication state berth keeps for it: tokens come from
/// the realm that URL's challenges name, with that URL's credentials.
struct Endpoint {
    url: String,
    credentials: Option<(String, crate::config::Secret)>,
    tokens: moka::sync::Cache<String, Token>,
    /// One token fetch per scope at a time; later requests wait and reuse it.
    token_locks: TokenLocks,
    /// Scopes whose last challenge chose Basic, so their later requests send the credentials up
    /// front. Per scope, not per upstream: one registry may guard some repositories with Basic
    /// and others with tokens, and a Basic answer for one must not change how another is asked.
    basic_scopes: moka::sync::Cache<String, ()>,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.url.trim_end_matches('/'), path)
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        use base64::Engine;
        let (user, pw) = self.credentials.as_ref()?;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pw.expose()));
        let mut v = HeaderValue::from_str(&format!("Basic {enc}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        self.tokens.get(scope).filter(|t| t.expires > Instant::now()).map(|t| t.value)
    }

    fn auth_for(&self, scope: &str) -> Option<HeaderValue> {
        if self.basic_scopes.contains_key(scope) {
            return self.basic_header();
        }
        let t = self.cached_token(scope)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

pub struct Client {
    pub upstream: Arc<Upstream>,
    http: reqwest::Client,
    /// The upstream's URLs in the order they are tried.
    endpoints: Vec<Endpoint>,
    /// Each URL's circuit and pull budget (same order as `endpoints`).
    health: Arc<[health::UrlHealth]>,
    /// The circuits together: open only when every URL's is (cached answers are served).
    pub breaker: health::Breakers,
    /// The pull budgets the URLs' rate-limit headers announce, together.
    pub budget: health::Budgets,
}

/// Gives a probe's turn back if its request is dropped before an answer.
struct ProbeGuard<'a> {
    breaker: &'a health::Breaker,
    gate: health::Gate,
    settled: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.abandoned(self.gate);
        }
    }
}

impl Client {
    pub fn new(upstream: Arc<Upstream>) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(upstream.connect_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("http client builds");
        let endpoints: Vec<Endpoint> = upstream
            .urls
            .iter()
            .map(|u| Endpoint {
                url: u.url.as_str().to_string(),
                credentials: u.credentials.clone(),
                tokens: token_cache(MAX_TOKENS),
                token_locks: Mutex::new(HashMap::new()),
                basic_scopes: moka::sync::Cache::new(MAX_BASIC_SCOPES),
            })
            .collect();
        let (health, breaker, budget) = health::per_url(endpoints.len(), upstream.ratelimit_reserve);
        Client { upstream, http, endpoints, health, breaker, budget }
    }

    /// Reads a whole upstream body into memory, up to `limit` bytes and within the upstream's
    /// timeout.
    pub async fn read_body(&self, resp: reqwest::Response, limit: usize, what: &'static str) -> Result<Bytes, UpstreamError> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(UpstreamError::TooLarge { what, limit });
        }
        tokio::time::timeout(self.upstream.timeout, read_capped(resp.bytes_stream(), limit, what))
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// The start of an error response's body, for the message; empty if it cannot be read.
    pub async fn error_text(&self, resp: reqwest::Response) -> String {
        match self.read_body(resp, MAX_ERROR_BODY_BYTES, "error body").await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(UpstreamError::TooLarge { limit, .. }) => format!("(an error body over {limit} bytes)"),
            Err(_) => String::new(),
        }
    }

    /// Sends a request for `repo` (the upstream's repository name), authenticating as the
    /// upstream demands. Returns the response with any status; transport failures are errors.
    pub async fn send(&self, method: Method, repo: &str, path: &str, accept: Option<&str>) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(method, repo, path, accept, 0).await
    }

    /// As `send`, asking for the body from byte `from` on (`Range`) when it is not zero.
    ///
    /// The upstream's URLs are tried in order: one that is unreachable, times out, answers 5xx
    /// or 429, or whose circuit is open passes the request to the next. Any other answer is the
    /// upstream's, a 404 included: the URLs are meant to serve the same content, and asking the
    /// next URL after a 404 would turn every miss into one request per URL.
    pub async fn send_from(
        &self,
        method: Method,
        repo: &str,
        path: &str,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        if self.upstream.offline {
            return Err(UpstreamError::Offline);
        }
        let last = self.endpoints.len() - 1;
        let mut failure = None;
        for i in 0..=last {
            // A URL whose pull budget is spent is passed over for GETs while another remains
            // (HEADs, which Docker Hub does not count, still go).
            if i < last && method == Method::GET && self.health[i].budget.exhausted().is_some() {
                continue;
            }
            let url = self.endpoints[i].url.as_str();
            match self.send_to(i, method.clone(), repo, path, accept, from).await {
                Ok(r) if i < last && (r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS) => {
                    tracing::warn!(upstream = %self.upstream.name, url, status = r.status().as_u16(), "upstream URL failed; trying the next");
                }
                Ok(r) => {
                    if i > 0 {
                        tracing::debug!(upstream = %self.upstream.name, url, "served by a later upstream URL");
                    }
                    return Ok(r);
                }
                Err(e) if e.is_outage() && i < last => {
                    if matches!(e, UpstreamError::CircuitOpen(_)) {
                        tracing::debug!(upstream = %self.upstream.name, url, "upstream URL's circuit is open; trying the next");
                    } else {
                        tracing::warn!(upstream = %self.upstream.name, url, error = ?e, "upstream URL failed; trying the next");
                    }
                    failure = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        // Not reached: the last URL is never passed over, and its outcome is returned above.
        Err(failure.unwrap_or_else(|| UpstreamError::Unreachable("no upstream URL was tried".into())))
    }

    /// One URL's attempt, with its authentication round trip.
    async fn send_to(
        &self,
        i: usize,
        method: Method,
        repo: &str,
        path: &str,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let ep = &self.endpoints[i];
        let scope = format!("repository:{repo}:pull");
        let mut retried = false;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(a) = accept {
                headers.insert(ACCEPT, HeaderValue::from_str(a).expect("accept is ascii"));
            }
            if from > 0 {
                headers.insert(reqwest::header::RANGE, HeaderValue::from_str(&format!("bytes={from}-")).expect("range is ascii"));
            }
            let sent_basic = ep.basic_scopes.contains_key(&scope);
            if let Some(auth) = ep.auth_for(&scope) {
                headers.insert(AUTHORIZATION, auth);
            }
            let resp = self.raw(i, method.clone(), &ep.url(path), headers).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            retried = true;
            let offered = resp.headers().get_all(WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok());
            match Challenge::choose(offered, ep.credentials.is_some()) {
                // The credentials were sent and refused: asking again changes nothing.
                Some(Challenge::Basic) if sent_basic => return Ok(resp),
                Some(Challenge::Basic) => ep.basic_scopes.insert(scope.clone(), ()),
                Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                    ep.basic_scopes.invalidate(&scope);
                    let want = challenge_scope.unwrap_or_else(|| scope.clone());
                    ep.tokens.invalidate(&scope);
                    self.fetch_token(i, &realm, service.as_deref(), &want, &scope).await?;
                }
                None => return Ok(resp),
            }
        }
    }

    async fn raw(&self, i: usize, method: Method, url: &str, headers: HeaderMap) -> Result<reqwest::Response, UpstreamError> {
        let name = self.upstream.name.as_str();
        let (breaker, budget) = (&self.health[i].breaker, &self.health[i].budget);
        let gate = breaker.gate();
        if let health::Gate::Refuse { retry_in } = gate {
            metrics::UPSTREAM_REQUESTS.with_label_values(&[name, "refused"]).inc();
            return Err(UpstreamError::CircuitOpen(retry_in));
        }
        let mut guard = ProbeGuard { breaker, gate, settled: false };
        let started = Instant::now();
        let fut = self.http.request(method, url).headers(headers).send();
        let res = tokio::time::timeout(self.upstream.timeout, fut).await;
        guard.settled = true;
        let failed = match &res {
            Ok(Ok(r)) => r.status().is_server_error(),
            _ => true,
        };
        if failed {
            breaker.failed();
        } else {
            breaker.succeeded();
        }
        metrics::UPSTREAM_STATE.with_label_values(&[name]).set(self.breaker.state());
        metrics::UPSTREAM_DURATION.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
        let resp = match res {
            Err(_) => {
                metrics::UPSTREAM_REQUESTS.with_label_values(&[name, "timeout"]).inc();
                return Err(UpstreamError::Timeout);
            }
            Ok(Err(e)) => {
                metrics::UPSTREAM_REQUESTS.with_label_values(&[name, "error"]).inc();
                return Err(if e.is_timeout() { UpstreamError::Timeout } else { UpstreamError::Unreachable(error_chain(&e)) });
            }
            Ok(Ok(r)) => r,
        };
        metrics::UPSTREAM_REQUESTS.with_label_values(&[name, resp.status().as_str()]).inc();
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok());
        budget.observe(header("ratelimit-limit"), header("ratelimit-remaining"));
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            budget.refused(header("retry-after").and_then(|v| v.trim().parse().ok()).map(Duration::from_secs));
        }
        if let Some(n) = self.budget.remaining() {
            metrics::RATELIMIT_REMAINING.with_label_values(&[name]).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(resp)
    }

    async fn fetch_token(&self, i: usize, realm: &str, service: Option<&str>, want: &str, key: &str) -> Result<(), UpstreamError> {
        let ep = &self.endpoints[i];
        let claim = TokenLockClaim::new(&ep.token_locks, key);
        let _guard = claim.lock.lock().await;
        if ep.cached_token(key).is_some() {
            // Someone else fetched it while we waited.
            return Ok(());
        }
        let mut url = url::Url::parse(realm).map_err(|e| UpstreamError::Unreachable(format!("bad token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", want);
        }
        let mut headers = HeaderMap::new();
        // Credentials go to the token realm only when it is the URL's own realm as announced in
        // its challenge (Docker Hub's auth.docker.io, GHCR's ghcr.io/token).
        if let Some(b) = ep.basic_header() {
            headers.insert(AUTHORIZATION, b);
        }
        let resp = self.raw(i, Method::GET, url.as_str(), headers).await?;
        if !resp.status().is_success() {
            let s = resp.status().as_u16();
            return Err(UpstreamError::Status(s, format!("token endpoint answered {s}")));
        }
        #[derive(serde::Deserialize)]
        struct TokenResp {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = self.read_body(resp, MAX_TOKEN_RESPONSE_BYTES, "token response").await?;
        let t: TokenResp =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Status(502, format!("token response is not JSON: {e}")))?;
        let value = t.token.or(t.access_token).ok_or_else(|| UpstreamError::Status(502, "token response has no token".into()))?;
        let life = t.expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME).min(MAX_TOKEN_LIFETIME);
        let expires = Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(Duration::from_secs(1));
        ep.tokens.insert(key.to_string(), Token { value, expires });
        Ok(())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn upstream(url: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: "test".into(),
            url: url::Url::parse(url).unwrap(),
            urls: vec![crate::config::UpstreamUrl { url: url::Url::parse(url).unwrap(), credentials: None }],
            aliases: vec![],
            default: false,
            tag_ttl: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            stale_after: Duration::from_secs(2),
            ratelimit_reserve: 0.1,
            offline: false,
            warm: Default::default(),
        })
    }

    async fn read_head(sock: &mut TcpStream) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && sock.read(&mut b).await.unwrap() == 1 {
            head.push(b[0]);
        }
    }

    /// A loopback server answering its first connection's first request with `head`, then
    /// `chunk` over and over until the client goes away (or once, when `endless` is false).
    async fn serve_once(head: &'static str, chunk: Vec<u8>, endless: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_head(&mut sock).await;
            sock.write_all(head.as_bytes()).await.unwrap();
            while sock.write_all(&chunk).await.is_ok() && endless {}
        });
        url
    }

    fn chunks(parts: &[&'static str]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn capped_read_takes_a_body_up_to_the_limit_and_not_one_byte_more() {
        assert_eq!(read_capped(chunks(&["ab", "cd", "e"]), 5, "thing").await.unwrap(), "abcde");
        let e = read_capped(chunks(&["ab", "cd", "e"]), 4, "thing").await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { what: "thing", limit: 4 }), "{e:?}");
        let oci = e.to_oci("up");
        assert_eq!(oci.status(), 502, "an oversized upstream body is an upstream failure");
        assert!(oci.message.contains("thing over 4 bytes"), "{}", oci.message);
        assert!(!e.is_outage(), "a cached copy is no answer to an upstream that misbehaves");
    }

    #[tokio::test]
    async fn capped_read_stops_pulling_an_endless_body_once_past_the_limit() {
        let pulled = AtomicUsize::new(0);
        let endless = futures::stream::repeat_with(|| {
            pulled.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::io::Error>(Bytes::from_static(&[0; 1024]))
        });
        let e = read_capped(endless, 10 * 1024 - 1, "thing").await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { .. }), "{e:?}");
        assert_eq!(pulled.load(Ordering::Relaxed), 10);
    }

    #[tokio::test]
    async fn a_chunked_body_without_a_length_is_cut_off_at_the_limit() {
        let piece = format!("{:x}\r\n{}\r\n", 64 * 1024, "a".repeat(64 * 1024)).into_bytes();
        let url = serve_once("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", piece, true).await;
        let client = Client::new(upstream(&url));
        let resp = client.send(Method::GET, "r", "/v2/r/tags/list", None).await.unwrap();
        assert_eq!(resp.content_length(), None);
        let e = client.read_body(resp, 1 << 20, "tags list").await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { what: "tags list", .. }), "{e:?}");
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_reading() {
        let url = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\n\r\n", vec![0; 1024], true).await;
        let client = Client::new(upstream(&url));
        let resp = client.send(Method::GET, "r", "/v2/r/manifests/x", None).await.unwrap();
        let e = client.read_body(resp, 1 << 20, "manifest").await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { what: "manifest", .. }), "{e:?}");
    }

    #[test]
    fn tokens_expire_on_their_own_lifetime_and_the_cache_is_bounded() {
        let tokens = token_cache(100);
        let now = Instant::now();
        tokens.insert("live".into(), Token { value: "a".into(), expires: now + Duration::from_secs(300) });
        tokens.insert("dead".into(), Token { value: "b".into(), expires: now });
        assert_eq!(tokens.get("live").map(|t| t.value), Some("a".to_string()));
        assert!(tokens.get("dead").is_none());
        for i in 0..1000 {
            tokens.insert(format!("repository:r{i}:pull"), Token { value: "t".into(), expires: now + Duration::from_secs(300) });
        }
        tokens.run_pending_tasks();
        assert!(tokens.entry_count() <= 100, "{} tokens cached", tokens.entry_count());
    }

    #[tokio::test]
    async fn a_fetched_token_is_cached_and_its_lock_forgotten() {
        let body = br#"{"token":"t-1","expires_in":300}"#;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        let realm = serve_once(head.leak(), body.to_vec(), false).await + "/token";
        let client = Client::new(upstream("http://127.0.0.1:9"));
        client.fetch_token(0, &realm, Some("svc"), "repository:a:pull", "repository:a:pull").await.unwrap();
        assert_eq!(client.endpoints[0].cached_token("repository:a:pull").as_deref(), Some("t-1"));
        assert!(client.endpoints[0].token_locks.lock().is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_token_fetch_leaves_no_lock_behind() {
        // A realm that takes the request and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let (taken, request_taken) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_head(&mut sock).await;
            let _ = taken.send(());
            std::future::pending::<()>().await;
        });
        let client = Client::new(upstream("http://127.0.0.1:9"));
        let mut fetch = Box::pin(client.fetch_token(0, &realm, None, "repository:a:pull", "repository:a:pull"));
        tokio::select! {
            r = &mut fetch => panic!("the realm never answers: {r:?}"),
            _ = request_taken => {}
        }
        assert_eq!(client.endpoints[0].token_locks.lock().len(), 1, "the fetch in flight holds its lock");
        drop(fetch);
        assert!(client.endpoints[0].token_locks.lock().is_empty());
    }
}
