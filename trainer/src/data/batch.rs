//! Batches of tokenised examples: the encoded dataset, the seeded epoch order with its resumable
//! cursor, and the collation of micro-batches (rows of one example, or packed rows:
//! [`super::packing`]).

use engine::{Device, Tensor, IGNORE_INDEX};
use serde::{Deserialize, Serialize};

use super::packing::{collate_packed, pack_rows, pack_rows_balanced};
use super::{encode_example, Encoded, PromptTokenizer, Task};
use crate::error::{Error, Result};
use crate::progress::Reporter;

/// Tokenised examples of several tasks.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub task_names: Vec<String>,
    pub items: Vec<Encoded>,
    /// Examples whose answer was cut off entirely by `cutoff_len` (kept, they carry no loss).
    pub truncated_away: usize,
}

impl Dataset {
    pub fn encode(tasks: &[Task], tok: &dyn PromptTokenizer, cutoff_len: usize) -> Result<Dataset> {
        Self::encode_with_progress(tasks, tok, cutoff_len, &Reporter::hidden())
    }

    /// [`encode`](Dataset::encode), counting the examples tokenised on `progress`.
    pub fn encode_with_progress(
        tasks: &[Task],
        tok: &dyn PromptTokenizer,
        cutoff_len: usize,
        progress: &Reporter,
    ) -> Result<Dataset> {
        let mut items = Vec::new();
        for (ti, t) in tasks.iter().enumerate() {
            progress.set_message(&t.name);
            for ex in &t.examples {
                items.push(encode_example(tok, ex, cutoff_len, ti)?);
                progress.inc(1);
            }
        }
        progress.finish();
        if items.is_empty() {
            return Err(Error::Config("the training data has no examples".into()));
        }
        let truncated_away = items.iter().filter(|e| e.target_tokens() == 0).count();
        Ok(Dataset {
            task_names: tasks.iter().map(|t| t.name.clone()).collect(),
            items,
            truncated_away,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A hash of the tokenised examples (task names, ids, labels; FNV-1a, 16 hex digits), stable
    /// across builds and platforms: a checkpoint records it so that `--resume` can tell edited
    /// data files (or another tokenizer or `cutoff_len`) from the run's own.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for name in &self.task_names {
            eat(&(name.len() as u64).to_le_bytes());
            eat(name.as_bytes());
        }
        for e in &self.items {
            eat(&(e.task as u64).to_le_bytes());
            eat(&(e.ids.len() as u64).to_le_bytes());
            e.ids.iter().for_each(|x| eat(&x.to_le_bytes()));
            e.labels.iter().for_each(|x| eat(&x.to_le_bytes()));
        }
        format!("{h:016x}")
    }

    /// The micro-batch of the items at `indices`, one per row.
    pub fn collate(&self, indices: &[usize], pad_id: u32) -> HostBatch {
        let items: Vec<&Encoded> = indices.iter().map(|&i| &self.items[i]).collect();
        collate(&items, pad_id)
    }

    /// The micro-batch of `rows`, each the items packed into one row ([`collate_packed`]).
    pub fn collate_rows(&self, rows: &[Vec<usize>], pad_id: u32) -> HostBatch {
        let rows: Vec<Vec<&Encoded>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| &self.items[i]).collect())
            .collect();
        collate_packed(&rows, pad_id)
    }

    /// The items of `rows` (a micro-batch, in order) packed into as few, as even rows of at most
    /// `row_len` tokens as [`pack_rows_balanced`] finds: the same items, fewer rows, little
    /// padding.
    pub fn packed_rows(&self, rows: &[Vec<usize>], row_len: usize) -> Rows {
        let items: Vec<usize> = rows.iter().flatten().copied().collect();
        let lengths: Vec<usize> = items.iter().map(|&i| self.items[i].ids.len()).collect();
        let order: Vec<usize> = (0..items.len()).collect();
        pack_rows_balanced(&order, &lengths, row_len)
            .into_iter()
            .map(|row| row.into_iter().map(|k| items[k]).collect())
            .collect()
    }

    /// Each item's length in tokens (what packing fills rows with).
    pub fn lengths(&self) -> Vec<usize> {
        self.items.iter().map(|e| e.ids.len()).collect()
    }
}

