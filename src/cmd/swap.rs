//! `ema-tool swap`: exchange the EMA and raw weights of a checkpoint, or deploy one side.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::json;

use super::{default_output, human_bytes, print_json, progress, provenance};
use crate::checkpoint::safetensors::OutTensor;
use crate::checkpoint::Checkpoint;
use crate::cli::SwapArgs;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fold::{self, Checks, Device, Job, Src};
use crate::layout::{self, Pairing, Side};
use crate::output::{check_target, SafetensorsWriter};

/// Runs `swap`.
pub fn run(args: &SwapArgs) -> Result<()> {
    let started = Instant::now();
    if !args.deploy && args.out.dtype.is_some() {
        return Err(Error::usage(
            "--dtype applies to `swap --deploy` only: a swap keeps every tensor as it is",
        ));
    }
    let output = args.out.output.clone().unwrap_or_else(|| {
        default_output(&args.input, if args.deploy { "deploy" } else { "swapped" })
    });
    check_target(&output, &[args.input.as_path()], args.out.force)?;
    let ckpt = Checkpoint::open(&args.input)?;
    let pairing = find_pairing(&ckpt, args)?;
    let ema_side = pairing.ema_side(&ckpt, args.ema_on);

    let (tensors, jobs, record) = if args.deploy {
        deploy_plan(&ckpt, &pairing, ema_side, args)?
    } else {
        swap_plan(&ckpt, &pairing, ema_side)
    };
    let mut base = ckpt.metadata.clone();
    base.remove("ema_tool");
    let metadata = provenance(&base, record.clone());
    let writer = SafetensorsWriter::create(&output, args.out.force, &tensors, &metadata)?;
    let ckpts = [ckpt];
    let total: u64 = jobs.iter().map(|j| j.input_bytes(&ckpts)).sum();
    let progress = progress(total, args.out.quiet);
    fold::execute(
        &ckpts,
        &jobs,
        &writer,
        Device::Cpu,
        Checks {
            finite: args.out.check_finite,
        },
        &progress,
    )?;
    let bytes = writer.commit()?;
    let secs = started.elapsed().as_secs_f64();
    if args.out.json {
        let mut summary = record;
        summary["input"] = json!(args.input);
        summary["output"] = json!(output);
        summary["bytes"] = json!(bytes);
        summary["tensors"] = json!(tensors.len());
        summary["pairs"] = json!(pairing.pairs.len());
        summary["seconds"] = json!(secs);
        print_json(&summary)?;
    } else if !args.out.quiet {
        let what = if args.deploy {
            format!(
                "deployed {} {} tensors",
                tensors.len(),
                if args.raw { "raw" } else { "EMA" }
            )
        } else {
            format!("swapped {} pairs", pairing.pairs.len())
        };
        eprintln!(
            "ema-tool: wrote {} ({what}; {} layout, EMA was on the {} side; {})",
            output.display(),
            pairing.layout.name(),
            ema_side.name(),
            human_bytes(bytes)
        );
    }
    Ok(())
}

/// The pairing of `--layout`, or the detected one.
fn find_pairing(ckpt: &Checkpoint, args: &SwapArgs) -> Result<Pairing> {
    let pairing = match args.layout {
        Some(l) => layout::pair(ckpt, l)?,
        None => layout::detect(ckpt).ok_or_else(|| {
            Error::format(
                &ckpt.path,
                "no EMA/raw weight pairs found (looked for the mmengine, timm and mmcv layouts; \
                 see `ema-tool inspect`)",
            )
        })?,
    };
    if pairing.pairs.is_empty() {
        return Err(Error::format(
            &ckpt.path,
            format!(
                "no EMA/raw weight pairs in the {} layout",
                pairing.layout.name()
            ),
        ));
    }
    Ok(pairing)
}

/// Every tensor kept under its name; the two tensors of each pair exchange their values.
fn swap_plan(
    ckpt: &Checkpoint,
    pairing: &Pairing,
    ema_side: Side,
) -> (Vec<OutTensor>, Vec<Job>, serde_json::Value) {
    let mut partner: HashMap<usize, usize> = HashMap::new();
    for p in &pairing.pairs {
        partner.insert(p.model, p.shadow);
        partner.insert(p.shadow, p.model);
    }
    let mut tensors = Vec::with_capacity(ckpt.tensors.len());
    let mut jobs = Vec::with_capacity(ckpt.tensors.len());
    for (i, t) in ckpt.tensors.iter().enumerate() {
        let src = partner.get(&i).copied().unwrap_or(i);
        tensors.push(OutTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        });
        jobs.push(Job::Copy {
            source: Src {
                ckpt: 0,
                tensor: src,
            },
            out_dtype: t.dtype,
        });
    }
    let record = json!({
        "command": "swap",
        "layout": pairing.layout,
        "ema_on": ema_side.flip(),
        "input": ckpt.path,
    });
    (tensors, jobs, record)
}

/// The weights of one side under the model's own names, prefixes stripped.
fn deploy_plan(
    ckpt: &Checkpoint,
    pairing: &Pairing,
    ema_side: Side,
    args: &SwapArgs,
) -> Result<(Vec<OutTensor>, Vec<Job>, serde_json::Value)> {
    let take = if args.raw { ema_side.flip() } else { ema_side };
    let shadow_of: HashMap<usize, usize> =
        pairing.pairs.iter().map(|p| (p.model, p.shadow)).collect();
    let default_strip = ["module.".to_string()];
    let strip: &[String] = if args.strip_prefix.is_empty() {
        &default_strip
    } else {
        &args.strip_prefix
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut jobs = Vec::new();
    for (model_idx, plain) in &pairing.model_tensors {
        let src = match take {
            Side::Model => *model_idx,
            Side::Shadow => shadow_of.get(model_idx).copied().unwrap_or(*model_idx),
        };
        let mut name = plain.as_str();
        for p in strip {
            name = name.strip_prefix(p.as_str()).unwrap_or(name);
        }
        if let Some(prev) = seen.insert(name.to_string(), *model_idx) {
            return Err(Error::tensor(
                &ckpt.path,
                &ckpt.tensors[*model_idx].name,
                format!(
                    "deploys as `{name}`, like `{}`; pass other --strip-prefix values",
                    ckpt.tensors[prev].name
                ),
            ));
        }
        let t = &ckpt.tensors[src];
        let out_dtype = match args.out.dtype {
            Some(d) if t.dtype.is_float() => DType::from(d),
            _ => t.dtype,
        };
        tensors.push(OutTensor {
            name: name.to_string(),
            dtype: out_dtype,
            shape: t.shape.clone(),
        });
        jobs.push(Job::Copy {
            source: Src {
                ckpt: 0,
                tensor: src,
            },
            out_dtype,
        });
    }
    let record = json!({
        "command": "swap --deploy",
        "layout": pairing.layout,
        "deployed": if args.raw { "raw" } else { "ema" },
        "taken_from": take,
        "input": ckpt.path,
    });
    Ok((tensors, jobs, record))
}
