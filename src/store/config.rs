//! The store's config record (redb `meta` table, key `config`): fixed at init, because changing
//! a chunker parameter would change every cut point and defeat deduplication.

use serde::{Deserialize, Serialize};

/// The on-disk format version this build writes and reads (store-format.md, "Version changes").
/// 2 added the `pins` table, 3 the `file_stats` table; an older store is read as one without
/// them, and raised by the first write of either.
pub(crate) const FORMAT_VERSION: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoreConfig {
    pub format_version: u32,
    /// 32 lowercase hex chars, random at init.
    pub store_id: String,
    pub created_at_ms: i64,
    /// FastCDC v2020 (normalisation level 1) sizes for files that are not SQLite databases.
    pub cdc_min: u32,
    pub cdc_avg: u32,
    pub cdc_max: u32,
    /// SQLite pages are grouped into chunks of at least this many bytes (one page when the page
    /// size is at least this).
    pub sqlite_min_chunk: u32,
    /// A tree node ends after a child whose id satisfies `id[8..12] as u32 LE % fanout == 0`, or
    /// when it holds `tree_max_entries` children.
    pub tree_fanout: u32,
    pub tree_max_entries: u32,
    pub zstd_level: i32,
    /// A pack is closed once it holds at least this many bytes.
    pub pack_target_size: u64,
}

impl StoreConfig {
    pub(crate) fn new_default(now_ms: i64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            store_id: hex::encode(rand::random::<[u8; 16]>()),
            created_at_ms: now_ms,
            cdc_min: 4 * 1024,
            cdc_avg: 16 * 1024,
            cdc_max: 64 * 1024,
            sqlite_min_chunk: 4 * 1024,
            tree_fanout: 16,
            tree_max_entries: 64,
            zstd_level: 3,
            pack_target_size: 32 * 1024 * 1024,
        }
    }
}
