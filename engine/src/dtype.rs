//! Element types. `F32` and `BF16` are the working dtypes; `F64` exists so that gradient checks run in
//! double precision; `U32` holds indices (token ids, top-k picks) and boolean masks (0 or 1).

use half::bf16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// The dtype this float dtype accumulates in: f64 for f64, f32 otherwise. Sums, statistics,
    /// LoRA adapters, routers, optimizer moments and loss statistics are kept in it.
    pub fn accumulation(self) -> DType {
        if self == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::U32 => "u32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust element type that a tensor can hold.
pub trait WithDType: Copy + Send + Sync + std::fmt::Debug + PartialOrd + 'static {
    const DTYPE: DType;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl WithDType for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl WithDType for f64 {
    const DTYPE: DType = DType::F64;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl WithDType for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}

impl WithDType for u32 {
    const DTYPE: DType = DType::U32;
    fn from_f64(v: f64) -> Self {
        v as u32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
