//! Online garbage collection of hosted content, and upload expiry. Mark from every manifest of
//! every repository (configs, layers, index children; referrers are manifests themselves, so
//! they are roots), sweep hosted blob links no manifest of their repository references and
//! blob files no repository links, both only when older than the grace period. Retention
//! untags first, so what it releases goes in the same run.

use super::policy::Policy;
use super::Store;
use crate::oci::manifest;
use crate::oci::Digest;
use serde::Serialize;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A hosted repository's policy; None for mirrored repositories.
pub type PolicyOf = Arc<dyn Fn(&str) -> Option<Policy> + Send + Sync>;

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub tags_removed: Vec<String>,
    pub manifests_removed: Vec<String>,
    pub links_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

fn older_than(path: &std::path::Path, grace: Duration) -> bool {
    fs::metadata(path).and_then(|m| m.modified()).map(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= grace).unwrap_or(false)
}

impl Store {
    fn link_path(&self, repo: &str, d: &Digest) -> std::path::PathBuf {
        self.root.join("repositories").join(repo).join("_layers").join(d.algorithm().as_str()).join(d.hex())
    }

    fn tag_time(&self, repo: &str, tag: &str) -> SystemTime {
        fs::metadata(self.root.join("repositories").join(repo).join("_tags").join(tag))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Applies retention to one hosted repository: untags what the policy expires and removes
    /// the manifests that leaves unreachable by tag and unreferenced by other manifests.
    fn retention(&self, repo: &str, policy: &Policy, dry_run: bool, report: &mut GcReport) -> io::Result<()> {
        let Some(tags) = self.tags(repo) else { return Ok(()) };
        let mut by_age: Vec<(SystemTime, String)> = tags.into_iter().map(|t| (self.tag_time(repo, &t), t)).collect();
        by_age.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        let newest_first: Vec<String> = by_age.into_iter().map(|(_, t)| t).collect();
        let expired: Vec<String> = policy.expired(&newest_first).into_iter().map(str::to_string).collect();
        let mut released = Vec::new();
        for t in &expired {
            report.tags_removed.push(format!("{repo}:{t}"));
            if let Some(d) = self.tag_digest(repo, t) {
                released.push(d);
            }
            if !dry_run {
                self.delete_tag(repo, t)?;
            }
        }
        let still_tagged: HashSet<Digest> =
            newest_first.iter().filter(|t| !expired.contains(t)).filter_map(|t| self.tag_digest(repo, t)).collect();
        let children: HashSet<Digest> = self.manifest_refs(repo).into_iter().flat_map(|(_, refs)| refs).collect();
        for d in released {
            if still_tagged.contains(&d) || children.contains(&d) {
                continue;
            }
            report.manifests_removed.push(format!("{repo}@{d}"));
            if !dry_run {
                self.delete_manifest(repo, &d)?;
            }
        }
        Ok(())
    }

    /// Every manifest of `repo` with the digests it references (configs, layers, children).
    fn manifest_refs(&self, repo: &str) -> Vec<(Digest, Vec<Digest>)> {
        let manifests: Vec<(Digest, String)> = self
            .repos
            .read()
            .get(repo)
            .map(|r| r.manifests.iter().map(|(d, m)| (d.clone(), m.media_type.clone())).collect())
            .unwrap_or_default();
        manifests
            .into_iter()
            .map(|(d, mt)| {
                let refs = self
                    .manifest_bytes(&d)
                    .ok()
                    .flatten()
                    .and_then(|b| manifest::inspect(&b, Some(&mt)).or_else(|_| manifest::inspect(&b, None)).ok())
                    .map(|i| i.blobs.into_iter().chain(i.children).collect())
                    .unwrap_or_default();
                (d, refs)
            })
            .collect()
    }

    /// Runs retention, then mark and sweep. `policy_of` gives a hosted repository's policy and
    /// is None for mirrored repositories, whose content only the cache bound removes.
    pub async fn gc(self: &Arc<Self>, policy_of: PolicyOf, grace: Duration, dry_run: bool) -> io::Result<GcReport> {
        let _exclusive = self.gc_lock.write().await;
        // The walk and the deletions are blocking file I/O: off the async threads (the admin
        // listener that asks for a collection must keep answering /readyz meanwhile).
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.gc_locked(&*policy_of, grace, dry_run)).await.map_err(io::Error::other)?
    }

