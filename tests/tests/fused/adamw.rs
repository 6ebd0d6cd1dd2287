//! The AdamW unit (`engine::fused::adamw`): the fused multi-tensor step (`engine::adamw_step`)
//! against the same update written as engine tensor ops (`reference_step`, the formulation of
//! the trainer's `AdamW::step_reference`), bit for bit on the CPU: parameters of the three float
//! dtypes in one call; parameters that are views of one buffer (a MixLoRA layer's stacked expert
//! LoRAs), updated in place in it like separate tensors, with gradient accumulation and a view
//! without a gradient; overlapping views refused. The multi-tensor sum of squares
//! (`engine::sum_of_squares`, the gradient norm) against a plain f64 sum.
//!
//! Then (module `gpu`) the CPU ↔ CUDA parity of both: 60 parameters of assorted sizes (1, around
//! the 256-thread block, around the 4096-element chunk, 100003) in f32, bf16 and f64 together in
//! one call, plus one parameter without a gradient and four that are views of one buffer (one of
//! them without a gradient), after 3 steps with weight decay and a clipping scale. Parameters and
//! both moments are compared by relative error: f32 1e-5, bf16 1e-2, f64 1e-12 (the kernel uses
//! the CPU's operations in the same order without contraction, so it is expected to be exact).
//! The sum of squares within 1e-12 (both accumulate in f64, in different orders within a chunk).
//! The multi-tensor add (`engine::add_many_into`, gradient sums into one flat buffer) equal to an
//! `add_assign` per part bit for bit on the CPU, with its refusals; the GPU's equal to the CPU's.
//! The device-side clipping (`engine::clip_norm_factor`: the norm and PyTorch's factor, never read
//! back; `engine::adamw_step_scaled`: the step with that factor, skipped when it is not finite)
//! equal, bit for bit, the host's norm, factor and `adamw_step`, on the CPU and on the GPU.
//! Without a GPU (or the `cuda` feature) the GPU tests print why they skip and pass.

use engine::{
    adamw_step, adamw_step_scaled, clip_norm_factor, AdamWHyper, DType, Device, NoGradGuard, Tensor,
};

const CPU: Device = Device::Cpu;

/// The hyper-parameters of step `step` with the trainer's defaults (β 0.9 / 0.999, ε 1e-8,
/// weight decay 0.01).
fn hyper(lr: f64, grad_scale: f64, step: u64) -> AdamWHyper {
    AdamWHyper {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_scale,
        step,
    }
}

/// Zero moments of each parameter (its accumulation dtype).
fn moments(ps: &[Tensor]) -> Vec<Tensor> {
    ps.iter()
        .map(|p| Tensor::zeros(p.shape().clone(), p.dtype().accumulation(), p.device()).unwrap())
        .collect()
}

/// One AdamW step as engine tensor ops (about ten per parameter, then `Tensor::assign`), the
/// formulation of the trainer's `AdamW::step_reference`: the reference of the fused step.
fn reference_step(params: &[Tensor], exp_avg: &[Tensor], exp_avg_sq: &[Tensor], h: &AdamWHyper) {
    let _g = NoGradGuard::new();
    let (b1, b2) = (h.beta1, h.beta2);
    let t = h.step as i32;
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    for ((p, m), v) in params.iter().zip(exp_avg).zip(exp_avg_sq) {
        let Some(g) = p.grad() else { continue };
        let md = m.dtype();
        let g = g.to_dtype(md).unwrap().affine(h.grad_scale, 0.0).unwrap();
        let m_new = m.affine(b1, 0.0).unwrap();
        let m_new = m_new.add(&g.affine(1.0 - b1, 0.0).unwrap()).unwrap();
        let v_new = v.affine(b2, 0.0).unwrap();
        let v_new = v_new
            .add(&g.sqr().unwrap().affine(1.0 - b2, 0.0).unwrap())
            .unwrap();
        m.assign(&m_new).unwrap();
        v.assign(&v_new).unwrap();
        let denom = v_new.affine(1.0 / bc2, 0.0).unwrap().sqrt().unwrap();
        let denom = denom.add_scalar(h.eps).unwrap();
        let update = m_new.div(&denom).unwrap().affine(h.lr / bc1, 0.0).unwrap();
        let p_new = p.to_dtype(md).unwrap();
        let p_new = p_new.affine(1.0 - h.lr * h.weight_decay, 0.0).unwrap();
        let p_new = p_new.sub(&update).unwrap();
        p.assign(&p_new.to_dtype(p.dtype()).unwrap()).unwrap();
    }
}

