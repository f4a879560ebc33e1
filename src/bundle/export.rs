//! Export: a stored snapshot → one `tar.zst` bundle (+ `.sha256`), optionally redacted and
//! age-encrypted. Memory stays bounded: artifacts stream from the packs, once for a plain bundle
//! (its manifest, which comes first and needs every artifact's SHA-256, is written over a
//! stand-in at the end) and twice otherwise (store-format.md, "Bundles").

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::frames::FrameWriter;
use super::io::{HashWriter, OffThread, StoredReader, sha256_of};
use super::manifest::{
    ArtifactMeta, BUNDLE_FORMAT, BundleGit, BundleManifest, EXT_VERSION, EncryptionMeta, EntryMeta,
    MANIFEST_ENTRY, MANIFEST_VERSION, MemsnapSection, RedactionDetail, RedactionReport,
    SchemaVersions, SourcePaths, ToolVersions, bundle_path, escape, known, seal,
};
use super::redact::{Counts, Redactor};
use crate::error::{BundleError, Error};
use crate::fsutil;
use crate::lock::Mode;
use crate::manifest::artifact::{EntryKind, Part};
use crate::names::AgentId;
use crate::ops::Progress;
use crate::storage::{DirectFile, Fs, OpenMode, StorageFile};
use crate::store::Store;
use crate::store::reader::{ChunkReader, PackFiles};
use crate::store::stream::ChunkSource;

/// zstd level for what export compresses itself (tar headers, small files, redacted copies,
/// and everything under `--level`); the old tool's 19 took ~100× longer.
pub const DEFAULT_LEVEL: i32 = 3;
/// A text artifact is redacted in memory; one larger than this is refused rather than shipped.
const MAX_REDACT_BYTES: u64 = 256 << 20;
/// The report's key for secrets found in file names and symlink targets.
const NAMES: &str = "(file names and link targets)";
/// Artifacts above this size are hashed one at a time, each with parallel reads.
const LARGE: u64 = 8 << 20;

#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExportRequest {
    /// A snapshot id, a unique prefix of at least 8 characters, or `latest`.
    pub snapshot: String,
    pub agent: Option<AgentId>,
    pub out: PathBuf,
    /// age X25519 recipients (`age1...`); empty: not encrypted.
    pub recipients: Vec<String>,
    pub redact: bool,
    /// Extra redaction rules (TOML), on top of the built-in ones.
    pub redact_rules: Option<PathBuf>,
    /// Recompress the whole stream at this zstd level (smaller, much slower). `None` reuses
    /// the store's compression of each chunk (see `frames.rs`).
    pub level: Option<i32>,
}

impl ExportRequest {
    pub fn new(snapshot: impl Into<String>, out: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            agent: None,
            out: out.into(),
            recipients: Vec::new(),
            redact: false,
            redact_rules: None,
            level: None,
        }
    }

    pub fn agent(mut self, a: AgentId) -> Self {
        self.agent = Some(a);
        self
    }

    pub fn encrypt_to(mut self, recipient: impl Into<String>) -> Self {
        self.recipients.push(recipient.into());
        self
    }

    pub fn redact(mut self, yes: bool) -> Self {
        self.redact = yes;
        self
    }

    pub fn redact_rules(mut self, path: impl Into<PathBuf>) -> Self {
        self.redact_rules = Some(path.into());
        self
    }

    pub fn level(mut self, level: i32) -> Self {
        self.level = Some(level);
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub bundle: PathBuf,
    pub sha256_file: PathBuf,
    /// SHA-256 of the bundle file (also in `sha256_file`).
    pub sha256: String,
    pub snapshot_id: String,
    pub tenant: String,
    pub agent: String,
    pub artifacts: u64,
    /// Bytes of the artifacts, before compression.
    pub logical_bytes: u64,
    pub bundle_bytes: u64,
    /// Fingerprints (last 8 characters) of the recipients; empty when not encrypted.
    pub encrypted_to: Vec<String>,
    pub redaction: Option<RedactionDetail>,
    pub duration_ms: u64,
}

enum Source {
    Stored(ChunkSource),
    /// A redacted copy in the export's scratch folder.
    File(PathBuf),
}

struct Item {
    meta: ArtifactMeta,
    /// Part of nexo's `artifacts` (else memsnap's `extra_artifacts`).
    nexo: bool,
    rank: u8,
    source: Source,
    /// Bytes to ship.
    size: u64,
    /// The final SHA-256 and length when redaction already had the bytes in hand (for a
    /// two-pass export: one pass hashes every artifact as it writes it).
    digest: Option<(String, u64)>,
}

