//! The fused MixLoRA FFN's backend primitives: their sizes and settings ([`MoeDims`]), one named
//! operand struct each, and their dispatch to the CPU reference (`cpu.rs`) or the CUDA launchers
//! (`cuda.rs`, `cuda_tiles.rs`).
//!
//! "Base" operands have the base dtype (f64, f32 or bf16), "adapter" operands the adapter dtype
//! (f64 under an f64 base, else f32: [`DType::accumulation`](crate::DType::accumulation)); the
//! maths accumulates in the adapter dtype. `ids` `[T, k]` u32 are the experts of each (token, slot)
//! `p = t·k + j` (distinct within a token). "Block codes" `[rows, E·r]` hold a slot's `r` codes in
//! its expert's column block `[e·r, (e+1)·r)` and zeros elsewhere, so that every rank-r product of
//! the op is one dense GEMM. `m(p)` is the dropout mask of [`MoeDims::dropout`] on slot `p`.
//!
//! The tile primitives run the same FFN in three passes that never write a `[T·k, I]` tensor: on
//! CUDA three tensor-core kernels (bf16 base; kernels/src/moe_ffn_tiles.cu), on the CPU per-expert
//! GEMMs over tiles of tokens and fused elementwise passes (`cpu_tiles.rs`, every dtype). Their
//! codes come per slot, `[T·k, r]` base, already scaled; `B_g,all`, `B_u,all` `[I, E·r]` and
//! `A_d,all` `[E·r, I]` base. The op runs them on the CPU always ([`runs_tiles`]).

use super::{cpu, cpu_tiles, MoeKernels};
#[cfg(feature = "cuda")]
use super::{cuda, cuda_tiles};
use crate::backend::cpu::dropout::keyed;
use crate::fused::{on_backend, operands, IntoStorage};
use crate::{DType, Result, Storage};

/// Sizes and settings of the fused MixLoRA FFN primitives: `t` tokens, `k` slots per token, `e`
/// experts, LoRA rank `r`, intermediate size `i`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeDims {
    pub t: usize,
    pub k: usize,
    pub e: usize,
    pub r: usize,
    pub i: usize,
    /// Dropout probability on `a_j` before `A_d` (0: none): element `i` of slot `p = t·k + j`
    /// is dropped when `rng::dropped(seed, ((t0 + t)·k + j)·I + i, dropout_threshold(p_drop))`,
    /// and kept ones are scaled by `1/(1 − p_drop)`.
    pub dropout: f64,
    /// The seed of that mask before the dropout key ([`crate::set_dropout_key`]): the mask is
    /// drawn from `seed ^ key`. The CUDA kernels read the key when they run; the dispatch below
    /// keys the CPU's copy once, on the calling thread ([`MoeDims::cpu_keyed`]), so the CPU code
    /// (`cpu.rs`, `cpu_tiles`) uses `seed` as it is.
    pub seed: u64,
    /// The index of the first token among all the op's tokens (the op runs in token chunks;
    /// the dropout mask is a function of the global slot).
    pub t0: usize,
}

impl MoeDims {
    /// These settings with the seed keyed by the calling thread's dropout key, for the CPU
    /// branches of the dispatch (once per primitive: `cpu_tiles::rows` and `cols` run its
    /// `backward`, which must not key again).
    fn cpu_keyed(&self) -> MoeDims {
        MoeDims {
            seed: keyed(self.seed),
            ..*self
        }
    }
}

/// What [`block_codes`] makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockCodes {
    /// The scale `s` of every code.
    pub scale: f64,
    /// Per-slot source, per-token result (`true`); or per-token source, per-slot result.
    pub summed: bool,
    /// The result's dtype (a float).
    pub dtype: DType,
}

operands! {
    /// Each slot's `r` codes out of block codes: [`gather_codes`].
    pub struct GatherCodes {
        /// `[T·k or T, E·r]`, any float dtype: block codes per slot or per token.
        src: Operand,
        /// `[T, k]` u32.
        ids: Operand,
    }
}

operands! {
    /// Codes into block codes: [`expand_codes`].
    pub struct ExpandCodes {
        /// `[T, k, r]`, any float dtype (kept by the result).
        codes: Operand,
        /// `[T, k]` u32.
        ids: Operand,
    }
}

