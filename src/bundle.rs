//! Air-gap bundles: images carried between berths as an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/<algorithm>/<hex>`) in one tar stream.
//!
//! Export writes every platform of each image and its referrers (manifests whose subject it
//! is, and cosign's `sha256-<hex>.sig`/`.att`/`.sbom` tags); each `index.json` entry names where
//! it came from in `org.opencontainers.image.ref.name` (`<repository>:<tag>`, or
//! `<repository>@<digest>` for an untagged referrer), repositories named as the store names
//! them (`docker.io/library/alpine` for a mirrored one). Import reads the stream once, in any
//! entry order, hashing every blob as it streams into the store; nothing is published before
//! the whole bundle has been read and every digest and reference checked, so a damaged or
//! incomplete bundle stores nothing. (A write the store refuses afterwards, an immutable tag or
//! a quota, stops the import there.)

use crate::oci::manifest::{self, Descriptor, MAX_MANIFEST_BYTES};
use crate::oci::{Digest, Hasher, Reference, RepoName};
use crate::store::{BlobWriter, ManifestMeta, Store, TagExpect};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;

/// The annotation naming an entry's repository and tag (or digest).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// `index.json` lists the bundle's entries; anything larger is not a bundle berth wrote.
const MAX_INDEX_BYTES: usize = 16 * 1024 * 1024;
/// Manifests are kept in memory while the bundle is read, up to this much in all.
const MAX_HELD_BYTES: usize = 512 * 1024 * 1024;
/// The cosign tags that carry an image's signatures, attestations and SBOMs.
const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];
const CHUNK: usize = 256 * 1024;

/// A `repository:tag` or `repository@digest`, the repository as the store names it.
pub fn parse_ref(s: &str) -> Result<(RepoName, Reference), String> {
    let (repo, reference) = match s.split_once('@') {
        Some((r, d)) => (r, d),
        None => {
            let slash = s.rfind('/').map_or(0, |i| i + 1);
            match s[slash..].rfind(':') {
                Some(i) => (&s[..slash + i], &s[slash + i + 1..]),
                None => return Err(format!("{s:?} names no tag: give <repository>:<tag> or <repository>@<digest>")),
            }
        }
    };
    let repo = RepoName::parse(repo).map_err(|e| format!("{s:?}: {}", e.message))?;
    let reference = Reference::parse(reference).map_err(|e| format!("{s:?}: {}", e.message))?;
    Ok((repo, reference))
}

fn ref_name(repo: &str, r: &Reference) -> String {
    match r {
        Reference::Tag(t) => format!("{repo}:{t}"),
        Reference::Digest(d) => format!("{repo}@{d}"),
    }
}

/// What an export or import carried.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub entries: usize,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} entries, {} manifests, {} blobs, {} bytes", self.entries, self.manifests, self.blobs, self.bytes)
    }
}

/// The media type a manifest is stored under: its own `mediaType`, else the type the descriptor
/// pointing at it gives, else what its shape says.
fn manifest_meta(bytes: &[u8], declared: Option<&str>) -> Result<(ManifestMeta, manifest::ManifestInfo), String> {
    let info = manifest::inspect(bytes, None).map_err(|e| e.message)?;
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let own = serde_json::from_slice::<Typed>(bytes).ok().and_then(|t| t.media_type);
    let media_type = own.or_else(|| declared.map(str::to_string)).unwrap_or_else(|| info.media_type.clone());
    let meta = ManifestMeta {
        media_type,
        size: bytes.len() as u64,
        subject: info.subject.as_ref().map(|s| s.to_string()),
        artifact_type: info.effective_artifact_type(),
        annotations: info.annotations.clone(),
    };
    Ok((meta, info))
}

// ---- export ----

