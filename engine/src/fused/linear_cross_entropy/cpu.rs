//! The chunked linear cross-entropy's primitives on the CPU, the reference: an online
//! log-sum-exp update per chunk of logits, and the fused gradient of one chunk. One task per row;
//! logits are read in place through their rank-2 layout; f32 and bf16 logits compute in f32, f64
//! logits in f64.

use rayon::prelude::*;

use super::primitives::{ChunkBackward, ChunkUpdate};
use crate::backend::cpu::cross_entropy::{check, row_stats, row_stats_slice};
use crate::backend::cpu::simd::vectorized;
use crate::backend::cpu::{CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::BackendStorage;
use crate::fused::Operand;
use crate::{DType, Error, Layout, Result};

/// Folds chunk `x` `[n, c]` into `state` `[n, 3]` = (max, Σ exp(x − max), target logit).
#[allow(clippy::too_many_arguments)]
fn update_t<S: Copy + Sync, T: CpuFloat>(
    data: &[S],
    l: &Layout,
    conv: impl Fn(S) -> T + Sync + Send,
    targets: &[u32],
    state: &mut [T],
    v0: usize,
    ignore: u32,
) {
    let (n, c) = (l.dims()[0], l.dims()[1]);
    let (s0, s1, off) = (l.strides()[0], l.strides()[1], l.offset());
    let body = |(r, st): (usize, &mut [T])| {
        if c == 0 {
            return;
        }
        let x = |j: usize| conv(data[off + r * s0 + j * s1]);
        let (cm, cs) = if s1 == 1 {
            let row = &data[off + r * s0..off + r * s0 + c];
            vectorized(|| row_stats_slice(row, &conv))
        } else {
            row_stats(x, c)
        };
        let (m, s) = (st[0], st[1]);
        let mx = m.max(cm);
        // exp(−∞ − finite) = 0: the first chunk just takes its own statistics.
        st[0] = mx;
        st[1] = s * (m - mx).exp() + cs * (cm - mx).exp();
        let t = targets[r];
        if t != ignore && (t as usize) >= v0 && (t as usize) < v0 + c {
            st[2] = x(t as usize - v0);
        }
    };
    if n * c >= PAR_THRESHOLD {
        state.par_chunks_mut(3).enumerate().for_each(body);
    } else {
        state.chunks_mut(3).enumerate().for_each(body);
    }
}

/// `dx[r, j] = (exp(x[r, j] − lse[r]) − [v0 + j == t[r]]) · g[r]`, zero rows where ignored.
#[allow(clippy::too_many_arguments)]
fn backward_t<S: Copy + Sync, T: CpuFloat>(
    data: &[S],
    l: &Layout,
    conv: impl Fn(S) -> T + Sync + Send,
    targets: &[u32],
    lse: &[T],
    g: &[T],
    v0: usize,
    ignore: u32,
) -> Vec<T> {
    let (n, c) = (l.dims()[0], l.dims()[1]);
    let (s0, s1, off) = (l.strides()[0], l.strides()[1], l.offset());
    let mut out = vec![T::zero(); n * c]; // [n, c]
    if out.is_empty() {
        return out;
    }
    let body = |(r, o): (usize, &mut [T])| {
        let t = targets[r];
        if t == ignore {
            return;
        }
        let (lr, gr) = (lse[r], g[r]);
        if s1 == 1 {
            let row = &data[off + r * s0..off + r * s0 + c];
            vectorized(|| {
                for (o, &xv) in o.iter_mut().zip(row) {
                    *o = (conv(xv) - lr).fast_exp() * gr;
                }
            });
        } else {
            for (j, o) in o.iter_mut().enumerate() {
                *o = (conv(data[off + r * s0 + j * s1]) - lr).fast_exp() * gr;
            }
        }
        let t = t as usize;
        if t >= v0 && t < v0 + c {
            o[t - v0] = o[t - v0] - gr;
        }
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(c).enumerate().for_each(body);
    } else {
        out.chunks_mut(c).enumerate().for_each(body);
    }
    out
}

pub(super) fn chunk_update(
    o: ChunkUpdate<'_, CpuStorage>,
    v0: usize,
    v_total: usize,
    ignore: u32,
) -> Result<()> {
    const OP: &str = "cross_entropy_chunk_update";
    let (Operand { s: x, l }, Operand { s: t, l: tl }) = (o.x, o.targets);
    let state = o.state.s;
    let (n, _, targets) = check(OP, l, t, tl, Some(v_total), ignore)?;
    if state.len() != 3 * n {
        return Err(Error::invalid(
            OP,
            format!("state of {} elements for {n} rows (3 per row)", state.len()),
        ));
    }
    let sd = state.dtype();
    let bad = || Error::DTypeMismatch {
        op: OP,
        lhs: x.dtype(),
        rhs: sd,
    };
    match (x, state) {
        (CpuStorage::F32(d), CpuStorage::F32(s)) => update_t(d, l, |x| x, &targets, s, v0, ignore),
        (CpuStorage::BF16(d), CpuStorage::F32(s)) => {
            update_t(d, l, f32::from, &targets, s, v0, ignore)
        }
        (CpuStorage::F64(d), CpuStorage::F64(s)) => update_t(d, l, |x| x, &targets, s, v0, ignore),
        (CpuStorage::U32(_), _) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
        _ => return Err(bad()),
    }
    Ok(())
}

pub(super) fn chunk_backward(
    o: ChunkBackward<'_, CpuStorage>,
    v0: usize,
    ignore: u32,
) -> Result<CpuStorage> {
    const OP: &str = "cross_entropy_chunk_backward";
    let (Operand { s: x, l }, Operand { s: t, l: tl }) = (o.x, o.targets);
    let (Operand { s: lse, l: lse_l }, Operand { s: g, l: gl }) = (o.lse, o.grad_rows);
    // Targets are checked against the full vocabulary by the forward; here only the shape.
    let (n, _, targets) = check(OP, l, t, tl, Some(usize::MAX), ignore)?;
    for sl in [lse_l, gl] {
        if sl.dims() != [n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: l.shape().clone(),
                rhs: sl.shape().clone(),
            });
        }
    }
    for s in [lse, g] {
        if s.dtype() == DType::U32 {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            });
        }
    }
    Ok(match x {
        CpuStorage::F32(d) => {
            let (lse, g) = (lse.view_f32(OP, lse_l)?, g.view_f32(OP, gl)?); // [n]
            CpuStorage::F32(backward_t(d, l, |x| x, &targets, &lse, &g, v0, ignore))
        }
        CpuStorage::BF16(d) => {
            let (lse, g) = (lse.view_f32(OP, lse_l)?, g.view_f32(OP, gl)?); // [n]
            let dx = backward_t(d, l, f32::from, &targets, &lse, &g, v0, ignore);
            CpuStorage::bf16_from_f32(dx)
        }
        CpuStorage::F64(d) => {
            let (lse, g) = (lse.to_f64_vec(lse_l)?, g.to_f64_vec(gl)?); // [n]
            CpuStorage::F64(backward_t(d, l, |x| x, &targets, &lse, &g, v0, ignore))
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
    use crate::fused::OperandMut;

    /// Two chunks folded in give the log-sum-exp of the whole row and pick the target logit.
    #[test]
    fn two_chunks_give_the_row_logsumexp() {
        let (n, v) = (3, 7);
        let x: Vec<f64> = (0..n * v)
            .map(|i| ((i * 13 % 17) as f64 - 8.0) / 2.5)
            .collect();
        let t = vec![5u32, u32::MAX, 0];
        let mut st = CpuStorage::F64((0..n).flat_map(|_| [f64::NEG_INFINITY, 0.0, 0.0]).collect());
        let full = Layout::contiguous([n, v]);
        for (v0, c) in [(0, 4), (4, 3)] {
            let l = full.narrow(1, v0, c);
            let (xs, ts) = (CpuStorage::F64(x.clone()), CpuStorage::U32(t.clone()));
            let o = ChunkUpdate {
                x: Operand { s: &xs, l: &l },
                targets: Operand {
                    s: &ts,
                    l: &Layout::contiguous([n]),
                },
                state: OperandMut {
                    s: &mut st,
                    l: &Layout::contiguous([n, 3]),
                },
            };
            chunk_update(o, v0, v, u32::MAX).unwrap();
        }
        let CpuStorage::F64(st) = st else {
            panic!("dtype")
        };
        for r in 0..n {
            let row = &x[r * v..(r + 1) * v];
            let lse = row.iter().map(|a| a.exp()).sum::<f64>().ln();
            assert!((st[3 * r] + st[3 * r + 1].ln() - lse).abs() < 1e-12);
        }
        assert_eq!(st[2], x[5]);
        assert_eq!(st[5], 0.0);
        assert_eq!(st[8], x[2 * v]);
    }

    #[test]
    fn target_beyond_the_vocabulary_is_an_error() {
        let mut st = CpuStorage::F32(vec![f32::NEG_INFINITY, 0.0, 0.0]);
        let (xs, ts) = (CpuStorage::F32(vec![0.5; 4]), CpuStorage::U32(vec![9]));
        let o = ChunkUpdate {
            x: Operand {
                s: &xs,
                l: &Layout::contiguous([1, 4]),
            },
            targets: Operand {
                s: &ts,
                l: &Layout::contiguous([1]),
            },
            state: OperandMut {
                s: &mut st,
                l: &Layout::contiguous([1, 3]),
            },
        };
        let err = chunk_update(o, 0, 8, u32::MAX).unwrap_err();
        assert!(matches!(
            err,
            Error::IndexOutOfRange {
                index: 9,
                size: 8,
                ..
            }
        ));
    }
}
