use super::*;
use crate::objectives::KtoLossType;

fn parse(text: &str) -> Result<TrainConfig, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    TrainConfig::from_layers(None, table, Method::Pairs).map_err(|e| e.to_string())
}

#[test]
fn toml_round_trip_and_unknown_keys() {
    let mut c = TrainConfig { lr: 5e-3, ..Default::default() };
    c.objective = Objective::Pairs(PairObjective {
        losses: vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.5)],
        cfg: LossConfig::default(),
    });
    let table: toml::Table = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(TrainConfig::from_layers(None, table, Method::Pairs).unwrap(), c);
    let e = parse("lrr = 1.0\n").unwrap_err();
    assert!(e.contains("lrr"), "{e}");
    // The `[objective]` table of older config.toml files still reads.
    let nested = parse("lr = 0.5\n[objective]\nbeta = 0.25\n").unwrap();
    assert_eq!((nested.lr, nested.objective.beta(), nested.batch_size), (0.5, Some(0.25), 8));
}

#[test]
fn keys_are_the_flags_names_and_lists_take_both_forms() {
    let a = parse("loss = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.2]\nf_alpha = 0.3\nno_prefix_sharing = true\nthreads = 2\n").unwrap();
    let b = parse(
        "loss = \"sigmoid,sft\"\nloss_weights = \"1.0,0.2\"\nf_alpha = 0.3\nno_prefix_sharing = true\nthreads = 2\n",
    )
    .unwrap();
    assert_eq!(a, b);
    let Objective::Pairs(p) = &a.objective else { panic!("{:?}", a.objective) };
    assert_eq!(p.losses, vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2)]);
    assert_eq!((p.cfg.f_alpha_divergence_coef, a.prefix_sharing, a.threads), (0.3, false, Some(2)));
}

#[test]
fn kto_and_sft_are_typed_and_recorded() {
    let k = parse("loss = \"kto\"\ndesirable_weight = 2.0\n").unwrap();
    assert!(matches!(&k.objective, Objective::Kto(c) if c.desirable_weight == 2.0 && c.loss_type == KtoLossType::Kto));
    assert!(k.to_toml().contains("method = \"kto\""));
    let s = TrainConfig::from_layers(None, toml::Table::new(), Method::Sft).unwrap();
    assert_eq!((s.objective.clone(), s.lr), (Objective::Sft, DEFAULT_SFT_LR));
    let text = s.to_toml();
    assert!(text.contains("method = \"sft\""), "{text}");
    // Read back without saying SFT: the file says so.
    let back = TrainConfig::from_layers(None, toml::from_str(&text).unwrap(), Method::Pairs).unwrap();
    assert_eq!(back, s);
}

#[test]
fn settings_follow_torchs_rules() {
    for (text, field) in [
        ("beta = 0.0", "`beta`"),
        ("beta = -1.0", "`beta`"),
        ("beta = inf", "`beta`"),
        ("adam_beta1 = 2.0", "`adam_beta1`"),
        ("adam_beta2 = 1.0", "`adam_beta2`"),
        ("adam_eps = 0.0", "`adam_eps`"),
        ("lr = -1.0", "`lr`"),
        ("lr = nan", "`lr`"),
        ("loss_weights = \"nan\"", "`loss_weights`"),
        ("weight_decay = -0.1", "`weight_decay`"),
        ("momentum = -1.0", "`momentum`"),
        ("max_grad_norm = nan", "`max_grad_norm`"),
        ("optimizer = \"adam\"", "`optimizer`"),
        ("scheduler = \"step\"", "`scheduler`"),
        ("truncation = \"middle\"", "`truncation`"),
        ("max_memory = \"lots\"", "`max_memory`"),
        ("loss = \"sigmoid\"\nloss_weights = [1.0, 2.0]", "`loss_weights`"),
        ("loss = \"kto\"\nprecompute_ref = true", "`precompute_ref`"),
        // Settings the run would not read: refused rather than ignored.
        ("loss = \"sigmoid\"\nlabel_smoothing = 0.2", "`label_smoothing`"),
        ("loss = \"simpo\"\nf_divergence = \"forward_kl\"", "`f_divergence`"),
        ("reference_free = true\nref_model = \"ref\"", "`ref_model`"),
        ("loss = \"simpo\"\nref_model = \"ref\"", "`ref_model`"),
        ("reference_free = true\nprecompute_ref = true", "`precompute_ref`"),
        ("eval_every = 5", "`eval_every`"),
        ("max_length = 10\nmax_prompt_length = 1000", "`max_prompt_length`"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.contains(field), "{text}: {e}");
    }
    assert!(parse("lr = 0.0\nadam_beta1 = 0.0").is_ok());
    // ... and the same settings where a loss reads them.
    for text in [
        "loss = \"cdpo\"\nlabel_smoothing = 0.2",
        "loss = [\"sigmoid\", \"robust\"]\nlabel_smoothing = 0.2",
        "loss = \"ipo\"\nf_divergence = \"forward_kl\"",
        "ref_model = \"ref\"\nprecompute_ref = true",
        "eval_every = 5\neval_data = \"held_out.jsonl\"",
        "max_length = 1000\nmax_prompt_length = 10",
    ] {
        assert!(parse(text).is_ok(), "{text}: {:?}", parse(text).err());
    }
}

