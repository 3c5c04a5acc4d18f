//! Upload sessions: `uploads/<id>/data` plus `uploads/<id>/repo`. The running sha256 lives in
//! memory with the open file, so a PATCH never re-reads what earlier PATCHes sent; after a
//! restart a session is picked up again by hashing its data once.

use super::Store;
use crate::oci::{Algorithm, Digest, ErrorCode, Hasher, OciError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

pub struct Session {
    pub id: String,
    pub repo: String,
    file: File,
    hasher: Hasher,
    offset: u64,
    pub last_active: SystemTime,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.offset += data.len() as u64;
        self.last_active = SystemTime::now();
        Ok(())
    }
}

pub type SessionHandle = Arc<tokio::sync::Mutex<Session>>;

pub struct Uploads {
    dir: PathBuf,
    live: Mutex<HashMap<String, SessionHandle>>,
}

fn unknown(id: &str) -> OciError {
    OciError::msg(ErrorCode::BlobUploadUnknown, format!("upload {id} is unknown or has expired"))
}

impl Uploads {
    pub fn new(dir: PathBuf) -> Self {
        Uploads { dir, live: Mutex::new(HashMap::new()) }
    }

    pub fn in_progress(&self) -> usize {
        fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0)
    }

    pub fn create(&self, repo: &str) -> io::Result<SessionHandle> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.dir.join(&id);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("repo"), repo)?;
        let file = File::options().create_new(true).append(true).open(dir.join("data"))?;
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.clone(),
            repo: repo.to_string(),
            file,
            hasher: Hasher::new(Algorithm::Sha256),
            offset: 0,
            last_active: SystemTime::now(),
        }));
        self.live.lock().insert(id, s.clone());
        Ok(s)
    }

    /// The session `id`, which must belong to `repo`.
    pub fn get(&self, id: &str, repo: &str) -> Result<SessionHandle, OciError> {
        if let Some(s) = self.live.lock().get(id).cloned() {
            return Ok(s);
        }
        let dir = self.dir.join(id);
        let owner = fs::read_to_string(dir.join("repo")).map_err(|_| unknown(id))?;
        if owner != repo {
            return Err(unknown(id));
        }
        let data = dir.join("data");
        let mut hasher = Hasher::new(Algorithm::Sha256);
        let mut f = File::open(&data).map_err(|_| unknown(id))?;
        let offset = io::copy(&mut f, &mut HashWriter(&mut hasher))?;
        let file = File::options().append(true).open(&data)?;
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.to_string(),
            repo: owner,
            file,
            hasher,
            offset,
            last_active: SystemTime::now(),
        }));
        Ok(self.live.lock().entry(id.to_string()).or_insert(s).clone())
    }

    pub fn check_owner(&self, s: &Session, repo: &str) -> Result<(), OciError> {
        if s.repo != repo {
            return Err(unknown(&s.id));
        }
        Ok(())
    }

    /// Removes a session and its data.
    pub fn remove(&self, id: &str) {
        self.live.lock().remove(id);
        let _ = fs::remove_dir_all(self.dir.join(id));
    }

    pub fn exists(&self, id: &str) -> bool {
        self.dir.join(id).exists()
    }

    /// Verifies the session's content against `expected` and publishes it as a blob. The
    /// session is gone afterwards either way: a failed commit stores nothing.
    pub fn commit(&self, store: &Store, s: &mut Session, expected: &Digest) -> Result<u64, OciError> {
        let data = self.dir.join(&s.id).join("data");
        let result = (|| {
            let actual = if expected.algorithm() == Algorithm::Sha256 {
                std::mem::replace(&mut s.hasher, Hasher::new(Algorithm::Sha256)).finish()
            } else {
                super::hash_file(&data, expected.algorithm())?
            };
            if &actual != expected {
                return Err(OciError::msg(ErrorCode::DigestInvalid, format!("uploaded content has digest {actual}, not {expected}")));
            }
            s.file.sync_all()?;
            if store.blob_size(expected).is_none() {
                store.publish(&data, expected)?;
            }
            Ok(s.offset)
        })();
        self.remove(&s.id);
        result
    }

    /// Ids and last-activity times of every session on disk, for expiry.
    pub fn list(&self) -> Vec<(String, SystemTime)> {
        let mut v = Vec::new();
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let t = fs::metadata(e.path().join("data")).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                v.push((id, t));
            }
        }
        v
    }
}

struct HashWriter<'a>(&'a mut Hasher);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
