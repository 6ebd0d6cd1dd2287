//! Fused cross-entropy CPU kernels, one task per row of logits.
//!
//! Logits are read in place through their layout (bf16 widened one element at a time, so no
//! f32 copy of a `[tokens, vocab]` matrix is ever made); f32 and bf16 logits compute in f32,
//! f64 logits in f64.

use rayon::prelude::*;

use super::simd::vectorized;
use super::{CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::{DType, Error, Layout, Result};

/// `(n, v)` of rank-2 logits, and the u32 targets `[n]`, each either `ignore` or below `bound`
/// (the row length `v` when `None`; the whole vocabulary for a chunk of it).
pub(crate) fn check(
    op: &'static str,
    l: &Layout,
    t: &CpuStorage,
    tl: &Layout,
    bound: Option<usize>,
    ignore: u32,
) -> Result<(usize, usize, Vec<u32>)> {
    if l.dims().len() != 2 {
        return Err(Error::RankMismatch {
            op,
            expected: 2,
            shape: l.shape().clone(),
        });
    }
    let (n, v) = (l.dims()[0], l.dims()[1]);
    if tl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: l.shape().clone(),
            rhs: tl.shape().clone(),
        });
    }
    let targets = t.view_u32(op, tl)?;
    let bound = bound.unwrap_or(v);
    if let Some(&bad) = targets
        .iter()
        .find(|&&x| x != ignore && x as usize >= bound)
    {
        return Err(Error::IndexOutOfRange {
            op,
            index: bad as usize,
            size: bound,
        });
    }
    Ok((n, v, targets))
}

/// `(max, Σ exp(x − max))` of one row, `x(j)` reading its element `j < v`.
pub(crate) fn row_stats<T: CpuFloat>(x: impl Fn(usize) -> T, v: usize) -> (T, T) {
    let m = (0..v).map(&x).fold(T::neg_infinity(), |a, b| a.max(b));
    let sum = (0..v).map(|j| (x(j) - m).fast_exp()).sum::<T>();
    (m, sum)
}

