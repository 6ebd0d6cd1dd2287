//! What an op's tape node keeps alive. Inputs that the backward rule never reads are held as
//! graph-only references (same id, node and shape, no buffer): the scores before the attention
//! softmax, both sides of an add, the input of RoPE, of views, casts, copies and concatenation
//! are freed as soon as the last user handle goes, while the backward still works and gives the
//! same bits as with every input kept. A graph-only reference has no values to read.

use std::panic::{catch_unwind, AssertUnwindSafe};

use engine::autograd::{keeping_all_inputs, saved_buffers, Input, Node, Output};
use engine::{cat, causal_attention, rope_inv_freq, rope_tables, DType, Device, Error, Tensor};
use testutil::{bits, ids, randn};

/// Runs `f` (forward and backward) as the tape now records it and with every input kept, and
/// checks that both give the same bits for each returned tensor.
fn same_bits_as_keeping_all(name: &str, f: impl Fn() -> Vec<Tensor>) {
    let now: Vec<Vec<u64>> = f().iter().map(bits).collect();
    let all: Vec<Vec<u64>> = keeping_all_inputs(&f).iter().map(bits).collect();
    assert_eq!(
        now, all,
        "{name}: graph-only references changed the results"
    );
}

/// The fused softmax keeps its output (its rule reads the probabilities), not its input: the
/// scores' buffer is freed once their handle is dropped, and the gradients do not change.
#[test]
fn attention_softmax_frees_the_scores() {
    let run = || {
        let q = randn(&[2, 3, 5, 4], 1).to_var().unwrap();
        let k = randn(&[2, 3, 5, 4], 2).to_var().unwrap();
        let v = randn(&[2, 3, 5, 4], 3).to_var().unwrap();
        let scores = q.matmul(&k.t().unwrap()).unwrap(); // [2, 3, 5, 5]
        let watch = scores.weak_storage().unwrap();
        let probs = scores.causal_masked_softmax(0.5, 0, None).unwrap();
        let (name, kept) = probs.recorded_op().unwrap();
        assert_eq!(name, "causal_masked_softmax");
        let freed = kept.is_empty();
        drop(scores);
        assert_eq!(watch.upgrade().is_none(), freed);
        let out = probs.matmul(&v).unwrap(); // [2, 3, 5, 4]
        out.mul(&randn(&[2, 3, 5, 4], 4))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(freed, !engine_keeps_all());
        vec![q.grad().unwrap(), k.grad().unwrap(), v.grad().unwrap()]
    };
    same_bits_as_keeping_all("causal_masked_softmax", run);
}

/// Whether this thread records with every input kept: a node on a fresh tensor tells.
fn engine_keeps_all() -> bool {
    let x = randn(&[2], 9).to_var().unwrap().affine(1.0, 0.0).unwrap();
    let y = x.add(&x).unwrap();
    !y.recorded_op().unwrap().1.is_empty()
}

/// `causal_attention` (grouped-query heads, a padding mask) keeps one `[b, hq, t, s]` buffer, the
/// probabilities, where the tape used to keep the scores too.
#[test]
fn causal_attention_keeps_no_scores() {
    let (b, hq, hkv, t, d) = (2, 4, 2, 5, 3);
    let q = randn(&[b, hq, t, d], 11).to_var().unwrap();
    let k = randn(&[b, hkv, t, d], 12).to_var().unwrap();
    let v = randn(&[b, hkv, t, d], 13).to_var().unwrap();
    let mask = ids(&[1, 1, 1, 1, 1, 0, 1, 1, 1, 1], &[b, t]);
    let attend = || causal_attention(&q, &k, &v, Some(&mask), 0).unwrap();
    let score_sized = |out: &Tensor| -> Vec<Tensor> {
        saved_buffers(out)
            .into_iter()
            .filter(|s| s.tensor.elem_count() == b * hq * t * t)
            .map(|s| s.tensor)
            .collect()
    };
    assert_eq!(score_sized(&keeping_all_inputs(attend)).len(), 2);
    let out = attend();
    let kept = score_sized(&out);
    assert_eq!(kept.len(), 1, "only the probabilities");
    let probs = q
        .reshape([b, hkv, 2 * t, d])
        .unwrap()
        .matmul(&k.t().unwrap())
        .unwrap()
        .reshape([b, hq, t, t])
        .unwrap()
        .causal_masked_softmax(1.0 / (d as f64).sqrt(), 0, Some(&mask))
        .unwrap();
    assert_eq!(bits(&kept[0]), bits(&probs));
    same_bits_as_keeping_all("causal_attention", || {
        for x in [&q, &k, &v] {
            x.zero_grad();
        }
        let out = attend();
        out.mul(&randn(&[b, hq, t, d], 14))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vec![q.grad().unwrap(), k.grad().unwrap(), v.grad().unwrap()]
    });
}

