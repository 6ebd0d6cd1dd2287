//! Flash attention on the CPU: the forward, blocked with an online softmax, one rayon task per
//! (batch, query head, block of `BQ` queries); the block products go through the `gemm` crate
//! (single-threaded inside a task). q, k and v are first gathered through their strides into
//! per-head contiguous copies in the compute dtype (f32 for f32 and bf16, f64 for f64), which
//! are scratch of the call, never tensors. The backward is in `cpu_backward.rs`.

use gemm::{gemm, Parallelism};
use half::bf16;
use rayon::prelude::*;

use super::primitives::{Dims, FlashBackward, FlashForward, FlashParams};
use crate::backend::cpu::simd::{lane_max, lane_sum, vectorized};
use crate::backend::cpu::{CpuFloat, CpuStorage};
use crate::fused::{Operand, OptOperand};
use crate::{DType, Error, Layout, Result};

/// Queries per block (rows of a task's score block).
pub(super) const BQ: usize = 64;
/// Keys per block (columns of a score block).
pub(super) const BK: usize = 64;

/// The compute dtype of the CPU kernels: f32 (for f32 and bf16 operands) or f64.
pub(super) trait Acc: CpuFloat + num_traits::Zero + num_traits::One {
    /// The view `l` `[b, h, n, d]` of `st` (any strides) as a contiguous `[b, h, n, d]` Vec.
    fn gather(op: &'static str, st: &CpuStorage, l: &Layout) -> Result<Vec<Self>>;
    /// `v` as a storage of `dtype` (rounded once for bf16).
    fn store(v: Vec<Self>, dtype: DType) -> CpuStorage;
}

/// Gathers the rank-4 view `l` of `data` into a contiguous Vec, converting each element.
fn gather_t<S: Copy + Sync, T: Copy + Send + Default>(
    data: &[S],
    l: &Layout,
    conv: impl Fn(S) -> T + Sync,
) -> Vec<T> {
    let (dims, st, off) = (l.dims(), l.strides(), l.offset());
    let (h, n, d) = (dims[1], dims[2], dims[3]);
    let mut out = vec![T::default(); l.elem_count()];
    if d == 0 {
        return out;
    }
    out.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        let (bi, hi, i) = (r / (h * n), r / n % h, r % n);
        let base = off + bi * st[0] + hi * st[1] + i * st[2];
        for (j, o) in row.iter_mut().enumerate() {
            *o = conv(data[base + j * st[3]]);
        }
    });
    out
}

fn wrong_dtype(op: &'static str, st: &CpuStorage) -> Error {
    Error::UnsupportedDType {
        op,
        dtype: st.dtype_(),
    }
}

impl Acc for f32 {
    fn gather(op: &'static str, st: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
        check_extent(op, st, l)?;
        match st {
            CpuStorage::F32(v) => Ok(gather_t(v, l, |x| x)),
            CpuStorage::BF16(v) => Ok(gather_t(v, l, f32::from)),
            _ => Err(wrong_dtype(op, st)),
        }
    }
    fn store(v: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
            _ => CpuStorage::F32(v),
        }
    }
}

impl Acc for f64 {
    fn gather(op: &'static str, st: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
        check_extent(op, st, l)?;
        match st {
            CpuStorage::F64(v) => Ok(gather_t(v, l, |x| x)),
            _ => Err(wrong_dtype(op, st)),
        }
    }
    fn store(v: Vec<f64>, _: DType) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

fn check_extent(op: &'static str, st: &CpuStorage, l: &Layout) -> Result<()> {
    if l.elem_count() > 0 && l.max_extent() > st.len_() {
        return Err(Error::invalid(op, "operand view exceeds its buffer"));
    }
    Ok(())
}

/// `c[m×n]` (row-major, row stride `ldc`) `= (accumulate ? c : 0) + a·b`, where `a`'s element
/// `(i, p)` is `a[i·ars + p·acs]` and `b`'s `(p, j)` is `b[p·brs + j·bcs]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm<T: Acc>(
    [m, n, k]: [usize; 3],
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    (a, ars, acs): (&[T], usize, usize),
    (b, brs, bcs): (&[T], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len(),
        "mm: output block out of range"
    );
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc)
                .take(m)
                .for_each(|r| r[..n].fill(T::zero()));
        }
        return;
    }
    assert!(
        (m - 1) * ars + (k - 1) * acs < a.len(),
        "mm: lhs out of range"
    );
    assert!(
        (k - 1) * brs + (n - 1) * bcs < b.len(),
        "mm: rhs out of range"
    );
    // SAFETY: the three asserts above keep every element the product reads or writes inside its
    // slice; `c` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Which keys a query sees: the causal limit and the key mask.
