//! The safetensors format: a validating header reader and the header writer.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`), then the
//! data, each tensor's bytes at `8 + n + begin`. The reader applies the checks of the
//! safetensors crate's `validate()` (header size cap, known dtypes, checked size arithmetic,
//! offsets contiguous from 0 and covering the data exactly) and reports each failure with the
//! tensor it is about.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{Deserialize, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer as _;
use serde_json::{Map, Value};

use super::dtype::{nbytes, DType};
use super::safetensors_fast;
use super::{NameIndex, TensorInfo, TensorSpec};
use crate::error::{Error, Result};
use crate::text::printable;

/// Largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;
/// Most dimensions a tensor may have (NumPy 2's `NPY_MAXDIMS`; PyTorch tensors have far fewer).
pub const MAX_DIMS: usize = 64;
/// Most tensors one header may declare: ten times the largest models published.
pub const MAX_TENSORS: usize = 1_000_000;

/// A validated header: tensors in data order (file index 0) and the string metadata.
pub type Header = (Vec<TensorInfo>, BTreeMap<String, String>);

/// Validates a whole safetensors file held in memory (`path` only names it in errors).
///
/// The checks of [`validate`], and names unique (which the checkpoint layer checks when it
/// indexes them). The entry point of the fuzz target `safetensors_header`.
pub fn validate_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    let header = validate(path, bytes.len() as u64, |off, buf| {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| bytes.get(o..))
            .unwrap_or(&[]);
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    })?;
    match duplicate_error(path, &header.0) {
        Some(e) => Err(e),
        None => Ok(header),
    }
}

/// The checks of the safetensors crate's `validate()`, with positioned reads of a file of
/// `len` bytes through `read` (which returns how many bytes it could read at an offset).
///
/// Nothing is allocated before the header length is known to fit in the file and under
/// [`MAX_HEADER_SIZE`]; after that, memory is bounded by a small multiple of the header.
pub fn validate(
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
///
/// Headers in the form writers produce are read by [`safetensors_fast::parse`] (about 0.4 µs per
/// tensor here); any other JSON, and every error, by [`parse_serde`], which tells what is wrong
/// and with which tensor. Either way one pass, and no value is built that is not kept.
/// Duplicate names are found when the checkpoint layer indexes the tensors.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let bad = |what: String| Error::format(path, what);
    let text = std::str::from_utf8(json)
        .map_err(|e| bad(format!("corrupt header: invalid UTF-8 ({e})")))?;
    let text = text.trim_end_matches(' ');
    let (mut tensors, metadata) = match safetensors_fast::parse(text) {
        Some(parsed) => parsed,
        None => parse_serde(path, text)?,
    };
    // The fast path reserves for the most tensors the header could hold.
    tensors.shrink_to_fit();
    // A name given twice explains a layout that does not add up better than the layout does.
    locate(path, &mut tensors, 8 + json.len() as u64, file_len)
        .map_err(|e| duplicate_error(path, &tensors).unwrap_or(e))?;
    Ok((tensors, metadata.unwrap_or_default()))
}

/// The error for the first tensor of `tensors` whose name an earlier one has, if any.
fn duplicate_error(path: &Path, tensors: &[TensorInfo]) -> Option<Error> {
    let dup = NameIndex::new(tensors).err()?;
    Some(Error::tensor(
        path,
        &tensors[dup].name,
        "appears twice in the header",
    ))
}

/// Checks that `tensors` (offsets relative to the data) cover the data of a file of
/// `file_len` bytes, starting at `data_start`, exactly, and makes their offsets absolute; sorts
/// them in data order.
fn locate(path: &Path, tensors: &mut [TensorInfo], data_start: u64, file_len: u64) -> Result<()> {
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or_else(|| Error::format(path, "truncated: the file is shorter than its header"))?;
    // Stable: zero-size tensors at one offset stay in file order.
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut expect = 0u64;
    for t in tensors.iter_mut() {
        let (begin, end) = (t.offset, t.offset + t.len);
        if begin != expect {
            let what = if begin < expect {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::tensor(
                path,
                &t.name,
                format!("data_offsets [{begin}, {end}] {what} (expected it to start at {expect})"),
            ));
        }
        if end > data_len {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "truncated: data ends at byte {} but the file has {file_len} bytes",
                    data_start.saturating_add(end),
                ),
            ));
        }
        expect = end;
        t.offset = data_start + begin;
    }
    if expect != data_len {
        return Err(Error::format(
            path,
            format!(
                "{} bytes after the last tensor are not described by the header",
                data_len - expect
            ),
        ));
    }
    Ok(())
}

