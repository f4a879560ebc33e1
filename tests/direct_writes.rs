//! Restore writes large files, and snapshots their packs, past the page cache (`O_DIRECT`) in
//! whole aligned blocks, the last one written padded, then cut off (restore carries a tail from
//! batch to batch). A storage that accepts direct writes on any file system checks every such
//! write's alignment (memory, offset, length) and passes it on to the OS, which makes it direct
//! where the file system allows: the restored files must be the snapshot's, byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{AGENT, TENANT, assert_same_tree, entries_in, tree};
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{
    AgentId, DIRECT_ALIGN, ExportRequest, Memsnap, OpenMode, OsStorage, RestoreRequest,
    SnapshotRequest, SourceSpec, Storage, StorageFile, StoreOptions,
};

#[derive(Debug, Default)]
struct Seen {
    /// Fail the direct write with this number (from 1) with ENOSPC; 0: none.
    fail_at: AtomicU64,
    /// Answer no to `write_direct` and `read_direct`, as tmpfs does.
    refuse: AtomicBool,
    direct_writes: AtomicU64,
    direct_reads: AtomicU64,
    /// Read-ahead hints on files read past the page cache, where they buy nothing.
    hints_on_direct: AtomicU64,
    cut_after_direct: AtomicU64,
    misaligned: Mutex<Vec<String>>,
    /// Read-ahead hints: (file, offset, length, the file's length).
    hints: Mutex<Vec<(PathBuf, u64, u64, u64)>>,
    /// Reads of files in this folder fail (EIO): all of them, or (`true`) direct ones only.
    fail_reads_in: Mutex<Option<(PathBuf, bool)>>,
}

#[derive(Debug)]
struct Checking {
    seen: Arc<Seen>,
}

#[derive(Debug)]
struct CheckedFile {
    inner: Box<dyn StorageFile>,
    path: PathBuf,
    direct: AtomicBool,
    direct_reads: AtomicBool,
    seen: Arc<Seen>,
}

impl CheckedFile {
    fn check_aligned(&self, what: &str, buf: &[u8], offset: u64) {
        let a = DIRECT_ALIGN as u64;
        let aligned = [buf.as_ptr() as u64, offset, buf.len() as u64]
            .iter()
            .all(|v| v.is_multiple_of(a));
        if !aligned {
            self.seen.misaligned.lock().expect("lock").push(format!(
                "{what} of {} bytes at offset {offset} from address {:p}",
                buf.len(),
                buf.as_ptr()
            ));
        }
    }
}

impl StorageFile for CheckedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let direct = self.direct_reads.load(Ordering::SeqCst);
        if let Some((dir, direct_only)) = &*self.seen.fail_reads_in.lock().expect("lock")
            && self.path.parent() == Some(dir.as_path())
            && (direct || !direct_only)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        if direct {
            self.seen.direct_reads.fetch_add(1, Ordering::SeqCst);
            self.check_aligned("read", buf, offset);
        }
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.direct.load(Ordering::SeqCst) {
            let n = self.seen.direct_writes.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.seen.fail_at.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.check_aligned("write", buf, offset);
        }
        self.inner.write_all_at(buf, offset)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.direct.load(Ordering::SeqCst) {
            self.seen.cut_after_direct.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.set_len(len)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }

    fn will_need(&self, offset: u64, len: u64) {
        if self.direct_reads.load(Ordering::SeqCst) {
            self.seen.hints_on_direct.fetch_add(1, Ordering::SeqCst);
        }
        let file_len = self.inner.len().expect("len");
        self.seen
            .hints
            .lock()
            .expect("lock")
            .push((self.path.clone(), offset, len, file_len));
        self.inner.will_need(offset, len)
    }

    /// Yes (unless told to refuse), whatever the file system says: the OS file writes through the page cache when it
    /// cannot write direct, with the same aligned writes.
    fn write_direct(&self) -> bool {
        if self.seen.refuse.load(Ordering::SeqCst) {
            return false;
        }
        let _ = self.inner.write_direct();
        self.direct.store(true, Ordering::SeqCst);
        true
    }

    /// The same for reads: where the OS cannot, it reads the same aligned blocks through the
    /// page cache.
    fn read_direct(&self) -> bool {
        if self.seen.refuse.load(Ordering::SeqCst) {
            return false;
        }
        let _ = self.inner.read_direct();
        self.direct_reads.store(true, Ordering::SeqCst);
        true
    }
}

