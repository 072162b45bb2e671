//! The zip container of PyTorch checkpoints: a validating reader of the central directory
//! (zip64 included) and of local headers, for archives whose entries are stored uncompressed.
//!
//! `torch.save` writes every record stored (method 0), 64-byte aligned, with data descriptors
//! and zip64 end records. Only the directory is read here; record data is read later with
//! positioned reads of the byte ranges [`data_range`] returns. Every size and offset read from
//! the file is checked against the file's length before it is used.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Largest central directory read (it is read whole).
pub const MAX_CENTRAL_DIRECTORY: u64 = 256 << 20;

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;
const SIG_DESCRIPTOR: u32 = 0x0807_4b50;
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_LEN: u64 = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: u64 = 30;

/// Bytes to read from: an open file of known length, or memory (tests, fuzzing).
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    File(&'a File, u64),
    /// The bytes `base .. base + len` of a file, as an archive of their own (the chunks of a
    /// DCP checkpoint): offsets count from `base`.
    Part(&'a File, u64, u64),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Source::File(_, len) | Source::Part(_, _, len) => *len,
            Source::Bytes(b) => b.len() as u64,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `buf.len()` bytes at `off`; a range past the end is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                format!(
                    "truncated: needs bytes {off}..{} but the file has {}",
                    off.saturating_add(buf.len() as u64),
                    self.len()
                )
            })?;
        match self {
            Source::File(f, _) => f.read_exact_at(buf, off).map_err(|e| e.to_string()),
            Source::Part(f, base, _) => f.read_exact_at(buf, base + off).map_err(|e| e.to_string()),
            Source::Bytes(b) => {
                buf.copy_from_slice(&b[off as usize..end as usize]);
                Ok(())
            }
        }
    }

    /// Reads `len` bytes at `off` into a new buffer (after checking they exist).
    pub fn read_vec(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        if off.checked_add(len).map_or(true, |e| e > self.len()) {
            return Err(format!(
                "truncated: needs bytes {off}..{} but the file has {}",
                off.saturating_add(len),
                self.len()
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, off)?;
        Ok(buf)
    }
}

/// One entry of the central directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// General purpose flags (bit 0: encrypted, bit 3: data descriptor follows the data).
    pub flags: u16,
    /// Compression method (0: stored).
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    /// Offset of the local header.
    pub local_offset: u64,
    /// Offset of this entry's record in the central directory.
    pub central_offset: u64,
}

