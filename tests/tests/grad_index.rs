//! Index and loss ops: finite-difference gradient checks, values against naive loops, bf16 against
//! f32, and the typed errors of bad ids and shapes.

use engine::{DType, Device, Error, Tensor, IGNORE_INDEX};
use testutil::{check_gradients, ids, randn, rel_err};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// Pseudo-random ids in `0..size` (repeats likely), seeded.
fn rand_ids(n: usize, size: usize, seed: u64) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % size as u64) as u32
        })
        .collect()
}

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

fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.1e}");
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

#[test]
fn grad_cross_entropy() {
    let t = ids(&[2, IGNORE_INDEX, 5, 0], &[4]);
    check_gradients(
        "cross_entropy_with_ignored",
        &[randn(&[4, 6], 80), t.clone()],
        |x| x[0].cross_entropy(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_rows",
        &[randn(&[4, 6], 81), t.clone()],
        |x| x[0].cross_entropy_rows(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_transposed",
        &[randn(&[6, 4], 82), t.clone()],
        |x| x[0].t()?.cross_entropy(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_rank3_custom_ignore",
        &[randn(&[2, 3, 5], 83), ids(&[1, 4, 1, 0, 3, 2], &[2, 3])],
        |x| x[0].cross_entropy(&x[1], 1),
    );
    // Every row ignored: the loss is 0 and so is its gradient.
    check_gradients(
        "cross_entropy_all_ignored",
        &[randn(&[2, 3], 84), ids(&[IGNORE_INDEX, IGNORE_INDEX], &[2])],
        |x| x[0].cross_entropy(&x[1], IGNORE_INDEX),
    );
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

#[test]
fn cross_entropy_values() {
    let (n, v) = (64, 512);
    let logits = randn(&[n, v], 150).affine(3.0, 0.0).unwrap();
    let mut tv = rand_ids(n, v, 151);
    for r in (0..n).step_by(5) {
        tv[r] = IGNORE_INDEX;
    }
    let t = ids(&tv, &[n]);
    let lv = f64s(&logits);
    let mut rows = vec![0.0; n];
    for r in 0..n {
        if tv[r] == IGNORE_INDEX {
            continue;
        }
        let row = &lv[r * v..(r + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        rows[r] = lse - row[tv[r] as usize];
    }
    let count = tv.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
    let mean = rows.iter().sum::<f64>() / count;

    let got_rows = logits.cross_entropy_rows(&t, IGNORE_INDEX).unwrap();
    assert_eq!(got_rows.dtype(), DType::F64);
    assert_close("cross_entropy_rows", &f64s(&got_rows), &rows, 1e-12);
    let loss = logits.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(loss.rank(), 0);
    assert!((loss.to_scalar().unwrap() - mean).abs() < 1e-10);

    // f32 logits give an f32 loss close to the f64 reference.
    let l32 = logits.to_dtype(DType::F32).unwrap();
    let loss32 = l32.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(loss32.dtype(), DType::F32);
    assert!((loss32.to_scalar().unwrap() - mean).abs() < 1e-4 * mean.abs());

    // All rows ignored: exactly 0, not NaN.
    let all = ids(&[IGNORE_INDEX; 3], &[3]);
    let z = randn(&[3, 4], 152)
        .cross_entropy(&all, IGNORE_INDEX)
        .unwrap();
    assert_eq!(z.to_scalar().unwrap(), 0.0);
}

#[test]
fn cross_entropy_backward_is_softmax_minus_onehot_over_count() {
    let (n, v) = (5, 7);
    let x = randn(&[n, v], 160).to_var().unwrap();
    let tv = [3, IGNORE_INDEX, 0, 6, 6];
    x.cross_entropy(&ids(&tv, &[n]), IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    let gx = f64s(&x.grad().unwrap());
    let xv = f64s(&x);
    let mut want = vec![0.0; n * v];
    for r in 0..n {
        if tv[r] == IGNORE_INDEX {
            continue;
        }
        let row = &xv[r * v..(r + 1) * v];
        let s: f64 = row.iter().map(|a| a.exp()).sum();
        for j in 0..v {
            let onehot = if j == tv[r] as usize { 1.0 } else { 0.0 };
            want[r * v + j] = (row[j].exp() / s - onehot) / 4.0;
        }
    }
    assert_close("cross_entropy_grad", &gx, &want, 1e-12);
}

// ----- bf16 against f32 -----------------------------------------------------------------------

fn f32_and_bf16(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let x = Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap();
    let b = x.to_dtype(DType::BF16).unwrap();
    (x, b)
}

fn bf16_matches(name: &str, b: &Tensor, f: &Tensor) {
    assert_close(name, &f64s(b), &f64s(f), 1e-2);
}

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

    let mut tv = rand_ids(40, 64, 176);
    tv[3] = IGNORE_INDEX;
    let t = ids(&tv, &[40]);
    let lb = xb.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(lb.dtype(), DType::F32);
    bf16_matches(
        "cross_entropy",
        &lb,
        &x.cross_entropy(&t, IGNORE_INDEX).unwrap(),
    );

    // The logits gradient comes back in bf16.
    let (xv, xbv) = (x.to_var().unwrap(), xb.to_var().unwrap());
    xv.cross_entropy(&t, IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    xbv.cross_entropy(&t, IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    let (gf, gb) = (xv.grad().unwrap(), xbv.grad().unwrap());
    assert_eq!(gb.dtype(), DType::BF16);
    bf16_matches("cross_entropy_grad", &gb, &gf);
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
    let e = x
        .cross_entropy(&ids(&[0, 1, 2, 3, 4], &[5]), IGNORE_INDEX)
        .unwrap_err();
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
        x.narrow(0, 0, 2)
            .unwrap()
            .cross_entropy(&fids, IGNORE_INDEX)
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
    // Float-only ops reject u32 data; mixed float dtypes are a mismatch.
    let u = ids(&[1, 2, 3, 4], &[2, 2]);
    let e = u
        .cross_entropy(&ids(&[0, 1], &[2]), IGNORE_INDEX)
        .unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
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
    // cross_entropy targets must be the logits' shape without the last dim.
    let e = x
        .cross_entropy(&ids(&[0, 1], &[2]), IGNORE_INDEX)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}
