//! The command line: clap types only. Doc comments are the help text and the man pages.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::codec::DType;
use crate::fold::{cpu::MAPPED_INPUTS, Device};
use crate::layout::{Layout, Prefixes, Side};
use crate::plan::choose::{Choice, Mode, StepRange};
use crate::plan::Order;
use crate::schedule::options::{EmaOptions, SwaOptions, Typed};

/// Offline exponential moving average and SWA of PyTorch checkpoints, and EMA/raw weight
/// management inside a checkpoint.
///
/// ema-tool folds a series of saved checkpoints into the average an OpenMMLab EMA hook
/// (mmengine, mmcv, mmdet) or mmengine's StochasticWeightAverage would have computed during
/// training, exactly, in one read of the inputs. It also swaps the EMA and raw weights that
/// hooks leave in a checkpoint and extracts deployable weights.
#[derive(Debug, Parser)]
#[command(
    name = "ema-tool",
    version,
    long_version = long_version(),
    propagate_version = true,
    max_term_width = 100
)]
#[command(
    after_help = "Exit status: 0 success, 1 failure (bad input, mismatch, I/O), 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Whether the command writes an output file (and so has a temporary file to remove if
    /// it is interrupted).
    pub fn writes_output(&self) -> bool {
        match &self.command {
            Command::Ema(_) | Command::Swa(_) | Command::Swap(_) | Command::Posthoc(_) => true,
            Command::Inspect(_) | Command::Completions { .. } => false,
        }
    }
}

