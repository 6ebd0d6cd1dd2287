//! Which kernels run and in which chunks of tokens: the per-slot `[chunk·k, I]` tensors of the
//! block-code GEMMs exist for one chunk at a time, so the op's transient memory is bounded. The
//! result does not depend on the chunking, except for the order of the weight gradients' sums.

use super::checks::Checked;
use super::primitives as prim;
use super::{MoeFfnOptions, OP};
use crate::{Error, Result, Tensor};

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

/// Tokens per chunk of the CPU's tile primitives by default: the backward's `dĀ` `[chunk, I]`
/// and `dG|dU` `[chunk, 2I]` then exist for one chunk at a time (the tiles inside a chunk are
/// 64 tokens), which takes some `3·(T − chunk)·I` elements off the activation peak at a few
/// percent of the time.
const CPU_CHUNK_TOKENS: usize = 256;

/// How the op runs: the tile kernels or the block-code GEMMs, over chunks of tokens.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    /// The tensor-core tile kernels run (else the block-code GEMMs and the SwiGLU kernels).
    pub tiles: bool,
    /// `(first token, tokens)` of each chunk, in order.
    pub chunks: Vec<(usize, usize)>,
}

/// The plan of `opts` for `x` `[T, H]`: the tile kernels when asked for and served; the chunk
/// asked for (at most `T`), else one chunk for the CUDA tile kernels (they write no `[T·k, I]`
/// tensor), [`CPU_CHUNK_TOKENS`] for the CPU's and [`default_chunk_tokens`] for the GEMMs. A chunk of 0 tokens is an error.
pub(super) fn plan(x: &Tensor, c: &Checked, opts: &MoeFfnOptions) -> Result<Plan> {
    let (t, k, i) = (c.d.t, c.d.k, c.d.i);
    let tiles = prim::runs_tiles(&x.storage(), &c.d, opts.kernels);
    let chunk = match opts.chunk_tokens {
        Some(0) => return Err(Error::invalid(OP, "a chunk of 0 tokens")),
        Some(c) => c.min(t.max(1)),
        None if tiles && x.device() == crate::Device::Cpu => CPU_CHUNK_TOKENS.min(t.max(1)),
        None if tiles => t.max(1),
        None => default_chunk_tokens(t, k, i),
    };
    let chunks = (0..t)
        .step_by(chunk)
        .map(|t0| (t0, chunk.min(t - t0)))
        .collect();
    Ok(Plan { tiles, chunks })
}

/// The chunks' results joined along dim 0 (no copy for one chunk).
pub(super) fn join(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    crate::cat(&refs, 0)
}