/// The central directory and end records of an archive.
#[derive(Clone, Debug)]
pub struct Directory {
    pub entries: Vec<Entry>,
    /// Where the central directory starts; every entry's data ends before it.
    pub central_offset: u64,
    /// Offset of the (32-bit) end-of-central-directory record.
    pub eocd_offset: u64,
    /// The archive comment.
    pub comment: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Whether the bytes at the start of a file are a zip local header or an empty archive.
pub fn is_zip(magic: &[u8]) -> bool {
    magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06")
}

/// Reads and validates the end records and the central directory.
pub fn read_directory(src: &Source) -> Result<Directory, String> {
    let len = src.len();
    if len < EOCD_LEN {
        return Err(format!(
            "truncated: {len} bytes is too short for a zip archive"
        ));
    }
    // The end record is the last 22 bytes plus a comment of up to 65535 bytes.
    let tail_len = len.min(EOCD_LEN + 0xFFFF);
    let tail_start = len - tail_len;
    let tail = src.read_vec(tail_start, tail_len)?;
    let mut found = None;
    let mut i = tail.len() - EOCD_LEN as usize;
    loop {
        if u32_at(&tail, i) == SIG_EOCD
            && i + EOCD_LEN as usize + u16_at(&tail, i + 20) as usize == tail.len()
        {
            found = Some(i);
            break;
        }
        if i == 0 {
            break;
        }
        i -= 1;
    }
    let i = found.ok_or("zip end record not found (truncated or not a zip archive)")?;
    let eocd = &tail[i..];
    let eocd_offset = tail_start + i as u64;
    if u16_at(eocd, 4) != 0 || u16_at(eocd, 6) != 0 {
        return Err("multi-disk zip archives are not supported".into());
    }
    let comment = eocd[EOCD_LEN as usize..].to_vec();
    let mut count = u64::from(u16_at(eocd, 10));
    let mut cd_size = u64::from(u32_at(eocd, 12));
    let mut cd_offset = u64::from(u32_at(eocd, 16));
    // The directory must end where the end records begin.
    let mut cd_end_limit = eocd_offset;

    // Zip64: a locator right before the end record points at the zip64 end record.
    if eocd_offset >= ZIP64_LOCATOR_LEN {
        let loc_off = eocd_offset - ZIP64_LOCATOR_LEN;
        let loc = src.read_vec(loc_off, ZIP64_LOCATOR_LEN)?;
        if u32_at(&loc, 0) == SIG_ZIP64_LOCATOR {
            let z_off = u64_at(&loc, 8);
            if z_off
                .checked_add(ZIP64_EOCD_LEN)
                .map_or(true, |e| e > loc_off)
            {
                return Err(format!(
                    "corrupt zip64 locator: end record offset {z_off} is out of range"
                ));
            }
            let z = src.read_vec(z_off, ZIP64_EOCD_LEN)?;
            if u32_at(&z, 0) != SIG_ZIP64_EOCD {
                return Err("corrupt zip64 end record: bad signature".into());
            }
            if u32_at(&z, 16) != 0 || u32_at(&z, 20) != 0 {
                return Err("multi-disk zip archives are not supported".into());
            }
            count = u64_at(&z, 32);
            cd_size = u64_at(&z, 40);
            cd_offset = u64_at(&z, 48);
            cd_end_limit = z_off;
        }
    }
    if cd_size > MAX_CENTRAL_DIRECTORY {
        return Err(format!(
            "central directory of {cd_size} bytes exceeds the {MAX_CENTRAL_DIRECTORY}-byte limit"
        ));
    }
    if cd_offset
        .checked_add(cd_size)
        .map_or(true, |e| e > cd_end_limit)
    {
        return Err(format!(
            "corrupt zip: central directory {cd_offset}+{cd_size} runs past its end records \
             at {cd_end_limit} (truncated file?)"
        ));
    }
    if count > cd_size / CENTRAL_LEN as u64 {
        return Err(format!(
            "corrupt zip: {count} entries cannot fit in a {cd_size}-byte central directory"
        ));
    }
    let cd = src.read_vec(cd_offset, cd_size)?;
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for n in 0..count {
        let bad = |what: &str| format!("corrupt zip: central directory entry {n}: {what}");
        if at + CENTRAL_LEN > cd.len() {
            return Err(bad("runs past the end of the directory"));
        }
        let h = &cd[at..at + CENTRAL_LEN];
        if u32_at(h, 0) != SIG_CENTRAL {
            return Err(bad("bad signature"));
        }
        let flags = u16_at(h, 8);
        let method = u16_at(h, 10);
        let crc32 = u32_at(h, 16);
        let mut compressed_size = u64::from(u32_at(h, 20));
        let mut size = u64::from(u32_at(h, 24));
        let name_len = u16_at(h, 28) as usize;
        let extra_len = u16_at(h, 30) as usize;
        let comment_len = u16_at(h, 32) as usize;
        let mut local_offset = u64::from(u32_at(h, 42));
        let var = at + CENTRAL_LEN;
        let next = var + name_len + extra_len + comment_len;
        if next > cd.len() {
            return Err(bad("runs past the end of the directory"));
        }
        let name = std::str::from_utf8(&cd[var..var + name_len])
            .map_err(|_| bad("name is not UTF-8"))?
            .to_string();
        // Zip64 extended information: the 64-bit values of the fields saturated at 0xFFFFFFFF,
        // in this order.
        let mut extra = &cd[var + name_len..var + name_len + extra_len];
        while extra.len() >= 4 {
            let id = u16_at(extra, 0);
            let len = u16_at(extra, 2) as usize;
            if 4 + len > extra.len() {
                return Err(bad("extra field runs past its end"));
            }
            if id == 1 {
                let mut data = &extra[4..4 + len];
                for field in [&mut size, &mut compressed_size, &mut local_offset] {
                    if *field == 0xFFFF_FFFF {
                        if data.len() < 8 {
                            return Err(bad("zip64 extra field too short"));
                        }
                        *field = u64_at(data, 0);
                        data = &data[8..];
                    }
                }
            }
            extra = &extra[4 + len..];
        }
        entries.push(Entry {
            name,
            flags,
            method,
            crc32,
            compressed_size,
            size,
            local_offset,
            central_offset: cd_offset + at as u64,
        });
        at = next;
    }
    Ok(Directory {
        entries,
        central_offset: cd_offset,
        eocd_offset,
        comment,
    })
}

/// Positioned reads of exactly `buf.len()` bytes.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), String>;
}

impl ReadAt for Source<'_> {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        Source::read_exact_at(self, buf, off)
    }
}

