//! Whole-store verification: every blob hashes to its name, every link and manifest points at
//! a blob that exists, every hosted manifest's references exist, every tag resolves. With
//! `repair`, whatever cannot be trusted is removed.

use super::Store;
use crate::oci::manifest;
use crate::oci::Digest;
use std::fs;
use std::io;

#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: usize,
    pub problems: Vec<String>,
    pub repaired: usize,
}

impl Store {
    pub fn fsck(&self, repair: bool) -> io::Result<FsckReport> {
        let mut rep = FsckReport::default();
        let mut bad_blobs = Vec::new();
        for algo in fs::read_dir(self.root.join("blobs"))? {
            let algo = algo?;
            let a = algo.file_name().to_string_lossy().into_owned();
            for prefix in fs::read_dir(algo.path())? {
                let prefix = prefix?;
                for f in fs::read_dir(prefix.path())? {
                    let f = f?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    let Ok(d) = Digest::parse(&format!("{a}:{name}")) else {
                        rep.problems.push(format!("stray file {}", f.path().display()));
                        bad_blobs.push((f.path(), None));
                        continue;
                    };
                    rep.blobs_checked += 1;
                    let actual = super::hash_file(&f.path(), d.algorithm())?;
                    if actual != d || !name.starts_with(prefix.file_name().to_string_lossy().as_ref()) {
                        rep.problems.push(format!("blob {d} has content {actual}"));
                        bad_blobs.push((f.path(), Some(d)));
                    }
                }
            }
        }
        if repair {
            for (p, d) in &bad_blobs {
                if let Some(d) = d {
                    self.manifest_bytes.invalidate(d);
                }
                fs::remove_file(p)?;
                rep.repaired += 1;
            }
        }
        let repos: Vec<String> = self.repos.read().keys().cloned().collect();
        for repo in repos {
            let (links, manifests): (Vec<Digest>, Vec<(Digest, String)>) = {
                let g = self.repos.read();
                let Some(r) = g.get(&repo) else { continue };
                (r.blobs.iter().cloned().collect(), r.manifests.iter().map(|(d, m)| (d.clone(), m.media_type.clone())).collect())
            };
            for d in links {
                if self.blob_size(&d).is_none() {
                    rep.problems.push(format!("{repo}: link to missing blob {d}"));
                    if repair {
                        self.unlink_blob(&repo, &d)?;
                        rep.repaired += 1;
                    }
                }
            }
            let hosted = !self.is_cache_repo(&repo);
            for (d, mt) in manifests {
                let problem = match self.manifest_bytes(&d)? {
                    None => Some(format!("{repo}: manifest {d} has no bytes")),
                    // Mirrored manifests may reference content not fetched yet; hosted ones
                    // were checked at push and must stay whole.
                    Some(b) if hosted => manifest::inspect(&b, Some(&mt))
                        .or_else(|_| manifest::inspect(&b, None))
                        .ok()
                        .and_then(|i| {
                            let missing_blob = i.blobs.iter().find(|x| self.blob_size(x).is_none()).map(|x| format!("blob {x}"));
                            let missing_child =
                                i.children.iter().find(|c| self.manifest_meta(&repo, c).is_none()).map(|c| format!("child manifest {c}"));
                            missing_blob.or(missing_child)
                        })
                        .map(|what| format!("{repo}: manifest {d} references missing {what}")),
                    Some(_) => None,
                };
                if let Some(p) = problem {
                    rep.problems.push(p);
                    if repair {
                        self.delete_manifest(&repo, &d)?;
                        rep.repaired += 1;
                    }
                }
            }
        }
        let tmp = fs::read_dir(self.root.join("tmp"))?.count();
        if tmp > 0 {
            rep.problems.push(format!("{tmp} temp files (a writer is running, or berth was not restarted since a crash)"));
        }
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManifestMeta;
    use bytes::Bytes;

    #[test]
    fn finds_and_repairs_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ld = Digest::sha256_of(b"layer");
        s.put_blob_bytes(b"layer", &ld).unwrap();
        s.link_blob("team/a", &ld).unwrap();
        let m = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{ld}","size":5}},"layers":[]}}"#);
        let md = Digest::sha256_of(m.as_bytes());
        s.put_manifest(
            "team/a",
            &md,
            Bytes::from(m),
            ManifestMeta { media_type: manifest::OCI_MANIFEST.into(), ..Default::default() },
            Some("v1"),
        )
        .unwrap();
        assert!(s.fsck(false).unwrap().problems.is_empty());
        fs::write(s.blob_path(&ld), b"bitrot").unwrap();
        let r = s.fsck(false).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        let r = s.fsck(true).unwrap();
        assert!(r.repaired >= 3, "{r:?}"); // the blob, its link, the manifest that needs it
        assert!(s.fsck(false).unwrap().problems.is_empty());
        assert!(s.tag_digest("team/a", "v1").is_none());
    }
}
