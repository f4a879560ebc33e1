//! End-to-end tests of restore recovery and of the edges of the source folders: journals left in
//! every phase (by hand and by a real crash), injected errors, one agent's broken journal among
//! healthy agents, overlapping or symlinked folders, databases whose page size changed, and
//! option values out of range.
//!
//! Every test runs the real `memsnap` binary against a store in a temporary folder and a tiny
//! sample agent built by `memsnap::sample`, and checks what ends up on disk (files, rows,
//! journal, staging folders), not only exit codes. The helpers shared with tests/cli.rs
//! (`TestCommand`, `Fixture`, `tree`, `AgentImage`...) are in tests/common/mod.rs; journal
//! layout: store-format.md, "Restore journal".

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use memsnap::sample::SampleAgent;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Journals, state documents and small databases
// ---------------------------------------------------------------------------------------------

fn assert_no_journal(f: &Fixture, what: &str) {
    let left = fs::read_to_string(f.journal());
    assert!(left.is_err(), "{what}: the journal is left: {left:?}");
}

/// State documents: name -> (bytes, permission bits).
type StateDocs = BTreeMap<String, (Vec<u8>, u32)>;

/// The state documents in the state folder.
fn state_docs(agent: &SampleAgent) -> StateDocs {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(agent.state_dir()).expect("read state dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !name.starts_with('.') {
            let bytes = fs::read(e.path()).expect("read state file");
            let mode = e.metadata().expect("metadata").permissions().mode() & 0o7777;
            out.insert(name, (bytes, mode));
        }
    }
    assert!(!out.is_empty(), "the sample agent has state documents");
    out
}

/// The `state` array of a journal: name -> (bytes, mode).
fn journal_state(journal: &Value) -> BTreeMap<String, (Vec<u8>, Option<u32>)> {
    let items = journal["state"]
        .as_array()
        .unwrap_or_else(|| panic!("the journal has no `state` array: {journal:#}"));
    items
        .iter()
        .map(|s| {
            let bytes = hex::decode(str_of(s, "json_hex")).expect("json_hex is hex");
            let mode = s["mode"].as_u64().map(|m| m as u32);
            (str_of(s, "name").to_owned(), (bytes, mode))
        })
        .collect()
}

/// Creates (or fills) a small rollback-journal database with `rows` rows.
fn write_database(path: &Path, rows: i64) {
    let c = rusqlite::Connection::open(path).expect("open database");
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body TEXT);")
        .expect("create table");
    for i in 0..rows {
        c.execute("INSERT INTO t(body) VALUES (?1)", [format!("row {i}")])
            .expect("insert");
    }
    c.close().expect("close database");
}

fn count_rows(path: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open database");
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count rows")
}

// ---------------------------------------------------------------------------------------------
// 1. A journal whose switch is complete is only cleaned up
// ---------------------------------------------------------------------------------------------

