//! The corpus of broken inputs (`tests/data/broken/`): every file is refused by every command
//! with exit status 1 and a one-line message saying what is wrong, and nothing is written.
//! Well-formed files with edge cases (zero-size and scalar tensors, deep nesting, NaN, shapes
//! that differ between inputs) give the result or the error that the table says.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_one_line_error, code, corpus, entries, run, stderr};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/broken")
}

/// Broken files and a fragment of the message each must give (exit status 1 for all).
const BROKEN: &[(&str, &str)] = &[
    ("empty.safetensors", "0 bytes, too short for a header"),
    (
        "truncated-in-length.safetensors",
        "5 bytes, too short for a header",
    ),
    (
        "truncated-in-header.safetensors",
        "truncated: header length",
    ),
    (
        "truncated-at-data.safetensors",
        "truncated: data ends at byte",
    ),
    (
        "truncated-in-data.safetensors",
        "truncated: data ends at byte",
    ),
    (
        "truncated-last-byte.safetensors",
        "truncated: data ends at byte",
    ),
    (
        "header-over-cap.safetensors",
        "header length 200000000 exceeds the 100000000-byte limit",
    ),
    (
        "header-longer-than-file.safetensors",
        "header length 1000 is larger than the 8 bytes",
    ),
    ("text-file.safetensors", "exceeds the 100000000-byte limit"),
    ("corrupt-json.safetensors", "corrupt header: invalid JSON"),
    ("not-utf8.safetensors", "corrupt header: invalid UTF-8"),
    (
        "header-not-object.safetensors",
        "corrupt header: not a JSON object",
    ),
    (
        "header-string.safetensors",
        "corrupt header: not a JSON object",
    ),
    (
        "entry-not-object.safetensors",
        "tensor `a`: header entry is not an object",
    ),
    (
        "missing-dtype.safetensors",
        "tensor `a`: header entry has no dtype",
    ),
    (
        "unknown-dtype.safetensors",
        "tensor `a`: unsupported dtype F33",
    ),
    (
        "long-dtype.safetensors",
        "tensor `a`: unsupported dtype XXXX",
    ),
    (
        "missing-shape.safetensors",
        "tensor `a`: header entry has no shape",
    ),
    (
        "negative-dim.safetensors",
        "shape is not a list of non-negative integers",
    ),
    (
        "fractional-dim.safetensors",
        "shape is not a list of non-negative integers",
    ),
    (
        "too-many-dims.safetensors",
        "shape has more than 64 dimensions",
    ),
    (
        "shape-overflow.safetensors",
        "shape [4294967296, 4294967296, 4294967296] overflows",
    ),
    (
        "offsets-not-pair.safetensors",
        "data_offsets is not a pair of non-negative integers",
    ),
    (
        "offsets-reversed.safetensors",
        "data_offsets [4, 0] hold 0 bytes, but F32 [1] needs 4",
    ),
    (
        "wrong-dtype-size.safetensors",
        "data_offsets [0, 8] hold 8 bytes, but F32 [3] needs 12",
    ),
    (
        "overlapping-offsets.safetensors",
        "tensor `b`: data_offsets [4, 12] overlaps the previous tensor",
    ),
    (
        "gap-between-offsets.safetensors",
        "tensor `b`: data_offsets [12, 20] leaves a gap before it",
    ),
    (
        "offsets-past-end.safetensors",
        "tensor `b`: truncated: data ends at byte 136 but the file has 132 bytes",
    ),
    ("offsets-huge.safetensors", "leaves a gap before it"),
    (
        "trailing-bytes.safetensors",
        "4 bytes after the last tensor are not described by the header",
    ),
    (
        "duplicate-names.safetensors",
        "tensor `a`: appears twice in the header",
    ),
    (
        "duplicate-field.safetensors",
        "tensor `a`: header entry has `dtype` twice",
    ),
    (
        "duplicate-metadata.safetensors",
        "`__metadata__` appears twice",
    ),
    (
        "metadata-not-object.safetensors",
        "`__metadata__` is not an object",
    ),
    (
        "metadata-not-string.safetensors",
        "metadata `step` is not a string",
    ),
    (
        "control-chars-in-name.safetensors",
        "tensor `a\\nema-tool: everything is fine`: appears twice",
    ),
    (
        "deep-nesting-unclosed.safetensors",
        "corrupt header: invalid JSON",
    ),
];

/// Well-formed files of the corpus, used by [`CASES`].
const WELL_FORMED: &[&str] = &[
    "deep-nesting-ignored.safetensors",
    "max-dims.safetensors",
    "zero-size-and-scalar.safetensors",
    "zero-size-and-scalar-2.safetensors",
    "good.safetensors",
    "good-2.safetensors",
    "shape-differs.safetensors",
    "dtype-differs.safetensors",
    "tensor-missing.safetensors",
    "nan.safetensors",
    "inf.safetensors",
    "large-values.safetensors",
];

