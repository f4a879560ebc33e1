//! The narrow storage interface under the store and under restore's writes into an agent: every
//! write, sync, rename, remove and data read of a store file goes through [`Storage`], so that a
//! test can put a storage underneath that fails the N-th operation or "crashes" at the N-th sync
//! and keeps only what was durable (`tests/crash_walk.rs`).
//!
//! What the store relies on (store-format.md, "Write ordering"):
//! - a file's bytes are durable only after [`StorageFile::sync`] on it;
//! - a name created, renamed or removed in a directory is durable only after
//!   [`Storage::sync_dir`] of that directory (or [`Storage::sync_filesystem`]);
//! - [`Storage::rename`] replaces its target atomically.
//!
//! Listing, `stat` and reading an agent's own files (SQLite, git) go to the OS directly: they
//! change nothing, and the agent's files are not the store's.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use crate::fsutil::{parent_of, tmp_name};
use std::sync::Arc;

/// How [`Storage::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// Creates the file, which must not exist, for reading and writing, with permission bits
    /// `mode` less the umask (as `open(2)` does).
    CreateNew { mode: u32 },
    /// Opens the file for reading and writing, creating it (with `mode` less the umask) if it
    /// is missing; keeps its content.
    OpenOrCreate { mode: u32 },
}

/// An open file. Offsets are explicit, so one handle serves several threads.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Reads at `offset`; returns the bytes read, fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Fills `buf` from `offset`; a file that ends first is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.read_at(buf, offset)? < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's bytes and size durable (`fsync`).
    fn sync(&self) -> io::Result<()>;
    /// A hint to start writing `len` bytes at `offset` back now, so that a later sync finds them
    /// on disk; durability still comes only from [`StorageFile::sync`].
    fn start_writeback(&self, _offset: u64, _len: u64) {}

    /// A hint that `len` bytes at `offset` will be read soon, so that they can be fetched in
    /// the background now.
    fn will_need(&self, _offset: u64, _len: u64) {}

    /// Asks that later writes bypass the page cache (`O_DIRECT`); returns whether they will.
    /// Such writes must be aligned to [`DIRECT_ALIGN`] in memory, offset and length. A write the
    /// file system still refuses is made through the page cache instead, as are all writes of a
    /// storage that cannot (the default).
    fn write_direct(&self) -> bool {
        false
    }

    /// Asks that later reads bypass the page cache (`O_DIRECT`); returns whether they will.
    /// Such reads are aligned to [`DIRECT_ALIGN`] in memory, offset and length (the last may
    /// end short, at the end of the file). A read the file system still refuses is made
    /// through the page cache instead, as are all reads of a storage that cannot (the default).
    fn read_direct(&self) -> bool {
        false
    }

    /// Sets the permission bits and the modification time through the open file, sparing
    /// two lookups of its path; `Ok(false)` where this storage cannot (the default), and the
    /// caller sets them by path.
    fn set_mode_and_mtime(&self, _mode: u32, _mtime: Option<SystemTime>) -> io::Result<bool> {
        Ok(false)
    }
}

/// Alignment of memory, offset and length that writes after [`StorageFile::write_direct`] keep:
/// the page size, a multiple of any disk's logical block size that Linux accepts for `O_DIRECT`.
pub const DIRECT_ALIGN: usize = 4096;

