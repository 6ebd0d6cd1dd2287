//! The fused AdamW step (`AdamW::step`, one engine call for all parameters) against the tensor-op
//! formulation (`AdamW::step_reference`): five steps on random parameters and gradients of
//! assorted sizes in f32, bf16 and f64, with weight decay, clipping scales, and one parameter that
//! never has a gradient. Parameters and both moments must agree: f32 and bf16 within 1e-6
//! relative (they are computed by the same operations, so in practice bit for bit), f64 to 1e-12.

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

/// Parameters of different dtypes in one optimizer go through one fused call.
#[test]
fn mixed_dtypes_in_one_step() {
    let mk = || {
        vec![
            (
                "a".to_string(),
                Tensor::rand_uniform(300, 0.1, 1.0, 1, DType::F32, Device::Cpu)
                    .unwrap()
                    .to_var()
                    .unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::rand_uniform(301, 0.1, 1.0, 2, DType::BF16, Device::Cpu)
                    .unwrap()
                    .to_var()
                    .unwrap(),
            ),
            (
                "c".to_string(),
                Tensor::rand_uniform(302, 0.1, 1.0, 3, DType::F64, Device::Cpu)
                    .unwrap()
                    .to_var()
                    .unwrap(),
            ),
        ]
    };
    let (pa, pb) = (mk(), mk());
    let mut oa = AdamW::new(pa.clone(), AdamWConfig::default()).unwrap();
    let mut ob = AdamW::new(pb.clone(), AdamWConfig::default()).unwrap();
    for step in 1..=3 {
        set_grads(&pa, step);
        set_grads(&pb, step);
        oa.step(1e-2, 1.0).unwrap();
        ob.step_reference(1e-2, 1.0).unwrap();
    }
    for ((_, x), (_, y)) in pa.iter().zip(&pb) {
        assert_eq!(x.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
    }
}

/// The state after 3 steps, with 2 accumulated micro-batches each, of four parameters that are
/// the slices of one `[4, n]` buffer (`stacked`, as a MixLoRA layer's expert LoRAs) or four
/// separate tensors with the same values, plus one separate parameter: the first two receive
/// their gradient through one stacked tensor (views of its gradient, then a sum on the second
/// micro-batch), the last one directly, and the third never gets one. Returns the parameters,
/// the moments and the slices' buffer (`None` when separate).
fn run_stacked(
    dtype: DType,
    n: usize,
    stacked: bool,
    fused: bool,
) -> (Vec<Vec<f64>>, Option<Tensor>) {
    let buf = Tensor::rand_uniform([4, n], 0.1, 1.5, 5, dtype, Device::Cpu).unwrap();
    let mut ps: Vec<Tensor> = buf.unstack_leaves().unwrap();
    if !stacked {
        ps = ps.iter().map(|p| p.detach().to_var().unwrap()).collect();
    }
    let other = Tensor::rand_uniform(77, 0.1, 1.5, 6, dtype, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    let named: Vec<(String, Tensor)> = ps
        .iter()
        .chain([&other])
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), p.clone()))
        .collect();
    let mut opt = AdamW::new(named, AdamWConfig::default()).unwrap();
    let r = |shape: &[usize], seed: u64| {
        Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, Device::Cpu).unwrap()
    };
    for step in 1..=3u64 {
        opt.zero_grad();
        for micro in 0..2u64 {
            let seed = 100 * step + 10 * micro;
            let pair = engine::stack(&[&ps[0], &ps[1]]).unwrap(); // [2, n]
            assert_eq!(pair.same_storage(&buf), stacked);
            let mut loss = pair.mul(&r(&[2, n], seed)).unwrap().sum_all().unwrap();
            if micro == 0 {
                for (p, s) in [(&ps[3], seed + 1), (&other, seed + 2)] {
                    let l = p.mul(&r(p.dims(), s)).unwrap().sum_all().unwrap();
                    loss = loss.add(&l).unwrap();
                }
            }
            loss.backward().unwrap();
        }
        assert!(ps[2].grad().is_none());
        if fused {
            opt.step(1e-2, 0.7).unwrap();
        } else {
            opt.step_reference(1e-2, 0.7).unwrap();
        }
    }
    let (m, v) = opt.moments();
    let state = ps
        .iter()
        .chain([&other])
        .chain(m)
        .chain(v)
        .map(|t| t.to_vec_f64().unwrap())
        .collect();
    (state, stacked.then_some(buf))
}

/// Parameters that are views of one buffer (a MixLoRA layer's stacked expert LoRAs) are updated
/// in place in that buffer, with the same results as separate tensors bit for bit (fused step and
/// tensor-op step), gradient accumulation and a view without a gradient included.
#[test]
fn views_of_one_buffer_update_in_place_like_separate_tensors() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        // One size under the CPU's chunk of 16384 elements, one spread over several chunks.
        for n in [300, 40000] {
            let start = Tensor::rand_uniform([4, n], 0.1, 1.5, 5, dtype, Device::Cpu)
                .unwrap()
                .to_vec_f64()
                .unwrap();
            let (separate, _) = run_stacked(dtype, n, false, true);
            for fused in [true, false] {
                let (views, buf) = run_stacked(dtype, n, true, fused);
                assert_eq!(views, separate, "{dtype}, n {n}, fused {fused}");
                // The buffer holds the updated slices; the one without a gradient is untouched.
                let buf = buf.unwrap().to_vec_f64().unwrap();
                assert_eq!(buf, views[..4].concat(), "{dtype}, n {n}");
                assert_eq!(views[2], start[2 * n..3 * n], "{dtype}, n {n}");
                assert_ne!(views[0], start[..n], "{dtype}, n {n}");
            }
        }
    }
}

/// Views of one buffer that overlap cannot be stepped together.
#[test]
fn overlapping_views_are_refused() {
    let buf = Tensor::rand_uniform([2, 10], 0.1, 1.5, 5, DType::F32, Device::Cpu).unwrap();
    let mut ps = buf.unstack_leaves().unwrap();
    ps.extend(buf.reshape([1, 20]).unwrap().unstack_leaves().unwrap()); // the whole buffer
    let named = ps
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), p.clone()))
        .collect();
    let mut opt = AdamW::new(named, AdamWConfig::default()).unwrap();
    for p in &ps {
        p.sum_all().unwrap().backward().unwrap();
    }
    let before = buf.to_vec_f64().unwrap();
    let err = opt.step(1e-2, 1.0).unwrap_err().to_string();
    assert!(err.contains("shares its buffer"), "{err}");
    assert_eq!(buf.to_vec_f64().unwrap(), before);
}