impl Storage for Checking {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(CheckedFile {
            inner: OsStorage.open(path, mode)?,
            path: path.to_path_buf(),
            direct: AtomicBool::new(false),
            direct_reads: AtomicBool::new(false),
            seen: self.seen.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        OsStorage.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_file(path)
    }
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_dir(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_dir_all(path)
    }
    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
        OsStorage.symlink(target, link)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        OsStorage.sync_dir(dir)
    }
    fn sync_filesystem(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.sync_filesystem(path)
    }
}

/// Bytes that neither compress nor repeat.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Over two restore batches (8 MiB), ending mid-block; one just over the direct minimum with
/// whole blocks only; one under it (cached).
const FILES: [(&str, usize); 3] = [
    ("attachments/big.bin", (17 << 20) + 4097 + 123),
    ("attachments/whole.bin", (1 << 20) + 8 * 4096),
    ("attachments/small.bin", (1 << 20) - 1),
];

impl Seen {
    /// Counts from zero, failing the `fail_at`th direct write from now on (0: none).
    fn restart(&self, fail_at: u64) {
        self.direct_writes.store(0, Ordering::SeqCst);
        self.direct_reads.store(0, Ordering::SeqCst);
        self.hints_on_direct.store(0, Ordering::SeqCst);
        self.hints.lock().expect("lock").clear();
        self.cut_after_direct.store(0, Ordering::SeqCst);
        self.fail_at.store(fail_at, Ordering::SeqCst);
    }

    /// The read-ahead hints on files that `keep` accepts: (offset, length, the file's length).
    fn hints_on(&self, keep: impl Fn(&Path) -> bool) -> Vec<(u64, u64, u64)> {
        self.hints
            .lock()
            .expect("lock")
            .iter()
            .filter(|(path, ..)| keep(path))
            .map(|(_, at, len, file)| (*at, *len, *file))
            .collect()
    }

    fn assert_aligned(&self) {
        let misaligned = self.misaligned.lock().expect("lock").clone();
        assert!(
            misaligned.is_empty(),
            "misaligned direct reads or writes: {misaligned:?}"
        );
    }
}

/// A tiny agent with [`FILES`] in its memdir.
fn agent_with_files(tmp: &Path) -> SampleAgent {
    let agent = SampleAgent::create(&tmp.join("agent"), &SampleSpec::tiny()).expect("agent");
    std::fs::create_dir_all(agent.memdir().join("attachments")).expect("folder");
    for (i, (name, len)) in FILES.iter().enumerate() {
        std::fs::write(agent.memdir().join(name), noise(*len, i as u64 + 7)).expect("write");
    }
    agent
}

fn store_on(tmp: &Path, seen: &Arc<Seen>) -> Memsnap {
    Memsnap::create(
        tmp.join("store"),
        StoreOptions::default().storage(Arc::new(Checking { seen: seen.clone() })),
    )
    .expect("store")
}

/// [`agent_with_files`] and an empty store on a [`Checking`] storage, in a new folder.
fn agent_and_store() -> (tempfile::TempDir, Arc<Seen>, SampleAgent, Memsnap) {
    let tmp = tempfile::tempdir().expect("tmp");
    let seen = Arc::new(Seen::default());
    let agent = agent_with_files(tmp.path());
    let m = store_on(tmp.path(), &seen);
    (tmp, seen, agent, m)
}

fn snapshot(m: &Memsnap, agent: &SampleAgent) -> memsnap::Result<memsnap::SnapshotInfo> {
    let id = AgentId::new(TENANT, AGENT).expect("id");
    m.snapshot(&SnapshotRequest::new(id).sources(SourceSpec::from_root(agent.root())))
}