/// A restore that crashed after its journal said `Switched` (everything switched; only the
/// staging folders were left to remove). The agent has written since: a new database, a new
/// state document, a new note. The next command must remove the staging folders and the
/// journal, and must not redo the switch (which would delete all three).
#[test]
fn switched_journal_is_cleaned_up_by_the_next_command_without_redoing_the_switch() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let dbs = f.snapshot_databases(&id);
    let snap_state = state_docs(&f.agent);

    // What the crashed restore left: the moved-aside memdir, the emptied database staging
    // folder, and the journal as the restore writes it after the switch (state included).
    let old = f.staged_memdir("old");
    fs::create_dir_all(old.join("topics")).expect("mkdir old memdir");
    fs::write(old.join("topics/before-the-restore.md"), "# Old\n").expect("old note");
    let staged_sqlite = f.staged_sqlite();
    fs::create_dir(&staged_sqlite).expect("mkdir staged sqlite");
    let state: Vec<Value> = snap_state
        .iter()
        .map(|(name, (bytes, mode))| json!({"name": name, "mode": mode, "json_hex": hex::encode(bytes)}))
        .collect();
    let mut journal = f.hand_made_journal("Switched", &id, &dbs);
    journal["state"] = Value::Array(state);
    f.write_journal(&journal);

    // The agent works after the switch.
    let after_db = f.agent.sqlite_dir().join("after.sqlite");
    write_database(&after_db, 3);
    let after_state = f.agent.state_dir().join("after_switch.json");
    fs::write(&after_state, "{\"written\": \"after the switch\"}\n").expect("state file");
    fs::write(f.agent.memdir().join("after.md"), "# After\n").expect("note");
    let image = AgentImage::capture(&f.agent);

    f.list_ids();
    assert_no_journal(&f, "after `list`");
    assert!(!old.exists(), "the moved-aside memdir is removed");
    assert!(
        !staged_sqlite.exists(),
        "the database staging folder is removed"
    );
    assert!(
        after_db.exists(),
        "the switch was redone: after.sqlite gone"
    );
    assert_eq!(count_rows(&after_db), 3, "after.sqlite keeps its rows");
    assert_eq!(
        fs::read_to_string(&after_state).ok().as_deref(),
        Some("{\"written\": \"after the switch\"}\n"),
        "the switch was redone: the new state document is gone or changed"
    );
    image.assert_matches(&f.agent, "agent after cleaning up a Switched journal");
}

// ---------------------------------------------------------------------------------------------
// 2. A real crash right after the journal says Switching
// ---------------------------------------------------------------------------------------------

/// Snapshot, change the agent (notes, rows, both state files, one new state file), then crash a
/// restore right after its journal says `Switching`. Returns the fixture, the snapshot id, the
/// image of the agent at the snapshot and the state documents at the snapshot.
fn crash_after_journal_switching() -> (Fixture, String, AgentImage, StateDocs) {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    let snap_state = state_docs(&f.agent);
    f.agent.append_day(11, 0.2).expect("append_day");
    fs::write(
        f.agent.state_dir().join("new_state.json"),
        "{\"created\": \"after the snapshot\"}\n",
    )
    .expect("state file");
    assert_ne!(state_docs(&f.agent), snap_state, "the state changed");

    let out = f.crash_restore(&id, "restore:journal-switching");
    assert!(out.stderr.contains("restore:journal-switching"), "{out}");
    assert_eq!(
        f.read_journal()["phase"],
        "Switching",
        "the crash left a Switching journal\n{out}"
    );
    (f, id, image, snap_state)
}

#[test]
fn crash_after_journal_switching_carries_the_state_and_the_next_command_restores_it() {
    let (f, id, image, snap_state) = crash_after_journal_switching();
    let journal = f.read_journal();
    assert_eq!(str_of(&journal, "snapshot_id"), id);
    let carried = journal_state(&journal);
    let expected: BTreeMap<String, (Vec<u8>, Option<u32>)> = snap_state
        .iter()
        .map(|(n, (b, m))| (n.clone(), (b.clone(), Some(*m))))
        .collect();
    assert_eq!(
        carried, expected,
        "the journal carries exactly the snapshot's state documents"
    );

    // The state changes again before the next command runs: recovery must still write the
    // snapshot's state, not keep (or merge with) what is live.
    fs::write(
        f.agent.state_dir().join("extract_cursor.json"),
        "{\"tampered\": \"after the crash\"}\n",
    )
    .expect("tamper with a state file");

    f.list_ids();
    assert_no_journal(&f, "after `list`");
    let now: BTreeMap<String, Vec<u8>> = state_docs(&f.agent)
        .into_iter()
        .map(|(n, (b, _))| (n, b))
        .collect();
    let snap: BTreeMap<String, Vec<u8>> =
        snap_state.into_iter().map(|(n, (b, _))| (n, b)).collect();
    assert_eq!(now, snap, "the state is the snapshot's again");
    image.assert_matches(
        &f.agent,
        "agent after a crash at journal-switching and `list`",
    );
}

