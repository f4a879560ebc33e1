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
use super::pack::{ChunkLoc, DecodeError, FLAGS_ENCODED, PackId, decode_into};
use crate::error::StoreError;
use crate::storage::{DIRECT_ALIGN, Fs, OpenMode, StorageFile, aligned_start};

/// Upper bound on a chunk's raw size: checked before allocating, since a damaged index entry
/// could otherwise ask for gigabytes.
pub(crate) const MAX_CHUNK: u32 = 16 * 1024 * 1024;

const MAX_OPEN_PACKS: usize = 128;

/// The most stored bytes [`PackFiles::read_into`] reads with one call, and the most bytes
/// between two chunks it reads over (a content's tree nodes lie between its data chunks).
const RUN_BYTES: u64 = 1 << 20;
const RUN_GAP: u64 = 8 << 10;

/// An open pack file, with whether its reads bypass the page cache.
type OpenPack = (Arc<dyn StorageFile>, bool);

/// Open pack files, shared by reader threads.
pub(crate) struct PackFiles {
    fs: Fs,
    dir: PathBuf,
    files: Mutex<HashMap<PackId, OpenPack>>,
    /// Runs are read past the page cache where the storage allows ([`Self::with_direct_reads`]).
    direct: bool,
}

impl PackFiles {
    pub(crate) fn new(fs: &Fs, dir: PathBuf) -> Self {
        Self {
            fs: fs.clone(),
            dir,
            files: Mutex::new(HashMap::new()),
            direct: false,
        }
    }

    /// Reads runs past the page cache (`O_DIRECT`) where the storage allows, in whole aligned
    /// blocks: for reading much of a store once (a restore of large files). On the bench VM,
    /// reads through the cache while the restored file was written directly got a third of
    /// the disk's bandwidth (0.5-0.6 GB/s against 1.6 GB/s direct), and copying out of the
    /// cache was a quarter of a 4 GiB restore's CPU.
    pub(crate) fn with_direct_reads(mut self) -> Self {
        self.direct = true;
        self
    }

    pub(crate) fn reads_direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn path(&self, pack: &PackId) -> PathBuf {
        pack.path(&self.dir)
    }

    fn file(&self, pack: &PackId) -> Result<OpenPack, StoreError> {
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
        // Refused (tmpfs): read through the cache, in the same aligned blocks.
        let direct = self.direct && f.read_direct();
        // Bounded, far below the usual 1024 descriptors: a store has thousands of packs. Readers
        // holding an Arc keep their file open until they are done with it.
        if files.len() >= MAX_OPEN_PACKS {
            files.clear();
        }
        files.insert(*pack, (f.clone(), direct));
        Ok((f, direct))
    }

