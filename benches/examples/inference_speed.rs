//! CPU generation speed with and without adapters, as `mixlora generate` runs it: prefill of a
//! 512-token prompt (one chunk) and greedy decoding of 32 tokens after it, f32.
//!
//! For each adapter folder given, the old way (LoRA beside the base weights, the `naive` MoE
//! loop) against the inference path (`merge_adapters_for_inference`, the `fused` MoE FFN), and
//! for MixLoRA the merge alone. The variants run in turn, `ROUNDS` times (default 3), each from a
//! fresh load, and the best and the median of each are printed, so that a busy machine slows
//! every variant alike.
//!
//! Run: `cargo run --release -p mixlora-benches --example inference_speed -- MODEL.gguf
//! [ADAPTER_DIR ...]` (`MIXLORA_ROUNDS=N` for N rounds; `MIXLORA_PROFILE=1`: also the per-op
//! table of each variant's last run).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use engine::{DType, Device, MoeFfnOptions};
use model::generate::{generate, GenerateOptions};
use model::sampling::Sampler;
use model::{Llama, MoeImpl};

const PROMPT: usize = 512;
const NEW: usize = 32;

/// One way of running a model.
struct Variant {
    label: String,
    adapter: Option<PathBuf>,
    merge: bool,
    moe: MoeImpl,
}

fn load(model: &Path, v: &Variant) -> Result<Llama, Box<dyn std::error::Error>> {
    let mut m = Llama::load(model, DType::F32, Device::Cpu)?;
    if let Some(dir) = &v.adapter {
        model::adapters::load(dir, &mut m)?;
        if v.merge {
            m.merge_adapters_for_inference()?;
        }
        trainer::run::use_moe_impl(&mut m, v.moe)?;
    }
    Ok(m)
}

/// (prefill tokens/s, decode tokens/s) of one generation.
fn run(m: &Llama) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let v = m.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..PROMPT)
        .map(|i| (engine::rng::hash(1, i as u64) % v) as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: NEW,
        ..GenerateOptions::default()
    };
    let t0 = Instant::now();
    let mut prefill_s = 0.0;
    let mut first = None;
    let out = generate(
        m,
        &prompt,
        &opts,
        &mut Sampler::greedy(),
        &[],
        |done, total| {
            if done == total {
                prefill_s = t0.elapsed().as_secs_f64();
            }
        },
        |_| {
            first.get_or_insert_with(Instant::now);
        },
    )?;
    let decode_s = first.ok_or("no token")?.elapsed().as_secs_f64();
    Ok((PROMPT as f64 / prefill_s, (out.len() - 1) as f64 / decode_s))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = mixlora_benches::profile_from_env().unwrap_or(25);
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .ok_or("usage: inference_speed MODEL.gguf [ADAPTER_DIR ...]")?,
    );
    let rounds: usize = std::env::var("MIXLORA_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let mut variants = vec![Variant {
        label: "no adapter".into(),
        adapter: None,
        merge: false,
        moe: MoeImpl::Naive,
    }];
    for dir in args.map(PathBuf::from) {
        let cfg = model::AdapterConfig::from_json_file(&dir.join(model::adapters::CONFIG_FILE))?;
        let kind = if cfg.is_mixlora() { "MixLoRA" } else { "LoRA" };
        let mut add = |what: &str, merge, moe| {
            variants.push(Variant {
                label: format!("{kind}, {what}"),
                adapter: Some(dir.clone()),
                merge,
                moe,
            })
        };
        if cfg.is_mixlora() {
            add("unmerged, naive MoE (before)", false, MoeImpl::Naive);
            add("merged, naive MoE", true, MoeImpl::Naive);
            add("merged, fused MoE (inference path)", true, fused);
        } else {
            add("unmerged (before)", false, MoeImpl::Naive);
            add("merged (inference path)", true, MoeImpl::Naive);
        }
    }
    let mut results = vec![(Vec::new(), Vec::new()); variants.len()];
    for round in 0..rounds {
        for (v, r) in variants.iter().zip(&mut results) {
            let m = load(&model, v)?;
            engine::profile::take();
            let (p, d) = run(&m)?;
            if engine::profile::enabled() && round + 1 == rounds {
                println!("-- {}", v.label);
                print!("{}", engine::profile::report(rows));
            }
            eprintln!(
                "round {}: {}: prefill {p:.1} tokens/s, decode {d:.2} tokens/s",
                round + 1,
                v.label
            );
            r.0.push(p);
            r.1.push(d);
        }
    }
    println!(
        "{PROMPT}-token prompt, {NEW} new tokens, f32, {rounds} rounds: best (median) tokens/s"
    );
    for (v, (p, d)) in variants.iter().zip(&mut results) {
        let best = |x: &[f64]| x.iter().cloned().fold(0.0, f64::max);
        println!(
            "{:<45} prefill {:>6.1} ({:>6.1})   decode {:>5.2} ({:>5.2})",
            v.label,
            best(p),
            median(p),
            best(d),
            median(d)
        );
    }
    Ok(())
}
