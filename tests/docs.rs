//! `man/` holds the man pages and completions generated from the clap definition; this test
//! fails when they drift. Regenerate with `EMA_TOOL_UPDATE_MAN=1 cargo test --test docs`. The
//! wheel installs them under `share/` from `python/ema_tool.data`, whose files link to `man/`.

use std::path::Path;

#[test]
fn man_pages_are_current() {
    let man = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    if std::env::var_os("EMA_TOOL_UPDATE_MAN").is_some() {
        ema_tool::docs::write_all(&man).unwrap();
    }
    let mut stale = Vec::new();
    for (rel, bytes) in ema_tool::docs::generate() {
        match std::fs::read(man.join(&rel)) {
            Ok(on_disk) if on_disk == bytes => {}
            _ => stale.push(rel),
        }
    }
    assert!(
        stale.is_empty(),
        "out of date in man/: {stale:?}; run `EMA_TOOL_UPDATE_MAN=1 cargo test --test docs`"
    );
}

#[test]
fn one_man_page_per_subcommand() {
    let names: Vec<String> = ema_tool::docs::generate()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for sub in ["ema", "swa", "swap", "inspect"] {
        assert!(names.contains(&format!("ema-tool-{sub}.1")), "{names:?}");
    }
}

/// Where the wheel installs each generated file under the environment's `share/`: the
/// directories that man, bash-completion, zsh and fish search below a prefix.
fn share_path(rel: &str) -> String {
    match rel.strip_prefix("completions/") {
        Some("ema-tool.bash") => "bash-completion/completions/ema-tool".to_string(),
        Some(zsh @ "_ema-tool") => format!("zsh/site-functions/{zsh}"),
        Some(fish @ "ema-tool.fish") => format!("fish/vendor_completions.d/{fish}"),
        Some(other) => panic!("no place under share/ for completions/{other}"),
        None => format!("man/man1/{rel}"),
    }
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, base, out);
        } else {
            let rel = path.strip_prefix(base).unwrap();
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn the_wheel_installs_every_man_page_and_completion() {
    // `python/ema_tool.data` is maturin's `data` directory; its files link to man/.
    let share = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ema_tool.data/data/share");
    let mut want: Vec<String> = Vec::new();
    for (rel, bytes) in ema_tool::docs::generate() {
        let dest = share_path(&rel);
        let got = std::fs::read(share.join(&dest))
            .unwrap_or_else(|e| panic!("share/{dest}: {e}; it should be a link to man/{rel}"));
        assert!(got == bytes, "share/{dest} is not man/{rel}");
        want.push(dest);
    }
    let mut have = Vec::new();
    files_under(&share, &share, &mut have);
    want.sort();
    have.sort();
    assert_eq!(have, want, "files under {}", share.display());
}