operands! {
    /// Scaled block codes in one pass: [`block_codes`].
    pub struct Blocks {
        /// Block codes, any float dtype: `[T, E·r]` per token for a per-slot result, `[T·k, E·r]`
        /// per slot for a summed one.
        src: Operand,
        /// `[T, k]` u32.
        ids: Operand,
        /// `[T, k]` adapter: routing weights (per-slot results only).
        w: OptOperand,
    }
}

operands! {
    /// SwiGLU over the slots: [`swiglu_forward`].
    pub struct SwigluForward {
        /// `G` `[T, I]` base (a row stride allowed).
        g: Operand,
        /// `U` `[T, I]` base (a row stride allowed).
        u: Operand,
        /// `ΔG` `[T·k, I]` base: the slots' LoRA terms of the gate.
        dg: Operand,
        /// `ΔU` `[T·k, I]` base: the slots' LoRA terms of up.
        du: Operand,
        /// `w` `[T, k]` adapter: the routing weights.
        w: Operand,
    }
}

operands! {
    /// The backward of the SwiGLU over the slots: [`swiglu_backward`].
    pub struct SwigluBackward {
        /// `G` `[T, I]` base (a row stride allowed).
        g: Operand,
        /// `U` `[T, I]` base (a row stride allowed).
        u: Operand,
        /// `ΔG` `[T·k, I]` base.
        dg: Operand,
        /// `ΔU` `[T·k, I]` base.
        du: Operand,
        /// `ΔD` `[T·k, I]` base: `A_d,eᵀ dZ_d[t, j]` of each slot, before its dropout.
        dd: Operand,
        /// `dĀ` `[T, I]` base.
        dabar: Operand,
        /// `w` `[T, k]` adapter.
        w: Operand,
    }
}

operands! {
    /// The forward tile kernel: [`tiles_forward`].
    pub struct TilesForward {
        /// `G` `[T, I]` base (a row stride allowed).
        g: Operand,
        /// `U` `[T, I]` base (a row stride allowed).
        u: Operand,
        /// `Cg` `[T·k, r]` base: `s·Z_g` of each slot.
        cg: Operand,
        /// `Cu` `[T·k, r]` base: `s·Z_u` of each slot.
        cu: Operand,
        /// `[T, k]` u32.
        ids: Operand,
        /// `B_g,all` `[I, E·r]` base.
        bg: Operand,
        /// `B_u,all` `[I, E·r]` base.
        bu: Operand,
        /// `A_d,all` `[E·r, I]` base.
        ad: Operand,
        /// `w` `[T, k]` adapter.
        w: Operand,
    }
}

operands! {
    /// The two backward tile kernels, [`tiles_rows`] and [`tiles_cols`]: those of
    /// [`TilesForward`] with `Cd` and `dĀ`.
    pub struct TilesBackward {
        /// `G` `[T, I]` base (a row stride allowed).
        g: Operand,
        /// `U` `[T, I]` base (a row stride allowed).
        u: Operand,
        /// `Cg` `[T·k, r]` base.
        cg: Operand,
        /// `Cu` `[T·k, r]` base.
        cu: Operand,
        /// `Cd` `[T·k, r]` base: `dZ_d` of each slot.
        cd: Operand,
        /// `[T, k]` u32.
        ids: Operand,
        /// `B_g,all` `[I, E·r]` base.
        bg: Operand,
        /// `B_u,all` `[I, E·r]` base.
        bu: Operand,
        /// `A_d,all` `[E·r, I]` base.
        ad: Operand,
        /// `dĀ` `[T, I]` base.
        dabar: Operand,
        /// `w` `[T, k]` adapter.
        w: Operand,
    }
}

/// The results of [`swiglu_backward`] (each contiguous).
#[derive(Debug)]
pub struct SwigluGrads<S> {
    /// `[T, 2I]` base: `[Σ_j dg_j | Σ_j du_j]`.
    pub dgu: S,
    /// `[T·k, I]` base: each slot's `dg_j`.
    pub dg: S,
    /// `[T·k, I]` base: each slot's `du_j`.
    pub du: S,
    /// `[T·k, I]` base: each slot's `m(p) ⊙ a_j`.
    pub am: S,
    /// `[T, k]` adapter: `⟨dĀ[t], a_j⟩`.
    pub dw: S,
}

