//! The backward rule of [`moe_ffn`](super::moe_ffn), given `dY` `[T, H]`. It recomputes `g, u,
//! a_j` from `G, U` and the codes (saved: `G, U` `[T, I]`, the rank-r codes and the adapters in
//! the layouts the GEMMs read, never a `k·T × I` tensor):
//!
//! - `dĀ = dY W_d`; `q = B_d,eᵀ dY[t]`, `dZ_d[t,j] = s·w_j·q`, `dw_j = ⟨dĀ, a_j⟩ + s·⟨q,
//!   Z_d[t,j]⟩`;
//! - `da_j = w_j dĀ + drop_d'(A_d,eᵀ dZ_d[t,j])`, `dg_j = da_j ⊙ u ⊙ silu'(g)`, `du_j = da_j ⊙
//!   silu(g)`, `dG = Σ_j dg_j`, `dU = Σ_j du_j`, `dZ_g[t,e] = s·B_g,eᵀ dg_j` (zero for experts
//!   `t` does not use), `dZ_u` likewise;
//! - `dX = dG W_g + dU W_u + drop_g'(dZ_g A_g,all) + drop_u'(dZ_u A_u,all)`,
//!   `dA_g,all = dZ_gᵀ drop_g(X)` (one GEMM), `dA_u,all` likewise;
//! - `dB_g,e = s Σ dg_j ⊗ Z_g[t,e]`, `dB_u,e = s Σ du_j ⊗ Z_u[t,e]`, `dA_d,e = Σ dZ_d[t,j] ⊗
//!   drop_d(a_j)`, `dB_d,e = s Σ w_j dY[t] ⊗ Z_d[t,j]` over the slots routed to `e`.
//!
//! The slot terms run per chunk of tokens, as in the forward: by the block-code GEMMs (`dB_g,all
//! = dgᵀ C_g`, `B_g,eᵀ dg_j` a block of `dg B_g,all`) and the SwiGLU backward primitive, or by
//! the two backward tile kernels (rows: `dG|dU`, `dZ_g`, `dZ_u`, `dw`; columns: `dB_g`, `dB_u`,
//! `dA_d`). The weight gradients are summed over the chunks.

use super::checks::Checked;
use super::chunks::{join, Plan};
use super::codes::{block_codes, expand_summed, gather, per_expert};
use super::forward::{stacked_gate_up, Kept};
use super::primitives::{self as prim, MoeDims};
use crate::fused::lora::{add_dropped2, dropped_grad_a};
use crate::fused::{read, Operand};
use crate::{FrozenWeight, Result, Storage, Tensor};

/// What the backward rule reads besides its inputs and `dY`: the forward's results and kept
/// operands, the frozen shared weights, the sizes and settings, and the plan.
pub(super) struct Saved {
    pub gu: (Tensor, Tensor), // G, U [T, I] base
    pub zd: Tensor,           // [T, k, r] adapter
    pub ids: Tensor,          // [T, k] u32
    pub kept: Kept,
    pub w_gate: FrozenWeight,
    pub w_up: FrozenWeight,
    pub w_down: FrozenWeight,
    pub c: Checked,
    pub plan: Plan,
}

impl Saved {
    /// The tensors the node keeps alive (for the tape's memory accounting).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.gu.0, &self.gu.1, &self.zd, &self.ids];
        v.extend(self.kept.tensors());
        v
    }
}

/// Which of the op's inputs need a gradient, in the order of its tape inputs.
struct Need {
    x: bool,
    w: bool,
    a_gate: bool,
    b_gate: bool,
    a_up: bool,
    b_up: bool,
    a_down: bool,
    b_down: bool,
}

impl Need {
    fn of(inp: &[Tensor]) -> Need {
        let n = |i: usize| inp[i].tracks_grad();
        Need {
            x: n(0),
            w: n(1),
            a_gate: n(2),
            b_gate: n(3),
            a_up: n(4),
            b_up: n(5),
            a_down: n(6),
            b_down: n(7),
        }
    }

    /// `dZ_g` and `dZ_u` are needed (for `dX` or the LoRA-A gradients).
    fn dz(&self) -> bool {
        self.x || self.a_gate || self.a_up
    }
}

