//! ema-tool: offline exponential moving average and SWA of PyTorch checkpoints, and EMA/raw
//! weight management inside a checkpoint.
//!
//! The binary is a thin layer over this library; `ARCHITECTURE.md` draws the layers. From the
//! bottom: [`codec`] (byte formats), [`checkpoint`] (reading) and `output` (writing),
//! `layout` (EMA/raw pairs) and [`schedule`] (weights), [`plan`] (what each output tensor is
//! made of), [`fold`] (executing a plan on a device), [`cli`] and `cmd` (the commands).
//! [`runtime`] owns the process-wide state and is handed to whatever needs it.

pub mod checkpoint;
pub mod cli;
pub(crate) mod cmd;
pub mod codec;
pub mod docs;
pub mod error;
pub mod fold;
pub mod fuzzing;
pub(crate) mod layout;
pub(crate) mod output;
pub mod plan;
pub mod runtime;
pub mod schedule;
pub mod text;

#[cfg(test)]
mod testing;

pub use error::{Error, Result};

/// Runs a parsed command line.
pub fn run(cli: &cli::Cli, rt: &runtime::Runtime) -> Result<()> {
    use cli::Command;
    match &cli.command {
        Command::Ema(a) => cmd::ema::run(a, rt),
        Command::Swa(a) => cmd::swa::run(a, rt),
        Command::Swap(a) => cmd::swap::run(a, rt),
        Command::Posthoc(a) => cmd::posthoc::run(a, rt),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Completions { shell } => {
            docs::write_completion(*shell, &mut std::io::stdout().lock());
            Ok(())
        }
    }
}