/// The results of [`tiles_rows`] (each contiguous).
#[derive(Debug)]
pub struct TileRowGrads<S> {
    /// `[T, 2I]` base: `[Σ_j dg_j | Σ_j du_j]`.
    pub dgu: S,
    /// `[T·k, r]` adapter: `B_g,eᵀ dg_j`.
    pub dzg: S,
    /// `[T·k, r]` adapter: `B_u,eᵀ du_j`.
    pub dzu: S,
    /// `[T, k]` adapter: `⟨dĀ[t], a_j⟩`.
    pub dw: S,
}

impl<S: IntoStorage> IntoStorage for SwigluGrads<S> {
    type Out = SwigluGrads<S::Out>;
    fn into_storage(self) -> Self::Out {
        SwigluGrads {
            dgu: self.dgu.into_storage(),
            dg: self.dg.into_storage(),
            du: self.du.into_storage(),
            am: self.am.into_storage(),
            dw: self.dw.into_storage(),
        }
    }
}

impl<S: IntoStorage> IntoStorage for TileRowGrads<S> {
    type Out = TileRowGrads<S::Out>;
    fn into_storage(self) -> Self::Out {
        TileRowGrads {
            dgu: self.dgu.into_storage(),
            dzg: self.dzg.into_storage(),
            dzu: self.dzu.into_storage(),
            dw: self.dw.into_storage(),
        }
    }
}

/// `out` `[T, k, r]` adapter, `out[t, j, c] = src[row, ids[t, j]·r + c]` with `row = t·k + j`
/// when `src` has `T·k` rows, `row = t` when it has `T`.
pub fn gather_codes(o: GatherCodes<'_, Storage>, d: &MoeDims) -> Result<Storage> {
    on_backend!(
        "moe_gather_codes",
        o,
        o => cpu::gather_codes(&o, d),
        cuda::gather_codes(&o, d)
    )
}

/// Block codes in the dtype of `codes`: per slot (`summed` false) `[T·k, E·r]`, row `p` holding
/// `codes[p]` in block `ids[p]`; summed `[T, E·r]`, row `t` holding `Σ_j codes[t, j]` in blocks
/// `ids[t, j]`.
pub fn expand_codes(o: ExpandCodes<'_, Storage>, d: &MoeDims, summed: bool) -> Result<Storage> {
    let op = if summed {
        "moe_expand_codes_summed"
    } else {
        "moe_expand_codes"
    };
    on_backend!(
        op,
        o,
        o => cpu::expand_codes(&o, d, summed),
        cuda::expand_codes(&o, d, summed)
    )
}

/// Scaled block codes in `how.dtype`, in one pass (gather, scale, expand and convert), the
/// values computed in the accumulation dtype of `src`'s as the separate ops compute them:
/// - per slot (`how.summed` false): `[T·k, E·r]` from per-token block codes `src` `[T, E·r]`: in
///   block `ids[p]` of row `p = t·k + j`, `src[t, c]·s + 0`, or with weights `w`
///   `src[t, c]·(w[p]·s + 0)`; zeros elsewhere;
/// - summed (`how.summed` true): `[T, E·r]` from per-slot block codes `src` `[T·k, E·r]`: in block
///   `ids[t, j]` of row `t`, `src[t·k + j, c]·s + 0`; zeros elsewhere.
pub fn block_codes(o: Blocks<'_, Storage>, d: &MoeDims, how: &BlockCodes) -> Result<Storage> {
    on_backend!(
        "moe_block_codes",
        o,
        o => cpu::block_codes(&o, d, how),
        cuda::block_codes(&o, d, how)
    )
}

/// SwiGLU over the slots: `g = G[t] + ΔG[p]`, `u = U[t] + ΔU[p]`, `a_j = silu(g) ⊙ u`; returns
/// `(Ā [T, I] = Σ_j w_j a_j, am [T·k, I] = m(p) ⊙ a_j)`, both base.
pub fn swiglu_forward(o: SwigluForward<'_, Storage>, d: &MoeDims) -> Result<(Storage, Storage)> {
    on_backend!(
        "moe_swiglu_forward",
        o,
        o => cpu::swiglu_forward(&o, &d.cpu_keyed()),
        cuda::swiglu_forward(&o, d)
    )
}