/// What the chunks give: per chunk the base part of `dX` (`dG W_g + dU W_u`), `dZ_g`, `dZ_u`
/// `[tc, E·r]` base and `⟨dĀ, a_j⟩` `[tc, k]`; summed over the chunks `dB_g,all`, `dB_u,all`
/// `[I, E·r]` and `dA_d,all` `[E·r, I]`.
#[derive(Default)]
struct Parts {
    dx_base: Vec<Tensor>,
    dzg: Vec<Tensor>,
    dzu: Vec<Tensor>,
    dw_act: Vec<Tensor>,
    dbg: Option<Tensor>,
    dbu: Option<Tensor>,
    dad: Option<Tensor>,
}

fn accumulate(acc: &mut Option<Tensor>, v: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => a.add(&v)?,
        None => v,
    });
    Ok(())
}

/// The rule: the gradients of `[x, w, A_g, B_g, A_u, B_u, A_d, B_d]` (`inp`) for `dy`.
pub(super) fn backward(sv: &Saved, inp: &[Tensor], dy: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let need = Need::of(inp);
    let (d, s) = (&sv.c.d, sv.c.s);
    // Down LoRA: q = B_d,eᵀ dY[t] for each slot, dZ_d = s·w_j·q.
    let q_all = dy.matmul(&sv.kept.lw.b_down)?; // [T, E·r] base: every expert's q
    let q = gather(&q_all, &sv.ids, d)?; // [T, k, r] adapter
    let dw_down = q.mul(&sv.zd)?.sum(2, false)?.affine(s, 0.0)?; // [T, k]
    let parts = if sv.plan.tiles {
        parts_tiles(sv, &need, &q, &inp[1], dy)?
    } else {
        parts_gemms(sv, &need, &q_all, &inp[1], dy)?
    };
    gradients(sv, &need, parts, &inp[0], dy, dw_down)
}

/// `dG W_g + dU W_u` `[tc, H]` of `dGU` `[tc, 2I]`: one GEMM over `[W_g; W_u]` when that is one
/// view (`w_gu`), else two.
fn dx_of_dgu(
    dgu: &Tensor,
    w_gu: Option<&Tensor>,
    w_gate: &FrozenWeight,
    w_up: &FrozenWeight,
) -> Result<Tensor> {
    let i = w_gate.dims()[0];
    match w_gu {
        Some(w) => dgu.matmul(w), // [tc, 2I] [2I, H]
        None => w_gate
            .g_w(&dgu.narrow(1, 0, i)?)?
            .add(&w_up.g_w(&dgu.narrow(1, i, i)?)?),
    }
}

/// The operands of the backward tile kernels in their order.
fn tiles_backward(
    [g, u, cg, cu, cd, ids, bg, bu, ad, dabar, w]: [Operand<'_, Storage>; 11],
) -> prim::TilesBackward<'_, Storage> {
    prim::TilesBackward {
        g,
        u,
        cg,
        cu,
        cd,
        ids,
        bg,
        bu,
        ad,
        dabar,
        w,
    }
}

