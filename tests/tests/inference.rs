//! Inference with adapters: LoRA merged into the base weights gives the unmerged logits, a merged
//! model cannot train, generation is bounded by the model's context, and a chunked prefill gives
//! the hidden states of one pass.

use engine::{no_grad, DType, Device, Tensor};
use model::adapters::MoeImpl;
use model::generate::{fit_prompt, generate, prefill, GenerateOptions, PromptOverflow};
use model::llama::positions_from_mask;
use model::sampling::Sampler;
use model::{AdapterConfig, Error, KvCache, Llama, LlamaConfig, PeftType};
use testutil::{ids, rel_err, tiny_llama_config};

fn small(peft_type: PeftType) -> AdapterConfig {
    AdapterConfig {
        num_experts: 4,
        r: 4,
        lora_alpha: 8.0,
        // A router that prefers some experts clearly, so the routing is not a near tie.
        router_init_range: 1.0,
        ..AdapterConfig::default_for(peft_type)
    }
}

/// A random model of shape `base` in `dtype` with adapters whose B matrices are random (non-zero),
/// so that they change the outputs.
fn model_with(cfg: &AdapterConfig, base: LlamaConfig, dtype: DType) -> Llama {
    let mut m = Llama::random(base, 7, dtype, Device::Cpu).unwrap();
    m.add_adapters(cfg, 11).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let v = Tensor::randn(
                t.dims().to_vec(),
                0.0,
                0.2,
                500 + k as u64,
                t.dtype(),
                t.device(),
            )
            .unwrap();
            m.set_trainable_param(&name, v.to_var().unwrap()).unwrap();
        }
    }
    m
}

fn logits(m: &Llama) -> Vec<f64> {
    let x = ids(&[3, 7, 1, 9, 4, 2, 0, 0, 8, 5], &[2, 5]);
    let mask = ids(&[1, 1, 1, 1, 1, 0, 0, 1, 1, 1], &[2, 5]);
    no_grad(|| m.forward(&x, Some(&mask)))
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

fn base_logits(dtype: DType) -> Vec<f64> {
    logits(&Llama::random(tiny_llama_config(), 7, dtype, Device::Cpu).unwrap())
}

#[test]
fn merged_lora_logits_equal_unmerged_logits() {
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-13)] {
        let mut m = model_with(&small(PeftType::Lora), tiny_llama_config(), dtype);
        let unmerged = logits(&m);
        assert!(
            rel_err(&unmerged, &base_logits(dtype)) > 1e-2,
            "the LoRAs do nothing"
        );
        let report = m.merge_adapters_for_inference().unwrap();
        assert_eq!((report.merged, report.kept, report.moe_layers), (14, 0, 0));
        let merged = logits(&m);
        let err = rel_err(&merged, &unmerged);
        assert!(err < tol, "{dtype}: merged vs unmerged {err:.2e}");
        // Nothing is left to run beside the base GEMMs.
        let ad = m.adapters().unwrap();
        assert!(ad.layers.iter().all(|l| l.attn.iter().all(Option::is_none)));
    }
}

#[test]
fn merged_mixlora_attention_logits_equal_unmerged_logits() {
    let fused = MoeImpl::Fused(engine::MoeFfnOptions::default());
    for imp in [MoeImpl::Naive, fused] {
        let mut m = model_with(&small(PeftType::MixLora), tiny_llama_config(), DType::F32);
        m.set_moe_impl(imp);
        let unmerged = logits(&m);
        assert!(rel_err(&unmerged, &base_logits(DType::F32)) > 1e-2);
        let report = m.merge_adapters_for_inference().unwrap();
        assert_eq!((report.merged, report.kept, report.moe_layers), (8, 0, 2));
        let err = rel_err(&logits(&m), &unmerged);
        assert!(err < 1e-6, "{imp}: merged vs unmerged {err:.2e}");
    }
}

#[test]
fn a_bf16_base_keeps_its_loras_separate() {
    let mut m = model_with(&small(PeftType::Lora), tiny_llama_config(), DType::BF16);
    let unmerged = logits(&m);
    let report = m.merge_adapters_for_inference().unwrap();
    assert_eq!((report.merged, report.kept), (0, 14));
    assert_eq!(logits(&m), unmerged);
}

#[test]
fn a_merged_model_records_no_tape_and_refuses_training() {
    for peft in [PeftType::Lora, PeftType::MixLora] {
        let mut m = model_with(&small(peft), tiny_llama_config(), DType::F32);
        let x = ids(&[3, 7, 1, 9], &[1, 4]);
        // With trainable adapters a forward outside no_grad records a tape ...
        assert!(m.forward(&x, None).unwrap().tracks_grad());
        let cfg = m.adapter_config().unwrap().clone();
        let name = m.trainable_params()[0].0.clone();
        m.merge_adapters_for_inference().unwrap();
        assert!(m.is_inference_only());
        // ... a merged one never does.
        assert!(!m.forward(&x, None).unwrap().tracks_grad(), "{peft:?}");
        let refused = |e: Error| matches!(e, Error::InferenceOnly(_));
        assert!(refused(m.forward_train(&x, None, Some(1)).err().unwrap()));
        assert!(refused(m.add_adapters(&cfg, 3).unwrap_err()));
        let v = Tensor::zeros([1], DType::F32, Device::Cpu).unwrap();
        assert!(refused(m.set_trainable_param(&name, v).unwrap_err()));
        let e = m.forward_train(&x, None, None).err().unwrap().to_string();
        assert!(
            e.starts_with("forward_train: the adapters were merged"),
            "{e}"
        );
    }
}

