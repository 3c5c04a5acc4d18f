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
    ///
    /// Signatures, attestations and SBOMs live as long as their subject: tags that attach them
    /// by name (cosign's `sha256-<hex>.sig`/`.att`/`.sbom`, the OCI referrers tag schema's
    /// `sha256-<hex>`) do not count against `keep_tags` and go with their subject, and so do
    /// untagged referrers (`subject`). An index's untagged children (platform images, buildx
    /// attestation manifests) go with the last index holding them. All only past `cutoff`: a
    /// client may push a signature before the image it signs, or children before their index.
    fn retention(&self, repo: &str, policy: &Policy, cutoff: u64, dry_run: bool, report: &mut GcReport) -> Result<()> {
        let (attached, plain): (Vec<_>, Vec<_>) =
            self.meta.tags_with_times(repo)?.into_iter().partition(|(t, _)| attached_subject(t).is_some());
        let mut by_age: Vec<(u64, String, Digest)> = plain.into_iter().map(|(t, r)| (r.updated_ms, t, r.digest)).collect();
        by_age.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        let newest_first: Vec<String> = by_age.iter().map(|(_, t, _)| t.clone()).collect();
        let mut expired: Vec<String> = policy.expired(&newest_first).into_iter().map(str::to_string).collect();
        let mut candidates: Vec<Digest> = by_age.iter().filter(|(_, t, _)| expired.contains(t)).map(|(_, _, d)| d.clone()).collect();
        let manifests: HashMap<Digest, Option<Digest>> =
            self.meta.manifests(repo)?.into_iter().map(|(d, m)| (d, m.subject.as_deref().and_then(|s| Digest::parse(s).ok()))).collect();
        let refs: HashMap<Digest, HashSet<Digest>> =
            self.manifest_refs(repo)?.into_iter().map(|(d, rs)| (d, rs.into_iter().collect())).collect();
        // How many manifests not (yet) removed reference each digest.
        let mut held: HashMap<&Digest, usize> = HashMap::new();
        for r in refs.values().flatten() {
            *held.entry(r).or_default() += 1;
        }
        let mut gone: Vec<Digest> = Vec::new();
        let mut expired_attached: HashSet<&str> = HashSet::new();
        let mut last = None;
        loop {
            for d in candidates.drain(..) {
                let tagged = by_age.iter().any(|(_, t, x)| *x == d && !expired.contains(t))
                    || attached.iter().any(|(t, r)| r.digest == d && !expired_attached.contains(t.as_str()));
                // A child of an index still kept stays; one only removed indexes held goes too.
                let child = held.get(&d).is_some_and(|n| *n > 0);
                if tagged || child || gone.contains(&d) || !manifests.contains_key(&d) {
                    continue;
                }
                for r in refs.get(&d).into_iter().flatten() {
                    held.entry(r).and_modify(|n| *n -= 1);
                }
                gone.push(d);
            }
            let absent = |s: &Digest| !manifests.contains_key(s) || gone.contains(s);
            for (t, r) in &attached {
                if !expired_attached.contains(t.as_str())
                    && !policy.always_kept(t)
                    && r.updated_ms <= cutoff
                    && attached_subject(t).is_some_and(|s| absent(&s))
                {
                    expired_attached.insert(t);
                    candidates.push(r.digest.clone());
                }
            }
            // An index's children (platform images, buildx attestation manifests) go with the
            // last index that holds them, past `cutoff` like referrers.
            for d in gone.iter().flat_map(|g| refs.get(g)).flatten() {
                if manifests.contains_key(d) && !gone.contains(d) && self.meta.blob(d)?.is_some_and(|b| b.used_ms <= cutoff) {
                    candidates.push(d.clone());
                }
            }
            for (d, subject) in &manifests {
                if subject.as_ref().is_some_and(absent) && !gone.contains(d) && self.meta.blob(d)?.is_some_and(|b| b.used_ms <= cutoff) {
                    candidates.push(d.clone());
                }
            }
            candidates.retain(|d| !gone.contains(d));
            // A candidate kept for good (tagged, or held by a kept index) comes back every round;
            // once a round removes nothing, the next would find the same.
            let progress = (gone.len(), expired_attached.len());
            if candidates.is_empty() || last == Some(progress) {
                break;
            }
            last = Some(progress);
        }
        expired.extend(attached.iter().filter(|(t, _)| expired_attached.contains(t.as_str())).map(|(t, _)| t.clone()));
        for t in &expired {
            report.tags_removed.push(format!("{repo}:{t}"));
            if !dry_run {
                let res = self.meta.delete_tag(repo, t, policy.is_immutable(t));
                self.reads.changed(super::Changed::Tags(repo, std::slice::from_ref(t)));
                res?;
            }
        }
        for d in gone {
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
                self.retention(repo, &p, cutoff, dry_run, &mut report)?;
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
            let forgotten = self.meta.forget_blobs_if_unused(&digests, cutoff)?;
            let since = std::time::Instant::now();
            let mut failed = None;
            for (i, (d, size)) in forgotten.iter().enumerate() {
                self.lru.remove(d);
                self.manifest_bytes.invalidate(d);
                if since.elapsed() > super::SWEEP_WINDOW / 2 {
                    // Past its window another node may store this content again: what is
                    // left stays, unrecorded, for fsck to find.
                    tracing::warn!(left = forgotten.len() - i, "a GC batch outlived its window");
                    break;
                }
                if let Err(e) = self.blobs.delete(d) {
                    failed = Some(e);
                    break;
                }
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
            let done: Vec<Digest> = forgotten.into_iter().map(|(d, _)| d).collect();
            self.meta.swept(&done)?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(report)
    }
}

/// The subject a tag attaches something to by naming it: `sha256-<hex>` followed by nothing
/// (the OCI referrers tag schema) or by `.sig`, `.att` or `.sbom` (cosign).
fn attached_subject(tag: &str) -> Option<Digest> {
    let (algo, rest) = tag.split_once('-')?;
    let hex = match rest.split_once('.') {
        Some((hex, "sig" | "att" | "sbom")) => hex,
        Some(_) => return None,
        None => rest,
    };
    Digest::parse(&format!("{algo}:{hex}")).ok()
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
        s.put_manifest(repo, &md, Bytes::from(m), meta, vec![tag.into()], TagExpect::Any, (vec![ld.clone()], vec![]), none(), None, None)
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

    /// A signature-like manifest over `subject`: tagged `tags`, carrying `subject` when asked.
    async fn attach(s: &Arc<Store>, repo: &str, subject: &Digest, tags: Vec<String>, with_subject: bool, salt: &str) -> Digest {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json","config":{{"mediaType":"{}","digest":"{}","size":2}},"layers":[],"annotations":{{"salt":"{salt}"}}}}"#,
            manifest::OCI_MANIFEST,
            manifest::OCI_EMPTY_CONFIG,
            Digest::sha256_of(b"{}")
        );
        let empty = Digest::sha256_of(b"{}");
        s.put_blob_bytes(Bytes::from_static(b"{}"), &empty).await.unwrap();
        s.link_blob(repo, &empty, None).await.unwrap();
        let md = Digest::sha256_of(m.as_bytes());
        let meta = ManifestMeta {
            media_type: manifest::OCI_MANIFEST.into(),
            size: m.len() as u64,
            subject: with_subject.then(|| subject.to_string()),
            ..Default::default()
        };
        s.put_manifest(repo, &md, Bytes::from(m), meta, tags, TagExpect::Any, (vec![empty], vec![]), none(), None, None).await.unwrap();
        md
    }

    #[test]
    fn attached_tags_name_their_subject() {
        let d = Digest::sha256_of(b"x");
        let hex = d.to_string()[7..].to_string();
        for t in [format!("sha256-{hex}.sig"), format!("sha256-{hex}.att"), format!("sha256-{hex}.sbom"), format!("sha256-{hex}")] {
            assert_eq!(attached_subject(&t), Some(d.clone()), "{t}");
        }
        for t in ["latest", "sha256-abc.sig", &format!("sha256-{hex}.tar"), "v1-2.sig"] {
            assert_eq!(attached_subject(t), None, "{t}");
        }
    }

    /// Signatures by tag and by `subject` do not count against `keep_tags`, stay while their
    /// subject does, and go with it.
    #[tokio::test]
    async fn retention_keeps_signatures_with_their_subject() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (old, _) = image(&s, "team/a", "old", b"layer-old").await;
        s.meta().set_tag("team/a", "old", &old, &TagExpect::Any, false, 1000).unwrap();
        let (new, _) = image(&s, "team/a", "new", b"layer-new").await;
        s.meta().set_tag("team/a", "new", &new, &TagExpect::Any, false, 2000).unwrap();
        let tag_of = |d: &Digest, suffix: &str| format!("sha256-{}{suffix}", &d.to_string()[7..]);
        let sig_old = attach(&s, "team/a", &old, vec![tag_of(&old, ".sig")], false, "1").await;
        let sig_new = attach(&s, "team/a", &new, vec![tag_of(&new, ".sig")], false, "2").await;
        let ref_old = attach(&s, "team/a", &old, vec![], true, "3").await;
        let ref_new = attach(&s, "team/a", &new, vec![], true, "4").await;
        // Signature tags are the newest tags: a count that included them would drop `new`.
        for (i, t) in [tag_of(&old, ".sig"), tag_of(&new, ".sig")].iter().enumerate() {
            let d = if i == 0 { &sig_old } else { &sig_new };
            s.meta().set_tag("team/a", t, d, &TagExpect::Any, false, 3000 + i as u64).unwrap();
        }
        // A signature pushed before its image: kept while young.
        let early = Digest::sha256_of(b"not pushed yet");
        let ref_early = attach(&s, "team/a", &early, vec![], true, "5").await;
        let policy = Policy::new(Some(1), &[], &[], None).unwrap();
        let policy: PolicyOf = Arc::new(move |_: &str| Some(policy.clone()));
        let r = s.gc(policy.clone(), Duration::from_secs(3600), true).await.unwrap();
        let mut removed = r.manifests_removed.clone();
        removed.sort();
        let mut want = vec![format!("team/a@{old}"), format!("team/a@{sig_old}")];
        want.sort();
        assert_eq!(removed, want, "referrers pushed within the grace period stay, whatever their subject");
        next_ms();
        let r = s.gc(policy, Duration::ZERO, false).await.unwrap();
        let mut tags = r.tags_removed.clone();
        tags.sort();
        assert_eq!(tags, vec!["team/a:old".to_string(), format!("team/a:{}", tag_of(&old, ".sig"))]);
        assert!(r.manifests_removed.contains(&format!("team/a@{ref_early}")), "an old referrer of nothing goes");
        assert!(r.manifests_removed.contains(&format!("team/a@{ref_old}")), "a referrer goes with its subject");
        let left: HashSet<Digest> = s.meta().manifests("team/a").unwrap().into_iter().map(|(d, _)| d).collect();
        assert_eq!(left, HashSet::from([new.clone(), sig_new, ref_new]));
        assert_eq!(s.tags("team/a", None, 100).unwrap().unwrap().0, vec!["new".to_string(), tag_of(&new, ".sig")]);
        assert!(s.meta().recount(false).unwrap().is_empty());
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
