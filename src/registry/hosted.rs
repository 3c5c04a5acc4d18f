//! Hosted repositories: the full read/write distribution API over the store.

use super::{serve, Request, RequestBody, Response};
use crate::events::{About, Actor};
use crate::oci::manifest::{self, MAX_MANIFEST_BYTES};
use crate::oci::route::Endpoint;
use crate::oci::{Algorithm, Digest, ErrorCode, OciError, Reference, RepoName, Tag};
use crate::registry::Registry;
use crate::store::upload::{Appender, Session};
use crate::store::{ManifestMeta, TagExpect};
use bytes::{Bytes, BytesMut};
use http::Method;

pub async fn handle(
    reg: &Registry,
    req: &Request<'_>,
    ep: &Endpoint,
    repo: &RepoName,
    body: &mut dyn RequestBody,
    actor: &Actor,
) -> Result<Response, OciError> {
    let store = &reg.store;
    let r = repo.as_str();
    let m = req.method;
    match ep {
        Endpoint::Manifest { reference, .. } => match *m {
            Method::GET | Method::HEAD => {
                let d = match reference {
                    Reference::Tag(t) => store.tag_digest(r, t.as_str())?.ok_or_else(|| manifest_unknown(repo, reference))?,
                    Reference::Digest(d) => d.clone(),
                };
                let meta = store.manifest_meta(r, &d)?.ok_or_else(|| manifest_unknown(repo, reference))?;
                serve::manifest(store, &d, &meta).await
            }
            Method::PUT => put_manifest(reg, req, repo, reference, body, actor).await,
            Method::DELETE => {
                let immutable = reg.immutable_of(r);
                let (found, about) = match reference {
                    Reference::Digest(d) => {
                        let tags = if reg.events.enabled() { tags_of(reg, r, d).await? } else { Vec::new() };
                        let found = store.delete_manifest(r, d, immutable).await?;
                        (found, ("manifest.deleted", Some(d.clone()), tags))
                    }
                    Reference::Tag(t) => {
                        let was = store.tag_digest(r, t.as_str())?;
                        let found = store.delete_tag(r, t.as_str(), immutable(t.as_str())).await?;
                        (found, ("tag.deleted", was, vec![t.as_str().to_string()]))
                    }
                };
                if !found {
                    return Err(manifest_unknown(repo, reference));
                }
                if reg.events.enabled() {
                    let (kind, digest, tags) = about;
                    let about = About { repository: r, tags: &tags, digest: digest.map(|d| d.to_string()), ..Default::default() };
                    reg.events.emit(reg.events.event(kind, &about, actor), actor).await?;
                }
                Ok(Response::new(202))
            }
            _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
        },
        Endpoint::Blob { digest, .. } => match *m {
            Method::GET | Method::HEAD => {
                if !store.blob_linked(r, digest)? {
                    return Err(blob_unknown(digest));
                }
                serve::blob(store, digest, req.header("range"))?.ok_or_else(|| blob_unknown(digest))
            }
            Method::DELETE => {
                if let Some(tag) = store.pinned_by_immutable(r, digest, &*reg.immutable_of(r))? {
                    return Err(OciError::msg(
                        ErrorCode::Denied,
                        format!("blob {digest} belongs to {repo}:{tag}, which is immutable; it cannot be deleted"),
                    ));
                }
                if !store.unlink_blob(r, digest).await? {
                    return Err(blob_unknown(digest));
                }
                Ok(Response::new(202))
            }
            _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
        },
        Endpoint::UploadStart { .. } => match *m {
            Method::POST => start_upload(reg, req, repo, body).await,
            _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
        },
        Endpoint::Upload { uuid, .. } => upload(reg, req, repo, uuid, body).await,
        Endpoint::TagsList { .. } => match *m {
            Method::GET | Method::HEAD => super::listing::tags(reg, req, r),
            _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
        },
        Endpoint::Referrers { digest, .. } => match *m {
            Method::GET | Method::HEAD => super::listing::referrers(reg, req, r, digest),
            _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
        },
        Endpoint::Base | Endpoint::Catalog => unreachable!("unnamed endpoints are answered before routing"),
    }
}

fn manifest_unknown(repo: &RepoName, reference: &Reference) -> OciError {
    OciError::msg(ErrorCode::ManifestUnknown, format!("manifest {reference} is not in {repo}"))
        .detail(serde_json::json!({"name": repo.as_str(), "reference": reference.to_string()}))
}

fn blob_unknown(d: &Digest) -> OciError {
    OciError::msg(ErrorCode::BlobUnknown, format!("blob {d} is not in this repository"))
        .detail(serde_json::json!({"digest": d.to_string()}))
}

