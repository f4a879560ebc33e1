//! Verify: every chunk a snapshot references is in the index and inside its pack; with
//! `read_data`, every chunk is also read, decompressed and re-hashed. Each damaged chunk is
//! reported with the snapshots and artifacts that need it.
//!
//! Three passes, so that the index is held only while trees are walked: (1) with the index, walk
//! every snapshot's trees once per distinct node and locate each distinct data chunk; (2)
//! without it, check those chunks in parallel; (3) only if something is damaged, walk the trees
//! again to name every snapshot and artifact that needs a damaged chunk.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use super::Progress;
use crate::error::{Error, StoreError};
use crate::names::AgentId;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::{ChunkLoc, PackId, read_footer};
use crate::store::reader::{ChunkReader, PackFiles};
use crate::tree;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Damage {
    pub snapshot: String,
    /// `memdir/<path>`, `sqlite/<name>`, `state/<name>`, or `manifest`.
    pub artifact: String,
    pub chunk: String,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub read_data: bool,
    pub snapshots_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged: Vec<Damage>,
    /// Ids of the snapshots with at least one damaged artifact.
    pub damaged_snapshots: Vec<String>,
    /// Packs whose footer is unreadable (with `read_data`): their chunks may still be intact,
    /// but the index could not be rebuilt from them.
    pub damaged_packs: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty() && self.damaged_packs.is_empty()
    }
}

