//! The engine against transformers' and PEFT's own outputs on the tiny reference checkpoint
//! (`testdata/tiny-llama`, produced by torch 2.15 + transformers 5.23 + PEFT 0.21.2; see
//! `testdata/REFERENCE.md`). Tolerance: 1e-4 absolute on f32 logits and losses.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Tensor};
use fedtune_engine::dpo::{DpoMetrics, PairLogps};
use fedtune_engine::eval::{TokenBatch, sequence_logprobs, sft_loss};
use fedtune_engine::tokenizer::EncodedPair;
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{LlamaModel, Message, ModelConfig, PeftAdapter, Tokenizer};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama")
}

struct Fixture {
    model: LlamaModel,
    tokenizer: Tokenizer,
    reference: SafetensorsSource,
    json: Value,
}

fn fixture() -> Fixture {
    let d = dir();
    let cfg = ModelConfig::from_file(&d.join("model/config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&d.join("model")).unwrap();
    let model = LlamaModel::load(&src, cfg, &Device::flex(), DType::F32).unwrap();
    let tokenizer = Tokenizer::from_dir(&d.join("model")).unwrap();
    let reference = SafetensorsSource::open_file(&d.join("reference.safetensors")).unwrap();
    let json =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    Fixture {
        model,
        tokenizer,
        reference,
        json,
    }
}

impl Fixture {
    fn floats(&self, name: &str) -> Vec<f32> {
        to_f32_vec(self.reference.load(name).unwrap().unwrap())
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        self.reference
            .load(name)
            .unwrap()
            .unwrap()
            .convert::<i64>()
            .try_to_vec()
            .unwrap()
    }

    fn conversation(&self) -> Vec<Message> {
        serde_json::from_value(self.json["conversation"].clone()).unwrap()
    }

    fn with_adapter(&self) -> LlamaModel {
        let mut m = self.model.clone();
        m.attach_adapter(&PeftAdapter::load(&dir().join("adapter")).unwrap())
            .unwrap();
        m
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ids_u32(v: &[i64]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

#[test]
fn chat_template_renders_the_reference_text_and_token_ids() {
    let f = fixture();
    let text = f.tokenizer.render(&f.conversation(), false).unwrap();
    assert_eq!(text, f.json["rendered_text"].as_str().unwrap());
    let enc = f.tokenizer.encode_chat(&f.conversation()).unwrap();
    assert_eq!(enc.ids, ids_u32(&f.ints("input_ids")));
}

#[test]
fn loss_mask_trains_assistant_content_and_its_end_of_turn_only() {
    let f = fixture();
    let enc = f.tokenizer.encode_chat(&f.conversation()).unwrap();
    let want: Vec<u8> = f.ints("loss_mask").iter().map(|&v| v as u8).collect();
    assert_eq!(enc.mask, want);
    assert_eq!(
        enc.trained(),
        f.json["sft"]["trained_tokens"].as_u64().unwrap() as usize
    );
}

fn check_logits(f: &Fixture, model: &LlamaModel, prefix: &str) {
    let ids = ids_u32(&f.ints("input_ids"));
    let t = ids.len();
    let logits = model.forward(&ids, 1, t);
    let first = to_f32_vec(logits.clone().slice([0..1, 0..t, 0..256]).into_data());
    let d1 = max_abs_diff(&first, &f.floats(&format!("{prefix}_logits_first256")));
    let vocab = model.config.vocab_size;
    let last = to_f32_vec(logits.clone().slice([0..1, t - 1..t, 0..vocab]).into_data());
    let d2 = max_abs_diff(&last, &f.floats(&format!("{prefix}_logits_last")));
    let lp = burn::tensor::activation::log_softmax(logits.reshape([t, vocab]), 1);
    let next: Vec<i64> = ids[1..].iter().map(|&i| i as i64).collect();
    let idx = Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(next, [t - 1, 1]),
        &model.device,
    );
    let got = to_f32_vec(
        lp.slice([0..t - 1, 0..vocab])
            .gather(1, idx)
            .reshape([t - 1])
            .into_data(),
    );
    let d3 = max_abs_diff(&got, &f.floats(&format!("{prefix}_next_token_logprobs")));
    println!("{prefix}: first256 {d1:e}, last {d2:e}, next-token logprobs {d3:e}");
    assert!(d1 < 1e-4 && d2 < 1e-4 && d3 < 1e-4, "{d1} {d2} {d3}");
}

#[test]
fn base_logits_and_logprobs_match_transformers_within_1e4() {
    let f = fixture();
    check_logits(&f, &f.model, "base");
}

#[test]
fn peft_adapter_logits_and_logprobs_match_within_1e4() {
    let f = fixture();
    let m = f.with_adapter();
    check_logits(&f, &m, "adapter");
}

#[test]
fn assistant_only_sft_loss_matches_within_1e4() {
    let f = fixture();
    let enc = f.tokenizer.encode_chat(&f.conversation()).unwrap();
    let pad = f.tokenizer.pad_id;
    let base = sft_loss(&f.model, std::slice::from_ref(&enc), 1, pad);
    let adapter = sft_loss(&f.with_adapter(), std::slice::from_ref(&enc), 1, pad);
    let sft = &f.json["sft"];
    let want_base = sft["assistant_only_mean_loss_base"].as_f64().unwrap();
    let want_adapter = sft["assistant_only_mean_loss_adapter"].as_f64().unwrap();
    println!(
        "base {} vs {want_base}, adapter {} vs {want_adapter}",
        base.mean(),
        adapter.mean()
    );
    assert_eq!(base.tokens, 34);
    assert!((base.mean() - want_base).abs() < 1e-4);
    assert!((adapter.mean() - want_adapter).abs() < 1e-4);
}

fn reference_pair(f: &Fixture) -> (EncodedPair, Value) {
    let dpo = f.json["dpo"].clone();
    let prompt: Vec<Message> = serde_json::from_value(dpo["prompt"].clone()).unwrap();
    let text = f.tokenizer.render(&prompt, true).unwrap();
    let pair = EncodedPair {
        prompt: f.tokenizer.encode(&text).unwrap(),
        chosen: f
            .tokenizer
            .encode_completion(dpo["chosen"].as_str().unwrap())
            .unwrap(),
        rejected: f
            .tokenizer
            .encode_completion(dpo["rejected"].as_str().unwrap())
            .unwrap(),
    };
    (pair, dpo)
}

#[test]
fn dpo_tokenisation_matches_the_reference_ids() {
    let f = fixture();
    let (pair, dpo) = reference_pair(&f);
    let ids = |k: &str| -> Vec<u32> { serde_json::from_value(dpo[k].clone()).unwrap() };
    assert_eq!(pair.prompt, ids("prompt_ids"));
    assert_eq!(pair.chosen, ids("chosen_ids"));
    assert_eq!(pair.rejected, ids("rejected_ids"));
}

#[test]
fn dpo_logps_loss_and_margin_match_within_1e4() {
    let f = fixture();
    let (pair, dpo) = reference_pair(&f);
    let (c, r) = pair.sequences();
    let batch = TokenBatch::pad(&[&c, &r], f.tokenizer.pad_id);
    let (policy, _) = sequence_logprobs(&f.with_adapter(), &batch);
    let (reference, _) = sequence_logprobs(&f.model, &batch);
    let logps = PairLogps {
        policy_chosen: policy[0],
        policy_rejected: policy[1],
        reference_chosen: reference[0],
        reference_rejected: reference[1],
    };
    let m = DpoMetrics::sigmoid(&[logps], dpo["beta"].as_f64().unwrap());
    let close = |got: f64, key: &str, tol: f64| {
        let want = dpo[key].as_f64().unwrap();
        println!("{key}: {got} vs {want}");
        assert!((got - want).abs() < tol, "{key}: {got} vs {want}");
    };
    // Sequence log-probabilities are sums of ~30 f32 terms of magnitude ~14.
    close(logps.policy_chosen, "policy_chosen_logp", 1e-3);
    close(logps.policy_rejected, "policy_rejected_logp", 1e-3);
    close(logps.reference_chosen, "reference_chosen_logp", 1e-3);
    close(logps.reference_rejected, "reference_rejected_logp", 1e-3);
    close(m.loss, "loss", 1e-4);
    close(m.reward_margin, "reward_margin", 1e-4);
}
