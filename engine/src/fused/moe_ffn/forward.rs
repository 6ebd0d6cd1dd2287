//! The forward of [`moe_ffn`](super::moe_ffn), without a tape (the op records its own node):
//!
//! - `G = X W_gᵀ`, `U = X W_uᵀ` `[T, I]` (one GEMM over `[W_g; W_u]` when both are adjacent row
//!   blocks of one buffer), `Z_g = drop_g(X) A_g,allᵀ`, `Z_u = drop_u(X) A_u,allᵀ` `[T, E·r]` (all
//!   experts' `A` in one GEMM each);
//! - per slot `(t, j)`, `e = ids[t, j]`: `g = G[t] + s·B_g,e Z_g[t,e]`, `u = U[t] + s·B_u,e
//!   Z_u[t,e]`, `a_j = silu(g) ⊙ u`; `Ā[t] = Σ_j w_j a_j` `[T, I]`, `Z_d[t,j] = A_d,e drop_d(a_j)`
//!   `[T, k, r]`;
//! - `Y = Ā W_dᵀ + s Σ_j w_j B_d,e Z_d[t,j]`.
//!
//! The slot terms run per chunk of tokens: with the block-code GEMMs (`s·B_g,e Z_g[t,e]` of every
//! slot is `C_g B_g,allᵀ` for the block codes `C_g` `[T·k, E·r]`) and the SwiGLU primitive, or
//! with the forward tile kernel, which takes the compact codes `[T·k, r]`.

use super::checks::Checked;
use super::chunks::{join, Plan};
use super::codes::{all_a, compact_codes, down_codes, gather, slot_codes, LoraLayouts};
use super::primitives::{self as prim, MoeDims};
use super::{MoeFusedWeights, MoeRouting};
use crate::autograd::NoGradGuard;
use crate::fused::lora::dropped_codes;
use crate::fused::read;
use crate::{FrozenWeight, Layout, Result, Shape, Tensor};

/// What the forward computes and returns or keeps for the backward.
pub(super) struct Forward {
    pub gu: (Tensor, Tensor), // G, U [T, I] base
    pub zd: Tensor,           // [T, k, r] adapter
    pub y: Tensor,            // [T, H] base
    pub kept: Kept,
}

/// The forward's operands that the backward reuses instead of rebuilding: a few MB a layer at
/// LLaMA-2-7B sizes (nothing `[T·k, I]`), which spares the backward some twenty small launches.
pub(super) struct Kept {
    pub lw: LoraLayouts,
    pub ag: Tensor, // [E·r, H] base: every expert's A_gate
    pub au: Tensor, // [E·r, H] base: every expert's A_up
    pub cg: Tensor, // s·Z_g of every slot: block codes [T·k, E·r] or, for the tile kernels, [T·k, r]
    pub cu: Tensor, // s·Z_u likewise
    pub cy: Tensor, // [T, E·r] base: the down-LoRA codes s·w_j·Z_d[t, j] in block form
}

impl Kept {
    pub fn tensors(&self) -> [&Tensor; 9] {
        let l = &self.lw;
        [
            &l.b_gate, &l.b_up, &l.a_down, &l.b_down, &self.ag, &self.au, &self.cg, &self.cu,
            &self.cy,
        ]
    }
}

/// `[W_g; W_u]` `[2I, H]` as one view when both are dense and `W_u` is the row block right after
/// `W_g` in one buffer.
pub(super) fn stacked_gate_up(w_gate: &FrozenWeight, w_up: &FrozenWeight) -> Option<Tensor> {
    let (w_gate, w_up) = (w_gate.dense()?, w_up.dense()?);
    let (lg, lu) = (w_gate.layout(), w_up.layout());
    let (i, h) = (lg.dims()[0], lg.dims()[1]);
    let adjacent = w_gate.same_storage(w_up)
        && lg.is_contiguous()
        && lu.is_contiguous()
        && lu.offset() == lg.offset() + i * h;
    adjacent.then(|| {
        w_gate.view(
            Layout::new(Shape::from([2 * i, h]), vec![h, 1], lg.offset()),
            None,
        )
    })
}

/// `G = X W_gᵀ`, `U = X W_uᵀ` `[T, I]` (views of one `[T, 2I]` product when possible).
fn gate_up(x: &Tensor, w_gate: &FrozenWeight, w_up: &FrozenWeight) -> Result<(Tensor, Tensor)> {
    let i = w_gate.dims()[0];
    match stacked_gate_up(w_gate, w_up) {
        Some(w) => {
            let gu = x.matmul(&w.t()?)?; // [T, 2I]
            Ok((gu.narrow(1, 0, i)?, gu.narrow(1, i, i)?))
        }
        None => Ok((w_gate.x_wt(x)?, w_up.x_wt(x)?)),
    }
}

/// The inputs of the slot terms, shared by both ways of computing them.
struct Slots<'a> {
    gu: &'a (Tensor, Tensor),
    zg: &'a Tensor,
    zu: &'a Tensor,
    lw: &'a LoraLayouts,
    w_down: &'a FrozenWeight,
    route: &'a MoeRouting<'a>,
}

/// What the slot terms give: the codes of gate and up kept for the backward, and per chunk
/// `Z_d` `[tc, k, r]` and `Ā W_dᵀ` `[tc, H]`.
struct SlotOut {
    cg: Tensor,
    cu: Tensor,
    zd: Vec<Tensor>,
    y0: Vec<Tensor>,
}

