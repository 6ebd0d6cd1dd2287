//! The fused MixLoRA FFN unit (`engine::fused::moe_ffn`: the op `engine::moe_ffn`, the `fused`
//! method of docs/DESIGN.md, run by `MoeImpl::Fused`).
//!
//! On the CPU, against the naive per-expert loop: the output and every gradient (x, router, each
//! expert's A/B on gate, up, down) in f64 (1e-10), f32 (1e-5) and on a bf16 base (both paths
//! against f32), at several sizes (T not a multiple of 32, odd H and I), k = 1 and 2, E = 4 and 8,
//! with an expert that receives no token; an f64 finite-difference check of the op itself (with
//! and without dropout, in chunks); the token chunking and the options; the grouping of slots by
//! expert; typed errors; the block-code primitive against the separate ones it replaces. Under
//! a dropout key K (`engine::set_dropout_key`): the op's results change, its backward draws its
//! forward's masks (finite differences) and chunking changes nothing; the primitives that draw
//! the down projection's mask give seed S ^ K's bits for seed S.
//!
//! Then (module `gpu`) the CPU ↔ CUDA parity of the op: the output and the gradients of x, the
//! routing weights and the six stacked adapter tensors, with the CPU as the reference. Relative
//! error ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes. Sizes: a
//! small one with an expert that receives no token, a medium one (T = 300, H = 256, I = 688,
//! E = 8, k = 2, r = 16: neither T nor I a multiple of the 256-thread block), k = 1, separate
//! (copied) and adjacent (read in place through a row stride) W_gate/W_up, cases with dropout
//! (counter-based masks, the same on both devices), and cases run in several token chunks
//! (uneven, with dropout). Also `MoeImpl::Fused` through the whole MixLoRA block, and the
//! block-code primitive bit for bit.
//!
//! Without a GPU (or without the `cuda` feature) the GPU tests print why they skip and pass.

use engine::fused::moe_ffn::MoeDims;
use engine::{
    DType, Device, MoeDropout, MoeFfnOptions, MoeFusedWeights, MoeKernels, MoeRouting, Tensor,
};
use model::adapters::{
    ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, RouterOutput, Routing, SharedFfn,
};
use testutil::{check_gradients, ids, randn, rel_err, DropoutKey};

/// Sizes of one comparison.
#[derive(Clone, Copy, Debug)]
struct Case {
    t: usize,
    h: usize,
    i: usize,
    e: usize,
    k: usize,
    r: usize,
    /// Make expert `e − 1` receive no token.
    idle: bool,
}

fn rand(shape: &[usize], std: f64, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, std, seed, dtype, Device::Cpu).unwrap()
}

/// A block of `c`'s sizes in base dtype `base` (adapters in f64 under f64, else f32), every
/// adapter tensor a variable with random values (B too, so every LoRA path is live), and its
/// input `x` (a variable). With `idle`, feature 0 of x is large and positive and the router
/// row of the last expert strongly negative there (the others zero), so it gets no token.
struct Block {
    x: Tensor,
    shared: [Tensor; 3],
    ffn: MixLoraFfn,
}

fn block(c: Case, base: DType, seed: u64) -> Block {
    let at = if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut x = rand(&[c.t, c.h], 1.0, seed, DType::F64)
        .to_vec_f64()
        .unwrap();
    let mut router = rand(&[c.e, c.h], 0.5, seed + 1, DType::F64)
        .to_vec_f64()
        .unwrap();
    if c.idle {
        for t in 0..c.t {
            x[t * c.h] = 3.0 + 0.2 * x[t * c.h];
        }
        for e in 0..c.e - 1 {
            router[e * c.h] = 0.0;
        }
        router[(c.e - 1) * c.h] = -4.0;
    }
    let x = Tensor::from_f64(&x, [c.t, c.h], base, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    let router = Tensor::from_f64(&router, [c.e, c.h], at, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    let (sh, si) = (1.0 / (c.h as f64).sqrt(), 1.0 / (c.i as f64).sqrt());
    let shared = [
        rand(&[c.i, c.h], sh, seed + 2, base),
        rand(&[c.i, c.h], sh, seed + 3, base),
        rand(&[c.h, c.i], si, seed + 4, base),
    ];
    let mut s = seed + 10;
    let mut lora = |n_in: usize, n_out: usize| {
        s += 2;
        let a = rand(&[c.r, n_in], 1.0 / (n_in as f64).sqrt(), s, at);
        let b = rand(&[n_out, c.r], 0.3, s + 1, at);
        Some(LoraLinear::new(
            a.to_var().unwrap(),
            b.to_var().unwrap(),
            2.0,
            0.05,
        ))
    };
    let experts = (0..c.e)
        .map(|_| ExpertLora {
            gate: lora(c.h, c.i),
            up: lora(c.h, c.i),
            down: lora(c.i, c.h),
        })
        .collect();
    Block {
        x,
        shared,
        ffn: MixLoraFfn {
            router: Router {
                weight: router,
                routing: Routing::TopK(c.k),
            },
            experts,
        },
    }
}

impl Block {
    /// The same block on a base of `dtype` (x and the shared weights converted; the adapter
    /// tensors are shared).
    fn with_base(&self, dtype: DType) -> Block {
        Block {
            x: self.x.to_dtype(dtype).unwrap().detach().to_var().unwrap(),
            shared: self.shared.clone().map(|w| w.to_dtype(dtype).unwrap()),
            ffn: self.ffn.clone(),
        }
    }

    /// Every tensor that gets a gradient: x, the router, then per expert gate A, B, up A, B, down
    /// A, B.
    fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("x".to_string(), self.x.clone()),
            ("router".to_string(), self.ffn.router.weight.clone()),
        ];
        for (e, ex) in self.ffn.experts.iter().enumerate() {
            for (name, l) in [("gate", &ex.gate), ("up", &ex.up), ("down", &ex.down)] {
                let l = l.as_ref().unwrap();
                v.push((format!("expert {e} {name} A"), l.a.clone()));
                v.push((format!("expert {e} {name} B"), l.b.clone()));
            }
        }
        v
    }

    /// `y` and every gradient of `Σ y ⊙ R` under `imp`.
    fn run(&self, imp: MoeImpl, seed: Option<u64>) -> (Vec<f64>, Vec<Vec<f64>>, RouterOutput) {
        let params = self.params();
        for (_, p) in &params {
            p.zero_grad();
        }
        let shared = SharedFfn {
            gate: &engine::FrozenWeight::from(self.shared[0].clone()),
            up: &engine::FrozenWeight::from(self.shared[1].clone()),
            down: &engine::FrozenWeight::from(self.shared[2].clone()),
        };
        let (y, route) = self.ffn.forward(&self.x, shared, imp, seed).unwrap();
        assert_eq!(y.dtype(), self.x.dtype());
        let r = rand(y.dims(), 1.0, 999, y.dtype());
        y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = params
            .iter()
            .map(|(_, p)| {
                // The naive loop never touches an idle expert: no gradient means zero.
                p.grad()
                    .map_or_else(|| vec![0.0; p.elem_count()], |g| g.to_vec_f64().unwrap())
            })
            .collect();
        (y.to_vec_f64().unwrap(), grads, route)
    }
}

