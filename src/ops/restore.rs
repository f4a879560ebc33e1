//! Restore: put an agent back exactly as it was at a snapshot.
//!
//! Plan → pre-restore snapshot → stage → journal → switch → clean up. Every file is first
//! materialised into staging folders on the same file systems as the live ones and checked
//! against its recorded hash; only then does the journal say "switching", and every switch step
//! is idempotent, so a crash is rolled back (before "switching") or finished (after it) by the
//! next command. Live databases are replaced through SQLite's backup API, so an open connection
//! sees the old or the new database, never a mix, and no stale `-wal` survives.
//! Journal format: store-format.md, "Restore journal".

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Progress;
use super::snapshot::{SnapshotRequest, snapshot_locked};
use crate::error::{Error, StoreError};
use crate::fsutil;
use crate::lock::Mode;
use crate::manifest::artifact::{ArtifactEntry, EntryKind, Part};
use crate::manifest::snapshot::SnapshotRecord;
use crate::names::AgentId;
use crate::source::SourceSpec;
use crate::source::state::{FsStateProvider, StateItem, StateProvider};
use crate::storage::{DIRECT_ALIGN, Fs, OpenMode, StorageFile, WritebackFile, aligned_start};
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::ChunkLoc;
use crate::store::reader::{ChunkReader, PackFiles};
use crate::store::stream::ChunkSource;
use crate::tree;

#[derive(Clone)]
#[non_exhaustive]
pub struct RestoreRequest {
    /// A snapshot id, a unique prefix of at least 8 characters, or `latest`.
    pub snapshot: String,
    /// The agent the caller means; restoring another agent's snapshot is refused.
    pub agent: Option<AgentId>,
    /// Restore into this folder (layout as `--source`) instead of the agent's live paths.
    pub target: Option<PathBuf>,
    /// The agent's live paths, when the store does not know them (an imported snapshot).
    pub sources: Option<SourceSpec>,
    pub dry_run: bool,
    pub pre_snapshot: bool,
    /// State restore; `None` writes the state folder.
    pub state: Option<Arc<dyn StateProvider>>,
}

impl RestoreRequest {
    pub fn new(snapshot: impl Into<String>) -> Self {
        Self {
            snapshot: snapshot.into(),
            agent: None,
            target: None,
            sources: None,
            dry_run: false,
            pre_snapshot: true,
            state: None,
        }
    }

    pub fn agent(mut self, agent: AgentId) -> Self {
        self.agent = Some(agent);
        self
    }

    pub fn target(mut self, dir: impl Into<PathBuf>) -> Self {
        self.target = Some(dir.into());
        self
    }

    pub fn sources(mut self, s: SourceSpec) -> Self {
        self.sources = Some(s);
        self
    }

    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }

    pub fn pre_snapshot(mut self, yes: bool) -> Self {
        self.pre_snapshot = yes;
        self
    }

    pub fn state_provider(mut self, p: Arc<dyn StateProvider>) -> Self {
        self.state = Some(p);
        self
    }
}

/// What a restore does (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestorePlan {
    pub snapshot_id: String,
    pub tenant: String,
    pub agent: String,
    pub memdir: String,
    pub sqlite_dir: String,
    pub state_dir: String,
    /// Memdir entries written (files, folders, symlinks).
    pub memdir_entries: u64,
    /// Live memdir entries not in the snapshot, removed by the restore.
    pub memdir_removed: Vec<String>,
    /// Live memdir files whose content differs from the snapshot's.
    pub memdir_changed: Vec<String>,
    /// (database, action): `replace` (through SQLite), `create`, `remove`.
    pub databases: Vec<(String, String)>,
    pub state_written: Vec<String>,
    pub state_removed: Vec<String>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    pub dry_run: bool,
    /// The automatic snapshot taken just before, to undo this restore.
    pub pre_snapshot_id: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    /// Staging folders are being filled; nothing live was touched: roll back.
    Staging,
    /// Everything is staged and checked; the switch may be part done: finish it.
    Switching,
    /// The switch is complete; only staging remains to remove. Never redo the switch here: the
    /// agent may have written since.
    Switched,
}

/// A state document carried in the journal (state is small), so that a recovery needs neither
/// the index nor the state provider's source.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JournalState {
    name: String,
    mode: Option<u32>,
    json_hex: String,
}

const JOURNAL_VERSION: u32 = 1;

/// The restore journal (`journal/<tenant>/<agent>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    version: u32,
    phase: Phase,
    snapshot_id: String,
    tenant: String,
    agent: String,
    token: String,
    memdir: PathBuf,
    sqlite_dir: PathBuf,
    state_dir: PathBuf,
    /// The snapshot has a memdir (else the live one is removed).
    has_memdir: bool,
    /// Databases of the snapshot, by file name.
    databases: Vec<String>,
    /// The state goes to the state folder (the default provider); a custom provider's restore
    /// cannot be redone by another process.
    fs_state: bool,
    /// The snapshot's state documents, checked against their hashes before `Switching`.
    /// Absent in a journal written before staging finished; recovery then reads the state from
    /// the store.
    #[serde(default)]
    state: Option<Vec<JournalState>>,
    /// A `--target` restore found no `sqlite_dir` when it began: a rollback removes it again if
    /// it is an empty folder, so that the target is left as it was found and a retry is
    /// accepted. Absent in older journals: kept.
    #[serde(default)]
    created_sqlite_dir: bool,
}

impl Journal {
    fn staged_memdir(&self) -> PathBuf {
        sibling(
            &self.memdir,
            &format!(".memsnap-restore-{}-new", self.token),
        )
    }

    fn old_memdir(&self) -> PathBuf {
        sibling(
            &self.memdir,
            &format!(".memsnap-restore-{}-old", self.token),
        )
    }

    fn staged_sqlite(&self) -> PathBuf {
        self.sqlite_dir
            .join(format!(".memsnap-restore-{}", self.token))
    }
}

fn sibling(path: &Path, name: &str) -> PathBuf {
    fsutil::parent_of(path).join(name)
}

fn journal_path(store: &Store, agent: &AgentId) -> PathBuf {
    store
        .journal_dir()
        .join(agent.tenant())
        .join(format!("{}.json", agent.agent()))
}