/// Recovery writes the state documents the journal carries (checked against their hashes before
/// `Switching`), so that it needs neither the index nor the state provider. A marker written into
/// the journal after the crash must therefore end up in the state folder.
#[test]
fn recovery_writes_the_state_documents_carried_in_the_journal() {
    let (f, _id, _image, snap_state) = crash_after_journal_switching();
    let marker = b"{\"from\": \"the journal\"}\n";
    let mut journal = f.read_journal();
    let mut replaced = false;
    for s in journal["state"].as_array_mut().expect("state array") {
        if s["name"] == "extract_cursor.json" {
            s["json_hex"] = Value::String(hex::encode(marker));
            replaced = true;
        }
    }
    assert!(
        replaced,
        "the journal carries extract_cursor.json: {journal:#}"
    );
    f.write_journal(&journal);

    f.list_ids();
    assert_no_journal(&f, "after `list`");
    let now = state_docs(&f.agent);
    assert_eq!(
        now["extract_cursor.json"].0, marker,
        "recovery took the state from the journal"
    );
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        snap_state.keys().collect::<Vec<_>>(),
        "the state folder holds the snapshot's documents, no more"
    );
    assert_eq!(now["dream_run.json"].0, snap_state["dream_run.json"].0);
}

// ---------------------------------------------------------------------------------------------
// 3. An error after staging rolls back at once
// ---------------------------------------------------------------------------------------------

#[test]
fn error_after_staging_fails_the_restore_and_leaves_no_journal_staging_or_change() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    f.agent.append_day(11, 0.2).expect("append_day");
    let live = tree(f.agent.root(), true);
    let rows = f.agent.row_counts().expect("rows");

    let out = f
        .cmd()
        .env("MEMSNAP_FAILPOINT", "restore:staged:error")
        .args(["restore", &id])
        .assert_exit_code(1);
    assert!(out.stderr.contains("restore:staged"), "{out}");
    assert_no_journal(&f, "after a failed restore");
    assert_no_restore_leftovers(&f.agent);
    assert_agent_tree_unchanged(
        live,
        &f.agent,
        "agent after a restore that failed after staging",
    );
    assert_eq!(f.agent.row_counts().expect("rows"), rows);
}

// ---------------------------------------------------------------------------------------------
// 4. One agent's broken journal
// ---------------------------------------------------------------------------------------------

#[test]
fn broken_journal_of_one_agent_does_not_block_list_verify_or_another_agents_snapshot() {
    let f = Fixture::new();
    let first = f.snapshot_id();
    let broken = f.store.join("journal").join(TENANT).join("xavier.json");
    fs::create_dir_all(broken.parent().expect("parent")).expect("mkdir journal");
    fs::write(&broken, "{not json").expect("broken journal");

    let mut runs = vec![
        f.cmd().args(["list", "--json"]).assert_exit_code(0),
        f.cmd().args(["verify", "--json"]).assert_exit_code(0),
    ];
    let snap = f
        .cmd()
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT, "--json"])
        .arg("--source")
        .arg(f.agent.root())
        .assert_exit_code(0);
    let second = str_of(&snap.json(), "id").to_owned();
    runs.push(snap);
    for out in &runs {
        assert!(
            out.stderr.contains("journal") && out.stderr.contains("xavier.json"),
            "stderr names the broken journal\n{out}"
        );
    }
    assert_eq!(f.list_ids(), vec![first, second]);
    // Nobody can tell what the broken journal was for: it stays for a human to look at.
    assert_eq!(
        fs::read(&broken).ok().as_deref(),
        Some(&b"{not json"[..]),
        "the broken journal is left as it was"
    );
}

