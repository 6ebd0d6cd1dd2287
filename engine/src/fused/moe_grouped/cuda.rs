//! The grouped-expert unit's launchers (`kernels/src/moe_grouped.cu`): device-side grouping by
//! expert, permute/combine and grouped matmuls. Operands are made contiguous first; nothing is
//! read back to the host, so these never synchronise the stream.

use cudarc::driver::LaunchConfig;
use kernels::MOE_GROUPED;

use super::primitives::{
    Combine, CombineDw, Group, GroupedMatmul, GroupedMatmulDw, InvertPerm, Permute,
};
use crate::backend::checks::{dims2, shape_mismatch};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::{to_u32, to_u32s};
use crate::backend::cuda::{check3, dtype_is, elementwise, float_only, CudaDevice, CudaStorage};
use crate::fused::Operand;
use crate::{DType, Error, Result};

/// Slots per block of the grouping kernels (`GROUP_TILE` in moe_grouped.cu).
const GROUP_TILE: usize = 256;

pub(super) fn group(o: Group<'_, CudaStorage>, e: usize) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "moe_group";
    let (ids, l) = (o.ids.s, o.ids.l);
    dtype_is(OP, ids, DType::U32)?;
    let s = l.elem_count();
    let perm = CudaStorage::alloc(&ids.dev, OP, s, DType::U32)?;
    let e32 = to_u32(OP, e)?;
    if s == 0 {
        let offsets = elementwise::fill(&ids.dev, e + 1, DType::U32, 0.0)?;
        return Ok((perm, offsets));
    }
    let offsets = CudaStorage::alloc(&ids.dev, OP, e + 1, DType::U32)?;
    let nblk = s.div_ceil(GROUP_TILE);
    let len = (e + 1) * nblk;
    let cnt = CudaStorage::alloc(&ids.dev, OP, len, DType::U32)?;
    let ic = ids.contiguous(OP, l)?;
    let (s32, nblk32, len32) = (to_u32(OP, s)?, to_u32(OP, nblk)?, to_u32(OP, len)?);
    let (ip, cp, op, pp) = (ic.ptr, cnt.ptr(), offsets.ptr(), perm.ptr());
    let tiles = LaunchConfig {
        grid_dim: (nblk32, 1, 1),
        block_dim: (GROUP_TILE as u32, 1, 1),
        shared_mem_bytes: to_u32(OP, (e + 1) * 4)?,
    };
    // SAFETY: ids are a contiguous [s] u32; cnt holds (e+1)·nblk counts, one per (bucket, tile)
    // with bucket = min(id, e); the shared memory holds e+1 counters.
    unsafe {
        launch!(
            &ids.dev,
            OP,
            MOE_GROUPED,
            "moe_group_count_u32",
            tiles,
            [s32, e32, ip, cp]
        )
    }?;
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block scans cnt [len] in place and writes offsets [e+1] (b·nblk < len for b ≤ e).
    unsafe {
        launch!(
            &ids.dev,
            OP,
            MOE_GROUPED,
            "moe_group_scan_u32",
            one,
            [len32, nblk32, e32, cp, op]
        )
    }?;
    let scatter = LaunchConfig {
        shared_mem_bytes: to_u32(OP, (GROUP_TILE / 32) * (e + 1) * 4)?,
        ..tiles
    };
    // SAFETY: the scanned cnt gives each (bucket, tile) a disjoint range of perm [s]; every slot
    // is written exactly once at base + its stable rank; shared memory holds 8 × (e+1) counters.
    unsafe {
        launch!(
            &ids.dev,
            OP,
            MOE_GROUPED,
            "moe_group_scatter_u32",
            scatter,
            [s32, e32, ip, cp, pp]
        )
    }?;
    Ok((perm, offsets))
}

