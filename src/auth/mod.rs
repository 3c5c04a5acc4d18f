//! Access control, plain Rust: htpasswd users, berth's token service (ES256 JWTs), the
//! pull/push policy of namespaces and mirrors, and brute-force throttling. Knows nothing of
//! pingora or of HTTP beyond the `Authorization` header value; `registry` applies it.

pub mod hashing;
pub mod htpasswd;
pub mod policy;
pub mod throttle;
pub mod token;

pub use htpasswd::Htpasswd;
pub use policy::{Action, Policy, Principal, Rules, Scope};
pub use token::{Access, Claims, Issued};

use base64::Engine as _;
use hashing::FairPool;
use parking_lot::{Mutex, RwLock};
use sha2::Digest as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use throttle::Throttle;
use token::{TokenKey, Tokens};

/// How long a successful password check is remembered: `docker push` sends Basic credentials
/// on every request when a client skips the token dance, and bcrypt is deliberately slow.
const VERIFIED_TTL: Duration = Duration::from_secs(600);
const VERIFIED_MAX: u64 = 4096;
/// How often the htpasswd file is looked at for changes: adding a CI user needs no restart.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// `[auth]` as the config produces it: the htpasswd file read and every namespace's and
/// upstream's rules resolved.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub htpasswd: PathBuf,
    pub users: Arc<Htpasswd>,
    /// A PKCS#8 PEM P-256 key, checked at load; `None`: generated under `storage.root`.
    pub token_key: Option<PathBuf>,
    pub token_ttl: Duration,
    /// The token audience and the `service` of challenges.
    pub service: String,
    /// The token endpoint announced in challenges; `None`: `<scheme>://<Host>/token`.
    pub realm: Option<String>,
    pub max_failures: u32,
    pub failure_window: Duration,
    pub policy: Policy,
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credentials at all.
    Anonymous,
    /// A user whose password was just checked; rights come from the policy.
    User(String),
    /// A bearer token from berth's token service; rights are what the token grants.
    Token(Claims),
}

impl Caller {
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::User(u) => Some(u),
            Caller::Token(c) => Some(c.sub.as_str()).filter(|s| !s.is_empty()),
        }
    }

    /// May this caller do `action` on the repository the client calls `name`, which the
    /// policy governs with `rules`?
    pub fn may(&self, rules: &Rules, name: &str, action: Action) -> bool {
        match self {
            Caller::Anonymous | Caller::User(_) => rules.allows(self.user(), action),
            Caller::Token(c) => c.access.iter().any(|a| a.kind == "repository" && a.name == name && action.granted_by(&a.actions)),
        }
    }

    /// May list the catalog: any authenticated caller (the list is filtered per repository).
    pub fn may_list_catalog(&self) -> bool {
        match self {
            Caller::Anonymous => false,
            Caller::User(_) => true,
            Caller::Token(c) => c.access.iter().any(|a| a.kind == "registry" && a.name == "catalog" && !a.actions.is_empty()),
        }
    }
}

/// Why credentials were not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures from this client: try again after the duration.
    Throttled(Duration),
    /// Unknown user or wrong password (deliberately indistinguishable), or malformed Basic.
    BadCredentials,
    /// A bearer token that is not berth's, or is expired, tampered or for another service.
    InvalidToken(String),
}

/// Concurrent password checks one address may run: enough for a client that logs in on two
/// connections at once, too few to take the hashing capacity from others.
const CHECKS_PER_ADDRESS: usize = 2;

/// The users as last loaded, with what identifies that version of the file.
struct UserDb {
    users: Htpasswd,
    version: Option<(SystemTime, u64)>,
}

fn file_version(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub struct Auth {
    htpasswd: PathBuf,
    db: RwLock<Arc<UserDb>>,
    next_reload: Mutex<Instant>,
    tokens: Tokens,
    policy: Policy,
    throttle: Throttle,
    /// Keys are a keyed hash of (user, password, stored hash): neither the password nor
    /// anything that can be checked offline against it is kept.
    verified: moka::sync::Cache<[u8; 32], ()>,
    pepper: [u8; 32],
    hashing: FairPool,
    pub service: String,
    pub realm: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("users", &self.db.read().users).field("service", &self.service).finish_non_exhaustive()
    }
}

