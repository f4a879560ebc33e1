//! End-to-end tests of the `memsnap` binary: every test runs the real executable against a store
//! in a temporary folder and a sample agent built by `memsnap::sample`, and checks what ends up on
//! disk (files, modes, symlinks, rows, git HEAD, journal, staging folders), not only exit codes.
//!
//! The helpers shared with tests/recovery.rs (`TestCommand`, `Fixture`, `tree`, `AgentImage`...)
//! are in tests/common/mod.rs.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Child;

use common::*;
use memsnap::sample::{SampleAgent, SampleSpec};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Changing the sample agent
// ---------------------------------------------------------------------------------------------

/// A day of agent work plus changes of every kind: rows added, rewritten and deleted, notes
/// edited and committed, a note added, a symlink removed, a mode changed, a database created and
/// one deleted, a state document created.
fn change_agent(agent: &SampleAgent) {
    agent.append_day(11, 0.2).expect("append_day");
    agent.update_day(12, 0.2).expect("update_day");
    let memdir = agent.memdir();
    fs::write(
        memdir.join("inbox.md"),
        "# Inbox\n\n- written after the snapshot\n",
    )
    .expect("note");
    if memdir.join("latest-topic.md").symlink_metadata().is_ok() {
        fs::remove_file(memdir.join("latest-topic.md")).expect("remove symlink");
    }
    if memdir.join("private.md").exists() {
        fs::set_permissions(memdir.join("private.md"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let scratch = rusqlite::Connection::open(agent.sqlite_dir().join("scratch.sqlite"))
        .expect("create scratch db");
    scratch
        .execute_batch(
            "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
             INSERT INTO notes(body) VALUES ('one'), ('two'), ('three');",
        )
        .expect("fill scratch db");
    scratch.close().expect("close scratch db");
    // A database deleted, with a stale (garbage) rollback journal left under its name: a
    // restore that brings the database back must remove it first (store-format.md, "Restore
    // journal"), or SQLite would take it for a hot journal of the restored database.
    let compactions = agent.sqlite_dir().join("compactions.sqlite");
    fs::remove_file(&compactions).expect("remove compactions.sqlite");
    fs::write(
        agent.sqlite_dir().join("compactions.sqlite-journal"),
        vec![0xa5u8; 4096],
    )
    .expect("stale journal");
    fs::write(
        agent.state_dir().join("new_state.json"),
        "{\"created\": \"after the snapshot\"}\n",
    )
    .expect("state file");
}

fn is_absent_or_empty(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut rd) => rd.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip, and undo through the pre-restore snapshot
// ---------------------------------------------------------------------------------------------

/// Snapshot, change everything, restore through `spec(id)` (+ `extra` args), check the agent is
/// the snapshot again; then restore the pre-restore snapshot and check the changes are back.
fn round_trip(spec: impl Fn(&str) -> String, extra: &[&str]) {
    let f = Fixture::decorated();
    let snap = f.snapshot();
    let id = str_of(&snap, "id").to_owned();
    assert_eq!(id.len(), 36, "a UUID: {snap:#}");
    assert_eq!(str_of(&snap, "tenant"), TENANT);
    assert_eq!(str_of(&snap, "agent"), AGENT);
    let before = AgentImage::capture(&f.agent);

    change_agent(&f.agent);
    let changed = AgentImage::capture(&f.agent);
    assert_ne!(changed.rows, before.rows, "the change changed rows");
    assert_ne!(changed.head, before.head, "the change made a commit");

    let report = f.restore(&spec(&id), extra);
    assert_eq!(report["dry_run"], Value::Bool(false), "{report:#}");
    assert_eq!(str_of(&report["plan"], "snapshot_id"), id, "{report:#}");
    before.assert_matches(&f.agent, "after restore");
    assert!(!f.agent.memdir().join("inbox.md").exists());
    assert!(!f.agent.sqlite_dir().join("scratch.sqlite").exists());
    assert!(!f.agent.state_dir().join("new_state.json").exists());
    assert!(
        !f.journal().exists(),
        "the journal is removed after a restore"
    );

    let pre = report["pre_snapshot_id"]
        .as_str()
        .unwrap_or_else(|| panic!("restore reports its pre-restore snapshot: {report:#}"))
        .to_owned();
    assert_ne!(pre, id);
    assert!(
        f.list_ids().contains(&pre),
        "the pre-restore snapshot is listed"
    );
    f.restore(&pre, &[]);
    changed.assert_matches(&f.agent, "after undoing the restore");
}

#[test]
fn restore_by_full_id_brings_back_the_snapshot_and_can_be_undone() {
    round_trip(|id| id.to_owned(), &[]);
}

#[test]
fn restore_by_eight_char_prefix_brings_back_the_snapshot_and_can_be_undone() {
    round_trip(|id| id[..8].to_owned(), &[]);
}

#[test]
fn restore_latest_with_tenant_and_agent_brings_back_the_snapshot_and_can_be_undone() {
    round_trip(
        |_| "latest".to_owned(),
        &["--tenant", TENANT, "--agent", AGENT],
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Restore into --target
// ---------------------------------------------------------------------------------------------

#[test]
fn restore_into_empty_target_reproduces_the_snapshot_and_leaves_the_agent_alone() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    change_agent(&f.agent);
    let live = tree(f.agent.root(), false);
    let target = f.path("restored");
    fs::create_dir(&target).expect("mkdir target");

    let report = f.restore_into(&id, &target);
    assert_eq!(report["pre_snapshot_id"], Value::Null, "{report:#}");
    let restored = SampleAgent::open(&target);
    image.assert_matches(&restored, "restored into --target");
    assert_same_tree(&live, &tree(f.agent.root(), false), "live agent");
    assert_eq!(
        f.list_ids(),
        vec![id],
        "no pre-restore snapshot for --target"
    );
}

#[test]
fn restore_into_missing_target_creates_it() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    let target = f.path("new/deeper/restored");
    f.restore_into(&id, &target);
    image.assert_matches(&SampleAgent::open(&target), "restored into a new folder");
}

#[test]
fn restore_into_target_with_a_memdir_fails_and_writes_nothing() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let target = f.path("busy-target");
    fs::create_dir_all(target.join("memdir")).expect("mkdir");
    fs::write(target.join("memdir/keep.md"), "mine\n").expect("write");
    let before = tree(&target, true);

    let out = f
        .cmd()
        .args(["restore", &id, "--target"])
        .arg(&target)
        .assert_exit_code(1);
    assert!(out.stderr.contains("not empty"), "{out}");
    assert!(
        out.stderr.contains(&target.display().to_string()),
        "the message names the folder\n{out}"
    );
    assert_same_tree(&before, &tree(&target, true), "the non-empty target");
    assert!(!f.journal().exists());
}

#[test]
fn restore_into_non_empty_target_folder_fails_and_writes_nothing() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let target = f.path("home-of-something-else");
    fs::create_dir(&target).expect("mkdir");
    fs::write(target.join("notes.txt"), "not an agent\n").expect("write");
    let before = tree(&target, true);

    let out = f
        .cmd()
        .args(["restore", &id, "--target"])
        .arg(&target)
        .run();
    assert_eq!(
        out.status.code(),
        Some(1),
        "--target must be an empty folder\n{out}"
    );
    assert!(
        out.stderr.contains(&target.display().to_string()),
        "the message names the folder\n{out}"
    );
    assert_same_tree(&before, &tree(&target, true), "the non-empty target");
}

/// A `--target` restore killed while staging leaves the folder as the next command finds it:
/// the rollback removes the staging and the `sqlite/` staging created, so the same command
/// succeeds when run again (it refused "not empty" before).
#[test]
fn restore_into_target_crashed_while_staging_can_be_run_again() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    let target = f.path("restored");
    fs::create_dir(&target).expect("mkdir target");
    let restore = || {
        let mut c = f.cmd();
        c.args(["restore", &id, "--target"]).arg(&target);
        c
    };

    restore()
        .env("MEMSNAP_FAILPOINT", "restore:staged")
        .assert_crashed();
    assert!(f.journal().exists(), "the crash left its journal");
    assert!(target.join("sqlite").is_dir(), "staging created sqlite/");

    f.cmd().args(["list"]).assert_exit_code(0);
    assert!(!f.journal().exists(), "the next command rolled back");
    let left: Vec<_> = fs::read_dir(&target)
        .expect("target")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "the rollback left {left:?} in the target");

    restore().assert_exit_code(0);
    image.assert_matches(&SampleAgent::open(&target), "restored on the second try");
}

