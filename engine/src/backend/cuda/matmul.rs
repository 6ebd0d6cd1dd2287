//! Batched matmul through cuBLAS: f32 `sgemm`, f64 `dgemm` and bf16 `GemmEx` (f32 compute), all
//! strided-batched. cuBLAS is column-major, so the row-major `C[m, n] = A[m, k] B[k, n]` is run
//! as the column-major `Cᵀ[n, m] = Bᵀ[n, k] Aᵀ[k, m]`. A transposed operand view is expressed
//! with `op_T` and its leading dim; a view that no (op, ld) pair describes (neither inner stride
//! is 1, or rows overlap) is first copied to a contiguous buffer.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys};

use super::elementwise::fill;
use super::{check_extent, float_only, Contig, CudaStorage};
use crate::{DType, Error, Layout, Result};

/// How cuBLAS sees one operand: `Xᵀ` for the row-major `X[r, c]` of a batched view.
struct Operand {
    ptr: u64,
    op: sys::cublasOperation_t,
    ld: usize,
    batch_stride: usize,
    _hold: Option<Contig>,
}

/// `(op, ld)` giving `Xᵀ` (column-major `[c, r]`) for a row-major `X[r, c]` with strides
/// `(sr, sc)`, when one exists.
fn describe(r: usize, c: usize, sr: usize, sc: usize) -> Option<(sys::cublasOperation_t, usize)> {
    // Strides of size-1 dims are never used: pick ones that make the simplest description valid.
    let sc = if c == 1 { 1 } else { sc };
    let sr = if r == 1 { c.max(1) } else { sr };
    if sc == 1 && sr >= c.max(1) {
        // X[i, j] at i·sr + j: Xᵀ is column-major [c, r] with ld = sr.
        return Some((sys::cublasOperation_t::CUBLAS_OP_N, sr));
    }
    let (sr, sc) = (
        if r == 1 { 1 } else { sr },
        if c == 1 { r.max(1) } else { sc },
    );
    if sr == 1 && sc >= r.max(1) {
        // X[i, j] at i + j·sc: X is column-major [r, c] with ld = sc, so Xᵀ is op_T of it.
        return Some((sys::cublasOperation_t::CUBLAS_OP_T, sc));
    }
    None
}

fn operand(s: &CudaStorage, l: &Layout) -> Result<Operand> {
    let (d, st) = (l.dims(), l.strides());
    let batch_stride = if d[0] == 1 { 0 } else { st[0] };
    if let Some((op, ld)) = describe(d[1], d[2], st[1], st[2]) {
        return Ok(Operand {
            ptr: s.ptr_at(l.offset()),
            op,
            ld,
            batch_stride,
            _hold: None,
        });
    }
    let c = s.contiguous("matmul", l)?;
    Ok(Operand {
        ptr: c.ptr,
        op: sys::cublasOperation_t::CUBLAS_OP_N,
        ld: d[2].max(1),
        batch_stride: d[1] * d[2],
        _hold: Some(c),
    })
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid("matmul", format!("size {v} exceeds cuBLAS's 32-bit ints")))
}

