//! The change-detection cache (redb `file_stats` table, store-format.md "Change detection"): per
//! agent, the `stat` of each file and database as its last snapshot found it, with the entry that
//! snapshot stored. A file whose `stat` is unchanged reuses the entry without being read.
//!
//! Never miss a change: the key includes `ctime`, which no program can set (writing a byte and
//! restoring size and mtime still moves it), and a file changed so shortly before its listing
//! that a later change could carry the same timestamps ("racy", as git calls it) is not cached.

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use super::artifact::{ArtifactEntry, Part};

pub(crate) const FILE_STATS_VERSION: u8 = 1;

/// A file changed less than this before it was listed is not cached: file timestamps come from
/// a clock that advances in ticks (1-10 ms), so a change right after the read could leave them
/// equal. 100 ms is ten ticks at the coarsest common setting.
const RACY_NS: i64 = 100_000_000;

/// What `stat` says about a file, as far as change detection compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl FileStat {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.len(),
            mtime_ns: crate::source::memdir::mtime_ns(meta),
            ctime_ns: meta
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }

    /// Changed too close to `listed_at_ns` (or after it) for its timestamps to prove anything
    /// about a later change.
    pub(crate) fn racy(&self, listed_at_ns: i64) -> bool {
        self.ctime_ns.max(self.mtime_ns) > listed_at_ns.saturating_sub(RACY_NS)
    }
}

/// A database's `-wal` file. Not its ctime: opening a WAL database as root `fchown`s the `-wal`
/// to the database's owner, which moves its ctime on every read. A commit appends frames (size
/// and mtime move); a restart after a checkpoint rewrites from the start with new salts in the
/// 32-byte header (mtime and header move).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WalStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    pub header: [u8; 32],
}

impl WalStat {
    /// The `-wal` at `path`; `None` if there is none.
    pub(crate) fn read(path: &std::path::Path) -> std::io::Result<Option<Self>> {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let s = FileStat::of(&f.metadata()?);
        let mut header = [0u8; 32];
        crate::fsutil::read_full(&mut f, &mut header)?;
        Ok(Some(Self {
            size: s.size,
            mtime_ns: s.mtime_ns,
            ino: s.ino,
            dev: s.dev,
            header,
        }))
    }

    pub(crate) fn racy(&self, listed_at_ns: i64) -> bool {
        self.mtime_ns > listed_at_ns.saturating_sub(RACY_NS)
    }
}

/// One file or database of an agent as its last snapshot stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatRow {
    pub stat: FileStat,
    /// For a database: its `-wal` file (`None`: there was none). A commit or checkpoint changes
    /// the one or the other, so both unchanged means the same committed content.
    pub wal: Option<WalStat>,
    pub entry: ArtifactEntry,
}

/// The key of an agent's row: `tenant/agent`, a NUL (which names never hold), the part's number
/// and the path, so that an agent's rows are one key range in (part, path) order.
pub(crate) fn row_key(agent_key: &str, part: Part, path: &[u8]) -> Vec<u8> {
    let mut k = agent_key_prefix(agent_key);
    k.push(part as u8);
    k.extend_from_slice(path);
    k
}

/// The first key of an agent's rows; the range ends before the same with NUL replaced by 1.
pub(crate) fn agent_key_prefix(agent_key: &str) -> Vec<u8> {
    let mut k = agent_key.as_bytes().to_vec();
    k.push(0);
    k
}

/// The rows of one agent, sorted by (part, path).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AgentFileStats {
    pub rows: Vec<StatRow>,
}

impl AgentFileStats {
    /// The row of `(part, path)` if its file is unchanged: same `stat` (and `-wal` `stat`).
    pub(crate) fn unchanged(
        &self,
        part: Part,
        path: &[u8],
        stat: &FileStat,
        wal: Option<&WalStat>,
    ) -> Option<&StatRow> {
        let i = self
            .rows
            .binary_search_by(|r| (r.entry.part, r.entry.path.as_slice()).cmp(&(part, path)))
            .ok()?;
        let row = &self.rows[i];
        (row.stat == *stat && row.wal.as_ref() == wal).then_some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_written_behind_restored_size_and_mtime_changes_the_stat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("note.md");
        std::fs::write(&p, b"hello world").expect("write");
        let stat = |p: &std::path::Path| FileStat::of(&std::fs::metadata(p).expect("stat"));
        let before = stat(&p);
        let mtime = std::fs::metadata(&p)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"hello World").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&p)
            .expect("open")
            .set_modified(mtime)
            .expect("set mtime");
        let after = stat(&p);
        assert_eq!((after.size, after.mtime_ns), (before.size, before.mtime_ns));
        assert_ne!(after, before, "ctime must have moved");
        let wal = dir.path().join("a.sqlite-wal");
        assert!(WalStat::read(&wal).expect("stat").is_none());
        std::fs::write(&wal, [1u8; 40]).expect("write");
        let w = WalStat::read(&wal).expect("stat").expect("exists");
        assert_eq!((w.size, w.header), (40, [1u8; 32]));
    }

    #[test]
    fn recent_changes_are_racy() {
        let s = FileStat {
            size: 1,
            mtime_ns: 1_000_000_000,
            ctime_ns: 1_000_000_000,
            ino: 1,
            dev: 1,
        };
        assert!(s.racy(1_000_000_000));
        assert!(s.racy(1_050_000_000));
        assert!(!s.racy(1_200_000_000));
        // A clock stepped back makes a file look changed in the future: racy, never cached.
        assert!(s.racy(900_000_000));
    }
}
