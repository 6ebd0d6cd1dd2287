//! Loaders: GGUF (the real SmolLM2 file against the reference fixture, and small synthetic files),
//! safetensors folders (single file and shards; bf16, f16, f32), the tokenizer, and clear one-line
//! errors for bad input.

mod support;

use std::path::Path;

use engine::{DType, Device};
use half::{bf16, f16};
use model::gguf::{GgufFile, Header};
use model::{Error, LlamaConfig, Tokenizer, Weights};
use safetensors::tensor::{Dtype, TensorView};
use support::{smollm2_fixture, smollm2_gguf, tiny_llama, tmp_dir, write, GgufBuilder};

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Asserts `r` is an error whose one-line message mentions every piece of `want`.
fn assert_err<T>(r: model::Result<T>, want: &[&str]) -> Error {
    let e = match r {
        Ok(_) => panic!("expected an error mentioning {want:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    for w in want {
        assert!(msg.contains(w), "`{msg}` does not mention `{w}`");
    }
    e
}

// ----- the real SmolLM2 file -------------------------------------------------------------------

#[test]
fn smollm2_config_matches_fixture() {
    let (Some(path), Some(fx)) = (smollm2_gguf(), smollm2_fixture()) else {
        return;
    };
    let (cfg, w) = model::load(&path, DType::F32, Device::Cpu).expect("load");
    let c = &fx["config"];
    let u = |k: &str| c[k].as_u64().expect(k) as usize;
    assert_eq!(cfg.vocab_size, u("vocab_size"));
    assert_eq!(cfg.hidden_size, u("hidden_size"));
    assert_eq!(cfg.intermediate_size, u("intermediate_size"));
    assert_eq!(cfg.num_hidden_layers, u("num_hidden_layers"));
    assert_eq!(cfg.num_attention_heads, u("num_attention_heads"));
    assert_eq!(cfg.num_key_value_heads, u("num_key_value_heads"));
    assert_eq!(cfg.rms_norm_eps, c["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        cfg.tie_word_embeddings,
        c["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(cfg.bos_token_id, Some(u("bos_token_id") as u32));
    assert_eq!(cfg.eos_token_id(), Some(u("eos_token_id") as u32));
    assert_eq!(cfg.head_dim, 64);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert!(
        !w.contains("lm_head.weight"),
        "tied embeddings have no lm_head"
    );
}

/// The fixture's weight checks come from transformers, which dequantises GGUF with gguf-py in f32 and
/// un-permutes q/k: `first8` must match exactly, sums to f64 summation-order noise.
#[test]
fn smollm2_weights_match_fixture() {
    let (Some(path), Some(fx)) = (smollm2_gguf(), smollm2_fixture()) else {
        return;
    };
    let (cfg, w) = model::load(&path, DType::F32, Device::Cpu).expect("load");
    let checks = fx["weight_checks"].as_object().expect("weight_checks");
    assert!(!checks.is_empty());
    for (name, chk) in checks {
        let shape = cfg.weight_shape(name).expect("a LLaMA weight");
        let want_shape: Vec<usize> = chk["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{name}: config shape");
        let t = w.get(name, &shape).expect(name);
        assert_eq!(t.dims(), want_shape.as_slice(), "{name}");
        let v = t.to_vec_f64().unwrap();
        let first8: Vec<f64> = chk["first8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        // Compared as f32: the JSON holds f32 values printed by Python, read back by serde_json
        // to within an ulp of f64.
        let as_f32 = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        assert_eq!(as_f32(&v[..8]), as_f32(&first8), "{name}: first8");
        let sum: f64 = v.iter().sum();
        let abs_sum: f64 = v.iter().map(|x| x.abs()).sum();
        assert!(
            rel(sum, chk["sum"].as_f64().unwrap()) < 1e-9,
            "{name}: sum {sum}"
        );
        assert!(
            rel(abs_sum, chk["abs_sum"].as_f64().unwrap()) < 1e-9,
            "{name}: abs_sum {abs_sum}"
        );
    }
}

/// Every LLaMA weight of the real file loads with the shape the config implies, as bf16 too.
#[test]
fn smollm2_all_weights_load() {
    let Some(path) = smollm2_gguf() else {
        return;
    };
    let (cfg, w) = model::load(&path, DType::BF16, Device::Cpu).expect("load");
    let names = w.names();
    assert_eq!(names.len(), 2 + 9 * cfg.num_hidden_layers);
    for name in &names {
        let shape = cfg
            .weight_shape(name)
            .unwrap_or_else(|| panic!("unexpected {name}"));
        let t = w.get(name, &shape).expect(name);
        assert_eq!(t.dtype(), DType::BF16);
    }
}

#[test]
fn smollm2_tokenizer_matches_fixture() {
    let (Some(path), Some(fx)) = (smollm2_gguf(), smollm2_fixture()) else {
        return;
    };
    let tok = Tokenizer::from_gguf_file(&path).expect("tokenizer");
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));

    // The same tokenizer written as tokenizer.json and read back.
    let dir = tmp_dir("tokenizer-json");
    let json_path = dir.join("tokenizer.json");
    std::fs::write(&json_path, tok.to_json().unwrap()).unwrap();
    let tok2 = Tokenizer::from_file(&json_path, Some(1), Some(2)).expect("tokenizer.json");

    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        for t in [&tok, &tok2] {
            assert_eq!(t.encode(text, false).unwrap(), ids, "{text:?}");
            assert_eq!(t.decode(&ids, false).unwrap(), text);
            let mut with_bos = vec![1];
            with_bos.extend(&ids);
            assert_eq!(t.encode(text, true).unwrap(), with_bos);
        }
        let gen: Vec<u32> = case["greedy_16"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.decode(&gen, false).unwrap(),
            case["greedy_16_text"].as_str().unwrap()
        );
    }
    // Special tokens written in the text are single ids.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    let _ = std::fs::remove_dir_all(dir);
}

// ----- synthetic GGUF ------------------------------------------------------------------------

#[test]
fn tiny_gguf_loads_and_unpermutes() {
    let dir = tmp_dir("tiny-gguf");
    let path = dir.join("tiny.gguf");
    write(&path, &tiny_llama().build());
    let (cfg, w) = model::load(&path, DType::F32, Device::Cpu).expect("load");
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (8, 2, 1, 4)
    );
    assert_eq!((cfg.vocab_size, cfg.intermediate_size), (6, 12));
    assert!(cfg.tie_word_embeddings);
    // q: [8, 8], rows within each head of 4 were stored as (0, 2, 1, 3) of the HF order... inverted:
    // HF row h*4 + j*2 + i comes from GGUF row h*4 + 2i + j.
    let q = w
        .get("model.layers.0.self_attn.q_proj.weight", &[8, 8])
        .unwrap();
    let v = q.to_vec_f64().unwrap();
    let row_start = |r: usize| v[r * 8];
    let gguf_row = |r: usize| (r * 8) as f64 * 0.01;
    for (hf, gg) in [
        (0, 0),
        (1, 2),
        (2, 1),
        (3, 3),
        (4, 4),
        (5, 6),
        (6, 5),
        (7, 7),
    ] {
        assert!((row_start(hf) - gguf_row(gg)).abs() < 1e-6, "q row {hf}");
    }
    // v is not permuted.
    let vv = w
        .get("model.layers.0.self_attn.v_proj.weight", &[4, 8])
        .unwrap();
    assert!((vv.to_vec_f64().unwrap()[8] - 0.08).abs() < 1e-6);

    let tok = Tokenizer::load(&path, &cfg).unwrap();
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 5]);
    assert_eq!(tok.decode(&[3, 5], false).unwrap(), "ab ab");
    assert_eq!(tok.encode("<|endoftext|>ab", true).unwrap(), vec![0, 0, 3]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gguf_truncated_file() {
    let dir = tmp_dir("gguf-trunc");
    let bytes = tiny_llama().build();
    // Cut in the data section: the last tensor's range lies past the end.
    let path = dir.join("cut-data.gguf");
    write(&path, &bytes[..bytes.len() - 3]);
    assert_err(
        GgufFile::open(&path),
        &["cut-data.gguf", "output_norm.weight", "truncated"],
    );
    // Cut in the middle of the metadata.
    let path = dir.join("cut-header.gguf");
    write(&path, &bytes[..200]);
    assert_err(GgufFile::open(&path), &["cut-header.gguf", "truncated"]);
    let path = dir.join("empty.gguf");
    write(&path, &[]);
    assert_err(
        model::load(&path, DType::F32, Device::Cpu),
        &["empty.gguf", "empty"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gguf_wrong_magic_and_version() {
    let dir = tmp_dir("gguf-magic");
    let mut bytes = tiny_llama().build();
    bytes[..4].copy_from_slice(b"GGUX");
    let path = dir.join("magic.gguf");
    write(&path, &bytes);
    assert_err(
        model::load(&path, DType::F32, Device::Cpu),
        &["magic.gguf", "not a GGUF file"],
    );
    let mut bytes = tiny_llama().build();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_err(Header::parse("v1.gguf", &bytes), &["v1.gguf", "version 1"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gguf_absurd_sizes() {
    let good = tiny_llama().build();
    // tensor count at bytes 8..16, metadata count at 16..24
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_err(
        Header::parse("count.gguf", &b),
        &["count.gguf", "tensor count", "absurd"],
    );
    let mut b = good.clone();
    b[16..24].copy_from_slice(&1_000_000_000u64.to_le_bytes());
    assert_err(Header::parse("kv.gguf", &b), &["kv.gguf", "metadata count"]);
    // The first key's string length at 24..32.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_err(
        Header::parse("str.gguf", &b),
        &["str.gguf", "string length"],
    );
    // An array that claims 2^40 strings.
    let b = GgufBuilder::default()
        .kv_raw("tokenizer.ggml.tokens", 9, {
            let mut p = 8u32.to_le_bytes().to_vec();
            p.extend((1u64 << 40).to_le_bytes());
            p
        })
        .build();
    assert_err(
        Header::parse("arr.gguf", &b),
        &["arr.gguf", "tokenizer.ggml.tokens", "array length"],
    );
    // Dims whose product overflows, and too many dims.
    let b = GgufBuilder::default()
        .tensor("big.weight", &[u64::MAX, 4], 0, vec![0; 32])
        .build();
    assert_err(
        Header::parse("dims.gguf", &b),
        &["dims.gguf", "big.weight", "absurd dims"],
    );
    let b = GgufBuilder::default()
        .tensor("deep.weight", &[1, 1, 1, 1, 1], 0, vec![0; 4])
        .build();
    assert_err(
        Header::parse("ndims.gguf", &b),
        &["ndims.gguf", "deep.weight", "dims"],
    );
    // A huge but representable tensor whose data cannot be in the file.
    let b = GgufBuilder::default()
        .tensor("huge.weight", &[1 << 30, 1 << 20], 0, vec![0; 32])
        .build();
    assert_err(
        Header::parse("huge.gguf", &b),
        &["huge.gguf", "huge.weight", "past the end"],
    );
}

#[test]
fn gguf_unsupported_type_names_it() {
    let dir = tmp_dir("gguf-q5k");
    let path = dir.join("model.gguf");
    // Q5_K (id 13): blocks of 256 elements in 176 bytes.
    let b = tiny_llama()
        .tensor("blk.3.attn_q.weight", &[256, 1], 13, vec![0; 176])
        .tensor("blk.0.weird.weight", &[32], 77, vec![0; 32]);
    write(&path, &b.build());
    assert_err(
        GgufFile::open(&path),
        &[
            "model.gguf",
            "blk.0.weird.weight",
            "unknown GGUF type id 77",
        ],
    );
    let b = tiny_llama().tensor("blk.3.attn_q.weight", &[256, 1], 13, vec![0; 176]);
    write(&path, &b.build());
    let (_, w) = model::load(&path, DType::F32, Device::Cpu).unwrap();
    let e = assert_err(
        w.get_unchecked("model.layers.3.self_attn.q_proj.weight"),
        &[],
    );
    assert!(
        e.to_string()
            .ends_with("model.gguf: tensor blk.3.attn_q.weight: unsupported GGUF type Q5_K"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gguf_missing_tensor_and_shape_mismatch() {
    let dir = tmp_dir("gguf-shape");
    let path = dir.join("model.gguf");
    write(&path, &tiny_llama().build());
    let (cfg, w) = model::load(&path, DType::F32, Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    assert_err(w.get(name, &[12, 8]), &["model.gguf", name, "not found"]);
    // A config that disagrees with the file (hidden 16 instead of 8).
    let mut wrong = cfg.clone();
    wrong.hidden_size = 16;
    let name = "model.layers.0.mlp.up_proj.weight";
    let shape = wrong.weight_shape(name).unwrap();
    assert_err(
        w.get(name, &shape),
        &[
            "model.gguf",
            name,
            "expected shape [12, 16]",
            "found [12, 8]",
        ],
    );
    // Bad config metadata.
    let bad = tiny_llama().build();
    let h = Header::parse("cfg.gguf", &bad).unwrap();
    let mut md = h.clone();
    md.metadata.remove("llama.block_count");
    assert_err(
        LlamaConfig::from_gguf("cfg.gguf", &md),
        &["cfg.gguf", "llama.block_count", "missing"],
    );
    let dup = tiny_llama().u32("llama.block_count", 2).build();
    assert_err(
        Header::parse("dup.gguf", &dup),
        &["dup.gguf", "llama.block_count", "duplicate"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ----- safetensors folders ------------------------------------------------------------------

const CONFIG_JSON: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 6, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
  "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
  "bos_token_id": 0, "eos_token_id": [1, 2],
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
}"#;

/// Values `k * 0.25 - 1` (exact in bf16, f16 and f32) encoded as `dtype`.
fn encoded(n: usize, dtype: Dtype) -> (Vec<f64>, Vec<u8>) {
    let v: Vec<f64> = (0..n).map(|k| k as f64 * 0.25 - 1.0).collect();
    let bytes = match dtype {
        Dtype::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f64(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
            .collect(),
        _ => unreachable!(),
    };
    (v, bytes)
}

/// Writes `tensors` (name, shape, dtype) as one safetensors file; returns the values written.
fn write_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Dtype)],
) -> Vec<(String, Vec<f64>)> {
    type Encoded = (String, Vec<usize>, Dtype, Vec<f64>, Vec<u8>);
    let data: Vec<Encoded> = tensors
        .iter()
        .map(|(n, s, d)| {
            let (v, b) = encoded(s.iter().product(), *d);
            (n.to_string(), s.clone(), *d, v, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, d, _, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    data.into_iter().map(|(n, _, _, v, _)| (n, v)).collect()
}

fn tiny_hf_tensors() -> Vec<(&'static str, Vec<usize>, Dtype)> {
    vec![
        ("model.embed_tokens.weight", vec![6, 8], Dtype::BF16),
        ("lm_head.weight", vec![6, 8], Dtype::F32),
        ("model.norm.weight", vec![8], Dtype::F16),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![8, 8],
            Dtype::BF16,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            vec![4, 8],
            Dtype::F16,
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![8, 12],
            Dtype::F32,
        ),
    ]
}

fn check_folder(dir: &Path, written: &[(String, Vec<f64>)]) {
    for dtype in [DType::F32, DType::BF16] {
        let (cfg, w) = model::load(dir, dtype, Device::Cpu).expect("load folder");
        assert_eq!(cfg.rope_theta, 500_000.0);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        let Some(model::RopeScaling::Llama3(s)) = cfg.rope_scaling else {
            panic!("llama3 scaling expected, got {:?}", cfg.rope_scaling);
        };
        assert_eq!(s.original_max_position_embeddings, 128);
        for (name, want) in written {
            let t = w.get(name, &cfg.weight_shape(name).unwrap()).expect(name);
            assert_eq!(t.dtype(), dtype);
            assert_eq!(&t.to_vec_f64().unwrap(), want, "{name} as {dtype}");
        }
    }
}

#[test]
fn safetensors_single_file() {
    let dir = tmp_dir("st-single");
    write(&dir.join("config.json"), CONFIG_JSON.as_bytes());
    let written = write_safetensors(&dir.join("model.safetensors"), &tiny_hf_tensors());
    check_folder(&dir, &written);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn safetensors_two_shards_with_index() {
    let dir = tmp_dir("st-shards");
    write(&dir.join("config.json"), CONFIG_JSON.as_bytes());
    let all = tiny_hf_tensors();
    let (a, b) = all.split_at(3);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut written = write_safetensors(&dir.join(names[0]), a);
    written.extend(write_safetensors(&dir.join(names[1]), b));
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.to_string(), names[0].into()))
        .chain(b.iter().map(|t| (t.0.to_string(), names[1].into())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    check_folder(&dir, &written);

    // An index naming a tensor its shard does not hold.
    let mut map2 = map.clone();
    map2.insert("model.layers.0.mlp.up_proj.weight".into(), names[1].into());
    let index = serde_json::json!({"weight_map": map2});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    assert_err(
        model::load(&dir, DType::F32, Device::Cpu),
        &[names[1], "model.layers.0.mlp.up_proj.weight", "not found"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn safetensors_bad_input() {
    let dir = tmp_dir("st-bad");
    write(&dir.join("config.json"), CONFIG_JSON.as_bytes());
    let file = dir.join("model.safetensors");
    write_safetensors(&file, &tiny_hf_tensors());
    let good = std::fs::read(&file).unwrap();

    write(&file, &good[..good.len() - 5]);
    assert_err(
        model::load(&dir, DType::F32, Device::Cpu),
        &["model.safetensors", "invalid safetensors header"],
    );
    let mut b = good.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    write(&file, &b);
    assert_err(
        model::load(&dir, DType::F32, Device::Cpu),
        &["model.safetensors", "header"],
    );

    write(&file, &good);
    let (cfg, w) = model::load(&dir, DType::F32, Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_err(
        w.get(name, &cfg.weight_shape(name).unwrap()),
        &["model.safetensors", name, "not found"],
    );
    let name = "model.layers.0.self_attn.k_proj.weight";
    let mut wrong = cfg.clone();
    wrong.num_key_value_heads = 2;
    assert_err(
        w.get(name, &wrong.weight_shape(name).unwrap()),
        &[
            "model.safetensors",
            name,
            "expected shape [8, 8]",
            "found [4, 8]",
        ],
    );

    // config.json problems name the file and the key.
    write(&dir.join("config.json"), br#"{"vocab_size": 6}"#);
    assert_err(
        model::load(&dir, DType::F32, Device::Cpu),
        &["config.json", "hidden_size"],
    );
    let bad_rope = CONFIG_JSON.replace("\"llama3\"", "\"yarn\"");
    write(&dir.join("config.json"), bad_rope.as_bytes());
    assert_err(
        model::load(&dir, DType::F32, Device::Cpu),
        &["config.json", "rope_scaling", "yarn"],
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_err(model::load(&dir, DType::F32, Device::Cpu), &["config.json"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn weights_loader_refuses_u32() {
    let dir = tmp_dir("u32");
    let path = dir.join("tiny.gguf");
    write(&path, &tiny_llama().build());
    assert_err(
        Weights::load(&path, DType::U32, Device::Cpu),
        &["tiny.gguf", "u32"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ----- Llama 3 RoPE scaling from a GGUF file's `rope_freqs.weight` --------------------------------

/// The per-frequency factors llama.cpp's converter writes for Llama 3 scaling (its formula,
/// restated here): 1 for short wavelengths, `factor` for long ones, a smooth blend between.
fn llama3_freq_factors(theta: f64, head_dim: usize, s: model::Llama3RopeScaling) -> Vec<f32> {
    let old = s.original_max_position_embeddings as f64;
    (0..head_dim / 2)
        .map(|i| {
            let freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / s.high_freq_factor {
                1.0
            } else if wavelen > old / s.low_freq_factor {
                s.factor as f32
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn gguf_rope_freq_factors_equal_the_llama3_formula() {
    // Llama 3.1 8B: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192.
    let s = model::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let base = LlamaConfig {
        vocab_size: 10,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: Some(model::RopeScaling::Llama3(s)),
        max_position_embeddings: 131_072,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let factors = llama3_freq_factors(base.rope_theta, base.head_dim, s);
    // All three branches are exercised.
    assert!(factors.contains(&1.0) && factors.contains(&8.0));
    assert!(factors.iter().any(|&f| f > 1.0 && f < 8.0));
    let from_gguf = LlamaConfig {
        rope_scaling: None,
        ..base.clone()
    }
    .with_gguf_freq_factors("x.gguf", &factors)
    .unwrap();
    let (want, got) = (
        model::llama::inv_freq(&base),
        model::llama::inv_freq(&from_gguf),
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(rel(*w, *g) < 1e-6, "frequency {i}: {w} vs {g}");
    }
}

#[test]
fn gguf_rope_freqs_tensor_is_read_and_checked() {
    let dir = tmp_dir("gguf-rope-freqs");
    let path = dir.join("tiny.gguf");
    // head_dim 4: two frequencies, 1 and 10000^-0.5.
    write(
        &path,
        &tiny_llama()
            .tensor_f32("rope_freqs.weight", &[2], &[1.0, 8.0])
            .build(),
    );
    let (cfg, _) = model::load(&path, DType::F32, Device::Cpu).expect("load");
    assert_eq!(
        cfg.rope_scaling,
        Some(model::RopeScaling::FreqFactors(vec![1.0, 8.0]))
    );
    let f = model::llama::inv_freq(&cfg);
    assert!(
        rel(f[0], 1.0) < 1e-12 && rel(f[1], 0.01 / 8.0) < 1e-12,
        "{f:?}"
    );
    // Wrong length and a non-positive factor: one-line errors naming the file and the tensor.
    for (data, want) in [
        (vec![1.0f32, 2.0, 3.0], "3 factors for head_dim 4"),
        (vec![1.0f32, 0.0], "factor 1 is 0"),
    ] {
        let n = data.len();
        write(
            &path,
            &tiny_llama()
                .tensor_f32("rope_freqs.weight", &[n], &data)
                .build(),
        );
        assert_err(
            model::load(&path, DType::F32, Device::Cpu),
            &["tiny.gguf", "rope_freqs.weight", want],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
