//! `ema-tool inspect`: what a checkpoint holds, from its header alone unless `--stats`.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use super::print_json;
use crate::checkpoint::{Checkpoint, Format, Open, TensorInfo};
use crate::cli::InspectArgs;
use crate::codec::convert::decode;
use crate::error::Result;
use crate::layout;
use crate::text::human_bytes;

/// Value statistics of one tensor.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub nan: u64,
    pub inf: u64,
}

/// Elements per read while computing statistics.
const STATS_CHUNK: u64 = 64 * 1024;

/// Reads tensor `t` of `c` and computes its statistics over the finite values.
pub fn tensor_stats(c: &Checkpoint, t: &TensorInfo) -> Result<Stats> {
    let size = t.dtype.size() as u64;
    let n = t.numel();
    let mut raw = Vec::new();
    let mut vals = Vec::new();
    let (mut count, mut mean, mut m2) = (0u64, 0.0f64, 0.0f64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut s = Stats::default();
    let mut start = 0;
    while start < n {
        let len = STATS_CHUNK.min(n - start);
        raw.resize((len * size) as usize, 0);
        vals.resize(len as usize, 0.0);
        c.read_at(t, start * size, &mut raw)?;
        decode(t.dtype, &raw, &mut vals);
        for &v in &vals {
            if v.is_nan() {
                s.nan += 1;
            } else if v.is_infinite() {
                s.inf += 1;
            } else {
                // Welford's update: stable for large tensors.
                count += 1;
                let d = v - mean;
                mean += d / count as f64;
                m2 += d * (v - mean);
                min = min.min(v);
                max = max.max(v);
            }
        }
        start += len;
    }
    if count > 0 {
        s.min = Some(min);
        s.max = Some(max);
        s.mean = Some(mean);
        s.std = Some(if count > 1 {
            (m2 / (count - 1) as f64).sqrt()
        } else {
            0.0
        });
    }
    Ok(s)
}

/// The description of one checkpoint, as JSON (the `files[]` entries of `--json`).
pub fn describe(c: &Checkpoint, tensors: bool, stats: bool) -> Result<Value> {
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for t in c.tensors() {
        *dtypes.entry(t.dtype.to_string()).or_default() += 1;
    }
    let parameters: u64 = c.tensors().iter().map(TensorInfo::numel).sum();
    let path = c.path().display();
    let layout = layout::detect(c).map(|p| {
        let deploy = format!("ema-tool swap --deploy {path} -o model.safetensors");
        json!({
            "name": p.layout,
            "pairs": p.pairs.len(),
            "ema_on": p.ema_side(c, None),
            "model_prefix": p.model_prefix,
            "shadow_prefix": p.shadow_prefix,
            "absent": p.absent(),
            "pair_names": p.pairs.iter().map(|x| json!([c.tensors()[x.model].name, c.tensors()[x.shadow].name])).collect::<Vec<_>>(),
            "deploy": deploy,
        })
    });
    let subtrees: Vec<Value> = layout::subtrees(c)
        .into_iter()
        .map(|(name, tensors)| json!({"name": name, "tensors": tensors}))
        .collect();
    let custom = layout
        .is_none()
        .then(|| layout::mirrored_subtrees(c))
        .flatten()
        .map(|(m, s)| {
            format!(
            "ema-tool swap --deploy --layout custom --model-prefix {m} --shadow-prefix {s} {path} \
             -o model.safetensors"
        )
        });
    let mut v = json!({
        "path": c.path(),
        "format": c.format(),
        "tensors": c.tensors().len(),
        "parameters": parameters,
        "bytes": c.total_bytes(),
        "file_bytes": c.file_bytes(),
        "dtypes": dtypes,
        "metadata": c.metadata(),
        "step": c.step(),
        "step_source": c.step_source(),
        "layout": layout,
        "subtrees": subtrees,
        "custom_layout": custom,
        "skipped": c.skipped(),
    });
    if c.torch().is_some() {
        // The top-level entries of the pickle: which hold tensors, values, skipped objects.
        v["tree"] = json!(c.torch().map(|t| &t.top));
    }
    if let Some(d) = c.dcp() {
        // The ranks' files, and how the tensors are split across them.
        v["dcp"] = json!({
            "files": d.files,
            "chunks": d.chunks.iter().sum::<usize>(),
            "sharded_tensors": d.chunks.iter().filter(|&&n| n > 1).count(),
        });
    }
    if c.format() == Format::Sharded {
        let mut shards: Vec<&std::path::Path> = Vec::new();
        for f in c.files() {
            if !shards.contains(&f.path()) {
                shards.push(f.path());
            }
        }
        v["shards"] = json!(shards);
    }
    if tensors || stats {
        let stats_list: Vec<Option<Stats>> = if stats {
            c.tensors()
                .par_iter()
                .map(|t| tensor_stats(c, t).map(Some))
                .collect::<Result<Vec<_>>>()
                // Statistics of a file rewritten while we read it would be of neither version.
                .and_then(|s| c.check_unchanged().map(|()| s))?
        } else {
            vec![None; c.tensors().len()]
        };
        v["tensor_list"] = c
            .tensors()
            .iter()
            .zip(stats_list)
            .map(|(t, s)| {
                let mut e = json!({
                    "name": t.name,
                    "dtype": t.dtype.to_string(),
                    "shape": t.shape,
                    "bytes": t.len,
                });
                if let Some(d) = c.dcp() {
                    let i = c.position(&t.name).unwrap_or(0);
                    e["chunks"] = json!(d.chunks.get(i).copied().unwrap_or(1));
                }
                if let Some(s) = s {
                    e["stats"] = json!(s);
                }
                e
            })
            .collect();
    }
    Ok(v)
}

/// Runs `inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let mut files = Vec::new();
    for p in &args.inputs {
        // Statistics read every value; otherwise the header is all there is to read.
        let how = if args.stats {
            Open::Readable
        } else {
            Open::HeaderOnly
        };
        let c = Checkpoint::open(p, how)?;
        let d = describe(&c, args.tensors, args.stats)?;
        if !args.json {
            print_human(&d);
        }
        files.push(d);
    }
    if args.json {
        print_json(&json!({ "version": super::VERSION, "files": files }))?;
    }
    Ok(())
}

