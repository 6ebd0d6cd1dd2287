//! The MixLoRA FFN: a sparse mixture of `E` experts sharing the frozen SwiGLU weights, each with
//! its own LoRA on gate/up/down (docs/DESIGN.md, section 1):
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
//!
//! [`MoeImpl::Grouped`] (top-k routing) keeps everything on the device: the fused router
//! (`moe_route_topk`), a device-side grouping of the (token, slot) pairs by expert
//! (`moe_group`), one gather into slot order (`moe_permute`), the frozen base GEMMs once over
//! all `N·k` sorted rows, the experts' LoRA deltas as grouped matmuls over the expert segments
//! with the A/B matrices stacked per expert, and one weighted combine back to tokens
//! (`moe_combine`). No host read anywhere.

use engine::{rng, stack, FrozenWeight, Tensor};

use super::lora::{lora_linear, LoraLinear};
use super::mixlora_fused::FusedExperts;
use super::router::{Router, RouterOutput, Routing};
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
    /// Device-side grouping by expert and grouped LoRA matmuls (top-k routing; top-p routing
    /// and experts whose LoRAs differ in settings fall back to `Naive`). Dropout masks differ
    /// from `Naive`'s (one mask per projection over the sorted rows).
    Grouped,
    /// The fused path (`engine::moe_ffn`): every base GEMM once per token, expert LoRAs in
    /// fused kernels, a hand-written backward. Top-k routing only (top-p, and experts without
    /// a LoRA on each of gate/up/down, run `Naive`). Equal to `Naive` without dropout; with
    /// dropout its masks differ (one per projection shared by the experts for gate and up).
    /// The options pick the op's kernels and token chunk.
    Fused(engine::MoeFfnOptions),
}

impl MoeImpl {
    /// The implementation for `device` when none is asked for: `Fused` on a GPU, `Naive` on the
    /// CPU. Since the CPU's fused path runs its tile primitives it is the faster one there too at
    /// SmolLM2's shape (BENCHMARKS.md, "MixLoRA naive against fused, CPU"), about even on the
    /// built-in tiny model; the CPU default stays the reference loop until that switch is made
    /// deliberately (it changes the CPU's default results at rounding level).
    pub fn for_device(device: engine::Device) -> MoeImpl {
        match device {
            engine::Device::Cpu => MoeImpl::Naive,
            engine::Device::Cuda(_) => MoeImpl::Fused(engine::MoeFfnOptions::default()),
        }
    }

    /// The implementation for inference when none is asked for: `Fused` on every device. A
    /// forward pass without a backward runs its base GEMMs once per token (the naive loop runs
    /// them `k` times), which is faster on the CPU too (BENCHMARKS.md, "Inference with an
    /// adapter").
    pub fn for_inference(_device: engine::Device) -> MoeImpl {
        MoeImpl::Fused(engine::MoeFfnOptions::default())
    }

    /// `self` with the fused path's options replaced by `opts` (the other implementations have
    /// none).
    pub fn with_fused_options(self, opts: engine::MoeFfnOptions) -> MoeImpl {
        match self {
            MoeImpl::Fused(_) => MoeImpl::Fused(opts),
            other => other,
        }
    }

    /// The command-line name: `naive`, `paper`, `grouped` or `fused` (without the fused path's
    /// options).
    pub fn name(self) -> &'static str {
        match self {
            MoeImpl::Naive => "naive",
            MoeImpl::Paper => "paper",
            MoeImpl::Grouped => "grouped",
            MoeImpl::Fused(_) => "fused",
        }
    }
}

impl std::fmt::Display for MoeImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MoeImpl {
    type Err = String;
    /// Parses `naive`, `paper`, `grouped` or `fused` (the fused path with default options).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let fused = MoeImpl::Fused(engine::MoeFfnOptions::default());
        [MoeImpl::Naive, MoeImpl::Paper, MoeImpl::Grouped, fused]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown MoE implementation `{s}` (expected naive, paper, grouped or fused)"
                )
            })
    }
}

/// One projection's LoRA of every expert, stacked: `A` `[E, r, in]`, `B` `[E, out, r]` (in the
/// graph: gradients reach each expert's own `A`/`B`). Views of the experts' buffer when their
/// matrices lie back to back in it, as [`Adapters::init`](super::Adapters::init) and
/// [`load`](super::load) lay them out; copies otherwise.
struct StackedLora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

/// `Ok(None)`: no expert has a LoRA on this projection; `Err(())`: the experts' LoRAs differ in
/// presence, scale, dropout or shape, so they cannot be stacked.
fn stack_loras(
    loras: &[Option<&LoraLinear>],
) -> Result<std::result::Result<Option<StackedLora>, ()>> {
    if loras.iter().all(|l| l.is_none()) {
        return Ok(Ok(None));
    }
    let Some(Some(first)) = loras.first() else {
        return Ok(Err(()));
    };
    let same = |l: &&LoraLinear| {
        l.scale == first.scale
            && l.dropout == first.dropout
            && l.a.dims() == first.a.dims()
            && l.b.dims() == first.b.dims()
            && l.a.dtype() == first.a.dtype()
    };
    if !loras.iter().all(|l| l.as_ref().is_some_and(same)) {
        return Ok(Err(()));
    }
    let a: Vec<&Tensor> = loras.iter().flatten().map(|l| &l.a).collect();
    let b: Vec<&Tensor> = loras.iter().flatten().map(|l| &l.b).collect();
    Ok(Ok(Some(StackedLora {
        a: stack(&a)?, // [E, r, in]
        b: stack(&b)?, // [E, out, r]
        scale: first.scale,
        dropout: first.dropout,
    })))
}

