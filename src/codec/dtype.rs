//! Element types of checkpoint tensors, their sizes and their names in each format.

use std::fmt;

/// The element type of a tensor.
///
/// Names follow safetensors (`F32`, `BF16`, ...); [`DType::torch_name`] gives PyTorch's.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    /// float8 e4m3fn (PyTorch `float8_e4m3fn`).
    F8E4M3,
    /// float8 e5m2 (PyTorch `float8_e5m2`).
    F8E5M2,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Whether values of this type are averaged (floating point) or copied (integers, bool).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F8E4M3 | DType::F8E5M2 | DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
    }

    /// The safetensors name (`F32`, `BF16`, `F8_E4M3`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// The PyTorch storage class that holds this type (`FloatStorage`, ...).
    pub fn torch_storage(self) -> &'static str {
        match self {
            DType::Bool => "BoolStorage",
            DType::U8 => "ByteStorage",
            DType::I8 => "CharStorage",
            DType::I16 => "ShortStorage",
            DType::U16 => "UInt16Storage",
            DType::I32 => "IntStorage",
            DType::U32 => "UInt32Storage",
            DType::I64 => "LongStorage",
            DType::U64 => "UInt64Storage",
            DType::F8E4M3 => "Float8_e4m3fnStorage",
            DType::F8E5M2 => "Float8_e5m2Storage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F32 => "FloatStorage",
            DType::F64 => "DoubleStorage",
        }
    }

    /// Parses a PyTorch storage class name (`FloatStorage`, `BFloat16Storage`, ...).
    pub fn from_torch_storage(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.torch_storage() == name)
    }

    /// Parses a PyTorch dtype name: the canonical one of [`DType::torch_name`] or one of its
    /// aliases (`torch.float`, `torch.double`, `torch.half`, `torch.long`, `torch.int`,
    /// `torch.short`).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let canonical = match name {
            "float" => "float32",
            "double" => "float64",
            "half" => "float16",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            n => n,
        };
        DType::ALL.into_iter().find(|d| d.torch_name() == canonical)
    }

    /// PyTorch's name for the type (`float32`, `bfloat16`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Number of elements of a shape, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes taken by a tensor of `shape` and `dtype`, or `None` on overflow.
pub fn nbytes(dtype: DType, shape: &[usize]) -> Option<u64> {
    numel(shape)?
        .checked_mul(dtype.size())
        .and_then(|n| u64::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_storage(d.torch_storage()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
        }
    }

    #[test]
    fn torch_aliases() {
        assert_eq!(DType::from_torch_name("float"), Some(DType::F32));
        assert_eq!(DType::from_torch_name("long"), Some(DType::I64));
        assert_eq!(DType::from_torch_name("complex64"), None);
    }

    #[test]
    fn sizes_overflow_is_caught() {
        assert_eq!(nbytes(DType::F32, &[2, 3]), Some(24));
        assert_eq!(nbytes(DType::F64, &[usize::MAX, 2]), None);
        assert_eq!(nbytes(DType::F32, &[]), Some(4));
    }
}
