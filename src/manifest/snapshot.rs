//! The snapshot record (redb `snapshots` table, key = id): everything about a snapshot except its
//! entry list, which it references as a content tree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tree::ContentRef;

pub(crate) const SNAPSHOT_VERSION: u8 = 1;

/// Git HEAD of the memdir at snapshot time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitMeta {
    pub head_oid: String,
    pub head_subject: String,
    /// `name <email>`
    pub head_author: String,
    pub head_ts_ms: i64,
}

/// What a snapshot cost to take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub bytes_read: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    /// Bytes appended to packs (compressed), footers excluded.
    pub new_stored_bytes: u64,
    pub duration_ms: u64,
}

/// A snapshot as `list`, `show` and `--json` present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub tenant: String,
    pub agent: String,
    pub created_at_ms: i64,
    pub label: Option<String>,
    pub created_by: String,
    pub parent: Option<String>,
    pub git: Option<GitMeta>,
    /// `PRAGMA user_version` of each database, by file stem.
    pub schema_versions: BTreeMap<String, i64>,
    pub memdir: String,
    pub sqlite_dir: String,
    pub state_dir: String,
    /// Parts that did not exist at snapshot time (`memdir`, `sqlite`, `state`).
    pub absent: Vec<String>,
    pub artifacts: u64,
    pub logical_bytes: u64,
    pub stats: SnapshotStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub info: SnapshotInfo,
    pub manifest: ContentRef,
}
