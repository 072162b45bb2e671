//! The bottom layer: the byte formats ema-tool reads and writes, without files or processes.
//!
//! - [`dtype`]: element types and their names in each format;
//! - [`convert`]: element conversions between any dtype and f64, with each format's rounding;
//! - [`safetensors`] (with its fast path [`safetensors_fast`]): the header, read with
//!   validation and written;
//! - [`pickle`]: a restricted pickle machine that records calls instead of making them, and a
//!   writer of the small pickles `torch.save` writes;
//! - [`zip`]: the stored-entry zip archives of `torch.save`, read and written;
//! - [`names`]: what a file name says about its format.
//!
//! Everything here works on byte slices and positioned reads handed in by the caller; the
//! layers above (`checkpoint`, `output`) own the files.

pub mod convert;
pub mod dtype;
pub mod names;
pub mod pickle;
pub mod safetensors;
pub mod safetensors_fast;
pub mod zip;

use std::hash::{BuildHasher, RandomState};

pub use dtype::DType;

/// Where one tensor's bytes are, and what they are.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name in the flat namespace (`state_dict.backbone.conv1.weight`).
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index of the data file among its checkpoint's files (0 for a single file).
    pub file: usize,
    /// Absolute byte offset of the first element in that file.
    pub offset: u64,
    /// Byte length (`numel × dtype size`), contiguous, little-endian.
    pub len: u64,
    /// For a tensor of a PyTorch archive: the storage record it views, and how.
    pub view: Option<Box<StorageView>>,
    /// For a tensor whose bytes lie in several places (a DCP tensor sharded across ranks):
    /// those places, in tensor order, covering `0 .. len`; `file` and `offset` are the first's.
    pub segments: Option<Box<[Segment]>>,
}

/// One contiguous part of a tensor's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of the data file.
    pub file: usize,
    /// Absolute offset in that file.
    pub offset: u64,
    /// Where the part starts in the tensor's bytes.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.len / self.dtype.size() as u64
    }
}

/// How a PyTorch tensor views its storage: which record, from which element, with which
/// strides. Two tensors with equal views of two records exchange values when the records
/// exchange bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageView {
    /// Index of the storage among the archive's storages.
    pub storage: usize,
    /// Offset of the first element in the storage, in elements.
    pub storage_offset: u64,
    pub stride: Vec<usize>,
}

/// A tensor to be written: name, dtype and shape; the data comes later.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        dtype::nbytes(self.dtype, &self.shape).expect("output shapes come from validated inputs")
    }
}

/// Tensors by name: a hash table of their indices (the names are not copied), hashed with
/// std's randomly keyed SipHash, since the names come from the file.
#[derive(Debug)]
pub struct NameIndex {
    table: hashbrown::HashTable<usize>,
    hasher: RandomState,
}

impl NameIndex {
    /// The index of `tensors`, or the position of the first tensor whose name an earlier one
    /// has.
    pub fn new(tensors: &[TensorInfo]) -> std::result::Result<NameIndex, usize> {
        let hasher = RandomState::new();
        let mut table = hashbrown::HashTable::with_capacity(tensors.len());
        let hash = |i: &usize| hasher.hash_one(tensors[*i].name.as_str());
        for (i, t) in tensors.iter().enumerate() {
            match table.entry(hash(&i), |&j| tensors[j].name == t.name, hash) {
                hashbrown::hash_table::Entry::Occupied(_) => return Err(i),
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
        Ok(NameIndex { table, hasher })
    }

    /// The position of `name` in `tensors` (those the index was made of).
    pub fn find(&self, tensors: &[TensorInfo], name: &str) -> Option<usize> {
        self.table
            .find(self.hasher.hash_one(name), |&j| tensors[j].name == name)
            .copied()
    }
}
