//! The LoRA projection unit (`engine::fused::lora`): the f64 finite-difference gradient checks of
//! `Tensor::lora_add` and `Tensor::linear_lora` and their equality with the composite they
//! replace, then (module `gpu`) the CPU ↔ CUDA parity of the unit's primitives and ops.
//!
//! The fused LoRA ops `Tensor::lora_add` and `Tensor::linear_lora` (the base matmul inside the op)
//! against the composite they replace (`x Wᵀ + LoraLinear::delta`: cast, dropout, two matmuls,
//! scale, cast back, add): values and every gradient (x, A, B, and W when it is trainable) in f64
//! (1e-12), f32 (1e-5) and on a bf16 base (1e-2), with and without dropout (the mask must be the
//! same one), x contiguous and a non-contiguous view, row counts that are not multiples of the
//! CUDA tiles; finite differences of both ops in f64; that `linear_lora` keeps no `[M, out]`
//! tensor on the tape; typed errors for bad shapes and dtypes. Under a dropout key K
//! (`engine::set_dropout_key`) seed S gives seed S ^ K's output and gradients bit for bit.
//!
//! Parity: the primitives (`codes`, `expand_add`, `grad_codes`, `grad_a`, `grad_x`), `dropped_product`
//! (against an f64 reference), and of `Tensor::lora_add` and `Tensor::linear_lora` forward and
//! backward, on f32, bf16 (f32 adapter) and f64, r = 8, 16 and 64, with and without dropout (the
//! mask must be the same bits), x contiguous and transposed, sizes that are and are not multiples
//! of the kernels' tiles (16/32 rows, 128/256 columns). The CPU is the reference; relative error
//! ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes.
//!
//! Without a GPU (or without the `cuda` feature) the tests print why they skip and pass.

use engine::{DType, Device, Tensor};
use model::adapters::lora::linear;
use model::adapters::{lora_linear, LoraLinear};
use testutil::{bits, check_gradients, randn, rel_err, DropoutKey};

/// Random values (standard normal × `s`) of `shape` in `dtype`.
fn rnd(shape: &[usize], s: f64, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, s, seed, dtype, Device::Cpu).unwrap()
}

