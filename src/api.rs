//! The library's front door: [`Memsnap`], a handle on one store with blocking methods, and the
//! async [`Snapshotter`] trait over it, which runs every operation on the blocking pool so that
//! file I/O, SQLite and hashing never occupy a tokio worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bundle::export::{ExportReport, ExportRequest};
use crate::bundle::import::{BundleVerifyReport, ImportReport, ImportRequest};
use crate::error::Error;
use crate::events::{Event, EventPublisher, NoEvents};
use crate::manifest::snapshot::SnapshotInfo;
use crate::metrics::{Metrics, Op};
use crate::names::AgentId;
use crate::ops::forget::{ForgetReport, ForgetRequest};
use crate::ops::prune::{PruneReport, PruneRequest};
use crate::ops::repair::{RepairReport, RepairRequest};
use crate::ops::restore::{RestoreReport, RestoreRequest};
use crate::ops::snapshot::SnapshotRequest;
use crate::ops::stats::StatsReport;
use crate::ops::verify::VerifyReport;
use crate::ops::{NoProgress, Progress, SnapshotDetails};
use crate::storage::{Fs, OsStorage, Storage};
use crate::store::Store;

/// Options for opening a store.
#[derive(Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How long to wait for an agent that another process is snapshotting or restoring.
    pub lock_timeout: Duration,
    /// Where the store's files (and restores into agents) are written: the OS by default; a
    /// test puts a failing or crashing storage here.
    pub storage: Arc<dyn Storage>,
    /// How many chunk locations restore, export and verify hold at once (~72 bytes each;
    /// default 2^18, a 1 GiB database of 4 KiB pages). Memory stays bounded by it whatever the
    /// agent's size; each window costs a pass over the index's chunk table when it is a good
    /// share of it, so a smaller one trades time for memory.
    pub window_chunks: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(30),
            storage: Arc::new(OsStorage),
            window_chunks: crate::store::stream::DEFAULT_WINDOW,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("lock_timeout", &self.lock_timeout)
            .field("storage", &self.storage)
            .field("window_chunks", &self.window_chunks)
            .finish()
    }
}

impl StoreOptions {
    pub fn lock_timeout(mut self, t: Duration) -> Self {
        self.lock_timeout = t;
        self
    }

    pub fn storage(mut self, s: Arc<dyn Storage>) -> Self {
        self.storage = s;
        self
    }

    pub fn window_chunks(mut self, n: usize) -> Self {
        self.window_chunks = n.max(1);
        self
    }
}

/// A memsnap store.
#[derive(Clone)]
pub struct Memsnap {
    store: Store,
    progress: Arc<dyn Progress>,
    events: Arc<dyn EventPublisher>,
    metrics: Metrics,
}

impl Memsnap {
    /// Opens the store at `path`, creating it if needed (every writing command may create it).
    pub fn create(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self, Error> {
        let mut store = Store::create_or_open(path.as_ref(), opts.lock_timeout, Fs(opts.storage))?;
        store.window = opts.window_chunks.max(1);
        Self::ready(store)
    }

    /// Opens an existing store; [`Error::NoStore`] if there is none at `path`.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self, Error> {
        let mut store = Store::open(path.as_ref(), opts.lock_timeout, Fs(opts.storage))?;
        store.window = opts.window_chunks.max(1);
        Self::ready(store)
    }

    /// Rebuilds the index of the store at `path` from its pack files (store-format.md,
    /// "Repair"). Needs no working index, so it is not a method of an opened store: it works when
    /// [`Memsnap::open`] fails on a damaged `index.redb`. Holds the store exclusively.
    pub fn repair(
        path: impl AsRef<Path>,
        opts: StoreOptions,
        req: &RepairRequest,
        progress: &dyn Progress,
    ) -> Result<RepairReport, Error> {
        crate::ops::repair::repair(
            path.as_ref(),
            opts.lock_timeout,
            &Fs(opts.storage),
            req,
            progress,
        )
    }

    fn ready(store: Store) -> Result<Self, Error> {
        for msg in crate::ops::restore::recover_all(&store)? {
            tracing::warn!("{msg}");
        }
        Ok(Self {
            store,
            progress: Arc::new(NoProgress),
            events: Arc::new(NoEvents),
            metrics: Metrics::new(),
        })
    }

    /// Tells `p` of every successful snapshot, restore, delete, forget, prune, import and export
    /// (dry runs excepted).
    pub fn with_events(mut self, p: Arc<dyn EventPublisher>) -> Self {
        self.events = p;
        self
    }

