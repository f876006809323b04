//! Models and datasets by hub id (`org/name[@revision]`), read from the local Hugging Face cache only.
//!
//! The layout is `huggingface_hub`'s:
//!
//! ```text
//! <cache>/models--org--name/refs/main                  the commit hash the branch `main` points at
//! <cache>/models--org--name/snapshots/<commit>/...     the repository's files, symlinks into blobs/
//! <cache>/models--org--name/blobs/<sha>                the file contents
//! <cache>/datasets--org--name/...                      the same for a dataset repository
//! ```
//!
//! `<cache>` is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, as `huggingface_hub` chooses it. Nothing is ever downloaded: a missing id is
//! an error naming the cache searched, the revisions it holds, and the command that fetches it.
//!
//! Written here rather than taken from the `hf-hub` crate: hf-hub 1.x pulls reqwest, tokio, hyper and
//! rustls even with its default features off, and 0.4's `Cache` ignores `HF_HUB_CACHE`, resolves a branch
//! to one named file only (no commit-hash revisions, no listing for an error message) and panics without
//! a home directory. This is the whole of what reading the layout takes.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The two kinds of repository a run reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The folder prefix (`models--`, `datasets--`).
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// What `hf download` needs to fetch this kind.
    fn download_flag(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => " --repo-type dataset",
        }
    }
}

