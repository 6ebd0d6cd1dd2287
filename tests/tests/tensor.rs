//! Tensor-level tests that are about no single op: autograd (a second backward adds up, frozen
//! tensors get no gradient, `no_grad` and frozen-only computations record nothing), and the
//! typed errors of creating a tensor (an element count that does not fit the shape; a GPU where
//! none is usable: this target is not built for the GPU machine).

use engine::{no_grad, DType, Device, Error, Tensor};
use testutil::randn;

#[test]
fn autograd_accumulates_and_respects_frozen_and_no_grad() {
    let w = randn(&[3, 2], 9).to_var().unwrap();
    let frozen = randn(&[2, 3], 10);
    let loss = frozen.matmul(&w).unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    let g1 = w.grad().unwrap().to_vec_f64().unwrap();
    loss.backward().unwrap();
    let g2 = w.grad().unwrap().to_vec_f64().unwrap();
    for (a, b) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b).abs() < 1e-12, "second backward must add up");
    }
    assert!(
        frozen.grad().is_none(),
        "frozen tensors get no gradient buffer"
    );
    w.zero_grad();
    assert!(w.grad().is_none());
    let out = no_grad(|| frozen.matmul(&w).unwrap());
    assert!(!out.tracks_grad(), "no_grad records nothing");
    assert!(matches!(
        out.sum_all().unwrap().backward(),
        Err(Error::Backward { .. })
    ));
    // A frozen-only computation records nothing either.
    assert!(!frozen.exp().unwrap().tracks_grad());
}

#[test]
fn tensor_creation_typed_errors() {
    assert!(matches!(
        Tensor::from_vec(vec![1.0f32; 5], [2, 3], Device::Cpu),
        Err(Error::ElementCountMismatch { .. })
    ));
    assert!(matches!(
        Tensor::zeros([2], DType::F32, Device::Cuda(0)),
        Err(Error::DeviceUnavailable { .. })
    ));
}
