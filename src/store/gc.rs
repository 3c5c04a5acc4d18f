//! Online garbage collection of hosted content, and upload expiry. Mark from every manifest of
//! every repository (configs, layers, index children; referrers are manifests themselves, so
//! they are roots), sweep hosted blob links no manifest of their repository references and
//! blob files no repository links, both only when older than the grace period. Retention
//! untags first, so what it releases goes in the same run.

use super::error::Result;
use super::policy::Policy;
use super::Store;
use crate::oci::manifest;
use crate::oci::Digest;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Blobs forgotten per metadata commit during a sweep.
const SWEEP_BATCH: usize = 256;

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

impl Store {
    /// Applies retention to one hosted repository: untags what the policy expires and removes
    /// the manifests that leaves unreachable by tag and unreferenced by other manifests.
    fn retention(&self, repo: &str, policy: &Policy, dry_run: bool, report: &mut GcReport) -> Result<()> {
        let mut by_age: Vec<(u64, String, Digest)> =
            self.meta.tags_with_times(repo)?.into_iter().map(|(t, r)| (r.updated_ms, t, r.digest)).collect();
        by_age.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        let newest_first: Vec<String> = by_age.iter().map(|(_, t, _)| t.clone()).collect();
        let expired: HashSet<String> = policy.expired(&newest_first).into_iter().map(str::to_string).collect();
        let mut released = Vec::new();
        for (_, t, d) in &by_age {
            if !expired.contains(t) {
                continue;
            }
            report.tags_removed.push(format!("{repo}:{t}"));
            released.push(d.clone());
            if !dry_run {
                let res = self.meta.delete_tag(repo, t, policy.is_immutable(t));
                self.reads.changed(super::Changed::Tags(repo, std::slice::from_ref(t)));
                res?;
            }
        }
        let still_tagged: HashSet<&Digest> = by_age.iter().filter(|(_, t, _)| !expired.contains(t)).map(|(_, _, d)| d).collect();
        let children: HashSet<Digest> = self.manifest_refs(repo)?.into_iter().flat_map(|(_, refs)| refs).collect();
        for d in released {
            if still_tagged.contains(&d) || children.contains(&d) || report.manifests_removed.contains(&format!("{repo}@{d}")) {
                continue;
            }
            report.manifests_removed.push(format!("{repo}@{d}"));
            if !dry_run {
                let p = policy.clone();
                let res = self.meta.delete_manifest(repo, &d, &move |t: &str| p.is_immutable(t));
                self.reads.changed(super::Changed::Everything);
                res?;
            }
        }
        Ok(())
    }

    /// What a manifest references (configs, layers, children); nothing if its bytes are gone.
    fn refs_of(&self, d: &Digest, media_type: &str) -> Vec<Digest> {
        self.manifest_bytes(d)
            .ok()
            .flatten()
            .and_then(|b| manifest::inspect(&b, Some(media_type)).or_else(|_| manifest::inspect(&b, None)).ok())
            .map(|i| i.blobs.into_iter().chain(i.children).collect())
            .unwrap_or_default()
    }

    /// The immutable tag (if any) whose image references `d`, directly or through an index's
    /// children: such a blob must not be unlinked, or the image breaks.
    pub fn pinned_by_immutable(&self, repo: &str, d: &Digest, immutable: &dyn Fn(&str) -> bool) -> Result<Option<String>> {
        for (tag, rec) in self.meta.tags_with_times(repo)? {
            if !immutable(&tag) {
                continue;
            }
            let mut todo = vec![rec.digest];
            let mut seen = HashSet::new();
            while let Some(m) = todo.pop() {
                if !seen.insert(m.clone()) {
                    continue;
                }
                let Some(meta) = self.manifest_meta(repo, &m)? else { continue };
                for r in self.refs_of(&m, &meta.media_type) {
                    if &r == d {
                        return Ok(Some(tag));
                    }
                    todo.push(r);
                }
            }
        }
        Ok(None)
    }

