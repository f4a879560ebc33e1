//! Verify: every chunk a snapshot references is in the index and inside its pack; with
//! `read_data`, every chunk is also read, decompressed and re-hashed. Each damaged chunk is
//! reported with its pack and the snapshots and artifacts that need it; every snapshot that needs
//! no damaged chunk is reported intact.
//!
//! Three passes, so that the index is held only while trees are walked: (1) with the index, walk
//! every snapshot's trees once per distinct node (leaf nodes spilled, then read once each in
//! pack order), then locate each distinct data chunk; (2)
//! without it, check those chunks in parallel; (3) only if something is damaged, walk the trees
//! again to name every snapshot and artifact that needs a damaged chunk. A large store's data
//! chunk ids are located and checked one range of ids at a time (spilled to `tmp/` by pass 1),
//! so that they and their locations are not all held at once.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use super::Progress;
use crate::error::{Error, StoreError};
use crate::manifest::artifact::{self, ArtifactEntry};
use crate::manifest::snapshot::SnapshotRecord;
use crate::names::AgentId;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::{ChunkLoc, PackId, read_footer};
use crate::store::reader::{ChunkReader, PackFiles};
use crate::tree;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    pub snapshot: String,
    /// `memdir/<path>`, `sqlite/<name>`, `state/<name>`, or `manifest`.
    pub artifact: String,
    /// The damaged chunk's id (hex); empty when the damage is not one chunk's (a manifest whose
    /// chunks read but do not decode).
    pub chunk: String,
    /// The pack (hex id) the index places the chunk in; empty when the index has no entry.
    pub pack: String,
    pub problem: String,
}

/// What is wrong with one chunk, without the advice the error messages carry.
#[derive(Debug, Clone)]
struct Fault {
    pack: String,
    problem: String,
}

/// The pack id of `packs/xx/<id>.pack`.
fn pack_of(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn describe(e: &StoreError) -> Fault {
    let (pack, problem) = match e {
        StoreError::CorruptChunk { pack, message, .. } => (pack_of(pack), message.clone()),
        StoreError::MissingPack { pack, .. } => (pack_of(pack), "its pack file is missing".into()),
        StoreError::CorruptPack { pack, message } => (pack_of(pack), message.clone()),
        StoreError::MissingChunk { .. } => (String::new(), "not in the store index".into()),
        other => (String::new(), other.to_string()),
    };
    Fault { pack, problem }
}

/// A snapshot's entries, or the chunk (hex, empty if none) and fault that keep them unreadable;
/// an I/O failure of this machine is an error, as everywhere in verify (`damage`).
fn entries_or_fault(
    reader: &mut ChunkReader<'_>,
    record: &SnapshotRecord,
) -> Result<Result<Vec<ArtifactEntry>, (String, Fault)>, StoreError> {
    let mut bytes = Vec::new();
    let mut failed: Option<(ChunkId, StoreError)> = None;
    let walked = tree::walk(reader, &record.manifest, true, &mut |id, is_data, data| {
        match data {
            Ok(d) if is_data && failed.is_none() => bytes.extend_from_slice(&d),
            Ok(_) => {}
            Err(e) => {
                failed.get_or_insert((*id, damage(e)?));
            }
        }
        Ok(())
    });
    if let Err(e) = walked {
        return Ok(Err((String::new(), describe(&damage(e)?))));
    }
    if let Some((id, e)) = failed {
        return Ok(Err((id.hex(), describe(&e))));
    }
    Ok(artifact::decode_entries(&bytes).map_err(|e| (String::new(), describe(&e))))
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub read_data: bool,
    pub snapshots_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged: Vec<Damage>,
    /// Ids of the snapshots with at least one damaged artifact.
    pub damaged_snapshots: Vec<String>,
    /// Ids of the checked snapshots that need no damaged chunk: they restore.
    pub intact_snapshots: Vec<String>,
    /// Pack files that are missing or shorter than the index says, and (with `read_data`)
    /// packs whose footer is unreadable: their chunks may still be intact, but `repair` cannot
    /// rebuild the index from the footer (it scans such a pack from its start instead).
    pub damaged_packs: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty() && self.damaged_packs.is_empty()
    }
}