/// `Basic base64(user:password)` -> (user, password).
pub fn basic_credentials(authorization: &str) -> Option<(String, String)> {
    let (scheme, rest) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

impl Auth {
    pub fn new(cfg: &AuthConfig, store: &dyn crate::store::BlobStore) -> Result<Auth, String> {
        let key = TokenKey::load_or_generate(cfg.token_key.as_deref(), store)?;
        let db = UserDb { users: (*cfg.users).clone(), version: file_version(&cfg.htpasswd) };
        let mut pepper = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut pepper).map_err(|_| "no randomness".to_string())?;
        let slots = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2);
        Ok(Auth {
            htpasswd: cfg.htpasswd.clone(),
            db: RwLock::new(Arc::new(db)),
            next_reload: Mutex::new(Instant::now() + RELOAD_EVERY),
            tokens: Tokens::new(key, &cfg.service, cfg.token_ttl),
            policy: cfg.policy.clone(),
            throttle: Throttle::new(cfg.max_failures, cfg.failure_window),
            verified: moka::sync::Cache::builder().max_capacity(VERIFIED_MAX).time_to_live(VERIFIED_TTL).build(),
            pepper,
            hashing: FairPool::new(slots, CHECKS_PER_ADDRESS),
            service: cfg.service.clone(),
            realm: cfg.realm.clone(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The user's htpasswd entry as last (re)loaded; None once they are removed. A login
    /// session remembers it, so a changed password or a removed user ends the session.
    pub async fn entry_of(&self, user: &str) -> Option<String> {
        self.users().await.users.hash_of(user).map(str::to_string)
    }

    /// The caller behind an `Authorization` header (none: anonymous).
    pub async fn authenticate(&self, authorization: Option<&str>, client: Option<IpAddr>) -> Result<Caller, Refusal> {
        let r = self.authenticate_inner(authorization, client).await;
        if let Err(e @ (Refusal::Throttled(_) | Refusal::InvalidToken(_))) = &r {
            // Bad passwords are counted where they are checked, token requests included.
            count(e);
        }
        r
    }

    async fn authenticate_inner(&self, authorization: Option<&str>, client: Option<IpAddr>) -> Result<Caller, Refusal> {
        let Some(h) = authorization.filter(|h| !h.trim().is_empty()) else {
            return Ok(Caller::Anonymous);
        };
        if let Some(t) = bearer_token(h) {
            return self.tokens.verify(t).map(Caller::Token).map_err(Refusal::InvalidToken);
        }
        match basic_credentials(h) {
            Some((user, password)) => self.check_password(&user, &password, client).await.map(|_| Caller::User(user)),
            None => {
                self.throttle.check(client_key(client)).map_err(Refusal::Throttled)?;
                self.throttle.fail(client_key(client));
                count(&Refusal::BadCredentials);
                Err(Refusal::BadCredentials)
            }
        }
    }

    /// Checks a password off the async threads. Unknown users and wrong passwords cost the
    /// same bcrypt work and give the same answer.
    pub async fn check_password(&self, user: &str, password: &str, client: Option<IpAddr>) -> Result<(), Refusal> {
        let ip = client_key(client);
        self.throttle.check(ip).map_err(Refusal::Throttled)?;
        let db = self.users().await;
        let stored = db.users.hash_of(user);
        let key = stored.map(|h| self.cache_key(user, password, h));
        let known = |key: Option<[u8; 32]>| key.is_some_and(|k| self.verified.contains_key(&k));
        if known(key) {
            return Ok(());
        }
        let slot = self.hashing.acquire(throttle::bucket(ip)).await;
        // While this request waited, another with the same credentials (a client logging in on
        // several connections) may have checked them.
        if known(key) {
            return Ok(());
        }
        let attempt = self.throttle.begin(ip).map_err(Refusal::Throttled)?;
        let (hash, password, max_cost) = (stored.map(str::to_string), password.to_string(), db.users.cost());
        // The slot goes with the work: a client that hangs up does not free it before bcrypt ends.
        let matched = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            hashing::verify_evenly(&password, hash.as_deref(), max_cost)
        })
        .await
        .unwrap_or(false);
        match (matched, key) {
            (true, Some(k)) => {
                self.verified.insert(k, ());
                self.throttle.succeeded(attempt);
                Ok(())
            }
            _ => {
                count(&Refusal::BadCredentials);
                tracing::info!(target: "auth", user, client = %ip, "rejected credentials");
                Err(Refusal::BadCredentials)
            }
        }
    }

    /// The current users, reloading the file first when it changed. A file that no longer
    /// loads (a bad line) is reported once and the previous users stay in force.
    async fn users(&self) -> Arc<UserDb> {
        let due = {
            let mut next = self.next_reload.lock();
            let now = Instant::now();
            let due = now >= *next;
            if due {
                *next = now + RELOAD_EVERY;
            }
            due
        };
        let current = self.db.read().clone();
        if !due {
            return current;
        }
        let path = self.htpasswd.clone();
        let seen = current.version;
        let fresh = tokio::task::spawn_blocking(move || {
            let version = file_version(&path);
            if version.is_none() || version == seen {
                return None;
            }
            Some(Htpasswd::load(&path).map(|users| UserDb { users, version }).map_err(|e| (e.to_string(), version)))
        })
        .await
        .ok()
        .flatten();
        match fresh {
            None => current,
            Some(Ok(db)) => {
                tracing::info!(target: "auth", users = db.users.len(), path = %self.htpasswd.display(), "reloaded the htpasswd file");
                let db = Arc::new(db);
                *self.db.write() = db.clone();
                db
            }
            Some(Err((e, version))) => {
                tracing::error!(target: "auth", error = %e, "the changed htpasswd file does not load; keeping the previous users");
                // Remember the bad version so the error is reported once per change.
                let kept = Arc::new(UserDb { users: current.users.clone(), version });
                *self.db.write() = kept.clone();
                kept
            }
        }
    }

    fn cache_key(&self, user: &str, password: &str, hash: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        for part in [&self.pepper[..], user.as_bytes(), password.as_bytes(), hash.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    pub fn issue(&self, user: Option<&str>, access: Vec<Access>) -> Issued {
        self.tokens.issue(user, access)
    }
}

fn count(r: &Refusal) {
    let reason = match r {
        Refusal::Throttled(_) => "throttled",
        Refusal::BadCredentials => "bad_credentials",
        Refusal::InvalidToken(_) => "invalid_token",
    };
    crate::metrics::AUTH_REJECTED.with_label_values(&[reason]).inc();
}

/// Requests without a peer address (never over TCP) share one throttle bucket.
fn client_key(client: Option<IpAddr>) -> IpAddr {
    client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &Path, max_failures: u32) -> Auth {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Htpasswd::parse(&format!("alice:{hash}\n"), "t").unwrap();
        let cfg = AuthConfig {
            htpasswd: dir.join("htpasswd"),
            users: Arc::new(users),
            token_key: None,
            token_ttl: Duration::from_secs(300),
            service: "berth".into(),
            realm: None,
            max_failures,
            failure_window: Duration::from_secs(60),
            policy: Policy::default(),
        };
        Auth::new(&cfg, &crate::store::local::LocalBlobs::open(dir).unwrap()).unwrap()
    }

    fn basic(u: &str, p: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    }

    #[tokio::test]
    async fn passwords_tokens_and_throttling() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), 3);
        let ip = Some("192.0.2.7".parse().unwrap());
        assert!(matches!(a.authenticate(None, ip).await, Ok(Caller::Anonymous)));
        assert!(matches!(a.authenticate(Some(&basic("alice", "s3cret")), ip).await, Ok(Caller::User(u)) if u == "alice"));
        // Cached the second time; still correct.
        assert!(a.authenticate(Some(&basic("alice", "s3cret")), ip).await.is_ok());
        assert_eq!(a.authenticate(Some(&basic("alice", "wrong")), ip).await.unwrap_err(), Refusal::BadCredentials);
        assert_eq!(a.authenticate(Some(&basic("mallory", "s3cret")), ip).await.unwrap_err(), Refusal::BadCredentials);
        assert_eq!(a.authenticate(Some("Basic !!!"), ip).await.unwrap_err(), Refusal::BadCredentials);
        assert!(matches!(a.authenticate(Some(&basic("alice", "s3cret")), ip).await, Err(Refusal::Throttled(_))));
        assert!(a.authenticate(Some(&basic("alice", "s3cret")), Some("192.0.2.8".parse().unwrap())).await.is_ok());
        let t = a.issue(Some("alice"), vec![]).token;
        assert!(matches!(a.authenticate(Some(&format!("Bearer {t}")), ip).await, Ok(Caller::Token(c)) if c.sub == "alice"));
        assert!(matches!(a.authenticate(Some("Bearer x.y.z"), ip).await, Err(Refusal::InvalidToken(_))));
    }

    #[test]
    fn token_callers_get_exactly_their_grant() {
        let claims = |access| {
            Caller::Token(Claims {
                iss: "berth".into(),
                sub: "bob".into(),
                aud: "berth".into(),
                exp: 0,
                nbf: 0,
                iat: 0,
                jti: String::new(),
                access,
            })
        };
        let c = claims(vec![Access { kind: "repository".into(), name: "team/app".into(), actions: vec!["pull".into()] }]);
        let open = Rules { pull: vec![Principal::Anonymous], push: vec![Principal::Anonymous] };
        assert!(c.may(&open, "team/app", Action::Pull));
        assert!(!c.may(&open, "team/app", Action::Push));
        assert!(!c.may(&open, "team/other", Action::Pull), "the token, not the policy, decides");
        assert!(!c.may_list_catalog());
        assert_eq!(c.user(), Some("bob"));
        assert!(!Caller::Anonymous.may_list_catalog());
    }

    /// Every path in the `.rs` files of `dir` (relative to the crate) that names `module` at the
    /// crate root, spelled out or inside a `use crate::{..}` group, and how many files were read.
    fn uses_of(dir: &str, module: &str) -> (Vec<String>, usize) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let (mut found, mut checked) = (Vec::new(), 0);
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for root in ["crate", "super", "berth"] {
                if text.contains(&format!("{root}::{module}")) {
                    found.push(format!("{} uses {root}::{module}", p.display()));
                }
                for (at, _) in text.match_indices(&format!("{root}::{{")) {
                    let group = &text[at..];
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    let named = group
                        .split(|c: char| c == '{' || c == ',' || c.is_whitespace())
                        .any(|part| part == module || part.starts_with(&format!("{module}::")));
                    if named {
                        found.push(format!("{} uses {module} in {group}}}", p.display()));
                    }
                }
            }
            checked += 1;
        }
        (found, checked)
    }

    /// `config` builds these types from the file; `auth` must not reach back into it, or the
    /// two modules would depend on each other.
    #[test]
    fn auth_does_not_depend_on_config() {
        // Spelled in two parts so this file does not match itself.
        let (found, checked) = uses_of("src/auth", &format!("con{}", "fig"));
        assert!(found.is_empty(), "{found:#?}");
        assert!(checked >= 6, "read {checked} files of src/auth");
    }

    /// `registry` (the mirror's warm-up) and `events` (webhooks) read their settings from
    /// `config`, so `config` must not use them: what it parses for them (platforms, event
    /// kinds) lives in `config` itself or in `oci`, which depends on neither.
    #[test]
    fn config_depends_on_neither_registry_nor_events() {
        for module in [format!("regis{}", "try"), format!("even{}", "ts")] {
            let (found, checked) = uses_of("src/config", &module);
            assert!(found.is_empty(), "{found:#?}");
            assert!(checked >= 1, "read no file of src/config");
        }
    }
}
