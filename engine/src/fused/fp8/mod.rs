//! The FP8 unit: a frozen weight stored once in e4m3 with one f32 scale per output channel
//! ([`Fp8Weight`]), its products with activations and gradients through FP8 GEMMs, and
//! [`FrozenWeight`], the frozen projection weight the model and the fused ops take: dense or FP8.
//!
//! With `W` `[out, in]` quantised row by row (`W ≈ diag(s_w) · dec(W_q)`, `s_w[o] = amax_o /
//! 448`), an input `x` `[M, in]` and its output gradient `g` `[M, out]`, every row (token) of
//! `x` and `g` also with a scale of its own:
//!
//! ```text
//! forward    x_q, s_x = quant_e4m3(x)                              s_x [M]: one scale a row
//!            y = diag(s_x) · dec(x_q) dec(W_q)ᵀ · diag(s_w)        in x's dtype
//! backward   g_q, s_g = quant_e5m2(g · diag(s_w))                  the weight's scales folded in
//!            dx = diag(s_g) · dec(g_q) dec(W_q)                    in g's dtype
//! ```
//!
//! Both products are FP8 × FP8 GEMMs that accumulate in f32: on the GPU through cuBLASLt on the
//! tensor cores, which on Hopper read both operands with the reduction dim contiguous, so the
//! backward reads `W_qᵀ`, transposed into a temporary per product (the weight is stored once).
//! The weight's scales are applied to the output's columns in the forward and to `g`'s columns
//! before quantising it in the backward, where they lie along the reduction. Activations take
//! e4m3 (more mantissa), gradients e5m2 (more range), each row with a scale computed from its own
//! maximum on the device (no history, nothing read back to the host), so a row's result depends
//! on that row alone, and one token's outlier (LLMs put huge activations on a few tokens) does
//! not flush the other tokens' small values to zero, as one scale for the tensor would. The
//! weight itself gets no gradient (it is frozen).
//!
//! Files: the codes of the two formats (`codec.rs`), the primitives' named operands and dispatch
//! (`primitives.rs`), the CPU reference (`cpu.rs`), the CUDA launchers (`cuda.rs`, over the
//! kernels of `kernels/src/fp8.cu` and cuBLASLt).

mod codec;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

pub use codec::{decode, encode};
pub use primitives::Fp8Format;

use self::primitives::{self as prim, CodeDims};
use crate::autograd::{Input, Node, Output};
use crate::fused::read;
use crate::ops::float_only;
use crate::{DType, Device, Error, Result, Tensor};

/// A frozen `[out, in]` weight in e4m3 with per-output-channel scales (module doc).
#[derive(Clone, Debug)]
pub struct Fp8Weight {
    codes: Tensor,  // [out, in/4] u32: four e4m3 codes a word
    scales: Tensor, // [out] f32
    dims: [usize; 2],
    dtype: DType,
}

