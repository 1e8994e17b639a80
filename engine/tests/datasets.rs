//! The dataset loader on one small file per format (`testdata/formats`), its errors, and the
//! tokenisation of each format.

use std::path::PathBuf;

use fedtune_engine::Tokenizer;
use fedtune_engine::data::{Dataset, Example, Format, LoadOptions, Prompt};

fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/formats")
        .join(name)
}

fn load(name: &str) -> Dataset {
    Dataset::load(&file(name), LoadOptions::default()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model"),
    )
    .unwrap()
}

fn chat(ex: &Example) -> &[fedtune_engine::Message] {
    match ex {
        Example::Chat { messages, .. } => messages,
        other => panic!("not a chat: {other:?}"),
    }
}

#[test]
fn alpaca_json_array_becomes_chats_with_system_and_history() {
    let d = load("alpaca.json");
    assert_eq!(d.len(), 2);
    assert_eq!(d.examples[1].0, 7, "records carry the line they start on");
    let m = chat(&d.examples[0].1);
    assert_eq!(m[0].content, "Extract the age.\nNote: 54-year-old male.");
    assert_eq!(m[1].role, "assistant");
    let m = chat(&d.examples[1].1);
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(m[3].content, "Say hello.", "an empty input adds nothing");
}

#[test]
fn dolly_sharegpt_openai_and_csv_are_detected() {
    assert_eq!(
        chat(&load("dolly.jsonl").examples[0].1)[0].content,
        "Summarise.\nThe patient has a fever."
    );
    let s = load("sharegpt.jsonl");
    let m = chat(&s.examples[0].1);
    assert_eq!(
        (m[0].role.as_str(), m[1].role.as_str(), m[2].role.as_str()),
        ("system", "user", "assistant")
    );
    let o = load("openai.jsonl");
    assert_eq!(
        chat(&o.examples[1].1)[0].content,
        "Hi",
        "content parts are joined"
    );
    let c = load("alpaca.csv");
    assert_eq!(chat(&c.examples[0].1)[1].content, "M");
    assert_eq!(c.examples[0].0, 2);
}

#[test]
fn prompt_completion_text_and_conversational_forms() {
    let d = load("prompt_completion.jsonl");
    assert!(
        matches!(&d.examples[0].1, Example::PromptCompletion { completion, .. } if completion == " Paris.")
    );
    assert!(matches!(
        &d.examples[1].1,
        Example::Chat { train_from: 1, .. }
    ));
    assert!(matches!(
        &load("text.jsonl").examples[0].1,
        Example::Text { .. }
    ));
}

#[test]
fn preference_pairs_in_every_form() {
    let d = load("prefs.jsonl");
    assert!(d.is_preference());
    match &d.examples[0].1 {
        Example::Preference {
            prompt: Prompt::Chat(p),
            chosen,
            ..
        } => {
            assert_eq!(p.len(), 1);
            assert_eq!(chosen, "{\"age\": 71}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        &d.examples[1].1,
        Example::Preference {
            prompt: Prompt::Text(_),
            ..
        }
    ));
    match &d.examples[2].1 {
        Example::Preference {
            prompt: Prompt::Chat(p),
            rejected,
            ..
        } => {
            assert_eq!(p[0].content, "Hi", "implicit prompt is the shared prefix");
            assert_eq!(rejected, "Go away.");
        }
        other => panic!("{other:?}"),
    }
    let s = load("sharegpt_prefs.json");
    assert!(
        s.is_preference(),
        "LLaMA-Factory's ShareGPT preference layout"
    );
}

#[test]
fn errors_name_file_line_and_field() {
    let err = Dataset::load(&file("bad.jsonl"), LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.jsonl:2") && msg.contains("`output`"),
        "{msg}"
    );
    let skipped = Dataset::load(
        &file("bad.jsonl"),
        LoadOptions {
            format: None,
            skip_invalid: true,
        },
    )
    .unwrap();
    assert_eq!(skipped.len(), 2);
    let reasons: Vec<String> = skipped.skipped.iter().map(|e| e.to_string()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(":3:") && r.contains("no assistant message"))
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(":4:") && r.contains("invalid JSON"))
    );
    let forced = Dataset::load(
        &file("alpaca.json"),
        LoadOptions {
            format: Some(Format::Text),
            skip_invalid: false,
        },
    )
    .unwrap_err();
    assert!(forced.to_string().contains("`text`"), "{forced}");
}