fn descriptor(name: String, d: &Digest, meta: &ManifestMeta) -> Descriptor {
    let mut annotations = serde_json::Map::new();
    annotations.insert(REF_NAME.into(), name.into());
    Descriptor {
        media_type: Some(meta.media_type.clone()),
        digest: d.to_string(),
        size: meta.size as i64,
        artifact_type: meta.artifact_type.clone(),
        annotations: Some(annotations),
        urls: None,
        platform: None,
    }
}

/// The closure of the references asked for, read from the store.
#[derive(Default)]
struct Plan {
    /// `index.json`'s entries, in the order asked (referrers after what they refer to).
    entries: Vec<Descriptor>,
    /// Manifest bytes by digest.
    manifests: BTreeMap<String, (Digest, Bytes)>,
    /// Other blobs by digest, with their sizes.
    blobs: BTreeMap<String, (Digest, u64)>,
    /// (repository, manifest) pairs already walked.
    seen: HashSet<(String, String)>,
    named: HashSet<String>,
}

impl Plan {
    fn entry(&mut self, name: String, d: &Digest, meta: &ManifestMeta) {
        if self.named.insert(name.clone()) {
            self.entries.push(descriptor(name, d, meta));
        }
    }

    /// Walks a manifest of `repo`: its children and blobs, and the referrers of each manifest
    /// met on the way (as entries of their own, so import knows their repository).
    async fn walk(&mut self, store: &Arc<Store>, repo: &str, d: &Digest, from: &str) -> Result<ManifestMeta, String> {
        let meta = store.manifest_meta(repo, d).map_err(|e| format!("reading {repo}@{d}: {e}"))?.ok_or_else(|| {
            format!("{from} needs manifest {d}, which berth does not hold in {repo} (pull every platform through berth first)")
        })?;
        let meta = (*meta).clone();
        if !self.seen.insert((repo.to_string(), d.to_string())) {
            return Ok(meta);
        }
        let bytes = store
            .manifest_body(d)
            .await
            .map_err(|e| format!("reading {d}: {e}"))?
            .ok_or_else(|| format!("the bytes of {d} are missing from the store"))?;
        let (_, info) = manifest_meta(&bytes, Some(&meta.media_type)).map_err(|e| format!("{repo}@{d}: {e}"))?;
        self.manifests.insert(d.to_string(), (d.clone(), bytes));
        for c in &info.children {
            Box::pin(self.walk(store, repo, c, &format!("{repo}@{d}"))).await?;
        }
        for b in &info.blobs {
            let size = store
                .blob_size(b)
                .map_err(|e| format!("reading {b}: {e}"))?
                .filter(|_| store.blob_linked(repo, b).unwrap_or(false))
                .ok_or_else(|| format!("{repo}@{d} needs blob {b}, which berth does not hold (pull the image through berth first)"))?;
            self.blobs.insert(b.to_string(), (b.clone(), size));
        }
        for r in store.referrers(repo, d).map_err(|e| format!("listing referrers of {d}: {e}"))? {
            let rd = Digest::parse(&r.digest).map_err(|e| e.message)?;
            let rmeta = Box::pin(self.walk(store, repo, &rd, &format!("a referrer of {repo}@{d}"))).await?;
            self.entry(ref_name(repo, &Reference::Digest(rd.clone())), &rd, &rmeta);
        }
        for suffix in COSIGN_SUFFIXES {
            let tag = format!("{}-{}.{suffix}", d.algorithm().as_str(), d.hex());
            if let Some(sd) = store.tag_digest(repo, &tag).map_err(|e| format!("reading {repo}:{tag}: {e}"))? {
                let smeta = Box::pin(self.walk(store, repo, &sd, &format!("{repo}:{tag}"))).await?;
                self.entry(format!("{repo}:{tag}"), &sd, &smeta);
            }
        }
        Ok(meta)
    }
}

