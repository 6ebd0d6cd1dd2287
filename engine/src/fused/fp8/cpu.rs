//! The FP8 unit's primitives on the CPU: the reference of the kernels in `kernels/src/fp8.cu`
//! (the maths is in `primitives.rs`). Codes are encoded by [`super::codec`]; the product decodes
//! both operands to f32 and runs the CPU's f32 GEMM, so only the order of the f32 sums differs
//! from the GPU's.

use rayon::prelude::*;

use super::codec::{encode, table};
use super::primitives::{
    check_gemm, check_transpose, check_vec, quant_dims, CodeDims, Fp8Format, GemmFp8, QuantizeRows,
    TransposeCodes,
};
use crate::backend::cpu::matmul::matmul_t;
use crate::backend::cpu::{acc::store, CpuStorage};
use crate::backend::BackendStorage;
use crate::{DType, Error, Layout, Result};

/// Below this largest magnitude a row counts as zero (scale 1, so its codes are zeros):
/// `FMAX / amax` could overflow.
pub(super) const MIN_AMAX: f32 = f32::from_bits(0x0D80_0000); // 2^-100

/// `amax / FMAX` and the factor `FMAX / amax` that maps `amax` onto `FMAX`; `(1, 1)` for an
/// input whose largest magnitude is below [`MIN_AMAX`] (0 included). A NaN amax gives NaN for
/// both, an infinite one `(inf, 0)`.
pub(super) fn scale_of(amax: f32, f: Fp8Format) -> (f32, f32) {
    let fmax = f.max_finite();
    if amax < MIN_AMAX {
        (1.0, 1.0)
    } else {
        (amax / fmax, fmax / amax)
    }
}

/// `max |v|` over `v`, NaN when `v` holds one.
fn amax(v: impl Iterator<Item = f32>) -> f32 {
    v.fold(0.0f32, |m, x| {
        if m.is_nan() || x.is_nan() {
            f32::NAN
        } else {
            m.max(x.abs())
        }
    })
}

/// Packs codes (a multiple of 4) into little-endian words.
fn pack(codes: &[u8]) -> Vec<u32> {
    codes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The codes of a contiguous word view.
fn unpack(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<u8>> {
    let words = s.view_u32(op, l)?;
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

fn f32_vec(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    if s.dtype() != DType::F32 {
        return Err(Error::invalid(
            op,
            format!("scales must be f32, found {}", s.dtype()),
        ));
    }
    s.view_f32(op, l)
}

pub(super) fn quantize_rows(
    o: QuantizeRows<'_, CpuStorage>,
    f: Fp8Format,
) -> Result<(CpuStorage, CpuStorage)> {
    const OP: &str = "fp8_quantize_rows";
    let d = quant_dims(OP, o.w.l)?;
    let mut v = o.w.s.view_f32(OP, o.w.l)?;
    let col = match o.col {
        Some(c) => {
            check_vec(OP, "column scales", c.l, d.cols)?;
            Some(f32_vec(OP, c.s, c.l)?)
        }
        None => None,
    };
    let mut codes = vec![0u8; d.rows * d.cols];
    let mut scales = vec![1f32; d.rows];
    if d.cols > 0 {
        codes
            .par_chunks_mut(d.cols)
            .zip(scales.par_iter_mut())
            .zip(v.par_chunks_mut(d.cols))
            .for_each(|((c, s), row)| {
                if let Some(col) = &col {
                    row.iter_mut().zip(col).for_each(|(x, k)| *x *= k);
                }
                let (scale, inv) = scale_of(amax(row.iter().copied()), f);
                *s = scale;
                for (c, &x) in c.iter_mut().zip(row.iter()) {
                    *c = encode(x * inv, f);
                }
            });
    }
    Ok((CpuStorage::U32(pack(&codes)), CpuStorage::F32(scales)))
}

pub(super) fn gemm_fp8(
    o: GemmFp8<'_, CpuStorage>,
    a: CodeDims,
    b: CodeDims,
    fa: Fp8Format,
    out: DType,
) -> Result<CpuStorage> {
    const OP: &str = "fp8_gemm";
    let lsb = o.sb.map(|c| c.l);
    check_gemm(OP, (a, o.a.l, o.sa.l), (b, o.b.l, lsb), out)?;
    let sa = f32_vec(OP, o.sa.s, o.sa.l)?;
    let sb = o.sb.map(|c| f32_vec(OP, c.s, c.l)).transpose()?;
    let (ta, tb) = (table(fa), table(Fp8Format::E4M3));
    let av: Vec<f32> = unpack(OP, o.a.s, o.a.l)?
        .iter()
        .map(|&c| ta[c as usize])
        .collect();
    let bv: Vec<f32> = unpack(OP, o.b.s, o.b.l)?
        .iter()
        .map(|&c| tb[c as usize])
        .collect();
    let (m, n, k) = (a.rows, b.rows, a.cols);
    // a [1, m, k] · bᵀ: b's [n, k] read as a [1, k, n] view.
    let al = Layout::contiguous([1, m, k]);
    let bl = Layout::new([1, k, n].into(), vec![n * k, 1, k], 0);
    let mut acc = matmul_t(&av, &al, &bv, &bl)?;
    acc.par_chunks_mut(n.max(1))
        .zip(sa.par_iter())
        .for_each(|(row, &s)| {
            for (j, y) in row.iter_mut().enumerate() {
                *y *= s;
                if let Some(c) = &sb {
                    *y *= c[j];
                }
            }
        });
    Ok(store(acc, out))
}

pub(super) fn transpose_codes(
    o: TransposeCodes<'_, CpuStorage>,
    d: CodeDims,
) -> Result<CpuStorage> {
    const OP: &str = "fp8_transpose_codes";
    check_transpose(OP, o.codes.l, d)?;
    let c = unpack(OP, o.codes.s, o.codes.l)?;
    let mut t = vec![0u8; c.len()];
    t.par_chunks_mut(d.rows.max(1))
        .enumerate()
        .for_each(|(j, row)| {
            for (i, x) in row.iter_mut().enumerate() {
                *x = c[i * d.cols + j];
            }
        });
    Ok(CpuStorage::U32(pack(&t)))
}
