//! Stores damaged on purpose, one kind of damage per test: a missing pack file, a truncated
//! pack, a flipped bit inside a stored chunk, a chunk missing from the index, a corrupt
//! `index.redb`. For each, `verify` names what is damaged (pack, chunk, file) and which
//! snapshots need it, exits 3, and reports the other snapshots intact, which still restore;
//! then `repair` rebuilds the index from the packs and says what it could not recover.
//!
//! Every store holds two snapshots of one agent: `old`, then `new` after the agent changed. The
//! packs `new` wrote hold only chunks `old` does not need, so damage there spares `old`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn pack_hex(pack: &Path) -> String {
    pack.file_stem()
        .expect("stem")
        .to_string_lossy()
        .into_owned()
}

/// A store with snapshots `old` and `new`, restores of both taken while it was whole, and the
/// packs `new` wrote.
struct Broken {
    f: Fixture,
    old: String,
    new: String,
    old_tree: Tree,
    new_tree: Tree,
    new_packs: Vec<PathBuf>,
}

impl Broken {
    fn new() -> Broken {
        let f = Fixture::new();
        let old = f.snapshot_id();
        let before = pack_files(&f.store);
        f.agent.append_day(11, 0.3).expect("append_day");
        fs::write(
            f.agent.memdir().join("inbox.md"),
            "# Inbox\n\n- written after the first snapshot\n".repeat(50),
        )
        .expect("note");
        let new = f.snapshot_id();
        let new_packs: Vec<PathBuf> = pack_files(&f.store).difference(&before).cloned().collect();
        assert!(!new_packs.is_empty(), "the second snapshot wrote a pack");
        let old_tree = restored_tree(&f, &old, "whole-old");
        let new_tree = restored_tree(&f, &new, "whole-new");
        let clean = f.cmd().args(["verify", "--read-data"]).json();
        assert_eq!(clean["ok"], Value::Bool(true), "{clean:#}");
        Broken {
            f,
            old,
            new,
            old_tree,
            new_tree,
            new_packs,
        }
    }

    /// The largest pack `new` wrote.
    fn new_pack(&self) -> PathBuf {
        self.new_packs
            .iter()
            .max_by_key(|p| fs::metadata(p).expect("meta").len())
            .expect("a pack")
            .clone()
    }

    /// A data chunk (not a tree node) of the largest pack `new` wrote, at least 64 bytes.
    fn new_data_chunk(&self) -> (PathBuf, PackEntry) {
        let pack = self.new_pack();
        let e = footer(&pack)
            .into_iter()
            .filter(|e| !e.is_tree() && e.stored_len >= 64)
            .max_by_key(|e| e.stored_len)
            .expect("a data chunk");
        (pack, e)
    }

    fn verify(&self, read_data: bool) -> (Value, Outcome) {
        let mut cmd = self.f.cmd();
        cmd.arg("verify");
        if read_data {
            cmd.arg("--read-data");
        }
        let out = cmd.arg("--json").assert_exit_code(3);
        (out.json(), out)
    }

    /// Asserts the verdict: `new` damaged (every row about it), `old` intact and restoring as
    /// it did before the damage.
    fn assert_only_new_damaged(&self, report: &Value, out: &Outcome) {
        assert_eq!(report["ok"], Value::Bool(false), "{out}");
        assert_eq!(
            report["damaged_snapshots"],
            serde_json::json!([self.new]),
            "{out}"
        );
        assert_eq!(
            report["intact_snapshots"],
            serde_json::json!([self.old]),
            "{out}"
        );
        for d in report["damaged"].as_array().expect("damaged") {
            assert_eq!(str_of(d, "snapshot"), self.new, "{out}");
            assert!(!str_of(d, "artifact").is_empty(), "{out}");
            assert!(!str_of(d, "problem").is_empty(), "{out}");
        }
        self.assert_old_restores("after the damage");
    }

    fn assert_old_restores(&self, when: &str) {
        let t = restored_tree(
            &self.f,
            &self.old,
            &format!("old-{}", when.replace(' ', "-")),
        );
        assert_same_tree(&self.old_tree, &t, &format!("old snapshot restored {when}"));
    }