/// Sets every parameter's gradient to random values of the step `step`: backward of `Σ p ⊙ r`
/// gives `r`.
fn set_grads(ps: &[Tensor], step: u64) {
    for (i, p) in ps.iter().enumerate() {
        p.zero_grad();
        let r = Tensor::randn(
            p.shape().clone(),
            0.0,
            1.0,
            1000 * step + i as u64,
            p.dtype(),
            CPU,
        );
        p.mul(&r.unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    }
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|t| t.to_vec_f64().unwrap()).collect()
}

/// Parameters of different dtypes go through one fused call, with the reference's results bit
/// for bit.
#[test]
fn mixed_dtypes_in_one_step() {
    let mk = || -> Vec<Tensor> {
        [
            (300, DType::F32, 1),
            (301, DType::BF16, 2),
            (302, DType::F64, 3),
        ]
        .into_iter()
        .map(|(n, dt, seed)| {
            let t = Tensor::rand_uniform(n, 0.1, 1.0, seed, dt, CPU).unwrap();
            t.to_var().unwrap()
        })
        .collect()
    };
    let (pa, pb) = (mk(), mk());
    let (ma, va, mb, vb) = (moments(&pa), moments(&pa), moments(&pb), moments(&pb));
    for step in 1..=3 {
        set_grads(&pa, step);
        set_grads(&pb, step);
        adamw_step(&pa, &ma, &va, &hyper(1e-2, 1.0, step)).unwrap();
        reference_step(&pb, &mb, &vb, &hyper(1e-2, 1.0, step));
    }
    for (a, b) in [(&pa, &pb), (&ma, &mb), (&va, &vb)] {
        assert_eq!(values(a), values(b));
    }
}

/// Random tensors of three dtypes (the gradients a norm is taken of).
fn norm_inputs(dev: Device) -> Vec<Tensor> {
    [(1000, DType::F32), (4097, DType::BF16), (333, DType::F64)]
        .into_iter()
        .enumerate()
        .map(|(i, (n, dt))| Tensor::randn(n, 0.0, 0.3, 70 + i as u64, dt, dev).unwrap())
        .collect()
}

/// The host's clipping factor (the trainer's `clip_grad_norm`: PyTorch's `clip_grad_norm_`).
fn host_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// `clip_norm_factor` gives `[sum_of_squares.sqrt(), the host's factor]` bit for bit, whether the
/// norm is above, below or without a limit; NaN for both when a gradient holds a NaN; `[0, 1]`
/// for no tensor.
#[test]
fn clip_norm_factor_is_the_hosts_norm_and_factor() {
    let ts = norm_inputs(CPU);
    let refs: Vec<&Tensor> = ts.iter().collect();
    let norm = engine::sum_of_squares(&refs).unwrap().sqrt();
    assert!(norm > 1.0, "{norm}");
    for max_norm in [0.0, 1.0, norm * 0.5, norm * 2.0] {
        let got = clip_norm_factor(&refs, max_norm, CPU).unwrap();
        assert_eq!(got.dims(), &[2]);
        assert_eq!(got.dtype(), DType::F64);
        let got = got.to_vec_f64().unwrap();
        assert_eq!(got[0].to_bits(), norm.to_bits());
        assert_eq!(
            got[1].to_bits(),
            host_factor(norm, max_norm).to_bits(),
            "max {max_norm}"
        );
    }
    assert!(host_factor(norm, 1.0) < 1.0);
    let bad = Tensor::from_f64(&[1.0, f64::NAN], 2, DType::F32, CPU).unwrap();
    let got = clip_norm_factor(&[&ts[0], &bad], 1.0, CPU).unwrap();
    assert!(got.to_vec_f64().unwrap().iter().all(|x| x.is_nan()));
    let none = clip_norm_factor(&[], 1.0, CPU)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_eq!(none, vec![0.0, 1.0]);
}

