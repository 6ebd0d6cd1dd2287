//! The fused MixLoRA FFN: the `fused` method of docs/DESIGN.md (section 2, "Computing the MoE
//! FFN") as one autograd op with a hand-written backward, [`moe_ffn`].
//!
//! With `T` tokens `X` `[T, H]`, top-k routing (`ids` `[T, k]`, weights `w` `[T, k]`), the frozen
//! shared SwiGLU `W_g, W_u` `[I, H]`, `W_d` `[H, I]` and per-expert LoRAs `A_g,e, A_u,e` `[r, H]`,
//! `B_g,e, B_u,e` `[I, r]`, `A_d,e` `[r, I]`, `B_d,e` `[H, r]` with scale `s`, the op computes
//!
//! `Y[t] = Σ_j w_j · (W_d + s·B_d,e A_d,e) · [silu((W_g + s·B_g,e A_g,e) X[t]) ⊙ ((W_u + s·B_u,e
//! A_u,e) X[t])]`, `e = ids[t, j]`,
//!
//! using the linearity of `W_d` (`Σ_j w_j W_d a_j = W_d Σ_j w_j a_j`): every base GEMM runs once
//! per token on `[T, ·]` tensors and the per-expert work is rank r. The forward and its maths are
//! in `forward.rs`, the backward rule and its maths in `backward.rs`. What the tape keeps: `G, U`
//! `[T, I]`, the rank-r codes and the adapters in the layouts the GEMMs read, never a `k·T × I`
//! tensor.
//!
//! How it runs: every rank-r product is one dense GEMM over "block codes" `C` `[T·k, E·r]` (row
//! `(t, j)` holds the slot's `r` codes in expert `e`'s column block and zeros elsewhere) against
//! all experts' `B` laid out as `B_all` `[I, E·r]`: `s·B_g,e Z_g[t,e]` for every slot is `C_g
//! B_g,allᵀ` `[T·k, I]`, `B_g,eᵀ dg_j` is a block of `dg B_g,all`, and `dB_g,all = dgᵀ C_g` sums
//! each expert's slots exactly (the other blocks of a row are zero). The GEMMs run on the tensor
//! cores in the base dtype; only the SwiGLU over the slots and the code layouts are primitives of
//! their own (`primitives.rs`: the CPU reference in `cpu.rs`, the CUDA launchers in `cuda.rs`
//! over kernels/src/moe_ffn.cu). With [`MoeKernels::Tiles`] three tensor-core kernels
//! (`cuda_tiles.rs`, kernels/src/moe_ffn_tiles.cu) do the expansions, the SwiGLU and the
//! projections of a tile of slots at once. The CPU always runs its own tile primitives
//! (`cpu_tiles.rs`: per tile of tokens, one `gemm`-crate product per expert and rank-r product,
//! fused elementwise passes between them, rayon over the tiles), which do the rank-r work at rank
//! r rather than over `E·r` block codes. The `[T·k, I]` slot tensors live only inside one chunk
//! of tokens (`chunks.rs`), so the op's transient memory is bounded; the argument checks are in
//! `checks.rs`, the code layouts on tensors in `codes.rs`.
//!
//! Dropout: one counter-based mask per projection on `X` for gate and up, shared by all experts
//! (the naive path draws one per expert), and a counter-based mask on each `a_j` for down, drawn
//! inside the kernels. The fused and the naive paths agree only without dropout.
//!
//! Dtypes: the base (`X`, `W`, `G`, `U`, `Ā`, `Y`, `dY` and the GEMM operands) is f64, f32 or
//! bf16; adapter weights, routing weights and codes are in the adapter dtype (f64 under an f64
//! base, else f32), and the SwiGLU kernels accumulate in it.

mod backward;
mod checks;
mod chunks;
mod codes;
mod cpu;
mod cpu_tiles;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_tiles;
mod forward;
pub mod primitives;

pub use chunks::default_chunk_tokens;
pub use primitives::{BlockCodes, MoeDims};

