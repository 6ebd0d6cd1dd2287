//! Fused LoRA launchers (kernels/src/lora.cu). `x`, `y` and `g` are read in place through their
//! rank-2 strides; the adapter operands (`a`, `b`, `z`, `dz`: small) are made contiguous. The
//! adapter dtype must be the accumulation type of the base dtype (f32 for f32/bf16, f64 for f64).
//!
//! Bytes moved at M = 4096, in = out = 4096, r = 16, bf16 base (f32 adapter), the [M, in]/[M, out]
//! passes dominate (the A/B/z terms are ≤ 0.3 MB each from DRAM):
//! codes `x` 33.5 MB read; expand-add `y` read + written 67 MB; grad_codes `g` read twice (dz,
//! then dB's column sums) 67 MB + 2 · 16 parts · out · r · 4 B = 8.4 MB; grad_a `x` 33.5 MB + 8.4 MB
//! of parts; grad_x `dx` 33.5 MB written. At in = out = 11008 each pass scales by 2.69.

use cudarc::driver::LaunchConfig;
use kernels::LORA;

use super::launch::launch;
use super::layout::to_u32;
use super::{check_extent, CudaDevice, CudaStorage};
use crate::backend::cpu::lora::{dims2, expect_dims, keep_of};
use crate::backend::BackendDevice;
use crate::{DType, Error, Layout, Result, Shape};

const THREADS: u32 = 256;
/// Rows per block of `lora_codes` (`LORA_CR`), of `lora_expand` (`LORA_ER`), the staging step
/// of `lora_colsum` (`LORA_SR`) and the largest rank (`LORA_RMAX`).
const CODES_ROWS: usize = 16;
const EXPAND_ROWS: usize = 32;
const SUM_ROWS: usize = 32;
const RMAX: usize = 64;
/// At most this many partial sums per column in the backward's reductions.
const MAX_PARTS: usize = 32;