/// What `--version` prints: the version, the git commit when built from a clone, and whether
/// the GPU path is compiled in (`-V` prints the version alone).
pub fn long_version() -> String {
    let mut text = env!("CARGO_PKG_VERSION").to_string();
    if let Some(commit) = option_env!("EMA_TOOL_GIT_COMMIT") {
        text.push_str(&format!("\ncommit: {commit}"));
    }
    text.push_str(if cfg!(feature = "cuda") {
        "\ncuda: yes (--device cuda; the CUDA driver is loaded at run time and compiles the embedded PTX)"
    } else {
        "\ncuda: no (built without the `cuda` feature)"
    });
    text
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fold a series of checkpoints into an exponential moving average.
    ///
    /// Inputs are ordered by step (metadata, or the last number in the file name), weights are
    /// computed from the strategy, and every input is read once. Floating-point tensors are
    /// averaged in at least f32 precision; integer and bool tensors are copied from the last
    /// checkpoint. Use --dry-run to see the plan.
    Ema(Box<EmaArgs>),
    /// Fold a series of checkpoints into a stochastic weight average (mmengine
    /// StochasticWeightAverage: the mean of the inputs taken every --interval).
    Swa(SwaArgs),
    // The help text shows names like `state_dict.<n>`, which are no HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Exchange the EMA and raw weights inside a checkpoint, or extract deployable weights.
    ///
    /// Layouts: mmengine (state_dict.<n> / ema_state_dict.module.<n>), mmcv
    /// ([state_dict.]<n> / [state_dict.]ema_<n with . → _>), timm (state_dict.<n> /
    /// state_dict_ema.<n>). Swapping twice gives back the input bit for bit.
    Swap(SwapArgs),
    /// Synthesise post-hoc EMAs from snapshots of power-function EMAs (EDM2, ema-pytorch
    /// PostHocEMA).
    ///
    /// The weights of the snapshots solve EDM2's least-squares problem (Karras et al. 2024,
    /// Algorithm 3) in f64; every output comes from one read of the snapshots.
    Posthoc(PosthocArgs),
    /// Show what a checkpoint holds: format, tensors, dtypes, metadata, step, EMA layout.
    ///
    /// Reads headers only, unless --stats asks for values.
    Inspect(InspectArgs),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Output options shared by every command that writes a file.
#[derive(Debug, Args, Clone)]
pub struct OutputArgs {
    /// Output file: `.safetensors`, or a PyTorch state dict when it ends in `.pth`, `.pt`,
    /// `.bin`, `.ckpt` or `.pth.tar` (loadable with `torch.load(path, weights_only=True)`;
    /// metadata is not kept there). `swap` from a PyTorch checkpoint to one keeps every other
    /// entry of the checkpoint. With a sweep, a template: `{decay}`, `{sigma_rel}`, ... (the
    /// option's name) are replaced by each value as typed.
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Split a safetensors output into Hugging Face-style shards of at most SIZE (`5GB`,
    /// `500MB`, `2GiB`): `<stem>-00001-of-0000N.safetensors` and
    /// `<stem>.safetensors.index.json` beside the output name. When everything fits in one
    /// shard, the output is one file.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_shard_size: Option<u64>,

    /// Replace the output file if it exists.
    #[arg(short, long)]
    pub force: bool,

    /// The output's format: `safetensors` (the default; a PyTorch state dict by the output's
    /// extension), or `dcp`, a torch distributed checkpoint directory `-o DIR` that
    /// `torch.distributed.checkpoint.load` reads back into the state dict's structure (for
    /// `ema`, `swa` and `posthoc`).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<OutFormat>,

    /// Dtype of floating-point output tensors (default: each tensor's input dtype).
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<OutDType>,

    /// Print no progress bar, summary or warnings.
    #[arg(short, long)]
    pub quiet: bool,

    /// Print a machine-readable JSON summary on stdout.
    #[arg(long)]
    pub json: bool,

    /// Fail if any input or output value of a float tensor is NaN or infinite.
    #[arg(long)]
    pub check_finite: bool,
}

/// The formats of `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Safetensors,
    Dcp,
}

/// Options shared by `ema` and `swa`.
#[derive(Debug, Args, Clone)]
pub struct FoldArgs {
    /// Checkpoints to fold: safetensors files, PyTorch checkpoints (`.pth`, `.pt`, `.bin`,
    /// `.ckpt`, `.pth.tar`, the legacy format too), pickles (`.pkl`), sharded checkpoints (a
    /// directory with an index, or the index) or model directories with one weights file.
    #[arg(required = true, value_name = "CKPT")]
    pub inputs: Vec<PathBuf>,

    #[command(flatten)]
    pub out: OutputArgs,

    /// Treat momentum as per training iteration: x_k holds over the iterations between the
    /// steps of x_{k-1} and x_k, and the schedule is applied at every one of them.
    #[arg(long)]
    pub per_iter: bool,

    /// Copy buffers (see --buffer-pattern) from the last checkpoint instead of averaging them
    /// (mmengine update_buffers=False, mmdet skip_buffers=True).
    #[arg(long)]
    pub skip_buffers: bool,

    /// Glob of buffer names for --skip-buffers (repeatable).
    #[arg(
        long,
        value_name = "GLOB",
        default_values_t = ["*.running_mean".to_string(), "*.running_var".to_string(), "*.num_batches_tracked".to_string()]
    )]
    pub buffer_pattern: Vec<String>,

    /// Only output tensors whose names match GLOB (repeatable; `*` matches any characters).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Leave out tensors whose names match GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// How to order the inputs.
    #[arg(long, value_enum, default_value_t = Order::Auto)]
    pub order: Order,

    #[command(flatten)]
    pub choose: ChooseArgs,

    #[command(flatten)]
    pub deploy: DeployArgs,

    /// Print the plan (order, steps, weights) and write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,

    /// Device that folds: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: Device,

    /// Worker threads (default: one per core).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,

    /// How many inputs (the first ones) the CPU fold reads through memory maps; the others are
    /// read with pread. A mapping costs less CPU on page-cached inputs, each keeps about 4 MiB
    /// resident; 0 reads every input with pread.
    #[arg(long, value_name = "N", default_value_t = MAPPED_INPUTS)]
    pub mapped_inputs: usize,
}

/// Folding the deployable weights of each input (`docs/layouts.md#deploy`).
#[derive(Debug, Args, Clone, Default)]
pub struct DeployArgs {
    /// Fold each input's deployable weights (the EMA side under the model's own names; for an
    /// input without EMA pairs, its model tensors) into a plain state dict: no optimizer, no
    /// counters.
    #[arg(long)]
    pub deploy: bool,

    /// With --deploy: fold the raw (non-EMA) side of each input instead.
    #[arg(long, requires = "deploy")]
    pub raw: bool,

    #[command(flatten)]
    pub layout: LayoutArgs,
}

/// Which of the ordered inputs to fold (`--dry-run` shows those dropped, and why).
#[derive(Debug, Args, Clone, Default)]
pub struct ChooseArgs {
    /// Keep the inputs whose step is in [A, B] (`1000:5000`; either end may be left out).
    #[arg(long, value_name = "A:B")]
    pub steps: Option<StepRange>,

    /// Keep the last N inputs (after --steps).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,

    /// Keep the N inputs with the best --metric (after --steps and --last), folded in their
    /// order.
    #[arg(long, value_name = "N", requires = "metric")]
    pub best: Option<usize>,

