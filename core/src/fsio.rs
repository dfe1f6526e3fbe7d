//! Atomic file writes: the one helper every output of ddm goes through.
//!
//! A reader never sees a half-written file: bytes go to a temporary file in the destination's
//! directory, are flushed to disk (`fsync`), and the temporary file is renamed over the
//! destination (atomic on POSIX file systems). The directory is then synced so the rename itself
//! survives a crash.
//!
//! Whole directories (a partition, an export) are written the same way: into a temporary
//! directory beside the destination ([`TempDir::beside`]), then moved into place in one step
//! ([`TempDir::publish`]; an existing destination is swapped out atomically on Linux). A process
//! killed before that leaves only its hidden temporary directory, which the next run's
//! [`TempDir::beside`] removes once its owner is dead.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Write `path` atomically with whatever `write` puts into the given writer.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    remove_abandoned(dir, "tmp");
    let prefix = tmp_prefix();
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // Outputs are meant to be shared (copied to islands, read by other users): rw-r--r--, not the
    // temp file's private default.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, plain(e)))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Make the rename durable. Some file systems refuse to open a directory for syncing; the
    // data itself is already on disk then, so that failure is not worth an error.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A temporary file's name prefix, `.ddm-tmp-<pid>-`: a file left by a killed process (SIGKILL
/// runs no cleanup) is known as abandoned by its pid, and removed by the next write beside it.
fn tmp_prefix() -> String {
    format!(".ddm-tmp-{}-", std::process::id())
}

/// The OS's error alone: `tempfile` appends the random temporary name, which means nothing to a
/// user (the error already names the directory).
fn plain(e: std::io::Error) -> std::io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    let text = e.to_string();
    match text.split_once(" at path ") {
        Some((reason, _)) => std::io::Error::new(e.kind(), reason.to_string()),
        None => e,
    }
}

/// Fail early, before hours of work, if `path` could not be written: its directory must exist (or
/// be creatable) and take a new file.
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    remove_abandoned(&dir, "tmp");
    tempfile::Builder::new()
        .prefix(&tmp_prefix())
        .tempfile_in(&dir)
        .map(drop)
        .map_err(|e| Error::io(&dir, plain(e)))
}

/// Write `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// A directory being written, beside its destination, named `.ddm-<what>-<pid>-<random>`; removed
/// on drop unless published.
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
    parent: PathBuf,
}

fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl TempDir {
    /// A new temporary directory in `out`'s parent (created if needed). Left-overs of earlier
    /// `what` writes whose process is gone (killed: SIGKILL runs no cleanup) are removed first.
    pub fn beside(out: &Path, what: &str) -> Result<Self> {
        let parent = parent_of(out);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        remove_abandoned(&parent, what);
        let mut builder = tempfile::Builder::new();
        let prefix = format!(".ddm-{what}-{}-", std::process::id());
        builder.prefix(&prefix);
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let dir = builder
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, plain(e)))?;
        Ok(Self {
            dir: Some(dir),
            parent,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("not yet published").path()
    }

    /// Move the finished directory to `out` in one step: a reader sees the old `out` or the new
    /// one, never a mix. An existing `out` is swapped out atomically (Linux `renameat2` with
    /// `RENAME_EXCHANGE`) and then deleted; where that is unsupported it is moved aside first.
    pub fn publish(mut self, out: &Path) -> Result<()> {
        let tmp = self.dir.take().expect("published once").keep();
        if let Ok(d) = std::fs::File::open(&tmp) {
            let _ = d.sync_all();
        }
        let result = if out.exists() {
            if exchange(&tmp, out).is_ok() {
                // `tmp` now holds the old directory.
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))
            } else {
                let old = self.parent.join(format!(".ddm-old-{}", std::process::id()));
                std::fs::rename(out, &old)
                    .and_then(|()| std::fs::rename(&tmp, out))
                    .map_err(|e| Error::io(out, e))
                    .and_then(|()| std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e)))
            }
        } else {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
        };
        if result.is_err() && tmp.exists() && !out.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        if let Ok(d) = std::fs::File::open(&self.parent) {
            let _ = d.sync_all();
        }
        result
    }
}

/// Swap two paths atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths; the call reads them only.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Remove `.ddm-<what>-<pid>-*` entries (directories or files) of `parent` whose process is gone.
fn remove_abandoned(parent: &Path, what: &str) {
    let prefix = format!(".ddm-{what}-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && Path::new("/proc/self").exists()
        {
            tracing::info!("removing {}, left by an interrupted run", e.path().display());
            let _ = match e.file_type().is_ok_and(|t| t.is_dir()) {
                true => std::fs::remove_dir_all(e.path()),
                false => std::fs::remove_file(e.path()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file left by a killed process is removed by the next write beside it; one of
    /// a process still running is not.
    #[test]
    fn temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let abandoned = dir.path().join(format!(".ddm-tmp-{dead}-abc123"));
        let alive = dir.path().join(format!(".ddm-tmp-{}-def456", std::process::id()));
        std::fs::write(&abandoned, b"half").unwrap();
        std::fs::write(&alive, b"busy").unwrap();
        write_bytes_atomic(&dir.path().join("out.bin"), b"x").unwrap();
        assert!(!abandoned.exists() && alive.exists());
    }

    #[test]
    fn writes_and_replaces_without_leaving_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_bytes_atomic(&p, b"first").unwrap();
        write_bytes_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
    }

    #[test]
    fn failed_write_leaves_destination_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_bytes_atomic(&p, b"good").unwrap();
        let r = write_atomic(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn directories_are_published_whole_and_replace_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        for round in ["first", "second"] {
            let t = TempDir::beside(&out, "test").unwrap();
            std::fs::write(t.path().join("a"), round).unwrap();
            t.publish(&out).unwrap();
            assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), round);
        }
        // An abandoned directory of a dead process (pid beyond pid_max) is removed by the next
        // run; the next run's own is removed when dropped unpublished.
        let stale = dir.path().join(".ddm-test-4194305-x");
        std::fs::create_dir(&stale).unwrap();
        drop(TempDir::beside(&out, "test").unwrap());
        assert!(!stale.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let e = write_bytes_atomic(Path::new("/nonexistent-ddm-dir/x.bin"), b"x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent-ddm-dir"), "{e}");
    }
}
