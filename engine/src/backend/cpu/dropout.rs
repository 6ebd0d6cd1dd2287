//! Dropout on the CPU: the mask (`BackendDevice::dropout_mask`) and the masked product
//! (`BackendStorage::dropout_apply`), drawn from the counter-based hash of `crate::rng`, so the
//! same `(seed, index)` drops the same element on every backend.
//!
//! The dropout key ([`crate::set_dropout_key`]) is applied where a dropout enters the CPU
//! backend, once: [`dropout_mask`] and [`dropout_apply`] here, and the fused units' CPU branches
//! (`fused/lora/primitives.rs`, `fused/moe_ffn/primitives.rs`) key their seeds with [`keyed`]
//! before calling their CPU code. Everything below those entries ([`mask_in_place`], the fused
//! units' `cpu.rs`) takes the keyed seed as it is; keying again would XOR the key back out.

use half::bf16;
use rayon::prelude::*;

use super::CpuStorage;
use crate::{rng, DType, Error, Layout, Result, Shape};

thread_local! {
    /// The CPU's dropout key of each lane ([`crate::set_dropout_key`], [`crate::set_lane`]): per
    /// host thread, since CPU ops run on the thread that calls them (their rayon workers get the
    /// keyed seed as a value).
    static DROPOUT_KEYS: std::cell::Cell<[u64; crate::LANES]> =
        const { std::cell::Cell::new([0; crate::LANES]) };
    /// The calling thread's lane.
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Sets the dropout key of the calling thread's lane.
pub(crate) fn set_dropout_key(key: u64) {
    let lane = LANE.with(std::cell::Cell::get);
    DROPOUT_KEYS.with(|k| {
        let mut keys = k.get();
        keys[lane] = key;
        k.set(keys);
    });
}

/// Sets the calling thread's lane (below [`crate::LANES`], checked by the caller).
pub(crate) fn set_lane(lane: usize) {
    LANE.with(|l| l.set(lane));
}

/// The seed a CPU op draws its dropout mask from: its own `seed` XOR the key of the calling
/// thread's lane (`seed` itself while the key is 0). Called on the op's thread, before any rayon
/// work.
pub(crate) fn keyed(seed: u64) -> u64 {
    let lane = LANE.with(std::cell::Cell::get);
    seed ^ DROPOUT_KEYS.with(|k| k.get()[lane])
}

/// `0` with probability `p`, else `1/(1 − p)`, counter-based (`rng::dropped` of the keyed seed):
/// the dropout mask (`BackendDevice::dropout_mask`).
pub(super) fn dropout_mask(shape: &Shape, dtype: DType, p: f64, seed: u64) -> Result<CpuStorage> {
    let seed = keyed(seed); // on the calling thread, before the parallel fill
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
    let (keep, thr) = (1.0 / (1.0 - p), rng::dropout_threshold(p));
    Ok(super::random::fill_with(shape.elem_count(), dtype, |i| {
        if rng::dropped(seed, i, thr) {
            0.0
        } else {
            keep
        }
    }))
}

/// `x ⊙ dropout_mask(p, seed)` in x's dtype over the view's row-major elements (see
/// `BackendStorage::dropout_apply`): the same products as `binary(Mul)` with the mask tensor
/// (the mask of the keyed seed, as [`dropout_mask`] draws it).
pub(super) fn dropout_apply(x: &CpuStorage, l: &Layout, p: f64, seed: u64) -> Result<CpuStorage> {
    const OP: &str = "dropout";
    let seed = keyed(seed); // on the calling thread, before `mask_in_place`'s rayon chunks
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            OP,
            format!("probability {p} is not in [0, 1)"),
        ));
    }
    let (keep, thr) = (1.0 / (1.0 - p), rng::dropout_threshold(p));
    Ok(match x {
        CpuStorage::F32(v) => {
            let k = keep as f32;
            let mut v = CpuStorage::gather_view(v, l);
            mask_in_place(&mut v, seed, thr, |e, d| e * if d { 0.0 } else { k });
            CpuStorage::F32(v)
        }
        CpuStorage::BF16(v) => {
            // The mask in bf16 (keep rounded), the product in f32 rounded once, as `binary`.
            let k = bf16::from_f64(keep).to_f32();
            let mut v = CpuStorage::gather_view(v, l);
            mask_in_place(&mut v, seed, thr, |e, d| {
                bf16::from_f32(e.to_f32() * if d { 0.0 } else { k })
            });
            CpuStorage::BF16(v)
        }
        CpuStorage::F64(v) => {
            let mut v = CpuStorage::gather_view(v, l);
            mask_in_place(&mut v, seed, thr, |e, d| e * if d { 0.0 } else { keep });
            CpuStorage::F64(v)
        }
        CpuStorage::U32(_) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
    })
}

/// `v[i] = mul(v[i], dropped(i))` over a row-major buffer, `dropped(i)` the dropout draw of
/// element `i` (`rng::dropped(seed, i, thr)`), in parallel chunks on large buffers. `seed` is
/// used as given: the caller has keyed it.
pub(crate) fn mask_in_place<T: Copy + Send + Sync>(
    v: &mut [T],
    seed: u64,
    thr: u32,
    mul: impl Fn(T, bool) -> T + Sync + Send,
) {
    // `rng::dropped` per element, with one hash per four elements (`rng::dropout_bits`).
    let f = |base: usize, ch: &mut [T]| {
        let (mut group, mut h) = (u64::MAX, 0u64);
        for (j, e) in ch.iter_mut().enumerate() {
            let i = (base + j) as u64;
            if i >> 2 != group {
                group = i >> 2;
                h = rng::hash(seed, group);
            }
            let bits = ((h >> ((i & 3) * 16)) & 0xFFFF) as u32;
            *e = mul(*e, bits < thr);
        }
    };
    if v.len() < super::PAR_THRESHOLD {
        f(0, v);
    } else {
        const CH: usize = 4096;
        v.par_chunks_mut(CH)
            .enumerate()
            .for_each(|(c, ch)| f(c * CH, ch));
    }
}
