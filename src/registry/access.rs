//! Access control applied to registry requests: who the caller is, what the request needs,
//! and the 401 challenge that sends clients to berth's token endpoint. The decisions
//! themselves live in `crate::auth`.

use super::{listing, Outcome, Registry, Request, Response, Target};
use crate::auth::{Action, Caller, Refusal, Rules};
use crate::oci::route::Endpoint;
use crate::oci::{ErrorCode, OciError};
use http::Method;
use std::time::Duration;

/// Where the token service answers, on the registry listener.
pub const TOKEN_PATH: &str = "/token";

/// What a request to `ep` needs. Upload sessions are writes whatever the method: even
/// reading an upload's progress reveals what a pusher is sending.
pub fn action_for(ep: &Endpoint, method: &Method) -> Action {
    match ep {
        Endpoint::UploadStart { .. } | Endpoint::Upload { .. } => Action::Push,
        _ if matches!(*method, Method::GET | Method::HEAD) => Action::Pull,
        _ => Action::Push,
    }
}

/// The name a client uses for a repository in scopes: as sent, with a containerd `?ns=`
/// folded in as a host prefix. `resolve(scope_name, None)` names the same repository as
/// `resolve(name, ns)`, so a token granted for one request's scope cannot be replayed through
/// `?ns=` against a repository with other rules.
pub fn scope_name(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Challenge parameters come from the config, validated names, and the Host header; keep a
/// hostile Host from breaking out of the quoted string.
fn quoted_safe(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, '"' | '\\') && !c.is_control()).collect()
}

fn host_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

impl Registry {
    pub(super) fn rules_for(&self, target: &Target) -> &Rules {
        let auth = self.auth.as_ref().expect("rules are asked for only with [auth]");
        match target {
            Target::Hosted(repo) => auth.policy().hosted(repo.as_str()),
            Target::Mirror { upstream, .. } => auth.policy().mirror(&upstream.name),
        }
    }

    /// The caller, or the response that refuses their credentials. `Ok(None)`: no `[auth]`.
    pub(super) async fn caller(&self, req: &Request<'_>, outcome: &mut Outcome) -> Result<Option<Caller>, Response> {
        let Some(auth) = &self.auth else { return Ok(None) };
        match auth.authenticate(req.header("authorization"), req.client).await {
            Ok(c) => {
                outcome.user = c.user().map(str::to_string);
                Ok(Some(c))
            }
            Err(Refusal::Throttled(wait)) => Err(throttled(wait)),
            Err(Refusal::BadCredentials) => {
                Err(self.challenge(req, None, None, OciError::msg(ErrorCode::Unauthorized, "incorrect username or password")))
            }
            Err(Refusal::InvalidToken(why)) => Err(self.challenge(
                req,
                None,
                Some("invalid_token"),
                OciError::msg(ErrorCode::Unauthorized, format!("bearer token refused: {why}")),
            )),
        }
    }

    /// 401 with `WWW-Authenticate: Bearer realm=...,service=...[,scope=...][,error=...]`.
    pub(super) fn challenge(&self, req: &Request<'_>, scope: Option<&str>, error: Option<&str>, e: OciError) -> Response {
        let auth = self.auth.as_ref().expect("challenges are sent only with [auth]");
        let mut v = format!("Bearer realm=\"{}\",service=\"{}\"", quoted_safe(&self.realm(req)), quoted_safe(&auth.service));
        if let Some(s) = scope {
            v.push_str(&format!(",scope=\"{}\"", quoted_safe(s)));
        }
        if let Some(err) = error {
            v.push_str(&format!(",error=\"{err}\""));
        }
        Response::error(&e).header("WWW-Authenticate", v)
    }

    /// The token endpoint's URL as this client reaches berth, unless configured.
    fn realm(&self, req: &Request<'_>) -> String {
        if let Some(r) = self.auth.as_ref().and_then(|a| a.realm.clone()) {
            return r;
        }
        let scheme = if req.tls { "https" } else { "http" };
        let host = match req.header("host").filter(|h| host_like(h)) {
            Some(h) => h.to_string(),
            None => {
                let fallback = if req.tls { self.config.tls.as_ref().map(|t| t.listen) } else { self.config.listen };
                fallback.map(|a| a.to_string()).unwrap_or_else(|| "localhost".into())
            }
        };
        format!("{scheme}://{host}{TOKEN_PATH}")
    }

    /// Refuses a request whose caller lacks `action` on the repository the client calls
    /// `name`: 401 with the scope to ask for, `insufficient_scope` when credentials were given.
    pub(super) fn authorize(
        &self,
        req: &Request<'_>,
        caller: &Caller,
        target: &Target,
        name: &str,
        action: Action,
    ) -> Result<(), Response> {
        if caller.may(self.rules_for(target), name, action) {
            return Ok(());
        }
        let scope = format!("repository:{name}:{}", action.scope_actions());
        let (error, message) = match caller {
            Caller::Anonymous => (None, format!("authentication required to {} {name}", verb(action))),
            _ => (Some("insufficient_scope"), format!("{} may not {} {name}", caller.user().unwrap_or("an anonymous token"), verb(action))),
        };
        let detail = serde_json::json!([{"Type": "repository", "Name": name, "Action": action.scope_actions()}]);
        Err(self.challenge(req, Some(&scope), error, OciError::msg(ErrorCode::Unauthorized, message).detail(detail)))
    }

    /// `GET /v2/`: how `docker login` finds the realm and checks its credentials.
    pub(super) fn base(&self, req: &Request<'_>, caller: Option<&Caller>) -> Result<(), Response> {
        match caller {
            Some(Caller::Anonymous) => Err(self.challenge(req, None, None, OciError::new(ErrorCode::Unauthorized))),
            _ => Ok(()),
        }
    }

