//! Secret redaction for exported bundles (`memsnap export --redact`).
//!
//! A [`Redactor`] is an ordered list of rules, each a byte regex whose match, or whose `secret`
//! group, is replaced by `[REDACTED:<rule-id>]`. Invariants:
//! - Matching is on bytes: memory files, state JSON and SQLite values need not be UTF-8.
//! - The marker holds no quote or backslash, and no rule ends or starts a replacement inside an
//!   escape sequence, so a secret inside a JSON string leaves a valid JSON string.
//! - A match whose secret part is only marker text is no secret: redacting twice changes nothing,
//!   and a later rule never counts an earlier replacement.
//! - Passes repeat until no rule matches, so `find_any(&redact(x))` is `None`: a count in the
//!   report always stands for a secret that is gone.
//!
//! Databases are rewritten through SQL (every TEXT and BLOB value; FTS indexes rebuilt), vacuumed,
//! then checked twice: value by value in every table, and as the raw bytes of the file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use regex::bytes::{Regex, RegexSet};
use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};

use crate::error::BundleError;

/// Rule id -> number of matches.
pub(crate) type Counts = BTreeMap<String, u64>;

/// Left context of a token, consumed but kept: the start of the data, a byte that cannot be part
/// of a token, or an escape (`\n`, `\u0022`) whose last byte is alphanumeric. Written `<L>` below.
const LEFT: &str = r"(?:^|(?-u:[^A-Za-z0-9])|\\[nrt]|\\u[0-9A-Fa-f]{4})";

