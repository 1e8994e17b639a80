//! `fedtune merge` against mergekit's output and `fedtune merge-adapters` on PEFT adapters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fedtune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap()
}

fn f32s(view: &TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes the reference tensor `key` as a one-tensor file with the name `weight`.
fn split(st: &SafeTensors<'_>, key: &str, dir: &Path) -> PathBuf {
    let v = st.tensor(key).unwrap();
    let view = TensorView::new(Dtype::F32, v.shape().to_vec(), v.data()).unwrap();
    let path = dir.join(format!("{key}.safetensors"));
    safetensors::serialize_to_file([("model.weight", view)], None, &path).unwrap();
    path
}

#[test]
fn merge_ties_reproduces_mergekit() {
    let bytes = std::fs::read(testdata().join("merge/merge_reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = tmpdir("merge");
    let base = split(&st, "base", &dir);
    let clients: Vec<PathBuf> = (0..3)
        .map(|i| split(&st, &format!("client{i}"), &dir))
        .collect();
    let out = dir.join("out.safetensors");
    let mut args: Vec<String> = ["merge", "--method", "ties", "--base"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(base.display().to_string());
    args.extend(["--weights", "0.5,0.3,0.2", "--density", "0.4", "--output"].map(String::from));
    args.push(out.display().to_string());
    args.extend(clients.iter().map(|c| c.display().to_string()));
    let res = fedtune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got_bytes = std::fs::read(&out).unwrap();
    let got = SafeTensors::deserialize(&got_bytes).unwrap();
    let got = f32s(&got.tensor("model.weight").unwrap());
    let want = f32s(&st.tensor("ties").unwrap());
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-6, "{d}");
    // The same merge as a mergekit user writes it: per-model weight and density, paths
    // relative to the YAML file.
    let yaml = format!(
        "merge_method: ties\nbase_model: base.safetensors\nmodels:\n{}parameters:\n  normalize: true\ndtype: float32\n",
        clients
            .iter()
            .zip([0.5, 0.3, 0.2])
            .map(|(c, w)| format!(
                "  - model: {}\n    parameters: {{weight: {w}, density: 0.4}}\n",
                c.file_name().unwrap().to_str().unwrap()
            ))
            .collect::<String>()
    );
    std::fs::write(dir.join("ties.yml"), yaml).unwrap();
    let out_yaml = dir.join("yaml.safetensors");
    let res = fedtune(&[
        "merge",
        "--config",
        dir.join("ties.yml").to_str().unwrap(),
        "--output",
        out_yaml.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let yaml_bytes = std::fs::read(&out_yaml).unwrap();
    let from_yaml = SafeTensors::deserialize(&yaml_bytes).unwrap();
    assert_eq!(f32s(&from_yaml.tensor("model.weight").unwrap()), got);
}

#[test]
fn merge_rejects_mismatched_inputs_naming_the_tensor() {
    let bytes = std::fs::read(testdata().join("merge/merge_reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = tmpdir("merge-bad");
    let base = split(&st, "base", &dir);
    let other = dir.join("other.safetensors");
    let data = vec![0u8; 4 * 6];
    let view = TensorView::new(Dtype::F32, vec![2, 3], &data).unwrap();
    safetensors::serialize_to_file([("model.weight", view)], None, &other).unwrap();
    let res = fedtune(&[
        "merge",
        "--method",
        "linear",
        "--base",
        base.to_str().unwrap(),
        // `--out`, the older name of `--output` (the error below is the merge's own).
        "--out",
        dir.join("o.safetensors").to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("model.weight") && err.contains("shape"),
        "{err}"
    );
}

fn eval_loss(adapter: &Path) -> f64 {
    let t = testdata().join("tiny-llama");
    let out = fedtune(&[
        "eval",
        "--model",
        t.join("model").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        t.join("conversation.jsonl").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn merge_adapters_of_copies_gives_back_the_adapter() {
    let adapter = testdata().join("tiny-llama/adapter");
    let want = eval_loss(&adapter);
    // `fed_avg_exact`: the strategy's TOML spelling works on the command line too.
    for method in [
        "fedavg-exact",
        "fed_avg_exact",
        "fedavg-factors",
        "median",
        "ties",
    ] {
        let out = tmpdir(&format!("ma-{method}"));
        let res = fedtune(&[
            "merge-adapters",
            "--method",
            method,
            "--density",
            "1.0",
            "--output",
            out.to_str().unwrap(),
            adapter.to_str().unwrap(),
            adapter.to_str().unwrap(),
            adapter.to_str().unwrap(),
        ]);
        assert!(
            res.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let cfg: HashMap<String, serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        let got = eval_loss(&out);
        assert!((got - want).abs() < 1e-4, "{method}: {got} vs {want}");
    }
}

/// A copy of the tiny adapter with only the q/v projections' factors.
fn qv_only(dir: &Path) -> PathBuf {
    let src = testdata().join("tiny-llama/adapter");
    let out = dir.join("qv");
    std::fs::create_dir_all(&out).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.contains("q_proj") || k.contains("v_proj"))
        .collect();
    assert!(!kept.is_empty());
    safetensors::serialize_to_file(kept, None, &out.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
    out
}

#[test]
fn merge_adapters_with_other_modules_is_an_error_unless_asked_to_skip() {
    let dir = tmpdir("ma-mismatch");
    let full = testdata().join("tiny-llama/adapter");
    let qv = qv_only(&dir);
    let out = dir.join("merged");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "merge-adapters",
            "--method",
            "fedavg-exact",
            "--output",
            out.to_str().unwrap(),
            full.to_str().unwrap(),
            qv.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        fedtune(&v)
    };
    let res = args(&[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        err.contains(qv.to_str().unwrap()) && err.contains("--skip-invalid"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    let res = args(&["--skip-invalid"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("skipped"), "{err}");
    let got = eval_loss(&out);
    let want = eval_loss(&full);
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `merge` reads Hugging Face model directories and writes one, with the base's config and
/// tokenizer: task arithmetic of the model exported with the adapter (λ = 1) against the base
/// is that exported model again, and it loads and evaluates as base + adapter does.
#[test]
fn merge_reads_and_writes_model_directories() {
    let dir = tmpdir("merge-dirs");
    let t = testdata().join("tiny-llama");
    let (base, adapter) = (t.join("model"), t.join("adapter"));
    let exported = dir.join("exported");
    let res = fedtune(&[
        "export",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        exported.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let out = dir.join("merged");
    let res = fedtune(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        base.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        exported.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(
            out.join(f).is_file(),
            "{f} missing from the merged directory"
        );
    }
    let data = t.join("conversation.jsonl");
    let eval = |model: &Path, adapter: Option<&Path>| -> f64 {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let out = fedtune(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
                .unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (got, want) = (eval(&out, None), eval(&base, Some(&adapter)));
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Model B of the SLERP reference: every tensor of the tiny model rolled by one along its last
/// axis and multiplied by 0.75 (exact in f32, as `make_slerp_reference.py` builds it).
fn model_b(dir: &Path) -> PathBuf {
    let src = testdata().join("tiny-llama/model");
    let out = dir.join("b");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), out.join(f)).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        let vals = f32s(&v);
        let last = *v.shape().last().unwrap();
        let rolled: Vec<f32> = vals
            .chunks(last)
            .flat_map(|row| (0..last).map(move |j| row[(j + last - 1) % last] * 0.75))
            .collect();
        tensors.push((
            name,
            v.shape().to_vec(),
            rolled.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

/// Compares a merged model with mergekit's SLERP reference: each tensor's first two rows and
/// last row within 1e-6, and the sum of all its values.
fn check_slerp(merged: &Path) {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("merge/slerp_reference.json")).unwrap(),
    )
    .unwrap();
    let ref_bytes = std::fs::read(testdata().join("merge/slerp_reference.safetensors")).unwrap();
    let rows = SafeTensors::deserialize(&ref_bytes).unwrap();
    let bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let sums = reference["sums"].as_object().unwrap();
    assert_eq!(st.names().len(), sums.len());
    let mut worst = 0f32;
    for (name, want_sum) in sums {
        let v = st.tensor(name).unwrap();
        let vals = f32s(&v);
        let cols = if v.shape().len() > 1 {
            *v.shape().last().unwrap()
        } else {
            vals.len()
        };
        let want = f32s(&rows.tensor(name).unwrap());
        let n = vals.len() / cols;
        let got: Vec<f32> = vals[..2.min(n) * cols]
            .iter()
            .chain(&vals[(n - 1) * cols..])
            .copied()
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
            assert!((g - w).abs() <= 1e-6, "{name}: {g} vs mergekit {w}");
        }
        let sum: f64 = vals.iter().map(|x| f64::from(*x)).sum();
        let want_sum = want_sum.as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-6 * vals.len() as f64,
            "{name}: sum {sum} vs mergekit {want_sum}"
        );
    }
    println!("SLERP vs mergekit 0.1.5: largest difference {worst:e}");
}

/// `fedtune merge --config slerp.yml` (mergekit's own file, paths filled in) reproduces
/// mergekit 0.1.5's SLERP with per-filter t gradients, and the same merge from flags too.
#[test]
fn slerp_from_mergekits_yaml_reproduces_mergekit() {
    let dir = tmpdir("slerp");
    let a = testdata().join("tiny-llama/model");
    let b = model_b(&dir);
    let yaml = std::fs::read_to_string(testdata().join("merge/slerp.yml"))
        .unwrap()
        .replace("MODEL_A", a.to_str().unwrap())
        .replace("MODEL_B", b.to_str().unwrap());
    let cfg = dir.join("slerp.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join("merged");
    let o = fedtune(&[
        "merge",
        "--config",
        cfg.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_slerp(&out);
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    // The same with flags.
    let flags = dir.join("flags");
    let o = fedtune(&[
        "merge",
        "--method",
        "slerp",
        "--base",
        a.to_str().unwrap(),
        "--t",
        "self_attn=0.2,0.9",
        "--t",
        "mlp=0.8,0.3",
        "--t",
        "0.4",
        b.to_str().unwrap(),
        "--output",
        flags.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_slerp(&flags);
    // Mistakes name the key.
    for (bad, what) in [
        ("merge_method: slerp\nbase_model: A\nmodelz: []\n", "modelz"),
        (
            "merge_method: slerp\nbase_model: MODEL_A\nmodels:\n  - model: MODEL_A\n  - model: MODEL_B\n",
            "needs t",
        ),
        (
            "merge_method: ties\nbase_model: MODEL_A\nmodels:\n  - model: MODEL_B\n    parameters: {weight: 1, epsilon: 0.1}\n",
            "epsilon",
        ),
        (
            "merge_method: slerp\nbase_model: /nowhere/model\nmodels: [{model: MODEL_B}]\nparameters: {t: 0.5}\n",
            "/nowhere/model",
        ),
    ] {
        std::fs::write(
            &cfg,
            bad.replace("MODEL_A", a.to_str().unwrap())
                .replace("MODEL_B", b.to_str().unwrap()),
        )
        .unwrap();
        let o = fedtune(&[
            "merge",
            "--config",
            cfg.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(what), "{what}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// mergekit's gradients: `evaluate_setting` values recorded from mergekit 0.1.5 itself.
#[test]
fn gradients_interpolate_as_mergekit_evaluates_them() {
    use fedtune_aggregation::slerp::Setting;
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("merge/slerp_reference.json")).unwrap(),
    )
    .unwrap();
    let g = Setting::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
    let cases = reference["gradient_0_.5_.3_.7_1"].as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (t, want) in cases {
        let got = g
            .at("model.layers.0.self_attn.q_proj.weight", t.parse().unwrap())
            .unwrap();
        let want = want[0].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "t {t}: {got} vs mergekit {want}"
        );
    }
}

/// Every tensor of a merged model directory against `<case>/<name>` in mergekit's reference;
/// returns the largest difference.
fn check_against(merged: &Path, reference: &SafeTensors<'_>, case: &str) -> f32 {
    let bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prefix = format!("{case}/");
    let names: Vec<String> = reference
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
        .collect();
    assert_eq!(st.names().len(), names.len(), "{case}");
    let mut worst = 0f32;
    for name in names {
        let got = f32s(&st.tensor(&name).unwrap());
        let want = f32s(&reference.tensor(&format!("{prefix}{name}")).unwrap());
        assert_eq!(got.len(), want.len(), "{case} {name}");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
            assert!((g - w).abs() <= 1e-6, "{case} {name}: {g} vs mergekit {w}");
        }
    }
    worst
}

/// mergekit users' YAML files for breadcrumbs, breadcrumbs_ties and model_stock (plain and
/// filter-wise) give mergekit 0.1.5's tensors (`testdata/merge/make_methods_reference.py`),
/// and so do the same merges written as flags.
#[test]
fn breadcrumbs_and_model_stock_reproduce_mergekit() {
    let micro = testdata().join("merge/micro");
    let ref_bytes = std::fs::read(testdata().join("merge/methods_reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&ref_bytes).unwrap();
    let dir = tmpdir("merge-methods");
    for case in [
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "model_stock_filter_wise",
    ] {
        let out = dir.join(case);
        let o = fedtune(&[
            "merge",
            "--config",
            micro.join(format!("{case}.yml")).to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let worst = check_against(&out, &reference, case);
        println!("{case} vs mergekit 0.1.5: largest difference {worst:e}");
        assert!(out.join("config.json").is_file());
    }
    let (base, b, c) = (micro.join("base"), micro.join("b"), micro.join("c"));
    let flag_cases: [(&str, Vec<&str>); 3] = [
        (
            "breadcrumbs",
            vec![
                "--method",
                "breadcrumbs",
                "--weights",
                "0.6,0.4",
                "--density",
                "0.5",
                "--gamma",
                "0.05",
            ],
        ),
        (
            "breadcrumbs_ties",
            vec![
                "--method",
                "breadcrumbs-ties",
                "--weights",
                "0.7,0.5",
                "--density",
                "0.6",
                "--gamma",
                "0.1",
                "--normalize",
                "true",
                "--lambda",
                "0.9",
            ],
        ),
        (
            "model_stock_filter_wise",
            vec!["--method", "model_stock", "--filter-wise"],
        ),
    ];
    for (case, flags) in flag_cases {
        let out = dir.join(format!("{case}-flags"));
        let mut args = vec!["merge", "--base", base.to_str().unwrap()];
        args.extend(flags);
        args.extend([
            b.to_str().unwrap(),
            c.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let o = fedtune(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        check_against(&out, &reference, case);
    }
    // Model Stock needs two models besides the base.
    let o = fedtune(&[
        "merge",
        "--method",
        "model_stock",
        "--base",
        base.to_str().unwrap(),
        b.to_str().unwrap(),
        "--output",
        dir.join("one").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("at least two"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mergekit DARE file's `density` is the keep probability: half of each task vector is
/// dropped, so about a quarter of the elements of a two-model merge stay at the base.
#[test]
fn dare_density_from_yaml_drops_elements() {
    let micro = testdata().join("merge/micro");
    let dir = tmpdir("merge-dare");
    let cfg = dir.join("dare.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: dare_linear\nbase_model: {0}/base\nmodels:\n  - model: {0}/b\n  - model: {0}/c\nparameters:\n  density: 0.5\n  weight: 0.5\n",
            micro.display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let o = fedtune(&[
        "merge",
        "--config",
        cfg.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = std::fs::read(out.join("model.safetensors")).unwrap();
    let merged = SafeTensors::deserialize(&merged).unwrap();
    let base = std::fs::read(micro.join("base/model.safetensors")).unwrap();
    let base = SafeTensors::deserialize(&base).unwrap();
    let (mut same, mut total) = (0usize, 0usize);
    for name in base.names() {
        let (m, b) = (
            f32s(&merged.tensor(name).unwrap()),
            f32s(&base.tensor(name).unwrap()),
        );
        same += m.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += b.len();
    }
    let share = same as f64 / total as f64;
    assert!(
        (0.2..0.3).contains(&share),
        "{share} of the elements kept the base"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
