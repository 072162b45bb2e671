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
//!
//! - `opcodes`: the opcodes, as named in Lib/pickle.py;
//! - `scan`: a pickle in a file read without its byte payloads ([`scan()`], [`Scanned`]);
//! - `machine`: the opcodes run into the arena of values;
//! - [`write`](mod@write): the pickles ema-tool writes (`torch.save`'s of a state dict).

mod machine;
mod opcodes;
mod scan;
pub mod write;

use std::fmt;

pub use opcodes::*;
pub use scan::{scan, ReadAt, Scanned};

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
    /// own bytes, or the file that [`scan()`] read it from) and how long they are. The contents
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
        machine::run(data, limits, false)
    }

    /// Runs the machine over a stream that [`scan()`] compacted.
    pub fn parse_scanned(s: &Scanned, limits: &Limits) -> PResult<Pickle> {
        let mut p = machine::run(&s.stream, limits, true)?;
        p.len = s.len;
        Ok(p)
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

#[cfg(test)]
mod tests;
