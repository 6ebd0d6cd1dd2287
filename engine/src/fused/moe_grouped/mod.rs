//! The grouped-expert unit: the primitives of the `grouped` MixLoRA FFN (docs/DESIGN.md, section
//! 2, "`grouped`"): grouping of (token, slot) pairs by expert on the device
//! ([`Tensor::moe_group`], [`Tensor::moe_invert_perm`]), row permute and weighted combine
//! ([`Tensor::moe_permute`], [`Tensor::moe_combine`]) and grouped (per-expert) matmuls over the
//! segments of a sorted row set ([`Tensor::grouped_matmul`]). None of them reads anything back
//! to the host, so a MoE layer built from them never synchronises; every sum runs in a fixed
//! order (no float atomics), so results are deterministic.
//!
//! Files: the primitives' named operands and dispatch (`primitives.rs`), the CPU reference
//! (`cpu.rs`), the CUDA launchers (`cuda.rs`) over the kernels of `kernels/src/moe_grouped.cu`.
//!
//! Notation: `N` tokens, `E` experts, `k` experts per token, `S = N·k` slots; slot `p = t·k + j`
//! is token `t`'s `j`-th choice. "Accumulation dtype": f32 for f32/bf16 data, f64 for f64.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

use self::primitives as prim;
use crate::autograd::{Input, Node, Output};
use crate::fused::read;
use crate::ops::{float_only, same_device, same_dtype, u32_only};
use crate::{Error, Result, Tensor};

fn rank_is(op: &'static str, t: &Tensor, r: usize) -> Result<()> {
    if t.rank() != r {
        return Err(Error::RankMismatch {
            op,
            expected: r,
            shape: t.shape().clone(),
        });
    }
    Ok(())
}

impl Tensor {
    /// Groups the slots of the expert ids `self` `[N, k]` (u32) by expert, on the device:
    /// `(perm [N·k] u32, offsets [E+1] u32)`. `perm` lists the slot indices `p = t·k + j` sorted
    /// by `ids[p]`, stable (ascending `p` within an expert); `offsets[e]` is the number of slots
    /// whose expert is below `e`, so expert `e`'s slots are `perm[offsets[e]..offsets[e+1]]`.
    ///
    /// An id `≥ E` never writes out of bounds: such slots are placed after every expert (in
    /// ascending order), so `perm` is still a permutation of `0..N·k` and `offsets[E]` counts only
    /// the valid slots (`offsets[E] = N·k` when every id is valid). On CUDA: count, scan and
    /// stable scatter kernels, integer counts only, no host read.
    pub fn moe_group(&self, num_experts: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "moe_group";
        u32_only(OP, self)?;
        rank_is(OP, self, 2)?;
        let s = self.elem_count();
        let (perm, off) = read([self], |[ids]| {
            prim::group(prim::Group { ids }, num_experts)
        })?;
        Ok((
            Tensor::from_storage(perm, [s], None),
            Tensor::from_storage(off, [num_experts + 1], None),
        ))
    }

    /// The inverse of a permutation `self` `[S]` (u32): `inv[perm[q]] = q`, i.e. the row of the
    /// sorted order that holds slot `p`. Entries `≥ S` are skipped (their `inv` stays unset on
    /// CUDA, `u32::MAX` on the CPU).
    pub fn moe_invert_perm(&self) -> Result<Tensor> {
        const OP: &str = "moe_invert_perm";
        u32_only(OP, self)?;
        rank_is(OP, self, 1)?;
        let s = read([self], |[perm]| {
            prim::invert_perm(prim::InvertPerm { perm })
        })?;
        Ok(Tensor::from_storage(s, self.shape().clone(), None))
    }

