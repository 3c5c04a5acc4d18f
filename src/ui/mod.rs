//! The web UI: server-rendered pages under `/ui/` on the registry listener. Plain functions
//! from a registry request to a response, over berth's own index: a page never contacts an
//! upstream and reads a bounded slice of the store (one page of names, one page of tags).
//! No JavaScript; templates and styles are compiled in.

mod pages;
mod session;

pub use session::Sessions;

use crate::auth::Action;
use crate::oci::{ErrorCode, OciError};
use crate::registry::{Body, Outcome, Registry, Request, RequestBody, Response, Target};
use minijinja::Environment;
use session::Viewer;
use std::sync::LazyLock;

/// Paths the UI answers; everything else is the registry API.
pub fn is_ui_path(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // Names ending in .html are auto-escaped (minijinja's default).
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("home.html", include_str!("templates/home.html")),
        ("repository.html", include_str!("templates/repository.html")),
        ("manifest.html", include_str!("templates/manifest.html")),
        ("confirm.html", include_str!("templates/confirm.html")),
        ("login.html", include_str!("templates/login.html")),
        ("gc.html", include_str!("templates/gc.html")),
        ("deliveries.html", include_str!("templates/deliveries.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        env.add_template(name, source).expect("embedded template parses");
    }
    env
});

const STYLE: &str = include_str!("templates/style.css");
const SCRIPT: &str = include_str!("templates/app.js");

/// A page that could not be shown, as the visitor will read it.
#[derive(Debug)]
pub struct UiError {
    pub status: u16,
    pub message: String,
}

impl UiError {
    pub fn new(status: u16, message: impl Into<String>) -> UiError {
        UiError { status, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> UiError {
        UiError::new(404, message)
    }
}

impl From<OciError> for UiError {
    fn from(e: OciError) -> UiError {
        UiError::new(e.status(), e.message)
    }
}

impl From<crate::store::StoreError> for UiError {
    fn from(e: crate::store::StoreError) -> UiError {
        OciError::from(e).into()
    }
}

fn title_of(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "Log in required",
        403 => "Not allowed",
        404 => "Not found",
        405 => "Method not allowed",
        413 => "Too large",
        429 => "Too many attempts",
        503 => "Storage unavailable",
        s if s >= 500 => "Something went wrong",
        _ => "Error",
    }
}

/// Handles a request for a UI path. Every failure is a readable page.
pub async fn handle(reg: &Registry, req: &Request<'_>, body: &mut dyn RequestBody, outcome: &mut Outcome) -> Response {
    outcome.route = "ui";
    if req.path == "/" || req.path == "/ui" {
        return redirect("/ui/");
    }
    let mut viewer = Viewer::of(&reg.ui, req);
    if let (Some(auth), Some(user), Some(id)) = (&reg.auth, viewer.user.clone(), viewer.session_id.clone()) {
        // Removed from htpasswd, or given a new password: logged out.
        if auth.entry_of(&user).await != viewer.entry {
            reg.ui.end(&id);
            viewer = Viewer::of(&reg.ui, req);
        }
    }
    outcome.user = viewer.user.clone();
    let resp = match pages::route(reg, req, body, &mut viewer, outcome).await {
        Ok(r) => r,
        Err(e) => {
            let ctx = serde_json::json!({"title": title_of(e.status), "status": e.status, "message": e.message});
            render(e.status, "error.html", &viewer, reg, req, ctx)
        }
    };
    viewer.set_cookies.drain(..).fold(resp, |r, c| r.header("Set-Cookie", c))
}

pub fn redirect(to: &str) -> Response {
    Response::new(303).header("Location", to.to_string()).header("Cache-Control", "no-store")
}

fn html_headers(r: Response) -> Response {
    r.header("Cache-Control", "no-store")
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "same-origin")
        .header("X-Frame-Options", "DENY")
        // No script runs on these pages, and forms post only back here.
        .header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        )
}

/// Renders `template` with `ctx` plus what every page shows (who is logged in, the form token).
fn render(status: u16, template: &str, viewer: &Viewer, reg: &Registry, req: &Request<'_>, mut ctx: serde_json::Value) -> Response {
    if let Some(obj) = ctx.as_object_mut() {
        obj.insert("user".into(), viewer.user.clone().into());
        obj.insert("csrf".into(), viewer.csrf.clone().into());
        obj.insert("auth_on".into(), reg.auth.is_some().into());
        obj.insert("may_collect".into(), pages::may_collect(reg, viewer).into());
        obj.insert("may_see_deliveries".into(), pages::may_see_deliveries(reg, viewer).into());
        obj.entry("q").or_insert_with(|| req.param("q").unwrap_or_default().into());
    }
    let html = TEMPLATES.get_template(template).and_then(|t| t.render(minijinja::Value::from_serialize(&ctx)));
    match html {
        Ok(html) => html_headers(Response::new(status))
            .header("Content-Type", "text/html; charset=utf-8")
            .body(Body::Full(html.into_bytes().into())),
        Err(e) => {
            tracing::error!(template, error = %e, "UI template failed");
            let e = OciError::msg(ErrorCode::Internal, format!("page {template} failed to render"));
            Response::error(&e)
        }
    }
}

/// Whether this visitor may do `action` on the repository: everything without `[auth]`, never
/// a write to a mirror.
fn may(reg: &Registry, viewer: &Viewer, target: &Target, action: Action) -> bool {
    if action == Action::Push && matches!(target, Target::Mirror { .. }) {
        return false;
    }
    let Some(auth) = &reg.auth else { return true };
    let rules = match target {
        Target::Hosted(repo) => auth.policy().hosted(repo.as_str()),
        Target::Mirror { upstream, .. } => auth.policy().mirror(&upstream.name),
    };
    rules.allows(viewer.user.as_deref(), action)
}

/// The store's name for a repository: mirrored ones as `<upstream>/<repo>`.
fn store_name(t: &Target) -> String {
    match t {
        Target::Hosted(r) => r.to_string(),
        Target::Mirror { upstream, repo } => format!("{}/{repo}", upstream.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_escape() {
        for name in TEMPLATES.templates().map(|(n, _)| n) {
            assert!(name.ends_with(".html"), "{name}");
        }
        let t = TEMPLATES.get_template("error.html").unwrap();
        let html = t
            .render(minijinja::Value::from_serialize(serde_json::json!({
                "title": "Not found", "status": 404, "message": "<script>x</script>", "csrf": "t", "auth_on": false, "q": ""
            })))
            .unwrap();
        assert!(html.contains("&lt;script&gt;x") && !html.contains("<script>"), "{html}");
    }

    #[test]
    fn ui_paths() {
        assert!(is_ui_path("/") && is_ui_path("/ui") && is_ui_path("/ui/r/team/app"));
        assert!(!is_ui_path("/v2/") && !is_ui_path("/uix") && !is_ui_path("/token"));
    }
}
