//! Configuration: the TOML file shape (unknown keys are errors naming the key) kept apart from
//! the validated runtime type the rest of berth uses.

use crate::auth::{AuthConfig, Principal, Rules};
use crate::oci::RepoName;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration `berth serve` runs with when given no file: a Docker Hub mirror plus the
/// other big public registries.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/embedded.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

// ---- file shape ----

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    storage: StorageFile,
    #[serde(default)]
    log: LogFile,
    #[serde(default)]
    namespace: Vec<NamespaceFile>,
    #[serde(default)]
    upstream: Vec<UpstreamFile>,
    auth: Option<AuthFile>,
    cluster: Option<ClusterFile>,
    #[serde(default)]
    ui: UiFile,
    #[serde(default)]
    replication: Vec<ReplicationFile>,
    #[serde(default)]
    webhook: Vec<WebhookFile>,
    #[serde(default)]
    events: EventsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicationFile {
    namespace: String,
    target: String,
    prefix: Option<String>,
    tags: Option<Vec<String>>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default)]
    delete: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    url: String,
    events: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    secret_file: PathBuf,
    #[serde(default = "default_webhook_max_age", with = "humantime_serde")]
    max_age: Duration,
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    timeout: Duration,
}

fn default_webhook_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EventsFile {
    audit_file: Option<PathBuf>,
    audit_max_size: bytesize::ByteSize,
    audit_keep: usize,
}

