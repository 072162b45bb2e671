//! The chunks of a DCP checkpoint's tensors, read: each chunk's own header checked against
//! `.metadata` (a `torch.save` zip, or the safetensors file of `SerializationFormat.SAFETENSORS`),
//! no two chunks sharing bytes, and each tensor placed where its bytes can be read:
//!
//! - in place, when it is one chunk holding the whole tensor, contiguous;
//! - as segments, when each chunk is one run of the global tensor (FSDP2's `Shard(0)` shards):
//!   read in place too, one range per chunk;
//! - otherwise assembled, chunk by chunk through a bounded buffer, into an anonymous temporary
//!   file (N-d boxes, chunks saved with their own strides): disk, never memory.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::metadata::Chunk;
use super::Place;
use crate::checkpoint::torch::{chunk_at, is_contiguous};
use crate::checkpoint::DataFile;
use crate::codec::{DType, Segment, TensorInfo};
use crate::error::{Error, Result};

/// Buffer of the assembly of a chunked tensor.
const COPY_BUFFER: usize = 8 << 20;

/// A tensor entry whose chunks are located in their files.
pub(super) struct Pending<'e> {
    /// The tensor's index among the checkpoint's tensors.
    pub index: usize,
    pub fqn: &'e str,
    pub shape: &'e [u64],
    pub chunks: &'e [Chunk],
    /// Where each chunk's `torch.save` zip (or safetensors data) is.
    pub places: Vec<Place>,
}

/// A chunk's elements, as its own header says: where they start in which file, with which
/// strides, and whether those are row-major.
struct Located {
    file: usize,
    data: u64,
    stride: Vec<usize>,
    contiguous: bool,
}

/// Reads the header of every chunk of `pending` and places each tensor (`tensors[index]`):
/// in place, as segments, or assembled into a temporary file, which is then added to `files`.
pub(super) fn place(
    dir: &Path,
    files: &mut Vec<DataFile>,
    tensors: &mut [TensorInfo],
    pending: &[Pending],
) -> Result<()> {
    let mut blobs: HashMap<(usize, u64), Vec<TensorInfo>> = HashMap::new();
    // Where every chunk's bytes are, to refuse two chunks sharing them.
    let mut ranges: Vec<(usize, u64, u64, &str)> = Vec::new();
    let mut located = Vec::with_capacity(pending.len());
    for p in pending {
        let t = &tensors[p.index];
        let mut chunks = Vec::with_capacity(p.chunks.len());
        for (c, &place) in p.chunks.iter().zip(&p.places) {
            chunks.push(read_header(
                files,
                p.fqn,
                t.dtype,
                c,
                place,
                &mut blobs,
                &mut ranges,
            )?);
        }
        located.push(chunks);
    }
    refuse_shared(files, ranges)?;
    let mut spill: Option<DataFile> = None;
    for (p, located) in pending.iter().zip(&located) {
        place_tensor(dir, files, &mut tensors[p.index], p, located, &mut spill)?;
    }
    if let Some(mut sp) = spill {
        sp.seal()?;
        let n = files.len();
        for t in tensors.iter_mut().filter(|t| t.file == usize::MAX) {
            t.file = n;
        }
        (&sp.file).flush().map_err(|e| Error::io(dir, e))?;
        files.push(sp);
    }
    Ok(())
}

