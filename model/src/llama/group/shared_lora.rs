//! The projections of a shared batch (`shared.rs`): the frozen weight once over all rows, every
//! segment's LoRA of the projection grouped.
//!
//! Without dropout (or when no segment's LoRA on the projection has any), the segments' LoRA
//! run as one product over all `M` rows (Punica's SGMV as plain GEMMs): their `A` `[r_s, in]`
//! stacked along the rank into `[R, in]` (`R = Σ r_s`) and their `B` `[out, r_s]` into
//! `[out, R]` (`engine::cat`: gradients flow back to each), then
//!
//! `y = x Wᵀ + ((x Aᵀ) ⊙ S) Bᵀ`,
//!
//! where `S` `[M, R]` holds segment `s`'s scale in its `r_s` columns on its rows and 0
//! elsewhere, so that each row gets exactly its own adapter's delta `s · (x A_sᵀ) B_sᵀ` (the
//! other blocks of its codes are multiplied by 0). Four launches per projection whatever the
//! number of segments, for `R/r` times the rank-r FLOPs, small next to the base GEMM's
//! (`R ≪ out`). Segments may differ in rank, and a segment without a LoRA on the projection
//! (other target modules) has no columns. `x Aᵀ` reads `x` in its own dtype
//! ([`Tensor::matmul_cast`]): the tape keeps no adapter-dtype copy of it.
//!
//! With dropout, each segment's LoRA runs on its own packed rows ([`Tensor::lora_add`], its
//! delta then added to the shared base output): the mask is a function of `(seed, element index)` over the segment's
//! `[B·T_s, in]` rows, exactly the single run's mask, which one product over all rows cannot
//! draw with the engine's ops (one seed per segment and per-segment row numbering). The base GEMM
//! still runs once; the rank-r work is `2` launches per segment.

use std::cell::RefCell;

use engine::{FrozenWeight, Tensor};

use super::shared::SharedBatch;
use crate::adapters::{LayerAdapters, LoraLinear, MlpAdapters};
use crate::error::Result;
use crate::llama::sub_seed;

/// The projections of one layer of a shared batch, for every segment at once.
pub(super) struct GroupProj<'a> {
    g: &'a SharedBatch,
    li: usize,
    ads: &'a [&'a LayerAdapters],
    /// The last input packed (`(input, its packed rows)`): q, k and v share one input.
    packed: RefCell<Option<(Tensor, Tensor)>>,
}

/// The LoRA of adapter slot `slot` (0..4: q, k, v, o; 4..7: the FFN's gate, up, down for plain
/// LoRA adapters) of one layer's adapters.
fn slot_lora(ad: &LayerAdapters, slot: usize) -> Option<&LoraLinear> {
    match (slot, &ad.mlp) {
        (0..4, _) => ad.attn[slot].as_ref(),
        (4..7, MlpAdapters::Lora(l)) => l[slot - 4].as_ref(),
        _ => None,
    }
}

