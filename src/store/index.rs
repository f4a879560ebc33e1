//! The redb index: tables, and the short sessions through which processes share it.
//! redb lets one process open the file at a time (`ExclusiveWriter`), so every process opens it
//! only inside the index lock and for as short a time as it can (store-format.md, "Locks").

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{ReadableDatabase, TableDefinition};

use crate::error::{Error, StoreError};
use crate::lock::{self, Holder, LockGuard, Mode};
use crate::storage::{Fs, OpenMode, RedbBackend};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// As references: redb decodes an owned `[u8; N]` a byte at a time into a fresh Vec (12% of an
/// unchanged snapshot's walk of the table); `&[u8; N]` is the same type on disk, read in place.
pub(crate) const CHUNKS: TableDefinition<&[u8; 32], &[u8; 33]> = TableDefinition::new("chunks");
/// [`CHUNKS`] opened in a read transaction.
pub(crate) type ChunkTable = redb::ReadOnlyTable<&'static [u8; 32], &'static [u8; 33]>;
pub(crate) const PACKS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("packs");
pub(crate) const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// Pinned snapshot id → when it was pinned (ms). Format 2; absent in a format-1 store.
pub(crate) const PINS: TableDefinition<&str, i64> = TableDefinition::new("pins");
/// Change detection (format 3): `tenant/agent` NUL part path -> version byte + bincode `StatRow`.
pub(crate) const FILE_STATS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_stats");

/// Index sessions are short (a lookup, a commit) except for restore and verify, which read
/// chunk locations while they run; a waiter gives up only after this long.
const INDEX_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);

/// redb's page cache per open index. A snapshot's or import's commit fills it as the chunk table
/// grows (early commits did, when this was measured): 16 MiB made the peak of a 4 GiB import
/// 13% above a 1 GiB one's; 8 MiB cost no time measurable in a first snapshot, an import or a
/// snapshot whose every chunk was known (benches/RESULTS.md, run 7). 4 MiB cost ~15% more CPU.
pub(crate) const INDEX_CACHE_BYTES: usize = 8 << 20;

/// redb's page cache for a session that only reads (restore, export and verify): they walk the
/// chunk table or look up sorted ids, reusing little more than the path to the current leaf,
/// and read tree nodes by random lookups, whose upper B-tree levels (well under 2 MiB for
/// millions of entries) are what a cache keeps. A 16 MiB cache, filled by a walk, was a quarter
/// of verify's peak memory.
pub(crate) const READ_CACHE_BYTES: usize = 2 << 20;

/// Bytes per read-ahead hint ([`Index::read_ahead`]): Linux reads at most the larger of the
/// device's read-ahead and its largest request per hint, 128 KiB at the least (this VM's disk:
/// 8 MiB, measured with `fincore`). ~8,000 hints per GiB of index, each ~1 us when cached.
const READ_AHEAD_STEP: u64 = 128 << 10;

/// An open index, valid while the index lock is held. Dropping it closes the database first,
/// then releases the lock (field order).
pub(crate) struct Index {
    db: Db,
    pub path: PathBuf,
    /// The storage the index was opened through; pack reads of this session use it too.
    pub fs: Fs,
    _lock: LockGuard,
}

/// What an index session does: [`Access::Read`] opens redb read-only, which writes nothing to
/// the file. An open for writing, even one that only reads, marks the file as needing repair
/// and saves the allocator state on close (four fsyncs a session), so a reader killed
/// mid-session (a restore interrupted) left the next open a whole-file repair. An index that
/// cannot be opened read-only (none yet, or one a killed writer left needing repair) is
/// opened for writing instead, which creates or repairs it, or reports what is wrong.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Access {
    Write,
    Read,
}

impl Index {
    pub(crate) fn open(
        fs: &Fs,
        path: &Path,
        lock_path: &Path,
        cache: usize,
        access: Access,
    ) -> Result<Self, Error> {
        let guard = lock(lock_path)?;
        if access == Access::Read
            && let Ok(file) = fs.open(path, OpenMode::Read)
            && let Ok(db) = redb::Builder::new()
                .set_cache_size(cache)
                .open_read_only_with_backend(RedbBackend::new(file, path.to_path_buf()))
        {
            return Ok(Self {
                db: Db::Read(Some(db)),
                path: path.to_path_buf(),
                fs: fs.clone(),
                _lock: guard,
            });
        }
        Ok(Self::open_under(fs, path, guard, cache)?)
    }

    /// Opens (or creates) the database at `path` under an index lock the caller already holds:
    /// repair keeps the lock from reading the old index to renaming the new one in.
    pub(crate) fn open_under(
        fs: &Fs,
        path: &Path,
        guard: LockGuard,
        cache: usize,
    ) -> Result<Self, StoreError> {
        let file = fs
            .open(path, OpenMode::OpenOrCreate { mode: 0o666 })
            .map_err(|e| StoreError::io(path, e))?;
        // redb caches every page it touches, up to 1 GiB by default: a walk of a 4 GiB agent's
        // chunk table held ~100 MB. The OS page cache keeps the file hot anyway.
        let db = redb::Database::builder()
            .set_cache_size(cache)
            .create_with_backend(RedbBackend::new(file, path.to_path_buf()))
            .map_err(|e| open_error(path, e))?;
        Ok(Self {
            db: Db::Write(db),
            path: path.to_path_buf(),
            fs: fs.clone(),
            _lock: guard,
        })
    }

