//! Text generation with a KV cache: greedy decoding, or sampling with temperature, top-k and
//! top-p (nucleus) filtering in the order transformers applies them, from a seeded RNG.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::device::{Backend, forward};
use crate::model::Positions;

/// Decoding options.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy decoding.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// RNG seed for sampling.
    pub seed: u64,
    /// Generation stops after any of these ids.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// Picks the next token from `logits` under `cfg`.
pub fn sample(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v as f64 / cfg.temperature))
        .collect();
    if cand.is_empty() {
        return argmax();
    }
    let by_value =
        |a: &(u32, f64), b: &(u32, f64)| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal);
    if cfg.top_p >= 1.0 && (cfg.top_k == 0 || cfg.top_k >= cand.len()) {
        // No filter: draw from the whole distribution in vocabulary order (sorting the
        // vocabulary for every token was a tenth of decoding's time).
        let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
        let probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let mut u = rng.random::<f64>() * probs.iter().sum::<f64>();
        for (c, p) in cand.iter().zip(&probs) {
            if u < *p {
                return c.0;
            }
            u -= p;
        }
        return cand[cand.len() - 1].0;
    }
    if cfg.top_k > 0 && cfg.top_k < cand.len() {
        cand.select_nth_unstable_by(cfg.top_k - 1, by_value);
        cand.truncate(cfg.top_k);
    }
    cand.sort_by(by_value);
    let max = cand.first().map_or(0.0, |c| c.1);
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        // Keep tokens while the mass *before* them is below top_p (at least one).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .take_while(|&&p| {
                let before = mass;
                mass += p;
                before < cfg.top_p
            })
            .count()
            .max(1);
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut u: f64 = rng.random();
    for (c, p) in cand.iter().zip(&probs) {
        if u < *p {
            return c.0;
        }
        u -= p;
    }
    cand[probs.len() - 1].0
}

