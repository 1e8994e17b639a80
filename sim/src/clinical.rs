//! A seeded generator of synthetic clinical notes (no real patient data) for the quickstart:
//! each hospital has its own specialty, note style and field distributions (non-IID). The task
//! is to turn a note into a JSON object with fixed fields; preference pairs put the correct
//! JSON against a verbose, wrong or broken answer.

use std::io::Write;
use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The extraction instruction every prompt starts with.
pub const INSTRUCTION: &str = "Extract age, sex, complaint, diagnosis, medication and \
disposition from this clinical note. Answer with JSON only.";

/// The fields of a record, in answer order.
pub const FIELDS: [&str; 6] = [
    "age",
    "sex",
    "complaint",
    "diagnosis",
    "medication",
    "disposition",
];

/// A patient record: what the note says and the JSON must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Years.
    pub age: u32,
    /// `M` or `F`.
    pub sex: &'static str,
    /// Chief complaint.
    pub complaint: &'static str,
    /// Diagnosis.
    pub diagnosis: &'static str,
    /// Medication.
    pub medication: &'static str,
    /// `admit`, `discharge`, `transfer` or `follow-up`.
    pub disposition: &'static str,
}

impl Record {
    /// The answer: compact JSON in field order.
    pub fn json(&self) -> String {
        format!(
            r#"{{"age": {}, "sex": "{}", "complaint": "{}", "diagnosis": "{}", "medication": "{}", "disposition": "{}"}}"#,
            self.age, self.sex, self.complaint, self.diagnosis, self.medication, self.disposition
        )
    }
}

/// A case: complaint, diagnosis, medication.
type Case = (&'static str, &'static str, &'static str);

/// A hospital: its cases, ages, dispositions and note style.
pub struct Hospital {
    /// File-safe name.
    pub name: &'static str,
    cases: &'static [Case],
    ages: (u32, u32),
    /// Dispositions with weights.
    dispositions: &'static [(&'static str, u32)],
    style: fn(&Record, &mut ChaCha8Rng) -> String,
}

