//! The tape. An op that has an input which needs a gradient records a [`Node`] on its output:
//! the op's name, its inputs, and its backward rule. `backward()` walks the recorded nodes in
//! reverse topological order from the root, applying each rule to the incoming gradient and
//! accumulating the results; at variables (trainable leaves) the gradient is added to the
//! variable's `grad` slot, so repeated `backward()` calls sum up (gradient accumulation).
//! Tensors that are not variables and were not computed from one (frozen weights, data) never
//! get a node or a gradient buffer. Backward rules are written with tensor ops, so every
//! backend runs them; only fused ops bring a hand-written backward kernel.

mod checkpoint;

pub use checkpoint::{checkpoint, CheckpointFn};

use std::cell::Cell;
use std::collections::HashMap;

use crate::{Error, Result, Tensor, TensorId};

/// `rule(inputs, output, grad_of_output) -> one optional gradient per input`.
pub type BackwardRule =
    dyn Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

pub struct Node {
    name: &'static str,
    inputs: Vec<Tensor>,
    rule: Box<BackwardRule>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({}, {} inputs)", self.name, self.inputs.len())
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record themselves.
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Disables recording on this thread until dropped (restores the previous mode).
pub struct NoGradGuard {
    prev: bool,
}

impl NoGradGuard {
    pub fn new() -> Self {
        NoGradGuard {
            prev: GRAD_ENABLED.with(|g| g.replace(false)),
        }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Runs `f` without recording any op (inference).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _g = NoGradGuard::new();
    f()
}

impl Node {
    /// A node for an op with `inputs`, or `None` when recording is off or no input needs a
    /// gradient. `rule` receives `(inputs, output, grad_output)`.
    pub fn record(
        name: &'static str,
        inputs: &[&Tensor],
        rule: impl Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> Option<Node> {
        if !grad_enabled() || !inputs.iter().any(|t| t.tracks_grad()) {
            return None;
        }
        Some(Node {
            name,
            inputs: inputs.iter().map(|&t| t.clone()).collect(),
            rule: Box::new(rule),
        })
    }
    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }
}

/// Tensors reachable from `root` through recorded nodes, each after everything it depends on.
fn topological_order<'a>(roots: impl IntoIterator<Item = &'a Tensor>) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Iterative post-order DFS: (tensor, children_pushed).
    let mut stack: Vec<(Tensor, bool)> = roots.into_iter().map(|r| (r.clone(), false)).collect();
    stack.reverse();
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(node) = t.node() {
            for inp in node.inputs() {
                if inp.tracks_grad() && !seen.contains(&inp.id()) {
                    stack.push((inp.clone(), false));
                }
            }
        }
    }
    order
}

impl Tensor {
    /// Back-propagates from this tensor with a gradient of ones (the usual call on a scalar loss).
    pub fn backward(&self) -> Result<()> {
        let seed = crate::autograd::no_grad(|| self.ones_like())?;
        self.backward_with_grad(&seed)
    }

    /// Back-propagates `grad` (same shape as `self`), adding into every reachable variable's grad.
    pub fn backward_with_grad(&self, grad: &Tensor) -> Result<()> {
        if !self.tracks_grad() {
            return Err(Error::Backward {
                msg: "the tensor does not depend on any variable (was it computed under no_grad?)"
                    .into(),
            });
        }
        backward_many(&[(self.clone(), grad.clone())])
    }
}

/// Back-propagates several roots at once, each with its gradient (same shape as the root), in one
/// walk of the tape: a tensor reached from several roots gets the sum of their contributions
/// before its own rule runs. Roots that track no gradient are ignored.
pub fn backward_many(roots: &[(Tensor, Tensor)]) -> Result<()> {
    for (root, grad) in roots {
        if grad.shape() != root.shape() {
            return Err(Error::Backward {
                msg: format!(
                    "seed gradient of shape {} for a tensor of shape {}",
                    grad.shape(),
                    root.shape()
                ),
            });
        }
    }
    let roots: Vec<&(Tensor, Tensor)> = roots.iter().filter(|(r, _)| r.tracks_grad()).collect();
    let _guard = NoGradGuard::new();
    let order = topological_order(roots.iter().map(|(r, _)| r));
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    for (root, grad) in roots {
        let acc = match grads.remove(&root.id()) {
            Some(prev) => prev.add(grad)?,
            None => grad.detach(),
        };
        grads.insert(root.id(), acc);
    }
    for t in order.iter().rev() {
        let Some(g) = grads.remove(&t.id()) else {
            continue;
        };
        if t.is_variable() {
            t.accumulate_grad(&g)?;
        }
        let Some(node) = t.node() else { continue };
        let input_grads = (node.rule)(node.inputs(), t, &g)?;
        if input_grads.len() != node.inputs().len() {
            return Err(Error::Backward {
                msg: format!(
                    "{}: rule returned {} gradients for {} inputs",
                    node.name(),
                    input_grads.len(),
                    node.inputs().len()
                ),
            });
        }
        for (inp, ig) in node.inputs().iter().zip(input_grads) {
            let Some(ig) = ig else { continue };
            if !inp.tracks_grad() {
                continue;
            }
            if ig.shape() != inp.shape() {
                return Err(Error::Backward {
                    msg: format!(
                        "{}: gradient of shape {} for an input of shape {}",
                        node.name(),
                        ig.shape(),
                        inp.shape()
                    ),
                });
            }
            let acc = match grads.remove(&inp.id()) {
                Some(prev) => prev.add(&ig)?,
                None => ig,
            };
            grads.insert(inp.id(), acc);
        }
    }
    Ok(())
}
