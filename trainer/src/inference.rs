//! A model with an adapter, prepared for inference (`mixlora generate`, `mixlora eval`): its plain
//! LoRAs merged into the base weights where that is exact (`Llama::merge_adapters_for_inference`)
//! and its MixLoRA FFNs computed by `imp` (the fused path unless asked otherwise).

use model::llama::MergeReport;
use model::{Llama, MoeImpl};

use crate::error::Result;
use crate::run::use_moe_impl;

/// Merges `model`'s adapters for inference and sets its MoE implementation; the model can no
/// longer train. Returns what was merged.
pub fn prepare(model: &mut Llama, imp: MoeImpl) -> Result<MergeReport> {
    let report = model.merge_adapters_for_inference()?;
    if report.moe_layers > 0 {
        use_moe_impl(model, imp)?;
    }
    Ok(report)
}
