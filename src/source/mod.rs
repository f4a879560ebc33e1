//! Finding and reading an agent's live memory: the memdir (git work tree + `.git`), the SQLite
//! databases, the state JSON. Reading never writes to the agent's files (beyond what SQLite
//! itself does for a reader) and never follows a symlink.

pub(crate) mod git;
pub(crate) mod memdir;
pub(crate) mod sqlite;
pub(crate) mod state;

use std::path::{Path, PathBuf};

use crate::names::AgentId;

/// Where an agent's memory lives. Each path may contain `{tenant}` and `{agent}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    pub memdir: PathBuf,
    pub sqlite_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl SourceSpec {
    /// `DIR/memdir`, `DIR/sqlite`, `DIR/state`.
    pub fn from_root(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            memdir: dir.join("memdir"),
            sqlite_dir: dir.join("sqlite"),
            state_dir: dir.join("state"),
        }
    }

    /// Substitutes `{tenant}` and `{agent}` and makes every path absolute.
    pub fn resolve(&self, agent: &AgentId) -> Self {
        let sub = |p: &Path| {
            let s = p
                .to_string_lossy()
                .replace("{tenant}", agent.tenant())
                .replace("{agent}", agent.agent());
            let p = PathBuf::from(s);
            std::path::absolute(&p).unwrap_or(p)
        };
        Self {
            memdir: sub(&self.memdir),
            sqlite_dir: sub(&self.sqlite_dir),
            state_dir: sub(&self.state_dir),
        }
    }
}