/// Regression (found by tests/thrash.rs): a process killed while it wrote a journal or a state
/// document left its temporary file (`.NAME.tmp-<hex>`) for ever, in the store's journal folder
/// and in the agent's state folder. The next command on the agent removes them.
#[test]
fn temporary_files_of_killed_journal_and_state_writes_are_removed() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let dir = f.store.join("journal").join(TENANT);
    fs::create_dir_all(&dir).expect("mkdir journal");
    let journal_tmp = dir.join(format!(".{AGENT}.json.tmp-0123456789abcdef"));
    fs::write(&journal_tmp, b"{\"version\": 1, \"phase\"").expect("temp journal");
    // Another agent's, without a journal beside it.
    let other_tmp = dir.join(".bob.json.tmp-0123456789abcdef");
    fs::write(&other_tmp, b"{").expect("other temp journal");
    let state_tmp = f
        .agent
        .state_dir()
        .join(".dream_run.json.tmp-00000000000000ff");
    let agents_own = f.agent.state_dir().join(".dream_run.json.tmp-mine");
    fs::write(&state_tmp, b"{").expect("temp state");
    fs::write(&agents_own, b"{").expect("the agent's own file");

    // Any command recovers every agent whose lock is free: bob's temp goes as well.
    f.cmd().arg("list").stdout();
    assert!(
        !journal_tmp.exists() && !other_tmp.exists(),
        "journal temps removed"
    );
    // A restore rewrites the state folder, under the agent lock: its own temps go too.
    f.restore(&id, &[]);
    assert!(!state_tmp.exists(), "state temp removed");
    assert!(agents_own.exists(), "a file memsnap did not write stays");
    assert_no_journal(&f, "after the restore");
}

// ---------------------------------------------------------------------------------------------
// 5. Overlapping source folders
// ---------------------------------------------------------------------------------------------

/// D/m (a note), D/m/db (a database), D/s (a state document), D/q (empty).
fn overlapping_layout(d: &Path) {
    fs::create_dir_all(d.join("m/db")).expect("mkdir");
    fs::create_dir_all(d.join("s")).expect("mkdir");
    fs::create_dir_all(d.join("q")).expect("mkdir");
    fs::write(d.join("m/note.md"), "# Note\n").expect("note");
    write_database(&d.join("m/db/long_term.sqlite"), 2);
    fs::write(d.join("s/cursor.json"), "{\"at\": 1}\n").expect("state");
}

/// Runs `snapshot --memdir M --sqlite-dir Q --state-dir S` and checks it is refused as
/// overlapping and leaves no snapshot and no remembered source.
fn assert_overlap_refused(store: &Path, memdir: &Path, sqlite: &Path, state: &Path) {
    let out = TestCommand::new(store)
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .arg("--memdir")
        .arg(memdir)
        .arg("--sqlite-dir")
        .arg(sqlite)
        .arg("--state-dir")
        .arg(state)
        .assert_exit_code(1);
    assert!(
        out.stderr.contains("overlap"),
        "the message names the overlap\n{out}"
    );
    if store.join("index.redb").exists() {
        let list = TestCommand::new(store).args(["list", "--json"]).run();
        assert_eq!(list.json(), json!([]), "no snapshot was taken\n{list}");
        // The refused folders were not remembered as the agent's sources either.
        TestCommand::new(store)
            .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
            .assert_exit_code(2);
    }
}

#[test]
fn overlapping_source_folders_are_refused_and_nothing_is_snapshotted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = tmp.path().join("d");
    overlapping_layout(&d);
    let store = tmp.path().join("store");
    // The case of the brief: the sqlite folder inside the memdir.
    assert_overlap_refused(&store, &d.join("m"), &d.join("m/db"), &d.join("s"));
    // The memdir inside the sqlite folder, and the state folder equal to the memdir.
    assert_overlap_refused(&store, &d.join("m/db"), &d.join("m"), &d.join("s"));
    assert_overlap_refused(&store, &d.join("m"), &d.join("q"), &d.join("m"));
    // Overlap spelled with a relative path and `..`.
    let out = TestCommand::new(&store)
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .args([
            "--memdir",
            "m",
            "--sqlite-dir",
            "q/../m/db",
            "--state-dir",
            "s",
        ])
        .current_dir(&d)
        .assert_exit_code(1);
    assert!(out.stderr.contains("overlap"), "{out}");
}

