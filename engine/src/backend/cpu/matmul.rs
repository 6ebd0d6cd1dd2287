//! Batched matmul through the `gemm` crate, which takes arbitrary row and column strides: a
//! transposed operand is just a view, never copied. bf16 operands are widened to f32 once, so
//! products accumulate in f32.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::CpuStorage;
use crate::{Error, Layout, Result};

/// Shapes of one batched product: `[b, m, k] x [b, k, n]`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    m: usize,
    n: usize,
    k: usize,
}

fn dims(l: &Layout, r: &Layout) -> Result<Dims> {
    let (ld, rd) = (l.dims(), r.dims());
    if ld.len() != 3 || rd.len() != 3 || ld[0] != rd[0] || ld[2] != rd[1] {
        return Err(Error::ShapeMismatch {
            op: "matmul",
            lhs: l.shape().clone(),
            rhs: r.shape().clone(),
        });
    }
    Ok(Dims {
        b: ld[0],
        m: ld[1],
        k: ld[2],
        n: rd[2],
    })
}

/// A raw pointer that may cross threads; each task writes a disjoint output block.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used to hand disjoint output slices (one batch each) to rayon tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

pub(crate) fn matmul_t<
    T: Copy + Default + Send + Sync + 'static + num_traits::Zero + num_traits::One,
>(
    a: &[T],
    al: &Layout,
    b: &[T],
    bl: &Layout,
) -> Result<Vec<T>> {
    let d = dims(al, bl)?;
    if al.max_extent() > a.len() || bl.max_extent() > b.len() {
        return Err(Error::invalid("matmul", "operand view exceeds its buffer"));
    }
    let mut out = vec![T::default(); d.b * d.m * d.n];
    if d.m == 0 || d.n == 0 {
        return Ok(out);
    }
    let (a_s, b_s) = (al.strides(), bl.strides());
    let flops = 2 * d.m * d.n * d.k;
    let threads = rayon::current_num_threads();
    // Many small products (attention heads): one thread per product. Few large ones: gemm's own
    // parallelism inside each.
    let per_batch_par = d.b >= threads && flops < (1 << 24);
    let inner = if per_batch_par || flops < (1 << 18) {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |i: usize| {
        let o = out_ptr;
        // SAFETY: the lhs/rhs views were checked to lie inside their buffers (max_extent), every
        // offset below is within them; batch `i` writes only out[i*m*n .. (i+1)*m*n], which no
        // other task touches; strides are element strides of valid views.
        unsafe {
            gemm(
                d.m,
                d.n,
                d.k,
                o.0.add(i * d.m * d.n),
                1,
                d.n as isize,
                false,
                a.as_ptr().add(al.offset() + i * a_s[0]),
                a_s[2] as isize,
                a_s[1] as isize,
                b.as_ptr().add(bl.offset() + i * b_s[0]),
                b_s[2] as isize,
                b_s[1] as isize,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                inner,
            )
        }
    };
    if per_batch_par {
        (0..d.b).into_par_iter().for_each(run);
    } else {
        (0..d.b).for_each(run);
    }
    Ok(out)
}

/// `matmul b×m×k·k×n` with each operand's layout (`N`: row-major, `T`: column-major, `S`: other).
pub(super) fn profile_key(l: &Layout, r: &Layout) -> String {
    let kind = |l: &Layout| match l.strides() {
        [_, _, 1] => 'N',
        [_, 1, _] => 'T',
        _ => 'S',
    };
    let (a, b) = (l.dims(), r.dims());
    let dims = |i: usize| a.get(i).copied().unwrap_or(0);
    format!(
        "matmul {}x{}x{}x{} {}{}",
        dims(0),
        dims(1),
        dims(2),
        b.get(2).copied().unwrap_or(0),
        kind(l),
        kind(r)
    )
}

pub(super) fn matmul(
    s: &CpuStorage,
    l: &Layout,
    rhs: &CpuStorage,
    rl: &Layout,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    match (s, rhs) {
        (S::F32(a), S::F32(b)) => Ok(S::F32(matmul_t(a, l, b, rl)?)),
        (S::F64(a), S::F64(b)) => Ok(S::F64(matmul_t(a, l, b, rl)?)),
        (S::BF16(_), S::BF16(_)) => {
            let (a, b) = (s.view_f32("matmul", l)?, rhs.view_f32("matmul", rl)?);
            let (cl, cr) = (
                Layout::contiguous(l.shape().clone()),
                Layout::contiguous(rl.shape().clone()),
            );
            Ok(S::bf16_from_f32(matmul_t(&a, &cl, &b, &cr)?))
        }
        (S::U32(_), _) | (_, S::U32(_)) => Err(Error::UnsupportedDType {
            op: "matmul",
            dtype: crate::DType::U32,
        }),
        _ => Err(Error::DTypeMismatch {
            op: "matmul",
            lhs: s.dtype_(),
            rhs: rhs.dtype_(),
        }),
    }
}
