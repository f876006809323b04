use super::testutil::*;
use super::*;

#[test]
fn names_round_trip_and_errors_list_valid_ones() {
    for k in LossType::ALL {
        assert_eq!(k.name().parse::<LossType>().unwrap(), k);
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.name()));
    }
    let e = "dpo".parse::<LossType>().unwrap_err().to_string();
    assert!(e.contains("`dpo`") && e.contains("sigmoid") && e.contains("sigmoid_norm"), "{e}");
}

#[test]
fn parse_loss_list_follows_trl() {
    let l = parse_loss_list("sigmoid,sft", Some("1.0, 0.2")).unwrap();
    assert_eq!(l, vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2)]);
    assert_eq!(parse_loss_list("ipo", None).unwrap(), vec![(LossType::Ipo, 1.0)]);
    assert!(matches!(parse_loss_list("sigmoid,sft", Some("1.0")), Err(ObjectiveError::WeightCount { .. })));
    assert!(matches!(parse_loss_list("sigmoid", Some("x")), Err(ObjectiveError::BadWeight { .. })));
    assert!(matches!(parse_loss_list("", None), Err(ObjectiveError::NoLoss)));
}

#[test]
fn combined_is_the_weighted_sum() {
    let f = &fixtures()[0];
    let x = f.pair();
    let cfg = golden_cfg();
    let a = pair_loss(LossType::Sigmoid, &cfg, &x).unwrap();
    let b = pair_loss(LossType::Sft, &cfg, &x).unwrap();
    let c = combined(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2)], &cfg, &x).unwrap();
    assert!((c.loss - (a.loss + 0.2 * b.loss)).abs() < 1e-12);
    for i in 0..x.policy_chosen.len() {
        let want = a.d_policy_chosen[i] + 0.2 * b.d_policy_chosen[i];
        assert!((c.d_policy_chosen[i] - want).abs() < 1e-15);
    }
    let mean = c.per_row.iter().sum::<f64>() / c.per_row.len() as f64;
    assert!((mean - c.loss).abs() < 1e-12);
    check_grad(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2), (LossType::Ipo, 0.5)], &cfg, &x);
}

#[test]
fn reference_is_required_unless_reference_free() {
    let f = &fixtures()[0];
    let mut x = f.pair();
    x.ref_chosen = None;
    x.ref_rejected = None;
    let cfg = golden_cfg();
    let e = pair_loss(LossType::Ipo, &cfg, &x).unwrap_err();
    assert_eq!(e, ObjectiveError::MissingReference { loss: "ipo".into() });
    assert!(e.to_string().contains("`ipo`"));
    assert!(pair_loss(LossType::Sft, &cfg, &x).is_ok());
    assert!(pair_loss(LossType::Simpo, &cfg, &x).is_ok());
    assert!(pair_loss(LossType::Orpo, &cfg, &x).is_ok());
    // reference_free treats the reference as 0, with or without reference log-probs.
    let free = LossConfig { reference_free: true, ..cfg };
    let a = pair_loss(LossType::Sigmoid, &free, &x).unwrap();
    let b = pair_loss(LossType::Sigmoid, &free, &f.pair()).unwrap();
    assert_eq!(a, b);
    let zeros = vec![0.0; f.pc.len()];
    let y = PairLogps { ref_chosen: Some(&zeros), ref_rejected: Some(&zeros), ..f.pair() };
    assert_eq!(pair_loss(LossType::Sigmoid, &golden_cfg(), &y).unwrap(), a);
    check_grad(&[(LossType::Robust, 1.0)], &free, &x);
}

#[test]
fn shapes_are_checked() {
    let f = &fixtures()[0];
    let short = &f.rc[..3];
    let x = PairLogps { ref_chosen: Some(short), ..f.pair() };
    let e = pair_loss(LossType::Sigmoid, &golden_cfg(), &x).unwrap_err();
    assert_eq!(e, ObjectiveError::LengthMismatch { field: "ref_chosen", got: 3, expected: 24 });
    let empty = PairLogps::default();
    assert_eq!(pair_loss(LossType::Sigmoid, &golden_cfg(), &empty).unwrap_err(), ObjectiveError::EmptyBatch);
    assert_eq!(combined(&[], &golden_cfg(), &f.pair()).unwrap_err(), ObjectiveError::NoLoss);
}

#[test]
fn wpo_weights_scale_each_row() {
    let f = &fixtures()[0];
    let w: Vec<f64> = (0..f.pc.len()).map(|i| 0.2 + 0.03 * i as f64).collect();
    let x = PairLogps { weights: Some(&w), ..f.pair() };
    let cfg = golden_cfg();
    for kind in [LossType::Sigmoid, LossType::Ipo, LossType::Sft, LossType::NcaPair] {
        let plain = pair_loss(kind, &cfg, &f.pair()).unwrap();
        let weighted = pair_loss(kind, &cfg, &x).unwrap();
        let want = plain.per_row.iter().zip(&w).map(|(l, w)| l * w).sum::<f64>() / w.len() as f64;
        assert!((weighted.loss - want).abs() < 1e-12 * want.abs().max(1.0), "{kind}");
        check_grad(&[(kind, 1.0)], &cfg, &x);
    }
    let e = pair_loss(LossType::Aot, &cfg, &x).unwrap_err();
    assert!(matches!(e, ObjectiveError::InvalidConfig { .. }), "{e}");
}

