//! Helpers shared by the end-to-end tests of the `memsnap` binary (tests/cli.rs and
//! tests/recovery.rs): a `TestCommand` that presets the store and the environment, runs the
//! binary and reports the command line, status, stdout and stderr whenever an assertion about it
//! fails (after ripgrep's tests/util.rs); a `Fixture` holding a tiny sample agent built by
//! `memsnap::sample` and a store; and the means to compare what ends up on disk (folder trees,
//! databases, restore staging folders, the restore journal).

// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use memsnap::sample::{SampleAgent, SampleSpec};
use serde_json::{Value, json};

pub const TENANT: &str = "acme";
pub const AGENT: &str = "ana";
/// The token of hand-made journals: it names the staging folders.
pub const TOKEN: &str = "0badf00d";

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// One `memsnap` invocation against one store, with `--store STORE` and `MEMSNAP_LOG=error`
/// preset and the caller's `MEMSNAP_FAILPOINT` and `MEMSNAP_STORE` removed.
#[derive(Debug)]
pub struct TestCommand {
    cmd: Command,
}

impl TestCommand {
    pub fn new(store: &Path) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memsnap"));
        cmd.arg("--store")
            .arg(store)
            .env("MEMSNAP_LOG", "error")
            .env_remove("MEMSNAP_FAILPOINT")
            .env_remove("MEMSNAP_STORE")
            .stdin(Stdio::null());
        // Failpoints abort the process: keep the crash tests from writing core files.
        // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        TestCommand { cmd }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut TestCommand {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, A>(&mut self, args: I) -> &mut TestCommand
    where
        I: IntoIterator<Item = A>,
        A: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, key: &str, value: &str) -> &mut TestCommand {
        self.cmd.env(key, value);
        self
    }

    pub fn current_dir(&mut self, dir: &Path) -> &mut TestCommand {
        self.cmd.current_dir(dir);
        self
    }

    /// Adds `snapshot --tenant acme --agent ana --source SOURCE`.
    pub fn snapshot(&mut self, source: &Path) -> &mut TestCommand {
        self.args(["snapshot", "--tenant", TENANT, "--agent", AGENT, "--source"])
            .arg(source)
    }

    /// Runs the command to completion, whatever its exit status.
    pub fn run(&mut self) -> Outcome {
        let out = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("the memsnap binary runs");
        Outcome {
            cmdline: format!("{:?}", self.cmd),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts the command without waiting (for concurrency tests).
    pub fn spawn(&mut self) -> Child {
        self.cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the memsnap binary starts")
    }

    /// Runs the command and asserts its exit code.
    pub fn assert_exit_code(&mut self, code: i32) -> Outcome {
        let out = self.run();
        assert_eq!(out.status.code(), Some(code), "unexpected exit code\n{out}");
        out
    }

    /// Runs the command, asserts success and returns stdout.
    pub fn stdout(&mut self) -> String {
        self.assert_exit_code(0).stdout
    }

    /// Adds `--json`, runs the command, asserts success and parses stdout.
    pub fn json(&mut self) -> Value {
        self.arg("--json");
        self.assert_exit_code(0).json()
    }

    /// Runs the command and asserts that it aborted (what a failpoint without `:error` does).
    pub fn assert_crashed(&mut self) -> Outcome {
        let out = self.run();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "the command was expected to abort\n{out}"
        );
        out
    }
}

/// A finished run.
pub struct Outcome {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e})\n{self}"))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key:?} is not a string in {v:#}"))
}

// ---------------------------------------------------------------------------------------------
// A sample agent and its store
// ---------------------------------------------------------------------------------------------

