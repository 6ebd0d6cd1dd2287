//! Elementwise CPU kernels: unary maps, broadcasting binary ops, comparisons, select, casts, copies.

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

use super::simd::vectorized;
use super::{float_kernel, CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::{BinaryOp, CmpOp, UnaryOp};
use crate::{DType, Error, Layout, Result};

fn map_vec<T: Copy + Send + Sync, U: Send>(
    src: Vec<T>,
    f: impl Fn(T) -> U + Sync + Send,
) -> Vec<U> {
    if src.len() >= PAR_THRESHOLD {
        src.into_par_iter().map(f).collect()
    } else {
        src.into_iter().map(f).collect()
    }
}

/// Maps `f` over a view: straight from the buffer when contiguous, in parallel chunks when large.
/// `f` is a concrete closure per op, so each loop is monomorphised (and vectorised where it can).
fn map_view<T: Copy + Send + Sync, U: Send + Sync + Copy + Default>(
    data: &[T],
    l: &Layout,
    f: impl Fn(T) -> U + Sync + Send,
) -> Vec<U> {
    let owned;
    let src: &[T] = match l.contiguous_range() {
        Some((a, b)) => &data[a..b],
        None => {
            owned = CpuStorage::gather_view(data, l);
            &owned
        }
    };
    let mut out = Vec::with_capacity(src.len());
    {
        let o = &mut out.spare_capacity_mut()[..src.len()];
        if src.len() >= PAR_THRESHOLD {
            const CHUNK: usize = 1 << 12;
            o.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, x)| {
                    vectorized(|| {
                        o.iter_mut()
                            .zip(x)
                            .for_each(|(o, &x)| *o = MaybeUninit::new(f(x)))
                    });
                });
        } else {
            vectorized(|| {
                o.iter_mut()
                    .zip(src)
                    .for_each(|(o, &x)| *o = MaybeUninit::new(f(x)))
            });
        }
    }
    // SAFETY: every one of the `src.len()` elements was written above.
    unsafe { out.set_len(src.len()) };
    out
}

fn unary_t<T: CpuFloat>(data: &[T], l: &Layout, op: UnaryOp) -> Vec<T> {
    let c = |v: f64| T::from_f64(v);
    let one = T::one();
    match op {
        UnaryOp::Neg => map_view(data, l, |x: T| -x),
        UnaryOp::Exp => map_view(data, l, |x: T| x.fast_exp()),
        UnaryOp::Log => map_view(data, l, |x: T| x.ln()),
        UnaryOp::Silu => map_view(data, l, |x: T| x / (one + (-x).fast_exp())),
        UnaryOp::Sigmoid => map_view(data, l, |x: T| one / (one + (-x).fast_exp())),
        UnaryOp::Sqrt => map_view(data, l, |x: T| x.sqrt()),
        UnaryOp::Recip => map_view(data, l, |x: T| x.recip()),
        UnaryOp::Sqr => map_view(data, l, |x: T| x * x),
        UnaryOp::Abs => map_view(data, l, |x: T| x.abs()),
        UnaryOp::Tanh => map_view(data, l, |x: T| x.tanh()),
        UnaryOp::Cos => map_view(data, l, |x: T| x.cos()),
        UnaryOp::Sin => map_view(data, l, |x: T| x.sin()),
        UnaryOp::Affine { mul, add } => {
            let (m, a) = (c(mul), c(add));
            map_view(data, l, move |x: T| x * m + a)
        }
        UnaryOp::Powf(e) => {
            let e = c(e);
            map_view(data, l, move |x: T| x.powf(e))
        }
        UnaryOp::MaxScalar(v) => {
            let v = c(v);
            map_view(data, l, move |x: T| x.max(v))
        }
        UnaryOp::MinScalar(v) => {
            let v = c(v);
            map_view(data, l, move |x: T| x.min(v))
        }
    }
}

pub(super) fn unary(s: &CpuStorage, l: &Layout, op: UnaryOp) -> Result<CpuStorage> {
    float_kernel!("unary", s, l, |d, ll| unary_t(d, ll, op))
}

