//! Softmax on the CPU: softmax and log-softmax over the last dim, the causal, key-masked (or
//! segment-masked), scaled softmax of attention scores in one pass per row, and the fused softmax
//! backward. f32 and f64 run natively; bf16 is widened to f32 (statistics in f32, the output
//! rounded once).

use rayon::prelude::*;

use super::simd::{lane_max, lane_sum, vectorized};
use super::{contig, float_kernel, CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::checks::{causal_softmax_dims, softmax_backward_dims};
use crate::{DType, Error, Layout, Result};

/// Runs `row(r, out_row)` over the `n`-wide rows of `out`, a few blocks of rows per thread when
/// `out` is large enough, each block in an AVX2 + FMA function when the CPU has them.
fn for_rows<T: Send>(out: &mut [T], n: usize, row: impl Fn(usize, &mut [T]) + Sync + Send) {
    if out.is_empty() || n == 0 {
        return;
    }
    let rows = out.len() / n;
    let per = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let block = |(c, o): (usize, &mut [T])| {
        vectorized(|| {
            for (k, r) in o.chunks_mut(n).enumerate() {
                row(c * per + k, r);
            }
        })
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(per * n).enumerate().for_each(block);
    } else {
        out.chunks_mut(per * n).enumerate().for_each(block);
    }
}

/// Number of keys `0 .. limit` that query `i` may see by causality: `min(s, q_offset + i + 1)`.
#[inline(always)]
fn causal_limit(s: usize, q_offset: usize, i: usize) -> usize {
    s.min(q_offset.saturating_add(i).saturating_add(1))
}

/// `x: [b, h, t, s]` contiguous, `mask: [b, s]` contiguous (0 padding, else a segment id). Per
/// row `(bi, hi, i)`, with `p = q_offset + i` and the query's segment `sq = mask[bi, p]` (0 when
/// `p >= s`): over the keys `j < limit` with `mask[bi, j] != 0` and, when `sq != 0`,
/// `mask[bi, j] == sq`, `y = exp(scale·x − m) / Σ exp(scale·x − m)`; `y = 0` elsewhere, and on
/// the whole row when no key is visible (`m = −∞`). Masked scores are never used (a NaN there
/// does not propagate); keys past the causal limit are never read.
fn causal_softmax_t<T: CpuFloat>(
    x: &[T],
    [_, h, t, s]: [usize; 4],
    scale: f64,
    q_offset: usize,
    mask: Option<&[u32]>,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()]; // [b, h, t, s]
    let scale = T::from_f64(scale);
    for_rows(&mut out, s, |r, o| {
        let (i, bi) = (r % t, r / (h * t));
        let lim = causal_limit(s, q_offset, i);
        let (xr, o) = (&x[r * s..r * s + lim], &mut o[..lim]); // o[lim..] stays 0
        match mask {
            None => o.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * scale),
            Some(m) => {
                let m = &m[bi * s..bi * s + s];
                let sq = m.get(q_offset.saturating_add(i)).copied().unwrap_or(0);
                for ((o, &v), &k) in o.iter_mut().zip(xr).zip(&m[..lim]) {
                    let visible = k != 0 && (sq == 0 || k == sq);
                    *o = if visible {
                        v * scale
                    } else {
                        T::neg_infinity()
                    };
                }
            }
        }
        let mx = lane_max(o);
        if mx == T::neg_infinity() {
            // No visible key: a padding query, all zero.
            o.iter_mut().for_each(|v| *v = T::zero());
            return;
        }
        // exp(−∞) = 0 at masked keys.
        o.iter_mut().for_each(|v| *v = (*v - mx).fast_exp());
        let inv = lane_sum(o).recip();
        o.iter_mut().for_each(|v| *v = *v * inv);
    });
    out
}

pub(super) fn causal_softmax(
    x: &CpuStorage,
    l: &Layout,
    scale: f64,
    q_offset: usize,
    key_mask: Option<(&CpuStorage, &Layout)>,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    const OP: &str = "causal_softmax";
    let dims = causal_softmax_dims(OP, l, key_mask.map(|(m, ml)| (m.dtype_(), ml)))?;
    let mask = key_mask.map(|(m, ml)| m.view_u32(OP, ml)).transpose()?; // [b, s]
    let mask = mask.as_deref();
    Ok(match x {
        S::F32(v) => S::F32(causal_softmax_t(&contig(v, l), dims, scale, q_offset, mask)),
        S::F64(v) => S::F64(causal_softmax_t(&contig(v, l), dims, scale, q_offset, mask)),
        S::BF16(_) => {
            let xf = x.view_f32(OP, l)?; // [b, h, t, s] f32
            S::bf16_from_f32(causal_softmax_t(&xf, dims, scale, q_offset, mask))
        }
        S::U32(_) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
    })
}

