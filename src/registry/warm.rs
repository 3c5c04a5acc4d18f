//! Keeping mirrored content warm before anyone asks for it.
//!
//! Prefetch: an upstream's `prefetch` references (tags, or globs over the tags its
//! `tags/list` names) are resolved at start and every `tag_ttl`; the manifests and the layers
//! of the `prefetch_platforms` are fetched, and with `pin = true` kept from eviction. Watch: a
//! tag pulled within `watch_window` is checked at its TTL; when the upstream moved it, the new
//! manifest and the layers of the platforms pulled before are fetched, so the next pull after a
//! release is a hit.
//!
//! Both go through the mirror's own request paths ([`Mirror::manifest`], [`Mirror::blob`]): one
//! upstream fetch per manifest and blob, shared with concurrent pulls, the tag TTL, the circuit
//! breaker and (in a cluster) each reference's owner all apply as they do to a client. Neither
//! ever blocks serving: they run in a task of their own, and below the pull budget's reserve
//! they pause.
//!
//! Which platforms of an index were pulled is kept in memory, bounded: it is only worth
//! something while the watch window is open, a restart costs at most one cold pull per tag, and
//! it stays out of the store's schema.

use super::mirror::Mirror;
use super::{Body, Request, Response};
use crate::config::Upstream;
use crate::metrics;
use crate::oci::manifest::{Descriptor, Platform};
use crate::oci::{Digest, OciError, Reference, RepoName, Tag};
use futures::StreamExt;
use http::{HeaderMap, Method};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tags watched at once; the least recently pulled are forgotten first.
const MAX_WATCHED: u64 = 10_000;
/// Index entries remembered, to tell which platform a manifest pulled by digest is.
const MAX_CHILDREN: u64 = 100_000;
/// Tag checks and warm-ups at once.
const CONCURRENT_CHECKS: usize = 4;
/// Pages of `tags/list` read to resolve one pattern.
const MAX_TAG_PAGES: usize = 100;
/// The first retry of a failed prefetch; each failure doubles it, up to the upstream's
/// `tag_ttl` (at most five minutes).
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Which entries of an index to fetch.
#[derive(Clone)]
enum Platforms {
    All,
    /// Entries one of these covers.
    Covered(Vec<Platform>),
    /// Entries that are one of these exactly (the platforms pulled before).
    Exactly(HashSet<Platform>),
}

impl Platforms {
    fn wants(&self, entry: Option<&Platform>) -> bool {
        match (self, entry) {
            (Platforms::All, _) => true,
            (Platforms::Covered(ps), Some(e)) => ps.iter().any(|p| p.covers(e)),
            (Platforms::Exactly(ps), Some(e)) => ps.contains(e),
            (_, None) => false,
        }
    }
}

/// A tag pulled within its upstream's watch window.
struct Watched {
    upstream: Arc<Upstream>,
    repo: RepoName,
    tag: String,
    /// The digest last served or warmed: a check that finds another one warms it.
    digest: Digest,
    /// Platforms of the tag's index pulled by digest since it was watched.
    platforms: HashSet<Platform>,
    next_check: Instant,
    /// When the window last restarted (a pull re-inserts the entry, at most once a minute).
    refreshed: Instant,
}

/// Restarting a tag's window is a cache write: once a minute is precise enough for days.
const REFRESH_EVERY: Duration = Duration::from_secs(60);

type Entry = Arc<Mutex<Watched>>;

/// An index entry's platform, and the watched tags ("<store repo>:<tag>") whose index lists it.
type Child = (Platform, Arc<Mutex<Vec<String>>>);

/// Each watched tag lives for its upstream's window from its last pull.
struct WindowExpiry;

impl moka::Expiry<String, Entry> for WindowExpiry {
    fn expire_after_create(&self, _: &String, w: &Entry, _: Instant) -> Option<Duration> {
        Some(window(&w.lock().upstream))
    }

    fn expire_after_update(&self, _: &String, w: &Entry, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(window(&w.lock().upstream))
    }
}

fn window(u: &Upstream) -> Duration {
    // moka refuses a time to live past 1000 years; a year is as good as forever here.
    u.warm.watch_window.min(Duration::from_secs(365 * 24 * 3600))
}