/// Metadata entries printed by `inspect` without `--json`.
const MAX_METADATA_LINES: usize = 40;

/// The top-level entries of a PyTorch checkpoint, one line each (a plain state dict in one).
fn print_tree(tree: &[Value]) {
    if tree.is_empty() {
        return;
    }
    let n = |e: &Value, k: &str| e[k].as_u64().unwrap_or(0);
    if tree.iter().all(|e| e["kind"] == "tensor") {
        let bytes: u64 = tree.iter().map(|e| n(e, "bytes")).sum();
        println!(
            "  tree        a plain state dict of {} tensors ({})",
            tree.len(),
            human_bytes(bytes)
        );
        return;
    }
    for (i, e) in tree.iter().enumerate() {
        let mut parts = vec![e["kind"].as_str().unwrap_or("?").to_string()];
        if n(e, "tensors") > 0 {
            parts.push(format!(
                "{} tensors ({})",
                n(e, "tensors"),
                human_bytes(n(e, "bytes"))
            ));
        }
        if n(e, "values") > 0 {
            parts.push(format!("{} values", n(e, "values")));
        }
        if n(e, "skipped") > 0 {
            parts.push(format!("{} skipped", n(e, "skipped")));
        }
        println!(
            "  {:<12}{}: {}",
            if i == 0 { "tree" } else { "" },
            e["key"].as_str().unwrap_or("?"),
            parts.join(", ")
        );
    }
}

