//! Portable bundles end to end: export → import → restore round trips, deduplication on import,
//! the nexo-memory-snapshot 0.1.5 fixtures (plain and age), and the bundle layout checked field
//! by field against the fixtures. Hostile bundles are in tests/bundle_hostile.rs.

mod common;
#[path = "common/nexo.rs"]
mod nexo;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use nexo::copy_fixture;
use serde_json::Value;

fn git_head(memdir: &Path) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(memdir)
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git rev-parse in {}",
        memdir.display()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn count(db: &Path, table: &str) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open db");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(ok, "ok", "{}", db.display());
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn export(f: &Fixture, snap: &str, out: &Path, extra: &[&str]) -> Value {
    f.cmd()
        .args(["export", snap, "--out"])
        .arg(out)
        .args(extra)
        .json()
}

/// Names the files that differ, not their bytes.
fn assert_same_files(
    before: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
    what: &str,
) {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let differ: Vec<&String> = names
        .into_iter()
        .filter(|n| before.get(*n) != after.get(*n))
        .collect();
    assert!(differ.is_empty(), "{what} changed the store: {differ:?}");
}

#[test]
fn export_import_restore_round_trip_on_a_second_store() {
    let f = Fixture::new();
    let snap = f
        .cmd()
        .snapshot(f.agent.root())
        .args(["--label", "moved"])
        .json();
    let id = str_of(&snap, "id").to_owned();
    let image = AgentImage::capture(&f.agent);
    let bundle = f.path("out/ana.tar.zst");
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let rep = export(&f, &id, &bundle, &[]);
    assert_eq!(str_of(&rep, "snapshot_id"), id);
    let sha = fs::read_to_string(f.path("out/ana.tar.zst.sha256")).expect("sibling");
    assert_eq!(sha.len(), 64, "hex digest without newline: {sha:?}");
    assert_eq!(sha, str_of(&rep, "sha256"));

    // verify-bundle: every check ok.
    let v = TestCommand::new(&f.path("unused-store"))
        .args(["verify-bundle"])
        .arg(&bundle)
        .json();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["complete"], true, "{v:#}");
    assert!(
        !f.path("unused-store").exists(),
        "verify-bundle needs no store"
    );

    // Import into a second store: same id, tenant, agent, label, time.
    let store2 = f.path("store2");
    let imp = TestCommand::new(&store2).arg("import").arg(&bundle).json();
    assert_eq!(imp["snapshot"]["id"], id.as_str());
    assert_eq!(imp["already_present"], false);
    let orig = f.cmd().args(["show", &id]).json();
    let copy = TestCommand::new(&store2).args(["show", &id]).json();
    for k in [
        "id",
        "tenant",
        "agent",
        "label",
        "created_at_ms",
        "created_by",
        "git",
        "schema_versions",
    ] {
        assert!(!orig[k].is_null(), "show --json has {k}");
        assert_eq!(orig[k], copy[k], "field {k}\n{orig:#}\n{copy:#}");
    }
    // Identical entries (kind, mode, size, hash), so the content is the same snapshot.
    assert_eq!(orig["entries"], copy["entries"]);

    // Restore from the second store into a fresh folder: identical files and rows.
    let target = f.path("restored");
    let restored = restore_to(&store2, &id, &target);
    assert_same_tree(&image.memdir, &tree(&restored.memdir(), true), "memdir");
    assert_same_tree(&image.state, &tree(&restored.state_dir(), false), "state");
    assert_eq!(restored.row_counts().expect("rows"), image.rows);
    assert_eq!(restored.git_head().expect("head"), image.head);
    TestCommand::new(&store2)
        .args(["verify", "--read-data"])
        .json();

    // Importing again is a no-op, in either store.
    let again = TestCommand::new(&store2).arg("import").arg(&bundle).json();
    assert_eq!(again["already_present"], true);
    let here = f.cmd().arg("import").arg(&bundle).json();
    assert_eq!(here["already_present"], true);
    assert_eq!(f.list_ids(), vec![id.clone()]);
}

