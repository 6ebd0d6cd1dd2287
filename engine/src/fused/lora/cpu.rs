//! The LoRA unit's primitives on the CPU, the reference (and the CPU training path): the dropped
//! input is built once in the adapter dtype with the mask recomputed from `(seed, index)`, then the `gemm`
//! crate does the products, so each primitive is one gather pass plus one product. Nothing is
//! kept between the forward and the backward but the codes `z`. The `seed` every primitive here
//! takes is already keyed with the calling thread's dropout key (by the dispatch in
//! `primitives.rs`), so they use it as it is.
//!
//! Shapes: `x` `[M, in]`, `y`/`g` `[M, out]`, `a` `[r, in]`, `b` `[out, r]`, `z`/`dz` `[M, r]`.

use half::bf16;
use rayon::prelude::*;

use super::primitives::{expect_dims, keep_of, Codes, ExpandAdd, GradA, GradCodes, GradX};
use crate::backend::checks::dims2;
use crate::backend::cpu::matmul::matmul_t;
use crate::backend::cpu::{CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::BackendStorage;
use crate::{rng, DType, Error, Layout, Result, Shape};

/// Adapter dtypes: f32 and f64.
trait Ad:
    CpuFloat + num_traits::Zero + num_traits::One + Default + Copy + Send + Sync + 'static
{
    fn of_f64(v: f64) -> Self;
    /// A float view converted to this dtype (exactly as `to_dtype` converts), contiguous.
    fn view(s: &CpuStorage, op: &'static str, l: &Layout) -> Result<Vec<Self>>;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
}
impl Ad for f32 {
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    fn view(s: &CpuStorage, op: &'static str, l: &Layout) -> Result<Vec<Self>> {
        s.view_f32(op, l)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}
impl Ad for f64 {
    fn of_f64(v: f64) -> Self {
        v
    }
    fn view(s: &CpuStorage, op: &'static str, l: &Layout) -> Result<Vec<Self>> {
        if s.dtype() == DType::U32 {
            return Err(Error::UnsupportedDType {
                op,
                dtype: DType::U32,
            });
        }
        s.to_f64_vec(l)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Runs `$body` with `$T` bound to the adapter type of storage `$s` (f32 or f64).
macro_rules! adapter {
    ($op:expr, $s:expr, $T:ident => $body:expr) => {
        match $s.dtype() {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            dtype => Err(Error::UnsupportedDType { op: $op, dtype }),
        }
    };
}

/// `s`'s buffer as `T`, or a dtype mismatch against `want`.
fn data<'a, T: Ad>(op: &'static str, s: &'a CpuStorage, want: DType) -> Result<&'a [T]> {
    T::slice(s).ok_or(Error::DTypeMismatch {
        op,
        lhs: want,
        rhs: s.dtype(),
    })
}

/// The view `l` as a rank-3 `[1, d0, d1]` layout (or its transpose), for `matmul_t`.
fn l3(l: &Layout, transpose: bool) -> Layout {
    let (d, s) = (l.dims(), l.strides());
    let l3 = Layout::new(
        Shape::new(vec![1, d[0], d[1]]),
        vec![0, s[0], s[1]],
        l.offset(),
    );
    if transpose {
        l3.transpose(1, 2)
    } else {
        l3
    }
}

fn c3(d0: usize, d1: usize) -> Layout {
    Layout::contiguous([1, d0, d1])
}

/// `v[i] *= mask(i)` over a row-major `[M, in]` buffer: the mask of `dropout_mask(p, seed)` in
/// `T`, i.e. `0` when `rng::dropped(seed, i, dropout_threshold(p))`, else `keep as T`.
fn apply_mask<T: Ad>(v: &mut [T], p: f64, keep: f64, seed: u64) {
    let keep = T::of_f64(keep);
    let thr = rng::dropout_threshold(p);
    crate::backend::cpu::dropout::mask_in_place(v, seed, thr, |e, d| {
        e * if d { T::zero() } else { keep }
    });
}

/// The view `l` of `s` as `T` with a rank-3 `[1, d0, d1]` layout for `matmul_t`: the buffer
/// itself when it already holds `T`, else a converted contiguous copy.
fn as_t<'a, T: Ad>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<(std::borrow::Cow<'a, [T]>, Layout)> {
    Ok(match T::slice(s) {
        Some(v) => (std::borrow::Cow::Borrowed(v), l3(l, false)),
        None => {
            let (d0, d1) = dims2(op, l)?;
            (std::borrow::Cow::Owned(T::view(s, op, l)?), c3(d0, d1))
        }
    })
}

/// `drop(x)` `[M, in]` in `T`, contiguous.
fn dropped<T: Ad>(
    op: &'static str,
    x: &CpuStorage,
    l: &Layout,
    p: f64,
    seed: u64,
) -> Result<Vec<T>> {
    let mut v = T::view(x, op, l)?;
    if let Some(keep) = keep_of(op, p)? {
        apply_mask(&mut v, p, keep, seed);
    }
    Ok(v)
}

fn scale_in_place<T: Ad>(v: &mut [T], s: f64) {
    let s = T::of_f64(s);
    v.iter_mut().for_each(|e| *e = *e * s);
}

/// `z = drop(x) Aᵀ` `[M, r]`.
pub(super) fn codes(o: Codes<'_, CpuStorage>, p: f64, seed: u64) -> Result<CpuStorage> {
    const OP: &str = "lora_codes";
    let (x, l, a, al) = (o.x.s, o.x.l, o.a.s, o.a.l);
    let (m, n) = dims2(OP, l)?;
    let (r, n_a) = dims2(OP, al)?;
    if n_a != n {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: l.shape().clone(),
            rhs: al.shape().clone(),
        });
    }
    let keep = keep_of(OP, p)?;
    adapter!(OP, a, T => {
        let (xd, xl) = if keep.is_some() {
            (std::borrow::Cow::Owned(dropped::<T>(OP, x, l, p, seed)?), c3(m, n))
        } else {
            as_t::<T>(OP, x, l)?
        }; // [M, in]
        let ad = data::<T>(OP, a, a.dtype())?;
        let z = matmul_t(&xd, &xl, ad, &l3(al, true))?; // [M, r]
        debug_assert_eq!(z.len(), m * r);
        Ok(T::wrap(z))
    })
}

/// `y + s · z Bᵀ` `[M, out]` in y's dtype.
pub(super) fn expand_add(o: ExpandAdd<'_, CpuStorage>, scale: f64) -> Result<CpuStorage> {
    const OP: &str = "lora_expand_add";
    let (y, l, z, zl, b, bl) = (o.y.s, o.y.l, o.z.s, o.z.l, o.b.s, o.b.l);
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    adapter!(OP, b, T => {
        data::<T>(OP, z, b.dtype())?;
        let mut zs = T::view(z, OP, zl)?; // [M, r]
        scale_in_place(&mut zs, scale);
        let d = matmul_t(&zs, &c3(m, r), data::<T>(OP, b, b.dtype())?, &l3(bl, true))?; // [M, out]
        add_into(OP, y, l, &d)
    })
}

/// `y + d` in y's dtype (bf16: the f32 sum rounded once).
fn add_into<T: Ad>(op: &'static str, y: &CpuStorage, l: &Layout, d: &[T]) -> Result<CpuStorage> {
    Ok(match y {
        CpuStorage::F32(_) => {
            let yv = y.view_f32(op, l)?;
            CpuStorage::F32(zip_par(yv, d, |a, b| a + to_f32(b)))
        }
        CpuStorage::BF16(_) => {
            let yv = y.view_f32(op, l)?;
            let s = zip_par(yv, d, |a, b| a + to_f32(b));
            CpuStorage::BF16(s.into_iter().map(bf16::from_f32).collect())
        }
        CpuStorage::F64(v) => {
            let yv = CpuStorage::gather_view(v, l);
            CpuStorage::F64(zip_par(yv, d, |a, b| a + to_f64(b)))
        }
        CpuStorage::U32(_) => {
            return Err(Error::UnsupportedDType {
                op,
                dtype: DType::U32,
            })
        }
    })
}

fn to_f64<T: Ad>(v: T) -> f64 {
    num_traits::ToPrimitive::to_f64(&v).unwrap_or(f64::NAN)
}
fn to_f32<T: Ad>(v: T) -> f32 {
    num_traits::ToPrimitive::to_f32(&v).unwrap_or(f32::NAN)
}

/// `a[i] = f(a[i], b[i])`, in parallel for large buffers.
fn zip_par<U: Copy + Send + Sync, T: Copy + Send + Sync>(
    mut a: Vec<U>,
    b: &[T],
    f: impl Fn(U, T) -> U + Send + Sync,
) -> Vec<U> {
    if a.len() < PAR_THRESHOLD {
        a.iter_mut().zip(b).for_each(|(x, &y)| *x = f(*x, y));
    } else {
        a.par_iter_mut()
            .zip(b.par_iter())
            .for_each(|(x, &y)| *x = f(*x, y));
    }
    a
}

/// `(dz, dB) = (s · g B, s · gᵀ z)`.
pub(super) fn grad_codes(
    o: GradCodes<'_, CpuStorage>,
    scale: f64,
) -> Result<(CpuStorage, CpuStorage)> {
    const OP: &str = "lora_grad_codes";
    let (g, l, z, zl, b, bl) = (o.g.s, o.g.l, o.z.s, o.z.l, o.b.s, o.b.l);
    let (m, o) = dims2(OP, l)?;
    let (_, r) = dims2(OP, bl)?;
    expect_dims(OP, bl, (o, r), l)?;
    expect_dims(OP, zl, (m, r), l)?;
    adapter!(OP, b, T => {
        let (ga, gl) = as_t::<T>(OP, g, l)?; // [M, out]
        let bd = data::<T>(OP, b, b.dtype())?;
        let mut dz = matmul_t(&ga, &gl, bd, &l3(bl, false))?; // [M, r]
        scale_in_place(&mut dz, scale);
        let zd = data::<T>(OP, z, b.dtype())?;
        let mut db = matmul_t(&ga, &gl.transpose(1, 2), zd, &l3(zl, false))?; // [out, r]
        scale_in_place(&mut db, scale);
        Ok((T::wrap(dz), T::wrap(db)))
    })
}

/// `dA = dzᵀ drop(x)` `[r, in]`.
pub(super) fn grad_a(o: GradA<'_, CpuStorage>, p: f64, seed: u64) -> Result<CpuStorage> {
    const OP: &str = "lora_grad_a";
    let (x, l, dz, dl) = (o.x.s, o.x.l, o.dz.s, o.dz.l);
    let (m, n) = dims2(OP, l)?;
    let (_, r) = dims2(OP, dl)?;
    expect_dims(OP, dl, (m, r), l)?;
    let keep = keep_of(OP, p)?;
    adapter!(OP, dz, T => {
        let (xd, xl) = if keep.is_some() {
            (std::borrow::Cow::Owned(dropped::<T>(OP, x, l, p, seed)?), c3(m, n))
        } else {
            as_t::<T>(OP, x, l)?
        }; // [M, in]
        let dzd = data::<T>(OP, dz, dz.dtype())?;
        let da = matmul_t(dzd, &l3(dl, true), &xd, &xl)?; // [r, in]
        Ok(T::wrap(da))
    })
}

/// `dx = mask ⊙ (dz A)` `[M, in]` in `dtype`.
pub(super) fn grad_x(
    o: GradX<'_, CpuStorage>,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<CpuStorage> {
    const OP: &str = "lora_grad_x";
    let (dz, l, a, al) = (o.dz.s, o.dz.l, o.a.s, o.a.l);
    let (m, r) = dims2(OP, l)?;
    let (_, n) = dims2(OP, al)?;
    expect_dims(OP, al, (r, n), l)?;
    let keep = keep_of(OP, p)?;
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType { op: OP, dtype });
    }
    adapter!(OP, a, T => {
        let dzd = data::<T>(OP, dz, a.dtype())?;
        let mut dx = matmul_t(dzd, &l3(l, false), data::<T>(OP, a, a.dtype())?, &l3(al, false))?; // [M, in]
        if let Some(k) = keep {
            apply_mask(&mut dx, p, k, seed);
        }
        let dx = T::wrap(dx);
        if dtype == a.dtype() {
            Ok(dx)
        } else {
            dx.to_dtype(&Layout::contiguous([m, n]), dtype)
        }
    })
}
