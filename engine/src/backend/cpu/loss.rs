//! Fused cross-entropy CPU kernels.

use super::CpuStorage;
use crate::{Error, Layout, Result};

pub(super) fn cross_entropy(
    _s: &CpuStorage,
    _l: &Layout,
    _t: &CpuStorage,
    _tl: &Layout,
    _ignore: u32,
) -> Result<CpuStorage> {
    Err(Error::invalid("cross_entropy", "not yet implemented"))
}

pub(super) fn cross_entropy_backward(
    _s: &CpuStorage,
    _l: &Layout,
    _t: &CpuStorage,
    _tl: &Layout,
    _g: &CpuStorage,
    _gl: &Layout,
    _ignore: u32,
) -> Result<CpuStorage> {
    Err(Error::invalid(
        "cross_entropy_backward",
        "not yet implemented",
    ))
}
