//! `mixlora generate`: prints only the continuation on stdout; logs go to stderr.

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use engine::Device;
use model::generate::{generate, GenerateOptions, PromptOverflow, DEFAULT_PREFILL_CHUNK};
use model::llama::Llama;
use model::sampling::Sampler;
use model::tokenizer::Tokenizer;
use trainer::config::{BaseDTypeName, DTypeName, MoeArgs};
use trainer::progress::Reporter;

/// Which end of an over-long prompt `--truncate-prompt` cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TruncateSide {
    /// Drop the first tokens (a leading BOS is kept), so the end of the prompt stays.
    Left,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder (adapter_config.json + adapter_model.safetensors, or MoE-PEFT's
    /// adapter_model.bin) to apply; its plain LoRAs are merged into an f32 base's weights at load
    /// (a bf16 base keeps them separate) [default: none, the base model alone].
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
    /// How the frozen projection weights are stored: `same` (in --dtype) or `fp8` (`mixlora
    /// train --base-dtype`); generate with the base the adapter was trained on.
    #[arg(long, value_enum, default_value_t = BaseDTypeName::Same)]
    base_dtype: BaseDTypeName,
    /// A prompt whose tokens and --max-new-tokens exceed the model's context is refused; with
    /// `left`, its first tokens are dropped instead (a note goes to stderr) [default: refuse].
    #[arg(long, value_enum, value_name = "SIDE")]
    truncate_prompt: Option<TruncateSide>,
    /// Prompt tokens per prefill pass (bounds the attention scores' memory).
    #[arg(long, default_value_t = NonZeroUsize::new(DEFAULT_PREFILL_CHUNK).expect("nonzero"))]
    prefill_chunk: NonZeroUsize,
    #[command(flatten)]
    moe: MoeArgs,
}

pub fn run(a: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let device = a.device;
    let dtype = a.dtype.dtype();
    let t0 = Instant::now();
    let mut model = Llama::load(&a.model, dtype, device)?;
    a.base_dtype
        .apply(&mut model, &mut |m: &str| eprintln!("{m}"))?;
    if let Some(dir) = &a.adapter {
        model::adapters::load(dir, &mut model)?;
        let report = trainer::inference::prepare(&mut model, a.moe.inference_moe_impl(device))?;
        eprintln!("adapter {}: {report}", dir.display());
    }
    let tokenizer = Tokenizer::load(&a.model, &model.config)?;
    eprintln!(
        "loaded {} ({} layers, hidden {}, context {}) in {:.2}s",
        a.model.display(),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.max_position_embeddings,
        t0.elapsed().as_secs_f64()
    );
    let prompt = tokenizer.encode(&a.prompt, tokenizer.adds_bos())?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        prefill_chunk: a.prefill_chunk.get(),
        overflow: match a.truncate_prompt {
            None => PromptOverflow::Refuse,
            Some(TruncateSide::Left) => PromptOverflow::TruncateLeft,
        },
    };
    let context = model.config.max_position_embeddings;
    let room = context.saturating_sub(a.max_new_tokens);
    if prompt.len() > room && opts.overflow == PromptOverflow::TruncateLeft && room > 0 {
        eprintln!(
            "the prompt has {} tokens; with --max-new-tokens {} the context of {context} leaves \
             room for {room}: {} tokens are dropped from its start (a leading BOS is kept)",
            prompt.len(),
            a.max_new_tokens,
            prompt.len() - room
        );
    }
    let prompt_tokens = prompt.len().min(room.max(1));
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let stop = model.config.eos_token_ids.clone();
    let mut printed = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let mut prefill_s = 0.0;
    let mut first_token_s = 0.0;
    // The prefill's progress: a bar on a terminal, else a line every few seconds and one at the
    // end (`trainer::progress`).
    let mut progress: Option<(Reporter, usize)> = None;
    let out = generate(
        &model,
        &prompt,
        &opts,
        &mut sampler,
        &stop,
        |done, total| {
            let (bar, shown) =
                progress.get_or_insert_with(|| (Reporter::stderr("prefill", total, "tokens"), 0));
            bar.inc(done - *shown);
            *shown = done;
            if done == total {
                bar.finish();
                prefill_s = t1.elapsed().as_secs_f64();
            }
        },
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
    )
    .map_err(|e| match e {
        model::Error::ContextOverflow { .. } => format!(
            "{}: {e}; shorten the prompt, lower --max-new-tokens or pass --truncate-prompt left",
            a.model.display()
        )
        .into(),
        e => Box::<dyn std::error::Error>::from(e),
    })?;
    let text = tokenizer.decode(&out, true)?;
    if text.len() > printed.len() && text.starts_with(&printed) {
        print!("{}", &text[printed.len()..]);
    }
    println!();
    let total = t1.elapsed().as_secs_f64();
    let decode_tokens = out.len().saturating_sub(1);
    eprintln!(
        "prefill {prompt_tokens} tokens in {prefill_s:.3}s ({:.1} tokens/s); first token at \
         {first_token_s:.3}s; decode {decode_tokens} tokens in {:.3}s ({:.1} tokens/s)",
        prompt_tokens as f64 / prefill_s.max(1e-9),
        total - first_token_s,
        decode_tokens as f64 / (total - first_token_s).max(1e-9)
    );
    Ok(())
}