/// Writes the images `refs` name (`repository:tag` or `repository@digest`, as the store names
/// repositories) to `out` as an OCI image layout tar. Blobs stream from the store.
pub async fn export<W: Write + Send + 'static>(store: Arc<Store>, refs: &[String], out: W) -> Result<(Report, W), String> {
    let mut plan = Plan::default();
    for s in refs {
        let (repo, reference) = parse_ref(s)?;
        let d = match &reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                store.tag_digest(repo.as_str(), t.as_str()).map_err(|e| format!("reading {s}: {e}"))?.ok_or_else(|| {
                    format!(
                        "{s} is not in the store (mirrored repositories are named <upstream>/<repository>, e.g. docker.io/library/alpine)"
                    )
                })?
            }
        };
        let at = plan.entries.len();
        let meta = plan.walk(&store, repo.as_str(), &d, s).await?;
        let name = ref_name(repo.as_str(), &reference);
        if plan.named.insert(name.clone()) {
            // The entry comes before its referrers'.
            plan.entries.insert(at, descriptor(name, &d, &meta));
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": plan.entries,
    });
    let index = serde_json::to_vec_pretty(&index).expect("index serializes");
    let report = Report {
        entries: plan.entries.len(),
        manifests: plan.manifests.len(),
        blobs: plan.blobs.len(),
        bytes: plan.manifests.values().map(|(_, b)| b.len() as u64).sum::<u64>() + plan.blobs.values().map(|(_, n)| *n).sum::<u64>(),
    };
    let (manifests, blobs) = (plan.manifests, plan.blobs);
    tokio::task::spawn_blocking(move || -> Result<(Report, W), String> {
        let mut tar = tar::Builder::new(out);
        let io = |e: std::io::Error| format!("writing the bundle: {e}");
        file(&mut tar, "oci-layout", LAYOUT).map_err(io)?;
        file(&mut tar, "index.json", &index).map_err(io)?;
        let mut dirs = HashSet::new();
        directory(&mut tar, "blobs/").map_err(io)?;
        for (d, bytes) in manifests.values() {
            if dirs.insert(d.algorithm()) {
                directory(&mut tar, &format!("blobs/{}/", d.algorithm().as_str())).map_err(io)?;
            }
            file(&mut tar, &blob_path(d), bytes).map_err(io)?;
        }
        for (d, size) in blobs.values() {
            if manifests.contains_key(&d.to_string()) {
                continue;
            }
            if dirs.insert(d.algorithm()) {
                directory(&mut tar, &format!("blobs/{}/", d.algorithm().as_str())).map_err(io)?;
            }
            let reader = store
                .blobs()
                .reader(d)
                .map_err(|e| format!("reading blob {d}: {e}"))?
                .ok_or_else(|| format!("blob {d} is missing from the store"))?;
            let mut counted = Counted { inner: reader.take(*size), n: 0 };
            let mut h = header(*size, 0o644, tar::EntryType::Regular);
            tar.append_data(&mut h, blob_path(d), &mut counted).map_err(io)?;
            if counted.n != *size {
                return Err(format!("blob {d} is {} bytes in the store, not the {size} its record says", counted.n));
            }
        }
        let out = tar.into_inner().map_err(io)?;
        Ok((report, out))
    })
    .await
    .map_err(|e| format!("export failed: {e}"))?
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h.set_mtime(0);
    h
}

fn file<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = header(data.len() as u64, 0o644, tar::EntryType::Regular);
    tar.append_data(&mut h, path, data)
}

fn directory<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> std::io::Result<()> {
    let mut h = header(0, 0o755, tar::EntryType::Directory);
    tar.append_data(&mut h, path, std::io::empty())
}

struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

// ---- import ----

/// Where an entry of a bundle goes.
pub trait Destination {
    /// The store repository for a repository named in the bundle (after any `--to` prefix), or
    /// why it has no place here.
    fn place(&self, repo: &str) -> Result<Placement, String>;
}

