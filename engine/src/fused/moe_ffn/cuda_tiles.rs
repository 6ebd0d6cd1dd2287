//! Launchers of the tensor-core fused MixLoRA FFN kernels (`moe_tiles_*` of module `MOE_FFN`,
//! kernels/src/moe_ffn_tiles.cu; the operands and results are documented on the primitives and
//! operand structs of `primitives.rs`). They serve a bf16 base with `k` in {1, 2, 4, 8},
//! `E·r ≤ 128` a multiple of 8 and `I` a multiple of 8 ([`supported`]); the op runs the
//! block-code GEMM path otherwise.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::LaunchConfig;
use kernels::MOE_FFN;

use super::cuda::{operands, settings, Kind, Operands};
use super::primitives::{MoeDims, TileRowGrads, TilesBackward, TilesForward};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::{to_u32, to_u32s};
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::{DType, Error, Result};

/// Slot rows of a tile and columns of `I` a step (`MT_ROWS`, `MT_COLS` in moe_ffn_tiles.cu).
const ROWS: usize = 64;
const COLS: usize = 32;
/// The widest `E·r` the kernels hold (`MT_ER`).
const MAX_ER: usize = 128;
const THREADS: u32 = 256;

/// Operand tiles in flight (`MT_STAGES`).
const STAGES: usize = 3;
// Shared memory of each kernel, in bytes: the tile sizes of moe_ffn_tiles.cu.
const CODE_BYTES: usize = ROWS * (MAX_ER + 8) * 2;
const BT_BYTES: usize = COLS * (MAX_ER + 8) * 2;
const AD_BYTES: usize = MAX_ER * (COLS + 8) * 2;
const ROWT_BYTES: usize = ROWS * (COLS + 8) * 2;
const FORWARD_SMEM: usize =
    2 * CODE_BYTES + STAGES * (2 * BT_BYTES + AD_BYTES + 2 * ROWT_BYTES) + ROWT_BYTES;
const ROWS_SMEM: usize = 3 * CODE_BYTES
    + STAGES * (2 * BT_BYTES + AD_BYTES + 3 * ROWT_BYTES)
    + 2 * ROWT_BYTES
    + 2 * ROWS * 4;
/// The column kernel's stages hold the compact codes, so its size depends on `r`.
fn cols_smem(r: usize) -> usize {
    2 * BT_BYTES
        + AD_BYTES
        + 3 * CODE_BYTES
        + 3 * ROWT_BYTES
        + 2 * ROWS * 4
        + STAGES * (3 * ROWT_BYTES + 3 * ROWS * r * 2 + ROWS * 4)
}
/// The most dynamic shared memory a block may have on sm_90 (227 KiB).
const MAX_SMEM: usize = 227 * 1024;

/// Whether the kernels serve these sizes for a base of `dtype`.
pub(super) fn supported(dtype: DType, d: &MoeDims) -> bool {
    let er = d.e * d.r;
    dtype == DType::BF16
        && matches!(d.k, 1 | 2 | 4 | 8)
        && er > 0
        && er <= MAX_ER
        && er % 8 == 0
        && cols_smem(d.r) <= MAX_SMEM
        && d.i > 0
        && d.i % 8 == 0
        && d.t * d.k * d.i.max(2) < u32::MAX as usize
}

/// `supported`, and the 16-byte alignment of the operands `aligned` (those moved by cp.async;
/// `operands` copies any that are not, so this is a guard).
fn check(op: &'static str, o: &Operands, d: &MoeDims, aligned: &[usize]) -> Result<()> {
    if !supported(o.base, d) {
        return Err(Error::invalid(
            op,
            format!(
                "sizes the kernels do not serve: {} base, k = {}, E·r = {}, I = {}",
                o.base,
                d.k,
                d.e * d.r,
                d.i
            ),
        ));
    }
    // cp.async moves 16 bytes: every operand aligned to them, G and U rows too.
    if aligned.iter().any(|&n| o.ptrs[n] % 16 != 0) || o.lds[0] % 8 != 0 || o.lds[1] % 8 != 0 {
        return Err(Error::invalid(
            op,
            "an operand not aligned to 16 bytes (G and U rows included)",
        ));
    }
    Ok(())
}

