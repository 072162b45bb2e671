//! The generator of `tests/data/broken/`: one small file per way a checkpoint can be broken,
//! plus well-formed files with edge cases (zero-size and scalar tensors, shapes that differ
//! between inputs, NaN, values too large for f16).
//!
//! The committed files are checked against this generator by `tests/broken.rs`; after changing
//! it, regenerate them with `EMA_TOOL_REGENERATE=1 cargo test --test broken`.

use super::{f32_bytes, file, raw_file, Spec};

/// A good file: two f32 tensors, an i64 scalar, step metadata.
pub fn good() -> Vec<u8> {
    file(
        &[
            Spec("a", "F32", &[2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            Spec("b", "F32", &[3], f32_bytes(&[0.5, -0.5, 0.25])),
            Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
        ],
        &[("step", "100")],
    )
}

/// The same tensors with other values and a later step.
pub fn good2() -> Vec<u8> {
    file(
        &[
            Spec("a", "F32", &[2, 2], f32_bytes(&[3.0, 2.0, 1.0, 0.0])),
            Spec("b", "F32", &[3], f32_bytes(&[1.5, 0.5, -0.25])),
            Spec("n", "I64", &[], 9i64.to_le_bytes().to_vec()),
        ],
        &[("step", "200")],
    )
}

fn pad(h: &str) -> String {
    let mut h = h.to_string();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    h
}

/// A file whose header is `h` (padded) followed by `data`.
fn hdr(h: &str, data: &[u8]) -> Vec<u8> {
    raw_file(&pad(h), data)
}

fn entry(dtype: &str, shape: &str, begin: u64, end: u64) -> String {
    format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

/// Every file of the corpus, by name.
pub fn files() -> Vec<(&'static str, Vec<u8>)> {
    let good = good();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut over_cap = 200_000_000u64.to_le_bytes().to_vec();
    over_cap.extend_from_slice(b"{}      ");
    let mut longer = 1000u64.to_le_bytes().to_vec();
    longer.extend_from_slice(b"{}      ");
    let mut not_utf8 = good.clone();
    not_utf8[10] = 0xff;
    let deep = format!(
        r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":{}1{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_unclosed = format!(r#"{{"a":{}"#, "[".repeat(10_000));
    let dims65 = format!("[{}]", vec!["1"; 65].join(","));
    let dims64 = format!("[{}]", vec!["1"; 64].join(","));
    let control = "a\nema-tool: everything is fine";
    let control_dup = format!(
        r#"{{{name}:{e},{name}:{e}}}"#,
        name = serde_json::to_string(control).unwrap(),
        e = entry("F32", "[1]", 0, 4)
    );
    let long_dtype = format!(
        r#"{{"a":{{"dtype":"{}","shape":[1],"data_offsets":[0,4]}}}}"#,
        "X".repeat(10_000)
    );
    vec![
        ("empty.safetensors", Vec::new()),
        ("truncated-in-length.safetensors", good[..5].to_vec()),
        (
            "truncated-in-header.safetensors",
            good[..8 + n / 2].to_vec(),
        ),
        ("truncated-at-data.safetensors", good[..8 + n].to_vec()),
        ("truncated-in-data.safetensors", good[..8 + n + 5].to_vec()),
        (
            "truncated-last-byte.safetensors",
            good[..good.len() - 1].to_vec(),
        ),
        ("header-over-cap.safetensors", over_cap),
        ("header-longer-than-file.safetensors", longer),
        ("text-file.safetensors", b"hello, world\n".to_vec()),
        (
            "corrupt-json.safetensors",
            hdr(r#"{"a": {"dtype": "F32", "shape": [1],"#, &[0; 4]),
        ),
        ("not-utf8.safetensors", not_utf8),
        ("header-not-object.safetensors", hdr("[1, 2]", &[])),
        (
            "header-string.safetensors",
            hdr(r#""secret-looking string""#, &[]),
        ),
        ("entry-not-object.safetensors", hdr(r#"{"a": 5}"#, &[])),
        (
            "missing-dtype.safetensors",
            hdr(r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]),
        ),
        (
            "unknown-dtype.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F33", "[1]", 0, 4)),
                &[0; 4],
            ),
        ),
        ("long-dtype.safetensors", hdr(&long_dtype, &[0; 4])),
        (
            "missing-shape.safetensors",
            hdr(r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#, &[0; 4]),
        ),
        (
            "negative-dim.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", "[-1]", 0, 4)),
                &[0; 4],
            ),
        ),
        (
            "fractional-dim.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", "[1.5]", 0, 4)),
                &[0; 4],
            ),
        ),
        (
            "too-many-dims.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", &dims65, 0, 4)),
                &[0; 4],
            ),
        ),
        (
            "shape-overflow.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{}}}"#,
                    entry("F32", "[4294967296,4294967296,4294967296]", 0, 4)
                ),
                &[0; 4],
            ),
        ),
        (
            "offsets-not-pair.safetensors",
            hdr(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                &[0; 4],
            ),
        ),
        (
            "offsets-reversed.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", "[1]", 4, 0)),
                &[0; 4],
            ),
        ),
        (
            "wrong-dtype-size.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", "[3]", 0, 8)),
                &[0; 8],
            ),
        ),
        (
            "overlapping-offsets.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{},"b":{}}}"#,
                    entry("F32", "[2]", 0, 8),
                    entry("F32", "[2]", 4, 12)
                ),
                &[0; 12],
            ),
        ),
        (
            "gap-between-offsets.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{},"b":{}}}"#,
                    entry("F32", "[2]", 0, 8),
                    entry("F32", "[2]", 12, 20)
                ),
                &[0; 20],
            ),
        ),
        (
            "offsets-past-end.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{},"b":{}}}"#,
                    entry("F32", "[2]", 0, 8),
                    entry("F32", "[2]", 8, 16)
                ),
                &[0; 12],
            ),
        ),
        (
            "offsets-huge.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{}}}"#,
                    entry("U8", "[4]", 18446744073709551611, 18446744073709551615)
                ),
                &[0; 4],
            ),
        ),
        (
            "trailing-bytes.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", "[2]", 0, 8)),
                &[0; 12],
            ),
        ),
        (
            "duplicate-names.safetensors",
            hdr(
                &format!(
                    r#"{{"a":{},"a":{}}}"#,
                    entry("F32", "[1]", 0, 4),
                    entry("F32", "[1]", 4, 8)
                ),
                &[0; 8],
            ),
        ),
        (
            "duplicate-field.safetensors",
            hdr(
                r#"{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        (
            "duplicate-metadata.safetensors",
            hdr(
                r#"{"__metadata__":{"step":"1"},"__metadata__":{"step":"2"}}"#,
                &[],
            ),
        ),
        (
            "metadata-not-object.safetensors",
            hdr(r#"{"__metadata__":[1]}"#, &[]),
        ),
        (
            "metadata-not-string.safetensors",
            hdr(r#"{"__metadata__":{"step":5}}"#, &[]),
        ),
        (
            "control-chars-in-name.safetensors",
            hdr(&control_dup, &[0; 8]),
        ),
        (
            "deep-nesting-unclosed.safetensors",
            hdr(&deep_unclosed, &[]),
        ),
        // Well-formed files with edge cases.
        (
            "deep-nesting-ignored.safetensors",
            hdr(&deep, &f32_bytes(&[1.0])),
        ),
        (
            "max-dims.safetensors",
            hdr(
                &format!(r#"{{"a":{}}}"#, entry("F32", &dims64, 0, 4)),
                &f32_bytes(&[2.0]),
            ),
        ),
        (
            "zero-size-and-scalar.safetensors",
            file(
                &[
                    Spec("empty", "F32", &[0, 3], Vec::new()),
                    Spec("scalar", "F32", &[], f32_bytes(&[2.0])),
                    Spec("v", "BF16", &[2], vec![0x80, 0x3f, 0x00, 0x40]),
                ],
                &[("step", "1")],
            ),
        ),
        (
            "zero-size-and-scalar-2.safetensors",
            file(
                &[
                    Spec("empty", "F32", &[0, 3], Vec::new()),
                    Spec("scalar", "F32", &[], f32_bytes(&[4.0])),
                    Spec("v", "BF16", &[2], vec![0x40, 0x40, 0x80, 0x40]),
                ],
                &[("step", "2")],
            ),
        ),
        ("good.safetensors", good),
        ("good-2.safetensors", good2()),
        (
            "shape-differs.safetensors",
            file(
                &[
                    Spec("a", "F32", &[4], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                    Spec("b", "F32", &[3], f32_bytes(&[0.5, -0.5, 0.25])),
                    Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
        (
            "dtype-differs.safetensors",
            file(
                &[
                    Spec("a", "F32", &[2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                    Spec("b", "F32", &[3], f32_bytes(&[0.5, -0.5, 0.25])),
                    Spec("n", "F64", &[], 7f64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
        (
            "tensor-missing.safetensors",
            file(
                &[
                    Spec("a", "F32", &[2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                    Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
        (
            "nan.safetensors",
            file(
                &[
                    Spec("a", "F32", &[2, 2], f32_bytes(&[1.0, f32::NAN, 3.0, 4.0])),
                    Spec("b", "F32", &[3], f32_bytes(&[0.5, -0.5, 0.25])),
                    Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
        (
            "inf.safetensors",
            file(
                &[
                    Spec("a", "F32", &[2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                    Spec("b", "F32", &[3], f32_bytes(&[0.5, f32::NEG_INFINITY, 0.25])),
                    Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
        (
            "large-values.safetensors",
            file(
                &[
                    Spec("a", "F32", &[2, 2], f32_bytes(&[1e6, 2.0, 3.0, -1e6])),
                    Spec("b", "F32", &[3], f32_bytes(&[0.5, -0.5, 0.25])),
                    Spec("n", "I64", &[], 7i64.to_le_bytes().to_vec()),
                ],
                &[("step", "300")],
            ),
        ),
    ]
}