/// The packs, read through the page cache for small artifacts and past it for large ones
/// (`PackFiles::with_direct_reads`): packs are written past the cache, so an export reads them
/// from the disk, and a 4 GiB agent's first pass through the cache, a chunk per call, took
/// 7.7-12.3 s with 8-13 s of system time (by hand). A direct read waits for the disk, so small
/// artifacts, read a few chunks each, stay cached.
struct Packs {
    cached: Arc<PackFiles>,
    direct: Arc<PackFiles>,
}

impl Packs {
    fn for_item(&self, item: &Item) -> &Arc<PackFiles> {
        match item.size > LARGE {
            true => &self.direct,
            false => &self.cached,
        }
    }
}

impl Item {
    /// `verify`: check each chunk's BLAKE3 (the first pass does; the second reads the same
    /// immutable chunks again).
    fn reader(&self, packs: &Packs, verify: bool) -> io::Result<Box<dyn Read>> {
        Ok(match &self.source {
            Source::Stored(chunks) => Box::new(StoredReader::new(
                packs.for_item(self).clone(),
                chunks.clone(),
                verify,
            )),
            Source::File(p) => Box::new(io::BufReader::new(fs::File::open(p)?)),
        })
    }
}

/// Removes the export's scratch folder and any unfinished bundle, whatever happens.
struct Scratch {
    fs: Fs,
    dir: fsutil::ScratchDir,
    tmp_bundle: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(t) = &self.tmp_bundle {
            let _ = self.fs.remove_file(t);
        }
    }
}

