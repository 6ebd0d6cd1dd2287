//! The grouped-expert unit (`engine::fused::moe_grouped`) on the CPU, the reference of the CUDA
//! kernels: `moe_group` (with `moe_invert_perm`), `moe_permute`, `moe_combine` and
//! `grouped_matmul` each against a straightforward reference built from plain ops or loops, on
//! random inputs (experts with no token, N not a multiple of anything, k = 1 and 2, E = 8, ties),
//! with their typed errors and their gradients by f64 finite differences; then (module `gpu`)
//! the CPU ↔ CUDA parity of those primitives (values and gradients) and of the grouped MixLoRA
//! FFN built on them.
//!
//! Parity: each case builds the same random inputs (never zeros) on both devices and compares by
//! relative error ‖gpu − cpu‖ / ‖cpu‖: f32 ≤ 1e-5, bf16 ≤ 1e-2, f64 ≤ 1e-10; u32 results (perm,
//! offsets, inverse) must be equal; NaN never passes. Sizes are and are not multiples of the
//! kernels' blocks (256 threads, 256-slot tiles, 256×16 and 64×64 output tiles). Without a GPU
//! (or without the `cuda` feature) the tests print why they skip and pass.

use engine::{DType, Error, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// Pseudo-random ids in `0..size`, seeded.
fn rand_ids(n: usize, size: u32, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((engine::rng::uniform(seed, i) * size as f64) as u32).min(size - 1))
        .collect()
}

/// `k` distinct experts per token drawn from `pool` (so experts outside it get no token).
fn rand_choices(n: usize, k: usize, pool: &[u32], seed: u64) -> Vec<u32> {
    let mut out = Vec::with_capacity(n * k);
    for t in 0..n {
        let mut row: Vec<u32> = Vec::new();
        let mut i = 0u64;
        while row.len() < k {
            let c = pool[rand_ids(1, pool.len() as u32, seed ^ ((t as u64) << 16) ^ i)[0] as usize];
            if !row.contains(&c) {
                row.push(c);
            }
            i += 1;
        }
        out.extend(row);
    }
    out
}

/// Stable sort of the slots by expert, and the offsets, by hand.
fn group_reference(ids: &[u32], e: usize) -> (Vec<u32>, Vec<u32>) {
    let mut perm: Vec<u32> = (0..ids.len() as u32).collect();
    perm.sort_by_key(|&p| (ids[p as usize].min(e as u32), p));
    let offsets = (0..=e)
        .map(|x| ids.iter().filter(|&&i| (i as usize) < x).count() as u32)
        .collect();
    (perm, offsets)
}

#[test]
fn group_is_a_stable_sort_by_expert() {
    for (n, k, pool) in [
        (13, 1, vec![0, 1, 2, 3, 4, 5, 6, 7]),
        (13, 2, vec![1, 3, 4, 6]), // experts 0, 2, 5, 7 get no token
        (300, 2, vec![0, 1, 2, 3, 4, 5, 6, 7]),
        (1, 2, vec![7, 2]),
        (257, 1, vec![5]),
    ] {
        let v = rand_choices(n, k, &pool, 3 + n as u64);
        let (perm, off) = ids(&v, &[n, k]).moe_group(8).unwrap();
        let (rp, ro) = group_reference(&v, 8);
        assert_eq!(perm.to_vec_u32().unwrap(), rp, "n={n} k={k}");
        assert_eq!(off.to_vec_u32().unwrap(), ro, "n={n} k={k}");
        assert_eq!(off.dims(), [9]);
        let inv = perm.moe_invert_perm().unwrap().to_vec_u32().unwrap();
        for (q, &p) in rp.iter().enumerate() {
            assert_eq!(inv[p as usize], q as u32);
        }
    }
}

#[test]
fn group_puts_out_of_range_ids_last() {
    let v = [3, 9, 0, 8, 3, 1];
    let (perm, off) = ids(&v, &[3, 2]).moe_group(4).unwrap();
    assert_eq!(perm.to_vec_u32().unwrap(), vec![2, 5, 0, 4, 1, 3]);
    assert_eq!(off.to_vec_u32().unwrap(), vec![0, 1, 2, 2, 4]);
    let (perm, off) = ids(&[], &[0, 2]).moe_group(4).unwrap();
    assert_eq!(perm.dims(), [0]);
    assert_eq!(off.to_vec_u32().unwrap(), vec![0; 5]);
}

