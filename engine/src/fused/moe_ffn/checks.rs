//! The checks of [`moe_ffn`](super::moe_ffn)'s operands (ranks, shapes, dtypes, devices, the
//! frozen shared weights, the dropout probability) and the sizes and settings they give.

use super::primitives::MoeDims;
use super::{MoeDropout, MoeFusedWeights, MoeRouting, OP};
use crate::ops::{float_only, same_device};
use crate::{rng, DType, Error, FrozenWeight, Result, Shape, Tensor};

/// The op's sizes and settings, once its operands are checked.
#[derive(Clone, Copy, Debug)]
pub(super) struct Checked {
    /// `T, k, E, r, I`, and the dropout of the down projection's input (`p` and its seed).
    pub d: MoeDims,
    /// The hidden size `H`.
    pub h: usize,
    /// The LoRA scale `s`.
    pub s: f64,
    /// The dropout probability (0: none).
    pub p: f64,
    /// The seeds of the dropout masks on `X` for gate and up.
    pub seed_g: u64,
    pub seed_u: u64,
    /// The base dtype and the adapter dtype (its accumulation dtype).
    pub bt: DType,
    pub at: DType,
}

fn expect_shape(t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: t.shape().clone(),
            rhs: Shape::from(dims.to_vec()),
        });
    }
    Ok(())
}

fn expect_dtype(t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: t.dtype(),
            rhs: dtype,
        });
    }
    Ok(())
}

/// Checks the operands: `x` `[T, H]` a float base, the weights and the routing of the shapes and
/// dtypes of [`MoeFusedWeights`] and [`MoeRouting`] on `x`'s device, the shared weights frozen,
/// the dropout probability in `[0, 1)`. The dropout seeds of gate, up and down are derived from
/// the one seed.
pub(super) fn check(
    x: &Tensor,
    w: &MoeFusedWeights<'_>,
    route: &MoeRouting<'_>,
    dropout: Option<MoeDropout>,
) -> Result<Checked> {
    if x.rank() != 2 {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 2,
            shape: x.shape().clone(),
        });
    }
    let (t, h) = (x.dims()[0], x.dims()[1]);
    let bt = x.dtype();
    float_only(OP, x)?;
    let at = bt.accumulation();
    if w.a_gate.rank() != 3 || w.b_gate.rank() != 3 || route.ids.rank() != 2 {
        return Err(Error::invalid(
            OP,
            format!(
                "expected A_g [E, r, H], B_g [E, I, r], ids [T, k]; got {}, {}, {}",
                w.a_gate.shape(),
                w.b_gate.shape(),
                route.ids.shape()
            ),
        ));
    }
    let (e, r) = (w.a_gate.dims()[0], w.a_gate.dims()[1]);
    let i = w.b_gate.dims()[1];
    let k = route.ids.dims()[1];
    if k == 0 || k > e || r == 0 || i == 0 || h == 0 {
        return Err(Error::invalid(
            OP,
            format!("bad sizes: k = {k}, E = {e}, r = {r}, I = {i}, H = {h}"),
        ));
    }
    for (name, base, dims) in [
        ("W_gate", w.w_gate, [i, h]),
        ("W_up", w.w_up, [i, h]),
        ("W_down", w.w_down, [h, i]),
    ] {
        match base {
            FrozenWeight::Dense(t) => {
                expect_shape(t, &dims)?;
                expect_dtype(t, bt)?;
                same_device(OP, x, t)?;
                if t.tracks_grad() {
                    return Err(Error::invalid(
                        OP,
                        "the shared W_gate/W_up/W_down must be frozen in the fused path",
                    ));
                }
            }
            FrozenWeight::Fp8(q) => {
                if q.dims() != dims || q.dtype() != bt || q.device() != x.device() {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "{name}: an FP8 weight {:?} of {} on {} where [{}, {}] of {bt} on {} is needed",
                            q.dims(),
                            q.dtype(),
                            q.device(),
                            dims[0],
                            dims[1],
                            x.device()
                        ),
                    ));
                }
            }
        }
    }
    for (tensor, dims, dtype) in [
        (w.a_gate, vec![e, r, h], at),
        (w.b_gate, vec![e, i, r], at),
        (w.a_up, vec![e, r, h], at),
        (w.b_up, vec![e, i, r], at),
        (w.a_down, vec![e, r, i], at),
        (w.b_down, vec![e, h, r], at),
        (route.ids, vec![t, k], DType::U32),
        (route.weights, vec![t, k], at),
    ] {
        expect_shape(tensor, &dims)?;
        expect_dtype(tensor, dtype)?;
        same_device(OP, x, tensor)?;
    }
    let p = dropout.map_or(0.0, |d| d.p);
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(OP, format!("dropout {p} is not in [0, 1)")));
    }
    let seed = dropout.map_or(0, |d| d.seed);
    let (seed_g, seed_u, seed_d) = (rng::hash(seed, 0), rng::hash(seed, 1), rng::hash(seed, 2));
    let d = MoeDims {
        t,
        k,
        e,
        r,
        i,
        dropout: p,
        seed: seed_d,
        t0: 0,
    };
    Ok(Checked {
        d,
        h,
        s: w.scale,
        p,
        seed_g,
        seed_u,
        bt,
        at,
    })
}
