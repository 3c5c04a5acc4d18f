//! The pages: what each one reads from the index, and the forms that change it.

use super::session::{self, Viewer};
use super::{may, redirect, render, store_name, UiError, SCRIPT, STYLE};
use crate::auth::{Action, Refusal};
use crate::oci::{Digest, Tag};
use crate::registry::{Body, Outcome, Registry, Request, RequestBody, Response, Target};
use http::Method;
use serde_json::{json, Value};

/// Repositories on one home page, and tags on one repository page.
const PAGE: usize = 50;
/// Names a search looks at per page view; past this it offers to go on from where it stopped.
const SCAN_LIMIT: usize = 5000;
/// Tags counted per repository on the home page; more shows as "100+".
const TAG_COUNT_LIMIT: usize = 100;
/// Config blobs larger than this are not read for the page.
const CONFIG_LIMIT: u64 = 1 << 20;
/// Form bodies larger than this are refused.
const FORM_LIMIT: usize = 16 << 10;

pub async fn route(
    reg: &Registry,
    req: &Request<'_>,
    body: &mut dyn RequestBody,
    viewer: &mut Viewer,
    outcome: &mut Outcome,
) -> Result<Response, UiError> {
    let get = matches!(*req.method, Method::GET | Method::HEAD);
    let post = *req.method == Method::POST;
    let rest = req.path.strip_prefix("/ui/").unwrap_or_default();
    if rest == "static/style.css" && get {
        return Ok(Response::new(200)
            .header("Content-Type", "text/css; charset=utf-8")
            .header("Cache-Control", "max-age=3600")
            .body(Body::Full(STYLE.as_bytes().into())));
    }
    if rest == "static/app.js" && get {
        return Ok(Response::new(200)
            .header("Content-Type", "text/javascript; charset=utf-8")
            .header("Cache-Control", "max-age=3600")
            .body(Body::Full(SCRIPT.as_bytes().into())));
    }
    if rest.is_empty() && get {
        return home(reg, req, viewer);
    }
    if rest == "login" {
        return match (get, post) {
            (true, _) => login_form(reg, req, viewer, None, 200),
            (_, true) => login(reg, req, body, viewer).await,
            _ => Err(method_not_allowed()),
        };
    }
    if rest == "logout" && post {
        let form = read_form(body).await?;
        check_form(viewer, &form)?;
        if let Some(id) = viewer.session_id.take() {
            reg.ui.end(&id);
        }
        viewer.set_cookies.push(session::cookie(req, session::SESSION_COOKIE, "", Some(std::time::Duration::ZERO)));
        return Ok(redirect("/ui/"));
    }
    if rest == "gc" {
        return gc(reg, req, body, viewer, post).await;
    }
    if rest == "deliveries" {
        return if get { deliveries(reg, req, viewer) } else { Err(method_not_allowed()) };
    }
    let Some(repo_path) = rest.strip_prefix("r/") else {
        return Err(UiError::not_found(format!("There is no page {}.", req.path)));
    };
    let (name, action) = match repo_path.split_once("/-/") {
        Some((name, action)) => (name, Some(action)),
        None => (repo_path, None),
    };
    let target = visible_repo(reg, viewer, name)?;
    outcome.repository = Some(name.to_string());
    match action.and_then(|a| a.split_once('/')) {
        None if action.is_none() && get => repository(reg, req, viewer, name, &target).await,
        Some(("tag", t)) if get => {
            let tag = parse_tag(t)?;
            let d = reg.store.tag_digest(name, tag.as_str())?.ok_or_else(|| no_tag(name, tag.as_str()))?;
            manifest(reg, req, viewer, name, &target, &d, Some(tag.as_str())).await
        }
        Some(("manifest", d)) if get => manifest(reg, req, viewer, name, &target, &parse_digest(d)?, None).await,
        Some(("delete-tag", t)) if get || post => {
            let tag = parse_tag(t)?;
            delete_tag(reg, req, body, viewer, name, &target, tag.as_str(), post).await
        }
        Some(("delete-manifest", d)) if get || post => {
            delete_manifest(reg, req, body, viewer, name, &target, &parse_digest(d)?, post).await
        }
        Some(("tag" | "manifest" | "delete-tag" | "delete-manifest", _)) => Err(method_not_allowed()),
        _ => Err(UiError::not_found(format!("There is no page {}.", req.path))),
    }
}

