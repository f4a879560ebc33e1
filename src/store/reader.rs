//! The read side: fetches a chunk by id through the index, decompresses it and checks that its
//! BLAKE3 hash is its id, so that no damaged byte is ever returned as data.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::chunk_id::ChunkId;
use super::index::{CHUNKS, Index};
use super::pack::{ChunkLoc, FLAG_ZSTD, PackId};
use crate::error::StoreError;

/// Upper bound on a chunk's raw size: checked before allocating, since a damaged index entry
/// could otherwise ask for gigabytes.
pub(crate) const MAX_CHUNK: u32 = 16 * 1024 * 1024;

pub(crate) struct ChunkReader<'i> {
    index: &'i Index,
    /// Opened once: opening a table per lookup was a visible share of a restore.
    chunks: redb::ReadOnlyTable<[u8; 32], [u8; 33]>,
    packs_dir: PathBuf,
    files: HashMap<PackId, File>,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl<'i> ChunkReader<'i> {
    pub(crate) fn new(index: &'i Index, packs_dir: PathBuf) -> Result<Self, StoreError> {
        let tx = index.begin_read()?;
        let chunks = tx
            .open_table(CHUNKS)
            .map_err(|e| StoreError::index(&index.path, e))?;
        Ok(Self {
            chunks,
            index,
            packs_dir,
            files: HashMap::new(),
            dctx: None,
        })
    }

    pub(crate) fn locate(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        let v = self
            .chunks
            .get(id.0)
            .map_err(|e| StoreError::index(&self.index.path, e))?;
        Ok(v.map(|g| ChunkLoc::decode(&g.value())))
    }

    pub(crate) fn pack_path(&self, pack: &PackId) -> PathBuf {
        pack.path(&self.packs_dir)
    }

    pub(crate) fn read(&mut self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self
            .locate(id)?
            .ok_or_else(|| StoreError::MissingChunk { id: id.hex() })?;
        self.read_at(id, &loc)
    }

    pub(crate) fn read_at(&mut self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        let path = self.pack_path(&loc.pack);
        let damaged = |message: String| StoreError::CorruptChunk {
            id: id.hex(),
            pack: path.clone(),
            message,
        };
        if loc.raw_len > MAX_CHUNK || loc.stored_len > MAX_CHUNK {
            return Err(damaged(format!(
                "index entry claims {} bytes, more than any chunk",
                loc.raw_len.max(loc.stored_len)
            )));
        }
        let file = match self.files.entry(loc.pack) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(|e| StoreError::io(&path, e))?)
            }
        };
        let mut stored = vec![0u8; loc.stored_len as usize];
        file.read_exact_at(&mut stored, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                damaged("the pack is shorter than the index says (truncated)".into())
            } else {
                StoreError::io(&path, e)
            }
        })?;
        let raw = if loc.flags & FLAG_ZSTD != 0 {
            if self.dctx.is_none() {
                let d = zstd::bulk::Decompressor::new().map_err(|e| StoreError::io(&path, e))?;
                self.dctx = Some(d);
            }
            let Some(dctx) = self.dctx.as_mut() else {
                return Err(damaged("no decompressor".into()));
            };
            dctx.decompress(&stored, loc.raw_len as usize)
                .map_err(|e| damaged(format!("cannot decompress: {e}")))?
        } else {
            stored
        };
        if raw.len() != loc.raw_len as usize {
            return Err(damaged(format!(
                "{} bytes, the index says {}",
                raw.len(),
                loc.raw_len
            )));
        }
        if ChunkId::of(&raw) != *id {
            return Err(damaged("content does not match its hash".into()));
        }
        Ok(raw)
    }
}
