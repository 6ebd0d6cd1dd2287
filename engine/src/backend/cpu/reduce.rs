//! Reductions over one dim.

use rayon::prelude::*;

use super::simd::vectorized;
use super::{float_kernel, CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::ReduceOp;
use crate::{Error, Layout, Result};

/// Start offsets of every reduction row of `dim`, in row-major order of the output.
fn row_starts(l: &Layout, dim: usize) -> Vec<usize> {
    l.narrow(dim, 0, 1).strided_indices().collect()
}

fn reduce_rows<T: Copy + Send + Sync, O: Send>(
    data: &[T],
    l: &Layout,
    dim: usize,
    f: impl Fn(&mut dyn Iterator<Item = T>) -> O + Sync + Send,
) -> Vec<O> {
    let starts = row_starts(l, dim);
    let (len, stride) = (l.dims()[dim], l.strides()[dim]);
    let one = |&s: &usize| f(&mut (0..len).map(|j| data[s + j * stride]));
    if starts.len() * len >= PAR_THRESHOLD {
        starts.par_iter().map(one).collect()
    } else {
        starts.iter().map(one).collect()
    }
}

/// Index of the first largest (`max`) or smallest element.
fn arg_best<T: PartialOrd + Copy>(it: &mut dyn Iterator<Item = T>, max: bool) -> u32 {
    let mut best: Option<(usize, T)> = None;
    for (i, v) in it.enumerate() {
        match best {
            None => best = Some((i, v)),
            Some((_, b)) if (max && v > b) || (!max && v < b) => best = Some((i, v)),
            _ => {}
        }
    }
    best.map(|(i, _)| i as u32).unwrap_or(0)
}

fn reduce_float<T: CpuFloat>(data: &[T], l: &Layout, dim: usize, op: ReduceOp) -> Vec<T> {
    if l.strides()[dim] == 1 && op == ReduceOp::Sum {
        // Contiguous rows: f64 sums in lanes over slices.
        let starts = row_starts(l, dim);
        let len = l.dims()[dim];
        let one = |&s: &usize| {
            let row = &data[s..s + len];
            let mut acc = [0.0f64; 8];
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += crate::WithDType::to_f64(v);
                }
            }
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&x| crate::WithDType::to_f64(x))
                .sum();
            T::from_f64(acc.iter().sum::<f64>() + tail)
        };
        return if starts.len() * len >= PAR_THRESHOLD {
            starts.par_iter().map(|s| vectorized(|| one(s))).collect()
        } else {
            starts.iter().map(|s| vectorized(|| one(s))).collect()
        };
    }
    match op {
        // Sums accumulate in f64 so long rows keep their precision.
        ReduceOp::Sum => reduce_rows(data, l, dim, |it| {
            T::from_f64(it.map(|x| x.to_f64()).sum::<f64>())
        }),
        ReduceOp::Max => reduce_rows(data, l, dim, |it| {
            it.fold(
                T::neg_infinity(),
                |a, b| if b > a || b.is_nan() { b } else { a },
            )
        }),
        ReduceOp::Min => reduce_rows(data, l, dim, |it| {
            it.fold(
                T::infinity(),
                |a, b| if b < a || b.is_nan() { b } else { a },
            )
        }),
        ReduceOp::ArgMax | ReduceOp::ArgMin => unreachable!("arg reductions return u32"),
    }
}

pub(super) fn reduce(s: &CpuStorage, l: &Layout, dim: usize, op: ReduceOp) -> Result<CpuStorage> {
    use CpuStorage as S;
    if dim >= l.dims().len() {
        return Err(Error::DimOutOfRange {
            op: "reduce",
            dim: dim as isize,
            shape: l.shape().clone(),
        });
    }
    if matches!(op, ReduceOp::ArgMax | ReduceOp::ArgMin) {
        let max = op == ReduceOp::ArgMax;
        macro_rules! arg {
            ($v:expr) => {
                reduce_rows($v, l, dim, |it| arg_best(it, max))
            };
        }
        return Ok(S::U32(match s {
            S::F32(v) => arg!(v),
            S::F64(v) => arg!(v),
            S::BF16(v) => arg!(v),
            S::U32(v) => arg!(v),
        }));
    }
    if let S::U32(v) = s {
        return Ok(S::U32(match op {
            ReduceOp::Sum => reduce_rows(v, l, dim, |it| it.fold(0u32, |a, b| a.wrapping_add(b))),
            ReduceOp::Max => reduce_rows(v, l, dim, |it| it.max().unwrap_or(0)),
            _ => reduce_rows(v, l, dim, |it| it.min().unwrap_or(u32::MAX)),
        }));
    }
    float_kernel!("reduce", s, l, |d, ll| reduce_float(d, ll, dim, op))
}