/// Reads the header of chunk `c` of `fqn`, whose bytes are at `(fi, off, len)`, and checks it
/// against `.metadata` (`dtype`, the chunk's sizes); records the bytes it holds in `ranges`.
/// `blobs` keeps the safetensors headers already read.
fn read_header<'e>(
    files: &[DataFile],
    fqn: &'e str,
    dtype: DType,
    c: &Chunk,
    (fi, off, len): Place,
    blobs: &mut HashMap<(usize, u64), Vec<TensorInfo>>,
    ranges: &mut Vec<(usize, u64, u64, &'e str)>,
) -> Result<Located> {
    let f = &files[fi];
    let sizes: Vec<usize> = c.sizes.iter().map(|&d| d as usize).collect();
    let (chunk_dtype, shape, stride, data) = if is_zip_at(f, off)? {
        let (local, data, stored) = chunk_at(f.file(), off, len, f.path())?;
        if local.nbytes() > stored {
            // A view repeating its storage's bytes (a stride of 0): refused, so that a small
            // file cannot stand for a large tensor.
            return Err(Error::tensor(
                f.path(),
                fqn,
                format!(
                    "a chunk of {} bytes views a storage of {stored}",
                    local.nbytes()
                ),
            ));
        }
        ranges.push((fi, off, len, fqn));
        (local.dtype, local.shape.clone(), local.stride.clone(), data)
    } else {
        // SerializationFormat.SAFETENSORS: the range starts a safetensors file of the rank's
        // chunks, which runs to the end of the `.distcp` file.
        let header = match blobs.entry((fi, off)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(safetensors_at(f, off)?),
        };
        let s = header.iter().find(|s| s.name == *fqn).ok_or_else(|| {
            Error::tensor(
                f.path(),
                fqn,
                "is not in the safetensors data its chunk names",
            )
        })?;
        if s.len != len {
            return Err(Error::tensor(
                f.path(),
                fqn,
                format!("its chunk is {} bytes, where .metadata says {len}", s.len),
            ));
        }
        ranges.push((fi, off + s.offset, s.len, fqn));
        (
            s.dtype,
            s.shape.clone(),
            row_major(&s.shape),
            off + s.offset,
        )
    };
    if chunk_dtype != dtype || shape != sizes {
        return Err(Error::tensor(
            f.path(),
            fqn,
            format!(
                "a chunk holds {chunk_dtype} {shape:?}, where .metadata says {dtype} {sizes:?}"
            ),
        ));
    }
    let contiguous = is_contiguous(&shape, &stride);
    Ok(Located {
        file: fi,
        data,
        stride,
        contiguous,
    })
}

/// Refuses two chunks whose bytes overlap in a file (`ranges`: file, offset, length, FQN).
fn refuse_shared(files: &[DataFile], mut ranges: Vec<(usize, u64, u64, &str)>) -> Result<()> {
    ranges.retain(|r| r.2 > 0);
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((fa, oa, la, a), (fb, ob, _, b)) = (w[0], w[1]);
        if fa == fb && oa + la > ob {
            return Err(Error::format(
                files[fa].path(),
                format!("chunks of `{a}` and `{b}` share bytes {ob}..{}", oa + la),
            ));
        }
    }
    Ok(())
}

/// Places tensor `t` of `p`, whose chunks are `located`: in place, as segments, or assembled
/// at the end of `spill` (made on first use; `t.file` is then `usize::MAX` until the spill is
/// numbered).
fn place_tensor(
    dir: &Path,
    files: &[DataFile],
    t: &mut TensorInfo,
    p: &Pending,
    located: &[Located],
    spill: &mut Option<DataFile>,
) -> Result<()> {
    let (chunks, shape) = (p.chunks, p.shape);
    let whole = chunks.len() == 1 && chunks[0].sizes == *shape;
    if whole && located[0].contiguous {
        t.file = located[0].file;
        t.offset = located[0].data;
        return Ok(());
    }
    // Chunks that are each one run of the global tensor (FSDP2's Shard(0) shards): read in
    // place, as the segments of the tensor.
    let size = t.dtype.size() as u64;
    let runs: Option<Vec<Segment>> = chunks
        .iter()
        .zip(located)
        .filter(|(c, _)| !c.sizes.contains(&0))
        .map(|(c, l)| {
            one_run(c, shape, &l.stride).map(|dst| Segment {
                file: l.file,
                offset: l.data,
                start: dst * size,
                len: c.sizes.iter().product::<u64>() * size,
            })
        })
        .collect();
    if let Some(mut segs) = runs.filter(|s| !s.is_empty()) {
        segs.sort_by_key(|s| s.start);
        t.file = segs[0].file;
        t.offset = segs[0].offset;
        t.segments = Some(segs.into_boxed_slice());
        return Ok(());
    }
    let sp = match spill {
        Some(sp) => sp,
        None => {
            let file = tempfile::tempfile().map_err(|e| Error::io(dir, e))?;
            spill.insert(DataFile::scratch(dir, file))
        }
    };
    let at = sp.len;
    sp.file.set_len(at + t.len).map_err(|e| Error::io(dir, e))?;
    for (c, l) in chunks.iter().zip(located) {
        assemble(
            &files[l.file],
            l.data,
            &l.stride,
            c,
            shape,
            t.dtype,
            &sp.file,
            at,
        )
        .map_err(|e| match e {
            Error::Io { path, source } => Error::tensor(path, p.fqn, source.to_string()),
            e => e,
        })?;
    }
    sp.len += t.len;
    t.file = usize::MAX; // the spill, numbered by `place`
    t.offset = at;
    Ok(())
}

