//! Who is looking at a page: the session cookie a login form creates, and the token every form
//! must echo back (CSRF).

use crate::registry::Request;
use cookie::{Cookie, SameSite};
use std::sync::Arc;
use std::time::Duration;

pub const SESSION_COOKIE: &str = "berth_session";
/// For visitors without a session (the login form, and every form when `[auth]` is off): the
/// form's token must equal this cookie's (a double-submit token). A cross-site page can neither
/// read the cookie nor make the browser send it (SameSite=Strict).
pub const CSRF_COOKIE: &str = "berth_csrf";

/// A browser idle for this long logs in again.
const IDLE: Duration = Duration::from_secs(12 * 3600);

pub struct Session {
    pub user: String,
    pub csrf: String,
    /// The user's htpasswd entry at login: the session ends when it changes.
    pub entry: Option<String>,
}

/// Logged-in browsers, in memory: a restart logs everyone out, and each node of a cluster has
/// its own (a load balancer in front must keep a browser on one node).
pub struct Sessions {
    by_id: moka::sync::Cache<String, Arc<Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions { by_id: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(IDLE).build() }
    }
}

impl Sessions {
    /// Starts a session for `user`, logged in with htpasswd entry `entry`; returns its id.
    pub fn create(&self, user: &str, entry: Option<String>) -> String {
        let id = random_token();
        self.by_id.insert(id.clone(), Arc::new(Session { user: user.to_string(), csrf: random_token(), entry }));
        id
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.by_id.get(id)
    }

    pub fn end(&self, id: &str) {
        self.by_id.invalidate(id);
    }
}

/// 256 random bits, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system randomness");
    hex::encode(b)
}

/// The visitor behind a request.
pub struct Viewer {
    /// The logged-in user (None: anonymous, or no `[auth]`).
    pub user: Option<String>,
    /// Their htpasswd entry at login.
    pub entry: Option<String>,
    pub session_id: Option<String>,
    /// What this visitor's forms carry.
    pub csrf: String,
    /// The token came with the request (a session's or the cookie's), so a form may be checked
    /// against it; a fresh one only ever goes out.
    pub csrf_known: bool,
    /// Cookies to send with the answer.
    pub set_cookies: Vec<String>,
}

fn cookie_value(req: &Request<'_>, name: &str) -> Option<String> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| Cookie::split_parse(v.to_string()).filter_map(Result::ok).collect::<Vec<_>>())
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A cookie for the pages only: not readable by scripts, never sent from another site.
pub fn cookie(req: &Request<'_>, name: &str, value: &str, max_age: Option<Duration>) -> String {
    let mut c =
        Cookie::build((name.to_string(), value.to_string())).path("/ui").http_only(true).same_site(SameSite::Strict).secure(req.tls);
    if let Some(age) = max_age {
        c = c.max_age(cookie::time::Duration::seconds(age.as_secs() as i64));
    }
    c.build().to_string()
}

impl Viewer {
    pub fn of(sessions: &Sessions, req: &Request<'_>) -> Viewer {
        if let Some(id) = cookie_value(req, SESSION_COOKIE).filter(|v| well_formed(v)) {
            if let Some(s) = sessions.get(&id) {
                return Viewer {
                    user: Some(s.user.clone()),
                    entry: s.entry.clone(),
                    session_id: Some(id),
                    csrf: s.csrf.clone(),
                    csrf_known: true,
                    set_cookies: Vec::new(),
                };
            }
        }
        match cookie_value(req, CSRF_COOKIE).filter(|v| well_formed(v)) {
            Some(csrf) => Viewer { user: None, entry: None, session_id: None, csrf, csrf_known: true, set_cookies: Vec::new() },
            None => {
                let csrf = random_token();
                let set = cookie(req, CSRF_COOKIE, &csrf, None);
                Viewer { user: None, entry: None, session_id: None, csrf, csrf_known: false, set_cookies: vec![set] }
            }
        }
    }

    /// Whether a submitted form carries this visitor's token.
    pub fn form_ok(&self, submitted: Option<&str>) -> bool {
        // Compared without an early exit: timing says nothing about how much of a guess matched.
        let same = |s: &str| s.len() == self.csrf.len() && s.bytes().zip(self.csrf.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        self.csrf_known && submitted.is_some_and(same)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_with(headers: &http::HeaderMap) -> Request<'_> {
        static GET: http::Method = http::Method::GET;
        Request { method: &GET, path: "/ui/", query: None, headers, client: None, tls: false, peer: false }
    }

    #[test]
    fn sessions_and_tokens() {
        let sessions = Sessions::default();
        let id = sessions.create("alice", None);
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, format!("other=1; {SESSION_COOKIE}={id}").parse().unwrap());
        let v = Viewer::of(&sessions, &req_with(&h));
        assert_eq!(v.user.as_deref(), Some("alice"));
        assert!(v.form_ok(Some(&v.csrf.clone())));
        assert!(!v.form_ok(Some("x")) && !v.form_ok(None));
        sessions.end(&id);
        let v = Viewer::of(&sessions, &req_with(&h));
        assert_eq!(v.user, None);
        // A token the visitor did not send back cannot validate a form.
        assert!(!v.form_ok(Some(&v.csrf.clone())));
        let set = &v.set_cookies[0];
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/ui"), "{set}");
    }
}
