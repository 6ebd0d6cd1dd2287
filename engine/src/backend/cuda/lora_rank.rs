//! The LoRA primitives' rank-r products on custom kernels (kernels/src/lora.cu) for the common
//! training case: a bf16 base, f32 adapters, r = 8 or 16, rows with unit column stride. They read
//! the bf16 operand (x, g or y) once and draw the dropout mask on the fly, where the general path
//! (cuda/lora.rs) writes f32 copies of it and runs cuBLAS products with one dimension r on CUDA
//! cores; expand-add writes `y + s z Bᵀ` in one pass, rounded once. Each returns `None` when its
//! case does not apply; the caller then takes the general path. Reductions over a long dimension
//! go through per-block partial sums added in a fixed order (deterministic, like cuBLAS).

use cudarc::driver::LaunchConfig;
use kernels::LORA;

use super::launch::launch;
use super::layout::to_u32;
use super::{CudaDevice, CudaStorage};
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
fn view_args(op: &'static str, x: &CudaStorage, l: &Layout) -> Result<(u32, u32, u32, u64)> {
    Ok((
        to_u32(op, l.dims()[0])?,
        to_u32(op, l.dims()[1])?,
        to_u32(op, l.strides()[0])?,
        x.ptr_at(l.offset()),
    ))
}

