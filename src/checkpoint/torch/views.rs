//! Tensors as views of storages: their geometry, and the gathering of a view whose elements
//! are not one contiguous run of its storage.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MAX_GATHER;
use crate::checkpoint::DataFile;
use crate::codec::DType;
use crate::error::{Error, Result};

/// A tensor as the pickle describes it: a view of a storage.
#[derive(Clone, Debug)]
pub(crate) struct TorchTensor {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) stride: Vec<usize>,
    /// Offset of the first element in the storage, in elements of `dtype`.
    pub(crate) storage_offset: u64,
    /// Index into the archive's storages.
    pub(crate) storage: usize,
}

impl TorchTensor {
    /// Number of elements (checked when the archive was read).
    pub(crate) fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes of data.
    pub(crate) fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Whether the elements are one row-major run of the storage.
    pub(crate) fn is_contiguous(&self) -> bool {
        is_contiguous(&self.shape, &self.stride)
    }
}

/// Whether elements of `shape` with `stride` are one row-major run (dims of 1 take any stride).
pub(crate) fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// The elements of a non-contiguous tensor, in row-major order.
pub(super) fn gather(
    df: &DataFile,
    data_offset: u64,
    t: &TorchTensor,
    path: &Path,
) -> Result<Vec<u8>> {
    let elem = t.dtype.size();
    // Checked when the archive was read: the last element lies inside the storage.
    let last: u64 = t
        .shape
        .iter()
        .zip(&t.stride)
        .map(|(&d, &s)| (d as u64 - 1) * s as u64)
        .sum();
    let span = (last + 1) * elem as u64;
    if span > MAX_GATHER {
        return Err(Error::tensor(
            path,
            &t.name,
            format!(
                "is not contiguous (strides {:?}) and spans {span} bytes of its storage, above \
                 the {MAX_GATHER}-byte limit for gathering it; save it with .contiguous()",
                t.stride
            ),
        ));
    }
    let mut src = vec![0u8; span as usize];
    df.file()
        .read_exact_at(&mut src, data_offset)
        .map_err(|e| Error::tensor(path, &t.name, e.to_string()))?;
    let numel = t.numel() as usize;
    let mut out = Vec::with_capacity(numel * elem);
    let n = t.shape.len();
    let mut idx = vec![0usize; n];
    let mut pos = 0usize;
    for _ in 0..numel {
        out.extend_from_slice(&src[pos * elem..(pos + 1) * elem]);
        for d in (0..n).rev() {
            idx[d] += 1;
            pos += t.stride[d];
            if idx[d] < t.shape[d] {
                break;
            }
            pos -= t.shape[d] * t.stride[d];
            idx[d] = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(is_contiguous(&[0, 3], &[7, 7]));
        assert!(!is_contiguous(&[4], &[0]));
    }
}