/// Rules with a distinctive shape, most specific first. `private-key` leads so that no token rule
/// bites into a key's base64 body.
const SPECIFIC: &[(&str, &str)] = &[
    (
        "private-key",
        // With an END line: any bytes but a quote or a lone backslash (a JSON string never ends
        // inside). Without one (a truncated key): the base64 run that follows.
        r#"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:(?:(?-u:[^"\\])|\\\\?[nrt/])*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:(?-u:[A-Za-z0-9+/=:,.\s-])|\\\\?[nrt/])*)"#,
    ),
    (
        "anthropic-api-key",
        r"<L>(?P<secret>sk-ant-[A-Za-z0-9_-]{32,})",
    ),
    (
        "openai-api-key",
        r"<L>(?P<secret>sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}|sk-[A-Za-z0-9]{32,})",
    ),
    ("google-api-key", r"<L>(?P<secret>AIza[0-9A-Za-z_-]{35})"),
    ("groq-api-key", r"<L>(?P<secret>gsk_[A-Za-z0-9]{40,})"),
    ("huggingface-token", r"<L>(?P<secret>hf_[A-Za-z0-9]{30,})"),
    ("xai-api-key", r"<L>(?P<secret>xai-[A-Za-z0-9]{40,})"),
    (
        "perplexity-api-key",
        r"<L>(?P<secret>pplx-[A-Za-z0-9]{40,})",
    ),
    ("replicate-token", r"<L>(?P<secret>r8_[A-Za-z0-9]{30,})"),
    (
        "stripe-api-key",
        r"<L>(?P<secret>[rs]k_(?:live|test)_[A-Za-z0-9]{20,})",
    ),
    ("npm-token", r"<L>(?P<secret>npm_[A-Za-z0-9]{36,})"),
    (
        "github-token",
        r"<L>(?P<secret>gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    ),
    (
        "gitlab-token",
        r"<L>(?P<secret>gl(?:pat|ptt|dt|rt|soat|oas)-[A-Za-z0-9_-]{20,})",
    ),
    (
        "slack-webhook",
        r"https:(?:\\?/){2}hooks\.slack\.com\\?/(?:services|workflows|triggers)\\?/(?P<secret>(?:[A-Za-z0-9_+-]|\\?/){20,})",
    ),
    (
        "slack-token",
        r"<L>(?P<secret>xox[abeoprs]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,})",
    ),
    (
        "aws-access-key-id",
        r"<L>(?P<secret>(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{16})(?:$|(?-u:[^A-Za-z0-9]))",
    ),
    (
        "aws-secret-access-key",
        r#"(?i:(?:aws_?)?secret_?access_?key)\\?["']?[ \t]*[:=][ \t]*\\?["']?(?P<secret>[A-Za-z0-9/+=]{40})(?:$|(?-u:[^A-Za-z0-9/+=]))"#,
    ),
    (
        "jwt",
        r"<L>(?P<secret>eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
    ),
];

/// Rules that recognise a secret by its context only. They come after the rules of a rules file,
/// so that `Bearer <internal token>` counts under the more specific rule.
const GENERIC: &[(&str, &str)] = &[
    (
        "bearer-token",
        r"<L>(?i:bearer)(?:[ \t]|\\t)+(?P<secret>[A-Za-z0-9._~+/=-]{16,})",
    ),
    (
        "basic-auth",
        r#"(?i:authorization)\\?["']?[ \t]*[:=][ \t]*\\?["']?(?i:basic)[ \t]+(?P<secret>[A-Za-z0-9+/]{8,}={0,2})"#,
    ),
    (
        "connection-string-password",
        r#"[A-Za-z][A-Za-z0-9+.-]+:(?:\\?/){2}(?-u:[^\s:/@"'\\<>\[\]])*:(?P<secret>(?-u:[^\s/@"'\\<>])+)@"#,
    ),
];

static MARKER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[REDACTED:[a-z0-9-]+\]").expect("marker regex"));

/// How far before `from` a search starts, so that left context (`<L>`, `key = `) is seen.
const LOOKBACK: usize = 256;

#[derive(Clone)]
struct Rule {
    id: String,
    re: Regex,
    /// Index of the `secret` group; without one the whole match is replaced.
    secret: Option<usize>,
    marker: Vec<u8>,
}

impl Rule {
    fn new(id: &str, re: Regex) -> Self {
        let secret = re.capture_names().position(|n| n == Some("secret"));
        let marker = format!("[REDACTED:{id}]").into_bytes();
        Self {
            id: id.to_owned(),
            re,
            secret,
            marker,
        }
    }

    /// The first secret that starts at or after `from`, widened over any marker it overlaps.
    /// Matches whose secret part holds nothing but marker text are passed over.
    fn find(&self, hay: &[u8], from: usize, markers: &[Range<usize>]) -> Option<Range<usize>> {
        let mut at = from.saturating_sub(LOOKBACK);
        while at <= hay.len() {
            let (whole, secret) = match self.secret {
                Some(g) => {
                    let c = self.re.captures_at(hay, at)?;
                    let whole = c.get(0)?.range();
                    // A `secret` group that took no part: the whole match is the secret.
                    (whole.clone(), c.get(g).map_or(whole, |m| m.range()))
                }
                None => {
                    let m = self.re.find_at(hay, at)?;
                    (m.range(), m.range())
                }
            };
            if secret.start >= from
                && let Some(s) = settle(secret, hay, markers)
            {
                return Some(s);
            }
            at = whole.start + 1;
        }
        None
    }
}

/// `span` widened to whole markers, or `None` when no byte outside markers could be a secret.
fn settle(span: Range<usize>, hay: &[u8], markers: &[Range<usize>]) -> Option<Range<usize>> {
    let real = |r: Range<usize>| {
        hay[r]
            .iter()
            .any(|&b| b.is_ascii_alphanumeric() || b >= 0x80)
    };
    let (mut lo, mut hi, mut cursor, mut any) = (span.start, span.end, span.start, false);
    let first = markers.partition_point(|m| m.end <= span.start);
    for m in markers[first..].iter().take_while(|m| m.start < span.end) {
        any |= cursor < m.start && real(cursor..m.start);
        cursor = cursor.max(m.end);
        lo = lo.min(m.start);
        hi = hi.max(m.end);
    }
    any |= cursor < span.end && real(cursor..span.end);
    any.then_some(lo..hi)
}

fn markers(hay: &[u8]) -> Vec<Range<usize>> {
    MARKER.find_iter(hay).map(|m| m.range()).collect()
}

/// Secret redaction rules; see the module documentation.
#[derive(Clone)]
pub(crate) struct Redactor {
    rules: Vec<Rule>,
    /// All rules at once: one pass tells which rules can match at all.
    set: RegexSet,
}

impl Redactor {
    /// The built-in rules.
    pub(crate) fn builtin() -> Self {
        Self::assemble(Vec::new()).expect("built-in rules compile")
    }

    /// Built-in rules plus the `[[rule]]` tables of a TOML file, placed after the specific
    /// built-in rules and before the generic ones.
    pub(crate) fn with_rules_file(path: &Path) -> Result<Self, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|e| BundleError::io(path, e))?;
        let config = |message: String| BundleError::RedactConfig {
            path: path.to_owned(),
            message,
        };
        let extra = parse_rules(&text).map_err(config)?;
        Self::assemble(extra)
            .map_err(|e| config(format!("the rules together are too large to compile: {e}")))
    }

    fn assemble(extra: Vec<Rule>) -> Result<Self, regex::Error> {
        let builtin = |list: &[(&str, &str)]| -> Vec<Rule> {
            list.iter()
                .map(|(id, p)| Rule::new(id, Regex::new(&p.replace("<L>", LEFT)).expect(id)))
                .collect()
        };
        let mut rules = builtin(SPECIFIC);
        rules.extend(extra);
        rules.extend(builtin(GENERIC));
        let set = RegexSet::new(rules.iter().map(|r| r.re.as_str()))?;
        Ok(Self { rules, set })
    }

    /// Rule ids, in the order rules are applied.
    pub(crate) fn rule_ids(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.id.clone()).collect()
    }

    /// Replaces every secret by `[REDACTED:<rule-id>]` and adds the matches to `counts`.
    /// `Cow::Borrowed` when nothing matched.
    pub(crate) fn redact<'a>(&self, data: &'a [u8], counts: &mut Counts) -> Cow<'a, [u8]> {
        let mut out = Cow::Borrowed(data);
        // Each change turns at least one byte of secret into marker text, so this ends. Another
        // pass catches what a replacement exposed: `AIza...]sk-ant-...` gains a left boundary.
        loop {
            let hits = self.set.matches(&out);
            let mut changed = false;
            for (i, rule) in self.rules.iter().enumerate() {
                if !hits.matched(i) {
                    continue;
                }
                let marks = markers(&out);
                let mut spans = Vec::new();
                while let Some(s) = rule.find(
                    &out,
                    spans.last().map_or(0, |s: &Range<usize>| s.end),
                    &marks,
                ) {
                    spans.push(s);
                }
                if spans.is_empty() {
                    continue;
                }
                *counts.entry(rule.id.clone()).or_default() += spans.len() as u64;
                let mut next = Vec::with_capacity(out.len());
                let mut kept = 0;
                for s in spans {
                    next.extend_from_slice(&out[kept..s.start]);
                    next.extend_from_slice(&rule.marker);
                    kept = s.end;
                }
                next.extend_from_slice(&out[kept..]);
                out = Cow::Owned(next);
                changed = true;
            }
            if !changed {
                return out;
            }
        }
    }

    /// The id of a rule that matches somewhere in `data` (the first in rule order), if any.
    pub(crate) fn find_any(&self, data: &[u8]) -> Option<String> {
        let hits = self.set.matches(data);
        if !hits.matched_any() {
            return None;
        }
        let marks = markers(data);
        hits.iter()
            .map(|i| &self.rules[i])
            .find(|r| r.find(data, 0, &marks).is_some())
            .map(|r| r.id.clone())
    }

    /// "N secret(s) of rule X": the first rule in rule order that has a count.
    fn describe(&self, found: &Counts) -> Option<String> {
        let (id, n) = self
            .rules
            .iter()
            .find_map(|r| found.get(&r.id).map(|n| (&r.id, *n)))?;
        let others: u64 = found.values().sum::<u64>() - n;
        let more = if others > 0 {
            format!(" and {others} of other rules")
        } else {
            String::new()
        };
        Some(format!("{n} secret(s) of rule {id}{more}"))
    }

    /// Redacts a private, closed copy of a SQLite database in place, then checks that no secret
    /// is left anywhere in the file. Adds the matches to `counts` only on success.
    pub(crate) fn redact_database(
        &self,
        path: &Path,
        counts: &mut Counts,
    ) -> Result<(), BundleError> {
        let fail = |message: String| BundleError::Redaction {
            artifact: path.display().to_string(),
            message,
        };
        let tally = Arc::new(Mutex::new(Counts::new()));
        self.rewrite_database(path, &tally).map_err(fail)?;

        // The last gate sees what SQL cannot: free space, the schema, pages of any kind.
        let mut scanner = SecretScanner::new(self);
        let mut file = std::fs::File::open(path).map_err(|e| BundleError::io(path, e))?;
        let mut piece = vec![0; 1 << 20];
        loop {
            match file.read(&mut piece) {
                Ok(0) => break,
                Ok(n) => scanner.feed(&piece[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BundleError::io(path, e)),
            }
        }
        if let Some(what) = self.describe(&scanner.tally()) {
            return Err(fail(format!(
                "{what} remain in the database after redaction (e.g. in a table memsnap cannot rewrite)"
            )));
        }
        let tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, n) in tally.iter() {
            *counts.entry(id.clone()).or_default() += n;
        }
        Ok(())
    }

    fn rewrite_database(&self, path: &Path, tally: &Arc<Mutex<Counts>>) -> Result<(), String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(path, flags).map_err(|e| format!("cannot open: {e}"))?;
        let setup = || -> rusqlite::Result<String> {
            conn.pragma_update(None, "secure_delete", "ON")?;
            conn.pragma_update(None, "foreign_keys", "OFF")?;
            // Triggers would copy old values elsewhere or touch timestamps; FTS indexes that they
            // keep in sync are rebuilt below instead.
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
            self.register(&conn, tally)?;
            // The copy may carry a WAL header without its -wal file; the result is rollback mode.
            conn.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
        };
        let mode = setup().map_err(|e| format!("cannot prepare the database: {e}"))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(format!(
                "cannot leave journal mode {mode} for rollback mode"
            ));
        }
        let schema = Schema::read(&conn).map_err(|e| format!("cannot read the schema: {e}"))?;

        let tx = conn
            .unchecked_transaction()
            .map_err(|e| format!("cannot begin the rewrite: {e}"))?;
        for t in &schema.tables {
            let cols = columns(&conn, t, false).map_err(|e| format!("table {t:?}: {e}"))?;
            update(&conn, t, &cols).map_err(|e| format!("cannot rewrite table {t:?}: {e}"))?;
        }
        // Index samples in statistics are copies of key values; the planner does without them.
        for stat in ["sqlite_stat3", "sqlite_stat4"] {
            if schema.internal.iter().any(|t| t.eq_ignore_ascii_case(stat)) {
                conn.execute(
                    &format!("DELETE FROM {stat} WHERE memsnap_has_secret(sample)"),
                    [],
                )
                .map_err(|e| format!("cannot clean {stat}: {e}"))?;
            }
        }
        for fts in &schema.fts {
            let name = &fts.name;
            let unreadable = |e: rusqlite::Error| {
                format!("full-text table {name:?} cannot be read or rebuilt: {e}")
            };
            match fts.content {
                FtsContent::Contentless => {
                    return Err(format!(
                        "full-text table {name:?} is contentless (content=''): its index keeps the \
                         words of the original text and cannot be redacted; drop it or give it a \
                         content table before exporting with --redact"
                    ));
                }
                FtsContent::Own => {
                    let cols = columns(&conn, name, false).map_err(unreadable)?;
                    update(&conn, name, &cols).map_err(unreadable)?;
                }
                // Its content table was rewritten above; the rebuild re-reads it.
                FtsContent::External => {}
            }
            // A rebuild (FTS4/5) or a full merge (FTS3) leaves no segment that holds old words.
            let command = if fts.module == "fts3" {
                "optimize"
            } else {
                "rebuild"
            };
            let q = quote(name);
            conn.execute(&format!("INSERT INTO {q}({q}) VALUES('{command}')"), [])
                .map_err(unreadable)?;
        }
        for (name, module) in &schema.other_virtual {
            let unreadable = |e: rusqlite::Error| {
                format!(
                    "virtual table {name:?} (module {module}) cannot be read: {e}; memsnap cannot \
                     tell whether it holds secrets"
                )
            };
            let cols = columns(&conn, name, false).map_err(unreadable)?;
            if count_secrets(&conn, name, &cols).map_err(unreadable)? > 0 {
                update(&conn, name, &cols).map_err(|e| {
                    format!("virtual table {name:?} (module {module}) holds secrets and cannot be rewritten: {e}")
                })?;
            }
        }
        tx.commit()
            .map_err(|e| format!("cannot commit the rewrite: {e}"))?;

        self.check_tables(&conn, &schema)?;
        // A fresh file: no free page or cell slack keeps an old value.
        conn.execute_batch("VACUUM")
            .map_err(|e| format!("VACUUM failed: {e}"))?;
        conn.close().map_err(|(_, e)| format!("cannot close: {e}"))
    }

    /// Registers `memsnap_has_secret(x)` and `memsnap_redact(x)`: TEXT stays TEXT, BLOB stays
    /// BLOB, other values pass through; `memsnap_redact` counts into `tally`.
    fn register(&self, conn: &Connection, tally: &Arc<Mutex<Counts>>) -> rusqlite::Result<()> {
        // Not deterministic: SQLite must call it once per value for the counts to be exact.
        let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DIRECTONLY;
        let detector = self.clone();
        conn.create_scalar_function("memsnap_has_secret", 1, flags, move |ctx| {
            Ok(match ctx.get_raw(0) {
                ValueRef::Text(b) | ValueRef::Blob(b) => detector.find_any(b).is_some(),
                _ => false,
            })
        })?;
        let redactor = self.clone();
        let tally = Arc::clone(tally);
        conn.create_scalar_function("memsnap_redact", 1, flags, move |ctx| {
            let mut counts = tally.lock().unwrap_or_else(PoisonError::into_inner);
            Ok(match ctx.get_raw(0) {
                ValueRef::Text(b) => match redactor.redact(b, &mut counts) {
                    Cow::Owned(v) => Out::Text(v),
                    Cow::Borrowed(_) => Out::Same,
                },
                ValueRef::Blob(b) => match redactor.redact(b, &mut counts) {
                    Cow::Owned(v) => Out::Blob(v),
                    Cow::Borrowed(_) => Out::Same,
                },
                _ => Out::Same,
            })
        })
    }

    /// Reads every value of every real table, the schema and shadow tables included, and fails if
    /// one still holds a secret. Values never leave this function: only counts do.
    fn check_tables(&self, conn: &Connection, schema: &Schema) -> Result<(), String> {
        let all = schema
            .tables
            .iter()
            .chain(&schema.internal)
            .chain(&schema.shadow);
        for t in std::iter::once("sqlite_schema").chain(all.map(String::as_str)) {
            let check = || -> rusqlite::Result<Counts> {
                let mut found = Counts::new();
                for chunk in columns(conn, t, true)?.chunks(COLUMNS_PER_STATEMENT) {
                    let sql = format!(
                        "SELECT {} FROM {} WHERE {}",
                        chunk
                            .iter()
                            .map(|c| quote(c))
                            .collect::<Vec<_>>()
                            .join(", "),
                        quote(t),
                        has_secret(chunk)
                    );
                    let mut stmt = conn.prepare(&sql)?;
                    let mut rows = stmt.query([])?;
                    while let Some(row) = rows.next()? {
                        for i in 0..chunk.len() {
                            if let ValueRef::Text(b) | ValueRef::Blob(b) = row.get_ref(i)? {
                                let _ = self.redact(b, &mut found);
                            }
                        }
                    }
                }
                Ok(found)
            };
            let found = check().map_err(|e| format!("cannot check table {t:?}: {e}"))?;
            if let Some(what) = self.describe(&found) {
                return Err(format!(
                    "{what} remain in table {t:?} after redaction (memsnap cannot rewrite it)"
                ));
            }
        }
        Ok(())
    }
}

