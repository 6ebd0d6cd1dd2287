//! The FP8 unit's launchers: the kernels of `kernels/src/fp8.cu` (quantisation with one scale a
//! row, the transpose of codes, the scaling of a product) and cuBLASLt's FP8 GEMM. Nothing is read
//! back to the host and every buffer comes from the engine's allocator, so all of it can be
//! recorded into a CUDA graph (run it once eagerly first: the cuBLASLt handle and the algorithm of
//! each shape are made then, outside the graph).
//!
//! **The GEMM.** `out [M, N] = (sa[m] · Σ_k dec(a[m, k]) dec(b[n, k])) · sb[n]` with `a` `[M, K]`
//! codes of format `fa` and `b` `[N, K]` e4m3 codes, both row-major. cuBLASLt is column-major, so
//! the sums run as `Dᵀ [N, M] = op(A) · op(B)` with `A` = `b` read as the column-major `[K, N]`
//! (ld K, `TRANSA = T`) and `B` = `a` as the column-major `[K, M]` (ld K, `TRANSB = N`): the "TN"
//! layout that FP8 on Ada and Hopper requires, with the reduction dim contiguous in both. Compute
//! `CUBLAS_COMPUTE_32F`, scale type `CUDA_R_32F`, `alpha` 1, `beta` 0, no scale pointers (the row
//! scales are vectors, which cuBLASLt's tensor-wide scales cannot express), precise accumulation
//! (`CUBLASLT_MATMUL_DESC_FAST_ACCUM` 0), `D` in f32 (the output itself when it is f32, else a
//! temporary); then `fp8_scale_product` applies `sa` and `sb` and rounds once to the output dtype,
//! as the CPU does. cuBLASLt's FP8 kernels need `K` and `N` to be multiples of 16 and 16-byte
//! aligned operands (`M` is free); other shapes are refused with an error saying so, as is a GPU
//! below compute capability 8.9 (no FP8 tensor cores). The algorithm of each shape (dims, formats,
//! operand alignments, workspace) is chosen once by `cublasLtMatmulAlgoGetHeuristic` and cached
//! for the process; the workspace is the current lane's cuBLAS workspace
//! ([`CudaDevice::lt_workspace`]).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::LaunchConfig;
use kernels::FP8;

use super::primitives::{
    check_gemm, check_transpose, check_vec, quant_dims, CodeDims, Fp8Format, GemmFp8, QuantizeRows,
    TransposeCodes,
};
use crate::backend::cuda::device::lock;
use crate::backend::cuda::elementwise::fill;
use crate::backend::cuda::launch::{launch, profiled};
use crate::backend::cuda::layout::{to_u32, to_u32s};
use crate::backend::cuda::{float_only, Contig, CudaDevice, CudaStorage};
use crate::fused::Operand;
use crate::{DType, Error, Result};

const THREADS: u32 = 256;
/// Codes a side of a transpose tile (`FP8_TILE` in fp8.cu).
const TILE: usize = 32;