fn method_not_allowed() -> UiError {
    UiError::new(405, "This page does not take that kind of request.")
}

fn parse_tag(t: &str) -> Result<Tag, UiError> {
    Tag::parse(t).ok_or_else(|| UiError::new(400, format!("{t:?} is not a valid tag.")))
}

fn parse_digest(d: &str) -> Result<Digest, UiError> {
    Digest::parse(d).map_err(|_| UiError::new(400, format!("{d:?} is not a valid digest.")))
}

fn no_tag(repo: &str, tag: &str) -> UiError {
    UiError::not_found(format!("{repo} has no tag {tag}."))
}

/// The repository a page names, if it exists and this visitor may pull from it. Anything
/// else is the same 404, so a private repository looks exactly like a missing one.
fn visible_repo(reg: &Registry, viewer: &Viewer, name: &str) -> Result<Target, UiError> {
    let missing = || UiError::not_found(format!("There is no repository {name} here."));
    match visible_name(reg, viewer, name) {
        Some(target) if reg.store.meta().repo_exists(name)? => Ok(target),
        _ => Err(missing()),
    }
}

/// Where a stored repository name lives, if this visitor may pull from it.
fn visible_name(reg: &Registry, viewer: &Viewer, name: &str) -> Option<Target> {
    let target = reg.resolve(name, None).ok()?;
    (store_name(&target) == name && may(reg, viewer, &target, Action::Pull)).then_some(target)
}

/// Which group a repository is listed under on the home page.
fn group_of(reg: &Registry, target: &Target) -> (u8, String) {
    match target {
        Target::Hosted(r) => {
            let ns = reg.config.namespaces.iter().filter(|n| n.matches(r.as_str())).max_by_key(|n| n.prefix.len());
            (0, ns.map_or_else(|| r.to_string(), |n| n.prefix.clone()))
        }
        Target::Mirror { upstream, .. } => (1, upstream.name.clone()),
    }
}

fn home(reg: &Registry, req: &Request<'_>, viewer: &Viewer) -> Result<Response, UiError> {
    let q = req.param("q").unwrap_or_default().trim().to_string();
    let after = req.param("after").filter(|a| !a.is_empty());
    let mut rows: Vec<(String, Target)> = Vec::new();
    let (mut cursor, mut scanned, mut next) = (after.clone(), 0usize, None::<String>);
    'scan: loop {
        let (names, more) = reg.store.repositories(cursor.as_deref(), 500)?;
        for name in names {
            if scanned == SCAN_LIMIT {
                next = cursor.clone();
                break 'scan;
            }
            scanned += 1;
            let wanted = q.is_empty() || name.contains(q.as_str());
            // Names come from the store: no existence check per name.
            if let Some(t) = wanted.then(|| visible_name(reg, viewer, &name)).flatten() {
                if rows.len() == PAGE {
                    next = rows.last().map(|r| r.0.clone());
                    break 'scan;
                }
                rows.push((name.clone(), t));
            }
            cursor = Some(name);
        }
        if !more {
            break;
        }
    }
    let mut groups: std::collections::BTreeMap<(u8, String), Vec<Value>> = Default::default();
    for (name, target) in &rows {
        let count = match reg.store.tags(name, None, TAG_COUNT_LIMIT)? {
            Some((t, true)) => format!("{}+", t.len()),
            Some((t, false)) => t.len().to_string(),
            None => "0".into(),
        };
        let sum = reg.store.repository_summary(name)?;
        groups.entry(group_of(reg, target)).or_default().push(json!({
            "name": name,
            "tags": count,
            "size": human(sum.bytes),
            "pushed": sum.updated_ms.map(date),
            "pulled": reg.pulls.repository(name).map(date),
        }));
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|((kind, label), repos)| json!({"kind": if kind == 0 { "hosted" } else { "mirror" }, "label": label, "repos": repos}))
        .collect();
    let next = next.map(|n| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        if !q.is_empty() {
            s.append_pair("q", &q);
        }
        format!("/ui/?{}", s.append_pair("after", &n).finish())
    });
    let ctx =
        json!({"title": "Repositories", "groups": groups, "next": next, "paged": after.is_some(), "cache": cache_glance(reg, viewer)?});
    Ok(render(200, "home.html", viewer, reg, req, ctx))
}

