//! The chunked linear cross-entropy unit (`engine::fused::linear_cross_entropy`):
//! `Tensor::linear_cross_entropy_rows` (cross-entropy of `h · Wᵀ` over vocabulary chunks) against
//! the unchunked `h.matmul(Wᵀ).cross_entropy_rows(..)`: values and gradients of the hidden states
//! and of the weight, for chunk sizes that divide the vocabulary and that do not, with ignored
//! targets; f64 finite differences; bf16; rank-3 inputs; errors.
//!
//! Then (module `gpu`) the CPU ↔ CUDA parity of the unit's two primitives (the online
//! log-sum-exp update of one vocabulary chunk, the fused gradient of one chunk) on contiguous and
//! strided logits, and of the whole `Tensor::linear_cross_entropy_rows` forward and backward
//! (dhidden, dweight). Row counts and chunk widths that are and are not multiples of the
//! 256-thread block, chunks that do and do not divide the vocabulary, ignored targets. Relative
//! error ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes. Without a
//! GPU (or the `cuda` feature) the tests print why they skip and pass.

use engine::{no_grad, DType, Device, Error, Tensor, IGNORE_INDEX};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

fn scaled_vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// `(rows, dhidden, dweight)` of the loss `Σ rows ⊙ r` through `f`, for variables `h`, `w`.
fn run(
    h: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hv, wv) = (h.to_var().unwrap(), w.to_var().unwrap());
    let rows = f(&hv, &wv);
    let r = Tensor::randn(rows.shape().clone(), 0.5, 1.0, 77, rows.dtype(), CPU).unwrap();
    rows.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        scaled_vals(&rows),
        scaled_vals(&hv.grad().unwrap()),
        scaled_vals(&wv.grad().unwrap()),
    )
}

/// Targets `[n]` below `v`, every third one ignored.
fn targets_with_ignored(n: usize, v: usize, seed: u64) -> Tensor {
    let t: Vec<u32> = (0..n as u64)
        .map(|i| {
            if i % 3 == 1 {
                IGNORE_INDEX
            } else {
                (engine::rng::hash(seed, i) % v as u64) as u32
            }
        })
        .collect();
    ids(&t, &[n])
}

fn compare(dtype: DType, (n, hd, v): (usize, usize, usize), chunks: &[usize], tol: f64) {
    let h = randn(&[n, hd], 1).to_dtype(dtype).unwrap();
    let w = randn(&[v, hd], 2)
        .affine(0.5, 0.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let t = targets_with_ignored(n, v, 3);
    let want = run(&h, &w, |h, w| {
        h.matmul(&w.t().unwrap())
            .unwrap()
            .cross_entropy_rows(&t, IGNORE_INDEX)
            .unwrap()
    });
    for &c in chunks {
        let got = run(&h, &w, |h, w| {
            h.linear_cross_entropy_rows(w, &t, IGNORE_INDEX, c).unwrap()
        });
        let errs = [
            rel_err(&got.0, &want.0),
            rel_err(&got.1, &want.1),
            rel_err(&got.2, &want.2),
        ];
        for (what, e) in ["loss rows", "dhidden", "dweight"].iter().zip(errs) {
            assert!(
                e <= tol,
                "{dtype} chunk {c} of {v}: {what} relative error {e:e} > {tol:e}"
            );
        }
        // Ignored rows are exactly zero.
        for (i, &l) in got.0.iter().enumerate() {
            if i % 3 == 1 {
                assert_eq!(l, 0.0, "ignored row {i} has loss {l}");
            }
        }
    }
}

#[test]
fn matches_the_unchunked_loss_f64() {
    // 48 = 3·16 = 6·8: chunks that divide V, that do not (5, 7, 20), and one larger than V.
    compare(
        DType::F64,
        (13, 10, 48),
        &[1, 5, 7, 8, 16, 20, 48, 100],
        1e-12,
    );
}

#[test]
fn matches_the_unchunked_loss_f32() {
    compare(DType::F32, (37, 24, 300), &[64, 100, 128, 300, 1000], 1e-5);
    // Rows above the parallel threshold of the CPU kernels.
    compare(DType::F32, (130, 16, 1000), &[256, 333], 1e-5);
}

#[test]
fn matches_the_unchunked_loss_bf16() {
    compare(DType::BF16, (21, 32, 200), &[64, 77], 1e-2);
}

#[test]
fn finite_differences_f64() {
    let t = ids(&[3, IGNORE_INDEX, 0, 10, 7], &[5]);
    for chunk in [4, 11] {
        check_gradients(
            "linear_cross_entropy_rows",
            &[randn(&[5, 4], 11), randn(&[11, 4], 12)],
            |x| x[0].linear_cross_entropy_rows(&x[1], &t, IGNORE_INDEX, chunk),
        );
    }
}

#[test]
fn frozen_weight_gets_no_gradient_and_rank3_folds() {
    let h = randn(&[2, 3, 6], 21).to_var().unwrap();
    let w = randn(&[9, 6], 22); // frozen: not a variable
    let t = ids(&[1, 8, IGNORE_INDEX, 0, 4, 4], &[2, 3]);
    let rows = h
        .linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, 4)
        .unwrap();
    assert_eq!(rows.dims(), &[2, 3]);
    let want = no_grad(|| {
        h.matmul(&w.t().unwrap())
            .unwrap()
            .cross_entropy_rows(&t, IGNORE_INDEX)
            .unwrap()
    });
    assert!(rel_err(&scaled_vals(&rows), &scaled_vals(&want)) < 1e-12);
    rows.sum_all().unwrap().backward().unwrap();
    assert!(h.grad().is_some());
    assert!(w.grad().is_none());
}

