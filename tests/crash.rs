//! Crash safety of the output: SIGKILL at any point of a write leaves the target absent or the
//! previous complete file; SIGINT/SIGTERM also remove the temporary file; a file-size limit
//! (EFBIG) or a full disk (ENOSPC) gives exit status 1, a message, and nothing left behind;
//! an unwritable output directory is reported before any input is read; an input that shrinks
//! or changes while in use is an error, not a crash.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_one_line_error, big_inputs, code, entries, missing_prerequisite, stderr, temporaries,
    with_file_size_limit, Rng, Tmpfs,
};

/// Three inputs of 8 × 2 MiB f32 tensors, the output of a fold of them (`new`), and a
/// different earlier output (`prev`) that the target holds before each faulty run.
struct Setup {
    _dir: tempfile::TempDir,
    inputs: Vec<PathBuf>,
    out: PathBuf,
    target: PathBuf,
    prev: Vec<u8>,
    new: Vec<u8>,
    /// Seconds an undisturbed run takes.
    secs: f64,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let inp = dir.path().join("in");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&inp).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let inputs = big_inputs(&inp, 3, 8, 512 * 1024);
        let target = out.join("ema.safetensors");
        let mut s = Setup {
            _dir: dir,
            inputs,
            out,
            target,
            prev: Vec::new(),
            new: Vec::new(),
            secs: 0.0,
        };
        let o = s.command("0.6").output().unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        s.prev = std::fs::read(&s.target).unwrap();
        let t = Instant::now();
        let o = s.command("0.3").output().unwrap();
        s.secs = t.elapsed().as_secs_f64();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        s.new = std::fs::read(&s.target).unwrap();
        assert_ne!(s.prev, s.new);
        s.reset();
        s
    }

    /// `ema-tool ema INPUTS --momentum M --force -q -o TARGET`.
    fn command(&self, momentum: &str) -> Command {
        let mut c = Command::new(common::bin());
        c.arg("ema")
            .args(&self.inputs)
            .args(["--momentum", momentum, "--force", "-q", "-o"])
            .arg(&self.target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Puts the previous output back at the target (atomically) and removes temporaries.
    fn reset(&self) {
        for t in temporaries(&self.out) {
            std::fs::remove_file(self.out.join(t)).unwrap();
        }
        let staging = self.out.join("staging");
        std::fs::write(&staging, &self.prev).unwrap();
        std::fs::rename(&staging, &self.target).unwrap();
    }

    /// What the target holds: `"prev"`, `"new"`, or a panic.
    fn target_state(&self, context: &str) -> &'static str {
        match std::fs::read(&self.target) {
            Ok(b) if b == self.prev => "prev",
            Ok(b) if b == self.new => "new",
            Ok(b) => panic!("{context}: the target holds {} bytes that are neither the previous nor the new output", b.len()),
            Err(e) => panic!("{context}: the target is gone: {e}"),
        }
    }

    /// Waits until the output's temporary file exists (the write has begun), or the child ends.
    fn wait_for_temporary(&self, child: &mut Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if temporaries(&self.out).iter().any(|n| n.ends_with(".tmp")) {
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        panic!("no temporary file appeared in 60 s");
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[test]
fn sigkill_leaves_the_previous_file_or_the_new_one() {
    let s = Setup::new();
    let mut rng = Rng::new("sigkill");
    let (mut kept, mut replaced, mut left_tmp) = (0, 0, 0);
    for i in 0..8 {
        let mut child = s.command("0.3").spawn().unwrap();
        // Half the runs are killed at a random time from the start, half at a random time
        // after the write began.
        if i % 2 == 1 {
            s.wait_for_temporary(&mut child);
        }
        let max_ms = (s.secs * 1300.0) as u64 + 1;
        std::thread::sleep(Duration::from_millis(rng.below(max_ms)));
        child.kill().unwrap();
        child.wait().unwrap();
        match s.target_state(&format!("run {i}")) {
            "prev" => kept += 1,
            _ => replaced += 1,
        }
        left_tmp += temporaries(&s.out).len();
        s.reset();
    }
    eprintln!(
        "sigkill: {kept} runs left the previous file, {replaced} the new one; \
         {left_tmp} temporary files left behind"
    );
}

#[test]
fn sigterm_and_sigint_remove_the_temporary_file() {
    let s = Setup::new();
    let mut rng = Rng::new("sigterm");
    let mut interrupted = 0;
    for (i, (sig, name)) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ]
    .into_iter()
    .cycle()
    .take(6)
    .enumerate()
    {
        let mut child = s.command("0.3").spawn().unwrap();
        let writing = s.wait_for_temporary(&mut child);
        std::thread::sleep(Duration::from_millis(
            rng.below((s.secs * 300.0) as u64 + 1),
        ));
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let context = format!("run {i} ({name})");
        let state = s.target_state(&context);
        assert!(
            temporaries(&s.out).is_empty(),
            "{context}: left {:?}",
            temporaries(&s.out)
        );
        match code(&o) {
            0 => assert_eq!(state, "new", "{context}"),
            c => {
                assert!(writing, "{context}");
                assert_eq!(c, 128 + sig, "{context}: {}", stderr(&o));
                // A signal after the rename finds the new file complete, and says so.
                let after = stderr(&o).contains("after writing");
                assert_eq!(state, if after { "new" } else { "prev" }, "{context}");
                assert_one_line_error(&stderr(&o), &format!("interrupted by {name}"), &context);
                interrupted += 1;
            }
        }
        s.reset();
    }
    assert!(interrupted > 0, "no run was interrupted while writing");
}

#[test]
fn a_file_size_limit_gives_efbig_and_leaves_nothing() {
    let s = Setup::new();
    let total = s.new.len() as u64;
    for limit in [0, 100, 1 << 20, total / 2, total - 1] {
        for replace in [false, true] {
            let context = format!("limit {limit}, replacing: {replace}");
            if !replace {
                std::fs::remove_file(&s.target).unwrap();
            }
            let mut cmd = s.command("0.3");
            with_file_size_limit(&mut cmd, limit);
            let o = cmd.output().unwrap();
            assert_eq!(code(&o), 1, "{context}: {}", stderr(&o));
            assert_one_line_error(&stderr(&o), "File too large", &context);
            if replace {
                assert_eq!(s.target_state(&context), "prev");
                assert_eq!(entries(&s.out), vec!["ema.safetensors"], "{context}");
            } else {
                assert!(
                    entries(&s.out).is_empty(),
                    "{context}: {:?}",
                    entries(&s.out)
                );
            }
            s.reset();
        }
    }
}

#[test]
fn a_full_disk_gives_enospc_and_leaves_nothing() {
    let s = Setup::new();
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let target = fs.path().join("ema.safetensors");
    // The previous file fits; the new one (16 MiB) does not.
    std::fs::write(fs.path().join("prev.safetensors"), &s.prev[..1 << 20]).unwrap();
    for force in [false, true] {
        if force {
            std::fs::rename(fs.path().join("prev.safetensors"), &target).unwrap();
        }
        let mut cmd = Command::new(common::bin());
        cmd.arg("ema")
            .args(&s.inputs)
            .args(["-q", "-o"])
            .arg(&target);
        if force {
            cmd.arg("--force");
        }
        let o = cmd.output().unwrap();
        let context = format!("full disk, --force: {force}");
        assert_eq!(code(&o), 1, "{context}: {}", stderr(&o));
        assert_one_line_error(&stderr(&o), "No space left on device", &context);
        let want: Vec<String> = if force {
            vec!["ema.safetensors".into()]
        } else {
            vec!["prev.safetensors".into()]
        };
        assert_eq!(entries(fs.path()), want, "{context}");
        if force {
            assert_eq!(std::fs::read(&target).unwrap(), &s.prev[..1 << 20]);
        }
    }
}

/// Runs as user `nobody` when we are root (root writes anywhere whatever the mode bits).
fn as_nobody(cmd: &mut Command) {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
}

#[test]
fn an_unwritable_output_directory_is_reported_before_any_input_is_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A broken input: if it were read first, its error would be the one reported.
    let input = dir.path().join("broken.safetensors");
    std::fs::write(&input, b"garbage").unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    for (target, fragment) in [
        (ro.join("out.safetensors"), "cannot write in"),
        (
            dir.path().join("missing/out.safetensors"),
            "No such file or directory",
        ),
        (
            dir.path().join("broken.safetensors/out.safetensors"),
            "is not a directory",
        ),
    ] {
        for sub in ["ema", "swap"] {
            let mut cmd = Command::new(common::bin());
            cmd.arg(sub).arg(&input).arg("-o").arg(&target);
            as_nobody(&mut cmd);
            let o = match cmd.output() {
                Ok(o) => o,
                Err(e) => {
                    // The checkout may sit where user nobody cannot reach the binary.
                    missing_prerequisite(&format!("running the binary as user nobody ({e})"));
                    return;
                }
            };
            let context = format!("{sub} -o {}", target.display());
            assert_eq!(code(&o), 1, "{context}: {}", stderr(&o));
            assert_one_line_error(&stderr(&o), fragment, &context);
            assert!(
                !stderr(&o).contains("broken.safetensors: "),
                "{context}: {}",
                stderr(&o)
            );
        }
    }
    assert!(entries(&ro).is_empty());
}

#[test]
fn an_input_that_shrinks_or_changes_in_use_is_an_error() {
    use ema_tool::checkpoint::{Checkpoint, Open};
    use ema_tool::codec::DType;
    use ema_tool::fold::{execute, Device, Options, Progress, Sink};
    use ema_tool::plan::{Make, Order, Output, Plan, Src, Tensor};
    use ema_tool::runtime::Runtime;

    struct Null;
    impl Sink for Null {
        fn write(&self, _: usize, _: u64, _: &[u8]) -> ema_tool::Result<()> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = big_inputs(dir.path(), 1, 2, 1024).remove(0);
    let plan_of = |c: Checkpoint| Plan {
        tensors: vec![Tensor {
            name: c.tensors()[1].name.clone(),
            dtype: DType::F32,
            shape: c.tensors()[1].shape.clone(),
            make: Make::Copy {
                source: Src {
                    input: 0,
                    tensor: 1,
                },
            },
        }],
        inputs: vec![c],
        order: Order::Given,
        outputs: vec![Output {
            target: "unused".into(),
            params: Vec::new(),
            weights: Vec::new(),
        }],
    };
    let fold = |p: &Plan| {
        execute(
            p,
            &[&Null],
            Device::Cpu,
            Options::default(),
            &Progress::new(None),
            &Runtime::new(),
        )
    };

    // Shrinks after the header was read: refused before folding.
    let p = plan_of(Checkpoint::open(&path, Open::Readable).unwrap());
    let len = p.inputs[0].files()[0].len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = fold(&p).unwrap_err().to_string();
    assert!(e.contains("file changed size while in use"), "{e}");
    // Read anyway (as a fold that began before the truncation would): an error, no SIGBUS.
    let c = &p.inputs[0];
    let t = &c.tensors()[1];
    let mut buf = vec![0u8; t.len as usize];
    let e = c.read_at(t, 0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("file is shorter than its header says"), "{e}");

    // Same size, rewritten: refused too.
    f.set_len(len).unwrap();
    let p = plan_of(Checkpoint::open(&path, Open::Readable).unwrap());
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let e = fold(&p).unwrap_err().to_string();
    assert!(e.contains("modified while in use"), "{e}");
}