// ---------------------------------------------------------------------------------------------
// 3. Dry run
// ---------------------------------------------------------------------------------------------

#[test]
fn restore_dry_run_prints_the_plan_and_changes_nothing() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    change_agent(&f.agent);
    let agent_before = tree(f.agent.root(), true);
    let store_files_before = tree(&f.store.join("packs"), false);

    let human = f.cmd().args(["restore", &id, "--dry-run"]).stdout();
    assert!(human.contains("would restore"), "{human}");
    assert!(human.contains(&id), "{human}");
    assert!(human.contains("nothing was changed (--dry-run)"), "{human}");
    assert!(human.contains("changed  MEMORY.md"), "{human}");
    assert!(human.contains("scratch.sqlite: remove"), "{human}");
    assert!(human.contains("2 written, 1 removed"), "{human}");

    let plan = f.restore(&id, &["--dry-run"]);
    assert_eq!(plan["dry_run"], Value::Bool(true), "{plan:#}");
    assert_eq!(plan["pre_snapshot_id"], Value::Null, "{plan:#}");
    let p = &plan["plan"];
    let strings = |key: &str| -> Vec<String> {
        p[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is an array: {p:#}"))
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect()
    };
    assert!(
        strings("memdir_removed").contains(&"inbox.md".to_owned()),
        "{p:#}"
    );
    assert!(
        strings("memdir_changed").contains(&"MEMORY.md".to_owned()),
        "{p:#}"
    );
    assert!(
        strings("state_removed").contains(&"new_state.json".to_owned()),
        "{p:#}"
    );
    let dbs = p["databases"].as_array().expect("databases");
    assert!(
        dbs.contains(&serde_json::json!(["scratch.sqlite", "remove"])),
        "{p:#}"
    );
    assert!(
        dbs.contains(&serde_json::json!(["vector.sqlite", "replace"])),
        "{p:#}"
    );
    assert!(
        dbs.contains(&serde_json::json!(["compactions.sqlite", "create"])),
        "{p:#}"
    );

    assert_same_tree(
        &agent_before,
        &tree(f.agent.root(), true),
        "agent after --dry-run",
    );
    assert_same_tree(
        &store_files_before,
        &tree(&f.store.join("packs"), false),
        "packs after --dry-run",
    );
    assert_eq!(
        f.list_ids(),
        vec![id],
        "a dry run takes no pre-restore snapshot"
    );
    assert!(!f.journal().exists());
    assert_no_restore_leftovers(&f.agent);
}

// ---------------------------------------------------------------------------------------------
// 4. Restoring back and forth
// ---------------------------------------------------------------------------------------------

#[test]
fn restores_back_and_forth_over_the_same_agent() {
    let f = Fixture::decorated();
    let a = f.snapshot_id();
    let image_a = AgentImage::capture(&f.agent);
    change_agent(&f.agent);
    let b = f.snapshot_id();
    let image_b = AgentImage::capture(&f.agent);

    f.restore(&a, &[]);
    image_a.assert_matches(&f.agent, "A");
    f.restore(&b, &[]);
    image_b.assert_matches(&f.agent, "B");
    let report = f.restore(&a, &["--no-pre-snapshot"]);
    assert_eq!(report["pre_snapshot_id"], Value::Null, "{report:#}");
    image_a.assert_matches(&f.agent, "A again");
    // Two restores with a pre-restore snapshot, one without.
    assert_eq!(f.list_ids().len(), 4);
}

// ---------------------------------------------------------------------------------------------
// 5. Names
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_tenant_and_agent_names_exit_2_naming_the_rule_and_create_nothing() {
    let f = Fixture::new();
    let long = "a".repeat(65);
    let cases: [(&str, &str); 6] = [
        ("Ana", "only lowercase letters"),
        ("a/b", "only lowercase letters"),
        ("-x", "must not start or end"),
        ("x_", "must not start or end"),
        (&long, "longer than 64 bytes"),
        ("", "it is empty"),
    ];
    for (bad, rule) in cases {
        for (what, tenant, agent) in [("tenant", bad, AGENT), ("agent", TENANT, bad)] {
            let out = f
                .cmd()
                .arg("snapshot")
                .arg(format!("--tenant={tenant}"))
                .arg(format!("--agent={agent}"))
                .arg("--source")
                .arg(f.agent.root())
                .assert_exit_code(2);
            assert!(
                out.stderr.contains(&format!("invalid {what} name")) && out.stderr.contains(rule),
                "{what} {bad:?}: the message names the rule {rule:?}\n{out}"
            );
            assert!(
                !f.store.exists(),
                "{what} {bad:?}: a rejected name created {}",
                f.store.display()
            );
        }
    }
    // The longest valid name is accepted.
    let ok = "a".repeat(64);
    f.cmd()
        .args(["snapshot", "--tenant", &ok, "--agent", &ok, "--source"])
        .arg(f.agent.root())
        .json();
}

#[test]
fn invalid_names_are_rejected_by_restore_and_show_too() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    for cmd in ["restore", "show", "verify", "delete"] {
        let out = f
            .cmd()
            .args([cmd, &id, "--tenant", "Acme", "--agent", AGENT])
            .assert_exit_code(2);
        assert!(out.stderr.contains("invalid tenant name"), "{cmd}\n{out}");
    }
    assert_eq!(f.list_ids(), vec![id], "nothing was deleted");
}

