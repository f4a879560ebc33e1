//! Pack files: chunks appended one after another, closed by a footer that lists them, so that
//! the index can be rebuilt from the packs alone. Layout: store-format.md, "Pack files".
//! A pack is written once, front to back, and never modified after its footer is durable; a pack
//! without a valid footer is an interrupted write that no index entry references.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::chunk_id::ChunkId;
use crate::error::StoreError;
use crate::storage::{DirectFile, Fs, OpenMode, StorageFile};

pub(crate) const HEADER_MAGIC: &[u8; 8] = b"MEMSNAPP";
pub(crate) const TRAILER_MAGIC: &[u8; 8] = b"MEMSNAPF";
pub(crate) const PACK_VERSION: u32 = 1;
pub(crate) const HEADER_LEN: u64 = 16;
pub(crate) const ENTRY_LEN: usize = 49;
pub(crate) const TRAILER_LEN: u64 = 56;

/// Chunk bytes of a pack of `size` bytes holding `count` chunks that no snapshot uses, given the
/// bytes of its live chunks. Counted from the file, not from index entries: a prune that keeps a
/// pack drops its unused entries, and the bytes must still count against the pack.
pub(crate) fn unused_bytes(size: u64, count: u32, live: u64) -> u64 {
    let overhead = HEADER_LEN + u64::from(count) * ENTRY_LEN as u64 + TRAILER_LEN;
    size.saturating_sub(overhead + live)
}

/// Chunk flag: stored bytes are one zstd frame.
pub(crate) const FLAG_ZSTD: u8 = 1;
/// Chunk flag: the chunk is a tree node (store-format.md, "Tree nodes").
pub(crate) const FLAG_TREE: u8 = 2;
/// Chunk flag: stored bytes are plane-coded (store-format.md, "Plane-coded chunks"; format 4).
pub(crate) const FLAG_PLANES: u8 = 4;
/// The flags that say how a chunk's bytes are stored; neither set: as they are.
pub(crate) const FLAGS_ENCODED: u8 = FLAG_ZSTD | FLAG_PLANES;

/// Why a stored chunk did not decode.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// What is wrong with the stored bytes: damage to the chunk.
    Damaged(String),
    /// No decompressor could be made (memory): the chunk may well be intact.
    NoDecoder(std::io::Error),
}

/// Decodes a chunk stored as `flags` say into `out`, sized to its raw length; returns how many
/// bytes it wrote.
pub(crate) fn decode_into(flags: u8, stored: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    thread_local! {
        // A context per thread: creating one per chunk costs more than decoding a page.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let damaged = DecodeError::Damaged;
    match flags & FLAGS_ENCODED {
        0 if stored.len() == out.len() => {
            out.copy_from_slice(stored);
            Ok(out.len())
        }
        0 => Err(damaged(format!(
            "{} bytes stored raw, the index says {}",
            stored.len(),
            out.len()
        ))),
        FLAG_ZSTD => DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            let d = match &mut *slot {
                Some(d) => d,
                None => {
                    slot.insert(zstd::bulk::Decompressor::new().map_err(DecodeError::NoDecoder)?)
                }
            };
            d.decompress_to_buffer(stored, out)
                .map_err(|e| damaged(format!("cannot decompress: {e}")))
        }),
        FLAG_PLANES => super::planes::decode_into(stored, out)
            .map(|()| out.len())
            .map_err(|e| damaged(e.to_string())),
        _ => Err(damaged("flags say both zstd and plane-coded".into())),
    }
}

/// A pack also closes at this many chunks, whatever their size. A snapshot keeps an entry per
/// chunk of its open and syncing packs until they are durable (and a pack writer one per chunk
/// for its footer): by bytes alone, 32 MiB of pages that compress to 200 bytes would be 160k
/// entries per pack. Text pages (~1.5 KiB stored) reach the cap; float pages (~3 KiB) do not.
pub(crate) const MAX_PACK_CHUNKS: usize = 16_384;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) struct PackId(pub [u8; 16]);

