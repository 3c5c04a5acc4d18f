//! The local-disk backend: blobs as files under `blobs/<algo>/<2 hex>/<hex>`, upload data
//! under `uploads/<id>/data`, metadata in redb (`meta.redb`). Every publish is
//! temp → fsync(file) → rename → fsync(directory), so an acknowledged blob survives a power
//! loss under its name.

pub mod meta;
pub mod migrate;

use crate::oci::Digest;
use crate::store::error::{Result, StoreError};
use crate::store::traits::{BlobBody, BlobStore, BlobTemp, UploadWriter};
use bytes::Bytes;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub struct LocalBlobs {
    root: PathBuf,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn not_found_is_none<T>(r: io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl LocalBlobs {
    /// Creates the layout under `root` and drops temp files a crash left: only renamed objects
    /// ever count.
    pub fn open(root: &Path) -> Result<LocalBlobs> {
        for d in ["blobs", "tmp", "uploads"] {
            fs::create_dir_all(root.join(d))?;
        }
        for e in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        Ok(LocalBlobs { root: root.to_path_buf() })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Moves a complete, synced file to `d`'s place durably.
    fn publish_file(&self, from: &Path, d: &Digest) -> Result<()> {
        let dest = self.path(d);
        let dir = dest.parent().expect("blob path has a parent");
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            sync_dir(dir.parent().expect("prefix dir has a parent"))?;
        }
        fs::rename(from, &dest)?;
        sync_dir(dir)?;
        Ok(())
    }
}

struct LocalTemp {
    file: File,
    path: PathBuf,
    blobs: PathBuf,
    published: bool,
}

impl BlobTemp for LocalTemp {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data)?;
        Ok(())
    }

    fn follower(&self) -> Result<File> {
        Ok(File::open(&self.path)?)
    }

    fn publish(mut self: Box<Self>, d: &Digest) -> Result<()> {
        self.file.sync_all()?;
        let store = LocalBlobs { root: self.blobs.clone() };
        store.publish_file(&self.path, d)?;
        self.published = true;
        Ok(())
    }
}

impl Drop for LocalTemp {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Local session data is synced when it is published, not per request: a crash loses only
/// what the client was not yet told was stored, and the session's length is re-read.
struct FileAppender(File);

impl UploadWriter for FileAppender {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.0.write_all(data)?)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

impl BlobStore for LocalBlobs {
    fn stat(&self, d: &Digest) -> Result<Option<u64>> {
        not_found_is_none(fs::metadata(self.path(d)).map(|m| m.len()))
    }

    fn open(&self, d: &Digest, _size: u64, _range: Option<(u64, u64)>) -> Result<Option<BlobBody>> {
        let Some(file) = not_found_is_none(File::open(self.path(d)))? else { return Ok(None) };
        let len = file.metadata()?.len();
        Ok(Some(BlobBody::File { file, len }))
    }

    fn read(&self, d: &Digest) -> Result<Option<Bytes>> {
        Ok(not_found_is_none(fs::read(self.path(d)))?.map(Bytes::from))
    }

    fn reader(&self, d: &Digest) -> Result<Option<Box<dyn Read + Send>>> {
        Ok(not_found_is_none(File::open(self.path(d)))?.map(|f| Box::new(io::BufReader::with_capacity(1 << 20, f)) as _))
    }

    fn create(&self, _expected: &Digest) -> Result<Box<dyn BlobTemp>> {
        let path = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(Box::new(LocalTemp { file, path, blobs: self.root.clone(), published: false }))
    }