/// The tags clients pulled, and which platforms of their indexes.
pub(super) struct Watch {
    /// "<store repo>:<tag>".
    tags: moka::sync::Cache<String, Entry>,
    /// "<store repo>@<child digest>": the platform an index entry names and the watched tags
    /// whose index lists it.
    children: moka::sync::Cache<String, Child>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            tags: moka::sync::Cache::builder().max_capacity(MAX_WATCHED).expire_after(WindowExpiry).build(),
            children: moka::sync::Cache::builder().max_capacity(MAX_CHILDREN).build(),
        }
    }
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The entries of an index, if `bytes` is one.
fn index_entries(bytes: &[u8]) -> Vec<Descriptor> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    let Ok(info) = crate::oci::manifest::inspect(bytes, None) else { return Vec::new() };
    if info.children.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice::<Index>(bytes).map(|i| i.manifests).unwrap_or_default()
}

impl Watch {
    /// Records a manifest a client was served: a tag starts (or goes on) being watched; a
    /// manifest pulled by digest that a watched index lists marks its platform as pulled.
    pub(super) fn pulled(
        &self,
        req: &Request<'_>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        key: &str,
        reference: &Reference,
        r: &Response,
    ) {
        // A peer's request: the node its client asked records it.
        if req.peer || upstream.warm.watch_window.is_zero() || upstream.offline || r.status != 200 {
            return;
        }
        match reference {
            Reference::Tag(tag) => {
                let Some(d) = header(r, "Docker-Content-Digest").and_then(|d| Digest::parse(d).ok()) else { return };
                let tag_key = format!("{key}:{tag}");
                let (entry, new_digest) = match self.tags.get(&tag_key) {
                    Some(e) => {
                        let mut w = e.lock();
                        let moved = w.digest != d;
                        if moved {
                            // A client got the new digest first: what it pulls next is what
                            // the next release warms.
                            w.digest = d.clone();
                            w.platforms.clear();
                        }
                        let stale = w.refreshed.elapsed() >= REFRESH_EVERY;
                        if stale {
                            w.refreshed = Instant::now();
                        }
                        drop(w);
                        (stale.then_some(e), moved)
                    }
                    None => {
                        let now = Instant::now();
                        let w = Watched {
                            upstream: upstream.clone(),
                            repo: repo.clone(),
                            tag: tag.to_string(),
                            digest: d.clone(),
                            platforms: HashSet::new(),
                            next_check: now + upstream.tag_ttl,
                            refreshed: now,
                        };
                        (Some(Arc::new(Mutex::new(w))), true)
                    }
                };
                if let Some(e) = entry {
                    // Inserting again restarts the window.
                    self.tags.insert(tag_key.clone(), e);
                }
                // An index's entries are read once per digest, not on every pull.
                if let (true, Body::Full(bytes)) = (new_digest, &r.body) {
                    for e in index_entries(bytes) {
                        let (Some(p), Ok(cd)) = (Platform::of(&e), Digest::parse(&e.digest)) else { continue };
                        let (_, tags) = self.children.get_with(format!("{key}@{cd}"), || (p, Arc::default()));
                        let mut tags = tags.lock();
                        if !tags.contains(&tag_key) {
                            tags.push(tag_key.clone());
                        }
                    }
                }
            }
            Reference::Digest(d) => {
                let Some((p, tags)) = self.children.get(&format!("{key}@{d}")) else { return };
                for t in tags.lock().iter() {
                    if let Some(e) = self.tags.get(t) {
                        e.lock().platforms.insert(p.clone());
                    }
                }
            }
        }
    }

    fn due(&self) -> Vec<(String, Entry)> {
        let now = Instant::now();
        self.tags.iter().filter(|(_, e)| e.lock().next_check <= now).map(|(k, e)| ((*k).clone(), e)).collect()
    }
}

/// A request as a client would send it, for the mirror's own paths.
struct Synthetic {
    method: Method,
    path: String,
    headers: HeaderMap,
}

impl Synthetic {
    fn get(path: String) -> Synthetic {
        Synthetic { method: Method::GET, path, headers: HeaderMap::new() }
    }

    fn request(&self) -> Request<'_> {
        Request { method: &self.method, path: &self.path, query: None, headers: &self.headers, client: None, tls: false, peer: false }
    }
}

/// What warming one tag did.
#[derive(Default)]
struct Warmed {
    /// Bytes fetched from upstream (blobs berth did not have).
    bytes: u64,
    /// Every manifest and blob of the chosen platforms.
    digests: HashSet<Digest>,
    /// The tag was served from the cache because its upstream failed.
    stale: bool,
}

