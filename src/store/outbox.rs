//! The event outbox and its dead letters: small objects beside the content, so they live on
//! whatever holds the store (files synced to the local disk, create-only objects in the
//! bucket) and every node on a shared bucket sees them.
//!
//! An entry is written once, whole, and removed when it is done: no entry is ever rewritten,
//! so a crash leaves either the entry or nothing, never half of one. Pending entries are
//! grouped by the node that recorded them (`events/outbox/<node>/<ms>-<id>`), so that on a
//! shared bucket each node delivers its own and another can take over those of a node that
//! is gone. Dead letters (`events/dead/<ms>-<id>`) wait for an operator.

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

impl Store {
    /// Records an entry durably (blocking); `id` must be unique. Returns its reference.
    pub fn outbox_append(&self, node: &str, ms: u64, id: &str, body: &[u8]) -> Result<OutboxRef> {
        let r = OutboxRef { node: component(node), name: format!("{ms:013}-{}", component(id)), ms };
        if !self.blobs.put_object_new(&format!("{OUTBOX}/{}/{}", r.node, r.name), body)? {
            return Err(StoreError::Meta(format!("outbox entry {} exists already", r.name)));
        }
        Ok(r)
    }

    /// Every pending entry, oldest first within each node (blocking).
    pub fn outbox_pending(&self) -> Result<Vec<OutboxRef>> {
        let mut out = Vec::new();
        for k in self.blobs.objects(OUTBOX)? {
            if let Some((node, name)) = k.split_once('/') {
                let ms = name.split('-').next().and_then(|m| m.parse().ok());
                if let (false, Some(ms)) = (name.contains('/'), ms) {
                    out.push(OutboxRef { node: node.to_string(), name: name.to_string(), ms });
                }
            }
        }
        Ok(out)
    }

    /// An entry's bytes; None once it is gone (done elsewhere).
    pub fn outbox_read(&self, r: &OutboxRef) -> Result<Option<Bytes>> {
        self.blobs.object(&format!("{OUTBOX}/{}/{}", r.node, r.name))
    }

    pub fn outbox_remove(&self, r: &OutboxRef) -> Result<()> {
        self.blobs.delete_object(&format!("{OUTBOX}/{}/{}", r.node, r.name))
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

    #[test]
    fn entries_survive_reopen_and_go_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = {
            let s = Store::open(dir.path()).unwrap();
            let r = s.outbox_append("node/a", 5, "id-1", b"one").unwrap();
            s.outbox_append("node/a", 6, "id-2", b"two").unwrap();
            assert!(s.outbox_append("node/a", 6, "id-2", b"again").is_err());
            r
        };
        let s = Store::open(dir.path()).unwrap();
        let pending = s.outbox_pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0], r);
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
