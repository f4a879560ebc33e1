//! Diff: what really changed between two snapshots. Artifacts are compared by their entries
//! (equal BLAKE3 means unchanged, and is never read); only what differs is read: the databases
//! (compared table by table with SQL), the memdir's `.git` (compared with the `git` CLI), the
//! notes and the state JSON. Everything read goes to a scratch folder under the store's `tmp/`,
//! removed afterwards whatever happens.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, StoreError};

use crate::lock::Mode;
use crate::manifest::artifact::{ArtifactEntry, EntryKind, Part};
use crate::manifest::snapshot::SnapshotRecord;
use crate::names::AgentId;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::ChunkLoc;
use crate::store::reader::{ChunkReader, PackFiles};

/// One side of a diff.
#[derive(Debug, Clone, Serialize)]
pub struct DiffSide {
    pub id: String,
    pub tenant: String,
    pub agent: String,
    pub created_at_ms: i64,
    /// The memdir's git HEAD at snapshot time.
    pub git_head: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DiffSummary {
    pub artifacts_added: u64,
    pub artifacts_removed: u64,
    pub artifacts_changed: u64,
    pub artifacts_unchanged: u64,
    /// Bytes of B's data chunks that A does not have.
    pub bytes_changed: u64,
}

/// An artifact that was added, removed or changed.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactChange {
    pub part: String,
    pub path: String,
    pub kind: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// Sum of the sizes of B's data chunks that are not in A's content.
    pub bytes_changed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    pub name: String,
    /// `rowid`, or the primary key columns of a WITHOUT ROWID table.
    pub key: Vec<String>,
    pub rows_added: u64,
    pub rows_removed: u64,
    pub rows_changed: u64,
}

