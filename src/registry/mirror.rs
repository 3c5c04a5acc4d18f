//! Mirrored repositories: read-only. Anything addressed by digest is served from the store
//! without contacting the upstream; tags are trusted for `tag_ttl`, then revalidated with a
//! HEAD (which Docker Hub does not count against the pull limit); an outage serves the cached
//! copy marked stale. Cold blobs go through `fill` (one upstream GET, every client streaming).
//! Mirrored content lives in the store under `<upstream name>/<repository>`.

use super::{serve, Body, Outcome, Request, Response};
use crate::config::{Config, Upstream};
use crate::fill::{Fills, Source};
use crate::metrics;
use crate::oci::manifest::{self, ACCEPT_ALL, MAX_MANIFEST_BYTES};
use crate::oci::route::Endpoint;
use crate::oci::{Digest, ErrorCode, OciError, Reference, RepoName};
use crate::store::{ManifestMeta, Store};
use crate::upstream::{health, Client, UpstreamError, MAX_LIST_BYTES};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use http::Method;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Work concurrent requests share, by key. The first caller's work runs in a task of its own: it
/// completes and leaves the table even when every waiter has gone away, so the table never holds
/// an old answer for a later request.
struct Coalesced<T: Clone> {
    running: Arc<Mutex<HashMap<String, Running<T>>>>,
}

/// A shared future and when it started.
type Running<T> = (Joint<T>, Instant);

type Joint<T> = Shared<BoxFuture<'static, T>>;