/// Bytes read at once by [`Headers`].
const WINDOW: usize = 4096;

/// Reads the local headers of many entries through a window of the file: the headers of small
/// records lie close together, and one read then serves many (a `.pth` of 16 384 small tensors
/// took a `pread` per header). Reads outside the window move it.
pub struct Headers<'a> {
    src: &'a Source<'a>,
    /// Offset and bytes of the window.
    window: std::cell::RefCell<(u64, Vec<u8>)>,
}

impl<'a> Headers<'a> {
    pub fn new(src: &'a Source<'a>) -> Headers<'a> {
        Headers {
            src,
            window: std::cell::RefCell::new((0, Vec::new())),
        }
    }
}

impl ReadAt for Headers<'_> {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        let mut w = self.window.borrow_mut();
        let inside = |start: u64, data: &[u8]| {
            off.checked_sub(start)
                .and_then(|at| usize::try_from(at).ok())
                .filter(|&at| at.checked_add(buf.len()).is_some_and(|e| e <= data.len()))
        };
        if inside(w.0, &w.1).is_none() {
            let want = buf.len().max(WINDOW) as u64;
            let len = want.min(self.src.len().saturating_sub(off));
            if len < buf.len() as u64 {
                // Past the end: the source says so.
                return self.src.read_exact_at(buf, off);
            }
            w.1.resize(len as usize, 0);
            self.src.read_exact_at(&mut w.1, off)?;
            w.0 = off;
        }
        let at = inside(w.0, &w.1).expect("the window holds the range");
        buf.copy_from_slice(&w.1[at..at + buf.len()]);
        Ok(())
    }
}

/// The absolute byte range of a stored entry's data, from its local header. Fails for
/// compressed or encrypted entries and for data that does not lie before the central directory.
pub fn data_range(src: &impl ReadAt, dir: &Directory, e: &Entry) -> Result<(u64, u64), String> {
    let bad = |what: String| format!("zip entry `{}`: {what}", e.name);
    if e.flags & 1 != 0 {
        return Err(bad("is encrypted".into()));
    }
    if e.method != 0 {
        return Err(bad(format!(
            "is compressed (method {}); torch.save stores entries uncompressed, \
             so re-save the checkpoint with torch.save",
            e.method
        )));
    }
    if e.compressed_size != e.size {
        return Err(bad(format!(
            "is stored but its sizes differ ({} vs {})",
            e.compressed_size, e.size
        )));
    }
    if e.local_offset
        .checked_add(LOCAL_LEN)
        .map_or(true, |end| end > dir.central_offset)
    {
        return Err(bad(format!(
            "local header offset {} is outside the archive",
            e.local_offset
        )));
    }
    let mut h = [0u8; LOCAL_LEN as usize];
    src.read_exact_at(&mut h, e.local_offset).map_err(&bad)?;
    if u32_at(&h, 0) != SIG_LOCAL {
        return Err(bad("local header has a bad signature".into()));
    }
    let name_len = u64::from(u16_at(&h, 26));
    let extra_len = u64::from(u16_at(&h, 28));
    let start = e.local_offset + LOCAL_LEN + name_len + extra_len;
    if name_len != e.name.len() as u64 {
        return Err(bad(
            "local header names another entry than the central directory".into(),
        ));
    }
    let end = start
        .checked_add(e.size)
        .filter(|&end| end <= dir.central_offset);
    if end.is_none() {
        return Err(bad(format!(
            "data {start}+{} runs past the central directory at {} (truncated file?)",
            e.size, dir.central_offset
        )));
    }
    let mut name = vec![0u8; name_len as usize];
    src.read_exact_at(&mut name, e.local_offset + LOCAL_LEN)
        .map_err(&bad)?;
    if name != e.name.as_bytes() {
        return Err(bad(
            "local header names another entry than the central directory".into(),
        ));
    }
    Ok((start, e.size))
}

/// Offsets of the places that hold an entry's CRC-32 besides the central directory: the local
/// header, and the data descriptor after the data when flag bit 3 is set. Only places whose
/// current value is `e.crc32` are returned (writers may leave zeros in the local header).
pub fn crc_locations(src: &Source, e: &Entry, data_end: u64) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    let mut b = [0u8; 8];
    src.read_exact_at(&mut b[..4], e.local_offset + 14)?;
    if u32_at(&b, 0) == e.crc32 {
        out.push(e.local_offset + 14);
    }
    if e.flags & 8 != 0 && data_end + 8 <= src.len() {
        src.read_exact_at(&mut b, data_end)?;
        if u32_at(&b, 0) == SIG_DESCRIPTOR && u32_at(&b, 4) == e.crc32 {
            out.push(data_end + 4);
        } else if u32_at(&b, 0) == e.crc32 {
            out.push(data_end);
        }
    }
    Ok(out)
}