impl Fp8Weight {
    /// Quantises `w` `[out, in]` (a float dtype; `in` and `out` multiples of 4, of 16 on a GPU,
    /// whose FP8 GEMMs need it) row by row, on `w`'s device. Products with the result run in
    /// `w`'s dtype.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        const OP: &str = "fp8_quantize";
        float_only(OP, w)?;
        let (out, inp) = crate::backend::checks::dims2(OP, w.layout())?;
        if out % 4 != 0 || inp % 4 != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "{}: FP8 weights need both dims to be multiples of 4",
                    w.shape()
                ),
            ));
        }
        if !matches!(w.device(), Device::Cpu) && (out % 16 != 0 || inp % 16 != 0) {
            return Err(Error::invalid(
                OP,
                format!(
                    "{}: FP8 products on a GPU need both dims to be multiples of 16",
                    w.shape()
                ),
            ));
        }
        let (codes, scales) = quantize(w, None, Fp8Format::E4M3)?;
        Ok(Fp8Weight {
            codes,
            scales,
            dims: [out, inp],
            dtype: w.dtype(),
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// The dtype of the inputs and outputs of its products.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// The codes, `[out, in/4]` u32 (four e4m3 codes a word, little-endian).
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// The per-output-channel scales `[out]` f32.
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// Bytes held: one a weight, four a row.
    pub fn bytes(&self) -> usize {
        self.dims[0] * self.dims[1] + 4 * self.dims[0]
    }

    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(Fp8Weight {
            codes: self.codes.to_device(device)?,
            scales: self.scales.to_device(device)?,
            ..self.clone()
        })
    }

    /// The weight these codes stand for, `diag(s_w) · dec(W_q)` `[out, in]` in [`Self::dtype`]
    /// (decoded on the host, then moved to the weight's device).
    pub fn dequantize(&self) -> Result<Tensor> {
        let [out, inp] = self.dims;
        let words = self.codes.to_vec_u32()?;
        let scales = self.scales.to_vec_f32()?;
        let t = codec::table(Fp8Format::E4M3);
        let mut v = Vec::with_capacity(out * inp);
        for (o, row) in words.chunks(inp / 4).enumerate() {
            v.extend(
                row.iter()
                    .flat_map(|w| w.to_le_bytes())
                    .map(|c| t[c as usize] * scales[o]),
            );
        }
        Tensor::from_vec(v, [out, inp], Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(self.device())
    }

    /// `x Wᵀ` `[M, out]` of `x` `[M, in]`, without a tape (the forward of the module doc).
    pub fn x_wt(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "fp8_linear";
        self.check_input(OP, x, 1)?;
        let m = x.dims()[0];
        let (xq, sx) = quantize(x, None, Fp8Format::E4M3)?;
        let a = CodeDims {
            rows: m,
            cols: self.dims[1],
        };
        let s = read([&xq, &sx, &self.codes, &self.scales], |[a_, sa, b, sb]| {
            prim::gemm_fp8(
                prim::GemmFp8 {
                    a: a_,
                    sa,
                    b,
                    sb: Some(sb),
                },
                a,
                self.code_dims(),
                Fp8Format::E4M3,
                x.dtype(),
            )
        })?;
        Ok(Tensor::from_storage(s, [m, self.dims[0]], None))
    }

    /// `g W` `[M, in]` of `g` `[M, out]`, without a tape (the backward of the module doc).
    pub fn g_w(&self, g: &Tensor) -> Result<Tensor> {
        const OP: &str = "fp8_linear_backward";
        self.check_input(OP, g, 0)?;
        let m = g.dims()[0];
        let (gq, sg) = quantize(g, Some(&self.scales), Fp8Format::E5M2)?;
        let d = self.code_dims();
        let t = read([&self.codes], |[codes]| {
            prim::transpose_codes(prim::TransposeCodes { codes }, d)
        })?;
        let wt = Tensor::from_storage(t, [self.dims[1], self.dims[0] / 4], None);
        let a = CodeDims {
            rows: m,
            cols: self.dims[0],
        };
        let b = CodeDims {
            rows: self.dims[1],
            cols: self.dims[0],
        };
        let s = read([&gq, &sg, &wt], |[a_, sa, b_]| {
            prim::gemm_fp8(
                prim::GemmFp8 {
                    a: a_,
                    sa,
                    b: b_,
                    sb: None,
                },
                a,
                b,
                Fp8Format::E5M2,
                g.dtype(),
            )
        })?;
        Ok(Tensor::from_storage(s, [m, self.dims[1]], None))
    }

    fn code_dims(&self) -> CodeDims {
        CodeDims {
            rows: self.dims[0],
            cols: self.dims[1],
        }
    }

    /// Errors unless `t` is `[M, dims[dim]]` of the weight's dtype and device.
    fn check_input(&self, op: &'static str, t: &Tensor, dim: usize) -> Result<()> {
        if t.rank() != 2 || t.dims()[1] != self.dims[dim] {
            return Err(Error::invalid(
                op,
                format!(
                    "{} does not fit an FP8 weight [{}, {}]",
                    t.shape(),
                    self.dims[0],
                    self.dims[1]
                ),
            ));
        }
        if t.dtype() != self.dtype {
            return Err(Error::DTypeMismatch {
                op,
                lhs: t.dtype(),
                rhs: self.dtype,
            });
        }
        if t.device() != self.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: t.device(),
                rhs: self.device(),
            });
        }
        Ok(())
    }
}

/// `(codes [M, K/4], scales [M])` of `x ⊙ col` `[M, K]` in format `f`, one scale a row.
fn quantize(x: &Tensor, col: Option<&Tensor>, f: Fp8Format) -> Result<(Tensor, Tensor)> {
    let (m, k) = (x.dims()[0], x.dims()[1]);
    let (c, s) = match col {
        Some(col) => read([x, col], |[w, col]| {
            prim::quantize_rows(prim::QuantizeRows { w, col: Some(col) }, f)
        }),
        None => read([x], |[w]| {
            prim::quantize_rows(prim::QuantizeRows { w, col: None }, f)
        }),
    }?;
    Ok((
        Tensor::from_storage(c, [m, k / 4], None),
        Tensor::from_storage(s, [m], None),
    ))
}

