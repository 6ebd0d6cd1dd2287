//! The grouped-expert unit's backend primitives: their named operands and their dispatch to the
//! CPU reference (`cpu.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! Notation: `N` tokens, `E` experts, `k` experts per token, `S = N·k` slots; slot `p = t·k + j`
//! is token `t`'s `j`-th choice. Ids, permutations and offsets are u32; "the accumulation
//! dtype" is f32 for f32/bf16 data, f64 for f64.

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use crate::fused::{on_backend, operands};
use crate::{Result, Storage};

operands! {
    /// Stable grouping of the slots by expert: `(perm [S] u32, offsets [E+1] u32)`; ids ≥ E go
    /// after every expert (not counted in `offsets`).
    pub struct Group {
        ids: Operand, // [N, k] u32
    }
}

operands! {
    /// `inv[perm[q]] = q` `[S]` u32.
    pub struct InvertPerm {
        perm: Operand, // [S] u32
    }
}

operands! {
    /// `y[q] = scale[perm[q]] · x[perm[q] / k]` `[S, H]` in x's dtype (scale 1 without one).
    pub struct Permute {
        x: Operand,        // [N, H] float
        perm: Operand,     // [S] u32
        scale: OptOperand, // [N·k] accumulation dtype
    }
}

operands! {
    /// `out[t] = Σ_j w[t, j] · y[inv[t·k + j]]` `[N, H]` in y's dtype.
    pub struct Combine {
        y: Operand,   // [S, H] float, rows in slot order
        inv: Operand, // [S] u32
        w: Operand,   // [N, k] accumulation dtype
    }
}

operands! {
    /// `dw[t, j] = ⟨g[t], y[inv[t·k + j]]⟩` `[N, k]` in the accumulation dtype.
    pub struct CombineDw {
        y: Operand,   // [S, H] float
        inv: Operand, // [S] u32
        g: Operand,   // [N, H] y's dtype
    }
}

operands! {
    /// Grouped matmul over the expert segments `[off[e], off[e+1])` of the rows of `x`:
    /// `y[seg e] = x[seg e] · w[e]ᵀ` for `w` `[E, N, K]` (`trans_w = false`), or `x[seg e] ·
    /// w[e]` for `w` `[E, K, N]` (`trans_w = true`), `[M, N]` in x's dtype. Rows outside every
    /// segment are 0.
    pub struct GroupedMatmul {
        x: Operand,       // [M, K] float
        w: Operand,       // [E, N, K] (or [E, K, N]) x's dtype
        offsets: Operand, // [E+1] u32
    }
}

operands! {
    /// Grouped weight gradient: `dw[e] = dy[seg e]ᵀ x[seg e]` `[E, N, K]` in dy's dtype.
    pub struct GroupedMatmulDw {
        dy: Operand,      // [M, N] float
        x: Operand,       // [M, K] dy's dtype
        offsets: Operand, // [E+1] u32
    }
}

pub fn group(o: Group<'_, Storage>, num_experts: usize) -> Result<(Storage, Storage)> {
    const OP: &str = "moe_group";
    on_backend!(
        OP,
        o,
        o => cpu::group(o, num_experts),
        cuda::group(o, num_experts)
    )
}

pub fn invert_perm(o: InvertPerm<'_, Storage>) -> Result<Storage> {
    const OP: &str = "moe_invert_perm";
    on_backend!(OP, o, o => cpu::invert_perm(o), cuda::invert_perm(o))
}

pub fn permute(o: Permute<'_, Storage>, k: usize) -> Result<Storage> {
    const OP: &str = "moe_permute";
    on_backend!(OP, o, o => cpu::permute(o, k), cuda::permute(o, k))
}

pub fn combine(o: Combine<'_, Storage>) -> Result<Storage> {
    const OP: &str = "moe_combine";
    on_backend!(OP, o, o => cpu::combine(o), cuda::combine(o))
}

pub fn combine_dw(o: CombineDw<'_, Storage>, k: usize) -> Result<Storage> {
    const OP: &str = "moe_combine_dw";
    on_backend!(OP, o, o => cpu::combine_dw(o, k), cuda::combine_dw(o, k))
}

pub fn grouped_matmul(o: GroupedMatmul<'_, Storage>, trans_w: bool) -> Result<Storage> {
    const OP: &str = "grouped_matmul";
    on_backend!(
        OP,
        o,
        o => cpu::grouped_matmul(o, trans_w),
        cuda::grouped_matmul(o, trans_w)
    )
}

pub fn grouped_matmul_dw(o: GroupedMatmulDw<'_, Storage>, num_experts: usize) -> Result<Storage> {
    const OP: &str = "grouped_matmul_dw";
    on_backend!(
        OP,
        o,
        o => cpu::grouped_matmul_dw(o, num_experts),
        cuda::grouped_matmul_dw(o, num_experts)
    )
}

// ----- checks shared by the backends ---------------------------------------------------------