#[test]
fn bad_arguments_are_typed_errors() {
    let h = randn(&[4, 6], 31);
    let w = randn(&[9, 6], 32);
    let t = ids(&[1, 2, 3, 4], &[4]);
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&randn(&[9, 5], 33), &t, IGNORE_INDEX, 4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &ids(&[1, 2, 3], &[3]), IGNORE_INDEX, 4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w.to_dtype(DType::F32).unwrap(), &t, IGNORE_INDEX, 4),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &ids(&[1, 2, 9, 4], &[4]), IGNORE_INDEX, 4),
        Err(Error::IndexOutOfRange {
            index: 9,
            size: 9,
            ..
        })
    ));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::fused::linear_cross_entropy::primitives::{
        self as prim, ChunkBackward, ChunkUpdate,
    };
    use engine::fused::{Operand, OperandMut};
    use engine::{DType, Device, Layout, Storage, Tensor, IGNORE_INDEX};
    use testutil::gpu::{device as gpu, scaled_vals, targets_with_ignored, StrictChecker};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];
    /// The state `[n, 3]` after folding in every chunk of the logits `[n, v]`, read either
    /// row-major or through a transposed buffer `[v, n]`.
    fn chunk_update_case(
        dev: Device,
        dt: DType,
        (n, v, c): (usize, usize, usize),
        transposed: bool,
    ) -> engine::Result<Vec<f64>> {
        let x = Storage::upload_f64(dev, &scaled_vals(n * v, 1, 3.0), dt)?;
        let full = if transposed {
            Layout::contiguous([v, n]).transpose(0, 1)
        } else {
            Layout::contiguous([n, v])
        };
        let init: Vec<f64> = (0..n).flat_map(|_| [f64::NEG_INFINITY, 0.0, 0.0]).collect();
        let mut st = Storage::upload_f64(dev, &init, dt.accumulation())?;
        let (tl, sl) = (Layout::contiguous([n]), Layout::contiguous([n, 3]));
        let ts = Storage::from_cpu(
            dev,
            engine::backend::cpu::CpuStorage::U32(targets_with_ignored(n, v, 2)),
        )?;
        for v0 in (0..v).step_by(c) {
            let l = full.narrow(1, v0, c.min(v - v0));
            let o = ChunkUpdate {
                x: Operand::new(&x, &l),
                targets: Operand::new(&ts, &tl),
                state: OperandMut { s: &mut st, l: &sl },
            };
            prim::chunk_update(o, v0, v, IGNORE_INDEX)?;
        }
        st.to_f64_vec(&Layout::contiguous([n, 3]))
    }

    /// The gradient of one chunk `[n, c]` at columns `v0..`.
    fn chunk_backward_case(
        dev: Device,
        dt: DType,
        (n, v, v0, c): (usize, usize, usize, usize),
    ) -> engine::Result<Vec<f64>> {
        let x = Storage::upload_f64(dev, &scaled_vals(n * v, 3, 3.0), dt)?;
        let l = Layout::contiguous([n, v]).narrow(1, v0, c);
        let ts = Storage::from_cpu(
            dev,
            engine::backend::cpu::CpuStorage::U32(targets_with_ignored(n, v, 4)),
        )?;
        let tl = Layout::contiguous([n]);
        // A log-sum-exp-like shift per row (anything finite works) and random row gradients.
        let lse: Vec<f64> = scaled_vals(n, 5, 1.0).iter().map(|x| x + 6.0).collect();
        let lse = Storage::upload_f64(dev, &lse, dt.accumulation())?;
        let g = Storage::upload_f64(dev, &scaled_vals(n, 6, 1.0), dt.accumulation())?;
        let o = ChunkBackward {
            x: Operand::new(&x, &l),
            targets: Operand::new(&ts, &tl),
            lse: Operand::new(&lse, &tl),
            grad_rows: Operand::new(&g, &tl),
        };
        let dx = prim::chunk_backward(o, v0, IGNORE_INDEX)?;
        dx.to_f64_vec(&Layout::contiguous([n, c]))
    }

    #[test]
    fn chunk_primitives_match_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let mut ck = StrictChecker::new(gpu);
        for dt in FLOATS {
            for (n, v, c) in [
                (5, 1000, 256),
                (257, 1000, 300),
                (64, 4097, 4097),
                (3, 70, 1),
            ] {
                for tr in [false, true] {
                    ck.case(
                        &format!("chunk_update n={n} v={v} c={c} transposed={tr}"),
                        dt,
                        |d| chunk_update_case(d, dt, (n, v, c), tr),
                    );
                }
            }
            for (n, v, v0, c) in [
                (7, 1000, 0, 256),
                (129, 1000, 700, 300),
                (33, 513, 256, 257),
            ] {
                ck.case(
                    &format!("chunk_backward n={n} v={v} v0={v0} c={c}"),
                    dt,
                    |d| chunk_backward_case(d, dt, (n, v, v0, c)),
                );
            }
        }
        ck.finish();
    }

    /// Loss rows, dhidden and dweight of `linear_cross_entropy_rows` on `dev`.
    fn linear_case(
        dev: Device,
        dt: DType,
        (n, h, v, chunk): (usize, usize, usize, usize),
    ) -> engine::Result<Vec<f64>> {
        let hid = Tensor::from_f64(&scaled_vals(n * h, 7, 1.0), [n, h], dt, dev)?.to_var()?;
        let w = Tensor::from_f64(&scaled_vals(v * h, 8, 0.3), [v, h], dt, dev)?.to_var()?;
        let t = Tensor::from_vec(targets_with_ignored(n, v, 9), n, dev)?;
        let rows = hid.linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, chunk)?;
        let r = Tensor::from_f64(&scaled_vals(n, 10, 1.0), n, rows.dtype(), dev)?;
        rows.mul(&r)?.sum_all()?.backward()?;
        let mut out = rows.to_vec_f64()?;
        for g in [hid.grad(), w.grad()].into_iter().flatten() {
            out.extend(g.to_vec_f64()?);
        }
        Ok(out)
    }

    #[test]
    fn linear_cross_entropy_matches_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let mut ck = StrictChecker::new(gpu);
        for dt in FLOATS {
            for shape in [(9, 16, 100, 32), (256, 64, 1000, 256), (257, 48, 1031, 300)] {
                ck.case(&format!("linear_cross_entropy {shape:?}"), dt, |d| {
                    linear_case(d, dt, shape)
                });
            }
        }
        ck.finish();
    }
}