#[test]
fn a_recompressed_export_holds_the_same_snapshot() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let framed = f.path("out/framed.tar.zst");
    let whole = f.path("out/whole.tar.zst");
    export(&f, &id, &framed, &[]);
    export(&f, &id, &whole, &["--level", "9"]);
    // Same tar stream byte for byte, whichever zstd framing carries it.
    assert_eq!(decompressed(&framed), decompressed(&whole));
    for b in [&framed, &whole] {
        let v = TestCommand::new(&f.store)
            .arg("verify-bundle")
            .arg(b)
            .json();
        assert_eq!(v["ok"], true, "{v:#}");
    }
    let imp = TestCommand::new(&f.path("store2"))
        .arg("import")
        .arg(&whole)
        .json();
    assert_eq!(imp["snapshot"]["id"], id.as_str());
    let o = f
        .cmd()
        .args(["export", &id, "--level", "23", "--out"])
        .arg(f.path("out/x"))
        .run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(o.stderr.contains("between 1 and 22"), "{o}");
}

#[test]
fn importing_a_bundle_of_a_known_agent_stores_only_the_difference() {
    let f = Fixture::new();
    let first = f.snapshot_id();
    f.agent.update_day(7, 0.02).expect("update day");
    f.agent.append_day(8, 0.02).expect("append day");
    let second = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let b1 = f.path("out/first.tar.zst");
    let b2 = f.path("out/second.tar.zst");
    export(&f, &first, &b1, &[]);
    export(&f, &second, &b2, &[]);

    let store2 = f.path("store2");
    let i1 = TestCommand::new(&store2).arg("import").arg(&b1).json();
    let i2 = TestCommand::new(&store2).arg("import").arg(&b2).json();
    let logical = i2["snapshot"]["logical_bytes"].as_u64().expect("logical");
    let new1 = i1["snapshot"]["stats"]["new_raw_bytes"]
        .as_u64()
        .expect("new");
    let new2 = i2["snapshot"]["stats"]["new_raw_bytes"]
        .as_u64()
        .expect("new");
    // The second bundle is whole, but only its changed pages and files are new to the store.
    assert!(
        new1 > logical / 2,
        "first import stores the data: {new1} of {logical}"
    );
    assert!(
        new2 < logical / 5,
        "second import stored {new2} new bytes of {logical}: it should store the difference"
    );
    // And the original store, which has both, gains nothing but can re-import nothing.
    let again = f.cmd().arg("import").arg(&b2).json();
    assert_eq!(again["already_present"], true);
}

#[test]
fn restore_from_a_bundle_replaces_the_live_agent_with_a_pre_restore_snapshot() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/b.tar.zst");
    export(&f, &id, &bundle, &[]);
    f.agent.append_day(3, 0.05).expect("append");
    fs::write(f.agent.memdir().join("new-note.md"), "# new\n").expect("write");

    // A store that never saw the agent: it must be told where the agent lives.
    let store2 = f.path("store2");
    let out = TestCommand::new(&store2)
        .args(["restore", "--bundle"])
        .arg(&bundle)
        .assert_exit_code(2);
    assert!(out.stderr.contains("--source"), "{out}");
    let r = TestCommand::new(&store2)
        .args(["restore", "--bundle"])
        .arg(&bundle)
        .arg("--source")
        .arg(f.agent.root())
        .json();
    assert_eq!(r["import"]["snapshot"]["id"], id.as_str());
    let pre = r["restore"]["pre_snapshot_id"]
        .as_str()
        .expect("pre-restore snapshot")
        .to_owned();
    image.assert_matches(&f.agent, "restore --bundle");
    // The pre-restore snapshot holds the state before: the new note.
    let show = TestCommand::new(&store2).args(["show", &pre]).json();
    assert!(
        show["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["path"] == "new-note.md"),
        "{show:#}"
    );

    // The original store knows the agent: no --source needed; the tenant/agent check holds.
    let out = f
        .cmd()
        .args(["restore", "--bundle"])
        .arg(&bundle)
        .args(["--tenant", "acme", "--agent", "bob"])
        .run();
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(
        out.stderr.contains("acme/ana") && out.stderr.contains("bob"),
        "{out}"
    );
    f.cmd().args(["restore", "--bundle"]).arg(&bundle).json();
    image.assert_matches(&f.agent, "restore --bundle into a known agent");
}

