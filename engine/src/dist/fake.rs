//! [`FakeComm`]: the ranks of a run as threads of one process. Each rank sends a host copy of its
//! tensor to every other rank over a channel and waits for theirs; the results are computed the
//! same way on every rank, so they are identical everywhere.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Communicator;
use crate::{DType, Error, Result, Tensor};

/// One rank's contribution to one collective.
struct Msg {
    from: usize,
    /// The collective's number on the sender (every rank counts its collectives the same way).
    seq: u64,
    op: &'static str,
    data: Vec<f64>,
}

/// One rank of an in-process world ([`FakeComm::world`]). Dropping it tells the other ranks that
/// it left: a collective waiting for it fails at once instead of at the timeout.
pub struct FakeComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `peers[r]` delivers to rank `r` (`None` for this rank).
    peers: Vec<Option<Sender<Msg>>>,
    inbox: Receiver<Msg>,
    /// Messages of later collectives that arrived early, by `(seq, from)`.
    early: RefCell<HashMap<(u64, usize), Msg>>,
    seq: Cell<u64>,
    /// `left[r]`: rank `r` dropped its communicator.
    left: Arc<Vec<AtomicBool>>,
}

impl FakeComm {
    /// The `world` ranks of a run, in rank order (hand one to each thread). Every collective
    /// fails after `timeout` without an answer from some rank.
    pub fn world(world: usize, timeout: Duration) -> Vec<FakeComm> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..world).map(|_| channel()).unzip();
        let left = Arc::new(
            (0..world)
                .map(|_| AtomicBool::new(false))
                .collect::<Vec<_>>(),
        );
        inboxes
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| FakeComm {
                rank,
                world,
                timeout,
                peers: senders
                    .iter()
                    .enumerate()
                    .map(|(r, s)| (r != rank).then(|| s.clone()))
                    .collect(),
                inbox,
                early: RefCell::new(HashMap::new()),
                seq: Cell::new(0),
                left: left.clone(),
            })
            .collect()
    }

    fn fail(&self, op: &'static str, msg: String) -> Error {
        Error::Collective {
            op,
            rank: self.rank,
            world: self.world,
            msg,
        }
    }

    /// Sends `data` to every other rank and returns every rank's data in rank order.
    fn exchange(&self, op: &'static str, data: Vec<f64>) -> Result<Vec<Vec<f64>>> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        for peer in self.peers.iter().flatten() {
            let msg = Msg {
                from: self.rank,
                seq,
                op,
                data: data.clone(),
            };
            // A rank that left gets nothing; the wait below names the ranks that did not answer.
            let _ = peer.send(msg);
        }
        let mut got: Vec<Option<Vec<f64>>> = vec![None; self.world];
        got[self.rank] = Some(data);
        let deadline = Instant::now() + self.timeout;
        loop {
            // What arrived early for this collective.
            for (r, slot) in got.iter_mut().enumerate() {
                if slot.is_none() {
                    if let Some(m) = self.early.borrow_mut().remove(&(seq, r)) {
                        if m.op != op {
                            return Err(self.mismatch(op, seq, &m));
                        }
                        *slot = Some(m.data);
                    }
                }
            }
            let missing: Vec<usize> = (0..self.world).filter(|&r| got[r].is_none()).collect();
            if missing.is_empty() {
                return Ok(got.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.fail(
                    op,
                    format!(
                        "no answer from rank {missing:?} within {:.1} s (collective #{seq}): a \
                         rank died or hangs",
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            match self.inbox.recv_timeout(wait) {
                Ok(m) => {
                    self.early.borrow_mut().insert((m.seq, m.from), m);
                }
                Err(RecvTimeoutError::Timeout) => {
                    // A rank that left sent everything it ever will before leaving.
                    if let Some(&r) = missing
                        .iter()
                        .find(|&&r| self.left[r].load(Ordering::SeqCst))
                    {
                        while let Ok(m) = self.inbox.try_recv() {
                            self.early.borrow_mut().insert((m.seq, m.from), m);
                        }
                        if !self.early.borrow().contains_key(&(seq, r)) {
                            return Err(self.fail(
                                op,
                                format!(
                                    "rank {r} left the run (collective #{seq}): it stopped or \
                                     died"
                                ),
                            ));
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Every other rank left, and all they sent is read: the missing ones died.
                    return Err(self.fail(
                        op,
                        format!(
                            "rank {} left the run (collective #{seq}): it stopped or died",
                            missing[0]
                        ),
                    ));
                }
            }
        }
    }

    fn mismatch(&self, op: &'static str, seq: u64, m: &Msg) -> Error {
        self.fail(
            op,
            format!(
                "rank {} called {} as its collective #{seq}: the ranks diverged",
                m.from, m.op
            ),
        )
    }

    fn check_len(&self, op: &'static str, parts: &[Vec<f64>]) -> Result<usize> {
        let n = parts[self.rank].len();
        if let Some((r, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != n) {
            return Err(self.fail(
                op,
                format!("rank {r} gave {} elements, this rank {n}", p.len()),
            ));
        }
        Ok(n)
    }
}

impl Drop for FakeComm {
    fn drop(&mut self) {
        self.left[self.rank].store(true, Ordering::SeqCst);
    }
}

/// `a + b` rounded as the dtype's own addition rounds it.
fn add_in(dtype: DType, a: f64, b: f64) -> f64 {
    match dtype {
        DType::F64 => a + b,
        DType::BF16 => half::bf16::from_f32(a as f32 + b as f32).to_f64(),
        _ => (a as f32 + b as f32) as f64,
    }
}

impl Communicator for FakeComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self.exchange("all_gather", x.to_vec_f64()?)?;
        let n = self.check_len("all_gather", &parts)?;
        let all: Vec<f64> = parts.concat();
        Tensor::from_f64(&all, [self.world * n], x.dtype(), x.device())
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self.exchange("all_reduce_sum", x.to_vec_f64()?)?;
        self.check_len("all_reduce_sum", &parts)?;
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            for (s, v) in sum.iter_mut().zip(p) {
                *s = add_in(x.dtype(), *s, *v);
            }
        }
        Tensor::from_f64(&sum, [sum.len()], x.dtype(), x.device())
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(self.fail("broadcast", format!("root {root} is not a rank")));
        }
        let mine = if self.rank == root {
            x.to_vec_f64()?
        } else {
            Vec::new()
        };
        let mut parts = self.exchange("broadcast", mine)?;
        let data = std::mem::take(&mut parts[root]);
        if data.len() != x.elem_count() {
            return Err(self.fail(
                "broadcast",
                format!(
                    "rank {root} sent {} elements, this rank expects {}",
                    data.len(),
                    x.elem_count()
                ),
            ));
        }
        Tensor::from_f64(&data, [data.len()], x.dtype(), x.device())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}
