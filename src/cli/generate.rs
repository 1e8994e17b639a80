//! `fedtune generate`: text generation from a prompt, streamed to stdout.

use std::io::Write;

use clap::Args;
use fedtune_engine::device::{Backend, Device};
use fedtune_engine::generate::{GenerationConfig, generate};
use fedtune_engine::{Message, Tokenizer};

use super::common::{ModelArgs, QuantArgs};

/// Arguments of `fedtune generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    quant: QuantArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Top-p (nucleus) sampling.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Top-k sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `fedtune generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    match a.model.engine_device()? {
        Device::Cpu => {
            let m = a.model.load_quantized(a.quant.nf4())?;
            run_on(&a, &m.model, &m.tokenizer)
        }
        Device::Cuda(i) => {
            let (model, tokenizer) = a.model.load_cuda(i, a.quant.nf4())?;
            run_on(&a, &model, &tokenizer)
        }
    }
}

fn run_on<B: Backend>(a: &GenerateArgs, model: &B, tokenizer: &Tokenizer) -> anyhow::Result<()> {
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", a.prompt.clone()));
        tokenizer.render(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = if a.chat {
        tokenizer.encode(&text)?
    } else {
        tokenizer.encode_with_special(&text)?
    };
    let mut stop: Vec<u32> = model.config().eos_token_ids.clone();
    stop.extend(tokenizer.eos_id);
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_ids: stop,
    };
    let mut out = Vec::new();
    let mut printed = 0;
    let stdout = std::io::stdout();
    generate(model, &ids, &cfg, |id| {
        out.push(id);
        // Print the decoded suffix so multi-byte characters appear when complete.
        if let Ok(s) = tokenizer.decode(&out, true)
            && s.len() > printed
            && s.is_char_boundary(printed)
        {
            let mut lock = stdout.lock();
            let _ = lock.write_all(&s.as_bytes()[printed..]);
            let _ = lock.flush();
            printed = s.len();
        }
    });
    println!();
    Ok(())
}