/// The backward of [`swiglu_forward`]: `da_j = w_j dĀ[t] + m(p) ⊙ ΔD[p]`, `dg_j = da_j ⊙ u ⊙
/// silu'(g)`, `du_j = da_j ⊙ silu(g)`, with `a_j` recomputed ([`SwigluGrads`]).
pub fn swiglu_backward(
    o: SwigluBackward<'_, Storage>,
    d: &MoeDims,
) -> Result<SwigluGrads<Storage>> {
    on_backend!(
        "moe_swiglu_backward",
        o,
        o => cpu::swiglu_backward(&o, &d.cpu_keyed()),
        cuda::swiglu_backward(&o, d)
    )
}

/// Whether the tile primitives serve these sizes for a base in `x`'s dtype on `x`'s backend
/// (always on the CPU).
pub fn tiles_supported(x: &Storage, d: &MoeDims) -> bool {
    match x {
        Storage::Cpu(_) => cpu_tiles::supported(d),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => cuda_tiles::supported(s.dtype, d),
    }
}

/// Whether the op runs the tile primitives for a base in `x`'s dtype on `x`'s backend: always on
/// the CPU (its block-code GEMMs would spend E times the rank-r work on zeros and write the
/// `[T·k, I]` slot tensors), on CUDA when `kernels` asks for them and they serve the sizes.
pub fn runs_tiles(x: &Storage, d: &MoeDims, kernels: MoeKernels) -> bool {
    match x {
        Storage::Cpu(_) => {
            let _ = kernels; // the CPU has no other way that writes no `[T·k, I]` tensor
            cpu_tiles::supported(d)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => kernels == MoeKernels::Tiles && tiles_supported(x, d),
    }
}

/// `(Ā [T, I] base, Z_d [T·k, r] adapter)` with `g = G[t] + Cg[p] B_g,allᵀ`, `u` likewise,
/// `a_j = silu(g) ⊙ u`, `Ā[t] = Σ_j w_j a_j`, `Z_d[p] = A_d,e (m(p) ⊙ a_j)`.
pub fn tiles_forward(o: TilesForward<'_, Storage>, d: &MoeDims) -> Result<(Storage, Storage)> {
    on_backend!(
        "moe_tiles_forward",
        o,
        o => cpu_tiles::forward(&o, &d.cpu_keyed()),
        cuda_tiles::forward(&o, d)
    )
}

/// The backward over the slots' rows ([`TileRowGrads`]), with `da_j = w_j dĀ[t] + m(p) ⊙
/// A_d,eᵀ Cd[p]` and `dg_j`, `du_j` as in [`swiglu_backward`].
pub fn tiles_rows(o: TilesBackward<'_, Storage>, d: &MoeDims) -> Result<TileRowGrads<Storage>> {
    on_backend!(
        "moe_tiles_rows",
        o,
        o => cpu_tiles::rows(&o, &d.cpu_keyed()),
        cuda_tiles::rows(&o, d)
    )
}

/// [`tiles_rows`] and, with `cols`, [`tiles_cols`] of the same operands in one call (on the CPU
/// one pass over the tiles, which the split would recompute).
#[allow(clippy::type_complexity)]
pub fn tiles_backward(
    o: TilesBackward<'_, Storage>,
    d: &MoeDims,
    cols: bool,
) -> Result<(TileRowGrads<Storage>, Option<(Storage, Storage, Storage)>)> {
    on_backend!(
        "moe_tiles_backward",
        o,
        o => cpu_tiles::backward(&o, &d.cpu_keyed(), cols),
        cuda_tiles::rows(&o, d).and_then(|r| {
            let c = if cols { Some(cuda_tiles::cols(&o, d)?) } else { None };
            Ok((r, c))
        })
    )
}

/// The backward over the columns: `(dB_g,all [I, E·r] = Σ_p dg_pᵀ Cg[p], dB_u,all, dA_d,all
/// [E·r, I] = Σ_p Cd[p]ᵀ (m(p) ⊙ a_p))`, adapter; each expert's block sums its own slots.
pub fn tiles_cols(
    o: TilesBackward<'_, Storage>,
    d: &MoeDims,
) -> Result<(Storage, Storage, Storage)> {
    on_backend!(
        "moe_tiles_cols",
        o,
        o => cpu_tiles::cols(&o, &d.cpu_keyed()),
        cuda_tiles::cols(&o, d)
    )
}
