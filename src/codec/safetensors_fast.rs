//! The fast path of the safetensors header parser: the headers that writers produce (plain
//! strings, integer shapes and offsets, the three known fields), parsed byte by byte with no
//! intermediate values.
//!
//! It answers `None` for anything it does not handle exactly as JSON and the serde path do
//! (escapes, unknown fields, floats, anything wrong), and the serde path, which finds and
//! explains every error, parses the header again. So it only has to be right about what it
//! accepts: the fuzz target `safetensors_json` checks that it agrees with the serde path
//! whenever it answers.

use std::collections::BTreeMap;

use super::dtype::{nbytes, DType};
use super::safetensors::{MAX_DIMS, MAX_TENSORS};
use super::TensorInfo;

/// The tensors in file order, their `offset` relative to the start of the data, and
/// `__metadata__` (absent, or `null` or an object of strings).
pub type Parsed = (Vec<TensorInfo>, Option<BTreeMap<String, String>>);

/// Parses `text` (valid UTF-8) when it is in the simple form; `None` otherwise.
pub fn parse(text: &str) -> Option<Parsed> {
    let mut p = Parser {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    let parsed = p.header()?;
    p.ws();
    (p.i == p.b.len()).then_some(parsed)
}

struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

/// The index of the first `"`, `\\` or control character in `b`, eight bytes at a time.
fn special(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` is zero: the classic test, exact in its lowest set byte (the one we want,
    // the words being read little-endian).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let hit = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            // bytes below 0x20: those whose top three bits are all zero
            | zero(x & (ONES * 0xe0));
        if hit != 0 {
            return Some(at + hit.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = chunks.remainder();
    rest.iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|i| at + i)
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// Skips whitespace, then consumes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    /// A string without escapes or control characters. The input is valid UTF-8 and `"` is
    /// ASCII, so the text between the quotes is too.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.i;
        let end = start + special(&self.b[start..])?;
        if self.b[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        self.text.get(start..end)
    }

    /// A JSON integer in `0..2^64`: `0` or digits without a leading zero, not followed by a
    /// fraction or an exponent (which would make it a float).
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(&c) = self.b.get(self.i) {
            if !c.is_ascii_digit() {
                break;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        match self.b.get(self.i) {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(v),
        }
    }

    /// `{ member, ... }` with `member(self, key)` parsing each value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            member(self, key)?;
            if self.eat(b'}') {
                return Some(());
            }
            self.expect(b',')?;
        }
    }

    fn header(&mut self) -> Option<Parsed> {
        // An entry takes at least 50 bytes (`"":{"dtype":"F32","shape":[],"data_offsets":[0,0]}`):
        // reserving for that many never reallocates, and pages not used are never touched.
        let mut entries = Vec::with_capacity((self.b.len() / 50).min(MAX_TENSORS));
        let mut metadata = None;
        self.object(|p, key| {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return None;
                }
                metadata = Some(p.metadata()?);
                return Some(());
            }
            if entries.len() >= MAX_TENSORS {
                return None;
            }
            entries.push(p.entry(key)?);
            Some(())
        })?;
        Some((entries, metadata.map(Option::unwrap_or_default)))
    }

    /// `null` (`None`) or an object of strings with distinct keys.
    fn metadata(&mut self) -> Option<Option<BTreeMap<String, String>>> {
        self.ws();
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(None);
        }
        let mut m = BTreeMap::new();
        self.object(|p, key| {
            let v = p.string()?;
            m.insert(key.to_owned(), v.to_owned())
                .is_none()
                .then_some(())
        })?;
        Some(Some(m))
    }

    fn entry(&mut self, name: &str) -> Option<TensorInfo> {
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        self.object(|p, key| {
            match key {
                "dtype" if dtype.is_none() => {
                    dtype = Some(DType::from_safetensors_name(p.string()?)?);
                }
                "shape" if shape.is_none() => shape = Some(p.shape()?),
                "data_offsets" if offsets.is_none() => {
                    p.expect(b'[')?;
                    let begin = p.uint()?;
                    p.expect(b',')?;
                    let end = p.uint()?;
                    p.expect(b']')?;
                    offsets = Some((begin, end));
                }
                _ => return None,
            }
            Some(())
        })?;
        let (dtype, shape, (begin, end)) = (dtype?, shape?, offsets?);
        if end.checked_sub(begin)? != nbytes(dtype, &shape)? {
            return None;
        }
        Some(TensorInfo {
            name: name.to_owned(),
            dtype,
            shape,
            file: 0,
            offset: begin,
            len: end - begin,
            segments: None,
            view: None,
        })
    }

    fn shape(&mut self) -> Option<Vec<usize>> {
        self.expect(b'[')?;
        let mut dims = Vec::new();
        if self.eat(b']') {
            return Some(dims);
        }
        loop {
            if dims.len() == MAX_DIMS {
                return None;
            }
            dims.push(usize::try_from(self.uint()?).ok()?);
            if self.eat(b']') {
                return Some(dims);
            }
            self.expect(b',')?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_finds_the_first_quote_backslash_or_control_character() {
        let plain = |c: u8| c != b'"' && c != b'\\' && c >= 0x20;
        for len in 0..40 {
            for at in 0..=len {
                for c in [b'"', b'\\', 0, 0x1f, 0x20, b'!', 0x80, 0xff, 0x7f] {
                    let mut b = vec![b'a'; len];
                    if at < len {
                        b[at] = c;
                    }
                    let want = b.iter().position(|&c| !plain(c));
                    assert_eq!(special(&b), want, "{b:?}");
                }
            }
        }
    }

    #[test]
    fn parses_what_writers_write() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[],"data_offsets":[4,6]},
            "a" : { "shape" : [ 1 ] , "data_offsets" : [ 0 , 4 ] , "dtype" : "F32" } }"#;
        let (entries, meta) = parse(h).unwrap();
        assert_eq!(meta.unwrap()["format"], "pt");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "b");
        assert_eq!(
            (entries[0].dtype, entries[0].shape.clone()),
            (DType::BF16, vec![])
        );
        assert_eq!((entries[1].offset, entries[1].len), (0, 4));
        assert_eq!(
            parse(r#"{"__metadata__":null}"#),
            Some((vec![], Some(BTreeMap::new())))
        );
        assert_eq!(parse("{}"), Some((vec![], None)));
    }

    proptest::proptest! {
        /// Whatever a writer writes (names with any characters, escaped or not), the fast path
        /// reads as the serde path does, or leaves it to it.
        #[test]
        fn agrees_with_the_serde_path_on_written_headers(
            tensors in proptest::collection::vec(
                ("\\PC{0,12}", 0usize..4, proptest::collection::vec(0usize..5, 0..4)),
                0..6,
            ),
            meta in proptest::collection::btree_map("\\PC{0,6}", "\\PC{0,6}", 0..3),
        ) {
            use crate::codec::safetensors::{encode_header, parse_serde};
            use crate::codec::TensorSpec;
            let dtypes = [DType::F32, DType::BF16, DType::F64, DType::I64];
            let out: Vec<TensorSpec> = tensors
                .iter()
                .map(|(name, d, shape)| TensorSpec {
                    name: name.clone(),
                    dtype: dtypes[*d],
                    shape: shape.clone(),
                })
                .collect();
            let (bytes, _) = encode_header(&out, &meta);
            let text = std::str::from_utf8(&bytes[8..]).unwrap().trim_end_matches(' ');
            let slow = parse_serde(std::path::Path::new("x"), text).unwrap();
            let plain = text.bytes().all(|c| c != b'\\');
            match parse(text) {
                Some(fast) => proptest::prop_assert_eq!(fast, slow),
                None => proptest::prop_assert!(!plain, "a plain header left to the serde path"),
            }
        }
    }

    #[test]
    fn leaves_everything_else_to_the_serde_path() {
        for h in [
            r#"{"a\u0062":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
            r#"{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1]}}"#,
            r#"{"__metadata__":{"k":"v","k":"w"}}"#,
            r#"{"__metadata__":{"k":1}}"#,
            r#"{"__metadata__":null,"__metadata__":null}"#,
            "{\"a\t\":{}}",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x"#,
            r#"[]"#,
            r#"{"#,
            "",
        ] {
            assert_eq!(parse(h), None, "{h}");
        }
    }
}
