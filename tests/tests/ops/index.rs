//! Index ops (`engine/src/ops/index.rs`, `backend/{cpu,cuda}/index.rs`, `kernels/src/index.cu`):
//! `index_select`, `embedding`, `gather`, `index_add` (and `index_add_weighted`), `scatter_add`,
//! `topk`.
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), with repeated ids,
//! along every dim, of rank-3 tensors and transposed views; values against naive loops (selects
//! and gathers exact, sums within 1e-14) on sizes large enough for the parallel path; `topk`'s
//! order and ties (the lower index first); bf16 against f32 within 1e-2; typed errors of
//! out-of-range ids, id dtypes and shapes.
//!
//! Parity (module `gpu`): every op along every dim of a `[6, 50, 260]` tensor in every dtype
//! (the additions in the float ones), with repeated ids, and top-k with ties and NaN. The CPU is
//! the reference: relative error within f32 1e-5, bf16 1e-2, f64 1e-10, u32 (and top-k's
//! indices) equal; NaN never passes.

use crate::util::vals as f64s;
use engine::{DType, Device, Error, Tensor};
use testutil::{assert_close, bf16_matches, check_gradients, f32_and_bf16, ids, rand_ids, randn};

/// Row-major offsets helper: the flat index of `idx` in a contiguous tensor of `dims`.
fn flat(dims: &[usize], idx: &[usize]) -> usize {
    idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// Every multi-index of `dims`, row-major.
fn multi_indices(dims: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = dims.iter().product();
    (0..n)
        .map(|mut k| {
            let mut idx = vec![0; dims.len()];
            for d in (0..dims.len()).rev() {
                idx[d] = k % dims[d];
                k /= dims[d];
            }
            idx
        })
        .collect()
}

// ----- gradient checks ----------------------------------------------------------------------

#[test]
fn grad_index_select() {
    let rep = ids(&[4, 0, 4, 2], &[4]);
    check_gradients(
        "index_select_dim0",
        &[randn(&[5, 3], 1), rep.clone()],
        |x| x[0].index_select(&x[1], 0),
    );
    check_gradients(
        "index_select_dim1",
        &[randn(&[3, 5], 2), ids(&[1, 1, 3], &[3])],
        |x| x[0].index_select(&x[1], 1),
    );
    check_gradients(
        "index_select_rank3_dim1",
        &[randn(&[2, 4, 3], 3), ids(&[3, 0, 3], &[3])],
        |x| x[0].index_select(&x[1], 1),
    );
    check_gradients(
        "index_select_last_dim",
        &[randn(&[2, 3, 5], 4), rep.clone()],
        |x| x[0].index_select(&x[1], -1),
    );
    // Transposed views: [4, 5] seen as [5, 4].
    check_gradients(
        "index_select_transposed_dim0",
        &[randn(&[4, 5], 5), rep.clone()],
        |x| x[0].t()?.index_select(&x[1], 0),
    );
    check_gradients(
        "index_select_transposed_dim1",
        &[randn(&[5, 4], 6), ids(&[3, 3, 1], &[3])],
        |x| x[0].t()?.index_select(&x[1], 1),
    );
}

#[test]
fn grad_embedding() {
    check_gradients(
        "embedding_2d_ids",
        &[randn(&[6, 3], 10), ids(&[5, 0, 5, 2, 2, 1], &[2, 3])],
        |x| x[0].embedding(&x[1]),
    );
    check_gradients(
        "embedding_transposed_table",
        &[randn(&[3, 6], 11), ids(&[1, 4, 1], &[3])],
        |x| x[0].t()?.embedding(&x[1]),
    );
}

#[test]
fn grad_index_add() {
    check_gradients(
        "index_add_dim0_repeats",
        &[
            randn(&[5, 3], 20),
            ids(&[1, 4, 1], &[3]),
            randn(&[3, 3], 21),
        ],
        |x| x[0].index_add(&x[1], &x[2], 0),
    );
    check_gradients(
        "index_add_dim1_repeats",
        &[
            randn(&[3, 5], 22),
            ids(&[0, 0, 4, 2], &[4]),
            randn(&[3, 4], 23),
        ],
        |x| x[0].index_add(&x[1], &x[2], 1),
    );
    check_gradients(
        "index_add_rank3_dim1",
        &[
            randn(&[2, 4, 3], 24),
            ids(&[3, 3, 0, 1, 3], &[5]),
            randn(&[2, 5, 3], 25),
        ],
        |x| x[0].index_add(&x[1], &x[2], -2),
    );
    // Transposed self and src.
    check_gradients(
        "index_add_transposed",
        &[
            randn(&[3, 5], 26),
            ids(&[2, 2, 0], &[3]),
            randn(&[3, 3], 27),
        ],
        |x| x[0].t()?.index_add(&x[1], &x[2].t()?, 0),
    );
}

#[test]
fn grad_index_add_weighted() {
    check_gradients(
        "index_add_weighted_dim0",
        &[
            randn(&[4, 3], 30),
            ids(&[2, 0, 2, 1, 3], &[5]),
            randn(&[5, 3], 31),
            randn(&[5], 32),
        ],
        |x| x[0].index_add_weighted(&x[1], &x[2], &x[3], 0),
    );
    check_gradients(
        "index_add_weighted_dim1_transposed_src",
        &[
            randn(&[2, 4], 33),
            ids(&[3, 3, 1], &[3]),
            randn(&[3, 2], 34),
            randn(&[3], 35),
        ],
        |x| x[0].index_add_weighted(&x[1], &x[2].t()?, &x[3], 1),
    );
}

#[test]
fn grad_gather() {
    check_gradients(
        "gather_dim1_repeats",
        &[
            randn(&[3, 5], 40),
            ids(&[0, 4, 4, 1, 2, 2, 2, 3, 1, 0, 0, 4], &[3, 4]),
        ],
        |x| x[0].gather(&x[1], 1),
    );
    check_gradients(
        "gather_dim0",
        &[randn(&[4, 3], 41), ids(&[3, 0, 3, 1, 1, 2], &[2, 3])],
        |x| x[0].gather(&x[1], 0),
    );
    check_gradients(
        "gather_rank3_dim1",
        &[
            randn(&[2, 4, 3], 42),
            ids(&rand_ids(2 * 5 * 3, 4, 43), &[2, 5, 3]),
        ],
        |x| x[0].gather(&x[1], 1),
    );
    check_gradients(
        "gather_transposed",
        &[randn(&[5, 3], 44), ids(&rand_ids(6, 5, 45), &[3, 2])],
        |x| x[0].t()?.gather(&x[1], 1),
    );
}

#[test]
fn grad_scatter_add() {
    check_gradients(
        "scatter_add_dim1_repeats",
        &[
            randn(&[3, 5], 50),
            ids(&[0, 4, 4, 1, 2, 2, 2, 3, 1, 0, 0, 4], &[3, 4]),
            randn(&[3, 4], 51),
        ],
        |x| x[0].scatter_add(&x[1], &x[2], 1),
    );
    check_gradients(
        "scatter_add_dim0",
        &[
            randn(&[4, 3], 52),
            ids(&rand_ids(18, 4, 53), &[6, 3]),
            randn(&[6, 3], 54),
        ],
        |x| x[0].scatter_add(&x[1], &x[2], 0),
    );
    check_gradients(
        "scatter_add_rank3_dim1",
        &[
            randn(&[2, 3, 4], 55),
            ids(&rand_ids(2 * 5 * 4, 3, 56), &[2, 5, 4]),
            randn(&[2, 5, 4], 57),
        ],
        |x| x[0].scatter_add(&x[1], &x[2], 1),
    );
    check_gradients(
        "scatter_add_transposed",
        &[
            randn(&[5, 3], 58),
            ids(&rand_ids(6, 5, 59), &[3, 2]),
            randn(&[2, 3], 60),
        ],
        |x| x[0].t()?.scatter_add(&x[1], &x[2].t()?, 1),
    );
}

#[test]
fn grad_topk() {
    check_gradients("topk_values", &[randn(&[3, 6], 70)], |x| {
        Ok(x[0].topk(3)?.0)
    });
    check_gradients("topk_rank3_k1", &[randn(&[2, 3, 4], 71)], |x| {
        Ok(x[0].topk(1)?.0)
    });
    check_gradients("topk_transposed", &[randn(&[5, 3], 72)], |x| {
        Ok(x[0].t()?.topk(2)?.0)
    });
    // Routing-style use: softmax over the selected logits.
    check_gradients("topk_softmax", &[randn(&[4, 8], 73)], |x| {
        x[0].topk(2)?.0.softmax_last_dim()
    });
}

// ----- values against naive loops ------------------------------------------------------------

#[test]
fn index_select_and_embedding_values() {
    // Large enough for the parallel path.
    let (v, h, n) = (300, 96, 400);
    let w = randn(&[v, h], 100);
    let idv = rand_ids(n, v, 101);
    let out = w.index_select(&ids(&idv, &[n]), 0).unwrap();
    let wv = f64s(&w);
    let want: Vec<f64> = idv
        .iter()
        .flat_map(|&i| wv[i as usize * h..(i as usize + 1) * h].to_vec())
        .collect();
    assert_eq!(f64s(&out), want);
    let emb = w.embedding(&ids(&idv, &[20, 20])).unwrap();
    assert_eq!(emb.dims(), &[20, 20, h]);
    assert_eq!(f64s(&emb), want);

    // dim 1 of a transposed view.
    let x = randn(&[7, 4], 102); // viewed as [4, 7]
    let xt = x.t().unwrap();
    let sel = [6u32, 0, 6, 3];
    let out = xt.index_select(&ids(&sel, &[4]), 1).unwrap();
    let xv = f64s(&x);
    let mut want = vec![];
    for r in 0..4 {
        for &c in &sel {
            want.push(xv[c as usize * 4 + r]);
        }
    }
    assert_eq!(f64s(&out), want);
}

#[test]
fn index_add_values_with_repeats() {
    for &(dims, dim, n) in &[
        (&[200usize, 128][..], 0usize, 500usize),
        (&[6, 50, 70][..], 1, 90),
        (&[5, 7][..], 1, 12),
    ] {
        let size = dims[dim];
        let base = randn(dims, 110);
        let mut sd = dims.to_vec();
        sd[dim] = n;
        let src = randn(&sd, 111);
        let idv = rand_ids(n, size, 112);
        let out = base
            .index_add(&ids(&idv, &[n]), &src, dim as isize)
            .unwrap();
        let mut want = f64s(&base);
        let sv = f64s(&src);
        for (k, idx) in multi_indices(&sd).into_iter().enumerate() {
            let mut di = idx.clone();
            di[dim] = idv[idx[dim]] as usize;
            want[flat(dims, &di)] += sv[k];
        }
        assert_close("index_add", &f64s(&out), &want, 1e-14);
    }
}

#[test]
fn index_add_weighted_values() {
    let (s, n, h) = (8, 20, 16);
    let base = randn(&[s, h], 120);
    let src = randn(&[n, h], 121);
    let w = randn(&[n], 122);
    let idv = rand_ids(n, s, 123);
    let out = base
        .index_add_weighted(&ids(&idv, &[n]), &src, &w, 0)
        .unwrap();
    let (mut want, sv, wv) = (f64s(&base), f64s(&src), f64s(&w));
    for j in 0..n {
        for c in 0..h {
            want[idv[j] as usize * h + c] += wv[j] * sv[j * h + c];
        }
    }
    assert_close("index_add_weighted", &f64s(&out), &want, 1e-14);
}

#[test]
fn gather_and_scatter_add_values() {
    for &(dims, dim, m) in &[
        (&[64usize, 512][..], 1usize, 300usize),
        (&[50, 400][..], 0, 60),
        (&[3, 9, 4][..], 1, 5),
        (&[6, 5][..], 0, 6),
    ] {
        let size = dims[dim];
        let x = randn(dims, 130);
        let mut od = dims.to_vec();
        od[dim] = m;
        let n: usize = od.iter().product();
        let idv = rand_ids(n, size, 131);
        let idt = ids(&idv, &od);
        let xv = f64s(&x);

        let g = x.gather(&idt, dim as isize).unwrap();
        let mut want = vec![0.0; n];
        for (k, idx) in multi_indices(&od).into_iter().enumerate() {
            let mut si = idx.clone();
            si[dim] = idv[k] as usize;
            want[k] = xv[flat(dims, &si)];
        }
        assert_eq!(f64s(&g), want, "gather {dims:?} dim {dim}");

        let src = randn(&od, 132);
        let sv = f64s(&src);
        let out = x.scatter_add(&idt, &src, dim as isize).unwrap();
        let mut want = xv.clone();
        for (k, idx) in multi_indices(&od).into_iter().enumerate() {
            let mut di = idx.clone();
            di[dim] = idv[k] as usize;
            want[flat(dims, &di)] += sv[k];
        }
        assert_close("scatter_add", &f64s(&out), &want, 1e-14);
    }
}

#[test]
fn topk_values_ties_and_order() {
    let (rows, n, k) = (200, 100, 5);
    let x = randn(&[rows, n], 140);
    let (vals, idx) = x.topk(k).unwrap();
    assert_eq!(idx.dtype(), DType::U32);
    assert_eq!(idx.dims(), &[rows, k]);
    let (xv, vv, iv) = (f64s(&x), f64s(&vals), idx.to_vec_u32().unwrap());
    for r in 0..rows {
        let row = &xv[r * n..(r + 1) * n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        for j in 0..k {
            assert_eq!(iv[r * k + j] as usize, order[j]);
            assert_eq!(vv[r * k + j], row[order[j]]);
        }
    }
    // Ties keep the lower index first.
    let t = Tensor::from_slice(&[1.0f32, 2.0, 2.0, 0.0, 2.0], [5], Device::Cpu).unwrap();
    let (v, i) = t.topk(3).unwrap();
    assert_eq!(i.to_vec_u32().unwrap(), vec![1, 2, 4]);
    assert_eq!(f64s(&v), vec![2.0, 2.0, 2.0]);
    // k == n sorts the whole row.
    let (_, i) = t.topk(5).unwrap();
    assert_eq!(i.to_vec_u32().unwrap(), vec![1, 2, 4, 0, 3]);
}

// ----- bf16 against f32 -----------------------------------------------------------------------

#[test]
fn bf16_forward_matches_f32() {
    let (x, xb) = f32_and_bf16(&[40, 64], 170);
    let (s, sb) = f32_and_bf16(&[30, 64], 171);
    let w = Tensor::randn([30], 0.0, 1.0, 172, DType::F32, Device::Cpu).unwrap();
    let idv = ids(&rand_ids(30, 40, 173), &[30]);

    let out = xb.index_select(&idv, 0).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    bf16_matches("index_select", &out, &x.index_select(&idv, 0).unwrap());

    let out = xb.index_add(&idv, &sb, 0).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    bf16_matches("index_add", &out, &x.index_add(&idv, &s, 0).unwrap());

    let wb = w.to_dtype(DType::BF16).unwrap();
    bf16_matches(
        "index_add_weighted",
        &xb.index_add_weighted(&idv, &sb, &wb, 0).unwrap(),
        &x.index_add_weighted(&idv, &s, &w, 0).unwrap(),
    );

    let gid = ids(&rand_ids(40 * 10, 64, 174), &[40, 10]);
    bf16_matches(
        "gather",
        &xb.gather(&gid, 1).unwrap(),
        &x.gather(&gid, 1).unwrap(),
    );
    let (g, gb) = f32_and_bf16(&[40, 10], 175);
    bf16_matches(
        "scatter_add",
        &xb.scatter_add(&gid, &gb, 1).unwrap(),
        &x.scatter_add(&gid, &g, 1).unwrap(),
    );

    let (vb, _) = xb.topk(4).unwrap();
    let (vf, _) = x.topk(4).unwrap();
    assert_eq!(vb.dtype(), DType::BF16);
    bf16_matches("topk", &vb, &vf);
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn out_of_range_ids_are_errors() {
    let x = randn(&[5, 3], 180);
    let bad = ids(&[0, 5], &[2]);
    let e = x.index_select(&bad, 0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                index: 5,
                size: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = x.embedding(&ids(&[7], &[1, 1])).unwrap_err();
    assert!(matches!(e, Error::IndexOutOfRange { .. }), "{e}");
    let e = x.index_add(&bad, &randn(&[2, 3], 181), 0).unwrap_err();
    assert!(matches!(e, Error::IndexOutOfRange { .. }), "{e}");
    let e = x.gather(&ids(&[0, 1, 3, 0, 2], &[5, 1]), 1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                index: 3,
                size: 3,
                ..
            }
        ),
        "{e}"
    );
    let e = x
        .scatter_add(&ids(&[9, 0, 0], &[1, 3]), &randn(&[1, 3], 182), 0)
        .unwrap_err();
    assert!(matches!(e, Error::IndexOutOfRange { .. }), "{e}");
}

#[test]
fn wrong_id_dtypes_are_errors() {
    let x = randn(&[5, 3], 190);
    let fids = Tensor::from_slice(&[0.0f32, 1.0], [2], Device::Cpu).unwrap();
    for e in [
        x.index_select(&fids, 0).unwrap_err(),
        x.embedding(&fids.reshape([1, 2]).unwrap()).unwrap_err(),
        x.index_add(&fids, &randn(&[2, 3], 191), 0).unwrap_err(),
        x.gather(&fids.reshape([2, 1]).unwrap(), 1).unwrap_err(),
        x.scatter_add(&fids.reshape([2, 1]).unwrap(), &randn(&[2, 1], 192), 1)
            .unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                Error::UnsupportedDType {
                    dtype: DType::F32,
                    ..
                }
            ),
            "{e}"
        );
    }
    // Mixed float dtypes are a mismatch.
    let e = x
        .index_add(
            &ids(&[0], &[1]),
            &randn(&[1, 3], 193).to_dtype(DType::F32).unwrap(),
            0,
        )
        .unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

#[test]
fn shape_mismatches_are_errors() {
    let x = randn(&[5, 3], 200);
    let i2 = ids(&[0, 1], &[2]);
    // ids of rank 2 where rank 1 is required.
    let e = x.index_select(&ids(&[0, 1], &[1, 2]), 0).unwrap_err();
    assert!(matches!(e, Error::RankMismatch { expected: 1, .. }), "{e}");
    // src rows do not match the ids, or the other dims do not match self.
    let e = x.index_add(&i2, &randn(&[3, 3], 201), 0).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = x.index_add(&i2, &randn(&[2, 4], 202), 0).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = x
        .index_add_weighted(&i2, &randn(&[2, 3], 203), &randn(&[3], 204), 0)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // gather ids must match self off the gathered dim; scatter_add ids must match src.
    let e = x.gather(&ids(&[0, 1, 2, 0], &[1, 4]), 0).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = x
        .scatter_add(&ids(&[0, 1, 2], &[1, 3]), &randn(&[2, 3], 205), 0)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // Dims out of range.
    let e = x.index_select(&i2, 2).unwrap_err();
    assert!(matches!(e, Error::DimOutOfRange { .. }), "{e}");
    let e = x.gather(&ids(&[0], &[1, 1]), -3).unwrap_err();
    assert!(matches!(e, Error::DimOutOfRange { .. }), "{e}");
    // topk: k larger than the last dim, or a scalar.
    assert!(matches!(
        x.topk(4).unwrap_err(),
        Error::InvalidArgument { op: "topk", .. }
    ));
    let s = Tensor::scalar(1.0, DType::F64, Device::Cpu).unwrap();
    assert!(matches!(s.topk(1).unwrap_err(), Error::RankMismatch { .. }));
    // embedding needs a [V, H] table.
    let e = randn(&[5], 206).embedding(&ids(&[0], &[1])).unwrap_err();
    assert!(matches!(e, Error::RankMismatch { expected: 2, .. }), "{e}");
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::{DType, Layout};
    use testutil::gpu::{input, ints, read, vals, Checker, ALL};

    #[test]
    fn index_ops_and_topk() {
        let Some(mut c) = Checker::new() else { return };
        let (a, b, e) = (6usize, 50usize, 260usize);
        let base_shape = [a, b, e];
        let nb = a * b * e;
        for dt in ALL {
            let data = if dt == DType::U32 {
                ints(nb, 100, 50)
            } else {
                vals(nb, 50)
            };
            for dim in 0..3 {
                let size = base_shape[dim];
                let ids: Vec<f64> = (0..13).map(|j| ((j * 7 + 3) % size) as f64).collect();
                let mut out_shape = base_shape;
                out_shape[dim] = ids.len();
                c.case(&format!("index_select dim {dim} {dt}"), dt, |dev| {
                    let (s, i) = (input(dev, &data, dt), input(dev, &ids, DType::U32));
                    Ok(read(
                        &s.index_select(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous([ids.len()]),
                            dim,
                        )?,
                        out_shape,
                    ))
                });
                // gather along dim with ids of the output's shape (m = 5 along dim).
                let mut g_shape = base_shape;
                g_shape[dim] = 5;
                let gn: usize = g_shape.iter().product();
                let gids: Vec<f64> = (0..gn).map(|j| ((j * 31 + 1) % size) as f64).collect();
                c.case(&format!("gather dim {dim} {dt}"), dt, |dev| {
                    let (s, i) = (input(dev, &data, dt), input(dev, &gids, DType::U32));
                    Ok(read(
                        &s.gather(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous(g_shape),
                            dim,
                        )?,
                        g_shape,
                    ))
                });
                if dt == DType::U32 {
                    continue;
                }
                // index_add with repeated ids; src [.., 13, ..].
                let src = vals(out_shape.iter().product(), 51);
                c.case(&format!("index_add dim {dim} {dt}"), dt, |dev| {
                    let (s, i, sr) = (
                        input(dev, &data, dt),
                        input(dev, &ids_rep(size), DType::U32),
                        input(dev, &src, dt),
                    );
                    Ok(read(
                        &s.index_add(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous([13]),
                            &sr,
                            &Layout::contiguous(out_shape),
                            dim,
                        )?,
                        base_shape,
                    ))
                });
                let gsrc = vals(gn, 52);
                c.case(&format!("scatter_add dim {dim} {dt}"), dt, |dev| {
                    let (s, i, sr) = (
                        input(dev, &data, dt),
                        input(dev, &gids, DType::U32),
                        input(dev, &gsrc, dt),
                    );
                    let gl = Layout::contiguous(g_shape);
                    Ok(read(
                        &s.scatter_add(&Layout::contiguous(base_shape), &i, &gl, &sr, &gl, dim)?,
                        base_shape,
                    ))
                });
            }
            // top-k with ties (small integers) and, for floats, NaN.
            for &(rows, n, k) in &[(300usize, 8usize, 2usize), (7, 1000, 5), (33, 64, 64)] {
                let mut x = ints(rows * n, 20, 53);
                if dt != DType::U32 {
                    x[3] = f64::NAN;
                    x[n + 1] = f64::NAN;
                }
                c.case(
                    &format!("topk [{rows},{n}] k {k} {dt}"),
                    DType::U32,
                    |dev| {
                        let s = input(dev, &x, dt);
                        Ok(read(
                            &s.topk_indices(&Layout::contiguous([rows, n]), k)?,
                            [rows, k],
                        ))
                    },
                );
            }
        }
        c.finish();
    }

    /// 13 ids below `size`, with repeats.
    fn ids_rep(size: usize) -> Vec<f64> {
        (0..13).map(|j| ((j * 5) % size.min(4)) as f64).collect()
    }
}