/// Cache and storage figures that cost nothing to read: the store's counters and the metrics.
/// Hosted bytes only for visitors who are not anonymous under `[auth]`.
fn cache_glance(reg: &Registry, viewer: &Viewer) -> Result<Value, UiError> {
    use crate::metrics::{CACHE_REQUESTS, SERVED_BYTES};
    let usage = reg.store.usage()?;
    let count = |result: &str| ["manifest", "blob"].iter().map(|k| CACHE_REQUESTS.with_label_values(&[k, result]).get()).sum::<u64>();
    let (hits, misses) = (count("hit") + count("coalesced"), count("miss"));
    let ratio = (hits + misses > 0).then(|| format!("{:.0}%", 100.0 * hits as f64 / (hits + misses) as f64));
    Ok(json!({
        "cache_bytes": human(usage.cache),
        "cache_limit": reg.config.storage.max_cache_bytes.map(human),
        "hosted_bytes": (reg.auth.is_none() || viewer.user.is_some()).then(|| human(usage.hosted)),
        "hits": hits,
        "misses": misses,
        "ratio": ratio,
        "served_cache": human(SERVED_BYTES.with_label_values(&["cache"]).get()),
        "served_upstream": human(SERVED_BYTES.with_label_values(&["upstream"]).get()),
        "fills": reg.mirror.fills.in_flight(),
        "upstreams": reg
            .config
            .upstreams
            .iter()
            .map(|u| {
                let (state, remaining) = reg.mirror.upstream_health(&u.name);
                let state = match state {
                    0 => "up",
                    1 => "probing after failures",
                    _ => "failing: served from the cache",
                };
                json!({"name": u.name, "url": u.url.as_str(), "state": state, "remaining": remaining})
            })
            .collect::<Vec<_>>(),
    }))
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn date(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string().replace('T', " ")
}

fn short(d: &str) -> String {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    hex.chars().take(12).collect()
}

fn platform_of(v: &Value) -> Option<String> {
    let os = v.get("os")?.as_str()?;
    let arch = v.get("architecture")?.as_str()?;
    Some(match v.get("variant").and_then(Value::as_str) {
        Some(var) => format!("{os}/{arch}/{var}"),
        None => format!("{os}/{arch}"),
    })
}

/// A stored blob's JSON, when it is here and small: never fetched from anywhere.
async fn small_json_blob(reg: &Registry, d: &str) -> Option<Value> {
    let d = Digest::parse(d).ok()?;
    if reg.store.blob_size(&d).ok()?.is_none_or(|n| n > CONFIG_LIMIT) {
        return None;
    }
    let s = reg.store.clone();
    let bytes = crate::store::blocking(move || s.blobs().read(&d)).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// A manifest's stored JSON.
async fn manifest_json(reg: &Registry, d: &Digest) -> Result<Option<(bytes::Bytes, Value)>, UiError> {
    let Some(bytes) = reg.store.manifest_body(d).await? else { return Ok(None) };
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Some((bytes, v)))
}

/// What the tag list says about a manifest.
#[derive(Default)]
struct Summary {
    /// Each platform with the size of its image (config and layers), where it is stored.
    platforms: Vec<(String, Option<u64>)>,
    /// An image's size (not an index's: its platforms' sizes say more).
    size: Option<u64>,
    /// When the image was built, as its config says (for an index, its first platform's).
    created: Option<String>,
}

impl Summary {
    fn platforms_text(&self) -> Vec<String> {
        self.platforms.iter().map(|(p, size)| size.map_or_else(|| p.clone(), |n| format!("{p} ({})", human(n)))).collect()
    }
}

/// An image manifest's platform, size and creation date, from its JSON and its config.
async fn image_summary(reg: &Registry, v: &Value) -> (Option<String>, u64, Option<String>) {
    let size = |x: &Value| x.get("size").and_then(Value::as_u64).unwrap_or(0);
    let layers = v.get("layers").and_then(Value::as_array).map_or(0, |l| l.iter().map(size).sum::<u64>());
    let config = v.get("config");
    let total = layers + config.map_or(0, size);
    let cfg = match config.and_then(|c| c.get("digest")).and_then(Value::as_str) {
        Some(d) => small_json_blob(reg, d).await,
        None => None,
    };
    let created = cfg.as_ref().and_then(|c| c.get("created")).and_then(Value::as_str).map(created_date);
    (cfg.as_ref().and_then(platform_of), total, created)
}

/// A config's RFC 3339 `created`, to the second, shown like the other dates (a UTC one is the
/// common case); as written when it is not RFC 3339.
fn created_date(s: &str) -> String {
    match s.get(..19) {
        Some(p) if p.as_bytes().get(10) == Some(&b'T') => {
            format!("{}{}", p.replace('T', " "), if s.ends_with('Z') { "Z" } else { "" })
        }
        _ => s.to_string(),
    }
}

async fn summary(reg: &Registry, d: &Digest) -> Result<Summary, UiError> {
    let Some((_, v)) = manifest_json(reg, d).await? else { return Ok(Summary::default()) };
    let Some(children) = v.get("manifests").and_then(Value::as_array) else {
        let (platform, size, created) = image_summary(reg, &v).await;
        return Ok(Summary { platforms: platform.map(|p| (p, Some(size))).into_iter().collect(), size: Some(size), created });
    };
    let mut out = Summary::default();
    for c in children {
        // Attestation entries of buildx carry unknown/unknown: not a platform to pull.
        let Some(p) = c.get("platform").and_then(platform_of).filter(|p| !p.starts_with("unknown/")) else { continue };
        let child = match c.get("digest").and_then(Value::as_str).and_then(|d| Digest::parse(d).ok()) {
            Some(cd) => manifest_json(reg, &cd).await?,
            None => None,
        };
        // A sparse index or a mirror that has not fetched this platform: no size to tell.
        let (size, created) = match &child {
            Some((_, cv)) => {
                let (_, size, created) = image_summary(reg, cv).await;
                (Some(size), created)
            }
            None => (None, None),
        };
        if out.created.is_none() {
            out.created = created;
        }
        out.platforms.push((p, size));
    }
    Ok(out)
}

/// The host clients reach berth at, from the request (a hostile Host header yields the
/// placeholder).
fn host(req: &Request<'_>) -> String {
    req.header("host")
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)))
        .unwrap_or("berth.example:5000")
        .to_string()
}