#[test]
fn the_three_fixture_bundles_import_and_restore_with_the_expected_content() {
    let f = Fixture::new();
    let dir = f.path("fixtures");
    fs::create_dir_all(&dir).expect("mkdir");
    let cases = [
        (
            "01-plain",
            None,
            "3cb7e362047b493d2fd82fe5b5057c158c777c1c",
            50,
        ),
        (
            "03-age",
            Some("test-identity.txt"),
            "3cb7e362047b493d2fd82fe5b5057c158c777c1c",
            50,
        ),
        (
            "04-plain-after-change",
            None,
            "9668754d6c364db87b8485bc32f7c85d816a925c",
            51,
        ),
    ];
    for (case, identity, head, memories) in cases {
        let d = dir.join(case);
        fs::create_dir_all(&d).expect("mkdir");
        let bundle = copy_fixture(case, &d);
        let mut cmd = f.cmd();
        cmd.arg("import").arg(&bundle);
        if let Some(i) = identity {
            cmd.arg("--identity").arg(d.join(i));
        }
        let imp = cmd.json();
        assert_eq!(imp["written_by"], "nexo-memory-snapshot", "{imp:#}");
        assert_eq!(imp["snapshot"]["tenant"], "default");
        assert_eq!(imp["snapshot"]["agent"], "ana");
        assert_eq!(imp["snapshot"]["git"]["head_oid"], head);
        let id = str_of(&imp["snapshot"], "id").to_owned();
        let target = f.path(&format!("restored-{case}"));
        f.restore_into(&id, &target);
        assert_eq!(git_head(&target.join("memdir")), head, "{case}");
        let sq = target.join("sqlite");
        assert_eq!(
            count(&sq.join("long_term.sqlite"), "memories"),
            memories,
            "{case}"
        );
        assert_eq!(
            count(&sq.join("vector.sqlite"), "embeddings"),
            200,
            "{case}"
        );
        assert_eq!(count(&sq.join("concepts.sqlite"), "concepts"), 10, "{case}");
        assert_eq!(
            count(&sq.join("concepts.sqlite"), "concept_links"),
            15,
            "{case}"
        );
        assert_eq!(
            count(&sq.join("compactions.sqlite"), "compactions"),
            3,
            "{case}"
        );
        for s in ["extract_cursor.json", "dream_run.json"] {
            let bytes = fs::read(target.join("state").join(s)).expect("state file");
            serde_json::from_slice::<Value>(&bytes).expect("state JSON");
        }
        assert!(target.join("memdir/MEMORY.md").is_file());
        assert!(target.join("memdir/topics/tools.md").is_file());
    }
    // 01 and 03 hold the same content: the second import stored (almost) nothing new.
    f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(f.list().len(), 3);
}

#[test]
fn the_age_fixture_fails_cleanly_without_its_identity() {
    let f = Fixture::new();
    f.snapshot();
    let before = store_files(&f.store);
    let listed = f.list();
    let d = f.path("age");
    fs::create_dir_all(&d).expect("mkdir");
    let bundle = copy_fixture("03-age", &d);

    let out = f.cmd().arg("import").arg(&bundle).run();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("--identity"), "{out}");

    let other = d.join("other-identity.txt");
    fs::write(
        &other,
        "AGE-SECRET-KEY-1GQ9778VQXMMJVE8SK7J6VT8UJ4HDQAJUVSFCWCM02D8GEWQ72PVQ2Y5J33\n",
    )
    .expect("write identity");
    let out = f
        .cmd()
        .arg("import")
        .arg(&bundle)
        .arg("--identity")
        .arg(&other)
        .run();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("none of the keys"), "{out}");
    assert_same_files(&before, &store_files(&f.store), "a refused import");
    assert_eq!(f.list(), listed);

    // verify-bundle without the identity checks what it can and says what it could not.
    let v = TestCommand::new(&f.store)
        .arg("verify-bundle")
        .arg(&bundle)
        .json();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["complete"], false, "{v:#}");
    let with = TestCommand::new(&f.store)
        .arg("verify-bundle")
        .arg(&bundle)
        .arg("--identity")
        .arg(d.join("test-identity.txt"))
        .json();
    assert_eq!(with["complete"], true, "{with:#}");
    assert_eq!(
        with["artifacts"].as_array().expect("artifacts").len(),
        44,
        "{with:#}"
    );
}

