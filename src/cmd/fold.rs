//! What `ema`, `swa` and `posthoc` share: check the targets, plan the fold into one or more
//! outputs, run it with one read of the inputs, commit every output, report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{create_writer, print_json, progress, provenance, set_threads, sweep_targets, varying};
use crate::checkpoint::Checkpoint;
use crate::cli::{FoldArgs, OutFormat, OutputArgs};
use crate::error::Error;
use crate::error::Result;
use crate::fold::{self, Device};
use crate::output::atomic::Finished;
use crate::output::{check_output_kind, check_target, commit_all, hf};
use crate::plan::choose::{choose, keep, Chosen};
use crate::plan::fold::{arrange, build, open_inputs, Options};
use crate::plan::{Output, Plan};
use crate::runtime::Runtime;
use crate::schedule::options::Swept;
use crate::text::human_bytes;

/// Where a fold's outputs go.
pub struct Targets {
    /// One file (or sharded output) per output.
    pub files: Vec<PathBuf>,
    /// For each output written into a directory (`-o DIR/`), that directory.
    pub dirs: Vec<Option<PathBuf>>,
    /// The directories created for the outputs (removed again, when empty, after a failure).
    pub created: Vec<PathBuf>,
    /// The outputs are DCP directories (`--format dcp`): nothing is copied beside them.
    pub dcp: bool,
    /// For each DCP output, the temporary directory it is written in and its target, renamed
    /// into place after the files are complete ([`publish`]).
    pub published: Vec<(PathBuf, PathBuf)>,
}

