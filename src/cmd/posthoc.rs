//! `ema-tool posthoc`: synthesise post-hoc EMAs from snapshots of power-function EMAs
//! (`docs/posthoc.md`): find the snapshots and their profiles, solve for their weights, fold.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::fold::{add_choice, many, one, print_dropped, targets, Run, Targets};
use super::{set_threads, varying};
use crate::checkpoint::step::edm2_name;
use crate::checkpoint::Checkpoint;
use crate::cli::PosthocArgs;
use crate::error::{Error, Result};
use crate::fold::{self, Device};
use crate::plan::choose::{choose, keep};
use crate::plan::fold::{build, open_inputs, Options, Ordered};
use crate::plan::{Order, Output};
use crate::runtime::Runtime;
use crate::schedule::options::Typed;
use crate::schedule::posthoc::{Profile, System, Unsolvable, MAX_CONDITION};
use crate::schedule::{gamma_to_sigma_rel, sigma_rel_to_gamma};

/// The counters that ema-pytorch's snapshots hold as floats (it casts every tensor to its
/// `checkpoint_dtype`): copied from the last snapshot, never averaged.
const COUNTERS: [&str; 3] = ["initted", "step", "*.num_batches_tracked"];

/// One snapshot: where it is, its time and profile, and whether ema-pytorch wrote it.
struct Snapshot {
    path: PathBuf,
    profile: Profile,
    from_folder: bool,
}

/// `{ind}.{step}.pt`, as ema-pytorch's `PostHocEMA.checkpoint` names its files.
fn folder_name(p: &Path) -> Option<(usize, u64)> {
    let name = p.file_name()?.to_str()?;
    let (ind, step) = name.strip_suffix(".pt")?.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(ind) && digits(step)).then(|| Some((ind.parse().ok()?, step.parse().ok()?)))?
}

/// The profile exponents of a PostHocEMA folder, by `ind`.
fn folder_gammas(args: &PosthocArgs) -> Result<Vec<f64>> {
    if !args.snapshot_gammas.is_empty() {
        return Ok(args.snapshot_gammas.clone());
    }
    args.snapshot_sigma_rels
        .iter()
        .map(|&s| {
            sigma_rel_to_gamma(s).ok_or_else(|| {
                Error::usage(format!(
                    "--snapshot-sigma-rels: {s} is not in (0, 0.2887) (1/√12)"
                ))
            })
        })
        .collect()
}

/// The files of the inputs, each with its `(ind, step)` when it is a file of a PostHocEMA
/// folder.
type Found = (Vec<PathBuf>, Vec<Option<(usize, u64)>>);

