//! The LoRA primitives' rank-r products on custom kernels (kernels/src/lora.cu) for the common
//! training case: a bf16 base, f32 adapters, r = 8 or 16, rows with unit column stride. They read
//! the bf16 operand (x, g or y) once and draw the dropout mask on the fly, where the general path
//! (cuda/lora.rs) writes f32 copies of it and runs cuBLAS products with one dimension r on CUDA
//! cores; expand-add writes `y + s z Bᵀ` in one pass, rounded once. Each returns `None` when its
//! case does not apply; the caller then takes the general path. Reductions over a long dimension
//! go through per-block partial sums added in a fixed order (deterministic, like cuBLAS). Rows
//! that are 16-byte runs (the usual case) take the tensor-core kernels of `cuda_mma`; the
//! CUDA-core kernels here serve the rest.

use cudarc::driver::LaunchConfig;
use kernels::LORA;

use super::cuda_mma;
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::backend::BackendStorage;
use crate::{rng, DType, Layout, Result};

/// Columns per warp (4 per lane) and warps per block of the kernels.
const COLS: usize = 128;
const WARPS: usize = 8;
/// Rows per block of the codes and grad_x kernels.
const ROWS_PER_BLOCK: usize = 128;
/// Rows per warp of grad_a at most, and the most partial sums it writes per column.
const GRAD_A_ROWS: usize = 64;
const GRAD_A_MAX_GROUPS: usize = 16;

/// Whether the custom kernels take a base operand `x` (`l`, logical `[m, n]`) with adapter
/// dtype `ad` and rank `r`: bf16 and f32, r ∈ {8, 16}, unit column stride, `n`, the row stride
/// and the offset multiples of 4 (8-byte loads), sizes within u32.
pub(super) fn applies(x: &CudaStorage, l: &Layout, ad: DType, r: usize) -> bool {
    let (dims, strides) = (l.dims(), l.strides());
    x.dtype == DType::BF16
        && ad == DType::F32
        && (r == 8 || r == 16)
        && dims.len() == 2
        && (strides[1] == 1 || dims[1] <= 1)
        && dims[1] % 4 == 0
        && strides[0] % 4 == 0
        && l.offset() % 4 == 0
        && u32::try_from(l.max_extent()).is_ok()
        && u32::try_from(dims[0] * dims[1].max(r)).is_ok()
}

/// `(m, n, row stride, address of the first element)` of a bf16 operand that [`applies`].
pub(super) fn view_args(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
) -> Result<(u32, u32, u32, u64)> {
    Ok((
        to_u32(op, l.dims()[0])?,
        to_u32(op, l.dims()[1])?,
        to_u32(op, l.strides()[0])?,
        x.ptr_at(l.offset()),
    ))
}

/// A small f32 operand of the kernels (A, Bᵀ, dz, the codes) by address, without a copy:
/// logically `[rows, cols]`, stored row-major, or (`transposed`) as the row-major transpose
/// `[cols, rows]` (a LoRA B `[n, r]` read as Bᵀ `[r, n]`). 16-byte aligned.
#[derive(Clone, Copy, Debug)]
pub(super) struct Small {
    pub(super) ptr: u64,
    pub(super) transposed: bool,
}

impl Small {
    /// The f32 view `l` (rank 2) of `s` as an operand: contiguous, or the transpose of a
    /// contiguous view, starting 16-byte aligned, inside its buffer; `None` otherwise (the caller
    /// then copies it, or takes the general path).
    pub(super) fn of(s: &CudaStorage, l: &Layout) -> Option<Small> {
        if s.dtype != DType::F32 || l.dims().len() != 2 || l.max_extent() > s.len {
            return None;
        }
        let transposed = if l.is_contiguous() {
            false
        } else if l.transpose(0, 1).is_contiguous() {
            true
        } else {
            return None;
        };
        let ptr = s.ptr_at(l.offset());
        (ptr % 16 == 0).then_some(Small { ptr, transposed })
    }

    /// [`Small::of`], or (when that cannot read the view in place, or `row_major` is asked of a
    /// transposed one) a contiguous copy of it, which `hold` keeps alive for the launch.
    pub(super) fn of_or_copy(
        s: &CudaStorage,
        l: &Layout,
        row_major: bool,
        hold: &mut Option<CudaStorage>,
    ) -> Result<Small> {
        if let Some(sm) = Small::of(s, l).filter(|sm| !(row_major && sm.transposed)) {
            return Ok(sm);
        }
        Ok(Small::held(s.to_dtype(l, s.dtype)?, hold)) // a contiguous copy
    }

