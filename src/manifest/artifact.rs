//! Artifact entries: one per file, folder, symlink or database of a snapshot. A snapshot's entries,
//! sorted by (part, path) and encoded back to back, form one byte stream stored as a content tree
//! (store-format.md, "Manifest"), so an unchanged entry list costs nothing to store again.

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::tree::ContentRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Part {
    Memdir,
    Sqlite,
    State,
}

impl Part {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Part::Memdir => "memdir",
            Part::Sqlite => "sqlite",
            Part::State => "state",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    Sqlite {
        page_size: u32,
        user_version: i64,
        /// The database was in WAL mode (its header says so; restore keeps it).
        wal: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ArtifactEntry {
    pub part: Part,
    /// Relative to the part's folder, `/`-separated, raw bytes (names need not be UTF-8).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// BLAKE3 of the whole content; zero for folders and symlinks.
    pub hash: [u8; 32],
    pub content: Option<ContentRef>,
}

const ENTRY_VERSION: u8 = 1;

impl ArtifactEntry {
    pub(crate) fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::Sqlite { .. } => "sqlite",
        }
    }
}

/// Encodes the entry list: per entry a u32 LE length, then the record (version byte, bincode 2).
pub(crate) fn encode_entries(entries: &[ArtifactEntry]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    for e in entries {
        let body = crate::store::index::encode_record(ENTRY_VERSION, e, "manifest entry")?;
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    Ok(out)
}

pub(crate) fn decode_entries(mut bytes: &[u8]) -> Result<Vec<ArtifactEntry>, StoreError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err(StoreError::CorruptRecord {
                what: "manifest".into(),
                message: "truncated entry length".into(),
            });
        }
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let Some(body) = bytes.get(4..4 + len) else {
            return Err(StoreError::CorruptRecord {
                what: "manifest".into(),
                message: "truncated entry".into(),
            });
        };
        out.push(crate::store::index::decode_record(
            ENTRY_VERSION,
            body,
            "manifest entry",
        )?);
        bytes = &bytes[4 + len..];
    }
    Ok(out)
}
