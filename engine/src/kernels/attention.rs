//! Causal self-attention forward and backward on the `[tokens, heads·d]` row layout, without
//! transposes or materialised `[heads, t, t]` tensors.
//!
//! For each (sequence, KV head) task and each block of 64 queries, only keys up to the block's
//! last query are touched (half the work of a full `QKᵀ`). Forward keeps `lse = log Σ exp(s)`
//! per query; backward recomputes `P = exp(S − lse)` block by block:
//! `dV += PᵀdO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = s·dS·K`, `dK += s·dSᵀQ`.
//! Masks: causal, optional packing segments (a query sees keys of its own segment; segment 0
//! is padding) and an optional sliding window. Query heads sharing a KV head run in the same
//! task, so their `dK`/`dV` contributions never race.

use rayon::prelude::*;

use super::{Uninit, fastmath};

/// Query rows per block.
const QB: usize = 64;

/// Sizes of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub len: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Head width.
    pub d: usize,
}

/// Segment ids with a shared prefix: a token's segment id may name, in its high 16 bits, a
/// second segment whose keys it also sees (a prompt packed once in a row, followed by several
/// completions of it that each see the prompt but not each other); the low 16 bits are its own
/// segment. Plain packing uses ids below `1 << 16`.
pub mod segment {
    /// Bits of the own segment.
    pub const SHIFT: u32 = 16;

    /// The id of a token of segment `own` that also sees segment `prefix`.
    pub fn with_prefix(own: u32, prefix: u32) -> u32 {
        assert!(
            own > 0 && own < 1 << SHIFT && prefix < 1 << SHIFT,
            "segment ids below 2^16"
        );
        (prefix << SHIFT) | own
    }

    /// The token's own segment.
    pub fn own(id: u32) -> u32 {
        id & ((1 << SHIFT) - 1)
    }

    /// The segment it also sees (0: none).
    pub fn prefix(id: u32) -> u32 {
        id >> SHIFT
    }
}

/// Which keys each query may see beyond causality.
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// Segment per token `[batch·len]` (0 = padding; [`segment`] for shared prefixes), or all
    /// one segment.
    pub segments: Option<&'a [u32]>,
    /// Sliding window.
    pub window: Option<usize>,
}

/// The keys a query sees: its shared prefix `pre.0..pre.1` (empty: `pre.0 == pre.1 == lo`) and
/// `lo..=hi`.
type Vis = (usize, usize, usize, usize);

impl Mask<'_> {
    /// The keys query `qi` of sequence `b` sees: a contiguous range `lo..=qi` (segments are
    /// contiguous runs; padding sees only itself; the window bounds `lo`), and the run of its
    /// shared prefix's segment before its own run, when it has one.
    fn visible(&self, b: usize, len: usize, qi: usize) -> Vis {
        let mut lo = 0;
        if let Some(w) = self.window {
            lo = (qi + 1).saturating_sub(w);
        }
        let Some(seg) = self.segments else {
            return (lo, lo, lo, qi);
        };
        let row = &seg[b * len..(b + 1) * len];
        let sq = row[qi];
        if sq == 0 {
            return (qi, qi, qi, qi);
        }
        let mut start = qi;
        while start > lo && row[start - 1] == sq {
            start -= 1;
        }
        let own_lo = lo.max(start);
        let p = segment::prefix(sq);
        if p == 0 {
            return (own_lo, own_lo, own_lo, qi);
        }
        // The prefix's run: the last run of segment p before this one.
        let mut end = start;
        while end > 0 && row[end - 1] != p {
            end -= 1;
        }
        let mut first = end;
        while first > 0 && row[first - 1] == p {
            first -= 1;
        }
        let (plo, phi) = (first.max(lo), end.max(lo));
        if plo >= phi {
            return (own_lo, own_lo, own_lo, qi);
        }
        (plo, phi, own_lo, qi)
    }

    /// Visible keys of every query `[batch·len]`, computed once per call (every head of a
    /// sequence shares them; a query's prefix lookup walks back over the row).
    fn all(&self, batch: usize, len: usize) -> Vec<Vis> {
        (0..batch)
            .flat_map(|b| (0..len).map(move |qi| (b, qi)))
            .map(|(b, qi)| self.visible(b, len, qi))
            .collect()
    }
}