// ---------------------------------------------------------------------------------------------
// 6. Missing store
// ---------------------------------------------------------------------------------------------

#[test]
fn read_only_commands_on_a_missing_store_fail_and_do_not_create_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = tmp.path().join("no-store-here");
    let target = tmp.path().join("target");
    let runs: Vec<Vec<&OsStr>> = vec![
        vec!["list".as_ref()],
        vec!["show".as_ref(), "0123456789abcdef".as_ref()],
        vec!["verify".as_ref()],
        vec!["verify".as_ref(), "--read-data".as_ref()],
        vec!["restore".as_ref(), "0123456789abcdef".as_ref()],
        vec![
            "restore".as_ref(),
            "latest".as_ref(),
            "--tenant".as_ref(),
            TENANT.as_ref(),
            "--agent".as_ref(),
            AGENT.as_ref(),
            "--target".as_ref(),
            target.as_os_str(),
        ],
        vec!["delete".as_ref(), "0123456789abcdef".as_ref()],
    ];
    for args in runs {
        let out = TestCommand::new(&store).args(&args).assert_exit_code(1);
        assert!(out.stderr.contains("no memsnap store"), "{out}");
        assert!(!store.exists(), "{args:?} created the store\n{out}");
        assert!(!target.exists(), "{args:?} created the target\n{out}");
    }
    let out = TestCommand::new(&store)
        .args(["list", "--json"])
        .assert_exit_code(1);
    let err = out.json();
    assert!(
        str_of(&err, "error").contains("no memsnap store"),
        "--json errors are JSON\n{out}"
    );
    assert!(!store.exists());
}

// ---------------------------------------------------------------------------------------------
// 7. Absent memory
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_of_an_agent_without_memory_fails() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let source = tmp.path().join("empty-agent");
    fs::create_dir(&source).expect("mkdir");
    let store = tmp.path().join("store");
    let out = TestCommand::new(&store)
        .snapshot(&source)
        .assert_exit_code(1);
    assert!(out.stderr.contains("no memory found"), "{out}");
    assert!(
        out.stderr.contains(&source.display().to_string()),
        "names where it looked\n{out}"
    );
    if store.exists() {
        let list = TestCommand::new(&store).arg("list").json();
        assert_eq!(list, serde_json::json!([]), "no snapshot was recorded");
    }
}

#[test]
fn snapshot_of_an_agent_with_only_state_records_the_absent_parts() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let source = tmp.path().join("state-only");
    fs::create_dir_all(source.join("state")).expect("mkdir");
    fs::write(source.join("state/cursor.json"), "{\"last\": 42}\n").expect("write");
    let store = tmp.path().join("store");
    let snap = TestCommand::new(&store).snapshot(&source).json();
    assert_eq!(
        snap["absent"],
        serde_json::json!(["memdir", "sqlite"]),
        "{snap:#}"
    );
    assert_eq!(snap["artifacts"], serde_json::json!(1), "{snap:#}");
    let id = str_of(&snap, "id");

    // Restoring it into a folder gives back the state and nothing else.
    let target = tmp.path().join("out");
    TestCommand::new(&store)
        .args(["restore", id, "--target"])
        .arg(&target)
        .json();
    assert_eq!(
        fs::read_to_string(target.join("state/cursor.json")).expect("restored state"),
        "{\"last\": 42}\n"
    );
    assert!(!target.join("memdir").exists());
    assert!(is_absent_or_empty(&target.join("sqlite")));
}

// ---------------------------------------------------------------------------------------------
// 8. Remembered sources
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_without_source_reuses_the_remembered_absolute_paths() {
    let f = Fixture::new();
    // A relative --source, resolved against the working directory of the first run...
    let first = f
        .cmd()
        .current_dir(f.tmp.path())
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .args(["--source", "agent"])
        .json();
    let memdir = f.agent.memdir().display().to_string();
    assert_eq!(str_of(&first, "memdir"), memdir, "{first:#}");

    // ...is remembered as an absolute path, whatever the working directory of the next run.
    f.agent.append_day(3, 0.1).expect("append_day");
    let second = f
        .cmd()
        .current_dir(Path::new("/"))
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .json();
    for key in ["memdir", "sqlite_dir", "state_dir"] {
        assert_eq!(second[key], first[key], "{key}: {second:#}");
    }
    assert_eq!(second["parent"], first["id"], "{second:#}");
    assert_eq!(second["absent"], serde_json::json!([]), "{second:#}");
    assert_ne!(
        second["git"]["head_oid"], first["git"]["head_oid"],
        "the second snapshot read the changed agent"
    );
    assert_eq!(
        second["git"]["head_oid"].as_str(),
        f.agent.git_head().expect("head").as_deref()
    );
}

