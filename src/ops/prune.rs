//! Prune: free the space of chunks no snapshot references (store-format.md, "Garbage
//! collection"). Under the exclusive store lock: mark every chunk reachable from a snapshot,
//! plan per pack, copy the live chunks of mostly-dead packs into new packs (fsynced), switch the
//! index in one transaction, then delete the old pack files. A crash before the commit leaves
//! the new packs unreferenced; after it, the old ones: either way the next prune deletes packs
//! the index does not name, and no kept snapshot ever lost a chunk.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use super::Progress;
use crate::error::{Error, StoreError};
use crate::lock::Mode;
use crate::store::Store;
use crate::store::chunk_id::ChunkId;
use crate::store::index::{CHUNKS, PACKS};
use crate::store::pack::{ChunkLoc, FLAG_TREE, PackId, PackWriter, unused_bytes};
use crate::store::reader::{ChunkReader, PackFiles};
use crate::tree;

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PruneRequest {
    pub dry_run: bool,
    /// A pack is rewritten when more than this share (percent) of its chunk bytes is unused.
    pub max_unused_percent: f64,
}

impl Default for PruneRequest {
    fn default() -> Self {
        Self {
            dry_run: false,
            max_unused_percent: 10.0,
        }
    }
}

impl PruneRequest {
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }

    pub fn max_unused_percent(mut self, p: f64) -> Self {
        self.max_unused_percent = p;
        self
    }
}

/// The plan, and after execution what was done (the same numbers unless `dry_run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub chunks: u64,
    pub chunks_unused: u64,
    pub packs: u64,
    /// Packs holding only unused chunks: deleted.
    pub packs_deleted: u64,
    /// Packs above the unused threshold: their live chunks copied into new packs.
    pub packs_rewritten: u64,
    /// Pack files the index does not name (left by a crash or a failed import): deleted.
    pub packs_orphaned: u64,
    pub packs_written: u64,
    pub bytes_before: u64,
    /// Bytes of live chunks copied.
    pub bytes_copied: u64,
    pub bytes_freed: u64,
    /// Unused chunk bytes left in packs below the threshold.
    pub bytes_unused_after: u64,
    pub duration_ms: u64,
}

#[derive(Default)]
struct PackUse {
    size: u64,
    /// Chunks the pack file holds (its footer), live or not, indexed or not.
    count: u32,
    live: Vec<(ChunkId, ChunkLoc)>,
    live_bytes: u64,
}

impl PackUse {
    fn unused(&self) -> u64 {
        unused_bytes(self.size, self.count, self.live_bytes)
    }
}