#[test]
fn an_exported_bundle_has_the_fixture_layout_field_by_field() {
    let f = Fixture::new();
    let snap = f
        .cmd()
        .snapshot(f.agent.root())
        .args(["--label", "ref"])
        .json();
    let id = str_of(&snap, "id").to_owned();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/b.tar.zst");
    export(&f, &id, &bundle, &[]);
    let ours = decompressed(&bundle);
    let d = f.path("fx");
    fs::create_dir_all(&d).expect("mkdir");
    let theirs = decompressed(&copy_fixture("01-plain", &d));

    let (mo, mt) = (manifest_of(&ours), manifest_of(&theirs));
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object().expect("object").keys().cloned().collect()
    };
    // Every field the old tool writes, with the same JSON type; ours adds only `memsnap`.
    let mut expected = keys(&mt);
    expected.insert("memsnap".into());
    assert_eq!(keys(&mo), expected);
    for k in keys(&mt) {
        let ty = |v: &Value| match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        assert_eq!(ty(&mo[&k]), ty(&mt[&k]), "type of {k}");
        if let Value::Object(o) = &mt[&k] {
            assert_eq!(keys(&mo[&k]), o.keys().cloned().collect(), "fields of {k}");
        }
    }
    assert_eq!(mo["manifest_version"], mt["manifest_version"]);
    assert_eq!(mo["bundle_format"], mt["bundle_format"]);
    assert_eq!(mo["schema_versions"], mt["schema_versions"]);
    assert_eq!(keys(&mo["artifacts"][0]), keys(&mt["artifacts"][0]));
    let kinds_t: BTreeSet<&str> = mt["artifacts"]
        .as_array()
        .expect("a")
        .iter()
        .map(|a| a["kind"].as_str().expect("kind"))
        .collect();
    for a in mo["artifacts"].as_array().expect("artifacts") {
        let kind = a["kind"].as_str().expect("kind");
        assert!(
            kinds_t.contains(kind),
            "kind {kind} is one the old tool writes"
        );
    }

    // Entries: manifest first, then in the old tool's order; GNU headers, mode 0600, mtime 0,
    // regular files, sizes and digests as the manifest says; the seal over the digests.
    let entries = tar_entries(&ours);
    let rank = |p: &str| {
        ["sqlite/", "state/", "memory_files/", "git/"]
            .iter()
            .position(|pre| p.starts_with(pre))
            .expect("known prefix")
    };
    let ranks: Vec<usize> = entries[1..].iter().map(|(p, _, _)| rank(p)).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "order {ranks:?}");
    let (_, th, _) = &tar_entries(&theirs)[1];
    for (path, h, data) in &entries {
        assert!(h.as_gnu().is_some(), "{path}: GNU header");
        assert_eq!(h.mode().expect("mode"), 0o600, "{path}");
        assert_eq!(
            h.mtime().expect("mtime"),
            th.mtime().expect("mtime"),
            "{path}"
        );
        assert_eq!(h.entry_type(), tar::EntryType::Regular, "{path}");
        // Owner fields (uid, gid, uname, gname) as the old tool leaves them.
        assert_eq!(
            h.as_bytes()[108..124],
            th.as_bytes()[108..124],
            "{path}: uid/gid"
        );
        assert_eq!(
            h.as_bytes()[265..329],
            th.as_bytes()[265..329],
            "{path}: uname/gname"
        );
        assert_eq!(
            h.as_bytes()[257..265],
            th.as_bytes()[257..265],
            "{path}: GNU magic"
        );
        if path == "manifest.json" {
            continue;
        }
        let a = mo["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .chain(mo["memsnap"]["extra_artifacts"].as_array().expect("extra"))
            .find(|a| a["path_in_bundle"] == path.as_str())
            .unwrap_or_else(|| panic!("{path} is in the manifest"));
        assert_eq!(a["size_bytes"].as_u64(), Some(data.len() as u64), "{path}");
        use sha2::Digest;
        assert_eq!(
            a["sha256"],
            hex::encode(sha2::Sha256::digest(data)),
            "{path}"
        );
    }
    let mut concat = String::new();
    for a in mo["artifacts"].as_array().expect("artifacts") {
        concat.push_str(a["sha256"].as_str().expect("sha"));
    }
    use sha2::Digest;
    assert_eq!(
        mo["bundle_sha256"],
        hex::encode(sha2::Sha256::digest(concat.as_bytes()))
    );
    // The sibling holds the file's digest, no newline, as the fixtures'.
    let sib = fs::read(f.path("out/b.tar.zst.sha256")).expect("sibling");
    assert_eq!(
        sib,
        hex::encode(sha2::Sha256::digest(fs::read(&bundle).expect("bundle"))).into_bytes()
    );
}

