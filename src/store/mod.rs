//! The content-addressed chunk store: packs of chunks named by BLAKE3, indexed in redb.
//! The on-disk format and its invariants are defined in store-format.md; this module follows it.

pub(crate) mod chunk_id;
pub(crate) mod config;
pub(crate) mod filter;
pub(crate) mod index;
pub(crate) mod pack;
pub(crate) mod planes;
pub(crate) mod reader;
pub(crate) mod runs;
pub(crate) mod stream;
pub(crate) mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::ReadableTable;

use crate::error::{Error, StoreError};
use crate::lock::{self, Holder, LockGuard, Mode};
use crate::names::AgentId;
use crate::storage::Fs;
use config::{FORMAT_VERSION, StoreConfig};
use index::{Index, META};

pub(crate) const INDEX_FILE: &str = "index.redb";

/// An opened store. Cheap to hold: the index is opened per session ([`Store::index`]).
#[derive(Debug, Clone)]
pub(crate) struct Store {
    root: PathBuf,
    pub(crate) config: StoreConfig,
    pub(crate) lock_timeout: Duration,
    /// Every write of the store, and of restores into agents, goes through this.
    pub(crate) fs: Fs,
    /// Chunk locations a restore or export holds at once ([`stream`]).
    pub(crate) window: usize,
}

impl Store {
    /// Opens the store at `root`, creating it first if it does not exist.
    pub(crate) fn create_or_open(
        root: &Path,
        lock_timeout: Duration,
        fs: Fs,
    ) -> Result<Self, Error> {
        // Never scatter a store over a folder that holds something else.
        if !root.join(INDEX_FILE).exists()
            && has_foreign_entries(root).map_err(|e| Error::io(root, e))?
        {
            return Err(Error::NotAStore {
                path: root.to_path_buf(),
            });
        }
        for dir in ["packs", "locks", "journal", "tmp"] {
            let d = root.join(dir);
            fs.create_dir_all_durable(&d)
                .map_err(|e| Error::io(&d, e))?;
        }
        let store = Self {
            root: root.to_path_buf(),
            config: StoreConfig::new_default(crate::now_ms()),
            lock_timeout,
            fs,
            window: stream::DEFAULT_WINDOW,
        };
        let created = !root.join(INDEX_FILE).exists();
        if !created {
            // The common case, every `snapshot`: no write transaction needed.
            return Self::open(root, lock_timeout, store.fs);
        }
        let index = store.index()?;
        let tx = index.begin_write()?;
        let config = {
            let mut meta = tx.open_table(META).map_err(|e| index.err()(e.into()))?;
            let existing = meta
                .get("config")
                .map_err(|e| index.err()(e.into()))?
                .map(|g| g.value().to_vec());
            match existing {
                Some(bytes) => decode_config(&index.path, &bytes)?,
                None => {
                    let bytes = index::encode_record(1, &store.config, "store config")?;
                    meta.insert("config", bytes.as_slice())
                        .map_err(|e| index.err()(e.into()))?;
                    store.config.clone()
                }
            }
        };
        // Create every table, so that readers never meet a missing one.
        tx.open_table(index::CHUNKS)
            .map_err(|e| index.err()(e.into()))?;
        tx.open_table(index::PACKS)
            .map_err(|e| index.err()(e.into()))?;
        tx.open_table(index::SNAPSHOTS)
            .map_err(|e| index.err()(e.into()))?;
        tx.open_table(index::AGENTS)
            .map_err(|e| index.err()(e.into()))?;
        tx.open_table(index::PINS)
            .map_err(|e| index.err()(e.into()))?;
        tx.commit().map_err(|e| index.err()(e.into()))?;
        drop(index);
        // The new index file's name must survive a crash, or a later open would take the store
        // for an empty one.
        store.fs.sync_dir(root).map_err(|e| Error::io(root, e))?;
        Ok(Self { config, ..store })
    }

    /// Opens an existing store; a missing one is [`Error::NoStore`].
    pub(crate) fn open(root: &Path, lock_timeout: Duration, fs: Fs) -> Result<Self, Error> {
        if !root.join(INDEX_FILE).is_file() {
            return Err(Error::NoStore {
                path: root.to_path_buf(),
            });
        }
        let mut store = Self {
            root: root.to_path_buf(),
            config: StoreConfig::new_default(0),
            lock_timeout,
            fs,
            window: stream::DEFAULT_WINDOW,
        };
        let index = store.index_for_reading()?;
        let tx = index.begin_read()?;
        // Every store's index has the table from its creation on: without it, the file was
        // emptied or cut short (and redb's open rolled it back to nothing).
        let meta = tx.open_table(META).map_err(|e| match e {
            redb::TableError::TableDoesNotExist(_) => StoreError::IndexDamaged {
                path: index.path.clone(),
                message: "it holds no store tables (it was emptied or cut short)".into(),
            },
            e => index.err()(e.into()),
        })?;
        let bytes = meta
            .get("config")
            .map_err(|e| index.err()(e.into()))?
            .map(|g| g.value().to_vec())
            .ok_or_else(|| StoreError::IndexDamaged {
                path: index.path.clone(),
                message: "it holds no store config (it was emptied or replaced)".into(),
            })?;
        store.config = decode_config(&index.path, &bytes)?;
        Ok(store)
    }

