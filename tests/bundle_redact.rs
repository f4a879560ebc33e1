//! `memsnap export --redact` end to end: an agent seeded with one fake secret per built-in rule
//! in every kind of artifact (a memory note and a commit message, the state JSON, a SQLite TEXT
//! column with its FTS5 index, a BLOB column, deleted rows left in free space, the snapshot label)
//! is exported; the whole decompressed bundle must hold none of them, the report must count each
//! one, the redacted bundle must import and restore into working databases with
//! `[REDACTED:<rule>]` markers in place of the secrets, and the store and the live agent must keep
//! theirs. Also: a rules file, its refusal, `--redact-rules` without `--redact`, a control export
//! without `--redact` that does contain the secrets (so the scans below can see them), and secrets
//! in a file name and a symlink target (which `--redact` ships today: see that test).
//!
//! No secret-looking literal is in this file: every key is generated at run time from a fixed
//! seed (a xorshift stream, as in src/bundle/redact.rs's unit tests), so runs are reproducible.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use memsnap::sample::SampleAgent;
use regex::bytes::Regex;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Fake secrets
// ---------------------------------------------------------------------------------------------

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const URLSAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const DIGITS: &[u8] = b"0123456789";
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `n` deterministic pseudo-random characters of `set`.
fn fake(set: &[u8], n: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            set[(x % set.len() as u64) as usize] as char
        })
        .collect()
}

