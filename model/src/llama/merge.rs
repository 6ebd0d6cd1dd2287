//! Inference with adapters at the base model's speed: each plain LoRA folded into the weight it
//! adapts, `W' = W + s·B·A`, once, so that a forward pass runs the base GEMMs only.
//!
//! What is merged depends on the base dtype:
//! - f32 (and f64): every plain LoRA (all of a LoRA adapter's, the attention LoRAs of a MixLoRA
//!   adapter). The adapter maths runs in the same dtype, so `x W'ᵀ` equals
//!   `x Wᵀ + s·(x Aᵀ) Bᵀ` up to the rounding of the sums. A GGUF base (Q8_0, Q4_0, Q4_1, ...) is
//!   dequantised when it is loaded, so its weights in memory are f32 too: the merge adds the exact
//!   delta to the dequantised weight and nothing is quantised again.
//! - bf16: nothing. `bf16(W + s·B·A)` rounds each weight to 8 significant bits, and a trained
//!   delta is usually far below half a unit in the last place of the weight it is added to (a
//!   relative 2⁻⁹), so most of it would vanish; an f32 copy of the weights would double their
//!   memory and give up the bf16 GEMMs that are the reason to pick bf16. The LoRAs stay separate
//!   and run in f32 as in training.
//!
//! The MixLoRA experts cannot be merged (each token takes its own mixture); the fused MoE path
//! computes their base GEMMs once per token instead, and the merge stacks the experts for it once
//! ([`FusedExperts::for_inference`]) rather than at every forward pass.
//!
//! A merged model is for inference only: its base weights hold the deltas, so a training forward,
//! new adapters or new adapter values would train or run against the wrong base. Those calls
//! fail with [`Error::InferenceOnly`]; the adapters left (routers, experts, unmerged LoRAs) are
//! detached, so no forward pass records a tape even outside `no_grad`.

use engine::{DType, FrozenWeight, Tensor};

use super::Llama;
use crate::adapters::{FusedExperts, LoraLinear, MlpAdapters};
use crate::error::{Error, Result};

/// What [`Llama::merge_adapters_for_inference`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// LoRA pairs folded into their base weight.
    pub merged: usize,
    /// Plain LoRA pairs left separate (a bf16 base).
    pub kept: usize,
    /// MixLoRA FFN layers (their experts and routers stay separate).
    pub moe_layers: usize,
}

impl std::fmt::Display for MergeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} LoRA pairs merged into the base weights", self.merged)?;
        if self.kept > 0 {
            write!(
                f,
                ", {} kept separate (a bf16 base would round the deltas away)",
                self.kept
            )?;
        }
        if self.moe_layers > 0 {
            write!(f, ", {} MixLoRA FFN layers", self.moe_layers)?;
        }
        Ok(())
    }
}

/// `W + s·B·A` in `W`'s dtype, computed in the adapter dtype (`W`'s for f32 and f64 bases).
fn merged_weight(w: &Tensor, l: &LoraLinear) -> Result<Tensor> {
    engine::no_grad(|| {
        let delta = l.b.matmul(&l.a)?.affine(l.scale, 0.0)?; // [out, in]
        Ok(w.add(&delta.to_dtype(w.dtype())?)?)
    })
}

/// `l` without autograd history or variables (same buffers).
fn detached(l: &LoraLinear) -> LoraLinear {
    LoraLinear::new(l.a.detach(), l.b.detach(), l.scale, l.dropout)
}

impl Llama {
    /// Prepares the model for inference: folds every plain LoRA into its base weight when the base
    /// is f32 or f64 (see the module doc for bf16 and quantised bases), detaches the adapters that
    /// remain, and marks the model inference-only (training entry points then fail). Without
    /// adapters it only marks the model. Calling it again merges nothing more.
    pub fn merge_adapters_for_inference(&mut self) -> Result<MergeReport> {
        self.inference_only = true;
        let mut report = MergeReport::default();
        let mergeable = matches!(self.dtype(), DType::F32 | DType::F64);
        let Some(adapters) = self.adapters.as_mut() else {
            return Ok(report);
        };
        for (layer, ad) in self.layers.iter_mut().zip(&mut adapters.layers) {
            let attn = [
                &mut layer.q_proj,
                &mut layer.k_proj,
                &mut layer.v_proj,
                &mut layer.o_proj,
            ];
            let mut targets: Vec<(&mut FrozenWeight, &mut Option<LoraLinear>)> =
                attn.into_iter().zip(ad.attn.iter_mut()).collect();
            match &mut ad.mlp {
                MlpAdapters::Lora(ffn) => {
                    let mlp = [
                        &mut layer.gate_proj,
                        &mut layer.up_proj,
                        &mut layer.down_proj,
                    ];
                    targets.extend(mlp.into_iter().zip(ffn.iter_mut()));
                }
                MlpAdapters::MixLora(moe) => {
                    report.moe_layers += 1;
                    moe.router.weight = moe.router.weight.detach();
                    for e in &mut moe.experts {
                        for l in [&mut e.gate, &mut e.up, &mut e.down].into_iter().flatten() {
                            *l = detached(l);
                        }
                    }
                    ad.fused_inference = FusedExperts::for_inference(moe)?;
                }
            }
            for (w, lora) in targets {
                let Some(l) = lora.as_ref() else { continue };
                // An FP8 weight keeps its LoRA: the delta would not survive 3 mantissa bits.
                if let (true, FrozenWeight::Dense(dense)) = (mergeable, &*w) {
                    *w = merged_weight(dense, l)?.into();
                    *lora = None;
                    report.merged += 1;
                } else {
                    *lora = Some(detached(l));
                    report.kept += 1;
                }
            }
        }
        Ok(report)
    }

    /// Whether [`Llama::merge_adapters_for_inference`] has run: the model then serves inference
    /// only.
    pub fn is_inference_only(&self) -> bool {
        self.inference_only
    }

    /// An [`Error::InferenceOnly`] for `what` when the model is inference-only.
    pub(super) fn check_trainable(&self, what: &str) -> Result<()> {
        if self.inference_only {
            return Err(Error::InferenceOnly(what.to_string()));
        }
        Ok(())
    }
}
