//! The machine: the opcodes of a pickle run over a stack, a mark stack and a memo into the
//! arena of values, every opcode's argument bounds-checked, every cap of [`Limits`] held.

use std::collections::HashMap;

use super::opcodes::*;
use super::{Call, Global, Id, Limits, PResult, Pickle, PickleError, Value};

/// Runs the machine over `data` (a [`scan`](super::scan())ned stream when `scanned`).
pub(super) fn run(data: &[u8], limits: &Limits, scanned: bool) -> PResult<Pickle> {
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
    /// The data is a [`scan`](super::scan())ned stream: byte payloads are [`BYTES_AT`]
    /// references.
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