impl Tensor {
    /// `self Wᵀ` `[.., out]` for `self` `[.., in]` and a frozen FP8 weight `w` (module doc): the
    /// forward and the input gradient through FP8 GEMMs; `w` takes no gradient. The tape keeps
    /// nothing of `self` (the input gradient needs only `w`).
    pub fn linear_fp8(&self, w: &Fp8Weight) -> Result<Tensor> {
        const OP: &str = "linear_fp8";
        let r = self.rank();
        if r == 0 || self.dims()[r - 1] != w.dims[1] {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} does not fit an FP8 weight [{}, {}]",
                    self.shape(),
                    w.dims[0],
                    w.dims[1]
                ),
            ));
        }
        let m: usize = self.dims()[..r - 1].iter().product();
        let mut out_dims = self.dims().to_vec();
        out_dims[r - 1] = w.dims[0];
        let y = w.x_wt(&self.reshape([m, w.dims[1]])?)?;
        let wb = w.clone();
        let in_dims = self.shape().clone();
        let node = Node::record_with(
            OP,
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| {
                let g2 = g.reshape([m, wb.dims[0]])?;
                Ok(vec![Some(wb.g_w(&g2)?.reshape(in_dims.clone())?)])
            },
        )
        .map(|n| n.capturing(&[&w.codes, &w.scales]));
        let y = y.reshape(out_dims)?;
        Ok(match node {
            Some(node) => y.view(y.layout().clone(), Some(node)),
            None => y,
        })
    }
}

/// A frozen projection weight `[out, in]`: dense in the model's dtype, or FP8 ([`Fp8Weight`]).
/// The model's projections and the fused ops take this; the products it offers are those a
/// frozen weight needs (`x Wᵀ` and `g W`).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    Fp8(Fp8Weight),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        FrozenWeight::Dense(t)
    }
}

impl FrozenWeight {
    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(t) => [t.dims()[0], t.dims()[1]],
            FrozenWeight::Fp8(w) => w.dims,
        }
    }

    /// The dtype of its products' inputs and outputs.
    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Dense(t) => t.dtype(),
            FrozenWeight::Fp8(w) => w.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(t) => t.device(),
            FrozenWeight::Fp8(w) => w.device(),
        }
    }

    /// The dense weight; `None` for FP8.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(t) => Some(t),
            FrozenWeight::Fp8(_) => None,
        }
    }

    /// The dense weight, or an error naming `what` needs it (a path without FP8 products).
    pub fn dense_for(&self, what: &str) -> Result<&Tensor> {
        self.dense().ok_or_else(|| {
            Error::invalid(
                "fp8",
                format!("{what} needs a dense base weight; this one is FP8"),
            )
        })
    }

    pub fn fp8(&self) -> Option<&Fp8Weight> {
        match self {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Fp8(w) => Some(w),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Fp8(w) => w.bytes(),
        }
    }

    /// `x Wᵀ` `[.., out]` with the tape's rule for `x` (the plain projection).
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => x.matmul(&w.t()?),
            FrozenWeight::Fp8(w) => x.linear_fp8(w),
        }
    }

    /// `x Wᵀ` `[M, out]` of `x` `[M, in]`, for the forward of a fused op (FP8: no tape).
    pub fn x_wt(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => x.matmul(&w.t()?),
            FrozenWeight::Fp8(w) => w.x_wt(x),
        }
    }

    /// `g W` `[M, in]` of `g` `[M, out]`, for the backward of a fused op (FP8: no tape).
    pub fn g_w(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => g.matmul(w),
            FrozenWeight::Fp8(w) => w.g_w(g),
        }
    }

    /// This weight quantised to FP8 (an FP8 one as it is).
    pub fn to_fp8(&self) -> Result<FrozenWeight> {
        Ok(match self {
            FrozenWeight::Dense(t) => FrozenWeight::Fp8(Fp8Weight::quantize(t)?),
            FrozenWeight::Fp8(w) => FrozenWeight::Fp8(w.clone()),
        })
    }

    pub fn to_device(&self, device: Device) -> Result<FrozenWeight> {
        Ok(match self {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.to_device(device)?),
            FrozenWeight::Fp8(w) => FrozenWeight::Fp8(w.to_device(device)?),
        })
    }
}