/// [`agent_with_files`] snapshotted into a store on a [`Checking`] storage; then a restore of
/// that snapshot into `restored/`, its direct writes counted from zero and the
/// `fail_at`th failed.
fn restore_through(
    tmp: &Path,
    seen: &Arc<Seen>,
    fail_at: u64,
) -> (SampleAgent, std::path::PathBuf, memsnap::Result<()>) {
    let agent = agent_with_files(tmp);
    let m = store_on(tmp, seen);
    let id = AgentId::new(TENANT, AGENT).expect("id");
    let snap = snapshot(&m, &agent).expect("snapshot");
    seen.restart(fail_at);
    let target = tmp.join("restored");
    let result = m
        .restore(&RestoreRequest::new(&snap.id).agent(id).target(&target))
        .map(|_| ());
    (agent, target, result)
}

/// Each of [`FILES`] in the restored `target` is the original's bytes.
fn assert_restored(memdir: &Path, target: &Path) {
    for (name, _) in FILES {
        assert!(
            std::fs::read(memdir.join(name)).expect("original")
                == std::fs::read(target.join("memdir").join(name)).expect("restored"),
            "{name} differs"
        );
    }
}

#[test]
fn large_files_restore_byte_for_byte_through_aligned_direct_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seen = Arc::new(Seen::default());
    let (agent, target, result) = restore_through(tmp.path(), &seen, 0);
    result.expect("restore");
    seen.assert_aligned();
    // big.bin: 17 MiB in whole blocks over at least three batches, plus its padded tail.
    let direct = seen.direct_writes.load(Ordering::SeqCst);
    assert!(direct >= 4, "{direct} direct writes");
    // Only big.bin ends mid-block.
    assert_eq!(seen.cut_after_direct.load(Ordering::SeqCst), 1);
    // The large files' packs were read past the page cache, in runs of up to 1 MiB (checked
    // aligned above), and not hinted.
    let reads = seen.direct_reads.load(Ordering::SeqCst);
    assert!(reads >= 19, "{reads} direct reads");
    assert_eq!(seen.hints_on_direct.load(Ordering::SeqCst), 0);
    assert_same_tree(
        &tree(&agent.memdir(), false),
        &tree(&target.join("memdir"), false),
        "the restored memdir",
    );
    assert_restored(&agent.memdir(), &target);
}

/// Where the storage refuses direct writes, the same files go through the page cache, the
/// write of each batch still beside the read of the next.
#[test]
fn large_files_restore_byte_for_byte_through_the_page_cache_too() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seen = Arc::new(Seen::default());
    seen.refuse.store(true, Ordering::SeqCst);
    let (agent, target, result) = restore_through(tmp.path(), &seen, 0);
    result.expect("restore");
    assert_eq!(seen.direct_writes.load(Ordering::SeqCst), 0);
    assert_eq!(seen.direct_reads.load(Ordering::SeqCst), 0);
    // The packs were read ahead instead, at least a batch (8 MiB) at a time, within each pack.
    let hints = seen.hints_on(|path| path.extension().is_some_and(|e| e == "pack"));
    let hinted: u64 = hints.iter().map(|(_, len, _)| len).sum();
    assert!(hinted >= 17 << 20, "{hinted} bytes hinted: {hints:?}");
    assert!(
        hints
            .iter()
            .all(|(at, len, file)| *len > 0 && at + len <= *file),
        "hints outside their pack: {hints:?}"
    );
    assert_restored(&agent.memdir(), &target);
}

