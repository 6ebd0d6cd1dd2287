//! The MixLoRA FFN block, forward + backward, per implementation (docs/DESIGN.md, section 2,
//! "Computing the MoE FFN"): the naive per-expert loop, the paper's † version, the grouped path
//! and the `fused` one (the op `engine::moe_ffn`).
//!
//! On a GPU (built with `--features mixlora-engine/cuda` and one present) at LLaMA-2-7B sizes:
//! H = 4096, I = 11008, E = 8, top-2, r = 16, bf16 base, T = 2048, 8192, 16384 tokens. Otherwise
//! on the CPU at small sizes (H = 256, I = 688, f32, T = 256, 1024 and 2048: some three minutes on
//! 2 cores). `MIXLORA_BENCH_DEVICE=cpu` forces the CPU.
//!
//! Each case: router and experts with random non-zero weights (so every path does its full
//! work), the block input a variable (its gradient is computed, as in training), and a random
//! `c` back-propagated from `y` as its gradient (the gradient of `Σ y ⊙ c`, without computing
//! that loss, whose own passes over `[T, H]` are not the block's). Criterion times forward +
//! backward (the device is synchronised
//! at the end of each iteration). Then, per case, a separate pass measures the median of 10 runs
//! and the peak activation memory: the peak of `engine::memory_stats` during forward + backward
//! minus what was allocated before it (inputs and weights), in MiB (the GPU's caching allocator,
//! or the CPU's live tensor buffers). A summary then prints each implementation's time and peak
//! and both as ratios to the naive loop's. With `MIXLORA_MOE_FFN_JSON=PATH`, the figures are
//! written as a list of `{"tokens", "naive_ms", "paper_ms", "grouped_ms", "fused_ms",
//! "naive_mib", ...}` (the implementations that ran).
//!
//! Run: `cargo bench -p mixlora-benches --bench moe_ffn` (CPU), or on the GPU machine the binary
//! that scripts/dev/build-gpu.sh builds: `gpu-bin/bench-moe_ffn --bench`. `MIXLORA_MOE_FFN_TOKENS`
//! (e.g. `16384`) picks the token counts; with `MIXLORA_PROFILE=1` (or `gpu`) each case also
//! prints a per-kernel profile of one step (`MIXLORA_PROFILE_ROWS` rows, else 40);
//! `MIXLORA_MOE_CHUNK_TOKENS` sets the fused path's token chunk and `MIXLORA_MOE_TILES=1` its
//! tile kernels (the trainer's `--moe-chunk-tokens` and `--moe-kernels tiles`);
//! `MIXLORA_MOE_FFN_IMPLS` (e.g. `fused` or `naive,fused`) runs only those implementations;
//! `MIXLORA_CUDA_INCLUDE` and `MIXLORA_NVRTC_OPTIONS` as for the examples (`mixlora_benches`).

use std::time::Instant;

use criterion::{BenchmarkId, Criterion};
use engine::{DType, Device, MoeFfnOptions, MoeKernels, Tensor};
use model::adapters::{ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn};

struct Sizes {
    h: usize,
    i: usize,
    e: usize,
    k: usize,
    r: usize,
    tokens: Vec<usize>,
    dtype: DType,
}

/// The implementations compared, with their JSON key.
fn all_impls() -> Vec<(&'static str, MoeImpl)> {
    vec![
        ("naive", MoeImpl::Naive),
        ("paper", MoeImpl::Paper),
        ("grouped", MoeImpl::Grouped),
        ("fused", MoeImpl::Fused(fused_options())),
    ]
}

/// The fused path's options: `MIXLORA_MOE_CHUNK_TOKENS` (a token count) and `MIXLORA_MOE_TILES=1`
/// (the tensor-core tile kernels) when set, else the defaults.
fn fused_options() -> MoeFfnOptions {
    let chunk_tokens = std::env::var("MIXLORA_MOE_CHUNK_TOKENS").ok().map(|v| {
        v.trim()
            .parse()
            .expect("MIXLORA_MOE_CHUNK_TOKENS: a token count")
    });
    let kernels = match std::env::var("MIXLORA_MOE_TILES").as_deref() {
        Ok("1") => MoeKernels::Tiles,
        _ => MoeKernels::BlockGemms,
    };
    MoeFfnOptions {
        kernels,
        chunk_tokens,
    }
}

fn device() -> Device {
    if std::env::var("MIXLORA_BENCH_DEVICE").is_ok_and(|d| d == "cpu") {
        return Device::Cpu;
    }
    #[cfg(feature = "cuda")]
    if mixlora_benches::cuda_from_env()
        .and_then(|()| engine::backend::cuda::CudaDevice::get(0))
        .is_ok()
    {
        return Device::Cuda(0);
    }
    Device::Cpu
}