/// Keeps what prefetching has found so far pinned, while it fetches: a tight cache bound must
/// not evict the first layers of a run to make room for the later ones.
struct Pins {
    store: Arc<crate::store::Store>,
    owner: String,
    on: bool,
    /// What the last complete run pinned: kept until a run completes again.
    kept: HashSet<Digest>,
    found: HashSet<Digest>,
}

impl Pins {
    fn add(&mut self, ds: impl IntoIterator<Item = Digest>) {
        let before = self.found.len();
        self.found.extend(ds);
        if self.on && self.found.len() != before {
            self.store.set_pins(&self.owner, self.kept.union(&self.found).cloned().collect());
        }
    }

    /// After a run: a complete one replaces the pins (tags that moved release their old
    /// content); an incomplete one keeps the old pins besides the new.
    fn finish(&mut self, complete: bool) {
        let found = std::mem::take(&mut self.found);
        self.kept = if complete { found } else { self.kept.union(&found).cloned().collect() };
        if self.on {
            self.store.set_pins(&self.owner, self.kept.clone());
        }
    }
}

impl Mirror {
    /// The digest of `repo:tag` as a pull would get it (fetched, checked past its TTL, or from
    /// the cache while the upstream fails).
    async fn resolve(&self, upstream: &Upstream, repo: &RepoName, tag: &str) -> Result<(Digest, bool), OciError> {
        let key = format!("{}/{}", upstream.name, repo);
        let reference = Reference::Tag(
            Tag::parse(tag).ok_or_else(|| OciError::msg(crate::oci::ErrorCode::BadRequest, format!("{tag:?} is not a tag")))?,
        );
        let s = Synthetic::get(format!("/v2/{}/{repo}/manifests/{tag}", upstream.name));
        let mut outcome = super::Outcome::default();
        let r = self.manifest(&s.request(), upstream, repo, &key, &reference, &mut outcome).await?;
        let d = header(&r, "Docker-Content-Digest")
            .and_then(|d| Digest::parse(d).ok())
            .ok_or_else(|| OciError::msg(crate::oci::ErrorCode::Internal, format!("{key}:{tag} was answered without a digest")))?;
        Ok((d, header(&r, "X-Berth-Cache") == Some("stale")))
    }