    /// Whether this session may write (see [`Access`]).
    #[cfg(test)]
    pub(crate) fn writable(&self) -> bool {
        matches!(self.db, Db::Write(_))
    }

    /// Closes the database and hands back the lock, still held.
    pub(crate) fn into_lock(self) -> LockGuard {
        let Self { db, _lock, .. } = self;
        drop(db);
        _lock
    }

    /// Asks the kernel to read the whole file ahead when a session is about to read at least
    /// an eighth of its pages (`page_reads`; a whole walk: [`Self::walk_chunks`]). redb reads
    /// a page per call and the table's leaves lie scattered over the file, so a walk of an
    /// index not in the page cache waited for ~7,000 random 4 KiB reads at 1 GiB (0.2 s of a
    /// 0.9 s append day); hinted, the file comes in sequential reads queued at once. Only a
    /// hint: a failure to open the file is for the session's own reads to meet.
    pub(crate) fn read_ahead(&self, page_reads: u64) {
        if let Ok(file) = self.fs.open(&self.path, OpenMode::Read)
            && let Ok(len) = file.len()
            && page_reads.saturating_mul(8 * 4096) >= len
        {
            for at in (0..len).step_by(READ_AHEAD_STEP as usize) {
                file.will_need(at, READ_AHEAD_STEP.min(len - at));
            }
        }
    }

    /// Every entry of the chunk table, in key order, the file read ahead first: the walk reads
    /// every leaf.
    pub(crate) fn walk_chunks<'t>(
        &self,
        chunks: &'t ChunkTable,
    ) -> Result<redb::Range<'t, &'static [u8; 32], &'static [u8; 33]>, StoreError> {
        use redb::ReadableTable;
        self.read_ahead(u64::MAX);
        chunks.iter().map_err(|e| StoreError::index(&self.path, e))
    }

    pub(crate) fn err(&self) -> impl Fn(redb::Error) -> StoreError + '_ {
        move |e| StoreError::index(&self.path, e)
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        match &self.db {
            Db::Write(db) => db.begin_read(),
            Db::Read(Some(db)) => db.begin_read(),
            Db::Read(None) => Err(redb::TransactionError::Storage(
                redb::StorageError::DatabaseClosed,
            )),
        }
        .map_err(|e| StoreError::index(&self.path, e))
    }

    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        match &self.db {
            Db::Write(db) => db
                .begin_write()
                .map_err(|e| StoreError::index(&self.path, e)),
            // No caller writes in a session opened for reading; one that did is a bug.
            Db::Read(_) => Err(StoreError::Index {
                path: self.path.clone(),
                message: "a session opened for reading cannot write".into(),
            }),
        }
    }
}

/// An open index file: for writing, or for reading only (see [`Access`]).
enum Db {
    Write(redb::Database),
    /// `None` once closed, on drop.
    Read(Option<redb::ReadOnlyDatabase>),
}

impl Drop for Db {
    /// A read-only database stays open while a read transaction lives; closed here, like a
    /// dropped [`redb::Database`], a transaction kept past its session (and so past the index
    /// lock) fails instead of reading a file another process may be writing.
    fn drop(&mut self) {
        if let Db::Read(db) = self
            && let Some(db) = db.take()
        {
            let _ = db.close();
        }
    }
}

/// Takes the index lock (exclusive): whoever holds it may open `index.redb`.
pub(crate) fn lock(lock_path: &Path) -> Result<LockGuard, Error> {
    lock::acquire(
        lock_path,
        Mode::Exclusive,
        INDEX_LOCK_TIMEOUT,
        Holder::Index,
    )
}

/// An open that fails on the file's content (not a redb file, a damaged one) is damage, which
/// `memsnap repair` can rebuild; anything else (permissions, a full disk) is reported as it is.
fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError, StorageError};
    let damaged = match &e {
        DatabaseError::Storage(StorageError::Corrupted(_)) => true,
        DatabaseError::Storage(StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    };
    if damaged {
        StoreError::IndexDamaged {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    } else {
        StoreError::index(path, e)
    }
}

/// Encodes a record: one version byte, then bincode 2 (`config::standard()`) of the value.
pub(crate) fn encode_record<T: serde::Serialize>(
    version: u8,
    value: &T,
    what: &str,
) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![version];
    // Fails only for values serde cannot express, such as a path that is not UTF-8.
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        StoreError::CorruptRecord {
            what: what.to_owned(),
            message: format!("cannot encode: {e}"),
        }
    })?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// More string bytes than any record holds (names, paths, labels: a few KiB at most).
