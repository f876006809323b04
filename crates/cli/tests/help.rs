//! Snapshot tests of the command line (uv's `tests/it/help.rs` idea): every command's `--help` is kept in
//! `tests/snapshots/help/`, so a flag that appears, disappears or changes its default shows up in review.
//! After an intended change, regenerate them with `DPO_UPDATE_SNAPSHOTS=1 cargo test --release -p dpo-cli --test help`.

mod common;

use std::path::{Path, PathBuf};

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/help")
}

fn help(args: &[&str]) -> String {
    // `DPO_GEMM=portable` forces the emulated bf16 products, so `--precision`'s help (which says what
    // runs them on this CPU) reads the same on every machine.
    let out =
        common::dpo().args(args).arg("--help").env_remove("COLUMNS").env("DPO_GEMM", "portable").output().unwrap();
    assert!(out.status.success(), "`dpo {} --help` failed:\n{}", args.join(" "), common::stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `dpo --help` lists, nested ones (`reward-model train`) included.
fn commands() -> Vec<Vec<String>> {
    fn listed(text: &str) -> Vec<String> {
        let body = text.split("Commands:").nth(1).unwrap_or("");
        let body = body.split("\n\n").next().unwrap_or("");
        // A command's line starts with two spaces; wrapped descriptions are indented further.
        body.lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_string)
            .collect()
    }
    let mut all = Vec::new();
    for name in listed(&help(&[])) {
        let nested = listed(&help(&[&name]));
        all.push(vec![name.clone()]);
        all.extend(nested.into_iter().map(|sub| vec![name.clone(), sub]));
    }
    all
}

fn check(name: &str, got: &str, mismatches: &mut Vec<String>) {
    let path = snapshot_dir().join(format!("{name}.txt"));
    if std::env::var_os("DPO_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(snapshot_dir()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != got {
        let line = want
            .lines()
            .zip(got.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(got.lines().count()));
        mismatches.push(format!(
            "{name}: differs from {} at line {}:\n  snapshot: {:?}\n  now:      {:?}",
            path.display(),
            line + 1,
            want.lines().nth(line).unwrap_or("<end>"),
            got.lines().nth(line).unwrap_or("<end>")
        ));
    }
}

#[test]
fn help_output_matches_the_snapshots() {
    let mut mismatches = Vec::new();
    check("dpo", &help(&[]), &mut mismatches);
    let commands = commands();
    assert!(commands.len() >= 12, "too few commands found in `dpo --help`: {commands:?}");
    let mut names = vec!["dpo".to_string()];
    for args in &commands {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = args.join("-");
        check(&name, &help(&refs), &mut mismatches);
        names.push(name);
    }
    if std::env::var_os("DPO_UPDATE_SNAPSHOTS").is_none() {
        // A snapshot of a command that no longer exists is stale.
        for e in std::fs::read_dir(snapshot_dir()).unwrap() {
            let file = e.unwrap().file_name().to_string_lossy().into_owned();
            let stem = file.trim_end_matches(".txt");
            if !names.iter().any(|n| n == stem) {
                mismatches.push(format!("{file}: no such command any more"));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "help output changed; if intended, run DPO_UPDATE_SNAPSHOTS=1 cargo test --release -p dpo-cli --test help\n{}",
        mismatches.join("\n")
    );
}
