//! Shared test helpers: the finite-difference gradient checker and random inputs.

pub mod gpu;
mod skip;

pub use skip::{skip, skip_line, SKIP_MARK};

use engine::{no_grad, DType, Device, Result, Tensor};

/// The dense tensor of a frozen projection weight (the tests' models have no FP8 base unless
/// they quantise one).
pub fn dense(w: &engine::FrozenWeight) -> &Tensor {
    w.dense().expect("a dense base weight")
}

/// Frozen weights of dense tensors.
pub fn frozen<const N: usize>(ts: &[Tensor; N]) -> [engine::FrozenWeight; N] {
    std::array::from_fn(|i| engine::FrozenWeight::from(ts[i].clone()))
}

/// Random f64 input of `shape` (standard normal × `scale`), seeded.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F64, Device::Cpu).expect("randn")
}

/// Random f64 input with entries in `[lo, hi)`.
pub fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape.to_vec(), lo, hi, seed, DType::F64, Device::Cpu).expect("uniform")
}

/// The tiny LLaMA of the adapter and MoE tests: vocabulary 11, hidden 8, intermediate 12, 2
/// layers, 2 heads of 4 sharing 1 kv head, untied embeddings.
pub fn tiny_llama_config() -> model::LlamaConfig {
    model::LlamaConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// The tiny LLaMA of the CUDA model tests: [`tiny_llama_config`] widened (vocabulary 64, hidden
/// 64, intermediate 96, 4 heads of 16 sharing 2 kv heads) so that the GPU kernels see more than
/// a few elements.
pub fn gpu_llama_config() -> model::LlamaConfig {
    model::LlamaConfig {
        vocab_size: 64,
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..tiny_llama_config()
    }
}

/// Next-token targets of the right-padded `[b, t]` rows `ids` (`b·t = ids.len()`) under the key
/// mask `mask` (1 real, 0 padding): position `j` holds `ids[j + 1]` when that token is real and
/// in the same row, else `u32::MAX` (no target).
pub fn next_token_targets(ids: &[u32], mask: &[u32], t: usize) -> Vec<u32> {
    let n = ids.len();
    (0..n)
        .map(|j| {
            if j + 1 < n && mask[j + 1] == 1 && (j + 1) % t != 0 {
                ids[j + 1]
            } else {
                u32::MAX
            }
        })
        .collect()
}

/// Sets `device`'s dropout key ([`engine::set_dropout_key`]) for as long as it lives, and back
/// to 0 when dropped: a failing assertion unwinds through the drop, so the key never leaks into
/// a later test on the same thread (the CPU's key is the thread's) or device (a GPU's).
#[must_use = "the key goes back to 0 when the guard is dropped"]
pub struct DropoutKey(Device);

impl DropoutKey {
    pub fn set(device: Device, key: u64) -> DropoutKey {
        engine::set_dropout_key(device, key).expect("set_dropout_key");
        DropoutKey(device)
    }
}

impl Drop for DropoutKey {
    fn drop(&mut self) {
        // Refused only while a graph is being captured on the device: nothing to do then.
        let _ = engine::set_dropout_key(self.0, 0);
    }
}

/// A training micro-step's loss as the GPU tests build it: the summed next-token cross-entropy of
/// the final hidden states `hidden` (its rows those of `targets`, `u32::MAX` ignored) through
/// `m`'s LM head in vocabulary chunks of 64, in f32, plus `aux` (the load-balance loss) if given.
pub fn lm_loss_plus_aux(
    m: &model::Llama,
    hidden: &Tensor,
    aux: Option<&Tensor>,
    targets: &Tensor,
) -> Tensor {
    let ce = hidden
        .linear_cross_entropy_rows(m.lm_head_weight(), targets, u32::MAX, 64)
        .expect("linear_cross_entropy_rows")
        .sum_all()
        .expect("sum_all")
        .to_dtype(DType::F32)
        .expect("to_dtype");
    match aux {
        Some(a) => ce
            .add(&a.to_dtype(DType::F32).expect("to_dtype"))
            .expect("add"),
        None => ce,
    }
}

/// The bits of every element (read as f64), to compare results exactly.
pub fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .expect("to_vec_f64")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// A u32 index tensor.
pub fn ids(v: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape.to_vec(), Device::Cpu).expect("ids")
}

