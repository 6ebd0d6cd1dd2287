//! Gradient checkpointing (`engine::checkpoint`): the same values and the same gradients as the
//! block run directly, for one and several outputs, inputs with and without a gradient, outputs
//! used more than once, and nested use; and nothing recorded inside the block in the forward.

use std::sync::Arc;

use engine::{checkpoint, no_grad, CheckpointFn, DType, Device, Tensor};
use testutil::{randn, rel_err};

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// A small two-output block: `h = silu(x w1) w2 + x`, `p = softmax(h r)`.
fn block(w1: Tensor, w2: Tensor, r: Tensor) -> Arc<CheckpointFn> {
    Arc::new(move |ins: &[Tensor]| {
        let x = &ins[0];
        let h = x.matmul(&w1)?.silu()?.matmul(&w2)?.add(x)?; // [n, d]
        let p = h.matmul(&r)?.softmax_last_dim()?; // [n, e]
        Ok(vec![h, p])
    })
}

struct Setup {
    x0: Tensor,
    w0: Tensor,
    w1: Tensor,
    w2: Tensor,
    r: Tensor,
}

fn setup(seed: u64) -> Setup {
    let (n, d, f, e) = (5, 6, 7, 3);
    Setup {
        x0: randn(&[n, d], seed),
        w0: randn(&[d, d], seed + 1).to_var().unwrap(),
        w1: randn(&[d, f], seed + 2)
            .mul_scalar(0.5)
            .unwrap()
            .to_var()
            .unwrap(),
        w2: randn(&[f, d], seed + 3)
            .mul_scalar(0.5)
            .unwrap()
            .to_var()
            .unwrap(),
        r: randn(&[d, e], seed + 4).to_var().unwrap(),
    }
}

/// Two blocks in a row, then a loss that uses both outputs of each; with or without checkpoints.
/// `x_tracks`: whether the first block's input depends on a variable (`x0 w0`) or is plain data.
fn run(s: &Setup, use_checkpoint: bool, x_tracks: bool) -> (f64, Vec<Vec<f64>>) {
    for v in [&s.w0, &s.w1, &s.w2, &s.r] {
        v.zero_grad();
    }
    let params = vec![s.w1.clone(), s.w2.clone(), s.r.clone()];
    let f = block(s.w1.clone(), s.w2.clone(), s.r.clone());
    let mut x = if x_tracks {
        s.x0.matmul(&s.w0).unwrap()
    } else {
        s.x0.clone()
    };
    let mut loss = Tensor::zeros((), DType::F64, Device::Cpu).unwrap();
    for _ in 0..2 {
        let outs = if use_checkpoint {
            checkpoint(std::slice::from_ref(&x), &params, f.clone()).unwrap()
        } else {
            f(std::slice::from_ref(&x)).unwrap()
        };
        let (h, p) = (&outs[0], &outs[1]);
        // p is used twice, h once here and once by the next block.
        let aux = p.sqr().unwrap().sum_all().unwrap();
        let aux2 = p.mul_scalar(0.3).unwrap().sum_all().unwrap();
        loss = loss.add(&aux).unwrap().add(&aux2).unwrap();
        x = h.clone();
    }
    let loss = loss.add(&x.tanh().unwrap().sum_all().unwrap()).unwrap();
    loss.backward().unwrap();
    let mut grads = vec![];
    for v in [&s.w0, &s.w1, &s.w2, &s.r] {
        grads.push(v.grad().map(|g| vals(&g)).unwrap_or_default());
    }
    (loss.to_scalar().unwrap(), grads)
}

#[test]
fn checkpointed_blocks_give_the_same_loss_and_gradients() {
    for x_tracks in [true, false] {
        let s = setup(11);
        let (l_ref, g_ref) = run(&s, false, x_tracks);
        let (l_ck, g_ck) = run(&s, true, x_tracks);
        assert!(
            (l_ref - l_ck).abs() <= 1e-12 * l_ref.abs(),
            "{l_ref} vs {l_ck}"
        );
        for (i, (a, b)) in g_ref.iter().zip(&g_ck).enumerate() {
            assert_eq!(a.len(), b.len(), "param {i}: gradient presence differs");
            if !a.is_empty() {
                let e = rel_err(b, a);
                assert!(e <= 1e-12, "param {i} (x_tracks {x_tracks}): rel err {e}");
            }
        }
        // Without a tracked input, w0 gets no gradient at all.
        assert_eq!(g_ck[0].is_empty(), !x_tracks);
    }
}

#[test]
fn checkpoint_records_nothing_inside_the_block() {
    let s = setup(3);
    let params = vec![s.w1.clone(), s.w2.clone(), s.r.clone()];
    let x = s.x0.matmul(&s.w0).unwrap();
    let outs = checkpoint(
        std::slice::from_ref(&x),
        &params,
        block(s.w1.clone(), s.w2.clone(), s.r.clone()),
    )
    .unwrap();
    // The outputs track gradients, but through one node each, not the block's ops.
    assert!(outs.iter().all(Tensor::tracks_grad));
    let direct = no_grad(|| block(s.w1.clone(), s.w2.clone(), s.r.clone())(&[x.clone()])).unwrap();
    for (a, b) in outs.iter().zip(&direct) {
        assert_eq!(vals(a), vals(b));
    }
}

#[test]
fn checkpoint_under_no_grad_is_the_plain_block() {
    let s = setup(5);
    let params = vec![s.w1.clone(), s.w2.clone(), s.r.clone()];
    let outs = no_grad(|| {
        checkpoint(
            std::slice::from_ref(&s.x0),
            &params,
            block(s.w1.clone(), s.w2.clone(), s.r.clone()),
        )
    })
    .unwrap();
    assert!(outs.iter().all(|o| !o.tracks_grad()));
}