/// A store repository and the rules its writes follow.
pub struct Placement {
    pub repo: String,
    /// A mirror cache (accounted for eviction) rather than a hosted namespace.
    pub cache: bool,
    pub quota: Option<u64>,
    pub immutable: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// What reading the tar found.
struct Received {
    layout: Option<Bytes>,
    index: Option<Bytes>,
    /// Verified blobs, written but not yet published.
    written: HashMap<String, (Digest, BlobWriter, u64)>,
    /// Blobs the store already had (hashed and verified, not written again).
    present: HashSet<String>,
    /// Small JSON blobs (manifests, configs), verified, in memory rather than written.
    held: HashMap<String, Bytes>,
}

/// Reads a bundle from `input` into the store under the places `dest` gives. Every blob is
/// hashed as it streams; a digest mismatch, a missing blob or manifest, or an entry with no
/// place refuses the whole bundle before anything is published.
pub async fn import<R: Read + Send + 'static>(
    store: Arc<Store>,
    input: R,
    prefix: Option<&str>,
    dest: &dyn Destination,
) -> Result<Report, String> {
    let handle = tokio::runtime::Handle::current();
    let s = store.clone();
    let got = tokio::task::spawn_blocking(move || read_tar(&handle, &s, input)).await.map_err(|e| format!("import failed: {e}"))??;
    let layout = got.layout.as_ref().ok_or("not an OCI image layout: the bundle has no oci-layout file")?;
    #[derive(serde::Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let l: Layout = serde_json::from_slice(layout).map_err(|e| format!("oci-layout is not valid: {e}"))?;
    if !l.version.starts_with("1.") {
        return Err(format!("image layout version {} is not supported", l.version));
    }
    let index = got.index.as_ref().ok_or("not an OCI image layout: the bundle has no index.json")?;
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Vec<Descriptor>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| format!("index.json is not valid: {e}"))?;

    // Plan every write, checking that everything referenced is here, before publishing any.
    let mut ctx = Importing { store: &store, got: &got, done: HashSet::new(), blobs_needed: BTreeMap::new(), puts: Vec::new() };
    let mut places = Vec::new();
    for e in &index.manifests {
        let name = e
            .annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("index.json entry {} has no {REF_NAME} annotation naming its repository", e.digest))?;
        let full = match prefix {
            Some(p) => format!("{}/{name}", p.trim_end_matches('/')),
            None => name.to_string(),
        };
        let (repo, reference) = parse_ref(&full)?;
        let d = Digest::parse(&e.digest).map_err(|e| e.message)?;
        if let Reference::Digest(want) = &reference {
            if *want != d {
                return Err(format!("index.json entry {full} points at {d}"));
            }
        }
        let place = dest.place(repo.as_str())?;
        let tag = match &reference {
            Reference::Tag(t) => Some(t.as_str().to_string()),
            Reference::Digest(_) => None,
        };
        ctx.plan(&place.repo, &d, e.media_type.as_deref(), tag, &full)?;
        places.push(place);
    }
    let by_repo: HashMap<String, &Placement> = places.iter().map(|p| (p.repo.clone(), p)).collect();

    // Publish: the blobs first (verified above), then links and manifests in dependency order.
    let Importing { blobs_needed, puts, .. } = ctx;
    let mut written = got.written;
    let mut report = Report { entries: index.manifests.len(), ..Report::default() };
    for (key, (d, repos)) in &blobs_needed {
        if let Some((_, w, n)) = written.remove(key) {
            store.commit(w, d, None).await.map_err(|e| format!("storing {d}: {e}"))?;
            report.bytes += n;
        } else if let Some(b) = got.held.get(key).filter(|_| !got.present.contains(key)) {
            report.bytes += b.len() as u64;
            store.put_blob_bytes(b.clone(), d).await.map_err(|e| format!("storing {d}: {e}"))?;
        }
        report.blobs += 1;
        for repo in repos {
            let place = by_repo[repo];
            store.link_blob(repo, d, place.quota).await.map_err(|e| format!("linking {d} into {repo}: {e}"))?;
            if place.cache {
                store.cache_filled(d).await;
            }
        }
    }
    for p in puts {
        let place = by_repo[&p.repo];
        let bytes = got.held.get(&p.digest.to_string()).cloned().ok_or_else(|| format!("manifest {} vanished", p.digest))?;
        if !got.present.contains(&p.digest.to_string()) {
            report.bytes += bytes.len() as u64;
        }
        store
            .put_manifest(
                &p.repo,
                &p.digest,
                bytes,
                p.meta,
                p.tag.into_iter().collect(),
                TagExpect::Any,
                (p.blobs, p.children),
                place.immutable.clone(),
                place.quota,
                None,
            )
            .await
            .map_err(|e| format!("storing {}@{}: {e}", p.repo, p.digest))?;
        if place.cache {
            store.cache_filled(&p.digest).await;
        }
        report.manifests += 1;
    }
    Ok(report)
}