    /// The number that --best ranks by: a metadata entry (safetensors `__metadata__`, a plain
    /// value of a `.pth` such as timm's `metric`) or a one-element tensor (a Lightning
    /// ModelCheckpoint score); the end of a dotted name is enough when only one name ends so.
    #[arg(long, value_name = "KEY", requires = "best")]
    pub metric: Option<String>,

    /// Whether --best keeps the largest (accuracy) or the smallest (loss) values.
    #[arg(long, value_enum, default_value_t = Mode::Max, requires = "best")]
    pub mode: Mode,
}

impl ChooseArgs {
    /// The choice as the plan takes it.
    pub fn choice(&self) -> Choice {
        Choice {
            steps: self.steps,
            last: self.last,
            best: self.best,
            metric: self.metric.clone(),
            mode: self.mode,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct EmaArgs {
    #[command(flatten)]
    pub schedule: EmaOptions,

    #[command(flatten)]
    pub fold: FoldArgs,
}

#[derive(Debug, Args, Clone)]
pub struct SwaArgs {
    #[command(flatten)]
    pub schedule: SwaOptions,

    #[command(flatten)]
    pub fold: FoldArgs,
}

#[derive(Debug, Args, Clone)]
pub struct PosthocArgs {
    /// Snapshots of power-function EMAs: ema-pytorch `PostHocEMA` checkpoint folders (files
    /// `{ind}.{step}.pt`), EDM2's `<name>-<kimg>-<sigma_rel>.pkl` snapshots (or folders of
    /// them), or checkpoints whose metadata holds `step` and `sigma_rel` (or `gamma`).
    #[arg(required = true, value_name = "SNAPSHOT")]
    pub inputs: Vec<PathBuf>,

    /// Relative standard deviation of the EMA profile to synthesise (0 < S < 0.2887); a
    /// comma-separated list writes one output per value, from one read of the snapshots.
    #[arg(long, required = true, value_name = "S", value_delimiter = ',')]
    pub sigma_rel: Vec<Typed>,

    /// Training step to synthesise the EMA at [default: the latest snapshot's]; snapshots of
    /// later steps are left out, as EDM2 does.
    #[arg(long, value_name = "T")]
    pub step: Option<u64>,

    /// The sigma_rel of each profile of a PostHocEMA folder, by `ind`, in the order given to
    /// `PostHocEMA(sigma_rels=…)` (its files do not record them).
    #[arg(
        long,
        value_name = "S,…",
        value_delimiter = ',',
        conflicts_with = "snapshot_gammas"
    )]
    pub snapshot_sigma_rels: Vec<f64>,

    /// The exponent γ of each profile of a PostHocEMA folder, by `ind`, instead of
    /// --snapshot-sigma-rels.
    #[arg(long, value_name = "G,…", value_delimiter = ',')]
    pub snapshot_gammas: Vec<f64>,

    /// Leave the solved weights as they are instead of normalising them to sum 1 (what
    /// ema-pytorch's `synthesize_ema_model` does).
    #[arg(long)]
    pub no_normalize: bool,

    /// Copy buffers (see --buffer-pattern) from the last snapshot instead of averaging them
    /// (EDM2's reconstruction; ema-pytorch averages them).
    #[arg(long)]
    pub skip_buffers: bool,

    /// Glob of buffer names for --skip-buffers (repeatable).
    #[arg(
        long,
        value_name = "GLOB",
        default_values_t = ["*.running_mean".to_string(), "*.running_var".to_string(), "*.num_batches_tracked".to_string()]
    )]
    pub buffer_pattern: Vec<String>,

    /// Only output tensors whose names match GLOB (repeatable; `*` matches any characters).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Leave out tensors whose names match GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    #[command(flatten)]
    pub choose: ChooseArgs,

    #[command(flatten)]
    pub deploy: DeployArgs,

    #[command(flatten)]
    pub out: OutputArgs,

    /// Print the plan (snapshots, weights, condition number) and write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,

    /// Device that folds: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: Device,

    /// Worker threads (default: one per core).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,

    /// How many inputs (the first ones) the CPU fold reads through memory maps.
    #[arg(long, value_name = "N", default_value_t = MAPPED_INPUTS)]
    pub mapped_inputs: usize,
}

#[derive(Debug, Args, Clone)]
pub struct SwapArgs {
    /// The checkpoint: safetensors, PyTorch (`.pth`, `.pt`, `.bin`, `.ckpt`, `.pth.tar`) or
    /// sharded (a directory with an index, or the index).
    #[arg(value_name = "CKPT")]
    pub input: PathBuf,

    #[command(flatten)]
    pub out: OutputArgs,