/// `Σ a ⊙ b` in 16 interleaved lanes (vectorises).
#[inline(always)]
fn lane_dot<T: CpuFloat>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s = *s + x * y;
        }
    }
    let tail = ra.iter().zip(rb).fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(T::zero(), |s, &v| s + v) + tail
}

/// `y`, `g`: `[rows, n]` contiguous. `dx = scale · y ⊙ (g − Σ_j g ⊙ y)` per row.
fn softmax_backward_t<T: CpuFloat>(y: &[T], g: &[T], n: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()]; // [rows, n]
    let scale = T::from_f64(scale);
    for_rows(&mut dx, n, |r, o| {
        let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let dot = lane_dot(yr, gr);
        for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
            *o = scale * yv * (gv - dot);
        }
    });
    dx
}

pub(super) fn softmax_backward(
    y: &CpuStorage,
    l: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    scale: f64,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    const OP: &str = "softmax_backward";
    let n = softmax_backward_dims(OP, l, gl)?;
    Ok(match (y, g) {
        (S::F32(yv), S::F32(gv)) => S::F32(softmax_backward_t(
            &contig(yv, l),
            &contig(gv, gl),
            n,
            scale,
        )),
        (S::F64(yv), S::F64(gv)) => S::F64(softmax_backward_t(
            &contig(yv, l),
            &contig(gv, gl),
            n,
            scale,
        )),
        (S::BF16(_), S::BF16(_)) => {
            let yf = y.view_f32(OP, l)?; // [rows, n] f32
            let gf = g.view_f32(OP, gl)?; // [rows, n] f32
            S::bf16_from_f32(softmax_backward_t(&yf, &gf, n, scale))
        }
        (S::U32(_), _) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
        _ => {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: y.dtype_(),
                rhs: g.dtype_(),
            })
        }
    })
}

/// Applies `f` to every row of the last dim of a contiguous copy of the view.
fn map_rows<T: CpuFloat>(
    data: &[T],
    l: &Layout,
    f: impl Fn(&[T], &mut [T]) + Sync + Send,
) -> Vec<T> {
    let src = CpuStorage::gather_view(data, l);
    let n = l.dims().last().copied().unwrap_or(1).max(1);
    let mut out = vec![T::zero(); src.len()];
    // Rows in blocks, a few blocks per thread.
    let rows = src.len() / n;
    let per = rows.div_ceil(4 * rayon::current_num_threads()).max(1) * n;
    let block = |(o, x): (&mut [T], &[T])| {
        vectorized(|| o.chunks_mut(n).zip(x.chunks(n)).for_each(|(o, x)| f(x, o)))
    };
    if src.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(per)
            .zip(src.par_chunks(per))
            .for_each(block);
    } else {
        block((&mut out, &src));
    }
    out
}

#[inline(always)]
fn softmax_row<T: CpuFloat>(x: &[T], o: &mut [T]) {
    let m = lane_max(x);
    for (o, &v) in o.iter_mut().zip(x) {
        *o = (v - m).fast_exp();
    }
    let inv = lane_sum(o).recip();
    o.iter_mut().for_each(|v| *v = *v * inv);
}

#[inline(always)]
fn log_softmax_row<T: CpuFloat>(x: &[T], o: &mut [T]) {
    let m = lane_max(x);
    for (o, &v) in o.iter_mut().zip(x) {
        *o = (v - m).fast_exp();
    }
    let lse = m + lane_sum(o).ln();
    for (o, &v) in o.iter_mut().zip(x) {
        *o = v - lse;
    }
}

fn softmax_t<T: CpuFloat>(data: &[T], l: &Layout) -> Vec<T> {
    map_rows(data, l, softmax_row)
}

fn log_softmax_t<T: CpuFloat>(data: &[T], l: &Layout) -> Vec<T> {
    map_rows(data, l, log_softmax_row)
}

pub(super) fn softmax_last_dim(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    float_kernel!("softmax", s, l, |d, ll| softmax_t(d, ll))
}

pub(super) fn log_softmax_last_dim(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    float_kernel!("log_softmax", s, l, |d, ll| log_softmax_t(d, ll))
}