/// Generates a continuation of `prompt` on any device; `on_token` sees each new id as it is
/// produced. Returns the new ids (including the stop token when one was produced).
pub fn generate<B: Backend>(
    model: &B,
    prompt: &[u32],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < cfg.max_new_tokens && !input.is_empty() {
        let len = input.len();
        let positions = Positions::Range {
            start: B::cache_seen(&cache),
            len,
            batch: 1,
        };
        let hidden = forward(model, &input, 1, len, &positions, None, Some(&mut cache));
        let logits = model.row_logits(&hidden, &[len - 1]);
        let next = sample(&logits, cfg, &mut rng);
        out.push(next);
        on_token(next);
        if cfg.stop_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    out
}

/// `n` sampled continuations of `prompt` (GRPO's group): [`generate_groups`] for one prompt
/// with `cfg.seed`.
pub fn generate_group<B: Backend>(
    model: &B,
    prompt: &[u32],
    n: usize,
    cfg: &GenerationConfig,
) -> Vec<Vec<u32>> {
    generate_groups(model, &[prompt], &[cfg.seed], n, cfg)
        .pop()
        .unwrap_or_default()
}

/// `n` continuations of each of `prompts`, continuation `r` of the `p`-th drawn from its own
/// RNG stream: ChaCha8 seeded with `seeds[p]`, stream `r` (so a prompt's group depends
/// neither on the others in the batch nor on how the device batches its rows: the host and a
/// GPU draw the same tokens from the same logits). Each prompt is run once and its KV cache
/// shared by its `n` continuations; each continuation stops at a stop id (kept) or after
/// `cfg.max_new_tokens`. Where the device stacks caches ([`Backend::cache_stack`]: the host)
/// all `prompts.len()·n` continuations decode together as one batch, one token per row per
/// forward pass, shorter prompts left-padded (finished rows run along until every row is
/// done, as transformers' `generate` pads them). Where the device stacks caches of one length
/// only (a GPU), prompts of one length decode together, else each prompt's rows as one batch;
/// elsewhere each prompt's continuations decode one after the other, each from the prompt's
/// cache. More than [`BATCH_ROWS`] rows go in several batches of whole groups.
pub fn generate_groups<B: Backend>(
    model: &B,
    prompts: &[&[u32]],
    seeds: &[u64],
    n: usize,
    cfg: &GenerationConfig,
) -> Vec<Vec<Vec<u32>>> {
    assert_eq!(prompts.len(), seeds.len(), "one seed per prompt");
    // Batches of at most BATCH_ROWS rows (whole groups), so that the caches stay small.
    let per = (BATCH_ROWS / n.max(1)).max(1);
    if prompts.len() > per {
        return prompts
            .chunks(per)
            .zip(seeds.chunks(per))
            .flat_map(|(p, s)| generate_groups(model, p, s, n, cfg))
            .collect();
    }
    let mut out = vec![vec![Vec::new(); n]; prompts.len()];
    // Prompts that generate at all.
    let active: Vec<usize> = (0..prompts.len())
        .filter(|&p| !prompts[p].is_empty() && cfg.max_new_tokens > 0 && n > 0)
        .collect();
    if active.is_empty() {
        return out;
    }
    // Row r of the a-th active prompt draws from rngs[a·n + r].
    let mut rngs: Vec<ChaCha8Rng> = active
        .iter()
        .flat_map(|&p| {
            (0..n as u64).map(move |r| {
                let mut rng = ChaCha8Rng::seed_from_u64(seeds[p]);
                rng.set_stream(r);
                rng
            })
        })
        .collect();
    let mut caches = Vec::with_capacity(active.len());
    let mut first = Vec::with_capacity(active.len());
    for &p in &active {
        let (cache, logits) = prefill(model, prompts[p]);
        caches.push(cache);
        first.push(logits);
    }
    let parts: Vec<&B::Cache> = caches.iter().collect();
    if let Some(cache) = model.cache_stack(&parts, n, cfg.max_new_tokens) {
        let lens: Vec<usize> = active.iter().map(|&p| prompts[p].len()).collect();
        let batch = Batch {
            lens: &lens,
            first: &first,
            n,
        };
        for (a, rows) in active
            .iter()
            .zip(decode_together(model, cache, &batch, cfg, &mut rngs))
        {
            out[*a] = rows;
        }
        return out;
    }
    for ((cache, (logits, rngs)), &p) in caches
        .into_iter()
        .zip(first.iter().zip(rngs.chunks_mut(n)))
        .zip(&active)
    {
        // The prompt's own rows as one batch, where the device stacks one cache alone.
        if let Some(stacked) = model.cache_stack(&[&cache], n, cfg.max_new_tokens) {
            let lens = [prompts[p].len()];
            let batch = Batch {
                lens: &lens,
                first: std::slice::from_ref(logits),
                n,
            };
            out[p] = decode_together(model, stacked, &batch, cfg, rngs)
                .pop()
                .unwrap_or_default();
            continue;
        }
        // The first row continues the prefilled cache; the others run the prompt again (the
        // devices without stacking do not copy caches either).
        let mut cache = Some(cache);
        out[p] = rngs
            .iter_mut()
            .map(|rng| {
                let c = cache.take().unwrap_or_else(|| prefill(model, prompts[p]).0);
                decode_alone(model, c, logits, cfg, rng)
            })
            .collect();
    }
    out
}

/// The most rows decoded as one batch (more prompts go in several batches): decoding is bound
/// by reading the weights once per step, so rows are nearly free up to here, while each row
/// holds its own keys and values.
pub const BATCH_ROWS: usize = 16;

/// Runs `prompt` into a fresh cache; the cache and the logits after its last token.
fn prefill<B: Backend>(model: &B, prompt: &[u32]) -> (B::Cache, Vec<f32>) {
    let mut cache = model.new_cache();
    let len = prompt.len();
    let positions = Positions::Range {
        start: 0,
        len,
        batch: 1,
    };
    let hidden = forward(model, prompt, 1, len, &positions, None, Some(&mut cache));
    let logits = model.row_logits(&hidden, &[len - 1]);
    (cache, logits)
}

/// One continuation from `cache` (a prompt's), starting from a sample of `first`.
fn decode_alone<B: Backend>(
    model: &B,
    mut cache: B::Cache,
    first: &[f32],
    cfg: &GenerationConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut next = sample(first, cfg, rng);
    loop {
        out.push(next);
        if cfg.stop_ids.contains(&next) || out.len() >= cfg.max_new_tokens {
            return out;
        }
        let positions = Positions::Range {
            start: B::cache_seen(&cache),
            len: 1,
            batch: 1,
        };
        let hidden = forward(model, &[next], 1, 1, &positions, None, Some(&mut cache));
        next = sample(&model.row_logits(&hidden, &[0]), cfg, rng);
    }
}

/// The prompts of a stacked batch.
struct Batch<'a> {
    /// Each prompt's length.
    lens: &'a [usize],
    /// Each prompt's logits after its last token.
    first: &'a [Vec<f32>],
    /// Rows per prompt.
    n: usize,
}

