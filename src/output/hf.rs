//! Hugging Face model directories as outputs (`docs/formats.md#hf`): `-o DIR/` writes the
//! weights under the input's weights file name in DIR, and copies the other files of the last
//! input directory beside them (`config.json`, generation and tokenizer files), so that
//! `from_pretrained(DIR)` loads the result. Every copy is atomic and committed with the weights.

use std::path::{Path, PathBuf};

use super::atomic::{AtomicFile, Finished};
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// Extensions of files that are weights or training state, never copied beside an output.
const NOT_COPIED: [&str; 9] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".distcp",
    ".index.json",
    ".pth.tar",
];

/// Whether `-o` names a directory: it ends with `/`, or is an existing directory.
pub fn is_dir_target(target: &Path) -> bool {
    let text = target.as_os_str().to_string_lossy();
    text.ends_with('/') || target.is_dir()
}

/// The weights file name that an output in a directory takes from the inputs: the weights
/// file (or the sharded index's file stem) of the first input that is a model directory, else
/// `<fallback>`.
pub fn weights_name(inputs: &[PathBuf], fallback: &str) -> String {
    inputs
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|d| crate::checkpoint::weights_of_dir(d).ok().flatten())
        .unwrap_or_else(|| fallback.to_string())
}

/// The files of `dir` copied beside an output: its regular files (or links to files inside
/// it) that are neither weights nor training state, and none of `exclude`. A link leading
/// outside `dir` is an error naming it.
pub fn companions(dir: &Path, exclude: &[&Path]) -> Result<Vec<PathBuf>> {
    let real_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
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
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.file_type().is_symlink() {
            let real = path.canonicalize().map_err(|e| Error::io(&path, e))?;
            if !real.starts_with(&real_dir) {
                return Err(Error::format(
                    &path,
                    format!(
                        "is a link to {}, outside {}: not copied beside the output (copy the \
                         directory with its files first)",
                        real.display(),
                        dir.display()
                    ),
                ));
            }
            if !real.is_file() {
                continue;
            }
        } else if !meta.is_file() {
            continue;
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