fn print_human(d: &Value) {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    println!("{}", s(&d["path"]));
    println!("  format      {}", s(&d["format"]));
    println!(
        "  tensors     {} ({} parameters, {})",
        d["tensors"],
        d["parameters"],
        human_bytes(d["bytes"].as_u64().unwrap_or(0))
    );
    let dtypes: Vec<String> = d["dtypes"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!("  dtypes      {}", dtypes.join(", "));
    match (&d["step"], &d["step_source"]) {
        (Value::Null, _) => println!("  step        -"),
        (step, Value::Object(src)) => {
            let from = src
                .get("metadata")
                .map(|k| format!("metadata `{}`", s(k)))
                .unwrap_or_default();
            println!("  step        {step} ({from})");
        }
        (step, src) => println!("  step        {step} ({})", s(src).replace('_', " ")),
    }
    if let Some(m) = d["metadata"].as_object() {
        // A .pth holds every plain value of its meta, optimizer and loop state; the first
        // ones are enough here, --json has them all.
        for (k, v) in m.iter().take(MAX_METADATA_LINES) {
            // One line per key: control characters (a config's newlines) become spaces.
            let v: String = s(v)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let v = if v.chars().count() > 80 {
                format!("{}…", v.chars().take(77).collect::<String>())
            } else {
                v
            };
            println!("  metadata    {k} = {v}");
        }
        if m.len() > MAX_METADATA_LINES {
            println!(
                "  metadata    … and {} more (--json shows all)",
                m.len() - MAX_METADATA_LINES
            );
        }
    }
    match &d["layout"] {
        Value::Null => {
            println!("  layout      no EMA/raw pairs");
            let subtrees = d["subtrees"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if subtrees.len() > 1 {
                let list: Vec<String> = subtrees
                    .iter()
                    .map(|t| format!("{} ({} tensors)", s(&t["name"]), t["tensors"]))
                    .collect();
                println!("  subtrees    {}", list.join(", "));
                match d["custom_layout"].as_str() {
                    Some(cmd) => println!("  hint        if one holds the EMA: {cmd}"),
                    None => println!(
                        "  hint        an EMA under other names: --layout custom \
                         --model-prefix P --shadow-prefix Q"
                    ),
                }
            }
        }
        l => {
            match l["absent"].as_str() {
                Some(side) => println!(
                    "  layout      {}: the {} side only ({}…), no {side} side",
                    s(&l["name"]),
                    if side == "model" { "shadow" } else { "model" },
                    if side == "model" {
                        s(&l["shadow_prefix"])
                    } else {
                        s(&l["model_prefix"])
                    },
                ),
                None => println!(
                    "  layout      {}: {} pairs, EMA on the {} side",
                    s(&l["name"]),
                    l["pairs"],
                    s(&l["ema_on"])
                ),
            }
            println!("  deploy      {}", s(&l["deploy"]));
        }
    }
    if let Some(tree) = d["tree"].as_array() {
        print_tree(tree);
    }
    if let Some(shards) = d["shards"].as_array() {
        println!("  shards      {}", shards.len());
    }
    if let Some(dcp) = d.get("dcp") {
        let files: Vec<String> = dcp["files"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        println!(
            "  chunks      {} ({} tensors in more than one), in {} files: {}",
            dcp["chunks"],
            dcp["sharded_tensors"],
            files.len(),
            files.join(", ")
        );
    }
    if let Some(skipped) = d["skipped"].as_array() {
        for e in skipped {
            println!("  skipped     {} ({})", s(&e["name"]), s(&e["kind"]));
        }
    }
    if let Some(list) = d["tensor_list"].as_array() {
        for t in list {
            let shape: Vec<String> = t["shape"]
                .as_array()
                .map(|a| a.iter().map(|x| x.to_string()).collect())
                .unwrap_or_default();
            let mut line = format!(
                "    {:<48} {:<5} [{}] {}",
                s(&t["name"]),
                s(&t["dtype"]),
                shape.join(", "),
                human_bytes(t["bytes"].as_u64().unwrap_or(0))
            );
            if let Some(n) = t.get("chunks").and_then(Value::as_u64).filter(|&n| n > 1) {
                line.push_str(&format!("  ({n} chunks)"));
            }
            if let Some(st) = t.get("stats") {
                let f = |k: &str| st[k].as_f64().map_or("-".into(), |x| format!("{x:.6e}"));
                line.push_str(&format!(
                    "  min {} max {} mean {} std {} nan {} inf {}",
                    f("min"),
                    f("max"),
                    f("mean"),
                    f("std"),
                    st["nan"],
                    st["inf"]
                ));
            }
            println!("{line}");
        }
    }
}
