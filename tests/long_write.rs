//! Long writes (store-format.md, "Write ordering", sorted runs): a long snapshot or import keeps
//! the entries of its durable chunks in sorted runs on disk until its final commit, so that its
//! memory does not grow with the data, and confirms its filter hits in batches. Small packs and
//! low thresholds (test knobs) make a small agent do what a snapshot of gigabytes does. One that
//! dies leaves no snapshot and no index entry, only pack files that prune deletes and a scratch
//! folder that the next writer sweeps.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memsnap::sample::{SampleAgent, SampleSpec};

const KNOBS: [(&str, &str); 2] = [
    ("MEMSNAP_TEST_PACK_BYTES", "524288"),
    ("MEMSNAP_TEST_RUN_CHUNKS", "200"),
];

fn snapshot_with_knobs(store: &Path, agent: &Path) -> TestCommand {
    let mut c = TestCommand::new(store);
    for (k, v) in KNOBS {
        c.env(k, v);
    }
    c.snapshot(agent);
    c
}

/// Every database of `agent` is byte for byte the one restored into `target`.
fn assert_databases_restored(agent: &SampleAgent, target: &Path) {
    for db in databases(agent) {
        let name = db.file_name().expect("name");
        assert_eq!(
            fs::read(&db).expect("live"),
            fs::read(target.join("sqlite").join(name)).expect("restored"),
            "{}",
            db.display()
        );
    }
}

/// A sample agent of about `bytes` in a new temporary folder (kept as long as the folder).
fn agent_of(bytes: u64, seed: u64) -> (tempfile::TempDir, SampleAgent) {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = SampleAgent::create(
        &tmp.path().join("agent"),
        &SampleSpec::with_total_bytes(bytes, seed),
    )
    .expect("agent");
    (tmp, agent)
}

