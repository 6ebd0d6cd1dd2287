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

use crate::{DType, Device, Error, Layout, Result, Shape};

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
    /// `[b, h, t, s]` (any strides). Query `i` sees key `j` when `j <= q_offset + i` and, with a
    /// `key_mask` (u32 `[b, s]`), `key_mask[b, j] != 0`; over the visible keys
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

    // ----- MoE routing and grouped experts (see `crate::ops::moe` for the exact semantics) -----

    /// Fused top-k routing of logits `self` `[n, e]`: `(probs [n, e], ids [n, k] u32, weights [n,
    /// k])`, probs and weights in the logits' dtype (computed in f32, f64 for f64).
    fn moe_route_topk(&self, l: &Layout, k: usize) -> Result<(Self, Self, Self)>;
    /// `dlogits` `[n, e]` of the top-k weights `self` `[n, k]` given their gradient `gw` `[n, k]`:
    /// `dl[t, ids[t, j]] = w[t, j] (gw[t, j] − Σ_i w[t, i] gw[t, i])`, zero elsewhere.
    fn moe_route_topk_backward(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        gw: &Self,
        gw_l: &Layout,
        num_experts: usize,
    ) -> Result<Self>;
    /// Stable grouping of the slots of `self` (ids `[n, k]` u32) by expert: `(perm [n·k] u32,
    /// offsets [E+1] u32)`. Ids ≥ E go after every expert (not counted in `offsets`).
    fn moe_group(&self, l: &Layout, num_experts: usize) -> Result<(Self, Self)>;
    /// `inv[perm[q]] = q` for a permutation `self` `[m]` u32.
    fn moe_invert_perm(&self, l: &Layout) -> Result<Self>;
    /// `y[q] = scale[perm[q]] · x[perm[q] / k]` for `x = self` `[n, h]`, `perm` `[m]`, `scale`
    /// `[n·k]` in the accumulation dtype (f32, f64 for f64) or none (1).
    fn moe_permute(
        &self,
        l: &Layout,
        perm: &Self,
        perm_l: &Layout,
        k: usize,
        scale: Option<(&Self, &Layout)>,
    ) -> Result<Self>;
    /// `out[t] = Σ_j w[t, j] · y[inv[t·k + j]]` for `y = self` `[n·k, h]`, `inv` `[n·k]` u32,
    /// `w` `[n, k]` in the accumulation dtype; out `[n, h]` in `y`'s dtype.
    fn moe_combine(
        &self,
        l: &Layout,
        inv: &Self,
        inv_l: &Layout,
        w: &Self,
        w_l: &Layout,
    ) -> Result<Self>;
    /// `dw[t, j] = ⟨g[t], y[inv[t·k + j]]⟩` `[n, k]` in the accumulation dtype, for `y = self`
    /// `[n·k, h]` and `g` `[n, h]`.
    fn moe_combine_dw(
        &self,
        l: &Layout,
        inv: &Self,
        inv_l: &Layout,
        g: &Self,
        g_l: &Layout,
        k: usize,
    ) -> Result<Self>;
    /// Grouped matmul over the expert segments `[off[e], off[e+1])` of the rows of `self`
    /// (`x` `[m, K]`): `y[seg e] = x[seg e] · w[e]ᵀ` for `w` `[E, N, K]` (`trans_w = false`), or
    /// `x[seg e] · w[e]` for `w` `[E, K, N]` (`trans_w = true`). Rows outside every segment are 0.
    fn grouped_matmul(
        &self,
        l: &Layout,
        w: &Self,
        w_l: &Layout,
        offsets: &Self,
        off_l: &Layout,
        trans_w: bool,
    ) -> Result<Self>;
    /// Grouped weight gradient: `dw[e] = dy[seg e]ᵀ x[seg e]` `[E, N, K]` for `dy = self` `[m, N]`
    /// and `x` `[m, K]`.
    fn grouped_matmul_dw(
        &self,
        l: &Layout,
        x: &Self,
        x_l: &Layout,
        offsets: &Self,
        off_l: &Layout,
        num_experts: usize,
    ) -> Result<Self>;
    /// One fused AdamW step over every slot of every group (see [`AdamWGroup`], [`AdamWSlot`],
    /// [`AdamWHyper`]), in place: each slot's parameter and moments are read and written once.
    /// Moments are f32 (f64 for f64 parameters); the grad has the parameter's dtype. The CPU
    /// spreads the elements over threads, the CUDA backend runs one kernel launch for all slots.
    fn adamw_step(groups: &mut [AdamWGroup<'_, Self>], h: &AdamWHyper) -> Result<()>;
    /// `Σ_t Σ_i t[i]²` over every tensor (any float dtype, any view), accumulated in f64 in
    /// chunks of 4096 elements per tensor whose sums are added in order (deterministic), returned
    /// on the host. The CUDA backend runs one kernel launch for all tensors.
    fn sum_squares_multi(args: &[(&Self, &Layout)]) -> Result<f64>;

    /// One vocabulary chunk of an online log-sum-exp. `self` is the chunk's logits `[n, c]`
    /// (columns `v0..v0+c` of the full `[n, v_total]` logits), `targets` u32 `[n]`, `state` a
    /// contiguous `[n, 3]` of the accumulation dtype (f32, f64 for f64 logits) holding per row
    /// `(running max m, running Σ exp(x − m), target logit)`, updated in place:
    /// `m' = max(m, max_j x_j)`, `s' = s·exp(m − m') + Σ_j exp(x_j − m')`, and the target logit is
    /// taken when `v0 ≤ t < v0 + c` (and `t ≠ ignore_index`). Start from `(−∞, 0, 0)`; after the
    /// last chunk `logsumexp = m + ln s`. A target `≥ v_total` (not ignored) is an error on the
    /// CPU and a NaN target logit on the GPU.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_chunk_update(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        state: &mut Self,
        v0: usize,
        v_total: usize,
        ignore_index: u32,
    ) -> Result<()>;
    /// The gradient of a vocabulary chunk's logits `self` `[n, c]` (columns `v0..v0+c`):
    /// `dx[r, j] = (exp(x[r, j] − lse[r]) − [v0 + j == t[r]]) · g[r]`, a zero row where ignored.
    /// `lse` and `grad_rows` are `[n]` in the accumulation dtype; the output is a contiguous
    /// `[n, c]` of the logits' dtype.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_chunk_backward(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        lse: &Self,
        lse_l: &Layout,
        grad_rows: &Self,
        g_l: &Layout,
        v0: usize,
        ignore_index: u32,
    ) -> Result<Self>;
}

