//! Elementwise ops: unary maps, broadcasting binary arithmetic, scalar ops, comparisons and
//! selection.

use super::{float_only, same_device, same_dtype};
use crate::autograd::{Input, Node, Output};
use crate::backend::{BackendStorage, BinaryOp, CmpOp, UnaryOp};
use crate::{Result, Shape, Tensor};

impl Tensor {
    fn unary(&self, op: UnaryOp, node: Option<Node>) -> Result<Tensor> {
        float_only("unary", self)?;
        let s = self.storage().unary(self.layout(), op)?;
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Neg,
            Node::record_with(
                "neg",
                &[Input::GraphOnly(self)],
                Output::Unread,
                |_, _, g| Ok(vec![Some(g.neg()?)]),
            ),
        )
    }
    /// d/dx eˣ = eˣ.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Exp,
            Node::record_with("exp", &[Input::GraphOnly(self)], Output::Read, |_, y, g| {
                Ok(vec![Some(g.mul(y)?)])
            }),
        )
    }
    /// d/dx ln x = 1/x.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Log,
            Node::record_with("log", &[Input::Keep(self)], Output::Unread, |x, _, g| {
                Ok(vec![Some(g.div(&x[0])?)])
            }),
        )
    }
    /// silu(x) = x·σ(x); d/dx = σ(x)·(1 + x·(1 − σ(x))) = σ(x)·(1 + x − silu(x)).
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Silu,
            Node::record_with("silu", &[Input::Keep(self)], Output::Read, |x, y, g| {
                let s = x[0].sigmoid()?;
                let d = s.mul(&x[0].sub(y)?.affine(1.0, 1.0)?)?;
                Ok(vec![Some(g.mul(&d)?)])
            }),
        )
    }
    /// d/dx σ(x) = σ(x)(1 − σ(x)).
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Sigmoid,
            Node::record_with(
                "sigmoid",
                &[Input::GraphOnly(self)],
                Output::Read,
                |_, y, g| Ok(vec![Some(g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?)?)]),
            ),
        )
    }
    /// d/dx √x = 1/(2√x).
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Sqrt,
            Node::record_with(
                "sqrt",
                &[Input::GraphOnly(self)],
                Output::Read,
                |_, y, g| Ok(vec![Some(g.div(&y.affine(2.0, 0.0)?)?)]),
            ),
        )
    }
    /// d/dx 1/x = −1/x².
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Recip,
            Node::record_with(
                "recip",
                &[Input::GraphOnly(self)],
                Output::Read,
                |_, y, g| Ok(vec![Some(g.mul(&y.sqr()?)?.neg()?)]),
            ),
        )
    }
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Sqr,
            Node::record_with("sqr", &[Input::Keep(self)], Output::Unread, |x, _, g| {
                Ok(vec![Some(g.mul(&x[0].affine(2.0, 0.0)?)?)])
            }),
        )
    }
    /// d/dx |x| = sign(x) (0 at 0).
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Abs,
            Node::record_with("abs", &[Input::Keep(self)], Output::Unread, |x, _, g| {
                let zero = x[0].zeros_like()?;
                let pos = x[0].gt(&zero)?.to_dtype(x[0].dtype())?;
                let neg = x[0].lt(&zero)?.to_dtype(x[0].dtype())?;
                Ok(vec![Some(g.mul(&pos.sub(&neg)?)?)])
            }),
        )
    }
    /// d/dx tanh x = 1 − tanh² x.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Tanh,
            Node::record_with(
                "tanh",
                &[Input::GraphOnly(self)],
                Output::Read,
                |_, y, g| Ok(vec![Some(g.mul(&y.sqr()?.affine(-1.0, 1.0)?)?)]),
            ),
        )
    }
    pub fn cos(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Cos,
            Node::record_with("cos", &[Input::Keep(self)], Output::Unread, |x, _, g| {
                Ok(vec![Some(g.mul(&x[0].sin()?)?.neg()?)])
            }),
        )
    }
    pub fn sin(&self) -> Result<Tensor> {
        self.unary(
            UnaryOp::Sin,
            Node::record_with("sin", &[Input::Keep(self)], Output::Unread, |x, _, g| {
                Ok(vec![Some(g.mul(&x[0].cos()?)?)])
            }),
        )
    }
    /// `x * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.unary(
            UnaryOp::Affine { mul, add },
            Node::record_with(
                "affine",
                &[Input::GraphOnly(self)],
                Output::Unread,
                move |_, _, g| Ok(vec![Some(g.affine(mul, 0.0)?)]),
            ),
        )
    }
    /// `x ^ e`; d/dx = e·x^(e−1).
    pub fn powf(&self, e: f64) -> Result<Tensor> {
        self.unary(
            UnaryOp::Powf(e),
            Node::record_with(
                "powf",
                &[Input::Keep(self)],
                Output::Unread,
                move |x, _, g| Ok(vec![Some(g.mul(&x[0].powf(e - 1.0)?.affine(e, 0.0)?)?)]),
            ),
        )
    }
    /// `max(x, c)`; the gradient flows where `x > c`.
    pub fn clamp_min(&self, c: f64) -> Result<Tensor> {
        self.unary(
            UnaryOp::MaxScalar(c),
            Node::record_with(
                "clamp_min",
                &[Input::Keep(self)],
                Output::Unread,
                move |x, _, g| {
                    let m = x[0].gt_scalar(c)?;
                    Ok(vec![Some(m.where_cond(g, &g.zeros_like()?)?)])
                },
            ),
        )
    }
    /// `min(x, c)`; the gradient flows where `x < c`.
    pub fn clamp_max(&self, c: f64) -> Result<Tensor> {
        self.unary(
            UnaryOp::MinScalar(c),
            Node::record_with(
                "clamp_max",
                &[Input::Keep(self)],
                Output::Unread,
                move |x, _, g| {
                    let m = x[0].lt_scalar(c)?;
                    Ok(vec![Some(m.where_cond(g, &g.zeros_like()?)?)])
                },
            ),
        )
    }
    pub fn add_scalar(&self, c: f64) -> Result<Tensor> {
        self.affine(1.0, c)
    }
    pub fn mul_scalar(&self, c: f64) -> Result<Tensor> {
        self.affine(c, 0.0)
    }

    /// Runs a binary op after broadcasting both operands to their common shape.
    fn binary(&self, rhs: &Tensor, op: BinaryOp, name: &'static str) -> Result<(Tensor, Shape)> {
        same_dtype(name, self, rhs)?;
        same_device(name, self, rhs)?;
        float_only(name, self)?;
        let shape = self.shape().broadcast_with(name, rhs.shape())?;
        let ll = self.layout().broadcast_as(name, &shape)?;
        let rl = rhs.layout().broadcast_as(name, &shape)?;
        let s = {
            let (a, b) = (self.storage(), rhs.storage());
            a.binary(&ll, &b, &rl, op)?
        };
        Ok((Tensor::from_storage(s, shape.clone(), None), shape))
    }

    /// [`Tensor::binary`] recording `rule`, with what it reads of `(self, rhs)` and the output.
    fn binary_recorded(
        &self,
        rhs: &Tensor,
        op: BinaryOp,
        name: &'static str,
        inputs: [Input<'_>; 2],
        output: Output,
        rule: impl Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> Result<Tensor> {
        let (out, shape) = self.binary(rhs, op, name)?;
        match Node::record_with(name, &inputs, output, rule) {
            None => Ok(out),
            Some(node) => Ok(out.view(crate::Layout::contiguous(shape), Some(node))),
        }
    }

    /// `self + rhs`, broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Add,
            "add",
            [Input::GraphOnly(self), Input::GraphOnly(rhs)],
            Output::Unread,
            |x, _, g| sum_back(x, g, false),
        )
    }
    /// `self - rhs`, broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Sub,
            "sub",
            [Input::GraphOnly(self), Input::GraphOnly(rhs)],
            Output::Unread,
            |x, _, g| sum_back(x, g, true),
        )
    }
    /// `self * rhs`, broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Mul,
            "mul",
            // Each operand is read for the other's gradient.
            [
                Input::keep_if(self, rhs.tracks_grad()),
                Input::keep_if(rhs, self.tracks_grad()),
            ],
            Output::Unread,
            |x, _, g| {
                let da = x[0]
                    .tracks_grad()
                    .then(|| g.mul(&x[1])?.sum_to_shape(x[0].shape()))
                    .transpose()?;
                let db = x[1]
                    .tracks_grad()
                    .then(|| g.mul(&x[0])?.sum_to_shape(x[1].shape()))
                    .transpose()?;
                Ok(vec![da, db])
            },
        )
    }
    /// `self / rhs`, broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Div,
            "div",
            // `a` is never read; the output only for `b`'s gradient.
            [Input::GraphOnly(self), Input::Keep(rhs)],
            Output::read_if(rhs.tracks_grad()),
            |x, y, g| {
                let da = x[0]
                    .tracks_grad()
                    .then(|| g.div(&x[1])?.sum_to_shape(x[0].shape()))
                    .transpose()?;
                // d(a/b)/db = −(a/b)/b
                let db = x[1]
                    .tracks_grad()
                    .then(|| g.mul(y)?.div(&x[1])?.neg()?.sum_to_shape(x[1].shape()))
                    .transpose()?;
                Ok(vec![da, db])
            },
        )
    }
    /// `silu(self) · rhs` (the SwiGLU gate) in one pass, broadcasting. With `s = σ(a)`:
    /// `da = g · b · s · (1 + a · (1 − s))`, `db = g · silu(a)`.
    pub fn silu_mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::SiluMul,
            "silu_mul",
            // `b` is read only for `a`'s gradient.
            [Input::Keep(self), Input::keep_if(rhs, self.tracks_grad())],
            Output::Unread,
            |x, _, g| {
                let da = x[0]
                    .tracks_grad()
                    .then(|| {
                        let s = x[0].sigmoid()?;
                        let ds = s.mul(&x[0].mul(&s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
                        g.mul(&x[1])?.mul(&ds)?.sum_to_shape(x[0].shape())
                    })
                    .transpose()?;
                let db = x[1]
                    .tracks_grad()
                    .then(|| g.mul(&x[0].silu()?)?.sum_to_shape(x[1].shape()))
                    .transpose()?;
                Ok(vec![da, db])
            },
        )
    }
    /// Elementwise max; on ties the gradient goes to `self`.
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Maximum,
            "maximum",
            [Input::Keep(self), Input::Keep(rhs)],
            Output::Unread,
            |x, _, g| {
                let pick_a = x[0].ge(&x[1])?;
                let z = g.zeros_like()?;
                Ok(vec![
                    Some(pick_a.where_cond(g, &z)?.sum_to_shape(x[0].shape())?),
                    Some(pick_a.where_cond(&z, g)?.sum_to_shape(x[1].shape())?),
                ])
            },
        )
    }
    /// Elementwise min; on ties the gradient goes to `self`.
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_recorded(
            rhs,
            BinaryOp::Minimum,
            "minimum",
            [Input::Keep(self), Input::Keep(rhs)],
            Output::Unread,
            |x, _, g| {
                let pick_a = x[0].le(&x[1])?;
                let z = g.zeros_like()?;
                Ok(vec![
                    Some(pick_a.where_cond(g, &z)?.sum_to_shape(x[0].shape())?),
                    Some(pick_a.where_cond(&z, g)?.sum_to_shape(x[1].shape())?),
                ])
            },
        )
    }

    fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        same_dtype("cmp", self, rhs)?;
        same_device("cmp", self, rhs)?;
        let shape = self.shape().broadcast_with("cmp", rhs.shape())?;
        let ll = self.layout().broadcast_as("cmp", &shape)?;
        let rl = rhs.layout().broadcast_as("cmp", &shape)?;
        let s = self.storage().cmp(&ll, &rhs.storage(), &rl, op)?;
        Ok(Tensor::from_storage(s, shape, None))
    }
    fn compare_scalar(&self, c: f64, op: CmpOp) -> Result<Tensor> {
        let rhs = Tensor::full((), c, self.dtype(), self.device())?;
        self.compare(&rhs, op)
    }
    /// Elementwise `==` (broadcasting), as u32 0/1. No gradient.
    pub fn eq(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Eq)
    }
    pub fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ne)
    }
    pub fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Lt)
    }
    pub fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Le)
    }
    pub fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Gt)
    }
    pub fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ge)
    }
    pub fn eq_scalar(&self, c: f64) -> Result<Tensor> {
        self.compare_scalar(c, CmpOp::Eq)
    }
    pub fn ne_scalar(&self, c: f64) -> Result<Tensor> {
        self.compare_scalar(c, CmpOp::Ne)
    }
    pub fn lt_scalar(&self, c: f64) -> Result<Tensor> {
        self.compare_scalar(c, CmpOp::Lt)
    }
    pub fn gt_scalar(&self, c: f64) -> Result<Tensor> {
        self.compare_scalar(c, CmpOp::Gt)
    }

    /// `self` is the condition (non-zero is true): picks `on_true` or `on_false` elementwise,
    /// broadcasting all three. Gradients flow to the picked operand.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        same_dtype("where_cond", on_true, on_false)?;
        same_device("where_cond", self, on_true)?;
        same_device("where_cond", on_true, on_false)?;
        let shape = self
            .shape()
            .broadcast_with("where_cond", on_true.shape())?
            .broadcast_with("where_cond", on_false.shape())?;
        let cl = self.layout().broadcast_as("where_cond", &shape)?;
        let tl = on_true.layout().broadcast_as("where_cond", &shape)?;
        let fl = on_false.layout().broadcast_as("where_cond", &shape)?;
        let s =
            self.storage()
                .where_cond(&cl, &on_true.storage(), &tl, &on_false.storage(), &fl)?;
        let inputs = [
            Input::Keep(self),
            Input::GraphOnly(on_true),
            Input::GraphOnly(on_false),
        ];
        let node = Node::record_with("where_cond", &inputs, Output::Unread, |x, _, g| {
            let z = g.zeros_like()?;
            let dt = x[1]
                .tracks_grad()
                .then(|| x[0].where_cond(g, &z)?.sum_to_shape(x[1].shape()))
                .transpose()?;
            let df = x[2]
                .tracks_grad()
                .then(|| x[0].where_cond(&z, g)?.sum_to_shape(x[2].shape()))
                .transpose()?;
            Ok(vec![None, dt, df])
        });
        Ok(Tensor::from_storage(s, shape, node))
    }

    /// `value` where `mask` is non-zero, else `self` (mask broadcasts to `self`).
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        let fill = Tensor::full((), value, self.dtype(), self.device())?;
        let out = mask.where_cond(&fill, self)?;
        if out.shape() != self.shape() {
            return Err(crate::Error::ShapeMismatch {
                op: "masked_fill",
                lhs: self.shape().clone(),
                rhs: mask.shape().clone(),
            });
        }
        Ok(out)
    }
}

/// The gradients of `a ± b` (broadcasting): `g` summed back to each operand's shape, negated for
/// `b` when `negate_rhs`; `None` for an operand that needs none.
fn sum_back(x: &[Tensor], g: &Tensor, negate_rhs: bool) -> Result<Vec<Option<Tensor>>> {
    let da = x[0]
        .tracks_grad()
        .then(|| g.sum_to_shape(x[0].shape()))
        .transpose()?;
    let db = x[1]
        .tracks_grad()
        .then(|| {
            let d = g.sum_to_shape(x[1].shape())?;
            if negate_rhs {
                d.neg()
            } else {
                Ok(d)
            }
        })
        .transpose()?;
    Ok(vec![da, db])
}