    /// The catalog for a caller: only what they may pull, and nothing for anonymous callers.
    pub(super) fn catalog(&self, req: &Request<'_>, caller: Option<&Caller>) -> Result<Response, OciError> {
        let Some(caller) = caller else {
            return listing::catalog(self, req);
        };
        if !caller.may_list_catalog() {
            let error = (!matches!(caller, Caller::Anonymous)).then_some("insufficient_scope");
            return Ok(self.challenge(
                req,
                Some("registry:catalog:*"),
                error,
                OciError::msg(ErrorCode::Unauthorized, "listing the catalog needs credentials"),
            ));
        }
        // A token grants the catalog, not its entries: each entry is checked against the
        // policy for the token's user, as a password caller's would be.
        let user = caller.user();
        let visible = |name: &String| self.resolve(name, None).is_ok_and(|t| self.rules_for(&t).allows(user, Action::Pull));
        listing::paged_json(req, "repositories", None, |last, n| {
            // Read the store page by page until the caller's page is full.
            let mut out = Vec::new();
            let mut after = last.map(str::to_string);
            loop {
                let (page, more) = self.store.repositories(after.as_deref(), listing::MAX_PAGE)?;
                after = page.last().cloned();
                for name in page.iter().filter(|p| visible(p)) {
                    if out.len() == n {
                        return Ok((out, true));
                    }
                    out.push(name.clone());
                }
                if !more {
                    return Ok((out, false));
                }
            }
        })
    }

    /// The query an upload start is answered with, when it differs from the client's. A
    /// cross-repository mount lends a blob from `from`; without pull rights there the mount
    /// is dropped, and the client falls back to uploading (202), as the spec allows. A mount
    /// without `from` (OCI 1.1 automatic content discovery) borrows from a hosted repository
    /// that links the blob and that the caller may pull from.
    pub(super) fn mount_query(&self, req: &Request<'_>, caller: Option<&Caller>, into: &str) -> Result<Option<String>, OciError> {
        let Some(mount) = req.param("mount") else { return Ok(None) };
        let may_pull = |name: &str| match caller {
            None => true,
            Some(c) => self.resolve(name, None).is_ok_and(|t| c.may(self.rules_for(&t), name, Action::Pull)),
        };
        // A client cannot ask its token for a source it does not know: discovery goes by what
        // the token's user may pull, as the catalog does.
        let user_may_pull = |name: &str| match caller {
            None => true,
            Some(c) => self.resolve(name, None).is_ok_and(|t| self.rules_for(&t).allows(c.user(), Action::Pull)),
        };
        let pairs = url::form_urlencoded::parse(req.query.unwrap_or_default().as_bytes());
        let rewritten = |from: Option<&str>| {
            let kept = pairs.filter(|(k, _)| k != "mount" && k != "from");
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            q.extend_pairs(kept);
            if let Some(from) = from {
                q.append_pair("mount", &mount).append_pair("from", from);
            }
            q.finish()
        };
        if let Some(from) = req.param("from") {
            return Ok((!may_pull(&from)).then(|| rewritten(None)));
        }
        let Ok(d) = crate::oci::Digest::parse(&mount) else { return Ok(None) };
        // Bounded: a blob every repository shares must not make one POST walk them all.
        for repo in self.store.meta().holders(&d)?.iter().take(64) {
            if repo != into
                && matches!(self.resolve(repo, None), Ok(Target::Hosted(_)))
                && self.store.blob_linked(repo, &d)?
                && user_may_pull(repo)
            {
                return Ok(Some(rewritten(Some(repo))));
            }
        }
        Ok(None)
    }
}

fn verb(a: Action) -> &'static str {
    match a {
        Action::Pull => "pull from",
        Action::Push => "push to",
    }
}

pub fn throttled(wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let e = OciError::msg(ErrorCode::TooManyRequests, format!("too many failed logins from this address; retry in {secs}s"));
    Response::new(429).json(e.to_json().into()).header("Retry-After", secs.max(1).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_by_endpoint_and_method() {
        let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
        let manifest = Endpoint::Manifest { name: "a".into(), reference: crate::oci::Reference::parse("v1").unwrap() };
        assert_eq!(action_for(&manifest, &m("GET")), Action::Pull);
        assert_eq!(action_for(&manifest, &m("HEAD")), Action::Pull);
        assert_eq!(action_for(&manifest, &m("PUT")), Action::Push);
        assert_eq!(action_for(&manifest, &m("DELETE")), Action::Push);
        assert_eq!(action_for(&Endpoint::Upload { name: "a".into(), uuid: "u".into() }, &m("GET")), Action::Push);
        assert_eq!(action_for(&Endpoint::TagsList { name: "a".into() }, &m("GET")), Action::Pull);
    }

    #[test]
    fn scope_names_fold_ns_in() {
        assert_eq!(scope_name("x/y", Some("ghcr.io")), "ghcr.io/x/y");
        assert_eq!(scope_name("team/app", None), "team/app");
    }

    #[test]
    fn challenge_values_stay_quoted() {
        assert_eq!(quoted_safe("a\"b\\c\r\n"), "abc");
        assert!(host_like("127.0.0.1:5000") && host_like("[::1]:80") && host_like("registry.example.com"));
        assert!(!host_like("evil\",x=\"y") && !host_like(""));
    }

    #[test]
    fn throttled_answers_carry_retry_after() {
        let r = throttled(Duration::from_millis(12_300));
        assert_eq!(r.status, 429);
        assert_eq!(r.get_header("Retry-After"), Some("13"));
        assert_eq!(r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("retry-after")).count(), 1);
    }
}