#[test]
fn export_refuses_bad_recipients_and_existing_files_before_writing() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let out = f.path("out/b.tar.zst.age");
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(&out)
        .args(["--encrypt-to", "age1notarealkey"])
        .run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(o.stderr.contains("invalid recipient"), "{o}");
    assert_eq!(
        fs::read_dir(f.path("out")).expect("ls").count(),
        0,
        "nothing written"
    );

    fs::write(&out, b"precious").expect("write");
    let o = f.cmd().args(["export", &id, "--out"]).arg(&out).run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(o.stderr.contains("already exists"), "{o}");
    assert_eq!(fs::read(&out).expect("read"), b"precious");
}

#[test]
fn an_encrypted_export_imports_with_its_identity_only() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let d = f.path("keys");
    fs::create_dir_all(&d).expect("mkdir");
    // The fixture's throwaway key pair.
    let identity = copy_fixture("03-age", &d).with_file_name("test-identity.txt");
    let recipient = "age1dlaac65wd8367dddxt8l4epq7muv6gx6nfkqzxmjgl9mm20sd9msy5s5ad";
    let bundle = f.path("out/b.tar.zst.age");
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let rep = export(&f, &id, &bundle, &["--encrypt-to", recipient]);
    assert_eq!(rep["encrypted_to"][0], &recipient[recipient.len() - 8..]);
    let head = fs::read(&bundle).expect("read");
    assert!(head.starts_with(b"age-encryption.org/v1"), "age file");

    let store2 = f.path("store2");
    let o = TestCommand::new(&store2).arg("import").arg(&bundle).run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    let imp = TestCommand::new(&store2)
        .arg("import")
        .arg(&bundle)
        .arg("--identity")
        .arg(&identity)
        .json();
    assert_eq!(imp["encrypted"], true);
    assert_eq!(imp["snapshot"]["id"], id.as_str());
}

#[test]
fn an_export_killed_before_its_rename_leaves_no_bundle() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/b.tar.zst");
    f.cmd()
        .env("MEMSNAP_FAILPOINT", "export:before-rename")
        .args(["export", &id, "--redact", "--out"])
        .arg(&bundle)
        .assert_crashed();
    let scratch = |f: &Fixture| -> Vec<String> {
        fs::read_dir(f.store.join("tmp"))
            .expect("store tmp")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("export-"))
            .collect()
    };
    assert_eq!(
        scratch(&f).len(),
        1,
        "the killed export's redaction scratch folder"
    );
    // Whole or absent: never a bundle under its name that is not complete.
    assert!(!bundle.exists(), "a bundle appeared before it was complete");
    // The next export writes it (a leftover temporary file is hidden and does not block it).
    export(&f, &id, &bundle, &[]);
    let v = TestCommand::new(&f.store)
        .arg("verify-bundle")
        .arg(&bundle)
        .json();
    assert_eq!(v["ok"], true, "{v:#}");
}

