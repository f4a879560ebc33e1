//! Taking a snapshot: read every artifact once, store the chunks the store lacks, commit the
//! snapshot record in one index transaction (store-format.md, "Write ordering").

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use redb::{ReadableTable, ReadableTableMetadata};

use super::Progress;
use crate::error::{Error, StoreError};
use crate::lock::Mode;
use crate::manifest::agent::{AGENT_VERSION, AgentRecord};
use crate::manifest::artifact::{self, ArtifactEntry, EntryKind, Part};
use crate::manifest::file_stats::{
    AgentFileStats, FILE_STATS_VERSION, FileStat, StatRow, WalStat, agent_key_prefix, row_key,
};
use crate::manifest::snapshot::{SNAPSHOT_VERSION, SnapshotInfo, SnapshotRecord, SnapshotStats};
use crate::names::AgentId;
use crate::source::state::{FsStateProvider, StateProvider};
use crate::source::{SourceSpec, git, memdir, sqlite};
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::config::StoreConfig;
use crate::store::filter::{FilterBuilder, KnownFilter};
use crate::store::index::{self, AGENTS, CHUNKS, FILE_STATS, SNAPSHOTS};
use crate::store::writer::{Batch, ChunkWriter, InFlight, Pending};
use crate::tree::{ContentRef, TreeBuilder};

/// Chunks handed to the hashing/compression pool at a time.
const BATCH_BYTES: usize = 4 << 20;

/// A batch buffer's size: a batch, and room for the chunk that takes it past [`BATCH_BYTES`].
const BATCH_CAPACITY: usize = BATCH_BYTES + (64 << 10);

/// What to snapshot.
#[derive(Clone)]
#[non_exhaustive]
pub struct SnapshotRequest {
    pub agent: AgentId,
    /// Where the memory lives; `None` uses what the store remembers for the agent.
    pub sources: Option<SourceSpec>,
    pub label: Option<String>,
    pub created_by: Option<String>,
    /// State capture; `None` reads `*.json` in the state folder.
    pub state: Option<Arc<dyn StateProvider>>,
}

impl SnapshotRequest {
    pub fn new(agent: AgentId) -> Self {
        Self {
            agent,
            sources: None,
            label: None,
            created_by: None,
            state: None,
        }
    }

