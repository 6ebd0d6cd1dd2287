//! Training with MixLoRA expert matrices stacked per layer and kind (views of one buffer, as fresh
//! and loaded adapters lay them out): AdamW updates them in place in that buffer, gradient
//! accumulation and clipping included, with the same parameters bit for bit as separate tensors;
//! and a run saved (adapter + optimizer state) and resumed continues identically, still stacked.

use std::path::PathBuf;

use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::{adapters, AdapterConfig, Llama, LlamaConfig, MoeImpl};
use trainer::optim::{clip_grad_norm, AdamW, AdamWConfig};

const E: usize = 4;
const V: usize = 11;

fn config() -> LlamaConfig {
    testutil::tiny_llama_config()
}

fn ids(v: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape.to_vec(), Device::Cpu).unwrap()
}

/// A random bf16 model with fresh MixLoRA adapters (stacked experts), `B` random too.
fn model(imp: MoeImpl) -> Llama {
    let mut m = Llama::random(config(), 7, DType::BF16, Device::Cpu).unwrap();
    let cfg = AdapterConfig {
        num_experts: E,
        r: 4,
        lora_alpha: 8.0,
        ..AdapterConfig::mixlora_default()
    };
    m.add_adapters(&cfg, 11).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let v = Tensor::randn(
                t.shape().clone(),
                0.0,
                0.2,
                50 + k as u64,
                t.dtype(),
                t.device(),
            )
            .unwrap();
            m.assign_trainable_param(&name, &v).unwrap();
        }
    }
    m.set_moe_impl(imp);
    m
}

/// The experts' matrices of each (layer, module, A/B) kind.
fn expert_kinds(m: &Llama) -> Vec<Vec<Tensor>> {
    let params = m.trainable_params();
    let mut out = Vec::new();
    for l in 0..2 {
        for module in ["gate_proj", "up_proj", "down_proj"] {
            for ab in ["A", "B"] {
                out.push(
                    (0..E)
                        .map(|e| {
                            let n = format!(
                                "mixlora.layers.{l}.mlp.{module}.experts.{e}.lora_{ab}.weight"
                            );
                            params.iter().find(|(p, _)| *p == n).unwrap().1.clone()
                        })
                        .collect(),
                );
            }
        }
    }
    out
}

fn stacked(ts: &[Tensor]) -> bool {
    let refs: Vec<&Tensor> = ts.iter().collect();
    Tensor::stack_views(&refs)
        .unwrap()
        .is_some_and(|s| s.same_storage(&ts[0]))
}

/// One optimizer step of two accumulated micro-batches (dropout on), clipped.
fn train_step(m: &Llama, opt: &mut AdamW, step: u64) {
    let x = IGNORE_INDEX;
    let batches = [
        (
            [3, 7, 1, 9, 4, 2, 8, 5, 0, 0],
            [7, 1, 9, 4, 10, 8, 5, x, x, x],
        ),
        (
            [6, 2, 2, 5, 1, 9, 3, 3, 7, 0],
            [2, 2, 5, 1, x, 3, 3, 7, 1, x],
        ),
    ];
    opt.zero_grad();
    for (i, (tokens, targets)) in batches.iter().enumerate() {
        let mask: Vec<u32> = tokens.iter().map(|&t| (t != 0) as u32).collect();
        let out = m
            .forward_train(
                &ids(tokens, &[2, 5]),
                Some(&ids(&mask, &[2, 5])),
                Some(10 * step + i as u64),
            )
            .unwrap();
        let ce = out
            .logits
            .reshape([10, V])
            .unwrap()
            .cross_entropy(&ids(targets, &[10]), IGNORE_INDEX)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        ce.add(&out.aux_loss.unwrap().to_dtype(DType::F32).unwrap())
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap()
            .backward()
            .unwrap();
    }
    let (_, scale) = clip_grad_norm(opt.params(), 1.0).unwrap();
    opt.step(5e-2, scale).unwrap();
}

fn values(m: &Llama) -> Vec<(String, Vec<f64>)> {
    m.trainable_params()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec_f64().unwrap()))
        .collect()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mixlora-trainer-stacks-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn adamw_updates_stacked_experts_in_place_like_separate_ones() {
    for imp in [
        MoeImpl::Naive,
        MoeImpl::Grouped,
        MoeImpl::Fused(Default::default()),
    ] {
        let views = model(imp);
        let mut separate = model(imp);
        for (name, t) in separate.trainable_params() {
            separate
                .set_trainable_param(&name, t.to_var().unwrap())
                .unwrap();
        }
        let kinds = expert_kinds(&views);
        assert!(kinds.iter().all(|ts| stacked(ts)));
        assert!(expert_kinds(&separate).iter().all(|ts| !stacked(ts)));
        let start = values(&views);
        let cfg = AdamWConfig::default();
        let mut opt_v = AdamW::new(views.trainable_params(), cfg).unwrap();
        let mut opt_s = AdamW::new(separate.trainable_params(), cfg).unwrap();
        for step in 1..=3 {
            train_step(&views, &mut opt_v, step);
            train_step(&separate, &mut opt_s, step);
            assert_eq!(values(&views), values(&separate), "{imp:?}, step {step}");
        }
        // Updated in place: the same variables, still views of their buffers, and moved.
        let now = expert_kinds(&views);
        for (a, b) in kinds.iter().zip(&now) {
            assert!(stacked(b), "{imp:?}");
            assert!(a.iter().zip(b).all(|(x, y)| x.id() == y.id()), "{imp:?}");
        }
        assert_ne!(values(&views), start, "{imp:?}");
    }
}

/// Saving the adapter and the optimizer state, then loading both into a fresh model (as a resumed
/// run does): the loaded experts are stacked, and the next steps equal the uninterrupted run's.
#[test]
fn resumed_training_keeps_the_experts_stacked_and_identical() {
    let m = model(MoeImpl::Fused(Default::default()));
    let mut opt = AdamW::new(m.trainable_params(), AdamWConfig::default()).unwrap();
    train_step(&m, &mut opt, 1);
    let dir = tmp_dir("resume");
    adapters::save(&dir.join("adapter"), &m).unwrap();
    opt.save(&dir.join("optimizer.safetensors")).unwrap();

    let mut r = Llama::random(config(), 7, DType::BF16, Device::Cpu).unwrap();
    adapters::load(&dir.join("adapter"), &mut r).unwrap();
    r.set_moe_impl(MoeImpl::Fused(Default::default()));
    assert!(expert_kinds(&r).iter().all(|ts| stacked(ts)));
    let mut opt_r = AdamW::new(r.trainable_params(), AdamWConfig::default()).unwrap();
    opt_r.load(&dir.join("optimizer.safetensors")).unwrap();
    assert_eq!(values(&r), values(&m));
    for step in 2..=3 {
        train_step(&m, &mut opt, step);
        train_step(&r, &mut opt_r, step);
        assert_eq!(values(&r), values(&m), "step {step}");
    }
    assert!(expert_kinds(&r).iter().all(|ts| stacked(ts)));
    let _ = std::fs::remove_dir_all(&dir);
}
