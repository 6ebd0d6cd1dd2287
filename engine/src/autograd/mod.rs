//! The tape. An op that has an input which needs a gradient records a [`Node`] on its output:
//! the op's name, its inputs, and its backward rule. `backward()` walks the recorded nodes in
//! reverse topological order from the root, applying each rule to the incoming gradient and
//! accumulating the results; at variables (trainable leaves) the gradient is added to the
//! variable's `grad` slot, so repeated `backward()` calls sum up (gradient accumulation).
//! Tensors that are not variables and were not computed from one (frozen weights, data) never
//! get a node or a gradient buffer. Backward rules are written with tensor ops, so every
//! backend runs them; only fused ops bring a hand-written backward kernel.
//!
//! Saved tensors: a node holds each input either in full ([`Input::Keep`], the rule reads its
//! values) or as a graph-only reference ([`Input::GraphOnly`]: the same id, node, shape, dtype
//! and device, no buffer), so that an input the rule never reads (the scores before a softmax,
//! both sides of a residual add, anything before a view) is freed as soon as nothing else holds
//! it. A graph-only reference still keeps the buffer of a variable, and of a tensor whose own
//! node reads its output (the walk hands that tensor to its own rule). [`saved_buffers`] lists
//! what a graph keeps.

mod audit;
mod checkpoint;

pub use audit::{saved_buffers, saved_tensor_bytes, SavedBuffer};
pub use checkpoint::{checkpoint, CheckpointFn};

use std::cell::Cell;
use std::collections::HashMap;

use crate::{Error, Result, Tensor, TensorId};

/// `rule(inputs, output, grad_of_output) -> one optional gradient per input`.
pub type BackwardRule =
    dyn Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

pub struct Node {
    name: &'static str,
    /// Full handles for the kept inputs, graph-only references for the others.
    inputs: Vec<Tensor>,
    /// Whether the rule reads the op's output.
    reads_output: bool,
    /// Tensors the rule captured, declared for [`saved_buffers`] (the rule holds them anyway).
    captured: Vec<Tensor>,
    rule: Box<BackwardRule>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({}, {} inputs)", self.name, self.inputs.len())
    }
}

/// How a node holds one input of its op.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// The backward rule reads the input's values: the node keeps its buffer alive.
    Keep(&'a Tensor),
    /// The rule reads only the input's shape, dtype, device and whether it tracks a gradient:
    /// the node holds a graph-only reference, and the buffer is freed when nothing else holds
    /// it. Reading its values in the rule panics (an op that declares this wrongly is a bug).
    GraphOnly(&'a Tensor),
}

impl<'a> Input<'a> {
    /// [`Input::Keep`] when `read` (the rule reads the input only then), else
    /// [`Input::GraphOnly`]: e.g. `x` of `x · w` is read only for `w`'s gradient.
    pub fn keep_if(t: &'a Tensor, read: bool) -> Self {
        if read {
            Input::Keep(t)
        } else {
            Input::GraphOnly(t)
        }
    }
    fn tensor(&self) -> &'a Tensor {
        match *self {
            Input::Keep(t) | Input::GraphOnly(t) => t,
        }
    }
}

/// Whether a backward rule reads the op's output (its second argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The rule reads the output's values (`exp`, `softmax`): graph-only references to the
    /// output keep its buffer.
    Read,
    /// The rule ignores the output.
    Unread,
}

impl Output {
    pub fn read_if(read: bool) -> Self {
        if read {
            Output::Read
        } else {
            Output::Unread
        }
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static KEEP_ALL_INPUTS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every node recorded on this thread keeping all its inputs, as if each op had
/// declared them [`Input::Keep`]: the tape as it was before graph-only references, to compare
/// memory and gradients with it, or to rule out a wrong [`Input::GraphOnly`] while debugging.
pub fn keeping_all_inputs<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            KEEP_ALL_INPUTS.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(KEEP_ALL_INPUTS.with(|k| k.replace(true)));
    f()
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
    /// gradient. `rule` receives `(inputs, output, grad_output)`. The conservative default: the
    /// node keeps every input, and the rule may read the output; see [`Node::record_with`].
    pub fn record(
        name: &'static str,
        inputs: &[&Tensor],
        rule: impl Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> Option<Node> {
        let inputs: Vec<Input<'_>> = inputs.iter().map(|&t| Input::Keep(t)).collect();
        Self::record_with(name, &inputs, Output::Read, rule)
    }

    /// [`Node::record`] with what the rule reads declared: the inputs as [`Input::Keep`] or
    /// [`Input::GraphOnly`], and whether it reads the output. The rule still receives every
    /// input, in order (graph-only ones without data).
    pub fn record_with(
        name: &'static str,
        inputs: &[Input<'_>],
        output: Output,
        rule: impl Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> Option<Node> {
        if !grad_enabled() || !inputs.iter().any(|i| i.tensor().tracks_grad()) {
            return None;
        }
        let keep_all = KEEP_ALL_INPUTS.with(|k| k.get());
        Some(Node {
            name,
            inputs: inputs
                .iter()
                .map(|i| match *i {
                    Input::GraphOnly(t) if !keep_all => t.graph_ref(name),
                    Input::Keep(t) | Input::GraphOnly(t) => t.clone(),
                })
                .collect(),
            reads_output: output == Output::Read,
            captured: Vec::new(),
            rule: Box::new(rule),
        })
    }

    /// Declares tensors the rule captured (LoRA codes, tables), so that [`saved_buffers`]
    /// counts them; it changes no lifetime (the rule holds them already).
    pub fn capturing(mut self, tensors: &[&Tensor]) -> Node {
        self.captured.extend(tensors.iter().map(|&t| t.clone()));
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }
    /// Whether the rule reads the op's output.
    pub fn reads_output(&self) -> bool {
        self.reads_output
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
    let mut order = topological_order(roots.iter().map(|(r, _)| r));
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    for (root, grad) in roots {
        let acc = match grads.remove(&root.id()) {
            Some(prev) => prev.add(grad)?,
            None => grad.detach(),
        };
        grads.insert(root.id(), acc);
    }
    // Popped as the walk goes: the order itself holds nothing past its step (the graph lives on
    // while the caller holds the roots).
    while let Some(t) = order.pop() {
        let Some(g) = grads.remove(&t.id()) else {
            continue;
        };
        if t.is_variable() {
            t.accumulate_grad(&g)?;
        }
        let Some(node) = t.node() else { continue };
        let input_grads = (node.rule)(node.inputs(), &t, &g)?;
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
