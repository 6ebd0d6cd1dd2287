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
//!   Z_u[t,e]`, `a_j = silu(g) ⊙ u`; `Ā[t] = Σ_j w_j a_j` `[T, I]`, `Z_d[t,j] = A_d,e drop_d(a_j)`
//!   `[T, k, r]`;
//! - `Y = Ā W_dᵀ + s Σ_j w_j B_d,e Z_d[t,j]`.
//!
//! backward (recomputing `g, u, a` from `G, U` and the codes; saved: `G, U` `[T, I]`, the
//! rank-r codes and the adapters in the layouts the GEMMs read, never a `k·T × I` tensor)
//! - `dĀ = dY W_d`; `q = B_d,eᵀ dY[t]`, `dZ_d[t,j] = s·w_j·q`, `dw_j = ⟨dĀ, a_j⟩ + s·⟨q, Z_d[t,j]⟩`;
//! - `da_j = w_j dĀ + drop_d'(A_d,eᵀ dZ_d[t,j])`, `dg_j = da_j ⊙ u ⊙ silu'(g)`, `du_j = da_j ⊙
//!   silu(g)`, `dG = Σ_j dg_j`, `dU = Σ_j du_j`, `dZ_g[t,e] = s·B_g,eᵀ dg_j` (zero for experts
//!   `t` does not use), `dZ_u` likewise;
//! - `dX = dG W_g + dU W_u + drop_g'(dZ_g A_g,all) + drop_u'(dZ_u A_u,all)`,
//!   `dA_g,all = dZ_gᵀ drop_g(X)` (one GEMM), `dA_u,all` likewise;
//! - `dB_g,e = s Σ dg_j ⊗ Z_g[t,e]`, `dB_u,e = s Σ du_j ⊗ Z_u[t,e]`, `dA_d,e = Σ dZ_d[t,j] ⊗
//!   drop_d(a_j)`, `dB_d,e = s Σ w_j dY[t] ⊗ Z_d[t,j]` over the slots routed to `e`.
//!
//! How it runs: every rank-r product is one dense GEMM over "block codes" `C` `[T·k, E·r]` (row
//! `(t, j)` holds the slot's `r` codes in expert `e`'s column block and zeros elsewhere) against
//! all experts' `B` laid out as `B_all` `[I, E·r]`: `s·B_g,e Z_g[t,e]` for every slot is `C_g
//! B_g,allᵀ` `[T·k, I]`, `B_g,eᵀ dg_j` is a block of `dg B_g,all`, and `dB_g,all = dgᵀ C_g` sums
//! each expert's slots exactly (the other blocks of a row are zero). The GEMMs run on the tensor
//! cores in the base dtype; only the SwiGLU over the slots and the code layouts are kernels of
//! their own (`BackendStorage::moe_*`). The `[T·k, I]` slot tensors live only inside one chunk of
//! tokens (see [`moe_fused_ffn_chunked`]), so the op's transient memory is bounded.
//!
//! Dropout: one counter-based mask per projection on `X` for gate and up, shared by all experts
//! (the naive path draws one per expert), and a counter-based mask on each `a_j` for down, drawn
//! inside the kernels. The fused and the naive paths agree only without dropout.
//!
//! Dtypes: the base (`X`, `W`, `G`, `U`, `Ā`, `Y`, `dY` and the GEMM operands) is f64, f32 or
//! bf16; adapter weights, routing weights and codes are in the adapter dtype (f64 under an f64
//! base, else f32), and the SwiGLU kernels accumulate in it.

use crate::autograd::{Input, NoGradGuard, Node, Output};
use crate::backend::{BackendStorage, BlockCodes, MoeDims};
use crate::fused::lora::{add_dropped2, dropped_codes, dropped_grad_a};
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