/// The `fmt` argument of the kernels.
fn fmt_code(f: Fp8Format) -> u32 {
    match f {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

/// Errors unless `s` holds codes (u32 words), as the CPU's `view_u32` does.
fn codes_dtype(op: &'static str, s: &CudaStorage) -> Result<()> {
    if s.dtype != DType::U32 {
        return Err(Error::UnsupportedDType { op, dtype: s.dtype });
    }
    Ok(())
}

/// The contiguous f32 vector `[n]` of a scale operand, on `like`'s GPU.
fn scale_vec(
    op: &'static str,
    what: &str,
    o: Operand<'_, CudaStorage>,
    n: usize,
    like: &CudaStorage,
) -> Result<Contig> {
    check_vec(op, what, o.l, n)?;
    if o.s.dtype != DType::F32 {
        return Err(Error::invalid(
            op,
            format!("{what} must be f32, found {}", o.s.dtype),
        ));
    }
    like.same_device(op, o.s)?;
    o.s.contiguous(op, o.l)
}

pub(super) fn quantize_rows(
    o: QuantizeRows<'_, CudaStorage>,
    f: Fp8Format,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "fp8_quantize_rows";
    let d = quant_dims(OP, o.w.l)?;
    let w = o.w.s;
    float_only(OP, w.dtype)?;
    let col = o
        .col
        .map(|c| scale_vec(OP, "column scales", c, d.cols, w))
        .transpose()?;
    let dev = &w.dev;
    let codes = CudaStorage::alloc(dev, OP, d.rows * d.cols / 4, DType::U32)?;
    let scales = CudaStorage::alloc(dev, OP, d.rows, DType::F32)?;
    if d.rows == 0 {
        return Ok((codes, scales));
    }
    let [rows, cols] = to_u32s(OP, [d.rows, d.cols])?;
    to_u32(OP, d.rows * d.cols)?;
    let wc = w.contiguous(OP, o.w.l)?;
    let fmt = fmt_code(f);
    let (wp, colp, cp, sp) = (
        wc.ptr,
        col.as_ref().map_or(0u64, |c| c.ptr),
        codes.ptr(),
        scales.ptr(),
    );
    let name = format!("{OP}_{}", w.dtype);
    // SAFETY: w is a contiguous [rows, cols] of its dtype (cols % 4 == 0, quant_dims), col (when
    // not null) a contiguous [cols] f32; codes hold rows · cols / 4 words and scales rows f32s,
    // allocated above; one block per row (grid.x = rows), each reading its row and writing its
    // row's cols / 4 words and its scale only.
    unsafe {
        launch!(
            dev,
            OP,
            FP8,
            name,
            CudaDevice::rows(d.rows, THREADS),
            [rows, cols, fmt, wp, colp, cp, sp]
        )
    }?;
    Ok((codes, scales))
}

pub(super) fn transpose_codes(
    o: TransposeCodes<'_, CudaStorage>,
    d: CodeDims,
) -> Result<CudaStorage> {
    const OP: &str = "fp8_transpose_codes";
    check_transpose(OP, o.codes.l, d)?;
    let s = o.codes.s;
    codes_dtype(OP, s)?;
    let dev = &s.dev;
    let n = d.rows * d.cols;
    let out = CudaStorage::alloc(dev, OP, n / 4, DType::U32)?;
    if n == 0 {
        return Ok(out);
    }
    let [rows, cols] = to_u32s(OP, [d.rows, d.cols])?;
    to_u32(OP, n)?;
    let c = s.contiguous(OP, o.codes.l)?;
    let (ip, op) = (c.ptr, out.ptr());
    let cfg = LaunchConfig {
        grid_dim: (
            d.cols.div_ceil(TILE) as u32,
            d.rows.div_ceil(TILE).min(65535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the input is the contiguous [rows, cols / 4] words of the codes (check_codes), the
    // output rows · cols / 4 words allocated above; rows and cols are multiples of 4, and each of
    // the 256 threads (the count the kernel's tile indexing assumes) reads and writes whole words
    // inside [rows, cols] and [cols, rows] only.
    unsafe {
        launch!(
            dev,
            OP,
            FP8,
            "fp8_transpose_codes",
            cfg,
            [rows, cols, ip, op]
        )
    }?;
    Ok(out)
}

/// `out[r, c] = dtype((d[r, c] · sa[r]) · sb[c])` over `d` `[rows, cols]` f32 (`sb` when given);
/// `out` may be `d` itself.
fn scale_product(
    dev: &CudaDevice,
    d: &CudaStorage,
    (rows, cols): (u32, u32),
    sa: u64,
    sb: Option<u64>,
    out: &CudaStorage,
) -> Result<()> {
    const OP: &str = "fp8_gemm";
    let n = rows as usize * cols as usize;
    let (dp, sbp, op) = (d.ptr(), sb.unwrap_or(0), out.ptr());
    let name = format!("fp8_scale_product_{}", out.dtype);
    // SAFETY: d holds rows · cols f32s and out rows · cols elements of its dtype (the callers'
    // allocations; the same buffer when out is d, which the kernel allows: each element is read
    // and then written by one thread); sa is rows f32s and sb (when not null) cols f32s,
    // contiguous; the kernel writes out[0..rows·cols) grid-stride.
    unsafe {
        launch!(
            dev,
            OP,
            FP8,
            name,
            CudaDevice::grid(n),
            [rows, cols, dp, sa, sbp, op]
        )
    }
}

/// Errors unless the GPU has FP8 tensor cores (compute capability 8.9 or newer).
fn check_fp8_gpu(op: &'static str, dev: &CudaDevice) -> Result<()> {
    // `arch` is `sm_{major}{minor}` (device.rs), so its number is 10 · major + minor.
    let cc = dev
        .arch()
        .strip_prefix("sm_")
        .and_then(|v| v.parse::<u32>().ok());
    match cc {
        Some(cc) if cc >= 89 => Ok(()),
        _ => Err(Error::invalid(
            op,
            format!(
                "FP8 GEMMs need a GPU of compute capability 8.9 or newer (FP8 tensor cores: Ada, \
                 Hopper and later); cuda:{} ({}) is {}. Keep the base weights dense on this GPU",
                dev.ordinal(),
                dev.name(),
                dev.arch()
            ),
        )),
    }
}

/// Errors unless cuBLASLt's FP8 GEMM can take `a` `[m, k]` times `b` `[n, k]` codes at these
/// addresses: `k` and `n` multiples of 16, both operands 16-byte aligned.
fn check_lt_shape(op: &'static str, a: CodeDims, b: CodeDims, pa: u64, pb: u64) -> Result<()> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    if k % 16 != 0 || n % 16 != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "cuBLASLt's FP8 GEMM needs the reduction dim and the output's columns to be \
                 multiples of 16: a [{m}, {k}] times b [{n}, {k}] has K = {k}, N = {n} (an FP8 \
                 weight [out, in] on the GPU needs both out and in to be multiples of 16)"
            ),
        ));
    }
    if pa % 16 != 0 || pb % 16 != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "cuBLASLt's FP8 GEMM needs 16-byte aligned operands: a starts {} and b {} bytes \
                 past a multiple of 16 (a view of codes must start at a multiple of 4 words)",
                pa % 16,
                pb % 16
            ),
        ));
    }
    Ok(())
}

