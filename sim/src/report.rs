//! Reports of a simulation: PNG plots (plotters, with an embedded DejaVu Sans font) of the
//! global held-out loss and of every client's losses by round, and one self-contained HTML
//! file (plots inlined) with the config, a table of rounds, every failure and example
//! generations.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use plotters::prelude::*;

use crate::evaluate::GenerationScores;
use crate::run::SimOutcome;
use fedtune_coordinator::RoundEvent;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A series: name and (round, value) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Draws `series` into a PNG at `path`.
pub fn line_plot(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    register_font();
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.1.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(format!("{title}: nothing to plot"));
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_label)
        .x_labels((x1 - x0) as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Per-client series of `field` by round (round 0 included when present).
fn client_series(o: &SimOutcome, field: &str) -> Vec<Series> {
    o.names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let pts = o
                .rounds
                .iter()
                .filter_map(|r| {
                    let v = num(&r["clients"][k][field]);
                    v.is_finite().then_some((r["round"].as_f64()?, v))
                })
                .collect();
            (name.clone(), pts)
        })
        .collect()
}

/// Writes `plots/*.png` under `dir`; returns the files written.
pub fn plots(o: &SimOutcome, dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, String> {
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|e| format!("{}: {e}", pdir.display()))?;
    let mut out = Vec::new();
    let global: Vec<(f64, f64)> = o
        .rounds
        .iter()
        .map(|r| (num(&r["round"]), num(&r["global_eval_loss"])))
        .collect();
    let p = pdir.join("global_eval_loss.png");
    line_plot(
        &p,
        "Global adapter: held-out loss (all clients)",
        "loss",
        &[("global".into(), global)],
    )?;
    out.push(("Global held-out loss by round".into(), p));
    let p = pdir.join("client_eval_loss.png");
    line_plot(
        &p,
        "Global adapter on each client's held-out data",
        "loss",
        &client_series(o, "global_eval_loss"),
    )?;
    out.push(("Global adapter on each client's held-out data".into(), p));
    let train = client_series(o, "train_loss");
    if train.iter().any(|s| !s.1.is_empty()) {
        let p = pdir.join("client_train_loss.png");
        line_plot(&p, "Local training loss per client", "loss", &train)?;
        out.push(("Local training loss per client".into(), p));
    }
    Ok(out)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "–".into()
    }
}