/// Fused == naive for the output and every gradient, within `tol` (relative), on base `base`.
fn compare(c: Case, base: DType, tol: f64) {
    let b = block(c, base, 7 + c.t as u64);
    let (y0, g0, route) = b.run(MoeImpl::Naive, None);
    if c.idle {
        let m = route.mask.to_vec_f64().unwrap();
        let last: f64 = m.chunks(c.e).map(|row| row[c.e - 1]).sum();
        assert_eq!(last, 0.0, "{c:?}: the last expert must receive no token");
    }
    let (y1, g1, _) = b.run(MoeImpl::Fused(Default::default()), None);
    let err = rel_err(&y1, &y0);
    let mut worst = (0.0, String::new());
    assert!(
        err <= tol,
        "{base} {c:?}: y differs by {err:.3e} > {tol:.0e}"
    );
    for ((name, _), (a, n)) in b.params().iter().zip(g1.iter().zip(&g0)) {
        let idle_expert = c.idle && name.starts_with(&format!("expert {} ", c.e - 1));
        if idle_expert {
            assert!(
                a.iter().chain(n).all(|&v| v == 0.0),
                "{base} {c:?}: {name} of the idle expert must be zero"
            );
            continue;
        }
        let err = rel_err(a, n);
        if err > worst.0 {
            worst = (err, name.clone());
        }
        assert!(
            err <= tol,
            "{base} {c:?}: gradient of {name} differs by {err:.3e} > {tol:.0e}"
        );
    }
    println!(
        "{base} vs naive {c:?}: y {err:.2e}, worst gradient {:.2e} ({})",
        worst.0, worst.1
    );
}

const CASES: [Case; 5] = [
    Case {
        t: 37,
        h: 20,
        i: 27,
        e: 4,
        k: 2,
        r: 4,
        idle: true,
    },
    Case {
        t: 45,
        h: 33,
        i: 51,
        e: 8,
        k: 1,
        r: 3,
        idle: false,
    },
    Case {
        t: 70,
        h: 17,
        i: 40,
        e: 8,
        k: 2,
        r: 5,
        idle: true,
    },
    // Three tiles of the CPU's tile primitives (64 tokens each), three slots a token.
    Case {
        t: 150,
        h: 20,
        i: 36,
        e: 6,
        k: 3,
        r: 4,
        idle: false,
    },
    Case {
        t: 29,
        h: 24,
        i: 31,
        e: 4,
        k: 1,
        r: 2,
        idle: true,
    },
];

#[test]
fn fused_equals_naive_f64() {
    for c in CASES {
        compare(c, DType::F64, 1e-10);
    }
}

#[test]
fn fused_equals_naive_f32() {
    for c in CASES {
        compare(c, DType::F32, 1e-5);
    }
}

/// Both paths on a bf16 base against the naive path in f32 on the same bf16-valued inputs
/// (adapters are f32 in both): the output within 1e-2 and every gradient within 2e-2 (relative).
/// Neither path is a reference for the other here: both round their intermediates to bf16 (the
/// naive path `G + delta`, `silu(g)·u`, the down input and every backward intermediate; the fused
/// path its per-slot `[T·k, I]` tensors and the bf16 GEMMs' results, exactly what its tensor-core
/// GEMMs consume), so each differs from f32 by up to ~1.5e-2 on some LoRA-A gradients of these
/// cases, whose rank-r sums over I cancel (the figures are printed). In f32 and f64 the two paths
/// agree to 1e-5 and 1e-10 (above).
#[test]
fn bf16_paths_against_f32() {
    for c in CASES {
        let b = block(c, DType::BF16, 7 + c.t as u64);
        let (yr, gr, _) = b.with_base(DType::F32).run(MoeImpl::Naive, None);
        for imp in [MoeImpl::Naive, MoeImpl::Fused(Default::default())] {
            let (y, g, _) = b.run(imp, None);
            let worst = b
                .params()
                .iter()
                .zip(g.iter().zip(&gr))
                .map(|((n, _), (a, r))| (rel_err(a, r), n.clone()))
                .fold((0.0, String::new()), |w, x| if x.0 > w.0 { x } else { w });
            let ey = rel_err(&y, &yr);
            println!(
                "{c:?} {imp:?} bf16: y {ey:.2e}, worst gradient {:.2e} ({})",
                worst.0, worst.1
            );
            assert!(
                ey <= 1e-2 && worst.0 <= 2e-2,
                "{imp:?} bf16 {c:?}: y {ey:.3e}, {} {:.3e} off f32",
                worst.1,
                worst.0
            );
        }
    }
}

#[test]
fn fused_falls_back_to_naive_for_top_p() {
    let c = CASES[0];
    let mut b = block(c, DType::F64, 3);
    b.ffn.router.routing = Routing::TopP(0.8);
    let (y0, g0, _) = b.run(MoeImpl::Naive, None);
    let (y1, g1, _) = b.run(MoeImpl::Fused(Default::default()), None);
    assert_eq!(y0, y1);
    assert_eq!(g0, g1);
}

#[test]
fn fused_dropout_changes_the_output_and_is_deterministic() {
    let b = block(CASES[0], DType::F64, 5);
    let (y0, _, _) = b.run(MoeImpl::Fused(Default::default()), None);
    let (y1, _, _) = b.run(MoeImpl::Fused(Default::default()), Some(11));
    let (y2, _, _) = b.run(MoeImpl::Fused(Default::default()), Some(11));
    assert_eq!(y1, y2, "same seed, same masks");
    assert!(rel_err(&y1, &y0) > 1e-6, "dropout must change the output");
}

#[test]
fn grouping_by_expert() {
    // T = 4, k = 2, E = 4; expert 2 gets nothing.
    let t = ids(&[3, 0, 1, 3, 0, 1, 3, 0], &[4, 2]);
    let (perm, offsets) = t.moe_group(4).unwrap();
    assert_eq!(perm.to_vec_u32().unwrap(), vec![1, 4, 7, 2, 5, 0, 3, 6]);
    assert_eq!(offsets.to_vec_u32().unwrap(), vec![0, 3, 5, 5, 8]);
}

/// Inputs of the op's gradient check: x, w, then A_g, B_g, A_u, B_u, A_d, B_d (stacked); the
/// frozen W_g, W_u, W_d; and the routing (expert 2 of 3 idle).
const FT: usize = 5;
const FH: usize = 4;
const FI: usize = 6;
const FE: usize = 3;
const FK: usize = 2;
const FR: usize = 2;

fn op_inputs() -> (Vec<Tensor>, [Tensor; 3]) {
    let w = testutil::uniform(&[FT, FK], 0.2, 1.0, 21);
    let v = vec![
        randn(&[FT, FH], 20),
        w,
        randn(&[FE, FR, FH], 22).affine(0.5, 0.0).unwrap(),
        randn(&[FE, FI, FR], 23).affine(0.5, 0.0).unwrap(),
        randn(&[FE, FR, FH], 24).affine(0.5, 0.0).unwrap(),
        randn(&[FE, FI, FR], 25).affine(0.5, 0.0).unwrap(),
        randn(&[FE, FR, FI], 26).affine(0.5, 0.0).unwrap(),
        randn(&[FE, FH, FR], 27).affine(0.5, 0.0).unwrap(),
    ];
    // W_g and W_u as adjacent row blocks of one buffer: the single-GEMM path.
    let gu = randn(&[2 * FI, FH], 28).affine(0.5, 0.0).unwrap();
    let frozen = [
        gu.narrow(0, 0, FI).unwrap(),
        gu.narrow(0, FI, FI).unwrap(),
        randn(&[FH, FI], 29).affine(0.5, 0.0).unwrap(),
    ];
    (v, frozen)
}

