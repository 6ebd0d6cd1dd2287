//! The MixLoRA FFN: a sparse mixture of `E` experts sharing the frozen SwiGLU weights, each with
//! its own LoRA on gate/up/down (MIXLORA.md):
//!
//! `y_e(x) = (W_d + s·B_d,e A_d,e) [ silu((W_g + s·B_g,e A_g,e) x) ⊙ ((W_u + s·B_u,e A_u,e) x) ]`,
//! `y(x) = Σ_{e ∈ sel(x)} w_e(x) · y_e(x)` with the router's selection and weights.
//!
//! [`MoeImpl::Naive`] computes it as a per-expert loop of engine ops (gather the expert's tokens,
//! run its LoRA FFN, scale by the routing weight, scatter-add): the reference that fused
//! implementations are checked against. Its backward is the tape's. [`MoeImpl::Paper`] is the
//! MixLoRA paper's optimisation (†): the frozen gate and up projections run once over all tokens,
//! each expert slices its rows of them and adds its LoRA deltas, and the down projection still
//! runs per expert.

use engine::{rng, Tensor};

use super::lora::{linear, lora_linear, LoraLinear};
use super::router::{Router, RouterOutput};
use crate::error::Result;

/// How the MoE FFN is computed. Every variant gives the same values and gradients (up to
/// rounding); later fused variants are tested against `Naive`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeImpl {
    /// For each expert: `index_select` its tokens, LoRA SwiGLU, `index_add_weighted` back.
    #[default]
    Naive,
    /// The paper's † version: `G = X W_gᵀ`, `U = X W_uᵀ` once for all tokens; per expert, its rows
    /// of `G`, `U` plus its LoRA deltas, then its own down projection on its rows.
    Paper,
}

/// One expert's LoRA on the shared gate/up/down projections (`None`: not a target module).
#[derive(Clone, Debug, Default)]
pub struct ExpertLora {
    pub gate: Option<LoraLinear>, // A [r, H], B [I, r]
    pub up: Option<LoraLinear>,   // A [r, H], B [I, r]
    pub down: Option<LoraLinear>, // A [r, I], B [H, r]
}

/// The frozen SwiGLU weights that all experts share, stored `[out, in]`.
#[derive(Clone, Copy, Debug)]
pub struct SharedFfn<'a> {
    pub gate: &'a Tensor, // [I, H]
    pub up: &'a Tensor,   // [I, H]
    pub down: &'a Tensor, // [H, I]
}

/// A MixLoRA FFN block: a router and `E` experts.
#[derive(Clone, Debug)]
pub struct MixLoraFfn {
    pub router: Router,
    pub experts: Vec<ExpertLora>,
}

impl ExpertLora {
    /// The expert's SwiGLU on its tokens `x` `[n, H]` (base dtype) -> `[n, H]` (base dtype).
    /// Dropout seeds, when given, differ per projection.
    pub fn forward(
        &self,
        x: &Tensor,
        w: SharedFfn<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let seed = |j: u64| dropout_seed.map(|s| rng::hash(s, j));
        let g = lora_linear(x, w.gate, self.gate.as_ref(), seed(0))?; // [n, I]
        let u = lora_linear(x, w.up, self.up.as_ref(), seed(1))?; // [n, I]
        let a = g.silu_mul(&u)?; // [n, I]
        lora_linear(&a, w.down, self.down.as_ref(), seed(2)) // [n, H]
    }
}

impl MixLoraFfn {
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// `y` with `x`'s shape `[.., H]` and dtype, and the router's decisions for the `N` rows of
    /// `x` (flattened). `dropout_seed` (training only) seeds every expert LoRA's dropout.
    pub fn forward(
        &self,
        x: &Tensor,
        w: SharedFfn<'_>,
        imp: MoeImpl,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, RouterOutput)> {
        let h = *x.dims().last().unwrap_or(&0);
        let n = x.elem_count() / h.max(1);
        let x2 = x.reshape([n, h])?; // [N, H]
        let route = self.router.route(&x2)?;
        let y = match imp {
            MoeImpl::Naive => self.naive(&x2, w, &route, dropout_seed)?,
            MoeImpl::Paper => self.paper(&x2, w, &route, dropout_seed)?,
        };
        Ok((y.reshape(x.shape().clone())?, route))
    }

