//! The read side: fetches a chunk by id through the index, decompresses it and checks that its
//! BLAKE3 hash is its id, so that no damaged byte is ever returned as data.
//!
//! [`PackFiles`] reads a chunk whose location is known, from any thread and without the index:
//! restore resolves every location first, closes the index (other processes take turns on it),
//! then reads the packs in parallel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::chunk_id::ChunkId;
use super::index::{CHUNKS, Index};
use super::pack::{ChunkLoc, FLAG_ZSTD, PackId};
use crate::error::StoreError;
use crate::storage::{Fs, OpenMode, StorageFile};

/// Upper bound on a chunk's raw size: checked before allocating, since a damaged index entry
/// could otherwise ask for gigabytes.
pub(crate) const MAX_CHUNK: u32 = 16 * 1024 * 1024;

const MAX_OPEN_PACKS: usize = 128;

/// Open pack files, shared by reader threads.
pub(crate) struct PackFiles {
    fs: Fs,
    dir: PathBuf,
    files: Mutex<HashMap<PackId, Arc<dyn StorageFile>>>,
}

impl PackFiles {
    pub(crate) fn new(fs: &Fs, dir: PathBuf) -> Self {
        Self {
            fs: fs.clone(),
            dir,
            files: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn path(&self, pack: &PackId) -> PathBuf {
        pack.path(&self.dir)
    }

    fn file(&self, pack: &PackId) -> Result<Arc<dyn StorageFile>, StoreError> {
        let mut files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = files.get(pack) {
            return Ok(f.clone());
        }
        let path = self.path(pack);
        let f: Arc<dyn StorageFile> = Arc::from(
            self.fs
                .open(&path, OpenMode::Read)
                .map_err(|e| StoreError::io(&path, e))?,
        );
        // Bounded, far below the usual 1024 descriptors: a store has thousands of packs. Readers
        // holding an Arc keep their file open until they are done with it.
        if files.len() >= MAX_OPEN_PACKS {
            files.clear();
        }
        files.insert(*pack, f.clone());
        Ok(f)
    }

    /// The pack file holding a chunk; a pack that is gone is reported as such.
    fn chunk_file(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Arc<dyn StorageFile>, StoreError> {
        self.file(&loc.pack).map_err(|e| match e {
            StoreError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                StoreError::MissingPack {
                    pack: path,
                    id: id.hex(),
                }
            }
            e => e,
        })
    }

    /// Reads, decompresses and checks one chunk. Safe to call from many threads.
    pub(crate) fn read(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        self.read_checked(id, loc, true)
    }

    /// A chunk's bytes as stored (a zstd frame when `loc.flags` has the zstd bit), not yet
    /// decompressed nor checked against `id` (see [`PackFiles::decode`]).
    pub(crate) fn read_stored(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        let path = || self.path(&loc.pack);
        check_sizes(id, loc, &path)?;
        let file = self.chunk_file(id, loc)?;
        let mut stored = vec![0u8; loc.stored_len as usize];
        read_at(file.as_ref(), &mut stored, id, loc, &path)?;
        Ok(stored)
    }

    /// Reads, decompresses and checks one chunk into `out`, which must be `loc.raw_len` long:
    /// no allocation for a raw chunk, one reused buffer per thread for a compressed one.
    pub(crate) fn read_into(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<u8>, Option<zstd::bulk::Decompressor<'static>>)> =
                const { std::cell::RefCell::new((Vec::new(), None)) };
        }
        // Named only on an error: formatting it per chunk was ~1.5% of a restore.
        let path = || self.path(&loc.pack);
        check_sizes(id, loc, &path)?;
        if out.len() != loc.raw_len as usize {
            return Err(damaged(id, &path(), "buffer of the wrong size".into()));
        }
        let file = self.chunk_file(id, loc)?;
        if loc.flags & FLAG_ZSTD == 0 {
            if loc.stored_len != loc.raw_len {
                return Err(damaged(
                    id,
                    &path(),
                    format!("{} bytes, the index says {}", loc.stored_len, loc.raw_len),
                ));
            }
            read_at(file.as_ref(), out, id, loc, &path)?;
        } else {
            SCRATCH.with(|cell| -> Result<(), StoreError> {
                let mut guard = cell.borrow_mut();
                let (stored, dctx) = &mut *guard;
                stored.resize(loc.stored_len as usize, 0);
                read_at(file.as_ref(), stored, id, loc, &path)?;
                if dctx.is_none() {
                    *dctx = Some(
                        zstd::bulk::Decompressor::new().map_err(|e| StoreError::io(path(), e))?,
                    );
                }
                let Some(d) = dctx.as_mut() else {
                    return Err(damaged(id, &path(), "no decompressor".into()));
                };
                let n = d
                    .decompress_to_buffer(stored.as_slice(), out)
                    .map_err(|e| damaged(id, &path(), format!("cannot decompress: {e}")))?;
                if n != loc.raw_len as usize {
                    return Err(damaged(
                        id,
                        &path(),
                        format!("{n} bytes, the index says {}", loc.raw_len),
                    ));
                }
                Ok(())
            })?;
        }
        if ChunkId::of(out) != *id {
            return Err(damaged(
                id,
                &path(),
                "content does not match its hash".into(),
            ));
        }
        Ok(())
    }

    /// Like [`PackFiles::read`]; without `verify` the BLAKE3 check is skipped (for a second
    /// read of chunks a first pass already checked).
    pub(crate) fn read_checked(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        verify: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let stored = self.read_stored(id, loc)?;
        self.decode(id, loc, stored, verify)
    }

    /// A chunk's content from its stored bytes: decompressed when stored so, its length and
    /// (with `verify`) its BLAKE3 checked against the index entry and `id`.
    pub(crate) fn decode(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        stored: Vec<u8>,
        verify: bool,
    ) -> Result<Vec<u8>, StoreError> {
        thread_local! {
            static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let path = || self.path(&loc.pack);
        let raw = if loc.flags & FLAG_ZSTD != 0 {
            DCTX.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(
                        zstd::bulk::Decompressor::new().map_err(|e| StoreError::io(path(), e))?,
                    );
                }
                match slot.as_mut() {
                    Some(d) => d
                        .decompress(&stored, loc.raw_len as usize)
                        .map_err(|e| damaged(id, &path(), format!("cannot decompress: {e}"))),
                    None => Err(damaged(id, &path(), "no decompressor".into())),
                }
            })?
        } else {
            stored
        };
        if raw.len() != loc.raw_len as usize {
            return Err(damaged(
                id,
                &path(),
                format!("{} bytes, the index says {}", raw.len(), loc.raw_len),
            ));
        }
        if verify && ChunkId::of(&raw) != *id {
            return Err(damaged(
                id,
                &path(),
                "content does not match its hash".into(),
            ));
        }
        Ok(raw)
    }
}

