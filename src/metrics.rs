//! Prometheus metrics of a [`crate::Memsnap`] handle (and of its clones, which share them):
//! operations by `op` and `outcome`, their durations, bytes read from agents and bytes newly
//! stored. Labels stay few and bounded: never an agent, tenant or snapshot id, so that a
//! long-running service with thousands of agents exports a fixed number of series.
//!
//! The store itself (snapshots, chunks, packs, bytes) is described by gauges built from a
//! [`crate::StatsReport`] on demand, since computing them walks every snapshot's trees.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ops::stats::StatsReport;

/// An operation, as the `op` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Snapshot,
    Restore,
    Delete,
    Forget,
    Prune,
    Import,
    Export,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Snapshot,
        Op::Restore,
        Op::Delete,
        Op::Forget,
        Op::Prune,
        Op::Import,
        Op::Export,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Restore => "restore",
            Op::Delete => "delete",
            Op::Forget => "forget",
            Op::Prune => "prune",
            Op::Import => "import",
            Op::Export => "export",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOutcome {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

type HistogramFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms to about 41 s, doubling.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

struct Inner {
    operations: Family<OpOutcome, Counter>,
    durations: HistogramFamily,
    bytes_read: Counter,
    new_stored_bytes: Counter,
}

/// The metrics registry of a store handle. Cloning shares it.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let inner = Inner {
            operations: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            bytes_read: Counter::default(),
            new_stored_bytes: Counter::default(),
        };
        // Every series exists from the start, at zero: a rate over a missing series is no rate.
        for op in Op::ALL {
            for outcome in ["ok", "error"] {
                let _ = inner.operations.get_or_create(&OpOutcome {
                    op: op.name(),
                    outcome,
                });
            }
            let _ = inner.durations.get_or_create(&OpLabel { op: op.name() });
        }
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Counts one operation and its duration.
    pub(crate) fn record(&self, op: Op, ok: bool, elapsed: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.inner
            .operations
            .get_or_create(&OpOutcome {
                op: op.name(),
                outcome,
            })
            .inc();
        self.inner
            .durations
            .get_or_create(&OpLabel { op: op.name() })
            .observe(elapsed.as_secs_f64());
    }

    /// Bytes read from an agent and bytes newly written to packs.
    pub(crate) fn add_bytes(&self, read: u64, new_stored: u64) {
        self.inner.bytes_read.inc_by(read);
        self.inner.new_stored_bytes.inc_by(new_stored);
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("memsnap");
        r.register(
            "operations",
            "Operations by kind and outcome",
            self.inner.operations.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Duration of operations, in seconds",
            self.inner.durations.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes read from agents by snapshots",
            self.inner.bytes_read.clone(),
        );
        r.register(
            "new_stored_bytes",
            "Bytes newly written to packs by snapshots",
            self.inner.new_stored_bytes.clone(),
        );
        r
    }

    /// The Prometheus text exposition format (version 0.0.4) of these metrics.
    pub fn text(&self) -> String {
        encode(&self.registry())
    }

    /// [`Metrics::text`] plus gauges describing the whole store, from `stats`.
    pub fn text_with_store(&self, stats: &StatsReport) -> String {
        let mut r = self.registry();
        let s = &stats.store;
        let gauges: [(&str, &str, u64); 7] = [
            ("store_snapshots", "Snapshots in the store", s.snapshots),
            ("store_agents", "Agents with snapshots", s.agents),
            ("store_chunks", "Chunks in the index", s.chunks),
            ("store_packs", "Pack files in the index", s.packs),
            (
                "store_stored_bytes",
                "Bytes of the pack files on disk",
                s.stored_bytes,
            ),
            (
                "store_unused_bytes",
                "Stored bytes of chunks no snapshot references",
                s.unused_bytes,
            ),
            (
                "store_logical_bytes",
                "Bytes of all snapshots before deduplication and compression",
                s.logical_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            let g: Gauge = Gauge::default();
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            r.register(name, help, g);
        }
        encode(&r)
    }
}

fn encode(r: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, r) {
        tracing::warn!("cannot encode metrics: {e}");
    }
    out
}
