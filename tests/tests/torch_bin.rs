//! Adapter files that MoE-PEFT and the `mixlora` package load, and theirs that we load:
//! `adapter_config.json` with the JSON number types they assert, their keys accepted or refused
//! by name, `adapter_model.bin` (torch.save's zip + pickle format) read and written, the
//! PyTorch-written fixture in `tests/fixtures/torch_bin/`, and the export round trip.

mod support;

use std::path::{Path, PathBuf};

use engine::{no_grad, DType, Device, Tensor};
use model::adapters::{self, ExportFormat, BIN_FILE, CONFIG_FILE, WEIGHTS_FILE};
use model::torch_bin::{self, TorchDType, TorchTensor};
use model::{AdapterConfig, Llama, RoutingStrategy};
use safetensors::tensor::SafeTensors;
use testutil::{ids, tiny_llama_config};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-torchbin-{}-{name}", std::process::id()));
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
fn model_with(cfg: &AdapterConfig) -> Llama {
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    m.add_adapters(cfg, 11).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let v = Tensor::randn(
                t.dims().to_vec(),
                0.0,
                0.2,
                900 + k as u64,
                DType::F32,
                Device::Cpu,
            )
            .unwrap();
            m.set_trainable_param(&name, v.to_var().unwrap()).unwrap();
        }
    }
    m
}

