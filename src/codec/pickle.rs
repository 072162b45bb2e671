//! A restricted pickle machine: it builds the object graph a pickle describes and never imports,
//! calls or constructs anything.
//!
//! Globals stay names ([`Value::Global`]); a call (`REDUCE`, `NEWOBJ`, `INST`, `OBJ`) becomes a
//! [`Value::Call`] record of what would have been called with what, and `BUILD` state, list and
//! dict items given to it are recorded on it. Interpreting those records (torch's tensor
//! rebuild functions, `OrderedDict`) is the caller's business (`checkpoint::torch`).
//!
//! Values live in one arena and refer to each other by [`Id`], so the memo and `DUP` share
//! instead of copying, and memory grows at most linearly with the pickle's length. Every
//! opcode of protocols 0 to 5 that `pickle.dump` emits without a buffer callback is understood;
//! the extension registry and out-of-band buffers are refused. All reads are bounds-checked and
//! every length is checked against the bytes that remain before anything is allocated, so a
//! malformed pickle gives an error, never a panic. The arena, the stack, the mark stack and the
//! memo have caps ([`Limits`]).

use std::collections::HashMap;
use std::fmt;

/// Index of a value in [`Pickle::values`].
pub type Id = u32;

/// A global reference (`module.name`), never resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    pub module: Box<str>,
    pub name: Box<str>,
}

impl Global {
    /// `module.name`.
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }

    /// Whether this is `module.name`.
    pub fn is(&self, module: &str, name: &str) -> bool {
        &*self.module == module && &*self.name == name
    }
}

/// What a call would have been: `func(*args)`, then `BUILD` with `state`, then the list items
/// and dict entries a pickler adds to list and dict subclasses.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub func: Id,
    pub args: Id,
    pub state: Option<Id>,
    pub items: Vec<Id>,
    pub entries: Vec<(Id, Id)>,
}

/// One value of the object graph.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside the range of `i64`.
    BigInt,
    Float(f64),
    Str(Box<str>),
    /// `bytes` or `bytearray`: where its contents start in the pickle's source (the pickle's
    /// own bytes, or the file that [`scan`] read it from) and how long they are. The contents
    /// are never read by the machine.
    Bytes {
        at: u64,
        len: u64,
    },
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `set` or `frozenset`, with its items (torch modules keep the names of their
    /// non-persistent buffers in one).
    Set(Vec<Id>),
    Global(Box<Global>),
    /// A persistent id (`torch.save` uses them for storages).
    PersId(Id),
    Call(Box<Call>),
}

impl Value {
    /// A short name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes { .. } => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global(_) => "global",
            Value::PersId(_) => "persistent id",
            Value::Call(_) => "object",
        }
    }
}

/// Caps on the resources a pickle may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Values in the arena.
    pub max_values: usize,
    /// Ids stored in containers, summed over all containers.
    pub max_elements: usize,
    /// Depth of the value stack.
    pub max_stack: usize,
    /// Nested `MARK`s.
    pub max_marks: usize,
}

/// The caps used for checkpoints: far above what any real checkpoint's pickle needs (a few
/// values per tensor), and low enough that a hostile pickle cannot exhaust memory.
pub const LIMITS: Limits = Limits {
    max_values: 1 << 23,
    max_elements: 1 << 25,
    max_stack: 1 << 20,
    max_marks: 1 << 12,
};

/// Why a pickle was refused: what, and at which byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub what: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.what, self.offset)
    }
}

impl std::error::Error for PickleError {}

type PResult<T> = Result<T, PickleError>;

/// A parsed pickle: the arena of values and the root.
#[derive(Clone, Debug)]
pub struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
    /// Bytes of the source the pickle took, up to and including its `STOP`.
    pub len: u64,
}

impl Pickle {
    /// Runs the machine over `data` with the caps of `limits`.
    pub fn parse(data: &[u8], limits: &Limits) -> PResult<Pickle> {
        Pickle::run(data, limits, false)
    }

    /// Runs the machine over a stream that [`scan`] compacted.
    pub fn parse_scanned(s: &Scanned, limits: &Limits) -> PResult<Pickle> {
        let mut p = Pickle::run(&s.stream, limits, true)?;
        p.len = s.len;
        Ok(p)
    }

