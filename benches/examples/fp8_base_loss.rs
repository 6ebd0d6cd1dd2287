//! What an FP8 base costs a model, without training: the mean next-token loss of the first
//! TOKENS (400) tokens of a text file under the model's own weights (f32, on the CPU), with only
//! the projection weights rounded to FP8 (dequantised back: the weights' share of the error), with
//! the whole FP8 base of `mixlora train --base-dtype fp8` (weights and activations), and with one
//! projection kind at a time in FP8:
//!
//! `cargo run --release -p mixlora-benches --example fp8_base_loss -- MODEL.gguf TEXT_FILE [TOKENS]`

use engine::{DType, Device, FrozenWeight, Tensor, IGNORE_INDEX};
use model::{Llama, Tokenizer};

const KINDS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// Mean next-token cross-entropy of `ids` as one row.
fn loss(m: &Llama, ids: &[u32]) -> Result<f64, Box<dyn std::error::Error>> {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), [1, t], Device::Cpu)?;
    let logits = m.forward(&x, None)?;
    let mut targets = ids[1..].to_vec();
    targets.push(IGNORE_INDEX);
    let targets = Tensor::from_vec(targets, [1, t], Device::Cpu)?;
    let sum = logits
        .cross_entropy_rows(&targets, IGNORE_INDEX)?
        .sum_all()?;
    Ok(sum.to_vec_f64()?[0] / (t - 1) as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: fp8_base_loss MODEL.gguf TEXT_FILE [TOKENS]";
    let mut args = std::env::args().skip(1);
    let model = std::path::PathBuf::from(args.next().ok_or(usage)?);
    let text = std::fs::read_to_string(args.next().ok_or(usage)?)?;
    let n: usize = args.next().map_or(Ok(400), |s| s.parse())?;
    let load = || Llama::load(&model, DType::F32, Device::Cpu);
    let dense = load()?;
    let tok = Tokenizer::load(&model, &dense.config)?;
    let ids = tok.encode(&text, true)?;
    let ids = &ids[..ids.len().min(n)];
    let base = loss(&dense, ids)?;
    println!("{} tokens of the text, f32", ids.len());
    println!("dense:                 {base:.4}");
    let report = |name: &str, l: f64| {
        println!("{name:<22} {l:.4} ({:+.2}%)", 100.0 * (l / base - 1.0));
    };
    drop(dense);
    let mut weights_only = load()?;
    for layer in &mut weights_only.layers {
        for w in layer.projections_mut() {
            let q = w.to_fp8()?;
            *w = FrozenWeight::Dense(q.fp8().expect("fp8").dequantize()?);
        }
    }
    report("FP8 weights only:", loss(&weights_only, ids)?);
    drop(weights_only);
    let mut fp8 = load()?;
    fp8.quantize_base_fp8()?;
    report("FP8 base:", loss(&fp8, ids)?);
    drop(fp8);
    for (k, kind) in KINDS.iter().enumerate() {
        let mut m = load()?;
        for layer in &mut m.layers {
            let w = &mut layer.projections_mut()[k];
            **w = w.to_fp8()?;
        }
        report(&format!("FP8 {kind}_proj only:"), loss(&m, ids)?);
    }
    Ok(())
}
