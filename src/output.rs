//! Writing outputs atomically: a temporary file beside the target, space reserved up front,
//! written with positioned writes, synced, then renamed over the target. A crash, a kill or a
//! full disk never leaves a partial file at the target.
//!
//! Every temporary file is removed when its writer is dropped (any error) and, once
//! [`remove_temporaries_on_signals`] is installed, on SIGINT, SIGTERM and SIGHUP. Only SIGKILL
//! (or a power cut) can leave a `.ema-tool-*.tmp` file beside the target; never a partial target.
//!
//! [`Writer`] picks the format from the target's name and `--max-shard-size`: safetensors,
//! sharded safetensors ([`sharded`]) or a PyTorch state dict ([`pth`]).

pub mod pth;
pub mod sharded;

use std::collections::BTreeMap;
use std::fs::{File, Permissions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tempfile::NamedTempFile;

use crate::checkpoint::safetensors::{encode_header, OutTensor};
use crate::checkpoint::torch::is_torch_name;
use crate::error::{Error, Result};
use crate::fold::Sink;

/// Checks, before any work, that `target` can be written: not one of `inputs`, not an existing
/// file unless `force`, and in a directory that exists and is writable.
pub fn check_target(target: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let out_err = |what: String| Error::Output {
        path: target.to_path_buf(),
        what,
    };
    if let Ok(tmeta) = std::fs::metadata(target) {
        for input in inputs {
            if let Ok(imeta) = std::fs::metadata(input) {
                if imeta.dev() == tmeta.dev() && imeta.ino() == tmeta.ino() {
                    return Err(out_err("is also an input; refusing to overwrite it".into()));
                }
            }
        }
        if tmeta.is_dir() {
            return Err(out_err("is a directory".into()));
        }
        if !force {
            return Err(out_err("already exists (use --force to replace it)".into()));
        }
    }
    // An input whose path resolves to the target through a link not yet created cannot exist;
    // also compare names, for inputs inside a sharded directory that is the target.
    let dir = parent_dir(target);
    let dmeta = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
    if !dmeta.is_dir() {
        return Err(out_err(format!("{} is not a directory", dir.display())));
    }
    // Creating a probe file is the only reliable test of writability (ACLs, read-only mounts).
    let (probe, _live) = create_temp(&dir, ".ema-tool-probe-", "")
        .map_err(|e| out_err(format!("cannot write in {}: {e}", dir.display())))?;
    drop(probe);
    Ok(())
}

/// What the signal handler needs to know about this process's files.
struct Files {
    /// Temporary files being written, for the handler to remove.
    temporaries: Vec<PathBuf>,
    /// Outputs already renamed into place, for the handler to report.
    committed: Vec<PathBuf>,
}

static LIVE: Mutex<Files> = Mutex::new(Files {
    temporaries: Vec::new(),
    committed: Vec::new(),
});

fn live() -> MutexGuard<'static, Files> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The temporary files this process is writing now (for the SIGBUS guard of mapped inputs,
/// which removes them if it has to end the process).
pub fn temporaries() -> Vec<PathBuf> {
    live().temporaries.clone()
}

/// A path in [`LIVE`], taken out when dropped (after the file itself is gone or renamed).
#[derive(Debug)]
struct Live(PathBuf);

impl Drop for Live {
    fn drop(&mut self) {
        live().temporaries.retain(|p| p != &self.0);
    }
}

/// Creates a temporary file in `dir` and records it in [`LIVE`] in one step, so that no signal
/// can come between the two.
fn create_temp(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<(NamedTempFile, Live)> {
    let mut live = live();
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(suffix)
        .tempfile_in(dir)?;
    live.temporaries.push(tmp.path().to_path_buf());
    let path = tmp.path().to_path_buf();
    drop(live);
    Ok((tmp, Live(path)))
}

/// On SIGINT, SIGTERM or SIGHUP: remove every temporary file this process is writing, say so,
/// and exit with 128 + the signal number (130 for Ctrl-C).
///
/// The handler is a thread that takes the lock of the live list and never gives it back, so a
/// commit either renamed its file before (the target is complete) or never will (its temporary
/// is removed). Call once, from `main`.
pub fn remove_temporaries_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use std::io::Write;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("ema-tool-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let live = live();
                for p in &live.temporaries {
                    let _ = std::fs::remove_file(p);
                }
                let name = match sig {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                let mut what = String::new();
                if let Some(done) = live.committed.last() {
                    let done = crate::error::one_line(&done.display().to_string(), 1000);
                    what = format!(" after writing {done}");
                }
                if !live.temporaries.is_empty() {
                    what.push_str("; removed the unfinished output");
                }
                // Not eprintln!, which panics (here: ends this thread, not the process) when
                // stderr is gone.
                let _ = writeln!(std::io::stderr(), "ema-tool: interrupted by {name}{what}");
                std::process::exit(128 + sig)
            }
        })?;
    Ok(())
}

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
    tmp: NamedTempFile,
    force: bool,
    // Declared after `tmp`: dropped after the file is removed.
    live: Live,
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
    /// Creates the temporary file beside `target`.
    pub fn create(target: &Path, force: bool) -> Result<AtomicFile> {
        let dir = parent_dir(target);
        let (tmp, live) =
            create_temp(&dir, ".ema-tool-", ".tmp").map_err(|e| Error::io(&dir, e))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            tmp,
            force,
            live,
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
        loop {
            // KEEP_SIZE: the file's size still grows only with what is written, which
            // `SafetensorsWriter::commit` checks.
            match fallocate(self.file(), FallocateFlags::KEEP_SIZE, 0, len) {
                Ok(()) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => return Ok(()),
                Err(e) => {
                    return Err(Error::Output {
                        path: self.target.clone(),
                        what: format!(
                            "cannot reserve {} for the output: {}",
                            crate::cmd::human_bytes(len),
                            std::io::Error::from(e)
                        ),
                    })
                }
            }
        }
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `bytes` at `off` of the temporary file.
    ///
    /// Every [`WRITEBACK_BYTES`], asks the kernel to start writing the file's dirty pages to
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

    /// Syncs the data and makes the file world-readable (0644), as [`AtomicFile::commit`] does
    /// before it renames: a writer of several files does this for all of them first.
    pub fn sync(&self) -> Result<()> {
        let io = |e: std::io::Error| Error::io(&self.target, e);
        self.tmp.as_file().sync_all().map_err(io)?;
        std::fs::set_permissions(self.tmp.path(), Permissions::from_mode(0o644)).map_err(io)
    }

    /// Syncs the data, makes the file world-readable (0644), renames it to the target and
    /// syncs the directory.
    pub fn commit(self) -> Result<()> {
        let AtomicFile {
            target,
            tmp,
            force,
            live: live_entry,
            written: _,
        } = self;
        let io = |e: std::io::Error| Error::io(&target, e);
        tmp.as_file().sync_all().map_err(io)?;
        std::fs::set_permissions(tmp.path(), Permissions::from_mode(0o644)).map_err(io)?;
        // Under the lock of the live list: a signal handler cannot remove the file between the
        // rename and the moment it is no longer listed.
        let mut live = live();
        let persisted = if force {
            tmp.persist(&target).map(drop).map_err(|e| io(e.error))
        } else {
            tmp.persist_noclobber(&target).map(drop).map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::Output {
                        path: target.clone(),
                        what: "appeared while writing (use --force to replace it)".into(),
                    }
                } else {
                    io(e.error)
                }
            })
        };
        live.temporaries.retain(|p| p != &live_entry.0);
        if persisted.is_ok() {
            live.committed.push(target.clone());
        }
        drop(live);
        drop(live_entry);
        persisted?;
        let dir = parent_dir(&target);
        if let Ok(d) = File::open(&dir) {
            // Not every filesystem can sync a directory; the rename is done either way.
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A safetensors file being written: header first, tensor data at known offsets.
pub struct SafetensorsWriter {
    file: AtomicFile,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    total: u64,
}

impl SafetensorsWriter {
    /// Creates the temporary file, writes the header and sizes the file.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[OutTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        let file = AtomicFile::create(target, force)?;
        let (header, offsets) = encode_header(tensors, metadata);
        let sizes: Vec<u64> = tensors.iter().map(OutTensor::nbytes).collect();
        let total = header.len() as u64 + sizes.iter().sum::<u64>();
        file.reserve(total)?;
        file.write_at(0, &header)?;
        Ok(SafetensorsWriter {
            file,
            offsets,
            sizes,
            total,
        })
    }

    /// Total size of the file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Checks the file is complete, syncs and renames it into place.
    pub fn commit(self) -> Result<u64> {
        check_length(&self.file, self.total)?;
        self.file.commit()?;
        Ok(self.total)
    }

    /// Checks the file is complete and syncs it, without renaming it yet.
    pub fn prepare(&self) -> Result<()> {
        check_length(&self.file, self.total)?;
        self.file.sync()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        self.file.target()
    }
}

