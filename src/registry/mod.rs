//! Policy: which repository is hosted and which is mirrored, and what each request does.
//! Plain async Rust over the store and the upstream client; the pingora layer only adapts
//! sessions to [`Request`]/[`Response`]. Must not import pingora.

mod access;
mod hosted;
mod listing;
pub mod mirror;
pub mod pulls;
mod response;
mod serve;
mod store_error;
mod token;
pub mod warm;

pub use response::{Body, Response};

use crate::config::{Config, Upstream};
use crate::oci::route::{self, Endpoint};
use crate::oci::{ErrorCode, OciError, Reference, RepoName};
use crate::store::Store;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method};
use std::net::IpAddr;
use std::sync::Arc;

/// The request body, read chunk by chunk as it arrives.
#[async_trait]
pub trait RequestBody: Send {
    async fn chunk(&mut self) -> Result<Option<Bytes>, OciError>;
}

/// A body already in memory (tests, and the in-process callers).
pub struct BytesBody(pub Option<Bytes>);

#[async_trait]
impl RequestBody for BytesBody {
    async fn chunk(&mut self) -> Result<Option<Bytes>, OciError> {
        Ok(self.0.take().filter(|b| !b.is_empty()))
    }
}

pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The peer address: failed logins are throttled per client.
    pub client: Option<IpAddr>,
    /// Arrived over TLS: the token realm announced to this client is https.
    pub tls: bool,
    /// Arrived on the cluster's peer listener, signed by a member: the member already applied
    /// its client's access rules, and the request is served here, never forwarded again.
    pub peer: bool,
}

impl Request<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn param(&self, key: &str) -> Option<String> {
        route::query_param(self.query, key)
    }
}

/// Where a repository lives.
#[derive(Debug, Clone)]
pub enum Target {
    Hosted(RepoName),
    Mirror { upstream: Arc<Upstream>, repo: RepoName },
}

impl Target {
    /// The repository's name in the store (a mirrored one under its upstream's name).
    pub fn stored_name(&self) -> String {
        match self {
            Target::Hosted(r) => r.to_string(),
            Target::Mirror { upstream, repo } => format!("{}/{}", upstream.name, repo),
        }
    }
}

/// Why a GC an operator asked for did not run.
#[derive(Debug)]
pub enum GcRefused {
    /// Another cluster member holds the maintenance lease.
    LeaseHeld(crate::cluster::LeaseHeld),
    Failed(crate::store::StoreError),
}

pub struct Registry {
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub mirror: Arc<mirror::Mirror>,
    /// `None`: no `[auth]`, everything is open.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Set once at start with `[cluster]`.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The web UI's logged-in browsers.
    pub ui: crate::ui::Sessions,
    /// Last pulls, for the web UI.
    pub pulls: pulls::Pulls,
    /// `[[replication]]`: pushes copied to other registries.
    pub replicator: Arc<crate::replicate::Replicator>,
    /// Events: the webhooks' outbox and the audit log.
    pub events: Arc<crate::events::Events>,
}

/// What the access log and metrics need to know about a handled request.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub route: &'static str,
    pub repository: Option<String>,
    pub upstream: Option<String>,
    pub cache: Option<&'static str>,
    /// The authenticated user, for the access log.
    pub user: Option<String>,
}

impl Registry {
    /// Fails only when access control cannot be set up (the token signing key) or the store
    /// cannot take the configured grouping.
    pub fn new(config: Arc<Config>, store: Arc<Store>) -> Result<Arc<Registry>, String> {
        let mirror = mirror::Mirror::new(&config, store.clone());
        let replicator = Arc::new(crate::replicate::Replicator::new(store.clone(), &config.replication));
        let events = crate::events::Events::new(&config, store.clone(), replicator.clone());
        mirror.set_events(events.clone());
        let classes = crate::store::Classes {
            cache_roots: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            namespaces: config.namespaces.iter().map(|n| n.prefix.clone()).collect(),
        };
        store.set_classes(classes).map_err(|e| format!("store: {e}"))?;
        store.set_cache_limit(config.storage.max_cache_bytes).map_err(|e| format!("store: {e}"))?;
        let auth = match &config.auth {
            Some(a) => Some(Arc::new(crate::auth::Auth::new(a, &**store.blobs())?)),
            None => None,
        };
        Ok(Arc::new(Registry {
            replicator,
            store,
            config,
            mirror,
            auth,
            cluster: std::sync::OnceLock::new(),
            ui: Default::default(),
            pulls: Default::default(),
            events,
        }))
    }