    fn run(data: &[u8], limits: &Limits, scanned: bool) -> PResult<Pickle> {
        let mut m = Machine {
            data,
            pos: 0,
            op_pos: 0,
            limits: *limits,
            values: Vec::new(),
            elements: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: Memo::default(),
            scanned,
        };
        let root = m.run()?;
        Ok(Pickle {
            values: m.values,
            root,
            len: m.pos as u64,
        })
    }

    /// The value `id`; ids come from this pickle, so they are in range.
    pub fn get(&self, id: Id) -> &Value {
        &self.values[id as usize]
    }

    /// The string `id` holds, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer `id` holds, if it is one.
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The global `id` is, if it is one.
    pub fn global(&self, id: Id) -> Option<&Global> {
        match self.get(id) {
            Value::Global(g) => Some(g),
            _ => None,
        }
    }

    /// The items of the tuple or list `id`.
    pub fn seq(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    limits: Limits,
    values: Vec<Value>,
    elements: usize,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: Memo,
    /// The data is a [`scan`]ned stream: byte payloads are [`BYTES_AT`] references.
    scanned: bool,
}

/// The memo: keys to values. Picklers number their memo entries 0, 1, 2, …, so keys are held
/// in a vector indexed by key while they stay dense (the vector never outgrows twice the
/// number of entries, plus a little), and in a hash map beyond, whatever a file does.
#[derive(Default)]
struct Memo {
    /// `dense[k]`: the value of key `k`, for every key below `dense.len()`.
    dense: Vec<Option<Id>>,
    /// Keys at or above `dense.len()`.
    sparse: HashMap<u32, Id>,
    len: usize,
}

impl Memo {
    fn get(&self, key: u32) -> Option<Id> {
        match self.dense.get(key as usize) {
            Some(v) => *v,
            None => self.sparse.get(&key).copied(),
        }
    }

    fn contains(&self, key: u32) -> bool {
        self.get(key).is_some()
    }

    fn insert(&mut self, key: u32, id: Id) {
        let k = key as usize;
        if k >= self.dense.len() && k < 2 * self.len + 1024 {
            // Grow the dense part to hold `key`, moving the keys it now covers.
            let from = self.dense.len();
            self.dense.resize(k + 1, None);
            if !self.sparse.is_empty() {
                for j in from..=k {
                    if let Some(v) = self.sparse.remove(&(j as u32)) {
                        self.dense[j] = Some(v);
                    }
                }
            }
        }
        let new = match self.dense.get_mut(k) {
            Some(slot) => slot.replace(id).is_none(),
            None => self.sparse.insert(key, id).is_none(),
        };
        if new {
            self.len += 1;
        }
    }
}

/// Opcodes, as named in Lib/pickle.py.
pub const MARK: u8 = b'(';
pub const STOP: u8 = b'.';
pub const POP: u8 = b'0';
pub const POP_MARK: u8 = b'1';
pub const DUP: u8 = b'2';
pub const FLOAT: u8 = b'F';
pub const INT: u8 = b'I';
pub const BININT: u8 = b'J';
pub const BININT1: u8 = b'K';
pub const LONG: u8 = b'L';
pub const BININT2: u8 = b'M';
pub const NONE: u8 = b'N';
pub const PERSID: u8 = b'P';
pub const BINPERSID: u8 = b'Q';
pub const REDUCE: u8 = b'R';
pub const STRING: u8 = b'S';
pub const BINSTRING: u8 = b'T';
pub const SHORT_BINSTRING: u8 = b'U';
pub const UNICODE: u8 = b'V';
pub const BINUNICODE: u8 = b'X';
pub const APPEND: u8 = b'a';
pub const BUILD: u8 = b'b';
pub const GLOBAL: u8 = b'c';
pub const DICT: u8 = b'd';
pub const EMPTY_DICT: u8 = b'}';
pub const APPENDS: u8 = b'e';
pub const GET: u8 = b'g';
pub const BINGET: u8 = b'h';
pub const INST: u8 = b'i';
pub const LONG_BINGET: u8 = b'j';
pub const LIST: u8 = b'l';
pub const EMPTY_LIST: u8 = b']';
pub const OBJ: u8 = b'o';
pub const PUT: u8 = b'p';
pub const BINPUT: u8 = b'q';
pub const LONG_BINPUT: u8 = b'r';
pub const SETITEM: u8 = b's';
pub const TUPLE: u8 = b't';
pub const EMPTY_TUPLE: u8 = b')';
pub const SETITEMS: u8 = b'u';
pub const BINFLOAT: u8 = b'G';
pub const PROTO: u8 = 0x80;
pub const NEWOBJ: u8 = 0x81;
pub const EXT1: u8 = 0x82;
pub const EXT2: u8 = 0x83;
pub const EXT4: u8 = 0x84;
pub const TUPLE1: u8 = 0x85;
pub const TUPLE2: u8 = 0x86;
pub const TUPLE3: u8 = 0x87;
pub const NEWTRUE: u8 = 0x88;
pub const NEWFALSE: u8 = 0x89;
pub const LONG1: u8 = 0x8a;
pub const LONG4: u8 = 0x8b;
pub const BINBYTES: u8 = b'B';
pub const SHORT_BINBYTES: u8 = b'C';
pub const SHORT_BINUNICODE: u8 = 0x8c;
pub const BINUNICODE8: u8 = 0x8d;
pub const BINBYTES8: u8 = 0x8e;
pub const EMPTY_SET: u8 = 0x8f;
pub const ADDITEMS: u8 = 0x90;
pub const FROZENSET: u8 = 0x91;
pub const NEWOBJ_EX: u8 = 0x92;
pub const STACK_GLOBAL: u8 = 0x93;
pub const MEMOIZE: u8 = 0x94;
pub const FRAME: u8 = 0x95;
pub const BYTEARRAY8: u8 = 0x96;
pub const NEXT_BUFFER: u8 = 0x97;
pub const READONLY_BUFFER: u8 = 0x98;

/// The opcode of [`scan`]ned streams that stands for a byte payload of the source:
/// `BYTES_AT <u64 at> <u64 len>`, little-endian. Refused in any pickle parsed as it is.
pub const BYTES_AT: u8 = 0xF0;

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
/// for [`Pickle::parse_scanned`]. The contents of its byte payloads are never read, only
/// stepped over: a pickle whose tensors are embedded as bytes (`pickle.dump` of tensors, EDM2's
/// snapshots) is read in the time of its opcodes. The stream is at most `max_stream` bytes.
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

impl<'a> Machine<'a> {
    fn err<T>(&self, what: impl Into<String>) -> PResult<T> {
        Err(PickleError {
            offset: self.op_pos,
            what: what.into(),
        })
    }