fn config(n: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(COLS).max(1) as u32, rows.max(1) as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(thr, keep, drop)`: the dropout arguments of the kernels.
fn dropout_args(p: f64) -> (u32, f32, i32) {
    if p == 0.0 {
        (0, 1.0, 0)
    } else {
        (rng::dropout_threshold(p), (1.0 / (1.0 - p)) as f32, 1)
    }
}

/// `scale · Σ_p part[p]` over `parts` partial sums `[rows, cols]` (f32), as `[rows, cols]` or,
/// with `transpose`, `[cols, rows]`.
fn sum_partials(
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
/// [`applies`], `a` `[r, n]` f32 contiguous), with their count.
fn codes_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    a: &CudaStorage,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let chunks = n.div_ceil(COLS);
    let part = CudaStorage::alloc(&x.dev, op, chunks * m * r, DType::F32)?; // [chunks, m, r]
    if chunks * m > 0 {
        let (m32, n32, ld32, px) = view_args(op, x, l)?;
        let (rows32, pa, pp) = (ROWS_PER_BLOCK as u32, a.ptr(), part.ptr());
        let (thr, keep, drop) = dropout_args(p);
        let name = format!("lora_codes_bf16_r{r}");
        // SAFETY: x's view `[m, n]` with row stride ld32 lies inside its buffer (`applies` and
        // the caller's extent check), starts 8-byte aligned (offset a multiple of 4 bf16) and has
        // n and ld multiples of 4, so the kernel's 8-byte loads x[m·ld + c .. +4] for c < n stay
        // in the view; `a` is a fresh contiguous `[r, n]` f32 buffer (16-byte aligned rows: n is
        // a multiple of 4); `part` holds chunks·m·r f32, written at [chunk, m, lane < r].
        unsafe {
            launch!(
                &x.dev,
                op,
                LORA,
                name,
                config(n, m.div_ceil(ROWS_PER_BLOCK)),
                [m32, n32, px, ld32, pa, pp, rows32, seed, thr, keep, drop]
            )
        }?;
    }
    Ok((part, chunks))
}

/// Per-row-group partial sums `[parts, r, n]` of `dzᵀ drop(x)` (x `[m, n]` bf16 checked by
/// [`applies`], `dz` `[m, r]` f32 contiguous), with their count.
fn grad_a_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    dz: &CudaStorage,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    let (m, n) = (l.dims()[0], l.dims()[1]);
    // Row groups: 8 warps of up to GRAD_A_ROWS rows per block row, at most GRAD_A_MAX_GROUPS.
    let groups = m.div_ceil(WARPS * GRAD_A_ROWS).clamp(1, GRAD_A_MAX_GROUPS);
    let parts = groups; // a block adds its warps' sums: one partial per block row
    let rows_per_warp = m.div_ceil(groups * WARPS).max(1);
    let part = CudaStorage::alloc(&x.dev, op, parts * r * n, DType::F32)?; // [parts, r, n]
    if n > 0 {
        let (m32, n32, ld32, px) = view_args(op, x, l)?;
        let (rows32, pd, pp) = (to_u32(op, rows_per_warp)?, dz.ptr(), part.ptr());
        let (thr, keep, drop) = dropout_args(p);
        let name = format!("lora_grad_a_bf16_r{r}");
        // SAFETY: x as in `codes_partials`; `dz` is a fresh contiguous `[m, r]` f32 buffer (rows
        // of r = 8 or 16 floats, 16-byte aligned); `part` holds groups·r·n f32 and block row g
        // writes its `[r, n]` slice (16-byte stores at columns c < n, n a multiple of 4), zeros
        // where it has no rows; the block's 8 KiB of shared memory are static.
        unsafe {
            launch!(
                &x.dev,
                op,
                LORA,
                name,
                config(n, groups),
                [m32, n32, px, ld32, pd, pp, rows32, seed, thr, keep, drop]
            )
        }?;
    }
    Ok((part, parts))
}

/// `z = drop(x) Aᵀ` `[m, r]` f32, for `x` `[m, n]` bf16 and `a` `[r, n]` f32 contiguous.
pub(super) fn codes(
    x: &CudaStorage,
    l: &Layout,
    a: &CudaStorage,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_codes";
    if !applies(x, l, a.dtype, r) {
        return Ok(None);
    }
    let (part, chunks) = codes_partials(OP, x, l, a, r, p, seed)?;
    let rows = (l.dims()[0], r);
    sum_partials(&x.dev, OP, (&part, chunks), rows, false, 1.0).map(Some)
}

/// `dA = dzᵀ drop(x)` `[r, n]` f32, for `x` `[m, n]` bf16 and `dz` `[m, r]` f32 contiguous.
pub(super) fn grad_a(
    x: &CudaStorage,
    l: &Layout,
    dz: &CudaStorage,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_grad_a";
    if !applies(x, l, dz.dtype, r) {
        return Ok(None);
    }
    let (part, parts) = grad_a_partials(OP, x, l, dz, r, p, seed)?;
    sum_partials(&x.dev, OP, (&part, parts), (r, l.dims()[1]), false, 1.0).map(Some)
}

/// `(dz, dB) = (s · g B, s · gᵀ z)` `([m, r], [n, r])` f32, for `g` `[m, n]` bf16, `bt` = Bᵀ
/// `[r, n]` and `z` `[m, r]` f32 contiguous: the codes and grad_a kernels without dropout.
pub(super) fn grad_codes(
    g: &CudaStorage,
    l: &Layout,
    bt: &CudaStorage,
    z: &CudaStorage,
    r: usize,
    s: f64,
) -> Result<Option<(CudaStorage, CudaStorage)>> {
    const OP: &str = "lora_grad_codes";
    if !applies(g, l, bt.dtype, r) || z.dtype != DType::F32 {
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

/// `y + zs Bᵀ` `[m, n]` bf16, for `y` `[m, n]` bf16, `zs` (the scaled codes) `[m, r]` and `bt` =
/// Bᵀ `[r, n]` f32 contiguous: one pass over `y` where the general path writes the f32 product,
/// casts it and adds.
pub(super) fn expand_add(
    y: &CudaStorage,
    l: &Layout,
    zs: &CudaStorage,
    bt: &CudaStorage,
    r: usize,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_expand_add";
    if !applies(y, l, bt.dtype, r) || zs.dtype != DType::F32 {
        return Ok(None);
    }
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let out = CudaStorage::alloc(&y.dev, OP, m * n, DType::BF16)?; // [m, n]
    if m * n == 0 {
        return Ok(Some(out));
    }
    let (m32, n32, ld32, py) = view_args(OP, y, l)?;
    let (rows32, pz, pb, po) = (ROWS_PER_BLOCK as u32, zs.ptr(), bt.ptr(), out.ptr());
    let name = format!("lora_expand_add_bf16_r{r}");
    // SAFETY: y's view as x's in `codes_partials` (8-byte loads inside the view); `zs` `[m, r]`
    // and `bt` `[r, n]` are fresh contiguous f32 buffers (16-byte aligned rows); `out` holds m·n
    // bf16, written 4 at a time at [row, c .. c+4] for c < n.
    unsafe {
        launch!(
            &y.dev,
            OP,
            LORA,
            name,
            config(n, m.div_ceil(ROWS_PER_BLOCK)),
            [m32, n32, pz, pb, py, ld32, po, rows32]
        )
    }?;
    Ok(Some(out))
}
/// `dx = mask ⊙ (dz A)` `[m, n]` bf16, for `dz` `[m, r]` and `a` `[r, n]` f32 contiguous; `None`
/// unless the output is bf16 with f32 adapters, r ∈ {8, 16} and n a multiple of 4.
pub(super) fn grad_x(
    dz: &CudaStorage,
    a: &CudaStorage,
    (m, r, n): (usize, usize, usize),
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "lora_grad_x";
    let ok = dtype == DType::BF16
        && a.dtype == DType::F32
        && dz.dtype == DType::F32
        && (r == 8 || r == 16)
        && n % 4 == 0
        && u32::try_from(m * n.max(r)).is_ok();
    if !ok {
        return Ok(None);
    }
    let dx = CudaStorage::alloc(&dz.dev, OP, m * n, DType::BF16)?; // [m, n]
    if m * n == 0 {
        return Ok(Some(dx));
    }
    let (m32, n32, rows32) = (to_u32(OP, m)?, to_u32(OP, n)?, ROWS_PER_BLOCK as u32);
    let (pd, pa, px) = (dz.ptr(), a.ptr(), dx.ptr());
    let (thr, keep, drop) = dropout_args(p);
    let name = format!("lora_grad_x_bf16_r{r}");
    // SAFETY: `dz` `[m, r]` and `a` `[r, n]` are fresh contiguous f32 buffers (16-byte aligned
    // rows), `dx` holds m·n bf16; the kernel reads dz[row], a[.., c .. c+4] and writes
    // dx[row, c .. c+4] for c < n (n a multiple of 4, 8-byte aligned stores).
    unsafe {
        launch!(
            &dz.dev,
            OP,
            LORA,
            name,
            config(n, m.div_ceil(ROWS_PER_BLOCK)),
            [m32, n32, pd, pa, px, rows32, seed, thr, keep, drop]
        )
    }?;
    Ok(Some(dx))
}
