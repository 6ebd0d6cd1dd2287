//! Parity of our LLaMA with Hugging Face transformers (float32) on the real SmolLM2-135M-Instruct
//! GGUF: token ids, last-position logits, top-5 at every position, per-position logsumexp and the
//! 16-token greedy continuations of `smollm2_reference.json`. Skips, saying why, when the GGUF or
//! the fixture is absent.

mod support;

use engine::{no_grad, DType, Device, Tensor};
use model::generate::{generate, GenerateOptions};
use model::sampling::Sampler;
use model::{Llama, Tokenizer};
use testutil::rel_err;

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_matches_transformers() {
    let (Some(path), Some(fx)) = (support::smollm2_gguf(), support::smollm2_fixture()) else {
        return;
    };
    let model = Llama::load(&path, DType::F32, Device::Cpu).expect("load model");
    let tok = Tokenizer::load(&path, &model.config).expect("load tokenizer");
    let stop = model.config.eos_token_ids.clone();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "token ids of {text:?}");

        let t = ids.len();
        let x = Tensor::from_vec(ids.clone(), [1, t], Device::Cpu).unwrap();
        let logits = no_grad(|| model.forward(&x, None)).unwrap(); // [1, t, V]
        let v = logits.dims()[2];
        let all = logits.to_vec_f64().unwrap();

        let want: Vec<f64> = case["last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let err = rel_err(&all[(t - 1) * v..], &want);
        assert!(
            err < 1e-3,
            "{text:?}: last-position logits relative error {err:.2e}"
        );

        for (p, top5) in case["per_position_top5"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let row = &all[p * v..(p + 1) * v];
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let got: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
            assert_eq!(got, ids_of(top5), "{text:?}: top-5 at position {p}");
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let want = case["per_position_logsumexp"][p].as_f64().unwrap();
            assert!(
                (lse - want).abs() < 1e-3 * want.abs().max(1.0),
                "{text:?}: logsumexp at {p}: {lse} vs {want}"
            );
        }

        let opts = GenerateOptions {
            max_new_tokens: 16,
            ..GenerateOptions::default()
        };
        let greedy = &mut Sampler::greedy();
        let out = generate(&model, &ids, &opts, greedy, &stop, |_, _| {}, |_| {}).unwrap();
        assert_eq!(
            out,
            ids_of(&case["greedy_16"]),
            "{text:?}: greedy continuation"
        );
        assert_eq!(
            tok.decode(&out, false).unwrap(),
            case["greedy_16_text"].as_str().unwrap()
        );
    }
}

#[test]
fn batched_left_padding_matches_single_sequences() {
    let Some(path) = support::smollm2_gguf() else {
        return;
    };
    let model = Llama::load(&path, DType::F32, Device::Cpu).expect("load model");
    let tok = Tokenizer::load(&path, &model.config).unwrap();
    let a = tok.encode("The capital of France is", false).unwrap();
    let b = tok.encode("Hello", false).unwrap();
    let t = a.len();
    let pad = t - b.len();
    // Row 1 is left-padded with token 0; the mask hides the padding and positions skip it.
    let mut ids = a.clone();
    ids.extend(std::iter::repeat_n(0, pad).chain(b.iter().copied()));
    let mut mask = vec![1u32; t];
    mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, b.len())));
    let x = Tensor::from_vec(ids, [2, t], Device::Cpu).unwrap();
    let m = Tensor::from_vec(mask, [2, t], Device::Cpu).unwrap();
    let batched = no_grad(|| model.forward(&x, Some(&m)))
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let v = model.config.vocab_size;
    for (row, seq) in [(0, &a), (1, &b)] {
        let single = no_grad(|| {
            model.forward(
                &Tensor::from_vec(seq.clone(), [1, seq.len()], Device::Cpu).unwrap(),
                None,
            )
        })
        .unwrap()
        .to_vec_f64()
        .unwrap();
        let last = &batched[(row * t + t - 1) * v..(row * t + t) * v];
        let err = rel_err(last, &single[(seq.len() - 1) * v..]);
        assert!(
            err < 1e-4,
            "row {row}: batched vs single logits relative error {err:.2e}"
        );
    }
}
