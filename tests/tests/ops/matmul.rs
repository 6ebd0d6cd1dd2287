//! Matrix products (`engine/src/ops/matmul.rs`, `backend/{cpu,cuda}/matmul.rs`): `matmul` (2-d,
//! batched, broadcast over the batch, on transposed operands) and `matmul_cast` (x converted to
//! w's dtype inside the product).
//!
//! Gradients by central finite differences in f64 (relative error 1e-6); the gradient of a
//! transposed operand laid out as the tensor under the view, with the plain products' values
//! (1e-12); values against a naive triple loop (f64 1e-12, f32 1e-5, bf16 1e-2) on sizes from
//! 1×1×1 to 130×70×129 and per batch; `matmul_cast` equal to the composite bit for bit, keeping x
//! itself on the tape; typed errors naming the shapes.
//!
//! Parity (module `gpu`): batched products with either operand transposed, the rhs broadcast
//! over the batch (stride 0) or with no unit stride, on sizes with unit and odd dims. The CPU is
//! the reference: relative error within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes.

use engine::{DType, Error, Tensor};
use testutil::{check_gradients, randn, rel_err};

// ----- gradient checks ----------------------------------------------------------------------

#[test]
fn grad_matmul() {
    check_gradients(
        "matmul_2d",
        &[randn(&[3, 4], 60), randn(&[4, 5], 61)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_batched",
        &[randn(&[2, 3, 4], 62), randn(&[2, 4, 5], 63)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_weight_t",
        &[randn(&[2, 3, 4], 64), randn(&[5, 4], 65)],
        |x| x[0].matmul(&x[1].t()?),
    );
    check_gradients(
        "matmul_broadcast_batch",
        &[randn(&[2, 1, 3, 4], 66), randn(&[3, 4, 2], 67)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_both_t",
        &[randn(&[2, 4, 3], 68), randn(&[2, 5, 4], 69)],
        |x| x[0].transpose(1, 2)?.matmul(&x[1].transpose(1, 2)?),
    );
}

/// A product's gradient reaches an operand that is a transposed view (`k.t()` in `q kᵀ`) as a
/// row-major gradient of the tensor under the view, as that tensor is laid out (kernels reading
/// it, rope's for one, then take their contiguous paths), with the values of the plain products.
#[test]
fn matmul_gradients_keep_the_operands_orientation() {
    let close = |got: &Tensor, want: &Tensor| {
        let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
    };
    // The right operand transposed, as in attention's scores: [b, h, t, d] x [b, h, d, s].
    let q = randn(&[2, 3, 5, 4], 80).to_var().unwrap();
    let k = randn(&[2, 3, 6, 4], 81).to_var().unwrap();
    let g = randn(&[2, 3, 5, 6], 82);
    let y = q.matmul(&k.transpose(2, 3).unwrap()).unwrap();
    y.backward_with_grad(&g).unwrap();
    let dk = k.grad().unwrap();
    assert!(dk.is_contiguous(), "dk strides {:?}", dk.layout().strides());
    close(&dk, &g.transpose(2, 3).unwrap().matmul(&q).unwrap()); // dk = gᵀ q
    close(&q.grad().unwrap(), &g.matmul(&k).unwrap()); // dq = g k

    // The left operand transposed: [b, m, k] from a [b, k, m] tensor.
    let a = randn(&[2, 4, 3], 83).to_var().unwrap();
    let b = randn(&[2, 4, 5], 84);
    let g = randn(&[2, 3, 5], 85);
    let y = a.transpose(1, 2).unwrap().matmul(&b).unwrap();
    y.backward_with_grad(&g).unwrap();
    let da = a.grad().unwrap();
    assert!(da.is_contiguous(), "da strides {:?}", da.layout().strides());
    close(&da, &b.matmul(&g.transpose(1, 2).unwrap()).unwrap()); // da = b gᵀ
}

// ----- values -------------------------------------------------------------------------------

fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

#[test]
fn matmul_matches_naive_f32_f64_and_transposed() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (64, 96, 80),
        (130, 70, 129),
    ] {
        let a = randn(&[m, k], 1);
        let b = randn(&[k, n], 2);
        let want = naive_matmul(&a.to_vec_f64().unwrap(), &b.to_vec_f64().unwrap(), m, k, n);
        let got = a.matmul(&b).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-12, "f64 {m}x{k}x{n}");
        let (a32, b32) = (
            a.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let got = a32.matmul(&b32).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "f32 {m}x{k}x{n}");
        // Same product from a transposed stored operand.
        let bt = b.t().unwrap().contiguous().unwrap();
        let got = a.matmul(&bt.t().unwrap()).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-12, "transposed rhs {m}x{k}x{n}");
        let bf = a
            .to_dtype(DType::BF16)
            .unwrap()
            .matmul(&b.to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        assert!(
            rel_err(&bf.to_vec_f64().unwrap(), &want) < 1e-2,
            "bf16 {m}x{k}x{n}"
        );
    }
}

#[test]
fn batched_matmul_matches_per_batch() {
    let (b, m, k, n) = (5, 7, 6, 4);
    let a = randn(&[b, m, k], 3);
    let w = randn(&[b, k, n], 4);
    let out = a.matmul(&w).unwrap().to_vec_f64().unwrap();
    let (av, wv) = (a.to_vec_f64().unwrap(), w.to_vec_f64().unwrap());
    for i in 0..b {
        let want = naive_matmul(
            &av[i * m * k..(i + 1) * m * k],
            &wv[i * k * n..(i + 1) * k * n],
            m,
            k,
            n,
        );
        assert!(rel_err(&out[i * m * n..(i + 1) * m * n], &want) < 1e-12);
    }
}

