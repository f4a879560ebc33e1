//! Index entries of a long write that wait for its final commit on disk, in sorted runs: an
//! external sort, so that the commit inserts every entry in key order in one transaction.
//!
//! Entries committed in several transactions (early commits, before) left `index.redb` holding
//! about two copies of the chunk table: chunk ids are random, so each commit rewrote most leaves
//! of the copy-on-write B-tree, and the pages the last one freed stay in the file (a 1 GiB first
//! snapshot: 53 MiB of index for ~31 MiB of live pages). One commit in key order writes each
//! leaf once (see `writer::insert_chunks` for how full).
//!
//! Scratch, not store format: `tmp/runs-<pid>-<hex>/runs` holds `id [32] | ChunkLoc::encode
//! [33]` entries, each run sorted by id; it goes with the writer or its [`super::writer::Pending`]
//! (a killed process's is swept by the next writer).

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::chunk_id::ChunkId;
use super::pack::ChunkLoc;
use crate::error::StoreError;
use crate::fsutil::ScratchDir;
use crate::storage::Fs;

const ENTRY: usize = 32 + ChunkLoc::ENCODED;

/// Read buffer per run while merging: a 4 GiB first snapshot has ~18 runs.
const READ_BUFFER: usize = 64 << 10;

/// Read buffers of all runs together, once there are more than 32 runs.
const MERGE_BUFFERS: usize = 2 << 20;

pub(crate) struct SortedRuns {
    dir: ScratchDir,
    file: BufWriter<std::fs::File>,
    /// Entries in each run, in file order.
    runs: Vec<u64>,
}

impl SortedRuns {
    pub(crate) const PREFIX: &'static str = "runs";
    const FILE: &'static str = "runs";

    pub(crate) fn create(fs: &Fs, tmp: &Path) -> Result<Self, StoreError> {
        let dir = ScratchDir::create(fs, tmp, Self::PREFIX).map_err(|e| StoreError::io(tmp, e))?;
        let path = dir.path.join(Self::FILE);
        let file = std::fs::File::create(&path).map_err(|e| StoreError::io(&path, e))?;
        Ok(Self {
            dir,
            file: BufWriter::with_capacity(READ_BUFFER, file),
            runs: Vec::new(),
        })
    }

    /// Runs written.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.runs.len()
    }

    fn path(&self) -> PathBuf {
        self.dir.path.join(Self::FILE)
    }

    /// Sorts `entries` and writes them as one run; leaves `entries` empty.
    pub(crate) fn push(
        &mut self,
        entries: &mut Vec<(ChunkId, ChunkLoc)>,
    ) -> Result<(), StoreError> {
        entries.sort_unstable_by_key(|(id, _)| *id);
        for (id, loc) in entries.iter() {
            self.file
                .write_all(&id.0)
                .and_then(|()| self.file.write_all(&loc.encode()))
                .map_err(|e| StoreError::io(self.path(), e))?;
        }
        // Whole runs on disk: the merge reads the file through handles of its own.
        self.file
            .flush()
            .map_err(|e| StoreError::io(self.path(), e))?;
        self.runs.push(entries.len() as u64);
        entries.clear();
        Ok(())
    }
}

