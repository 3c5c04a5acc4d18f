//! Bytes on disk. Content-addressed blobs (`blobs/<algo>/<2 hex>/<hex>`), per-repository links,
//! manifests and tags, upload sessions. Every write goes to a temp file on the same filesystem
//! while hashing, then fsync and rename, so a crash never leaves a partial object under its
//! final name. Disk is the truth; the in-memory index is rebuilt from it at open.
//! Never imports pingora or the upstream client: the registry and the mirror share it.

mod cache;
pub mod fsck;
pub mod gc;
mod index;
pub mod policy;
pub mod upload;
mod usage;

pub use index::{ManifestMeta, RepoIndex};
pub use usage::Usage;

use crate::oci::{Algorithm, Digest, ErrorCode, Hasher, OciError};
use bytes::Bytes;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Store {
    root: PathBuf,
    repos: RwLock<HashMap<String, RepoIndex>>,
    /// Manifest bodies are small and hot; keep them in memory, bounded by bytes.
    manifest_bytes: moka::sync::Cache<Digest, Bytes>,
    pub uploads: upload::Uploads,
    lru: cache::Lru,
    cache_roots: RwLock<Vec<String>>,
    /// Manifest PUTs hold it shared, GC exclusively: a blob a new manifest references is
    /// never swept between the PUT's check and its write.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
}

/// A blob being written: temp file plus running hash.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Hasher,
    written: u64,
    committed: bool,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }
    pub fn written(&self) -> u64 {
        self.written
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn algo_dir(a: Algorithm) -> &'static str {
    a.as_str()
}

impl Store {
    pub fn open(root: &Path) -> io::Result<Arc<Store>> {
        for d in ["blobs", "repositories", "tmp", "uploads"] {
            fs::create_dir_all(root.join(d))?;
        }
        // Temp files are never valid after a restart: only renamed objects count.
        for e in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        let repos = index::load(&root.join("repositories"))?;
        let store = Store {
            root: root.to_path_buf(),
            repos: RwLock::new(repos),
            manifest_bytes: moka::sync::Cache::builder()
                .weigher(|_k: &Digest, v: &Bytes| v.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(64 * 1024 * 1024)
                .build(),
            uploads: upload::Uploads::new(root.join("uploads")),
            lru: cache::Lru::default(),
            cache_roots: RwLock::new(Vec::new()),
            gc_lock: tokio::sync::RwLock::new(()),
        };
        Ok(Arc::new(store))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(algo_dir(d.algorithm())).join(&d.hex()[..2]).join(d.hex())
    }

    /// Size of a committed blob, if the store has it.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d)).ok().map(|m| m.len())
    }

    pub fn open_blob(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(d)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(uuid::Uuid::new_v4().to_string())
    }

    pub fn writer(&self, algo: Algorithm) -> io::Result<BlobWriter> {
        let path = self.temp_path();
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(BlobWriter { file, path, hasher: Hasher::new(algo), written: 0, committed: false })
    }

    /// Verifies and publishes a written blob under its digest. A mismatch removes the temp file.
    pub fn commit(&self, mut w: BlobWriter, expected: &Digest) -> Result<u64, OciError> {
        let actual = if expected.algorithm() == Algorithm::Sha256 {
            std::mem::replace(&mut w.hasher, Hasher::new(Algorithm::Sha256)).finish()
        } else {
            hash_file(&w.path, expected.algorithm())?
        };
        if &actual != expected {
            return Err(OciError::msg(ErrorCode::DigestInvalid, format!("content digest {actual} does not match {expected}"))
                .detail(serde_json::json!({"expected": expected.to_string(), "actual": actual.to_string()})));
        }
        w.file.sync_all()?;
        self.publish(&w.path, expected)?;
        w.committed = true;
        Ok(w.written)
    }