/// The result of `memsnap_redact`: the argument itself when nothing changed.
enum Out {
    Same,
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl ToSql for Out {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Self::Same => ToSqlOutput::Arg(0),
            Self::Text(b) => ToSqlOutput::Borrowed(ValueRef::Text(b)),
            Self::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// Keeps each statement's OR chain well below SQLite's expression depth limit (1000).
const COLUMNS_PER_STATEMENT: usize = 64;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn has_secret(cols: &[String]) -> String {
    let tests: Vec<_> = cols
        .iter()
        .map(|c| format!("memsnap_has_secret({})", quote(c)))
        .collect();
    tests.join(" OR ")
}

/// Column names of `table`: the writable ones, or with `all` also generated and hidden ones.
fn columns(conn: &Connection, table: &str, all: bool) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name, hidden FROM pragma_table_xinfo(?1)")?;
    let rows = stmt.query_map([table], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut names = Vec::new();
    for row in rows {
        let (name, hidden) = row?;
        // hidden: 0 ordinary, 1 hidden column of a virtual table, 2/3 generated column.
        if hidden == 0 || (all && hidden != 1) {
            names.push(name);
        }
    }
    Ok(names)
}

fn update(conn: &Connection, table: &str, cols: &[String]) -> rusqlite::Result<()> {
    for chunk in cols.chunks(COLUMNS_PER_STATEMENT) {
        let set: Vec<_> = chunk
            .iter()
            .map(|c| format!("{q} = memsnap_redact({q})", q = quote(c)))
            .collect();
        let sql = format!(
            "UPDATE {} SET {} WHERE {}",
            quote(table),
            set.join(", "),
            has_secret(chunk)
        );
        conn.execute(&sql, [])?;
    }
    Ok(())
}

fn count_secrets(conn: &Connection, table: &str, cols: &[String]) -> rusqlite::Result<i64> {
    let mut n = 0;
    for chunk in cols.chunks(COLUMNS_PER_STATEMENT) {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {}",
            quote(table),
            has_secret(chunk)
        );
        n += conn.query_row(&sql, [], |r| r.get::<_, i64>(0))?;
    }
    Ok(n)
}

enum FtsContent {
    /// Keeps its text in its own `<name>_content` table.
    Own,
    /// `content='table'`: indexes another table's rows.
    External,
    /// `content=''`: only the index exists.
    Contentless,
}

struct Fts {
    name: String,
    /// `fts3`, `fts4` or `fts5`.
    module: String,
    content: FtsContent,
}

/// The tables of a database, sorted by how redaction treats them.
#[derive(Default)]
struct Schema {
    /// Ordinary tables (rowid or WITHOUT ROWID): rewritten value by value.
    tables: Vec<String>,
    /// `sqlite_%` tables: never rewritten, only checked.
    internal: Vec<String>,
    /// Shadow tables of FTS tables: rebuilt through their FTS table, then checked.
    shadow: Vec<String>,
    fts: Vec<Fts>,
    /// Other virtual tables, with their module.
    other_virtual: Vec<(String, String)>,
}

impl Schema {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        static USING: LazyLock<regex::Regex> = LazyLock::new(|| {
            regex::Regex::new(
                r"(?is)^\s*CREATE\s+VIRTUAL\s+TABLE\s.*?\bUSING\s+(\w+)\s*(?:\((.*)\))?\s*;?\s*$",
            )
            .expect("USING regex")
        });
        static CONTENT: LazyLock<regex::Regex> = LazyLock::new(|| {
            regex::Regex::new(
                r#"(?i)(?:^|,)\s*content\s*=\s*(?:'((?:[^']|'')*)'|"((?:[^"]|"")*)"|\[([^\]]*)\]|`([^`]*)`|([^\s,)]*))"#,
            )
            .expect("content regex")
        });
        let mut stmt = conn.prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'table'")?;
        let entries: Vec<(String, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let lower: Vec<String> = entries.iter().map(|(n, _)| n.to_lowercase()).collect();
        let mut schema = Self::default();
        let mut shadow_names = Vec::new();
        for (name, sql) in &entries {
            let Some(caps) = sql.as_deref().and_then(|s| USING.captures(s)) else {
                continue;
            };
            let module = caps[1].to_lowercase();
            if !matches!(module.as_str(), "fts3" | "fts4" | "fts5") {
                schema.other_virtual.push((name.clone(), module));
                continue;
            }
            let prefix = format!("{}_", name.to_lowercase());
            for suffix in [
                "content", "data", "idx", "docsize", "config", "segments", "segdir", "stat",
            ] {
                shadow_names.push(format!("{prefix}{suffix}"));
            }
            let own = lower.contains(&format!("{prefix}content"));
            let external = caps
                .get(2)
                .and_then(|args| CONTENT.captures(args.as_str()))
                .is_some_and(|c| (1..=5).any(|i| c.get(i).is_some_and(|m| !m.as_str().is_empty())));
            let content = match (own, external) {
                (true, _) => FtsContent::Own,
                (false, true) => FtsContent::External,
                (false, false) => FtsContent::Contentless,
            };
            schema.fts.push(Fts {
                name: name.clone(),
                module,
                content,
            });
        }
        for ((name, sql), low) in entries.iter().zip(&lower) {
            let list = if sql.as_deref().is_some_and(|s| USING.is_match(s)) {
                continue;
            } else if low.starts_with("sqlite_") {
                &mut schema.internal
            } else if shadow_names.contains(low) {
                &mut schema.shadow
            } else {
                &mut schema.tables
            };
            list.push(name.clone());
        }
        Ok(schema)
    }
}

/// Detection over a stream fed in pieces. Keeps an overlap tail so that a secret straddling two
/// pieces is seen whole; counts each secret once.
pub(crate) struct SecretScanner<'r> {
    redactor: &'r Redactor,
    /// Unscanned or overlap bytes; `buf[0]` is at offset `base` of the stream.
    buf: Vec<u8>,
    base: usize,
    /// Per rule: secrets that start before this offset are counted or ruled out.
    from: Vec<usize>,
    counts: Vec<u64>,
    /// Bytes kept for the next scan; a secret must be shorter than three quarters of it.
    overlap: usize,
    /// The buffer size that triggers a scan (larger: fewer re-scans of the overlap).
    window: usize,
}