/// The adapter dtype of base dtype `d`.
fn acc_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `ceil(p · 2^53)`: `uniform(seed, i) < p` exactly when `hash(seed, i) >> 11 < thr`.
fn thr_of(p: f64) -> u64 {
    if p > 0.0 {
        (p * 9007199254740992.0).ceil() as u64
    } else {
        0
    }
}

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
    if ad.dtype != acc_dtype(t.dtype) {
        return Err(Error::DTypeMismatch {
            op,
            lhs: acc_dtype(t.dtype),
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

fn check_rank(op: &'static str, r: usize) -> Result<()> {
    if r > RMAX {
        return Err(Error::invalid(
            op,
            format!("rank {r} exceeds the CUDA kernels' maximum of {RMAX}"),
        ));
    }
    Ok(())
}

fn zeros(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<CudaStorage> {
    dev.full(&shape.into(), dtype, 0.0)
}

fn cfg(grid: (usize, usize)) -> Result<LaunchConfig> {
    if grid.1 > 65535 {
        return Err(Error::invalid("lora", "too many rows for the CUDA kernels"));
    }
    Ok(LaunchConfig {
        grid_dim: (to_u32("lora", grid.0.max(1))?, grid.1.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `out[m][k] = scale · Σ_c drop(x)[m][c] · w[k·wk + c·wi]` `[m, r]` (`lora_codes`).
#[allow(clippy::too_many_arguments)]
fn rows_times(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    w: u64,
    (r, wk, wi): (usize, usize, usize),
    ad: DType,
    (p, seed, scale): (f64, u64, f64),
) -> Result<CudaStorage> {
    let (m, n) = dims2(op, l)?;
    let (s0, s1, off) = {
        let s = l.strides();
        (
            to_u32(op, s[0])?,
            to_u32(op, s[1])?,
            to_u32(op, l.offset())?,
        )
    };
    if m == 0 || n == 0 || r == 0 {
        return zeros(&x.dev, [m, r], ad);
    }
    let out = CudaStorage::alloc(&x.dev, op, m * r, ad)?;
    let keep = keep_of(op, p)?.unwrap_or(1.0);
    let thr = thr_of(p);
    let (m32, n32, r32) = (to_u32(op, m)?, to_u32(op, n)?, to_u32(op, r)?);
    let (wk32, wi32) = (to_u32(op, wk)?, to_u32(op, wi)?);
    let (xp, op_) = (x.ptr(), out.ptr());
    let name = format!("lora_codes_{}", x.dtype);
    let cfg = cfg((m.div_ceil(CODES_ROWS), 1))?;
    // SAFETY: the x view lies inside `x` (checked by the caller) and is indexed through its
    // strides; `w` holds r × n adapter elements at `k·wk + c·wi` (a contiguous A [r, n] or B
    // [n, r]); the output holds m × r elements, element (row, k) written once by lane 0 of the
    // warp that owns the row.
    unsafe {
        launch!(
            &x.dev,
            op,
            LORA,
            name,
            cfg,
            [m32, n32, r32, s0, s1, off, xp, wk32, wi32, w, seed, thr, keep, scale, op_]
        )
    }?;
    Ok(out)
}

/// `out[m][o] = T(y[m][o] + mask · Σ_k (z[m][k] · scale) · w[o·wo + k·wk])` (`lora_expand`).
#[allow(clippy::too_many_arguments)]
fn expand(
    op: &'static str,
    dev: &CudaDevice,
    out_dtype: DType,
    y: Option<(&CudaStorage, (u32, u32, u32))>,
    z: u64,
    (m, n, r): (usize, usize, usize),
    (w, wo, wk): (u64, usize, usize),
    (p, seed, scale): (f64, u64, f64),
) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, op, m * n, out_dtype)?;
    if m * n == 0 {
        return Ok(out);
    }
    let keep = keep_of(op, p)?.unwrap_or(1.0);
    let thr = thr_of(p);
    let (m32, n32, r32) = (to_u32(op, m)?, to_u32(op, n)?, to_u32(op, r)?);
    let (wo32, wk32) = (to_u32(op, wo)?, to_u32(op, wk)?);
    let (yp, (s0, s1, off)) = match y {
        Some((y, v)) => (y.ptr(), v),
        None => (0u64, (0, 0, 0)),
    };
    let op_ = out.ptr();
    let name = format!("lora_expand_{out_dtype}");
    let cfg = cfg((n.div_ceil(THREADS as usize), m.div_ceil(EXPAND_ROWS)))?;
    // SAFETY: y (when given, else null and never read) is a checked view of [m, n] read through
    // its strides; z is a contiguous [m, r] and w holds n × r adapter elements at `o·wo + k·wk`;
    // r ≤ 64 (the kernels' shared/register arrays); each output element (row, o) is written once.
    unsafe {
        launch!(
            dev,
            op,
            LORA,
            name,
            cfg,
            [m32, n32, r32, s0, s1, off, yp, z, wo32, wk32, w, scale, seed, thr, keep, op_]
        )
    }?;
    Ok(out)
}

/// `out[k·ok + c·on] = scale · Σ_m z[m][k] · drop(x)[m][c]` over all rows (`lora_colsum` into
/// per-row-range parts, then `lora_reduce`): the `[r, n]`/`[n, r]` reduction over M, in a fixed
/// order.
#[allow(clippy::too_many_arguments)]
fn col_sums(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    z: u64,
    (r, ok, on): (usize, usize, usize),
    ad: DType,
    (p, seed, scale): (f64, u64, f64),
) -> Result<CudaStorage> {
    let (m, n) = dims2(op, l)?;
    if m == 0 || n == 0 || r == 0 {
        return zeros(&x.dev, [r * n], ad);
    }
    let (s0, s1, off) = (
        to_u32(op, l.strides()[0])?,
        to_u32(op, l.strides()[1])?,
        to_u32(op, l.offset())?,
    );
    let rows_per_part = m.div_ceil(MAX_PARTS).max(256).next_multiple_of(SUM_ROWS);
    let parts = m.div_ceil(rows_per_part);
    let len = r * n;
    let part = CudaStorage::alloc(&x.dev, op, parts * len, ad)?;
    let out = CudaStorage::alloc(&x.dev, op, len, ad)?;
    let keep = keep_of(op, p)?.unwrap_or(1.0);
    let thr = thr_of(p);
    let (m32, n32, r32, rpp) = (
        to_u32(op, m)?,
        to_u32(op, n)?,
        to_u32(op, r)?,
        to_u32(op, rows_per_part)?,
    );
    let (ok32, on32) = (to_u32(op, ok)?, to_u32(op, on)?);
    let (xp, pp) = (x.ptr(), part.ptr());
    let name = format!("lora_colsum_{}", x.dtype);
    let c = cfg((n.div_ceil(THREADS as usize), parts))?;
    // SAFETY: the x view [m, n] lies inside `x` (checked by the caller); z is a contiguous [m, r];
    // `part` holds parts × r × n elements and block (bx, p) writes only its columns of part p at
    // `k·ok + c·on`, a permutation of 0..r·n; r ≤ 64.
    unsafe {
        launch!(
            &x.dev,
            op,
            LORA,
            name,
            c,
            [m32, n32, r32, rpp, s0, s1, off, xp, z, seed, thr, keep, ok32, on32, pp]
        )
    }?;
    let (parts32, len32, op_) = (to_u32(op, parts)?, to_u32(op, len)?, out.ptr());
    let rname = format!("lora_reduce_{ad}");
    let rc = LaunchConfig {
        grid_dim: (to_u32(op, len.div_ceil(THREADS as usize).min(4096))?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `part` holds parts × len elements written above (same stream), `out` len elements;
    // a grid-stride loop writes each output once.
    unsafe {
        launch!(
            &x.dev,
            op,
            LORA,
            rname,
            rc,
            [parts32, len32, pp, scale, op_]
        )
    }?;
    Ok(out)
}

pub(crate) fn lora_codes(
    x: &CudaStorage,
    l: &Layout,
    a: &CudaStorage,
    al: &Layout,
    p: f64,
    seed: u64,
) -> Result<CudaStorage> {
    const OP: &str = "lora_codes";
    base_view(OP, x, l, a)?;
    let (_, n) = dims2(OP, l)?;
    let (r, _) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    check_rank(OP, r)?;
    let ac = a.contiguous(OP, al)?; // [r, in]
    rows_times(OP, x, l, ac.ptr, (r, n, 1), a.dtype, (p, seed, 1.0))
}

pub(crate) fn lora_expand_add(
    y: &CudaStorage,
    l: &Layout,
    z: &CudaStorage,
    zl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    const OP: &str = "lora_expand_add";
    let yv = base_view(OP, y, l, b)?;
    same_adapter(OP, b.dtype, z, y)?;
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    check_rank(OP, r)?;
    let (zc, bc) = (z.contiguous(OP, zl)?, b.contiguous(OP, bl)?);
    expand(
        OP,
        &y.dev,
        y.dtype,
        Some((y, yv)),
        zc.ptr,
        (m, o, r),
        (bc.ptr, r, 1),
        (0.0, 0, scale),
    )
}

pub(crate) fn lora_grad_codes(
    g: &CudaStorage,
    l: &Layout,
    z: &CudaStorage,
    zl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    scale: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "lora_grad_codes";
    base_view(OP, g, l, b)?;
    same_adapter(OP, b.dtype, z, g)?;
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    check_rank(OP, r)?;
    let (zc, bc) = (z.contiguous(OP, zl)?, b.contiguous(OP, bl)?);
    // dz[m][k] = s · Σ_o g[m][o] · B[o][k]: W(k, o) = B[o·r + k].
    let dz = rows_times(OP, g, l, bc.ptr, (r, 1, r), b.dtype, (0.0, 0, scale))?;
    // dB[o][k] = s · Σ_m z[m][k] · g[m][o], stored at o·r + k.
    let db = col_sums(OP, g, l, zc.ptr, (r, 1, r), b.dtype, (0.0, 0, scale))?;
    Ok((dz, db))
}

pub(crate) fn lora_grad_a(
    x: &CudaStorage,
    l: &Layout,
    dz: &CudaStorage,
    dl: &Layout,
    p: f64,
    seed: u64,
) -> Result<CudaStorage> {
    const OP: &str = "lora_grad_a";
    base_view(OP, x, l, dz)?;
    let (m, n) = dims2(OP, l)?;
    let (_, r) = dims2(OP, dl)?;
    expect_dims(OP, dl, (m, r), l)?;
    check_rank(OP, r)?;
    let dzc = dz.contiguous(OP, dl)?;
    // dA[k][c] = Σ_m dz[m][k] · drop(x)[m][c], stored at k·in + c.
    col_sums(OP, x, l, dzc.ptr, (r, n, 1), dz.dtype, (p, seed, 1.0))
}

pub(crate) fn lora_grad_x(
    dz: &CudaStorage,
    l: &Layout,
    a: &CudaStorage,
    al: &Layout,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<CudaStorage> {
    const OP: &str = "lora_grad_x";
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType { op: OP, dtype });
    }
    if a.dtype != acc_dtype(dtype) {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: acc_dtype(dtype),
            rhs: a.dtype,
        });
    }
    same_adapter(OP, a.dtype, dz, a)?;
    let (m, r) = dims2(OP, l)?;
    let (_, n) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    check_rank(OP, r)?;
    keep_of(OP, p)?;
    let (dzc, ac) = (dz.contiguous(OP, l)?, a.contiguous(OP, al)?);
    // dx[m][c] = mask · Σ_k dz[m][k] · A[k][c]: W(c, k) = A[k·in + c].
    expand(
        OP,
        &dz.dev,
        dtype,
        None,
        dzc.ptr,
        (m, n, r),
        (ac.ptr, 1, n),
        (p, seed, 1.0),
    )
}