/// Three parameters (f32, bf16, f64) and their moments, fresh.
fn scaled_params() -> (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) {
    let ps: Vec<Tensor> = [(300, DType::F32), (301, DType::BF16), (302, DType::F64)]
        .into_iter()
        .enumerate()
        .map(|(i, (n, dt))| {
            let t = Tensor::rand_uniform(n, 0.1, 1.0, 40 + i as u64, dt, CPU).unwrap();
            t.to_var().unwrap()
        })
        .collect();
    let (m, v) = (moments(&ps), moments(&ps));
    (ps, m, v)
}

/// `adamw_step_scaled` with the factor in a tensor equals `adamw_step` with it as `grad_scale`
/// bit for bit; with a NaN or infinite factor it changes no parameter and no moment.
#[test]
fn adamw_step_scaled_applies_its_factor_and_skips_a_non_finite_one() {
    let (pa, ma, va) = scaled_params();
    let (pb, mb, vb) = scaled_params();
    for step in 1..=3 {
        set_grads(&pa, step);
        set_grads(&pb, step);
        let f = [0.37, 1.0, 0.9][step as usize - 1];
        adamw_step(&pa, &ma, &va, &hyper(1e-2, f, step)).unwrap();
        // The factor as the second element of a [norm, factor] pair, as clip_norm_factor gives.
        let pair = Tensor::from_f64(&[5.0, f], 2, DType::F64, CPU).unwrap();
        let scale = pair.narrow(0, 1, 1).unwrap();
        adamw_step_scaled(&pb, &mb, &vb, &hyper(1e-2, 123.0, step), &scale).unwrap();
    }
    for (a, b) in [(&pa, &pb), (&ma, &mb), (&va, &vb)] {
        assert_eq!(values(a), values(b));
    }
    let before = [values(&pb), values(&mb), values(&vb)];
    for bad in [f64::NAN, f64::INFINITY] {
        set_grads(&pb, 9);
        let scale = Tensor::from_f64(&[bad], 1, DType::F64, CPU).unwrap();
        adamw_step_scaled(&pb, &mb, &vb, &hyper(1e-2, 1.0, 4), &scale).unwrap();
        assert_eq!([values(&pb), values(&mb), values(&vb)], before, "{bad}");
    }
    // A scale that is not one f64 is refused.
    let two = Tensor::from_f64(&[1.0, 1.0], 2, DType::F64, CPU).unwrap();
    assert!(adamw_step_scaled(&pb, &mb, &vb, &hyper(1e-2, 1.0, 4), &two).is_err());
    let f32s = Tensor::from_f64(&[1.0], 1, DType::F32, CPU).unwrap();
    assert!(adamw_step_scaled(&pb, &mb, &vb, &hyper(1e-2, 1.0, 4), &f32s).is_err());
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
    let buf = Tensor::rand_uniform([4, n], 0.1, 1.5, 5, dtype, CPU).unwrap();
    let mut ps: Vec<Tensor> = buf.unstack_leaves().unwrap();
    if !stacked {
        ps = ps.iter().map(|p| p.detach().to_var().unwrap()).collect();
    }
    let other = Tensor::rand_uniform(77, 0.1, 1.5, 6, dtype, CPU)
        .unwrap()
        .to_var()
        .unwrap();
    let all: Vec<Tensor> = ps.iter().chain([&other]).cloned().collect();
    let (m, v) = (moments(&all), moments(&all));
    let r = |shape: &[usize], seed: u64| {
        Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, CPU).unwrap()
    };
    for step in 1..=3u64 {
        all.iter().for_each(Tensor::zero_grad);
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
        let h = hyper(1e-2, 0.7, step);
        if fused {
            adamw_step(&all, &m, &v, &h).unwrap();
        } else {
            reference_step(&all, &m, &v, &h);
        }
    }
    let state = values(&all)
        .into_iter()
        .chain(values(&m))
        .chain(values(&v))
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
            let start = Tensor::rand_uniform([4, n], 0.1, 1.5, 5, dtype, CPU)
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

