//! memsnap: point-in-time, deduplicating snapshots of an AI agent's memory (a git memdir,
//! SQLite databases, state JSON), taken consistently while the agent keeps writing.
//!
//! The on-disk format is defined in `store-format.md`; the architecture in `README.md`.

mod api;
mod bundle;
mod chunk;
mod error;
mod events;
mod failpoint;
mod fsutil;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod lock;
mod manifest;
mod metrics;
mod names;
mod ops;
pub mod sample;
mod source;
mod storage;
mod store;
mod time;
mod tree;
mod zstd_frames;

pub use api::{Memsnap, Snapshotter, StoreOptions, verify_bundle};
pub use bundle::export::{DEFAULT_LEVEL, ExportReport, ExportRequest};
pub use bundle::import::{
    ArtifactCheck, BundleCheck, BundleVerifyReport, CheckStatus, ImportReport, ImportRequest,
};
pub use bundle::manifest::RedactionDetail;
pub use error::{BundleError, Error, Result, SourceError, StoreError};
pub use events::{Event, EventPublisher, JsonLinesPublisher, NoEvents};
pub use manifest::snapshot::{GitMeta, SnapshotInfo, SnapshotStats};
pub use metrics::Metrics;
pub use names::AgentId;
pub use ops::diff::{
    ArtifactChange, CommitInfo, DatabaseDiff, DiffReport, DiffSide, DiffSummary, FieldChange,
    FileStat, GitDiff, NoteChange, NotesDiff, SchemaChange, StateDiff, TableDiff,
};
pub use ops::forget::{ForgetGroup, ForgetReport, ForgetRequest};
pub use ops::prune::{PruneReport, PruneRequest};
pub use ops::repair::{
    DamagedChunk, RECOVERED_AGENT, RECOVERED_TENANT, RepairReport, RepairRequest, SnapshotDamage,
};
pub use ops::restore::{RestorePlan, RestoreReport, RestoreRequest};
pub use ops::retention::{Decision, RetentionPolicy, parse_duration};
pub use ops::snapshot::SnapshotRequest;
pub use ops::stats::{AgentStats, StatsReport, StoreStats};
pub use ops::verify::{Damage, VerifyReport};
pub use ops::{ArtifactInfo, NoProgress, Progress, SnapshotDetails};
pub use source::SourceSpec;
pub use source::state::{FsStateProvider, StateItem, StateProvider};
pub use storage::{DIRECT_ALIGN, OpenMode, OsStorage, Storage, StorageFile};
pub use time::format_utc;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