pub(crate) fn sibling_sha256(bundle: &Path) -> PathBuf {
    let mut s = bundle.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

pub(crate) fn export(
    store: &Store,
    req: &ExportRequest,
    progress: &dyn Progress,
) -> Result<ExportReport, Error> {
    let started = Instant::now();
    let recipients = super::crypt::parse_recipients(&req.recipients)?;
    if let Some(level) = req.level.filter(|l| !(1..=22).contains(l)) {
        return Err(BundleError::NotExportable {
            path: req.out.display().to_string(),
            reason: format!("zstd level {level} is not between 1 and 22"),
        }
        .into());
    }
    let redactor = match (req.redact, &req.redact_rules) {
        (false, _) => None,
        (true, None) => Some(Redactor::builtin()),
        (true, Some(p)) => Some(Redactor::with_rules_file(p)?),
    };
    if fs::symlink_metadata(&req.out).is_ok() {
        return Err(BundleError::OutputExists {
            path: req.out.clone(),
        }
        .into());
    }
    let out_dir = fsutil::parent_of(&req.out);
    if !out_dir.is_dir() {
        return Err(BundleError::io(
            &out_dir,
            io::Error::new(io::ErrorKind::NotFound, "the --out folder does not exist"),
        )
        .into());
    }

    // Shared: prune (exclusive) must not remove chunks while they are read.
    let _store_lock = store.lock_store(Mode::Shared)?;
    // The index only while chunk locations are resolved: holding it would make every other
    // process's snapshot wait for the whole export.
    // Large artifacts' locations are resolved a window at a time as they are read.
    let (record, entries, resolved) = {
        let index = store.index_for_reading()?;
        let tx = index.begin_read()?;
        let record = crate::ops::resolve(&index, &tx, &req.snapshot, req.agent.as_ref())?;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        let entries = crate::ops::load_entries(&mut reader, &record)?;
        let contents: Vec<_> = entries.iter().map(|e| e.content.as_ref()).collect();
        let resolved = crate::store::stream::plan(&mut reader, store, &contents)?;
        (record, entries, resolved)
    };
    let packs = Packs {
        cached: Arc::new(PackFiles::new(&store.fs, store.packs_dir())),
        direct: Arc::new(PackFiles::new(&store.fs, store.packs_dir()).with_direct_reads()),
    };
    let tmp = store.tmp_dir();
    let mut scratch = Scratch {
        fs: store.fs.clone(),
        dir: fsutil::ScratchDir::create(&store.fs, &tmp, "export")
            .map_err(|e| Error::io(&tmp, e))?,
        tmp_bundle: None,
    };

    let mut detail = redactor.as_ref().map(|r| RedactionDetail {
        rules: r.rule_ids(),
        ..Default::default()
    });
    // A plain bundle is written in one pass (see `write_once`), which hashes every artifact as
    // it writes it; an encrypted or recompressed one needs the digests first. Under --redact,
    // `redact_one` scans every artifact as it will ship.
    let one_pass = recipients.is_empty() && req.level.is_none();
    let mut metas = Vec::with_capacity(entries.len());
    let mut items = Vec::new();
    for (e, chunks) in entries.iter().zip(resolved) {
        // A name that is not UTF-8 travels %-escaped (the manifest is JSON); so does its
        // symlink target, if either is not UTF-8.
        let target_bytes = match &e.kind {
            EntryKind::Symlink { target } => Some(target.clone()),
            _ => None,
        };
        let escaped = std::str::from_utf8(&e.path).is_err()
            || target_bytes
                .as_ref()
                .is_some_and(|t| std::str::from_utf8(t).is_err());
        let text = |b: &[u8]| match escaped {
            true => escape(b),
            false => String::from_utf8_lossy(b).into_owned(),
        };
        let path = text(&e.path);
        if let Some(d) = detail.as_mut()
            && e.part == Part::Memdir
            && (path == ".git" || path.starts_with(".git/"))
        {
            d.git_excluded = true;
            continue;
        }
        // Names and link targets can hold secrets too: a redacted export renames them.
        let mut target = target_bytes.as_deref().map(text);
        let path = match (&redactor, detail.as_mut()) {
            (Some(r), Some(d)) => {
                let mut counts = Counts::new();
                let mut redact = |s: &str| {
                    String::from_utf8_lossy(&r.redact(s.as_bytes(), &mut counts)).into_owned()
                };
                let p = redact(&path);
                target = target.as_deref().map(&mut redact);
                add_counts(d, NAMES, &counts);
                p
            }
            _ => path,
        };
        let part = e.part.name();
        let wal = match &e.kind {
            EntryKind::Sqlite { wal, .. } => Some(*wal),
            _ => None,
        };
        let is_db = matches!(e.kind, EntryKind::Sqlite { .. });
        let mut bundle_at = None;
        if let Some(chunks) = chunks {
            let (bp, kind) = bundle_path(part, &path, is_db);
            let red = match &redactor {
                None => Redacted {
                    source: Source::Stored(chunks),
                    counts: Counts::new(),
                    digest: None,
                },
                Some(r) => redact_one(
                    r,
                    &packs.cached,
                    chunks,
                    is_db,
                    &bp,
                    &scratch.dir.path,
                    items.len(),
                    !one_pass,
                )?,
            };
            if let Some(d) = detail.as_mut() {
                add_counts(d, &bp, &red.counts);
            }
            let size = match &red.source {
                Source::Stored(chunks) => chunks.size(),
                Source::File(p) => fs::metadata(p).map_err(|e| Error::io(p, e))?.len(),
            };
            items.push(Item {
                meta: ArtifactMeta {
                    path_in_bundle: bp.clone(),
                    kind: kind
                        .map(str::to_owned)
                        .unwrap_or_else(|| if is_db { "sqlite" } else { "state" }.to_owned()),
                    size_bytes: 0,
                    sha256: String::new(),
                },
                nexo: kind.is_some(),
                rank: rank(part, &path),
                source: red.source,
                size,
                digest: red.digest,
            });
            bundle_at = Some(bp);
        }
        metas.push(EntryMeta {
            part: part.to_owned(),
            path,
            kind: e.kind_name().to_owned(),
            mode: e.mode,
            mtime_ns: e.mtime_ns,
            target,
            wal,
            escaped,
            bundle_path: bundle_at,
        });
    }
    items.sort_by(|a, b| (a.rank, &a.meta.path_in_bundle).cmp(&(b.rank, &b.meta.path_in_bundle)));
    if redactor.is_some() {
        let mut seen = std::collections::HashSet::new();
        if let Some(m) = metas
            .iter()
            .find(|m| !seen.insert((m.part.as_str(), m.path.as_str())))
        {
            return Err(BundleError::Redaction {
                artifact: m.path.clone(),
                message: "two names differ only in the secrets they hold, and are the same once \
                          redacted; rename one"
                    .into(),
            }
            .into());
        }
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        items = items.len(),
        "export: planned"
    );

    let total: u64 = items.iter().map(|i| i.size).sum();
    if one_pass {
        for item in &mut items {
            item.meta.sha256 = UNKNOWN_SHA256.to_owned();
            item.meta.size_bytes = item.size;
        }
    } else {
        digests_first(&mut items, &packs, total, progress)?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "export: artifacts hashed"
        );
    }

    let mut label = record.info.label.clone();
    let mut git = record
        .info
        .git
        .as_ref()
        .map(|g| BundleGit {
            head_oid: g.head_oid.clone(),
            head_subject: g.head_subject.clone(),
            head_author: g.head_author.clone(),
            head_ts_ms: g.head_ts_ms,
        })
        .unwrap_or_default();
    if let (Some(r), Some(d)) = (&redactor, detail.as_mut()) {
        let mut counts = Counts::new();
        for s in [
            label.as_mut(),
            Some(&mut git.head_subject),
            Some(&mut git.head_author),
        ]
        .into_iter()
        .flatten()
        {
            *s = String::from_utf8_lossy(&r.redact(s.as_bytes(), &mut counts)).into_owned();
        }
        add_counts(d, MANIFEST_ENTRY, &counts);
    }

    let info = &record.info;
    let encrypted_to: Vec<String> = recipients.iter().map(super::crypt::fingerprint).collect();
    // The manifest for the items' digests as they stand (called again by a one-pass write once
    // the digests are known).
    let manifest_of = |items: &[Item]| -> Result<Vec<u8>, Error> {
        let artifacts: Vec<ArtifactMeta> = items
            .iter()
            .filter(|i| i.nexo)
            .map(|i| i.meta.clone())
            .collect();
        let extra: Vec<ArtifactMeta> = items
            .iter()
            .filter(|i| !i.nexo)
            .map(|i| i.meta.clone())
            .collect();
        let manifest = BundleManifest {
            manifest_version: MANIFEST_VERSION,
            bundle_format: BUNDLE_FORMAT.into(),
            snapshot_id: info.id.clone(),
            agent_id: info.agent.clone(),
            tenant: info.tenant.clone(),
            label: label.clone(),
            created_at_ms: info.created_at_ms,
            created_by: info.created_by.clone(),
            schema_versions: SchemaVersions::NEXO,
            git: git.clone(),
            bundle_sha256: seal(&artifacts),
            artifacts,
            redactions: detail.as_ref().map(|d| RedactionReport {
                policy: if req.redact_rules.is_some() {
                    "memsnap:builtin+rules-file".into()
                } else {
                    "memsnap:builtin".into()
                },
                rules_applied: d.per_rule.keys().cloned().collect(),
                matches_redacted: u32::try_from(d.per_rule.values().sum::<u64>())
                    .unwrap_or(u32::MAX),
                artifacts_touched: d.per_artifact.keys().cloned().collect(),
            }),
            encryption: (!recipients.is_empty()).then(|| EncryptionMeta {
                scheme: "age".into(),
                recipients_fingerprint: encrypted_to.clone(),
            }),
            tool_versions: ToolVersions::memsnap(),
            memsnap: Some(MemsnapSection {
                version: EXT_VERSION,
                tool: format!("memsnap {}", env!("CARGO_PKG_VERSION")),
                parent: info.parent.clone(),
                absent: info.absent.clone(),
                schema_versions: info.schema_versions.clone(),
                source: Some(SourcePaths {
                    memdir: info.memdir.clone(),
                    sqlite_dir: info.sqlite_dir.clone(),
                    state_dir: info.state_dir.clone(),
                }),
                extra_sha256: seal(&extra),
                extra_artifacts: extra,
                entries: metas.clone(),
                redaction: detail.clone(),
            }),
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::io(&req.out, io::Error::other(e)))?;
        // The last guard: whatever the manifest carries (names, labels, git subjects, the
        // report), no rule may match in it.
        if let Some(rule) = redactor.as_ref().and_then(|r| r.find_any(&json)) {
            return Err(BundleError::Redaction {
                artifact: MANIFEST_ENTRY.into(),
                message: format!("rule {rule} still matches in the manifest"),
            }
            .into());
        }
        Ok(json)
    };
    let manifest_json = manifest_of(&items)?;

    // Pass 2: write under a temporary name; the bundle and its .sha256 appear only when whole.
    let tmp = fsutil::tmp_name(&req.out);
    scratch.tmp_bundle = Some(tmp.clone());
    let file = store
        .fs
        .open(&tmp, OpenMode::CreateNew { mode: 0o600 })
        .map_err(|e| Error::io(&tmp, e))?;
    progress.start("export: writing", total);
    let (file, sha256, bundle_bytes) = match req.level {
        _ if one_pass => write_once(
            file,
            &tmp,
            &manifest_json,
            &mut items,
            &packs,
            progress,
            manifest_of,
        )?,
        Some(level) => write_bundle(
            file,
            &recipients,
            level,
            &manifest_json,
            &items,
            &packs,
            progress,
        )
        .map_err(|e| Error::io(&tmp, e))?,
        None => (|| {
            let mut fw = FrameWriter::new(open_sink(file, &recipients)?, DEFAULT_LEVEL);
            fw.data(&manifest_entry(&manifest_json)?)?;
            write_items(&mut fw, &items, &packs, progress, None)?;
            close_sink(fw.finish()?)
        })()
        .map_err(|e| Error::io(&tmp, e))?,
    };
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "export: written"
    );
    file.sync().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "export: synced"
    );
    let sibling = sibling_sha256(&req.out);
    // An export that fails leaves nothing: what it made visible before the failure goes again.
    let (mut wrote_sibling, mut renamed) = (false, false);
    let published = (|| -> Result<(), Error> {
        // Set first: a failed sync of the folder comes after the rename. (A `.sha256` beside no
        // bundle, as one found here would be, is stale anyway.)
        wrote_sibling = true;
        store
            .fs
            .write_atomic(&sibling, sha256.as_bytes(), 0o644)
            .map_err(|e| Error::io(&sibling, e))?;
        crate::failpoint::hit("export:before-rename")?;
        store
            .fs
            .rename(&tmp, &req.out)
            .map_err(|e| Error::io(&req.out, e))?;
        renamed = true;
        scratch.tmp_bundle = None;
        store
            .fs
            .sync_dir(&out_dir)
            .map_err(|e| Error::io(&out_dir, e))
    })();
    if let Err(e) = published {
        if renamed {
            let _ = store.fs.remove_file(&req.out);
        }
        if wrote_sibling {
            let _ = store.fs.remove_file(&sibling);
        }
        return Err(e);
    }
    progress.finish();

    Ok(ExportReport {
        bundle: req.out.clone(),
        sha256_file: sibling,
        sha256,
        snapshot_id: info.id.clone(),
        tenant: info.tenant.clone(),
        agent: info.agent.clone(),
        artifacts: items.len() as u64,
        logical_bytes: items.iter().map(|i| i.meta.size_bytes).sum(),
        bundle_bytes,
        encrypted_to,
        redaction: detail,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Pass 1 of a two-pass export: the digests the manifest needs.
fn digests_first(
    items: &mut [Item],
    packs: &Packs,
    total: u64,
    progress: &dyn Progress,
) -> Result<(), Error> {
    progress.start("export: checksums", total);

    let hash_item = |item: &mut Item| -> Result<(), Error> {
        if let Some((sha, size)) = item.digest.take() {
            progress.advance(size);
            item.meta.sha256 = sha;
            item.meta.size_bytes = size;
            return Ok(());
        }
        let r = item
            .reader(packs, true)
            .map_err(|e| Error::io(&item.meta.path_in_bundle, e))?;
        let (sha, size) = sha256_of(r, item.size, |b| progress.advance(b.len() as u64))
            .map_err(|e| Error::io(&item.meta.path_in_bundle, e))?;
        item.meta.sha256 = sha;
        item.meta.size_bytes = size;
        Ok(())
    };
    // Large artifacts one at a time (their reads are parallel behind the hashing thread).
    let (large, small): (Vec<&mut Item>, Vec<&mut Item>) =
        items.iter_mut().partition(|i| i.size > LARGE);
    // Beside them on the pool, the many small ones: the large ones' SHA-256 is one thread's.
    let (large, small) = rayon::join(
        || large.into_iter().try_for_each(hash_item),
        || small.into_par_iter().try_for_each(hash_item),
    );
    large?;
    small?;
    progress.finish();
    Ok(())
}

/// Bundle order, as nexo-memory-snapshot writes it: databases, state, memory files, git.
fn rank(part: &str, path: &str) -> u8 {
    match part {
        "sqlite" => known(part, path).map_or(4, |(i, _)| i as u8),
        "state" => known(part, path).map_or(7, |(i, _)| 5 + i as u8),
        _ if path.starts_with(".git/") => 9,
        _ => 8,
    }
}

fn add_counts(d: &mut RedactionDetail, artifact: &str, counts: &Counts) {
    let counts: Counts = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    if counts.is_empty() {
        return;
    }
    for (rule, n) in &counts {
        *d.per_rule.entry(rule.clone()).or_default() += n;
    }
    let slot = d.per_artifact.entry(artifact.to_owned()).or_default();
    for (rule, n) in counts {
        *slot.entry(rule).or_default() += n;
    }
}

/// One artifact as a redacted export ships it.
struct Redacted {
    source: Source,
    counts: Counts,
    digest: Option<(String, u64)>,
}

/// Redacts one artifact into the scratch folder (databases always: their free pages may hold
/// deleted secrets, which only a rewrite clears). The result has been scanned for secrets as it
/// will ship (`redact_database` scans the file it leaves); with `digest`, a text artifact's
/// digest is taken here, while its bytes are in memory.
#[allow(clippy::too_many_arguments)]
fn redact_one(
    r: &Redactor,
    packs: &Arc<PackFiles>,
    chunks: ChunkSource,
    is_db: bool,
    bundle_path: &str,
    scratch: &Path,
    n: usize,
    digest: bool,
) -> Result<Redacted, Error> {
    let mut counts = Counts::new();
    let tmp = scratch.join(format!("{n}"));
    if is_db {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        io::copy(&mut StoredReader::new(packs.clone(), chunks, true), &mut f)
            .map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        r.redact_database(&tmp, &mut counts)?;
        return Ok(Redacted {
            source: Source::File(tmp),
            counts,
            digest: None,
        });
    }
    let size = chunks.size();
    if size > MAX_REDACT_BYTES {
        return Err(BundleError::Redaction {
            artifact: bundle_path.to_owned(),
            message: format!(
                "{size} bytes is more than the {MAX_REDACT_BYTES} bytes memsnap redacts in memory"
            ),
        }
        .into());
    }
    let mut data = Vec::with_capacity(size as usize);
    StoredReader::new(packs.clone(), chunks.clone(), true)
        .read_to_end(&mut data)
        .map_err(|e| Error::io(bundle_path, e))?;
    let (source, shipped) = match r.redact(&data, &mut counts) {
        std::borrow::Cow::Borrowed(_) => (
            Source::Stored(chunks),
            std::borrow::Cow::Borrowed(&data[..]),
        ),
        std::borrow::Cow::Owned(v) => {
            fs::write(&tmp, &v).map_err(|e| Error::io(&tmp, e))?;
            (Source::File(tmp), std::borrow::Cow::Owned(v))
        }
    };
    if let Some(rule) = r.find_any(&shipped) {
        return Err(BundleError::Redaction {
            artifact: bundle_path.to_owned(),
            message: format!("rule {rule} still matches after redaction"),
        }
        .into());
    }
    use sha2::Digest;
    let digest = digest.then(|| {
        (
            hex::encode(sha2::Sha256::digest(&shipped)),
            shipped.len() as u64,
        )
    });
    Ok(Redacted {
        source,
        counts,
        digest,
    })
}

/// The bundle file, its SHA-256 and its write calls each on a thread of their own; the file
/// written past the page cache where the storage allows.
type Output = OffThread<HashWriter<OffThread<DirectFile>>>;

/// The byte sink under the compressor: the file, through age when encrypting.
enum Sink {
    Plain(Output),
    Age(age::stream::StreamWriter<Output>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Age(w) => w.flush(),
        }
    }
}

fn header(size: u64) -> tar::Header {
    // As nexo-memory-snapshot writes them: GNU headers, mode 0600, mtime 0, no owner.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// The sink under the compressor, plain or through age.
fn open_sink(
    file: Box<dyn StorageFile>,
    recipients: &[age::x25519::Recipient],
) -> io::Result<Sink> {
    let hashed = OffThread::new(HashWriter::new(OffThread::new(DirectFile::new(file))?))?;
    if recipients.is_empty() {
        return Ok(Sink::Plain(hashed));
    }
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| io::Error::other(format!("age: {e}")))?;
    Ok(Sink::Age(enc.wrap_output(hashed)?))
}

fn close_sink(sink: Sink) -> io::Result<(Box<dyn StorageFile>, String, u64)> {
    let hashed = match sink {
        Sink::Plain(h) => h,
        Sink::Age(w) => w.finish()?,
    };
    let (file, sha, bytes) = hashed.finish()?.finish();
    Ok((file.finish()?.finish()?, sha, bytes))
}

/// A tar header (with GNU long-name records when the path needs them) for `size` bytes.
fn header_bytes(path: &str, size: u64) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    // No data follows here, so the builder writes the header records only.
    b.append_data(&mut header(size), path, io::empty())?;
    Ok(std::mem::take(b.get_mut()))
}