    /// Every manifest of `repo` with the digests it references.
    fn manifest_refs(&self, repo: &str) -> Result<Vec<(Digest, Vec<Digest>)>> {
        Ok(self.meta.manifests(repo)?.into_iter().map(|(d, m)| (d.clone(), self.refs_of(&d, &m.media_type))).collect())
    }

    /// Runs retention, then mark and sweep. `policy_of` gives a hosted repository's policy and
    /// is None for mirrored repositories, whose content only the cache bound removes.
    ///
    /// Nothing blocks pushes meanwhile: the mark reads a snapshot, and each sweep re-checks
    /// under the metadata store's write lock (and the digest's stripe) that the link or blob is
    /// still unused since the cutoff. Every reuse (a push, a mount, a manifest referencing it)
    /// refreshes those times under the same lock, so what a reuse touched is never swept.
    pub async fn gc(self: &Arc<Self>, policy_of: PolicyOf, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _one = self.gc_running.lock().await;
        let store = self.clone();
        super::blocking(move || store.gc_blocking(&*policy_of, grace, dry_run)).await
    }

    fn gc_blocking(&self, policy_of: &(dyn Fn(&str) -> Option<Policy> + Sync), grace: Duration, dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport { dry_run, ..Default::default() };
        // A reuse in the very millisecond the collection starts must count as after it.
        let cutoff = super::now_ms().saturating_sub(grace.as_millis() as u64 + 1);
        let mut repos = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = self.meta.repositories(after.as_deref(), 1000)?;
            after = page.last().cloned();
            repos.extend(page);
            if !more {
                break;
            }
        }
        for repo in &repos {
            if let Some(p) = policy_of(repo) {
                self.retention(repo, &p, dry_run, &mut report)?;
            }
        }
        // Mark from a snapshot of every manifest.
        let removed: HashSet<&str> = report.manifests_removed.iter().map(String::as_str).collect();
        let mut listed: Vec<(String, Digest, String)> = Vec::new();
        self.meta.all_manifests(&mut |repo, d, m| listed.push((repo.to_string(), d, m.media_type.clone())))?;
        let mut marked: HashSet<Digest> = HashSet::new();
        let mut in_repo: HashMap<String, HashSet<Digest>> = HashMap::new();
        for (repo, d, mt) in listed {
            if dry_run && removed.contains(format!("{repo}@{d}").as_str()) {
                continue;
            }
            let refs = self.refs_of(&d, &mt);
            let set = in_repo.entry(repo).or_default();
            set.insert(d.clone());
            set.extend(refs.iter().cloned());
            marked.insert(d);
            marked.extend(refs);
        }
        // Hosted links no manifest of their repository references.
        let mut swept_links: HashSet<(String, Digest)> = HashSet::new();
        for repo in &repos {
            if policy_of(repo).is_none() {
                continue;
            }
            let empty = HashSet::new();
            let referenced = in_repo.get(repo).unwrap_or(&empty);
            for (d, linked_ms) in self.meta.links(repo)? {
                if referenced.contains(&d) || linked_ms > cutoff {
                    continue;
                }
                if dry_run || self.meta.unlink_if_stale(repo, &d, cutoff)? {
                    swept_links.insert((repo.clone(), d));
                }
            }
        }
        report.links_removed = swept_links.len();
        // Blobs nothing holds any more.
        let mut candidates = Vec::new();
        self.meta.blobs(&mut |d, r| {
            if !marked.contains(&d) && r.used_ms <= cutoff {
                candidates.push((d, r.size));
            }
        })?;
        if dry_run {
            for (d, size) in candidates {
                let holders = self.meta.holders(&d)?;
                if holders.iter().all(|r| swept_links.contains(&(r.clone(), d.clone())) || removed.contains(format!("{r}@{d}").as_str())) {
                    report.blobs_removed += 1;
                    report.bytes_freed += size;
                }
            }
            return Ok(report);
        }
        // In batches: one commit per batch, under the stripes of every digest in it (taken in
        // order, so publishers, which take one, never deadlock with it) until the files are
        // gone.
        for batch in candidates.chunks(SWEEP_BATCH) {
            let digests: Vec<Digest> = batch.iter().map(|(d, _)| d.clone()).collect();
            let mut stripes: Vec<usize> = digests.iter().map(|d| self.stripe_index(d)).collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _held: Vec<_> = stripes.iter().map(|&i| self.blob_locks[i].lock()).collect();
            for (d, size) in self.meta.forget_blobs_if_unused(&digests, cutoff)? {
                self.lru.remove(&d);
                self.manifest_bytes.invalidate(&d);
                self.blobs.delete(&d)?;
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ManifestMeta, TagExpect};
    use bytes::Bytes;

    /// Waits (bounded) until the millisecond clock has moved past the last write.
    fn next_ms() {
        let start = crate::store::now_ms();
        for _ in 0..1_000_000 {
            if crate::store::now_ms() > start + 1 {
                return;
            }
            std::thread::yield_now();
        }
        panic!("clock did not advance");
    }

    fn none() -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
        Arc::new(|_: &str| false)
    }