pub(super) fn gemm_fp8(
    o: GemmFp8<'_, CudaStorage>,
    a: CodeDims,
    b: CodeDims,
    fa: Fp8Format,
    out: DType,
) -> Result<CudaStorage> {
    const OP: &str = "fp8_gemm";
    check_gemm(OP, (a, o.a.l, o.sa.l), (b, o.b.l, o.sb.map(|c| c.l)), out)?;
    let (a_s, b_s) = (o.a.s, o.b.s);
    codes_dtype(OP, a_s)?;
    codes_dtype(OP, b_s)?;
    a_s.same_device(OP, b_s)?;
    let sa = scale_vec(OP, "row scales of a", o.sa, a.rows, a_s)?;
    let sb =
        o.sb.map(|c| scale_vec(OP, "row scales of b", c, b.rows, a_s))
            .transpose()?;
    let dev = &a_s.dev;
    check_fp8_gpu(OP, dev)?;
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let out_s = CudaStorage::alloc(dev, OP, m * n, out)?;
    if m * n == 0 {
        return Ok(out_s);
    }
    let dims = to_u32s(OP, [m, n])?;
    to_u32(OP, m * n)?;
    let sb_ptr = sb.as_ref().map(|c| c.ptr);
    if k == 0 {
        // Empty sums: out = dtype((0 · sa) · sb), as on the CPU (a NaN scale gives NaN).
        let zeros = fill(dev, m * n, DType::F32, 0.0)?;
        scale_product(dev, &zeros, (dims[0], dims[1]), sa.ptr, sb_ptr, &out_s)?;
        return Ok(out_s);
    }
    let (ac, bc) = (a_s.contiguous(OP, o.a.l)?, b_s.contiguous(OP, o.b.l)?);
    check_lt_shape(OP, a, b, ac.ptr, bc.ptr)?;
    let call = LtGemm {
        m,
        n,
        k,
        fa,
        a: ac.ptr,
        b: bc.ptr,
    };
    // The sums in f32 (an f32 output holds them itself), then the scales and the output dtype.
    let d = if out == DType::F32 {
        None
    } else {
        Some(CudaStorage::alloc(dev, OP, m * n, DType::F32)?)
    };
    let d_ref = d.as_ref().unwrap_or(&out_s);
    if !call.run(dev, d_ref)? {
        return Err(Error::invalid(
            OP,
            format!(
                "cuBLASLt offers no FP8 GEMM for a [{m}, {k}] ({fa}) times b [{n}, {k}] (e4m3) \
                 with an f32 result on cuda:{} ({})",
                dev.ordinal(),
                dev.arch()
            ),
        ));
    }
    scale_product(dev, d_ref, (dims[0], dims[1]), sa.ptr, sb_ptr, &out_s)?;
    Ok(out_s)
}

