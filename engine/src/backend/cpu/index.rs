//! Index CPU kernels: index_select, index_add, gather, scatter_add, top-k.
//!
//! Every kernel sees its operands as `[outer, size, inner]` around the indexed `dim` (`outer` is
//! the product of the dims before it, `inner` of the dims after it). Ids are validated before any
//! work, so an out-of-range id is an error and never a panic. Pure copies (index_select, gather)
//! move the elements as they are, bf16 included; accumulations (index_add, scatter_add) run in
//! f32 for bf16 and round once at the end. Accumulations are split across threads only over
//! disjoint destination rows, so repeated ids add up in the same order as a serial loop.

use crate::backend::checks::{check_dim, check_same_but, split};
use std::borrow::Cow;
use std::cmp::Ordering;

use rayon::prelude::*;

use super::{CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::{DType, Error, Layout, Result};

/// The view as one contiguous slice, borrowed when it already is one.
fn contig<'a, T: Copy>(data: &'a [T], l: &Layout) -> Cow<'a, [T]> {
    match l.contiguous_range() {
        Some((a, b)) => Cow::Borrowed(&data[a..b]),
        None => Cow::Owned(CpuStorage::gather_view(data, l)),
    }
}

/// Rank-1 u32 ids as a Vec.
fn ids_rank1(op: &'static str, ids: &CpuStorage, il: &Layout) -> Result<Vec<u32>> {
    if il.dims().len() != 1 {
        return Err(Error::RankMismatch {
            op,
            expected: 1,
            shape: il.shape().clone(),
        });
    }
    ids.view_u32(op, il)
}

/// Every id is below `size`.
fn check_ids(op: &'static str, ids: &[u32], size: usize) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= size) {
        Some(&i) => Err(Error::IndexOutOfRange {
            op,
            index: i as usize,
            size,
        }),
        None => Ok(()),
    }
}

/// Runs a copy kernel `$body: Vec<T>` on whichever element type `$s` holds (`$v: &[T]`).
macro_rules! copy_kernel {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::BF16($v) => CpuStorage::BF16($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            CpuStorage::U32($v) => CpuStorage::U32($body),
        }
    };
}

/// Runs an accumulating kernel `$body: Vec<T>` over `(a, al)` and `(b, bl)` of one float dtype;
/// bf16 operands are widened to f32 (contiguous) and the result rounded once.
macro_rules! add_kernel {
    ($op:expr, $s:expr, $l:expr, $src:expr, $sl:expr, |$a:ident, $al:ident, $b:ident, $bl:ident| $body:expr) => {{
        use CpuStorage as S;
        match ($s, $src) {
            (S::F32(x), S::F32(y)) => {
                let ($a, $al, $b, $bl) = (&x[..], $l, &y[..], $sl);
                Ok(S::F32($body))
            }
            (S::F64(x), S::F64(y)) => {
                let ($a, $al, $b, $bl) = (&x[..], $l, &y[..], $sl);
                Ok(S::F64($body))
            }
            (S::BF16(_), S::BF16(_)) => {
                let (x, y) = ($s.view_f32($op, $l)?, $src.view_f32($op, $sl)?);
                let (cl, csl) = (
                    Layout::contiguous($l.shape().clone()),
                    Layout::contiguous($sl.shape().clone()),
                );
                let ($a, $al, $b, $bl) = (&x[..], &cl, &y[..], &csl);
                Ok(S::bf16_from_f32($body))
            }
            (S::U32(_), S::U32(_)) => Err(Error::UnsupportedDType {
                op: $op,
                dtype: DType::U32,
            }),
            (x, y) => Err(Error::DTypeMismatch {
                op: $op,
                lhs: x.dtype_(),
                rhs: y.dtype_(),
            }),
        }
    }};
}

// ----- index_select -------------------------------------------------------------------------

/// `out[o, j, i] = a[o, ids[j], i]`.
fn index_select_t<T: Copy + Default + Send + Sync>(
    a: &[T],
    al: &Layout,
    ids: &[u32],
    dim: usize,
) -> Vec<T> {
    let (outer, size, inner) = split(al.dims(), dim);
    let n = ids.len();
    let src = contig(a, al); // [outer, size, inner]
    let mut out = vec![T::default(); outer * n * inner]; // [outer, n, inner]
    if out.is_empty() {
        return out;
    }
    let body = |(k, row): (usize, &mut [T])| {
        let (o, j) = (k / n, k % n);
        let start = (o * size + ids[j] as usize) * inner;
        row.copy_from_slice(&src[start..start + inner]);
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(inner).enumerate().for_each(body);
    } else {
        out.chunks_mut(inner).enumerate().for_each(body);
    }
    out
}