/// The serde path of the header parser: any JSON, every error found and explained. Headers
/// in the form writers produce take the fast path, [`safetensors_fast::parse`], which gives the
/// same answer (the fuzz target `safetensors_json` compares them).
pub fn parse_serde(path: &Path, text: &str) -> Result<safetensors_fast::Parsed> {
    let bad = |what: String| Error::format(path, what);
    let failure = RefCell::new(None);
    parse_object(text, &failure).map_err(|e| {
        use serde_json::error::Category;
        // Invalid JSON anywhere is told as such, rather than what was wrong before it.
        let e = match serde_json::from_str::<&serde_json::value::RawValue>(text) {
            Err(syntax) if e.classify() == Category::Data => syntax,
            _ => e,
        };
        match (e.classify(), failure.into_inner()) {
            (Category::Data, Some(Failure::Tensor(name, what))) => Error::tensor(path, name, what),
            (Category::Data, Some(Failure::Header(what))) => bad(what),
            // Not `{e}`: serde quotes the value it found, which the file controls.
            (Category::Data, None) => bad("corrupt header: not a JSON object".into()),
            _ => bad(format!("corrupt header: invalid JSON ({e})")),
        }
    })
}

/// Why a header was refused, recorded where it was found (serde's own error would not name
/// the tensor, and quotes values the file controls).
enum Failure {
    /// About one tensor.
    Tensor(String, String),
    /// About the header (message in full).
    Header(String),
}

/// Where the visitors record the first [`Failure`] they find.
type Failures = RefCell<Option<Failure>>;

/// Records `f` unless a failure was already recorded (by a visitor deeper down, which knows
/// more), and returns the error that stops the parse.
fn fail<E: serde::de::Error>(failures: &Failures, f: Failure) -> E {
    record(failures, f);
    E::custom("refused")
}

/// Records `f` unless a failure was already recorded.
fn record(failures: &Failures, f: Failure) {
    let mut slot = failures.borrow_mut();
    if slot.is_none() {
        *slot = Some(f);
    }
}

/// The header object: its entries in file order and `__metadata__`. Syntax errors are serde's;
/// anything else well-formed but wrong is recorded in `failures`.
fn parse_object(text: &str, failures: &Failures) -> serde_json::Result<safetensors_fast::Parsed> {
    let mut de = serde_json::Deserializer::from_str(text);
    let header = (&mut de).deserialize_map(HeaderVisitor(failures))?;
    de.end()?;
    Ok(header)
}

struct HeaderVisitor<'f>(&'f Failures);

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = safetensors_fast::Parsed;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
        let failures = self.0;
        let mut entries = Vec::with_capacity(m.size_hint().unwrap_or(0).min(MAX_TENSORS));
        let mut metadata = None;
        while let Some(name) = m.next_key::<String>()? {
            if name == "__metadata__" {
                if metadata.is_some() {
                    return Err(fail(
                        failures,
                        Failure::Header(
                            "corrupt header: `__metadata__` appears twice in the header".into(),
                        ),
                    ));
                }
                let m = m.next_value_seed(MetadataSeed(failures)).inspect_err(|_| {
                    let what = "corrupt header: `__metadata__` is not an object";
                    record(failures, Failure::Header(what.into()));
                })?;
                metadata = Some(m.unwrap_or_default());
                continue;
            }
            if entries.len() >= MAX_TENSORS {
                return Err(fail(
                    failures,
                    Failure::Header(format!(
                        "header declares more than {MAX_TENSORS} tensors, the most supported"
                    )),
                ));
            }
            match m.next_value_seed(EntrySeed(failures, &name)) {
                Ok((dtype, shape, begin, end)) => entries.push(TensorInfo {
                    name,
                    dtype,
                    shape,
                    file: 0,
                    offset: begin,
                    len: end - begin,
                    segments: None,
                    view: None,
                }),
                Err(e) => {
                    let what = "header entry is not an object".to_string();
                    record(failures, Failure::Tensor(name, what));
                    return Err(e);
                }
            }
        }
        Ok((entries, metadata))
    }
}

/// `__metadata__`: an object of strings, or `null` (which the safetensors crate also accepts).
struct MetadataSeed<'f>(&'f Failures);

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = Option<BTreeMap<String, String>>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of strings")
    }

    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
        let failures = self.0;
        let bad = |what: String| Failure::Header(format!("corrupt header: {what}"));
        let mut metadata = BTreeMap::new();
        while let Some(k) = m.next_key::<String>()? {
            let v = m.next_value::<String>().inspect_err(|_| {
                let what = format!("metadata `{}` is not a string", printable(&k));
                record(failures, bad(what));
            })?;
            if metadata.contains_key(&k) {
                let what = format!("metadata `{}` appears twice", printable(&k));
                return Err(fail(failures, bad(what)));
            }
            metadata.insert(k, v);
        }
        Ok(Some(metadata))
    }
}