struct Put {
    repo: String,
    digest: Digest,
    meta: ManifestMeta,
    tag: Option<String>,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
}

struct Importing<'a> {
    store: &'a Arc<Store>,
    got: &'a Received,
    /// (repository, manifest) pairs planned.
    done: HashSet<(String, String)>,
    /// Each blob to publish and the repositories to link it into.
    blobs_needed: BTreeMap<String, (Digest, Vec<String>)>,
    /// Manifests to store, children before their parents.
    puts: Vec<Put>,
}

impl Importing<'_> {
    fn has(&self, d: &Digest) -> Result<bool, String> {
        let k = d.to_string();
        Ok(self.got.written.contains_key(&k) || self.got.present.contains(&k) || self.got.held.contains_key(&k))
    }

    fn plan(&mut self, repo: &str, d: &Digest, declared: Option<&str>, tag: Option<String>, from: &str) -> Result<(), String> {
        let first = self.done.insert((repo.to_string(), d.to_string()));
        if !first && tag.is_none() {
            return Ok(());
        }
        let bytes = match self.got.held.get(&d.to_string()) {
            Some(b) => b.clone(),
            None if self.has(d)? => return Err(format!("{from}: {d} is not a manifest")),
            None => return Err(format!("{from} needs manifest {d}, which the bundle does not hold")),
        };
        let (meta, info) = manifest_meta(&bytes, declared).map_err(|e| format!("{from}: {d}: {e}"))?;
        if first {
            for c in &info.children {
                self.plan(repo, c, None, None, &format!("{repo}@{d}"))?;
            }
            for b in &info.blobs {
                if !self.has(b)? && self.store.blob_size(b).map_err(|e| e.to_string())?.is_none() {
                    return Err(format!("{repo}@{d} needs blob {b}, which the bundle does not hold"));
                }
                let e = self.blobs_needed.entry(b.to_string()).or_insert_with(|| (b.clone(), Vec::new()));
                if !e.1.iter().any(|r| r == repo) {
                    e.1.push(repo.to_string());
                }
            }
        }
        self.puts.push(Put { repo: repo.to_string(), digest: d.clone(), meta, tag, blobs: info.blobs, children: info.children });
        Ok(())
    }
}