pub(super) fn index_select(
    s: &CpuStorage,
    l: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    dim: usize,
) -> Result<CpuStorage> {
    const OP: &str = "index_select";
    check_dim(OP, l, dim)?;
    let ids = ids_rank1(OP, ids, il)?;
    check_ids(OP, &ids, l.dims()[dim])?;
    Ok(copy_kernel!(s, |v| index_select_t(v, l, &ids, dim)))
}

// ----- index_add ----------------------------------------------------------------------------

/// For every destination row `t < size`, the source rows `j` with `ids[j] == t`, ascending:
/// `order[starts[t]..starts[t + 1]]`.
fn invert_ids(ids: &[u32], size: usize) -> (Vec<usize>, Vec<usize>) {
    let mut starts = vec![0usize; size + 1];
    for &t in ids {
        starts[t as usize + 1] += 1;
    }
    for t in 0..size {
        starts[t + 1] += starts[t];
    }
    let mut fill = starts.clone();
    let mut order = vec![0usize; ids.len()];
    for (j, &t) in ids.iter().enumerate() {
        order[fill[t as usize]] = j;
        fill[t as usize] += 1;
    }
    (starts, order)
}

/// `out = a; out[o, ids[j], i] += b[o, j, i]`. Each destination row `(o, t)` is owned by one
/// task that adds its source rows in ascending `j`, so the result does not depend on threads.
fn index_add_t<T: CpuFloat>(
    a: &[T],
    al: &Layout,
    ids: &[u32],
    b: &[T],
    bl: &Layout,
    dim: usize,
) -> Vec<T> {
    let (_, size, inner) = split(al.dims(), dim);
    let n = ids.len();
    let mut out = CpuStorage::gather_view(a, al); // [outer, size, inner]
    let src = contig(b, bl); // [outer, n, inner]
    if out.is_empty() || n == 0 {
        return out;
    }
    let (starts, order) = invert_ids(ids, size);
    let body = |(k, row): (usize, &mut [T])| {
        let (o, t) = (k / size, k % size);
        for &j in &order[starts[t]..starts[t + 1]] {
            let s = &src[(o * n + j) * inner..(o * n + j + 1) * inner];
            row.iter_mut().zip(s).for_each(|(r, &x)| *r = *r + x);
        }
    };
    if out.len() + src.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(inner).enumerate().for_each(body);
    } else {
        out.chunks_mut(inner).enumerate().for_each(body);
    }
    out
}

pub(super) fn index_add(
    s: &CpuStorage,
    l: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    src: &CpuStorage,
    sl: &Layout,
    dim: usize,
) -> Result<CpuStorage> {
    const OP: &str = "index_add";
    check_dim(OP, l, dim)?;
    let ids = ids_rank1(OP, ids, il)?;
    check_same_but(OP, l.shape(), sl.shape(), dim)?;
    if sl.dims()[dim] != ids.len() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: il.shape().clone(),
            rhs: sl.shape().clone(),
        });
    }
    check_ids(OP, &ids, l.dims()[dim])?;
    add_kernel!(OP, s, l, src, sl, |a, al, b, bl| index_add_t(
        a, al, &ids, b, bl, dim
    ))
}

// ----- gather -------------------------------------------------------------------------------

/// `out[o, j, i] = a[o, ids[o, j, i], i]`; `ids` is `[outer, m, inner]`, contiguous.
fn gather_t<T: Copy + Default + Send + Sync>(
    a: &[T],
    al: &Layout,
    ids: &[u32],
    m: usize,
    dim: usize,
) -> Vec<T> {
    let (_, size, inner) = split(al.dims(), dim);
    let src = contig(a, al); // [outer, size, inner]
    let mut out = vec![T::default(); ids.len()]; // [outer, m, inner]
    let one = |(k, (o_v, &id)): (usize, (&mut T, &u32))| {
        let (o, i) = (k / (m * inner), k % inner);
        *o_v = src[(o * size + id as usize) * inner + i];
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_iter_mut()
            .zip(ids.par_iter())
            .enumerate()
            .for_each(one);
    } else {
        out.iter_mut().zip(ids.iter()).enumerate().for_each(one);
    }
    out
}

pub(super) fn gather(
    s: &CpuStorage,
    l: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    dim: usize,
) -> Result<CpuStorage> {
    const OP: &str = "gather";
    check_dim(OP, l, dim)?;
    check_same_but(OP, l.shape(), il.shape(), dim)?;
    let ids = ids.view_u32(OP, il)?; // [outer, m, inner]
    check_ids(OP, &ids, l.dims()[dim])?;
    let m = il.dims()[dim];
    Ok(copy_kernel!(s, |v| gather_t(v, l, &ids, m, dim)))
}

// ----- scatter_add --------------------------------------------------------------------------