fn logits(m: &Llama) -> Vec<f64> {
    let x = ids(&[3, 7, 1, 9, 4, 2, 0, 0, 8, 5], &[2, 5]);
    no_grad(|| m.forward(&x, None))
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

fn json(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

/// The bits of every adapter tensor of `m`, by name.
fn param_bits(m: &Llama) -> Vec<(String, Vec<u32>)> {
    m.trainable_params()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.to_vec_f32()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn config_numbers_have_the_json_types_moe_peft_asserts() {
    let dir = tmp_dir("json-types").join("adapter");
    let cfg = AdapterConfig {
        lora_dropout: 0.0,
        router_init_range: 1.0,
        top_p: 1.0,
        ..small_mixlora()
    };
    adapters::save(&dir, &model_with(&cfg)).unwrap();
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let obj = json(&dir.join(CONFIG_FILE));
    // MoE-PEFT and the mixlora package: `isinstance(lora_alpha, int)`, `isinstance(r, int)`.
    assert!(
        obj["lora_alpha"].is_i64() && obj["lora_alpha"] == 8,
        "{text}"
    );
    assert!(obj["r"].is_u64(), "{text}");
    // ... and `isinstance(x, float)` for these, even when integral.
    for k in [
        "lora_dropout",
        "router_aux_loss_coef",
        "router_init_range",
        "top_p",
    ] {
        assert!(obj[k].is_f64(), "{k} must be a JSON float: {text}");
    }
    assert!(
        text.contains("\"lora_dropout\": 0.0") && text.contains("\"top_p\": 1.0"),
        "{text}"
    );
    // A non-integral alpha stays a float (ours reads it back; MoE-PEFT export refuses it).
    let odd = AdapterConfig {
        lora_alpha: 2.5,
        ..small_mixlora()
    };
    let v: serde_json::Value = serde_json::from_str(&odd.to_json_string()).unwrap();
    assert_eq!(v["lora_alpha"].as_f64(), Some(2.5));
    assert_eq!(
        AdapterConfig::from_json_str("x", &odd.to_json_string()).unwrap(),
        odd
    );
    // Reading stays tolerant: alpha as int or float.
    for alpha in ["16", "16.0"] {
        let c = AdapterConfig::from_json_str(
            "a.json",
            &format!(r#"{{"peft_type": "LORA", "r": 8, "lora_alpha": {alpha}, "target_modules": ["q_proj"]}}"#),
        )
        .unwrap();
        assert_eq!(c.lora_alpha, 16.0);
    }
}

#[test]
fn base_model_name_is_a_hub_name_and_the_path_is_kept_apart() {
    let dir = tmp_dir("base-name");
    // A GGUF whose metadata names its organization (as SmolLM2's does): `org/stem`.
    let with_org = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    support::write(
        &with_org,
        &support::tiny_llama()
            .str("general.organization", "HuggingFaceTB")
            .build(),
    );
    assert_eq!(
        adapters::base_model_name(&with_org),
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    // A GGUF naming its Hugging Face repository wins over the file name.
    let with_repo = dir.join("x-f16.gguf");
    support::write(
        &with_repo,
        &support::tiny_llama()
            .str(
                "general.source.repo_url",
                "https://huggingface.co/Org/Real-Model",
            )
            .build(),
    );
    assert_eq!(adapters::base_model_name(&with_repo), "Org/Real-Model");
    // No metadata to go by: the file's stem without the quantisation.
    let bare = dir.join("Llama-3.2-1B-Instruct-Q4_K_M.gguf");
    support::write(&bare, &support::tiny_llama().build());
    assert_eq!(adapters::base_model_name(&bare), "Llama-3.2-1B-Instruct");
    // A folder stays a folder (from_pretrained reads it).
    assert_eq!(adapters::base_model_name(&dir), dir.display().to_string());
}

fn config_error(text: &str) -> String {
    let e = AdapterConfig::from_json_str("dir/adapter_config.json", text)
        .expect_err("must be refused")
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

/// MoE-PEFT's config of a small MixLoRA adapter with `extra` keys spliced in.
fn moe_peft_config(extra: &str) -> String {
    format!(
        r#"{{"bias": "none", "peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "mixlora", "num_experts": 4, "act_fn": "silu", "top_k": 2,
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "task_type": "CAUSAL_LM"{extra}}}"#
    )
}

#[test]
fn moe_peft_keys_are_read_or_refused_by_name() {
    // MoE-PEFT's own file, with PEFT's harmless keys.
    let c = AdapterConfig::from_json_str(
        "a.json",
        &moe_peft_config(
            r#", "inference_mode": true, "lora_init": "original", "modules_to_save": null,
            "revision": null, "layers_to_transform": null, "fan_in_fan_out": false, "use_dora": false,
            "jitter_noise": 0.0, "router_loss": true, "expert_lora": {"r": 4, "lora_alpha": 8.0, "bias": "none"}"#,
        ),
    )
    .unwrap();
    assert_eq!((c.r, c.lora_alpha, c.num_experts, c.top_k), (4, 8.0, 4, 2));
    assert_eq!(c.router_aux_loss_coef, 0.001);
    // router_loss false: MoE-PEFT adds no aux loss, which a zero coefficient reproduces.
    let c = AdapterConfig::from_json_str("a.json", &moe_peft_config(r#", "router_loss": false"#))
        .unwrap();
    assert_eq!(c.router_aux_loss_coef, 0.0);
    // MoE-PEFT's target_modules as an object.
    let c = AdapterConfig::from_json_str(
        "a.json",
        &moe_peft_config("").replace(
            r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]"#,
            r#"{"q_proj": true, "k_proj": false, "up_proj": true}"#,
        ),
    )
    .unwrap();
    assert_eq!(c.target_modules, ["q_proj", "up_proj"]);
    // A dynamic (top-p) file as MoE-PEFT exports it.
    let dynamic = moe_peft_config(r#", "top_p": 0.75, "temperature": 0.0"#)
        .replace(r#""mixlora","#, r#""mixlora-dynamic","#);
    let c = AdapterConfig::from_json_str("a.json", &dynamic).unwrap();
    assert_eq!((c.routing_strategy, c.top_p), (RoutingStrategy::TopP, 0.75));

    let switch = moe_peft_config(r#", "expert_capacity": 32, "sparse_step": null"#)
        .replace(r#""mixlora","#, r#""mixlora-switch","#);
    let e = config_error(&switch);
    assert!(
        e.starts_with("dir/adapter_config.json: key routing_strategy: \"mixlora-switch\": Switch Transformers routing is not implemented"),
        "{e}"
    );
    for (extra, key, why) in [
        (
            r#", "expert_lora": {"r": 8}"#,
            "expert_lora.r",
            "differs from the top-level r 4",
        ),
        (
            r#", "expert_lora": {"lora_alpha": 16}"#,
            "expert_lora.lora_alpha",
            "per-expert LoRA settings are not implemented",
        ),
        (
            r#", "expert_lora": {"use_dora": true}"#,
            "expert_lora.use_dora",
            "differs",
        ),
        (
            r#", "temperature": 0.5"#,
            "temperature",
            "router temperature is not implemented",
        ),
        (
            r#", "jitter_noise": 0.01"#,
            "jitter_noise",
            "jitter noise is not implemented",
        ),
        (r#", "use_dora": true"#, "use_dora", "only false"),
        (
            r#", "fan_in_fan_out": true"#,
            "fan_in_fan_out",
            "only false",
        ),
        (r#", "bias": "all""#, "bias", "only \"none\""),
        (
            r#", "router_z_loss_coef": 0.001"#,
            "router_z_loss_coef",
            "Switch Transformers",
        ),
        (
            r#", "expert_capacity": 32"#,
            "expert_capacity",
            "Switch Transformers",
        ),
        (
            r#", "ffn_dropout": 0.1"#,
            "ffn_dropout",
            "Switch Transformers",
        ),
        (
            r#", "modules_to_save": ["lm_head"]"#,
            "modules_to_save",
            "only null or empty",
        ),
        (
            r#", "layers_to_transform": [0, 1]"#,
            "layers_to_transform",
            "only null or empty",
        ),
        (
            r#", "rank_pattern": {"q_proj": 8}"#,
            "rank_pattern",
            "only null or empty",
        ),
        (r#", "lora_scale": 3"#, "lora_scale", "unknown key"),
    ] {
        // A later "bias" wins in serde_json's map, as in Python's json.
        let e = config_error(&moe_peft_config(extra));
        assert!(
            e.starts_with(&format!("dir/adapter_config.json: key {key}: ")) && e.contains(why),
            "{extra}: {e}"
        );
    }
}

fn folder_tensors(dir: &Path) -> Vec<TorchTensor> {
    let mut out = if dir.join(WEIGHTS_FILE).exists() {
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| TorchTensor {
                name,
                dtype: match v.dtype() {
                    safetensors::Dtype::F32 => TorchDType::F32,
                    safetensors::Dtype::F16 => TorchDType::F16,
                    safetensors::Dtype::BF16 => TorchDType::BF16,
                    other => panic!("{other:?}"),
                },
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
            .collect()
    } else {
        torch_bin::read(&dir.join(BIN_FILE)).unwrap()
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[test]
fn export_to_moe_peft_and_back_is_bit_exact() {
    let root = tmp_dir("export");
    for cfg in [
        small_mixlora(),
        AdapterConfig {
            routing_strategy: RoutingStrategy::TopP,
            target_modules: vec!["v_proj".into(), "up_proj".into(), "down_proj".into()],
            ..small_mixlora()
        },
        AdapterConfig::lora_default(),
    ] {
        let m = model_with(&cfg);
        let ours = root.join("ours");
        adapters::save(&ours, &m).unwrap();
        let bin_dir = root.join("moe-peft");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::write(bin_dir.join(WEIGHTS_FILE), b"stale").unwrap();
        adapters::export(&ours, &bin_dir, ExportFormat::MoePeft, None).unwrap();
        assert!(bin_dir.join(BIN_FILE).exists());
        assert!(
            !bin_dir.join(WEIGHTS_FILE).exists(),
            "a stale safetensors file would shadow the .bin"
        );
        let obj = json(&bin_dir.join(CONFIG_FILE));
        assert_eq!(obj["bias"], "none");
        assert!(obj["lora_alpha"].is_i64());

        // `--adapter` takes the MoE-PEFT folder: identical tensors, bit for bit, and logits.
        let mut fresh = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
        adapters::load(&bin_dir, &mut fresh).unwrap();
        assert_eq!(fresh.adapter_config(), Some(&cfg));
        assert_eq!(param_bits(&fresh), param_bits(&m));
        assert_eq!(logits(&fresh), logits(&m));

        // And back to safetensors: the same bytes as our own file's tensors.
        let back = root.join("back");
        adapters::export(&bin_dir, &back, ExportFormat::Safetensors, Some("x/y")).unwrap();
        assert_eq!(folder_tensors(&back), folder_tensors(&ours));
        assert_eq!(
            AdapterConfig::from_json_file(&back.join(CONFIG_FILE))
                .unwrap()
                .base_model_name_or_path,
            "x/y"
        );
    }
    // MoE-PEFT asserts an integer alpha: a fractional one cannot be exported.
    let odd = root.join("odd");
    adapters::save(
        &odd,
        &model_with(&AdapterConfig {
            lora_alpha: 2.5,
            ..small_mixlora()
        }),
    )
    .unwrap();
    let e = adapters::export(&odd, &root.join("odd-out"), ExportFormat::MoePeft, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key lora_alpha: 2.5: MoE-PEFT requires a positive integer alpha"),
        "{e}"
    );
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch_bin")
}

/// The PyTorch-written fixture (tests/fixtures/torch_bin/make_fixture.py) must be present: a
/// missing file fails the test.
#[test]
fn torch_written_fixture_matches_its_safetensors() {
    let dir = fixture_dir();
    for f in [BIN_FILE, WEIGHTS_FILE, CONFIG_FILE] {
        assert!(
            dir.join(f).exists(),
            "{}: missing; run make_fixture.py there",
            dir.join(f).display()
        );
    }
    let from_bin = folder_tensors_bin(&dir);
    let mut from_st = folder_tensors(&dir); // the safetensors file, when both exist
    from_st.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(from_bin.len(), 34);
    assert_eq!(from_bin, from_st);
    for dtype in [TorchDType::F32, TorchDType::F16, TorchDType::BF16] {
        assert!(
            from_bin.iter().any(|t| t.dtype == dtype),
            "{dtype:?} missing from the fixture"
        );
    }
    // The values are k/64 (make_fixture.py): check one by hand.
    let gate = from_bin
        .iter()
        .find(|t| t.name == "mixlora.layers.0.mlp.moe_gate.weight")
        .unwrap();
    let v: Vec<f32> = gate
        .data
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let seed = 5; // the fifth tensor of the file
    let want: Vec<f32> = (0..16)
        .map(|i| ((((seed * 7919 + i * 37) % 101) - 50) as f32) / 64.0)
        .collect();
    assert_eq!(v, want);

    // Loading the .bin folder and the safetensors folder gives the same adapters.
    let only_bin = tmp_dir("fixture-bin");
    let only_st = tmp_dir("fixture-st");
    for (to, weights) in [(&only_bin, BIN_FILE), (&only_st, WEIGHTS_FILE)] {
        std::fs::copy(dir.join(CONFIG_FILE), to.join(CONFIG_FILE)).unwrap();
        std::fs::copy(dir.join(weights), to.join(weights)).unwrap();
    }
    let load = |d: &Path| {
        let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
        adapters::load(d, &mut m).unwrap();
        m
    };
    let (a, b) = (load(&only_bin), load(&only_st));
    assert_eq!(param_bits(&a), param_bits(&b));
    assert_eq!(logits(&a), logits(&b));
}

fn folder_tensors_bin(dir: &Path) -> Vec<TorchTensor> {
    let mut t = torch_bin::read(&dir.join(BIN_FILE)).unwrap();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

/// A torch.save archive holding `pickle` as its data.pkl.
fn archive_with_pickle(pickle: &[u8]) -> Vec<u8> {
    torch_bin::zip::write_stored(&[
        ("archive/data.pkl".into(), pickle.to_vec()),
        ("archive/version".into(), b"3\n".to_vec()),
    ])
    .unwrap()
}

#[test]
fn a_pickle_naming_an_unknown_global_is_refused() {
    // {'x': os.system('echo hi')}
    let mut p = b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01cos\nsystem\nq\x02X\x07\x00\x00\x00echo hiq\x03\x85q\x04R".to_vec();
    p.extend(b"q\x05s.");
    let e = torch_bin::read_bytes("evil.bin", &archive_with_pickle(&p))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("evil.bin: archive/data.pkl: "), "{e}");
    assert!(e.contains("refusing the pickle global os.system"), "{e}");
    // In an adapter folder: the load names the file.
    let dir = tmp_dir("evil");
    std::fs::write(dir.join(CONFIG_FILE), small_mixlora().to_json_string()).unwrap();
    std::fs::write(dir.join(BIN_FILE), archive_with_pickle(&p)).unwrap();
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    let e = adapters::load(&dir, &mut m).unwrap_err().to_string();
    assert!(
        e.starts_with(&dir.join(BIN_FILE).display().to_string()) && e.contains("os.system"),
        "{e}"
    );
    // Not a dict of tensors.
    let e = torch_bin::read_bytes("list.bin", &archive_with_pickle(b"\x80\x02]q\x00."))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "list.bin: the pickled object is a list, not a dict of tensors"
    );
}

#[test]
fn malformed_bin_files_are_one_line_errors_naming_the_file() {
    let root = tmp_dir("malformed");
    let src = root.join("src");
    adapters::save(&src, &model_with(&small_mixlora())).unwrap();
    let good = root.join("good");
    adapters::export(&src, &good, ExportFormat::MoePeft, None).unwrap();
    let bytes = std::fs::read(good.join(BIN_FILE)).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            bytes[..bytes.len() / 2].to_vec(),
            "not a zip archive",
        ),
        ("garbage", b"\x80\x02}q\x00.".to_vec(), "not a zip archive"),
        (
            "no-pickle",
            torch_bin::zip::write_stored(&[("a/version".into(), b"3".to_vec())]).unwrap(),
            "no {archive}/data.pkl",
        ),
        (
            "cut-pickle",
            archive_with_pickle(b"\x80\x02}q\x00(X\x05\x00\x00"),
            "pickle truncated",
        ),
    ];
    for (name, content, want) in cases {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(good.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
        std::fs::write(dir.join(BIN_FILE), content).unwrap();
        let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
        let e = adapters::load(&dir, &mut m).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(&format!("{}: ", dir.join(BIN_FILE).display())) && e.contains(want),
            "{name}: {e}"
        );
        assert!(m.adapters().is_none());
    }

    // A tensor MoE-PEFT may store that we have no place for: named.
    let mut tensors = torch_bin::read(&good.join(BIN_FILE)).unwrap();
    tensors.push(TorchTensor {
        name: "score.weight".into(),
        dtype: TorchDType::F32,
        shape: vec![2, 8],
        data: vec![0; 64],
    });
    let dir = root.join("head");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(good.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
    let file = dir.join(BIN_FILE).display().to_string();
    std::fs::write(
        dir.join(BIN_FILE),
        torch_bin::to_bytes(&file, "adapter_model", &tensors).unwrap(),
    )
    .unwrap();
    let mut m = Llama::random(tiny_llama_config(), 7, DType::F32, Device::Cpu).unwrap();
    let e = adapters::load(&dir, &mut m).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{file}: tensor score.weight: unexpected tensor")),
        "{e}"
    );
    let e = adapters::export(
        &dir,
        &root.join("head-out"),
        ExportFormat::Safetensors,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&format!("{file}: tensor score.weight: unexpected tensor")),
        "{e}"
    );
}
