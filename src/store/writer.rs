//! The write side of a snapshot: hashes chunks, drops those the store already has, compresses the
//! rest where that pays and appends them to packs. Nothing becomes visible until the caller
//! commits the [`Pending`] result in one index transaction (store-format.md, "Write ordering").
//!
//! Known chunks are recognised by an in-memory filter of 8-byte id prefixes loaded when the
//! snapshot starts (8 bytes per stored chunk). A hit is only "probably stored": it is confirmed
//! with an exact index lookup at commit. Tree nodes make that cheap: a confirmed node implies
//! its whole subtree (invariant I3), so a hit subtree needs one lookup, however large.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use rayon::prelude::*;

use super::chunk_id::ChunkId;
use super::config::StoreConfig;
use super::pack::{ChunkLoc, FLAG_TREE, FLAG_ZSTD, PackId, PackWriter};
use crate::error::StoreError;

/// Ids the store held when the snapshot began, as sorted prefixes.
#[derive(Default)]
pub(crate) struct KnownFilter {
    prefixes: Vec<u64>,
    /// Ids that a failed confirmation proved absent despite a prefix match.
    excluded: HashSet<ChunkId>,
}

impl KnownFilter {
    pub(crate) fn new(mut prefixes: Vec<u64>, excluded: HashSet<ChunkId>) -> Self {
        prefixes.sort_unstable();
        prefixes.dedup();
        Self { prefixes, excluded }
    }

    fn probably_has(&self, id: &ChunkId) -> bool {
        self.prefixes.binary_search(&id.prefix()).is_ok() && !self.excluded.contains(id)
    }
}

/// The outcome of storing one chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Put {
    pub id: ChunkId,
    pub len: u64,
    /// The store probably had the chunk before this snapshot (a filter hit, to be confirmed).
    pub hit: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WriteStats {
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
}

/// What a finished writer hands to the commit: everything here is durable on disk.
pub(crate) struct Pending {
    pub packs_dir: PathBuf,
    pub new_chunks: HashMap<ChunkId, ChunkLoc>,
    /// (pack, size in bytes, chunk count)
    pub packs: Vec<(PackId, u64, u32)>,
    pub confirm: Vec<ChunkId>,
    pub node_hits: HashSet<ChunkId>,
    pub stats: WriteStats,
}

pub(crate) struct ChunkWriter {
    packs_dir: PathBuf,
    level: i32,
    pack_target: u64,
    known: KnownFilter,
    new_chunks: HashMap<ChunkId, ChunkLoc>,
    pack: Option<PackWriter>,
    done: Vec<(PackId, u64, u32)>,
    dirs: BTreeSet<PathBuf>,
    /// Filter hits that no confirmed tree node covers: looked up one by one at commit.
    pub(crate) confirm: Vec<ChunkId>,
    /// Tree nodes among the filter hits: at commit their index entry must be a tree node (a
    /// data chunk with the same bytes proves nothing about a subtree).
    pub(crate) node_hits: HashSet<ChunkId>,
    pub(crate) stats: WriteStats,
}

struct Prepared {
    id: ChunkId,
    hit: bool,
    /// Not in the store nor written earlier in this snapshot.
    new: bool,
    data: Vec<u8>,
    compressed: Option<Vec<u8>>,
}

impl ChunkWriter {
    pub(crate) fn new(packs_dir: PathBuf, config: &StoreConfig, known: KnownFilter) -> Self {
        Self {
            packs_dir,
            level: config.zstd_level,
            pack_target: config.pack_target_size,
            known,
            new_chunks: HashMap::new(),
            pack: None,
            done: Vec::new(),
            dirs: BTreeSet::new(),
            confirm: Vec::new(),
            node_hits: HashSet::new(),
            stats: WriteStats::default(),
        }
    }

    /// Stores a batch of chunks, hashing and compressing them in parallel.
    pub(crate) fn put_batch(
        &mut self,
        chunks: Vec<Vec<u8>>,
        flags: u8,
    ) -> Result<Vec<Put>, StoreError> {
        let level = self.level;
        let known = &self.known;
        let new_chunks = &self.new_chunks;
        let prepared: Vec<Prepared> = chunks
            .into_par_iter()
            .map(|data| {
                let id = ChunkId::of(&data);
                let hit = known.probably_has(&id);
                let new = !hit && !new_chunks.contains_key(&id);
                let compressed = if new { compress(&data, level) } else { None };
                Prepared {
                    id,
                    hit,
                    new,
                    data,
                    compressed,
                }
            })
            .collect();
        let mut out = Vec::with_capacity(prepared.len());
        for p in prepared {
            self.stats.chunks += 1;
            let raw_len = p.data.len() as u32;
            // A batch may hold one new chunk twice: the second finds the first in new_chunks.
            if p.new && !self.new_chunks.contains_key(&p.id) {
                match &p.compressed {
                    Some(c) => self.append(p.id, raw_len, flags | FLAG_ZSTD, c)?,
                    None => self.append(p.id, raw_len, flags, &p.data)?,
                }
            }
            out.push(Put {
                id: p.id,
                len: raw_len as u64,
                hit: p.hit,
            });
        }
        Ok(out)
    }