impl Default for EventsFile {
    fn default() -> Self {
        EventsFile { audit_file: None, audit_max_size: bytesize::ByteSize::mib(100), audit_keep: 5 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UiFile {
    enabled: bool,
}

impl Default for UiFile {
    fn default() -> Self {
        UiFile { enabled: true }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    advertise: String,
    listen: String,
    secret_file: PathBuf,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    heartbeat: Duration,
    #[serde(default = "default_member_timeout", with = "humantime_serde")]
    member_timeout: Duration,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}

fn default_member_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerFile {
    listen: Option<String>,
    admin_listen: Option<String>,
    #[serde(with = "humantime_serde")]
    grace_period: Duration,
    threads: Option<usize>,
    tls_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    write_timeout: Duration,
    min_send_rate: bytesize::ByteSize,
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    head_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_head_bytes: bytesize::ByteSize,
    max_connections: usize,
    max_connections_per_address: usize,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: Some("127.0.0.1:5000".into()),
            admin_listen: Some("127.0.0.1:9100".into()),
            grace_period: Duration::from_secs(10),
            threads: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            write_timeout: Duration::from_secs(30),
            min_send_rate: bytesize::ByteSize::kib(8),
            body_read_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_head_bytes: bytesize::ByteSize::kib(64),
            max_connections: 4096,
            max_connections_per_address: 256,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StorageFile {
    root: PathBuf,
    max_cache_bytes: Option<bytesize::ByteSize>,
    #[serde(with = "humantime_serde")]
    upload_ttl: Duration,
    #[serde(with = "humantime_serde")]
    gc_interval: Duration,
    #[serde(with = "humantime_serde")]
    gc_grace: Duration,
    upload_sessions_per_client: usize,
    upload_sessions_per_repository: usize,
    hot_tier_bytes: Option<bytesize::ByteSize>,
    s3: Option<S3File>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3File {
    bucket: String,
    endpoint: Option<String>,
    #[serde(default = "default_region")]
    region: String,
    #[serde(default)]
    prefix: String,
    access_key_id: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    #[serde(default = "default_snapshot_every")]
    snapshot_every: u64,
}

fn default_snapshot_every() -> u64 {
    10_000
}

fn default_region() -> String {
    "us-east-1".to_string()
}

impl Default for StorageFile {
    fn default() -> Self {
        StorageFile {
            root: PathBuf::from("./berth-data"),
            max_cache_bytes: None,
            upload_ttl: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
            upload_sessions_per_client: 128,
            upload_sessions_per_repository: 512,
            hot_tier_bytes: None,
            s3: None,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct LogFile {
    format: LogFormat,
    level: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    prefix: String,
    keep_tags: Option<usize>,
    #[serde(default)]
    keep_patterns: Vec<String>,
    #[serde(default)]
    immutable_tags: Vec<String>,
    quota_bytes: Option<bytesize::ByteSize>,
    pull: Option<Vec<String>>,
    push: Option<Vec<String>>,
    #[serde(default)]
    sparse_indexes: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    htpasswd: PathBuf,
    token_key: Option<PathBuf>,
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    token_ttl: Duration,
    #[serde(default = "default_service")]
    service: String,
    realm: Option<String>,
    #[serde(default = "default_max_failures")]
    max_failures: u32,
    #[serde(default = "default_failure_window", with = "humantime_serde")]
    failure_window: Duration,
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_service() -> String {
    "berth".into()
}
fn default_max_failures() -> u32 {
    10
}
fn default_failure_window() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    name: String,
    url: Option<String>,
    urls: Option<Vec<UrlFile>>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    default: bool,
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    tag_ttl: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    username: Option<String>,
    password_file: Option<PathBuf>,
    pull: Option<Vec<String>>,
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    stale_after: Duration,
    #[serde(default)]
    ratelimit_reserve: Option<Reserve>,
    #[serde(default)]
    offline: bool,
    #[serde(default)]
    prefetch: Vec<String>,
    #[serde(default)]
    prefetch_platforms: Vec<String>,
    #[serde(default)]
    pin: bool,
    #[serde(default = "default_watch_window", with = "humantime_serde")]
    watch_window: Duration,
}

fn default_watch_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// One of `urls`: a plain URL (sent the upstream's own `username`/`password_file`, if any), or a
/// table with credentials of its own.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum UrlFile {
    Plain(String),
    WithCredentials(UrlTableFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlTableFile {
    url: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

/// `ratelimit_reserve`: a fraction (`0.1`) or a percentage (`"10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Reserve {
    Fraction(f64),
    Percent(String),
}

fn default_stale_after() -> Duration {
    Duration::from_secs(2)
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

// ---- runtime type ----

/// A secret read from a file: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub tls: Option<TlsListener>,
    pub grace_period: Duration,
    pub threads: usize,
    pub clients: ClientLimits,
    pub storage_root: PathBuf,
    pub storage: StorageLimits,
    /// `[storage.s3]`: the bucket is the truth and `storage_root` holds the hot tier and the
    /// local metadata index.
    pub s3: Option<crate::store::s3::S3Settings>,
    /// Bound on the hot tier's local copies of bucket objects.
    pub hot_tier_bytes: u64,
    pub log_format: LogFormat,
    pub log_level: String,
    pub namespaces: Vec<Namespace>,
    pub upstreams: Vec<Upstream>,
    /// `None`: no access control, as registry:2 without auth.
    pub auth: Option<AuthConfig>,
    /// `[cluster]`: several nodes on one bucket.
    pub cluster: Option<ClusterConfig>,
    /// `[ui] enabled`: the web pages under `/ui/` on the registry listener.
    pub ui_enabled: bool,
    /// `[[webhook]]`: where events are delivered.
    pub webhooks: Vec<Webhook>,
    /// `[events]`: the audit log.
    pub events: EventsConfig,
    /// `[[replication]]` rules, in file order (`berth replicate --rule N` counts from 0).
    pub replication: Vec<Replication>,
}

/// `[[replication]]`, validated: pushes to `namespace` are copied to another registry.
#[derive(Debug, Clone)]
pub struct Replication {
    pub namespace: String,
    /// The target registry's base URL (its `/v2/` is below it).
    pub target: url::Url,
    /// The repository name at the target of the namespace itself (`team/app` becomes
    /// `<prefix>/app`); the namespace's own name when not set.
    pub prefix: String,
    /// Tag patterns (`*` and `?` globs); empty: every tag.
    pub tags: Vec<glob::Pattern>,
    pub credentials: Option<(String, Secret)>,
    /// Tag and manifest deletes are propagated too.
    pub delete: bool,
}

impl Replication {
    /// Whether `repo:tag` is replicated by this rule.
    pub fn matches(&self, repo: &str, tag: &str) -> bool {
        self.covers(repo) && (self.tags.is_empty() || self.tags.iter().any(|p| p.matches(tag)))
    }

    /// Whether `repo` is in this rule's namespace.
    pub fn covers(&self, repo: &str) -> bool {
        repo == self.namespace || repo.strip_prefix(&self.namespace).is_some_and(|r| r.starts_with('/'))
    }

    /// `repo`'s name at the target.
    pub fn target_name(&self, repo: &str) -> String {
        format!("{}{}", self.prefix, &repo[self.namespace.len()..])
    }
}

/// `[[webhook]]`, validated.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: url::Url,
    /// Event names without `dev.berth.` (`manifest.pushed`); None: every event.
    pub events: Option<Vec<String>>,
    /// Repository prefixes; None: every repository.
    pub namespaces: Option<Vec<String>>,
    /// Signs each delivery (HMAC-SHA256 of the body).
    pub secret: Secret,
    /// An event not delivered within this long goes to the dead letters.
    pub max_age: Duration,
    /// One delivery attempt's bound.
    pub timeout: Duration,
}

/// `[events]`, validated.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// One JSON line per event; None: no audit log.
    pub audit_file: Option<PathBuf>,
    /// The audit file is rotated when it would grow past this.
    pub audit_max_size: u64,
    /// Rotated audit files kept (`<file>.1` is the newest).
    pub audit_keep: usize,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How the other nodes reach this one's peer listener.
    pub advertise: url::Url,
    pub listen: SocketAddr,
    pub secret: Secret,
    pub heartbeat: Duration,
    /// A member whose heartbeat is older than this has left.
    pub member_timeout: Duration,
}

/// The HTTPS listener (h2 and http/1.1). The identity was read and checked at load.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: crate::tls::Identity,
}

/// How long a client may keep a request waiting on it: a stalled or trickling client must not
/// hold a connection (and what it pins) indefinitely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// A response write the client accepts nothing of for this long ends the connection.
    pub write_timeout: Duration,
    /// Response bodies slower than this many bytes per second end the connection; `None`: no
    /// floor (only `write_timeout`).
    pub min_send_rate: Option<u64>,
    /// A request body that sends nothing for this long ends the request.
    pub body_read_timeout: Duration,
    /// A request head must arrive whole within this, from its first byte.
    pub head_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Larger request heads are answered 431.
    pub max_head_bytes: usize,
    /// Open connections berth accepts, in all and from one address; more are answered 503.
    pub max_connections: usize,
    pub max_connections_per_address: usize,
}

/// Lifecycle settings of the store.
#[derive(Debug, Clone)]
pub struct StorageLimits {
    /// Bound on mirrored content; hosted content never counts against it.
    pub max_cache_bytes: Option<u64>,
    pub upload_ttl: Duration,
    pub gc_interval: Duration,
    /// Unreferenced hosted blobs younger than this survive GC: a push in progress has
    /// uploaded its layers but not yet its manifest.
    pub gc_grace: Duration,
    /// Open upload sessions one client address, and one repository, may hold.
    pub upload_sessions_per_client: usize,
    pub upload_sessions_per_repository: usize,
}

impl Config {
    /// The store's share of the configuration.
    pub fn store_limits(&self) -> crate::store::Limits {
        crate::store::Limits {
            uploads_per_client: self.storage.upload_sessions_per_client,
            uploads_per_repository: self.storage.upload_sessions_per_repository,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub prefix: String,
    pub policy: crate::store::policy::Policy,
}

impl Namespace {
    pub fn matches(&self, repo: &str) -> bool {
        repo == self.prefix || repo.strip_prefix(&self.prefix).is_some_and(|r| r.starts_with('/'))
    }
}

/// One place an upstream is fetched from, with the credentials berth answers its challenges
/// with there.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub url: url::Url,
    pub credentials: Option<(String, Secret)>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// The first of `urls`: the address messages and the UI name the upstream by.
    pub url: url::Url,
    /// Tried in order: a request that finds one unreachable, timing out, failing with a 5xx or
    /// a 429, or with its circuit open, goes to the next.
    pub urls: Vec<UpstreamUrl>,
    pub aliases: Vec<String>,
    pub default: bool,
    pub tag_ttl: Duration,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// A tag past its TTL whose check takes longer than this is served from the cache while
    /// the check goes on.
    pub stale_after: Duration,
    /// Below this share of the rate limit, pulls are spent only on content without a cached
    /// answer.
    pub ratelimit_reserve: f64,
    /// Never contacted: what berth has cached is served as it is (an air-gapped site).
    pub offline: bool,
    /// What is kept warm: `prefetch`, `prefetch_platforms`, `pin`, `watch_window`.
    pub warm: Warm,
}

/// Event names as `[[webhook]] events` takes them: the CloudEvents type without `dev.berth.`.
/// Kept here, not in `events`, because `events` reads its webhooks from this module.
pub const EVENT_KINDS: &[&str] = &["manifest.pushed", "tag.deleted", "manifest.deleted", "mirror.filled", "quota.refused", "gc.completed"];

/// An upstream's `prefetch`, `prefetch_platforms`, `pin` and `watch_window`, validated.
#[derive(Debug, Clone)]
pub struct Warm {
    /// Repositories and tag patterns fetched at start and every `tag_ttl`.
    pub prefetch: Vec<PrefetchRef>,
    /// The platforms of an index that are prefetched; empty: all of them.
    pub platforms: Vec<crate::oci::manifest::Platform>,
    /// Prefetched content is never evicted.
    pub pin: bool,
    /// Tags pulled within this are checked at their TTL and, when moved, fetched again for the
    /// platforms pulled before. Zero: no watching.
    pub watch_window: Duration,
}

impl Default for Warm {
    fn default() -> Self {
        Warm { prefetch: Vec::new(), platforms: Vec::new(), pin: false, watch_window: default_watch_window() }
    }
}

/// One `prefetch` entry: a repository and a tag or a glob over its tags (`3.*`).
#[derive(Debug, Clone)]
pub struct PrefetchRef {
    pub repo: RepoName,
    pub tag: glob::Pattern,
}

impl PrefetchRef {
    /// `repo:tag`, where the tag may be a glob (`*`, `?`, `[...]`).
    pub fn parse(s: &str) -> Result<PrefetchRef, String> {
        let (repo, tag) = match s.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => return Err(format!("{s:?}: name a tag or a tag pattern, as in \"library/nginx:1.27\" or \"library/alpine:3.*\"")),
        };
        let repo = RepoName::parse(repo).map_err(|e| format!("{s:?}: {}", e.message))?;
        if tag.is_empty() || tag.len() > 128 {
            return Err(format!("{s:?}: the tag is empty or longer than 128 characters"));
        }
        let pattern = glob::Pattern::new(tag).map_err(|e| format!("{s:?}: {e}"))?;
        let r = PrefetchRef { repo, tag: pattern };
        if r.exact_tag().is_some() && crate::oci::Tag::parse(tag).is_none() {
            return Err(format!("{s:?}: {tag:?} is neither a tag nor a pattern"));
        }
        Ok(r)
    }

    /// A plain tag, not a pattern: resolved without listing the repository's tags.
    pub fn exact_tag(&self) -> Option<&str> {
        let t = self.tag.as_str();
        (!t.contains(['*', '?', '['])).then_some(t)
    }
}

impl Upstream {
    pub fn answers_to(&self, host: &str) -> bool {
        self.name == host || self.aliases.iter().any(|a| a == host)
    }
}

/// `username` and `password_file` (under `prefix`, e.g. `upstream[0].` or
/// `upstream[0].urls[1].`): both or neither.
fn credentials(user: Option<String>, file: Option<PathBuf>, prefix: &str) -> Result<Option<(String, Secret)>, ConfigError> {
    match (user, file) {
        (Some(user), Some(pf)) => {
            let pw = std::fs::read_to_string(&pf)
                .map_err(|e| invalid(format!("{prefix}password_file"), format!("cannot read {}: {e}", pf.display())))?;
            Ok(Some((user, Secret(pw.trim_end_matches(['\r', '\n']).to_string()))))
        }
        (None, None) => Ok(None),
        _ => Err(invalid(format!("{prefix}username"), "username and password_file go together")),
    }
}

fn auth_config(a: AuthFile, users: crate::auth::Htpasswd, policy: crate::auth::Policy) -> Result<AuthConfig, ConfigError> {
    if let Some(k) = &a.token_key {
        crate::auth::token::TokenKey::load(k).map_err(|e| invalid("auth.token_key", e))?;
    }
    if let Some(r) = &a.realm {
        let u = url::Url::parse(r).map_err(|e| invalid("auth.realm", format!("{r:?}: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(invalid("auth.realm", format!("{r:?} must be an http(s) URL")));
        }
    }
    if a.service.is_empty() || a.service.contains('"') {
        return Err(invalid("auth.service", "must be a non-empty name without quotes"));
    }
    if a.token_ttl < Duration::from_secs(10) {
        return Err(invalid("auth.token_ttl", "must be at least 10s"));
    }
    if a.max_failures == 0 || a.failure_window.is_zero() {
        return Err(invalid("auth.max_failures", "max_failures and failure_window must be positive"));
    }
    Ok(AuthConfig {
        htpasswd: a.htpasswd,
        users: std::sync::Arc::new(users),
        token_key: a.token_key,
        token_ttl: a.token_ttl,
        service: a.service,
        realm: a.realm,
        max_failures: a.max_failures,
        failure_window: a.failure_window,
        policy,
    })
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| invalid(key, format!("{s:?} is not an address like 127.0.0.1:5000")))
}

impl Config {
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "(embedded default)").expect("embedded default config is valid")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let f: File = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_string(), message: e.to_string().trim_end().to_string() })?;
        // An empty address turns a listener off (the plain one, when TLS is on).
        let addr = |key: &str, v: Option<&str>| v.filter(|s| !s.is_empty()).map(|s| parse_addr(key, s)).transpose();
        let listen = addr("server.listen", f.server.listen.as_deref())?;
        let admin_listen = addr("server.admin_listen", f.server.admin_listen.as_deref())?;
        let tls = match (addr("server.tls_listen", f.server.tls_listen.as_deref())?, f.server.tls_cert, f.server.tls_key) {
            (Some(listen), Some(cert), Some(key)) => {
                let identity = crate::tls::load_identity(&cert, &key).map_err(|(file, message)| {
                    let key_name = if Path::new(&file) == cert { "server.tls_cert" } else { "server.tls_key" };
                    invalid(key_name, format!("{file}: {message}"))
                })?;
                Some(TlsListener { listen, cert, key, identity })
            }
            (None, None, None) => None,
            (Some(_), _, _) => return Err(invalid("server.tls_listen", "needs both tls_cert and tls_key")),
            (None, _, _) => return Err(invalid("server.tls_listen", "tls_cert and tls_key need a tls_listen address")),
        };
        if listen.is_none() && tls.is_none() {
            return Err(invalid("server.listen", "a listener is required (listen or tls_listen)"));
        }
        let users = match &f.auth {
            Some(a) => Some(crate::auth::Htpasswd::load(&a.htpasswd).map_err(|e| invalid("auth.htpasswd", e.to_string()))?),
            None => None,
        };
        // A pull/push list without [auth] would look like protection while everything is open.
        let principals = |key: String, list: &Option<Vec<String>>| -> Result<Option<Vec<Principal>>, ConfigError> {
            let Some(list) = list else { return Ok(None) };
            let Some(users) = &users else {
                return Err(invalid(key, "needs an [auth] section: without one every repository is open to everyone"));
            };
            let mut out = Vec::new();
            for name in list {
                let p = Principal::parse(name);
                if let Principal::User(u) = &p {
                    if !users.contains(u) {
                        return Err(invalid(
                            key,
                            format!("user {u:?} is not in the htpasswd file (or use \"anonymous\" or \"authenticated\")"),
                        ));
                    }
                }
                out.push(p);
            }
            Ok(Some(out))
        };
        let mut policy = crate::auth::Policy::default();
        let mut namespaces = Vec::new();
        for (i, n) in f.namespace.iter().enumerate() {
            RepoName::parse(&n.prefix).map_err(|e| invalid(format!("namespace[{i}].prefix"), e.message))?;
            let pull = principals(format!("namespace[{i}].pull"), &n.pull)?;
            let push = principals(format!("namespace[{i}].push"), &n.push)?;
            let default = Rules::hosted_default();
            policy.add_namespace(&n.prefix, Rules { pull: pull.unwrap_or(default.pull), push: push.unwrap_or(default.push) });
            let policy =
                crate::store::policy::Policy::new(n.keep_tags, &n.keep_patterns, &n.immutable_tags, n.quota_bytes.map(|b| b.as_u64()))
                    .map_err(|e| invalid(format!("namespace[{i}]"), e))?;
            let policy = crate::store::policy::Policy { sparse_indexes: n.sparse_indexes, ..policy };
            namespaces.push(Namespace { prefix: n.prefix.clone(), policy });
        }
        let mut upstreams: Vec<Upstream> = Vec::new();
        for (i, u) in f.upstream.into_iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if u.name.is_empty() || u.name.contains('/') {
                return Err(invalid(key("name"), "must be a registry host name such as docker.io"));
            }
            for other in &upstreams {
                if other.answers_to(&u.name) || u.aliases.iter().any(|a| other.answers_to(a)) {
                    return Err(invalid(key("name"), format!("{} is already served by upstream {}", u.name, other.name)));
                }
            }
            if u.default && upstreams.iter().any(|o| o.default) {
                return Err(invalid(key("default"), "only one upstream can be the default"));
            }
            let pull = principals(key("pull"), &u.pull)?;
            policy.add_upstream(&u.name, pull.unwrap_or_else(|| Rules::mirror_default().pull));
            let shared = credentials(u.username, u.password_file, &key(""))?;
            let single = u.url.is_some();
            let entries = match (u.url, u.urls) {
                (Some(url), None) => vec![UrlFile::Plain(url)],
                (None, Some(urls)) if !urls.is_empty() => urls,
                (Some(_), Some(_)) => return Err(invalid(key("url"), "give url or urls, not both")),
                _ => return Err(invalid(key("urls"), "an upstream needs url (one) or urls (several, tried in order)")),
            };
            let mut urls = Vec::new();
            for (j, e) in entries.into_iter().enumerate() {
                let (raw, creds) = match e {
                    UrlFile::Plain(raw) => (raw, shared.clone()),
                    UrlFile::WithCredentials(t) => {
                        let c = credentials(t.username, t.password_file, &key(&format!("urls[{j}].")))?;
                        (t.url, c)
                    }
                };
                let k = if single { key("url") } else { key(&format!("urls[{j}]")) };
                let url = url::Url::parse(&raw).map_err(|e| invalid(k.clone(), format!("{raw:?}: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(invalid(k, format!("{raw:?} must be an http(s) URL with a host")));
                }
                urls.push(UpstreamUrl { url, credentials: creds });
            }
            let ratelimit_reserve = match &u.ratelimit_reserve {
                None => 0.1,
                Some(Reserve::Fraction(f)) => *f,
                Some(Reserve::Percent(p)) => {
                    p.trim().strip_suffix('%').and_then(|n| n.trim().parse::<f64>().ok()).map(|n| n / 100.0).ok_or_else(|| {
                        invalid(key("ratelimit_reserve"), format!("{p:?}: a fraction such as 0.1 or a percentage such as \"10%\""))
                    })?
                }
            };
            if !(0.0..=1.0).contains(&ratelimit_reserve) {
                return Err(invalid(key("ratelimit_reserve"), "must be between 0 and 100%"));
            }
            let prefetch =
                u.prefetch.iter().map(|p| PrefetchRef::parse(p)).collect::<Result<Vec<_>, _>>().map_err(|e| invalid(key("prefetch"), e))?;
            let platforms = u
                .prefetch_platforms
                .iter()
                .map(|p| crate::oci::manifest::Platform::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(key("prefetch_platforms"), e))?;
            let warm = Warm { prefetch, platforms, pin: u.pin, watch_window: u.watch_window };
            upstreams.push(Upstream {
                name: u.name,
                url: urls[0].url.clone(),
                urls,
                aliases: u.aliases,
                default: u.default,
                tag_ttl: u.tag_ttl,
                connect_timeout: u.connect_timeout,
                timeout: u.timeout,
                stale_after: u.stale_after,
                ratelimit_reserve,
                offline: u.offline,
                warm,
            });
        }
        for n in &namespaces {
            let first = n.prefix.split('/').next().unwrap_or_default();
            if let Some(u) = upstreams.iter().find(|u| u.answers_to(first)) {
                return Err(invalid("namespace.prefix", format!("{} is shadowed by upstream {}", n.prefix, u.name)));
            }
        }
        if f.storage.upload_sessions_per_client == 0 || f.storage.upload_sessions_per_repository == 0 {
            return Err(invalid("storage.upload_sessions_per_client", "upload session caps must be at least 1"));
        }
        let threads = f.server.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        if threads == 0 {
            return Err(invalid("server.threads", "must be at least 1"));
        }
        for (key, d) in [("server.write_timeout", f.server.write_timeout), ("server.body_read_timeout", f.server.body_read_timeout)] {
            if d < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s"));
            }
        }
        let clients = ClientLimits {
            write_timeout: f.server.write_timeout,
            min_send_rate: Some(f.server.min_send_rate.as_u64()).filter(|r| *r > 0),
            body_read_timeout: f.server.body_read_timeout,
            head_timeout: f.server.head_timeout,
            idle_timeout: f.server.idle_timeout,
            max_head_bytes: f.server.max_head_bytes.as_u64() as usize,
            max_connections: f.server.max_connections.max(1),
            max_connections_per_address: f.server.max_connections_per_address.max(1),
        };
        let auth = match (f.auth, users) {
            (Some(a), Some(users)) => Some(auth_config(a, users, policy)?),
            _ => None,
        };
        let s3 = match f.storage.s3 {
            None => None,
            Some(s) => {
                if s.bucket.is_empty() {
                    return Err(invalid("storage.s3.bucket", "must name a bucket"));
                }
                if let Some(ep) = &s.endpoint {
                    let u = url::Url::parse(ep).map_err(|e| invalid("storage.s3.endpoint", format!("{ep:?}: {e}")))?;
                    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                        return Err(invalid("storage.s3.endpoint", format!("{ep:?}: needs http:// or https:// and a host")));
                    }
                }
                let secret = match (&s.access_key_id, &s.secret_access_key_file) {
                    (Some(_), Some(file)) => Some(
                        std::fs::read_to_string(file)
                            .map_err(|e| invalid("storage.s3.secret_access_key_file", format!("{}: {e}", file.display())))?
                            .trim_end_matches(['\r', '\n'])
                            .to_string(),
                    ),
                    (None, None) => None,
                    (Some(_), None) => return Err(invalid("storage.s3.access_key_id", "needs secret_access_key_file")),
                    (None, Some(_)) => return Err(invalid("storage.s3.secret_access_key_file", "needs access_key_id")),
                };
                Some(crate::store::s3::S3Settings {
                    bucket: s.bucket,
                    endpoint: s.endpoint,
                    region: s.region,
                    prefix: s.prefix,
                    access_key_id: s.access_key_id,
                    secret_access_key: secret,
                    snapshot_every: s.snapshot_every.max(1),
                })
            }
        };
        let cluster = match f.cluster {
            None => None,
            Some(c) => {
                if s3.is_none() {
                    return Err(invalid("cluster", "needs [storage.s3]: the nodes share one bucket"));
                }
                let advertise =
                    url::Url::parse(&c.advertise).map_err(|e| invalid("cluster.advertise", format!("{:?}: {e}", c.advertise)))?;
                if advertise.scheme() != "http" || advertise.host_str().is_none() {
                    return Err(invalid("cluster.advertise", format!("{:?} must be an http:// URL with a host", c.advertise)));
                }
                let listen: SocketAddr = c.listen.parse().map_err(|e| invalid("cluster.listen", format!("{:?}: {e}", c.listen)))?;
                let secret = std::fs::read_to_string(&c.secret_file)
                    .map_err(|e| invalid("cluster.secret_file", format!("{}: {e}", c.secret_file.display())))?
                    .trim()
                    .to_string();
                if secret.len() < 16 {
                    return Err(invalid("cluster.secret_file", "the secret must be at least 16 characters (e.g. openssl rand -hex 32)"));
                }
                if c.heartbeat.is_zero() || c.member_timeout < c.heartbeat * 2 {
                    return Err(invalid("cluster.member_timeout", "must be at least twice the heartbeat"));
                }
                Some(ClusterConfig {
                    advertise,
                    listen,
                    secret: Secret::new(secret),
                    heartbeat: c.heartbeat,
                    member_timeout: c.member_timeout,
                })
            }
        };
        let mut replication = Vec::new();
        for (i, r) in f.replication.into_iter().enumerate() {
            let key = |k: &str| format!("replication[{i}].{k}");
            if !namespaces.iter().any(|n| n.prefix == r.namespace) {
                return Err(invalid(key("namespace"), format!("{:?} is not a [[namespace]] prefix", r.namespace)));
            }
            let target = url::Url::parse(&r.target).map_err(|e| invalid(key("target"), format!("{:?}: {e}", r.target)))?;
            if !matches!(target.scheme(), "http" | "https") || target.host_str().is_none() {
                return Err(invalid(key("target"), format!("{:?} must be an http(s) URL with a host", r.target)));
            }
            let prefix = r.prefix.unwrap_or_else(|| r.namespace.clone());
            RepoName::parse(&prefix).map_err(|e| invalid(key("prefix"), e.message))?;
            let mut tags = Vec::new();
            for t in r.tags.unwrap_or_default() {
                tags.push(glob::Pattern::new(&t).map_err(|e| invalid(key("tags"), format!("{t:?}: {e}")))?);
            }
            let credentials = match (r.username, r.password_file) {
                (Some(u), Some(pf)) => {
                    let pw = std::fs::read_to_string(&pf)
                        .map_err(|e| invalid(key("password_file"), format!("cannot read {}: {e}", pf.display())))?;
                    Some((u, Secret::new(pw.trim_end_matches(['\r', '\n']).to_string())))
                }
                (None, None) => None,
                _ => return Err(invalid(key("username"), "username and password_file go together")),
            };
            replication.push(Replication { namespace: r.namespace, target, prefix, tags, credentials, delete: r.delete });
        }
        let mut webhooks = Vec::new();
        for (i, w) in f.webhook.into_iter().enumerate() {
            let key = |k: &str| format!("webhook[{i}].{k}");
            let url = url::Url::parse(&w.url).map_err(|e| invalid(key("url"), format!("{:?}: {e}", w.url)))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(key("url"), format!("{:?} must be an http(s) URL with a host", w.url)));
            }
            if let Some(events) = &w.events {
                for e in events {
                    if !EVENT_KINDS.contains(&e.as_str()) {
                        return Err(invalid(key("events"), format!("{e:?} is not one of {}", EVENT_KINDS.join(", "))));
                    }
                }
            }
            if let Some(ns) = &w.namespaces {
                for n in ns {
                    RepoName::parse(n).map_err(|e| invalid(key("namespaces"), format!("{n:?}: {}", e.message)))?;
                }
            }
            let secret = std::fs::read_to_string(&w.secret_file)
                .map_err(|e| invalid(key("secret_file"), format!("{}: {e}", w.secret_file.display())))?
                .trim()
                .to_string();
            if secret.is_empty() {
                return Err(invalid(key("secret_file"), "the secret is empty"));
            }
            if w.max_age.is_zero() || w.timeout.is_zero() {
                return Err(invalid(key("max_age"), "max_age and timeout must be positive"));
            }
            webhooks.push(Webhook {
                url,
                events: w.events,
                namespaces: w.namespaces,
                secret: Secret::new(secret),
                max_age: w.max_age,
                timeout: w.timeout,
            });
        }
        if f.events.audit_max_size.as_u64() < 4096 {
            return Err(invalid("events.audit_max_size", "must be at least 4KiB"));
        }
        let events = EventsConfig {
            audit_file: f.events.audit_file,
            audit_max_size: f.events.audit_max_size.as_u64(),
            audit_keep: f.events.audit_keep,
        };
        if s3.is_none() && f.storage.hot_tier_bytes.is_some() {
            return Err(invalid("storage.hot_tier_bytes", "applies to [storage.s3] only (the local disk is the store otherwise)"));
        }
        Ok(Config {
            s3,
            hot_tier_bytes: f.storage.hot_tier_bytes.map_or(20 << 30, |b| b.as_u64()),
            listen,
            admin_listen,
            tls,
            grace_period: f.server.grace_period,
            threads,
            clients,
            storage: StorageLimits {
                max_cache_bytes: f.storage.max_cache_bytes.map(|b| b.as_u64()),
                upload_ttl: f.storage.upload_ttl,
                gc_interval: f.storage.gc_interval,
                gc_grace: f.storage.gc_grace,
                upload_sessions_per_client: f.storage.upload_sessions_per_client,
                upload_sessions_per_repository: f.storage.upload_sessions_per_repository,
            },
            storage_root: f.storage.root,
            log_format: f.log.format,
            log_level: f.log.level.unwrap_or_else(|| "info".to_string()),
            namespaces,
            upstreams,
            auth,
            cluster,
            ui_enabled: f.ui.enabled,
            replication,
            webhooks,
            events,
        })
    }

