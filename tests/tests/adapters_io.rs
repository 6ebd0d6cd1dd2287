//! Adapter files and the adapters' effect on the model: adapter_config.json keys, save → load
//! round trips (identical outputs), one-line load errors (shapes, missing and unexpected tensors,
//! another base model, corrupt JSON), atomic replacement, fresh adapters leaving the logits
//! unchanged, and the KV-cache path using adapters.

use std::path::{Path, PathBuf};

use engine::{no_grad, DType, Device, Tensor};
use model::adapters::{self, CONFIG_FILE, WEIGHTS_FILE};
use model::llama::positions_from_mask;
use model::{AdapterConfig, KvCache, Llama, LlamaConfig, PeftType, RoutingStrategy};
use safetensors::tensor::{SafeTensors, TensorView};
use testutil::{ids, rel_err, tiny_llama_config};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-adapters-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small_mixlora() -> AdapterConfig {
    AdapterConfig {
        num_experts: 4,
        r: 4,
        lora_alpha: 8.0,
        ..AdapterConfig::mixlora_default()
    }
}

/// A random f32 model with adapters whose B matrices are random too (so they change outputs).
fn model_with(cfg: &AdapterConfig, base: LlamaConfig) -> Llama {
    let mut m = Llama::random(base, 7, DType::F32, Device::Cpu).unwrap();
    m.add_adapters(cfg, 11).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let v = Tensor::randn(
                t.dims().to_vec(),
                0.0,
                0.2,
                500 + k as u64,
                DType::F32,
                Device::Cpu,
            )
            .unwrap();
            m.set_trainable_param(&name, v.to_var().unwrap()).unwrap();
        }
    }
    m
}

fn batch() -> (Tensor, Tensor) {
    (
        ids(&[3, 7, 1, 9, 4, 2, 0, 0, 8, 5], &[2, 5]),
        ids(&[1, 1, 1, 1, 1, 0, 0, 1, 1, 1], &[2, 5]),
    )
}

fn logits(m: &Llama) -> Vec<f64> {
    let (x, mask) = batch();
    no_grad(|| m.forward(&x, Some(&mask)))
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

#[test]
fn config_json_has_the_documented_keys() {
    let keys = |c: &AdapterConfig| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&c.to_json_string()).unwrap();
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let mix = AdapterConfig::mixlora_default();
    let mut want = vec![
        "act_fn",
        "base_model_name_or_path",
        "lora_alpha",
        "lora_dropout",
        "num_experts",
        "peft_type",
        "r",
        "router_aux_loss_coef",
        "router_init_range",
        "routing_strategy",
        "target_modules",
        "task_type",
        "top_k",
        "top_p",
        "use_rslora",
    ];
    want.sort();
    assert_eq!(keys(&mix), want);
    let text = mix.to_json_string();
    assert!(
        text.contains("\"peft_type\": \"MIXLORA\"")
            && text.contains("\"routing_strategy\": \"mixlora\""),
        "{text}"
    );
    assert_eq!(
        (
            mix.num_experts,
            mix.top_k,
            mix.r,
            mix.lora_alpha,
            mix.lora_dropout
        ),
        (8, 2, 16, 32.0, 0.05)
    );
    assert_eq!(mix.router_aux_loss_coef, 0.001);
    assert_eq!(mix.target_modules.len(), 7);
    let lora = AdapterConfig::lora_default();
    assert_eq!(lora.peft_type, PeftType::Lora);
    assert!(!keys(&lora).contains(&"num_experts".to_string()));
    for c in [
        mix.clone(),
        lora,
        AdapterConfig {
            routing_strategy: RoutingStrategy::TopP,
            use_rslora: true,
            ..mix
        },
    ] {
        assert_eq!(
            AdapterConfig::from_json_str("x", &c.to_json_string()).unwrap(),
            c
        );
    }
    // A PEFT LoRA file: integer alpha, extra keys.
    let peft = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "fan_in_fan_out": false}"#;
    let c = AdapterConfig::from_json_str("adapter_config.json", peft).unwrap();
    assert_eq!((c.r, c.lora_alpha, c.scale()), (8, 16.0, 2.0));
    let rs = AdapterConfig {
        use_rslora: true,
        ..c
    };
    assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    let e = AdapterConfig::from_json_str(
        "a.json",
        r#"{"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "target_modules": ["x_proj"]}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("a.json: key target_modules: unknown module `x_proj`"),
        "{e}"
    );
}

