//! The backend interface. Every primitive op that a tensor can run is a method of
//! [`BackendStorage`]; the CPU backend implements all of them and is the reference that any other
//! backend (CUDA) is tested against. Composite ops (attention, dropout, mean, ...) are built from
//! these primitives in `crate::ops`, so a new backend gets them for free.
//!
//! Conventions: every method takes the storage and the [`Layout`] of each operand (views are
//! never materialised before a call) and returns a new, contiguous storage, unless it says
//! otherwise.

pub(crate) mod checks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::{DType, Device, Layout, Result, Shape};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Silu,
    Sigmoid,
    Sqrt,
    Recip,
    Sqr,
    Abs,
    Tanh,
    Cos,
    Sin,
    /// `x * mul + add`.
    Affine {
        mul: f64,
        add: f64,
    },
    /// `x ^ e`.
    Powf(f64),
    /// `max(x, c)` and `min(x, c)` against a scalar.
    MaxScalar(f64),
    MinScalar(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    /// `silu(a) · b`: the SwiGLU gate in one pass.
    SiluMul,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    /// Index of the first maximum, as u32.
    ArgMax,
    /// Index of the first minimum, as u32.
    ArgMin,
}

/// A device's storage: one flat buffer of one dtype.
pub trait BackendStorage: Sized + Send + Sync {
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
    /// Number of elements in the buffer.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the view into host memory as f64 (for tests, printing and scalars).
    fn to_f64_vec(&self, l: &Layout) -> Result<Vec<f64>>;

    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self>;
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self>;
    /// `x ⊙ mask` over the view's row-major elements, contiguous, in x's (float) dtype: the
    /// product with `dropout_mask(p, seed)` of that dtype (0, or `1/(1-p)` rounded to it), bit
    /// for bit, in one pass and without the mask tensor.
    fn dropout_apply(&self, l: &Layout, p: f64, seed: u64) -> Result<Self>;
    /// Both layouts have the output's shape (broadcasting is done with stride-0 views).
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self>;
    /// Elementwise comparison; the result is u32 0/1.
    fn cmp(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: CmpOp) -> Result<Self>;
    /// `self` is the condition (any dtype, non-zero is true); all three layouts share one shape.
    fn where_cond(
        &self,
        l: &Layout,
        on_true: &Self,
        t_l: &Layout,
        on_false: &Self,
        f_l: &Layout,
    ) -> Result<Self>;
    /// Reduces `dim`, keeping it with size 1.
    fn reduce(&self, l: &Layout, dim: usize, op: ReduceOp) -> Result<Self>;
    /// Batched matmul: `self` is `[b, m, k]`, `rhs` is `[b, k, n]` (both given as rank-3 layouts, any
    /// strides), the output is a contiguous `[b, m, n]`. bf16 operands accumulate in f32.
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self>;
    /// Copies the view `l` of `self` into the view `dst_l` of `dst` (same shape).
    fn copy_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()>;
    /// Adds the view `l` of `self` into the view `dst_l` of `dst` in place (same shape, same
    /// float dtype; bf16 computed in f32 and rounded once, as `binary` add). `dst_l` must name
    /// distinct elements.
    fn add_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()>;

