//! Whole-store verification: every blob hashes to its name and is recorded, every record has
//! its blob, every link and manifest points at a blob that exists, every hosted manifest's
//! references are linked in its repository (what a pull needs; a lost link answers
//! BLOB_UNKNOWN), every counter matches the records. A blob published but not recorded (a
//! crash between the two) is garbage, not damage: reported as a note. With `repair`, whatever
//! cannot be trusted is removed and the counters are rebuilt.

use super::error::Result;
use super::Store;
use crate::oci::{manifest, Digest, Hasher};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: usize,
    pub problems: Vec<String>,
    /// Harmless findings (garbage a crash left), not counted as problems.
    pub notes: Vec<String>,
    pub repaired: usize,
}

/// The last blob (in digest order) a running fsck has verified.
const FSCK_PROGRESS: &str = "fsck.progress";

impl Store {
    fn hash_blob(&self, d: &Digest) -> Result<Option<Digest>> {
        let Some(mut r) = self.blobs.reader(d)? else { return Ok(None) };
        let mut h = Hasher::new(d.algorithm());
        super::hash_into(&mut r, &mut h)?;
        Ok(Some(h.finish()))
    }

    /// Hashes `ds` with `workers` threads (object stores answer many reads at once); the
    /// results in the order given.
    fn hash_many(&self, ds: &[(Digest, u64)], workers: usize) -> Vec<Result<Option<Digest>>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let out: Vec<parking_lot::Mutex<Option<Result<Option<Digest>>>>> = ds.iter().map(|_| parking_lot::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..workers.min(ds.len()).max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((d, _)) = ds.get(i) else { return };
                    *out[i].lock() = Some(self.hash_blob(d));
                });
            }
        });
        out.into_iter().map(|m| m.into_inner().expect("every index hashed")).collect()
    }

    /// Blocking: reads every blob. With `resume`, blobs an interrupted run already verified
    /// (in digest order, up to its last checkpoint) are not hashed again.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        self.fsck_with(repair, false, &|_| false)
    }

    /// `sparse` says which repositories' indexes may lack child manifests (`sparse_indexes`).
    pub fn fsck_with(&self, repair: bool, resume: bool, sparse: &dyn Fn(&str) -> bool) -> Result<FsckReport> {
        let mut rep = FsckReport::default();
        let mut records: HashMap<Digest, u64> = HashMap::new();
        self.meta.blobs(&mut |d, r| {
            records.insert(d, r.size);
        })?;
        let mut on_disk: HashMap<Digest, u64> = HashMap::new();
        let mut strays = Vec::new();
        self.blobs.walk(&mut |d, size| match d {
            Ok(d) => {
                on_disk.insert(d, size);
            }
            Err(name) => strays.push(name),
        })?;
        for s in strays {
            rep.problems.push(format!("stray file {s} (not a blob name)"));
        }
        let mut gone: HashSet<Digest> = HashSet::new();
        let mut sorted: Vec<(Digest, u64)> = on_disk.iter().map(|(d, s)| (d.clone(), *s)).collect();
        sorted.sort_by_key(|(d, _)| d.to_string());
        let done_before = if resume { self.meta.note(FSCK_PROGRESS)? } else { None };
        let workers = if self.bucket.is_some() { 8 } else { std::thread::available_parallelism().map_or(2, |n| n.get()) };
        let mut skipped = 0;
        for chunk in sorted.chunks(64) {
            let (verified, to_hash): (Vec<_>, Vec<_>) =
                chunk.iter().cloned().partition(|(d, _)| done_before.as_deref().is_some_and(|p| d.to_string().as_str() <= p));
            skipped += verified.len();
            let hashed = self.hash_many(&to_hash, workers);
            let results = verified
                .into_iter()
                .map(|(d, s)| (d.clone(), s, Ok(Some(d))))
                .chain(to_hash.into_iter().zip(hashed).map(|((d, s), h)| (d, s, h)));
            for (d, size, actual) in results {
                self.fsck_blob(&d, size, actual?, &records, repair, &mut gone, &mut rep)?;
            }
            if let Some((last, _)) = chunk.last() {
                self.meta.set_note(FSCK_PROGRESS, Some(&last.to_string()))?;
            }
        }
        if skipped > 0 {
            rep.notes.push(format!("resumed: {skipped} blobs verified by the interrupted run were not hashed again"));
        }
        self.fsck_rest(repair, &records, &on_disk, gone, rep, sparse)
    }

    #[allow(clippy::too_many_arguments)]
    fn fsck_blob(
        &self,
        d: &Digest,
        size: u64,
        actual: Option<Digest>,
        records: &HashMap<Digest, u64>,
        repair: bool,
        gone: &mut HashSet<Digest>,
        rep: &mut FsckReport,
    ) -> Result<()> {
        let size = &size;
        {
            rep.blobs_checked += 1;
            if actual.as_ref() != Some(d) {
                rep.problems.push(format!("blob {d} has content {}", actual.map(|a| a.to_string()).unwrap_or_default()));
                gone.insert(d.clone());
                return Ok(());
            }
            match records.get(d) {
                None => {
                    // Published, then a crash came before its record: garbage, not damage.
                    rep.notes.push(format!("blob {d} is not recorded (left by a crash); --repair hands it to GC"));
                    if repair {
                        self.meta.record_blob(d, *size, super::now_ms(), None)?;
                        rep.repaired += 1;
                    }
                }
                Some(r) if r != size => rep.problems.push(format!("blob {d} is recorded as {r} bytes but has {size}")),
                _ => {}
            }
        }
        Ok(())
    }

    fn fsck_rest(
        &self,
        repair: bool,
        records: &HashMap<Digest, u64>,
        on_disk: &HashMap<Digest, u64>,
        mut gone: HashSet<Digest>,
        mut rep: FsckReport,
        sparse: &dyn Fn(&str) -> bool,
    ) -> Result<FsckReport> {
        for d in records.keys() {
            if !on_disk.contains_key(d) {
                rep.problems.push(format!("blob {d} is recorded but its content is missing"));
                gone.insert(d.clone());
            }
        }
        if repair {
            for d in &gone {
                let _g = self.stripe(d).lock();
                let held = self.meta.purge_blob(d);
                self.reads.changed(super::Changed::Everything);
                let held = held?;
                self.manifest_bytes.invalidate(d);
                let deleted = self.blobs.delete(d);
                self.meta.swept(std::slice::from_ref(d))?;
                deleted?;
                rep.repaired += 1 + held.len();
            }
        }
        let exists = |d: &Digest| on_disk.contains_key(d) && !gone.contains(d);
        let mut after: Option<String> = None;
        loop {
            let (page, more) = self.meta.repositories(after.as_deref(), 1000)?;
            after = page.last().cloned();
            for repo in &page {
                self.fsck_repo(repo, repair, &exists, sparse(repo), &mut rep)?;
            }
            if !more {
                break;
            }
        }
        for p in self.meta.recount(repair)? {
            rep.problems.push(format!("counter drift: {p}"));
            if repair {
                rep.repaired += 1;
            }
        }
        let tmp = self.blobs.temp_count();
        if tmp > 0 {
            rep.problems.push(format!("{tmp} temp files (a writer is running, or berth was not restarted since a crash)"));
        }
        // Finished: the next run starts from the beginning.
        self.meta.set_note(FSCK_PROGRESS, None)?;
        Ok(rep)
    }

    fn fsck_repo(&self, repo: &str, repair: bool, exists: &dyn Fn(&Digest) -> bool, sparse: bool, rep: &mut FsckReport) -> Result<()> {
        for (d, _) in self.meta.links(repo)? {
            if !exists(&d) {
                rep.problems.push(format!("{repo}: link to missing blob {d}"));
                if repair {
                    self.meta.unlink(repo, &d)?;
                    rep.repaired += 1;
                }
            }
        }
        let hosted = !self.is_cache_repo(repo);
        for (d, m) in self.meta.manifests(repo)? {
            let problem = match self.manifest_bytes(&d)? {
                None => Some(format!("{repo}: manifest {d} has no bytes")),
                // Mirrored manifests may reference content not fetched yet; hosted ones were
                // checked at push and must stay whole.
                Some(b) if hosted => manifest::inspect(&b, Some(&m.media_type))
                    .or_else(|_| manifest::inspect(&b, None))
                    .ok()
                    .and_then(|i| {
                        let missing = i.blobs.iter().find(|x| !exists(x)).map(|x| format!("references missing blob {x}"));
                        let unlinked = || {
                            i.blobs
                                .iter()
                                .find(|x| !self.meta.holds(repo, x).unwrap_or(false))
                                .map(|x| format!("references blob {x}, which is not linked in {repo} (a pull answers BLOB_UNKNOWN)"))
                        };
                        let child = || {
                            if sparse {
                                return None;
                            }
                            i.children
                                .iter()
                                .find(|c| self.meta.manifest(repo, c).ok().flatten().is_none())
                                .map(|c| format!("references missing child manifest {c}"))
                        };
                        missing.or_else(unlinked).or_else(child)
                    })
                    .map(|what| format!("{repo}: manifest {d} {what}")),
                Some(_) => None,
            };
            if let Some(p) = problem {
                rep.problems.push(p);
                if repair {
                    let res = self.meta.delete_manifest(repo, &d, &|_| false);
                    self.reads.changed(super::Changed::Everything);
                    res?;
                    rep.repaired += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ManifestMeta, TagExpect};
    use bytes::Bytes;
    use std::sync::Arc;

    async fn setup() -> (tempfile::TempDir, Arc<Store>, Digest, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ld = Digest::sha256_of(b"layer");
        s.put_blob_bytes(Bytes::from_static(b"layer"), &ld).await.unwrap();
        s.link_blob("team/a", &ld, None).await.unwrap();
        let m = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{ld}","size":5}},"layers":[]}}"#);
        let md = Digest::sha256_of(m.as_bytes());
        s.put_manifest(
            "team/a",
            &md,
            Bytes::from(m),
            ManifestMeta { media_type: manifest::OCI_MANIFEST.into(), ..Default::default() },
            vec!["v1".into()],
            TagExpect::Any,
            (vec![ld.clone()], vec![]),
            Arc::new(|_: &str| false),
            None,
            None,
        )
        .await
        .unwrap();
        assert!(s.fsck(false).unwrap().problems.is_empty());
        (dir, s, ld, md)
    }

    #[tokio::test]
    async fn finds_and_repairs_corruption() {
        let (dir, s, ld, _) = setup().await;
        let p = dir.path().join("blobs/sha256").join(&ld.hex()[..2]).join(ld.hex());
        std::fs::write(p, b"bitrot").unwrap();
        let r = s.fsck(false).unwrap();
        assert!(r.problems[0].contains(&format!("blob {ld} has content")), "{:?}", r.problems);
        let r = s.fsck(true).unwrap();
        assert!(r.repaired >= 2, "{r:?}"); // the blob with its link, the manifest that needs it
        assert!(s.fsck(false).unwrap().problems.is_empty(), "{:?}", s.fsck(false).unwrap().problems);
        assert!(s.tag_digest("team/a", "v1").unwrap().is_none());
    }

    #[tokio::test]
    async fn finds_a_missing_link() {
        let (_dir, s, ld, md) = setup().await;
        // What a lost link looks like: the blob is there, the repository no longer links it.
        s.meta().unlink("team/a", &ld).unwrap();
        let r = s.fsck(false).unwrap();
        assert!(
            r.problems.iter().any(|p| p.contains(&format!("manifest {md} references blob {ld}, which is not linked"))),
            "{:?}",
            r.problems
        );
    }

    #[tokio::test]
    async fn resume_skips_what_an_interrupted_run_verified_and_a_full_run_starts_over() {
        let (dir, s, ld, md) = setup().await;
        // An interrupted run got as far as the last digest in order; a corruption it had
        // already passed is not hashed again on resume, but a fresh run finds it.
        let last = if ld.to_string() > md.to_string() { &ld } else { &md };
        s.meta().set_note(FSCK_PROGRESS, Some(&last.to_string())).unwrap();
        std::fs::write(dir.path().join("blobs/sha256").join(&ld.hex()[..2]).join(ld.hex()), b"bitrot").unwrap();
        let r = s.fsck_with(false, true, &|_| false).unwrap();
        assert!(r.notes.iter().any(|n| n.contains("resumed: 2 blobs")), "{r:?}");
        assert!(!r.problems.iter().any(|p| p.contains("has content")), "{r:?}");
        assert_eq!(s.meta().note(FSCK_PROGRESS).unwrap(), None, "a finished run clears its progress");
        let r = s.fsck(false).unwrap();
        assert!(r.problems.iter().any(|p| p.contains(&format!("blob {ld} has content"))), "{r:?}");
    }
}