#[test]
fn trainable_param_names_follow_the_files() {
    let m = model_with(&small_mixlora(), tiny_llama_config());
    let names: Vec<String> = m.trainable_params().into_iter().map(|(n, _)| n).collect();
    // Per layer: 4 attention LoRAs (8 tensors), the router, 4 experts × 3 LoRAs (24 tensors).
    assert_eq!(names.len(), 2 * (8 + 1 + 24));
    for n in [
        "mixlora.layers.0.self_attn.q_proj.lora_A.weight",
        "mixlora.layers.1.self_attn.o_proj.lora_B.weight",
        "mixlora.layers.1.mlp.moe_gate.weight",
        "mixlora.layers.0.mlp.down_proj.experts.3.lora_A.weight",
        "mixlora.layers.1.mlp.up_proj.experts.0.lora_B.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let shapes: Vec<(String, Vec<usize>)> = m
        .trainable_params()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    let shape = |n: &str| shapes.iter().find(|(x, _)| x == n).unwrap().1.clone();
    assert_eq!(shape("mixlora.layers.0.mlp.moe_gate.weight"), vec![4, 8]);
    assert_eq!(
        shape("mixlora.layers.0.self_attn.k_proj.lora_B.weight"),
        vec![4, 4]
    );
    assert_eq!(
        shape("mixlora.layers.0.mlp.down_proj.experts.1.lora_A.weight"),
        vec![4, 12]
    );
    let lora = model_with(&AdapterConfig::lora_default(), tiny_llama_config());
    let names: Vec<String> = lora
        .trainable_params()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 2 * 7 * 2);
    assert!(
        names.contains(&"base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight".to_string())
    );
    assert!(names
        .contains(&"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight".to_string()));
    assert!(lora
        .trainable_params()
        .iter()
        .all(|(_, t)| t.dtype() == DType::F32 && t.is_variable()));
}

#[test]
fn fresh_adapters_leave_the_logits_unchanged() {
    let base = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    let want = logits(&base);
    // Plain LoRA: B = 0 makes every delta exactly zero.
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    m.add_adapters(&AdapterConfig::lora_default(), 1).unwrap();
    assert_eq!(logits(&m), want);
    // MixLoRA top-k: the renormalised weights sum to one, so only rounding differs.
    m.add_adapters(&AdapterConfig::mixlora_default(), 1)
        .unwrap();
    let err = rel_err(&logits(&m), &want);
    assert!(err < 1e-6, "relative error {err:.2e}");
    let (x, mask) = batch();
    let out = m.forward_train(&x, Some(&mask), None).unwrap();
    assert!(rel_err(&out.logits.to_vec_f64().unwrap(), &want) < 1e-6);
    // A bf16 base keeps f32 adapters and the same logits up to bf16 rounding.
    let mut b16 = Llama::random(tiny_llama_config(), 7, DType::BF16, Device::Cpu).unwrap();
    let want16 = logits(&b16);
    b16.add_adapters(&AdapterConfig::lora_default(), 1).unwrap();
    assert!(b16
        .trainable_params()
        .iter()
        .all(|(_, t)| t.dtype() == DType::F32));
    assert_eq!(logits(&b16), want16);
}

#[test]
fn forward_train_reports_aux_and_expert_load() {
    let m = model_with(&small_mixlora(), tiny_llama_config());
    let (x, mask) = batch();
    let out = m.forward_train(&x, Some(&mask), Some(1)).unwrap();
    assert_eq!(out.logits.dims(), &[2, 5, 11]);
    let aux = out.aux_loss.unwrap();
    assert_eq!((aux.rank(), aux.dtype()), (0, DType::F32));
    // coef · E · Σ F P with Σ F = k = 2 and P ≈ 1/E at init: about coef · k.
    let a = aux.to_scalar().unwrap();
    assert!(a > 0.0 && a < 0.01, "aux {a}");
    assert_eq!(out.expert_load.len(), 2);
    for l in &out.expert_load {
        assert_eq!(
            (l.dims(), l.dtype(), l.tracks_grad()),
            (&[4][..], DType::F32, false)
        );
        assert!((l.to_vec_f64().unwrap().iter().sum::<f64>() - 1.0).abs() < 1e-6);
    }
    // Dropout: a seed changes the logits, the same seed gives the same ones, no seed none.
    let eval = |seed| {
        m.forward_train(&x, Some(&mask), seed)
            .unwrap()
            .logits
            .to_vec_f64()
            .unwrap()
    };
    assert_eq!(eval(Some(1)), eval(Some(1)));
    assert_ne!(eval(Some(1)), eval(Some(2)));
    assert_eq!(eval(None), logits(&m));
    // Plain LoRA has no aux loss.
    let l = model_with(&AdapterConfig::lora_default(), tiny_llama_config());
    let out = l.forward_train(&x, Some(&mask), None).unwrap();
    assert!(out.aux_loss.is_none() && out.expert_load.is_empty());
}

