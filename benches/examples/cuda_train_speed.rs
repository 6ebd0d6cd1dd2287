//! Training speed of SmolLM2-135M with adapters on the GPU: tokens/s of one forward + backward
//! (cross-entropy over every position, plus the MixLoRA load-balance loss), for MixLoRA (E = 8,
//! top-2, r = 16 on all seven projections: the defaults) and, for comparison, plain LoRA r = 16 on
//! the same seven projections; batches 8 × 512 and 16 × 512 of random tokens; f32 and bf16 base.
//!
//! Build: `cargo build --release -p mixlora-benches --features mixlora-engine/cuda --example
//! cuda_train_speed` (scripts/dev/build-gpu.sh does it). Run on the GPU machine:
//! `gpu-bin/example-cuda_train_speed PATH.gguf [--dtype f32|bf16|both] [--moe IMPL] [--steps N]
//! [--warmup N] [--json PATH]`, or with `--random-smollm2` instead of the path: the same shapes
//! with random weights (the speed does not depend on the values), for a machine without the
//! file. MixLoRA runs the trainer's GPU default, the fused FFN, unless `--moe` names another
//! implementation (naive, paper, grouped).
//!
//! Method: `warmup` steps (the allocator's cache and cuBLAS warm up), then `steps` timed steps,
//! each from a synchronised stream to a synchronised stream (host clock); the median is reported.
//! Each step clears the adapters' gradients first (no optimizer update is timed). Peak memory is
//! the engine allocator's peak over the timed steps (weights, activations, gradients). With
//! `MIXLORA_PROFILE=gpu` every launch is timed by CUDA events (the timed steps then run slower)
//! and one more step per case prints its per-kernel profile and the GPU's busy time.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fmt::Write as _;
use std::time::Instant;

use engine::backend::cuda::{memory_stats, reset_peak_memory, synchronize, CudaDevice};
use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::{AdapterConfig, Llama, LlamaConfig, MoeImpl};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const GPU: Device = Device::Cuda(0);
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// SmolLM2-135M's shape (its config.json).
fn smollm2_135m() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

struct Opts {
    model: Option<String>,
    dtypes: Vec<DType>,
    /// MixLoRA's FFN implementation: the trainer's GPU default (fused) unless `--moe` names one.
    moe: MoeImpl,
    steps: usize,
    warmup: usize,
    json: Option<String>,
    /// Rows of a printed profile (`MIXLORA_PROFILE_ROWS`, else 25).
    profile_rows: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: cuda_train_speed (PATH.gguf | --random-smollm2) [--dtype f32|bf16|both] \
         [--moe naive|paper|grouped|fused] [--steps N] [--warmup N] [--json PATH]"
    );
    std::process::exit(2);
}

fn parse() -> Opts {
    let mut o = Opts {
        model: None,
        dtypes: vec![DType::F32, DType::BF16],
        moe: MoeImpl::Fused(Default::default()),
        steps: 10,
        warmup: 3,
        json: None,
        profile_rows: mixlora_benches::profile_from_env().unwrap_or(25),
    };
    let mut random = false;
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>| -> usize {
        v.and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--random-smollm2" => random = true,
            "--dtype" => {
                o.dtypes = match args.next().as_deref() {
                    Some("f32") => vec![DType::F32],
                    Some("bf16") => vec![DType::BF16],
                    Some("both") => vec![DType::F32, DType::BF16],
                    _ => usage(),
                }
            }
            "--moe" => {
                o.moe = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--steps" => o.steps = num(args.next()),
            "--warmup" => o.warmup = num(args.next()),
            "--json" => o.json = Some(args.next().unwrap_or_else(|| usage())),
            s if !s.starts_with("--") && o.model.is_none() => o.model = Some(s.to_string()),
            _ => usage(),
        }
    }
    // Exactly one of a path and --random-smollm2.
    if o.model.is_some() == random {
        usage();
    }
    o
}

struct Row {
    dtype: DType,
    adapters: &'static str,
    batch: (usize, usize),
    median_s: f64,
    min_s: f64,
    peak: usize,
    aux: bool,
}

