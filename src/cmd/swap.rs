//! `ema-tool swap`: exchange the EMA and raw weights of a checkpoint, or deploy one side.
//!
//! From a PyTorch checkpoint to a PyTorch checkpoint, the swap happens inside the archive: the
//! file is copied and the storage records of each pair exchange their contents, so the pickle
//! and every other entry (meta, optimizer, message hub) stay byte for byte as they were and the
//! training framework can still resume from the result.

use std::time::Instant;

use serde_json::json;

use super::{create_writer, default_output, print_json, progress, provenance, VERSION};
use crate::checkpoint::{Checkpoint, Format, Open};
use crate::cli::SwapArgs;
use crate::codec::names::is_torch_name;
use crate::error::{Error, Result};
use crate::fold::{self, Device};
use crate::layout::{self, Pairing, Side};
use crate::output::patch::{self, PatchWriter};
use crate::output::{check_output_kind, check_target, Writer};
use crate::plan::{self, Plan};
use crate::runtime::Runtime;
use crate::text::human_bytes;

/// Runs `swap`.
pub fn run(args: &SwapArgs, rt: &Runtime) -> Result<()> {
    let started = Instant::now();
    if !args.deploy && args.out.dtype.is_some() {
        return Err(Error::usage(
            "--dtype applies to `swap --deploy` only: a swap keeps every tensor as it is",
        ));
    }
    let output = args.out.output.clone().unwrap_or_else(|| {
        default_output(&args.input, if args.deploy { "deploy" } else { "swapped" })
    });
    if args.out.format == Some(crate::cli::OutFormat::Dcp) {
        return Err(Error::usage(
            "swap writes safetensors or PyTorch files; --format dcp is for ema, swa and posthoc",
        ));
    }
    if crate::output::hf::is_dir_target(&output) {
        return Err(Error::usage(format!(
            "{}: swap writes one checkpoint file, not a model directory (`-o DIR/` is for ema, \
             swa and posthoc)",
            output.display()
        )));
    }
    check_target(&output, &[args.input.as_path()], args.out.force, rt)?;
    check_output_kind(&output, args.out.max_shard_size)?;
    let in_archive = !args.deploy && is_torch_name(&output);
    if in_archive && args.out.check_finite {
        return Err(Error::usage(
            "--check-finite does not apply to a swap inside a PyTorch checkpoint (no value is \
             decoded); check with `ema-tool inspect --stats`",
        ));
    }
    let ckpt = Checkpoint::open(&args.input, Open::Readable)?;
    if in_archive && ckpt.format() != Format::Torch {
        return Err(Error::usage(format!(
            "{}: swap writes a PyTorch checkpoint only from a PyTorch checkpoint (whose other \
             entries it keeps); name the output .safetensors, or use --deploy",
            output.display()
        )));
    }
    if args.deploy && args.layout.layout.is_none() && layout::detect(&ckpt).is_none() {
        return deploy_unpaired(ckpt, output, args, started, rt);
    }
    let pairing = find_pairing(&ckpt, args)?;
    let ema_side = pairing.ema_side(&ckpt, args.layout.ema_on);
    if in_archive {
        return swap_in_archive(ckpt, &pairing, ema_side, output, args, started, rt);
    }

    let mut base = ckpt.metadata().clone();
    base.remove("ema_tool");
    let (plan, record) = if args.deploy {
        let take = pairing.deployed_side(&ckpt, ema_side, args.raw)?;
        let record = json!({
            "command": "swap --deploy",
            "layout": pairing.layout,
            "deployed": if args.raw { "raw" } else { "ema" },
            "taken_from": take,
            "input": ckpt.path(),
        });
        let strip = args.layout.strip();
        let deployed = plan::swap::deployed(&ckpt, &pairing, take, &strip)?;
        let dtype = args.out.dtype.map(Into::into);
        let plan = plan::swap::deploy(ckpt, deployed, dtype, output.clone())?;
        (plan, record)
    } else {
        let record = json!({
            "command": "swap",
            "layout": pairing.layout,
            "ema_on": ema_side.flip(),
            "input": ckpt.path(),
        });
        (plan::swap::swap(ckpt, &pairing, output.clone()), record)
    };
    let what = if args.deploy {
        format!(
            "deployed {} {} tensors from the {} side; {} layout",
            plan.tensors.len(),
            if args.raw { "raw" } else { "EMA" },
            record["taken_from"].as_str().unwrap_or("?"),
            pairing.layout.name(),
        )
    } else {
        format!(
            "swapped {} pairs; {} layout, EMA was on the {} side",
            pairing.pairs.len(),
            pairing.layout.name(),
            ema_side.name()
        )
    };
    write(
        &plan,
        record,
        &base,
        pairing.pairs.len(),
        &what,
        args,
        started,
        rt,
    )
}