/// Reads the whole tar on this (blocking) thread: blobs stream into store writers, hashed on
/// the way; small JSON blobs (manifests, configs) are also held in memory.
fn read_tar<R: Read>(handle: &tokio::runtime::Handle, store: &Arc<Store>, input: R) -> Result<Received, String> {
    let mut got = Received { layout: None, index: None, written: HashMap::new(), present: HashSet::new(), held: HashMap::new() };
    let mut held_bytes = 0usize;
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| format!("reading the bundle: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the bundle: {e}"))?;
        if entry.header().entry_type() != tar::EntryType::Regular && entry.header().entry_type() != tar::EntryType::Continuous {
            continue;
        }
        let path = entry.path().map_err(|e| format!("reading the bundle: {e}"))?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        let size = entry.size();
        match path.as_str() {
            "oci-layout" => got.layout = Some(read_small(&mut entry, 64 * 1024, "oci-layout")?),
            "index.json" => got.index = Some(read_small(&mut entry, MAX_INDEX_BYTES, "index.json")?),
            p => {
                let Some(rest) = p.strip_prefix("blobs/") else { continue };
                let Some((algo, hex)) = rest.split_once('/') else { continue };
                let d = Digest::parse(&format!("{algo}:{hex}")).map_err(|e| format!("bundle entry {p}: {}", e.message))?;
                let key = d.to_string();
                if got.written.contains_key(&key) || got.present.contains(&key) || got.held.contains_key(&key) {
                    continue;
                }
                let already = store.blob_size(&d).map_err(|e| e.to_string())?.is_some();
                if size <= MAX_MANIFEST_BYTES as u64 {
                    // Small: read whole, so a manifest or config can stay in memory.
                    let bytes = read_small(&mut entry, MAX_MANIFEST_BYTES, p)?;
                    let actual = Digest::of(d.algorithm(), &bytes);
                    if actual != d {
                        return Err(damaged(p, &actual));
                    }
                    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
                        held_bytes += bytes.len();
                        if held_bytes > MAX_HELD_BYTES {
                            return Err(format!(
                                "the bundle's JSON blobs pass {MAX_HELD_BYTES} bytes; berth does not hold that much in memory"
                            ));
                        }
                        if already {
                            got.present.insert(key.clone());
                        }
                        got.held.insert(key, bytes);
                    } else if already {
                        got.present.insert(key);
                    } else {
                        let n = bytes.len() as u64;
                        let mut w = handle.block_on(store.writer(&d)).map_err(|e| format!("storing {d}: {e}"))?;
                        handle.block_on(w.write(bytes)).map_err(|e| format!("storing {d}: {e}"))?;
                        got.written.insert(key, (d, w, n));
                    }
                    continue;
                }
                // Large: streamed into the store as it is hashed.
                let mut hasher = Hasher::new(d.algorithm());
                let mut writer =
                    if already { None } else { Some(handle.block_on(store.writer(&d)).map_err(|e| format!("storing {d}: {e}"))?) };
                let mut n = 0u64;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let k = entry.read(&mut buf).map_err(|e| format!("reading {p} from the bundle: {e}"))?;
                    if k == 0 {
                        break;
                    }
                    hasher.update(&buf[..k]);
                    n += k as u64;
                    if let Some(w) = writer.as_mut() {
                        handle.block_on(w.write(Bytes::copy_from_slice(&buf[..k]))).map_err(|e| format!("storing {d}: {e}"))?;
                    }
                }
                let actual = hasher.finish();
                if actual != d {
                    return Err(damaged(p, &actual));
                }
                match writer {
                    Some(w) => {
                        got.written.insert(key, (d, w, n));
                    }
                    None => {
                        got.present.insert(key);
                    }
                }
            }
        }
    }
    Ok(got)
}

fn damaged(path: &str, actual: &Digest) -> String {
    format!("bundle entry {path} has digest {actual}: the bundle is damaged or was altered; nothing was imported")
}