    pub fn sources(mut self, sources: SourceSpec) -> Self {
        self.sources = Some(sources);
        self
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn created_by(mut self, who: impl Into<String>) -> Self {
        self.created_by = Some(who.into());
        self
    }

    pub fn state_provider(mut self, p: Arc<dyn StateProvider>) -> Self {
        self.state = Some(p);
        self
    }
}

/// Takes a snapshot, holding the agent lock.
pub(crate) fn snapshot(
    store: &Store,
    req: &SnapshotRequest,
    progress: &dyn Progress,
) -> Result<SnapshotInfo, Error> {
    let _agent = store.lock_agent(&req.agent)?;
    super::restore::recover(store, &req.agent)?;
    snapshot_locked(store, req, progress)
}

/// Takes a snapshot; the caller holds the agent lock.
pub(crate) fn snapshot_locked(
    store: &Store,
    req: &SnapshotRequest,
    progress: &dyn Progress,
) -> Result<SnapshotInfo, Error> {
    let _store_lock = store.lock_store(Mode::Shared)?;
    let sources = resolve_sources(store, req)?;
    sources.check_disjoint(store.root())?;
    let mut excluded = HashSet::new();
    // A filter hit that the index does not confirm (a filter collision) is retried with
    // that id excluded; the data of the failed attempt is unreferenced and pruned later.
    for _ in 0..3 {
        match attempt(store, req, &sources, &excluded, progress)? {
            Attempt::Done(info) => return Ok(*info),
            Attempt::Retry(missing) => excluded.extend(missing),
        }
    }
    // Three different prefix collisions in a row cannot happen by chance: something else is
    // deleting chunks without taking the store lock.
    Err(StoreError::Index {
        path: store.root().join(crate::store::INDEX_FILE),
        message: "chunks the snapshot relies on kept disappearing from the index while it \
                  committed: is another program deleting chunks without memsnap's store lock?"
            .into(),
    }
    .into())
}

fn resolve_sources(store: &Store, req: &SnapshotRequest) -> Result<SourceSpec, Error> {
    if let Some(s) = &req.sources {
        return Ok(s.resolve(&req.agent));
    }
    match super::load_agent(store, &req.agent)? {
        Some(rec) => Ok(rec.into()),
        None => Err(Error::NoSource {
            agent: req.agent.to_string(),
        }),
    }
}

/// The writer's filter of every stored chunk, less `excluded` (store-format.md, "Write
/// ordering", step 1).
pub(crate) fn known_filter(
    store: &Store,
    excluded: &HashSet<ChunkId>,
) -> Result<KnownFilter, Error> {
    let index = store.index_for_reading()?;
    let tx = index.begin_read()?;
    known_filter_in(&index, &tx, excluded)
}

fn known_filter_in(
    index: &crate::store::index::Index,
    tx: &redb::ReadTransaction,
    excluded: &HashSet<ChunkId>,
) -> Result<KnownFilter, Error> {
    let chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
    let n = chunks.len().map_err(|e| index.err()(e.into()))? as usize;
    let mut filter = FilterBuilder::new(n, excluded.clone());
    for item in index.walk_chunks(&chunks)? {
        let (k, _) = item.map_err(|e| index.err()(e.into()))?;
        if !filter.push(ChunkId(*k.value()).prefix()) {
            return Err(StoreError::Index {
                path: index.path.clone(),
                message: "its chunk table is not in key order; `memsnap repair` rebuilds it".into(),
            }
            .into());
        }
    }
    Ok(filter.finish())
}

enum Attempt {
    Done(Box<SnapshotInfo>),
    Retry(Vec<ChunkId>),
}

fn attempt(
    store: &Store,
    req: &SnapshotRequest,
    sources: &SourceSpec,
    excluded: &HashSet<ChunkId>,
    progress: &dyn Progress,
) -> Result<Attempt, Error> {
    let started = Instant::now();
    // Before anything is listed: a file changed after this instant is never taken as unchanged.
    let listed_at_ns = now_ns();
    let (known, parent, cache) = {
        let index = store.index_for_reading()?;
        let tx = index.begin_read()?;
        let parent = super::latest_of(&index, &tx, &req.agent)?.map(|r| r.info.id);
        let known = known_filter_in(&index, &tx, excluded)?;
        (known, parent, load_file_stats(&index, &tx, &req.agent))
    };
    let mut detect = Detect {
        cache,
        listed_at_ns,
        excluded,
        rows: Vec::new(),
    };

    let state: Arc<dyn StateProvider> = match &req.state {
        Some(p) => p.clone(),
        None => Arc::new(FsStateProvider::new(&sources.state_dir)),
    };
    let mut absent = Vec::new();
    let memdir_items = if sources.memdir.is_dir() {
        memdir::walk(&sources.memdir, memdir::Pass::AllButObjects)?
    } else {
        absent.push(Part::Memdir.name().to_owned());
        Vec::new()
    };
    let databases = if sources.sqlite_dir.is_dir() {
        sqlite::list_databases(&sources.sqlite_dir)?
    } else {
        absent.push(Part::Sqlite.name().to_owned());
        Vec::new()
    };
    let state_items = state.capture()?;
    if req.state.is_none() && !sources.state_dir.is_dir() {
        absent.push(Part::State.name().to_owned());
    }
    if memdir_items.is_empty() && databases.is_empty() && state_items.is_empty() {
        return Err(Error::NoMemory {
            agent: req.agent.to_string(),
            looked_at: format!(
                "{}, {}, {}",
                sources.memdir.display(),
                sources.sqlite_dir.display(),
                state.describe()
            ),
        });
    }
    let total: u64 = memdir_items.iter().map(|i| i.size).sum::<u64>()
        + databases
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum::<u64>()
        + state_items.iter().map(|s| s.json.len() as u64).sum::<u64>();
    progress.start("snapshot", total);

    let config = &store.config;
    let mut w = store.writer(known);
    let mut entries = Vec::new();
    let mut schema_versions = BTreeMap::new();
    let mut bytes_read = 0u64;

    bytes_read += store_memdir(
        &mut w,
        config,
        &memdir_items,
        &mut entries,
        &mut detect,
        progress,
    )?;
    // Objects last: see memdir::Pass. A repack while they are read (git gc) deletes listed
    // files and adds new packs, so list again until a listing brings nothing new.
    if sources.memdir.is_dir() {
        let mut listed: HashSet<Vec<u8>> = HashSet::new();
        for _ in 0..8 {
            let fresh: Vec<memdir::Item> = memdir::walk(&sources.memdir, memdir::Pass::Objects)?
                .into_iter()
                .filter(|i| !listed.contains(&i.rel))
                .collect();
            if fresh.is_empty() {
                break;
            }
            listed.extend(fresh.iter().map(|i| i.rel.clone()));
            bytes_read +=
                store_memdir(&mut w, config, &fresh, &mut entries, &mut detect, progress)?;
        }
    }

    for (name, path) in &databases {
        // A confirmation session found a filter hit missing: this attempt cannot commit, so it
        // stops before reading more (the databases are most of an agent).
        let missing = w.take_missing();
        if !missing.is_empty() {
            tracing::warn!(
                count = missing.len(),
                "chunk prefix collision found while reading; retrying the snapshot"
            );
            return Ok(Attempt::Retry(missing));
        }
        let meta_fs = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let stat = FileStat::of(&meta_fs);
        let with_suffix = |suffix: &str| {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            std::path::PathBuf::from(p)
        };
        let wal_path = with_suffix("-wal");
        let wal = WalStat::read(&wal_path).map_err(|e| Error::io(&wal_path, e))?;
        // A rollback journal beside the file: a transaction is under way or must be rolled
        // back; the file's bytes alone do not say what is committed.
        let journal = with_suffix("-journal").exists();
        if !journal
            && let Some(row) =
                detect.unchanged(&mut w, Part::Sqlite, name.as_bytes(), &stat, wal)?
        {
            if let EntryKind::Sqlite { user_version, .. } = row.entry.kind {
                schema_versions.insert(db_stem(name).to_owned(), user_version);
            }
            entries.push(row.entry.clone());
            detect.rows.push(row);
            continue;
        }
        let (content, hash, meta) = store_database(&mut w, config, store, path, progress)?;
        bytes_read += content.size;
        schema_versions.insert(db_stem(name).to_owned(), meta.user_version);
        let entry = ArtifactEntry {
            part: Part::Sqlite,
            path: name.as_bytes().to_vec(),
            kind: EntryKind::Sqlite {
                page_size: meta.page_size,
                user_version: meta.user_version,
                wal: meta.wal,
            },
            mode: std::os::unix::fs::PermissionsExt::mode(&meta_fs.permissions()) & 0o7777,
            mtime_ns: 0,
            size: content.size,
            hash,
            content: Some(content),
        };
        let racy = stat.racy(listed_at_ns) || wal.is_some_and(|w| w.racy(listed_at_ns));
        if !journal && !racy {
            detect.rows.push(StatRow {
                stat,
                wal,
                entry: entry.clone(),
            });
        }
        entries.push(entry);
    }

    for item in &state_items {
        let p = sources.state_dir.join(&item.name);
        let (content, hash, size) = store_stream(
            &mut w,
            config,
            std::io::Cursor::new(&item.json),
            &p,
            progress,
        )?;
        bytes_read += size;
        entries.push(ArtifactEntry {
            part: Part::State,
            path: item.name.as_bytes().to_vec(),
            kind: EntryKind::File,
            mode: item.mode.unwrap_or(0),
            mtime_ns: 0,
            size,
            hash,
            content: Some(content),
        });
    }

    let git_meta = if sources.memdir.is_dir() {
        match git::head_meta(&sources.memdir) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{e}; the snapshot records no git metadata");
                None
            }
        }
    } else {
        None
    };

    entries.sort_by(|a, b| (a.part, &a.path).cmp(&(b.part, &b.path)));
    let logical_bytes = entries.iter().map(|e| e.size).sum();
    let encoded = artifact::encode_entries(&entries)?;
    let manifest_path = store.root().join("<manifest>");
    let (manifest, _, _) = store_stream(
        &mut w,
        config,
        std::io::Cursor::new(&encoded),
        &manifest_path,
        &super::NoProgress,
    )?;
    crate::failpoint::hit("snapshot:before-pack-sync")?;
    let pending = w.finish()?;
    crate::failpoint::hit("snapshot:before-commit")?;

    let info = SnapshotInfo {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: req.agent.tenant().to_owned(),
        agent: req.agent.agent().to_owned(),
        created_at_ms: crate::now_ms(),
        label: req.label.clone(),
        created_by: req
            .created_by
            .clone()
            .unwrap_or_else(|| "memsnap".to_owned()),
        parent,
        git: git_meta,
        schema_versions,
        memdir: sources.memdir.display().to_string(),
        sqlite_dir: sources.sqlite_dir.display().to_string(),
        state_dir: sources.state_dir.display().to_string(),
        absent,
        artifacts: entries.len() as u64,
        logical_bytes,
        stats: SnapshotStats {
            bytes_read,
            chunks: pending.stats.chunks,
            new_chunks: pending.stats.new_chunks,
            new_raw_bytes: pending.stats.new_raw_bytes,
            new_stored_bytes: pending.stats.new_stored_bytes,
            duration_ms: started.elapsed().as_millis() as u64,
        },
    };
    let record = SnapshotRecord { info, manifest };

    let agent_rec = AgentRecord::from(sources);
    let mut stats = AgentFileStats { rows: detect.rows };
    stats
        .rows
        .sort_by(|a, b| (a.entry.part, &a.entry.path).cmp(&(b.entry.part, &b.entry.path)));
    let live = Live {
        agent: &req.agent,
        record: &agent_rec,
        file_stats: &stats,
        previous: &detect.cache,
    };
    match commit(store, &pending, &record, Some(live))? {
        Commit::Done => {}
        Commit::Missing(missing) => return Ok(Attempt::Retry(missing)),
        Commit::Exists(_) => {
            drop(pending);
            return Err(StoreError::Index {
                path: store.root().join(crate::store::INDEX_FILE),
                message: format!(
                    "a snapshot with the new id {} already exists",
                    record.info.id
                ),
            }
            .into());
        }
    }
    progress.finish();
    Ok(Attempt::Done(Box::new(record.info)))
}