/// Copy-ready pull commands for `reference` (`:tag` or `@digest`).
fn pull_commands(req: &Request<'_>, target: &Target, reference: &str) -> Value {
    let host = host(req);
    let scheme = if req.tls { "https" } else { "http" };
    let (podman_flag, ctr_flag) = if req.tls { ("", "") } else { ("--tls-verify=false ", "--plain-http ") };
    match target {
        Target::Hosted(r) => json!({
            "docker": format!("docker pull {host}/{r}{reference}"),
            "podman": format!("podman pull {podman_flag}{host}/{r}{reference}"),
            "hosts_path": format!("/etc/containerd/certs.d/{host}/hosts.toml"),
            "hosts_toml": format!("server = \"{scheme}://{host}\"\n\n[host.\"{scheme}://{host}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]"),
            "ctr": format!("ctr images pull {ctr_flag}--hosts-dir /etc/containerd/certs.d {host}/{r}{reference}"),
        }),
        Target::Mirror { upstream, repo } => json!({
            "docker": format!("docker pull {host}/{}/{repo}{reference}", upstream.name),
            "podman": format!("podman pull {podman_flag}{host}/{}/{repo}{reference}", upstream.name),
            "hosts_path": format!("/etc/containerd/certs.d/{}/hosts.toml", upstream.name),
            "hosts_toml": format!("server = \"{}\"\n\n[host.\"{scheme}://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]", upstream.url.as_str().trim_end_matches('/')),
            "ctr": format!("ctr images pull --hosts-dir /etc/containerd/certs.d {}/{repo}{reference}", upstream.name),
        }),
    }
}

