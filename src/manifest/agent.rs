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