fn op_out(
    v: &[Tensor],
    frozen: &[Tensor; 3],
    dropout: Option<MoeDropout>,
) -> engine::Result<Tensor> {
    op_out_chunked(v, frozen, dropout, None)
}

fn op_out_chunked(
    v: &[Tensor],
    frozen: &[Tensor; 3],
    dropout: Option<MoeDropout>,
    chunk: Option<usize>,
) -> engine::Result<Tensor> {
    op_out_with(v, frozen, dropout, chunk, MoeKernels::BlockGemms)
}

/// The op's weights of [`op_inputs`]' variables (`v[2..8]`: A, B of gate, up, down) and frozen
/// shared weights, at scale 1.5.
fn fused_weights<'a>(
    v: &'a [Tensor],
    frozen: &'a [engine::FrozenWeight; 3],
) -> MoeFusedWeights<'a> {
    MoeFusedWeights {
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
    }
}

fn op_out_with(
    v: &[Tensor],
    frozen: &[Tensor; 3],
    dropout: Option<MoeDropout>,
    chunk: Option<usize>,
    kernels: MoeKernels,
) -> engine::Result<Tensor> {
    let sel = ids(&[0, 1, 1, 0, 0, 1, 1, 0, 0, 1], &[FT, FK]);
    let frozen = testutil::frozen(frozen);
    let w = fused_weights(v, &frozen);
    let route = MoeRouting {
        ids: &sel,
        weights: &v[1],
    };
    let opts = MoeFfnOptions {
        kernels,
        chunk_tokens: chunk,
    };
    engine::moe_ffn(&v[0], &w, &route, dropout, &opts)
}

#[test]
fn grad_moe_ffn_op() {
    let (v, frozen) = op_inputs();
    check_gradients("moe_ffn", &v, |v| op_out(v, &frozen, None));
    let drop = Some(MoeDropout { p: 0.3, seed: 4 });
    check_gradients("moe_ffn_dropout", &v, |v| op_out(v, &frozen, drop));
    // Chunks of 2 tokens (5 = 2 + 2 + 1): the per-chunk GEMMs, the joined codes and the
    // accumulated weight gradients.
    check_gradients("moe_ffn_chunked", &v, |v| {
        op_out_chunked(v, &frozen, drop, Some(2))
    });
}

/// On the CPU the op runs its tile primitives (per-expert GEMMs over tiles of tokens) whatever
/// the kernels say: both settings run them and give the same bits, in every base dtype.
#[test]
fn the_cpu_runs_its_tile_primitives() {
    let (v, frozen) = op_inputs();
    let drop = Some(MoeDropout { p: 0.3, seed: 9 });
    for dtype in [DType::F32, DType::BF16] {
        // The base in `dtype`; adapters and routing weights in f32 (its adapter dtype).
        let mut v: Vec<Tensor> = v.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        v[0] = v[0].to_dtype(dtype).unwrap();
        let frozen = frozen.clone().map(|t| t.to_dtype(dtype).unwrap());
        let frozen_w = testutil::frozen(&frozen);
        let w = fused_weights(&v, &frozen_w);
        for kernels in [MoeKernels::Tiles, MoeKernels::BlockGemms] {
            assert!(engine::moe_fused_runs_tiles(&v[0], &w, FK, kernels).unwrap());
        }
        let run = |kernels| {
            let y = op_out_with(&v, &frozen, drop, None, kernels).unwrap();
            y.to_vec_f64().unwrap()
        };
        assert_eq!(
            run(MoeKernels::Tiles),
            run(MoeKernels::BlockGemms),
            "{dtype}"
        );
    }
}

/// The op's output on `v` (as variables) in token chunks of `chunk`, then the gradient of `Σ y²`
/// for each of `v`: `[y, dv_0, dv_1, ..]` as f64 values.
fn out_and_grads(
    v: &[Tensor],
    frozen: &[Tensor; 3],
    drop: Option<MoeDropout>,
    chunk: Option<usize>,
) -> Vec<Vec<f64>> {
    let vars: Vec<Tensor> = v.iter().map(|t| t.to_var().unwrap()).collect();
    let y = op_out_chunked(&vars, frozen, drop, chunk).unwrap();
    y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y.to_vec_f64().unwrap()];
    out.extend(vars.iter().map(|t| t.grad().unwrap().to_vec_f64().unwrap()));
    out
}

/// The output and every gradient do not depend on the token chunking (f64: to rounding), with
/// dropout (its masks index slots among all the op's tokens, not the chunk's), for chunks of 1,
/// 2, 3 and ≥ T tokens; a chunk of 0 tokens is an error.
#[test]
fn chunking_changes_nothing() {
    let (v, frozen) = op_inputs();
    let drop = Some(MoeDropout { p: 0.3, seed: 9 });
    let run = |chunk: Option<usize>| out_and_grads(&v, &frozen, drop, chunk);
    let want = run(None);
    for chunk in [1, 2, 3, FT, 100] {
        for (n, (a, b)) in run(Some(chunk)).iter().zip(&want).enumerate() {
            let err = rel_err(a, b);
            assert!(
                err < 1e-12,
                "chunk {chunk}: tensor {n} differs by {err:.3e}"
            );
        }
    }
    assert!(op_out_chunked(&v, &frozen, None, Some(0)).is_err());
}

/// A dropout key ([`engine::set_dropout_key`]) for the tests.
const KEY: u64 = 0xD1B5_4A32_D192_ED03;

/// Under the dropout key K the op draws every mask from its seed XOR K: its derived seeds (gate,
/// up, down: `rng::hash(S, 0..3)`) are each XORed with K, so no op seed of key 0 stands in for
/// it; what holds is that the output and every gradient change with the key, that the backward
/// draws the forward's masks under it (the f64 finite-difference check, unchunked and in chunks
/// of 2 tokens, whose primitives each key once), that chunking changes nothing under it, and
/// that with the key back at 0 seed S gives its own results again. The primitives that draw the
/// down projection's mask are checked against seed S ^ K bit for bit below.
#[test]
fn dropout_key_changes_every_mask_and_keeps_forward_and_backward_together() {
    let (v, frozen) = op_inputs();
    let drop = Some(MoeDropout { p: 0.3, seed: 9 });
    let run = |chunk: Option<usize>| out_and_grads(&v, &frozen, drop, chunk);
    let plain = run(None);
    {
        let _key = DropoutKey::set(Device::Cpu, KEY);
        let keyed = run(None);
        for (n, (k, p)) in keyed.iter().zip(&plain).enumerate() {
            assert_ne!(k, p, "tensor {n}: the key changes it");
        }
        for (n, (a, b)) in run(Some(2)).iter().zip(&keyed).enumerate() {
            let err = rel_err(a, b);
            assert!(err < 1e-12, "chunks of 2: tensor {n} differs by {err:.3e}");
        }
        check_gradients("moe_ffn_dropout_keyed", &v, |v| op_out(v, &frozen, drop));
        check_gradients("moe_ffn_dropout_keyed_chunked", &v, |v| {
            op_out_chunked(v, &frozen, drop, Some(2))
        });
    }
    assert_eq!(run(None), plain, "the key is back at 0");
}