#[test]
fn snapshot_without_source_of_an_unknown_agent_exits_2() {
    let f = Fixture::new();
    f.snapshot();
    let out = f
        .cmd()
        .args(["snapshot", "--tenant", TENANT, "--agent", "bob"])
        .assert_exit_code(2);
    assert!(out.stderr.contains("no source is known"), "{out}");
    assert!(out.stderr.contains("--source"), "{out}");
}

#[test]
fn source_templates_expand_tenant_and_agent() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let agent = SampleAgent::create(&tmp.path().join("agents/acme/ana"), &SampleSpec::tiny())
        .expect("sample agent");
    let store = tmp.path().join("store");
    let template = tmp.path().join("agents/{tenant}/{agent}");
    let snap = TestCommand::new(&store).snapshot(&template).json();
    assert_eq!(
        str_of(&snap, "memdir"),
        agent.memdir().display().to_string()
    );
    assert_eq!(snap["absent"], serde_json::json!([]), "{snap:#}");
}

// ---------------------------------------------------------------------------------------------
// 9. A damaged pack
// ---------------------------------------------------------------------------------------------

#[test]
fn damaged_pack_byte_is_found_by_verify_read_data_and_blocks_restore() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let show = f.cmd().args(["show", &id]).json();
    let artifacts: Vec<String> = show["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| format!("{}/{}", str_of(e, "part"), str_of(e, "path")))
        .collect();
    let clean = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(clean["ok"], Value::Bool(true), "{clean:#}");

    let pack = corrupt_largest_pack(&f.store);

    // Without --read-data only the chunks' places are checked.
    let out = f.cmd().args(["verify", "--json"]).run();
    match out.status.code() {
        Some(0) => assert_eq!(out.json()["ok"], Value::Bool(true), "{out}"),
        Some(3) => assert!(
            out.json()["damaged_snapshots"] == serde_json::json!([id]),
            "{out}"
        ),
        _ => panic!("verify without --read-data\n{out}"),
    }

    let out = f
        .cmd()
        .args(["verify", "--read-data", "--json"])
        .assert_exit_code(3);
    let report = out.json();
    assert_eq!(report["ok"], Value::Bool(false), "{out}");
    assert_eq!(
        report["damaged_snapshots"],
        serde_json::json!([id]),
        "{out}"
    );
    let damaged = report["damaged"].as_array().expect("damaged");
    assert!(!damaged.is_empty(), "{out}");
    for d in damaged {
        assert_eq!(str_of(d, "snapshot"), id, "{out}");
        let artifact = str_of(d, "artifact");
        assert!(
            artifact == "manifest" || artifacts.iter().any(|a| a == artifact),
            "damage names an artifact of the snapshot: {artifact}\n{out}"
        );
        assert!(!str_of(d, "problem").is_empty(), "{out}");
    }
    let human = f.cmd().args(["verify", "--read-data"]).assert_exit_code(3);
    assert!(human.stdout.contains("DAMAGED snapshot"), "{human}");

    change_agent(&f.agent);
    let live = tree(f.agent.root(), false);
    let out = f.cmd().args(["restore", &id]).assert_exit_code(1);
    assert!(out.stderr.contains("is damaged"), "{out}");
    // Restore checks a content's hash, not each chunk's; a mismatch is traced to its chunk.
    let name = pack.file_stem().expect("name").to_string_lossy();
    assert!(
        out.stderr.contains(&*name),
        "the damaged pack is named\n{out}"
    );
    assert_same_tree(
        &live,
        &tree(f.agent.root(), false),
        "agent after a failed restore",
    );
    assert!(
        !f.journal().exists(),
        "a failed restore removes its journal"
    );
    assert_no_restore_leftovers(&f.agent);
}

// ---------------------------------------------------------------------------------------------
// 10. Interrupted restores
//
// The failpoint tests crash a real restore. The "left by a crash" tests build the state a crash
// leaves (journal + staging folders, as store-format.md "Restore journal" defines them) by hand,
// so that recovery is covered at every step of the switch, independently of the failpoints.
// ---------------------------------------------------------------------------------------------

#[test]
fn restore_crashed_after_memdir_switch_is_finished_by_the_next_command() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    change_agent(&f.agent);

    let out = f.crash_restore(&id, "restore:memdir-switched");
    assert!(out.stderr.contains("restore:memdir-switched"), "{out}");
    let journal = fs::read_to_string(f.journal())
        .unwrap_or_else(|e| panic!("the crash left the journal ({e})\n{out}"));
    assert!(journal.contains("Switching"), "{journal}");

    f.cmd().arg("list").json();
    assert!(
        !f.journal().exists(),
        "the next command finished the restore"
    );
    image.assert_matches(
        &f.agent,
        "after a crash at restore:memdir-switched and `list`",
    );
}

/// Runs `list` over a restore left in its staging phase and checks that it rolled the restore
/// back: no journal, no staging folders, and the agent as it was (`live`, a [`tree`] of its root
/// with mtimes).
fn assert_list_rolls_back(f: &Fixture, live: Tree) {
    f.cmd().arg("list").json();
    assert!(!f.journal().exists(), "the next command rolled back");
    assert_no_restore_leftovers(&f.agent);
    assert_agent_tree_unchanged(live, &f.agent, "agent after a rolled-back restore");
}

