//! The configuration files the documentation shows are ones the daemons accept: README's
//! `coord.toml` and `hospital-a.toml` (as shown, and with every commented setting switched on)
//! and those embedded in the Kubernetes examples under `deploy/k8s/`.

use super::{ClientFile, CoordFile};

const README: &str = include_str!("../../../README.md");

/// The ```toml block that follows the line `intro` in `text`.
fn block_after(text: &str, intro: &str) -> String {
    let at = text
        .find(intro)
        .unwrap_or_else(|| panic!("no {intro:?} in README.md"));
    let rest = &text[at..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let len = rest[start..].find("```").expect("the block's end");
    rest[start..start + len].to_string()
}

/// `toml` with every commented-out setting (`# key = …`, `# [table]`) switched on.
fn uncommented(toml: &str) -> String {
    toml.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" =").is_some_and(|(k, _)| {
                        k.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file embedded under `key: |` in a ConfigMap of `yaml` (indented four spaces).
fn embedded(yaml: &str, key: &str) -> String {
    let head = format!("  {key}: |\n");
    let at = yaml
        .find(&head)
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
        + head.len();
    yaml[at..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn coord(text: &str, what: &str) -> CoordFile {
    toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

fn client(text: &str, what: &str) -> ClientFile {
    toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

#[test]
fn the_readme_configurations_parse_with_every_setting_shown() {
    let c = block_after(README, "`coord.toml`:\n");
    coord(&c, "README coord.toml");
    let all = uncommented(&c);
    assert_ne!(all, c, "the example has commented settings");
    let f = coord(&all, "README coord.toml, uncommented");
    assert!(f.server_optimizer.is_some() && f.dp.is_some() && !f.then.is_empty());
    let k = block_after(README, "`hospital-a.toml`:\n");
    client(&k, "README hospital-a.toml");
    let f = client(&uncommented(&k), "README hospital-a.toml, uncommented");
    assert!(f.metrics_listen.is_some() && f.load_in_4bit && f.output_dir.is_some());
}

#[test]
fn the_kubernetes_examples_carry_configurations_that_parse() {
    let c = embedded(
        include_str!("../../../deploy/k8s/coordinator.yaml"),
        "coord.toml",
    );
    let f = coord(&c, "deploy/k8s/coordinator.yaml coord.toml");
    // The manifest's volumes and ports are the ones the file names.
    assert_eq!(f.data_dir, std::path::Path::new("/state"));
    assert_eq!(f.ca, std::path::Path::new("/ca"));
    assert_eq!(f.listen.port(), 7443);
    assert_eq!(f.metrics_listen.map(|a| a.port()), Some(9464));
    let k = embedded(
        include_str!("../../../deploy/k8s/client.yaml"),
        "client.toml",
    );
    let f = client(&k, "deploy/k8s/client.yaml client.toml");
    assert_eq!(f.ca, std::path::Path::new("/ca"));
    assert!(f.log.as_deref().is_some_and(|p| p.starts_with("/state")));
    assert_eq!(f.metrics_listen.map(|a| a.port()), Some(9465));
}