/// A temporary folder holding a tiny sample agent (`agent/`) and a store path (`store/`, not
/// created until a command creates it).
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub store: PathBuf,
    pub agent: SampleAgent,
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let agent = SampleAgent::create(&tmp.path().join("agent"), &SampleSpec::tiny())
            .expect("tiny sample agent");
        let store = tmp.path().join("store");
        Fixture { tmp, store, agent }
    }

    /// A fixture whose memdir also holds symlinks (one dangling), a private file, an executable
    /// script, an empty file, an empty folder and a file whose name is not UTF-8, so that
    /// restores have to reproduce more than plain files.
    pub fn decorated() -> Fixture {
        let f = Fixture::new();
        let memdir = f.agent.memdir();
        std::os::unix::fs::symlink("topics/rust-async.md", memdir.join("latest-topic.md"))
            .expect("symlink");
        std::os::unix::fs::symlink("nowhere/at-all.md", memdir.join("dangling")).expect("symlink");
        write_mode(
            &memdir.join("private.md"),
            b"# Private\n\nonly mine\n",
            0o600,
        );
        fs::write(memdir.join("empty.md"), b"").expect("empty file");
        fs::create_dir(memdir.join("empty-folder")).expect("empty folder");
        let latin1 = OsStr::from_bytes(b"caf\xe9-latin1.md");
        fs::write(memdir.join(latin1), b"# Caf\xe9\n").expect("non-UTF-8 name");
        fs::create_dir_all(memdir.join("hooks")).expect("mkdir hooks");
        write_mode(
            &memdir.join("hooks/run.sh"),
            b"#!/bin/sh\necho hook\n",
            0o755,
        );
        f
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn cmd(&self) -> TestCommand {
        TestCommand::new(&self.store)
    }

    /// `snapshot --tenant acme --agent ana --source AGENT --json`.
    pub fn snapshot(&self) -> Value {
        self.cmd().snapshot(self.agent.root()).json()
    }

    pub fn snapshot_id(&self) -> String {
        let v = self.snapshot();
        str_of(&v, "id").to_owned()
    }

    /// The database file names of a snapshot (`show --json`, part "sqlite").
    pub fn snapshot_databases(&self, id: &str) -> Vec<String> {
        let show = self.cmd().args(["show", id]).json();
        let mut dbs: Vec<String> = show["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["part"] == "sqlite")
            .map(|e| str_of(e, "path").to_owned())
            .collect();
        dbs.sort();
        assert!(dbs.contains(&"long_term.sqlite".to_owned()), "{dbs:?}");
        dbs
    }

    pub fn list(&self) -> Vec<Value> {
        match self.cmd().arg("list").json() {
            Value::Array(items) => items,
            other => panic!("list --json is not an array: {other:#}"),
        }
    }

    pub fn list_ids(&self) -> Vec<String> {
        self.list()
            .iter()
            .map(|i| str_of(i, "id").to_owned())
            .collect()
    }

    /// `restore SNAP --json` (plus `extra` args), asserting success.
    pub fn restore(&self, snap: &str, extra: &[&str]) -> Value {
        self.cmd().args(["restore", snap]).args(extra).json()
    }

    /// `restore SNAP --target TARGET --json`, asserting success.
    pub fn restore_into(&self, snap: &str, target: &Path) -> Value {
        self.cmd()
            .args(["restore", snap, "--target"])
            .arg(target)
            .json()
    }

    /// `restore SNAP` with the failpoint `failpoint` set, asserting that it aborted.
    pub fn crash_restore(&self, snap: &str, failpoint: &str) -> Outcome {
        self.cmd()
            .env("MEMSNAP_FAILPOINT", failpoint)
            .args(["restore", snap])
            .assert_crashed()
    }

    pub fn journal(&self) -> PathBuf {
        self.store
            .join("journal")
            .join(TENANT)
            .join(format!("{AGENT}.json"))
    }

    /// The journal, parsed.
    pub fn read_journal(&self) -> Value {
        let bytes = fs::read(self.journal()).expect("the restore journal exists");
        serde_json::from_slice(&bytes).expect("the restore journal is JSON")
    }

    pub fn write_journal(&self, journal: &Value) {
        fs::create_dir_all(self.journal().parent().expect("parent")).expect("mkdir journal");
        fs::write(
            self.journal(),
            serde_json::to_vec_pretty(journal).expect("JSON"),
        )
        .expect("write journal");
    }

    /// A hand-made journal of a restore of `id` over this agent (token [`TOKEN`]) in `phase`,
    /// switching the databases `dbs`, without the `state` array.
    pub fn hand_made_journal(&self, phase: &str, id: &str, dbs: &[String]) -> Value {
        json!({
            "version": 1,
            "phase": phase,
            "snapshot_id": id,
            "tenant": TENANT,
            "agent": AGENT,
            "token": TOKEN,
            "memdir": self.agent.memdir(),
            "sqlite_dir": self.agent.sqlite_dir(),
            "state_dir": self.agent.state_dir(),
            "has_memdir": true,
            "databases": dbs,
            "fs_state": true,
        })
    }

    /// The memdir staging folder of a hand-made journal's restore: `new` (the staged memdir) or
    /// `old` (the live one, moved aside).
    pub fn staged_memdir(&self, which: &str) -> PathBuf {
        self.agent
            .root()
            .join(format!(".memsnap-restore-{TOKEN}-{which}"))
    }

    /// The database staging folder of a hand-made journal's restore.
    pub fn staged_sqlite(&self) -> PathBuf {
        self.agent
            .sqlite_dir()
            .join(format!(".memsnap-restore-{TOKEN}"))
    }

    pub fn agent_lock(&self) -> PathBuf {
        self.store
            .join("locks")
            .join("agents")
            .join(TENANT)
            .join(format!("{AGENT}.lock"))
    }
}

pub fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    fs::write(path, bytes).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------------------------
// Comparing folders
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
        mtime_ns: Option<i64>,
    },
    File {
        mode: u32,
        mtime_ns: Option<i64>,
        len: u64,
        blake3: String,
    },
    Symlink {
        target: PathBuf,
    },
}