    /// Renames a verified temp file to the blob's final place. Two writers of one blob both
    /// succeed: the rename is atomic and the content identical.
    pub fn publish(&self, tmp: &Path, d: &Digest) -> io::Result<()> {
        let dest = self.blob_path(d);
        fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
        fs::rename(tmp, &dest)?;
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn put_blob_bytes(&self, data: &[u8], d: &Digest) -> Result<(), OciError> {
        if self.blob_size(d).is_some() {
            return Ok(());
        }
        let mut w = self.writer(d.algorithm())?;
        w.write(data)?;
        self.commit(w, d)?;
        Ok(())
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join("repositories").join(repo)
    }

    // ---- per-repository blob links ----

    pub fn link_blob(&self, repo: &str, d: &Digest) -> io::Result<()> {
        let p = self.repo_dir(repo).join("_layers").join(algo_dir(d.algorithm())).join(d.hex());
        if self.repos.read().get(repo).is_some_and(|r| r.blobs.contains(d)) {
            // A re-push restarts the GC grace period of the link.
            let _ = File::options().write(true).open(&p).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(());
        }
        fs::create_dir_all(p.parent().expect("link has a parent"))?;
        File::create(&p)?;
        self.repos.write().entry(repo.to_string()).or_default().blobs.insert(d.clone());
        Ok(())
    }

    pub fn blob_linked(&self, repo: &str, d: &Digest) -> bool {
        self.repos.read().get(repo).is_some_and(|r| r.blobs.contains(d) || r.manifests.contains_key(d))
    }

    pub fn unlink_blob(&self, repo: &str, d: &Digest) -> io::Result<bool> {
        let removed = self.repos.write().get_mut(repo).is_some_and(|r| r.blobs.remove(d));
        if removed {
            let p = self.repo_dir(repo).join("_layers").join(algo_dir(d.algorithm())).join(d.hex());
            remove_if_exists(&p)?;
        }
        Ok(removed)
    }

    // ---- manifests and tags ----

    /// Stores a manifest's exact bytes as a blob, records its metadata in the repository and
    /// optionally points a tag at it. The manifest is visible only after its bytes are durable.
    pub fn put_manifest(&self, repo: &str, d: &Digest, bytes: Bytes, meta: ManifestMeta, tag: Option<&str>) -> Result<(), OciError> {
        self.put_blob_bytes(&bytes, d)?;
        let mdir = self.repo_dir(repo).join("_manifests").join(algo_dir(d.algorithm()));
        fs::create_dir_all(&mdir)?;
        write_atomic(&self.root, &mdir.join(d.hex()), &serde_json::to_vec(&meta).expect("meta serializes"))?;
        self.manifest_bytes.insert(d.clone(), bytes);
        self.repos.write().entry(repo.to_string()).or_default().manifests.insert(d.clone(), meta);
        // The tag last: it is only ever written for a manifest that is already complete.
        if let Some(tag) = tag {
            self.set_tag(repo, tag, d)?;
        }
        Ok(())
    }

    /// Points a tag at a manifest already in `repo`.
    pub fn set_tag(&self, repo: &str, tag: &str, d: &Digest) -> io::Result<()> {
        let tdir = self.repo_dir(repo).join("_tags");
        fs::create_dir_all(&tdir)?;
        write_atomic(&self.root, &tdir.join(tag), d.to_string().as_bytes())?;
        self.repos.write().entry(repo.to_string()).or_default().tags.insert(tag.to_string(), d.clone());
        Ok(())
    }

    pub fn tag_digest(&self, repo: &str, tag: &str) -> Option<Digest> {
        self.repos.read().get(repo).and_then(|r| r.tags.get(tag).cloned())
    }

    pub fn manifest_meta(&self, repo: &str, d: &Digest) -> Option<ManifestMeta> {
        self.repos.read().get(repo).and_then(|r| r.manifests.get(d).cloned())
    }

    /// The manifest bytes, from memory or from the blob file.
    pub fn manifest_bytes(&self, d: &Digest) -> io::Result<Option<Bytes>> {
        if let Some(b) = self.manifest_bytes.get(d) {
            return Ok(Some(b));
        }
        match fs::read(self.blob_path(d)) {
            Ok(v) => {
                let b = Bytes::from(v);
                self.manifest_bytes.insert(d.clone(), b.clone());
                Ok(Some(b))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a manifest revision and every tag pointing at it.
    pub fn delete_manifest(&self, repo: &str, d: &Digest) -> io::Result<bool> {
        let tags: Vec<String> = {
            let mut repos = self.repos.write();
            let Some(r) = repos.get_mut(repo) else { return Ok(false) };
            if r.manifests.remove(d).is_none() {
                return Ok(false);
            }
            let tags: Vec<String> = r.tags.iter().filter(|(_, v)| *v == d).map(|(k, _)| k.clone()).collect();
            for t in &tags {
                r.tags.remove(t);
            }
            tags
        };
        for t in tags {
            remove_if_exists(&self.repo_dir(repo).join("_tags").join(t))?;
        }
        remove_if_exists(&self.repo_dir(repo).join("_manifests").join(algo_dir(d.algorithm())).join(d.hex()))?;
        Ok(true)
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> io::Result<bool> {
        let removed = self.repos.write().get_mut(repo).is_some_and(|r| r.tags.remove(tag).is_some());
        if removed {
            remove_if_exists(&self.repo_dir(repo).join("_tags").join(tag))?;
        }
        Ok(removed)
    }

    /// Sorted tags of a repository, or None when the repository is unknown.
    pub fn tags(&self, repo: &str) -> Option<Vec<String>> {
        let repos = self.repos.read();
        let r = repos.get(repo).filter(|r| !r.is_empty())?;
        Some(r.tags.keys().cloned().collect())
    }

    /// Sorted names of every repository with content.
    pub fn repositories(&self) -> Vec<String> {
        let mut v: Vec<String> = self.repos.read().iter().filter(|(_, r)| !r.is_empty()).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }

    /// Manifests in `repo` whose subject is `subject`, as descriptors.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> Vec<crate::oci::manifest::Descriptor> {
        let repos = self.repos.read();
        let Some(r) = repos.get(repo) else { return Vec::new() };
        let mut v: Vec<_> = r
            .manifests
            .iter()
            .filter(|(_, m)| m.subject.as_deref() == Some(&subject.to_string()))
            .map(|(d, m)| crate::oci::manifest::Descriptor {
                media_type: Some(m.media_type.clone()),
                digest: d.to_string(),
                size: m.size as i64,
                artifact_type: m.artifact_type.clone(),
                annotations: m.annotations.clone(),
                urls: None,
                platform: None,
            })
            .collect();
        v.sort_by(|a, b| a.digest.cmp(&b.digest));
        v
    }
}

pub fn hash_file(path: &Path, algo: Algorithm) -> io::Result<Digest> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Hasher::new(algo);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Small metadata files: temp + fsync + rename, so readers see the old or the new, never half.
pub fn write_atomic(root: &Path, dest: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = root.join("tmp").join(uuid::Uuid::new_v4().to_string());
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verifies_and_two_writers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        let mut w1 = s.writer(Algorithm::Sha256).unwrap();
        let mut w2 = s.writer(Algorithm::Sha256).unwrap();
        w1.write(b"hello").unwrap();
        w2.write(b"hello").unwrap();
        assert_eq!(s.commit(w1, &d).unwrap(), 5);
        assert_eq!(s.commit(w2, &d).unwrap(), 5);
        assert_eq!(s.blob_size(&d), Some(5));
        let mut w3 = s.writer(Algorithm::Sha256).unwrap();
        w3.write(b"wrong").unwrap();
        let bad = Digest::sha256_of(b"other");
        assert_eq!(s.commit(w3, &bad).unwrap_err().code, ErrorCode::DigestInvalid);
        assert!(s.blob_size(&bad).is_none());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn index_is_rebuilt_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"{}");
        {
            let s = Store::open(dir.path()).unwrap();
            s.link_blob("team/a", &Digest::sha256_of(b"x")).unwrap();
            let meta = ManifestMeta { media_type: "application/json".into(), size: 2, ..Default::default() };
            s.put_manifest("team/a", &d, Bytes::from_static(b"{}"), meta, Some("v1")).unwrap();
            fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.tag_digest("team/a", "v1"), Some(d.clone()));
        assert!(s.blob_linked("team/a", &Digest::sha256_of(b"x")));
        assert_eq!(s.manifest_bytes(&d).unwrap().unwrap(), Bytes::from_static(b"{}"));
        assert_eq!(s.repositories(), vec!["team/a".to_string()]);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.delete_manifest("team/a", &d).unwrap());
        assert_eq!(s.tag_digest("team/a", "v1"), None);
    }
}
