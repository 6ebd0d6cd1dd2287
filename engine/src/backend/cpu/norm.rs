//! RMSNorm and RoPE CPU kernels.

use super::CpuStorage;
use crate::{Error, Layout, Result};

pub(super) fn rms_norm(
    _x: &CpuStorage,
    _l: &Layout,
    _w: &CpuStorage,
    _wl: &Layout,
    _eps: f64,
) -> Result<CpuStorage> {
    Err(Error::invalid("rms_norm", "not yet implemented"))
}

pub(super) fn rms_norm_backward(
    _x: &CpuStorage,
    _l: &Layout,
    _w: &CpuStorage,
    _wl: &Layout,
    _g: &CpuStorage,
    _gl: &Layout,
    _eps: f64,
) -> Result<(CpuStorage, CpuStorage)> {
    Err(Error::invalid("rms_norm_backward", "not yet implemented"))
}

pub(super) fn rope(
    _x: &CpuStorage,
    _l: &Layout,
    _cos: &CpuStorage,
    _cl: &Layout,
    _sin: &CpuStorage,
    _sl: &Layout,
) -> Result<CpuStorage> {
    Err(Error::invalid("rope", "not yet implemented"))
}