async fn repository(reg: &Registry, req: &Request<'_>, viewer: &Viewer, name: &str, target: &Target) -> Result<Response, UiError> {
    let after = req.param("after").filter(|a| !a.is_empty());
    let (tags, more) = reg.store.tags(name, after.as_deref(), PAGE)?.unwrap_or_default();
    let mut rows = Vec::new();
    for t in &tags {
        let Some(rec) = reg.store.meta().tag(name, t)? else { continue };
        let meta = reg.store.manifest_meta(name, &rec.digest)?;
        let sum = summary(reg, &rec.digest).await?;
        rows.push(json!({
            "tag": t,
            "digest": rec.digest.to_string(),
            "short": short(&rec.digest.to_string()),
            "media_type": meta.as_ref().map(|m| m.media_type.clone()),
            "platforms": sum.platforms_text(),
            "size": sum.size.map(human),
            "created": sum.created,
            "pushed": date(rec.updated_ms),
            "pulled": reg.pulls.tag(name, t).map(date),
            "checked": checked(reg, target, name, t),
        }));
    }
    let example = tags.iter().find(|t| *t == "latest").or(tags.first()).map_or(":latest".to_string(), |t| format!(":{t}"));
    let ctx = json!({
        "title": name,
        "name": name,
        "kind": if matches!(target, Target::Hosted(_)) { "hosted" } else { "mirror" },
        "tags": rows,
        "next": (more && !tags.is_empty()).then(|| format!("/ui/r/{name}?after={}", tags.last().map(String::as_str).unwrap_or(""))),
        "pull": pull_commands(req, target, &example),
        "may_push": may(reg, viewer, target, Action::Push),
        "deleted": req.param("deleted"),
    });
    Ok(render(200, "repository.html", viewer, reg, req, ctx))
}

/// For a mirrored tag: whether berth trusts it now (within `tag_ttl` of its last check against
/// the upstream) and how long ago that check was.
fn checked(reg: &Registry, target: &Target, name: &str, tag: &str) -> Option<String> {
    let Target::Mirror { upstream, .. } = target else { return None };
    Some(match reg.mirror.tag_checked_ago(name, tag) {
        Some(ago) if ago < upstream.tag_ttl => format!("fresh (checked {}s ago)", ago.as_secs()),
        Some(ago) => format!("stale (checked {}s ago)", ago.as_secs()),
        None => "stale (not checked since start)".to_string(),
    })
}

fn string_map(v: Option<&Value>) -> Vec<Value> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| json!({"key": k, "value": v.as_str().map_or_else(|| v.to_string(), str::to_string)})).collect())
        .unwrap_or_default()
}

fn string_list(v: Option<&Value>) -> Option<String> {
    let items = v?.as_array()?;
    Some(items.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string)).collect::<Vec<_>>().join(" "))
}

