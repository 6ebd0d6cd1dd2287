//! CPU timing of `causal_attention` (composite) and `flash_attention` at the SmolLM2-135M shape
//! (b=4, hq=9, hkv=3, t=s=128 or T, d=64): forward alone (under `no_grad`) and forward +
//! backward, f32 and bf16, with and without a left-padding key mask. Prints the median and the
//! minimum of many runs in ms.
//!
//! Run: `cargo run --release -p mixlora-benches --example attn_cpu_timing [-- ITERS [T]]`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::{causal_attention, flash_attention, no_grad, DType, Device, Tensor};

/// An attention op: `(q, k, v, key_mask, q_offset)`.
type Attention = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, usize) -> engine::Result<Tensor>;

/// Median and minimum of `iters` timed calls of `f` (ms), after two warm-up calls.
fn time(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    f();
    let mut ms: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let t: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(128);
    let (b, hq, hkv, d) = (4, 9, 3, 64);
    let r = |shape: &[usize], seed, dt| {
        Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dt, Device::Cpu).expect("randn")
    };
    // Left padding: sequence i starts with 8·i padding tokens.
    let mask: Vec<u32> = (0..b * t)
        .map(|p| u32::from(p % t >= (8 * (p / t)).min(t - 1)))
        .collect();
    let mask = Tensor::from_vec(mask, [b, t], Device::Cpu).expect("mask");
    println!(
        "attention CPU, b={b} hq={hq} hkv={hkv} t=s={t} d={d}, {} threads, {iters} runs",
        rayon_threads()
    );
    let ops: [(&str, Attention); 2] = [("composite", causal_attention), ("flash", flash_attention)];
    for dt in [DType::F32, DType::BF16] {
        for ((mname, m), (op, attn)) in [("no mask", None), ("left-padding mask", Some(&mask))]
            .into_iter()
            .flat_map(|m| ops.map(|o| (m, o)))
        {
            let q = r(&[b, hq, t, d], 1, dt);
            let k = r(&[b, hkv, t, d], 2, dt);
            let v = r(&[b, hkv, t, d], 3, dt);
            let (fm, fmin) = time(iters, || {
                no_grad(|| attn(&q, &k, &v, m, 0).expect("forward"));
            });
            let (qv, kv, vv) = (
                q.to_var().expect("var"),
                k.to_var().expect("var"),
                v.to_var().expect("var"),
            );
            let (bm, bmin) = time(iters, || {
                attn(&qv, &kv, &vv, m, 0)
                    .and_then(|o| o.sum_all())
                    .and_then(|l| l.backward())
                    .expect("forward + backward");
            });
            println!(
                "{dt:>4} {op:<9} {mname:<18} forward {fm:7.3} ms (min {fmin:7.3})   forward+backward {bm:7.3} ms (min {bmin:7.3})"
            );
        }
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
