//! The MixLoRA router and its load-balance loss.
//!
//! For `N` tokens `x` `[N, H]` and a router `W_r` `[E, H]` (no bias, adapter dtype):
//! `p = softmax(x W_rᵀ)` `[N, E]`. Both strategies reduce to a 0/1 selection mask `M` `[N, E]`
//! (no gradient) and dense combine weights `w` `[N, E]` that are zero off the selection:
//! - top-k: `M[t, e] = 1` for the k largest `p[t, ·]`, `w = p⊙M / Σ_e (p⊙M)` (renormalised);
//! - top-p: sort `p[t, ·]` decreasingly, keep expert `j` while the sum of the ones before it is
//!   `≤ top_p` (so the one whose inclusion passes `top_p` is kept too), `w = p⊙M` (no
//!   renormalisation).
//!
//! Everything stays on the device and in the graph: gradients reach `W_r` (and `x`) through `p`.

use engine::{DType, Device, Tensor};

use crate::error::Result;

/// Which experts a token goes to: the router's runtime form of a
/// [`RoutingStrategy`](super::RoutingStrategy) with its parameter. The adapter file and the
/// command line keep the strategy and `top_k` / `top_p` apart;
/// [`AdapterConfig::routing`](super::AdapterConfig::routing) joins them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// The `k` most probable experts, weights renormalised.
    TopK(usize),
    /// The most probable experts until their cumulative probability passes `p`.
    TopP(f64),
}

/// One layer's router.
#[derive(Clone, Debug)]
pub struct Router {
    pub weight: Tensor, // [E, H], adapter dtype
    pub routing: Routing,
}

/// What a router decided for `N` tokens.
#[derive(Clone, Debug)]
pub struct RouterOutput {
    /// The router logits `x W_rᵀ` `[N, E]`, in the graph (the z-loss reads them).
    pub logits: Tensor,
    /// `softmax(x W_rᵀ)` `[N, E]`, in the graph.
    pub probs: Tensor,
    /// `1` where token `t` goes to expert `e`, else `0` `[N, E]`, adapter dtype, no gradient.
    pub mask: Tensor,
    /// Combine weights `[N, E]`, zero off the mask, in the graph.
    pub weights: Tensor,
    /// Top-k routing only: the chosen experts `[N, k]` u32 (largest first) and their
    /// renormalised weights `[N, k]` (in the graph), from which `mask` and `weights` are
    /// scattered. `None` for top-p routing.
    pub topk: Option<(Tensor, Tensor)>,
}

