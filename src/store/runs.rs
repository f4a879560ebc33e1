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
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::chunk_id::ChunkId;
use super::pack::ChunkLoc;
use crate::error::StoreError;
use crate::fsutil::ScratchDir;
use crate::storage::Fs;

const ENTRY: usize = 32 + ChunkLoc::ENCODED;

/// Read buffer per run while merging: a 4 GiB first snapshot has ~18 runs.
const READ_BUFFER: usize = 64 << 10;

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

/// Every entry of `runs` and of `rest`, in key order (an id written twice comes twice).
pub(crate) fn merged(
    runs: Option<&SortedRuns>,
    rest: &HashMap<ChunkId, ChunkLoc>,
) -> Result<Merged, StoreError> {
    let path = runs.map(SortedRuns::path).unwrap_or_default();
    let err = |e| StoreError::io(&path, e);
    let mut readers = Vec::new();
    let mut start = 0u64;
    for &count in runs.map_or(&[][..], |r| &r.runs) {
        let mut file = std::fs::File::open(&path).map_err(err)?;
        file.seek(SeekFrom::Start(start * ENTRY as u64))
            .map_err(err)?;
        readers.push(Run {
            reader: BufReader::with_capacity(READ_BUFFER, file),
            left: count,
            head: None,
        });
        start += count;
    }
    let mut memory: Vec<(ChunkId, ChunkLoc)> = rest.iter().map(|(i, l)| (*i, *l)).collect();
    memory.sort_unstable_by_key(|(id, _)| *id);
    let mut merged = Merged {
        path,
        readers,
        memory: memory.into_iter().peekable(),
    };
    for i in 0..merged.readers.len() {
        merged.advance(i)?;
    }
    Ok(merged)
}

struct Run {
    reader: BufReader<std::fs::File>,
    left: u64,
    head: Option<(ChunkId, ChunkLoc)>,
}

/// The merge of [`SortedRuns`] and the entries held in memory. Runs are few (one per 65,536
/// entries), so the smallest head is found by a scan, not a heap.
pub(crate) struct Merged {
    path: PathBuf,
    readers: Vec<Run>,
    memory: std::iter::Peekable<std::vec::IntoIter<(ChunkId, ChunkLoc)>>,
}

impl Merged {
    fn advance(&mut self, i: usize) -> Result<(), StoreError> {
        let run = &mut self.readers[i];
        run.head = None;
        if run.left == 0 {
            return Ok(());
        }
        let mut b = [0u8; ENTRY];
        run.reader
            .read_exact(&mut b)
            .map_err(|e| StoreError::io(&self.path, e))?;
        run.left -= 1;
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let mut loc = [0u8; ChunkLoc::ENCODED];
        loc.copy_from_slice(&b[32..]);
        run.head = Some((ChunkId(id), ChunkLoc::decode(&loc)));
        Ok(())
    }
}

impl Iterator for Merged {
    type Item = Result<(ChunkId, ChunkLoc), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let smallest = self
            .readers
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.head.as_ref().map(|h| (h.0, i)))
            .min();
        match (smallest, self.memory.peek()) {
            (Some((id, i)), m) if m.is_none_or(|m| id <= m.0) => {
                let head = self.readers[i].head.take()?;
                Some(self.advance(i).map(|()| head))
            }
            _ => self.memory.next().map(Ok),
        }
    }
}