/// Unpadded base64url, for a JWT's header and payload.
fn b64url(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(URLSAFE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A PEM private key: 25 lines of base64 and a short last one, BEGIN/END lines around them.
fn pem(kind: &str, seed: u64) -> String {
    let label = format!("{kind} PRIVATE KEY");
    let body: Vec<String> = (0..25).map(|i| fake(B64, 64, seed * 100 + i)).collect();
    format!(
        "-----BEGIN {label}-----\n{}\n{}==\n-----END {label}-----",
        body.join("\n"),
        fake(B64, 30, seed)
    )
}

struct Secret {
    rule: &'static str,
    /// The secret with the context it is written in.
    text: String,
    /// The part that must disappear.
    secret: String,
}

impl Secret {
    fn marker(&self) -> String {
        format!("[REDACTED:{}]", self.rule)
    }

    /// `text` as the redaction must leave it: the secret part replaced by the marker.
    fn redacted(&self) -> String {
        assert_eq!(self.text.matches(&self.secret).count(), 1, "{}", self.rule);
        self.text.replace(&self.secret, &self.marker())
    }

    /// `text` as planted, or as the redaction must leave it.
    fn text(&self, redacted: bool) -> String {
        if redacted {
            self.redacted()
        } else {
            self.text.clone()
        }
    }

    /// The secret alone, or its marker.
    fn key(&self, redacted: bool) -> String {
        if redacted {
            self.marker()
        } else {
            self.secret.clone()
        }
    }

    /// 16 characters from the middle of the secret's longest line: a stretch no redaction may
    /// leave behind (also found in JSON, where the PEM key's newlines are `\n` escapes).
    fn piece(&self) -> &str {
        let line = self
            .secret
            .split('\n')
            .max_by_key(|l| l.len())
            .expect("a line");
        let mid = line.len() / 2 - 8;
        &line[mid..mid + 16]
    }
}

fn secret(rule: &'static str, context: &str, secret: String) -> Secret {
    Secret {
        rule,
        text: context.replace("{}", &secret),
        secret,
    }
}

/// One realistic fake secret per built-in rule (two for `github-token`: `ghp_` and
/// `github_pat_`), each in a typical context. `base` seeds the set: two bases, two unrelated sets.
fn secrets(base: u64) -> Vec<Secret> {
    let s = |k: u64| base * 1000 + k;
    let jwt = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(
            format!(
                r#"{{"sub":"agent-{}","iat":1767225600}}"#,
                fake(ALNUM, 12, s(1))
            )
            .as_bytes()
        ),
        fake(URLSAFE, 43, s(2))
    );
    vec![
        secret(
            "private-key",
            "deploy key:\n{}\n(rotate monthly)",
            pem("RSA", s(3)),
        ),
        secret(
            "anthropic-api-key",
            "ANTHROPIC_API_KEY={}",
            format!("sk-ant-api03-{}AA", fake(URLSAFE, 93, s(4))),
        ),
        secret(
            "openai-api-key",
            "the OpenAI key is {} for now",
            format!("sk-proj-{}", fake(URLSAFE, 156, s(5))),
        ),
        secret(
            "google-api-key",
            "maps key: {}",
            format!("AIza{}", fake(URLSAFE, 35, s(6))),
        ),
        secret(
            "groq-api-key",
            "groq `{}`",
            format!("gsk_{}", fake(ALNUM, 52, s(7))),
        ),
        secret(
            "huggingface-token",
            "HF_TOKEN={}",
            format!("hf_{}", fake(ALNUM, 34, s(8))),
        ),
        secret(
            "xai-api-key",
            "xai: {}",
            format!("xai-{}", fake(ALNUM, 80, s(9))),
        ),
        secret(
            "perplexity-api-key",
            "pplx key ({})",
            format!("pplx-{}", fake(ALNUM, 48, s(10))),
        ),
        secret(
            "replicate-token",
            "REPLICATE_API_TOKEN='{}'",
            format!("r8_{}", fake(ALNUM, 37, s(11))),
        ),
        secret(
            "stripe-api-key",
            "stripe {}",
            format!("sk_live_{}", fake(ALNUM, 24, s(12))),
        ),
        secret(
            "npm-token",
            "//registry.npmjs.org/:_authToken={}",
            format!("npm_{}", fake(ALNUM, 36, s(13))),
        ),
        secret(
            "github-token",
            "git push with {}",
            format!("ghp_{}", fake(ALNUM, 36, s(14))),
        ),
        secret(
            "github-token",
            "GH_TOKEN={}",
            format!(
                "github_pat_{}_{}",
                fake(ALNUM, 22, s(15)),
                fake(ALNUM, 59, s(16))
            ),
        ),
        secret(
            "gitlab-token",
            "gitlab: {}.",
            format!("glpat-{}", fake(URLSAFE, 20, s(17))),
        ),
        secret(
            "slack-webhook",
            "post to https://hooks.slack.com/services/{} daily",
            format!(
                "T{}/B{}/{}",
                fake(UPPER, 8, s(18)),
                fake(UPPER, 10, s(19)),
                fake(ALNUM, 24, s(20))
            ),
        ),
        secret(
            "slack-token",
            "bot token {}",
            format!(
                "xoxb-{}-{}-{}",
                fake(DIGITS, 12, s(21)),
                fake(DIGITS, 13, s(22)),
                fake(ALNUM, 24, s(23))
            ),
        ),
        secret(
            "aws-access-key-id",
            "aws_access_key_id = {}",
            format!("AKIA{}", fake(UPPER, 16, s(24))),
        ),
        secret(
            "aws-secret-access-key",
            "aws_secret_access_key = {}",
            fake(B64, 40, s(25)),
        ),
        secret("jwt", "session cookie {}", jwt),
        secret(
            "bearer-token",
            "curl -H 'Authorization: Bearer {}' https://api.internal/v1",
            fake(URLSAFE, 40, s(26)),
        ),
        secret(
            "basic-auth",
            "Authorization: Basic {}",
            format!("{}==", fake(B64, 30, s(27))),
        ),
        secret(
            "connection-string-password",
            "DATABASE_URL=postgres://app:{}@db.internal:5432/app",
            fake(ALNUM, 20, s(28)),
        ),
    ]
}

/// Rule id -> how many of `set` it covers.
fn per_rule(set: &[Secret]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in set {
        *out.entry(s.rule.to_owned()).or_default() += 1;
    }
    out
}

/// Where a secret (whole, or its piece in any ASCII case, as an FTS index keeps words lowercased)
/// shows in `hay`; empty when none does. Names rules and offsets, never the secret.
fn leaks(hay: &[u8], set: &[&Secret]) -> Vec<String> {
    let mut out = Vec::new();
    for s in set {
        let piece = Regex::new(&format!("(?i-u:{})", regex::escape(s.piece()))).expect("regex");
        if let Some(m) = piece.find(hay) {
            let how = if contains(hay, &s.secret) {
                "whole"
            } else {
                "a 16-character piece"
            };
            out.push(format!("{} ({how}, near byte {})", s.rule, m.start()));
        }
    }
    out
}

/// Whether `needle` occurs in `hay` (the regex crate's substring search: this test crate is
/// built without optimisation, a naive search over megabytes is slow).
fn contains(hay: &[u8], needle: &str) -> bool {
    Regex::new(&regex::escape(needle))
        .expect("regex")
        .is_match(hay)
}

// ---------------------------------------------------------------------------------------------
// Planting them in an agent
// ---------------------------------------------------------------------------------------------

const NOTE: &str = "topics/deploy-credentials.md";
const MEMORY_PREFIX: &str = "deploy credentials";
const MODEL: &str = "tool-output-v1";

/// The secrets planted in a [`Fixture`]'s agent, and where.
struct Planted {
    /// Live everywhere: the note, dream_run.json, long_term `memories`, vector `embeddings`.
    live: Vec<Secret>,
    /// Written to long_term `memories`, then deleted: only free space may keep them.
    ghosts: Vec<Secret>,
    /// Indexes of the `ghosts` whose bytes linger in the live long_term.sqlite (SQLite reuses
    /// some of the space when it rebalances the pages the deletes emptied).
    lingering: Vec<usize>,
    /// In the HEAD commit's subject (`github-token`, `ghp_`).
    commit_index: usize,
    /// In the snapshot label (`slack-token`), when the snapshot is taken with [`snapshot_label`].
    label_index: usize,
    /// Row ids of the planted `memories` rows and `embeddings` rows, in `live` order.
    memory_ids: Vec<i64>,
    embedding_ids: Vec<i64>,
}

impl Planted {
    fn all(&self) -> Vec<&Secret> {
        self.live.iter().chain(&self.ghosts).collect()
    }

    fn commit_subject(&self, redacted: bool) -> String {
        let key = self.live[self.commit_index].key(redacted);
        format!("add deploy notes, pushed with {key}")
    }

    fn label(&self, redacted: bool) -> String {
        let key = self.live[self.label_index].key(redacted);
        format!("before rotating {key}")
    }

    fn note(&self, redacted: bool) -> String {
        let mut doc = String::from("# Deploy credentials\n\nWhat I picked up while deploying:\n\n");
        for s in &self.live {
            doc.push_str(&format!("- {}\n", s.text(redacted)));
        }
        doc.push_str("\nAsk Bob before rotating any of them.\n");
        doc
    }

    fn memory(&self, i: usize, redacted: bool) -> String {
        let s = &self.live[i];
        format!("{MEMORY_PREFIX} ({}): {}", s.rule, s.text(redacted))
    }

    /// A binary record with the secret inside: bytes that are not UTF-8 around it.
    fn blob(&self, i: usize, redacted: bool) -> Vec<u8> {
        let (s, text) = (&self.live[i], self.live[i].text(redacted));
        // A length prefix (of the original text: redaction rewrites bytes, not the format).
        let mut b = vec![0x00, 0xC3, 0x28, 0xFF, 0x07, 0x00];
        b.extend_from_slice(&(s.text.len() as u32).to_le_bytes());
        b.push(0x00);
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(&[0x00, 0xFE, 0x81, 0x80, 0x00]);
        b
    }

    fn texts(&self, redacted: bool) -> Vec<String> {
        self.live.iter().map(|s| s.text(redacted)).collect()
    }
}

/// Plants one secret of each rule in each kind of artifact of `f`'s agent (see [`Planted`]).
fn plant(f: &Fixture) -> Planted {
    let live = secrets(1);
    let ghosts = secrets(2);
    let commit_index = live
        .iter()
        .position(|s| s.secret.starts_with("ghp_"))
        .expect("ghp");
    let label_index = live
        .iter()
        .position(|s| s.rule == "slack-token")
        .expect("slack");
    let mut p = Planted {
        live,
        ghosts,
        lingering: Vec::new(),
        commit_index,
        label_index,
        memory_ids: Vec::new(),
        embedding_ids: Vec::new(),
    };

    // (a) A memory note, committed, with a secret in the commit message too.
    let memdir = f.agent.memdir();
    fs::write(memdir.join(NOTE), p.note(false)).expect("write note");
    git(&memdir, &["add", "-A"]);
    git(
        &memdir,
        &[
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "-m",
            &p.commit_subject(false),
        ],
    );

    // (b) The state JSON: a new field holding every secret (the PEM key with `\n` escapes).
    let state = f.agent.state_dir().join("dream_run.json");
    let mut dream: Value =
        serde_json::from_slice(&fs::read(&state).expect("read state")).expect("state JSON");
    dream["tool_outputs"] = p.texts(false).into();
    let text = serde_json::to_string_pretty(&dream).expect("JSON") + "\n";
    assert!(text.contains("-----\\n"), "the PEM key is escaped in JSON");
    fs::write(&state, text).expect("write state");

    // (c) TEXT column with its FTS5 index (through the sample's triggers), (e) deleted rows.
    let lt = rusqlite::Connection::open(f.agent.sqlite_dir().join("long_term.sqlite"))
        .expect("open long_term");
    let ins = "INSERT INTO memories(kind, content, created_at, importance) VALUES (?1, ?2, ?3, ?4)";
    for i in 0..p.live.len() {
        lt.execute(
            ins,
            rusqlite::params!["fact", p.memory(i, false), 1_767_300_000 + i as i64, 0.7],
        )
        .expect("insert memory");
        p.memory_ids.push(lt.last_insert_rowid());
    }
    let mut ghost_ids = Vec::new();
    for (i, g) in p.ghosts.iter().enumerate() {
        lt.execute(
            ins,
            rusqlite::params![
                "episode",
                format!("scratch note: {}", g.text),
                1_767_400_000 + i as i64,
                0.1
            ],
        )
        .expect("insert ghost");
        ghost_ids.push(lt.last_insert_rowid());
    }
    for id in ghost_ids {
        lt.execute("DELETE FROM memories WHERE id = ?1", [id])
            .expect("delete ghost");
    }
    lt.close().expect("close long_term");
    let file = fs::read(f.agent.sqlite_dir().join("long_term.sqlite")).expect("read long_term");
    p.lingering = (0..p.ghosts.len())
        .filter(|&i| contains(&file, &p.ghosts[i].secret))
        .collect();
    assert!(
        p.lingering.len() * 2 > p.ghosts.len(),
        "most deleted secrets linger in free space: {:?}",
        p.lingering
    );

    // (d) BLOB column: binary records in vector.sqlite's `embeddings.vec`.
    let vec = rusqlite::Connection::open(f.agent.sqlite_dir().join("vector.sqlite"))
        .expect("open vector");
    for i in 0..p.live.len() {
        vec.execute(
            "INSERT INTO embeddings(memory_id, model, dim, vec) VALUES (?1, ?2, 0, ?3)",
            rusqlite::params![p.memory_ids[i], MODEL, p.blob(i, false)],
        )
        .expect("insert blob");
        p.embedding_ids.push(vec.last_insert_rowid());
    }
    vec.close().expect("close vector");
    p
}

/// `snapshot ... --label <label with a secret> --json`: the snapshot id.
fn snapshot_label(f: &Fixture, p: &Planted) -> String {
    let v = f
        .cmd()
        .snapshot(f.agent.root())
        .args(["--label", &p.label(false)])
        .json();
    assert!(v["git"]["head_subject"] == p.commit_subject(false).as_str());
    str_of(&v, "id").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Reading bundles (as tests/bundle.rs does)
// ---------------------------------------------------------------------------------------------

/// `export SNAP --out OUT EXTRA --json`, asserting success; the whole outcome.
fn export(f: &Fixture, snap: &str, out: &Path, extra: &[&str]) -> Outcome {
    f.cmd()
        .args(["export", snap, "--out"])
        .arg(out)
        .args(extra)
        .arg("--json")
        .assert_exit_code(0)
}

fn query_i64(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn fts_count(c: &rusqlite::Connection, query: &str) -> i64 {
    c.query_row(
        "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?1",
        [query],
        |r| r.get(0),
    )
    .unwrap_or_else(|e| panic!("MATCH {query}: {e}"))
}

/// The FTS5 token of the AWS access key id (one word for the default tokenizer), quoted.
fn aws_token(p: &Planted) -> String {
    let s = p
        .live
        .iter()
        .find(|s| s.rule == "aws-access-key-id")
        .expect("aws");
    format!("\"{}\"", s.secret.to_ascii_lowercase())
}

/// A restored agent still has every planted secret, intact (`redacted` false) or as markers.
fn assert_planted_content(root: &Path, p: &Planted, redacted: bool, what: &str) {
    let agent = SampleAgent::open(root);
    let note = fs::read_to_string(agent.memdir().join(NOTE)).expect("read note");
    assert!(
        note == p.note(redacted),
        "{what}: the note differs:\n{note}"
    );

    let dream: Value = serde_json::from_slice(
        &fs::read(agent.state_dir().join("dream_run.json")).expect("read state"),
    )
    .unwrap_or_else(|e| panic!("{what}: dream_run.json is not JSON: {e}"));
    let outputs: Vec<&str> = dream["tool_outputs"]
        .as_array()
        .expect("tool_outputs")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let expected = p.texts(redacted);
    for (i, (got, want)) in outputs.iter().zip(&expected).enumerate() {
        assert!(
            got == want,
            "{what}: tool_outputs[{i}] ({})",
            p.live[i].rule
        );
    }
    assert_eq!(outputs.len(), expected.len(), "{what}");
    assert_eq!(dream["status"], "ok", "{what}: other fields kept");

    let lt = rusqlite::Connection::open(agent.sqlite_dir().join("long_term.sqlite"))
        .expect("open long_term");
    for (i, id) in p.memory_ids.iter().enumerate() {
        let content: String = lt
            .query_row("SELECT content FROM memories WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .expect("planted memory row");
        assert!(
            content == p.memory(i, redacted),
            "{what}: memories row {id} ({})",
            p.live[i].rule
        );
    }
    let vec =
        rusqlite::Connection::open(agent.sqlite_dir().join("vector.sqlite")).expect("open vector");
    for (i, id) in p.embedding_ids.iter().enumerate() {
        let (blob, ty): (Vec<u8>, String) = vec
            .query_row(
                "SELECT vec, typeof(vec) FROM embeddings WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("planted embeddings row");
        assert_eq!(ty, "blob", "{what}: a BLOB stays a BLOB");
        assert!(
            blob == p.blob(i, redacted),
            "{what}: embeddings row {id} ({})",
            p.live[i].rule
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_redacted_export_holds_no_secret_and_restores_with_markers_in_their_place() {
    let f = Fixture::new();
    let p = plant(&f);
    let id = snapshot_label(&f, &p);
    let image = AgentImage::capture(&f.agent);
    let live_before = tree(f.agent.root(), true);
    let store_before = store_files(&f.store);
    let listed = f.list();
    fs::create_dir_all(f.path("out")).expect("mkdir");

    let bundle = f.path("out/redacted.tar.zst");
    let run = export(&f, &id, &bundle, &["--redact"]);
    let rep = run.json();
    // Human output of a second export: what was redacted, and that history was left out.
    let human = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(f.path("out/redacted-2.tar.zst"))
        .arg("--redact")
        .assert_exit_code(0);

    // The store and the live agent: untouched by both exports.
    assert_agent_tree_unchanged(
        live_before,
        &f.agent,
        "the live agent after export --redact",
    );
    let store_after = store_files(&f.store);
    let changed: Vec<&String> = store_before
        .keys()
        .chain(store_after.keys())
        .filter(|k| store_before.get(*k) != store_after.get(*k))
        .collect();
    assert!(changed.is_empty(), "export changed the store: {changed:?}");
    assert_eq!(f.list(), listed);

    // 1. No secret anywhere in the decompressed stream (headers, manifest, every entry), nor in
    //    the report, the outputs, or the .sha256 file.
    let all = p.all();
    let plain = decompressed(&bundle);
    let found = leaks(&plain, &all);
    assert!(
        found.is_empty(),
        "secrets in the redacted bundle: {found:?}"
    );
    for (what, text) in [
        ("export --json stdout", &run.stdout),
        ("export --json stderr", &run.stderr),
        ("export stdout", &human.stdout),
        ("export stderr", &human.stderr),
    ] {
        let found = leaks(text.as_bytes(), &all);
        assert!(found.is_empty(), "secrets in the {what}: {found:?}");
    }
    let second = decompressed(&f.path("out/redacted-2.tar.zst"));
    assert!(leaks(&second, &all).is_empty(), "the second bundle");

    // 2. No history: no git/ entry, the report and the manifest say so, and so does stdout.
    let entries = tar_entries(&plain);
    let paths: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
    assert!(
        !paths.iter().any(|p| p.starts_with("git/")),
        "git entries: {paths:?}"
    );
    for want in [
        "sqlite/long_term.sqlite",
        "sqlite/vector.sqlite",
        "state/dream_run.json",
        "state/extract_cursor.json",
        &format!("memory_files/{NOTE}"),
        "memory_files/MEMORY.md",
    ] {
        assert!(paths.contains(&want), "{want} missing: {paths:?}");
    }
    let manifest = manifest_of(&plain);
    let section = &manifest["memsnap"]["redaction"];
    assert_eq!(section["git_excluded"], true, "{section:#}");
    assert_eq!(rep["redaction"]["git_excluded"], true);
    assert!(
        !manifest["memsnap"]["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| str_of(e, "path").starts_with(".git")),
        "the manifest lists .git entries"
    );
    assert!(
        human.stdout.contains("history") && human.stdout.contains("left out"),
        "{human}"
    );

    // 3. The counts: every planted secret once, by rule and by artifact.
    let each = per_rule(&p.live);
    let mut expected_rule = BTreeMap::new();
    for (rule, n) in &each {
        // The note, the state, the TEXT column, the BLOB column.
        expected_rule.insert(rule.clone(), 4 * n);
    }
    // The commit subject and the label, redacted in the manifest's `git` and `label`.
    for i in [p.commit_index, p.label_index] {
        *expected_rule.get_mut(p.live[i].rule).expect("rule") += 1;
    }
    let mut manifest_counts = BTreeMap::new();
    for i in [p.commit_index, p.label_index] {
        *manifest_counts
            .entry(p.live[i].rule.to_owned())
            .or_insert(0u64) += 1;
    }
    let expected_artifact: BTreeMap<String, BTreeMap<String, u64>> = [
        (format!("memory_files/{NOTE}"), each.clone()),
        ("state/dream_run.json".to_owned(), each.clone()),
        ("sqlite/long_term.sqlite".to_owned(), each.clone()),
        ("sqlite/vector.sqlite".to_owned(), each.clone()),
        ("manifest.json".to_owned(), manifest_counts),
    ]
    .into_iter()
    .collect();
    let got_rule: BTreeMap<String, u64> =
        serde_json::from_value(rep["redaction"]["per_rule"].clone()).expect("per_rule");
    let got_artifact: BTreeMap<String, BTreeMap<String, u64>> =
        serde_json::from_value(rep["redaction"]["per_artifact"].clone()).expect("per_artifact");
    assert_eq!(got_rule, expected_rule, "per_rule");
    assert_eq!(got_artifact, expected_artifact, "per_artifact");
    // Every built-in rule has a planted secret (a new rule needs one here).
    let rules: BTreeSet<String> =
        serde_json::from_value(rep["redaction"]["rules"].clone()).expect("rules");
    assert_eq!(rules, each.keys().cloned().collect(), "built-in rules");
    // The manifest carries the same report; the old-format summary agrees with it.
    assert_eq!(section, &rep["redaction"], "manifest vs report");
    let total: u64 = expected_rule.values().sum();
    let old = &manifest["redactions"];
    assert_eq!(old["matches_redacted"].as_u64(), Some(total), "{old:#}");
    assert_eq!(old["policy"], "memsnap:builtin");
    let applied: BTreeSet<String> =
        serde_json::from_value(old["rules_applied"].clone()).expect("rules_applied");
    assert_eq!(applied, expected_rule.keys().cloned().collect());
    let touched: BTreeSet<String> =
        serde_json::from_value(old["artifacts_touched"].clone()).expect("artifacts_touched");
    assert_eq!(touched, expected_artifact.keys().cloned().collect());
    assert!(
        human
            .stdout
            .contains(&format!("redacted {total} secret(s)")),
        "{human}"
    );
    // The manifest's own fields, redacted where they held a secret.
    assert_eq!(manifest["label"], p.label(true).as_str());
    assert_eq!(
        manifest["git"]["head_subject"],
        p.commit_subject(true).as_str()
    );

    // 4. Import into a second store and restore into a new folder: working databases, the same
    //    rows, valid state, markers where the secrets were, and not a byte of any secret.
    let v = TestCommand::new(&f.path("unused"))
        .arg("verify-bundle")
        .arg(&bundle)
        .json();
    assert_eq!(v["ok"], true, "{v:#}");
    let store2 = f.path("store2");
    let imp = TestCommand::new(&store2).arg("import").arg(&bundle).json();
    assert_eq!(imp["snapshot"]["id"], id.as_str());
    assert_eq!(imp["snapshot"]["label"], p.label(true).as_str());
    assert_eq!(
        imp["snapshot"]["git"]["head_subject"],
        p.commit_subject(true).as_str()
    );
    let target = f.path("restored-redacted");
    TestCommand::new(&store2)
        .args(["restore", &id, "--target"])
        .arg(&target)
        .json();
    let restored = SampleAgent::open(&target);
    assert!(
        !restored.memdir().join(".git").exists(),
        "no history restored"
    );
    for e in walkdir::WalkDir::new(&target) {
        let e = e.expect("walk");
        if e.file_type().is_file() {
            let found = leaks(&fs::read(e.path()).expect("read"), &all);
            assert!(found.is_empty(), "{}: {found:?}", e.path().display());
        }
    }
    for db in databases(&restored) {
        let c = rusqlite::Connection::open(&db).expect("open");
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(ok, "ok", "{}", db.display());
    }
    assert_eq!(
        restored.row_counts().expect("rows"),
        image.rows,
        "row counts"
    );
    let lt =
        rusqlite::Connection::open(restored.sqlite_dir().join("long_term.sqlite")).expect("open");
    lt.execute_batch("INSERT INTO memories_fts(memories_fts) VALUES('integrity-check')")
        .expect("FTS5 integrity-check");
    assert_eq!(fts_count(&lt, "credentials"), p.live.len() as i64);
    assert_eq!(fts_count(&lt, "redacted"), p.live.len() as i64);
    assert_eq!(fts_count(&lt, &aws_token(&p)), 0, "the key's word is gone");
    assert!(fts_count(&lt, "deploy") > 0);
    assert_eq!(
        query_i64(
            &lt,
            "SELECT count(*) FROM memories WHERE content LIKE 'scratch note%'"
        ),
        0
    );
    drop(lt);
    assert_planted_content(&target, &p, true, "the redacted restore");
    // Memory files without secrets come back byte for byte.
    for e in walkdir::WalkDir::new(f.agent.memdir()) {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(f.agent.memdir()).expect("rel");
        if e.file_type().is_file() && !rel.starts_with(".git") && rel != Path::new(NOTE) {
            assert_eq!(
                fs::read(e.path()).expect("live"),
                fs::read(restored.memdir().join(rel)).unwrap_or_default(),
                "{}",
                rel.display()
            );
        }
    }

    // 5. The local store and the live agent keep their secrets.
    let verify = f.cmd().args(["verify", "--read-data"]).json();
    assert_eq!(verify["ok"], true, "{verify:#}");
    assert_planted_content(f.agent.root(), &p, false, "the live agent");
    let lt =
        rusqlite::Connection::open(f.agent.sqlite_dir().join("long_term.sqlite")).expect("open");
    assert_eq!(fts_count(&lt, &aws_token(&p)), 1);
    drop(lt);
    let original = f.path("restored-original");
    f.restore_into(&id, &original);
    assert_planted_content(&original, &p, false, "a restore of the original snapshot");
    let show = f.cmd().args(["show", &id]).json();
    assert!(
        show["label"] == p.label(false).as_str(),
        "the store keeps the label"
    );
    let head = SampleAgent::open(&original).git_head().expect("head");
    assert_eq!(head, image.head, "the original keeps its history");
}

/// A redacted export in two passes (`--level`: the digests first) takes a redacted text
/// artifact's digest from redaction, which had its bytes in memory; the one-pass export hashes
/// what it writes instead. Each manifest's digests are those of its own entries, the text
/// artifacts' are the same in both, and neither holds a secret.
#[test]
fn a_redacted_export_in_two_passes_lists_the_digests_of_what_it_ships() {
    use sha2::Digest;
    let f = Fixture::new();
    let p = plant(&f);
    let id = snapshot_label(&f, &p);
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let digests = |extra: &[&str], name: &str| -> BTreeMap<String, String> {
        let bundle = f.path(&format!("out/{name}.tar.zst"));
        export(&f, &id, &bundle, extra);
        let plain = decompressed(&bundle);
        let found = leaks(&plain, &p.all());
        assert!(found.is_empty(), "{name}: secrets in the bundle: {found:?}");
        let manifest = manifest_of(&plain);
        let listed: BTreeMap<&str, &str> = manifest["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .map(|a| {
                let path = a["path_in_bundle"].as_str().expect("path");
                (path, a["sha256"].as_str().expect("sha256"))
            })
            .collect();
        let mut shipped = BTreeMap::new();
        for (path, _, data) in tar_entries(&plain) {
            if let Some(sha) = listed.get(path.as_str()) {
                let actual = hex::encode(sha2::Sha256::digest(&data));
                assert_eq!(*sha, actual, "{name}: {path}");
                shipped.insert(path, actual);
            }
        }
        assert_eq!(
            shipped.len(),
            listed.len(),
            "{name}: every artifact shipped"
        );
        shipped
    };
    let one = digests(&["--redact"], "one-pass");
    let two = digests(&["--redact", "--level", "3"], "two-pass");
    let text = |d: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        d.iter()
            .filter(|(k, _)| !k.starts_with("sqlite/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert!(text(&one).contains_key(&format!("memory_files/{NOTE}")));
    assert_eq!(text(&one), text(&two));
}

#[test]
fn a_control_export_without_redact_holds_every_secret() {
    let f = Fixture::new();
    let p = plant(&f);
    let id = snapshot_label(&f, &p);
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/plain.tar.zst");
    let rep = export(&f, &id, &bundle, &[]).json();
    assert!(rep["redaction"].is_null(), "{rep:#}");
    let plain = decompressed(&bundle);
    let manifest = manifest_of(&plain);
    assert!(manifest["redactions"].is_null(), "{manifest:#}");
    assert!(manifest["memsnap"]["redaction"].is_null());
    assert!(manifest["label"] == p.label(false).as_str());

    // The scan of the redacted test finds every live secret, whole, and every deleted one: the
    // deleted rows linger in the database's free space.
    let live: Vec<&Secret> = p.live.iter().collect();
    assert_eq!(
        leaks(&plain, &live).len(),
        live.len(),
        "the scan finds each live secret"
    );
    for s in &p.live {
        assert!(contains(&plain, &s.secret), "{} whole", s.rule);
    }
    let ghosts: Vec<&Secret> = p.lingering.iter().map(|&i| &p.ghosts[i]).collect();
    let found = leaks(&plain, &ghosts);
    assert_eq!(
        found.len(),
        ghosts.len(),
        "deleted secrets in the plain bundle: {found:?}"
    );
    // Per artifact, as planted: the note, the state (the PEM key as JSON escapes), the databases.
    let entries: BTreeMap<String, Vec<u8>> = tar_entries(&plain)
        .into_iter()
        .map(|(p, _, d)| (p, d))
        .collect();
    let has_all = |path: &str| {
        let data = entries
            .get(path)
            .unwrap_or_else(|| panic!("{path} in the bundle"));
        let missing: Vec<&str> = p
            .live
            .iter()
            .filter(|s| !contains(data, s.piece()))
            .map(|s| s.rule)
            .collect();
        assert!(missing.is_empty(), "{path} lacks {missing:?}");
    };
    has_all(&format!("memory_files/{NOTE}"));
    has_all("state/dream_run.json");
    has_all("sqlite/long_term.sqlite");
    has_all("sqlite/vector.sqlite");
    let lt = &entries["sqlite/long_term.sqlite"];
    let ghost_missing: Vec<&str> = ghosts
        .iter()
        .filter(|s| !contains(lt, &s.secret))
        .map(|s| s.rule)
        .collect();
    assert!(
        ghost_missing.is_empty(),
        "deleted rows should linger in long_term.sqlite's free space: {ghost_missing:?}"
    );
    // History is shipped, with the commit message.
    assert!(entries.keys().any(|k| k.starts_with("git/")));
    let git_bytes: Vec<u8> = entries
        .iter()
        .filter(|(k, _)| k.starts_with("git/"))
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    assert!(
        contains(&git_bytes, &p.live[p.commit_index].secret),
        "COMMIT_EDITMSG"
    );
}

#[test]
fn a_rules_file_adds_rules_and_a_bad_one_writes_nothing() {
    let f = Fixture::new();
    let token = format!("itk_{}", fake(LOWER_ALNUM, 32, 501));
    let other = format!("itk_{}", fake(LOWER_ALNUM, 32, 502));
    let note = format!(
        "# Internal API\n\nservice token {token} (staging)\n\n\
         curl -H 'Authorization: Bearer {other}' https://api.internal/v1\n"
    );
    fs::write(f.agent.memdir().join("topics/internal-api.md"), &note).expect("note");
    git(&f.agent.memdir(), &["add", "-A"]);
    git(
        &f.agent.memdir(),
        &[
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "-m",
            "internal api notes",
        ],
    );
    let id = f.snapshot_id();
    let rules = f.path("rules.toml");
    fs::write(
        &rules,
        "[[rule]]\nid = \"internal-token\"\npattern = 'itk_[a-z0-9]{32}'\n",
    )
    .expect("rules");
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/rules.tar.zst");
    let run = export(
        &f,
        &id,
        &bundle,
        &["--redact", "--redact-rules", rules.to_str().expect("utf-8")],
    );
    let rep = run.json();
    for t in [&token, &other] {
        assert!(!run.stdout.contains(t.as_str()) && !run.stderr.contains(t.as_str()));
    }
    let d = &rep["redaction"];
    // The rules file's rule wins over the generic bearer rule.
    assert_eq!(
        d["per_rule"],
        serde_json::json!({"internal-token": 2}),
        "{d:#}"
    );
    assert_eq!(
        d["per_artifact"],
        serde_json::json!({"memory_files/topics/internal-api.md": {"internal-token": 2}}),
        "{d:#}"
    );
    assert!(
        d["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .any(|r| r == "internal-token"),
        "{d:#}"
    );
    let plain = decompressed(&bundle);
    assert!(!contains(&plain, &token) && !contains(&plain, &other));
    assert!(!contains(&plain, &token[4..20]) && !contains(&plain, &other[4..20]));
    let manifest = manifest_of(&plain);
    assert_eq!(
        manifest["redactions"]["policy"],
        "memsnap:builtin+rules-file"
    );
    assert_eq!(manifest["redactions"]["matches_redacted"], 2);
    let entries: BTreeMap<String, Vec<u8>> = tar_entries(&plain)
        .into_iter()
        .map(|(p, _, d)| (p, d))
        .collect();
    let shipped =
        String::from_utf8(entries["memory_files/topics/internal-api.md"].clone()).expect("utf-8");
    assert_eq!(
        shipped,
        note.replace(&token, "[REDACTED:internal-token]")
            .replace(&other, "[REDACTED:internal-token]")
    );

    // An invalid pattern: exit 1, the file and the rule named, nothing written.
    let bad = f.path("bad-rules.toml");
    fs::write(
        &bad,
        "[[rule]]\nid = \"fine-rule\"\npattern = 'ok_[0-9]{8}'\n\n\
         [[rule]]\nid = \"broken-rule\"\npattern = 'itk_[a-z0-9'\n",
    )
    .expect("bad rules");
    let out_dir = f.path("out-bad");
    fs::create_dir_all(&out_dir).expect("mkdir");
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(out_dir.join("b.tar.zst"))
        .args(["--redact", "--redact-rules"])
        .arg(&bad)
        .run();
    assert_eq!(o.status.code(), Some(1), "{o}");
    assert!(
        o.stderr.contains(&bad.display().to_string()) && o.stderr.contains("broken-rule"),
        "{o}"
    );
    assert!(
        !o.stderr.contains("fine-rule"),
        "only the bad rule is named\n{o}"
    );
    let left = entries_in(&out_dir);
    assert!(left.is_empty(), "written: {left:?}");
    let tmp = f.store.join("tmp");
    let scratch: Vec<PathBuf> = fs::read_dir(&tmp)
        .map(|rd| rd.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "scratch left in the store: {scratch:?}");
    // The same with --json: one JSON error document.
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(out_dir.join("b.tar.zst"))
        .args(["--redact", "--redact-rules"])
        .arg(&bad)
        .arg("--json")
        .assert_exit_code(1);
    let err = o.json();
    assert!(str_of(&err, "error").contains("broken-rule"), "{o}");
    assert_eq!(fs::read_dir(&out_dir).expect("ls").count(), 0);
}

#[test]
fn redact_rules_without_redact_is_a_usage_error() {
    let f = Fixture::new();
    let id = f.snapshot_id();
    let rules = f.path("rules.toml");
    fs::write(
        &rules,
        "[[rule]]\nid = \"x-token\"\npattern = 'xt_[0-9]{8}'\n",
    )
    .expect("rules");
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let out = f.path("out/b.tar.zst");
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(&out)
        .arg("--redact-rules")
        .arg(&rules)
        .assert_exit_code(2);
    assert!(o.stderr.contains("--redact"), "{o}");
    assert_eq!(fs::read_dir(f.path("out")).expect("ls").count(), 0, "{o}");
}

/// Secrets in names, not contents: a note whose file name holds a token, and a symlink whose
/// target does. Names travel in tar headers, the manifest (`path_in_bundle`, `entries`,
/// `target`) and the report's `per_artifact` keys; none of them is content the redactor reads.
/// An export must either refuse (exit 1, nothing written) or ship none of them.
#[test]
fn a_secret_in_a_file_name_or_a_symlink_target_is_not_shipped() {
    let f = Fixture::new();
    let in_name = format!("ghp_{}", fake(ALNUM, 36, 601));
    let in_target = format!("ghp_{}", fake(ALNUM, 36, 602));
    let in_content = format!("AKIA{}", fake(UPPER, 16, 603));
    let memdir = f.agent.memdir();
    let note = format!("topics/token-{in_name}.md");
    fs::write(
        memdir.join(&note),
        format!("# Rotated token\n\naws_access_key_id = {in_content}\n"),
    )
    .expect("note");
    std::os::unix::fs::symlink(format!("keys/{in_target}"), memdir.join("current-key"))
        .expect("symlink");
    let id = f.snapshot_id();
    fs::create_dir_all(f.path("out")).expect("mkdir");
    let bundle = f.path("out/names.tar.zst");
    let o = f
        .cmd()
        .args(["export", &id, "--out"])
        .arg(&bundle)
        .args(["--redact", "--json"])
        .run();
    let tokens = [("file name", &in_name), ("symlink target", &in_target)];
    match o.status.code() {
        Some(1) => {
            assert_eq!(fs::read_dir(f.path("out")).expect("ls").count(), 0, "{o}");
        }
        Some(0) => {
            let plain = decompressed(&bundle);
            let mut shipped = Vec::new();
            for (what, t) in tokens {
                if contains(&plain, t) {
                    shipped.push(format!("the {what}'s token is in the bundle"));
                }
                if o.stdout.contains(t.as_str()) {
                    shipped.push(format!("the {what}'s token is in the export report"));
                }
            }
            assert!(!contains(&plain, &in_content), "the content's key");
            assert!(shipped.is_empty(), "export --redact shipped: {shipped:?}");
        }
        _ => panic!("unexpected exit code\n{o}"),
    }
}
