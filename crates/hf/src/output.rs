//! The one guard on what a command writes: an output never goes into or over one of its own inputs (the
//! base model, the adapter, a file of theirs), and an output that already holds a model or a file is
//! replaced only when the caller says so. Paths are compared canonically (symbolic links, `..`, a relative
//! path against an absolute one; for an output not yet created, its nearest existing ancestor), so two
//! spellings of one directory are one directory.
//!
//! The errors state the facts (which path, which input); the command line adds the flag to pass.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// An input of a command: what it is (the caller's name for it, e.g. `--model`) and where it is.
pub type Input<'a> = (&'a str, &'a Path);

/// The files of a model or adapter directory that make it one (what loading reads, what saving writes):
/// a file that is one of these is never an output.
fn is_model_file(name: &str) -> bool {
    const NAMED: &[&str] = &[
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    ];
    NAMED.contains(&name)
        || [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// `path` made absolute and canonical: the path itself when it exists, else its nearest existing ancestor
/// canonicalized with the rest appended (`.` dropped, `..` applied).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    if let Ok(c) = abs.canonicalize() {
        return c;
    }
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    while let Some(parent) = base.parent() {
        rest.push(base.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("..")));
        if let Ok(c) = parent.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                match Path::new(part).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(part),
                }
            }
            return out;
        }
        base = parent;
    }
    abs
}

fn overlap(output: &Path, flag: &str, input: &Path, relation: &str) -> Error {
    Error::OutputIsInput {
        output: output.to_path_buf(),
        relation: format!("{relation} the {flag} {}", input.display()),
    }
}

/// Refuses an output path (a file or a directory that is written whole) that is one of `inputs`, lies
/// inside one, or holds one (replacing it would delete the input).
pub fn check_disjoint(output: &Path, inputs: &[Input]) -> Result<()> {
    check_holds_none(output, inputs)?;
    let out = resolve(output);
    for &(flag, input) in inputs {
        if out.starts_with(resolve(input)) {
            return Err(overlap(output, flag, input, "is inside"));
        }
    }
    Ok(())
}

/// Refuses an output path that is one of `inputs` or holds one: what replacing it (or moving it aside)
/// would delete. An output inside an input is not refused here (a run directory inside a model's, say).
pub fn check_holds_none(output: &Path, inputs: &[Input]) -> Result<()> {
    let out = resolve(output);
    for &(flag, input) in inputs {
        let inp = resolve(input);
        if inp == out {
            return Err(overlap(output, flag, input, "is"));
        }
        if inp.starts_with(&out) {
            return Err(overlap(output, flag, input, "holds"));
        }
    }
    Ok(())
}