/// The rows of one micro-batch: the items of each row (one per row without packing).
pub type Rows = Vec<Vec<usize>>;

/// Packing's inputs: each item's length, and the longest row (`cutoff_len`).
#[derive(Clone, Debug)]
struct Packing {
    lengths: Vec<usize>,
    row_len: usize,
}

/// Where the stream stands: `position` items of epoch `epoch`'s order have been handed out.
/// Each epoch's order is a pure function of `(seed, epoch)`, so this pair restores it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    pub position: usize,
}

/// Hands out optimizer steps of micro-batches from a seeded shuffle of all items, reshuffled
/// every epoch. A micro-batch is `micro_batch` rows: one item each, or with packing
/// ([`Loader::packed`]) the items that [`pack_rows`] puts in one row, in the epoch's order. A
/// step holds `grad_accum` micro-batches, except the last step of an epoch, which holds what is
/// left (steps never straddle epochs).
#[derive(Clone, Debug)]
pub struct Loader {
    n: usize,
    micro_batch: usize,
    grad_accum: usize,
    seed: u64,
    cursor: Cursor,
    packing: Option<Packing>,
    /// The rows of the cursor's epoch, in order.
    rows: Vec<Vec<usize>>,
    /// The next row to hand out.
    next_row: usize,
}

impl Loader {
    /// One item per row.
    pub fn new(n_items: usize, micro_batch: usize, grad_accum: usize, seed: u64) -> Result<Loader> {
        Self::build(n_items, None, micro_batch, grad_accum, seed)
    }

    /// Packed rows: the items of `lengths` (tokens each) packed greedily into rows of at most
    /// `row_len` tokens, in each epoch's order ([`pack_rows`]); `micro_batch` and `grad_accum`
    /// count rows.
    pub fn packed(
        lengths: Vec<usize>,
        row_len: usize,
        micro_batch: usize,
        grad_accum: usize,
        seed: u64,
    ) -> Result<Loader> {
        if row_len == 0 {
            return Err(Error::Config(
                "cannot pack items into rows of 0 tokens".into(),
            ));
        }
        let packing = Packing { lengths, row_len };
        Self::build(
            packing.lengths.len(),
            Some(packing),
            micro_batch,
            grad_accum,
            seed,
        )
    }

    fn build(
        n_items: usize,
        packing: Option<Packing>,
        micro_batch: usize,
        grad_accum: usize,
        seed: u64,
    ) -> Result<Loader> {
        if n_items == 0 || micro_batch == 0 || grad_accum == 0 {
            return Err(Error::Config(format!(
                "cannot batch {n_items} items by {micro_batch} × {grad_accum}"
            )));
        }
        let mut l = Loader {
            n: n_items,
            micro_batch,
            grad_accum,
            seed,
            cursor: Cursor::default(),
            packing,
            rows: Vec::new(),
            next_row: 0,
        };
        l.rows = l.epoch_rows(0);
        Ok(l)
    }

    /// The rows of `epoch`: its order, one item per row or packed.
    fn epoch_rows(&self, epoch: usize) -> Vec<Vec<usize>> {
        let order = Self::epoch_order(self.seed, epoch, self.n);
        match &self.packing {
            None => order.into_iter().map(|i| vec![i]).collect(),
            Some(p) => pack_rows(&order, &p.lengths, p.row_len),
        }
    }

    /// Whether rows are packed.
    pub fn is_packed(&self) -> bool {
        self.packing.is_some()
    }