impl<'a> GroupProj<'a> {
    pub(super) fn new(g: &'a SharedBatch, li: usize, ads: &'a [&'a LayerAdapters]) -> Self {
        GroupProj {
            g,
            li,
            ads,
            packed: RefCell::new(None),
        }
    }

    /// `x Wᵀ` `[.., out]` of `x` `[.., in]` (all `M` rows of the batch) plus, on each segment's
    /// rows, its LoRA of `slot` with its dropout.
    pub(super) fn apply(&self, x: &Tensor, w: &FrozenWeight, slot: usize) -> Result<Tensor> {
        let n_in = *x.dims().last().unwrap_or(&0);
        let x2 = x.reshape([self.g.rows, n_in])?; // [M, in]
        let loras: Vec<Option<&LoraLinear>> = self.ads.iter().map(|a| slot_lora(a, slot)).collect();
        let seeds: Vec<Option<u64>> = (self.g.segs.iter())
            .map(|s| sub_seed(s.ctx.dropout_seed, self.li, slot))
            .collect();
        let dropout = loras
            .iter()
            .zip(&seeds)
            .any(|(l, seed)| seed.is_some() && l.is_some_and(|l| l.dropout > 0.0));
        let present: Vec<&LoraLinear> = loras.iter().flatten().copied().collect();
        let one_dtype = present.iter().all(|l| l.a.dtype() == present[0].a.dtype());
        let y = if present.is_empty() {
            w.linear(&x2)?
        } else if dropout || !one_dtype {
            self.per_segment(&x2, w, &loras, &seeds)?
        } else {
            self.stacked(&x2, w, &loras)?
        }; // [M, out]
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = w.dims()[0];
        Ok(y.reshape(dims)?)
    }

    /// Every segment's LoRA in one product over all rows (see the module doc).
    fn stacked(
        &self,
        x: &Tensor,
        w: &FrozenWeight,
        loras: &[Option<&LoraLinear>],
    ) -> Result<Tensor> {
        let present: Vec<(usize, &LoraLinear)> = (loras.iter().enumerate())
            .filter_map(|(s, l)| l.map(|l| (s, l)))
            .collect();
        let cat = |parts: Vec<&Tensor>, dim| -> Result<Tensor> {
            match parts.as_slice() {
                [one] => Ok((*one).clone()),
                _ => Ok(engine::cat(&parts, dim)?),
            }
        };
        let a = cat(present.iter().map(|(_, l)| &l.a).collect(), 0)?; // [R, in]
        let b = cat(present.iter().map(|(_, l)| &l.b).collect(), 1)?; // [out, R]
        let blocks: Vec<(usize, usize, f64)> = (present.iter())
            .map(|&(s, l)| (s, l.a.dims()[0], l.scale))
            .collect();
        let scales = self.g.block_scales(&blocks, a.dtype())?; // [M, R]
        let z = x.matmul_cast(&a.t()?)?.mul(&scales)?; // [M, R], adapter dtype
        let d = z.matmul(&b.t()?)?.to_dtype(x.dtype())?; // [M, out]
        Ok(w.linear(x)?.add(&d)?)
    }

    /// The base GEMM once, each segment's LoRA with its dropout on its packed rows (see the
    /// module doc). Each delta is added onto rows of a zero tensor rather than onto the base
    /// output's rows: slices of a tensor that needs a gradient cost a full-size gradient each
    /// in the backward pass (a narrow's adjoint pads), and the zeros need none.
    fn per_segment(
        &self,
        x: &Tensor,
        w: &FrozenWeight,
        loras: &[Option<&LoraLinear>],
        seeds: &[Option<u64>],
    ) -> Result<Tensor> {
        let xp = self.packed(x)?; // [N_real, in]
        let n_out = w.dims()[0];
        let most = self
            .g
            .segs
            .iter()
            .map(|s| s.packed.len())
            .max()
            .unwrap_or(0);
        let zeros = Tensor::zeros([most, n_out], x.dtype(), x.device())?;
        let parts = (self.g.segs.iter().zip(loras).zip(seeds))
            .map(|((s, l), seed)| {
                let rows = s.packed.len();
                let zs = zeros.narrow(0, 0, rows)?;
                Ok(match l {
                    None => zs,
                    Some(l) => {
                        let xs = xp.narrow(0, s.packed.start, rows)?;
                        let dropout = seed.map(|seed| (l.dropout, seed));
                        zs.lora_add(&xs, &l.a, &l.b, l.scale, dropout)?
                    }
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let delta = match parts.as_slice() {
            [one] => one.clone(),
            _ => engine::cat(&parts.iter().collect::<Vec<_>>(), 0)?,
        }; // [N_real, out]
        Ok(w.linear(x)?.add(&self.g.unpack(&delta)?)?)
    }

    /// The packed rows of `x` `[M, in]`, gathered once for the projections that share it.
    fn packed(&self, x: &Tensor) -> Result<Tensor> {
        let mut cached = self.packed.borrow_mut();
        if let Some((input, rows)) = cached.as_ref() {
            if input.same_storage(x) && input.dims() == x.dims() {
                return Ok(rows.clone());
            }
        }
        let rows = self.g.pack(x)?;
        *cached = Some((x.clone(), rows.clone()));
        Ok(rows)
    }
}
