//! Man pages and shell completions, generated from the clap definition.
//!
//! `man/` holds the generated files; the test `man_pages_are_current` regenerates them and
//! fails on drift (set `EMA_TOOL_UPDATE_MAN=1` to rewrite them).

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The generated files: (path relative to `man/`, contents).
pub fn generate() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // The long version names the commit and the features of this build: the pages would
    // differ between builds. They show the version alone.
    let cmd = Cli::command().long_version(None);
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .expect("rendering into memory cannot fail");
    out.push(("ema-tool.1".to_string(), buf));
    for sub in cmd.get_subcommands() {
        let name = format!("ema-tool-{}", sub.get_name());
        let sub = sub.clone().name(name.clone());
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub)
            .render(&mut buf)
            .expect("rendering into memory cannot fail");
        out.push((format!("{name}.1"), buf));
    }
    for (shell, file) in [
        (Shell::Bash, "completions/ema-tool.bash"),
        (Shell::Zsh, "completions/_ema-tool"),
        (Shell::Fish, "completions/ema-tool.fish"),
    ] {
        let mut buf = Vec::new();
        write_completion(shell, &mut buf);
        out.push((file.to_string(), buf));
    }
    out
}

/// Writes the completion script for `shell`.
pub fn write_completion(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "ema-tool", out);
}

/// Writes every generated file under `dir`.
pub fn write_all(dir: &Path) -> std::io::Result<()> {
    for (rel, bytes) in generate() {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, bytes)?;
    }
    Ok(())
}