/// Every snapshot of the inputs: the files of PostHocEMA folders, and checkpoints with
/// `step` and `sigma_rel` or `gamma` metadata (read from the opened checkpoints).
fn find_snapshots(args: &PosthocArgs) -> Result<Found> {
    let mut files = Vec::new();
    let mut named = Vec::new();
    for input in &args.inputs {
        if input.is_dir() {
            let mut found: Vec<(usize, u64, PathBuf)> = std::fs::read_dir(input)
                .map_err(|e| Error::io(input, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| folder_name(&p).map(|(i, s)| (i, s, p)))
                .collect();
            if found.is_empty() {
                // A directory of EDM2 snapshots: each file's name gives its profile.
                let mut edm2: Vec<PathBuf> = std::fs::read_dir(input)
                    .map_err(|e| Error::io(input, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && edm2_name(p).is_some())
                    .collect();
                for p in &edm2 {
                    if let Some(Err(e)) = edm2_name(p) {
                        return Err(Error::format(p, e));
                    }
                }
                if edm2.is_empty() {
                    return Err(Error::format(
                        input,
                        "holds no snapshot (PostHocEMA's {ind}.{step}.pt, or EDM2's \
                         <name>-<kimg>-<sigma_rel>.pkl)",
                    ));
                }
                edm2.sort();
                for p in edm2 {
                    files.push(p);
                    named.push(None);
                }
                continue;
            }
            found.sort();
            for (i, s, p) in found {
                files.push(p);
                named.push(Some((i, s)));
            }
        } else {
            files.push(input.clone());
            named.push(None);
        }
    }
    Ok((files, named))
}

/// A metadata number of `c`.
fn meta_number(c: &Checkpoint, key: &str) -> Option<f64> {
    c.metadata().get(key)?.trim().parse().ok()
}

/// The time and profile of an opened snapshot.
fn profile_of(
    c: &Checkpoint,
    named: Option<(usize, u64)>,
    gammas: &[f64],
) -> Result<(Profile, bool)> {
    if let Some((ind, step)) = named {
        if gammas.is_empty() {
            return Err(Error::usage(format!(
                "{}: a PostHocEMA snapshot does not record its profile; pass the folder's \
                 --snapshot-sigma-rels (or --snapshot-gammas), in the order given to PostHocEMA",
                c.path().display()
            )));
        }
        let gamma = *gammas.get(ind).ok_or_else(|| {
            Error::usage(format!(
                "{}: profile {ind}, but --snapshot-sigma-rels names {} profiles",
                c.path().display(),
                gammas.len()
            ))
        })?;
        return Ok((
            Profile {
                t: step as f64,
                gamma,
            },
            true,
        ));
    }
    if let Some(named) = edm2_name(c.path()) {
        let (nimg, std) = named.map_err(|e| Error::format(c.path(), e))?;
        let gamma = sigma_rel_to_gamma(std).ok_or_else(|| {
            Error::format(
                c.path(),
                format!("names sigma_rel {std}, which is not in (0, 0.2887)"),
            )
        })?;
        return Ok((
            Profile {
                t: nimg as f64,
                gamma,
            },
            false,
        ));
    }
    let t = meta_number(c, "step").ok_or_else(|| {
        Error::format(
            c.path(),
            "is not a snapshot: its metadata has no `step` (and its name is neither \
             {ind}.{step}.pt nor <name>-<kimg>-<sigma_rel>.pkl)",
        )
    })?;
    let gamma = match (meta_number(c, "sigma_rel"), meta_number(c, "gamma")) {
        (Some(s), _) => sigma_rel_to_gamma(s).ok_or_else(|| {
            Error::format(
                c.path(),
                format!("metadata sigma_rel {s} is not in (0, 0.2887)"),
            )
        })?,
        (None, Some(g)) => g,
        (None, None) => {
            return Err(Error::format(
                c.path(),
                "is not a snapshot: its metadata has no `sigma_rel` or `gamma`",
            ))
        }
    };
    Ok((Profile { t, gamma }, false))
}

/// Runs `posthoc`.
pub fn run(args: &PosthocArgs, rt: &Runtime) -> Result<()> {
    let started = Instant::now();
    set_threads(args.threads)?;
    let mut swept = Vec::with_capacity(args.sigma_rel.len());
    for s in &args.sigma_rel {
        let gamma = sigma_rel_to_gamma(s.value).ok_or_else(|| {
            Error::usage(format!(
                "--sigma-rel must be in (0, 0.2887) (1/√12), got {}",
                s.text
            ))
        })?;
        swept.push((s, gamma));
    }
    let values: Vec<Vec<(String, String)>> = swept
        .iter()
        .map(|(s, _)| vec![("sigma_rel".to_string(), s.text.clone())])
        .collect();
    let (files, named) = find_snapshots(args)?;
    let targets = targets(&args.out, "posthoc", &values, &files, args.dry_run, rt)?;
    let result = run_to(args, rt, started, &swept, &values, files, named, &targets);
    if result.is_err() {
        targets.remove_created(rt);
    }
    result
}

/// [`run`] once the targets are checked.
#[allow(clippy::too_many_arguments)]
fn run_to(
    args: &PosthocArgs,
    rt: &Runtime,
    started: Instant,
    swept: &[(&Typed, f64)],
    values: &[Vec<(String, String)>],
    files: Vec<PathBuf>,
    named: Vec<Option<(usize, u64)>>,
    targets: &Targets,
) -> Result<()> {
    if !args.dry_run {
        if let Device::Cuda(n) = args.device {
            fold::cuda::check_device(n)?;
        }
    }
    let gammas = folder_gammas(args)?;
    let opened = open_inputs(&files)?;
    let mut snaps = Vec::with_capacity(opened.len());
    for (c, n) in opened.into_iter().zip(named) {
        let (profile, from_folder) = profile_of(&c, n, &gammas)?;
        snaps.push((
            Snapshot {
                path: c.path().to_path_buf(),
                profile,
                from_folder,
            },
            c,
        ));
    }
    // EDM2's order: by time, then by sigma_rel; the last snapshot gives what is copied.
    snaps.sort_by(|(a, _), (b, _)| {
        let key = |s: &Snapshot| (s.profile.t, gamma_to_sigma_rel(s.profile.gamma));
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let latest = snaps
        .iter()
        .map(|s| s.0.profile.t)
        .fold(f64::NEG_INFINITY, f64::max);
    let step = match args.step {
        Some(t) if t as f64 > latest => {
            return Err(Error::usage(format!(
                "--step {t} is after the last snapshot (step {latest})"
            )))
        }
        Some(t) => t as f64,
        None => latest,
    };
    // Snapshots of later steps are left out, as EDM2 does (ema-pytorch keeps them).
    snaps.retain(|(s, _)| s.profile.t > 0.0 && s.profile.t <= step);
    if snaps.is_empty() {
        return Err(Error::usage(format!(
            "no snapshot at or before step {step}"
        )));
    }
    let chosen = {
        let refs: Vec<&Checkpoint> = snaps.iter().map(|(_, c)| c).collect();
        choose(&refs, &args.choose.choice())?
    };
    let snaps = keep(snaps, &chosen);
    let profiles: Vec<Profile> = snaps.iter().map(|(s, _)| s.profile).collect();
    let system = System::new(&profiles).map_err(|e| unsolvable(e, &snaps))?;
    let normalize = !args.no_normalize;
    let varying = varying(values);
    let outputs: Vec<Output> = swept
        .iter()
        .zip(&targets.files)
        .zip(values)
        .map(|(((_, gamma), target), v)| Output {
            target: target.clone(),
            params: v
                .iter()
                .filter(|(n, _)| varying.contains(n))
                .cloned()
                .collect(),
            weights: system.weights(
                Profile {
                    t: step,
                    gamma: *gamma,
                },
                normalize,
            ),
        })
        .collect();
    let any_folder = snaps.iter().any(|(s, _)| s.from_folder);
    let info: Vec<Snapshot> = snaps
        .iter()
        .map(|(s, _)| Snapshot {
            path: s.path.clone(),
            profile: s.profile,
            from_folder: s.from_folder,
        })
        .collect();
    let companions = match (args.dry_run, snaps.last()) {
        (false, Some((_, last))) => targets.companions(last, &files, args.out.force, rt)?,
        _ => Vec::new(),
    };
    let ordered = Ordered {
        inputs: snaps.into_iter().map(|(_, c)| c).collect(),
        order: Order::Step,
        warning: None,
    };
    let deploy = super::fold::deploy_of(&args.deploy);
    let copy: Vec<String> = if any_folder {
        COUNTERS.iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    };
    let opts = Options {
        include: &args.include,
        exclude: &args.exclude,
        skip_buffers: args.skip_buffers,
        buffer_pattern: &args.buffer_pattern,
        copy: &copy,
        dtype: args.out.dtype.map(Into::into),
        deploy: deploy.as_ref().map(|d| d.get()),
    };
    let plan = build(ordered, outputs, &opts)?;
    let params: Vec<Value> = swept
        .iter()
        .map(|(s, gamma)| {
            json!({
                "strategy": "posthoc",
                "reference": "solve_posthoc_coefficients",
                "sigma_rel": s.value,
                "gamma": gamma,
                "step": number(step),
                "normalize": normalize,
            })
        })
        .collect();
    let snapshots_json = |o: Option<usize>| -> Vec<Value> {
        info.iter()
            .enumerate()
            .map(|(i, s)| {
                let mut v = json!({
                    "path": s.path,
                    "step": number(s.profile.t),
                    "sigma_rel": gamma_to_sigma_rel(s.profile.gamma),
                    "gamma": s.profile.gamma,
                });
                if let Some(o) = o {
                    v["weight"] = json!(plan.outputs[o].weights[i]);
                }
                v
            })
            .collect()
    };
    let records: Vec<Value> = (0..plan.outputs.len())
        .map(|o| {
            json!({
                "command": "posthoc",
                "params": params[o],
                "condition": system.condition,
                "inputs": snapshots_json(Some(o)),
            })
        })
        .collect();
    if args.dry_run && !args.out.json {
        print_posthoc_plan(&plan, &info, step, system.condition, normalize);
        print_dropped(&chosen);
        return Ok(());
    }
    // The outputs' step is the one synthesised.
    let meta = [("step".to_string(), format!("{step}"))];
    let how = Run {
        out: &args.out,
        dry_run: args.dry_run,
        device: args.device,
        mapped_inputs: args.mapped_inputs,
        started,
        metadata: &meta,
        chosen: &chosen,
        plain: args.deploy.deploy,
        companions: &companions,
        dirs: &targets.published,
    };
    if plan.outputs.len() == 1 {
        let record = records.into_iter().next().expect("one output");
        return one(&plan, record, &params[0], &how, rt);
    }
    let summary = json!({
        "command": "posthoc",
        "step": number(step),
        "normalize": normalize,
        "condition": system.condition,
        "snapshots": snapshots_json(None),
    });
    let mut summary = summary;
    add_choice(&mut summary, &chosen);
    let refs: Vec<&Value> = params.iter().collect();
    many(&plan, records, &refs, summary, &how, rt)
}

/// `x` as a JSON integer when it is one.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The error for a system that cannot be solved, naming the snapshots.
fn unsolvable(e: Unsolvable, snaps: &[(Snapshot, Checkpoint)]) -> Error {
    match e {
        Unsolvable::Empty => Error::usage("no snapshot to synthesise from"),
        Unsolvable::Invalid(i) => Error::format(
            &snaps[i].0.path,
            "a snapshot's step and profile exponent must be positive",
        ),
        Unsolvable::IllConditioned { condition, pair } => {
            let (a, b) = (&snaps[pair.0].0, &snaps[pair.1].0);
            let why = if a.profile == b.profile {
                "the same step and profile"
            } else {
                "nearly the same profile"
            };
            let cond = if condition.is_finite() {
                format!("condition number {condition:.3e} > {MAX_CONDITION:e}")
            } else {
                "singular".to_string()
            };
            Error::format(
                &a.path,
                format!(
                    "and {} have {why} (step {}, sigma_rel {:.4}): the snapshots' system is \
                     {cond}; leave one of them out",
                    b.path.display(),
                    b.profile.t,
                    gamma_to_sigma_rel(b.profile.gamma)
                ),
            )
        }
    }
}

/// The human-readable plan of `posthoc --dry-run`.
fn print_posthoc_plan(
    plan: &crate::plan::Plan,
    snaps: &[Snapshot],
    step: f64,
    condition: f64,
    normalize: bool,
) {
    println!(
        "posthoc   step {step}, {} snapshots, condition number {condition:.3e}, weights {}",
        snaps.len(),
        if normalize {
            "normalised to sum 1"
        } else {
            "as solved"
        }
    );
    let mut head = format!("{:>4}  {:>10}  {:>9}", "#", "step", "sigma_rel");
    for o in &plan.outputs {
        let s = o
            .params
            .first()
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "weight".to_string());
        head.push_str(&format!("  {:<13}", format!("σ {s}")));
    }
    println!("{head}  file");
    for (i, s) in snaps.iter().enumerate() {
        let mut row = format!(
            "{i:>4}  {:>10}  {:>9.4}",
            s.profile.t,
            gamma_to_sigma_rel(s.profile.gamma)
        );
        for o in &plan.outputs {
            row.push_str(&format!("  {:<13.6e}", o.weights[i]));
        }
        println!("{row}  {}", s.path.display());
    }
    for o in &plan.outputs {
        println!("output    {}", o.target.display());
    }
    let (folded, copied) = plan.counts();
    println!("tensors   {folded} averaged, {copied} copied from the last snapshot");
}
