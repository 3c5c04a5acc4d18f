//! Answers shared by hosted and mirrored repositories: manifests from the index, blobs from
//! the store with `Range`.

use super::{Body, Response};
use crate::oci::{Digest, ErrorCode, OciError};
use crate::store::{BlobBody, ManifestMeta, Store};
use std::sync::Arc;

pub async fn manifest(store: &Arc<Store>, d: &Digest, meta: &ManifestMeta) -> Result<Response, OciError> {
    let bytes = store
        .manifest_body(d)
        .await?
        .ok_or_else(|| OciError::msg(ErrorCode::ManifestUnknown, format!("manifest {d} is indexed but its bytes are missing")))?;
    Ok(Response::new(200)
        .header("Content-Type", meta.media_type.clone())
        .header("Docker-Content-Digest", d.to_string())
        .header("ETag", format!("\"{d}\""))
        .body(Body::Full(bytes)))
}

/// Parses a single `bytes=` range against a length. `Ok(None)`: serve the whole blob.
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, OciError> {
    let Some(h) = header else { return Ok(None) };
    let unsatisfiable = || OciError::msg(ErrorCode::RangeInvalid, format!("range {h:?} not satisfiable for {len} bytes"));
    let Some(spec) = h.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        // Multiple ranges: allowed to ignore and send the whole representation.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| unsatisfiable())?;
            if n == 0 || len == 0 {
                return Err(unsatisfiable());
            }
            (len.saturating_sub(n), len - 1)
        }
        (s, "") => (s.parse().map_err(|_| unsatisfiable())?, len.saturating_sub(1)),
        (s, e) => {
            let s: u64 = s.parse().map_err(|_| unsatisfiable())?;
            let e: u64 = e.parse().map_err(|_| unsatisfiable())?;
            if e < s {
                return Err(unsatisfiable());
            }
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if start >= len {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

pub fn range_error(e: OciError, len: u64) -> Response {
    Response::error(&e).header("Content-Range", format!("bytes */{len}"))
}

/// A committed blob, whole or ranged.
pub fn blob(store: &Store, d: &Digest, range: Option<&str>) -> Result<Option<Response>, OciError> {
    let Some(len) = store.blob_size(d)? else { return Ok(None) };
    let range = match parse_range(range, len) {
        Err(e) => return Ok(Some(range_error(e, len))),
        Ok(r) => r,
    };
    let Some(body) = store.open_blob(d, range)? else { return Ok(None) };
    let base = Response::new(200)
        .header("Docker-Content-Digest", d.to_string())
        .header("Content-Type", "application/octet-stream")
        .header("Accept-Ranges", "bytes")
        .header("ETag", format!("\"{d}\""));
    let (status, offset, n) = match range {
        None => (200, 0, len),
        Some((s, e)) => (206, s, e - s + 1),
    };
    let mut r = if status == 206 { base.header("Content-Range", format!("bytes {offset}-{}/{len}", offset + n - 1)) } else { base };
    r.status = status;
    Ok(Some(match body {
        BlobBody::File { file, .. } => r.body(Body::File { file, offset, len: n }),
        BlobBody::Stream { stream, .. } => r.body(Body::Stream { stream, len: Some(n) }),
        BlobBody::Redirect { url, .. } => {
            let mut r = Response::new(307).header("Location", url).header("Docker-Content-Digest", d.to_string());
            r.content_length = Some(0);
            r
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=0-4"), 10).unwrap(), Some((0, 4)));
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), Some((5, 9)));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some((7, 9)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), Some((8, 9)));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10).unwrap(), None);
        for bad in ["bytes=10-", "bytes=5-2", "bytes=x-1", "bytes=-0"] {
            assert_eq!(parse_range(Some(bad), 10).unwrap_err().status(), 416, "{bad}");
        }
    }
}
