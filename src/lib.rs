//! ema-tool: offline exponential moving average and SWA of PyTorch checkpoints, and EMA/raw
//! weight management inside a checkpoint.
//!
//! The binary is a thin layer over this library: [`cli`] parses, [`cmd`] runs a subcommand,
//! [`checkpoint`] reads inputs, [`plan`] weighs them, [`fold`] produces output tensors and
//! [`output`] writes them atomically.

pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod docs;
pub mod dtype;
pub mod error;
pub mod fold;
pub mod layout;
pub mod output;
pub mod plan;

pub use error::{Error, Result};

/// Runs a parsed command line.
pub fn run(cli: &cli::Cli) -> Result<()> {
    use cli::Command;
    match &cli.command {
        Command::Ema(a) => cmd::ema::run(a),
        Command::Swa(a) => cmd::swa::run(a),
        Command::Swap(a) => cmd::swap::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Completions { shell } => {
            docs::write_completion(*shell, &mut std::io::stdout().lock());
            Ok(())
        }
    }
}