/// Runs `op` over two same-shape views with one monomorphised loop per op.
fn binary_t<A, O>(
    a: &[A],
    al: &Layout,
    b: &[A],
    bl: &Layout,
    op: BinaryOp,
    widen: impl Fn(A) -> O + Copy + Sync + Send,
    narrow: impl Fn(O) -> A + Copy + Sync + Send,
) -> Vec<A>
where
    A: Copy + Send + Sync + Default,
    O: num_traits::Float + Send + Default,
{
    macro_rules! go {
        ($f:expr) => {
            zip_views(a, al, b, bl, move |x: A, y: A| {
                narrow($f(widen(x), widen(y)))
            })
        };
    }
    match op {
        BinaryOp::Add => go!(|x: O, y: O| x + y),
        BinaryOp::Sub => go!(|x: O, y: O| x - y),
        BinaryOp::Mul => go!(|x: O, y: O| x * y),
        BinaryOp::Div => go!(|x: O, y: O| x / y),
        BinaryOp::Maximum => go!(|x: O, y: O| x.max(y)),
        BinaryOp::Minimum => go!(|x: O, y: O| x.min(y)),
        BinaryOp::SiluMul => go!(|x: O, y: O| x / (O::one() + (-x).exp()) * y),
    }
}

/// Applies `f` over two same-shape views. Contiguous operands zip directly; a broadcast rhs whose
/// inner block is contiguous (a bias row, a per-row scale) is walked block by block.
pub(super) fn zip_views<A: Copy + Send + Sync, B: Copy + Send + Sync, O: Send + Copy + Default>(
    a: &[A],
    al: &Layout,
    b: &[B],
    bl: &Layout,
    f: impl Fn(A, B) -> O + Sync + Send,
) -> Vec<O> {
    let n = al.elem_count();
    match (al.contiguous_range(), bl.contiguous_range()) {
        (Some((a0, a1)), Some((b0, b1))) => {
            let (a, b) = (&a[a0..a1], &b[b0..b1]);
            assert!(
                a.len() == n && b.len() == n,
                "zip_views: operands of different sizes"
            );
            let mut out = Vec::with_capacity(n);
            {
                let o = &mut out.spare_capacity_mut()[..n];
                let body = |o: &mut [MaybeUninit<O>], a: &[A], b: &[B]| {
                    vectorized(|| {
                        o.iter_mut()
                            .zip(a.iter().zip(b))
                            .for_each(|(o, (&x, &y))| *o = MaybeUninit::new(f(x, y)))
                    })
                };
                if n >= PAR_THRESHOLD {
                    const CHUNK: usize = 1 << 12;
                    o.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                        let s = c * CHUNK;
                        body(o, &a[s..s + o.len()], &b[s..s + o.len()]);
                    });
                } else {
                    body(o, a, b);
                }
            }
            // SAFETY: `a` and `b` both hold `n` elements (same-shape contiguous views), so
            // every one of the `n` outputs was written above.
            unsafe { out.set_len(n) };
            out
        }
        _ => {
            // Walk in rows of the last dim so each row is processed in one tight loop; the common
            // cases (both rows contiguous, or one operand constant along the row) are slices.
            let dims = al.dims();
            let last = dims.last().copied().unwrap_or(1).max(1);
            let (sa, sb) = (
                al.strides().last().copied().unwrap_or(0),
                bl.strides().last().copied().unwrap_or(0),
            );
            let rows_a = rows_of(al);
            let rows_b = rows_of(bl);
            let mut out = vec![O::default(); n];
            let body = |(row, o): (usize, &mut [O])| {
                let (ra, rb) = (rows_a[row], rows_b[row]);
                let len = o.len();
                vectorized(|| match (sa, sb) {
                    (1, 1) => o
                        .iter_mut()
                        .zip(a[ra..ra + len].iter().zip(&b[rb..rb + len]))
                        .for_each(|(o, (&x, &y))| *o = f(x, y)),
                    (1, 0) => {
                        let y = b[rb];
                        o.iter_mut()
                            .zip(&a[ra..ra + len])
                            .for_each(|(o, &x)| *o = f(x, y))
                    }
                    (0, 1) => {
                        let x = a[ra];
                        o.iter_mut()
                            .zip(&b[rb..rb + len])
                            .for_each(|(o, &y)| *o = f(x, y))
                    }
                    _ => {
                        for (j, slot) in o.iter_mut().enumerate() {
                            *slot = f(a[ra + j * sa], b[rb + j * sb]);
                        }
                    }
                })
            };
            if n >= PAR_THRESHOLD {
                out.par_chunks_mut(last).enumerate().for_each(body);
            } else {
                out.chunks_mut(last).enumerate().for_each(body);
            }
            out
        }
    }
}