/// `x Wᵀ + s · grouped(grouped(drop(x), A), B)` over rows `x` `[M, in]` sorted by expert with
/// segment `offsets` `[E+1]`: the frozen GEMM once over all rows, the rank-r delta per expert.
fn grouped_lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    lora: Option<&StackedLora>,
    offsets: &Tensor,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let y = w.linear(x)?; // [M, out]
    let Some(l) = lora else { return Ok(y) };
    let mut xa = x.to_dtype(l.a.dtype())?; // [M, in]
    if let Some(seed) = dropout_seed {
        xa = xa.dropout(l.dropout, seed, true)?;
    }
    let z = xa.grouped_matmul(&l.a, offsets)?.affine(l.scale, 0.0)?; // [M, r]
    let d = z.grouped_matmul(&l.b, offsets)?; // [M, out]
    Ok(y.add(&d.to_dtype(y.dtype())?)?)
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
    pub gate: &'a FrozenWeight, // [I, H]
    pub up: &'a FrozenWeight,   // [I, H]
    pub down: &'a FrozenWeight, // [H, I]
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
        self.forward_with(x, w, imp, dropout_seed, None)
    }

    /// [`MixLoraFfn::forward`] with the experts already stacked for the fused path
    /// ([`FusedExperts::for_inference`]); `None` stacks them per call. Only `MoeImpl::Fused`
    /// reads them.
    pub fn forward_with(
        &self,
        x: &Tensor,
        w: SharedFfn<'_>,
        imp: MoeImpl,
        dropout_seed: Option<u64>,
        stacked: Option<&FusedExperts>,
    ) -> Result<(Tensor, RouterOutput)> {
        let h = *x.dims().last().unwrap_or(&0);
        let n = x.elem_count() / h.max(1);
        let x2 = x.reshape([n, h])?; // [N, H]
        let route = self.router.route(&x2)?;
        let y = match imp {
            MoeImpl::Naive => self.naive(&x2, w, &route, dropout_seed)?,
            MoeImpl::Paper => self.paper(&x2, w, &route, dropout_seed)?,
            MoeImpl::Grouped => match self.grouped(&x2, w, &route, dropout_seed)? {
                Some(y) => y,
                None => self.naive(&x2, w, &route, dropout_seed)?,
            },
            MoeImpl::Fused(opts) => {
                let fused = match self.router.routing {
                    Routing::TopK(k) => {
                        self.fused(&x2, w, &route, k, dropout_seed, &opts, stacked)?
                    }
                    Routing::TopP(_) => None,
                };
                match fused {
                    Some(y) => y,
                    None => self.naive(&x2, w, &route, dropout_seed)?,
                }
            }
        };
        Ok((y.reshape(x.shape().clone())?, route))
    }

    /// The grouped path (see the module doc); `None` when it does not apply (top-p routing, or
    /// expert LoRAs that cannot be stacked).
    fn grouped(
        &self,
        x: &Tensor, // [N, H] base dtype
        w: SharedFfn<'_>,
        route: &RouterOutput,
        dropout_seed: Option<u64>,
    ) -> Result<Option<Tensor>> {
        let Some((ids, tw)) = &route.topk else {
            return Ok(None);
        };
        let k = ids.dims()[1];
        let pick = |f: fn(&ExpertLora) -> Option<&LoraLinear>| {
            stack_loras(&self.experts.iter().map(f).collect::<Vec<_>>())
        };
        let (Ok(gate), Ok(up), Ok(down)) = (
            pick(|e| e.gate.as_ref())?,
            pick(|e| e.up.as_ref())?,
            pick(|e| e.down.as_ref())?,
        ) else {
            return Ok(None);
        };
        let (perm, offsets) = ids.moe_group(self.num_experts())?; // [N·k], [E+1] u32
        let xs = x.moe_permute(&perm, k)?; // [N·k, H] slot rows sorted by expert
        let seed = |j: u64| dropout_seed.map(|s| rng::hash(s, j));
        let g = grouped_lora_linear(&xs, w.gate, gate.as_ref(), &offsets, seed(0))?; // [N·k, I]
        let u = grouped_lora_linear(&xs, w.up, up.as_ref(), &offsets, seed(1))?; // [N·k, I]
        let a = g.silu_mul(&u)?; // [N·k, I]
        let yd = grouped_lora_linear(&a, w.down, down.as_ref(), &offsets, seed(2))?; // [N·k, H]
                                                                                     // Σ_j w[t, j] · y[slot t·k + j], accumulated in f32 (f64) and rounded once to x's dtype.
        Ok(Some(yd.moe_combine(&perm, tw)?)) // [N, H]
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
        let g_all = w.gate.linear(x)?; // [N, I]
        let u_all = w.up.linear(x)?; // [N, I]
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
