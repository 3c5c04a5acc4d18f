//! How many bytes the store holds, by class: blobs some hosted repository references are
//! `hosted`, every other committed blob (mirrored content, orphans awaiting GC) is `cache`.
//! Measured by walking `blobs/`, so it holds whatever wrote the files.

use super::Store;
use crate::oci::Digest;
use std::collections::HashSet;
use std::fs;
use std::io;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub hosted: u64,
    pub cache: u64,
}

impl Store {
    /// Sizes committed blobs; `is_hosted` tells which repositories are hosted.
    pub fn usage(&self, is_hosted: impl Fn(&str) -> bool) -> io::Result<Usage> {
        let hosted: HashSet<Digest> = self
            .repos
            .read()
            .iter()
            .filter(|(name, _)| is_hosted(name))
            .flat_map(|(_, r)| r.blobs.iter().chain(r.manifests.keys()).cloned().collect::<Vec<_>>())
            .collect();
        let mut total = 0u64;
        for algo in read_dir_or_empty(&self.root.join("blobs"))? {
            for prefix in read_dir_or_empty(&algo?.path())? {
                for blob in read_dir_or_empty(&prefix?.path())? {
                    let blob = blob?;
                    // A blob removed by GC between listing and stat is simply not counted.
                    total += blob.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let hosted: u64 = hosted.iter().filter_map(|d| self.blob_size(d)).sum();
        Ok(Usage { hosted, cache: total.saturating_sub(hosted) })
    }
}

fn read_dir_or_empty(p: &std::path::Path) -> io::Result<Box<dyn Iterator<Item = io::Result<fs::DirEntry>>>> {
    match fs::read_dir(p) {
        Ok(d) => Ok(Box::new(d)),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(Box::new(std::iter::empty())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManifestMeta;
    use bytes::Bytes;

    #[test]
    fn blobs_are_split_by_class() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let hosted_blob = Digest::sha256_of(b"hosted layer");
        let cached_blob = Digest::sha256_of(b"a mirrored layer");
        s.put_blob_bytes(b"hosted layer", &hosted_blob).unwrap();
        s.put_blob_bytes(b"a mirrored layer", &cached_blob).unwrap();
        s.link_blob("team/app", &hosted_blob).unwrap();
        s.link_blob("docker.io/library/busybox", &cached_blob).unwrap();
        let m = Digest::sha256_of(b"{}");
        let meta = ManifestMeta { media_type: "application/json".into(), size: 2, ..Default::default() };
        s.put_manifest("team/app", &m, Bytes::from_static(b"{}"), meta, Some("v1")).unwrap();
        let u = s.usage(|r| r.starts_with("team/")).unwrap();
        assert_eq!(u, Usage { hosted: 12 + 2, cache: 16 });
    }
}