/// The bits of every result of the CPU primitives that draw the down projection's mask
/// (`swiglu_forward`, `swiglu_backward`, `tiles_forward`, `tiles_rows`, `tiles_cols`,
/// `tiles_backward`) at `FT`, `FK`, `FE`, `FR`, `FI` in f64, p = 0.3, with `MoeDims::seed` =
/// `seed`, under the thread's current dropout key.
fn moe_mask_primitives(seed: u64) -> Vec<Vec<u64>> {
    use engine::backend::BackendStorage;
    use engine::fused::moe_ffn::primitives as prim;
    use engine::fused::Operand;
    use engine::{Layout, Storage};
    let (t, k, e, r, i) = (FT, FK, FE, FR, FI);
    let d = MoeDims {
        t,
        k,
        e,
        r,
        i,
        dropout: 0.3,
        seed,
        t0: 0,
    };
    let dev = Device::Cpu;
    let ids_f: Vec<f64> = (0..t * k).map(|p| ((p / k + p % k) % e) as f64).collect();
    let ids = Storage::upload_f64(dev, &ids_f, DType::U32).unwrap();
    let data = |n: usize, s: u64| -> Vec<f64> {
        (0..n as u64)
            .map(|j| engine::rng::uniform(s, j) * 2.0 - 1.0)
            .collect()
    };
    let up = |rows: usize, cols: usize, s: u64| {
        let st = Storage::upload_f64(dev, &data(rows * cols, s), DType::F64).unwrap();
        (st, Layout::contiguous([rows, cols]))
    };
    let (g, u, w) = (up(t, i, 1), up(t, i, 2), up(t, k, 3));
    let (dg, du, dd) = (up(t * k, i, 4), up(t * k, i, 5), up(t * k, i, 6));
    let (cg, cu, cd) = (up(t * k, r, 7), up(t * k, r, 8), up(t * k, r, 9));
    let (bg, bu, ad) = (up(i, e * r, 10), up(i, e * r, 11), up(e * r, i, 12));
    let dabar = up(t, i, 13);
    let ids_l = Layout::contiguous([t, k]);
    fn o((s, l): &(Storage, Layout)) -> Operand<'_, Storage> {
        Operand::new(s, l)
    }
    let ids_o = Operand::new(&ids, &ids_l);
    // The bits of a contiguous result of `n` elements.
    let read = |s: &Storage, n: usize| -> Vec<u64> {
        let v = s.to_f64_vec(&Layout::contiguous([n])).unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let (ti, ski, skr, ter) = (t * i, t * k * i, t * k * r, e * r * i);
    let mut out = Vec::new();
    let (abar, am) = prim::swiglu_forward(
        prim::SwigluForward {
            g: o(&g),
            u: o(&u),
            dg: o(&dg),
            du: o(&du),
            w: o(&w),
        },
        &d,
    )
    .unwrap();
    out.extend([read(&abar, ti), read(&am, ski)]);
    let sg = prim::swiglu_backward(
        prim::SwigluBackward {
            g: o(&g),
            u: o(&u),
            dg: o(&dg),
            du: o(&du),
            dd: o(&dd),
            dabar: o(&dabar),
            w: o(&w),
        },
        &d,
    )
    .unwrap();
    out.extend([
        read(&sg.dgu, 2 * ti),
        read(&sg.dg, ski),
        read(&sg.du, ski),
        read(&sg.am, ski),
        read(&sg.dw, t * k),
    ]);
    let (abar, zd) = prim::tiles_forward(
        prim::TilesForward {
            g: o(&g),
            u: o(&u),
            cg: o(&cg),
            cu: o(&cu),
            ids: ids_o,
            bg: o(&bg),
            bu: o(&bu),
            ad: o(&ad),
            w: o(&w),
        },
        &d,
    )
    .unwrap();
    out.extend([read(&abar, ti), read(&zd, skr)]);
    let tb = || prim::TilesBackward {
        g: o(&g),
        u: o(&u),
        cg: o(&cg),
        cu: o(&cu),
        cd: o(&cd),
        ids: ids_o,
        bg: o(&bg),
        bu: o(&bu),
        ad: o(&ad),
        dabar: o(&dabar),
        w: o(&w),
    };
    let rows_bits = |g: &prim::TileRowGrads<Storage>| {
        [
            read(&g.dgu, 2 * ti),
            read(&g.dzg, skr),
            read(&g.dzu, skr),
            read(&g.dw, t * k),
        ]
    };
    let cols_bits = |(dbg, dbu, dad): &(Storage, Storage, Storage)| {
        [read(dbg, ter), read(dbu, ter), read(dad, ter)]
    };
    out.extend(rows_bits(&prim::tiles_rows(tb(), &d).unwrap()));
    out.extend(cols_bits(&prim::tiles_cols(tb(), &d).unwrap()));
    let (rows, cols) = prim::tiles_backward(tb(), &d, true).unwrap();
    out.extend(rows_bits(&rows));
    out.extend(cols_bits(&cols.unwrap()));
    out
}

/// Under the dropout key K, each CPU primitive that draws the down projection's mask gives with
/// `MoeDims::seed` S bit for bit what it gives with S ^ K under key 0 (keyed once, also where
/// `tiles_rows` and `tiles_cols` run `tiles_backward`), and every result that depends on the mask
/// changes with the key.
#[test]
fn moe_mask_primitives_draw_from_the_seed_xor_the_key() {
    const SEED: u64 = 0x1234_5678;
    let plain = moe_mask_primitives(SEED);
    let keyed = {
        let _key = DropoutKey::set(Device::Cpu, KEY);
        moe_mask_primitives(SEED)
    };
    let want = moe_mask_primitives(SEED ^ KEY);
    assert_eq!(keyed.len(), 23);
    for (n, (k, w)) in keyed.iter().zip(&want).enumerate() {
        assert!(!k.is_empty(), "result {n} is empty");
        assert_eq!(k, w, "result {n}: key K, seed S = seed S ^ K");
    }
    // Ā (results 0 and 7) and dw = ⟨dĀ[t], a_j⟩ (6, 12, 19) hold no mask; the others do.
    for (n, (k, p)) in keyed.iter().zip(&plain).enumerate() {
        if [0, 6, 7, 12, 19].contains(&n) {
            assert_eq!(k, p, "result {n} holds no mask");
        } else {
            assert_ne!(k, p, "result {n}: the key changes it");
        }
    }
}