/// A chunk's stored bytes at their place in its pack; a pack too short for them is damaged.
fn read_at(
    file: &dyn StorageFile,
    buf: &mut [u8],
    id: &ChunkId,
    loc: &ChunkLoc,
    path: &dyn Fn() -> PathBuf,
) -> Result<(), StoreError> {
    file.read_exact_at(buf, loc.offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            damaged(
                id,
                &path(),
                "the pack is shorter than the index says (truncated)".into(),
            )
        } else {
            StoreError::io(path(), e)
        }
    })
}

/// Refuses an index entry that claims more bytes than any chunk has, before allocating them.
fn check_sizes(id: &ChunkId, loc: &ChunkLoc, path: &dyn Fn() -> PathBuf) -> Result<(), StoreError> {
    if loc.raw_len > MAX_CHUNK || loc.stored_len > MAX_CHUNK {
        return Err(damaged(
            id,
            &path(),
            format!(
                "index entry claims {} bytes, more than any chunk",
                loc.raw_len.max(loc.stored_len)
            ),
        ));
    }
    Ok(())
}

fn damaged(id: &ChunkId, pack: &std::path::Path, message: String) -> StoreError {
    StoreError::CorruptChunk {
        id: id.hex(),
        pack: pack.to_path_buf(),
        message,
    }
}

