//! Walks the memdir: work tree and `.git`, as files, folders and symlinks with their modes.
//! Symlinks are recorded as links and never followed; sockets and FIFOs are skipped.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::SourceError;
use crate::manifest::file_stats::FileStat;

#[derive(Debug, Clone)]
pub(crate) enum ItemKind {
    File,
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub rel: Vec<u8>,
    pub abs: PathBuf,
    pub kind: ItemKind,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// As listed, before the file is read (change detection compares it with the last one).
    pub stat: FileStat,
}

/// Which part of the memdir a walk lists. A snapshot reads everything but `.git/objects`
/// first (refs included), and only then lists and reads the objects: git writes objects before
/// the refs that name them, so every ref captured names objects that the later listing sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    AllButObjects,
    Objects,
    All,
}

/// Modification time in ns since the epoch (saturating: dates past 2262 do not overflow).
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Name order, except that `packed-refs` comes after `refs/`: `git pack-refs` writes
/// packed-refs before it deletes the loose refs, so reading loose refs first never misses one.
fn read_order(name: &std::ffi::OsStr) -> (bool, &[u8]) {
    (name == "packed-refs", name.as_bytes())
}

pub(crate) fn walk(root: &Path, pass: Pass) -> Result<Vec<Item>, SourceError> {
    let mut out = Vec::new();
    let objects = root.join(".git").join("objects");
    let start = match pass {
        Pass::Objects if !objects.is_dir() => return Ok(out),
        Pass::Objects => objects.clone(),
        Pass::AllButObjects | Pass::All => root.to_path_buf(),
    };
    let walker = walkdir::WalkDir::new(&start)
        .follow_links(false)
        .min_depth(0)
        .sort_by(|a, b| read_order(a.file_name()).cmp(&read_order(b.file_name())))
        .into_iter()
        .filter_entry(|e| pass != Pass::AllButObjects || e.path() != objects);
    for entry in walker {
        if let Some(item) = item(root, entry)? {
            out.push(item);
        }
    }
    Ok(out)
}

/// One walked entry as an item; `None` for what a snapshot leaves out: a special file, or an
/// entry gone since its folder was listed (git's lock files come and go while it works), as if
/// listed a moment later. Only the root itself must exist.
fn item(
    root: &Path,
    entry: Result<walkdir::DirEntry, walkdir::Error>,
) -> Result<Option<Item>, SourceError> {
    let entry = match entry {
        Ok(e) => e,
        Err(e) if e.depth() > 0 && vanished(&e) => return Ok(None),
        Err(e) => {
            return Err(SourceError::Io {
                path: e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.to_path_buf()),
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    let abs = entry.path().to_path_buf();
    let meta = match entry.metadata() {
        Ok(m) => m,
        Err(e) if entry.depth() > 0 && vanished(&e) => return Ok(None),
        Err(e) => {
            return Err(SourceError::Io {
                path: abs,
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    let ft = entry.file_type();
    let kind = if ft.is_symlink() {
        match std::fs::read_link(&abs) {
            Ok(t) => ItemKind::Symlink(t.as_os_str().as_bytes().to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SourceError::Io { path: abs, source }),
        }
    } else if ft.is_dir() {
        ItemKind::Dir
    } else if ft.is_file() {
        ItemKind::File
    } else {
        tracing::warn!(path = %abs.display(), "skipping a special file (socket, FIFO or device)");
        return Ok(None);
    };
    let rel = abs
        .strip_prefix(root)
        .map(|r| r.as_os_str().as_bytes().to_vec())
        .unwrap_or_default();
    Ok(Some(Item {
        rel,
        size: if matches!(kind, ItemKind::File) {
            meta.len()
        } else {
            0
        },
        kind,
        abs,
        mode: meta.mode() & 0o7777,
        mtime_ns: mtime_ns(&meta),
        stat: FileStat::of(&meta),
    }))
}

fn vanished(e: &walkdir::Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_refs_are_read_before_packed_refs_and_objects_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let git = dir.path().join(".git");
        for d in ["refs/heads", "objects/ab"] {
            std::fs::create_dir_all(git.join(d)).expect("mkdir");
        }
        for f in [
            "packed-refs",
            "refs/heads/main",
            "objects/ab/cd",
            "HEAD",
            "a.md",
        ] {
            let p = if f == "a.md" {
                dir.path().join(f)
            } else {
                git.join(f)
            };
            std::fs::write(p, f).expect("write");
        }
        let first: Vec<String> = walk(dir.path(), Pass::AllButObjects)
            .expect("walk")
            .into_iter()
            .map(|i| String::from_utf8_lossy(&i.rel).into_owned())
            .collect();
        let pos = |name: &str| first.iter().position(|p| p == name).expect(name);
        assert!(
            pos(".git/refs/heads/main") < pos(".git/packed-refs"),
            "{first:?}"
        );
        assert!(
            !first.iter().any(|p| p.starts_with(".git/objects")),
            "{first:?}"
        );
        let objects: Vec<Vec<u8>> = walk(dir.path(), Pass::Objects)
            .expect("walk")
            .into_iter()
            .map(|i| i.rel)
            .collect();
        assert!(
            objects.contains(&b".git/objects/ab/cd".to_vec()),
            "{objects:?}"
        );
    }

    /// Regression: a snapshot failed with "cannot read .git/objects/maintenance.lock: No such
    /// file" when git removed its lock file between the listing of a folder and its `lstat`.
    #[test]
    fn an_entry_gone_since_its_folder_was_listed_is_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join(".git/objects");
        std::fs::create_dir_all(&objects).expect("mkdir");
        let lock = objects.join("maintenance.lock");
        std::fs::write(&lock, b"").expect("write");
        std::os::unix::fs::symlink("x", objects.join("link")).expect("symlink");
        let listed: Vec<_> = walkdir::WalkDir::new(dir.path())
            .sort_by_file_name()
            .into_iter()
            .collect();
        std::fs::remove_file(&lock).expect("git removes its lock");
        std::fs::remove_file(objects.join("link")).expect("and a link goes too");
        let mut kept = Vec::new();
        for entry in listed {
            if let Some(i) = item(dir.path(), entry).expect("a vanished entry is no error") {
                kept.push(String::from_utf8_lossy(&i.rel).into_owned());
            }
        }
        assert_eq!(kept, ["", ".git", ".git/objects"]);
        // The root itself must exist: a memdir that vanished is an error, not an empty memdir.
        let gone = dir.path().join("gone");
        let root = walkdir::WalkDir::new(&gone)
            .into_iter()
            .next()
            .expect("root");
        assert!(item(&gone, root).is_err());
    }
}