// ----- cuBLASLt ----------------------------------------------------------------------------------

/// One FP8 GEMM without scales (module doc): `a` `[m, k]` codes of format `fa` at `a`, `b`
/// `[n, k]` e4m3 codes at `b`.
struct LtGemm {
    m: usize,
    n: usize,
    k: usize,
    fa: Fp8Format,
    a: u64,
    b: u64,
}

/// What the algorithm of a GEMM depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    ordinal: usize,
    m: usize,
    n: usize,
    k: usize,
    fa: Fp8Format,
    d: DType,
    /// Alignments in bytes (at most 256) of cuBLASLt's A (`b`), B (`a`) and D.
    align: [u32; 3],
    workspace: usize,
}

/// The algorithm cuBLASLt's heuristic chose for each GEMM; `None` when it offered none.
type AlgoCache = Mutex<HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>>;

fn algos() -> &'static AlgoCache {
    static ALGOS: OnceLock<AlgoCache> = OnceLock::new();
    ALGOS.get_or_init(Default::default)
}

/// The largest power of two up to 256 that divides `ptr` (what cuBLASLt's alignment preferences
/// take).
fn alignment(ptr: u64) -> u32 {
    let mut a = 256u32;
    while a > 1 && ptr % u64::from(a) != 0 {
        a /= 2;
    }
    a
}

type LtResult<T> = std::result::Result<T, CublasError>;

/// The cuBLASLt type of a format.
fn lt_type(f: Fp8Format) -> sys::cudaDataType {
    match f {
        Fp8Format::E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
        Fp8Format::E5M2 => sys::cudaDataType::CUDA_R_8F_E5M2,
    }
}

/// A matmul descriptor, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> LtResult<()> {
        // SAFETY: the descriptor is live (self); `v` is a value of the attribute's C type (the
        // callers pass the type the attribute documents), read for size_of::<T>() bytes.
        unsafe {
            lt::set_matmul_desc_attribute(
                self.0,
                attr,
                (v as *const T).cast(),
                std::mem::size_of::<T>(),
            )
        }
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc and destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A matrix layout, destroyed on drop.
struct MatLayout(sys::cublasLtMatrixLayout_t);

