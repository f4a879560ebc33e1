//! Errors, one enum per layer: [`StoreError`] for the chunk store (packs, index), [`SourceError`]
//! for reading an agent's live memory, and the umbrella [`Error`] that every public operation
//! returns. Each message names the problem and, where there is one, the fix.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the content-addressed store: packs, the redb index, chunk integrity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("I/O error on {path}: {source}{}", io_hint(.source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store index {path} cannot be used: {message}")]
    Index { path: PathBuf, message: String },
    #[error(
        "the store index {path} is damaged: {message}. Snapshot records live only there: run \
         `memsnap repair` to rebuild the index from the pack files (the damaged file is kept \
         beside it); `memsnap repair --dry-run` first says what it would recover"
    )]
    IndexDamaged { path: PathBuf, message: String },
    #[error(
        "{path} is a memsnap store of format version {found}, newer than this memsnap understands ({supported}): upgrade memsnap"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "chunk {id} is not in the store index (the store is damaged: `memsnap verify` names what \
         needs it, `memsnap repair` rebuilds the index from the pack files)"
    )]
    MissingChunk { id: String },
    #[error(
        "pack file {pack} is missing (chunk {id} is there, by the index): restore the file from a \
         backup if there is one, then run `memsnap repair`"
    )]
    MissingPack { pack: PathBuf, id: String },
    #[error("pack {pack} is damaged: {message}")]
    CorruptPack { pack: PathBuf, message: String },
    #[error(
        "chunk {id} in pack {pack} is damaged: {message} (run `memsnap verify --read-data` to see which snapshots are affected)"
    )]
    CorruptChunk {
        id: String,
        pack: PathBuf,
        message: String,
    },
    #[error("a stored record is damaged: {what}: {message}")]
    CorruptRecord { what: String, message: String },
    #[error(
        "snapshot {id} was written to the store index {path}, but making it durable failed \
         ({message}): it is listed now and may be gone after a crash; fix the cause, then run \
         `memsnap verify`, and snapshot (or import) again if it is missing"
    )]
    CommitNotDurable {
        path: PathBuf,
        id: String,
        message: String,
    },
}

impl StoreError {
    /// The store's data is damaged (as opposed to a failure of this machine or a usage error):
    /// what `verify` reports and `repair` works on.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Self::IndexDamaged { .. }
                | Self::MissingChunk { .. }
                | Self::MissingPack { .. }
                | Self::CorruptPack { .. }
                | Self::CorruptChunk { .. }
                | Self::CorruptRecord { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn index(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        let path = path.into();
        let mut message = e.to_string();
        // redb keeps only "Previous I/O error occurred" after a failed read or write: name it.
        if message.starts_with("Previous I/O error")
            && let Some(first) = crate::storage::index_io_error(&path)
        {
            message = format!("an earlier I/O error made it unusable: {first}");
        }
        Self::Index { path, message }
    }
}

/// Errors while reading an agent's live memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("cannot read {path}: {source}{}", io_hint(.source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read SQLite database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot read git metadata of {path}: {message}")]
    Git { path: PathBuf, message: String },
    #[error("state provider failed: {message}")]
    State { message: String },
    #[error("{path} is not a readable SQLite database: {message}")]
    NotSqlite { path: PathBuf, message: String },
}

/// The error of every public memsnap operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid {what} name {name:?}: {reason} (names are 1-64 bytes of [a-z0-9_-])")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error(
        "no memory found for {agent} at {looked_at}: none of the memdir, the SQLite folder or the state folder exists or holds anything"
    )]
    NoMemory { agent: String, looked_at: String },
    #[error(
        "no source is known for {agent}: pass --source DIR (or --memdir/--sqlite-dir/--state-dir) once and the store remembers it"
    )]
    NoSource { agent: String },
    #[error(
        "agent {agent} is busy: another memsnap process held its lock for {waited:?} (raise --lock-timeout to wait longer)"
    )]
    AgentBusy { agent: String, waited: Duration },
    #[error("the store is busy: {path} was held by another process for {waited:?}")]
    StoreBusy { path: PathBuf, waited: Duration },
    #[error(
        "no memsnap store at {path}: run `memsnap init` or take a snapshot first, or pass --store"
    )]
    NoStore { path: PathBuf },
    #[error(
        "{path} is not empty and is not a memsnap store: pass --store with a new or empty folder, or an existing store"
    )]
    NotAStore { path: PathBuf },
    #[error("no snapshot matches {spec:?}{hint}")]
    SnapshotNotFound { spec: String, hint: String },
    #[error("{spec:?} matches {count} snapshots: give more characters of the id")]
    AmbiguousSnapshot { spec: String, count: usize },
    #[error(
        "{spec:?} is too short: give at least 8 characters of a snapshot id, or `latest` with --tenant and --agent"
    )]
    SnapshotSpecTooShort { spec: String },
    #[error("`latest` needs --tenant and --agent")]
    LatestNeedsAgent,
    #[error(
        "snapshot {id} belongs to {snapshot_agent}, not {asked}: acting on one agent's snapshot as another's is refused"
    )]
    AgentMismatch {
        id: String,
        snapshot_agent: String,
        asked: String,
    },
    #[error("the {first} and the {second} overlap: give three separate folders")]
    OverlappingParts { first: String, second: String },
    #[error("cannot restore over {path}: {reason}")]
    CannotSwitch { path: PathBuf, reason: String },
    #[error(
        "{doing} the restore of snapshot {snapshot} failed: {source}. The restore journal {journal} \
         stays: fix the cause and run any memsnap command to finish it"
    )]
    Recovery {
        snapshot: String,
        journal: PathBuf,
        doing: String,
        #[source]
        source: Box<Error>,
    },
    #[error(
        "snapshot {id} came from a bundle and memsnap does not know where agent {agent} lives on this host: pass --source DIR to restore over the agent there, or --target DIR for a new folder"
    )]
    UnknownLocation { id: String, agent: String },
    #[error("snapshot {id} is pinned: `memsnap unpin {id}` first if it really should go")]
    Pinned { id: String },
    #[error(
        "forget needs a policy: give at least one --keep-* option, --policy FILE, or a policy.toml in the store"
    )]
    EmptyPolicy,
    #[error("restore target {path} is not empty: choose an empty or missing folder for --target")]
    TargetNotEmpty { path: PathBuf },
    #[error("the snapshot's {what} does not match its recorded hash after restore staging: {path}")]
    RestoredHashMismatch { what: String, path: PathBuf },
    #[error("I/O error on {path}: {source}{}", io_hint(.source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("injected failure at {0} (MEMSNAP_FAILPOINT)")]
    FailPoint(String),
}