/// Every entry of `runs` and of `rest`, in key order (an id written twice comes twice: from
/// the runs first, in run order, then from `rest`).
pub(crate) fn merged(
    runs: Option<&SortedRuns>,
    rest: &HashMap<ChunkId, ChunkLoc>,
) -> Result<Merged, StoreError> {
    let path = runs.map(SortedRuns::path).unwrap_or_default();
    let counts = runs.map_or(&[][..], |r| &r.runs);
    let file = match counts.is_empty() {
        true => None,
        false => Some(std::fs::File::open(&path).map_err(|e| StoreError::io(&path, e))?),
    };
    let mut readers = Vec::with_capacity(counts.len());
    let mut start = 0u64;
    for &count in counts {
        readers.push(Run {
            at: start * ENTRY as u64,
            unread: count * ENTRY as u64,
            buf: Vec::new(),
            pos: 0,
        });
        start += count;
    }
    let mut memory: Vec<(ChunkId, ChunkLoc)> = rest.iter().map(|(i, l)| (*i, *l)).collect();
    memory.sort_unstable_by_key(|(id, _)| *id);
    let mut merged = Merged {
        path,
        file,
        buffer: run_buffer(counts.len()),
        heads: std::collections::BinaryHeap::with_capacity(counts.len()),
        locs: vec![ChunkLoc::UNSET; counts.len()],
        readers,
        memory: memory.into_iter().peekable(),
    };
    for i in 0..merged.readers.len() {
        merged.advance(i)?;
    }
    Ok(merged)
}

/// Read buffer of each of `runs` runs: [`READ_BUFFER`] while they are few, less once their sum
/// would pass [`MERGE_BUFFERS`] (a first snapshot of hundreds of GiB has a thousand runs), never
/// less than 64 entries.
fn run_buffer(runs: usize) -> usize {
    (MERGE_BUFFERS / runs.max(1)).clamp(64 * ENTRY, READ_BUFFER) / ENTRY * ENTRY
}

/// A run being merged: its next `unread` bytes at `at` in the runs file, after what is left of
/// `buf` from `pos`.
struct Run {
    at: u64,
    unread: u64,
    buf: Vec<u8>,
    pos: usize,
}

/// The merge of [`SortedRuns`] and the entries held in memory. The runs are read through one
/// handle at their own offsets, and the next entry is the least of the runs' heads, in a heap:
/// runs grow with the snapshot (one per 65,536 entries), so neither file handles nor a scan of
/// every head per entry may.
pub(crate) struct Merged {
    path: PathBuf,
    file: Option<std::fs::File>,
    buffer: usize,
    /// Each run's head id with the run's number, least first; its location in `locs`.
    heads: std::collections::BinaryHeap<std::cmp::Reverse<(ChunkId, usize)>>,
    locs: Vec<ChunkLoc>,
    readers: Vec<Run>,
    memory: std::iter::Peekable<std::vec::IntoIter<(ChunkId, ChunkLoc)>>,
}

impl Merged {
    /// Puts run `i`'s next entry in the heap, if it has one.
    fn advance(&mut self, i: usize) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let run = &mut self.readers[i];
        if run.pos == run.buf.len() {
            if run.unread == 0 {
                run.buf = Vec::new();
                return Ok(());
            }
            let Some(file) = &self.file else {
                return Ok(());
            };
            let n = run.unread.min(self.buffer as u64) as usize;
            run.buf.resize(n, 0);
            file.read_exact_at(&mut run.buf, run.at)
                .map_err(|e| StoreError::io(&self.path, e))?;
            run.at += n as u64;
            run.unread -= n as u64;
            run.pos = 0;
        }
        let b = &run.buf[run.pos..run.pos + ENTRY];
        run.pos += ENTRY;
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let mut loc = [0u8; ChunkLoc::ENCODED];
        loc.copy_from_slice(&b[32..]);
        self.locs[i] = ChunkLoc::decode(&loc);
        self.heads.push(std::cmp::Reverse((ChunkId(id), i)));
        Ok(())
    }

    /// Bytes of read buffer the runs hold.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.readers.iter().map(|r| r.buf.capacity()).sum()
    }
}

impl Iterator for Merged {
    type Item = Result<(ChunkId, ChunkLoc), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match (self.heads.peek(), self.memory.peek()) {
            (Some(std::cmp::Reverse((id, _))), m) if m.is_none_or(|m| *id <= m.0) => {
                let std::cmp::Reverse((id, i)) = self.heads.pop()?;
                let head = (id, self.locs[i]);
                Some(self.advance(i).map(|()| head))
            }
            _ => self.memory.next().map(Ok),
        }
    }
}