impl<T: Clone + Send + Sync + 'static> Coalesced<T> {
    fn new() -> Self {
        Coalesced { running: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The shared future for `key`, when it started, and whether this call joined one already
    /// running (`work` is then dropped unstarted). `lost` answers if the task panics.
    fn run(&self, key: String, work: BoxFuture<'static, T>, lost: impl FnOnce(String) -> T + Send + 'static) -> (Joint<T>, Instant, bool) {
        let mut map = self.running.lock();
        if let Some((f, started)) = map.get(&key) {
            return (f.clone(), *started, true);
        }
        let (table, k) = (self.running.clone(), key.clone());
        let task = tokio::spawn(async move {
            let out = work.await;
            table.lock().remove(&k);
            out
        });
        let shared = async move { task.await.unwrap_or_else(|e| lost(e.to_string())) }.boxed().shared();
        let started = Instant::now();
        map.insert(key, (shared.clone(), started));
        (shared, started, false)
    }
}

pub struct Mirror {
    upstreams: Vec<Arc<Upstream>>,
    clients: HashMap<String, Arc<Client>>,
    pub(super) store: Arc<Store>,
    pub fills: Arc<Fills>,
    /// When each cached tag was last confirmed upstream ("<store repo>:<tag>").
    tag_checked: moka::sync::Cache<String, Instant>,
    /// Manifest fetches in flight, shared by concurrent requests.
    manifest_fetches: Coalesced<Result<(Digest, ManifestMeta, Bytes), OciError>>,
    /// With `[cluster]`: cold blobs and tag checks go to their owner.
    pub(super) cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Tag checks in flight ("<store repo>:<tag>"), shared by concurrent requests.
    revalidations: Coalesced<Revalidated>,
    /// Questions to a reference's owner in flight, shared by concurrent requests.
    owner_asks: Coalesced<Result<OwnerAnswer, String>>,
    /// Tags clients pulled, checked in the background (see `warm`).
    pub(super) watch: super::warm::Watch,
    /// Told of every fill of a tag that was not cached or pointed elsewhere.
    events: std::sync::OnceLock<Arc<crate::events::Events>>,
}

/// What a manifest's owner answered.
#[derive(Clone)]
enum OwnerAnswer {
    Found {
        media_type: String,
        digest: String,
        cache: Option<String>,
        warning: Option<String>,
        bytes: Bytes,
    },
    /// The upstream does not have it (the owner asked).
    Unknown,
}

/// Asks `owner` for a manifest; the bytes are checked against their digest. `Err`: why the
/// owner could not answer.
async fn owner_manifest(
    c: &crate::cluster::Cluster,
    owner: &crate::cluster::Member,
    path: &str,
    headers: reqwest::header::HeaderMap,
    reference: &Reference,
) -> Result<OwnerAnswer, String> {
    let r = c.get(owner, path, headers).await?;
    match r.status().as_u16() {
        200 => {}
        404 => return Ok(OwnerAnswer::Unknown),
        s => return Err(format!("owner answered {s}")),
    }
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (Some(media_type), Some(digest)) = (header("content-type"), header("docker-content-digest")) else {
        return Err("owner answered without a digest or media type".into());
    };
    let (cache, warning) = (header("x-berth-cache"), header("warning"));
    let bytes = crate::upstream::read_capped(r.bytes_stream(), MAX_MANIFEST_BYTES, "manifest").await.map_err(|e| format!("{e:?}"))?;
    let d = Digest::parse(&digest).map_err(|_| format!("owner sent digest {digest:?}"))?;
    if Digest::of(d.algorithm(), &bytes) != d || matches!(reference, Reference::Digest(want) if *want != d) {
        return Err("owner's manifest does not match its digest".into());
    }
    Ok(OwnerAnswer::Found { media_type, digest, cache, warning, bytes })
}

/// What checking a cached tag upstream found.
#[derive(Clone)]
enum Revalidated {
    Same,
    /// The upstream moved the tag; the new manifest is stored.
    Moved(Digest, ManifestMeta),
    /// The upstream moved the tag, but the pull budget is at its reserve: the cached answer
    /// stays.
    Kept,
    /// The upstream no longer has the tag; berth forgot it.
    Gone,
    Failed(UpstreamError),
}

/// Forgetting a check only costs a HEAD on the tag's next pull, so the table can be bounded.
const MAX_TAGS_CHECKED: u64 = 100_000;

/// Entries live as long as the longest `tag_ttl`: past its own upstream's ttl an entry no
/// longer makes a tag fresh, so keeping it would only hold memory.
fn tag_checked_cache(ttls: impl Iterator<Item = Duration>) -> moka::sync::Cache<String, Instant> {
    // moka refuses a time to live past 1000 years; a year is as good as forever here.
    let ttl = ttls.max().unwrap_or_default().min(Duration::from_secs(365 * 24 * 3600));
    moka::sync::Cache::builder().max_capacity(MAX_TAGS_CHECKED).time_to_live(ttl).build()
}

fn cache_header(r: Response, result: &'static str) -> Response {
    r.header("X-Berth-Cache", result)
}

impl Mirror {
    pub fn new(config: &Config, store: Arc<Store>) -> Arc<Mirror> {
        let upstreams: Vec<Arc<Upstream>> = config.upstreams.iter().cloned().map(Arc::new).collect();
        let clients = upstreams.iter().map(|u| (u.name.clone(), Arc::new(Client::new(u.clone())))).collect();
        let tag_checked = tag_checked_cache(upstreams.iter().map(|u| u.tag_ttl));
        Arc::new(Mirror {
            upstreams,
            clients,
            store,
            fills: Arc::new(Fills::default()),
            tag_checked,
            manifest_fetches: Coalesced::new(),
            cluster: std::sync::OnceLock::new(),
            revalidations: Coalesced::new(),
            owner_asks: Coalesced::new(),
            watch: Default::default(),
            events: std::sync::OnceLock::new(),
        })
    }

    pub fn set_events(&self, events: Arc<crate::events::Events>) {
        let _ = self.events.set(events);
    }

    pub fn join(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The cluster and the owner of `key` when another node owns it. A request a peer sent
    /// is always served here: the peer chose this node as the owner.
    fn owner_elsewhere(&self, req: &Request<'_>, key: &str) -> Option<(Arc<crate::cluster::Cluster>, crate::cluster::Member)> {
        if req.peer {
            return None;
        }
        let c = self.cluster.get()?;
        c.owner_elsewhere(key).map(|o| (c.clone(), o))
    }

    /// Asks the owner of a manifest reference for it, so that one node per reference talks to
    /// the upstream (fetches, and tag checks after `tag_ttl`). `None`: the owner could not
    /// answer; the caller does the work itself.
    async fn ask_owner(
        &self,
        req: &Request<'_>,
        upstream: &Upstream,
        repo: &RepoName,
        key: &str,
        reference: &Reference,
        outcome: &mut Outcome,
    ) -> Option<Result<Response, OciError>> {
        use crate::cluster::FORWARDS;
        let (c, owner) = self.owner_elsewhere(req, &format!("{key}:{reference}"))?;
        let path = format!("/v2/{}/{repo}/manifests/{reference}", upstream.name);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::ACCEPT, reqwest::header::HeaderValue::from_static(ACCEPT_ALL));
        let fallback = |why: String| {
            tracing::warn!(owner = %owner.url, reference = %reference, error = %why, "manifest owner unavailable; asking the upstream");
            None
        };
        // Concurrent requests for one reference share one question to the owner.
        let (c, owner, reference2) = (c.clone(), owner.clone(), reference.clone());
        let (shared, _, _) = self.owner_asks.run(
            format!("{key}:{reference}"),
            async move {
                let out = owner_manifest(&c, &owner, &path, headers, &reference2).await;
                FORWARDS.with_label_values(&["manifest", if out.is_ok() { "ok" } else { "fallback" }]).inc();
                out
            }
            .boxed(),
            |e| Err(format!("asking the owner failed: {e}")),
        );
        let (media_type, digest, cache, warning, bytes) = match shared.await {
            Ok(OwnerAnswer::Found { media_type, digest, cache, warning, bytes }) => (media_type, digest, cache, warning, bytes),
            Ok(OwnerAnswer::Unknown) => {
                return Some(Err(OciError::msg(
                    ErrorCode::ManifestUnknown,
                    format!("{}/{repo}:{reference} does not exist upstream", upstream.name),
                )));
            }
            Err(why) => return fallback(why),
        };
        if let Reference::Tag(t) = reference {
            self.tag_checked.insert(format!("{key}:{t}"), Instant::now());
        }
        let result = match cache.as_deref() {
            Some("hit") => "hit",
            Some("stale") => "stale",
            Some("coalesced") => "coalesced",
            _ => "miss",
        };
        metrics::CACHE_REQUESTS.with_label_values(&["manifest", result]).inc();
        outcome.cache = Some(result);
        let mut resp = Response::new(200)
            .header("Content-Type", media_type)
            .header("Docker-Content-Digest", digest.clone())
            .header("ETag", format!("\"{digest}\""))
            .header("X-Berth-Cache", result);
        if let Some(w) = warning {
            resp = resp.header("Warning", w);
        }
        Some(Ok(resp.body(Body::Full(bytes))))
    }

    /// An upstream's circuit state (0 closed, 1 probing, 2 open) and the pulls its rate-limit
    /// headers last said were left.
    pub fn upstream_health(&self, name: &str) -> (i64, Option<u64>) {
        self.clients.get(name).map_or((0, None), |c| (c.breaker.state(), c.budget.remaining()))
    }

    /// How long ago a cached tag (`key` as the store names the repository) was last confirmed
    /// upstream, if since start.
    pub fn tag_checked_ago(&self, key: &str, tag: &str) -> Option<Duration> {
        self.tag_checked.get(&format!("{key}:{tag}")).map(|t| t.elapsed())
    }

    pub fn upstream_named(&self, host: &str) -> Option<Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.answers_to(host)).cloned()
    }

    pub fn default_upstream(&self) -> Option<Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.default).cloned()
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub(super) fn client(&self, u: &Upstream) -> Arc<Client> {
        self.clients.get(&u.name).expect("every upstream has a client").clone()
    }

    pub async fn handle(
        &self,
        req: &Request<'_>,
        ep: &Endpoint,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        let key = format!("{}/{}", upstream.name, repo);
        match ep {
            Endpoint::Manifest { reference, .. } => {
                let r = self.manifest(req, upstream, repo, &key, reference, outcome).await;
                if let Ok(resp) = &r {
                    self.watch.pulled(req, upstream, repo, &key, reference, resp);
                }
                r
            }
            Endpoint::Blob { digest, .. } => self.blob(req, upstream, repo, &key, digest, outcome).await,
            Endpoint::TagsList { .. } => self.tags(req, upstream, repo, &key).await,
            Endpoint::Referrers { digest, .. } => self.referrers(upstream, repo, &key, digest).await,
            Endpoint::UploadStart { .. } | Endpoint::Upload { .. } => {
                Err(OciError::msg(ErrorCode::Denied, "mirrored repositories are read-only"))
            }
            Endpoint::Base | Endpoint::Catalog => unreachable!("unnamed endpoints are answered before routing"),
        }
    }

    // ---- manifests ----

    pub(super) async fn manifest(
        &self,
        req: &Request<'_>,
        upstream: &Upstream,
        repo: &RepoName,
        key: &str,
        reference: &Reference,
        outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        let count = |result: &'static str| metrics::CACHE_REQUESTS.with_label_values(&["manifest", result]).inc();
        match reference {
            Reference::Digest(d) => {
                if let Some(meta) = self.store.manifest_meta(key, d)? {
                    self.store.cache_used(d);
                    count("hit");
                    outcome.cache = Some("hit");
                    return serve::manifest(&self.store, d, &meta).await.map(|r| cache_header(r, "hit"));
                }
                if let Some(r) = self.ask_owner(req, upstream, repo, key, reference, outcome).await {
                    return r;
                }
                let (d, meta, _, result) = self.fetch_manifest(upstream, repo, key, reference).await?;
                count(result);
                outcome.cache = Some(result);
                serve::manifest(&self.store, &d, &meta).await.map(|r| cache_header(r, result))
            }
            Reference::Tag(tag) => {
                let tag_key = format!("{key}:{tag}");
                let cached = match self.store.tag_digest(key, tag.as_str())? {
                    Some(d) => self.store.manifest_meta(key, &d)?.map(|m| (d, m)),
                    None => None,
                };
                let Some((cd, cmeta)) = cached else {
                    if let Some(r) = self.ask_owner(req, upstream, repo, key, reference, outcome).await {
                        return r;
                    }
                    let (d, meta, _, result) = self.fetch_manifest(upstream, repo, key, reference).await?;
                    self.tag_checked.insert(tag_key, Instant::now());
                    count(result);
                    outcome.cache = Some(result);
                    return serve::manifest(&self.store, &d, &meta).await.map(|r| cache_header(r, result));
                };
                // An offline upstream's cache is the truth: its tags never go stale.
                let fresh = upstream.offline || self.tag_checked.get(&tag_key).is_some_and(|t| t.elapsed() < upstream.tag_ttl);
                if fresh {
                    self.store.cache_used(&cd);
                    count("hit");
                    outcome.cache = Some("hit");
                    return serve::manifest(&self.store, &cd, &cmeta).await.map(|r| cache_header(r, "hit"));
                }
                if let Some(r) = self.ask_owner(req, upstream, repo, key, reference, outcome).await {
                    return r;
                }
                // One check per tag at a time, in a task of its own: a slow or failing
                // upstream is not waited for past `stale_after` (or at all while its circuit is
                // open), and the check goes on for the next pull.
                let (check, started) = self.revalidation(upstream, repo, key, tag.as_str(), &cd);
                let client = self.client(upstream);
                // A check already running for `stale_after` is known to be slow: later requests
                // do not wait for it again.
                let wait = upstream.stale_after.saturating_sub(started.elapsed());
                let waited = if client.breaker.is_open() || wait.is_zero() { None } else { tokio::time::timeout(wait, check).await.ok() };
                match waited {
                    None => {
                        let e =
                            if client.breaker.is_open() { UpstreamError::CircuitOpen(health::OPEN_FOR) } else { UpstreamError::Timeout };
                        self.stale(upstream, &cd, &cmeta, &e, outcome).await
                    }
                    Some(Revalidated::Same) | Some(Revalidated::Kept) => {
                        count("hit");
                        outcome.cache = Some("hit");
                        serve::manifest(&self.store, &cd, &cmeta).await.map(|r| cache_header(r, "hit"))
                    }
                    Some(Revalidated::Moved(d, meta)) => {
                        count("miss");
                        outcome.cache = Some("miss");
                        serve::manifest(&self.store, &d, &meta).await.map(|r| cache_header(r, "miss"))
                    }
                    Some(Revalidated::Gone) => {
                        Err(OciError::msg(ErrorCode::ManifestUnknown, format!("{}/{repo}:{tag} does not exist upstream", upstream.name)))
                    }
                    Some(Revalidated::Failed(e)) if e.is_outage() => self.stale(upstream, &cd, &cmeta, &e, outcome).await,
                    Some(Revalidated::Failed(e)) => Err(e.to_oci(&upstream.name)),
                }
            }
        }
    }

    /// The check of a cached tag against its upstream, shared by every request that asks while
    /// it runs.
    fn revalidation(&self, upstream: &Upstream, repo: &RepoName, key: &str, tag: &str, cached: &Digest) -> (Joint<Revalidated>, Instant) {
        let check = revalidate(
            self.client(upstream),
            self.store.clone(),
            self.tag_checked.clone(),
            repo.clone(),
            key.to_string(),
            tag.to_string(),
            cached.clone(),
            self.events.get().cloned(),
        );
        let (shared, started, _) = self.revalidations.run(format!("{key}:{tag}"), check.boxed(), |e| {
            Revalidated::Failed(UpstreamError::Unreachable(format!("tag check failed: {e}")))
        });
        (shared, started)
    }

    async fn stale(
        &self,
        upstream: &Upstream,
        d: &Digest,
        meta: &ManifestMeta,
        e: &UpstreamError,
        outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        tracing::warn!(upstream = %upstream.name, error = ?e, "upstream failed; serving the cached tag");
        metrics::CACHE_REQUESTS.with_label_values(&["manifest", "stale"]).inc();
        metrics::STALE_SERVED.with_label_values(&[upstream.name.as_str()]).inc();
        outcome.cache = Some("stale");
        Ok(cache_header(serve::manifest(&self.store, d, meta).await?, "stale").header("Warning", "110 berth \"Response is Stale\""))
    }

    /// Fetches a manifest (coalesced with concurrent fetches of the same reference), verifies
    /// its digest over the exact bytes and stores it. Returns "miss" or "coalesced".
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        key: &str,
        reference: &Reference,
    ) -> Result<(Digest, ManifestMeta, Bytes, &'static str), OciError> {
        let fetch = fetch_manifest(
            self.client(upstream),
            self.store.clone(),
            repo.clone(),
            key.to_string(),
            reference.clone(),
            self.events.get().cloned(),
        );
        let (fut, _, joined) = self.manifest_fetches.run(format!("{key}@{reference}"), fetch.boxed(), |e| {
            Err(OciError::msg(ErrorCode::Internal, format!("manifest fetch failed: {e}")))
        });
        let result = if joined { "coalesced" } else { "miss" };
        let out = fut.await;
        out.map(|(d, m, b)| (d, m, b, result))
    }

    // ---- blobs ----

    pub(super) async fn blob(
        &self,
        req: &Request<'_>,
        upstream: &Upstream,
        repo: &RepoName,
        key: &str,
        d: &Digest,
        outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        let count = |result: &'static str| metrics::CACHE_REQUESTS.with_label_values(&["blob", result]).inc();
        let range = req.header("range");
        if self.store.blob_linked(key, d)? {
            if let Some(r) = serve::blob(&self.store, d, range)? {
                self.store.cache_used(d);
                count("hit");
                outcome.cache = Some("hit");
                if let Some(n) = r.body.len() {
                    metrics::SERVED_BYTES.with_label_values(&["cache"]).inc_by(n);
                }
                return Ok(cache_header(r, "hit"));
            }
        }
        let client = self.client(upstream);
        let path = format!("/v2/{repo}/blobs/{d}");
        let blob_unknown = || OciError::msg(ErrorCode::BlobUnknown, format!("blob {d} is not in {}/{repo}", upstream.name));
        // The bytes may already be here from another repository; the upstream still decides
        // whether this repository has them (a HEAD costs no download).
        // Joining another repository's fill shares its download, not its permission: this
        // repository's upstream must have the blob too.
        let joins_other = self.fills.filling_for_others(key, d);
        if self.store.blob_size(d)?.is_some() || *req.method == Method::HEAD || joins_other {
            let r = client.send(Method::HEAD, repo.as_str(), &path, None).await.map_err(|e| e.to_oci(&upstream.name))?;
            match r.status().as_u16() {
                200 => {}
                404 => return Err(blob_unknown()),
                s => return Err(UpstreamError::from_answer(s, r.headers(), String::new()).to_oci(&upstream.name)),
            }
            if self.store.blob_size(d)?.is_some() {
                self.store.link_blob(key, d, None).await?;
                count("hit");
                outcome.cache = Some("hit");
                return serve::blob(&self.store, d, range)?.map(|r| cache_header(r, "hit")).ok_or_else(blob_unknown);
            }
            if *req.method == Method::HEAD {
                let mut resp = Response::new(200)
                    .header("Docker-Content-Digest", d.to_string())
                    .header("Content-Type", "application/octet-stream")
                    .header("X-Berth-Cache", "miss");
                // Not `r.content_length()`: a HEAD response has an empty body, whose length is 0.
                resp.content_length =
                    r.headers().get(reqwest::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
                outcome.cache = Some("miss");
                return Ok(resp);
            }
        }
        let d2 = d.clone();
        let repo2 = repo.clone();
        let timeout = upstream.timeout;
        let up_name = upstream.name.clone();
        let opener: crate::fill::Opener = Arc::new(move |from: u64| {
            let (client, repo2, d2, up_name) = (client.clone(), repo2.clone(), d2.clone(), up_name.clone());
            async move {
                let path = format!("/v2/{repo2}/blobs/{d2}");
                let r = client.send_from(Method::GET, repo2.as_str(), &path, None, from).await.map_err(|e| e.to_oci(&up_name))?;
                // An upstream that ignores Range answers 200 with the whole body: skip ahead.
                let mut skip = 0u64;
                match r.status().as_u16() {
                    200 => skip = from,
                    206 if from > 0 => {}
                    404 => return Err(OciError::msg(ErrorCode::BlobUnknown, format!("blob {d2} is not in {up_name}/{repo2}"))),
                    s => {
                        let headers = r.headers().clone();
                        let body = client.error_text(r).await;
                        return Err(UpstreamError::from_answer(s, &headers, body).to_oci(&up_name));
                    }
                }
                let total = r.content_length().map(|n| n.saturating_sub(skip));
                let label = up_name.clone();
                let body = r
                    .bytes_stream()
                    .map(move |c| {
                        let mut b = c
                            .inspect(|b| metrics::UPSTREAM_BYTES.with_label_values(&[label.as_str()]).inc_by(b.len() as u64))
                            .map_err(|e| OciError::msg(ErrorCode::UpstreamUnavailable, format!("upstream body interrupted: {e}")))?;
                        let drop_now = skip.min(b.len() as u64);
                        skip -= drop_now;
                        Ok(b.split_off(drop_now as usize))
                    })
                    .filter(|r| futures::future::ready(r.as_ref().map_or(true, |b| !b.is_empty())))
                    .boxed();
                Ok(Source { total, body })
            }
            .boxed()
        });
        // The disk is full: stream straight from upstream, uncached.
        let uncached = |outcome: &mut Outcome, counted: bool| {
            if !counted {
                metrics::FILLS_UNCACHED.inc();
            }
            outcome.cache = Some("miss");
            let (opener, d) = (opener.clone(), d.clone());
            async move {
                let src = opener(0).await?;
                Ok::<_, OciError>(
                    Response::new(200)
                        .header("Docker-Content-Digest", d.to_string())
                        .header("Content-Type", "application/octet-stream")
                        .header("X-Berth-Cache", "uncached")
                        .body(Body::Stream {
                            stream: src.body.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))).boxed(),
                            len: src.total,
                        }),
                )
            }
        };
        // In a cluster the digest's owner fetches it once for every node; the others stream
        // its fill and take over from the upstream if it fails.
        // The owner publishes the blob to the bucket; this node's copy is uploaded only if the
        // owner failed before it did.
        let (source, deferred) = match self.owner_elsewhere(req, &d.to_string()) {
            Some((c, owner)) => (c.owner_opener(owner, format!("/v2/{}/{repo}/blobs/{d}", upstream.name), opener.clone()), true),
            None => (opener.clone(), false),
        };
        let (fill, started) = match self.fills.join_or_start_with(&self.store, key, d, timeout, "blob", source, deferred).await {
            Ok(x) => x,
            // Not even a temp file fits.
            Err(e) if e.code == ErrorCode::InsufficientStorage => return uncached(outcome, false).await,
            Err(e) => return Err(e),
        };
        let result = if started { "miss" } else { "coalesced" };
        count(result);
        outcome.cache = Some(result);
        let total = match fill.started().await {
            Ok(t) => t,
            // The fill ran out of space before this client saw it start: this client gets the
            // bytes anyway, as those already reading do. (The fill counted itself uncached.)
            Err(e) if e.code == ErrorCode::InsufficientStorage => return uncached(outcome, true).await,
            Err(e) => return Err(e),
        };
        let base = Response::new(200)
            .header("Docker-Content-Digest", d.to_string())
            .header("Content-Type", "application/octet-stream")
            .header("X-Berth-Cache", result);
        let served = |n: u64| metrics::SERVED_BYTES.with_label_values(&["upstream"]).inc_by(n);
        match total {
            Some(len) => match serve::parse_range(range, len) {
                Err(e) => Ok(serve::range_error(e, len)),
                Ok(None) => {
                    served(len);
                    Ok(base.header("Accept-Ranges", "bytes").body(Body::Stream { stream: fill.stream(0, None), len: Some(len) }))
                }
                Ok(Some((s, e))) => {
                    served(e - s + 1);
                    let mut r = base.header("Content-Range", format!("bytes {s}-{e}/{len}"));
                    r.status = 206;
                    Ok(r.body(Body::Stream { stream: fill.stream(s, Some(e + 1)), len: Some(e - s + 1) }))
                }
            },
            None => Ok(base.body(Body::Stream { stream: fill.stream(0, None), len: None })),
        }
    }

    // ---- discovery ----

    async fn tags(&self, req: &Request<'_>, upstream: &Upstream, repo: &RepoName, key: &str) -> Result<Response, OciError> {
        let client = self.client(upstream);
        let mut path = format!("/v2/{repo}/tags/list");
        if let Some(q) = req.query.filter(|q| !q.is_empty()) {
            // Only pagination goes upstream; `ns` is berth's routing.
            let kept: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(url::form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == "n" || k == "last"))
                .finish();
            if !kept.is_empty() {
                path = format!("{path}?{kept}");
            }
        }
        match client.send(Method::GET, repo.as_str(), &path, None).await {
            Ok(r) if r.status().is_success() => {
                let links = r.headers().get_all(reqwest::header::LINK).iter().filter_map(|v| v.to_str().ok());
                let next_page = next_link(links).and_then(|target| next_page(&target, &upstream.url, req));
                let body = client.read_body(r, MAX_LIST_BYTES, "tags list").await.map_err(|e| e.to_oci(&upstream.name))?;
                Ok(match next_page {
                    Some(link) => Response::new(200).json(body).header("Link", link),
                    None => Response::new(200).json(body),
                })
            }
            Ok(r) if r.status().as_u16() == 404 => {
                Err(OciError::msg(ErrorCode::NameUnknown, format!("{}/{repo} does not exist upstream", upstream.name)))
            }
            Ok(r) => {
                self.cached_tags(req, key, UpstreamError::from_answer(r.status().as_u16(), r.headers(), String::new()), &upstream.name)
            }
            Err(e) => self.cached_tags(req, key, e, &upstream.name),
        }
    }

    /// During an outage, the tags berth has cached are the best answer it has.
    fn cached_tags(&self, req: &Request<'_>, key: &str, e: UpstreamError, upstream: &str) -> Result<Response, OciError> {
        if e.is_outage() && self.store.meta().repo_exists(key)? {
            let page =
                super::listing::paged_json(req, "tags", Some(key), |last, n| Ok(self.store.tags(key, last, n)?.unwrap_or_default()))?;
            return Ok(page.header("X-Berth-Cache", "stale"));
        }
        Err(e.to_oci(upstream))
    }

    async fn referrers(&self, upstream: &Upstream, repo: &RepoName, key: &str, d: &Digest) -> Result<Response, OciError> {
        let client = self.client(upstream);
        let path = format!("/v2/{repo}/referrers/{d}");
        if let Ok(r) = client.send(Method::GET, repo.as_str(), &path, Some(manifest::OCI_INDEX)).await {
            if r.status().is_success() {
                match client.read_body(r, MAX_MANIFEST_BYTES, "referrers index").await {
                    Ok(body) => return Ok(Response::new(200).header("Content-Type", manifest::OCI_INDEX).body(Body::Full(body))),
                    // A misbehaving upstream is reported, not papered over with the cached list.
                    Err(e @ UpstreamError::TooLarge { .. }) => return Err(e.to_oci(&upstream.name)),
                    Err(_) => {}
                }
            }
        }
        // Upstreams without the referrers API (or unreachable): what berth has cached.
        let list = self.store.referrers(key, d)?;
        let body = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": list});
        Ok(Response::new(200).header("Content-Type", manifest::OCI_INDEX).body(Body::Full(serde_json::to_vec(&body).expect("json").into())))
    }
}