/// File operations on paths. Implementations must be usable from many threads at once.
pub trait Storage: Send + Sync + fmt::Debug {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Replaces `to` with `from` atomically (`rename(2)`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file or a symbolic link.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything below it, without following symbolic links (like
    /// `std::fs::remove_dir_all`, which is safe against a folder swapped for a link meanwhile).
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates a symbolic link at `link` pointing to `target`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// Makes the names in directory `dir` durable (`fsync` of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Makes everything written on the file system that holds `path` durable (`syncfs(2)`).
    fn sync_filesystem(&self, path: &Path) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsStorage;

#[derive(Debug)]
struct OsFile {
    file: fs::File,
    /// `O_DIRECT` is set on the descriptor.
    direct: std::sync::atomic::AtomicBool,
}

impl OsFile {
    fn new(file: fs::File) -> Self {
        Self {
            file,
            direct: false.into(),
        }
    }

    /// Sets or clears `O_DIRECT` on the open descriptor.
    fn set_direct(&self, on: bool) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: the descriptor is open for both calls, which only read and set status flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            let flags = match on {
                true => flags | libc::O_DIRECT,
                false => flags & !libc::O_DIRECT,
            };
            if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.direct.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl StorageFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        while n < buf.len() {
            match self.file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                // A direct read that ends off a block has met the end of the file: asking on
                // from there (unaligned) would fail where alignment is checked first (XFS;
                // ext4 answers 0 past the end) and turn the file's direct reads off.
                Ok(k)
                    if k % DIRECT_ALIGN != 0
                        && self.direct.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    n += k;
                    break;
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // As for writes: a file system that takes O_DIRECT yet not this read.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL)
                        && self.direct.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    self.set_direct(false)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self.file.write_all_at(buf, offset) {
            // A file system that takes O_DIRECT yet not this write (stricter alignment): the
            // page cache takes this one and the rest.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && self.direct.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                self.set_direct(false)?;
                self.file.write_all_at(buf, offset)
            }
            r => r,
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call; the flag only schedules writeback.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn will_need(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call; the advice only schedules reads.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn write_direct(&self) -> bool {
        // tmpfs and some FUSE file systems refuse the flag (EINVAL).
        self.set_direct(true).is_ok()
    }

    fn read_direct(&self) -> bool {
        self.set_direct(true).is_ok()
    }

    fn set_mode_and_mtime(&self, mode: u32, mtime: Option<SystemTime>) -> io::Result<bool> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(t) = mtime {
            self.file.set_modified(t)?;
        }
        Ok(true)
    }
}

impl Storage for OsStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = fs::OpenOptions::new();
        o.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                o.write(true);
            }
            OpenMode::CreateNew { mode } => {
                o.write(true).create_new(true).mode(mode);
            }
            OpenMode::OpenOrCreate { mode } => {
                o.write(true).create(true).truncate(false).mode(mode);
            }
        }
        Ok(Box::new(OsFile::new(o.open(path)?)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }

    fn sync_filesystem(&self, path: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let f = fs::File::open(path)?;
        // SAFETY: the descriptor is open for the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The storage an opened store and its operations use, with the multi-step durable operations
/// built on the trait's primitives.
#[derive(Debug, Clone)]
pub(crate) struct Fs(pub(crate) Arc<dyn Storage>);

impl Default for Fs {
    fn default() -> Self {
        Self(Arc::new(OsStorage))
    }
}

/// The trait's own operations, called on the storage directly (`fs.rename(..)`).
impl std::ops::Deref for Fs {
    type Target = dyn Storage;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Fs {
    /// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a
    /// mix, and after a crash the same (temp → sync → rename → sync the directory). The file
    /// gets permission bits `mode`, whatever the umask.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        let dir = parent_of(path);
        let tmp = tmp_name(path);
        let result = (|| {
            let f = self.open(&tmp, OpenMode::CreateNew { mode })?;
            // Exactly `mode` (a restored state file keeps its bits), whatever the umask; a
            // metadata change, made durable with the file by its sync.
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
            }
            f.write_all_at(bytes, 0)?;
            f.sync()?;
            drop(f);
            self.rename(&tmp, path)?;
            self.sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = self.remove_file(&tmp);
        }
        result
    }

    /// Creates `dir` and any missing parents, syncing each parent whose entry was added.
    pub(crate) fn create_dir_all_durable(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let parent = parent_of(dir);
        self.create_dir_all_durable(&parent)?;
        match self.create_dir(dir) {
            Ok(()) => self.sync_dir(&parent),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a file or a whole tree if it exists; a missing path is not an error. Not durable
    /// until the parent is synced.
    pub(crate) fn remove_any(&self, path: &Path) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => self.remove_dir_all(path),
            Ok(_) => match self.remove_file(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A file being written front to back that asks the kernel to start writing each 8 MiB back as
/// soon as it is written, so that the sync which makes it durable finds most of it on disk
/// already (and disk writes overlap with computing the rest).
pub(crate) struct WritebackFile {
    file: Box<dyn StorageFile>,
    written: u64,
    hinted: u64,
}

const WRITEBACK_STEP: u64 = 8 << 20;

impl WritebackFile {
    pub(crate) fn new(file: Box<dyn StorageFile>) -> Self {
        Self {
            file,
            written: 0,
            hinted: 0,
        }
    }

    pub(crate) fn into_inner(self) -> Box<dyn StorageFile> {
        self.file
    }
}

impl io::Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.written)?;
        self.written += buf.len() as u64;
        if self.written - self.hinted >= WRITEBACK_STEP {
            self.file
                .start_writeback(self.hinted, self.written - self.hinted);
            self.hinted = self.written;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes a [`DirectFile`] gathers before each write.
const DIRECT_BLOCK: usize = 1 << 20;

/// A file written front to back in blocks of [`DIRECT_BLOCK`], past the page cache where the
/// storage allows it ([`StorageFile::write_direct`]; the last partial block is then written
/// padded at [`DirectFile::finish`] and the padding cut off), else through it with writeback
/// started every 8 MiB as [`WritebackFile`] does. On this project's bench VM, whose freed
/// memory goes back to the host, copying packs into fresh page cache was most of a first
/// snapshot's system time (2-3 s of 1 GiB's 3 s).
pub(crate) struct DirectFile {
    file: Box<dyn StorageFile>,
    direct: bool,
    buf: Vec<u8>,
    /// `buf[start..]` is aligned to [`DIRECT_ALIGN`].
    start: usize,
    len: usize,
    /// Bytes written, and those handed to writeback.
    at: u64,
    hinted: u64,
}

impl DirectFile {
    pub(crate) fn new(file: Box<dyn StorageFile>) -> Self {
        let direct = file.write_direct();
        let mut buf = Vec::new();
        let start = aligned_start(&mut buf, DIRECT_BLOCK);
        Self {
            file,
            direct,
            buf,
            start,
            len: 0,
            at: 0,
            hinted: 0,
        }
    }

    fn write_block(&mut self, len: usize) -> io::Result<()> {
        let (start, at) = (self.start, self.at);
        self.file.write_all_at(&self.buf[start..start + len], at)?;
        self.at += len as u64;
        self.len = 0;
        if !self.direct && self.at - self.hinted >= WRITEBACK_STEP {
            self.file
                .start_writeback(self.hinted, self.at - self.hinted);
            self.hinted = self.at;
        }
        Ok(())
    }

    /// Writes what is buffered and returns the file, every byte written (not yet durable).
    pub(crate) fn finish(mut self) -> io::Result<Box<dyn StorageFile>> {
        let len = self.len;
        if len > 0 && self.direct {
            let padded = len.next_multiple_of(DIRECT_ALIGN);
            let start = self.start;
            self.buf[start + len..start + padded].fill(0);
            self.write_block(padded)?;
            self.file.set_len(self.at - (padded - len) as u64)?;
        } else if len > 0 {
            self.write_block(len)?;
        }
        Ok(self.file)
    }
}

impl io::Write for DirectFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len().min(DIRECT_BLOCK - self.len);
        let at = self.start + self.len;
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if self.len == DIRECT_BLOCK {
            self.write_block(DIRECT_BLOCK)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Grows `buf` to hold `len` bytes from an address aligned to [`DIRECT_ALIGN`], and returns that
/// offset. Reused buffers keep their bytes; only growth is zeroed.
pub(crate) fn aligned_start(buf: &mut Vec<u8>, len: usize) -> usize {
    let want = len + DIRECT_ALIGN;
    if buf.len() < want {
        buf.resize(want, 0);
    }
    // By hand: `align_offset` may answer "never" (usize::MAX).
    let at = buf.as_ptr() as usize;
    at.next_multiple_of(DIRECT_ALIGN) - at
}

/// redb's file access through a [`StorageFile`], so that the index's writes and syncs are the
/// storage's too.
#[derive(Debug)]
pub(crate) struct RedbBackend {
    pub(crate) file: Box<dyn StorageFile>,
    pub(crate) path: std::path::PathBuf,
}

/// The first I/O error of each index file's current session in this process. After one, redb
/// answers every call with "Previous I/O error occurred" and the cause is lost; errors name it
/// from here (`StoreError::index`). Sessions of one file take turns (the index lock), and each
/// starts with no error ([`RedbBackend::new`]).
static INDEX_IO_ERRORS: std::sync::Mutex<Vec<(std::path::PathBuf, String)>> =
    std::sync::Mutex::new(Vec::new());

fn index_io_errors() -> std::sync::MutexGuard<'static, Vec<(std::path::PathBuf, String)>> {
    INDEX_IO_ERRORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RedbBackend {
    /// The backend of a new session of the index at `path`: an error of an earlier session is
    /// not this one's cause.
    pub(crate) fn new(file: Box<dyn StorageFile>, path: std::path::PathBuf) -> Self {
        index_io_errors().retain(|(p, _)| p != &path);
        Self { file, path }
    }

    fn noted<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let mut errors = index_io_errors();
            // The first one: later calls fail because of it, or on its consequences.
            if !errors.iter().any(|(p, _)| p == &self.path) {
                errors.push((
                    self.path.clone(),
                    format!("{e}{}", crate::error::io_hint(e)),
                ));
            }
        }
        r
    }
}

/// The first I/O error the current session of index file `path` met in this process, if any.
pub(crate) fn index_io_error(path: &Path) -> Option<String> {
    index_io_errors()
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, e)| e.clone())
}

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> io::Result<u64> {
        self.noted(self.file.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.noted(self.file.read_exact_at(out, offset))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.noted(self.file.set_len(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.noted(self.file.sync())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.noted(self.file.write_all_at(data, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `OsFile` reading past the page cache: a whole block over the file's end returns the
    /// bytes up to it; a read the kernel refuses as unaligned (EINVAL) is made through the
    /// cache instead, and so are the reads after it.
    #[test]
    fn direct_reads_stop_at_the_end_and_fall_back_when_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * DIRECT_ALIGN + 100).map(|i| (i * 7) as u8).collect();
        fs::write(&path, &bytes).expect("write");
        let f = OsFile::new(fs::File::open(&path).expect("open"));
        let direct = f.read_direct();
        let still_direct = || f.direct.load(std::sync::atomic::Ordering::Relaxed);
        let mut buf = Vec::new();
        let at = aligned_start(&mut buf, 4 * DIRECT_ALIGN);
        let n = f
            .read_at(&mut buf[at..at + 4 * DIRECT_ALIGN], 0)
            .expect("a whole block past the end");
        assert_eq!(n, bytes.len(), "direct {direct}");
        assert!(buf[at..at + n] == bytes[..]);
        // (Holds on ext4 even without the stop at the end: it answers 0 past the end.)
        assert_eq!(still_direct(), direct, "the end of the file is no refusal");
        // Unaligned address, offset and length.
        let mut odd = vec![0u8; 4101];
        let n = f.read_at(&mut odd[1..], 5).expect("unaligned");
        assert_eq!(n, 4100);
        assert!(odd[1..] == bytes[5..4105]);
        assert!(!still_direct(), "refused: through the cache from now on");
        let n = f
            .read_at(&mut buf[at..at + DIRECT_ALIGN], 0)
            .expect("after");
        assert!(n == DIRECT_ALIGN && buf[at..at + n] == bytes[..n]);
    }

    #[derive(Debug)]
    struct Full;

    impl StorageFile for Full {
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
            Ok(0)
        }
        fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A write `O_DIRECT` refuses (misaligned) goes through the page cache instead. On a file
    /// system without `O_DIRECT` (tmpfs) every write does, and this checks only that.
    #[test]
    fn a_misaligned_write_after_write_direct_still_lands() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let f = OsStorage
            .open(&path, OpenMode::CreateNew { mode: 0o600 })
            .expect("open");
        let direct = f.write_direct();
        f.write_all_at(b"not a block", 1)
            .expect("a misaligned write");
        let mut back = vec![0u8; 12];
        f.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(&back, b"\0not a block");
        eprintln!("direct writes on this file system: {direct}");
    }

    #[test]
    fn an_index_error_after_a_failed_write_names_the_first_cause() {
        use redb::StorageBackend;
        let path = std::path::PathBuf::from("/nowhere/store/index.redb");
        let backend = RedbBackend::new(Box::new(Full), path.clone());
        assert!(backend.write(0, b"x").is_err());
        // A read past the end is an error too, as redb requires; the write stays the cause.
        assert!(backend.read(0, &mut [0u8; 4]).is_err());
        let msg = crate::error::StoreError::index(
            &path,
            "Previous I/O error occurred. Please close and re-open the database.",
        )
        .to_string();
        assert!(msg.contains("No space left on device"), "{msg}");
        assert!(msg.contains("free space"), "{msg}");
        assert!(msg.contains("/nowhere/store/index.redb"), "{msg}");
        // A new session of the file starts without a cause.
        drop(RedbBackend::new(Box::new(Full), path.clone()));
        assert_eq!(index_io_error(&path), None);
    }
}