    /// Makes sure the manifest `d` of `repo`, the chosen entries of it if it is an index, and
    /// every blob they name are in the store, through the paths pulls take.
    async fn warm_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        d: &Digest,
        platforms: &Platforms,
        pins: &mut Option<&mut Pins>,
        out: &mut Warmed,
    ) -> Result<(), OciError> {
        let key = format!("{}/{}", upstream.name, repo);
        let mut todo = vec![(d.clone(), 0)];
        while let Some((m, depth)) = todo.pop() {
            out.digests.insert(m.clone());
            let s = Synthetic::get(format!("/v2/{}/{repo}/manifests/{m}", upstream.name));
            let mut outcome = super::Outcome::default();
            let r = self.manifest(&s.request(), upstream, repo, &key, &Reference::Digest(m.clone()), &mut outcome).await?;
            let Body::Full(bytes) = r.body else { continue };
            let info = match crate::oci::manifest::inspect(&bytes, None) {
                Ok(i) => i,
                // Stored as the upstream sent it: nothing berth can follow.
                Err(_) => continue,
            };
            let mut found: Vec<Digest> = vec![m.clone()];
            if !info.children.is_empty() {
                // Nested indexes are followed one level down, whatever their platform says.
                let entries = index_entries(&bytes);
                for e in entries {
                    let Ok(cd) = Digest::parse(&e.digest) else { continue };
                    if depth > 0 || platforms.wants(Platform::of(&e).as_ref()) {
                        found.push(cd.clone());
                        if depth < 2 {
                            todo.push((cd, depth + 1));
                        }
                    }
                }
            }
            found.extend(info.blobs.iter().cloned());
            if let Some(p) = pins.as_deref_mut() {
                p.add(found.iter().cloned());
            }
            for b in &info.blobs {
                out.digests.insert(b.clone());
                out.bytes += self.warm_blob(upstream, repo, &key, b).await?;
            }
        }
        Ok(())
    }

    /// Fetches a blob the way a pull does, unless the repository has it. Returns the bytes read.
    async fn warm_blob(&self, upstream: &Upstream, repo: &RepoName, key: &str, d: &Digest) -> Result<u64, OciError> {
        if self.store.blob_linked(key, d)? && self.store.blob_size(d)?.is_some() {
            return Ok(0);
        }
        let s = Synthetic::get(format!("/v2/{}/{repo}/blobs/{d}", upstream.name));
        let mut outcome = super::Outcome::default();
        let r = self.blob(&s.request(), upstream, repo, key, d, &mut outcome).await?;
        let mut n = 0;
        if let Body::Stream { mut stream, .. } = r.body {
            // A fill's readers get its last byte only once the digest verified: reading to the
            // end is waiting for the blob to be in the store.
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| OciError::msg(crate::oci::ErrorCode::UpstreamUnavailable, format!("fetching {d} for {key}: {e}")))?;
                n += chunk.len() as u64;
            }
        }
        Ok(n)
    }

    /// Checks a watched tag; when the upstream moved it, fetches the new content for the
    /// platforms pulled before.
    async fn check_watched(&self, tag_key: &str, entry: &Entry) {
        let (upstream, repo, tag, last, pulled) = {
            let w = entry.lock();
            (w.upstream.clone(), w.repo.clone(), w.tag.clone(), w.digest.clone(), w.platforms.clone())
        };
        let name = upstream.name.as_str();
        let client = self.client(&upstream);
        let ttl = upstream.tag_ttl;
        let later = |after: Duration| entry.lock().next_check = Instant::now() + after.max(Duration::from_millis(100));
        if client.breaker.is_open() {
            // Nothing to learn from an upstream that is failing: the next check comes later.
            later(ttl);
            return;
        }
        let (d, stale) = match self.resolve(&upstream, &repo, &tag).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(tag = %tag_key, error = %e.message, "checking a watched tag");
                if e.code == crate::oci::ErrorCode::ManifestUnknown {
                    self.watch.tags.invalidate(tag_key);
                }
                later(ttl);
                return;
            }
        };
        // The next check is due when this one's answer goes stale.
        let age = self.tag_checked_ago(&format!("{name}/{repo}"), &tag).unwrap_or_default();
        later(ttl.saturating_sub(age) + Duration::from_millis(10));
        if d == last || stale {
            return;
        }
        if client.budget.thrifty() {
            // Prefetching of any kind pauses at the reserve; the next check tries again.
            metrics::WATCH_REFRESHES.with_label_values(&[name, "paused"]).inc();
            return;
        }
        let mut out = Warmed::default();
        let platforms = Platforms::Exactly(pulled.clone());
        match self.warm_manifest(&upstream, &repo, &d, &platforms, &mut None, &mut out).await {
            Ok(()) => {
                metrics::WATCH_REFRESHES.with_label_values(&[name, "warmed"]).inc();
                metrics::WATCH_BYTES.with_label_values(&[name]).inc_by(out.bytes);
                let platforms: Vec<String> = pulled.iter().map(|p| p.to_string()).collect();
                tracing::info!(tag = %tag_key, from = %last, to = %d, ?platforms, bytes = out.bytes, "watched tag moved upstream; fetched the new content");
                let mut w = entry.lock();
                w.digest = d.clone();
                // The new index's entries for the same platforms count as pulled.
                if let Ok(Some(bytes)) = self.store.manifest_bytes(&d) {
                    for e in index_entries(&bytes) {
                        let (Some(p), Ok(cd)) = (Platform::of(&e), Digest::parse(&e.digest)) else { continue };
                        let (_, tags) = self.watch.children.get_with(format!("{name}/{repo}@{cd}"), || (p, Arc::default()));
                        let mut tags = tags.lock();
                        if !tags.iter().any(|t| t == tag_key) {
                            tags.push(tag_key.to_string());
                        }
                    }
                }
            }
            Err(e) => {
                metrics::WATCH_REFRESHES.with_label_values(&[name, "failed"]).inc();
                tracing::warn!(tag = %tag_key, to = %d, error = %e.message, "fetching the new content of a watched tag failed; the next check retries");
            }
        }
    }

    /// The tags of `repo` matching `pattern`: from the upstream's `tags/list` (every page), or
    /// during an outage the tags berth has cached.
    async fn matching_tags(&self, upstream: &Upstream, repo: &RepoName, pattern: &glob::Pattern) -> Result<(Vec<String>, bool), OciError> {
        let client = self.client(upstream);
        let mut tags = Vec::new();
        let mut path = format!("/v2/{repo}/tags/list");
        for _ in 0..MAX_TAG_PAGES {
            let r = match client.send(Method::GET, repo.as_str(), &path, None).await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) if r.status().as_u16() == 404 => return Ok((Vec::new(), false)),
                Ok(r) => {
                    return self.cached_matching(
                        upstream,
                        repo,
                        pattern,
                        crate::upstream::UpstreamError::from_answer(r.status().as_u16(), r.headers(), String::new()),
                    )
                }
                Err(e) => return self.cached_matching(upstream, repo, pattern, e),
            };
            let links: Vec<String> =
                r.headers().get_all(reqwest::header::LINK).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect();
            let body = client.read_body(r, crate::upstream::MAX_LIST_BYTES, "tags list").await.map_err(|e| e.to_oci(&upstream.name))?;
            #[derive(serde::Deserialize)]
            struct List {
                #[serde(default)]
                tags: Option<Vec<String>>,
            }
            let list: List = serde_json::from_slice(&body).map_err(|e| {
                OciError::msg(
                    crate::oci::ErrorCode::UpstreamUnavailable,
                    format!("upstream {} sent a tags list that is not JSON: {e}", upstream.name),
                )
            })?;
            tags.extend(list.tags.unwrap_or_default().into_iter().filter(|t| pattern.matches(t)));
            // Only the page's position is taken from the link: its path names the repository as
            // the upstream's URL prefix has it, which `send` adds again.
            let next = super::mirror::next_link(links.iter().map(String::as_str))
                .and_then(|t| url::Url::parse("http://upstream/").ok()?.join(&t).ok())
                .map(|u| {
                    let mut q = url::form_urlencoded::Serializer::new(String::new());
                    q.extend_pairs(u.query_pairs().filter(|(k, _)| k == "n" || k == "last"));
                    q.finish()
                });
            match next {
                Some(q) if !q.is_empty() => path = format!("/v2/{repo}/tags/list?{q}"),
                _ => break,
            }
        }
        tags.sort();
        tags.dedup();
        Ok((tags, false))
    }

    fn cached_matching(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        pattern: &glob::Pattern,
        e: crate::upstream::UpstreamError,
    ) -> Result<(Vec<String>, bool), OciError> {
        if !e.is_outage() {
            return Err(e.to_oci(&upstream.name));
        }
        let key = format!("{}/{}", upstream.name, repo);
        let mut tags = Vec::new();
        let mut after: Option<String> = None;
        while let Some((page, more)) = self.store.tags(&key, after.as_deref(), 1000)? {
            after = page.last().cloned();
            tags.extend(page.into_iter().filter(|t| pattern.matches(t)));
            if !more || after.is_none() {
                break;
            }
        }
        if tags.is_empty() {
            return Err(e.to_oci(&upstream.name));
        }
        Ok((tags, true))
    }

    /// One prefetch run over an upstream's references. Returns whether every image was
    /// fetched.
    async fn prefetch_once(&self, upstream: &Upstream, pins: &mut Pins) -> bool {
        let name = upstream.name.as_str();
        let client = self.client(upstream);
        let platforms = match upstream.warm.platforms.as_slice() {
            [] => Platforms::All,
            ps => Platforms::Covered(ps.to_vec()),
        };
        let count = |result: &str| metrics::PREFETCH_IMAGES.with_label_values(&[name, result]).inc();
        let mut complete = true;
        for p in &upstream.warm.prefetch {
            let (tags, listed_stale) = match p.exact_tag() {
                Some(t) => (vec![t.to_string()], false),
                None => match self.matching_tags(upstream, &p.repo, &p.tag).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(upstream = name, repository = %p.repo, pattern = p.tag.as_str(), error = %e.message, "prefetch: listing tags failed");
                        count("failed");
                        complete = false;
                        continue;
                    }
                },
            };
            complete &= !listed_stale;
            for tag in tags {
                if client.budget.thrifty() {
                    tracing::info!(upstream = name, remaining = ?client.budget.remaining(), "prefetch paused: the pull budget is at its reserve");
                    count("paused");
                    complete = false;
                    continue;
                }
                let started = Instant::now();
                let mut out = Warmed::default();
                let result = match self.resolve(upstream, &p.repo, &tag).await {
                    Ok((d, stale)) => {
                        out.stale = stale;
                        self.warm_manifest(upstream, &p.repo, &d, &platforms, &mut Some(&mut *pins), &mut out).await
                    }
                    Err(e) => Err(e),
                };
                metrics::PREFETCH_BYTES.with_label_values(&[name]).inc_by(out.bytes);
                match result {
                    Ok(()) if !out.stale => {
                        count("ok");
                        tracing::info!(upstream = name, image = %format!("{}:{tag}", p.repo), bytes = out.bytes, digests = out.digests.len(), took = ?started.elapsed(), "prefetched");
                    }
                    Ok(()) => {
                        count("failed");
                        complete = false;
                        tracing::warn!(upstream = name, image = %format!("{}:{tag}", p.repo), "prefetch: upstream failing; kept the cached copy");
                    }
                    Err(e) => {
                        count("failed");
                        complete = false;
                        tracing::warn!(upstream = name, image = %format!("{}:{tag}", p.repo), error = %e.message, "prefetch failed; retrying later");
                    }
                }
            }
        }
        pins.finish(complete);
        if complete {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            metrics::PREFETCH_LAST_RUN.with_label_values(&[name]).set(now as i64);
        }
        complete
    }

    fn follows_lease(&self) -> bool {
        self.cluster.get().is_none_or(|c| c.is_leader())
    }
}

