//! The fused MixLoRA FFN ("path 3" of MIXLORA.md): one autograd op with a hand-written backward.
//!
//! With `T` tokens `X` `[T, H]`, top-k routing (`ids` `[T, k]`, weights `w` `[T, k]`), the frozen
//! shared SwiGLU `W_g, W_u` `[I, H]`, `W_d` `[H, I]` and per-expert LoRAs `A_g,e, A_u,e` `[r, H]`,
//! `B_g,e, B_u,e` `[I, r]`, `A_d,e` `[r, I]`, `B_d,e` `[H, r]` with scale `s`:
//!
//! forward
//! - `G = X W_gᵀ`, `U = X W_uᵀ` `[T, I]` (one GEMM over `[W_g; W_u]` when both are adjacent row
//!   blocks of one buffer), `Z_g = drop_g(X) A_g,allᵀ`, `Z_u = drop_u(X) A_u,allᵀ` `[T, E·r]` (all
//!   experts' `A` in one GEMM each);
//! - per slot `(t, j)`, `e = ids[t, j]`: `g = G[t] + s·B_g,e Z_g[t,e]`, `u = U[t] + s·B_u,e
//!   Z_u[t,e]`, `a_j = silu(g) ⊙ u`; `Ā[t] = Σ_j w_j a_j` `[T, I]` and `Z_d[t,j] = A_d,e drop_d(a_j)`
//!   `[T, k, r]`, both from one kernel that never stores `a_j`;
//! - `Y = Ā W_dᵀ + s Σ_j w_j B_d,e Z_d[t,j]` (a GEMM and a small kernel).
//!
//! backward (recomputing `g, u, a` from `G, U, Z`; saved: `G, U` `[T, I]` and the rank-r codes)
//! - `dĀ = dY W_d`; `q = B_d,eᵀ dY[t]`, `dZ_d[t,j] = s·w_j·q`, `dw_j = ⟨dĀ, a_j⟩ + s·⟨q, Z_d[t,j]⟩`;
//! - `da_j = w_j dĀ + drop_d'(A_d,eᵀ dZ_d[t,j])`, `dg_j = da_j ⊙ u ⊙ silu'(g)`, `du_j = da_j ⊙
//!   silu(g)`, `dG = Σ_j dg_j`, `dU = Σ_j du_j`, `dZ_g[t,e] = s·B_g,eᵀ dg_j` (zero for experts
//!   `t` does not use), `dZ_u` likewise;
//! - `dX = dG W_g + dU W_u + drop_g'(dZ_g A_g,all) + drop_u'(dZ_u A_u,all)`,
//!   `dA_g,all = dZ_gᵀ drop_g(X)` (one GEMM), `dA_u,all` likewise;
//! - per expert, over the slots routed to it (`perm`, `offsets`): `dB_g,e = s Σ dg_j ⊗ Z_g[t,e]`,
//!   `dB_u,e = s Σ du_j ⊗ Z_u[t,e]`, `dA_d,e = Σ dZ_d[t,j] ⊗ drop_d(a_j)`,
//!   `dB_d,e = s Σ w_j dY[t] ⊗ Z_d[t,j]`.
//!
//! Dropout: one counter-based mask per projection on `X` for gate and up, shared by all experts
//! (the naive path draws one per expert), and a counter-based mask on each `a_j` for down, drawn
//! inside the kernels. The fused and the naive paths agree only without dropout.
//!
//! Dtypes: the base (`X`, `W`, `G`, `U`, `Ā`, `Y`, `dY`) is f64, f32 or bf16; adapter weights,
//! routing weights and codes are in the adapter dtype (f64 under an f64 base, else f32), and the
//! kernels accumulate in it.

use crate::autograd::{NoGradGuard, Node};
use crate::backend::{BackendStorage, MoeDims};
use crate::{rng, DType, Error, Layout, Result, Shape, Storage, Tensor};