    /// Write only the EMA weights, under the model's own names, as a plain state dict.
    #[arg(long, short = 'd')]
    pub deploy: bool,

    /// With --deploy: write the raw (non-EMA) weights instead.
    #[arg(long, requires = "deploy")]
    pub raw: bool,

    #[command(flatten)]
    pub layout: LayoutArgs,
}

/// Where the EMA and raw weights are in a checkpoint, and the names deployed.
#[derive(Debug, Args, Clone, Default)]
pub struct LayoutArgs {
    /// Which side holds the EMA weights (default: from the file's ema-tool metadata, else the
    /// layout's: mmengine, mmcv, lightning → model; the others → shadow).
    #[arg(long, value_enum)]
    pub ema_on: Option<Side>,

    /// Layout of the EMA/raw pair (default: detected).
    #[arg(long, value_enum)]
    pub layout: Option<Layout>,

    /// `--layout custom`: the prefix of the model side's names (`net.`).
    #[arg(long, value_name = "P")]
    pub model_prefix: Option<String>,

    /// `--layout custom`: the prefix of the shadow side's names (`net_ema.`).
    #[arg(long, value_name = "Q")]
    pub shadow_prefix: Option<String>,

    /// Prefix stripped from deployed names wherever it leads them, again and again
    /// (repeatable) [default: module. and _orig_mod.].
    #[arg(long, value_name = "P")]
    pub strip_prefix: Vec<String>,
}

impl LayoutArgs {
    /// The prefixes of `--layout custom`, when both are given.
    pub fn prefixes(&self) -> Option<Prefixes> {
        Some(Prefixes {
            model: self.model_prefix.clone()?,
            shadow: self.shadow_prefix.clone()?,
        })
    }

    /// `--strip-prefix`, or its default.
    pub fn strip(&self) -> Vec<String> {
        if self.strip_prefix.is_empty() {
            vec!["module.".into(), "_orig_mod.".into()]
        } else {
            self.strip_prefix.clone()
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct InspectArgs {
    /// Checkpoints to inspect.
    #[arg(required = true, value_name = "CKPT")]
    pub inputs: Vec<PathBuf>,

    /// List every tensor: name, dtype, shape, bytes.
    #[arg(long, short = 't')]
    pub tensors: bool,

    /// Read values: min, max, mean, std and NaN/Inf counts per tensor.
    #[arg(long)]
    pub stats: bool,

    /// Print one JSON document on stdout: `{"version", "files": [...]}`, one entry per
    /// checkpoint with `path`, `format`, `tensors`, `parameters`, `bytes`, `file_bytes`,
    /// `dtypes`, `metadata`, `step`, `step_source`, `layout`, `skipped` (`[{name, kind}]`:
    /// entries of a PyTorch checkpoint that are neither tensors nor plain values), for PyTorch
    /// checkpoints `tree` (`[{key, kind, tensors, bytes, values, skipped}]`, the top-level
    /// entries), for sharded ones `shards` (the files), for DCP directories `dcp` (`{files,
    /// chunks, sharded_tensors}`), and with --tensors or --stats `tensor_list` (with `chunks`
    /// per tensor of a DCP directory).
    #[arg(long)]
    pub json: bool,
}

/// Parses a size: a number with an optional unit, decimal (`KB`, `MB`, `GB`, `TB`, as
/// Hugging Face counts) or binary (`KiB`, `MiB`, `GiB`, `TiB`); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown unit `{u}` in `{s}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 5GB or 500MB"))?;
    let bytes = v * mult as f64;
    if !(bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!("`{s}` is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

/// Dtypes a floating-point output can be written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutDType {
    F32,
    F16,
    Bf16,
    F64,
}

impl From<OutDType> for DType {
    fn from(d: OutDType) -> DType {
        match d {
            OutDType::F32 => DType::F32,
            OutDType::F16 => DType::F16,
            OutDType::Bf16 => DType::BF16,
            OutDType::F64 => DType::F64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Strategy;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn strategy_aliases_parse() {
        let cli = Cli::try_parse_from([
            "ema-tool",
            "ema",
            "--strategy",
            "MomentumAnnealingEMA",
            "a.safetensors",
        ])
        .unwrap();
        match cli.command {
            Command::Ema(a) => assert_eq!(a.schedule.strategy, Strategy::Annealing),
            _ => panic!(),
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn momentum_and_decay_conflict() {
        let r = Cli::try_parse_from([
            "ema-tool",
            "ema",
            "--momentum",
            "0.1",
            "--decay",
            "0.9",
            "a",
        ]);
        assert!(r.is_err());
    }
}