fn read_small(r: &mut impl Read, limit: usize, what: &str) -> Result<Bytes, String> {
    let mut v = Vec::new();
    r.take(limit as u64 + 1).read_to_end(&mut v).map_err(|e| format!("reading {what}: {e}"))?;
    if v.len() > limit {
        return Err(format!("{what} is over {limit} bytes"));
    }
    Ok(v.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Under(&'static str);

    impl Destination for Under {
        fn place(&self, repo: &str) -> Result<Placement, String> {
            if !repo.starts_with(self.0) {
                return Err(format!("{repo} has no place"));
            }
            Ok(Placement { repo: repo.to_string(), cache: false, quota: None, immutable: Arc::new(|_: &str| false) })
        }
    }

    async fn put_blob(store: &Arc<Store>, repo: &str, data: &[u8]) -> serde_json::Value {
        let d = Digest::sha256_of(data);
        store.put_blob_bytes(Bytes::copy_from_slice(data), &d).await.unwrap();
        store.link_blob(repo, &d, None).await.unwrap();
        json!({"mediaType": "application/octet-stream", "digest": d.to_string(), "size": data.len()})
    }

    async fn put_manifest(store: &Arc<Store>, repo: &str, tag: Option<&str>, v: serde_json::Value) -> serde_json::Value {
        let bytes = Bytes::from(serde_json::to_vec(&v).unwrap());
        let d = Digest::sha256_of(&bytes);
        let (meta, info) = manifest_meta(&bytes, None).unwrap();
        let mt = meta.media_type.clone();
        store
            .put_manifest(
                repo,
                &d,
                bytes.clone(),
                meta,
                tag.map(|t| vec![t.to_string()]).unwrap_or_default(),
                TagExpect::Any,
                (info.blobs, info.children),
                Arc::new(|_: &str| false),
                None,
                None,
            )
            .await
            .unwrap();
        json!({"mediaType": mt, "digest": d.to_string(), "size": bytes.len()})
    }

    /// A two-platform image in `repo:1` with a large layer each, and a signature referring to
    /// the index.
    async fn seed(store: &Arc<Store>, repo: &str) -> (String, String) {
        let mut platforms = Vec::new();
        for arch in ["amd64", "arm64"] {
            let config = put_blob(store, repo, format!("{{\"architecture\":\"{arch}\",\"os\":\"linux\"}}").as_bytes()).await;
            // Past the in-memory size: streamed.
            let layer: Vec<u8> = (0..MAX_MANIFEST_BYTES + 4096).map(|i| (i % 251) as u8 ^ arch.as_bytes()[1]).collect();
            let layer = put_blob(store, repo, &layer).await;
            let m = put_manifest(
                store,
                repo,
                None,
                json!({"schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST, "config": config, "layers": [layer]}),
            )
            .await;
            let mut m = m.as_object().unwrap().clone();
            m.insert("platform".into(), json!({"os": "linux", "architecture": arch}));
            platforms.push(serde_json::Value::Object(m));
        }
        let index =
            put_manifest(store, repo, Some("1"), json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": platforms}))
                .await;
        let empty = put_blob(store, repo, b"{}").await;
        let sig_layer = put_blob(store, repo, b"signature bytes").await;
        let sig = put_manifest(
            store,
            repo,
            None,
            json!({"schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
                   "config": {"mediaType": manifest::OCI_EMPTY_CONFIG, "digest": empty["digest"], "size": 2},
                   "layers": [sig_layer], "subject": index}),
        )
        .await;
        (index["digest"].as_str().unwrap().to_string(), sig["digest"].as_str().unwrap().to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exported_image_imports_byte_exact_with_every_platform_and_its_referrers() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (Store::open(a.path()).unwrap(), Store::open(b.path()).unwrap());
        let (index, sig) = seed(&from, "dev/app").await;
        let (report, tar) = export(from.clone(), &["dev/app:1".to_string()], Vec::new()).await.unwrap();
        assert_eq!((report.entries, report.manifests, report.blobs), (2, 4, 6), "{report}");

        // The layout: oci-layout and index.json, the entry named, the referrer its own entry.
        let mut names = Vec::new();
        let mut index_json = None;
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            if p == "index.json" {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                index_json = Some(serde_json::from_slice::<serde_json::Value>(&v).unwrap());
            }
            names.push(p);
        }
        assert!(
            names.contains(&"oci-layout".to_string())
                && names.iter().filter(|n| n.starts_with("blobs/sha256/") && !n.ends_with('/')).count() == 10,
            "{names:?}"
        );
        let entries = index_json.unwrap()["manifests"].as_array().unwrap().clone();
        let named: Vec<_> = entries
            .iter()
            .map(|e| (e["annotations"][REF_NAME].as_str().unwrap().to_string(), e["digest"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(named, vec![("dev/app:1".to_string(), index.clone()), (format!("dev/app@{sig}"), sig.clone())]);

        let report = import(to.clone(), std::io::Cursor::new(tar.clone()), None, &Under("dev/")).await.unwrap();
        assert_eq!((report.manifests, report.blobs), (4, 6), "{report}");
        let d = to.tag_digest("dev/app", "1").unwrap().unwrap();
        assert_eq!(d.to_string(), index);
        assert_eq!(to.manifest_bytes(&d).unwrap(), from.manifest_bytes(&d).unwrap());
        let refs = to.referrers("dev/app", &d).unwrap();
        assert_eq!(refs.iter().map(|r| r.digest.clone()).collect::<Vec<_>>(), vec![sig]);
        // Every blob, byte for byte, and linked into the repository.
        let (_, info) = manifest_meta(&to.manifest_bytes(&d).unwrap().unwrap(), None).unwrap();
        for child in info.children {
            let (_, ci) = manifest_meta(&to.manifest_bytes(&child).unwrap().unwrap(), None).unwrap();
            for blob in ci.blobs {
                assert!(to.blob_linked("dev/app", &blob).unwrap());
                let mut got = Vec::new();
                to.blobs().reader(&blob).unwrap().unwrap().read_to_end(&mut got).unwrap();
                assert_eq!(Digest::sha256_of(&got), blob);
            }
        }

        // Again under a prefix; and a name with no place is refused.
        import(to.clone(), std::io::Cursor::new(tar.clone()), Some("dev/copy"), &Under("dev/")).await.unwrap();
        assert_eq!(to.tag_digest("dev/copy/dev/app", "1").unwrap().map(|d| d.to_string()), Some(index));
        let e = import(to.clone(), std::io::Cursor::new(tar.clone()), Some("elsewhere"), &Under("dev/")).await.unwrap_err();
        assert!(e.contains("has no place"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tampered_bundle_is_refused_and_stores_nothing() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (Store::open(a.path()).unwrap(), Store::open(b.path()).unwrap());
        seed(&from, "dev/app").await;
        let (_, mut tar) = export(from.clone(), &["dev/app:1".to_string()], Vec::new()).await.unwrap();
        // Flip one byte inside a large (streamed) layer.
        let pos = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.size() > MAX_MANIFEST_BYTES as u64)
            .map(|e| e.raw_file_position() as usize + 1000)
            .unwrap();
        tar[pos] ^= 0xff;
        let e = import(to.clone(), std::io::Cursor::new(tar.clone()), None, &Under("dev/")).await.unwrap_err();
        assert!(e.contains("nothing was imported"), "{e}");
        assert!(to.tag_digest("dev/app", "1").unwrap().is_none());
        assert_eq!(to.usage().unwrap(), crate::store::Usage::default(), "no blob stored");
        assert!(to.repositories(None, 10).unwrap().0.is_empty());
        // Not a layout at all.
        let e = import(to.clone(), &b"not a tar"[..], None, &Under("dev/")).await.unwrap_err();
        assert!(e.contains("oci-layout") || e.contains("bundle"), "{e}");
    }

    #[test]
    fn references_name_a_repository_and_a_tag_or_digest() {
        let (r, t) = parse_ref("docker.io/library/alpine:3.20").unwrap();
        assert_eq!((r.as_str(), t.to_string().as_str()), ("docker.io/library/alpine", "3.20"));
        let d = Digest::sha256_of(b"x");
        let (r, t) = parse_ref(&format!("dev/app@{d}")).unwrap();
        assert_eq!((r.as_str(), t), ("dev/app", Reference::Digest(d)));
        assert!(parse_ref("dev/app").unwrap_err().contains("names no tag"));
        assert!(parse_ref("Dev/App:1").is_err());
    }
}