    pub(crate) fn put_tree_node(&mut self, node: Vec<u8>) -> Result<Put, StoreError> {
        let mut v = self.put_batch(vec![node], FLAG_TREE)?;
        let put = v.pop().ok_or_else(|| StoreError::CorruptRecord {
            what: "tree node".into(),
            message: "writer returned no result".into(),
        })?;
        if put.hit {
            self.node_hits.insert(put.id);
        }
        Ok(put)
    }

    fn append(
        &mut self,
        id: ChunkId,
        raw_len: u32,
        flags: u8,
        stored: &[u8],
    ) -> Result<(), StoreError> {
        if self.pack.is_none() {
            let w = PackWriter::create(&self.packs_dir)?;
            self.dirs.insert(crate::fsutil::parent_of(&w.path));
            self.pack = Some(w);
        }
        let Some(pack) = self.pack.as_mut() else {
            return Ok(());
        };
        let loc = pack.append(id, raw_len, flags, stored)?;
        self.stats.new_chunks += 1;
        self.stats.new_raw_bytes += raw_len as u64;
        self.stats.new_stored_bytes += stored.len() as u64;
        self.new_chunks.insert(id, loc);
        if pack.len() >= self.pack_target {
            self.close_pack()?;
        }
        Ok(())
    }

    fn close_pack(&mut self) -> Result<(), StoreError> {
        if let Some(w) = self.pack.take() {
            let (id, _path, size, count) = w.finish()?;
            self.done.push((id, size, count));
        }
        Ok(())
    }

    /// Deletes the packs written so far: what they were written for will not be committed, and
    /// nothing else can reference chunks that no index entry names.
    pub(crate) fn abandon(mut self) {
        if let Some(p) = self.pack.take() {
            let path = p.path.clone();
            drop(p);
            let _ = std::fs::remove_file(path);
        }
        for (id, _, _) in &self.done {
            let _ = std::fs::remove_file(id.path(&self.packs_dir));
        }
    }

    /// Closes the open pack and makes every pack written and its directory entry durable.
    pub(crate) fn finish(mut self) -> Result<Pending, StoreError> {
        self.close_pack()?;
        for dir in &self.dirs {
            crate::fsutil::sync_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        }
        if !self.dirs.is_empty() {
            crate::fsutil::sync_dir(&self.packs_dir)
                .map_err(|e| StoreError::io(&self.packs_dir, e))?;
        }
        Ok(Pending {
            packs_dir: self.packs_dir.clone(),
            new_chunks: self.new_chunks,
            packs: self.done,
            confirm: self.confirm,
            node_hits: self.node_hits,
            stats: self.stats,
        })
    }
}

impl Pending {
    /// Deletes the packs of a commit that will not happen (see [`ChunkWriter::abandon`]).
    pub(crate) fn abandon(&self) {
        for (id, _, _) in &self.packs {
            let _ = std::fs::remove_file(id.path(&self.packs_dir));
        }
    }
}

/// Order-0 entropy at or above this many bits per byte means Huffman coding cannot save an
/// eighth, and random data (embeddings) has no long matches either: compressing it would burn
/// ~half of a first snapshot's CPU for nothing. A byte histogram costs a fraction of a zstd call.
const MAX_ENTROPY_BITS: f64 = 7.2;

fn may_compress(data: &[u8]) -> bool {
    let mut hist = [0u32; 256];
    for &b in data {
        hist[b as usize] += 1;
    }
    let n = data.len() as f64;
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    entropy < MAX_ENTROPY_BITS
}

/// Compresses with zstd when that saves at least 1/8 of the bytes; random float vectors, the
/// bulk of an agent's memory, save ~8% and are stored raw (cheaper to restore, too).
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    thread_local! {
        // One context per pool thread: creating a zstd context per chunk cost ~10% of a snapshot.
        static CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    if data.len() < 64 || !may_compress(data) {
        return None;
    }
    let c = CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress(data).ok()
    })?;
    (c.len() <= data.len() - data.len() / 8).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_sparse_pages_compress_random_floats_do_not() {
        let text = "The user prefers short answers and works on memsnap. ".repeat(80);
        assert!(compress(text.as_bytes(), 3).is_some());
        let mut page = vec![0u8; 4096];
        page[..100].copy_from_slice(&[7u8; 100]);
        assert!(compress(&page, 3).is_some());
        let mut s = 0x1234_5678_u64;
        let floats: Vec<u8> = (0..1024)
            .flat_map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.1).to_le_bytes()
            })
            .collect();
        assert!(
            !may_compress(&floats),
            "random float32 vectors should skip zstd"
        );
    }
}
