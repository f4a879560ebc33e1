//! The harness around the published nexo-memory-snapshot 0.1.5 (tests/common/nexo.rs, the crate
//! in compat/nexo-0.1.5), proved on that tool's own bundles in
//! tests/fixtures/nexo-memory-snapshot-0.1.5: it verifies them, restores them (plain and age),
//! refuses an age bundle without the matching identity, and verifies what it snapshots itself.
//! These are the oracle for memsnap's import and for the bundles memsnap writes for that tool.
//!
//! The fixtures are read-only: every test works on copies in a temporary folder.

#[path = "common/nexo.rs"]
mod nexo;

use std::path::Path;
use std::process::Command;

use age::secrecy::ExposeSecret;
use nexo::{TEST_RECIPIENT, copy_fixture, nexo, nexo_ok, s};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tempfile::TempDir;

const TENANT: &str = "default";
const AGENT: &str = "ana";
const HEAD_01: &str = "3cb7e362047b493d2fd82fe5b5057c158c777c1c";
const HEAD_04: &str = "9668754d6c364db87b8485bc32f7c85d816a925c";

fn count(db: &Path, table: &str) -> i64 {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "{}", db.display());
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{} {table}: {e}", db.display()))
}

fn git(memdir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(memdir)
        .args(args)
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        memdir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// What the README promises after a restore of 01 (or, with `after_change`, of 04), checked on
/// the agent `ana` restored under `root` by the old tool.
fn assert_restored_agent(root: &Path, after_change: bool) {
    let memdir = root.join("memdir").join(AGENT);
    let head = if after_change { HEAD_04 } else { HEAD_01 };
    assert_eq!(git(&memdir, &["rev-parse", "HEAD"]), head);
    // The old restore copies .git (index included) and the memory files: a clean checkout.
    assert_eq!(git(&memdir, &["status", "--porcelain"]), "");
    for f in [
        "MEMORY.md",
        "topics/projects.md",
        "topics/tools.md",
        "topics/preferences.md",
    ] {
        assert!(memdir.join(f).is_file(), "{f} missing");
    }

    let sqlite = root.join("sqlite").join(AGENT);
    let memories = if after_change { 51 } else { 50 };
    assert_eq!(
        count(&sqlite.join("long_term.sqlite"), "memories"),
        memories
    );
    assert_eq!(count(&sqlite.join("vector.sqlite"), "embeddings"), 200);
    assert_eq!(count(&sqlite.join("concepts.sqlite"), "concepts"), 10);
    assert_eq!(count(&sqlite.join("concepts.sqlite"), "concept_links"), 15);
    assert_eq!(count(&sqlite.join("compactions.sqlite"), "compactions"), 3);

    let state = root.join("state").join(AGENT);
    let cursor = read_json(&state.join("extract_cursor.json"));
    assert_eq!(cursor["agent_id"], AGENT);
    let dream = read_json(&state.join("dream_run.json"));
    assert_eq!(dream["run_id"], "dream-0001");
}

fn assert_full_restore_report(report: &Value, head: &str) {
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["git_reset_oid"], head);
    assert_eq!(
        report["sqlite_restored_dbs"],
        serde_json::json!(["long_term", "vector", "concepts", "compactions"])
    );
    assert_eq!(
        report["state_files_restored"],
        serde_json::json!(["extract_cursor", "dream_run"])
    );
}

fn restore_args<'a>(bundle: &'a str, root: &'a str) -> Vec<&'a str> {
    vec![
        "restore", bundle, "--root", root, "--tenant", TENANT, "--agent", AGENT,
    ]
}

#[test]
fn old_tool_verifies_its_plain_bundles() {
    let tmp = TempDir::new().unwrap();
    for fixture in ["01-plain", "04-plain-after-change"] {
        let bundle = copy_fixture(fixture, &tmp.path().join(fixture));
        let report = nexo_ok(&["verify", s(&bundle)]);
        for key in ["manifest_ok", "bundle_sha256_ok", "per_artifact_ok"] {
            assert_eq!(report[key], true, "{fixture}: {key} in {report}");
        }
        assert_eq!(report["age_protected"], false, "{fixture}: {report}");
        assert_eq!(report["schema_versions"]["manifest"], 1);
    }
}

