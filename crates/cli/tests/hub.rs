//! Models by hub id through the real binary, with `HF_HUB_CACHE` pointing at a cache laid
//! out by the test as `hf download` leaves it (blobs and relative symlinks; nothing can be downloaded).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hf::hub_cache::{store_snapshot, RepoKind};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

/// A cache holding `org/tiny` (gpt2-policy at `main`, llama-policy at tag `v2`).
fn cache(dir: &Path) -> PathBuf {
    let root = dir.join("hub-cache");
    store_snapshot(&root, RepoKind::Model, "org/tiny", C1, &model("gpt2-policy"), &["main"]).unwrap();
    store_snapshot(&root, RepoKind::Model, "org/tiny", C2, &model("llama-policy"), &["v2"]).unwrap();
    root
}

fn logps(cache: &Path, model: &str, cwd: &Path) -> Command {
    let mut c = dpo();
    c.env("HF_HUB_CACHE", cache).current_dir(cwd);
    c.args(["logps", "--model", model, "--data"]).arg(prefs());
    c
}

fn stdout(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn direct(name: &str) -> String {
    stdout(dpo().arg("logps").arg("--model").arg(model(name)).arg("--data").arg(prefs()))
}

#[test]
fn model_by_hub_id_branch_tag_and_commit() {
    let dir = scratch("hub-model");
    let root = cache(&dir);
    let gpt2 = direct("gpt2-policy");
    let llama = direct("llama-policy");
    assert_ne!(gpt2, llama);
    assert_eq!(stdout(&mut logps(&root, "org/tiny", &dir)), gpt2);
    assert_eq!(stdout(&mut logps(&root, "org/tiny@v2", &dir)), llama);
    assert_eq!(stdout(&mut logps(&root, &format!("org/tiny@{C2}"), &dir)), llama);
}

#[test]
fn a_local_directory_wins_over_a_hub_id() {
    let dir = scratch("hub-local-wins");
    let root = cache(&dir);
    copy_model("llama-policy", &dir.join("org/tiny"));
    assert_eq!(stdout(&mut logps(&root, "org/tiny", &dir)), direct("llama-policy"));
}

#[test]
fn a_missing_hub_id_names_the_cache_and_downloads_nothing() {
    let dir = scratch("hub-missing");
    let root = cache(&dir);
    let out = logps(&root, "org/absent", &dir).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    for want in ["`org/absent`", "models--org--absent", root.display().to_string().as_str(), "downloads nothing"] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    let out = logps(&root, "org/tiny@v3", &dir).output().unwrap();
    let err = stderr(&out);
    assert!(err.contains("revision `v3` is not in the cache") && err.contains("main -> 1111111"), "{err}");
    // HF_HOME/hub when HF_HUB_CACHE is unset.
    let mut c = logps(&root, "org/absent", &dir);
    c.env_remove("HF_HUB_CACHE").env("HF_HOME", dir.join("home"));
    let err = stderr(&c.output().unwrap());
    assert!(err.contains(&dir.join("home/hub").display().to_string()), "{err}");
}
