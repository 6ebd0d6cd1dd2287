//! The GGUF v2/v3 header: magic, version, metadata key/values, tensor records, alignment and the
//! start of the data section. Parsed from a byte slice (a memory map in practice) with every count and
//! length checked against the bytes that remain before anything is allocated, and overflow-safe
//! offset arithmetic, so that a truncated or hostile file gives an error and never a panic or a
//! huge allocation.

use std::collections::BTreeMap;

use super::quant::GgmlType;
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Nested arrays deeper than this are refused (the format allows nesting; no real file uses it).
const MAX_ARRAY_DEPTH: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, stored by element type so that a large array costs about what it costs in the
/// file.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Integer elements widened to i64 (None for float, bool, string or nested arrays, or a u64 that
    /// does not fit).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy + TryInto<i64>>(v: &[T]) -> Option<Vec<i64>> {
            v.iter().map(|&x| x.try_into().ok()).collect()
        }
        match self {
            Array::U8(v) => conv(v),
            Array::I8(v) => conv(v),
            Array::U16(v) => conv(v),
            Array::I16(v) => conv(v),
            Array::U32(v) => conv(v),
            Array::I32(v) => conv(v),
            Array::U64(v) => conv(v),
            Array::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl Value {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any numeric value.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor record of the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost first. `[576, 49152]` is a row-major `[49152, 576]` matrix.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major shape (GGUF dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        // Dims were checked at parse time to have a product that fits in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn elem_count(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl Header {
    /// Parses `bytes` (a whole GGUF file); `file` names it in errors.
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Header> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4).map_err(|m| Error::format(file, m))?;
        if magic != MAGIC {
            return Err(Error::format(
                file,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = r.u32().map_err(|m| Error::format(file, m))?;
        if version != 2 && version != 3 {
            return Err(Error::format(
                file,
                format!("unsupported GGUF version {version} (2 and 3 are read)"),
            ));
        }
        let n_tensors = r.u64().map_err(|m| Error::format(file, m))?;
        let n_kv = r.u64().map_err(|m| Error::format(file, m))?;
        // Smallest possible records: a key/value is an empty key (8) + type (4) + one byte; a tensor
        // record is an empty name (8) + n_dims (4) + type (4) + offset (8).
        r.check_count(n_kv, 13)
            .map_err(|m| Error::format(file, format!("metadata count {n_kv}: {m}")))?;
        r.check_count(n_tensors, 24)
            .map_err(|m| Error::format(file, format!("tensor count {n_tensors}: {m}")))?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r
                .string()
                .map_err(|m| Error::format(file, format!("metadata key #{i}: {m}")))?;
            let value = r.value(0).map_err(|m| Error::key(file, &key, m))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::key(file, &key, "duplicate key"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::key(
                        file,
                        "general.alignment",
                        format!("invalid alignment {v:?}"),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let t = r
                .tensor_info()
                .map_err(|m| Error::format(file, format!("tensor record #{i}: {m}")))?;
            let t = t.map_err(|(name, m)| Error::tensor(file, &name, m))?;
            if !names.insert(t.name.clone()) {
                return Err(Error::tensor(file, &t.name, "duplicate tensor name"));
            }
            tensors.push(t);
        }

        let end = r.pos as u64;
        let data_offset = end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| Error::format(file, "data offset overflows"))?;
        let file_len = bytes.len() as u64;
        if !tensors.is_empty() && data_offset > file_len {
            return Err(Error::format(
                file,
                format!(
                    "truncated: data section starts at {data_offset}, file has {file_len} bytes"
                ),
            ));
        }
        for t in &tensors {
            check_tensor_bounds(t, alignment, data_offset, file_len)
                .map_err(|m| Error::tensor(file, &t.name, m))?;
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Checks that a tensor of a type we can read lies inside the file. Types we cannot read are only
/// reported when the tensor is loaded (with their name), so their sizes are not needed here.
fn check_tensor_bounds(
    t: &TensorInfo,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> std::result::Result<(), String> {
    if t.offset % alignment != 0 {
        return Err(format!(
            "offset {} is not a multiple of the alignment {alignment}",
            t.offset
        ));
    }
    let Some(nbytes) = t.ty.byte_size(&t.dims)? else {
        return Ok(());
    };
    let end = data_offset
        .checked_add(t.offset)
        .and_then(|s| s.checked_add(nbytes))
        .ok_or("data range overflows")?;
    if end > file_len {
        return Err(format!(
            "data [{}..{end}) lies past the end of the file ({file_len} bytes): truncated?",
            data_offset.saturating_add(t.offset)
        ));
    }
    Ok(())
}

/// A bounds-checked little-endian cursor. Errors are plain messages; the caller adds the file and the
/// key or tensor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type R<T> = std::result::Result<T, String>;

macro_rules! read_prim {
    ($name:ident, $t:ty) => {
        fn $name(&mut self) -> R<$t> {
            let b = self.take(std::mem::size_of::<$t>())?;
            let mut a = [0u8; std::mem::size_of::<$t>()];
            a.copy_from_slice(b);
            Ok(<$t>::from_le_bytes(a))
        }
    };
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Refuses `count` elements of at least `min_size` bytes each when they cannot fit in what is left.
    fn check_count(&self, count: u64, min_size: u64) -> R<usize> {
        let need = count.checked_mul(min_size).ok_or("absurd count")?;
        if need > self.remaining() as u64 {
            return Err(format!(
                "absurd count or truncated file: needs at least {need} bytes, {} left",
                self.remaining()
            ));
        }
        Ok(count as usize)
    }

    read_prim!(u8, u8);
    read_prim!(i8, i8);
    read_prim!(u16, u16);
    read_prim!(i16, i16);
    read_prim!(u32, u32);
    read_prim!(i32, i32);
    read_prim!(u64, u64);
    read_prim!(i64, i64);
    read_prim!(f32, f32);
    read_prim!(f64, f64);

    fn bool(&mut self) -> R<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("invalid bool byte {b}")),
        }
    }

    fn string(&mut self) -> R<String> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "string length {len} exceeds the {} bytes left",
                self.remaining()
            ));
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not valid UTF-8".to_string())
    }

    fn value(&mut self, depth: usize) -> R<Value> {
        let ty = self.u32()?;
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.i8()?),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.i16()?),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.i32()?),
            6 => Value::F32(self.f32()?),
            7 => Value::Bool(self.bool()?),
            8 => Value::String(self.string()?),
            9 => Value::Array(self.array(depth)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.i64()?),
            12 => Value::F64(self.f64()?),
            t => return Err(format!("unknown value type {t}")),
        })
    }

    fn array(&mut self, depth: usize) -> R<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
        }
        let ty = self.u32()?;
        let n = self.u64()?;
        let min_size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 | 8 => 8,
            9 => 12,
            t => return Err(format!("unknown array element type {t}")),
        };
        let n = self
            .check_count(n, min_size)
            .map_err(|m| format!("array length {n}: {m}"))?;
        macro_rules! many {
            ($variant:ident, $read:ident) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.$read()?);
                }
                Array::$variant(v)
            }};
        }
        Ok(match ty {
            0 => many!(U8, u8),
            1 => many!(I8, i8),
            2 => many!(U16, u16),
            3 => many!(I16, i16),
            4 => many!(U32, u32),
            5 => many!(I32, i32),
            6 => many!(F32, f32),
            7 => many!(Bool, bool),
            8 => many!(String, string),
            10 => many!(U64, u64),
            11 => many!(I64, i64),
            12 => many!(F64, f64),
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }

    /// A tensor record. The outer error is a framing problem (no name yet); the inner one names the
    /// tensor.
    #[allow(clippy::type_complexity)]
    fn tensor_info(&mut self) -> R<std::result::Result<TensorInfo, (String, String)>> {
        let name = self.string()?;
        let n_dims = self.u32()? as usize;
        if n_dims > MAX_DIMS {
            return Ok(Err((name, format!("{n_dims} dims (at most {MAX_DIMS})"))));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let ty = self.u32()?;
        let offset = self.u64()?;
        // The element count must fit in an i64 (ggml's own limit) and in usize.
        let mut count: u64 = 1;
        for &d in &dims {
            match count.checked_mul(d) {
                Some(c) if c <= i64::MAX as u64 && usize::try_from(c).is_ok() => count = c,
                _ => return Ok(Err((name, format!("absurd dims {dims:?}")))),
            }
        }
        let ty = match GgmlType::from_id(ty) {
            Some(t) => t,
            None => return Ok(Err((name, format!("unknown GGUF type id {ty}")))),
        };
        Ok(Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
        }))
    }
}