/// What makes an existing directory a model (or adapter) directory, by its file names, if anything.
fn model_files_in(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name().to_string_lossy().into_owned();
        if name == "config.json" || name == "adapter_config.json" || name.ends_with(".safetensors") {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// The guard on a model directory `output` that is written whole (replacing what is there): refused when
/// it is, lies inside or holds one of `inputs`, when it exists and is not a directory, and, unless
/// `overwrite`, when it already holds a model (`config.json`, `adapter_config.json` or `*.safetensors`).
/// Creates nothing.
pub fn check_dir(output: &Path, inputs: &[Input], overwrite: bool) -> Result<()> {
    check_disjoint(output, inputs)?;
    if output.exists() {
        if !output.is_dir() {
            return Err(Error::dir(output, "exists and is not a directory; nothing was written"));
        }
        let found = model_files_in(output)?;
        if !found.is_empty() && !overwrite {
            let what = format!("already holds a model ({})", found.join(", "));
            return Err(Error::OutputExists { path: output.into(), what });
        }
    }
    Ok(())
}

/// The guard on a file `output` (a GGUF export, say): refused when it is one of `inputs` or one of an
/// input directory's model files (its config, weights, tokenizer, adapter: compared canonically, so a
/// symbolic link to one counts), when it is or holds an input directory, when it is a directory, and,
/// unless `overwrite`, when it exists. A new file beside an input's files (`MODEL/model.gguf`) is allowed.
pub fn check_file(output: &Path, inputs: &[Input], overwrite: bool) -> Result<()> {
    check_holds_none(output, inputs)?;
    let out = resolve(output);
    for &(flag, input) in inputs {
        let inp = resolve(input);
        if !inp.is_dir() || !out.starts_with(&inp) {
            continue;
        }
        for entry in std::fs::read_dir(&inp).map_err(|e| Error::io(input, e))? {
            let entry = entry.map_err(|e| Error::io(input, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_model_file(&name) && resolve(&entry.path()) == out {
                return Err(overlap(output, flag, input, "is a file of"));
            }
        }
    }
    if output.is_dir() {
        return Err(Error::dir(output, "is a directory; nothing was written"));
    }
    if output.exists() && !overwrite {
        return Err(Error::OutputExists { path: output.into(), what: "already exists".into() });
    }
    Ok(())
}

/// Bytes free to an unprivileged writer on the file system that holds `path` (or would: its nearest
/// existing ancestor); `None` where that cannot be asked (not Unix, or the call fails).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let mut at = resolve(path);
    while !at.exists() {
        at = at.parent()?.to_path_buf();
    }
    free_bytes_at(&at)
}

#[cfg(unix)]
fn free_bytes_at(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is written by the call before it is read (only on success).
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    let st = unsafe { st.assume_init() };
    // Their widths differ between platforms (32 bits on some).
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes_at(_: &Path) -> Option<u64> {
    None
}

/// Refuses to start writing `need` bytes (`what`, e.g. "the merged model") to `output` when its file system
/// has less free: a write that would fail when the disk fills is refused before it begins (the atomic
/// write would leave nothing, but only after the time spent). Passes where the free space is unknown.
pub fn check_room(output: &Path, what: &str, need: u64) -> Result<()> {
    match free_bytes(output) {
        Some(free) if free < need => {
            Err(Error::NoRoom { path: output.to_path_buf(), what: what.to_string(), need, free })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hf-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    fn model_dir(d: &Path) -> PathBuf {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        std::fs::write(d.join("model.safetensors"), "w").unwrap();
        d.to_path_buf()
    }

    #[test]
    fn resolve_spells_one_path_one_way() {
        let d = scratch("resolve");
        let m = model_dir(&d.join("m"));
        assert_eq!(resolve(&d.join("m/../m/./")), m);
        assert_eq!(resolve(&d.join("new/../m/x")), m.join("x"));
        assert_eq!(resolve(&d.join("new/a/b")), d.join("new/a/b"));
        std::os::unix::fs::symlink(&m, d.join("link")).unwrap();
        assert_eq!(resolve(&d.join("link/model.safetensors")), m.join("model.safetensors"));
    }

    #[test]
    fn a_directory_output_is_never_an_input_and_replaces_a_model_only_when_asked() {
        let d = scratch("dir");
        let m = model_dir(&d.join("m"));
        let a = model_dir(&d.join("run/final"));
        let ins: [Input; 2] = [("--model", &m), ("--adapter", &a)];
        let e = |out: &Path, ow: bool| check_dir(out, &ins, ow).unwrap_err().to_string();
        assert!(e(&d.join("m/."), true).contains("is the --model"), "{}", e(&m, true));
        assert!(e(&m.join("merged"), false).contains("is inside the --model"));
        assert!(e(&d.join("run"), true).contains("holds the --adapter"));
        let other = model_dir(&d.join("other"));
        assert!(e(&other, false).contains("already holds a model (config.json, model.safetensors)"));
        check_dir(&other, &ins, true).unwrap();
        check_dir(&d.join("new"), &ins, false).unwrap();
        std::fs::create_dir(d.join("empty")).unwrap();
        check_dir(&d.join("empty"), &ins, false).unwrap();
        std::fs::write(d.join("f"), "x").unwrap();
        assert!(e(&d.join("f"), true).contains("exists and is not a directory"));
    }

    #[test]
    fn a_file_output_is_never_an_input_file_and_replaces_a_file_only_when_asked() {
        let d = scratch("file");
        let m = model_dir(&d.join("m"));
        let ins: [Input; 1] = [("--model", &m)];
        let e = |out: &Path, ow: bool| check_file(out, &ins, ow).unwrap_err().to_string();
        assert!(e(&m.join("model.safetensors"), true).contains("is a file of the --model"));
        assert!(e(&d.join("m/../m/config.json"), true).contains("is a file of the --model"));
        std::os::unix::fs::symlink(m.join("model.safetensors"), d.join("w.gguf")).unwrap();
        assert!(e(&d.join("w.gguf"), true).contains("is a file of the --model"));
        assert!(e(&m, true).contains("is the --model"));
        assert!(e(&d, true).contains("holds the --model"));
        check_file(&m.join("model.gguf"), &ins, false).unwrap();
        std::fs::write(m.join("model.gguf"), "old").unwrap();
        assert!(e(&m.join("model.gguf"), false).contains("already exists"));
        check_file(&m.join("model.gguf"), &ins, true).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        assert!(e(&d.join("sub"), true).contains("is a directory"));
    }

    #[test]
    fn an_output_larger_than_its_free_space_is_refused_before_it_is_written() {
        let d = scratch("room");
        // A path not yet created is asked of its nearest existing ancestor.
        let free = free_bytes(&d.join("new/run/final-merged")).expect("statvfs of the scratch directory");
        assert!(free > 0);
        check_room(&d.join("new"), "the model", 0).unwrap();
        check_room(&d.join("new"), "the model", free / 2).unwrap();
        let e = check_room(&d.join("new"), "the merged model", u64::MAX).unwrap_err().to_string();
        assert!(e.contains("the merged model needs 17179869184.00 GiB but its file system has"), "{e}");
        assert!(e.ends_with("free; nothing was written") && !d.join("new").exists(), "{e}");
    }
}