    /// Joins the registry (and its mirror) to a cluster; once, at start.
    pub fn join(&self, cluster: Arc<crate::cluster::Cluster>) {
        self.mirror.join(cluster.clone());
        self.events.join(cluster.clone());
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// The lifecycle policy of a hosted repository; None for mirrored ones.
    pub fn policy_of(&self, repo: &str) -> Option<crate::store::policy::Policy> {
        policy_for(&self.config, &self.store, repo)
    }

    /// Which tags of `repo` are immutable, for the store to check inside its write.
    pub fn immutable_of(&self, repo: &str) -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
        let policy = self.policy_of(repo).unwrap_or_default();
        if policy.immutable_tags.is_empty() {
            return Arc::new(|_: &str| false);
        }
        Arc::new(move |t: &str| policy.is_immutable(t))
    }

    /// The quota of the namespace holding `repo`, checked by the store inside its write.
    pub fn quota_of(&self, repo: &str) -> Option<u64> {
        let group = self.store.group_of(repo);
        self.config.namespaces.iter().find(|n| n.prefix == group).and_then(|n| n.policy.quota_bytes)
    }

    /// Refuses, before anything is stored, content that would take the namespace over its
    /// quota; the store checks again when it links the content.
    pub fn check_quota(&self, repo: &str, d: &crate::oci::Digest, size: u64) -> Result<(), OciError> {
        match self.quota_room(repo)? {
            Some((room, e)) if size > room && !self.store.blob_linked(repo, d)? => Err(e),
            _ => Ok(()),
        }
    }

    /// How many more bytes the namespace holding `repo` may take, with the error to answer
    /// past that; None without a quota.
    pub fn quota_room(&self, repo: &str) -> Result<Option<(u64, OciError)>, OciError> {
        let Some(quota) = self.quota_of(repo) else { return Ok(None) };
        let group = self.store.group_of(repo);
        let used = self.store.group_bytes(&group)?;
        let e =
            OciError::msg(ErrorCode::Denied, format!("namespace {group} is at its {quota}-byte quota ({used} used); delete content first"))
                .detail(serde_json::json!({"namespace": group, "quota": quota, "used": used}));
        Ok(Some((quota.saturating_sub(used), e)))
    }

    /// Runs retention and garbage collection over the whole store.
    pub async fn gc(&self, dry_run: bool) -> Result<crate::store::gc::GcReport, crate::store::StoreError> {
        let (config, store) = (self.config.clone(), self.store.clone());
        let policy_of: crate::store::gc::PolicyOf = Arc::new(move |repo: &str| policy_for(&config, &store, repo));
        let report = self.store.gc(policy_of, self.config.storage.gc_grace, dry_run).await?;
        if !dry_run {
            let data = serde_json::json!({
                "tagsRemoved": report.tags_removed.len(),
                "manifestsRemoved": report.manifests_removed.len(),
                "linksRemoved": report.links_removed,
                "blobsRemoved": report.blobs_removed,
                "bytesFreed": report.bytes_freed,
            });
            let ev = self.events.raw_event("gc.completed", None, data);
            self.events.emit_logged(ev, &crate::events::Actor::default()).await;
        }
        Ok(report)
    }