pub type Tree = BTreeMap<PathBuf, Node>;

/// Every entry under `root` (the root itself as ""), never following symlinks below the root.
/// With `mtimes`, files and folders below the root also record their modification time.
pub fn tree(root: &Path, mtimes: bool) -> Tree {
    let mut out = Tree::new();
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.expect("walk");
        let rel = entry
            .path()
            .strip_prefix(root)
            .expect("below root")
            .to_path_buf();
        let meta = entry.path().symlink_metadata().expect("metadata");
        let mtime_ns =
            (mtimes && entry.depth() > 0).then(|| meta.mtime() * 1_000_000_000 + meta.mtime_nsec());
        let mode = meta.mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink {
                target: fs::read_link(entry.path()).expect("readlink"),
            }
        } else if meta.is_dir() {
            Node::Dir { mode, mtime_ns }
        } else {
            let bytes = fs::read(entry.path()).expect("read file");
            Node::File {
                mode,
                mtime_ns,
                len: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            }
        };
        out.insert(rel, node);
    }
    out
}

/// Asserts two trees are equal, listing the differing paths (not two huge maps) if not.
pub fn assert_same_tree(expected: &Tree, actual: &Tree, what: &str) {
    if expected == actual {
        return;
    }
    let mut diffs = Vec::new();
    for (path, e) in expected {
        match actual.get(path) {
            None => diffs.push(format!("missing  {}: {e:?}", path.display())),
            Some(a) if a != e => diffs.push(format!(
                "differs  {}:\n    expected {e:?}\n    actual   {a:?}",
                path.display()
            )),
            Some(_) => {}
        }
    }
    for (path, a) in actual {
        if !expected.contains_key(path) {
            diffs.push(format!("extra    {}: {a:?}", path.display()));
        }
    }
    let n = diffs.len();
    diffs.truncate(25);
    panic!("{what}: {n} difference(s)\n{}", diffs.join("\n"));
}

/// Zeroes the mtimes of the agent root and sqlite/: staging folders were created and removed in
/// them, which moves their own mtimes and nothing else.
pub fn without_staging_parent_mtimes(mut t: Tree) -> Tree {
    for key in ["", "sqlite"] {
        if let Some(Node::Dir { mtime_ns, .. }) = t.get_mut(Path::new(key)) {
            *mtime_ns = None;
        }
    }
    t
}

/// Asserts that the whole folder of `agent` is `live` again (a [`tree`] of its root, with
/// mtimes), but for the mtimes of the folders a restore stages in: what a restore that was
/// rolled back, failed or was refused must leave.
pub fn assert_agent_tree_unchanged(live: Tree, agent: &SampleAgent, what: &str) {
    assert_same_tree(
        &without_staging_parent_mtimes(live),
        &without_staging_parent_mtimes(tree(agent.root(), true)),
        what,
    );
}

/// Everything a restore must bring back, captured from a live agent.
#[derive(Debug, Clone)]
pub struct AgentImage {
    pub memdir: Tree,
    pub state: Tree,
    pub rows: BTreeMap<String, i64>,
    pub head: Option<String>,
}

impl AgentImage {
    pub fn capture(agent: &SampleAgent) -> AgentImage {
        // The trees first: row_counts opens the databases, git is read last.
        let memdir = tree(&agent.memdir(), true);
        let state = tree(&agent.state_dir(), false);
        let rows = agent.row_counts().expect("row counts");
        let head = agent.git_head().expect("git head");
        assert!(head.is_some(), "the sample agent has a commit");
        AgentImage {
            memdir,
            state,
            rows,
            head,
        }
    }