    /// Records into `m` instead of a registry of this handle's own (clones share theirs anyway).
    pub fn with_metrics(mut self, m: Metrics) -> Self {
        self.metrics = m;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This handle's metrics in the Prometheus text format, for a `/metrics` endpoint.
    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// Snapshot counts, sizes and ratios, per agent (matching `tenant` and `agent`) and for the
    /// whole store. Walks every snapshot's trees; holds the store lock shared.
    pub fn stats(&self, tenant: Option<&str>, agent: Option<&str>) -> Result<StatsReport, Error> {
        crate::ops::stats::stats(&self.store, tenant, agent)
    }

    /// Runs `f`, counting it in the metrics as `op` with its outcome and duration.
    fn tracked<T>(&self, op: Op, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let started = Instant::now();
        let res = f();
        self.metrics.record(op, res.is_ok(), started.elapsed());
        res
    }

    /// Reports progress of long operations to `p` (the CLI draws a bar).
    pub fn with_progress(mut self, p: Arc<dyn Progress>) -> Self {
        self.progress = p;
        self
    }

    pub fn path(&self) -> PathBuf {
        self.store.root().to_path_buf()
    }

    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, Error> {
        let info = self.tracked(Op::Snapshot, || {
            crate::ops::snapshot::snapshot(&self.store, req, self.progress.as_ref())
        })?;
        self.metrics
            .add_bytes(info.stats.bytes_read, info.stats.new_stored_bytes);
        self.events.publish(&Event::created(&info));
        Ok(info)
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreReport, Error> {
        let report = self.tracked(Op::Restore, || {
            crate::ops::restore::restore(&self.store, req, self.progress.as_ref())
        })?;
        if let Some(e) = Event::restored(&report, req.target.as_deref()) {
            self.events.publish(&e);
        }
        Ok(report)
    }

    /// Snapshots, oldest first; `None` matches every tenant or agent.
    pub fn list(
        &self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, Error> {
        crate::ops::list(&self.store, tenant, agent)
    }

    pub fn show(&self, snapshot: &str, agent: Option<&AgentId>) -> Result<SnapshotDetails, Error> {
        crate::ops::show(&self.store, snapshot, agent)
    }

    /// What changed from snapshot `a` to snapshot `b`: artifacts, database rows and schemas,
    /// git commits, notes (with unified diffs when `patch`) and state JSON fields.
    pub fn diff(
        &self,
        a: &str,
        b: &str,
        agent: Option<&AgentId>,
        patch: bool,
    ) -> Result<crate::ops::diff::DiffReport, Error> {
        crate::ops::diff::diff(&self.store, a, b, agent, patch)
    }

    /// Verifies one snapshot, or all with `None`.
    pub fn verify(
        &self,
        snapshot: Option<&str>,
        agent: Option<&AgentId>,
        read_data: bool,
    ) -> Result<VerifyReport, Error> {
        crate::ops::verify::verify(
            &self.store,
            snapshot,
            agent,
            read_data,
            self.progress.as_ref(),
        )
    }

    pub fn delete(&self, snapshot: &str, agent: Option<&AgentId>) -> Result<SnapshotInfo, Error> {
        let info = self.tracked(Op::Delete, || {
            crate::ops::delete(&self.store, snapshot, agent)
        })?;
        self.events.publish(&Event::deleted(&info));
        Ok(info)
    }

    /// Pinned snapshots are never forgotten nor deleted.
    pub fn pin(&self, snapshot: &str, agent: Option<&AgentId>) -> Result<SnapshotInfo, Error> {
        crate::ops::forget::set_pin(&self.store, snapshot, agent, true)
    }

    pub fn unpin(&self, snapshot: &str, agent: Option<&AgentId>) -> Result<SnapshotInfo, Error> {
        crate::ops::forget::set_pin(&self.store, snapshot, agent, false)
    }

    /// Removes snapshot records by a retention policy (their data goes with the next prune).
    pub fn forget(&self, req: &ForgetRequest) -> Result<ForgetReport, Error> {
        let report = self.tracked(Op::Forget, || crate::ops::forget::forget(&self.store, req))?;
        for e in Event::forgotten(&report) {
            self.events.publish(&e);
        }
        Ok(report)
    }

    /// Frees the space of chunks no snapshot references (store-format.md, "Garbage collection").
    pub fn prune(&self, req: &PruneRequest) -> Result<PruneReport, Error> {
        let report = self.tracked(Op::Prune, || {
            crate::ops::prune::prune(&self.store, req, self.progress.as_ref())
        })?;
        if let Some(e) = Event::pruned(&report) {
            self.events.publish(&e);
        }
        Ok(report)
    }

    /// Writes a snapshot as a portable bundle (store-format.md, "Bundles").
    pub fn export(&self, req: &ExportRequest) -> Result<ExportReport, Error> {
        let report = self.tracked(Op::Export, || {
            crate::bundle::export::export(&self.store, req, self.progress.as_ref())
        })?;
        self.events.publish(&Event::exported(&report));
        Ok(report)
    }

    /// Adds a bundle's snapshot to the store, deduplicating, after checking all of it.
    pub fn import(&self, req: &ImportRequest) -> Result<ImportReport, Error> {
        let report = self.tracked(Op::Import, || {
            crate::bundle::import::import(&self.store, req, self.progress.as_ref())
        })?;
        self.events.publish(&Event::imported(&report));
        Ok(report)
    }

    /// Restores from a bundle: imports it (checked whole, deduplicated), then restores that
    /// snapshot with every guarantee of [`Memsnap::restore`]. `restore.snapshot` is ignored.
    pub fn restore_bundle(
        &self,
        import: &ImportRequest,
        restore: &RestoreRequest,
    ) -> Result<(ImportReport, RestoreReport), Error> {
        let mut import = import.clone();
        if import.agent.is_none() {
            import.agent = restore.agent.clone();
        }
        let imported = self.import(&import)?;
        let mut req = restore.clone();
        req.snapshot = imported.snapshot.id.clone();
        let restored = self.restore(&req)?;
        Ok((imported, restored))
    }
}

/// Checks a bundle file on its own (no store needed): the file against its `.sha256`, the
/// manifest, its seal and every artifact; inside an encrypted bundle only with `identity`.
pub fn verify_bundle(bundle: &Path, identity: Option<&Path>) -> Result<BundleVerifyReport, Error> {
    crate::bundle::import::verify_bundle(bundle, identity)
}

/// Async snapshot operations, in the spirit of nexo-memory-snapshot's `MemorySnapshotter`.
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync {
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, Error>;
    async fn restore(&self, req: RestoreRequest) -> Result<RestoreReport, Error>;
    async fn list(
        &self,
        tenant: Option<String>,
        agent: Option<String>,
    ) -> Result<Vec<SnapshotInfo>, Error>;
    async fn verify(
        &self,
        snapshot: Option<String>,
        read_data: bool,
    ) -> Result<VerifyReport, Error>;
    async fn show(&self, snapshot: String) -> Result<SnapshotDetails, Error>;
    async fn delete(&self, snapshot: String) -> Result<SnapshotInfo, Error>;
    async fn export(&self, req: ExportRequest) -> Result<ExportReport, Error>;
    async fn import(&self, req: ImportRequest) -> Result<ImportReport, Error>;
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("blocking task failed: {e}")),
        })?
}

