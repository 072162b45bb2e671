//! The subcommands, one module each, and what they share: progress, summaries, provenance.

pub mod ema;
pub mod fold;
pub mod inspect;
pub mod posthoc;
pub mod swa;
pub mod swap;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::cli::{OutFormat, OutputArgs};
use crate::error::{Error, Result};
use crate::fold::Progress;
use crate::output::dcp::Extra;
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
    if out.format == Some(OutFormat::Dcp) {
        let specs = plan.specs();
        // The nesting, and the non-tensor entries, of the last DCP input.
        let empty = crate::checkpoint::dcp::Parts::default();
        let last = plan.inputs.iter().rev().find(|c| c.dcp().is_some());
        let parts = last.and_then(|c| c.dcp()).unwrap_or(&empty);
        // A non-tensor entry goes with its subtree: kept unless every tensor of its top-level
        // subtree was left out (`--include 'model.*'` leaves the optimizer's out).
        let top = |n: &str| n.split('.').next().unwrap_or(n).to_string();
        let written: std::collections::HashSet<String> =
            specs.iter().map(|t| top(&t.name)).collect();
        let mut extra = Vec::new();
        if let Some(c) = last {
            let with_tensors: std::collections::HashSet<String> =
                c.tensors().iter().map(|t| top(&t.name)).collect();
            for (fqn, file, off, len) in &parts.bytes {
                let t = top(fqn);
                if with_tensors.contains(&t) && !written.contains(&t) {
                    continue;
                }
                extra.push(Extra::Copied(
                    fqn.clone(),
                    c.files()[*file].file(),
                    *off,
                    *len,
                ));
            }
        }
        // The output's step, for inputs that had none to copy (or were not DCP).
        let has_step = extra
            .iter()
            .any(|x| matches!(x, Extra::Copied(f, ..) if f == "step" || f == "train_state.step"));
        if !has_step {
            if let Some(n) = metadata
                .get("step")
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                extra.push(Extra::Made("step".into(), crate::output::dcp::int_item(n)));
            }
        }
        let w = crate::output::dcp::DcpWriter::create(
            target,
            out.force,
            &specs,
            &extra,
            &parts.planner,
            rt,
        )?;
        return Ok((Writer::Dcp(w), target.clone()));
    }
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

/// The options that vary across the outputs of a sweep: the names whose text differs between
/// two outputs (`values[o]`: the `(name, text)` of output `o`), in their order.
pub fn varying(values: &[Vec<(String, String)>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        for (n, t) in v {
            let differs = values
                .iter()
                .any(|w| w.iter().any(|(m, u)| m == n && u != t));
            if differs && !out.contains(n) {
                out.push(n.clone());
            }
        }
    }
    out
}

/// The targets of the outputs of a sweep: `template` with `{name}` replaced by each output's
/// value of option `name` as typed (`values[o]`: the `(name, text)` of output `o`).
///
/// Usage errors: a placeholder that names no option of the strategy, a sweep whose template
/// lacks the name of an option that varies, and two outputs with the same target.
pub fn sweep_targets(template: &Path, values: &[Vec<(String, String)>]) -> Result<Vec<PathBuf>> {
    let text = template.to_string_lossy();
    let names: Vec<&str> = values
        .first()
        .map(|v| v.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    let braced = |ns: &[&str]| {
        ns.iter()
            .map(|n| format!("{{{n}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rest = &text[..];
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        let name = &rest[i + 1..i + j];
        if !names.contains(&name) {
            return Err(Error::usage(format!(
                "-o {text}: `{{{name}}}` names no option of this strategy (it has {})",
                braced(&names)
            )));
        }
        rest = &rest[i + j + 1..];
    }
    let varying = varying(values);
    if let Some(n) = varying.iter().find(|n| !text.contains(&format!("{{{n}}}"))) {
        let all: Vec<&str> = varying.iter().map(String::as_str).collect();
        return Err(Error::usage(format!(
            "-o {text}: a sweep of {} outputs needs a name for each: put {{{n}}} in it \
             (the options that vary: {})",
            values.len(),
            braced(&all)
        )));
    }
    let targets: Vec<PathBuf> = values
        .iter()
        .map(|v| {
            if !text.contains('{') {
                return template.to_path_buf();
            }
            let mut t = text.to_string();
            for (n, val) in v {
                t = t.replace(&format!("{{{n}}}"), val);
            }
            PathBuf::from(t)
        })
        .collect();
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].contains(t) {
            return Err(Error::usage(format!(
                "{}: two outputs of the sweep would be written there (a value given twice?)",
                t.display()
            )));
        }
    }
    Ok(targets)
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
    fn sweep_targets_take_the_values_as_typed() {
        let v = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let two = [
            v(&[("decay", "0.999"), ("gamma", "3")]),
            v(&[("decay", "0.9990"), ("gamma", "3")]),
        ];
        assert_eq!(varying(&two), vec!["decay".to_string()]);
        let t = sweep_targets(Path::new("out/ema-{decay}-{gamma}.safetensors"), &two).unwrap();
        assert_eq!(t[1], Path::new("out/ema-0.9990-3.safetensors"));
        // A sweep needs the name of what varies; a placeholder must name an option.
        assert!(sweep_targets(Path::new("ema-{gamma}.safetensors"), &two).is_err());
        assert!(sweep_targets(Path::new("{decay}-{tau}.safetensors"), &two).is_err());
        let same = [v(&[("decay", "1")]), v(&[("decay", "1")])];
        assert!(sweep_targets(Path::new("x"), &same).is_err());
        // Without a sweep the template is the name, its placeholders filled in.
        let one = [v(&[("decay", "0.9")])];
        let t = sweep_targets(Path::new("ema.safetensors"), &one).unwrap();
        assert_eq!(t, vec![PathBuf::from("ema.safetensors")]);
        let t = sweep_targets(Path::new("ema-{decay}.safetensors"), &one).unwrap();
        assert_eq!(t, vec![PathBuf::from("ema-0.9.safetensors")]);
    }

    #[test]
    fn default_outputs() {
        assert_eq!(
            default_output(Path::new("work/epoch_12.pth"), "deploy"),
            Path::new("work/epoch_12.deploy.safetensors")
        );
    }
}