pub(crate) fn verify(
    store: &Store,
    spec: Option<&str>,
    agent: Option<&AgentId>,
    read_data: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport, Error> {
    let mut report = VerifyReport {
        read_data,
        snapshots_checked: 0,
        chunks_checked: 0,
        bytes_checked: 0,
        damaged: Vec::new(),
        damaged_snapshots: Vec::new(),
        intact_snapshots: Vec::new(),
        damaged_packs: Vec::new(),
    };
    // Pass 1. Prune (which deletes chunks) must not run between the passes.
    let _store_lock = store.lock_store(crate::lock::Mode::Shared)?;
    let mut bad: HashMap<ChunkId, Fault> = HashMap::new();
    let mut manifest_damage: HashMap<String, (String, Fault)> = HashMap::new();
    let mut pack_sizes: HashMap<PackId, Option<u64>> = HashMap::new();
    // Per pack, the end of the last chunk the index places in it.
    let mut needed: HashMap<PackId, u64> = HashMap::new();
    let packs = PackFiles::new(&store.fs, store.packs_dir());
    // Chunk ids are uniform: checking them a range of ids at a time, about a window's worth
    // each (see `Store::window`), bounds the list of ids and locations whatever the store's
    // size (`IdParts`).
    let (records, parts, mut ids) = {
        let index = store.index_for_reading()?;
        // Verifying the whole store, its ranges locate most of the chunk table between them.
        if spec.is_none() {
            index.read_ahead(u64::MAX);
        }
        let tx = index.begin_read()?;
        let records = match spec {
            Some(s) => vec![super::resolve(&index, &tx, s, agent)?],
            None => super::all_records(&index, &tx)?,
        };
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        // An eighth of a window per part: a part costs only an index session and a walk of its
        // range of the table, and its ids are a large share of verify's memory. At most
        // MAX_PARTS, each a spill file open meanwhile: file descriptors are few.
        let per_part = (store.window as u64 / 8).max(1);
        let parts = reader.chunk_count()?.div_ceil(per_part).clamp(1, MAX_PARTS);
        let mut ids = IdParts::new(store, parts)?;
        // Upper nodes and content roots are remembered, so what snapshots share is walked
        // once; leaves (~1/16 of the chunks) are spilled like data and read once each after.
        let mut leaves = IdParts::new(store, parts.div_ceil(LEAF_PARTS_PER))?;
        let mut nodes = crate::tree::Seen::new();
        for record in &records {
            let entries = match entries_or_fault(&mut reader, record)? {
                Ok(e) => e,
                Err(fault) => {
                    manifest_damage.insert(record.info.id.clone(), fault);
                    continue;
                }
            };
            for content in entries.iter().filter_map(|e| e.content.as_ref()) {
                tree::walk_new_nodes(
                    &mut reader,
                    content,
                    &mut nodes,
                    &mut |leaf| leaves.push(leaf),
                    &mut |cid, is_data, res| match (is_data, res) {
                        (true, _) => ids.push(cid),
                        (false, Err(e)) => note_fault(&mut bad, *cid, e),
                        (false, Ok(_)) => Ok(()),
                    },
                )?;
            }
        }
        for part in 0..leaves.parts() {
            let mut located = leaves.take(part)?;
            locate_in_pack_order(&mut reader, &mut located, &mut bad)?;
            for (id, loc) in &located {
                let children = reader
                    .packs
                    .read(id, loc)
                    .and_then(|b| tree::decode_node(&b, 1));
                match children {
                    Ok(children) => {
                        for (cid, _) in children {
                            ids.push(&cid)?;
                        }
                    }
                    Err(e) => note_fault(&mut bad, *id, e)?,
                }
            }
        }
        (records, parts, ids)
    };
    // Each range of ids located in an index session of its own. With several ranges, the
    // located chunks are regrouped by pack (`PackParts`) so that pass 2 reads each pack once.
    // Both sets of spill files are closed once written: file descriptors are few.
    ids.seal()?;
    let mut by_pack = match parts {
        1 => None,
        n => Some(PackParts::new(store, n)?),
    };
    let mut only = Vec::new();
    for part in 0..parts {
        let mut located = ids.take(part)?;
        if located.is_empty() {
            continue;
        }
        let index = store.index_for_reading()?;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        locate_in_pack_order(&mut reader, &mut located, &mut bad)?;
        match &mut by_pack {
            Some(b) => b.push_all(&located)?,
            None => only = located,
        }
    }
    drop(ids);
    if let Some(b) = &mut by_pack {
        b.0.seal()?;
    }
    for part in 0..parts {
        let located = match &mut by_pack {
            Some(b) => b.take(part)?,
            None => std::mem::take(&mut only),
        };
        if located.is_empty() {
            continue;
        }

        // Pass 2, without the index.
        let phase = match parts {
            1 => "verify".to_owned(),
            n => format!("verify, part {} of {n}", part + 1),
        };
        progress.start(&phase, located.iter().map(|(_, l)| l.raw_len as u64).sum());
        for (_, loc) in &located {
            pack_sizes.entry(loc.pack).or_insert_with(|| {
                std::fs::metadata(packs.path(&loc.pack))
                    .ok()
                    .map(|m| m.len())
            });
            let end = needed.entry(loc.pack).or_default();
            *end = (*end).max(loc.offset.saturating_add(u64::from(loc.stored_len)));
        }
        // Only failures are kept: a result per chunk was ~100 bytes, 100 MB at 4 GiB.
        let bytes_checked = std::sync::atomic::AtomicU64::new(0);
        let failures: Vec<(ChunkId, StoreError)> = located
            .par_iter()
            .filter_map(
                |(id, loc)| match check_chunk(&packs, id, loc, read_data, &pack_sizes) {
                    Ok(n) => {
                        progress.advance(n);
                        bytes_checked.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        None
                    }
                    Err(e) => Some((*id, e)),
                },
            )
            .collect();
        report.chunks_checked += located.len() as u64;
        report.bytes_checked += bytes_checked.into_inner();
        for (id, e) in failures {
            note_fault(&mut bad, id, e)?;
        }
    }
    drop(by_pack);
    // Per pack: missing, shorter than its chunks need, or (read_data) a damaged footer. The
    // packs of chunks that failed in pass 1 (tree nodes, manifests) count too.
    for fault in bad.values().chain(manifest_damage.values().map(|(_, f)| f)) {
        let mut id = [0u8; 16];
        if hex::decode_to_slice(&fault.pack, &mut id).is_ok() {
            pack_sizes.entry(PackId(id)).or_insert_with(|| {
                std::fs::metadata(packs.path(&PackId(id)))
                    .ok()
                    .map(|m| m.len())
            });
        }
    }
    let mut ids: Vec<&PackId> = pack_sizes.keys().collect();
    ids.sort();
    for pack in ids {
        let path = packs.path(pack);
        let need = needed.get(pack).copied().unwrap_or(0);
        let truncated = bad
            .values()
            .chain(manifest_damage.values().map(|(_, f)| f))
            .any(|f| f.pack == pack.hex() && f.problem.contains("truncated"));
        match pack_sizes.get(pack).copied().flatten() {
            None => report.damaged_packs.push(format!(
                "pack {}: the file {} is missing",
                pack.hex(),
                path.display()
            )),
            Some(size) if size < need || truncated => report.damaged_packs.push(format!(
                "pack {}: {} is {size} bytes, shorter than the index says (truncated)",
                pack.hex(),
                path.display()
            )),
            Some(_) if read_data => match read_footer(&store.fs, &path) {
                Ok(_) => {}
                Err(e) => report
                    .damaged_packs
                    .push(format!("pack {}: {}", pack.hex(), damage(e)?)),
            },
            Some(_) => {}
        }
    }
    report.snapshots_checked = records.len() as u64;
    drop(packs);

    // Pass 3, only when something is damaged: who needs it.
    if !bad.is_empty() || !manifest_damage.is_empty() {
        let mut attributed: HashSet<ChunkId> = HashSet::new();
        let mut rows: HashSet<(String, String, ChunkId)> = HashSet::new();
        let index = store.index_for_lookups()?;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        for record in &records {
            let id = &record.info.id;
            let before = report.damaged.len();
            let manifest_row = |(chunk, fault): (String, Fault)| Damage {
                snapshot: id.clone(),
                artifact: "manifest".into(),
                chunk,
                pack: fault.pack,
                problem: fault.problem,
            };
            if let Some(fault) = manifest_damage.get(id) {
                report.damaged.push(manifest_row(fault.clone()));
            } else {
                let entries = match entries_or_fault(&mut reader, record)? {
                    Ok(e) => e,
                    Err(fault) => {
                        report.damaged.push(manifest_row(fault));
                        Vec::new()
                    }
                };
                for entry in &entries {
                    let Some(content) = &entry.content else {
                        continue;
                    };
                    let artifact = format!("{}/{}", entry.part.name(), entry.path_lossy());
                    tree::walk(&mut reader, content, false, &mut |cid, _, res| {
                        // A node that fails now is damage too, recorded in pass 1 or not.
                        let fault = match (bad.get(cid), res) {
                            (Some(f), _) => f.clone(),
                            (None, Err(e)) => describe(&e),
                            (None, Ok(_)) => return Ok(()),
                        };
                        attributed.insert(*cid);
                        // A chunk repeated inside one artifact (zero pages) is one row.
                        if rows.insert((id.clone(), artifact.clone(), *cid)) {
                            report.damaged.push(Damage {
                                snapshot: id.clone(),
                                artifact: artifact.clone(),
                                chunk: cid.hex(),
                                pack: fault.pack,
                                problem: fault.problem,
                            });
                        }
                        Ok(())
                    })?;
                }
            }
            if report.damaged.len() > before {
                report.damaged_snapshots.push(id.clone());
            } else {
                report.intact_snapshots.push(id.clone());
            }
        }
        // Damage that no walk reached again still fails the verdict.
        for (cid, fault) in &bad {
            if !attributed.contains(cid) {
                report.damaged.push(Damage {
                    snapshot: String::new(),
                    artifact: "(not attributed)".into(),
                    chunk: cid.hex(),
                    pack: fault.pack.clone(),
                    problem: fault.problem.clone(),
                });
            }
        }
    } else {
        report.intact_snapshots = records.iter().map(|r| r.info.id.clone()).collect();
    }
    progress.finish();
    Ok(report)
}

/// `e` as damage in the store to report, or as the error that stops verify: an I/O failure of
/// this machine (out of file descriptors, a read error) is not damage, and reporting it either
/// way would be a false verdict.
fn damage(e: StoreError) -> Result<StoreError, StoreError> {
    match e {
        e @ StoreError::Io { .. } => Err(e),
        e => Ok(e),
    }
}

/// Records a chunk's fault (see [`damage`]).
fn note_fault(
    bad: &mut HashMap<ChunkId, Fault>,
    id: ChunkId,
    e: StoreError,
) -> Result<(), StoreError> {
    bad.insert(id, describe(&damage(e)?));
    Ok(())
}

/// Locates a part's ids (sorted, distinct), records those the index lacks, and sorts the rest
/// in pack order, for reading.
fn locate_in_pack_order(
    reader: &mut ChunkReader<'_>,
    located: &mut Vec<(ChunkId, ChunkLoc)>,
    bad: &mut HashMap<ChunkId, Fault>,
) -> Result<(), StoreError> {
    for cid in reader.locate_sorted(located)? {
        bad.insert(cid, describe(&StoreError::MissingChunk { id: cid.hex() }));
    }
    located.sort_unstable_by_key(|(_, l)| (l.pack, l.offset));
    Ok(())
}

fn check_chunk(
    packs: &PackFiles,
    id: &ChunkId,
    loc: &ChunkLoc,
    read_data: bool,
    pack_sizes: &HashMap<PackId, Option<u64>>,
) -> Result<u64, StoreError> {
    let path = packs.path(&loc.pack);
    let Some(size) = pack_sizes.get(&loc.pack).copied().flatten() else {
        return Err(StoreError::MissingPack {
            pack: path,
            id: id.hex(),
        });
    };
    if loc.offset.saturating_add(loc.stored_len as u64) > size {
        return Err(StoreError::CorruptChunk {
            id: id.hex(),
            pack: path,
            message: "the pack is shorter than the index says (truncated)".into(),
        });
    }
    if read_data {
        packs.read(id, loc)?;
    }
    Ok(loc.raw_len as u64)
}

/// Files under a verify scratch folder (`tmp/verify-*`), one per part, each written in any
/// order, then read back once in records of a fixed size and removed.
struct Spill {
    dir: crate::fsutil::ScratchDir,
    /// A part's file is `<prefix><part>`.
    prefix: &'static str,
    /// Closed once sealed or read.
    files: Vec<Option<std::io::BufWriter<std::fs::File>>>,
}

impl Spill {
    fn create(store: &Store, parts: u64, prefix: &'static str) -> Result<Self, Error> {
        let tmp = store.tmp_dir();
        let dir = crate::fsutil::ScratchDir::create(&store.fs, &tmp, "verify")
            .map_err(|e| Error::io(&tmp, e))?;
        let mut spill = Self {
            dir,
            prefix,
            files: Vec::new(),
        };
        for p in 0..parts as usize {
            let path = spill.path(p);
            let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            spill
                .files
                .push(Some(std::io::BufWriter::with_capacity(16 << 10, f)));
        }
        Ok(spill)
    }

    fn parts(&self) -> usize {
        self.files.len()
    }

    fn path(&self, part: usize) -> std::path::PathBuf {
        self.dir.path.join(format!("{}{part}", self.prefix))
    }

    fn write(&mut self, part: usize, record: &[&[u8]]) -> Result<(), StoreError> {
        use std::io::Write;
        let Some(f) = self.files.get_mut(part).and_then(Option::as_mut) else {
            let closed = std::io::Error::other("written after its part was sealed or read");
            return Err(StoreError::io(self.path(part), closed));
        };
        match record.iter().try_for_each(|bytes| f.write_all(bytes)) {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::io(self.path(part), e)),
        }
    }

    /// Flushes and closes every file: once all is written, so that few descriptors stay open.
    fn seal(&mut self) -> Result<(), Error> {
        for part in 0..self.files.len() {
            if let Some(f) = self.files[part].take() {
                f.into_inner()
                    .map_err(|e| Error::io(self.path(part), e.into_error()))?;
            }
        }
        Ok(())
    }

    /// Each record of `part`'s file, which is then removed.
    fn read<const N: usize>(
        &mut self,
        part: usize,
        mut each: impl FnMut([u8; N]),
    ) -> Result<(), Error> {
        use std::io::Write;
        let path = self.path(part);
        let io = |e| Error::io(&path, e);
        if let Some(mut f) = self.files.get_mut(part).and_then(Option::take) {
            f.flush().map_err(io)?;
        }
        let mut f =
            std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(&path).map_err(io)?);
        let mut record = [0u8; N];
        while crate::fsutil::read_full(&mut f, &mut record).map_err(io)? == N {
            each(record);
        }
        drop(f);
        std::fs::remove_file(&path).map_err(io)
    }
}