    /// Asserts that `agent` is exactly this image, and that the restore left nothing behind.
    pub fn assert_matches(&self, agent: &SampleAgent, what: &str) {
        assert_no_restore_leftovers(agent);
        assert_no_side_files(agent);
        assert_same_tree(
            &self.memdir,
            &tree(&agent.memdir(), true),
            &format!("{what}: memdir"),
        );
        assert_same_tree(
            &self.state,
            &tree(&agent.state_dir(), false),
            &format!("{what}: state"),
        );
        assert_databases_intact(agent);
        assert_eq!(
            agent.row_counts().expect("row counts"),
            self.rows,
            "{what}: row counts"
        );
        assert_eq!(
            agent.git_head().expect("git head"),
            self.head,
            "{what}: git HEAD"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Databases and restore leftovers
// ---------------------------------------------------------------------------------------------

pub fn databases(agent: &SampleAgent) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(agent.sqlite_dir())
        .expect("read sqlite dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension() == Some(OsStr::new("sqlite")))
        .collect();
    out.sort();
    out
}

/// (page size, WAL mode) from a database file's header (bytes 16-17, and 18 = 2 for WAL).
pub fn db_header(db: &Path) -> (u32, bool) {
    let mut header = [0u8; 20];
    fs::File::open(db)
        .and_then(|mut f| f.read_exact(&mut header))
        .expect("read database header");
    let raw = u16::from_be_bytes([header[16], header[17]]);
    let page = if raw == 1 { 65536 } else { u32::from(raw) };
    (page, header[18] == 2)
}

/// Byte 18 of a database header: 1 = rollback journal, 2 = WAL.
pub fn is_wal(db: &Path) -> bool {
    db_header(db).1
}

/// No `-journal` next to any database, and no `-wal`/`-shm` next to a rollback-mode one.
pub fn assert_no_side_files(agent: &SampleAgent) {
    for db in databases(agent) {
        let suffixes: &[&str] = if is_wal(&db) {
            &["-journal"]
        } else {
            &["-journal", "-wal", "-shm"]
        };
        for s in suffixes {
            let mut side = db.clone().into_os_string();
            side.push(s);
            assert!(
                !Path::new(&side).exists(),
                "{} was left next to {}",
                Path::new(&side).display(),
                db.display()
            );
        }
    }
}

pub fn assert_databases_intact(agent: &SampleAgent) {
    for db in databases(agent) {
        let c =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
                .expect("open database");
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok", "integrity_check of {}", db.display());
        c.close().expect("close database");
    }
}

/// Entries named `.memsnap-restore-*` directly inside `dir`.
pub fn staging_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.expect("entry"))
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".memsnap-restore-")
        })
        .map(|e| e.path())
        .collect()
}

/// Staging folders of a restore: next to the memdir and inside the sqlite folder.
pub fn restore_leftovers(agent: &SampleAgent) -> Vec<PathBuf> {
    let mut out = staging_in(agent.root());
    out.extend(staging_in(&agent.sqlite_dir()));
    out
}