#[test]
fn permute_and_combine_match_index_ops() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for (n, k, h) in [(13, 2, 5), (7, 1, 3), (40, 2, 33)] {
            let v = rand_choices(n, k, &[0, 2, 3, 6, 7], 9 + n as u64);
            let (perm, _) = ids(&v, &[n, k]).moe_group(8).unwrap();
            let pv = perm.to_vec_u32().unwrap();
            let x = randn(&[n, h], 4).to_dtype(dtype).unwrap();
            let xs = x.moe_permute(&perm, k).unwrap();
            let tok: Vec<u32> = pv.iter().map(|&p| p / k as u32).collect();
            let want = x.index_select(&ids(&tok, &[n * k]), 0).unwrap();
            assert_eq!(f64s(&xs), f64s(&want), "{dtype} permute");
            // combine: out[t] = Σ_j w[t, j] y[pos(t·k + j)].
            let y = randn(&[n * k, h], 5).to_dtype(dtype).unwrap();
            let w = randn(&[n, k], 6);
            let out = y.moe_combine(&perm, &w).unwrap();
            assert_eq!(out.dtype(), dtype);
            let (yv, wv) = (f64s(&y), f64s(&w));
            let mut want = vec![0.0; n * h];
            for (q, &p) in pv.iter().enumerate() {
                let t = p as usize / k;
                for c in 0..h {
                    want[t * h + c] += wv[p as usize] * yv[q * h + c];
                }
            }
            let tol = match dtype {
                DType::F64 => 1e-14,
                DType::F32 => 1e-6,
                _ => 1e-2,
            };
            assert!(rel_err(&f64s(&out), &want) < tol, "{dtype} combine");
        }
    }
}

#[test]
fn grad_permute_and_combine() {
    for (n, k, h) in [(7, 2, 3), (5, 1, 4)] {
        let v = rand_choices(n, k, &[1, 4, 5], 31 + n as u64);
        let (perm, _) = ids(&v, &[n, k]).moe_group(8).unwrap();
        check_gradients("moe_permute", &[randn(&[n, h], 1)], |x| {
            x[0].moe_permute(&perm, k)
        });
        check_gradients(
            "moe_combine",
            &[randn(&[n * k, h], 2), randn(&[n, k], 3)],
            |x| x[0].moe_combine(&perm, &x[1]),
        );
    }
}

/// `y[seg e] = x[seg e] · w[e]ᵀ`, by hand.
fn gmm_reference(x: &[f64], w: &[f64], off: &[u32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for e in 0..off.len() - 1 {
        for r in off[e] as usize..off[e + 1] as usize {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] * w[(e * n + c) * k + i]).sum();
            }
        }
    }
    y
}

#[test]
fn grouped_matmul_matches_per_segment_matmuls() {
    // Segments with empty experts (first, middle, last) and rows outside every segment.
    for (m, k, n, off) in [
        (13, 5, 3, vec![0, 0, 4, 4, 9, 9, 10, 13, 13]),
        (37, 16, 40, vec![0, 5, 6, 6, 20, 30, 31, 37, 37]),
        (20, 33, 16, vec![2, 2, 2, 2, 2, 2, 2, 2, 17]),
    ] {
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let x = randn(&[m, k], 1).to_dtype(dtype).unwrap();
            let w = randn(&[8, n, k], 2).to_dtype(dtype).unwrap();
            let o = ids(&off, &[9]);
            let y = x.grouped_matmul(&w, &o).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[m, n][..], dtype));
            let want = gmm_reference(&f64s(&x), &f64s(&w), &off, m, k, n);
            let tol = match dtype {
                DType::F64 => 1e-14,
                DType::F32 => 1e-6,
                _ => 1e-2,
            };
            assert!(rel_err(&f64s(&y), &want) < tol, "{dtype} m={m}");
        }
    }
}