/// Pseudo-random ids in `0..size` (repeats likely), seeded.
pub fn rand_ids(n: usize, size: usize, seed: u64) -> Vec<u32> {
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

/// Asserts [`rel_err`]`(got, want) <= tol`, naming the check.
pub fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.1e}");
}

/// A random f32 tensor of `shape` (standard normal), seeded, and its bf16 copy.
pub fn f32_and_bf16(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let x = Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap();
    let b = x.to_dtype(DType::BF16).unwrap();
    (x, b)
}

/// Asserts that the bf16 result `b` is within 1e-2 (relative error) of the f32 result `f`.
pub fn bf16_matches(name: &str, b: &Tensor, f: &Tensor) {
    assert_close(
        name,
        &b.to_vec_f64().unwrap(),
        &f.to_vec_f64().unwrap(),
        1e-2,
    );
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero). NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    let e = if norm > 0.0 { diff / norm } else { diff };
    if e.is_nan() || a.iter().chain(b).any(|v| v.is_nan()) {
        f64::INFINITY
    } else {
        e
    }
}

/// Options of [`check_gradients`].
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Central-difference step.
    pub step: f64,
    /// Largest accepted relative error ‖analytic − numeric‖ / ‖numeric‖ per input.
    pub tol: f64,
    /// Seed of the random output weights.
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            step: 1e-6,
            tol: 1e-6,
            seed: 12345,
        }
    }
}

/// Compares the autograd gradients of `f` with central finite differences, in f64.
///
/// The scalar checked is `L = Σ f(x) ⊙ R` with a fixed random `R`, so every output element and
/// every input element contributes. Float inputs become variables (u32 inputs stay constants);
/// each float element is perturbed by ±`step` and `L` re-evaluated without recording. Panics
/// with the op name, the input and the worst element when the relative error exceeds `tol`.
pub fn check_gradients(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    check_gradients_with(GradCheck::default(), name, inputs, f)
}

pub fn check_gradients_with(
    opts: GradCheck,
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    for (i, x) in inputs.iter().enumerate() {
        assert!(
            !x.dtype().is_float() || x.dtype() == DType::F64,
            "{name}: gradient checks run in f64 (input {i} is {})",
            x.dtype()
        );
    }
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|x| {
            if x.dtype().is_float() {
                x.to_var().expect("to_var")
            } else {
                x.clone()
            }
        })
        .collect();
    let out = f(&vars).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let r = Tensor::randn(
        out.shape().clone(),
        0.0,
        1.0,
        opts.seed,
        DType::F64,
        Device::Cpu,
    )
    .unwrap();
    let loss = out
        .mul(&r)
        .and_then(|t| t.sum_all())
        .unwrap_or_else(|e| panic!("{name}: loss failed: {e}"));
    loss.backward()
        .unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));

    let eval = |xs: &[Tensor]| -> f64 {
        no_grad(|| {
            let o = f(xs).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
            o.mul(&r)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar())
                .unwrap()
        })
    };
    for (i, v) in vars.iter().enumerate() {
        if !v.is_variable() {
            continue;
        }
        let analytic = match v.grad() {
            Some(g) => g.to_vec_f64().unwrap(),
            None => vec![0.0; v.elem_count()],
        };
        let base = v.to_vec_f64().unwrap();
        let mut numeric = vec![0.0; base.len()];
        for j in 0..base.len() {
            let probe = |delta: f64| {
                let mut vals = base.clone();
                vals[j] += delta;
                let xj =
                    Tensor::from_f64(&vals, v.shape().clone(), DType::F64, Device::Cpu).unwrap();
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = xj;
                eval(&xs)
            };
            numeric[j] = (probe(opts.step) - probe(-opts.step)) / (2.0 * opts.step);
        }
        let err = rel_err(&analytic, &numeric);
        if err > opts.tol {
            let (worst, _) = analytic
                .iter()
                .zip(&numeric)
                .map(|(a, n)| (a - n).abs())
                .enumerate()
                .fold(
                    (0, 0.0),
                    |best, (k, d)| if d > best.1 { (k, d) } else { best },
                );
            panic!(
                "{name}: gradient of input {i} (shape {}) has relative error {err:.3e} > {:.1e}; worst element {worst}: analytic {} vs numeric {}",
                v.shape(),
                opts.tol,
                analytic[worst],
                numeric[worst]
            );
        }
        let norm: f64 = numeric.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            norm > 0.0 || analytic.iter().all(|&a| a == 0.0),
            "{name}: numeric gradient of input {i} is zero but analytic is not"
        );
    }
}