/// Writing archives: the records `torch.save` writes, in the same layout.
pub mod write {
    use super::*;

    /// Data of every entry starts at a multiple of this, as in `torch.save`.
    pub const ALIGN: u64 = 64;

    /// Where one entry goes.
    #[derive(Clone, Debug)]
    pub struct Planned {
        pub name: String,
        pub size: u64,
        pub local_offset: u64,
        pub data_offset: u64,
        /// The local header (CRC field zero until known).
        pub header: Vec<u8>,
    }

    fn needs_zip64(size: u64, offset: u64) -> bool {
        size >= 0xFFFF_FFFF || offset >= 0xFFFF_FFFF
    }

    /// Lays out entries of the given names and sizes: local header, padding so that the data
    /// is [`ALIGN`]-aligned, data. Returns the entries and where the central directory starts.
    pub fn plan(entries: &[(String, u64)]) -> (Vec<Planned>, u64) {
        let mut out = Vec::with_capacity(entries.len());
        let mut off = 0u64;
        for (name, size) in entries {
            let zip64 = *size >= 0xFFFF_FFFF;
            let mut extra = Vec::new();
            if zip64 {
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&16u16.to_le_bytes());
                extra.extend_from_slice(&size.to_le_bytes());
                extra.extend_from_slice(&size.to_le_bytes());
            }
            let raw = off + LOCAL_LEN + name.len() as u64 + extra.len() as u64;
            let mut pad = (ALIGN - raw % ALIGN) % ALIGN;
            if pad != 0 && pad < 4 {
                pad += ALIGN;
            }
            if pad != 0 {
                // Padding as torch writes it: an extra field with id "FB" filled with 'Z'.
                extra.extend_from_slice(b"FB");
                extra.extend_from_slice(&((pad - 4) as u16).to_le_bytes());
                extra.extend(std::iter::repeat(b'Z').take((pad - 4) as usize));
            }
            let mut h = Vec::with_capacity(LOCAL_LEN as usize + name.len() + extra.len());
            h.extend_from_slice(&SIG_LOCAL.to_le_bytes());
            h.extend_from_slice(&(if zip64 { 45u16 } else { 20 }).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // stored
            h.extend_from_slice(&0u16.to_le_bytes()); // time
            h.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
            h.extend_from_slice(&0u32.to_le_bytes()); // crc, patched at commit
            let s32 = if zip64 { 0xFFFF_FFFF } else { *size as u32 };
            h.extend_from_slice(&s32.to_le_bytes());
            h.extend_from_slice(&s32.to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(name.as_bytes());
            h.extend_from_slice(&extra);
            let data_offset = off + h.len() as u64;
            debug_assert_eq!(data_offset % ALIGN, 0);
            out.push(Planned {
                name: name.clone(),
                size: *size,
                local_offset: off,
                data_offset,
                header: h,
            });
            off = data_offset + size;
        }
        (out, off)
    }

    /// A whole archive of `records` (name, data), laid out by [`plan`], in memory: for small
    /// archives (a non-tensor entry of a DCP checkpoint, tests).
    pub fn archive(records: &[(String, &[u8])]) -> Vec<u8> {
        let spec: Vec<(String, u64)> = records
            .iter()
            .map(|(n, d)| (n.clone(), d.len() as u64))
            .collect();
        let (entries, cd_offset) = plan(&spec);
        let mut out = vec![0u8; cd_offset as usize];
        let mut with = Vec::with_capacity(entries.len());
        for (e, (_, data)) in entries.iter().zip(records) {
            let crc = crc32fast::hash(data);
            let mut h = e.header.clone();
            h[14..18].copy_from_slice(&crc.to_le_bytes());
            out[e.local_offset as usize..][..h.len()].copy_from_slice(&h);
            out[e.data_offset as usize..][..data.len()].copy_from_slice(data);
            with.push((e, crc));
        }
        out.extend(central_directory(&with, cd_offset));
        out
    }

    /// The central directory and end records for `entries` (with their CRCs), starting at
    /// `cd_offset`; zip64 end records are always written, as `torch.save` does.
    pub fn central_directory(entries: &[(&Planned, u32)], cd_offset: u64) -> Vec<u8> {
        let mut cd = Vec::new();
        for (e, crc) in entries {
            let zip64 = needs_zip64(e.size, e.local_offset);
            let mut extra = Vec::new();
            if zip64 {
                let mut data = Vec::new();
                if e.size >= 0xFFFF_FFFF {
                    data.extend_from_slice(&e.size.to_le_bytes());
                    data.extend_from_slice(&e.size.to_le_bytes());
                }
                if e.local_offset >= 0xFFFF_FFFF {
                    data.extend_from_slice(&e.local_offset.to_le_bytes());
                }
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(data.len() as u16).to_le_bytes());
                extra.extend_from_slice(&data);
            }
            let sat = |v: u64| {
                if v >= 0xFFFF_FFFF {
                    0xFFFF_FFFF
                } else {
                    v as u32
                }
            };
            let version: u16 = if zip64 { 45 } else { 20 };
            cd.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            cd.extend_from_slice(&version.to_le_bytes()); // made by
            cd.extend_from_slice(&version.to_le_bytes()); // needed
            cd.extend_from_slice(&0u16.to_le_bytes()); // flags
            cd.extend_from_slice(&0u16.to_le_bytes()); // stored
            cd.extend_from_slice(&0u16.to_le_bytes()); // time
            cd.extend_from_slice(&0x21u16.to_le_bytes()); // date
            cd.extend_from_slice(&crc.to_le_bytes());
            cd.extend_from_slice(&sat(e.size).to_le_bytes());
            cd.extend_from_slice(&sat(e.size).to_le_bytes());
            cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes()); // comment
            cd.extend_from_slice(&0u16.to_le_bytes()); // disk
            cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            cd.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            cd.extend_from_slice(&sat(e.local_offset).to_le_bytes());
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_size = cd.len() as u64;
        let n = entries.len() as u64;
        let z_off = cd_offset + cd_size;
        let mut out = cd;
        out.extend_from_slice(&SIG_ZIP64_EOCD.to_le_bytes());
        out.extend_from_slice(&(ZIP64_EOCD_LEN - 12).to_le_bytes());
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&SIG_ZIP64_LOCATOR.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&z_off.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        let n16 = if n >= 0xFFFF { 0xFFFF } else { n as u16 };
        let sat = |v: u64| {
            if v >= 0xFFFF_FFFF {
                0xFFFF_FFFF
            } else {
                v as u32
            }
        };
        out.extend_from_slice(&SIG_EOCD.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&sat(cd_size).to_le_bytes());
        out.extend_from_slice(&sat(cd_offset).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // comment length
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::*;
    use super::*;

    proptest::proptest! {
        /// Reads through the window give what reads of the file give, errors included.
        #[test]
        fn windowed_reads_are_plain_reads(
            len in 0usize..20_000,
            reads in proptest::collection::vec((0u64..21_000, 0usize..5_000), 1..40),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let src = Source::Bytes(&bytes);
            let headers = Headers::new(&src);
            for (off, n) in reads {
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                let ra = ReadAt::read_exact_at(&src, &mut a, off);
                let rb = headers.read_exact_at(&mut b, off);
                proptest::prop_assert_eq!(&ra, &rb);
                if ra.is_ok() {
                    proptest::prop_assert_eq!(a, b);
                }
            }
        }
    }

    fn build(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let named: Vec<(String, &[u8])> =
            entries.iter().map(|(n, d)| (n.to_string(), *d)).collect();
        archive(&named)
    }

    #[test]
    fn round_trip() {
        let bytes = build(&[("a/data.pkl", b"hello"), ("a/data/0", &[7u8; 100])]);
        let src = Source::Bytes(&bytes);
        let dir = read_directory(&src).unwrap();
        assert_eq!(dir.entries.len(), 2);
        assert_eq!(dir.entries[1].name, "a/data/0");
        assert_eq!(dir.entries[0].crc32, crc32fast::hash(b"hello"));
        let (off, len) = data_range(&src, &dir, &dir.entries[1]).unwrap();
        assert_eq!(off % ALIGN, 0);
        assert_eq!(&bytes[off as usize..(off + len) as usize], &[7u8; 100]);
    }

    #[test]
    fn truncations_fail_cleanly() {
        let bytes = build(&[("a/data.pkl", b"hello"), ("a/data/0", &[7u8; 100])]);
        for cut in 0..bytes.len() {
            // Every truncation cuts into the end records, which the directory is found by.
            let src = Source::Bytes(&bytes[..cut]);
            let e = read_directory(&src).expect_err(&format!("cut at {cut} of {}", bytes.len()));
            assert!(!e.is_empty() && !e.contains('\n'), "cut at {cut}: {e:?}");
        }
    }
}