/// A store inside the memdir overlaps the memory it snapshots: the snapshot captures the store
/// while writing it, and a restore over the live agent moves the memdir, store included, aside
/// and deletes it. Either the snapshot is refused, or the store (every snapshot, the pre-restore
/// one included) survives the restore.
#[test]
fn store_inside_the_memdir_is_refused_or_survives_a_restore() {
    let f = Fixture::new();
    let store = f.agent.memdir().join(".memsnap-store");
    let snap = TestCommand::new(&store)
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT, "--json"])
        .arg("--source")
        .arg(f.agent.root())
        .run();
    match snap.status.code() {
        Some(1) => {
            assert!(
                snap.stderr.contains("store") && snap.stderr.contains("overlap"),
                "a refusal says the store overlaps the memdir\n{snap}"
            );
            return;
        }
        Some(0) => {}
        _ => panic!("snapshot with the store inside the memdir\n{snap}"),
    }
    let id = str_of(&snap.json(), "id").to_owned();
    fs::write(f.agent.memdir().join("inbox.md"), "# Inbox\n").expect("note");
    let restore = TestCommand::new(&store)
        .args(["restore", &id, "--json"])
        .run();
    let mut expected = vec![id.clone()];
    match restore.status.code() {
        Some(0) => expected.push(str_of(&restore.json(), "pre_snapshot_id").to_owned()),
        Some(1) => assert!(restore.stderr.contains("store"), "{restore}"),
        _ => panic!("restore with the store inside the memdir\n{restore}"),
    }
    let list = TestCommand::new(&store).args(["list", "--json"]).run();
    let ids: Vec<String> = list
        .json()
        .as_array()
        .expect("list is an array")
        .iter()
        .map(|i| str_of(i, "id").to_owned())
        .collect();
    for want in &expected {
        assert!(
            ids.contains(want),
            "snapshot {want} was lost by the restore; the store lists {ids:?}\n{restore}"
        );
    }
    TestCommand::new(&store)
        .args(["verify", "--read-data"])
        .assert_exit_code(0);
}

