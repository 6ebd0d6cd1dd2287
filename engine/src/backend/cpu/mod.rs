//! The CPU backend: the reference implementation of every primitive op. Float kernels are generic
//! over f32 and f64; bf16 runs through f32 (widened on read, rounded once on write), so bf16
//! results carry f32 accumulation. Work is spread with rayon; matmul goes through the `gemm` crate.

pub(crate) mod acc;
pub(crate) mod cross_entropy;
pub(crate) mod dropout;
mod elementwise;
mod index;
pub(crate) mod matmul;
pub mod memory;
mod random;
mod reduce;
mod rms_norm;
mod rope;
pub(crate) mod simd;
mod softmax;

use std::borrow::Cow;

use half::bf16;
use num_traits::Float;

use crate::backend::{BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::profile;
use crate::{DType, Device, Error, Layout, Result};

pub use random::CpuDevice;

/// One flat host buffer.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
    U32(Vec<u32>),
}

/// Float element types the generic kernels run on (bf16 is widened to f32 first).
pub trait CpuFloat:
    Float + Default + crate::WithDType + std::iter::Sum + Send + Sync + std::fmt::Debug + 'static
{
    /// `eˣ`: a vectorisable polynomial for f32 ([`simd::exp_f32`], within 2 ulp), `exp` for f64.
    fn fast_exp(self) -> Self;
}
impl CpuFloat for f32 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        simd::exp_f32(self)
    }
}
impl CpuFloat for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// Minimum number of elements before an elementwise loop is split across threads.
pub(crate) const PAR_THRESHOLD: usize = 1 << 14;

impl CpuStorage {
    /// Gathers a (possibly strided) view into a new contiguous Vec.
    pub(crate) fn gather_view<T: Copy>(data: &[T], l: &Layout) -> Vec<T> {
        if let Some((a, b)) = l.contiguous_range() {
            return data[a..b].to_vec();
        }
        let (starts, block) = l.contiguous_blocks();
        let mut out = Vec::with_capacity(l.elem_count());
        if block > 1 {
            for s in starts {
                out.extend_from_slice(&data[s..s + block]);
            }
        } else {
            out.extend(l.strided_indices().map(|i| data[i]));
        }
        out
    }

    /// The view as a contiguous f32 Vec (for F32 and BF16 storages).
    pub(crate) fn view_f32(&self, op: &'static str, l: &Layout) -> Result<Vec<f32>> {
        match self {
            CpuStorage::F32(v) => Ok(Self::gather_view(v, l)),
            CpuStorage::BF16(v) => Ok(Self::gather_view(v, l).into_iter().map(f32::from).collect()),
            CpuStorage::F64(v) => Ok(Self::gather_view(v, l)
                .into_iter()
                .map(|x| x as f32)
                .collect()),
            CpuStorage::U32(_) => Err(Error::UnsupportedDType {
                op,
                dtype: DType::U32,
            }),
        }
    }

    /// The view as a contiguous u32 Vec (index tensors).
    pub(crate) fn view_u32(&self, op: &'static str, l: &Layout) -> Result<Vec<u32>> {
        match self {
            CpuStorage::U32(v) => Ok(Self::gather_view(v, l)),
            s => Err(Error::UnsupportedDType {
                op,
                dtype: s.dtype(),
            }),
        }
    }

    pub(crate) fn bf16_from_f32(v: Vec<f32>) -> CpuStorage {
        CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect())
    }
}

/// The view as a contiguous slice, borrowed when it already is one.
pub(crate) fn contig<'a, T: Copy>(data: &'a [T], l: &Layout) -> Cow<'a, [T]> {
    match l.contiguous_range() {
        Some((a, b)) => Cow::Borrowed(&data[a..b]),
        None => Cow::Owned(CpuStorage::gather_view(data, l)),
    }
}

/// The error of two operands that should share a float dtype.
pub(crate) fn dtype_mismatch(op: &'static str, a: &CpuStorage, b: &CpuStorage) -> Error {
    if a.dtype_() == DType::U32 {
        return Error::UnsupportedDType {
            op,
            dtype: DType::U32,
        };
    }
    Error::DTypeMismatch {
        op,
        lhs: a.dtype_(),
        rhs: b.dtype_(),
    }
}

/// Runs a float kernel `$f::<T>(data, layout, ...)` returning `Vec<T>` on f32/f64 storages, and
/// through f32 on bf16 storages. U32 is an error naming `$op`.
macro_rules! float_kernel {
    ($op:expr, $s:expr, $l:expr, |$d:ident, $ll:ident| $body:expr) => {{
        use $crate::backend::cpu::CpuStorage as S;
        match $s {
            S::F32(v) => {
                let ($d, $ll) = (&v[..], $l);
                Ok(S::F32($body))
            }
            S::F64(v) => {
                let ($d, $ll) = (&v[..], $l);
                Ok(S::F64($body))
            }
            S::BF16(_) => {
                let tmp = $s.view_f32($op, $l)?;
                let cl = $crate::Layout::contiguous($l.shape().clone());
                let ($d, $ll) = (&tmp[..], &cl);
                Ok(S::bf16_from_f32($body))
            }
            S::U32(_) => Err($crate::Error::UnsupportedDType {
                op: $op,
                dtype: $crate::DType::U32,
            }),
        }
    }};
}
pub(crate) use float_kernel;

/// A layout's kind for the profile: `c` contiguous, `b` broadcast (a zero stride), `s` strided.
fn lk(l: &Layout) -> char {
    if l.is_contiguous() {
        'c'
    } else if l.strides().contains(&0) {
        'b'
    } else {
        's'
    }
}

/// [`profile::timed`] under a fixed key.
fn timed<R>(key: &'static str, f: impl FnOnce() -> R) -> R {
    profile::timed(|| key.into(), f)
}

