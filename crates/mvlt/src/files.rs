//! Reading files a user (or a client) names, with the checks that come before any allocation:
//! the path exists, is a regular file (not a FIFO, device or folder, which never end or cannot be
//! sized), is not over the size limit of what it is meant to be; and paths that must stay inside a
//! folder are resolved (symlinks included) before they are trusted.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest image file read from disk (a 4000x6000 PNG is about 70 MB at most).
pub const MAX_IMAGE_FILE_BYTES: u64 = 128 << 20;
/// Largest vocabulary file (bert-base-uncased's is 226 KiB).
pub const MAX_VOCAB_FILE_BYTES: u64 = 64 << 20;
/// Largest JSON config or class-name file.
pub const MAX_SMALL_FILE_BYTES: u64 = 16 << 20;

/// The size of `path` if it is a regular file (symlinks followed); otherwise an error saying what
/// it is. `what` names the file's role in messages ("image", "vocabulary").
pub fn regular_file_size(path: &Path, what: &str) -> Result<u64> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{what} {} does not exist", path.display()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {what} {}", path.display())),
    };
    if meta.is_dir() {
        bail!("{what} {} is a folder, not a file", path.display());
    }
    if !meta.is_file() {
        bail!("{what} {} is not a regular file (a FIFO, socket or device?)", path.display());
    }
    Ok(meta.len())
}

/// The whole of a regular file of at most `max` bytes. The size is checked before reading, and the
/// read stops at `max` too, in case the file grows meanwhile.
pub fn read_limited(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let size = regular_file_size(path, what)?;
    if size > max {
        bail!("{what} {} is {size} bytes, over the limit of {max} bytes", path.display());
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(max + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {what} {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{what} {} grew past the limit of {max} bytes while being read", path.display());
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text_limited(path: &Path, what: &str, max: u64) -> Result<String> {
    String::from_utf8(read_limited(path, what, max)?)
        .map_err(|e| anyhow::anyhow!("{what} {} is not UTF-8 text ({e})", path.display()))
}

/// `s` safe to print on a terminal: control characters (ANSI and OSC escape sequences begin
/// with one) written as escapes, so a name read from a file cannot move the cursor, retitle the
/// window or hide text; at most `MAX_SHOWN` characters.
pub fn printable(s: &str) -> String {
    const MAX_SHOWN: usize = 200;
    let mut out = String::with_capacity(s.len().min(MAX_SHOWN));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_SHOWN {
            out.push_str("...");
            break;
        }
        if c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A folder that image paths must stay inside, resolved (symlinks included) once.
#[derive(Clone, Debug)]
pub struct Confined {
    root: PathBuf,
}

impl Confined {
    pub fn new(root: &Path) -> Result<Confined> {
        let root = root.canonicalize().with_context(|| format!("cannot resolve folder {}", root.display()))?;
        Ok(Confined { root })
    }

    /// The resolved folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root.join(rel)` with symlinks resolved, if it stays inside the folder; an error saying why
    /// otherwise. `rel` may contain `..` as long as it stays inside (`images/../images/x.png`). A
    /// path that leaves the folder by its `..`s is refused before the disk is asked, so the answer
    /// never tells whether a file outside exists; then the file must exist, and where its
    /// symlinks lead must be inside too.
    pub fn resolve(&self, rel: &Path) -> Result<PathBuf, String> {
        use std::path::Component;
        let mut depth = 0usize;
        for c in rel.components() {
            match c {
                Component::Normal(_) => depth += 1,
                Component::CurDir => {}
                Component::ParentDir if depth > 0 => depth -= 1,
                Component::ParentDir => {
                    return Err(format!("image path '{}' escapes the catalogue folder", rel.display()))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!(
                        "image path '{}' is absolute; it must be relative to the catalogue folder",
                        rel.display()
                    ))
                }
            }
        }
        let joined = self.root.join(rel);
        let real = match joined.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("image {} does not exist", joined.display()))
            }
            Err(e) => return Err(format!("cannot resolve image {}: {e}", joined.display())),
        };
        if !real.starts_with(&self.root) {
            return Err(format!(
                "image path '{}' escapes the catalogue folder {} through a symlink (to {})",
                rel.display(),
                self.root.display(),
                real.display()
            ));
        }
        Ok(real)
    }
}

/// Write `bytes` to `path` atomically: a temporary file beside it, fsynced, then renamed, so a
/// crash or `kill -9` never leaves a half-written file under the final name (checkpoints,
/// weights, metrics, plots, reports). Creates the parent folder. A write that fails (a full disk)
/// removes its temporary file; one cut short by `kill -9` leaves it behind, named
/// `.NAME.tmpPID`, for [`remove_stale_temporaries`] to find.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}{TEMPORARY_MARK}{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What [`write_atomic`] puts between a temporary file's name and the writer's process id.
const TEMPORARY_MARK: &str = ".tmp";

/// Remove the temporary files [`write_atomic`] left in `dir` when its process was killed
/// mid-write (their writer is no longer running). Returns how many, and their bytes.
pub fn remove_stale_temporaries(dir: &Path) -> Result<(usize, u64)> {
    let mut removed = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(TEMPORARY_MARK))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && process_is_running(pid) {
            continue; // another process's write in progress
        }
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed.0 += 1;
            removed.1 += size;
        }
    }
    Ok(removed)
}

