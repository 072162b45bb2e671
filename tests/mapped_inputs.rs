//! An input truncated while it is mapped ends the process with ema-tool's one-line error and
//! exit status 1, and removes the temporary output, instead of dying of SIGBUS.
//!
//! The test runs itself again as a child process (the guard exits the process it is in).

use std::collections::BTreeMap;
use std::process::Command;

use ema_tool::checkpoint::mapped::Mapped;
use ema_tool::checkpoint::{Checkpoint, Open};
use ema_tool::codec::safetensors::encode_header;
use ema_tool::codec::{DType, TensorSpec};
use ema_tool::runtime::Runtime;

const CHILD: &str = "EMA_TOOL_TEST_SIGBUS_DIR";

/// In the child: map a checkpoint, truncate it, touch its last page.
fn child(dir: &str) {
    let dir = std::path::Path::new(dir);
    let n = 1 << 20;
    let tensors = [TensorSpec {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![n],
    }];
    let (mut bytes, _) = encode_header(&tensors, &BTreeMap::new());
    bytes.resize(bytes.len() + n * 4, 1);
    let path = dir.join("in.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    // A temporary output of this process, which the guard must remove.
    let rt = Runtime::new();
    let out = rt.temporary(dir, ".out-", ".tmp").unwrap();
    std::fs::write(out.path(), b"partial").unwrap();
    let ckpts = [Checkpoint::open(&path, Open::Readable).unwrap()];
    let mapped = Mapped::new(&ckpts, 1, &rt).unwrap();
    let t = &ckpts[0].tensors()[0];
    let data = mapped.bytes(0, t.file, t.offset, n * 4).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // SAFETY: a volatile read of a byte of the mapping, which the guard makes an error exit
    // instead of a crash; that is what is tested.
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
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".out-"))
        .collect();
    assert!(left.is_empty(), "the temporary output is left: {left:?}");
}