/// Top-k routing of `T` tokens.
#[derive(Clone, Copy, Debug)]
pub struct MoeRouting<'a> {
    /// `[T, k]` u32: the expert of slot `(t, j)`; the k experts of a token are distinct.
    pub ids: &'a Tensor,
    /// `[T, k]` adapter dtype, in the graph: the combine weight of slot `(t, j)`.
    pub weights: &'a Tensor,
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

/// Runs a fused primitive of [`BackendStorage`] (on `Storage`) on tensors, returning contiguous
/// results of the given shapes.
fn run(
    f: impl FnOnce(&[(&Storage, &Layout)], &MoeDims) -> Result<Vec<Storage>>,
    ts: &[&Tensor],
    d: &MoeDims,
    shapes: &[Shape],
) -> Result<Vec<Tensor>> {
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

/// Tokens per chunk by default: the `[chunk·k, I]` slot tensors of one chunk hold at most this
/// many elements each (3·2^25: 192 MiB in bf16). Several such tensors are alive at once inside a
/// chunk, and the base GEMMs still see thousands of rows at LLaMA-2-7B sizes. The bound lets a
/// training batch of 4,096 tokens at those sizes run as one chunk (3% faster on the H200 than
/// 2 × 2,048), while 16,384 tokens run as 4 × 4,096 (activation peak 41% below the naive
/// loop's: benches/results/moe_ffn-chunks-h200.json).
const CHUNK_ELEMS: usize = 3 << 25;

/// The default chunk: the tokens split evenly into as few chunks as keep each within
/// [`CHUNK_ELEMS`] (16,384 tokens at LLaMA-2-7B sizes run as 4 × 4,096, not 3 × 4,480 + 2,944,
/// so no chunk's GEMMs are short), rounded up to a multiple of 128 (GEMM tiles) when that still fits
/// and the cap is at least 256 tokens; never more than `t`.
pub fn default_chunk_tokens(t: usize, k: usize, i: usize) -> usize {
    let t = t.max(1);
    let cap = (CHUNK_ELEMS / (k * i).max(1)).max(1);
    let even = t.div_ceil(t.div_ceil(cap)); // ≤ cap
    let tiled = even.div_ceil(128) * 128;
    let c = if cap >= 256 && tiled <= cap {
        tiled
    } else {
        even
    };
    c.min(t)
}

/// Whether the fused FFN on `x` `[T, H]` with `k` slots a token and these weights runs the
/// tensor-core kernels (`moe_tiles_*`: a CUDA bf16 base, `k` in {1, 2, 4, 8}, `E·r ≤ 128` a
/// multiple of 8, `r ≤ 64`, `I` a multiple of 8) when `kernels` asks for them.
pub fn moe_fused_runs_tiles(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    k: usize,
    kernels: MoeKernels,
) -> Result<bool> {
    if w.a_gate.rank() != 3 || w.b_gate.rank() != 3 || x.rank() != 2 {
        return Ok(false);
    }
    let d = MoeDims {
        t: x.dims()[0],
        k,
        e: w.a_gate.dims()[0],
        r: w.a_gate.dims()[1],
        i: w.b_gate.dims()[1],
        dropout: 0.0,
        seed: 0,
        t0: 0,
    };
    Ok(kernels == MoeKernels::Tiles && x.storage().moe_tiles_supported(&d))
}

/// Which kernels run the fused FFN's rank-r and SwiGLU work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeKernels {
    /// Dense GEMMs over block codes and the SwiGLU kernels (every backend, every dtype).
    #[default]
    BlockGemms,
    /// The tensor-core tile kernels (`moe_tiles_*`) where they serve the sizes (CUDA, bf16
    /// base, see [`moe_fused_runs_tiles`]), else the block-code GEMMs. Correct, but slower than
    /// the block-code GEMMs on the H200 so far.
    Tiles,
}