    fn assert_new_restores(&self, when: &str) {
        let t = restored_tree(
            &self.f,
            &self.new,
            &format!("new-{}", when.replace(' ', "-")),
        );
        assert_same_tree(&self.new_tree, &t, &format!("new snapshot restored {when}"));
    }

    fn repair(&self, extra: &[&str]) -> Value {
        self.f.cmd().arg("repair").args(extra).json()
    }

    /// The agent still has new's data: the next snapshot stores what was lost again, after
    /// which the store verifies clean and new restores whole.
    fn assert_refilled_by_a_snapshot(&self, when: &str) {
        self.f.snapshot_id();
        let v = self.f.cmd().args(["verify", "--read-data"]).json();
        assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
        self.assert_new_restores(when);
    }
}

fn restored_tree(f: &Fixture, id: &str, name: &str) -> Tree {
    let target = f.path(&format!("restored-{name}"));
    if target.exists() {
        fs::remove_dir_all(&target).expect("remove an earlier restore");
    }
    f.restore_into(id, &target);
    tree(&target, false)
}

fn rows_for_chunk<'a>(report: &'a Value, chunk: &str) -> Vec<&'a Value> {
    report["damaged"]
        .as_array()
        .expect("damaged")
        .iter()
        .filter(|d| d["chunk"] == chunk)
        .collect()
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[at as usize] ^= 0x10;
    fs::write(path, &bytes).expect("write");
}

fn remove_index_entry(store: &Path, id: [u8; 32]) {
    let db = redb::Database::create(store.join("index.redb")).expect("open index");
    let tx = db.begin_write().expect("write tx");
    {
        let def: redb::TableDefinition<[u8; 32], [u8; 33]> = redb::TableDefinition::new("chunks");
        let mut t = tx.open_table(def).expect("chunks table");
        assert!(t.remove(id).expect("remove").is_some(), "the entry existed");
    }
    tx.commit().expect("commit");
}

// ---------------------------------------------------------------------------------------------
// What verify reports
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_pack_names_the_pack_and_the_snapshots_that_need_it() {
    let b = Broken::new();
    let pack = b.new_pack();
    fs::remove_file(&pack).expect("remove pack");
    let (report, out) = b.verify(false);
    b.assert_only_new_damaged(&report, &out);
    let hex = pack_hex(&pack);
    let rows: Vec<&Value> = report["damaged"].as_array().expect("rows").iter().collect();
    assert!(!rows.is_empty(), "{out}");
    for d in &rows {
        assert_eq!(
            str_of(d, "pack"),
            hex,
            "every row names the missing pack\n{out}"
        );
        assert!(str_of(d, "problem").contains("missing"), "{out}");
    }
    let ids: BTreeSet<String> = footer_ids_of_removed(&rows);
    assert!(!ids.is_empty(), "rows name chunks\n{out}");
    assert!(
        report["damaged_packs"]
            .as_array()
            .expect("damaged_packs")
            .iter()
            .any(|p| p
                .as_str()
                .is_some_and(|p| p.contains(&hex) && p.contains("missing"))),
        "{out}"
    );
    let human = b.f.cmd().arg("verify").assert_exit_code(3);
    assert!(
        human.stdout.contains(&hex) && human.stdout.contains(&format!("intact snapshot {}", b.old)),
        "{human}"
    );
    let restore =
        b.f.cmd()
            .args(["restore", &b.new, "--target"])
            .arg(b.f.path("x"))
            .run();
    assert_eq!(restore.status.code(), Some(1), "{restore}");
    assert!(
        restore.stderr.contains(&hex),
        "the failed restore names the pack\n{restore}"
    );
}