/// Views of one buffer that overlap cannot be stepped together, and nothing is written.
#[test]
fn overlapping_views_are_refused() {
    let buf = Tensor::rand_uniform([2, 10], 0.1, 1.5, 5, DType::F32, CPU).unwrap();
    let mut ps = buf.unstack_leaves().unwrap();
    ps.extend(buf.reshape([1, 20]).unwrap().unstack_leaves().unwrap()); // the whole buffer
    for p in &ps {
        p.sum_all().unwrap().backward().unwrap();
    }
    let before = buf.to_vec_f64().unwrap();
    let (m, v) = (moments(&ps), moments(&ps));
    let err = adamw_step(&ps, &m, &v, &hyper(1e-2, 1.0, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shares its buffer"), "{err}");
    assert_eq!(buf.to_vec_f64().unwrap(), before);
}

/// `engine::sum_of_squares` on the CPU against a plain f64 sum: f32, bf16 and f64 tensors, sizes
/// across the 4096-element chunk, a strided view; nothing gives 0; u32 is refused.
#[test]
fn sum_of_squares_on_the_cpu() {
    let mut ts = Vec::new();
    let mut want = 0.0f64;
    for (k, dt) in [DType::F32, DType::BF16, DType::F64]
        .into_iter()
        .enumerate()
    {
        for (i, n) in [1usize, 4095, 4096, 4097, 20000].into_iter().enumerate() {
            let v: Vec<f64> = (0..n)
                .map(|j| engine::rng::uniform((k * 10 + i) as u64, j as u64) * 2.0 - 1.0)
                .collect();
            let t = Tensor::from_f64(&v, n, dt, Device::Cpu).unwrap();
            want += t.to_vec_f64().unwrap().iter().map(|x| x * x).sum::<f64>();
            ts.push(t);
        }
    }
    let m = Tensor::from_f64(
        &[1.0, -2.0, 3.0, 4.0, 5.0, -6.0],
        [2, 3],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    ts.push(m.t().unwrap().narrow(0, 1, 2).unwrap()); // [-2, 5, 3, -6]
    want += 4.0 + 25.0 + 9.0 + 36.0;
    let refs: Vec<&Tensor> = ts.iter().collect();
    let got = engine::sum_of_squares(&refs).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert_eq!(engine::sum_of_squares(&[]).unwrap(), 0.0);
    let u = Tensor::from_vec(vec![1u32, 2], 2, Device::Cpu).unwrap();
    assert!(engine::sum_of_squares(&[&u]).is_err());
}

/// The parts of an `add_many_into` test: sizes around the 4096-element chunk, one transposed
/// (non-contiguous) source, laid out in a flat buffer with gaps and in shuffled order.
fn add_parts(dt: DType, dev: Device) -> (Tensor, Vec<(usize, Tensor)>) {
    let sizes = [1usize, 31, 4095, 4096, 4097, 9000];
    let mut parts = Vec::new();
    let mut at = 3; // a gap in front
    for (i, &n) in sizes.iter().enumerate() {
        let v: Vec<f64> = (0..n)
            .map(|j| engine::rng::uniform(40 + i as u64, j as u64) * 2.0 - 1.0)
            .collect();
        parts.push((at, Tensor::from_f64(&v, n, dt, dev).unwrap()));
        at += n + 5; // and between parts
    }
    let m: Vec<f64> = (0..6 * 7).map(|j| 0.1 * j as f64 - 2.0).collect();
    let t = Tensor::from_f64(&m, [6, 7], dt, dev).unwrap().t().unwrap();
    parts.push((at, t)); // [7, 6], transposed
    at += 42;
    parts.swap(0, 4);
    let base: Vec<f64> = (0..at + 2)
        .map(|j| engine::rng::uniform(39, j as u64) - 0.5)
        .collect();
    (Tensor::from_f64(&base, at + 2, dt, dev).unwrap(), parts)
}

#[test]
fn add_many_into_equals_an_add_assign_per_part_bit_for_bit() {
    for dt in [DType::F32, DType::BF16, DType::F64] {
        let (dst, parts) = add_parts(dt, CPU);
        let want = dst.copy().unwrap();
        for (off, src) in &parts {
            let n = src.elem_count();
            let view = want
                .narrow(0, *off, n)
                .unwrap()
                .reshape(src.dims())
                .unwrap();
            view.add_assign(src).unwrap();
        }
        let refs: Vec<(usize, &Tensor)> = parts.iter().map(|(o, t)| (*o, t)).collect();
        let before = dst.to_vec_f64().unwrap();
        engine::add_many_into(&dst, &refs).unwrap();
        let got = dst.to_vec_f64().unwrap();
        assert_eq!(got, want.to_vec_f64().unwrap(), "{dt}");
        // Only the parts' runs changed (the gaps kept their values).
        let changed = got.iter().zip(&before).filter(|(a, b)| a != b).count();
        let covered: usize = parts.iter().map(|(_, t)| t.elem_count()).sum();
        assert!(
            changed <= covered && changed > covered / 2,
            "{dt}: {changed} of {covered}"
        );
        assert_eq!(got[..3], before[..3], "{dt}: the gap in front");
    }
    // No part: nothing to do.
    let (dst, _) = add_parts(DType::F32, CPU);
    engine::add_many_into(&dst, &[]).unwrap();
}

#[test]
fn add_many_into_refuses_overlaps_overruns_dtypes_shared_and_strided_buffers() {
    let dst = Tensor::zeros(10, DType::F32, CPU).unwrap();
    let a = Tensor::ones(4, DType::F32, CPU).unwrap();
    let err = |r: engine::Result<()>| r.unwrap_err().to_string();
    assert!(err(engine::add_many_into(&dst, &[(0, &a), (3, &a)])).contains("overlap"));
    assert!(err(engine::add_many_into(&dst, &[(7, &a)])).contains("runs past"));
    let b = Tensor::ones(4, DType::BF16, CPU).unwrap();
    let e = engine::add_many_into(&dst, &[(0, &b)]).unwrap_err();
    assert!(matches!(e, engine::Error::DTypeMismatch { .. }), "{e}");
    let part_of_dst = dst.narrow(0, 0, 4).unwrap();
    assert!(err(engine::add_many_into(&dst, &[(6, &part_of_dst)])).contains("shares"));
    let m = Tensor::zeros([4, 4], DType::F32, CPU).unwrap();
    let strided = m.t().unwrap();
    assert!(err(engine::add_many_into(&strided, &[(0, &a)])).contains("not contiguous"));
    let u = Tensor::from_vec(vec![1u32, 2], 2, CPU).unwrap();
    let uu = Tensor::from_vec(vec![1u32], 1, CPU).unwrap();
    assert!(engine::add_many_into(&u, &[(0, &uu)]).is_err());
    // Nothing was written by the refused calls.
    assert!(dst.to_vec_f64().unwrap().iter().all(|&x| x == 0.0));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::{adamw_step, AdamWHyper, DType, Device, Tensor};
    use testutil::gpu::{device as gpu, rel_err};

    const SIZES: [usize; 20] = [
        1, 2, 31, 32, 33, 255, 256, 257, 511, 513, 1000, 4095, 4096, 4097, 8191, 8193, 12345,
        65536, 70001, 100003,
    ];

    /// Values in ±[lo, lo + 2) (never zero), from `seed`.
    fn vals(n: usize, seed: u64, lo: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = lo + 2.0 * engine::rng::uniform(seed, i);
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    fn tol(d: DType) -> f64 {
        match d {
            DType::F32 => 1e-5,
            DType::BF16 => 1e-2,
            _ => 1e-12,
        }
    }

    /// (dtype, parameter, m, v) of one tensor.
    type State = (DType, Vec<f64>, Vec<f64>, Vec<f64>);

    /// The state of every tensor after 3 steps on `dev`.
    fn run(dev: Device) -> Vec<State> {
        let mut ps = Vec::new();
        let mut dts = Vec::new();
        for (di, dt) in [DType::F32, DType::BF16, DType::F64]
            .into_iter()
            .enumerate()
        {
            for (i, &n) in SIZES.iter().enumerate() {
                let seed = (di * 100 + i) as u64;
                let p = Tensor::from_f64(&vals(n, seed, 0.1), n, dt, dev)
                    .unwrap()
                    .to_var()
                    .unwrap();
                ps.push(p);
                dts.push(dt);
            }
        }
        // One parameter that never gets a gradient.
        let frozen = Tensor::from_f64(&vals(300, 999, 0.1), 300, DType::F32, dev)
            .unwrap()
            .to_var()
            .unwrap();
        ps.insert(7, frozen);
        dts.insert(7, DType::F32);
        // Four parameters that are the slices of one buffer (a MixLoRA layer's stacked expert
        // LoRAs, updated in place in it); the third never gets a gradient either.
        let stacked = Tensor::from_f64(&vals(4 * 4097, 777, 0.1), [4, 4097], DType::F32, dev)
            .unwrap()
            .unstack_leaves()
            .unwrap();
        let no_grad_view = ps.len() + 2;
        dts.extend([DType::F32; 4]);
        ps.extend(stacked);
        let zeros =
            |p: &Tensor| Tensor::zeros(p.shape().clone(), p.dtype().accumulation(), dev).unwrap();
        let ms: Vec<Tensor> = ps.iter().map(zeros).collect();
        let vs: Vec<Tensor> = ps.iter().map(zeros).collect();
        for step in 1..=3u64 {
            for (i, p) in ps.iter().enumerate() {
                p.zero_grad();
                if i == 7 || i == no_grad_view {
                    continue;
                }
                let g = vals(p.elem_count(), 10_000 * step + i as u64, 0.01);
                let g = Tensor::from_f64(&g, p.shape().clone(), p.dtype(), dev).unwrap();
                // backward of Σ p ⊙ g sets the gradient to g.
                p.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            }
            let h = AdamWHyper {
                lr: 3e-3 * step as f64,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: [1.0, 0.42, 1.7][step as usize - 1],
                step,
            };
            adamw_step(&ps, &ms, &vs, &h).unwrap();
        }
        ps.iter()
            .zip(&ms)
            .zip(&vs)
            .zip(dts)
            .map(|(((p, m), v), d)| {
                (
                    d,
                    p.to_vec_f64().unwrap(),
                    m.to_vec_f64().unwrap(),
                    v.to_vec_f64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn adamw_step_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let (want, got) = (run(Device::Cpu), run(dev));
        let mut failures = Vec::new();
        let mut exact = 0;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let dt = w.0;
            for (what, a, b) in [
                ("param", &w.1, &g.1),
                ("exp_avg", &w.2, &g.2),
                ("exp_avg_sq", &w.3, &g.3),
            ] {
                let e = rel_err(a, b);
                if e.is_nan() || e > tol(dt) {
                    failures.push(format!(
                        "tensor {i} ({dt}, {} elements) {what}: rel err {e:e} > {:e}",
                        a.len(),
                        tol(dt)
                    ));
                }
                exact += (a == b) as usize;
            }
        }
        // The parameter without gradient is untouched on both.
        assert_eq!(
            got[7].1,
            vals(300, 999, 0.1)
                .iter()
                .map(|&x| x as f32 as f64)
                .collect::<Vec<_>>()
        );
        assert!(got[7].2.iter().all(|&x| x == 0.0));
        // So is the view without a gradient (the third of the last four).
        let view = &got[got.len() - 2];
        assert_eq!(view.1, want[want.len() - 2].1);
        assert!(view.2.iter().all(|&x| x == 0.0));
        eprintln!("{} tensors × 3 buffers, {exact} bit-identical", want.len());
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn sum_of_squares_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let run = |dev: Device| {
            let mut ts = Vec::new();
            for (di, dt) in [DType::F32, DType::BF16, DType::F64]
                .into_iter()
                .enumerate()
            {
                for (i, &n) in SIZES.iter().enumerate() {
                    let v = vals(n, (di * 100 + i) as u64, 0.1);
                    ts.push(Tensor::from_f64(&v, n, dt, dev).unwrap());
                }
            }
            // A transposed (non-contiguous) view.
            let m = Tensor::from_f64(&vals(77 * 130, 5, 0.1), [77, 130], DType::F32, dev).unwrap();
            ts.push(m.t().unwrap());
            let refs: Vec<&Tensor> = ts.iter().collect();
            engine::sum_of_squares(&refs).unwrap()
        };
        let (want, got) = (run(Device::Cpu), run(dev));
        let err = (got - want).abs() / want;
        eprintln!("sum of squares: cpu {want}, gpu {got}, rel err {err:e}");
        assert!(err <= 1e-12, "rel err {err:e}");
    }

    /// On the GPU, `clip_norm_factor` gives the GPU's `sum_of_squares(..).sqrt()` and the host's
    /// factor of it bit for bit (nothing read back), NaN for a NaN gradient; `adamw_step_scaled`
    /// equals `adamw_step` with that factor bit for bit and skips a step with a NaN one.
    #[test]
    fn device_clipping_matches_the_host_formula() {
        let Some(dev) = gpu() else { return };
        let ts = super::norm_inputs(dev);
        let refs: Vec<&Tensor> = ts.iter().collect();
        let norm = engine::sum_of_squares(&refs).unwrap().sqrt();
        for max_norm in [0.0, norm * 0.5, norm * 2.0] {
            let got = engine::clip_norm_factor(&refs, max_norm, dev).unwrap();
            assert_eq!(got.device(), dev);
            let got = got.to_vec_f64().unwrap();
            assert_eq!(got[0].to_bits(), norm.to_bits());
            let want = super::host_factor(norm, max_norm);
            assert_eq!(got[1].to_bits(), want.to_bits(), "max {max_norm}");
        }
        let bad = Tensor::from_f64(&[1.0, f64::NAN], 2, DType::BF16, dev).unwrap();
        let got = engine::clip_norm_factor(&[&ts[0], &bad], 1.0, dev).unwrap();
        assert!(got.to_vec_f64().unwrap().iter().all(|x| x.is_nan()));
        let none = engine::clip_norm_factor(&[], 1.0, dev).unwrap();
        assert_eq!(none.to_vec_f64().unwrap(), vec![0.0, 1.0]);

        let params = || -> Vec<Tensor> {
            [(5000, DType::F32), (4099, DType::BF16), (77, DType::F64)]
                .into_iter()
                .enumerate()
                .map(|(i, (n, dt))| {
                    let v = vals(n, 500 + i as u64, 0.1);
                    Tensor::from_f64(&v, n, dt, dev).unwrap().to_var().unwrap()
                })
                .collect()
        };
        let zeros = |ps: &[Tensor]| -> Vec<Tensor> {
            ps.iter()
                .map(|p| Tensor::zeros(p.shape().clone(), p.dtype().accumulation(), dev).unwrap())
                .collect()
        };
        let grads = |ps: &[Tensor], step: u64| {
            for (i, p) in ps.iter().enumerate() {
                p.zero_grad();
                let g = vals(p.elem_count(), 900 * step + i as u64, 0.01);
                let g = Tensor::from_f64(&g, p.shape().clone(), p.dtype(), dev).unwrap();
                p.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            }
        };
        let (pa, pb) = (params(), params());
        let (ma, va, mb, vb) = (zeros(&pa), zeros(&pa), zeros(&pb), zeros(&pb));
        for step in 1..=2u64 {
            grads(&pa, step);
            grads(&pb, step);
            let gb: Vec<Tensor> = pb.iter().map(|p| p.grad().unwrap()).collect();
            let grefs: Vec<&Tensor> = gb.iter().collect();
            let pair = engine::clip_norm_factor(&grefs, 0.05, dev).unwrap();
            let f = pair.to_vec_f64().unwrap()[1];
            assert!(f < 1.0, "{f}");
            let h = |scale: f64| AdamWHyper {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                grad_scale: scale,
                step,
            };
            adamw_step(&pa, &ma, &va, &h(f)).unwrap();
            let scale = pair.narrow(0, 1, 1).unwrap();
            engine::adamw_step_scaled(&pb, &mb, &vb, &h(7.0), &scale).unwrap();
        }
        let all = |ts: &[Tensor]| -> Vec<Vec<f64>> {
            ts.iter().map(|t| t.to_vec_f64().unwrap()).collect()
        };
        for (a, b) in [(&pa, &pb), (&ma, &mb), (&va, &vb)] {
            assert_eq!(all(a), all(b));
        }
        let before = [all(&pb), all(&mb), all(&vb)];
        grads(&pb, 7);
        let nan = Tensor::from_f64(&[f64::NAN], 1, DType::F64, dev).unwrap();
        let h = AdamWHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_scale: 1.0,
            step: 3,
        };
        engine::adamw_step_scaled(&pb, &mb, &vb, &h, &nan).unwrap();
        assert_eq!([all(&pb), all(&mb), all(&vb)], before);
    }

    /// `add_many_into` on the GPU (one launch for every part, the sources in f32, bf16 and f64,
    /// a transposed one among them) gives the CPU's values exactly: one rounding on both.
    #[test]
    fn add_many_into_matches_the_cpu_exactly() {
        let Some(dev) = gpu() else { return };
        for dt in [DType::F32, DType::BF16, DType::F64] {
            let run = |dev: Device| {
                let (dst, parts) = super::add_parts(dt, dev);
                let refs: Vec<(usize, &Tensor)> = parts.iter().map(|(o, t)| (*o, t)).collect();
                engine::add_many_into(&dst, &refs).unwrap();
                dst.to_vec_f64().unwrap()
            };
            assert_eq!(run(dev), run(Device::Cpu), "{dt}");
        }
    }
}
