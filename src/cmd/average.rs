//! What `ema` and `swa` share: open and order the inputs, weigh them, check they agree, fold.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::{human_bytes, print_json, progress, provenance, selected, set_threads, warn};
use crate::checkpoint::safetensors::OutTensor;
use crate::checkpoint::Checkpoint;
use crate::cli::FoldArgs;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fold::{self, Checks, Device, Job, Src};
use crate::output::{check_output_kind, check_target, Writer};
use crate::plan::{order_inputs, Order, Schedule};

/// The plan of a fold, before any value is read.
pub struct Plan {
    /// Inputs in fold order.
    pub ckpts: Vec<Checkpoint>,
    pub weights: Vec<f64>,
    pub order: Order,
    /// Output tensors and the job making each.
    pub tensors: Vec<OutTensor>,
    pub jobs: Vec<Job>,
}

impl Plan {
    /// Opens, orders and weighs the inputs and matches their tensors.
    pub fn new(args: &FoldArgs, schedule: &Schedule) -> Result<Plan> {
        // In parallel: a header of many tensors takes milliseconds to parse. The first error
        // in the order given is the one reported.
        let opened = args
            .inputs
            .par_iter()
            .map(|p| Checkpoint::open(p))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|c| {
                // A `.pth`'s parsed archive serves inspect and swap, not the fold.
                c.map(|mut c| {
                    c.archive = None;
                    c
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let paths: Vec<&Path> = opened.iter().map(|c| c.path.as_path()).collect();
        let steps: Vec<Option<u64>> = opened.iter().map(|c| c.step).collect();
        let ord = order_inputs(args.order, &paths, &steps)?;
        let mut slots: Vec<Option<Checkpoint>> = opened.into_iter().map(Some).collect();
        let ckpts: Vec<Checkpoint> = ord
            .perm
            .iter()
            .map(|&i| slots[i].take().expect("a permutation"))
            .collect();
        let weights = if args.per_iter {
            let steps = ckpts
                .iter()
                .map(|c| {
                    c.step.ok_or_else(|| {
                        Error::format(
                            &c.path,
                            "has no step (no step metadata and no number in the file name); \
                             --per-iter needs one for every input",
                        )
                    })
                })
                .collect::<Result<Vec<u64>>>()?;
            schedule.weights(ckpts.len(), Some(&steps))?
        } else {
            schedule.weights(ckpts.len(), None)?
        };
        if let Some(w) = &ord.warning {
            warn(args.out.quiet, w);
        }
        let (tensors, jobs) = match_tensors(&ckpts, &weights, args)?;
        Ok(Plan {
            ckpts,
            weights,
            order: ord.used,
            tensors,
            jobs,
        })
    }

    /// Bytes of input the fold reads.
    pub fn input_bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.input_bytes(&self.ckpts)).sum()
    }

    /// Bytes of output tensor data.
    pub fn output_bytes(&self) -> u64 {
        self.tensors.iter().map(OutTensor::nbytes).sum()
    }

    /// Counts of averaged and copied tensors.
    pub fn job_counts(&self) -> (usize, usize) {
        let folded = self
            .jobs
            .iter()
            .filter(|j| matches!(j, Job::Fold { .. }))
            .count();
        (folded, self.jobs.len() - folded)
    }

    /// The inputs with their steps and weights, as JSON.
    pub fn inputs_json(&self) -> Value {
        self.ckpts
            .iter()
            .zip(&self.weights)
            .map(|(c, w)| json!({"path": c.path, "step": c.step, "weight": w}))
            .collect()
    }
}

/// Checks every input holds the same tensors with the same shapes, and makes one job per
/// selected tensor of the last input, in its order.
fn match_tensors(
    ckpts: &[Checkpoint],
    weights: &[f64],
    args: &FoldArgs,
) -> Result<(Vec<OutTensor>, Vec<Job>)> {
    let last_i = ckpts.len() - 1;
    let last = &ckpts[last_i];
    let is_selected = |n: &str| selected(n, &args.include, &args.exclude);
    // Tensors of other inputs missing from the last one.
    for c in &ckpts[..last_i] {
        if let Some(t) = c
            .tensors
            .iter()
            .enumerate()
            .find(|(i, t)| is_selected(&t.name) && last.position_near(&t.name, *i).is_none())
            .map(|(_, t)| t)
        {
            return Err(Error::missing(&last.path, &c.path, &t.name));
        }
    }
    let out_dtype = |d: DType| match args.out.dtype {
        Some(o) if d.is_float() => o.into(),
        _ => d,
    };
    let mut tensors = Vec::new();
    let mut jobs = Vec::new();
    for (ti, t) in last.tensors.iter().enumerate() {
        if !is_selected(&t.name) {
            continue;
        }
        let mut sources = Vec::new();
        let mut ws = Vec::new();
        for (ci, c) in ckpts.iter().enumerate() {
            let Some(pos) = c.position_near(&t.name, ti) else {
                return Err(Error::missing(&c.path, &last.path, &t.name));
            };
            let o = &c.tensors[pos];
            if o.shape != t.shape {
                return Err(Error::mismatch(
                    &c.path,
                    &last.path,
                    &t.name,
                    "shape",
                    format!("{:?}", o.shape),
                    format!("{:?}", t.shape),
                ));
            }
            if o.dtype.is_float() != t.dtype.is_float()
                || (!t.dtype.is_float() && o.dtype != t.dtype)
            {
                return Err(Error::mismatch(
                    &c.path, &last.path, &t.name, "dtype", o.dtype, t.dtype,
                ));
            }
            if weights[ci] != 0.0 {
                sources.push(Src {
                    ckpt: ci,
                    tensor: pos,
                });
                ws.push(weights[ci]);
            }
        }
        let last_src = Src {
            ckpt: last_i,
            tensor: ti,
        };
        let buffer = args.skip_buffers
            && args
                .buffer_pattern
                .iter()
                .any(|g| super::glob_match(g, &t.name));
        let job = if !t.dtype.is_float() || buffer {
            Job::Copy {
                source: last_src,
                out_dtype: out_dtype(t.dtype),
            }
        } else if sources.len() == 1 && ws[0] == 1.0 {
            Job::Copy {
                source: sources[0],
                out_dtype: out_dtype(t.dtype),
            }
        } else {
            Job::Fold {
                sources,
                weights: ws,
                out_dtype: out_dtype(t.dtype),
            }
        };
        tensors.push(OutTensor {
            name: t.name.clone(),
            dtype: out_dtype(t.dtype),
            shape: t.shape.clone(),
        });
        jobs.push(job);
    }
    if tensors.is_empty() {
        return Err(Error::usage(
            "no tensor is selected (check --include/--exclude against `ema-tool inspect --tensors`)",
        ));
    }
    Ok((tensors, jobs))
}

/// Runs a fold command: `command` is `ema` or `swa`, `params` the strategy's JSON description.
pub fn run(args: &FoldArgs, schedule: &Schedule, command: &str, params: Value) -> Result<()> {
    let started = Instant::now();
    schedule.validate()?;
    set_threads(args.threads)?;
    let output = args
        .out
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{command}.safetensors")));
    if !args.dry_run {
        let inputs: Vec<&Path> = args.inputs.iter().map(PathBuf::as_path).collect();
        check_target(&output, &inputs, args.out.force)?;
        check_output_kind(&output, args.out.max_shard_size)?;
        if let Device::Cuda(n) = args.device {
            fold::cuda::check_device(n)?;
        }
    }
    let plan = Plan::new(args, schedule)?;
    let mut record = json!({
        "command": command,
        "params": params,
        "per_iter": args.per_iter,
        "order": plan.order,
        "inputs": plan.inputs_json(),
    });
    if args.dry_run {
        if args.out.json {
            record["output"] = json!(output);
            record["tensors"] =
                json!({"averaged": plan.job_counts().0, "copied": plan.job_counts().1});
            record["output_tensor_bytes"] = json!(plan.output_bytes());
            return print_json(&record);
        }
        print_plan(&plan, &params, &output);
        return Ok(());
    }
    let last = plan.ckpts.last().expect("at least one input");
    let metadata = provenance(&last.metadata, record.clone());
    let writer = Writer::create(
        &output,
        args.out.force,
        &plan.tensors,
        &metadata,
        args.out.max_shard_size,
    )?;
    let written = writer.display_path(&output);
    let progress = progress(plan.input_bytes(), args.out.quiet);
    fold::execute(
        &plan.ckpts,
        &plan.jobs,
        &writer,
        args.device,
        Checks {
            finite: args.out.check_finite,
        },
        &progress,
    )?;
    let bytes = writer.commit()?;
    let secs = started.elapsed().as_secs_f64();
    let (folded, copied) = plan.job_counts();
    if args.out.json {
        record["output"] = json!(written);
        record["bytes"] = json!(bytes);
        record["bytes_read"] = json!(progress.bytes());
        record["seconds"] = json!(secs);
        record["device"] = json!(args.device.to_string());
        record["tensors"] = json!({"averaged": folded, "copied": copied});
        print_json(&record)?;
    } else if !args.out.quiet {
        eprintln!(
            "ema-tool: wrote {} ({} tensors: {folded} averaged, {copied} copied; {}) from {} checkpoints in {secs:.2} s",
            written.display(),
            plan.tensors.len(),
            human_bytes(bytes),
            plan.ckpts.len(),
        );
    }
    Ok(())
}

/// The human-readable plan of `--dry-run`, on stdout.
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
    println!(
        "order     {}",
        serde_json::to_value(plan.order)
            .unwrap_or_default()
            .as_str()
            .unwrap_or("?")
    );
    println!("{:>4}  {:>10}  {:<12}  file", "#", "step", "weight");
    for (i, (c, w)) in plan.ckpts.iter().zip(&plan.weights).enumerate() {
        let step = c.step.map_or("-".to_string(), |s| s.to_string());
        println!("{i:>4}  {step:>10}  {w:<12.6e}  {}", c.path.display());
    }
    let (folded, copied) = plan.job_counts();
    println!("tensors   {folded} averaged, {copied} copied from the last checkpoint");
    println!(
        "output    {} ({} of tensor data)",
        output.display(),
        human_bytes(plan.output_bytes())
    );
}
