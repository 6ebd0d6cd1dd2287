//! Rotary position embedding (Hugging Face half-rotation layout) on the CPU. f32 and f64 run
//! natively; bf16 is widened to f32 and the output rounded once.

use rayon::prelude::*;

use super::{contig, dtype_mismatch, CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::{Layout, Result, Shape};

/// `x: [b, n1, n2, d]` (any strides) with positions along dim `seq_dim` of the 6 `dims`;
/// `cos`, `sin`: contiguous `[bc, t, d/2]`. Output contiguous `[b, n1, n2, d]`:
/// `o[i] = x[i] c − x[i+d/2] s`, `o[i+d/2] = x[i+d/2] c + x[i] s`.
fn rope_t<T: CpuFloat>(x: &[T], l: &Layout, cos: &[T], sin: &[T], dims: [usize; 6]) -> Vec<T> {
    let [b, n1, n2, d, bc, seq_dim] = dims;
    let mut out = vec![T::zero(); b * n1 * n2 * d]; // [b, n1, n2, d]
    if out.is_empty() {
        return out;
    }
    let half = d / 2;
    let t = if seq_dim == 1 { n1 } else { n2 };
    let (st, off) = (l.strides(), l.offset());
    let row = |(r, o): (usize, &mut [T])| {
        let (i2, i1, bi) = (r % n2, (r / n2) % n1, r / (n1 * n2));
        let ti = if seq_dim == 1 { i1 } else { i2 };
        let base = off + bi * st[0] + i1 * st[1] + i2 * st[2];
        let tb = ((if bc == 1 { 0 } else { bi }) * t + ti) * half;
        let (c, s) = (&cos[tb..tb + half], &sin[tb..tb + half]);
        let sd = st[3];
        let (lo, hi_) = o.split_at_mut(half);
        for i in 0..half {
            let x1 = x[base + i * sd];
            let x2 = x[base + (i + half) * sd];
            lo[i] = x1 * c[i] - x2 * s[i];
            hi_[i] = x2 * c[i] + x1 * s[i];
        }
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(d).enumerate().for_each(row);
    } else {
        out.chunks_mut(d).enumerate().for_each(row);
    }
    out
}

pub(super) fn rope(
    x: &CpuStorage,
    l: &Layout,
    cos: &CpuStorage,
    cl: &Layout,
    sin: &CpuStorage,
    sl: &Layout,
    seq_dim: usize,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    let dims = crate::backend::checks::rope_dims(l, cl, sl, seq_dim)?;
    Ok(match (x, cos, sin) {
        (S::F32(xv), S::F32(c), S::F32(s)) => {
            S::F32(rope_t(xv, l, &contig(c, cl), &contig(s, sl), dims))
        }
        (S::F64(xv), S::F64(c), S::F64(s)) => {
            S::F64(rope_t(xv, l, &contig(c, cl), &contig(s, sl), dims))
        }
        (S::BF16(_), S::BF16(_), S::BF16(_)) => {
            let xf = x.view_f32("rope", l)?; // [b, n1, n2, d] contiguous
            let xl = Layout::contiguous(Shape::from(l.dims()));
            let c = cos.view_f32("rope", cl)?; // [bc, t, d/2]
            let s = sin.view_f32("rope", sl)?; // [bc, t, d/2]
            S::bf16_from_f32(rope_t(&xf, &xl, &c, &s, dims))
        }
        _ if x.dtype_() != cos.dtype_() => return Err(dtype_mismatch("rope", x, cos)),
        _ => return Err(dtype_mismatch("rope", x, sin)),
    })
}