/// Every failure of the run: (round, client, what, reason).
pub fn failures(o: &SimOutcome) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for r in o.rounds.iter().skip(1) {
        let round = r["round"].to_string();
        for c in r["clients"].as_array().into_iter().flatten() {
            let status = c["status"].as_str().unwrap_or("");
            if !status.is_empty() && status != "accepted" {
                out.push((
                    round.clone(),
                    c["name"].as_str().unwrap_or("").to_string(),
                    status.to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        for f in r["failures"].as_array().into_iter().flatten() {
            out.push((
                round.clone(),
                f["client"].as_str().unwrap_or("").to_string(),
                "not aggregated".into(),
                f["reason"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for e in &o.coordinator_log {
        if let RoundEvent::RoundRetry {
            round,
            results,
            needed,
            ..
        } = e
        {
            out.push((
                round.to_string(),
                String::new(),
                "round retried".into(),
                format!("{results} of {needed} updates by the deadline"),
            ));
        }
    }
    for e in &o.events {
        if e["event"] == "coordinator_restart" {
            out.push((
                String::new(),
                "coordinator".into(),
                "restart".into(),
                "killed and restarted from its store".into(),
            ));
        }
    }
    out
}

/// Writes `report.html` (and the plots) into `dir`; `config` is the TOML text of the run.
pub fn write_html(o: &SimOutcome, config: &str, title: &str, dir: &Path) -> Result<(), String> {
    let plots = plots(o, dir)?;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}\
         th{{background:#f3f3f3}}pre{{background:#f6f6f6;padding:8px;overflow-x:auto}}\
         .good{{color:#176c2e}}.bad{{color:#a11}}img{{max-width:100%}}</style></head><body>\
         <h1>{t}</h1>",
        t = esc(title)
    );
    let last = o.rounds.last().cloned().unwrap_or_default();
    let first = o.rounds.first().cloned().unwrap_or_default();
    let _ = write!(
        h,
        "<p>{} clients, {} rounds, {:.0} s wall clock. Global held-out loss {} → {}.</p>",
        o.names.len(),
        o.rounds.len().saturating_sub(1),
        o.wall_s,
        fmt(num(&first["global_eval_loss"])),
        fmt(num(&last["global_eval_loss"])),
    );
    before_after_html(&mut h, o, &first, &last);
    h.push_str("<h2>Plots</h2>");
    for (caption, p) in &plots {
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let _ = write!(
            h,
            "<figure><img alt=\"{c}\" src=\"data:image/png;base64,{}\"><figcaption>{c}</figcaption></figure>",
            base64::engine::general_purpose::STANDARD.encode(bytes),
            c = esc(caption)
        );
    }
    rounds_html(&mut h, o);
    generations_html(&mut h, o);
    let _ = write!(
        h,
        "<h2>Configuration</h2><pre>{}</pre></body></html>",
        esc(config)
    );
    let p = dir.join("report.html");
    std::fs::write(&p, h).map_err(|e| format!("{}: {e}", p.display()))
}

/// The path of a score from the base model through each stage's last global adapter to the
/// final one: `38% → 90% → 100%`.
fn score_path(before: f64, stages: &[f64], after: f64) -> String {
    std::iter::once(before)
        .chain(stages.iter().copied())
        .chain(std::iter::once(after))
        .map(|v| format!("{:.0}%", v * 100.0))
        .collect::<Vec<_>>()
        .join(" → ")
}

/// The columns of [`score_path`]: `base → global`, or with stages `base → SFT → DPO → GRPO`.
pub fn path_labels(o: &SimOutcome) -> String {
    if o.stages.is_empty() {
        return "base → global".into();
    }
    let last = o
        .rounds
        .last()
        .and_then(|r| r["phase"].as_str())
        .unwrap_or("global")
        .to_uppercase();
    std::iter::once("base".to_string())
        .chain(o.stages.iter().map(|s| s.0.clone()))
        .chain(std::iter::once(last))
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Client `k`'s JSON validity and field accuracy paths ([`score_path`]).
pub fn client_paths(
    o: &SimOutcome,
    k: usize,
    before: &GenerationScores,
    after: &GenerationScores,
) -> (String, String) {
    let at = |f: fn(&GenerationScores) -> f64| -> Vec<f64> {
        o.stages.iter().filter_map(|s| s.1.get(k)).map(f).collect()
    };
    (
        score_path(
            before.json_validity,
            &at(|g| g.json_validity),
            after.json_validity,
        ),
        score_path(
            before.field_accuracy,
            &at(|g| g.field_accuracy),
            after.field_accuracy,
        ),
    )
}

/// The table of each client's held-out loss (and generation scores) with the base model and
/// with the last global adapter (and each earlier stage's).
fn before_after_html(
    h: &mut String,
    o: &SimOutcome,
    first: &serde_json::Value,
    last: &serde_json::Value,
) {
    h.push_str("<h2>Before and after, per client</h2><table><tr><th>client</th><th>held-out loss, base</th><th>held-out loss, global</th>");
    let gens = !o.generations.is_empty();
    if gens {
        let labels = esc(&path_labels(o));
        let _ = write!(
            h,
            "<th>JSON validity, {labels}</th><th>field accuracy, {labels}</th>"
        );
    }
    h.push_str("</tr>");
    for (k, name) in o.names.iter().enumerate() {
        let b = num(&first["clients"][k]["global_eval_loss"]);
        let a = num(&last["clients"][k]["global_eval_loss"]);
        let cls = if a < b { "good" } else { "bad" };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{cls}\">{}</td>",
            esc(name),
            fmt(b),
            fmt(a)
        );
        if let Some((_, before, after)) = o.generations.iter().find(|g| &g.0 == name) {
            let (valid, fields) = client_paths(o, k, before, after);
            let _ = write!(
                h,
                "<td>{valid} of {}</td><td>{fields} of {}</td>",
                after.samples.len(),
                after.with_fields
            );
        } else if gens {
            h.push_str("<td></td><td></td>");
        }
        h.push_str("</tr>");
    }
    if gens {
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let all = |f: fn(&GenerationScores) -> f64| {
            score_path(
                mean(o.generations.iter().map(|g| f(&g.1)).collect()),
                &o.stages
                    .iter()
                    .map(|s| mean(s.1.iter().map(f).collect()))
                    .collect::<Vec<_>>(),
                mean(o.generations.iter().map(|g| f(&g.2)).collect()),
            )
        };
        let n: usize = o.generations.iter().map(|g| g.2.samples.len()).sum();
        let nf: usize = o.generations.iter().map(|g| g.2.with_fields).sum();
        let _ = write!(
            h,
            "<tr><th>all clients</th><th>{}</th><th>{}</th><th>{} of {n}</th><th>{} of {nf}</th></tr>",
            fmt(num(&first["global_eval_loss"])),
            fmt(num(&last["global_eval_loss"])),
            all(|g| g.json_validity),
            all(|g| g.field_accuracy),
        );
    }
    h.push_str("</table>");
}

/// The table of rounds and the table of failures.
fn rounds_html(h: &mut String, o: &SimOutcome) {
    h.push_str("<h2>Rounds</h2><table><tr><th>round</th><th>phase</th><th>updates used</th><th>global held-out loss</th><th>clients' train loss</th><th>simulated s</th><th>coordinator s</th><th>DP ε</th></tr>");
    for r in o.rounds.iter().skip(1) {
        let used = r["used"].as_array().map_or(0, |a| a.len());
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{used}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.4}</td><td>{}</td></tr>",
            r["round"],
            esc(r["phase"].as_str().unwrap_or("")),
            fmt(num(&r["global_eval_loss"])),
            fmt(num(&r["metrics"]["train_loss"])),
            num(&r["sim_seconds"]),
            num(&r["coordinator_seconds"]),
            r["dp_epsilon"]
                .as_f64()
                .map_or("–".into(), |e| format!("{e:.3}")),
        );
    }
    h.push_str("</table><h2>Failures</h2>");
    let fl = failures(o);
    if fl.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>round</th><th>client</th><th>what</th><th>reason</th></tr>");
        for (r, c, w, why) in fl {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r),
                esc(&c),
                esc(&w),
                esc(&why)
            );
        }
        h.push_str("</table>");
    }
}

/// Two greedy generations per client, with the base model and with the global adapter.
fn generations_html(h: &mut String, o: &SimOutcome) {
    if o.generations.is_empty() {
        return;
    }
    h.push_str("<h2>Example generations (greedy)</h2>");
    for (name, before, after) in &o.generations {
        let _ = write!(h, "<h3>{}</h3>", esc(name));
        for (b, a) in before.samples.iter().zip(&after.samples).take(2) {
            let _ = write!(
                h,
                "<p><b>Prompt</b></p><pre>{}</pre><p><b>Reference</b></p><pre>{}</pre>\
                 <p><b>Base model</b> ({} of {} fields)</p><pre>{}</pre>\
                 <p><b>Global adapter</b> ({} of {} fields)</p><pre>{}</pre>",
                esc(&b.prompt),
                esc(&b.reference),
                b.fields_correct,
                b.fields_total,
                esc(&b.output),
                a.fields_correct,
                a.fields_total,
                esc(&a.output)
            );
        }
    }
}
