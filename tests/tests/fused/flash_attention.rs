//! Flash attention (`engine::flash_attention`, `engine/src/fused/flash_attention/`): the same
//! values and gradients as `causal_attention` without the `[b, hq, t, s]` probabilities.
//!
//! Against `causal_attention` on random inputs, forward and the gradients of q, k and v under a
//! random output gradient: the shared attention cases of the `ops` tests (offsets, right and
//! left padding, grouped-query heads, packed segments) and cases of this op's own (lengths on
//! and off its 64-query and 64-key blocks, head dims 4, 64 and 128, whole rows of padding,
//! packed rows with a query offset, q, k and v read through transposes of `[b, t, h, d]`), in
//! f64 (1e-12, gradients 1e-11), f32 (1e-5, gradients 1e-4) and bf16 (against the f32
//! composite: 2e-2); rows without a visible key are exactly zero, output and dq. Gradients by
//! central finite differences in f64. The graph keeps no `[b, hq, t, s]` tensor (the CPU memory
//! count of it is in `tests/tests/cpu_memory.rs`). Shape errors as `causal_attention`'s.
//!
//! Parity (module `gpu`): the CUDA kernels against the CPU op, forward and backward, on
//! SmolLM2-135M's heads (d 64) and LLaMA's (d 128), odd lengths, left, random and packed masks,
//! grouped-query heads, q read as the transpose of its projection, bf16 and f32; and the cases
//! without a kernel (d 32, f64), where the op runs `causal_attention` on the GPU.

#[allow(dead_code)]
#[path = "../ops/causal.rs"]
mod causal;

use causal::{cases, visible_rows, Case};
use engine::autograd::saved_buffers;
use engine::{causal_attention, flash_attention, DType, Error, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// The cases of this op on top of the shared ones: block edges, head dims, all-padding rows.
fn flash_cases() -> Vec<Case> {
    vec![
        // Off the block sizes, GQA, left padding that covers all of the second row.
        Case::new(2, 4, 67, 67, 0)
            .gqa(2)
            .head_dim(64)
            .left_pad(|bi| 67 * bi),
        // Two query blocks and three key blocks, a query offset, packed segments.
        Case::new(2, 6, 70, 150, 80)
            .gqa(3)
            .head_dim(4)
            .packed(|bi| vec![40, 50 + 10 * bi, 3, 47]),
        // Head dim 128, one block exactly, right padding.
        Case::new(1, 2, 64, 64, 0).head_dim(128).right_pad(|_| 50),
        // Long packed rows: whole key blocks of other segments are skipped.
        Case::new(2, 4, 200, 200, 0)
            .gqa(4)
            .head_dim(8)
            .packed(|bi| vec![33, 64, 1, 70 - bi, 20]),
        // One query after a long cache (decoding), odd head dim.
        Case::new(2, 3, 1, 131, 130)
            .head_dim(5)
            .left_pad(|bi| 3 * bi),
    ]
}

/// `(output, [dq, dk, dv])` of `flash` or `causal_attention` on `q`, `k`, `v` (q, k, v read as
/// transposes of `[b, t, h, d]` buffers when `strided`) under the output gradient `gout`.
fn run(
    c: &Case,
    flash: bool,
    [q, k, v]: [&Tensor; 3],
    gout: &Tensor,
    strided: bool,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mask = c.mask_tensor();
    let var = |x: &Tensor| {
        if strided {
            // The buffer [b, n, h, d]; the op reads its [b, h, n, d] transpose.
            x.transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .to_var()
                .unwrap()
        } else {
            x.to_var().unwrap()
        }
    };
    let (qv, kv, vv) = (var(q), var(k), var(v));
    let view = |x: &Tensor| {
        if strided {
            x.transpose(1, 2).unwrap()
        } else {
            x.clone()
        }
    };
    let (qa, ka, va) = (view(&qv), view(&kv), view(&vv));
    let out = if flash {
        flash_attention(&qa, &ka, &va, mask.as_ref(), c.q_offset).unwrap()
    } else {
        causal_attention(&qa, &ka, &va, mask.as_ref(), c.q_offset).unwrap()
    };
    assert_eq!(out.dims(), qa.dims());
    out.backward_with_grad(gout).unwrap();
    let grads = [&qv, &kv, &vv]
        .iter()
        .map(|x| {
            let g = x.grad().expect("a gradient");
            vals(&view(&g).contiguous().unwrap())
        })
        .collect();
    (vals(&out), grads)
}

/// Flash attention against `causal_attention` on `c` in `dtype` (bf16: against the composite in
/// f32 on the same bf16-rounded inputs).
fn check_case(n: usize, c: &Case, dtype: DType, (tol, gtol): (f64, f64), strided: bool) {
    let (b, hq, hkv, t, s, d) = (c.b, c.h, c.hkv, c.t, c.s, c.d);
    let seed = 900 + 5 * n as u64;
    let mk = |shape: &[usize], sd| randn(shape, sd).to_dtype(dtype).unwrap();
    let (q, k, v) = (
        mk(&[b, hq, t, d], seed),
        mk(&[b, hkv, s, d], seed + 1),
        mk(&[b, hkv, s, d], seed + 2),
    );
    let gout = mk(&[b, hq, t, d], seed + 3);
    let (got, got_g) = run(c, true, [&q, &k, &v], &gout, strided);
    let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let (want, want_g) = if dtype == DType::BF16 {
        run(
            c,
            false,
            [&wide(&q), &wide(&k), &wide(&v)],
            &wide(&gout),
            strided,
        )
    } else {
        run(c, false, [&q, &k, &v], &gout, strided)
    };
    let name = format!("{c:?} {dtype} strided {strided}");
    let (g, w) = visible_rows(c, hq, d, &got, &want);
    let err = rel_err(&g, &w);
    assert!(err < tol, "{name}: output rel err {err:e}");
    // dq of a query without a visible key is exactly zero too.
    let _ = visible_rows(c, hq, d, &got_g[0], &want_g[0]);
    for (label, (a, r)) in ["dq", "dk", "dv"].iter().zip(got_g.iter().zip(&want_g)) {
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{name}: {label} not finite"
        );
        let err = rel_err(a, r);
        assert!(err < gtol, "{name}: {label} rel err {err:e}");
    }
}

