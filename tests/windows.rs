//! Restore, export and verify a window of chunk locations at a time (`--window-chunks`,
//! src/store/stream.rs): with windows of a few dozen chunks and every content above 64 KiB
//! streamed (a test knob), a small agent goes through the many-window paths a database of
//! gigabytes takes, and every result must equal the one-window result.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memsnap::sample::{SampleAgent, SampleSpec};
use serde_json::Value;

const WINDOW: &str = "37";

/// A command whose large contents are streamed in windows of `WINDOW` chunks.
fn windowed(store: &Path) -> TestCommand {
    let mut c = TestCommand::new(store);
    c.env("MEMSNAP_TEST_LISTED_MAX", "65536")
        .args(["--window-chunks", WINDOW]);
    c
}

/// `verify --read-data` of a damaged store, in one pass and in windows: both exit with 3.
fn verify_damaged(store: &Path) -> (Value, Value) {
    let whole = TestCommand::new(store)
        .args(["verify", "--read-data", "--json"])
        .assert_exit_code(3)
        .json();
    let parts = windowed(store)
        .args(["verify", "--read-data", "--json"])
        .assert_exit_code(3)
        .json();
    (whole, parts)
}

fn agent(tmp: &Path) -> SampleAgent {
    SampleAgent::create(
        &tmp.join("agent"),
        &SampleSpec::with_total_bytes(3 << 20, 11),
    )
    .expect("agent")
}

#[test]
fn windowed_restore_export_and_verify_equal_the_whole() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = agent(tmp.path());
    let store = tmp.path().join("store");
    let snap = TestCommand::new(&store).snapshot(agent.root()).json();
    let id = str_of(&snap, "id").to_owned();
    let vector = agent.sqlite_dir().join("vector.sqlite");
    let pages = fs::metadata(&vector).expect("vector db").len() / 4096;
    assert!(
        pages > 10 * 37,
        "the database spans many windows: {pages} pages"
    );

    // Restore into an empty folder: the same files as the live agent.
    let target = tmp.path().join("restored");
    windowed(&store)
        .args(["restore", &id, "--target"])
        .arg(&target)
        .json();
    for part in ["memdir", "sqlite", "state"] {
        assert_same_tree(
            &tree(&agent.root().join(part), false),
            &tree(&target.join(part), false),
            &format!("windowed restore, {part}"),
        );
    }

    // Verify: the same chunks checked, part by part, as in one pass. Its spilled ids are
    // removed, and so is what a killed verify left (a process that cannot exist).
    let whole = TestCommand::new(&store)
        .args(["verify", "--read-data"])
        .json();
    let dead = store.join("tmp/verify-999999999-0123456789abcdef");
    fs::create_dir_all(&dead).expect("mkdir");
    fs::write(dead.join("0"), [7u8; 64]).expect("spill");
    let parts = windowed(&store).args(["verify", "--read-data"]).json();
    let left: Vec<_> = fs::read_dir(store.join("tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "verify leaves no scratch: {left:?}");
    assert_eq!(whole["ok"], true, "{whole:#}");
    assert_eq!(parts["ok"], true, "{parts:#}");
    for key in ["chunks_checked", "bytes_checked", "snapshots_checked"] {
        assert_eq!(whole[key], parts[key], "{key}: {whole:#} {parts:#}");
    }
    let chunks = parts["chunks_checked"].as_u64().unwrap_or(0);
    assert!(chunks > 10 * 37, "several parts: {chunks} chunks");

    // Export: the same artifacts with the same digests, and the bundle imports and restores.
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).expect("mkdir");
    for (name, mut cmd) in [
        ("whole", TestCommand::new(&store)),
        ("windowed", windowed(&store)),
    ] {
        cmd.args(["export", &id, "--out"])
            .arg(out.join(format!("{name}.tar.zst")))
            .json();
    }
    let manifests: Vec<Value> = ["whole", "windowed"]
        .iter()
        .map(|n| {
            TestCommand::new(&tmp.path().join("unused"))
                .arg("verify-bundle")
                .arg(out.join(format!("{n}.tar.zst")))
                .json()
        })
        .collect();
    assert_eq!(manifests[0]["ok"], true, "{:#}", manifests[0]);
    assert_eq!(manifests[1]["ok"], true, "{:#}", manifests[1]);
    let store2 = tmp.path().join("store2");
    TestCommand::new(&store2)
        .arg("import")
        .arg(out.join("windowed.tar.zst"))
        .json();
    let target2 = tmp.path().join("restored2");
    windowed(&store2)
        .args(["restore", &id, "--target"])
        .arg(&target2)
        .json();
    assert_same_tree(
        &tree(&agent.sqlite_dir(), false),
        &tree(&target2.join("sqlite"), false),
        "imported from the windowed export",
    );
    assert_eq!(
        fs::read(out.join("whole.tar.zst")).expect("whole"),
        fs::read(out.join("windowed.tar.zst")).expect("windowed"),
        "windows change nothing in the bundle"
    );
}

