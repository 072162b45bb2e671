//! The subcommands, one module each, and what they share: progress, summaries, provenance.

pub mod average;
pub mod ema;
pub mod inspect;
pub mod swa;
pub mod swap;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::fold::Progress;

/// ema-tool's version, recorded in outputs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A progress counter for `total` bytes; with a bar on stderr only when it is a terminal and
/// not `quiet`.
pub fn progress(total: u64, quiet: bool) -> Progress {
    if quiet || !std::io::stderr().is_terminal() {
        return Progress::new(None);
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    Progress::new(Some(bar))
}

/// Sets the size of rayon's global pool (once per process).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            return Err(Error::usage("--threads must be at least 1"));
        }
        // Fails only if the pool was already built, which is fine for repeated calls in tests.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    Ok(())
}

/// A warning on stderr, unless `quiet`.
pub fn warn(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("ema-tool: warning: {msg}");
    }
}

/// The output metadata: `base` (the last input's) plus `ema_tool`, a JSON string describing
/// how the file was made.
pub fn provenance(base: &BTreeMap<String, String>, record: Value) -> BTreeMap<String, String> {
    let mut m = base.clone();
    let mut rec = json!({ "version": VERSION });
    if let (Some(obj), Value::Object(extra)) = (rec.as_object_mut(), record) {
        obj.extend(extra);
    }
    m.insert("ema_tool".into(), rec.to_string());
    m
}

/// `*` matches any run of characters (dots included), `?` one character; everything else
/// matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` is selected by `--include`/`--exclude`.
pub fn selected(name: &str, include: &[String], exclude: &[String]) -> bool {
    (include.is_empty() || include.iter().any(|g| glob_match(g, name)))
        && !exclude.iter().any(|g| glob_match(g, name))
}

/// Human-readable byte count (`1.2 GB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The default output path: `<input stem>.<suffix>.safetensors` beside the input.
pub fn default_output(input: &Path, suffix: &str) -> std::path::PathBuf {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let stem = crate::checkpoint::strip_known_extensions(&name);
    input.with_file_name(format!("{stem}.{suffix}.safetensors"))
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(|e| Error::io("<stdout>", e.into()))?;
    writeln!(out).map_err(|e| Error::io("<stdout>", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.running_mean", "backbone.bn1.running_mean"));
        assert!(!glob_match("*.running_mean", "backbone.bn1.running_var"));
        assert!(glob_match("conv*", "conv1.weight"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
    }

    #[test]
    fn selection() {
        let inc = vec!["state_dict.*".to_string()];
        let exc = vec!["*.num_batches_tracked".to_string()];
        assert!(selected("state_dict.w", &inc, &exc));
        assert!(!selected("ema_state_dict.w", &inc, &exc));
        assert!(!selected("state_dict.bn.num_batches_tracked", &inc, &exc));
        assert!(selected("anything", &[], &[]));
    }

    #[test]
    fn default_outputs() {
        assert_eq!(
            default_output(Path::new("work/epoch_12.pth"), "deploy"),
            Path::new("work/epoch_12.deploy.safetensors")
        );
    }
}