#[test]
fn flash_matches_causal_attention_f64() {
    for (n, c) in cases().iter().chain(&flash_cases()).enumerate() {
        check_case(n, c, DType::F64, (1e-12, 1e-11), n % 2 == 1);
    }
}

#[test]
fn flash_matches_causal_attention_f32() {
    for (n, c) in cases().iter().chain(&flash_cases()).enumerate() {
        check_case(n, c, DType::F32, (1e-5, 1e-4), n % 2 == 0);
    }
}

#[test]
fn flash_matches_causal_attention_bf16() {
    for (n, c) in cases().iter().chain(&flash_cases()).enumerate() {
        check_case(n, c, DType::BF16, (2e-2, 2e-2), n % 3 == 0);
    }
}

/// Head dims of real models (64: SmolLM2, 128: LLaMA-2-7B) at a length that spans several
/// blocks, contiguous and strided.
#[test]
fn flash_matches_causal_attention_real_head_dims() {
    for (n, d) in [64usize, 128].into_iter().enumerate() {
        let c = Case::new(2, 4, 131, 131, 0)
            .gqa(2)
            .head_dim(d)
            .packed(|bi| vec![60 + bi, 50, 19]);
        check_case(100 + n, &c, DType::F32, (1e-5, 1e-4), n == 0);
        check_case(110 + n, &c, DType::F64, (1e-12, 1e-11), n == 1);
    }
}

#[test]
fn grad_flash_attention() {
    let own = flash_cases();
    let small = [&own[1], &own[4]];
    // Not `Case::new(3, 2, 1, 1, 0)`: with one key per row dq is zero, and flash's
    // `D = rowsum(dO ∘ O)` equals `Σ_j P dP` (the composite's) only up to rounding, so its dq
    // is 1e-17 where the finite differences are exactly 0, which the check refuses.
    let shared = cases().into_iter().filter(|c| c.s > 1).take(10);
    for (n, c) in shared.collect::<Vec<_>>().iter().chain(small).enumerate() {
        let (b, hq, hkv, t, s, d) = (c.b, c.h, c.hkv, c.t, c.s, c.d.min(4));
        // Long cases shortened: gradient checks cost one forward per element.
        let (t, s, q_offset) = if s > 64 {
            (t.min(3), s.min(70), (s.min(70) - t.min(3)).min(c.q_offset))
        } else {
            (t, s, c.q_offset)
        };
        let mask = c.mask.as_ref().map(|m| {
            let rows: Vec<u32> = m.chunks(c.s).flat_map(|r| r[..s].to_vec()).collect();
            ids(&rows, &[b, s])
        });
        let seed = 700 + 3 * n as u64;
        check_gradients(
            &format!("flash_attention {c:?}"),
            &[
                randn(&[b, hq, t, d], seed),
                randn(&[b, hkv, s, d], seed + 1),
                randn(&[b, hkv, s, d], seed + 2),
            ],
            |x| flash_attention(&x[0], &x[1], &x[2], mask.as_ref(), q_offset),
        );
    }
    // Strided: [b, t, h, d] buffers read transposed.
    check_gradients(
        "flash_attention transposed",
        &[
            randn(&[2, 3, 4, 4], 26),
            randn(&[2, 3, 2, 4], 27),
            randn(&[2, 3, 2, 4], 28),
        ],
        |x| {
            flash_attention(
                &x[0].transpose(1, 2)?,
                &x[1].transpose(1, 2)?,
                &x[2].transpose(1, 2)?,
                None,
                0,
            )
        },
    );
}