    /// Gathers the rows of `self` (`x` `[N, H]`) into slot order: `y[q] = x[perm[q] / k]`,
    /// `[N·k, H]`, for `perm` `[N·k]` from [`Tensor::moe_group`].
    ///
    /// Backward (deterministic, no atomics): `dx[t] = Σ_j dy[inv[t·k + j]]`, the k rows of each
    /// token summed back in slot order (a [`Tensor::moe_combine`] with unit weights).
    pub fn moe_permute(&self, perm: &Tensor, k: usize) -> Result<Tensor> {
        const OP: &str = "moe_permute";
        float_only(OP, self)?;
        u32_only(OP, perm)?;
        same_device(OP, self, perm)?;
        rank_is(OP, self, 2)?;
        rank_is(OP, perm, 1)?;
        let (n, h) = (self.dims()[0], self.dims()[1]);
        if k == 0 || perm.elem_count() != n * k {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape().clone(),
                rhs: perm.shape().clone(),
            });
        }
        let s = read([self, perm], |[x, perm]| {
            prim::permute(
                prim::Permute {
                    x,
                    perm,
                    scale: None,
                },
                k,
            )
        })?;
        let perm_c = perm.clone();
        let node = Node::record_with(
            OP,
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |x, _, g| {
                let ones = Tensor::ones([n, k], (x[0].dtype()).accumulation(), x[0].device())?;
                Ok(vec![Some(g.moe_combine(&perm_c, &ones)?)])
            },
        )
        .map(|n| n.capturing(&[perm]));
        Ok(Tensor::from_storage(s, [n * k, h], node))
    }

    /// Weighted combine of expert outputs in slot order, `self` (`y` `[N·k, H]`, row `q` belongs
    /// to slot `perm[q]`): `out[t] = Σ_j w[t, j] · y[pos(t·k + j)]` `[N, H]` with `pos` the
    /// inverse of `perm` (computed here on the device) and `weights` `[N, k]` (any float dtype:
    /// used in the accumulation dtype). The sum runs over `j` in order, in f32 for bf16 `y`;
    /// the output has `y`'s dtype.
    ///
    /// Backward: `dy[q] = w[perm[q]] · dout[perm[q] / k]` (a scaled [`Tensor::moe_permute`]:
    /// `moe_permute` with `scale = w`) and `dw[t, j] = ⟨dout[t], y[pos(t·k + j)]⟩` (one block-sum
    /// per slot: `moe_combine_dw`).
    pub fn moe_combine(&self, perm: &Tensor, weights: &Tensor) -> Result<Tensor> {
        const OP: &str = "moe_combine";
        float_only(OP, self)?;
        float_only(OP, weights)?;
        u32_only(OP, perm)?;
        same_device(OP, self, perm)?;
        same_device(OP, self, weights)?;
        rank_is(OP, self, 2)?;
        rank_is(OP, weights, 2)?;
        rank_is(OP, perm, 1)?;
        let (m, h) = (self.dims()[0], self.dims()[1]);
        let (n, k) = (weights.dims()[0], weights.dims()[1]);
        if m != n * k || perm.elem_count() != m || k == 0 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape().clone(),
                rhs: weights.shape().clone(),
            });
        }
        let acc = self.dtype().accumulation();
        let w = weights.to_dtype(acc)?; // [N, k]
        let inv = perm.moe_invert_perm()?; // [N·k]
        let s = read([self, &inv, &w], |[y, inv, w]| {
            prim::combine(prim::Combine { y, inv, w })
        })?;
        let (perm_c, inv_c) = (perm.clone(), inv.clone());
        // `y` is read only for the weights' gradient, the weights only for `y`'s.
        let inputs = [
            Input::keep_if(self, w.tracks_grad()),
            Input::keep_if(&w, self.tracks_grad()),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let (y, w) = (&x[0], &x[1]);
            let dy = y
                .tracks_grad()
                .then(|| -> Result<Tensor> {
                    let s = read([g, &perm_c, w], |[x, perm, scale]| {
                        let scale = Some(scale);
                        prim::permute(prim::Permute { x, perm, scale }, k)
                    })?;
                    Ok(Tensor::from_storage(s, [m, h], None))
                })
                .transpose()?;
            let dw = w
                .tracks_grad()
                .then(|| -> Result<Tensor> {
                    let s = read([y, &inv_c, g], |[y, inv, g]| {
                        prim::combine_dw(prim::CombineDw { y, inv, g }, k)
                    })?;
                    Ok(Tensor::from_storage(s, [n, k], None))
                })
                .transpose()?;
            Ok(vec![dy, dw])
        })
        .map(|n| n.capturing(&[perm, &inv]));
        Ok(Tensor::from_storage(s, [n, h], node))
    }

    /// Per-expert matmul over the rows of `self` (`x` `[M, K]`, sorted by expert) with the
    /// stacked weights `w` `[E, N, K]` and the segment offsets `[E+1]` u32 (on the device, from
    /// [`Tensor::moe_group`]): `y[r] = x[r] · w[e]ᵀ` for `offsets[e] ≤ r < offsets[e+1]`, `[M, N]`
    /// in `x`'s dtype (accumulated in f32 for bf16). Rows outside every segment are 0; an empty
    /// segment is fine. Offsets must not decrease (values past `M` count as `M`).
    ///
    /// Backward: `dx[seg e] = dy[seg e] · w[e]` (the same grouped kernel, `w` read transposed)
    /// and `dw[e] = dy[seg e]ᵀ · x[seg e]` (a grouped weight-gradient kernel that reads the
    /// offsets on the device, `grouped_matmul_dw`; rows summed in order).
    pub fn grouped_matmul(&self, w: &Tensor, offsets: &Tensor) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        float_only(OP, self)?;
        same_dtype(OP, self, w)?;
        same_device(OP, self, w)?;
        u32_only(OP, offsets)?;
        same_device(OP, self, offsets)?;
        rank_is(OP, self, 2)?;
        rank_is(OP, w, 3)?;
        let (m, kk) = (self.dims()[0], self.dims()[1]);
        let (e, nn) = (w.dims()[0], w.dims()[1]);
        if w.dims()[2] != kk || offsets.dims() != [e + 1] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape().clone(),
                rhs: w.shape().clone(),
            });
        }
        let s = grouped(self, w, offsets, false)?;
        let off = offsets.clone();
        // Each operand is read for the other's gradient only.
        let inputs = [
            Input::keep_if(self, w.tracks_grad()),
            Input::keep_if(w, self.tracks_grad()),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let (xs, ws) = (&x[0], &x[1]);
            let dx = xs
                .tracks_grad()
                .then(|| -> Result<Tensor> {
                    let s = grouped(g, ws, &off, true)?;
                    Ok(Tensor::from_storage(s, [m, kk], None))
                })
                .transpose()?;
            let dw = ws
                .tracks_grad()
                .then(|| -> Result<Tensor> {
                    let s = read([g, xs, &off], |[dy, x, offsets]| {
                        prim::grouped_matmul_dw(prim::GroupedMatmulDw { dy, x, offsets }, e)
                    })?;
                    Ok(Tensor::from_storage(s, [e, nn, kk], None))
                })
                .transpose()?;
            Ok(vec![dx, dw])
        })
        .map(|n| n.capturing(&[offsets]));
        Ok(Tensor::from_storage(s, [m, nn], node))
    }
}

/// The `grouped_matmul` primitive on tensors: `x` `[M, K]`, `w` `[E, N, K]` (`[E, K, N]` when
/// `trans_w`), `offsets` `[E+1]`.
fn grouped(x: &Tensor, w: &Tensor, offsets: &Tensor, trans_w: bool) -> Result<crate::Storage> {
    read([x, w, offsets], |[x, w, offsets]| {
        prim::grouped_matmul(prim::GroupedMatmul { x, w, offsets }, trans_w)
    })
}
