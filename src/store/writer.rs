//! The write side of a snapshot: hashes chunks, drops those the store already has, compresses the
//! rest where that pays and appends them to packs. Nothing becomes visible until the caller
//! commits the [`Pending`] result in one index transaction (store-format.md, "Write ordering").
//!
//! Known chunks are recognised by an in-memory filter of id prefixes loaded when the snapshot
//! starts ([`super::filter`]). A hit is only "probably stored": it is confirmed
//! with an exact index lookup, in batches during a snapshot and the rest at commit. Tree nodes
//! make that cheap: a confirmed node implies its whole subtree (invariant I3), so a hit subtree
//! needs one lookup, however large.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::chunk_id::ChunkId;
use super::config::StoreConfig;
use super::filter::KnownFilter;
use super::pack::{ChunkLoc, FLAG_PLANES, FLAG_TREE, FLAG_ZSTD, PackId, PackWriter};
use super::runs::SortedRuns;
use crate::error::StoreError;
use crate::storage::Fs;

/// Packs whose fsync may be in flight at once while a snapshot writes on.
const MAX_SYNCING: usize = 2;

/// Durable chunks that make a sorted run (~6 MB of entries held; see [`SortedRuns`]).
const RUN_CHUNKS: usize = 65_536;

/// Filter hits that trigger an index session to confirm them (1 MiB of ids, 2 with the batch
/// in flight): an append day of a 4 GiB agent leaves ~550k below its changed tree nodes.
const CONFIRM_BATCH: usize = 32_768;

/// Tree nodes that vouch for filter hits that a long write keeps in memory (~0.5 MB of map);
/// past this they go to a scratch file (see [`NodeSpill`]).
const NODES_IN_MEMORY: usize = 4_096;

/// Bounds what a long write (a snapshot, an import) holds in memory, ~100 B per new chunk
/// otherwise (100 MB for a first snapshot of 4 GiB): the entries of its durable packs wait for
/// the final commit in sorted runs on disk ([`SortedRuns`]), and its filter hits are confirmed
/// in batches, each in an index session of its own (a read). Nothing reaches the index before
/// the final commit (store-format.md, "Write ordering").
pub(crate) struct LongWrite {
    pub index: PathBuf,
    pub lock: PathBuf,
    /// The store's scratch folder, for [`NodeSpill`] and [`SortedRuns`].
    pub tmp: PathBuf,
}

/// Tree nodes left to the final commit, moved out of memory: an update day of a 4 GiB agent
/// writes ~36k nodes over filter hits, whose map raised its peak RSS by ~3 MB (71 -> 68 MB
/// spilled). Entries are `id [32] | ChunkLoc::encode [33]`; the file is scratch
/// (`tmp/nodes-<pid>-<hex>/`), read back by [`ChunkWriter::finish`]. A node spilled is no
/// longer recognised as written: met again, it is written again (garbage, I5).
struct NodeSpill {
    dir: crate::fsutil::ScratchDir,
    file: std::io::BufWriter<std::fs::File>,
    count: usize,
}

impl NodeSpill {
    const PREFIX: &'static str = "nodes";
    const FILE: &'static str = "nodes";

    fn create(fs: &Fs, tmp: &std::path::Path) -> Result<Self, StoreError> {
        let dir = crate::fsutil::ScratchDir::create(fs, tmp, Self::PREFIX)
            .map_err(|e| StoreError::io(tmp, e))?;
        let path = dir.path.join(Self::FILE);
        let file = std::fs::File::create(&path).map_err(|e| StoreError::io(&path, e))?;
        Ok(Self {
            dir,
            file: std::io::BufWriter::with_capacity(64 << 10, file),
            count: 0,
        })
    }

    fn write(&mut self, nodes: &HashMap<ChunkId, ChunkLoc>) -> Result<(), StoreError> {
        use std::io::Write;
        for (id, loc) in nodes {
            self.file
                .write_all(&id.0)
                .and_then(|()| self.file.write_all(&loc.encode()))
                .map_err(|e| StoreError::io(self.dir.path.join(Self::FILE), e))?;
        }
        self.count += nodes.len();
        Ok(())
    }

    /// Every entry written, into `into`; the scratch folder goes when `self` is dropped.
    fn read_into(self, into: &mut HashMap<ChunkId, ChunkLoc>) -> Result<(), StoreError> {
        use std::io::Read;
        let path = self.dir.path.join(Self::FILE);
        let err = |e| StoreError::io(&path, e);
        drop(self.file.into_inner().map_err(|e| err(e.into_error()))?);
        let file = std::fs::File::open(&path).map_err(err)?;
        let mut r = std::io::BufReader::with_capacity(64 << 10, file);
        into.reserve(self.count);
        let (mut id, mut loc) = ([0u8; 32], [0u8; ChunkLoc::ENCODED]);
        for _ in 0..self.count {
            r.read_exact(&mut id)
                .and_then(|()| r.read_exact(&mut loc))
                .map_err(err)?;
            into.insert(ChunkId(id), ChunkLoc::decode(&loc));
        }
        Ok(())
    }
}

/// A number from the environment that tests use to reach, with little data, what only large
/// data reaches otherwise (many packs, sorted runs). Like MEMSNAP_FAILPOINT: not for users.
pub(crate) fn test_knob(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// A pack sync running on a thread of its own.
type Background = std::thread::JoinHandle<Result<(), StoreError>>;

/// A confirmation session running on a thread of its own: it returns the filter hits the index
/// does not hold.
type Session = std::thread::JoinHandle<Result<Vec<ChunkId>, StoreError>>;

struct Syncing {
    handle: Background,
    /// Its chunks, as in `ChunkWriter::open_chunks`.
    chunks: HashMap<ChunkId, ChunkLoc>,
}

/// The outcome of storing one chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Put {
    pub id: ChunkId,
    pub len: u64,
    /// The store probably had the chunk before this snapshot (a filter hit, to be confirmed).
    pub hit: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WriteStats {
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
}

/// What a finished writer hands to the commit: everything here is durable on disk. Dropped
/// before [`Pending::keep`], it deletes its packs: the commit did not happen.
pub(crate) struct Pending {
    /// Set once the commit is attempted: from then on the index may name the packs, even if
    /// the commit reports an error (a failed fsync says nothing of what reached the disk).
    kept: AtomicBool,
    pub fs: Fs,
    pub packs_dir: PathBuf,
    /// New entries: these, and those of `runs`.
    pub new_chunks: HashMap<ChunkId, ChunkLoc>,
    pub runs: Option<SortedRuns>,
    /// (pack, size in bytes, chunk count)
    pub packs: Vec<(PackId, u64, u32)>,
    /// Filter hits left to confirm at commit, in key order, each with whether it is a tree node.
    pub confirm: Vec<(ChunkId, bool)>,
    /// Filter hits the writer's own sessions found missing (prefix collisions).
    pub missing: Vec<ChunkId>,
    pub stats: WriteStats,
}

pub(crate) struct ChunkWriter {
    fs: Fs,
    packs_dir: PathBuf,
    level: i32,
    pack_target: u64,
    known: Arc<KnownFilter>,
    /// Chunks of the open pack: data, and tree nodes over new chunks only (see
    /// `put_tree_node`). A map per pack in flight, handed on whole once the pack is durable:
    /// one map that every pack's chunks passed through doubled its size with the store
    /// (removals leave tombstones that hashbrown rehashes away only at half load).
    open_chunks: HashMap<ChunkId, ChunkLoc>,
    /// The chunk appended last to the open pack.
    last_appended: Option<ChunkId>,
    /// Chunks durable in packs, in a writer that is not a [`LongWrite`] (which keeps them in
    /// `durable`).
    new_chunks: HashMap<ChunkId, ChunkLoc>,
    /// Tree nodes that vouch for filter hits: they wait for the final commit. Apart from the
    /// rest, whose maps then stay the size of the pipeline; in a [`LongWrite`], at most
    /// [`NODES_IN_MEMORY`], the rest in `spill`.
    new_nodes: HashMap<ChunkId, ChunkLoc>,
    spill: Option<NodeSpill>,
    pack: Option<PackWriter>,
    done: Vec<(PackId, u64, u32)>,
    /// Sealed packs being made durable on threads of their own, oldest first, with their chunks.
    syncing: std::collections::VecDeque<Syncing>,
    /// Set for a snapshot or an import: see [`LongWrite`].
    long: Option<LongWrite>,
    /// Chunks durable in packs, for the next sorted run.
    durable: Vec<(ChunkId, ChunkLoc)>,
    runs: Option<SortedRuns>,
    run_chunks: usize,
    confirm_batch: usize,
    nodes_in_memory: usize,
    /// The confirmation session in flight.
    confirming: Option<Session>,
    /// Handed over by `finish`: the packs are the commit's (through [`Pending`]) to keep.
    finished: bool,
    dirs: BTreeSet<PathBuf>,
    /// Filter hits that no hit tree node covers, for the next index session to confirm (see
    /// [`ChunkWriter::confirm_later`]), each with whether it is a tree node: its index entry must
    /// then be one (a data chunk with the same bytes proves nothing about a subtree).
    confirm: Vec<(ChunkId, bool)>,
    /// Filter hits an index session found missing.
    missing: Vec<ChunkId>,
    pub(crate) stats: WriteStats,
}

/// The chunks of one content, cut in order, in one buffer: one allocation per batch rather than
/// one per chunk (which cost malloc contention between the reading and writing threads).
#[derive(Default)]
pub(crate) struct Batch {
    data: Vec<u8>,
    /// End offset of each cut chunk; bytes after the last end belong to the open chunk.
    ends: Vec<usize>,
}

impl Batch {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            ends: Vec::new(),
        }
    }

    /// Adds one whole chunk.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.extend(chunk);
        self.cut();
    }

    /// Appends to the open chunk.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    /// Ends the open chunk (possibly empty: an empty content is one empty chunk).
    pub(crate) fn cut(&mut self) {
        self.ends.push(self.data.len());
    }

    /// Bytes in the open chunk.
    pub(crate) fn open_len(&self) -> usize {
        self.data.len() - self.ends.last().copied().unwrap_or(0)
    }

    /// Bytes of the cut chunks.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data[..self.ends.last().copied().unwrap_or(0)]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Moves the open chunk's bytes into `next` (emptied first, its buffer kept) and returns
    /// this batch in its place.
    pub(crate) fn split_open_into(&mut self, mut next: Batch) -> Batch {
        let cut = self.ends.last().copied().unwrap_or(0);
        next.data.clear();
        next.ends.clear();
        next.data.extend_from_slice(&self.data[cut..]);
        self.data.truncate(cut);
        std::mem::replace(self, next)
    }

    fn chunk(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    /// Every cut chunk's bytes, each on its own, to be encoded in place.
    fn chunks_mut(&mut self) -> Vec<&mut [u8]> {
        let mut out = Vec::with_capacity(self.ends.len());
        let mut rest = &mut self.data[..];
        let mut at = 0;
        for &end in &self.ends {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(end - at);
            out.push(chunk);
            rest = tail;
            at = end;
        }
        out
    }
}

