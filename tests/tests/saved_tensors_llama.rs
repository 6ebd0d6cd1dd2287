//! What the tape of a LLaMA training step keeps alive, audited with `saved_buffers` against the
//! tape with every input kept (`keeping_all_inputs`, the tape before graph-only references): no
//! attention scores, no operands of residual adds, no RoPE inputs, nothing held by views and
//! casts, fewer bytes per layer; and bit-identical gradients for LoRA and MixLoRA (every MoE
//! implementation), f32 and bf16, with and without gradient checkpointing.

use engine::autograd::{keeping_all_inputs, saved_buffers, SavedBuffer};
use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::{AdapterConfig, Llama, LlamaConfig, MoeImpl};
use testutil::ids;

// The audited model: distinct sizes, so that every saved shape says what it is.
const H: usize = 32; // hidden
const I: usize = 48; // intermediate
const NH: usize = 4; // query heads
const NKV: usize = 2; // key/value heads
const D: usize = 8; // head dim
const V: usize = 19; // vocab
const B: usize = 2;
const T: usize = 7; // B·NH·T·T (the scores) is no other buffer's size

fn config(layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: V,
        hidden_size: H,
        intermediate_size: I,
        num_hidden_layers: layers,
        num_attention_heads: NH,
        num_key_value_heads: NKV,
        head_dim: D,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// A random model with `layers` layers and the adapters of `cfg` (every adapter matrix random,
/// so that every gradient carries signal), computed with `imp`.
fn model(layers: usize, cfg: &AdapterConfig, imp: MoeImpl, dtype: DType, ckpt: bool) -> Llama {
    let mut m = Llama::random(config(layers), 5, dtype, Device::Cpu).unwrap();
    m.add_adapters(cfg, 1).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        let v = Tensor::randn(
            t.shape().clone(),
            0.0,
            0.3,
            100 + k as u64,
            t.dtype(),
            t.device(),
        )
        .unwrap()
        .to_var()
        .unwrap();
        m.set_trainable_param(&name, v).unwrap();
    }
    m.set_moe_impl(imp);
    m.set_gradient_checkpointing(ckpt);
    m
}

fn lora() -> AdapterConfig {
    AdapterConfig {
        r: 4,
        ..AdapterConfig::lora_default()
    }
}

fn mixlora() -> AdapterConfig {
    AdapterConfig {
        r: 4,
        num_experts: 3,
        ..AdapterConfig::mixlora_default()
    }
}

/// The adapter set-ups audited: plain LoRA, and MixLoRA with each MoE implementation.
fn setups() -> Vec<(&'static str, AdapterConfig, MoeImpl)> {
    vec![
        ("lora", lora(), MoeImpl::Naive),
        ("mixlora naive", mixlora(), MoeImpl::Naive),
        ("mixlora paper", mixlora(), MoeImpl::Paper),
        ("mixlora grouped", mixlora(), MoeImpl::Grouped),
        (
            "mixlora fused",
            mixlora(),
            MoeImpl::Fused(Default::default()),
        ),
    ]
}

/// The loss of one training step as the trainer builds it: LM loss over vocabulary chunks of
/// the final hidden states, plus the aux loss, with dropout and a padded sequence.
fn step_loss(m: &Llama) -> Tensor {
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 6, 8, 5, 11, 17, 13, 0, 0], &[B, T]);
    let mask = ids(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[B, T]);
    let x = IGNORE_INDEX;
    let labels = ids(&[7, 1, 9, 4, 2, 6, x, 5, 11, 17, 13, x, x, x], &[B * T]);
    let out = m
        .forward_train_hidden(&tokens, Some(&mask), Some(7))
        .unwrap();
    let rows = out
        .hidden
        .reshape([B * T, H])
        .unwrap()
        .linear_cross_entropy_rows(m.lm_head_weight(), &labels, IGNORE_INDEX, 8)
        .unwrap();
    let mut loss = rows.sum_all().unwrap().to_dtype(DType::F32).unwrap();
    if let Some(aux) = out.aux_loss {
        loss = loss.add(&aux.to_dtype(DType::F32).unwrap()).unwrap();
    }
    loss
}