#[test]
fn overlap_hidden_behind_a_symlink_is_refused_too() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = tmp.path().join("d");
    overlapping_layout(&d);
    std::os::unix::fs::symlink(d.join("m/db"), d.join("db-link")).expect("symlink");
    assert_overlap_refused(
        &tmp.path().join("store"),
        &d.join("m"),
        &d.join("db-link"),
        &d.join("s"),
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A memdir that is a symlink
// ---------------------------------------------------------------------------------------------

#[test]
fn symlinked_memdir_is_snapshotted_and_restored_as_the_folder_it_points_to() {
    let f = Fixture::new();
    let real = f.path("elsewhere/real-memdir");
    fs::create_dir_all(real.parent().expect("parent")).expect("mkdir elsewhere");
    fs::rename(f.agent.memdir(), &real).expect("move the memdir away");
    std::os::unix::fs::symlink(&real, f.agent.memdir()).expect("symlink the memdir");
    let before = tree(&real, true);
    let image = AgentImage::capture(&f.agent);
    let id = f.snapshot_id();

    // Into a target: a real folder with the same content.
    let target = f.path("restored");
    f.restore_into(&id, &target);
    let meta = fs::symlink_metadata(target.join("memdir")).expect("target memdir");
    assert!(
        meta.is_dir() && !meta.file_type().is_symlink(),
        "the target memdir is a real folder"
    );
    assert_same_tree(
        &before,
        &tree(&target.join("memdir"), true),
        "target memdir",
    );
    assert_eq!(
        SampleAgent::open(&target).git_head().expect("git head"),
        image.head
    );

    // Over the live agent, changed through the symlink.
    f.agent.append_day(11, 0.2).expect("append_day");
    fs::write(f.agent.memdir().join("inbox.md"), "# Inbox\n").expect("note");
    f.restore(&id, &[]);
    let link = fs::symlink_metadata(f.agent.memdir()).expect("live memdir");
    assert!(
        link.file_type().is_symlink(),
        "the live memdir is still a symlink"
    );
    assert_eq!(fs::read_link(f.agent.memdir()).expect("readlink"), real);
    assert_same_tree(
        &before,
        &tree(&real, true),
        "the symlink's target after restore",
    );
    image.assert_matches(&f.agent, "agent with a symlinked memdir after restore");
    let left = staging_in(real.parent().expect("parent"));
    assert!(
        left.is_empty(),
        "staging left next to the real memdir: {left:?}"
    );

    // And again (the restore did not break the layout for the next one).
    f.agent.append_day(12, 0.2).expect("append_day");
    f.restore(&id, &[]);
    assert_same_tree(
        &before,
        &tree(&real, true),
        "the symlink's target, second restore",
    );
    assert!(
        fs::symlink_metadata(f.agent.memdir())
            .expect("memdir")
            .file_type()
            .is_symlink()
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A live WAL database whose page size differs from the snapshot's
// ---------------------------------------------------------------------------------------------

/// Snapshot; the agent works; long_term.sqlite (WAL) is rebuilt with 8192-byte pages.
fn agent_with_changed_page_size() -> (Fixture, String, AgentImage) {
    let f = Fixture::new();
    let long_term = f.agent.sqlite_dir().join("long_term.sqlite");
    assert_eq!(
        db_header(&long_term),
        (4096, true),
        "sample long_term.sqlite"
    );
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    // Work after the snapshot, so that a partial switch would show.
    f.agent.append_day(11, 0.2).expect("append_day");
    let c = rusqlite::Connection::open(&long_term).expect("open long_term");
    c.execute_batch(
        "PRAGMA journal_mode=DELETE; PRAGMA page_size=8192; VACUUM; PRAGMA journal_mode=WAL;",
    )
    .expect("change the page size");
    let page: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .expect("page_size");
    assert_eq!(page, 8192);
    c.close().expect("close long_term");
    assert_eq!(db_header(&long_term), (8192, true), "long_term.sqlite now");
    (f, id, image)
}

#[test]
fn restore_over_a_wal_database_with_another_page_size_is_refused_and_changes_nothing() {
    let (f, id, _image) = agent_with_changed_page_size();
    let long_term = f.agent.sqlite_dir().join("long_term.sqlite");
    let memdir = tree(&f.agent.memdir(), true);
    let live = tree(f.agent.root(), true);
    let rows = f.agent.row_counts().expect("rows");

    let out = f.cmd().args(["restore", &id]).assert_exit_code(1);
    assert!(
        out.stderr.contains("long_term.sqlite")
            && out.stderr.contains("8192")
            && out.stderr.contains("4096")
            && out.stderr.contains("page"),
        "the message names the database and both page sizes\n{out}"
    );
    assert!(
        out.stderr.contains("journal_mode=DELETE"),
        "the message says what to do\n{out}"
    );
    assert_no_journal(&f, "after a refused restore");
    assert_no_restore_leftovers(&f.agent);
    assert_same_tree(&memdir, &tree(&f.agent.memdir(), true), "live memdir");
    assert_eq!(f.agent.row_counts().expect("rows"), rows, "row counts");
    assert_agent_tree_unchanged(live, &f.agent, "the whole live agent");
    assert_eq!(db_header(&long_term), (8192, true));
}

/// The refusal's advice works: after `PRAGMA journal_mode=DELETE` on the live database, the
/// same restore succeeds and brings the snapshot back.
#[test]
fn page_size_refusal_advice_lets_the_restore_succeed() {
    let (f, id, image) = agent_with_changed_page_size();
    let long_term = f.agent.sqlite_dir().join("long_term.sqlite");
    f.cmd().args(["restore", &id]).assert_exit_code(1);
    let c = rusqlite::Connection::open(&long_term).expect("open long_term");
    let mode: String = c
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "delete");
    c.close().expect("close long_term");

    f.restore(&id, &[]);
    image.assert_matches(&f.agent, "agent restored after following the advice");
    assert_eq!(
        db_header(&long_term).0,
        4096,
        "the snapshot's page size is back"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. --lock-timeout out of range
// ---------------------------------------------------------------------------------------------

#[test]
fn lock_timeout_out_of_range_is_refused_with_a_clear_message_and_no_panic() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let source = f.agent.root().to_str().expect("UTF-8 path").to_owned();
    let commands: [&[&str]; 4] = [
        &["list"],
        &["verify"],
        &["restore", &id, "--dry-run"],
        &[
            "snapshot", "--tenant", TENANT, "--agent", AGENT, "--source", &source,
        ],
    ];
    for value in ["1e20", "inf", "NaN", "-1"] {
        for args in commands {
            let out = f
                .cmd()
                .arg(format!("--lock-timeout={value}"))
                .args(args)
                .run();
            assert!(
                matches!(out.status.code(), Some(1 | 2)),
                "--lock-timeout={value}: exit 1 or 2\n{out}"
            );
            assert!(!out.stderr.contains("panicked"), "{out}");
            assert!(
                out.stderr.contains("lock-timeout"),
                "the message names the option\n{out}"
            );
        }
    }
    assert_eq!(f.list_ids(), vec![id], "no refused command took a snapshot");

    let demo = f
        .cmd()
        .args(["--lock-timeout", "1e20", "demo", "--dir"])
        .arg(f.path("demo"))
        .run();
    assert_eq!(demo.status.code(), Some(1), "{demo}");
    assert!(
        !demo.stderr.contains("panicked") && demo.stderr.contains("lock-timeout"),
        "{demo}"
    );
}

/// An option the command is going to refuse is refused before any work: `demo` must not build
/// its 20 MiB sample agent first.
#[test]
fn lock_timeout_out_of_range_is_refused_before_demo_does_any_work() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("demo");
    let out = TestCommand::new(&tmp.path().join("store"))
        .args(["--lock-timeout", "1e20", "demo", "--dir"])
        .arg(&dir)
        .run();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("lock-timeout"), "{out}");
    assert!(
        !dir.exists(),
        "demo created {} before refusing the option\n{out}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 9. A memdir symlink to a folder outside the memdir
// ---------------------------------------------------------------------------------------------

#[test]
fn memdir_symlink_to_an_outside_folder_is_restored_as_a_link_and_never_followed() {
    let outside = tempfile::tempdir().expect("outside temp dir");
    fs::write(outside.path().join("keep.txt"), "keep me\n").expect("outside file");
    fs::create_dir(outside.path().join("sub")).expect("outside subfolder");
    fs::write(outside.path().join("sub/inner.txt"), "inner\n").expect("outside file");
    let outside_before = tree(outside.path(), true);

    let f = Fixture::new();
    let link = f.agent.memdir().join("link");
    std::os::unix::fs::symlink(outside.path(), &link).expect("symlink out of the memdir");
    let id = f.snapshot_id();
    let show = f.cmd().args(["show", &id]).json();
    let entries = show["entries"].as_array().expect("entries");
    assert!(
        entries
            .iter()
            .any(|e| e["part"] == "memdir" && e["path"] == "link" && e["kind"] == "symlink"),
        "the link is recorded as a symlink: {show:#}"
    );
    assert!(
        !entries
            .iter()
            .any(|e| str_of(e, "path").starts_with("link/")),
        "nothing behind the link is captured: {show:#}"
    );

    let target = f.path("restored");
    f.restore_into(&id, &target);
    let restored = target.join("memdir/link");
    let meta = fs::symlink_metadata(&restored).expect("restored link");
    assert!(meta.file_type().is_symlink(), "memdir/link is a symlink");
    assert_eq!(fs::read_link(&restored).expect("readlink"), outside.path());
    assert_same_tree(
        &outside_before,
        &tree(outside.path(), true),
        "outside folder",
    );

    // Over the live agent: the live memdir, link included, is moved aside and deleted.
    fs::write(f.agent.memdir().join("inbox.md"), "# Inbox\n").expect("note");
    f.restore(&id, &[]);
    let meta = fs::symlink_metadata(&link).expect("live link");
    assert!(meta.file_type().is_symlink(), "the live link is a symlink");
    assert_eq!(fs::read_link(&link).expect("readlink"), outside.path());
    assert!(!f.agent.memdir().join("inbox.md").exists());
    assert_no_restore_leftovers(&f.agent);
    assert_same_tree(
        &outside_before,
        &tree(outside.path(), true),
        "outside folder after a restore over the live agent",
    );
}
