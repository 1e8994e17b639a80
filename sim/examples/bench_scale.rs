//! Scale of the in-memory simulator: N clients (tiny model, one local step each) for two
//! rounds; prints the coordinator's own time per round (its state machine only: checks,
//! persistence, aggregation, signing; client training excluded), the simulator's wall time per
//! round, and the process's peak RSS.
//!
//! `cargo run --release -p fedtune-sim --example bench_scale -- 10 100 1000`
//! (one process per N gives each its own peak RSS: run them one at a time).

use std::io::Write;
use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_sim::SimConfig;
use fedtune_sim::clinical::{HOSPITALS, prompt};
use fedtune_sim::run::{prepare_clients, run_memory};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("client counts"))
        .collect();
    let ns = if ns.is_empty() { vec![10] } else { ns };
    let m = fedtune_engine::load_model(
        &root.join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    for n in ns {
        // Two clinical notes per client: one to train on, one held out.
        let dir = std::env::temp_dir().join(format!("fedtune-scale-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("notes.jsonl");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for i in 0..2 * n {
            let h = &HOSPITALS[i % HOSPITALS.len()];
            let r = h.record(&mut rng);
            let rec = serde_json::json!({"messages": [
                {"role": "user", "content": prompt(&h.note(&r, &mut rng))},
                {"role": "assistant", "content": r.json()},
            ]});
            writeln!(f, "{rec}").unwrap();
        }
        drop(f);
        let text = format!(
            r#"
name = "scale"
seed = 1
clients = {n}
[model]
path = "{model}"
rank = 4
lora_alpha = 8
[data]
train = "{data}"
eval_fraction = 0.5
max_seq_length = 128
[sft]
rounds = 2
learning_rate = 1e-3
local_steps = 1
batch_size = 1
[strategy]
rule = {{ kind = "fed_avg_exact" }}
"#,
            model = root.join("testdata/tiny-llama/model").display(),
            data = data.display()
        );
        let cfg: SimConfig = toml::from_str(&text).unwrap();
        cfg.check().unwrap();
        let clients = prepare_clients(&cfg, &m).unwrap();
        let mut marks = vec![std::time::Instant::now()];
        let o = run_memory(&cfg, &m, clients, None, &mut |p| {
            if let fedtune_sim::run::Progress::Round { .. } = p {
                marks.push(std::time::Instant::now());
            }
        })
        .unwrap();
        for r in &o.rounds[1..] {
            let k = r["round"].as_u64().unwrap() as usize;
            println!(
                "clients {n:5}  round {k}  updates used {:5}  coordinator {:.3} s  round wall {:.1} s (training and evaluation included)",
                r["used"].as_array().unwrap().len(),
                r["coordinator_seconds"].as_f64().unwrap(),
                (marks[k + 1] - marks[k]).as_secs_f64(),
            );
        }
        println!("clients {n:5}  peak RSS {:.0} MiB", peak_rss_mib());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