    /// Serving without `[auth]` on an address other machines can reach: worth a warning.
    pub fn open_beyond_loopback(&self) -> bool {
        let exposed = self.listen.iter().chain(self.tls.as_ref().map(|t| &t.listen)).any(|a| !a.ip().is_loopback());
        self.auth.is_none() && exposed
    }

    /// Opens the configured store: local disk, or the bucket with the disk as its hot tier.
    pub fn open_store(&self) -> Result<std::sync::Arc<crate::store::Store>, String> {
        let limits = self.store_limits();
        match &self.s3 {
            None => crate::store::Store::open_with_limits(&self.storage_root, limits)
                .map_err(|e| format!("cannot open the store at {}: {e}", self.storage_root.display())),
            Some(s3) => crate::store::Store::open_s3(&self.storage_root, s3, self.hot_tier_bytes, limits)
                .map_err(|e| format!("cannot open the store on {}: {e}", s3.describe())),
        }
    }

    /// Checks what only the machine can tell: the storage root can be created and written.
    pub fn check_environment(&self) -> Result<(), ConfigError> {
        let root = &self.storage_root;
        std::fs::create_dir_all(root)
            .and_then(|_| tempfile_in(root))
            .map_err(|e| invalid("storage.root", format!("{} is not writable: {e}", root.display())))?;
        if let Some(s3) = &self.s3 {
            let b = crate::store::s3::Bucket::new(s3, Duration::from_secs(5)).map_err(|e| invalid("storage.s3", e.to_string()))?;
            b.probe(&crate::store::s3::node_name()).map_err(|e| invalid("storage.s3", e))?;
        }
        Ok(())
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".berth-check-{}", std::process::id()));
    std::fs::write(&p, b"")?;
    std::fs::remove_file(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_mirrors_the_big_registries() {
        let c = Config::embedded_default();
        assert_eq!(c.listen.unwrap().to_string(), "127.0.0.1:5000");
        assert_eq!(c.admin_listen.unwrap().to_string(), "127.0.0.1:9100");
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"]);
        assert!(c.upstreams[0].default);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("listen_typo"), "{e}");
        let e = Config::parse("[[upstream]]\nname=\"a\"\nurl=\"http://x\"\nbogus=1\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("[server]\nlisten = \"nope\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Config::parse("[[namespace]]\nprefix = \"Team\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("namespace[0].prefix"), "{e}");
        let e = Config::parse("[[upstream]]\nname=\"a\"\nurl=\"http://x\"\nusername=\"u\"\npassword_file=\"/nonexistent/pw\"\n", "t")
            .unwrap_err();
        assert!(e.to_string().contains("password_file"), "{e}");
        let e = Config::parse(
            "[[upstream]]\nname=\"a\"\nurl=\"http://x\"\ndefault=true\n[[upstream]]\nname=\"b\"\nurl=\"http://y\"\ndefault=true\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
    }

    #[test]
    fn a_file_mirrors_only_what_it_declares() {
        let c = Config::parse("[[namespace]]\nprefix = \"team\"\n", "t").unwrap();
        assert!(c.upstreams.is_empty());
        assert!(c.namespaces[0].matches("team") && c.namespaces[0].matches("team/app") && !c.namespaces[0].matches("teamx"));
    }

    #[test]
    fn auth_rules_resolve_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let ht = dir.path().join("htpasswd");
        std::fs::write(&ht, format!("ci:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
        let text = format!(
            "[auth]\nhtpasswd = \"{}\"\n[[namespace]]\nprefix = \"team\"\npull = [\"anonymous\"]\npush = [\"ci\"]\n\
             [[namespace]]\nprefix = \"dev\"\n[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\n\
             [[upstream]]\nname = \"b.io\"\nurl = \"http://y\"\npull = [\"authenticated\"]\n",
            ht.display()
        );
        let c = Config::parse(&text, "t").unwrap();
        let a = c.auth.as_ref().unwrap();
        assert_eq!((a.service.as_str(), a.token_ttl, a.max_failures), ("berth", Duration::from_secs(300), 10));
        use crate::auth::Action::{Pull, Push};
        assert!(a.policy.hosted("team/app").allows(None, Pull) && a.policy.hosted("team/app").allows(Some("ci"), Push));
        assert!(!a.policy.hosted("team/app").allows(Some("other"), Push));
        assert!(!a.policy.hosted("dev/x").allows(None, Pull) && a.policy.hosted("dev/x").allows(Some("ci"), Push));
        assert!(a.policy.mirror("a.io").allows(None, Pull) && !a.policy.mirror("a.io").allows(Some("ci"), Push));
        assert!(!a.policy.mirror("b.io").allows(None, Pull));
        assert!(!c.open_beyond_loopback());

        let e = Config::parse(&text.replace("[\"ci\"]", "[\"cj\"]"), "t").unwrap_err();
        assert!(e.to_string().contains("namespace[0].push") && e.to_string().contains("cj"), "{e}");
        let e = Config::parse(&text.replace("[auth]\n", "[auth]\nbogus = 1\n"), "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(&text.replace("[auth]\n", "[auth]\ntoken_key = \"/nonexistent/key.pem\"\n"), "t").unwrap_err();
        assert!(e.to_string().contains("auth.token_key"), "{e}");
    }

    #[test]
    fn rules_need_auth_and_open_listeners_are_flagged() {
        let e = Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\npull = [\"anonymous\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream[0].pull") && e.to_string().contains("[auth]"), "{e}");
        let c = Config::parse("[server]\nlisten = \"0.0.0.0:5000\"\n", "t").unwrap();
        assert!(c.open_beyond_loopback());
        assert!(!Config::parse("[server]\nlisten = \"127.0.0.1:5000\"\n", "t").unwrap().open_beyond_loopback());
    }

    #[test]
    fn client_limits_default_and_parse() {
        let c = Config::embedded_default();
        let want = ClientLimits {
            write_timeout: Duration::from_secs(30),
            min_send_rate: Some(8 << 10),
            body_read_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_head_bytes: 64 << 10,
            max_connections: 4096,
            max_connections_per_address: 256,
        };
        assert_eq!(c.clients, want);
        let c = Config::parse(
            "[server]\nwrite_timeout = \"5s\"\nmin_send_rate = \"1MiB\"\nbody_read_timeout = \"2m\"\nhead_timeout = \"3s\"\nidle_timeout = \"20s\"\nmax_head_bytes = \"16KiB\"\nmax_connections = 100\nmax_connections_per_address = 10\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.clients,
            ClientLimits {
                write_timeout: Duration::from_secs(5),
                min_send_rate: Some(1 << 20),
                body_read_timeout: Duration::from_secs(120),
                head_timeout: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(20),
                max_head_bytes: 16 << 10,
                max_connections: 100,
                max_connections_per_address: 10,
            }
        );
        let c = Config::parse("[server]\nmin_send_rate = \"0\"\n", "t").unwrap();
        assert_eq!(c.clients.min_send_rate, None);
        let e = Config::parse("[server]\nwrite_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("server.write_timeout"), "{e}");
        let e = Config::parse("[server]\nbody_read_timeout = \"100ms\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("server.body_read_timeout"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn s3_settings_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s3-secret");
        std::fs::write(&secret, "sk\n").unwrap();
        let good = format!(
            "[storage]\nhot_tier_bytes = \"1GiB\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:7480\"\nprefix = \"r/\"\naccess_key_id = \"ak\"\nsecret_access_key_file = \"{}\"\n",
            secret.display()
        );
        let c = Config::parse(&good, "t").unwrap();
        let s3 = c.s3.as_ref().unwrap();
        assert_eq!((s3.bucket.as_str(), s3.region.as_str(), s3.secret_access_key.as_deref()), ("b", "us-east-1", Some("sk")));
        assert_eq!((c.hot_tier_bytes, s3.snapshot_every), (1 << 30, 10_000));
        assert!(!format!("{s3:?}").contains("sk\""), "the secret is not printed");
        let err = |text: &str| Config::parse(text, "t").unwrap_err().to_string();
        assert!(err(&good.replace("bucket = \"b\"", "bucket = \"\"")).contains("storage.s3.bucket"));
        assert!(err(&good.replace("http://127.0.0.1:7480", "ftp://x")).contains("storage.s3.endpoint"));
        let no_file = good.lines().filter(|l| !l.starts_with("secret_access_key_file")).collect::<Vec<_>>().join("\n");
        assert!(err(&no_file).contains("storage.s3.access_key_id"));
        assert!(err(&good.replace(&secret.display().to_string(), "/nonexistent/s3-secret")).contains("storage.s3.secret_access_key_file"));
        assert!(err("[storage]\nhot_tier_bytes = \"1GiB\"\n").contains("storage.hot_tier_bytes"));
    }

    #[test]
    fn cluster_settings_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.secret");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        let cluster =
            format!("[cluster]\nadvertise = \"http://10.0.0.1:5001\"\nlisten = \"0.0.0.0:5001\"\nsecret_file = \"{}\"\n", secret.display());
        let good = format!("[storage.s3]\nbucket = \"b\"\n\n{cluster}");
        let c = Config::parse(&good, "t").unwrap().cluster.unwrap();
        assert_eq!((c.advertise.as_str(), c.secret.expose()), ("http://10.0.0.1:5001/", "0123456789abcdef0123"));
        assert_eq!((c.heartbeat, c.member_timeout), (Duration::from_secs(1), Duration::from_secs(5)));
        let err = |text: &str| Config::parse(text, "t").unwrap_err().to_string();
        assert!(err(&cluster).contains("needs [storage.s3]"));
        assert!(err(&good.replace("http://10.0.0.1:5001", "https://10.0.0.1:5001")).contains("cluster.advertise"));
        assert!(err(&good.replace("0.0.0.0:5001", "nowhere")).contains("cluster.listen"));
        assert!(err(&good.replace(&secret.display().to_string(), "/nonexistent/secret")).contains("cluster.secret_file"));
        std::fs::write(&secret, "short\n").unwrap();
        assert!(err(&good).contains("at least 16 characters"));
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        assert!(err(&format!("{good}heartbeat = \"3s\"\n")).contains("cluster.member_timeout"));
    }

    #[test]
    fn webhook_and_audit_settings_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let good = format!("[[webhook]]\nurl = \"https://ci.example.com/h\"\nsecret_file = \"{}\"\n", secret.display());
        let c = Config::parse(&good, "t").unwrap();
        let w = &c.webhooks[0];
        assert_eq!((w.secret.expose(), w.max_age, w.timeout), ("s3cret", Duration::from_secs(86400), Duration::from_secs(10)));
        assert!(w.events.is_none() && w.namespaces.is_none());
        assert_eq!((c.events.audit_file.as_deref(), c.events.audit_max_size, c.events.audit_keep), (None, 100 << 20, 5));
        let err = |text: &str| Config::parse(text, "t").unwrap_err().to_string();
        assert!(err(&good.replace("https://ci.example.com/h", "ftp://x")).contains("webhook[0].url"));
        assert!(err(&format!("{good}events = [\"manifest.pushed\", \"pushed\"]\n")).contains("webhook[0].events"));
        assert!(err(&format!("{good}namespaces = [\"Team\"]\n")).contains("webhook[0].namespaces"));
        assert!(err(&format!("{good}max_age = \"0s\"\n")).contains("webhook[0].max_age"));
        assert!(err(&good.replace(&secret.display().to_string(), "/nonexistent/secret")).contains("webhook[0].secret_file"));
        assert!(err("[events]\naudit_max_size = \"1KiB\"\n").contains("events.audit_max_size"));
        assert!(err("[events]\naudit = \"x\"\n").contains("audit"));
    }

    #[test]
    fn upstream_outage_settings() {
        let up = |extra: &str| format!("[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:1\"\n{extra}");
        let c = Config::parse(&up(""), "t").unwrap();
        let u = &c.upstreams[0];
        assert_eq!((u.stale_after, u.ratelimit_reserve, u.offline), (Duration::from_secs(2), 0.1, false));
        for (v, want) in [("\"25%\"", 0.25), ("0.05", 0.05)] {
            let c = Config::parse(&up(&format!("ratelimit_reserve = {v}\n")), "t").unwrap();
            assert_eq!(c.upstreams[0].ratelimit_reserve, want);
        }
        for bad in ["\"lots\"", "\"150%\"", "-0.5"] {
            let e = Config::parse(&up(&format!("ratelimit_reserve = {bad}\n")), "t").unwrap_err().to_string();
            assert!(e.contains("upstream[0].ratelimit_reserve"), "{bad}: {e}");
        }
    }

    #[test]
    fn several_urls_with_credentials_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&pa, "secret-a\n").unwrap();
        std::fs::write(&pb, "secret-b").unwrap();
        let text = format!(
            "[[upstream]]\nname = \"docker.io\"\nusername = \"hub\"\npassword_file = \"{}\"\n\
             urls = [{{ url = \"https://mirror.corp/dockerhub\", username = \"corp\", password_file = \"{}\" }}, \
             \"https://registry-1.docker.io\", {{ url = \"https://third.example\" }}]\n",
            pa.display(),
            pb.display()
        );
        let c = Config::parse(&text, "t").unwrap();
        let u = &c.upstreams[0];
        let got: Vec<_> = u.urls.iter().map(|x| (x.url.as_str(), x.credentials.as_ref().map(|(n, p)| (n.as_str(), p.expose())))).collect();
        assert_eq!(
            got,
            vec![
                ("https://mirror.corp/dockerhub", Some(("corp", "secret-b"))),
                ("https://registry-1.docker.io/", Some(("hub", "secret-a"))),
                ("https://third.example/", None),
            ]
        );
        assert_eq!(u.url.as_str(), "https://mirror.corp/dockerhub", "the first URL names the upstream");
        // One url is a list of one.
        let c = Config::parse("[[upstream]]\nname = \"a\"\nurl = \"http://x\"\n", "t").unwrap();
        assert_eq!(c.upstreams[0].urls.len(), 1);
        let err = |t: &str| Config::parse(t, "t").unwrap_err().to_string();
        let e = err("[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nurls = [\"http://y\"]\n");
        assert!(e.contains("upstream[0].url") && e.contains("url or urls"), "{e}");
        assert!(err("[[upstream]]\nname = \"a\"\n").contains("upstream[0].urls"));
        assert!(err("[[upstream]]\nname = \"a\"\nurls = []\n").contains("upstream[0].urls"));
        let e = err("[[upstream]]\nname = \"a\"\nurls = [\"http://x\", \"ftp://y\"]\n");
        assert!(e.contains("upstream[0].urls[1]"), "{e}");
        let e = err("[[upstream]]\nname = \"a\"\nurls = [{ url = \"http://x\", username = \"u\" }]\n");
        assert!(e.contains("upstream[0].urls[0].username"), "{e}");
    }

    #[test]
    fn upstream_warm_settings() {
        let up = |extra: &str| format!("[[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:1\"\n{extra}");
        let w = Config::parse(&up(""), "t").unwrap().upstreams[0].warm.clone();
        assert!(w.prefetch.is_empty() && w.platforms.is_empty() && !w.pin);
        assert_eq!(w.watch_window, Duration::from_secs(7 * 24 * 3600));
        let c = Config::parse(
            &up("prefetch = [\"library/nginx:1.27\", \"library/alpine:3.*\", \"localhost/x/y:[ab]*\"]\nprefetch_platforms = [\"linux/amd64\", \"linux/arm/v7\"]\npin = true\nwatch_window = \"0s\"\n"),
            "t",
        )
        .unwrap();
        let w = &c.upstreams[0].warm;
        assert_eq!(w.prefetch[0].repo.as_str(), "library/nginx");
        assert_eq!(w.prefetch[0].exact_tag(), Some("1.27"));
        assert_eq!(w.prefetch[1].exact_tag(), None);
        assert!(w.prefetch[1].tag.matches("3.20") && !w.prefetch[1].tag.matches("4.0"));
        assert_eq!(w.prefetch[2].repo.as_str(), "localhost/x/y");
        assert_eq!(w.platforms.len(), 2);
        assert!(w.pin && w.watch_window.is_zero());
        for (bad, key) in [
            ("prefetch = [\"library/nginx\"]", "upstream[0].prefetch"),
            ("prefetch = [\"Library/nginx:1\"]", "upstream[0].prefetch"),
            ("prefetch = [\"library/nginx:.bad\"]", "upstream[0].prefetch"),
            ("prefetch = [\"library/nginx:[\"]", "upstream[0].prefetch"),
            ("prefetch_platforms = [\"amd64\"]", "upstream[0].prefetch_platforms"),
            ("watch_window = \"soon\"", "watch_window"),
        ] {
            let e = Config::parse(&up(&format!("{bad}\n")), "t").unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }
}