pub(crate) fn verify(
    store: &Store,
    spec: Option<&str>,
    agent: Option<&AgentId>,
    read_data: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport, Error> {
    let mut report = VerifyReport {
        read_data,
        snapshots_checked: 0,
        chunks_checked: 0,
        bytes_checked: 0,
        damaged: Vec::new(),
        damaged_snapshots: Vec::new(),
        damaged_packs: Vec::new(),
    };
    // Pass 1. Prune (which deletes chunks) must not run between the passes.
    let _store_lock = store.lock_store(crate::lock::Mode::Shared)?;
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
    let mut manifest_damage: HashMap<String, String> = HashMap::new();
    let (records, located, packs) = {
        let index = store.index()?;
        let tx = index.begin_read()?;
        let records = match spec {
            Some(s) => vec![super::resolve(&index, &tx, s, agent)?],
            None => super::all_records(&index, &tx)?,
        };
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        let mut seen = crate::tree::Seen::new();
        let mut located: Vec<(ChunkId, ChunkLoc)> = Vec::new();
        for record in &records {
            let entries = match super::load_entries(&mut reader, record) {
                Ok(e) => e,
                Err(e) => {
                    manifest_damage.insert(record.info.id.clone(), e.to_string());
                    continue;
                }
            };
            for content in entries.iter().filter_map(|e| e.content.as_ref()) {
                let mut data = Vec::new();
                tree::walk_unseen(&mut reader, content, &mut seen, &mut |cid, is_data, res| {
                    match (is_data, res) {
                        (true, _) => data.push(*cid),
                        (false, Err(e)) => {
                            bad.insert(*cid, e.to_string());
                        }
                        (false, Ok(_)) => {}
                    }
                    Ok(())
                })?;
                for cid in data {
                    match reader.locate(&cid)? {
                        Some(loc) => located.push((cid, loc)),
                        None => {
                            bad.insert(cid, StoreError::MissingChunk { id: cid.hex() }.to_string());
                        }
                    }
                }
            }
        }
        (records, located, reader.packs)
    };

    // Pass 2, without the index.
    progress.start(
        "verify",
        located.iter().map(|(_, l)| l.raw_len as u64).sum(),
    );
    let mut pack_sizes: HashMap<PackId, Option<u64>> = HashMap::new();
    for (_, loc) in &located {
        pack_sizes.entry(loc.pack).or_insert_with(|| {
            std::fs::metadata(packs.path(&loc.pack))
                .ok()
                .map(|m| m.len())
        });
    }
    let results: Vec<(ChunkId, Result<u64, StoreError>)> = located
        .par_iter()
        .map(|(id, loc)| {
            let r = check_chunk(&packs, id, loc, read_data, &pack_sizes);
            if let Ok(n) = &r {
                progress.advance(*n);
            }
            (*id, r)
        })
        .collect();
    for (id, r) in results {
        report.chunks_checked += 1;
        match r {
            Ok(n) => report.bytes_checked += n,
            // An I/O failure of this machine (out of file descriptors, a read error) is not
            // damage in the store: stop rather than report a false verdict either way.
            Err(e @ StoreError::Io { .. }) => return Err(e.into()),
            Err(e) => {
                bad.insert(id, e.to_string());
            }
        }
    }
    if read_data {
        let mut ids: Vec<&PackId> = pack_sizes.keys().collect();
        ids.sort();
        for pack in ids {
            let path = packs.path(pack);
            if let (true, Err(e)) = (path.exists(), read_footer(&path)) {
                report.damaged_packs.push(e.to_string());
            }
        }
    }
    report.snapshots_checked = records.len() as u64;
    drop(packs);

    // Pass 3, only when something is damaged: who needs it.
    if !bad.is_empty() || !manifest_damage.is_empty() {
        let mut attributed: HashSet<ChunkId> = HashSet::new();
        let mut rows: HashSet<(String, String, ChunkId)> = HashSet::new();
        let index = store.index()?;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        for record in &records {
            let id = &record.info.id;
            let before = report.damaged.len();
            if let Some(problem) = manifest_damage.get(id) {
                report.damaged.push(Damage {
                    snapshot: id.clone(),
                    artifact: "manifest".into(),
                    chunk: String::new(),
                    problem: problem.clone(),
                });
            } else {
                let entries = match super::load_entries(&mut reader, record) {
                    Ok(e) => e,
                    Err(e) => {
                        report.damaged.push(Damage {
                            snapshot: id.clone(),
                            artifact: "manifest".into(),
                            chunk: String::new(),
                            problem: e.to_string(),
                        });
                        Vec::new()
                    }
                };
                for entry in &entries {
                    let Some(content) = &entry.content else {
                        continue;
                    };
                    let artifact = format!("{}/{}", entry.part.name(), entry.path_lossy());
                    tree::walk(&mut reader, content, false, &mut |cid, _, res| {
                        // A node that fails now is damage too, recorded in pass 1 or not.
                        let problem = match (bad.get(cid), res) {
                            (Some(p), _) => p.clone(),
                            (None, Err(e)) => e.to_string(),
                            (None, Ok(_)) => return Ok(()),
                        };
                        attributed.insert(*cid);
                        // A chunk repeated inside one artifact (zero pages) is one row.
                        if rows.insert((id.clone(), artifact.clone(), *cid)) {
                            report.damaged.push(Damage {
                                snapshot: id.clone(),
                                artifact: artifact.clone(),
                                chunk: cid.hex(),
                                problem,
                            });
                        }
                        Ok(())
                    })?;
                }
            }
            if report.damaged.len() > before {
                report.damaged_snapshots.push(id.clone());
            }
        }
        // Damage that no walk reached again still fails the verdict.
        for (cid, problem) in &bad {
            if !attributed.contains(cid) {
                report.damaged.push(Damage {
                    snapshot: String::new(),
                    artifact: "(not attributed)".into(),
                    chunk: cid.hex(),
                    problem: problem.clone(),
                });
            }
        }
    }
    progress.finish();
    Ok(report)
}

fn check_chunk(
    packs: &PackFiles,
    id: &ChunkId,
    loc: &ChunkLoc,
    read_data: bool,
    pack_sizes: &HashMap<PackId, Option<u64>>,
) -> Result<u64, StoreError> {
    let path = packs.path(&loc.pack);
    let Some(size) = pack_sizes.get(&loc.pack).copied().flatten() else {
        return Err(StoreError::CorruptPack {
            pack: path,
            message: "the pack file is missing".into(),
        });
    };
    if loc.offset.saturating_add(loc.stored_len as u64) > size {
        return Err(StoreError::CorruptChunk {
            id: id.hex(),
            pack: path,
            message: "the pack is shorter than the index says (truncated)".into(),
        });
    }
    if read_data {
        packs.read(id, loc)?;
    }
    Ok(loc.raw_len as u64)
}
