//! Views and concatenation (`engine/src/ops/view.rs`, `ops/concat.rs`, `ops/stack.rs`):
//! reshape, transpose, permute, narrow, broadcast, (un)squeeze; `cat`, `split`, `chunk`;
//! `stack` and `Tensor::stack_views`; `assign`, `add_assign` and `write_slice` through views.
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), through views, `cat`
//! (of transposed parts and of one tensor several times), `split`, `chunk` and `stack_views`;
//! values of `cat`, `split` and `chunk` exactly; `assign` seen by every view; `add_assign` equal to
//! assigning the sum, bit for bit; typed errors.
//!
//! `Tensor::stack_views`: equally-shaped contiguous views lying back to back in one buffer stack
//! into an `[E, ..]` view of that buffer (no copy), whose gradient reaches each input as a view
//! of the stacked gradient; anything else gives `None`, and `engine::stack` copies (`cat`).
//! Values and gradients equal the `cat` path's bit for bit.
//!
//! The GPU side of views is the strided copy, tested with the copies in `elementwise`.

use crate::util::{is_shape_err, vals};
use engine::{cat, stack, DType, Device, Error, Tensor};
use testutil::{check_gradients, randn};

const CPU: Device = Device::Cpu;

// ----- gradient checks ----------------------------------------------------------------------

#[test]
fn grad_reshape_transpose_permute_narrow() {
    check_gradients("reshape", &[randn(&[2, 3, 4], 1)], |x| x[0].reshape([6, 4]));
    check_gradients("transpose", &[randn(&[2, 3, 4], 2)], |x| {
        x[0].transpose(0, 2)?.contiguous()
    });
    check_gradients("permute", &[randn(&[2, 3, 4], 3)], |x| {
        x[0].permute(&[1, 2, 0])?.reshape([12, 2])
    });
    check_gradients("narrow", &[randn(&[4, 5], 4)], |x| {
        x[0].narrow(1, 1, 3)?.narrow(0, 2, 2)
    });
    check_gradients("broadcast_as", &[randn(&[3, 1], 5)], |x| {
        x[0].broadcast_as([2, 3, 4])
    });
    check_gradients("unsqueeze_squeeze", &[randn(&[3, 2], 6)], |x| {
        x[0].unsqueeze(1)?.t()?.squeeze(2)
    });
}

#[test]
fn grad_cat_split_chunk() {
    check_gradients(
        "cat_dim1",
        &[randn(&[2, 3], 60), randn(&[2, 2], 61), randn(&[3, 2], 62)],
        |x| cat(&[&x[0], &x[1], &x[2].t()?], 1),
    );
    check_gradients("cat_dim0", &[randn(&[1, 4], 63), randn(&[3, 4], 64)], |x| {
        cat(&[&x[1], &x[0]], 0)
    });
    check_gradients(
        "cat_neg_dim",
        &[randn(&[2, 3, 2], 65), randn(&[2, 2, 1], 66)],
        |x| cat(&[&x[0], &x[1].transpose(1, 2)?], -2),
    );
    check_gradients("cat_self", &[randn(&[2, 2], 67)], |x| {
        cat(&[&x[0], &x[0].mul_scalar(3.0)?, &x[0]], 0)
    });
    check_gradients("split", &[randn(&[3, 6], 68)], |x| {
        let p = x[0].split(&[1, 2, 3], 1)?;
        cat(&[&p[2], &p[0].mul_scalar(2.0)?, &p[1].sqr()?], 1)
    });
    check_gradients("split_partly_used", &[randn(&[5, 2], 69)], |x| {
        let p = x[0].split(&[2, 3], 0)?;
        p[1].exp()
    });
    check_gradients("chunk", &[randn(&[5, 4], 70)], |x| {
        let c = x[0].chunk(3, 0)?; // 2, 2, 1 rows
        assert_eq!(c.len(), 3);
        cat(&[&c[0].mul(&c[1])?, &c[2]], 0)
    });
    check_gradients("chunk_transposed", &[randn(&[4, 6], 71)], |x| {
        let c = x[0].t()?.chunk(2, -1)?; // [6, 2] each
        c[0].sub(&c[1].sqr()?)
    });
}