#[test]
fn kv_cache_decoding_uses_the_adapters() {
    let m = model_with(&small_mixlora(), tiny_llama_config());
    let seq = [3u32, 7, 1, 9, 4, 2];
    let full = no_grad(|| {
        m.forward(
            &Tensor::from_slice(&seq, [1, 6], Device::Cpu).unwrap(),
            None,
        )
    })
    .unwrap()
    .to_vec_f64()
    .unwrap();
    let mut cache = KvCache::new();
    let mut steps = Vec::new();
    for chunk in [&seq[..3], &seq[3..4], &seq[4..]] {
        let t = chunk.len();
        let x = Tensor::from_slice(chunk, [1, t], Device::Cpu).unwrap();
        let pos = positions_from_mask(1, t, None, cache.len(), Device::Cpu).unwrap();
        let h = no_grad(|| m.forward_hidden(&x, &pos, None, Some(&mut cache))).unwrap();
        steps.extend(m.logits(&h).unwrap().to_vec_f64().unwrap());
    }
    let err = rel_err(&steps, &full);
    assert!(err < 1e-5, "cached vs full: {err:.2e}");
    let base = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    let plain = no_grad(|| {
        base.forward(
            &Tensor::from_slice(&seq, [1, 6], Device::Cpu).unwrap(),
            None,
        )
    })
    .unwrap();
    assert!(
        rel_err(&plain.to_vec_f64().unwrap(), &full) > 1e-3,
        "the adapters must change the logits"
    );
}

#[test]
fn save_load_round_trip_gives_identical_outputs() {
    for cfg in [
        small_mixlora(),
        AdapterConfig {
            routing_strategy: RoutingStrategy::TopP,
            ..small_mixlora()
        },
        AdapterConfig {
            target_modules: vec!["q_proj".into(), "down_proj".into()],
            ..AdapterConfig::lora_default()
        },
    ] {
        let m = model_with(&cfg, tiny_llama_config());
        let dir = tmp_dir("roundtrip").join("adapter");
        adapters::save(&dir, &m).unwrap();
        let mut fresh = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
        adapters::load(&dir, &mut fresh).unwrap();
        assert_eq!(fresh.adapter_config(), Some(&cfg));
        assert_eq!(logits(&fresh), logits(&m));
        let (a, b) = (m.trainable_params(), fresh.trainable_params());
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(ta.to_vec_f64().unwrap(), tb.to_vec_f64().unwrap(), "{na}");
            assert!(tb.is_variable());
        }
        // The file holds f32 tensors under the documented names.
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), a.len());
        assert!(st
            .tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors::Dtype::F32));
    }
}

#[test]
fn save_replaces_atomically_and_keeps_other_files() {
    let root = tmp_dir("atomic");
    let dir = root.join("ckpt");
    let a = model_with(&small_mixlora(), tiny_llama_config());
    adapters::save(&dir, &a).unwrap();
    std::fs::write(dir.join("trainer_state.json"), "{}").unwrap();
    // A stale temporary folder from a killed save does not get in the way.
    std::fs::create_dir_all(root.join(".ckpt.tmp")).unwrap();
    std::fs::write(root.join(".ckpt.tmp").join(WEIGHTS_FILE), b"garbage").unwrap();
    let b = model_with(&AdapterConfig::lora_default(), tiny_llama_config());
    adapters::save(&dir, &b).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["ckpt"], "no temporary folder is left behind");
    assert_eq!(
        std::fs::read_to_string(dir.join("trainer_state.json")).unwrap(),
        "{}"
    );
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    adapters::load(&dir, &mut m).unwrap();
    assert_eq!(m.adapter_config().unwrap().peft_type, PeftType::Lora);
    assert_eq!(logits(&m), logits(&b));
    // Without adapters there is nothing to save.
    let bare = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    assert!(adapters::save(&root.join("none"), &bare).is_err());
}