/// What a snapshot of live sources commits besides its record: the agent's locations and its
/// change-detection rows.
pub(crate) struct Live<'a> {
    pub agent: &'a AgentId,
    pub record: &'a AgentRecord,
    pub file_stats: &'a AgentFileStats,
    /// The rows loaded when the snapshot began (the agent lock keeps them current).
    pub previous: &'a AgentFileStats,
}

/// Change detection for one snapshot attempt (see manifest::file_stats).
struct Detect<'a> {
    /// The agent's rows from its last snapshot.
    cache: AgentFileStats,
    listed_at_ns: i64,
    /// Ids a failed commit proved absent: a row whose content root is one is not reused.
    excluded: &'a HashSet<ChunkId>,
    /// The rows this snapshot commits.
    rows: Vec<StatRow>,
}

impl Detect<'_> {
    /// The last snapshot's row for an unchanged file, its content registered with `w` to be
    /// confirmed like a filter hit (prune may have deleted it since).
    fn unchanged(
        &self,
        w: &mut ChunkWriter,
        part: Part,
        path: &[u8],
        stat: &FileStat,
        wal: Option<WalStat>,
    ) -> Result<Option<StatRow>, StoreError> {
        if stat.racy(self.listed_at_ns) || wal.is_some_and(|w| w.racy(self.listed_at_ns)) {
            return Ok(None);
        }
        let Some(row) = self.cache.unchanged(part, path, stat, wal.as_ref()) else {
            return Ok(None);
        };
        let Some(content) = row.entry.content.as_ref() else {
            return Ok(None);
        };
        if self.excluded.contains(&content.root) {
            return Ok(None);
        }
        w.reuse(content)?;
        Ok(Some(row.clone()))
    }
}

