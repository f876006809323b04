//! Which command wrote a run directory, read from its config.toml: `--resume` given another command's
//! run then names the command that continues it, instead of failing to parse the file.

use std::path::Path;

/// The commands that write a resumable run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RunKind {
    Train,
    Sft,
    RewardModel,
    Ppo,
}

impl RunKind {
    fn command(self) -> &'static str {
        match self {
            RunKind::Train => "dpo train",
            RunKind::Sft => "dpo sft",
            RunKind::RewardModel => "dpo reward-model train",
            RunKind::Ppo => "dpo ppo",
        }
    }

    /// The command that wrote a config.toml reading `text`, by what only it writes: a PPO run names its
    /// reward model and prompts, a reward-model run keeps its training settings in a `[train]` table,
    /// and `dpo train`/`dpo sft` record their `method`. `None`: none of these (not a run's config).
    fn of_config(text: &str) -> Option<RunKind> {
        let table: toml::Table = text.parse().ok()?;
        if table.contains_key("reward_model") && table.contains_key("prompts") {
            return Some(RunKind::Ppo);
        }
        if table.get("train").is_some_and(toml::Value::is_table) {
            return Some(RunKind::RewardModel);
        }
        match table.get("method")?.as_str()? {
            "sft" => Some(RunKind::Sft),
            _ => Some(RunKind::Train),
        }
    }
}

/// Refuses to resume as `expected[0]`'s run the run `run`, whose config.toml reads `text`, when another
/// command wrote it (one of `expected` may continue it), and says which command does.
pub(super) fn check(run: &Path, text: &str, expected: &[RunKind]) -> anyhow::Result<()> {
    match RunKind::of_config(text) {
        Some(kind) if !expected.contains(&kind) => anyhow::bail!(
            "--resume {run}: a `{wrote}` run (its config.toml says so), not a `{asked}` one; continue it with \
             `{wrote} --resume {run}`",
            run = run.display(),
            wrote = kind.command(),
            asked = expected[0].command(),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_s_config_is_known_by_its_keys() {
        let ppo = "model = \"m\"\nreward_model = \"r\"\nprompts = \"p\"\nchat = false\n[ppo]\nkl_coef = 0.05\n";
        let rm = "model = \"m\"\ndata = \"d\"\n[train]\nlr = 1e-5\n";
        let sft = "method = \"sft\"\nmodel = \"m\"\n";
        let dpo = "method = \"pairs\"\nmodel = \"m\"\nloss = [\"sigmoid\"]\n";
        let kto = "method = \"kto\"\nmodel = \"m\"\n";
        let of = RunKind::of_config;
        assert_eq!(
            [of(ppo), of(rm), of(sft), of(dpo), of(kto)],
            [
                Some(RunKind::Ppo),
                Some(RunKind::RewardModel),
                Some(RunKind::Sft),
                Some(RunKind::Train),
                Some(RunKind::Train)
            ]
        );
        // Not a run's config (or not TOML): left to the command's own parse error.
        assert_eq!(of("lr = 1e-5\n"), None);
        assert_eq!(of("not = toml = at all"), None);
        let run = Path::new("/runs/rm");
        let e = check(run, rm, &[RunKind::Ppo]).unwrap_err().to_string();
        assert!(
            e.contains("a `dpo reward-model train` run") && e.contains("`dpo reward-model train --resume /runs/rm`"),
            "{e}"
        );
        assert!(check(run, sft, &[RunKind::Train, RunKind::Sft]).is_ok());
        assert!(check(run, "lr = 1\n", &[RunKind::Ppo]).is_ok());
    }
}
