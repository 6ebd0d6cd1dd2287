//! `Tensor::stack_views`: equally-shaped contiguous views lying back to back in one buffer stack
//! into an `[E, ..]` view of that buffer (no copy), whose gradient reaches each input as a view
//! of the stacked gradient; anything else gives `None`, and `engine::stack` copies (`cat`).
//! Values and gradients equal the `cat` path's bit for bit, and finite differences in f64.

use engine::{cat, stack, DType, Device, Tensor};
use testutil::{check_gradients, randn};

const E: usize = 4;
const R: usize = 3;
const C: usize = 5;

/// `E` trainable leaves `[R, C]` viewing one `[E, R, C]` buffer, and the buffer.
fn leaves(seed: u64) -> (Tensor, Vec<Tensor>) {
    let buf = randn(&[E, R, C], seed);
    let l = buf.unstack_leaves().unwrap();
    (buf, l)
}

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}

/// A function of the stacked tensor that mixes the experts and is not linear.
fn head(s: &Tensor) -> engine::Result<Tensor> {
    let w = randn(&[E, R, C], 99);
    s.sqr()?
        .mul(&w)?
        .add(&s.sum_keepdim(0)?.broadcast_as([E, R, C])?)
}

#[test]
fn unstack_leaves_are_variables_viewing_the_buffer() {
    let (buf, l) = leaves(1);
    assert_eq!(l.len(), E);
    let all = buf.to_vec_f64().unwrap();
    for (e, t) in l.iter().enumerate() {
        assert!(t.is_variable() && t.is_contiguous() && t.same_storage(&buf));
        assert_eq!(t.dims(), &[R, C]);
        assert_eq!(t.layout().offset(), e * R * C);
        assert_eq!(t.to_vec_f64().unwrap(), all[e * R * C..(e + 1) * R * C]);
    }
    // Writing a leaf writes the buffer.
    l[2].assign(&Tensor::full([R, C], 7.0, DType::F64, Device::Cpu).unwrap())
        .unwrap();
    let after = buf.to_vec_f64().unwrap();
    assert!(after[2 * R * C..3 * R * C].iter().all(|&v| v == 7.0));
    assert_eq!(after[..2 * R * C], all[..2 * R * C]);
    assert_eq!(after[3 * R * C..], all[3 * R * C..]);
    assert!(Tensor::scalar(1.0, DType::F32, Device::Cpu)
        .unwrap()
        .unstack_leaves()
        .is_err());
}

#[test]
fn stack_views_is_a_view_with_the_values_of_cat() {
    let (buf, l) = leaves(2);
    let s = Tensor::stack_views(&refs(&l))
        .unwrap()
        .expect("adjacent views");
    assert!(s.same_storage(&buf));
    assert_eq!(s.dims(), &[E, R, C]);
    assert!(s.is_contiguous());
    assert_eq!(s.layout().offset(), 0);
    assert!(s.tracks_grad() && !s.is_variable());
    assert_eq!(s.to_vec_f64().unwrap(), buf.to_vec_f64().unwrap());
    let parts: Vec<Tensor> = l.iter().map(|t| t.unsqueeze(0).unwrap()).collect();
    let c = cat(&refs(&parts), 0).unwrap();
    assert_eq!(s.to_vec_f64().unwrap(), c.to_vec_f64().unwrap());
    // `stack` takes the same view.
    assert!(stack(&refs(&l)).unwrap().same_storage(&buf));
    // A run of slices in the middle of a buffer stacks too (offset kept), and tensors that
    // track no gradient give a view without a node.
    let plain: Vec<Tensor> = (1..3)
        .map(|e| buf.narrow(0, e, 1).unwrap().squeeze(0).unwrap())
        .collect();
    let mid = Tensor::stack_views(&refs(&plain))
        .unwrap()
        .expect("adjacent");
    assert_eq!(mid.layout().offset(), R * C);
    assert!(!mid.tracks_grad());
    assert_eq!(
        mid.to_vec_f64().unwrap(),
        buf.to_vec_f64().unwrap()[R * C..3 * R * C]
    );
}

/// The gradient of every leaf is a view of the stacked gradient: no copy on the way back.
#[test]
fn stack_views_gradients_are_views_of_the_stacked_gradient() {
    let (_, l) = leaves(3);
    let s = Tensor::stack_views(&refs(&l)).unwrap().unwrap();
    let g = randn(&[E, R, C], 4);
    s.backward_with_grad(&g).unwrap();
    let gv = g.to_vec_f64().unwrap();
    for (e, t) in l.iter().enumerate() {
        let ge = t.grad().expect("gradient");
        assert!(ge.same_storage(&g), "expert {e}: its gradient was copied");
        assert_eq!(ge.dims(), &[R, C]);
        assert_eq!(ge.to_vec_f64().unwrap(), gv[e * R * C..(e + 1) * R * C]);
    }
}