/// The agent's change-detection rows; none if the store has no such table (format 2 and
/// older) or the record cannot be read: the cache only ever saves reading.
fn load_file_stats(
    index: &crate::store::index::Index,
    tx: &redb::ReadTransaction,
    agent: &AgentId,
) -> AgentFileStats {
    let read = || -> Result<AgentFileStats, StoreError> {
        let table = match tx.open_table(FILE_STATS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(AgentFileStats::default()),
            Err(e) => return Err(index.err()(e.into())),
        };
        let start = agent_key_prefix(&agent.key());
        let mut end = start.clone();
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        let mut rows = Vec::new();
        for item in table
            .range(start.as_slice()..end.as_slice())
            .map_err(|e| index.err()(e.into()))?
        {
            let (_, v) = item.map_err(|e| index.err()(e.into()))?;
            rows.push(index::decode_record(
                FILE_STATS_VERSION,
                v.value(),
                "file stats row",
            )?);
        }
        Ok(AgentFileStats { rows })
    };
    match read() {
        Ok(stats) => stats,
        Err(e) => {
            tracing::warn!("{e}; every file is read in full");
            AgentFileStats::default()
        }
    }
}

/// Writes the rows of `new` that differ from `old` and removes those `new` lacks: an unchanged
/// agent writes nothing.
fn write_file_stats(
    index: &crate::store::index::Index,
    tx: &redb::WriteTransaction,
    agent: &AgentId,
    old: &AgentFileStats,
    new: &AgentFileStats,
) -> Result<(), Error> {
    let key = agent.key();
    let mut table = tx
        .open_table(FILE_STATS)
        .map_err(|e| index.err()(e.into()))?;
    let same = |r: &StatRow| {
        old.rows
            .binary_search_by(|o| {
                (o.entry.part, o.entry.path.as_slice())
                    .cmp(&(r.entry.part, r.entry.path.as_slice()))
            })
            .is_ok_and(|i| old.rows[i] == *r)
    };
    for row in &new.rows {
        if !same(row) {
            let bytes = index::encode_record(FILE_STATS_VERSION, row, "file stats row")?;
            table
                .insert(
                    row_key(&key, row.entry.part, &row.entry.path).as_slice(),
                    bytes.as_slice(),
                )
                .map_err(|e| index.err()(e.into()))?;
        }
    }
    for row in &old.rows {
        let kept = new
            .rows
            .binary_search_by(|n| {
                (n.entry.part, n.entry.path.as_slice())
                    .cmp(&(row.entry.part, row.entry.path.as_slice()))
            })
            .is_ok();
        if !kept {
            table
                .remove(row_key(&key, row.entry.part, &row.entry.path).as_slice())
                .map_err(|e| index.err()(e.into()))?;
        }
    }
    Ok(())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn db_stem(name: &str) -> &str {
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

pub(crate) enum Commit {
    Done,
    /// Filter hits the index does not hold (prefix collisions): redo with these excluded.
    Missing(Vec<ChunkId>),
    /// A snapshot with this id is already committed; nothing was written.
    Exists(Box<SnapshotRecord>),
}

/// Commits a written snapshot in one index transaction: its new chunks, packs, record and (for
/// a snapshot of live sources) the agent record. Store-format.md, "Write ordering": the packs in
/// `pending` are durable before this runs.
pub(crate) fn commit(
    store: &Store,
    pending: &Pending,
    record: &SnapshotRecord,
    live: Option<Live<'_>>,
) -> Result<Commit, Error> {
    let index = store.index()?;
    let tx = index.begin_write()?;
    {
        let snaps = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| index.err()(e.into()))?;
        let existing = snaps
            .get(record.info.id.as_str())
            .map_err(|e| index.err()(e.into()))?
            .map(|g| {
                index::decode_record::<SnapshotRecord>(
                    SNAPSHOT_VERSION,
                    g.value(),
                    &format!("snapshot record {}", record.info.id),
                )
            })
            .transpose()?;
        if let Some(existing) = existing {
            drop(snaps);
            tx.abort().map_err(|e| index.err()(e.into()))?;
            return Ok(Commit::Exists(Box::new(existing)));
        }
    }
    {
        let chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
        let missing = pending.unconfirmed(&index, &chunks)?;
        if !missing.is_empty() {
            drop(chunks);
            tx.abort().map_err(|e| index.err()(e.into()))?;
            tracing::warn!(
                count = missing.len(),
                "chunk prefix collision; retrying the snapshot"
            );
            return Ok(Commit::Missing(missing));
        }
        drop(chunks);
        crate::store::writer::insert_chunks(&index, &tx, pending.entries()?)?;
        crate::store::writer::insert_packs(&index, &tx, &pending.packs)?;
        let mut snaps = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| index.err()(e.into()))?;
        let bytes = index::encode_record(SNAPSHOT_VERSION, record, "snapshot record")?;
        snaps
            .insert(record.info.id.as_str(), bytes.as_slice())
            .map_err(|e| index.err()(e.into()))?;
        if let Some(live) = live {
            let key = live.agent.key();
            let mut agents = tx.open_table(AGENTS).map_err(|e| index.err()(e.into()))?;
            let agent_rec = index::encode_record(
                AGENT_VERSION,
                live.record,
                "agent record: its paths must be UTF-8",
            )?;
            agents
                .insert(key.as_str(), agent_rec.as_slice())
                .map_err(|e| index.err()(e.into()))?;
            write_file_stats(&index, &tx, live.agent, live.previous, live.file_stats)?;
            crate::store::raise_format(&index, &tx)?;
        }
    }
    pending.keep();
    if let Err(e) = tx.commit() {
        let message = e.to_string();
        let path = index.path.clone();
        let e = index.err()(e.into());
        drop(index);
        let id = record.info.id.as_str();
        match super::commit_visible(store, |tx| Ok(tx.open_table(SNAPSHOTS)?.get(id)?.is_some())) {
            Some(true) => {
                return Err(StoreError::CommitNotDurable {
                    path,
                    id: id.to_owned(),
                    message,
                }
                .into());
            }
            Some(false) => pending.unkeep(),
            // Unknown: the packs stay (garbage for prune if the commit did not happen).
            None => {}
        }
        return Err(e.into());
    }
    Ok(Commit::Done)
}

