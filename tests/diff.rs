//! `memsnap diff`: known changes between two snapshots of the sample agent are reported exactly.

mod common;

use std::fs;
use std::path::Path;

use common::{Fixture, git};
use serde_json::{Value, json};

fn sql(db: &Path, batch: &str) {
    let c = rusqlite::Connection::open(db).expect("open database");
    c.execute_batch(batch).expect("SQL");
}

const EDITED: &str = "topics/rust-async.md";
const ADDED: &str = "topics/new-note.md";

/// Snapshot A, the known changes, snapshot B.
fn two_snapshots(f: &Fixture) -> (String, String) {
    let a = f.snapshot_id();
    let db = f.agent.sqlite_dir();
    sql(
        &db.join("long_term.sqlite"),
        "INSERT INTO memories(kind, content, created_at, importance) VALUES
            ('fact', 'diff one', 1, 0.1), ('fact', 'diff two', 2, 0.2),
            ('fact', 'diff three', 3, 0.3);",
    );
    sql(
        &db.join("vector.sqlite"),
        "DELETE FROM embeddings WHERE id IN (1, 2);",
    );
    sql(
        &db.join("concepts.sqlite"),
        "UPDATE concepts SET salience = 0.125 WHERE id = 1;",
    );
    sql(
        &db.join("compactions.sqlite"),
        "CREATE TABLE diff_extra(id INTEGER PRIMARY KEY, v TEXT);",
    );

    let memdir = f.agent.memdir();
    let note = memdir.join(EDITED);
    let text = fs::read_to_string(&note).expect("the note exists");
    let rest = text.split_once('\n').expect("a first line").1;
    fs::write(&note, format!("# Edited title\n{rest}an appended line\n")).expect("edit");
    git(&memdir, &["commit", "-qam", "edit the rust-async note"]);
    fs::write(memdir.join(ADDED), "# New\n\nfresh note\n").expect("add note");
    git(&memdir, &["add", ADDED]);
    git(&memdir, &["commit", "-qm", "add a new note"]);

    let state = f.agent.state_dir().join("dream_run.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&state).expect("state")).expect("JSON");
    v["status"] = json!("failed");
    v["retry"] = json!({"after_ms": 5000});
    fs::write(&state, serde_json::to_vec_pretty(&v).expect("JSON")).expect("write state");

    let b = f.snapshot_id();
    (a, b)
}

fn db<'a>(report: &'a Value, name: &str) -> &'a Value {
    common::find_by(report, "databases", "name", name)
}

fn tables(d: &Value) -> Vec<(String, u64, u64, u64)> {
    d["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name").to_owned(),
                t["rows_added"].as_u64().expect("n"),
                t["rows_removed"].as_u64().expect("n"),
                t["rows_changed"].as_u64().expect("n"),
            )
        })
        .collect()
}

fn assert_tmp_empty(f: &Fixture) {
    let left: Vec<_> = fs::read_dir(f.store.join("tmp"))
        .expect("tmp exists")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in tmp: {left:?}");
}