/// `blocks` blocks of 256 threads with `smem` bytes of dynamic shared memory, which the kernel
/// `name` is first allowed to use.
fn config(
    dev: &CudaDevice,
    op: &'static str,
    name: &str,
    blocks: usize,
    smem: usize,
) -> Result<LaunchConfig> {
    let f = dev.func(&MOE_FFN, name)?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| dev.err(op, e))?;
    Ok(LaunchConfig {
        grid_dim: (to_u32(op, blocks.max(1))?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: to_u32(op, smem)?,
    })
}

pub(super) fn forward(
    x: &TilesForward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "moe_tiles_forward";
    let (t, k, i, er) = (d.t, d.k, d.i, d.e * d.r);
    let o = operands(
        OP,
        &[
            (x.g, Kind::AlignedRows, t * i),
            (x.u, Kind::AlignedRows, t * i),
            (x.cg, Kind::Aligned, t * k * d.r),
            (x.cu, Kind::Aligned, t * k * d.r),
            (x.ids, Kind::Index, t * k),
            (x.bg, Kind::Aligned, i * er),
            (x.bu, Kind::Aligned, i * er),
            (x.ad, Kind::Aligned, er * i),
            (x.w, Kind::Adapter, t * k),
        ],
    )?;
    check(OP, &o, d, &[0, 1, 2, 3, 5, 6, 7])?;
    let abar = CudaStorage::alloc(&o.dev, OP, t * i, o.base)?; // [T, I]
    let zd = CudaStorage::alloc(&o.dev, OP, t * k * d.r, o.adapter)?; // [T·k, r]
    if t == 0 {
        return Ok((abar, zd));
    }
    let [g, u, cg, cu, ids, bg, bu, ad, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let [t32, k32, i32_, e32, r32, t0] = to_u32s(OP, [t, k, i, d.e, d.r, d.t0])?;
    let (pdrop, keep, seed) = settings(d);
    let (pa, pz) = (abar.ptr(), zd.ptr());
    let name = "moe_tiles_forward_bf16".to_string();
    let cfg = config(&o.dev, OP, &name, (t * k).div_ceil(ROWS), FORWARD_SMEM)?;
    let key = o.dev.dropout_key_ptr();
    // SAFETY: `supported` and the alignment check hold (k divides 64, E·r ≤ 128, I and the row
    // strides multiples of 8, 16-byte aligned operands); G, U hold T rows of I at strides ldg,
    // ldu; Cg, Cu T·k·r, ids T·k (each < E), B_g/B_u I·E·r, A_d E·r·I and w T·k elements (checked
    // by `operands`). Each block reads rows r0 .. r0 + 64 (guarded by T·k) and writes Ā rows of
    // its own tokens and Z_d rows of its own slots; FORWARD_SMEM is the kernel's tile layout.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            cfg,
            [
                t32, k32, i32_, e32, r32, t0, g, ldg, u, ldu, cg, cu, ids, bg, bu, ad, w, pa, pz,
                pdrop, keep, seed, key
            ]
        )
    }?;
    Ok((abar, zd))
}