/// `dst[m×n] (= or +=) beta · lhs[m×k] · rhs[k×n]` with explicit strides (elements).
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst bounds");
    if k > 0 {
        assert!(
            (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
            "gemm lhs bounds"
        );
        assert!(
            (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
            "gemm rhs bounds"
        );
    }
    if let Some(blas) = super::blas::get() {
        // Row-major operands: unit column stride as stored, unit row stride as a transpose.
        let op = |data, rs: usize, cs: usize| super::blas::Operand {
            data: super::blas::Values::F32(data),
            ld: if cs == 1 { rs } else { cs },
            trans: cs != 1,
        };
        if (lhs_cs == 1 || lhs_rs == 1) && (rhs_cs == 1 || rhs_rs == 1) {
            let acc = if accumulate { 1.0 } else { 0.0 };
            blas.sgemm_serial(
                m,
                n,
                k,
                beta,
                op(lhs, lhs_rs, lhs_cs),
                op(rhs, rhs_rs, rhs_cs),
                acc,
                dst,
                dst_rs,
            );
            return;
        }
    }
    // SAFETY: every index the call touches was bounds-checked above; slices do not alias
    // (dst is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `S[rows×kmax] = scale · Q_blk · Kᵀ` for query rows `q` (row stride `qs`) against the first
/// `kmax` keys `k` (row stride `ks`), both `d` wide.
#[allow(clippy::too_many_arguments)]
fn scores(
    s: &mut [f32],
    rows: usize,
    kmax: usize,
    d: usize,
    q: &[f32],
    qs: usize,
    k: &[f32],
    ks: usize,
    scale: f32,
) {
    gemm(rows, kmax, d, s, kmax, false, q, qs, 1, k, 1, ks, scale);
}

crate::kernels::simd! {
    /// Softmax of score rows `[rows, cols]` over each row's visible keys (its shared prefix
    /// and `lo..=hi`; zero elsewhere), in place; writes the log-sum-exp per row.
    fn softmax_block(s: &mut [f32], cols: usize, ranges: &[Vis], lse: &mut [f32]) {
        for ((row, &(plo, phi, lo, hi)), l) in s.chunks_mut(cols).zip(ranges).zip(lse.iter_mut()) {
            let mut max = fastmath::max(&row[lo..=hi]);
            if phi > plo {
                max = max.max(fastmath::max(&row[plo..phi]));
            }
            let mut sum = fastmath::exp_shift_sum(&mut row[lo..=hi], max);
            if phi > plo {
                sum += fastmath::exp_shift_sum(&mut row[plo..phi], max);
            }
            let inv = 1.0 / sum;
            for v in row[lo..=hi].iter_mut() {
                *v *= inv;
            }
            for v in row[plo..phi].iter_mut() {
                *v *= inv;
            }
            row[..plo].fill(0.0);
            row[phi..lo].fill(0.0);
            row[hi + 1..].fill(0.0);
            *l = max + sum.ln();
        }
    }
}

crate::kernels::simd! {
    /// `P = exp(S − lse)` on visible keys (0 elsewhere), then `dS = P ⊙ (dP − D)` in place
    /// of `dp`.
    fn probs_and_ds(s: &mut [f32], dp: &mut [f32], cols: usize, ranges: &[Vis], lse: &[f32], dsum: &[f32]) {
        for ((((row, drow), &(plo, phi, lo, hi)), &l), &dd) in s
            .chunks_mut(cols)
            .zip(dp.chunks_mut(cols))
            .zip(ranges)
            .zip(lse)
            .zip(dsum)
        {
            for (p, g) in row[lo..=hi].iter_mut().zip(drow[lo..=hi].iter_mut()) {
                let e = fastmath::exp(*p - l);
                *p = e;
                *g = e * (*g - dd);
            }
            for (p, g) in row[plo..phi].iter_mut().zip(drow[plo..phi].iter_mut()) {
                let e = fastmath::exp(*p - l);
                *p = e;
                *g = e * (*g - dd);
            }
            row[..plo].fill(0.0);
            row[phi..lo].fill(0.0);
            row[hi + 1..].fill(0.0);
            drow[..plo].fill(0.0);
            drow[phi..lo].fill(0.0);
            drow[hi + 1..].fill(0.0);
        }
    }
}

/// Forward: returns `o` `[batch·len, hq·d]` and `lse` `[batch, hq, len]`.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: Shape,
    mask: Mask<'_>,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Shape {
        batch,
        len,
        hq,
        hkv,
        d,
    } = sh;
    let groups = hq / hkv;
    let (qs, ks) = (hq * d, hkv * d);
    let tasks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..hq).map(move |h| (b, h)))
        .collect();
    let (n_o, n_lse) = (batch * len * qs, batch * hq * len);
    let (mut o_all, mut lse_all) = (Uninit::new(n_o), Uninit::new(n_lse));
    let (o_out, lse_out) = (o_all.shared(), lse_all.shared());
    let vis = mask.all(batch, len);
    tasks.par_iter().for_each(|&(b, h)| {
        let kh = h / groups;
        let qb = &q[b * len * qs + h * d..];
        let kb = &k[b * len * ks + kh * d..];
        let vb = &v[b * len * ks + kh * d..];
        let mut o = vec![0f32; len * d];
        let mut lse = vec![0f32; len];
        let mut s = vec![0f32; QB * len];
        for q0 in (0..len).step_by(QB) {
            let rows = QB.min(len - q0);
            let kmax = q0 + rows; // causal: keys up to the block's last query
            let s = &mut s[..rows * kmax];
            scores(s, rows, kmax, d, &qb[q0 * qs..], qs, kb, ks, scale);
            let ranges = &vis[b * len + q0..b * len + q0 + rows];
            softmax_block(s, kmax, ranges, &mut lse[q0..q0 + rows]);
            // O_blk = P · V
            gemm(
                rows,
                d,
                kmax,
                &mut o[q0 * d..],
                d,
                false,
                s,
                kmax,
                1,
                vb,
                ks,
                1,
                1.0,
            );
        }
        // SAFETY: task (b, h) alone writes head h's columns of sequence b and its lse row;
        // the tasks together write every element of both outputs.
        unsafe {
            for t in 0..len {
                o_out.put((b * len + t) * qs + h * d, &o[t * d..(t + 1) * d]);
            }
            lse_out.put((b * hq + h) * len, &lse);
        }
    });
    // SAFETY: every element was written above (the tasks cover all sequences and heads).
    unsafe { (o_all.assume_init(), lse_all.assume_init()) }
}