fn padding(size: u64) -> &'static [u8] {
    const ZEROS: [u8; 512] = [0; 512];
    &ZEROS[..((512 - size % 512) % 512) as usize]
}

/// Below this size a chunk the store kept raw is gathered with the compressible bytes: tiny
/// chunks are raw because they are tiny, not because they are random.
const RAW_FRAME_MIN: usize = 4096;

/// A stand-in for a digest not known yet: a one-pass export's first manifest has the final
/// one's length, as the digests are hex of a fixed length and the sizes are known.
const UNKNOWN_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The manifest's tar records: header, JSON, padding.
fn manifest_entry(manifest: &[u8]) -> io::Result<Vec<u8>> {
    let len = manifest.len() as u64;
    let mut entry = header_bytes(MANIFEST_ENTRY, len)?;
    entry.extend_from_slice(manifest);
    entry.extend_from_slice(padding(len));
    Ok(entry)
}

/// The default plain export, one read of the store: the manifest's records go first as raw
/// frames, with stand-in digests; the artifacts follow, each checked and hashed as it is
/// written; then the manifest, rebuilt by `manifest_of` with the digests, is written over the
/// stand-in (the same length: see [`UNKNOWN_SHA256`]) and the bundle's SHA-256 is taken by
/// reading the file back. Against hashing every artifact in a pass of its own, this reads
/// the file (~0.8 of the artifacts) instead of the packs, and decodes every chunk once.
fn write_once(
    file: Box<dyn StorageFile>,
    tmp: &Path,
    manifest: &[u8],
    items: &mut [Item],
    packs: &Packs,
    progress: &dyn Progress,
    manifest_of: impl Fn(&[Item]) -> Result<Vec<u8>, Error>,
) -> Result<(Box<dyn StorageFile>, String, u64), Error> {
    let io_err = |e| Error::io(tmp, e);
    let stand_in = super::frames::raw(&manifest_entry(manifest).map_err(io_err)?);
    // The artifacts' SHA-256 on a thread of its own, beside the framing: one thread would do
    // both in turn.
    let (written, digests) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(HASH_DEPTH);
        let hasher = s.spawn(move || hash_items(rx));
        let written = (|| {
            let mut out = OffThread::new(DirectFile::new(file))?;
            out.write_all(&stand_in)?;
            let mut fw = FrameWriter::new(out, DEFAULT_LEVEL);
            write_items(&mut fw, items, packs, progress, Some(&tx))?;
            fw.finish()?.finish()?.finish()
        })();
        drop(tx);
        let digests = hasher
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"));
        (written, digests)
    });
    let (file, digests) = (written.map_err(io_err)?, digests.map_err(io_err)?);
    if digests.len() != items.len() {
        return Err(io_err(io::Error::other("an artifact was not hashed")));
    }
    // The bytes hashed are those written, as many as planned: `write_items` counts them, and
    // each chunk's length was checked against its entry.
    for (item, sha) in items.iter_mut().zip(digests) {
        item.meta.sha256 = sha;
    }
    let entry = super::frames::raw(&manifest_entry(&manifest_of(items)?).map_err(io_err)?);
    if entry.len() != stand_in.len() {
        return Err(io_err(io::Error::other(format!(
            "the manifest grew from {} to {} bytes once its digests were known",
            stand_in.len(),
            entry.len()
        ))));
    }
    let len = file.len().map_err(io_err)?;
    write_front(file.as_ref(), &entry, len).map_err(io_err)?;
    tracing::info!(bytes = len, "export: artifacts written, manifest in place");
    progress.finish();
    progress.start("export: bundle checksum", len);
    let sha = super::io::sha256_of_file(file.as_ref(), len, progress).map_err(io_err)?;
    Ok((file, sha, len))
}