fn footer_ids_of_removed(rows: &[&Value]) -> BTreeSet<String> {
    rows.iter()
        .map(|d| str_of(d, "chunk").to_owned())
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn truncated_pack_names_the_chunks_past_its_end() {
    let b = Broken::new();
    let pack = b.new_pack();
    let entries = footer(&pack);
    let len = fs::metadata(&pack).expect("meta").len();
    let cut = 16 + (entries[entries.len() - 1].offset - 16) / 2;
    assert!(cut < len);
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .expect("open")
        .set_len(cut)
        .expect("truncate");
    let lost: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.offset + u64::from(e.stored_len) > cut)
        .map(PackEntry::hex)
        .collect();
    for read_data in [false, true] {
        let (report, out) = b.verify(read_data);
        b.assert_only_new_damaged(&report, &out);
        let named: BTreeSet<String> = report["damaged"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|d| str_of(d, "chunk").to_owned())
            .collect();
        // Every row is a chunk past the cut (a lost node hides the chunks below it).
        assert!(named.is_subset(&lost), "{named:?} vs {lost:?}\n{out}");
        assert!(!named.is_empty(), "{out}");
        assert!(
            report["damaged_packs"]
                .as_array()
                .expect("packs")
                .iter()
                .any(|p| p.as_str().is_some_and(|p| p.contains(&pack_hex(&pack)))),
            "{out}"
        );
    }
}

#[test]
fn flipped_bit_in_a_chunk_is_found_by_read_data_and_named() {
    let b = Broken::new();
    let (pack, e) = b.new_data_chunk();
    flip_byte(&pack, e.offset + u64::from(e.stored_len) / 2);
    let (report, out) = b.verify(true);
    b.assert_only_new_damaged(&report, &out);
    let rows = rows_for_chunk(&report, &e.hex());
    assert!(!rows.is_empty(), "the flipped chunk is named\n{out}");
    for d in rows {
        assert_eq!(str_of(d, "pack"), pack_hex(&pack), "{out}");
    }
    assert_eq!(
        report["damaged"].as_array().expect("rows").len(),
        rows_for_chunk(&report, &e.hex()).len(),
        "{out}"
    );
}

#[test]
fn missing_index_entry_is_named_with_the_snapshots_that_need_it() {
    let b = Broken::new();
    let (_, e) = b.new_data_chunk();
    remove_index_entry(&b.f.store, e.id);
    let (report, out) = b.verify(false);
    b.assert_only_new_damaged(&report, &out);
    let rows = rows_for_chunk(&report, &e.hex());
    assert!(!rows.is_empty(), "{out}");
    for d in rows {
        assert!(
            str_of(d, "problem").contains("not in the store index"),
            "{out}"
        );
    }
}

fn assert_index_damage_reported(store: &Path, what: &str) {
    for args in [&["verify"][..], &["verify", "--read-data"], &["list"]] {
        let out = TestCommand::new(store).args(args).assert_exit_code(3);
        assert!(
            out.stderr.contains("index.redb")
                && out.stderr.contains("damaged")
                && out.stderr.contains("memsnap repair"),
            "{what}: the error names the file and the fix\n{out}"
        );
        assert!(!out.stderr.contains("panicked"), "{out}");
    }
}

#[test]
fn corrupt_index_is_named_with_the_fix() {
    let b = Broken::new();
    let index = b.f.store.join("index.redb");
    let len = fs::metadata(&index).expect("meta").len() as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    fs::write(&index, &garbage).expect("garbage");
    assert_index_damage_reported(&b.f.store, "garbage index");
}

#[test]
fn truncated_index_is_named_with_the_fix() {
    let b = Broken::new();
    let index = b.f.store.join("index.redb");
    let len = fs::metadata(&index).expect("meta").len();
    for cut in [len / 2, 0] {
        fs::OpenOptions::new()
            .write(true)
            .open(&index)
            .expect("open")
            .set_len(cut)
            .expect("truncate");
        assert_index_damage_reported(&b.f.store, &format!("index truncated to {cut} bytes"));
    }
    // What repair makes of it: every snapshot's content, under recovered records.
    let r = b.repair(&[]);
    assert_eq!(r["index_readable"], Value::Bool(false), "{r:#}");
    assert_eq!(
        r["snapshots_recovered"].as_array().expect("ids").len(),
        2,
        "{r:#}"
    );
    let v = b.f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
}