#[test]
fn moe_ffn_op_typed_errors() {
    let (v, frozen) = op_inputs();
    // x with the wrong hidden size.
    let mut bad = v.clone();
    bad[0] = randn(&[FT, FH + 1], 1);
    assert!(matches!(
        op_out(&bad, &frozen, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    // Routing weights in the wrong dtype.
    let mut bad = v.clone();
    bad[1] = bad[1].to_dtype(DType::F32).unwrap();
    assert!(matches!(
        op_out(&bad, &frozen, None),
        Err(engine::Error::DTypeMismatch { .. })
    ));
    // A trainable shared weight would silently get no gradient: refused.
    let mut fz = frozen.clone();
    fz[2] = fz[2].to_var().unwrap();
    assert!(op_out(&v, &fz, None).is_err());
}

/// A whole tiny f64 LLaMA with MixLoRA (E = 4, top-2, r = 2, random adapters): the logits and the
/// gradient of every adapter tensor agree between `Naive` and `Fused`, and `stack_gate_up` (one
/// `[2I, H]` buffer for W_gate and W_up, the single-GEMM path) changes nothing.
#[test]
fn tiny_llama_fused_equals_naive() {
    use model::{AdapterConfig, Llama, LlamaConfig};
    let config = LlamaConfig {
        tie_word_embeddings: true,
        ..testutil::tiny_llama_config()
    };
    let mut m = Llama::random(config, 3, DType::F64, Device::Cpu).unwrap();
    m.embed_tokens = m.embed_tokens.affine(50.0, 0.0).unwrap();
    for l in &mut m.layers {
        l.gate_proj = testutil::dense(&l.gate_proj)
            .affine(15.0, 0.0)
            .unwrap()
            .into();
        l.up_proj = testutil::dense(&l.up_proj)
            .affine(15.0, 0.0)
            .unwrap()
            .into();
        l.down_proj = testutil::dense(&l.down_proj)
            .affine(15.0, 0.0)
            .unwrap()
            .into();
    }
    let cfg = AdapterConfig {
        num_experts: 4,
        r: 2,
        lora_alpha: 4.0,
        ..AdapterConfig::mixlora_default()
    };
    m.add_adapters(&cfg, 1).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        let v = randn(t.dims(), 3000 + k as u64).affine(0.4, 0.0).unwrap();
        m.set_trainable_param(&name, v.to_var().unwrap()).unwrap();
    }
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 6], &[2, 5]);
    let r = randn(&[2, 5, 11], 77);
    let run = |m: &Llama| {
        let params = m.trainable_params();
        for (_, p) in &params {
            p.zero_grad();
        }
        let logits = m.forward(&tokens, None).unwrap();
        logits
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads: Vec<Vec<f64>> = params
            .iter()
            .map(|(_, p)| {
                p.grad()
                    .map_or_else(|| vec![0.0; p.elem_count()], |g| g.to_vec_f64().unwrap())
            })
            .collect();
        (logits.to_vec_f64().unwrap(), grads)
    };
    m.set_moe_impl(MoeImpl::Naive);
    let (l0, g0) = run(&m);
    m.set_moe_impl(MoeImpl::Fused(Default::default()));
    let (l1, g1) = run(&m);
    m.stack_gate_up().unwrap();
    assert!(
        testutil::dense(&m.layers[0].gate_proj).same_storage(testutil::dense(&m.layers[0].up_proj))
    );
    let (l2, g2) = run(&m);
    for (name, l, g) in [("fused", &l1, &g1), ("fused, stacked gate/up", &l2, &g2)] {
        let err = rel_err(l, &l0);
        assert!(err < 1e-10, "{name}: logits differ by {err:.3e}");
        for (k, (a, b)) in g.iter().zip(&g0).enumerate() {
            let err = rel_err(a, b);
            assert!(err < 1e-10, "{name}: gradient {k} differs by {err:.3e}");
        }
    }
}

/// The default chunking splits the tokens evenly into the fewest chunks whose `[chunk·k, I]`
/// slot tensors hold at most 3·2^25 elements, in multiples of 128 tokens where that fits.
#[test]
fn default_chunks_are_even_and_within_the_cap() {
    use engine::default_chunk_tokens;
    assert_eq!(default_chunk_tokens(4096, 2, 11008), 4096); // one chunk
    assert_eq!(default_chunk_tokens(16384, 2, 11008), 4096); // 4 × 4096, not 3 × 4480 + 2944
    assert_eq!(default_chunk_tokens(12000, 2, 11008), 4096); // 2 × 4096 + 3808
    assert_eq!(default_chunk_tokens(100, 2, 64), 100);
    assert_eq!(default_chunk_tokens(0, 2, 64), 1);
    for (k, i) in [(2, 11008), (1, 1536), (2, 1536), (8, 1 << 20), (2, 1 << 26)] {
        let cap = ((3usize << 25) / (k * i)).max(1);
        for t in (1..40_000).step_by(997).chain([1, 127, 128, 4096, 16384]) {
            let c = default_chunk_tokens(t, k, i);
            assert!((1..=t).contains(&c), "t {t} k {k} i {i}: chunk {c}");
            assert!(c <= cap, "t {t} k {k} i {i}: chunk {c} over the cap {cap}");
            assert_eq!(
                t.div_ceil(c),
                t.div_ceil(cap),
                "t {t} k {k} i {i}: chunk {c}"
            );
        }
    }
}

/// The primitives' sizes for `t` tokens, `k` slots a token, `e` experts and rank `r` (no
/// dropout), and expert ids `[t, k]` as f64 (for an upload): each token's `k` experts distinct,
/// all among the first `e − 1`, so that expert `e − 1` gets no slot (needs `k < e`, `e − 1`
/// odd or `k` ≤ 2 for distinctness: offsets `0, 2, 4, ..` modulo `e − 1`).
fn moe_codes_case(t: usize, k: usize, e: usize, r: usize) -> (MoeDims, Vec<f64>) {
    let ids: Vec<f64> = (0..t)
        .flat_map(|tt| (0..k).map(move |j| ((tt * 3 + j * 2) % (e - 1)) as f64))
        .collect();
    let d = MoeDims {
        t,
        k,
        e,
        r,
        i: 1,
        dropout: 0.0,
        seed: 0,
        t0: 0,
    };
    (d, ids)
}

/// The `(source, output)` dtype pairs `moe_block_codes` serves, each with the adapter
/// (accumulation) dtype of its source: f64 for f64, else f32.
const BLOCK_CODES_DTYPES: [(DType, DType, DType); 5] = [
    (DType::F32, DType::BF16, DType::F32),
    (DType::F32, DType::F32, DType::F32),
    (DType::BF16, DType::BF16, DType::F32),
    (DType::BF16, DType::F32, DType::F32),
    (DType::F64, DType::F64, DType::F64),
];

