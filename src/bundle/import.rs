//! Reading a bundle (memsnap's or nexo-memory-snapshot 0.1.x's, plain or age-encrypted) as
//! hostile input: one streaming pass checks the file against its `.sha256`, the manifest, its
//! seal and every artifact's SHA-256, and refuses links, devices, unsafe paths, unlisted or
//! duplicate entries and streams larger than declared. `import` stores the artifacts as they
//! stream (deduplicating) and commits the snapshot only after every check passed; on any
//! failure no snapshot is listed and the packs it wrote are deleted, but for those an early
//! commit already put in the index (a large bundle; store-format.md, "Write ordering"), which
//! are garbage until a prune. `verify_bundle` runs the same pass without a store. Layout:
//! store-format.md, "Bundles".

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::crypt::{AGE_MAGIC, Identities, load_identities};
use super::export::sibling_sha256;
use super::io::{HashReader, LIMIT_MSG, LimitReader, sha256_of};
use super::manifest::{
    ArtifactMeta, BundleManifest, MANIFEST_ENTRY, MAX_MANIFEST_BYTES, NEXO_SCHEMA, bundle_path,
    check_rel_bytes, check_rel_path, seal, unescape,
};
use crate::error::{BundleError, Error};
use crate::lock::Mode;
use crate::manifest::artifact::{self, ArtifactEntry, EntryKind, Part};
use crate::manifest::snapshot::{GitMeta, SnapshotInfo, SnapshotRecord, SnapshotStats};
use crate::names::AgentId;
use crate::ops::Progress;
use crate::ops::snapshot::{Commit, commit, store_pages, store_stream};
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::writer::ChunkWriter;
use crate::tree::ContentRef;

/// Default cap on the artifacts a bundle may declare: a manifest claiming more is refused before
/// anything is read (raise it with `ImportRequest::max_bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 40;
/// Tar headers, long-name records, padding and the end marker, per entry and in all.
const ENTRY_OVERHEAD: u64 = 3 * 512;
const ARCHIVE_SLACK: u64 = 1 << 20;

#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ImportRequest {
    pub bundle: PathBuf,
    /// An age identity file, for encrypted bundles.
    pub identity: Option<PathBuf>,
    /// The agent the caller expects; a bundle of another agent is refused unread.
    pub agent: Option<AgentId>,
    pub max_bytes: u64,
}

