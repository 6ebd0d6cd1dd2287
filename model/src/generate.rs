//! Text generation with a KV cache: the prompt is checked against the model's context, prefilled
//! in chunks, then the continuation comes one token at a time.
//!
//! Memory is bounded by the context, not by the prompt: a prompt that does not fit with the
//! tokens to generate is refused (or cut, [`PromptOverflow::TruncateLeft`]) before anything is
//! allocated, the KV cache holds exactly `prompt + max_new_tokens` positions, allocated once, and
//! each prefill chunk's attention scores are `[Hq, chunk, ≤ context]`.

use engine::{no_grad, Tensor};

use crate::error::{Error, Result};
use crate::llama::{positions_from_mask, KvCache, Llama};
use crate::sampling::Sampler;

/// Tokens per prefill chunk by default: each chunk's attention scores are
/// `[Hq, 512, ≤ context]`.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// What to do with a prompt that does not fit the context with the tokens to generate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptOverflow {
    /// Fail with [`Error::ContextOverflow`].
    #[default]
    Refuse,
    /// Drop tokens from the start of the prompt (after a leading BOS, which is kept) until it
    /// fits.
    TruncateLeft,
}

/// Settings of [`generate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill forward pass (at least 1).
    pub prefill_chunk: usize,
    pub overflow: PromptOverflow,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            overflow: PromptOverflow::Refuse,
        }
    }
}

/// The part of `prompt` that generation uses: all of it when `prompt + max_new_tokens` fits in
/// `context` positions; otherwise an error, or with [`PromptOverflow::TruncateLeft`] its last
/// tokens (after `bos`, kept when the prompt starts with it). At least one prompt token must fit.
pub fn fit_prompt<'a>(
    prompt: &'a [u32],
    max_new_tokens: usize,
    context: usize,
    overflow: PromptOverflow,
    bos: Option<u32>,
) -> Result<std::borrow::Cow<'a, [u32]>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("generate: the prompt has no tokens".into()));
    }
    let overflowed = || Error::ContextOverflow {
        prompt: prompt.len(),
        max_new_tokens,
        context,
    };
    let room = context.checked_sub(max_new_tokens).ok_or_else(overflowed)?;
    if prompt.len() <= room {
        return Ok(prompt.into());
    }
    let keep_bos = bos.is_some() && prompt.first() == bos.as_ref() && room >= 2;
    match overflow {
        PromptOverflow::Refuse => Err(overflowed()),
        PromptOverflow::TruncateLeft if room == 0 => Err(overflowed()),
        PromptOverflow::TruncateLeft => {
            let head = &prompt[..keep_bos as usize];
            let tail = &prompt[prompt.len() - (room - head.len())..];
            Ok([head, tail].concat().into())
        }
    }
}

/// Runs `ids` through the model in chunks of `chunk` tokens, appending to `cache`, and returns the
/// final hidden state of the last token `[1, 1, H]`. `on_progress(done, total)` runs after each
/// chunk. The hidden states equal one pass over all of `ids` (up to rounding).
pub fn prefill(
    model: &Llama,
    ids: &[u32],
    chunk: usize,
    cache: &mut KvCache,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    if ids.is_empty() {
        return Err(Error::Invalid("prefill: no tokens".into()));
    }
    let device = model.device();
    no_grad(|| {
        let mut last = None;
        let mut done = 0;
        for part in ids.chunks(chunk.max(1)) {
            let t = part.len();
            let x = Tensor::from_slice(part, [1, t], device)?;
            let positions = positions_from_mask(1, t, None, cache.len(), device)?;
            let hidden = model.forward_hidden(&x, &positions, None, Some(cache))?; // [1, t, H]
            last = Some(hidden.narrow(1, t - 1, 1)?.contiguous()?);
            done += t;
            on_progress(done, ids.len());
        }
        Ok(last.expect("at least one chunk"))
    })
}

/// Continues `prompt` (token ids) by up to `opts.max_new_tokens`, stopping after any id in
/// `stop` (which is included in the result). The prompt is first fitted to the model's context
/// ([`fit_prompt`]; nothing is allocated for a prompt that is refused), then prefilled in chunks
/// of `opts.prefill_chunk` tokens with `on_prefill(done, total)` after each. `on_token` sees each
/// new id as soon as it is chosen.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    stop: &[u32],
    on_prefill: impl FnMut(usize, usize),
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let context = model.config.max_position_embeddings;
    let prompt = fit_prompt(
        prompt,
        opts.max_new_tokens,
        context,
        opts.overflow,
        model.config.bos_token_id,
    )?;
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let device = model.device();
    let mut cache = KvCache::with_capacity(prompt.len() + opts.max_new_tokens);
    let mut hidden = prefill(model, &prompt, opts.prefill_chunk, &mut cache, on_prefill)?;
    no_grad(|| loop {
        let logits = model.logits(&hidden)?.to_vec_f32()?; // [V]
        let id = sampler.sample(&logits);
        out.push(id);
        on_token(id);
        if stop.contains(&id) || out.len() == opts.max_new_tokens {
            return Ok(out);
        }
        let x = Tensor::from_slice(&[id], [1, 1], device)?;
        let positions = positions_from_mask(1, 1, None, cache.len(), device)?;
        hidden = model.forward_hidden(&x, &positions, None, Some(&mut cache))?; // [1, 1, H]
    })
}