// ----- values -------------------------------------------------------------------------------

#[test]
fn cat_split_chunk_values() {
    let a = Tensor::from_vec((0..6).map(f64::from).collect::<Vec<_>>(), [2, 3], CPU).unwrap();
    let b = Tensor::from_vec(vec![10.0, 11.0], [2, 1], CPU).unwrap();
    let c = cat(&[&a, &b, &a.narrow(1, 1, 2).unwrap()], 1).unwrap();
    assert_eq!(c.dims(), &[2, 6]);
    assert_eq!(
        vals(&c),
        vec![0., 1., 2., 10., 1., 2., 3., 4., 5., 11., 4., 5.]
    );
    let r = cat(&[&a.t().unwrap(), &a.t().unwrap()], 0).unwrap();
    assert_eq!(
        vals(&r),
        vec![0., 3., 1., 4., 2., 5., 0., 3., 1., 4., 2., 5.]
    );
    let parts = c.split(&[3, 1, 2], -1).unwrap();
    assert_eq!(vals(&parts[0]), vals(&a));
    assert_eq!(vals(&parts[1]), vals(&b));
    assert!(parts[2].same_storage(&c));
    let ch = Tensor::arange(7, CPU).unwrap().chunk(3, 0).unwrap();
    let sizes: Vec<usize> = ch.iter().map(|t| t.dims()[0]).collect();
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(ch[2].to_vec_u32().unwrap(), vec![6]);
    // Fewer chunks when n does not fit: 6 into 4 gives 3 chunks of 2.
    assert_eq!(
        Tensor::arange(6, CPU).unwrap().chunk(4, 0).unwrap().len(),
        3
    );
    // cat of u32 tensors works too (no gradient).
    let u = cat(&[&ch[2], &ch[0]], 0).unwrap();
    assert_eq!(u.to_vec_u32().unwrap(), vec![6, 0, 1, 2]);
}

#[test]
fn assign_updates_all_views_in_place() {
    let p = randn(&[2, 3], 11).to_var().unwrap();
    let view = p.narrow(1, 1, 2).unwrap();
    let new = randn(&[2, 3], 12);
    p.assign(&new).unwrap();
    assert_eq!(p.to_vec_f64().unwrap(), new.to_vec_f64().unwrap());
    assert_eq!(
        view.to_vec_f64().unwrap(),
        new.narrow(1, 1, 2).unwrap().to_vec_f64().unwrap()
    );
}

#[test]
fn add_assign_equals_assigning_the_sum_bit_for_bit() {
    for dt in [DType::F32, DType::F64, DType::BF16] {
        // A transposed source added into a narrowed view: the view's elements take the sum
        // (rounded once, as `add`), the buffer's others stay.
        let buf = randn(&[4, 6], 21).to_dtype(dt).unwrap();
        let before = buf.to_vec_f64().unwrap();
        let view = buf.narrow(1, 2, 3).unwrap();
        let src = randn(&[3, 4], 22).to_dtype(dt).unwrap().t().unwrap();
        let want = view.add(&src).unwrap().to_vec_f64().unwrap();
        view.add_assign(&src).unwrap();
        assert_eq!(view.to_vec_f64().unwrap(), want, "{dt}");
        let after = buf.to_vec_f64().unwrap();
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if !(2..5).contains(&(i % 6)) {
                assert_eq!(a, b, "{dt}: element {i} outside the view changed");
            }
        }
        // A tensor added into itself doubles.
        let t = randn(&[5], 23).to_dtype(dt).unwrap();
        let twice = t.add(&t).unwrap().to_vec_f64().unwrap();
        t.add_assign(&t).unwrap();
        assert_eq!(t.to_vec_f64().unwrap(), twice, "{dt}");
    }
    // A large contiguous run (the parallel path) too.
    let (a, b) = (randn(&[70_000], 24), randn(&[70_000], 25));
    let want = a.add(&b).unwrap().to_vec_f64().unwrap();
    a.add_assign(&b).unwrap();
    assert_eq!(a.to_vec_f64().unwrap(), want);
}