/// A residual add (and a sub) reads neither operand in its backward: both buffers are freed with
/// their handles, and the node keeps nothing.
#[test]
fn residual_add_keeps_no_data() {
    let x = randn(&[3, 4], 21);
    let w1 = randn(&[4, 6], 22).to_var().unwrap();
    let w2 = randn(&[4, 6], 23).to_var().unwrap();
    for op in ["add", "sub"] {
        let a = x.matmul(&w1).unwrap(); // [3, 6]
        let b = x.matmul(&w2).unwrap();
        let (wa, wb) = (a.weak_storage().unwrap(), b.weak_storage().unwrap());
        let h = if op == "add" { a.add(&b) } else { a.sub(&b) }.unwrap();
        assert_eq!(h.recorded_op(), Some((op, vec![])));
        drop((a, b));
        assert!(wa.upgrade().is_none() && wb.upgrade().is_none(), "{op}");
        w1.zero_grad();
        w2.zero_grad();
        h.sum_all().unwrap().backward().unwrap();
        let want = x
            .t()
            .unwrap()
            .matmul(&Tensor::ones([3, 6], DType::F64, Device::Cpu).unwrap());
        assert_eq!(bits(&w1.grad().unwrap()), bits(&want.unwrap()));
    }
}

/// RoPE's backward uses only its tables: the projection before it (and the reshape and
/// transpose views over it) is freed once the rotated tensor exists.
#[test]
fn rope_keeps_no_data() {
    let (b, t, h, d) = (2, 5, 3, 4);
    let x = randn(&[b * t, 6], 31);
    let w = randn(&[6, h * d], 32).to_var().unwrap();
    let positions = ids(&[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], &[b, t]);
    let inv_freq = rope_inv_freq(d, 10000.0, DType::F64, Device::Cpu).unwrap();
    let (cos, sin) = rope_tables(&positions, &inv_freq).unwrap();
    let run = || {
        w.zero_grad();
        let proj = x.matmul(&w).unwrap(); // [b·t, h·d]
        let watch = proj.weak_storage().unwrap();
        let heads = proj.reshape([b, t, h, d]).unwrap().transpose(1, 2).unwrap(); // a view
        drop(proj);
        let q = heads.rope(&cos, &sin).unwrap(); // [b, h, t, d]
        drop(heads);
        let (name, kept) = q.recorded_op().unwrap();
        assert_eq!(name, "rope");
        let keep_all = engine_keeps_all();
        assert_eq!(kept.is_empty(), !keep_all);
        assert_eq!(watch.upgrade().is_none(), !keep_all);
        q.mul(&randn(&[b, h, t, d], 33))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vec![w.grad().unwrap()]
    };
    same_bits_as_keeping_all("rope", run);
}

type Op = fn(&Tensor) -> engine::Result<Tensor>;

/// Views, casts, copies, concatenation, splits and scaling by constants read no input values:
/// for each, the buffer of its input is freed once the user handles go (the op's output is
/// consumed by a scaling that keeps nothing either), the backward still runs and gives the same
/// bits as with every input kept.
#[test]
fn views_casts_and_scaling_keep_no_data() {
    let ops: [(&str, Op); 18] = [
        ("reshape", |t| t.reshape([4, 6])),
        ("reshape (copy)", |t| t.t()?.reshape([24])),
        ("transpose", |t| t.transpose(0, 1)),
        ("t", |t| t.t()),
        ("permute", |t| t.reshape([2, 3, 4])?.permute(&[2, 0, 1])),
        ("narrow", |t| t.narrow(1, 1, 2)),
        ("split", |t| Ok(t.split(&[1, 3], 1)?.remove(1))),
        ("chunk", |t| Ok(t.chunk(2, 0)?.remove(0))),
        ("broadcast_as", |t| t.unsqueeze(0)?.broadcast_as([3, 6, 4])),
        ("squeeze", |t| t.unsqueeze(1)?.squeeze(1)),
        ("flatten_all", |t| t.flatten_all()),
        ("to_dtype", |t| t.to_dtype(DType::F32)),
        ("copy", |t| t.copy()),
        ("contiguous", |t| t.t()?.contiguous()),
        ("cat", |t| cat(&[t, &t.neg()?], 0)),
        ("pad_into", |t| t.pad_into(&[8, 4].into(), 0, 1)),
        ("mul_scalar", |t| t.mul_scalar(-0.5)),
        ("affine", |t| t.affine(2.0, 1.0)),
    ];
    let x = randn(&[6, 5], 41);
    let w = randn(&[5, 4], 42).to_var().unwrap();
    for (name, op) in ops {
        let run = || {
            w.zero_grad();
            let base = x.matmul(&w).unwrap(); // [6, 4]
            let watch = base.weak_storage().unwrap();
            let y = op(&base).unwrap();
            let kept = y.recorded_op().unwrap().1;
            let z = y.affine(3.0, 0.25).unwrap();
            drop((base, y));
            let keep_all = engine_keeps_all();
            assert_eq!(kept.is_empty(), !keep_all, "{name}: kept {kept:?}");
            assert_eq!(watch.upgrade().is_none(), !keep_all, "{name}: input freed");
            z.to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            vec![w.grad().unwrap()]
        };
        same_bits_as_keeping_all(name, run);
    }
}