/// The implementations to run: all, or those `MIXLORA_MOE_FFN_IMPLS` names (comma-separated).
fn impls() -> Vec<(&'static str, MoeImpl)> {
    let all = all_impls();
    let Ok(list) = std::env::var("MIXLORA_MOE_FFN_IMPLS") else {
        return all;
    };
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    for n in &names {
        assert!(
            all.iter().any(|(k, _)| k == n),
            "MIXLORA_MOE_FFN_IMPLS: unknown implementation {n:?} (naive, paper, grouped, fused)"
        );
    }
    all.into_iter().filter(|(k, _)| names.contains(k)).collect()
}

/// `MIXLORA_MOE_FFN_TOKENS=2048,16384` replaces the token counts of the device's sizes.
fn sizes(device: Device) -> Sizes {
    let mut s = default_sizes(device);
    if let Ok(list) = std::env::var("MIXLORA_MOE_FFN_TOKENS") {
        s.tokens = list
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .expect("MIXLORA_MOE_FFN_TOKENS: a list of token counts")
            })
            .collect();
    }
    s
}

fn default_sizes(device: Device) -> Sizes {
    match device {
        Device::Cpu => Sizes {
            h: 256,
            i: 688,
            e: 8,
            k: 2,
            r: 16,
            tokens: vec![256, 1024, 2048],
            dtype: DType::F32,
        },
        _ => Sizes {
            h: 4096,
            i: 11008,
            e: 8,
            k: 2,
            r: 16,
            tokens: vec![2048, 8192, 16384],
            dtype: DType::BF16,
        },
    }
}

fn synchronize(device: Device) {
    #[cfg(feature = "cuda")]
    engine::backend::cuda::synchronize(device).expect("synchronize");
    let _ = device;
}

/// `(current, peak)` bytes of tensor memory: the live CPU tensor buffers or the GPU's caching
/// allocator.
fn memory(device: Device) -> (usize, usize) {
    engine::memory_stats(device)
}

/// The frozen weights, the block and the loss weights of one size.
struct Case {
    w: [Tensor; 3], // gate [I, H], up [I, H], down [H, I]
    block: MixLoraFfn,
    x: Tensor, // [T, H] variable
    c: Tensor, // [T, H]
}

fn case(s: &Sizes, t: usize, device: Device) -> Case {
    let adt = s.dtype.accumulation();
    let rand = |shape: &[usize], std: f64, seed: u64, dt: DType| {
        Tensor::randn(shape.to_vec(), 0.0, std, seed, dt, device).expect("randn")
    };
    let (h, i, r, e) = (s.h, s.i, s.r, s.e);
    // Each kind's expert matrices in one [E, ..] buffer, as the trainer lays them out: the fused
    // and grouped paths then stack them as views, without copies.
    let stacked = |shape: [usize; 3], std: f64, seed: u64| {
        rand(&shape, std, seed, adt).unstack_leaves().unwrap()
    };
    let lora = |a: &[Tensor], b: &[Tensor], k: usize| {
        Some(LoraLinear::new(a[k].clone(), b[k].clone(), 2.0, 0.05))
    };
    let (std_h, std_i) = (1.0 / (h as f64).sqrt(), 1.0 / (i as f64).sqrt());
    let (a_gate, b_gate) = (
        stacked([e, r, h], std_h, 100),
        stacked([e, i, r], 0.02, 101),
    );
    let (a_up, b_up) = (
        stacked([e, r, h], std_h, 102),
        stacked([e, i, r], 0.02, 103),
    );
    let (a_down, b_down) = (
        stacked([e, r, i], std_i, 104),
        stacked([e, h, r], 0.02, 105),
    );
    let experts = (0..e)
        .map(|k| ExpertLora {
            gate: lora(&a_gate, &b_gate, k),
            up: lora(&a_up, &b_up, k),
            down: lora(&a_down, &b_down, k),
        })
        .collect();
    // W_gate and W_up as the halves of one [2I, H] buffer, as the trainer lays them out (the
    // fused path computes G and U with one GEMM; the others see two views).
    let gate_up = rand(&[2 * i, h], 0.02, 1, s.dtype);
    Case {
        w: [
            gate_up.narrow(0, 0, i).unwrap(),
            gate_up.narrow(0, i, i).unwrap(),
            rand(&[h, i], 0.02, 3, s.dtype),
        ],
        block: MixLoraFfn {
            router: Router {
                weight: rand(&[s.e, h], 0.02, 4, adt).to_var().unwrap(),
                routing: Routing::TopK(s.k),
            },
            experts,
        },
        x: rand(&[t, h], 1.0, 5, s.dtype).to_var().unwrap(),
        c: rand(&[t, h], 1.0, 6, s.dtype),
    }
}

