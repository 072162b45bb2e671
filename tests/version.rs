//! `--version` names the version, the commit of a build from a clone and whether the GPU path
//! is compiled in; `-V` is the version alone.

mod common;

use std::process::Command;

use common::*;

#[test]
fn short_version_is_one_line() {
    let out = run(["-V"]);
    ok(&out);
    assert_eq!(
        stdout(&out),
        format!("ema-tool {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn long_version_names_the_features_compiled_in() {
    let out = run(["--version"]);
    ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("ema-tool {}", env!("CARGO_PKG_VERSION")),
        "{text}"
    );
    let cuda = lines.iter().find(|l| l.starts_with("cuda: ")).expect(&text);
    let want = if cfg!(feature = "cuda") {
        "cuda: yes"
    } else {
        "cuda: no"
    };
    assert!(cuda.starts_with(want), "{text}");
    // A subcommand's --version is the same text under its own name.
    let sub = stdout(&run(["inspect", "--version"]));
    assert_eq!(sub.replacen("ema-tool-inspect ", "ema-tool ", 1), text);
}

#[test]
fn long_version_names_the_commit_of_a_clone() {
    let out = stdout(&run(["--version"]));
    let commit = out.lines().find_map(|l| l.strip_prefix("commit: "));
    let head = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success() && root().join(".git").exists())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    // The binary was built at HEAD (cargo reruns build.rs when HEAD moves); without git or a
    // clone there is no commit line.
    assert_eq!(commit.map(str::to_string), head, "{out}");
}