pub(crate) fn prune(
    store: &Store,
    req: &PruneRequest,
    progress: &dyn Progress,
) -> Result<PruneReport, Error> {
    let started = Instant::now();
    // No snapshot, import, export, restore or verify runs meanwhile: they hold it shared.
    let _lock = store.lock_store(Mode::Exclusive)?;
    let mut report = PruneReport {
        dry_run: req.dry_run,
        ..Default::default()
    };

    // Mark: every chunk reachable from a snapshot record.
    let (live, dead, mut packs, demote) = {
        let index = store.index()?;
        let tx = index.begin_read()?;
        let records = super::all_records(&index, &tx)?;
        report.snapshots = records.len() as u64;
        let mut reader = ChunkReader::new(&index, store.packs_dir())?;
        let mut seen = tree::Seen::new();
        let mut manifests = HashSet::new();
        let mut damaged = None;
        for r in &records {
            let mut visit = |id: &ChunkId, _: bool, res: Result<Vec<u8>, StoreError>| {
                if let Err(e) = res {
                    damaged.get_or_insert(format!(
                        "chunk {} of snapshot {}: {e}",
                        id.hex(),
                        r.info.id
                    ));
                }
                Ok(())
            };
            super::mark(&mut reader, r, &mut manifests, &mut seen, &mut visit)?;
        }
        let live = tree::seen_ids(&seen);
        // Ids reached only as data: if their entry says "tree node", the subtree below it may
        // be freed now, so the entry must stop saying so (I3).
        let data_only: HashSet<ChunkId> = seen
            .iter()
            .filter(|(id, is_node)| !is_node && !seen.contains(&(*id, true)))
            .map(|(id, _)| *id)
            .collect();
        drop(seen);
        if let Some(d) = damaged {
            // Marking through a damaged tree would miss what lies below it: deleting then could
            // lose live chunks.
            return Err(StoreError::Index {
                path: store.root().join(crate::store::INDEX_FILE),
                message: format!(
                    "prune refuses a damaged store ({d}); run `memsnap verify --read-data`"
                ),
            }
            .into());
        }
        let mut packs: HashMap<PackId, PackUse> = HashMap::new();
        for (id, rec) in super::pack_records(&index, &tx)? {
            let u = packs.entry(id).or_default();
            u.size = rec.size;
            u.count = rec.chunks;
        }
        let mut dead = Vec::new();
        let mut demote = Vec::new();
        let chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
        for item in index.walk_chunks(&chunks)? {
            let (k, v) = item.map_err(|e| index.err()(e.into()))?;
            let id = ChunkId(*k.value());
            let loc = ChunkLoc::decode(v.value());
            if live.contains(&id) {
                if loc.flags & FLAG_TREE != 0 && data_only.contains(&id) {
                    demote.push((id, loc));
                }
                let usage = packs.entry(loc.pack).or_default();
                usage.live_bytes += u64::from(loc.stored_len);
                usage.live.push((id, loc));
            } else {
                dead.push(id);
            }
        }
        report.chunks = live.len() as u64 + dead.len() as u64;
        (live, dead, packs, demote)
    };
    report.chunks_unused = dead.len() as u64;
    drop(live);

    // Plan per pack; pack files the index does not name are garbage (invariant I5).
    let on_disk = pack_files(store)?;
    let orphans: Vec<_> = on_disk
        .iter()
        .filter(|(id, _)| !packs.contains_key(id))
        .cloned()
        .collect();
    report.packs = packs.len() as u64;
    report.bytes_before = packs.values().map(|p| p.size).sum::<u64>()
        + orphans.iter().map(|(_, size)| size).sum::<u64>();
    report.packs_orphaned = orphans.len() as u64;
    report.bytes_freed = orphans.iter().map(|(_, size)| size).sum();
    let threshold = req.max_unused_percent.clamp(0.0, 100.0) / 100.0;
    let mut delete: Vec<PackId> = Vec::new();
    let mut rewrite: Vec<PackId> = Vec::new();
    for (id, u) in &packs {
        let data = u.live_bytes + u.unused();
        if u.live.is_empty() {
            delete.push(*id);
            report.bytes_freed += u.size;
        } else if data > 0 && u.unused() as f64 / data as f64 > threshold {
            rewrite.push(*id);
            report.bytes_copied += u.live_bytes;
            report.bytes_freed += u.size.saturating_sub(u.live_bytes);
        } else {
            report.bytes_unused_after += u.unused();
        }
    }
    report.packs_deleted = delete.len() as u64;
    report.packs_rewritten = rewrite.len() as u64;
    if req.dry_run {
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // Copy the live chunks of the packs to rewrite, checked, as they are stored.
    rewrite.sort();
    let files = PackFiles::new(&store.fs, store.packs_dir());
    let mut moved: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    let mut written: Vec<(PackId, u64, u32)> = Vec::new();
    let mut writer: Option<PackWriter> = None;
    let mut dirs = std::collections::BTreeSet::new();
    let mut new_packs = NewPacks {
        fs: &store.fs,
        paths: Vec::new(),
        kept: false,
    };
    progress.start("prune", report.bytes_copied);
    for id in &rewrite {
        let Some(u) = packs.get_mut(id) else { continue };
        u.live.sort_by_key(|(_, l)| l.offset);
        for (chunk, loc) in &u.live {
            // Read once, checked (decompressed and hashed), copied as stored.
            let stored = files.read_stored(chunk, loc)?;
            files.decode(chunk, loc, stored.clone(), true)?;
            if writer.is_none() {
                let w = PackWriter::create(&store.fs, &store.packs_dir())?;
                dirs.insert(crate::fsutil::parent_of(&w.path));
                new_packs.paths.push(w.path.clone());
                writer = Some(w);
            }
            let Some(w) = writer.as_mut() else { continue };
            let new = w.append(*chunk, loc.raw_len, loc.flags, &stored)?;
            moved.push((*chunk, new));
            if moved.len() == 1 {
                // A crash here leaves a new pack without its footer.
                crate::failpoint::hit("prune:mid-rewrite")?;
            }
            progress.advance(stored.len() as u64);
            if w.full(store.config.pack_target_size)
                && let Some(w) = writer.take()
            {
                let (pid, _, size, count) = w.finish()?;
                written.push((pid, size, count));
            }
        }
    }
    if let Some(w) = writer.take() {
        let (pid, _, size, count) = w.finish()?;
        written.push((pid, size, count));
    }
    for d in &dirs {
        store.fs.sync_dir(d).map_err(|e| StoreError::io(d, e))?;
    }
    store
        .fs
        .sync_dir(&store.packs_dir())
        .map_err(|e| StoreError::io(store.packs_dir(), e))?;
    report.packs_written = written.len() as u64;
    crate::failpoint::hit("prune:before-commit")?;

    // Switch: one transaction moves the live chunks and drops the dead ones with their packs.
    {
        let index = store.index()?;
        let tx = index.begin_write()?;
        {
            let mut chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
            for id in &dead {
                chunks.remove(&id.0).map_err(|e| index.err()(e.into()))?;
            }
            for (id, loc) in &moved {
                chunks
                    .insert(&id.0, &loc.encode())
                    .map_err(|e| index.err()(e.into()))?;
            }
            for (id, loc) in &demote {
                // Moved meanwhile? The moved entry carries the same flags: demote that one.
                let current = moved
                    .iter()
                    .find(|(m, _)| m == id)
                    .map_or(*loc, |(_, l)| *l);
                let data = ChunkLoc {
                    flags: current.flags & !FLAG_TREE,
                    ..current
                };
                chunks
                    .insert(&id.0, &data.encode())
                    .map_err(|e| index.err()(e.into()))?;
            }
            let mut table = tx.open_table(PACKS).map_err(|e| index.err()(e.into()))?;
            for id in delete.iter().chain(&rewrite) {
                table.remove(id.0).map_err(|e| index.err()(e.into()))?;
            }
        }
        crate::store::writer::insert_packs(&index, &tx, &written)?;
        // From here the index may name the new packs, whatever the commit returns.
        new_packs.kept = true;
        if let Err(e) = tx.commit() {
            let e = index.err()(e.into());
            drop(index);
            let probe = written.first().map(|p| p.0.0);
            new_packs.kept = super::commit_visible(store, |tx| match probe {
                Some(id) => Ok(tx.open_table(PACKS)?.get(id)?.is_some()),
                None => Ok(false),
            })
            .unwrap_or(true);
            return Err(e.into());
        }
    }
    crate::failpoint::hit("prune:before-delete")?;

    // The old files are unreferenced now; a crash here leaves them for the next prune.
    let mut touched = std::collections::BTreeSet::new();
    for id in delete
        .iter()
        .chain(&rewrite)
        .chain(orphans.iter().map(|(id, _)| id))
    {
        let path = id.path(&store.packs_dir());
        match store.fs.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path, e).into()),
        }
        touched.insert(crate::fsutil::parent_of(&path));
    }
    for d in &touched {
        store.fs.sync_dir(d).map_err(|e| StoreError::io(d, e))?;
    }
    progress.finish();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The packs a prune writes: deleted if it fails before its commit, since nothing names them.