#[test]
fn damage_in_any_part_is_found_as_in_one_pass_and_a_failing_window_restores_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = agent(tmp.path());
    let store = tmp.path().join("store");
    let id = str_of(
        &TestCommand::new(&store).snapshot(agent.root()).json(),
        "id",
    )
    .to_owned();
    corrupt_largest_pack(&store);

    let (whole, parts) = verify_damaged(&store);
    assert!(
        !whole["damaged"].as_array().expect("damaged").is_empty(),
        "{whole:#}"
    );
    assert_eq!(whole["damaged"], parts["damaged"], "{whole:#}\n{parts:#}");
    assert_eq!(whole["damaged_snapshots"], parts["damaged_snapshots"]);

    // In place: a window past the first fails its check after files were staged. The live
    // agent is untouched and no staging is left.
    let live = tree(agent.root(), true);
    let out = windowed(&store).args(["restore", &id]).run();
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("damaged") || out.stderr.contains("does not match"),
        "the error names the damage: {out}"
    );
    assert_agent_tree_unchanged(live, &agent, "a restore failing in a later window");
    assert_no_restore_leftovers(&agent);
}

#[test]
fn small_contents_past_the_listed_total_are_streamed_one_by_one() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let notes = walkdir::WalkDir::new(f.agent.memdir())
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();
    assert!(notes > 20, "{notes} files in the memdir");
    let target = f.path("restored");
    f.cmd()
        .env("MEMSNAP_TEST_LISTED_TOTAL", "10")
        .args(["restore", &id, "--target"])
        .arg(&target)
        .json();
    for part in ["memdir", "sqlite", "state"] {
        assert_same_tree(
            &tree(&f.agent.root().join(part), false),
            &tree(&target.join(part), false),
            &format!("restore with 10 chunks listed, {part}"),
        );
    }
    let bundle = f.path("out.tar.zst");
    f.cmd()
        .env("MEMSNAP_TEST_LISTED_TOTAL", "10")
        .args(["export", &id, "--out"])
        .arg(&bundle)
        .json();
    let v = TestCommand::new(&f.path("unused"))
        .arg("verify-bundle")
        .arg(&bundle)
        .json();
    assert_eq!(v["ok"], true, "{v:#}");
}

#[test]
fn verify_splits_into_few_enough_parts_for_a_low_file_limit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = agent(tmp.path());
    let store = tmp.path().join("store");
    TestCommand::new(&store).snapshot(agent.root()).json();
    // One chunk per window: a part per chunk, uncapped, would be a spill file each.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_memsnap"))
        .arg("--store")
        .arg(&store)
        .args(["--window-chunks", "1", "--json", "verify", "--read-data"])
        .env("MEMSNAP_LOG", "error")
        .output()
        .expect("run verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(
        report["chunks_checked"].as_u64().unwrap_or(0) > 500,
        "{report:#}"
    );
}

/// Verify reads leaf nodes after its walk, each once, in pack order (src/ops/verify.rs): a
/// damaged data chunk below a leaf, and a damaged leaf, are found and named with their
/// artifact, in one pass and in parts alike.
#[test]
fn damage_below_a_leaf_and_in_it_is_named_with_its_artifact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = agent(tmp.path());
    let store = tmp.path().join("store");
    TestCommand::new(&store).snapshot(agent.root()).json();

    // A page in the middle of the vector database: far from its root, below a leaf node.
    let db = fs::read(agent.sqlite_dir().join("vector.sqlite")).expect("vector db");
    let page = db
        .chunks(4096)
        .nth(db.len() / 4096 / 2)
        .expect("a middle page");
    let data_id = blake3::hash(page).to_hex().to_string();
    let entries: Vec<(PathBuf, PackEntry)> = pack_files(&store)
        .into_iter()
        .flat_map(|p| footer(&p).into_iter().map(move |e| (p.clone(), e)))
        .collect();
    let find = |pred: &dyn Fn(&PackEntry, &[u8]) -> bool| {
        entries
            .iter()
            .find(|(p, e)| {
                let bytes = fs::read(p).expect("pack");
                let at = e.offset as usize;
                pred(e, &bytes[at..at + e.stored_len as usize])
            })
            .cloned()
    };
    let data = find(&|e, _| e.hex() == data_id).expect("the page's chunk is in a pack");
    // A leaf: a tree node of level 1 (store-format.md, "Tree nodes") stored as it is (neither
    // zstd nor plane-coded: flags 1 and 4) that lists the page's chunk.
    let leaf = find(&|e, b| {
        e.is_tree() && e.flags & 5 == 0 && b.get(1) == Some(&1) && {
            let id = blake3::Hash::from_hex(&data_id).expect("hex");
            b.windows(32).any(|w| w == id.as_bytes())
        }
    })
    .expect("a leaf lists the page");

    for (what, (pack, entry)) in [("data chunk", data), ("leaf node", leaf)] {
        let flip = |pack: &Path| {
            let mut bytes = fs::read(pack).expect("pack");
            bytes[(entry.offset + u64::from(entry.stored_len) / 2) as usize] ^= 0xff;
            fs::write(pack, bytes).expect("write pack");
        };
        flip(&pack);
        let (whole, parts) = verify_damaged(&store);
        let rows = whole["damaged"].as_array().expect("damaged");
        assert!(
            rows.iter()
                .any(|r| r["chunk"] == entry.hex().as_str()
                    && r["artifact"] == "sqlite/vector.sqlite"),
            "the damaged {what} is named with its artifact: {whole:#}"
        );
        assert_eq!(whole["damaged"], parts["damaged"], "{what}: {parts:#}");
        flip(&pack);
        let again = windowed(&store).args(["verify", "--read-data"]).json();
        assert_eq!(again["ok"], true, "{what} mended: {again:#}");
    }
}