/// Stores memdir items; returns the bytes read. A file that vanished since the listing (the
/// agent deleted it meanwhile) is left out: the snapshot then shows it deleted.
fn store_memdir(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    items: &[memdir::Item],
    entries: &mut Vec<ArtifactEntry>,
    detect: &mut Detect<'_>,
    progress: &dyn Progress,
) -> Result<u64, Error> {
    let mut bytes_read = 0;
    for item in items {
        let (kind, content, hash, size) = match &item.kind {
            memdir::ItemKind::Dir => (EntryKind::Dir, None, [0u8; 32], 0),
            memdir::ItemKind::Symlink(t) => {
                (EntryKind::Symlink { target: t.clone() }, None, [0u8; 32], 0)
            }
            memdir::ItemKind::File => {
                if let Some(row) = detect.unchanged(w, Part::Memdir, &item.rel, &item.stat, None)? {
                    entries.push(row.entry.clone());
                    detect.rows.push(row);
                    continue;
                }
                let f = match std::fs::File::open(&item.abs) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tracing::debug!(path = %item.abs.display(), "deleted during the snapshot");
                        continue;
                    }
                    Err(e) => return Err(Error::io(&item.abs, e)),
                };
                let (content, hash, size) =
                    store_file(w, config, f, item.size, &item.abs, progress)?;
                bytes_read += size;
                (EntryKind::File, Some(content), hash, size)
            }
        };
        let entry = ArtifactEntry {
            part: Part::Memdir,
            path: item.rel.clone(),
            kind,
            mode: item.mode,
            mtime_ns: item.mtime_ns,
            size,
            hash,
            content,
        };
        // Only what was read in full, and only if what was read is what was listed.
        if entry.content.is_some() && size == item.size && !item.stat.racy(detect.listed_at_ns) {
            detect.rows.push(StatRow {
                stat: item.stat,
                wal: None,
                entry: entry.clone(),
            });
        }
        entries.push(entry);
    }
    Ok(bytes_read)
}