/// Storage offsets of the first element of every row (last dim) of a view.
pub(super) fn rows_of(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    if dims.is_empty() {
        return vec![l.offset()];
    }
    let r = dims.len() - 1;
    let outer = Layout::new(
        dims[..r].to_vec().into(),
        l.strides()[..r].to_vec(),
        l.offset(),
    );
    outer.strided_indices().collect()
}

pub(super) fn binary(
    s: &CpuStorage,
    l: &Layout,
    rhs: &CpuStorage,
    rl: &Layout,
    op: BinaryOp,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    match (s, rhs) {
        (S::F32(a), S::F32(b)) => Ok(S::F32(binary_t(a, l, b, rl, op, |x| x, |x| x))),
        (S::F64(a), S::F64(b)) => Ok(S::F64(binary_t(a, l, b, rl, op, |x| x, |x| x))),
        (S::BF16(a), S::BF16(b)) => Ok(S::BF16(binary_t(
            a,
            l,
            b,
            rl,
            op,
            f32::from,
            bf16::from_f32,
        ))),
        (S::U32(_), S::U32(_)) => Err(Error::UnsupportedDType {
            op: "binary",
            dtype: DType::U32,
        }),
        _ => Err(Error::DTypeMismatch {
            op: "binary",
            lhs: s.dtype_(),
            rhs: rhs.dtype_(),
        }),
    }
}

fn cmp_fn<T: PartialOrd>(op: CmpOp) -> impl Fn(T, T) -> u32 + Sync + Send {
    move |a: T, b: T| {
        (match op {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }) as u32
    }
}

pub(super) fn cmp(
    s: &CpuStorage,
    l: &Layout,
    rhs: &CpuStorage,
    rl: &Layout,
    op: CmpOp,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    let out = match (s, rhs) {
        (S::F32(a), S::F32(b)) => zip_views(a, l, b, rl, cmp_fn::<f32>(op)),
        (S::F64(a), S::F64(b)) => zip_views(a, l, b, rl, cmp_fn::<f64>(op)),
        (S::BF16(a), S::BF16(b)) => zip_views(a, l, b, rl, cmp_fn::<bf16>(op)),
        (S::U32(a), S::U32(b)) => zip_views(a, l, b, rl, cmp_fn::<u32>(op)),
        _ => {
            return Err(Error::DTypeMismatch {
                op: "cmp",
                lhs: s.dtype_(),
                rhs: rhs.dtype_(),
            })
        }
    };
    Ok(S::U32(out))
}

/// The condition view as booleans (non-zero is true).
fn cond_mask(c: &CpuStorage, l: &Layout) -> Vec<bool> {
    match c {
        CpuStorage::F32(v) => CpuStorage::gather_view(v, l)
            .into_iter()
            .map(|x| x != 0.0)
            .collect(),
        CpuStorage::F64(v) => CpuStorage::gather_view(v, l)
            .into_iter()
            .map(|x| x != 0.0)
            .collect(),
        CpuStorage::BF16(v) => CpuStorage::gather_view(v, l)
            .into_iter()
            .map(|x| x.to_f32() != 0.0)
            .collect(),
        CpuStorage::U32(v) => CpuStorage::gather_view(v, l)
            .into_iter()
            .map(|x| x != 0)
            .collect(),
    }
}

