//! The coordinator's durable store: one file per key under a directory, written to a
//! temporary name, fsynced, renamed over the old one, and the directory fsynced, so that a
//! crash at any point leaves either the old or the new value.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A directory of durable values.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir` (created when missing).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `bytes` under `key` (a relative path of `/`-separated plain names).
    pub fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        if key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == ".." || p.starts_with(".tmp"))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad store key {key:?}"),
            ));
        }
        let path = self.dir.join(key);
        let parent = path.parent().expect("keys live under the store");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("value"),
            std::process::id()
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            // A write cut short (a full disk) leaves no temporary file taking space.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(parent)?.sync_all()
    }

    /// Removes the temporary files of writes a previous process did not finish; returns how
    /// many.
    pub fn remove_stale_temporaries(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().starts_with(".tmp") {
                    std::fs::remove_file(e.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Every stored key with its file (temporary files of interrupted writes are ignored).
    fn files(&self) -> std::io::Result<Vec<(String, std::path::PathBuf)>> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let p = e.path();
                if e.file_name().to_string_lossy().starts_with(".tmp") {
                    continue;
                }
                if e.file_type()?.is_dir() {
                    stack.push(p);
                } else {
                    let key = p
                        .strip_prefix(&self.dir)
                        .expect("under the store")
                        .to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    out.push((key, p));
                }
            }
        }
        Ok(out)
    }

    /// Every stored value by key (temporary files of interrupted writes are ignored).
    pub fn load_all(&self) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
        self.files()?
            .into_iter()
            .map(|(k, p)| Ok((k, std::fs::read(&p)?)))
            .collect()
    }

    /// Every stored key, without reading the values.
    pub fn keys(&self) -> std::io::Result<Vec<String>> {
        Ok(self.files()?.into_iter().map(|(k, _)| k).collect())
    }

    /// The value of `key`, if stored.
    pub fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(key)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}