/// Copies the chunk whose elements start at `data` of `from` (with the chunk's own `stride`)
/// into its box `c` of the global tensor of `shape`, row-major at `base` of `to`, through a
/// bounded buffer: whole runs where the chunk and the global tensor are both contiguous.
#[allow(clippy::too_many_arguments)]
fn assemble(
    from: &DataFile,
    data: u64,
    stride: &[usize],
    c: &Chunk,
    shape: &[u64],
    dtype: DType,
    to: &std::fs::File,
    base: u64,
) -> Result<()> {
    let n = shape.len();
    let size = dtype.size() as u64;
    if c.sizes.contains(&0) {
        return Ok(());
    }
    // Row-major strides of the global tensor, in elements.
    let gstride = row_major(shape);
    // The run: elements copied at once, over the innermost dims [inner, n), where the chunk's
    // elements are one run of its storage and the global tensor's one run too.
    let mut run = 1u64;
    let mut inner = n;
    while inner > 0 {
        let d = inner - 1;
        if stride[d] as u64 != run && c.sizes[d] != 1 {
            break;
        }
        run *= c.sizes[d];
        inner = d;
        if c.sizes[d] != shape[d] {
            break;
        }
    }
    let total = run * size;
    let mut buf = vec![0u8; total.min(COPY_BUFFER as u64) as usize];
    // Every index of the outer dims [0, inner).
    let mut idx = vec![0u64; inner];
    loop {
        let mut src = 0u64;
        let mut dst = 0u64;
        for d in 0..n {
            let i = if d < inner { idx[d] } else { 0 };
            src += i * stride[d] as u64;
            dst += (c.offsets[d] + i) * gstride[d];
        }
        let mut done = 0u64;
        while done < total {
            let k = (total - done).min(buf.len() as u64) as usize;
            from.file()
                .read_exact_at(&mut buf[..k], data + src * size + done)
                .map_err(|e| Error::io(from.path(), e))?;
            to.write_all_at(&buf[..k], base + dst * size + done)
                .map_err(|e| Error::io(from.path(), e))?;
            done += k as u64;
        }
        if !next(&mut idx, &c.sizes[..inner]) {
            return Ok(());
        }
    }
}

/// Whether the bytes at `off` of `f` start a zip archive (a `torch.save` record).
fn is_zip_at(f: &DataFile, off: u64) -> Result<bool> {
    let mut magic = [0u8; 4];
    let n = crate::checkpoint::read_up_to(f.file(), off, &mut magic)
        .map_err(|e| Error::io(f.path(), e))?;
    Ok(crate::codec::zip::is_zip(&magic[..n]))
}

/// The tensors of the safetensors file starting at `off` of `f` and running to its end, with
/// offsets in `f` counted from `off`.
fn safetensors_at(f: &DataFile, off: u64) -> Result<Vec<TensorInfo>> {
    let (tensors, _) = crate::codec::safetensors::validate(f.path(), f.len() - off, |at, buf| {
        crate::checkpoint::read_up_to(f.file(), off + at, buf)
    })?;
    Ok(tensors)
}

/// Row-major strides of `shape`, in elements.
fn row_major<T: Copy + std::ops::Mul<Output = T> + From<u8>>(shape: &[T]) -> Vec<T> {
    let mut s = vec![T::from(1); shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Where chunk `c` (elements with `stride`) starts in the global tensor of `shape`, in elements,
/// when its elements are one run both in its storage and in the global tensor.
fn one_run(c: &Chunk, shape: &[u64], stride: &[usize]) -> Option<u64> {
    let n = shape.len();
    let mut run = 1u64;
    let mut global_full = true;
    for d in (0..n).rev() {
        if c.sizes[d] != 1 && (stride[d] as u64 != run || !global_full) {
            return None;
        }
        run *= c.sizes[d];
        global_full &= c.sizes[d] == shape[d];
    }
    let mut g = 1u64;
    let mut dst = 0u64;
    for d in (0..n).rev() {
        dst += c.offsets[d] * g;
        g *= shape[d];
    }
    Some(dst)
}

/// Steps the row-major index `idx` within `sizes`; false after the last.
fn next(idx: &mut [u64], sizes: &[u64]) -> bool {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < sizes[d] {
            return true;
        }
        idx[d] = 0;
    }
    false
}
