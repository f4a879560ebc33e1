//! Durable file-system steps shared by the store and restore: every visible name appears only
//! after its bytes are durable (write temp → fsync → rename → fsync the directory).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// fsync a directory so that a rename or create inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a mix.
/// The file gets permission bits `mode`, whatever the umask.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = parent_of(path);
    let tmp = tmp_name(path);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

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

/// Creates `dir` and any missing parents, fsyncing each parent whose entry was added.
pub(crate) fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    create_dir_all_durable(&parent)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(&parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a file or a whole tree if it exists; a missing path is not an error.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `path` is absent or an empty directory.
pub(crate) fn is_absent_or_empty(path: &Path) -> io::Result<bool> {
    match fs::read_dir(path) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// A file being written that asks the kernel to start writing each 8 MiB back as soon as it is
/// written, so that the `fsync` which makes it durable finds most of it on disk already
/// instead of writing gigabytes then (and disk writes overlap with computing the rest). Only a
/// hint: durability still comes from `fsync`/`syncfs`.
pub(crate) struct WritebackFile {
    file: std::fs::File,
    written: u64,
    hinted: u64,
}

const WRITEBACK_STEP: u64 = 8 << 20;

impl WritebackFile {
    pub(crate) fn new(file: std::fs::File) -> Self {
        Self {
            file,
            written: 0,
            hinted: 0,
        }
    }

    pub(crate) fn into_inner(self) -> std::fs::File {
        self.file
    }
}

impl io::Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.hinted >= WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the call; the flag only schedules writeback.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.hinted as libc::off64_t,
                    (self.written - self.hinted) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.hinted = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
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
