//! What a file name says: which files are PyTorch checkpoints, which are sharded-checkpoint
//! indexes, and a name's stem without its checkpoint extension.

use std::path::Path;

/// File name extensions of PyTorch checkpoints.
pub const TORCH_EXTENSIONS: [&str; 5] = [".pth", ".pt", ".bin", ".ckpt", ".pth.tar"];

/// Whether `path` names a PyTorch checkpoint (by extension, in any case).
pub fn is_torch_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    TORCH_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// Whether `path` names a sharded-checkpoint index (`*.index.json`).
pub fn is_index_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

/// `epoch_12.pth.tar` → `epoch_12`; keeps names without a known extension as they are.
pub fn strip_known_extensions(name: &str) -> &str {
    const EXTS: [&str; 8] = [
        ".safetensors.index.json",
        ".bin.index.json",
        ".safetensors",
        ".pth.tar",
        ".pth",
        ".pt",
        ".bin",
        ".ckpt",
    ];
    for e in EXTS {
        if let Some(stem) = name.strip_suffix(e) {
            return stem;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_names() {
        assert!(is_torch_name(Path::new("w/epoch_12.pth")));
        assert!(is_torch_name(Path::new("checkpoint-4.pth.tar")));
        assert!(is_torch_name(Path::new("last.ckpt")));
        assert!(is_torch_name(Path::new("LAST.PT")));
        assert!(!is_torch_name(Path::new("model.safetensors")));
    }

    #[test]
    fn stems() {
        assert_eq!(strip_known_extensions("epoch_12.pth.tar"), "epoch_12");
        assert_eq!(strip_known_extensions("m.safetensors.index.json"), "m");
        assert_eq!(strip_known_extensions("notes.txt"), "notes.txt");
    }
}