/// [`row_stats`] of a contiguous row, in 16 lanes (vectorises).
#[inline(always)]
pub(crate) fn row_stats_slice<S: Copy, T: CpuFloat>(row: &[S], conv: impl Fn(S) -> T) -> (T, T) {
    const L: usize = 16;
    let mut mx = [T::neg_infinity(); L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (a, &v) in mx.iter_mut().zip(c) {
            let v = conv(v);
            *a = if v > *a { v } else { *a };
        }
    }
    let rest = chunks.remainder();
    let m = rest
        .iter()
        .map(|&v| conv(v))
        .chain(mx)
        .fold(T::neg_infinity(), |a, b| a.max(b));
    let mut acc = [T::zero(); L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + (conv(v) - m).fast_exp();
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .map(|&v| (conv(v) - m).fast_exp())
        .sum::<T>();
    (m, acc.into_iter().sum::<T>() + tail)
}

/// `loss[r] = logsumexp(x[r]) − x[r, t[r]]`, 0 where `t[r] == ignore`.
fn ce_t<S: Copy + Sync, T: CpuFloat>(
    data: &[S],
    l: &Layout,
    conv: impl Fn(S) -> T + Sync + Send,
    targets: &[u32],
    ignore: u32,
) -> Vec<T> {
    let (n, v) = (l.dims()[0], l.dims()[1]);
    let (s0, s1, off) = (l.strides()[0], l.strides()[1], l.offset());
    let row = |r: usize| {
        let t = targets[r];
        if t == ignore {
            return T::zero();
        }
        let x = |j: usize| conv(data[off + r * s0 + j * s1]);
        let (m, sum) = if s1 == 1 {
            let row = &data[off + r * s0..off + r * s0 + v];
            vectorized(|| row_stats_slice(row, &conv))
        } else {
            row_stats(x, v)
        };
        m + sum.ln() - x(t as usize)
    };
    if n * v >= PAR_THRESHOLD {
        (0..n).into_par_iter().map(row).collect()
    } else {
        (0..n).map(row).collect()
    }
}

/// `dx[r, j] = (softmax(x[r])[j] − [j == t[r]]) · g[r]`, a zero row where `t[r] == ignore`.
fn ce_backward_t<S: Copy + Sync, T: CpuFloat>(
    data: &[S],
    l: &Layout,
    conv: impl Fn(S) -> T + Sync + Send,
    targets: &[u32],
    g: &[T],
    ignore: u32,
) -> Vec<T> {
    let (n, v) = (l.dims()[0], l.dims()[1]);
    let (s0, s1, off) = (l.strides()[0], l.strides()[1], l.offset());
    let mut out = vec![T::zero(); n * v]; // [n, v]
    if out.is_empty() {
        return out;
    }
    let body = |(r, o): (usize, &mut [T])| {
        let t = targets[r];
        if t == ignore {
            return;
        }
        let x = |j: usize| conv(data[off + r * s0 + j * s1]);
        if s1 == 1 {
            let row = &data[off + r * s0..off + r * s0 + v];
            vectorized(|| {
                let (m, sum) = row_stats_slice(row, &conv);
                let scale = g[r] / sum;
                for (o, &xv) in o.iter_mut().zip(row) {
                    *o = (conv(xv) - m).fast_exp() * scale;
                }
            });
        } else {
            let (m, sum) = row_stats(x, v);
            let scale = g[r] / sum;
            for (j, o) in o.iter_mut().enumerate() {
                *o = (x(j) - m).fast_exp() * scale;
            }
        }
        o[t as usize] = o[t as usize] - g[r];
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(v).enumerate().for_each(body);
    } else {
        out.chunks_mut(v).enumerate().for_each(body);
    }
    out
}

pub(super) fn cross_entropy(
    s: &CpuStorage,
    l: &Layout,
    t: &CpuStorage,
    tl: &Layout,
    ignore: u32,
) -> Result<CpuStorage> {
    const OP: &str = "cross_entropy";
    let (_, _, targets) = check(OP, l, t, tl, None, ignore)?;
    Ok(match s {
        CpuStorage::F32(d) => CpuStorage::F32(ce_t(d, l, |x| x, &targets, ignore)),
        CpuStorage::BF16(d) => CpuStorage::F32(ce_t(d, l, f32::from, &targets, ignore)),
        CpuStorage::F64(d) => CpuStorage::F64(ce_t(d, l, |x| x, &targets, ignore)),
        CpuStorage::U32(_) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
    })
}

pub(super) fn cross_entropy_backward(
    s: &CpuStorage,
    l: &Layout,
    t: &CpuStorage,
    tl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    ignore: u32,
) -> Result<CpuStorage> {
    const OP: &str = "cross_entropy_backward";
    let (n, _, targets) = check(OP, l, t, tl, None, ignore)?;
    if gl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: l.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    if g.dtype_() == DType::U32 {
        return Err(Error::UnsupportedDType {
            op: OP,
            dtype: DType::U32,
        });
    }
    Ok(match s {
        CpuStorage::F32(d) => {
            let g = g.view_f32(OP, gl)?; // [n]
            CpuStorage::F32(ce_backward_t(d, l, |x| x, &targets, &g, ignore))
        }
        CpuStorage::BF16(d) => {
            let g = g.view_f32(OP, gl)?; // [n]
            let dx = ce_backward_t(d, l, f32::from, &targets, &g, ignore);
            CpuStorage::bf16_from_f32(dx)
        }
        CpuStorage::F64(d) => {
            use crate::backend::BackendStorage;
            let g = g.to_f64_vec(gl)?; // [n]
            CpuStorage::F64(ce_backward_t(d, l, |x| x, &targets, &g, ignore))
        }
        CpuStorage::U32(_) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f64], v: usize, t: &[u32]) -> Vec<f64> {
        x.chunks(v)
            .zip(t)
            .map(|(row, &t)| {
                if t == u32::MAX {
                    return 0.0;
                }
                let lse = row.iter().map(|a| a.exp()).sum::<f64>().ln();
                lse - row[t as usize]
            })
            .collect()
    }

    #[test]
    fn forward_matches_naive_with_ignored_rows() {
        let (n, v) = (4, 5);
        let x: Vec<f64> = (0..n * v)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let t = vec![2, u32::MAX, 0, 4];
        let out = cross_entropy(
            &CpuStorage::F64(x.clone()),
            &Layout::contiguous([n, v]),
            &CpuStorage::U32(t.clone()),
            &Layout::contiguous([n]),
            u32::MAX,
        )
        .unwrap();
        let CpuStorage::F64(out) = out else {
            panic!("dtype")
        };
        for (a, b) in out.iter().zip(naive(&x, v, &t)) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(out[1], 0.0);
    }

    #[test]
    fn backward_rows_sum_to_zero_and_ignored_rows_are_zero() {
        let (n, v) = (3, 4);
        let x: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.7).sin()).collect();
        // Logits stored transposed: [v, n] buffer viewed as [n, v].
        let mut xt = vec![0.0f32; n * v];
        for r in 0..n {
            for j in 0..v {
                xt[j * n + r] = x[r * v + j];
            }
        }
        let l = Layout::contiguous([v, n]).transpose(0, 1);
        let dx = cross_entropy_backward(
            &CpuStorage::F32(xt),
            &l,
            &CpuStorage::U32(vec![1, 7, 3]),
            &Layout::contiguous([n]),
            &CpuStorage::F32(vec![0.5, 2.0, -1.0]),
            &Layout::contiguous([n]),
            7,
        )
        .unwrap();
        let CpuStorage::F32(dx) = dx else {
            panic!("dtype")
        };
        for r in 0..n {
            let s: f32 = dx[r * v..(r + 1) * v].iter().sum();
            assert!(s.abs() < 1e-6);
        }
        assert!(dx[v..2 * v].iter().all(|&d| d == 0.0));
        assert!(dx[1] < 0.0 && dx[0] > 0.0);
    }

    #[test]
    fn target_out_of_range_is_an_error() {
        let err = cross_entropy(
            &CpuStorage::F32(vec![0.0; 6]),
            &Layout::contiguous([2, 3]),
            &CpuStorage::U32(vec![0, 3]),
            &Layout::contiguous([2]),
            u32::MAX,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::IndexOutOfRange {
                index: 3,
                size: 3,
                ..
            }
        ));
    }
}