/// Writes `bytes` over the start of `file` (of `len` bytes, at least as many) in whole aligned
/// blocks, as a file written past the page cache takes them: the blocks' other bytes are read
/// first.
fn write_front(file: &dyn StorageFile, bytes: &[u8], len: u64) -> io::Result<()> {
    use crate::storage::{DIRECT_ALIGN, aligned_start};
    let end = bytes.len().next_multiple_of(DIRECT_ALIGN);
    let mut buf = Vec::new();
    let at = aligned_start(&mut buf, end);
    let blocks = &mut buf[at..at + end];
    // All of the blocks the file has: a short read would write zeros over what it missed.
    let n = file.read_at(blocks, 0)?;
    if (n as u64) < len.min(end as u64) || n < bytes.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    blocks[..bytes.len()].copy_from_slice(bytes);
    file.write_all_at(blocks, 0)?;
    // The last block went past the end (its tail was zeros the read did not fill).
    if end as u64 > len {
        file.set_len(len)?;
    }
    Ok(())
}

/// Batches of artifact bytes in flight to the hashing thread.
const HASH_DEPTH: usize = 4;

/// What [`write_items`] hands the hashing thread: an artifact's bytes, in order, then its end.
enum ToHash {
    Chunks(Vec<super::io::StoredChunk>),
    Bytes(Vec<u8>),
    End,
}