#[test]
fn tokenisation_trains_only_answers() {
    let tok = tokenizer();
    let d = load("prompt_completion.jsonl");
    let enc = d.encode_sft(&tok, None).unwrap();
    let trained: Vec<u32> = enc[0]
        .ids
        .iter()
        .zip(&enc[0].mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), " Paris.<|im_end|>");
    let trained: Vec<u32> = enc[1]
        .ids
        .iter()
        .zip(&enc[1].mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), "Rome.<|im_end|>");
    let t = load("text.jsonl").encode_sft(&tok, Some(3)).unwrap();
    assert_eq!(t[0].ids.len(), 3, "max_len truncates");
    let (pairs, trunc) = load("prefs.jsonl")
        .encode_pairs(&tok, Some(4), Some(6))
        .unwrap();
    assert!(
        pairs
            .iter()
            .all(|p| p.prompt.len() <= 4 && p.prompt.len() + p.chosen.len() <= 6)
    );
    assert!(trunc.prompts >= 2, "{trunc:?}");
}

/// Unpaired feedback (TRL's KTO format) is detected from `label` + `completion`; a label that
/// is not a boolean names its line and field; SFT refuses it; preference pairs unpair into a
/// desirable and an undesirable example, as TRL unpairs them.
#[test]
fn unpaired_feedback_is_detected_checked_and_unpaired_from_pairs() {
    let dir = std::env::temp_dir().join(format!("fedtune-feedback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"prompt\": \"Q: 2+2?\\nA:\", \"completion\": \" 4\", \"label\": true}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"completion\": \"Go away.\", \"label\": false}\n",
    )
    .unwrap();
    let d = Dataset::load(&good, LoadOptions::default()).unwrap();
    assert!(matches!(
        &d.examples[0].1,
        Example::Feedback {
            prompt: Prompt::Text(_),
            label: true,
            ..
        }
    ));
    assert!(matches!(
        &d.examples[1].1,
        Example::Feedback {
            prompt: Prompt::Chat(_),
            label: false,
            ..
        }
    ));
    let tok = tokenizer();
    let (fb, dropped) = d.encode_feedback(&tok, 1024).unwrap();
    assert_eq!((fb.len(), dropped), (2, 0));
    // Text: the completion gets EOS; chat: it ends with the template's end of turn.
    assert_eq!(fb[0].completion.last().copied(), tok.eos_id);
    assert!(
        tok.decode(&fb[1].completion, false)
            .unwrap()
            .contains("Go away.<|im_end|>")
    );
    // A prompt that fills max_length is dropped, as TRL drops it.
    assert_eq!(d.encode_feedback(&tok, 3).unwrap(), (Vec::new(), 2));
    let sft = d.encode_sft(&tok, None).unwrap_err().to_string();
    assert!(
        sft.contains("good.jsonl:1") && sft.contains("train kto"),
        "{sft}"
    );
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\n\
         {\"prompt\": \"a\", \"completion\": \"b\", \"label\": \"yes\"}\n",
    )
    .unwrap();
    let err = Dataset::load(&bad, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`label`"),
        "{err}"
    );
    let pairs = load("prefs.jsonl");
    let (fb, _) = pairs.encode_feedback(&tok, 1024).unwrap();
    assert_eq!(fb.len(), 2 * pairs.len());
    assert!(
        fb.chunks(2)
            .all(|p| p[0].label && !p[1].label && p[0].prompt == p[1].prompt)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