/// `moe_block_codes` (the fused op's one-pass code layouts) gives the bits of the separate ops it
/// replaces, on the CPU (the reference of the GPU kernel): per slot from per-token codes
/// (gather, affine by s, expand, conversion), with routing weights (gather, s·w, mul, expand,
/// conversion), and summed per token from per-slot codes (gather, affine, expand_summed,
/// conversion); f32 and bf16 results of f32 or bf16 codes, and f64; k = 1, 2 and 4, an odd rank,
/// an expert with no slot, negative codes and zeros among them.
#[test]
fn block_codes_equal_the_separate_ops_bit_for_bit() {
    use engine::backend::{BackendStorage, BinaryOp, UnaryOp};
    use engine::fused::moe_ffn::primitives::{self as prim, BlockCodes};
    use engine::fused::Operand;
    use engine::{Layout, Storage};
    let dev = Device::Cpu;
    let bits = |s: &Storage, n: usize| -> Vec<u64> {
        s.to_f64_vec(&Layout::contiguous([n]))
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for (t, k, e, r) in [(37, 2, 8, 16), (5, 1, 4, 3), (9, 4, 8, 5)] {
        // experts 0 .. e − 1 only: expert e − 1 gets no slot
        let (d, ids_f) = moe_codes_case(t, k, e, r);
        let distinct = (0..t).all(|tt| {
            let row = &ids_f[tt * k..(tt + 1) * k];
            row.iter().enumerate().all(|(a, x)| !row[..a].contains(x))
        });
        assert!(distinct, "the test's ids repeat an expert within a token");
        let ids = Storage::upload_f64(dev, &ids_f, DType::U32).unwrap();
        let ids_l = Layout::contiguous([t, k]);
        let er = e * r;
        let vals = |n: usize, seed: u64| -> Vec<f64> {
            (0..n as u64)
                .map(|i| {
                    let v = engine::rng::uniform(seed, i) * 4.0 - 2.0;
                    if i % 7 == 3 {
                        0.0
                    } else if i % 11 == 5 {
                        -0.0
                    } else {
                        v
                    }
                })
                .collect()
        };
        for (src_dt, out_dt, acc) in BLOCK_CODES_DTYPES {
            let s = 1.7;
            let affine = UnaryOp::Affine { mul: s, add: 0.0 };
            let codes_l = Layout::contiguous([t, k, r]);
            let w = Storage::upload_f64(dev, &vals(t * k, 9), acc).unwrap();
            let w_l = Layout::contiguous([t, k]);
            for (summed, weighted) in [(false, false), (false, true), (true, false)] {
                let src_rows = if summed { t * k } else { t };
                let src = Storage::upload_f64(dev, &vals(src_rows * er, 3), src_dt).unwrap();
                let src_l = Layout::contiguous([src_rows, er]);
                // The separate ops.
                let g = prim::gather_codes(
                    prim::GatherCodes {
                        src: Operand::new(&src, &src_l),
                        ids: Operand::new(&ids, &ids_l),
                    },
                    &d,
                )
                .unwrap();
                let scaled = if weighted {
                    let sw = w.unary(&w_l, affine).unwrap(); // s·w [T, k]
                    let sw_b = Layout::new([t, k, r].into(), vec![k, 1, 0], 0);
                    g.binary(&codes_l, &sw, &sw_b, BinaryOp::Mul).unwrap()
                } else {
                    g.unary(&codes_l, affine).unwrap()
                };
                let codes = prim::ExpandCodes {
                    codes: Operand::new(&scaled, &codes_l),
                    ids: Operand::new(&ids, &ids_l),
                };
                let blocks = prim::expand_codes(codes, &d, summed).unwrap();
                let out_rows = if summed { t } else { t * k };
                let want = blocks
                    .to_dtype(&Layout::contiguous([out_rows, er]), out_dt)
                    .unwrap();
                // One pass.
                let how = BlockCodes {
                    scale: s,
                    summed,
                    dtype: out_dt,
                };
                let blocks = prim::Blocks {
                    src: Operand::new(&src, &src_l),
                    ids: Operand::new(&ids, &ids_l),
                    w: weighted.then(|| Operand::new(&w, &w_l)),
                };
                let got = prim::block_codes(blocks, &d, &how).unwrap();
                assert_eq!(got.dtype(), out_dt);
                let what = format!(
                    "t {t} k {k} e {e} r {r}, {src_dt} → {out_dt}, summed {summed}, weighted {weighted}"
                );
                assert_eq!(
                    bits(&got, out_rows * er),
                    bits(&want, out_rows * er),
                    "{what}"
                );
            }
        }
    }
}

/// `moe_block_codes` refuses weights with summed codes, an f64 source into another dtype, and
/// operands of the wrong sizes, with errors that name the op.
#[test]
fn block_codes_errors() {
    use engine::fused::moe_ffn::primitives::{self as prim, BlockCodes};
    use engine::fused::Operand;
    use engine::{Layout, Storage};
    let dev = Device::Cpu;
    let d = MoeDims {
        t: 3,
        k: 2,
        e: 4,
        r: 2,
        i: 1,
        dropout: 0.0,
        seed: 0,
        t0: 0,
    };
    let ids = Storage::upload_f64(dev, &[0.0, 1.0, 2.0, 3.0, 1.0, 0.0], DType::U32).unwrap();
    let ids_l = Layout::contiguous([3, 2]);
    let per_token = Storage::upload_f64(dev, &[0.5; 24], DType::F32).unwrap();
    let per_token_l = Layout::contiguous([3, 8]);
    let w = Storage::upload_f64(dev, &[0.5; 6], DType::F32).unwrap();
    let how = |summed, dtype| BlockCodes {
        scale: 2.0,
        summed,
        dtype,
    };
    let err = |w: Option<(&Storage, &Layout)>, h: BlockCodes| {
        let blocks = prim::Blocks {
            src: Operand::new(&per_token, &per_token_l),
            ids: Operand::new(&ids, &ids_l),
            w: w.map(|(s, l)| Operand::new(s, l)),
        };
        match prim::block_codes(blocks, &d, &h) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(Some((&w, &ids_l)), how(true, DType::F32));
    assert!(e.contains("moe_block_codes"), "{e}");
    let e = err(None, how(false, DType::F64));
    assert!(e.contains("moe_block_codes"), "{e}");
    // summed wants [T·k, E·r] = 48 elements, not 24
    let e = err(None, how(true, DType::F32));
    assert!(e.contains("moe_block_codes"), "{e}");
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{moe_codes_case, BLOCK_CODES_DTYPES};
    use engine::backend::BackendStorage;
    use engine::fused::moe_ffn::primitives::{self as prim, BlockCodes};
    use engine::fused::Operand;
    use engine::{
        moe_ffn, DType, Device, Layout, MoeDropout, MoeFfnOptions, MoeFusedWeights, MoeKernels,
        MoeRouting, Storage, Tensor,
    };
    use model::adapters::{
        ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn,
    };
    use testutil::gpu::{device as gpu, serial, tol};
    use testutil::rel_err;

    /// Deterministic values in ±[0.1, 1.1) × `scale` (never zero).
    fn vals(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = 0.1 + engine::rng::uniform(seed, i);
                let sign = if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -1.0
                } else {
                    1.0
                };
                sign * mag * scale
            })
            .collect()
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        t: usize,
        h: usize,
        i: usize,
        e: usize,
        k: usize,
        r: usize,
        /// Expert e − 1 receives no token.
        idle: bool,
        /// W_gate and W_up as adjacent row blocks of one buffer (one GEMM, G/U read in place).
        adjacent: bool,
        dropout: Option<f64>,
        /// Tokens per chunk (None: the op's default, one chunk at these sizes).
        chunk: Option<usize>,
    }

    /// k distinct experts per token (from the first `e − idle` ones), deterministic.
    fn routing_ids(c: Case) -> Vec<u32> {
        let usable = c.e - c.idle as usize;
        let mut v = Vec::with_capacity(c.t * c.k);
        let mut rng = engine::rng::Rng::new(c.t as u64 * 31 + c.e as u64);
        for _ in 0..c.t {
            let mut picks: Vec<u32> = (0..usable as u32).collect();
            rng.shuffle(&mut picks);
            v.extend_from_slice(&picks[..c.k]);
        }
        v
    }

    /// `[y, dx, dw, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d]` of the op on `dev`, read back.
    fn run(
        dev: Device,
        c: Case,
        base: DType,
        kernels: MoeKernels,
    ) -> Vec<(&'static str, Vec<f64>)> {
        let at = if base == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let t = |v: Vec<f64>, shape: Vec<usize>, dt: DType| {
            Tensor::from_f64(&v, shape, dt, dev).unwrap()
        };
        let var = |v: Vec<f64>, shape: Vec<usize>, dt: DType| t(v, shape, dt).to_var().unwrap();
        let (sh, si) = (1.0 / (c.h as f64).sqrt(), 1.0 / (c.i as f64).sqrt());
        let x = var(vals(c.t * c.h, 1, 1.0), vec![c.t, c.h], base);
        let w = var(
            vals(c.t * c.k, 2, 1.0).iter().map(|v| v.abs()).collect(),
            vec![c.t, c.k],
            at,
        );
        let er = c.e * c.r;
        let a_gate = var(vals(er * c.h, 3, sh), vec![c.e, c.r, c.h], at);
        let b_gate = var(vals(c.e * c.i * c.r, 4, 0.3), vec![c.e, c.i, c.r], at);
        let a_up = var(vals(er * c.h, 5, sh), vec![c.e, c.r, c.h], at);
        let b_up = var(vals(c.e * c.i * c.r, 6, 0.3), vec![c.e, c.i, c.r], at);
        let a_down = var(vals(er * c.i, 7, si), vec![c.e, c.r, c.i], at);
        let b_down = var(vals(c.e * c.h * c.r, 8, 0.3), vec![c.e, c.h, c.r], at);
        let (w_gate, w_up) = if c.adjacent {
            let gu = t(vals(2 * c.i * c.h, 9, sh), vec![2 * c.i, c.h], base);
            (
                gu.narrow(0, 0, c.i).unwrap(),
                gu.narrow(0, c.i, c.i).unwrap(),
            )
        } else {
            (
                t(vals(c.i * c.h, 9, sh), vec![c.i, c.h], base),
                t(vals(c.i * c.h, 10, sh), vec![c.i, c.h], base),
            )
        };
        let w_down = t(vals(c.h * c.i, 11, si), vec![c.h, c.i], base);
        let ids = Tensor::from_vec(routing_ids(c), [c.t, c.k], dev).unwrap();
        if c.idle {
            let used = ids.to_vec_u32().unwrap();
            assert!(
                !used.contains(&(c.e as u32 - 1)),
                "{c:?}: the last expert must be idle"
            );
        }
        let weights = MoeFusedWeights {
            w_gate: &engine::FrozenWeight::from(w_gate.clone()),
            w_up: &engine::FrozenWeight::from(w_up.clone()),
            w_down: &engine::FrozenWeight::from(w_down.clone()),
            a_gate: &a_gate,
            b_gate: &b_gate,
            a_up: &a_up,
            b_up: &b_up,
            a_down: &a_down,
            b_down: &b_down,
            scale: 2.0,
        };
        let route = MoeRouting {
            ids: &ids,
            weights: &w,
        };
        let dropout = c.dropout.map(|p| MoeDropout { p, seed: 17 });
        let opts = MoeFfnOptions {
            kernels,
            chunk_tokens: c.chunk,
        };
        let y = moe_ffn(&x, &weights, &route, dropout, &opts).unwrap();
        assert_eq!(y.dtype(), base);
        let dy = t(vals(c.t * c.h, 12, 1.0), vec![c.t, c.h], base);
        y.backward_with_grad(&dy).unwrap();
        let grad = |p: &Tensor| p.grad().expect("gradient").to_vec_f64().unwrap();
        vec![
            ("y", y.to_vec_f64().unwrap()),
            ("dx", grad(&x)),
            ("dw", grad(&w)),
            ("dA_gate", grad(&a_gate)),
            ("dB_gate", grad(&b_gate)),
            ("dA_up", grad(&a_up)),
            ("dB_up", grad(&b_up)),
            ("dA_down", grad(&a_down)),
            ("dB_down", grad(&b_down)),
        ]
    }

    const CASES: [Case; 8] = [
        Case {
            t: 37,
            h: 20,
            i: 27,
            e: 4,
            k: 2,
            r: 4,
            idle: true,
            adjacent: false,
            dropout: None,
            chunk: None,
        },
        Case {
            t: 300,
            h: 256,
            i: 688,
            e: 8,
            k: 2,
            r: 16,
            idle: false,
            adjacent: true,
            dropout: None,
            chunk: None,
        },
        Case {
            t: 300,
            h: 256,
            i: 688,
            e: 8,
            k: 2,
            r: 16,
            idle: true,
            adjacent: false,
            dropout: Some(0.1),
            chunk: Some(128),
        },
        Case {
            t: 513,
            h: 96,
            i: 257,
            e: 8,
            k: 1,
            r: 8,
            idle: true,
            adjacent: true,
            dropout: None,
            chunk: Some(100),
        },
        Case {
            t: 1,
            h: 33,
            i: 65,
            e: 4,
            k: 2,
            r: 3,
            idle: false,
            adjacent: true,
            dropout: Some(0.3),
            chunk: None,
        },
        // Sizes the tensor-core kernels serve in bf16 (k = 4, 8, 1; E·r = 64, 32, 64 below the
        // 128 they hold; I not a multiple of their 32-column step; T·k not a multiple of their
        // 64-row tile), with dropout and chunks.
        Case {
            t: 77,
            h: 48,
            i: 264,
            e: 8,
            k: 4,
            r: 8,
            idle: true,
            adjacent: true,
            dropout: Some(0.2),
            chunk: None,
        },
        Case {
            t: 50,
            h: 40,
            i: 40,
            e: 8,
            k: 8,
            r: 4,
            idle: false,
            adjacent: false,
            dropout: None,
            chunk: None,
        },
        Case {
            t: 130,
            h: 64,
            i: 96,
            e: 4,
            k: 1,
            r: 16,
            idle: true,
            adjacent: true,
            dropout: Some(0.1),
            chunk: Some(50),
        },
    ];

    /// The cases the tensor-core kernels serve in bf16 on the GPU when asked (the rest run the
    /// block-code GEMMs): a change that silently turned them off would leave them untested.
    #[test]
    fn the_tensor_core_kernels_serve_the_cases_they_should() {
        let Some(dev) = gpu() else { return };
        for (n, c) in CASES.iter().enumerate() {
            let x = Tensor::zeros([c.t, c.h], DType::BF16, dev).unwrap();
            let f = |dims: Vec<usize>| Tensor::zeros(dims, DType::F32, dev).unwrap();
            let wb = |dims: Vec<usize>| Tensor::zeros(dims, DType::BF16, dev).unwrap();
            let (ag, bg, ad, bd) = (
                f(vec![c.e, c.r, c.h]),
                f(vec![c.e, c.i, c.r]),
                f(vec![c.e, c.r, c.i]),
                f(vec![c.e, c.h, c.r]),
            );
            let (wg, wd) = (wb(vec![c.i, c.h]), wb(vec![c.h, c.i]));
            let weights = MoeFusedWeights {
                w_gate: &engine::FrozenWeight::from(wg.clone()),
                w_up: &engine::FrozenWeight::from(wg.clone()),
                w_down: &engine::FrozenWeight::from(wd.clone()),
                a_gate: &ag,
                b_gate: &bg,
                a_up: &ag,
                b_up: &bg,
                a_down: &ad,
                b_down: &bd,
                scale: 1.0,
            };
            let want = n == 1 || n == 2 || n >= 5;
            let tiles =
                |x: &Tensor, kernels| engine::moe_fused_runs_tiles(x, &weights, c.k, kernels);
            assert_eq!(
                tiles(&x, MoeKernels::Tiles).unwrap(),
                want,
                "case {n}: {c:?}"
            );
            assert!(!tiles(&x, MoeKernels::BlockGemms).unwrap());
            let x32 = x.to_dtype(DType::F32).unwrap();
            assert!(!tiles(&x32, MoeKernels::Tiles).unwrap());
        }
    }

    #[test]
    fn moe_ffn_op_cuda_matches_cpu() {
        let Some(dev) = gpu() else { return };
        let mut failures = Vec::new();
        for c in CASES {
            for base in [DType::F32, DType::BF16, DType::F64] {
                let want = run(Device::Cpu, c, base, MoeKernels::BlockGemms);
                // Both GPU paths (the tile kernels serve some bf16 cases; see the next test).
                for kernels in [MoeKernels::BlockGemms, MoeKernels::Tiles] {
                    let got = run(dev, c, base, kernels);
                    for ((name, a), (_, b)) in got.iter().zip(&want) {
                        let err = rel_err(a, b);
                        println!("{base} {kernels:?} {c:?} {name}: {err:.2e}");
                        if err > tol(base) {
                            failures.push(format!(
                                "{base} {kernels:?} {c:?} {name}: {err:.3e} > {}",
                                tol(base)
                            ));
                        }
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// `MoeImpl::Fused` through a whole MixLoRA block (router, top-k, gather of the weights,
    /// stacking of the experts, grouping) on the GPU against the CPU, f32 and bf16 base.
    #[test]
    fn mixlora_block_fused_cuda_matches_cpu() {
        let Some(dev) = gpu() else { return };
        let (t, h, i, e, r) = (77, 64, 176, 8, 8);
        for base in [DType::F32, DType::BF16] {
            let run = |dev: Device| {
                let f = |v: Vec<f64>, shape: Vec<usize>, dt: DType| {
                    Tensor::from_f64(&v, shape, dt, dev).unwrap()
                };
                let x = f(vals(t * h, 1, 1.0), vec![t, h], base).to_var().unwrap();
                let router = f(vals(e * h, 2, 0.5), vec![e, h], DType::F32)
                    .to_var()
                    .unwrap();
                let shared = [
                    f(vals(i * h, 3, 0.125), vec![i, h], base),
                    f(vals(i * h, 4, 0.125), vec![i, h], base),
                    f(vals(h * i, 5, 0.075), vec![h, i], base),
                ];
                let mut seed = 10;
                let mut lora = |n_in: usize, n_out: usize| {
                    seed += 2;
                    let a = f(vals(r * n_in, seed, 0.1), vec![r, n_in], DType::F32);
                    let b = f(vals(n_out * r, seed + 1, 0.3), vec![n_out, r], DType::F32);
                    Some(LoraLinear::new(
                        a.to_var().unwrap(),
                        b.to_var().unwrap(),
                        2.0,
                        0.0,
                    ))
                };
                let ffn = MixLoraFfn {
                    router: Router {
                        weight: router.clone(),
                        routing: Routing::TopK(2),
                    },
                    experts: (0..e)
                        .map(|_| ExpertLora {
                            gate: lora(h, i),
                            up: lora(h, i),
                            down: lora(i, h),
                        })
                        .collect(),
                };
                let sh = SharedFfn {
                    gate: &engine::FrozenWeight::from(shared[0].clone()),
                    up: &engine::FrozenWeight::from(shared[1].clone()),
                    down: &engine::FrozenWeight::from(shared[2].clone()),
                };
                let (y, _) = ffn
                    .forward(&x, sh, MoeImpl::Fused(Default::default()), None)
                    .unwrap();
                let dy = f(vals(t * h, 99, 1.0), vec![t, h], base);
                y.backward_with_grad(&dy).unwrap();
                let mut out = vec![
                    y.to_vec_f64().unwrap(),
                    x.grad().unwrap().to_vec_f64().unwrap(),
                    router.grad().unwrap().to_vec_f64().unwrap(),
                ];
                for ex in &ffn.experts {
                    for l in [&ex.gate, &ex.up, &ex.down] {
                        let l = l.as_ref().unwrap();
                        out.push(l.a.grad().unwrap().to_vec_f64().unwrap());
                        out.push(l.b.grad().unwrap().to_vec_f64().unwrap());
                    }
                }
                out
            };
            let (want, got) = (run(Device::Cpu), run(dev));
            for (n, (a, b)) in got.iter().zip(&want).enumerate() {
                let err = rel_err(a, b);
                assert!(
                    err <= tol(base),
                    "{base}: tensor {n} (0 = y, 1 = dx, 2 = router, then experts' A, B) differs by {err:.3e}"
                );
            }
        }
    }

    /// Deterministic values in ±[0.1, 2.1) (never zero), from `seed`: those of the primitives'
    /// parity tests (the `gpu` modules of tests/tests/ops/).
    fn signed(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let u = engine::rng::uniform(seed, i);
                let mag = 0.1 + 2.0 * u;
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    fn up(dev: Device, data: &[f64], dtype: DType) -> Storage {
        Storage::upload_f64(dev, data, dtype).expect("upload")
    }

    /// `moe_block_codes` (the fused MoE FFN's one-pass code layouts) on the GPU gives the CPU's
    /// bits: per slot, with routing weights, and summed per token; every source and result dtype
    /// pair the kernel is built for; k = 1, 2 and 4, an odd rank, an expert with no slot, sizes
    /// that are not multiples of the 256-thread block, and zeros of both signs among the codes.
    #[test]
    fn moe_block_codes_bit_for_bit() {
        let _serial = serial();
        let Some(gpu) = gpu() else { return };
        for (t, k, e, r) in [
            (37usize, 2usize, 8usize, 16usize),
            (5, 1, 4, 3),
            (300, 4, 8, 5),
        ] {
            let (d, ids_v) = moe_codes_case(t, k, e, r);
            let ids_l = Layout::contiguous([t, k]);
            let er = e * r;
            let codes = |n: usize, seed: u64| -> Vec<f64> {
                signed(n, seed)
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| match i % 13 {
                        3 => 0.0,
                        7 => -0.0,
                        _ => v,
                    })
                    .collect()
            };
            for (src_dt, out_dt, acc) in BLOCK_CODES_DTYPES {
                for (summed, weighted) in [(false, false), (false, true), (true, false)] {
                    let src_rows = if summed { t * k } else { t };
                    let out_rows = if summed { t } else { t * k };
                    let (src_v, w_v) = (codes(src_rows * er, 5), signed(t * k, 6));
                    let run = |dev: Device| -> Vec<u64> {
                        let src = up(dev, &src_v, src_dt);
                        let ids = up(dev, &ids_v, DType::U32);
                        let w = up(dev, &w_v, acc);
                        let src_l = Layout::contiguous([src_rows, er]);
                        let blocks = prim::Blocks {
                            src: Operand::new(&src, &src_l),
                            ids: Operand::new(&ids, &ids_l),
                            w: weighted.then(|| Operand::new(&w, &ids_l)),
                        };
                        let how = BlockCodes {
                            scale: 1.7,
                            summed,
                            dtype: out_dt,
                        };
                        let out = prim::block_codes(blocks, &d, &how).unwrap();
                        assert_eq!(out.dtype(), out_dt);
                        out.to_f64_vec(&Layout::contiguous([out_rows, er]))
                            .expect("read back")
                            .iter()
                            .map(|v| v.to_bits())
                            .collect()
                    };
                    assert_eq!(
                        run(gpu),
                        run(Device::Cpu),
                        "t {t} k {k} e {e} r {r}, {src_dt} → {out_dt}, summed {summed}, \
                         weighted {weighted}"
                    );
                }
            }
        }
    }
}