/// The target of the first link with relation type `next` among an upstream's `Link` values:
/// one header may carry several links and a response several headers, `rel` may be quoted or
/// not and list several types. A value that does not parse as RFC 8288 is skipped.
pub(super) fn next_link<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    type ParseError<'s> = nom_language::error::VerboseError<&'s str>;
    let is_next = |l: &nom_rfc8288::complete::LinkData<'_>| {
        l.params.iter().any(|p| {
            p.key.eq_ignore_ascii_case("rel")
                && p.val.as_deref().is_some_and(|v| v.split_ascii_whitespace().any(|r| r.eq_ignore_ascii_case("next")))
        })
    };
    values.into_iter().find_map(|v| {
        let links = nom_rfc8288::complete::link_lenient::<ParseError<'_>>(v.trim()).ok()?;
        links.into_iter().flatten().find(is_next).map(|l| l.url.to_string())
    })
}

/// The upstream's next-page link target (`...?n=&last=`) rewritten to the same page of the
/// path the client asked: the upstream's path names the repository as the upstream knows it,
/// which does not route back through berth.
fn next_page(target: &str, upstream: &url::Url, req: &Request<'_>) -> Option<String> {
    // A relative target resolves against the upstream; only its query matters.
    let target = upstream.join(target).ok()?;
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.extend_pairs(target.query_pairs().filter(|(k, _)| k == "n" || k == "last"));
    if let Some(ns) = req.param("ns") {
        q.append_pair("ns", &ns);
    }
    Some(format!("<{}?{}>; rel=\"next\"", req.path, q.finish()))
}