/// Each artifact's SHA-256, in the order their ends came.
fn hash_items(rx: Receiver<ToHash>) -> Vec<String> {
    use sha2::Digest;
    let mut out = Vec::new();
    let mut sha = sha2::Sha256::new();
    for m in rx {
        match m {
            ToHash::Chunks(batch) => batch.iter().for_each(|c| c.feed(|b| sha.update(b))),
            ToHash::Bytes(b) => sha.update(&b),
            ToHash::End => out.push(hex::encode(sha.finalize_reset())),
        }
    }
    out
}

/// The artifacts' tar records, framed by [`FrameWriter`]: stored chunks copied as they are in
/// the packs. With `hash`, each chunk is checked against its id on the way and each artifact's
/// bytes go to the hashing thread ([`hash_items`]); without, a first pass checked them (the
/// store is immutable under the shared lock).
fn write_items<W: Write>(
    fw: &mut FrameWriter<W>,
    items: &[Item],
    packs: &Packs,
    progress: &dyn Progress,
    hash: Option<&SyncSender<ToHash>>,
) -> io::Result<()> {
    let send = |m: ToHash| match hash.map(|h| h.send(m)) {
        Some(Err(_)) => Err(io::Error::other("the hashing thread stopped")),
        _ => Ok(()),
    };
    for item in items {
        let size = item.meta.size_bytes;
        fw.data(&header_bytes(&item.meta.path_in_bundle, size)?)?;
        let mut written = 0u64;
        match &item.source {
            Source::Stored(chunks) => {
                let mut ahead = super::io::stored_chunks(
                    packs.for_item(item).clone(),
                    chunks.clone(),
                    hash.is_some(),
                );
                while let Some(batch) = ahead.next_batch().map_err(io::Error::other)? {
                    for c in &batch {
                        match c.frame {
                            true => fw.frame(&c.bytes)?,
                            false if c.bytes.len() >= RAW_FRAME_MIN => {
                                fw.incompressible(&c.bytes)?
                            }
                            false => fw.data(&c.bytes)?,
                        }
                        written += u64::from(c.raw_len);
                        progress.advance(u64::from(c.raw_len));
                    }
                    send(ToHash::Chunks(batch))?;
                }
            }
            Source::File(p) => {
                let mut f = fs::File::open(p)?;
                let mut buf = Vec::new();
                loop {
                    // Sized to what is left; a new one per read when it goes to the hashing
                    // thread.
                    let left = size.saturating_sub(written).clamp(4 << 10, 1 << 20) as usize;
                    if hash.is_some() || buf.len() < left {
                        buf = vec![0u8; left];
                    }
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    fw.data(&buf[..n])?;
                    written += n as u64;
                    progress.advance(n as u64);
                    if hash.is_some() {
                        buf.truncate(n);
                        send(ToHash::Bytes(std::mem::take(&mut buf)))?;
                    }
                }
            }
        }
        if written != size {
            return Err(io::Error::other(format!(
                "{}: {written} bytes, the plan said {size}",
                item.meta.path_in_bundle
            )));
        }
        send(ToHash::End)?;
        fw.data(padding(size))?;
    }
    // The end of the archive: two zero records.
    fw.data(&[0u8; 1024])
}

