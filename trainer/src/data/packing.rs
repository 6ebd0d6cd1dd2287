//! Packing (`--packing`): several examples share one row of up to `cutoff_len` tokens.
//!
//! Rows are filled greedily in the loader's order: each example goes into the current row if it
//! still fits, else the row is closed and the example starts the next one (an example never
//! splits, and the order is kept). The epoch's order comes from the seed, so the rows do too.
//!
//! In a row, each example is a segment: the key mask holds its segment number (1, 2, ..; 0 on
//! the padding after the last one). The model turns that into positions that restart at 0 in
//! each segment and a block-diagonal causal attention mask (no example sees another); labels
//! are shifted within each example, so the loss is on each example's own response tokens, and
//! an example's last token predicts nothing. An example thus gets the same loss and gradient as
//! alone in a row of its own.

use engine::IGNORE_INDEX;

use super::{Encoded, HostBatch};

/// The rows of the items of `order` (indices into `lengths`, tokens per item), packed greedily
/// in that order into rows of at most `row_len` tokens: an item that does not fit in the current
/// row closes it and starts the next. An item longer than `row_len` gets a row of its own.
pub fn pack_rows(order: &[usize], lengths: &[usize], row_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for &i in order {
        let len = lengths[i];
        match rows.last_mut() {
            Some(row) if used + len <= row_len => {
                row.push(i);
                used += len;
            }
            _ => {
                rows.push(vec![i]);
                used = len;
            }
        }
    }
    rows
}

/// The items of `order` (indices into `lengths`) in as few rows of at most `row_len` tokens as
/// longest-first placement finds, balanced so that the longest row is as short as it can make
/// it: for `n` = ⌈tokens / row_len⌉ rows and up, each item, longest first (ties in `order`'s
/// order), goes into the row holding the fewest tokens; the first `n` whose rows all fit is
/// taken. An item longer than `row_len` gets a row of its own. Rows keep `order`'s order of
/// their items and come in the order of their first item.
///
/// A micro-batch packed this way (`--pack-micro-batches`) is padded to its longest row: greedy
/// packing in order fills the first rows and leaves the last short, balancing pads less (8
/// examples of 688 tokens at a cutoff of 512: rows of 344 and 344, not 512 and 176).
pub fn pack_rows_balanced(order: &[usize], lengths: &[usize], row_len: usize) -> Vec<Vec<usize>> {
    let (long, fits): (Vec<usize>, Vec<usize>) =
        (0..order.len()).partition(|&k| lengths[order[k]] > row_len);
    let mut rows: Vec<Vec<usize>> = long.iter().map(|&k| vec![k]).collect();
    if !fits.is_empty() {
        let mut by_length = fits.clone();
        // Longest first; a stable sort keeps `order`'s order among equal lengths.
        by_length.sort_by_key(|&k| std::cmp::Reverse(lengths[order[k]]));
        let total: usize = fits.iter().map(|&k| lengths[order[k]]).sum();
        let first = total.div_ceil(row_len.max(1)).max(1);
        for n in first..=fits.len() {
            let mut bins: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); n];
            for &k in &by_length {
                // The row with the fewest tokens (the first of them on a tie).
                let b = (0..n).min_by_key(|&b| bins[b].0).expect("n >= 1");
                bins[b].0 += lengths[order[k]];
                bins[b].1.push(k);
            }
            if bins.iter().all(|(used, _)| *used <= row_len) || n == fits.len() {
                rows.extend(
                    bins.into_iter()
                        .map(|(_, row)| row)
                        .filter(|r| !r.is_empty()),
                );
                break;
            }
        }
    }
    for row in &mut rows {
        row.sort_unstable();
    }
    rows.sort_unstable_by_key(|row| row[0]);
    rows.into_iter()
        .map(|row| row.into_iter().map(|k| order[k]).collect())
        .collect()
}

