//! Content discovery: tags, catalog and referrers, with `n`/`last` pagination.

use super::{Registry, Request, Response};
use crate::oci::manifest::{Descriptor, OCI_INDEX};
use crate::oci::{Digest, ErrorCode, OciError};

pub const MAX_PAGE: usize = 1000;

/// One page of a sorted list after `last`, and whether more follow.
fn page<'a>(items: &'a [String], n: Option<usize>, last: Option<&str>) -> (&'a [String], bool) {
    let start = match last {
        Some(l) => items.partition_point(|x| x.as_str() <= l),
        None => 0,
    };
    let rest = &items[start..];
    let n = n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    if rest.len() > n {
        (&rest[..n], true)
    } else {
        (rest, false)
    }
}

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

pub fn paged_json(req: &Request<'_>, key: &str, name: Option<&str>, items: &[String]) -> Result<Response, OciError> {
    let (n, last) = page_params(req)?;
    let (items, more) = page(items, n, last.as_deref());
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
    Ok(r)
}

pub fn tags(reg: &Registry, req: &Request<'_>, repo: &str) -> Result<Response, OciError> {
    let tags = reg.store.tags(repo).ok_or_else(|| {
        OciError::msg(ErrorCode::NameUnknown, format!("repository {repo} is not known")).detail(serde_json::json!({"name": repo}))
    })?;
    paged_json(req, "tags", Some(repo), &tags)
}

pub fn catalog(reg: &Registry, req: &Request<'_>) -> Result<Response, OciError> {
    paged_json(req, "repositories", None, &reg.store.repositories())
}

pub fn referrers(reg: &Registry, req: &Request<'_>, repo: &str, subject: &Digest) -> Result<Response, OciError> {
    let mut list: Vec<Descriptor> = reg.store.referrers(repo, subject);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let v: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(page(&v, Some(2), None), (&v[..2], true));
        assert_eq!(page(&v, Some(2), Some("b")), (&v[2..], false));
        assert_eq!(page(&v, Some(0), None), (&v[..0], true));
        assert_eq!(page(&v, None, Some("d")), (&v[4..], false));
        assert_eq!(page(&v, Some(5000), None).0.len(), 4);
    }
}
