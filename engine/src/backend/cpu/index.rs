//! Index CPU kernels: index_select, index_add, gather, scatter_add, top-k.

use super::CpuStorage;
use crate::{Error, Layout, Result};

pub(super) fn index_select(
    _s: &CpuStorage,
    _l: &Layout,
    _ids: &CpuStorage,
    _il: &Layout,
    _dim: usize,
) -> Result<CpuStorage> {
    Err(Error::invalid("index_select", "not yet implemented"))
}

pub(super) fn index_add(
    _s: &CpuStorage,
    _l: &Layout,
    _ids: &CpuStorage,
    _il: &Layout,
    _src: &CpuStorage,
    _sl: &Layout,
    _dim: usize,
) -> Result<CpuStorage> {
    Err(Error::invalid("index_add", "not yet implemented"))
}

pub(super) fn gather(
    _s: &CpuStorage,
    _l: &Layout,
    _ids: &CpuStorage,
    _il: &Layout,
    _dim: usize,
) -> Result<CpuStorage> {
    Err(Error::invalid("gather", "not yet implemented"))
}

pub(super) fn scatter_add(
    _s: &CpuStorage,
    _l: &Layout,
    _ids: &CpuStorage,
    _il: &Layout,
    _src: &CpuStorage,
    _sl: &Layout,
    _dim: usize,
) -> Result<CpuStorage> {
    Err(Error::invalid("scatter_add", "not yet implemented"))
}

pub(super) fn topk_indices(_s: &CpuStorage, _l: &Layout, _k: usize) -> Result<CpuStorage> {
    Err(Error::invalid("topk", "not yet implemented"))
}
