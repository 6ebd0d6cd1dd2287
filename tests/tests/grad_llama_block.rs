//! End-to-end gradient check: a tiny two-layer LLaMA-style model (embedding, RMSNorm, RoPE,
//! grouped-query causal attention with a padding mask, SwiGLU, tied LM head, cross-entropy with
//! ignored targets) with LoRA on all seven projections. Only the LoRA matrices are variables; the
//! base weights stay frozen and must get no gradient.

use engine::{
    causal_attention, rope_inv_freq, rope_tables, DType, Device, Result, Tensor, IGNORE_INDEX,
};
use testutil::{check_gradients, ids, randn};

const H: usize = 8; // hidden
const NH: usize = 2; // query heads
const NKV: usize = 1; // key/value heads
const D: usize = 4; // head dim
const I: usize = 12; // intermediate
const V: usize = 11; // vocab
const R: usize = 2; // LoRA rank
const B: usize = 2;
const T: usize = 5;
const SCALE: f64 = 2.0; // alpha / r

/// (out, in) of q, k, v, o, gate, up, down.
const PROJ: [(usize, usize); 7] = [
    (NH * D, H),
    (NKV * D, H),
    (NKV * D, H),
    (H, NH * D),
    (I, H),
    (I, H),
    (H, I),
];

struct Frozen {
    embed: Tensor,          // [V, H]
    norms: Vec<Tensor>,     // 2 per layer + final, [H]
    proj: Vec<Vec<Tensor>>, // per layer, 7 × [out, in]
}

fn frozen() -> Frozen {
    let mut seed = 100;
    let mut next = || {
        seed += 1;
        seed
    };
    Frozen {
        embed: randn(&[V, H], next()),
        norms: (0..5)
            .map(|_| randn(&[H], next()).affine(0.1, 1.0).unwrap())
            .collect(),
        proj: (0..2)
            .map(|_| {
                PROJ.iter()
                    .map(|&(o, i)| randn(&[o, i], next()).affine(0.3, 0.0).unwrap())
                    .collect()
            })
            .collect(),
    }
}

/// LoRA matrices: per layer, per projection, A [R, in] then B [out, R] (B random, not zero, so
/// that A's gradient is not trivially zero).
fn lora_params() -> Vec<Tensor> {
    let mut v = Vec::new();
    let mut seed = 500;
    for _ in 0..2 {
        for &(o, i) in &PROJ {
            seed += 2;
            v.push(randn(&[R, i], seed).affine(0.3, 0.0).unwrap());
            v.push(randn(&[o, R], seed + 1).affine(0.3, 0.0).unwrap());
        }
    }
    v
}

/// `x Wᵀ + s · (x Aᵀ) Bᵀ`.
fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?
        .add(&x.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(SCALE, 0.0)?)
}

fn model_loss(
    f: &Frozen,
    lora: &[Tensor],
    tokens: &Tensor,
    mask: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let positions = Tensor::from_vec(
        (0..B).flat_map(|_| 0..T as u32).collect::<Vec<u32>>(),
        [B, T],
        Device::Cpu,
    )?;
    let inv = rope_inv_freq(D, 10000.0, DType::F64, Device::Cpu)?;
    let (cos, sin) = rope_tables(&positions, &inv)?;
    let mut x = f.embed.embedding(tokens)?; // [B, T, H]
    for l in 0..2 {
        let p = |j: usize| -> (&Tensor, &Tensor, &Tensor) {
            (
                &f.proj[l][j],
                &lora[(l * 7 + j) * 2],
                &lora[(l * 7 + j) * 2 + 1],
            )
        };
        let lin = |x: &Tensor, j: usize| {
            let (w, a, b) = p(j);
            lora_linear(x, w, a, b)
        };
        let h = x.rms_norm(&f.norms[2 * l], 1e-6)?;
        let q = lin(&h, 0)?
            .reshape([B, T, NH, D])?
            .transpose(1, 2)?
            .rope(&cos, &sin)?;
        let k = lin(&h, 1)?
            .reshape([B, T, NKV, D])?
            .transpose(1, 2)?
            .rope(&cos, &sin)?;
        let v = lin(&h, 2)?.reshape([B, T, NKV, D])?.transpose(1, 2)?;
        let a = causal_attention(&q, &k, &v, Some(mask), 0)?
            .transpose(1, 2)?
            .reshape([B, T, NH * D])?;
        x = x.add(&lin(&a, 3)?)?;
        let h = x.rms_norm(&f.norms[2 * l + 1], 1e-6)?;
        let g = lin(&h, 4)?.silu()?.mul(&lin(&h, 5)?)?;
        x = x.add(&lin(&g, 6)?)?;
    }
    let logits = x.rms_norm(&f.norms[4], 1e-6)?.matmul(&f.embed.t()?)?; // [B, T, V]
    logits
        .reshape([B * T, V])?
        .cross_entropy(targets, IGNORE_INDEX)
}

#[test]
fn grad_two_layer_llama_with_lora() {
    let f = frozen();
    // Row 1 is right-padded: its last two positions are padding and their targets ignored.
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 0], &[B, T]);
    let mask = ids(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[B, T]);
    let m = IGNORE_INDEX;
    let targets = ids(&[7, 1, 9, 4, 10, 8, 5, m, m, m], &[B * T]);
    check_gradients("llama_block_lora", &lora_params(), |lora| {
        model_loss(&f, lora, &tokens, &mask, &targets)
    });

    // The base stays frozen: a backward pass leaves no gradient on any base weight.
    let vars: Vec<Tensor> = lora_params().iter().map(|t| t.to_var().unwrap()).collect();
    model_loss(&f, &vars, &tokens, &mask, &targets)
        .unwrap()
        .backward()
        .unwrap();
    assert!(vars.iter().all(|v| v.grad().is_some()));
    assert!(
        f.embed.grad().is_none()
            && f.norms
                .iter()
                .chain(f.proj.iter().flatten())
                .all(|w| w.grad().is_none())
    );
}