    fn delete(&self, d: &Digest) -> Result<()> {
        match fs::remove_file(self.path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn walk(&self, visit: &mut dyn FnMut(std::result::Result<Digest, String>, u64)) -> Result<()> {
        let rd = |p: &Path| -> Result<Vec<fs::DirEntry>> {
            match fs::read_dir(p) {
                Ok(d) => Ok(d.collect::<io::Result<Vec<_>>>()?),
                Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            }
        };
        for algo in rd(&self.root.join("blobs"))? {
            let a = algo.file_name().to_string_lossy().into_owned();
            for prefix in rd(&algo.path())? {
                let pre = prefix.file_name().to_string_lossy().into_owned();
                for f in rd(&prefix.path())? {
                    let name = f.file_name().to_string_lossy().into_owned();
                    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    match Digest::parse(&format!("{a}:{name}")) {
                        Ok(d) if name.starts_with(&pre) => visit(Ok(d), size),
                        _ => visit(Err(f.path().display().to_string()), size),
                    }
                }
            }
        }
        Ok(())
    }

    fn temp_count(&self) -> usize {
        fs::read_dir(self.root.join("tmp")).map(|d| d.count()).unwrap_or(0)
    }

    fn object(&self, name: &str) -> Result<Option<Bytes>> {
        Ok(not_found_is_none(fs::read(self.root.join(name)))?.map(Bytes::from))
    }

    fn put_object_new(&self, name: &str, data: &[u8]) -> Result<bool> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join(name);
        let dir = path.parent().expect("object path has a parent");
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            // The new folder's entry must survive a crash as well as the object in it.
            let mut d = dir;
            while let Some(parent) = d.parent() {
                sync_dir(parent)?;
                if parent == self.root {
                    break;
                }
                d = parent;
            }
        }
        // Written whole and synced under a temp name, then hard-linked: two processes racing
        // end up with the same object, and a reader never sees half of one.
        let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
        let written = (|| -> io::Result<()> {
            let mut f = File::options().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        let published = written.and_then(|_| fs::hard_link(&tmp, &path));
        let _ = fs::remove_file(&tmp);
        match published {
            Ok(()) => {
                sync_dir(dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn objects(&self, dir: &str) -> Result<Vec<String>> {
        fn walk(base: &Path, rel: &str, out: &mut Vec<String>) -> io::Result<()> {
            let rd = match fs::read_dir(base.join(rel)) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in rd {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                // Temp names of objects being written start with a dot.
                if name.starts_with('.') {
                    continue;
                }
                let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                if e.file_type()?.is_dir() {
                    walk(base, &child, out)?;
                } else {
                    out.push(child);
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.root.join(dir), "", &mut out)?;
        out.sort();
        Ok(out)
    }

    fn delete_object(&self, name: &str) -> Result<()> {
        // Not synced: a removal a power loss undoes brings back an outbox entry already
        // delivered, which is delivered again (at least once), and saves an fsync per event.
        match fs::remove_file(self.root.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn upload_create(&self, id: &str) -> Result<()> {
        let dir = self.upload_dir(id);
        fs::create_dir_all(&dir)?;
        File::options().create_new(true).write(true).open(dir.join("data"))?;
        Ok(())
    }

    fn upload_appender(&self, id: &str) -> Result<Box<dyn UploadWriter>> {
        match File::options().append(true).open(self.upload_dir(id).join("data")) {
            Ok(f) => Ok(Box::new(FileAppender(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::UploadUnknown(id.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    fn upload_reader(&self, id: &str) -> Result<Option<Box<dyn Read + Send>>> {
        Ok(not_found_is_none(File::open(self.upload_dir(id).join("data")))?
            .map(|f| Box::new(io::BufReader::with_capacity(1 << 20, f)) as _))
    }

    fn upload_len(&self, id: &str) -> Result<Option<u64>> {
        not_found_is_none(fs::metadata(self.upload_dir(id).join("data")).map(|m| m.len()))
    }

    fn upload_publish(&self, id: &str, d: &Digest) -> Result<()> {
        let data = self.upload_dir(id).join("data");
        File::open(&data)?.sync_all()?;
        self.publish_file(&data, d)
    }

    fn upload_remove(&self, id: &str) -> Result<()> {
        match fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
