//! Stats: what the store holds and what each agent costs. Under the shared store lock (a prune
//! waits, snapshots do not): read every snapshot record, walk its trees as prune's mark phase
//! does, once per agent (a chunk shared by two agents counts for both, once for each), then look
//! the reached chunks up in the `chunks` table for their raw and stored lengths. The index is
//! closed before the pack folder is measured.
//!
//! Ratios: dedup = logical bytes of the snapshots / raw bytes of the distinct chunks they
//! reference (tree nodes included); compression = those raw bytes / their stored bytes. Both are
//! `null` when there is nothing to divide by.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::error::{Error, StoreError};
use crate::lock::Mode;
use crate::manifest::snapshot::SnapshotRecord;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::index::CHUNKS;
use crate::store::pack::{ChunkLoc, unused_bytes};
use crate::store::reader::ChunkReader;
use crate::tree;

/// The whole store, and the agents asked about.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    /// Always the whole store, whatever the tenant or agent asked.
    pub store: StoreStats,
    /// The agents matching the request, by tenant then agent.
    pub agents: Vec<AgentStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub snapshots: u64,
    pub agents: u64,
    /// Sum of the snapshots' `logical_bytes`.
    pub logical_bytes: u64,
    /// Sum over agents of their newest snapshot's `logical_bytes`.
    pub latest_logical_bytes: u64,
    /// Bytes of the pack files on disk (including files the index does not name).
    pub stored_bytes: u64,
    /// Pack records in the index.
    pub packs: u64,
    /// Pack files on disk.
    pub pack_files: u64,
    /// Chunks in the index.
    pub chunks: u64,
    /// Chunks some snapshot references.
    pub chunks_referenced: u64,
    /// Raw (decompressed) bytes of the referenced chunks, each counted once.
    pub referenced_raw_bytes: u64,
    /// Stored bytes of the referenced chunks, each counted once.
    pub referenced_stored_bytes: u64,
    /// Index entries of chunks no snapshot references.
    pub chunks_unused: u64,
    /// Chunk bytes in the indexed packs that no snapshot references, counted from the packs'
    /// sizes as prune counts them (a prune below its threshold drops unused index entries but
    /// leaves their bytes in the pack).
    pub unused_bytes: u64,
    /// What `prune --max-unused 0` would free: the files of packs with unused bytes, less their
    /// live chunks, plus pack files the index does not name.
    pub reclaimable_bytes: u64,
    pub dedup_ratio: Option<f64>,
    pub compression_ratio: Option<f64>,
    /// Tree nodes that could not be read (see `memsnap verify --read-data`); what lies below
    /// them is not counted.
    pub unreadable_nodes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStats {
    pub tenant: String,
    pub agent: String,
    pub snapshots: u64,
    pub logical_bytes: u64,
    pub latest_snapshot_id: String,
    pub latest_created_at_ms: i64,
    pub latest_logical_bytes: u64,
    /// Chunks reachable from the agent's snapshots, each counted once.
    pub chunks: u64,
    pub raw_bytes: u64,
    /// Stored bytes of those chunks: what the agent occupies, shared chunks included.
    pub stored_bytes: u64,
    pub dedup_ratio: Option<f64>,
    pub compression_ratio: Option<f64>,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

pub(crate) fn stats(
    store: &Store,
    tenant: Option<&str>,
    agent: Option<&str>,
) -> Result<StatsReport, Error> {
    let _lock = store.lock_store(Mode::Shared)?;
    let mut report = StatsReport {
        store: StoreStats::default(),
        agents: Vec::new(),
    };
    let s = &mut report.store;
    // Per pack: its recorded size, chunk count and the stored bytes of its live chunks.
    let mut packs: HashMap<[u8; 16], (u64, u32, u64)> = HashMap::new();
    {
        let index = store.index_for_lookups()?;
        let tx = index.begin_read()?;
        let records = super::all_records(&index, &tx)?;
        s.snapshots = records.len() as u64;
        let mut by_agent: BTreeMap<(String, String), Vec<&SnapshotRecord>> = BTreeMap::new();
        for r in &records {
            s.logical_bytes += r.info.logical_bytes;
            by_agent
                .entry((r.info.tenant.clone(), r.info.agent.clone()))
                .or_default()
                .push(r);
        }
        s.agents = by_agent.len() as u64;

        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        let mut reached: Vec<(AgentStats, HashSet<ChunkId>)> = Vec::new();
        let mut unreadable = 0u64;
        for ((t, a), recs) in &by_agent {
            let mut seen = tree::Seen::new();
            let mut manifests = HashSet::new();
            let mut visit = |_: &ChunkId, _: bool, res: Result<Vec<u8>, StoreError>| {
                if res.is_err() {
                    unreadable += 1;
                }
                Ok(())
            };
            for r in recs {
                super::mark(&mut reader, r, &mut manifests, &mut seen, &mut visit)?;
            }
            let Some(newest) = recs.last() else { continue };
            s.latest_logical_bytes += newest.info.logical_bytes;
            reached.push((
                AgentStats {
                    tenant: t.clone(),
                    agent: a.clone(),
                    snapshots: recs.len() as u64,
                    logical_bytes: recs.iter().map(|r| r.info.logical_bytes).sum(),
                    latest_snapshot_id: newest.info.id.clone(),
                    latest_created_at_ms: newest.info.created_at_ms,
                    latest_logical_bytes: newest.info.logical_bytes,
                    ..Default::default()
                },
                tree::seen_ids(&seen),
            ));
        }
        s.unreadable_nodes = unreadable;
        if unreadable > 0 {
            tracing::warn!(
                "{unreadable} tree nodes could not be read: stats undercount what lies below them"
            );
        }
        let live: HashSet<ChunkId> = reached
            .iter()
            .flat_map(|(_, seen)| seen.iter().copied())
            .collect();

        for (id, rec) in super::pack_records(&index, &tx)? {
            let p = packs.entry(id.0).or_default();
            p.0 = rec.size;
            p.1 = rec.chunks;
        }
        s.packs = packs.len() as u64;

        let mut locs: HashMap<ChunkId, (u64, u64)> = HashMap::with_capacity(live.len());
        let chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
        for item in index.walk_chunks(&chunks)? {
            let (k, v) = item.map_err(|e| index.err()(e.into()))?;
            let id = ChunkId(*k.value());
            let loc = ChunkLoc::decode(v.value());
            let (raw, stored) = (u64::from(loc.raw_len), u64::from(loc.stored_len));
            s.chunks += 1;
            if live.contains(&id) {
                s.chunks_referenced += 1;
                s.referenced_raw_bytes += raw;
                s.referenced_stored_bytes += stored;
                packs.entry(loc.pack.0).or_default().2 += stored;
                locs.insert(id, (raw, stored));
            } else {
                s.chunks_unused += 1;
            }
        }
        for (mut a, seen) in reached {
            for id in &seen {
                // A reached id missing from the index is damage `verify` reports; not counted.
                if let Some((raw, stored)) = locs.get(id) {
                    a.chunks += 1;
                    a.raw_bytes += raw;
                    a.stored_bytes += stored;
                }
            }
            a.dedup_ratio = ratio(a.logical_bytes, a.raw_bytes);
            a.compression_ratio = ratio(a.raw_bytes, a.stored_bytes);
            if tenant.is_none_or(|t| a.tenant == t) && agent.is_none_or(|n| a.agent == n) {
                report.agents.push(a);
            }
        }
    }
    // The index is closed: measure the pack files.
    let s = &mut report.store;
    for &(size, count, live) in packs.values() {
        let unused = unused_bytes(size, count, live);
        s.unused_bytes += unused;
        if unused > 0 {
            // A pack without a live chunk is deleted whole, else rewritten without the unused.
            s.reclaimable_bytes += size.saturating_sub(live);
        }
    }
    for (id, size) in super::prune::pack_files(store)? {
        s.pack_files += 1;
        s.stored_bytes += size;
        if !packs.contains_key(&id.0) {
            s.reclaimable_bytes += size;
        }
    }
    s.dedup_ratio = ratio(s.logical_bytes, s.referenced_raw_bytes);
    s.compression_ratio = ratio(s.referenced_raw_bytes, s.referenced_stored_bytes);
    Ok(report)
}