    /// A GC an operator asked for (`POST /gc` on the admin listener, which `berth gc` calls).
    /// In a cluster it runs under the maintenance lease like the scheduled one, so that one GC
    /// runs at a time for the whole bucket: on a node that does not hold the lease it is
    /// refused, naming the holder.
    pub async fn gc_requested(&self, dry_run: bool) -> Result<crate::store::gc::GcReport, GcRefused> {
        if let Some(c) = self.cluster() {
            let c = c.clone();
            crate::store::blocking(move || Ok(c.hold_lease_for_run())).await.map_err(GcRefused::Failed)?.map_err(GcRefused::LeaseHeld)?;
        }
        self.gc(dry_run).await.map_err(GcRefused::Failed)
    }

    /// Decides where a repository named in a request lives, in the documented order:
    /// `?ns=`, a registry-host first component, a hosted namespace, the default upstream.
    pub fn resolve(&self, name: &str, ns: Option<&str>) -> Result<Target, OciError> {
        let mirror_of = |u: &Arc<Upstream>, repo: &str| -> Result<Target, OciError> {
            let repo = if u.name == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo.to_string() };
            Ok(Target::Mirror { upstream: u.clone(), repo: RepoName::parse(&repo)? })
        };
        if let Some(ns) = ns {
            let u = self
                .mirror
                .upstream_named(ns)
                .ok_or_else(|| OciError::msg(ErrorCode::NameUnknown, format!("registry {ns:?} is not mirrored by berth")))?;
            return mirror_of(&u, name);
        }
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(u) = self.mirror.upstream_named(first) {
                return mirror_of(&u, rest);
            }
        }
        let repo = RepoName::parse(name)?;
        if self.config.namespaces.iter().any(|n| n.matches(repo.as_str())) {
            return Ok(Target::Hosted(repo));
        }
        if let Some(u) = self.mirror.default_upstream() {
            return mirror_of(&u, name);
        }
        Err(OciError::msg(ErrorCode::NameUnknown, format!("repository {name:?} is not in any hosted namespace and no upstream mirrors it")))
    }

    /// Handles one request. Every registry failure becomes an OCI error response; the web UI's
    /// paths (with `[ui]` on) answer with pages, their failures included.
    pub async fn handle(&self, req: &Request<'_>, body: &mut dyn RequestBody, outcome: &mut Outcome) -> Response {
        if self.config.ui_enabled && !req.peer && crate::ui::is_ui_path(req.path) {
            return crate::ui::handle(self, req, body, outcome).await;
        }
        match self.dispatch(req, body, outcome).await {
            Ok(r) => r,
            Err(e) => Response::error(&e),
        }
    }

    async fn dispatch(&self, req: &Request<'_>, body: &mut dyn RequestBody, outcome: &mut Outcome) -> Result<Response, OciError> {
        if req.path == access::TOKEN_PATH {
            return token::handle(self, req, body, outcome).await;
        }
        if req.peer && req.path == crate::cluster::JOURNAL_PATH {
            return self.peer_wrote(req).await;
        }
        let Some(ep) = route::parse_for(req.method, req.path)? else {
            return Err(OciError::msg(ErrorCode::NameUnknown, format!("no such endpoint {}", req.path)));
        };
        outcome.route = ep.label();
        let caller = match self.caller(req, outcome).await {
            _ if req.peer => None,
            Ok(c) => c,
            Err(refused) => return Ok(refused),
        };
        let m = req.method;
        match &ep {
            Endpoint::Base => {
                if let Err(refused) = self.base(req, caller.as_ref()) {
                    return Ok(refused);
                }
                return match *m {
                    Method::GET | Method::HEAD => Ok(Response::new(200).json(b"{}".as_slice().into())),
                    _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
                };
            }
            Endpoint::Catalog => {
                return match *m {
                    Method::GET | Method::HEAD => self.catalog(req, caller.as_ref()),
                    _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
                }
            }
            _ => {}
        }
        let name = ep.name().expect("named endpoint");
        let ns = req.param("ns");
        let target = self.resolve(name, ns.as_deref())?;
        let mount_query;
        let mut req = req;
        let unmounted;
        if let Some(caller) = &caller {
            let action = access::action_for(&ep, m);
            // A write to a mirror is refused below with a clearer 403 than any challenge.
            let read_only = matches!(target, Target::Mirror { .. }) && action == crate::auth::Action::Push;
            if !read_only {
                if let Err(refused) = self.authorize(req, caller, &target, &access::scope_name(name, ns.as_deref()), action) {
                    return Ok(refused);
                }
            }
        }
        if let (Endpoint::UploadStart { .. }, Target::Hosted(repo)) = (&ep, &target) {
            if let Some(q) = self.mount_query(req, caller.as_ref(), repo.as_str())? {
                mount_query = q;
                unmounted = Request { query: Some(&mount_query), ..*req };
                req = &unmounted;
            }
        }
        let pulled = match (&ep, m) {
            (Endpoint::Manifest { reference, .. }, &Method::GET) => Some(match reference {
                Reference::Tag(t) => Some(t.to_string()),
                Reference::Digest(_) => None,
            }),
            _ => None,
        };
        let stored = target.stored_name();
        let r = self.dispatch_to(req, &ep, target, body, outcome).await;
        if let (Some(tag), Ok(resp)) = (pulled, &r) {
            if resp.status == 200 {
                self.pulls.record(&stored, tag.as_deref(), crate::store::now_ms());
            }
        }
        r
    }

    async fn dispatch_to(
        &self,
        req: &Request<'_>,
        ep: &Endpoint,
        target: Target,
        body: &mut dyn RequestBody,
        outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        let m = req.method;
        match target {
            Target::Hosted(repo) => {
                outcome.repository = Some(repo.to_string());
                let actor = crate::events::Actor { user: outcome.user.clone(), client: req.client };
                let r = hosted::handle(self, req, ep, &repo, body, &actor).await;
                if let Err(e) = &r {
                    if e.code == ErrorCode::Denied && e.detail.as_ref().is_some_and(|d| d.get("quota").is_some()) {
                        let about = crate::events::About { repository: repo.as_str(), ..Default::default() };
                        let mut ev = self.events.event("quota.refused", &about, &actor);
                        if let (Some(data), Some(detail)) = (ev.data.as_object_mut(), &e.detail) {
                            data.insert("reason".into(), e.message.clone().into());
                            data.insert("quota".into(), detail.clone());
                        }
                        self.events.emit_logged(ev, &actor).await;
                    }
                }
                r
            }
            Target::Mirror { upstream, repo } => {
                outcome.repository = Some(format!("{}/{}", upstream.name, repo));
                outcome.upstream = Some(upstream.name.clone());
                if !matches!(*m, Method::GET | Method::HEAD) {
                    return Err(OciError::msg(
                        ErrorCode::Denied,
                        format!("{}/{} is a read-only mirror of {}; push to a hosted namespace", upstream.name, repo, upstream.url),
                    ));
                }
                self.mirror.handle(req, ep, &upstream, &repo, outcome).await
            }
        }
    }
}

impl Registry {
    /// A peer wrote journal entry `seq` and waits to answer its client until this node has
    /// applied it.
    async fn peer_wrote(&self, req: &Request<'_>) -> Result<Response, OciError> {
        if *req.method != Method::POST {
            return Err(OciError::new(ErrorCode::MethodNotAllowed));
        }
        let seq: u64 =
            req.param("seq").and_then(|s| s.parse().ok()).ok_or_else(|| OciError::msg(ErrorCode::Unsupported, "seq is required"))?;
        let Some(journal) = self.store.journal().cloned() else {
            return Err(OciError::msg(ErrorCode::Unsupported, "this node has no metadata journal"));
        };
        let caught_up = crate::store::blocking(move || journal.catch_up_to(seq)).await?;
        if !caught_up {
            return Err(OciError::msg(ErrorCode::StorageUnavailable, format!("journal entry {seq} is not readable yet")));
        }
        Ok(Response::new(204))
    }
}

fn policy_for(config: &Config, store: &Store, repo: &str) -> Option<crate::store::policy::Policy> {
    if store.is_cache_repo(repo) {
        return None;
    }
    Some(config.namespaces.iter().find(|n| n.matches(repo)).map(|n| n.policy.clone()).unwrap_or_default())
}