impl Router {
    pub fn num_experts(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Routes the rows of `x` `[N, H]` (any float dtype; cast to the router's).
    pub fn route(&self, x: &Tensor) -> Result<RouterOutput> {
        let e = self.num_experts();
        let n = x.dims()[0];
        let (dt, dev) = (self.weight.dtype(), self.weight.device());
        // In the router's dtype; the tape keeps x as it is, not an f32 copy of it.
        let logits = x.matmul_cast(&self.weight.t()?)?; // [N, E]
        let zeros = Tensor::zeros([n, e], dt, dev)?;
        match self.routing {
            Routing::TopK(k) => {
                // One fused kernel: softmax, top-k, renormalised weights (all on the device).
                let (probs, ids, w) = logits.moe_route_topk(k)?; // [N, E], [N, k] u32, [N, k]
                let ones = Tensor::ones([n, k], dt, dev)?;
                let mask = zeros.scatter_add(&ids, &ones, 1)?; // [N, E]
                let weights = zeros.scatter_add(&ids, &w, 1)?; // [N, E], in the graph
                Ok(RouterOutput {
                    logits,
                    probs,
                    mask,
                    weights,
                    topk: Some((ids, w)),
                })
            }
            Routing::TopP(top_p) => {
                let probs = logits.softmax_last_dim()?; // [N, E]
                let p = probs.detach(); // the selection itself has no gradient
                let (sorted, order) = p.topk(e)?; // [N, E] decreasing, [N, E] u32
                                                  // Exclusive cumulative sums: before[t, j] = Σ_{i<j} sorted[t, i].
                let before = sorted.matmul(&strict_upper_ones(e, dt, dev)?)?; // [N, E]
                let keep = before.gt_scalar(top_p)?.to_dtype(dt)?.affine(-1.0, 1.0)?; // [N, E]
                let mask = zeros.scatter_add(&order, &keep, 1)?; // [N, E], expert order
                let weights = probs.mul(&mask)?;
                Ok(RouterOutput {
                    logits,
                    probs,
                    mask,
                    weights,
                    topk: None,
                })
            }
        }
    }
}

/// `U[i, j] = 1` for `i < j`, else 0 (`[E, E]`): `v U` is the exclusive prefix sum of `v`.
fn strict_upper_ones(e: usize, dtype: DType, device: Device) -> Result<Tensor> {
    let v: Vec<f64> = (0..e * e)
        .map(|ij| if ij / e < ij % e { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_f64(&v, [e, e], dtype, device)?)
}

/// Real-token weights `[N, 1]` (1 = real, 0 = padding) of a `[B, T]` u32 key mask, in `dtype`.
pub fn token_weights(key_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let n = key_mask.elem_count();
    Ok(key_mask.reshape([n, 1])?.ne_scalar(0.0)?.to_dtype(dtype)?)
}

/// The load-balance loss of MoE-PEFT / Mixtral over every MoE layer's router output and every
/// non-padding token (`token_weights` `[N, 1]`, `None`: all tokens are real):
///
/// the router outputs of the `L` layers are concatenated into `L·n` rows (`n` real tokens),
/// `P[e] = mean_rows p[row, e]`, `f[j, e] = mean_rows 1[sel(row, j) = e]`, and
/// `aux = coef · E · Σ_{j,e} f[j, e] · P[e] = coef · E · Σ_e F[e] P[e]` with
/// `F[e] = Σ_j f[j, e] = mean_rows M[row, e]`. Note that this is neither the sum nor the mean of
/// per-layer losses: `F` and `P` are averaged over all layers before their product. Only `P`
/// carries a gradient: `daux/dp[row, e] = coef · E · F[e] / (L·n)`.
pub fn aux_loss(
    outputs: &[RouterOutput],
    token_weights: Option<&Tensor>,
    coef: f64,
) -> Result<Option<Tensor>> {
    let Some(first) = outputs.first() else {
        return Ok(None);
    };
    let e = first.probs.dims()[1];
    let (mut f_sum, mut p_sum) = (None::<Tensor>, None::<Tensor>);
    for o in outputs {
        let (m, p) = match token_weights {
            Some(w) => (o.mask.mul(w)?, o.probs.mul(w)?), // [N, E]
            None => (o.mask.clone(), o.probs.clone()),
        };
        let (m, p) = (m.sum(0, false)?, p.sum(0, false)?); // [E]
        f_sum = Some(match f_sum {
            None => m,
            Some(s) => s.add(&m)?,
        });
        p_sum = Some(match p_sum {
            None => p,
            Some(s) => s.add(&p)?,
        });
    }
    let (Some(f_sum), Some(p_sum)) = (f_sum, p_sum) else {
        return Ok(None);
    };
    let n_real = match token_weights {
        Some(w) => w.sum_all()?.clamp_min(1.0)?, // [] on the device
        None => Tensor::scalar(
            first.probs.dims()[0].max(1) as f64,
            p_sum.dtype(),
            p_sum.device(),
        )?,
    };
    let rows = n_real.affine(outputs.len() as f64, 0.0)?; // L·n
    let f = f_sum.div(&rows)?; // [E]
    let p = p_sum.div(&rows)?; // [E]
    Ok(Some(f.mul(&p)?.sum_all()?.affine(coef * e as f64, 0.0)?))
}

/// The router z-loss of ST-MoE (Zoph et al., arXiv 2202.08906) over every MoE layer's router
/// logits `l` `[N, E]` and every non-padding token (`token_weights` `[N, 1]`, `None`: all tokens
/// are real), averaged like [`aux_loss`] over the `L·n` rows of all layers:
///
/// `z = coef · (1 / (L·n)) · Σ_rows lse(l[row, ·])²`, `lse(v) = log Σ_e exp(v_e)`.
///
/// It pulls the logits' scale down without favouring an expert: `dz/dl[row, e] =
/// coef · 2·lse(l[row, ·]) · p[row, e] / (L·n)`. `lse` is computed as `m + log Σ_e exp(l_e − m)`
/// with `m` the row's maximum, held constant (its gradient cancels exactly). `None` for no layer
/// or a zero coefficient (the paper's loss: nothing is computed).
pub fn z_loss(
    outputs: &[RouterOutput],
    token_weights: Option<&Tensor>,
    coef: f64,
) -> Result<Option<Tensor>> {
    if coef == 0.0 || outputs.is_empty() {
        return Ok(None);
    }
    let mut total: Option<Tensor> = None;
    for o in outputs {
        let l = &o.logits; // [N, E]
        let m = l.detach().max(1, true)?; // [N, 1], constant
        let lse = l.sub(&m)?.exp()?.sum(1, true)?.log()?.add(&m)?; // [N, 1]
        let sq = lse.sqr()?; // [N, 1]
        let sq = match token_weights {
            Some(w) => sq.mul(w)?,
            None => sq,
        };
        let s = sq.sum_all()?; // []
        total = Some(match total {
            None => s,
            Some(t) => t.add(&s)?,
        });
    }
    let Some(total) = total else {
        return Ok(None);
    };
    let first = &outputs[0];
    let n_real = match token_weights {
        Some(w) => w.sum_all()?.clamp_min(1.0)?,
        None => Tensor::scalar(
            first.logits.dims()[0].max(1) as f64,
            total.dtype(),
            total.device(),
        )?,
    };
    let rows = n_real.affine(outputs.len() as f64, 0.0)?; // L·n
    Ok(Some(total.div(&rows)?.affine(coef, 0.0)?))
}

/// The share of routed (token, slot) pairs each expert received over the real tokens, `[E]` f32,
/// no gradient: `load[e] = Σ_t w_t M[t, e] / Σ_{t,e} w_t M[t, e]`.
pub fn expert_load(output: &RouterOutput, token_weights: Option<&Tensor>) -> Result<Tensor> {
    let m = output.mask.detach();
    let m = match token_weights {
        Some(w) => m.mul(&w.detach())?,
        None => m,
    };
    let counts = m.sum(0, false)?; // [E]
    let total = counts.sum_all()?.clamp_min(1.0)?;
    Ok(counts.div(&total)?.to_dtype(DType::F32)?)
}