#[test]
fn a_seed_beyond_tomls_integers_is_refused_and_the_largest_round_trips() {
    let e = TrainConfig { seed: 1 << 63, ..Default::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("`seed`") && e.contains("9223372036854775807"), "{e}");
    let c = TrainConfig { seed: i64::MAX as u64, ..Default::default() };
    c.validate().unwrap();
    let table: toml::Table = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(TrainConfig::from_layers(None, table, Method::Pairs).unwrap().seed, i64::MAX as u64);
}

#[test]
fn relative_paths_in_a_file_resolve_against_its_directory() {
    let dir = std::env::temp_dir().join(format!("dpo-config-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.toml");
    std::fs::write(&file, "model = \"m\"\ndata = \"/abs/d.jsonl\"\n").unwrap();
    let c = TrainConfig::from_toml_file(&file).unwrap();
    assert_eq!((c.model, c.data), (dir.join("m"), PathBuf::from("/abs/d.jsonl")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_settings_are_typed_recorded_and_checked() {
    let c = parse("lora_r = 16\nlora_targets = \"q_proj, v_proj\"\nuse_rslora = true\nmerge = true\n").unwrap();
    assert!(c.is_lora() && c.merge);
    assert_eq!(c.lora.targets, Some(LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])));
    let list =
        parse("lora_r = 16\nlora_targets = [\"q_proj\", \"v_proj\"]\nuse_rslora = true\nmerge = true\n").unwrap();
    assert_eq!(list, c);
    let table: toml::Table = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(TrainConfig::from_layers(None, table, Method::Pairs).unwrap(), c);
    assert_eq!(
        parse("lora_r = 4\nlora_targets = \"all-linear\"\n").unwrap().lora.targets,
        Some(LoraTargets::AllLinear)
    );
    let bf16 = parse("lora_r = 4\nmerge = true\nmerge_dtype = \"bf16\"\n").unwrap();
    assert_eq!(bf16.merge_dtype, Some(hf::safetensors::WriteDtype::Bf16));
    assert!(bf16.to_toml().contains("merge_dtype = \"bf16\""), "{}", bf16.to_toml());
    assert_eq!(parse("lora_r = 4\nmerge = true\n").unwrap().merge_dtype, None);
    let full = parse("lr = 0.1\n").unwrap();
    assert!(!full.is_lora() && !full.to_toml().contains("lora"), "{}", full.to_toml());
    for (text, want) in [
        ("lora_r = 0\n", "lora_r"),
        ("lora_r = 4\nlora_alpha = -1.0\n", "lora_alpha"),
        ("lora_r = 4\nlora_dropout = 1.0\n", "lora_dropout"),
        ("lora_alpha = 8.0\n", "give lora_r"),
        ("lora_r = 4\nlora_targets = \"all-linear,q_proj\"\n", "cannot be combined"),
        ("lora_r = 4\nlora_targets = \",\"\n", "names no module"),
        ("merge = true\n", "applies to a LoRA run"),
        ("lora_r = 4\nmerge_dtype = \"bf16\"\n", "applies with merge"),
        ("lora_r = 4\nmerge = true\nmerge_dtype = \"f8\"\n", "use f32, bf16 or f16"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
    // With an adapter, lora_* settings are checked against it at setup, not refused here.
    assert!(parse("adapter = \"/a\"\nlora_alpha = 8.0\n").is_ok());
}

#[test]
fn gradient_checkpointing_is_a_key_and_is_recorded() {
    assert!(!parse("").unwrap().gradient_checkpointing);
    let c = parse("gradient_checkpointing = true\n").unwrap();
    assert!(c.gradient_checkpointing);
    let text = c.to_toml();
    assert!(text.contains("gradient_checkpointing = true"), "{text}");
    assert_eq!(TrainConfig::from_layers(None, toml::from_str(&text).unwrap(), Method::Pairs).unwrap(), c);
    assert!(parse("gradient_checkpointing = 1\n").unwrap_err().contains("gradient_checkpointing"));
}

#[test]
fn a_stored_base_is_typed_recorded_and_needs_an_adapter() {
    use engine::quant::Storage;
    assert_eq!(parse("").unwrap().base_storage, Storage::F32);
    for (text, want) in [
        ("lora_r = 4\nquantize = \"nf4\"\n", Storage::Nf4 { double_quant: false }),
        ("lora_r = 4\nquantize = \"nf4\"\ndouble_quant = true\n", Storage::Nf4 { double_quant: true }),
        ("lora_r = 4\nbase_dtype = \"bf16\"\n", Storage::Bf16),
        ("lora_r = 4\nbase_dtype = \"f32\"\n", Storage::F32),
    ] {
        let c = parse(text).unwrap();
        assert_eq!(c.base_storage, want, "{text}");
        let back = TrainConfig::from_layers(None, toml::from_str(&c.to_toml()).unwrap(), Method::Pairs).unwrap();
        assert_eq!(back, c, "{text}");
    }
    for (text, key) in [
        ("quantize = \"nf4\"\n", "quantize"),
        ("base_dtype = \"bf16\"\n", "base_dtype"),
        ("lora_r = 4\nquantize = \"int8\"\n", "quantize"),
        ("lora_r = 4\nbase_dtype = \"f16\"\n", "base_dtype"),
        ("lora_r = 4\ndouble_quant = true\n", "double_quant"),
        ("lora_r = 4\nquantize = \"nf4\"\nbase_dtype = \"bf16\"\n", "quantize"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn precision_is_a_key_recorded_and_stores_a_lora_base_in_bf16() {
    assert_eq!(parse("").unwrap().precision, Precision::F32);
    let c = parse("precision = \"bf16\"\n").unwrap();
    // Every weight trained: no base to store (the reference's storage follows the precision in setup).
    assert_eq!((c.precision, c.base_storage), (Precision::Bf16, Storage::F32));
    let text = c.to_toml();
    assert!(text.contains("precision = \"bf16\""), "{text}");
    assert_eq!(parse(&text).unwrap(), c);
    for (text, want) in [
        ("lora_r = 4\nprecision = \"bf16\"\n", Storage::Bf16),
        ("lora_r = 4\nprecision = \"bf16\"\nbase_dtype = \"f32\"\n", Storage::F32),
        ("lora_r = 4\nprecision = \"bf16\"\nquantize = \"nf4\"\n", Storage::Nf4 { double_quant: false }),
        ("lora_r = 4\nprecision = \"f32\"\n", Storage::F32),
    ] {
        let c = parse(text).unwrap();
        assert_eq!(c.base_storage, want, "{text}");
        assert_eq!(parse(&c.to_toml()).unwrap(), c, "{text}");
    }
    let e = parse("precision = \"fp16\"\n").unwrap_err();
    assert!(e.contains("`precision`") && e.contains("fp16"), "{e}");
}
