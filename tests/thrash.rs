//! Kill -9 thrash (after bupstash's cli-tests/parallel-thrash.sh): several `memsnap` processes
//! snapshot, restore (into scratch folders and over the live agent), export, import, forget,
//! prune, list and verify against ONE store, while a writer thread keeps committing to the
//! agent's databases (one in WAL mode, one in rollback-journal mode) and its notes (git), and a
//! killer thread sends SIGKILL to the memsnap processes at random moments.
//!
//! Afterwards the store must be whole: `verify --read-data` passes and every listed snapshot
//! restores to a folder whose databases pass `PRAGMA integrity_check` and hold exactly the rows
//! of one moment the writer committed (it logs a digest of the row set with every transaction),
//! and whose git HEAD is a commit the writer made, with every object it needs.
//!
//! Every operation ends killed, succeeded, or failed with an error message that says why
//! ("busy", a snapshot forgotten meanwhile); any other failure fails the test.
//! The short run takes a few seconds of thrash; `MEMSNAP_THRASH_SECS=N` runs N seconds.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AGENT, TENANT, try_git};
use memsnap::sample::{SampleAgent, SampleSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// Seconds of thrash in the normal `cargo test` run.
const SHORT_SECS: u64 = 8;
/// memsnap processes running at once.
const WORKERS: usize = 3;
/// The writer's own table, in both databases it writes.
const LEDGER: &str = "thrash_ledger";
/// (database, the tables whose rows make its digest).
const WRITTEN: [(&str, &str); 2] = [
    ("long_term.sqlite", "memories"),
    ("vector.sqlite", "embeddings"),
];

// ---------------------------------------------------------------------------------------------
// The writer: commits to both databases and the notes, logging every committed moment
// ---------------------------------------------------------------------------------------------

/// Digest of the rows of `table` and the ledger, in rowid order: two databases have the same
/// digest only if they hold the same rows.
fn digest(c: &Connection, table: &str) -> rusqlite::Result<String> {
    let mut h = blake3::Hasher::new();
    for t in [table, LEDGER] {
        let mut st = c.prepare(&format!("SELECT * FROM \"{t}\" ORDER BY rowid"))?;
        let n = st.column_count();
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            for i in 0..n {
                use rusqlite::types::ValueRef;
                match r.get_ref(i)? {
                    ValueRef::Null => h.update(b"n"),
                    ValueRef::Integer(v) => h.update(b"i").update(&v.to_le_bytes()),
                    ValueRef::Real(v) => h.update(b"r").update(&v.to_le_bytes()),
                    ValueRef::Text(s) => h
                        .update(b"t")
                        .update(&(s.len() as u64).to_le_bytes())
                        .update(s),
                    ValueRef::Blob(b) => h
                        .update(b"b")
                        .update(&(b.len() as u64).to_le_bytes())
                        .update(b),
                };
            }
        }
        h.update(b"|");
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Every moment the writer committed: per database, the digests of its row sets; the commit ids
/// of the notes' history.
#[derive(Default)]
struct Log {
    digests: BTreeMap<&'static str, HashSet<String>>,
    commits: HashSet<String>,
    transactions: u64,
    tx_failures: u64,
    git_commits: u64,
    git_failures: u64,
}

/// One transaction on a database: a row of the agent's table in, an old one out, a ledger row
/// in (random size, so pages move), an old one out, one updated. Its digest is logged before
/// COMMIT, so that the log is never missing a moment that did commit.
fn write_once(
    c: &mut Connection,
    db: &'static str,
    table: &str,
    seq: i64,
    rng: &mut StdRng,
    log: &Mutex<Log>,
) -> rusqlite::Result<()> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if table == "memories" {
        tx.execute(
            "INSERT INTO memories(kind, content, created_at, importance) VALUES ('fact', ?1, ?2, 0.5)",
            rusqlite::params![format!("thrash memory {seq} {}", rng.random::<u64>()), seq],
        )?;
        tx.execute(
            "DELETE FROM memories WHERE id = (SELECT min(id) FROM memories) AND (SELECT count(*) FROM memories) > 60",
            [],
        )?;
    } else {
        let vec: Vec<u8> = (0..3072).map(|_| rng.random()).collect();
        tx.execute(
            "INSERT INTO embeddings(memory_id, model, dim, vec) VALUES (?1, 'thrash', 768, ?2)",
            rusqlite::params![seq, vec],
        )?;
        tx.execute(
            "DELETE FROM embeddings WHERE id = (SELECT min(id) FROM embeddings) AND (SELECT count(*) FROM embeddings) > 220",
            [],
        )?;
    }
    let payload: Vec<u8> = (0..rng.random_range(100..3000))
        .map(|_| rng.random())
        .collect();
    tx.execute(
        &format!("INSERT INTO {LEDGER}(k, v, payload) VALUES (?1, 0, ?2)"),
        rusqlite::params![seq, payload],
    )?;
    tx.execute(&format!("DELETE FROM {LEDGER} WHERE k <= ?1"), [seq - 40])?;
    tx.execute(
        &format!(
            "UPDATE {LEDGER} SET v = v + 1 WHERE k = (SELECT max(k) FROM {LEDGER} WHERE k < ?1)"
        ),
        [seq],
    )?;
    let d = digest(&tx, table)?;
    log.lock().unwrap().digests.entry(db).or_default().insert(d);
    tx.commit()
}

fn writer(
    agent: SampleAgent,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    seed: u64,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conns = Vec::new();
    for (db, table) in WRITTEN {
        let c = Connection::open(agent.sqlite_dir().join(db)).map_err(|e| e.to_string())?;
        // A restore copies into the live database through SQLite and waits for no one longer
        // than its lock timeout; the writer waits as long.
        c.busy_timeout(Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        conns.push((c, db, table));
    }
    let memdir = agent.memdir();
    let mut last_git = Instant::now();
    let mut seq = 1_000_000i64;
    while !stop.load(Ordering::Acquire) {
        seq += 1;
        for (c, db, table) in conns.iter_mut() {
            match write_once(c, db, table, seq, &mut rng, &log) {
                Ok(()) => log.lock().unwrap().transactions += 1,
                // The transaction rolled back (a restore held the database past the busy
                // timeout, say): the agent would retry; so does the next round.
                Err(_) => log.lock().unwrap().tx_failures += 1,
            }
        }
        // The state folder: written whole and renamed in, as an agent would.
        let state = agent.state_dir();
        let tmp = state.join(".extract_cursor.json.tmp");
        if fs::write(&tmp, format!("{{\"last_message_id\": {seq}}}\n")).is_ok() {
            let _ = fs::rename(&tmp, state.join("extract_cursor.json"));
        }
        if last_git.elapsed() >= Duration::from_millis(250) {
            last_git = Instant::now();
            let note = memdir.join("thrash.md");
            let mut text = fs::read_to_string(&note).unwrap_or_default();
            text.push_str(&format!("- thrash note {seq}\n"));
            let committed = fs::write(&note, text)
                .map_err(|e| e.to_string())
                .and_then(|()| try_git(&memdir, &["add", "-A"]))
                .and_then(|_| try_git(&memdir, &["commit", "-q", "-m", &format!("thrash {seq}")]))
                .and_then(|_| try_git(&memdir, &["rev-parse", "HEAD"]));
            let mut l = log.lock().unwrap();
            match committed {
                Ok(head) => {
                    l.git_commits += 1;
                    l.commits.insert(head);
                }
                Err(_) => {
                    l.git_failures += 1;
                    // A restore can bring back a snapshot taken mid-commit, lock file included;
                    // the agent knows no other git runs here, so the lock is stale.
                    let _ = fs::remove_file(memdir.join(".git/index.lock"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(1..8)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// memsnap processes and the killer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Snapshot,
    RestoreTarget,
    RestoreLive,
    Export,
    Import,
    Forget,
    Prune,
    List,
    Verify,
}

const OPS: [(Op, u32); 9] = [
    (Op::Snapshot, 6),
    (Op::RestoreTarget, 3),
    (Op::RestoreLive, 2),
    (Op::Export, 2),
    (Op::Import, 2),
    (Op::Forget, 2),
    (Op::Prune, 2),
    (Op::List, 2),
    (Op::Verify, 1),
];

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    started: u64,
    succeeded: u64,
    killed: u64,
    failed: u64,
}

/// Failures that are the operation's answer to a race, not damage: a lock held past
/// `--lock-timeout`, a snapshot forgotten between the `list` that named it and its use.
const EXPECTED_FAILURES: [&str; 2] = ["busy", "no snapshot matches"];

struct Shared {
    store: PathBuf,
    scratch: PathBuf,
    agent: SampleAgent,
    /// memsnap processes that may be killed: pid → not yet reaped (its pid is not reused).
    running: Mutex<HashSet<i32>>,
    ids: Mutex<Vec<String>>,
    bundles: Mutex<Vec<PathBuf>>,
    tally: Mutex<BTreeMap<Op, Count>>,
    /// Failures that no race explains: the test fails on any.
    unexpected: Mutex<Vec<String>>,
    /// Expected failures, by the phrase that explained them.
    explained: Mutex<BTreeMap<&'static str, u64>>,
    kills_sent: AtomicU64,
    serial: AtomicU64,
}

fn memsnap(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
    c.arg("--store")
        .arg(store)
        .args(["--lock-timeout", "5"])
        .env("MEMSNAP_LOG", "error")
        .env_remove("MEMSNAP_FAILPOINT")
        .env_remove("MEMSNAP_STORE")
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` as a killable process; its exit status, stdout and stderr.
fn run_killable(sh: &Shared, mut cmd: Command) -> (ExitStatus, String, String) {
    let n = sh.serial.fetch_add(1, Ordering::Relaxed);
    let out_path = sh.scratch.join(format!("op-{n}.out"));
    let err_path = sh.scratch.join(format!("op-{n}.err"));
    let mut child: Child = cmd
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("memsnap starts");
    let pid = child.id() as i32;
    sh.running.lock().unwrap().insert(pid);
    // Wait for the exit without reaping: until the pid leaves `running`, it cannot be reused,
    // so the killer never signals another process.
    // SAFETY: waitid writes only into `info`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        loop {
            let rc = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            );
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
    sh.running.lock().unwrap().remove(&pid);
    let status = child.wait().expect("reap memsnap");
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(out_path);
    let _ = fs::remove_file(err_path);
    (status, stdout, stderr)
}

fn killer(sh: &Shared, stop: &AtomicBool, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(rng.random_range(100..2000)));
        let running = sh.running.lock().unwrap();
        let pids: Vec<i32> = running.iter().copied().collect();
        if pids.is_empty() {
            continue;
        }
        let pid = pids[rng.random_range(0..pids.len())];
        // SAFETY: `pid` is an unreaped child of this process (the lock on `running` is held).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        sh.kills_sent.fetch_add(1, Ordering::Relaxed);
    }
}

fn pick<T: Clone>(rng: &mut StdRng, items: &Mutex<Vec<T>>) -> Option<T> {
    let items = items.lock().unwrap();
    (!items.is_empty()).then(|| items[rng.random_range(0..items.len())].clone())
}

fn choose_op(rng: &mut StdRng) -> Op {
    let total: u32 = OPS.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (op, w) in OPS {
        if x < w {
            return op;
        }
        x -= w;
    }
    Op::Snapshot
}

fn ids_of(list_json: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(list_json).ok()?;
    v.as_array()?
        .iter()
        .map(|s| s["id"].as_str().map(str::to_owned))
        .collect()
}

/// One operation of a worker: start it, wait, classify the outcome.
fn one_op(sh: &Shared, rng: &mut StdRng) {
    let op = choose_op(rng);
    let n = sh.serial.fetch_add(1, Ordering::Relaxed);
    let mut cmd = memsnap(&sh.store);
    cmd.arg("--json");
    let mut target = None;
    let mut bundle = None;
    match op {
        Op::Snapshot => {
            cmd.args(["snapshot", "--tenant", TENANT, "--agent", AGENT, "--source"])
                .arg(sh.agent.root());
        }
        Op::RestoreTarget | Op::RestoreLive | Op::Export => {
            let Some(id) = pick(rng, &sh.ids) else { return };
            cmd.args(["restore", &id, "--tenant", TENANT, "--agent", AGENT]);
            if op == Op::Export {
                cmd = memsnap(&sh.store);
                let out = sh.scratch.join(format!("bundle-{n}.tar.zst"));
                cmd.args(["--json", "export", &id, "--out"]).arg(&out);
                bundle = Some(out);
            } else if op == Op::RestoreTarget {
                let t = sh.scratch.join(format!("target-{n}"));
                cmd.arg("--target").arg(&t);
                target = Some(t);
            }
        }
        Op::Import => {
            let Some(b) = pick(rng, &sh.bundles) else {
                return;
            };
            cmd.arg("import").arg(b);
        }
        Op::Forget => {
            let keep = rng.random_range(3..8).to_string();
            cmd.args(["forget", "--keep-last", &keep]);
        }
        Op::Prune => {
            let max = ["0", "10", "50"][rng.random_range(0..3)];
            cmd.args(["prune", "--max-unused", max]);
        }
        Op::List => {
            cmd.arg("list");
        }
        Op::Verify => {
            cmd.arg("verify");
            if rng.random_bool(0.3) {
                cmd.arg("--read-data");
            }
        }
    }
    sh.tally.lock().unwrap().entry(op).or_default().started += 1;
    let (status, stdout, stderr) = run_killable(sh, cmd);
    use std::os::unix::process::ExitStatusExt;
    let mut tally = sh.tally.lock().unwrap();
    let count = tally.entry(op).or_default();
    if status.signal() == Some(libc::SIGKILL) {
        // A killed restore's target stays: the next command finishes or rolls back the restore
        // there (the journal names it).
        count.killed += 1;
        return;
    }
    if status.success() {
        count.succeeded += 1;
        drop(tally);
        match op {
            Op::List => {
                if let Some(ids) = ids_of(&stdout) {
                    *sh.ids.lock().unwrap() = ids;
                }
            }
            Op::Export => sh.bundles.lock().unwrap().extend(bundle),
            Op::RestoreTarget => {
                if let Some(t) = target {
                    let _ = fs::remove_dir_all(t);
                }
            }
            _ => {}
        }
        return;
    }
    count.failed += 1;
    drop(tally);
    let message = format!("{}{}", stdout.trim(), stderr.trim());
    let reason = EXPECTED_FAILURES.iter().find(|p| message.contains(*p));
    if let (Some(1), Some(reason)) = (status.code(), reason) {
        *sh.explained.lock().unwrap().entry(reason).or_default() += 1;
    } else {
        sh.unexpected
            .lock()
            .unwrap()
            .push(format!("{op:?} exited with {status}: {message}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Checking the store afterwards
// ---------------------------------------------------------------------------------------------

fn integrity(c: &Connection) -> String {
    let mut st = c
        .prepare("PRAGMA integrity_check")
        .expect("integrity_check");
    let rows: Vec<String> = st
        .query_map([], |r| r.get(0))
        .expect("integrity_check rows")
        .collect::<rusqlite::Result<_>>()
        .expect("integrity_check rows");
    rows.join("; ")
}

/// Asserts that the agent restored at `root` (snapshot `id`) is whole and one committed moment.
fn check_restored(root: &Path, id: &str, log: &Log) {
    let agent = SampleAgent::open(root);
    for db in common::databases(&agent) {
        let c = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .expect("open restored database");
        assert_eq!(integrity(&c), "ok", "snapshot {id}: {}", db.display());
        let name = db.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some((db_name, table)) = WRITTEN.iter().find(|(d, _)| *d == name) {
            let d = digest(&c, table).expect("digest of a restored database");
            assert!(
                log.digests.get(db_name).is_some_and(|s| s.contains(&d)),
                "snapshot {id}: {name} holds rows the writer never committed together"
            );
        }
        c.close().expect("close");
    }
    for db in WRITTEN.map(|(d, _)| d) {
        assert!(
            agent.sqlite_dir().join(db).is_file(),
            "snapshot {id}: {db} missing"
        );
    }
    let memdir = agent.memdir();
    let head = try_git(&memdir, &["rev-parse", "--verify", "HEAD^{commit}"])
        .unwrap_or_else(|e| panic!("snapshot {id}: no HEAD commit: {e}"));
    assert!(
        log.commits.contains(&head),
        "snapshot {id}: HEAD {head} is no commit the writer made"
    );
    try_git(&memdir, &["fsck", "--connectivity-only", "--no-dangling"])
        .unwrap_or_else(|e| panic!("snapshot {id}: git fsck: {e}"));
}

#[test]
fn thrash_with_kill_9_never_corrupts_the_store() {
    let secs: u64 = std::env::var("MEMSNAP_THRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SHORT_SECS);
    let seed: u64 = std::env::var("MEMSNAP_THRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("thrash: {secs} s, seed {seed} (MEMSNAP_THRASH_SEED={seed} to replay the choices)");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = SampleAgent::create(&tmp.path().join("agent"), &SampleSpec::tiny()).expect("agent");
    let log = Arc::new(Mutex::new(Log::default()));
    {
        let mut l = log.lock().unwrap();
        for (db, table) in WRITTEN {
            let c = Connection::open(agent.sqlite_dir().join(db)).expect("open");
            c.execute_batch(&format!(
                "CREATE TABLE {LEDGER}(k INTEGER PRIMARY KEY, v INTEGER, payload BLOB)"
            ))
            .expect("ledger");
            let d = digest(&c, table).expect("digest");
            l.digests.entry(db).or_default().insert(d);
        }
        let mode = |db: &str| common::is_wal(&agent.sqlite_dir().join(db));
        assert!(
            mode("long_term.sqlite") && !mode("vector.sqlite"),
            "one WAL, one rollback db"
        );
        let history = try_git(&agent.memdir(), &["rev-list", "HEAD"]).expect("git history");
        l.commits.extend(history.lines().map(str::to_owned));
    }
    let store = tmp.path().join("store");
    let scratch = tmp.path().join("scratch");
    fs::create_dir_all(&scratch).expect("scratch");
    let first = memsnap(&store)
        .args([
            "--json", "snapshot", "--tenant", TENANT, "--agent", AGENT, "--source",
        ])
        .arg(agent.root())
        .output()
        .expect("first snapshot");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let sh = Arc::new(Shared {
        store: store.clone(),
        scratch: scratch.clone(),
        agent: agent.clone(),
        running: Mutex::new(HashSet::new()),
        ids: Mutex::new(Vec::new()),
        bundles: Mutex::new(Vec::new()),
        tally: Mutex::new(BTreeMap::new()),
        unexpected: Mutex::new(Vec::new()),
        explained: Mutex::new(BTreeMap::new()),
        kills_sent: AtomicU64::new(0),
        serial: AtomicU64::new(0),
    });
    let listed = memsnap(&store)
        .args(["--json", "list"])
        .output()
        .expect("list");
    *sh.ids.lock().unwrap() = ids_of(&String::from_utf8_lossy(&listed.stdout)).expect("ids");

    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer_thread = {
        let (a, s, l) = (agent.clone(), stop_writer.clone(), log.clone());
        std::thread::spawn(move || writer(a, s, l, seed))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let sh = sh.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1 + w as u64));
                while Instant::now() < deadline {
                    one_op(&sh, &mut rng);
                }
            })
        })
        .collect();
    let killer_thread = {
        let (sh, stop) = (sh.clone(), stop.clone());
        std::thread::spawn(move || killer(&sh, &stop, seed ^ 0x5eed))
    };
    // At the deadline every process still running is killed, so that the run ends on time
    // however long a lock wait would have lasted.
    while workers.iter().any(|w| !w.is_finished()) {
        if Instant::now() >= deadline {
            for &pid in sh.running.lock().unwrap().iter() {
                // SAFETY: an unreaped child of this process (the lock on `running` is held).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                sh.kills_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers {
        w.join().expect("worker panicked");
    }
    stop.store(true, Ordering::Release);
    killer_thread.join().expect("killer panicked");
    stop_writer.store(true, Ordering::Release);
    writer_thread
        .join()
        .expect("writer panicked")
        .expect("writer failed");
    let thrash_time = started.elapsed();

    // Everything after this runs alone. The first command finishes any interrupted restore.
    let listed = memsnap(&store)
        .args(["--json", "list"])
        .output()
        .expect("list");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let ids = ids_of(&String::from_utf8_lossy(&listed.stdout)).expect("list JSON");
    let journals: Vec<_> = walkdir::WalkDir::new(store.join("journal"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(
        journals.is_empty(),
        "restore journals left after recovery: {journals:?}"
    );
    common::assert_no_restore_leftovers(&agent);
    let temps: Vec<_> = fs::read_dir(agent.state_dir())
        .expect("state folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".json.tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary state files left: {temps:?}");
    common::assert_databases_intact(&agent);

    let verify = memsnap(&store)
        .args(["--json", "verify", "--read-data"])
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "verify --read-data failed after the thrash: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let log = log.lock().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let target = tmp.path().join(format!("final-{i}"));
        let out = memsnap(&store)
            .args(["--json", "restore", id, "--target"])
            .arg(&target)
            .output()
            .expect("restore");
        assert!(
            out.status.success(),
            "snapshot {id} does not restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        check_restored(&target, id, &log);
        fs::remove_dir_all(&target).expect("clean up");
    }

    let tally = sh.tally.lock().unwrap();
    let mut total = Count::default();
    eprintln!("thrash tally ({secs} s of thrash, {WORKERS} workers, seed {seed}):");
    eprintln!(
        "  {:<14} {:>7} {:>9} {:>7} {:>7}",
        "operation", "started", "succeeded", "killed", "failed"
    );
    for (op, c) in tally.iter() {
        eprintln!(
            "  {:<14} {:>7} {:>9} {:>7} {:>7}",
            format!("{op:?}"),
            c.started,
            c.succeeded,
            c.killed,
            c.failed
        );
        total.started += c.started;
        total.succeeded += c.succeeded;
        total.killed += c.killed;
        total.failed += c.failed;
    }
    eprintln!(
        "  {:<14} {:>7} {:>9} {:>7} {:>7}",
        "total", total.started, total.succeeded, total.killed, total.failed
    );
    eprintln!(
        "  SIGKILLs sent: {}; writer: {} transactions ({} rolled back), {} git commits ({} failed); \
         snapshots verified and restored: {}; total time {:?} (thrash {:?})",
        sh.kills_sent.load(Ordering::Relaxed),
        log.transactions,
        log.tx_failures,
        log.git_commits,
        log.git_failures,
        ids.len(),
        started.elapsed(),
        thrash_time
    );
    eprintln!(
        "  failures explained by a race: {:?}",
        sh.explained.lock().unwrap()
    );
    let unexpected = sh.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "{} operation(s) failed without a race to explain it:\n{}",
        unexpected.len(),
        unexpected.join("\n")
    );
    assert_eq!(
        total.started,
        total.succeeded + total.killed + total.failed,
        "every operation ended one way or another"
    );
    assert!(total.succeeded > 0 && log.transactions > 0, "nothing ran");
    assert!(
        !ids.is_empty(),
        "the newest snapshot of an agent is never forgotten"
    );
}
