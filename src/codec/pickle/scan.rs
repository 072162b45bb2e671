//! The scan of a pickle in a file: its opcodes read, its byte payloads stepped over and
//! replaced by references to where they lie, so that a pickle of tensors embedded as bytes is
//! read in the time of its opcodes.

use super::opcodes::*;
use super::{PResult, PickleError};

/// A pickle read from a file by [`scan`]: its opcodes, each byte payload replaced by a
/// [`BYTES_AT`] reference to where it lies in the file, and frames dropped.
#[derive(Clone, Debug, Default)]
pub struct Scanned {
    pub stream: Vec<u8>,
    /// Bytes of the file the pickle takes, from its start up to and including its `STOP`.
    pub len: u64,
}

/// Positioned reads of a source (a file, or bytes in memory).
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `off`; returns how many (0 at the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, off)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let start = (off.min(self.len() as u64)) as usize;
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// A buffered cursor over a [`ReadAt`] source of `size` bytes.
struct Cursor<'a, R: ReadAt + ?Sized> {
    src: &'a R,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_at: u64,
}

impl<R: ReadAt + ?Sized> Cursor<'_, R> {
    const CHUNK: usize = 64 << 10;

    fn err<T>(&self, what: impl Into<String>) -> PResult<T> {
        Err(PickleError {
            offset: self.pos as usize,
            what: what.into(),
        })
    }

    /// The next `n` bytes (`n` at most [`Cursor::CHUNK`] unless they are buffered), advanced
    /// over.
    fn take(&mut self, n: usize) -> PResult<&[u8]> {
        if self.pos + n as u64 > self.size {
            return self.err(format!(
                "truncated: needs {n} more bytes, {} are left",
                self.size.saturating_sub(self.pos)
            ));
        }
        let have =
            |c: &Self| c.pos >= c.buf_at && c.pos + n as u64 <= c.buf_at + c.buf.len() as u64;
        if !have(self) {
            let want = n.max(Self::CHUNK).min((self.size - self.pos) as usize);
            self.buf.resize(want, 0);
            let mut got = 0;
            while got < want {
                match self
                    .src
                    .read_at(&mut self.buf[got..], self.pos + got as u64)
                {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return self.err(format!("cannot read: {e}")),
                }
            }
            self.buf.truncate(got);
            self.buf_at = self.pos;
            if got < n {
                return self.err("truncated: the file ends inside the pickle");
            }
        }
        let start = (self.pos - self.buf_at) as usize;
        self.pos += n as u64;
        Ok(&self.buf[start..start + n])
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> PResult<u64> {
        let b = self.take(n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }
}

/// Reads the pickle that starts at byte `start` of `src` (of `size` bytes) up to its `STOP`,
/// for [`Pickle::parse_scanned`](super::Pickle::parse_scanned). The contents of its byte
/// payloads are never read, only stepped over: a pickle whose tensors are embedded as bytes
/// (`pickle.dump` of tensors, EDM2's snapshots) is read in the time of its opcodes. The stream
/// is at most `max_stream` bytes.
pub fn scan<R: ReadAt + ?Sized>(
    src: &R,
    start: u64,
    size: u64,
    max_stream: usize,
) -> PResult<Scanned> {
    let mut c = Cursor {
        src,
        size,
        pos: start,
        buf: Vec::new(),
        buf_at: 0,
    };
    let mut out: Vec<u8> = Vec::new();
    let push = |out: &mut Vec<u8>, bytes: &[u8], at: u64| -> PResult<()> {
        if out.len() + bytes.len() > max_stream {
            return Err(PickleError {
                offset: at as usize,
                what: format!("the pickle's opcodes exceed {max_stream} bytes"),
            });
        }
        out.extend_from_slice(bytes);
        Ok(())
    };
    loop {
        let at = c.pos;
        let op = c.u8()?;
        match op {
            // Frames only group opcodes; their lengths would not hold once payloads are gone.
            FRAME => {
                c.take(8)?;
                continue;
            }
            STOP => {
                push(&mut out, &[STOP], at)?;
                return Ok(Scanned {
                    stream: out,
                    len: c.pos - start,
                });
            }
            SHORT_BINBYTES | BINBYTES | BINBYTES8 | BYTEARRAY8 => {
                let width = match op {
                    SHORT_BINBYTES => 1,
                    BINBYTES => 4,
                    _ => 8,
                };
                let len = c.le(width)?;
                let data = c.pos;
                if len > size - data {
                    return c.err(format!(
                        "truncated: a {len}-byte payload runs past the end of the file"
                    ));
                }
                c.pos = data + len;
                let mut rec = [0u8; 17];
                rec[0] = BYTES_AT;
                rec[1..9].copy_from_slice(&data.to_le_bytes());
                rec[9..17].copy_from_slice(&len.to_le_bytes());
                push(&mut out, &rec, at)?;
            }
            _ => {
                push(&mut out, &[op], at)?;
                let arg = match op {
                    PROTO | BININT1 | BINGET | BINPUT | EXT1 => Arg::Fixed(1),
                    BININT2 | EXT2 => Arg::Fixed(2),
                    BININT | LONG_BINGET | LONG_BINPUT | EXT4 => Arg::Fixed(4),
                    BINFLOAT => Arg::Fixed(8),
                    SHORT_BINSTRING | SHORT_BINUNICODE | LONG1 => Arg::Counted(1),
                    BINSTRING | BINUNICODE | LONG4 => Arg::Counted(4),
                    BINUNICODE8 => Arg::Counted(8),
                    INT | LONG | FLOAT | STRING | UNICODE | PERSID | GET | PUT => Arg::Lines(1),
                    GLOBAL | INST => Arg::Lines(2),
                    MARK | POP | POP_MARK | DUP | NONE | BINPERSID | REDUCE | APPEND | BUILD
                    | DICT | EMPTY_DICT | APPENDS | LIST | EMPTY_LIST | OBJ | SETITEM | TUPLE
                    | EMPTY_TUPLE | SETITEMS | NEWOBJ | TUPLE1 | TUPLE2 | TUPLE3 | NEWTRUE
                    | NEWFALSE | EMPTY_SET | ADDITEMS | FROZENSET | NEWOBJ_EX | STACK_GLOBAL
                    | MEMOIZE | NEXT_BUFFER | READONLY_BUFFER => Arg::None,
                    // The machine refuses it where it stands.
                    _ => {
                        return Ok(Scanned {
                            stream: out,
                            len: c.pos - start,
                        })
                    }
                };
                match arg {
                    Arg::None => {}
                    Arg::Fixed(n) => {
                        let b = c.take(n)?.to_vec();
                        push(&mut out, &b, at)?;
                    }
                    Arg::Counted(width) => {
                        let b = c.take(width)?.to_vec();
                        push(&mut out, &b, at)?;
                        let mut v = [0u8; 8];
                        v[..width].copy_from_slice(&b);
                        let n = u64::from_le_bytes(v);
                        if n > (max_stream - out.len().min(max_stream)) as u64 {
                            return c.err(format!(
                                "a {n}-byte argument exceeds the {max_stream}-byte limit"
                            ));
                        }
                        let mut left = n as usize;
                        while left > 0 {
                            let k = left.min(Cursor::<R>::CHUNK);
                            let b = c.take(k)?.to_vec();
                            push(&mut out, &b, at)?;
                            left -= k;
                        }
                    }
                    Arg::Lines(n) => {
                        for _ in 0..n {
                            loop {
                                let b = c.u8()?;
                                push(&mut out, &[b], at)?;
                                if b == b'\n' {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The argument of an opcode, for [`scan`].
enum Arg {
    None,
    Fixed(usize),
    /// A little-endian length of that many bytes, then that many bytes.
    Counted(usize),
    /// Lines ending in `\n`.
    Lines(usize),
}
