//! The library's front door: [`Memsnap`], a handle on one store with blocking methods, and the
//! async [`Snapshotter`] trait over it, which runs every operation on the blocking pool so that
//! file I/O, SQLite and hashing never occupy a tokio worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::bundle::export::{ExportReport, ExportRequest};
use crate::bundle::import::{BundleVerifyReport, ImportReport, ImportRequest};
use crate::error::Error;
use crate::manifest::snapshot::SnapshotInfo;
use crate::names::AgentId;
use crate::ops::forget::{ForgetReport, ForgetRequest};
use crate::ops::prune::{PruneReport, PruneRequest};
use crate::ops::restore::{RestoreReport, RestoreRequest};
use crate::ops::snapshot::SnapshotRequest;
use crate::ops::verify::VerifyReport;
use crate::ops::{NoProgress, Progress, SnapshotDetails};
use crate::store::Store;

/// Options for opening a store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How long to wait for an agent that another process is snapshotting or restoring.
    pub lock_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(30),
        }
    }
}

impl StoreOptions {
    pub fn lock_timeout(mut self, t: Duration) -> Self {
        self.lock_timeout = t;
        self
    }
}

/// A memsnap store.
#[derive(Clone)]
pub struct Memsnap {
    store: Store,
    progress: Arc<dyn Progress>,
}

impl Memsnap {
    /// Opens the store at `path`, creating it if needed (every writing command may create it).
    pub fn create(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self, Error> {
        let store = Store::create_or_open(path.as_ref(), opts.lock_timeout)?;
        Self::ready(store)
    }

    /// Opens an existing store; [`Error::NoStore`] if there is none at `path`.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self, Error> {
        let store = Store::open(path.as_ref(), opts.lock_timeout)?;
        Self::ready(store)
    }

    fn ready(store: Store) -> Result<Self, Error> {
        for msg in crate::ops::restore::recover_all(&store)? {
            tracing::warn!("{msg}");
        }
        Ok(Self {
            store,
            progress: Arc::new(NoProgress),
        })
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
        crate::ops::snapshot::snapshot(&self.store, req, self.progress.as_ref())
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreReport, Error> {
        crate::ops::restore::restore(&self.store, req, self.progress.as_ref())
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
        crate::ops::delete(&self.store, snapshot, agent)
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
        crate::ops::forget::forget(&self.store, req)
    }

    /// Frees the space of chunks no snapshot references (store-format.md, "Garbage collection").
    pub fn prune(&self, req: &PruneRequest) -> Result<PruneReport, Error> {
        crate::ops::prune::prune(&self.store, req, self.progress.as_ref())
    }

    /// Writes a snapshot as a portable bundle (store-format.md, "Bundles").
    pub fn export(&self, req: &ExportRequest) -> Result<ExportReport, Error> {
        crate::bundle::export::export(&self.store, req, self.progress.as_ref())
    }

    /// Adds a bundle's snapshot to the store, deduplicating, after checking all of it.
    pub fn import(&self, req: &ImportRequest) -> Result<ImportReport, Error> {
        crate::bundle::import::import(&self.store, req, self.progress.as_ref())
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