    fn gc_locked(&self, policy_of: &(dyn Fn(&str) -> Option<Policy> + Sync), grace: Duration, dry_run: bool) -> io::Result<GcReport> {
        let mut report = GcReport { dry_run, ..Default::default() };
        let repos: Vec<String> = self.repos.read().keys().cloned().collect();
        for repo in &repos {
            if let Some(p) = policy_of(repo) {
                self.retention(repo, &p, dry_run, &mut report)?;
            }
        }
        // Mark: everything any manifest in any repository references, and the manifests.
        let mut marked: HashSet<Digest> = HashSet::new();
        let mut link_sweep: Vec<(String, Digest)> = Vec::new();
        for repo in &repos {
            let refs = self.manifest_refs(repo);
            let removed: HashSet<String> =
                report.manifests_removed.iter().filter_map(|m| m.strip_prefix(&format!("{repo}@"))).map(str::to_string).collect();
            let mut in_repo: HashSet<Digest> = HashSet::new();
            for (d, r) in refs {
                if dry_run && removed.contains(&d.to_string()) {
                    continue;
                }
                marked.insert(d.clone());
                in_repo.insert(d);
                in_repo.extend(r.iter().cloned());
                marked.extend(r);
            }
            if policy_of(repo).is_some() {
                let links: Vec<Digest> = self.repos.read().get(repo).map(|r| r.blobs.iter().cloned().collect()).unwrap_or_default();
                for d in links {
                    if !in_repo.contains(&d) && older_than(&self.link_path(repo, &d), grace) {
                        link_sweep.push((repo.clone(), d));
                    }
                }
            }
        }
        report.links_removed = link_sweep.len();
        if !dry_run {
            for (repo, d) in &link_sweep {
                self.unlink_blob(repo, d)?;
            }
        }
        // Sweep files nothing links or references any more.
        let swept_links: HashSet<&(String, Digest)> = link_sweep.iter().collect();
        let linked: HashSet<Digest> = self
            .repos
            .read()
            .iter()
            .flat_map(|(name, r)| {
                r.blobs.iter().filter(|d| !swept_links.contains(&(name.clone(), (*d).clone()))).cloned().collect::<Vec<_>>()
            })
            .collect();
        for d in self.all_blobs()? {
            if marked.contains(&d) || linked.contains(&d) {
                continue;
            }
            let path = self.blob_path(&d);
            if !older_than(&path, grace) {
                continue;
            }
            report.blobs_removed += 1;
            report.bytes_freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                self.lru.remove(&d);
                self.remove_blob_file(&d)?;
            }
        }
        Ok(report)
    }

    /// Every committed blob file's digest.
    pub fn all_blobs(&self) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for algo in fs::read_dir(self.root.join("blobs"))? {
            let algo = algo?;
            let a = algo.file_name().to_string_lossy().into_owned();
            for prefix in fs::read_dir(algo.path())? {
                for f in fs::read_dir(prefix?.path())? {
                    if let Ok(d) = Digest::parse(&format!("{a}:{}", f?.file_name().to_string_lossy())) {
                        out.push(d);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManifestMeta;
    use bytes::Bytes;

    fn image(s: &Store, repo: &str, tag: &str, layer: &[u8]) -> (Digest, Digest) {
        let ld = Digest::sha256_of(layer);
        s.put_blob_bytes(layer, &ld).unwrap();
        s.link_blob(repo, &ld).unwrap();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{ld}","size":1}},"layers":[{{"digest":"{ld}","size":1}}]}}"#,
            manifest::OCI_MANIFEST
        );
        let md = Digest::sha256_of(m.as_bytes());
        let meta = ManifestMeta { media_type: manifest::OCI_MANIFEST.into(), size: m.len() as u64, ..Default::default() };
        s.put_manifest(repo, &md, Bytes::from(m), meta, Some(tag)).unwrap();
        (md, ld)
    }

    #[tokio::test]
    async fn sweeps_only_unreferenced_old_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (m1, l1) = image(&s, "team/a", "v1", b"layer-one");
        let (_m2, l2) = image(&s, "team/a", "v2", b"layer-two");
        let orphan = Digest::sha256_of(b"pushed but never used");
        s.put_blob_bytes(b"pushed but never used", &orphan).unwrap();
        s.link_blob("team/a", &orphan).unwrap();
        let hosted = |_: &str| Some(Policy::default());
        // Within the grace period nothing goes.
        let hosted: PolicyOf = Arc::new(hosted);
        let r = s.gc(hosted.clone(), Duration::from_secs(3600), false).await.unwrap();
        assert_eq!((r.blobs_removed, r.links_removed), (0, 0));
        s.delete_manifest("team/a", &m1).unwrap();
        let dry = s.gc(hosted.clone(), Duration::ZERO, true).await.unwrap();
        assert!(dry.blobs_removed >= 2 && s.blob_size(&l1).is_some() && s.blob_size(&orphan).is_some(), "dry run removes nothing");
        let r = s.gc(hosted.clone(), Duration::ZERO, false).await.unwrap();
        assert_eq!(r.blobs_removed, dry.blobs_removed);
        assert!(s.blob_size(&l1).is_none() && s.blob_size(&orphan).is_none() && s.blob_size(&m1).is_none());
        assert!(s.blob_size(&l2).is_some(), "a referenced blob is never deleted");
        assert!(s.blob_linked("team/a", &l2));
    }

    #[tokio::test]
    async fn retention_untags_and_collects() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut layers = Vec::new();
        for (i, t) in ["old", "v1", "mid", "new"].iter().enumerate() {
            layers.push(image(&s, "team/a", t, format!("layer-{i}").as_bytes()).1);
            // Tag times order the tags; make them distinct.
            let p = dir.path().join("repositories/team/a/_tags").join(t);
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i as u64)).unwrap();
        }
        let policy = Policy::new(Some(2), &["v*".into()], &[], None).unwrap();
        let r = s.gc(Arc::new(move |_: &str| Some(policy.clone())), Duration::ZERO, false).await.unwrap();
        assert_eq!(r.tags_removed, vec!["team/a:old".to_string()]);
        assert_eq!(s.tags("team/a").unwrap(), vec!["mid", "new", "v1"]);
        assert!(s.blob_size(&layers[0]).is_none());
        assert!(layers[1..].iter().all(|l| s.blob_size(l).is_some()));
    }
}