    /// The order of the items in `epoch`.
    pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        engine::rng::Rng::new(engine::rng::hash(seed, epoch as u64)).shuffle(&mut order);
        order
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues from a saved cursor (of a loader over the same items, seed and packing).
    pub fn restore(&mut self, c: Cursor) -> Result<()> {
        if c.position > self.n {
            return Err(Error::Config(format!(
                "data cursor at item {} of an epoch of {} items: the data changed since the checkpoint",
                c.position, self.n
            )));
        }
        let rows = self.epoch_rows(c.epoch);
        // The row that starts at the cursor's item (past the last one at the epoch's end).
        let mut at = 0;
        let mut next_row = None;
        for (r, row) in rows.iter().enumerate() {
            if at >= c.position {
                break;
            }
            at += row.len();
            next_row = Some(r + 1);
        }
        let next_row = next_row
            .or(Some(0))
            .filter(|_| at == c.position)
            .ok_or_else(|| {
                Error::Config(format!(
                    "data cursor at item {} of epoch {} is inside a packed row: the data or the \
                     packing changed since the checkpoint",
                    c.position, c.epoch
                ))
            })?;
        self.rows = rows;
        self.next_row = next_row;
        self.cursor = c;
        Ok(())
    }

    /// Optimizer steps in `epoch` (the same in every epoch without packing).
    pub fn steps_in_epoch(&self, epoch: usize) -> usize {
        let rows = match self.packing {
            None => self.n,
            Some(_) => self.epoch_rows(epoch).len(),
        };
        rows.div_ceil(self.micro_batch * self.grad_accum)
    }

    /// Optimizer steps in the first epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_in_epoch(0)
    }

    /// Epochs completed, as a fraction.
    pub fn epoch_progress(&self) -> f64 {
        self.cursor.epoch as f64 + self.cursor.position as f64 / self.n as f64
    }

    /// The micro-batches of the next optimizer step, each its rows of items.
    pub fn next_step(&mut self) -> Vec<Rows> {
        if self.next_row >= self.rows.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.rows = self.epoch_rows(self.cursor.epoch);
            self.next_row = 0;
        }
        let start = self.next_row;
        let end = (start + self.micro_batch * self.grad_accum).min(self.rows.len());
        self.next_row = end;
        let rows = &self.rows[start..end];
        self.cursor.position += rows.iter().map(Vec::len).sum::<usize>();
        rows.chunks(self.micro_batch).map(<[_]>::to_vec).collect()
    }
}

/// A right-padded micro-batch on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    /// `B` sequences of `T` positions.
    pub batch: usize,
    pub len: usize,
    /// `[B, T]` token ids, `pad_id` after each sequence.
    pub ids: Vec<u32>,
    /// `[B, T]` 0 on padding, else the token's segment: 1 for the first (or only) example of
    /// its row, 2 for the next one packed after it, ...
    pub key_mask: Vec<u32>,
    /// `[B·T]` next-token targets: position `t` holds the label of token `t + 1`, `IGNORE_INDEX`
    /// where that is not a target (prompt, padding, the last position).
    pub labels: Vec<u32>,
    /// Positions with a target.
    pub target_tokens: usize,
    /// Real (non-padding) tokens.
    pub real_tokens: usize,
}

/// Right-pads `items` (one per row) to the longest one and shifts the labels for next-token
/// prediction.
pub fn collate(items: &[&Encoded], pad_id: u32) -> HostBatch {
    let rows: Vec<Vec<&Encoded>> = items.iter().map(|&e| vec![e]).collect();
    collate_packed(&rows, pad_id)
}

