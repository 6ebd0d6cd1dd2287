//! GGML tensor types and their dequantisation to f32.
//!
//! Block layouts (little-endian, 32 elements per block):
//! - `Q8_0`: f16 scale `d`, 32 × i8 `q`; `x = q·d`.
//! - `Q4_0`: f16 `d`, 16 bytes of nibbles; the low nibbles are elements 0..16, the high nibbles
//!   16..32; `x = (q − 8)·d`.
//! - `Q4_1`: f16 `d`, f16 `m`, 16 bytes of nibbles laid out as in `Q4_0`; `x = q·d + m`.
//!
//! The arithmetic is done in f32 in the same order as gguf-py (`d * q`, then `+ m`), so the results
//! are bit-identical to what Hugging Face transformers loads.

use half::{bf16, f16};

/// A GGML tensor type id as stored in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// Names of the ids ggml defines (ids 4 and 5, the removed Q4_2/Q4_3, and 31..33 are unused).
const NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// A type id ggml defines (readable or not); None for ids it does not.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        NAMES.iter().any(|&(i, _)| i == id).then_some(GgmlType(id))
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|&&(i, _)| i == self.0)
            .map_or("unknown", |&(_, n)| n)
    }

    /// (elements per block, bytes per block) for the types this crate can dequantise.
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            _ => None,
        }
    }

    pub fn is_supported(self) -> bool {
        self.block().is_some()
    }

    /// Bytes of a tensor with GGUF `dims` (innermost first): Ok(None) for a type we cannot read, an
    /// error when the rows do not split into whole blocks or the size overflows.
    pub fn byte_size(self, dims: &[u64]) -> Result<Option<u64>, String> {
        let Some((block, block_bytes)) = self.block() else {
            return Ok(None);
        };
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % block as u64 != 0 {
            return Err(format!(
                "row length {ne0} is not a multiple of the {} block size {block}",
                self.name()
            ));
        }
        let count = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or("absurd dims")?;
        (count / block as u64)
            .checked_mul(block_bytes as u64)
            .map(Some)
            .ok_or_else(|| "absurd dims".to_string())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            "unknown" => write!(f, "type {}", self.0),
            n => f.write_str(n),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `data` (exactly `n` elements of type `ty`, as checked by the caller) into f32.
/// Returns None for a type this crate cannot read.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Option<Vec<f32>> {
    let (block, block_bytes) = ty.block()?;
    debug_assert_eq!(data.len(), n / block * block_bytes);
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * f32::from((q & 0x0f) as i8 - 8)));
                out.extend(qs.iter().map(|&q| d * f32::from((q >> 4) as i8 - 8)));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(v, want);
    }

    #[test]
    fn q4_0_block() {
        // byte j = low nibble j % 16, high nibble 15 - j % 16
        let mut b = h(0.25).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(v[0], -2.0); // (0 - 8) * 0.25
        assert_eq!(v[15], 1.75); // (15 - 8) * 0.25
        assert_eq!(v[16], 1.75); // high nibble of byte 0 = 15
        assert_eq!(v[31], -2.0); // high nibble of byte 15 = 0
        let want: Vec<f32> = (0..16)
            .map(|j| (j as f32 - 8.0) * 0.25)
            .chain((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.25))
            .collect();
        assert_eq!(v, want);
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(2.0).to_vec();
        b.extend(h(-1.5));
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        let want: Vec<f32> = (0..16)
            .map(|j| j as f32 * 2.0 - 1.5)
            .chain(std::iter::repeat_n(3.0 * 2.0 - 1.5, 16))
            .collect();
        assert_eq!(v, want);
    }

    #[test]
    fn float_types() {
        let f: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &f, 2).unwrap(), vec![1.5, -2.0]);
        let f: Vec<u8> = [h(0.125), h(-3.0)].concat();
        assert_eq!(dequantize(GgmlType::F16, &f, 2).unwrap(), vec![0.125, -3.0]);
        let f: Vec<u8> = [bf16::from_f32(7.0), bf16::from_f32(-0.5)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::BF16, &f, 2).unwrap(), vec![7.0, -0.5]);
    }

    #[test]
    fn sizes_and_names() {
        assert_eq!(GgmlType::Q4_1.byte_size(&[64, 3]), Ok(Some(3 * 2 * 20)));
        assert!(GgmlType::Q8_0.byte_size(&[33]).is_err());
        assert_eq!(GgmlType(13).byte_size(&[256]), Ok(None));
        assert_eq!(GgmlType(13).to_string(), "Q5_K");
        assert!(GgmlType::from_id(4).is_none());
        assert!(GgmlType::Q4_0.byte_size(&[u64::MAX, 32]).is_err());
    }
}