/// The rows of `batch` decoded together from `cache` (the prompts' caches, stacked), each
/// starting from a sample of its prompt's logits; row `r` draws from `rngs[r]`.
fn decode_together<B: Backend>(
    model: &B,
    mut cache: B::Cache,
    batch: &Batch<'_>,
    cfg: &GenerationConfig,
    rngs: &mut [ChaCha8Rng],
) -> Vec<Vec<Vec<u32>>> {
    let n = batch.n;
    let rows = batch.lens.len() * n;
    let vocab = batch.first.first().map_or(0, Vec::len);
    let mut out = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    let mut next: Vec<u32> = (0..rows)
        .map(|r| sample(&batch.first[r / n], cfg, &mut rngs[r]))
        .collect();
    loop {
        for r in 0..rows {
            if !done[r] {
                out[r].push(next[r]);
                done[r] = cfg.stop_ids.contains(&next[r]) || out[r].len() >= cfg.max_new_tokens;
            }
        }
        let live: Vec<usize> = (0..rows).filter(|&r| !done[r]).collect();
        if live.is_empty() {
            break;
        }
        // Row r's token goes to its own position: its prompt's length plus what it has.
        let positions = Positions::Explicit {
            ids: (0..rows)
                .map(|r| batch.lens[r / n] + out[r].len() - 1)
                .collect(),
            batch: rows,
            len: 1,
        };
        let hidden = forward(model, &next, rows, 1, &positions, None, Some(&mut cache));
        let logits = model.row_logits(&hidden, &live);
        for (j, &r) in live.iter().enumerate() {
            next[r] = sample(&logits[j * vocab..(j + 1) * vocab], cfg, &mut rngs[r]);
        }
    }
    let mut grouped = Vec::with_capacity(batch.lens.len());
    let mut it = out.into_iter();
    for _ in batch.lens {
        grouped.push(it.by_ref().take(n).collect());
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_argmax_and_top_k_one_is_greedy() {
        let logits = [0.1, 3.0, 2.0, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&logits, &GenerationConfig::default(), &mut rng), 1);
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // softmax([10, 9, 0, 0]) ≈ [0.73, 0.27, 3e-5, 3e-5]: top_p 0.9 keeps two tokens.
        let logits = [10.0, 9.0, 0.0, 0.0];
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[sample(&logits, &cfg, &mut rng) as usize] += 1;
        }
        assert!(
            seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0,
            "{seen:?}"
        );
    }

    #[test]
    fn unfiltered_samples_follow_the_softmax_and_top_k_keeps_the_k_largest() {
        // softmax([0, ln 3, -inf, ln 6] / 1) = [0.1, 0.3, 0, 0.6].
        let logits = [0.0, 3f32.ln(), f32::NEG_INFINITY, 6f32.ln()];
        let cfg = GenerationConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut seen = [0usize; 4];
        let draws = 20_000;
        for _ in 0..draws {
            seen[sample(&logits, &cfg, &mut rng) as usize] += 1;
        }
        for (i, want) in [0.1, 0.3, 0.0, 0.6].into_iter().enumerate() {
            let got = seen[i] as f64 / draws as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        // Temperature 2 flattens: [1, √3, 0, √6] / (1 + √3 + √6).
        let hot = GenerationConfig {
            temperature: 2.0,
            ..Default::default()
        };
        let mut seen = [0usize; 4];
        for _ in 0..draws {
            seen[sample(&logits, &hot, &mut rng) as usize] += 1;
        }
        let z = 1.0 + 3f64.sqrt() + 6f64.sqrt();
        assert!(
            (seen[0] as f64 / draws as f64 - 1.0 / z).abs() < 0.015,
            "{seen:?}"
        );
        // top_k 2 keeps tokens 3 and 1 only, renormalised to [1/3, 2/3].
        let top2 = GenerationConfig {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let mut seen = [0usize; 4];
        for _ in 0..draws {
            seen[sample(&logits, &top2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "{seen:?}");
        assert!(
            (seen[1] as f64 / draws as f64 - 1.0 / 3.0).abs() < 0.015,
            "{seen:?}"
        );
    }
}
