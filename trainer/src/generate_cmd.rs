//! `mixlora generate`: prints only the continuation on stdout; logs go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use engine::Device;
use model::generate::generate;
use model::llama::Llama;
use model::sampling::Sampler;
use model::tokenizer::Tokenizer;
use trainer::config::{DTypeName, MoeArgs};

#[derive(Args)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder (adapter_config.json + adapter_model.safetensors, or MoE-PEFT's
    /// adapter_model.bin) to apply [default: none, the base model alone].
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// Stop after this many new tokens (or at the end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with a temperature above 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler (with a temperature above 0).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `cpu`, `cuda` (the first GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Compute dtype of the weights.
    #[arg(long, value_enum, default_value_t = DTypeName::F32)]
    dtype: DTypeName,
    #[command(flatten)]
    moe: MoeArgs,
}

pub fn run(a: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let device = a.device;
    let dtype = a.dtype.dtype();
    let t0 = Instant::now();
    let mut model = Llama::load(&a.model, dtype, device)?;
    if let Some(dir) = &a.adapter {
        model::adapters::load(dir, &mut model)?;
        trainer::run::use_moe_impl(&mut model, a.moe.moe_impl(device))?;
    }
    let tokenizer = Tokenizer::load(&a.model, &model.config)?;
    eprintln!(
        "loaded {} ({} layers, hidden {}) in {:.2}s",
        a.model.display(),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        t0.elapsed().as_secs_f64()
    );
    let prompt = tokenizer.encode(&a.prompt, tokenizer.adds_bos())?;
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let stop = model.config.eos_token_ids.clone();
    let mut printed = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let mut first_token_s = 0.0;
    let out = generate(
        &model,
        &prompt,
        a.max_new_tokens,
        &mut sampler,
        &stop,
        |id| {
            if ids.is_empty() {
                first_token_s = t1.elapsed().as_secs_f64();
            }
            ids.push(id);
            // Decode everything so far and print the new suffix (multi-byte characters may span
            // several tokens).
            if let Ok(text) = tokenizer.decode(&ids, true) {
                if text.len() > printed.len()
                    && text.starts_with(&printed)
                    && !text.ends_with('\u{fffd}')
                {
                    let _ = write!(stdout, "{}", &text[printed.len()..]);
                    let _ = stdout.flush();
                    printed = text;
                }
            }
        },
    )?;
    let text = tokenizer.decode(&out, true)?;
    if text.len() > printed.len() && text.starts_with(&printed) {
        print!("{}", &text[printed.len()..]);
    }
    println!();
    let total = t1.elapsed().as_secs_f64();
    let decode_tokens = out.len().saturating_sub(1);
    eprintln!(
        "prompt {} tokens in {:.3}s ({:.1} tokens/s); decode {} tokens in {:.3}s ({:.1} tokens/s)",
        prompt.len(),
        first_token_s,
        prompt.len() as f64 / first_token_s.max(1e-9),
        decode_tokens,
        total - first_token_s,
        decode_tokens as f64 / (total - first_token_s).max(1e-9)
    );
    Ok(())
}