/// Gradients through the view equal those through `cat` of separate copies, bit for bit, and
/// an input that tracks no gradient gets none.
#[test]
fn stack_views_gradients_equal_cat() {
    let (_, l) = leaves(5);
    let copies: Vec<Tensor> = l.iter().map(|t| t.detach().to_var().unwrap()).collect();
    let via_view = Tensor::stack_views(&refs(&l)).unwrap().unwrap();
    let via_cat = stack(&refs(&copies)).unwrap();
    assert!(
        !via_cat.same_storage(&copies[0]),
        "separate buffers are copied"
    );
    let r = randn(&[E, R, C], 6);
    for s in [&via_view, &via_cat] {
        head(s)
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    }
    for (a, b) in l.iter().zip(&copies) {
        assert_eq!(
            a.grad().unwrap().to_vec_f64().unwrap(),
            b.grad().unwrap().to_vec_f64().unwrap()
        );
    }
    // Only some inputs train: the others get nothing.
    let buf = randn(&[E, R, C], 7);
    let mut mixed: Vec<Tensor> = buf.unstack_leaves().unwrap();
    mixed[1] = mixed[1].detach();
    let s = Tensor::stack_views(&refs(&mixed)).unwrap().unwrap();
    s.sum_all().unwrap().backward().unwrap();
    assert!(mixed[1].grad().is_none());
    assert!(mixed[0].grad().is_some() && mixed[3].grad().is_some());
}

/// Finite differences in f64 through the view: the inputs are slices of one variable, so the
/// stack is a view, and its gradient flows back through the slices.
#[test]
fn grad_stack_views() {
    check_gradients("stack_views", &[randn(&[E, R, C], 8)], |x| {
        let parts: Vec<Tensor> = (0..E)
            .map(|e| x[0].narrow(0, e, 1)?.squeeze(0))
            .collect::<engine::Result<_>>()?;
        let s = Tensor::stack_views(&refs(&parts))?.expect("slices of one buffer");
        assert!(s.same_storage(&x[0]));
        head(&s)
    });
    // The same function through separate tensors (the `cat` fallback).
    let inputs: Vec<Tensor> = (0..E).map(|e| randn(&[R, C], 20 + e as u64)).collect();
    check_gradients("stack (cat fallback)", &inputs, |x| {
        assert!(Tensor::stack_views(&refs(x))?.is_none());
        head(&stack(&refs(x))?)
    });
}

/// Anything but equally-shaped contiguous views back to back in one buffer gives `None`, and
/// `stack` copies them with `cat`'s values.
#[test]
fn stack_views_falls_back_when_not_adjacent() {
    let (buf, l) = leaves(9);
    let none = |ts: &[&Tensor]| Tensor::stack_views(ts).unwrap().is_none();
    // Separate buffers.
    let copies: Vec<Tensor> = l.iter().map(|t| t.detach().to_var().unwrap()).collect();
    assert!(none(&refs(&copies)));
    // Another order, a gap, a repeat.
    assert!(none(&[&l[1], &l[0], &l[2], &l[3]]));
    assert!(none(&[&l[0], &l[2]]));
    assert!(none(&[&l[0], &l[0]]));
    // Not contiguous: the transposes of the leaves, and strided column slices.
    let tr: Vec<Tensor> = l.iter().map(|t| t.t().unwrap()).collect();
    assert!(none(&refs(&tr)));
    let flat = buf.reshape([E * R, C]).unwrap();
    let cols: Vec<Tensor> = (0..C).map(|j| flat.narrow(1, j, 1).unwrap()).collect();
    assert!(none(&refs(&cols)));
    // Different shapes over adjacent ranges.
    let v = buf.flatten_all().unwrap();
    let (a, b) = (v.narrow(0, 0, 3).unwrap(), v.narrow(0, 3, 4).unwrap());
    assert!(none(&[&a, &b]));
    // An empty list is an error.
    assert!(Tensor::stack_views(&[]).is_err());
    // The fallback copies, with the values of `cat`.
    let order = [&l[3], &l[1], &l[2], &l[0]];
    let s = stack(&order).unwrap();
    assert!(!s.same_storage(&buf));
    let parts: Vec<Tensor> = order.iter().map(|t| t.unsqueeze(0).unwrap()).collect();
    assert_eq!(
        s.to_vec_f64().unwrap(),
        cat(&refs(&parts), 0).unwrap().to_vec_f64().unwrap()
    );
    // And a single contiguous tensor is a one-element stack of itself.
    let one = Tensor::stack_views(&[&l[2]]).unwrap().unwrap();
    assert_eq!(one.dims(), &[1, R, C]);
    assert!(one.same_storage(&buf));
}