/// Right-pads `rows` (each the examples packed into one row, in order) to the longest one; each
/// example is a segment of the key mask (1, 2, .. in its row) and its labels are shifted for
/// next-token prediction within the example. Rows of one example each are the unpacked batch.
pub fn collate_packed(rows: &[Vec<&Encoded>], pad_id: u32) -> HostBatch {
    let row_len = |r: &Vec<&Encoded>| r.iter().map(|e| e.ids.len()).sum::<usize>();
    let b = rows.len();
    let t = rows.iter().map(row_len).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut key_mask = vec![0u32; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * t;
        for (seg, e) in (1u32..).zip(row) {
            let n = e.ids.len();
            ids[at..at + n].copy_from_slice(&e.ids);
            key_mask[at..at + n].fill(seg);
            if e.labels.len() > 1 {
                labels[at..at + e.labels.len() - 1].copy_from_slice(&e.labels[1..]);
            }
            at += n;
        }
    }
    HostBatch {
        batch: b,
        len: t,
        target_tokens: labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
        real_tokens: rows.iter().map(row_len).sum(),
        ids,
        key_mask,
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Loader;

    const I: u32 = IGNORE_INDEX;

    #[test]
    fn rows_fill_greedily_in_order() {
        let lengths = [4, 3, 2, 5, 1, 6, 6];
        let rows = pack_rows(&[0, 1, 2, 3, 4, 5, 6], &lengths, 8);
        // 4+3 = 7, then 2 does not fit: a new row; 2+5+1 = 8; 6; 6.
        assert_eq!(rows, vec![vec![0, 1], vec![2, 3, 4], vec![5], vec![6]]);
        // Another order, other rows; an item longer than a row gets one alone.
        let rows = pack_rows(&[5, 4, 0, 2, 1], &[4, 3, 2, 5, 1, 9], 8);
        assert_eq!(rows, vec![vec![5], vec![4, 0, 2], vec![1]]);
    }

    #[test]
    fn balanced_rows_are_few_and_even() {
        // 14 tokens in rows of 8: greedy in order gives 5 | 4+2 | 3 (3 rows, the longest 6);
        // balanced, 5+2 | 4+3 (2 rows of 7), each row's items in `order`'s order.
        let lengths = [4, 3, 5, 2];
        let order = [2, 0, 3, 1];
        assert_eq!(
            pack_rows(&order, &lengths, 8),
            vec![vec![2], vec![0, 3], vec![1]]
        );
        assert_eq!(
            pack_rows_balanced(&order, &lengths, 8),
            vec![vec![2, 3], vec![0, 1]]
        );
        assert_eq!(
            pack_rows_balanced(&order, &lengths, 14),
            vec![vec![2, 0, 3, 1]]
        );
        // An item longer than a row gets one of its own; the others still balance.
        assert_eq!(
            pack_rows_balanced(&order, &lengths, 4),
            vec![vec![2], vec![0], vec![3], vec![1]]
        );
        // Eight items of 86 tokens at a cutoff of 512: two rows of four, not 5 + 3.
        let even = [86; 8];
        let order: Vec<usize> = (0..8).collect();
        assert_eq!(pack_rows(&order, &even, 512).len(), 2);
        assert_eq!(pack_rows(&order, &even, 512)[0].len(), 5);
        let rows = pack_rows_balanced(&order, &even, 512);
        assert_eq!(rows, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        // Where longest-first placement does not fit ⌈tokens / row_len⌉ rows it takes one more,
        // and every item appears exactly once.
        // (5, 5, 4, 3, 3 in rows of 10: 5+3 | 5+3+3 = 11 does not fit; three rows.)
        let lengths = [5, 5, 4, 3, 3];
        let rows = pack_rows_balanced(&[0, 1, 2, 3, 4], &lengths, 10);
        assert_eq!(rows, vec![vec![0, 4], vec![1], vec![2, 3]]);
        let mut seen: Vec<usize> = rows.concat();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert!(pack_rows_balanced(&[], &lengths, 10).is_empty());
    }

    #[test]
    fn packed_collation_keeps_each_example_apart() {
        let a = Encoded::from_pair(&[1, 2], &[3, 4], 512, 0); // ids 1 2 3 4, labels I I 3 4
        let b = Encoded::from_pair(&[5], &[6], 512, 0); // ids 5 6, labels I 6
        let c = Encoded::from_pair(&[7], &[8, 9], 512, 0); // ids 7 8 9, labels I 8 9
        let hb = collate_packed(&[vec![&a, &b], vec![&c]], 0);
        assert_eq!((hb.batch, hb.len), (2, 6));
        assert_eq!(hb.ids, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]);
        assert_eq!(hb.key_mask, [1, 1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0]);
        // Within each example the label at t is its token t+1; an example's last token predicts
        // nothing (not the next example's first token).
        assert_eq!(hb.labels, [I, 3, 4, I, 6, I, 8, 9, I, I, I, I]);
        assert_eq!((hb.target_tokens, hb.real_tokens), (5, 9));
        // One example per row is the unpacked collation.
        let one = collate_packed(&[vec![&a], vec![&b]], 0);
        assert_eq!(one, crate::data::collate(&[&a, &b], 0));
        assert_eq!(one.key_mask, [1, 1, 1, 1, 1, 1, 0, 0]);
    }

    /// Lengths 1 to 12 tokens of 37 items, rows of 16.
    fn lengths() -> Vec<usize> {
        (0..37).map(|i| 1 + (i * 7) % 12).collect()
    }

    #[test]
    fn packed_loader_covers_each_epoch_once_in_rows_within_the_cutoff() {
        let lens = lengths();
        let (micro, accum) = (2, 3);
        let mut l = Loader::packed(lens.clone(), 16, micro, accum, 7).unwrap();
        assert!(l.is_packed());
        let mut epochs = vec![];
        for epoch in 0..3 {
            let steps: Vec<_> = (0..l.steps_in_epoch(epoch))
                .map(|_| l.next_step())
                .collect();
            let rows: Vec<Vec<usize>> = steps.concat().concat();
            for (k, step) in steps.iter().enumerate() {
                // Full steps of `accum` micro-batches of `micro` rows, but the epoch's last.
                if k + 1 < steps.len() {
                    assert_eq!(step.len(), accum);
                    assert!(step.iter().all(|m| m.len() == micro));
                }
            }
            assert!(rows
                .iter()
                .all(|r| r.iter().map(|&i| lens[i]).sum::<usize>() <= 16));
            // Greedy: the next row's first item did not fit in the row before.
            for w in rows.windows(2) {
                let used: usize = w[0].iter().map(|&i| lens[i]).sum();
                assert!(used + lens[w[1][0]] > 16, "{w:?}");
            }
            let order: Vec<usize> = rows.concat();
            assert_eq!(order, Loader::epoch_order(7, epoch, lens.len()));
            let mut all = order.clone();
            all.sort();
            assert_eq!(all, (0..lens.len()).collect::<Vec<_>>(), "each item once");
            assert!(
                rows.len() < lens.len(),
                "packing puts several items in a row"
            );
            assert_eq!(l.epoch_progress(), (epoch + 1) as f64);
            epochs.push(rows);
        }
        assert_ne!(epochs[0], epochs[1], "each epoch packs its own order");
        // The same seed gives the same rows.
        let mut same = Loader::packed(lens.clone(), 16, micro, accum, 7).unwrap();
        let again: Vec<Vec<usize>> = (0..same.steps_in_epoch(0))
            .flat_map(|_| same.next_step().concat())
            .collect();
        assert_eq!(again, epochs[0]);
    }

    #[test]
    fn packed_cursor_restore_reproduces_the_rows() {
        let lens = lengths();
        let mut a = Loader::packed(lens.clone(), 16, 2, 1, 42).unwrap();
        for _ in 0..13 {
            a.next_step(); // into epoch 1
        }
        let saved = a.cursor();
        assert_eq!(saved.epoch, 1);
        let rest: Vec<_> = (0..10).map(|_| a.next_step()).collect();
        let mut b = Loader::packed(lens.clone(), 16, 2, 1, 42).unwrap();
        b.restore(saved).unwrap();
        let again: Vec<_> = (0..10).map(|_| b.next_step()).collect();
        assert_eq!(rest, again);
        // A cursor inside a packed row (another packing wrote it) is refused.
        let first_row = &Loader::packed(lens.clone(), 16, 1, 1, 42)
            .unwrap()
            .next_step()[0][0];
        assert!(first_row.len() > 1);
        let inside = crate::data::Cursor {
            epoch: 0,
            position: 1,
        };
        let e = b.restore(inside).unwrap_err().to_string();
        assert!(e.contains("inside a packed row"), "{e}");
    }
}
