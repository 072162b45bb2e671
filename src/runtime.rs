//! Process-wide state, all of it in one place: signal dispositions and the handler that removes
//! unfinished outputs, the registry of those temporary files, the `SIGBUS` guard of mapped
//! inputs, and the open-file limit.
//!
//! A [`Runtime`] is made once, by `main` ([`Runtime::install`]) or by a library caller or test
//! ([`Runtime::new`], which changes no signal disposition and starts no thread), and handed down as a parameter to
//! whatever needs it: the output writers register their temporary files with it, the CPU fold
//! asks it to guard its mappings. No other module keeps process-wide state.
//!
//! Signal handlers cannot be given parameters, so the state behind a `Runtime` is static; the
//! handle is how the rest of the code is told, in its signature, that it touches that state.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

use tempfile::NamedTempFile;

/// The handle on the process-wide state; see the module documentation.
#[derive(Debug, Default)]
pub struct Runtime {
    _private: (),
}

impl Runtime {
    /// A runtime that leaves signal dispositions and limits as they are: temporary files are
    /// still registered and removed when dropped, and mapped inputs are still guarded.
    pub fn new() -> Runtime {
        Runtime { _private: () }
    }

    /// The runtime of the `ema-tool` process. Call once, at start-up, before any thread exists:
    ///
    /// - SIGPIPE gets its default disposition back (Rust ignores it), so that
    ///   `ema-tool inspect | head` exits quietly;
    /// - SIGXFSZ is ignored, so that a write past `ulimit -f` fails with EFBIG (reported, the
    ///   temporary file removed) instead of killing the process;
    /// - the soft limit of open files is raised to the hard limit: a fold keeps every input
    ///   open, and a run over more than ~1000 checkpoints would hit the usual default.
    ///
    /// Commands that write files then call [`Runtime::remove_temporaries_on_signals`].
    pub fn install() -> Runtime {
        // SAFETY: setting signal dispositions at start-up, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        raise_open_file_limit();
        Runtime::new()
    }