/// Writes the output of a swap or deploy `plan`, with `record` as its provenance over `base`,
/// then its summary: `record` with the output's figures on stdout (`--json`), or `what` on
/// stderr.
#[allow(clippy::too_many_arguments)]
fn write(
    plan: &Plan,
    record: serde_json::Value,
    base: &std::collections::BTreeMap<String, String>,
    pairs: usize,
    what: &str,
    args: &SwapArgs,
    started: Instant,
    rt: &Runtime,
) -> Result<()> {
    let metadata = provenance(base, record.clone());
    let (writer, written) = create_writer(plan, 0, &args.out, &metadata, rt)?;
    copy(plan, &writer, args.out.quiet, args.out.check_finite, rt)?;
    let bytes = writer.commit(rt)?;
    let secs = started.elapsed().as_secs_f64();
    if args.out.json {
        let mut summary = record;
        summary["input"] = json!(args.input);
        summary["output"] = json!(written);
        summary["bytes"] = json!(bytes);
        summary["tensors"] = json!(plan.tensors.len());
        summary["pairs"] = json!(pairs);
        summary["seconds"] = json!(secs);
        print_json(&summary)?;
    } else if !args.out.quiet {
        eprintln!(
            "ema-tool: wrote {} ({what}; {})",
            written.display(),
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
    output: std::path::PathBuf,
    args: &SwapArgs,
    started: Instant,
    rt: &Runtime,
) -> Result<()> {
    let pairs: Vec<(usize, usize)> = pairing.pairs.iter().map(|p| (p.model, p.shadow)).collect();
    let exchanges = patch::plan_exchange(&ckpt, &pairs)?;
    let now_on = ema_side.flip();
    let record = json!({
        "version": VERSION,
        "command": "swap",
        "layout": pairing.layout,
        "ema_on": now_on,
        "input": ckpt.path(),
    });
    let comment = if now_on == pairing.layout.default_ema_side() {
        String::new()
    } else {
        patch::comment_for(&record)
    };
    let slots = patch::slots(&ckpt, &exchanges)?;
    let writer = Writer::Patch(PatchWriter::create(
        &output,
        args.out.force,
        &ckpt,
        &exchanges,
        &comment,
        rt,
    )?);
    let plan = plan::swap::swap_in_archive(ckpt, &slots, output.clone());
    copy(&plan, &writer, args.out.quiet, false, rt)?;
    let bytes = writer.commit(rt)?;
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
    let pairing = match args.layout.layout {
        Some(l) => layout::pair(ckpt, l, args.layout.prefixes().as_ref())?,
        None => layout::detect(ckpt).ok_or_else(|| {
            Error::format(
                ckpt.path(),
                "no EMA/raw weight pairs found (looked for every layout but custom; see \
                 `ema-tool inspect`)",
            )
        })?,
    };
    if pairing.pairs.is_empty() && pairing.absent().is_none() {
        return Err(Error::format(
            ckpt.path(),
            format!(
                "no EMA/raw weight pairs in the {} layout",
                pairing.layout.name()
            ),
        ));
    }
    if let (Some(side), false) = (pairing.absent(), args.deploy) {
        return Err(Error::format(
            ckpt.path(),
            format!(
                "has no {} side in the {} layout: there is nothing to swap with (`swap --deploy` \
                 writes the side it has)",
                side.name(),
                pairing.layout.name()
            ),
        ));
    }
    Ok(pairing)
}

/// `swap --deploy` of a checkpoint without EMA pairs: with `--raw`, its model tensors (as a
/// fold's `--deploy` takes them); without, an error naming its subtrees, since shipping raw
/// weights as if they were the EMA would be worse than stopping.
fn deploy_unpaired(
    ckpt: Checkpoint,
    output: std::path::PathBuf,
    args: &SwapArgs,
    started: Instant,
    rt: &Runtime,
) -> Result<()> {
    if !args.raw {
        let subtrees: Vec<String> = layout::subtrees(&ckpt)
            .iter()
            .map(|(n, k)| format!("{n} ({k})"))
            .collect();
        return Err(Error::format(
            ckpt.path(),
            format!(
                "no EMA/raw weight pairs found (looked for every layout but custom); its \
                 subtrees: {}; name the EMA with --layout custom --model-prefix P \
                 --shadow-prefix Q, or deploy the weights as they are with --raw",
                subtrees.join(", ")
            ),
        ));
    }
    let strip = args.layout.strip();
    let deployed = plan::fold::unpaired(&ckpt, &strip)?;
    let record = json!({
        "command": "swap --deploy",
        "layout": null,
        "deployed": "raw",
        "input": ckpt.path(),
    });
    let mut base = ckpt.metadata().clone();
    base.remove("ema_tool");
    let plan = plan::swap::deploy(ckpt, deployed, args.out.dtype.map(Into::into), output)?;
    let what = format!(
        "deployed {} tensors as they are: no EMA/raw pairs",
        plan.tensors.len()
    );
    write(&plan, record, &base, 0, &what, args, started, rt)
}

/// Runs the copies of a swap or deploy plan on the CPU into `writer`, with a progress bar.
fn copy(plan: &Plan, writer: &Writer, quiet: bool, finite: bool, rt: &Runtime) -> Result<()> {
    let opts = fold::Options {
        finite,
        ..fold::Options::default()
    };
    let progress = progress(plan.input_bytes(), quiet);
    fold::execute(plan, &[writer], Device::Cpu, opts, &progress, rt)
}