/// Rewrites `dir`'s weights with `edit` applied to the (name, shape, f32 values) list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut list);
    let views: Vec<(String, TensorView)> = list
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// Loads `dir` into a fresh tiny model of shape `base` and returns the one-line error.
fn load_error(dir: &Path, base: LlamaConfig) -> String {
    let mut m = Llama::random(base, 7, DType::F32, Device::Cpu).unwrap();
    let e = adapters::load(dir, &mut m)
        .expect_err("load must fail")
        .to_string();
    println!("{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(m.adapters().is_none(), "a failed load attaches nothing");
    e
}

#[test]
fn load_errors_name_the_file_and_the_tensor() {
    let root = tmp_dir("errors");
    let fresh = |name: &str| {
        let dir = root.join(name);
        adapters::save(&dir, &model_with(&small_mixlora(), tiny_llama_config())).unwrap();
        dir
    };
    let weights = |dir: &Path| dir.join(WEIGHTS_FILE).display().to_string();

    // Missing tensor.
    let dir = fresh("missing");
    let gone = "mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight";
    rewrite(&dir, |l| l.retain(|(n, _, _)| n != gone));
    let e = load_error(&dir, tiny_llama_config());
    assert_eq!(e, format!("{}: tensor {gone}: not found", weights(&dir)));

    // Unexpected tensor.
    let dir = fresh("unexpected");
    let extra = "mixlora.layers.0.mlp.gate_proj.experts.9.lora_A.weight";
    rewrite(&dir, |l| {
        l.push((extra.into(), vec![4, 8], vec![0; 4 * 8 * 4]))
    });
    let e = load_error(&dir, tiny_llama_config());
    assert!(
        e.starts_with(&format!(
            "{}: tensor {extra}: unexpected tensor",
            weights(&dir)
        )),
        "{e}"
    );

    // Wrong shape against the config: r changed in adapter_config.json.
    let dir = fresh("rank");
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
    let e = load_error(&dir, tiny_llama_config());
    assert!(e.starts_with(&format!("{}: tensor mixlora.layers.0.self_attn.q_proj.lora_A.weight: expected shape [8, 8], found [4, 8]", weights(&dir))), "{e}");
    assert!(e.contains("r is 8 in adapter_config.json"), "{e}");

    // Wrong shape of one tensor.
    let dir = fresh("shape");
    let name = "mixlora.layers.1.mlp.moe_gate.weight";
    rewrite(&dir, |l| {
        l.iter_mut()
            .filter(|(n, _, _)| n == name)
            .for_each(|(_, s, _)| *s = vec![8, 4])
    });
    let e = load_error(&dir, tiny_llama_config());
    assert!(
        e.starts_with(&format!(
            "{}: tensor {name}: expected shape [4, 8], found [8, 4]",
            weights(&dir)
        )),
        "{e}"
    );

    // Another base model: other hidden size, other layer count.
    let dir = fresh("other-base");
    let wider = LlamaConfig {
        hidden_size: 16,
        num_attention_heads: 4,
        ..tiny_llama_config()
    };
    let e = load_error(&dir, wider);
    assert!(
        e.starts_with(&weights(&dir))
            && e.contains("an adapter for another base model? this one has hidden_size 16"),
        "{e}"
    );
    let deeper = LlamaConfig {
        num_hidden_layers: 3,
        ..tiny_llama_config()
    };
    let e = load_error(&dir, deeper);
    assert_eq!(
        e,
        format!("{}: the adapter has 2 layers but the base model has 3 (an adapter for another base model?)", weights(&dir))
    );

    // Corrupt JSON, missing files, a truncated weights file.
    let dir = fresh("json");
    std::fs::write(
        dir.join(CONFIG_FILE),
        "{\"peft_type\": \"MIXLORA\", \"r\": 4,\n oops",
    )
    .unwrap();
    let e = load_error(&dir, tiny_llama_config());
    assert!(
        e.starts_with(&format!(
            "{}: invalid adapter config:",
            dir.join(CONFIG_FILE).display()
        )),
        "{e}"
    );
    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    let e = load_error(&dir, tiny_llama_config());
    assert!(
        e.starts_with(&dir.join(CONFIG_FILE).display().to_string()),
        "{e}"
    );
    let dir = fresh("truncated");
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(&dir, tiny_llama_config());
    assert!(e.starts_with(&weights(&dir)), "{e}");
    let dir = fresh("bad-value");
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
        .unwrap()
        .replace(
            "\"routing_strategy\": \"mixlora\"",
            "\"routing_strategy\": \"mixlora-switch\"",
        );
    std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
    let e = load_error(&dir, tiny_llama_config());
    assert!(e.contains("mixlora-switch"), "{e}");
}

#[test]
fn malformed_token_batches_are_errors_not_panics() {
    let cfg = model::LlamaConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let m = model::Llama::random(cfg, 1, engine::DType::F32, engine::Device::Cpu).unwrap();
    let flat = engine::Tensor::from_vec(vec![1u32, 2, 3], [3], engine::Device::Cpu).unwrap();
    assert!(m
        .forward(&flat, None)
        .unwrap_err()
        .to_string()
        .contains("[batch, seq]"));
    let ids = engine::Tensor::from_vec(vec![1u32, 2, 3, 4], [2, 2], engine::Device::Cpu).unwrap();
    let bad_mask = engine::Tensor::from_vec(vec![1u32, 1], [1, 2], engine::Device::Cpu).unwrap();
    assert!(m.forward(&ids, Some(&bad_mask)).is_err());
    assert!(m.forward_train(&flat, None, None).is_err());
}
