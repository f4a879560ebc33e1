//! The agent record (redb `agents` table): where an agent's memory lives, remembered from its
//! last snapshot so that later commands need only the names.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) const AGENT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    pub memdir: PathBuf,
    pub sqlite_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl From<&crate::source::SourceSpec> for AgentRecord {
    fn from(s: &crate::source::SourceSpec) -> Self {
        Self {
            memdir: s.memdir.clone(),
            sqlite_dir: s.sqlite_dir.clone(),
            state_dir: s.state_dir.clone(),
        }
    }
}

impl From<AgentRecord> for crate::source::SourceSpec {
    fn from(a: AgentRecord) -> Self {
        Self {
            memdir: a.memdir,
            sqlite_dir: a.sqlite_dir,
            state_dir: a.state_dir,
        }
    }
}