/// A parsed `org/name[@revision]` (or `name[@revision]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// Parses a hub id. `None` for anything that cannot be one (an absolute path, `./x`, `a/b/c`, `..`),
    /// which a caller then treats as a plain path.
    pub fn parse(spec: &str) -> Option<HubId> {
        Self::parse_checked(spec).ok()
    }

    /// [`Self::parse`], with what makes `spec` not a hub id when it is not one.
    pub fn parse_checked(spec: &str) -> std::result::Result<HubId, String> {
        let (repo, revision) = match spec.split_once('@') {
            Some((_, "")) => return Err("the revision after `@` is empty".into()),
            Some((r, rev)) if valid_revision(rev) => (r, Some(rev.to_string())),
            Some((_, rev)) => {
                return Err(format!(
                    "revision `{rev}` is not a branch, tag or commit (letters, digits, `-_./`, no `..`)"
                ))
            }
            None => (spec, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 {
            return Err(format!("`{repo}` has {} parts; a hub id is `org/name` or `name`", parts.len()));
        }
        if let Some(bad) = parts.iter().find(|p| !valid_name(p)) {
            return Err(format!(
                "`{bad}` is not a repository or organisation name (letters, digits, `-_.`, not starting or \
                 ending with `-` or `.`, no `--` or `..`)"
            ));
        }
        if repo.len() > 96 {
            return Err(format!("`{repo}` is longer than the hub's 96 characters"));
        }
        Ok(HubId { repo: repo.to_string(), revision })
    }

    /// `models--org--name`.
    pub fn folder(&self, kind: RepoKind) -> String {
        format!("{}--{}", kind.prefix(), self.repo.replace('/', "--"))
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// The hub's rule for a name part: letters, digits, `-`, `_`, `.`; not starting or ending with `-` or `.`,
/// no `--` or `..` (both would make the cache folder name ambiguous or climb out of it).
fn valid_name(p: &str) -> bool {
    !p.is_empty()
        && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !p.starts_with(['-', '.'])
        && !p.ends_with(['-', '.'])
        && !p.contains("--")
        && !p.contains("..")
}

/// A branch, tag (`v1.0`, `refs/pr/1`) or commit hash: relative path components only.
fn valid_revision(rev: &str) -> bool {
    Path::new(rev).components().all(|c| matches!(c, Component::Normal(_)))
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cache `huggingface_hub` uses, from the environment; `None` when no variable is set and there is no
/// home directory.
pub fn cache_root() -> Option<PathBuf> {
    cache_root_from(|k| std::env::var_os(k), std::env::var_os("HOME").map(PathBuf::from).as_deref())
}

/// [`cache_root`] with the environment and home directory given (for tests).
pub fn cache_root_from(env: impl Fn(&str) -> Option<OsString>, home: Option<&Path>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(|v| expand_home(PathBuf::from(v), home));
    if let Some(p) = var("HF_HUB_CACHE") {
        return Some(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Some(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("huggingface").join("hub"));
    }
    home.map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// `~/x` → `<home>/x`, as Python's `expanduser` does for these variables.
fn expand_home(p: PathBuf, home: Option<&Path>) -> PathBuf {
    match (p.strip_prefix("~"), home) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => p,
    }
}

/// A model argument: an existing local path as it is (it always wins over a hub id of the same
/// spelling); else a hub id resolved to its snapshot directory in the cache; else the path as it is, for
/// the loader to report.
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    resolve_arg(RepoKind::Model, spec)
}

/// [`resolve_model`] for any kind of repository.
pub fn resolve_arg(kind: RepoKind, spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some(text) = spec.to_str() else { return Ok(spec.to_path_buf()) };
    let root = cache_root();
    let id = match HubId::parse_checked(text) {
        Ok(id) => id,
        // Meant as a hub id (`org/name@rev`, or two relative parts) but not one: said as such, rather than
        // as a missing directory of that name.
        Err(why) if meant_as_id(spec) => {
            let msg = format!("no such local path, and not a hub id `org/name[@revision]`: {why}");
            return Err(Error::Hub { spec: text.to_string(), cache: root.unwrap_or_else(default_cache), msg });
        }
        Err(_) => return Ok(spec.to_path_buf()),
    };
    // A bare `name` is a hub id only when the cache holds it (`gpt2`); otherwise it is a missing path.
    if !id.repo.contains('/') && id.revision.is_none() {
        match &root {
            Some(r) if r.join(id.folder(kind)).is_dir() => {}
            _ => return Ok(spec.to_path_buf()),
        }
    }
    let root = root.ok_or_else(|| Error::Hub {
        spec: id.repo.clone(),
        cache: default_cache(),
        msg: "no Hugging Face cache: HF_HUB_CACHE, HF_HOME and HOME are all unset".into(),
    })?;
    snapshot(&root, kind, &id)
}

/// The cache named in errors when the environment gives none.
fn default_cache() -> PathBuf {
    PathBuf::from("~/.cache/huggingface/hub")
}

/// A missing argument written like a hub id: with an `@`, or two relative parts (`org/name`), none `.`/`..`.
fn meant_as_id(spec: &Path) -> bool {
    let parts: Vec<Component> = spec.components().collect();
    spec.to_string_lossy().contains('@')
        || (parts.len() == 2 && parts.iter().all(|c| matches!(c, Component::Normal(_))))
}

/// The snapshot directory of `id` in the cache at `root`.
pub fn snapshot(root: &Path, kind: RepoKind, id: &HubId) -> Result<PathBuf> {
    let repo_dir = root.join(id.folder(kind));
    let fetch = format!(
        "dpo reads the local cache only and downloads nothing; fetch it first with `hf download{} {}{}`",
        kind.download_flag(),
        id.repo,
        id.revision.as_ref().map(|r| format!(" --revision {r}")).unwrap_or_default()
    );
    let err = |msg: String| Error::Hub { spec: spec_of(id), cache: root.to_path_buf(), msg };
    if !repo_dir.is_dir() {
        let what = match kind {
            RepoKind::Model => "neither a local directory nor a model",
            RepoKind::Dataset => "neither a local file or directory nor a dataset",
        };
        return Err(err(format!("{what} in the Hugging Face cache (no {} there); {fetch}", id.folder(kind))));
    }
    let rev = id.revision();
    let commit = if is_commit_hash(rev) && repo_dir.join("snapshots").join(rev).is_dir() {
        rev.to_string()
    } else {
        let ref_file = repo_dir.join("refs").join(rev);
        match std::fs::read_to_string(&ref_file) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                return Err(err(format!(
                    "revision `{rev}` is not in the cache; {}; {fetch}",
                    found_revisions(&repo_dir)
                )))
            }
        }
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if commit.is_empty() || !is_commit_hash(&commit) || !dir.is_dir() {
        return Err(err(format!(
            "refs/{rev} names commit `{commit}` but {} is not a snapshot directory (an interrupted download?); \
             {}; {fetch}",
            dir.display(),
            found_revisions(&repo_dir)
        )));
    }
    Ok(dir)
}

fn spec_of(id: &HubId) -> String {
    match &id.revision {
        Some(r) => format!("{}@{r}", id.repo),
        None => id.repo.clone(),
    }
}

/// "revisions found: main -> 0123abc, v1.0 -> 4567def; snapshots: 0123abc..., ..." for error messages.
fn found_revisions(repo_dir: &Path) -> String {
    let mut refs = Vec::new();
    list_refs(&repo_dir.join("refs"), "", &mut refs);
    refs.sort();
    let mut snaps: Vec<String> = std::fs::read_dir(repo_dir.join("snapshots"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    snaps.sort();
    let refs = if refs.is_empty() { "none".to_string() } else { refs.join(", ") };
    let snaps = if snaps.is_empty() { "none".to_string() } else { snaps.join(", ") };
    format!("revisions found: {refs}; snapshots: {snaps}")
}

fn list_refs(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            list_refs(&e.path(), &format!("{name}/"), out);
        } else {
            let commit = std::fs::read_to_string(e.path()).unwrap_or_default();
            let short: String = commit.trim().chars().take(7).collect();
            out.push(format!("{name} -> {short}"));
        }
    }
}

/// Stores the files under `src` (recursively) in the cache at `root` as `hf download` leaves them: each
/// file's content in `blobs/<sha256>`, a relative symlink to it at `snapshots/<commit>/<path>`, and
/// `refs/<name>` holding `commit` for each of `refs`. Returns the snapshot directory. For tests and tools
/// that prepare a cache on a machine without network.
#[cfg(unix)]
pub fn store_snapshot(
    root: &Path,
    kind: RepoKind,
    repo: &str,
    commit: &str,
    src: &Path,
    refs: &[&str],
) -> std::io::Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let id = HubId { repo: repo.to_string(), revision: None };
    let repo_dir = root.join(id.folder(kind));
    let snap = repo_dir.join("snapshots").join(commit);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(src.join(&rel))? {
            let e = e?;
            let rel_file = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(rel_file);
                continue;
            }
            let bytes = std::fs::read(e.path())?;
            let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(blobs.join(&sha), &bytes)?;
            let link = snap.join(&rel_file);
            std::fs::create_dir_all(link.parent().unwrap_or(&snap))?;
            // snapshots/<commit>/<rel> -> ../../(one more per directory level)blobs/<sha>
            let up = "../".repeat(2 + rel.components().count());
            std::os::unix::fs::symlink(format!("{up}blobs/{sha}"), &link)?;
        }
    }
    std::fs::create_dir_all(&snap)?;
    for r in refs {
        let f = repo_dir.join("refs").join(r);
        std::fs::create_dir_all(f.parent().unwrap_or(&repo_dir))?;
        std::fs::write(f, commit)?;
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M@v1.0").unwrap();
        assert_eq!((id.repo.as_str(), id.revision.as_deref()), ("HuggingFaceTB/SmolLM2-135M", Some("v1.0")));
        assert_eq!(id.folder(RepoKind::Model), "models--HuggingFaceTB--SmolLM2-135M");
        assert_eq!(HubId::parse("gpt2").unwrap().folder(RepoKind::Dataset), "datasets--gpt2");
        assert_eq!(HubId::parse("a/b@refs/pr/1").unwrap().revision.as_deref(), Some("refs/pr/1"));
        for bad in ["/abs/path", "./x", "a/b/c", "../x", "a/..", "a@", "a/b@../x", "a--b/c", "-a/b", "a b/c", ""] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_malformed_id_says_why_and_a_path_stays_a_path() {
        let why = |s: &str| HubId::parse_checked(s).unwrap_err();
        assert!(why("org/name@").contains("revision after `@` is empty"));
        assert!(why("org/name@../x").contains("revision `../x`"));
        assert!(why("org/na--me").contains("`na--me` is not a repository"));
        assert!(why("a/b/c@main").contains("3 parts"));
        let root = std::env::temp_dir();
        for meant in ["org/na--me", "org/name@", "x@y"] {
            assert!(meant_as_id(Path::new(meant)), "{meant}");
        }
        for path in ["./x", "../x/y", "/abs/x", "a/b/c", "name"] {
            assert!(!meant_as_id(Path::new(path)), "{path}");
        }
        // Through the resolver: the typed error, naming the cache; a path stays a path for its loader.
        let missing = root.join("dpo-no-such-dir").join("a b");
        assert_eq!(resolve_model(&missing).unwrap(), missing);
        match resolve_model(Path::new("org/na--me")) {
            Err(Error::Hub { spec, msg, .. }) => assert!(spec == "org/na--me" && msg.contains("not a hub id"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cache_root_follows_huggingface_hub() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        let home = Some(Path::new("/home/u"));
        assert_eq!(cache_root_from(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")]), home).unwrap(), Path::new("/c"));
        assert_eq!(cache_root_from(env(&[("HF_HOME", "~/h")]), home).unwrap(), Path::new("/home/u/h/hub"));
        assert_eq!(
            cache_root_from(env(&[("HF_HUB_CACHE", ""), ("XDG_CACHE_HOME", "/x")]), home).unwrap(),
            Path::new("/x/huggingface/hub")
        );
        assert_eq!(cache_root_from(env(&[]), home).unwrap(), Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(cache_root_from(env(&[]), None), None);
    }
}
