//! Lifecycle end to end: pins, forget (the policy's golden results are unit tests in
//! src/ops/retention.rs), prune reclaiming space with every kept snapshot still restoring
//! identically, a prune killed at each of its steps and finished by the next, prune racing
//! snapshots, and stores written by memsnap 0.1 (format 1) and 0.2 (format 2) still working.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memsnap::sample::SampleAgent;

/// Disk space of the store's pack files (allocated blocks).
fn packs_bytes(store: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(store.join("packs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

/// Two snapshots of very different content; returns (old id, image of the new state, new id).
fn history(f: &Fixture) -> (String, AgentImage, String) {
    let old = f.snapshot_id();
    f.agent.update_day(11, 0.6).expect("update day");
    f.agent.vacuum_vectors().expect("vacuum");
    let image = AgentImage::capture(&f.agent);
    let new = f.snapshot_id();
    (old, image, new)
}

fn restore_matches(f: &Fixture, id: &str, image: &AgentImage, what: &str) {
    let target = f.path(&format!("check-{id}-{}", rand_suffix()));
    f.restore_into(id, &target);
    let r = SampleAgent::open(&target);
    assert_same_tree(
        &image.memdir,
        &tree(&r.memdir(), true),
        &format!("{what}: memdir"),
    );
    assert_eq!(r.row_counts().expect("rows"), image.rows, "{what}: rows");
    assert_eq!(r.git_head().expect("head"), image.head, "{what}: HEAD");
    fs::remove_dir_all(&target).expect("clean up");
}

/// A number field of a JSON report; missing is a failure, not zero.
fn u64_of(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a number in {v:#}"))
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[test]
fn prune_reclaims_the_space_of_forgotten_snapshots_and_keeps_the_rest_intact() {
    let f = Fixture::new();
    let (old, image, new) = history(&f);

    // Nothing is unused yet: a prune changes nothing.
    let p = f.cmd().arg("prune").json();
    assert_eq!(p["chunks_unused"], 0, "{p:#}");
    assert_eq!(
        u64_of(&p, "packs_deleted") + u64_of(&p, "packs_rewritten"),
        0
    );

    let fg = f.cmd().args(["forget", "--keep-last", "1"]).json();
    assert_eq!(fg["forgotten"], 1, "{fg:#}");
    assert_eq!(f.list_ids(), vec![new.clone()]);

    // A prune that rewrites nothing drops the unused chunks from the index and keeps their
    // bytes; a later prune must still see them (counted from the pack files, not the entries).
    let lazy = f.cmd().args(["prune", "--max-unused", "100"]).json();
    assert_eq!(lazy["packs_rewritten"], 0, "{lazy:#}");
    assert!(u64_of(&lazy, "bytes_unused_after") > 0, "{lazy:#}");
    let before = packs_bytes(&f.store);
    let plan = f
        .cmd()
        .args(["prune", "--dry-run", "--max-unused", "0"])
        .json();
    assert_eq!(plan["dry_run"], true);
    assert!(u64_of(&plan, "packs_rewritten") > 0, "{plan:#}");
    assert_eq!(packs_bytes(&f.store), before, "a dry run changes nothing");

    let done = f.cmd().args(["prune", "--max-unused", "0"]).json();
    let after = packs_bytes(&f.store);
    let planned = plan["bytes_freed"].as_u64().expect("bytes_freed");
    assert_eq!(
        done["bytes_freed"], plan["bytes_freed"],
        "plan and execution agree"
    );
    assert!(
        before - after >= planned * 9 / 10 && planned > 0,
        "prune freed {} bytes on disk, planned {planned}",
        before - after
    );
    assert!(
        after < before * 3 / 4,
        "the forgotten snapshot's data is gone: {before} -> {after}"
    );
    f.cmd().args(["verify", "--read-data"]).json();
    restore_matches(&f, &new, &image, "after prune");
    let again = f.cmd().args(["prune", "--max-unused", "0"]).json();
    assert_eq!(again["chunks_unused"], 0, "{again:#}");
    assert_eq!(again["bytes_freed"], 0, "{again:#}");
    assert!(f.cmd().args(["show", &old]).run().status.code() != Some(0));
}

#[test]
fn a_prune_killed_at_each_step_is_finished_by_the_next_with_nothing_lost() {
    for point in [
        "prune:mid-rewrite",
        "prune:before-commit",
        "prune:before-delete",
    ] {
        let f = Fixture::new();
        let (old, _, new) = history(&f);
        let image = AgentImage::capture(&f.agent);
        // A third snapshot shares most chunks with the second: rewriting packs must keep them.
        f.agent.append_day(12, 0.05).expect("append");
        let third_image = AgentImage::capture(&f.agent);
        let third = f.snapshot_id();
        f.cmd().args(["delete", &old]).json();
        let packs_before = pack_count(&f.store);

        f.cmd()
            .env("MEMSNAP_FAILPOINT", point)
            .args(["prune", "--max-unused", "0"])
            .assert_crashed();
        // Whatever the crash left, every kept snapshot is whole and restores identically.
        f.cmd().args(["verify", "--read-data"]).json();
        restore_matches(&f, &new, &image, point);
        restore_matches(&f, &third, &third_image, point);

        // The next prune finishes: orphans (new packs before the commit, old ones after) go.
        let done = f.cmd().args(["prune", "--max-unused", "0"]).json();
        assert!(
            u64_of(&done, "packs_orphaned") > 0,
            "{point}: the crash left orphan packs to collect\n{done:#}"
        );
        let again = f
            .cmd()
            .args(["prune", "--max-unused", "0", "--dry-run"])
            .json();
        assert_eq!(again["packs_orphaned"], 0, "{point}: {again:#}");
        assert_eq!(again["chunks_unused"], 0, "{point}: {again:#}");
        assert!(pack_count(&f.store) <= packs_before + 1, "{point}");
        f.cmd().args(["verify", "--read-data"]).json();
        restore_matches(&f, &new, &image, &format!("{point}, after the next prune"));
        restore_matches(
            &f,
            &third,
            &third_image,
            &format!("{point}, after the next prune"),
        );
    }
}

#[test]
fn snapshots_racing_a_prune_wait_for_it_and_complete() {
    let f = Fixture::new();
    let (old, _, _) = history(&f);
    f.cmd().args(["delete", &old]).json();
    for round in 0..4 {
        f.agent.append_day(100 + round, 0.02).expect("append");
        let image = AgentImage::capture(&f.agent);
        let mut prune = f.cmd();
        prune.args(["prune", "--max-unused", "0"]);
        let mut snap = f.cmd();
        snap.snapshot(f.agent.root()).arg("--json");
        let p = prune.spawn();
        let s = snap.spawn();
        let (p, s) = (
            p.wait_with_output().expect("prune"),
            s.wait_with_output().expect("snapshot"),
        );
        assert!(
            p.status.success(),
            "round {round}: prune: {}",
            String::from_utf8_lossy(&p.stderr)
        );
        assert!(
            s.status.success(),
            "round {round}: snapshot: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        let id: serde_json::Value = serde_json::from_slice(&s.stdout).expect("snapshot JSON");
        f.cmd().args(["verify", "--read-data"]).json();
        restore_matches(&f, str_of(&id, "id"), &image, &format!("round {round}"));
    }
}

#[test]
fn pinned_snapshots_survive_forget_and_delete_until_unpinned() {
    let f = Fixture::new();
    let first = f.snapshot_id();
    f.agent.append_day(1, 0.01).expect("append");
    let second = f.snapshot_id();
    f.agent.append_day(2, 0.01).expect("append");
    let third = f.snapshot_id();
    f.cmd().args(["pin", &first]).json();

    let plan = f
        .cmd()
        .args(["forget", "--keep-last", "1", "--dry-run"])
        .json();
    assert_eq!(plan["forgotten"], 1, "{plan:#}");
    let decisions = plan["groups"][0]["decisions"]
        .as_array()
        .expect("decisions");
    assert_eq!(decisions.len(), 3, "{plan:#}");
    let reasons = |id: &str| -> Vec<String> {
        let d = decisions
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("{id} has a decision\n{plan:#}"));
        d["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .map(|r| r.as_str().expect("a reason").to_owned())
            .collect()
    };
    assert!(reasons(&first).contains(&"pinned".to_owned()), "{plan:#}");
    assert!(reasons(&third).contains(&"newest".to_owned()), "{plan:#}");
    assert!(reasons(&second).is_empty(), "{plan:#}");
    assert_eq!(f.list_ids().len(), 3, "a dry run forgets nothing");

    f.cmd().args(["forget", "--keep-last", "1"]).json();
    assert_eq!(f.list_ids(), vec![first.clone(), third.clone()]);

    let o = f.cmd().args(["delete", &first]).run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(
        o.stderr.contains("pinned") && o.stderr.contains("unpin"),
        "{o}"
    );
    f.cmd().args(["unpin", &first]).json();
    f.cmd().args(["delete", &first]).json();
    assert_eq!(f.list_ids(), vec![third.clone()]);

    // The newest snapshot of an agent is never forgotten, whatever the policy.
    f.cmd()
        .args(["forget", "--keep-label", "nothing-has-this"])
        .json();
    assert_eq!(f.list_ids(), vec![third]);
}

#[test]
fn forget_refuses_no_policy_and_reads_a_policy_file() {
    let f = Fixture::new();
    f.snapshot_id();
    f.agent.append_day(1, 0.01).expect("append");
    f.snapshot_id();
    let o = f.cmd().arg("forget").run();
    assert_eq!(o.status.code(), Some(2), "{o}");
    assert!(o.stderr.contains("--keep"), "{o}");
    let o = f.cmd().args(["forget", "--keep-within", "3x"]).run();
    assert_ne!(o.status.code(), Some(0), "{o}");

    fs::write(f.store.join("policy.toml"), "keep-last = 1\n").expect("policy");
    let r = f.cmd().args(["forget", "--dry-run"]).json();
    assert_eq!(r["forgotten"], 1, "{r:#}");
    let file = f.path("bad-policy.toml");
    fs::write(&file, "keep-everything = true\n").expect("policy");
    let o = f.cmd().arg("forget").arg("--policy").arg(&file).run();
    assert_ne!(o.status.code(), Some(0), "{o}");
    assert!(o.stderr.contains("keep-everything"), "{o}");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(from).expect("rel");
        let dst = to.join(rel);
        if e.file_type().is_dir() {
            fs::create_dir_all(&dst).expect("mkdir");
        } else {
            fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// A copy of a store fixture (tests/fixtures/NAME, as an older memsnap wrote it) in `dir`.
fn fixture_store(dir: &Path, name: &str) -> PathBuf {
    let store = dir.join("store");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
        &store,
    );
    fs::remove_file(store.join("README.md")).expect("readme");
    store
}

#[test]
fn a_store_written_by_memsnap_0_1_still_lists_verifies_restores_pins_and_prunes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = fixture_store(tmp.path(), "store-v1");
    let cmd = || TestCommand::new(&store);
    let list = match cmd().arg("list").json() {
        serde_json::Value::Array(a) => a,
        other => panic!("{other:#}"),
    };
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["label"], "v1");
    assert_eq!(list[1]["label"], "v1-second");
    let (first, second) = (
        str_of(&list[0], "id").to_owned(),
        str_of(&list[1], "id").to_owned(),
    );
    cmd().args(["verify", "--read-data"]).json();
    let target = tmp.path().join("restored");
    cmd()
        .args(["restore", &second, "--target"])
        .arg(&target)
        .json();
    let r = SampleAgent::open(&target);
    let memory = fs::read_to_string(r.memdir().join("MEMORY.md")).expect("MEMORY.md");
    assert!(memory.ends_with("# a note\n"), "{memory}");
    assert!(r.row_counts().expect("rows").values().all(|n| *n > 0));

    // Pins need format 2: the first pin raises the store to it; everything still reads.
    cmd().args(["pin", &first]).json();
    cmd().args(["forget", "--keep-last", "1"]).json();
    assert_eq!(
        cmd().arg("list").json().as_array().map(|a| a.len()),
        Some(2)
    );
    cmd().args(["unpin", &first]).json();
    cmd().args(["forget", "--keep-last", "1"]).json();
    cmd().args(["prune", "--max-unused", "0"]).json();
    cmd().args(["verify", "--read-data"]).json();
    let again = tmp.path().join("again");
    cmd()
        .args(["restore", &second, "--target"])
        .arg(&again)
        .json();
    assert_eq!(
        SampleAgent::open(&again).row_counts().expect("rows"),
        r.row_counts().expect("rows")
    );
}

/// The store's `format_version`: the config record is a version byte, then bincode whose first
/// field (a u32 below 251) is one byte.
fn format_version(store: &Path) -> u8 {
    let db = redb::Database::open(store.join("index.redb")).expect("index");
    let tx = redb::ReadableDatabase::begin_read(&db).expect("read");
    let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let table = tx.open_table(meta).expect("meta");
    let config = table.get("config").expect("get").expect("config");
    config.value()[1]
}

/// A copy of `tests/fixtures/store-v<version>` (two snapshots labelled `v<version>` and
/// `v<version>-second`, see its README), checked to list, verify and restore its second snapshot
/// (into `restored`) without raising its format. Returns the store and the restored agent.
fn old_store_restored(tmp: &Path, version: u8) -> (PathBuf, SampleAgent) {
    let store = fixture_store(tmp, &format!("store-v{version}"));
    assert_eq!(format_version(&store), version);
    let cmd = || TestCommand::new(&store);
    let list = cmd().arg("list").json();
    let list = list.as_array().expect("list");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["label"], format!("v{version}"));
    assert_eq!(list[1]["label"], format!("v{version}-second"));
    let second = str_of(&list[1], "id").to_owned();
    cmd().args(["verify", "--read-data"]).json();
    let target = tmp.join("restored");
    cmd()
        .args(["restore", &second, "--target"])
        .arg(&target)
        .json();
    let r = SampleAgent::open(&target);
    assert!(
        fs::read_to_string(r.memdir().join("MEMORY.md"))
            .expect("MEMORY.md")
            .ends_with("# a note\n")
    );
    assert_eq!(
        format_version(&store),
        version,
        "reading does not raise the format"
    );
    (store, r)
}

#[test]
fn a_store_written_by_memsnap_0_2_still_reads_and_a_snapshot_raises_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, r) = old_store_restored(tmp.path(), 2);
    let target = r.root().to_path_buf();
    let cmd = || TestCommand::new(&store);
    // The pin of format 2 still holds.
    cmd().args(["forget", "--keep-last", "1"]).json();
    assert_eq!(
        cmd().arg("list").json().as_array().map(|a| a.len()),
        Some(2)
    );
    assert_eq!(
        format_version(&store),
        2,
        "reading does not raise the format"
    );

    // A snapshot writes change-detection rows, raising the store (to 5) in the same commit; the
    // next one finds the agent unchanged, deduplicated against the old data.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let first_new = cmd().snapshot(&target).json();
    assert_eq!(format_version(&store), 5);
    // The restored agent is the second snapshot again: every chunk is found in the old packs.
    assert_eq!(first_new["stats"]["new_chunks"], 0, "{first_new:#}");
    let again = cmd().snapshot(&target).json();
    let state_bytes: u64 = fs::read_dir(r.state_dir())
        .expect("state")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    assert_eq!(again["stats"]["bytes_read"], state_bytes, "{again:#}");
    cmd().args(["verify", "--read-data"]).json();
}

#[test]
fn a_store_written_by_memsnap_0_3_still_reads_and_new_vector_pages_raise_it_to_format_5() {
    new_vector_pages_raise_an_old_store(3);
}

/// Format 4 holds version 1 plane-coded records, which the version 2 ones written now join.
#[test]
fn a_store_written_by_memsnap_0_4_still_reads_and_new_vector_pages_raise_it_to_format_5() {
    new_vector_pages_raise_an_old_store(4);
}

/// The old store fixture of `version` reads and restores; new embedding pages are snapshotted
/// into it, and imported into another copy of it, each raising its format to 5.
fn new_vector_pages_raise_an_old_store(version: u8) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, r) = old_store_restored(tmp.path(), version);
    let target = r.root().to_path_buf();
    let cmd = || TestCommand::new(&store);

    // New embedding pages are plane-coded. A snapshot's commit raises the store to 5 (the import
    // below checks the raise that plane-coded entries make); old zero-run frames and new
    // plane-coded pages then restore together.
    r.append_day(6, 0.2).expect("append");
    let rows = r.row_counts().expect("rows");
    let day = cmd().snapshot(&target).json();
    let day = str_of(&day, "id").to_owned();
    assert_eq!(format_version(&store), 5);
    cmd().args(["verify", "--read-data"]).json();
    // The day restored from `store` into `dir`: its vector database's bytes.
    let restored_vector = |store: &Path, dir: &str| {
        let to = tmp.path().join(dir);
        TestCommand::new(store)
            .args(["restore", &day, "--target"])
            .arg(&to)
            .json();
        assert_eq!(SampleAgent::open(&to).row_counts().expect("rows"), rows);
        fs::read(to.join("sqlite/vector.sqlite")).expect("restored")
    };
    let vector = fs::read(target.join("sqlite/vector.sqlite")).expect("source");
    assert_eq!(restored_vector(&store, "again"), vector);

    // Importing that snapshot into another copy of the old store raises it as well: the bundle
    // holds the plane-coded pages as zstd frames, and the import codes them again.
    let bundle = tmp.path().join("day.tar.zst");
    cmd().args(["export", &day, "--out"]).arg(&bundle).json();
    let other = fixture_store(&tmp.path().join("other"), &format!("store-v{version}"));
    TestCommand::new(&other).arg("import").arg(&bundle).json();
    assert_eq!(format_version(&other), 5);
    TestCommand::new(&other)
        .args(["verify", "--read-data"])
        .json();
    assert_eq!(restored_vector(&other, "third"), vector);
}

#[test]
fn delete_and_forget_finish_an_interrupted_restore_before_touching_records() {
    let f = Fixture::new();
    let first = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    f.agent.append_day(5, 0.05).expect("append");
    let second = f.snapshot_id();
    f.crash_restore(&first, "restore:memdir-switched");
    assert!(f.journal().exists(), "the crashed restore left its journal");
    // Deleting the snapshot that restore needs must not strand it: the restore is finished
    // first, under the agent lock, and the record goes afterwards.
    f.cmd().args(["delete", &first]).json();
    assert!(!f.journal().exists(), "delete finished the restore");
    image.assert_matches(&f.agent, "restore finished by delete");
    f.cmd().args(["prune", "--max-unused", "0"]).json();
    f.cmd().args(["verify", "--read-data"]).json();

    // The same for forget.
    f.crash_restore(&second, "restore:memdir-switched");
    f.cmd().args(["forget", "--keep-last", "1"]).json();
    assert!(!f.journal().exists(), "forget finished the restore");
}