pub(super) fn where_cond(
    c: &CpuStorage,
    cl: &Layout,
    t: &CpuStorage,
    tl: &Layout,
    f: &CpuStorage,
    fl: &Layout,
) -> Result<CpuStorage> {
    use CpuStorage as S;
    let mask = cond_mask(c, cl);
    fn sel<T: Copy>(m: &[bool], t: Vec<T>, f: Vec<T>) -> Vec<T> {
        m.iter()
            .zip(t.into_iter().zip(f))
            .map(|(&m, (t, f))| if m { t } else { f })
            .collect()
    }
    fn g<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
        CpuStorage::gather_view(v, l)
    }
    Ok(match (t, f) {
        (S::F32(a), S::F32(b)) => S::F32(sel(&mask, g(a, tl), g(b, fl))),
        (S::F64(a), S::F64(b)) => S::F64(sel(&mask, g(a, tl), g(b, fl))),
        (S::BF16(a), S::BF16(b)) => S::BF16(sel(&mask, g(a, tl), g(b, fl))),
        (S::U32(a), S::U32(b)) => S::U32(sel(&mask, g(a, tl), g(b, fl))),
        _ => {
            return Err(Error::DTypeMismatch {
                op: "where_cond",
                lhs: t.dtype_(),
                rhs: f.dtype_(),
            })
        }
    })
}

pub(super) fn to_dtype(s: &CpuStorage, l: &Layout, dtype: DType) -> Result<CpuStorage> {
    use CpuStorage as S;
    fn g<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
        CpuStorage::gather_view(v, l)
    }
    Ok(match (s, dtype) {
        (S::F32(v), DType::F32) => S::F32(g(v, l)),
        (S::F32(v), DType::F64) => S::F64(map_vec(g(v, l), f64::from)),
        (S::F32(v), DType::BF16) => S::BF16(map_vec(g(v, l), bf16::from_f32)),
        (S::F32(v), DType::U32) => S::U32(map_vec(g(v, l), |x| x as u32)),
        (S::F64(v), DType::F32) => S::F32(map_vec(g(v, l), |x| x as f32)),
        (S::F64(v), DType::F64) => S::F64(g(v, l)),
        (S::F64(v), DType::BF16) => S::BF16(map_vec(g(v, l), bf16::from_f64)),
        (S::F64(v), DType::U32) => S::U32(map_vec(g(v, l), |x| x as u32)),
        (S::BF16(v), DType::F32) => S::F32(map_vec(g(v, l), f32::from)),
        (S::BF16(v), DType::F64) => S::F64(map_vec(g(v, l), f64::from)),
        (S::BF16(v), DType::BF16) => S::BF16(g(v, l)),
        (S::BF16(v), DType::U32) => S::U32(map_vec(g(v, l), |x| x.to_f32() as u32)),
        (S::U32(v), DType::F32) => S::F32(map_vec(g(v, l), |x| x as f32)),
        (S::U32(v), DType::F64) => S::F64(map_vec(g(v, l), f64::from)),
        (S::U32(v), DType::BF16) => S::BF16(map_vec(g(v, l), |x| bf16::from_f32(x as f32))),
        (S::U32(v), DType::U32) => S::U32(g(v, l)),
    })
}

fn copy_t<T: Copy>(src: &[T], sl: &Layout, dst: &mut [T], dl: &Layout) {
    if let (Some((s0, s1)), Some((d0, d1))) = (sl.contiguous_range(), dl.contiguous_range()) {
        dst[d0..d1].copy_from_slice(&src[s0..s1]);
        return;
    }
    let vals = CpuStorage::gather_view(src, sl);
    let (starts, block) = dl.contiguous_blocks();
    for (i, s) in starts.into_iter().enumerate() {
        dst[s..s + block].copy_from_slice(&vals[i * block..(i + 1) * block]);
    }
}

