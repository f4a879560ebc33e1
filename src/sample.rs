//! A deterministic, realistic sample agent: a git "memdir" of markdown notes, four SQLite databases
//! and two state JSON files, used by `memsnap demo`, integration tests and benchmarks.
//!
//! All content comes from `StdRng` streams seeded from the spec's seed (one stream per part, so
//! changing one count leaves the other parts alone), and git runs with a fixed identity, fixed dates
//! and no user or system config. The same spec therefore always yields the same notes, rows and
//! commit ids, so tests and benchmarks can compare snapshots against known inputs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags, Statement, params};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SampleError {
    #[error("sample agent: I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sample agent: SQLite error in {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("sample agent: `git {args}` failed: {stderr} (is git installed and on PATH?)")]
    Git { args: String, stderr: String },
}

type E = SampleError;

/// Embedding width: 768 little-endian f32, 3072 bytes per row.
pub const VECTOR_DIM: usize = 768;
/// Measured vector.sqlite bytes per embedding row: a ~3.1 KiB row fills a 4 KiB page on its own,
/// plus its share of the memory_id index.
pub const VECTOR_ROW_BYTES: u64 = 4_120;
/// 2026-01-01T00:00:00Z; every generated timestamp is relative to it.
const EPOCH: i64 = 1_767_225_600;
const DAY: i64 = 86_400;
const MODEL: &str = "nomic-embed-text-v1.5";
const FOLDERS: [&str; 4] = ["topics", "people", "projects", "daily"];

// '|'-separated so rustfmt keeps the lists compact.
const TOPICS: &str = "rust-async|sqlite-tuning|vector-search|prompt-design|memory-consolidation|\
    git-workflows|error-handling|rate-limits|embedding-models|testing-strategy|deployment|\
    observability|cost-tracking|tokenizers|caching|code-review";
const PEOPLE: &str = "alice-chen|bob-martinez|carol-okafor|dmitri-ivanov|erin-walsh|\
    farah-haddad|gus-lindqvist|hana-sato";
const PROJECTS: &str =
    "memsnap|dreamer|inbox-triage|billing-migration|docs-site|eval-harness|search-revamp";
const SUBJECTS: &str = "The user|Alice|The build|The nightly job|Our retriever|The deploy script|\
    Bob|The eval suite|The team|This project|Carol|The on-call rotation|The indexer";
const VERBS: &str = "prefers|needs|broke because of|was fixed by|depends on|should avoid|\
    is blocked on|benefits from|asked about|documented|keeps forgetting|wants to try";
const OBJECTS: &str = "short answers with code first|WAL checkpoints after large imports|\
    a retry with exponential backoff|the 768-dim embedding model|pinning the Rust toolchain|\
    weekly summaries on Fridays|smaller context windows|the staging database|FTS5 prefix queries|\
    explicit timeouts on HTTP calls|reviewing diffs before merge|UTC timestamps everywhere|\
    the flaky integration test|batching inserts in one transaction|a dark-mode dashboard|\
    the quarterly planning doc|deduplicating near-identical memories";
const TAILS: &str = "| (confirmed twice)| since last sprint| according to the logs|\
    , see the linked issue| in most cases| when the repo is large| after the 2.0 release";
const KINDS: &str = "fact|preference|episode|instruction|reflection|fact|episode";
const QUALIFIERS: &str = "core|flaky|legacy|urgent|recurring|experimental|shared|personal";
const RELATIONS: &str = "related_to|part_of|depends_on|contradicts|example_of";

const LONG_TERM_SQL: &str = "PRAGMA user_version = 3;
CREATE TABLE memories(id INTEGER PRIMARY KEY, kind TEXT, content TEXT, created_at INTEGER,
    importance REAL);
CREATE INDEX memories_created ON memories(created_at);
CREATE VIRTUAL TABLE memories_fts USING fts5(content, content='memories', content_rowid='id');
CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts(rowid, content) VALUES (new.id, new.content); END;
CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;";
const VECTOR_SQL: &str = "PRAGMA user_version = 2;
CREATE TABLE embeddings(id INTEGER PRIMARY KEY, memory_id INTEGER, model TEXT, dim INTEGER,
    vec BLOB NOT NULL);
