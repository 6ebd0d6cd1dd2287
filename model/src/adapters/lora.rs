//! Plain LoRA on one linear map: `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`.
//!
//! `W` `[out, in]` is frozen and stays in the base dtype; `A` `[r, in]` and `B` `[out, r]` are
//! trainable and live in the adapter dtype (f32, or f64 under an f64 base for gradient checks):
//! the input is cast to it and the delta cast back, so a bf16 base keeps f32 adapter maths.

use engine::{DType, Device, FrozenWeight, Tensor};

use crate::error::Result;

/// One LoRA pair and its settings.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    pub a: Tensor, // [r, in], adapter dtype
    pub b: Tensor, // [out, r], adapter dtype
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f64,
    /// Dropout probability on `A`'s input while training.
    pub dropout: f64,
}

impl LoraLinear {
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Self {
        LoraLinear {
            a,
            b,
            scale,
            dropout,
        }
    }

    /// Fresh trainable matrices as PyTorch/PEFT initialise them: `A` kaiming-uniform with
    /// `a = √5`, i.e. uniform in `±1/√in` (`nn.Linear`'s init), and `B = 0`, so the delta starts
    /// at zero.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        n_in: usize,
        n_out: usize,
        r: usize,
        scale: f64,
        dropout: f64,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let bound = 1.0 / (n_in as f64).sqrt();
        let a = Tensor::rand_uniform([r, n_in], -bound, bound, seed, dtype, device)?.to_var()?;
        let b = Tensor::zeros([n_out, r], dtype, device)?.to_var()?;
        Ok(Self::new(a, b, scale, dropout))
    }

    /// `y + s · (drop(x) Aᵀ) Bᵀ` for the base output `y` `[.., out]` of `x` `[.., in]`, in `y`'s
    /// dtype, as one fused op ([`Tensor::lora_add`]): the tape keeps only `x` and the rank-r
    /// codes, the dropout mask is recomputed in the backward. Dropout is applied only when
    /// `dropout_seed` is given.
    pub fn add_to(&self, y: &Tensor, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let dropout = dropout_seed.map(|seed| (self.dropout, seed));
        Ok(y.lora_add(x, &self.a, &self.b, self.scale, dropout)?)
    }

    /// The low-rank delta `s · (drop(x) Aᵀ) Bᵀ` `[.., out]` of `x` `[.., in]`, in `x`'s dtype
    /// (computed in the adapter dtype), as a chain of engine ops (the reference [`Self::add_to`]
    /// is tested against; it keeps the f32 cast, the mask and the dropped copy of `x` on the
    /// tape). Dropout is applied only when `dropout_seed` is given.
    pub fn delta(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let base = x.dtype();
        let mut xa = x.to_dtype(self.a.dtype())?; // [.., in]
        if let Some(seed) = dropout_seed {
            xa = xa.dropout(self.dropout, seed, true)?;
        }
        // The scale goes on the rank-r codes: r columns to scale instead of `out`.
        let z = xa.matmul(&self.a.t()?)?.affine(self.scale, 0.0)?; // [.., r]
        let d = z.matmul(&self.b.t()?)?; // [.., out]
        Ok(d.to_dtype(base)?)
    }
}

/// `x Wᵀ` for a weight stored `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, or just `x Wᵀ` without a LoRA.
///
/// With a LoRA this is one fused op ([`Tensor::linear_lora`]): the tape keeps `x` and the rank-r
/// codes, never the base output `x Wᵀ`. Gradients: `dA = s · (Bᵀ gᵀ) drop(x)` summed over rows,
/// `dB = s · gᵀ (drop(x) Aᵀ)`, `dx = g W + s · drop'(g B A)`; a frozen `W` gets none.
///
/// With an FP8 base weight the base product is its own op ([`Tensor::linear_fp8`]) and the LoRA
/// is added by [`Tensor::lora_add`]: the same tape, the same LoRA gradients.
pub fn lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    lora: Option<&LoraLinear>,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let Some(l) = lora else {
        return Ok(w.linear(x)?); // [.., out]
    };
    let dropout = dropout_seed.map(|seed| (l.dropout, seed));
    match w {
        FrozenWeight::Dense(w) => Ok(x.linear_lora(w, &l.a, &l.b, l.scale, dropout)?),
        FrozenWeight::Fp8(q) => Ok(x.linear_fp8(q)?.lora_add(x, &l.a, &l.b, l.scale, dropout)?),
    }
}