/// What the graph keeps: q, k, v, the output and the log-sum-exp `[b, hq, t]`; nothing of
/// `[b, hq, t, s]`, which `causal_attention` keeps (its probabilities).
#[test]
fn flash_keeps_no_probabilities() {
    let (b, hq, hkv, t, d) = (2, 4, 2, 96, 8);
    let q = randn(&[b, hq, t, d], 1).to_var().unwrap();
    let k = randn(&[b, hkv, t, d], 2).to_var().unwrap();
    let v = randn(&[b, hkv, t, d], 3).to_var().unwrap();
    let probs = b * hq * t * t;
    let big = |out: &Tensor| {
        saved_buffers(out)
            .into_iter()
            .filter(|s| s.shape.elem_count() >= probs)
            .count()
    };
    let flash = flash_attention(&q, &k, &v, None, 0).unwrap();
    let composite = causal_attention(&q, &k, &v, None, 0).unwrap();
    assert!(big(&composite) > 0, "the composite keeps its probabilities");
    assert_eq!(big(&flash), 0, "flash keeps no [b, hq, t, s] tensor");
    // Besides the output itself (the root): q, k, v and the f64 log-sum-exp.
    let kept: usize = saved_buffers(&flash).iter().map(|s| s.bytes).sum();
    let inputs = 8 * (b * hq * t * d + 2 * b * hkv * t * d);
    assert_eq!(kept, inputs + 8 * b * hq * t, "q, k, v and the f64 lse");
}