impl<'r> SecretScanner<'r> {
    pub(crate) fn new(r: &'r Redactor) -> Self {
        Self::with_sizes(r, 64 << 10, 1 << 20)
    }

    fn with_sizes(redactor: &'r Redactor, overlap: usize, window: usize) -> Self {
        let n = redactor.rules.len();
        Self {
            redactor,
            buf: Vec::new(),
            base: 0,
            from: vec![0; n],
            counts: vec![0; n],
            overlap,
            window,
        }
    }

    pub(crate) fn feed(&mut self, piece: &[u8]) {
        self.buf.extend_from_slice(piece);
        if self.buf.len() >= self.window {
            self.scan(false);
        }
    }

    /// The first rule id (in rule order) found, if any.
    #[cfg(test)]
    fn finish(self) -> Option<String> {
        let r = self.redactor;
        let counts = self.tally();
        r.rules
            .iter()
            .find(|rule| counts.contains_key(&rule.id))
            .map(|rule| rule.id.clone())
    }

    fn tally(mut self) -> Counts {
        self.scan(true);
        let rules = &self.redactor.rules;
        rules
            .iter()
            .zip(&self.counts)
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.id.clone(), *n))
            .collect()
    }

    fn scan(&mut self, last: bool) {
        let end = self.buf.len();
        // A secret ending within `guard` of the end might still grow with the next piece.
        let guard = self.overlap / 4;
        let horizon = end.saturating_sub(self.overlap);
        let lo = self.from.iter().min().map_or(0, |f| f - self.base);
        let hits = self
            .redactor
            .set
            .matches(&self.buf[lo.saturating_sub(LOOKBACK)..]);
        let marks = markers(&self.buf);
        for (i, rule) in self.redactor.rules.iter().enumerate() {
            let mut at = self.from[i] - self.base;
            if hits.matched(i) {
                while let Some(s) = rule.find(&self.buf, at, &marks) {
                    // Deferred to the next scan, unless the trim would cut it off.
                    if !last && s.end + guard > end && s.start >= horizon {
                        break;
                    }
                    self.counts[i] += 1;
                    at = s.end;
                }
            }
            self.from[i] = self.base + at.max(horizon);
        }
        if !last {
            let keep = self
                .from
                .iter()
                .min()
                .map_or(0, |f| f - self.base)
                .saturating_sub(LOOKBACK);
            self.buf.drain(..keep);
            self.base += keep;
        }
    }
}