/// The chunk ids (data, or leaf nodes) a verify walk meets, deduplicated and handed out one
/// range of ids (a "part") at a time. One part is kept in memory, sorted and deduplicated
/// whenever it has doubled (repeats: unchanged chunks under changed nodes, snapshot after
/// snapshot); several are spilled to a file each under `tmp/`, so that the trees are walked
/// once whatever the number of parts, and only one part's ids are ever held.
enum IdParts {
    Memory {
        ids: Vec<(ChunkId, ChunkLoc)>,
        deduped: usize,
    },
    Spilled(Spill),
}

impl IdParts {
    fn new(store: &Store, parts: u64) -> Result<Self, Error> {
        if parts == 1 {
            crate::fsutil::sweep_scratch(&store.fs, &store.tmp_dir(), "verify");
            return Ok(Self::Memory {
                ids: Vec::new(),
                deduped: 0,
            });
        }
        Ok(Self::Spilled(Spill::create(store, parts, "")?))
    }

    fn push(&mut self, id: &ChunkId) -> Result<(), StoreError> {
        match self {
            Self::Memory { ids, deduped } => {
                push_dedup(ids, deduped, *id);
                Ok(())
            }
            Self::Spilled(spill) => spill.write(part_of(id, spill.parts() as u64), &[&id.0]),
        }
    }