struct NewPacks<'a> {
    fs: &'a crate::storage::Fs,
    paths: Vec<std::path::PathBuf>,
    kept: bool,
}

impl Drop for NewPacks<'_> {
    fn drop(&mut self) {
        if !self.kept {
            for p in &self.paths {
                let _ = self.fs.remove_file(p);
            }
        }
    }
}

/// Every `packs/<xx>/<id>.pack` file and its size.
pub(crate) fn pack_files(store: &Store) -> Result<Vec<(PackId, u64)>, Error> {
    Ok(crate::store::pack::list_packs(&store.packs_dir()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Memsnap, StoreOptions};
    use crate::names::AgentId;
    use crate::ops::restore::RestoreRequest;
    use crate::ops::snapshot::SnapshotRequest;
    use crate::source::SourceSpec;

    /// A file whose bytes equal a tree node of another file has the node's id. Regression: the
    /// mark phase met that id first as the file's data chunk and skipped the node's subtree, so
    /// prune freed chunks a kept snapshot needed.
    #[test]
    fn a_file_equal_to_a_tree_node_does_not_hide_the_nodes_subtree() -> Result<(), Error> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let agent_dir = tmp.path().join("agent");
        let memdir = agent_dir.join("memdir");
        std::fs::create_dir_all(&memdir).map_err(|e| Error::io(&memdir, e))?;
        // Text that does not repeat, so FastCDC cuts it into many chunks under a tree node.
        let mut text = String::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        while text.len() < 400_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(&format!("{x:016x} "));
        }
        std::fs::write(memdir.join("b"), &text).map_err(|e| Error::io("b", e))?;
        let m = Memsnap::create(tmp.path().join("store"), StoreOptions::default())?;
        let id = AgentId::new("acme", "ana")?;
        let req = SnapshotRequest::new(id.clone()).sources(SourceSpec::from_root(&agent_dir));
        let first = m.snapshot(&req)?;

        // b's root node, read from the store.
        let store = Store::open(
            &tmp.path().join("store"),
            std::time::Duration::from_secs(5),
            crate::storage::Fs::default(),
        )?;
        let node = {
            let index = store.index()?;
            let tx = index.begin_read()?;
            let record = crate::ops::resolve(&index, &tx, &first.id, None)?;
            let mut reader = ChunkReader::new(&index, store.packs_dir())?;
            let entries = crate::ops::load_entries(&mut reader, &record)?;
            let b = entries
                .iter()
                .find(|e| e.path == b"b")
                .and_then(|e| e.content)
                .ok_or_else(|| Error::io("b", std::io::Error::other("no content")))?;
            assert!(b.height >= 1, "b is a tree");
            reader.read(&b.root)?
        };
        // `a` sorts before `b`: the walk meets the id as a's data first.
        std::fs::write(memdir.join("a"), &node).map_err(|e| Error::io("a", e))?;
        let second = m.snapshot(&req)?;
        m.delete(&first.id, None)?;
        m.prune(&PruneRequest::default().max_unused_percent(0.0))?;

        let report = m.verify(None, None, true)?;
        assert!(report.ok(), "{report:?}");
        let target = tmp.path().join("restored");
        m.restore(
            &RestoreRequest::new(second.id.as_str())
                .target(&target)
                .pre_snapshot(false),
        )?;
        let back =
            std::fs::read_to_string(target.join("memdir/b")).map_err(|e| Error::io("b", e))?;
        assert_eq!(back, text);

        // Now only `a` uses the id, as data: prune frees b's chunks and the entry must stop
        // claiming a subtree (I3), or a later snapshot of b would trust it for b's children.
        std::fs::remove_file(memdir.join("b")).map_err(|e| Error::io("b", e))?;
        let third = m.snapshot(&req)?;
        m.delete(&second.id, None)?;
        m.prune(&PruneRequest::default().max_unused_percent(0.0))?;
        {
            let index = store.index()?;
            let tx = index.begin_read()?;
            let chunks = tx.open_table(CHUNKS).map_err(|e| index.err()(e.into()))?;
            let id = ChunkId::of(&node);
            let loc = chunks
                .get(&id.0)
                .map_err(|e| index.err()(e.into()))?
                .map(|g| ChunkLoc::decode(g.value()))
                .ok_or_else(|| Error::io("a", std::io::Error::other("a's chunk is gone")))?;
            assert_eq!(
                loc.flags & FLAG_TREE,
                0,
                "a data-only chunk is not a tree node"
            );
        }
        std::fs::write(memdir.join("b"), &text).map_err(|e| Error::io("b", e))?;
        let fourth = m.snapshot(&req)?;
        assert!(m.verify(None, None, true)?.ok());
        let again = tmp.path().join("again");
        m.restore(
            &RestoreRequest::new(fourth.id.as_str())
                .target(&again)
                .pre_snapshot(false),
        )?;
        let back =
            std::fs::read_to_string(again.join("memdir/b")).map_err(|e| Error::io("b", e))?;
        assert_eq!(back, text);
        // b's chunks were freed with the third prune: the fourth snapshot stores them again.
        assert!(
            fourth.stats.new_raw_bytes >= text.len() as u64,
            "{fourth:?}"
        );
        assert!(third.stats.new_raw_bytes < text.len() as u64, "{third:?}");
        Ok(())
    }
}
