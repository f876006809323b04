//! config.json: `parse_config` (the file, and a `generation_config.json` beside it when the input holds a
//! NUL byte: config before it, generation config after) against `config_from_json`, and what a parsed
//! config promises.
#![no_main]

use hf::{config_from_json, parse_config, supported_model_types, ModelConfig};
use libfuzzer_sys::fuzz_target;

fn check(cfg: &ModelConfig) {
    let d = &cfg.decoder;
    d.validate().expect("a parsed config passes DecoderConfig::validate");
    assert!(d.max_positions <= hf::config::MAX_POSITIONS);
    assert!(supported_model_types().any(|t| t == cfg.model_type));
    // Parsing what was kept gives the same config again.
    let again = config_from_json(cfg.raw.clone(), &cfg.path).expect("reparse the kept JSON");
    let (mut a, mut b) = (again.clone(), cfg.clone());
    // Ids may come from generation_config.json, which `raw` does not hold.
    for c in [&mut a, &mut b] {
        (c.bos_token_id, c.eos_token_ids, c.pad_token_id) = (None, vec![], None);
    }
    assert_eq!(a, b);
}

fuzz_target!(|data: &[u8]| {
    let dir = dpo_fuzz::scratch_dir();
    let (config, gen) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let gen_path = dir.join("generation_config.json");
    match gen {
        Some(g) => std::fs::write(&gen_path, g).unwrap(),
        None => {
            let _ = std::fs::remove_file(&gen_path);
        }
    }
    let path = dpo_fuzz::scratch_file("config.json", config);
    let from_file = parse_config(&path);
    let from_value = serde_json::from_slice(config).map(|v| config_from_json(v, &path));
    match (&from_file, &from_value) {
        (Ok(cfg), Ok(Ok(v))) => {
            check(cfg);
            check(v);
            assert_eq!(cfg.decoder, v.decoder);
            if gen.is_none() {
                assert_eq!(cfg, v);
            } else if !v.eos_token_ids.is_empty() {
                // config.json's own ids win over generation_config.json's.
                assert_eq!(cfg.eos_token_ids, v.eos_token_ids);
            }
        }
        (Err(e), Ok(Ok(_))) => {
            // Only generation_config.json can fail a config that parses on its own.
            assert!(gen.is_some(), "parse_config fails where config_from_json succeeds: {e}");
            assert!(e.to_string().contains("generation_config.json"), "{e}");
        }
        (Ok(_), _) => panic!("parse_config accepts what config_from_json rejects"),
        (Err(e), Ok(Err(e2))) => assert_eq!(e.to_string(), e2.to_string()),
        (Err(e), Err(_)) => assert!(e.to_string().contains("config.json: invalid JSON"), "{e}"),
    }
    if let Err(e) = &from_file {
        assert!(e.to_string().contains(&dir.display().to_string()), "error does not name the file: {e}");
    }
});