    pub(crate) fn with_lock_timeout(&self, lock_timeout: Duration) -> Self {
        Self {
            lock_timeout,
            ..self.clone()
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }

    pub(crate) fn index(&self) -> Result<Index, Error> {
        self.open_index(index::INDEX_CACHE_BYTES, index::Access::Write)
    }

    /// An index session that only reads, in key order ([`index::READ_CACHE_BYTES`]), or a few
    /// records ([`index::Access::Read`]).
    pub(crate) fn index_for_reading(&self) -> Result<Index, Error> {
        self.open_index(index::READ_CACHE_BYTES, index::Access::Read)
    }

    /// An index session that only reads, by many random lookups (tree nodes of every snapshot:
    /// stats, diff, show), with the larger cache of [`Store::index`].
    pub(crate) fn index_for_lookups(&self) -> Result<Index, Error> {
        self.open_index(index::INDEX_CACHE_BYTES, index::Access::Read)
    }

    fn open_index(&self, cache: usize, access: index::Access) -> Result<Index, Error> {
        let e = self.long_write();
        Index::open(&self.fs, &e.index, &e.lock, cache, access)
    }

    /// A writer into this store for a snapshot or an import: it bounds its memory (see
    /// [`writer::LongWrite`]).
    pub(crate) fn writer(&self, known: filter::KnownFilter) -> writer::ChunkWriter {
        let mut w = writer::ChunkWriter::new(&self.fs, self.packs_dir(), &self.config, known);
        w.long_write(self.long_write());
        w
    }

    /// Where a long write's sessions open the index, its lock, and where it spills.
    pub(crate) fn long_write(&self) -> writer::LongWrite {
        writer::LongWrite {
            index: self.root.join(INDEX_FILE),
            lock: self.root.join("locks").join("index.lock"),
            tmp: self.tmp_dir(),
        }
    }

    /// A new store in `dir`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(dir: &Path) -> Self {
        match Self::create_or_open(dir, Duration::from_secs(5), crate::storage::Fs::default()) {
            Ok(store) => store,
            Err(e) => panic!("a test store in {}: {e}", dir.display()),
        }
    }

    /// The per-agent lock: two operations on one agent never interleave.
    pub(crate) fn lock_agent(&self, agent: &AgentId) -> Result<LockGuard, Error> {
        let path = self
            .root
            .join("locks")
            .join("agents")
            .join(agent.tenant())
            .join(format!("{}.lock", agent.agent()));
        lock::acquire(
            &path,
            Mode::Exclusive,
            self.lock_timeout,
            Holder::Agent(agent.to_string()),
        )
    }

    /// The store lock: shared by every operation that writes snapshots, exclusive for the
    /// operations that delete chunks (prune), so that a snapshot never references a chunk that
    /// is being deleted.
    pub(crate) fn lock_store(&self, mode: Mode) -> Result<LockGuard, Error> {
        lock::acquire(
            &self.root.join("locks").join("store.lock"),
            mode,
            self.lock_timeout,
            Holder::Store,
        )
    }
}

/// Raises the store's `format_version` to this build's in `tx`, read from the index itself
/// (store-format.md, "Version changes"): done by each transaction that writes what an older
/// memsnap would ignore or misread, so that it refuses the store instead.
pub(crate) fn raise_format(index: &Index, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(|e| index.err()(e.into()))?;
    let found = meta
        .get("config")
        .map_err(|e| index.err()(e.into()))?
        .map(|g| decode_config(&index.path, g.value()))
        .transpose()?;
    let Some(mut config) = found.filter(|c| c.format_version < FORMAT_VERSION) else {
        return Ok(());
    };
    config.format_version = FORMAT_VERSION;
    let bytes = index::encode_record(1, &config, "store config")?;
    meta.insert("config", bytes.as_slice())
        .map_err(|e| index.err()(e.into()))?;
    Ok(())
}

pub(crate) fn decode_config(path: &Path, bytes: &[u8]) -> Result<StoreConfig, StoreError> {
    // The version field leads the record, so a newer store is named as such before its
    // (possibly different) layout is decoded.
    if bytes.first().copied().unwrap_or(0) > 1 {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: bytes.first().copied().unwrap_or(0) as u32,
            supported: FORMAT_VERSION,
        });
    }
    let config: StoreConfig = index::decode_record(1, bytes, "store config")?;
    if config.format_version > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: config.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(config)
}

/// Whether `root` holds anything but a store's own folders (left by a creation that crashed
/// before the index existed).
fn has_foreign_entries(root: &Path) -> std::io::Result<bool> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let name = entry?.file_name();
        if !["packs", "locks", "journal", "tmp", "damaged", INDEX_FILE]
            .iter()
            .any(|own| name == *own)
        {
            return Ok(true);
        }
    }
    Ok(false)
}
