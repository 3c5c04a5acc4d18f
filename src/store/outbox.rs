//! The event outbox and its dead letters: small objects beside the content, so they live on
//! whatever holds the store (files synced to the local disk, create-only objects in the
//! bucket) and every node on a shared bucket sees them.
//!
//! An entry is written once, whole, and removed when it is done: no entry is ever rewritten,
//! so a crash leaves either the entry or nothing, never half of one. Pending entries are
//! grouped by the node that recorded them (`<node>/<ms>-<id>`), so that on a shared bucket
//! each node delivers its own and another can take over those of a node that is gone.
//!
//! Where the metadata store keeps the outbox (the local disk's database), entries are rows
//! written in the same transaction as the manifest they record: a push costs no second
//! commit. Elsewhere (a shared bucket) they are create-only objects under `events/outbox/`,
//! and entries left there by an older berth on local disk are still listed, read and removed.
//! Dead letters (`events/dead/<ms>-<id>`) are always objects; they wait for an operator.

use super::error::{Result, StoreError};
use super::Store;
use bytes::Bytes;

const OUTBOX: &str = "events/outbox";
const DEAD: &str = "events/dead";

/// A pending entry: who recorded it, and its opaque name in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxRef {
    pub node: String,
    pub name: String,
    /// When it was recorded (milliseconds since the epoch).
    pub ms: u64,
}

/// Keeps names to what every backend takes as one path component.
fn component(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
}

impl OutboxRef {
    /// The reference of an entry `node` records at `ms`; `id` must be unique.
    pub fn new(node: &str, ms: u64, id: &str) -> OutboxRef {
        OutboxRef { node: component(node), name: format!("{ms:013}-{}", component(id)), ms }
    }

    /// Its key: `<node>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.node, self.name)
    }

    fn parse(key: &str) -> Option<OutboxRef> {
        let (node, name) = key.split_once('/')?;
        let ms = name.split('-').next()?.parse().ok()?;
        (!name.contains('/')).then(|| OutboxRef { node: node.to_string(), name: name.to_string(), ms })
    }
}

impl Store {
    /// Records an entry durably (blocking).
    pub fn outbox_append(&self, r: &OutboxRef, body: &[u8]) -> Result<()> {
        let written = if self.meta.keeps_outbox() {
            self.meta.outbox_put(&r.key(), body)?
        } else {
            self.blobs.put_object_new(&format!("{OUTBOX}/{}", r.key()), body)?
        };
        if !written {
            return Err(StoreError::Meta(format!("outbox entry {} exists already", r.name)));
        }
        Ok(())
    }

    /// Every pending entry, oldest first within each node (blocking).
    pub fn outbox_pending(&self) -> Result<Vec<OutboxRef>> {
        let mut keys = self.blobs.objects(OUTBOX)?;
        keys.extend(self.meta.outbox_keys()?);
        let mut out: Vec<OutboxRef> = keys.iter().filter_map(|k| OutboxRef::parse(k)).collect();
        out.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
        out.dedup();
        Ok(out)
    }

    /// An entry's bytes; None once it is gone (done elsewhere).
    pub fn outbox_read(&self, r: &OutboxRef) -> Result<Option<Bytes>> {
        if let Some(b) = self.meta.outbox_get(&r.key())? {
            return Ok(Some(b));
        }
        self.blobs.object(&format!("{OUTBOX}/{}", r.key()))
    }

    pub fn outbox_remove(&self, r: &OutboxRef) -> Result<()> {
        self.outbox_remove_many(std::slice::from_ref(r))
    }

    /// Removes entries, in one write where the metadata store keeps them.
    pub fn outbox_remove_many(&self, rs: &[OutboxRef]) -> Result<()> {
        let keys: Vec<String> = rs.iter().map(OutboxRef::key).collect();
        if self.meta.keeps_outbox() {
            self.meta.outbox_delete(&keys)?;
        }
        for k in &keys {
            self.blobs.delete_object(&format!("{OUTBOX}/{k}"))?;
        }
        Ok(())
    }

