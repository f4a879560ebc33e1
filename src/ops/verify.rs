//! Verify: every chunk a snapshot references is in the index and inside its pack; with
//! `read_data`, every chunk is also read, decompressed and re-hashed. Each damaged chunk is
//! reported with the snapshots and artifacts that need it. Each chunk is checked once, however
//! many snapshots share it.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::Progress;
use crate::error::{Error, StoreError};
use crate::names::AgentId;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::{PackId, read_footer};
use crate::store::reader::ChunkReader;
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
    let index = store.index()?;
    let tx = index.begin_read()?;
    let records = match spec {
        Some(s) => vec![super::resolve(&index, &tx, s, agent)?],
        None => super::all_records(&index, &tx)?,
    };
    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
    let mut report = VerifyReport {
        read_data,
        snapshots_checked: 0,
        chunks_checked: 0,
        bytes_checked: 0,
        damaged: Vec::new(),
        damaged_snapshots: Vec::new(),
        damaged_packs: Vec::new(),
    };
    let mut good: HashSet<ChunkId> = HashSet::new();
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
    let mut pack_sizes: HashMap<PackId, Option<u64>> = HashMap::new();
    progress.start("verify", records.iter().map(|r| r.info.logical_bytes).sum());

    for record in &records {
        report.snapshots_checked += 1;
        let before = report.damaged.len();
        let id = record.info.id.clone();
        let entries = match super::load_entries(&mut reader, record) {
            Ok(e) => e,
            Err(e) => {
                report.damaged.push(Damage {
                    snapshot: id.clone(),
                    artifact: "manifest".into(),
                    chunk: String::new(),
                    problem: e.to_string(),
                });
                report.damaged_snapshots.push(id);
                continue;
            }
        };
        for entry in &entries {
            let Some(content) = &entry.content else {
                continue;
            };
            let artifact = format!("{}/{}", entry.part.name(), entry.path_lossy());
            let mut data_ids = Vec::new();
            let mut node_errors = Vec::new();
            tree::walk(&mut reader, content, false, &mut |cid, is_data, res| {
                if is_data {
                    data_ids.push(*cid);
                } else if let Err(e) = res {
                    node_errors.push((*cid, e.to_string()));
                }
                Ok(())
            })?;
            for (cid, problem) in node_errors {
                report.damaged.push(Damage {
                    snapshot: id.clone(),
                    artifact: artifact.clone(),
                    chunk: cid.hex(),
                    problem,
                });
            }
            for cid in data_ids {
                if good.contains(&cid) {
                    continue;
                }
                let problem = match bad.get(&cid) {
                    Some(p) => Some(p.clone()),
                    None => {
                        let r = check_chunk(&mut reader, &cid, read_data, &mut pack_sizes);
                        report.chunks_checked += 1;
                        match r {
                            Ok(n) => {
                                report.bytes_checked += n;
                                progress.advance(n);
                                good.insert(cid);
                                None
                            }
                            Err(e) => {
                                let p = e.to_string();
                                bad.insert(cid, p.clone());
                                Some(p)
                            }
                        }
                    }
                };
                if let Some(problem) = problem {
                    report.damaged.push(Damage {
                        snapshot: id.clone(),
                        artifact: artifact.clone(),
                        chunk: cid.hex(),
                        problem,
                    });
                }
            }
        }
        if report.damaged.len() > before {
            report.damaged_snapshots.push(id);
        }
    }
    if read_data {
        let mut packs: Vec<&PackId> = pack_sizes.keys().collect();
        packs.sort();
        for pack in packs {
            let path = reader.pack_path(pack);
            if let (true, Err(e)) = (path.exists(), read_footer(&path)) {
                report.damaged_packs.push(e.to_string());
            }
        }
    }
    progress.finish();
    Ok(report)
}

fn check_chunk(
    reader: &mut ChunkReader<'_>,
    id: &ChunkId,
    read_data: bool,
    pack_sizes: &mut HashMap<PackId, Option<u64>>,
) -> Result<u64, StoreError> {
    let loc = reader
        .locate(id)?
        .ok_or_else(|| StoreError::MissingChunk { id: id.hex() })?;
    let path = reader.pack_path(&loc.pack);
    let size = *pack_sizes
        .entry(loc.pack)
        .or_insert_with(|| std::fs::metadata(&path).ok().map(|m| m.len()));
    let Some(size) = size else {
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
        reader.read_at(id, &loc)?;
    }
    Ok(loc.raw_len as u64)
}