/// The keys and values of a KV cache, as [`cached`] reads them.
#[derive(Debug, Clone, Copy)]
pub struct Cached<'a> {
    /// Keys `[batch, cap, hkv·d]`.
    pub k: &'a [f32],
    /// Values, laid out as the keys.
    pub v: &'a [f32],
    /// Rows held per sequence.
    pub cap: usize,
    /// Rows filled per sequence (the new queries' keys included).
    pub len: usize,
    /// Per sequence, the leading rows that are padding (empty: none).
    pub pads: &'a [usize],
}

/// Attention of `sh.len` new queries per sequence over a KV cache (decoding): the queries
/// `q` `[batch·len, hq·d]` are the last `len` of the cache's `kv.len` positions; a query sees
/// the keys up to itself, none of its sequence's padding, and with `window` only the keys
/// less than `window` behind it. Query heads sharing a KV head run as the rows of one product.
/// Returns `o` `[batch·len, hq·d]`.
pub fn cached(q: &[f32], kv: Cached<'_>, sh: Shape, window: Option<usize>, scale: f32) -> Vec<f32> {
    let Shape {
        batch,
        len: tq,
        hq,
        hkv,
        d,
    } = sh;
    let groups = hq / hkv;
    let (qs, ks, tk) = (hq * d, hkv * d, kv.len);
    assert!(
        tq <= tk && tk <= kv.cap,
        "cached attention: {tq} queries over {tk} keys"
    );
    assert!(kv.k.len() >= batch * kv.cap * ks && kv.v.len() >= batch * kv.cap * ks);
    assert!(
        q.len() >= batch * tq * qs,
        "cached attention: queries too short"
    );
    let tasks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..hkv).map(move |h| (b, h)))
        .collect();
    let mut o_all = Uninit::new(batch * tq * qs);
    let o_out = o_all.shared();
    tasks.par_iter().for_each(|&(b, kh)| {
        let kb = &kv.k[b * kv.cap * ks + kh * d..];
        let vb = &kv.v[b * kv.cap * ks + kh * d..];
        let pad = kv.pads.get(b).copied().unwrap_or(0);
        let mut s = vec![0f32; groups * tk];
        let mut o = vec![0f32; groups * d];
        let mut lse = vec![0f32; groups];
        for t in 0..tq {
            let qpos = tk - tq + t;
            let kmax = qpos + 1;
            let mut lo = pad.min(qpos);
            if let Some(w) = window {
                lo = lo.max(kmax.saturating_sub(w));
            }
            let row = (b * tq + t) * qs + kh * groups * d;
            let s = &mut s[..groups * kmax];
            // The group's query heads are adjacent d-wide rows of the token's row.
            scores(s, groups, kmax, d, &q[row..], d, kb, ks, scale);
            softmax_block(s, kmax, &vec![(lo, lo, lo, qpos); groups], &mut lse);
            gemm(
                groups, d, kmax, &mut o, d, false, s, kmax, 1, vb, ks, 1, 1.0,
            );
            // SAFETY: task (b, kh) alone writes the columns of its query heads in sequence
            // b's rows; the tasks together write every element.
            unsafe { o_out.put(row, &o) };
        }
    });
    // SAFETY: every element was written above.
    unsafe { o_all.assume_init() }
}

