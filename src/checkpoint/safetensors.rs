//! The safetensors format: a validating header reader and the header writer.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`), then the
//! data, each tensor's bytes at `8 + n + begin`. The reader applies the checks of the
//! safetensors crate's `validate()` (header size cap, known dtypes, checked size arithmetic,
//! offsets contiguous from 0 and covering the data exactly) and reports each failure with the
//! tensor it is about.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::de::{Deserialize, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{read_up_to, Checkpoint, DataFile, Format, TensorInfo};
use crate::dtype::{nbytes, DType};
use crate::error::{printable, Error, Result};

/// Largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;
/// Most dimensions a tensor may have (NumPy 2's `NPY_MAXDIMS`; PyTorch tensors have far fewer).
pub const MAX_DIMS: usize = 64;
/// Most tensors one header may declare: ten times the largest models published.
pub const MAX_TENSORS: usize = 1_000_000;

/// A validated header: tensors in data order (file index 0) and the string metadata.
pub type Header = (Vec<TensorInfo>, BTreeMap<String, String>);

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
pub fn read_header(df: &DataFile, file_index: usize) -> Result<Header> {
    let (mut tensors, metadata) =
        validate(&df.path, df.len, |off, buf| read_up_to(&df.file, off, buf))?;
    for t in &mut tensors {
        t.file = file_index;
    }
    Ok((tensors, metadata))
}

/// Validates a whole safetensors file held in memory (`path` only names it in errors).
///
/// The same checks as [`read_header`]; this is the entry point of the fuzz target.
pub fn validate_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    validate(path, bytes.len() as u64, |off, buf| {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| bytes.get(o..))
            .unwrap_or(&[]);
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    })
}

/// The checks of the safetensors crate's `validate()`, with positioned reads of a file of
/// `len` bytes through `read` (which returns how many bytes it could read at an offset).
///
/// Nothing is allocated before the header length is known to fit in the file and under
/// [`MAX_HEADER_SIZE`]; after that, memory is bounded by a small multiple of the header.
fn validate(
    path: &Path,
    len: u64,
    read: impl Fn(u64, &mut [u8]) -> std::io::Result<usize>,
) -> Result<Header> {
    let bad = |what: String| Error::format(path, what);
    let mut len_bytes = [0u8; 8];
    let got = read(0, &mut len_bytes).map_err(|e| Error::io(path, e))?;
    if got < 8 || len < 8 {
        return Err(bad(format!(
            "not a safetensors file: {len} bytes, too short for a header"
        )));
    }
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_SIZE {
        return Err(bad(format!(
            "not a safetensors file: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit"
        )));
    }
    if n > len - 8 {
        return Err(bad(format!(
            "truncated: header length {n} is larger than the {} bytes that follow it",
            len - 8
        )));
    }
    let mut header = vec![0u8; n as usize];
    let got = read(8, &mut header).map_err(|e| Error::io(path, e))?;
    if got as u64 != n {
        return Err(bad(format!(
            "truncated while reading the header ({got} of {n} bytes; did the file shrink?)"
        )));
    }
    parse_header(path, &header, len)
}