pub(super) struct Visibility<'a> {
    pub q_offset: usize,
    pub s: usize,
    /// `[b, s]`: 0 padding, else the segment.
    pub mask: Option<&'a [u32]>,
}

impl Visibility<'_> {
    /// The segment of query `i` of batch row `bi` (its key's mask value), or `None` unmasked.
    #[inline]
    pub fn query_segment(&self, bi: usize, i: usize) -> Option<u32> {
        self.mask.map(|m| m[bi * self.s + self.q_offset + i])
    }
    /// The key block `j0 .. j0 + nk` of batch row `bi`: its mask values, and the segment all of
    /// them share (`None` when they differ or one is padding; every key unmasked: `Some(1)`).
    pub fn keys(&self, bi: usize, j0: usize, nk: usize) -> KeyBlock<'_> {
        match self.mask {
            None => KeyBlock {
                segs: None,
                uniform: Some(1),
            },
            Some(m) => {
                let segs = &m[bi * self.s + j0..bi * self.s + j0 + nk];
                let first = segs.first().copied().filter(|&k| k != 0);
                let uniform = first.filter(|&k| segs.iter().all(|&x| x == k));
                KeyBlock {
                    segs: Some(segs),
                    uniform,
                }
            }
        }
    }
    /// Keys `0 .. limit` that query `i` may see by causality.
    #[inline]
    pub fn limit(&self, i: usize) -> usize {
        self.s.min(self.q_offset + i + 1)
    }
    /// Whether some query of `i0 .. i0 + nq` may see some key of `j0 .. j0 + nk` (a block that is
    /// false is skipped whole: above the causal diagonal, or only other segments' or padding
    /// keys; conservative: true may still hold no visible pair).
    pub fn block(&self, bi: usize, (i0, nq): (usize, usize), (j0, nk): (usize, usize)) -> bool {
        if nq == 0 || nk == 0 || j0 >= self.limit(i0 + nq - 1) {
            return false;
        }
        let Some(m) = self.mask else { return true };
        let row = &m[bi * self.s..(bi + 1) * self.s];
        let seg_range = |xs: &[u32]| {
            xs.iter()
                .filter(|&&x| x != 0)
                .fold(None, |r: Option<(u32, u32)>, &x| {
                    Some(r.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
                })
        };
        let Some((klo, khi)) = seg_range(&row[j0..j0 + nk]) else {
            return false; // only padding keys
        };
        let qs = &row[self.q_offset + i0..self.q_offset + i0 + nq];
        if qs.contains(&0) {
            return true; // a padding query sees every real key
        }
        let (qlo, qhi) = seg_range(qs).unwrap_or((0, 0));
        qlo <= khi && klo <= qhi
    }
}

/// The mask values of one block of keys (see [`Visibility::keys`]).
pub(super) struct KeyBlock<'a> {
    segs: Option<&'a [u32]>,
    uniform: Option<u32>,
}

impl KeyBlock<'_> {
    /// Sets `row[j] = f(row[j])` where a query of segment `sq` (`None`: unmasked) sees key `j`
    /// of the block, among the first `lim` (causal), and `row[j] = invisible` elsewhere. A row
    /// that sees the whole block takes a branch-free loop.
    #[inline(always)]
    pub fn apply<T: Copy>(
        &self,
        row: &mut [T],
        lim: usize,
        sq: Option<u32>,
        invisible: T,
        f: impl Fn(T) -> T,
    ) {
        let sees_all = match (self.uniform, sq) {
            (Some(_), None) => true,
            (Some(k), Some(q)) => q == 0 || q == k,
            (None, _) => false,
        };
        if sees_all && lim >= row.len() {
            row.iter_mut().for_each(|x| *x = f(*x));
            return;
        }
        let segs = self.segs;
        for (j, x) in row.iter_mut().enumerate() {
            let seen = j < lim
                && match (segs, sq) {
                    (Some(ks), Some(q)) => ks[j] != 0 && (q == 0 || ks[j] == q),
                    _ => true,
                };
            *x = if seen { f(*x) } else { invisible };
        }
    }
}

