//! MixLoRA expert matrices laid out per layer and kind (`A` or `B` of gate, up, down) as the
//! slices of one `[E, ..]` buffer: fresh adapters and loaded ones are laid out so (the MoE paths
//! then stack them as views, `Tensor::stack_views`), file names stay MoE-PEFT's, in-place
//! assignment keeps the layout and replacement falls back to copies; and a training step gives
//! bit-identical losses and gradients whether the experts are stacked or separate tensors, with
//! every MoE implementation.

use std::path::PathBuf;

use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::adapters;
use model::{AdapterConfig, Llama, MoeImpl};
use safetensors::SafeTensors;
use testutil::{ids, tiny_llama_config};

const E: usize = 4;
const V: usize = 11;

fn mixlora() -> AdapterConfig {
    AdapterConfig {
        num_experts: E,
        r: 4,
        lora_alpha: 8.0,
        ..AdapterConfig::mixlora_default()
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-stacks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The file name of expert `e`'s matrix `ab` on `module` of `layer`.
fn expert_name(layer: usize, module: &str, e: usize, ab: &str) -> String {
    format!("mixlora.layers.{layer}.mlp.{module}.experts.{e}.lora_{ab}.weight")
}

/// Every (layer, module, A/B) kind with its experts' tensors, in expert order.
fn expert_kinds(m: &Llama) -> Vec<(String, Vec<Tensor>)> {
    let params = m.trainable_params();
    let get = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
            .1
            .clone()
    };
    let mut out = Vec::new();
    for l in 0..m.config.num_hidden_layers {
        for module in ["gate_proj", "up_proj", "down_proj"] {
            for ab in ["A", "B"] {
                let ts = (0..E)
                    .map(|e| get(&expert_name(l, module, e, ab)))
                    .collect();
                out.push((format!("layer {l} {module} lora_{ab}"), ts));
            }
        }
    }
    out
}

/// Whether the tensors stack as a view of their buffer (the zero-copy path).
fn stacked(ts: &[Tensor]) -> bool {
    let refs: Vec<&Tensor> = ts.iter().collect();
    Tensor::stack_views(&refs)
        .unwrap()
        .is_some_and(|s| s.same_storage(&ts[0]))
}

/// A random f32 or bf16 model with fresh MixLoRA adapters whose every matrix is then set to
/// random values in place (so that every gradient carries signal), computed with `imp`.
fn model(dtype: DType, imp: MoeImpl) -> Llama {
    let mut m = Llama::random(tiny_llama_config(), 7, dtype, Device::Cpu).unwrap();
    m.add_adapters(&mixlora(), 11).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        let v = Tensor::randn(
            t.shape().clone(),
            0.0,
            0.3,
            100 + k as u64,
            t.dtype(),
            t.device(),
        )
        .unwrap();
        m.assign_trainable_param(&name, &v).unwrap();
    }
    m.set_moe_impl(imp);
    m
}

fn values(m: &Llama) -> Vec<(String, Vec<f64>)> {
    m.trainable_params()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec_f64().unwrap()))
        .collect()
}