impl MatLayout {
    /// A column-major `rows × cols` matrix of `ty` with leading dim `ld`.
    fn new(ty: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> LtResult<Self> {
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map(MatLayout)
    }
}

impl Drop for MatLayout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout and destroyed once, here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// A heuristic preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn set<T>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, v: &T) -> LtResult<()> {
        // SAFETY: the preference is live (self); `v` is a value of the attribute's C type, read
        // for size_of::<T>() bytes.
        unsafe {
            lt::set_matmul_pref_attribute(
                self.0,
                attr,
                (v as *const T).cast(),
                std::mem::size_of::<T>(),
            )
        }
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref and destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl LtGemm {
    /// Queues the GEMM with `d` (`[m, n]` row-major f32, room for all of it) as its output;
    /// `false` (nothing queued) when cuBLASLt offers no algorithm for it.
    fn run(&self, dev: &CudaDevice, d: &CudaStorage) -> Result<bool> {
        const OP: &str = "fp8_gemm";
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let (m, n, k) = (self.m, self.n, self.k);
        if d.dtype != DType::F32 {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: d.dtype,
            });
        }
        let d_type = sys::cudaDataType::CUDA_R_32F;
        let e = |e: CublasError| dev.err(OP, e);
        let handle = dev.blas_lt()?;
        let (ws, ws_bytes) = dev.lt_workspace()?.unwrap_or((0, 0));
        dev.bind(OP)?;
        // D = alpha · op(A) op(B) + beta · C in f32, with the f32 scalars on the host (the
        // default pointer mode).
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map(Desc)
        .map_err(e)?;
        desc.set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &cublasOperation_t::CUBLAS_OP_T,
        )
        .map_err(e)?;
        desc.set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &cublasOperation_t::CUBLAS_OP_N,
        )
        .map_err(e)?;
        // int8_t in cublasLt.h; 0 (the default, set for clarity): every partial sum is promoted
        // to f32 accumulation, none kept at the tensor cores' lower precision.
        desc.set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &0i8)
            .map_err(e)?;
        // No scale pointers: A's and B's scales stay 1 (the row scales of `a` and `b` are
        // applied to the f32 result, which the tensor-wide scales of cuBLASLt cannot express).
        let a_l = MatLayout::new(sys::cudaDataType::CUDA_R_8F_E4M3, k, n, k).map_err(e)?;
        let b_l = MatLayout::new(lt_type(self.fa), k, m, k).map_err(e)?;
        let d_l = MatLayout::new(d_type, n, m, n).map_err(e)?;
        let key = AlgoKey {
            ordinal: dev.ordinal(),
            m,
            n,
            k,
            fa: self.fa,
            d: d.dtype,
            align: [alignment(self.b), alignment(self.a), alignment(d.ptr())],
            workspace: ws_bytes,
        };
        let cached = lock(algos()).get(&key).copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = lt::create_matmul_pref().map(Pref).map_err(e)?;
                // uint64_t, and uint32_t for the alignments (bytes).
                pref.set(
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &(ws_bytes as u64),
                )
                .map_err(e)?;
                let [al_a, al_b, al_d] = key.align;
                for (attr, v) in [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_a),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_b),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_d),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_d),
                ] {
                    pref.set(attr, &v).map_err(e)?;
                }
                // SAFETY: every descriptor is live for the call; C and D share D's layout.
                let found = unsafe {
                    lt::get_matmul_algo_heuristic(
                        handle.handle(),
                        desc.0,
                        a_l.0,
                        b_l.0,
                        d_l.0,
                        d_l.0,
                        pref.0,
                    )
                };
                let algo = match found {
                    Ok(h) => Some(h.algo),
                    Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => None,
                    Err(err) => return Err(e(err)),
                };
                lock(algos()).insert(key, algo);
                algo
            }
        };
        let Some(algo) = algo else {
            return Ok(false);
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = dev.stream().cu_stream();
        let name = format!("fp8 gemm {m}x{k}x{n} {}x e4m3 -> {}", self.fa, d.dtype);
        profiled(dev, &name, || {
            // SAFETY: A (`b`) is k · n e4m3 codes and B (`a`) k · m codes, contiguous and 16-byte
            // aligned (check_lt_shape); D (also passed as C, which beta = 0 leaves unread) holds
            // m · n f32s; the workspace is `ws_bytes` bytes of device memory that only this lane's work on this
            // stream uses (null and 0 without one), at least what the algorithm needs (the
            // heuristic's limit); alpha and beta are host f32s read during the call. The
            // descriptors live until the call has queued the work.
            unsafe {
                lt::matmul(
                    handle.handle(),
                    desc.0,
                    (&alpha as *const f32).cast::<c_void>(),
                    (&beta as *const f32).cast::<c_void>(),
                    self.b as *const c_void,
                    a_l.0,
                    self.a as *const c_void,
                    b_l.0,
                    d.ptr() as *const c_void,
                    d_l.0,
                    d.ptr() as *mut c_void,
                    d_l.0,
                    &algo,
                    ws as *mut c_void,
                    ws_bytes,
                    stream as sys::cudaStream_t,
                )
            }
            .map_err(e)
        })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignments_of_addresses() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(512), 256);
        assert_eq!(alignment(256 + 16), 16);
        assert_eq!(alignment(4), 4);
        assert_eq!(alignment(7), 1);
    }
}
