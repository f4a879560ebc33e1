//! `manifest.json`, the first entry of a bundle: the `nexo-memory-snapshot-v1` fields, which that
//! tool reads, and a `memsnap` section that it ignores, which carries what memsnap needs to
//! rebuild the snapshot exactly (store-format.md, "Bundles").

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BundleError;

pub(crate) const BUNDLE_FORMAT: &str = "nexo-memory-snapshot-v1";
pub(crate) const MANIFEST_VERSION: u32 = 1;
/// Version of the `memsnap` section.
pub(crate) const EXT_VERSION: u32 = 1;
pub(crate) const MANIFEST_ENTRY: &str = "manifest.json";
/// A manifest entry larger than this is refused unread.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The schema versions nexo-memory-snapshot 0.1.x writes and accepts (it refuses anything newer).
pub(crate) const NEXO_SCHEMA: u32 = 1;

/// The databases and state documents that nexo-memory-snapshot has a kind for.
const KNOWN_DATABASES: [(&str, &str); 4] = [
    ("long_term", "sqlite_long_term"),
    ("vector", "sqlite_vector"),
    ("concepts", "sqlite_concepts"),
    ("compactions", "sqlite_compactions"),
];
const KNOWN_STATE: [(&str, &str); 2] = [
    ("extract_cursor", "state_extract_cursor"),
    ("dream_run", "state_dream_run"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BundleManifest {
    pub manifest_version: u32,
    pub bundle_format: String,
    pub snapshot_id: String,
    pub agent_id: String,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_at_ms: i64,
    pub created_by: String,
    pub schema_versions: SchemaVersions,
    pub git: BundleGit,
    pub artifacts: Vec<ArtifactMeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redactions: Option<RedactionReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionMeta>,
    pub tool_versions: ToolVersions,
    /// SHA-256 of the concatenated hex digests of `artifacts`, in order (the "seal").
    pub bundle_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memsnap: Option<MemsnapSection>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SchemaVersions {
    pub long_term: u32,
    pub vector: u32,
    pub concepts: u32,
    pub compactions: u32,
    pub manifest: u32,
}

impl SchemaVersions {
    pub(crate) const NEXO: Self = Self {
        long_term: NEXO_SCHEMA,
        vector: NEXO_SCHEMA,
        concepts: NEXO_SCHEMA,
        compactions: NEXO_SCHEMA,
        manifest: MANIFEST_VERSION,
    };
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct BundleGit {
    pub head_oid: String,
    pub head_subject: String,
    pub head_author: String,
    pub head_ts_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ArtifactMeta {
    pub path_in_bundle: String,
    pub kind: String,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of the artifact's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RedactionReport {
    pub policy: String,
    pub rules_applied: Vec<String>,
    pub matches_redacted: u32,
    pub artifacts_touched: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EncryptionMeta {
    pub scheme: String,
    pub recipients_fingerprint: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ToolVersions {
    pub nexo_version: String,
    pub git2: String,
    pub sqlx: String,
}

impl ToolVersions {
    pub(crate) fn memsnap() -> Self {
        Self {
            nexo_version: format!("memsnap-{}", env!("CARGO_PKG_VERSION")),
            git2: "gix-0.90".into(),
            sqlx: "rusqlite-0.43".into(),
        }
    }
}

/// What memsnap adds; nexo-memory-snapshot ignores unknown fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MemsnapSection {
    pub version: u32,
    pub tool: String,
    #[serde(default)]
    pub parent: Option<String>,
    /// Parts the agent did not have (`memdir`, `sqlite`, `state`).
    #[serde(default)]
    pub absent: Vec<String>,
    /// `PRAGMA user_version` of each database, by file stem.
    #[serde(default)]
    pub schema_versions: BTreeMap<String, i64>,
    /// Where the agent lived on the exporting host, for information only.
    #[serde(default)]
    pub source: Option<SourcePaths>,
    /// Artifacts nexo-memory-snapshot has no kind for (other databases and state documents).
    #[serde(default)]
    pub extra_artifacts: Vec<ArtifactMeta>,
    /// The seal of `extra_artifacts`, as `bundle_sha256` is of `artifacts`.
    #[serde(default)]
    pub extra_sha256: String,
    /// Every entry of the snapshot, in the store's order: what the artifacts cannot say (folders,
    /// symlinks, modes, times).
    pub entries: Vec<EntryMeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redaction: Option<RedactionDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SourcePaths {
    pub memdir: String,
    pub sqlite_dir: String,
    pub state_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    /// `memdir`, `sqlite` or `state`.
    pub part: String,
    pub path: String,
    /// `file`, `dir`, `symlink` or `sqlite`.
    pub kind: String,
    pub mode: u32,
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<bool>,
    /// `path` and `target` are %-escaped bytes (not UTF-8 on the exporting host; see
    /// [`escape`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escaped: bool,
    /// The artifact holding the content, for files and databases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_path: Option<String>,
}

/// Counts only: a report never holds a secret.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedactionDetail {
    pub rules: Vec<String>,
    pub per_rule: BTreeMap<String, u64>,
    pub per_artifact: BTreeMap<String, BTreeMap<String, u64>>,
    /// The memdir's `.git` folder was left out: git history cannot be redacted in place.
    pub git_excluded: bool,
}

pub(crate) fn seal(artifacts: &[ArtifactMeta]) -> String {
    let mut h = Sha256::new();
    for a in artifacts {
        h.update(a.sha256.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The bundle path of an artifact and its nexo kind (`None`: memsnap-only, an extra artifact).
/// A database or state document nexo-memory-snapshot knows: its place in the tool's order and
/// its kind.
pub(crate) fn known(part: &str, path: &str) -> Option<(usize, &'static str)> {
    let (table, suffix) = match part {
        "sqlite" => (&KNOWN_DATABASES[..], ".sqlite"),
        "state" => (&KNOWN_STATE[..], ".json"),
        _ => return None,
    };
    let stem = path.strip_suffix(suffix)?;
    table
        .iter()
        .position(|(n, _)| *n == stem)
        .map(|i| (i, table[i].1))
}

pub(crate) fn bundle_path(part: &str, path: &str, is_db: bool) -> (String, Option<&'static str>) {
    let kind = known(part, path).map(|(_, k)| k);
    match part {
        "sqlite" => (format!("sqlite/{path}"), kind.filter(|_| is_db)),
        "state" => (format!("state/{path}"), kind),
        _ => match path.strip_prefix(".git/") {
            Some(rel) => (format!("git/{rel}"), Some("git_bundle")),
            None => (format!("memory_files/{path}"), Some("memory_file")),
        },
    }
}

/// Bytes that are not UTF-8 as a string: `%` and each byte of an invalid sequence become `%XX`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '%' => out.push_str("%25"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a malformed escape.
pub(crate) fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// [`check_rel_path`] on raw bytes (an unescaped name).
pub(crate) fn check_rel_bytes(path: &[u8]) -> Result<(), String> {
    match std::str::from_utf8(path) {
        Ok(s) => check_rel_path(s),
        Err(_) => check_rel_path(&String::from_utf8_lossy(path)),
    }
}

/// A path inside a bundle or an entry path: relative, `/`-separated, no empty, `.` or `..`
/// component, no NUL. Everything memsnap writes from a bundle goes through this check.
pub(crate) fn check_rel_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.starts_with('/') {
        return Err("absolute path".into());
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("NUL or backslash in the path".into());
    }
    for c in path.split('/') {
        match c {
            "" => return Err("empty path component".into()),
            "." | ".." => return Err(format!("`{c}` path component")),
            _ => {}
        }
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A snapshot id from a bundle becomes a key of the store: lowercase letters, digits and `-`.
pub(crate) fn check_snapshot_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'-'))
}

impl BundleManifest {
    /// Parses and checks a manifest: version, format, ids, every artifact path, kind and digest,
    /// no duplicates. The result's artifacts may be trusted as names; their bytes are checked
    /// against the digests when read.
    pub(crate) fn parse(bytes: &[u8], bundle: &Path) -> Result<Self, BundleError> {
        let hostile = |entry: &str, reason: String| BundleError::Hostile {
            bundle: bundle.to_path_buf(),
            entry: entry.to_owned(),
            reason,
        };
        // The version first, from a loose parse: a newer manifest may not match this schema.
        let loose: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Damaged {
                bundle: bundle.to_path_buf(),
                what: format!("manifest.json is not valid JSON ({e})"),
            })?;
        let version = loose.get("manifest_version").and_then(|v| v.as_u64());
        if let Some(v) = version.filter(|v| *v > u64::from(MANIFEST_VERSION)) {
            return Err(BundleError::NewerFormat {
                bundle: bundle.to_path_buf(),
                what: "manifest version".into(),
                found: v.to_string(),
                supported: MANIFEST_VERSION.to_string(),
            });
        }
        if let Some(v) = loose
            .get("memsnap")
            .and_then(|m| m.get("version"))
            .and_then(|v| v.as_u64())
            .filter(|v| *v > u64::from(EXT_VERSION))
        {
            return Err(BundleError::NewerFormat {
                bundle: bundle.to_path_buf(),
                what: "memsnap bundle section version".into(),
                found: v.to_string(),
                supported: EXT_VERSION.to_string(),
            });
        }
        let m: BundleManifest =
            serde_json::from_value(loose).map_err(|e| BundleError::Damaged {
                bundle: bundle.to_path_buf(),
                what: format!("manifest.json does not have the bundle fields ({e})"),
            })?;
        if m.bundle_format != BUNDLE_FORMAT {
            if m.bundle_format.starts_with("nexo-memory-snapshot-v") {
                return Err(BundleError::NewerFormat {
                    bundle: bundle.to_path_buf(),
                    what: "bundle format".into(),
                    found: m.bundle_format.clone(),
                    supported: BUNDLE_FORMAT.into(),
                });
            }
            return Err(BundleError::NotABundle {
                path: bundle.to_path_buf(),
                reason: format!("unknown bundle_format {:?}", m.bundle_format),
            });
        }
        if m.schema_versions.manifest > MANIFEST_VERSION {
            return Err(BundleError::NewerFormat {
                bundle: bundle.to_path_buf(),
                what: "manifest schema version".into(),
                found: m.schema_versions.manifest.to_string(),
                supported: MANIFEST_VERSION.to_string(),
            });
        }
        if !check_snapshot_id(&m.snapshot_id) {
            return Err(hostile(
                MANIFEST_ENTRY,
                format!(
                    "snapshot id {:?} is not 8-64 lowercase letters, digits and '-'",
                    m.snapshot_id
                ),
            ));
        }
        crate::names::AgentId::new(&m.tenant, &m.agent_id)
            .map_err(|e| hostile(MANIFEST_ENTRY, format!("tenant or agent name refused: {e}")))?;

        let mut seen = BTreeSet::new();
        let extra = m
            .memsnap
            .as_ref()
            .map(|x| x.extra_artifacts.as_slice())
            .unwrap_or(&[]);
        for (a, is_extra) in m
            .artifacts
            .iter()
            .map(|a| (a, false))
            .chain(extra.iter().map(|a| (a, true)))
        {
            check_rel_path(&a.path_in_bundle).map_err(|r| hostile(&a.path_in_bundle, r))?;
            if a.path_in_bundle == MANIFEST_ENTRY {
                return Err(hostile(
                    &a.path_in_bundle,
                    "an artifact named like the manifest".into(),
                ));
            }
            if !seen.insert(a.path_in_bundle.as_str()) {
                return Err(hostile(
                    &a.path_in_bundle,
                    "listed twice in the manifest".into(),
                ));
            }
            if !is_sha256_hex(&a.sha256) {
                return Err(hostile(
                    &a.path_in_bundle,
                    "its sha256 is not 64 lowercase hex digits".into(),
                ));
            }
            let ok_kind = if is_extra {
                matches!(a.kind.as_str(), "sqlite" | "state")
            } else {
                expected_kind(&a.path_in_bundle).is_some_and(|k| k == a.kind)
                    || (a.kind.starts_with("sqlite_") && a.path_in_bundle.starts_with("sqlite/"))
            };
            if !ok_kind {
                return Err(hostile(
                    &a.path_in_bundle,
                    format!("kind {:?} does not fit its path", a.kind),
                ));
            }
            if a.path_in_bundle
                .strip_prefix("memory_files/")
                .is_some_and(|r| r == ".git" || r.starts_with(".git/"))
            {
                return Err(hostile(
                    &a.path_in_bundle,
                    "a memory file inside .git (git files go under git/)".into(),
                ));
            }
            if a.path_in_bundle.starts_with("sqlite/") || a.path_in_bundle.starts_with("state/") {
                let rest = &a.path_in_bundle[a.path_in_bundle.find('/').unwrap_or(0) + 1..];
                if rest.contains('/') {
                    return Err(hostile(
                        &a.path_in_bundle,
                        "databases and state documents have no sub-folders".into(),
                    ));
                }
            }
        }
        Ok(m)
    }

    pub(crate) fn extra_artifacts(&self) -> &[ArtifactMeta] {
        self.memsnap
            .as_ref()
            .map(|x| x.extra_artifacts.as_slice())
            .unwrap_or(&[])
    }

    /// Every artifact, nexo's then memsnap's.
    pub(crate) fn all_artifacts(&self) -> impl Iterator<Item = &ArtifactMeta> {
        self.artifacts.iter().chain(self.extra_artifacts())
    }
}

/// The nexo kind a path must have (databases are checked separately: any `sqlite_*`).
fn expected_kind(path: &str) -> Option<&'static str> {
    if path.starts_with("memory_files/") {
        Some("memory_file")
    } else if path.starts_with("git/") {
        Some("git_bundle")
    } else if let Some(name) = path.strip_prefix("state/") {
        known("state", name).map(|(_, k)| k)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
        ] {
            assert!(check_rel_path(bad).is_err(), "{bad:?}");
        }
        for good in [
            "a",
            "memory_files/topics/x.md",
            "git/objects/ab/cdef",
            "a..b",
        ] {
            assert!(check_rel_path(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn escapes_round_trip_and_leave_utf8_alone() {
        for raw in [
            &b"caf\xe9-latin1.md"[..],
            b"100%.md",
            b"plain/name.md",
            b"\xff\xfe%",
            "r\u{e9}sum\u{e9}.md".as_bytes(),
        ] {
            let e = escape(raw);
            assert_eq!(unescape(&e).as_deref(), Some(raw), "{e}");
        }
        assert_eq!(
            escape("r\u{e9}sum\u{e9}.md".as_bytes()),
            "r\u{e9}sum\u{e9}.md"
        );
        assert_eq!(escape(b"caf\xe9"), "caf%E9");
        for bad in ["%", "%4", "%zz", "a%g0"] {
            assert_eq!(unescape(bad), None, "{bad}");
        }
        // Escapes are checked after decoding: %2F%2E%2E cannot smuggle a `..`.
        let smuggled = unescape("a%2F%2E%2E%2Fb").expect("decodes");
        assert_eq!(smuggled, b"a/../b");
        assert!(check_rel_bytes(&smuggled).is_err_and(|e| e.contains("..")));
    }

    #[test]
    fn bundle_paths_follow_the_nexo_layout() {
        assert_eq!(
            bundle_path("sqlite", "vector.sqlite", true),
            ("sqlite/vector.sqlite".into(), Some("sqlite_vector"))
        );
        assert_eq!(
            bundle_path("sqlite", "notes.db", true),
            ("sqlite/notes.db".into(), None)
        );
        assert_eq!(
            bundle_path("state", "dream_run.json", false),
            ("state/dream_run.json".into(), Some("state_dream_run"))
        );
        assert_eq!(
            bundle_path("memdir", ".git/HEAD", false),
            ("git/HEAD".into(), Some("git_bundle"))
        );
        assert_eq!(
            bundle_path("memdir", "topics/a.md", false),
            ("memory_files/topics/a.md".into(), Some("memory_file"))
        );
    }
}
