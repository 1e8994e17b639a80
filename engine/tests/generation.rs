//! Incremental decoding with the KV cache against full forward passes: a group of rows that
//! continue one prompt, decoded together from the prompt's repeated cache, gives each row the
//! logits of decoding it alone and of running its whole sequence without a cache; greedy
//! groups equal greedy generation. Prompts of different lengths decoded as one left-padded
//! batch get the logits of each prompt decoded alone, and the groups of generating them alone.

use burn::tensor::{DType, Device};
use fedtune_engine::device::{Backend, forward};
use fedtune_engine::generate::{GenerationConfig, generate, generate_group, generate_groups};
use fedtune_engine::model::Positions;
use fedtune_engine::{LlamaModel, PeftAdapter, load_model};

fn model() -> (LlamaModel, Vec<u32>) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata");
    let mut m = load_model(&dir.join("tiny-llama/model"), &Device::flex(), DType::F32).unwrap();
    let a = PeftAdapter::load(&dir.join("tiny-llama/adapter")).unwrap();
    m.model.attach_adapter(&a).unwrap();
    let prompt = m
        .tokenizer
        .encode("Note: fever for two days. Extract JSON:")
        .unwrap();
    (m.model, prompt)
}

fn range(start: usize, len: usize, batch: usize) -> Positions {
    Positions::Range { start, len, batch }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn rows_decoded_together_get_the_logits_of_rows_decoded_alone_and_of_full_passes() {
    let (m, prompt) = model();
    let vocab = m.config.vocab_size;
    let len = prompt.len();
    let mut prefilled = m.new_cache();
    forward(
        &m,
        &prompt,
        1,
        len,
        &range(0, len, 1),
        None,
        Some(&mut prefilled),
    );
    let n = 3;
    let mut together = m
        .cache_stack(&[&prefilled], n, 0)
        .expect("the host stacks caches");
    let mut alone: Vec<_> = (0..n).map(|_| prefilled.clone()).collect();
    let mut rows: Vec<Vec<u32>> = vec![prompt.clone(); n];
    for step in 0..5 {
        let next: Vec<u32> = (0..n).map(|k| (100 + 37 * k + 11 * step) as u32).collect();
        let seen = LlamaModel::cache_seen(&together);
        let h = forward(
            &m,
            &next,
            n,
            1,
            &range(seen, 1, n),
            None,
            Some(&mut together),
        );
        let all: Vec<usize> = (0..n).collect();
        let batched = m.row_logits(&h, &all);
        for k in 0..n {
            rows[k].push(next[k]);
            let c = &mut alone[k];
            let seen = LlamaModel::cache_seen(c);
            let h1 = forward(&m, &next[k..k + 1], 1, 1, &range(seen, 1, 1), None, Some(c));
            let single = m.row_logits(&h1, &[0]);
            let t = rows[k].len();
            let hf = forward(&m, &rows[k], 1, t, &range(0, t, 1), None, None);
            let full = m.row_logits(&hf, &[t - 1]);
            let row = &batched[k * vocab..(k + 1) * vocab];
            assert!(
                max_diff(row, &single) < 1e-4,
                "step {step} row {k}: together vs alone"
            );
            assert!(
                max_diff(row, &full) < 1e-4,
                "step {step} row {k}: together vs full pass"
            );
        }
    }
}

#[test]
fn greedy_groups_equal_greedy_generation_and_samples_stop_where_asked() {
    let (m, prompt) = model();
    let greedy = GenerationConfig {
        max_new_tokens: 8,
        ..GenerationConfig::default()
    };
    let one = generate(&m, &prompt, &greedy, |_| {});
    let group = generate_group(&m, &prompt, 3, &greedy);
    assert_eq!(group, vec![one.clone(); 3]);
    // Sampling: each row stops after a stop id (kept) or at the length limit; rows differ.
    let stop = one[2];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        temperature: 1.5,
        seed: 3,
        stop_ids: vec![stop],
        ..GenerationConfig::default()
    };
    let group = generate_group(&m, &prompt, 6, &cfg);
    assert_eq!(group.len(), 6);
    for g in &group {
        assert!(!g.is_empty() && g.len() <= 12, "{g:?}");
        let stops = g.iter().filter(|&&t| t == stop).count();
        assert!(
            stops == 0 && g.len() == 12 || stops == 1 && g.last() == Some(&stop),
            "{g:?}"
        );
    }
    assert!(group.iter().any(|g| g != &group[0]), "samples differ");
    // The same seed draws the same group.
    assert_eq!(generate_group(&m, &prompt, 6, &cfg), group);
}