/// One chunk of a batch, hashed and (if probably new) encoded.
struct Prepared {
    id: ChunkId,
    hit: bool,
    /// The flag and length of its encoded bytes, when the chunk is not stored raw: they then
    /// replace the start of the chunk in the batch, which no one reads raw after hashing. So a
    /// batch of new chunks takes no memory beyond its own (a copy per chunk held ~0.75 of a
    /// batch more while it waited to be appended, ~1,000 allocations).
    encoded: Option<(u8, usize)>,
}

/// Batches smaller than this are prepared on the calling thread: handing them to the pool would
/// cost more than it saves (tree nodes, small files).
const POOL_BYTES: usize = 256 << 10;

/// A batch being hashed and compressed on the rayon pool (see [`ChunkWriter::start`]).
pub(crate) struct InFlight(Job);

enum Job {
    Ready(Batch, Vec<Prepared>),
    Pool(std::sync::mpsc::Receiver<std::thread::Result<(Batch, Vec<Prepared>)>>),
}

fn prepare(data: &mut [u8], known: &KnownFilter, level: i32) -> Prepared {
    let id = ChunkId::of(data);
    let hit = known.probably_has(&id);
    let encoded = if hit {
        None
    } else {
        // Encodings are smaller than the chunk (`compress` keeps only what saves an eighth).
        compress(data, level)
            .filter(|(_, e)| e.len() < data.len())
            .map(|(flag, e)| {
                data[..e.len()].copy_from_slice(&e);
                (flag, e.len())
            })
    };
    Prepared { id, hit, encoded }
}

impl ChunkWriter {
    pub(crate) fn new(
        fs: &Fs,
        packs_dir: PathBuf,
        config: &StoreConfig,
        known: KnownFilter,
    ) -> Self {
        Self {
            fs: fs.clone(),
            packs_dir,
            level: config.zstd_level,
            pack_target: test_knob("MEMSNAP_TEST_PACK_BYTES").unwrap_or(config.pack_target_size),
            run_chunks: test_knob("MEMSNAP_TEST_RUN_CHUNKS").map_or(RUN_CHUNKS, |n| n as usize),
            confirm_batch: test_knob("MEMSNAP_TEST_CONFIRM_BATCH")
                .map_or(CONFIRM_BATCH, |n| (n as usize).max(1)),
            nodes_in_memory: test_knob("MEMSNAP_TEST_NODES_IN_MEMORY")
                .map_or(NODES_IN_MEMORY, |n| (n as usize).max(1)),
            confirming: None,
            finished: false,
            known: Arc::new(known),
            open_chunks: HashMap::new(),
            last_appended: None,
            new_chunks: HashMap::new(),
            new_nodes: HashMap::new(),
            spill: None,
            pack: None,
            done: Vec::new(),
            syncing: std::collections::VecDeque::new(),
            long: None,
            durable: Vec::new(),
            runs: None,
            dirs: BTreeSet::new(),
            confirm: Vec::new(),
            missing: Vec::new(),
            stats: WriteStats::default(),
        }
    }