/// `out = a; out[o, ids[o, j, i], i] += b[o, j, i]`; `ids` and `b` are `[outer, m, inner]`.
///
/// Threads split the destination over `(o, i)` lines, which no two source elements share
/// across lines: with `inner == 1` those lines are the contiguous `[size]` rows of `out`; else the
/// output is accumulated transposed, as `[outer, inner, size]`, and transposed back.
fn scatter_add_t<T: CpuFloat>(
    a: &[T],
    al: &Layout,
    ids: &[u32],
    b: &[T],
    bl: &Layout,
    dim: usize,
) -> Vec<T> {
    let (outer, size, inner) = split(al.dims(), dim);
    let m = bl.dims()[dim];
    let src = contig(b, bl); // [outer, m, inner]
    if outer * size * inner == 0 || m == 0 {
        return CpuStorage::gather_view(a, al);
    }
    let large = outer * size * inner + src.len() >= PAR_THRESHOLD;
    if inner == 1 || !large {
        let mut out = CpuStorage::gather_view(a, al); // [outer, size, inner]
        let body = |(o, blk): (usize, &mut [T])| {
            for j in 0..m {
                for i in 0..inner {
                    let e = (o * m + j) * inner + i;
                    let dst = &mut blk[ids[e] as usize * inner + i];
                    *dst = *dst + src[e];
                }
            }
        };
        if large {
            out.par_chunks_mut(size * inner).enumerate().for_each(body);
        } else {
            out.chunks_mut(size * inner).enumerate().for_each(body);
        }
        return out;
    }
    // Contiguous `[outer, inner, size]` copy of `a`, one task per (o, i) line.
    let a3 = contig(a, al);
    let t_l = Layout::contiguous([outer, size, inner]).transpose(1, 2);
    let mut out_t = CpuStorage::gather_view(&a3, &t_l); // [outer, inner, size]
    out_t
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(line, row)| {
            let (o, i) = (line / inner, line % inner);
            for j in 0..m {
                let e = (o * m + j) * inner + i;
                row[ids[e] as usize] = row[ids[e] as usize] + src[e];
            }
        });
    let back = Layout::contiguous([outer, inner, size]).transpose(1, 2);
    CpuStorage::gather_view(&out_t, &back) // [outer, size, inner]
}

pub(super) fn scatter_add(
    s: &CpuStorage,
    l: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    src: &CpuStorage,
    sl: &Layout,
    dim: usize,
) -> Result<CpuStorage> {
    const OP: &str = "scatter_add";
    check_dim(OP, l, dim)?;
    check_same_but(OP, l.shape(), sl.shape(), dim)?;
    if il.shape() != sl.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: il.shape().clone(),
            rhs: sl.shape().clone(),
        });
    }
    let ids = ids.view_u32(OP, il)?; // [outer, m, inner]
    check_ids(OP, &ids, l.dims()[dim])?;
    add_kernel!(OP, s, l, src, sl, |a, al, b, bl| scatter_add_t(
        a, al, &ids, b, bl, dim
    ))
}

// ----- top-k --------------------------------------------------------------------------------

/// The order of top-k: NaN first (it counts as the largest value), then larger values, and equal
/// values by lower index. A total order, so the result is deterministic.
fn topk_order(x: f64, i: u32, y: f64, j: u32) -> Ordering {
    let by_value = match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    };
    by_value.then(i.cmp(&j))
}

