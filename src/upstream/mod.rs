//! The client side: talking to one upstream registry. Bearer tokens from the
//! `WWW-Authenticate` challenge (anonymous or with the configured credentials), cached per scope
//! and fetched once for concurrent requests; Basic-auth upstreams; redirects followed with
//! credentials dropped on a cross-host hop (reqwest's policy); connect and first-byte timeouts.
//! Never imports pingora's server types.

mod challenge;

pub use challenge::Challenge;

use crate::config::Upstream;
use crate::metrics;
use crate::oci::{ErrorCode, OciError};
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens are refreshed this long before the upstream says they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

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
}

impl UpstreamError {
    /// True for failures where a cached copy should be served instead: the upstream is down,
    /// slow, overloaded or rate-limiting.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::Timeout => true,
            UpstreamError::Status(s, _) => *s >= 500 || *s == 429,
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
            UpstreamError::Status(s @ (401 | 403), _) => {
                OciError::msg(ErrorCode::Denied, format!("upstream {upstream} refused access ({s}); check berth's credentials for it"))
            }
            UpstreamError::Status(s, body) => {
                OciError::msg(ErrorCode::UpstreamUnavailable, format!("upstream {upstream} answered {s}: {}", truncate(body, 200)))
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub struct Client {
    pub upstream: Arc<Upstream>,
    http: reqwest::Client,
    tokens: Mutex<HashMap<String, Token>>,
    /// One token fetch per scope at a time; later requests wait and reuse it.
    token_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Remembered challenge scheme, so later requests authenticate up front.
    basic: std::sync::atomic::AtomicBool,
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
        Client {
            upstream,
            http,
            tokens: Mutex::new(HashMap::new()),
            token_locks: Mutex::new(HashMap::new()),
            basic: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.upstream.url.as_str().trim_end_matches('/'), path)
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        use base64::Engine;
        let (user, pw) = self.upstream.credentials.as_ref()?;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pw.expose()));
        let mut v = HeaderValue::from_str(&format!("Basic {enc}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        tokens.get(scope).filter(|t| t.expires > Instant::now()).map(|t| t.value.clone())
    }

    fn auth_for(&self, scope: &str) -> Option<HeaderValue> {
        if self.basic.load(std::sync::atomic::Ordering::Relaxed) {
            return self.basic_header();
        }
        let t = self.cached_token(scope)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Sends a request for `repo` (the upstream's repository name), authenticating as the
    /// upstream demands. Returns the response with any status; transport failures are errors.
    pub async fn send(&self, method: Method, repo: &str, path: &str, accept: Option<&str>) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(method, repo, path, accept, 0).await
    }

    /// As `send`, asking for the body from byte `from` on (`Range`) when it is not zero.
    pub async fn send_from(
        &self,
        method: Method,
        repo: &str,
        path: &str,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
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
            if let Some(auth) = self.auth_for(&scope) {
                headers.insert(AUTHORIZATION, auth);
            }
            let resp = self.raw(method.clone(), &self.url(path), headers).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            retried = true;
            let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(Challenge::parse);
            match challenge {
                Some(Challenge::Basic) if self.upstream.credentials.is_some() => {
                    self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                    let want = challenge_scope.unwrap_or_else(|| scope.clone());
                    self.tokens.lock().remove(&scope);
                    self.fetch_token(&realm, service.as_deref(), &want, &scope).await?;
                }
                _ => return Ok(resp),
            }
        }
    }

    async fn raw(&self, method: Method, url: &str, headers: HeaderMap) -> Result<reqwest::Response, UpstreamError> {
        let started = Instant::now();
        let fut = self.http.request(method, url).headers(headers).send();
        let res = tokio::time::timeout(self.upstream.timeout, fut).await;
        let name = self.upstream.name.as_str();
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
        if let Some(rem) = resp.headers().get("ratelimit-remaining").and_then(|v| v.to_str().ok()) {
            if let Ok(n) = rem.split(';').next().unwrap_or("").trim().parse::<i64>() {
                metrics::RATELIMIT_REMAINING.with_label_values(&[name]).set(n);
            }
        }
        Ok(resp)
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, want: &str, key: &str) -> Result<(), UpstreamError> {
        let lock = self.token_locks.lock().entry(key.to_string()).or_default().clone();
        let _guard = lock.lock().await;
        if self.cached_token(key).is_some() {
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
        // Credentials go to the token realm only when it is the upstream's own realm as
        // announced in its challenge (Docker Hub's auth.docker.io, GHCR's ghcr.io/token).
        if let Some(b) = self.basic_header() {
            headers.insert(AUTHORIZATION, b);
        }
        let resp = self.raw(Method::GET, url.as_str(), headers).await?;
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
        let body = tokio::time::timeout(self.upstream.timeout, resp.bytes())
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        let t: TokenResp =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Status(502, format!("token response is not JSON: {e}")))?;
        let value = t.token.or(t.access_token).ok_or_else(|| UpstreamError::Status(502, "token response has no token".into()))?;
        let life = t.expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let expires = Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(Duration::from_secs(1));
        self.tokens.lock().insert(key.to_string(), Token { value, expires });
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