/// Clears every gradient of the case (they would accumulate across iterations).
fn zero_grads(c: &Case) {
    c.x.zero_grad();
    c.block.router.weight.zero_grad();
    for e in &c.block.experts {
        for l in [&e.gate, &e.up, &e.down].into_iter().flatten() {
            l.a.zero_grad();
            l.b.zero_grad();
        }
    }
}

/// One forward + backward (dropout on, as in training), synchronised.
fn step(c: &Case, imp: MoeImpl, device: Device) {
    zero_grads(c);
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(c.w[0].clone()),
        up: &engine::FrozenWeight::from(c.w[1].clone()),
        down: &engine::FrozenWeight::from(c.w[2].clone()),
    };
    let (y, _) = c.block.forward(&c.x, shared, imp, Some(1)).unwrap();
    y.backward_with_grad(&c.c).unwrap();
    synchronize(device);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A peak in MiB for the JSON: whole MiB from 100 MiB up, else one decimal.
fn mib_value(mib: f64) -> serde_json::Value {
    if mib >= 100.0 {
        mib.round().into()
    } else {
        ((mib * 10.0).round() / 10.0).into()
    }
}

/// Each implementation's median time and activation peak per token count, and both as ratios
/// to the naive loop's (when it ran).
fn print_summary(rows: &[(usize, &str, f64, f64)]) {
    eprintln!("summary (x naive: the ratio to the naive loop at the same T):");
    eprintln!(
        "{:>7} {:<8} {:>10} {:>8} {:>10} {:>8}",
        "T", "impl", "ms", "x naive", "peak MiB", "x naive"
    );
    for &(t, name, ms, mib) in rows {
        let naive = rows.iter().find(|r| r.0 == t && r.1 == "naive");
        let ratio = |v: f64, of: f64| match naive {
            Some(_) if of > 0.0 => format!("{:.2}", v / of),
            _ => "-".into(),
        };
        let (nms, nmib) = naive.map_or((0.0, 0.0), |r| (r.2, r.3));
        eprintln!(
            "{t:>7} {name:<8} {ms:>10.3} {:>8} {mib:>10.1} {:>8}",
            ratio(ms, nms),
            ratio(mib, nmib)
        );
    }
}

fn main() {
    let profile_rows = mixlora_benches::profile_from_env().unwrap_or(40);
    let device = device();
    let s = sizes(device);
    eprintln!(
        "moe_ffn on {device}: H {}, I {}, E {}, k {}, r {}, {}",
        s.h, s.i, s.e, s.k, s.r, s.dtype
    );
    let mut crit = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .configure_from_args();
    let impls = impls();
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for &t in &s.tokens {
        let c = case(&s, t, device);
        let mut row = serde_json::Map::new();
        row.insert("tokens".into(), t.into());
        {
            let mut g = crit.benchmark_group(format!("moe_ffn_{device}_{}", s.dtype));
            for &(name, imp) in &impls {
                g.bench_with_input(BenchmarkId::new(name, t), &(), |b, _| {
                    b.iter(|| step(&c, imp, device))
                });
            }
            g.finish();
        }
        for &(name, imp) in &impls {
            step(&c, imp, device); // warm-up (and the allocator's cache)
            zero_grads(&c);
            synchronize(device);
            let before = memory(device).0;
            engine::reset_peak_memory(device);
            let mut times = Vec::new();
            for _ in 0..10 {
                let t0 = Instant::now();
                step(&c, imp, device);
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let peak_mib = memory(device).1.saturating_sub(before) as f64 / (1 << 20) as f64;
            if engine::profile::enabled() {
                engine::profile::take();
                step(&c, imp, device);
                let how = match engine::profile::mode() {
                    engine::profile::ProfileMode::GpuEvents => "GPU launches timed by CUDA events",
                    _ => "every op synchronised",
                };
                println!("profile of one {name} step at T = {t} ({how}):");
                print!("{}", engine::profile::report(profile_rows));
            }
            let ms = median(times);
            eprintln!("T {t:>6} {name:<6} {ms:>9.3} ms  activation peak {peak_mib:>9.1} MiB");
            row.insert(
                format!("{name}_ms"),
                ((ms * 1000.0).round() / 1000.0).into(),
            );
            row.insert(format!("{name}_mib"), mib_value(peak_mib));
            summary.push((t, name, ms, peak_mib));
        }
        rows.push(serde_json::Value::Object(row));
    }
    crit.final_summary();
    print_summary(&summary);
    let json = serde_json::to_string_pretty(&rows).unwrap();
    println!("{json}");
    if let Ok(path) = std::env::var("MIXLORA_MOE_FFN_JSON") {
        std::fs::write(&path, format!("{json}\n"))
            .unwrap_or_else(|e| panic!("{path}: cannot write: {e}"));
    }
}