    /// On SIGINT, SIGTERM or SIGHUP: removes every registered temporary file, says so, and
    /// exits with 128 + the signal number (130 for Ctrl-C).
    ///
    /// The handler is a thread that takes the registry's lock and never gives it back, so a
    /// commit ([`Runtime::persist_all`]) either renamed its file before (the target is complete)
    /// or never will (its temporary is removed).
    pub fn remove_temporaries_on_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        use std::io::Write;
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        std::thread::Builder::new()
            .name("ema-tool-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let files = registry();
                    for p in &files.temporaries {
                        let _ = std::fs::remove_file(p);
                    }
                    for d in &files.directories {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    let name = match sig {
                        SIGINT => "SIGINT",
                        SIGTERM => "SIGTERM",
                        _ => "SIGHUP",
                    };
                    let mut what = String::new();
                    if let Some(done) = files.committed.last() {
                        let done = crate::text::one_line(&done.display().to_string(), 1000);
                        what = format!(" after writing {done}");
                    }
                    if !files.temporaries.is_empty() || !files.directories.is_empty() {
                        what.push_str("; removed the unfinished output");
                    }
                    // Not eprintln!, which panics (here: ends this thread, not the process)
                    // when stderr is gone.
                    let _ = writeln!(std::io::stderr(), "ema-tool: interrupted by {name}{what}");
                    std::process::exit(128 + sig)
                }
            })?;
        Ok(())
    }

    /// Creates a temporary file in `dir` named `<prefix>XXXXXX<suffix>` and registers it in one
    /// step, so that no signal comes between the two.
    pub fn temporary(&self, dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Temporary> {
        let mut files = registry();
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempfile_in(dir)?;
        let path = tmp.path().to_path_buf();
        files.temporaries.push(path.clone());
        drop(files);
        Ok(Temporary {
            file: Some(tmp),
            registered: Registered(path),
        })
    }

    /// Creates a temporary directory in `dir` named `<prefix>XXXXXX<suffix>` and registers it in
    /// one step: the signal handlers remove it with whatever it holds.
    pub fn temporary_dir(
        &self,
        dir: &Path,
        prefix: &str,
        suffix: &str,
    ) -> std::io::Result<PathBuf> {
        let mut files = registry();
        let path = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempdir_in(dir)?
            .keep();
        files.directories.push(path.clone());
        Ok(path)
    }

    /// Removes a temporary directory of [`Runtime::temporary_dir`] and what it holds.
    pub fn discard_dir(&self, path: &Path) {
        let mut files = registry();
        let _ = std::fs::remove_dir_all(path);
        files.directories.retain(|p| p != path);
    }

    /// Renames each temporary directory of [`Runtime::temporary_dir`] to its target
    /// (`(directory, target)`), under the registry's lock as [`Runtime::persist_all`] does: an
    /// existing target is exchanged with it in one step (`renameat2(RENAME_EXCHANGE)`, then the
    /// old one removed), so the target is never missing. On failure, returns the index.
    pub fn publish_dirs(&self, dirs: &[(PathBuf, PathBuf)]) -> Result<(), (usize, std::io::Error)> {
        let mut files = registry();
        for (i, (tmp, target)) in dirs.iter().enumerate() {
            let result = if target.exists() {
                exchange(tmp, target).map(|()| {
                    // `tmp` now holds the replaced checkpoint.
                    let _ = std::fs::remove_dir_all(tmp);
                })
            } else {
                std::fs::rename(tmp, target)
            };
            files.directories.retain(|p| p != tmp);
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(tmp);
                return Err((i, e));
            }
            files.committed.push(target.clone());
        }
        Ok(())
    }

    /// Renames every temporary file to its target (`(file, target, replace)`: `replace` allows
    /// an existing target to be replaced), as one step as far as signals go: the handler of
    /// [`Runtime::remove_temporaries_on_signals`] waits for the registry's lock, so it sees all
    /// of them renamed or none. On a failed rename, the targets renamed before it are removed
    /// again and the error is returned with the index of the file that failed.
    pub fn persist_all(
        &self,
        files: Vec<(Temporary, PathBuf, bool)>,
    ) -> Result<(), (usize, std::io::Error)> {
        let mut reg = registry();
        let mut renamed: Vec<PathBuf> = Vec::with_capacity(files.len());
        // Their registrations, dropped once the lock is released (a drop takes it again).
        let mut done: Vec<Temporary> = Vec::with_capacity(files.len());
        for (i, (mut tmp, target, replace)) in files.into_iter().enumerate() {
            let file = tmp.file.take().expect("a temporary is persisted once");
            let result = if replace {
                file.persist(&target).map(drop)
            } else {
                file.persist_noclobber(&target).map(drop)
            };
            reg.temporaries.retain(|p| p != &tmp.registered.0);
            done.push(tmp);
            match result {
                Ok(()) => renamed.push(target),
                Err(e) => {
                    for p in &renamed {
                        let _ = std::fs::remove_file(p);
                    }
                    // Dropping the temporary file removes it.
                    drop(e.file);
                    drop(reg);
                    return Err((i, e.error));
                }
            }
        }
        reg.committed.extend(renamed.iter().cloned());
        drop(reg);
        drop(done);
        for target in &renamed {
            let dir = match target.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if let Ok(d) = File::open(dir) {
                // Not every filesystem can sync a directory; the rename is done either way.
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Makes a `SIGBUS` at an address in one of `ranges` (`(start, end, message)`, mapped
    /// files) print its message, remove every registered temporary file and exit with status
    /// 1, until the returned guard is dropped. Guards are held one at a time: a second waits for
    /// the first to be dropped.
    pub fn guard_mappings(&self, ranges: Vec<(usize, usize, Vec<u8>)>) -> SigbusGuard {
        SigbusGuard::new(ranges)
    }
}

/// What the handlers need to know about this process's files.
struct Files {
    /// Temporary files being written, for the handlers to remove.
    temporaries: Vec<PathBuf>,
    /// Temporary directories being written (DCP outputs), removed whole by the handlers.
    directories: Vec<PathBuf>,
    /// Outputs already renamed into place, for the signal handler to report.
    committed: Vec<PathBuf>,
}

static FILES: Mutex<Files> = Mutex::new(Files {
    temporaries: Vec::new(),
    directories: Vec::new(),
    committed: Vec::new(),
});

/// Exchanges two paths in one step (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no other memory is passed.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn registry() -> MutexGuard<'static, Files> {
    FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A registered temporary file: removed when dropped, unless persisted.
#[derive(Debug)]
pub struct Temporary {
    // Declared before `registered`: the file is removed before it leaves the registry.
    file: Option<NamedTempFile>,
    registered: Registered,
}

impl Temporary {
    /// The open file.
    pub fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("a temporary is used before it is persisted")
            .as_file()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.registered.0
    }
}

/// A path in the registry, taken out when dropped (after the file itself is gone or renamed).
#[derive(Debug)]
struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        registry().temporaries.retain(|p| p != &self.0);
    }
}

