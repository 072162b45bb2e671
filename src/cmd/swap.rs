//! `ema-tool swap`: exchange the EMA and raw weights of a checkpoint, or deploy one side.
//!
//! From a PyTorch checkpoint to a PyTorch checkpoint, the swap happens inside the archive: the
//! file is copied and the storage records of each pair exchange their contents, so the pickle
//! and every other entry (meta, optimizer, message hub) stay byte for byte as they were and the
//! training framework can still resume from the result.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::json;

use super::{default_output, human_bytes, print_json, progress, provenance, VERSION};
use crate::checkpoint::safetensors::OutTensor;
use crate::checkpoint::torch::{self, is_torch_name};
use crate::checkpoint::{Checkpoint, Format};
use crate::cli::SwapArgs;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fold::{self, Checks, Device, Job, Sink, Src};
use crate::layout::{self, Pairing, Side};
use crate::output::pth::{comment_for, PatchWriter};
use crate::output::{check_output_kind, check_target, Writer};

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
    check_output_kind(&output, args.out.max_shard_size)?;
    let in_archive = !args.deploy && is_torch_name(&output);
    if in_archive && args.out.check_finite {
        return Err(Error::usage(
            "--check-finite does not apply to a swap inside a PyTorch checkpoint (no value is \
             decoded); check with `ema-tool inspect --stats`",
        ));
    }
    let ckpt = Checkpoint::open(&args.input)?;
    if in_archive && ckpt.format != Format::Torch {
        return Err(Error::usage(format!(
            "{}: swap writes a PyTorch checkpoint only from a PyTorch checkpoint (whose other \
             entries it keeps); name the output .safetensors, or use --deploy",
            output.display()
        )));
    }
    let pairing = find_pairing(&ckpt, args)?;
    let ema_side = pairing.ema_side(&ckpt, args.ema_on);
    if in_archive {
        return swap_in_archive(ckpt, &pairing, ema_side, &output, args, started);
    }

    let (tensors, jobs, record) = if args.deploy {
        deploy_plan(&ckpt, &pairing, ema_side, args)?
    } else {
        swap_plan(&ckpt, &pairing, ema_side)
    };
    let mut base = ckpt.metadata.clone();
    base.remove("ema_tool");
    let metadata = provenance(&base, record.clone());
    let writer = Writer::create(
        &output,
        args.out.force,
        &tensors,
        &metadata,
        args.out.max_shard_size,
    )?;
    let written = writer.display_path(&output);
    let ckpts = [ckpt];
    copy_tensors(
        &ckpts,
        &jobs,
        &writer,
        args.out.quiet,
        args.out.check_finite,
    )?;
    let bytes = writer.commit()?;
    let secs = started.elapsed().as_secs_f64();
    if args.out.json {
        let mut summary = record;
        summary["input"] = json!(args.input);
        summary["output"] = json!(written);
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
            written.display(),
            pairing.layout.name(),
            ema_side.name(),
            human_bytes(bytes)
        );
    }
    Ok(())
}

/// `swap` from a PyTorch checkpoint to one: exchanges the storage records of the pairs in a
/// copy of the archive. The side now holding the EMA is recorded in the archive comment when
/// it is not the layout's default, so swapping twice gives back the input byte for byte.
fn swap_in_archive(
    ckpt: Checkpoint,
    pairing: &Pairing,
    ema_side: Side,
    output: &std::path::Path,
    args: &SwapArgs,
    started: Instant,
) -> Result<()> {
    let path = ckpt.path.clone();
    let archive = ckpt
        .archive
        .as_deref()
        .ok_or_else(|| Error::format(&path, "is not a PyTorch archive"))?;
    let names: Vec<(&str, &str)> = pairing
        .pairs
        .iter()
        .map(|p| {
            (
                ckpt.tensors[p.model].name.as_str(),
                ckpt.tensors[p.shadow].name.as_str(),
            )
        })
        .collect();
    let exchanges = archive.record_exchange(&path, &names)?;
    let now_on = ema_side.flip();
    let record = json!({
        "version": VERSION,
        "command": "swap",
        "layout": pairing.layout,
        "ema_on": now_on,
        "input": path,
    });
    let comment = if now_on == pairing.layout.default_ema_side() {
        String::new()
    } else {
        comment_for(&record)
    };
    let slots: Vec<usize> = exchanges.iter().flat_map(|&(a, b)| [a, b]).collect();
    let records = torch::records_checkpoint(&path, archive, &slots)?;
    // Slot 2k takes the bytes of slot 2k + 1 and the other way round.
    let jobs: Vec<Job> = (0..slots.len())
        .map(|i| Job::Copy {
            source: Src {
                ckpt: 0,
                tensor: i ^ 1,
            },
            out_dtype: DType::U8,
        })
        .collect();
    let writer = PatchWriter::create(output, args.out.force, &path, archive, &exchanges, &comment)?;
    drop(ckpt);
    let ckpts = [records];
    copy_tensors(&ckpts, &jobs, &writer, args.out.quiet, false)?;
    let bytes = writer.commit()?;
    let secs = started.elapsed().as_secs_f64();
    if args.out.json {
        let mut summary = record;
        summary["output"] = json!(output);
        summary["bytes"] = json!(bytes);
        summary["pairs"] = json!(pairing.pairs.len());
        summary["records_exchanged"] = json!(exchanges.len());
        summary["seconds"] = json!(secs);
        print_json(&summary)?;
    } else if !args.out.quiet {
        eprintln!(
            "ema-tool: wrote {} (swapped {} pairs inside the archive, {} storage records \
             exchanged, every other entry kept; {} layout, EMA now on the {} side; {})",
            output.display(),
            pairing.pairs.len(),
            exchanges.len(),
            pairing.layout.name(),
            now_on.name(),
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

/// Runs the copy jobs of a swap or deploy on the CPU into `sink`, with a progress bar.
fn copy_tensors(
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    quiet: bool,
    finite: bool,
) -> Result<()> {
    let total: u64 = jobs.iter().map(|j| j.input_bytes(ckpts)).sum();
    fold::execute(
        ckpts,
        jobs,
        sink,
        Device::Cpu,
        Checks { finite },
        &progress(total, quiet),
    )
}