/// Checks that `file` has the length planned for it.
pub(crate) fn check_length(file: &AtomicFile, total: u64) -> Result<()> {
    let len = file
        .file()
        .metadata()
        .map_err(|e| Error::io(file.target(), e))?
        .len();
    if len != total {
        return Err(Error::Output {
            path: file.target().to_path_buf(),
            what: format!("internal error: wrote {len} bytes, expected {total}"),
        });
    }
    Ok(())
}

impl Sink for SafetensorsWriter {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        debug_assert!(off + bytes.len() as u64 <= self.sizes[tensor]);
        self.file.write_at(self.offsets[tensor] + off, bytes)
    }

    fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut start, mut end) = (0, 0);
        for &(tensor, off, bytes) in writes {
            debug_assert!(off + bytes.len() as u64 <= self.sizes[tensor]);
            let at = self.offsets[tensor] + off;
            if at != end && !run.is_empty() {
                self.file.write_vectored_at(start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                start = at;
            }
            run.push(bytes);
            end = at + bytes.len() as u64;
        }
        if !run.is_empty() {
            self.file.write_vectored_at(start, &run)?;
        }
        Ok(())
    }
}

/// Checks, before any work, that `target` and `--max-shard-size` go together: shards are
/// safetensors files named after a `<stem>.safetensors` target.
pub fn check_output_kind(target: &Path, max_shard_size: Option<u64>) -> Result<()> {
    if max_shard_size.is_some() {
        if is_torch_name(target) {
            return Err(Error::usage(format!(
                "{}: --max-shard-size writes safetensors shards; name the output \
                 <stem>.safetensors",
                target.display()
            )));
        }
        sharded::shard_names(target, 1)?;
    }
    Ok(())
}