#[test]
fn metrics_match_trl() {
    for f in fixtures() {
        let m = reward_metrics(0.1, &f.pair()).unwrap();
        let g = &f.losses["_metrics"];
        for (name, got) in m.named() {
            let want = g[name].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs().max(1e-3);
            assert!(rel < 1e-4, "{} {name}: {got} vs {want}", f.arch);
        }
    }
}

/// SimPO (with and without AlphaPO) and ORPO log their metrics as TRL's `CPOTrainer` and `ORPOTrainer` do,
/// on length-averaged log-probs: `expected/<arch>/averaged_metrics.json`, made by TRL's own `cpo_loss` and
/// `odds_ratio_loss` (`expected/averaged_metrics.py`). CPO-SimPO (`simpo,sft`) logs as simpo, and the
/// reference (which these losses ignore) changes nothing. DPO's losses, `ipo` among them, stay on sums.
#[test]
fn averaged_metrics_match_trl() {
    let golden = LossConfig { beta: 0.1, simpo_gamma: 0.5, label_smoothing: 0.1, ..LossConfig::default() };
    for f in fixtures() {
        let path = format!("{PARITY}/expected/{}/averaged_metrics.json", f.arch);
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let no_ref = PairLogps { ref_chosen: None, ref_rejected: None, ..f.pair() };
        type Case<'a> = (&'a str, &'a [(LossType, f64)], LossConfig);
        let cases: [Case; 4] = [
            ("simpo", &[(LossType::Simpo, 1.0)], golden.clone()),
            ("simpo", &[(LossType::Simpo, 1.0), (LossType::Sft, 1.0)], golden.clone()),
            ("simpo_alphapo", &[(LossType::Simpo, 1.0)], LossConfig { alphapo_alpha: 0.25, ..golden.clone() }),
            ("orpo", &[(LossType::Orpo, 1.0)], LossConfig { label_smoothing: 0.0, ..golden.clone() }),
        ];
        for (key, losses, cfg) in cases {
            let g = &want[key];
            for x in [&no_ref, &f.pair()] {
                let m = objective_reward_metrics(losses, &cfg, x).unwrap();
                for (name, got) in m.named() {
                    let w = g[name].as_f64().unwrap();
                    // TRL's `odds_ratio_loss` returns f32 rewards; the rest is f64 throughout.
                    let tol = if key == "orpo" { 1e-6 } else { 1e-10 };
                    assert!((got - w).abs() <= tol * w.abs().max(1.0), "{} {key} {name}: {got} vs {w}", f.arch);
                }
            }
            if let Some(loss) = g.get("loss") {
                let got = combined(&losses[..1], &cfg, &no_ref).unwrap().loss;
                assert!(rel_err(got, loss.as_f64().unwrap()) < 1e-12, "{} {key} loss: {got} vs {loss}", f.arch);
            }
        }
        // DPO's losses keep DPOTrainer's summed log-ratios, length-normalised ones included.
        for kind in [LossType::Sigmoid, LossType::Ipo, LossType::SigmoidNorm, LossType::Sft] {
            let m = objective_reward_metrics(&[(kind, 1.0)], &golden, &f.pair()).unwrap();
            assert_eq!(m, reward_metrics(golden.beta, &f.pair()).unwrap(), "{kind}");
        }
    }
}

/// Every loss declares its reward basis; only TRL's CPO simpo and ORPO average.
#[test]
fn reward_basis_follows_trl_trainers() {
    for kind in LossType::ALL {
        let want = match kind {
            LossType::Simpo => RewardBasis::AlphaPoAverage,
            LossType::Orpo => RewardBasis::Average,
            _ => RewardBasis::SummedLogRatio,
        };
        assert_eq!(kind.rewards(), want, "{kind}");
    }
}

/// A zero-length completion cannot be averaged: an error naming the loss, side and row.
#[test]
fn averaged_metrics_zero_length_is_an_error() {
    let f = &fixtures()[0];
    let mut lc = f.lc.clone();
    lc[2] = 0;
    let x = PairLogps { chosen_len: &lc, ..f.pair() };
    let e = objective_reward_metrics(&[(LossType::Simpo, 1.0)], &golden_cfg(), &x).unwrap_err().to_string();
    assert!(e.contains("simpo") && e.contains("chosen") && e.contains("row 2"), "{e}");
}

