//! An input truncated while it is mapped ends the process with ema-tool's one-line error and
//! exit status 1, and removes the temporary output, instead of dying of SIGBUS.
//!
//! The test runs itself again as a child process (the guard exits the process it is in).

use std::collections::BTreeMap;
use std::process::Command;

use ema_tool::checkpoint::mapped::Mapped;
use ema_tool::checkpoint::safetensors::{encode_header, OutTensor};
use ema_tool::checkpoint::Checkpoint;
use ema_tool::dtype::DType;

const CHILD: &str = "EMA_TOOL_TEST_SIGBUS_DIR";

/// In the child: map a checkpoint, truncate it, touch its last page.
fn child(dir: &str) {
    let dir = std::path::Path::new(dir);
    let n = 1 << 20;
    let tensors = [OutTensor {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![n],
    }];
    let (mut bytes, _) = encode_header(&tensors, &BTreeMap::new());
    bytes.resize(bytes.len() + n * 4, 1);
    let path = dir.join("in.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let cleanup = dir.join("out.tmp");
    std::fs::write(&cleanup, b"partial").unwrap();
    let ckpts = [Checkpoint::open(&path).unwrap()];
    let mapped = Mapped::new(&ckpts, 1, std::slice::from_ref(&cleanup)).unwrap();
    let t = &ckpts[0].tensors[0];
    let data = mapped.bytes(0, &ckpts[0], t, 0, n * 4).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let last = unsafe { std::ptr::read_volatile(&data[n * 4 - 1]) };
    println!("read {last} past the end of the file: no SIGBUS");
}

#[test]
fn a_truncated_input_is_an_error_not_a_crash() {
    if let Ok(dir) = std::env::var(CHILD) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_truncated_input_is_an_error_not_a_crash",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let want = format!(
        "ema-tool: {}: file changed while being read (truncated?)",
        dir.path().join("in.safetensors").display()
    );
    assert!(stderr.contains(&want), "stderr: {stderr}");
    assert!(
        !dir.path().join("out.tmp").exists(),
        "the temporary output is left"
    );
}
