//! `mixlora export`: converts an adapter folder to MoE-PEFT's format (`adapter_model.bin`, which
//! MoE-PEFT and the `mixlora` package load) or back to this project's (`adapter_model.safetensors`).

use std::path::PathBuf;

use clap::Args;
use model::adapters::ExportFormat;

#[derive(Args)]
pub struct ExportArgs {
    /// The adapter folder to convert: adapter_config.json with adapter_model.safetensors (ours)
    /// or adapter_model.bin (MoE-PEFT's).
    #[arg(long)]
    adapter: PathBuf,
    /// The folder to write, created if needed and replaced atomically; other files in it are
    /// kept.
    #[arg(long)]
    out: PathBuf,
    /// `moe-peft`: adapter_config.json + adapter_model.bin (torch.save's format, f32/bf16/f16 as
    /// stored) for MoE-PEFT and the `mixlora` package; `safetensors`: this project's format.
    #[arg(long, default_value_t = ExportFormat::MoePeft)]
    format: ExportFormat,
    /// The base_model_name_or_path to write [default: the adapter's, e.g.
    /// HuggingFaceTB/SmolLM2-135M-Instruct for a model trained on that GGUF].
    #[arg(long, value_name = "NAME")]
    base_model: Option<String>,
}

/// Runs the conversion and reports it on stderr.
pub fn run(a: ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let files = model::adapters::export(&a.adapter, &a.out, a.format, a.base_model.as_deref())?;
    eprintln!(
        "wrote {} ({}, {} tensors over {} layers, base model {})",
        a.out.display(),
        a.format,
        files.tensors.len(),
        files.layers,
        files.config.base_model_name_or_path
    );
    Ok(())
}