/// The tiny model with a context of `context` positions and BOS id 1.
fn short_context(context: usize) -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: context,
        bos_token_id: Some(1),
        ..tiny_llama_config()
    }
}

fn run(m: &Llama, prompt: &[u32], opts: &GenerateOptions) -> model::Result<Vec<u32>> {
    let mut prefilled = Vec::new();
    let out = generate(
        m,
        prompt,
        opts,
        &mut Sampler::greedy(),
        &[],
        |done, total| prefilled.push((done, total)),
        |_| {},
    );
    match out {
        // Progress reaches the whole (fitted) prompt once, in chunk steps.
        Ok(_) => assert_eq!(prefilled.last().map(|p| p.0 == p.1), Some(true)),
        // A refused prompt never reaches a forward pass.
        Err(_) => assert!(prefilled.is_empty(), "{prefilled:?}"),
    }
    out
}

#[test]
fn generate_refuses_or_truncates_a_prompt_longer_than_the_context() {
    let m = model_with(&small(PeftType::MixLora), short_context(16), DType::F32);
    let prompt: Vec<u32> = [1].into_iter().chain((0..13).map(|i| 2 + i % 9)).collect(); // 14
    let opts = |max_new_tokens, overflow| GenerateOptions {
        max_new_tokens,
        prefill_chunk: 5,
        overflow,
    };
    // 14 + 4 > 16: refused, before any forward pass.
    let e = run(&m, &prompt, &opts(4, PromptOverflow::Refuse)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ContextOverflow {
                prompt: 14,
                max_new_tokens: 4,
                context: 16
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("max_position_embeddings) is 16"),
        "{e}"
    );
    // 12 + 4 = 16 fits exactly.
    let out = run(&m, &prompt[..12], &opts(4, PromptOverflow::Refuse)).unwrap();
    assert_eq!(out.len(), 4);
    // Cut from the left: BOS and the last 11 tokens, as if given that prompt.
    let kept: Vec<u32> = [1].iter().chain(&prompt[3..]).copied().collect();
    let cut = run(&m, &prompt, &opts(4, PromptOverflow::TruncateLeft)).unwrap();
    assert_eq!(
        cut,
        run(&m, &kept, &opts(4, PromptOverflow::Refuse)).unwrap()
    );
    assert_eq!(
        &*fit_prompt(&prompt, 4, 16, PromptOverflow::TruncateLeft, Some(1)).unwrap(),
        &kept[..]
    );
    // No room for a single prompt token: refused either way.
    for overflow in [PromptOverflow::Refuse, PromptOverflow::TruncateLeft] {
        assert!(run(&m, &prompt, &opts(16, overflow)).is_err());
        assert!(run(&m, &prompt, &opts(40, overflow)).is_err());
    }
}

#[test]
fn a_preallocated_kv_cache_refuses_to_grow_past_its_capacity() {
    let m = model_with(&small(PeftType::Lora), tiny_llama_config(), DType::F32);
    let prompt: Vec<u32> = (0..10).map(|i| i % 11).collect();
    let mut cache = KvCache::with_capacity(12);
    prefill(&m, &prompt, 4, &mut cache, |_, _| {}).unwrap();
    assert_eq!(cache.len(), 10);
    let e = prefill(&m, &prompt[..3], 4, &mut cache, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("exceed its capacity of 12"), "{e}");
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 11).collect();
    for peft in [PeftType::Lora, PeftType::MixLora] {
        let mut m = model_with(&small(peft), short_context(64), DType::F32);
        m.merge_adapters_for_inference().unwrap();
        let x = Tensor::from_slice(&prompt, [1, 40], Device::Cpu).unwrap();
        let pos = positions_from_mask(1, 40, None, 0, Device::Cpu).unwrap();
        let mut one_cache = KvCache::new();
        let h = no_grad(|| m.forward_hidden(&x, &pos, None, Some(&mut one_cache))).unwrap();
        let want = m.logits(&h.narrow(1, 39, 1).unwrap()).unwrap();
        let mut cache = KvCache::with_capacity(41);
        let mut steps = Vec::new();
        let last = prefill(&m, &prompt, 7, &mut cache, |d, t| steps.push((d, t))).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.0).collect::<Vec<_>>(),
            [7, 14, 21, 28, 35, 40]
        );
        let got = m.logits(&last).unwrap();
        let err = rel_err(&got.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap());
        assert!(err < 1e-6, "{peft:?}: chunked vs one pass {err:.2e}");
        // The caches agree too: one more token after each.
        let step = |c: &mut KvCache| {
            let y = Tensor::from_slice(&[5u32], [1, 1], Device::Cpu).unwrap();
            let p = positions_from_mask(1, 1, None, 40, Device::Cpu).unwrap();
            let h = no_grad(|| m.forward_hidden(&y, &p, None, Some(c))).unwrap();
            m.logits(&h).unwrap().to_vec_f64().unwrap()
        };
        let err = rel_err(&step(&mut cache), &step(&mut one_cache));
        assert!(
            err < 1e-6,
            "{peft:?}: next token after chunked vs one pass {err:.2e}"
        );
    }
}
