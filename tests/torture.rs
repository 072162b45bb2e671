//! The torture loop: many runs of `ema-tool ema` with a random fault each (SIGKILL, SIGTERM,
//! SIGINT or SIGHUP at a random moment, a random file-size limit, a full disk, an input
//! truncated or rewritten while it is read, or no fault), checking after every run that
//! nothing was lost: the target is the previous complete file or the new complete one, a
//! success left the new one, a failure left the previous one with a one-line message, and no
//! temporary file is left except after SIGKILL.
//!
//! Ignored by `cargo test`; run it with `bench/torture.sh [RUNS]` (or
//! `TORTURE_RUNS=N cargo test --test torture -- --ignored --nocapture`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{big_inputs, code, stderr, temporaries, Rng, Tmpfs};

const FAULTS: [&str; 10] = [
    "none",
    "sigkill",
    "sigkill-writing",
    "sigterm",
    "sigint",
    "sighup",
    "file-size-limit",
    "full-disk",
    "input-truncated",
    "input-rewritten",
];

#[test]
#[ignore = "long: run with bench/torture.sh"]
fn torture() {
    let runs: usize = std::env::var("TORTURE_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut rng = Rng::new("torture");
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine");
    let inputs_dir = dir.path().join("in");
    let local_out = dir.path().join("out");
    for d in [&pristine, &inputs_dir, &local_out] {
        std::fs::create_dir_all(d).unwrap();
    }
    let originals = big_inputs(&pristine, 3, 8, 256 * 1024);
    let inputs: Vec<PathBuf> = originals
        .iter()
        .map(|p| inputs_dir.join(p.file_name().unwrap()))
        .collect();
    let restore_inputs = || {
        for (o, i) in originals.iter().zip(&inputs) {
            std::fs::copy(o, i).unwrap();
        }
    };
    restore_inputs();
    let command = |target: &Path, momentum: &str| {
        let mut c = Command::new(common::bin());
        c.arg("ema")
            .args(&inputs)
            .args(["--momentum", momentum, "--force", "-q", "-o"])
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    // The previous and the new output, and how long a run takes.
    let target = local_out.join("ema.safetensors");
    assert!(command(&target, "0.6").status().unwrap().success());
    let prev = std::fs::read(&target).unwrap();
    let t = Instant::now();
    assert!(command(&target, "0.3").status().unwrap().success());
    let secs = t.elapsed().as_secs_f64();
    let new = std::fs::read(&target).unwrap();

    // A tmpfs holding the previous file with room for less than half the new one.
    let size = prev.len() + new.len() / 2;
    let tmpfs = Tmpfs::mount(&size.to_string());
    let full = tmpfs
        .as_ref()
        .map(|t| t.path().to_path_buf())
        .unwrap_or_default();

    let mut tally: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let (mut intact, mut left_by_sigkill) = (0, 0);
    for run in 0..runs {
        let mut fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        if fault == "full-disk" && tmpfs.is_none() {
            fault = "none";
        }
        let out = if fault == "full-disk" {
            &full
        } else {
            &local_out
        };
        let target = out.join("ema.safetensors");
        let staging = out.join("staging");
        // (The small tmpfs has no room for two copies: replace in place there.)
        let _ = std::fs::remove_file(&staging);
        if fault == "full-disk" {
            let _ = std::fs::remove_file(&target);
        }
        std::fs::write(&staging, &prev).unwrap();
        std::fs::rename(&staging, &target).unwrap();

        let mut cmd = command(&target, "0.3");
        if fault == "file-size-limit" {
            common::with_file_size_limit(&mut cmd, rng.below(new.len() as u64));
        }
        let delay = Duration::from_micros(rng.below((secs * 1.2e6) as u64 + 1));
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        // Input faults strike once the inputs are open (the output's temporary file exists):
        // an input changed before it is opened is just another input.
        if fault == "sigkill-writing" || fault.starts_with("input-") {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !temporaries(out).iter().any(|n| n.ends_with(".tmp"))
                && child.try_wait().unwrap().is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        std::thread::sleep(delay);
        let sig = match fault {
            "sigkill" | "sigkill-writing" => libc::SIGKILL,
            "sigterm" => libc::SIGTERM,
            "sigint" => libc::SIGINT,
            "sighup" => libc::SIGHUP,
            _ => 0,
        };
        if sig != 0 {
            // SAFETY: kill(2) on our unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
        let victim = &inputs[rng.below(inputs.len() as u64) as usize];
        if fault == "input-truncated" {
            let len = std::fs::metadata(victim).unwrap().len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(victim)
                .unwrap();
            f.set_len(rng.below(len)).unwrap();
        } else if fault == "input-rewritten" {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(victim)
                .unwrap();
            let len = f.metadata().unwrap().len();
            let off = 4096 + rng.below(len - 4096);
            f.write_all_at(&[0x5a], off).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let status = code(&o);
        let err = stderr(&o);
        let context = format!("run {run} ({fault}), exit {status}, stderr {err:?}");

        let state = match std::fs::read(&target) {
            Ok(b) if b == prev => "prev",
            Ok(b) if b == new => "new",
            Ok(b) => panic!(
                "{context}: the target holds {} bytes of neither output",
                b.len()
            ),
            Err(e) => panic!("{context}: the target is gone: {e}"),
        };
        let tmps = temporaries(out);
        let one_line_error = err.lines().count() >= 1
            && err.lines().all(|l| l.starts_with("ema-tool: "))
            && !err.contains("panicked");
        let ok = match status {
            0 => state == "new" && tmps.is_empty(),
            137 => true,
            // After the rename, the handler says "after writing" and the new file is there.
            129 | 130 | 143 => {
                let after = err.contains("after writing");
                state == if after { "new" } else { "prev" } && tmps.is_empty() && one_line_error
            }
            1 => state == "prev" && tmps.is_empty() && one_line_error,
            _ => false,
        };
        assert!(ok, "{context}: target {state}, temporaries {tmps:?}");
        intact += 1;
        if status == 137 {
            left_by_sigkill += tmps.len();
        }
        for t in tmps {
            std::fs::remove_file(out.join(t)).unwrap();
        }
        let outcome = match status {
            0 => "completed".to_string(),
            137 => format!("killed, target {state}"),
            129 | 130 | 143 if state == "new" => format!("exit {status} after the rename"),
            s => format!("exit {s}"),
        };
        *tally.entry(fault).or_default().entry(outcome).or_default() += 1;
        if fault.starts_with("input-") {
            restore_inputs();
        }
    }
    drop(tmpfs);
    eprintln!("torture: {intact} of {runs} runs lost nothing ({left_by_sigkill} temporary files left by SIGKILL, removed)");
    for (fault, outcomes) in &tally {
        let o: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        eprintln!("  {fault:<16} {}", o.join(", "));
    }
    assert_eq!(intact, runs);
}
