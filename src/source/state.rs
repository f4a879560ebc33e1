//! Agent state (the extractor cursor, the last dream run) as JSON documents, behind a trait so
//! that a runtime keeping its state elsewhere (a database row, a service) can plug in its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::SourceError;
use crate::storage::{Fs, Storage};

/// One state document: a name (`extract_cursor.json`) and its JSON bytes, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateItem {
    pub name: String,
    pub json: Vec<u8>,
    /// Permission bits, where the provider has them (the folder provider does); restored as is.
    pub mode: Option<u32>,
}

impl StateItem {
    pub fn new(name: impl Into<String>, json: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            json,
            mode: None,
        }
    }
}

/// Captures and restores an agent's small JSON state.
pub trait StateProvider: Send + Sync {
    /// Where the state lives, for messages.
    fn describe(&self) -> String;
    /// The current documents; an empty list when there is no state.
    fn capture(&self) -> Result<Vec<StateItem>, SourceError>;
    /// Replaces the state with exactly `items` (documents not in `items` are removed).
    fn restore(&self, items: &[StateItem]) -> Result<(), SourceError>;
}

/// The CLI's provider: every `*.json` file directly inside a folder.
#[derive(Debug, Clone)]
pub struct FsStateProvider {
    dir: PathBuf,
    fs: Fs,
}

impl FsStateProvider {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fs: Fs::default(),
        }
    }

    /// Writes through `storage` (restore passes the store's).
    pub fn with_storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.fs = Fs(storage);
        self
    }

    fn io(path: &Path) -> impl Fn(std::io::Error) -> SourceError + '_ {
        move |source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn names(&self) -> Result<Vec<String>, SourceError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&self.dir)(e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(Self::io(&self.dir))?;
            let ft = entry.file_type().map_err(Self::io(&entry.path()))?;
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(path = %entry.path().display(), "skipping a state file whose name is not UTF-8");
                continue;
            };
            if ft.is_file() && name.ends_with(".json") && !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

impl FsStateProvider {
    /// Removes the temporary files (`.NAME.json.tmp-<16 hex>`, `fsutil::tmp_name`) of restores
    /// killed before their rename. A restore runs under the agent lock, so none is in use.
    fn remove_temps(&self) -> Result<(), SourceError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Self::io(&self.dir)(e)),
        };
        for entry in rd {
            let entry = entry.map_err(Self::io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with('.')
                && name.rsplit_once(".json.tmp-").is_some_and(|(_, hex)| {
                    hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())
                });
            if ours {
                let path = entry.path();
                self.fs.remove_file(&path).map_err(Self::io(&path))?;
            }
        }
        Ok(())
    }
}

impl StateProvider for FsStateProvider {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn capture(&self) -> Result<Vec<StateItem>, SourceError> {
        self.names()?
            .into_iter()
            .map(|name| {
                let path = self.dir.join(&name);
                let json = std::fs::read(&path).map_err(Self::io(&path))?;
                let mode = std::fs::metadata(&path)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .ok();
                if serde_json::from_slice::<serde_json::Value>(&json).is_err() {
                    tracing::warn!(path = %path.display(), "state file is not valid JSON; captured as is");
                }
                Ok(StateItem { name, json, mode })
            })
            .collect()
    }

    fn restore(&self, items: &[StateItem]) -> Result<(), SourceError> {
        self.fs
            .create_dir_all_durable(&self.dir)
            .map_err(Self::io(&self.dir))?;
        self.remove_temps()?;
        for item in items {
            if item.name.contains('/') || item.name.starts_with('.') {
                return Err(SourceError::State {
                    message: format!("refusing state document name {:?}", item.name),
                });
            }
            let path = self.dir.join(&item.name);
            self.fs
                .write_atomic(&path, &item.json, item.mode.unwrap_or(0o600))
                .map_err(Self::io(&path))?;
        }
        for name in self.names()? {
            if !items.iter().any(|i| i.name == name) {
                let path = self.dir.join(&name);
                self.fs.remove_file(&path).map_err(Self::io(&path))?;
            }
        }
        self.fs.sync_dir(&self.dir).map_err(Self::io(&self.dir))
    }
}