/// Settings of the fused MixLoRA FFN: values, filled by the caller (the trainer from its
/// command line), never read from the environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoeFfnOptions {
    pub kernels: MoeKernels,
    /// Tokens per chunk: the per-slot `[chunk·k, I]` tensors exist for one chunk at a time.
    /// `None`: [`default_chunk_tokens`] with the block-code GEMMs, one chunk with the tile
    /// kernels (they write no `[T·k, I]` tensor). The result does not depend on the chunking (up
    /// to the order of the floating-point sums of the weight gradients over chunks).
    pub chunk_tokens: Option<usize>,
}

/// The MixLoRA FFN of `x` `[T, H]` (base dtype) by the fused path: `Y` `[T, H]` in `x`'s dtype
/// (see the module doc for the maths and the dtypes). `dropout`, when given, applies the LoRA
/// dropout of training; `opts` picks the kernels and the token chunk.
///
/// Gradients reach `x`, `route.weights` and the six adapter tensors; the shared `W_g, W_u, W_d`
/// must be frozen (an error otherwise, rather than a silently cut graph).
pub fn moe_fused_ffn(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    route: &MoeRouting<'_>,
    dropout: Option<MoeDropout>,
    opts: &MoeFfnOptions,
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
    let at = bt.accumulation();
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
        i,
        dropout: p,
        seed: seed_d,
        t0: 0,
    };
    let s = w.scale;
    // The tensor-core kernels write no [T·k, I] tensor, so they need no chunks by default.
    let tiles = opts.kernels == MoeKernels::Tiles && x.storage().moe_tiles_supported(&d);
    let chunk = match opts.chunk_tokens {
        Some(0) => return Err(Error::invalid(OP, "a chunk of 0 tokens")),
        Some(c) => c.min(t.max(1)),
        None if tiles => t.max(1),
        None => default_chunk_tokens(t, k, i),
    };
    let chunks: Vec<(usize, usize)> = (0..t)
        .step_by(chunk)
        .map(|t0| (t0, chunk.min(t - t0)))
        .collect();

    // ----- forward ---------------------------------------------------------------------
    let fwd = {
        let _ng = NoGradGuard::new();
        // The LoRA-A codes of the dropped x against every expert's A in the base dtype, summed
        // in the adapter dtype (on the GPU one tensor-core pass over x, the mask on the fly).
        let (ag, au) = (all_a(w.a_gate, bt)?, all_a(w.a_up, bt)?); // [E·r, H] base
        let zg = dropped_codes(x, &ag, p, seed_g)?.to_dtype(at)?; // [T, E·r]
        let zu = dropped_codes(x, &au, p, seed_u)?.to_dtype(at)?; // [T, E·r]
        let gu = gate_up(x, w.w_gate, w.w_up)?; // [T, I] each
        let lw = LoraLayouts::new(w.b_gate, w.b_up, w.a_down, w.b_down, bt)?;
        let (mut zd, mut y0) = (Vec::new(), Vec::new());
        let (cg, cu) = if tiles {
            let cg = compact_codes(&zg, route.ids, s, &d, bt)?; // [T·k, r] base
            let cu = compact_codes(&zu, route.ids, s, &d, bt)?;
            for &(t0, tc) in &chunks {
                let dc = MoeDims { t: tc, t0, ..d };
                let (gc, uc) = (gu.0.narrow(0, t0, tc)?, gu.1.narrow(0, t0, tc)?);
                let (cgc, cuc) = (cg.narrow(0, t0 * k, tc * k)?, cu.narrow(0, t0 * k, tc * k)?);
                let ids_c = route.ids.narrow(0, t0, tc)?;
                let wc = route.weights.narrow(0, t0, tc)?;
                let out = run(
                    Storage::moe_tiles_forward,
                    &[
                        &gc, &uc, &cgc, &cuc, &ids_c, &lw.b_gate, &lw.b_up, &lw.a_down, &wc,
                    ],
                    &dc,
                    &[Shape::from([tc, i]), Shape::from([tc, k, r])],
                )?;
                y0.push(out[0].matmul(&w.w_down.t()?)?); // [tc, H]
                zd.push(out[1].clone()); // [tc, k, r]
            }
            (cg, cu)
        } else {
            let cg = slot_codes(&zg, route.ids, s, &d, bt)?; // [T·k, E·r] base
            let cu = slot_codes(&zu, route.ids, s, &d, bt)?;
            for &(t0, tc) in &chunks {
                let dc = MoeDims { t: tc, t0, ..d };
                let (gc, uc) = (gu.0.narrow(0, t0, tc)?, gu.1.narrow(0, t0, tc)?);
                let (cgc, cuc) = (cg.narrow(0, t0 * k, tc * k)?, cu.narrow(0, t0 * k, tc * k)?);
                let lg = cgc.matmul(&lw.b_gate.t()?)?; // [tc·k, I] = s·B_g,e Z_g[t,e]
                let lu = cuc.matmul(&lw.b_up.t()?)?;
                let wc = route.weights.narrow(0, t0, tc)?;
                let act = run(
                    Storage::moe_swiglu_forward,
                    &[&gc, &uc, &lg, &lu, &wc],
                    &dc,
                    &[Shape::from([tc, i]), Shape::from([tc * k, i])],
                )?;
                drop((lg, lu));
                let (abar, am) = (&act[0], &act[1]); // [tc, I], [tc·k, I]
                let ids_c = route.ids.narrow(0, t0, tc)?;
                zd.push(gather(&am.matmul(&lw.a_down.t()?)?, &ids_c, &dc)?); // [tc, k, r]
                y0.push(abar.matmul(&w.w_down.t()?)?); // [tc, H]
            }
            (cg, cu)
        };
        let zd = join(zd)?; // [T, k, r] adapter
        let y0 = join(y0)?; // [T, H] base
        let cy = down_codes(&zd, route.weights, route.ids, s, &d)?; // [T, E·r] adapter
        let cy = cy.to_dtype(bt)?; // the GEMM's operand, kept for dB_down
        let y = y0.add(&cy.matmul(&lw.b_down.t()?)?)?;
        Forward {
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
        }
    };
    let Forward { gu, zd, y, kept } = fwd;

    // ----- backward --------------------------------------------------------------------
    let (w_gate, w_up, w_down) = (w.w_gate.clone(), w.w_up.clone(), w.w_down.clone());
    let ids = route.ids.clone();
    let mut saved = vec![gu.0.clone(), gu.1.clone(), zd.clone(), ids.clone()];
    saved.extend(kept.tensors().into_iter().cloned());
    // `x` is read only for the LoRA-A gradients of gate and up (`dA = dZᵀ drop(x)`).
    let inputs = [
        Input::keep_if(x, w.a_gate.tracks_grad() || w.a_up.tracks_grad()),
        Input::Keep(route.weights),
        Input::Keep(w.a_gate),
        Input::Keep(w.b_gate),
        Input::Keep(w.a_up),
        Input::Keep(w.b_up),
        Input::Keep(w.a_down),
        Input::Keep(w.b_down),
    ];
    let node = Node::record_with(OP, &inputs, Output::Unread, move |inp, _, dy| {
        let (x, wts) = (&inp[0], &inp[1]);
        let need = |n: usize| inp[n].tracks_grad();
        // The layouts and codes of the forward (the adapter weights have not changed since).
        let Kept {
            lw,
            ag,
            au,
            cg,
            cu,
            cy,
        } = &kept;
        // Down LoRA: q = B_d,eᵀ dY[t] for each slot, dZ_d = s·w_j·q.
        let q_all = dy.matmul(&lw.b_down)?; // [T, E·r] base: every expert's q
        let q = gather(&q_all, &ids, &d)?; // [T, k, r] adapter
        let dw_down = q.mul(&zd)?.sum(2, false)?.affine(s, 0.0)?; // [T, k]
        let need_dz = need(0) || need(2) || need(4);
        let w_gu = stacked_gate_up(&w_gate, &w_up);
        let (mut dx_base, mut dzg, mut dzu, mut dw_act) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut dbg, mut dbu, mut dad): (Option<Tensor>, Option<Tensor>, Option<Tensor>) =
            (None, None, None);
        if tiles {
            let dzd = q.mul(&wts.reshape([t, k, 1])?.affine(s, 0.0)?)?; // s·w_j·q
            let cd = dzd.to_dtype(bt)?.reshape([t * k, r])?; // [T·k, r] base
            for &(t0, tc) in &chunks {
                let dc = MoeDims { t: tc, t0, ..d };
                let rows = |m: &Tensor| m.narrow(0, t0 * k, tc * k);
                let dabar = dy.narrow(0, t0, tc)?.matmul(&w_down)?; // [tc, I] base
                let (gc, uc) = (gu.0.narrow(0, t0, tc)?, gu.1.narrow(0, t0, tc)?);
                let (ids_c, wc) = (ids.narrow(0, t0, tc)?, wts.narrow(0, t0, tc)?);
                let (cgc, cuc, cdc) = (rows(cg)?, rows(cu)?, rows(&cd)?);
                let args = [
                    &gc, &uc, &cgc, &cuc, &cdc, &ids_c, &lw.b_gate, &lw.b_up, &lw.a_down, &dabar,
                    &wc,
                ];
                let out = run(
                    Storage::moe_tiles_rows,
                    &args,
                    &dc,
                    &[
                        Shape::from([tc, 2 * i]),
                        Shape::from([tc, k, r]),
                        Shape::from([tc, k, r]),
                        Shape::from([tc, k]),
                    ],
                )?;
                let dgu = &out[0];
                if need(0) {
                    dx_base.push(dx_of_dgu(dgu, w_gu.as_ref(), &w_gate, &w_up)?);
                }
                if need_dz {
                    // [tc, E·r] base: s·B_eᵀ dg_j in the token's expert blocks
                    let blocks =
                        |dz: &Tensor| expand_summed(&dz.affine(s, 0.0)?, &ids_c, &dc)?.to_dtype(bt);
                    dzg.push(blocks(&out[1])?);
                    dzu.push(blocks(&out[2])?);
                }
                dw_act.push(out[3].clone());
                if need(3) || need(5) || need(6) {
                    let er = e * r;
                    let grads = run(
                        Storage::moe_tiles_cols,
                        &args,
                        &dc,
                        &[
                            Shape::from([i, er]),
                            Shape::from([i, er]),
                            Shape::from([er, i]),
                        ],
                    )?;
                    let [g_b, g_u, g_d] = <[Tensor; 3]>::try_from(grads)
                        .map_err(|_| Error::invalid(OP, "a backend returned the wrong results"))?;
                    accumulate(&mut dbg, g_b)?;
                    accumulate(&mut dbu, g_u)?;
                    accumulate(&mut dad, g_d)?;
                }
            }
        } else {
            // [T·k, E·r] base: s·w_j·q in the slot's expert block
            let cd = block_codes(&q_all, &ids, Some(wts), s, false, &d, bt)?;
            for &(t0, tc) in &chunks {
                let dc = MoeDims { t: tc, t0, ..d };
                let rows = |m: &Tensor| m.narrow(0, t0 * k, tc * k);
                let (cgc, cuc, cdc) = (rows(cg)?, rows(cu)?, rows(&cd)?);
                let dabar = dy.narrow(0, t0, tc)?.matmul(&w_down)?; // [tc, I] base
                let lg = cgc.matmul(&lw.b_gate.t()?)?; // [tc·k, I]
                let lu = cuc.matmul(&lw.b_up.t()?)?;
                let ld = cdc.matmul(&lw.a_down)?; // [tc·k, I] = A_d,eᵀ dZ_d[t,j]
                let (gc, uc) = (gu.0.narrow(0, t0, tc)?, gu.1.narrow(0, t0, tc)?);
                let out = run(
                    Storage::moe_swiglu_backward,
                    &[&gc, &uc, &lg, &lu, &ld, &dabar, &wts.narrow(0, t0, tc)?],
                    &dc,
                    &[
                        Shape::from([tc, 2 * i]),
                        Shape::from([tc * k, i]),
                        Shape::from([tc * k, i]),
                        Shape::from([tc * k, i]),
                        Shape::from([tc, k]),
                    ],
                )?;
                drop((lg, lu, ld, dabar));
                let (dgu, dg, du, am) = (&out[0], &out[1], &out[2], &out[3]);
                dw_act.push(out[4].clone());
                if need(0) {
                    dx_base.push(dx_of_dgu(dgu, w_gu.as_ref(), &w_gate, &w_up)?);
                }
                let ids_c = ids.narrow(0, t0, tc)?;
                if need_dz {
                    // [tc, E·r] base: s·B_eᵀ dg_j in the token's expert blocks
                    let blocks = |p: Tensor| block_codes(&p, &ids_c, None, s, true, &dc, bt);
                    dzg.push(blocks(dg.matmul(&lw.b_gate)?)?); // dg B_g,all [tc·k, E·r]
                    dzu.push(blocks(du.matmul(&lw.b_up)?)?);
                }
                if need(3) {
                    accumulate(&mut dbg, dg.t()?.matmul(&cgc)?.to_dtype(at)?)?; // [I, E·r]
                }
                if need(5) {
                    accumulate(&mut dbu, du.t()?.matmul(&cuc)?.to_dtype(at)?)?;
                }
                if need(6) {
                    accumulate(&mut dad, cdc.t()?.matmul(am)?.to_dtype(at)?)?; // [E·r, I]
                }
            }
        }
        // dZ_g, dZ_u [T, E·r] in the base dtype: the LoRA-A side of the backward runs on the
        // tensor cores, as in the forward.
        let (dzg_b, dzu_b) = if need_dz {
            (Some(join(dzg)?), Some(join(dzu)?))
        } else {
            (None, None)
        };
        let dx = match (&dzg_b, &dzu_b, need(0)) {
            (Some(dzg), Some(dzu), true) => {
                let lora_g = dzg.matmul(ag)?; // [T, H], before its dropout
                let lora_u = dzu.matmul(au)?;
                Some(add_dropped2(
                    &join(dx_base)?,
                    &lora_g,
                    &lora_u,
                    p,
                    (seed_g, seed_u),
                )?)
            }
            _ => None,
        };
        let dw = if need(1) {
            Some(join(dw_act)?.add(&dw_down)?) // [T, k]
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
        let da_gate = if need(2) { da(&dzg_b, seed_g)? } else { None };
        let da_up = if need(4) { da(&dzu_b, seed_u)? } else { None };
        let db_gate = dbg
            .filter(|_| need(3))
            .map(|m| per_expert(&m, e, r, i))
            .transpose()?;
        let db_up = dbu
            .filter(|_| need(5))
            .map(|m| per_expert(&m, e, r, i))
            .transpose()?;
        let da_down = dad
            .filter(|_| need(6))
            .map(|m| m.reshape([e, r, i]))
            .transpose()?;
        let db_down = if need(7) {
            Some(per_expert(&dy.t()?.matmul(cy)?.to_dtype(at)?, e, r, h)?)
        } else {
            None
        };
        Ok(vec![
            dx, dw, da_gate, db_gate, da_up, db_up, da_down, db_down,
        ])
    })
    .map(|n| n.capturing(&saved.iter().collect::<Vec<_>>()));
    Ok(match node {
        Some(node) => y.view(y.layout().clone(), Some(node)),
        None => y,
    })
}

