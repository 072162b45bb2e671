//! Records the git commit the binary is built from, for `ema-tool --version`, and whether the
//! compiler has the AVX-512 intrinsics (stable from Rust 1.89): `cfg(ema_tool_avx512)`, without
//! which the fold builds without its AVX-512 copies.
//!
//! Only when built from a clone (a `.git` beside `Cargo.toml`, a directory or a worktree's
//! file) with `git` on `PATH`; a crates.io package, an sdist or a machine without git builds
//! the same, without a commit. Cargo reruns this when `HEAD` or the branch it names moves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(ema_tool_avx512)");
    match rustc_version() {
        Some(version) if version >= (1, 89) => println!("cargo:rustc-cfg=ema_tool_avx512"),
        Some(_) => {}
        None => println!("cargo:warning=could not read `rustc --version`: no AVX-512 fold"),
    }
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    if !root.join(".git").exists() {
        return;
    }
    let Some(commit) = git(&root, &["rev-parse", "--short", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=EMA_TOOL_GIT_COMMIT={commit}");
    // HEAD names the branch; the branch (a loose ref, or a line of packed-refs) names the
    // commit. Only paths that exist are watched: cargo reruns a script whose watched path is
    // missing on every build, and so would rebuild the crate every time. A branch that is only
    // packed gets a loose ref at its next commit: its directory is watched for that.
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git_path(&root, name).filter(|p| p.is_file()) {
            watch(&path);
        }
    }
    if let Some(branch) = git(&root, &["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git_path(&root, &branch) {
            if path.is_file() {
                watch(&path);
            } else if let Some(dir) = path.parent().filter(|d| d.is_dir()) {
                watch(dir);
            }
        }
    }
}

/// The major and minor version of the Rust compiler cargo builds with (`rustc 1.95.0 (…)`:
/// (1, 95)).
fn rustc_version() -> Option<(u32, u32)> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let version = String::from_utf8(out.stdout).ok()?;
    let mut parts = version.strip_prefix("rustc ")?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// Where git keeps `name` (`HEAD`, `refs/heads/main`): in a worktree, HEAD is its own and the
/// refs are the main clone's.
fn git_path(root: &Path, name: &str) -> Option<PathBuf> {
    git(root, &["rev-parse", "--git-path", name]).map(|p| root.join(p))
}

/// The trimmed stdout of `git args` in `dir`, or `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}
