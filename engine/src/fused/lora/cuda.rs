//! The LoRA unit's primitives on the GPU: cuBLAS products and the
//! engine's vectorised elementwise kernels over transient buffers. `x`, `y` and `g` are any
//! rank-2 views; the adapter dtype must be the accumulation type of the base dtype (f32 for
//! f32/bf16, f64 for f64). Any rank works.
//!
//! Bytes moved per primitive at M rows (`s` the base element size, adapter f32): codes
//! `M·in·(s + 4 + 4 + 4 + 4 + 4)` (cast, mask, product, GEMM read) — the mask terms only with
//! dropout; expand-add `M·out·(4 + 12)` for an f32 base, `M·out·(4 + 6 + 12 + 6)` for bf16 (GEMM
//! write; cast of y, f32 add, cast back: rounded once); grad_codes
//! `M·out·(s + 4 + 4 + 4)` (cast, two GEMM reads); grad_a as codes; grad_x
//! `M·in·(4 + 4 + 4 + 4 + 4 + s)` with dropout. All of it is transient: the tape keeps `z`.
//!
//! A bf16 base with r = 8 or 16 and unit-stride rows (the usual training case) takes the custom
//! kernels of `cuda_rank` instead: every primitive reads its `[M, in]` or `[M, out]` operand once
//! in bf16 (and expand-add writes its result once), with the dropout mask drawn on the fly.

use super::cuda_mma;
use super::cuda_rank::{self, Small};
use super::primitives::{
    expect_dims, keep_of, Codes, ExpandAdd, GradA, GradCodes, GradX, GradXAdd,
};
use crate::backend::checks::dims2;
use crate::backend::cuda::dropout::dropout_cast;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{check_extent, CudaStorage};
use crate::backend::{BackendStorage, BinaryOp, UnaryOp};
use crate::{DType, Error, Layout, Result, Shape};

/// Checks a base-dtype operand against the adapter operand `ad`; returns its rank-2
/// `(s0, s1, offset)` as u32.
fn base_view(
    op: &'static str,
    t: &CudaStorage,
    l: &Layout,
    ad: &CudaStorage,
) -> Result<(u32, u32, u32)> {
    if !t.dtype.is_float() {
        return Err(Error::UnsupportedDType { op, dtype: t.dtype });
    }
    if ad.dtype != t.dtype.accumulation() {
        return Err(Error::DTypeMismatch {
            op,
            lhs: t.dtype.accumulation(),
            rhs: ad.dtype,
        });
    }
    t.same_device(op, ad)?;
    dims2(op, l)?;
    check_extent(op, l, t.len)?;
    to_u32(op, l.max_extent())?;
    Ok((
        to_u32(op, l.strides()[0])?,
        to_u32(op, l.strides()[1])?,
        to_u32(op, l.offset())?,
    ))
}

/// Errors unless `o` has the adapter dtype `ad` and lives on the same GPU.
fn same_adapter(op: &'static str, ad: DType, o: &CudaStorage, base: &CudaStorage) -> Result<()> {
    if o.dtype != ad {
        return Err(Error::DTypeMismatch {
            op,
            lhs: ad,
            rhs: o.dtype,
        });
    }
    base.same_device(op, o)
}

// The primitives below run on cuBLAS and the engine's vectorised elementwise kernels: every
// intermediate (`drop(x)` in the adapter dtype, the f32 `[M, out]` product, the cast gradient) is
// a transient buffer freed before the primitive returns, so the op still keeps only `z` on the
// tape. The dropout mask is regenerated from `(seed, index)` over the row-major `[M, in]` view
// (`rng::dropped`, as in the CPU reference) inside `dropout_cast`, which casts, masks and scales
// in one pass: one hash per four elements, where the separate mask kernel used to spend a hash
// per element and two more passes over memory.

/// `[1, rows, cols]` view of a contiguous `[rows, cols]` buffer, or of its transpose when `t`.
fn mat3(rows: usize, cols: usize, t: bool) -> Layout {
    if t {
        Layout::new(Shape::from([1, cols, rows]), vec![rows * cols, 1, cols], 0)
    } else {
        Layout::contiguous([1, rows, cols])
    }
}

/// The rank-2 view `l` as the rank-3 `[1, d0, d1]` operand of a matmul (`t`: its transpose
/// `[1, d1, d0]`), the same elements in place: the matmul reads any strides cuBLAS can describe
/// and copies only the others, so a contiguous operand (the usual case: A, B, the codes) goes
/// to cuBLAS exactly as a contiguous copy of it would, without the copy kernel.
fn view3(l: &Layout, t: bool) -> Layout {
    let (d, s) = (l.dims(), l.strides());
    let (d0, d1, s0, s1) = match t {
        false => (d[0], d[1], s[0], s[1]),
        true => (d[1], d[0], s[1], s[0]),
    };
    Layout::new(Shape::from([1, d0, d1]), vec![d0 * d1, s0, s1], l.offset())
}

