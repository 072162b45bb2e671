//! One output file written atomically: a temporary file beside the target, registered with the
//! runtime (removed if the process fails or is interrupted), space reserved up front, written
//! with positioned writes, synced, then renamed over the target. A crash, a kill or a full disk
//! never leaves a partial file at the target.

use std::fs::{File, Permissions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::runtime::{Runtime, Temporary};
use crate::text::human_bytes;

/// The directory a target lives in (`.` for a bare file name).
pub fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file being written under a temporary name, renamed to its target on [`commit`].
///
/// Dropped without commit, the temporary file is removed.
///
/// [`commit`]: AtomicFile::commit
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    tmp: Temporary,
    force: bool,
    /// Bytes written so far, to start the writeback as the file is written.
    written: AtomicU64,
}

/// Bytes written between two requests to start writing back the file.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// Starts writing back the dirty pages of `file` without waiting (Linux); a hint, so a failure
/// is ignored: `fsync` reports real errors.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open file descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

impl AtomicFile {
    /// Creates the temporary file beside `target`, registered with `rt`.
    pub fn create(target: &Path, force: bool, rt: &Runtime) -> Result<AtomicFile> {
        let dir = parent_dir(target);
        let tmp = rt
            .temporary(&dir, ".ema-tool-", ".tmp")
            .map_err(|e| Error::io(&dir, e))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            tmp,
            force,
            written: AtomicU64::new(0),
        })
    }

    /// Reserves `len` bytes on disk for the file, so that a full disk is reported now rather
    /// than after reading every input. Filesystems that cannot reserve space are left to report
    /// it at the write.
    pub fn reserve(&self, len: u64) -> Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        use rustix::io::Errno;
        if len == 0 {
            return Ok(());
        }
        let full = |e: std::io::Error| Error::Output {
            path: self.target.clone(),
            what: format!("cannot reserve {} for the output: {e}", human_bytes(len)),
        };
        // On tmpfs, fallocate allocates and zeroes every page, which the write then fills
        // again: a quarter of the time of a sweep's outputs. The free space is enough to know.
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        // `f_type` is an i64 on x86-64 Linux and a u32 or i32 elsewhere.
        #[allow(clippy::unnecessary_cast)]
        let tmpfs = |s: rustix::fs::StatFs| s.f_type as i64 == TMPFS_MAGIC;
        if rustix::fs::fstatfs(self.file()).is_ok_and(tmpfs) {
            if let Ok(v) = rustix::fs::fstatvfs(self.file()) {
                if v.f_bavail.saturating_mul(v.f_frsize) < len {
                    return Err(full(std::io::Error::from_raw_os_error(libc::ENOSPC)));
                }
            }
            return Ok(());
        }
        loop {
            // KEEP_SIZE: the file's size still grows only with what is written, which
            // `SafetensorsWriter::commit` checks.
            match fallocate(self.file(), FallocateFlags::KEEP_SIZE, 0, len) {
                Ok(()) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => return Ok(()),
                Err(e) => return Err(full(e.into())),
            }
        }
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.tmp.file()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `bytes` at `off` of the temporary file.
    ///
    /// Every `WRITEBACK_BYTES`, asks the kernel to start writing the file's dirty pages to
    /// disk (`sync_file_range`, which does not wait): the disk writes while the fold goes on,
    /// and the `fsync` of [`commit`](AtomicFile::commit) finds less left to do.
    pub fn write_at(&self, off: u64, bytes: &[u8]) -> Result<()> {
        self.file()
            .write_all_at(bytes, off)
            .map_err(|e| Error::io(&self.target, e))?;
        self.wrote(bytes.len() as u64);
        Ok(())
    }

    /// Counts `n` bytes written, and every [`WRITEBACK_BYTES`] starts the write-back.
    fn wrote(&self, n: u64) {
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if (before + n) / WRITEBACK_BYTES != before / WRITEBACK_BYTES {
            start_writeback(self.file());
        }
    }

    /// Writes `bufs` back to back from `off` of the temporary file: [`AtomicFile::write_at`]
    /// with one `pwritev` for as many buffers as it takes (up to 1024).
    pub fn write_vectored_at(&self, mut off: u64, bufs: &[&[u8]]) -> Result<()> {
        const IOV_MAX: usize = 1024;
        let io = |e: std::io::Error| Error::io(&self.target, e);
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        // The first buffer not fully written, and how much of it is.
        let (mut first, mut done) = (0, 0);
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
        while first < bufs.len() {
            let slices: Vec<std::io::IoSlice> = std::iter::once(&bufs[first][done..])
                .chain(bufs[first + 1..].iter().copied())
                .take(IOV_MAX)
                .map(std::io::IoSlice::new)
                .collect();
            let mut n = match rustix::io::pwritev(self.file(), &slices, off) {
                Ok(0) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    );
                    return Err(io(e));
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io(e.into())),
            };
            off += n as u64;
            while n > 0 {
                let left = bufs[first].len() - done;
                if n < left {
                    done += n;
                    n = 0;
                } else {
                    n -= left;
                    (first, done) = (first + 1, 0);
                }
            }
            // Skip empty buffers, so that the loop ends with the last one.
            while first < bufs.len() && bufs[first].len() == done {
                (first, done) = (first + 1, 0);
            }
        }
        self.wrote(total);
        Ok(())
    }

    /// Syncs the data and makes the file world-readable (0644), as [`AtomicFile::finish`]
    /// does: a writer of several files does this for all of them before any is renamed.
    pub fn sync(&self) -> Result<()> {
        let io = |e: std::io::Error| Error::io(&self.target, e);
        self.file().sync_all().map_err(io)?;
        std::fs::set_permissions(self.tmp.path(), Permissions::from_mode(0o644)).map_err(io)
    }

    /// Syncs the data and makes the file world-readable; what is left is the rename, which
    /// [`commit_all`] makes.
    pub fn finish(self) -> Result<Finished> {
        self.sync()?;
        Ok(Finished {
            tmp: self.tmp,
            target: self.target,
            replace: self.force,
        })
    }
}