/// Whether process `pid` exists (Linux: /proc; elsewhere assumed, so nothing is removed).
fn process_is_running(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_limited(&f, "vocabulary", 5).unwrap(), b"hello");
        let e = read_limited(&f, "vocabulary", 4).unwrap_err().to_string();
        assert!(e.contains("5 bytes, over the limit of 4 bytes"), "{e}");
        let e = read_limited(&dir.path().join("none"), "image", 10).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = read_limited(dir.path(), "image", 10).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let e = read_limited(Path::new("/dev/zero"), "catalogue", 10).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    /// A write that fails leaves nothing behind; one cut short by a killed process (a temporary
    /// file named after a process that is gone) is found and removed, another live process's is
    /// not.
    #[test]
    fn temporary_files_never_outlive_their_write() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a-folder");
        std::fs::create_dir_all(&target).unwrap();
        // Renaming a file onto a folder fails after the temporary was written.
        assert!(write_atomic(&target, b"data").is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // A dead writer's temporary (pid 2^31 - 1 exceeds pid_max) goes, a live one's stays.
        std::fs::write(dir.path().join(".step-00000010.safetensors.tmp2147483647"), vec![0u8; 100]).unwrap();
        let live = dir.path().join(".metrics.jsonl.tmp1");
        std::fs::write(&live, b"x").unwrap();
        std::fs::write(dir.path().join("notes.tmp5"), b"not ours").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), (1, 100));
        assert!(live.exists() && dir.path().join("notes.tmp5").exists());
    }

    #[test]
    fn printable_escapes_terminal_controls() {
        assert_eq!(printable("block1.0.norm1.weight"), "block1.0.norm1.weight");
        let shown = printable("w\x1b[2J\x1b]0;owned\x07\u{202e}x");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(shown, "w\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{202e}x");
        assert_eq!(printable(&"a".repeat(500)).len(), 203);
    }

    #[test]
    fn resolves_paths_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cat");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("images/x.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.png"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("images/link.png")).unwrap();
        let resolve_inside = |root: &Path, rel: &Path| Confined::new(root).unwrap().resolve(rel);
        assert!(resolve_inside(&root, Path::new("images/../images/x.png")).is_ok());
        assert!(resolve_inside(&root, Path::new("./images/x.png")).is_ok());
        let e = resolve_inside(&root, Path::new("images/link.png")).unwrap_err();
        assert!(e.contains("escapes the catalogue folder") && e.contains("through a symlink"), "{e}");
        // Refused by its `..`s alone, whether or not the file exists.
        for rel in ["../secret.png", "../absent.png", "images/../../secret.png"] {
            let e = resolve_inside(&root, Path::new(rel)).unwrap_err();
            assert!(e.contains("escapes the catalogue folder") && !e.contains("symlink"), "{e}");
        }
        assert!(resolve_inside(&root, Path::new("/etc/passwd")).unwrap_err().contains("absolute"));
        assert!(resolve_inside(&root, Path::new("images/none.png")).unwrap_err().contains("does not exist"));
    }
}