#[test]
fn old_tool_verifies_its_age_bundle_without_identity() {
    let tmp = TempDir::new().unwrap();
    let bundle = copy_fixture("03-age", tmp.path());
    let report = nexo_ok(&["verify", s(&bundle)]);
    assert_eq!(report["age_protected"], true, "{report}");
    assert_eq!(report["bundle_sha256_ok"], true, "{report}");
}

#[test]
fn old_tool_restores_its_plain_bundles() {
    let tmp = TempDir::new().unwrap();
    for (fixture, after_change) in [("01-plain", false), ("04-plain-after-change", true)] {
        let bundle = copy_fixture(fixture, &tmp.path().join(fixture));
        let root = tmp.path().join(format!("root-{fixture}"));
        let report = nexo_ok(&restore_args(s(&bundle), s(&root)));
        assert_full_restore_report(&report, if after_change { HEAD_04 } else { HEAD_01 });
        assert_restored_agent(&root, after_change);
    }
}

#[test]
fn old_tool_restores_its_age_bundle_with_the_identity() {
    let tmp = TempDir::new().unwrap();
    let bundle = copy_fixture("03-age", &tmp.path().join("in"));
    let identity = tmp.path().join("in/test-identity.txt");
    let root = tmp.path().join("root");
    let mut args = restore_args(s(&bundle), s(&root));
    args.extend(["--identity", s(&identity)]);
    let report = nexo_ok(&args);
    assert_full_restore_report(&report, HEAD_01);
    assert_restored_agent(&root, false);
}

#[test]
fn old_tool_refuses_its_age_bundle_without_a_matching_identity() {
    let tmp = TempDir::new().unwrap();
    let bundle = copy_fixture("03-age", &tmp.path().join("in"));
    let other = tmp.path().join("other-identity.txt");
    let key = age::x25519::Identity::generate();
    std::fs::write(&other, format!("{}\n", key.to_string().expose_secret())).unwrap();

    for (what, identity) in [("no identity", None), ("another identity", Some(&other))] {
        let root = tmp.path().join(what.replace(' ', "-"));
        let mut args = restore_args(s(&bundle), s(&root));
        if let Some(id) = identity {
            args.extend(["--identity", s(id)]);
        }
        let (code, json, stderr) = nexo(&args);
        assert_ne!(code, 0, "{what}: restore succeeded: {json}");
        assert!(json.is_null(), "{what}: {json}");
        assert!(stderr.contains("encryption"), "{what}: {stderr}");
        // Nothing of the agent was written (the tool stages under state-root only).
        for live in ["memdir", "sqlite", "state"] {
            assert!(!root.join(live).exists(), "{what}: {live} was written");
        }
    }
}

#[test]
fn old_tool_snapshot_of_a_restored_agent_verifies_and_restores() {
    let tmp = TempDir::new().unwrap();
    let bundle = copy_fixture("01-plain", &tmp.path().join("in"));
    let identity = tmp.path().join("identity.txt");
    std::fs::copy(
        nexo::fixtures_dir().join("03-age/test-identity.txt"),
        &identity,
    )
    .unwrap();
    let root = tmp.path().join("root");
    nexo_ok(&restore_args(s(&bundle), s(&root)));

    // Plain, then age-encrypted to the fixtures' test key.
    for encrypt in [false, true] {
        let recipient = encrypt.then_some(TEST_RECIPIENT);
        let meta = nexo::snapshot(&root, TENANT, AGENT, "again", recipient);
        assert_eq!(meta["encrypted"], encrypt, "{meta}");
        assert_eq!(meta["git_oid"], HEAD_01, "{meta}");
        assert_eq!(meta["label"], "again");
        let new_bundle = meta["bundle"].as_str().expect("bundle path").to_string();
        assert!(Path::new(&new_bundle).is_file());
        assert!(Path::new(meta["sha256_file"].as_str().unwrap()).is_file());

        let report = nexo_ok(&["verify", &new_bundle]);
        assert_eq!(report["age_protected"], encrypt, "{report}");
        for key in ["manifest_ok", "bundle_sha256_ok", "per_artifact_ok"] {
            assert_eq!(report[key], true, "{key} in {report}");
        }

        // And it restores to the same agent elsewhere.
        let again = tmp.path().join(format!("again-{encrypt}"));
        let mut args = restore_args(&new_bundle, s(&again));
        if encrypt {
            args.extend(["--identity", s(&identity)]);
        }
        let report = nexo_ok(&args);
        assert_full_restore_report(&report, HEAD_01);
        assert_restored_agent(&again, false);
    }
}