#[test]
fn diff_reports_exactly_the_known_changes() {
    let f = Fixture::new();
    let (a, b) = two_snapshots(&f);
    let r = f.cmd().args(["diff", &a, &b]).json();
    assert_eq!(r["identical"], false);
    assert_eq!(r["a"]["id"], a.as_str());
    assert_eq!(r["b"]["id"], b.as_str());

    // Databases: exactly the four changed ones, with exact row counts.
    assert_eq!(r["databases"].as_array().expect("dbs").len(), 4, "{r:#}");
    let lt = db(&r, "long_term.sqlite");
    assert_eq!(tables(lt), [("memories".to_owned(), 3, 0, 0)]);
    assert!(lt["schema_changes"].as_array().expect("a").is_empty());
    assert!(
        lt["skipped"]
            .as_array()
            .expect("skipped")
            .contains(&json!("memories_fts"))
    );
    assert_eq!(
        tables(db(&r, "vector.sqlite")),
        [("embeddings".to_owned(), 0, 2, 0)]
    );
    assert_eq!(
        tables(db(&r, "concepts.sqlite")),
        [("concepts".to_owned(), 0, 0, 1)]
    );
    let comp = db(&r, "compactions.sqlite");
    assert!(tables(comp).is_empty(), "{comp:#}");
    assert_eq!(comp["tables_added"], json!(["diff_extra"]));
    let sc = &comp["schema_changes"];
    assert_eq!(sc.as_array().expect("a").len(), 1, "{sc:#}");
    assert_eq!(sc[0]["name"], "diff_extra");
    assert_eq!(sc[0]["change"], "added");
    assert_eq!(sc[0]["old_sql"], Value::Null);

    // Git: the two commits, newest first; two files, +2-1 and +3.
    let g = &r["git"];
    assert_eq!(g["note"], Value::Null, "{g:#}");
    let subjects: Vec<&str> = g["commits"]
        .as_array()
        .expect("commits")
        .iter()
        .map(|c| c["subject"].as_str().expect("subject"))
        .collect();
    assert_eq!(subjects, ["add a new note", "edit the rust-async note"]);
    assert_eq!(g["files_changed"], 2);
    assert_eq!(g["insertions"], 5);
    assert_eq!(g["deletions"], 1);
    assert_ne!(g["a_head"], g["b_head"]);

    // Notes.
    let n = &r["notes"];
    assert_eq!(n["added"], json!([ADDED]));
    assert_eq!(n["removed"], json!([]));
    assert_eq!(n["changed"].as_array().expect("changed").len(), 1);
    assert_eq!(n["changed"][0]["path"], EDITED);
    assert_eq!(n["changed"][0]["patch"], Value::Null);

    // State: one file, two fields.
    let st = r["state"].as_array().expect("state");
    assert_eq!(st.len(), 1, "{st:#?}");
    assert_eq!(st[0]["name"], "dream_run.json");
    assert_eq!(
        st[0]["fields"],
        json!([
            {"path": "retry", "old": null, "new": {"after_ms": 5000}},
            {"path": "status", "old": "ok", "new": "failed"},
        ])
    );

    // Artifacts: every changed database and state file is listed with its sizes.
    let arts = r["artifacts"].as_array().expect("artifacts");
    let changed = |part: &str, path: &str| {
        arts.iter()
            .find(|x| x["part"] == part && x["path"] == path)
            .unwrap_or_else(|| panic!("{part} {path} not in artifacts"))
    };
    let v = changed("sqlite", "vector.sqlite");
    assert_eq!(v["change"], "changed");
    assert!(v["old_size"].as_u64().is_some() && v["new_size"].as_u64().is_some());
    assert!(v["bytes_changed"].as_u64().expect("n") > 0);
    assert!(
        v["bytes_changed"].as_u64().expect("n") <= v["new_size"].as_u64().expect("n"),
        "{v:#}"
    );
    assert_eq!(changed("memdir", ADDED)["change"], "added");
    assert_eq!(changed("state", "dream_run.json")["change"], "changed");
    assert!(arts.iter().all(|x| x["path"] != "extract_cursor.json"));
    assert_eq!(
        r["summary"]["artifacts_changed"].as_u64().expect("n")
            + r["summary"]["artifacts_added"].as_u64().expect("n")
            + r["summary"]["artifacts_removed"].as_u64().expect("n"),
        arts.len() as u64
    );
    assert_tmp_empty(&f);

    // --patch: the note's diff lines, in JSON and in the human output.
    let r = f.cmd().args(["diff", &a, &b, "--patch"]).json();
    let patch = r["notes"]["changed"][0]["patch"].as_str().expect("a patch");
    assert!(
        patch.starts_with(&format!("--- a/{EDITED}\n+++ b/{EDITED}\n@@")),
        "{patch}"
    );
    assert!(patch.contains("\n+# Edited title\n"), "{patch}");
    assert!(patch.contains("\n+an appended line\n"), "{patch}");
    assert!(patch.contains("\n-# "), "{patch}");
    let human = f.cmd().args(["diff", &a, &b, "--patch"]).stdout();
    for needle in [
        "memories: +3 -0 ~0 rows",
        "embeddings: +0 -2 ~0 rows",
        "concepts: +0 -0 ~1 rows",
        "schema: table diff_extra added",
        "2 commits, 2 files changed, +5 -1",
        "add a new note",
        "+ topics/new-note.md",
        "~ topics/rust-async.md",
        "+an appended line",
        "status: \"ok\" -> \"failed\"",
    ] {
        assert!(human.contains(needle), "{needle:?} missing in:\n{human}");
    }
    assert_tmp_empty(&f);
}

#[test]
fn diff_of_a_snapshot_with_itself_is_empty() {
    let f = Fixture::new();
    let a = f.snapshot_id();
    let r = f
        .cmd()
        .args([
            "diff",
            &a,
            &a,
            "--tenant",
            common::TENANT,
            "--agent",
            common::AGENT,
        ])
        .json();
    assert_eq!(r["identical"], true);
    assert_eq!(r["artifacts"], json!([]));
    assert_eq!(r["databases"], json!([]));
    assert_eq!(r["state"], json!([]));
    assert_eq!(r["notes"]["changed"], json!([]));
    assert_eq!(r["git"]["commits"], json!([]));
    assert_eq!(r["summary"]["bytes_changed"], 0);
    assert!(
        f.cmd()
            .args(["diff", &a, &a])
            .stdout()
            .contains("no change")
    );
    assert_tmp_empty(&f);
}

#[test]
fn diff_of_an_unknown_snapshot_fails_cleanly() {
    let f = Fixture::new();
    let a = f.snapshot_id();
    let out = f
        .cmd()
        .args(["diff", &a, "ffffffff-0000-4000-8000-000000000000", "--json"])
        .assert_exit_code(1);
    assert!(
        out.json()["error"]
            .as_str()
            .expect("error")
            .contains("no snapshot matches")
    );
    assert!(out.stderr.contains("no snapshot matches"), "{out}");
    f.cmd().args(["diff", &a, "abc"]).assert_exit_code(2);
    assert_tmp_empty(&f);
}
