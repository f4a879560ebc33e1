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

    /// The three folders must be disjoint: a database inside the memdir would be captured as a
    /// torn raw file, and restore renames the memdir as a whole.
    /// The store must not be inside any of them either: a snapshot would copy the store into
    /// itself, and a restore would replace it with that half-written copy.
    pub(crate) fn check_disjoint(&self, store: &Path) -> Result<(), crate::error::Error> {
        let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
        let parts = [
            ("memdir", &self.memdir),
            ("sqlite folder", &self.sqlite_dir),
            ("state folder", &self.state_dir),
            ("store", &store),
        ];
        for (i, (a, pa)) in parts.iter().enumerate() {
            for (b, pb) in &parts[i + 1..] {
                if pa.starts_with(pb) || pb.starts_with(pa) {
                    return Err(crate::error::Error::OverlappingParts {
                        first: format!("{a} {}", pa.display()),
                        second: format!("{b} {}", pb.display()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Substitutes `{tenant}` and `{agent}` and makes every path absolute.
    pub fn resolve(&self, agent: &AgentId) -> Self {
        let sub = |p: &Path| {
            let s = p
                .to_string_lossy()
                .replace("{tenant}", agent.tenant())
                .replace("{agent}", agent.agent());
            let p = PathBuf::from(s);
            // An existing path is taken through its symlinks, so that a symlinked memdir is
            // captured (and restored) as the folder it points to.
            std::fs::canonicalize(&p)
                .or_else(|_| std::path::absolute(&p))
                .unwrap_or(p)
        };
        Self {
            memdir: sub(&self.memdir),
            sqlite_dir: sub(&self.sqlite_dir),
            state_dir: sub(&self.state_dir),
        }
    }
}
