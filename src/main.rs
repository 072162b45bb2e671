//! The `ema-tool` binary: parse, run, map the result to an exit status.

use std::process::ExitCode;

use clap::Parser;

/// Longest error message printed; a hostile file cannot make it longer.
const MAX_MESSAGE: usize = 2000;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE; restore the default so `ema-tool inspect | head` exits quietly.
    // Ignore SIGXFSZ, so that a write past `ulimit -f` fails with EFBIG (reported, temporary
    // file removed) instead of killing the process.
    // SAFETY: setting signal dispositions at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = ema_tool::cli::Cli::parse();
    if let Err(e) = ema_tool::output::remove_temporaries_on_signals() {
        eprintln!("ema-tool: warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted run may leave a .ema-tool-*.tmp file");
    }
    match ema_tool::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "ema-tool: {}",
                ema_tool::error::one_line(&err.to_string(), MAX_MESSAGE)
            );
            ExitCode::from(err.exit_code() as u8)
        }
    }
}