    fn take(&mut self, n: u64) -> PResult<&'a [u8]> {
        let rest = (self.data.len() - self.pos) as u64;
        if n > rest {
            return self.err(format!("truncated: needs {n} more bytes, {rest} are left"));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N as u64)?);
        Ok(b)
    }

    /// A text line, without its newline.
    fn line(&mut self) -> PResult<&'a [u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => self.err("truncated: a text argument has no end of line"),
        }
    }

    fn line_str(&mut self) -> PResult<&'a str> {
        let l = self.line()?;
        match std::str::from_utf8(l) {
            Ok(s) => Ok(s),
            Err(_) => self.err("a text argument is not UTF-8"),
        }
    }

    fn new_value(&mut self, v: Value) -> PResult<Id> {
        if self.values.len() >= self.limits.max_values {
            return self.err(format!(
                "more than {} values (limit for checkpoint pickles)",
                self.limits.max_values
            ));
        }
        self.values.push(v);
        Ok((self.values.len() - 1) as Id)
    }

    fn push_id(&mut self, id: Id) -> PResult<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.err(format!(
                "stack deeper than {} entries",
                self.limits.max_stack
            ));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, v: Value) -> PResult<()> {
        let id = self.new_value(v)?;
        self.push_id(id)
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> PResult<Id> {
        if self.stack.len() <= self.base() {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> PResult<Id> {
        if self.stack.len() <= self.base() {
            return self.err("stack underflow");
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<Id>> {
        match self.marks.pop() {
            Some(base) => Ok(self.stack.split_off(base)),
            None => self.err("no MARK on the stack"),
        }
    }

    fn count(&mut self, n: usize) -> PResult<()> {
        self.elements = self.elements.saturating_add(n);
        if self.elements > self.limits.max_elements {
            return self.err(format!(
                "more than {} container elements (limit for checkpoint pickles)",
                self.limits.max_elements
            ));
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let top = self.top()?;
        if self.memo.len >= self.limits.max_values && !self.memo.contains(key) {
            return self.err("memo too large");
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> PResult<()> {
        match self.memo.get(key) {
            Some(id) => self.push_id(id),
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn call(&mut self, func: Id, args: Id) -> PResult<()> {
        self.push(Value::Call(Box::new(Call {
            func,
            args,
            state: None,
            items: Vec::new(),
            entries: Vec::new(),
        })))
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<Id> {
        self.new_value(Value::Global(Box::new(Global {
            module: module.into(),
            name: name.into(),
        })))
    }

    fn string(&mut self, bytes: &[u8]) -> PResult<()> {
        let s = String::from_utf8_lossy(bytes).into_owned().into_boxed_str();
        self.push(Value::Str(s))
    }

    /// Python 2 `str`: bytes, decoded as Latin-1 as torch does for its ASCII fields.
    fn latin1(&mut self, bytes: &[u8]) -> PResult<()> {
        let s: String = bytes.iter().map(|&b| b as char).collect();
        self.push(Value::Str(s.into_boxed_str()))
    }

    fn int_text(&mut self, text: &[u8]) -> PResult<()> {
        let t = std::str::from_utf8(text).unwrap_or("").trim();
        let t = t.strip_suffix('L').unwrap_or(t);
        match t {
            "01" => return self.push(Value::Bool(true)),
            "00" => return self.push(Value::Bool(false)),
            _ => {}
        }
        if let Ok(i) = t.parse::<i64>() {
            return self.push(Value::Int(i));
        }
        let digits = t.strip_prefix('-').unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return self.push(Value::BigInt);
        }
        self.err("malformed integer")
    }

    /// Little-endian two's complement of any length.
    fn long_bytes(&mut self, b: &[u8]) -> PResult<()> {
        if b.is_empty() {
            return self.push(Value::Int(0));
        }
        let negative = b[b.len() - 1] & 0x80 != 0;
        let fill = if negative { 0xFF } else { 0 };
        let n = b.len().min(8);
        let mut x = [fill; 8];
        x[..n].copy_from_slice(&b[..n]);
        let v = i64::from_le_bytes(x);
        let fits = b[n..].iter().all(|&c| c == fill) && ((v < 0) == negative);
        self.push(if fits { Value::Int(v) } else { Value::BigInt })
    }

    fn len_u32(&mut self) -> PResult<u64> {
        Ok(u64::from(u32::from_le_bytes(self.le()?)))
    }

    fn len_i32(&mut self) -> PResult<u64> {
        let n = i32::from_le_bytes(self.le()?);
        if n < 0 {
            return self.err("negative length");
        }
        Ok(n as u64)
    }

    fn len_u64(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.le()?))
    }

    /// Adds `items` to the list (or list subclass) on top of the stack.
    fn extend_list(&mut self, items: Vec<Id>) -> PResult<()> {
        let target = self.top()?;
        self.count(items.len())?;
        match &mut self.values[target as usize] {
            Value::List(v) => v.extend(items),
            Value::Call(c) => c.items.extend(items),
            other => {
                let t = other.type_name();
                return self.err(format!("APPEND to a {t}"));
            }
        }
        Ok(())
    }

    /// Adds key/value `items` to the dict (or dict subclass) on top of the stack.
    fn extend_dict(&mut self, items: Vec<Id>) -> PResult<()> {
        if items.len() % 2 != 0 {
            return self.err("SETITEMS with an odd number of items");
        }
        let target = self.top()?;
        self.count(items.len())?;
        let pairs = items.chunks_exact(2).map(|p| (p[0], p[1]));
        match &mut self.values[target as usize] {
            Value::Dict(v) => v.extend(pairs),
            Value::Call(c) => c.entries.extend(pairs),
            other => {
                let t = other.type_name();
                return self.err(format!("SETITEM on a {t}"));
            }
        }
        Ok(())
    }

    fn tuple(&mut self, items: Vec<Id>) -> PResult<()> {
        self.count(items.len())?;
        self.push(Value::Tuple(items))
    }

    fn run(&mut self) -> PResult<Id> {
        loop {
            self.op_pos = self.pos;
            if self.pos >= self.data.len() {
                return self.err("truncated: the pickle ends without STOP");
            }
            let op = self.u8()?;
            match op {
                PROTO => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                FRAME => {
                    let n = self.len_u64()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return self.err("truncated: a frame runs past the end");
                    }
                }
                STOP => return self.pop(),
                MARK => {
                    if self.marks.len() >= self.limits.max_marks {
                        return self
                            .err(format!("more than {} nested MARKs", self.limits.max_marks));
                    }
                    self.marks.push(self.stack.len());
                }
                POP => {
                    if self.stack.len() > self.base() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                POP_MARK => {
                    self.pop_mark()?;
                }
                DUP => {
                    let t = self.top()?;
                    self.push_id(t)?;
                }
                NONE => self.push(Value::None)?,
                NEWTRUE => self.push(Value::Bool(true))?,
                NEWFALSE => self.push(Value::Bool(false))?,
                INT | LONG => {
                    let l = self.line()?;
                    self.int_text(l)?;
                }
                BININT => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?;
                }
                BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?;
                }
                BININT2 => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?;
                }
                LONG1 => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    self.long_bytes(b)?;
                }
                LONG4 => {
                    let n = self.len_i32()?;
                    let b = self.take(n)?;
                    self.long_bytes(b)?;
                }
                FLOAT => {
                    let l = self.line_str()?;
                    match l.trim().parse::<f64>() {
                        Ok(f) => self.push(Value::Float(f))?,
                        Err(_) => return self.err("malformed float"),
                    }
                }
                BINFLOAT => {
                    let f = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(f))?;
                }
                STRING => {
                    let l = self.line()?;
                    let inner = match l {
                        [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
                        _ => return self.err("STRING argument is not quoted"),
                    };
                    self.latin1(inner)?;
                }
                BINSTRING => {
                    let n = self.len_i32()?;
                    let b = self.take(n)?;
                    self.latin1(b)?;
                }
                SHORT_BINSTRING => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    self.latin1(b)?;
                }
                UNICODE => {
                    let l = self.line()?;
                    self.string(l)?;
                }
                BINUNICODE => {
                    let n = self.len_u32()?;
                    let b = self.take(n)?;
                    self.string(b)?;
                }
                SHORT_BINUNICODE => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    self.string(b)?;
                }
                BINUNICODE8 => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?;
                    self.string(b)?;
                }
                BINBYTES => {
                    let n = self.len_u32()?;
                    let at = self.pos as u64;
                    self.take(n)?;
                    self.push(Value::Bytes { at, len: n })?;
                }
                SHORT_BINBYTES => {
                    let n = self.u8()?;
                    let at = self.pos as u64;
                    self.take(n.into())?;
                    self.push(Value::Bytes { at, len: n.into() })?;
                }
                BINBYTES8 | BYTEARRAY8 => {
                    let n = self.len_u64()?;
                    let at = self.pos as u64;
                    self.take(n)?;
                    self.push(Value::Bytes { at, len: n })?;
                }
                BYTES_AT if self.scanned => {
                    let at = u64::from_le_bytes(self.le()?);
                    let len = u64::from_le_bytes(self.le()?);
                    self.push(Value::Bytes { at, len })?;
                }
                EMPTY_LIST => self.push(Value::List(Vec::new()))?,
                EMPTY_TUPLE => self.push(Value::Tuple(Vec::new()))?,
                EMPTY_DICT => self.push(Value::Dict(Vec::new()))?,
                EMPTY_SET => self.push(Value::Set(Vec::new()))?,
                LIST => {
                    let items = self.pop_mark()?;
                    self.count(items.len())?;
                    self.push(Value::List(items))?;
                }
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?;
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    if self.stack.len() < self.base() + n {
                        return self.err("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(items)?;
                }
                DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("DICT with an odd number of items");
                    }
                    self.count(items.len())?;
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Value::Dict(pairs))?;
                }
                FROZENSET => {
                    let items = self.pop_mark()?;
                    self.count(items.len())?;
                    self.push(Value::Set(items))?;
                }
                APPEND => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?;
                }
                SETITEMS => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?;
                }
                ADDITEMS => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.count(items.len())?;
                    match &mut self.values[target as usize] {
                        Value::Set(v) => v.extend(items),
                        Value::Call(_) => {}
                        other => {
                            let t = other.type_name();
                            return self.err(format!("ADDITEMS on a {t}"));
                        }
                    }
                }
                GLOBAL => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let g = self.global(module, name)?;
                    self.push_id(g)?;
                }
                STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) =
                        (&self.values[module as usize], &self.values[name as usize])
                    else {
                        return self.err("STACK_GLOBAL of something other than two strings");
                    };
                    let (m, n) = (m.clone(), n.clone());
                    let g = self.global(&m, &n)?;
                    self.push_id(g)?;
                }
                REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.call(func, args)?;
                }
                NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args)?;
                }
                NEWOBJ_EX => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args)?;
                }
                INST => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let items = self.pop_mark()?;
                    let cls = self.global(module, name)?;
                    self.count(items.len())?;
                    let args = self.new_value(Value::Tuple(items))?;
                    self.call(cls, args)?;
                }
                OBJ => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return self.err("OBJ without a class");
                    }
                    let cls = items.remove(0);
                    self.count(items.len())?;
                    let args = self.new_value(Value::Tuple(items))?;
                    self.call(cls, args)?;
                }
                BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    if let Value::Call(c) = &mut self.values[target as usize] {
                        c.state = Some(state);
                    }
                }
                PERSID => {
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l).into_owned().into_boxed_str();
                    let pid = self.new_value(Value::Str(s))?;
                    self.push(Value::PersId(pid))?;
                }
                BINPERSID => {
                    let pid = self.pop()?;
                    self.push(Value::PersId(pid))?;
                }
                GET => {
                    let l = self.line_str()?;
                    match l.trim().parse::<u32>() {
                        Ok(k) => self.memo_get(k)?,
                        Err(_) => return self.err("malformed memo key"),
                    }
                }
                BINGET => {
                    let k = self.u8()?;
                    self.memo_get(k.into())?;
                }
                LONG_BINGET => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k)?;
                }
                PUT => {
                    let l = self.line_str()?;
                    match l.trim().parse::<u32>() {
                        Ok(k) => self.memo_put(k)?,
                        Err(_) => return self.err("malformed memo key"),
                    }
                }
                BINPUT => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?;
                }
                LONG_BINPUT => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k)?;
                }
                MEMOIZE => {
                    let k = u32::try_from(self.memo.len).unwrap_or(u32::MAX);
                    self.memo_put(k)?;
                }
                EXT1 | EXT2 | EXT4 => {
                    return self
                        .err("the copyreg extension registry (EXT opcodes) is not supported")
                }
                NEXT_BUFFER | READONLY_BUFFER => {
                    return self.err("out-of-band buffers are not supported")
                }
                _ => return self.err(format!("unknown opcode 0x{op:02x}")),
            }
        }
    }
}