impl PackId {
    pub(crate) fn random() -> Self {
        Self(rand::random())
    }

    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `packs/<first two hex chars>/<32 hex chars>.pack`
    pub(crate) fn path(&self, packs_dir: &Path) -> PathBuf {
        let h = self.hex();
        packs_dir.join(&h[..2]).join(format!("{h}.pack"))
    }
}

/// Where a chunk lives; the value of the index's `chunks` table (33 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct ChunkLoc {
    pub pack: PackId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl ChunkLoc {
    /// Not a location any chunk has (a stored length above any chunk's): "not located yet".
    pub(crate) const UNSET: ChunkLoc = ChunkLoc {
        pack: PackId([0; 16]),
        offset: 0,
        stored_len: u32::MAX,
        raw_len: 0,
        flags: 0,
    };

    /// The length of [`ChunkLoc::encode`]'s output.
    pub(crate) const ENCODED: usize = 33;

    pub(crate) fn encode(&self) -> [u8; Self::ENCODED] {
        let mut b = [0u8; Self::ENCODED];
        b[..16].copy_from_slice(&self.pack.0);
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.stored_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.raw_len.to_le_bytes());
        b[32] = self.flags;
        b
    }

    pub(crate) fn decode(b: &[u8; Self::ENCODED]) -> Self {
        let mut pack = [0u8; 16];
        pack.copy_from_slice(&b[..16]);
        Self {
            pack: PackId(pack),
            offset: u64::from_le_bytes(le8(&b[16..24])),
            stored_len: u32::from_le_bytes(le4(&b[24..28])),
            raw_len: u32::from_le_bytes(le4(&b[28..32])),
            flags: b[32],
        }
    }
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(s);
    b
}

fn le4(s: &[u8]) -> [u8; 4] {
    let mut b = [0u8; 4];
    b.copy_from_slice(s);
    b
}

/// One footer entry: a chunk of this pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FooterEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl FooterEntry {
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(self.flags);
    }

    fn decode(b: &[u8]) -> Self {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        Self {
            id: ChunkId(id),
            offset: u64::from_le_bytes(le8(&b[32..40])),
            stored_len: u32::from_le_bytes(le4(&b[40..44])),
            raw_len: u32::from_le_bytes(le4(&b[44..48])),
            flags: b[48],
        }
    }
}

/// Appends chunks to a new pack file. Nothing in it is referenced until [`PackWriter::finish`]
/// has made it durable and the index transaction that names it has committed.
pub(crate) struct PackWriter {
    pub id: PackId,
    pub path: PathBuf,
    /// Past the page cache where the storage allows.
    file: DirectFile,
    offset: u64,
    entries: Vec<FooterEntry>,
}