/// Commands on well-formed files: arguments (`@name` is a corpus file, `OUT` the output path),
/// exit status, and a fragment of the error (empty for success).
const CASES: &[(&[&str], i32, &str)] = &[
    (&["inspect", "@deep-nesting-ignored.safetensors"], 0, ""),
    (&["inspect", "--stats", "@max-dims.safetensors"], 0, ""),
    (
        &[
            "ema",
            "@good.safetensors",
            "@good-2.safetensors",
            "--momentum",
            "0.5",
            "-o",
            "OUT",
        ],
        0,
        "",
    ),
    (
        &[
            "ema",
            "@zero-size-and-scalar.safetensors",
            "@zero-size-and-scalar-2.safetensors",
            "--momentum",
            "0.5",
            "--check-finite",
            "-o",
            "OUT",
        ],
        0,
        "",
    ),
    (
        &[
            "ema",
            "@good.safetensors",
            "@good-2.safetensors",
            "@shape-differs.safetensors",
            "-o",
            "OUT",
        ],
        1,
        "good.safetensors: tensor `a`: has shape [2, 2], but",
    ),
    (
        &[
            "swa",
            "@dtype-differs.safetensors",
            "@good.safetensors",
            "-o",
            "OUT",
        ],
        1,
        "tensor `n`: has dtype I64, but",
    ),
    (
        &[
            "ema",
            "@good.safetensors",
            "@tensor-missing.safetensors",
            "-o",
            "OUT",
        ],
        1,
        "tensor-missing.safetensors: tensor `b`: is missing (it is in",
    ),
    (
        &["ema", "@good.safetensors", "@nan.safetensors", "-o", "OUT"],
        0,
        "",
    ),
    (
        &[
            "ema",
            "@good.safetensors",
            "@nan.safetensors",
            "--check-finite",
            "-o",
            "OUT",
        ],
        1,
        "nan.safetensors: tensor `a`: 1 NaN and 0 infinite values (--check-finite)",
    ),
    (
        &[
            "swa",
            "@inf.safetensors",
            "@good.safetensors",
            "--check-finite",
            "-o",
            "OUT",
        ],
        1,
        "inf.safetensors: tensor `b`: 0 NaN and 1 infinite values (--check-finite)",
    ),
    (
        &[
            "swa",
            "@good.safetensors",
            "@large-values.safetensors",
            "--dtype",
            "f16",
            "-o",
            "OUT",
        ],
        1,
        "tensor `a`: 2 values overflow F16 when converted from F32",
    ),
    (
        &[
            "ema",
            "@good.safetensors",
            "@large-values.safetensors",
            "--dtype",
            "bf16",
            "-o",
            "OUT",
        ],
        0,
        "",
    ),
    (&["inspect", "--stats", "@nan.safetensors"], 0, ""),
    (
        &[
            "ema",
            "@good.safetensors",
            "@good-2.safetensors",
            "-o",
            "@good-2.safetensors",
            "--force",
        ],
        1,
        "is also an input",
    ),
];

#[test]
fn corpus_matches_its_generator() {
    let dir = data_dir();
    let regenerate = std::env::var_os("EMA_TOOL_REGENERATE").is_some();
    if regenerate {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let files = corpus::files();
    for (name, bytes) in &files {
        let path = dir.join(name);
        if regenerate {
            std::fs::write(&path, bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with EMA_TOOL_REGENERATE=1)",
                path.display()
            )
        });
        assert!(
            &on_disk == bytes,
            "{name} differs from its generator (regenerate with EMA_TOOL_REGENERATE=1)"
        );
    }
    let generated: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    for name in entries(&dir) {
        assert!(
            generated.contains(&name.as_str()),
            "{name} is not made by the generator"
        );
    }
    // Every file has a row in one of the tables.
    let mut tabled: Vec<&str> = BROKEN
        .iter()
        .map(|(n, _)| *n)
        .chain(WELL_FORMED.iter().copied())
        .collect();
    tabled.sort();
    let mut generated = generated;
    generated.sort();
    assert_eq!(tabled, generated);
}

/// Runs `args`, expects `want` and `fragment`, and checks the output directory `out` holds
/// nothing after a failure (no target, no temporary file) and only the target after a success.
fn check(args: &[String], out: &Path, want: i32, fragment: &str, context: &str) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(code(&o), want, "{context}: exit status; stderr: {err}");
    let left = entries(out);
    if want == 0 {
        assert!(
            left.iter().all(|n| !n.starts_with(".ema-tool-")),
            "{context}: left {left:?}"
        );
    } else {
        assert_one_line_error(&err, fragment, context);
        assert!(
            left.is_empty(),
            "{context}: left {left:?} in the output directory"
        );
        assert!(err.len() < 600, "{context}: message of {} bytes", err.len());
    }
}