/// Writing the pickles `torch.save` writes for a state dict (protocol 2).
pub mod write {
    /// A pickle being written.
    #[derive(Default, Debug)]
    pub struct Writer {
        pub out: Vec<u8>,
    }

    impl Writer {
        /// Starts a protocol-2 pickle.
        pub fn new() -> Writer {
            Writer {
                out: vec![super::PROTO, 2],
            }
        }

        pub fn op(&mut self, op: u8) {
            self.out.push(op);
        }

        pub fn mark(&mut self) {
            self.op(super::MARK);
        }

        pub fn global(&mut self, module: &str, name: &str) {
            self.op(super::GLOBAL);
            self.out.extend_from_slice(module.as_bytes());
            self.out.push(b'\n');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'\n');
        }

        pub fn str(&mut self, s: &str) {
            self.op(super::BINUNICODE);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.out.extend_from_slice(s.as_bytes());
        }

        pub fn int(&mut self, v: u64) {
            if v < 256 {
                self.out.extend_from_slice(&[super::BININT1, v as u8]);
            } else if v < 65536 {
                self.op(super::BININT2);
                self.out.extend_from_slice(&(v as u16).to_le_bytes());
            } else if v < (1 << 31) {
                self.op(super::BININT);
                self.out.extend_from_slice(&(v as u32).to_le_bytes());
            } else {
                // LONG1: minimal little-endian two's complement.
                let mut b = v.to_le_bytes().to_vec();
                while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                    b.pop();
                }
                if b[b.len() - 1] & 0x80 != 0 {
                    b.push(0);
                }
                self.out.extend_from_slice(&[super::LONG1, b.len() as u8]);
                self.out.extend_from_slice(&b);
            }
        }

        /// A tuple of non-negative integers.
        pub fn int_tuple(&mut self, v: &[u64]) {
            if v.is_empty() {
                self.op(super::EMPTY_TUPLE);
                return;
            }
            self.mark();
            for &x in v {
                self.int(x);
            }
            self.op(super::TUPLE);
        }

        pub fn stop(mut self) -> Vec<u8> {
            self.op(super::STOP);
            self.out
        }
    }

    pub use super::{
        APPEND, BINPERSID, BUILD, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NEWFALSE, NEWOBJ, NONE,
        REDUCE, SETITEMS, TUPLE,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> PResult<Pickle> {
        Pickle::parse(b, &LIMITS)
    }

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn scanned_pickles_are_the_pickles_without_their_payloads() {
        // pickle.dumps({'w': b'\\x01' * 300, 'short': b'ab', 'g': OrderedDict(a=1),
        // 's': {3, 4}, 'f': frozenset([5]), 'big': 10**30, 'txt': 'é' * 3}, protocol=P) for
        // P = 0, 2, 4, 5 (4 and 5 with a FRAME).
        for (i, h) in ["286470300a56770a70310a635f636f646563730a656e636f64650a70320a28560101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010a70330a566c6174696e310a70340a7470350a5270360a735673686f72740a70370a67320a285661620a70380a67340a7470390a527031300a7356670a7031310a63636f6c6c656374696f6e730a4f726465726564446963740a7031320a2874527031330a56610a7031340a49310a737356730a7031350a635f5f6275696c74696e5f5f0a7365740a7031360a28286c7031370a49330a6149340a61747031380a527031390a7356660a7032300a635f5f6275696c74696e5f5f0a66726f7a656e7365740a7032310a28286c7032320a49350a61747032330a527032340a73566269670a7032350a4c313030303030303030303030303030303030303030303030303030303030304c0a73567478740a7032360a56e9e9e90a7032370a732e","80027d7100285801000000777101635f636f646563730a656e636f64650a7102582c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101710358060000006c6174696e317104867105527106580500000073686f727471076802580200000061627108680486710952710a580100000067710b63636f6c6c656374696f6e730a4f726465726564446963740a710c2952710d580100000061710e4b0173580100000073710f635f5f6275696c74696e5f5f0a7365740a71105d7111284b034b04658571125271135801000000667114635f5f6275696c74696e5f5f0a66726f7a656e7365740a71155d71164b0561857117527118580300000062696771198a0d00000040eaed7446d09c2c9f0c5803000000747874711a5806000000c3a9c3a9c3a9711b752e","800495ad010000000000007d94288c017794422c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101948c0573686f72749443026162948c0167948c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b01738c0173948f94284b034b04908c016694284b0591948c03626967948a0d00000040eaed7446d09c2c9f0c8c03747874948c06c3a9c3a9c3a994752e","800595ad010000000000007d94288c017794422c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101948c0573686f72749443026162948c0167948c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b01738c0173948f94284b034b04908c016694284b0591948c03626967948a0d00000040eaed7446d09c2c9f0c8c03747874948c06c3a9c3a9c3a994752e"].iter().enumerate() {
            let b = unhex(h);
            let direct = parse(&b).unwrap();
            // At an offset in a larger source, with bytes after the STOP.
            let mut file = vec![0x55u8; 1000];
            file.extend_from_slice(&b);
            file.extend_from_slice(b"trailing bytes");
            let s = scan(&file[..], 1000, file.len() as u64, 1 << 20).unwrap();
            assert_eq!(s.len, b.len() as u64, "protocol #{i}");
            if i >= 2 {
                // Protocols 3 and up have byte payloads (before, bytes are _codecs.encode calls).
                assert!(s.stream.len() < b.len(), "protocol #{i}: payloads left in");
            }
            let scanned = Pickle::parse_scanned(&s, &LIMITS).unwrap();
            // The same graph; byte payloads located in the source.
            let shifted: Vec<Value> = direct
                .values
                .iter()
                .map(|v| match v {
                    Value::Bytes { at, len } => Value::Bytes {
                        at: at + 1000,
                        len: *len,
                    },
                    v => v.clone(),
                })
                .collect();
            assert_eq!(scanned.values, shifted, "protocol #{i}");
            assert_eq!(scanned.root, direct.root);
            let sets: Vec<usize> = scanned
                .values
                .iter()
                .filter_map(|v| match v {
                    Value::Set(items) => Some(items.len()),
                    _ => None,
                })
                .collect();
            if i >= 2 {
                assert_eq!(sets, vec![2, 1], "protocol #{i}: set items kept");
            }
            // Cut short: an error, not a panic.
            let cut = &file[..1000 + b.len() / 2];
            assert!(scan(cut, 1000, cut.len() as u64, 1 << 20).is_err());
        }
        // A payload claiming more than the file holds.
        let lie = b"\x80\x04B\xff\xff\x00\x00ab.";
        assert!(scan(&lie[..], 0, lie.len() as u64, 1 << 20).is_err());
        // The private opcode is refused in a pickle parsed as it is.
        assert!(
            parse(b"\xf0\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00.")
                .is_err()
        );
    }

    #[test]
    fn dict_of_scalars() {
        // pickle.dumps({'a': 1, 'b': [2.5, 'x'], 'c': True}, protocol=2)
        let b = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x04eX\x01\x00\x00\x00cq\x05\x88u.";
        let p = parse(b).unwrap();
        let Value::Dict(e) = p.get(p.root) else {
            panic!()
        };
        assert_eq!(e.len(), 3);
        assert_eq!(p.str(e[0].0), Some("a"));
        assert_eq!(p.int(e[0].1), Some(1));
        let items = p.seq(e[1].1).unwrap();
        assert_eq!(p.get(items[0]), &Value::Float(2.5));
        assert_eq!(p.get(e[2].1), &Value::Bool(true));
    }

    #[test]
    fn memo_keys_dense_sparse_and_moved() {
        // 7 under key 5000 while nothing is stored (too far for the vector: the hash map),
        // 8 under key 0; then keys 1..=5100 but 5000, and the vector, growing with them, takes
        // key 5000 over from the hash map. Every key resolves.
        let mut b = b"\x80\x02K\x07r\x88\x13\x00\x000K\x08q\x000".to_vec();
        for k in (1u32..=5100).filter(|&k| k != 5000) {
            b.extend_from_slice(b"K\x09r");
            b.extend_from_slice(&k.to_le_bytes());
            b.push(b'0');
        }
        b.extend_from_slice(b"j\x88\x13\x00\x00h\x00j\xb8\x0b\x00\x00\x87.");
        let p = parse(&b).unwrap();
        let items = p.seq(p.root).unwrap();
        let ints: Vec<i64> = items.iter().map(|&i| p.int(i).unwrap()).collect();
        assert_eq!(ints, vec![7, 8, 9]);
        // Overwriting a key keeps the count; a key never stored is an error.
        assert_eq!(
            parse(b"K\x01q\x05K\x02q\x05h\x05.").map(|p| p.int(p.root)),
            Ok(Some(2))
        );
        assert!(parse(b"K\x01q\x05h\x04.")
            .unwrap_err()
            .what
            .contains("never stored"));
    }

    #[test]
    fn longs() {
        // LONG1 of -1, of 2**63 (too big), of 2**40
        let p = parse(b"\x8a\x01\xff.").unwrap();
        assert_eq!(p.int(p.root), Some(-1));
        let p = parse(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.").unwrap();
        assert_eq!(p.get(p.root), &Value::BigInt);
        let p = parse(b"\x8a\x06\x00\x00\x00\x00\x00\x01.").unwrap();
        assert_eq!(p.int(p.root), Some(1 << 40));
    }

    #[test]
    fn malformed() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "without STOP"),
            (b"\x80\x02", "without STOP"),
            (b"\x80\x06.", "protocol 6"),
            (b"\xff", "unknown opcode 0xff"),
            (b".", "underflow"),
            (b"X\xff\xff\xff\xff", "truncated"),
            (b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),
            (b"h\x05.", "never stored"),
            (b"(K\x01d.", "odd number"),
            (b"K\x01K\x02a.", "APPEND to a int"),
            (b"K\x01\x82\x01.", "extension registry"),
            (b"K\x01(2.", "stack underflow"),
        ];
        for (b, want) in cases {
            let e = parse(b).unwrap_err();
            assert!(e.what.contains(want), "{b:?}: {e}");
        }
    }

    #[test]
    fn caps_hold() {
        let mut b = vec![b'('; 5000];
        b.push(b'.');
        assert!(parse(&b).unwrap_err().what.contains("nested MARK"));
        let small = Limits {
            max_values: 10,
            ..LIMITS
        };
        let b = b"]]]]]]]]]]]]].";
        assert!(Pickle::parse(b, &small)
            .unwrap_err()
            .what
            .contains("more than 10 values"));
    }

    #[test]
    fn writer_ints_round_trip() {
        for v in [
            0u64,
            255,
            256,
            65535,
            65536,
            (1 << 31) - 1,
            1 << 31,
            1 << 40,
            u64::MAX >> 1,
        ] {
            let mut w = write::Writer::new();
            w.int(v);
            let p = parse(&w.stop()).unwrap();
            assert_eq!(p.int(p.root), Some(v as i64), "{v}");
        }
    }
}