/// The operands shared by the two backward kernels.
fn backward_operands(
    op: &'static str,
    x: &TilesBackward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<Operands> {
    let (t, k, i, er) = (d.t, d.k, d.i, d.e * d.r);
    let o = operands(
        op,
        &[
            (x.g, Kind::AlignedRows, t * i),
            (x.u, Kind::AlignedRows, t * i),
            (x.cg, Kind::Aligned, t * k * d.r),
            (x.cu, Kind::Aligned, t * k * d.r),
            (x.cd, Kind::Aligned, t * k * d.r),
            (x.ids, Kind::Index, t * k),
            (x.bg, Kind::Aligned, i * er),
            (x.bu, Kind::Aligned, i * er),
            (x.ad, Kind::Aligned, er * i),
            (x.dabar, Kind::Aligned, t * i),
            (x.w, Kind::Adapter, t * k),
        ],
    )?;
    check(op, &o, d, &[0, 1, 2, 3, 4, 6, 7, 8, 9])?;
    Ok(o)
}

pub(super) fn rows(
    x: &TilesBackward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<TileRowGrads<CudaStorage>> {
    const OP: &str = "moe_tiles_rows";
    let (t, k, i) = (d.t, d.k, d.i);
    let o = backward_operands(OP, x, d)?;
    let dgu = CudaStorage::alloc(&o.dev, OP, t * 2 * i, o.base)?; // [T, 2I]
    let dzg = CudaStorage::alloc(&o.dev, OP, t * k * d.r, o.adapter)?; // [T·k, r]
    let dzu = CudaStorage::alloc(&o.dev, OP, t * k * d.r, o.adapter)?;
    let dw = CudaStorage::alloc(&o.dev, OP, t * k, o.adapter)?; // [T, k]
    if t == 0 {
        return Ok(TileRowGrads { dgu, dzg, dzu, dw });
    }
    let [g, u, cg, cu, cd, ids, bg, bu, ad, dabar, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let [t32, k32, i32_, e32, r32, t0] = to_u32s(OP, [t, k, i, d.e, d.r, d.t0])?;
    let (pdrop, keep, seed) = settings(d);
    let (pgu, pzg, pzu, pw) = (dgu.ptr(), dzg.ptr(), dzu.ptr(), dw.ptr());
    let name = "moe_tiles_rows_bf16".to_string();
    let cfg = config(&o.dev, OP, &name, (t * k).div_ceil(ROWS), ROWS_SMEM)?;
    let key = o.dev.dropout_key_ptr();
    // SAFETY: as in `forward`, with Cd T·k·r and dĀ T·I contiguous elements; each block writes
    // the dGU rows of its own tokens and the dZ, dw rows of its own slots; ROWS_SMEM is the
    // kernel's tile layout.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            cfg,
            [
                t32, k32, i32_, e32, r32, t0, g, ldg, u, ldu, cg, cu, cd, ids, bg, bu, ad, dabar,
                w, pgu, pzg, pzu, pw, pdrop, keep, seed, key
            ]
        )
    }?;
    Ok(TileRowGrads { dgu, dzg, dzu, dw })
}

pub(super) fn cols(
    x: &TilesBackward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    const OP: &str = "moe_tiles_cols";
    let (t, i, er) = (d.t, d.i, d.e * d.r);
    let o = backward_operands(OP, x, d)?;
    let dbg = CudaStorage::alloc(&o.dev, OP, i * er, o.adapter)?; // [I, E·r]
    let dbu = CudaStorage::alloc(&o.dev, OP, i * er, o.adapter)?;
    let dad = CudaStorage::alloc(&o.dev, OP, er * i, o.adapter)?; // [E·r, I]
    let [g, u, cg, cu, cd, ids, bg, bu, ad, dabar, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let [t32, k32, i32_, e32, r32, t0] = to_u32s(OP, [t, d.k, i, d.e, d.r, d.t0])?;
    let (pdrop, keep, seed) = settings(d);
    let (pbg, pbu, pad) = (dbg.ptr(), dbu.ptr(), dad.ptr());
    let name = "moe_tiles_cols_bf16".to_string();
    let cfg = config(&o.dev, OP, &name, i.div_ceil(COLS), cols_smem(d.r))?;
    let key = o.dev.dropout_key_ptr();
    // SAFETY: as in `rows`; each block writes the dB rows and dA_d columns of its own 32
    // columns of I (all of them, zero when T = 0); cols_smem(r) is the kernel's tile layout.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            cfg,
            [
                t32, k32, i32_, e32, r32, t0, g, ldg, u, ldu, cg, cu, cd, ids, bg, bu, ad, dabar,
                w, pbg, pbu, pad, pdrop, keep, seed, key
            ]
        )
    }?;
    Ok((dbg, dbu, dad))
}