fn write_journal(store: &Store, agent: &AgentId, j: &Journal) -> Result<(), Error> {
    let path = journal_path(store, agent);
    let dir = fsutil::parent_of(&path);
    store
        .fs
        .create_dir_all_durable(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    let bytes =
        serde_json::to_vec_pretty(j).map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
    store
        .fs
        .write_atomic(&path, &bytes, 0o600)
        .map_err(|e| Error::io(&path, e))
}

fn remove_journal(store: &Store, agent: &AgentId) -> Result<(), Error> {
    let path = journal_path(store, agent);
    store
        .fs
        .remove_any(&path)
        .map_err(|e| Error::io(&path, e))?;
    let dir = fsutil::parent_of(&path);
    store.fs.sync_dir(&dir).map_err(|e| Error::io(&dir, e))
}

/// Finishes or rolls back an interrupted restore of `agent`. The caller holds the agent lock.
pub(crate) fn recover(store: &Store, agent: &AgentId) -> Result<Option<String>, Error> {
    let path = journal_path(store, agent);
    remove_journal_temps(&store.fs, &path)?;
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let j: Journal = serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptRecord {
        what: format!("restore journal {}", path.display()),
        message: e.to_string(),
    })?;
    if j.version > JOURNAL_VERSION {
        return Err(StoreError::CorruptRecord {
            what: format!("restore journal {}", path.display()),
            message: format!(
                "version {} is newer than this memsnap: upgrade memsnap",
                j.version
            ),
        }
        .into());
    }
    let context = |source: Error, doing: &str| Error::Recovery {
        snapshot: j.snapshot_id.clone(),
        journal: path.clone(),
        doing: doing.to_owned(),
        source: Box::new(source),
    };
    let done = match j.phase {
        Phase::Staging => {
            tracing::warn!(snapshot = %j.snapshot_id, "rolling back a restore interrupted while staging");
            roll_back(&store.fs, &j).map_err(|e| context(e, "rolling back"))?;
            "rolled back"
        }
        Phase::Switching => {
            tracing::warn!(snapshot = %j.snapshot_id, "finishing a restore interrupted while switching");
            // An old journal without `state` makes the switch read the snapshot from the
            // store: keep prune from freeing it meanwhile.
            let _store = store.lock_store(Mode::Shared)?;
            switch(store, &j, None).map_err(|e| context(e, "finishing"))?;
            let j = Journal {
                phase: Phase::Switched,
                ..j.clone()
            };
            write_journal(store, agent, &j)?;
            cleanup(&store.fs, &j).map_err(|e| context(e, "cleaning up after"))?;
            "finished"
        }
        Phase::Switched => {
            cleanup(&store.fs, &j).map_err(|e| context(e, "cleaning up after"))?;
            "cleaned up after"
        }
    };
    remove_journal(store, agent)?;
    Ok(Some(format!(
        "{done} the interrupted restore of {}",
        j.snapshot_id
    )))
}