    /// The pack file holding a chunk; a pack that is gone is reported as such.
    fn chunk_file(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<OpenPack, StoreError> {
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

    /// A chunk's bytes as stored (encoded as `loc.flags` say), not yet
    /// decompressed nor checked against `id` (see [`PackFiles::decode`]).
    pub(crate) fn read_stored(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        let path = || self.path(&loc.pack);
        check_sizes(id, loc, &path)?;
        let (file, _) = self.chunk_file(id, loc)?;
        let mut stored = vec![0u8; loc.stored_len as usize];
        read_at(
            file.as_ref(),
            &mut stored,
            &[(*id, *loc)],
            loc.offset,
            &path,
        )?;
        Ok(stored)
    }

    /// Asks for the stored bytes of `chunks` to be read in the background: a span per pack run
    /// (as [`PackFiles::read_into`] forms them, without the size limit). A pack that cannot be
    /// opened is an error here: a later open that succeeds must not hide it (the crash walk
    /// caught that).
    pub(crate) fn will_need(&self, chunks: &[(ChunkId, ChunkLoc)]) -> Result<(), StoreError> {
        let mut i = 0;
        while let Some((first, loc)) = chunks.get(i) {
            let (j, end) = run_from(chunks, i, u64::MAX);
            // A file read past the cache would not find what the hint brings in.
            if let (file, false) = self.chunk_file(first, loc)? {
                file.will_need(loc.offset, end - loc.offset);
            }
            i = j;
        }
        Ok(())
    }

    /// Refuses an index entry claiming a size no chunk has or an offset no file has, before a
    /// caller sizes a buffer by it.
    pub(crate) fn check_sizes(&self, chunks: &[(ChunkId, ChunkLoc)]) -> Result<(), StoreError> {
        for (id, l) in chunks {
            check_sizes(id, l, &|| self.path(&l.pack))?;
        }
        Ok(())
    }

    /// Reads, decompresses and (with `verify`) checks `chunks` into `out`, their raw bytes back
    /// to back. Chunks that lie back to back in one pack (a content written in one go) are read
    /// with one call: a restore read every 4 KiB page with a `pread` of its own (327k calls for
    /// a 1 GiB agent). No allocation for raw chunks; one reused buffer per thread otherwise.
    pub(crate) fn read_into(
        &self,
        chunks: &[(ChunkId, ChunkLoc)],
        out: &mut [u8],
        verify: bool,
    ) -> Result<(), StoreError> {
        let total: u64 = chunks.iter().map(|(_, l)| u64::from(l.raw_len)).sum();
        if total != out.len() as u64 {
            let (id, loc) = chunks
                .first()
                .copied()
                .unwrap_or((ChunkId([0; 32]), ChunkLoc::UNSET));
            return Err(damaged(
                &id,
                &self.path(&loc.pack),
                "buffer of the wrong size".into(),
            ));
        }
        let mut rest = out;
        let mut i = 0;
        while let Some((_, loc)) = chunks.get(i) {
            let (j, end) = run_from(chunks, i, RUN_BYTES);
            let run = &chunks[i..j];
            self.check_sizes(run)?;
            let raw: usize = run.iter().map(|(_, l)| l.raw_len as usize).sum();
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(raw);
            rest = tail;
            self.read_run(run, (loc.offset, end), dst)?;
            if verify {
                let mut at = 0;
                for (id, loc) in run {
                    let slot = &dst[at..at + loc.raw_len as usize];
                    at += slot.len();
                    self.check(id, loc, slot, true)?;
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Reads the chunks of `run`, stored in this order in one pack within `span`, into `out`,
    /// their raw bytes back to back: straight into `out` when all are raw and nothing lies
    /// between them, else through a buffer.
    fn read_run(
        &self,
        run: &[(ChunkId, ChunkLoc)],
        span: (u64, u64),
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let Some((first, loc)) = run.first() else {
            return Ok(());
        };
        // Named only on an error: formatting it per chunk was ~1.5% of a restore.
        let path = || self.path(&loc.pack);
        let (file, direct) = self.chunk_file(first, loc)?;
        check_raw_lengths(run, &path)?;
        let raw = |l: &ChunkLoc| l.flags & FLAGS_ENCODED == 0;
        let packed = run
            .iter()
            .map(|(_, l)| u64::from(l.stored_len))
            .sum::<u64>()
            == span.1 - span.0;
        if !direct && packed && run.iter().all(|(_, l)| raw(l)) {
            return read_at(file.as_ref(), out, run, span.0, &path);
        }
        self.with_span(run, span, |from, stored| {
            let mut rest = out;
            let slots = run.iter().map(|(_, l)| {
                let (slot, tail) = std::mem::take(&mut rest).split_at_mut(l.raw_len as usize);
                rest = tail;
                slot
            });
            self.decode_slots(run.iter().zip(slots), from, stored, false)
        })
    }

    /// Reads one span of [`plan_spans`] and decodes its chunks into their places (with `verify`,
    /// checking each against its id).
    pub(crate) fn read_span(&self, read: SpanRead<'_>, verify: bool) -> Result<(), StoreError> {
        let SpanRead {
            chunks,
            slots,
            span,
        } = read;
        // A raw chunk whose entry gives it two lengths is refused as it is decoded.
        self.with_span(&chunks, span, |from, stored| {
            self.decode_slots(chunks.iter().zip(slots), from, stored, verify)
        })
    }

    /// The stored bytes of `chunks` (encoded as their flags say), not decoded nor checked: a
    /// call per pack run, as [`PackFiles::read_into`] reads them. For export, which copies
    /// chunks as stored (and checks them itself, or after a first pass did).
    pub(crate) fn read_stored_runs(
        &self,
        chunks: &[(ChunkId, ChunkLoc)],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::with_capacity(chunks.len());
        let mut i = 0;
        while let Some((_, loc)) = chunks.get(i) {
            let (j, end) = run_from(chunks, i, RUN_BYTES);
            let run = &chunks[i..j];
            self.check_sizes(run)?;
            self.with_span(run, (loc.offset, end), |from, stored| {
                for (_, l) in run {
                    let at = (l.offset - from) as usize;
                    out.push(stored[at..at + l.stored_len as usize].to_vec());
                }
                Ok(())
            })?;
            i = j;
        }
        Ok(out)
    }

    /// Reads `span` of the pack holding `run` (chunks in pack order within it) into a buffer of
    /// this thread and hands it to `f` with the pack offset its first byte has: whole aligned
    /// blocks around the span when the pack is read past the cache, the last of which may end
    /// short, with the pack. `f` must not read packs: the buffer is borrowed while it runs.
    fn with_span<R>(
        &self,
        run: &[(ChunkId, ChunkLoc)],
        span: (u64, u64),
        f: impl FnOnce(u64, &[u8]) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let Some((first, loc)) = run.first() else {
            return f(span.0, &[]);
        };
        let path = || self.path(&loc.pack);
        let (file, direct) = self.chunk_file(first, loc)?;
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            match direct {
                true => {
                    let a = DIRECT_ALIGN as u64;
                    let from = span.0 / a * a;
                    let len = (span.1.div_ceil(a) * a - from) as usize;
                    let at = aligned_start(&mut scratch, len);
                    let blocks = &mut scratch[at..at + len];
                    let n = file
                        .read_at(blocks, from)
                        .map_err(|e| StoreError::io(path(), e))?;
                    if n < (span.1 - from) as usize {
                        let eof = std::io::ErrorKind::UnexpectedEof.into();
                        return Err(truncated(file.as_ref(), run, &path, eof));
                    }
                    f(from, blocks)
                }
                false => {
                    let len = (span.1 - span.0) as usize;
                    scratch.resize(len, 0);
                    read_at(file.as_ref(), &mut scratch[..len], run, span.0, &path)?;
                    f(span.0, &scratch[..len])
                }
            }
        })
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

    /// A chunk's content from its stored bytes: decoded when stored so, its length and
    /// (with `verify`) its BLAKE3 checked against the index entry and `id`.
    pub(crate) fn decode(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        stored: Vec<u8>,
        verify: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let raw = match loc.flags & FLAGS_ENCODED {
            0 => stored,
            _ => self.decoded(id, loc, &stored)?,
        };
        self.check(id, loc, &raw, verify)?;
        Ok(raw)
    }

    /// An encoded chunk's content from its stored bytes, not yet checked ([`PackFiles::check`]).
    pub(crate) fn decoded(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        stored: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let path = || self.path(&loc.pack);
        check_sizes(id, loc, &path)?;
        let mut raw = vec![0u8; loc.raw_len as usize];
        let n = decode_into(loc.flags, stored, &mut raw).map_err(|e| undecoded(id, &path(), e))?;
        raw.truncate(n);
        Ok(raw)
    }

    /// Decodes each chunk of a span read from pack offset `from` (`stored`) into its slot, and
    /// checks it ([`PackFiles::check`]).
    fn decode_slots<'s>(
        &self,
        chunks: impl Iterator<Item = (&'s (ChunkId, ChunkLoc), &'s mut [u8])>,
        from: u64,
        stored: &[u8],
        verify: bool,
    ) -> Result<(), StoreError> {
        for ((id, l), slot) in chunks {
            let at = (l.offset - from) as usize;
            let bytes = &stored[at..at + l.stored_len as usize];
            let n = decode_into(l.flags, bytes, slot)
                .map_err(|e| undecoded(id, &self.path(&l.pack), e))?;
            self.check(id, l, &slot[..n], verify)?;
        }
        Ok(())
    }

    /// Refuses a chunk's content whose length is not its index entry's or (with `verify`) whose
    /// BLAKE3 is not `id`.
    pub(crate) fn check(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        raw: &[u8],
        verify: bool,
    ) -> Result<(), StoreError> {
        if raw.len() != loc.raw_len as usize {
            return Err(damaged(
                id,
                &self.path(&loc.pack),
                format!("{} bytes, the index says {}", raw.len(), loc.raw_len),
            ));
        }
        if verify && ChunkId::of(raw) != *id {
            return Err(damaged(
                id,
                &self.path(&loc.pack),
                "content does not match its hash".into(),
            ));
        }
        Ok(())
    }
}

/// Refuses a raw chunk whose entry gives it a stored length other than its length: a raw
/// chunk's stored bytes are its bytes.
fn check_raw_lengths(
    run: &[(ChunkId, ChunkLoc)],
    path: &dyn Fn() -> PathBuf,
) -> Result<(), StoreError> {
    match run
        .iter()
        .find(|(_, l)| l.flags & FLAGS_ENCODED == 0 && l.stored_len != l.raw_len)
    {
        Some((id, l)) => Err(damaged(
            id,
            &path(),
            format!("{} bytes, the index says {}", l.stored_len, l.raw_len),
        )),
        None => Ok(()),
    }
}

/// Chunks read with one call ([`PackFiles::read_span`]): a span of one pack, and the places
/// their raw bytes go.
pub(crate) struct SpanRead<'a> {
    chunks: Vec<(ChunkId, ChunkLoc)>,
    slots: Vec<&'a mut [u8]>,
    span: (u64, u64),
}

/// Splits `out` into the places of `chunks` (their raw bytes back to back, in this order) and
/// groups the chunks in pack order into spans as [`run_from`] forms runs: of one pack, each
/// chunk within [`RUN_GAP`] of the span so far, under [`RUN_BYTES`]. In file order, a database
/// that later snapshots changed here and there is read as many short runs: a page stored by a
/// later day splits the first day's run around it, and is a read of its own (a 1 GiB agent's
/// vector database after the bench's days: ~4,800 reads, where its first snapshot takes
/// ~1,100). In pack order each pack's stretch is one read. The caller sizes `out` by `chunks`.
pub(crate) fn plan_spans<'a>(
    chunks: &[(ChunkId, ChunkLoc)],
    out: &'a mut [u8],
) -> Result<Vec<SpanRead<'a>>, StoreError> {
    let total: u64 = chunks.iter().map(|(_, l)| u64::from(l.raw_len)).sum();
    if total != out.len() as u64 {
        return Err(StoreError::CorruptRecord {
            what: "a batch of chunks".into(),
            message: format!("{total} bytes, read into {}", out.len()),
        });
    }
    let mut rest = out;
    let mut slots: Vec<Option<&mut [u8]>> = chunks
        .iter()
        .map(|(_, l)| {
            let (slot, tail) = std::mem::take(&mut rest).split_at_mut(l.raw_len as usize);
            rest = tail;
            Some(slot)
        })
        .collect();
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_unstable_by_key(|&i| (chunks[i].1.pack, chunks[i].1.offset));
    let mut spans: Vec<SpanRead<'a>> = Vec::new();
    for i in order {
        let (id, loc) = chunks[i];
        let Some(slot) = slots[i].take() else {
            continue;
        };
        let end = loc.offset.saturating_add(u64::from(loc.stored_len));
        match spans.last_mut() {
            Some(s)
                if s.chunks[0].1.pack == loc.pack
                    && loc.offset <= s.span.1.saturating_add(RUN_GAP)
                    && s.span.1 - s.span.0 < RUN_BYTES =>
            {
                s.span.1 = s.span.1.max(end);
                s.chunks.push((id, loc));
                s.slots.push(slot);
            }
            _ => spans.push(SpanRead {
                chunks: vec![(id, loc)],
                slots: vec![slot],
                span: (loc.offset, end),
            }),
        }
    }
    Ok(spans)
}

/// The run of `chunks` from `i`: those that lie in this order in one pack, each within
/// [`RUN_GAP`] of the one before, added while the run spans under `max` bytes. Returns the index
/// after it and the end of its last chunk.
fn run_from(chunks: &[(ChunkId, ChunkLoc)], i: usize, max: u64) -> (usize, u64) {
    let Some((_, loc)) = chunks.get(i) else {
        return (i, 0);
    };
    let end_of = |l: &ChunkLoc| l.offset.saturating_add(u64::from(l.stored_len));
    let mut end = end_of(loc);
    let mut j = i + 1;
    while let Some((_, next)) = chunks.get(j)
        && next.pack == loc.pack
        && (end..=end.saturating_add(RUN_GAP)).contains(&next.offset)
        && end - loc.offset < max
    {
        end = end_of(next);
        j += 1;
    }
    (j, end)
}

/// Reads the stored bytes of `chunks` (in pack order) from `offset` on; a pack that ends
/// early is blamed on the first of them that reaches past its end.
fn read_at(
    file: &dyn StorageFile,
    buf: &mut [u8],
    chunks: &[(ChunkId, ChunkLoc)],
    offset: u64,
    path: &dyn Fn() -> PathBuf,
) -> Result<(), StoreError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() != std::io::ErrorKind::UnexpectedEof {
            return StoreError::io(path(), e);
        }
        truncated(file, chunks, path, e)
    })
}

