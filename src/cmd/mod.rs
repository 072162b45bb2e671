//! The subcommands, one module each, and what they share: progress, summaries, provenance.

pub mod ema;
pub mod fold;
pub mod inspect;
pub mod swa;
pub mod swap;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::cli::OutputArgs;
use crate::error::{Error, Result};
use crate::fold::Progress;
use crate::output::Writer;
use crate::plan::Plan;
use crate::runtime::Runtime;

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

/// The default output path: `<input stem>.<suffix>.safetensors` beside the input.
pub fn default_output(input: &Path, suffix: &str) -> std::path::PathBuf {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let stem = crate::codec::names::strip_known_extensions(&name);
    input.with_file_name(format!("{stem}.{suffix}.safetensors"))
}

/// Creates the writer of output `o` of `plan`, with `out`'s options and `metadata`; returns it
/// with the path to name in summaries (the index of a sharded output).
pub fn create_writer(
    plan: &Plan,
    o: usize,
    out: &OutputArgs,
    metadata: &BTreeMap<String, String>,
    rt: &Runtime,
) -> Result<(Writer, PathBuf)> {
    let target = &plan.outputs[o].target;
    let writer = Writer::create(
        target,
        out.force,
        &plan.specs(),
        metadata,
        out.max_shard_size,
        rt,
    )?;
    let shown = writer.display_path(target);
    Ok((writer, shown))
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
    fn default_outputs() {
        assert_eq!(
            default_output(Path::new("work/epoch_12.pth"), "deploy"),
            Path::new("work/epoch_12.deploy.safetensors")
        );
    }
}