    /// Closes the spill files once every id is pushed.
    fn seal(&mut self) -> Result<(), Error> {
        match self {
            Self::Memory { .. } => Ok(()),
            Self::Spilled(spill) => spill.seal(),
        }
    }

    fn parts(&self) -> u64 {
        match self {
            Self::Memory { .. } => 1,
            Self::Spilled(spill) => spill.parts() as u64,
        }
    }

    /// The ids of `part`, sorted, without repeats.
    fn take(&mut self, part: u64) -> Result<Vec<(ChunkId, ChunkLoc)>, Error> {
        let mut ids = match self {
            Self::Memory { ids, .. } => std::mem::take(ids),
            Self::Spilled(spill) => {
                let mut ids = Vec::new();
                let mut deduped = 0;
                spill.read(part as usize, |id: [u8; 32]| {
                    push_dedup(&mut ids, &mut deduped, ChunkId(id))
                })?;
                ids
            }
        };
        sort_dedup(&mut ids);
        Ok(ids)
    }
}

/// Located chunks regrouped by pack: as many groups of whole packs as there are ranges of ids
/// (pack ids are random, so the groups are alike), each spilled to a file (`packs-<n>`), so
/// that pass 2 reads each pack once, front to back. Read by range of ids instead, every range
/// read a little of every pack, and once the packs outgrew the page cache each range read most
/// of the store from the disk again (4 GiB agent, 32 ranges, packs not cached: 3.7 -> 10.5 s).
struct PackParts(Spill);

