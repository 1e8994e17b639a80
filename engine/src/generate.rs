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
    cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    if cfg.top_k > 0 {
        cand.truncate(cfg.top_k);
    }
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

/// `n` sampled continuations of `prompt` (GRPO's group): the prompt is run once and its KV
/// cache shared by every continuation; each stops at a stop id (kept) or after
/// `cfg.max_new_tokens`. Where the device repeats a cache ([`Backend::cache_repeat`]: the host)
/// the `n` continuations decode together as one batch of `n` rows, one token each per forward
/// pass (finished rows run along until every row is done, as transformers' `generate` pads
/// them); one RNG stream from `cfg.seed` draws each step's tokens in row order. Elsewhere they
/// decode one after the other from a copy of the prompt's cache.
pub fn generate_group<B: Backend>(
    model: &B,
    prompt: &[u32],
    n: usize,
    cfg: &GenerationConfig,
) -> Vec<Vec<u32>>
where
    B::Cache: Clone,
{
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut prefilled = model.new_cache();
    let len = prompt.len();
    if len == 0 || cfg.max_new_tokens == 0 || n == 0 {
        return vec![Vec::new(); n];
    }
    let positions = Positions::Range {
        start: 0,
        len,
        batch: 1,
    };
    let hidden = forward(
        model,
        prompt,
        1,
        len,
        &positions,
        None,
        Some(&mut prefilled),
    );
    let first_logits = model.row_logits(&hidden, &[len - 1]);
    if let Some(cache) = model.cache_repeat(&prefilled, n) {
        return decode_together(model, cache, &first_logits, n, cfg, &mut rng);
    }
    (0..n)
        .map(|_| {
            let mut cache = prefilled.clone();
            let mut out = Vec::new();
            let mut next = sample(&first_logits, cfg, &mut rng);
            loop {
                out.push(next);
                if cfg.stop_ids.contains(&next) || out.len() >= cfg.max_new_tokens {
                    break;
                }
                let positions = Positions::Range {
                    start: B::cache_seen(&cache),
                    len: 1,
                    batch: 1,
                };
                let hidden = forward(model, &[next], 1, 1, &positions, None, Some(&mut cache));
                let logits = model.row_logits(&hidden, &[0]);
                next = sample(&logits, cfg, &mut rng);
            }
            out
        })
        .collect()
}

/// The `n` rows of a group decoded as one batch from `cache` (the prompt's, repeated), each
/// starting from a sample of `first_logits`.
fn decode_together<B: Backend>(
    model: &B,
    mut cache: B::Cache,
    first_logits: &[f32],
    n: usize,
    cfg: &GenerationConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<u32>> {
    let vocab = first_logits.len();
    let mut out = vec![Vec::new(); n];
    let mut done = vec![false; n];
    let mut next: Vec<u32> = (0..n).map(|_| sample(first_logits, cfg, rng)).collect();
    loop {
        for k in 0..n {
            if !done[k] {
                out[k].push(next[k]);
                done[k] = cfg.stop_ids.contains(&next[k]) || out[k].len() >= cfg.max_new_tokens;
            }
        }
        let live: Vec<usize> = (0..n).filter(|&k| !done[k]).collect();
        if live.is_empty() {
            return out;
        }
        let positions = Positions::Range {
            start: B::cache_seen(&cache),
            len: 1,
            batch: n,
        };
        let hidden = forward(model, &next, n, 1, &positions, None, Some(&mut cache));
        let logits = model.row_logits(&hidden, &live);
        for (j, &k) in live.iter().enumerate() {
            next[k] = sample(&logits[j * vocab..(j + 1) * vocab], cfg, rng);
        }
    }
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
}