#[test]
fn restore_crashed_while_staged_is_rolled_back_by_the_next_command() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    change_agent(&f.agent);
    let live = tree(f.agent.root(), true);

    let out = f.crash_restore(&id, "restore:staged");
    let journal = fs::read_to_string(f.journal())
        .unwrap_or_else(|e| panic!("the crash left the journal ({e})\n{out}"));
    assert!(journal.contains("Staging"), "{journal}");
    assert!(
        !restore_leftovers(&f.agent).is_empty(),
        "the crash left staging folders to roll back"
    );

    assert_list_rolls_back(&f, live);
}

/// How far a crashed restore got, for [`leave_crashed_restore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CrashedAt {
    /// Staged, journal still "Staging".
    Staged,
    /// Journal "Switching", nothing switched yet.
    JournalSwitching,
    /// The live memdir renamed to `-old`, the staged one not yet in place.
    MemdirMovedAside,
    /// The staged memdir in place, databases not yet switched.
    MemdirSwitched,
    /// The memdir and vector.sqlite switched, the other databases not yet.
    DatabaseSwitched,
}

/// Leaves the agent of `f` as a restore of `id` that crashed at `at` would: the snapshot
/// materialised into the staging folders (through `restore --target`), the journal written, and
/// the switch steps up to `at` done.
fn leave_crashed_restore(f: &Fixture, id: &str, at: CrashedAt) {
    let scratch = f.path("materialised");
    f.restore_into(id, &scratch);
    let staged_memdir = f.staged_memdir("new");
    let old_memdir = f.staged_memdir("old");
    let staged_sqlite = f.staged_sqlite();
    fs::rename(scratch.join("memdir"), &staged_memdir).expect("stage memdir");
    fs::rename(scratch.join("sqlite"), &staged_sqlite).expect("stage databases");
    let mut dbs: Vec<String> = fs::read_dir(&staged_sqlite)
        .expect("staged databases")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dbs.sort();
    assert!(dbs.contains(&"vector.sqlite".to_owned()), "{dbs:?}");

    let phase = if at == CrashedAt::Staged {
        "Staging"
    } else {
        "Switching"
    };
    f.write_journal(&f.hand_made_journal(phase, id, &dbs));

    if at >= CrashedAt::MemdirMovedAside {
        fs::rename(f.agent.memdir(), &old_memdir).expect("move memdir aside");
    }
    if at >= CrashedAt::MemdirSwitched {
        fs::rename(&staged_memdir, f.agent.memdir()).expect("switch memdir");
    }
    if at >= CrashedAt::DatabaseSwitched {
        let live = f.agent.sqlite_dir().join("vector.sqlite");
        fs::rename(staged_sqlite.join("vector.sqlite"), live).expect("switch vector.sqlite");
    }
}

/// A restore of the first snapshot crashed at `at`; `list` must finish it.
fn restore_left_by_a_crash_is_finished_by_list(at: CrashedAt) {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    change_agent(&f.agent);
    leave_crashed_restore(&f, &id, at);
    assert!(!restore_leftovers(&f.agent).is_empty());

    f.cmd().arg("list").json();
    assert!(
        !f.journal().exists(),
        "{at:?}: the next command finished the restore"
    );
    image.assert_matches(&f.agent, &format!("restore crashed at {at:?}, then `list`"));
    assert!(!f.agent.memdir().join("inbox.md").exists());
    assert!(!f.agent.sqlite_dir().join("scratch.sqlite").exists());
    assert!(!f.agent.state_dir().join("new_state.json").exists());
}

#[test]
fn restore_left_by_a_crash_after_journal_switching_is_finished_by_the_next_command() {
    restore_left_by_a_crash_is_finished_by_list(CrashedAt::JournalSwitching);
}

#[test]
fn restore_left_by_a_crash_with_memdir_moved_aside_is_finished_by_the_next_command() {
    restore_left_by_a_crash_is_finished_by_list(CrashedAt::MemdirMovedAside);
}

#[test]
fn restore_left_by_a_crash_after_memdir_switch_is_finished_by_the_next_command() {
    restore_left_by_a_crash_is_finished_by_list(CrashedAt::MemdirSwitched);
}

#[test]
fn restore_left_by_a_crash_after_a_database_switch_is_finished_by_the_next_command() {
    restore_left_by_a_crash_is_finished_by_list(CrashedAt::DatabaseSwitched);
}

#[test]
fn restore_left_by_a_crash_while_staged_is_rolled_back_by_the_next_command() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    change_agent(&f.agent);
    let live = tree(f.agent.root(), true);
    leave_crashed_restore(&f, &id, CrashedAt::Staged);
    assert!(!restore_leftovers(&f.agent).is_empty());

    assert_list_rolls_back(&f, live);
}

#[test]
fn restore_left_by_a_crash_while_staged_is_rolled_back_before_a_snapshot() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    change_agent(&f.agent);
    let changed = AgentImage::capture(&f.agent);
    leave_crashed_restore(&f, &id, CrashedAt::Staged);

    let snap = f.snapshot();
    assert!(!f.journal().exists());
    assert_no_restore_leftovers(&f.agent);
    // The snapshot taken after the rollback holds the changed agent.
    let target = f.path("check");
    f.restore_into(str_of(&snap, "id"), &target);
    changed.assert_matches(&SampleAgent::open(&target), "snapshot after rollback");
}

// ---------------------------------------------------------------------------------------------
// 11. Interrupted snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_crashed_before_commit_leaves_no_visible_snapshot() {
    let f = Fixture::new();
    let first = f.snapshot_id();
    change_agent(&f.agent);
    for failpoint in ["snapshot:before-pack-sync", "snapshot:before-commit"] {
        let out = f
            .cmd()
            .env("MEMSNAP_FAILPOINT", failpoint)
            .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
            .assert_crashed();
        assert!(out.stderr.contains(failpoint), "{out}");
        assert_eq!(
            f.list_ids(),
            vec![first.clone()],
            "after a crash at {failpoint}"
        );
        let verify = f.cmd().args(["verify", "--read-data"]).json();
        assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
        assert_eq!(verify["snapshots_checked"], serde_json::json!(1));
    }
    // The store takes the next snapshot as if nothing happened, and it restores.
    let image = AgentImage::capture(&f.agent);
    let second = f.snapshot_id();
    assert_eq!(f.list_ids(), vec![first.clone(), second.clone()]);
    let verify = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
    f.restore(&first, &["--no-pre-snapshot"]);
    f.restore(&second, &["--no-pre-snapshot"]);
    image.assert_matches(&f.agent, "second snapshot after crashed ones");
}

