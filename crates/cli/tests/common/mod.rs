//! What the command-line tests share: the fixtures, scratch directories, running the binary, and
//! checking that a failure is one clear message rather than a panic.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn prefs() -> PathBuf {
    fixtures().join("data/prefs.jsonl")
}

/// A fresh, empty directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dpo-cli-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn dpo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dpo"))
}

/// A copy of a fixture model directory at `to`.
pub fn copy_model(name: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(model(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd` and checks that it failed with exactly one `error:` message containing every one of
/// `wants`, and did not panic. Returns the message (from `error: ` to the end).
pub fn fails(cmd: &mut Command, wants: &[&str]) -> String {
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "expected a failure, got success; stderr:\n{err}");
    assert_eq!(out.status.code(), Some(1), "exit status {:?}; stderr:\n{err}", out.status);
    assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "panicked:\n{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "not one error message:\n{err}");
    let msg = &err[err.find("error: ").unwrap()..];
    for w in wants {
        assert!(msg.contains(w), "message lacks {w:?}:\n{msg}");
    }
    println!("{}", msg.trim_end());
    msg.to_string()
}

/// Runs `cmd` and checks that it succeeded; returns its standard error.
pub fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "failed: {:?}\n{err}", out.status);
    err
}

/// Rewrites a safetensors file: `edit` may change the header (tensor name -> entry) and the data bytes.
pub fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>, &mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// Byte range of a tensor inside the data section.
pub fn tensor_range(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> std::ops::Range<usize> {
    let o = &header[name]["data_offsets"];
    o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize
}

/// Writes JSON lines.
pub fn jsonl(path: &Path, rows: &[serde_json::Value]) -> PathBuf {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// `dpo train` with a learning rate that moves the fixture models; more arguments can be added.
pub fn train(model: &Path, data: &Path, output: &Path) -> Command {
    let mut c = dpo();
    c.args(["train", "--lr", "5e-3"]).arg("--model").arg(model).arg("--data").arg(data).arg("--output").arg(output);
    c
}

/// `dpo ARGS --model gpt2-policy --data prefs.jsonl --output OUTPUT`: a run of any training command on the
/// GPT-2 fixture and the preference rows; more arguments can be added.
pub fn on_fixture(args: &[&str], output: &Path) -> Command {
    let mut c = dpo();
    c.args(args).arg("--model").arg(model("gpt2-policy")).arg("--data").arg(prefs()).arg("--output").arg(output);
    c
}

/// A finished two-step run of `dpo train` on the GPT-2 fixture and `data`, a checkpoint after each step;
/// `extra` flags are added.
pub fn finished_run(run: &Path, data: &Path, extra: &[&str]) {
    let steps = ["--batch-size", "4", "--max-steps", "2", "--save-every", "1"];
    succeeds(train(&model("gpt2-policy"), data, run).args(steps).args(extra));
}

/// Lines in a file (0 when it does not exist yet): how far a run's `metrics.jsonl` has got.
pub fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// The checkpoint directories (`step-N`) of a run, oldest first.
pub fn checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Checks that a checkpoint directory loads: its model, its optimizer file and its trainer state.
pub fn assert_checkpoint_loads(dir: &Path) {
    let model = hf::load_model(&dir.join("model"));
    assert!(model.is_ok(), "{}: {}", dir.display(), model.unwrap_err());
    let opt = hf::SafeTensors::open(&dir.join("optimizer.safetensors"));
    assert!(opt.is_ok(), "{}: {}", dir.display(), opt.unwrap_err());
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let step = dir.file_name().unwrap().to_str().unwrap().strip_prefix("step-").unwrap();
    assert_eq!(state["state"]["step"].to_string(), step, "{}", dir.display());
    assert!(state["optimizer_step"].is_u64(), "{}", dir.display());
}

/// A reward model trained for 2 steps on the preference fixture in `dir/rm`: the judge the win-rate and online
/// tests use.
/// `dpo ppo` on the GPT-2 fixture against the reward model `rm`: one prompt a rollout, minibatches of one,
/// four new tokens (give `--steps` and `--output`).
pub fn ppo(rm: &Path, prompts: &Path) -> Command {
    let mut c = dpo();
    c.args(["ppo", "--rollout-prompts", "1", "--minibatch", "1", "--max-new-tokens", "4", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--reward-model")
        .arg(rm)
        .arg("--prompts")
        .arg(prompts);
    c
}

pub fn trained_reward_model(dir: &Path) -> PathBuf {
    let rm = dir.join("rm");
    let mut c = dpo();
    c.args(["reward-model", "train", "--max-steps", "2", "--batch-size", "4", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--data")
        .arg(prefs())
        .arg("--output")
        .arg(&rm);
    succeeds(&mut c);
    rm
}

/// Writes `dir/config.json` from `config` and `dir/model.safetensors` with random weights (a fixed
/// xorshift stream, uniform in `[-scale/2, scale/2)`): a model of any shape without a fixture.
pub fn write_random_model(dir: &Path, config: serde_json::Value, scale: f32) -> hf::ModelConfig {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let config = hf::config_from_json(config, &dir.join("config.json")).unwrap();
    let mut params = engine::Params::zeros(&config.decoder);
    let mut seed = 0x2545F4914F6CDD1Du64;
    for (_, t) in params.named_mut() {
        for x in t.data.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *x = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale;
        }
    }
    hf::safetensors::write_f32(&dir.join("model.safetensors"), &hf::to_hf_tensors(&config, &params)).unwrap();
    config
}
