//! The `ema-tool` binary: set up the process, parse, run, map the result to an exit status.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use ema_tool::runtime::Runtime;

/// Longest error message printed; a hostile file cannot make it longer.
const MAX_MESSAGE: usize = 2000;

fn main() -> ExitCode {
    let rt = Runtime::install();
    let cli = match ema_tool::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if cli.writes_output() {
        if let Err(e) = rt.remove_temporaries_on_signals() {
            eprintln!("ema-tool: warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted run may leave a .ema-tool-*.tmp file");
        }
    }
    match ema_tool::run(&cli, &rt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "ema-tool: {}",
                ema_tool::text::one_line(&err.to_string(), MAX_MESSAGE)
            );
            ExitCode::from(err.exit_code() as u8)
        }
    }
}

/// Help and version go to stdout as clap prints them; a usage error becomes one line on stderr
/// (`ema-tool: <what> (see --help)`) and exit status 2, like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            let text = e.render().to_string();
            // The first paragraph of clap's message, on one line.
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            eprintln!(
                "ema-tool: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            ExitCode::from(2)
        }
    }
}