#[test]
fn symlinks_modes_empty_files_and_non_utf8_names_survive_a_bundle() {
    let f = Fixture::decorated();
    let id = f.snapshot_id();
    let image = AgentImage::capture(&f.agent);
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/decorated.tar.zst");
    export(&f, &id, &bundle, &[]);
    let store2 = f.path("store2");
    let imp = TestCommand::new(&store2).arg("import").arg(&bundle).json();
    assert_eq!(imp["snapshot"]["id"], id.as_str());
    // The same entries as the original snapshot: kinds, modes, sizes, hashes, link targets.
    let orig = f.cmd().args(["show", &id]).json();
    let copy = TestCommand::new(&store2).args(["show", &id]).json();
    assert_eq!(orig["entries"], copy["entries"]);
    let target = f.path("restored");
    let restored = restore_to(&store2, &id, &target);
    assert_same_tree(&image.memdir, &tree(&restored.memdir(), true), "memdir");
    assert_eq!(restored.row_counts().expect("rows"), image.rows);
}

#[test]
fn an_import_killed_before_its_commit_leaves_no_snapshot_and_prune_collects_its_packs() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/b.tar.zst");
    export(&f, &id, &bundle, &[]);
    let store2 = f.path("store2");
    TestCommand::new(&store2).arg("init").json();
    TestCommand::new(&store2)
        .env("MEMSNAP_FAILPOINT", "import:before-commit")
        .arg("import")
        .arg(&bundle)
        .assert_crashed();
    // Never half visible: no snapshot, and what the import wrote is unreferenced.
    let list = TestCommand::new(&store2).arg("list").json();
    assert_eq!(list, serde_json::json!([]), "{list:#}");
    let plan = TestCommand::new(&store2)
        .args(["prune", "--dry-run"])
        .json();
    assert!(plan["packs_orphaned"].as_u64().unwrap_or(0) > 0, "{plan:#}");
    TestCommand::new(&store2).arg("prune").json();
    // The next import works from scratch.
    let imp = TestCommand::new(&store2).arg("import").arg(&bundle).json();
    assert_eq!(imp["snapshot"]["id"], id.as_str());
    TestCommand::new(&store2)
        .args(["verify", "--read-data"])
        .json();
}

#[test]
fn bundle_usage_errors_are_refused_before_anything_changes() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let live = tree(f.agent.root(), true);
    let before = store_files(&f.store);
    let listed = f.list();
    // --identity without --bundle would otherwise be dropped silently by a live restore.
    let o = f
        .cmd()
        .args(["restore", &id, "--identity", "key.txt"])
        .run();
    assert_eq!(o.status.code(), Some(2), "{o}");
    assert!(o.stderr.contains("--identity goes with --bundle"), "{o}");
    // Half an agent spec (--agent without --tenant) is a usage error, not ignored.
    let o = f
        .cmd()
        .args(["export", &id, "--agent", "bob", "--out", "x"])
        .run();
    assert_eq!(o.status.code(), Some(2), "{o}");
    // A dry run cannot import: refused, pointing at verify-bundle.
    let o = f
        .cmd()
        .args(["restore", "--bundle", "b.tar.zst", "--dry-run"])
        .run();
    assert_eq!(o.status.code(), Some(2), "{o}");
    // A missing --out folder, a missing bundle: clear errors, and no store is created for it.
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(f.path("nodir/b.tar.zst"))
        .run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(o.stderr.contains("does not exist"), "{o}");
    let fresh = f.path("fresh-store");
    let o = TestCommand::new(&fresh)
        .arg("import")
        .arg(f.path("nofile.tar.zst"))
        .run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(o.stderr.contains("does not exist"), "{o}");
    assert!(!fresh.exists(), "a missing bundle created a store");
    assert_agent_tree_unchanged(live, &f.agent, "refused bundle commands");
    assert_same_files(&before, &store_files(&f.store), "refused bundle commands");
    assert_eq!(f.list(), listed);
}