/// Backward: returns `(dq, dk, dv)` in the row layouts of `q`, `k`, `v`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    sh: Shape,
    mask: Mask<'_>,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Shape {
        batch,
        len,
        hq,
        hkv,
        d,
    } = sh;
    let groups = hq / hkv;
    let (qs, ks) = (hq * d, hkv * d);
    let tasks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..hkv).map(move |h| (b, h)))
        .collect();
    let (n_q, n_k) = (batch * len * qs, batch * len * ks);
    let (mut dq_all, mut dk_all, mut dv_all) =
        (Uninit::new(n_q), Uninit::new(n_k), Uninit::new(n_k));
    let (dq_out, dk_out, dv_out) = (dq_all.shared(), dk_all.shared(), dv_all.shared());
    let vis = mask.all(batch, len);
    tasks.par_iter().for_each(|&(b, kh)| {
        let kb = &k[b * len * ks + kh * d..];
        let vb = &v[b * len * ks + kh * d..];
        let mut dq = vec![0f32; groups * len * d];
        let mut dk = vec![0f32; len * d];
        let mut dv = vec![0f32; len * d];
        let mut s = vec![0f32; QB * len];
        let mut dp = vec![0f32; QB * len];
        let mut dsum = vec![0f32; QB];
        for g in 0..groups {
            let h = kh * groups + g;
            let qb = &q[b * len * qs + h * d..];
            let ob = &o[b * len * qs + h * d..];
            let dob = &d_o[b * len * qs + h * d..];
            let lb = &lse[(b * hq + h) * len..(b * hq + h + 1) * len];
            for q0 in (0..len).step_by(QB) {
                let rows = QB.min(len - q0);
                let kmax = q0 + rows;
                let s = &mut s[..rows * kmax];
                let dp = &mut dp[..rows * kmax];
                for (i, ds) in dsum[..rows].iter_mut().enumerate() {
                    let r = (q0 + i) * qs;
                    *ds = fastmath::dot(&dob[r..r + d], &ob[r..r + d]);
                }
                scores(s, rows, kmax, d, &qb[q0 * qs..], qs, kb, ks, scale);
                // dP = dO_blk · Vᵀ
                gemm(
                    rows,
                    kmax,
                    d,
                    dp,
                    kmax,
                    false,
                    &dob[q0 * qs..],
                    qs,
                    1,
                    vb,
                    1,
                    ks,
                    1.0,
                );
                let ranges = &vis[b * len + q0..b * len + q0 + rows];
                probs_and_ds(s, dp, kmax, ranges, &lb[q0..q0 + rows], &dsum[..rows]);
                // dV[0..kmax] += Pᵀ · dO_blk
                gemm(
                    kmax,
                    d,
                    rows,
                    &mut dv,
                    d,
                    true,
                    s,
                    1,
                    kmax,
                    &dob[q0 * qs..],
                    qs,
                    1,
                    1.0,
                );
                // dQ_blk = scale · dS · K
                gemm(
                    rows,
                    d,
                    kmax,
                    &mut dq[(g * len + q0) * d..],
                    d,
                    false,
                    dp,
                    kmax,
                    1,
                    kb,
                    ks,
                    1,
                    scale,
                );
                // dK[0..kmax] += scale · dSᵀ · Q_blk
                gemm(
                    kmax,
                    d,
                    rows,
                    &mut dk,
                    d,
                    true,
                    dp,
                    1,
                    kmax,
                    &qb[q0 * qs..],
                    qs,
                    1,
                    scale,
                );
            }
        }
        // SAFETY: task (b, kh) alone writes the columns of KV head kh and of its query
        // heads in sequence b; the tasks together write every element of the outputs.
        unsafe {
            for t in 0..len {
                let row = b * len + t;
                for g in 0..groups {
                    let h = kh * groups + g;
                    dq_out.put(
                        row * qs + h * d,
                        &dq[(g * len + t) * d..(g * len + t + 1) * d],
                    );
                }
                dk_out.put(row * ks + kh * d, &dk[t * d..(t + 1) * d]);
                dv_out.put(row * ks + kh * d, &dv[t * d..(t + 1) * d]);
            }
        }
    });
    // SAFETY: every element was written above.
    unsafe {
        (
            dq_all.assume_init(),
            dk_all.assume_init(),
            dv_all.assume_init(),
        )
    }
}