    /// Starts hashing and compressing `batch` (in parallel, on the pool, if it is large), so the
    /// caller can append the previous batch meanwhile; [`ChunkWriter::complete`] stores it.
    pub(crate) fn start(&self, mut batch: Batch) -> InFlight {
        let level = self.level;
        if batch.bytes().len() < POOL_BYTES {
            let prepared = batch
                .chunks_mut()
                .into_iter()
                .map(|chunk| prepare(chunk, &self.known, level))
                .collect();
            return InFlight(Job::Ready(batch, prepared));
        }
        let known = self.known.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rayon::spawn(move || {
            // A panic travels back to the caller instead of aborting the pool.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let prepared = batch
                    .chunks_mut()
                    .into_par_iter()
                    .map(|chunk| prepare(chunk, &known, level))
                    .collect();
                (batch, prepared)
            }));
            let _ = tx.send(out);
        });
        InFlight(Job::Pool(rx))
    }

    /// Appends the new chunks of a started batch to the pack, in order.
    pub(crate) fn complete(&mut self, job: InFlight, flags: u8) -> Result<Vec<Put>, StoreError> {
        Ok(self.complete_keep(job, flags)?.0)
    }

    /// [`ChunkWriter::complete`], handing the batch back so that its buffer can be filled again.
    pub(crate) fn complete_keep(
        &mut self,
        job: InFlight,
        flags: u8,
    ) -> Result<(Vec<Put>, Batch), StoreError> {
        let (batch, prepared) = match job.0 {
            Job::Ready(b, p) => (b, p),
            Job::Pool(rx) => match rx.recv() {
                Ok(Ok(done)) => done,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => {
                    return Err(StoreError::CorruptRecord {
                        what: "chunk batch".into(),
                        message: "the hashing pool dropped a batch".into(),
                    });
                }
            },
        };
        let mut out = Vec::with_capacity(prepared.len());
        for (i, p) in prepared.into_iter().enumerate() {
            let data = batch.chunk(i);
            self.stats.chunks += 1;
            let raw_len = data.len() as u32;
            // A batch may hold one new chunk twice, and an earlier batch of this snapshot may
            // have stored it.
            if !p.hit && !self.wrote(&p.id) {
                match p.encoded {
                    Some((encoding, len)) => {
                        self.append(p.id, raw_len, flags | encoding, &data[..len])?
                    }
                    None => self.append(p.id, raw_len, flags, data)?,
                }
            }
            out.push(Put {
                id: p.id,
                len: raw_len as u64,
                hit: p.hit,
            });
        }
        Ok((out, batch))
    }

    /// Whether `id` is in the open pack or in a pack still being made durable.
    fn in_flight(&self, id: &ChunkId) -> bool {
        self.open_chunks.contains_key(id) || self.syncing.iter().any(|s| s.chunks.contains_key(id))
    }

    /// Whether this writer stored `id` and still recognises it: entries moved to `durable` or
    /// to a sorted run are not looked at, so a chunk met again after that is written again
    /// (garbage, I5).
    fn wrote(&self, id: &ChunkId) -> bool {
        self.in_flight(id) || self.new_chunks.contains_key(id) || self.new_nodes.contains_key(id)
    }

    /// Stores a batch of chunks (see [`ChunkWriter::start`]).
    pub(crate) fn put_batch(&mut self, batch: Batch, flags: u8) -> Result<Vec<Put>, StoreError> {
        let job = self.start(batch);
        self.complete(job, flags)
    }

    /// Registers a content stored by an earlier snapshot and reused without being read: its
    /// root is confirmed like a filter hit (a tree node must still be one, I3).
    pub(crate) fn reuse(&mut self, content: &crate::tree::ContentRef) -> Result<(), StoreError> {
        self.confirm_later([content.root], content.height > 0)
    }

    /// Filter hits to confirm with an exact lookup. In a [`LongWrite`] a batch goes to an index
    /// session of its own once it is [`CONFIRM_BATCH`] long, so that the list does not grow with
    /// the agent. A hit confirmed early stays in the index until the final commit: only prune
    /// and repair delete entries, and both need the store lock exclusive, which the writer's
    /// caller holds shared (store-format.md, "Write ordering").
    pub(crate) fn confirm_later(
        &mut self,
        hits: impl IntoIterator<Item = ChunkId>,
        nodes: bool,
    ) -> Result<(), StoreError> {
        self.confirm.extend(hits.into_iter().map(|id| (id, nodes)));
        if self.long.is_some() && self.confirm.len() >= self.confirm_batch {
            self.confirm_now()?;
        }
        Ok(())
    }

    /// The filter hits index sessions have found missing so far: if any, the commit will not
    /// happen.
    pub(crate) fn take_missing(&mut self) -> Vec<ChunkId> {
        std::mem::take(&mut self.missing)
    }

    /// The hits waiting for an index session, in the order met.
    #[cfg(test)]
    pub(crate) fn confirm_list(&self) -> &[(ChunkId, bool)] {
        &self.confirm
    }

    /// Takes the hits to confirm, in key order: neighbouring lookups share B-tree pages.
    fn take_confirm(&mut self) -> Vec<(ChunkId, bool)> {
        let mut ids = std::mem::take(&mut self.confirm);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Stores a tree node. One whose subtree holds no filter hit (`new_subtree`: every chunk
    /// below it written by this writer) may go to the sorted runs, as data does. Returns
    /// whether it goes there; a node that does not is held apart (`new_nodes`, then
    /// [`NodeSpill`]), and so must its parent: nodes that vouch for hits are few.
    pub(crate) fn put_tree_node(
        &mut self,
        node: Vec<u8>,
        new_subtree: bool,
    ) -> Result<(Put, bool), StoreError> {
        let mut batch = Batch::default();
        batch.push(&node);
        let mut v = self.put_batch(batch, FLAG_TREE)?;
        let put = v.pop().ok_or_else(|| StoreError::CorruptRecord {
            what: "tree node".into(),
            message: "writer returned no result".into(),
        })?;
        let mut with_data = false;
        if new_subtree && !put.hit && self.long.is_some() {
            // Handed over only while its pack is open: the pack's sync moves it to `durable`.
            // A node already handed over (the same subtree twice) goes too; anything else is
            // held apart.
            if self.last_appended == Some(put.id)
                && let Some(loc) = self.new_nodes.remove(&put.id)
            {
                self.open_chunks.insert(put.id, loc);
            }
            with_data = self.in_flight(&put.id);
        }
        if self.new_nodes.len() >= self.nodes_in_memory {
            self.spill_nodes()?;
        }
        Ok((put, with_data))
    }

    fn append(
        &mut self,
        id: ChunkId,
        raw_len: u32,
        flags: u8,
        stored: &[u8],
    ) -> Result<(), StoreError> {
        if self.pack.is_none() {
            let w = PackWriter::create(&self.fs, &self.packs_dir)?;
            self.dirs.insert(crate::fsutil::parent_of(&w.path));
            self.pack = Some(w);
        }
        let Some(pack) = self.pack.as_mut() else {
            return Ok(());
        };
        let loc = pack.append(id, raw_len, flags, stored)?;
        self.last_appended = Some(id);
        self.stats.new_chunks += 1;
        self.stats.new_raw_bytes += raw_len as u64;
        self.stats.new_stored_bytes += stored.len() as u64;
        match flags & FLAG_TREE {
            0 => self.open_chunks.insert(id, loc),
            _ => self.new_nodes.insert(id, loc),
        };
        if pack.full(self.pack_target) {
            self.close_pack()?;
        }
        Ok(())
    }

    /// Moves the tree nodes in `new_nodes` to the spill file, in a [`LongWrite`]: only those
    /// bound memory. The map keeps its capacity for the next ones.
    fn spill_nodes(&mut self) -> Result<(), StoreError> {
        let Some(long) = &self.long else {
            return Ok(());
        };
        let spill = match &mut self.spill {
            Some(s) => s,
            None => self.spill.insert(NodeSpill::create(&self.fs, &long.tmp)?),
        };
        spill.write(&self.new_nodes)?;
        self.new_nodes.clear();
        Ok(())
    }

    /// Seals the open pack and starts making it durable in the background, so the disk writes
    /// back one pack while the next is filled; at most [`MAX_SYNCING`] are in flight.
    fn close_pack(&mut self) -> Result<(), StoreError> {
        if let Some(w) = self.pack.take() {
            let path = w.path.clone();
            let sealed = w.seal().inspect_err(|_| {
                // Not in `done` yet, so dropping the writer would not delete it.
                let _ = self.fs.remove_file(&path);
            })?;
            let pack = (sealed.id, sealed.size, sealed.count);
            self.done.push(pack);
            self.syncing.push_back(Syncing {
                handle: std::thread::spawn(move || sealed.sync()),
                chunks: std::mem::take(&mut self.open_chunks),
            });
            self.last_appended = None;
            while self.syncing.len() > MAX_SYNCING {
                self.wait_oldest_sync()?;
            }
        }
        Ok(())
    }

    fn wait_oldest_sync(&mut self) -> Result<(), StoreError> {
        let Some(s) = self.syncing.pop_front() else {
            return Ok(());
        };
        match s.handle.join() {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        if let Some(long) = &self.long {
            // Data chunks and nodes over new chunks only: other tree nodes are held apart.
            self.durable.extend(s.chunks);
            if self.durable.len() >= self.run_chunks {
                let runs = match &mut self.runs {
                    Some(r) => r,
                    None => self.runs.insert(SortedRuns::create(&self.fs, &long.tmp)?),
                };
                runs.push(&mut self.durable)?;
            }
        } else {
            self.new_chunks.extend(s.chunks);
        }
        Ok(())
    }

    /// Confirms the filter hits met so far in an index session of its own (a read), on its own
    /// thread: the pipeline goes on meanwhile.
    fn confirm_now(&mut self) -> Result<(), StoreError> {
        let Some((index_path, lock)) = self
            .long
            .as_ref()
            .map(|e| (e.index.clone(), e.lock.clone()))
        else {
            return Ok(());
        };
        // One session at a time.
        self.join_confirm()?;
        let confirm = self.take_confirm();
        let fs = self.fs.clone();
        let handle = std::thread::spawn(move || -> Result<Vec<ChunkId>, StoreError> {
            // A store error (a damaged index, with its "run repair") goes through as it is;
            // only the lock's errors, which are not the store's, are wrapped.
            let index = super::index::Index::open(
                &fs,
                &index_path,
                &lock,
                super::index::READ_CACHE_BYTES,
                super::index::Access::Read,
            )
            .map_err(|e| match e {
                crate::error::Error::Store(e) => e,
                other => StoreError::Index {
                    path: index_path.clone(),
                    message: other.to_string(),
                },
            })?;
            let tx = index.begin_read()?;
            unconfirmed_in(&index, tx.open_table(super::index::CHUNKS), &confirm)
        });
        self.confirming = Some(handle);
        Ok(())
    }

    /// Waits for the confirmation session in flight and keeps the hits it found missing.
    fn join_confirm(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.confirming.take() else {
            return Ok(());
        };
        match handle.join() {
            Ok(r) => {
                self.missing.extend(r?);
                Ok(())
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Makes this writer a [`LongWrite`] (a snapshot, an import).
    pub(crate) fn long_write(&mut self, long: LongWrite) {
        // What a killed writer spilled; a live one's folders stay.
        crate::fsutil::sweep_scratch(&self.fs, &long.tmp, NodeSpill::PREFIX);
        crate::fsutil::sweep_scratch(&self.fs, &long.tmp, SortedRuns::PREFIX);
        self.long = Some(long);
    }

    /// What dropping an unfinished writer does (an error on the way): deletes the packs written
    /// so far, since what they were written for will not be committed and nothing else can
    /// reference chunks that no index entry names.
    fn delete_unnamed(&mut self) {
        self.long = None;
        // Runs in Drop: a panic of the session thread must not unwind from here.
        if let Some(handle) = self.confirming.take() {
            let _ = handle.join();
        }
        while let Some(s) = self.syncing.pop_front() {
            let _ = s.handle.join();
        }
        if let Some(p) = self.pack.take() {
            let path = p.path.clone();
            drop(p);
            let _ = self.fs.remove_file(&path);
        }
        for (id, _, _) in &self.done {
            let _ = self.fs.remove_file(&id.path(&self.packs_dir));
        }
    }

    /// Closes the open pack and makes every pack written and its directory entry durable.
    pub(crate) fn finish(mut self) -> Result<Pending, StoreError> {
        use std::mem::take;
        self.close_pack()?;
        while !self.syncing.is_empty() {
            self.wait_oldest_sync()?;
        }
        self.join_confirm()?;
        for dir in &self.dirs {
            self.fs.sync_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        }
        if !self.dirs.is_empty() {
            self.fs
                .sync_dir(&self.packs_dir)
                .map_err(|e| StoreError::io(&self.packs_dir, e))?;
        }
        // The larger map takes in the rest: a snapshot's nodes, an import's data.
        let (mut new_chunks, rest) = match self.new_nodes.len() >= self.new_chunks.len() {
            true => (take(&mut self.new_nodes), take(&mut self.new_chunks)),
            false => (take(&mut self.new_chunks), take(&mut self.new_nodes)),
        };
        new_chunks.extend(rest);
        new_chunks.extend(take(&mut self.durable));
        if let Some(spill) = self.spill.take() {
            spill.read_into(&mut new_chunks)?;
        }
        let confirm = self.take_confirm();
        self.finished = true;
        Ok(Pending {
            kept: AtomicBool::new(false),
            fs: self.fs.clone(),
            packs_dir: self.packs_dir.clone(),
            new_chunks,
            runs: self.runs.take(),
            packs: take(&mut self.done),
            confirm,
            missing: take(&mut self.missing),
            stats: self.stats,
        })
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.delete_unnamed();
        }
    }
}

impl Pending {
    /// Every new entry, in key order: the sorted runs merged with those held in memory.
    pub(crate) fn entries(&self) -> Result<super::runs::Merged, StoreError> {
        super::runs::merged(self.runs.as_ref(), &self.new_chunks)
    }

    /// The filter hits the index does not hold, those the writer's sessions found and those
    /// left to look up in `chunks`, each once (a hit met in two batches is reported by each).
    pub(crate) fn unconfirmed(
        &self,
        index: &super::index::Index,
        chunks: &impl redb::ReadableTable<&'static [u8; 32], &'static [u8; 33]>,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let mut missing = self.missing.clone();
        missing.extend(unconfirmed(index, chunks, &self.confirm)?);
        missing.sort_unstable();
        missing.dedup();
        Ok(missing)
    }

    /// Called just before the index commit: the packs stay, whatever the commit returns.
    pub(crate) fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// The commit failed and is not visible (see `ops::commit_visible`): the packs can go.
    pub(crate) fn unkeep(&self) {
        self.kept.store(false, Ordering::SeqCst);
    }
}

impl Drop for Pending {
    /// Deletes the packs of a commit that did not happen (as dropping an unfinished
    /// `ChunkWriter` does).
    fn drop(&mut self) {
        if self.kept.load(Ordering::SeqCst) {
            return;
        }
        for (id, _, _) in &self.packs {
            let _ = self.fs.remove_file(&id.path(&self.packs_dir));
        }
    }
}

/// Real entries per filler that [`insert_chunks`] puts in an empty table: leaves are left 6/7
/// full.
const FILLER_EVERY: usize = 6;

/// A filler's value, which no real entry has (a pack of all ones, an offset past any file).
const FILLER: [u8; ChunkLoc::ENCODED] = [0xff; ChunkLoc::ENCODED];

/// Inserts new chunk entries (store-format.md, "Write ordering", step 4): another process may
/// have committed the same chunk meanwhile; its copy is kept unless it holds the same bytes as a
/// data chunk and ours is the tree node (I3 needs the node's entry to say so).
///
/// The final commits give their entries in key order ([`Pending::entries`]): each leaf is then
/// written once, and ~2.2x faster than in hash order. Keys in rising order into an empty table
/// take redb's append path, which packs its leaves full, and then every chunk the next snapshot
/// adds splits one (the update-day test's growth 0.047 -> 0.067 of restic's). So an empty
/// table gets a filler after every [`FILLER_EVERY`] entries, between them in key order, and the
/// fillers are removed before the commit: its leaves keep room for a seventh more, as a
/// database's bulk load leaves a fill factor. Fillers never reach the disk's committed state.
pub(crate) fn insert_chunks(
    index: &super::index::Index,
    tx: &redb::WriteTransaction,
    entries: impl Iterator<Item = Result<(ChunkId, ChunkLoc), StoreError>>,
) -> Result<(), StoreError> {
    use redb::ReadableTableMetadata;
    let err = |e: redb::Error| index.err()(e);
    let mut chunks = tx
        .open_table(super::index::CHUNKS)
        .map_err(|e| err(e.into()))?;
    let bulk = chunks.is_empty().map_err(|e| err(e.into()))?;
    let mut fillers = false;
    let mut planes = false;
    let mut entries = entries.peekable();
    let mut n = 0usize;
    while let Some(entry) = entries.next() {
        let (id, loc) = entry?;
        planes |= loc.flags & FLAG_PLANES != 0;
        let previous = chunks
            .insert(&id.0, &loc.encode())
            .map_err(|e| err(e.into()))?
            .map(|g| *g.value())
            .filter(|v| *v != FILLER)
            .map(|v| ChunkLoc::decode(&v));
        if let Some(e) = previous {
            let ours_wins = loc.flags & FLAG_TREE != 0 && e.flags & FLAG_TREE == 0;
            if !ours_wins {
                chunks
                    .insert(&id.0, &e.encode())
                    .map_err(|e| err(e.into()))?;
            }
        }
        n += 1;
        if bulk && n.is_multiple_of(FILLER_EVERY) {
            // Just above `id`, below the next entry.
            let filler = ChunkId(next_key(&id.0));
            if let Some(Ok((next, _))) = entries.peek()
                && filler.0 > id.0
                && filler < *next
            {
                let taken = chunks
                    .insert(&filler.0, &FILLER)
                    .map_err(|e| err(e.into()))?;
                if let Some(v) = taken.map(|g| *g.value()) {
                    // Not a filler's place after all (entries out of order): put it back.
                    chunks.insert(&filler.0, &v).map_err(|e| err(e.into()))?;
                } else {
                    fillers = true;
                }
            }
        }
    }
    if fillers {
        // Found by their value, not listed: a list would grow with the data. A real entry that
        // took a filler's key (entries out of order) stays.
        chunks
            .retain(|_, v| *v != FILLER)
            .map_err(|e| err(e.into()))?;
    }
    drop(chunks);
    if planes {
        // Format 5, whatever the record version: 0.3 decodes neither, 0.4 not version 2.
        super::raise_format(index, tx)?;
    }
    Ok(())
}

/// `key + 1` as a big-endian number (wrapping to zero past the largest).
fn next_key(key: &[u8; 32]) -> [u8; 32] {
    let mut next = *key;
    for b in next.iter_mut().rev() {
        let (v, carry) = b.overflowing_add(1);
        *b = v;
        if !carry {
            break;
        }
    }
    next
}

/// The filter hits in `confirm` (see [`ChunkWriter::take_confirm`]) that the index does not
/// hold: a prefix collision, or a tree node hit whose entry is not flagged as a tree node.
fn unconfirmed(
    index: &super::index::Index,
    chunks: &impl redb::ReadableTable<&'static [u8; 32], &'static [u8; 33]>,
    confirm: &[(ChunkId, bool)],
) -> Result<Vec<ChunkId>, StoreError> {
    let mut missing = Vec::new();
    for (id, node) in confirm {
        let entry = chunks
            .get(&id.0)
            .map_err(|e| index.err()(e.into()))?
            .map(|g| ChunkLoc::decode(g.value()));
        match entry {
            Some(l) if !node || l.flags & FLAG_TREE != 0 => {}
            _ => missing.push(*id),
        }
    }
    Ok(missing)
}

/// [`unconfirmed`] in a table just opened, read-only or for writing.
fn unconfirmed_in<T: redb::ReadableTable<&'static [u8; 32], &'static [u8; 33]>>(
    index: &super::index::Index,
    table: Result<T, redb::TableError>,
    confirm: &[(ChunkId, bool)],
) -> Result<Vec<ChunkId>, StoreError> {
    let table = table.map_err(|e| index.err()(e.into()))?;
    unconfirmed(index, &table, confirm)
}

/// Inserts pack records: (pack, size in bytes, chunk count).
pub(crate) fn insert_packs(
    index: &super::index::Index,
    tx: &redb::WriteTransaction,
    packs: &[(PackId, u64, u32)],
) -> Result<(), StoreError> {
    let mut table = tx
        .open_table(super::index::PACKS)
        .map_err(|e| index.err()(e.into()))?;
    for (pack, size, count) in packs {
        let rec = super::index::encode_record(
            1,
            &super::index::PackRecord {
                size: *size,
                chunks: *count,
                created_at_ms: crate::now_ms(),
            },
            "pack record",
        )?;
        table
            .insert(pack.0, rec.as_slice())
            .map_err(|e| index.err()(e.into()))?;
    }
    Ok(())
}

/// Order-0 entropy (bits per byte) at or above which Huffman coding of all bytes cannot save an
/// eighth and random data has no long matches either: such a chunk is not given to zstd, only
/// to the plane codec, which rejects it cheaply unless one byte lane is skewed (a page packed
/// with float32 values).
const RAW_ENTROPY_BITS: f32 = 7.2;

/// At or above this, a chunk is mostly random bytes around runs of zeros: a SQLite page holding
/// one float32 embedding and its free space (sampled pages estimate ~6.3; text pages 3.5-5.7).
/// zstd would code all its bytes with one Huffman table, which the three random lanes of each
/// float flatten: the plane codec codes the sign-exponent lane alone, and the zero-run frame
/// ([`crate::zstd_frames::zero_runs`]) is the fallback (benches/stages.rs, RESULTS.md run 18).
const FAST_ENTROPY_BITS: f32 = 6.0;

/// An estimate of `data`'s order-0 entropy from at most 1024 bytes sampled at an odd stride (an
/// even one would sample a single byte lane of a float array).
fn entropy_bits(data: &[u8]) -> f32 {
    // c·log2(c) for every possible count, so that an estimate takes no logarithms.
    static C_LOG_C: std::sync::LazyLock<Vec<f32>> = std::sync::LazyLock::new(|| {
        (0..=1024u32)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    c as f32 * (c as f32).log2()
                }
            })
            .collect()
    });
    let step = (data.len() / 1024).max(1) | 1;
    let mut hist = [0u16; 256];
    let mut n = 0usize;
    for &b in data.iter().step_by(step) {
        hist[b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let sum: f32 = hist.iter().map(|&c| C_LOG_C[c as usize]).sum();
    // Miller-Madow: a sample underestimates entropy by about (bins seen - 1) / (2n ln 2).
    let seen = hist.iter().filter(|&&c| c > 0).count() as f32;
    let n = n as f32;
    n.log2() - sum / n + (seen - 1.0) / (2.0 * n * std::f32::consts::LN_2)
}

/// The chunk's bytes encoded and their flag (zstd or plane-coded), when that saves at least 1/8
/// of them; `None` stores the chunk raw. The encoding follows the chunk's entropy (see the
/// constants above): text through zstd at the store's level; random bytes with a skewed byte
/// lane (float32 pages) plane-coded (a vector page: 0.65 of its size, where its zero-run frame
/// is 0.77); other random bytes around zero runs as a zero-run frame.
fn compress(data: &[u8], level: i32) -> Option<(u8, Vec<u8>)> {
    thread_local! {
        // Contexts per pool thread: creating a zstd context per chunk cost ~10% of a snapshot.
        static CCTX: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    if data.len() < 64 {
        return None;
    }
    // Stored bytes must save an eighth to be worth a decode.
    let most = data.len() - data.len() / 8;
    let h = entropy_bits(data);
    if h >= FAST_ENTROPY_BITS {
        // A page of floats takes the plane codec, which cuts out its free space too; the frame
        // (zero runs only) is for what the codec declines.
        if let Some(p) = super::planes::encode(data, data.len() - most) {
            return Some((FLAG_PLANES, p));
        }
        if h >= RAW_ENTROPY_BITS {
            return None;
        }
        return crate::zstd_frames::zero_runs(data)
            .filter(|f| f.len() <= most)
            .map(|f| (FLAG_ZSTD, f));
    }
    let c = CCTX.with(|cell| {
        let mut ctxs = cell.borrow_mut();
        let i = match ctxs.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                ctxs.push((level, zstd::bulk::Compressor::new(level).ok()?));
                ctxs.len() - 1
            }
        };
        ctxs[i].1.compress(data).ok()
    })?;
    (c.len() <= most).then_some((FLAG_ZSTD, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pack::MAX_PACK_CHUNKS;
    use std::collections::HashSet;

    /// A new store in `dir` and a writer into it, not a [`LongWrite`].
    fn writer_in(dir: &std::path::Path) -> (crate::store::Store, ChunkWriter) {
        let store = crate::store::Store::for_test(dir);
        let w = ChunkWriter::new(
            &store.fs,
            store.packs_dir(),
            &store.config,
            KnownFilter::default(),
        );
        (store, w)
    }

    /// A long write spills its entries in sorted runs and puts none in the index before the
    /// final commit. The commit inserts every entry, from the runs and from memory merged in key
    /// order, and no filler; every tree node has its children there (I3).
    #[test]
    fn a_long_write_waits_in_sorted_runs_and_its_commit_inserts_every_entry_and_no_filler() {
        use redb::ReadableTableMetadata;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        // Small packs and runs: many runs, and tree nodes a large share of the entries.
        w.pack_target = 2 << 10;
        w.run_chunks = 16;
        w.long_write(store.long_write());
        let mut t = crate::tree::TreeBuilder::new(4, 16);
        for i in 0..4000u32 {
            // Random bytes, stored raw.
            let page: Vec<u8> = (0..2u32)
                .flat_map(|k| ChunkId::of(&[i.to_le_bytes(), k.to_le_bytes()].concat()).0)
                .collect();
            let mut batch = Batch::default();
            batch.push(&page);
            for put in w.put_batch(batch, 0).expect("put") {
                t.push(&mut w, put).expect("push");
            }
        }
        let root = t.finish(&mut w).expect("tree");
        assert!(root.height >= 3, "{root:?}");
        let pending = w.finish().expect("finish");
        let runs = pending.runs.as_ref().map_or(0, |r| r.count());
        assert!(runs > 100, "{runs} runs");
        let entries: Vec<(ChunkId, ChunkLoc)> = pending
            .entries()
            .expect("merge")
            .collect::<Result<_, _>>()
            .expect("entries");
        assert!(entries.windows(2).all(|p| p[0].0 < p[1].0), "in key order");
        assert_eq!(entries.len() as u64, pending.stats.new_chunks);

        let index = store.index().expect("index");
        {
            let tx = index.begin_read().expect("read");
            let table = tx.open_table(super::super::index::CHUNKS).expect("table");
            assert!(table.is_empty().expect("len"), "nothing before the commit");
        }
        let tx = index.begin_write().expect("tx");
        insert_chunks(&index, &tx, pending.entries().expect("merge")).expect("insert");
        insert_packs(&index, &tx, &pending.packs).expect("packs");
        tx.commit().expect("commit");
        pending.keep();

        let reader =
            crate::store::reader::ChunkReader::new(&index, store.packs_dir()).expect("reader");
        assert_index_holds_exactly(&index, &entries);
        let mut nodes = 0;
        for (id, loc) in &entries {
            if loc.flags & FLAG_TREE == 0 {
                continue;
            }
            nodes += 1;
            let bytes = reader.packs.read(id, loc).expect("node reads");
            let children = crate::tree::decode_node(&bytes, bytes[1]).expect("node decodes");
            for (child, _) in children {
                assert!(reader.locate(&child).expect("lookup").is_some());
            }
        }
        assert!(nodes > 50, "{nodes} nodes");
    }

    /// The chunk table holds `entries` and nothing else (no filler).
    fn assert_index_holds_exactly(
        index: &super::super::index::Index,
        entries: &[(ChunkId, ChunkLoc)],
    ) {
        use redb::ReadableTableMetadata;
        let tx = index.begin_read().expect("read");
        let table = tx.open_table(super::super::index::CHUNKS).expect("table");
        assert_eq!(table.len().expect("len"), entries.len() as u64);
        for (id, loc) in entries {
            let stored = table
                .get(&id.0)
                .expect("get")
                .map(|g| ChunkLoc::decode(g.value()));
            assert_eq!(stored.as_ref(), Some(loc));
        }
    }

    /// A merge of many runs (a first snapshot of hundreds of GiB has a thousand) gives every
    /// entry in key order, an id in a run and in memory from the run first, and holds 64 entries
    /// of buffer per run rather than 64 KiB.
    #[test]
    fn a_thousand_runs_merge_in_key_order_with_small_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _w) = writer_in(dir.path());
        let mut runs = SortedRuns::create(&store.fs, &store.tmp_dir()).expect("runs");
        let loc = |offset: u64| ChunkLoc {
            offset,
            ..ChunkLoc::UNSET
        };
        let id = |r: u32, k: u32| ChunkId::of(&[r.to_le_bytes(), k.to_le_bytes()].concat());
        let (count, per_run) = (1200u32, 200u32);
        for r in 0..count {
            let mut entries: Vec<_> = (0..per_run).map(|k| (id(r, k), loc(1))).collect();
            runs.push(&mut entries).expect("push");
        }
        // In memory: new ids, and one that a run holds too.
        let mut memory: HashMap<ChunkId, ChunkLoc> =
            (0..500u32).map(|k| (id(u32::MAX, k), loc(2))).collect();
        memory.insert(id(7, 7), loc(2));
        let merged = super::super::runs::merged(Some(&runs), &memory).expect("merge");
        assert!(
            merged.buffered() <= count as usize * 64 * 65,
            "{} bytes of buffers",
            merged.buffered()
        );
        let entries: Vec<(ChunkId, ChunkLoc)> = merged.collect::<Result<_, _>>().expect("entries");
        assert_eq!(entries.len(), (count * per_run) as usize + memory.len());
        assert!(entries.windows(2).all(|p| p[0].0 <= p[1].0), "in key order");
        let twice: Vec<u64> = entries
            .iter()
            .filter(|(i, _)| *i == id(7, 7))
            .map(|(_, l)| l.offset)
            .collect();
        assert_eq!(twice, [1, 2], "the run's entry, then memory's");
        let mut all: Vec<ChunkId> = (0..count)
            .flat_map(|r| (0..per_run).map(move |k| (r, k)))
            .map(|(r, k)| id(r, k))
            .chain(memory.keys().copied())
            .collect();
        all.sort_unstable();
        assert_eq!(entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(), all);
    }

    /// A merge that cannot read its runs, or fails midway through the commit's inserts, is an
    /// error that names the file, and the aborted transaction leaves the table as it was: no
    /// entry, no filler.
    #[test]
    fn a_failed_merge_names_its_file_and_leaves_the_index_empty() {
        use redb::ReadableTableMetadata;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _w) = writer_in(dir.path());
        let mut runs = SortedRuns::create(&store.fs, &store.tmp_dir()).expect("runs");
        let mut entries: Vec<(ChunkId, ChunkLoc)> = (0..2000u32)
            .map(|i| (ChunkId::of(&i.to_le_bytes()), ChunkLoc::UNSET))
            .collect();
        runs.push(&mut entries).expect("push");
        let index = store.index().expect("index");
        // The run file cut short: the merge reads its first buffer (64 KiB), then hits the end.
        let path = std::fs::read_dir(store.tmp_dir())
            .expect("tmp")
            .map(|e| e.expect("entry").path().join("runs"))
            .next()
            .expect("scratch folder");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(65 * 1500))
            .expect("truncate");
        let merged = super::super::runs::merged(Some(&runs), &HashMap::new()).expect("merge");
        let tx = index.begin_write().expect("tx");
        let e = insert_chunks(&index, &tx, merged).expect_err("a short run");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        drop(tx);
        let tx = index.begin_read().expect("read");
        let table = tx.open_table(super::super::index::CHUNKS).expect("table");
        assert!(table.is_empty().expect("len"), "nothing committed");
        drop((table, tx));

        std::fs::remove_file(&path).expect("remove");
        let e = super::super::runs::merged(Some(&runs), &HashMap::new())
            .err()
            .expect("a missing run file");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    /// Fillers go between entries in key order and only into an empty table; out-of-order
    /// entries and one that lands on a filler's key are kept.
    #[test]
    fn fillers_leave_room_in_a_new_table_and_never_outlive_the_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _w) = writer_in(dir.path());
        let index = store.index().expect("index");
        let loc = |i: u64| ChunkLoc {
            offset: i,
            ..ChunkLoc::UNSET
        };
        let mut ids: Vec<ChunkId> = (0..5000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        ids.sort_unstable();
        // Out of order at the end: the key just above an entry, where its filler went.
        let landing = ChunkId(next_key(&ids[5].0));
        let mut entries: Vec<(ChunkId, ChunkLoc)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, loc(i as u64)))
            .collect();
        entries.push((landing, loc(9999)));
        let size = |index: &super::super::index::Index| {
            let tx = index.begin_write().expect("tx");
            let stats = tx.stats().expect("stats");
            tx.abort().expect("abort");
            stats.leaf_pages()
        };
        let tx = index.begin_write().expect("tx");
        insert_chunks(&index, &tx, entries.iter().map(|e| Ok(*e))).expect("insert");
        tx.commit().expect("commit");
        let leaves = size(&index);
        assert_index_holds_exactly(&index, &entries);

        // The same entries in key order with no filler pack their leaves full: a seventh fewer.
        let other = tempfile::tempdir().expect("tempdir");
        let (store2, _w2) = writer_in(other.path());
        let index2 = store2.index().expect("index");
        let tx = index2.begin_write().expect("tx");
        {
            let mut t = tx.open_table(super::super::index::CHUNKS).expect("table");
            for (id, l) in &entries[..ids.len()] {
                t.insert(&id.0, &l.encode()).expect("insert");
            }
        }
        tx.commit().expect("commit");
        let full = size(&index2);
        assert!(
            leaves * 100 >= full * 110 && leaves * 100 <= full * 125,
            "{leaves} leaves with room, {full} packed"
        );
    }

    /// `n` distinct 128-byte pages.
    fn pages(n: u32) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| ChunkId::of(&i.to_le_bytes()).0.repeat(4))
            .collect()
    }

    /// A filter in which every fifth page was "stored before": a hit, so that the tree nodes
    /// over it wait for the final commit.
    fn hits_of(pages: &[Vec<u8>]) -> KnownFilter {
        KnownFilter::new(
            pages
                .iter()
                .step_by(5)
                .map(|p| ChunkId::of(p).prefix())
                .collect(),
            HashSet::new(),
        )
    }

    /// Tree nodes over filter hits, spilled past the limit, all reach the final commit with
    /// their places, and the spill's scratch folder is gone after `finish`.
    #[test]
    fn spilled_nodes_reach_the_commit_and_their_scratch_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let pages = pages(3000);
        let nodes_of = |limit: usize| {
            let mut w =
                ChunkWriter::new(&store.fs, store.packs_dir(), &store.config, hits_of(&pages));
            w.long_write(store.long_write());
            w.nodes_in_memory = limit;
            crate::tree::store_pages(&mut w, &pages);
            let spilled = std::fs::read_dir(store.tmp_dir())
                .expect("tmp")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("nodes-"))
                })
                .count();
            let pending = w.finish().expect("finish");
            let left = std::fs::read_dir(store.tmp_dir()).expect("tmp").count();
            // Each at its place (read before `pending`, uncommitted, deletes its packs).
            let packs = crate::store::reader::PackFiles::new(&store.fs, store.packs_dir());
            let mut nodes: Vec<ChunkId> = Vec::new();
            for (id, loc) in &pending.new_chunks {
                if loc.flags & FLAG_TREE != 0 {
                    let bytes = packs.read(id, loc).expect("node reads");
                    assert_eq!(ChunkId::of(&bytes), *id);
                    nodes.push(*id);
                }
            }
            nodes.sort_unstable();
            (nodes, spilled, left)
        };
        let (kept, spilled, _) = nodes_of(usize::MAX);
        assert_eq!(spilled, 0);
        assert!(kept.len() > 100, "nodes waiting: {}", kept.len());
        let (from_spill, spilled, left) = nodes_of(8);
        assert_eq!(spilled, 1, "one scratch folder while writing");
        assert_eq!(left, 0, "and none after finish");
        assert_eq!(from_spill, kept, "the same nodes");
    }

    /// A spill that cannot be read back fails the writer's `finish` with its file named, and
    /// the packs written go with the writer: nothing committed names them.
    #[test]
    fn a_spill_lost_before_finish_fails_it_and_leaves_no_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        let pages = pages(1000);
        let mut w = ChunkWriter::new(&store.fs, store.packs_dir(), &store.config, hits_of(&pages));
        w.long_write(store.long_write());
        w.nodes_in_memory = 8;
        crate::tree::store_pages(&mut w, &pages);
        let spill = std::fs::read_dir(store.tmp_dir())
            .expect("tmp")
            .map(|e| e.expect("entry").path())
            .next()
            .expect("a spill folder");
        std::fs::remove_file(spill.join("nodes")).expect("lose the spill");
        let e = w.finish().err().expect("finish fails");
        assert!(e.to_string().contains("nodes"), "{e}");
        let packs = walkdir::WalkDir::new(store.packs_dir())
            .into_iter()
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_type().is_file()))
            .count();
        assert_eq!(packs, 0, "the failed writer's packs are deleted");
    }

    /// A spill whose folder cannot be created fails with the path named.
    #[test]
    fn a_spill_that_cannot_be_created_names_its_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        let mut early = store.long_write();
        early.tmp = dir.path().join("not-a-folder");
        std::fs::write(&early.tmp, b"a file").expect("file");
        w.long_write(early);
        w.nodes_in_memory = 1;
        w.new_nodes.insert(ChunkId::of(b"node"), ChunkLoc::UNSET);
        let e = w.spill_nodes().expect_err("no folder");
        assert!(e.to_string().contains("not-a-folder"), "{e}");
    }

    /// A chunk met again is stored once, whether its pack is open, syncing or durable.
    #[test]
    fn a_chunk_met_again_is_stored_once_wherever_its_pack_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, mut w) = writer_in(dir.path());
        // Three chunks of ~1 KiB close a pack: of five packs, the last is open, two sync and
        // two are durable when the chunks come again.
        w.pack_target = 2 << 10;
        let chunks: Vec<Vec<u8>> = (0..13u32)
            .map(|i| {
                (0..31u32)
                    .flat_map(|k| ChunkId::of(&[i, k].map(u32::to_le_bytes).concat()).0)
                    .collect()
            })
            .collect();
        for _ in 0..2 {
            for c in &chunks {
                let mut batch = Batch::default();
                batch.push(c);
                w.put_batch(batch, 0).expect("put");
            }
        }
        let pending = w.finish().expect("finish");
        assert_eq!(pending.stats.new_chunks, 13);
        assert_eq!(pending.packs.len(), 5);
    }

    /// A deterministic stream of pseudo-random numbers from `seed` (not 0).
    fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Pages of text, sparse, float and random bytes (each kind compresses its own way).
    fn mixed_pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut next = xorshift(seed);
        let mut pages: Vec<Vec<u8>> = Vec::new();
        for i in 0..n {
            let text = format!("memory {seed}/{i}: the user prefers short answers. ").repeat(120);
            pages.push(text.as_bytes()[..4096].to_vec());
            let mut sparse: Vec<u8> = (0..3000).map(|_| next() as u8).collect();
            sparse.resize(4096, 0);
            pages.push(sparse);
            let mut floats: Vec<u8> = (0..768)
                .flat_map(|_| (((next() >> 11) as f64 / (1u64 << 53) as f64) as f32).to_le_bytes())
                .collect();
            floats.resize(4096, 0);
            pages.push(floats);
            pages.push((0..4096).map(|_| next() as u8).collect());
        }
        pages
    }

    /// Encoded bytes replace a chunk's own in its batch, and batches fill buffers earlier ones
    /// used: every chunk of batches that mix encodings, in buffers that held other bytes,
    /// reads back as it was.
    #[test]
    fn chunks_encoded_in_their_batch_read_back_whole_from_a_reused_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        let mut used = Batch::with_capacity(1 << 20);
        for _ in 0..200 {
            used.push(&[0xab; 4096]);
        }
        used.extend(b"stale open bytes");
        let mut puts = Vec::new();
        let mut all = Vec::new();
        for seed in [0x9e37_79b9, 0x7f4a_7c15] {
            let pages = mixed_pages(seed, 24);
            assert!(pages.len() * 4096 >= POOL_BYTES, "the batch takes the pool");
            // The open chunk's first bytes are carried into the used buffer.
            let mut filling = Batch::default();
            filling.extend(&pages[0][..100]);
            let _ = filling.split_open_into(used);
            assert!(filling.is_empty());
            assert_eq!(filling.open_len(), 100);
            filling.extend(&pages[0][100..]);
            filling.cut();
            for p in &pages[1..] {
                filling.push(p);
            }
            let batch = filling.split_open_into(Batch::default());
            assert!(batch.data.capacity() >= 1 << 20, "the used buffer");
            let job = w.start(batch);
            let (p, back) = w.complete_keep(job, 0).expect("put");
            puts.extend(p);
            all.extend(pages);
            used = back;
        }
        let pending = w.finish().expect("finish");
        pending.keep();
        let stats = pending.stats;
        assert_eq!(stats.new_chunks as usize, all.len());
        assert!(
            stats.new_stored_bytes * 4 < stats.new_raw_bytes * 3,
            "{stats:?}"
        );
        let packs = super::super::reader::PackFiles::new(&store.fs, store.packs_dir());
        for (page, put) in all.iter().zip(&puts) {
            assert_eq!(put.id, ChunkId::of(page));
            let loc = pending.new_chunks[&put.id];
            assert_eq!(packs.read(&put.id, &loc).expect("read"), *page);
        }
    }

    /// Chunks that compress well close a pack by count before bytes: the writer's map of
    /// chunks not yet durable is bounded by packs of at most `MAX_PACK_CHUNKS`.
    #[test]
    fn a_pack_of_small_chunks_closes_at_its_chunk_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        let total = MAX_PACK_CHUNKS * 2 + 100;
        let mut batch = Batch::default();
        for i in 0..total {
            batch.push(
                format!("note {i}: the user likes short answers. ")
                    .repeat(3)
                    .as_bytes(),
            );
            if batch.ends.len() == 1024 || i + 1 == total {
                w.put_batch(std::mem::take(&mut batch), 0).expect("put");
            }
        }
        let pending = w.finish().expect("finish");
        let counts: Vec<u32> = pending.packs.iter().map(|p| p.2).collect();
        assert_eq!(counts.iter().sum::<u32>() as usize, total, "{counts:?}");
        assert!(
            counts.len() == 3 && counts.iter().all(|&c| c as usize <= MAX_PACK_CHUNKS),
            "packs of at most {MAX_PACK_CHUNKS} chunks: {counts:?}"
        );
        let bytes: u64 = pending.packs.iter().map(|p| p.1).sum();
        assert!(
            bytes < store.config.pack_target_size,
            "{bytes} bytes in all"
        );
    }

    /// Hits are confirmed in batches while the writer goes on, in read sessions, so that their
    /// list stays about a batch long. The sessions find exactly what the index lacks, including
    /// a node hit whose entry is data; new chunks wait for the final commit meanwhile.
    #[test]
    fn hits_are_confirmed_in_batches_and_what_the_index_lacks_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        let ids: Vec<ChunkId> = (0..100u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        // In the index: 0..90 as data, 90..95 as tree nodes; 95..100 absent.
        {
            let index = store.index().expect("index");
            let tx = index.begin_write().expect("tx");
            let loc = |flags| ChunkLoc {
                flags,
                ..ChunkLoc::UNSET
            };
            let (data, tree) = (loc(0), loc(FLAG_TREE));
            let entries = ids[..95]
                .iter()
                .enumerate()
                .map(|(i, id)| Ok((*id, if i < 90 { data } else { tree })));
            insert_chunks(&index, &tx, entries).expect("insert");
            tx.commit().expect("commit");
        }
        w.confirm_batch = 8;
        w.long_write(store.long_write());
        // Nine hits a batch: ten read sessions.
        for hits in ids[..90].chunks(3) {
            w.confirm_later(hits.iter().copied(), false)
                .expect("confirm");
            assert!(w.confirm.len() < 8, "{}", w.confirm.len());
        }
        w.confirm_later(ids[90..95].iter().copied(), true)
            .expect("nodes");
        // New chunks made durable: they stay out of the index.
        w.pack_target = 1;
        let new: Vec<Vec<u8>> = (0..4u32).map(|i| vec![i as u8; 100]).collect();
        for c in &new {
            let mut batch = Batch::default();
            batch.push(c);
            w.put_batch(batch, 0).expect("put");
        }
        while !w.syncing.is_empty() {
            w.wait_oldest_sync().expect("sync");
        }
        assert_eq!(w.durable.len(), 4);
        w.confirm_later([ids[3], ids[4]], true)
            .expect("data claimed as nodes");
        w.confirm_later(ids[95..].iter().copied(), false)
            .expect("absent");
        assert!(w.confirm.is_empty(), "a session took the batch");
        assert_eq!(w.durable.len(), 4);
        let pending = w.finish().expect("finish");
        assert!(pending.confirm.is_empty());
        let mut missing = pending.missing.clone();
        missing.sort_unstable();
        let mut expected = vec![ids[3], ids[4]];
        expected.extend(&ids[95..]);
        expected.sort_unstable();
        assert_eq!(missing, expected);
        let index = store.index().expect("index");
        let tx = index.begin_read().expect("read");
        let table = tx.open_table(super::super::index::CHUNKS).expect("table");
        let new: Vec<(ChunkId, bool)> = new.iter().map(|c| (ChunkId::of(c), false)).collect();
        assert_eq!(
            unconfirmed(&index, &table, &new).expect("lookups"),
            new.iter().map(|c| c.0).collect::<Vec<_>>(),
            "new chunks wait for the final commit"
        );
        assert_eq!(pending.new_chunks.len(), 4);
    }

    /// A confirmation session that finds the index damaged says so, with the way out (repair),
    /// rather than as a plain index error.
    #[test]
    fn a_session_that_finds_the_index_damaged_reports_it_as_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, mut w) = writer_in(dir.path());
        w.confirm_batch = 1;
        w.long_write(store.long_write());
        let index = dir.path().join(crate::store::INDEX_FILE);
        let len = std::fs::metadata(&index).expect("index").len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&index, garbage).expect("garbage");
        w.confirm_later([ChunkId::of(b"a hit")], false)
            .expect("the session starts");
        let err = w.finish().err().expect("the session's error");
        assert!(matches!(err, StoreError::IndexDamaged { .. }), "{err:?}");
        assert!(err.to_string().contains("memsnap repair"), "{err}");
    }

    #[test]
    fn text_and_sparse_pages_compress_random_bytes_do_not_and_float_pages_are_plane_coded() {
        let text = "The user prefers short answers and works on memsnap. ".repeat(80);
        assert_eq!(compress(text.as_bytes(), 3).map(|c| c.0), Some(FLAG_ZSTD));
        let mut page = vec![0u8; 4096];
        page[..100].copy_from_slice(&[7u8; 100]);
        assert_eq!(compress(&page, 3).map(|c| c.0), Some(FLAG_ZSTD));
        let mut next = xorshift(0x1234_5678);
        let random: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        assert!(entropy_bits(&random) >= RAW_ENTROPY_BITS);
        assert!(
            compress(&random, 3).is_none(),
            "random bytes are stored raw"
        );
        // Random bytes around free space, no skewed lane: the plane codec declines, the zero-run
        // frame takes the run out.
        let mut sparse = random[..3072].to_vec();
        sparse.resize(4096, 0);
        let (flag, c) = compress(&sparse, 3).expect("the zero run pays");
        assert_eq!(flag, FLAG_ZSTD);
        assert_eq!(zstd::bulk::decompress(&c, 4096).expect("frame"), sparse);
        let floats: Vec<u8> = (0..1024)
            .flat_map(|_| {
                (((next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.1).to_le_bytes()
            })
            .collect();
        let h = entropy_bits(&floats);
        assert!(h >= RAW_ENTROPY_BITS, "{h}");
        let (flag, c) = compress(&floats, 3).expect("the exponent lane pays");
        assert_eq!(flag, FLAG_PLANES);
        assert!(c.len() < 4096 * 7 / 8, "{}", c.len());
        // One embedding and the free space of its page: plane-coded, smaller than the zero-run
        // frame.
        let mut page = floats[..3072].to_vec();
        page.resize(4096, 0);
        let h = entropy_bits(&page);
        assert!((FAST_ENTROPY_BITS..RAW_ENTROPY_BITS).contains(&h), "{h}");
        let (flag, c) = compress(&page, 3).expect("pays");
        assert_eq!(flag, FLAG_PLANES);
        let frame = crate::zstd_frames::zero_runs(&page).expect("zero runs");
        assert!(
            c.len() + 256 < frame.len(),
            "{} against {}",
            c.len(),
            frame.len()
        );
        let mut back = vec![0u8; 4096];
        assert_eq!(
            crate::store::pack::decode_into(flag, &c, &mut back).ok(),
            Some(4096)
        );
        assert_eq!(back, page);
        assert!(entropy_bits(text.as_bytes()) < FAST_ENTROPY_BITS);
        assert_eq!(entropy_bits(&[7u8; 4096]), 0.0);
    }
}
