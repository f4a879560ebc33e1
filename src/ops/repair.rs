//! Repair: rebuild the index's `chunks` and `packs` tables from the pack files themselves
//! (store-format.md, "Repair"). Under the exclusive store lock and the index lock, for its whole
//! run:
//! 1. Read what the old index still holds (from a copy: the original is never written).
//! 2. Read every pack: its footer, or, when the footer is damaged, its records from the start as
//!    far as they are recognisable; re-hash every chunk. Only chunks whose bytes hash to their id
//!    are indexed (I1); a chunk with only damaged copies is left out, so that the next snapshot
//!    holding those bytes stores them again.
//! 3. Copy the chunks salvaged from footer-less packs into new packs (fsynced).
//! 4. Keep the tree flag only on nodes whose whole subtree is indexed (I3).
//! 5. Keep every snapshot, agent and pin record the old index holds; if its snapshot records are
//!    unreadable, recover one snapshot per manifest found in the packs.
//! 6. Write the new index as a new file in `tmp/` (one redb transaction, fsynced), keep the old
//!    file as `index.redb.before-repair-<ms>`, rename the new one into place, fsync the folder.
//!    Then move the footer-less packs to `damaged/`.
//!
//! A crash before the rename leaves the old index in place (and orphan packs for prune); after
//! it, footer-less packs in `packs/` that the next repair salvages again from copies it already
//! has. Re-running is always safe, and a repair that finds nothing to change changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::Progress;
use crate::error::{Error, StoreError};
use crate::lock::{self, Holder, Mode};
use crate::manifest::artifact::{self, ArtifactEntry, EntryKind, Part};
use crate::manifest::snapshot::{SNAPSHOT_VERSION, SnapshotInfo, SnapshotRecord, SnapshotStats};
use crate::storage::{Fs, OpenMode};
use crate::store::INDEX_FILE;
use crate::store::chunk_id::ChunkId;
use crate::store::config::StoreConfig;
use crate::store::index::{
    self, AGENTS, CHUNKS, Index, META, PACKS, PINS, PackRecord, SNAPSHOTS, decode_record,
    encode_record,
};
use crate::store::pack::{
    ChunkLoc, FLAG_PLANES, FLAG_TREE, FooterEntry, PackId, PackWriter, ScanHints, list_packs,
    read_footer, scan,
};
use crate::store::reader::{ChunkReader, PackFiles};
use crate::tree::{self, ContentRef};

/// Tenant and agent of the snapshots recovered from manifests: their records, which named the
/// agent, were in the lost index.
pub const RECOVERED_TENANT: &str = "recovered";
pub const RECOVERED_AGENT: &str = "unknown";

#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RepairRequest {
    /// Report what would change; write nothing.
    pub dry_run: bool,
}

impl RepairRequest {
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }
}

/// A stored copy of a chunk whose bytes do not hash to its id.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct DamagedChunk {
    pub chunk: String,
    pub pack: String,
    pub problem: String,
}

/// A snapshot that still needs chunks no pack holds intact.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotDamage {
    pub snapshot: String,
    pub missing_chunks: u64,
    /// `memdir/<path>`, `sqlite/<name>`, `state/<name>`, or `manifest` (nothing of it reads).
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct RepairReport {
    pub dry_run: bool,
    /// Whether the old index opened and its snapshot records read.
    pub index_readable: bool,
    /// Why it did not, or which of its tables did not read.
    pub index_problems: Vec<String>,
    /// Pack files read.
    pub packs: u64,
    /// Packs whose footer is damaged: their recognisable chunks were copied into new packs and
    /// the file moved to `damaged/` (hex ids).
    pub packs_salvaged: Vec<String>,
    /// Packs the old index names whose file is gone (hex ids).
    pub packs_missing: Vec<String>,
    pub packs_written: u64,
    /// Entries of the new `chunks` table.
    pub chunks: u64,
    /// Entries the old index lacked.
    pub chunks_added: u64,
    /// Old entries with no intact copy in any pack.
    pub chunks_removed: u64,
    /// Old entries now pointing at another (intact) copy.
    pub chunks_moved: u64,
    pub chunks_damaged: Vec<DamagedChunk>,
    /// Tree nodes whose subtree is no longer all indexed (I3): now plain entries.
    pub tree_flags_cleared: u64,
    pub snapshots_kept: u64,
    /// Ids of the snapshots recovered from manifests found in the packs.
    pub snapshots_recovered: Vec<String>,
    pub intact_snapshots: Vec<String>,
    pub damaged_snapshots: Vec<SnapshotDamage>,
    /// What the old index held that could not be kept, in words.
    pub lost: Vec<String>,
    /// Where the old index file is kept, when repair replaced it.
    pub backup: Option<PathBuf>,
    pub duration_ms: u64,
    /// Pack records or chunk flags differ from the old index's (no count of their own).
    #[serde(skip)]
    records_changed: bool,
}