#[test]
fn prompts_of_different_lengths_decoded_as_one_batch_match_each_alone() {
    let (m, long) = model();
    let vocab = m.config.vocab_size;
    let short = long[..long.len() - 4].to_vec();
    let third = long[3..].to_vec();
    let prompts = [&long[..], &short[..], &third[..]];
    let prefill = |p: &[u32]| {
        let mut c = m.new_cache();
        forward(&m, p, 1, p.len(), &range(0, p.len(), 1), None, Some(&mut c));
        c
    };
    let alone_caches: Vec<_> = prompts.iter().map(|p| prefill(p)).collect();
    let parts: Vec<_> = alone_caches.iter().collect();
    let n = 2;
    let mut together = m.cache_stack(&parts, n, 2).expect("the host stacks caches");
    assert_eq!(together.pads, vec![0, 0, 4, 4, 3, 3]);
    let mut alone: Vec<_> = (0..3 * n).map(|r| alone_caches[r / n].clone()).collect();
    let mut lens: Vec<usize> = (0..3 * n).map(|r| prompts[r / n].len()).collect();
    for step in 0..4 {
        let next: Vec<u32> = (0..3 * n)
            .map(|r| (90 + 29 * r + 13 * step) as u32)
            .collect();
        let positions = Positions::Explicit {
            ids: lens.clone(),
            batch: 3 * n,
            len: 1,
        };
        let h = forward(&m, &next, 3 * n, 1, &positions, None, Some(&mut together));
        let all: Vec<usize> = (0..3 * n).collect();
        let batched = m.row_logits(&h, &all);
        for r in 0..3 * n {
            let c = &mut alone[r];
            let seen = LlamaModel::cache_seen(c);
            assert_eq!(seen, lens[r]);
            let h1 = forward(&m, &next[r..r + 1], 1, 1, &range(seen, 1, 1), None, Some(c));
            let single = m.row_logits(&h1, &[0]);
            let d = max_diff(&batched[r * vocab..(r + 1) * vocab], &single);
            assert!(
                d < 1e-4,
                "step {step} row {r}: batch vs alone differ by {d}"
            );
            lens[r] += 1;
        }
    }
    // Whole generations: greedy and sampled, each prompt with its own seed.
    for temperature in [0.0, 1.3] {
        let cfg = GenerationConfig {
            max_new_tokens: 10,
            temperature,
            ..GenerationConfig::default()
        };
        let seeds = [5, 6, 7];
        let batch = generate_groups(&m, &prompts, &seeds, 3, &cfg);
        for (p, prompt) in prompts.iter().enumerate() {
            let cfg = GenerationConfig {
                seed: seeds[p],
                ..cfg.clone()
            };
            assert_eq!(batch[p], generate_group(&m, prompt, 3, &cfg), "prompt {p}");
        }
    }
    // Empty prompts generate nothing and leave the others alone.
    let cfg = GenerationConfig {
        max_new_tokens: 4,
        ..GenerationConfig::default()
    };
    let with_empty = generate_groups(&m, &[&long[..], &[]], &[0, 0], 1, &cfg);
    assert_eq!(with_empty[0], vec![generate(&m, &long, &cfg, |_| {})]);
    assert_eq!(with_empty[1], vec![Vec::<u32>::new()]);
}

#[test]
fn cached_decoding_keeps_the_sliding_window_and_the_padding_hidden() {
    let (mut m, long) = model();
    let layers = m.config.num_hidden_layers;
    m.config.sliding_window = vec![Some(4); layers];
    let vocab = m.config.vocab_size;
    let short = long[2..].to_vec();
    let prompts = [&long[..], &short[..]];
    let caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = m.new_cache();
            forward(&m, p, 1, p.len(), &range(0, p.len(), 1), None, Some(&mut c));
            c
        })
        .collect();
    let parts: Vec<_> = caches.iter().collect();
    let mut together = m.cache_stack(&parts, 1, 0).expect("the host stacks caches");
    let mut rows: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    for step in 0..3 {
        let next: Vec<u32> = (0..2).map(|r| (200 + 7 * r + 5 * step) as u32).collect();
        let positions = Positions::Explicit {
            ids: rows.iter().map(Vec::len).collect(),
            batch: 2,
            len: 1,
        };
        let h = forward(&m, &next, 2, 1, &positions, None, Some(&mut together));
        let batched = m.row_logits(&h, &[0, 1]);
        for r in 0..2 {
            rows[r].push(next[r]);
            let t = rows[r].len();
            let hf = forward(&m, &rows[r], 1, t, &range(0, t, 1), None, None);
            let full = m.row_logits(&hf, &[t - 1]);
            let d = max_diff(&batched[r * vocab..(r + 1) * vocab], &full);
            assert!(
                d < 1e-4,
                "step {step} row {r}: windowed batch vs full pass: {d}"
            );
        }
    }
}
