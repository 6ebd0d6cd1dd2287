//! Gradient checkpointing: run a block without recording its intermediates, and recompute them
//! during the backward pass.
//!
//! [`checkpoint`] calls the block once under `no_grad` (only its outputs stay alive), and records
//! one node on its first output whose rule re-runs the block with recording on, over leaf copies
//! of the inputs that share their buffers, and back-propagates the outputs' gradients through that
//! fresh sub-graph. Variables used inside the block (adapter weights) receive their gradient from
//! that inner backward directly; the inputs' gradients are handed back to the outer tape.
//!
//! Several outputs: the block may return more than one tensor (a decoder layer's hidden state and
//! its router probabilities). Output `i > 0` gets a node whose only input is output 0 and whose
//! rule stashes its gradient for output 0's rule; the tape processes every consumer of output 0
//! before output 0 itself, so by the time output 0's rule runs, all stashed gradients are there
//! and one recomputation serves them all. Output `i > 0` hands output 0 a zero gradient so that
//! output 0's rule always runs.
//!
//! The block must be deterministic (the same values on the recomputation): dropout and other
//! random ops must draw from explicit seeds, as every random op of the engine does.

use std::sync::{Arc, Mutex};

use super::{grad_enabled, NoGradGuard, Node};
use crate::{Result, Tensor};

/// A block that can be run again in the backward pass.
pub type CheckpointFn = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync;

/// Turns recording on on this thread until dropped (restores the previous mode).
struct GradEnabledGuard {
    prev: bool,
}

impl GradEnabledGuard {
    fn new() -> Self {
        GradEnabledGuard {
            prev: super::GRAD_ENABLED.with(|g| g.replace(true)),
        }
    }
}

impl Drop for GradEnabledGuard {
    fn drop(&mut self) {
        super::GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Runs `block(inputs)` with its intermediates recomputed in the backward pass instead of stored.
///
/// - `inputs`: the tensors the block's gradient flows back to (e.g. the hidden state entering a
///   decoder layer); they may or may not track a gradient.
/// - `params`: every variable the block uses (its trainable weights). They are only listed so
///   that the node is recorded when the inputs themselves track no gradient (the first layer's
///   input comes from a frozen embedding); their gradients are accumulated by the inner backward.
/// - `block`: returns one or more outputs; the outputs that depend on an input or a parameter
///   get gradients.
///
/// With recording off (inference, or no input and no parameter tracks a gradient) this is just
/// `block(inputs)`.
pub fn checkpoint(
    inputs: &[Tensor],
    params: &[Tensor],
    block: Arc<CheckpointFn>,
) -> Result<Vec<Tensor>> {
    let tracked = inputs.iter().chain(params).any(Tensor::tracks_grad);
    if !grad_enabled() || !tracked {
        return block(inputs);
    }
    let outputs = {
        let _g = NoGradGuard::new();
        block(inputs)?
    };
    let Some(first) = outputs.first() else {
        return Ok(outputs);
    };
    let n_in = inputs.len();
    // Gradients of outputs 1.. stashed by their nodes for output 0's rule.
    let stash: Arc<Mutex<Vec<Option<Tensor>>>> = Arc::new(Mutex::new(vec![None; outputs.len()]));

    let node_inputs: Vec<&Tensor> = inputs.iter().chain(params).collect();
    let rule_stash = stash.clone();
    let rule_block = block.clone();
    let node = Node::record("checkpoint", &node_inputs, move |all, _out, g0| {
        let ins = &all[..n_in];
        let mut grads_out =
            std::mem::take(&mut *rule_stash.lock().unwrap_or_else(|e| e.into_inner()));
        // Leaves over the inputs' buffers: the recomputed graph stops here.
        let leaves: Vec<Tensor> = ins
            .iter()
            .map(|t| {
                if t.tracks_grad() {
                    t.detach_as_leaf()
                } else {
                    t.clone()
                }
            })
            .collect();
        let recomputed = {
            let _g = GradEnabledGuard::new();
            rule_block(&leaves)?
        };
        if let Some(first) = grads_out.first_mut() {
            *first = Some(g0.clone());
        }
        let roots: Vec<(Tensor, Tensor)> = recomputed
            .into_iter()
            .zip(grads_out)
            .filter_map(|(o, g)| Some((o, g?)))
            .filter(|(o, _)| o.tracks_grad())
            .collect();
        super::backward_many(&roots)?;
        let mut result: Vec<Option<Tensor>> = leaves
            .iter()
            .zip(ins)
            .map(|(leaf, t)| {
                if t.tracks_grad() {
                    let g = leaf.grad();
                    leaf.zero_grad();
                    g
                } else {
                    None
                }
            })
            .collect();
        result.resize(all.len(), None); // parameters: accumulated by the inner backward
        Ok(result)
    });
    let first = first.view(first.layout().clone(), node);
    let mut wrapped = vec![first.clone()];
    for (i, o) in outputs.iter().enumerate().skip(1) {
        if !o.dtype().is_float() {
            wrapped.push(o.clone()); // ids and masks carry no gradient
            continue;
        }
        let stash = stash.clone();
        let node = Node::record("checkpoint_output", &[&first], move |x, _out, g| {
            stash.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(g.clone());
            // A zero gradient for output 0 makes sure its rule (the recomputation) runs.
            Ok(vec![Some(x[0].zeros_like()?)])
        });
        wrapped.push(o.view(o.layout().clone(), node));
    }
    Ok(wrapped)
}