/// `drop(x)` in the adapter dtype `ad`, contiguous `[m, n]`.
fn dropped(x: &CudaStorage, l: &Layout, ad: DType, p: f64, seed: u64) -> Result<CudaStorage> {
    if p == 0.0 {
        return x.to_dtype(l, ad); // [m, n] contiguous
    }
    dropout_cast(x, l, ad, p, seed)
}

/// `s · t` for the view `l` of `t`, contiguous.
fn times(t: &CudaStorage, l: &Layout, s: f64) -> Result<CudaStorage> {
    t.unary(l, UnaryOp::Affine { mul: s, add: 0.0 })
}

/// `s · t` for a small contiguous tensor (`s == 1`: unchanged).
fn scaled(t: CudaStorage, shape: &[usize], s: f64) -> Result<CudaStorage> {
    if s == 1.0 {
        return Ok(t);
    }
    times(&t, &Layout::contiguous(shape.to_vec()), s)
}

pub(super) fn codes(o: Codes<'_, CudaStorage>, p: f64, seed: u64) -> Result<CudaStorage> {
    const OP: &str = "lora_codes";
    let (x, l, a, al) = (o.x.s, o.x.l, o.a.s, o.a.l);
    base_view(OP, x, l, a)?;
    let (m, n) = dims2(OP, l)?;
    let (r, _) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    keep_of(OP, p)?;
    if cuda_rank::applies(x, l, a.dtype, r) {
        // bf16 base, r = 8 or 16: the custom kernel, A read in place.
        let mut hold = None;
        let sa = Small::of_or_copy(a, al, false, &mut hold)?;
        if let Some(z) = cuda_rank::codes(x, l, sa, r, p, seed)? {
            return Ok(z);
        }
    }
    let xd = dropped(x, l, a.dtype, p, seed)?; // [m, in]
                                               // z = drop(x) Aᵀ: [1, m, in] x [1, in, r].
    xd.matmul(&mat3(m, n, false), a, &view3(al, true))
}

pub(super) fn expand_add(o: ExpandAdd<'_, CudaStorage>, scale: f64) -> Result<CudaStorage> {
    const OP: &str = "lora_expand_add";
    let (y, l, z, zl, b, bl) = (o.y.s, o.y.l, o.z.s, o.z.l, o.b.s, o.b.l);
    base_view(OP, y, l, b)?;
    same_adapter(OP, b.dtype, z, y)?;
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    if cuda_rank::applies(y, l, b.dtype, r) {
        // bf16 base, r = 8 or 16: one pass over y on the custom kernel, B read in place as Bᵀ.
        let (mut hold_z, mut hold_b) = (None, None);
        let zs = if scale == 1.0 {
            Small::of_or_copy(z, zl, true, &mut hold_z)?
        } else {
            Small::held(times(z, zl, scale)?, &mut hold_z) // s·z [m, r]
        };
        let bt = Small::of_or_copy(b, &bl.transpose(0, 1), false, &mut hold_b)?; // Bᵀ [r, o]
        if let Some(out) = cuda_rank::expand_add(y, l, zs, bt, r)? {
            return Ok(out);
        }
    }
    // s·z [m, r]: z in place when s = 1, else scaled into a contiguous buffer.
    let mut hold = None;
    let (zs, zsl) = if scale == 1.0 {
        (z, view3(zl, false))
    } else {
        (&*hold.insert(times(z, zl, scale)?), mat3(m, r, false))
    };
    let d = zs.matmul(&zsl, b, &view3(bl, true))?; // [m, o] adapter dtype
    let cl = Layout::contiguous([m, o]);
    if y.dtype == d.dtype {
        return y.binary(l, &d, &cl, BinaryOp::Add);
    }
    // A bf16 base: add in f32 and round once, as the CPU and the custom kernel do (rounding
    // `s z Bᵀ` to bf16 before the add would round twice).
    let sum = y
        .to_dtype(l, d.dtype)?
        .binary(&cl, &d, &cl, BinaryOp::Add)?; // [m, o] f32
    sum.to_dtype(&cl, y.dtype)
}

pub(super) fn grad_codes(
    o: GradCodes<'_, CudaStorage>,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "lora_grad_codes";
    let (g, l, z, zl, b, bl) = (o.g.s, o.g.l, o.z.s, o.z.l, o.b.s, o.b.l);
    base_view(OP, g, l, b)?;
    same_adapter(OP, b.dtype, z, g)?;
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    if cuda_rank::applies(g, l, b.dtype, r) {
        // bf16 base, r = 8 or 16: g is read in bf16 by the custom kernels, B and z in place.
        let (mut hold_b, mut hold_z) = (None, None);
        let bt = Small::of_or_copy(b, &bl.transpose(0, 1), false, &mut hold_b)?; // Bᵀ [r, o]
        let zc = Small::of_or_copy(z, zl, true, &mut hold_z)?; // [m, r]
        if let Some(grads) = cuda_rank::grad_codes(g, l, bt, zc, r, scale)? {
            return Ok(grads);
        }
    }
    let gf = g.to_dtype(l, b.dtype)?; // [m, o] adapter dtype, transient
                                      // dz = s · g B: [1, m, o] x [1, o, r]; dB = s · gᵀ z: [1, o, m] x [1, m, r].
    let dz = gf.matmul(&mat3(m, o, false), b, &view3(bl, false))?;
    let db = gf.matmul(&mat3(m, o, true), z, &view3(zl, false))?;
    Ok((scaled(dz, &[m, r], scale)?, scaled(db, &[o, r], scale)?))
}