/// Times forward + backward of `model` on a random `b × t` batch.
fn measure(model: &Llama, (b, t): (usize, usize), o: &Opts) -> Res<(f64, f64, usize, bool)> {
    let v = model.config.vocab_size as u64;
    let tok = |seed: u64, n: usize| -> Vec<u32> {
        (0..n as u64)
            .map(|i| (engine::rng::hash(seed, i) % v) as u32)
            .collect()
    };
    let ids = Tensor::from_vec(tok(1, b * t), [b, t], GPU)?;
    let labels = Tensor::from_vec(tok(2, b * t), b * t, GPU)?;
    let params: Vec<Tensor> = model
        .trainable_params()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let mut aux_seen = false;
    let mut step = |seed: u64| -> Res<()> {
        for p in &params {
            p.zero_grad();
        }
        let out = model.forward_train(&ids, None, Some(seed))?;
        let vocab = out.logits.dim(-1)?;
        let mut loss = out
            .logits
            .reshape([b * t, vocab])?
            .cross_entropy(&labels, IGNORE_INDEX)?; // [] f32 (f64 for f64)
        if let Some(a) = &out.aux_loss {
            aux_seen = true;
            loss = loss.add(&a.to_dtype(loss.dtype())?)?;
        }
        loss.backward()?;
        Ok(())
    };
    for i in 0..o.warmup {
        step(1000 + i as u64)?;
    }
    synchronize(GPU)?;
    reset_peak_memory(GPU);
    let mut times = Vec::with_capacity(o.steps);
    for i in 0..o.steps {
        let t0 = Instant::now();
        step(i as u64)?;
        synchronize(GPU)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let peak = memory_stats(GPU).1;
    if engine::profile::enabled() {
        // One more step with every kernel timed (MIXLORA_PROFILE=gpu: CUDA events): the GPU's
        // busy time against the step's wall time says whether the host or the device bounds it.
        engine::profile::take();
        step(0)?;
        synchronize(GPU)?;
        println!("profile of one step, {b}×{t}:");
        print!("{}", engine::profile::report(o.profile_rows));
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], peak, aux_seen))
}

fn main() {
    let o = parse();
    if let Err(e) = mixlora_benches::cuda_from_env().and_then(|()| CudaDevice::get(0)) {
        eprintln!("cuda_train_speed: no usable CUDA GPU: {e}");
        std::process::exit(1);
    }
    match run(&o) {
        Ok(rows) => report(&o, &rows),
        Err(e) => {
            eprintln!("cuda_train_speed: {e}");
            std::process::exit(1);
        }
    }
}

fn run(o: &Opts) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for &dt in &o.dtypes {
        let t0 = Instant::now();
        let mut model = match &o.model {
            Some(p) => Llama::load(std::path::Path::new(p), dt, GPU)?,
            None => Llama::random(smollm2_135m(), 0, dt, GPU)?,
        };
        eprintln!(
            "loaded {} as {dt} in {:.1} s",
            o.model.as_deref().unwrap_or("a random SmolLM2-135M"),
            t0.elapsed().as_secs_f64()
        );
        for (name, cfg) in [
            ("MixLoRA E=8 k=2 r=16", AdapterConfig::mixlora_default()),
            ("LoRA r=16 (7 projections)", AdapterConfig::lora_default()),
        ] {
            model.add_adapters(&cfg, 0)?;
            model.set_moe_impl(o.moe); // no effect on LoRA
            for batch in [(8, 512), (16, 512)] {
                let (median_s, min_s, peak, aux) = measure(&model, batch, o)?;
                eprintln!(
                    "{dt} {name} {}x{}: {:.1} ms/step",
                    batch.0,
                    batch.1,
                    median_s * 1e3
                );
                rows.push(Row {
                    dtype: dt,
                    adapters: name,
                    batch,
                    median_s,
                    min_s,
                    peak,
                    aux,
                });
            }
            model.remove_adapters();
        }
    }
    Ok(rows)
}

fn report(o: &Opts, rows: &[Row]) {
    println!(
        "SmolLM2-135M training step (forward + backward, CE over all positions{}), {}, MixLoRA FFN {:?}: median of {} steps after {} warm-up\n",
        if rows.iter().any(|r| r.aux) { " + aux loss" } else { "" },
        o.model.as_deref().unwrap_or("random weights"),
        o.moe,
        o.steps,
        o.warmup
    );
    println!("| base dtype | adapters | batch | tokens/s | ms/step | min ms | peak GiB |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for r in rows {
        let tokens = (r.batch.0 * r.batch.1) as f64;
        println!(
            "| {} | {} | {}×{} | {:.0} | {:.1} | {:.1} | {:.2} |",
            r.dtype,
            r.adapters,
            r.batch.0,
            r.batch.1,
            tokens / r.median_s,
            r.median_s * 1e3,
            r.min_s * 1e3,
            r.peak as f64 / GIB
        );
    }
    if let Some(path) = &o.json {
        let mut s = String::from("[\n");
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                s,
                "  {{\"dtype\": \"{}\", \"adapters\": \"{}\", \"mixlora_ffn\": \"{}\", \"batch\": {}, \
                 \"seq\": {}, \"tokens_per_s\": {:.1}, \"ms_per_step\": {:.3}, \"min_ms\": {:.3}, \
                 \"peak_bytes\": {}, \"steps\": {}}}",
                r.dtype,
                r.adapters,
                format!("{:?}", o.moe).to_lowercase(),
                r.batch.0,
                r.batch.1,
                (r.batch.0 * r.batch.1) as f64 / r.median_s,
                r.median_s * 1e3,
                r.min_s * 1e3,
                r.peak,
                o.steps
            );
            s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
        }
        s.push_str("]\n");
        if let Err(e) = std::fs::write(path, s) {
            eprintln!("cuda_train_speed: writing {path}: {e}");
            std::process::exit(1);
        }
        eprintln!("wrote {path}");
    }
}