fn unary_name(op: UnaryOp) -> String {
    let s = format!("unary {op:?}");
    s.split([' ', '{', '('])
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

impl BackendStorage for CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::U32(_) => DType::U32,
        }
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }
    fn to_f64_vec(&self, l: &Layout) -> Result<Vec<f64>> {
        Ok(match self {
            CpuStorage::F32(v) => Self::gather_view(v, l).into_iter().map(f64::from).collect(),
            CpuStorage::BF16(v) => Self::gather_view(v, l).into_iter().map(f64::from).collect(),
            CpuStorage::F64(v) => Self::gather_view(v, l),
            CpuStorage::U32(v) => Self::gather_view(v, l).into_iter().map(f64::from).collect(),
        })
    }
    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        profile::timed(
            || format!("to_dtype {}", lk(l)),
            || elementwise::to_dtype(self, l, dtype),
        )
    }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        profile::timed(|| unary_name(op), || elementwise::unary(self, l, op))
    }
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self> {
        profile::timed(
            || format!("binary {op:?} {}{}", lk(l), lk(rhs_l)),
            || elementwise::binary(self, l, rhs, rhs_l, op),
        )
    }
    fn cmp(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: CmpOp) -> Result<Self> {
        timed("cmp", || elementwise::cmp(self, l, rhs, rhs_l, op))
    }
    fn dropout_apply(&self, l: &Layout, p: f64, seed: u64) -> Result<Self> {
        timed("dropout_apply", || dropout::dropout_apply(self, l, p, seed))
    }
    fn where_cond(
        &self,
        l: &Layout,
        t: &Self,
        t_l: &Layout,
        f: &Self,
        f_l: &Layout,
    ) -> Result<Self> {
        timed("where_cond", || {
            elementwise::where_cond(self, l, t, t_l, f, f_l)
        })
    }
    fn reduce(&self, l: &Layout, dim: usize, op: ReduceOp) -> Result<Self> {
        profile::timed(
            || {
                format!(
                    "reduce {op:?} {}{}",
                    lk(l),
                    (dim + 1 == l.dims().len()) as u8
                )
            },
            || reduce::reduce(self, l, dim, op),
        )
    }
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self> {
        profile::timed(
            || matmul::profile_key(l, rhs_l),
            || matmul::matmul(self, l, rhs, rhs_l),
        )
    }
    fn copy_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        profile::timed(
            || format!("copy_to_view {}{}", lk(l), lk(dst_l)),
            || elementwise::copy_to_view(self, l, dst, dst_l),
        )
    }
    fn add_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        profile::timed(
            || format!("add_to_view {}{}", lk(l), lk(dst_l)),
            || elementwise::add_to_view(self, l, dst, dst_l),
        )
    }
    fn index_select(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self> {
        timed("index_select", || {
            index::index_select(self, l, ids, ids_l, dim)
        })
    }
    fn index_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self> {
        timed("index_add", || {
            index::index_add(self, l, ids, ids_l, src, src_l, dim)
        })
    }
    fn gather(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self> {
        timed("gather", || index::gather(self, l, ids, ids_l, dim))
    }
    fn scatter_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self> {
        timed("scatter_add", || {
            index::scatter_add(self, l, ids, ids_l, src, src_l, dim)
        })
    }
    fn topk_indices(&self, l: &Layout, k: usize) -> Result<Self> {
        timed("topk_indices", || index::topk_indices(self, l, k))
    }
    fn softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        timed("softmax_last_dim", || softmax::softmax_last_dim(self, l))
    }
    fn log_softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        timed("log_softmax_last_dim", || {
            softmax::log_softmax_last_dim(self, l)
        })
    }
    fn rms_norm(&self, l: &Layout, w: &Self, w_l: &Layout, eps: f64) -> Result<Self> {
        timed("rms_norm", || rms_norm::rms_norm(self, l, w, w_l, eps))
    }
    fn rms_norm_backward(
        &self,
        l: &Layout,
        w: &Self,
        w_l: &Layout,
        g: &Self,
        g_l: &Layout,
        eps: f64,
        need_dw: bool,
    ) -> Result<(Self, Option<Self>)> {
        timed("rms_norm_backward", || {
            let (dx, dw) = rms_norm::rms_norm_backward(self, l, w, w_l, g, g_l, eps)?;
            Ok((dx, need_dw.then_some(dw)))
        })
    }
    fn rope(
        &self,
        l: &Layout,
        cos: &Self,
        cos_l: &Layout,
        sin: &Self,
        sin_l: &Layout,
        seq_dim: usize,
    ) -> Result<Self> {
        timed("rope", || {
            rope::rope(self, l, cos, cos_l, sin, sin_l, seq_dim)
        })
    }
    fn cross_entropy(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self> {
        timed("cross_entropy", || {
            cross_entropy::cross_entropy(self, l, targets, t_l, ignore_index)
        })
    }
    fn cross_entropy_backward(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        grad_rows: &Self,
        g_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self> {
        timed("cross_entropy_backward", || {
            cross_entropy::cross_entropy_backward(
                self,
                l,
                targets,
                t_l,
                grad_rows,
                g_l,
                ignore_index,
            )
        })
    }
    fn causal_softmax(
        &self,
        l: &Layout,
        scale: f64,
        q_offset: usize,
        key_mask: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        timed("causal_softmax", || {
            softmax::causal_softmax(self, l, scale, q_offset, key_mask)
        })
    }
    fn softmax_backward(&self, l: &Layout, g: &Self, g_l: &Layout, scale: f64) -> Result<Self> {
        timed("softmax_backward", || {
            softmax::softmax_backward(self, l, g, g_l, scale)
        })
    }
}