impl HostBatch {
    /// This batch grown to `rows` rows of `len` positions (at least its own): every added
    /// position is padding (`pad_id`, key mask 0, no target), so the real tokens, their
    /// positions and targets are unchanged. A row of padding only sees no key: attention gives
    /// it zero output and zero gradients, and it adds nothing to any loss.
    pub fn padded_to(&self, rows: usize, len: usize, pad_id: u32) -> HostBatch {
        let (rows, len) = (rows.max(self.batch), len.max(self.len));
        let mut out = HostBatch {
            batch: rows,
            len,
            ids: vec![pad_id; rows * len],
            key_mask: vec![0; rows * len],
            labels: vec![IGNORE_INDEX; rows * len],
            target_tokens: self.target_tokens,
            real_tokens: self.real_tokens,
        };
        for r in 0..self.batch {
            let (src, dst) = (
                r * self.len..(r + 1) * self.len,
                r * len..r * len + self.len,
            );
            out.ids[dst.clone()].copy_from_slice(&self.ids[src.clone()]);
            out.key_mask[dst.clone()].copy_from_slice(&self.key_mask[src.clone()]);
            out.labels[dst].copy_from_slice(&self.labels[src]);
        }
        out
    }

    /// `(ids [B, T], key_mask [B, T], labels [B·T])`, all u32, on `device`.
    pub fn to_tensors(&self, device: Device) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (self.batch, self.len);
        Ok((
            Tensor::from_slice(&self.ids, [b, t], device)?,
            Tensor::from_slice(&self.key_mask, [b, t], device)?,
            Tensor::from_slice(&self.labels, b * t, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: u32 = IGNORE_INDEX;

    #[test]
    fn padding_a_batch_adds_only_padding() {
        let a = Encoded::from_pair(&[1, 2], &[3, 4], 512, 0); // ids 1 2 3 4, labels I I 3 4
        let b = Encoded::from_pair(&[5], &[6], 512, 0); // ids 5 6, labels I 6
        let hb = collate(&[&a, &b], 9);
        let p = hb.padded_to(3, 6, 9);
        assert_eq!((p.batch, p.len), (3, 6));
        assert_eq!(
            p.ids,
            [1, 2, 3, 4, 9, 9, 5, 6, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]
        );
        assert_eq!(
            p.key_mask,
            [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut want = vec![I; 18];
        want[1..3].copy_from_slice(&[3, 4]);
        want[6] = 6;
        assert_eq!(p.labels, want);
        assert_eq!((p.target_tokens, p.real_tokens), (3, 6));
        // Never smaller than the batch itself.
        let same = hb.padded_to(1, 2, 9);
        assert_eq!((same.batch, same.len, &same.ids), (2, 4, &hb.ids));
    }

    #[test]
    fn collation_pads_right_and_shifts_labels() {
        let a = Encoded::from_pair(&[1, 2], &[3, 4], 512, 0); // ids 1 2 3 4, labels I I 3 4
        let b = Encoded::from_pair(&[5], &[6], 512, 0); // ids 5 6, labels I 6
        let hb = collate(&[&a, &b], 0);
        assert_eq!((hb.batch, hb.len), (2, 4));
        assert_eq!(hb.ids, vec![1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(hb.key_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        // The label at t is the target token t+1.
        assert_eq!(hb.labels, vec![I, 3, 4, I, 6, I, I, I]);
        assert_eq!((hb.target_tokens, hb.real_tokens), (3, 6));
        let (ids, mask, labels) = hb.to_tensors(Device::Cpu).unwrap();
        assert_eq!(
            (ids.dims(), mask.dims(), labels.dims()),
            (&[2, 4][..], &[2, 4][..], &[8][..])
        );
        assert_eq!(labels.to_vec_u32().unwrap(), hb.labels);
    }

    #[test]
    fn a_micro_batch_packs_its_own_items_into_fewer_even_rows() {
        // Items of 4, 3, 5 and 2 tokens.
        let ds = Dataset {
            task_names: vec!["boolq".into()],
            items: vec![
                Encoded::from_pair(&[1, 2], &[3, 4], 512, 0),
                Encoded::from_pair(&[5], &[6, 7], 512, 0),
                Encoded::from_pair(&[8, 9, 10], &[11, 12], 512, 0),
                Encoded::from_pair(&[13], &[14], 512, 0),
            ],
            truncated_away: 0,
        };
        // The micro-batch's rows, one item each, in the loader's order 2, 0, 3, 1.
        let rows = vec![vec![2], vec![0], vec![3], vec![1]];
        // Rows of at most 8 tokens: 14 tokens in two rows, 5 + 2 and 4 + 3.
        assert_eq!(ds.packed_rows(&rows, 8), vec![vec![2, 3], vec![0, 1]]);
        assert_eq!(ds.packed_rows(&rows, 14), vec![vec![2, 0, 3, 1]]);
        // An item longer than a row still gets one of its own.
        assert_eq!(
            ds.packed_rows(&rows, 4),
            vec![vec![2], vec![0], vec![3], vec![1]]
        );
        let hb = ds.collate_rows(&ds.packed_rows(&rows, 8), 0);
        assert_eq!((hb.batch, hb.len), (2, 7));
        assert_eq!(hb.real_tokens, 14);
        assert_eq!(hb.target_tokens, ds.collate_rows(&rows, 0).target_tokens);
    }

    #[test]
    fn fingerprint_is_fixed_and_sees_every_token() {
        let ds = |last: u32| Dataset {
            task_names: vec!["boolq".into()],
            items: vec![
                Encoded::from_pair(&[1, 2], &[3, 4], 512, 0),
                Encoded::from_pair(&[5], &[6, last], 512, 0),
            ],
            truncated_away: 0,
        };
        // The same value in every build (checkpoints written by one are resumed by another):
        // FNV-1a 64 of the little-endian name lengths, names, task indices, lengths, ids and labels.
        assert_eq!(ds(7).fingerprint(), "7bf8fdc86837e186");
        assert_ne!(ds(7).fingerprint(), ds(8).fingerprint());
        let renamed = Dataset {
            task_names: vec!["piqa".into()],
            ..ds(7)
        };
        assert_ne!(renamed.fingerprint(), ds(7).fingerprint());
    }

    #[test]
    fn loader_covers_each_epoch_once_in_a_new_order() {
        let mut l = Loader::new(10, 2, 2, 7).unwrap();
        assert_eq!(l.steps_per_epoch(), 3);
        let mut epochs = vec![];
        for _ in 0..2 {
            let steps: Vec<_> = (0..3).map(|_| l.next_step()).collect();
            assert_eq!(
                steps.iter().map(Vec::len).collect::<Vec<_>>(),
                vec![2, 2, 1]
            );
            let mut all: Vec<usize> = steps.concat().concat().concat();
            let order = all.clone();
            all.sort();
            assert_eq!(all, (0..10).collect::<Vec<_>>());
            epochs.push(order);
        }
        assert_ne!(epochs[0], epochs[1], "each epoch reshuffles");
        assert_eq!(l.epoch_progress(), 2.0);
        // The same seed gives the same stream; another seed another one.
        let mut same = Loader::new(10, 2, 2, 7).unwrap();
        assert_eq!(
            (0..3)
                .flat_map(|_| same.next_step().concat().concat())
                .collect::<Vec<_>>(),
            epochs[0]
        );
        let mut other = Loader::new(10, 2, 2, 8).unwrap();
        assert_ne!(
            (0..3)
                .flat_map(|_| other.next_step().concat().concat())
                .collect::<Vec<_>>(),
            epochs[0]
        );
    }

    #[test]
    fn cursor_restore_reproduces_the_batch_order() {
        let mut a = Loader::new(23, 3, 2, 42).unwrap();
        for _ in 0..9 {
            a.next_step(); // into epoch 2
        }
        let saved = serde_json::to_string(&a.cursor()).unwrap();
        let rest: Vec<_> = (0..10).map(|_| a.next_step()).collect();
        let mut b = Loader::new(23, 3, 2, 42).unwrap();
        b.restore(serde_json::from_str(&saved).unwrap()).unwrap();
        let again: Vec<_> = (0..10).map(|_| b.next_step()).collect();
        assert_eq!(rest, again);
        assert!(b
            .restore(Cursor {
                epoch: 0,
                position: 24
            })
            .is_err());
    }
}