#[test]
fn failpoint_with_error_suffix_fails_the_snapshot_cleanly() {
    // `name:error` makes the operation fail instead of aborting (src/failpoint.rs).
    let f = Fixture::new();
    let first = f.snapshot_id();
    let out = f
        .cmd()
        .env("MEMSNAP_FAILPOINT", "snapshot:before-commit:error")
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .run();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("injected failure"), "{out}");
    assert_eq!(f.list_ids(), vec![first]);
}

#[test]
fn pack_left_by_an_interrupted_snapshot_is_ignored() {
    // What a crash before the commit leaves (store-format.md, I5): pack bytes no index entry
    // references, here a pack without a footer next to the real ones.
    let f = Fixture::new();
    let first = f.snapshot_id();
    let dir = f.store.join("packs/ff");
    fs::create_dir_all(&dir).expect("mkdir");
    let mut bytes = b"MEMSNAPP\x01\x00\x00\x00\x00\x00\x00\x00".to_vec();
    bytes.extend((0..4096u32).map(|i| (i * 7 % 251) as u8));
    fs::write(dir.join("ff00000000000000000000000000dead.pack"), bytes).expect("write");

    assert_eq!(f.list_ids(), vec![first.clone()]);
    let verify = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
    change_agent(&f.agent);
    let image = AgentImage::capture(&f.agent);
    let second = f.snapshot_id();
    f.restore(&first, &["--no-pre-snapshot"]);
    f.restore(&second, &["--no-pre-snapshot"]);
    image.assert_matches(&f.agent, "after a snapshot next to a torn pack");
}

// ---------------------------------------------------------------------------------------------
// 12. Locks
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_of_a_locked_agent_fails_busy_then_succeeds_once_released() {
    let f = Fixture::new();
    let lock_path = f.agent_lock();
    fs::create_dir_all(lock_path.parent().expect("parent")).expect("mkdir locks");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .expect("open lock file");
    lock.lock().expect("take the agent lock");

    let started = std::time::Instant::now();
    let out = f
        .cmd()
        .args(["--lock-timeout", "0.3"])
        .snapshot(f.agent.root())
        .assert_exit_code(1);
    assert!(out.stderr.contains("busy"), "{out}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "waited for the lock timeout"
    );
    if f.store.exists() {
        assert_eq!(f.list_ids(), Vec::<String>::new());
    }

    // restore of that agent is refused the same way.
    lock.unlock().expect("release");
    let id = f.snapshot_id();
    lock.lock().expect("take the agent lock again");
    let out = f
        .cmd()
        .args(["--lock-timeout", "0.3", "restore", &id])
        .assert_exit_code(1);
    assert!(out.stderr.contains("busy"), "{out}");
    drop(lock);

    f.snapshot_id();
    assert_eq!(f.list_ids().len(), 2);
}

#[test]
fn concurrent_snapshots_of_one_agent_both_succeed() {
    let f = Fixture::new();
    let children: Vec<Child> = (0..2)
        .map(|_| {
            f.cmd()
                .args(["snapshot", "--tenant", TENANT, "--agent", AGENT, "--json"])
                .arg("--source")
                .arg(f.agent.root())
                .spawn()
        })
        .collect();
    let mut ids = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
        let v: Value = serde_json::from_str(&stdout).expect("JSON");
        ids.push(str_of(&v, "id").to_owned());
    }
    let mut listed = f.list_ids();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    let verify = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
}

// ---------------------------------------------------------------------------------------------
// 13. JSON shapes and tenant isolation
// ---------------------------------------------------------------------------------------------

#[test]
fn list_and_show_json_have_the_documented_fields() {
    let f = Fixture::new();
    let first = f
        .cmd()
        .args(["snapshot", "--tenant", TENANT, "--agent", AGENT])
        .args(["--label", "before the migration", "--source"])
        .arg(f.agent.root())
        .json();
    let other = tempfile::tempdir().expect("temp dir");
    SampleAgent::create(other.path(), &SampleSpec::tiny()).expect("second agent");
    f.cmd()
        .args([
            "snapshot", "--tenant", "globex", "--agent", "bob", "--source",
        ])
        .arg(other.path())
        .json();

    let list = f.list();
    assert_eq!(list.len(), 2);
    for item in &list {
        assert!(item["id"].is_string(), "{item:#}");
        assert!(item["tenant"].is_string(), "{item:#}");
        assert!(item["agent"].is_string(), "{item:#}");
        assert!(item["created_at_ms"].is_i64(), "{item:#}");
    }
    assert_eq!(list[0]["id"], first["id"], "oldest first");
    assert_eq!(list[0]["label"], "before the migration");
    let filtered = f.cmd().args(["list", "--tenant", "globex"]).json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(1), "{filtered:#}");
    assert_eq!(filtered[0]["agent"], "bob");
    let filtered = f.cmd().args(["list", "--agent", AGENT]).json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(1), "{filtered:#}");

    let id = str_of(&first, "id");
    let show = f.cmd().args(["show", id]).json();
    assert_eq!(show["id"], first["id"]);
    assert_eq!(show["tenant"], TENANT);
    let entries = show["entries"].as_array().expect("entries");
    assert_eq!(Some(entries.len() as u64), first["artifacts"].as_u64());
    for e in entries {
        let part = str_of(e, "part");
        assert!(["memdir", "sqlite", "state"].contains(&part), "{e:#}");
        assert!(e["path"].is_string(), "{e:#}");
        assert!(e["size"].is_u64(), "{e:#}");
    }
    let find = |part: &str, path: &str| {
        entries
            .iter()
            .find(|e| e["part"] == part && e["path"] == path)
            .unwrap_or_else(|| panic!("show lists {part}/{path}"))
    };
    let memory_md = fs::metadata(f.agent.memdir().join("MEMORY.md")).expect("MEMORY.md");
    assert_eq!(find("memdir", "MEMORY.md")["size"], memory_md.len());
    find("memdir", ".git/HEAD");
    find("sqlite", "vector.sqlite");
    find("state", "dream_run.json");
    let human = f.cmd().args(["show", &id[..8]]).stdout();
    assert!(human.contains(id), "{human}");
    assert!(human.contains("before the migration"), "{human}");
}