/// `dG W_g + dU W_u` `[tc, H]` of `dGU` `[tc, 2I]`: one GEMM over `[W_g; W_u]` when that is one
/// view (`w_gu`), else two.
fn dx_of_dgu(
    dgu: &Tensor,
    w_gu: Option<&Tensor>,
    w_gate: &Tensor,
    w_up: &Tensor,
) -> Result<Tensor> {
    let i = w_gate.dims()[0];
    match w_gu {
        Some(w) => dgu.matmul(w), // [tc, 2I] [2I, H]
        None => dgu
            .narrow(1, 0, i)?
            .matmul(w_gate)?
            .add(&dgu.narrow(1, i, i)?.matmul(w_up)?),
    }
}

/// What the forward computes and returns or keeps for the backward.
struct Forward {
    gu: (Tensor, Tensor), // G, U [T, I] base
    zd: Tensor,           // [T, k, r] adapter
    y: Tensor,            // [T, H] base
    kept: Kept,
}

/// The forward's operands that the backward reuses instead of rebuilding: a few MB a layer at
/// LLaMA-2-7B sizes (nothing `[T·k, I]`), which spares the backward some twenty small launches.
struct Kept {
    lw: LoraLayouts,
    ag: Tensor, // [E·r, H] base: every expert's A_gate
    au: Tensor, // [E·r, H] base: every expert's A_up
    cg: Tensor, // s·Z_g of every slot: block codes [T·k, E·r] or, for the tile kernels, [T·k, r]
    cu: Tensor, // s·Z_u likewise
    cy: Tensor, // [T, E·r] base: the down-LoRA codes s·w_j·Z_d[t, j] in block form
}

