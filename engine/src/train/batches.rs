//! From tokenised examples to training batches: a seeded per-epoch order, right padding or
//! packing, and the trained targets of each batch.
//!
//! Packing concatenates examples into rows of `max_len` tokens in the epoch's order (an
//! example that does not fit starts a new row). Each example keeps its own positions
//! (restarting at 0) and a segment id; attention never crosses segments, so a packed row gives
//! exactly the losses of its examples run separately.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::step::{StepBatch, Target};
use crate::model::Positions;
use crate::tokenizer::Encoded;

/// The order of `n` examples in `epoch`, from `seed` (identical on every run).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

fn targets_of(ids: &[u32], mask: &[u8], row: usize, len: usize, seq: usize, out: &mut Vec<Target>) {
    for t in 0..ids.len().saturating_sub(1) {
        if mask[t + 1] == 1 {
            out.push(Target {
                pos: row * len + t,
                id: ids[t + 1],
                seq,
            });
        }
    }
}

/// A prompt and its continuations, for [`shared_prefix`]: each continuation is
/// `(seq, ids, trained)`.
pub type PrefixGroup<'a> = (&'a [u32], Vec<(usize, &'a [u32], bool)>);

/// Rows that each hold one prompt followed by its continuations: the prompt is run once, and
/// each continuation sees the prompt and itself but not the others (segment ids with a shared
/// prefix, `kernels::attention::segment`), at the positions it would have after the prompt
/// alone, so every continuation gets exactly what a row `prompt + continuation` of its own
/// would. Targets: the tokens of each trained continuation (the first predicted at the
/// prompt's last position), with the `seq` given, in order. Right-padded to the longest row.
/// Not for models with a sliding window (distances in the row are not positions).
pub fn shared_prefix(groups: &[PrefixGroup<'_>], pad: u32) -> StepBatch {
    use crate::kernels::attention::segment;
    let len = groups
        .iter()
        .map(|(p, cs)| p.len() + cs.iter().map(|c| c.1.len()).sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let n = groups.len() * len;
    let (mut ids, mut segments, mut positions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut targets = Vec::new();
    for (row, (prompt, conts)) in groups.iter().enumerate() {
        let base = row * len;
        let p = prompt.len();
        ids.extend_from_slice(prompt);
        segments.resize(segments.len() + p, 1);
        positions.extend(0..p);
        for (i, &(seq, c, trained)) in conts.iter().enumerate() {
            let start = ids.len() - base;
            let seg = segment::with_prefix(i as u32 + 2, 1);
            for (j, &tok) in c.iter().enumerate() {
                let from = if j == 0 {
                    p.checked_sub(1)
                } else {
                    Some(start + j - 1)
                };
                if let (true, Some(from)) = (trained, from) {
                    targets.push(Target {
                        pos: base + from,
                        id: tok,
                        seq,
                    });
                }
            }
            ids.extend_from_slice(c);
            segments.resize(segments.len() + c.len(), seg);
            positions.extend(p..p + c.len());
        }
        ids.resize(base + len, pad);
        segments.resize(base + len, 0);
        positions.resize(base + len, 0);
    }
    StepBatch {
        ids,
        batch: groups.len(),
        len,
        positions: Positions::Explicit {
            ids: positions,
            batch: groups.len(),
            len,
        },
        real_tokens: segments.iter().filter(|&&g| g != 0).count(),
        segments: Some(segments),
        targets,
    }
}

/// Whether `model`'s rows of one prompt can share a row ([`shared_prefix`]): its device's
/// attention takes shared prefixes (the host's) and no layer has a sliding window (within a
/// shared row, distances are not positions).
pub fn shares_prefixes<M: crate::device::TrainBackend>(model: &M) -> bool {
    model.takes_shared_prefixes() && model.config().sliding_window.iter().all(Option::is_none)
}

/// One right-padded batch of `seqs` (one sequence per row; owned or borrowed).
pub fn padded<S: std::borrow::Borrow<Encoded>>(seqs: &[S], pad: u32) -> StepBatch {
    let len = seqs
        .iter()
        .map(|s| s.borrow().ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut targets = Vec::new();
    for (row, s) in seqs.iter().enumerate() {
        let s = s.borrow();
        targets_of(&s.ids, &s.mask, row, len, row, &mut targets);
        ids.extend_from_slice(&s.ids);
        ids.resize((row + 1) * len, pad);
    }
    StepBatch {
        ids,
        batch: seqs.len(),
        len,
        positions: Positions::Range {
            start: 0,
            len,
            batch: seqs.len(),
        },
        segments: None,
        targets,
        real_tokens: seqs.iter().map(|s| s.borrow().ids.len()).sum(),
    }
}

/// Packs `seqs` (each at most `max_len` tokens) into rows of `max_len`; returns the rows as
/// lists of sequence indices.
pub fn pack_rows(lens: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = max_len;
    for (i, &l) in lens.iter().enumerate() {
        if used + l > max_len {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row was started").push(i);
        used += l;
    }
    rows
}

/// One packed batch: `rows[r]` lists the sequences of row `r`.
pub fn packed(seqs: &[&Encoded], rows: &[Vec<usize>], max_len: usize, pad: u32) -> StepBatch {
    let len = max_len;
    let mut ids = vec![pad; rows.len() * len];
    let mut segments = vec![0u32; rows.len() * len];
    let mut positions = vec![0usize; rows.len() * len];
    let mut targets = Vec::new();
    let mut seq = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * len;
        for (k, &i) in row.iter().enumerate() {
            let s = seqs[i];
            let n = s.ids.len();
            ids[at..at + n].copy_from_slice(&s.ids);
            for t in 0..n {
                segments[at + t] = (k + 1) as u32;
                positions[at + t] = t;
            }
            for t in 0..n.saturating_sub(1) {
                if s.mask[t + 1] == 1 {
                    targets.push(Target {
                        pos: at + t,
                        id: s.ids[t + 1],
                        seq,
                    });
                }
            }
            at += n;
            seq += 1;
        }
        // Padding is its own segment (0), never trained, with positions counted from 0.
        for (p, t) in positions[at..(r + 1) * len].iter_mut().zip(0..) {
            *p = t;
        }
    }
    StepBatch {
        ids,
        batch: rows.len(),
        len,
        positions: Positions::Explicit {
            ids: positions,
            batch: rows.len(),
            len,
        },
        real_tokens: segments.iter().filter(|&&g| g != 0).count(),
        segments: Some(segments),
        targets,
    }
}

/// The micro-batches of one epoch, in order.
pub fn epoch_batches(
    seqs: &[Encoded],
    order: &[usize],
    batch_size: usize,
    packing: Option<usize>,
    pad: u32,
) -> Vec<StepBatch> {
    let ordered: Vec<&Encoded> = order.iter().map(|&i| &seqs[i]).collect();
    match packing {
        None => ordered
            .chunks(batch_size.max(1))
            .map(|c| padded(c, pad))
            .collect(),
        Some(max_len) => {
            let lens: Vec<usize> = ordered.iter().map(|s| s.ids.len()).collect();
            let rows = pack_rows(&lens, max_len);
            rows.chunks(batch_size.max(1))
                .map(|c| packed(&ordered, c, max_len, pad))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[u32], mask: &[u8]) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            mask: mask.to_vec(),
        }
    }

    #[test]
    fn padding_targets_follow_the_mask() {
        let a = enc(&[1, 2, 3, 4], &[0, 0, 1, 1]);
        let b = enc(&[5, 6], &[0, 1]);
        let batch = padded(&[&a, &b], 0);
        assert_eq!((batch.batch, batch.len), (2, 4));
        let t: Vec<(usize, u32)> = batch.targets.iter().map(|t| (t.pos, t.id)).collect();
        assert_eq!(t, vec![(1, 3), (2, 4), (4, 6)]);
        assert_eq!(batch.real_tokens, 6, "the two padding tokens do not count");
    }

    #[test]
    fn packing_restarts_positions_and_separates_segments() {
        let a = enc(&[1, 2, 3], &[0, 1, 1]);
        let b = enc(&[4, 5], &[0, 1]);
        let c = enc(&[6, 7, 8, 9], &[0, 0, 1, 1]);
        let rows = pack_rows(&[3, 2, 4], 5);
        assert_eq!(rows, vec![vec![0, 1], vec![2]]);
        let batch = packed(&[&a, &b, &c], &rows, 5, 0);
        assert_eq!(
            batch.segments.as_deref().unwrap(),
            &[1, 1, 1, 2, 2, 1, 1, 1, 1, 0]
        );
        match &batch.positions {
            Positions::Explicit { ids, .. } => assert_eq!(ids, &[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]),
            other => panic!("{other:?}"),
        }
        let t: Vec<(usize, u32, usize)> =
            batch.targets.iter().map(|t| (t.pos, t.id, t.seq)).collect();
        assert_eq!(
            t,
            vec![(0, 2, 0), (1, 3, 0), (3, 5, 1), (6, 8, 2), (7, 9, 2)]
        );
        assert_eq!(batch.real_tokens, 9, "the padding token does not count");
    }

    #[test]
    fn epoch_orders_are_seeded() {
        assert_eq!(epoch_order(50, 3, 0), epoch_order(50, 3, 0));
        assert_ne!(epoch_order(50, 3, 0), epoch_order(50, 3, 1));
    }
}