/// The targets of `outputs` (`(name, text)` of their options' values) from `-o`, or by default
/// `<stem>.safetensors` (`<stem>-{a}-{b}.safetensors` for a sweep over `a` and `b`), checked
/// before any work unless `dry_run`: none is an input, none exists unless `--force`, each can
/// be written. `-o DIR/` (or an existing directory) writes into DIR under the inputs' weights
/// file name (`docs/formats.md#hf`); DIR is created when missing.
pub fn targets(
    out: &OutputArgs,
    stem: &str,
    values: &[Vec<(String, String)>],
    inputs: &[PathBuf],
    dry_run: bool,
    rt: &Runtime,
) -> Result<Targets> {
    let template = out.output.clone().unwrap_or_else(|| {
        let names: String = varying(values)
            .iter()
            .map(|n| format!("-{{{n}}}"))
            .collect();
        PathBuf::from(format!("{stem}{names}.safetensors"))
    });
    let mut t = Targets {
        files: Vec::new(),
        dirs: Vec::new(),
        created: Vec::new(),
        dcp: out.format == Some(OutFormat::Dcp),
        published: Vec::new(),
    };
    let dcp = t.dcp;
    if dcp && (out.output.is_none() || out.max_shard_size.is_some()) {
        return Err(Error::usage(
            "--format dcp writes a directory: give it with -o DIR (and no --max-shard-size)",
        ));
    }
    for target in sweep_targets(&template, values)? {
        if dcp {
            hf::check_not_input(&target, inputs)?;
            if target.exists() && !target.is_dir() {
                return Err(Error::Output {
                    path: target,
                    what: "is not a directory (--format dcp writes one)".into(),
                });
            }
            if target.exists() && !out.force {
                return Err(Error::Output {
                    path: target,
                    what: "already exists (use --force to replace its checkpoint)".into(),
                });
            }
            if crate::codec::names::is_torch_name(&target)
                || target.extension().is_some_and(|e| e == "safetensors")
            {
                return Err(Error::usage(format!(
                    "{}: --format dcp writes a directory, not a file of that name",
                    target.display()
                )));
            }
            if target.exists() {
                // Replaced whole: only a DCP checkpoint's own files, or nothing, may be there,
                // and no input.
                let own = |e: &std::fs::DirEntry| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    e.file_type().is_ok_and(|t| t.is_file())
                        && (n == ".metadata" || n.ends_with(".distcp"))
                };
                let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(&target)
                    .map_err(|e| Error::io(&target, e))?
                    .filter_map(|e| e.ok())
                    .collect();
                let real = target.canonicalize().map_err(|e| Error::io(&target, e))?;
                let holds_input = inputs
                    .iter()
                    .any(|i| i.canonicalize().is_ok_and(|r| r.starts_with(&real)));
                if !entries.iter().all(own) || holds_input {
                    return Err(Error::Output {
                        path: target,
                        what: "holds files other than a DCP checkpoint's (or an input): not \
                               replaced, even with --force"
                            .into(),
                    });
                }
            }
            if dry_run {
                t.files.push(target);
                t.dirs.push(None);
                continue;
            }
            // Written in a temporary directory beside it, renamed into place when complete.
            let parent = crate::output::atomic::parent_dir(&target);
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = rt
                .temporary_dir(&parent, &format!(".ema-tool-{name}-"), ".tmpdir")
                .map_err(|e| Error::io(&parent, e))?;
            t.files.push(tmp.clone());
            t.dirs.push(None);
            t.published.push((tmp, target));
            continue;
        }
        if hf::is_dir_target(&target) {
            hf::check_not_input(&target, inputs)?;
            t.files.push(target.join(hf::weights_name(inputs)));
            t.dirs.push(Some(target));
        } else {
            t.files.push(target);
            t.dirs.push(None);
        }
    }
    if !dry_run {
        for d in t.dirs.iter().flatten() {
            // Every directory made, from the outermost, so that a failure removes them all.
            let mut missing: Vec<PathBuf> = d
                .ancestors()
                .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
                .map(Path::to_path_buf)
                .collect();
            missing.reverse();
            if let Err(e) = std::fs::create_dir_all(d) {
                t.created.extend(missing);
                t.remove_created(rt);
                return Err(Error::io(d, e));
            }
            t.created.extend(missing);
        }
        // The files of input directories are inputs too (a model directory's weights and
        // shards, its config).
        let mut protected: Vec<PathBuf> = inputs.to_vec();
        for i in inputs.iter().filter(|i| i.is_dir()) {
            if let Ok(entries) = std::fs::read_dir(i) {
                protected.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
        let inputs: Vec<&Path> = protected.iter().map(PathBuf::as_path).collect();
        let checked = t.files.iter().try_for_each(|f| {
            if dcp {
                for name in [crate::output::dcp::DATA_FILE, ".metadata"] {
                    check_target(&f.join(name), &inputs, out.force, rt)?;
                }
                return Ok(());
            }
            check_target(f, &inputs, out.force, rt)?;
            check_output_kind(f, out.max_shard_size)
        });
        if let Err(e) = checked {
            t.remove_created(rt);
            return Err(e);
        }
    }
    Ok(t)
}

impl Targets {
    /// Removes the directories made for the outputs (innermost first), where they are still
    /// empty.
    pub fn remove_created(&self, rt: &Runtime) {
        for (tmp, _) in &self.published {
            rt.discard_dir(tmp);
        }
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// The files of the last input's directory that go beside each output written into a
    /// directory, as `(source, target)`; each target is checked as an output is.
    pub fn companions(
        &self,
        last: &Checkpoint,
        inputs: &[PathBuf],
        force: bool,
        rt: &Runtime,
    ) -> Result<Vec<(PathBuf, PathBuf)>> {
        let Some(src) = last.source_dir() else {
            return Ok(Vec::new());
        };
        if self.dcp || self.dirs.iter().all(Option::is_none) {
            return Ok(Vec::new());
        }
        let own: Vec<&Path> = last.files().iter().map(|f| f.path()).collect();
        let files = hf::companions(src, &own)?;
        let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        let mut out = Vec::new();
        for d in self.dirs.iter().flatten() {
            for f in &files {
                let target = d.join(f.file_name().expect("a file"));
                check_target(&target, &inputs, force, rt)?;
                out.push((f.clone(), target));
            }
        }
        Ok(out)
    }
}

/// Renames each DCP output's temporary directory to its target ([`Runtime::publish_dirs`]).
pub fn publish(dirs: &[(PathBuf, PathBuf)], rt: &Runtime) -> Result<()> {
    rt.publish_dirs(dirs)
        .map_err(|(i, e)| Error::io(&dirs[i].1, e))
}

/// The path to name for `p`: a DCP output's target rather than its temporary directory.
fn shown_path(p: &Path, dirs: &[(PathBuf, PathBuf)]) -> PathBuf {
    dirs.iter()
        .find(|(tmp, _)| tmp == p)
        .map_or_else(|| p.to_path_buf(), |(_, t)| t.clone())
}

/// Runs a fold command: `command` is `ema` or `swa`, `swept` its outputs.
pub fn run(args: &FoldArgs, swept: &[Swept], command: &str, rt: &Runtime) -> Result<()> {
    let started = Instant::now();
    set_threads(args.threads)?;
    let values: Vec<Vec<(String, String)>> = swept.iter().map(|s| s.values.clone()).collect();
    let targets = targets(&args.out, command, &values, &args.inputs, args.dry_run, rt)?;
    let result = run_to(args, swept, command, &targets, started, rt);
    if result.is_err() {
        targets.remove_created(rt);
    }
    result
}

/// [`run`] once the targets are checked.
fn run_to(
    args: &FoldArgs,
    swept: &[Swept],
    command: &str,
    targets: &Targets,
    started: Instant,
    rt: &Runtime,
) -> Result<()> {
    let values: Vec<Vec<(String, String)>> = swept.iter().map(|s| s.values.clone()).collect();
    if !args.dry_run {
        if let Device::Cuda(n) = args.device {
            fold::cuda::check_device(n)?;
        }
    }
    let mut ordered = arrange(open_inputs(&args.inputs)?, args.order)?;
    let chosen = {
        let refs: Vec<&Checkpoint> = ordered.inputs.iter().collect();
        choose(&refs, &args.choose.choice())?
    };
    ordered.inputs = keep(ordered.inputs, &chosen);
    let steps = if args.per_iter {
        Some(ordered.steps()?)
    } else {
        None
    };
    let n = ordered.inputs.len();
    let varying = varying(&values);
    let companions = match (args.dry_run, ordered.inputs.last()) {
        (false, Some(last)) => targets.companions(last, &args.inputs, args.out.force, rt)?,
        _ => Vec::new(),
    };
    let outputs = swept
        .iter()
        .zip(&targets.files)
        .map(|(s, target)| {
            Ok(Output {
                target: target.clone(),
                params: s
                    .values
                    .iter()
                    .filter(|(name, _)| varying.contains(name))
                    .cloned()
                    .collect(),
                weights: s.schedule.weights(n, steps.as_deref())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(w) = &ordered.warning {
        super::warn(args.out.quiet, w);
    }
    let deploy = deploy_of(&args.deploy);
    let opts = Options {
        include: &args.include,
        exclude: &args.exclude,
        skip_buffers: args.skip_buffers,
        buffer_pattern: &args.buffer_pattern,
        dtype: args.out.dtype.map(Into::into),
        deploy: deploy.as_ref().map(|d| d.get()),
        ..Options::default()
    };
    let plan = build(ordered, outputs, &opts)?;
    let records: Vec<Value> = swept
        .iter()
        .enumerate()
        .map(|(o, s)| {
            json!({
                "command": command,
                "params": s.params,
                "per_iter": args.per_iter,
                "order": plan.order,
                "inputs": inputs_json(&plan, o, &chosen),
            })
        })
        .collect();
    let how = Run {
        out: &args.out,
        dry_run: args.dry_run,
        device: args.device,
        mapped_inputs: args.mapped_inputs,
        started,
        metadata: &[],
        chosen: &chosen,
        plain: args.deploy.deploy,
        companions: &companions,
        dirs: &targets.published,
    };
    if plan.outputs.len() == 1 {
        one(
            &plan,
            records.into_iter().next().expect("one output"),
            &swept[0].params,
            &how,
            rt,
        )
    } else {
        let summary = json!({
            "command": command,
            "per_iter": args.per_iter,
            "order": plan.order,
            "inputs": plan.inputs.iter().map(|c| json!({"path": c.path(), "step": c.step()})).collect::<Vec<_>>(),
        });
        let mut summary = summary;
        add_choice(&mut summary, &chosen);
        let params: Vec<&Value> = swept.iter().map(|s| &s.params).collect();
        many(&plan, records, &params, summary, &how, rt)
    }
}

/// What `--deploy` asks of a fold's plan, owned until the plan is built.
pub struct DeployOwned {
    raw: bool,
    layout: crate::cli::LayoutArgs,
    custom: Option<crate::layout::Prefixes>,
    strip: Vec<String>,
}

impl DeployOwned {
    /// The plan's view of it.
    pub fn get(&self) -> crate::plan::fold::Deploy<'_> {
        crate::plan::fold::Deploy {
            raw: self.raw,
            layout: self.layout.layout,
            custom: self.custom.as_ref(),
            ema_on: self.layout.ema_on,
            strip: &self.strip,
        }
    }
}

/// `--deploy` of a fold command, if given.
pub fn deploy_of(args: &crate::cli::DeployArgs) -> Option<DeployOwned> {
    args.deploy.then(|| DeployOwned {
        raw: args.raw,
        layout: args.layout.clone(),
        custom: args.layout.prefixes(),
        strip: args.layout.strip(),
    })
}

/// How the fold runs and reports, beyond the plan.
pub struct Run<'a> {
    pub out: &'a OutputArgs,
    pub dry_run: bool,
    pub device: Device,
    pub mapped_inputs: usize,
    pub started: Instant,
    /// Metadata entries the outputs get over the last input's.
    pub metadata: &'a [(String, String)],
    /// Which inputs were kept (and their metrics) and which dropped.
    pub chosen: &'a Chosen,
    /// The outputs are deployed state dicts (`--deploy`): no metadata of the inputs is kept.
    pub plain: bool,
    /// Files copied beside outputs written into directories, `(source, target)`, committed
    /// with the outputs.
    pub companions: &'a [(PathBuf, PathBuf)],
    /// DCP outputs: `(temporary directory, target)`, renamed after the commit.
    pub dirs: &'a [(PathBuf, PathBuf)],
}

/// Copies the companions of `how` to their temporaries, ready to be committed.
fn copy_companions(how: &Run, rt: &Runtime) -> Result<Vec<Finished>> {
    how.companions
        .iter()
        .map(|(src, target)| hf::copy(src, target, how.out.force, rt))
        .collect()
}

/// `"dropped"` (when an input was) and the inputs' `"metric"` (when `--best` ranked them) of a
/// `--json` document.
pub fn add_choice(doc: &mut Value, chosen: &Chosen) {
    if !chosen.dropped.is_empty() {
        doc["dropped"] = chosen.dropped_json();
    }
    if let Some(inputs) = doc.get_mut("inputs").and_then(Value::as_array_mut) {
        for (v, m) in inputs.iter_mut().zip(&chosen.metrics) {
            if let Some(m) = m {
                v["metric"] = json!(m);
            }
        }
    }
}

/// The `dropped` lines of `--dry-run`.
pub fn print_dropped(chosen: &Chosen) {
    for d in &chosen.dropped {
        let step = d.step.map_or("-".to_string(), |s| s.to_string());
        println!("dropped   {} (step {step}): {}", d.path.display(), d.why);
    }
}

/// The metadata of an output: the last input's, `how.metadata` over it, and the `ema_tool`
/// record.
fn output_metadata(
    plan: &Plan,
    how: &Run,
    record: Value,
) -> std::collections::BTreeMap<String, String> {
    let last = plan.inputs.last().expect("at least one input");
    let mut base = last.metadata().clone();
    if how.plain {
        // A deployed state dict: none of the training checkpoint's entries but its step.
        base.retain(|k, _| k == "step");
    }
    for (k, v) in how.metadata {
        base.insert(k.clone(), v.clone());
    }
    provenance(&base, record)
}

/// Runs and reports a plan of one output; `record` is its provenance (and, completed, the
/// `--json` summary), `params` the strategy's parameters for `--dry-run`.
pub fn one(plan: &Plan, mut record: Value, params: &Value, how: &Run, rt: &Runtime) -> Result<()> {
    let output = &plan.outputs[0].target;
    let (folded, copied) = plan.counts();
    if how.dry_run {
        if how.out.json {
            record["output"] = json!(output);
            record["tensors"] = json!({"averaged": folded, "copied": copied});
            record["output_tensor_bytes"] = json!(plan.output_bytes());
            add_choice(&mut record, how.chosen);
            return print_json(&record);
        }
        print_plan(plan, params, output);
        print_dropped(how.chosen);
        return Ok(());
    }
    let metadata = output_metadata(plan, how, record.clone());
    let (writer, written) = create_writer(plan, 0, how.out, &metadata, rt)?;
    let written = shown_path(&written, how.dirs);
    let progress = progress(plan.input_bytes(), how.out.quiet);
    let opts = fold::Options {
        finite: how.out.check_finite,
        mapped_inputs: how.mapped_inputs,
    };
    fold::execute(plan, &[&writer], how.device, opts, &progress, rt)?;
    let (mut files, bytes) = writer.finish(rt)?;
    files.extend(copy_companions(how, rt)?);
    commit_all(rt, files)?;
    publish(how.dirs, rt)?;
    let secs = how.started.elapsed().as_secs_f64();
    if how.out.json {
        record["output"] = json!(written);
        record["bytes"] = json!(bytes);
        record["bytes_read"] = json!(progress.bytes());
        record["seconds"] = json!(secs);
        record["device"] = json!(how.device.to_string());
        record["tensors"] = json!({"averaged": folded, "copied": copied});
        add_choice(&mut record, how.chosen);
        print_json(&record)?;
    } else if !how.out.quiet {
        eprintln!(
            "ema-tool: wrote {} ({} tensors: {folded} averaged, {copied} copied; {}) from {} checkpoints in {secs:.2} s",
            written.display(),
            plan.tensors.len(),
            human_bytes(bytes),
            plan.inputs.len(),
        );
    }
    Ok(())
}

/// Runs and reports a plan of several outputs (a sweep): every output from one read of the
/// inputs, all of them committed together. `records[o]` is output `o`'s provenance,
/// `params[o]` its parameters, `summary` the start of the `--json` document.
pub fn many(
    plan: &Plan,
    records: Vec<Value>,
    params: &[&Value],
    mut summary: Value,
    how: &Run,
    rt: &Runtime,
) -> Result<()> {
    let (folded, copied) = plan.counts();
    let outputs_json = |bytes: &[u64]| -> Vec<Value> {
        plan.outputs
            .iter()
            .enumerate()
            .map(|(o, out)| {
                let mut v = json!({
                    "path": out.target,
                    "params": params[o],
                    "weights": out.weights,
                });
                if let Some(b) = bytes.get(o) {
                    v["bytes"] = json!(b);
                }
                v
            })
            .collect()
    };
    if how.dry_run {
        if how.out.json {
            summary["outputs"] = json!(outputs_json(&[]));
            summary["tensors"] = json!({"averaged": folded, "copied": copied});
            summary["output_tensor_bytes"] = json!(plan.output_bytes());
            return print_json(&summary);
        }
        print_table(plan);
        print_dropped(how.chosen);
        return Ok(());
    }
    let mut writers = Vec::with_capacity(plan.outputs.len());
    let mut shown = Vec::with_capacity(plan.outputs.len());
    for (o, record) in records.into_iter().enumerate() {
        let metadata = output_metadata(plan, how, record);
        let (w, s) = create_writer(plan, o, how.out, &metadata, rt)?;
        writers.push(w);
        shown.push(shown_path(&s, how.dirs));
    }
    let progress = progress(plan.input_bytes(), how.out.quiet);
    let opts = fold::Options {
        finite: how.out.check_finite,
        mapped_inputs: how.mapped_inputs,
    };
    let sinks: Vec<&dyn fold::Sink> = writers.iter().map(|w| w as &dyn fold::Sink).collect();
    fold::execute(plan, &sinks, how.device, opts, &progress, rt)?;
    // Every file of every output complete and synced before the first rename.
    let mut files = Vec::new();
    let mut bytes = Vec::with_capacity(writers.len());
    for w in writers {
        let (f, n) = w.finish(rt)?;
        files.extend(f);
        bytes.push(n);
    }
    files.extend(copy_companions(how, rt)?);
    commit_all(rt, files)?;
    publish(how.dirs, rt)?;
    let secs = how.started.elapsed().as_secs_f64();
    if how.out.json {
        let mut outs = outputs_json(&bytes);
        for (o, s) in shown.iter().enumerate() {
            outs[o]["path"] = json!(s);
        }
        summary["outputs"] = json!(outs);
        summary["bytes"] = json!(bytes.iter().sum::<u64>());
        summary["bytes_read"] = json!(progress.bytes());
        summary["seconds"] = json!(secs);
        summary["device"] = json!(how.device.to_string());
        summary["tensors"] = json!({"averaged": folded, "copied": copied});
        print_json(&summary)?;
    } else if !how.out.quiet {
        eprintln!(
            "ema-tool: wrote {} outputs ({}, …; {} tensors each: {folded} averaged, {copied} \
             copied; {} in all) from {} checkpoints read once, in {secs:.2} s",
            shown.len(),
            shown[0].display(),
            plan.tensors.len(),
            human_bytes(bytes.iter().sum()),
            plan.inputs.len(),
        );
    }
    Ok(())
}

/// The inputs with their steps and weights in output `o` (and their `--best` metrics), as
/// JSON: the provenance record of the output.
fn inputs_json(plan: &Plan, o: usize, chosen: &Chosen) -> Value {
    plan.inputs
        .iter()
        .zip(&plan.outputs[o].weights)
        .enumerate()
        .map(|(i, (c, w))| {
            let mut v = json!({"path": c.path(), "step": c.step(), "weight": w});
            if let Some(Some(m)) = chosen.metrics.get(i) {
                v["metric"] = json!(m);
            }
            v
        })
        .collect()
}

/// The human-readable plan of `--dry-run` of one output, on stdout.
fn print_plan(plan: &Plan, params: &Value, output: &Path) {
    let params: Vec<String> = params
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k} {s}"),
                    v => format!("{k} {v}"),
                })
                .collect()
        })
        .unwrap_or_default();
    println!("plan      {}", params.join(", "));
    println!("order     {}", order_name(plan));
    println!("{:>4}  {:>10}  {:<12}  file", "#", "step", "weight");
    for (i, (c, w)) in plan.inputs.iter().zip(&plan.outputs[0].weights).enumerate() {
        let step = c.step().map_or("-".to_string(), |s| s.to_string());
        println!("{i:>4}  {step:>10}  {w:<12.6e}  {}", c.path().display());
    }
    let (folded, copied) = plan.counts();
    println!("tensors   {folded} averaged, {copied} copied from the last checkpoint");
    println!(
        "output    {} ({} of tensor data)",
        output.display(),
        human_bytes(plan.output_bytes())
    );
}

