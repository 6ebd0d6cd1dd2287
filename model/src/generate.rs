//! Text generation with a KV cache: one prefill pass over the prompt, then one token at a time.

use engine::{no_grad, Tensor};

use crate::error::Result;
use crate::llama::{positions_from_mask, KvCache, Llama};
use crate::sampling::Sampler;

/// Continues `prompt` (token ids) by up to `max_new_tokens`, stopping after any id in `stop`
/// (which is included in the result). `on_token` sees each new id as soon as it is chosen.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(crate::error::Error::Invalid(
            "generate: the prompt has no tokens".into(),
        ));
    }
    let device = model.device();
    no_grad(|| {
        let mut cache = KvCache::new();
        let mut out = Vec::with_capacity(max_new_tokens);
        let mut next_ids = prompt.to_vec();
        while out.len() < max_new_tokens {
            let t = next_ids.len();
            let ids = Tensor::from_vec(std::mem::take(&mut next_ids), [1, t], device)?;
            let positions = positions_from_mask(1, t, None, cache.len(), device)?;
            let hidden = model.forward_hidden(&ids, &positions, None, Some(&mut cache))?; // [1, t, H]
            let logits = model.logits(&hidden.narrow(1, t - 1, 1)?)?.to_vec_f32()?; // [V]
            let id = sampler.sample(&logits);
            out.push(id);
            on_token(id);
            if stop.contains(&id) {
                break;
            }
            next_ids.push(id);
        }
        Ok(out)
    })
}
