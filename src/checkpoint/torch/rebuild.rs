//! Torch's tensor rebuild calls, recognised without being made: `_rebuild_tensor{,_v2,_v3}`,
//! `_rebuild_parameter`, `_rebuild_from_type_v2` over storages (`torch.FloatStorage`, ..., or
//! `torch.storage.UntypedStorage` with a dtype) become views of storage records, checked
//! against the records; other tensor kinds (quantized, sparse, meta, nested) are skipped with
//! what they are.

use super::archive::Storage;
use super::flatten::{has_true_flag, usize_seq, TensorLike, Walker};
use super::views::TorchTensor;
use crate::codec::pickle::{self, Call, Id, Value};
use crate::codec::{zip, DType};
use crate::error::{Error, Result};

impl<'p, F> Walker<'p, F>
where
    F: FnMut(&str) -> Result<(zip::Entry, u64, u64)>,
{
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
                format!("malformed {} call in data.pkl: {what}", g.dotted()),
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
                let storage = match self.p.get(args[0]) {
                    Value::PersId(pid) => *pid,
                    _ => return Err(malformed(self, "the storage is not a persistent id")),
                };
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
                "malformed data.pkl: parameter rebuild calls nested too deeply",
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
                "malformed data.pkl: a parameter whose data is not a tensor",
            )),
        }
    }

    /// A tensor viewing storage `pid` from `offset` with `size` and `stride`, checked against
    /// the storage's record.
    fn rebuild(
        &mut self,
        pid: Id,
        offset: Id,
        size: Id,
        stride: Id,
        explicit: Option<DType>,
        name: &str,
    ) -> Result<Option<TensorLike>> {
        let terr = |w: &Self, what: String| Error::tensor(w.path, name, what);
        // ('storage', storage_type, key, location, numel)
        let pid_items = self
            .p
            .seq(pid)
            .filter(|t| t.len() == 5 && self.p.str(t[0]) == Some("storage"))
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: a persistent id that is not ('storage', type, key, \
                     location, numel)"
                        .into(),
                )
            })?
            .to_vec();
        let storage_type = self.p.global(pid_items[1]).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: storage type is not a global".into(),
            )
        })?;
        let storage_dtype = match (&*storage_type.module, &*storage_type.name) {
            ("torch" | "torch.storage", "UntypedStorage") => DType::U8,
            ("torch" | "torch.cuda", n) => match DType::from_torch_storage(n) {
                Some(d) => d,
                None => return Ok(Some(TensorLike::Skip(format!("tensor of torch.{n}")))),
            },
            _ => {
                return Err(terr(
                    self,
                    format!("unknown storage type {} in data.pkl", storage_type.dotted()),
                ))
            }
        };
        let dtype = explicit.unwrap_or(storage_dtype);
        let key = match self.p.get(pid_items[2]) {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => {
                return Err(terr(
                    self,
                    "malformed data.pkl: storage key is not a string".into(),
                ))
            }
        };
        let numel = self
            .p
            .int(pid_items[4])
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: storage size is not a count".into(),
                )
            })?;
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
                let (entry, data_offset, record_len) = (self.records)(&key)?;
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
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: storage offset is not a count".into(),
                )
            })?;
        let shape = usize_seq(self.p, size).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: size is not a tuple of counts".into(),
            )
        })?;
        let stride = usize_seq(self.p, stride).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: stride is not a tuple of counts".into(),
            )
        })?;
        if shape.len() != stride.len() {
            return Err(terr(
                self,
                format!(
                    "malformed data.pkl: size {shape:?} and stride {stride:?} differ in length"
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