/// Parses the `[[rule]]` tables of a rules file into rules; the message names the bad rule.
fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| format!("not valid TOML: {e}"))?;
    let mut rules: Vec<Rule> = Vec::new();
    for (key, value) in doc {
        if key != "rule" {
            return Err(format!(
                "unknown key {key:?}: a rules file holds only [[rule]] tables"
            ));
        }
        let toml::Value::Array(items) = value else {
            return Err("`rule` must be written as [[rule]] tables".into());
        };
        for (n, item) in items.into_iter().enumerate() {
            let toml::Value::Table(t) = item else {
                return Err(format!("rule #{}: not a table", n + 1));
            };
            let id = match t.get("id") {
                Some(toml::Value::String(s)) => s.clone(),
                Some(_) => return Err(format!("rule #{}: id must be a string", n + 1)),
                None => return Err(format!("rule #{}: id is missing", n + 1)),
            };
            let who = format!("rule {id:?}");
            if let Some(k) = t.keys().find(|k| !matches!(k.as_str(), "id" | "pattern")) {
                return Err(format!("{who}: unknown key {k:?} (allowed: id, pattern)"));
            }
            let Some(toml::Value::String(pattern)) = t.get("pattern") else {
                return Err(format!("{who}: pattern is missing or not a string"));
            };
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!("{who}: an id is 1-64 characters of [a-z0-9-]"));
            }
            let builtin = SPECIFIC.iter().chain(GENERIC).any(|(b, _)| *b == id);
            if builtin {
                return Err(format!(
                    "{who}: this id is a built-in rule's; choose another"
                ));
            }
            if rules.iter().any(|r| r.id == id) {
                return Err(format!("{who}: this id is used twice"));
            }
            let re = Regex::new(pattern).map_err(|e| format!("{who}: invalid pattern: {e}"))?;
            if matches_empty(&re) {
                return Err(format!(
                    "{who}: the pattern matches the empty string; it must match at least one byte"
                ));
            }
            rules.push(Rule::new(&id, re));
        }
    }
    Ok(rules)
}