/// Waits `d`, or until shutdown; false on shutdown.
async fn pause(d: Duration, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        r = shutdown.changed() => r.is_ok() && !*shutdown.borrow(),
    }
}

/// Prefetches one upstream's references at start and every `tag_ttl`; a failed run is retried
/// with exponential backoff. In a cluster only the lease holder prefetches.
async fn prefetch_loop(mirror: Arc<Mirror>, upstream: Arc<Upstream>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut pins = Pins {
        store: mirror.store.clone(),
        owner: upstream.name.clone(),
        on: upstream.warm.pin,
        kept: HashSet::new(),
        found: HashSet::new(),
    };
    let max_retry = upstream.tag_ttl.clamp(FIRST_RETRY, MAX_RETRY);
    let mut retry = FIRST_RETRY;
    loop {
        if !mirror.follows_lease() {
            if !pause(Duration::from_secs(1), &mut shutdown).await {
                return;
            }
            continue;
        }
        let wait = if mirror.prefetch_once(&upstream, &mut pins).await {
            retry = FIRST_RETRY;
            upstream.tag_ttl
        } else {
            let w = retry;
            retry = (retry * 2).min(max_retry);
            w
        };
        if !pause(wait, &mut shutdown).await {
            return;
        }
    }
}

/// Checks watched tags as they come due.
async fn watch_loop(mirror: Arc<Mirror>, tick: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        if !pause(tick, &mut shutdown).await {
            return;
        }
        let due = mirror.watch.due();
        let m = &mirror;
        futures::stream::iter(due).for_each_concurrent(CONCURRENT_CHECKS, |(k, e)| async move { m.check_watched(&k, &e).await }).await;
        mirror.watch.tags.run_pending_tasks();
        metrics::WATCHED_TAGS.set(mirror.watch.tags.entry_count() as i64);
    }
}