impl PackWriter {
    pub(crate) fn create(fs: &Fs, packs_dir: &Path) -> Result<Self, StoreError> {
        let id = PackId::random();
        let path = id.path(packs_dir);
        let dir = crate::fsutil::parent_of(&path);
        fs.create_dir_all_durable(&dir)
            .map_err(|e| StoreError::io(&dir, e))?;
        let file = fs
            .open(&path, OpenMode::CreateNew { mode: 0o666 })
            .map_err(|e| StoreError::io(&path, e))?;
        let file = DirectFile::new(file);
        let mut w = Self {
            id,
            path,
            file,
            offset: 0,
            entries: Vec::new(),
        };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(HEADER_MAGIC);
        header.extend_from_slice(&PACK_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(bytes)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Whether the pack should be closed: `target` bytes, or [`MAX_PACK_CHUNKS`] chunks.
    pub(crate) fn full(&self, target: u64) -> bool {
        self.offset >= target || self.entries.len() >= MAX_PACK_CHUNKS
    }

    pub(crate) fn append(
        &mut self,
        id: ChunkId,
        raw_len: u32,
        flags: u8,
        stored: &[u8],
    ) -> Result<ChunkLoc, StoreError> {
        let offset = self.offset;
        self.write(stored)?;
        let stored_len = stored.len() as u32;
        self.entries.push(FooterEntry {
            id,
            offset,
            stored_len,
            raw_len,
            flags,
        });
        Ok(ChunkLoc {
            pack: self.id,
            offset,
            stored_len,
            raw_len,
            flags,
        })
    }

    /// Writes the footer and makes the whole pack durable (fsync). The caller fsyncs the
    /// directory before committing an index transaction that references the pack.
    pub(crate) fn finish(self) -> Result<(PackId, PathBuf, u64, u32), StoreError> {
        let sealed = self.seal()?;
        sealed.sync()?;
        Ok((sealed.id, sealed.path, sealed.size, sealed.count))
    }

    /// Writes the footer, leaving the pack to be made durable by [`SealedPack::sync`] (on
    /// another thread, while the next pack is written).
    pub(crate) fn seal(mut self) -> Result<SealedPack, StoreError> {
        let entries_offset = self.offset;
        let mut footer = Vec::with_capacity(self.entries.len() * ENTRY_LEN + TRAILER_LEN as usize);
        for e in &self.entries {
            e.encode_into(&mut footer);
        }
        let hash = blake3::hash(&footer);
        let count = self.entries.len() as u32;
        footer.extend_from_slice(&entries_offset.to_le_bytes());
        footer.extend_from_slice(&count.to_le_bytes());
        footer.extend_from_slice(&0u32.to_le_bytes());
        footer.extend_from_slice(hash.as_bytes());
        footer.extend_from_slice(TRAILER_MAGIC);
        self.write(&footer)?;
        let file = self
            .file
            .finish()
            .map_err(|e| StoreError::io(&self.path, e))?;
        Ok(SealedPack {
            id: self.id,
            path: self.path,
            size: self.offset,
            count,
            file,
        })
    }
}

/// A pack with its footer written but perhaps not yet durable.
pub(crate) struct SealedPack {
    pub id: PackId,
    pub path: PathBuf,
    pub size: u64,
    pub count: u32,
    file: Box<dyn StorageFile>,
}

impl SealedPack {
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file.sync().map_err(|e| StoreError::io(&self.path, e))
    }
}

/// Reads and checks a pack's footer: the list of chunks it holds.
pub(crate) fn read_footer(fs: &Fs, path: &Path) -> Result<Vec<FooterEntry>, StoreError> {
    let corrupt = |message: String| StoreError::CorruptPack {
        pack: path.to_path_buf(),
        message,
    };
    let file = fs
        .open(path, OpenMode::Read)
        .map_err(|e| StoreError::io(path, e))?;
    let file = file.as_ref();
    let len = file.len().map_err(|e| StoreError::io(path, e))?;
    if len < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!("{len} bytes is too short for a pack")));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| StoreError::io(path, e))?;
    if &header[..8] != HEADER_MAGIC {
        return Err(corrupt("bad header magic".into()));
    }
    let version = u32::from_le_bytes(le4(&header[8..12]));
    if version != PACK_VERSION {
        return Err(corrupt(format!("unknown pack version {version}")));
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut trailer, len - TRAILER_LEN)
        .map_err(|e| StoreError::io(path, e))?;
    if &trailer[48..56] != TRAILER_MAGIC {
        return Err(corrupt(
            "no footer (an interrupted write, or the end of the file is damaged)".into(),
        ));
    }
    let entries_offset = u64::from_le_bytes(le8(&trailer[..8]));
    let count = u32::from_le_bytes(le4(&trailer[8..12])) as u64;
    let footer_len = count * ENTRY_LEN as u64;
    if entries_offset < HEADER_LEN
        || entries_offset
            .checked_add(footer_len + TRAILER_LEN)
            .is_none_or(|end| end != len)
    {
        return Err(corrupt(
            "footer offsets do not match the file length".into(),
        ));
    }
    let mut footer = vec![0u8; footer_len as usize];
    file.read_exact_at(&mut footer, entries_offset)
        .map_err(|e| StoreError::io(path, e))?;
    if blake3::hash(&footer).as_bytes() != &trailer[16..48] {
        return Err(corrupt("footer checksum mismatch".into()));
    }
    let entries: Vec<FooterEntry> = footer
        .chunks_exact(ENTRY_LEN)
        .map(FooterEntry::decode)
        .collect();
    for e in &entries {
        if e.offset < HEADER_LEN
            || e.offset
                .checked_add(e.stored_len as u64)
                .is_none_or(|end| end > entries_offset)
        {
            return Err(corrupt(format!(
                "entry {} points outside the data",
                e.id.hex()
            )));
        }
    }
    Ok(entries)
}