/// The buffers the tape of `loss` keeps beyond the model's own tensors (frozen weights and
/// trainable adapters): activations, masks, tables, ids.
fn activations(m: &Llama, loss: &Tensor) -> Vec<SavedBuffer> {
    let mut own = vec![m.embed_tokens.clone(), m.norm.clone()];
    for l in &m.layers {
        own.extend(
            [
                &l.input_layernorm,
                testutil::dense(&l.q_proj),
                testutil::dense(&l.k_proj),
                testutil::dense(&l.v_proj),
                testutil::dense(&l.o_proj),
                &l.post_attention_layernorm,
                testutil::dense(&l.gate_proj),
                testutil::dense(&l.up_proj),
                testutil::dense(&l.down_proj),
            ]
            .map(Tensor::clone),
        );
    }
    own.extend(m.trainable_params().into_iter().map(|(_, t)| t));
    saved_buffers(loss)
        .into_iter()
        .filter(|b| !b.variable && !own.iter().any(|w| w.same_storage(&b.tensor)))
        .collect()
}

/// Every trainable parameter's gradient, as bits, after one training step recorded as the tape
/// now does, or with every input kept (the tape before graph-only references); and the loss.
fn step_gradients(m: &Llama, keep_all: bool) -> Vec<Vec<u64>> {
    let step = || {
        let loss = step_loss(m);
        loss.backward().unwrap();
        loss
    };
    for (_, p) in m.trainable_params() {
        p.zero_grad();
    }
    let loss = if keep_all {
        keeping_all_inputs(step)
    } else {
        step()
    };
    let bits = |t: &Tensor| -> Vec<u64> {
        t.to_vec_f64()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let mut out = vec![bits(&loss)];
    for (name, p) in m.trainable_params() {
        let g = p.grad().unwrap_or_else(|| panic!("{name} got no gradient"));
        out.push(bits(&g));
    }
    out
}

/// Graph-only references change what the tape holds, never a number: the loss and every
/// adapter gradient of a training step of a small LLaMA (LoRA, MixLoRA with each MoE
/// implementation; f32 and bf16 bases; with and without gradient checkpointing) have the same
/// bits as with every input kept.
#[test]
fn llama_gradients_are_bit_identical() {
    for (name, cfg, imp) in setups() {
        for dtype in [DType::F32, DType::BF16] {
            for ckpt in [false, true] {
                let m = model(2, &cfg, imp, dtype, ckpt);
                assert_eq!(
                    step_gradients(&m, false),
                    step_gradients(&m, true),
                    "{name}, {dtype}, checkpointing {ckpt}"
                );
            }
        }
    }
}

/// What a layer's tape keeps, audited on the whole model: one `[b, h, t, s]` buffer per layer
/// (the probabilities; the scores are gone), nothing held by residual adds, views, casts or the
/// softmax, only its tables by RoPE; and per layer at least the scores, the pre-RoPE q and k and
/// the attention output projection fewer bytes than with every input kept (for plain LoRA also
/// the v projection, the attention output before its reshape and the down projection).
#[test]
fn llama_tape_keeps_no_scores_rope_inputs_or_residual_operands() {
    let score_elems = B * NH * T * T;
    let f32_bytes = 4;
    let scores = score_elems * f32_bytes;
    let per_token = |n: usize| B * T * n * f32_bytes;
    for (name, cfg, imp) in setups() {
        let audit = |layers: usize, keep_all: bool| {
            let m = model(layers, &cfg, imp, DType::F32, false);
            let loss = if keep_all {
                keeping_all_inputs(|| step_loss(&m))
            } else {
                step_loss(&m)
            };
            activations(&m, &loss)
        };
        let score_sized = |bufs: &[SavedBuffer]| {
            bufs.iter()
                .filter(|b| b.tensor.elem_count() == score_elems)
                .count()
        };
        let (before, after) = (
            [audit(1, true), audit(2, true)],
            [audit(1, false), audit(2, false)],
        );
        assert_eq!(
            score_sized(&before[1]),
            4,
            "{name}: scores and probabilities"
        );
        assert_eq!(score_sized(&after[1]), 2, "{name}: probabilities only");
        for b in &after[1] {
            let holder = b.kept_by;
            let data_free = [
                "add",
                "sub",
                "reshape",
                "transpose",
                "permute",
                "narrow",
                "broadcast_as",
                "causal_masked_softmax",
                "to_dtype",
                "cat",
                "copy",
                "affine",
                "sum",
            ];
            assert!(
                !data_free.contains(&holder),
                "{name}: {holder} keeps a {} {} made by {:?}",
                b.dtype,
                b.shape,
                b.made_by
            );
            if holder == "rope" {
                assert_eq!(b.made_by, None, "{name}: rope keeps its tables only");
            }
        }
        let layer = |k: &[Vec<SavedBuffer>; 2]| total(&k[1]) - total(&k[0]);
        let mut freed = scores + per_token(NH * D + NKV * D) + per_token(H);
        if name == "lora" {
            freed += per_token(NKV * D) + per_token(NH * D) + per_token(H);
        }
        assert!(
            layer(&before) >= layer(&after) + freed,
            "{name}: {} B per layer before, {} B after, {freed} B expected freed",
            layer(&before),
            layer(&after)
        );
    }
}

fn total(bufs: &[SavedBuffer]) -> usize {
    bufs.iter().map(|b| b.bytes).sum()
}

/// `(kept_by, made_by, shape, dtype, bytes)` of a saved buffer.
type Key = (&'static str, Option<&'static str>, String, DType, usize);

fn keys(bufs: &[SavedBuffer]) -> Vec<Key> {
    let mut k: Vec<Key> = bufs
        .iter()
        .map(|b| (b.kept_by, b.made_by, b.shape.to_string(), b.dtype, b.bytes))
        .collect();
    k.sort_by(|a, b| (a.0, a.1, &a.2, a.4).cmp(&(b.0, b.1, &b.2, b.4)));
    k
}

/// The saved activation buffers of a `layers`-layer model's training step, recorded as the tape
/// now does, or with every input kept (the tape before graph-only references).
fn audit(layers: usize, cfg: &AdapterConfig, imp: MoeImpl, keep_all: bool) -> Vec<Key> {
    let m = model(layers, cfg, imp, DType::F32, false);
    let loss = if keep_all {
        keeping_all_inputs(|| step_loss(&m))
    } else {
        step_loss(&m)
    };
    keys(&activations(&m, &loss))
}

fn bytes(keys: &[Key]) -> usize {
    keys.iter().map(|k| k.4).sum()
}

/// `a` without the buffers of `b` (same producer, shape, dtype and size; holders may differ).
fn minus(a: &[Key], b: &[Key]) -> Vec<Key> {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|k| {
            match rest
                .iter()
                .position(|r| (r.1, &r.2, r.3, r.4) == (k.1, &k.2, k.3, k.4))
            {
                Some(i) => {
                    rest.remove(i);
                    false
                }
                None => true,
            }
        })
        .cloned()
        .collect()
}