/// An output of any format, being written.
pub enum Writer {
    Safetensors(SafetensorsWriter),
    Sharded(sharded::ShardedWriter),
    Pth(pth::PthWriter),
}

impl Writer {
    /// Creates the output for `tensors`: a `.pth` state dict when `target` has a PyTorch
    /// extension (metadata cannot go there and is dropped), shards when `max_shard_size` is
    /// given and one shard cannot hold everything, else one safetensors file.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[OutTensor],
        metadata: &BTreeMap<String, String>,
        max_shard_size: Option<u64>,
    ) -> Result<Writer> {
        check_output_kind(target, max_shard_size)?;
        if is_torch_name(target) {
            return Ok(Writer::Pth(pth::PthWriter::create(target, force, tensors)?));
        }
        if let Some(max) = max_shard_size {
            let groups = sharded::plan_shards(tensors, max);
            if groups.len() > 1 {
                return Ok(Writer::Sharded(sharded::ShardedWriter::create(
                    target, force, tensors, metadata, &groups,
                )?));
            }
        }
        Ok(Writer::Safetensors(SafetensorsWriter::create(
            target, force, tensors, metadata,
        )?))
    }

    /// The file to name in summaries: the target, or the index of a sharded output.
    pub fn display_path(&self, target: &Path) -> PathBuf {
        match self {
            Writer::Sharded(s) => s.index_path().to_path_buf(),
            _ => target.to_path_buf(),
        }
    }

    /// Completes the output; returns the bytes written.
    pub fn commit(self) -> Result<u64> {
        match self {
            Writer::Safetensors(w) => w.commit(),
            Writer::Sharded(w) => w.commit(),
            Writer::Pth(w) => w.commit(),
        }
    }
}

impl Sink for Writer {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        match self {
            Writer::Safetensors(w) => w.write(tensor, off, bytes),
            Writer::Sharded(w) => w.write(tensor, off, bytes),
            Writer::Pth(w) => w.write(tensor, off, bytes),
        }
    }

    fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        match self {
            Writer::Safetensors(w) => w.write_batch(writes),
            Writer::Sharded(w) => w.write_batch(writes),
            Writer::Pth(w) => w.write_batch(writes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_put_every_buffer_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let f = AtomicFile::create(&target, false).unwrap();
        // More buffers than one pwritev takes, empty ones among them (first and last too).
        let bufs: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; if i % 7 == 0 { 0 } else { (i % 13) as usize }])
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        f.write_at(0, b"head").unwrap();
        f.write_vectored_at(4, &slices).unwrap();
        f.write_vectored_at(4, &[]).unwrap();
        f.commit().unwrap();
        let want: Vec<u8> = b"head".iter().copied().chain(bufs.concat()).collect();
        assert_eq!(std::fs::read(&target).unwrap(), want);
    }
}
