//! The operations on a store, one file each; shared lookups live here.

pub(crate) mod diff;
pub(crate) mod forget;
pub(crate) mod prune;
pub(crate) mod repair;
pub(crate) mod restore;
pub(crate) mod retention;
pub(crate) mod snapshot;
pub(crate) mod stats;
pub(crate) mod verify;

use redb::ReadableTable;

use crate::error::{Error, StoreError};
use crate::manifest::agent::{AGENT_VERSION, AgentRecord};
use crate::manifest::artifact::{self, ArtifactEntry};
use crate::manifest::snapshot::{SNAPSHOT_VERSION, SnapshotInfo, SnapshotRecord};
use crate::names::AgentId;
use crate::store::Store;
use crate::store::index::{AGENTS, Index, PACKS, PackRecord, SNAPSHOTS, decode_record};
use crate::store::pack::PackId;
use crate::store::reader::ChunkReader;
use crate::tree;
use std::collections::HashSet;

/// Progress of long work, for a progress bar. Byte counts are approximate.
pub trait Progress: Send + Sync {
    fn start(&self, phase: &str, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// After redb's commit returned an error: whether the commit is there anyway, read back
/// through a new session. A commit that is not visible now is not on disk either (every write
/// reaches the page cache before the disk), so the packs written for it can go. `None` when
/// the index cannot tell (it cannot be opened or read): the packs must stay then.
pub(crate) fn commit_visible(
    store: &Store,
    probe: impl FnOnce(&redb::ReadTransaction) -> Result<bool, redb::Error>,
) -> Option<bool> {
    let index = store.index_for_reading().ok()?;
    let tx = index.begin_read().ok()?;
    probe(&tx).ok()
}

pub(crate) fn load_agent(store: &Store, agent: &AgentId) -> Result<Option<AgentRecord>, Error> {
    let index = store.index_for_reading()?;
    let tx = index.begin_read()?;
    let table = tx.open_table(AGENTS).map_err(|e| index.err()(e.into()))?;
    let v = table
        .get(agent.key().as_str())
        .map_err(|e| index.err()(e.into()))?;
    match v {
        Some(g) => Ok(Some(decode_record(
            AGENT_VERSION,
            g.value(),
            "agent record",
        )?)),
        None => Ok(None),
    }
}

pub(crate) fn all_records(
    index: &Index,
    tx: &redb::ReadTransaction,
) -> Result<Vec<SnapshotRecord>, StoreError> {
    let table = tx
        .open_table(SNAPSHOTS)
        .map_err(|e| index.err()(e.into()))?;
    let mut out = Vec::new();
    for item in table.iter().map_err(|e| index.err()(e.into()))? {
        let (k, v) = item.map_err(|e| index.err()(e.into()))?;
        let what = format!("snapshot record {}", k.value());
        out.push(decode_record::<SnapshotRecord>(
            SNAPSHOT_VERSION,
            v.value(),
            &what,
        )?);
    }
    out.sort_by(|a, b| (a.info.created_at_ms, &a.info.id).cmp(&(b.info.created_at_ms, &b.info.id)));
    Ok(out)
}

pub(crate) fn latest_of(
    index: &Index,
    tx: &redb::ReadTransaction,
    agent: &AgentId,
) -> Result<Option<SnapshotRecord>, StoreError> {
    Ok(all_records(index, tx)?
        .into_iter()
        .rfind(|r| r.info.tenant == agent.tenant() && r.info.agent == agent.agent()))
}

/// Resolves `SNAP`: a full id, a unique prefix of at least 8 characters, or `latest`.
pub(crate) fn resolve(
    index: &Index,
    tx: &redb::ReadTransaction,
    spec: &str,
    agent: Option<&AgentId>,
) -> Result<SnapshotRecord, Error> {
    if spec == "latest" {
        let agent = agent.ok_or(Error::LatestNeedsAgent)?;
        return latest_of(index, tx, agent)?.ok_or_else(|| Error::SnapshotNotFound {
            spec: spec.to_owned(),
            hint: format!(" (agent {agent} has no snapshot)"),
        });
    }
    if spec.len() < 8 {
        return Err(Error::SnapshotSpecTooShort {
            spec: spec.to_owned(),
        });
    }
    let spec_lc = spec.to_ascii_lowercase();
    // Ids are the table's keys, in order: the ids with this prefix are one range, found without
    // decoding every snapshot record.
    let table = tx
        .open_table(SNAPSHOTS)
        .map_err(|e| index.err()(e.into()))?;
    let mut matches: Vec<SnapshotRecord> = Vec::new();
    for item in table
        .range(spec_lc.as_str()..)
        .map_err(|e| index.err()(e.into()))?
    {
        let (k, v) = item.map_err(|e| index.err()(e.into()))?;
        if !k.value().starts_with(&spec_lc) {
            break;
        }
        let what = format!("snapshot record {}", k.value());
        matches.push(decode_record(SNAPSHOT_VERSION, v.value(), &what)?);
    }
    let record = match matches.len() {
        0 => {
            return Err(Error::SnapshotNotFound {
                spec: spec.to_owned(),
                hint: " (see `memsnap list`)".to_owned(),
            });
        }
        1 => matches.remove(0),
        count => {
            return Err(Error::AmbiguousSnapshot {
                spec: spec.to_owned(),
                count,
            });
        }
    };
    // Naming an agent is a claim about the snapshot: one tenant never reads, restores or
    // deletes another's snapshot by id.
    if let Some(asked) =
        agent.filter(|a| a.tenant() != record.info.tenant || a.agent() != record.info.agent)
    {
        return Err(Error::AgentMismatch {
            id: record.info.id.clone(),
            snapshot_agent: format!("{}/{}", record.info.tenant, record.info.agent),
            asked: asked.to_string(),
        });
    }
    Ok(record)
}

pub(crate) fn load_entries(
    reader: &mut ChunkReader<'_>,
    record: &SnapshotRecord,
) -> Result<Vec<ArtifactEntry>, StoreError> {
    let mut bytes = Vec::with_capacity(record.manifest.size.min(1 << 24) as usize);
    tree::walk(reader, &record.manifest, true, &mut |_, is_data, data| {
        let data = data?;
        if is_data {
            bytes.extend_from_slice(&data);
        }
        Ok(())
    })?;
    artifact::decode_entries(&bytes)
}

/// Snapshots, oldest first, optionally of one tenant or agent.
/// Walks what snapshot `r` references (its manifest tree and every entry's content tree) into
/// `seen` without reading data chunks: prune's and stats' mark. A manifest already walked as a
/// manifest (`manifests`; an unchanged re-snapshot shares its predecessor's) is skipped. Not
/// `seen`: the same bytes met as a file's data or inside another tree say nothing of entries.
pub(crate) fn mark(
    reader: &mut ChunkReader<'_>,
    r: &SnapshotRecord,
    manifests: &mut HashSet<tree::ContentRef>,
    seen: &mut tree::Seen,
    visit: &mut tree::Visitor<'_>,
) -> Result<(), StoreError> {
    if !manifests.insert(r.manifest) {
        return Ok(());
    }
    tree::walk_unseen(reader, &r.manifest, seen, visit)?;
    for e in load_entries(reader, r)?
        .iter()
        .filter_map(|e| e.content.as_ref())
    {
        tree::walk_unseen(reader, e, seen, visit)?;
    }
    Ok(())
}

/// Every pack record, by pack id.
pub(crate) fn pack_records(
    index: &Index,
    tx: &redb::ReadTransaction,
) -> Result<std::collections::HashMap<PackId, PackRecord>, StoreError> {
    let table = tx.open_table(PACKS).map_err(|e| index.err()(e.into()))?;
    let mut out = std::collections::HashMap::new();
    for item in table.iter().map_err(|e| index.err()(e.into()))? {
        let (k, v) = item.map_err(|e| index.err()(e.into()))?;
        out.insert(
            PackId(k.value()),
            decode_record(1, v.value(), "pack record")?,
        );
    }
    Ok(out)
}

pub(crate) fn list(
    store: &Store,
    tenant: Option<&str>,
    agent: Option<&str>,
) -> Result<Vec<SnapshotInfo>, Error> {
    let index = store.index_for_reading()?;
    let tx = index.begin_read()?;
    Ok(all_records(&index, &tx)?
        .into_iter()
        .map(|r| r.info)
        .filter(|i| tenant.is_none_or(|t| i.tenant == t) && agent.is_none_or(|a| i.agent == a))
        .collect())
}

/// One artifact of a snapshot, as `show` presents it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArtifactInfo {
    pub part: String,
    pub path: String,
    pub kind: String,
    pub mode: u32,
    pub size: u64,
    /// BLAKE3 of the content, hex; empty for folders and symlinks.
    pub blake3: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotDetails {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    pub entries: Vec<ArtifactInfo>,
}

pub(crate) fn show(
    store: &Store,
    spec: &str,
    agent: Option<&AgentId>,
) -> Result<SnapshotDetails, Error> {
    let index = store.index_for_lookups()?;
    let tx = index.begin_read()?;
    let record = resolve(&index, &tx, spec, agent)?;
    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
    let entries = load_entries(&mut reader, &record)?
        .into_iter()
        .map(|e| ArtifactInfo {
            part: e.part.name().to_owned(),
            path: e.path_lossy(),
            kind: e.kind_name().to_owned(),
            mode: e.mode,
            size: e.size,
            blake3: if e.content.is_some() {
                hex::encode(e.hash)
            } else {
                String::new()
            },
        })
        .collect();
    Ok(SnapshotDetails {
        info: record.info,
        entries,
    })
}

/// Deletes a snapshot record. Its chunks stay until a prune finds them unreferenced.
pub(crate) fn delete(
    store: &Store,
    spec: &str,
    agent: Option<&AgentId>,
) -> Result<SnapshotInfo, Error> {
    let record = {
        let index = store.index_for_reading()?;
        let tx = index.begin_read()?;
        resolve(&index, &tx, spec, agent)?
    };
    let owner = AgentId::new(&record.info.tenant, &record.info.agent)?;
    let _agent = store.lock_agent(&owner)?;
    // An interrupted restore of this agent may still need the snapshot: finish it first.
    restore::recover(store, &owner)?;
    let index = store.index()?;
    {
        let tx = index.begin_read()?;
        if forget::pinned(&index, &tx)?.contains(&record.info.id) {
            return Err(Error::Pinned {
                id: record.info.id.clone(),
            });
        }
    }
    let tx = index.begin_write()?;
    {
        let mut table = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| index.err()(e.into()))?;
        // Gone since it was resolved (a forget or another delete got the lock first): that
        // process reported it; this one must not report a second deletion.
        let removed = table
            .remove(record.info.id.as_str())
            .map_err(|e| index.err()(e.into()))?;
        if removed.is_none() {
            return Err(Error::SnapshotNotFound {
                spec: spec.to_owned(),
                hint: " (it was removed while this command waited for the agent)".to_owned(),
            });
        }
    }
    tx.commit().map_err(|e| index.err()(e.into()))?;
    Ok(record.info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::snapshot::SnapshotStats;
    use crate::store::chunk_id::ChunkId;
    use crate::store::index::encode_record;
    use crate::tree::ContentRef;

    fn record(id: &str, agent: &str, at: i64) -> SnapshotRecord {
        SnapshotRecord {
            info: SnapshotInfo {
                id: id.to_owned(),
                tenant: "acme".into(),
                agent: agent.into(),
                created_at_ms: at,
                label: None,
                created_by: "test".into(),
                parent: None,
                git: None,
                schema_versions: Default::default(),
                memdir: String::new(),
                sqlite_dir: String::new(),
                state_dir: String::new(),
                absent: Vec::new(),
                artifacts: 0,
                logical_bytes: 0,
                stats: SnapshotStats::default(),
            },
            manifest: ContentRef {
                size: 0,
                height: 0,
                root: ChunkId([0; 32]),
            },
        }
    }

    #[test]
    fn snapshot_specs_resolve_or_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::for_test(dir.path());
        let index = store.index().expect("index");
        let tx = index.begin_write().expect("tx");
        {
            let mut t = tx.open_table(SNAPSHOTS).expect("table");
            for (id, agent, at) in [
                ("aaaaaaaa-1111-4000-8000-000000000001", "ana", 1),
                ("aaaaaaaa-2222-4000-8000-000000000002", "ana", 2),
                ("bbbbbbbb-3333-4000-8000-000000000003", "bob", 3),
            ] {
                let bytes = encode_record(SNAPSHOT_VERSION, &record(id, agent, at), "test")
                    .expect("encode");
                t.insert(id, bytes.as_slice()).expect("insert");
            }
        }
        tx.commit().expect("commit");
        let tx = index.begin_read().expect("read");
        let ana = AgentId::new("acme", "ana").expect("name");
        let id = |spec: &str, agent: Option<&AgentId>| {
            resolve(&index, &tx, spec, agent).map(|r| r.info.id)
        };

        assert!(matches!(
            id("aaaaaaaa", None),
            Err(Error::AmbiguousSnapshot { count: 2, .. })
        ));
        assert_eq!(
            id("AAAAAAAA-2", None).expect("prefix"),
            "aaaaaaaa-2222-4000-8000-000000000002"
        );
        assert!(matches!(
            id("aaaa", None),
            Err(Error::SnapshotSpecTooShort { .. })
        ));
        assert!(matches!(
            id("cccccccc", None),
            Err(Error::SnapshotNotFound { .. })
        ));
        assert!(matches!(id("latest", None), Err(Error::LatestNeedsAgent)));
        assert_eq!(
            id("latest", Some(&ana)).expect("latest"),
            "aaaaaaaa-2222-4000-8000-000000000002"
        );
        assert!(matches!(
            id("bbbbbbbb", Some(&ana)),
            Err(Error::AgentMismatch { .. })
        ));
        let nobody = AgentId::new("acme", "zed").expect("name");
        assert!(matches!(
            id("latest", Some(&nobody)),
            Err(Error::SnapshotNotFound { .. })
        ));
    }
}
