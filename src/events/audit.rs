//! The audit log: one JSON line per event, appended to a file that is rotated by size
//! (`<file>.1` the newest of the old ones, `<file>.<keep>` the oldest kept).

use parking_lot::Mutex;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct Audit {
    path: PathBuf,
    max_size: u64,
    keep: usize,
    /// The open file and its length.
    file: Mutex<Option<(File, u64)>>,
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Audit {
    pub fn new(path: PathBuf, max_size: u64, keep: usize) -> Audit {
        Audit { path, max_size, keep, file: Mutex::new(None) }
    }

    /// Appends one line (blocking); a line that would take the file past its size starts a
    /// new file first.
    pub fn write(&self, line: &[u8]) -> io::Result<()> {
        let mut g = self.file.lock();
        if g.is_none() {
            *g = Some(self.open()?);
        }
        let len = g.as_ref().map_or(0, |(_, len)| *len);
        let need = line.len() as u64 + 1;
        if len > 0 && len + need > self.max_size {
            *g = None;
            self.rotate()?;
            *g = Some(self.open()?);
        }
        let (f, len) = g.as_mut().expect("opened above");
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        // One write per line: lines from concurrent writers never interleave.
        f.write_all(&buf)?;
        *len += need;
        Ok(())
    }

    fn open(&self) -> io::Result<(File, u64)> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let f = File::options().create(true).append(true).open(&self.path)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    fn rotate(&self) -> io::Result<()> {
        if self.keep == 0 {
            return ignore_absent(fs::remove_file(&self.path));
        }
        ignore_absent(fs::remove_file(numbered(&self.path, self.keep)))?;
        for n in (1..self.keep).rev() {
            ignore_absent(fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)))?;
        }
        ignore_absent(fs::rename(&self.path, numbered(&self.path, 1)))
    }
}

fn ignore_absent(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::new(path.clone(), 100, 2);
        for i in 0..20 {
            a.write(format!("{{\"n\":\"{i:03}\",\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}").as_bytes()).unwrap();
        }
        let cur = fs::read_to_string(&path).unwrap();
        assert!(cur.len() <= 100 && cur.ends_with("\"n\":\"019\",\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}\n"), "{cur}");
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists());
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            for l in fs::read_to_string(p).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
        }
    }
}