/// The parameters of a fused AdamW step that live in one buffer `param` (f32, bf16 or f64), one
/// slot each: a single tensor, or views of one stacked buffer (a MixLoRA layer's expert LoRAs).
/// The slots' runs of `param` never overlap.
pub struct AdamWGroup<'a, S> {
    pub param: &'a mut S,
    pub slots: Vec<AdamWSlot<'a, S>>,
}

/// One parameter of a fused AdamW step: contiguous runs of `len` elements starting at the given
/// element offsets of its group's parameter buffer, its moments and its gradient. The moments are
/// f32 (f64 for f64 parameters) and belong to this slot alone; the gradient has the parameter's
/// dtype (slots may read one gradient buffer).
pub struct AdamWSlot<'a, S> {
    pub param_offset: usize,
    pub exp_avg: &'a mut S,
    pub exp_avg_offset: usize,
    pub exp_avg_sq: &'a mut S,
    pub exp_avg_sq_offset: usize,
    pub grad: &'a S,
    pub grad_offset: usize,
    pub len: usize,
}

/// Hyper-parameters of one AdamW step (PyTorch's `AdamW`, decoupled weight decay). `step` is the
/// 1-based count used for bias correction; the gradient is multiplied by `grad_scale` first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_scale: f64,
    pub step: u64,
}

/// The constants of one AdamW step, in the order the update uses them (every backend rounds these
/// f64 values to its math dtype and applies them in the same order, so that f32 results agree
/// with the tensor-op formulation bit for bit on the CPU):
/// ```text
/// g  = grad · scale
/// m  = m · b1 + g · (1 − b1)            v = v · b2 + g² · (1 − b2)
/// p  = p · decay − (m / (√(v · inv_bc2) + eps)) · step_size
/// decay = 1 − lr·wd, inv_bc2 = 1 / (1 − b2ᵗ), step_size = lr / (1 − b1ᵗ)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWCoefficients {
    pub scale: f64,
    pub b1: f64,
    pub one_minus_b1: f64,
    pub b2: f64,
    pub one_minus_b2: f64,
    pub inv_bc2: f64,
    pub eps: f64,
    pub decay: f64,
    pub step_size: f64,
}

impl AdamWHyper {
    pub fn coefficients(&self) -> AdamWCoefficients {
        let t = self.step.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        AdamWCoefficients {
            scale: self.grad_scale,
            b1: self.beta1,
            one_minus_b1: 1.0 - self.beta1,
            b2: self.beta2,
            one_minus_b2: 1.0 - self.beta2,
            inv_bc2: 1.0 / bc2,
            eps: self.eps,
            decay: 1.0 - self.lr * self.weight_decay,
            step_size: self.lr / bc1,
        }
    }
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

/// `(b, n1, n2, d, bc, seq_dim)` of a rope call, checked: `x: [b, n1, n2, d]` with even `d` and
/// positions along dim `seq_dim` (1 or 2) of length `t`, `cos`/`sin`: `[bc, t, d/2]` with `bc` 1
/// or `b`.
pub(crate) fn rope_dims(
    l: &Layout,
    cl: &Layout,
    sl: &Layout,
    seq_dim: usize,
) -> Result<[usize; 6]> {
    let xd = l.dims();
    if xd.len() != 4 {
        return Err(Error::RankMismatch {
            op: "rope",
            expected: 4,
            shape: l.shape().clone(),
        });
    }
    if !(seq_dim == 1 || seq_dim == 2) {
        return Err(Error::invalid(
            "rope",
            format!("positions along dim {seq_dim}: neither 1 nor 2"),
        ));
    }
    let (b, n1, n2, d) = (xd[0], xd[1], xd[2], xd[3]);
    if d % 2 != 0 {
        return Err(Error::invalid(
            "rope",
            format!("head dim {d} of {} is odd", l.shape()),
        ));
    }
    let t = xd[seq_dim];
    let cd = cl.dims();
    let ok = cd.len() == 3 && (cd[0] == 1 || cd[0] == b) && cd[1] == t && cd[2] == d / 2;
    if !ok || sl.shape() != cl.shape() {
        let bad = if ok { sl } else { cl };
        return Err(Error::ShapeMismatch {
            op: "rope",
            lhs: l.shape().clone(),
            rhs: bad.shape().clone(),
        });
    }
    Ok([b, n1, n2, d, cd[0], seq_dim])
}