CREATE INDEX embeddings_memory ON embeddings(memory_id);";
const CONCEPTS_SQL: &str = "PRAGMA user_version = 1;
CREATE TABLE concepts(id INTEGER PRIMARY KEY, name TEXT NOT NULL, summary TEXT, salience REAL,
    created_at INTEGER);
CREATE INDEX concepts_name ON concepts(name);
CREATE TABLE concept_links(src INTEGER NOT NULL REFERENCES concepts(id),
    dst INTEGER NOT NULL REFERENCES concepts(id), relation TEXT NOT NULL, weight REAL,
    PRIMARY KEY(src, dst, relation)) WITHOUT ROWID;";
const COMPACTIONS_SQL: &str = "PRAGMA user_version = 1;
CREATE TABLE compactions(id INTEGER PRIMARY KEY, session TEXT NOT NULL, started_at INTEGER,
    finished_at INTEGER, tokens_before INTEGER, tokens_after INTEGER, summary TEXT);";

#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub seed: u64,
    /// Markdown notes in the memdir, spread over the topic folders.
    pub notes: usize,
    /// Git history length (at least 1 commit is always made).
    pub commits: usize,
    /// Rows in long_term.sqlite `memories` (and its FTS5 index).
    pub memories: usize,
    /// Rows in vector.sqlite `embeddings` (3072-byte blob each).
    pub vectors: usize,
    /// Rows in concepts.sqlite `concepts` (plus ~1.5x as many `concept_links`).
    pub concepts: usize,
    /// Rows in compactions.sqlite `compactions`.
    pub compactions: usize,
}

impl SampleSpec {
    /// For fast tests: 20 notes, 3 commits, 50 memories, 200 vectors, 10 concepts, 3 compactions.
    pub fn tiny() -> Self {
        Self::counts(7, [20, 3, 50, 200, 10, 3])
    }

    /// For `memsnap demo`: 200 notes, 8 commits, 2000 memories, 5000 vectors (~20 MiB).
    pub fn demo() -> Self {
        Self::counts(42, [200, 8, 2000, 5000, 200, 20])
    }

    /// A spec whose vector.sqlite is about `bytes` big, with 2000 notes and the other tables in
    /// the proportions of [`SampleSpec::demo`], for benchmarks.
    pub fn with_total_bytes(bytes: u64, seed: u64) -> Self {
        let v = (bytes / VECTOR_ROW_BYTES).max(1) as usize;
        let (concepts, compactions) = ((v / 25).max(10), (v / 250).max(3));
        Self::counts(seed, [2000, 20, v / 5 * 2, v, concepts, compactions])
    }