    /// Rows of `self` along `dim` picked by u32 `ids` (rank 1).
    fn index_select(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self>;
    /// Copy of `self` with `src`'s slices added at the positions `ids` (rank 1) along `dim`.
    fn index_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self>;
    /// `out[.., i, ..] = self[.., ids[.., i, ..], ..]` along `dim`; `ids` has the output's shape.
    fn gather(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self>;
    /// Copy of `self` with `self[.., ids[.., i, ..], ..] += src[.., i, ..]` along `dim`.
    fn scatter_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self>;
    /// Indices (u32) of the `k` largest values along the last dim, largest first; ties keep the
    /// lower index first.
    fn topk_indices(&self, l: &Layout, k: usize) -> Result<Self>;

    fn softmax_last_dim(&self, l: &Layout) -> Result<Self>;
    fn log_softmax_last_dim(&self, l: &Layout) -> Result<Self>;

    /// `y = x / sqrt(mean(x², last dim) + eps) * w`, statistics in f32 (f64 for f64).
    fn rms_norm(&self, l: &Layout, w: &Self, w_l: &Layout, eps: f64) -> Result<Self>;
    /// Returns `(dx, dw)` for `rms_norm`, given the output gradient `g`; `dw` only when
    /// `need_dw` (a frozen norm weight needs none, and its column reduction costs time).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        l: &Layout,
        w: &Self,
        w_l: &Layout,
        g: &Self,
        g_l: &Layout,
        eps: f64,
        need_dw: bool,
    ) -> Result<(Self, Option<Self>)>;

    /// Rotary embedding, Hugging Face half-rotation layout. `self`: `[b, n1, n2, d]` whose
    /// positions run along dim `seq_dim` (1 or 2; the other of dims 1 and 2 holds the heads);
    /// `cos`, `sin`: `[b or 1, t, d/2]` with `t` that dim's length. Output contiguous `[b, n1, n2,
    /// d]`: `out[i] = x[i] cos - x[i+d/2] sin`, `out[i+d/2] = x[i+d/2] cos + x[i] sin`.
    fn rope(
        &self,
        l: &Layout,
        cos: &Self,
        cos_l: &Layout,
        sin: &Self,
        sin_l: &Layout,
        seq_dim: usize,
    ) -> Result<Self>;

    /// Per-row cross-entropy of `self` (logits `[n, v]`) against u32 `targets` `[n]`:
    /// `logsumexp(row) - row[target]`, 0 where the target is `ignore_index`. Output `[n]`, f32
    /// (f64 for f64 logits).
    fn cross_entropy(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self>;
    /// `dlogits[r] = (softmax(row r) - onehot(target r)) * grad_rows[r]`, zero rows where ignored.
    fn cross_entropy_backward(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        grad_rows: &Self,
        g_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self>;

    /// Causal, key-masked, scaled softmax over the last dim of attention scores `self`:
    /// `[b, h, t, s]` (any strides). Query `i` sits at key position `p = q_offset + i` and sees
    /// key `j` when `j <= p` and, with a `key_mask` (u32 `[b, s]`: 0 for padding, else the
    /// token's segment), `key_mask[b, j] != 0` and, when the query's own `key_mask[b, p]` is not
    /// 0 (and `p < s`), `key_mask[b, j] == key_mask[b, p]`: segments are block-diagonal (packed
    /// sequences never see each other), and a 0/1 mask is plain padding. Over the visible keys
    /// `y[b, h, i, j] = exp(scale·x − m) / Σ exp(scale·x − m)` (`m` the row's visible maximum),
    /// and `y = 0` exactly at every other key. Masked scores are never read. A row with no
    /// visible key (a padding query) is all zero. Statistics in f32 (f64 for f64). Output
    /// contiguous `[b, h, t, s]`.
    fn causal_softmax(
        &self,
        l: &Layout,
        scale: f64,
        q_offset: usize,
        key_mask: Option<(&Self, &Layout)>,
    ) -> Result<Self>;
    /// Backward of a (masked, scaled) softmax over the last dim, from its output `self` (`y`)
    /// and the output gradient `g` (same shape): `dx = scale · y ⊙ (g − Σ_j g ⊙ y)` per row.
    /// Where `y = 0` (masked keys) `dx = 0`. Row sums in f32 (f64 for f64).
    fn softmax_backward(&self, l: &Layout, g: &Self, g_l: &Layout, scale: f64) -> Result<Self>;
}

/// Creation of storages on a device.
pub trait BackendDevice {
    type Storage: BackendStorage;
    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<Self::Storage>;
    fn full(&self, shape: &Shape, dtype: DType, value: f64) -> Result<Self::Storage>;
    /// A buffer that the caller overwrites entirely before anything reads it: its contents are
    /// unspecified (the GPU skips the fill; the CPU gives zeros).
    fn for_overwrite(&self, shape: &Shape, dtype: DType) -> Result<Self::Storage> {
        self.zeros(shape, dtype)
    }
    fn upload_f64(&self, data: &[f64], dtype: DType) -> Result<Self::Storage>;
    /// Standard normal samples × `std` + `mean`, counter-based so a (seed, index) pair always gives
    /// the same value on every backend.
    fn randn(
        &self,
        shape: &Shape,
        dtype: DType,
        mean: f64,
        std: f64,
        seed: u64,
    ) -> Result<Self::Storage>;
    /// Uniform samples in `[lo, hi)`, counter-based like `randn`.
    fn rand_uniform(
        &self,
        shape: &Shape,
        dtype: DType,
        lo: f64,
        hi: f64,
        seed: u64,
    ) -> Result<Self::Storage>;
    /// `0` with probability `p` (rounded to a multiple of 2⁻¹⁶), else `1/(1-p)`: the dropout mask,
    /// counter-based like `randn` (`rng::dropped`).
    fn dropout_mask(&self, shape: &Shape, dtype: DType, p: f64, seed: u64)
        -> Result<Self::Storage>;
}
