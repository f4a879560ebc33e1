//! Concurrency between `memsnap` processes on one store: many agents snapshotted by parallel
//! processes, two processes racing for one agent (the second waits for the lock, or gives up
//! with "busy"), and restores over a rollback-journal database on which another connection
//! holds a read transaction (the restore waits for it, or fails and is finished later), and a
//! restore or delete whose snapshot is forgotten while it waits for the agent lock.
//!
//! Covered elsewhere and not repeated here: snapshots while a writer commits continuously in
//! WAL and rollback mode, each restored database one committed moment, restores under idle
//! connections and under an open WAL read transaction, parallel snapshots inside one process
//! (tests/consistency.rs); two snapshots of one agent both waiting their turn, and a lock file
//! held by hand (tests/cli.rs); prune racing snapshots (tests/lifecycle.rs); kill -9 amid all
//! of it (tests/thrash.rs).
//!
//! No assertion depends on timing: a process "holding" the agent lock is a restore blocked by
//! a read transaction this test holds, and the test waits for its journal to say `Switching`.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use memsnap::sample::{SampleAgent, SampleSpec};
use rusqlite::Connection;
use serde_json::Value;

fn wait_output(child: Child, what: &str) -> (std::process::ExitStatus, String, String) {
    let out = child.wait_with_output().expect(what);
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Many agents, one store, parallel processes
// ---------------------------------------------------------------------------------------------

#[test]
fn eight_agents_snapshot_in_parallel_processes_into_one_store() {
    const N: usize = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    let agents: Vec<SampleAgent> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let root = tmp.path().join(format!("agent-{i}"));
                s.spawn(move || {
                    let spec = SampleSpec {
                        seed: 500 + i as u64,
                        ..SampleSpec::tiny()
                    };
                    SampleAgent::create(&root, &spec).expect("sample agent")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sample"))
            .collect()
    });
    TestCommand::new(&store).arg("init").stdout();

    for round in 0..2u64 {
        if round > 0 {
            for (i, a) in agents.iter().enumerate() {
                a.append_day(round * 100 + i as u64, 0.1)
                    .expect("change agent");
            }
        }
        let images: Vec<AgentImage> = agents.iter().map(AgentImage::capture).collect();
        let mut children: Vec<Child> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                TestCommand::new(&store)
                    .args(["--json", "snapshot", "--tenant", "par"])
                    .args(["--agent", &format!("a{i}"), "--source"])
                    .arg(a.root())
                    .spawn()
            })
            .collect();
        // The second round also has a prune (exclusive) and a verify (shared) in the crowd.
        if round > 0 {
            children.push(TestCommand::new(&store).args(["prune"]).spawn());
            children.push(TestCommand::new(&store).args(["verify"]).spawn());
        }
        let mut ids = Vec::new();
        for (i, child) in children.into_iter().enumerate() {
            let (status, stdout, stderr) = wait_output(child, "memsnap");
            assert!(
                status.success(),
                "round {round}, process {i}: {status}\n{stdout}\n{stderr}"
            );
            if i < N {
                let v: Value = serde_json::from_str(&stdout).expect("snapshot JSON");
                assert_eq!(v["agent"], format!("a{i}"));
                ids.push(str_of(&v, "id").to_owned());
            }
        }
        let listed = TestCommand::new(&store)
            .args(["list", "--tenant", "par"])
            .json();
        assert_eq!(
            listed.as_array().map(Vec::len),
            Some(N * (round as usize + 1)),
            "round {round}: {listed:#}"
        );
        let verify = TestCommand::new(&store)
            .args(["verify", "--read-data"])
            .json();
        assert_eq!(verify["ok"], true, "{verify:#}");
        for (i, id) in ids.iter().enumerate() {
            let target = tmp.path().join(format!("restored-{round}-{i}"));
            let restored = restore_to(&store, id, &target);
            assert_eq!(
                restored.row_counts().expect("rows"),
                images[i].rows,
                "round {round}, agent {i}: rows"
            );
            assert_eq!(restored.git_head().expect("head"), images[i].head);
            assert_same_tree(
                &images[i].memdir,
                &tree(&restored.memdir(), true),
                &format!("round {round}, agent {i}: memdir"),
            );
            assert_databases_intact(&restored);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A restore held up by a reader: the deterministic way to have a process hold the agent lock
// ---------------------------------------------------------------------------------------------

/// An agent with two snapshots: `old` (returned with its image) and a later one; the live agent
/// is in the later state.
fn two_states(f: &Fixture) -> (String, AgentImage) {
    let image = AgentImage::capture(&f.agent);
    let old = f.snapshot_id();
    f.agent.append_day(7, 0.3).expect("append day");
    f.snapshot_id();
    (old, image)
}

/// A connection to vector.sqlite (rollback-journal mode) inside a read transaction: it holds
/// SQLite's shared lock, so nobody can write the database until it ends.
fn hold_read_transaction(agent: &SampleAgent) -> (Connection, i64) {
    let db = agent.sqlite_dir().join("vector.sqlite");
    assert!(!is_wal(&db), "vector.sqlite is a rollback-journal database");
    let c = Connection::open(&db).expect("open vector.sqlite");
    c.execute_batch("BEGIN").expect("begin");
    let n: i64 = c
        .query_row("SELECT count(*) FROM embeddings", [], |r| r.get(0))
        .expect("count");
    (c, n)
}

fn count_embeddings(c: &Connection) -> i64 {
    c.query_row("SELECT count(*) FROM embeddings", [], |r| r.get(0))
        .expect("count")
}

/// Waits until the restore journal says `phase` (the restore process got that far), failing if
/// `child` exits first.
fn wait_for_phase(f: &Fixture, child: &mut Child, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(bytes) = std::fs::read(f.journal())
            && serde_json::from_slice::<Value>(&bytes).is_ok_and(|j| j["phase"] == phase)
        {
            return;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the restore exited ({status}) before its journal said {phase}");
        }
        assert!(
            Instant::now() < deadline,
            "the restore never reached {phase}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Two processes racing for one agent
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_process_on_a_busy_agent_waits_for_the_lock_or_fails_busy() {
    let f = Fixture::new();
    let (old, image) = two_states(&f);
    let before = f.list_ids();
    let (reader, grown) = hold_read_transaction(&f.agent);

    // The restore gets the agent lock, stages, and waits for the reader to let go of vector.
    let mut restore = f
        .cmd()
        .args(["--lock-timeout", "600", "--json", "restore", &old])
        .spawn();
    wait_for_phase(&f, &mut restore, "Switching");

    // A snapshot that will not wait fails at once, saying why, and adds nothing.
    let busy = f
        .cmd()
        .args(["--lock-timeout", "0"])
        .snapshot(f.agent.root())
        .assert_exit_code(1);
    assert!(
        busy.stderr
            .contains(&format!("agent {TENANT}/{AGENT} is busy"))
            && busy.stderr.contains("--lock-timeout"),
        "{busy}"
    );
    // One that waits is started now, while the restore still holds the lock.
    let waiting = f
        .cmd()
        .args(["--lock-timeout", "600", "--json"])
        .snapshot(f.agent.root())
        .spawn();

    // The reader's transaction still sees the database it began with.
    assert_eq!(count_embeddings(&reader), grown);
    reader
        .execute_batch("COMMIT")
        .expect("end the read transaction");

    let (status, stdout, stderr) = wait_output(restore, "restore");
    assert!(status.success(), "restore: {status}\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("restore JSON");
    let pre = str_of(&report, "pre_snapshot_id").to_owned();
    let (status, stdout, stderr) = wait_output(waiting, "snapshot");
    assert!(
        status.success(),
        "waiting snapshot: {status}\n{stdout}\n{stderr}"
    );
    let after: Value = serde_json::from_str(&stdout).expect("snapshot JSON");

    // The connection sees the restored rows, and so does the snapshot that waited: it ran after
    // the restore, never in the middle of it.
    assert_eq!(count_embeddings(&reader), image.rows["vector.embeddings"]);
    reader.close().expect("close");
    image.assert_matches(&f.agent, "after the restore");
    let snap = restore_to(&f.store, str_of(&after, "id"), &f.path("after"));
    assert_eq!(snap.row_counts().expect("rows"), image.rows);
    assert_same_tree(
        &image.memdir,
        &tree(&snap.memdir(), true),
        "waiting snapshot",
    );
    let mut want = before;
    want.extend([pre, str_of(&after, "id").to_owned()]);
    assert_eq!(f.list_ids(), want, "the busy snapshot added nothing");
    assert_eq!(f.cmd().args(["verify", "--read-data"]).json()["ok"], true);
}

// ---------------------------------------------------------------------------------------------
// 3. Restore while another connection holds a read transaction (rollback-journal mode); the
// restore that waits for it is test 2's
// ---------------------------------------------------------------------------------------------

#[test]
fn a_restore_blocked_by_a_read_transaction_past_its_timeout_is_finished_by_the_next_command() {
    let f = Fixture::new();
    let (old, image) = two_states(&f);
    let (reader, grown) = hold_read_transaction(&f.agent);

    let out = f
        .cmd()
        .args(["--lock-timeout", "0.3", "restore", &old])
        .assert_exit_code(1);
    assert!(
        out.stderr.contains("vector.sqlite")
            && out.stderr.contains("locked")
            && out.stderr.contains("run any memsnap command to finish it"),
        "{out}"
    );
    assert_eq!(f.read_journal()["phase"], "Switching", "{out}");
    // The reader is undisturbed; a command that cannot finish the restore yet leaves it be.
    assert_eq!(count_embeddings(&reader), grown);
    f.cmd().args(["--lock-timeout", "0.3", "list"]).stdout();
    assert!(
        f.journal().exists(),
        "the journal stays until the restore is finished"
    );

    reader
        .execute_batch("COMMIT")
        .expect("end the read transaction");
    f.cmd().arg("list").stdout();
    assert!(
        !f.journal().exists(),
        "the next command finished the restore"
    );
    assert_eq!(count_embeddings(&reader), image.rows["vector.embeddings"]);
    reader.close().expect("close");
    image.assert_matches(&f.agent, "restore finished by the next command");
    assert_eq!(f.cmd().args(["verify", "--read-data"]).json()["ok"], true);
}

// ---------------------------------------------------------------------------------------------
// 4. A snapshot forgotten while a restore or delete of it waits for the agent lock
// ---------------------------------------------------------------------------------------------

/// Removes snapshot `id`'s record as `forget` does, under the index lock as memsnap takes it,
/// but without the agent lock (which the caller holds).
fn forget_by_hand(f: &Fixture, id: &str) {
    let index_lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.store.join("locks/index.lock"))
        .expect("index lock file");
    index_lock.lock().expect("index lock");
    let db = redb::Database::create(f.store.join("index.redb")).expect("index");
    let snapshots: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("snapshots");
    let tx = db.begin_write().expect("write");
    tx.open_table(snapshots)
        .expect("snapshots table")
        .remove(id)
        .expect("remove")
        .expect("the snapshot was there");
    tx.commit().expect("commit");
}

/// Holds the agent lock of the fixture's agent, as another memsnap process would.
fn hold_agent_lock(f: &Fixture) -> std::fs::File {
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.agent_lock())
        .expect("agent lock file");
    lock.lock().expect("hold the agent lock");
    lock
}

/// Regression: a restore read the snapshot's record and entries before it took the agent lock,
/// so a forget (which takes that lock) and a prune in between freed the chunks it was about to
/// stage, and the restore failed with "chunk ... is not in the store index (the store is
/// damaged; run `memsnap verify`)". It now reads them again under the lock and reports the
/// snapshot as gone. The test forgets by hand (a `forget` process would wait for the lock the
/// test holds); if the restore is slow to reach the lock, the race is missed, never failed.
#[test]
fn a_restore_of_a_snapshot_forgotten_while_it_waited_for_the_agent_lock_says_so() {
    let f = Fixture::new();
    let (old, _) = two_states(&f);
    let lock = hold_agent_lock(&f);
    let restore = f
        .cmd()
        .args(["--lock-timeout", "600", "restore", &old, "--target"])
        .arg(f.path("target"))
        .spawn();
    // Time for the restore to read the record and wait for the lock.
    std::thread::sleep(Duration::from_secs(2));

    forget_by_hand(&f, &old);
    let pruned = f.cmd().args(["prune", "--max-unused", "0"]).json();
    assert!(pruned["chunks_unused"].as_u64() > Some(0), "{pruned:#}");
    lock.unlock().expect("release the agent lock");

    let (status, stdout, stderr) = wait_output(restore, "restore");
    assert_eq!(status.code(), Some(1), "{status}\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("no snapshot matches") && !stderr.contains("damaged"),
        "{stderr}"
    );
    assert_eq!(f.cmd().args(["verify", "--read-data"]).json()["ok"], true);
}

/// Regression: two deletes of one snapshot (or a forget and a delete) racing for the agent lock
/// both reported the deletion, and published two "deleted" events; the second now finds it gone.
#[test]
fn a_delete_of_a_snapshot_removed_while_it_waited_for_the_agent_lock_says_so() {
    let f = Fixture::new();
    let (old, _) = two_states(&f);
    let lock = hold_agent_lock(&f);
    let delete = f
        .cmd()
        .args(["--lock-timeout", "600", "delete", &old])
        .spawn();
    // Time for the delete to resolve the id and wait for the lock.
    std::thread::sleep(Duration::from_secs(2));
    forget_by_hand(&f, &old);
    lock.unlock().expect("release the agent lock");
    let (status, stdout, stderr) = wait_output(delete, "delete");
    assert_eq!(status.code(), Some(1), "{status}\n{stdout}\n{stderr}");
    assert!(stderr.contains("no snapshot matches"), "{stderr}");
    assert_eq!(f.list_ids().len(), 1);
}
