//! Hugging Face model directories as outputs (`docs/formats.md#hf`): `-o DIR/` writes the
//! weights under the input's weights file name in DIR, and copies the other files of the last
//! input directory beside them (`config.json`, generation and tokenizer files), so that
//! `from_pretrained(DIR)` loads the result. Every copy is atomic and committed with the weights.

use std::path::{Path, PathBuf};

use super::atomic::{AtomicFile, Finished};
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// Extensions of files that are weights or training state (of PyTorch and of the other
/// frameworks `save_pretrained` may have written), never copied beside an output.
const NOT_COPIED: [&str; 15] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".distcp",
    ".index.json",
    ".pth.tar",
    ".msgpack",
    ".h5",
    ".onnx",
    ".gguf",
    ".npz",
    ".ot",
];

/// Whether `-o` names a directory: it ends with `/`, or is an existing directory.
pub fn is_dir_target(target: &Path) -> bool {
    let text = target.as_os_str().to_string_lossy();
    text.ends_with('/') || target.is_dir()
}

/// The weights file name that an output in a directory takes from the inputs: the weights
/// file (or the sharded index's file stem) of the first input that is a model directory, as
/// safetensors (`pytorch_model.bin` becomes `model.safetensors`, which `from_pretrained`
/// prefers), else `model.safetensors`.
pub fn weights_name(inputs: &[PathBuf]) -> String {
    let name = inputs
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|d| crate::checkpoint::weights_of_dir(d).ok().flatten())
        .unwrap_or_else(|| "model.safetensors".to_string());
    match name.as_str() {
        "pytorch_model.bin" => "model.safetensors".into(),
        "diffusion_pytorch_model.bin" => "diffusion_pytorch_model.safetensors".into(),
        _ => name,
    }
}

/// Refuses an output directory that is one of the inputs (its weights would be replaced by
/// the average of themselves), whatever `--force` says.
pub fn check_not_input(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(real) = target.canonicalize() else {
        return Ok(());
    };
    for i in inputs.iter().filter(|i| i.is_dir()) {
        if i.canonicalize().ok().as_ref() == Some(&real) {
            return Err(Error::Output {
                path: target.to_path_buf(),
                what: "is an input directory: write the average to another directory".into(),
            });
        }
    }
    Ok(())
}

/// The files of `dir` copied beside an output: its regular files (or links to regular files,
/// as in the Hugging Face hub's cache, whose snapshot files link to its blobs) that are neither
/// weights nor training state, and none of `exclude`. A dangling link is left out.
pub fn companions(dir: &Path, exclude: &[&Path]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || NOT_COPIED.iter().any(|x| name.ends_with(x)) {
            continue;
        }
        let same = |p: &Path| {
            exclude
                .iter()
                .any(|x| x.canonicalize().ok() == p.canonicalize().ok())
        };
        if same(&path) {
            continue;
        }
        // Through links: the copy reads what the link leads to, and replaces (never writes
        // through) whatever is at the target.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {}
            _ => continue,
        }
        out.push(path);
    }
    out.sort();
    Ok(out)
}

/// Copies `src` to `target` through a temporary file; the copy is renamed into place with the
/// outputs by `commit_all`.
pub fn copy(src: &Path, target: &Path, force: bool, rt: &Runtime) -> Result<Finished> {
    let out = AtomicFile::create(target, force, rt)?;
    let mut from = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    std::io::copy(&mut from, &mut out.file()).map_err(|e| Error::io(target, e))?;
    out.finish()
}