/// Raises the soft limit of open files to the hard limit.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What the `SIGBUS` handler needs, allocated before it can run, never freed while installed.
struct GuardState {
    /// Mapped address ranges and the message for each.
    ranges: Vec<(usize, usize, Vec<u8>)>,
    /// Files to remove before exiting.
    cleanup: Vec<CString>,
}

/// The state of the guard in force, or null.
static STATE: AtomicPtr<GuardState> = AtomicPtr::new(std::ptr::null_mut());
/// Guards are used one at a time.
static GUARD_LOCK: Mutex<()> = Mutex::new(());

/// While alive, makes a `SIGBUS` in one of its address ranges an error exit; see
/// [`Runtime::guard_mappings`].
pub struct SigbusGuard {
    state: *mut GuardState,
    _lock: MutexGuard<'static, ()>,
}

// SAFETY: `state` is only dereferenced by the signal handler and freed by `drop`; shared
// references to the guard give no access to it.
unsafe impl Sync for SigbusGuard {}

impl SigbusGuard {
    fn new(ranges: Vec<(usize, usize, Vec<u8>)>) -> SigbusGuard {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        });
        let _lock = GUARD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        // The temporary outputs of this run exist by now: the writers are made before the fold.
        let cleanup = registry()
            .temporaries
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        let state = Box::into_raw(Box::new(GuardState { ranges, cleanup }));
        STATE.store(state, Ordering::Release);
        SigbusGuard { state, _lock }
    }
}

impl Drop for SigbusGuard {
    fn drop(&mut self) {
        STATE.store(std::ptr::null_mut(), Ordering::Release);
        // SAFETY: allocated by `new`; the handler no longer sees it. A handler that loaded the
        // pointer before the store above exits the process without returning.
        drop(unsafe { Box::from_raw(self.state) });
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: async-signal-safe calls only (write, unlink, _exit, signal); the state is alive
    // while it is published.
    unsafe {
        let state = STATE.load(Ordering::Acquire);
        let addr = (*info).si_addr() as usize;
        if let Some(state) = state.as_ref() {
            if let Some((_, _, msg)) = state.ranges.iter().find(|r| r.0 <= addr && addr < r.1) {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                for p in &state.cleanup {
                    libc::unlink(p.as_ptr());
                }
                libc::_exit(1);
            }
        }
        // Not one of ours: restore the default action; returning re-runs the faulting access.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_leave_the_registry_when_dropped_or_persisted() {
        let rt = Runtime::new();
        let dir = tempfile::tempdir().unwrap();
        let listed = |p: &Path| registry().temporaries.iter().any(|q| q == p);
        let a = rt.temporary(dir.path(), ".t-", ".tmp").unwrap();
        let pa = a.path().to_path_buf();
        assert!(listed(&pa) && pa.exists());
        drop(a);
        assert!(!listed(&pa) && !pa.exists());
        let b = rt.temporary(dir.path(), ".t-", ".tmp").unwrap();
        let pb = b.path().to_path_buf();
        let target = dir.path().join("out");
        rt.persist_all(vec![(b, target.clone(), false)]).unwrap();
        assert!(!listed(&pb) && target.exists() && !pb.exists());
    }

    #[test]
    fn a_failed_rename_undoes_the_others() {
        let rt = Runtime::new();
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"keep").unwrap();
        let a = rt.temporary(dir.path(), ".t-", ".tmp").unwrap();
        let b = rt.temporary(dir.path(), ".t-", ".tmp").unwrap();
        let (i, _) = rt
            .persist_all(vec![(a, first.clone(), false), (b, taken.clone(), false)])
            .unwrap_err();
        assert_eq!(i, 1);
        assert!(!first.exists());
        assert_eq!(std::fs::read(&taken).unwrap(), b"keep");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