/// Bytes of one spilled record: a chunk id and its location.
const LOCATED: usize = 32 + ChunkLoc::ENCODED;

impl PackParts {
    fn new(store: &Store, parts: u64) -> Result<Self, Error> {
        Ok(Self(Spill::create(store, parts, "packs-")?))
    }

    fn push_all(&mut self, located: &[(ChunkId, ChunkLoc)]) -> Result<(), Error> {
        let parts = self.0.parts() as u64;
        for (id, loc) in located {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&loc.pack.0[..8]);
            let part = range_of(u64::from_be_bytes(prefix), parts);
            self.0.write(part, &[&id.0, &loc.encode()])?;
        }
        Ok(())
    }

    /// The chunks of `part`, in pack order.
    fn take(&mut self, part: u64) -> Result<Vec<(ChunkId, ChunkLoc)>, Error> {
        let mut located = Vec::new();
        self.0.read(part as usize, |rec: [u8; LOCATED]| {
            let mut id = [0u8; 32];
            id.copy_from_slice(&rec[..32]);
            let mut loc = [0u8; ChunkLoc::ENCODED];
            loc.copy_from_slice(&rec[32..]);
            located.push((ChunkId(id), ChunkLoc::decode(&loc)));
        })?;
        located.sort_unstable_by_key(|(_, l)| (l.pack, l.offset));
        Ok(located)
    }
}

