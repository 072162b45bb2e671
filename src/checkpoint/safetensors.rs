//! Opening a safetensors file: its header read with small positioned reads and validated by
//! `codec::safetensors`; the data is left where it is.

use std::path::Path;

use super::step::SAFETENSORS_STEP_KEYS;
use super::{read_up_to, DataFile, Found};
use crate::codec::safetensors::{validate, Header};
use crate::error::Result;

/// Opens and validates a safetensors file.
pub(crate) fn open(path: &Path) -> Result<Found> {
    let df = DataFile::open(path)?;
    let (tensors, metadata) = read_header(&df, 0)?;
    Ok(Found {
        format: super::Format::Safetensors,
        files: vec![df],
        tensors,
        metadata,
        skipped: Vec::new(),
        step_keys: &SAFETENSORS_STEP_KEYS,
        torch: None,
        dcp: None,
        header_only: false,
    })
}

/// Reads and validates the header of `df`; tensors get file index `file_index`.
pub(crate) fn read_header(df: &DataFile, file_index: usize) -> Result<Header> {
    let (mut tensors, metadata) = validate(df.path(), df.len(), |off, buf| {
        read_up_to(df.file(), off, buf)
    })?;
    for t in &mut tensors {
        t.file = file_index;
    }
    Ok((tensors, metadata))
}
