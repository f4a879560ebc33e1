//! Git HEAD metadata of the memdir, read with gix (no `git` binary needed).

use std::path::Path;

use crate::error::SourceError;
use crate::manifest::snapshot::GitMeta;

/// HEAD's commit, or `None` when the memdir is not a repository or HEAD is unborn.
pub(crate) fn head_meta(memdir: &Path) -> Result<Option<GitMeta>, SourceError> {
    if !memdir.join(".git").exists() {
        return Ok(None);
    }
    let err = |m: String| SourceError::Git {
        path: memdir.to_path_buf(),
        message: m,
    };
    let repo = gix::open(memdir).map_err(|e| err(e.to_string()))?;
    let commit = match repo.head_commit() {
        Ok(c) => c,
        // An unborn HEAD (no commit yet) is not an error.
        Err(_) if repo.head_id().is_err() => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let subject = commit
        .message()
        .map(|m| m.summary().to_string())
        .map_err(|e| err(e.to_string()))?;
    let author = commit.author().map_err(|e| err(e.to_string()))?;
    let head_author = format!("{} <{}>", author.name, author.email);
    let seconds = commit.time().map_err(|e| err(e.to_string()))?.seconds;
    Ok(Some(GitMeta {
        head_oid: commit.id.to_string(),
        head_subject: subject,
        head_author,
        head_ts_ms: seconds * 1000,
    }))
}