#[async_trait::async_trait]
impl Snapshotter for Memsnap {
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, Error> {
        let m = self.clone();
        blocking(move || Memsnap::snapshot(&m, &req)).await
    }

    async fn restore(&self, req: RestoreRequest) -> Result<RestoreReport, Error> {
        let m = self.clone();
        blocking(move || Memsnap::restore(&m, &req)).await
    }

    async fn list(
        &self,
        tenant: Option<String>,
        agent: Option<String>,
    ) -> Result<Vec<SnapshotInfo>, Error> {
        let m = self.clone();
        blocking(move || Memsnap::list(&m, tenant.as_deref(), agent.as_deref())).await
    }

    async fn verify(
        &self,
        snapshot: Option<String>,
        read_data: bool,
    ) -> Result<VerifyReport, Error> {
        let m = self.clone();
        blocking(move || Memsnap::verify(&m, snapshot.as_deref(), None, read_data)).await
    }

    async fn show(&self, snapshot: String) -> Result<SnapshotDetails, Error> {
        let m = self.clone();
        blocking(move || Memsnap::show(&m, &snapshot, None)).await
    }

    async fn delete(&self, snapshot: String) -> Result<SnapshotInfo, Error> {
        let m = self.clone();
        blocking(move || Memsnap::delete(&m, &snapshot, None)).await
    }

    async fn export(&self, req: ExportRequest) -> Result<ExportReport, Error> {
        let m = self.clone();
        blocking(move || Memsnap::export(&m, &req)).await
    }

    async fn import(&self, req: ImportRequest) -> Result<ImportReport, Error> {
        let m = self.clone();
        blocking(move || Memsnap::import(&m, &req)).await
    }
}