/// The chunks by the backward tile kernels, from `q` `[T, k, r]` and the routing weights `wts`.
fn parts_tiles(sv: &Saved, need: &Need, q: &Tensor, wts: &Tensor, dy: &Tensor) -> Result<Parts> {
    let Checked { d, s, bt, .. } = sv.c;
    let (t, k, r, i, e) = (d.t, d.k, d.r, d.i, d.e);
    let (Kept { lw, cg, cu, .. }, ids) = (&sv.kept, &sv.ids);
    let w_gu = stacked_gate_up(&sv.w_gate, &sv.w_up);
    let mut parts = Parts::default();
    let dzd = q.mul(&wts.reshape([t, k, 1])?.affine(s, 0.0)?)?; // s·w_j·q
    let cd = dzd.to_dtype(bt)?.reshape([t * k, r])?; // [T·k, r] base
    for &(t0, tc) in &sv.plan.chunks {
        let dc = MoeDims { t: tc, t0, ..d };
        let rows = |m: &Tensor| m.narrow(0, t0 * k, tc * k);
        let dabar = sv.w_down.g_w(&dy.narrow(0, t0, tc)?)?; // [tc, I] base
        let (gc, uc) = (sv.gu.0.narrow(0, t0, tc)?, sv.gu.1.narrow(0, t0, tc)?);
        let (ids_c, wc) = (ids.narrow(0, t0, tc)?, wts.narrow(0, t0, tc)?);
        let (cgc, cuc, cdc) = (rows(cg)?, rows(cu)?, rows(&cd)?);
        let args = [
            &gc, &uc, &cgc, &cuc, &cdc, &ids_c, &lw.b_gate, &lw.b_up, &lw.a_down, &dabar, &wc,
        ];
        let want_cols = need.b_gate || need.b_up || need.a_down;
        let (g, cols) = read(args, |o| {
            prim::tiles_backward(tiles_backward(o), &dc, want_cols)
        })?;
        let dgu = Tensor::from_storage(g.dgu, [tc, 2 * i], None);
        if need.x {
            parts
                .dx_base
                .push(dx_of_dgu(&dgu, w_gu.as_ref(), &sv.w_gate, &sv.w_up)?);
        }
        if need.dz() {
            // [tc, E·r] base: s·B_eᵀ dg_j in the token's expert blocks
            let blocks = |dz: Storage| {
                let dz = Tensor::from_storage(dz, [tc, k, r], None);
                expand_summed(&dz.affine(s, 0.0)?, &ids_c, &dc)?.to_dtype(bt)
            };
            parts.dzg.push(blocks(g.dzg)?);
            parts.dzu.push(blocks(g.dzu)?);
        }
        parts.dw_act.push(Tensor::from_storage(g.dw, [tc, k], None));
        if let Some((g_b, g_u, g_d)) = cols {
            let er = e * r;
            accumulate(&mut parts.dbg, Tensor::from_storage(g_b, [i, er], None))?;
            accumulate(&mut parts.dbu, Tensor::from_storage(g_u, [i, er], None))?;
            accumulate(&mut parts.dad, Tensor::from_storage(g_d, [er, i], None))?;
        }
    }
    Ok(parts)
}

/// The chunks by the block-code GEMMs and the SwiGLU backward primitive, from `q_all` `[T, E·r]`
/// and the routing weights `wts`.
fn parts_gemms(
    sv: &Saved,
    need: &Need,
    q_all: &Tensor,
    wts: &Tensor,
    dy: &Tensor,
) -> Result<Parts> {
    let Checked { d, s, bt, at, .. } = sv.c;
    let (k, i) = (d.k, d.i);
    let (Kept { lw, cg, cu, .. }, ids) = (&sv.kept, &sv.ids);
    let w_gu = stacked_gate_up(&sv.w_gate, &sv.w_up);
    let mut parts = Parts::default();
    // [T·k, E·r] base: s·w_j·q in the slot's expert block
    let cd = block_codes(q_all, ids, Some(wts), s, false, &d, bt)?;
    for &(t0, tc) in &sv.plan.chunks {
        let dc = MoeDims { t: tc, t0, ..d };
        let rows = |m: &Tensor| m.narrow(0, t0 * k, tc * k);
        let (cgc, cuc, cdc) = (rows(cg)?, rows(cu)?, rows(&cd)?);
        let dabar = sv.w_down.g_w(&dy.narrow(0, t0, tc)?)?; // [tc, I] base
        let lg = cgc.matmul(&lw.b_gate.t()?)?; // [tc·k, I]
        let lu = cuc.matmul(&lw.b_up.t()?)?;
        let ld = cdc.matmul(&lw.a_down)?; // [tc·k, I] = A_d,eᵀ dZ_d[t,j]
        let (gc, uc) = (sv.gu.0.narrow(0, t0, tc)?, sv.gu.1.narrow(0, t0, tc)?);
        let wc = wts.narrow(0, t0, tc)?;
        let g = read(
            [&gc, &uc, &lg, &lu, &ld, &dabar, &wc],
            |[g, u, dg, du, dd, dabar, w]| {
                let o = prim::SwigluBackward {
                    g,
                    u,
                    dg,
                    du,
                    dd,
                    dabar,
                    w,
                };
                prim::swiglu_backward(o, &dc)
            },
        )?;
        drop((lg, lu, ld, dabar));
        let slot = |st: Storage| Tensor::from_storage(st, [tc * k, i], None);
        let (dgu, dg, du, am) = (
            Tensor::from_storage(g.dgu, [tc, 2 * i], None),
            slot(g.dg),
            slot(g.du),
            slot(g.am),
        );
        parts.dw_act.push(Tensor::from_storage(g.dw, [tc, k], None));
        if need.x {
            parts
                .dx_base
                .push(dx_of_dgu(&dgu, w_gu.as_ref(), &sv.w_gate, &sv.w_up)?);
        }
        let ids_c = ids.narrow(0, t0, tc)?;
        if need.dz() {
            // [tc, E·r] base: s·B_eᵀ dg_j in the token's expert blocks
            let blocks = |p: Tensor| block_codes(&p, &ids_c, None, s, true, &dc, bt);
            parts.dzg.push(blocks(dg.matmul(&lw.b_gate)?)?); // dg B_g,all [tc·k, E·r]
            parts.dzu.push(blocks(du.matmul(&lw.b_up)?)?);
        }
        if need.b_gate {
            accumulate(&mut parts.dbg, dg.t()?.matmul(&cgc)?.to_dtype(at)?)?; // [I, E·r]
        }
        if need.b_up {
            accumulate(&mut parts.dbu, du.t()?.matmul(&cuc)?.to_dtype(at)?)?;
        }
        if need.a_down {
            accumulate(&mut parts.dad, cdc.t()?.matmul(&am)?.to_dtype(at)?)?; // [E·r, I]
        }
    }
    Ok(parts)
}

