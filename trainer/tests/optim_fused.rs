//! The trainer's optimizer: its fused AdamW step (`AdamW::step`, one engine call for all
//! parameters) against its tensor-op formulation (`AdamW::step_reference`): five steps on random
//! parameters and gradients of assorted sizes in f32, bf16 and f64, with weight decay, clipping
//! scales, and one parameter that never has a gradient. Parameters and both moments must agree:
//! f32 and bf16 within 1e-6 relative (they are computed by the same operations, so in practice
//! bit for bit), f64 to 1e-12. The engine's step itself (mixed dtypes in one call, views of one
//! buffer updated in place, overlapping views refused) is tested with its unit in
//! tests/tests/fused/adamw.rs.

use engine::{DType, Device, Tensor};
use trainer::optim::{AdamW, AdamWConfig};

/// Sizes of the parameters: tiny, odd, a thread-chunk boundary and more than one chunk.
const SIZES: [usize; 6] = [1, 7, 255, 4096, 16385, 40000];

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>();
    if a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Named variables of `dtype` with random values (never zero), and one more that will never get
/// a gradient.
fn params(dtype: DType, seed: u64) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let t = Tensor::rand_uniform(n, 0.1, 1.5, seed + i as u64, dtype, Device::Cpu)
                .unwrap()
                .to_var()
                .unwrap();
            (format!("p{i}"), t)
        })
        .collect();
    let frozen = Tensor::rand_uniform(33, 0.2, 0.9, seed + 99, dtype, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    out.insert(2, ("no_grad".into(), frozen));
    out
}

/// Sets every parameter's gradient (except `no_grad`) to random values of the step `step`:
/// backward of `Σ p ⊙ r` gives `r`.
fn set_grads(ps: &[(String, Tensor)], step: u64) {
    for (i, (name, p)) in ps.iter().enumerate() {
        p.zero_grad();
        if name == "no_grad" {
            continue;
        }
        let r = Tensor::randn(
            p.shape().clone(),
            0.0,
            1.0,
            1000 * step + i as u64,
            p.dtype(),
            Device::Cpu,
        )
        .unwrap();
        p.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    }
}

fn run(dtype: DType, cfg: AdamWConfig, fused: bool) -> Vec<Vec<f64>> {
    let ps = params(dtype, 7);
    let mut opt = AdamW::new(ps.clone(), cfg).unwrap();
    for step in 1..=5u64 {
        set_grads(&ps, step);
        let (lr, scale) = (
            1e-2 / step as f64,
            [1.0, 0.37, 1.0, 2.5, 0.8][step as usize - 1],
        );
        if fused {
            opt.step(lr, scale).unwrap();
        } else {
            opt.step_reference(lr, scale).unwrap();
        }
    }
    assert_eq!(opt.steps(), 5);
    let (m, v) = opt.moments();
    ps.iter()
        .map(|(_, p)| p.to_vec_f64().unwrap())
        .chain(m.iter().map(|t| t.to_vec_f64().unwrap()))
        .chain(v.iter().map(|t| t.to_vec_f64().unwrap()))
        .collect()
}

fn compare(dtype: DType, tol: f64) {
    let cfg = AdamWConfig {
        beta1: 0.85,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let (a, b) = (run(dtype, cfg, true), run(dtype, cfg, false));
    let start = params(dtype, 7);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let e = rel_err(x, y);
        assert!(
            e <= tol,
            "{dtype}: tensor {i}: relative error {e:e} > {tol:e}"
        );
    }
    // The parameter without a gradient is untouched (no decay either), its moments stay zero.
    let untouched = start[2].1.to_vec_f64().unwrap();
    let n = start.len();
    assert_eq!(
        a[2], untouched,
        "{dtype}: the parameter without gradient moved"
    );
    assert!(a[n + 2].iter().chain(&a[2 * n + 2]).all(|&x| x == 0.0));
    // Everything else moved.
    for (i, (_, p)) in start.iter().enumerate() {
        if i != 2 {
            assert_ne!(
                a[i],
                p.to_vec_f64().unwrap(),
                "{dtype}: parameter {i} did not move"
            );
        }
    }
}

#[test]
fn fused_step_matches_the_tensor_op_step_f32() {
    compare(DType::F32, 1e-6);
}

#[test]
fn fused_step_matches_the_tensor_op_step_bf16() {
    compare(DType::BF16, 1e-6);
}

#[test]
fn fused_step_matches_the_tensor_op_step_f64() {
    compare(DType::F64, 1e-12);
}