pub(super) fn grad_a(o: GradA<'_, CudaStorage>, p: f64, seed: u64) -> Result<CudaStorage> {
    const OP: &str = "lora_grad_a";
    let (x, l, dz, dl) = (o.x.s, o.x.l, o.dz.s, o.dz.l);
    base_view(OP, x, l, dz)?;
    let (m, n) = dims2(OP, l)?;
    let (_, r) = dims2(OP, dl)?;
    expect_dims(OP, dl, (m, r), l)?;
    keep_of(OP, p)?;
    if cuda_rank::applies(x, l, dz.dtype, r) {
        // bf16 base, r = 8 or 16: the custom kernel, dz read in place.
        let mut hold = None;
        let d = Small::of_or_copy(dz, dl, true, &mut hold)?;
        if let Some(da) = cuda_rank::grad_a(x, l, d, r, p, seed)? {
            return Ok(da);
        }
    }
    let xd = dropped(x, l, dz.dtype, p, seed)?; // [m, in], transient
                                                // dA = dzᵀ drop(x): [1, r, m] x [1, m, in].
    dz.matmul(&view3(dl, true), &xd, &mat3(m, n, false))
}

pub(super) fn grad_x(
    o: GradX<'_, CudaStorage>,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<CudaStorage> {
    const OP: &str = "lora_grad_x";
    let (dz, l, a, al) = (o.dz.s, o.dz.l, o.a.s, o.a.l);
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType { op: OP, dtype });
    }
    if a.dtype != dtype.accumulation() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: dtype.accumulation(),
            rhs: a.dtype,
        });
    }
    same_adapter(OP, a.dtype, dz, a)?;
    let (m, r) = dims2(OP, l)?;
    let (_, n) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    keep_of(OP, p)?;
    if dtype == DType::BF16 && a.dtype == DType::F32 && (r == 8 || r == 16) && n % 4 == 0 {
        // bf16 output, r = 8 or 16: the custom kernel, dz and A read in place.
        let (mut hold_d, mut hold_a) = (None, None);
        let d = Small::of_or_copy(dz, l, true, &mut hold_d)?;
        let sa = Small::of_or_copy(a, al, false, &mut hold_a)?;
        if let Some(dx) = cuda_rank::grad_x(&dz.dev, d, sa, (m, r, n), p, seed, dtype)? {
            return Ok(dx);
        }
    }
    // dz A: [1, m, r] x [1, r, in], then the mask, then the base dtype.
    let t = dz.matmul(&view3(l, false), a, &view3(al, false))?; // [m, in]
    let cl = Layout::contiguous([m, n]);
    if p != 0.0 {
        dropout_cast(&t, &cl, dtype, p, seed) // the mask and the cast in one pass
    } else if t.dtype == dtype {
        Ok(t)
    } else {
        t.to_dtype(&cl, dtype)
    }
}

/// `base + mask ⊙ (dz A)` in base's dtype: one pass on the tensor-core kernel for a bf16 base
/// view whose rows are 16-byte runs, r = 8 or 16 (the sum rounded once); otherwise
/// [`grad_x`] and an add.
pub(super) fn grad_x_add(o: GradXAdd<'_, CudaStorage>, p: f64, seed: u64) -> Result<CudaStorage> {
    const OP: &str = "lora_grad_x_add";
    let (dz, l, a, al, base, bl) = (o.dz.s, o.dz.l, o.a.s, o.a.l, o.base.s, o.base.l);
    base_view(OP, base, bl, a)?;
    same_adapter(OP, a.dtype, dz, a)?;
    let (m, r) = dims2(OP, l)?;
    let (_, n) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    expect_dims(OP, bl, (m, n), l)?;
    keep_of(OP, p)?;
    if cuda_rank::applies(base, bl, a.dtype, r) && cuda_mma::applies(bl) {
        let (mut hold_d, mut hold_a) = (None, None);
        let d = Small::of_or_copy(dz, l, true, &mut hold_d)?;
        let sa = Small::of_or_copy(a, al, false, &mut hold_a)?;
        return cuda_mma::expand(&dz.dev, OP, d, sa, Some((base, bl)), (m, r, n), p, seed);
    }
    let dx = grad_x(GradX { dz: o.dz, a: o.a }, p, seed, base.dtype)?; // [m, n] contiguous
    base.binary(bl, &dx, &Layout::contiguous([m, n]), BinaryOp::Add)
}