/// The error for a pack that ended before `chunks` did: the first chunk that reaches past its
/// end is named.
fn truncated(
    file: &dyn StorageFile,
    chunks: &[(ChunkId, ChunkLoc)],
    path: &dyn Fn() -> PathBuf,
    e: std::io::Error,
) -> StoreError {
    let len = match file.len() {
        Ok(len) => len,
        Err(e) => return StoreError::io(path(), e),
    };
    let short = chunks
        .iter()
        .find(|(_, l)| l.offset + u64::from(l.stored_len) > len)
        .or(chunks.first());
    match short {
        Some((id, _)) => damaged(
            id,
            &path(),
            "the pack is shorter than the index says (truncated)".into(),
        ),
        None => StoreError::io(path(), e),
    }
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
    // No file reaches past i64::MAX: such an offset is damage, not a read to try (the
    // aligned blocks around it would wrap around u64).
    if loc.offset > i64::MAX as u64 - u64::from(loc.stored_len) {
        let message = format!("index entry claims offset {}, past any pack", loc.offset);
        return Err(damaged(id, &path(), message));
    }
    Ok(())
}

/// A chunk that did not decode: damage, unless no decoder could be made.
fn undecoded(id: &ChunkId, pack: &std::path::Path, e: DecodeError) -> StoreError {
    match e {
        DecodeError::Damaged(message) => damaged(id, pack, message),
        DecodeError::NoDecoder(e) => StoreError::io(pack, e),
    }
}

