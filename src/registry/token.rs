//! berth's token endpoint (`/token`), the realm of its challenges. It speaks both forms
//! clients use: `GET ?service=&scope=` with Basic credentials or none (docker, skopeo), and
//! the OAuth2 password grant as a `POST` form (containerd). The token grants the subset of
//! the requested scopes that the policy allows the caller.

use super::access::throttled;
use super::{Outcome, Registry, Request, RequestBody, Response};
use crate::auth::{Access, Refusal, Scope};
use crate::oci::{ErrorCode, OciError};
use bytes::BytesMut;
use http::Method;

/// A form body is a handful of fields; anything larger is not a token request.
const MAX_FORM: usize = 64 * 1024;
/// Bounds the work (name resolution) and the token size one request can cause.
const MAX_SCOPES: usize = 32;

fn form(s: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn first<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn unauthorized() -> Response {
    // The Basic challenge tells curl-like clients what to send; registry clients already know.
    Response::error(&OciError::msg(ErrorCode::Unauthorized, "incorrect username or password"))
        .header("WWW-Authenticate", "Basic realm=\"berth\"")
}

fn oauth_error(code: &str, description: &str) -> Response {
    let body = serde_json::json!({"error": code, "error_description": description});
    Response::new(400).json(serde_json::to_vec(&body).expect("json").into())
}

async fn read_form(body: &mut dyn RequestBody) -> Result<Vec<(String, String)>, OciError> {
    let mut buf = BytesMut::new();
    while let Some(c) = body.chunk().await? {
        if buf.len() + c.len() > MAX_FORM {
            return Err(OciError::msg(ErrorCode::TooLarge, "token request form is too large"));
        }
        buf.extend_from_slice(&c);
    }
    Ok(form(&buf))
}

pub(super) async fn handle(
    reg: &Registry,
    req: &Request<'_>,
    body: &mut dyn RequestBody,
    outcome: &mut Outcome,
) -> Result<Response, OciError> {
    outcome.route = "token";
    let Some(auth) = &reg.auth else {
        return Err(OciError::msg(ErrorCode::NameUnknown, "no token service: berth runs without [auth]"));
    };
    let post = match *req.method {
        Method::GET => false,
        Method::POST => true,
        _ => return Err(OciError::new(ErrorCode::MethodNotAllowed)),
    };
    let params = if post { read_form(body).await? } else { form(req.query.unwrap_or_default().as_bytes()) };
    if let Some(s) = first(&params, "service") {
        if s != auth.service {
            return Err(OciError::msg(ErrorCode::Denied, format!("this token service issues tokens for {:?}, not {s:?}", auth.service)));
        }
    }
    let user = if post {
        if first(&params, "grant_type") != Some("password") {
            return Ok(oauth_error("unsupported_grant_type", "berth issues tokens for grant_type=password only"));
        }
        let (Some(u), Some(p)) = (first(&params, "username"), first(&params, "password")) else {
            return Ok(oauth_error("invalid_request", "username and password are required"));
        };
        Some((u.to_string(), p.to_string()))
    } else {
        match req.header("authorization").filter(|h| !h.trim().is_empty()) {
            None => None,
            Some(h) => match crate::auth::basic_credentials(h) {
                Some(c) => Some(c),
                None => return Ok(unauthorized()),
            },
        }
    };
    if let Some((u, p)) = &user {
        match auth.check_password(u, p, req.client).await {
            Ok(()) => outcome.user = Some(u.clone()),
            Err(Refusal::Throttled(wait)) => {
                crate::metrics::AUTH_REJECTED.with_label_values(&["throttled"]).inc();
                return Ok(throttled(wait));
            }
            Err(_) => return Ok(unauthorized()),
        }
    }
    let user = user.as_ref().map(|(u, _)| u.as_str());
    let requested: Vec<&str> = params.iter().filter(|(k, _)| k == "scope").flat_map(|(_, v)| v.split_whitespace()).collect();
    let access = grant(reg, user, &requested);
    let scope = access.iter().map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(","))).collect::<Vec<_>>().join(" ");
    let issued = auth.issue(user, access);
    tracing::debug!(target: "auth", user = user.unwrap_or("-"), scope = %scope, "issued a token");
    let mut out = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": humantime::format_rfc3339_seconds(issued.issued_at).to_string(),
    });
    if post {
        out["scope"] = scope.into();
    }
    // Tokens are credentials: no cache may keep them.
    Ok(Response::new(200).json(serde_json::to_vec(&out).expect("json").into()).header("Cache-Control", "no-store"))
}

/// The part of `requested` the policy gives `user`. Unknown, malformed and refused scopes are
/// left out rather than failing the request, as Docker Hub's token service does.
fn grant(reg: &Registry, user: Option<&str>, requested: &[&str]) -> Vec<Access> {
    let mut out: Vec<Access> = Vec::new();
    for s in requested.iter().take(MAX_SCOPES).filter_map(|s| Scope::parse(s)) {
        let actions = match s.kind.as_str() {
            "repository" => match reg.resolve(&s.name, None) {
                Ok(t) => reg.rules_for(&t).grant(user, &s.actions),
                Err(_) => continue,
            },
            "registry" if s.name == "catalog" && user.is_some() => vec!["*".to_string()],
            _ => continue,
        };
        if actions.is_empty() {
            continue;
        }
        match out.iter_mut().find(|a| a.kind == s.kind && a.name == s.name) {
            Some(a) => {
                let new: Vec<String> = actions.into_iter().filter(|x| !a.actions.contains(x)).collect();
                a.actions.extend(new);
            }
            None => out.push(Access { kind: s.kind, name: s.name, actions }),
        }
    }
    out
}