/// A complete, synced temporary file waiting to be renamed to its target.
#[derive(Debug)]
pub struct Finished {
    tmp: Temporary,
    target: PathBuf,
    replace: bool,
}

/// Renames every finished file to its target, as one step as far as signals go
/// ([`Runtime::persist_all`]); if one rename fails, the targets renamed before it are removed
/// again. An existing target is replaced only when its writer was created with `force`.
pub fn commit_all(rt: &Runtime, files: Vec<Finished>) -> Result<()> {
    let targets: Vec<(PathBuf, bool)> = files
        .iter()
        .map(|f| (f.target.clone(), f.replace))
        .collect();
    rt.persist_all(
        files
            .into_iter()
            .map(|f| (f.tmp, f.target, f.replace))
            .collect(),
    )
    .map_err(|(i, e)| {
        let (target, replace) = &targets[i];
        if !replace && e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Output {
                path: target.clone(),
                what: "appeared while writing (use --force to replace it)".into(),
            }
        } else {
            Error::io(target, e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_put_every_buffer_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let rt = Runtime::new();
        let f = AtomicFile::create(&target, false, &rt).unwrap();
        // More buffers than one pwritev takes, empty ones among them (first and last too).
        let bufs: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; if i % 7 == 0 { 0 } else { (i % 13) as usize }])
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        f.write_at(0, b"head").unwrap();
        f.write_vectored_at(4, &slices).unwrap();
        f.write_vectored_at(4, &[]).unwrap();
        commit_all(&rt, vec![f.finish().unwrap()]).unwrap();
        let want: Vec<u8> = b"head".iter().copied().chain(bufs.concat()).collect();
        assert_eq!(std::fs::read(&target).unwrap(), want);
    }
}