async fn manifest(
    reg: &Registry,
    req: &Request<'_>,
    viewer: &Viewer,
    name: &str,
    target: &Target,
    d: &Digest,
    tag: Option<&str>,
) -> Result<Response, UiError> {
    let missing = || UiError::not_found(format!("{name} has no manifest {d}."));
    let meta = reg.store.manifest_meta(name, d)?.ok_or_else(missing)?;
    let (bytes, v) = manifest_json(reg, d).await?.ok_or_else(missing)?;
    let href = |child: &str| format!("/ui/r/{name}/-/manifest/{child}");
    let mut ctx = json!({
        "title": format!("{name}{}", tag.map_or_else(|| format!("@{}", short(&d.to_string())), |t| format!(":{t}"))),
        "name": name,
        "tag": tag,
        "digest": d.to_string(),
        "media_type": meta.media_type,
        // Images report their config type as artifact type; only artifacts are worth naming.
        "artifact_type": meta.artifact_type.as_deref().filter(|t| !t.contains("container.image") && !t.contains("image.config")),
        "size": human(meta.size),
        "annotations": string_map(v.get("annotations")),
        "pull": pull_commands(req, target, &tag.map_or_else(|| format!("@{d}"), |t| format!(":{t}"))),
        "may_push": may(reg, viewer, target, Action::Push),
        "raw": serde_json::to_string_pretty(&v).unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned()),
    });
    let obj = ctx.as_object_mut().expect("object");
    if let Some(s) = v.get("subject").and_then(|s| s.get("digest")).and_then(Value::as_str) {
        obj.insert("subject".into(), json!({"digest": s, "href": href(s)}));
    }
    if let Some(children) = v.get("manifests").and_then(Value::as_array) {
        let mut rows = Vec::new();
        for c in children {
            let cd = c.get("digest").and_then(Value::as_str).unwrap_or_default();
            let stored = Digest::parse(cd).ok().map(|x| reg.store.manifest_meta(name, &x)).transpose()?.flatten().is_some();
            rows.push(json!({
                "platform": c.get("platform").and_then(platform_of).unwrap_or_else(|| "—".into()),
                "digest": cd,
                "short": short(cd),
                "media_type": c.get("mediaType"),
                "artifact_type": c.get("artifactType"),
                "size": c.get("size").and_then(Value::as_u64).map(human),
                "href": stored.then(|| href(cd)),
            }));
        }
        obj.insert("children".into(), rows.into());
    }
    if let Some(layers) = v.get("layers").and_then(Value::as_array) {
        let rows: Vec<Value> = layers
            .iter()
            .map(|l| {
                let ld = l.get("digest").and_then(Value::as_str).unwrap_or_default();
                json!({"digest": ld, "short": short(ld), "media_type": l.get("mediaType"),
                    "size": l.get("size").and_then(Value::as_u64).map(human)})
            })
            .collect();
        obj.insert("layers".into(), rows.into());
    }
    if let Some(cfg) = v.get("config") {
        let cd = cfg.get("digest").and_then(Value::as_str).unwrap_or_default();
        let mut c = json!({"digest": cd, "short": short(cd), "media_type": cfg.get("mediaType"),
            "size": cfg.get("size").and_then(Value::as_u64).map(human)});
        if let Some(body) = small_json_blob(reg, cd).await {
            let inner = body.get("config").cloned().unwrap_or(Value::Null);
            let history: Vec<Value> = body
                .get("history")
                .and_then(Value::as_array)
                .map(|h| {
                    h.iter()
                        .map(|e| {
                            json!({"created": e.get("created"), "created_by": e.get("created_by").or(e.get("comment")),
                                "empty": e.get("empty_layer").and_then(Value::as_bool).unwrap_or(false)})
                        })
                        .collect()
                })
                .unwrap_or_default();
            let details = json!({
                "platform": platform_of(&body),
                "created": body.get("created"),
                "env": inner.get("Env").and_then(Value::as_array).map(|e| e.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>()),
                "entrypoint": string_list(inner.get("Entrypoint")),
                "cmd": string_list(inner.get("Cmd")),
                "workdir": inner.get("WorkingDir").and_then(Value::as_str).filter(|s| !s.is_empty()),
                "user": inner.get("User").and_then(Value::as_str).filter(|s| !s.is_empty()),
                "labels": string_map(inner.get("Labels")),
                "history": history,
            });
            c.as_object_mut().expect("object").insert("details".into(), details);
        } else {
            c.as_object_mut().expect("object").insert("absent".into(), true.into());
        }
        obj.insert("config".into(), c);
    }
    let referrers: Vec<Value> = reg
        .store
        .referrers(name, d)?
        .into_iter()
        .map(|r| {
            json!({"digest": r.digest, "short": short(&r.digest), "href": href(&r.digest),
                "artifact_type": r.artifact_type.or(r.media_type), "size": human(r.size.max(0) as u64)})
        })
        .collect();
    obj.insert("referrers".into(), referrers.into());
    Ok(render(200, "manifest.html", viewer, reg, req, ctx))
}

async fn read_form(body: &mut dyn RequestBody) -> Result<Vec<(String, String)>, UiError> {
    let mut buf = Vec::new();
    while let Some(c) = body.chunk().await? {
        if buf.len() + c.len() > FORM_LIMIT {
            return Err(UiError::new(413, "The form was larger than any form these pages send."));
        }
        buf.extend_from_slice(&c);
    }
    Ok(url::form_urlencoded::parse(&buf).into_owned().collect())
}

fn field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn check_form(viewer: &Viewer, form: &[(String, String)]) -> Result<(), UiError> {
    if viewer.form_ok(field(form, "csrf")) {
        return Ok(());
    }
    Err(UiError::new(403, "This form has expired or did not come from these pages. Go back, reload the page and try again."))
}

/// Refuses a change this visitor may not make: 404 when they may not even see the repository
/// (callers check that first), 403 otherwise, pointing anonymous visitors at the login.
fn check_push(reg: &Registry, viewer: &Viewer, target: &Target, name: &str) -> Result<(), UiError> {
    if may(reg, viewer, target, Action::Push) {
        return Ok(());
    }
    Err(match (target, &viewer.user) {
        (Target::Mirror { .. }, _) => UiError::new(403, format!("{name} is a read-only mirror.")),
        (_, None) => UiError::new(403, format!("Log in as a user who may push to {name} to change it.")),
        (_, Some(u)) => UiError::new(403, format!("{u} may not push to {name}.")),
    })
}