impl ImportRequest {
    pub fn new(bundle: impl Into<PathBuf>) -> Self {
        Self {
            bundle: bundle.into(),
            identity: None,
            agent: None,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    pub fn identity(mut self, path: impl Into<PathBuf>) -> Self {
        self.identity = Some(path.into());
        self
    }

    pub fn agent(mut self, a: AgentId) -> Self {
        self.agent = Some(a);
        self
    }

    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub snapshot: SnapshotInfo,
    /// The store already held this very snapshot; nothing was added.
    pub already_present: bool,
    /// `memsnap` or `nexo-memory-snapshot` (a bundle without memsnap's section).
    pub written_by: String,
    pub encrypted: bool,
    pub bundle_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Ok,
    Failed,
    NotChecked,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleCheck {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCheck {
    pub path: String,
    pub kind: String,
    pub size_bytes: u64,
    pub status: CheckStatus,
    pub detail: String,
}

/// What `verify-bundle` found: each check on its own line.
#[derive(Debug, Clone, Serialize)]
pub struct BundleVerifyReport {
    pub bundle: PathBuf,
    pub encrypted: bool,
    pub written_by: Option<String>,
    pub snapshot_id: Option<String>,
    pub tenant: Option<String>,
    pub agent: Option<String>,
    pub checks: Vec<BundleCheck>,
    pub artifacts: Vec<ArtifactCheck>,
}

impl BundleVerifyReport {
    /// No check failed (some may not have been possible, e.g. without the identity).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != CheckStatus::Failed)
            && self
                .artifacts
                .iter()
                .all(|a| a.status != CheckStatus::Failed)
    }

    /// Every check ran.
    pub fn complete(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.status != CheckStatus::NotChecked)
    }

    fn check(&mut self, name: &str, status: CheckStatus, detail: impl Into<String>) {
        self.checks.push(BundleCheck {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }
}

/// Where an artifact goes in the snapshot.
#[derive(Clone)]
pub(crate) struct Planned {
    part: Part,
    /// Raw bytes (unescaped).
    path: Vec<u8>,
    /// The name as the manifest gives it, for messages.
    name: String,
    kind: EntryKind,
    mode: u32,
    mtime_ns: i64,
    bundle_path: Option<String>,
}

/// The snapshot's entries as the manifest describes them, checked: safe relative paths, each
/// artifact used exactly once, nothing under a symlink or a file.
pub(crate) fn plan(m: &BundleManifest, bundle: &Path) -> Result<Vec<Planned>, BundleError> {
    let hostile = |entry: &str, reason: &str| BundleError::Hostile {
        bundle: bundle.to_path_buf(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let artifacts: HashMap<&str, &ArtifactMeta> = m
        .all_artifacts()
        .map(|a| (a.path_in_bundle.as_str(), a))
        .collect();
    let mut planned = Vec::new();
    match &m.memsnap {
        Some(x) => {
            for e in &x.entries {
                let part = match e.part.as_str() {
                    "memdir" => Part::Memdir,
                    "sqlite" => Part::Sqlite,
                    "state" => Part::State,
                    _ => return Err(hostile(&e.path, "unknown part")),
                };
                let raw = |s: &str| -> Result<Vec<u8>, BundleError> {
                    match e.escaped {
                        true => unescape(s).ok_or_else(|| hostile(&e.path, "a malformed %-escape")),
                        false => Ok(s.as_bytes().to_vec()),
                    }
                };
                let kind = match (e.kind.as_str(), part) {
                    ("file", Part::Memdir | Part::State) => EntryKind::File,
                    ("dir", Part::Memdir) => EntryKind::Dir,
                    ("symlink", Part::Memdir) => EntryKind::Symlink {
                        target: raw(e.target.as_deref().unwrap_or(""))?,
                    },
                    // Page size and user version come from the bytes when they arrive.
                    ("sqlite", Part::Sqlite) => EntryKind::Sqlite {
                        page_size: 0,
                        user_version: 0,
                        wal: e.wal.unwrap_or(false),
                    },
                    _ => return Err(hostile(&e.path, "entry kind does not fit its part")),
                };
                let has_content = matches!(kind, EntryKind::File | EntryKind::Sqlite { .. });
                let expected = has_content.then(|| {
                    bundle_path(&e.part, &e.path, matches!(kind, EntryKind::Sqlite { .. })).0
                });
                if e.bundle_path != expected {
                    return Err(hostile(
                        &e.path,
                        "its bundle path does not follow the layout",
                    ));
                }
                if let EntryKind::Symlink { target } = &kind
                    && (target.is_empty() || target.contains(&0))
                {
                    return Err(hostile(&e.path, "symlink without a valid target"));
                }
                planned.push(Planned {
                    part,
                    path: raw(&e.path)?,
                    name: e.path.clone(),
                    kind,
                    // A bundle never creates setuid or setgid files.
                    mode: e.mode & 0o1777,
                    mtime_ns: e.mtime_ns,
                    bundle_path: e.bundle_path.clone(),
                });
            }
        }
        None => {
            // nexo-memory-snapshot: files only; folders are implied by paths.
            let mtime_ns = m.created_at_ms.saturating_mul(1_000_000);
            let mut dirs = BTreeSet::new();
            for a in &m.artifacts {
                let p = &a.path_in_bundle;
                let (part, path, kind, mode) = if let Some(r) = p.strip_prefix("memory_files/") {
                    (Part::Memdir, r.to_owned(), EntryKind::File, 0o644)
                } else if let Some(r) = p.strip_prefix("git/") {
                    (Part::Memdir, format!(".git/{r}"), EntryKind::File, 0o644)
                } else if let Some(r) = p.strip_prefix("sqlite/") {
                    let kind = EntryKind::Sqlite {
                        page_size: 0,
                        user_version: 0,
                        wal: false,
                    };
                    (Part::Sqlite, r.to_owned(), kind, 0o644)
                } else if let Some(r) = p.strip_prefix("state/") {
                    (Part::State, r.to_owned(), EntryKind::File, 0)
                } else {
                    return Err(hostile(
                        p,
                        "not under memory_files/, git/, sqlite/ or state/",
                    ));
                };
                if part == Part::Memdir {
                    let mut cur = path.as_str();
                    while let Some((parent, _)) = cur.rsplit_once('/') {
                        dirs.insert(parent.to_owned());
                        cur = parent;
                    }
                }
                planned.push(Planned {
                    part,
                    name: path.clone(),
                    path: path.into_bytes(),
                    kind,
                    mode,
                    mtime_ns,
                    bundle_path: Some(p.clone()),
                });
            }
            planned.extend(dirs.into_iter().map(|d| Planned {
                part: Part::Memdir,
                path: d.clone().into_bytes(),
                name: d,
                kind: EntryKind::Dir,
                mode: 0o755,
                mtime_ns,
                bundle_path: None,
            }));
        }
    }

    let mut keys: BTreeMap<(Part, &[u8]), &EntryKind> = BTreeMap::new();
    let mut used = HashSet::new();
    for p in &planned {
        // The memdir's own folder is the one entry with an empty path.
        let root = p.path.is_empty() && p.part == Part::Memdir && p.kind == EntryKind::Dir;
        if !root {
            check_rel_bytes(&p.path).map_err(|r| hostile(&p.name, &r))?;
        }
        if p.part != Part::Memdir && p.path.contains(&b'/') {
            return Err(hostile(
                &p.name,
                "databases and state documents have no folders",
            ));
        }
        if keys.insert((p.part, p.path.as_slice()), &p.kind).is_some() {
            return Err(hostile(&p.name, "listed twice"));
        }
        if let Some(bp) = &p.bundle_path {
            if !artifacts.contains_key(bp.as_str()) {
                return Err(hostile(
                    bp,
                    "an entry refers to an artifact the manifest lacks",
                ));
            }
            if !used.insert(bp.as_str()) {
                return Err(hostile(bp, "two entries share one artifact"));
            }
        }
    }
    if let Some(a) = artifacts.keys().find(|a| !used.contains(*a)) {
        return Err(hostile(a, "an artifact no entry uses"));
    }
    // Restore writes each path under its parent: a parent that is a symlink or a file would
    // send the write elsewhere.
    for p in planned.iter().filter(|p| p.part == Part::Memdir) {
        let mut cur = p.path.as_slice();
        if m.memsnap.is_some() && !cur.is_empty() && !keys.contains_key(&(Part::Memdir, &b""[..])) {
            return Err(hostile(&p.name, "the memdir folder itself is not listed"));
        }
        while let Some(slash) = cur.iter().rposition(|b| *b == b'/') {
            let parent = &cur[..slash];
            match keys.get(&(Part::Memdir, parent)) {
                Some(EntryKind::Dir) => {}
                Some(_) => {
                    return Err(hostile(&p.name, "lies under a symlink or a file"));
                }
                None if m.memsnap.is_some() => {
                    return Err(hostile(&p.name, "its folder is not listed"));
                }
                None => {}
            }
            cur = parent;
        }
    }
    planned.sort_by(|a, b| (a.part, &a.path).cmp(&(b.part, &b.path)));
    Ok(planned)
}

/// Per-artifact handling while the tar streams.
trait Sink {
    fn artifact(
        &mut self,
        a: &ArtifactMeta,
        target: &Planned,
        r: &mut dyn Read,
    ) -> Result<(), Error>;
}

/// Checks a database artifact's first 100 bytes: its header, page size and WAL flag.
fn db_header(
    r: &mut dyn Read,
    a: &ArtifactMeta,
    bundle: &Path,
) -> Result<([u8; 100], u32, bool), Error> {
    let mut head = [0u8; 100];
    let got =
        crate::fsutil::read_full(r, &mut head).map_err(|e| Error::io(&a.path_in_bundle, e))?;
    let meta = (got == 100)
        .then(|| crate::source::sqlite::parse_header(&head))
        .flatten()
        .filter(|(page, _)| a.size_bytes.is_multiple_of(u64::from(*page)));
    match meta {
        Some((page, wal)) => Ok((head, page, wal)),
        None => Err(BundleError::Damaged {
            bundle: bundle.to_path_buf(),
            what: format!(
                "{} is not a SQLite database (no valid header, or not whole pages)",
                a.path_in_bundle
            ),
        }
        .into()),
    }
}

struct NullSink<'a> {
    bundle: &'a Path,
}

impl Sink for NullSink<'_> {
    fn artifact(&mut self, a: &ArtifactMeta, t: &Planned, r: &mut dyn Read) -> Result<(), Error> {
        // The rest is drained (and hashed) by `read_pass`.
        if matches!(t.kind, EntryKind::Sqlite { .. }) {
            db_header(r, a, self.bundle)?;
        }
        Ok(())
    }
}

struct StoreSink<'a> {
    store: &'a Store,
    w: &'a mut ChunkWriter,
    progress: &'a dyn Progress,
    bundle: &'a Path,
    stored: HashMap<String, (ContentRef, [u8; 32], u64, EntryKind)>,
}

impl Sink for StoreSink<'_> {
    fn artifact(&mut self, a: &ArtifactMeta, t: &Planned, r: &mut dyn Read) -> Result<(), Error> {
        let config = &self.store.config;
        let path = Path::new(&a.path_in_bundle);
        let (content, hash, size, kind) = match &t.kind {
            EntryKind::Sqlite { wal, .. } => {
                let (head, page_size, header_wal) = db_header(r, a, self.bundle)?;
                let user_version = i32::from_be_bytes([head[60], head[61], head[62], head[63]]);
                let chained = io::Cursor::new(head).chain(r);
                let (c, h, s) =
                    store_pages(self.w, config, chained, page_size, path, self.progress)?;
                let kind = EntryKind::Sqlite {
                    page_size,
                    user_version: i64::from(user_version),
                    wal: *wal || header_wal,
                };
                (c, h, s, kind)
            }
            k => {
                let (c, h, s) = store_stream(self.w, config, r, path, self.progress)?;
                (c, h, s, k.clone())
            }
        };
        self.stored
            .insert(a.path_in_bundle.clone(), (content, hash, size, kind));
        Ok(())
    }
}

/// The sibling checksum, if there is one and it holds a SHA-256.
fn read_sibling(bundle: &Path) -> Result<Option<String>, BundleError> {
    let sib = sibling_sha256(bundle);
    match fs::read_to_string(&sib) {
        Ok(s) => {
            let s = s.trim().to_ascii_lowercase();
            if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(Some(s))
            } else {
                Err(BundleError::Damaged {
                    bundle: bundle.to_path_buf(),
                    what: format!("{} does not hold a SHA-256 hex digest", sib.display()),
                })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BundleError::io(&sib, e)),
    }
}

fn file_sha256(bundle: &Path) -> Result<String, BundleError> {
    let f = fs::File::open(bundle).map_err(|e| BundleError::io(bundle, e))?;
    sha256_of(io::BufReader::with_capacity(1 << 20, f), u64::MAX, |_| {})
        .map(|(h, _)| h)
        .map_err(|e| BundleError::io(bundle, e))
}

/// The kind of file at `bundle`, from its first bytes.
fn sniff(bundle: &Path) -> Result<bool, BundleError> {
    if !bundle.is_file() {
        return Err(BundleError::io(
            bundle,
            io::Error::new(io::ErrorKind::NotFound, "no such bundle file"),
        ));
    }
    let mut f = fs::File::open(bundle).map_err(|e| BundleError::io(bundle, e))?;
    let mut head = [0u8; 32];
    let n = crate::fsutil::read_full(&mut f, &mut head).map_err(|e| BundleError::io(bundle, e))?;
    if head[..n].starts_with(AGE_MAGIC) {
        Ok(true)
    } else if head[..n].starts_with(&crate::zstd_frames::MAGIC) {
        Ok(false)
    } else {
        Err(BundleError::NotABundle {
            path: bundle.to_path_buf(),
            reason: "it is neither zstd-compressed nor age-encrypted".into(),
        })
    }
}

struct Outcome {
    manifest: BundleManifest,
    planned: Vec<Planned>,
    bundle_bytes: u64,
}

/// The streaming pass. Structural problems (hostile or unreadable input) are errors; checks
/// that can fail independently (artifact digests, seals, the file hash) go to `report`.
#[allow(clippy::too_many_arguments)]
fn read_pass(
    bundle: &Path,
    identities: Option<&(Identities, PathBuf)>,
    encrypted: bool,
    expect: Option<&AgentId>,
    max_bytes: u64,
    sink: &mut dyn Sink,
    report: &mut BundleVerifyReport,
    expected_sha: Option<&str>,
) -> Result<Outcome, Error> {
    let damaged = |what: String| BundleError::Damaged {
        bundle: bundle.to_path_buf(),
        what,
    };
    let hostile = |entry: &str, reason: String| BundleError::Hostile {
        bundle: bundle.to_path_buf(),
        entry: entry.to_owned(),
        reason,
    };
    let file = fs::File::open(bundle).map_err(|e| BundleError::io(bundle, e))?;
    let (raw, raw_state) = HashReader::new(io::BufReader::with_capacity(1 << 20, file));
    let plain: Box<dyn Read> = if encrypted {
        let ids = identities.ok_or_else(|| BundleError::NeedsIdentity {
            bundle: bundle.to_path_buf(),
        })?;
        let dec = age::Decryptor::new(raw).map_err(|e| damaged(format!("bad age header ({e})")))?;
        if dec.is_scrypt() {
            return Err(BundleError::BadIdentity {
                path: bundle.to_path_buf(),
                message: "the bundle is passphrase-encrypted; memsnap bundles use age recipients"
                    .into(),
            }
            .into());
        }
        match dec.decrypt(ids.0.iter().map(|i| i.as_ref() as &dyn age::Identity)) {
            Ok(r) => Box::new(r),
            Err(age::DecryptError::NoMatchingKeys) => {
                return Err(BundleError::WrongIdentity {
                    bundle: bundle.to_path_buf(),
                    identity: ids.1.clone(),
                }
                .into());
            }
            Err(e) => return Err(damaged(format!("cannot decrypt ({e})")).into()),
        }
    } else {
        Box::new(raw)
    };
    let zdec = zstd::stream::read::Decoder::new(plain)
        .map_err(|e| damaged(format!("not a zstd stream ({e})")))?;
    let (limited, limit) = LimitReader::new(zdec, MAX_MANIFEST_BYTES + ARCHIVE_SLACK);
    let mut archive = tar::Archive::new(limited);
    let io_err = |e: io::Error| -> Error {
        if e.to_string().contains(LIMIT_MSG) {
            hostile(
                "<stream>",
                "the decompressed stream is larger than the manifest declares (a decompression bomb?)"
                    .into(),
            )
            .into()
        } else {
            damaged(format!("cannot read the archive ({e})")).into()
        }
    };
    let mut entries = archive.entries().map_err(io_err)?;

    // The manifest comes first; nothing else is read before it is checked.
    let mut first = entries
        .next()
        .ok_or_else(|| damaged("the archive is empty".into()))?
        .map_err(io_err)?;
    let first_path = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if first_path != MANIFEST_ENTRY || first.header().entry_type() != tar::EntryType::Regular {
        return Err(BundleError::NotABundle {
            path: bundle.to_path_buf(),
            reason: format!("its first entry is {first_path:?}, not manifest.json"),
        }
        .into());
    }
    let msize = first.header().size().map_err(io_err)?;
    if msize > MAX_MANIFEST_BYTES {
        return Err(hostile(
            MANIFEST_ENTRY,
            format!("{msize} bytes, more than any manifest"),
        )
        .into());
    }
    let mut mbytes = Vec::with_capacity(msize as usize);
    (&mut first)
        .take(msize)
        .read_to_end(&mut mbytes)
        .map_err(io_err)?;
    drop(first);
    let manifest = BundleManifest::parse(&mbytes, bundle)?;
    report.written_by = Some(if manifest.memsnap.is_some() {
        "memsnap".into()
    } else {
        "nexo-memory-snapshot".into()
    });
    report.snapshot_id = Some(manifest.snapshot_id.clone());
    report.tenant = Some(manifest.tenant.clone());
    report.agent = Some(manifest.agent_id.clone());
    if let Some(want) = expect
        && (want.tenant() != manifest.tenant || want.agent() != manifest.agent_id)
    {
        return Err(BundleError::AgentMismatch {
            bundle: bundle.to_path_buf(),
            found: format!("{}/{}", manifest.tenant, manifest.agent_id),
            asked: want.to_string(),
        }
        .into());
    }
    let planned = plan(&manifest, bundle)?;
    let seal_ok = seal(&manifest.artifacts) == manifest.bundle_sha256;
    report.check(
        "manifest seal",
        if seal_ok {
            CheckStatus::Ok
        } else {
            CheckStatus::Failed
        },
        if seal_ok {
            "bundle_sha256 matches the artifact digests"
        } else {
            "bundle_sha256 does not match the artifact digests: the manifest was altered"
        },
    );
    if let Some(x) = &manifest.memsnap {
        let ok = seal(&x.extra_artifacts) == x.extra_sha256;
        report.check(
            "memsnap seal",
            if ok {
                CheckStatus::Ok
            } else {
                CheckStatus::Failed
            },
            if ok {
                "memsnap.extra_sha256 matches the extra artifact digests"
            } else {
                "memsnap.extra_sha256 does not match the extra artifact digests: the manifest \
                 was altered"
            },
        );
    }
    let sv = manifest.schema_versions;
    let newer: Vec<String> = [
        ("long_term", sv.long_term),
        ("vector", sv.vector),
        ("concepts", sv.concepts),
        ("compactions", sv.compactions),
    ]
    .iter()
    .filter(|(_, v)| *v > NEXO_SCHEMA)
    .map(|(n, v)| format!("{n} {v}"))
    .collect();
    report.check(
        "schema versions",
        CheckStatus::Ok,
        if newer.is_empty() {
            format!("manifest {}, databases {NEXO_SCHEMA}", sv.manifest)
        } else {
            format!(
                "manifest {}; databases newer than nexo-memory-snapshot 0.1 knows ({}): memsnap \
                 stores databases as they are",
                sv.manifest,
                newer.join(", ")
            )
        },
    );

    // Hostile sizes may add up past u64: saturate, and the limit refuses them.
    let declared = manifest
        .all_artifacts()
        .fold(0u64, |acc, a| acc.saturating_add(a.size_bytes));
    if declared > max_bytes {
        return Err(hostile(
            MANIFEST_ENTRY,
            format!("declares {declared} bytes of artifacts, more than the {max_bytes}-byte limit"),
        )
        .into());
    }
    let count = manifest.all_artifacts().count() as u64;
    let overhead = manifest.all_artifacts().fold(0u64, |acc, a| {
        acc.saturating_add(ENTRY_OVERHEAD + a.path_in_bundle.len() as u64)
    });
    limit.set(
        limit
            .get()
            .saturating_add(declared)
            .saturating_add(overhead)
            .saturating_add(count.saturating_mul(512)),
    );

    let by_path: HashMap<&str, &ArtifactMeta> = manifest
        .all_artifacts()
        .map(|a| (a.path_in_bundle.as_str(), a))
        .collect();
    let targets: HashMap<&str, &Planned> = planned
        .iter()
        .filter_map(|p| p.bundle_path.as_deref().map(|b| (b, p)))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    for entry in entries {
        let mut entry = entry.map_err(io_err)?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| hostile("<entry>", "a name that is not UTF-8".into()))?;
        let ty = entry.header().entry_type();
        if ty != tar::EntryType::Regular {
            let what = match ty {
                tar::EntryType::Symlink => "a symlink".to_owned(),
                tar::EntryType::Link => "a hard link".to_owned(),
                tar::EntryType::Char | tar::EntryType::Block => "a device file".to_owned(),
                tar::EntryType::Fifo => "a FIFO".to_owned(),
                tar::EntryType::Directory => "a directory entry".to_owned(),
                other => format!("an entry of type {:?}", other.as_byte() as char),
            };
            return Err(hostile(&name, format!("{what}; bundles hold regular files only")).into());
        }
        check_rel_path(&name).map_err(|r| hostile(&name, r))?;
        if name == MANIFEST_ENTRY {
            return Err(hostile(&name, "a second manifest".into()).into());
        }
        let Some(a) = by_path.get(name.as_str()) else {
            return Err(hostile(&name, "not listed in the manifest".into()).into());
        };
        if !seen.insert(name.clone()) {
            return Err(hostile(&name, "appears twice in the archive".into()).into());
        }
        // The entry's size (a PAX record may override the header's) and the header's own.
        let size = entry.size();
        let header_size = entry.header().size().map_err(io_err)?;
        if size != a.size_bytes || header_size != size {
            return Err(hostile(
                &name,
                format!(
                    "the archive says {size} bytes, the manifest {}",
                    a.size_bytes
                ),
            )
            .into());
        }
        let Some(target) = targets.get(name.as_str()) else {
            return Err(hostile(&name, "no entry uses it".into()).into());
        };
        let (mut hr, state) = HashReader::new(&mut entry);
        let stored = sink.artifact(a, target, &mut hr);
        // Whatever the sink did, every byte goes through the hash.
        let drained = io::copy(&mut hr, &mut io::sink());
        match (stored, drained) {
            (Err(Error::Io { source, .. }), _) | (Ok(()), Err(source)) => {
                return Err(io_err(source));
            }
            (Err(e), _) => return Err(e),
            (Ok(()), Ok(_)) => {}
        }
        let got = state.hex();
        let ok = got == a.sha256 && state.bytes.get() == a.size_bytes;
        report.artifacts.push(ArtifactCheck {
            path: name.clone(),
            kind: a.kind.clone(),
            size_bytes: a.size_bytes,
            status: if ok {
                CheckStatus::Ok
            } else {
                CheckStatus::Failed
            },
            detail: if ok {
                "SHA-256 matches".into()
            } else {
                format!("SHA-256 {got}, the manifest says {}", a.sha256)
            },
        });
    }
    for a in manifest.all_artifacts() {
        if !seen.contains(&a.path_in_bundle) {
            report.artifacts.push(ArtifactCheck {
                path: a.path_in_bundle.clone(),
                kind: a.kind.clone(),
                size_bytes: a.size_bytes,
                status: CheckStatus::Failed,
                detail: "listed in the manifest but missing from the archive".into(),
            });
        }
    }
    // The rest of the stream: the end-of-archive blocks, then nothing (trailing data would be
    // either damage or something smuggled past the manifest).
    let mut rest = archive.into_inner();
    let trailing = io::copy(&mut rest, &mut io::sink()).map_err(io_err)?;
    if trailing > 64 << 10 {
        return Err(hostile(
            "<stream>",
            format!("{trailing} bytes after the end of the archive"),
        )
        .into());
    }
    drop(rest);
    let file_len = fs::metadata(bundle)
        .map_err(|e| BundleError::io(bundle, e))?
        .len();
    let actual = if raw_state.bytes.get() == file_len {
        raw_state.hex()
    } else {
        file_sha256(bundle)?
    };
    check_file_sha(report, bundle, expected_sha, &actual);
    Ok(Outcome {
        manifest,
        planned,
        bundle_bytes: file_len,
    })
}

/// The "file sha256" check: the file's digest against its `.sha256`.
fn check_file_sha(
    report: &mut BundleVerifyReport,
    bundle: &Path,
    expected: Option<&str>,
    actual: &str,
) {
    let (status, detail) = match expected {
        Some(exp) if exp == actual => (CheckStatus::Ok, "matches the .sha256 file".to_owned()),
        Some(exp) => (
            CheckStatus::Failed,
            format!("the file's SHA-256 is {actual}, the .sha256 file says {exp}"),
        ),
        None => (
            CheckStatus::Failed,
            format!("{} is missing", sibling_sha256(bundle).display()),
        ),
    };
    report.check("file sha256", status, detail);
}

fn new_report(bundle: &Path, encrypted: bool) -> BundleVerifyReport {
    BundleVerifyReport {
        bundle: bundle.to_path_buf(),
        encrypted,
        written_by: None,
        snapshot_id: None,
        tenant: None,
        agent: None,
        checks: Vec::new(),
        artifacts: Vec::new(),
    }
}

/// Checks a bundle on its own. Errors are for bundles that cannot be read at all or are
/// refused; everything else is in the report.
pub(crate) fn verify_bundle(
    bundle: &Path,
    identity: Option<&Path>,
) -> Result<BundleVerifyReport, Error> {
    let encrypted = sniff(bundle)?;
    let expected = read_sibling(bundle)?;
    let mut report = new_report(bundle, encrypted);
    let identities = identity
        .map(|p| load_identities(p).map(|ids| (ids, p.to_path_buf())))
        .transpose()?;
    if encrypted && identities.is_none() {
        check_file_sha(
            &mut report,
            bundle,
            expected.as_deref(),
            &file_sha256(bundle)?,
        );
        for name in ["manifest", "manifest seal", "artifacts", "schema versions"] {
            report.check(
                name,
                CheckStatus::NotChecked,
                "inside the encryption: pass --identity FILE to check",
            );
        }
        return Ok(report);
    }
    let result = read_pass(
        bundle,
        identities.as_ref(),
        encrypted,
        None,
        DEFAULT_MAX_BYTES,
        &mut NullSink { bundle },
        &mut report,
        expected.as_deref(),
    );
    match result {
        Ok(_) => {
            report.checks.insert(
                0,
                BundleCheck {
                    name: "manifest".into(),
                    status: CheckStatus::Ok,
                    detail: "readable, current format, safe paths".into(),
                },
            );
            Ok(report)
        }
        Err(e) => Err(explain(bundle, expected.as_deref(), e)),
    }
}

/// A failure while streaming is most often damage in transit: when the file's hash does not
/// match its `.sha256`, say that first.
fn explain(bundle: &Path, expected: Option<&str>, e: Error) -> Error {
    let Error::Bundle(b) = &e else { return e };
    if !matches!(b, BundleError::Damaged { .. } | BundleError::Hostile { .. }) {
        return e;
    }
    let cause = match b {
        BundleError::Damaged { what, .. } => what.clone(),
        BundleError::Hostile { entry, reason, .. } => format!("{entry}: {reason}"),
        _ => b.to_string(),
    };
    match (expected, file_sha256(bundle)) {
        (Some(exp), Ok(actual)) if exp != actual => BundleError::Damaged {
            bundle: bundle.to_path_buf(),
            what: format!(
                "its SHA-256 does not match the .sha256 file (it changed after it was written), \
                 and reading it failed: {cause}"
            ),
        }
        .into(),
        _ => e,
    }
}

pub(crate) fn import(
    store: &Store,
    req: &ImportRequest,
    progress: &dyn Progress,
) -> Result<ImportReport, Error> {
    let started = Instant::now();
    let bundle = req.bundle.as_path();
    let encrypted = sniff(bundle)?;
    let Some(expected) = read_sibling(bundle)? else {
        return Err(BundleError::MissingChecksum {
            bundle: bundle.to_path_buf(),
            sibling: sibling_sha256(bundle),
        }
        .into());
    };
    let identities = match (&req.identity, encrypted) {
        (Some(p), _) => Some((load_identities(p)?, p.clone())),
        (None, true) => {
            return Err(BundleError::NeedsIdentity {
                bundle: bundle.to_path_buf(),
            }
            .into());
        }
        (None, false) => None,
    };
    let _store_lock = store.lock_store(Mode::Shared)?;
    let mut excluded = HashSet::new();
    for _ in 0..3 {
        match attempt(
            store,
            req,
            encrypted,
            identities.as_ref(),
            &expected,
            &excluded,
            progress,
        ) {
            Ok(Ok(report)) => {
                return Ok(ImportReport {
                    duration_ms: started.elapsed().as_millis() as u64,
                    ..report
                });
            }
            Ok(Err(missing)) => excluded.extend(missing),
            Err(e) => return Err(explain(bundle, Some(&expected), e)),
        }
    }
    Err(crate::error::StoreError::Index {
        path: store.root().join(crate::store::INDEX_FILE),
        message: "chunks the import relies on kept disappearing from the index while it \
                  committed: is another program deleting chunks without memsnap's store lock?"
            .into(),
    }
    .into())
}

type Attempted = Result<ImportReport, Vec<ChunkId>>;

fn attempt(
    store: &Store,
    req: &ImportRequest,
    encrypted: bool,
    identities: Option<&(Identities, PathBuf)>,
    expected: &str,
    excluded: &HashSet<ChunkId>,
    progress: &dyn Progress,
) -> Result<Attempted, Error> {
    let known = crate::ops::snapshot::known_filter(store, excluded)?;
    // Commits early like a snapshot, so that an import's memory does not grow with the bundle.
    let mut w = store.writer(known);
    let mut report = new_report(&req.bundle, encrypted);
    let total = fs::metadata(&req.bundle).map(|m| m.len()).unwrap_or(0);
    progress.start("import", total);
    let mut sink = StoreSink {
        store,
        w: &mut w,
        progress,
        bundle: &req.bundle,
        stored: HashMap::new(),
    };
    let read = read_pass(
        &req.bundle,
        identities,
        encrypted,
        req.agent.as_ref(),
        req.max_bytes,
        &mut sink,
        &mut report,
        Some(expected),
    );
    let stored = std::mem::take(&mut sink.stored);
    // On an error the writer is dropped, which deletes the packs it wrote.
    let outcome = read.and_then(|o| {
        first_failure(&req.bundle, &report)?;
        Ok(o)
    })?;
    let record = build_record(&mut w, store, &outcome, stored)?;
    let pending = w.finish()?;
    let mut record = record;
    record.info.stats.new_chunks = pending.stats.new_chunks;
    record.info.stats.new_raw_bytes = pending.stats.new_raw_bytes;
    record.info.stats.new_stored_bytes = pending.stats.new_stored_bytes;
    record.info.stats.chunks = pending.stats.chunks;
    crate::failpoint::hit("import:before-commit")?;
    let already_present = match commit(store, &pending, &record, None)? {
        Commit::Done => false,
        Commit::Missing(m) => {
            drop(pending);
            return Ok(Err(m));
        }
        Commit::Exists(existing) => {
            drop(pending);
            if existing.manifest != record.manifest {
                return Err(BundleError::SnapshotIdConflict {
                    id: record.info.id.clone(),
                }
                .into());
            }
            record = *existing;
            true
        }
    };
    progress.finish();
    Ok(Ok(ImportReport {
        snapshot: record.info,
        already_present,
        written_by: report.written_by.unwrap_or_default(),
        encrypted,
        bundle_bytes: outcome.bundle_bytes,
        duration_ms: 0,
    }))
}

/// Import is all or nothing: the first failed check is the error.
fn first_failure(bundle: &Path, report: &BundleVerifyReport) -> Result<(), Error> {
    let artifacts = report
        .artifacts
        .iter()
        .filter(|a| a.status == CheckStatus::Failed)
        .map(|a| format!("artifact {}: {}", a.path, a.detail));
    let checks = report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Failed)
        .map(|c| format!("{}: {}", c.name, c.detail));
    match artifacts.chain(checks).next() {
        Some(what) => Err(BundleError::Damaged {
            bundle: bundle.to_path_buf(),
            what,
        }
        .into()),
        None => Ok(()),
    }
}

