//! The in-memory view of `repositories/`, rebuilt from disk at open.

use crate::oci::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;

/// What berth records about a manifest beside its bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Default)]
pub struct RepoIndex {
    pub blobs: HashSet<Digest>,
    pub manifests: HashMap<Digest, ManifestMeta>,
    pub tags: BTreeMap<String, Digest>,
}

impl RepoIndex {
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty() && self.manifests.is_empty() && self.tags.is_empty()
    }
}

pub fn load(root: &Path) -> io::Result<HashMap<String, RepoIndex>> {
    let mut out = HashMap::new();
    walk(root, "", &mut out)?;
    Ok(out)
}

fn digests_in(dir: &Path) -> io::Result<Vec<(Digest, std::path::PathBuf)>> {
    let mut v = Vec::new();
    let Ok(algos) = fs::read_dir(dir) else { return Ok(v) };
    for a in algos {
        let a = a?;
        let algo = a.file_name().to_string_lossy().into_owned();
        for e in fs::read_dir(a.path())? {
            let e = e?;
            let s = format!("{algo}:{}", e.file_name().to_string_lossy());
            // Anything unparseable was not written by berth; fsck reports it, load skips it.
            if let Ok(d) = Digest::parse(&s) {
                v.push((d, e.path()));
            }
        }
    }
    Ok(v)
}

fn walk(dir: &Path, name: &str, out: &mut HashMap<String, RepoIndex>) -> io::Result<()> {
    if !name.is_empty() {
        let mut r = RepoIndex::default();
        for (d, _) in digests_in(&dir.join("_layers"))? {
            r.blobs.insert(d);
        }
        for (d, p) in digests_in(&dir.join("_manifests"))? {
            if let Ok(meta) = fs::read(&p).map_err(|_| ()).and_then(|b| serde_json::from_slice(&b).map_err(|_| ())) {
                r.manifests.insert(d, meta);
            }
        }
        if let Ok(tags) = fs::read_dir(dir.join("_tags")) {
            for t in tags {
                let t = t?;
                let content = fs::read_to_string(t.path())?;
                if let Ok(d) = Digest::parse(content.trim()) {
                    if r.manifests.contains_key(&d) {
                        r.tags.insert(t.file_name().to_string_lossy().into_owned(), d);
                    }
                }
            }
        }
        if !r.is_empty() {
            out.insert(name.to_string(), r);
        }
    }
    for e in fs::read_dir(dir)? {
        let e = e?;
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with('_') || !e.file_type()?.is_dir() {
            continue;
        }
        let child = if name.is_empty() { fname } else { format!("{name}/{fname}") };
        walk(&e.path(), &child, out)?;
    }
    Ok(())
}