/// Parses and validates the JSON header `json` of a safetensors file of `file_len` bytes whose
/// length prefix is `json.len()`.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let bad = |what: String| Error::format(path, what);
    let text = std::str::from_utf8(json)
        .map_err(|e| bad(format!("corrupt header: invalid UTF-8 ({e})")))?;
    let entries: Entries = serde_json::from_str(text.trim_end_matches(' ')).map_err(|e| {
        use serde_json::error::Category;
        if e.to_string().starts_with(TOO_MANY_ENTRIES) {
            bad(format!(
                "header declares more than {MAX_TENSORS} tensors, the most supported"
            ))
        } else if e.classify() == Category::Data {
            // Not `{e}`: serde quotes the value it found, which the file controls.
            bad("corrupt header: not a JSON object".into())
        } else {
            bad(format!("corrupt header: invalid JSON ({e})"))
        }
    })?;
    let data_start = 8 + json.len() as u64;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or_else(|| bad("truncated: the file is shorter than its header".into()))?;

    let mut seen = HashSet::with_capacity(entries.0.len());
    for (name, _) in &entries.0 {
        if !seen.insert(name.as_str()) {
            let what = "appears twice in the header";
            return Err(if name == "__metadata__" {
                bad(format!("corrupt header: `__metadata__` {what}"))
            } else {
                Error::tensor(path, name, what)
            });
        }
    }
    drop(seen);
    let mut metadata = None;
    let mut parsed = Vec::with_capacity(entries.0.len());
    for (name, raw) in entries.0 {
        if name == "__metadata__" {
            metadata = Some(parse_metadata(path, raw)?);
            continue;
        }
        let (dtype, shape, begin, end) =
            parse_entry(raw).map_err(|e| Error::tensor(path, &name, e))?;
        parsed.push((begin, end, name, dtype, shape));
    }

    parsed.sort_by_key(|e| (e.0, e.1));
    let mut expect = 0u64;
    let mut tensors = Vec::with_capacity(parsed.len());
    for (begin, end, name, dtype, shape) in parsed {
        if begin != expect {
            let what = if begin < expect {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::tensor(
                path,
                name,
                format!("data_offsets [{begin}, {end}] {what} (expected it to start at {expect})"),
            ));
        }
        if end > data_len {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "truncated: data ends at byte {} but the file has {file_len} bytes",
                    data_start.saturating_add(end),
                ),
            ));
        }
        expect = end;
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            file: 0,
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
    Ok((tensors, metadata.unwrap_or_default()))
}

/// A JSON object as its members in file order, values left unparsed: duplicate names stay
/// visible (a map would keep only the last), and a value is parsed only once we know what it
/// should be, so a huge array where a shape belongs is never built as a tree of values.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    // The tensors and `__metadata__`.
                    if out.len() > MAX_TENSORS {
                        return Err(serde::de::Error::custom(TOO_MANY_ENTRIES));
                    }
                    out.push((k, m.next_value::<&'a RawValue>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A shape: at most [`MAX_DIMS`] non-negative integers, refused as soon as there are more.
struct Shape(Vec<usize>);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of non-negative integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<Shape, A::Error> {
                let mut dims = Vec::new();
                while let Some(d) = s.next_element::<u64>()? {
                    if dims.len() == MAX_DIMS {
                        return Err(serde::de::Error::custom(TOO_MANY_DIMS));
                    }
                    let d = usize::try_from(d)
                        .map_err(|_| serde::de::Error::custom("dimension too large"))?;
                    dims.push(d);
                }
                Ok(Shape(dims))
            }
        }
        d.deserialize_seq(V)
    }
}

const TOO_MANY_DIMS: &str = "too many dimensions";
const TOO_MANY_ENTRIES: &str = "too many entries";