/// The losses marked per-pair are means of per-row terms: over a batch split in two, the loss is the
/// pair-weighted mean of the parts' losses and each row's gradient is its part's, scaled by the part's
/// share. This is what lets training push a micro-batch through the model a few pairs at a time.
#[test]
fn per_pair_losses_split_into_chunks() {
    let f = &fixtures()[0];
    let cfg = golden_cfg();
    let x = f.pair();
    let n = x.policy_chosen.len();
    let cut = 3;
    let part = |r: std::ops::Range<usize>| PairLogps {
        policy_chosen: &x.policy_chosen[r.clone()],
        policy_rejected: &x.policy_rejected[r.clone()],
        ref_chosen: x.ref_chosen.map(|v| &v[r.clone()]),
        ref_rejected: x.ref_rejected.map(|v| &v[r.clone()]),
        chosen_len: &x.chosen_len[r.clone()],
        rejected_len: &x.rejected_len[r],
        ..Default::default()
    };
    let mut split_ok = vec![];
    for kind in LossType::ALL {
        let losses = [(kind, 1.0)];
        let whole = combined(&losses, &cfg, &x).unwrap();
        let (a, b) = (combined(&losses, &cfg, &part(0..cut)).unwrap(), combined(&losses, &cfg, &part(cut..n)).unwrap());
        let (sa, sb) = (cut as f64 / n as f64, (n - cut) as f64 / n as f64);
        let close = |u: f64, v: f64| (u - v).abs() <= 1e-12 * u.abs().max(v.abs()).max(1.0);
        let mut ok = close(whole.loss, sa * a.loss + sb * b.loss);
        for i in 0..n {
            let (p, s, j) = if i < cut { (&a, sa, i) } else { (&b, sb, i - cut) };
            ok &= close(whole.d_policy_chosen[i], s * p.d_policy_chosen[j]);
            ok &= close(whole.d_policy_rejected[i], s * p.d_policy_rejected[j]);
        }
        if kind.per_pair() {
            assert!(ok, "{kind} is marked per-pair but does not split");
        }
        split_ok.push((kind, ok));
    }
    // The check has teeth: the batch-coupled losses do not split on this data.
    for (kind, ok) in split_ok {
        if matches!(kind, LossType::Aot | LossType::Sft) {
            assert!(!ok, "{kind} unexpectedly splits");
        }
    }
}

#[test]
fn config_defaults_are_trl_and_serde_round_trips() {
    let c = LossConfig::default();
    assert_eq!((c.beta, c.label_smoothing, c.f_alpha_divergence_coef, c.discopop_tau), (0.1, 0.0, 0.5, 0.05));
    assert_eq!((c.simpo_gamma, c.alphapo_alpha), (0.5, 0.0));
    let s = serde_json::to_string(&c).unwrap();
    assert!(s.contains("\"f_divergence\":\"reverse_kl\""), "{s}");
    let back: LossConfig = serde_json::from_str(&s).unwrap();
    assert_eq!(back, c);
    let partial: LossConfig = serde_json::from_str(r#"{"beta": 0.5, "f_divergence": "js_divergence"}"#).unwrap();
    assert_eq!(partial.f_divergence, FDivergence::JsDivergence);
    assert_eq!(partial.discopop_tau, 0.05);
}

/// The registry is one list: names are unique, `LOSSES[k as usize]` is `k`'s spec, and every loss has help.
#[test]
fn registry_is_consistent() {
    assert_eq!(LOSSES.len(), LossType::ALL.len());
    let mut names = std::collections::BTreeSet::new();
    for (i, k) in LossType::ALL.into_iter().enumerate() {
        assert!(std::ptr::eq(k.spec(), LOSSES[i]), "{k}");
        assert!(names.insert(k.name()), "{k} registered twice");
        assert!(!k.help().is_empty(), "{k} has no help");
    }
    let listed: Vec<_> = LossType::names_and_help().map(|(n, _)| n).collect();
    assert_eq!(listed, LossType::ALL.map(|k| k.name()));
    let e = serde_json::from_str::<LossType>("\"dpo\"").unwrap_err().to_string();
    assert!(e.contains("`dpo`") && e.contains("orpo"), "{e}");
}

/// The properties each file declares are the ones TRL gives its loss (pinned here so that a spec edit is
/// a visible decision).
#[test]
fn registry_properties_are_trls() {
    use LossType::*;
    let names = |f: fn(LossType) -> bool| LossType::ALL.into_iter().filter(|&k| f(k)).collect::<Vec<_>>();
    assert_eq!(names(|k| !k.needs_reference()), [Sft, Simpo, Orpo]);
    assert_eq!(names(|k| !k.per_pair()), [Aot, AotUnpaired, Sft, Orpo]);
    assert_eq!(names(LossType::supports_f_divergence), [Sigmoid, Hinge, Ipo, ExoPair, Robust, Discopop, Sft, Cdpo]);
    assert_eq!(names(|k| !k.supports_weighting()), [Aot, AotUnpaired, Simpo, Orpo]);
    assert_eq!(names(LossType::reads_prompt), [Orpo]);
    assert_eq!(names(LossType::reads_label_smoothing), [ExoPair, Robust, Aot, AotUnpaired, Cdpo, Simpo]);
}