/// The frozen shared FFN and the stacked expert LoRAs of one MixLoRA layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeFusedWeights<'a> {
    pub w_gate: &'a Tensor, // [I, H] base, frozen
    pub w_up: &'a Tensor,   // [I, H] base, frozen
    pub w_down: &'a Tensor, // [H, I] base, frozen
    pub a_gate: &'a Tensor, // [E, r, H] adapter
    pub b_gate: &'a Tensor, // [E, I, r] adapter
    pub a_up: &'a Tensor,   // [E, r, H] adapter
    pub b_up: &'a Tensor,   // [E, I, r] adapter
    pub a_down: &'a Tensor, // [E, r, I] adapter
    pub b_down: &'a Tensor, // [E, H, r] adapter
    /// The LoRA scale `s` (one for all projections).
    pub scale: f64,
}

/// Top-k routing of `T` tokens, and the slots grouped by expert.
#[derive(Clone, Copy, Debug)]
pub struct MoeRouting<'a> {
    /// `[T, k]` u32: the expert of slot `(t, j)`; the k experts of a token are distinct.
    pub ids: &'a Tensor,
    /// `[T, k]` adapter dtype, in the graph: the combine weight of slot `(t, j)`.
    pub weights: &'a Tensor,
    /// `[T·k]` u32: the slots `p = t·k + j` sorted stably by `ids[p]`.
    pub perm: &'a Tensor,
    /// `[E+1]` u32: `offsets[e]` = number of slots with expert `< e`.
    pub offsets: &'a Tensor,
}

/// LoRA dropout of the fused path (training only).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeDropout {
    /// Probability in `[0, 1)`.
    pub p: f64,
    pub seed: u64,
}

const OP: &str = "moe_fused_ffn";

fn expect_shape(t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: t.shape().clone(),
            rhs: Shape::from(dims.to_vec()),
        });
    }
    Ok(())
}

fn expect_dtype(t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: t.dtype(),
            rhs: dtype,
        });
    }
    Ok(())
}

/// A fused primitive of [`BackendStorage`] on `Storage`.
type Primitive = fn(&[(&Storage, &Layout)], &MoeDims) -> Result<Vec<Storage>>;

/// Runs a fused primitive on tensors, returning contiguous results of the given shapes.
fn run(f: Primitive, ts: &[&Tensor], d: &MoeDims, shapes: &[Shape]) -> Result<Vec<Tensor>> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage()).collect();
    let args: Vec<(&Storage, &Layout)> = guards
        .iter()
        .zip(ts)
        .map(|(g, t)| (&**g, t.layout()))
        .collect();
    let out = f(&args, d)?;
    drop(args);
    drop(guards);
    if out.len() != shapes.len() {
        return Err(Error::invalid(
            OP,
            "a backend returned the wrong number of results",
        ));
    }
    Ok(out
        .into_iter()
        .zip(shapes)
        .map(|(s, sh)| Tensor::from_storage(s, sh.clone(), None))
        .collect())
}