/// The op's gradients from the chunks' parts: `dX` (the base part plus the LoRA-A terms of gate
/// and up, after their dropout), `dw` (the activations' part plus the down LoRA's `dw_down`),
/// the LoRA-A gradients `dZᵀ drop(X)` and the per-expert LoRA gradients, each where needed.
fn gradients(
    sv: &Saved,
    need: &Need,
    parts: Parts,
    x: &Tensor,
    dy: &Tensor,
    dw_down: Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let Checked {
        d,
        h,
        p,
        seed_g,
        seed_u,
        at,
        ..
    } = sv.c;
    let (e, r, i) = (d.e, d.r, d.i);
    let Kept { ag, au, cy, .. } = &sv.kept;
    // dZ_g, dZ_u [T, E·r] in the base dtype: the LoRA-A side of the backward runs on the
    // tensor cores, as in the forward.
    let (dzg_b, dzu_b) = if need.dz() {
        (Some(join(parts.dzg)?), Some(join(parts.dzu)?))
    } else {
        (None, None)
    };
    let dx = match (&dzg_b, &dzu_b, need.x) {
        (Some(dzg), Some(dzu), true) => {
            let lora_g = dzg.matmul(ag)?; // [T, H], before its dropout
            let lora_u = dzu.matmul(au)?;
            let base = join(parts.dx_base)?;
            Some(add_dropped2(&base, &lora_g, &lora_u, p, (seed_g, seed_u))?)
        }
        _ => None,
    };
    let dw = if need.w {
        Some(join(parts.dw_act)?.add(&dw_down)?) // [T, k]
    } else {
        None
    };
    // dA = dZᵀ drop(X) [E·r, H], in the adapter dtype.
    let da = |dz: &Option<Tensor>, seed: u64| -> Result<Option<Tensor>> {
        dz.as_ref()
            .map(|dz| {
                dropped_grad_a(dz, x, p, seed)?
                    .to_dtype(at)?
                    .reshape([e, r, h])
            })
            .transpose()
    };
    let da_gate = if need.a_gate {
        da(&dzg_b, seed_g)?
    } else {
        None
    };
    let da_up = if need.a_up { da(&dzu_b, seed_u)? } else { None };
    let db = |m: Option<Tensor>, needed: bool| {
        m.filter(|_| needed)
            .map(|m| per_expert(&m, e, r, i))
            .transpose()
    };
    let db_gate = db(parts.dbg, need.b_gate)?;
    let db_up = db(parts.dbu, need.b_up)?;
    let da_down = parts
        .dad
        .filter(|_| need.a_down)
        .map(|m| m.reshape([e, r, i]))
        .transpose()?;
    let db_down = if need.b_down {
        Some(per_expert(&dy.t()?.matmul(cy)?.to_dtype(at)?, e, r, h)?)
    } else {
        None
    };
    Ok(vec![
        dx, dw, da_gate, db_gate, da_up, db_up, da_down, db_down,
    ])
}