/// The forward (module doc); the tape records nothing inside it.
pub(super) fn forward(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    route: &MoeRouting<'_>,
    c: &Checked,
    plan: &Plan,
) -> Result<Forward> {
    let _ng = NoGradGuard::new();
    let (bt, at, p, s) = (c.bt, c.at, c.p, c.s);
    // The LoRA-A codes of the dropped x against every expert's A in the base dtype, summed
    // in the adapter dtype (on the GPU one tensor-core pass over x, the mask on the fly).
    let (ag, au) = (all_a(w.a_gate, bt)?, all_a(w.a_up, bt)?); // [E·r, H] base
    let zg = dropped_codes(x, &ag, p, c.seed_g)?.to_dtype(at)?; // [T, E·r]
    let zu = dropped_codes(x, &au, p, c.seed_u)?.to_dtype(at)?; // [T, E·r]
    let gu = gate_up(x, w.w_gate, w.w_up)?; // [T, I] each
    let lw = LoraLayouts::new(w.b_gate, w.b_up, w.a_down, w.b_down, bt)?;
    let slots = Slots {
        gu: &gu,
        zg: &zg,
        zu: &zu,
        lw: &lw,
        w_down: w.w_down,
        route,
    };
    let SlotOut { cg, cu, zd, y0 } = if plan.tiles {
        slots_tiles(&slots, c, plan)?
    } else {
        slots_gemms(&slots, c, plan)?
    };
    let zd = join(zd)?; // [T, k, r] adapter
    let y0 = join(y0)?; // [T, H] base
    let cy = down_codes(&zd, route.weights, route.ids, s, &c.d)?; // [T, E·r] adapter
    let cy = cy.to_dtype(bt)?; // the GEMM's operand, kept for dB_down
    let y = y0.add(&cy.matmul(&lw.b_down.t()?)?)?;
    Ok(Forward {
        gu,
        zd,
        y,
        kept: Kept {
            lw,
            ag,
            au,
            cg,
            cu,
            cy,
        },
    })
}

/// The slot terms by the forward tile kernel, per chunk, from the compact codes `[T·k, r]`.
fn slots_tiles(o: &Slots<'_>, c: &Checked, plan: &Plan) -> Result<SlotOut> {
    let (d, k, r, i, s, bt) = (c.d, c.d.k, c.d.r, c.d.i, c.s, c.bt);
    let (ids, lw) = (o.route.ids, o.lw);
    let cg = compact_codes(o.zg, ids, s, &d, bt)?; // [T·k, r] base
    let cu = compact_codes(o.zu, ids, s, &d, bt)?;
    let (mut zd, mut y0) = (Vec::new(), Vec::new());
    for &(t0, tc) in &plan.chunks {
        let dc = MoeDims { t: tc, t0, ..d };
        let (gc, uc) = (o.gu.0.narrow(0, t0, tc)?, o.gu.1.narrow(0, t0, tc)?);
        let (cgc, cuc) = (cg.narrow(0, t0 * k, tc * k)?, cu.narrow(0, t0 * k, tc * k)?);
        let ids_c = ids.narrow(0, t0, tc)?;
        let wc = o.route.weights.narrow(0, t0, tc)?;
        let operands = [
            &gc, &uc, &cgc, &cuc, &ids_c, &lw.b_gate, &lw.b_up, &lw.a_down, &wc,
        ];
        let (abar, zd_c) = read(operands, |[g, u, cg, cu, ids, bg, bu, ad, w]| {
            let o = prim::TilesForward {
                g,
                u,
                cg,
                cu,
                ids,
                bg,
                bu,
                ad,
                w,
            };
            prim::tiles_forward(o, &dc)
        })?;
        let abar = Tensor::from_storage(abar, [tc, i], None);
        y0.push(o.w_down.x_wt(&abar)?); // [tc, H]
        zd.push(Tensor::from_storage(zd_c, [tc, k, r], None)); // [tc, k, r]
    }
    Ok(SlotOut { cg, cu, zd, y0 })
}

/// The slot terms by the block-code GEMMs and the SwiGLU primitive, per chunk.
fn slots_gemms(o: &Slots<'_>, c: &Checked, plan: &Plan) -> Result<SlotOut> {
    let (d, k, i, s, bt) = (c.d, c.d.k, c.d.i, c.s, c.bt);
    let (ids, lw) = (o.route.ids, o.lw);
    let cg = slot_codes(o.zg, ids, s, &d, bt)?; // [T·k, E·r] base
    let cu = slot_codes(o.zu, ids, s, &d, bt)?;
    let (mut zd, mut y0) = (Vec::new(), Vec::new());
    for &(t0, tc) in &plan.chunks {
        let dc = MoeDims { t: tc, t0, ..d };
        let (gc, uc) = (o.gu.0.narrow(0, t0, tc)?, o.gu.1.narrow(0, t0, tc)?);
        let (cgc, cuc) = (cg.narrow(0, t0 * k, tc * k)?, cu.narrow(0, t0 * k, tc * k)?);
        let lg = cgc.matmul(&lw.b_gate.t()?)?; // [tc·k, I] = s·B_g,e Z_g[t,e]
        let lu = cuc.matmul(&lw.b_up.t()?)?;
        let wc = o.route.weights.narrow(0, t0, tc)?;
        let (abar, am) = read([&gc, &uc, &lg, &lu, &wc], |[g, u, dg, du, w]| {
            prim::swiglu_forward(prim::SwigluForward { g, u, dg, du, w }, &dc)
        })?;
        drop((lg, lu));
        let abar = Tensor::from_storage(abar, [tc, i], None); // [tc, I]
        let am = Tensor::from_storage(am, [tc * k, i], None); // [tc·k, I]
        let ids_c = ids.narrow(0, t0, tc)?;
        zd.push(gather(&am.matmul(&lw.a_down.t()?)?, &ids_c, &dc)?); // [tc, k, r]
        y0.push(o.w_down.x_wt(&abar)?); // [tc, H]
    }
    Ok(SlotOut { cg, cu, zd, y0 })
}