pub(super) fn copy_to_view(
    s: &CpuStorage,
    sl: &Layout,
    dst: &mut CpuStorage,
    dl: &Layout,
) -> Result<()> {
    use CpuStorage as S;
    if sl.shape() != dl.shape() {
        return Err(Error::ShapeMismatch {
            op: "copy_to_view",
            lhs: sl.shape().clone(),
            rhs: dl.shape().clone(),
        });
    }
    if dl.max_extent() > dst.len_() {
        return Err(Error::invalid(
            "copy_to_view",
            "destination view exceeds its buffer",
        ));
    }
    match (s, dst) {
        (S::F32(a), S::F32(b)) => copy_t(a, sl, b, dl),
        (S::F64(a), S::F64(b)) => copy_t(a, sl, b, dl),
        (S::BF16(a), S::BF16(b)) => copy_t(a, sl, b, dl),
        (S::U32(a), S::U32(b)) => copy_t(a, sl, b, dl),
        (a, b) => {
            return Err(Error::DTypeMismatch {
                op: "copy_to_view",
                lhs: a.dtype_(),
                rhs: b.dtype_(),
            })
        }
    }
    Ok(())
}

/// `dst[dl] += src[sl]` in place: f32 and f64 directly, bf16 in f32 rounded once (as `binary`
/// add), so it equals assigning `dst + src` bit for bit.
pub(super) fn add_to_view(
    s: &CpuStorage,
    sl: &Layout,
    dst: &mut CpuStorage,
    dl: &Layout,
) -> Result<()> {
    use CpuStorage as S;
    const OP: &str = "add_to_view";
    if sl.shape() != dl.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: sl.shape().clone(),
            rhs: dl.shape().clone(),
        });
    }
    if dl.max_extent() > dst.len_() {
        return Err(Error::invalid(OP, "destination view exceeds its buffer"));
    }
    match (s, dst) {
        (S::F32(a), S::F32(b)) => add_to_t(a, sl, b, dl, |d, x| d + x),
        (S::F64(a), S::F64(b)) => add_to_t(a, sl, b, dl, |d, x| d + x),
        (S::BF16(a), S::BF16(b)) => {
            add_to_t(a, sl, b, dl, |d, x| bf16::from_f32(d.to_f32() + x.to_f32()))
        }
        (S::U32(_), S::U32(_)) => return Err(Error::invalid(OP, "u32 tensors cannot be added")),
        (a, b) => {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: a.dtype_(),
                rhs: b.dtype_(),
            })
        }
    }
    Ok(())
}

fn add_to_t<T: Copy + Send + Sync>(
    src: &[T],
    sl: &Layout,
    dst: &mut [T],
    dl: &Layout,
    add: impl Fn(T, T) -> T + Sync + Send,
) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    if let (Some((s0, s1)), Some((d0, d1))) = (sl.contiguous_range(), dl.contiguous_range()) {
        dst[d0..d1]
            .par_chunks_mut(CHUNK)
            .zip(src[s0..s1].par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &x)| *d = add(*d, x)));
        return;
    }
    let vals = CpuStorage::gather_view(src, sl);
    let (starts, block) = dl.contiguous_blocks();
    for (i, s) in starts.into_iter().enumerate() {
        let d = &mut dst[s..s + block];
        d.iter_mut()
            .zip(&vals[i * block..(i + 1) * block])
            .for_each(|(d, &x)| *d = add(*d, x));
    }
}

impl CpuStorage {
    /// Copies `src` over elements `offset..offset + src.len()` (same dtype).
    pub(crate) fn write_at(&mut self, offset: usize, src: &CpuStorage) -> Result<()> {
        use CpuStorage as S;
        const OP: &str = "write_host";
        if offset + src.len_() > self.len_() {
            return Err(Error::invalid(
                OP,
                "the data runs past the end of the buffer",
            ));
        }
        let end = offset + src.len_();
        match (src, self) {
            (S::F32(a), S::F32(b)) => b[offset..end].copy_from_slice(a),
            (S::F64(a), S::F64(b)) => b[offset..end].copy_from_slice(a),
            (S::BF16(a), S::BF16(b)) => b[offset..end].copy_from_slice(a),
            (S::U32(a), S::U32(b)) => b[offset..end].copy_from_slice(a),
            (a, b) => {
                return Err(Error::DTypeMismatch {
                    op: OP,
                    lhs: b.dtype_(),
                    rhs: a.dtype_(),
                })
            }
        }
        Ok(())
    }
    pub(crate) fn dtype_(&self) -> DType {
        crate::backend::BackendStorage::dtype(self)
    }
    pub(crate) fn len_(&self) -> usize {
        crate::backend::BackendStorage::len(self)
    }
}
