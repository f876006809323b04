//! Models by hub id: a cache laid out on disk as `hf download` leaves it (blobs, relative symlinks,
//! refs), resolved by branch, tag and commit hash, loaded through the symlinks; and the errors that name
//! the cache searched and what it holds.

mod common;

use common::{parity, TempDir};
use dpo_hf::hub_cache::{snapshot, store_snapshot, HubId, RepoKind};
use dpo_hf::load_model;

const C1: &str = "0123456789abcdef0123456789abcdef01234567";
const C2: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn cache(tmp: &TempDir) -> std::path::PathBuf {
    let root = tmp.path().join("hub");
    let src = parity("models/gpt2-policy");
    store_snapshot(&root, RepoKind::Model, "org/tiny-gpt2", C1, &src, &["main"]).unwrap();
    store_snapshot(&root, RepoKind::Model, "org/tiny-gpt2", C2, &src, &["v1.0", "refs/pr/3"]).unwrap();
    root
}

#[test]
fn branch_tag_and_commit_resolve_to_snapshots() {
    let tmp = TempDir::new("hub-resolve");
    let root = cache(&tmp);
    let at = |spec: &str| snapshot(&root, RepoKind::Model, &HubId::parse(spec).unwrap()).unwrap();
    let repo = root.join("models--org--tiny-gpt2");
    assert_eq!(at("org/tiny-gpt2"), repo.join("snapshots").join(C1));
    assert_eq!(at("org/tiny-gpt2@main"), repo.join("snapshots").join(C1));
    assert_eq!(at("org/tiny-gpt2@v1.0"), repo.join("snapshots").join(C2));
    assert_eq!(at("org/tiny-gpt2@refs/pr/3"), repo.join("snapshots").join(C2));
    assert_eq!(at(&format!("org/tiny-gpt2@{C2}")), repo.join("snapshots").join(C2));

    // The snapshot's files are symlinks into blobs/, and a model loads through them.
    let dir = at("org/tiny-gpt2");
    let link = std::fs::read_link(dir.join("model.safetensors")).unwrap();
    assert!(link.starts_with("../../blobs"), "{}", link.display());
    let m = load_model(&dir).unwrap();
    let direct = load_model(&parity("models/gpt2-policy")).unwrap();
    assert_eq!(m.params.wte.data, direct.params.wte.data);
}

#[test]
fn missing_ids_name_the_cache_and_what_it_holds() {
    let tmp = TempDir::new("hub-missing");
    let root = cache(&tmp);
    let err = |spec: &str, kind| snapshot(&root, kind, &HubId::parse(spec).unwrap()).unwrap_err().to_string();

    let e = err("org/absent", RepoKind::Model);
    for want in [
        "`org/absent`",
        "no models--org--absent",
        root.display().to_string().as_str(),
        "downloads nothing",
        "hf download org/absent",
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
    let e = err("org/tiny-gpt2", RepoKind::Dataset);
    assert!(e.contains("datasets--org--tiny-gpt2") && e.contains("--repo-type dataset"), "{e}");

    let e = err("org/tiny-gpt2@v9", RepoKind::Model);
    for want in ["revision `v9` is not in the cache", "main -> 0123456", "v1.0 -> 89abcde", "refs/pr/3 -> 89abcde", C1]
    {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }

    // A ref naming a snapshot that is not there (an interrupted download).
    std::fs::write(root.join("models--org--tiny-gpt2/refs/main"), "f".repeat(40)).unwrap();
    let e = err("org/tiny-gpt2", RepoKind::Model);
    assert!(e.contains("refs/main names commit") && e.contains("interrupted download"), "{e}");
}