    async fn image(s: &Arc<Store>, repo: &str, tag: &str, layer: &[u8]) -> (Digest, Digest) {
        let ld = Digest::sha256_of(layer);
        s.put_blob_bytes(Bytes::copy_from_slice(layer), &ld).await.unwrap();
        s.link_blob(repo, &ld, None).await.unwrap();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{ld}","size":1}},"layers":[{{"digest":"{ld}","size":1}}]}}"#,
            manifest::OCI_MANIFEST
        );
        let md = Digest::sha256_of(m.as_bytes());
        let meta = ManifestMeta { media_type: manifest::OCI_MANIFEST.into(), size: m.len() as u64, ..Default::default() };
        s.put_manifest(repo, &md, Bytes::from(m), meta, vec![tag.into()], TagExpect::Any, (vec![ld.clone()], vec![]), none(), None)
            .await
            .unwrap();
        (md, ld)
    }

    #[tokio::test]
    async fn sweeps_only_unreferenced_old_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (m1, l1) = image(&s, "team/a", "v1", b"layer-one").await;
        let (_m2, l2) = image(&s, "team/a", "v2", b"layer-two").await;
        let orphan = Digest::sha256_of(b"pushed but never used");
        s.put_blob_bytes(Bytes::from_static(b"pushed but never used"), &orphan).await.unwrap();
        s.link_blob("team/a", &orphan, None).await.unwrap();
        let hosted = |_: &str| Some(Policy::default());
        // Within the grace period nothing goes.
        let hosted: PolicyOf = Arc::new(hosted);
        let r = s.gc(hosted.clone(), Duration::from_secs(3600), false).await.unwrap();
        assert_eq!((r.blobs_removed, r.links_removed), (0, 0));
        s.delete_manifest("team/a", &m1, none()).await.unwrap();
        next_ms();
        let dry = s.gc(hosted.clone(), Duration::ZERO, true).await.unwrap();
        let size = |d: &Digest| s.blob_size(d).unwrap();
        assert!(dry.blobs_removed >= 2 && size(&l1).is_some() && size(&orphan).is_some(), "dry run removes nothing");
        let r = s.gc(hosted.clone(), Duration::ZERO, false).await.unwrap();
        assert_eq!(r.blobs_removed, dry.blobs_removed);
        assert!(size(&l1).is_none() && size(&orphan).is_none() && size(&m1).is_none());
        assert!(size(&l2).is_some(), "a referenced blob is never deleted");
        assert!(s.blob_linked("team/a", &l2).unwrap());
        assert!(s.meta().recount(false).unwrap().is_empty());
    }

    #[tokio::test]
    async fn retention_untags_and_collects() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut layers = Vec::new();
        for (i, t) in ["old", "v1", "mid", "new"].iter().enumerate() {
            let (m, l) = image(&s, "team/a", t, format!("layer-{i}").as_bytes()).await;
            layers.push(l);
            // Tag times order the tags; make them distinct.
            s.meta().set_tag("team/a", t, &m, &TagExpect::Any, false, 1000 + i as u64).unwrap();
        }
        next_ms();
        let policy = Policy::new(Some(2), &["v*".into()], &[], None).unwrap();
        let r = s.gc(Arc::new(move |_: &str| Some(policy.clone())), Duration::ZERO, false).await.unwrap();
        assert_eq!(r.tags_removed, vec!["team/a:old".to_string()]);
        assert_eq!(s.tags("team/a", None, 100).unwrap().unwrap().0, vec!["mid", "new", "v1"]);
        assert!(s.blob_size(&layers[0]).unwrap().is_none());
        assert!(layers[1..].iter().all(|l| s.blob_size(l).unwrap().is_some()));
    }

    /// Pushes that reuse old orphans while collections run: nothing a manifest references is
    /// ever swept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gc_racing_pushes_that_reuse_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let n = 150;
        let layers: Vec<Vec<u8>> = (0..n).map(|i| format!("orphan layer {i}").into_bytes()).collect();
        for l in &layers {
            // Orphans: stored long ago (at the epoch), linked nowhere.
            let d = Digest::sha256_of(l);
            let mut t = s.blobs().create(&d).unwrap();
            t.write(l).unwrap();
            t.publish(&d).unwrap();
            s.meta().record_blob(&d, l.len() as u64, 1, None).unwrap();
        }
        let policy: PolicyOf = Arc::new(|_: &str| Some(Policy::default()));
        let gcs = {
            let (s, policy) = (s.clone(), policy.clone());
            tokio::spawn(async move {
                let mut swept = 0;
                for _ in 0..20 {
                    // A grace of an hour: the orphans are older, the pushes' own links younger.
                    swept += s.gc(policy.clone(), Duration::from_secs(3600), false).await.unwrap().blobs_removed;
                }
                swept
            })
        };
        let mut pushed = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let d = Digest::sha256_of(l);
            // The reuse path a client takes: the blob is put again (or found and refreshed),
            // linked, then referenced. A sweep may win before the put; then the put stores it.
            s.put_blob_bytes(Bytes::from(l.clone()), &d).await.unwrap();
            let linked = s.link_blob("team/r", &d, None).await;
            if linked.is_err() {
                // Swept between the put and the link: the client would re-upload.
                s.put_blob_bytes(Bytes::from(l.clone()), &d).await.unwrap();
                s.link_blob("team/r", &d, None).await.unwrap();
            }
            let m = format!(
                r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{d}","size":1}},"layers":[]}}"#,
                manifest::OCI_MANIFEST
            );
            let md = Digest::sha256_of(m.as_bytes());
            let meta = ManifestMeta { media_type: manifest::OCI_MANIFEST.into(), size: m.len() as u64, ..Default::default() };
            s.put_manifest(
                "team/r",
                &md,
                Bytes::from(m),
                meta,
                vec![format!("t{i}")],
                TagExpect::Any,
                (vec![d.clone()], vec![]),
                none(),
                None,
            )
            .await
            .unwrap();
            pushed.push((md, d));
        }
        let swept = gcs.await.unwrap();
        // One more collection after the pushes: still nothing referenced goes.
        s.gc(policy, Duration::from_secs(3600), false).await.unwrap();
        for (md, d) in &pushed {
            assert!(s.blob_size(d).unwrap().is_some() && s.blobs().stat(d).unwrap().is_some(), "referenced blob {d} swept");
            assert!(s.manifest_bytes(md).unwrap().is_some());
        }
        assert!(s.meta().recount(false).unwrap().is_empty());
        eprintln!("collections swept {swept} orphans while pushes reused the rest");
    }
}