#[test]
fn grouped_matmul_errors() {
    let x = randn(&[6, 4], 1);
    let w = randn(&[3, 2, 4], 2);
    let bad_k = randn(&[3, 2, 5], 2);
    let off = ids(&[0, 2, 4, 6], &[4]);
    assert!(x.grouped_matmul(&w, &off).is_ok());
    assert!(matches!(
        x.grouped_matmul(&bad_k, &off),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.grouped_matmul(&w, &ids(&[0, 2, 6], &[3])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.grouped_matmul(&w.to_dtype(DType::F32).unwrap(), &off),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(x.grouped_matmul(&w, &ids(&[0, 4, 2, 6], &[4])).is_err());
}

#[test]
fn grad_grouped_matmul() {
    for (m, k, n, off) in [
        (9, 4, 3, vec![0, 0, 3, 3, 7, 9]),
        (6, 2, 5, vec![0, 1, 1, 6, 6, 6]),
        (7, 3, 2, vec![1, 3, 3, 5, 5, 6]),
    ] {
        let o = ids(&off, &[6]);
        check_gradients(
            "grouped_matmul",
            &[randn(&[m, k], 1), randn(&[5, n, k], 2)],
            |v| v[0].grouped_matmul(&v[1], &o),
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::{DType, Device, Tensor};
    use model::adapters::{
        ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn,
    };
    use testutil::gpu::{device as gpu, rel_err, serial, tol};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];

    /// Deterministic values in ±[0.1, 2.1) (never zero).
    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = 0.1 + 2.0 * engine::rng::uniform(seed, i);
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    fn ids_in(n: usize, pool: &[u32], seed: u64) -> Vec<u32> {
        (0..n as u64)
            .map(|i| {
                let j = (engine::rng::uniform(seed, i) * pool.len() as f64) as usize;
                pool[j.min(pool.len() - 1)]
            })
            .collect()
    }

    fn t(v: &[f64], shape: &[usize], dtype: DType, dev: Device) -> Tensor {
        Tensor::from_f64(v, shape.to_vec(), dtype, dev).unwrap()
    }

    fn u(v: &[u32], shape: &[usize], dev: Device) -> Tensor {
        Tensor::from_slice(v, shape.to_vec(), dev).unwrap()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_vec_f64().unwrap()
    }

    /// Compares named float outputs (CPU first) within `tol`; collects failures.
    fn check(fails: &mut Vec<String>, what: &str, want: &[f64], got: &[f64], tol: f64) {
        assert!(
            want.iter().any(|&x| x != 0.0) || want.is_empty(),
            "{what}: the reference is all zeros (a useless check)"
        );
        let e = rel_err(want, got);
        if e.is_nan() || e > tol {
            fails.push(format!("{what}: relative error {e:.3e} > {tol:.0e}"));
        }
    }

    fn done(fails: Vec<String>) {
        assert!(fails.is_empty(), "{}", fails.join("\n"));
    }

    #[test]
    fn group_perm_and_offsets_are_equal() {
        let _s = serial();
        let Some(g) = gpu() else { return };
        let all: Vec<u32> = (0..8).collect();
        let wide: Vec<u32> = (0..64).collect();
        let cases: Vec<(usize, usize, usize, Vec<u32>)> = vec![
            (1, 2, 8, all.clone()),
            (128, 2, 8, all.clone()),  // 256 slots: one full tile
            (129, 2, 8, all.clone()),  // 258 slots
            (255, 1, 8, vec![2, 5]),   // experts with no token
            (5000, 2, 8, all.clone()), // many tiles, several scan chunks
            (3000, 4, 64, wide),
            (777, 2, 8, vec![3]),        // one expert takes everything
            (300, 2, 8, vec![1, 9, 40]), // ids ≥ E go last
            (20000, 2, 8, all),
        ];
        for (n, k, e, pool) in cases {
            let v = ids_in(n * k, &pool, n as u64 + e as u64);
            let run = |dev: Device| {
                let (perm, off) = u(&v, &[n, k], dev).moe_group(e).unwrap();
                let inv = perm.moe_invert_perm().unwrap();
                (
                    perm.to_vec_u32().unwrap(),
                    off.to_vec_u32().unwrap(),
                    inv.to_vec_u32().unwrap(),
                )
            };
            let (c, gg) = (run(Device::Cpu), run(g));
            assert_eq!(c.0, gg.0, "perm n={n} k={k} e={e}");
            assert_eq!(c.1, gg.1, "offsets n={n} k={k} e={e}");
            assert_eq!(c.2, gg.2, "inverse n={n} k={k} e={e}");
        }
    }

    #[test]
    fn permute_and_combine_values_and_gradients() {
        let _s = serial();
        let Some(g) = gpu() else { return };
        let mut fails = Vec::new();
        for dtype in FLOATS {
            for (n, k, h) in [(1, 2, 1), (255, 2, 33), (256, 1, 256), (300, 2, 1000)] {
                let v = ids_in(n * k, &[0, 1, 3, 4, 6], 7 + n as u64);
                let (xv, yv, wv) = (vals(n * h, 1), vals(n * k * h, 2), vals(n * k, 3));
                let (r1, r2) = (vals(n * k * h, 4), vals(n * h, 5));
                let run = |dev: Device| {
                    let (perm, _) = u(&v, &[n, k], dev).moe_group(8).unwrap();
                    let x = t(&xv, &[n, h], dtype, dev).to_var().unwrap();
                    let y = t(&yv, &[n * k, h], dtype, dev).to_var().unwrap();
                    let w = t(&wv, &[n, k], DType::F32.max_with(dtype), dev)
                        .to_var()
                        .unwrap();
                    let xs = x.moe_permute(&perm, k).unwrap();
                    let out = y.moe_combine(&perm, &w).unwrap();
                    let loss = xs
                        .mul(&t(&r1, &[n * k, h], dtype, dev))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .add(
                            &out.mul(&t(&r2, &[n, h], dtype, dev))
                                .unwrap()
                                .sum_all()
                                .unwrap()
                                .to_dtype(DType::F64)
                                .unwrap(),
                        )
                        .unwrap();
                    loss.backward().unwrap();
                    [
                        f64s(&xs),
                        f64s(&out),
                        f64s(&x.grad().unwrap()),
                        f64s(&y.grad().unwrap()),
                        f64s(&w.grad().unwrap()),
                    ]
                };
                let (c, gg) = (run(Device::Cpu), run(g));
                for (i, name) in ["permute", "combine", "dx", "dy", "dw"].iter().enumerate() {
                    let what = format!("{name} [{dtype}] n={n} k={k} h={h}");
                    check(&mut fails, &what, &c[i], &gg[i], tol(dtype));
                }
            }
        }
        done(fails);
    }

    /// Offsets over `m` rows for 8 experts with empty segments (first, middle and last).
    fn offsets(m: usize) -> Vec<u32> {
        let cut = |f: f64| ((m as f64) * f) as u32;
        vec![
            0,
            0,
            cut(0.2),
            cut(0.2),
            cut(0.55),
            cut(0.6),
            cut(0.97),
            m as u32,
            m as u32,
        ]
    }

    #[test]
    fn grouped_matmul_values_and_gradients() {
        let _s = serial();
        let Some(g) = gpu() else { return };
        let mut fails = Vec::new();
        // (m, K, N): LoRA A shapes (N = r = 16, K = H), LoRA B shapes (K = 16, N = I), the
        // general tile, and sizes off every tile multiple.
        let shapes = [
            (512, 256, 16),
            (1000, 4096, 16),
            (257, 40, 16),
            (300, 16, 2000),
            (64, 16, 64),
            (513, 70, 90),
            (1, 3, 5),
        ];
        for dtype in FLOATS {
            for (m, kk, nn) in shapes {
                let off = offsets(m);
                let (xv, wv, rv) = (vals(m * kk, 1), vals(8 * nn * kk, 2), vals(m * nn, 3));
                let run = |dev: Device| {
                    let x = t(&xv, &[m, kk], dtype, dev).to_var().unwrap();
                    let w = t(&wv, &[8, nn, kk], dtype, dev).to_var().unwrap();
                    let y = x.grouped_matmul(&w, &u(&off, &[9], dev)).unwrap();
                    y.mul(&t(&rv, &[m, nn], dtype, dev))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    [f64s(&y), f64s(&x.grad().unwrap()), f64s(&w.grad().unwrap())]
                };
                let (c, gg) = (run(Device::Cpu), run(g));
                for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
                    let what = format!("grouped_matmul {name} [{dtype}] m={m} K={kk} N={nn}");
                    check(&mut fails, &what, &c[i], &gg[i], tol(dtype));
                }
            }
        }
        done(fails);
    }

    /// The grouped MixLoRA FFN on the GPU against the CPU (output and every gradient), with a
    /// base in `base` dtype and f32 adapters.
    #[test]
    fn grouped_mixlora_matches_cpu() {
        let _s = serial();
        let Some(g) = gpu() else { return };
        let mut fails = Vec::new();
        for base in [DType::F32, DType::BF16] {
            for (n, h, i, k, r) in [
                (37, 64, 96, 2, 16),
                (256, 128, 300, 2, 16),
                (300, 40, 70, 1, 4),
            ] {
                let e = 8;
                let ad = base.accumulation();
                let mut shapes = vec![vec![n, h], vec![e, h], vec![i, h], vec![i, h], vec![h, i]];
                for _ in 0..e {
                    for (a, b) in [(h, i), (h, i), (i, h)] {
                        shapes.push(vec![r, a]);
                        shapes.push(vec![b, r]);
                    }
                }
                let data: Vec<Vec<f64>> = shapes
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        let scale = if j < 2 { 1.0 } else { 0.2 };
                        vals(s.iter().product(), 50 + j as u64)
                            .iter()
                            .map(|v| v * scale)
                            .collect()
                    })
                    .collect();
                let rv = vals(n * h, 9);
                let run = |dev: Device| {
                    let tt = |j: usize, d: DType| t(&data[j], &shapes[j], d, dev);
                    let x = tt(0, base).to_var().unwrap();
                    let router = tt(1, ad).to_var().unwrap();
                    let w: Vec<Tensor> = (2..5).map(|j| tt(j, base)).collect();
                    let mut vars = vec![router.clone()];
                    let experts = (0..e)
                        .map(|ex| {
                            let mut l = |p: usize| {
                                let j = 5 + 6 * ex + 2 * p;
                                let (a, b) =
                                    (tt(j, ad).to_var().unwrap(), tt(j + 1, ad).to_var().unwrap());
                                vars.push(a.clone());
                                vars.push(b.clone());
                                Some(LoraLinear::new(a, b, 2.0, 0.0))
                            };
                            ExpertLora {
                                gate: l(0),
                                up: l(1),
                                down: l(2),
                            }
                        })
                        .collect();
                    let ffn = MixLoraFfn {
                        router: Router {
                            weight: router,
                            routing: Routing::TopK(k),
                        },
                        experts,
                    };
                    let shared = SharedFfn {
                        gate: &engine::FrozenWeight::from(w[0].clone()),
                        up: &engine::FrozenWeight::from(w[1].clone()),
                        down: &engine::FrozenWeight::from(w[2].clone()),
                    };
                    let (y, route) = ffn.forward(&x, shared, MoeImpl::Grouped, None).unwrap();
                    let loss = y
                        .mul(&t(&rv, &[n, h], base, dev))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_dtype(ad)
                        .unwrap()
                        .add(&route.probs.sqr().unwrap().sum_all().unwrap())
                        .unwrap();
                    loss.backward().unwrap();
                    let mut out = vec![f64s(&y), f64s(&x.grad().unwrap())];
                    out.extend(vars.iter().map(|v| f64s(&v.grad().unwrap())));
                    out
                };
                let (c, gg) = (run(Device::Cpu), run(g));
                for (j, (a, b)) in c.iter().zip(&gg).enumerate() {
                    let what =
                        format!("grouped mixlora [{base}] n={n} h={h} i={i} k={k} output/grad {j}");
                    check(&mut fails, &what, a, b, tol(base));
                }
            }
        }
        done(fails);
    }

    /// f32 for f32/bf16 data, f64 for f64: the weights' dtype in `moe_combine`.
    trait AccOf {
        fn max_with(self, d: DType) -> DType;
    }
    impl AccOf for DType {
        fn max_with(self, d: DType) -> DType {
            if d == DType::F64 {
                DType::F64
            } else {
                self
            }
        }
    }
}
