//! Torch's tensor rebuild calls, recognised without being made: `_rebuild_tensor{,_v2,_v3}`,
//! `_rebuild_parameter`, `_rebuild_from_type_v2` over storages (`torch.FloatStorage`, ..., or
//! `torch.storage.UntypedStorage` with a dtype) become views of storage records, checked
//! against the records; other tensor kinds (quantized, sparse, meta, nested) are skipped with
//! what they are.

use super::archive::Storage;
use super::flatten::{has_true_flag, usize_seq, Storages, TensorLike, Walker};
use super::views::TorchTensor;
use crate::codec::pickle::{self, Call, Id, Value};
use crate::codec::DType;
use crate::error::{Error, Result};

impl<'p, F: Storages> Walker<'p, F> {
    /// Interprets `c` as one of torch's tensor rebuild calls: a tensor, a tensor that is
    /// skipped (with why), or `None` when it is no tensor at all.
    pub(super) fn tensor_like(
        &mut self,
        c: &Call,
        name: &str,
        depth: usize,
    ) -> Result<Option<TensorLike>> {
        let Some(g) = self.p.global(c.func) else {
            return Ok(None);
        };
        if !is_tensor_func(g) {
            return Ok(None);
        }
        let malformed = |w: &Self, what: &str| {
            Error::tensor(
                w.path,
                name,
                format!("malformed {} call{}: {what}", g.dotted(), Self::IN_PICKLE),
            )
        };
        let args = self
            .p
            .seq(c.args)
            .ok_or_else(|| malformed(self, "arguments are not a tuple"))?;
        let fname = &*g.name;
        match (&*g.module, fname) {
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
                let (min, dtype_arg, meta_arg) = match fname {
                    "_rebuild_tensor" => (4, None, None),
                    "_rebuild_tensor_v2" => (6, None, Some(6)),
                    _ => (7, Some(6), Some(7)),
                };
                if args.len() < min {
                    return Err(malformed(self, &format!("{} arguments", args.len())));
                }
                if let Some(&m) = meta_arg.and_then(|i| args.get(i)) {
                    if has_true_flag(self.p, m) {
                        return Err(Error::tensor(
                            self.path,
                            name,
                            "has torch's lazy conjugate/negative bit set; save it after \
                             .resolve_conj().resolve_neg()",
                        ));
                    }
                }
                let storage = args[0];
                let explicit = match dtype_arg {
                    Some(i) => match self.p.global(args[i]) {
                        Some(d) if &*d.module == "torch" => match DType::from_torch_name(&d.name) {
                            Some(dt) => Some(dt),
                            None => {
                                return Ok(Some(TensorLike::Skip(format!(
                                    "tensor of dtype torch.{}",
                                    d.name
                                ))))
                            }
                        },
                        _ => return Err(malformed(self, "the dtype is not a torch dtype")),
                    },
                    None => None,
                };
                self.rebuild(storage, args[1], args[2], args[3], explicit, name)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let &data = args
                    .first()
                    .ok_or_else(|| malformed(self, "no arguments"))?;
                self.nested(data, name, depth)
            }
            ("torch._tensor", "_rebuild_from_type_v2" | "_rebuild_from_type") => {
                if args.len() < 3 {
                    return Err(malformed(self, &format!("{} arguments", args.len())));
                }
                if depth >= 4 {
                    return Err(malformed(self, "nested too deeply"));
                }
                let inner = Call {
                    func: args[0],
                    args: args[2],
                    state: None,
                    items: Vec::new(),
                    entries: Vec::new(),
                };
                Ok(Some(
                    self.tensor_like(&inner, name, depth + 1)?
                        .unwrap_or_else(|| TensorLike::Skip(g.dotted())),
                ))
            }
            _ => {
                let what = match fname {
                    "_rebuild_qtensor" => "quantized tensor".to_string(),
                    "_rebuild_sparse_tensor" | "_rebuild_sparse_csr_tensor" => {
                        "sparse tensor".to_string()
                    }
                    "_rebuild_meta_tensor_no_storage" => {
                        "tensor on the meta device (no data)".into()
                    }
                    "_rebuild_nested_tensor" => "nested tensor".into(),
                    _ => format!("tensor ({})", g.dotted()),
                };
                Ok(Some(TensorLike::Skip(what)))
            }
        }
    }

    /// The tensor `data` of a `_rebuild_parameter` call.
    fn nested(&mut self, data: Id, name: &str, depth: usize) -> Result<Option<TensorLike>> {
        if depth >= 4 {
            return Err(Error::tensor(
                self.path,
                name,
                format!(
                    "{}: parameter rebuild calls nested too deeply",
                    Self::MALFORMED
                ),
            ));
        }
        match self.p.get(data) {
            Value::Call(inner) => {
                let inner = inner.clone();
                Ok(Some(
                    self.tensor_like(&inner, name, depth + 1)?
                        .unwrap_or_else(|| TensorLike::Skip("parameter of a non-tensor".into())),
                ))
            }
            _ => Err(Error::tensor(
                self.path,
                name,
                format!(
                    "{}: a parameter whose data is not a tensor",
                    Self::MALFORMED
                ),
            )),
        }
    }

    /// The storage that `arg` of a rebuild call names: a persistent id (`('storage', type,
    /// key, location, numel)`, with a sixth item, a view of another storage or `None`, in the
    /// legacy format) or a storage embedded as bytes (`torch.storage._load_from_bytes(b)`).
    /// Returns its key, type, size in elements and the offset (in elements) of the view.
    fn storage_of(&mut self, arg: Id, name: &str) -> Result<(String, pickle::Global, u64, u64)> {
        let terr = |w: &Self, what: &str| Error::tensor(w.path, name, what);
        match self.p.get(arg) {
            Value::PersId(pid) => {
                let items = self
                    .p
                    .seq(*pid)
                    .filter(|t| {
                        (t.len() == 5 || t.len() == 6) && self.p.str(t[0]) == Some("storage")
                    })
                    .ok_or_else(|| {
                        terr(
                            self,
                            &format!(
                                "{}: a persistent id that is not ('storage', type, key, \
                                 location, numel)",
                                Self::MALFORMED
                            ),
                        )
                    })?
                    .to_vec();
                let storage_type = self
                    .p
                    .global(items[1])
                    .ok_or_else(|| {
                        terr(
                            self,
                            &format!("{}: storage type is not a global", Self::MALFORMED),
                        )
                    })?
                    .clone();
                let key_of = |w: &Self, id: Id| match w.p.get(id) {
                    Value::Str(s) => Ok(s.to_string()),
                    Value::Int(i) => Ok(i.to_string()),
                    _ => Err(terr(
                        w,
                        &format!("{}: storage key is not a string", Self::MALFORMED),
                    )),
                };
                let key = key_of(self, items[2])?;
                let numel = self
                    .p
                    .int(items[4])
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| {
                        terr(
                            self,
                            &format!("{}: storage size is not a count", Self::MALFORMED),
                        )
                    })?;
                // Legacy views of a storage: (root key, offset, size).
                match items.get(5).map(|&v| self.p.get(v)) {
                    None | Some(Value::None) => Ok((key, storage_type, numel, 0)),
                    Some(_) => {
                        let view = self
                            .p
                            .seq(items[5])
                            .filter(|v| v.len() == 3)
                            .ok_or_else(|| terr(self, "malformed storage view"))?
                            .to_vec();
                        let count = |w: &Self, id: Id| {
                            w.p.int(id)
                                .and_then(|n| u64::try_from(n).ok())
                                .ok_or_else(|| terr(w, "malformed storage view"))
                        };
                        let (off, size) = (count(self, view[1])?, count(self, view[2])?);
                        let _ = size;
                        Ok((key_of(self, view[0])?, storage_type, numel, off))
                    }
                }
            }
            Value::Call(c)
                if self
                    .p
                    .global(c.func)
                    .is_some_and(|g| g.is("torch.storage", "_load_from_bytes")) =>
            {
                let bytes = self.p.seq(c.args).and_then(|a| a.first().copied());
                match bytes.map(|b| self.p.get(b)) {
                    Some(&Value::Bytes { at, len }) => {
                        let e = self.records.embedded(at, len)?;
                        Ok((e.key, e.storage_type, e.numel, 0))
                    }
                    Some(Value::Call(e))
                        if self
                            .p
                            .global(e.func)
                            .is_some_and(|g| g.is("_codecs", "encode")) =>
                    {
                        // Protocol 2 has no bytes opcode: it pickles bytes as
                        // `_codecs.encode(text, "latin1")`, text that is not the bytes on disk.
                        Err(terr(
                            self,
                            "the storage is pickled as text (`_codecs.encode`, pickle protocol 2), \
                             which cannot be read in place: re-save it with pickle protocol 3 or \
                             newer (`pickle.dump(obj, f, protocol=4)`)",
                        ))
                    }
                    _ => Err(terr(
                        self,
                        "malformed pickle: _load_from_bytes of something other than bytes",
                    )),
                }
            }
            _ => Err(terr(
                self,
                &format!("{}: the storage is not a persistent id", Self::MALFORMED),
            )),
        }
    }

    /// A tensor viewing storage `arg` from `offset` with `size` and `stride`, checked against
    /// the storage's record.
    fn rebuild(
        &mut self,
        arg: Id,
        offset: Id,
        size: Id,
        stride: Id,
        explicit: Option<DType>,
        name: &str,
    ) -> Result<Option<TensorLike>> {
        let terr = |w: &Self, what: String| Error::tensor(w.path, name, what);
        let (key, storage_type, numel, view_offset) = self.storage_of(arg, name)?;
        let storage_type = &storage_type;
        let storage_dtype = match (&*storage_type.module, &*storage_type.name) {
            ("torch" | "torch.storage", "UntypedStorage") => DType::U8,
            ("torch" | "torch.cuda", n) => match DType::from_torch_storage(n) {
                Some(d) => d,
                None => return Ok(Some(TensorLike::Skip(format!("tensor of torch.{n}")))),
            },
            _ => {
                return Err(terr(
                    self,
                    format!(
                        "unknown storage type {}{}",
                        storage_type.dotted(),
                        Self::IN_PICKLE
                    ),
                ))
            }
        };
        let dtype = explicit.unwrap_or(storage_dtype);
        let nbytes = numel
            .checked_mul(storage_dtype.size() as u64)
            .ok_or_else(|| terr(self, format!("storage size {numel} overflows")))?;
        let storage = match self.storage_index.get(&key) {
            Some(&i) => {
                if self.flat.storages[i].nbytes != nbytes {
                    return Err(terr(
                        self,
                        format!(
                            "storage `{key}` is referenced with two sizes ({} and {nbytes} bytes)",
                            self.flat.storages[i].nbytes
                        ),
                    ));
                }
                i
            }
            None => {
                let (entry, data_offset, record_len) = self.records.record(&key)?;
                if record_len < nbytes {
                    return Err(terr(
                        self,
                        format!(
                            "storage `{key}` needs {nbytes} bytes but its record holds {record_len} \
                             (truncated or damaged file?)"
                        ),
                    ));
                }
                self.flat.storages.push(Storage {
                    nbytes,
                    entry,
                    data_offset,
                    record_len,
                });
                self.storage_index
                    .insert(key.clone(), self.flat.storages.len() - 1);
                self.flat.storages.len() - 1
            }
        };
        let storage_offset = self
            .p
            .int(offset)
            .and_then(|o| u64::try_from(o).ok())
            .and_then(|o| o.checked_add(view_offset))
            .ok_or_else(|| {
                terr(
                    self,
                    format!("{}: storage offset is not a count", Self::MALFORMED),
                )
            })?;
        let shape = usize_seq(self.p, size).ok_or_else(|| {
            terr(
                self,
                format!("{}: size is not a tuple of counts", Self::MALFORMED),
            )
        })?;
        let stride = usize_seq(self.p, stride).ok_or_else(|| {
            terr(
                self,
                format!("{}: stride is not a tuple of counts", Self::MALFORMED),
            )
        })?;
        if shape.len() != stride.len() {
            return Err(terr(
                self,
                format!(
                    "{}: size {shape:?} and stride {stride:?} differ in length",
                    Self::MALFORMED
                ),
            ));
        }
        let elem = dtype.size() as u64;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .filter(|n| n.checked_mul(elem).is_some())
            .ok_or_else(|| terr(self, format!("shape {shape:?} overflows")))?;
        if numel > 0 {
            let capacity = nbytes / elem;
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(storage_offset, |a, (&d, &s)| {
                    (d as u64 - 1)
                        .checked_mul(s as u64)
                        .and_then(|x| a.checked_add(x))
                });
            if last.map_or(true, |v| v >= capacity) {
                return Err(terr(
                    self,
                    format!(
                        "{dtype} {shape:?} with strides {stride:?} at offset {storage_offset} \
                         runs past its storage `{key}` of {nbytes} bytes"
                    ),
                ));
            }
        }
        self.charge_text(name.len())?;
        Ok(Some(TensorLike::Tensor(TorchTensor {
            name: name.to_string(),
            dtype,
            shape,
            stride,
            storage_offset,
            storage,
        })))
    }
}

/// Whether `g` is one of torch's tensor rebuild functions.
pub(super) fn is_tensor_func(g: &pickle::Global) -> bool {
    (&*g.module == "torch._utils" && g.name.starts_with("_rebuild_"))
        || g.is("torch._tensor", "_rebuild_from_type_v2")
        || g.is("torch._tensor", "_rebuild_from_type")
}