/// The producer side of [`ingest`]: takes the chunks of one content in order, hashes the whole
/// content and hands them on in batches.
pub(crate) struct Emit<'s> {
    size: u64,
    batch: Batch,
    sink: &'s mut dyn FnMut(Batch) -> Result<(), Error>,
    /// Batches the store side is done with, whose buffers the next ones reuse: a content's
    /// batches then cycle through the few buffers the pipeline holds at once, instead of each
    /// faulting in ~1,000 fresh pages (most of a day snapshot's page faults, on the reading
    /// thread). The number of buffers is bounded by what the pipeline holds.
    spares: Receiver<Batch>,
}

impl Emit<'_> {
    /// Adds one whole chunk.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.batch.push(chunk);
        self.full()
    }

    /// Appends to the open chunk, which [`Emit::cut`] ends.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.batch.extend(bytes);
    }

    pub(crate) fn open_len(&self) -> usize {
        self.batch.open_len()
    }

    pub(crate) fn cut(&mut self) -> Result<(), Error> {
        self.batch.cut();
        self.full()
    }

    fn full(&mut self) -> Result<(), Error> {
        if self.batch.bytes().len() >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let next = self
            .spares
            .try_recv()
            .unwrap_or_else(|_| Batch::with_capacity(BATCH_CAPACITY));
        let batch = self.batch.split_open_into(next);
        self.size += batch.bytes().len() as u64;
        (self.sink)(batch)
    }
}

/// Runs `produce` with an [`Emit`] feeding `sink`; returns the content's length and what
/// `produce` returned. A chunk `produce` left open is cut.
fn run_producer<T>(
    sink: &mut dyn FnMut(Batch) -> Result<(), Error>,
    spares: Receiver<Batch>,
    produce: impl FnOnce(&mut Emit<'_>) -> Result<T, Error>,
) -> Result<(u64, T), Error> {
    let mut emit = Emit {
        size: 0,
        batch: Batch::with_capacity(BATCH_CAPACITY),
        sink,
        spares,
    };
    let out = produce(&mut emit)?;
    if emit.open_len() > 0 {
        emit.batch.cut();
    }
    emit.send()?;
    Ok((emit.size, out))
}

/// Batches being hashed and compressed while the store side appends earlier ones.
const IN_FLIGHT: usize = 2;

/// The store side of an ingest: stores batches of chunks, one batch behind the pool that hashes
/// and compresses them, and builds the content tree.
struct Consumer<'p> {
    tree: TreeBuilder,
    /// BLAKE3 of the whole content, here rather than on the reading thread, which is the
    /// pipeline's slowest stage (whole batches: ~4 GB/s, against ~1 GB/s fed page by page).
    hasher: blake3::Hasher,
    /// Started batches, oldest first: up to [`IN_FLIGHT`], so the pool has work queued while
    /// this thread appends.
    in_flight: std::collections::VecDeque<InFlight>,
    /// Stored batches go back to the producer ([`Emit`]'s `spares`); gone once it finished.
    spares: Sender<Batch>,
    progress: &'p dyn Progress,
}

impl<'p> Consumer<'p> {
    /// The consumer, and the end of its spare batches for the producer.
    fn new(config: &StoreConfig, progress: &'p dyn Progress) -> (Self, Receiver<Batch>) {
        let (spares, rx) = std::sync::mpsc::channel();
        let consumer = Self {
            tree: TreeBuilder::new(config.tree_fanout, config.tree_max_entries),
            hasher: blake3::Hasher::new(),
            in_flight: std::collections::VecDeque::new(),
            spares,
            progress,
        };
        (consumer, rx)
    }

    fn store(&mut self, w: &mut ChunkWriter, batch: Batch) -> Result<(), Error> {
        self.progress.advance(batch.bytes().len() as u64);
        self.hasher.update(batch.bytes());
        self.in_flight.push_back(w.start(batch));
        while self.in_flight.len() > IN_FLIGHT {
            if let Some(job) = self.in_flight.pop_front() {
                self.complete(w, job)?;
            }
        }
        Ok(())
    }

    fn complete(&mut self, w: &mut ChunkWriter, job: InFlight) -> Result<(), Error> {
        let (puts, batch) = w.complete_keep(job, 0)?;
        // A producer that finished takes no more.
        let _ = self.spares.send(batch);
        for put in puts {
            self.tree.push(w, put)?;
        }
        Ok(())
    }

    /// The content tree and the content's BLAKE3.
    fn finish(mut self, w: &mut ChunkWriter, size: u64) -> Result<(ContentRef, [u8; 32]), Error> {
        while let Some(job) = self.in_flight.pop_front() {
            self.complete(w, job)?;
        }
        // Empty content is one empty chunk, so that every content has a root.
        if size == 0 {
            let mut empty = Batch::default();
            empty.cut();
            let job = w.start(empty);
            self.complete(w, job)?;
        }
        let hash = *self.hasher.finalize().as_bytes();
        Ok((self.tree.finish(w)?, hash))
    }
}