fn pick_weighted(rng: &mut ChaCha8Rng, items: &[(&'static str, u32)]) -> &'static str {
    let total: u32 = items.iter().map(|i| i.1).sum();
    let mut x = rng.random_range(0..total);
    for (s, w) in items {
        if x < *w {
            return s;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

fn sex_word(r: &Record, rng: &mut ChaCha8Rng) -> &'static str {
    match (r.sex, rng.random_bool(0.5)) {
        ("M", true) => "male",
        ("M", false) => "man",
        (_, true) => "female",
        _ => "woman",
    }
}

fn cardiology(r: &Record, rng: &mut ChaCha8Rng) -> String {
    let bp = format!(
        "{}/{}",
        rng.random_range(110..190),
        rng.random_range(60..110)
    );
    let days = rng.random_range(1..6);
    let dispo = match r.disposition {
        "admit" => "admit to CCU",
        "discharge" => "d/c home",
        "transfer" => "transfer to cath lab at regional center",
        _ => "f/u cardiology clinic 2 wks",
    };
    format!(
        "{}{} c/o {} x{}d. BP {}. Dx: {}. Rx: {}. Dispo: {}.",
        r.age, r.sex, r.complaint, days, bp, r.diagnosis, r.medication, dispo
    )
}

fn pediatrics(r: &Record, rng: &mut ChaCha8Rng) -> String {
    let child = match r.sex {
        "M" => "boy",
        _ => "girl",
    };
    let who = ["mother", "father", "grandmother"]
        .choose(rng)
        .expect("non-empty");
    let dispo = match r.disposition {
        "admit" => "We admitted the child to the ward for observation.",
        "discharge" => "The child was sent home with the family.",
        "transfer" => "The child was transferred to the children's hospital.",
        _ => "A follow-up visit was booked for next week.",
    };
    format!(
        "A {}-year-old {child} was brought in by the {who} because of {}. After examination \
         we diagnosed {} and started {}. {dispo}",
        r.age, r.complaint, r.diagnosis, r.medication
    )
}

fn oncology(r: &Record, rng: &mut ChaCha8Rng) -> String {
    let cycle = rng.random_range(1..7);
    let dispo = match r.disposition {
        "admit" => "Admit for supportive care.",
        "discharge" => "Discharge; continue at home.",
        "transfer" => "Transfer to hospice unit.",
        _ => "Follow-up in oncology clinic after next cycle.",
    };
    format!(
        "S: {} y/o {} on cycle {cycle} of chemotherapy reports {}. O: afebrile, ECOG {}. \
         A: {}. P: {}. {dispo}",
        r.age,
        sex_word(r, rng),
        r.complaint,
        rng.random_range(0..3),
        r.diagnosis,
        r.medication
    )
}

fn emergency(r: &Record, rng: &mut ChaCha8Rng) -> String {
    let triage = rng.random_range(1..5);
    format!(
        "TRIAGE {triage} | AGE {} | SEX {} | CC: {} | IMPRESSION: {} | MEDS GIVEN: {} | DISPOSITION: {}",
        r.age,
        r.sex,
        r.complaint.to_uppercase(),
        r.diagnosis.to_uppercase(),
        r.medication.to_uppercase(),
        r.disposition.to_uppercase()
    )
}

/// The quickstart's hospitals.
pub const HOSPITALS: [Hospital; 4] = [
    Hospital {
        name: "st-mary-cardiology",
        cases: &[
            ("chest pain", "unstable angina", "aspirin"),
            ("chest pain", "NSTEMI", "heparin"),
            ("palpitations", "atrial fibrillation", "metoprolol"),
            ("shortness of breath", "heart failure", "furosemide"),
            ("dizziness", "bradycardia", "atropine"),
            ("leg swelling", "heart failure", "furosemide"),
        ],
        ages: (45, 90),
        dispositions: &[
            ("admit", 5),
            ("discharge", 2),
            ("transfer", 2),
            ("follow-up", 2),
        ],
        style: cardiology,
    },
    Hospital {
        name: "riverside-pediatrics",
        cases: &[
            ("fever", "otitis media", "amoxicillin"),
            ("cough", "bronchiolitis", "salbutamol"),
            ("rash", "chickenpox", "calamine lotion"),
            ("sore throat", "strep throat", "penicillin"),
            ("vomiting", "gastroenteritis", "oral rehydration salts"),
            ("wheezing", "asthma", "salbutamol"),
        ],
        ages: (1, 15),
        dispositions: &[
            ("discharge", 6),
            ("admit", 2),
            ("follow-up", 3),
            ("transfer", 1),
        ],
        style: pediatrics,
    },
    Hospital {
        name: "northgate-oncology",
        cases: &[
            ("fatigue", "anemia", "epoetin"),
            ("nausea", "chemotherapy-induced nausea", "ondansetron"),
            ("fever", "neutropenic fever", "cefepime"),
            ("bone pain", "bone metastases", "morphine"),
            ("mouth sores", "mucositis", "lidocaine rinse"),
        ],
        ages: (35, 85),
        dispositions: &[
            ("follow-up", 5),
            ("admit", 3),
            ("discharge", 2),
            ("transfer", 1),
        ],
        style: oncology,
    },
    Hospital {
        name: "harbor-emergency",
        cases: &[
            ("laceration", "hand laceration", "lidocaine"),
            ("ankle pain", "ankle sprain", "ibuprofen"),
            ("headache", "migraine", "sumatriptan"),
            ("abdominal pain", "appendicitis", "morphine"),
            ("allergic reaction", "anaphylaxis", "epinephrine"),
            ("chest pain", "panic attack", "lorazepam"),
        ],
        ages: (16, 80),
        dispositions: &[
            ("discharge", 6),
            ("admit", 3),
            ("transfer", 2),
            ("follow-up", 1),
        ],
        style: emergency,
    },
];

impl Hospital {
    /// A random record of this hospital.
    pub fn record(&self, rng: &mut ChaCha8Rng) -> Record {
        let (complaint, diagnosis, medication) = *self.cases.choose(rng).expect("non-empty");
        Record {
            age: rng.random_range(self.ages.0..=self.ages.1),
            sex: if rng.random_bool(0.5) { "M" } else { "F" },
            complaint,
            diagnosis,
            medication,
            disposition: pick_weighted(rng, self.dispositions),
        }
    }

    /// The note of `r` in this hospital's style.
    pub fn note(&self, r: &Record, rng: &mut ChaCha8Rng) -> String {
        (self.style)(r, rng)
    }
}

/// The user message for `note`.
pub fn prompt(note: &str) -> String {
    format!("{INSTRUCTION}\n\nNote: {note}")
}

/// A dispreferred answer for `r`: verbose, a wrong field, or broken JSON.
pub fn rejected(h: &Hospital, r: &Record, rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..4) {
        0 => format!(
            "Sure! Here is the information extracted from the note: {}. Let me know if you \
             need anything else.",
            r.json()
        ),
        1 => {
            let other = h
                .cases
                .iter()
                .map(|c| c.1)
                .find(|d| *d != r.diagnosis)
                .unwrap_or("unknown");
            Record {
                diagnosis: other,
                ..r.clone()
            }
            .json()
        }
        2 => Record {
            age: r.age + rng.random_range(1..20),
            disposition: if r.disposition == "admit" {
                "discharge"
            } else {
                "admit"
            },
            ..r.clone()
        }
        .json(),
        _ => {
            let j = r.json().replace('"', "'");
            j[..j.len() - 1].to_string()
        }
    }
}

/// Sizes of a hospital's generated files.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// SFT training examples.
    pub train: usize,
    /// Held-out SFT examples.
    pub eval: usize,
    /// Preference pairs.
    pub prefs: usize,
    /// Held-out preference pairs.
    pub eval_prefs: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            train: 48,
            eval: 8,
            prefs: 24,
            eval_prefs: 6,
        }
    }
}

fn chat(user: &str, assistant: &str) -> serde_json::Value {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
}

/// Writes `dir/<hospital>/{train,eval,prefs,eval_prefs}.jsonl` for every hospital, as a
/// function of `seed`.
pub fn generate(dir: &Path, seed: u64, sizes: Sizes) -> std::io::Result<()> {
    for (k, h) in HOSPITALS.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(k as u64));
        let d = dir.join(h.name);
        std::fs::create_dir_all(&d)?;
        let write = |name: &str, lines: Vec<serde_json::Value>| -> std::io::Result<()> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(d.join(name))?);
            for l in lines {
                writeln!(f, "{l}")?;
            }
            f.flush()
        };
        let sft = |n: usize, rng: &mut ChaCha8Rng| {
            (0..n)
                .map(|_| {
                    let r = h.record(rng);
                    chat(&prompt(&h.note(&r, rng)), &r.json())
                })
                .collect::<Vec<_>>()
        };
        let train = sft(sizes.train, &mut rng);
        let eval = sft(sizes.eval, &mut rng);
        let pairs = |n: usize, rng: &mut ChaCha8Rng| {
            (0..n)
                .map(|_| {
                    let r = h.record(rng);
                    let note = h.note(&r, rng);
                    serde_json::json!({
                        "prompt": [{"role": "user", "content": prompt(&note)}],
                        "chosen": [{"role": "assistant", "content": r.json()}],
                        "rejected": [{"role": "assistant", "content": rejected(h, &r, rng)}],
                    })
                })
                .collect::<Vec<_>>()
        };
        let prefs = pairs(sizes.prefs, &mut rng);
        let eval_prefs = pairs(sizes.eval_prefs, &mut rng);
        write("train.jsonl", train)?;
        write("eval.jsonl", eval)?;
        write("prefs.jsonl", prefs)?;
        write("eval_prefs.jsonl", eval_prefs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_json_with_the_fixed_fields_and_rejections_differ() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for h in &HOSPITALS {
            for _ in 0..50 {
                let r = h.record(&mut rng);
                let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
                let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
                let mut want = FIELDS.to_vec();
                want.sort();
                let mut keys = keys;
                keys.sort();
                assert_eq!(keys, want);
                assert!((h.ages.0..=h.ages.1).contains(&r.age));
                let note = h.note(&r, &mut rng);
                assert!(
                    note.to_lowercase().contains(&r.diagnosis.to_lowercase()),
                    "{note}"
                );
                assert_ne!(rejected(h, &r, &mut rng), r.json());
            }
        }
    }

    #[test]
    fn hospitals_differ_in_content_and_style() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let notes: Vec<String> = HOSPITALS
            .iter()
            .map(|h| {
                let r = h.record(&mut rng);
                h.note(&r, &mut rng)
            })
            .collect();
        assert!(notes[0].contains("c/o") && notes[3].starts_with("TRIAGE"));
        assert!(notes[1].contains("year-old") && notes[2].starts_with("S: "));
        let d0: Vec<&str> = HOSPITALS[0].cases.iter().map(|c| c.1).collect();
        assert!(HOSPITALS[1].cases.iter().all(|c| !d0.contains(&c.1)));
    }
}