pub(crate) fn matmul(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> Result<CudaStorage> {
    const OP: &str = "matmul";
    let (ld, rd) = (al.dims(), bl.dims());
    if ld.len() != 3 || rd.len() != 3 || ld[0] != rd[0] || ld[2] != rd[1] {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: al.shape().clone(),
            rhs: bl.shape().clone(),
        });
    }
    if a.dtype != b.dtype {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: a.dtype,
            rhs: b.dtype,
        });
    }
    float_only(OP, a.dtype)?;
    a.same_device(OP, b)?;
    check_extent(OP, al, a.len)?;
    check_extent(OP, bl, b.len)?;
    let (batch, m, k, n) = (ld[0], ld[1], ld[2], rd[2]);
    let dev = &a.dev;
    if batch * m * n == 0 {
        return CudaStorage::alloc(dev, OP, 0, a.dtype);
    }
    if k == 0 {
        return fill(dev, batch * m * n, a.dtype, 0.0);
    }
    let out = CudaStorage::alloc(dev, OP, batch * m * n, a.dtype)?;
    let (x, y) = (operand(a, al)?, operand(b, bl)?);
    let blas_h = dev.blas()?;
    let h = *blas_h.handle();
    dev.bind(OP)?;
    let (mi, ni, ki, bi) = (int(m)?, int(n)?, int(k)?, int(batch)?);
    let (ldy, ldx) = (int(y.ld)?, int(x.ld)?);
    let (sy, sx, sc) = (y.batch_stride as i64, x.batch_stride as i64, (m * n) as i64);
    let c = out.ptr();
    // SAFETY (all three arms): cuBLAS reads `batch` matrices of each operand at the strides and
    // leading dims `describe` derived from views that were checked to lie inside their buffers
    // (or from contiguous copies of them), and writes the contiguous [batch, m, n] output, which
    // `out` holds. The scalars live on the host (the handle's default pointer mode).
    let name = format!(
        "gemm {} {batch}x{m}x{k}x{n} {:?}{:?}",
        a.dtype, x.op as u32, y.op as u32
    );
    let r = super::launch::profiled(dev, &name, || {
        Ok(match a.dtype {
            DType::F32 => {
                let (alpha, beta) = (1.0f32, 0.0f32);
                unsafe {
                    blas::sgemm_strided_batched(
                        h,
                        y.op,
                        x.op,
                        ni,
                        mi,
                        ki,
                        &alpha,
                        y.ptr as *const f32,
                        ldy,
                        sy,
                        x.ptr as *const f32,
                        ldx,
                        sx,
                        &beta,
                        c as *mut f32,
                        ni,
                        sc,
                        bi,
                    )
                }
            }
            DType::F64 => {
                let (alpha, beta) = (1.0f64, 0.0f64);
                unsafe {
                    blas::dgemm_strided_batched(
                        h,
                        y.op,
                        x.op,
                        ni,
                        mi,
                        ki,
                        &alpha,
                        y.ptr as *const f64,
                        ldy,
                        sy,
                        x.ptr as *const f64,
                        ldx,
                        sx,
                        &beta,
                        c as *mut f64,
                        ni,
                        sc,
                        bi,
                    )
                }
            }
            _ => {
                let (alpha, beta) = (1.0f32, 0.0f32);
                let bf = sys::cudaDataType::CUDA_R_16BF;
                unsafe {
                    blas::gemm_strided_batched_ex(
                        h,
                        y.op,
                        x.op,
                        ni,
                        mi,
                        ki,
                        &alpha as *const f32 as *const c_void,
                        y.ptr as *const c_void,
                        bf,
                        ldy,
                        sy,
                        x.ptr as *const c_void,
                        bf,
                        ldx,
                        sx,
                        &beta as *const f32 as *const c_void,
                        c as *mut c_void,
                        bf,
                        ni,
                        sc,
                        bi,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
        })
    })?;
    r.map_err(|e| dev.err(OP, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};

    #[test]
    fn operand_descriptions() {
        // Contiguous [4, 3]: rows 3 apart.
        assert_eq!(describe(4, 3, 3, 1), Some((N, 3)));
        // Transposed view of a contiguous [3, 4].
        assert_eq!(describe(4, 3, 1, 4), Some((T, 4)));
        // Narrowed columns keep the row stride as ld.
        assert_eq!(describe(4, 2, 6, 1), Some((N, 6)));
        // Neither stride is 1, or rows overlap: not expressible.
        assert_eq!(describe(4, 3, 6, 2), None);
        assert_eq!(describe(4, 3, 0, 1), None);
        // A single row or column is always expressible.
        assert_eq!(describe(1, 5, 0, 1), Some((N, 5)));
        assert_eq!(describe(5, 1, 1, 7), Some((N, 1)));
    }
}
