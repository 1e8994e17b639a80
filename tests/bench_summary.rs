//! `bench/gpu_summary.py`, which turns the GPU training benchmark's JSON lines into the table
//! of BENCHMARKS.md, on made-up input lines (this is a test of its arithmetic, not a result):
//! medians over rounds, the profiled run kept out of the timing, ratios, MFU against the
//! faster GEMM peak, the targets of issue #18, and the per-kernel table.

use std::process::Command;

const LINES: &str = r#"{"impl": "fedtune", "bench": "peak", "n": 8192, "tflops": 600.0, "device": "GPU"}
{"impl": "peer", "bench": "peak", "n": 8192, "tflops": 700.0, "device": "GPU"}
{"impl": "fedtune", "bench": "sft", "mode": "lora", "model": "/tmp/llama-1b", "batch": 8, "seq": 1024, "steps": 6, "seconds_per_step": 0.5, "tokens_per_s": 16384.0, "peak_gib": 12.0, "model_flops_per_step": 70000000000000.0, "device": "GPU"}
{"impl": "fedtune", "bench": "sft", "mode": "lora", "model": "/tmp/llama-1b/", "batch": 8, "seq": 1024, "steps": 6, "seconds_per_step": 0.25, "tokens_per_s": 32768.0, "peak_gib": 13.0, "model_flops_per_step": 70000000000000.0, "device": "GPU"}
{"impl": "fedtune", "bench": "sft", "mode": "lora", "model": "/tmp/llama-1b", "batch": 8, "seq": 1024, "steps": 3, "seconds_per_step": 9.0, "tokens_per_s": 1.0, "peak_gib": 99.0, "model_flops_per_step": 1.0, "profile": [{"name": "attention_fwd", "calls": 48, "ms": 30.0, "share": 0.6}, {"name": "gemm BF16<-BF16 8192x2048x2048", "calls": 96, "ms": 20.0, "share": 0.4}]}
{"impl": "peer", "bench": "sft", "mode": "lora", "model": "/tmp/llama-1b", "batch": 8, "seq": 1024, "steps": 6, "seconds_per_step": 1.0, "tokens_per_s": 8192.0, "peak_gib": 20.0, "peer": "torch+transformers+peft"}
{"impl": "peer", "bench": "sft", "mode": "lora", "model": "/tmp/llama-1b", "batch": 8, "seq": 1024, "steps": 6, "seconds_per_step": 1.0, "tokens_per_s": 8192.0, "peak_gib": 21.0, "peer": "torch+transformers+peft"}
{"impl": "fedtune", "bench": "dpo", "mode": "lora", "model": "/tmp/llama-1b", "batch": 4, "seq": 1024, "steps": 6, "seconds_per_step": 1.0, "pairs_per_s": 4.0, "tokens_per_s": 8192.0, "peak_gib": 10.0}
{"impl": "peer", "bench": "dpo", "mode": "lora", "model": "/tmp/llama-1b", "batch": 4, "seq": 1024, "steps": 6, "seconds_per_step": 1.0, "pairs_per_s": 2.5, "tokens_per_s": 5120.0, "peak_gib": 30.0, "peer": "hand"}
{"impl": "fedtune", "bench": "sft", "mode": "qlora-gc", "model": "/tmp/llama-8b", "batch": 1, "seq": 2048, "steps": 3, "seconds_per_step": 1.0, "tokens_per_s": 2048.0, "peak_gib": 21.5}
{"impl": "peer", "bench": "sft", "mode": "qlora-gc", "model": "/tmp/llama-8b", "batch": 1, "seq": 2048, "steps": 3, "seconds_per_step": 1.0, "tokens_per_s": 1024.0, "peak_gib": 30.0}
"#;

fn summarise(lines: &str) -> (bool, String, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fedtune-bench-summary-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("results.jsonl");
    let md = dir.join("summary.md");
    std::fs::write(&input, lines).unwrap();
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/gpu_summary.py"))
        .arg(&input)
        .arg(&md)
        .output()
        .expect("python3 runs bench/gpu_summary.py");
    let written = std::fs::read_to_string(&md).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        written + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_summary_pairs_rounds_and_checks_the_targets() {
    let (ok, stdout, written) = summarise(LINES);
    assert!(ok, "{stdout}{written}");
    assert!(written.contains("| sft lora |"), "{written}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row {name}:\n{stdout}"))
            .to_string()
    };
    // Median of 16384 and 32768 tokens/s against 8192; the profiled run (1 token/s) left out;
    // memory is the larger of the rounds: 13 / 21.
    let sft = row("sft lora");
    assert!(sft.contains("24576.0 tok/s"), "{sft}");
    assert!(sft.contains("**3.00x**"), "{sft}");
    assert!(sft.contains("13.00 / 21.00 (0.62x)"), "{sft}");
    // 7e13 FLOPs in the median 0.375 s = 187 TFLOP/s, 27 % of the faster peak (700).
    assert!(sft.contains("187 (27 %)"), "{sft}");
    // Fast enough but 0.62x memory > 0.6x: not met.
    assert!(sft.ends_with("| not met |"), "{sft}");
    let dpo = row("dpo lora");
    assert!(
        dpo.contains("**1.60x**") && dpo.ends_with("| not met |"),
        "{dpo}"
    );
    // Twice the peer's speed, but 21.5 GiB > 20 GiB.
    let q = row("sft qlora-gc");
    assert!(q.contains("**2.00x**") && q.ends_with("| not met |"), "{q}");
    assert!(
        stdout.contains("| `attention_fwd` | 48 | 30.00 | 60.0 % |"),
        "{stdout}"
    );
}

#[test]
fn a_target_is_met_and_a_missing_peer_is_an_error() {
    let met = LINES.replace(r#""peak_gib": 13.0"#, r#""peak_gib": 12.5"#);
    let (ok, stdout, _) = summarise(&met);
    assert!(ok);
    let sft = stdout
        .lines()
        .find(|l| l.starts_with("| sft lora |"))
        .unwrap();
    assert!(sft.ends_with("| met |"), "{sft}");
    let ours_only: String = LINES
        .lines()
        .filter(|l| !l.contains(r#""impl": "peer""#))
        .map(|l| format!("{l}\n"))
        .collect();
    let (ok, _, err) = summarise(&ours_only);
    assert!(!ok);
    assert!(err.contains("no benchmark with both"), "{err}");
}
