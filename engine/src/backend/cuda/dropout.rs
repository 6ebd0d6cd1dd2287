//! Dropout on the GPU (kernels/src/dropout.cu): the mask (`BackendDevice::dropout_mask`), the
//! masked product (`BackendStorage::dropout_apply`) and the masked cast that the LoRA primitives
//! use, drawn from the counter-based hash of `crate::rng` (the CPU's bits). Every kernel draws
//! from `seed ^ key`, reading the device's dropout key ([`crate::set_dropout_key`]) from device
//! memory when it runs (`CudaDevice::dropout_key_ptr`): a recorded graph's launches keep their
//! seeds, and the key set before a replay still gives that replay its own masks.

use kernels::DROPOUT;

use super::launch::launch;
use super::layout::to_u32;
use super::{CudaDevice, CudaStorage};
use crate::{rng, DType, Error, Layout, Result, Shape};

/// The dropout mask (`BackendDevice::dropout_mask`): `dropout_mask_{dtype}`.
pub(super) fn dropout_mask(
    dev: &CudaDevice,
    shape: &Shape,
    dtype: DType,
    p: f64,
    seed: u64,
) -> Result<CudaStorage> {
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType {
            op: "dropout",
            dtype,
        });
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            "dropout",
            format!("probability {p} is not in [0, 1)"),
        ));
    }
    const OP: &str = "dropout";
    let n = shape.elem_count();
    let out = CudaStorage::alloc(dev, OP, n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    // The threshold travels as a double (exact: an integer below 2^16).
    let (thr, keep) = (f64::from(rng::dropout_threshold(p)), 1.0 / (1.0 - p));
    let (n32, y, key) = (to_u32(OP, n)?, out.ptr(), dev.dropout_key_ptr());
    let name = format!("dropout_mask_{dtype}");
    // SAFETY: the output holds `n` elements of `dtype`; a thread writes the four elements of its
    // hash (one hash serves four). `key` is the device's 8-byte dropout key, which it owns for
    // its lifetime; the kernel only reads it.
    unsafe {
        launch!(
            dev,
            OP,
            DROPOUT,
            name,
            CudaDevice::grid(n.div_ceil(4)),
            [n32, y, seed, key, thr, keep]
        )
    }?;
    Ok(out)
}

/// `out(C(x) · mask)`: the view `x` (`l`) cast to `out`, times the dropout mask of `(p, seed)`
/// over its row-major elements (`rng::dropped`, kept elements scaled by `1/(1 − p)`), in one
/// pass; `C` is f32 (f64 for f64). The same bits as a cast, a `dropout_mask` and a product.
/// Pairs `(x, out)`: (bf16, f32), (f32, f32), (f32, bf16), (f64, f64): the LoRA primitives' cast
/// to the adapter dtype and back.
pub(crate) fn dropout_cast(
    x: &CudaStorage,
    l: &Layout,
    out: DType,
    p: f64,
    seed: u64,
) -> Result<CudaStorage> {
    dropout_cast_keep(x, l, out, p, seed, DType::F64)
}

/// [`dropout_cast`] with the kept value `1/(1 − p)` rounded to `keep_dtype` first, as a
/// `dropout_mask` of that dtype holds it (`dropout_apply`: the mask in x's own dtype).
fn dropout_cast_keep(
    x: &CudaStorage,
    l: &Layout,
    out: DType,
    p: f64,
    seed: u64,
    keep_dtype: DType,
) -> Result<CudaStorage> {
    const OP: &str = "dropout_cast";
    match (x.dtype, out) {
        (DType::BF16, DType::F32)
        | (DType::F32, DType::F32)
        | (DType::F32, DType::BF16)
        | (DType::BF16, DType::BF16)
        | (DType::F64, DType::F64) => {}
        _ => {
            return Err(Error::invalid(
                OP,
                format!("no kernel from {} to {out}", x.dtype),
            ))
        }
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            OP,
            format!("probability {p} is not in [0, 1)"),
        ));
    }
    let n = l.elem_count();
    let src = x.contiguous(OP, l)?;
    let y = CudaStorage::alloc(&x.dev, OP, n, out)?;
    if n == 0 {
        return Ok(y);
    }
    let keep = 1.0 / (1.0 - p);
    let keep = match keep_dtype {
        DType::BF16 => half::bf16::from_f64(keep).to_f64(),
        DType::F32 => f64::from(keep as f32),
        _ => keep,
    };
    let (n32, thr) = (to_u32(OP, n)?, rng::dropout_threshold(p));
    let (px, py, key) = (src.ptr, y.ptr(), x.dev.dropout_key_ptr());
    let name = format!("dropout_cast_{}_{out}", x.dtype);
    // SAFETY: `src` holds the view's n elements of x's dtype contiguously (`contiguous` checked
    // the view against the buffer) and lives until the launch is queued; `y` holds n elements of
    // `out`. The kernel reads x[i] and writes y[i] for i < n, four elements per thread, and reads
    // the device's 8-byte dropout key `key` (owned by the device for its lifetime).
    unsafe {
        launch!(
            &x.dev,
            OP,
            DROPOUT,
            name,
            CudaDevice::grid(n.div_ceil(4)),
            [n32, px, py, seed, key, thr, keep]
        )
    }?;
    Ok(y)
}

/// `x ⊙ dropout_mask(p, seed)` in x's dtype, contiguous (`BackendStorage::dropout_apply`).
pub(crate) fn dropout_apply(x: &CudaStorage, l: &Layout, p: f64, seed: u64) -> Result<CudaStorage> {
    if !x.dtype.is_float() {
        return Err(Error::UnsupportedDType {
            op: "dropout",
            dtype: x.dtype,
        });
    }
    dropout_cast_keep(x, l, x.dtype, p, seed, x.dtype)
}