/// Indices of the `k` first elements of each last-dim row in [`topk_order`].
fn topk_t<T: Copy + Send + Sync>(
    data: &[T],
    l: &Layout,
    k: usize,
    key: impl Fn(T) -> f64 + Sync + Send,
) -> Vec<u32> {
    let n = l.dims().last().copied().unwrap_or(1);
    let rows = l.elem_count() / n.max(1);
    let mut out = vec![0u32; rows * k]; // [rows, k]
    if out.is_empty() {
        return out;
    }
    let src = contig(data, l); // [rows, n]
    let body = |(r, o): (usize, &mut [u32])| {
        let row = &src[r * n..(r + 1) * n];
        let cmp = |&i: &u32, &j: &u32| topk_order(key(row[i as usize]), i, key(row[j as usize]), j);
        let mut idx: Vec<u32> = (0..n as u32).collect();
        if k < n {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        o.copy_from_slice(&idx);
    };
    if rows * n >= PAR_THRESHOLD {
        out.par_chunks_mut(k).enumerate().for_each(body);
    } else {
        out.chunks_mut(k).enumerate().for_each(body);
    }
    out
}

pub(super) fn topk_indices(s: &CpuStorage, l: &Layout, k: usize) -> Result<CpuStorage> {
    const OP: &str = "topk";
    let Some(&n) = l.dims().last() else {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 1,
            shape: l.shape().clone(),
        });
    };
    if k > n {
        return Err(Error::invalid(
            OP,
            format!("k = {k} exceeds the last dim of shape {}", l.shape()),
        ));
    }
    Ok(CpuStorage::U32(match s {
        CpuStorage::F32(v) => topk_t(v, l, k, f64::from),
        CpuStorage::BF16(v) => topk_t(v, l, k, f64::from),
        CpuStorage::F64(v) => topk_t(v, l, k, |x| x),
        CpuStorage::U32(v) => topk_t(v, l, k, f64::from),
    }))
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    fn f32s(s: &CpuStorage) -> Vec<f32> {
        match s {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => panic!("unexpected {:?}", other.dtype_()),
        }
    }

    #[test]
    fn index_select_transposed_dim1() {
        // a: [2, 3] viewed transposed as [3, 2]: [[0, 3], [1, 4], [2, 5]].
        let a = CpuStorage::F32((0..6).map(|x| x as f32).collect());
        let l = Layout::contiguous([2, 3]).transpose(0, 1);
        let ids = CpuStorage::U32(vec![1, 1, 0]);
        let out = index_select(&a, &l, &ids, &Layout::contiguous([3]), 1).unwrap();
        assert_eq!(f32s(&out), vec![3., 3., 0., 4., 4., 1., 5., 5., 2.]);
    }

    #[test]
    fn index_add_repeated_ids_large_matches_serial() {
        // Large enough to take the parallel path; every row gets 1 + its multiplicity.
        let (size, h, n) = (64, 512, 300);
        let a = CpuStorage::F32(vec![1.0; size * h]);
        let ids: Vec<u32> = (0..n).map(|j| (j * 7 % 5) as u32).collect();
        let src = CpuStorage::F32(vec![1.0; n * h]);
        let out = index_add(
            &a,
            &Layout::contiguous([size, h]),
            &CpuStorage::U32(ids.clone()),
            &Layout::contiguous([n]),
            &src,
            &Layout::contiguous([n, h]),
            0,
        )
        .unwrap();
        let out = f32s(&out);
        for t in 0..size {
            let count = ids.iter().filter(|&&i| i as usize == t).count() as f32;
            assert!(out[t * h..(t + 1) * h].iter().all(|&v| v == 1.0 + count));
        }
    }

    #[test]
    fn scatter_add_transposed_path_matches_direct() {
        // dim 0 of a [40, 500] tensor with outer == 1 takes the transposed parallel path.
        let (size, m, inner) = (40, 50, 500);
        let a: Vec<f64> = (0..size * inner).map(|x| (x % 13) as f64).collect();
        let ids: Vec<u32> = (0..m * inner).map(|e| ((e * 31) % size) as u32).collect();
        let src: Vec<f64> = (0..m * inner).map(|x| (x % 7) as f64 - 3.0).collect();
        let out = scatter_add(
            &CpuStorage::F64(a.clone()),
            &Layout::contiguous([size, inner]),
            &CpuStorage::U32(ids.clone()),
            &Layout::contiguous([m, inner]),
            &CpuStorage::F64(src.clone()),
            &Layout::contiguous([m, inner]),
            0,
        )
        .unwrap();
        let mut want = a;
        for j in 0..m {
            for i in 0..inner {
                want[ids[j * inner + i] as usize * inner + i] += src[j * inner + i];
            }
        }
        match out {
            CpuStorage::F64(v) => assert_eq!(v, want),
            _ => panic!("dtype"),
        }
    }

    #[test]
    fn out_of_range_and_wrong_dtype_are_errors() {
        let a = CpuStorage::BF16(vec![bf16::ONE; 6]);
        let l = Layout::contiguous([2, 3]);
        let bad = CpuStorage::U32(vec![0, 3]);
        let err = index_select(&a, &l, &bad, &Layout::contiguous([2]), 1).unwrap_err();
        assert!(matches!(
            err,
            Error::IndexOutOfRange {
                index: 3,
                size: 3,
                ..
            }
        ));
        let err = gather(&a, &l, &bad, &Layout::contiguous([2, 1]), 1).unwrap_err();
        assert!(matches!(err, Error::IndexOutOfRange { .. }));
        let f_ids = CpuStorage::F32(vec![0.0, 1.0]);
        let err = index_select(&a, &l, &f_ids, &Layout::contiguous([2]), 0).unwrap_err();
        assert!(matches!(err, Error::UnsupportedDType { .. }));
        let err = topk_indices(&a, &l, 4).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }));
    }

    #[test]
    fn topk_ties_and_nan() {
        let a = CpuStorage::F32(vec![1.0, 3.0, f32::NAN, 3.0, -1.0, 0.5, 0.5, 0.5]);
        let out = topk_indices(&a, &Layout::contiguous([2, 4]), 3).unwrap();
        match out {
            CpuStorage::U32(v) => assert_eq!(v, vec![2, 1, 3, 1, 2, 3]),
            _ => panic!("dtype"),
        }
    }
}