/// The operands of one call in the compute dtype, each contiguous per head.
pub(super) struct Heads<T> {
    pub q: Vec<T>, // [b, hq, t, d]
    pub k: Vec<T>, // [b, hkv, s, d]
    pub v: Vec<T>, // [b, hkv, s, d]
}

/// The key mask as a contiguous `[b, s]` Vec.
pub(super) fn mask_vec(
    op: &'static str,
    m: OptOperand<'_, CpuStorage>,
) -> Result<Option<Vec<u32>>> {
    m.map(|Operand { s, l }| s.view_u32(op, l)).transpose()
}

/// One task of the forward: query block `qb` of head `h` of batch row `bi`. Returns its output
/// rows `[nq, d]` and their log-sum-exp `[nq]` (`−∞` where no key is visible).
fn forward_block<T: Acc>(
    dm: &Dims,
    x: &Heads<T>,
    vis: &Visibility<'_>,
    scale: T,
    (bi, h, qb): (usize, usize, usize),
) -> (Vec<T>, Vec<T>) {
    let Dims {
        hq, hkv, t, s, d, ..
    } = *dm;
    let (i0, nq) = (qb * BQ, BQ.min(t - qb * BQ));
    let kvh = h / dm.group();
    let qblk = &x.q[((bi * hq + h) * t + i0) * d..][..nq * d]; // [nq, d]
    let kh = &x.k[(bi * hkv + kvh) * s * d..][..s * d]; // [s, d]
    let vh = &x.v[(bi * hkv + kvh) * s * d..][..s * d]; // [s, d]
    let neg = T::neg_infinity();
    let (mut m, mut l) = (vec![neg; nq], vec![T::zero(); nq]); // running max and Σ exp
    let mut acc = vec![T::zero(); nq * d]; // [nq, d] running Σ p·v
    let mut sc = vec![T::zero(); nq * BK]; // [nq, nk] scores, then probabilities
    let segs: Vec<Option<u32>> = (0..nq).map(|i| vis.query_segment(bi, i0 + i)).collect();
    let kend = vis.limit(i0 + nq - 1);
    for j0 in (0..kend).step_by(BK) {
        let nk = BK.min(kend - j0);
        if !vis.block(bi, (i0, nq), (j0, nk)) {
            continue;
        }
        let kb = &kh[j0 * d..]; // [nk, d]
        let keys = vis.keys(bi, j0, nk);
        mm([nq, nk, d], &mut sc, nk, false, (qblk, d, 1), (kb, 1, d)); // q·kᵀ
        for (i, row) in sc.chunks_mut(nk).take(nq).enumerate() {
            let lim = vis.limit(i0 + i).saturating_sub(j0).min(nk);
            keys.apply(row, lim, segs[i], neg, |x| x * scale);
            let mx = lane_max(row);
            if mx == neg {
                row.fill(T::zero()); // nothing visible here: this block adds nothing
                continue;
            }
            let mnew = m[i].max(mx);
            // exp(−∞ − mnew) is exactly 0 at the invisible keys.
            row.iter_mut().for_each(|x| *x = (*x - mnew).fast_exp());
            let sum = lane_sum(row);
            let alpha = if m[i] == neg {
                T::zero()
            } else {
                (m[i] - mnew).fast_exp()
            };
            if alpha != T::one() {
                acc[i * d..(i + 1) * d]
                    .iter_mut()
                    .for_each(|a| *a = *a * alpha);
            }
            l[i] = l[i] * alpha + sum;
            m[i] = mnew;
        }
        mm(
            [nq, d, nk],
            &mut acc,
            d,
            true,
            (&sc, nk, 1),
            (&vh[j0 * d..], d, 1),
        ); // += p·v
    }
    let mut lse = vec![neg; nq];
    for i in 0..nq {
        let row = &mut acc[i * d..(i + 1) * d];
        if l[i] == T::zero() {
            row.fill(T::zero()); // no visible key: zero output
            continue;
        }
        let inv = l[i].recip();
        row.iter_mut().for_each(|a| *a = *a * inv);
        lse[i] = m[i] + l[i].ln();
    }
    (acc, lse)
}