#[test]
fn fresh_and_loaded_experts_are_stacked() {
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    m.add_adapters(&mixlora(), 11).unwrap();
    let fresh = expert_kinds(&m);
    for (kind, ts) in &fresh {
        assert!(stacked(ts), "fresh adapters: {kind} is not stacked");
        assert!(ts.iter().all(Tensor::is_variable), "{kind}");
    }
    // In-place assignment keeps the layout and the variables (the handles taken before see the
    // new values).
    let model = model(DType::F32, MoeImpl::Fused(Default::default()));
    let before = expert_kinds(&model);
    let mut m = model;
    let name = expert_name(1, "up_proj", 2, "B");
    let v = Tensor::full([12, 4], 0.25, DType::F32, Device::Cpu).unwrap();
    m.assign_trainable_param(&name, &v).unwrap();
    let after = expert_kinds(&m);
    for ((kind, a), (_, b)) in before.iter().zip(&after) {
        assert!(stacked(b), "after assign: {kind} is not stacked");
        assert!(a.iter().zip(b).all(|(x, y)| x.id() == y.id()), "{kind}");
    }
    assert_eq!(before[9].1[2].to_vec_f64().unwrap(), vec![0.25; 48]);

    // Saved under MoE-PEFT's names, loaded back stacked, with the same values and outputs.
    let dir = tmp_dir("load");
    adapters::save(&dir, &m).unwrap();
    let bytes = std::fs::read(dir.join(adapters::WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut in_file: Vec<String> = st.names().into_iter().map(String::from).collect();
    let mut names: Vec<String> = m.trainable_params().into_iter().map(|(n, _)| n).collect();
    in_file.sort();
    names.sort();
    assert_eq!(in_file, names);
    assert!(names.contains(&expert_name(0, "down_proj", E - 1, "A")));
    let mut loaded = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    adapters::load(&dir, &mut loaded).unwrap();
    for (kind, ts) in expert_kinds(&loaded) {
        assert!(stacked(&ts), "loaded adapters: {kind} is not stacked");
    }
    assert_eq!(values(&loaded), values(&m));
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 6], &[2, 5]);
    loaded.set_moe_impl(MoeImpl::Fused(Default::default()));
    let logits = |m: &Llama| m.forward(&tokens, None).unwrap().to_vec_f64().unwrap();
    assert_eq!(logits(&loaded), logits(&m));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `set_trainable_param` makes the given tensor the parameter: its kind is then stacked with a
/// copy, and the others stay views. `assign_trainable_param` with another dtype replaces too.
#[test]
fn replacing_an_expert_matrix_falls_back_to_copies() {
    let mut m = model(DType::F32, MoeImpl::Fused(Default::default()));
    let name = expert_name(0, "gate_proj", 1, "A");
    let v = Tensor::randn([4, 8], 0.0, 0.3, 5, DType::F32, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    m.set_trainable_param(&name, v.clone()).unwrap();
    let kinds = expert_kinds(&m);
    assert!(!stacked(&kinds[0].1), "{}", kinds[0].0);
    assert!(kinds[1..].iter().all(|(_, ts)| stacked(ts)));
    assert_eq!(kinds[0].1[1].id(), v.id());
    // The forward pass still trains it (through `cat`).
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 6], &[2, 5]);
    m.forward(&tokens, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(v.grad().is_some());
    let name = expert_name(1, "down_proj", 3, "B");
    let f64_value = Tensor::zeros([8, 4], DType::F64, Device::Cpu).unwrap();
    m.assign_trainable_param(&name, &f64_value).unwrap();
    assert!(!stacked(&expert_kinds(&m)[11].1));
}

/// The loss of one training step (LM loss + aux loss, dropout on, a padded row).
fn step_loss(m: &Llama) -> Tensor {
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 0], &[2, 5]);
    let mask = ids(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[2, 5]);
    let x = IGNORE_INDEX;
    let targets = ids(&[7, 1, 9, 4, 10, 8, 5, x, x, x], &[10]);
    let out = m.forward_train(&tokens, Some(&mask), Some(3)).unwrap();
    let ce = out
        .logits
        .reshape([10, V])
        .unwrap()
        .cross_entropy(&targets, IGNORE_INDEX)
        .unwrap();
    ce.to_dtype(DType::F32)
        .unwrap()
        .add(&out.aux_loss.unwrap().to_dtype(DType::F32).unwrap())
        .unwrap()
}

/// `(loss bits, every gradient's bits by name)` of one step.
type Step = (u64, Vec<(String, Vec<u64>)>);

fn step(m: &Llama) -> Step {
    let loss = step_loss(m);
    loss.backward().unwrap();
    let bits = |t: &Tensor| -> Vec<u64> {
        t.to_vec_f64()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let grads = m
        .trainable_params()
        .into_iter()
        .map(|(n, p)| {
            let g = p.grad().map_or_else(Vec::new, |g| bits(&g));
            (n, g)
        })
        .collect();
    (loss.to_scalar().unwrap().to_bits(), grads)
}

/// Stacked experts (views of one buffer, stacked without a copy) and separate ones (the same
/// values in their own buffers, stacked with `cat`) give the same loss and gradients bit for bit,
/// with every MoE implementation, f32 and bf16 bases; with the grouped and fused paths the
/// experts' gradients of one kind are views of one gradient buffer.
#[test]
fn stacked_experts_train_like_separate_ones() {
    for dtype in [DType::F32, DType::BF16] {
        for imp in [
            MoeImpl::Naive,
            MoeImpl::Paper,
            MoeImpl::Grouped,
            MoeImpl::Fused(Default::default()),
        ] {
            let views = model(dtype, imp);
            let mut separate = model(dtype, imp);
            for (name, t) in separate.trainable_params() {
                separate
                    .set_trainable_param(&name, t.to_var().unwrap())
                    .unwrap();
            }
            assert!(expert_kinds(&views).iter().all(|(_, ts)| stacked(ts)));
            assert!(expert_kinds(&separate).iter().all(|(_, ts)| !stacked(ts)));
            assert_eq!(values(&views), values(&separate));
            let (a, b) = (step(&views), step(&separate));
            assert_eq!(a.0, b.0, "{dtype} {imp:?}: loss");
            for ((name, ga), (_, gb)) in a.1.iter().zip(&b.1) {
                assert_eq!(ga, gb, "{dtype} {imp:?}: gradient of {name}");
            }
            if matches!(imp, MoeImpl::Grouped | MoeImpl::Fused(_)) {
                for (kind, ts) in expert_kinds(&views) {
                    let g: Vec<Tensor> = ts.iter().map(|t| t.grad().unwrap()).collect();
                    assert!(
                        g.iter().all(|x| x.same_storage(&g[0])),
                        "{dtype} {imp:?}: {kind}: the experts' gradients were copied"
                    );
                }
            }
        }
    }
}
