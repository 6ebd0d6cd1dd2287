//! `MIXLORA_MOE_CHUNK_TOKENS` sets the token chunk of `engine::moe_fused_ffn` (its own test
//! binary: the variable is read once per process). With it set to 3, the op's output and every
//! gradient equal those of `moe_fused_ffn_chunked(.., Some(3))` exactly (the same computation),
//! and differ from the one-chunk run, by rounding only (f64).

use engine::{moe_fused_ffn, moe_fused_ffn_chunked, MoeFusedWeights, MoeRouting, Tensor};
use testutil::{ids, randn, rel_err};

const T: usize = 7;
const H: usize = 5;
const I: usize = 6;
const E: usize = 3;
const K: usize = 2;
const R: usize = 2;

/// `y` and the gradients of x, the routing weights and the six adapter tensors.
fn run(chunk: Option<Option<usize>>) -> Vec<Vec<f64>> {
    let v: Vec<Tensor> = [
        randn(&[T, H], 1),
        testutil::uniform(&[T, K], 0.2, 1.0, 2),
        randn(&[E, R, H], 3),
        randn(&[E, I, R], 4),
        randn(&[E, R, H], 5),
        randn(&[E, I, R], 6),
        randn(&[E, R, I], 7),
        randn(&[E, H, R], 8),
    ]
    .iter()
    .map(|t| t.to_var().unwrap())
    .collect();
    let frozen = [randn(&[I, H], 9), randn(&[I, H], 10), randn(&[H, I], 11)];
    let sel = ids(&[0, 1, 2, 0, 1, 2, 0, 2, 1, 0, 2, 1, 0, 1], &[T, K]);
    let w = MoeFusedWeights {
        w_gate: &frozen[0],
        w_up: &frozen[1],
        w_down: &frozen[2],
        a_gate: &v[2],
        b_gate: &v[3],
        a_up: &v[4],
        b_up: &v[5],
        a_down: &v[6],
        b_down: &v[7],
        scale: 1.5,
    };
    let route = MoeRouting {
        ids: &sel,
        weights: &v[1],
    };
    let y = match chunk {
        None => moe_fused_ffn(&v[0], &w, &route, None),
        Some(c) => moe_fused_ffn_chunked(&v[0], &w, &route, None, c),
    }
    .unwrap();
    y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y.to_vec_f64().unwrap()];
    out.extend(v.iter().map(|t| t.grad().unwrap().to_vec_f64().unwrap()));
    out
}

#[test]
fn the_environment_sets_the_chunk() {
    std::env::set_var("MIXLORA_MOE_CHUNK_TOKENS", "3");
    let from_env = run(None);
    assert_eq!(
        from_env,
        run(Some(Some(3))),
        "the same computation, bit for bit"
    );
    let one_chunk = run(Some(Some(T)));
    // The chunked weight gradients are sums in another order: not the same bits, which is how
    // this test sees that the variable was read.
    assert_ne!(from_env, one_chunk, "MIXLORA_MOE_CHUNK_TOKENS was ignored");
    for (n, (a, b)) in from_env.iter().zip(&one_chunk).enumerate() {
        assert!(rel_err(a, b) < 1e-12, "tensor {n}");
    }
}