pub(super) fn invert_perm(o: InvertPerm<'_, CudaStorage>) -> Result<CudaStorage> {
    const OP: &str = "moe_invert_perm";
    let (perm, l) = (o.perm.s, o.perm.l);
    dtype_is(OP, perm, DType::U32)?;
    let s = l.elem_count();
    let inv = CudaStorage::alloc(&perm.dev, OP, s, DType::U32)?;
    if s == 0 {
        return Ok(inv);
    }
    let pc = perm.contiguous(OP, l)?;
    let s32 = to_u32(OP, s)?;
    let (pp, ip) = (pc.ptr, inv.ptr());
    // SAFETY: perm is a contiguous [s] u32; writes go to inv[perm[q]] only when perm[q] < s.
    unsafe {
        launch!(
            &perm.dev,
            OP,
            MOE_GROUPED,
            "moe_invert_perm_u32",
            CudaDevice::grid(s),
            [s32, pp, ip]
        )
    }?;
    Ok(inv)
}

pub(super) fn permute(o: Permute<'_, CudaStorage>, k: usize) -> Result<CudaStorage> {
    const OP: &str = "moe_permute";
    let (x, l, perm, pl) = (o.x.s, o.x.l, o.perm.s, o.perm.l);
    float_only(OP, x.dtype)?;
    dtype_is(OP, perm, DType::U32)?;
    x.same_device(OP, perm)?;
    let (n, h) = dims2(OP, l)?;
    let m = pl.elem_count();
    if m != n * k {
        return Err(shape_mismatch(OP, l, pl));
    }
    let out = CudaStorage::alloc(&x.dev, OP, m * h, x.dtype)?;
    if m * h == 0 {
        return Ok(out);
    }
    let xc = x.contiguous(OP, l)?;
    let pc = perm.contiguous(OP, pl)?;
    let sc = match o.scale {
        Some(Operand { s, l: sl }) => {
            dtype_is(OP, s, x.dtype.accumulation())?;
            x.same_device(OP, s)?;
            if sl.elem_count() != m {
                return Err(shape_mismatch(OP, pl, sl));
            }
            Some(s.contiguous(OP, sl)?)
        }
        None => None,
    };
    let (m32, h32, k32) = (to_u32(OP, m)?, to_u32(OP, h)?, to_u32(OP, k)?);
    to_u32(OP, m * h)?;
    to_u32(OP, n * h)?;
    let (xp, pp, op) = (xc.ptr, pc.ptr, out.ptr());
    let sp: u64 = sc.as_ref().map_or(0, |c| c.ptr);
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: x is a contiguous [n, h], perm a contiguous [m = n·k] u32 (slots ≥ m give zero
    // rows, so x is read only at rows < n), scale (or null) a contiguous [m] of the
    // accumulation type; the output [m, h] is written whole by a grid-stride loop.
    unsafe {
        launch!(
            &x.dev,
            OP,
            MOE_GROUPED,
            name,
            CudaDevice::grid(m * h),
            [m32, h32, k32, xp, pp, sp, op]
        )
    }?;
    Ok(out)
}

pub(super) fn combine(o: Combine<'_, CudaStorage>) -> Result<CudaStorage> {
    const OP: &str = "moe_combine";
    let (y, l, inv, il, w, wl) = (o.y.s, o.y.l, o.inv.s, o.inv.l, o.w.s, o.w.l);
    check3(OP, y, (inv, DType::U32), (w, y.dtype.accumulation()))?;
    let (m, h) = dims2(OP, l)?;
    let (n, k) = dims2(OP, wl)?;
    if m != n * k || il.elem_count() != m {
        return Err(shape_mismatch(OP, l, wl));
    }
    let out = CudaStorage::alloc(&y.dev, OP, n * h, y.dtype)?;
    if n * h == 0 {
        return Ok(out);
    }
    let (yc, ic, wc) = (
        y.contiguous(OP, l)?,
        inv.contiguous(OP, il)?,
        w.contiguous(OP, wl)?,
    );
    let (n32, h32, k32) = (to_u32(OP, n)?, to_u32(OP, h)?, to_u32(OP, k)?);
    to_u32(OP, m * h)?;
    let (yp, ip, wp, op) = (yc.ptr, ic.ptr, wc.ptr, out.ptr());
    let name = format!("{OP}_{}", y.dtype);
    // SAFETY: y is a contiguous [n·k, h], inv a contiguous [n·k] u32 (rows ≥ n·k are skipped),
    // w a contiguous [n, k] of the accumulation type; the output [n, h] is written whole.
    unsafe {
        launch!(
            &y.dev,
            OP,
            MOE_GROUPED,
            name,
            CudaDevice::grid(n * h),
            [n32, h32, k32, yp, ip, wp, op]
        )
    }?;
    Ok(out)
}

pub(super) fn combine_dw(o: CombineDw<'_, CudaStorage>, k: usize) -> Result<CudaStorage> {
    const OP: &str = "moe_combine_dw";
    let (y, l, inv, il, g, gl) = (o.y.s, o.y.l, o.inv.s, o.inv.l, o.g.s, o.g.l);
    check3(OP, y, (inv, DType::U32), (g, y.dtype))?;
    let (m, h) = dims2(OP, l)?;
    let (n, gh) = dims2(OP, gl)?;
    if m != n * k || gh != h || il.elem_count() != m {
        return Err(shape_mismatch(OP, l, gl));
    }
    let out = CudaStorage::alloc(&y.dev, OP, m, y.dtype.accumulation())?;
    if m == 0 {
        return Ok(out);
    }
    let (yc, ic, gc) = (
        y.contiguous(OP, l)?,
        inv.contiguous(OP, il)?,
        g.contiguous(OP, gl)?,
    );
    let (n32, h32, k32) = (to_u32(OP, n)?, to_u32(OP, h)?, to_u32(OP, k)?);
    to_u32(OP, m * h)?;
    let (yp, ip, gp, op) = (yc.ptr, ic.ptr, gc.ptr, out.ptr());
    let name = format!("{OP}_{}", y.dtype);
    // SAFETY: y [n·k, h], inv [n·k] u32 and g [n, h] are contiguous; one block of 128 threads
    // (a multiple of 32, as block_reduce needs) per slot writes its one output.
    unsafe {
        launch!(
            &y.dev,
            OP,
            MOE_GROUPED,
            name,
            CudaDevice::rows(m, 128),
            [n32, h32, k32, yp, ip, gp, op]
        )
    }?;
    Ok(out)
}

pub(super) fn grouped_matmul(
    o: GroupedMatmul<'_, CudaStorage>,
    trans_w: bool,
) -> Result<CudaStorage> {
    const OP: &str = "grouped_matmul";
    let (x, l, w, wl, off, ol) = (o.x.s, o.x.l, o.w.s, o.w.l, o.offsets.s, o.offsets.l);
    check3(OP, x, (w, x.dtype), (off, DType::U32))?;
    let (m, kk) = dims2(OP, l)?;
    let &[e, p, q] = wl.dims() else {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 3,
            shape: wl.shape().clone(),
        });
    };
    let (nn, wk) = if trans_w { (q, p) } else { (p, q) };
    if wk != kk || ol.dims() != [e + 1] {
        return Err(shape_mismatch(OP, l, wl));
    }
    let out = CudaStorage::alloc(&x.dev, OP, m * nn, x.dtype)?;
    if m * nn == 0 {
        return Ok(out);
    }
    if kk == 0 || e == 0 {
        return elementwise::fill(&x.dev, m * nn, x.dtype, 0.0);
    }
    let (xc, wc, oc) = (
        x.contiguous(OP, l)?,
        w.contiguous(OP, wl)?,
        off.contiguous(OP, ol)?,
    );
    to_u32(OP, m * kk.max(nn))?;
    to_u32(OP, e * p * q)?;
    let [m32, n32, k32, e32] = to_u32s(OP, [m, nn, kk, e])?;
    // W(e, n, κ) = w[e·se + n·sn + κ·sk].
    let se = to_u32(OP, p * q)?;
    // w [E, N, K]: W(e, n, κ) = w[e][n][κ]; trans_w, w [E, K, N]: W(e, n, κ) = w[e][κ][n].
    let (sn, sk) = if trans_w { (1u32, n32) } else { (k32, 1u32) };
    let (xp, wp, op_, yp) = (xc.ptr, wc.ptr, oc.ptr, out.ptr());
    let (kind, bm, bn) = if nn <= 16 {
        ("narrow", 128, 16)
    } else {
        ("wide", 64, 64)
    };
    let cfg = LaunchConfig {
        grid_dim: (to_u32(OP, m.div_ceil(bm))?, to_u32(OP, nn.div_ceil(bn))?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = format!("{OP}_{kind}_{}", x.dtype);
    // SAFETY: x is a contiguous [m, K], w a contiguous [E, P, Q] read at e·se + n·sn + κ·sk
    // with n < N and κ < K (so inside it in either orientation), offsets a contiguous [E+1] u32
    // clamped to m in the kernel; each (row, col) of the [m, N] output is written once (zero
    // outside every segment). The grid covers m × N in tiles of bm × bn, 256 threads per block.
    unsafe {
        launch!(
            &x.dev,
            OP,
            MOE_GROUPED,
            name,
            cfg,
            [m32, n32, k32, e32, xp, wp, se, sn, sk, op_, yp]
        )
    }?;
    Ok(out)
}

pub(super) fn grouped_matmul_dw(
    o: GroupedMatmulDw<'_, CudaStorage>,
    e: usize,
) -> Result<CudaStorage> {
    const OP: &str = "grouped_matmul_dw";
    let (dy, l, x, xl, off, ol) = (o.dy.s, o.dy.l, o.x.s, o.x.l, o.offsets.s, o.offsets.l);
    check3(OP, dy, (x, dy.dtype), (off, DType::U32))?;
    let (m, nn) = dims2(OP, l)?;
    let (xm, kk) = dims2(OP, xl)?;
    if xm != m || ol.dims() != [e + 1] {
        return Err(shape_mismatch(OP, l, xl));
    }
    let len = e * nn * kk;
    if len == 0 {
        return CudaStorage::alloc(&dy.dev, OP, 0, dy.dtype);
    }
    if m == 0 {
        return elementwise::fill(&dy.dev, len, dy.dtype, 0.0);
    }
    let out = CudaStorage::alloc(&dy.dev, OP, len, dy.dtype)?;
    let (gc, xc, oc) = (
        dy.contiguous(OP, l)?,
        x.contiguous(OP, xl)?,
        off.contiguous(OP, ol)?,
    );
    to_u32(OP, len)?;
    to_u32(OP, m * nn.max(kk))?;
    let [m32, n32, k32, e32] = to_u32s(OP, [m, nn, kk, e])?;
    let (kind, bn, bk) = if nn <= 16 {
        ("_n16", 16, 128)
    } else if kk <= 16 {
        ("_k16", 128, 16)
    } else {
        ("", 64, 64)
    };
    let cfg = LaunchConfig {
        grid_dim: (
            to_u32(OP, nn.div_ceil(bn))?,
            to_u32(OP, kk.div_ceil(bk))?,
            e32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (gp, xp, op_, wp) = (gc.ptr, xc.ptr, oc.ptr, out.ptr());
    let name = format!("{OP}{kind}_{}", dy.dtype);
    // SAFETY: dy [m, N] and x [m, K] are contiguous, offsets a contiguous [E+1] u32 clamped to m
    // in the kernel; block (bn-tile, bk-tile, e) writes its tile of dw [E, N, K] once, masked
    // to n < N and κ < K.
    unsafe {
        launch!(
            &dy.dev,
            OP,
            MOE_GROUPED,
            name,
            cfg,
            [m32, n32, k32, e32, gp, xp, op_, wp]
        )
    }?;
    Ok(out)
}
