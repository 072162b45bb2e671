//! Writing the pickles `torch.save` writes for a state dict (protocol 2).

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
    APPEND, BINPERSID, BUILD, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NEWFALSE, NEWOBJ, NONE, REDUCE,
    SETITEMS, TUPLE,
};
