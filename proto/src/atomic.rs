//! Atomic file writes: the one temp-file-then-rename mechanism of the
//! workspace (checkpoints, checkpoint manifests, prepared data, run reports).
//!
//! `<dir>/<name>` is written as the hidden temp file `<dir>/.<name>.tmp`,
//! fsynced, renamed over `<dir>/<name>`, and the directory is fsynced, so
//! after a crash the file is either absent, the old one or the complete new
//! one. A write that fails or is abandoned removes its temp file; a process
//! killed mid-write leaves it (callers that care remove stale `.*.tmp`
//! files, as the checkpoint writer does).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed step of an atomic write, naming the file and keeping the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct AtomicWriteError {
    /// What failed, with the paths: `creating <tmp>`, `writing <tmp>`,
    /// `renaming <tmp> to <path>` or `fsync of directory <dir>`.
    pub context: String,
    /// The file (or directory) the failed step was on.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl AtomicWriteError {
    fn new(context: String, path: &Path, source: std::io::Error) -> Self {
        AtomicWriteError {
            context,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The temp file an atomic write of `path` goes through: `.<name>.tmp` in
/// the same directory.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// A file being written atomically: write through [`AtomicFile::file`] or
/// [`Write`], then [`AtomicFile::commit`]. Dropped without a commit, it
/// removes its temp file and leaves the target untouched.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    /// Set once the temp file has been renamed into place.
    renamed: bool,
}

impl AtomicFile {
    /// Creates (truncating) the temp file of `path`. The directory must exist.
    pub fn create(path: &Path) -> Result<Self, AtomicWriteError> {
        let tmp = temp_path(path);
        let file = File::create(&tmp)
            .map_err(|e| AtomicWriteError::new(format!("creating {}", tmp.display()), &tmp, e))?;
        Ok(AtomicFile {
            file,
            tmp,
            path: path.to_path_buf(),
            renamed: false,
        })
    }

    /// The temp file being written.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Path of the temp file.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Path of the target file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fsyncs the temp file, renames it over the target and fsyncs the
    /// directory. Returns the target path. On an error before the rename the
    /// temp file is removed and the target is unchanged.
    pub fn commit(mut self) -> Result<PathBuf, AtomicWriteError> {
        let tmp = &self.tmp;
        self.file
            .sync_all()
            .map_err(|e| AtomicWriteError::new(format!("writing {}", tmp.display()), tmp, e))?;
        std::fs::rename(tmp, &self.path).map_err(|e| {
            AtomicWriteError::new(
                format!("renaming {} to {}", tmp.display(), self.path.display()),
                &self.path,
                e,
            )
        })?;
        // From here on there is no temp file to clean up.
        self.renamed = true;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
            AtomicWriteError::new(format!("fsync of directory {}", dir.display()), dir, e)
        })?;
        Ok(self.path.clone())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.renamed {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.tmp.display(), error = %e, "cannot remove the temp file of a failed write");
            }
        }
    }
}

/// Writes `path` atomically: `body` writes the temp file (see the module
/// doc), which is then fsynced and renamed into place. On any error the temp
/// file is removed, `path` is unchanged, and the error names the file and
/// keeps the OS error. Returns what `body` returned.
pub fn write_atomic<T>(
    path: &Path,
    body: impl FnOnce(&mut File) -> std::io::Result<T>,
) -> Result<T, AtomicWriteError> {
    let mut f = AtomicFile::create(path)?;
    let out = body(f.file()).map_err(|e| {
        let tmp = f.temp_path();
        AtomicWriteError::new(format!("writing {}", tmp.display()), tmp, e)
    })?;
    f.commit()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temp_name_is_hidden_in_the_same_dir() {
        assert_eq!(
            temp_path(Path::new("/a/b/step-3.ckpt")),
            Path::new("/a/b/.step-3.ckpt.tmp")
        );
        assert_eq!(temp_path(Path::new("m.json")), Path::new(".m.json.tmp"));
    }

    #[test]
    fn writes_and_replaces_leaving_no_temp() {
        let d = scratch("replace");
        let p = d.join("f.json");
        write_atomic(&p, |f| f.write_all(b"one")).unwrap();
        std::fs::write(d.join("other"), b"x").unwrap();
        let n = write_atomic(&p, |f| f.write_all(b"two").map(|()| 3)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d), ["f.json", "other"]);
        let mut w = AtomicFile::create(&d.join("g")).unwrap();
        w.write_all(b"streamed").unwrap();
        assert!(d.join(".g.tmp").exists() && !d.join("g").exists());
        assert_eq!(w.commit().unwrap(), d.join("g"));
        assert_eq!(std::fs::read(d.join("g")).unwrap(), b"streamed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_or_dropped_write_keeps_the_old_file_and_no_temp() {
        let d = scratch("fail");
        let p = d.join("f");
        write_atomic(&p, |f| f.write_all(b"old")).unwrap();
        let e = write_atomic(&p, |f| {
            f.write_all(b"partial")?;
            Err::<(), _>(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(
            e.to_string().contains(".f.tmp") && e.to_string().contains("disk on fire"),
            "{e}"
        );
        assert_eq!(e.path, d.join(".f.tmp"));
        let mut w = AtomicFile::create(&p).unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(&d), ["f"]);
        // A missing directory is named in the error.
        let e = write_atomic(&d.join("nope/f"), |_| Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("creating") && e.to_string().contains("nope"),
            "{e}"
        );
        assert_eq!(e.source.kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
