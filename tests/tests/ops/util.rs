//! CPU helpers shared by the op modules: a tensor's values as f64, and whether a result is a
//! shape (or rank) error.

use engine::{Error, Tensor};

/// The values of `t` as f64, row-major.
pub(crate) fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// Whether `r` is a shape or rank mismatch.
pub(crate) fn is_shape_err<T: std::fmt::Debug>(r: engine::Result<T>) -> bool {
    matches!(
        r,
        Err(Error::ShapeMismatch { .. }) | Err(Error::RankMismatch { .. })
    )
}