fn adapter(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One case: `lead` leading dims, `(n_in, n_out, r)`, dropout, and whether x is a transposed
/// (non-contiguous) view. Returns the relative errors of (out, dx, dA, dB, dW) of the fused ops
/// (the worse of the two) against the composite.
fn compare(
    base: DType,
    lead: &[usize],
    (n_in, n_out, r): (usize, usize, usize),
    dropout: Option<(f64, u64)>,
    transposed: bool,
) -> [f64; 5] {
    let ad = adapter(base);
    let m: usize = lead.iter().product();
    // x: a leaf of [m, in] or of [in, m] (then viewed transposed), in the base dtype.
    let x_leaf = if transposed {
        rnd(&[n_in, m], 1.0, 1, base)
    } else {
        rnd(&[m, n_in], 1.0, 1, base)
    };
    let w = rnd(&[n_out, n_in], 0.3, 2, base);
    let a0 = rnd(&[r, n_in], 0.4, 3, ad);
    let b0 = rnd(&[n_out, r], 0.4, 4, ad);
    let gout = {
        let mut d = lead.to_vec();
        d.push(n_out);
        rnd(&d, 1.0, 5, base)
    };
    let scale = 1.75;
    // mode 0: the composite, 1: `lora_add` on the base output, 2: `linear_lora`.
    let run = |mode: u8| -> Vec<Vec<f64>> {
        let xl = x_leaf.to_var().unwrap();
        let (a, b) = (a0.to_var().unwrap(), b0.to_var().unwrap());
        let wv = w.to_var().unwrap(); // trainable here, so that dW is compared too
        let x = if transposed {
            xl.t().unwrap()
        } else {
            xl.clone()
        };
        let mut d = lead.to_vec();
        d.push(n_in);
        let x = x.reshape(d).unwrap();
        let l = LoraLinear::new(a.clone(), b.clone(), scale, dropout.map_or(0.0, |d| d.0));
        let seed = dropout.map(|d| d.1);
        let out = match mode {
            0 => linear(&x, &wv)
                .unwrap()
                .add(&l.delta(&x, seed).unwrap())
                .unwrap(),
            1 => linear(&x, &wv)
                .unwrap()
                .lora_add(&x, &a, &b, scale, dropout)
                .unwrap(),
            _ => x.linear_lora(&wv, &a, &b, scale, dropout).unwrap(),
        };
        assert_eq!(out.dtype(), base);
        out.backward_with_grad(&gout).unwrap();
        vec![
            out.to_vec_f64().unwrap(),
            xl.grad().unwrap().to_vec_f64().unwrap(),
            a.grad().unwrap().to_vec_f64().unwrap(),
            b.grad().unwrap().to_vec_f64().unwrap(),
            wv.grad().unwrap().to_vec_f64().unwrap(),
        ]
    };
    let c = run(0);
    let (f1, f2) = (run(1), run(2));
    [0, 1, 2, 3, 4].map(|i| rel_err(&f1[i], &c[i]).max(rel_err(&f2[i], &c[i])))
}

/// Leading dims and `(in, out, r)`.
type Case = (&'static [usize], (usize, usize, usize));

fn check(base: DType, tol: f64) {
    let shapes: &[Case] = &[
        (&[1], (7, 5, 3)),
        (&[37], (20, 12, 4)),
        (&[2, 19], (33, 17, 8)),
        (&[300], (576, 96, 16)),
    ];
    for &(lead, dims) in shapes {
        for dropout in [None, Some((0.3, 99)), Some((0.05, 7))] {
            for transposed in [false, true] {
                let e = compare(base, lead, dims, dropout, transposed);
                let ok = e.iter().all(|&v| v <= tol);
                assert!(
                    ok,
                    "{base} lead {lead:?} dims {dims:?} dropout {dropout:?} transposed \
                     {transposed}: rel err (out, dx, dA, dB, dW) = {e:?} > {tol}"
                );
            }
        }
    }
}

#[test]
fn fused_equals_composite_f64() {
    check(DType::F64, 1e-12);
}

#[test]
fn fused_equals_composite_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn fused_equals_composite_bf16_base() {
    check(DType::BF16, 1e-2);
}

/// The mask is exactly `x.to_dtype(adapter).dropout(p, seed, true)`'s: with `A` = identity rows
/// the codes are the dropped inputs themselves.
#[test]
fn dropout_mask_is_the_dropout_ops() {
    let (m, n) = (23, 6);
    let x = rnd(&[m, n], 1.0, 11, DType::F32);
    let eye = Tensor::from_vec(
        (0..n * n)
            .map(|i| if i / n == i % n { 1.0f32 } else { 0.0 })
            .collect(),
        [n, n],
        Device::Cpu,
    )
    .unwrap();
    let y = Tensor::zeros([m, n], DType::F32, Device::Cpu).unwrap();
    let out = y.lora_add(&x, &eye, &eye, 1.0, Some((0.4, 5))).unwrap();
    let want = x.dropout(0.4, 5, true).unwrap();
    assert_eq!(out.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    assert!(out.to_vec_f32().unwrap().contains(&0.0));
}

/// Under the dropout key K (`engine::set_dropout_key`) the fused ops with dropout seed S give
/// bit for bit what seed S ^ K gives under key 0: the output and the gradients of x, A and B of
/// `lora_add` and `linear_lora`, on f64, f32 and a bf16 base, below and past the CPU's parallel
/// threshold (M·in ≥ 2^14); and not what seed S gives. Keying twice (forward or backward) would
/// XOR the key back out, keying once in the forward only would change the gradients.
#[test]
fn dropout_key_is_xored_into_the_seed() {
    const KEY: u64 = 0x2545_F491_4F6C_DD1D;
    const SEED: u64 = 99;
    for base in [DType::F64, DType::F32, DType::BF16] {
        let ad = adapter(base);
        for (m, n_in, n_out, r) in [(23, 40, 24, 8), (70, 300, 16, 4)] {
            for linear in [false, true] {
                // The bits of out, dx, dA, dB with the dropout seed `seed`.
                let run = |seed: u64| -> Vec<Vec<u64>> {
                    let x = rnd(&[m, n_in], 1.0, 1, base).to_var().unwrap();
                    let w = rnd(&[n_out, n_in], 0.3, 2, base);
                    let a = rnd(&[r, n_in], 0.4, 3, ad).to_var().unwrap();
                    let b = rnd(&[n_out, r], 0.4, 4, ad).to_var().unwrap();
                    let drop = Some((0.3, seed));
                    let out = if linear {
                        x.linear_lora(&w, &a, &b, 0.8, drop).unwrap()
                    } else {
                        let y = x.matmul(&w.t().unwrap()).unwrap();
                        y.lora_add(&x, &a, &b, 0.8, drop).unwrap()
                    };
                    out.backward_with_grad(&rnd(&[m, n_out], 1.0, 5, base))
                        .unwrap();
                    let g = |t: &Tensor| bits(&t.grad().unwrap());
                    vec![bits(&out), g(&x), g(&a), g(&b)]
                };
                let what = if linear { "linear_lora" } else { "lora_add" };
                let what = format!("{what} {base} m {m} in {n_in} out {n_out} r {r}");
                let plain = run(SEED);
                let keyed = {
                    let _key = DropoutKey::set(Device::Cpu, KEY);
                    run(SEED)
                };
                let want = run(SEED ^ KEY);
                for (i, name) in ["out", "dx", "dA", "dB"].iter().enumerate() {
                    assert_eq!(keyed[i], want[i], "{what}: {name} of key K, seed S");
                    assert_ne!(keyed[i], plain[i], "{what}: the key changes {name}");
                }
            }
        }
    }
}

#[test]
fn finite_differences_f64() {
    let (m, n_in, n_out, r) = (9, 7, 5, 3);
    let y = randn(&[m, n_out], 1);
    let a = randn(&[r, n_in], 3);
    let b = randn(&[n_out, r], 4);
    for dropout in [None, Some((0.3, 21))] {
        let x = randn(&[m, n_in], 2);
        check_gradients("lora_add", &[y.clone(), x, a.clone(), b.clone()], |v| {
            v[0].lora_add(&v[1], &v[2], &v[3], 1.5, dropout)
        });
        // x as a non-contiguous view, with leading dims.
        let xt = randn(&[n_in, m], 6);
        check_gradients(
            "lora_add (x view)",
            &[y.clone(), xt, a.clone(), b.clone()],
            |v| {
                let x = v[1].t()?.reshape([3, 3, n_in])?;
                let y = v[0].reshape([3, 3, n_out])?;
                y.lora_add(&x, &v[2], &v[3], -0.7, dropout)
            },
        );
    }
}

#[test]
fn linear_lora_finite_differences_f64() {
    let (m, n_in, n_out, r) = (9, 7, 5, 3);
    let w = randn(&[n_out, n_in], 1);
    let a = randn(&[r, n_in], 3);
    let b = randn(&[n_out, r], 4);
    for dropout in [None, Some((0.3, 21))] {
        let x = randn(&[m, n_in], 2);
        check_gradients("linear_lora", &[x, w.clone(), a.clone(), b.clone()], |v| {
            v[0].linear_lora(&v[1], &v[2], &v[3], 1.5, dropout)
        });
        // x as a non-contiguous view with leading dims.
        let xt = randn(&[n_in, m], 6);
        check_gradients(
            "linear_lora (x view)",
            &[xt, w.clone(), a.clone(), b.clone()],
            |v| {
                let x = v[0].t()?.reshape([3, 3, n_in])?;
                x.linear_lora(&v[1], &v[2], &v[3], -0.7, dropout)
            },
        );
    }
}

/// The point of `linear_lora`: its tape node keeps x, W, A, B (and, inside the rule, the rank-r
/// codes), never the `[M, out]` base output. `lora_add` on `x Wᵀ` holds that output only as a
/// graph-only reference (its rule never reads it), so the buffer is freed with the last handle.
#[test]
fn linear_lora_keeps_no_base_output() {
    let (m, n_in, n_out) = (6, 4, 9);
    let x = randn(&[m, n_in], 1).to_var().unwrap();
    let w = randn(&[n_out, n_in], 2);
    let (a, b) = (
        randn(&[2, n_in], 3).to_var().unwrap(),
        randn(&[n_out, 2], 4).to_var().unwrap(),
    );
    let out = x.linear_lora(&w, &a, &b, 1.0, None).unwrap();
    let (name, shapes) = out.recorded_op().unwrap();
    assert_eq!(name, "linear_lora");
    let dims: Vec<Vec<usize>> = shapes.iter().map(|(s, _)| s.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![
            vec![m, n_in],
            vec![n_out, n_in],
            vec![2, n_in],
            vec![n_out, 2]
        ]
    );
    let base = linear(&x, &w).unwrap(); // [m, n_out]
    let y = base.lora_add(&x, &a, &b, 1.0, None).unwrap();
    let (_, kept) = y.recorded_op().unwrap();
    let dims: Vec<Vec<usize>> = kept.iter().map(|(s, _)| s.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![vec![m, n_in], vec![2, n_in], vec![n_out, 2]],
        "lora_add keeps x, A, B, not y"
    );
    let buffer = base.weak_storage().unwrap();
    drop(base);
    assert!(buffer.upgrade().is_none(), "the base output is freed");
    y.sum_all().unwrap().backward().unwrap();
    assert!(x.grad().is_some() && a.grad().is_some() && b.grad().is_some());
    // Without a trainable input there is no node at all.
    let frozen = randn(&[m, n_in], 5);
    let (a0, b0) = (randn(&[2, n_in], 3), randn(&[n_out, 2], 4));
    assert!(frozen
        .linear_lora(&w, &a0, &b0, 1.0, None)
        .unwrap()
        .recorded_op()
        .is_none());
}

#[test]
fn lora_linear_uses_the_fused_op_and_keeps_the_delta() {
    let x = randn(&[4, 6], 1);
    let w = randn(&[5, 6], 2);
    let l = LoraLinear::new(randn(&[2, 6], 3), randn(&[5, 2], 4), 0.5, 0.2);
    let fused = lora_linear(&x, &w.clone().into(), Some(&l), Some(3)).unwrap();
    let comp = linear(&x, &w)
        .unwrap()
        .add(&l.delta(&x, Some(3)).unwrap())
        .unwrap();
    let e = rel_err(&fused.to_vec_f64().unwrap(), &comp.to_vec_f64().unwrap());
    assert!(e <= 1e-12, "{e}");
}

#[test]
fn bad_shapes_and_dtypes_are_typed_errors() {
    let y = rnd(&[4, 5], 1.0, 1, DType::F32);
    let x = rnd(&[4, 6], 1.0, 2, DType::F32);
    let a = rnd(&[2, 6], 1.0, 3, DType::F32);
    let b = rnd(&[5, 2], 1.0, 4, DType::F32);
    assert!(y.lora_add(&x, &a, &b, 1.0, None).is_ok());
    let bad_x = rnd(&[3, 6], 1.0, 2, DType::F32);
    assert!(matches!(
        y.lora_add(&bad_x, &a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    // linear_lora: W [out, in] of x's dtype.
    let w = rnd(&[5, 6], 1.0, 5, DType::F32);
    assert!(x.linear_lora(&w, &a, &b, 1.0, None).is_ok());
    assert!(matches!(
        x.linear_lora(&rnd(&[5, 7], 1.0, 5, DType::F32), &a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.linear_lora(&w.to_dtype(DType::BF16).unwrap(), &a, &b, 1.0, None),
        Err(engine::Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        x.linear_lora(&w, &a, &rnd(&[4, 2], 1.0, 4, DType::F32), 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let bad_a = rnd(&[2, 7], 1.0, 3, DType::F32);
    assert!(matches!(
        y.lora_add(&x, &bad_a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let bad_b = rnd(&[5, 3], 1.0, 4, DType::F32);
    assert!(matches!(
        y.lora_add(&x, &a, &bad_b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let x16 = x.to_dtype(DType::BF16).unwrap();
    assert!(matches!(
        y.lora_add(&x16, &a, &b, 1.0, None),
        Err(engine::Error::DTypeMismatch { .. })
    ));
    let (a16, b16) = (
        a.to_dtype(DType::BF16).unwrap(),
        b.to_dtype(DType::BF16).unwrap(),
    );
    assert!(matches!(
        y.lora_add(&x, &a16, &b16, 1.0, None),
        Err(engine::Error::UnsupportedDType { .. })
    ));
    assert!(matches!(
        y.lora_add(&x, &a, &b, 1.0, Some((1.0, 3))),
        Err(engine::Error::InvalidArgument { .. })
    ));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::fused::lora::primitives::{self as prim, DropSide};
    use engine::fused::Operand;
    use engine::{DType, Device, Layout, Storage, Tensor};
    use testutil::gpu::{device as gpu, rel_err, tol};

    fn adapter(d: DType) -> DType {
        if d == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Deterministic values in ±[0.1, 2.1) × `s` (never zero).
    fn vals(n: usize, seed: u64, s: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = 0.1 + 2.0 * engine::rng::uniform(seed, i);
                let sign = if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -1.0
                } else {
                    1.0
                };
                sign * mag * s
            })
            .collect()
    }

    /// Compares `case(cpu)` with `case(gpu)` output by output; returns the failures.
    fn compare(
        name: &str,
        tol: f64,
        case: &dyn Fn(Device) -> engine::Result<Vec<Vec<f64>>>,
        gpu: Device,
    ) -> Vec<String> {
        let want = match case(Device::Cpu) {
            Ok(v) => v,
            Err(e) => return vec![format!("{name}: CPU failed: {e}")],
        };
        let got = match case(gpu) {
            Ok(v) => v,
            Err(e) => return vec![format!("{name}: CUDA failed: {e}")],
        };
        let mut bad = Vec::new();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            if w.iter().all(|&v| v == 0.0) && !w.is_empty() {
                bad.push(format!("{name} output {i}: reference is all zeros"));
            }
            let e = rel_err(w, g);
            if e.is_nan() || e > tol {
                bad.push(format!("{name} output {i}: rel err {e:e} > {tol:e}"));
            } else {
                eprintln!("{name} output {i}: rel err {e:.2e}");
            }
        }
        bad
    }

    const SIZES: [(usize, usize, usize); 5] = [
        (1, 7, 5),
        (33, 129, 65),
        (300, 576, 1536),
        (257, 4096, 4113),
        (512, 256, 4096),
    ];

    fn read(s: &Storage, shape: &[usize]) -> engine::Result<Vec<f64>> {
        s.to_f64_vec(&Layout::contiguous(shape.to_vec()))
    }

    /// Every primitive on one device: x `[m, in]` (contiguous or a transposed view), y, g
    /// `[m, out]`, a `[r, in]`, b `[out, r]`, z, dz `[m, r]`.
    #[allow(clippy::type_complexity)]
    fn primitives(
        dev: Device,
        base: DType,
        (m, n_in, n_out, r): (usize, usize, usize, usize),
        p: f64,
        transposed: bool,
    ) -> engine::Result<Vec<Vec<f64>>> {
        let ad = adapter(base);
        let up = |v: &[f64], d: DType| Storage::upload_f64(dev, v, d);
        let x = up(&vals(m * n_in, 1, 1.0), base)?;
        let xl = if transposed {
            Layout::contiguous([n_in, m]).transpose(0, 1)
        } else {
            Layout::contiguous([m, n_in])
        };
        let y = up(&vals(m * n_out, 2, 1.0), base)?;
        let g = up(&vals(m * n_out, 3, 1.0), base)?;
        let a = up(&vals(r * n_in, 4, 0.3), ad)?;
        let b = up(&vals(n_out * r, 5, 0.3), ad)?;
        let zin = up(&vals(m * r, 6, 1.0), ad)?;
        let (yl, al, bl, zl) = (
            Layout::contiguous([m, n_out]),
            Layout::contiguous([r, n_in]),
            Layout::contiguous([n_out, r]),
            Layout::contiguous([m, r]),
        );
        let seed = 1234;
        let op = Operand::new;
        let z = prim::codes(
            prim::Codes {
                x: op(&x, &xl),
                a: op(&a, &al),
            },
            p,
            seed,
        )?;
        let expand = prim::ExpandAdd {
            y: op(&y, &yl),
            z: op(&zin, &zl),
            b: op(&b, &bl),
        };
        let out = prim::expand_add(expand, 1.7)?;
        let grad_codes = prim::GradCodes {
            g: op(&g, &yl),
            z: op(&zin, &zl),
            b: op(&b, &bl),
        };
        let (dz, db) = prim::grad_codes(grad_codes, 1.7)?;
        let da = prim::grad_a(
            prim::GradA {
                x: op(&x, &xl),
                dz: op(&zin, &zl),
            },
            p,
            seed,
        )?;
        let dx = prim::grad_x(
            prim::GradX {
                dz: op(&zin, &zl),
                a: op(&a, &al),
            },
            p,
            seed,
            base,
        )?;
        Ok(vec![
            read(&z, &[m, r])?,
            read(&out, &[m, n_out])?,
            read(&dz, &[m, r])?,
            read(&db, &[n_out, r])?,
            read(&da, &[r, n_in])?,
            read(&dx, &[m, n_in])?,
        ])
    }

    #[test]
    fn primitives_match_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for base in [DType::F32, DType::BF16, DType::F64] {
            for (m, n_in, n_out) in SIZES {
                for r in [8, 16, 64] {
                    if r == 64 && n_in * m > 1 << 20 {
                        continue;
                    }
                    for p in [0.0, 0.25] {
                        for transposed in [false, true] {
                            let name = format!(
                                "primitives {base} m {m} in {n_in} out {n_out} r {r} p {p} \
                                 transposed {transposed}"
                            );
                            bad.extend(compare(
                                &name,
                                tol(base),
                                &|d| primitives(d, base, (m, n_in, n_out, r), p, transposed),
                                dev,
                            ));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The custom kernels of a bf16 base at r = 8 and 16 (cuda/lora_rank.rs) compute in f32 like
    /// the CPU reference, so their codes, dz, dB and dA agree to f32 rounding, far inside the
    /// bf16 tolerance above; `y + s z Bᵀ` and dx are rounded once to bf16 on both sides (a
    /// rounding flip at most). Sizes with several row blocks, partial 128-column chunks and both
    /// dropout settings (4113 output columns take the general path on the output side). Widths
    /// that are multiples of 8 run the tensor-core kernels (cuda/lora_mma.rs; 200 and 72 end in
    /// a partial 32-column step), 196 and 12 the CUDA-core ones.
    #[test]
    fn custom_rank_kernels_match_the_cpu_to_f32_rounding() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, n_in, n_out) in [
            (300, 576, 1536),
            (257, 4096, 4113),
            (37, 200, 72),
            (5, 196, 12),
        ] {
            for r in [8, 16] {
                for p in [0.0, 0.25] {
                    let name = format!("custom bf16 m {m} in {n_in} r {r} p {p}");
                    let case = |d| primitives(d, DType::BF16, (m, n_in, n_out, r), p, false);
                    let (want, got) = match (case(Device::Cpu), case(dev)) {
                        (Ok(w), Ok(g)) => (w, g),
                        (w, g) => {
                            bad.push(format!("{name}: {:?} / {:?}", w.err(), g.err()));
                            continue;
                        }
                    };
                    // Outputs: z, out, dz, dB, dA, dx.
                    let checks = [
                        (0, "z", 1e-5),
                        (1, "y + s z Bᵀ", 1e-3),
                        (2, "dz", 1e-5),
                        (3, "dB", 1e-5),
                        (4, "dA", 1e-5),
                        (5, "dx", 1e-3),
                    ];
                    for (i, what, tol) in checks {
                        let e = rel_err(&want[i], &got[i]);
                        if e.is_nan() || e > tol {
                            bad.push(format!("{name} {what}: rel err {e:e} > {tol:e}"));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `drop(x) · Aᵀ` and `dzᵀ · drop(x)` (`dropped_product` on either side: the MixLoRA
    /// fused FFN's stacked LoRA-A codes and their gradient) of bf16 operands against an f64
    /// reference of the same dropout (the same mask bits, kept values × 1/(1 − p)) on the exact
    /// bf16 values: the GPU kernels sum those in f32, so they agree to f32 rounding; the CPU
    /// takes the composition, whose product is rounded to bf16 (and agrees to that). 128 codes
    /// (the 7B case), 64 and 136 (partial 128-code blocks), row and column counts that are not
    /// multiples of the tiles (64 rows, 32 or 64 columns), both dropout settings.
    #[test]
    fn dropped_product_matches_an_f64_reference() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, k, n) in [(300, 576, 128), (37, 200, 64), (129, 4096, 136)] {
            for p in [0.0, 0.25] {
                let name = format!("dropped_product m {m} k {k} n {n} p {p}");
                let bf16 = |v: Vec<f64>| -> engine::Result<Vec<f64>> {
                    let s = Storage::upload_f64(Device::Cpu, &v, DType::BF16)?;
                    read(&s, &[v.len()])
                };
                let run = |d: Device, dt: DType| -> engine::Result<Vec<Vec<f64>>> {
                    let x = Storage::upload_f64(d, &bf16(vals(m * k, 7, 1.0))?, dt)?;
                    let a = Storage::upload_f64(d, &bf16(vals(n * k, 8, 0.3))?, dt)?;
                    let dz = Storage::upload_f64(d, &bf16(vals(m * n, 9, 1.0))?, dt)?;
                    let xl = Layout::contiguous([1, m, k]);
                    let at = Layout::contiguous([1, n, k]).transpose(1, 2); // Aᵀ [1, k, n]
                    let dzt = Layout::contiguous([1, m, n]).transpose(1, 2); // dzᵀ [1, n, m]
                    let (lhs, rhs) = (Operand::new(&x, &xl), Operand::new(&a, &at));
                    let codes =
                        prim::dropped_product(prim::Product { lhs, rhs }, p, 31, DropSide::Lhs)?;
                    let (lhs, rhs) = (Operand::new(&dz, &dzt), Operand::new(&x, &xl));
                    let grad =
                        prim::dropped_product(prim::Product { lhs, rhs }, p, 31, DropSide::Rhs)?;
                    Ok(vec![read(&codes, &[m, n])?, read(&grad, &[n, k])?])
                };
                let outcome = (|| -> engine::Result<()> {
                    let want = run(Device::Cpu, DType::F64)?;
                    let cpu = run(Device::Cpu, DType::BF16)?;
                    let got = run(dev, DType::BF16)?;
                    for (i, what) in [(0, "drop(x)·Aᵀ"), (1, "dzᵀ·drop(x)")] {
                        for (side, v, bound) in [("gpu", &got[i], 1e-5), ("cpu", &cpu[i], 1e-2)] {
                            let e = rel_err(&want[i], v);
                            if e.is_nan() || e > bound {
                                bad.push(format!(
                                    "{name} {what} {side}: rel err {e:e} > {bound:e}"
                                ));
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = outcome {
                    bad.push(format!("{name}: {e}"));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `matmul_cast` of a bf16 `x` `[m, k]` with an f32 `w` `[k, n]` (the MixLoRA router) runs
    /// on the rank primitives: the logits and `dw` in f32 agree with the CPU to f32 rounding,
    /// `dx` (rounded once to bf16 on both sides) within a rounding flip; n = 8 and 16 take the
    /// custom kernels, n = 5 the general path.
    #[test]
    fn matmul_cast_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, k) in [(300, 576), (257, 4096), (5, 196)] {
            for n in [8, 16, 5] {
                let name = format!("matmul_cast bf16 [{m}, {k}] x f32 [{k}, {n}]");
                let case = |d: Device| -> engine::Result<Vec<Vec<f64>>> {
                    let t = |v: Vec<f64>, s: &[usize], dt: DType| {
                        Tensor::from_f64(&v, s.to_vec(), dt, d)
                    };
                    let x = t(vals(m * k, 21, 1.0), &[m, k], DType::BF16)?.to_var()?;
                    let w = t(vals(n * k, 22, 0.05), &[n, k], DType::F32)?.to_var()?;
                    let y = x.matmul_cast(&w.t()?)?; // [m, n] f32
                    y.backward_with_grad(&t(vals(m * n, 23, 1.0), &[m, n], DType::F32)?)?;
                    let grad = |v: &Tensor| -> engine::Result<Vec<f64>> {
                        v.grad()
                            .ok_or_else(|| engine::Error::invalid("test", "no gradient"))?
                            .to_vec_f64()
                    };
                    Ok(vec![y.to_vec_f64()?, grad(&x)?, grad(&w)?])
                };
                let (want, got) = match (case(Device::Cpu), case(dev)) {
                    (Ok(w), Ok(g)) => (w, g),
                    (w, g) => {
                        bad.push(format!("{name}: {:?} / {:?}", w.err(), g.err()));
                        continue;
                    }
                };
                for (i, what, tol) in [(0, "logits", 1e-5), (1, "dx", 1e-3), (2, "dw", 1e-5)] {
                    let e = rel_err(&want[i], &got[i]);
                    if e.is_nan() || e > tol {
                        bad.push(format!("{name} {what}: rel err {e:e} > {tol:e}"));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The op forward and backward: `out = (x Wᵀ).lora_add(x, A, B)`, or (`linear`) `out =
    /// x.linear_lora(W, A, B)` (whose dx adds the LoRA term onto `g W` in one pass), seeded with
    /// `gout`; returns out, dx, dA, dB.
    fn op(
        dev: Device,
        base: DType,
        (m, n_in, n_out, r): (usize, usize, usize, usize),
        dropout: Option<(f64, u64)>,
        linear: bool,
    ) -> engine::Result<Vec<Vec<f64>>> {
        let ad = adapter(base);
        let t = |v: Vec<f64>, s: &[usize], d: DType| Tensor::from_f64(&v, s.to_vec(), d, dev);
        let x = t(vals(m * n_in, 11, 1.0), &[m, n_in], base)?.to_var()?;
        let w = t(vals(n_out * n_in, 12, 0.05), &[n_out, n_in], base)?;
        let a = t(vals(r * n_in, 13, 0.3), &[r, n_in], ad)?.to_var()?;
        let b = t(vals(n_out * r, 14, 0.3), &[n_out, r], ad)?.to_var()?;
        let gout = t(vals(m * n_out, 15, 1.0), &[m, n_out], base)?;
        let out = if linear {
            x.linear_lora(&w, &a, &b, 0.8, dropout)?
        } else {
            x.matmul(&w.t()?)?.lora_add(&x, &a, &b, 0.8, dropout)?
        };
        out.backward_with_grad(&gout)?;
        let grad = |v: &Tensor| -> engine::Result<Vec<f64>> {
            v.grad()
                .ok_or_else(|| engine::Error::invalid("test", "no gradient"))?
                .to_vec_f64()
        };
        Ok(vec![out.to_vec_f64()?, grad(&x)?, grad(&a)?, grad(&b)?])
    }

    #[test]
    fn op_forward_and_backward_match_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for base in [DType::F32, DType::BF16, DType::F64] {
            for (m, n_in, n_out) in SIZES {
                for r in [8, 16, 80] {
                    for dropout in [None, Some((0.1, 77))] {
                        for linear in [false, true] {
                            let what = if linear { "linear_lora" } else { "lora_add" };
                            let name = format!(
                                "{what} {base} m {m} in {n_in} out {n_out} r {r} dropout {dropout:?}"
                            );
                            bad.extend(compare(
                                &name,
                                tol(base),
                                &|d| op(d, base, (m, n_in, n_out, r), dropout, linear),
                                dev,
                            ));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `base + drop(a) + drop(b)` (`add_dropped2`: the MixLoRA fused FFN's dx) equals the
    /// separate ops bit for bit: on the GPU's one-pass bf16 kernel (whole groups of four and a
    /// tail, with and without dropout) and its fallback (f32, a transposed view), and on the CPU.
    #[test]
    fn add_dropped2_equals_the_separate_ops() {
        let Some(gpu) = gpu() else { return };
        let input = |d: Device, v: &[f64], dt: DType| Storage::upload_f64(d, v, dt).unwrap();
        for (dt, r, c, transposed) in [
            (DType::BF16, 61, 67, false),
            (DType::BF16, 64, 64, false),
            (DType::F32, 64, 64, false),
            (DType::BF16, 64, 64, true),
        ] {
            for p in [0.0, 0.3] {
                let layout = if transposed {
                    Layout::contiguous([c, r]).transpose(0, 1)
                } else {
                    Layout::contiguous([r, c])
                };
                let len: usize = r * c;
                let fused = |d| {
                    let s = |seed| input(d, &vals(len, seed, 1.0), dt);
                    let (base, a, b) = (s(41), s(42), s(43));
                    let (base, a, b) = (
                        Operand::new(&base, &layout),
                        Operand::new(&a, &layout),
                        Operand::new(&b, &layout),
                    );
                    let out = prim::add_dropped2(prim::AddDropped2 { base, a, b }, p, (7, 8));
                    read(&out.unwrap(), &[r, c]).unwrap()
                };
                let separate = |d| {
                    let t = |seed| {
                        let v = Tensor::from_f64(&vals(len, seed, 1.0), [len], dt, d).unwrap();
                        if transposed {
                            v.reshape([c, r]).unwrap().t().unwrap()
                        } else {
                            v.reshape([r, c]).unwrap()
                        }
                    };
                    let (base, a, b) = (t(41), t(42), t(43));
                    base.add(&a.dropout(p, 7, true).unwrap())
                        .unwrap()
                        .add(&b.dropout(p, 8, true).unwrap())
                        .unwrap()
                        .to_vec_f64()
                        .unwrap()
                };
                let want = separate(Device::Cpu);
                let what = format!("add_dropped2 {dt} n {len} transposed {transposed} p {p}");
                assert_eq!(want, separate(gpu), "{what}: separate ops, GPU");
                assert_eq!(want, fused(Device::Cpu), "{what}: CPU");
                assert_eq!(want, fused(gpu), "{what}: GPU");
            }
        }
    }
}