fn declared_length(req: &Request<'_>) -> Option<u64> {
    req.header("content-length").and_then(|v| v.parse().ok())
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
async fn read_limited(body: &mut dyn RequestBody, limit: usize) -> Result<Bytes, OciError> {
    let mut buf = BytesMut::new();
    while let Some(c) = body.chunk().await? {
        if buf.len() + c.len() > limit {
            return Err(OciError::msg(ErrorCode::TooLarge, format!("manifest exceeds {limit} bytes")));
        }
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

/// The tags pointing at a manifest (named in its deletion's event).
async fn tags_of(reg: &Registry, repo: &str, d: &Digest) -> Result<Vec<String>, OciError> {
    let (store, repo, d) = (reg.store.clone(), repo.to_string(), d.clone());
    Ok(crate::store::blocking(move || store.tags_pointing_at(&repo, &d)).await?)
}

async fn put_manifest(
    reg: &Registry,
    req: &Request<'_>,
    repo: &RepoName,
    reference: &Reference,
    body: &mut dyn RequestBody,
    actor: &Actor,
) -> Result<Response, OciError> {
    if declared_length(req).is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
        return Err(OciError::msg(ErrorCode::TooLarge, format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes")));
    }
    let bytes = read_limited(body, MAX_MANIFEST_BYTES).await?;
    let algo = match reference {
        Reference::Digest(d) => d.algorithm(),
        Reference::Tag(_) => Algorithm::Sha256,
    };
    let digest = Digest::of(algo, &bytes);
    if let Reference::Digest(d) = reference {
        if *d != digest {
            return Err(OciError::msg(ErrorCode::DigestInvalid, format!("manifest body has digest {digest}, not {d}")));
        }
    }
    let info = manifest::inspect(&bytes, req.header("content-type"))?;
    let store = &reg.store;
    let r = repo.as_str();
    // A push by digest may name its tags with `?tag=` (OCI 1.1), all validated before anything
    // is stored.
    let tags: Vec<Tag> = match reference {
        Reference::Tag(t) => vec![t.clone()],
        Reference::Digest(_) => url::form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| Tag::parse(&v).ok_or_else(|| OciError::msg(ErrorCode::ManifestInvalid, format!("invalid tag {v:?}"))))
            .collect::<Result<_, _>>()?,
    };
    reg.check_quota(r, &digest, bytes.len() as u64)?;
    let mut children = info.children.clone();
    if reg.policy_of(r).is_some_and(|p| p.sparse_indexes) {
        // Only the children that are here are recorded as references; the store still refuses
        // the index if one of those goes before the write.
        children.retain(|c| store.manifest_meta(r, c).is_ok_and(|m| m.is_some()));
    }
    let meta = ManifestMeta {
        media_type: info.media_type.clone(),
        size: bytes.len() as u64,
        subject: info.subject.as_ref().map(|s| s.to_string()),
        artifact_type: info.effective_artifact_type(),
        annotations: info.annotations.clone(),
    };
    // One transaction: the references are checked (and their grace refreshed, so GC cannot
    // take them), immutability and quota are checked, the manifest and its tags are written.
    let tag_names: Vec<String> = tags.iter().map(|t| t.as_str().to_string()).collect();
    // The event is written with the manifest: a push acknowledged is an event kept, and no
    // event names a push that was refused.
    let mut prepared = reg.events.enabled().then(|| {
        let about = About {
            repository: r,
            tags: &tag_names,
            digest: Some(digest.to_string()),
            media_type: Some(&info.media_type),
            size: Some(bytes.len() as u64),
            platforms: crate::events::platforms_of(&bytes),
            upstream: None,
        };
        reg.events.prepare(reg.events.event("manifest.pushed", &about, actor), actor)
    });
    store
        .put_manifest(
            r,
            &digest,
            bytes,
            meta,
            tag_names.clone(),
            TagExpect::Any,
            (info.blobs.clone(), children),
            reg.immutable_of(r),
            reg.quota_of(r),
            prepared.as_mut().and_then(|p| p.take_outbox()),
        )
        .await?;
    if let Some(p) = prepared {
        reg.events.recorded(p).await;
    }
    let mut resp =
        Response::new(201).header("Location", format!("/v2/{repo}/manifests/{digest}")).header("Docker-Content-Digest", digest.to_string());
    if matches!(reference, Reference::Digest(_)) {
        for t in &tags {
            resp = resp.header("OCI-Tag", t.to_string());
        }
    }
    if let Some(s) = &info.subject {
        resp = resp.header("OCI-Subject", s.to_string());
    }
    Ok(resp)
}

fn upload_headers(r: Response, repo: &RepoName, id: &str, offset: u64) -> Response {
    // Range is inclusive; an empty session reports "0-0" as registry:2 does.
    r.header("Location", format!("/v2/{repo}/blobs/uploads/{id}"))
        .header("Docker-Upload-UUID", id.to_string())
        .header("Range", format!("0-{}", offset.saturating_sub(1)))
}

fn created(repo: &RepoName, d: &Digest) -> Response {
    Response::new(201).header("Location", format!("/v2/{repo}/blobs/{d}")).header("Docker-Content-Digest", d.to_string())
}

async fn start_upload(reg: &Registry, req: &Request<'_>, repo: &RepoName, body: &mut dyn RequestBody) -> Result<Response, OciError> {
    let store = &reg.store;
    if let Some(mount) = req.param("mount") {
        let d = Digest::parse(&mount)?;
        if let Some(from) = req.param("from") {
            // A mount names the source by its client-visible name; only hosted sources whose
            // link exists can lend a blob, so a private blob is never reachable by guessing.
            if let Ok(super::Target::Hosted(src)) = reg.resolve(&from, None) {
                if store.blob_linked(src.as_str(), &d)? {
                    // The blob may be swept between the check and the link: then the client
                    // uploads it, as after any refused mount.
                    match store.link_blob(repo.as_str(), &d, reg.quota_of(repo.as_str())).await {
                        Ok(()) => return Ok(created(repo, &d)),
                        Err(crate::store::StoreError::BlobMissing(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
    if let Some(dg) = req.param("digest") {
        let d = Digest::parse(&dg)?;
        // A blob the namespace already holds costs nothing; anything else may not pass the
        // quota, checked as the bytes arrive.
        let room = if store.blob_linked(repo.as_str(), &d)? { None } else { reg.quota_room(repo.as_str())? };
        let mut w = store.writer(&d).await?;
        let mut batch = Batch::default();
        while let Some(c) = batch.next(body).await? {
            if let Some((room, e)) = &room {
                if w.written() + c.len() as u64 > *room {
                    return Err(e.clone());
                }
            }
            w.write(c).await?;
        }
        if let Some(n) = declared_length(req) {
            if n != w.written() {
                return Err(OciError::msg(ErrorCode::SizeInvalid, format!("received {} bytes, Content-Length said {n}", w.written())));
            }
        }
        store.commit(w, &d, Some((repo.as_str(), reg.quota_of(repo.as_str())))).await?;
        return Ok(created(repo, &d));
    }
    let client = req.client.map(|c| c.to_string()).unwrap_or_default();
    let handle = store.uploads.create(repo.as_str(), &client).await?;
    let mut s = handle.lock().await;
    append(reg, &mut s, body, None).await?;
    Ok(upload_headers(Response::new(202), repo, &s.id, s.offset()))
}

/// `Content-Range: <start>-<end>` (with or without a `bytes ` prefix).
fn content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").or_else(|| v.strip_prefix("bytes=")).unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// A chunk whose `Content-Range` does not start where the upload ends is refused with 416 and
/// the current `Range`, leaving the session as it was so the client can resume from there.
fn out_of_order(req: &Request<'_>, repo: &RepoName, id: &str, offset: u64) -> Option<Response> {
    let cr = req.header("content-range")?;
    let refuse =
        |message: String| Some(upload_headers(Response::error(&OciError::msg(ErrorCode::RangeInvalid, message)), repo, id, offset));
    let Some((start, end)) = content_range(cr) else {
        return refuse(format!("malformed Content-Range {cr:?}"));
    };
    if start != offset || end < start {
        return refuse(format!("chunk starts at {start} but the upload has {offset} bytes; send chunks in order"));
    }
    if let Some(n) = declared_length(req).filter(|&n| n != end - start + 1) {
        return refuse(format!("Content-Range {start}-{end} covers {} bytes but the body has {n}", end - start + 1));
    }
    None
}

/// How many bytes the request's `Content-Range` says its body carries.
fn range_len(req: &Request<'_>) -> Option<u64> {
    req.header("content-range").and_then(content_range).map(|(a, b)| b - a + 1)
}

/// A body that did not match its `Content-Range`: 416 with where the upload now stands, so the
/// client can resume from there (what was received in order is kept).
fn range_mismatch(repo: &RepoName, id: &str, offset: u64, want: u64, got: u64, longer: bool) -> Response {
    let what = if longer { "more than" } else { "only" };
    let e = OciError::msg(ErrorCode::RangeInvalid, format!("Content-Range announced {want} bytes but the body sent {what} {got}"));
    upload_headers(Response::error(&e), repo, id, offset)
}

async fn upload(reg: &Registry, req: &Request<'_>, repo: &RepoName, id: &str, body: &mut dyn RequestBody) -> Result<Response, OciError> {
    let uploads = &reg.store.uploads;
    let handle = uploads.get(id, repo.as_str()).await?;
    if matches!(*req.method, Method::GET | Method::HEAD) {
        if let Ok(s) = handle.try_lock() {
            if !s.needs_rehash() && !uploads.shared() {
                uploads.check(&s, repo.as_str())?;
                return Ok(upload_headers(Response::new(204), repo, id, s.offset()));
            }
        } else {
            // A PATCH holds the session: answer with what has reached the disk so far rather
            // than wait for a client that may be slow.
            let offset = uploads.stored_len(id, repo.as_str()).await?;
            return Ok(upload_headers(Response::new(204), repo, id, offset));
        }
    }
    let mut s = handle.lock().await;
    uploads.ready(&mut s, repo.as_str()).await?;
    match *req.method {
        Method::GET | Method::HEAD => Ok(upload_headers(Response::new(204), repo, id, s.offset())),
        Method::DELETE => {
            uploads.remove_locked(&mut s).await;
            Ok(Response::new(204))
        }
        Method::PATCH => {
            if let Some(refused) = out_of_order(req, repo, id, s.offset()) {
                return Ok(refused);
            }
            let (received, longer) = append(reg, &mut s, body, range_len(req)).await?;
            if let Some(want) = range_len(req).filter(|&w| longer || w != received) {
                return Ok(range_mismatch(repo, id, s.offset(), want, received, longer));
            }
            if let Some(n) = declared_length(req) {
                if received != n {
                    return Err(OciError::msg(ErrorCode::SizeInvalid, format!("received {received} bytes, Content-Length said {n}")));
                }
            }
            Ok(upload_headers(Response::new(202), repo, id, s.offset()))
        }
        Method::PUT => {
            let Some(dg) = req.param("digest") else {
                return Err(OciError::msg(ErrorCode::DigestInvalid, "PUT to an upload needs ?digest="));
            };
            let d = Digest::parse(&dg)?;
            // The last chunk may ride on the PUT; it must continue the upload like a PATCH.
            if let Some(refused) = out_of_order(req, repo, id, s.offset()) {
                return Ok(refused);
            }
            let (received, longer) = append(reg, &mut s, body, range_len(req)).await?;
            if let Some(want) = range_len(req).filter(|&w| longer || w != received) {
                return Ok(range_mismatch(repo, id, s.offset(), want, received, longer));
            }
            // The bytes were held to the quota as they arrived; the commit checks it again in
            // the same transaction that links the blob.
            uploads.commit(&reg.store, &mut s, &d, reg.quota_of(repo.as_str())).await?;
            Ok(created(repo, &d))
        }
        _ => Err(OciError::new(ErrorCode::MethodNotAllowed)),
    }
}

/// Appends a request body to an upload session, chunk by chunk as it arrives; with `limit`
/// (the `Content-Range` length) nothing past it is written. Returns the bytes written and
/// whether the body went past the limit.
async fn append(reg: &Registry, s: &mut Session, body: &mut dyn RequestBody, limit: Option<u64>) -> Result<(u64, bool), OciError> {
    let uploads = &reg.store.uploads;
    let room = reg.quota_room(&s.repo)?;
    let mut a = Appender::default();
    let mut batch = Batch::default();
    while let Some(c) = batch.next(body).await? {
        if limit.is_some_and(|l| a.received() + c.len() as u64 > l) {
            return Ok((uploads.finish(s, a).await?, true));
        }
        if let Some((room, e)) = &room {
            // Refused as soon as the upload's bytes would pass the quota, not at its last PUT.
            if s.offset() + c.len() as u64 > *room {
                uploads.remove_locked(s).await;
                return Err(e.clone());
            }
        }
        uploads.write(s, &mut a, c).await?;
    }
    Ok((uploads.finish(s, a).await?, false))
}

/// Bytes gathered from a request body before one write.
const BATCH: usize = 256 << 10;

/// Gathers body pieces into writes of up to [`BATCH`] bytes: each write is a round trip to
/// the blocking pool, which costs more than writing one network-sized piece.
#[derive(Default)]
struct Batch {
    ended: bool,
}

impl Batch {
    async fn next(&mut self, body: &mut dyn RequestBody) -> Result<Option<Bytes>, OciError> {
        if self.ended {
            return Ok(None);
        }
        let mut buf = BytesMut::new();
        while buf.len() < BATCH {
            match body.chunk().await? {
                Some(c) if buf.is_empty() && c.len() >= BATCH => return Ok(Some(c)),
                Some(c) => buf.extend_from_slice(&c),
                None => {
                    self.ended = true;
                    break;
                }
            }
        }
        Ok((!buf.is_empty()).then(|| buf.freeze()))
    }
}