const MAX_RECORD_BYTES: usize = 16 << 20;

pub(crate) fn decode_record<T: serde::de::DeserializeOwned>(
    version: u8,
    bytes: &[u8],
    what: &str,
) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::CorruptRecord {
        what: what.to_owned(),
        message,
    };
    match bytes.first() {
        None => Err(corrupt("empty record".into())),
        Some(v) if *v != version => Err(corrupt(format!(
            "record version {v}, this memsnap reads version {version} (upgrade memsnap if it is newer)"
        ))),
        Some(_) => {
            // bincode allocates a string's declared length before reading it: without a limit a
            // damaged length of 2^40 aborts the process instead of failing the decode.
            let config = bincode::config::standard().with_limit::<MAX_RECORD_BYTES>();
            let (value, used) = bincode::serde::decode_from_slice(&bytes[1..], config)
                .map_err(|e| corrupt(e.to_string()))?;
            if used != bytes.len() - 1 {
                return Err(corrupt("trailing bytes".into()));
            }
            Ok(value)
        }
    }
}

/// The `packs` table's value (after its version byte 1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PackRecord {
    pub size: u64,
    pub chunks: u32,
    pub created_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::agent::{AGENT_VERSION, AgentRecord};
    use crate::manifest::snapshot::{SNAPSHOT_VERSION, SnapshotRecord};

    /// Regression (found for the `index_records` fuzz target): a record whose first string
    /// declares a length of 2^40 bytes made bincode allocate 1 TiB and abort the process; a
    /// damaged index record must be an error like any other damage.
    #[test]
    fn a_record_declaring_a_huge_string_is_an_error_not_an_abort() {
        // Version byte, then the snapshot id's length: varint prefix 253 + u64 LE 2^40.
        let mut record = vec![SNAPSHOT_VERSION, 253];
        record.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let e = decode_record::<SnapshotRecord>(SNAPSHOT_VERSION, &record, "snapshot")
            .expect_err("refused");
        assert!(e.to_string().contains("snapshot"), "{e}");
        // An agent record's paths are strings too.
        let mut agent = vec![AGENT_VERSION, 253];
        agent.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_record::<AgentRecord>(AGENT_VERSION, &agent, "agent").is_err());
        // Real records still decode.
        let ok = encode_record(
            1,
            &PackRecord {
                size: 1,
                chunks: 2,
                created_at_ms: 3,
            },
            "pack",
        )
        .expect("encode");
        assert!(decode_record::<PackRecord>(1, &ok, "pack").is_ok());
    }

    /// A session opened for reading leaves the file as it was; with no index yet, or one a
    /// killed writer left needing repair, it opens for writing, which creates or repairs it.
    #[test]
    fn a_reading_session_writes_nothing_and_opens_for_writing_only_when_it_must() {
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, lock) = (dir.path().join("index.redb"), dir.path().join("index.lock"));
        let fs = Fs::default();
        let fresh = Index::open(&fs, &path, &lock, READ_CACHE_BYTES, Access::Read).expect("open");
        assert!(fresh.writable(), "no index yet: created");
        let tx = fresh.begin_write().expect("tx");
        tx.open_table(T)
            .expect("table")
            .insert(1, 10)
            .expect("insert");
        tx.commit().expect("commit");
        drop(fresh);

        let value = |index: &Index| {
            let tx = index.begin_read().expect("read");
            let table = tx.open_table(T).expect("table");
            table.get(1).expect("get").map(|v| v.value())
        };
        let before = std::fs::read(&path).expect("read");
        let index = Index::open(&fs, &path, &lock, READ_CACHE_BYTES, Access::Read).expect("open");
        assert!(!index.writable());
        assert_eq!(value(&index), Some(10));
        assert!(
            index.begin_write().is_err(),
            "a reading session cannot write"
        );
        drop(index);
        assert!(
            std::fs::read(&path).expect("read") == before,
            "the file is unchanged"
        );

        // A writer killed mid-session: redb marked the file as needing repair when it opened.
        let killed =
            Index::open(&fs, &path, &lock, INDEX_CACHE_BYTES, Access::Write).expect("open");
        let guard = lock::acquire(&lock, Mode::Exclusive, Duration::ZERO, Holder::Index);
        assert!(guard.is_err(), "the session holds the index lock");
        let Index { db, _lock, .. } = killed;
        std::mem::forget(db);
        drop(_lock);
        let index = Index::open(&fs, &path, &lock, READ_CACHE_BYTES, Access::Read).expect("open");
        assert!(index.writable(), "repaired by an open for writing");
        assert_eq!(value(&index), Some(10));
        drop(index);

        // A damaged file is reported as damage, as an open for writing reports it.
        std::fs::write(&path, b"not a redb file at all").expect("write");
        let e = Index::open(&fs, &path, &lock, READ_CACHE_BYTES, Access::Read)
            .err()
            .expect("refused");
        assert!(
            matches!(e, Error::Store(StoreError::IndexDamaged { .. })),
            "{e:?}"
        );
    }
}