// ---------------------------------------------------------------------------------------------
// Repair
// ---------------------------------------------------------------------------------------------

#[test]
fn repair_of_a_whole_store_changes_nothing_and_is_idempotent() {
    let b = Broken::new();
    let list = b.f.list();
    for _ in 0..2 {
        let r = b.repair(&[]);
        assert_eq!(r["chunks_added"], 0, "{r:#}");
        assert_eq!(r["chunks_removed"], 0, "{r:#}");
        assert_eq!(r["chunks_moved"], 0, "{r:#}");
        assert_eq!(r["damaged_snapshots"], serde_json::json!([]), "{r:#}");
        assert_eq!(r["index_readable"], Value::Bool(true), "{r:#}");
    }
    assert_eq!(b.f.list(), list, "snapshot records are kept as they were");
    let v = b.f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
}

#[test]
fn repair_dry_run_changes_nothing() {
    let b = Broken::new();
    let (_, e) = b.new_data_chunk();
    remove_index_entry(&b.f.store, e.id);
    let files = store_files(&b.f.store);
    let index = fs::read(b.f.store.join("index.redb")).expect("index");
    let r = b.repair(&["--dry-run"]);
    assert_eq!(r["dry_run"], Value::Bool(true), "{r:#}");
    assert_eq!(r["chunks_added"], 1, "{r:#}");
    assert_eq!(store_files(&b.f.store), files, "no file changed");
    assert_eq!(
        fs::read(b.f.store.join("index.redb")).expect("index"),
        index
    );
    b.verify(false);
}

#[test]
fn repair_restores_a_missing_index_entry() {
    let b = Broken::new();
    let (_, e) = b.new_data_chunk();
    remove_index_entry(&b.f.store, e.id);
    let r = b.repair(&[]);
    assert_eq!(r["chunks_added"], 1, "{r:#}");
    assert_eq!(r["damaged_snapshots"], serde_json::json!([]), "{r:#}");
    let v = b.f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
    b.assert_new_restores("after repair");
    b.assert_old_restores("after repair");
    let again = b.repair(&[]);
    assert_eq!(again["chunks_added"], 0, "{again:#}");
}

#[test]
fn repair_after_a_missing_pack_keeps_the_damaged_snapshot_listed_and_reported() {
    let b = Broken::new();
    let pack = b.new_pack();
    fs::remove_file(&pack).expect("remove pack");
    let r = b.repair(&[]);
    assert!(r["chunks_removed"].as_u64().expect("n") > 0, "{r:#}");
    let damaged = r["damaged_snapshots"].as_array().expect("damaged");
    assert_eq!(damaged.len(), 1, "{r:#}");
    assert_eq!(damaged[0]["snapshot"], b.new.as_str(), "{r:#}");
    assert!(
        damaged[0]["missing_chunks"].as_u64().expect("n") > 0,
        "{r:#}"
    );
    assert_eq!(r["intact_snapshots"], serde_json::json!([b.old]), "{r:#}");
    assert!(
        b.f.list_ids().contains(&b.new),
        "the damaged snapshot stays listed"
    );
    let (report, out) = b.verify(true);
    b.assert_only_new_damaged(&report, &out);
    b.assert_refilled_by_a_snapshot("after a snapshot refilled the lost chunks");
}

#[test]
fn repair_salvages_the_chunks_of_a_truncated_pack() {
    let b = Broken::new();
    let pack = b.new_pack();
    let entries = footer(&pack);
    let cut = entries[entries.len() / 2].offset + 3;
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .expect("open")
        .set_len(cut)
        .expect("truncate");
    let kept: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.offset + u64::from(e.stored_len) <= cut)
        .map(PackEntry::hex)
        .collect();
    let r = b.repair(&[]);
    assert_eq!(
        r["packs_salvaged"],
        serde_json::json!([pack_hex(&pack)]),
        "{r:#}"
    );
    assert!(!pack.exists(), "the damaged pack left packs/");
    assert!(
        b.f.store
            .join("damaged")
            .join(format!("{}.pack", pack_hex(&pack)))
            .is_file(),
        "the damaged pack is kept under damaged/"
    );
    let (report, out) = b.verify(true);
    b.assert_only_new_damaged(&report, &out);
    for d in report["damaged"].as_array().expect("rows") {
        assert!(
            !kept.contains(str_of(d, "chunk")),
            "a salvaged chunk is reported lost\n{out}"
        );
    }
    let again = b.repair(&[]);
    assert_eq!(again["packs_salvaged"], serde_json::json!([]), "{again:#}");
    assert_eq!(again["chunks_added"], 0, "{again:#}");
    b.assert_refilled_by_a_snapshot("after salvage and a refilling snapshot");
}