/// Errors of portable bundles: export, import, verify-bundle, encryption and redaction.
/// A bundle is input from another machine; every refusal names the problem and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("I/O error on {path}: {source}{}", io_hint(.source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "bundle {bundle} is damaged: {what}; nothing was imported or restored (fetch the bundle again)"
    )]
    Damaged { bundle: PathBuf, what: String },
    #[error(
        "bundle {bundle} has no checksum file {sibling}: copy it along with the bundle (the two travel together)"
    )]
    MissingChecksum { bundle: PathBuf, sibling: PathBuf },
    #[error("bundle {bundle} is refused: {entry}: {reason}; nothing was imported or restored")]
    Hostile {
        bundle: PathBuf,
        entry: String,
        reason: String,
    },
    #[error(
        "bundle {bundle} uses {what} {found}, newer than this memsnap reads ({supported}): upgrade memsnap"
    )]
    NewerFormat {
        bundle: PathBuf,
        what: String,
        found: String,
        supported: String,
    },
    #[error("{path} is not a memsnap or nexo-memory-snapshot bundle: {reason}")]
    NotABundle { path: PathBuf, reason: String },
    #[error(
        "bundle {bundle} is age-encrypted: pass --identity FILE with a key it was encrypted to"
    )]
    NeedsIdentity { bundle: PathBuf },
    #[error(
        "none of the keys in {identity} can decrypt bundle {bundle}: it was encrypted to other recipients"
    )]
    WrongIdentity { bundle: PathBuf, identity: PathBuf },
    #[error("cannot use identity file {path}: {message}")]
    BadIdentity { path: PathBuf, message: String },
    #[error(
        "invalid recipient {recipient:?}: {message} (give an age X25519 public key `age1...`, as age-keygen prints)"
    )]
    BadRecipient { recipient: String, message: String },
    #[error(
        "bundle {bundle} holds agent {found}, not {asked}: pass the matching --tenant/--agent (nothing was changed)"
    )]
    AgentMismatch {
        bundle: PathBuf,
        found: String,
        asked: String,
    },
    #[error(
        "the store already holds a different snapshot with id {id}: the bundle's content does not match it (nothing was imported)"
    )]
    SnapshotIdConflict { id: String },
    #[error("cannot export {path}: {reason}")]
    NotExportable { path: String, reason: String },
    #[error("{path} already exists: choose another --out or remove it first")]
    OutputExists { path: PathBuf },
    #[error("redaction rules {path}: {message}")]
    RedactConfig { path: PathBuf, message: String },
    #[error("redaction of {artifact} failed: {message}; no bundle was written")]
    Redaction { artifact: String, message: String },
}

impl BundleError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// The bundle itself is bad (damaged or refused), as opposed to a usage or local error.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Self::Damaged { .. }
                | Self::MissingChecksum { .. }
                | Self::Hostile { .. }
                | Self::NotABundle { .. }
        )
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about the I/O errors a user can fix, appended to their message.
pub(crate) fn io_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            "; the file system is full: free space on it (or `memsnap prune` a store there) and \
             run the command again"
        }
        Some(libc::EDQUOT) => "; the disk quota is used up: raise it or free space, then run again",
        Some(libc::EACCES | libc::EPERM) => {
            "; this user may not do that there: fix the owner or permissions of that path, or run \
             memsnap as the user that owns it"
        }
        Some(libc::EROFS) => "; the file system is mounted read-only",
        Some(libc::EMFILE | libc::ENFILE) => {
            "; too many files are open: raise the limit (`ulimit -n`) and run the command again"
        }
        Some(libc::EIO) => {
            "; the device reported an error: check the disk (dmesg), then run `memsnap verify \
             --read-data`"
        }
        _ => "",
    }
}

#[cfg(test)]
mod hint_tests {
    use super::io_hint;

    #[test]
    fn io_errors_the_user_can_fix_say_how() {
        for (errno, words) in [
            (libc::ENOSPC, "full"),
            (libc::EDQUOT, "quota"),
            (libc::EACCES, "permissions"),
            (libc::EROFS, "read-only"),
            (libc::EIO, "dmesg"),
            (libc::EMFILE, "ulimit -n"),
        ] {
            let hint = io_hint(&std::io::Error::from_raw_os_error(errno));
            assert!(hint.contains(words), "{errno}: {hint}");
        }
        assert_eq!(io_hint(&std::io::Error::other("x")), "");
    }
}