fn build_record(
    w: &mut ChunkWriter,
    store: &Store,
    o: &Outcome,
    mut stored: HashMap<String, (ContentRef, [u8; 32], u64, EntryKind)>,
) -> Result<SnapshotRecord, Error> {
    let m = &o.manifest;
    let mut entries = Vec::with_capacity(o.planned.len());
    let mut schema_versions = BTreeMap::new();
    for p in &o.planned {
        let (kind, size, hash, content) = match &p.bundle_path {
            Some(bp) => {
                let (c, h, s, kind) = stored.remove(bp).ok_or_else(|| BundleError::Damaged {
                    bundle: PathBuf::new(),
                    what: format!("artifact {bp} was not read"),
                })?;
                if let EntryKind::Sqlite { user_version, .. } = &kind {
                    let name = String::from_utf8_lossy(&p.path);
                    let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(&name);
                    schema_versions.insert(stem.to_owned(), *user_version);
                }
                (kind, s, h, Some(c))
            }
            None => (p.kind.clone(), 0, [0u8; 32], None),
        };
        entries.push(ArtifactEntry {
            part: p.part,
            path: p.path.clone(),
            kind,
            mode: p.mode,
            mtime_ns: p.mtime_ns,
            size,
            hash,
            content,
        });
    }
    let encoded = artifact::encode_entries(&entries)?;
    let (manifest_ref, _, _) = store_stream(
        w,
        &store.config,
        io::Cursor::new(&encoded),
        &store.root().join("<manifest>"),
        &crate::ops::NoProgress,
    )?;
    let absent = match &m.memsnap {
        Some(x) => x.absent.clone(),
        None => [Part::Memdir, Part::Sqlite, Part::State]
            .into_iter()
            .filter(|part| !entries.iter().any(|e| e.part == *part))
            .map(|part| part.name().to_owned())
            .collect(),
    };
    let git = (!m.git.head_oid.is_empty()).then(|| GitMeta {
        head_oid: m.git.head_oid.clone(),
        head_subject: m.git.head_subject.clone(),
        head_author: m.git.head_author.clone(),
        head_ts_ms: m.git.head_ts_ms,
    });
    let info = SnapshotInfo {
        id: m.snapshot_id.clone(),
        tenant: m.tenant.clone(),
        agent: m.agent_id.clone(),
        created_at_ms: m.created_at_ms,
        label: m.label.clone(),
        created_by: m.created_by.clone(),
        parent: None,
        git,
        schema_versions,
        // Where the agent lives on this host is not the bundle's to say: a restore of an
        // imported snapshot goes where the store's agent record or the caller says.
        memdir: String::new(),
        sqlite_dir: String::new(),
        state_dir: String::new(),
        absent,
        artifacts: entries.len() as u64,
        logical_bytes: entries.iter().map(|e| e.size).sum(),
        stats: SnapshotStats {
            bytes_read: o.bundle_bytes,
            ..Default::default()
        },
    };
    Ok(SnapshotRecord {
        info,
        manifest: manifest_ref,
    })
}
