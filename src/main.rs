//! The `ema-tool` binary: parse, run, map the result to an exit status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE; restore the default so `ema-tool inspect | head` exits quietly.
    // SAFETY: setting a signal disposition to SIG_DFL at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = ema_tool::cli::Cli::parse();
    match ema_tool::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ema-tool: {err}");
            ExitCode::from(err.exit_code() as u8)
        }
    }
}