#[allow(clippy::too_many_arguments)]
async fn delete_tag(
    reg: &Registry,
    req: &Request<'_>,
    body: &mut dyn RequestBody,
    viewer: &Viewer,
    name: &str,
    target: &Target,
    tag: &str,
    post: bool,
) -> Result<Response, UiError> {
    check_push(reg, viewer, target, name)?;
    let d = reg.store.tag_digest(name, tag)?.ok_or_else(|| no_tag(name, tag))?;
    let immutable = reg.immutable_of(name)(tag);
    if post {
        let form = read_form(body).await?;
        check_form(viewer, &form)?;
        if !reg.store.delete_tag(name, tag, immutable).await? {
            return Err(no_tag(name, tag));
        }
        return Ok(redirect(&format!("/ui/r/{name}?deleted={tag}")));
    }
    let others: Vec<String> =
        reg.store.meta().tags_with_times(name)?.into_iter().filter(|(t, r)| r.digest == d && t != tag).map(|(t, _)| t).collect();
    let ctx = json!({
        "title": format!("Delete {name}:{tag}"),
        "name": name,
        "what": format!("tag {tag}"),
        "digest": d.to_string(),
        "action": format!("/ui/r/{name}/-/delete-tag/{tag}"),
        "back": format!("/ui/r/{name}/-/tag/{tag}"),
        "immutable": immutable,
        "others": others,
        "explain": "Only the tag goes: the manifest stays, under its digest and any other tags.",
    });
    Ok(render(200, "confirm.html", viewer, reg, req, ctx))
}

#[allow(clippy::too_many_arguments)]
async fn delete_manifest(
    reg: &Registry,
    req: &Request<'_>,
    body: &mut dyn RequestBody,
    viewer: &Viewer,
    name: &str,
    target: &Target,
    d: &Digest,
    post: bool,
) -> Result<Response, UiError> {
    check_push(reg, viewer, target, name)?;
    if reg.store.manifest_meta(name, d)?.is_none() {
        return Err(UiError::not_found(format!("{name} has no manifest {d}.")));
    }
    if post {
        let form = read_form(body).await?;
        check_form(viewer, &form)?;
        if !reg.store.delete_manifest(name, d, reg.immutable_of(name)).await? {
            return Err(UiError::not_found(format!("{name} has no manifest {d}.")));
        }
        return Ok(redirect(&format!("/ui/r/{name}?deleted={}", short(&d.to_string()))));
    }
    let tags: Vec<String> = reg.store.meta().tags_with_times(name)?.into_iter().filter(|(_, r)| r.digest == *d).map(|(t, _)| t).collect();
    let ctx = json!({
        "title": format!("Delete {name}@{}", short(&d.to_string())),
        "name": name,
        "what": format!("manifest {d}"),
        "digest": d.to_string(),
        "action": format!("/ui/r/{name}/-/delete-manifest/{d}"),
        "back": format!("/ui/r/{name}/-/manifest/{d}"),
        "others": tags,
        "others_go": true,
        "explain": "The manifest goes with every tag that points at it; garbage collection frees blobs nothing else uses.",
    });
    Ok(render(200, "confirm.html", viewer, reg, req, ctx))
}

fn login_form(reg: &Registry, req: &Request<'_>, viewer: &Viewer, error: Option<&str>, status: u16) -> Result<Response, UiError> {
    if reg.auth.is_none() {
        return Err(UiError::not_found("Access control is off: there is nothing to log in to."));
    }
    let ctx = json!({"title": "Log in", "error": error});
    Ok(render(status, "login.html", viewer, reg, req, ctx))
}

