//! LoRA / QLoRA SFT steps through the real trainer (forward, backward, clipping, AdamW) on
//! random ids, the second half of each row trained; prints one JSON line.
//!
//! `cargo run --release -p fedtune-engine --example bench_train -- MODEL [BATCH] [SEQ] [RANK] [STEPS] [lora|qlora|dora][-gc]`
//! (`-gc`: gradient checkpointing).
use burn::tensor::{DType, Device};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::sft::{LogEntry, SftRun, TrainerState, train_sft};
use fedtune_engine::train::{Callback, TrainConfig};
use fedtune_engine::{Encoded, load_model};
use rand::{Rng, SeedableRng};

struct Keep(Vec<f64>);

impl Callback for Keep {
    fn on_log(&mut self, e: &LogEntry, _: &TrainerState) {
        if let Some(t) = e.tokens_per_second {
            self.0.push(t);
        }
    }
}

fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, rank, steps) = (arg(2, 4), arg(3, 256), arg(4, 16), arg(5, 4));
    let mode = args.get(6).map_or("lora", String::as_str);
    let qlora = mode.starts_with("qlora");
    let dora = mode.starts_with("dora");
    let gc = mode.ends_with("-gc");
    // `lora-bf16`: the frozen base in bf16, as `--dtype bf16` (bf16 products with oneMKL).
    let bf16 = mode.ends_with("-bf16");
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let cfg = TrainConfig {
        lora_r: rank,
        lora_alpha: 2.0 * rank as f64,
        max_steps: Some(steps as u64),
        per_device_train_batch_size: batch,
        max_seq_length: seq,
        logging_steps: 1,
        load_in_4bit: qlora,
        bnb_4bit_use_double_quant: qlora,
        gradient_checkpointing: gc,
        use_dora: dora,
        ..TrainConfig::default()
    };
    if qlora {
        m.model.quantize_nf4(true);
    } else if bf16 {
        m.model.store_half(true);
    }
    let adapter = init_adapter(&m.model, &cfg);
    m.model.attach_weights(&adapter, 0.0)?;
    let vocab = m.model.config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let seqs: Vec<Encoded> = (0..batch * steps)
        .map(|_| Encoded {
            ids: (0..seq).map(|_| rng.random_range(0..vocab)).collect(),
            mask: (0..seq).map(|t| u8::from(t >= seq / 2)).collect(),
        })
        .collect();
    let run = SftRun {
        config: &cfg,
        train: &seqs,
        eval: &[],
        pad: 0,
        output: None,
        resume: None,
        cancel: None,
    };
    let mut keep = Keep(Vec::new());
    train_sft(&mut m.model, &run, &mut keep)?;
    // The first step pays one-time costs (allocation, page faults); report the rest.
    let rest = &keep.0[1.min(keep.0.len() - 1)..];
    let mut sorted = rest.to_vec();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("fedtune {mode}"),
            "batch": batch, "seq": seq, "rank": rank, "steps": rest.len(),
            "tokens_per_s": (sorted[sorted.len() / 2] * 10.0).round() / 10.0,
            "peak_rss_mb": peak_rss() / (1 << 20),
        })
    );
    Ok(())
}