/// Starts prefetching and watching for every upstream that has them, in tasks of their own
/// on the caller's runtime. Returns at once.
pub fn start(mirror: &Arc<Mirror>, shutdown: tokio::sync::watch::Receiver<bool>) {
    for u in mirror.upstreams() {
        if !u.warm.prefetch.is_empty() && !u.offline {
            tokio::spawn(prefetch_loop(mirror.clone(), u.clone(), shutdown.clone()));
        }
    }
    // Often enough that a check is never late by more than half the shortest TTL.
    let ttls = mirror.upstreams().iter().filter(|u| !u.warm.watch_window.is_zero() && !u.offline).map(|u| u.tag_ttl).min();
    if let Some(ttl) = ttls {
        let tick = (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(watch_loop(mirror.clone(), tick, shutdown));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_cover_entries() {
        let p = Platform::parse("linux/arm64").unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(v7.variant.as_deref(), Some("v7"));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        let entry = |v: serde_json::Value| Descriptor {
            media_type: None,
            digest: "sha256:00".into(),
            size: 0,
            artifact_type: None,
            annotations: None,
            urls: None,
            platform: Some(v),
        };
        let arm_v7 = Platform::of(&entry(serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"}))).unwrap();
        assert!(Platform::parse("linux/arm").unwrap().covers(&arm_v7));
        assert!(v7.covers(&arm_v7));
        assert!(!Platform::parse("linux/arm/v6").unwrap().covers(&arm_v7));
        let chosen = Platforms::Covered(vec![p.clone()]);
        assert!(!chosen.wants(Some(&arm_v7)) && chosen.wants(Some(&p)) && !chosen.wants(None));
        assert!(Platforms::All.wants(None));
        assert!(Platforms::Exactly([arm_v7.clone()].into()).wants(Some(&arm_v7)));
        assert!(!Platforms::Exactly([v7.clone()].into()).wants(Some(&Platform::parse("linux/arm/v8").unwrap())));
    }
}