fn lines(keys: &[Key]) -> String {
    keys.iter()
        .map(|(kept, made, shape, dt, bytes)| {
            format!(
                "  {bytes:>8} B  {dt} {shape:<16} kept by {kept:<22} made by {}",
                made.unwrap_or("(leaf)")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints (with `--nocapture`) the saved activation bytes per layer with every input kept and
/// as the tape now records, and the buffers no longer kept, for each adapter set-up.
#[test]
fn report_saved_bytes_per_layer() {
    for (name, cfg, imp) in setups() {
        let before = [audit(1, &cfg, imp, true), audit(2, &cfg, imp, true)];
        let after = [audit(1, &cfg, imp, false), audit(2, &cfg, imp, false)];
        let layer = |k: &[Vec<Key>; 2]| bytes(&k[1]) - bytes(&k[0]);
        assert!(layer(&after) < layer(&before), "{name}");
        eprintln!(
            "{name}: per layer {} B before, {} B after; 2 layers {} B before, {} B after\n\
             no longer kept (2 layers):\n{}\nkept (2 layers):\n{}",
            layer(&before),
            layer(&after),
            bytes(&before[1]),
            bytes(&after[1]),
            lines(&minus(&before[1], &after[1])),
            lines(&after[1]),
        );
    }
}