/// A product keeps an operand only for the other operand's gradient: with a frozen weight, the
/// activation is not kept (and the weight is); with a trainable weight, both are.
#[test]
fn matmul_keeps_an_operand_only_for_the_others_gradient() {
    let w = randn(&[5, 4], 51);
    let v = randn(&[3, 5], 52).to_var().unwrap();
    let x = v.affine(2.0, 0.0).unwrap(); // tracks, not a variable
    let kept = |y: Tensor| -> Vec<Vec<usize>> {
        let (_, kept) = y.recorded_op().unwrap();
        kept.iter().map(|(s, _)| s.dims().to_vec()).collect()
    };
    // Batched [1, ..] operands, so that the product is the recorded op.
    let x3 = x.unsqueeze(0).unwrap(); // [1, 3, 5]
    let w3 = w.unsqueeze(0).unwrap(); // [1, 5, 4] frozen
    let wv3 = w.to_var().unwrap().unsqueeze(0).unwrap(); // trainable
    let data = randn(&[1, 3, 5], 53); // no gradient
                                      // dx = g Wᵀ needs W; x is read only for dW.
    assert_eq!(kept(x3.matmul(&w3).unwrap()), vec![vec![1, 5, 4]]);
    assert_eq!(
        kept(x3.matmul(&wv3).unwrap()),
        vec![vec![1, 3, 5], vec![1, 5, 4]]
    );
    assert_eq!(kept(data.matmul(&wv3).unwrap()), vec![vec![1, 3, 5]]);
    // The same for matmul_cast: a bf16 activation times a frozen f32 weight keeps the weight.
    let xb = x.to_dtype(DType::BF16).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    let (name, kept) = xb.matmul_cast(&wf).unwrap().recorded_op().unwrap();
    assert_eq!(name, "matmul_cast");
    assert_eq!(kept, vec![(wf.shape().clone(), DType::F32)]);
}

/// A graph-only reference carries the id, node, shape, dtype and device, and no values: the
/// public readers return a typed error naming the op whose node holds it, and any op reading it
/// panics with a message naming that op. A variable and a tensor whose own rule reads its
/// output keep their data even when an op declares them graph-only.
#[test]
fn graph_only_reference_has_no_values() {
    let v = randn(&[2, 3], 61).to_var().unwrap();
    let x = v.affine(2.0, 1.0).unwrap(); // computed: has a node, not a variable
    let e = x.exp().unwrap(); // exp's rule reads its output
    let node = Node::record_with(
        "my_op",
        &[
            Input::GraphOnly(&x),
            Input::GraphOnly(&v),
            Input::GraphOnly(&e),
        ],
        Output::Unread,
        |_, _, _| Ok(vec![None, None, None]),
    )
    .unwrap();
    let [h, hv, he] = node.inputs() else {
        panic!("three inputs")
    };
    assert!(!h.has_data());
    assert_eq!(
        (h.id(), h.shape(), h.dtype()),
        (x.id(), x.shape(), x.dtype())
    );
    assert!(h.tracks_grad() && !h.is_variable());
    assert!(
        hv.has_data() && he.has_data(),
        "a variable and exp's output stay"
    );
    assert_eq!(hv.id(), v.id());
    let err = h.to_vec_f64().unwrap_err();
    assert!(
        matches!(
            err,
            Error::GraphOnly {
                consumer: "my_op",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("my_op"), "{err}");
    assert!(h.to_scalar().is_err() && h.to_vec_f32().is_err());
    assert!(h.copy().is_err() && h.to_var().is_err());
    assert!(x.assign(h).is_err() && h.assign(&x).is_err());
    assert!(!h.same_storage(&x) && h.weak_storage().is_none());
    let d = h.detach();
    assert!(!d.has_data() && !d.tracks_grad());
    let panic = catch_unwind(AssertUnwindSafe(|| h.add(h))).unwrap_err();
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("`my_op`") && msg.contains("Input::Keep"),
        "{msg}"
    );
    // With every input kept, the same declaration keeps the data.
    let kept = keeping_all_inputs(|| {
        Node::record_with(
            "my_op",
            &[Input::GraphOnly(&x)],
            Output::Unread,
            |_, _, _| Ok(vec![None]),
        )
    })
    .unwrap();
    assert!(kept.inputs()[0].has_data());
}
