//! Models and datasets by hub id through the real binary, with `HF_HUB_CACHE` pointing at a cache laid
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

/// A model id that does not resolve (missing, unknown revision, malformed) is failed input: one `error:`
/// line from the binary, status 1, naming the flag and the cache searched; not clap's usage error
/// (status 2, "For more information, try '--help'").
#[test]
fn a_bad_hub_id_is_one_typed_error_with_status_1() {
    let dir = scratch("hub-bad-id");
    let root = cache(&dir);
    let cases: [(&[&str], &str); 4] = [
        (&["logps", "--model", "org/absent", "--data"], "models--org--absent"),
        (&["eval", "--model", "org/tiny@v3", "--ref-model", "org/tiny", "--data"], "revision `v3`"),
        (&["logps", "--model", "org/tiny@", "--data"], "revision after `@` is empty"),
        (&["generate", "--model", "org/ti--ny", "--data"], "`ti--ny` is not a repository"),
    ];
    for (args, why) in cases {
        let out = dpo().env("HF_HUB_CACHE", &root).current_dir(&dir).args(args).arg(prefs()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.matches("error").count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: --model: ") && !err.contains("--help"), "{args:?}: {err}");
        assert!(err.contains(why) && err.contains(&root.display().to_string()), "{args:?}: {err}");
    }
}

fn datasets(rel: &str) -> PathBuf {
    fixtures().join("../datasets").join(rel)
}

/// `dpo logps` of gpt2-policy on `data` (and extra flags), with the cache at `cache`.
fn logps_data(cache: &Path, data: &str, extra: &[&str]) -> String {
    let mut c = dpo();
    c.env("HF_HUB_CACHE", cache).args(["logps", "--model"]).arg(model("gpt2-policy"));
    c.args(["--data", data]).args(extra);
    stdout(&mut c)
}

#[test]
fn dataset_by_hub_id_save_to_disk_and_dataset_dict() {
    let dir = scratch("hub-datasets");
    let root = dir.join("hub-cache");
    store_snapshot(&root, RepoKind::Dataset, "org/prefs", C1, &datasets("hub"), &["main"]).unwrap();
    // The same 16 rows as JSONL: the reference every route must match.
    let rows: Vec<&str> = std::fs::read_to_string(prefs()).unwrap().leak().lines().collect();
    let first16 = dir.join("first16.jsonl");
    std::fs::write(&first16, rows[..16].join("\n")).unwrap();
    let want = logps_data(&root, first16.to_str().unwrap(), &[]);
    assert_eq!(want.lines().count(), 16);
    assert_eq!(logps_data(&root, "org/prefs", &[]), want);
    assert_eq!(logps_data(&root, &format!("org/prefs@{C1}"), &["--split", "train"]), want);
    assert_eq!(logps_data(&root, datasets("dict").to_str().unwrap(), &[]), want);
    // save_to_disk of all 24 rows reads as prefs.jsonl.
    let all = logps_data(&root, prefs().to_str().unwrap(), &[]);
    assert_eq!(logps_data(&root, datasets("saved").to_str().unwrap(), &[]), all);
    // The test split by hub id is the last 8 rows.
    let test = logps_data(&root, "org/prefs", &["--split", "test"]);
    assert_eq!(test.lines().collect::<Vec<_>>(), all.lines().skip(16).collect::<Vec<_>>());

    // A dataset id missing from the cache names the cache; a missing split lists the splits.
    let mut c = dpo();
    c.env("HF_HUB_CACHE", &root).args(["logps", "--model"]).arg(model("gpt2-policy"));
    fails(
        c.args(["--data", "org/absent"]),
        &["datasets--org--absent", root.display().to_string().as_str(), "downloads nothing"],
    );
    let mut c = dpo();
    c.env("HF_HUB_CACHE", &root).args(["logps", "--model"]).arg(model("gpt2-policy"));
    fails(c.args(["--data", "org/prefs", "--split", "dev"]), &["split `dev`", "splits found: test, train"]);
}

#[test]
fn train_records_the_resolved_dataset() {
    let dir = scratch("hub-train");
    let root = cache(&dir);
    store_snapshot(&root, RepoKind::Dataset, "org/prefs", C1, &datasets("hub"), &["main"]).unwrap();
    let run = dir.join("run");
    let mut c = dpo();
    c.env("HF_HUB_CACHE", &root).current_dir(&dir);
    c.args(["train", "--model", "org/tiny", "--data", "org/prefs", "--eval-data", "org/prefs", "--max-steps", "1"]);
    c.args(["--batch-size", "4", "--save-every", "0"]).arg("--output").arg(&run);
    succeeds(&mut c);
    let cfg: toml::Table = std::fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    let snap = root.join("datasets--org--prefs/snapshots").join(C1);
    assert_eq!(cfg["data"].as_str().unwrap(), snap.join("data/train-*.parquet").to_str().unwrap());
    assert_eq!(cfg["eval_data"].as_str().unwrap(), snap.join("data/test-00000-of-00001.parquet").to_str().unwrap());
    let model_dir = root.join("models--org--tiny/snapshots").join(C1);
    assert_eq!(cfg["model"].as_str().unwrap(), model_dir.to_str().unwrap());

    // The same ids in a --config file; its other relative paths still resolve against the file.
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let toml = "model = \"org/tiny@v2\"\ndata = \"org/prefs\"\noutput = \"out\"\nmax_steps = 1\nbatch_size = 4\n";
    std::fs::write(conf.join("run.toml"), toml).unwrap();
    let mut c = dpo();
    c.env("HF_HUB_CACHE", &root).current_dir("/").args(["train", "--config"]).arg(conf.join("run.toml"));
    succeeds(&mut c);
    let cfg: toml::Table = std::fs::read_to_string(conf.join("out/config.toml")).unwrap().parse().unwrap();
    let llama = root.join("models--org--tiny/snapshots").join(C2);
    assert_eq!(cfg["model"].as_str().unwrap(), llama.to_str().unwrap());
    assert_eq!(cfg["data"].as_str().unwrap(), snap.join("data/train-*.parquet").to_str().unwrap());
}