/// The fields of a header entry that mean something.
enum Field {
    Dtype,
    Shape,
    Offsets,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Field, E> {
                Ok(match s {
                    "dtype" => Field::Dtype,
                    "shape" => Field::Shape,
                    "data_offsets" => Field::Offsets,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// One tensor's entry: dtype, shape, offsets relative to the data, checked against each other.
struct EntrySeed<'f, 'n>(&'f Failures, &'n str);

impl<'de> DeserializeSeed<'de> for EntrySeed<'_, '_> {
    type Value = (DType, Vec<usize>, u64, u64);
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_, '_> {
    type Value = (DType, Vec<usize>, u64, u64);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a header entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Self::Value, A::Error> {
        let EntrySeed(failures, name) = self;
        let refuse = |what: String| fail::<A::Error>(failures, Failure::Tensor(name.into(), what));
        let note = |what: String| record(failures, Failure::Tensor(name.into(), what));
        let twice = |k: &str| refuse(format!("header entry has `{k}` twice"));
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        while let Some(field) = m.next_key::<Field>()? {
            match field {
                Field::Dtype => {
                    if dtype.is_some() {
                        return Err(twice("dtype"));
                    }
                    let s = m
                        .next_value::<DtypeName>()
                        .inspect_err(|_| note("header entry has no dtype (a string)".into()))?;
                    let d = DType::from_safetensors_name(&s.0)
                        .ok_or_else(|| refuse(format!("unsupported dtype {}", printable(&s.0))))?;
                    dtype = Some(d);
                }
                Field::Shape => {
                    if shape.is_some() {
                        return Err(twice("shape"));
                    }
                    let s = m.next_value::<Shape>().inspect_err(|e| {
                        note(if e.to_string().starts_with(TOO_MANY_DIMS) {
                            format!("shape has more than {MAX_DIMS} dimensions")
                        } else {
                            "shape is not a list of non-negative integers".into()
                        })
                    })?;
                    shape = Some(s.0);
                }
                Field::Offsets => {
                    if offsets.is_some() {
                        return Err(twice("data_offsets"));
                    }
                    let o = m.next_value::<(u64, u64)>().inspect_err(|_| {
                        note("data_offsets is not a pair of non-negative integers".into())
                    })?;
                    offsets = Some(o);
                }
                Field::Other => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        let dtype = dtype.ok_or_else(|| refuse("header entry has no dtype (a string)".into()))?;
        let shape = shape.ok_or_else(|| refuse("header entry has no shape".into()))?;
        let (begin, end) = offsets
            .ok_or_else(|| refuse("data_offsets is not a pair of non-negative integers".into()))?;
        let want =
            nbytes(dtype, &shape).ok_or_else(|| refuse(format!("shape {shape:?} overflows")))?;
        if end < begin || end - begin != want {
            return Err(refuse(format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but {dtype} {shape:?} needs {want}",
                end.saturating_sub(begin)
            )));
        }
        Ok((dtype, shape, begin, end))
    }
}

/// A dtype's name, borrowed from the header when it holds no escapes.
struct DtypeName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for DtypeName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DtypeName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                s: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(DtypeName(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(
                self,
                s: &str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(DtypeName(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
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
                let mut dims = Vec::with_capacity(s.size_hint().unwrap_or(0).min(8));
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

/// The serialized header (length prefix included) and, per tensor, the absolute offset of its
/// data in the file. Tensors are laid out in the order given.
pub fn encode_header(
    tensors: &[TensorSpec],
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
            TensorSpec {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            TensorSpec {
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
    fn a_name_given_twice_is_told_before_the_layout_it_spoils() {
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        // Contiguous, then 3 bytes too many, or 1 too few: either way the name is the news.
        for data in [7usize, 3] {
            let mut f = (h.len() as u64).to_le_bytes().to_vec();
            f.extend_from_slice(h.as_bytes());
            f.extend(std::iter::repeat_n(0u8, data));
            let e = validate_bytes(Path::new("x"), &f).unwrap_err().to_string();
            assert!(e.contains("tensor `a`: appears twice in the header"), "{e}");
        }
    }

    #[test]
    fn too_many_entries_are_refused_before_they_are_stored() {
        let mut h = String::from("{");
        let entry = r#""":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}"#;
        for _ in 0..MAX_TENSORS {
            h.push_str(entry);
            h.push(',');
        }
        h.push_str(entry);
        h.push('}');
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
