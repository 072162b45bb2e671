//! The one error type of ema-tool: every failure names the file and, where there is one, the tensor.

use std::path::PathBuf;

use crate::text::{one_line, printable};

/// Longest message text of an error, past the path and the tensor name.
const MAX_MESSAGE: usize = 4096;

/// Result with ema-tool's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, with the context a user needs to act on it.
///
/// Messages are lowercase, one line, and start with the file they are about, so that `main`
/// can print `ema-tool: {err}`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that is not a well-formed checkpoint of the format it claims to be. (Messages
    /// quote file content: control characters are escaped, so the error stays one line.)
    #[error("{}: {}", path.display(), one_line(what, MAX_MESSAGE))]
    Format { path: PathBuf, what: String },

    /// A problem with one tensor of one file.
    #[error("{}: tensor `{}`: {}", path.display(), printable(name), one_line(what, MAX_MESSAGE))]
    Tensor {
        path: PathBuf,
        name: String,
        what: String,
    },

    /// Arguments that are well-formed for the parser but wrong together or out of range.
    #[error("{0}")]
    Usage(String),

    /// A problem with the output path.
    #[error("{}: {what}", path.display())]
    Output { path: PathBuf, what: String },

    /// The CUDA device could not be used.
    #[error("cuda: {0}")]
    Cuda(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            what: what.into(),
        }
    }

    /// An [`Error::Tensor`] for tensor `name` of `path`.
    pub fn tensor(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        what: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            name: name.into(),
            what: what.into(),
        }
    }

    /// Tensor `name` of `path` disagrees with the same tensor of `other` in `what` (shape, dtype).
    pub fn mismatch(
        path: impl Into<PathBuf>,
        other: &std::path::Path,
        name: &str,
        what: &str,
        got: impl std::fmt::Display,
        want: impl std::fmt::Display,
    ) -> Self {
        Error::tensor(
            path,
            name,
            format!("has {what} {got}, but {} has {want}", other.display()),
        )
    }

    /// Tensor `name` is missing from `path` but present in `other`.
    pub fn missing(path: impl Into<PathBuf>, other: &std::path::Path, name: &str) -> Self {
        Error::tensor(
            path,
            name,
            format!("is missing (it is in {})", other.display()),
        )
    }

    /// An [`Error::Usage`].
    pub fn usage(what: impl Into<String>) -> Self {
        Error::Usage(what.into())
    }

    /// The process exit status for this error: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}
