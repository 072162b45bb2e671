//! `man/` holds the man pages and completions generated from the clap definition; this test
//! fails when they drift. Regenerate with `EMA_TOOL_UPDATE_MAN=1 cargo test --test docs`.

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