#[test]
fn broken_files_are_refused_by_every_command() {
    let dir = data_dir();
    let good = dir.join("good.safetensors");
    for (name, fragment) in BROKEN {
        let f = dir.join(name);
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("out.safetensors");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let runs: Vec<Vec<String>> = vec![
            vec!["inspect".into(), s(&f)],
            vec!["inspect".into(), "--json".into(), "--stats".into(), s(&f)],
            vec!["ema".into(), s(&good), s(&f), "-o".into(), s(&target)],
            vec![
                "swa".into(),
                s(&f),
                s(&good),
                "-o".into(),
                s(&target),
                "--dry-run".into(),
            ],
            vec!["swap".into(), s(&f), "-o".into(), s(&target)],
            vec![
                "swap".into(),
                "--deploy".into(),
                s(&f),
                "-o".into(),
                s(&target),
            ],
        ];
        for args in runs {
            let context = format!("{name}: {}", args[0..2].join(" "));
            check(&args, out.path(), 1, fragment, &context);
        }
    }
}

#[test]
fn messages_quote_no_file_content_beyond_a_bound() {
    let dir = data_dir();
    let o = run([
        "inspect".as_ref(),
        dir.join("header-string.safetensors").as_os_str(),
    ]);
    assert!(!stderr(&o).contains("secret-looking"), "{}", stderr(&o));
    let o = run([
        "inspect".as_ref(),
        dir.join("long-dtype.safetensors").as_os_str(),
    ]);
    let err = stderr(&o);
    assert!(err.len() < 400 && err.contains('…'), "{err}");
    let o = run([
        "inspect".as_ref(),
        dir.join("control-chars-in-name.safetensors").as_os_str(),
    ]);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn well_formed_edge_cases_give_what_the_table_says() {
    let dir = data_dir();
    for (args, want, fragment) in CASES {
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("out.safetensors");
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.strip_prefix('@') {
                Some(n) => dir.join(n).to_string_lossy().into_owned(),
                None if *a == "OUT" => target.to_string_lossy().into_owned(),
                None => a.to_string(),
            })
            .collect();
        let context = args.join(" ");
        check(&args, out.path(), *want, fragment, &context);
        if *want == 0 && args.iter().any(|a| a == "-o") {
            assert_eq!(
                entries(out.path()),
                vec!["out.safetensors".to_string()],
                "{context}"
            );
        }
    }
}

#[test]
fn zero_size_and_scalar_tensors_fold_correctly() {
    use ema_tool::checkpoint::{Checkpoint, Open};
    let dir = data_dir();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("z.safetensors");
    let o = run([
        "ema".as_ref(),
        dir.join("zero-size-and-scalar.safetensors").as_os_str(),
        dir.join("zero-size-and-scalar-2.safetensors").as_os_str(),
        "--momentum".as_ref(),
        "0.5".as_ref(),
        "-o".as_ref(),
        target.as_os_str(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let c = Checkpoint::open(&target, Open::Readable).unwrap();
    let empty = c.get("empty").unwrap();
    assert_eq!((empty.shape.clone(), empty.len), (vec![0, 3], 0));
    let scalar = c.get("scalar").unwrap();
    assert_eq!(scalar.shape, Vec::<usize>::new());
    let mut b = [0u8; 4];
    c.read_at(scalar, 0, &mut b).unwrap();
    assert_eq!(f32::from_le_bytes(b), 3.0);
    let v = c.get("v").unwrap();
    let mut b = [0u8; 4];
    c.read_at(v, 0, &mut b).unwrap();
    // bf16 (1 + 3) / 2 = 2 and (2 + 4) / 2 = 3.
    assert_eq!(b, [0x00, 0x40, 0x40, 0x40]);
}

#[test]
fn inputs_that_are_not_regular_files_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo.safetensors");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: mkfifo on a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("o.safetensors");
    let good = data_dir().join("good.safetensors");
    for f in [fifo.as_path(), tmp.path(), Path::new("/dev/null")] {
        let args: Vec<String> = vec![
            "ema".into(),
            good.to_string_lossy().into(),
            f.to_string_lossy().into(),
            "-o".into(),
            target.to_string_lossy().into(),
        ];
        let o = run(&args);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(
            stderr(&o).contains("is not a regular file") || stderr(&o).contains("is a directory"),
            "{}",
            stderr(&o)
        );
        assert!(entries(out.path()).is_empty());
    }
}