/// Appends `id`, sorting and deduplicating whenever the list has doubled since the last time:
/// it stays within twice the distinct ids.
fn push_dedup(ids: &mut Vec<(ChunkId, ChunkLoc)>, deduped: &mut usize, id: ChunkId) {
    ids.push((id, ChunkLoc::UNSET));
    if ids.len() > 2 * (*deduped).max(1 << 16) {
        sort_dedup(ids);
        *deduped = ids.len();
    }
}

fn sort_dedup(ids: &mut Vec<(ChunkId, ChunkLoc)>) {
    ids.sort_unstable_by_key(|(id, _)| *id);
    ids.dedup_by_key(|(id, _)| *id);
}

/// The most id ranges verify splits data chunks into (see `IdParts`).
const MAX_PARTS: u64 = 64;

/// Data parts per part of leaf nodes. A leaf lists ~16 data chunks, so a leaf part holds about
/// half a data part's ids, more as snapshots whose upper nodes changed list a leaf again; and
/// there are at most 8 more spill files open.
const LEAF_PARTS_PER: u64 = 8;

/// Which of `parts` equal ranges of ids `id` falls in; ids are uniform, so parts are alike.
fn part_of(id: &ChunkId, parts: u64) -> usize {
    range_of(id.prefix(), parts)
}