#[test]
fn write_slice_overwrites_a_contiguous_view_in_place() {
    let buf = Tensor::from_vec((0..12u32).collect::<Vec<_>>(), [3, 4], CPU).unwrap();
    let row = buf.narrow(0, 1, 1).unwrap();
    row.write_slice(&[40u32, 41, 42, 43]).unwrap();
    assert_eq!(
        buf.to_vec_u32().unwrap(),
        vec![0, 1, 2, 3, 40, 41, 42, 43, 8, 9, 10, 11]
    );
    let f = randn(&[2, 2], 41).to_dtype(DType::F32).unwrap();
    f.write_slice(&[1.5f32, -2.0, 0.25, 8.0]).unwrap();
    assert_eq!(f.to_vec_f64().unwrap(), vec![1.5, -2.0, 0.25, 8.0]);
    // Wrong count, wrong dtype, a view that is not one run: typed errors, nothing written.
    let e = f.write_slice(&[1.0f32]).unwrap_err();
    assert!(matches!(e, Error::ElementCountMismatch { .. }), "{e}");
    let e = f.write_slice(&[1.0f64, 2.0, 3.0, 4.0]).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    let e = buf
        .narrow(1, 0, 2)
        .unwrap()
        .write_slice(&[0u32; 6])
        .unwrap_err();
    assert!(e.to_string().contains("not contiguous"), "{e}");
    assert_eq!(buf.to_vec_u32().unwrap()[..2], [0, 1]);
}

#[test]
fn add_assign_refuses_other_shapes_dtypes_u32_and_broadcast_views() {
    let t = randn(&[2, 3], 31);
    assert!(is_shape_err(t.add_assign(&randn(&[3, 2], 32))));
    let e = t
        .add_assign(&randn(&[2, 3], 33).to_dtype(DType::BF16).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    let u = Tensor::arange(6, CPU).unwrap();
    assert!(u.add_assign(&u.copy().unwrap()).is_err());
    // One element standing for a whole row: the sum would land on it three times.
    let row = randn(&[1, 3], 34).broadcast_as([2, 3]).unwrap();
    let e = row.add_assign(&randn(&[2, 3], 35)).unwrap_err();
    assert!(e.to_string().contains("broadcast"), "{e}");
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn view_typed_errors() {
    let a = randn(&[2, 3], 13);
    assert!(matches!(
        a.reshape([7]),
        Err(Error::ShapeMismatch { op: "reshape", .. })
    ));
    assert!(matches!(
        a.narrow(1, 2, 2),
        Err(Error::InvalidArgument { op: "narrow", .. })
    ));
}

#[test]
fn cat_split_chunk_errors() {
    let x = randn(&[3, 4], 180);
    assert!(cat(&[], 0).is_err());
    let y = randn(&[3, 5], 181);
    assert!(is_shape_err(cat(&[&x, &y], 0)));
    assert!(cat(&[&x, &y], 1).is_ok());
    assert!(matches!(
        cat(&[&x, &y], 2),
        Err(Error::DimOutOfRange { .. })
    ));
    assert!(is_shape_err(cat(&[&x, &randn(&[3, 4, 1], 182)], 0)));
    assert!(matches!(
        cat(&[&x, &x.to_dtype(DType::F32).unwrap()], 0),
        Err(Error::DTypeMismatch { .. })
    ));

    assert!(x.split(&[1, 1], 0).is_err());
    assert!(x.split(&[2, 3], 1).is_err());
    assert!(x.split(&[3], 2).is_err());
    assert!(x.chunk(0, 0).is_err());
    assert!(x.chunk(2, -3).is_err());
}

// ----- stack_views ----------------------------------------------------------------------------

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