/// HEAD (which Docker Hub does not count as a pull); when the tag moved, GET the new manifest
/// unless the pull budget is at its reserve.
#[allow(clippy::too_many_arguments)]
async fn revalidate(
    client: Arc<Client>,
    store: Arc<Store>,
    tag_checked: moka::sync::Cache<String, Instant>,
    repo: RepoName,
    key: String,
    tag: String,
    cached: Digest,
    events: Option<Arc<crate::events::Events>>,
) -> Revalidated {
    let tag_key = format!("{key}:{tag}");
    let path = format!("/v2/{repo}/manifests/{tag}");
    let r = match client.send(Method::HEAD, repo.as_str(), &path, Some(ACCEPT_ALL)).await {
        Ok(r) => r,
        Err(e) => return Revalidated::Failed(e),
    };
    match r.status().as_u16() {
        200..=299 => {}
        404 => {
            // The upstream is authoritative for its tags: a tag it no longer has is gone.
            if let Err(e) = store.delete_tag(&key, &tag, false).await {
                tracing::warn!(error = %e, tag = %tag_key, "forgetting a tag the upstream dropped");
            }
            tag_checked.invalidate(&tag_key);
            return Revalidated::Gone;
        }
        s => return Revalidated::Failed(UpstreamError::from_answer(s, r.headers(), String::new())),
    }
    let same = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) == Some(cached.to_string().as_str());
    if same {
        tag_checked.insert(tag_key, Instant::now());
        return Revalidated::Same;
    }
    if client.budget.thrifty() {
        metrics::PULLS_SAVED.with_label_values(&[client.upstream.name.as_str()]).inc();
        tracing::info!(tag = %tag_key, remaining = ?client.budget.remaining(), "upstream moved a tag; keeping the cached one to save the pull budget");
        tag_checked.insert(tag_key, Instant::now());
        return Revalidated::Kept;
    }
    let reference = match Reference::parse(&tag) {
        Ok(r) => r,
        Err(e) => return Revalidated::Failed(UpstreamError::Status(400, e.message)),
    };
    match fetch_manifest(client, store, repo, key, reference, events).await {
        Ok((d, meta, _)) => {
            tag_checked.insert(tag_key, Instant::now());
            Revalidated::Moved(d, meta)
        }
        Err(e) => Revalidated::Failed(UpstreamError::Status(e.status(), e.message)),
    }
}