use self::primitives as prim;
use crate::autograd::{Input, Node, Output};
use crate::{FrozenWeight, Result, Tensor};

/// The op's name, in its errors and on the tape.
const OP: &str = "moe_ffn";

/// The frozen shared FFN and the stacked expert LoRAs of one MixLoRA layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeFusedWeights<'a> {
    pub w_gate: &'a FrozenWeight, // [I, H] base, frozen: dense or FP8
    pub w_up: &'a FrozenWeight,   // [I, H] base, frozen
    pub w_down: &'a FrozenWeight, // [H, I] base, frozen
    pub a_gate: &'a Tensor,       // [E, r, H] adapter
    pub b_gate: &'a Tensor,       // [E, I, r] adapter
    pub a_up: &'a Tensor,         // [E, r, H] adapter
    pub b_up: &'a Tensor,         // [E, I, r] adapter
    pub a_down: &'a Tensor,       // [E, r, I] adapter
    pub b_down: &'a Tensor,       // [E, H, r] adapter
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

/// Which kernels run the fused FFN's rank-r and SwiGLU work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeKernels {
    /// On CUDA, dense GEMMs over block codes and the SwiGLU kernels (every dtype). The CPU runs
    /// its tile primitives whatever this says ([`moe_fused_runs_tiles`]).
    #[default]
    BlockGemms,
    /// On CUDA, the tensor-core tile kernels (`moe_tiles_*`) where they serve the sizes (bf16
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
    /// `None`: [`default_chunk_tokens`] with the block-code GEMMs, one chunk with the CUDA tile
    /// kernels (they write no `[T·k, I]` tensor), 256 tokens with the CPU's (its backward's
    /// `[chunk, 3I]` then exist for one chunk at a time). The result does not depend on the chunking (up
    /// to the order of the floating-point sums of the weight gradients over chunks).
    pub chunk_tokens: Option<usize>,
}

/// Whether the fused FFN on `x` `[T, H]` with `k` slots a token and these weights runs the tile
/// primitives: always on the CPU; on CUDA the tensor-core kernels (`moe_tiles_*`: a bf16 base,
/// `k` in {1, 2, 4, 8}, `E·r ≤ 128` a multiple of 8, `r ≤ 64`, `I` a multiple of 8) when
/// `kernels` asks for them.
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
    Ok(prim::runs_tiles(&x.storage(), &d, kernels))
}

/// The MixLoRA FFN of `x` `[T, H]` (base dtype) by the `fused` method (docs/DESIGN.md, section
/// 2): `Y` `[T, H]` in `x`'s dtype (see the module doc for the maths and the dtypes). `dropout`,
/// when given, applies the LoRA dropout of training; `opts` picks the kernels and the token
/// chunk.
///
/// Gradients reach `x`, `route.weights` and the six adapter tensors; the shared `W_g, W_u, W_d`
/// must be frozen (an error otherwise, rather than a silently cut graph).
pub fn moe_ffn(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    route: &MoeRouting<'_>,
    dropout: Option<MoeDropout>,
    opts: &MoeFfnOptions,
) -> Result<Tensor> {
    let c = checks::check(x, w, route, dropout)?;
    let plan = chunks::plan(x, &c, opts)?;
    let forward::Forward { gu, zd, y, kept } = forward::forward(x, w, route, &c, &plan)?;
    let saved = backward::Saved {
        gu,
        zd,
        ids: route.ids.clone(),
        kept,
        w_gate: w.w_gate.clone(),
        w_up: w.w_up.clone(),
        w_down: w.w_down.clone(),
        c,
        plan,
    };
    let captured: Vec<Tensor> = saved.tensors().into_iter().cloned().collect();
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
        backward::backward(&saved, inp, dy)
    })
    .map(|n| n.capturing(&captured.iter().collect::<Vec<_>>()));
    Ok(match node {
        Some(node) => y.view(y.layout().clone(), Some(node)),
        None => y,
    })
}
