//! Dropout in one pass (`BackendStorage::dropout_apply`): the same bits as the product with a
//! `dropout_mask` tensor of x's dtype, on contiguous and strided views, forward and backward, and
//! a tape node that keeps nothing.

use engine::{DType, Device, Storage, Tensor};
use testutil::randn;

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `x ⊙ mask` the long way: the mask tensor of x's dtype and an elementwise product.
fn with_mask(x: &Tensor, p: f64, seed: u64) -> Tensor {
    let mask = Storage::dropout_mask(x.device(), x.shape(), x.dtype(), p, seed).unwrap();
    let mask = Tensor::from_f64(
        &engine::backend::BackendStorage::to_f64_vec(
            &mask,
            &engine::Layout::contiguous(x.shape().clone()),
        )
        .unwrap(),
        x.shape().clone(),
        x.dtype(),
        x.device(),
    )
    .unwrap();
    x.mul(&mask).unwrap()
}

#[test]
fn dropout_equals_the_product_with_the_mask_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for p in [0.05, 0.5] {
            let x = randn(&[37, 29], 5).to_dtype(dtype).unwrap();
            // Contiguous, and a transposed (strided) view: the mask follows the logical order.
            for v in [x.clone(), x.t().unwrap()] {
                let got = v.dropout(p, 91, true).unwrap();
                let want = with_mask(&v, p, 91);
                assert_eq!(bits(&got), bits(&want), "{dtype} p {p} {:?}", v.dims());
                let zeros = got
                    .to_vec_f64()
                    .unwrap()
                    .iter()
                    .filter(|&&e| e == 0.0)
                    .count();
                let rate = zeros as f64 / got.elem_count() as f64;
                assert!((rate - p).abs() < 0.1, "{dtype} p {p}: {rate} dropped");
            }
        }
    }
}

#[test]
fn dropout_backward_redraws_the_mask_and_keeps_nothing() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let x = randn(&[16, 24], 6)
            .to_dtype(dtype)
            .unwrap()
            .to_var()
            .unwrap();
        // An activation (not a parameter, which any node keeps in full): nothing is kept.
        let h = x.neg().unwrap().dropout(0.3, 17, true).unwrap();
        let (name, kept) = h.recorded_op().unwrap();
        assert_eq!(
            (name, kept.len()),
            ("dropout", 0),
            "the node keeps no buffer"
        );
        let y = x.dropout(0.3, 17, true).unwrap();
        let g = randn(&[16, 24], 7).to_dtype(dtype).unwrap();
        y.backward_with_grad(&g).unwrap();
        let want = with_mask(&g, 0.3, 17);
        assert_eq!(bits(&x.grad().unwrap()), bits(&want), "{dtype}");
    }
    // Evaluation and p = 0 are the identity.
    let x = randn(&[3, 4], 8);
    assert!(x.dropout(0.3, 1, false).unwrap().same_storage(&x));
    assert!(x.dropout(0.0, 1, true).unwrap().same_storage(&x));
    assert!(x.dropout(1.0, 1, true).is_err());
    let _ = Device::Cpu;
}