#[test]
fn restoring_another_tenants_snapshot_is_refused() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    change_agent(&f.agent);
    let live = tree(f.agent.root(), true);

    for (tenant, agent) in [("globex", AGENT), (TENANT, "bob")] {
        let out = f
            .cmd()
            .args(["restore", &id, "--tenant", tenant, "--agent", agent])
            .assert_exit_code(1);
        assert!(out.stderr.contains("refused"), "{out}");
        assert!(out.stderr.contains(&format!("{tenant}/{agent}")), "{out}");
        let out = f
            .cmd()
            .args([
                "restore",
                &id,
                "--dry-run",
                "--tenant",
                tenant,
                "--agent",
                agent,
            ])
            .assert_exit_code(1);
        assert!(out.stderr.contains("refused"), "{out}");
    }
    assert_same_tree(
        &live,
        &tree(f.agent.root(), true),
        "agent after refused restores",
    );
    assert_eq!(f.list_ids(), vec![id], "no pre-restore snapshot was taken");
    assert!(!f.store.join("locks/agents/globex").exists());
}

#[test]
fn deleting_another_tenants_snapshot_is_refused() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let out = f
        .cmd()
        .args(["delete", &id, "--tenant", "globex", "--agent", AGENT])
        .run();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("refused"), "{out}");
    assert_eq!(
        f.list_ids(),
        vec![id],
        "the other tenant's snapshot survives"
    );
}

// ---------------------------------------------------------------------------------------------
// 14. delete and snapshot specs
// ---------------------------------------------------------------------------------------------

#[test]
fn delete_removes_the_snapshot_from_list_and_show() {
    let f = Fixture::new();
    let a = f.snapshot_id();
    let b = f.snapshot_id();
    let deleted = f.cmd().args(["delete", &a[..8]]).json();
    assert_eq!(
        deleted["deleted"]["id"],
        Value::String(a.clone()),
        "{deleted:#}"
    );
    assert_eq!(f.list_ids(), vec![b.clone()]);
    let out = f.cmd().args(["show", &a]).assert_exit_code(1);
    assert!(out.stderr.contains("no snapshot matches"), "{out}");
    let out = f.cmd().args(["restore", &a]).assert_exit_code(1);
    assert!(out.stderr.contains("no snapshot matches"), "{out}");
    let out = f.cmd().args(["delete", &a]).assert_exit_code(1);
    assert!(out.stderr.contains("no snapshot matches"), "{out}");

    // The remaining snapshot is intact and `latest` now means it.
    let verify = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
    let latest = f
        .cmd()
        .args(["show", "latest", "--tenant", TENANT, "--agent", AGENT])
        .json();
    assert_eq!(latest["id"], Value::String(b.clone()));
    f.cmd()
        .args(["delete", "latest", "--tenant", TENANT, "--agent", AGENT])
        .json();
    assert_eq!(f.list_ids(), Vec::<String>::new());
}

#[test]
fn short_unknown_and_incomplete_snapshot_specs_give_clear_errors() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    for cmd in ["show", "restore", "delete", "verify"] {
        let out = f.cmd().args([cmd, &id[..7]]).assert_exit_code(2);
        assert!(out.stderr.contains("too short"), "{cmd}\n{out}");
        assert!(out.stderr.contains("at least 8 characters"), "{cmd}\n{out}");

        let out = f.cmd().args([cmd, "zzzzzzzz"]).assert_exit_code(1);
        assert!(out.stderr.contains("no snapshot matches"), "{cmd}\n{out}");

        let out = f.cmd().args([cmd, "latest"]).assert_exit_code(2);
        assert!(
            out.stderr.contains("`latest` needs --tenant and --agent"),
            "{cmd}\n{out}"
        );

        let out = f
            .cmd()
            .args([cmd, "latest", "--tenant", TENANT, "--agent", "nobody"])
            .assert_exit_code(1);
        assert!(out.stderr.contains("has no snapshot"), "{cmd}\n{out}");
    }
    // Prefixes are case-insensitive.
    let upper = f.cmd().args(["show", &id[..8].to_uppercase()]).json();
    assert_eq!(upper["id"], Value::String(id.clone()));
    assert_eq!(f.list_ids(), vec![id], "no failed command deleted anything");
}

// ---------------------------------------------------------------------------------------------
// Live databases and permissions
// ---------------------------------------------------------------------------------------------

fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).expect("count query")
}