/// The names in the store's scratch folder.
fn scratch(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(store.join("tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What a dead long write left: no snapshot, no chunk entry, and pack files prune deletes.
fn assert_nothing_but_orphans(store: &Path) -> u64 {
    assert_eq!(
        TestCommand::new(store).arg("list").json(),
        serde_json::json!([])
    );
    let stats = TestCommand::new(store).arg("stats").json();
    assert_eq!(
        stats["store"]["chunks"], 0,
        "no entry before the commit: {stats:#}"
    );
    TestCommand::new(store)
        .args(["verify", "--read-data"])
        .json();
    pack_count(store) as u64
}

#[test]
fn a_long_snapshot_restores_and_a_dead_one_leaves_only_orphan_packs() {
    let (tmp, agent) = agent_of(6 << 20, 3);
    let store = tmp.path().join("store");

    // Killed before its final commit, after writing sorted runs.
    snapshot_with_knobs(&store, agent.root())
        .env("MEMSNAP_FAILPOINT", "snapshot:before-commit")
        .assert_crashed();
    let orphans = assert_nothing_but_orphans(&store);
    assert!(orphans > 10, "small packs were written");
    let left = scratch(&store);
    assert!(
        left.len() == 1 && left[0].starts_with("runs-"),
        "the killed snapshot wrote runs: {left:?}"
    );

    // Failing with an error instead: the writer deletes its packs and its runs.
    snapshot_with_knobs(&store, agent.root())
        .env("MEMSNAP_FAILPOINT", "snapshot:before-commit:error")
        .assert_exit_code(1);
    assert_eq!(assert_nothing_but_orphans(&store), orphans);
    assert_eq!(scratch(&store), Vec::<String>::new(), "swept and removed");

    // A whole one restores byte for byte and leaves no scratch.
    let snap = snapshot_with_knobs(&store, agent.root()).json();
    let id = str_of(&snap, "id").to_owned();
    assert_eq!(scratch(&store), Vec::<String>::new());
    TestCommand::new(&store)
        .args(["verify", "--read-data"])
        .json();
    let target = tmp.path().join("restored");
    restore_to(&store, &id, &target);
    assert_databases_restored(&agent, &target);

    // Prune deletes the dead one's packs and keeps the live one whole.
    prune_orphans_and_verify(&store, orphans);
    let stats = TestCommand::new(&store).arg("stats").json();
    assert_eq!(stats["store"]["chunks_unused"], 0, "{stats:#}");
    let again = tmp.path().join("again");
    restore_to(&store, &id, &again);
    assert_same_tree(
        &tree(&target.join("sqlite"), false),
        &tree(&again.join("sqlite"), false),
        "restore after prune",
    );
}

/// Prune finds `orphans` packs no index entry names and deletes them; what is left verifies.
fn prune_orphans_and_verify(store: &Path, orphans: u64) {
    let report = TestCommand::new(store)
        .args(["prune", "--max-unused", "0"])
        .json();
    assert_eq!(report["packs_orphaned"], orphans, "{report:#}");
    TestCommand::new(store)
        .args(["verify", "--read-data"])
        .json();
}

/// An update day's tree nodes over unchanged pages wait for the final commit; past a limit (2
/// here, 4,096 by default) they wait in a scratch file under `tmp/`. A snapshot killed with
/// nodes spilled leaves its folder, which the next snapshot sweeps; one that spills restores
/// byte for byte and leaves `tmp/` empty.
#[test]
fn an_update_day_spills_its_tree_nodes_and_restores() {
    let (tmp, agent) = agent_of(6 << 20, 9);
    let store = tmp.path().join("store");
    snapshot_with_knobs(&store, agent.root()).json();
    agent.update_day(11, 0.02).expect("update day");
    let scratch = || scratch(&store);

    snapshot_with_knobs(&store, agent.root())
        .env("MEMSNAP_TEST_NODES_IN_MEMORY", "2")
        .env("MEMSNAP_FAILPOINT", "snapshot:before-pack-sync")
        .assert_crashed();
    let left = scratch();
    assert!(
        left.iter().any(|n| n.starts_with("nodes-"))
            && left
                .iter()
                .all(|n| n.starts_with("nodes-") || n.starts_with("runs-")),
        "the killed snapshot spilled: {left:?}"
    );

    // One that does not spill sweeps it.
    snapshot_with_knobs(&store, agent.root()).json();
    assert_eq!(scratch(), Vec::<String>::new(), "swept");

    agent.update_day(12, 0.02).expect("update day");
    let snap = snapshot_with_knobs(&store, agent.root())
        .env("MEMSNAP_TEST_NODES_IN_MEMORY", "2")
        .json();
    assert_eq!(scratch(), Vec::<String>::new(), "its own folder removed");
    TestCommand::new(&store)
        .args(["verify", "--read-data"])
        .json();
    let target = tmp.path().join("restored");
    restore_to(&store, str_of(&snap, "id"), &target);
    assert_databases_restored(&agent, &target);
}

#[test]
fn a_long_import_restores_and_a_dead_one_leaves_only_orphan_packs() {
    let (tmp, agent) = agent_of(6 << 20, 5);
    let (id, bundle) = snapshot_and_export(tmp.path(), &agent);

    let import = |store: &Path| {
        let mut c = TestCommand::new(store);
        for (k, v) in KNOBS {
            c.env(k, v);
        }
        c.arg("import").arg(&bundle);
        c
    };
    let store2 = tmp.path().join("store2");
    import(&store2)
        .env("MEMSNAP_FAILPOINT", "import:before-commit")
        .assert_crashed();
    let orphans = assert_nothing_but_orphans(&store2);
    assert!(orphans > 10, "small packs were written");
    assert!(scratch(&store2).iter().all(|n| n.starts_with("runs-")));

    // A whole import after it restores byte for byte, and prune deletes only the orphans.
    import(&store2).json();
    assert_eq!(scratch(&store2), Vec::<String>::new(), "swept and removed");
    prune_orphans_and_verify(&store2, orphans);
    let target = tmp.path().join("restored");
    restore_to(&store2, &id, &target);
    assert_same_tree(
        &tree(&agent.sqlite_dir(), false),
        &tree(&target.join("sqlite"), false),
        "imported as a long write",
    );
}

/// A filter hit that the index does not hold (a prefix collision, made here by a test knob) is
/// caught whether an index session confirms it during the snapshot (batches of one hit) or the
/// final commit does: the snapshot is redone with the chunk written, and restores byte for byte.
/// A miss a session finds before the databases are read stops the attempt there.
#[test]
fn a_false_filter_hit_is_caught_and_the_snapshot_redone() {
    let (tmp, agent) = agent_of(6 << 20, 7);
    // (hits per session, where the false hit is, what reports it)
    let cases = [
        ("1", "state", "chunk prefix collision; retrying"),
        (
            "1",
            "memdir",
            "chunk prefix collision found while reading; retrying",
        ),
        ("32768", "state", "chunk prefix collision; retrying"),
    ];
    for (i, (batch, part, caught)) in cases.into_iter().enumerate() {
        let probe_in = |a: &SampleAgent| match part {
            "state" => a.state_dir().join("probe.json"),
            _ => a.memdir().join("probe.json"),
        };
        let store = tmp.path().join(format!("store{i}"));
        TestCommand::new(&store).snapshot(agent.root()).json();
        // Hits below changed tree nodes, for the sessions to confirm.
        agent.append_day(i as u64 + 1, 0.01).expect("day");
        // A file no store has seen, which the filter claims to know.
        let probe = format!("{{\"probe\": {i}, \"seen\": false}}");
        fs::write(probe_in(&agent), &probe).expect("probe");
        let out = TestCommand::new(&store)
            .env("MEMSNAP_LOG", "warn")
            .env("MEMSNAP_TEST_FALSE_HIT", &false_hit(&probe))
            .env("MEMSNAP_TEST_CONFIRM_BATCH", batch)
            .snapshot(agent.root())
            .arg("--json")
            .assert_exit_code(0);
        assert!(
            out.stderr.contains(caught),
            "batch {batch}, {part}: the false hit was caught\n{out}"
        );
        let id = str_of(&out.json(), "id").to_owned();
        TestCommand::new(&store)
            .args(["verify", "--read-data"])
            .json();
        let restored = restore_to(&store, &id, &tmp.path().join(format!("restored{i}")));
        assert_eq!(
            fs::read_to_string(probe_in(&restored)).expect("probe"),
            probe
        );
        AgentImage::capture(&agent).assert_matches(&restored, &format!("batch {batch}, {part}"));
    }
}

/// An import retries like a snapshot: a chunk of the bundle that the filter wrongly takes for
/// known is missing at its commit, and the import is redone with the chunk written.
#[test]
fn a_false_filter_hit_in_an_import_is_caught_and_the_import_redone() {
    let (tmp, agent) = agent_of(2 << 20, 9);
    let probe = "{\"probe\": \"import\"}";
    fs::write(agent.state_dir().join("probe.json"), probe).expect("probe");
    let (id, bundle) = snapshot_and_export(tmp.path(), &agent);

    let store2 = tmp.path().join("store2");
    let out = TestCommand::new(&store2)
        .env("MEMSNAP_LOG", "warn")
        .env("MEMSNAP_TEST_FALSE_HIT", &false_hit(probe))
        .arg("import")
        .arg(&bundle)
        .arg("--json")
        .assert_exit_code(0);
    assert!(
        out.stderr.contains("chunk prefix collision; retrying"),
        "the false hit was caught\n{out}"
    );
    TestCommand::new(&store2)
        .args(["verify", "--read-data"])
        .json();
    let restored = restore_to(&store2, &id, &tmp.path().join("restored"));
    AgentImage::capture(&agent).assert_matches(&restored, "imported after a false hit");
}

/// The value of MEMSNAP_TEST_FALSE_HIT that makes the chunk of `bytes` (a file of one chunk)
/// a false hit: its id's first 64 bits.
fn false_hit(bytes: &str) -> String {
    let hash = blake3::hash(bytes.as_bytes());
    u64::from_be_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")).to_string()
}

/// Snapshots `agent` into `dir/store` and exports it to `dir/ana.tar.zst`: (snapshot id, bundle).
fn snapshot_and_export(dir: &Path, agent: &SampleAgent) -> (String, PathBuf) {
    let store = dir.join("store");
    let id = str_of(
        &TestCommand::new(&store).snapshot(agent.root()).json(),
        "id",
    )
    .to_owned();
    let bundle = dir.join("ana.tar.zst");
    TestCommand::new(&store)
        .args(["export", &id, "--out"])
        .arg(&bundle)
        .json();
    (id, bundle)
}