/// Reads chunks by id, through the index.
pub(crate) struct ChunkReader<'i> {
    index: &'i Index,
    /// Opened once: opening a table per lookup was a visible share of a restore.
    chunks: redb::ReadOnlyTable<&'static [u8; 32], &'static [u8; 33]>,
    pub(crate) packs: PackFiles,
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
            packs: PackFiles::new(&index.fs, packs_dir),
        })
    }

    pub(crate) fn locate(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        let v = self
            .chunks
            .get(&id.0)
            .map_err(|e| StoreError::index(&self.index.path, e))?;
        Ok(v.map(|g| ChunkLoc::decode(g.value())))
    }

    /// Chunks the index holds.
    pub(crate) fn chunk_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        self.chunks
            .len()
            .map_err(|e| StoreError::index(&self.index.path, e))
    }

    pub(crate) fn read(&mut self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self
            .locate(id)?
            .ok_or_else(|| StoreError::MissingChunk { id: id.hex() })?;
        self.packs.read(id, &loc)
    }

    /// [`ChunkReader::resolve`] for many contents at once, locating each distinct chunk once and
    /// in key order: a walk of the whole table when the contents use a good share of it,
    /// sorted lookups otherwise (one random lookup per chunk cost ~10 us, 2.8 s for 1 GiB).
    /// Locations are filled into the result in place, through a 16-byte sort order: ~90 bytes
    /// per chunk at the peak (it was ~180 with separate id, lookup and result lists).
    pub(crate) fn resolve_all(
        &mut self,
        contents: &[Option<&crate::tree::ContentRef>],
    ) -> Result<Vec<Vec<(ChunkId, ChunkLoc)>>, StoreError> {
        let mut out: Vec<Vec<(ChunkId, ChunkLoc)>> = Vec::with_capacity(contents.len());
        for c in contents {
            let mut chunks = Vec::new();
            if let Some(c) = c {
                crate::tree::walk(self, c, false, &mut |id, is_data, res| {
                    res?;
                    if is_data {
                        chunks.push((*id, ChunkLoc::UNSET));
                    }
                    Ok(())
                })?;
            }
            out.push(chunks);
        }
        self.locate_lists(&mut out)?;
        Ok(out)
    }

    /// Fills the locations of every chunk in `out`, each distinct id located once and in key
    /// order (see [`ChunkReader::resolve_all`]); a chunk the index lacks is
    /// [`StoreError::MissingChunk`].
    pub(crate) fn locate_lists(
        &mut self,
        out: &mut [Vec<(ChunkId, ChunkLoc)>],
    ) -> Result<(), StoreError> {
        use redb::{ReadableTable, ReadableTableMetadata};
        // (id prefix, content, position), in id order: a prefix sorts contiguously; equal
        // prefixes (repeated chunks, or a rare collision) fall back to the whole id.
        let mut order: Vec<(u64, u32, u32)> = Vec::with_capacity(out.iter().map(Vec::len).sum());
        for (c, chunks) in out.iter().enumerate() {
            for (p, (id, _)) in chunks.iter().enumerate() {
                order.push((id.prefix(), c as u32, p as u32));
            }
        }
        fn id_at(out: &[Vec<(ChunkId, ChunkLoc)>], o: &(u64, u32, u32)) -> ChunkId {
            out[o.1 as usize][o.2 as usize].0
        }
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| id_at(out, a).cmp(&id_at(out, b)))
        });
        let err = |e: redb::StorageError| StoreError::index(&self.index.path, e);
        let total = self.chunks.len().map_err(err)?;
        // Sets the location of the run of equal ids starting at `order[i]`; returns its end.
        let assign = |out: &mut [Vec<(ChunkId, ChunkLoc)>], i: usize, loc: ChunkLoc| {
            let id = id_at(out, &order[i]);
            let mut j = i;
            while j < order.len() && order[j].0 == order[i].0 && id_at(out, &order[j]) == id {
                out[order[j].1 as usize][order[j].2 as usize].1 = loc;
                j += 1;
            }
            j
        };
        // Distinct wanted ids, for choosing between a walk of the table and lookups.
        let distinct = order
            .windows(2)
            .filter(|w| w[0].0 != w[1].0 || id_at(out, &w[0]) != id_at(out, &w[1]))
            .count()
            + usize::from(!order.is_empty());
        let mut i = 0;
        if distinct as u64 * 8 >= total {
            // Both sides in key order: a merge. Wanted ids below a key are absent: each is
            // reported by the content that needs it, below.
            for item in self.chunks.iter().map_err(err)? {
                let (k, v) = item.map_err(err)?;
                let key = ChunkId(*k.value());
                while i < order.len() && id_at(out, &order[i]) < key {
                    i += 1;
                }
                if i == order.len() {
                    break;
                }
                if id_at(out, &order[i]) == key {
                    i = assign(out, i, ChunkLoc::decode(v.value()));
                }
            }
        } else {
            while i < order.len() {
                let id = id_at(out, &order[i]);
                match self.locate(&id)? {
                    Some(loc) => i = assign(out, i, loc),
                    None => i += 1,
                }
            }
        }
        for chunks in out.iter() {
            if let Some((id, _)) = chunks.iter().find(|(_, l)| *l == ChunkLoc::UNSET) {
                return Err(StoreError::MissingChunk { id: id.hex() });
            }
        }
        Ok(())
    }

    /// Locates `chunks`, sorted by id without repeats, in place: a walk of the table between
    /// the first and the last when they are a good share of the entries there, lookups in key
    /// order otherwise. The ones the index lacks are taken out and returned.
    pub(crate) fn locate_sorted(
        &mut self,
        chunks: &mut Vec<(ChunkId, ChunkLoc)>,
    ) -> Result<Vec<ChunkId>, StoreError> {
        use redb::ReadableTableMetadata;
        let err = |e: redb::StorageError| StoreError::index(&self.index.path, e);
        for c in chunks.iter_mut() {
            c.1 = ChunkLoc::UNSET;
        }
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(Vec::new());
        };
        // Ids are uniform: the entries between the first and the last wanted id.
        let span = (last.0.prefix() - first.0.prefix()) as u128;
        let between = ((u128::from(self.chunks.len().map_err(err)?) * span) >> 64) as u64;
        if chunks.len() as u64 * 8 >= between {
            let mut i = 0;
            for item in self
                .chunks
                .range::<&[u8; 32]>(&first.0.0..=&last.0.0)
                .map_err(err)?
            {
                let (k, v) = item.map_err(err)?;
                let key = ChunkId(*k.value());
                while i < chunks.len() && chunks[i].0 < key {
                    i += 1;
                }
                if i == chunks.len() {
                    break;
                }
                if chunks[i].0 == key {
                    chunks[i].1 = ChunkLoc::decode(v.value());
                    i += 1;
                }
            }
        } else {
            for c in chunks.iter_mut() {
                if let Some(loc) = self.locate(&c.0)? {
                    c.1 = loc;
                }
            }
        }
        let missing = chunks
            .iter()
            .filter(|(_, l)| *l == ChunkLoc::UNSET)
            .map(|(id, _)| *id)
            .collect();
        chunks.retain(|(_, l)| *l != ChunkLoc::UNSET);
        Ok(missing)
    }

    /// The data chunks of a content tree, in order, with their locations (tree nodes are read).
    pub(crate) fn resolve(
        &mut self,
        content: &crate::tree::ContentRef,
    ) -> Result<Vec<(ChunkId, ChunkLoc)>, StoreError> {
        let mut ids = Vec::new();
        crate::tree::walk(self, content, false, &mut |id, is_data, res| {
            res?;
            if is_data {
                ids.push(*id);
            }
            Ok(())
        })?;
        ids.into_iter()
            .map(|id| {
                let loc = self
                    .locate(&id)?
                    .ok_or_else(|| StoreError::MissingChunk { id: id.hex() })?;
                Ok((id, loc))
            })
            .collect()
    }
}