impl RepairReport {
    /// Whether the new index differs from the old one.
    fn changes(&self) -> bool {
        !self.index_readable
            || !self.index_problems.is_empty()
            || !self.packs_salvaged.is_empty()
            || self.chunks_added + self.chunks_removed + self.chunks_moved > 0
            || self.tree_flags_cleared > 0
            || !self.snapshots_recovered.is_empty()
            || self.records_changed
    }
}

/// What could be read from the old index.
#[derive(Default)]
struct OldIndex {
    opened: bool,
    snapshots_complete: bool,
    problems: Vec<String>,
    meta: Vec<(String, Vec<u8>)>,
    snapshots: Vec<(String, Vec<u8>)>,
    agents: Vec<(String, Vec<u8>)>,
    pins: Vec<(String, i64)>,
    packs: HashMap<PackId, PackRecord>,
    chunks: HashMap<ChunkId, ChunkLoc>,
}

/// Decoded tree nodes: id → (level, children with their sizes).
type Nodes = HashMap<ChunkId, (u8, Vec<(ChunkId, u64)>)>;

/// One intact stored copy of a chunk.
#[derive(Clone, Copy)]
struct Copy {
    loc: ChunkLoc,
    /// In a pack with a valid footer (else it must be copied out).
    footer_ok: bool,
}

