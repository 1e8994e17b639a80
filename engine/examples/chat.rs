//! Greedy chat with a model: `cargo run --release -p fedtune-engine --example chat -- MODEL "question"`.
use burn::tensor::{DType, Device};
use fedtune_engine::generate::{GenerationConfig, generate};
use fedtune_engine::{Message, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let t = std::time::Instant::now();
    let m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    eprintln!("loaded in {:?}", t.elapsed());
    let prompt = m
        .tokenizer
        .render(&[Message::new("user", &args[2])], true)?;
    let ids = m.tokenizer.encode(&prompt)?;
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        stop_ids: m.tokenizer.eos_id.into_iter().collect(),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let out = generate(&m.model, &ids, &cfg, |_| {});
    eprintln!("{} tokens in {:?}", out.len(), t.elapsed());
    println!("{}", m.tokenizer.decode(&out, true)?);
    Ok(())
}
