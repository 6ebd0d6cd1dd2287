//! CPU engine throughput: matmul (f32 and bf16, square and LLaMA-shaped) and causal attention
//! (forward, forward+backward). Criterion's throughput is set to the FLOP count, so its
//! "elem/s" figures read as FLOP/s.
//!
//! Run: `cargo bench -p mixlora-benches --bench engine_cpu`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::{causal_attention, DType, Device, Tensor};

fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, Device::Cpu).expect("randn")
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    // (name, m, k, n, rhs transposed): squares, then SmolLM2-135M projections on 4x128 tokens
    // (x @ Wᵀ with W stored [out, in], as the model runs them).
    let cases: &[(&str, usize, usize, usize, bool)] = &[
        ("square", 256, 256, 256, false),
        ("square", 512, 512, 512, false),
        ("square", 1024, 1024, 1024, false),
        ("smollm2_qproj_512x576x576_wT", 512, 576, 576, true),
        ("smollm2_gate_512x576x1536_wT", 512, 576, 1536, true),
        ("smollm2_down_512x1536x576_wT", 512, 1536, 576, true),
    ];
    for &(name, m, k, n, wt) in cases {
        for dtype in [DType::F32, DType::BF16] {
            if dtype == DType::BF16 && name == "square" && m < 1024 {
                continue;
            }
            let a = rand(&[m, k], 1, dtype);
            let b = if wt {
                rand(&[n, k], 2, dtype).t().unwrap()
            } else {
                rand(&[k, n], 2, dtype)
            };
            g.throughput(Throughput::Elements((2 * m * k * n) as u64));
            let id = BenchmarkId::new(format!("{name}_{dtype}"), format!("{m}x{k}x{n}"));
            g.bench_with_input(id, &(), |bch, _| bch.iter(|| a.matmul(&b).unwrap()));
        }
    }
    g.finish();
}

/// SmolLM2-135M attention shape (9 query heads, 3 key/value heads, head dim 64). FLOPs count the
/// two products over the full (unmasked) score matrix: 4·b·h·t²·d forward, twice that backward.
fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let (b, hq, hkv, d) = (4, 9, 3, 64);
    for t in [128, 512] {
        let q = rand(&[b, hq, t, d], 3, DType::F32);
        let k = rand(&[b, hkv, t, d], 4, DType::F32);
        let v = rand(&[b, hkv, t, d], 5, DType::F32);
        let flops = (4 * b * hq * t * t * d) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_with_input(
            BenchmarkId::new("causal_fwd_f32", format!("b{b}_h{hq}_t{t}_d{d}")),
            &(),
            |bch, _| {
                bch.iter(|| engine::no_grad(|| causal_attention(&q, &k, &v, None, 0).unwrap()))
            },
        );
        let (qv, kv, vv) = (
            q.to_var().unwrap(),
            k.to_var().unwrap(),
            v.to_var().unwrap(),
        );
        g.throughput(Throughput::Elements(3 * flops));
        g.bench_with_input(
            BenchmarkId::new("causal_fwd_bwd_f32", format!("b{b}_h{hq}_t{t}_d{d}")),
            &(),
            |bch, _| {
                bch.iter(|| {
                    causal_attention(&qv, &kv, &vv, None, 0)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_matmul, bench_attention);
criterion_main!(benches);
