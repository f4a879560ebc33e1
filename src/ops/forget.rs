//! Pins and forget: which snapshot records to keep. Forget removes records by a retention
//! policy (`retention.rs`); the chunks only they referenced are freed by a later prune.
//! Pins live in the `pins` table (store format 2; store-format.md, "The index").

use std::collections::{BTreeMap, HashSet};

use redb::ReadableTable;
use serde::Serialize;

use super::retention::{Candidate, Decision, RetentionPolicy, decide};
use crate::error::{Error, StoreError};
use crate::manifest::snapshot::SnapshotInfo;
use crate::names::AgentId;
use crate::store::Store;
use crate::store::index::{Index, PINS, SNAPSHOTS};

/// The ids of pinned snapshots. A store written before format 2 has no `pins` table: none.
pub(crate) fn pinned(
    index: &Index,
    tx: &redb::ReadTransaction,
) -> Result<HashSet<String>, StoreError> {
    let table = match tx.open_table(PINS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashSet::new()),
        Err(e) => return Err(index.err()(e.into())),
    };
    let mut out = HashSet::new();
    for item in table.iter().map_err(|e| index.err()(e.into()))? {
        let (k, _) = item.map_err(|e| index.err()(e.into()))?;
        out.insert(k.value().to_owned());
    }
    Ok(out)
}

/// Pins or unpins a snapshot. The first pin of a format-1 store raises its format to 2 in the
/// same transaction, so that an older memsnap, which knows nothing of pins, refuses the store
/// rather than deleting a pinned snapshot.
pub(crate) fn set_pin(
    store: &Store,
    spec: &str,
    agent: Option<&AgentId>,
    pin: bool,
) -> Result<SnapshotInfo, Error> {
    let index = store.index()?;
    let record = {
        let tx = index.begin_read()?;
        super::resolve(&index, &tx, spec, agent)?
    };
    let tx = index.begin_write()?;
    {
        let mut pins = tx.open_table(PINS).map_err(|e| index.err()(e.into()))?;
        if pin {
            pins.insert(record.info.id.as_str(), crate::now_ms())
                .map_err(|e| index.err()(e.into()))?;
        } else {
            pins.remove(record.info.id.as_str())
                .map_err(|e| index.err()(e.into()))?;
        }
    }
    crate::store::raise_format(&index, &tx)?;
    tx.commit().map_err(|e| index.err()(e.into()))?;
    Ok(record.info)
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ForgetRequest {
    pub tenant: Option<String>,
    pub agent: Option<String>,
    pub policy: RetentionPolicy,
    pub dry_run: bool,
}

impl ForgetRequest {
    pub fn new(policy: RetentionPolicy) -> Self {
        Self {
            tenant: None,
            agent: None,
            policy,
            dry_run: false,
        }
    }

    pub fn tenant(mut self, t: impl Into<String>) -> Self {
        self.tenant = Some(t.into());
        self
    }

    pub fn agent(mut self, a: impl Into<String>) -> Self {
        self.agent = Some(a.into());
        self
    }

    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetGroup {
    pub tenant: String,
    pub agent: String,
    /// Newest first, every snapshot with its reasons to stay (none: forgotten).
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub groups: Vec<ForgetGroup>,
    pub kept: u64,
    pub forgotten: u64,
}

pub(crate) fn forget(store: &Store, req: &ForgetRequest) -> Result<ForgetReport, Error> {
    if req.policy.is_empty() {
        return Err(Error::EmptyPolicy);
    }
    let mut groups: BTreeMap<(String, String), Vec<SnapshotInfo>> = BTreeMap::new();
    for i in super::list(store, req.tenant.as_deref(), req.agent.as_deref())? {
        groups
            .entry((i.tenant.clone(), i.agent.clone()))
            .or_default()
            .push(i);
    }
    let mut report = ForgetReport {
        dry_run: req.dry_run,
        groups: Vec::new(),
        kept: 0,
        forgotten: 0,
    };
    for ((tenant, agent), infos) in groups {
        let id = AgentId::new(&tenant, &agent)?;
        // A snapshot of this agent committing meanwhile would change what "newest" means.
        let _agent = store.lock_agent(&id)?;
        // An interrupted restore of this agent may still need its snapshot: finish it first.
        super::restore::recover(store, &id)?;
        let index = store.index()?;
        let pins = {
            let tx = index.begin_read()?;
            pinned(&index, &tx)?
        };
        let candidates: Vec<Candidate> = infos
            .iter()
            .map(|i| Candidate {
                id: i.id.clone(),
                created_at_ms: i.created_at_ms,
                label: i.label.clone(),
                pinned: pins.contains(&i.id),
            })
            .collect();
        let decisions = decide(&req.policy, &candidates);
        let gone: Vec<&Decision> = decisions.iter().filter(|d| !d.keep).collect();
        report.kept += (decisions.len() - gone.len()) as u64;
        report.forgotten += gone.len() as u64;
        if !req.dry_run && !gone.is_empty() {
            let tx = index.begin_write()?;
            {
                let mut snaps = tx
                    .open_table(SNAPSHOTS)
                    .map_err(|e| index.err()(e.into()))?;
                for d in &gone {
                    snaps
                        .remove(d.id.as_str())
                        .map_err(|e| index.err()(e.into()))?;
                }
            }
            tx.commit().map_err(|e| index.err()(e.into()))?;
        }
        report.groups.push(ForgetGroup {
            tenant,
            agent,
            decisions,
        });
    }
    Ok(report)
}