    /// `n` = [notes, commits, memories, vectors, concepts, compactions].
    fn counts(seed: u64, n: [usize; 6]) -> Self {
        let [notes, commits, memories, vectors, concepts, compactions] = n;
        Self {
            seed,
            notes,
            commits,
            memories,
            vectors,
            concepts,
            compactions,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SampleAgent {
    root: PathBuf,
}

impl SampleAgent {
    /// Creates ROOT/memdir (git repo, branch main), ROOT/sqlite/{long_term,vector,concepts,
    /// compactions}.sqlite and ROOT/state/{extract_cursor,dream_run}.json.
    /// Fails if ROOT/memdir or ROOT/sqlite already exist.
    pub fn create(root: &Path, spec: &SampleSpec) -> Result<SampleAgent, SampleError> {
        let agent = SampleAgent::open(root);
        for dir in [agent.memdir(), agent.sqlite_dir()] {
            if dir.exists() {
                let kind = std::io::ErrorKind::AlreadyExists;
                return Err(io(&dir)(std::io::Error::new(kind, "refusing to overwrite")));
            }
        }
        for dir in [agent.memdir(), agent.sqlite_dir(), agent.state_dir()] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        agent.build_memdir(spec)?;
        agent.build_databases(spec)?;
        let (rng, secs) = (
            &mut stream(spec.seed, 6),
            commit_secs(spec.commits.max(1) - 1),
        );
        agent.write_state(rng, secs, spec.memories as i64, spec.memories)?;
        Ok(agent)
    }

    /// An existing agent; nothing is checked until a method touches the files.
    pub fn open(root: &Path) -> SampleAgent {
        let root = root.to_path_buf();
        SampleAgent { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn memdir(&self) -> PathBuf {
        self.root.join("memdir")
    }

    pub fn sqlite_dir(&self) -> PathBuf {
        self.root.join("sqlite")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// "A day of work": appends round(fraction * vectors) embedding rows and round(fraction *
    /// memories) memories, edits 3 notes, adds a daily note, commits, and updates both state files.
    pub fn append_day(&self, seed: u64, fraction: f64) -> Result<(), SampleError> {
        let (memdir, dir, rng) = (self.memdir(), self.sqlite_dir(), &mut stream(seed, 10));
        let day: usize = git(&memdir, &["rev-list", "--count", "HEAD"], None)?
            .parse()
            .unwrap_or(0);
        let secs = commit_secs(day);
        let (added, last_memory) = with_db(&dir.join("long_term.sqlite"), false, |c| {
            let add = scaled(count(c, "memories")?, fraction, 1.0);
            insert_memories(c, rng, add, secs - 3600, 3600)?;
            let sql = "SELECT coalesce(max(id), 0) FROM memories";
            Ok((add, c.query_row(sql, [], |r| r.get::<_, i64>(0))?))
        })?;
        with_db(&dir.join("vector.sqlite"), false, |c| {
            let add = scaled(count(c, "embeddings")?, fraction, 1.0);
            insert_vectors(c, rng, add, last_memory.max(1))
        })?;
        let notes = all_notes(&memdir)?;
        for i in rand::seq::index::sample(rng, notes.len(), notes.len().min(3)) {
            append_update(&notes[i], rng, secs)?;
        }
        let daily = memdir.join("daily");
        fs::create_dir_all(&daily).map_err(io(&daily))?;
        let mut j = list_files(&daily, ".md")?.len() as i64;
        let stem = loop {
            let stem = day_str(EPOCH + j * DAY);
            if !daily.join(format!("{stem}.md")).exists() {
                break stem;
            }
            j += 1;
        };
        let text = note_text("daily", &stem, rng, secs);
        write(&daily.join(format!("{stem}.md")), &text)?;
        write_index(&memdir, secs)?;
        commit(&memdir, secs, &format!("day {day}: {added} new memories"))?;
        self.write_state(rng, secs, last_memory, added)
    }

    /// Rewrites `fraction` of the embedding rows in place (UPDATE of the blob) and deletes another
    /// `fraction`, scattered uniformly over the table. `fraction` is clamped to 0..=0.5.
    pub fn update_day(&self, seed: u64, fraction: f64) -> Result<(), SampleError> {
        let rng = &mut stream(seed, 11);
        with_db(&self.sqlite_dir().join("vector.sqlite"), false, |c| {
            let ids: Vec<i64> = c
                .prepare("SELECT id FROM embeddings ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let k = scaled(ids.len() as i64, fraction, 0.5);
            let picked =
                rand::seq::index::sample(rng, ids.len(), (2 * k).min(ids.len())).into_vec();
            let (update, delete) = picked.split_at(k.min(picked.len()));
            let mut buf = Vec::with_capacity(VECTOR_DIM * 4);
            let sql = "UPDATE embeddings SET vec = ?1 WHERE id = ?2";
            fill(c, sql, update.len(), |st, n| {
                random_vec(rng, &mut buf);
                st.execute(params![buf, ids[update[n]]])
            })?;
            let sql = "DELETE FROM embeddings WHERE id = ?1";
            fill(c, sql, delete.len(), |st, n| st.execute([ids[delete[n]]]))
        })
    }

    /// VACUUM of vector.sqlite.
    pub fn vacuum_vectors(&self) -> Result<(), SampleError> {
        let path = self.sqlite_dir().join("vector.sqlite");
        with_db(&path, false, |c| c.execute_batch("VACUUM"))
    }

    /// "db.table" -> row count for every ordinary and virtual table of every `*.sqlite` in
    /// sqlite_dir; `sqlite_*` internals and FTS shadow tables are skipped.
    pub fn row_counts(&self) -> Result<BTreeMap<String, i64>, SampleError> {
        let (dir, mut out) = (self.sqlite_dir(), BTreeMap::new());
        let sql = "SELECT name FROM pragma_table_list WHERE schema = 'main' \
                   AND type IN ('table', 'virtual') AND name NOT LIKE 'sqlite_%'";
        for file in list_files(&dir, ".sqlite")? {
            let counts = with_db(&dir.join(&file), false, |c| {
                let tables: Vec<String> = c
                    .prepare(sql)?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let counted = tables.into_iter().map(|t| Ok((count(c, &t)?, t)));
                counted.collect::<rusqlite::Result<Vec<_>>>()
            })?;
            for (n, table) in counts {
                out.insert(format!("{}.{table}", file.trim_end_matches(".sqlite")), n);
            }
        }
        Ok(out)
    }

    /// Current HEAD commit id (40 hex), None if the repository has no commit yet.
    pub fn git_head(&self) -> Result<Option<String>, SampleError> {
        let args = ["rev-parse", "--verify", "-q", "HEAD"];
        let out = git_output(&self.memdir(), &args, None)?;
        if out.status.success() {
            let head = String::from_utf8_lossy(&out.stdout).trim().to_string();
            return Ok(Some(head));
        }
        // `--verify -q` exits 1 silently when HEAD is unborn; anything else is a real failure.
        if out.status.code() == Some(1) && out.stderr.is_empty() {
            return Ok(None);
        }
        Err(git_fail(&args, &String::from_utf8_lossy(&out.stderr)))
    }

    fn build_memdir(&self, spec: &SampleSpec) -> Result<(), E> {
        let (memdir, commits) = (self.memdir(), spec.commits.max(1));
        let rng = &mut stream(spec.seed, 1);
        let init = ["-c", "init.defaultBranch=main", "init", "-q"];
        git(&memdir, &init, None)?;
        let mut written: Vec<PathBuf> = Vec::new();
        for c in 0..commits {
            let secs = commit_secs(c);
            // Later sessions revisit older notes, as a real agent does.
            for _ in 0..if c > 0 { written.len().min(2) } else { 0 } {
                append_update(&written[rng.random_range(0..written.len())], rng, secs)?;
            }
            for i in spec.notes * c / commits..spec.notes * (c + 1) / commits {
                let (folder, stem) = note_name(i);
                let dir = memdir.join(folder);
                fs::create_dir_all(&dir).map_err(io(&dir))?;
                let path = dir.join(format!("{stem}.md"));
                write(&path, &note_text(folder, &stem, rng, secs))?;
                written.push(path);
            }
            write_index(&memdir, secs)?;
            let message = format!("session {}: {} notes", c + 1, written.len());
            commit(&memdir, secs, &message)?;
        }
        Ok(())
    }

    fn build_databases(&self, spec: &SampleSpec) -> Result<(), E> {
        let (dir, seed) = (self.sqlite_dir(), spec.seed);
        with_db(&dir.join("long_term.sqlite"), true, |c| {
            c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
            c.execute_batch(LONG_TERM_SQL)?;
            let (rng, t0) = (&mut stream(seed, 2), EPOCH - 90 * DAY);
            insert_memories(c, rng, spec.memories, t0, 90 * DAY)
        })?;
        with_db(&dir.join("vector.sqlite"), true, |c| {
            c.execute_batch(VECTOR_SQL)?;
            let rng = &mut stream(seed, 3);
            insert_vectors(c, rng, spec.vectors, (spec.memories as i64).max(1))
        })?;
        with_db(&dir.join("concepts.sqlite"), true, |c| {
            c.execute_batch(CONCEPTS_SQL)?;
            let (rng, n) = (&mut stream(seed, 4), spec.concepts as i64);
            let sql =
                "INSERT INTO concepts(name, summary, salience, created_at) VALUES (?, ?, ?, ?)";
            fill(c, sql, spec.concepts, |st, i| {
                let topic = pick(rng, TOPICS).replace('-', " ");
                let name = format!("{} {topic}", pick(rng, QUALIFIERS));
                let (at, salience) = (EPOCH - (n - i as i64) * 600, rng.random::<f64>());
                st.execute(params![name, sentence(rng), salience, at])
            })?;
            let links = if n >= 2 { spec.concepts * 3 / 2 } else { 0 };
            let sql = "INSERT OR IGNORE INTO concept_links VALUES (?, ?, ?, ?)";
            fill(c, sql, links, |st, _| {
                let src = rng.random_range(1..=n);
                let dst = (src + rng.random_range(0..n - 1)) % n + 1; // never src itself
                st.execute(params![src, dst, pick(rng, RELATIONS), rng.random::<f64>()])
            })
        })?;
        with_db(&dir.join("compactions.sqlite"), true, |c| {
            c.execute_batch(COMPACTIONS_SQL)?;
            let rng = &mut stream(seed, 5);
            let sql = "INSERT INTO compactions(session, started_at, finished_at, tokens_before, \
                       tokens_after, summary) VALUES (?, ?, ?, ?, ?, ?)";
            fill(c, sql, spec.compactions, |st, i| {
                let start = EPOCH - (spec.compactions - i) as i64 * 7200;
                let (before, session) = (rng.random_range(60_000..190_000i64), session_id(rng));
                let end = start + rng.random_range(5..90);
                let (after, summary) = (before / rng.random_range(4..12), sentences(rng, 3, 8));
                st.execute(params![session, start, end, before, after, summary])
            })
        })
    }

    /// State files as the agent would leave them at `secs` after memory `last`, `n` consolidated.
    fn write_state(&self, rng: &mut StdRng, secs: i64, last: i64, n: usize) -> Result<(), E> {
        let ms = secs * 1000;
        let cursor = serde_json::json!({
            "last_message_id": last * 7 + 3,
            "updated_at_ms": ms,
            "session": session_id(rng),
        });
        let dream = serde_json::json!({
            "last_run_at_ms": ms + 120_000,
            "status": "ok",
            "memories_consolidated": n,
            "duration_ms": rng.random_range(800..90_000u64),
        });
        for (name, value) in [("extract_cursor.json", cursor), ("dream_run.json", dream)] {
            let path = self.state_dir().join(name);
            let text = serde_json::to_string_pretty(&value).map_err(|e| io(&path)(e.into()))?;
            write(&path, &(text + "\n"))?;
        }
        Ok(())
    }
}

/// Independent deterministic stream `n` of `seed`.
fn stream(seed: u64, n: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pick<'a>(rng: &mut StdRng, list: &'a str) -> &'a str {
    let n = list.matches('|').count() + 1;
    list.split('|').nth(rng.random_range(0..n)).unwrap_or(list)
}

fn sentence(rng: &mut StdRng) -> String {
    let (s, v, o) = (pick(rng, SUBJECTS), pick(rng, VERBS), pick(rng, OBJECTS));
    format!("{s} {v} {o}{}.", pick(rng, TAILS))
}

fn sentences(rng: &mut StdRng, min: usize, max: usize) -> String {
    let n = rng.random_range(min..=max);
    (0..n).map(|_| sentence(rng)).collect::<Vec<_>>().join(" ")
}

fn session_id(rng: &mut StdRng) -> String {
    let (a, b) = (rng.random::<u32>(), rng.random::<u16>());
    format!("sess-{a:08x}-{b:04x}")
}

/// An L2-normalised random vector: full-entropy mantissas, so the blobs barely compress.
/// Plain loops over one `fill` keep it fast in unoptimised (test) builds too.
fn random_vec(rng: &mut StdRng, buf: &mut Vec<u8>) {
    buf.resize(VECTOR_DIM * 4, 0);
    rng.fill(&mut buf[..]);
    let mut v = [0f32; VECTOR_DIM];
    for (x, b) in v.iter_mut().zip(buf.chunks_exact(4)) {
        *x = (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8) as f32 / 8_388_608.0 - 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    for (x, b) in v.iter().zip(buf.chunks_exact_mut(4)) {
        b.copy_from_slice(&(x / norm).to_le_bytes());
    }
}

/// round(n * fraction) with `fraction` clamped to 0..=max (NaN counts as 0).
fn scaled(n: i64, fraction: f64, max: f64) -> usize {
    let f = fraction.clamp(0.0, max);
    (n as f64 * if f.is_nan() { 0.0 } else { f }).round() as usize
}

fn count(c: &Connection, table: &str) -> rusqlite::Result<i64> {
    let sql = format!("SELECT count(*) FROM \"{}\"", table.replace('"', "\"\""));
    c.query_row(&sql, [], |r| r.get(0))
}

/// Runs `row` `n` times on one prepared statement inside one transaction: fast bulk inserts.
fn fill<F>(c: &mut Connection, sql: &str, n: usize, mut row: F) -> rusqlite::Result<()>
where
    F: FnMut(&mut Statement<'_>, usize) -> rusqlite::Result<usize>,
{
    let tx = c.transaction()?;
    let mut st = tx.prepare(sql)?;
    for i in 0..n {
        row(&mut st, i)?;
    }
    drop(st);
    tx.commit()
}

type Rows = rusqlite::Result<()>;

fn insert_memories(c: &mut Connection, rng: &mut StdRng, n: usize, t0: i64, span: i64) -> Rows {
    let sql = "INSERT INTO memories(kind, content, created_at, importance) VALUES (?, ?, ?, ?)";
    fill(c, sql, n, |st, i| {
        let at = t0 + span * i as i64 / n as i64 + rng.random_range(0..60);
        let (kind, importance) = (pick(rng, KINDS), rng.random_range(0.05..1.0f64));
        st.execute(params![kind, sentences(rng, 1, 3), at, importance])
    })
}

fn insert_vectors(c: &mut Connection, rng: &mut StdRng, n: usize, memories: i64) -> Rows {
    let sql = "INSERT INTO embeddings(memory_id, model, dim, vec) VALUES (?, ?, ?, ?)";
    let mut buf = Vec::with_capacity(VECTOR_DIM * 4);
    fill(c, sql, n, |st, _| {
        random_vec(rng, &mut buf);
        let memory = rng.random_range(1..=memories);
        st.execute(params![memory, MODEL, VECTOR_DIM as i64, buf])
    })
}

/// Opens `path`, runs `f` and closes the connection explicitly, so close errors surface and a WAL
/// database is checkpointed with its -wal/-shm files removed.
fn with_db<T, F>(path: &Path, create: bool, f: F) -> Result<T, SampleError>
where
    F: FnOnce(&mut Connection) -> rusqlite::Result<T>,
{
    let path_buf = || path.to_path_buf();
    let err = |source| SampleError::Sqlite {
        path: path_buf(),
        source,
    };
    let mut flags = OpenFlags::default();
    flags.set(OpenFlags::SQLITE_OPEN_CREATE, create);
    let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
    // Generated data: durability is irrelevant and fsyncs dominate GiB-sized specs.
    conn.pragma_update(None, "synchronous", "OFF")
        .map_err(err)?;
    let out = f(&mut conn).map_err(err)?;
    conn.close().map_err(|(_, e)| err(e))?;
    Ok(out)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SampleError + '_ {
    move |source| SampleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), E> {
    fs::write(path, text).map_err(io(path))
}

fn git_fail(args: &[&str], stderr: &str) -> SampleError {
    let (args, stderr) = (args.join(" "), stderr.trim().to_string());
    SampleError::Git { args, stderr }
}

fn git_output(dir: &Path, args: &[&str], secs: Option<i64>) -> Result<Output, SampleError> {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(dir);
    // Fixed identity, no user/system config, ignore or attribute files and no enclosing repo:
    // reproducible commit ids.
    for (key, value) in [
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("GIT_CONFIG_COUNT", "2"),
        ("GIT_CONFIG_KEY_0", "core.excludesFile"),
        ("GIT_CONFIG_VALUE_0", "/dev/null"),
        ("GIT_CONFIG_KEY_1", "core.attributesFile"),
        ("GIT_CONFIG_VALUE_1", "/dev/null"),
        ("GIT_AUTHOR_NAME", "sample-agent"),
        ("GIT_AUTHOR_EMAIL", "agent@example.invalid"),
        ("GIT_COMMITTER_NAME", "sample-agent"),
        ("GIT_COMMITTER_EMAIL", "agent@example.invalid"),
    ] {
        cmd.env(key, value);
    }
    cmd.env("GIT_CEILING_DIRECTORIES", dir.parent().unwrap_or(dir));
    for key in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"] {
        cmd.env_remove(key);
    }
    if let Some(date) = secs.map(iso) {
        cmd.env("GIT_AUTHOR_DATE", &date);
        cmd.env("GIT_COMMITTER_DATE", date);
    }
    cmd.output().map_err(|e| git_fail(args, &e.to_string()))
}

fn git(dir: &Path, args: &[&str], secs: Option<i64>) -> Result<String, SampleError> {
    let out = git_output(dir, args, secs)?;
    if !out.status.success() {
        return Err(git_fail(args, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit(dir: &Path, secs: i64, message: &str) -> Result<(), E> {
    git(dir, &["add", "-A"], None)?;
    let args = ["-c", "commit.gpgsign=false", "commit", "-qm", message];
    git(dir, &args, Some(secs)).map(drop)
}

/// Commit `i` happens at 2026-01-01T10:00:00Z + i hours.
fn commit_secs(i: usize) -> i64 {
    EPOCH + 10 * 3600 + i as i64 * 3600
}

/// "YYYY-MM-DD" of a unix time (Howard Hinnant's civil_from_days).
fn day_str(secs: i64) -> String {
    let (y, m, d) = crate::time::civil_from_days(secs.div_euclid(DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

fn iso(secs: i64) -> String {
    let (date, t) = (day_str(secs), secs.rem_euclid(DAY));
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    format!("{date}T{h:02}:{m:02}:{s:02}+0000")
}

/// Folder and file stem of note `i`, unique per index.
fn note_name(i: usize) -> (&'static str, String) {
    let (folder, j) = (FOLDERS[i % FOLDERS.len()], i / FOLDERS.len());
    let list = match folder {
        "topics" => TOPICS,
        "people" => PEOPLE,
        "projects" => PROJECTS,
        _ => return (folder, day_str(EPOCH + j as i64 * DAY)),
    };
    let names: Vec<&str> = list.split('|').collect();
    let (base, round) = (names[j % names.len()], j / names.len() + 1);
    let suffix = if round == 1 {
        String::new()
    } else {
        format!("-{round}")
    };
    (folder, format!("{base}{suffix}"))
}

/// "alice-chen" -> "Alice Chen"; dates stay as they are.
fn title(stem: &str) -> String {
    let cap = |w: &str| w.get(..1).unwrap_or("").to_uppercase() + w.get(1..).unwrap_or("");
    let words = stem.split('-').filter(|w| !w.is_empty()).map(cap);
    let dated = stem.starts_with(|c: char| c.is_ascii_digit());
    if dated {
        stem.to_string()
    } else {
        words.collect::<Vec<_>>().join(" ")
    }
}

fn note_text(folder: &str, stem: &str, rng: &mut StdRng, secs: i64) -> String {
    let (title, day, confidence) = (title(stem), day_str(secs), rng.random_range(0.5..1.0f64));
    let mut s = format!("# {title}\n\n> kind: {folder} · updated {day} · ");
    s += &format!("confidence {confidence:.2}\n\n");
    s += &format!("## Summary\n\n{}\n\n## Notes\n\n", sentences(rng, 2, 4));
    for _ in 0..rng.random_range(2..28) {
        s += &format!("- {}\n", sentence(rng));
    }
    s += "\n## Open questions\n\n";
    for _ in 0..rng.random_range(1..4) {
        s += &format!("- [ ] Verify: {}\n", sentence(rng));
    }
    s += "\n## Related\n\n";
    for _ in 0..rng.random_range(1..4) {
        let (f, list) = [("people", PEOPLE), ("projects", PROJECTS)][rng.random_range(0..2)];
        s += &format!("- [[{f}/{}]]\n", pick(rng, list));
    }
    s
}

fn append_update(path: &Path, rng: &mut StdRng, secs: i64) -> Result<(), E> {
    let mut text = fs::read_to_string(path).map_err(io(path))?;
    text += &format!("\n## Update {}\n\n", iso(secs));
    for _ in 0..rng.random_range(1..5) {
        text += &format!("- {}\n", sentence(rng));
    }
    write(path, &text)
}

/// Sorted names of the files in `dir` ending with `suffix` (none if `dir` is missing).
fn list_files(dir: &Path, suffix: &str) -> Result<Vec<String>, E> {
    let mut names = Vec::new();
    if !dir.exists() {
        return Ok(names);
    }
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(suffix) {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn all_notes(memdir: &Path) -> Result<Vec<PathBuf>, E> {
    let mut notes = Vec::new();
    for dir in FOLDERS.map(|f| memdir.join(f)) {
        notes.extend(list_files(&dir, ".md")?.into_iter().map(|n| dir.join(n)));
    }
    Ok(notes)
}

/// Rewrites MEMORY.md from the folders; its timestamp line makes every commit non-empty.
fn write_index(memdir: &Path, secs: i64) -> Result<(), E> {
    let mut s = String::from("# MEMORY\n\nIndex of the agent's long-term notes.\n");
    s += &format!("_Last updated: {}_\n", iso(secs));
    for folder in FOLDERS {
        let names = list_files(&memdir.join(folder), ".md")?;
        if !names.is_empty() {
            s += &format!("\n## {}\n\n", title(folder));
        }
        for name in names {
            let label = title(name.trim_end_matches(".md"));
            s += &format!("- [{label}]({folder}/{name})\n");
        }
    }
    write(&memdir.join("MEMORY.md"), &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecars(agent: &SampleAgent) -> Result<Vec<String>, E> {
        let names = list_files(&agent.sqlite_dir(), "")?.into_iter();
        Ok(names
            .filter(|n| n.ends_with("-wal") || n.ends_with("-shm"))
            .collect())
    }

    #[test]
    fn tiny_agent_is_complete_and_deterministic() -> Result<(), E> {
        let tmp = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let agent = SampleAgent::create(&tmp.path().join("a"), &SampleSpec::tiny())?;
        let counts = agent.row_counts()?;
        assert_eq!(counts.get("long_term.memories"), Some(&50));
        assert_eq!(counts.get("long_term.memories_fts"), Some(&50));
        assert_eq!(counts.get("vector.embeddings"), Some(&200));
        assert_eq!(counts.get("concepts.concepts"), Some(&10));
        assert_eq!(counts.get("compactions.compactions"), Some(&3));
        assert!(!counts.keys().any(|k| k.contains("_fts_")), "{counts:?}");
        let head = agent.git_head()?.unwrap_or_default();
        assert_eq!(head.len(), 40);
        let log = git(&agent.memdir(), &["rev-list", "--count", "HEAD"], None)?;
        assert_eq!(log, "3");
        assert_eq!(all_notes(&agent.memdir())?.len(), 20);
        assert!(agent.state_dir().join("dream_run.json").is_file());
        assert_eq!(sidecars(&agent)?, Vec::<String>::new());
        let twin = SampleAgent::create(&tmp.path().join("b"), &SampleSpec::tiny())?;
        assert_eq!(twin.git_head()?, Some(head));
        let again = SampleAgent::create(agent.root(), &SampleSpec::tiny());
        assert!(matches!(again, Err(SampleError::Io { .. })));
        Ok(())
    }

    #[test]
    fn append_and_update_days() -> Result<(), E> {
        let tmp = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let agent = SampleAgent::create(tmp.path(), &SampleSpec::tiny())?;
        let head = agent.git_head()?;
        agent.append_day(1, 0.1)?;
        let counts = agent.row_counts()?;
        assert_eq!(counts.get("vector.embeddings"), Some(&220));
        assert_eq!(counts.get("long_term.memories"), Some(&55));
        assert_eq!(counts.get("long_term.memories_fts"), Some(&55));
        assert_ne!(agent.git_head()?, head);
        assert_eq!(all_notes(&agent.memdir())?.len(), 21);
        let status = git(&agent.memdir(), &["status", "--porcelain"], None)?;
        assert_eq!(status, "");
        agent.update_day(2, 0.1)?;
        assert_eq!(agent.row_counts()?.get("vector.embeddings"), Some(&198));
        agent.vacuum_vectors()?;
        assert_eq!(agent.row_counts()?.get("vector.embeddings"), Some(&198));
        assert_eq!(sidecars(&agent)?, Vec::<String>::new());
        Ok(())
    }
}