/// Stores one content (file, database, state, manifest) as a content tree, `produce` emitting
/// its chunks: the one path by which every artifact enters the store.
fn ingest<T>(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    progress: &dyn Progress,
    produce: impl FnOnce(&mut Emit<'_>) -> Result<T, Error>,
) -> Result<(ContentRef, [u8; 32], u64, T), Error> {
    let (mut consumer, spares) = Consumer::new(config, progress);
    let (size, out) = {
        let mut sink = |batch| consumer.store(w, batch);
        let sink = &mut sink as &mut dyn FnMut(Batch) -> Result<(), Error>;
        run_producer(sink, spares, produce)?
    };
    let (content, hash) = consumer.finish(w, size)?;
    Ok((content, hash, size, out))
}

/// [`ingest`] with `produce` on a thread of its own, one batch ahead (bounded), so that reading
/// and whole-content hashing overlap with chunk hashing, compression and pack writes.
fn ingest_threaded<T: Send>(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    progress: &dyn Progress,
    produce: impl FnOnce(&mut Emit<'_>) -> Result<T, Error> + Send,
) -> Result<(ContentRef, [u8; 32], u64, T), Error> {
    let (mut consumer, spares) = Consumer::new(config, progress);
    let (size, out) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
        let producer = scope.spawn(move || {
            // A failed send means the store side stopped on an error of its own, which is the
            // one reported.
            let mut sink = move |batch| {
                tx.send(batch)
                    .map_err(|_| Error::FailPoint("ingest: the store side stopped".into()))
            };
            run_producer(&mut sink, spares, produce)
        });
        let mut stored = Ok(());
        while let Ok(batch) = rx.recv() {
            stored = consumer.store(w, batch);
            if stored.is_err() {
                break;
            }
        }
        drop(rx);
        let produced = match producer.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        stored.and(produced)
    })?;
    let (content, hash) = consumer.finish(w, size)?;
    Ok((content, hash, size, out))
}

/// Chunks a byte stream with FastCDC and stores it as a content tree.
pub(crate) fn store_stream(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    reader: impl Read,
    path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<(ContentRef, [u8; 32], u64), Error> {
    let (content, hash, size, ()) =
        ingest(w, config, progress, |emit| cdc(reader, config, path, emit))?;
    Ok((content, hash, size))
}

/// Files at least this large are read on a thread of their own ([`ingest_threaded`]); below it
/// a thread costs more than the overlap saves.
const THREADED_BYTES: u64 = 1 << 20;

/// Stores a file of `size` bytes (as listed; it may change while read) like [`store_stream`].
fn store_file(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    file: std::fs::File,
    size: u64,
    path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<(ContentRef, [u8; 32], u64), Error> {
    let produce = |emit: &mut Emit<'_>| cdc(file, config, path, emit);
    let (content, hash, size, ()) = if size >= THREADED_BYTES {
        ingest_threaded(w, config, progress, produce)?
    } else {
        ingest(w, config, progress, produce)?
    };
    Ok((content, hash, size))
}

fn cdc(
    reader: impl Read,
    config: &StoreConfig,
    path: &std::path::Path,
    emit: &mut Emit<'_>,
) -> Result<(), Error> {
    for chunk in crate::chunk::file_chunker(reader, config) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => Error::io(path, io),
            other => Error::io(path, std::io::Error::other(other.to_string())),
        })?;
        emit.push(&chunk.data)?;
    }
    Ok(())
}