#[test]
fn snapshot_holds_committed_wal_rows_and_no_uncommitted_ones() {
    let f = Fixture::new();
    let rows = f.agent.row_counts().expect("rows");
    let long_term = f.agent.sqlite_dir().join("long_term.sqlite");
    let vector = f.agent.sqlite_dir().join("vector.sqlite");
    assert!(
        is_wal(&long_term) && !is_wal(&vector),
        "sample journal modes"
    );

    // Committed rows that stay in the WAL (no checkpoint while this connection is open).
    let writer = rusqlite::Connection::open(&long_term).expect("open long_term");
    writer
        .pragma_update(None, "wal_autocheckpoint", 0)
        .expect("no autocheckpoint");
    writer
        .execute_batch(
            "INSERT INTO memories(kind, content, created_at, importance)
             VALUES ('fact', 'committed, in the wal', 0, 0.5),
                    ('fact', 'committed, in the wal', 1, 0.5),
                    ('fact', 'committed, in the wal', 2, 0.5);",
        )
        .expect("insert");
    let wal = f.agent.sqlite_dir().join("long_term.sqlite-wal");
    assert!(
        fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0,
        "rows in the WAL"
    );
    // Uncommitted writes in both databases, open while the snapshot runs.
    let pending_lt = rusqlite::Connection::open(&long_term).expect("open long_term");
    pending_lt
        .execute_batch(
            "BEGIN IMMEDIATE;
             INSERT INTO memories(kind, content, created_at, importance)
             VALUES ('fact', 'uncommitted', 3, 0.5);",
        )
        .expect("pending insert");
    let pending_vec = rusqlite::Connection::open(&vector).expect("open vector");
    pending_vec
        .execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM embeddings WHERE id % 2 = 0;",
        )
        .expect("pending delete");

    let id = f.snapshot_id();
    pending_lt.execute_batch("ROLLBACK").expect("rollback");
    pending_vec.execute_batch("ROLLBACK").expect("rollback");
    drop((writer, pending_lt, pending_vec));

    let target = f.path("restored");
    f.restore_into(&id, &target);
    let restored = SampleAgent::open(&target);
    assert_databases_intact(&restored);
    let mut expected = rows;
    *expected.get_mut("long_term.memories").expect("memories") += 3;
    *expected.get_mut("long_term.memories_fts").expect("fts") += 3;
    assert_eq!(restored.row_counts().expect("rows"), expected);
    let c = rusqlite::Connection::open(target.join("sqlite/long_term.sqlite")).expect("open");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM memories WHERE content = 'uncommitted'"
        ),
        0
    );
}

#[test]
fn restore_is_seen_through_database_connections_left_open() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let rows = f.agent.row_counts().expect("rows");
    change_agent(&f.agent);
    // The agent keeps its databases open (idle) across the restore.
    let open = |name: &str| {
        rusqlite::Connection::open(f.agent.sqlite_dir().join(name)).expect("open database")
    };
    let (lt, vec) = (open("long_term.sqlite"), open("vector.sqlite"));
    assert_ne!(
        count(&vec, "SELECT count(*) FROM embeddings"),
        rows["vector.embeddings"]
    );

    f.restore(&id, &[]);
    assert_eq!(
        count(&vec, "SELECT count(*) FROM embeddings"),
        rows["vector.embeddings"],
        "an open rollback-mode connection sees the restored database"
    );
    assert_eq!(
        count(&lt, "SELECT count(*) FROM memories"),
        rows["long_term.memories"],
        "an open WAL connection sees the restored database"
    );
    let check: String = lt
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    drop((lt, vec));
    assert_no_side_files(&f.agent);
    assert_databases_intact(&f.agent);
    assert_eq!(f.agent.row_counts().expect("rows"), rows);
}

#[test]
fn restore_keeps_a_private_memdir_private() {
    let f = Fixture::new();
    fs::set_permissions(f.agent.memdir(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let id = f.snapshot_id();
    change_agent(&f.agent);
    f.restore(&id, &[]);
    let mode = fs::metadata(f.agent.memdir()).expect("memdir").mode() & 0o7777;
    assert_eq!(mode, 0o700, "memdir mode after restore: {mode:o}");
}

#[test]
fn restore_keeps_private_state_files_private() {
    let f = Fixture::new();
    let cursor = f.agent.state_dir().join("extract_cursor.json");
    fs::set_permissions(&cursor, fs::Permissions::from_mode(0o600)).expect("chmod");
    let id = f.snapshot_id();
    change_agent(&f.agent);
    f.restore(&id, &[]);
    let mode = fs::metadata(&cursor).expect("state file").mode() & 0o7777;
    assert_eq!(mode, 0o600, "state file mode after restore: {mode:o}");
}

#[test]
fn missing_pack_is_found_by_plain_verify() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let pack = corrupt_largest_pack(&f.store);
    fs::remove_file(&pack).expect("remove pack");
    let out = f.cmd().args(["verify", "--json"]).assert_exit_code(3);
    let report = out.json();
    assert_eq!(
        report["damaged_snapshots"],
        serde_json::json!([id]),
        "{out}"
    );
    let out = f.cmd().args(["verify", &id]).assert_exit_code(3);
    assert!(out.stdout.contains("DAMAGED"), "{out}");
}

#[test]
fn init_creates_an_empty_store() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = tmp.path().join("fresh");
    let out = TestCommand::new(&store).arg("init").json();
    assert_eq!(out["store"], Value::String(store.display().to_string()));
    assert!(store.join("index.redb").is_file());
    assert_eq!(
        TestCommand::new(&store).arg("list").json(),
        serde_json::json!([])
    );
    let verify = TestCommand::new(&store).arg("verify").json();
    assert_eq!(verify["ok"], Value::Bool(true), "{verify:#}");
    TestCommand::new(&store).arg("init").json();
}

#[test]
fn a_folder_holding_other_files_is_never_turned_into_a_store() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).expect("mkdir");
    fs::write(home.join("notes.txt"), b"mine").expect("write");
    for args in [
        vec!["init"],
        vec!["snapshot", "--tenant", "acme", "--agent", "ana", "--source"],
    ] {
        let mut cmd = TestCommand::new(&home);
        cmd.args(&args);
        if args[0] == "snapshot" {
            cmd.arg(tmp.path());
        }
        let out = cmd.assert_exit_code(1);
        assert!(out.stderr.contains("is not a memsnap store"), "{out}");
    }
    let names: Vec<_> = fs::read_dir(&home)
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("notes.txt")],
        "nothing was added"
    );
}

// ---------------------------------------------------------------------------------------------
// 15. demo
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_runs_and_reports_an_equal_restore() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("demo");
    let out = TestCommand::new(&tmp.path().join("store"))
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .assert_exit_code(0);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("rows and git HEAD equal"))
        .unwrap_or_else(|| panic!("the demo prints the equality line\n{out}"));
    assert!(line.trim_end().ends_with("yes"), "{line}\n{out}");
    assert!(out.stdout.contains("no damage"), "{out}");
    assert!(dir.join("agent/memdir/.git").is_dir());
}
