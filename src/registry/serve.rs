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

/// The part of a blob of `len` bytes a `Range` header asks for. `Ok(None)`: serve the whole
/// blob, which is also the answer to a header that does not follow the grammar (RFC 9110
/// section 14.2 lets a server ignore it) and to several ranges (berth sends no multipart
/// bodies). A range that follows the grammar but selects no byte of the blob (`bytes=len-`,
/// `bytes=-0`, or a last position before the first, as nginx and Go's file server also treat
/// it) is an error: `416` with the blob's length.
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, OciError> {
    use http_range_header::{RangeInvalid, RangeUnsatisfiableError};
    let Some(h) = header else { return Ok(None) };
    let unsatisfiable = || OciError::msg(ErrorCode::RangeInvalid, format!("range {h:?} not satisfiable for {len} bytes"));
    let ranges = match http_range_header::parse_range_header(h.trim()) {
        Ok(r) => r,
        Err(RangeUnsatisfiableError::Invalid(RangeInvalid::Reversed)) => return Err(unsatisfiable()),
        Err(_) => return Ok(None),
    };
    match ranges.validate(len) {
        Ok(r) if r.len() == 1 => Ok(Some((*r[0].start(), *r[0].end()))),
        // Several ranges, or a suffix of an empty blob (which is all of it).
        Ok(_) => Ok(None),
        Err(RangeUnsatisfiableError::Unsatisfiable) => Err(unsatisfiable()),
        // Overlapping ranges: the whole blob is an answer to them too.
        Err(_) => Ok(None),
    }
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
        assert_eq!(parse_range(Some(" bytes=0-4 "), 10).unwrap(), Some((0, 4)));
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), Some((5, 9)));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some((7, 9)));
        assert_eq!(parse_range(Some("bytes=-30"), 10).unwrap(), Some((0, 9)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), Some((8, 9)));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=0-5,2-6,3-7"), 10).unwrap(), None, "overlapping ranges");
        assert_eq!(parse_range(Some("bytes=-5"), 0).unwrap(), None, "a suffix of nothing is nothing");
        for bad in ["bytes=10-", "bytes=5-2", "bytes=-0", "bytes=10-20", "bytes=10-20,30-", "bytes=0-1,5-2"] {
            assert_eq!(parse_range(Some(bad), 10).unwrap_err().status(), 416, "{bad}");
        }
        assert_eq!(parse_range(Some("bytes=0-"), 0).unwrap_err().status(), 416);
    }

    #[test]
    fn a_range_header_off_the_grammar_is_ignored() {
        for malformed in [
            "bytes=x-1",
            "bytes=1-x",
            "bytes=-x",
            "bytes=5",
            "bytes=",
            "bytes=--5",
            "bytes=+1-2",
            "bytes=0-1,x",
            "bytes=1-2-3",
            "bytes 0-4",
            "items=0-4",
            "0-4",
            "",
            "bytes=0-00000000000000000000000000000000000001",
        ] {
            assert_eq!(parse_range(Some(malformed), 10).unwrap(), None, "{malformed:?}");
        }
    }
}