impl Kept {
    fn tensors(&self) -> [&Tensor; 9] {
        let l = &self.lw;
        [
            &l.b_gate, &l.b_up, &l.a_down, &l.b_down, &self.ag, &self.au, &self.cg, &self.cu,
            &self.cy,
        ]
    }
}

/// The experts' LoRA weights laid out for the block-code GEMMs, in the base dtype.
struct LoraLayouts {
    b_gate: Tensor, // [I, E·r]
    b_up: Tensor,   // [I, E·r]
    a_down: Tensor, // [E·r, I]
    b_down: Tensor, // [H, E·r]
}

impl LoraLayouts {
    fn new(bg: &Tensor, bu: &Tensor, ad: &Tensor, bd: &Tensor, base: DType) -> Result<Self> {
        let (e, r, i) = (ad.dims()[0], ad.dims()[1], ad.dims()[2]);
        Ok(LoraLayouts {
            b_gate: all_experts(bg, base)?,
            b_up: all_experts(bu, base)?,
            a_down: ad.reshape([e * r, i])?.to_dtype(base)?,
            b_down: all_experts(bd, base)?,
        })
    }
}

/// All experts' LoRA A `[E, r, n]` as one `[E·r, n]` matrix in `dtype`.
fn all_a(a: &Tensor, dtype: DType) -> Result<Tensor> {
    let (e, r, n) = (a.dims()[0], a.dims()[1], a.dims()[2]);
    a.reshape([e * r, n])?.to_dtype(dtype)
}