/// Whether `re` can match the empty string, probed at every position of a few texts. (A miss is
/// harmless: `Rule::find` skips empty secrets.)
fn matches_empty(re: &Regex) -> bool {
    let probes: [&[u8]; 6] = [b"", b"a", b"Z9", b" _-.\n", b"a b\tc", b"\xff[REDACTED:x]"];
    probes.iter().any(|p| re.find_iter(p).any(|m| m.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random text over `set`, so no secret-looking literal sits in the source.
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
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const URLSAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

    fn pem(kind: &str, seed: u64) -> String {
        let label = if kind.is_empty() {
            "PRIVATE KEY".to_owned()
        } else {
            format!("{kind} PRIVATE KEY")
        };
        let body: Vec<String> = (0..25).map(|i| fake(B64, 64, seed * 100 + i)).collect();
        format!(
            "-----BEGIN {label}-----\n{}\n{}==\n-----END {label}-----",
            body.join("\n"),
            fake(B64, 30, seed)
        )
    }

    struct Sample {
        rule: &'static str,
        /// The text as written, with its context.
        text: String,
        /// The part that must disappear.
        secret: String,
    }

    fn sample(rule: &'static str, context: &str, secret: String) -> Sample {
        Sample {
            rule,
            text: context.replace("{}", &secret),
            secret,
        }
    }

    /// One realistic fake secret per built-in rule.
    fn samples() -> Vec<Sample> {
        let jwt = format!(
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ{}.{}",
            fake(URLSAFE, 60, 1),
            fake(URLSAFE, 43, 2)
        );
        vec![
            sample("private-key", "```\n{}\n```", pem("RSA", 3)),
            sample(
                "anthropic-api-key",
                "ANTHROPIC_API_KEY={}",
                format!("sk-ant-api03-{}AA", fake(URLSAFE, 93, 4)),
            ),
            sample(
                "openai-api-key",
                "the key is {} for now",
                format!("sk-proj-{}", fake(URLSAFE, 156, 5)),
            ),
            sample(
                "google-api-key",
                "maps: {}",
                format!("AIza{}", fake(URLSAFE, 35, 6)),
            ),
            sample(
                "groq-api-key",
                "groq `{}`",
                format!("gsk_{}", fake(ALNUM, 52, 7)),
            ),
            sample(
                "huggingface-token",
                "HF_TOKEN={}",
                format!("hf_{}", fake(ALNUM, 34, 8)),
            ),
            sample(
                "xai-api-key",
                "xai: {}",
                format!("xai-{}", fake(ALNUM, 80, 9)),
            ),
            sample(
                "perplexity-api-key",
                "pplx key ({})",
                format!("pplx-{}", fake(ALNUM, 48, 10)),
            ),
            sample(
                "replicate-token",
                "REPLICATE_API_TOKEN='{}'",
                format!("r8_{}", fake(ALNUM, 37, 11)),
            ),
            sample(
                "stripe-api-key",
                "stripe {}",
                format!("sk_live_{}", fake(ALNUM, 24, 12)),
            ),
            sample(
                "npm-token",
                "//registry.npmjs.org/:_authToken={}",
                format!("npm_{}", fake(ALNUM, 36, 13)),
            ),
            sample(
                "github-token",
                "git push with {}",
                format!("ghp_{}", fake(ALNUM, 36, 14)),
            ),
            sample(
                "gitlab-token",
                "gitlab: {}.",
                format!("glpat-{}", fake(URLSAFE, 20, 15)),
            ),
            sample(
                "slack-webhook",
                "post to https://hooks.slack.com/services/{} daily",
                format!(
                    "T{}/B{}/{}",
                    fake(UPPER, 8, 16),
                    fake(UPPER, 10, 17),
                    fake(ALNUM, 24, 18)
                ),
            ),
            sample(
                "slack-token",
                "bot token {}",
                format!(
                    "xoxb-{}-{}-{}",
                    fake(b"0123456789", 12, 19),
                    fake(b"0123456789", 13, 20),
                    fake(ALNUM, 24, 21)
                ),
            ),
            sample(
                "aws-access-key-id",
                "aws_access_key_id = {}",
                format!("AKIA{}", fake(UPPER, 16, 22)),
            ),
            sample(
                "aws-secret-access-key",
                "aws_secret_access_key = {}",
                fake(B64, 40, 23),
            ),
            sample("jwt", "session cookie {}", jwt),
            sample(
                "bearer-token",
                "curl -H 'Authorization: Bearer {}'",
                fake(URLSAFE, 40, 24),
            ),
            sample(
                "basic-auth",
                "Authorization: Basic {}",
                format!("{}==", fake(B64, 30, 25)),
            ),
            sample(
                "connection-string-password",
                "DATABASE_URL=postgres://app:{}@db.internal:5432/app",
                fake(ALNUM, 20, 26),
            ),
        ]
    }

    /// No byte of any secret survives: neither whole nor a distinctive 12-byte piece of it.
    fn assert_clean(out: &[u8], samples: &[Sample]) {
        let text = String::from_utf8_lossy(out);
        for s in samples {
            let mid = s.secret.len() / 2 - 6;
            let piece = &s.secret[mid..mid + 12];
            assert!(!text.contains(&s.secret), "{} survived", s.rule);
            assert!(
                !text.contains(piece),
                "a piece of the {} secret survived",
                s.rule
            );
        }
    }

    fn one_each(samples: &[Sample]) -> Counts {
        samples.iter().map(|s| (s.rule.to_owned(), 1)).collect()
    }

    #[test]
    fn every_builtin_rule_has_a_sample() {
        let ids = Redactor::builtin().rule_ids();
        let covered: Vec<_> = samples().iter().map(|s| s.rule.to_owned()).collect();
        assert_eq!(ids, covered);
    }

    #[test]
    fn redacts_each_rule_in_markdown() {
        let r = Redactor::builtin();
        let samples = samples();
        let mut doc = String::from("# Agent memory\n\nThings I learned:\n\n");
        for s in &samples {
            doc.push_str(&format!("- {}\n", s.text));
        }
        let mut counts = Counts::new();
        let out = r.redact(doc.as_bytes(), &mut counts);
        assert_eq!(counts, one_each(&samples));
        assert_clean(&out, &samples);
        let text = String::from_utf8(out.to_vec()).unwrap();
        for s in &samples {
            assert!(
                text.contains(&format!("[REDACTED:{}]", s.rule)),
                "{}",
                s.rule
            );
        }
        // Only the secret part goes.
        assert!(text.contains("Authorization: Bearer [REDACTED:bearer-token]"));
        assert!(text.contains("postgres://app:[REDACTED:connection-string-password]@db.internal"));
        assert!(text.contains("aws_secret_access_key = [REDACTED:aws-secret-access-key]"));
        assert!(text.contains("https://hooks.slack.com/services/[REDACTED:slack-webhook] daily"));
        assert!(text.contains("- ANTHROPIC_API_KEY=[REDACTED:anthropic-api-key]\n"));
    }

    #[test]
    fn redacted_json_stays_valid() {
        let r = Redactor::builtin();
        let samples = samples();
        // Each secret follows a `\n` escape, and the PEM key's newlines are escapes too.
        let obj: serde_json::Map<String, serde_json::Value> = samples
            .iter()
            .map(|s| {
                (
                    s.rule.to_owned(),
                    format!("first line\n{}\ttail", s.text).into(),
                )
            })
            .collect();
        let value = serde_json::Value::Object(obj);
        for json in [
            serde_json::to_vec(&value).unwrap(),
            serde_json::to_vec_pretty(&value).unwrap(),
        ] {
            let mut counts = Counts::new();
            let out = r.redact(&json, &mut counts);
            assert_eq!(counts, one_each(&samples));
            assert_clean(&out, &samples);
            let back: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
            for s in &samples {
                let v = back[s.rule].as_str().unwrap();
                assert!(
                    v.starts_with("first line\n") && v.ends_with("\ttail"),
                    "{v}"
                );
                assert!(v.contains(&format!("[REDACTED:{}]", s.rule)), "{v}");
            }
        }
    }

    #[test]
    fn variants_of_keys_and_tokens() {
        let r = Redactor::builtin();
        let cases = [
            ("openai-api-key", format!("sk-{}", fake(ALNUM, 48, 30))),
            (
                "openai-api-key",
                format!("sk-svcacct-{}", fake(URLSAFE, 60, 31)),
            ),
            (
                "openai-api-key",
                format!("sk-admin-{}", fake(URLSAFE, 60, 32)),
            ),
            (
                "github-token",
                format!("github_pat_{}", fake(ALNUM, 82, 33)),
            ),
            ("github-token", format!("gho_{}", fake(ALNUM, 36, 34))),
            ("slack-token", format!("xapp-1-{}", fake(ALNUM, 30, 35))),
            ("aws-access-key-id", format!("ASIA{}", fake(UPPER, 16, 36))),
            ("private-key", pem("", 37)),
            ("private-key", pem("EC", 38)),
            ("private-key", pem("OPENSSH", 39)),
            ("private-key", pem("ENCRYPTED", 40)),
            ("private-key", pem("RSA", 41).replace('\n', "\r\n")),
            ("private-key", pem("RSA", 42).replace('\n', "\\n")),
            // Truncated: no END line.
            (
                "private-key",
                pem("RSA", 43)
                    .split("\n-----END")
                    .next()
                    .unwrap()
                    .to_owned(),
            ),
        ];
        for (rule, secret) in cases {
            for text in [
                secret.clone(),
                format!("x {secret} y"),
                format!("\"{secret}\""),
            ] {
                let mut counts = Counts::new();
                let out = r.redact(text.as_bytes(), &mut counts);
                assert_eq!(counts, Counts::from([(rule.to_owned(), 1)]), "{text}");
                assert_clean(
                    &out,
                    &[Sample {
                        rule,
                        text: text.clone(),
                        secret: secret.clone(),
                    }],
                );
            }
        }
        // The bearer and JSON forms of AWS secrets; the JWT wins over the bearer rule.
        let secret = fake(B64, 40, 44);
        let mut counts = Counts::new();
        let text = format!(
            r#"{{"AccessKeyId":"AKIA{}","SecretAccessKey":"{secret}"}}"#,
            fake(UPPER, 16, 45)
        );
        let out = r.redact(text.as_bytes(), &mut counts);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"AccessKeyId":"[REDACTED:aws-access-key-id]","SecretAccessKey":"[REDACTED:aws-secret-access-key]"}"#
        );
        let mut counts = Counts::new();
        let jwt = samples().swap_remove(17).secret;
        let out = r
            .redact(
                format!("Authorization: Bearer {jwt}").as_bytes(),
                &mut counts,
            )
            .into_owned();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Authorization: Bearer [REDACTED:jwt]"
        );
        assert_eq!(counts, Counts::from([("jwt".to_owned(), 1)]));
    }

    #[test]
    fn leaves_non_secrets_alone() {
        let r = Redactor::builtin();
        let text = "We used sk-learn and scikit-learn; the task-ant-colony plan is fine.\n\
            Risk-adjusted returns. An ordinary paragraph about bearer bonds and keys.\n\
            uuid 123e4567-e89b-12d3-a456-426614174000\n\
            sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n\
            commit 3b18e512dba79e4c8300dd08aeb37f8e728b8dad\n\
            postgres://db.internal:5432/app and https://example.com:8080/path?a=b\n\
            Authorization: Bearer\n\
            akia1234 AKIASHORT ghp_short sk-ant- hf_x eyJhbGciOi.x.y\n\
            -----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n\
            mail me at someone@example.com, or see [REDACTED:jwt].\n\
            binary \u{00e9}t\u{00e9} caf\u{00e9}";
        let mut counts = Counts::new();
        let out = r.redact(text.as_bytes(), &mut counts);
        assert!(
            matches!(out, Cow::Borrowed(_)),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(counts.is_empty());
        assert_eq!(r.find_any(text.as_bytes()), None);
        let mut noise = vec![0u8; 4096];
        noise
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 % 251) as u8);
        assert!(matches!(r.redact(&noise, &mut counts), Cow::Borrowed(_)));
    }

    #[test]
    fn redaction_is_idempotent() {
        let r = Redactor::builtin();
        let samples = samples();
        let doc: String = samples.iter().map(|s| format!("{}\n", s.text)).collect();
        let mut counts = Counts::new();
        let once = r.redact(doc.as_bytes(), &mut counts).into_owned();
        assert_eq!(r.find_any(&once), None);
        let mut again = Counts::new();
        assert!(matches!(r.redact(&once, &mut again), Cow::Borrowed(_)));
        assert!(again.is_empty());
    }

    #[test]
    fn a_replacement_exposing_a_secret_is_followed_up() {
        // The Anthropic key has no left boundary until the Google key before it is replaced.
        let r = Redactor::builtin();
        let (g, a) = (
            format!("AIza{}", fake(URLSAFE, 35, 50)),
            format!("sk-ant-api03-{}", fake(URLSAFE, 90, 51)),
        );
        let mut counts = Counts::new();
        let out = r
            .redact(format!("{g}{a}").as_bytes(), &mut counts)
            .into_owned();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[REDACTED:google-api-key][REDACTED:anthropic-api-key]"
        );
        assert_eq!(counts.values().sum::<u64>(), 2);
    }

    fn rules_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn rules_file_adds_rules() {
        let (_dir, path) = rules_file(
            "[[rule]]\nid = \"internal-token\"\npattern = 'itk_[a-z0-9]{32}'\n\n\
             [[rule]]\nid = \"pin\"\npattern = 'PIN: (?P<secret>[0-9]{4,8})'\n",
        );
        let r = Redactor::with_rules_file(&path).unwrap();
        let ids = r.rule_ids();
        let pos = |id: &str| ids.iter().position(|i| i == id).unwrap();
        assert!(pos("jwt") < pos("internal-token") && pos("pin") < pos("bearer-token"));
        let token = format!(
            "itk_{}",
            fake(b"abcdefghijklmnopqrstuvwxyz0123456789", 32, 60)
        );
        let mut counts = Counts::new();
        let out = r
            .redact(
                format!("Authorization: Bearer {token}\nPIN: 1234\n").as_bytes(),
                &mut counts,
            )
            .into_owned();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Authorization: Bearer [REDACTED:internal-token]\nPIN: [REDACTED:pin]\n"
        );
        assert_eq!(
            counts,
            Counts::from([("internal-token".to_owned(), 1), ("pin".to_owned(), 1)])
        );
    }

    #[test]
    fn rules_file_rejections_name_the_rule() {
        let cases = [
            (
                "[[rule]]\nid = \"typo\"\npatern = 'x'\n",
                "\"typo\"",
                "unknown key",
            ),
            (
                "[[rule]]\nid = \"twice\"\npattern = 'a1'\n[[rule]]\nid = \"twice\"\npattern = 'b2'\n",
                "\"twice\"",
                "used twice",
            ),
            (
                "[[rule]]\nid = \"jwt\"\npattern = 'x'\n",
                "\"jwt\"",
                "built-in",
            ),
            (
                "[[rule]]\nid = \"broken\"\npattern = 'a(b'\n",
                "\"broken\"",
                "invalid pattern",
            ),
            (
                "[[rule]]\nid = \"empty\"\npattern = 'x*'\n",
                "\"empty\"",
                "empty string",
            ),
            (
                "[[rule]]\nid = \"edge\"\npattern = '\\b'\n",
                "\"edge\"",
                "empty string",
            ),
            (
                "[[rule]]\nid = \"Bad_Id\"\npattern = 'x'\n",
                "\"Bad_Id\"",
                "[a-z0-9-]",
            ),
            (
                "[[rule]]\nid = \"nopat\"\n",
                "\"nopat\"",
                "pattern is missing",
            ),
            ("[[rule]]\npattern = 'x'\n", "rule #1", "id is missing"),
            ("[rules]\nid = 'x'\n", "\"rules\"", "unknown key"),
            ("[[rule]\n", "", "not valid TOML"),
        ];
        for (text, who, what) in cases {
            let (_dir, path) = rules_file(text);
            let Err(e) = Redactor::with_rules_file(&path) else {
                panic!("accepted: {text}")
            };
            let msg = e.to_string();
            assert!(matches!(e, BundleError::RedactConfig { .. }), "{msg}");
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains(who)
                    && msg.contains(what),
                "{msg}"
            );
        }
    }

    #[test]
    fn scanner_finds_a_secret_split_anywhere() {
        let r = Redactor::builtin();
        let s = samples();
        for sample in [&s[15], &s[0], &s[16]] {
            let text = format!(
                "{}{}\n{}",
                "filler text ".repeat(60),
                sample.text,
                "more filler ".repeat(60)
            );
            let start = text.find(&sample.secret).unwrap();
            for split in start.saturating_sub(40)..=start + sample.secret.len() + 40 {
                for mut sc in [
                    SecretScanner::new(&r),
                    SecretScanner::with_sizes(&r, 4096, 8192),
                ] {
                    sc.feed(&text.as_bytes()[..split]);
                    sc.feed(&text.as_bytes()[split..]);
                    assert_eq!(
                        sc.finish().as_deref(),
                        Some(sample.rule),
                        "split at {split}"
                    );
                }
            }
        }
        let mut sc = SecretScanner::new(&r);
        sc.feed(b"nothing to see here sk-learn ");
        sc.feed(b"and task-ant");
        assert_eq!(sc.finish(), None);
    }

    #[test]
    fn scanner_counts_match_redact_over_many_windows() {
        let r = Redactor::builtin();
        let samples = samples();
        let mut stream = Vec::new();
        for i in 0..400u64 {
            stream.extend_from_slice(fake(b"abc def ghi\n", (i * 37 % 500) as usize, i).as_bytes());
            stream.extend_from_slice(samples[(i % samples.len() as u64) as usize].text.as_bytes());
        }
        let mut expected = Counts::new();
        let _ = r.redact(&stream, &mut expected);
        for piece in [1usize, 7, 500, 4096, 70_000] {
            let mut sc = SecretScanner::with_sizes(&r, 8192, 16_384);
            stream.chunks(piece).for_each(|c| sc.feed(c));
            assert_eq!(sc.tally(), expected, "piece {piece}");
        }
    }

    const SCHEMA: &str = "
        PRAGMA secure_delete = OFF;
        PRAGMA journal_mode = WAL;
        CREATE TABLE memories(id INTEGER PRIMARY KEY, content TEXT NOT NULL, meta BLOB, score REAL,
            updated INTEGER DEFAULT 0);
        CREATE TABLE kv(k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
        CREATE TABLE scratch(x TEXT);
        CREATE VIRTUAL TABLE memories_fts USING fts5(content, content='memories', content_rowid='id');
        CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
            INSERT INTO memories_fts(rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
            INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
        CREATE TRIGGER memories_au AFTER UPDATE ON memories BEGIN
            INSERT INTO memories_fts(memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO memories_fts(rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER memories_touch AFTER UPDATE OF content ON memories BEGIN
            UPDATE memories SET updated = updated + 1 WHERE id = new.id;
        END;
        CREATE VIRTUAL TABLE notes_fts USING fts5(title, body);
        CREATE VIRTUAL TABLE old_fts USING fts4(body);
    ";

    fn count(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn redacts_a_database_completely() {
        let r = Redactor::builtin();
        let s = samples();
        let (aws, ghp, pg, bearer, openai, jwt, ant, hf) =
            (&s[15], &s[11], &s[20], &s[18], &s[2], &s[17], &s[1], &s[5]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            let ins = "INSERT INTO memories(id, content, meta, score) VALUES (?1, ?2, ?3, ?4)";
            c.execute(
                ins,
                (
                    1,
                    format!("deploy notes: {}", aws.text),
                    format!("{{\"t\":\"{}\"}}", ghp.secret).into_bytes(),
                    0.5,
                ),
            )
            .unwrap();
            c.execute(ins, (2, "the deploy went fine", None::<Vec<u8>>, 1.0))
                .unwrap();
            c.execute(
                ins,
                (
                    3,
                    format!("{} then {}", pg.text, bearer.text),
                    vec![0u8, 255, 7],
                    None::<f64>,
                ),
            )
            .unwrap();
            c.execute(
                "INSERT INTO kv VALUES ('config', ?1), ('plain', 'hello'), (?2, 'key is a secret')",
                (
                    format!("{{\"openai\":\"{}\"}}", openai.secret),
                    hf.secret.as_str(),
                ),
            )
            .unwrap();
            c.execute(
                "INSERT INTO notes_fts VALUES ('session', ?1), ('todo', 'deploy the thing')",
                [&jwt.text],
            )
            .unwrap();
            c.execute(
                "INSERT INTO old_fts VALUES (?1), ('deploy again')",
                [&ant.text],
            )
            .unwrap();
            c.execute(
                "INSERT INTO scratch VALUES (?1)",
                [format!("old {}", ant.secret)],
            )
            .unwrap();
            c.execute("DELETE FROM scratch", []).unwrap();
        }
        let raw = std::fs::read(&path).unwrap();
        let has =
            |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(
            has(&raw, &ant.secret),
            "the deleted row lingers in free space"
        );
        assert_eq!(raw[18], 2, "WAL header");
        let token = aws.secret.to_lowercase();
        {
            let c = Connection::open(&path).unwrap();
            assert_eq!(
                count(
                    &c,
                    &format!(
                        "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH '\"{token}\"'"
                    )
                ),
                1
            );
        }

        let mut counts = Counts::new();
        r.redact_database(&path, &mut counts).unwrap();
        let expected: Counts = [aws, ghp, pg, bearer, openai, jwt, ant, hf]
            .iter()
            .map(|s| (s.rule.to_owned(), 1))
            .collect();
        assert_eq!(counts, expected);

        let raw = std::fs::read(&path).unwrap();
        let lower = raw.to_ascii_lowercase();
        for sample in [aws, ghp, pg, bearer, openai, jwt, ant, hf] {
            let piece = &sample.secret[sample.secret.len() / 2 - 6..][..12];
            assert!(
                !has(&raw, &sample.secret) && !has(&raw, piece),
                "{} in the file",
                sample.rule
            );
            assert!(
                !has(&lower, &piece.to_ascii_lowercase()),
                "{} in an index",
                sample.rule
            );
        }
        assert_eq!(r.find_any(&raw), None);
        assert_eq!(raw[18], 1, "rollback journal header");
        for leftover in ["agent.db-wal", "agent.db-shm", "agent.db-journal"] {
            assert!(!dir.path().join(leftover).exists(), "{leftover}");
        }

        let c = Connection::open(&path).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        c.execute_batch(
            "INSERT INTO memories_fts(memories_fts) VALUES('integrity-check');
                         INSERT INTO notes_fts(notes_fts) VALUES('integrity-check');
                         INSERT INTO old_fts(old_fts) VALUES('integrity-check');",
        )
        .unwrap();
        for (table, n) in [
            ("memories", 3),
            ("kv", 3),
            ("notes_fts", 2),
            ("old_fts", 2),
            ("scratch", 0),
        ] {
            assert_eq!(
                count(&c, &format!("SELECT count(*) FROM {table}")),
                n,
                "{table}"
            );
        }
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'deploy'"
            ),
            2
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'deploy'"
            ),
            1
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM old_fts WHERE old_fts MATCH 'deploy'"
            ),
            1
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'redacted'"
            ),
            2
        );
        assert_eq!(
            count(
                &c,
                &format!(
                    "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH '\"{token}\"'"
                )
            ),
            0
        );
        // Types kept, triggers did not fire, untouched values unchanged.
        let (content, meta_type, updated): (String, String, i64) = c
            .query_row(
                "SELECT content, typeof(meta), updated FROM memories WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            content,
            "deploy notes: aws_access_key_id = [REDACTED:aws-access-key-id]"
        );
        assert_eq!((meta_type.as_str(), updated), ("blob", 0));
        let meta: Vec<u8> = c
            .query_row("SELECT meta FROM memories WHERE id = 3", [], |r| r.get(0))
            .unwrap();
        assert_eq!(meta, [0, 255, 7]);
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM kv WHERE k = '[REDACTED:huggingface-token]'"
            ),
            1
        );
    }

    fn db_with(sql: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        (dir, path)
    }

    fn redaction_error(path: &Path) -> String {
        let mut counts = Counts::new();
        match Redactor::builtin().redact_database(path, &mut counts) {
            Err(e @ BundleError::Redaction { .. }) => e.to_string(),
            other => panic!("expected a redaction error, got {other:?}"),
        }
    }

    #[test]
    fn contentless_fts_is_refused() {
        let (_dir, path) = db_with(
            "CREATE VIRTUAL TABLE bare_fts USING fts5(body, content='');
             INSERT INTO bare_fts(rowid, body) VALUES (1, 'hello world');",
        );
        let msg = redaction_error(&path);
        assert!(
            msg.contains("\"bare_fts\"") && msg.contains("contentless"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_virtual_table_is_refused() {
        let (_dir, path) = db_with(
            "CREATE TABLE t(a);
             PRAGMA writable_schema = ON;
             INSERT INTO sqlite_schema VALUES ('table', 'vec_items', 'vec_items', 0,
                 'CREATE VIRTUAL TABLE vec_items USING vec0(embedding float[4])');",
        );
        let msg = redaction_error(&path);
        assert!(
            msg.contains("\"vec_items\"") && msg.contains("vec0"),
            "{msg}"
        );
    }

    #[test]
    fn a_secret_in_the_schema_is_reported_not_shipped() {
        let key = format!("AKIA{}", fake(UPPER, 16, 70));
        let (_dir, path) = db_with(&format!(
            "CREATE TABLE t(a TEXT DEFAULT '{key}'); INSERT INTO t DEFAULT VALUES;"
        ));
        let msg = redaction_error(&path);
        assert!(
            msg.contains("secret(s) of rule aws-access-key-id") && msg.contains("sqlite_schema"),
            "{msg}"
        );
        assert!(!msg.contains(&key[4..]), "{msg}");
    }
}