/// Which of `parts` equal ranges of the `u64`s `prefix` falls in.
fn range_of(prefix: u64, parts: u64) -> usize {
    ((u128::from(prefix) * u128::from(parts)) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks pushed from several ranges of ids come back once each, every pack's chunks in one
    /// part, in pack order; the spill files go with their parts.
    #[test]
    fn pack_parts_hold_whole_packs_in_pack_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let mut parts = PackParts::new(&store, 5).expect("parts");
        let packs: Vec<PackId> = (0..40u8)
            .map(|i| PackId(*blake3::hash(&[i]).as_bytes().first_chunk().expect("16")))
            .collect();
        let mut all = Vec::new();
        for range in 0..3u32 {
            let located: Vec<(ChunkId, ChunkLoc)> = (0..400u32)
                .map(|i| {
                    let n = range * 1000 + i;
                    let loc = ChunkLoc {
                        pack: packs[(n * 7 % 40) as usize],
                        offset: u64::from(n) * 4096,
                        stored_len: 100 + n,
                        raw_len: 4096,
                        flags: (n % 2) as u8,
                    };
                    (ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes()), loc)
                })
                .collect();
            parts.push_all(&located).expect("push");
            all.extend(located);
        }
        parts.0.seal().expect("seal");
        let mut back = Vec::new();
        let mut owner: HashMap<PackId, u64> = HashMap::new();
        for part in 0..5 {
            let got = parts.take(part).expect("take");
            assert!(
                got.is_sorted_by_key(|(_, l)| (l.pack, l.offset)),
                "part {part} in pack order"
            );
            for (_, l) in &got {
                assert_eq!(
                    *owner.entry(l.pack).or_insert(part),
                    part,
                    "one part per pack"
                );
            }
            assert!(!parts.0.path(part as usize).exists());
            back.extend(got);
        }
        assert!(owner.len() == 40 && owner.values().collect::<HashSet<_>>().len() > 1);
        // A write after its part was read is refused, naming the file, not lost.
        let late = parts
            .push_all(&all[..1])
            .expect_err("written after its part was read");
        assert!(late.to_string().contains("packs-"), "{late}");
        let key = |v: &mut Vec<(ChunkId, ChunkLoc)>| v.sort_unstable_by_key(|(id, _)| *id);
        key(&mut all);
        key(&mut back);
        assert!(all == back, "every chunk back once, with its location");
    }

    #[test]
    fn parts_split_the_ids_in_order() {
        let at = |prefix: u64| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&prefix.to_be_bytes());
            ChunkId(id)
        };
        for parts in [1u64, 2, 3, 7, 1000] {
            assert_eq!(part_of(&at(0), parts), 0);
            assert_eq!(part_of(&at(u64::MAX), parts) as u64, parts - 1);
            let mut last = 0;
            for k in 0..=64u64 {
                let p = part_of(&at(k.wrapping_mul(u64::MAX / 64)), parts);
                assert!(p >= last && (p as u64) < parts, "{k} of {parts}");
                last = p;
            }
        }
    }
}