pub fn assert_no_restore_leftovers(agent: &SampleAgent) {
    let left = restore_leftovers(agent);
    assert!(left.is_empty(), "restore staging left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Git, stores and bundles
// ---------------------------------------------------------------------------------------------

/// Runs `git ARGS` in `dir` with a fixed identity and no user or system config (commits made by
/// tests); its trimmed stdout, or its stderr when it fails.
pub fn try_git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(["-c", "commit.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "sample-agent")
        .env("GIT_AUTHOR_EMAIL", "agent@example.invalid")
        .env("GIT_COMMITTER_NAME", "sample-agent")
        .env("GIT_COMMITTER_EMAIL", "agent@example.invalid")
        .env("GIT_CEILING_DIRECTORIES", parent_dir(dir))
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`try_git`], asserting success.
pub fn git(dir: &Path, args: &[&str]) {
    if let Err(e) = try_git(dir, args) {
        panic!("git {args:?}: {e}");
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    p.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The paths in `dir` (not below it), in no order.
pub fn entries_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect()
}

/// Flips one byte in the middle of the chunk data of the largest pack; returns the pack.
pub fn corrupt_largest_pack(store: &Path) -> PathBuf {
    let pack = walkdir::WalkDir::new(store.join("packs"))
        .into_iter()
        .map(|e| e.expect("walk packs"))
        .filter(|e| e.path().extension() == Some(OsStr::new("pack")))
        .max_by_key(|e| e.metadata().expect("metadata").len())
        .expect("the store has a pack")
        .into_path();
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .expect("open pack");
    let len = file.metadata().expect("metadata").len();
    let mut header = [0u8; 16];
    file.read_exact(&mut header).expect("header");
    assert_eq!(&header[..8], b"MEMSNAPP", "pack header magic");
    let mut trailer = [0u8; 56];
    file.seek(SeekFrom::Start(len - 56)).expect("seek");
    file.read_exact(&mut trailer).expect("trailer");
    assert_eq!(&trailer[48..], b"MEMSNAPF", "pack trailer magic");
    let entries_offset = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    assert!(entries_offset > 16 + 1, "the pack holds chunk data");
    let at = 16 + (entries_offset - 16) / 2;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.read_exact(&mut byte).expect("read byte");
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.write_all(&[byte[0] ^ 0xff]).expect("flip byte");
    file.sync_all().expect("sync");
    pack
}

/// One footer entry of a pack (store-format.md, "Pack files").
#[derive(Debug, Clone, Copy)]
pub struct PackEntry {
    pub id: [u8; 32],
    pub offset: u64,
    pub stored_len: u32,
    pub flags: u8,
}

impl PackEntry {
    pub fn hex(&self) -> String {
        hex::encode(self.id)
    }

    pub fn is_tree(&self) -> bool {
        self.flags & 2 != 0
    }
}

pub fn footer(pack: &Path) -> Vec<PackEntry> {
    let bytes = fs::read(pack).expect("read pack");
    let n = bytes.len();
    assert_eq!(&bytes[n - 8..], b"MEMSNAPF", "pack trailer magic");
    let t = &bytes[n - 56..];
    let at = u64::from_le_bytes(t[..8].try_into().expect("8")) as usize;
    let count = u32::from_le_bytes(t[8..12].try_into().expect("4")) as usize;
    (0..count)
        .map(|i| {
            let e = &bytes[at + i * 49..at + (i + 1) * 49];
            PackEntry {
                id: e[..32].try_into().expect("32"),
                offset: u64::from_le_bytes(e[32..40].try_into().expect("8")),
                stored_len: u32::from_le_bytes(e[40..44].try_into().expect("4")),
                flags: e[48],
            }
        })
        .collect()
}

/// The pack files under `store`, in path order.
pub fn pack_files(store: &Path) -> std::collections::BTreeSet<PathBuf> {
    walkdir::WalkDir::new(store.join("packs"))
        .into_iter()
        .map(|e| e.expect("walk packs").into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect()
}

/// How many pack files the store at `store` holds.
pub fn pack_count(store: &Path) -> usize {
    walkdir::WalkDir::new(store.join("packs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count()
}

/// Every file below `dir` (relative path → bytes), but `index.redb`, which redb rewrites on
/// every open whatever happens next; compare the index's content through `list` instead.
pub fn store_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    for e in walkdir::WalkDir::new(dir) {
        let e = e.expect("walk");
        if e.file_type().is_file() && e.file_name() != "index.redb" {
            let rel = e.path().strip_prefix(dir).expect("rel");
            out.insert(
                rel.to_string_lossy().into_owned(),
                fs::read(e.path()).expect("read"),
            );
        }
    }
    out
}

/// A bundle's whole decompressed stream (plain bundles).
pub fn decompressed(bundle: &Path) -> Vec<u8> {
    let f = fs::File::open(bundle).expect("open bundle");
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(f)
        .expect("zstd")
        .read_to_end(&mut out)
        .expect("decompress");
    out
}

/// (path, header, bytes) of every entry of a tar stream.
pub fn tar_entries(plain: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
    let mut a = tar::Archive::new(plain);
    let mut out = Vec::new();
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = String::from_utf8(e.path_bytes().into_owned()).expect("utf-8 path");
        let header = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read entry");
        out.push((path, header, data));
    }
    out
}

/// The manifest of a decompressed bundle, asserting it comes first.
pub fn manifest_of(plain: &[u8]) -> Value {
    let entries = tar_entries(plain);
    assert_eq!(entries[0].0, "manifest.json", "the manifest comes first");
    serde_json::from_slice(&entries[0].2).expect("manifest JSON")
}

/// The element of array `v[array]` whose `key` is `want`, or a failure naming what is missing.
pub fn find_by<'a>(v: &'a Value, array: &str, key: &str, want: &str) -> &'a Value {
    v[array]
        .as_array()
        .unwrap_or_else(|| panic!("{array} is an array in {v:#}"))
        .iter()
        .find(|e| e[key] == want)
        .unwrap_or_else(|| panic!("no {array} element with {key} = {want} in {v:#}"))
}

/// `restore ID --target TARGET` from `store`, asserting success; the restored agent.
pub fn restore_to(store: &Path, id: &str, target: &Path) -> SampleAgent {
    TestCommand::new(store)
        .args(["restore", id, "--target"])
        .arg(target)
        .json();
    SampleAgent::open(target)
}