/// A schema object (table, index, trigger, view) added, removed or redefined.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaChange {
    pub kind: String,
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    pub old_sql: Option<String>,
    pub new_sql: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseDiff {
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    pub tables_added: Vec<String>,
    pub tables_removed: Vec<String>,
    /// Tables on both sides whose rows differ.
    pub tables: Vec<TableDiff>,
    pub schema_changes: Vec<SchemaChange>,
    /// Virtual tables (and their shadow tables), not compared row by row.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommitInfo {
    pub oid: String,
    pub subject: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileStat {
    pub path: String,
    /// `None` for a binary file.
    pub insertions: Option<u64>,
    pub deletions: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GitDiff {
    pub a_head: Option<String>,
    pub b_head: Option<String>,
    /// Commits reachable from B's HEAD and not from A's, newest first.
    pub commits: Vec<CommitInfo>,
    pub files_changed: u64,
    pub insertions: u64,
    pub deletions: u64,
    pub files: Vec<FileStat>,
    /// Why commits and line counts are missing (no `git` installed, no HEAD on one side, ...).
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoteChange {
    pub path: String,
    /// A unified diff of the text (with `--patch`).
    pub patch: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NotesDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<NoteChange>,
    /// Why patches are missing, when asked for.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FieldChange {
    /// `a.b[2]`; empty for the whole document.
    pub path: String,
    /// `None`: the field is absent on that side.
    pub old: Option<Value>,
    pub new: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateDiff {
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    pub fields: Vec<FieldChange>,
    /// Set when a side is not valid JSON.
    pub note: Option<String>,
}

/// What changed from snapshot A to snapshot B.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub a: DiffSide,
    pub b: DiffSide,
    /// Nothing differs.
    pub identical: bool,
    pub summary: DiffSummary,
    pub artifacts: Vec<ArtifactChange>,
    pub databases: Vec<DatabaseDiff>,
    /// `None` when neither side has a git memdir.
    pub git: Option<GitDiff>,
    pub notes: NotesDiff,
    pub state: Vec<StateDiff>,
}

/// Removes the diff's scratch folder, whatever happens.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

type Key = (Part, Vec<u8>);
type Locs = Vec<(ChunkId, ChunkLoc)>;

fn is_git(path: &[u8]) -> bool {
    path == b".git" || path.starts_with(b".git/")
}

fn same(a: &ArtifactEntry, b: &ArtifactEntry) -> bool {
    a.hash == b.hash && a.kind == b.kind && a.mode == b.mode
}

fn side(r: &SnapshotRecord) -> DiffSide {
    DiffSide {
        id: r.info.id.clone(),
        tenant: r.info.tenant.clone(),
        agent: r.info.agent.clone(),
        created_at_ms: r.info.created_at_ms,
        git_head: r.info.git.as_ref().map(|g| g.head_oid.clone()),
    }
}

/// What phase 1 (index open) hands to phase 2 (reading data).
struct Loaded {
    a: SnapshotRecord,
    b: SnapshotRecord,
    a_entries: BTreeMap<Key, ArtifactEntry>,
    b_entries: BTreeMap<Key, ArtifactEntry>,
    artifacts: Vec<ArtifactChange>,
    /// The raw key of each of `artifacts`.
    keys: Vec<Key>,
    summary: DiffSummary,
    /// Chunk locations of the artifacts to read, by side (0 = A, 1 = B).
    locs: [BTreeMap<Key, Locs>; 2],
}

pub(crate) fn diff(
    store: &Store,
    a: &str,
    b: &str,
    agent: Option<&AgentId>,
    patch: bool,
) -> Result<DiffReport, Error> {
    // Shared: prune (exclusive) must not remove chunks while they are read.
    let _store_lock = store.lock_store(Mode::Shared)?;
    let loaded = load(store, a, b, agent, patch)?;
    let packs = PackFiles::new(&store.fs, store.packs_dir());
    let scratch = Scratch(store.tmp_dir().join(format!(
        "diff-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )));
    fs::create_dir_all(&scratch.0).map_err(|e| Error::io(&scratch.0, e))?;
    let cx = Cx {
        packs: &packs,
        l: &loaded,
        dir: &scratch.0,
    };
    let databases = cx.databases()?;
    let git = cx.git()?;
    let notes = cx.notes(patch)?;
    let state = cx.state()?;
    drop(scratch);
    let s = &loaded.summary;
    let identical = s.artifacts_added + s.artifacts_removed + s.artifacts_changed == 0;
    Ok(DiffReport {
        a: side(&loaded.a),
        b: side(&loaded.b),
        identical,
        summary: loaded.summary.clone(),
        artifacts: loaded.artifacts.clone(),
        databases,
        git,
        notes,
        state,
    })
}

fn load(
    store: &Store,
    a: &str,
    b: &str,
    agent: Option<&AgentId>,
    patch: bool,
) -> Result<Loaded, Error> {
    // The index only while chunk locations are resolved.
    let index = store.index_for_lookups()?;
    let tx = index.begin_read()?;
    let ra = super::resolve(&index, &tx, a, agent)?;
    let rb = super::resolve(&index, &tx, b, agent)?;
    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
    let keyed = |v: Vec<ArtifactEntry>| -> BTreeMap<Key, ArtifactEntry> {
        v.into_iter()
            .map(|e| ((e.part, e.path.clone()), e))
            .collect()
    };
    let a_entries = keyed(super::load_entries(&mut reader, &ra)?);
    let b_entries = keyed(super::load_entries(&mut reader, &rb)?);
    let mut summary = DiffSummary::default();
    let mut artifacts = Vec::new();
    let mut changed_keys = Vec::new();
    let keys: BTreeSet<&Key> = a_entries.keys().chain(b_entries.keys()).collect();
    let mut wanted: [BTreeSet<Key>; 2] = Default::default();
    let git_changed = a_entries
        .iter()
        .filter(|(k, _)| k.0 == Part::Memdir && is_git(&k.1))
        .count()
        != b_entries
            .iter()
            .filter(|(k, _)| k.0 == Part::Memdir && is_git(&k.1))
            .count()
        || keys.iter().any(|k| {
            k.0 == Part::Memdir
                && is_git(&k.1)
                && match (a_entries.get(*k), b_entries.get(*k)) {
                    (Some(x), Some(y)) => !same(x, y),
                    _ => true,
                }
        });
    let heads_differ =
        ra.info.git.as_ref().map(|g| &g.head_oid) != rb.info.git.as_ref().map(|g| &g.head_oid);
    let mut resolved: [HashMap<Key, Locs>; 2] = Default::default();
    for k in keys {
        let (ea, eb) = (a_entries.get(k), b_entries.get(k));
        let any = ea.or(eb).expect("a key of one side");
        let (change, bytes) = match (ea, eb) {
            (Some(x), Some(y)) if same(x, y) => {
                summary.artifacts_unchanged += 1;
                continue;
            }
            (Some(x), Some(y)) => {
                let bytes = match (&x.content, &y.content) {
                    (Some(cx), Some(cy)) => {
                        // Resolved once: phase 2 reuses the locations of what it reads.
                        let (la, lb) = (reader.resolve(cx)?, reader.resolve(cy)?);
                        let old: HashSet<ChunkId> = la.iter().map(|c| c.0).collect();
                        let bytes = lb
                            .iter()
                            .filter(|c| !old.contains(&c.0))
                            .map(|c| u64::from(c.1.raw_len))
                            .sum();
                        resolved[0].insert(k.clone(), la);
                        resolved[1].insert(k.clone(), lb);
                        bytes
                    }
                    (None, Some(_)) => y.size,
                    _ => 0,
                };
                summary.artifacts_changed += 1;
                ("changed", bytes)
            }
            (None, Some(y)) => {
                summary.artifacts_added += 1;
                ("added", y.size)
            }
            (Some(_), None) => {
                summary.artifacts_removed += 1;
                ("removed", 0)
            }
            (None, None) => continue,
        };
        summary.bytes_changed += bytes;
        artifacts.push(ArtifactChange {
            part: k.0.name().to_owned(),
            path: any.path_lossy(),
            kind: any.kind_name().to_owned(),
            change: change.to_owned(),
            old_size: ea.map(|e| e.size),
            new_size: eb.map(|e| e.size),
            bytes_changed: bytes,
        });
        changed_keys.push(k.clone());
        // Which contents phase 2 reads.
        let read = match k.0 {
            Part::Sqlite | Part::State => true,
            Part::Memdir => !is_git(&k.1) && patch && change == "changed",
        };
        if read {
            for (i, e) in [ea, eb].into_iter().enumerate() {
                if e.is_some_and(|e| e.content.is_some()) {
                    wanted[i].insert(k.clone());
                }
            }
        }
    }
    // The git comparison needs B's whole `.git` and A's objects.
    if git_changed && heads_differ {
        for (k, e) in &b_entries {
            if k.0 == Part::Memdir && is_git(&k.1) && e.content.is_some() {
                wanted[1].insert(k.clone());
            }
        }
        for (k, e) in &a_entries {
            if k.0 == Part::Memdir
                && k.1.starts_with(b".git/objects/")
                && e.content.is_some()
                && !b_entries.contains_key(k)
            {
                wanted[0].insert(k.clone());
            }
        }
    }
    let mut locs: [BTreeMap<Key, Locs>; 2] = Default::default();
    for (i, (set, entries)) in wanted.iter().zip([&a_entries, &b_entries]).enumerate() {
        for k in set {
            if let Some(c) = entries.get(k).and_then(|e| e.content.as_ref()) {
                let l = match resolved[i].remove(k) {
                    Some(l) => l,
                    None => reader.resolve(c)?,
                };
                locs[i].insert(k.clone(), l);
            }
        }
    }
    Ok(Loaded {
        a: ra,
        b: rb,
        a_entries,
        b_entries,
        artifacts,
        keys: changed_keys,
        summary,
        locs,
    })
}

/// Phase 2: reading data, without the index.
struct Cx<'a> {
    packs: &'a PackFiles,
    l: &'a Loaded,
    dir: &'a Path,
}

fn plain(p: &[u8]) -> bool {
    !p.is_empty()
        && p.split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl Cx<'_> {
    fn entry(&self, side: usize, k: &Key) -> Option<&ArtifactEntry> {
        [&self.l.a_entries, &self.l.b_entries][side].get(k)
    }

    /// Writes the content of side `side`'s artifact `k` to `out`, checking its hash.
    fn write(&self, side: usize, k: &Key, out: &mut dyn Write, path: &Path) -> Result<(), Error> {
        let e = self
            .entry(side, k)
            .ok_or_else(|| StoreError::CorruptRecord {
                what: "diff".into(),
                message: "an artifact vanished".into(),
            })?;
        let empty = Vec::new();
        let locs = self.l.locs[side].get(k).unwrap_or(&empty);
        let mut hasher = blake3::Hasher::new();
        for (id, loc) in locs {
            let data = self.packs.read(id, loc)?;
            hasher.update(&data);
            out.write_all(&data).map_err(|err| Error::io(path, err))?;
        }
        if *hasher.finalize().as_bytes() != e.hash {
            return Err(Error::RestoredHashMismatch {
                what: format!("{} {}", e.part.name(), e.path_lossy()),
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    fn bytes(&self, side: usize, k: &Key) -> Result<Vec<u8>, Error> {
        let mut v = Vec::new();
        self.write(
            side,
            k,
            &mut v,
            Path::new(&String::from_utf8_lossy(&k.1).into_owned()),
        )?;
        Ok(v)
    }

    fn to_file(&self, side: usize, k: &Key, path: &Path) -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        self.write(side, k, &mut w, path)?;
        w.flush().map_err(|e| Error::io(path, e))
    }

    fn changes(&self, part: Part) -> impl Iterator<Item = (Key, &str)> + '_ {
        self.l
            .keys
            .iter()
            .zip(&self.l.artifacts)
            .filter(move |(k, _)| k.0 == part)
            .map(|(k, c)| (k.clone(), c.change.as_str()))
    }

    fn databases(&self) -> Result<Vec<DatabaseDiff>, Error> {
        let mut out = Vec::new();
        for (n, (k, change)) in self.changes(Part::Sqlite).enumerate() {
            let is_db = |s: usize| {
                self.entry(s, &k)
                    .is_some_and(|e| matches!(e.kind, EntryKind::Sqlite { .. }))
            };
            if !is_db(0) && !is_db(1) {
                continue;
            }
            let files = [0, 1].map(|s| self.dir.join(format!("db-{n}-{s}.sqlite")));
            for (s, f) in files.iter().enumerate() {
                if self.l.locs[s].contains_key(&k) {
                    self.to_file(s, &k, f)?;
                    unwal(f)?;
                } else {
                    // An empty database stands for the missing side.
                    Connection::open(f).map_err(|e| sqlerr(f, e))?;
                }
            }
            let mut d = compare_databases(&files[0], &files[1])?;
            d.name = String::from_utf8_lossy(&k.1).into_owned();
            d.change = change.to_owned();
            out.push(d);
            for f in &files {
                let _ = fs::remove_file(f);
            }
        }
        Ok(out)
    }

    fn git(&self) -> Result<Option<GitDiff>, Error> {
        let (ga, gb) = (&self.l.a.info.git, &self.l.b.info.git);
        let has_git = |m: &BTreeMap<Key, ArtifactEntry>| {
            m.keys().any(|k| k.0 == Part::Memdir && is_git(&k.1))
        };
        if ga.is_none()
            && gb.is_none()
            && !has_git(&self.l.a_entries)
            && !has_git(&self.l.b_entries)
        {
            return Ok(None);
        }
        let mut g = GitDiff {
            a_head: ga.as_ref().map(|g| g.head_oid.clone()),
            b_head: gb.as_ref().map(|g| g.head_oid.clone()),
            ..Default::default()
        };
        let (Some(ha), Some(hb)) = (&g.a_head, &g.b_head) else {
            g.note = Some("one side has no git HEAD".into());
            return Ok(Some(g));
        };
        if ha == hb {
            return Ok(Some(g));
        }
        if !git_available() {
            g.note = Some("git is not installed: commits and line counts not computed".into());
            return Ok(Some(g));
        }
        let (ha, hb) = (ha.clone(), hb.clone());
        let root = self.dir.join("git");
        for side in [1, 0] {
            for k in self.l.locs[side].keys() {
                if k.0 != Part::Memdir || !is_git(&k.1) || !plain(&k.1) {
                    continue;
                }
                let rel = String::from_utf8_lossy(&k.1).into_owned();
                if !matches!(self.entry(side, k).map(|e| &e.kind), Some(EntryKind::File)) {
                    continue;
                }
                self.to_file(side, k, &root.join(&rel))?;
            }
        }
        let gd = root.join(".git");
        for d in ["refs", "objects"] {
            fs::create_dir_all(gd.join(d)).map_err(|e| Error::io(&gd, e))?;
        }
        if !gd.join("HEAD").exists() {
            fs::write(gd.join("HEAD"), format!("{hb}\n")).map_err(|e| Error::io(&gd, e))?;
        }
        let log = run_git(
            &gd,
            &[
                "log",
                "--no-color",
                "--format=%H%x09%s",
                &format!("{ha}..{hb}"),
            ],
        );
        let stat = run_git(&gd, &["diff", "--no-renames", "--numstat", &ha, &hb]);
        match (log, stat) {
            (Ok(log), Ok(stat)) => {
                for line in log.lines().filter(|l| !l.is_empty()) {
                    let (oid, subject) = line.split_once('\t').unwrap_or((line, ""));
                    g.commits.push(CommitInfo {
                        oid: oid.to_owned(),
                        subject: subject.to_owned(),
                    });
                }
                for line in stat.lines().filter(|l| !l.is_empty()) {
                    let mut it = line.splitn(3, '\t');
                    let (i, d, p) = (it.next(), it.next(), it.next());
                    let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
                    let f = FileStat {
                        path: p.unwrap_or_default().to_owned(),
                        insertions: num(i),
                        deletions: num(d),
                    };
                    g.insertions += f.insertions.unwrap_or(0);
                    g.deletions += f.deletions.unwrap_or(0);
                    g.files.push(f);
                }
                g.files_changed = g.files.len() as u64;
            }
            (Err(m), _) | (_, Err(m)) => g.note = Some(m),
        }
        let _ = fs::remove_dir_all(&root);
        Ok(Some(g))
    }

    fn notes(&self, patch: bool) -> Result<NotesDiff, Error> {
        let mut n = NotesDiff::default();
        let git = patch && git_available();
        if patch && !git {
            n.note = Some("git is not installed: no patches".into());
        }
        let changes: Vec<(Key, String)> = self
            .changes(Part::Memdir)
            .filter(|(k, _)| !is_git(&k.1))
            .map(|(k, c)| (k, c.to_owned()))
            .collect();
        for (i, (k, change)) in changes.into_iter().enumerate() {
            let kind_ok = |s: usize| {
                self.entry(s, &k)
                    .is_some_and(|e| matches!(e.kind, EntryKind::File | EntryKind::Symlink { .. }))
            };
            if !kind_ok(0) && !kind_ok(1) {
                continue;
            }
            let path = String::from_utf8_lossy(&k.1).into_owned();
            match change.as_str() {
                "added" => n.added.push(path),
                "removed" => n.removed.push(path),
                _ => {
                    let patch = if git
                        && self.l.locs[0].contains_key(&k)
                        && self.l.locs[1].contains_key(&k)
                    {
                        Some(self.note_patch(i, &k, &path)?)
                    } else {
                        None
                    };
                    n.changed.push(NoteChange { path, patch });
                }
            }
        }
        Ok(n)
    }

    fn note_patch(&self, i: usize, k: &Key, path: &str) -> Result<String, Error> {
        let dir = self.dir.join(format!("note-{i}"));
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        self.to_file(0, k, &dir.join("old"))?;
        self.to_file(1, k, &dir.join("new"))?;
        let out = git_cmd()
            .current_dir(&dir)
            .args([
                "diff",
                "--no-index",
                "--no-color",
                "--no-ext-diff",
                "old",
                "new",
            ])
            .output();
        let _ = fs::remove_dir_all(&dir);
        let out = out.map_err(|e| Error::io(&dir, e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut patch = format!("--- a/{path}\n+++ b/{path}\n");
        let mut body = false;
        for line in text.lines() {
            body |= line.starts_with("@@") || line.starts_with("Binary files");
            if body {
                patch.push_str(line);
                patch.push('\n');
            }
        }
        Ok(patch)
    }

    fn state(&self) -> Result<Vec<StateDiff>, Error> {
        let mut out = Vec::new();
        let changes: Vec<(Key, String)> = self
            .changes(Part::State)
            .map(|(k, c)| (k, c.to_owned()))
            .collect();
        for (k, change) in changes {
            let mut docs = [None, None];
            let mut note = None;
            for (s, doc) in docs.iter_mut().enumerate() {
                if self.l.locs[s].contains_key(&k) {
                    let bytes = self.bytes(s, &k)?;
                    match serde_json::from_slice::<Value>(&bytes) {
                        Ok(v) => *doc = Some(v),
                        Err(e) => note = Some(format!("not JSON: {e}")),
                    }
                }
            }
            let mut fields = Vec::new();
            if note.is_none() {
                let [a, b] = docs;
                json_diff(String::new(), a.as_ref(), b.as_ref(), &mut fields);
            }
            out.push(StateDiff {
                name: String::from_utf8_lossy(&k.1).into_owned(),
                change,
                fields,
                note,
            });
        }
        Ok(out)
    }
}

fn sqlerr(path: &Path, source: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Marks a materialised copy as a rollback-journal database (header bytes 18-19), so that it
/// opens read-only without a `-wal` or `-shm`.
fn unwal(path: &Path) -> Result<(), Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 20];
    if f.read_exact(&mut head).is_ok() && head[18] == 2 && head[19] == 2 {
        f.seek(SeekFrom::Start(18))
            .and_then(|_| f.write_all(&[1, 1]))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn uri(path: &Path) -> String {
    let s = path.to_string_lossy();
    let mut out = String::from("file:");
    for ch in s.chars() {
        match ch {
            '?' | '#' | '%' => out.push_str(&format!("%{:02X}", ch as u32)),
            c => out.push(c),
        }
    }
    out.push_str("?mode=ro");
    out
}

struct SchemaObj {
    kind: String,
    sql: Option<String>,
}

fn schema(c: &Connection, db: &str, path: &Path) -> Result<BTreeMap<String, SchemaObj>, Error> {
    let mut st = c
        .prepare(&format!("SELECT type, name, sql FROM {db}.sqlite_schema"))
        .map_err(|e| sqlerr(path, e))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                SchemaObj {
                    kind: r.get(0)?,
                    sql: r.get(2)?,
                },
            ))
        })
        .map_err(|e| sqlerr(path, e))?;
    rows.collect::<Result<_, _>>().map_err(|e| sqlerr(path, e))
}

/// Virtual tables and their shadow tables (`<vt>_data`, `_idx`, `_content`, `_docsize`,
/// `_config`), plus SQLite's own.
fn skipped_names(s: &BTreeMap<String, SchemaObj>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, o) in s {
        let virt = o.sql.as_deref().is_some_and(|q| {
            q.trim_start()
                .to_ascii_uppercase()
                .starts_with("CREATE VIRTUAL")
        });
        if virt {
            out.insert(name.clone());
            for suffix in ["_data", "_idx", "_content", "_docsize", "_config"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    out
}

fn columns(
    c: &Connection,
    db: &str,
    table: &str,
    path: &Path,
) -> Result<Vec<(String, i64)>, Error> {
    let mut st = c
        .prepare(&format!("PRAGMA {db}.table_info({})", quote(table)))
        .map_err(|e| sqlerr(path, e))?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?)))
        .map_err(|e| sqlerr(path, e))?;
    rows.collect::<Result<_, _>>().map_err(|e| sqlerr(path, e))
}

fn compare_databases(a: &Path, b: &Path) -> Result<DatabaseDiff, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    let c = Connection::open_with_flags(uri(a), flags).map_err(|e| sqlerr(a, e))?;
    c.execute("ATTACH DATABASE ?1 AS b", [uri(b)])
        .map_err(|e| sqlerr(b, e))?;
    let (sa, sb) = (schema(&c, "main", a)?, schema(&c, "b", b)?);
    let skip: BTreeSet<String> = skipped_names(&sa)
        .union(&skipped_names(&sb))
        .cloned()
        .collect();
    let mut d = DatabaseDiff {
        name: String::new(),
        change: String::new(),
        tables_added: Vec::new(),
        tables_removed: Vec::new(),
        tables: Vec::new(),
        schema_changes: Vec::new(),
        skipped: Vec::new(),
    };
    let names: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
    for name in names {
        if name.starts_with("sqlite_") {
            continue;
        }
        let (oa, ob) = (sa.get(name), sb.get(name));
        let shadow = skip.contains(name)
            && !oa.or(ob).is_some_and(|o| {
                o.sql
                    .as_deref()
                    .is_some_and(|q| q.to_ascii_uppercase().contains("VIRTUAL"))
            });
        if shadow {
            continue;
        }
        let kind = oa.or(ob).map(|o| o.kind.clone()).unwrap_or_default();
        let change = match (oa, ob) {
            (Some(x), Some(y)) if x.sql == y.sql && x.kind == y.kind => None,
            (Some(_), Some(_)) => Some("changed"),
            (None, Some(_)) => Some("added"),
            (Some(_), None) => Some("removed"),
            (None, None) => None,
        };
        if let Some(ch) = change {
            d.schema_changes.push(SchemaChange {
                kind: kind.clone(),
                name: name.clone(),
                change: ch.to_owned(),
                old_sql: oa.and_then(|o| o.sql.clone()),
                new_sql: ob.and_then(|o| o.sql.clone()),
            });
        }
        if kind != "table" {
            continue;
        }
        if skip.contains(name) {
            d.skipped.push(name.clone());
            continue;
        }
        match (oa, ob) {
            (None, Some(_)) => d.tables_added.push(name.clone()),
            (Some(_), None) => d.tables_removed.push(name.clone()),
            (Some(x), Some(y)) if x.kind == "table" && y.kind == "table" => {
                if let Some(t) = compare_table(&c, name, a, b)? {
                    d.tables.push(t);
                }
            }
            _ => {}
        }
    }
    Ok(d)
}

fn compare_table(
    c: &Connection,
    table: &str,
    a: &Path,
    b: &Path,
) -> Result<Option<TableDiff>, Error> {
    let (ca, cb) = (columns(c, "main", table, a)?, columns(c, "b", table, b)?);
    let names_b: HashSet<&str> = cb.iter().map(|x| x.0.as_str()).collect();
    let common: Vec<String> = ca
        .iter()
        .filter(|x| names_b.contains(x.0.as_str()))
        .map(|x| quote(&x.0))
        .collect();
    let without_rowid = sqlite_without_rowid(c, table);
    let key: Vec<String> = if without_rowid {
        let mut pk: Vec<&(String, i64)> = ca.iter().filter(|x| x.1 > 0).collect();
        pk.sort_by_key(|x| x.1);
        pk.iter().map(|x| x.0.clone()).collect()
    } else {
        vec!["rowid".to_owned()]
    };
    let key_sql: Vec<String> = if without_rowid {
        key.iter().map(|k| quote(k)).collect()
    } else {
        vec!["_rowid_".to_owned()]
    };
    let keys = key_sql.join(", ");
    let mut full = key_sql.clone();
    full.extend(common.iter().filter(|c| !key_sql.contains(c)).cloned());
    let full = full.join(", ");
    let t = quote(table);
    let count = |sql: String| -> Result<u64, Error> {
        c.query_row(&sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| sqlerr(b, e))
    };
    let added = count(format!(
        "SELECT count(*) FROM (SELECT {keys} FROM b.{t} EXCEPT SELECT {keys} FROM main.{t})"
    ))?;
    let removed = count(format!(
        "SELECT count(*) FROM (SELECT {keys} FROM main.{t} EXCEPT SELECT {keys} FROM b.{t})"
    ))?;
    let differ = count(format!(
        "SELECT count(*) FROM (SELECT {full} FROM b.{t} EXCEPT SELECT {full} FROM main.{t})"
    ))?;
    let changed = differ.saturating_sub(added);
    if added + removed + changed == 0 {
        return Ok(None);
    }
    Ok(Some(TableDiff {
        name: table.to_owned(),
        key,
        rows_added: added,
        rows_removed: removed,
        rows_changed: changed,
    }))
}

fn sqlite_without_rowid(c: &Connection, table: &str) -> bool {
    c.query_row(
        &format!("SELECT _rowid_ FROM main.{} LIMIT 0", quote(table)),
        [],
        |_| Ok(()),
    )
    .is_err_and(|e| !matches!(e, rusqlite::Error::QueryReturnedNoRows))
}

fn git_cmd() -> Command {
    let mut cmd = Command::new("git");
    for (key, value) in [
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("GIT_PAGER", "cat"),
        ("LC_ALL", "C"),
    ] {
        cmd.env(key, value);
    }
    for key in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

fn git_available() -> bool {
    git_cmd()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_git(git_dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git_cmd()
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The fields that differ between two JSON values, as paths (`a.b[2]`).
fn json_diff(path: String, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<FieldChange>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                json_diff(join(k), x.get(k), y.get(k), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                json_diff(format!("{path}[{i}]"), x.get(i), y.get(i), out);
            }
        }
        (x, y) if x == y => {}
        (x, y) => out.push(FieldChange {
            path,
            old: x.cloned(),
            new: y.cloned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_name_nested_fields() {
        let a = serde_json::json!({"a": {"b": [1, 2, 3]}, "s": "x", "gone": 1});
        let b = serde_json::json!({"a": {"b": [1, 2, 4]}, "s": "y", "new": true});
        let mut out = Vec::new();
        json_diff(String::new(), Some(&a), Some(&b), &mut out);
        let paths: Vec<&str> = out.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.b[2]", "gone", "new", "s"]);
        assert_eq!(out[1].new, None);
        assert_eq!(out[2].old, None);
    }
}
