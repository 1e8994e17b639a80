//! The project's demo data split among clients, for tests and examples: client `k` holds one
//! site of `testdata/demo` (hospital, bank, helpdesk in turn), its first 32 examples to train
//! and its last 8 held out; a canary record can be planted in its training data.

use std::io::Write;
use std::path::Path;

use fedtune_client::trainer::LocalData;
use fedtune_engine::LoadedModel;
use fedtune_engine::data::{Dataset, LoadOptions};

/// The sites of `testdata/demo`.
pub const SITES: [&str; 3] = ["hospital", "bank", "helpdesk"];

/// Client `k`'s data from `repo/testdata/demo`, tokenised for `m`; with `canary`, one extra
/// training record contains it.
pub fn client_data(m: &LoadedModel, repo: &Path, k: usize, canary: Option<&str>) -> LocalData {
    let site = SITES[k % SITES.len()];
    let path = repo.join(format!("testdata/demo/{site}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    // A directory per call: concurrent tests must not read each other's half-written files.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("fedtune-demo-{}-{k}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let encode = |name: &str, lines: &[&str], canary: Option<&str>| {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).expect("temp file");
        for l in lines {
            writeln!(f, "{l}").expect("write");
        }
        if let Some(c) = canary {
            let rec = serde_json::json!({"messages": [
                {"role": "user", "content": format!("Patient id {c}, fever.")},
                {"role": "assistant", "content": serde_json::json!({"id": c}).to_string()},
            ]});
            writeln!(f, "{rec}").expect("write");
        }
        Dataset::load(&p, LoadOptions::default())
            .and_then(|d| d.encode_sft(&m.tokenizer, Some(256)))
            .expect("demo data encodes")
    };
    let _cleanup = RemoveOnDrop(dir.clone());
    let n = lines.len().saturating_sub(8);
    LocalData {
        train: encode("train.jsonl", &lines[..n], canary),
        eval: encode("eval.jsonl", &lines[n..], None),
        pad: m.tokenizer.pad_id,
        ..Default::default()
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