/// One tensor's header entry: dtype, shape, offsets relative to the data, all checked against
/// each other. Errors are messages about the tensor.
fn parse_entry(raw: &RawValue) -> std::result::Result<(DType, Vec<usize>, u64, u64), String> {
    let fields: Entries =
        serde_json::from_str(raw.get()).map_err(|_| "header entry is not an object".to_string())?;
    let mut dtype = None;
    let mut shape = None;
    let mut offsets = None;
    for (k, v) in fields.0 {
        let slot = match k.as_str() {
            "dtype" => &mut dtype,
            "shape" => &mut shape,
            "data_offsets" => &mut offsets,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(format!("header entry has `{k}` twice"));
        }
    }
    let dtype_name: String = dtype
        .and_then(|v| serde_json::from_str(v.get()).ok())
        .ok_or("header entry has no dtype (a string)")?;
    let dtype = DType::from_safetensors_name(&dtype_name)
        .ok_or_else(|| format!("unsupported dtype {}", printable(&dtype_name)))?;
    let shape = match shape.map(|v| serde_json::from_str::<Shape>(v.get())) {
        None => return Err("header entry has no shape".into()),
        Some(Ok(s)) => s.0,
        Some(Err(e)) if e.to_string().starts_with(TOO_MANY_DIMS) => {
            return Err(format!("shape has more than {MAX_DIMS} dimensions"))
        }
        Some(Err(_)) => return Err("shape is not a list of non-negative integers".into()),
    };
    let (begin, end) = offsets
        .and_then(|v| serde_json::from_str::<(u64, u64)>(v.get()).ok())
        .ok_or("data_offsets is not a pair of non-negative integers")?;
    let want = nbytes(dtype, &shape).ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if end < begin || end - begin != want {
        return Err(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, but {dtype} {shape:?} needs {want}",
            end.saturating_sub(begin)
        ));
    }
    Ok((dtype, shape, begin, end))
}

/// `__metadata__`: an object of strings (or `null`, which the safetensors crate also accepts).
fn parse_metadata(path: &Path, raw: &RawValue) -> Result<BTreeMap<String, String>> {
    let bad = |what: String| Error::format(path, format!("corrupt header: {what}"));
    if raw.get().trim() == "null" {
        return Ok(BTreeMap::new());
    }
    let entries: Entries = serde_json::from_str(raw.get())
        .map_err(|_| bad("`__metadata__` is not an object".into()))?;
    let mut metadata = BTreeMap::new();
    for (k, v) in entries.0 {
        let s: String = serde_json::from_str(v.get())
            .map_err(|_| bad(format!("metadata `{}` is not a string", printable(&k))))?;
        if metadata.insert(k.clone(), s).is_some() {
            return Err(bad(format!("metadata `{}` appears twice", printable(&k))));
        }
    }
    Ok(metadata)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn good_file() -> Vec<u8> {
        let tensors = [
            OutTensor {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            OutTensor {
                name: "b".into(),
                dtype: DType::BF16,
                shape: vec![],
            },
        ];
        let meta = BTreeMap::from([("step".to_string(), "3".to_string())]);
        let (mut bytes, _) = encode_header(&tensors, &meta);
        bytes.extend(std::iter::repeat_n(7u8, 26));
        bytes
    }

    #[test]
    fn a_written_header_reads_back() {
        let (tensors, meta) = validate_bytes(Path::new("x"), &good_file()).unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].shape, vec![2, 3]);
        assert_eq!(meta["step"], "3");
    }

    #[test]
    fn too_many_entries_are_refused_before_they_are_stored() {
        let mut h = String::from("{");
        for _ in 0..=MAX_TENSORS {
            h.push_str("\"\":0,");
        }
        h.push_str("\"\":0}");
        let mut f = (h.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(h.as_bytes());
        let e = validate_bytes(Path::new("x"), &f).unwrap_err().to_string();
        assert!(e.contains("more than 1000000 tensors"), "{e}");
    }

    proptest! {
        #[test]
        fn every_truncation_is_refused(cut in 0usize..90) {
            let f = good_file();
            let cut = cut.min(f.len() - 1);
            prop_assert!(validate_bytes(Path::new("x"), &f[..cut]).is_err());
        }

        #[test]
        fn any_corruption_is_refused_or_consistent(i in 0usize..200, b in any::<u8>()) {
            let mut f = good_file();
            let i = i % f.len();
            f[i] = b;
            if let Ok((tensors, _)) = validate_bytes(Path::new("x"), &f) {
                // Whatever was accepted covers the data exactly.
                let data: u64 = tensors.iter().map(|t| t.len).sum();
                let n = u64::from_le_bytes(f[..8].try_into().unwrap());
                prop_assert_eq!(8 + n + data, f.len() as u64);
            }
        }
    }
}