/// `[W_g; W_u]` `[2I, H]` as one view when `W_u` is the row block right after `W_g` in one buffer.
fn stacked_gate_up(w_gate: &Tensor, w_up: &Tensor) -> Option<Tensor> {
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
fn gate_up(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<(Tensor, Tensor)> {
    let i = w_gate.dims()[0];
    match stacked_gate_up(w_gate, w_up) {
        Some(w) => {
            let gu = x.matmul(&w.t()?)?; // [T, 2I]
            Ok((gu.narrow(1, 0, i)?, gu.narrow(1, i, i)?))
        }
        None => Ok((x.matmul(&w_gate.t()?)?, x.matmul(&w_up.t()?)?)),
    }
}

/// The MixLoRA FFN of `x` `[T, H]` (base dtype) by the fused path: `Y` `[T, H]` in `x`'s dtype
/// (see the module doc for the maths and the dtypes). `dropout`, when given, applies the LoRA
/// dropout of training.
///
/// Gradients reach `x`, `route.weights` and the six adapter tensors; the shared `W_g, W_u, W_d`
/// must be frozen (an error otherwise, rather than a silently cut graph).
pub fn moe_fused_ffn(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    route: &MoeRouting<'_>,
    dropout: Option<MoeDropout>,
) -> Result<Tensor> {
    // ----- checks ----------------------------------------------------------------------
    if x.rank() != 2 {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 2,
            shape: x.shape().clone(),
        });
    }
    let (t, h) = (x.dims()[0], x.dims()[1]);
    let bt = x.dtype();
    super::float_only(OP, x)?;
    let at = if bt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if w.a_gate.rank() != 3 || w.b_gate.rank() != 3 || route.ids.rank() != 2 {
        return Err(Error::invalid(
            OP,
            format!(
                "expected A_g [E, r, H], B_g [E, I, r], ids [T, k]; got {}, {}, {}",
                w.a_gate.shape(),
                w.b_gate.shape(),
                route.ids.shape()
            ),
        ));
    }
    let (e, r) = (w.a_gate.dims()[0], w.a_gate.dims()[1]);
    let i = w.b_gate.dims()[1];
    let k = route.ids.dims()[1];
    if k == 0 || k > e || r == 0 || i == 0 || h == 0 {
        return Err(Error::invalid(
            OP,
            format!("bad sizes: k = {k}, E = {e}, r = {r}, I = {i}, H = {h}"),
        ));
    }
    for (tensor, dims, dtype) in [
        (w.w_gate, vec![i, h], bt),
        (w.w_up, vec![i, h], bt),
        (w.w_down, vec![h, i], bt),
        (w.a_gate, vec![e, r, h], at),
        (w.b_gate, vec![e, i, r], at),
        (w.a_up, vec![e, r, h], at),
        (w.b_up, vec![e, i, r], at),
        (w.a_down, vec![e, r, i], at),
        (w.b_down, vec![e, h, r], at),
        (route.ids, vec![t, k], DType::U32),
        (route.weights, vec![t, k], at),
        (route.perm, vec![t * k], DType::U32),
        (route.offsets, vec![e + 1], DType::U32),
    ] {
        expect_shape(tensor, &dims)?;
        expect_dtype(tensor, dtype)?;
        super::same_device(OP, x, tensor)?;
    }
    if [w.w_gate, w.w_up, w.w_down].iter().any(|t| t.tracks_grad()) {
        return Err(Error::invalid(
            OP,
            "the shared W_gate/W_up/W_down must be frozen in the fused path",
        ));
    }
    let p = dropout.map_or(0.0, |d| d.p);
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(OP, format!("dropout {p} is not in [0, 1)")));
    }
    let seed = dropout.map_or(0, |d| d.seed);
    let (seed_g, seed_u, seed_d) = (rng::hash(seed, 0), rng::hash(seed, 1), rng::hash(seed, 2));
    let d = MoeDims {
        t,
        k,
        e,
        r,
        h,
        i,
        scale: w.scale,
        dropout: p,
        seed: seed_d,
    };

    // ----- forward ---------------------------------------------------------------------
    let (g, u, zg, zu, zd, y) = {
        let _ng = NoGradGuard::new();
        let xa = x.to_dtype(at)?; // [T, H] adapter
        let xg = xa.dropout(p, seed_g, true)?;
        let xu = xa.dropout(p, seed_u, true)?;
        let zg = xg.matmul(&w.a_gate.reshape([e * r, h])?.t()?)?; // [T, E·r]
        let zu = xu.matmul(&w.a_up.reshape([e * r, h])?.t()?)?; // [T, E·r]
        let (g, u) = gate_up(x, w.w_gate, w.w_up)?; // [T, I] each
        let act = run(
            Storage::moe_act_forward,
            &[
                &g,
                &u,
                &zg,
                &zu,
                w.b_gate,
                w.b_up,
                w.a_down,
                route.ids,
                route.weights,
            ],
            &d,
            &[Shape::from([t, i]), Shape::from([t, k, r])],
        )?;
        let (abar, zd) = (&act[0], act[1].clone()); // [T, I] base, [T, k, r] adapter
        let y0 = abar.matmul(&w.w_down.t()?)?; // [T, H]
        let y = run(
            Storage::moe_down_forward,
            &[&y0, &zd, route.weights, route.ids, w.b_down],
            &d,
            &[Shape::from([t, h])],
        )?;
        (g, u, zg, zu, zd, y[0].clone())
    };

    // ----- backward --------------------------------------------------------------------
    let (w_gate, w_up, w_down) = (w.w_gate.clone(), w.w_up.clone(), w.w_down.clone());
    let (ids, perm, offsets) = (route.ids.clone(), route.perm.clone(), route.offsets.clone());
    let inputs = [
        x,
        route.weights,
        w.a_gate,
        w.b_gate,
        w.a_up,
        w.b_up,
        w.a_down,
        w.b_down,
    ];
    let node = Node::record(OP, &inputs, move |inp, _, dy| {
        let (x, wts, ag, bg, au, bu, ad, bd) = (
            &inp[0], &inp[1], &inp[2], &inp[3], &inp[4], &inp[5], &inp[6], &inp[7],
        );
        let need = |n: usize| inp[n].tracks_grad();
        let dabar = dy.matmul(&w_down)?; // [T, I] base
        let down = run(
            Storage::moe_down_backward,
            &[dy, &zd, wts, &ids, bd],
            &d,
            &[Shape::from([t, k, r]), Shape::from([t, k])],
        )?;
        let (dzd, dw_down) = (&down[0], &down[1]); // [T, k, r], [T, k]
        let act = run(
            Storage::moe_act_backward,
            &[&g, &u, &zg, &zu, bg, bu, ad, &ids, wts, &dabar, dzd],
            &d,
            &[
                Shape::from([t, i]),
                Shape::from([t, i]),
                Shape::from([t, e * r]),
                Shape::from([t, e * r]),
                Shape::from([t, k]),
            ],
        )?;
        let (dg, du, dzg, dzu, dw_act) = (&act[0], &act[1], &act[2], &act[3], &act[4]);
        let dx = if need(0) {
            let ag2 = ag.reshape([e * r, h])?; // [E·r, H]
            let au2 = au.reshape([e * r, h])?;
            let lora = dzg
                .matmul(&ag2)?
                .dropout(p, seed_g, true)?
                .add(&dzu.matmul(&au2)?.dropout(p, seed_u, true)?)?; // [T, H] adapter
            let base = dg.matmul(&w_gate)?.add(&du.matmul(&w_up)?)?; // [T, H] base
            Some(base.add(&lora.to_dtype(x.dtype())?)?)
        } else {
            None
        };
        let dw = need(1).then(|| dw_act.add(dw_down)).transpose()?; // [T, k]
        let xa = (need(2) || need(4))
            .then(|| x.to_dtype(ag.dtype()))
            .transpose()?; // [T, H] adapter
        let da_gate = match (&xa, need(2)) {
            (Some(xa), true) => Some(
                dzg.t()?
                    .matmul(&xa.dropout(p, seed_g, true)?)?
                    .reshape([e, r, h])?,
            ),
            _ => None,
        };
        let da_up = match (&xa, need(4)) {
            (Some(xa), true) => Some(
                dzu.t()?
                    .matmul(&xa.dropout(p, seed_u, true)?)?
                    .reshape([e, r, h])?,
            ),
            _ => None,
        };
        let (mut db_gate, mut db_up, mut da_down) = (None, None, None);
        if need(3) || need(5) || need(6) {
            let wg = run(
                Storage::moe_act_weight_grads,
                &[
                    &g, &u, &zg, &zu, bg, bu, ad, &ids, wts, &dabar, dzd, &perm, &offsets,
                ],
                &d,
                &[
                    Shape::from([e, i, r]),
                    Shape::from([e, i, r]),
                    Shape::from([e, r, i]),
                ],
            )?;
            db_gate = Some(wg[0].clone());
            db_up = Some(wg[1].clone());
            da_down = Some(wg[2].clone());
        }
        let db_down = if need(7) {
            let out = run(
                Storage::moe_down_weight_grad,
                &[dy, &zd, wts, &perm, &offsets],
                &d,
                &[Shape::from([e, h, r])],
            )?;
            Some(out[0].clone())
        } else {
            None
        };
        Ok(vec![
            dx, dw, da_gate, db_gate, da_up, db_up, da_down, db_down,
        ])
    });
    Ok(match node {
        Some(node) => y.view(y.layout().clone(), Some(node)),
        None => y,
    })
}