/// Damage to chunk `id` in `pack`, as `message` says.
pub(crate) fn damaged(id: &ChunkId, pack: &std::path::Path, message: String) -> StoreError {
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
    chunks: super::index::ChunkTable,
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
        use redb::ReadableTableMetadata;
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
            for item in self.index.walk_chunks(&self.chunks)? {
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
            self.index.read_ahead(distinct as u64);
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
            // A 4 KiB leaf holds at least 32 entries.
            self.index.read_ahead(between / 32);
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
            self.index.read_ahead(chunks.len() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pack::FLAG_ZSTD;

    /// 4 KiB pages, mostly zeros (stored as zstd frames), one float32 vector and free space
    /// (plane-coded) or random (stored raw), in turn, written as one
    /// content: its tree nodes lie in the pack between the data chunks. Returns the pages and
    /// their chunks in content order; the store keeps the packs (the writer's `Pending` is
    /// kept from deleting them).
    fn content(
        store: &crate::store::Store,
    ) -> (
        Vec<Vec<u8>>,
        Vec<(ChunkId, ChunkLoc)>,
        super::super::writer::Pending,
    ) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pages: Vec<Vec<u8>> = (0..600u32)
            .map(|i| match i % 3 {
                0 => {
                    let mut p = vec![0u8; 4096];
                    p[..4].copy_from_slice(&i.to_le_bytes());
                    p
                }
                1 => crate::store::planes::tests::vector_page(u64::from(i), i as usize % 4),
                _ => (0..512).flat_map(|_| random().to_le_bytes()).collect(),
            })
            .collect();
        let (_, chunks, pending) = crate::tree::store_pages_kept(store, &pages);
        (pages, chunks, pending)
    }

    #[test]
    fn chunks_read_in_runs_are_the_pages_whatever_lies_between_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let (pages, chunks, _pending) = content(&store);
        let flags: std::collections::HashSet<u8> = chunks.iter().map(|(_, l)| l.flags).collect();
        let expected = [0, FLAG_ZSTD, crate::store::pack::FLAG_PLANES]
            .into_iter()
            .collect();
        assert_eq!(flags, expected, "raw, zstd and plane-coded chunks");
        let gaps = chunks
            .windows(2)
            .filter(|w| w[1].1.offset != w[0].1.offset + u64::from(w[0].1.stored_len))
            .count();
        assert!(gaps > 20, "tree nodes between data chunks: {gaps}");
        let expected = pages.concat();
        for packs in both_ways(&store) {
            let direct = packs.reads_direct();
            for verify in [true, false] {
                let mut out = vec![0u8; expected.len()];
                packs.read_into(&chunks, &mut out, verify).expect("read");
                assert!(out == expected, "verify {verify}, direct {direct}");
            }
            // One read for a run with gaps and both kinds of chunks: the whole of it.
            let run = &chunks[..40];
            let span = (
                run[0].1.offset,
                run[39].1.offset + u64::from(run[39].1.stored_len),
            );
            let mut out = vec![0u8; 40 * 4096];
            packs.read_run(run, span, &mut out).expect("one read");
            assert!(out == pages[..40].concat(), "direct {direct}");
            let mut short = vec![0u8; 4095];
            assert!(packs.read_into(&chunks[..1], &mut short, true).is_err());
            // Stored bytes read by runs are each chunk's stored bytes, read one by one.
            let stored = packs.read_stored_runs(&chunks).expect("stored");
            assert_eq!(stored.len(), chunks.len());
            for ((id, loc), bytes) in chunks.iter().zip(&stored) {
                let one = packs.read_stored(id, loc).expect("one");
                assert!(*bytes == one, "direct {direct}: {}", id.hex());
            }
        }
    }

    /// A batch whose chunks lie here and there (a later day's pages, stored back to back in
    /// their own stretch, in place of every tenth page; a page twice) is read as few spans in
    /// pack order, where file order makes a run of every stretch between them, and each
    /// chunk lands in its place, both ways, checked or not.
    #[test]
    fn spans_read_a_scattered_batch_in_pack_order_into_its_places() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let (pages, chunks, _pending) = content(&store);
        let mut batch: Vec<usize> = (0..200).collect();
        for (k, i) in (0..200).step_by(10).enumerate() {
            batch[i] = 400 + k;
        }
        batch.push(3);
        let listed: Vec<(ChunkId, ChunkLoc)> = batch.iter().map(|&i| chunks[i]).collect();
        let expected: Vec<u8> = batch.iter().flat_map(|&i| pages[i].clone()).collect();
        let mut runs = 0;
        let mut i = 0;
        while i < listed.len() {
            i = run_from(&listed, i, RUN_BYTES).0;
            runs += 1;
        }
        for packs in both_ways(&store) {
            let direct = packs.reads_direct();
            for verify in [true, false] {
                let mut out = vec![0u8; expected.len()];
                let spans = plan_spans(&listed, &mut out).expect("plan");
                assert!(
                    spans.len() * 8 < runs,
                    "{} spans, {runs} runs in file order",
                    spans.len()
                );
                for span in spans {
                    packs.read_span(span, verify).expect("read");
                }
                assert!(out == expected, "verify {verify}, direct {direct}");
            }
            // A chunk whose bytes are not its id's is named when checked.
            let mut wrong = listed.clone();
            wrong[7].0 = ChunkId::of(b"another page");
            let mut out = vec![0u8; expected.len()];
            let failed = plan_spans(&wrong, &mut out)
                .expect("plan")
                .into_iter()
                .map(|span| packs.read_span(span, true))
                .find_map(Result::err);
            match failed {
                Some(StoreError::CorruptChunk { id, .. }) => assert_eq!(id, wrong[7].0.hex()),
                other => panic!("direct {direct}: {other:?}"),
            }
            // An entry that gives a raw chunk two lengths, or a compressed one more bytes than
            // it decodes to, is refused naming the chunk, by spans and by runs.
            let at = |flags| listed.iter().position(|(_, l)| l.flags == flags);
            let (raw, zstd) = (at(0).expect("a raw chunk"), at(FLAG_ZSTD).expect("zstd"));
            let short_stored = ChunkLoc {
                stored_len: listed[raw].1.stored_len - 1,
                ..listed[raw].1
            };
            let long_raw = ChunkLoc {
                raw_len: listed[zstd].1.raw_len + 1,
                ..listed[zstd].1
            };
            for (i, bad) in [(raw, short_stored), (zstd, long_raw)] {
                let mut wrong = listed.clone();
                wrong[i].1 = bad;
                let total = wrong.iter().map(|(_, l)| l.raw_len as usize).sum();
                let mut out = vec![0u8; total];
                let by_spans = plan_spans(&wrong, &mut out)
                    .expect("plan")
                    .into_iter()
                    .map(|span| packs.read_span(span, false))
                    .find_map(Result::err);
                let by_runs = packs.read_into(&wrong, &mut vec![0u8; total], false).err();
                for failed in [by_spans, by_runs] {
                    match failed {
                        Some(StoreError::CorruptChunk { id, message, .. }) => {
                            assert_eq!(id, wrong[i].0.hex(), "{message}");
                            assert!(message.contains("the index says"), "{message}");
                        }
                        other => panic!("direct {direct}, chunk {i}: {other:?}"),
                    }
                }
            }
        }
        let mut short = vec![0u8; expected.len() - 1];
        assert!(plan_spans(&listed, &mut short).is_err());
    }

    /// Pack files read through the page cache, and past it (aligned blocks around each run).
    fn both_ways(store: &crate::store::Store) -> [PackFiles; 2] {
        [
            PackFiles::new(&store.fs, store.packs_dir()),
            PackFiles::new(&store.fs, store.packs_dir()).with_direct_reads(),
        ]
    }

    /// Runs stop at another pack, at a gap over [`RUN_GAP`], and once they span `max` bytes;
    /// offsets near the end of `u64` (a damaged index) do not overflow.
    #[test]
    fn runs_stop_at_a_pack_a_gap_or_their_size() {
        let (a, b) = (PackId([1; 16]), PackId([2; 16]));
        let at = |pack, offset| {
            let loc = ChunkLoc {
                pack,
                offset,
                stored_len: 4096,
                raw_len: 4096,
                flags: 0,
            };
            (ChunkId([0; 32]), loc)
        };
        let gap = 4096 + RUN_GAP;
        let chunks = [
            at(a, 0),
            at(a, 4096),
            at(a, 8192 + RUN_GAP),
            at(b, 0),
            at(b, 4096 + gap),
            at(b, u64::MAX - 1),
        ];
        assert_eq!(run_from(&chunks, 0, u64::MAX), (3, 3 * 4096 + RUN_GAP));
        assert_eq!(run_from(&chunks, 0, 4096), (1, 4096));
        assert_eq!(run_from(&chunks, 3, u64::MAX), (4, 4096));
        assert_eq!(run_from(&chunks, 5, u64::MAX), (6, u64::MAX));
        assert_eq!(run_from(&chunks, 6, u64::MAX), (6, 0));
    }

    /// A damaged index entry, an offset at the end of `u64` or a size no chunk has, is refused
    /// as damage naming the chunk, both ways, before anything is sized by it.
    #[test]
    fn an_entry_past_any_pack_or_of_no_chunks_size_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let (_pages, chunks, _pending) = content(&store);
        let (id, loc) = chunks[1];
        let far = ChunkLoc {
            offset: u64::MAX - 100,
            ..loc
        };
        let huge = ChunkLoc {
            raw_len: MAX_CHUNK + 1,
            ..loc
        };
        for packs in both_ways(&store) {
            let direct = packs.reads_direct();
            let mut out = vec![0u8; loc.raw_len as usize];
            match packs.read_into(&[(id, far)], &mut out, false) {
                Err(StoreError::CorruptChunk { id: named, .. }) => assert_eq!(named, id.hex()),
                other => panic!("direct {direct}: {other:?}"),
            }
            assert!(
                packs.read_stored_runs(&[(id, far)]).is_err(),
                "direct {direct}"
            );
            match packs.check_sizes(&[chunks[0], (id, huge)]) {
                Err(StoreError::CorruptChunk { id: named, .. }) => assert_eq!(named, id.hex()),
                other => panic!("direct {direct}: {other:?}"),
            }
        }
    }

    /// A pack cut short inside a run: the error names the first chunk that reaches past its
    /// end, not the run's first.
    #[test]
    fn a_pack_cut_inside_a_run_names_the_chunk_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let (pages, chunks, _pending) = content(&store);
        let (id, loc) = chunks[25];
        assert_eq!(chunks[0].1.pack, loc.pack, "one pack");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(loc.pack.path(&store.packs_dir()))
            .expect("pack");
        file.set_len(loc.offset + 10).expect("cut");
        for packs in both_ways(&store) {
            let mut out = vec![0u8; pages.len() * 4096];
            match packs.read_into(&chunks, &mut out, false) {
                Err(StoreError::CorruptChunk {
                    id: named, message, ..
                }) => {
                    assert_eq!(named, id.hex());
                    assert!(message.contains("truncated"), "{message}");
                }
                other => panic!("direct {}: {other:?}", packs.reads_direct()),
            }
        }
    }

    /// A byte changed in a chunk inside a run: with `verify`, the error names that chunk and its
    /// pack; without, the bytes come back changed (restore then checks the content's hash).
    #[test]
    fn damage_inside_a_run_is_named_by_its_chunk() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let (pages, chunks, _pending) = content(&store);
        for (packs, victim) in both_ways(&store).into_iter().flat_map(|p| {
            let p = std::sync::Arc::new(p);
            [(p.clone(), 30), (p.clone(), 31), (p, 32)]
        }) {
            let (id, loc) = chunks[victim];
            let path = packs.path(&loc.pack);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("pack");
            let at = loc.offset + u64::from(loc.stored_len) - 2;
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, at).expect("read");
            file.write_all_at(&[byte[0] ^ 0x5a], at).expect("flip");
            let mut out = vec![0u8; pages.len() * 4096];
            match packs.read_into(&chunks, &mut out, true) {
                Err(StoreError::CorruptChunk {
                    id: named, pack, ..
                }) => {
                    assert_eq!(named, id.hex(), "chunk {victim} flags {}", loc.flags);
                    assert_eq!(pack, path);
                }
                other => panic!("chunk {victim}: {other:?}"),
            }
            if loc.flags & FLAG_ZSTD == 0 {
                packs
                    .read_into(&chunks, &mut out, false)
                    .expect("unchecked");
                assert!(out[victim * 4096..(victim + 1) * 4096] != pages[victim][..]);
            }
            file.write_all_at(&byte, at).expect("restore the byte");
        }
    }
}