/// Stores a database image read as a byte stream (an imported bundle's) exactly as a snapshot of
/// the live database would: the same page-aligned chunks, so an import deduplicates.
pub(crate) fn store_pages(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    mut reader: impl Read,
    page_size: u32,
    path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<(ContentRef, [u8; 32], u64), Error> {
    let len = crate::chunk::sqlite_chunk_len(page_size, config);
    let (content, hash, size, ()) = ingest(w, config, progress, |emit| {
        let mut buf = vec![0u8; len];
        loop {
            let n =
                crate::fsutil::read_full(&mut reader, &mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            emit.push(&buf[..n])?;
            if n < len {
                break;
            }
        }
        Ok(())
    })?;
    Ok((content, hash, size))
}

/// Stores a database page-aligned: each chunk is one page, or as many whole pages as make
/// `sqlite_min_chunk` bytes, so a changed page dirties only its own chunk.
fn store_database(
    w: &mut ChunkWriter,
    config: &StoreConfig,
    store: &Store,
    path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<(ContentRef, [u8; 32], sqlite::DbMeta), Error> {
    let (busy, tmp) = (store.lock_timeout, store.tmp_dir());
    let (content, hash, _, meta) = ingest_threaded(w, config, progress, |emit| {
        let mut on_page = |meta: &sqlite::DbMeta, page: &[u8]| -> Result<(), Error> {
            emit.extend(page);
            if emit.open_len() >= crate::chunk::sqlite_chunk_len(meta.page_size, config) {
                emit.cut()?;
            }
            Ok(())
        };
        // A chunk of fewer pages than a full one (the database's tail) is cut by run_producer.
        sqlite::read_pages(path, busy, &tmp, &mut on_page)
    })?;
    Ok((content, hash, meta))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::ops::NoProgress;
    use crate::store::pack::ChunkLoc;
    use crate::store::reader::PackFiles;

    /// Small chunks and narrow trees, so that a few KiB already make tall trees.
    fn small_config(fanout: u32, max_entries: u32) -> StoreConfig {
        let mut c = StoreConfig::new_default(0);
        (c.cdc_min, c.cdc_avg, c.cdc_max) = (64, 256, 1024);
        (c.tree_fanout, c.tree_max_entries) = (fanout, max_entries);
        c
    }

    /// xorshift bytes, made compressible (four letters) when `text` is set, so that both the
    /// raw and the zstd way of storing a chunk are taken.
    fn sample(len: usize, mut s: u64, text: bool) -> Vec<u8> {
        s |= 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if text { b'a' + (s % 4) as u8 } else { s as u8 }
            })
            .collect()
    }

    /// The data chunks under `id`, read back from the writer's packs (no index), in order.
    fn read_back(
        packs: &PackFiles,
        locs: &HashMap<ChunkId, ChunkLoc>,
        id: &ChunkId,
        height: u8,
        out: &mut Vec<Vec<u8>>,
    ) {
        let bytes = packs.read(id, &locs[id]).expect("chunk reads back");
        if height == 0 {
            out.push(bytes);
            return;
        }
        for (child, _) in crate::tree::decode_node(&bytes, height).expect("node decodes") {
            read_back(packs, locs, &child, height - 1, out);
        }
    }

    /// Stores `data` with `store` and returns its content reference, hash, length and chunks.
    fn round_trip(
        config: &StoreConfig,
        store: impl FnOnce(&mut ChunkWriter) -> Result<(ContentRef, [u8; 32], u64), Error>,
    ) -> (ContentRef, [u8; 32], u64, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = ChunkWriter::new(
            &crate::storage::Fs::default(),
            dir.path().to_path_buf(),
            config,
            KnownFilter::default(),
        );
        let (content, hash, size) = store(&mut w).expect("store");
        let pending = w.finish().expect("packs");
        let packs = PackFiles::new(&crate::storage::Fs::default(), dir.path().to_path_buf());
        let mut chunks = Vec::new();
        read_back(
            &packs,
            &pending.new_chunks,
            &content.root,
            content.height,
            &mut chunks,
        );
        (content, hash, size, chunks)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// A file stored as a content tree reads back as the same bytes, and the hash taken
        /// while streaming (chunk by chunk, in batches) is the one-shot BLAKE3 of the whole.
        #[test]
        fn stored_stream_reads_back_and_hashes_like_one_shot(
            len in 0usize..60_000,
            seed: u64,
            text: bool,
            fanout in 2u32..8,
            max_entries in 2u32..10,
        ) {
            let data = sample(len, seed, text);
            let config = small_config(fanout, max_entries);
            let (content, hash, size, chunks) = round_trip(&config, |w| {
                store_stream(w, &config, data.as_slice(), Path::new("x"), &NoProgress)
            });
            proptest::prop_assert_eq!(size, len as u64);
            proptest::prop_assert_eq!(content.size, len as u64);
            proptest::prop_assert_eq!(hash, *blake3::hash(&data).as_bytes());
            proptest::prop_assert_eq!(chunks.concat(), data);
        }

        /// A database image stored page-aligned (as an import stores one) reads back as the same
        /// bytes, every chunk `sqlite_chunk_len` long but the last, which is whole pages too.
        #[test]
        fn stored_pages_read_back_in_whole_page_chunks(
            page_log in 9u32..15,
            pages in 0usize..40,
            seed: u64,
            text: bool,
        ) {
            let page = 1usize << page_log;
            let data = sample(page * pages, seed, text);
            let config = small_config(4, 8);
            let (content, hash, size, chunks) = round_trip(&config, |w| {
                store_pages(w, &config, data.as_slice(), page as u32, Path::new("x.sqlite"), &NoProgress)
            });
            let len = crate::chunk::sqlite_chunk_len(page as u32, &config);
            proptest::prop_assert_eq!((size, content.size), (data.len() as u64, data.len() as u64));
            proptest::prop_assert_eq!(hash, *blake3::hash(&data).as_bytes());
            for (i, c) in chunks.iter().enumerate() {
                proptest::prop_assert_eq!(c.len() % page, 0);
                if i + 1 < chunks.len() {
                    proptest::prop_assert_eq!(c.len(), len);
                }
            }
            proptest::prop_assert_eq!(chunks.concat(), data);
        }
    }
}