#[test]
fn repair_drops_a_damaged_chunk_so_the_next_snapshot_stores_it_again() {
    let b = Broken::new();
    let (pack, e) = b.new_data_chunk();
    flip_byte(&pack, e.offset + u64::from(e.stored_len) / 2);
    let r = b.repair(&[]);
    let bad = r["chunks_damaged"].as_array().expect("chunks_damaged");
    assert_eq!(bad.len(), 1, "{r:#}");
    assert_eq!(bad[0]["chunk"], e.hex().as_str(), "{r:#}");
    assert_eq!(bad[0]["pack"], pack_hex(&pack).as_str(), "{r:#}");
    assert_eq!(
        r["damaged_snapshots"][0]["snapshot"],
        b.new.as_str(),
        "{r:#}"
    );
    let (report, out) = b.verify(true);
    b.assert_only_new_damaged(&report, &out);
    b.assert_refilled_by_a_snapshot("after a snapshot stored the damaged chunk again");
}

#[test]
fn repair_of_an_unreadable_index_recovers_every_snapshot_from_the_packs() {
    let b = Broken::new();
    let index = b.f.store.join("index.redb");
    let len = fs::metadata(&index).expect("meta").len() as usize;
    fs::write(&index, vec![0x5au8; len]).expect("garbage");
    let r = b.repair(&[]);
    assert_eq!(r["index_readable"], Value::Bool(false), "{r:#}");
    assert!(!r["lost"].as_array().expect("lost").is_empty(), "{r:#}");
    let backup = PathBuf::from(str_of(&r, "backup"));
    assert_eq!(
        fs::read(&backup).expect("backup"),
        vec![0x5au8; len],
        "the damaged index is kept"
    );
    let recovered: Vec<String> = r["snapshots_recovered"]
        .as_array()
        .expect("recovered")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(recovered.len(), 2, "{r:#}");
    let v = b.f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
    // Oldest first, as list orders them: old's content, then new's.
    let listed = b.f.list_ids();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let trees: Vec<Tree> = listed
        .iter()
        .enumerate()
        .map(|(i, id)| restored_tree(&b.f, id, &format!("recovered-{i}")))
        .collect();
    assert!(trees.contains(&b.old_tree), "old's content is recovered");
    assert!(trees.contains(&b.new_tree), "new's content is recovered");
    let again = b.repair(&[]);
    assert_eq!(again["index_readable"], Value::Bool(true), "{again:#}");
    assert_eq!(
        again["snapshots_recovered"],
        serde_json::json!([]),
        "{again:#}"
    );
    assert_eq!(
        b.f.list_ids(),
        listed,
        "a second repair recovers nothing twice"
    );
}

#[test]
fn repair_killed_before_its_commit_leaves_the_store_as_it_was_and_reruns() {
    let b = Broken::new();
    let (_, e) = b.new_data_chunk();
    remove_index_entry(&b.f.store, e.id);
    let list = b.f.list();
    b.f.cmd()
        .env("MEMSNAP_FAILPOINT", "repair:before-commit")
        .arg("repair")
        .assert_crashed();
    assert_eq!(b.f.list(), list);
    b.verify(false);
    let r = b.repair(&[]);
    assert_eq!(r["chunks_added"], 1, "{r:#}");
    let v = b.f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(v["ok"], Value::Bool(true), "{v:#}");
}