/// Removes the temporary files of journal writes (`Fs::write_atomic`) killed before their
/// rename. Only the agent lock's holder writes its journal, and the caller holds it: any such
/// file belongs to a dead process.
fn remove_journal_temps(fsys: &Fs, journal: &Path) -> Result<(), Error> {
    let dir = fsutil::parent_of(journal);
    let Some(name) = journal.file_name() else {
        return Ok(());
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            fsys.remove_any(&entry.path())
                .map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Recovers every agent with a journal whose lock is free (used when a command opens a store).
pub(crate) fn recover_all(store: &Store) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let dir = store.journal_dir();
    let Ok(tenants) = fs::read_dir(&dir) else {
        return Ok(done);
    };
    for t in tenants.flatten() {
        let Ok(files) = fs::read_dir(t.path()) else {
            continue;
        };
        for f in files.flatten() {
            let tenant = t.file_name().to_string_lossy().into_owned();
            let name = f.file_name().to_string_lossy().into_owned();
            // A journal, or only the temporary file of a journal write that was killed.
            let journal = name
                .strip_prefix('.')
                .and_then(|n| n.split_once(".json.tmp-"));
            let Some(agent) = name.strip_suffix(".json").or(journal.map(|(a, _)| a)) else {
                continue;
            };
            let Ok(agent) = AgentId::new(&tenant, agent) else {
                continue;
            };
            let quick = store.with_lock_timeout(Duration::ZERO);
            // A busy agent is being handled by the process that holds its lock.
            let Ok(_guard) = quick.lock_agent(&agent) else {
                continue;
            };
            // One agent's stuck restore must not make the store unusable for every other
            // agent (nor for `verify`, the tool to diagnose it): report and go on.
            match recover(store, &agent) {
                Ok(Some(msg)) => done.push(msg),
                Ok(None) => {}
                Err(e) => tracing::error!("{e}"),
            }
        }
    }
    Ok(done)
}

pub(crate) fn restore(
    store: &Store,
    req: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<RestoreReport, Error> {
    let started = Instant::now();
    // The record names the agent to lock; it and its entries are read again under that lock,
    // which forget and delete hold to remove records. Read only before it, the snapshot could
    // be forgotten and its chunks pruned before staging reads them.
    let record = {
        let index = store.index_for_reading()?;
        let tx = index.begin_read()?;
        super::resolve(&index, &tx, &req.snapshot, req.agent.as_ref())?
    };
    let agent = AgentId::new(&record.info.tenant, &record.info.agent)?;
    if let Some(asked) = req.agent.as_ref().filter(|a| **a != agent) {
        return Err(Error::AgentMismatch {
            id: record.info.id.clone(),
            snapshot_agent: agent.to_string(),
            asked: asked.to_string(),
        });
    }
    let paths = match &req.target {
        Some(dir) => {
            SourceSpec::from_root(std::path::absolute(dir).map_err(|e| Error::io(dir, e))?)
        }
        None => match (&req.sources, super::load_agent(store, &agent)?) {
            (Some(s), _) => s.resolve(&agent),
            (None, Some(a)) => a.into(),
            // An imported snapshot records no paths of this host.
            (None, None) if record.info.memdir.is_empty() => {
                return Err(Error::UnknownLocation {
                    id: record.info.id.clone(),
                    agent: agent.to_string(),
                });
            }
            (None, None) => SourceSpec {
                memdir: record.info.memdir.clone().into(),
                sqlite_dir: record.info.sqlite_dir.clone().into(),
                state_dir: record.info.state_dir.clone().into(),
            },
        },
    };

    paths.check_disjoint(store.root())?;
    let _agent_lock = store.lock_agent(&agent)?;
    recover(store, &agent)?;
    let (record, entries) = load(
        store,
        &RestoreRequest::new(record.info.id.as_str()).agent(agent.clone()),
    )?;
    let state: Arc<dyn StateProvider> = match &req.state {
        Some(p) => p.clone(),
        None => Arc::new(FsStateProvider::new(&paths.state_dir).with_storage(store.fs.0.clone())),
    };
    let plan = plan(&record, &entries, &paths, state.as_ref(), req.dry_run)?;
    if req.dry_run {
        return Ok(RestoreReport {
            plan,
            dry_run: true,
            pre_snapshot_id: None,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    if let Some(dir) = &req.target
        && !fsutil::is_absent_or_empty(dir).map_err(|e| Error::io(dir, e))?
    {
        return Err(Error::TargetNotEmpty { path: dir.clone() });
    }

    let pre_snapshot_id = if req.pre_snapshot && req.target.is_none() {
        let pre = SnapshotRequest {
            agent: agent.clone(),
            sources: Some(paths.clone()),
            label: Some(format!(
                "pre-restore of {}",
                record.info.id.get(..8).unwrap_or(&record.info.id)
            )),
            created_by: Some("memsnap restore".to_owned()),
            state: req.state.clone(),
        };
        match snapshot_locked(store, &pre, &super::NoProgress) {
            Ok(info) => Some(info.id),
            Err(Error::NoMemory { .. }) => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };

    let _store_lock = store.lock_store(Mode::Shared)?;
    let journal = Journal {
        version: JOURNAL_VERSION,
        phase: Phase::Staging,
        snapshot_id: record.info.id.clone(),
        tenant: agent.tenant().to_owned(),
        agent: agent.agent().to_owned(),
        token: format!("{:08x}", rand::random::<u32>()),
        memdir: paths.memdir.clone(),
        sqlite_dir: paths.sqlite_dir.clone(),
        state_dir: paths.state_dir.clone(),
        has_memdir: !record.info.absent.iter().any(|a| a == "memdir"),
        databases: entries
            .iter()
            .filter(|e| e.part == Part::Sqlite)
            .map(|e| e.path_lossy())
            .collect(),
        fs_state: req.state.is_none(),
        state: None,
        // Only for a --target folder, which the restore found empty and owns: a live agent
        // may make its own sqlite folder meanwhile.
        created_sqlite_dir: req.target.is_some()
            && matches!(
                paths.sqlite_dir.symlink_metadata(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound
            ),
    };
    write_journal(store, &agent, &journal)?;
    progress.start("restore", plan.bytes);
    let staged = stage(store, &journal, &entries, progress)
        .and_then(|()| state_items(store, &record, &entries))
        .and_then(|items| {
            check_switchable(&journal, &entries)?;
            crate::failpoint::hit("restore:staged")?;
            Ok(items)
        });
    let items = match staged {
        Ok(items) => items,
        Err(e) => {
            // Nothing live was touched: undo the staging now rather than on the next command;
            // if that fails, the journal stays so that the next command retries.
            if roll_back(&store.fs, &journal).is_ok() {
                let _ = remove_journal(store, &agent);
            }
            return Err(e);
        }
    };
    let journal = Journal {
        phase: Phase::Switching,
        state: Some(
            items
                .iter()
                .map(|i| JournalState {
                    name: i.name.clone(),
                    mode: i.mode,
                    json_hex: hex::encode(&i.json),
                })
                .collect(),
        ),
        ..journal
    };
    write_journal(store, &agent, &journal)?;
    crate::failpoint::hit("restore:journal-switching")?;
    switch(store, &journal, Some((state.as_ref(), &items))).map_err(|e| Error::Recovery {
        snapshot: journal.snapshot_id.clone(),
        journal: journal_path(store, &agent),
        doing: "switching to".to_owned(),
        source: Box::new(e),
    })?;
    let journal = Journal {
        phase: Phase::Switched,
        ..journal
    };
    write_journal(store, &agent, &journal)?;
    cleanup(&store.fs, &journal)?;
    remove_journal(store, &agent)?;
    progress.finish();
    Ok(RestoreReport {
        plan,
        dry_run: false,
        pre_snapshot_id,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn load(
    store: &Store,
    req: &RestoreRequest,
) -> Result<(SnapshotRecord, Vec<ArtifactEntry>), Error> {
    let index = store.index_for_lookups()?;
    let tx = index.begin_read()?;
    let record = super::resolve(&index, &tx, &req.snapshot, req.agent.as_ref())?;
    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
    let entries = super::load_entries(&mut reader, &record)?;
    Ok((record, entries))
}

fn plan(
    record: &SnapshotRecord,
    entries: &[ArtifactEntry],
    paths: &SourceSpec,
    state: &dyn StateProvider,
    read_content: bool,
) -> Result<RestorePlan, Error> {
    let mut plan = RestorePlan {
        snapshot_id: record.info.id.clone(),
        tenant: record.info.tenant.clone(),
        agent: record.info.agent.clone(),
        memdir: paths.memdir.display().to_string(),
        sqlite_dir: paths.sqlite_dir.display().to_string(),
        state_dir: paths.state_dir.display().to_string(),
        ..RestorePlan::default()
    };
    let snap_mem: BTreeSet<&[u8]> = entries
        .iter()
        .filter(|e| e.part == Part::Memdir)
        .map(|e| e.path.as_slice())
        .collect();
    plan.memdir_entries = snap_mem.len() as u64;
    plan.bytes = entries.iter().map(|e| e.size).sum();
    if paths.memdir.is_dir() {
        let live = crate::source::memdir::walk(&paths.memdir, crate::source::memdir::Pass::All)?;
        for item in &live {
            if !snap_mem.contains(item.rel.as_slice()) {
                plan.memdir_removed
                    .push(String::from_utf8_lossy(&item.rel).into_owned());
            }
        }
        for e in entries
            .iter()
            .filter(|e| e.part == Part::Memdir && e.kind == EntryKind::File)
        {
            let live_path = paths.memdir.join(std::ffi::OsStr::from_bytes(&e.path));
            // A real restore rewrites every file anyway: only a dry run pays for reading them.
            let same = match fs::symlink_metadata(&live_path) {
                Ok(m) if m.is_file() && m.len() == e.size => {
                    if read_content {
                        hash_file(&live_path).is_ok_and(|h| h == e.hash)
                    } else {
                        crate::source::memdir::mtime_ns(&m) == e.mtime_ns
                    }
                }
                _ => false,
            };
            if !same {
                plan.memdir_changed.push(e.path_lossy());
            }
        }
    }
    let live_dbs: BTreeSet<String> = if paths.sqlite_dir.is_dir() {
        crate::source::sqlite::list_databases(&paths.sqlite_dir)?
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    } else {
        BTreeSet::new()
    };
    let snap_dbs: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.part == Part::Sqlite)
        .map(|e| e.path_lossy())
        .collect();
    for db in &snap_dbs {
        let action = if live_dbs.contains(db) {
            "replace"
        } else {
            "create"
        };
        plan.databases.push((db.clone(), action.to_owned()));
    }
    for db in live_dbs.difference(&snap_dbs) {
        plan.databases.push((db.clone(), "remove".to_owned()));
    }
    let snap_state: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.part == Part::State)
        .map(|e| e.path_lossy())
        .collect();
    plan.state_written = snap_state.iter().cloned().collect();
    for item in state.capture()? {
        if !snap_state.contains(&item.name) {
            plan.state_removed.push(item.name);
        }
    }
    Ok(plan)
}

fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(path)?)?;
    Ok(*h.finalize().as_bytes())
}

/// Materialises the memdir and the databases into staging, checking every artifact's hash,
/// and makes them durable.
fn stage(
    store: &Store,
    j: &Journal,
    entries: &[ArtifactEntry],
    progress: &dyn Progress,
) -> Result<(), Error> {
    // Resolve the small contents' chunk locations, then give the index back to other processes
    // before the long part: reading and writing the data. Large contents are resolved a window
    // at a time as they are written, each window in a session of its own.
    let (packs, sources) = {
        let index = store.index_for_reading()?;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        let contents: Vec<_> = entries
            .iter()
            .map(|e| match (&e.content, e.part) {
                (Some(c), Part::Memdir | Part::Sqlite) => Some(c),
                _ => None,
            })
            .collect();
        let sources = crate::store::stream::plan(&mut reader, store, &contents)?;
        (reader.packs, sources)
    };
    // Notes are read through the page cache, their group's runs asked for at once; large
    // files past it, a batch at a time.
    let direct_packs = PackFiles::new(&store.fs, store.packs_dir()).with_direct_reads();
    let mem_root = j.staged_memdir();
    let db_root = j.staged_sqlite();
    if j.has_memdir {
        store
            .fs
            .create_dir_all_durable(&mem_root)
            .map_err(|e| Error::io(&mem_root, e))?;
    }
    if !j.databases.is_empty() {
        store
            .fs
            .create_dir_all_durable(&db_root)
            .map_err(|e| Error::io(&db_root, e))?;
    }
    let mut dirs = Vec::new();
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut sources = sources.into_iter();
    // Every entry's parent must be a folder this staging created, so that no crafted or damaged
    // manifest (a symlink, then a file "through" it) writes outside the staging folder.
    let mut staged_dirs: std::collections::HashSet<(Part, Vec<u8>)> =
        std::collections::HashSet::from([(Part::Memdir, Vec::new())]);
    let mut seen: std::collections::HashSet<(Part, &[u8])> = std::collections::HashSet::new();
    for e in entries {
        let source = sources.next().flatten();
        let root = match e.part {
            Part::Memdir => &mem_root,
            Part::Sqlite => &db_root,
            Part::State => continue,
        };
        let bad = |message: String| -> Error {
            StoreError::CorruptRecord {
                what: format!("snapshot {}", j.snapshot_id),
                message,
            }
            .into()
        };
        if !is_plain_path(&e.path) {
            return Err(bad(format!(
                "entry path {:?} escapes its folder",
                e.path_lossy()
            )));
        }
        if !seen.insert((e.part, e.path.as_slice())) {
            return Err(bad(format!("entry {:?} appears twice", e.path_lossy())));
        }
        let parent = match e.path.iter().rposition(|b| *b == b'/') {
            Some(i) => e.path[..i].to_vec(),
            None => Vec::new(),
        };
        let parent_ok = match e.part {
            // The memdir's entries hang below its root entry ("").
            Part::Memdir => e.path.is_empty() || staged_dirs.contains(&(e.part, parent)),
            // Databases sit directly in the sqlite folder.
            Part::Sqlite => !e.path.contains(&b'/') && !e.path.is_empty(),
            Part::State => true,
        };
        if !parent_ok {
            return Err(bad(format!(
                "entry {:?} is not inside a folder of the snapshot",
                e.path_lossy()
            )));
        }
        let path = root.join(std::ffi::OsStr::from_bytes(&e.path));
        if e.kind == EntryKind::Dir {
            staged_dirs.insert((e.part, e.path.clone()));
        }
        match &e.kind {
            EntryKind::Dir => {
                // The memdir's root entry ("") is the staging folder itself.
                if !e.path.is_empty() {
                    store
                        .fs
                        .create_dir(&path)
                        .map_err(|err| Error::io(&path, err))?;
                }
                dirs.push((path, e.mode, e.mtime_ns));
            }
            EntryKind::Symlink { target } => {
                store
                    .fs
                    .symlink(Path::new(std::ffi::OsStr::from_bytes(target)), &path)
                    .map_err(|err| Error::io(&path, err))?;
            }
            EntryKind::File | EntryKind::Sqlite { .. } => {
                if e.size < DIRECT_MIN {
                    small.push((e, source, path));
                    continue;
                }
                // The switch reads a staged database back into a live one (SQLite's backup):
                // that one stays in the page cache. Everything else is only renamed.
                let read_back = e.part == Part::Sqlite
                    && crate::source::sqlite::is_database(&j.sqlite_dir.join(e.path_lossy()));
                large.push((e, source, path, !read_back));
            }
        }
    }
    // The large files on a thread of their own while the notes are written: a large file waits
    // mostly for the disk, the notes for system calls (~0.2 s of a 1 GiB agent's restore,
    // before its vector database began).
    // Either side's failure stops the other at its next file or group (a file being written
    // is finished); the notes' error is the one returned when both fail.
    use std::sync::atomic::Ordering::Relaxed;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (notes, files) = std::thread::scope(|s| {
        let files = s.spawn(|| {
            large
                .iter()
                .take_while(|_| !stop.load(Relaxed))
                .try_for_each(|(e, source, path, direct)| {
                    let source = source.as_ref();
                    write_file(&store.fs, &direct_packs, e, source, path, *direct, progress)
                })
                .inspect_err(|_| stop.store(true, Relaxed))
        });
        let notes = small
            .chunks(GROUP_FILES)
            .take_while(|_| !stop.load(Relaxed))
            .try_for_each(|group| write_group(&store.fs, &packs, group, progress))
            .inspect_err(|_| stop.store(true, Relaxed));
        (notes, joined(files))
    });
    notes.and(files)?;
    // Deepest first, so that a read-only folder is sealed after its contents are written.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (path, mode, mtime) in dirs {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(&path, e))?;
        set_mtime(&path, mtime)?;
    }
    for root in [&mem_root, &db_root] {
        if root.exists() {
            sync_tree(&store.fs, root)?;
        }
    }
    Ok(())
}

fn mtime_of(mtime_ns: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(mtime_ns.max(0) as u64)
}

fn set_mtime(path: &Path, mtime_ns: i64) -> Result<(), Error> {
    let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.set_modified(mtime_of(mtime_ns))
        .map_err(|e| Error::io(path, e))
}

/// Files of a group written at once (see [`write_group`]).
const GROUP_FILES: usize = 256;

/// Writes `group` (files under [`DIRECT_MIN`]: a memdir's notes) in parallel, after asking for
/// all their pack runs at once. One after another, each note waited for its pack read from the
/// disk and then ~100 us of system calls: a third of a 1 GiB agent's restore.
fn write_group(
    fsys: &Fs,
    packs: &PackFiles,
    group: &[(&ArtifactEntry, Option<ChunkSource>, PathBuf)],
    progress: &dyn Progress,
) -> Result<(), Error> {
    use rayon::prelude::*;
    let mut chunks: Vec<_> = group
        .iter()
        .filter_map(|(_, source, _)| match source {
            Some(ChunkSource::Listed(l)) => Some(l.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    // In pack order, each place once (notes share chunks), so that runs merge into few hints.
    chunks.sort_unstable_by_key(|(_, l)| (l.pack, l.offset));
    chunks.dedup_by_key(|(_, l)| (l.pack, l.offset));
    packs.will_need(&chunks)?;
    group.par_iter().try_for_each(|(e, source, path)| {
        write_file(fsys, packs, e, source.as_ref(), path, false, progress)
    })
}

/// Sets a written file's mode and modification time, through `file` where the storage can.
fn set_mode_and_mtime(
    file: Box<dyn StorageFile>,
    e: &ArtifactEntry,
    path: &Path,
) -> Result<(), Error> {
    let mtime = (e.mtime_ns != 0).then(|| mtime_of(e.mtime_ns));
    let done = file
        .set_mode_and_mtime(e.mode, mtime)
        .map_err(|err| Error::io(path, err))?;
    drop(file);
    if !done {
        fs::set_permissions(path, fs::Permissions::from_mode(e.mode))
            .map_err(|err| Error::io(path, err))?;
        if e.mtime_ns != 0 {
            set_mtime(path, e.mtime_ns)?;
        }
    }
    Ok(())
}

/// Makes everything under `root` durable: one `syncfs` for the file system that holds it.
fn sync_tree(fsys: &Fs, root: &Path) -> Result<(), Error> {
    fsys.sync_filesystem(root).map_err(|e| Error::io(root, e))?;
    fsys.sync_dir(&fsutil::parent_of(root))
        .map_err(|e| Error::io(root, e))
}

/// A relative path of plain names: no empty, "." or ".." component. Checked on the bytes, since
/// Path::components() hides "." and doubled slashes, which would let "a/./x" pass as a path
/// different from "a/x" that writes to the same place. The empty path is the memdir itself.
fn is_plain_path(p: &[u8]) -> bool {
    p.is_empty()
        || p.split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// Bytes of chunks read and decompressed in parallel at a time, while the previous batch is
/// hashed and written.
const READ_BATCH_BYTES: u64 = 8 << 20;

/// Files of at least this size that nothing reads back are written past the page cache where
/// the file system allows (`O_DIRECT`): the cache's copy was 40% of a restore's CPU on the bench
/// machine, whose disk took direct writes at 1.5 GB/s against 0.5-1.2 GB/s through the cache
/// and `fdatasync`. Each direct write waits for the disk, so small files (notes) stay cached.
const DIRECT_MIN: u64 = 1 << 20;

/// Where a restored file's bytes go: through the page cache (with writeback started as it
/// goes), or straight to the disk in whole aligned blocks, a tail of under one block carried to
/// the next batch and written last, padded, then cut off.
enum Out {
    Cached(WritebackFile),
    Direct {
        file: Box<dyn StorageFile>,
        /// Bytes written so far: a multiple of [`DIRECT_ALIGN`].
        at: u64,
        carry: Vec<u8>,
    },
}

impl Out {
    /// Writes `region` (which starts with the carried bytes, at an aligned address when direct).
    fn write(&mut self, region: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Cached(f) => f.write_all(region),
            Out::Direct { file, at, carry } => {
                let whole = region.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                file.write_all_at(&region[..whole], *at)?;
                *at += whole as u64;
                carry.clear();
                carry.extend_from_slice(&region[whole..]);
                Ok(())
            }
        }
    }

    /// Bytes written but not yet on disk: the next batch is read after as many.
    fn carried(&self) -> usize {
        match self {
            Out::Cached(_) => 0,
            Out::Direct { carry, .. } => carry.len(),
        }
    }

    fn finish(self) -> std::io::Result<Box<dyn StorageFile>> {
        match self {
            Out::Cached(f) => Ok(f.into_inner()),
            Out::Direct { file, at, carry } => {
                if carry.is_empty() {
                    return Ok(file);
                }
                let mut buf = Vec::new();
                let start = aligned_start(&mut buf, DIRECT_ALIGN);
                buf[start..start + carry.len()].copy_from_slice(&carry);
                file.write_all_at(&buf[start..start + DIRECT_ALIGN], at)?;
                file.set_len(at + carry.len() as u64)?;
                Ok(file)
            }
        }
    }
}

/// Writes one file: its content (past the page cache when `direct` and it is large enough),
/// checked against its hash, then its mode and modification time.
fn write_file(
    fsys: &Fs,
    packs: &PackFiles,
    e: &ArtifactEntry,
    source: Option<&ChunkSource>,
    path: &Path,
    direct: bool,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let direct = direct && e.size >= DIRECT_MIN;
    let Some(source) = source else {
        return Err(StoreError::CorruptRecord {
            what: format!("entry {}", e.path_lossy()),
            message: "a file without content".into(),
        }
        .into());
    };
    let file = fsys
        .open(path, OpenMode::CreateNew { mode: 0o600 })
        .map_err(|err| Error::io(path, err))?;
    let mut out = match direct && file.write_direct() {
        true => Out::Direct {
            file,
            at: 0,
            carry: Vec::with_capacity(DIRECT_ALIGN),
        },
        false => Out::Cached(WritebackFile::new(file)),
    };
    let mut hasher = blake3::Hasher::new();
    let mut stream = source.stream();
    let first = stream.next_batch(READ_BATCH_BYTES)?;
    match (first, stream.next_batch(READ_BATCH_BYTES)?) {
        // Only a large file's: notes are written on the global pool, whose threads the
        // pipeline's reads of cached packs would wait for (a damaged entry can claim a small
        // size for a large content).
        (Some(first), Some(second)) if e.size >= DIRECT_MIN => write_batches(
            packs,
            stream,
            [first, second],
            &mut out,
            &mut hasher,
            progress,
            path,
        )?,
        // A file of one batch (most), or a note: batch after batch.
        (first, second) => {
            let mut buf = Vec::new();
            let rest = std::iter::from_fn(|| stream.next_batch(READ_BATCH_BYTES).transpose());
            for b in [first, second].into_iter().flatten().map(Ok).chain(rest) {
                let mut batch = read_batch(packs, &b?, buf, out.carried(), false)?;
                write_batch(&mut out, &mut batch, &mut hasher, false)
                    .map_err(|err| Error::io(path, err))?;
                progress.advance(batch.len as u64);
                buf = batch.buf;
            }
        }
    }
    let file = out.finish().map_err(|err| Error::io(path, err))?;
    if *hasher.finalize().as_bytes() != e.hash {
        // The chunks were not checked one by one (the content's hash covers every byte, and
        // their BLAKE3 was ~20% of a restore's CPU): the damaged one is found to be named.
        let mut stream = source.stream();
        let mut buf = Vec::new();
        while let Some(b) = stream.next_batch(READ_BATCH_BYTES)? {
            buf = read_batch(packs, &b, buf, 0, true)?.buf;
        }
        return Err(Error::RestoredHashMismatch {
            what: format!("{} {}", e.part.name(), e.path_lossy()),
            path: path.to_path_buf(),
        });
    }
    set_mode_and_mtime(file, e, path)
}

/// Batches read ahead of the one being written, each in a buffer of its own.
const READ_AHEAD: usize = 2;

/// Writes a file of several batches (`first` are its first two) in three stages that overlap:
/// a thread locates the batches (and, where its packs are read through the page cache, asks
/// for them) ahead of the reads; a thread reads and decompresses them on the read pool, up to
/// [`READ_AHEAD`] ahead of the write; this one writes each, its hash taken meanwhile on a thread
/// of its own. Done in step (read the next batch while this one is written), a 1 GiB vector
/// database waited for the next batch's read in nearly every batch (2.36 of 2.41 s): the reads
/// share the disk with the writes, and each stalls on the slower of the two.
fn write_batches(
    packs: &PackFiles,
    mut stream: crate::store::stream::ChunkStream,
    first: [Vec<(ChunkId, ChunkLoc)>; 2],
    out: &mut Out,
    hasher: &mut blake3::Hasher,
    progress: &dyn Progress,
    path: &Path,
) -> Result<(), Error> {
    for b in &first {
        packs.will_need(b)?;
    }
    let direct = matches!(out, Out::Direct { .. });
    std::thread::scope(|s| -> Result<(), Error> {
        // A stage's thread ends when the next stage drops its end of their channel (this
        // closure's ends drop when it returns, on an error too): the reader at its next send
        // or wait for a buffer, the locator at its next send, after the lookup it is in.
        let (located_tx, located_rx) = std::sync::mpsc::sync_channel(1);
        s.spawn(move || {
            loop {
                let b = stream.next_batch(READ_BATCH_BYTES).and_then(|b| {
                    if let Some(b) = &b {
                        packs.will_need(b)?;
                    }
                    Ok(b)
                });
                let last = !matches!(b, Ok(Some(_)));
                if located_tx.send(b).is_err() || last {
                    return;
                }
            }
        });
        let (filled_tx, filled_rx) = std::sync::mpsc::sync_channel(READ_AHEAD - 1);
        // Buffers go round: fresh 8 MiB buffers cost page faults (~8% of a restore's CPU),
        // since glibc maps them anew each time.
        let (free_tx, free_rx) = std::sync::mpsc::sync_channel(READ_AHEAD + 1);
        for _ in 0..=READ_AHEAD {
            // Within the channel's capacity, with its receiver alive: cannot fail.
            let _ = free_tx.send(Vec::new());
        }
        s.spawn(move || {
            // A thread that panicked closed the channel: the scope raises its panic.
            let located = std::iter::from_fn(|| Some(located_rx.recv().unwrap_or(Ok(None))));
            // Each batch starts with room for the tail the one before leaves unwritten.
            let mut lead = 0;
            for b in first.into_iter().map(|b| Ok(Some(b))).chain(located) {
                let b = match b {
                    Ok(Some(b)) => b,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = filled_tx.send(Err(e));
                        return;
                    }
                };
                let Ok(buf) = free_rx.recv() else { return };
                let read = read_batch(packs, &b, buf, lead, false);
                if let (Ok(batch), true) = (&read, direct) {
                    lead = (lead + batch.len) % DIRECT_ALIGN;
                }
                let failed = read.is_err();
                if filled_tx.send(read).is_err() || failed {
                    return;
                }
            }
        });
        while let Ok(batch) = filled_rx.recv() {
            let mut batch = batch?;
            write_batch(out, &mut batch, hasher, true).map_err(|err| Error::io(path, err))?;
            progress.advance(batch.len as u64);
            // Never blocks: the channel holds every buffer; fails only once the reader is gone.
            let _ = free_tx.send(batch.buf);
        }
        Ok(())
    })
}

/// Writes `batch` after the tail the one before left unwritten, and adds its bytes to `hasher`:
/// on a thread of its own meanwhile with `overlap` (a direct write blocks until the disk has
/// the bytes).
fn write_batch(
    out: &mut Out,
    batch: &mut Batch,
    hasher: &mut blake3::Hasher,
    overlap: bool,
) -> std::io::Result<()> {
    // The reader left room for the carried bytes: their count is the lengths so far, mod the
    // alignment, on both sides.
    debug_assert_eq!(batch.lead, out.carried());
    if let Out::Direct { carry, .. } = out {
        batch.buf[batch.start..batch.start + carry.len()].copy_from_slice(carry);
    }
    let region = &batch.buf[batch.start..batch.start + batch.lead + batch.len];
    let content = &region[batch.lead..];
    if !overlap {
        hasher.update(content);
        return out.write(region);
    }
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            hasher.update(content);
        });
        let written = out.write(region);
        joined(h);
        written
    })
}

/// What a scoped thread returned; its panic goes on.
fn joined<T>(t: std::thread::ScopedJoinHandle<'_, T>) -> T {
    t.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Threads that read and decompress the batches of files read past the page cache: such a
/// read holds its thread until the disk answers, so that four times as many threads as cores
/// keep both the disk and the cores busy (a 1 GiB restore on the bench VM, 2 cores: 2.30 s
/// with twice as many, 2.04 s with four times, means of four runs each), at most eight.
/// `None` if the pool cannot be made (the caller's pool then).
fn read_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let pieces = (READ_BATCH_BYTES / crate::store::stream::PIECE_BYTES) as usize;
        rayon::ThreadPoolBuilder::new()
            .num_threads((4 * rayon::current_num_threads()).min(pieces))
            .thread_name(|i| format!("memsnap-read-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// One batch read into a buffer: `len` bytes at `buf[start + lead..]`, after `lead` bytes left
/// for the previous batch's unwritten tail; `start` is aligned to [`DIRECT_ALIGN`].
struct Batch {
    buf: Vec<u8>,
    start: usize,
    lead: usize,
    len: usize,
}

/// The bytes of `batch`, each chunk read, decompressed and (with `verify`) checked in parallel
/// into its place, in `buf` (reused: every byte is overwritten, so only a longer batch zeroes
/// its new tail).
fn read_batch(
    packs: &PackFiles,
    batch: &[(ChunkId, ChunkLoc)],
    mut buf: Vec<u8>,
    lead: usize,
    verify: bool,
) -> Result<Batch, Error> {
    use rayon::prelude::*;
    packs.check_sizes(batch)?;
    let total: usize = batch.iter().map(|(_, l)| l.raw_len as usize).sum();
    let start = aligned_start(&mut buf, lead + total);
    // Spans in pack order (PackFiles::read_span); on the read pool when past the page cache.
    let spans = crate::store::reader::plan_spans(batch, &mut buf[start + lead..][..total])?;
    let read = || {
        spans
            .into_par_iter()
            .try_for_each(|span| packs.read_span(span, verify))
    };
    match read_pool() {
        Some(pool) if packs.reads_direct() => pool.install(read)?,
        _ => read()?,
    }
    Ok(Batch {
        buf,
        start,
        lead,
        len: total,
    })
}

fn state_items(
    store: &Store,
    record: &SnapshotRecord,
    entries: &[ArtifactEntry],
) -> Result<Vec<StateItem>, Error> {
    let index = store.index_for_reading()?;
    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
    let mut items = Vec::new();
    for e in entries.iter().filter(|e| e.part == Part::State) {
        let Some(content) = &e.content else { continue };
        let mut json = Vec::with_capacity(e.size.min(1 << 24) as usize);
        tree::walk(&mut reader, content, true, &mut |_, is_data, data| {
            let data = data?;
            if is_data {
                json.extend_from_slice(&data);
            }
            Ok(())
        })?;
        if *blake3::hash(&json).as_bytes() != e.hash {
            return Err(Error::RestoredHashMismatch {
                what: format!("state {}", e.path_lossy()),
                path: PathBuf::from(&record.info.state_dir).join(e.path_lossy()),
            });
        }
        items.push(StateItem {
            name: e.path_lossy(),
            json,
            mode: (e.mode != 0).then_some(e.mode),
        });
    }
    Ok(items)
}

const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Removes a database's `-wal`, `-shm` and `-journal`: stale next to a database that is renamed
/// in, they would be replayed into it.
fn remove_side_files(fsys: &Fs, db: &Path) -> Result<(), Error> {
    for suffix in SIDE_FILES {
        let mut s = db.as_os_str().to_owned();
        s.push(suffix);
        let p = PathBuf::from(s);
        fsys.remove_any(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The switch. Every step can run again after a crash with the same result.
fn switch(
    store: &Store,
    j: &Journal,
    state: Option<(&dyn StateProvider, &[StateItem])>,
) -> Result<(), Error> {
    // Memdir: move the live one aside, move the staged one in.
    let staged = j.staged_memdir();
    let old = j.old_memdir();
    let parent = fsutil::parent_of(&j.memdir);
    if staged.exists() || !j.has_memdir {
        if j.memdir.symlink_metadata().is_ok() && !old.exists() {
            store
                .fs
                .rename(&j.memdir, &old)
                .map_err(|e| Error::io(&j.memdir, e))?;
        }
        crate::failpoint::hit("restore:memdir-moved-aside")?;
        if staged.exists() {
            store
                .fs
                .rename(&staged, &j.memdir)
                .map_err(|e| Error::io(&j.memdir, e))?;
        }
        if parent.exists() {
            store
                .fs
                .sync_dir(&parent)
                .map_err(|e| Error::io(&parent, e))?;
        }
    }
    crate::failpoint::hit("restore:memdir-switched")?;

    // Databases of the snapshot: through SQLite into a live one, else moved in.
    let db_root = j.staged_sqlite();
    for name in &j.databases {
        let staged_db = db_root.join(name);
        if !staged_db.exists() {
            continue; // done by an earlier run of this switch
        }
        let live = j.sqlite_dir.join(name);
        if crate::source::sqlite::is_database(&live) {
            backup_into(&staged_db, &live, store.lock_timeout)?;
            store
                .fs
                .remove_file(&staged_db)
                .map_err(|e| Error::io(&staged_db, e))?;
        } else {
            remove_side_files(&store.fs, &live)?;
            store
                .fs
                .rename(&staged_db, &live)
                .map_err(|e| Error::io(&live, e))?;
        }
        crate::failpoint::hit("restore:database-switched")?;
    }
    // Databases created since the snapshot.
    if j.sqlite_dir.is_dir() {
        for (name, path) in crate::source::sqlite::list_databases(&j.sqlite_dir)? {
            if !j.databases.contains(&name) {
                remove_side_files(&store.fs, &path)?;
                store
                    .fs
                    .remove_file(&path)
                    .map_err(|e| Error::io(&path, e))?;
            }
        }
        store
            .fs
            .sync_dir(&j.sqlite_dir)
            .map_err(|e| Error::io(&j.sqlite_dir, e))?;
    }

    // State: small, rewritten whole from the snapshot.
    match state {
        Some((provider, items)) => provider.restore(items)?,
        None if j.fs_state && j.state.is_none() => {
            let agent = AgentId::new(&j.tenant, &j.agent)?;
            let (record, entries) = load(
                store,
                &RestoreRequest::new(j.snapshot_id.clone()).agent(agent),
            )?;
            let items = state_items(store, &record, &entries)?;
            FsStateProvider::new(&j.state_dir)
                .with_storage(store.fs.0.clone())
                .restore(&items)?;
        }
        None if j.fs_state => {
            let items = j
                .state
                .iter()
                .flatten()
                .map(|s| {
                    Ok(StateItem {
                        name: s.name.clone(),
                        json: hex::decode(&s.json_hex).map_err(|e| StoreError::CorruptRecord {
                            what: "restore journal state".into(),
                            message: e.to_string(),
                        })?,
                        mode: s.mode,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            FsStateProvider::new(&j.state_dir)
                .with_storage(store.fs.0.clone())
                .restore(&items)?;
        }
        None => tracing::warn!(
            snapshot = %j.snapshot_id,
            "the interrupted restore used a custom state provider: restore the state again through it"
        ),
    }
    Ok(())
}

/// Copies `src` over the live database `dst` through SQLite, in one step: connections open on
/// `dst` see the old or the new content, and its WAL stays consistent.
fn backup_into(src: &Path, dst: &Path, busy: Duration) -> Result<(), Error> {
    use rusqlite::{Connection, OpenFlags, backup};
    let serr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Sqlite {
            path: path.clone(),
            source,
        }
    };
    let from =
        Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(serr(src))?;
    let mut to =
        Connection::open_with_flags(dst, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(serr(dst))?;
    to.busy_timeout(busy).map_err(serr(dst))?;
    let start = Instant::now();
    let b = backup::Backup::new(&from, &mut to).map_err(serr(dst))?;
    loop {
        match b.step(-1).map_err(serr(dst))? {
            backup::StepResult::Done => break,
            backup::StepResult::More => {}
            backup::StepResult::Busy | backup::StepResult::Locked => {
                if start.elapsed() >= busy {
                    return Err(Error::Sqlite {
                        path: dst.to_path_buf(),
                        source: rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                            Some("another connection kept the database locked".into()),
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {}
        }
    }
    drop(b);
    Ok(())
}

/// Conditions under which the switch would fail, found while a rollback is still possible.
fn check_switchable(j: &Journal, entries: &[ArtifactEntry]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(live), Ok(parent)) = (
        fs::symlink_metadata(&j.memdir),
        fs::metadata(fsutil::parent_of(&j.memdir)),
    ) && live.dev() != parent.dev()
    {
        return Err(Error::CannotSwitch {
            path: j.memdir.clone(),
            reason: "it is a mount point, and restore switches the memdir by renaming it: \
                     restore with --target into a folder and copy from there"
                .into(),
        });
    }
    for e in entries.iter().filter(|e| e.part == Part::Sqlite) {
        let EntryKind::Sqlite { page_size, .. } = e.kind else {
            continue;
        };
        let live = j.sqlite_dir.join(std::ffi::OsStr::from_bytes(&e.path));
        if let Some((live_page, true)) = crate::source::sqlite::header(&live)
            && live_page != page_size
        {
            return Err(Error::CannotSwitch {
                path: live,
                reason: format!(
                    "the live database is in WAL mode with {live_page}-byte pages and the \
                     snapshot's has {page_size}-byte pages; SQLite cannot copy between them. \
                     Stop the agent, run `PRAGMA journal_mode=DELETE` on it, and restore again"
                ),
            });
        }
    }
    Ok(())
}

/// Undoes a restore that did not reach `Switching`: removes staging, and the sqlite folder of
/// a `--target` restore that began without one, if it is still an empty folder. Keeping that
/// folder only costs a retry its "not empty": a failure to remove it is logged, never returned,
/// so that it cannot leave the journal in place for every later command.
fn roll_back(fsys: &Fs, j: &Journal) -> Result<(), Error> {
    cleanup(fsys, j)?;
    if !j.created_sqlite_dir {
        return Ok(());
    }
    let dir = &j.sqlite_dir;
    // `rmdir` removes only an empty folder: not one something was put in since, nor a symlink
    // put in its place (ENOTDIR).
    match fsys.remove_dir(dir) {
        Ok(()) => {
            let parent = fsutil::parent_of(dir);
            if let Err(e) = fsys.sync_dir(&parent) {
                tracing::warn!(path = %parent.display(), error = %e, "removed the restore's sqlite folder; its removal may not be durable");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "kept the restore's sqlite folder");
        }
    }
    Ok(())
}

/// Removes staging and the moved-aside memdir.
fn cleanup(fsys: &Fs, j: &Journal) -> Result<(), Error> {
    for p in [j.staged_memdir(), j.old_memdir(), j.staged_sqlite()] {
        if p.symlink_metadata().is_ok() {
            make_writable(&p);
            fsys.remove_any(&p).map_err(|e| Error::io(&p, e))?;
            // Durably gone before the journal that names it is deleted.
            let parent = fsutil::parent_of(&p);
            fsys.sync_dir(&parent).map_err(|e| Error::io(&parent, e))?;
        }
    }
    Ok(())
}

/// A restored read-only folder would block its own removal.
fn make_writable(root: &Path) {
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .follow_root_links(false)
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o700));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Noise pages (stored raw, so that a changed byte reads back without error, changed) stored
    /// as one database's content, restored by [`write_file`] into a temporary folder.
    struct StoredFile {
        dir: tempfile::TempDir,
        store: Store,
        pages: Vec<Vec<u8>>,
        list: Vec<(ChunkId, ChunkLoc)>,
        source: ChunkSource,
        entry: ArtifactEntry,
    }

    impl StoredFile {
        /// `n` pages of `len` bytes.
        fn new(n: u32, len: usize) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::for_test(dir.path());
            let pages: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let mut page = vec![0u8; len];
                    blake3::Hasher::new()
                        .update(&i.to_le_bytes())
                        .finalize_xof()
                        .fill(&mut page);
                    page
                })
                .collect();
            let (content, list, _) = crate::tree::store_pages_kept(&store, &pages);
            let source = ChunkSource::Listed(Arc::new(list.clone()));
            let entry = ArtifactEntry {
                part: Part::Sqlite,
                path: b"db.sqlite".to_vec(),
                kind: EntryKind::File,
                mode: 0o600,
                mtime_ns: 0,
                size: content.size,
                hash: *blake3::hash(&pages.concat()).as_bytes(),
                content: Some(content),
            };
            Self {
                dir,
                store,
                pages,
                list,
                source,
                entry,
            }
        }

        fn restore(&self, packs: &PackFiles, name: &str) -> (Result<(), Error>, PathBuf) {
            let path = self.dir.path().join(name);
            let r = write_file(
                &self.store.fs,
                packs,
                &self.entry,
                Some(&self.source),
                &path,
                true,
                &super::super::NoProgress,
            );
            (r, path)
        }

        /// Flips a bit of raw chunk `i` in its pack; returns the chunk, the pack's path and
        /// the pack open for writing.
        fn damage(&self, packs: &PackFiles, i: usize) -> (ChunkId, ChunkLoc, PathBuf, fs::File) {
            use std::os::unix::fs::FileExt;
            let (id, loc) = self.list[i];
            assert_eq!(loc.flags, 0, "a raw chunk");
            let pack = packs.path(&loc.pack);
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pack)
                .expect("pack");
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, loc.offset + 7).expect("read");
            file.write_all_at(&[byte[0] ^ 1], loc.offset + 7)
                .expect("damage");
            (id, loc, pack, file)
        }
    }

    /// The error's message, after checking that it names one of `chunks` in `pack`.
    fn names_chunk(r: Result<(), Error>, chunks: &[(ChunkId, ChunkLoc)], pack: &Path) -> String {
        match r {
            Err(Error::Store(StoreError::CorruptChunk {
                id: named,
                pack: p,
                message,
            })) => {
                assert!(chunks.iter().any(|(id, _)| id.hex() == named), "{named}");
                assert_eq!(p, pack);
                message
            }
            other => panic!("{other:?}"),
        }
    }

    /// Restore checks a content's hash, not each chunk's: a hash that differs while every chunk
    /// is whole says so; a damaged chunk is traced and named with its pack.
    #[test]
    fn a_hash_mismatch_is_reported_and_a_damaged_chunk_named() {
        let mut f = StoredFile::new(700, 4096);
        let packs = PackFiles::new(&f.store.fs, f.store.packs_dir());
        let (r, path) = f.restore(&packs, "whole");
        r.expect("restores");
        assert!(fs::read(&path).expect("restored") == f.pages.concat());

        f.entry.hash[0] ^= 1;
        match f.restore(&packs, "wrong-hash") {
            (Err(Error::RestoredHashMismatch { path: named, .. }), path) => {
                assert_eq!(named, path)
            }
            (other, _) => panic!("{other:?}"),
        }

        f.entry.hash[0] ^= 1;
        let pack = f.damage(&packs, 500).2;
        names_chunk(f.restore(&packs, "damaged").0, &f.list[500..=500], &pack);
    }

    #[test]
    fn only_plain_relative_paths_are_staged() {
        for ok in ["", "a", "a/b", ".git/objects/ab/cd", "a.b/..c"] {
            assert!(is_plain_path(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "/a", "a/", "a//b", "./a", "a/./x", "a/..", "..", ".", "a/../b",
        ] {
            assert!(!is_plain_path(bad.as_bytes()), "{bad}");
        }
    }

    /// A journal written before `created_sqlite_dir` existed still reads, as "not created": its
    /// rollback removes staging and keeps the sqlite folder, as that memsnap did.
    #[test]
    fn an_older_journal_reads_and_its_rollback_keeps_the_sqlite_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = dir.path().join("sqlite");
        let old = serde_json::json!({
            "version": 1, "phase": "Staging", "snapshot_id": "s", "tenant": "t", "agent": "a",
            "token": "tok", "memdir": dir.path().join("memdir"), "sqlite_dir": sqlite,
            "state_dir": dir.path().join("state"), "has_memdir": false, "databases": [],
            "fs_state": true,
        });
        let j: Journal = serde_json::from_value(old).expect("an older journal reads");
        assert!(!j.created_sqlite_dir);
        fs::create_dir_all(j.staged_sqlite()).expect("staging");
        let fsys = Fs::default();
        roll_back(&fsys, &j).expect("rolls back");
        assert!(!j.staged_sqlite().exists(), "staging removed");
        assert!(sqlite.is_dir(), "the folder it did not create is kept");

        let created = Journal {
            created_sqlite_dir: true,
            ..j
        };
        fs::create_dir_all(created.staged_sqlite()).expect("staging");
        fs::write(sqlite.join("theirs.sqlite"), b"x").expect("a file");
        roll_back(&fsys, &created).expect("rolls back");
        assert!(
            sqlite.join("theirs.sqlite").is_file(),
            "a folder with a file is kept"
        );

        fs::remove_file(sqlite.join("theirs.sqlite")).expect("rm");
        fs::create_dir_all(created.staged_sqlite()).expect("staging");
        roll_back(&fsys, &created).expect("rolls back");
        assert!(!sqlite.exists(), "the empty folder is removed");

        // A symlink put in its place is neither followed nor an error.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, &sqlite).expect("symlink");
        roll_back(&fsys, &created).expect("rolls back");
        assert!(sqlite.symlink_metadata().is_ok() && elsewhere.is_dir());
    }

    /// A file of several batches goes through the pipeline of [`write_batches`] (located, read
    /// ahead, written past the page cache, each batch carrying a tail of under one block to the
    /// next): it restores whole. Damage is named with its chunk and pack: a changed byte (found
    /// by the content's hash), a pack truncated in the last batch (the reader's error, after
    /// every batch was located) and in the first (while the locator still waits to hand on).
    #[test]
    fn a_file_of_several_batches_restores_and_damage_in_it_is_named() {
        // Pages of 4,000 bytes: no batch ends on a block boundary.
        let n = (2 * READ_BATCH_BYTES as usize) / 4000 + 300;
        let f = StoredFile::new(n as u32, 4000);
        let mut batches = f.source.stream();
        let mut count = 0;
        while batches
            .next_batch(READ_BATCH_BYTES)
            .expect("batch")
            .is_some()
        {
            count += 1;
        }
        assert!(count >= 3, "{count} batches");
        let packs = PackFiles::new(&f.store.fs, f.store.packs_dir()).with_direct_reads();
        let (r, path) = f.restore(&packs, "whole");
        r.expect("restores");
        assert!(fs::read(&path).expect("restored") == f.pages.concat());

        let (_, loc, pack, file) = f.damage(&packs, n - 10);
        let damaged = &f.list[n - 10..=n - 10];
        names_chunk(f.restore(&packs, "changed").0, damaged, &pack);

        file.set_len(loc.offset + 100).expect("truncate");
        // It and the chunks after it are cut off (they may span two pieces).
        let message = names_chunk(f.restore(&packs, "late").0, &f.list[n - 10..], &pack);
        assert!(message.contains("truncated"), "{message}");

        // Every piece of the first batch fails: whichever the pool ends on is named.
        let loc = f.list[10].1;
        assert_eq!(packs.path(&loc.pack), pack, "one pack");
        file.set_len(loc.offset + 100).expect("truncate");
        let message = names_chunk(f.restore(&packs, "early").0, &f.list[10..], &pack);
        assert!(message.contains("truncated"), "{message}");
    }
}