/// Every `packs/<xx>/<32 hex>.pack` file below `packs_dir` and its size, sorted by id.
pub(crate) fn list_packs(packs_dir: &Path) -> Vec<(PackId, u64)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(packs_dir) else {
        return out;
    };
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(hex_id) = name.strip_suffix(".pack") else {
                continue;
            };
            let mut id = [0u8; 16];
            if hex::decode_to_slice(hex_id, &mut id).is_err() {
                continue;
            }
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((PackId(id), size));
        }
    }
    out.sort();
    out
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What [`scan`] may use to find chunk boundaries in a pack without a valid footer.
#[derive(Default)]
pub(crate) struct ScanHints {
    /// Where the (old) index placed chunks of this pack.
    pub entries: Vec<FooterEntry>,
    /// Raw sizes of data chunks that tree nodes name, most frequent first, and those ids: a
    /// chunk stored raw is recognised by its length and hash.
    pub sizes: Vec<u32>,
    pub ids: std::collections::HashSet<ChunkId>,
}

/// The record at the start of `bytes` when it says its own length, a zstd frame or a
/// plane-coded chunk: (stored length, decoded bytes, flags).
fn self_delimiting(bytes: &[u8]) -> Option<(usize, Vec<u8>, u8)> {
    if bytes.starts_with(&ZSTD_MAGIC) {
        let n = zstd::zstd_safe::find_frame_compressed_size(bytes).ok()?;
        let raw = zstd::bulk::decompress(bytes.get(..n)?, super::reader::MAX_CHUNK as usize);
        return raw.ok().map(|raw| (n, raw, FLAG_ZSTD));
    }
    let (n, raw) = super::planes::decode_at(bytes).ok()?;
    Some((n, raw, FLAG_PLANES))
}

/// The chunks of a pack whose footer is damaged, found from the start of the chunk data as far
/// as records can be recognised: an index entry placed there whose bytes hash to its id, a zstd
/// frame or a plane-coded chunk (both self-delimiting), a tree node (its length follows from its
/// header), or a raw chunk of a length some tree node names whose hash is that node's child.
/// Then every hinted entry the walk did not reach, checked alone. Every returned entry's bytes
/// hash to its id. Scanned chunks never carry the tree flag: only an entry that vouches for a
/// subtree needs it (I3).
pub(crate) fn scan(path: &Path, hints: &ScanHints) -> Result<Vec<FooterEntry>, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
    // Whether `e` is intact in the file; an error only when no decoder could be made.
    let check = |e: &FooterEntry| -> Result<bool, StoreError> {
        let Some(stored) = usize::try_from(e.offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(e.stored_len as usize)?))
        else {
            return Ok(false);
        };
        if e.raw_len > super::reader::MAX_CHUNK {
            return Ok(false);
        }
        let mut raw = vec![0u8; e.raw_len as usize];
        match decode_into(e.flags, stored, &mut raw) {
            Ok(n) => Ok(n == raw.len() && ChunkId::of(&raw) == e.id),
            Err(DecodeError::Damaged(_)) => Ok(false),
            Err(DecodeError::NoDecoder(err)) => Err(StoreError::io(path, err)),
        }
    };
    let hinted: std::collections::HashMap<u64, &FooterEntry> =
        hints.entries.iter().map(|e| (e.offset, e)).collect();
    let mut found: Vec<FooterEntry> = Vec::new();
    let mut p = HEADER_LEN as usize;
    while p < bytes.len() {
        let rest = &bytes[p..];
        let at = p as u64;
        if let Some(e) = hinted.get(&at)
            && check(e)?
        {
            found.push(**e);
            p += e.stored_len as usize;
            continue;
        }
        if let Some((n, raw, flags)) = self_delimiting(rest) {
            found.push(FooterEntry {
                id: ChunkId::of(&raw),
                offset: at,
                stored_len: n as u32,
                raw_len: raw.len() as u32,
                flags,
            });
            p += n;
            continue;
        }
        if let Some(n) = node_len(rest) {
            found.push(FooterEntry {
                id: ChunkId::of(&rest[..n]),
                offset: at,
                stored_len: n as u32,
                raw_len: n as u32,
                flags: 0,
            });
            p += n;
            continue;
        }
        let known = hints.sizes.iter().find_map(|&n| {
            let data = rest.get(..n as usize)?;
            let id = ChunkId::of(data);
            hints.ids.contains(&id).then_some((id, n))
        });
        let Some((id, n)) = known else {
            break;
        };
        found.push(FooterEntry {
            id,
            offset: at,
            stored_len: n,
            raw_len: n,
            flags: 0,
        });
        p += n as usize;
    }
    let reached: std::collections::HashSet<u64> = found.iter().map(|e| e.offset).collect();
    for e in &hints.entries {
        if !reached.contains(&e.offset) && check(e)? {
            found.push(*e);
        }
    }
    Ok(found)
}