/// `[E, n, r]` → `[n, E·r]` (row `c` holds every expert's row `c`) in `dtype`: one pass (the
/// conversion reads the permuted view).
fn all_experts(b: &Tensor, dtype: DType) -> Result<Tensor> {
    let (e, n, r) = (b.dims()[0], b.dims()[1], b.dims()[2]);
    let permuted = b.permute(&[1, 0, 2])?; // [n, E, r] view
    let laid_out = if b.dtype() == dtype {
        permuted.contiguous()?
    } else {
        permuted.to_dtype(dtype)?
    };
    laid_out.reshape([n, e * r])
}

/// `[n, E·r]` → `[E, n, r]`, the inverse of [`all_experts`].
fn per_expert(m: &Tensor, e: usize, r: usize, n: usize) -> Result<Tensor> {
    m.reshape([n, e, r])?.permute(&[1, 0, 2])?.contiguous()
}

/// Each slot's `r` codes out of block codes `src` `[T·k or T, E·r]`: `[T, k, r]` adapter.
fn gather(src: &Tensor, ids: &Tensor, d: &MoeDims) -> Result<Tensor> {
    let shape = Shape::from([ids.dims()[0], d.k, d.r]);
    let d = MoeDims {
        t: ids.dims()[0],
        ..*d
    };
    Ok(run(Storage::moe_gather_codes, &[src, ids], &d, &[shape])?.remove(0))
}