#[test]
fn a_different_snapshot_under_a_known_id_is_refused() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/b.tar.zst");
    export(&f, &id, &bundle, &[]);
    // A genuine bundle of other content, relabelled with the first snapshot's id (the id is not
    // under the seal).
    f.agent.append_day(3, 0.02).expect("append");
    let other = f.snapshot_id();
    let b2 = f.path("out/other.tar.zst");
    export(&f, &other, &b2, &[]);
    let plain = decompressed(&b2);
    let mut entries = tar_entries(&plain);
    let mut m: Value = serde_json::from_slice(&entries[0].2).expect("manifest");
    m["snapshot_id"] = Value::String(id.clone());
    entries[0].2 = serde_json::to_vec_pretty(&m).expect("json");
    let mut tar = tar::Builder::new(Vec::new());
    for (path, mut h, data) in entries {
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, &path, data.as_slice())
            .expect("append");
    }
    let forged = f.path("out/forged.tar.zst");
    let z = zstd::encode_all(tar.into_inner().expect("tar").as_slice(), 3).expect("zstd");
    fs::write(&forged, &z).expect("write");
    use sha2::Digest;
    fs::write(
        f.path("out/forged.tar.zst.sha256"),
        hex::encode(sha2::Sha256::digest(&z)),
    )
    .expect("sha");
    f.cmd().args(["delete", &other]).json();
    let before = store_files(&f.store);
    let listed = f.list();
    let o = f.cmd().arg("import").arg(&forged).run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(
        o.stderr.contains("already holds a different snapshot"),
        "{o}"
    );
    assert_same_files(&before, &store_files(&f.store), "a refused id conflict");
    assert_eq!(f.list(), listed);
}

#[test]
fn an_export_of_a_damaged_chunk_fails_naming_its_pack_and_leaves_nothing() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let pack = corrupt_largest_pack(&f.store);
    let stem = pack
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .expect("pack name");
    let out = f.path("out");
    fs::create_dir_all(&out).expect("mkdir");
    // The default export reads the store once, checking each chunk as it writes it; a
    // recompressed one checks them in a first pass.
    for extra in [&[][..], &["--level", "3"][..]] {
        let bundle = out.join("b.tar.zst");
        let run = f
            .cmd()
            .args(["export", &id, "--out"])
            .arg(&bundle)
            .args(extra)
            .run();
        assert!(!run.status.success(), "{extra:?}: exported\n{run}");
        assert!(
            run.stderr.contains(&stem),
            "{extra:?}: names the pack\n{run}"
        );
        let left = entries_in(&out);
        assert!(left.is_empty(), "{extra:?}: left behind {left:?}");
    }
}

#[test]
fn an_index_entry_whose_length_disagrees_with_its_raw_chunk_stops_the_export() {
    let f = Fixture::new();
    // Incompressible bytes: stored as raw chunks.
    let mut noise = vec![0u8; 200_000];
    blake3::Hasher::new()
        .update(b"noise")
        .finalize_xof()
        .fill(&mut noise);
    fs::write(f.agent.memdir().join("noise.bin"), &noise).expect("noise");
    let id = f.snapshot_id();
    // One raw chunk's entry says a byte less than the chunk holds: its bytes still hash right.
    let db = redb::Database::create(f.store.join("index.redb")).expect("index");
    let tx = db.begin_write().expect("write tx");
    {
        use redb::ReadableTable;
        let def: redb::TableDefinition<[u8; 32], [u8; 33]> = redb::TableDefinition::new("chunks");
        let mut t = tx.open_table(def).expect("chunks table");
        let raw_len = |v: &[u8; 33]| u32::from_le_bytes([v[28], v[29], v[30], v[31]]);
        let (key, mut value) = t
            .iter()
            .expect("iter")
            .map(|e| e.expect("entry"))
            .map(|(k, v)| (k.value(), v.value()))
            .find(|(_, v)| v[32] == 0 && raw_len(v) > 4096)
            .expect("a raw chunk");
        let shorter = raw_len(&value) - 1;
        value[28..32].copy_from_slice(&shorter.to_le_bytes());
        t.insert(key, value).expect("insert");
    }
    tx.commit().expect("commit");
    drop(db);
    let out = f.path("out");
    fs::create_dir_all(&out).expect("mkdir");
    for extra in [&[][..], &["--level", "3"][..]] {
        let run = f
            .cmd()
            .args(["export", &id, "--out"])
            .arg(out.join("b.tar.zst"))
            .args(extra)
            .run();
        assert!(!run.status.success(), "{extra:?}: exported\n{run}");
        assert!(
            run.stderr.contains("the index says"),
            "{extra:?}: names the disagreement\n{run}"
        );
        let left = entries_in(&out);
        assert!(left.is_empty(), "{extra:?}: left behind {left:?}");
    }
}