    /// The per-expert loop: `y = Σ_e index_add(tokens_e, w[tokens_e, e] · y_e(x[tokens_e]))`,
    /// accumulated in the router's dtype (f32 under a bf16 base) and cast back to `x`'s.
    fn naive(
        &self,
        x: &Tensor, // [N, H] base dtype
        w: SharedFfn<'_>,
        route: &RouterOutput,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (n, h) = (x.dims()[0], x.dims()[1]);
        let acc_dtype = route.weights.dtype();
        let mut y = Tensor::zeros([n, h], acc_dtype, x.device())?; // [N, H]
        let groups = expert_tokens(&route.mask)?;
        for (e, (expert, ids)) in self.experts.iter().zip(&groups).enumerate() {
            let Some(ids) = ids else { continue }; // no token for this expert
            let xe = x.index_select(ids, 0)?; // [n_e, H]
            let seed = dropout_seed.map(|s| rng::hash(s, e as u64));
            let ye = expert.forward(&xe, w, seed)?.to_dtype(acc_dtype)?; // [n_e, H]
            let we = route
                .weights
                .narrow(1, e, 1)?
                .reshape([n])?
                .index_select(ids, 0)?; // [n_e]
            y = y.index_add_weighted(ids, &ye, &we, 0)?;
        }
        Ok(y.to_dtype(x.dtype())?)
    }
}

impl MixLoraFfn {
    /// The paper's † version: `G`, `U` from one pass of the frozen gate and up projections over
    /// all `N` tokens; for expert `e` with tokens `ids`: `g = G[ids] + Δ_g,e(x[ids])`,
    /// `u = U[ids] + Δ_u,e(x[ids])`, `y_e = lora_linear(silu(g) ⊙ u, W_d, down_e)`, then the
    /// weighted scatter-add as in [`MixLoraFfn::naive`]. The same values as the naive loop.
    fn paper(
        &self,
        x: &Tensor, // [N, H] base dtype
        w: SharedFfn<'_>,
        route: &RouterOutput,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (n, h) = (x.dims()[0], x.dims()[1]);
        let acc_dtype = route.weights.dtype();
        let g_all = linear(x, w.gate)?; // [N, I]
        let u_all = linear(x, w.up)?; // [N, I]
        let mut y = Tensor::zeros([n, h], acc_dtype, x.device())?; // [N, H]
        let groups = expert_tokens(&route.mask)?;
        for (e, (expert, ids)) in self.experts.iter().zip(&groups).enumerate() {
            let Some(ids) = ids else { continue };
            let xe = x.index_select(ids, 0)?; // [n_e, H]
            let seed = dropout_seed.map(|s| rng::hash(s, e as u64));
            let sub = |j: u64| seed.map(|s| rng::hash(s, j));
            let with_delta = |base: Tensor, l: Option<&LoraLinear>, j| -> Result<Tensor> {
                match l {
                    None => Ok(base),
                    Some(l) => l.add_to(&base, &xe, sub(j)),
                }
            };
            let g = with_delta(g_all.index_select(ids, 0)?, expert.gate.as_ref(), 0)?; // [n_e, I]
            let u = with_delta(u_all.index_select(ids, 0)?, expert.up.as_ref(), 1)?; // [n_e, I]
            let a = g.silu_mul(&u)?; // [n_e, I]
            let ye = lora_linear(&a, w.down, expert.down.as_ref(), sub(2))?.to_dtype(acc_dtype)?;
            let we = route
                .weights
                .narrow(1, e, 1)?
                .reshape([n])?
                .index_select(ids, 0)?; // [n_e]
            y = y.index_add_weighted(ids, &ye, &we, 0)?;
        }
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// The tokens routed to each expert, as u32 id tensors on the mask's device (`None` for an
/// expert that received no token), from the selection mask `[N, E]`.
///
/// This is the one host round trip of the naive path: the number of tokens an expert receives
/// is a shape, and shapes live on the host, so the per-expert gather needs the mask read back
/// once per layer (`N·E` values). A fused GPU implementation groups tokens by expert on the
/// device instead (a sort by expert id and offsets read by the kernels), and never calls this.
fn expert_tokens(mask: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let (n, e) = (mask.dims()[0], mask.dims()[1]);
    let m = mask.to_vec_f64()?; // host copy of [N, E]
    (0..e)
        .map(|j| {
            let ids: Vec<u32> = (0..n)
                .filter(|&t| m[t * e + j] != 0.0)
                .map(|t| t as u32)
                .collect();
            if ids.is_empty() {
                return Ok(None);
            }
            let len = ids.len();
            Ok(Some(Tensor::from_vec(ids, len, mask.device())?))
        })
        .collect()
}