#[test]
fn flash_attention_errors() {
    let q = randn(&[2, 4, 3, 4], 170);
    let k = randn(&[2, 2, 3, 4], 171);
    let v = randn(&[2, 2, 3, 4], 172);
    assert!(flash_attention(&q, &k, &v, None, 0).is_ok());
    let shape_err = |r: engine::Result<Tensor>| {
        matches!(
            r,
            Err(Error::ShapeMismatch { .. }) | Err(Error::RankMismatch { .. })
        )
    };
    let k3 = randn(&[2, 3, 3, 4], 173);
    assert!(shape_err(flash_attention(&q, &k3, &k3, None, 0)));
    let kd = randn(&[2, 2, 3, 5], 174);
    assert!(shape_err(flash_attention(&q, &kd, &kd, None, 0)));
    let bad = ids(&[1; 4], &[2, 2]);
    assert!(shape_err(flash_attention(&q, &k, &v, Some(&bad), 0)));
    assert!(matches!(
        flash_attention(&q, &k, &v, None, 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        flash_attention(&q, &k.to_dtype(DType::F32).unwrap(), &v, None, 0),
        Err(Error::DTypeMismatch { .. })
    ));
    // Without a gradient to track, no node: the output tracks none.
    let qv = q.to_var().unwrap();
    let out = engine::no_grad(|| flash_attention(&qv, &k, &v, None, 0)).unwrap();
    assert!(!out.tracks_grad());
    assert!(flash_attention(&qv, &k, &v, None, 0).unwrap().tracks_grad());
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU): the CUDA kernels against the CPU
    //! op, forward and backward.
    use super::causal::Mask;
    use engine::{flash_attention, DType, Device, Tensor};
    use testutil::gpu::{scaled_vals, Checker};

    /// `flash_attention` forward and backward: the output, then dq, dk, dv under a random output
    /// gradient.
    fn attention(
        dev: Device,
        dt: DType,
        (b, hq, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
        off: usize,
        mask: &Option<Vec<u32>>,
        transposed_q: bool,
    ) -> engine::Result<Vec<f64>> {
        let qv = scaled_vals(b * hq * t * d, 10, 1.0);
        let (qvar, q) = if transposed_q {
            let var = Tensor::from_f64(&qv, [b, t, hq, d], dt, dev)?.to_var()?;
            let q = var.transpose(1, 2)?;
            (var, q)
        } else {
            let var = Tensor::from_f64(&qv, [b, hq, t, d], dt, dev)?.to_var()?;
            (var.clone(), var)
        };
        let kv = |seed| -> engine::Result<Tensor> {
            let x = scaled_vals(b * hkv * s * d, seed, 1.0);
            Tensor::from_f64(&x, [b, hkv, s, d], dt, dev)?.to_var()
        };
        let (k, v) = (kv(11)?, kv(12)?);
        let m = mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.clone(), [b, s], dev))
            .transpose()?;
        let out = flash_attention(&q, &k, &v, m.as_ref(), off)?;
        let gv = scaled_vals(b * hq * t * d, 13, 1.0);
        let g = Tensor::from_f64(&gv, [b, hq, t, d], dt, dev)?;
        out.backward_with_grad(&g)?;
        let mut r = out.contiguous()?.to_vec_f64()?;
        for x in [&qvar, &k, &v] {
            r.extend(x.grad().expect("a gradient").contiguous()?.to_vec_f64()?);
        }
        Ok(r)
    }

    #[test]
    fn flash_attention_forward_backward_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        // ((b, hq, hkv, t, s, d), q_offset, mask, q transposed)
        let cases = [
            ((4, 9, 3, 128, 128, 64), 0, Mask::Left, true), // SmolLM2-135M, left padding
            ((2, 9, 3, 512, 512, 64), 0, Mask::Packed, true), // packed rows of 512
            ((1, 4, 2, 257, 257, 64), 0, Mask::Random, false),
            ((1, 4, 4, 255, 255, 128), 0, Mask::None, true),
            ((2, 8, 8, 130, 130, 128), 0, Mask::Packed, false),
            ((2, 6, 2, 5, 1000, 64), 995, Mask::Random, false), // decoding after a long cache
            ((2, 2, 1, 1, 1, 64), 0, Mask::None, false),
            // Head dim 32: no kernel, the op runs `causal_attention` on the GPU.
            ((1, 4, 2, 70, 70, 32), 0, Mask::Packed, true),
        ];
        // f64: no kernel either (the composite on the GPU).
        let f64_cases = [((1, 4, 2, 70, 70, 64), 0, Mask::Left, true)];
        let runs = [DType::F32, DType::BF16]
            .into_iter()
            .flat_map(|dt| cases.map(|c| (dt, c)))
            .chain(f64_cases.map(|c| (DType::F64, c)));
        for (dt, (dims, off, mk, tq)) in runs {
            let m = mk.values(dims.0, dims.4);
            c.case(
                &format!("flash_attention fwd+bwd {dims:?} off {off} {mk:?} q^T {tq}"),
                dt,
                |dev| attention(dev, dt, dims, off, &m, tq),
            );
        }
        c.finish();
    }
}

/// The tiny LLaMA with MixLoRA adapters trains the same with either attention: logits and
/// every adapter gradient in f64, on packed rows with padding (the model's `[B, T, H, D]`
/// projections read in place by flash attention).
#[test]
fn model_with_flash_attention_matches_composite() {
    use model::{AdapterConfig, AttentionImpl, Llama};
    let cfg = testutil::tiny_llama_config();
    let (b, t) = (2, 9);
    let x = ids(&testutil::rand_ids(b * t, cfg.vocab_size, 5), &[b, t]);
    let mask = ids(
        &[1, 1, 1, 2, 2, 2, 2, 3, 0, 1, 1, 1, 1, 1, 2, 2, 0, 0],
        &[b, t],
    );
    let run = |imp: AttentionImpl| {
        let mut m = Llama::random(cfg.clone(), 7, DType::F64, engine::Device::Cpu).unwrap();
        m.add_adapters(&AdapterConfig::mixlora_default(), 1)
            .unwrap();
        m.set_attention_impl(imp);
        let out = m.forward_train(&x, Some(&mask), None).unwrap();
        let r = randn(out.logits.dims(), 9);
        out.logits
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads: Vec<f64> = m
            .trainable_params()
            .iter()
            .flat_map(|(_, p)| p.grad().map_or_else(Vec::new, |g| vals(&g)))
            .collect();
        (vals(&out.logits), grads)
    };
    let (lc, gc) = run(AttentionImpl::Composite);
    let (lf, gf) = run(AttentionImpl::Flash);
    assert!(gc.iter().any(|&g| g != 0.0), "some adapter gradient");
    let err = rel_err(&lf, &lc);
    assert!(err < 1e-12, "logits rel err {err:e}");
    let err = rel_err(&gf, &gc);
    assert!(err < 1e-11, "adapter gradients rel err {err:e}");
}