/// The length of the tree node at the start of `b`, if it looks like one (store-format.md,
/// "Tree nodes": version 1, a level, a count, count x 40 bytes), and fits.
fn node_len(b: &[u8]) -> Option<usize> {
    if b.len() < 6 || b[0] != 1 || b[1] == 0 || b[1] > 32 {
        return None;
    }
    let count = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) as usize;
    let n = 6 + count.checked_mul(40)?;
    (count > 0 && n <= b.len()).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_lists_every_chunk_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::create(&Fs::default(), dir.path()).expect("create");
        let mut locs = Vec::new();
        for i in 0..10u8 {
            let data = vec![i; 100 + i as usize];
            locs.push(
                w.append(ChunkId::of(&data), data.len() as u32, 0, &data)
                    .expect("append"),
            );
        }
        let (_, path, size, count) = w.finish().expect("finish");
        assert_eq!(count, 10);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), size);
        let entries = read_footer(&Fs::default(), &path).expect("footer");
        assert_eq!(entries.len(), 10);
        for (e, l) in entries.iter().zip(&locs) {
            assert_eq!((e.offset, e.stored_len), (l.offset, l.stored_len));
            assert_eq!(ChunkLoc::decode(&l.encode()), *l);
        }
        // A flipped bit in the footer, then a truncated file: both named, neither trusted.
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() - TRAILER_LEN as usize - 10;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        assert!(
            read_footer(&Fs::default(), &path)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).expect("write");
        assert!(
            read_footer(&Fs::default(), &path)
                .unwrap_err()
                .to_string()
                .contains("no footer")
        );
    }

    /// Repair without an index: plane-coded chunks, like zstd frames, are found by their own
    /// headers in a pack whose footer is gone, and decode to bytes that hash to their ids.
    #[test]
    fn a_pack_without_footer_or_hints_gives_back_its_plane_coded_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::create(&Fs::default(), dir.path()).expect("create");
        let mut written = Vec::new();
        for seed in 0..4u64 {
            let page = crate::store::planes::tests::vector_page(seed, seed as usize % 4);
            let coded = crate::store::planes::encode(&page, 0).expect("plane-coded");
            let text = format!("note {seed}: ").repeat(200).into_bytes();
            let frame = zstd::bulk::compress(&text, 3).expect("zstd");
            for (raw, stored, flags) in [(&page, &coded, FLAG_PLANES), (&text, &frame, FLAG_ZSTD)] {
                let id = ChunkId::of(raw);
                w.append(id, raw.len() as u32, flags, stored)
                    .expect("append");
                written.push((id, flags));
            }
        }
        let (_, path, _, _) = w.finish().expect("finish");
        let mut bytes = std::fs::read(&path).expect("read");
        let footer = read_footer(&Fs::default(), &path).expect("footer");
        let end = footer
            .iter()
            .map(|e| e.offset + u64::from(e.stored_len))
            .max();
        bytes.truncate(end.expect("chunks") as usize);
        std::fs::write(&path, &bytes).expect("write");
        let found = scan(&path, &ScanHints::default()).expect("scan");
        let found: Vec<(ChunkId, u8)> = found.iter().map(|e| (e.id, e.flags)).collect();
        assert_eq!(found, written);
    }
}
