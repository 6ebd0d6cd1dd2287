//! What a graph keeps alive: the buffers its tape nodes hold (kept inputs, the buffers that
//! graph-only references must keep, and the tensors their rules captured), for memory audits and
//! tests of what an op saves.

use std::collections::{HashMap, HashSet};

use crate::{DType, Shape, Tensor};

/// One buffer held by the tape nodes of a graph.
#[derive(Clone, Debug)]
pub struct SavedBuffer {
    /// The op whose node holds it (the first one the walk from the root meets, when several do).
    pub kept_by: &'static str,
    /// The op that computed the held tensor; `None` for a leaf (a variable, a frozen weight,
    /// data, or a tensor a rule captured).
    pub made_by: Option<&'static str>,
    /// Shape and dtype of the held view (the buffer may be larger: see `bytes`).
    pub shape: Shape,
    pub dtype: DType,
    /// Bytes of the whole buffer.
    pub bytes: usize,
    /// Whether the held tensor is a variable (a trainable parameter).
    pub variable: bool,
    /// The held tensor (it keeps the buffer alive while this entry lives): e.g. to compare it
    /// with a model's frozen weights through [`Tensor::same_storage`].
    pub tensor: Tensor,
}

/// Every distinct buffer (deduplicated by identity) that the tape nodes reachable from `root`
/// hold, in walk order. The root's own buffer is not counted (the caller holds it).
pub fn saved_buffers(root: &Tensor) -> Vec<SavedBuffer> {
    let mut out = Vec::new();
    let mut buffers = HashSet::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root.clone()];
    seen.insert(root.id());
    while let Some(t) = stack.pop() {
        let Some(node) = t.node() else { continue };
        for held in node.inputs.iter().chain(&node.captured) {
            if held.has_data() && buffers.insert(held.storage_key()) {
                out.push(SavedBuffer {
                    kept_by: node.name(),
                    made_by: held.node().map(|n| n.name()),
                    shape: held.shape().clone(),
                    dtype: held.dtype(),
                    bytes: held.storage_bytes(),
                    variable: held.is_variable(),
                    tensor: held.clone(),
                });
            }
        }
        for inp in node.inputs() {
            if inp.node().is_some() && seen.insert(inp.id()) {
                stack.push(inp.clone());
            }
        }
    }
    out
}

/// [`saved_buffers`] summed per holding op: `(op name, bytes)`, largest first.
pub fn saved_tensor_bytes(root: &Tensor) -> Vec<(&'static str, usize)> {
    let mut per_op: HashMap<&'static str, usize> = HashMap::new();
    for b in saved_buffers(root) {
        *per_op.entry(b.kept_by).or_default() += b.bytes;
    }
    let mut v: Vec<(&'static str, usize)> = per_op.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}