pub(crate) fn repair(
    root: &Path,
    lock_timeout: Duration,
    fs: &Fs,
    req: &RepairRequest,
    progress: &dyn Progress,
) -> Result<RepairReport, Error> {
    let started = Instant::now();
    let index_path = root.join(INDEX_FILE);
    let packs_dir = root.join("packs");
    if !index_path.exists() && !packs_dir.is_dir() {
        return Err(Error::NoStore {
            path: root.to_path_buf(),
        });
    }
    let tmp = root.join("tmp");
    fs.create_dir_all_durable(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    // Nothing reads or writes the store meanwhile: prune's lock, then the index itself.
    let _store_lock = lock::acquire(
        &root.join("locks").join("store.lock"),
        Mode::Exclusive,
        lock_timeout,
        Holder::Store,
    )?;
    let mut index_lock = index::lock(&root.join("locks").join("index.lock"))?;
    let mut report = RepairReport {
        dry_run: req.dry_run,
        ..Default::default()
    };

    // 1. The old index, read from a copy.
    let old_copy = tmp.join("repair-old.redb");
    let new_path = tmp.join("repair-new.redb");
    for p in [&old_copy, &new_path] {
        fs.remove_any(p).map_err(|e| Error::io(p, e))?;
    }
    let old = read_old(&index_path, &old_copy);
    let _ = std::fs::remove_file(&old_copy);
    report.index_readable = old.opened && old.snapshots_complete;
    report.index_problems = old.problems.clone();

    // 2. Every pack, footer first; footer-less ones after, with what the others taught.
    let on_disk = list_packs(&packs_dir);
    report.packs = on_disk.len() as u64;
    let files = PackFiles::new(fs, packs_dir.clone());
    progress.start("repair", on_disk.iter().map(|(_, size)| size).sum());
    let mut copies: HashMap<ChunkId, Vec<Copy>> = HashMap::new();
    let mut nodes: Nodes = HashMap::new();
    let mut footers: HashMap<PackId, u32> = HashMap::new();
    let mut salvage: Vec<(PackId, PathBuf)> = Vec::new();
    for (pack, size) in &on_disk {
        let path = pack.path(&packs_dir);
        match read_footer(fs, &path) {
            Ok(entries) => {
                footers.insert(*pack, entries.len() as u32);
                check_entries(
                    &files,
                    *pack,
                    &entries,
                    true,
                    &mut copies,
                    &mut nodes,
                    &mut report,
                )?;
            }
            Err(StoreError::Io { path, source }) => return Err(Error::io(path, source)),
            Err(_) => salvage.push((*pack, path)),
        }
        progress.advance(*size);
    }
    let mut sizes: HashMap<u32, u64> = HashMap::new();
    let mut ids = HashSet::new();
    for (level, children) in nodes.values() {
        if *level == 1 {
            for (id, size) in children {
                *sizes
                    .entry(u32::try_from(*size).unwrap_or(u32::MAX))
                    .or_default() += 1;
                ids.insert(*id);
            }
        }
    }
    let mut by_count: Vec<(u32, u64)> = sizes.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut hints = ScanHints {
        sizes: by_count.into_iter().take(256).map(|(s, _)| s).collect(),
        ids,
        ..Default::default()
    };
    for (pack, path) in &salvage {
        hints.entries = old
            .chunks
            .iter()
            .filter(|(_, l)| l.pack == *pack)
            .map(|(id, l)| FooterEntry {
                id: *id,
                offset: l.offset,
                stored_len: l.stored_len,
                raw_len: l.raw_len,
                flags: l.flags,
            })
            .collect();
        let entries = scan(path, &hints)?;
        check_entries(
            &files,
            *pack,
            &entries,
            false,
            &mut copies,
            &mut nodes,
            &mut report,
        )?;
        report.packs_salvaged.push(pack.hex());
    }
    for pack in old
        .packs
        .keys()
        .chain(old.chunks.values().map(|l| &l.pack))
        .collect::<BTreeSet<_>>()
    {
        if !pack.path(&packs_dir).exists() {
            report.packs_missing.push(pack.hex());
        }
    }

    // Choose one copy per chunk: the old entry's if intact, else one in a whole pack.
    let mut chosen: BTreeMap<ChunkId, ChunkLoc> = BTreeMap::new();
    let mut to_copy: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    for (id, list) in &copies {
        let tree_flag = list.iter().fold(0, |f, c| f | (c.loc.flags & FLAG_TREE));
        let old_loc = old.chunks.get(id);
        let pick = list
            .iter()
            .find(|c| c.footer_ok && old_loc.is_some_and(|o| same_place(o, &c.loc)))
            .or_else(|| {
                list.iter()
                    .filter(|c| c.footer_ok)
                    .min_by_key(|c| (c.loc.pack, c.loc.offset))
            });
        match pick {
            Some(c) => {
                chosen.insert(
                    *id,
                    ChunkLoc {
                        flags: c.loc.flags | tree_flag,
                        ..c.loc
                    },
                );
            }
            None => {
                if let Some(c) = list.iter().min_by_key(|c| (c.loc.pack, c.loc.offset)) {
                    let loc = ChunkLoc {
                        flags: c.loc.flags | tree_flag,
                        ..c.loc
                    };
                    // Until copied (or in a dry run), it is read where it was found.
                    chosen.insert(*id, loc);
                    to_copy.push((*id, loc));
                }
            }
        }
    }

    // 3. Salvaged chunks into new packs, made durable before any index names them.
    let mut new_packs: Vec<(PackId, u64, u32)> = Vec::new();
    if !to_copy.is_empty() {
        to_copy.sort_by_key(|(_, l)| (l.pack, l.offset));
        if req.dry_run {
            report.packs_written = 1;
        } else {
            let mut w = PackWriter::create(fs, &packs_dir)?;
            let dir = crate::fsutil::parent_of(&w.path);
            for (id, loc) in &to_copy {
                let stored = files.read_stored(id, loc)?;
                let new = w.append(*id, loc.raw_len, loc.flags, &stored)?;
                chosen.insert(*id, new);
            }
            let (pid, _, size, count) = w.finish()?;
            fs.sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            fs.sync_dir(&packs_dir)
                .map_err(|e| Error::io(&packs_dir, e))?;
            new_packs.push((pid, size, count));
            report.packs_written = 1;
        }
    }

    // 4. I3: a tree flag only where the whole subtree is indexed.
    let mut complete: HashMap<ChunkId, bool> = HashMap::new();
    let flagged: Vec<ChunkId> = chosen
        .iter()
        .filter(|(_, l)| l.flags & FLAG_TREE != 0)
        .map(|(id, _)| *id)
        .collect();
    for id in flagged {
        if !subtree_complete(&id, &nodes, &chosen, &mut complete)
            && let Some(l) = chosen.get_mut(&id)
        {
            l.flags &= !FLAG_TREE;
            report.tree_flags_cleared += 1;
        }
    }
    report.chunks = chosen.len() as u64;
    for (id, loc) in &chosen {
        match old.chunks.get(id) {
            None => report.chunks_added += 1,
            Some(o) if !same_place(o, loc) => report.chunks_moved += 1,
            Some(o) if o.flags != loc.flags => report.records_changed = true,
            Some(_) => {}
        }
    }
    report.chunks_removed = old
        .chunks
        .keys()
        .filter(|id| !chosen.contains_key(id))
        .count() as u64;

    // Pack records: every whole pack, keeping the old record's time.
    let mut pack_records: BTreeMap<PackId, PackRecord> = BTreeMap::new();
    for (pack, size) in &on_disk {
        if let Some(count) = footers.get(pack) {
            let created_at_ms = old
                .packs
                .get(pack)
                .map(|r| r.created_at_ms)
                .unwrap_or_else(|| mtime_ms(&pack.path(&packs_dir)));
            pack_records.insert(
                *pack,
                PackRecord {
                    size: *size,
                    chunks: *count,
                    created_at_ms,
                },
            );
        }
    }
    for (pack, size, count) in &new_packs {
        pack_records.insert(
            *pack,
            PackRecord {
                size: *size,
                chunks: *count,
                created_at_ms: crate::now_ms(),
            },
        );
    }
    report.records_changed |= pack_records.len() != old.packs.len()
        || pack_records
            .iter()
            .any(|(id, r)| old.packs.get(id) != Some(r));

    // 5. Snapshot records: kept, or recovered from the manifests in the packs.
    let mut snapshots = old.snapshots.clone();
    let mut kept_manifests = HashSet::new();
    for (key, bytes) in &old.snapshots {
        if let Ok(r) = decode_record::<SnapshotRecord>(SNAPSHOT_VERSION, bytes, key) {
            kept_manifests.insert(r.manifest.root);
        }
    }
    report.snapshots_kept = snapshots.len() as u64;
    if !old.snapshots_complete {
        for record in recover_snapshots(&files, &chosen, &nodes, &kept_manifests, &packs_dir) {
            let key = record.info.id.clone();
            if snapshots.iter().any(|(k, _)| *k == key) {
                continue;
            }
            snapshots.push((
                key.clone(),
                encode_record(SNAPSHOT_VERSION, &record, "snapshot record")?,
            ));
            report.snapshots_recovered.push(key);
        }
    }
    lost_statement(&old, &mut report);

    // 6. The new index, in one transaction, in a new file.
    let config_bytes = match old.meta.iter().find(|(k, _)| k == "config") {
        Some((_, b)) => b.clone(),
        None => encode_record(
            1,
            &StoreConfig::new_default(crate::now_ms()),
            "store config",
        )?,
    };
    {
        let new = Index::open_under(
            fs,
            &new_path,
            index_lock,
            crate::store::index::INDEX_CACHE_BYTES,
        )?;
        let err = |e: redb::Error| StoreError::index(&new_path, e);
        let tx = new.begin_write()?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert("config", config_bytes.as_slice())
                .map_err(|e| err(e.into()))?;
            for (k, v) in old.meta.iter().filter(|(k, _)| k != "config") {
                meta.insert(k.as_str(), v.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut t = tx.open_table(CHUNKS).map_err(|e| err(e.into()))?;
            for (id, loc) in &chosen {
                t.insert(&id.0, &loc.encode()).map_err(|e| err(e.into()))?;
            }
            let mut t = tx.open_table(PACKS).map_err(|e| err(e.into()))?;
            for (id, rec) in &pack_records {
                let bytes = encode_record(1, rec, "pack record")?;
                t.insert(id.0, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut t = tx.open_table(SNAPSHOTS).map_err(|e| err(e.into()))?;
            for (k, v) in &snapshots {
                t.insert(k.as_str(), v.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut t = tx.open_table(AGENTS).map_err(|e| err(e.into()))?;
            for (k, v) in &old.agents {
                t.insert(k.as_str(), v.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut t = tx.open_table(PINS).map_err(|e| err(e.into()))?;
            for (k, v) in &old.pins {
                t.insert(k.as_str(), *v).map_err(|e| err(e.into()))?;
            }
        }
        if chosen.iter().any(|(_, loc)| loc.flags & FLAG_PLANES != 0) {
            crate::store::raise_format(&new, &tx)?;
        }
        tx.commit().map_err(|e| err(e.into()))?;
        // Which snapshots the new index serves whole.
        assess(&new, &packs_dir, &snapshots, &mut report)?;
        index_lock = new.into_lock();
    }
    let file = fs
        .open(&new_path, OpenMode::Read)
        .map_err(|e| Error::io(&new_path, e))?;
    file.sync().map_err(|e| Error::io(&new_path, e))?;
    drop(file);

    if req.dry_run || !report.changes() {
        // A repair that changes nothing writes nothing (new packs only when there was salvage).
        let _ = fs.remove_file(&new_path);
        progress.finish();
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }
    crate::failpoint::hit("repair:before-commit")?;
    if index_path.exists() {
        let backup = root.join(format!("{INDEX_FILE}.before-repair-{}", crate::now_ms()));
        if std::fs::hard_link(&index_path, &backup).is_err() {
            // A copy must be durable before the rename below replaces what it copies.
            std::fs::copy(&index_path, &backup).map_err(|e| Error::io(&backup, e))?;
            fs.open(&backup, OpenMode::Read)
                .and_then(|f| f.sync())
                .map_err(|e| Error::io(&backup, e))?;
        }
        report.backup = Some(backup);
    }
    fs.rename(&new_path, &index_path)
        .map_err(|e| Error::io(&index_path, e))?;
    fs.sync_dir(root).map_err(|e| Error::io(root, e))?;
    drop(index_lock);
    crate::failpoint::hit("repair:before-move")?;

    // Footer-less packs are unreferenced now; kept aside, never deleted.
    if !salvage.is_empty() {
        let damaged = root.join("damaged");
        fs.create_dir_all_durable(&damaged)
            .map_err(|e| Error::io(&damaged, e))?;
        for (pack, path) in &salvage {
            let to = damaged.join(format!("{}.pack", pack.hex()));
            fs.rename(path, &to).map_err(|e| Error::io(path, e))?;
            let dir = crate::fsutil::parent_of(path);
            fs.sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        fs.sync_dir(&damaged).map_err(|e| Error::io(&damaged, e))?;
    }
    progress.finish();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

fn same_place(a: &ChunkLoc, b: &ChunkLoc) -> bool {
    a.pack == b.pack && a.offset == b.offset && a.stored_len == b.stored_len
}

fn mtime_ms(path: &Path) -> i64 {
    std::fs::metadata(path).map_or(0, |m| crate::source::memdir::mtime_ns(&m) / 1_000_000)
}

/// Reads, decompresses and hashes each entry's bytes; intact ones become copies, tree nodes are
/// decoded for I3 and manifest recovery, damaged ones are reported.
fn check_entries(
    files: &PackFiles,
    pack: PackId,
    entries: &[FooterEntry],
    footer_ok: bool,
    copies: &mut HashMap<ChunkId, Vec<Copy>>,
    nodes: &mut Nodes,
    report: &mut RepairReport,
) -> Result<(), Error> {
    let results: Vec<(FooterEntry, Result<Vec<u8>, StoreError>)> = entries
        .par_iter()
        .map(|e| {
            let loc = loc_of(pack, e);
            (*e, files.read(&e.id, &loc))
        })
        .collect();
    for (e, r) in results {
        let loc = loc_of(pack, &e);
        match r {
            Ok(raw) => {
                if let Some(level) = raw.get(1).copied().filter(|l| *l > 0)
                    && let Ok(children) = tree::decode_node(&raw, level)
                    && (e.flags & FLAG_TREE != 0 || !footer_ok)
                {
                    nodes.insert(e.id, (level, children));
                }
                copies
                    .entry(e.id)
                    .or_default()
                    .push(Copy { loc, footer_ok });
            }
            Err(StoreError::Io { path, source }) => return Err(Error::io(path, source)),
            Err(err) => report.chunks_damaged.push(DamagedChunk {
                chunk: e.id.hex(),
                pack: pack.hex(),
                problem: match err {
                    StoreError::CorruptChunk { message, .. } => message,
                    other => other.to_string(),
                },
            }),
        }
    }
    Ok(())
}

fn loc_of(pack: PackId, e: &FooterEntry) -> ChunkLoc {
    ChunkLoc {
        pack,
        offset: e.offset,
        stored_len: e.stored_len,
        raw_len: e.raw_len,
        flags: e.flags,
    }
}

fn subtree_complete(
    id: &ChunkId,
    nodes: &Nodes,
    chosen: &BTreeMap<ChunkId, ChunkLoc>,
    memo: &mut HashMap<ChunkId, bool>,
) -> bool {
    if let Some(v) = memo.get(id) {
        return *v;
    }
    let ok = match nodes.get(id) {
        None => false,
        Some((level, children)) => children.iter().all(|(c, _)| {
            chosen.contains_key(c) && (*level == 1 || subtree_complete(c, nodes, chosen, memo))
        }),
    };
    memo.insert(*id, ok);
    ok
}

/// Reads every table of the old index that still reads, from a copy of the file, with redb's
/// integrity check (a plain open trusts the file and may panic on damage).
fn read_old(index_path: &Path, copy: &Path) -> OldIndex {
    let mut old = OldIndex::default();
    match std::fs::metadata(index_path) {
        Err(e) => {
            old.problems.push(format!("{}: {e}", index_path.display()));
            return old;
        }
        Ok(m) if m.len() == 0 => {
            old.problems
                .push(format!("{} is empty", index_path.display()));
            return old;
        }
        Ok(_) => {}
    }
    if let Err(e) = std::fs::copy(index_path, copy) {
        old.problems
            .push(format!("cannot copy {}: {e}", index_path.display()));
        return old;
    }
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_tables(copy, &mut old)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => old.problems.push(e),
        Err(_) => old
            .problems
            .push("the index file is damaged (reading it failed)".into()),
    }
    old
}

fn read_tables(path: &Path, old: &mut OldIndex) -> Result<(), String> {
    let db = redb::Database::builder()
        .set_check_integrity_on_open(true)
        .create(path)
        .map_err(|e| format!("the index does not open: {e}"))?;
    let tx = db
        .begin_read()
        .map_err(|e| format!("the index does not read: {e}"))?;
    old.opened = true;
    macro_rules! table {
        ($def:expr, $name:literal, |$k:ident, $v:ident| $body:expr) => {
            match tx.open_table($def) {
                Err(redb::TableError::TableDoesNotExist(_)) => true,
                Err(e) => {
                    old.problems.push(format!("table {}: {e}", $name));
                    false
                }
                Ok(t) => match t.iter() {
                    Err(e) => {
                        old.problems.push(format!("table {}: {e}", $name));
                        false
                    }
                    Ok(iter) => {
                        let mut whole = true;
                        for item in iter {
                            match item {
                                Ok(($k, $v)) => $body,
                                Err(e) => {
                                    old.problems.push(format!("table {}: {e}", $name));
                                    whole = false;
                                    break;
                                }
                            }
                        }
                        whole
                    }
                },
            }
        };
    }
    table!(META, "meta", |k, v| old
        .meta
        .push((k.value().to_owned(), v.value().to_vec())));
    let has_config = old.meta.iter().any(|(k, _)| k == "config");
    if !has_config {
        old.problems
            .push("it holds no store config (it was emptied or replaced)".into());
    }
    // Without its config the file is not this store's index (an emptied file that an open
    // initialised): its tables say nothing about the snapshots.
    old.snapshots_complete = table!(SNAPSHOTS, "snapshots", |k, v| old
        .snapshots
        .push((k.value().to_owned(), v.value().to_vec())))
        && has_config;
    table!(AGENTS, "agents", |k, v| old
        .agents
        .push((k.value().to_owned(), v.value().to_vec())));
    table!(PINS, "pins", |k, v| old
        .pins
        .push((k.value().to_owned(), v.value())));
    table!(PACKS, "packs", |k, v| {
        if let Ok(r) = decode_record::<PackRecord>(1, v.value(), "pack record") {
            old.packs.insert(PackId(k.value()), r);
        }
    });
    table!(CHUNKS, "chunks", |k, v| {
        old.chunks
            .insert(ChunkId(*k.value()), ChunkLoc::decode(v.value()));
    });
    Ok(())
}

fn lost_statement(old: &OldIndex, report: &mut RepairReport) {
    if !old.opened || !old.meta.iter().any(|(k, _)| k == "config") {
        report.lost.push(
            "the store config (store id, chunking parameters): written anew with the defaults \
             every memsnap store has used; a store created with other parameters deduplicates \
             less from now on"
                .into(),
        );
    }
    if !old.snapshots_complete {
        report.lost.push(format!(
            "snapshot records (ids, agents, labels, times, git heads, source paths): each \
             manifest found in the packs is listed again as a snapshot of {RECOVERED_TENANT}/\
             {RECOVERED_AGENT}, labelled `recovered`, timed by its pack; restore one with \
             --target DIR or --source DIR. Snapshots forgotten but not yet pruned come back too, \
             and snapshots with identical content come back as one"
        ));
    }
    if !old.opened {
        report.lost.push(
            "agent records (where each agent's memory lives: pass --source once again) and pins"
                .into(),
        );
    }
}

/// One snapshot record per manifest found in the packs: a chunk no tree node names whose
/// content decodes as an entry stream, and that no kept record already names.
fn recover_snapshots(
    files: &PackFiles,
    chosen: &BTreeMap<ChunkId, ChunkLoc>,
    nodes: &Nodes,
    kept: &HashSet<ChunkId>,
    packs_dir: &Path,
) -> Vec<SnapshotRecord> {
    let named: HashSet<ChunkId> = nodes
        .values()
        .flat_map(|(_, c)| c.iter().map(|(id, _)| *id))
        .collect();
    let mut out = Vec::new();
    for (id, loc) in chosen {
        if named.contains(id) || kept.contains(id) {
            continue;
        }
        let height = nodes.get(id).map_or(0, |(level, _)| *level);
        // Cheap test first: a manifest's first data chunk starts with `len u32 | version 1`.
        let mut first = *id;
        let mut h = height;
        while h > 0 {
            match nodes.get(&first).and_then(|(_, c)| c.first()) {
                Some((c, _)) => first = *c,
                None => break,
            }
            h -= 1;
        }
        let Some(first_loc) = chosen.get(&first) else {
            continue;
        };
        let Ok(head) = files.read(&first, first_loc) else {
            continue;
        };
        if head.len() < 5 || head[4] != 1 {
            continue;
        }
        let Some(bytes) = flatten(files, chosen, nodes, id, height) else {
            continue;
        };
        let Ok(entries) = artifact::decode_entries(&bytes) else {
            continue;
        };
        if entries.is_empty() {
            continue;
        }
        let manifest = ContentRef {
            size: bytes.len() as u64,
            height,
            root: *id,
        };
        out.push(recovered_record(
            manifest,
            &entries,
            mtime_ms(&loc.pack.path(packs_dir)),
        ));
    }
    out
}

fn flatten(
    files: &PackFiles,
    chosen: &BTreeMap<ChunkId, ChunkLoc>,
    nodes: &Nodes,
    id: &ChunkId,
    height: u8,
) -> Option<Vec<u8>> {
    if height == 0 {
        return files.read(id, chosen.get(id)?).ok();
    }
    let (level, children) = nodes.get(id)?;
    if *level != height {
        return None;
    }
    let mut out = Vec::new();
    for (c, _) in children {
        out.extend(flatten(files, chosen, nodes, c, height - 1)?);
    }
    Some(out)
}

fn recovered_record(manifest: ContentRef, entries: &[ArtifactEntry], at_ms: i64) -> SnapshotRecord {
    let mut schema_versions = BTreeMap::new();
    for e in entries {
        if let EntryKind::Sqlite { user_version, .. } = e.kind {
            let name = e.path_lossy();
            let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
            schema_versions.insert(stem.to_owned(), user_version);
        }
    }
    let absent = [Part::Memdir, Part::Sqlite, Part::State]
        .into_iter()
        .filter(|p| !entries.iter().any(|e| e.part == *p))
        .map(|p| p.name().to_owned())
        .collect();
    SnapshotRecord {
        info: SnapshotInfo {
            id: format!("recovered-{}", &manifest.root.hex()[..16]),
            tenant: RECOVERED_TENANT.into(),
            agent: RECOVERED_AGENT.into(),
            created_at_ms: at_ms,
            label: Some("recovered".into()),
            created_by: "memsnap repair".into(),
            parent: None,
            git: None,
            schema_versions,
            memdir: String::new(),
            sqlite_dir: String::new(),
            state_dir: String::new(),
            absent,
            artifacts: entries.len() as u64,
            logical_bytes: entries.iter().map(|e| e.size).sum(),
            stats: SnapshotStats::default(),
        },
        manifest,
    }
}

/// Walks every snapshot against the new index: which are whole, which need missing chunks.
fn assess(
    index: &Index,
    packs_dir: &Path,
    snapshots: &[(String, Vec<u8>)],
    report: &mut RepairReport,
) -> Result<(), Error> {
    let mut reader = ChunkReader::new(index, packs_dir.to_path_buf())?;
    let mut records: Vec<SnapshotRecord> = Vec::new();
    for (key, bytes) in snapshots {
        match decode_record::<SnapshotRecord>(SNAPSHOT_VERSION, bytes, key) {
            Ok(r) => records.push(r),
            Err(e) => report.damaged_snapshots.push(SnapshotDamage {
                snapshot: key.clone(),
                missing_chunks: 0,
                artifacts: vec![format!("record: {e}")],
            }),
        }
    }
    records.sort_by(|a, b| {
        (a.info.created_at_ms, &a.info.id).cmp(&(b.info.created_at_ms, &b.info.id))
    });
    for r in &records {
        let mut missing: HashSet<ChunkId> = HashSet::new();
        let mut artifacts = Vec::new();
        match super::load_entries(&mut reader, r) {
            Err(_) => {
                tree::walk(&mut reader, &r.manifest, true, &mut |id, _, res| {
                    if res.is_err() {
                        missing.insert(*id);
                    }
                    Ok(())
                })?;
                artifacts.push("manifest".to_owned());
            }
            Ok(entries) => {
                for e in &entries {
                    let Some(content) = &e.content else { continue };
                    let mut data = Vec::new();
                    let mut bad = false;
                    tree::walk(&mut reader, content, false, &mut |id, is_data, res| {
                        if res.is_err() {
                            missing.insert(*id);
                            bad = true;
                        } else if is_data {
                            data.push(*id);
                        }
                        Ok(())
                    })?;
                    for id in data {
                        if reader.locate(&id)?.is_none() {
                            missing.insert(id);
                            bad = true;
                        }
                    }
                    if bad {
                        artifacts.push(format!("{}/{}", e.part.name(), e.path_lossy()));
                    }
                }
            }
        }
        if artifacts.is_empty() {
            report.intact_snapshots.push(r.info.id.clone());
        } else {
            report.damaged_snapshots.push(SnapshotDamage {
                snapshot: r.info.id.clone(),
                missing_chunks: missing.len() as u64,
                artifacts,
            });
        }
    }
    Ok(())
}
