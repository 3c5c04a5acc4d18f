//! Request line -> typed route. The raw path is screened for traversal tricks before anything
//! is split, so later layers only ever see validated names and digests.

use super::{Digest, ErrorCode, OciError, Reference};

/// The endpoints of the distribution API, with the repository name still raw: the caller
/// first strips a registry prefix (mirror routing) and then validates it as a `RepoName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Base,
    Catalog,
    Manifest { name: String, reference: Reference },
    Blob { name: String, digest: Digest },
    UploadStart { name: String },
    Upload { name: String, uuid: String },
    TagsList { name: String },
    Referrers { name: String, digest: Digest },
}

impl Endpoint {
    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::Manifest { .. } => "manifest",
            Endpoint::Blob { .. } => "blob",
            Endpoint::UploadStart { .. } | Endpoint::Upload { .. } => "upload",
            Endpoint::TagsList { .. } => "tags",
            Endpoint::Referrers { .. } => "referrers",
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Endpoint::Base | Endpoint::Catalog => None,
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::UploadStart { name }
            | Endpoint::Upload { name, .. }
            | Endpoint::TagsList { name }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }
}

/// Screens the raw path: any encoded byte, dot segment, empty segment, backslash or NUL is a
/// NAME_INVALID before the path is interpreted.
fn screen(path: &str) -> Result<(), OciError> {
    let bad = |why: &str| OciError::msg(ErrorCode::NameInvalid, format!("invalid request path: {why}"));
    if path.contains('%') {
        return Err(bad("percent-encoded characters are not allowed in repository paths"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(bad("backslash or NUL"));
    }
    if path.contains("//") {
        return Err(bad("empty path component"));
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(bad("dot segments"));
    }
    Ok(())
}

/// Parses the path part of a request URI (no query). `None` means "not a registry path".
pub fn parse(path: &str) -> Result<Option<Endpoint>, OciError> {
    let Some(rest) = path.strip_prefix("/v2") else { return Ok(None) };
    if rest.is_empty() || rest == "/" {
        return Ok(Some(Endpoint::Base));
    }
    let Some(rest) = rest.strip_prefix('/') else { return Ok(None) };
    screen(rest)?;
    if rest == "_catalog" {
        return Ok(Some(Endpoint::Catalog));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Some(Endpoint::TagsList { name: name.to_string() }));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
        return Ok(Some(Endpoint::UploadStart { name: name.to_string() }));
    }
    // The remaining forms end in `<name>/<kind>/<last>`, and a name may itself contain
    // "manifests" or "blobs" components, so split from the right.
    let (head, last) = match rest.rsplit_once('/') {
        Some(x) => x,
        None => return Ok(None),
    };
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        if last.is_empty() || !last.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err(OciError::msg(ErrorCode::BlobUploadUnknown, "malformed upload id"));
        }
        return Ok(Some(Endpoint::Upload { name: name.to_string(), uuid: last.to_string() }));
    }
    let (name, kind) = match head.rsplit_once('/') {
        Some(x) => x,
        None => return Ok(None),
    };
    let name = name.to_string();
    Ok(match kind {
        "manifests" => Some(Endpoint::Manifest { name, reference: Reference::parse(last)? }),
        "blobs" => Some(Endpoint::Blob { name, digest: Digest::parse(last)? }),
        "referrers" => Some(Endpoint::Referrers { name, digest: Digest::parse(last)? }),
        _ => None,
    })
}

/// As [`parse`], for a request with `method`. A tag that can never exist is an unknown
/// manifest to a reader (404, as the conformance suite expects of `.INVALID_MANIFEST_NAME`)
/// but an invalid one to a writer (400).
pub fn parse_for(method: &http::Method, path: &str) -> Result<Option<Endpoint>, OciError> {
    parse(path).map_err(|e| {
        if e.code == ErrorCode::ManifestInvalid && *method != http::Method::PUT {
            OciError { code: ErrorCode::ManifestUnknown, ..e }
        } else {
            e
        }
    })
}

/// Query string helper: the first value of `key`, percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    let q = query?;
    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        Digest::sha256_of(b"x").to_string()
    }

    #[test]
    fn parses_endpoints() {
        assert_eq!(parse("/v2/").unwrap(), Some(Endpoint::Base));
        assert_eq!(parse("/v2").unwrap(), Some(Endpoint::Base));
        assert_eq!(parse("/v2/_catalog").unwrap(), Some(Endpoint::Catalog));
        assert!(matches!(parse("/v2/a/b/manifests/latest").unwrap(), Some(Endpoint::Manifest { name, .. }) if name == "a/b"));
        assert!(matches!(parse("/v2/manifests/manifests/v1").unwrap(), Some(Endpoint::Manifest { name, .. }) if name == "manifests"));
        assert!(matches!(parse(&format!("/v2/a/blobs/{}", d())).unwrap(), Some(Endpoint::Blob { .. })));
        assert!(matches!(parse("/v2/a/blobs/uploads/").unwrap(), Some(Endpoint::UploadStart { name }) if name == "a"));
        assert!(matches!(parse("/v2/a/blobs/uploads/abc-123").unwrap(), Some(Endpoint::Upload { uuid, .. }) if uuid == "abc-123"));
        assert!(matches!(parse("/v2/a/tags/list").unwrap(), Some(Endpoint::TagsList { .. })));
        assert!(matches!(parse(&format!("/v2/a/referrers/{}", d())).unwrap(), Some(Endpoint::Referrers { .. })));
        assert_eq!(parse("/metrics").unwrap(), None);
        assert_eq!(parse("/v2/a/nothing/here").unwrap(), None);
    }

    #[test]
    fn rejects_traversal() {
        for p in ["/v2/a/../b/manifests/x", "/v2/a/%2e%2e/b/tags/list", "/v2/a//b/tags/list", "/v2/a\\b/tags/list", "/v2/./a/tags/list"] {
            assert_eq!(parse(p).unwrap_err().code, ErrorCode::NameInvalid, "{p}");
        }
        assert_eq!(parse("/v2/a/blobs/sha256:zz").unwrap_err().code, ErrorCode::DigestInvalid);
    }

    #[test]
    fn impossible_tags_are_unknown_to_readers_and_invalid_to_writers() {
        let p = "/v2/a/manifests/.INVALID_MANIFEST_NAME";
        assert_eq!(parse_for(&http::Method::GET, p).unwrap_err().code, ErrorCode::ManifestUnknown);
        assert_eq!(parse_for(&http::Method::HEAD, p).unwrap_err().code, ErrorCode::ManifestUnknown);
        assert_eq!(parse_for(&http::Method::PUT, p).unwrap_err().code, ErrorCode::ManifestInvalid);
        assert_eq!(parse_for(&http::Method::GET, "/v2/a/../b/tags/list").unwrap_err().code, ErrorCode::NameInvalid);
    }

    #[test]
    fn query() {
        assert_eq!(query_param(Some("n=5&last=a%2Fb"), "last").as_deref(), Some("a/b"));
        assert_eq!(query_param(None, "n"), None);
    }
}
