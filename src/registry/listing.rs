//! Content discovery: tags, catalog and referrers, with `n`/`last` pagination.

use super::{Registry, Request, Response};
use crate::oci::manifest::{Descriptor, OCI_INDEX};
use crate::oci::{Digest, ErrorCode, OciError};

pub const MAX_PAGE: usize = 1000;

fn page_params(req: &Request<'_>) -> Result<(Option<usize>, Option<String>), OciError> {
    let n = match req.param("n") {
        Some(v) => Some(v.parse::<usize>().map_err(|_| OciError::msg(ErrorCode::Unsupported, format!("n={v:?} is not a number")))?),
        None => None,
    };
    Ok((n, req.param("last")))
}

fn link(path: &str, n: Option<usize>, last: &str) -> String {
    let n = n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let last: String = url::form_urlencoded::byte_serialize(last.as_bytes()).collect();
    format!("<{path}?n={n}&last={last}>; rel=\"next\"")
}

/// Answers one page: `fetch(after, n)` reads it by range from the store.
pub fn paged_json(
    req: &Request<'_>,
    key: &str,
    name: Option<&str>,
    fetch: impl FnOnce(Option<&str>, usize) -> Result<(Vec<String>, bool), OciError>,
) -> Result<Response, OciError> {
    let (n, last) = page_params(req)?;
    let (items, more) = fetch(last.as_deref(), n.unwrap_or(MAX_PAGE).min(MAX_PAGE))?;
    Ok(page_response(req, key, name, n, &items, more))
}

fn page_response(req: &Request<'_>, key: &str, name: Option<&str>, n: Option<usize>, items: &[String], more: bool) -> Response {
    let mut obj = serde_json::Map::new();
    if let Some(name) = name {
        obj.insert("name".into(), name.into());
    }
    obj.insert(key.into(), items.to_vec().into());
    let mut r = Response::new(200).json(serde_json::to_vec(&obj).expect("json").into());
    // An empty page (n=0) has no last entry to continue from: a Link would point back at the
    // same page and a client following it would never stop.
    if more && !items.is_empty() {
        r = r.header("Link", link(req.path, n, items.last().map(String::as_str).unwrap_or("")));
    }
    r
}

pub fn tags(reg: &Registry, req: &Request<'_>, repo: &str) -> Result<Response, OciError> {
    paged_json(req, "tags", Some(repo), |last, n| {
        reg.store.tags(repo, last, n)?.ok_or_else(|| {
            OciError::msg(ErrorCode::NameUnknown, format!("repository {repo} is not known")).detail(serde_json::json!({"name": repo}))
        })
    })
}

pub fn catalog(reg: &Registry, req: &Request<'_>) -> Result<Response, OciError> {
    paged_json(req, "repositories", None, |last, n| Ok(reg.store.repositories(last, n)?))
}

pub fn referrers(reg: &Registry, req: &Request<'_>, repo: &str, subject: &Digest) -> Result<Response, OciError> {
    let mut list: Vec<Descriptor> = reg.store.referrers(repo, subject)?;
    let filter = req.param("artifactType");
    if let Some(t) = &filter {
        list.retain(|d| d.artifact_type.as_deref() == Some(t.as_str()));
    }
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list});
    let mut r =
        Response::new(200).header("Content-Type", OCI_INDEX).body(super::Body::Full(serde_json::to_vec(&body).expect("json").into()));
    if filter.is_some() {
        r = r.header("OCI-Filters-Applied", "artifactType");
    }
    Ok(r)
}