    /// Records a dead letter (blocking); returns its name.
    pub fn dead_append(&self, ms: u64, id: &str, body: &[u8]) -> Result<String> {
        let name = format!("{ms:013}-{}", component(id));
        self.blobs.put_object_new(&format!("{DEAD}/{name}"), body)?;
        Ok(name)
    }

    /// Dead letters' names, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<String>> {
        Ok(self.blobs.objects(DEAD)?.into_iter().filter(|n| !n.contains('/')).collect())
    }

    pub fn dead_read(&self, name: &str) -> Result<Option<Bytes>> {
        if component(name) != name {
            return Ok(None);
        }
        self.blobs.object(&format!("{DEAD}/{name}"))
    }

    pub fn dead_remove(&self, name: &str) -> Result<()> {
        if component(name) != name {
            return Ok(());
        }
        self.blobs.delete_object(&format!("{DEAD}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use crate::store::traits::{ManifestMeta, TagExpect};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread")]
    async fn an_event_is_written_with_its_manifest_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::sha256_of(&body);
        let meta =
            ManifestMeta { media_type: "application/vnd.oci.image.manifest.v1+json".into(), size: body.len() as u64, ..Default::default() };
        let missing = Digest::sha256_of(b"a layer never pushed");
        let put = |refs: Vec<Digest>, r: OutboxRef| {
            let (s, body, meta, d) = (s.clone(), body.clone(), meta.clone(), d.clone());
            async move {
                s.put_manifest(
                    "team/app",
                    &d,
                    body,
                    meta,
                    vec!["v1".into()],
                    TagExpect::Any,
                    (refs, vec![]),
                    Arc::new(|_: &str| false),
                    None,
                    Some((r, b"event".to_vec())),
                )
                .await
            }
        };
        // Refused: no event.
        assert!(put(vec![missing], OutboxRef::new("local", 1, "refused")).await.is_err());
        assert!(s.outbox_pending().unwrap().is_empty());
        // Stored: its event is there, in the metadata store (no object was written for it).
        let r = OutboxRef::new("local", 2, "stored");
        put(vec![], r.clone()).await.unwrap();
        assert_eq!(s.outbox_pending().unwrap(), vec![r.clone()]);
        assert_eq!(s.outbox_read(&r).unwrap().unwrap(), Bytes::from_static(b"event"));
        assert!(!dir.path().join("events/outbox").exists());
    }

    #[test]
    fn entries_survive_reopen_and_go_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = OutboxRef::new("node/a", 5, "id-1");
        {
            let s = Store::open(dir.path()).unwrap();
            s.outbox_append(&r, b"one").unwrap();
            s.outbox_append(&OutboxRef::new("node/a", 6, "id-2"), b"two").unwrap();
            assert!(s.outbox_append(&OutboxRef::new("node/a", 6, "id-2"), b"again").is_err());
        }
        // An entry an older berth left as a file is still delivered.
        let legacy = OutboxRef::new("local", 4, "id-0");
        let path = dir.path().join("events/outbox/local");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(&legacy.name), b"zero").unwrap();
        let s = Store::open(dir.path()).unwrap();
        let pending = s.outbox_pending().unwrap();
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[0], legacy);
        assert_eq!(pending[1], r);
        assert_eq!(s.outbox_read(&legacy).unwrap().unwrap(), Bytes::from_static(b"zero"));
        s.outbox_remove(&legacy).unwrap();
        assert!(s.outbox_read(&legacy).unwrap().is_none());
        assert_eq!(s.outbox_read(&r).unwrap().unwrap(), Bytes::from_static(b"one"));
        s.outbox_remove(&r).unwrap();
        s.outbox_remove(&r).unwrap();
        assert_eq!(s.outbox_pending().unwrap().len(), 1);
        let name = s.dead_append(7, "id-1", b"dead").unwrap();
        assert_eq!(s.dead_letters().unwrap(), vec![name.clone()]);
        assert_eq!(s.dead_read(&name).unwrap().unwrap(), Bytes::from_static(b"dead"));
        assert!(s.dead_read("../outbox").unwrap().is_none());
        s.dead_remove(&name).unwrap();
        assert!(s.dead_letters().unwrap().is_empty());
    }
}