/// A direct write that fails (here the second of big.bin, written while the next batch is
/// read) fails the restore with the path and the cause, and leaves nothing in the target, so
/// that the retry is accepted.
#[test]
fn a_failed_direct_write_fails_the_restore_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seen = Arc::new(Seen::default());
    let (_, target, result) = restore_through(tmp.path(), &seen, 2);
    let msg = result.expect_err("the disk is full").to_string();
    assert!(
        msg.contains("No space left on device") && msg.contains("big.bin"),
        "{msg}"
    );
    let left: Vec<_> = match std::fs::read_dir(&target) {
        Ok(d) => d.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    assert!(left.is_empty(), "left in the target: {left:?}");

    // So the same restore, retried once the disk has room, is accepted and completes.
    seen.fail_at.store(0, Ordering::SeqCst);
    let m = Memsnap::open(
        tmp.path().join("store"),
        StoreOptions::default().storage(Arc::new(Checking { seen: seen.clone() })),
    )
    .expect("store");
    let snap = m.list(None, None).expect("list").remove(0);
    let id = AgentId::new(TENANT, AGENT).expect("id");
    m.restore(&RestoreRequest::new(&snap.id).agent(id).target(&target))
        .expect("the retry");
    assert_restored(&tmp.path().join("agent/memdir"), &target);
}

/// Lengths of the pack files under `store`.
fn pack_lengths(store: &Path) -> Vec<u64> {
    common::pack_files(store)
        .iter()
        .map(|p| std::fs::metadata(p).expect("pack").len())
        .collect()
}

/// Snapshots write their packs past the page cache too: whole aligned blocks, each pack's tail
/// padded and then cut off. What they wrote reads back whole.
#[test]
fn packs_are_written_in_aligned_direct_blocks_and_read_back_whole() {
    let (tmp, seen, agent, m) = agent_and_store();
    snapshot(&m, &agent).expect("snapshot");
    seen.assert_aligned();
    // ~19 MiB of noise, stored raw: at least that many 1 MiB blocks.
    let direct = seen.direct_writes.load(Ordering::SeqCst);
    assert!(direct >= 19, "{direct} direct writes");
    let lengths = pack_lengths(&tmp.path().join("store"));
    let mid_block = lengths
        .iter()
        .filter(|l| !l.is_multiple_of(DIRECT_ALIGN as u64))
        .count();
    assert!(mid_block > 0, "pack lengths {lengths:?}");
    // Each pack that ends mid-block is cut once, to its length.
    assert_eq!(
        seen.cut_after_direct.load(Ordering::SeqCst),
        mid_block as u64
    );
    let report = m.verify(None, None, true).expect("verify");
    assert!(report.ok(), "{report:?}");

    seen.refuse.store(true, Ordering::SeqCst);
    let snap = m.list(None, None).expect("list").remove(0);
    let id = AgentId::new(TENANT, AGENT).expect("id");
    let target = tmp.path().join("restored");
    m.restore(&RestoreRequest::new(&snap.id).agent(id).target(&target))
        .expect("restore");
    assert_restored(&agent.memdir(), &target);
}

/// A pack's direct write that fails (the disk is full) fails the snapshot with the pack and
/// the cause; it records no snapshot and leaves no pack, and the same snapshot completes once
/// the disk has room.
#[test]
fn a_failed_direct_pack_write_fails_the_snapshot_and_leaves_no_pack() {
    let (tmp, seen, agent, m) = agent_and_store();
    seen.restart(3);
    let msg = snapshot(&m, &agent)
        .expect_err("the disk is full")
        .to_string();
    assert!(
        msg.contains("No space left on device") && msg.contains("packs"),
        "{msg}"
    );
    assert!(m.list(None, None).expect("list").is_empty());
    assert_eq!(common::pack_count(&tmp.path().join("store")), 0);

    seen.restart(0);
    snapshot(&m, &agent).expect("snapshot once the disk has room");
    let report = m.verify(None, None, true).expect("verify");
    assert!(report.ok(), "{report:?}");
}