fn forward_t<T: Acc>(
    dm: &Dims,
    x: &Heads<T>,
    vis: &Visibility<'_>,
    scale: f64,
) -> (Vec<T>, Vec<T>) {
    let Dims { b, hq, t, d, .. } = *dm;
    let scale = T::from_f64(scale);
    let nqb = t.div_ceil(BQ);
    let tasks: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..hq).flat_map(move |h| (0..nqb).map(move |qb| (bi, h, qb))))
        .collect();
    let blocks: Vec<(Vec<T>, Vec<T>)> = tasks
        .par_iter()
        .map(|&task| vectorized(|| forward_block(dm, x, vis, scale, task)))
        .collect();
    let mut out = vec![T::zero(); b * t * hq * d]; // [b, t, hq, d]
    let mut lse = vec![T::neg_infinity(); b * hq * t]; // [b, hq, t]
    for (&(bi, h, qb), (o, l)) in tasks.iter().zip(blocks) {
        let i0 = qb * BQ;
        for (i, (row, &li)) in o.chunks(d.max(1)).zip(&l).enumerate() {
            let r = (bi * t + i0 + i) * hq + h;
            out[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
            lse[(bi * hq + h) * t + i0 + i] = li;
        }
    }
    (out, lse)
}

/// The dtype of `q`, after checking that `k` and `v` share it.
fn operand_dtype(op: &'static str, ops: &[&CpuStorage]) -> Result<DType> {
    let dt = ops[0].dtype_();
    if let Some(o) = ops.iter().find(|o| o.dtype_() != dt) {
        return Err(Error::DTypeMismatch {
            op,
            lhs: dt,
            rhs: o.dtype_(),
        });
    }
    Ok(dt)
}

pub(super) fn forward(
    o: FlashForward<'_, CpuStorage>,
    p: FlashParams,
) -> Result<(CpuStorage, CpuStorage)> {
    const OP: &str = "flash_attention";
    let (q, k, v) = (o.q, o.k, o.v);
    let dm = Dims::check(OP, [q.l, k.l, v.l], &[], None, o.key_mask.map(|m| m.l), p)?;
    let dt = operand_dtype(OP, &[q.s, k.s, v.s])?;
    let mask = mask_vec(OP, o.key_mask)?;
    let vis = Visibility {
        q_offset: p.q_offset,
        s: dm.s,
        mask: mask.as_deref(),
    };
    fn run<T: Acc>(
        dm: &Dims,
        [q, k, v]: [Operand<'_, CpuStorage>; 3],
        vis: &Visibility<'_>,
        scale: f64,
        dt: DType,
    ) -> Result<(CpuStorage, CpuStorage)> {
        const OP: &str = "flash_attention";
        let x = Heads {
            q: T::gather(OP, q.s, q.l)?,
            k: T::gather(OP, k.s, k.l)?,
            v: T::gather(OP, v.s, v.l)?,
        };
        let (out, lse) = forward_t(dm, &x, vis, scale);
        Ok((T::store(out, dt), T::store(lse, dt.accumulation())))
    }
    match dt {
        DType::F32 | DType::BF16 => run::<f32>(&dm, [q, k, v], &vis, p.scale, dt),
        DType::F64 => run::<f64>(&dm, [q, k, v], &vis, p.scale, dt),
        DType::U32 => Err(Error::UnsupportedDType { op: OP, dtype: dt }),
    }
}

pub(super) fn backward(
    o: FlashBackward<'_, CpuStorage>,
    p: FlashParams,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    super::cpu_backward::backward(o, p)
}
