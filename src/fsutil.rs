//! Path helpers and read loops. The durable write steps (temp → sync → rename → sync the
//! directory) go through the storage interface, in `storage.rs`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A sibling temporary name (same directory, so a rename is atomic).
pub(crate) fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()))
}

/// Whether `path` is absent or an empty directory.
pub(crate) fn is_absent_or_empty(path: &Path) -> io::Result<bool> {
    match fs::read_dir(path) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
pub(crate) fn read_full(r: &mut (impl io::Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Removes the scratch folders `<prefix>-<pid>-*` under `tmp` whose process is gone (killed
/// before its guard ran): an export's redacted database copies, a verify's spilled chunk ids
/// can be large. A live process's folder is left alone.
pub(crate) fn sweep_scratch(fs: &crate::storage::Fs, tmp: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs.remove_any(&e.path());
        }
    }
}

/// A scratch folder `<tmp>/<prefix>-<pid>-<hex>`, removed when dropped, whatever happens. Creating
/// one first sweeps the folders of this prefix that dead processes left ([`sweep_scratch`]).
pub(crate) struct ScratchDir {
    fs: crate::storage::Fs,
    pub path: PathBuf,
}

impl ScratchDir {
    pub(crate) fn create(fs: &crate::storage::Fs, tmp: &Path, prefix: &str) -> io::Result<Self> {
        sweep_scratch(fs, tmp, prefix);
        let path = tmp.join(format!(
            "{prefix}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // Guarded before it exists: a failed create leaves nothing either.
        let dir = Self {
            fs: fs.clone(),
            path,
        };
        fs.create_dir_all_durable(&dir.path)?;
        Ok(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = self.fs.remove_any(&self.path);
    }
}