/// Export writes its bundle past the page cache too: aligned blocks, the tail cut off, and a
/// bundle that verifies whole against its `.sha256`. A failed direct write leaves nothing, and
/// so does a bundle that does not read back (a one-pass export reads its first block to write
/// the manifest over its stand-in, then the whole file for its SHA-256).
#[test]
fn bundles_are_written_in_aligned_direct_blocks_and_verify() {
    let (tmp, seen, agent, m) = agent_and_store();
    let snap = snapshot(&m, &agent).expect("snapshot");
    let id = AgentId::new(TENANT, AGENT).expect("id");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("out");
    let bundle = out.join("agent.tar.zst");
    let export = || m.export(&ExportRequest::new(&snap.id, &bundle).agent(id.clone()));

    seen.restart(2);
    let msg = export().expect_err("the disk is full").to_string();
    assert!(msg.contains("No space left on device"), "{msg}");
    let left = entries_in(&out);
    assert!(left.is_empty(), "left behind: {left:?}");
    seen.restart(0);
    // Any read of the bundle (the first block's comes first), then direct ones only (the read
    // for the SHA-256).
    for direct_only in [false, true] {
        *seen.fail_reads_in.lock().expect("lock") = Some((out.clone(), direct_only));
        let msg = export().expect_err("no read back").to_string();
        assert!(msg.contains("Input/output error"), "{direct_only}: {msg}");
        let left = entries_in(&out);
        assert!(left.is_empty(), "{direct_only}: left behind: {left:?}");
    }
    *seen.fail_reads_in.lock().expect("lock") = None;

    seen.restart(0);
    export().expect("export");
    seen.assert_aligned();
    // big.bin was read past the page cache once (one pass: frames and digest), in runs of up
    // to 1 MiB (checked aligned above; a read per 16 KiB chunk would be ~2,200), not hinted;
    // then the whole bundle (~19 MiB) in 4 MiB blocks for its SHA-256. (The read of its first
    // block, before, is not counted: the file is not yet asked for direct reads.)
    let reads = seen.direct_reads.load(Ordering::SeqCst);
    assert!((20..=24).contains(&reads), "{reads} direct reads");
    assert_eq!(seen.hints_on_direct.load(Ordering::SeqCst), 0);
    // ~19 MiB of noise, stored raw and so framed raw.
    let direct = seen.direct_writes.load(Ordering::SeqCst);
    assert!(direct >= 19, "{direct} direct writes");
    let len = std::fs::metadata(&bundle).expect("bundle").len();
    let cut = u64::from(!len.is_multiple_of(DIRECT_ALIGN as u64));
    assert_eq!(seen.cut_after_direct.load(Ordering::SeqCst), cut);
    let report = memsnap::verify_bundle(&bundle, None).expect("verify-bundle");
    assert!(report.ok(), "{report:?}");
}

/// A snapshot walks the whole chunk table for its filter of known chunks, and a restore of a
/// small store locates most of it: each first asks for the whole index file ahead (redb reads a
/// page per call, over leaves scattered in the file).
#[test]
fn sessions_that_read_most_of_the_chunk_table_read_the_whole_index_ahead() {
    let (tmp, seen, agent, m) = agent_and_store();
    let index = tmp.path().join("store").join("index.redb");
    let assert_hinted_whole = |what: &str| {
        let mut hints = seen.hints_on(|path| path == index);
        hints.sort();
        let covered = hints.iter().try_fold(0u64, |end, (at, len, _)| {
            (*at <= end).then_some(end.max(at + len))
        });
        let len = hints.first().map_or(0, |h| h.2);
        assert!(len > 0, "{what}: no hint on the index");
        assert_eq!(
            covered,
            Some(len),
            "{what}: hints leave part of the index out: {hints:?}"
        );
    };
    snapshot(&m, &agent).expect("first");
    agent.append_day(1, 0.2).expect("append day");
    seen.restart(0);
    let second = snapshot(&m, &agent).expect("second");
    assert_hinted_whole("snapshot");
    seen.restart(0);
    let id = AgentId::new(TENANT, AGENT).expect("id");
    m.restore(
        &RestoreRequest::new(&second.id)
            .agent(id)
            .target(tmp.path().join("restored")),
    )
    .expect("restore");
    assert_hinted_whole("restore");
}
