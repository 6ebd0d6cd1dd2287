//! RMSNorm (forward and fused backward) on the CPU. f32 and f64 run natively; bf16 is widened to
//! f32, so its statistics are f32 and the output is rounded once.

use rayon::prelude::*;

use super::{contig, dtype_mismatch, CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::{Error, Layout, Result, WithDType};

fn cst<T: CpuFloat>(v: f64) -> T {
    <T as WithDType>::from_f64(v)
}

/// Rows handed to one rayon task: a few tasks per thread.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// Checks `x: [.., n]` against `w: [n]` and returns `n`.
fn norm_dims(op: &'static str, l: &Layout, wl: &Layout) -> Result<usize> {
    let n = match l.dims().last() {
        Some(&n) => n,
        None => {
            return Err(Error::RankMismatch {
                op,
                expected: 1,
                shape: l.shape().clone(),
            })
        }
    };
    if wl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: l.shape().clone(),
            rhs: wl.shape().clone(),
        });
    }
    Ok(n)
}

// ----- RMSNorm forward ---------------------------------------------------------------------

/// `y = x · r · w` per row, `r = 1 / sqrt(mean(x²) + eps)`. `x: [rows, n]`, `w: [n]`.
fn rms_norm_t<T: CpuFloat>(x: &[T], w: &[T], n: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()]; // [rows, n]
    if n == 0 || x.is_empty() {
        return out;
    }
    let (eps, n_inv) = (cst::<T>(eps), cst::<T>(1.0 / n as f64));
    let row = |(o, x): (&mut [T], &[T])| {
        let ms = x.iter().fold(T::zero(), |a, &v| a + v * v) * n_inv;
        let r = (ms + eps).sqrt().recip();
        for ((o, &v), &wi) in o.iter_mut().zip(x).zip(w) {
            *o = v * r * wi;
        }
    };
    if x.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(row);
    } else {
        out.chunks_mut(n).zip(x.chunks(n)).for_each(row);
    }
    out
}

pub(super) fn rms_norm(
    x: &CpuStorage,
    l: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    let n = norm_dims("rms_norm", l, wl)?;
    Ok(match (x, w) {
        (S::F32(xv), S::F32(wv)) => S::F32(rms_norm_t(&contig(xv, l), &contig(wv, wl), n, eps)),
        (S::F64(xv), S::F64(wv)) => S::F64(rms_norm_t(&contig(xv, l), &contig(wv, wl), n, eps)),
        (S::BF16(_), S::BF16(_)) => {
            let xf = x.view_f32("rms_norm", l)?; // [rows, n] f32
            let wf = w.view_f32("rms_norm", wl)?; // [n] f32
            S::bf16_from_f32(rms_norm_t(&xf, &wf, n, eps))
        }
        _ => return Err(dtype_mismatch("rms_norm", x, w)),
    })
}

// ----- RMSNorm backward --------------------------------------------------------------------

/// Fused RMSNorm backward. With `r = (mean(x²) + eps)^(-1/2)` per row and `y_i = x_i r w_i`:
///
/// `∂r/∂x_j = −r³ x_j / n`, so
/// `dx_j = Σ_i g_i w_i (r δ_ij − r³ x_i x_j / n) = r g_j w_j − (r³ / n) x_j Σ_i g_i w_i x_i`,
/// `dw_i = Σ_rows g_i x_i r`.
///
/// `x`, `g`: `[rows, n]`; `w`: `[n]`. Row statistics are in `T`; `dw` sums rows in f64.
fn rms_norm_backward_t<T: CpuFloat>(
    x: &[T],
    w: &[T],
    g: &[T],
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::zero(); x.len()]; // [rows, n]
    if n == 0 || x.is_empty() {
        return (dx, vec![T::zero(); n]);
    }
    let (eps, n_inv) = (cst::<T>(eps), cst::<T>(1.0 / n as f64));
    // One row: writes dx, adds the row's share of dw into `dw` ([n] f64).
    let row = |i: usize, dxr: &mut [T], dw: &mut [f64]| {
        let (xr, gr) = (&x[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
        let ms = xr.iter().fold(T::zero(), |a, &v| a + v * v) * n_inv;
        let r = (ms + eps).sqrt().recip();
        let dot = xr
            .iter()
            .zip(gr)
            .zip(w)
            .fold(T::zero(), |a, ((&xv, &gv), &wv)| a + gv * wv * xv);
        let c = r * r * r * n_inv * dot;
        for j in 0..n {
            dxr[j] = r * gr[j] * w[j] - c * xr[j];
            dw[j] += (gr[j] * xr[j] * r).to_f64();
        }
    };
    let rows = x.len() / n;
    let dw: Vec<f64> = if x.len() >= PAR_THRESHOLD {
        let per = rows_per_task(rows);
        dx.par_chunks_mut(per * n)
            .enumerate()
            .map(|(c, dxc)| {
                let mut acc = vec![0.0f64; n];
                for (k, dxr) in dxc.chunks_mut(n).enumerate() {
                    row(c * per + k, dxr, &mut acc);
                }
                acc
            })
            .reduce(
                || vec![0.0f64; n],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    } else {
        let mut acc = vec![0.0f64; n];
        for (i, dxr) in dx.chunks_mut(n).enumerate() {
            row(i, dxr, &mut acc);
        }
        acc
    };
    (dx, dw.into_iter().map(cst::<T>).collect())
}

pub(super) fn rms_norm_backward(
    x: &CpuStorage,
    l: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, CpuStorage)> {
    use CpuStorage as S;
    const OP: &str = "rms_norm_backward";
    let n = norm_dims(OP, l, wl)?;
    if gl.shape() != l.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: l.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    Ok(match (x, w, g) {
        (S::F32(xv), S::F32(wv), S::F32(gv)) => {
            let (dx, dw) =
                rms_norm_backward_t(&contig(xv, l), &contig(wv, wl), &contig(gv, gl), n, eps);
            (S::F32(dx), S::F32(dw))
        }
        (S::F64(xv), S::F64(wv), S::F64(gv)) => {
            let (dx, dw) =
                rms_norm_backward_t(&contig(xv, l), &contig(wv, wl), &contig(gv, gl), n, eps);
            (S::F64(dx), S::F64(dw))
        }
        (S::BF16(_), S::BF16(_), S::BF16(_)) => {
            let xf = x.view_f32(OP, l)?; // [rows, n]
            let wf = w.view_f32(OP, wl)?; // [n]
            let gf = g.view_f32(OP, gl)?; // [rows, n]
            let (dx, dw) = rms_norm_backward_t(&xf, &wf, &gf, n, eps);
            (S::bf16_from_f32(dx), S::bf16_from_f32(dw))
        }
        _ if x.dtype_() != w.dtype_() => return Err(dtype_mismatch(OP, x, w)),
        _ => return Err(dtype_mismatch(OP, x, g)),
    })
}
