//! The FP8 unit's backend primitives: their named operands and their dispatch to the CPU
//! reference (`cpu.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! FP8 codes travel in u32 storages, four codes a word, little-endian: code `c` of a row-major
//! `[R, C]` code matrix is byte `c % 4` of word `(r·C + c) / 4`, so a device pointer to the words
//! is a pointer to the bytes in row-major order, which is what cuBLASLt reads. Every code matrix
//! therefore has `C % 4 == 0` and is stored as a contiguous u32 `[R, C/4]`. Scales are f32.
//!
//! The maths of each primitive, with `dec_f` the decoding of format `f` ([`super::codec`]) and
//! `FMAX_f` its largest finite value (448 for e4m3, 57344 for e5m2):
//! - [`quantize_rows`]: one scale per row of `v = x ⊙ col` (`col` `[C]` scaling each column,
//!   when given): `amax_r = max_c |v[r, c]|`, `scale_r = amax_r / FMAX` (1 for an all-zero row;
//!   NaN for a row holding a NaN, so that the NaN reaches the product) and `codes[r, c] =
//!   enc(v[r, c] · (FMAX / amax_r))` (round to nearest even, saturating to ±FMAX; NaN stays
//!   NaN);
//! - [`gemm_fp8`]: `out[m, n] = (sa[m] · Σ_k dec_fa(a[m, k]) · dec_e4m3(b[n, k])) · sb[n]`, the
//!   sum in f32, `sb` taken as 1 when absent, rounded once to the output dtype;
//! - [`transpose_codes`]: `[R, C]` codes to `[C, R]` codes (R and C multiples of 4).

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use crate::fused::{on_backend, operands};
use crate::{DType, Error, Layout, Result, Storage};

/// The two FP8 formats of the OCP 8-bit floating-point specification (NVIDIA's `e4m3fn` and
/// `e5m2`): e4m3 (no infinities, NaN `S.1111.111`, largest 448) for weights and activations, e5m2
/// (infinities, largest 57344) for gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    E4M3,
    E5M2,
}

impl Fp8Format {
    /// The largest finite value.
    pub fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }
}

impl std::fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The dims of a code matrix `[rows, cols]` (cols counted in codes, a multiple of 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeDims {
    pub rows: usize,
    pub cols: usize,
}

operands! {
    /// `(codes [R, C/4] u32, scales [R] f32)`: `w ⊙ col` `[R, C]` quantised row by row (module
    /// doc).
    pub struct QuantizeRows {
        w: Operand,      // [R, C] float
        col: OptOperand, // [C] f32
    }
}

operands! {
    /// `out [M, N]`: `(sa[m] · Σ_k dec(a[m, k]) dec(b[n, k])) · sb[n]` (module doc).
    pub struct GemmFp8 {
        a: Operand,     // codes [M, K/4] u32, format `fa`
        sa: Operand,    // [M] f32
        b: Operand,     // codes [N, K/4] u32, e4m3
        sb: OptOperand, // [N] f32
    }
}

operands! {
    /// The transposed codes `[C, R/4]` u32 of `codes` `[R, C/4]`.
    pub struct TransposeCodes {
        codes: Operand, // [R, C/4] u32
    }
}

pub fn quantize_rows(o: QuantizeRows<'_, Storage>, f: Fp8Format) -> Result<(Storage, Storage)> {
    const OP: &str = "fp8_quantize_rows";
    on_backend!(OP, o, o => cpu::quantize_rows(o, f), cuda::quantize_rows(o, f))
}

/// `a` is `[m, k]` codes of format `fa`, `b` `[n, k]` e4m3 codes; the result is `[m, n]` of
/// dtype `out` (a float dtype).
pub fn gemm_fp8(
    o: GemmFp8<'_, Storage>,
    a: CodeDims,
    b: CodeDims,
    fa: Fp8Format,
    out: DType,
) -> Result<Storage> {
    const OP: &str = "fp8_gemm";
    on_backend!(OP, o, o => cpu::gemm_fp8(o, a, b, fa, out), cuda::gemm_fp8(o, a, b, fa, out))
}

pub fn transpose_codes(o: TransposeCodes<'_, Storage>, d: CodeDims) -> Result<Storage> {
    const OP: &str = "fp8_transpose_codes";
    on_backend!(OP, o, o => cpu::transpose_codes(o, d), cuda::transpose_codes(o, d))
}

// ----- checks shared by the backends ---------------------------------------------------------

/// Errors unless `l` is a contiguous view of exactly the words of a `d` code matrix.
fn check_codes(op: &'static str, what: &str, l: &Layout, d: CodeDims) -> Result<()> {
    if d.cols % 4 != 0 {
        return Err(Error::invalid(
            op,
            format!("{what}: {} codes a row is not a multiple of 4", d.cols),
        ));
    }
    if !l.is_contiguous() || l.dims() != [d.rows, d.cols / 4] {
        return Err(Error::invalid(
            op,
            format!(
                "{what}: expected contiguous u32 words [{}, {}], found {}",
                d.rows,
                d.cols / 4,
                l.shape()
            ),
        ));
    }
    Ok(())
}

/// Errors unless `l` is the words of a `d` code matrix that can be transposed (`d.rows` a
/// multiple of 4 too, the transposed matrix's codes a row).
pub(super) fn check_transpose(op: &'static str, l: &Layout, d: CodeDims) -> Result<()> {
    check_codes(op, "codes", l, d)?;
    if d.rows % 4 != 0 {
        return Err(Error::invalid(
            op,
            format!("{} rows: the transposed codes need a multiple of 4", d.rows),
        ));
    }
    Ok(())
}

/// Errors unless `l` is a `[n]` view (a vector of per-row or per-column f32 scales).
pub(super) fn check_vec(op: &'static str, what: &str, l: &Layout, n: usize) -> Result<()> {
    if l.dims() != [n] {
        return Err(Error::invalid(
            op,
            format!("{what}: expected [{n}], found {}", l.shape()),
        ));
    }
    Ok(())
}

/// `[rows, cols]` of a float matrix to quantise, refusing `cols % 4 != 0`.
pub(super) fn quant_dims(op: &'static str, l: &Layout) -> Result<CodeDims> {
    let (rows, cols) = crate::backend::checks::dims2(op, l)?;
    if cols % 4 != 0 {
        return Err(Error::invalid(
            op,
            format!("{} columns: FP8 codes need a multiple of 4", l.shape()),
        ));
    }
    Ok(CodeDims { rows, cols })
}

/// Errors unless `a` `[m, k]` and `b` `[n, k]` share `k`, the views of their words (`la`, `lb`)
/// and scales (`lsa` `[m]`, `lsb` `[n]` when given) fit them, and `out` is a float dtype.
pub(super) fn check_gemm(
    op: &'static str,
    (a, la, lsa): (CodeDims, &Layout, &Layout),
    (b, lb, lsb): (CodeDims, &Layout, Option<&Layout>),
    out: DType,
) -> Result<()> {
    check_codes(op, "a", la, a)?;
    check_codes(op, "b", lb, b)?;
    check_vec(op, "row scales of a", lsa, a.rows)?;
    if let Some(l) = lsb {
        check_vec(op, "row scales of b", l, b.rows)?;
    }
    if !out.is_float() {
        return Err(Error::UnsupportedDType { op, dtype: out });
    }
    if a.cols != b.cols {
        return Err(Error::invalid(
            op,
            format!(
                "inner dims differ: a [{}, {}], b [{}, {}]",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    Ok(())
}
