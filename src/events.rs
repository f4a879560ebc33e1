//! Lifecycle events, in the spirit of nexo-memory-snapshot's `EventPublisher`: every successful
//! snapshot, restore, delete, forget, prune, import and export of a [`crate::Memsnap`] handle is
//! told to its publisher as one [`Event`]. Publishing is best effort: a publisher must never fail
//! (nor noticeably slow) the operation it reports, so `publish` returns nothing and a publisher
//! logs its own errors. Dry runs change nothing and publish nothing.
//!
//! [`JsonLinesPublisher`] appends one JSON object per event to a file (the CLI's `--events`):
//! each line is written with a single `write_all` to a file opened in append mode, so lines of
//! concurrent memsnap processes do not interleave.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::export::ExportReport;
use crate::bundle::import::ImportReport;
use crate::manifest::snapshot::SnapshotInfo;
use crate::ops::forget::ForgetReport;
use crate::ops::prune::PruneReport;
use crate::ops::restore::RestoreReport;

/// Receives the lifecycle events of a [`crate::Memsnap`] handle.
pub trait EventPublisher: Send + Sync {
    fn publish(&self, event: &Event);
}

/// Publishes nothing (the default).
pub struct NoEvents;

impl EventPublisher for NoEvents {
    fn publish(&self, _: &Event) {}
}

/// One operation that changed the store or an agent. `at_ms` is when it completed (ms since the
/// Unix epoch); JSON carries the variant's name in `kind` (`created`, `restored`, ...).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    Created {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
        label: Option<String>,
        logical_bytes: u64,
        bytes_read: u64,
        new_stored_bytes: u64,
        duration_ms: u64,
    },
    Restored {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
        /// The folder restored into, when not the agent's live folders.
        target: Option<PathBuf>,
        /// The automatic snapshot taken just before (it publishes no event of its own).
        pre_snapshot_id: Option<String>,
        bytes: u64,
        duration_ms: u64,
    },
    Deleted {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
    },
    /// One per snapshot a `forget` removed.
    Forgotten {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
    },
    Pruned {
        at_ms: i64,
        snapshots: u64,
        chunks_unused: u64,
        packs_deleted: u64,
        packs_rewritten: u64,
        bytes_freed: u64,
        duration_ms: u64,
    },
    Imported {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
        already_present: bool,
        bundle_bytes: u64,
        duration_ms: u64,
    },
    Exported {
        at_ms: i64,
        tenant: String,
        agent: String,
        snapshot_id: String,
        bundle: PathBuf,
        bundle_bytes: u64,
        duration_ms: u64,
    },
}

impl Event {
    /// The JSON `kind`: `created`, `restored`, `deleted`, `forgotten`, `pruned`, `imported`,
    /// `exported`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Created { .. } => "created",
            Event::Restored { .. } => "restored",
            Event::Deleted { .. } => "deleted",
            Event::Forgotten { .. } => "forgotten",
            Event::Pruned { .. } => "pruned",
            Event::Imported { .. } => "imported",
            Event::Exported { .. } => "exported",
        }
    }

    pub(crate) fn created(i: &SnapshotInfo) -> Self {
        Event::Created {
            at_ms: crate::now_ms(),
            tenant: i.tenant.clone(),
            agent: i.agent.clone(),
            snapshot_id: i.id.clone(),
            label: i.label.clone(),
            logical_bytes: i.logical_bytes,
            bytes_read: i.stats.bytes_read,
            new_stored_bytes: i.stats.new_stored_bytes,
            duration_ms: i.stats.duration_ms,
        }
    }

    pub(crate) fn restored(r: &RestoreReport, target: Option<&Path>) -> Option<Self> {
        (!r.dry_run).then(|| Event::Restored {
            at_ms: crate::now_ms(),
            tenant: r.plan.tenant.clone(),
            agent: r.plan.agent.clone(),
            snapshot_id: r.plan.snapshot_id.clone(),
            target: target.map(Path::to_path_buf),
            pre_snapshot_id: r.pre_snapshot_id.clone(),
            bytes: r.plan.bytes,
            duration_ms: r.duration_ms,
        })
    }

    pub(crate) fn deleted(i: &SnapshotInfo) -> Self {
        Event::Deleted {
            at_ms: crate::now_ms(),
            tenant: i.tenant.clone(),
            agent: i.agent.clone(),
            snapshot_id: i.id.clone(),
        }
    }

    pub(crate) fn forgotten(r: &ForgetReport) -> Vec<Self> {
        if r.dry_run {
            return Vec::new();
        }
        let at_ms = crate::now_ms();
        r.groups
            .iter()
            .flat_map(|g| {
                g.decisions
                    .iter()
                    .filter(|d| !d.keep)
                    .map(move |d| Event::Forgotten {
                        at_ms,
                        tenant: g.tenant.clone(),
                        agent: g.agent.clone(),
                        snapshot_id: d.id.clone(),
                    })
            })
            .collect()
    }

    pub(crate) fn pruned(r: &PruneReport) -> Option<Self> {
        (!r.dry_run).then(|| Event::Pruned {
            at_ms: crate::now_ms(),
            snapshots: r.snapshots,
            chunks_unused: r.chunks_unused,
            packs_deleted: r.packs_deleted,
            packs_rewritten: r.packs_rewritten,
            bytes_freed: r.bytes_freed,
            duration_ms: r.duration_ms,
        })
    }

    pub(crate) fn imported(r: &ImportReport) -> Self {
        Event::Imported {
            at_ms: crate::now_ms(),
            tenant: r.snapshot.tenant.clone(),
            agent: r.snapshot.agent.clone(),
            snapshot_id: r.snapshot.id.clone(),
            already_present: r.already_present,
            bundle_bytes: r.bundle_bytes,
            duration_ms: r.duration_ms,
        }
    }

    pub(crate) fn exported(r: &ExportReport) -> Self {
        Event::Exported {
            at_ms: crate::now_ms(),
            tenant: r.tenant.clone(),
            agent: r.agent.clone(),
            snapshot_id: r.snapshot_id.clone(),
            bundle: r.bundle.clone(),
            bundle_bytes: r.bundle_bytes,
            duration_ms: r.duration_ms,
        }
    }
}

/// Appends each event as one line of JSON to a file (created if needed). A write error is
/// logged as a warning and the event dropped; the operation it reports has already succeeded.
#[derive(Debug, Clone)]
pub struct JsonLinesPublisher {
    path: PathBuf,
}

impl JsonLinesPublisher {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(line)?;
        f.flush()
    }
}

impl EventPublisher for JsonLinesPublisher {
    fn publish(&self, event: &Event) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot encode {} event: {e}", event.kind());
                return;
            }
        };
        line.push(b'\n');
        if let Err(e) = self.append(&line) {
            tracing::warn!(
                "cannot append {} event to {}: {e}",
                event.kind(),
                self.path.display()
            );
        }
    }
}