/// zstd's multithreaded jobs for levels up to [`SMALL_JOB_LEVELS`], whose window is at most
/// this large. Its default (4 windows, 8 MiB at level 3) held ~45 MB more at once: `export
/// --level 3` of a 1 GiB agent peaked at 127-132 MB, against 85-89 MB with 2 MiB jobs and a
/// bundle 0.1% larger (4 MiB jobs: 102 MB). Higher levels keep the default: their larger
/// windows are what they are asked for.
const SMALL_JOB_BYTES: u32 = 2 << 20;
const SMALL_JOB_LEVELS: i32 = 6;

fn write_bundle(
    file: Box<dyn StorageFile>,
    recipients: &[age::x25519::Recipient],
    level: i32,
    manifest: &[u8],
    items: &[Item],
    packs: &Packs,
    progress: &dyn Progress,
) -> io::Result<(Box<dyn StorageFile>, String, u64)> {
    let sink = open_sink(file, recipients)?;
    let mut zenc = zstd::stream::write::Encoder::new(sink, level)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    if threads > 1 {
        zenc.multithread(threads)?;
        if level <= SMALL_JOB_LEVELS {
            zenc.set_parameter(zstd::stream::raw::CParameter::JobSize(SMALL_JOB_BYTES))?;
        }
    }
    zenc.include_checksum(true)?;
    let mut tar = tar::Builder::new(zenc);
    tar.append_data(&mut header(manifest.len() as u64), MANIFEST_ENTRY, manifest)?;
    for item in items {
        let r = item.reader(packs, false)?;
        let r = ProgressRead { inner: r, progress };
        tar.append_data(
            &mut header(item.meta.size_bytes),
            &item.meta.path_in_bundle,
            r.take(item.meta.size_bytes),
        )?;
    }
    close_sink(tar.into_inner()?.finish()?)
}

struct ProgressRead<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R: Read> Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
