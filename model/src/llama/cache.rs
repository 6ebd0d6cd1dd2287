//! Incremental decoding: the keys and values of the positions seen so far, and the RoPE
//! positions of new tokens after them.

use engine::{cat, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of the positions seen so far, per layer: `[B, Hkv, S, D]` each.
///
/// [`KvCache::new`] grows by concatenation (each append copies the layer's cache; the tape
/// records it, so a training forward may use it). [`KvCache::with_capacity`] allocates each
/// layer's `[B, Hkv, capacity, D]` buffers at the first append and writes new positions in place:
/// memory is fixed by the capacity, and appending past it is an error. It is for inference:
/// in-place writes are not recorded, so an append of keys that track a gradient is refused.
#[derive(Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerKv>>,
    capacity: Option<usize>,
}

/// One layer's cached keys and values.
pub(super) struct LayerKv {
    /// `[B, Hkv, S, D]`, or `[B, Hkv, capacity, D]` of which the first `len` positions are set.
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// A cache that grows by concatenation, without bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache of at most `capacity` positions, preallocated per layer at its first append.
    pub fn with_capacity(capacity: usize) -> Self {
        KvCache {
            layers: Vec::new(),
            capacity: Some(capacity),
        }
    }

    /// The most positions the cache holds (`None`: unbounded).
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's part of a [`KvCache`], for one forward pass.
pub(super) struct LayerSlot<'a> {
    slot: &'a mut Option<LayerKv>,
    capacity: Option<usize>,
}

impl KvCache {
    /// Layer `li`'s slot (the cache gets one slot per layer of a model with `n_layers`).
    pub(super) fn layer(&mut self, li: usize, n_layers: usize) -> LayerSlot<'_> {
        if self.layers.len() < n_layers {
            self.layers.resize_with(n_layers, || None);
        }
        LayerSlot {
            slot: &mut self.layers[li],
            capacity: self.capacity,
        }
    }
}

impl LayerSlot<'_> {
    /// Appends the new keys and values `k`, `v` `[B, Hkv, T, D]` and returns all of the layer's
    /// keys and values `[B, Hkv, S, D]` (`S` = cached + `T`).
    pub(super) fn append(self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        append(self.slot, self.capacity, k, v)
    }
}

fn append(
    slot: &mut Option<LayerKv>,
    capacity: Option<usize>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let t = k.dims()[2];
    let Some(cap) = capacity else {
        let (k, v) = match slot.take() {
            Some(prev) => (cat(&[&prev.k, &k], 2)?, cat(&[&prev.v, &v], 2)?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        let len = k.dims()[2];
        *slot = Some(LayerKv {
            k: k.clone(),
            v: v.clone(),
            len,
        });
        return Ok((k, v));
    };
    if k.tracks_grad() || v.tracks_grad() {
        return Err(Error::Invalid(
            "KV cache: a preallocated cache is for inference, but the new keys track a gradient \
             (run the forward under no_grad, or use KvCache::new)"
                .into(),
        ));
    }
    let len = slot.as_ref().map_or(0, |l| l.len);
    if len + t > cap {
        return Err(Error::Invalid(format!(
            "KV cache: {len} cached + {t} new positions exceed its capacity of {cap}"
        )));
    }
    if slot.is_none() {
        let mut dims = k.dims().to_vec();
        dims[2] = cap;
        *slot = Some(LayerKv {
            k: Tensor::zeros(dims.clone(), k.dtype(), k.device())?,
            v: Tensor::zeros(dims, v.dtype(), v.device())?,
            len: 0,
        });
    }
    let layer = slot.as_mut().expect("allocated above");
    layer.k.narrow(2, len, t)?.assign(&k)?;
    layer.v.narrow(2, len, t)?.assign(&v)?;
    layer.len = len + t;
    Ok((
        layer.k.narrow(2, 0, layer.len)?,
        layer.v.narrow(2, 0, layer.len)?,
    ))
}

/// RoPE positions `[B, T]` of `t` new tokens after `past` cached ones: the number of earlier
/// tokens of the same segment (the key mask's value: 1 for every real token of an unpacked row,
/// `1, 2, ..` for sequences packed into one row, whose positions so restart at 0), so left
/// padding does not shift positions; a padding token gets the number of real tokens before it.
/// `0..` when no mask.
pub fn positions_from_mask(
    b: usize,
    t: usize,
    key_mask: Option<&Tensor>,
    past: usize,
    device: Device,
) -> Result<Tensor> {
    let pos: Vec<u32> = match key_mask {
        None => (0..b)
            .flat_map(|_| (past..past + t).map(|p| p as u32))
            .collect(),
        Some(m) => {
            if m.rank() != 2 || m.dims()[0] != b || m.dims()[1] < t {
                return Err(engine::Error::invalid(
                    "positions_from_mask",
                    format!(
                        "key mask of shape {} for {b} sequences of {t} new tokens",
                        m.shape()
                    ),
                )
                .into());
            }
            let s = m.dims()[1];
            let mv = m.to_vec_u32()?;
            let mut out = Vec::with_capacity(b * t);
            for row in mv.chunks(s) {
                out.extend_from_slice(&row_positions(row)[s - t..]);
            }
            out
        }
    };
    Ok(Tensor::from_vec(pos, [b, t], device)?)
}

/// The RoPE positions `[B·S]` of a host key mask `[B, S]` (row-major, `s` positions a row):
/// what [`positions_from_mask`] computes from the mask on a device, without reading it back
/// (work recorded into a CUDA graph cannot wait for the device).
pub fn mask_positions(mask: &[u32], s: usize) -> Vec<u32> {
    mask.chunks(s.max(1)).flat_map(row_positions).collect()
}

/// The RoPE positions of one row of a key mask (0 padding, else the token's segment): each real
/// token's count of earlier tokens of its segment, each padding token's count of earlier real
/// tokens. With a 0/1 mask, the number of real tokens before each one.
pub(crate) fn row_positions(mask_row: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashMap::<u32, u32>::new();
    let mut real = 0u32;
    mask_row
        .iter()
        .map(|&v| {
            if v == 0 {
                return real;
            }
            real += 1;
            let n = seen.entry(v).or_insert(0);
            *n += 1;
            *n - 1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{mask_positions, positions_from_mask, row_positions};
    use engine::{Device, Tensor};

    #[test]
    fn positions_restart_in_each_segment() {
        // Left padding, then one sequence: positions count real tokens.
        assert_eq!(row_positions(&[0, 0, 1, 1, 1]), [0, 0, 0, 1, 2]);
        // Packed segments 1, 2, 3, then padding.
        assert_eq!(
            row_positions(&[1, 1, 1, 2, 2, 3, 0, 0]),
            [0, 1, 2, 0, 1, 0, 6, 6]
        );
    }

    #[test]
    fn host_positions_are_the_device_ones() {
        let mask: Vec<u32> = vec![1, 1, 1, 2, 2, 0, 0, 1, 1, 1, 1, 0];
        let m = Tensor::from_slice(&mask, [2, 6], Device::Cpu).unwrap();
        let want = positions_from_mask(2, 6, Some(&m), 0, Device::Cpu)
            .unwrap()
            .to_vec_u32()
            .unwrap();
        assert_eq!(mask_positions(&mask, 6), want);
        assert_eq!(want, [0, 1, 2, 0, 1, 5, 0, 0, 1, 2, 3, 4]);
    }
}