async fn fetch_manifest(
    client: Arc<Client>,
    store: Arc<Store>,
    repo: RepoName,
    key: String,
    reference: Reference,
    events: Option<Arc<crate::events::Events>>,
) -> Result<(Digest, ManifestMeta, Bytes), OciError> {
    let up = client.upstream.name.clone();
    if let Some(wait) = client.budget.exhausted() {
        return Err(UpstreamError::BudgetSpent(wait).to_oci(&up));
    }
    let path = format!("/v2/{repo}/manifests/{reference}");
    metrics::PULLS_SPENT.with_label_values(&[up.as_str()]).inc();
    let r = client.send(Method::GET, repo.as_str(), &path, Some(ACCEPT_ALL)).await.map_err(|e| e.to_oci(&up))?;
    match r.status().as_u16() {
        200 => {}
        404 => return Err(OciError::msg(ErrorCode::ManifestUnknown, format!("{up}/{repo}:{reference} does not exist upstream"))),
        s => {
            let headers = r.headers().clone();
            let body = client.error_text(r).await;
            return Err(UpstreamError::from_answer(s, &headers, body).to_oci(&up));
        }
    }
    let media_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string());
    let announced = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).and_then(|s| Digest::parse(s).ok());
    let bytes = client.read_body(r, MAX_MANIFEST_BYTES, "manifest").await.map_err(|e| e.to_oci(&up))?;
    let algo = match &reference {
        Reference::Digest(d) => d.algorithm(),
        Reference::Tag(_) => announced.as_ref().map(|d| d.algorithm()).unwrap_or(crate::oci::Algorithm::Sha256),
    };
    let actual = Digest::of(algo, &bytes);
    let expected = match &reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => announced,
    };
    if let Some(exp) = expected {
        if exp != actual {
            metrics::DIGEST_MISMATCH.with_label_values(&["manifest"]).inc();
            return Err(OciError::msg(
                ErrorCode::UpstreamUnavailable,
                format!("upstream {up} sent manifest bytes with digest {actual}, expected {exp}; not cached"),
            ));
        }
    }
    // Upstream content is stored as given even when berth would not accept it on push.
    let info = manifest::inspect(&bytes, None).ok();
    let meta = ManifestMeta {
        media_type: media_type
            .filter(|m| !m.is_empty() && m != "application/octet-stream")
            .or_else(|| info.as_ref().map(|i| i.media_type.clone()))
            .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string()),
        size: bytes.len() as u64,
        subject: info.as_ref().and_then(|i| i.subject.as_ref().map(|s| s.to_string())),
        artifact_type: info.as_ref().and_then(|i| i.effective_artifact_type()),
        annotations: info.as_ref().and_then(|i| i.annotations.clone()),
    };
    let tag = match &reference {
        Reference::Tag(t) => Some(t.as_str()),
        Reference::Digest(_) => None,
    };
    let events = events.filter(|e| e.enabled());
    let was = match (tag, &events) {
        (Some(t), Some(_)) => store.tag_digest(&key, t)?,
        _ => None,
    };
    store
        .put_manifest(
            &key,
            &actual,
            bytes.clone(),
            meta.clone(),
            tag.map(|t| vec![t.to_string()]).unwrap_or_default(),
            crate::store::TagExpect::Any,
            (Vec::new(), Vec::new()),
            Arc::new(|_: &str| false),
            None,
            None,
        )
        .await?;
    store.cache_filled(&actual).await;
    if let (Some(events), Some(t)) = (events, tag) {
        if was.as_ref() != Some(&actual) {
            let tags = [t.to_string()];
            let about = crate::events::About {
                repository: &key,
                tags: &tags,
                digest: Some(actual.to_string()),
                media_type: Some(&meta.media_type),
                size: Some(meta.size),
                platforms: crate::events::platforms_of(&bytes),
                upstream: Some(&up),
            };
            let actor = crate::events::Actor::default();
            events.emit_logged(events.event("mirror.filled", &about, &actor), &actor).await;
        }
    }
    Ok((actual, meta, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_are_found_whatever_the_quoting_order_or_header_count() {
        let next = "/v2/r/tags/list?n=2&last=b";
        for values in [
            vec![r#"</v2/r/tags/list?n=2&last=b>; rel="next""#],
            vec!["</v2/r/tags/list?n=2&last=b>; rel=next"],
            vec!["</v2/r/tags/list?n=2&last=b>;rel=NEXT"],
            vec![r#"</v2/r/tags/list?n=2>; rel="first", </v2/r/tags/list?n=2&last=b>; rel="next""#],
            vec![r#"</v2/r/tags/list?n=2&last=b>; rel="prev next"; title="a, b""#],
            vec![r#"</v2/r/tags/list?n=2>; rel="first""#, "</v2/r/tags/list?n=2&last=b>; rel=next"],
            vec!["not a link", "</v2/r/tags/list?n=2&last=b>; rel=next"],
        ] {
            assert_eq!(next_link(values.iter().copied()).as_deref(), Some(next), "{values:?}");
        }
        for values in [vec![], vec![r#"</v2/r/tags/list?n=2>; rel="first""#], vec!["</x>; rel=nextish"], vec!["garbage"]] {
            assert_eq!(next_link(values.iter().copied()), None, "{values:?}");
        }
    }

    #[test]
    fn tag_checks_are_bounded_and_live_as_long_as_the_longest_tag_ttl() {
        let c = tag_checked_cache([Duration::from_secs(60), Duration::from_secs(600)].into_iter());
        assert_eq!(c.policy().max_capacity(), Some(MAX_TAGS_CHECKED));
        assert_eq!(c.policy().time_to_live(), Some(Duration::from_secs(600)));
        let c = tag_checked_cache([Duration::MAX].into_iter());
        assert!(c.policy().time_to_live().is_some_and(|t| t <= Duration::from_secs(365 * 24 * 3600)));
        // No upstreams: nothing is ever checked, but the mirror still builds.
        tag_checked_cache(std::iter::empty());
    }
}