fn order_name(plan: &Plan) -> String {
    serde_json::to_value(plan.order)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The N × K table of `--dry-run` of a sweep: a row per input, a column per output.
pub fn print_table(plan: &Plan) {
    println!("order     {}", order_name(plan));
    for (o, out) in plan.outputs.iter().enumerate() {
        let params: Vec<String> = out.params.iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!(
            "output {o:<3}{}  ({})",
            out.target.display(),
            params.join(", ")
        );
    }
    let mut head = format!("{:>4}  {:>10}", "#", "step");
    for o in 0..plan.outputs.len() {
        head.push_str(&format!("  {:<12}", format!("output {o}")));
    }
    println!("{head}  file");
    for (i, c) in plan.inputs.iter().enumerate() {
        let step = c.step().map_or("-".to_string(), |s| s.to_string());
        let mut row = format!("{i:>4}  {step:>10}");
        for out in &plan.outputs {
            row.push_str(&format!("  {:<12.6e}", out.weights[i]));
        }
        println!("{row}  {}", c.path().display());
    }
    let (folded, copied) = plan.counts();
    println!("tensors   {folded} averaged, {copied} copied from the last checkpoint");
    println!(
        "outputs   {} × {} of tensor data, from one read of the inputs",
        plan.outputs.len(),
        human_bytes(plan.output_bytes())
    );
}
