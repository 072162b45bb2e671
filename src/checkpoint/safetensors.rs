//! The safetensors format: a validating header reader and the header writer.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`), then the
//! data, each tensor's bytes at `8 + n + begin`. The reader applies the checks of the
//! safetensors crate's `validate()` (header size cap, known dtypes, checked size arithmetic,
//! offsets contiguous from 0 and covering the data exactly) and reports each failure with the
//! tensor it is about.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::{read_up_to, Checkpoint, DataFile, Format, TensorInfo};
use crate::dtype::{nbytes, DType};
use crate::error::{Error, Result};

/// Largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Opens and validates a safetensors file.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let df = DataFile::open(path)?;
    let (tensors, metadata) = read_header(&df, 0)?;
    Checkpoint::new(
        path.to_path_buf(),
        Format::Safetensors,
        vec![df],
        tensors,
        metadata,
        Vec::new(),
    )
}

/// Reads and validates the header of `df`; tensors get file index `file_index`.
pub fn read_header(
    df: &DataFile,
    file_index: usize,
) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>)> {
    let path = &df.path;
    let bad = |what: String| Error::format(path, what);
    let mut len_bytes = [0u8; 8];
    let got = read_up_to(&df.file, 0, &mut len_bytes).map_err(|e| Error::io(path, e))?;
    if got < 8 {
        return Err(bad(format!(
            "not a safetensors file: {} bytes, too short for a header",
            df.len
        )));
    }
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_SIZE {
        return Err(bad(format!(
            "not a safetensors file: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit"
        )));
    }
    if n > df.len - 8 {
        return Err(bad(format!(
            "truncated: header length {n} is larger than the {} bytes that follow it",
            df.len - 8
        )));
    }
    let mut header = vec![0u8; n as usize];
    let got = read_up_to(&df.file, 8, &mut header).map_err(|e| Error::io(path, e))?;
    if got as u64 != n {
        return Err(bad("truncated while reading the header".into()));
    }
    let text = std::str::from_utf8(&header)
        .map_err(|e| bad(format!("corrupt header: invalid UTF-8 ({e})")))?;
    let json: Map<String, Value> = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| bad(format!("corrupt header: invalid JSON ({e})")))?;
    let data_start = 8 + n;
    let data_len = df.len - data_start;

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            let obj = v
                .as_object()
                .ok_or_else(|| bad("corrupt header: `__metadata__` is not an object".into()))?;
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| {
                    bad(format!("corrupt header: metadata `{k}` is not a string"))
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let tbad = |what: &str| Error::tensor(path, &name, what);
        let obj = v
            .as_object()
            .ok_or_else(|| tbad("header entry is not an object"))?;
        let dtype_name = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| tbad("header entry has no dtype"))?;
        let dtype = DType::from_safetensors_name(dtype_name)
            .ok_or_else(|| tbad(&format!("unsupported dtype {dtype_name}")))?;
        let shape = obj
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| tbad("header entry has no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| tbad("shape is not a list of non-negative integers"))?;
        let offsets = obj
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| tbad("data_offsets is not a pair of non-negative integers"))?;
        let want =
            nbytes(dtype, &shape).ok_or_else(|| tbad(&format!("shape {shape:?} overflows")))?;
        let (begin, end) = offsets;
        if end < begin || end - begin != want {
            return Err(tbad(&format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but {dtype} {shape:?} needs {want}",
                end.saturating_sub(begin)
            )));
        }
        entries.push((begin, end, name, dtype, shape));
    }

    entries.sort_by_key(|e| (e.0, e.1));
    let mut expect = 0u64;
    let mut tensors = Vec::with_capacity(entries.len());
    for (begin, end, name, dtype, shape) in entries {
        if begin != expect {
            let what = if begin < expect {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::tensor(
                path,
                &name,
                format!("data_offsets [{begin}, {end}] {what} (expected it to start at {expect})"),
            ));
        }
        if end > data_len {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "truncated: data ends at byte {} but the file has {} bytes",
                    data_start + end,
                    df.len
                ),
            ));
        }
        expect = end;
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            file: file_index,
            offset: data_start + begin,
            len: end - begin,
        });
    }
    if expect != data_len {
        return Err(bad(format!(
            "{} bytes after the last tensor are not described by the header",
            data_len - expect
        )));
    }
    Ok((tensors, metadata))
}

/// A tensor to be written: name, dtype and shape; the data comes later.
#[derive(Clone, Debug, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl OutTensor {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        nbytes(self.dtype, &self.shape).expect("output shapes come from validated inputs")
    }
}

/// The serialized header (length prefix included) and, per tensor, the absolute offset of its
/// data in the file. Tensors are laid out in the order given.
pub fn encode_header(
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<u64>) {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut rel = Vec::with_capacity(tensors.len());
    let mut off = 0u64;
    for t in tensors {
        let end = off + t.nbytes();
        let mut e = Map::new();
        e.insert("dtype".into(), t.dtype.safetensors_name().into());
        e.insert("shape".into(), t.shape.clone().into());
        e.insert("data_offsets".into(), vec![off, end].into());
        obj.insert(t.name.clone(), Value::Object(e));
        rel.push(off);
        off = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("a JSON map serializes");
    // Pad with spaces so the data starts 8-byte aligned, as the safetensors crate does.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    let base = out.len() as u64;
    (out, rel.into_iter().map(|r| r + base).collect())
}