/// Per-token block codes `[T, E·r]` of `codes` `[T, k, r]`: the token's slots summed (their
/// blocks are distinct).
fn expand_summed(codes: &Tensor, ids: &Tensor, d: &MoeDims) -> Result<Tensor> {
    let shape = Shape::from([d.t, d.e * d.r]);
    Ok(run(Storage::moe_expand_codes_summed, &[codes, ids], d, &[shape])?.remove(0))
}

/// `s·Z[t, e_j]` of every slot as block codes `[T·k, E·r]` in `dtype`, from `Z` `[T, E·r]`.
fn slot_codes(z: &Tensor, ids: &Tensor, s: f64, d: &MoeDims, dtype: DType) -> Result<Tensor> {
    block_codes(z, ids, None, s, false, d, dtype)
}

/// Scaled block codes in `dtype`, in one backend pass (`moe_block_codes`: the values of gather,
/// affine, mul, expand and conversion): per slot `[T·k, E·r]` from per-token block codes `src`
/// `[T, E·r]`, `s·src[t]` (or with weights `w` `[T, k]`, `(s·w[t, j])·src[t]`) in the slot's
/// block; or (`summed`) per token `[T, E·r]` from per-slot block codes `src` `[T·k, E·r]`, the
/// blocks of a token's slots scaled by `s`.
fn block_codes(
    src: &Tensor,
    ids: &Tensor,
    w: Option<&Tensor>,
    s: f64,
    summed: bool,
    d: &MoeDims,
    dtype: DType,
) -> Result<Tensor> {
    let rows = if summed { d.t } else { d.t * d.k };
    let mut ts = vec![src, ids];
    ts.extend(w);
    let how = BlockCodes {
        scale: s,
        summed,
        dtype,
    };
    let shape = Shape::from([rows, d.e * d.r]);
    let primitive =
        |args: &[(&Storage, &Layout)], d: &MoeDims| Storage::moe_block_codes(args, d, &how);
    Ok(run(primitive, &ts, d, &[shape])?.remove(0))
}

/// `s·Z[t, e_j]` of every slot, `[T·k, r]` in `dtype`, from `Z` `[T, E·r]`.
fn compact_codes(z: &Tensor, ids: &Tensor, s: f64, d: &MoeDims, dtype: DType) -> Result<Tensor> {
    gather(z, ids, d)?
        .affine(s, 0.0)?
        .to_dtype(dtype)?
        .reshape([d.t * d.k, d.r])
}

/// The down-LoRA codes `s·w_j·Z_d[t, j]` as per-token block codes `[T, E·r]` (adapter dtype).
fn down_codes(zd: &Tensor, wts: &Tensor, ids: &Tensor, s: f64, d: &MoeDims) -> Result<Tensor> {
    let sw = wts.reshape([d.t, d.k, 1])?.affine(s, 0.0)?;
    expand_summed(&zd.mul(&sw)?, ids, d)
}

/// The chunks' results joined along dim 0 (no copy for one chunk).
fn join(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    super::concat::cat(&refs, 0)
}

fn accumulate(acc: &mut Option<Tensor>, v: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => a.add(&v)?,
        None => v,
    });
    Ok(())
}
