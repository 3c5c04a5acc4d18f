//! Opens a store written by berth 0.1 (one file per fact under `repositories/`): its blobs,
//! links, manifests, tags and upload sessions are imported into the metadata database once,
//! at start, keeping their times; then `repositories/` is renamed `repositories.v1` (kept for
//! a rollback, safe to delete). An interrupted import is redone from the start: every step
//! is idempotent.

use super::meta::RedbMeta;
use crate::oci::Digest;
use crate::store::error::Result;
use crate::store::traits::{BlobStore, ManifestMeta, UploadRec};
use std::fs;
use std::path::Path;
use std::time::UNIX_EPOCH;

pub const LAYOUT_KEY: &str = "layout";
pub const LAYOUT: &str = "2";

fn mtime_ms(p: &Path) -> u64 {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn digests_in(dir: &Path) -> Vec<(Digest, std::path::PathBuf)> {
    let mut v = Vec::new();
    let Ok(algos) = fs::read_dir(dir) else { return v };
    for a in algos.flatten() {
        let algo = a.file_name().to_string_lossy().into_owned();
        for e in fs::read_dir(a.path()).into_iter().flatten().flatten() {
            // Anything unparseable was not written by berth; fsck reports what remains.
            if let Ok(d) = Digest::parse(&format!("{algo}:{}", e.file_name().to_string_lossy())) {
                v.push((d, e.path()));
            }
        }
    }
    v
}

/// Imports the 0.1 layout under `root` if the database has not recorded the current one.
/// Returns how many repositories were imported.
pub fn run(root: &Path, blobs: &dyn BlobStore, meta: &RedbMeta) -> Result<usize> {
    if meta.get_meta(LAYOUT_KEY)?.as_deref() == Some(LAYOUT) {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    // Blobs first: links and manifests count their sizes.
    let mut found = Vec::new();
    blobs.walk(&mut |d, size| {
        if let Ok(d) = d {
            found.push((d, size));
        }
    })?;
    for chunk in found.chunks(10_000) {
        meta.batch(|b| {
            for (d, size) in chunk {
                let p = root.join("blobs").join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex());
                b.record_blob(d, *size, mtime_ms(&p))?;
            }
            Ok(())
        })?;
    }
    let repos_dir = root.join("repositories");
    let mut repos = Vec::new();
    if repos_dir.is_dir() {
        walk(&repos_dir, "", &mut repos);
    }
    for (name, dir) in &repos {
        meta.batch(|b| {
            for (d, p) in digests_in(&dir.join("_layers")) {
                b.import_link(name, &d, mtime_ms(&p))?;
            }
            let mut manifests = std::collections::HashSet::new();
            for (d, p) in digests_in(&dir.join("_manifests")) {
                let Ok(bytes) = fs::read(&p) else { continue };
                let Ok(m) = serde_json::from_slice::<ManifestMeta>(&bytes) else { continue };
                b.import_manifest(name, &d, &m)?;
                manifests.insert(d);
            }
            for t in fs::read_dir(dir.join("_tags")).into_iter().flatten().flatten() {
                let Ok(content) = fs::read_to_string(t.path()) else { continue };
                if let Ok(d) = Digest::parse(content.trim()) {
                    if manifests.contains(&d) {
                        b.import_tag(name, &t.file_name().to_string_lossy(), &d, mtime_ms(&t.path()))?;
                    }
                }
            }
            Ok(())
        })?;
    }
    // Sessions of 0.1 kept their owner in `uploads/<id>/repo`.
    for e in fs::read_dir(root.join("uploads")).into_iter().flatten().flatten() {
        let Ok(repo) = fs::read_to_string(e.path().join("repo")) else { continue };
        let id = e.file_name().to_string_lossy().into_owned();
        let t = mtime_ms(&e.path().join("data"));
        meta.batch(|b| b.put_upload(&id, &UploadRec { repo, client: String::new(), created_ms: t, active_ms: t }))?;
    }
    meta.set_meta(LAYOUT_KEY, LAYOUT)?;
    if repos_dir.is_dir() {
        let moved = root.join("repositories.v1");
        fs::rename(&repos_dir, &moved)?;
        tracing::info!(
            repositories = repos.len(),
            blobs = found.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "imported the berth 0.1 store layout; the old files are in {}",
            moved.display()
        );
    }
    Ok(repos.len())
}

fn walk(dir: &Path, name: &str, out: &mut Vec<(String, std::path::PathBuf)>) {
    if !name.is_empty() && ["_layers", "_manifests", "_tags"].iter().any(|s| dir.join(s).is_dir()) {
        out.push((name.to_string(), dir.to_path_buf()));
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with('_') || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let child = if name.is_empty() { fname } else { format!("{name}/{fname}") };
        walk(&e.path(), &child, out);
    }
}