/// `matmul_cast` (x converted to w's dtype, times w) gives the values and gradients of the
/// composite `x.to_dtype(..).matmul(w)` bit for bit on the CPU, for a bf16 x and f32 w (the rank
/// primitives' path) and an f32 x and f64 w (the composite's own ops), keeps x itself on the tape
/// (no converted copy), and is plain `matmul` when the dtypes agree (then a finite-difference
/// check).
#[test]
fn matmul_cast_equals_the_composite() {
    for (xt, wt) in [(DType::BF16, DType::F32), (DType::F32, DType::F64)] {
        let run = |fused: bool| {
            let x = randn(&[5, 7], 80).to_dtype(xt).unwrap().to_var().unwrap();
            let w = randn(&[7, 3], 81).to_dtype(wt).unwrap().to_var().unwrap();
            let y = if fused {
                x.matmul_cast(&w).unwrap()
            } else {
                x.to_dtype(wt).unwrap().matmul(&w).unwrap()
            };
            if fused {
                let (name, kept) = y.recorded_op().unwrap();
                assert_eq!(name, "matmul_cast");
                let dtypes: Vec<DType> = kept.iter().map(|(_, d)| *d).collect();
                assert_eq!(dtypes, vec![xt, wt], "x itself, not a converted copy");
            }
            let g = randn(&[5, 3], 82).to_dtype(wt).unwrap();
            y.backward_with_grad(&g).unwrap();
            assert_eq!(x.grad().unwrap().dtype(), xt);
            [
                y.to_vec_f64().unwrap(),
                x.grad().unwrap().to_vec_f64().unwrap(),
                w.grad().unwrap().to_vec_f64().unwrap(),
            ]
        };
        assert_eq!(run(true), run(false), "{xt} x {wt}");
    }
    check_gradients(
        "matmul_cast (same dtype)",
        &[randn(&[4, 3], 83), randn(&[3, 2], 84)],
        |v| v[0].matmul_cast(&v[1]),
    );
    let x = randn(&[2, 4, 3], 85).to_dtype(DType::F32).unwrap();
    assert!(
        x.matmul_cast(&randn(&[3, 2], 86)).is_err(),
        "rank 3 is refused"
    );
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn matmul_typed_errors() {
    let a = randn(&[2, 3], 13);
    let b = randn(&[4, 5], 14);
    assert!(matches!(
        a.matmul(&b),
        Err(Error::ShapeMismatch { op: "matmul", .. })
    ));
    let msg = a.matmul(&b).unwrap_err().to_string();
    assert!(msg.contains("[2, 3]") && msg.contains("[4, 5]"), "{msg}");
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::{Layout, Shape};
    use testutil::gpu::{input, read, vals, Checker, FLOATS};

    #[test]
    fn matmul_layouts() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for &(b, m, k, n) in &[
                (1usize, 64usize, 64usize, 64usize),
                (3, 17, 33, 9),
                (2, 1, 40, 7),
                (4, 8, 1, 5),
            ] {
                let (x, y) = (vals(b * m * k, 30), vals(b * k * n, 31));
                // lhs as stored, or as the transpose of a [b, k, m] buffer; rhs likewise.
                for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
                    c.case(
                        &format!("matmul [{b},{m},{k}]x[{k},{n}] lhs^T {lt} rhs^T {rt}"),
                        dt,
                        |dev| {
                            let (xs, ys) = (input(dev, &x, dt), input(dev, &y, dt));
                            let xl = if lt {
                                Layout::contiguous([b, k, m]).transpose(1, 2)
                            } else {
                                Layout::contiguous([b, m, k])
                            };
                            let yl = if rt {
                                Layout::contiguous([b, n, k]).transpose(1, 2)
                            } else {
                                Layout::contiguous([b, k, n])
                            };
                            Ok(read(&xs.matmul(&xl, &ys, &yl)?, [b, m, n]))
                        },
                    );
                }
                // rhs broadcast over the batch (stride 0).
                let y1 = vals(k * n, 32);
                c.case(
                    &format!("matmul [{b},{m},{k}]x[{k},{n}] rhs broadcast"),
                    dt,
                    |dev| {
                        let (xs, ys) = (input(dev, &x, dt), input(dev, &y1, dt));
                        let yl = Layout::contiguous([1, k, n])
                            .broadcast_as("t", &Shape::from([b, k, n]))?;
                        Ok(read(
                            &xs.matmul(&Layout::contiguous([b, m, k]), &ys, &yl)?,
                            [b, m, n],
                        ))
                    },
                );
                // rhs with no unit stride (every other element): copied before cuBLAS.
                let y2 = vals(b * k * n * 2, 33);
                c.case(
                    &format!("matmul [{b},{m},{k}]x[{k},{n}] rhs strided"),
                    dt,
                    |dev| {
                        let (xs, ys) = (input(dev, &x, dt), input(dev, &y2, dt));
                        let yl = Layout::new(Shape::from([b, k, n]), vec![2 * k * n, 2 * n, 2], 1);
                        Ok(read(
                            &xs.matmul(&Layout::contiguous([b, m, k]), &ys, &yl)?,
                            [b, m, n],
                        ))
                    },
                );
            }
        }
        c.finish();
    }
}
