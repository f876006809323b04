//! Writing files and directories so that a crash never leaves a half-written one behind: the new content is
//! written under a temporary name beside its destination (the same filesystem, so the rename is atomic),
//! synced, and renamed into place only when complete. The project's one definition of this; the trainer's
//! config, metrics, caches and reports, the safetensors writer and model directories all go through it.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// `dir/.name.tmp-<pid>`: a hidden sibling of `path` on the same filesystem.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Streams the file's content through `fill` into a temporary sibling (buffered, so large tensors need no
/// second copy in memory), syncs it, then renames it onto `path`. On failure (a full disk, a file-size
/// limit) the temporary file is removed and `path` is untouched.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The crate's own error, carried out of a writer whose API speaks `std::io::Result` ([`write_with`]'s
/// `fill`, the GGUF writer's tensor data) and given back as it is, not as an I/O error of the file.
#[derive(Default)]
pub(crate) struct Carried(Option<crate::Error>);

impl Carried {
    /// `e` as the I/O error that stops the writer; kept to be returned by [`Carried::result`].
    pub(crate) fn carry(&mut self, e: crate::Error) -> std::io::Error {
        let io = std::io::Error::other(e.to_string());
        self.0 = Some(e);
        io
    }

    /// What writing `path` came to: the carried error if one stopped it, else its I/O error.
    pub(crate) fn result(self, path: &Path, written: std::io::Result<()>) -> crate::Result<()> {
        match (written, self.0) {
            (Err(_), Some(e)) => Err(e),
            (written, _) => written.map_err(|e| crate::Error::Io { path: path.to_path_buf(), source: e }),
        }
    }
}

/// Writes `bytes` to `path` atomically (see [`write_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Moves the complete directory `stage` to `dest`, replacing what `dest` held: the old directory is moved
/// aside (`name.old-<pid>`), the new one moved in, then the old one deleted. If the second rename fails the
/// old directory is put back, so `dest` is always either the old or the new directory, never a mixture.
/// `stage` must be a sibling of `dest` (the same filesystem).
pub fn replace_dir(stage: &Path, dest: &Path) -> std::io::Result<()> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let old = dest.with_file_name(format!("{name}.old-{}", std::process::id()));
    let had_old = dest.exists();
    if had_old {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dest, &old)?;
    }
    if let Err(e) = std::fs::rename(stage, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        return Err(e);
    }
    if had_old {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hf-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = scratch("file");
        let p = d.join("a.txt");
        write_atomic(&p, b"old").unwrap();
        let err = write_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "a temporary file was left behind");
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn replace_dir_swaps_whole_directories() {
        let d = scratch("dir");
        let (stage, dest) = (d.join("stage"), d.join("dest"));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("old.txt"), b"old").unwrap();
        std::fs::create_dir_all(&stage).unwrap();
        std::fs::write(stage.join("new.txt"), b"new").unwrap();
        replace_dir(&stage, &dest).unwrap();
        assert!(!stage.exists());
        assert!(dest.join("new.txt").is_file() && !dest.join("old.txt").exists());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "the old directory was left behind");
        // A stage that does not exist fails and leaves the destination as it was.
        assert!(replace_dir(&d.join("missing"), &dest).is_err());
        assert!(dest.join("new.txt").is_file());
    }
}
