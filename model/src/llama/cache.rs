//! Incremental decoding: the keys and values of the positions seen so far, and the RoPE
//! positions of new tokens after them.

use engine::{Device, Tensor};

use crate::error::Result;

/// Keys and values of the positions seen so far, per layer: `[B, Hkv, S, D]` each.
#[derive(Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RoPE positions `[B, T]` of `t` new tokens after `past` cached ones: the number of real
/// tokens before each one (so left padding does not shift positions); `0..` when no mask.
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
                let mut seen = 0u32;
                let mut row_pos = Vec::with_capacity(s);
                for &v in row {
                    row_pos.push(seen);
                    seen += (v != 0) as u32;
                }
                out.extend_from_slice(&row_pos[s - t..]);
            }
            out
        }
    };
    Ok(Tensor::from_vec(pos, [b, t], device)?)
}