    /// A fresh contiguous f32 buffer (16-byte aligned, as every allocation) as an operand, kept
    /// alive by `hold`.
    pub(super) fn held(fresh: CudaStorage, hold: &mut Option<CudaStorage>) -> Small {
        let sm = Small {
            ptr: fresh.ptr(),
            transposed: false,
        };
        *hold = Some(fresh);
        sm
    }
}

fn config(n: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(COLS).max(1) as u32, rows.max(1) as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(thr, keep, drop)`: the dropout arguments of the kernels.
pub(super) fn dropout_args(p: f64) -> (u32, f32, i32) {
    if p == 0.0 {
        (0, 1.0, 0)
    } else {
        (rng::dropout_threshold(p), (1.0 / (1.0 - p)) as f32, 1)
    }
}

/// `(runs, per_run)`: `len` cut into about `wanted` runs whose length is a multiple of 32 (the
/// tensor-core kernels' step), at least one, none empty: the splits of a reduction that go
/// through partial sums.
pub(super) fn runs_of_32(len: usize, wanted: usize) -> (usize, usize) {
    let steps = len.div_ceil(32).max(1);
    let per = steps.div_ceil(wanted.clamp(1, steps)) * 32;
    (len.div_ceil(per).max(1), per)
}

/// `scale · Σ_p part[p]` over `parts` partial sums `[rows, cols]` (f32), as `[rows, cols]` or,
/// with `transpose`, `[cols, rows]`.
pub(super) fn sum_partials(
    dev: &CudaDevice,
    op: &'static str,
    (part, parts): (&CudaStorage, usize),
    (rows, cols): (usize, usize),
    transpose: bool,
    scale: f64,
) -> Result<CudaStorage> {
    let n = rows * cols;
    let out = CudaStorage::alloc(dev, op, n, DType::F32)?;
    if n == 0 {
        return Ok(out);
    }
    to_u32(op, n)?; // the kernel's index arithmetic is 32-bit
    let (p32, rows32, cols32) = (to_u32(op, parts)?, to_u32(op, rows)?, to_u32(op, cols)?);
    let (tr, s32, pp, po) = (i32::from(transpose), scale as f32, part.ptr(), out.ptr());
    // SAFETY: `part` holds `parts · rows · cols` f32 and `out` rows · cols f32 (both allocated
    // for that); thread i reads part[p·n + i] for p < parts and writes out[i] or its transposed
    // place, a permutation of 0 .. n.
    unsafe {
        launch!(
            dev,
            op,
            LORA,
            "lora_sum_partials_f32",
            CudaDevice::grid(n),
            [p32, rows32, cols32, tr, s32, pp, po]
        )
    }?;
    Ok(out)
}

/// Per-chunk partial sums `[chunks, m, r]` of `drop(x) Aᵀ` (x `[m, n]` bf16 checked by
/// [`applies`], `a` `[r, n]` f32), with their count.
fn codes_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    a: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    if cuda_mma::applies(l) {
        return cuda_mma::codes_partials(op, x, l, a, r, p, seed);
    }
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let chunks = n.div_ceil(COLS);
    let part = CudaStorage::alloc(&x.dev, op, chunks * m * r, DType::F32)?; // [chunks, m, r]
    if chunks * m > 0 {
        let (m32, n32, ld32, px) = view_args(op, x, l)?;
        let (rows32, pa, at, pp) = (
            ROWS_PER_BLOCK as u32,
            a.ptr,
            i32::from(a.transposed),
            part.ptr(),
        );
        let (thr, keep, drop) = dropout_args(p);
        let name = format!("lora_codes_bf16_r{r}");
        let key = x.dev.dropout_key_ptr();
        // SAFETY: x's view `[m, n]` with row stride ld32 lies inside its buffer (`applies` and
        // the caller's extent check), starts 8-byte aligned (offset a multiple of 4 bf16) and has
        // n and ld multiples of 4, so the kernel's 8-byte loads x[m·ld + c .. +4] for c < n stay
        // in the view; `a` `[r, n]` (or its transpose `[n, r]`, `at`) is an f32 run inside its
        // buffer starting 16-byte aligned (`Small`; rows of n, a multiple of 4, or of r = 8 or 16
        // floats, read by float4); `part` holds chunks·m·r f32, written at [chunk, m, lane < r].
        // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
        unsafe {
            launch!(
                &x.dev,
                op,
                LORA,
                name,
                config(n, m.div_ceil(ROWS_PER_BLOCK)),
                [m32, n32, px, ld32, pa, at, pp, rows32, seed, key, thr, keep, drop]
            )
        }?;
    }
    Ok((part, chunks))
}

/// Per-row-group partial sums `[parts, r, n]` of `dzᵀ drop(x)` (x `[m, n]` bf16 checked by
/// [`applies`], `dz` `[m, r]` f32 row-major), with their count.
fn grad_a_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    dz: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    if cuda_mma::applies(l) {
        return cuda_mma::grad_a_partials(op, x, l, dz, r, p, seed);
    }
    let (m, n) = (l.dims()[0], l.dims()[1]);
    // Row groups: 8 warps of up to GRAD_A_ROWS rows per block row, at most GRAD_A_MAX_GROUPS.
    let groups = m.div_ceil(WARPS * GRAD_A_ROWS).clamp(1, GRAD_A_MAX_GROUPS);
    let parts = groups; // a block adds its warps' sums: one partial per block row
    let rows_per_warp = m.div_ceil(groups * WARPS).max(1);
    let part = CudaStorage::alloc(&x.dev, op, parts * r * n, DType::F32)?; // [parts, r, n]
    if n > 0 {
        let (m32, n32, ld32, px) = view_args(op, x, l)?;
        let (rows32, pd, pp) = (to_u32(op, rows_per_warp)?, dz.ptr, part.ptr());
        let (thr, keep, drop) = dropout_args(p);
        let name = format!("lora_grad_a_bf16_r{r}");
        let key = x.dev.dropout_key_ptr();
        // SAFETY: x as in `codes_partials`; `dz` `[m, r]` is a row-major f32 run inside its
        // buffer starting 16-byte aligned (`Small`; rows of r = 8 or 16 floats); `part` holds
        // groups·r·n f32 and block row g writes its `[r, n]` slice (16-byte stores at columns
        // c < n, n a multiple of 4), zeros where it has no rows; the block's 8 KiB of shared
        // memory are static.
        // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
        unsafe {
            launch!(
                &x.dev,
                op,
                LORA,
                name,
                config(n, groups),
                [m32, n32, px, ld32, pd, pp, rows32, seed, key, thr, keep, drop]
            )
        }?;
    }
    Ok((part, parts))
}

/// `z = drop(x) Aᵀ` `[m, r]` f32, for `x` `[m, n]` bf16 and `a` `[r, n]` f32.
pub(super) fn codes(
    x: &CudaStorage,
    l: &Layout,
    a: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_codes";
    if !applies(x, l, DType::F32, r) {
        return Ok(None);
    }
    let (part, chunks) = codes_partials(OP, x, l, a, r, p, seed)?;
    let rows = (l.dims()[0], r);
    sum_partials(&x.dev, OP, (&part, chunks), rows, false, 1.0).map(Some)
}

/// `dA = dzᵀ drop(x)` `[r, n]` f32, for `x` `[m, n]` bf16 and `dz` `[m, r]` f32 row-major.
pub(super) fn grad_a(
    x: &CudaStorage,
    l: &Layout,
    dz: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_grad_a";
    if !applies(x, l, DType::F32, r) || dz.transposed {
        return Ok(None);
    }
    let (part, parts) = grad_a_partials(OP, x, l, dz, r, p, seed)?;
    sum_partials(&x.dev, OP, (&part, parts), (r, l.dims()[1]), false, 1.0).map(Some)
}

/// `(dz, dB) = (s · g B, s · gᵀ z)` `([m, r], [n, r])` f32, for `g` `[m, n]` bf16, `bt` = Bᵀ
/// `[r, n]` f32 and `z` `[m, r]` f32 row-major: the codes and grad_a kernels without dropout.
pub(super) fn grad_codes(
    g: &CudaStorage,
    l: &Layout,
    bt: Small,
    z: Small,
    r: usize,
    s: f64,
) -> Result<Option<(CudaStorage, CudaStorage)>> {
    const OP: &str = "lora_grad_codes";
    if !applies(g, l, DType::F32, r) || z.transposed {
        return Ok(None);
    }
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let (part, chunks) = codes_partials(OP, g, l, bt, r, 0.0, 0)?;
    let dz = sum_partials(&g.dev, OP, (&part, chunks), (m, r), false, s)?;
    drop(part);
    let (part, parts) = grad_a_partials(OP, g, l, z, r, 0.0, 0)?;
    let db = sum_partials(&g.dev, OP, (&part, parts), (r, n), true, s)?; // [n, r]
    Ok(Some((dz, db)))
}

/// `y + zs Bᵀ` `[m, n]` bf16, for `y` `[m, n]` bf16, `zs` (the scaled codes) `[m, r]` f32
/// row-major and `bt` = Bᵀ `[r, n]` f32: one pass over `y` where the general path writes the f32
/// product, casts it and adds.
pub(super) fn expand_add(
    y: &CudaStorage,
    l: &Layout,
    zs: Small,
    bt: Small,
    r: usize,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_expand_add";
    if !applies(y, l, DType::F32, r) || zs.transposed {
        return Ok(None);
    }
    let (m, n) = (l.dims()[0], l.dims()[1]);
    if cuda_mma::applies(l) {
        let out = cuda_mma::expand(&y.dev, OP, zs, bt, Some((y, l)), (m, r, n), 0.0, 0)?;
        return Ok(Some(out));
    }
    let out = CudaStorage::alloc(&y.dev, OP, m * n, DType::BF16)?; // [m, n]
    if m * n == 0 {
        return Ok(Some(out));
    }
    let (m32, n32, ld32, py) = view_args(OP, y, l)?;
    let (rows32, pz, pb, bt_t, po) = (
        ROWS_PER_BLOCK as u32,
        zs.ptr,
        bt.ptr,
        i32::from(bt.transposed),
        out.ptr(),
    );
    let name = format!("lora_expand_add_bf16_r{r}");
    // SAFETY: y's view as x's in `codes_partials` (8-byte loads inside the view); `zs` `[m, r]`
    // row-major and `bt` `[r, n]` (or its transpose `[n, r]`, bt_t) are f32 runs inside their
    // buffers starting 16-byte aligned (`Small`; rows of r = 8 or 16 floats, or of n, a multiple
    // of 4), read by float4; `out` holds m·n bf16, written 4 at a time at [row, c .. c+4], c < n.
    unsafe {
        launch!(
            &y.dev,
            OP,
            LORA,
            name,
            config(n, m.div_ceil(ROWS_PER_BLOCK)),
            [m32, n32, pz, pb, bt_t, py, ld32, po, rows32]
        )
    }?;
    Ok(Some(out))
}
/// `dx = mask ⊙ (dz A)` `[m, n]` bf16, for `dz` `[m, r]` f32 row-major and `a` `[r, n]` f32 on
/// `dev`; `None` unless the output is bf16, r ∈ {8, 16} and n a multiple of 4.
pub(super) fn grad_x(
    dev: &CudaDevice,
    dz: Small,
    a: Small,
    (m, r, n): (usize, usize, usize),
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_grad_x";
    let ok = dtype == DType::BF16
        && !dz.transposed
        && (r == 8 || r == 16)
        && n % 4 == 0
        && u32::try_from(m * n.max(r)).is_ok();
    if !ok {
        return Ok(None);
    }
    if m > 0 && n > 0 && n % 8 == 0 {
        return cuda_mma::expand(dev, OP, dz, a, None, (m, r, n), p, seed).map(Some);
    }
    let dx = CudaStorage::alloc(dev, OP, m * n, DType::BF16)?; // [m, n]
    if m * n == 0 {
        return Ok(Some(dx));
    }
    let (m32, n32, rows32) = (to_u32(OP, m)?, to_u32(OP, n)?, ROWS_PER_BLOCK as u32);
    let (pd, pa, at, px) = (dz.ptr, a.ptr, i32::from(a.transposed), dx.ptr());
    let (thr, keep, drop) = dropout_args(p);
    let name = format!("lora_grad_x_bf16_r{r}");
    let key = dev.dropout_key_ptr();
    // SAFETY: `dz` `[m, r]` row-major and `a` `[r, n]` (or its transpose, `at`) are f32 runs
    // inside their buffers starting 16-byte aligned (`Small`), `dx` holds m·n bf16; the kernel
    // reads dz[row], A[.., c .. c+4] and writes dx[row, c .. c+4] for c < n (n a multiple of 4,
    // 8-byte aligned stores).
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            dev,
            OP,
            LORA,
            name,
            config(n, m.div_ceil(ROWS_PER_BLOCK)),
            [m32, n32, pd, pa, at, px, rows32, seed, key, thr, keep, drop]
        )
    }?;
    Ok(Some(dx))
}
