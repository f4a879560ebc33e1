//! memsnap and nexo-memory-snapshot 0.1.5, each reading the other's bundles: memsnap's exports
//! (default framing, `--level`, age, `--redact`) pass that tool's own verify and restore to the
//! same agent, and bundles the tool writes now (plain and age) import into memsnap and restore.
//! The old tool runs through the harness in tests/common/nexo.rs.

mod common;
#[path = "common/nexo.rs"]
mod nexo;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memsnap::sample::SampleAgent;
use nexo::{TEST_RECIPIENT, nexo_ok, s};
use serde_json::Value;

fn identity(dir: &Path) -> PathBuf {
    let to = dir.join("test-identity.txt");
    fs::copy(nexo::fixtures_dir().join("03-age/test-identity.txt"), &to).expect("copy identity");
    to
}

/// The agent the old tool restored under `root`, seen through the layout `SampleAgent` reads
/// (ROOT/memdir, ROOT/sqlite, ROOT/state), by symlinks.
fn old_layout_view(root: &Path, view: &Path) -> SampleAgent {
    fs::create_dir_all(view).expect("mkdir view");
    for part in ["memdir", "sqlite", "state"] {
        std::os::unix::fs::symlink(root.join(part).join(AGENT), view.join(part)).expect("symlink");
    }
    SampleAgent::open(view)
}

/// Files outside `.git`, path → bytes (the old tool restores neither modes nor folders).
fn notes(memdir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(memdir).follow_links(true) {
        let e = e.expect("walk");
        let rel = e
            .path()
            .strip_prefix(memdir)
            .expect("rel")
            .to_string_lossy()
            .into_owned();
        if e.file_type().is_file() && !rel.starts_with(".git") {
            out.insert(rel, fs::read(e.path()).expect("read"));
        }
    }
    out
}

#[test]
fn memsnap_exports_pass_the_old_tools_verify_and_restore() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    let live_notes = notes(&f.agent.memdir());
    let keys = f.path("keys");
    fs::create_dir_all(&keys).expect("mkdir");
    let identity = identity(&keys);
    fs::create_dir_all(f.path("out")).expect("mkdir");

    let cases: [(&str, &[&str], bool); 3] = [
        ("framed", &[], false),
        ("level", &["--level", "5"], false),
        ("age", &["--encrypt-to", TEST_RECIPIENT], true),
    ];
    for (name, args, encrypted) in cases {
        let ext = if encrypted { "tar.zst.age" } else { "tar.zst" };
        let bundle = f.path(&format!("out/{name}.{ext}"));
        f.cmd()
            .args(["export", &id, "--out"])
            .arg(&bundle)
            .args(args)
            .json();

        let report = nexo_ok(&["verify", s(&bundle)]);
        assert_eq!(report["age_protected"], encrypted, "{name}: {report}");
        for key in ["manifest_ok", "bundle_sha256_ok", "per_artifact_ok"] {
            assert_eq!(report[key], true, "{name}: {key} in {report}");
        }

        let root = f.path(&format!("old-{name}"));
        let key = encrypted.then_some(identity.as_path());
        let restored = nexo::restore(&bundle, &root, TENANT, AGENT, key);
        assert_eq!(
            restored["sqlite_restored_dbs"],
            serde_json::json!(["long_term", "vector", "concepts", "compactions"]),
            "{name}: {restored}"
        );
        let view = old_layout_view(&root, &f.path(&format!("view-{name}")));
        assert_eq!(
            view.row_counts().expect("rows"),
            image.rows,
            "{name}: the old tool restored every row"
        );
        assert_eq!(
            view.git_head().expect("head"),
            image.head,
            "{name}: git HEAD"
        );
        assert_eq!(notes(&view.memdir()), live_notes, "{name}: memory files");
        for state in ["extract_cursor.json", "dream_run.json"] {
            let a: Value =
                serde_json::from_slice(&fs::read(f.agent.state_dir().join(state)).expect("live"))
                    .expect("json");
            let b: Value =
                serde_json::from_slice(&fs::read(view.state_dir().join(state)).expect("restored"))
                    .expect("json");
            assert_eq!(a, b, "{name}: {state}");
        }
    }
}

#[test]
fn a_redacted_export_passes_the_old_tools_verify_and_restore() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/redacted.tar.zst");
    f.cmd()
        .args(["export", &id, "--redact", "--out"])
        .arg(&bundle)
        .json();
    let report = nexo_ok(&["verify", s(&bundle)]);
    for key in ["manifest_ok", "bundle_sha256_ok", "per_artifact_ok"] {
        assert_eq!(report[key], true, "{key} in {report}");
    }
    // Without .git the old tool restores the notes and the databases.
    let root = f.path("old");
    nexo::restore(&bundle, &root, TENANT, AGENT, None);
    let view = old_layout_view(&root, &f.path("view"));
    assert_eq!(view.row_counts().expect("rows"), image.rows);
    assert_eq!(notes(&view.memdir()), notes(&f.agent.memdir()));
}

#[test]
fn bundles_the_old_tool_writes_now_import_into_memsnap() {
    let f = Fixture::new();
    let keys = f.path("keys");
    fs::create_dir_all(&keys).expect("mkdir");
    let identity = identity(&keys);
    // Give the old tool an agent: memsnap's sample agent, restored into its layout.
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let ours = f.path("out/ours.tar.zst");
    f.cmd().args(["export", &id, "--out"]).arg(&ours).json();
    let root = f.path("old");
    nexo::restore(&ours, &root, TENANT, AGENT, None);
    let view = old_layout_view(&root, &f.path("view"));
    let rows = view.row_counts().expect("rows");

    for encrypt in [false, true] {
        let recipient = encrypt.then_some(TEST_RECIPIENT);
        let meta = nexo::snapshot(&root, TENANT, AGENT, "from-nexo", recipient);
        let bundle = PathBuf::from(meta["bundle"].as_str().expect("bundle"));
        let store = f.path(&format!("store-{encrypt}"));
        let mut cmd = TestCommand::new(&store);
        cmd.arg("import").arg(&bundle);
        if encrypt {
            cmd.arg("--identity").arg(&identity);
        }
        let imp = cmd.json();
        assert_eq!(imp["written_by"], "nexo-memory-snapshot", "{imp:#}");
        assert_eq!(imp["encrypted"], encrypt);
        assert_eq!(imp["snapshot"]["label"], "from-nexo");
        let snap = str_of(&imp["snapshot"], "id").to_owned();
        let target = f.path(&format!("restored-{encrypt}"));
        TestCommand::new(&store)
            .args(["restore", &snap, "--target"])
            .arg(&target)
            .json();
        let back = SampleAgent::open(&target);
        assert_eq!(back.row_counts().expect("rows"), rows, "encrypt={encrypt}");
        assert_eq!(
            back.git_head().expect("head"),
            view.git_head().expect("head")
        );
        assert_eq!(notes(&back.memdir()), notes(&view.memdir()));
    }
}