async fn login(reg: &Registry, req: &Request<'_>, body: &mut dyn RequestBody, viewer: &mut Viewer) -> Result<Response, UiError> {
    let Some(auth) = &reg.auth else { return login_form(reg, req, viewer, None, 404) };
    let form = read_form(body).await?;
    check_form(viewer, &form)?;
    let (user, password) = (field(&form, "username").unwrap_or_default(), field(&form, "password").unwrap_or_default());
    match auth.check_password(user, password, req.client).await {
        Ok(()) => {
            // Logging in again replaces the session instead of leaving the old one alive.
            if let Some(old) = viewer.session_id.take() {
                reg.ui.end(&old);
            }
            let id = reg.ui.create(user, auth.entry_of(user).await);
            viewer.set_cookies.push(session::cookie(req, session::SESSION_COOKIE, &id, None));
            Ok(redirect("/ui/"))
        }
        Err(Refusal::Throttled(wait)) => {
            Err(UiError::new(429, format!("Too many failed logins from this address; try again in {}s.", wait.as_secs().max(1))))
        }
        Err(_) => login_form(reg, req, viewer, Some("Incorrect username or password."), 401),
    }
}

/// Who may run a collection from the pages: anyone without `[auth]`, else users who may push
/// to some hosted namespace.
pub fn may_collect(reg: &Registry, viewer: &Viewer) -> bool {
    let Some(auth) = &reg.auth else { return true };
    viewer.user.is_some()
        && reg.config.namespaces.iter().any(|n| auth.policy().hosted(&n.prefix).allows(viewer.user.as_deref(), Action::Push))
}

async fn gc(reg: &Registry, req: &Request<'_>, body: &mut dyn RequestBody, viewer: &Viewer, post: bool) -> Result<Response, UiError> {
    if !may_collect(reg, viewer) {
        return Err(UiError::new(403, "Log in as a user who may push to run a garbage collection dry run."));
    }
    let mut ctx = json!({"title": "Garbage collection"});
    if post {
        let form = read_form(body).await?;
        check_form(viewer, &form)?;
        let report = reg.gc(true).await?;
        // Names of repositories this visitor may not see stay hidden; the totals are the store's.
        let visible = |entry: &String| {
            let repo = entry.split_once('@').map_or_else(|| entry.rsplit_once(':').map_or(entry.as_str(), |(r, _)| r), |(r, _)| r);
            visible_repo(reg, viewer, repo).is_ok()
        };
        ctx["report"] = json!({
            "tags": report.tags_removed.iter().filter(|e| visible(e)).collect::<Vec<_>>(),
            "manifests": report.manifests_removed.iter().filter(|e| visible(e)).collect::<Vec<_>>(),
            "tags_total": report.tags_removed.len(),
            "manifests_total": report.manifests_removed.len(),
            "links": report.links_removed,
            "blobs": report.blobs_removed,
            "bytes": human(report.bytes_freed),
        });
    } else if *req.method != Method::GET && *req.method != Method::HEAD {
        return Err(method_not_allowed());
    }
    Ok(render(200, "gc.html", viewer, reg, req, ctx))
}

/// Whether the visitor sees recent deliveries: only where a webhook or replication rule
/// delivers, and to those who may run a collection.
pub fn may_see_deliveries(reg: &Registry, viewer: &Viewer) -> bool {
    reg.events.delivers() && may_collect(reg, viewer)
}

/// The latest state of each delivery this process made (what the admin listener's
/// `/events/deliveries` lists), newest first.
fn deliveries(reg: &Registry, req: &Request<'_>, viewer: &Viewer) -> Result<Response, UiError> {
    if !reg.events.delivers() {
        return Err(UiError::not_found("No webhook or replication is configured, so nothing is delivered from here."));
    }
    if !may_collect(reg, viewer) {
        return Err(UiError::new(403, "Log in as a user who may push to see recent deliveries."));
    }
    let rows: Vec<Value> = reg
        .events
        .recent()
        .into_iter()
        // Events about repositories this visitor may not see stay hidden, as on the GC page.
        .filter(|d| d.subject.as_deref().is_none_or(|s| visible_name(reg, viewer, s).is_some()))
        .take(PAGE)
        .map(|d| {
            json!({
                "time": d.time,
                "kind": d.kind,
                "subject": d.subject,
                "to": d.webhook,
                "status": d.status,
                "code": d.code,
                "attempts": d.attempts,
                "error": d.error,
            })
        })
        .collect();
    Ok(render(200, "deliveries.html", viewer, reg, req, json!({"title": "Recent deliveries", "deliveries": rows})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_dates_digests() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(date(0), "1970-01-01 00:00:00Z");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(platform_of(&json!({"os": "linux", "architecture": "arm64", "variant": "v8"})).as_deref(), Some("linux/arm64/v8"));
    }
}
