//! What `ema` and `swa` share: check the target, open, order and weigh the inputs, plan the
//! fold, run it, report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{create_writer, print_json, progress, provenance, set_threads, warn};
use crate::cli::FoldArgs;
use crate::error::Result;
use crate::fold::{self, Device};
use crate::output::{check_output_kind, check_target};
use crate::plan::fold::{arrange, build, open_inputs, Options};
use crate::plan::{Output, Plan};
use crate::runtime::Runtime;
use crate::schedule::Schedule;
use crate::text::human_bytes;

/// Runs a fold command: `command` is `ema` or `swa`, `params` the strategy's JSON description.
pub fn run(
    args: &FoldArgs,
    schedule: &Schedule,
    command: &str,
    params: Value,
    rt: &Runtime,
) -> Result<()> {
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
        check_target(&output, &inputs, args.out.force, rt)?;
        check_output_kind(&output, args.out.max_shard_size)?;
        if let Device::Cuda(n) = args.device {
            fold::cuda::check_device(n)?;
        }
    }
    let ordered = arrange(open_inputs(&args.inputs)?, args.order)?;
    let weights = if args.per_iter {
        schedule.weights(ordered.inputs.len(), Some(&ordered.steps()?))?
    } else {
        schedule.weights(ordered.inputs.len(), None)?
    };
    if let Some(w) = &ordered.warning {
        warn(args.out.quiet, w);
    }
    let opts = Options {
        include: &args.include,
        exclude: &args.exclude,
        skip_buffers: args.skip_buffers,
        buffer_pattern: &args.buffer_pattern,
        dtype: args.out.dtype.map(Into::into),
    };
    let plan = build(
        ordered,
        vec![Output {
            target: output.clone(),
            params: Vec::new(),
            weights,
        }],
        &opts,
    )?;
    let mut record = json!({
        "command": command,
        "params": params,
        "per_iter": args.per_iter,
        "order": plan.order,
        "inputs": inputs_json(&plan),
    });
    let (folded, copied) = plan.counts();
    if args.dry_run {
        if args.out.json {
            record["output"] = json!(output);
            record["tensors"] = json!({"averaged": folded, "copied": copied});
            record["output_tensor_bytes"] = json!(plan.output_bytes());
            return print_json(&record);
        }
        print_plan(&plan, &params, &output);
        return Ok(());
    }
    let last = plan.inputs.last().expect("at least one input");
    let metadata = provenance(last.metadata(), record.clone());
    let (writer, written) = create_writer(&plan, 0, &args.out, &metadata, rt)?;
    let progress = progress(plan.input_bytes(), args.out.quiet);
    let opts = fold::Options {
        finite: args.out.check_finite,
        mapped_inputs: args.mapped_inputs,
    };
    fold::execute(&plan, &[&writer], args.device, opts, &progress, rt)?;
    let bytes = writer.commit(rt)?;
    let secs = started.elapsed().as_secs_f64();
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
            plan.inputs.len(),
        );
    }
    Ok(())
}

/// The inputs with their steps and weights in the first output, as JSON.
fn inputs_json(plan: &Plan) -> Value {
    plan.inputs
        .iter()
        .zip(&plan.outputs[0].weights)
        .map(|(c, w)| json!({"path": c.path(), "step": c.step(), "weight": w}))
        .collect()
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
