//! The `ema-tool` binary: parse, run, map the result to an exit status.

use std::process::ExitCode;

use clap::error::ErrorKind;
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
    raise_open_file_limit();
    let cli = match ema_tool::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if cli.writes_output() {
        if let Err(e) = ema_tool::output::remove_temporaries_on_signals() {
            eprintln!("ema-tool: warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted run may leave a .ema-tool-*.tmp file");
        }
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

/// Folding keeps every input open; a run over more than ~1000 checkpoints would hit the
/// default soft limit of open files, so raise it to the hard limit (as many servers do).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
