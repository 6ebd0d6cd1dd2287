//! Launchers of flash attention's kernels (kernels/src/flash_attention.cu): the forward (bf16 on
//! the tensor cores, f32 on the CUDA cores), then for the backward the dq kernel (which also
//! writes `D = rowsum(dO ∘ O)`) and the dk/dv kernel (both on the CUDA cores). q, k, v, the output and its gradient are read in place through their strides; the
//! results are contiguous `[b, n, h, d]`. Head dims 64 and 128 in f32 and bf16
//! ([`super::cuda_supports`]); the tensor op runs `causal_attention` in the other cases.

use cudarc::driver::LaunchConfig;
use kernels::FLASH_ATTENTION;

use super::primitives::{Dims, FlashBackward, FlashForward, FlashParams};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::{to_u32, to_u32s};
use crate::backend::cuda::{check_extent, CudaStorage};
use crate::fused::{Operand, OptOperand};
use crate::{DType, Error, Result};

/// Query (or key) rows per block of the CUDA-core kernels (4 threads a row), of the tensor-core
/// forward (16 a warp), and threads per block.
const ROWS: usize = 32;
const MMA_ROWS: usize = 64;
const THREADS: u32 = 128;

/// The launch of one block per `rows` rows of `n` per `heads` (batch × heads).
fn config(op: &'static str, rows: usize, n: usize, heads: usize) -> Result<LaunchConfig> {
    if heads > 65_535 {
        return Err(Error::invalid(
            op,
            format!("{heads} batch heads (at most 65535)"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (to_u32(op, n.div_ceil(rows).max(1))?, heads as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `[offset, batch, head, row, column]` element strides of a rank-4 view, after checking that
/// it lies inside its buffer.
fn view(op: &'static str, o: Operand<'_, CudaStorage>) -> Result<[u32; 5]> {
    check_extent(op, o.l, o.s.len)?;
    let st = o.l.strides();
    to_u32s(op, [o.l.offset(), st[0], st[1], st[2], st[3]])
}

/// The checks both primitives share: one float dtype the kernels take, one device, a head dim
/// of 64 or 128; returns the kernel-name suffix `d{D}_{dtype}`.
fn check(
    op: &'static str,
    dm: &Dims,
    ops: &[&CudaStorage],
    mask: OptOperand<'_, CudaStorage>,
) -> Result<String> {
    let dt = ops[0].dtype;
    for o in ops {
        if o.dtype != dt {
            return Err(Error::DTypeMismatch {
                op,
                lhs: dt,
                rhs: o.dtype,
            });
        }
        ops[0].same_device(op, o)?;
    }
    if let Some(m) = mask {
        ops[0].same_device(op, m.s)?;
        if m.s.dtype != DType::U32 {
            return Err(Error::UnsupportedDType {
                op,
                dtype: m.s.dtype,
            });
        }
    }
    if !super::cuda_supports(dt, dm.d) {
        return Err(Error::invalid(
            op,
            format!(
                "the CUDA kernels take head dims 64 and 128 in f32 or bf16, not {} in {dt}",
                dm.d
            ),
        ));
    }
    Ok(format!("d{}_{dt}", dm.d))
}

pub(super) fn forward(
    o: FlashForward<'_, CudaStorage>,
    p: FlashParams,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "flash_attention";
    let (q, k, v) = (o.q, o.k, o.v);
    let dm = Dims::check(OP, [q.l, k.l, v.l], &[], None, o.key_mask.map(|m| m.l), p)?;
    let suffix = check(OP, &dm, &[q.s, k.s, v.s], o.key_mask)?;
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = dm;
    let dev = &q.s.dev;
    let out = CudaStorage::alloc(dev, OP, b * t * hq * d, q.s.dtype)?; // [b, t, hq, d]
    let lse = CudaStorage::alloc(dev, OP, b * hq * t, DType::F32)?; // [b, hq, t]
    if out.len == 0 || lse.len == 0 {
        return Ok((out, lse));
    }
    let mask = o.key_mask.map(|m| m.s.contiguous(OP, m.l)).transpose()?; // [b, s] u32
    let [b32, hq32, hkv32, t32, s32, off] = to_u32s(OP, [b, hq, hkv, t, s, p.q_offset])?;
    let scale = p.scale as f32;
    let [qo, qsb, qsh, qsn, qsd] = view(OP, q)?;
    let [ko, ksb, ksh, ksn, ksd] = view(OP, k)?;
    let [vo, vsb, vsh, vsn, vsd] = view(OP, v)?;
    let (qp, kp, vp) = (q.s.ptr(), k.s.ptr(), v.s.ptr());
    let (mp, op, lp) = (mask.as_ref().map_or(0u64, |m| m.ptr), out.ptr(), lse.ptr());
    let (name, rows) = if q.s.dtype == DType::BF16 {
        (format!("flash_attention_fwd_mma_{suffix}"), MMA_ROWS)
    } else {
        (format!("flash_attention_fwd_{suffix}"), ROWS)
    };
    // SAFETY: q, k, v are rank-4 views [b, hq, t, d], [b, hkv, s, d] (checked by `Dims::check`)
    // lying inside their buffers (`view`), read only at (bi < b, h < heads, i < rows, e < d);
    // the mask, when its pointer is not null, is a contiguous [b, s] u32 run read at
    // [bi, j < s] (q_offset + t ≤ s, checked); `out` holds b·t·hq·d elements of q's dtype and
    // `lse` b·hq·t f32: block (x, y) writes the rows i < t of its `rows` (32, or 64 for the
    // tensor-core kernel) of batch head y only. The grid covers ceil(t / rows) × b·hq blocks of
    // 128 threads, as each kernel expects (4 threads a row, or 4 warps of 16 rows).
    unsafe {
        launch!(
            dev,
            OP,
            FLASH_ATTENTION,
            name,
            config(OP, rows, t, b * hq)?,
            [
                b32, hq32, hkv32, t32, s32, off, scale, qp, qo, qsb, qsh, qsn, qsd, kp, ko, ksb,
                ksh, ksn, ksd, vp, vo, vsb, vsh, vsn, vsd, mp, op, lp
            ]
        )
    }?;
    Ok((out, lse))
}

pub(super) fn backward(
    o: FlashBackward<'_, CudaStorage>,
    p: FlashParams,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    const OP: &str = "flash_attention_backward";
    let (q, k, v, out, grad, lse) = (o.q, o.k, o.v, o.out, o.grad, o.lse);
    let mask_l = o.key_mask.map(|m| m.l);
    let dm = Dims::check(
        OP,
        [q.l, k.l, v.l],
        &[out.l, grad.l],
        Some(lse.l),
        mask_l,
        p,
    )?;
    let suffix = check(OP, &dm, &[q.s, k.s, v.s, out.s, grad.s], o.key_mask)?;
    if lse.s.dtype != DType::F32 {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: DType::F32,
            rhs: lse.s.dtype,
        });
    }
    q.s.same_device(OP, lse.s)?;
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = dm;
    let dev = &q.s.dev;
    let dt = q.s.dtype;
    let dq = CudaStorage::alloc(dev, OP, b * t * hq * d, dt)?; // [b, t, hq, d]
    let dk = CudaStorage::alloc(dev, OP, b * s * hkv * d, dt)?; // [b, s, hkv, d]
    let dv = CudaStorage::alloc(dev, OP, b * s * hkv * d, dt)?; // [b, s, hkv, d]
    if b * hq * t == 0 || b * s * hkv * d == 0 {
        return Ok((dq, dk, dv));
    }
    let dsum = CudaStorage::alloc(dev, OP, b * hq * t, DType::F32)?; // [b, hq, t] scratch
    let lc = lse.s.contiguous(OP, lse.l)?; // [b, hq, t] f32
    let mask = o.key_mask.map(|m| m.s.contiguous(OP, m.l)).transpose()?; // [b, s] u32
    let [b32, hq32, hkv32, t32, s32, off] = to_u32s(OP, [b, hq, hkv, t, s, p.q_offset])?;
    let scale = p.scale as f32;
    let [qo, qsb, qsh, qsn, qsd] = view(OP, q)?;
    let [ko, ksb, ksh, ksn, ksd] = view(OP, k)?;
    let [vo, vsb, vsh, vsn, vsd] = view(OP, v)?;
    let [oo, osb, osh, osn, osd] = view(OP, out)?;
    let [go, gsb, gsh, gsn, gsd] = view(OP, grad)?;
    let (qp, kp, vp, opp, gp) = (q.s.ptr(), k.s.ptr(), v.s.ptr(), out.s.ptr(), grad.s.ptr());
    let (lp, mp, sp) = (lc.ptr, mask.as_ref().map_or(0u64, |m| m.ptr), dsum.ptr());
    let (dqp, dkp, dvp) = (dq.ptr(), dk.ptr(), dv.ptr());
    let name = format!("flash_attention_bwd_dq_{suffix}");
    // SAFETY: the views as in the forward, `out` and `grad` [b, hq, t, d] like q (checked),
    // lse a contiguous [b, hq, t] f32 run; `dq` holds b·t·hq·d elements and `dsum` b·hq·t f32,
    // block (x, y) writing the rows i < t of its 32 of batch head y only (every row of dq is
    // written, zeros where no key is visible). Grid ceil(t / 32) × b·hq, 128 threads.
    unsafe {
        launch!(
            dev,
            OP,
            FLASH_ATTENTION,
            name,
            config(OP, ROWS, t, b * hq)?,
            [
                b32, hq32, hkv32, t32, s32, off, scale, qp, qo, qsb, qsh, qsn, qsd, kp, ko, ksb,
                ksh, ksn, ksd, vp, vo, vsb, vsh, vsn, vsd, opp, oo, osb, osh, osn, osd, gp, go,
                gsb, gsh, gsn, gsd, lp, mp, dqp, sp
            ]
        )
    }?;
    let name = format!("flash_attention_bwd_dkv_{suffix}");
    // SAFETY: as above, with `dsum` now written by the dq kernel on the same stream; `dk` and
    // `dv` hold b·s·hkv·d elements, block (x, y) writing the keys j < s of its 32 of batch kv
    // head y only, every key (zeros where no query sees it). Grid ceil(s / 32) × b·hkv, 128
    // threads.
    unsafe {
        launch!(
            dev,
            OP,
            FLASH_ATTENTION,
            name,
            config(OP, ROWS, s, b * hkv)?,
            [
                b32, hq32, hkv32, t32, s32, off, scale, qp, qo, qsb, qsh, qsn, qsd, kp, ko, ksb,
                ksh, ksn, ksd, vp, vo, vsb, vsh, vsn, vsd, gp, go, gsb, gsh, gsn, gsd, lp, sp, mp,
                dkp, dvp
            ]
        )
    }?;
    Ok((dq, dk, dv))
}
