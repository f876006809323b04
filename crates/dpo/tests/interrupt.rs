//! A run interrupted before its first step (Ctrl-C while the model loads) writes no checkpoint and leaves
//! nothing that would stop the same command from starting it again; a resumed one keeps its checkpoints.
//! And what a resume compares: settings by name, inputs by content.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use dpo::train::resume::{check_inputs, check_settings, input_fingerprints};
use dpo::train::{train, RunDir, RunOptions, StartMode, TrainError};

use common::{run, scratch, trl_settings, PARITY};

#[test]
fn an_interrupt_before_the_first_step_writes_nothing() {
    let out = scratch("interrupt-fresh");
    let cfg = trl_settings(PARITY, "gpt2", out.join("run"));
    let got = train(&cfg, &RunOptions::default(), &AtomicBool::new(true), &mut |_| {}).unwrap();
    assert!(got.interrupted && got.checkpoint.is_none() && got.steps == 0, "{got:?}");
    assert!(!out.join("run").exists(), "the run directory was created");
    // The same run starts again without --overwrite.
    run(&cfg);
    assert!(out.join("run/final").is_dir());

    // Resumed, then interrupted before a step: no new checkpoint, the run's are as they were.
    let resume = RunOptions { resume: Some(cfg.output.clone()), overwrite: false };
    let more = dpo::train::TrainConfig { max_steps: Some(8), ..cfg.clone() };
    let got = train(&more, &resume, &AtomicBool::new(true), &mut |_| {}).unwrap();
    assert!(got.interrupted && got.checkpoint.is_none() && got.steps == 6, "{got:?}");
    let steps: Vec<u64> = dpo::train::checkpoint::list(&cfg.output).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [6]);

    // --overwrite, interrupted once the directory is taken (the moved-aside notice): the previous run is
    // put back and no step-0 is written.
    let before = std::fs::read(cfg.output.join("final/model.safetensors")).unwrap();
    let stop = AtomicBool::new(false);
    let overwrite = RunOptions { resume: None, overwrite: true };
    let got = train(&cfg, &overwrite, &stop, &mut |l| {
        if l.contains("moved aside") {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(got.interrupted && got.checkpoint.is_none(), "{got:?}");
    assert_eq!(std::fs::read(cfg.output.join("final/model.safetensors")).unwrap(), before);
    assert!(!cfg.output.join("checkpoints/step-0").exists());
    std::fs::remove_dir_all(out).unwrap();
}

/// What a new run that stops before its first step removes: what it wrote, and the directory only when it
/// created it and nothing else is there.
#[test]
fn discarding_an_unstarted_run_keeps_what_it_did_not_write() {
    let out = scratch("interrupt-discard");
    let mine = out.join("mine");
    let dir = RunDir::open(&mine, StartMode::Fresh, &mut |_| {}).unwrap();
    dir.write_config("lr = 1.0\n").unwrap();
    let metrics = dir.metrics(None).unwrap();
    dir.discard_unstarted(&metrics.files());
    assert!(!mine.exists());
    drop(dir);

    let users = out.join("users");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("notes.txt"), "mine").unwrap();
    let dir = RunDir::open(&users, StartMode::Fresh, &mut |_| {}).unwrap();
    dir.write_config("lr = 1.0\n").unwrap();
    dir.discard_unstarted(&dir.metrics(None).unwrap().files());
    drop(dir);
    assert!(users.join("notes.txt").is_file() && !users.join("config.toml").exists());
    assert!(!dpo::train::run_dir::holds_run(&users));
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_resume_compares_every_setting_but_the_free_ones_and_each_input() {
    let out = scratch("interrupt-compare");
    let data = out.join("prefs.jsonl");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(PARITY.path("data/prefs.jsonl"), &data).unwrap();
    let cfg = dpo::train::TrainConfig { data: data.clone(), ..trl_settings(PARITY, "gpt2", out.join("run")) };
    run(&cfg);
    let run_dir = cfg.output.clone();

    let free = dpo::train::TrainConfig {
        max_steps: Some(9),
        threads: Some(1),
        log_every: 3,
        gradient_checkpointing: true,
        micro_pairs: 1,
        ..cfg.clone()
    };
    check_settings(&run_dir, &free).unwrap();
    let changed = dpo::train::TrainConfig { lr: 0.5, seed: 7, ..cfg.clone() };
    match check_settings(&run_dir, &changed) {
        Err(TrainError::ResumeChanged { changes, .. }) => {
            let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
            assert_eq!(shown, ["lr: 0.005 -> 0.5", "seed: 42 -> 7"]);
        }
        other => panic!("{other:?}"),
    }

    let now = input_fingerprints(&cfg).unwrap();
    check_inputs(&run_dir, &cfg, &now).unwrap();
    std::fs::write(&data, std::fs::read_to_string(&data).unwrap().replace("a", "b")).unwrap();
    let now = input_fingerprints(&cfg).unwrap();
    match check_inputs(&run_dir, &cfg, &now) {
        Err(TrainError::ResumeChanged { changes, .. }) => {
            assert_eq!(changes.len(), 1, "{changes:?}");
            assert_eq!(changes[0].key, "data");
            assert!(changes[0].was.starts_with(&data.display().to_string()), "{changes:?}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// Online DPO stops the same way: interrupted while its model loads, it writes nothing (a step-0
/// checkpoint and a run directory that refused the same command again, before).
#[test]
fn an_online_run_interrupted_while_loading_writes_nothing() {
    use dpo::train::online::{train_online, OnlineJudge, OnlineSampling};
    let out = scratch("interrupt-online");
    let cfg =
        dpo::train::TrainConfig { batch_size: 2, max_steps: Some(2), ..trl_settings(PARITY, "gpt2", out.join("run")) };
    let prompts = vec![vec![1u32, 2, 3], vec![4, 5]];
    let score = |items: &[(&[u32], &[u32])]| -> Result<Vec<f64>, String> { Ok(vec![0.0; items.len()]) };
    let judge = OnlineJudge { name: "zero".into(), score: &score };
    let sampling =
        OnlineSampling { samples: 2, max_new_tokens: 3, temperature: 1.0, eos_ids: vec![0], missing_eos_penalty: None };
    let opts = RunOptions::default();
    let got = train_online(&cfg, &sampling, &prompts, &judge, &opts, &AtomicBool::new(true), &mut |_| {}).unwrap();
    assert!(got.interrupted && got.checkpoint.is_none() && got.steps == 0, "{got:?}");
    assert!(!cfg.output.exists(), "the run directory was created");
    // The same run then starts and finishes without --overwrite.
    let done = train_online(&cfg, &sampling, &prompts, &judge, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert!(!done.interrupted && done.steps == 2 && cfg.output.join("final").is_dir(), "{done:?}");
    std::fs::remove_dir_all(out).unwrap();
}
