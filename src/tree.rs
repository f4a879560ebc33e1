//! Content trees: how an artifact's ordered list of chunks is stored. The list is cut into
//! nodes at boundaries chosen by the children's own ids (like FastCDC over bytes), so an
//! unchanged stretch of a file yields the same nodes and deduplicates, and a changed page dirties
//! one node per level. Nodes are chunks themselves. Format: store-format.md, "Tree nodes".

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::store::chunk_id::ChunkId;
use crate::store::reader::ChunkReader;
use crate::store::writer::{ChunkWriter, Put};

const NODE_VERSION: u8 = 1;
const NODE_HEADER: usize = 6;
const NODE_ENTRY: usize = 40;

/// The root of an artifact's content: height 0 means `root` is the only data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct ContentRef {
    pub size: u64,
    pub height: u8,
    pub root: ChunkId,
}

#[derive(Default)]
struct Level {
    entries: Vec<(ChunkId, u64)>,
    /// Filter hits among `entries`, to confirm unless the node they end up in is itself a hit.
    hits: Vec<ChunkId>,
    /// Some entry is a filter hit or a node left to the final commit: so is this node (I3).
    waits: bool,
    emitted: u64,
}

pub(crate) struct TreeBuilder {
    levels: Vec<Level>,
    fanout: u32,
    max_entries: usize,
}

impl TreeBuilder {
    pub(crate) fn new(fanout: u32, max_entries: u32) -> Self {
        Self {
            levels: vec![Level::default()],
            fanout: fanout.max(2),
            max_entries: max_entries.max(2) as usize,
        }
    }

    /// Appends a data chunk.
    pub(crate) fn push(&mut self, w: &mut ChunkWriter, put: Put) -> Result<(), StoreError> {
        self.push_at(w, 0, put)
    }

    fn push_at(&mut self, w: &mut ChunkWriter, level: usize, put: Put) -> Result<(), StoreError> {
        if self.levels.len() <= level {
            self.levels.push(Level::default());
        }
        let l = &mut self.levels[level];
        l.entries.push((put.id, put.len));
        if put.hit {
            l.hits.push(put.id);
            l.waits = true;
        }
        let cut = u32::from_le_bytes([put.id.0[8], put.id.0[9], put.id.0[10], put.id.0[11]])
            .is_multiple_of(self.fanout);
        if cut || l.entries.len() >= self.max_entries {
            self.close(w, level)?;
        }
        Ok(())
    }

    fn close(&mut self, w: &mut ChunkWriter, level: usize) -> Result<(), StoreError> {
        let l = &mut self.levels[level];
        let entries = std::mem::take(&mut l.entries);
        let hits = std::mem::take(&mut l.hits);
        let waits = std::mem::take(&mut l.waits);
        l.emitted += 1;
        let size = entries.iter().map(|e| e.1).sum();
        let node = encode_node(level as u8 + 1, &entries);
        let (put, early) = w.put_tree_node(node, !waits)?;
        if !put.hit {
            w.confirm_later(hits, level > 0)?;
        }
        if self.levels.len() <= level + 1 {
            self.levels.push(Level::default());
        }
        self.levels[level + 1].waits |= !early;
        self.push_at(
            w,
            level + 1,
            Put {
                id: put.id,
                len: size,
                hit: put.hit,
            },
        )
    }

    pub(crate) fn finish(mut self, w: &mut ChunkWriter) -> Result<ContentRef, StoreError> {
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            let l = &mut self.levels[level];
            if top && l.emitted == 0 && l.entries.len() <= 1 {
                let (root, size) =
                    l.entries
                        .first()
                        .copied()
                        .ok_or_else(|| StoreError::CorruptRecord {
                            what: "content tree".into(),
                            message: "no chunk was written".into(),
                        })?;
                w.confirm_later(std::mem::take(&mut l.hits), level > 0)?;
                return Ok(ContentRef {
                    size,
                    height: level as u8,
                    root,
                });
            }
            if !l.entries.is_empty() {
                self.close(w, level)?;
            }
            level += 1;
        }
    }
}

/// Stores `pages` as one content, a chunk each, as a snapshot would (tests).
#[cfg(test)]
pub(crate) fn store_pages(w: &mut ChunkWriter, pages: &[Vec<u8>]) -> ContentRef {
    let mut t = TreeBuilder::new(4, 16);
    for page in pages {
        let mut batch = crate::store::writer::Batch::default();
        batch.push(page);
        for put in w.put_batch(batch, 0).expect("put") {
            t.push(w, put).expect("push");
        }
    }
    t.finish(w).expect("tree")
}

/// [`store_pages`] in a writer of its own into `store`, its packs kept but not entered in the
/// index (tests): the content, each page's chunk with its location, and the writer's result.
#[cfg(test)]
pub(crate) fn store_pages_kept(
    store: &crate::store::Store,
    pages: &[Vec<u8>],
) -> (
    ContentRef,
    Vec<(ChunkId, crate::store::pack::ChunkLoc)>,
    crate::store::writer::Pending,
) {
    let mut w = ChunkWriter::new(
        &store.fs,
        store.packs_dir(),
        &store.config,
        crate::store::filter::KnownFilter::default(),
    );
    let content = store_pages(&mut w, pages);
    let pending = w.finish().expect("finish");
    pending.keep();
    let chunks = pages
        .iter()
        .map(|p| {
            let id = ChunkId::of(p);
            (id, pending.new_chunks[&id])
        })
        .collect();
    (content, chunks, pending)
}

pub(crate) fn encode_node(level: u8, entries: &[(ChunkId, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NODE_HEADER + entries.len() * NODE_ENTRY);
    out.push(NODE_VERSION);
    out.push(level);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, size) in entries {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&size.to_le_bytes());
    }
    out
}

pub(crate) fn decode_node(
    bytes: &[u8],
    expect_level: u8,
) -> Result<Vec<(ChunkId, u64)>, StoreError> {
    let bad = |m: &str| StoreError::CorruptRecord {
        what: "tree node".into(),
        message: m.to_owned(),
    };
    if bytes.len() < NODE_HEADER || bytes[0] != NODE_VERSION {
        return Err(bad("bad header"));
    }
    if bytes[1] != expect_level {
        return Err(bad("unexpected level"));
    }
    let count = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    if bytes.len() != NODE_HEADER + count * NODE_ENTRY {
        return Err(bad("length does not match its entry count"));
    }
    Ok(bytes[NODE_HEADER..]
        .chunks_exact(NODE_ENTRY)
        .map(|e| {
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            let mut sz = [0u8; 8];
            sz.copy_from_slice(&e[32..40]);
            (ChunkId(id), u64::from_le_bytes(sz))
        })
        .collect())
}

/// Called for each node (`is_data` false) and data chunk of a tree, with its bytes or read error.
pub(crate) type Visitor<'a> =
    dyn FnMut(&ChunkId, bool, Result<Vec<u8>, StoreError>) -> Result<(), StoreError> + 'a;

/// Visits a content tree depth-first in order. `visit(id, is_data, bytes)` gets every node and
/// data chunk; data chunks are read only when `read_data` is set (`bytes` is empty otherwise).
/// A node that cannot be read or decoded goes to `visit` as an error, and its subtree is skipped.
pub(crate) fn walk(
    reader: &mut ChunkReader<'_>,
    content: &ContentRef,
    read_data: bool,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    walk_at(
        reader,
        &content.root,
        content.height,
        read_data,
        None,
        visit,
    )
}

/// What [`walk_unseen`] has visited: (id, is a tree node). A data chunk whose bytes happen to
/// equal a tree node's has the same id; keyed by id alone, meeting it first as data would hide
/// the node's whole subtree from a later walk (and prune would free it).
pub(crate) type Seen = HashSet<(ChunkId, bool)>;

/// The ids in a [`Seen`] set, nodes and data alike.
pub(crate) fn seen_ids(seen: &Seen) -> HashSet<ChunkId> {
    seen.iter().map(|(id, _)| *id).collect()
}

/// Like [`walk`] without data, but skips every node and data chunk already in `seen` (adding
/// the new ones): a subtree shared with an earlier walk is visited once.
pub(crate) fn walk_unseen(
    reader: &mut ChunkReader<'_>,
    content: &ContentRef,
    seen: &mut Seen,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    walk_at(
        reader,
        &content.root,
        content.height,
        false,
        Some(seen),
        visit,
    )
}

/// Like [`walk`] without data, but skips every node of height 2 or more, and every content
/// root, already in `seen` (adding the new ones; keyed like [`Seen`]). A node of height 1 that
/// is not a root is not read but handed to `leaf`, and a data chunk below a new root of height
/// 1 to `visit`, each time a new node lists it: a caller that needs each once sorts and dedups
/// them. Leaves are ~15/16 of the nodes; a set of them grew verify's memory with the store.
pub(crate) fn walk_new_nodes(
    reader: &mut ChunkReader<'_>,
    content: &ContentRef,
    seen: &mut Seen,
    leaf: &mut dyn FnMut(&ChunkId) -> Result<(), StoreError>,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    walk_new_at(reader, content, true, seen, leaf, visit)
}

fn walk_new_at(
    reader: &mut ChunkReader<'_>,
    content: &ContentRef,
    is_root: bool,
    seen: &mut Seen,
    leaf: &mut dyn FnMut(&ChunkId) -> Result<(), StoreError>,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    if content.height == 1 && !is_root {
        return leaf(&content.root);
    }
    // A one-chunk content (most small files) is remembered too: every snapshot lists it again.
    if (content.height > 0 || is_root) && !seen.insert((content.root, content.height > 0)) {
        return Ok(());
    }
    if content.height == 0 {
        return visit(&content.root, true, Ok(Vec::new()));
    }
    let children = match reader
        .read(&content.root)
        .and_then(|b| decode_node(&b, content.height))
    {
        Ok(c) => c,
        Err(e) => return visit(&content.root, false, Err(e)),
    };
    visit(&content.root, false, Ok(Vec::new()))?;
    for (child, size) in children {
        let sub = ContentRef {
            size,
            height: content.height - 1,
            root: child,
        };
        walk_new_at(reader, &sub, false, seen, leaf, visit)?;
    }
    Ok(())
}

fn walk_at(
    reader: &mut ChunkReader<'_>,
    id: &ChunkId,
    height: u8,
    read_data: bool,
    mut seen: Option<&mut Seen>,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    if let Some(seen) = seen.as_deref_mut()
        && !seen.insert((*id, height > 0))
    {
        return Ok(());
    }
    if height == 0 {
        let data = if read_data {
            reader.read(id)
        } else {
            Ok(Vec::new())
        };
        return visit(id, true, data);
    }
    let children = match reader.read(id).and_then(|b| decode_node(&b, height)) {
        Ok(c) => c,
        Err(e) => return visit(id, false, Err(e)),
    };
    visit(id, false, Ok(Vec::new()))?;
    for (child, _) in children {
        walk_at(
            reader,
            &child,
            height - 1,
            read_data,
            seen.as_deref_mut(),
            visit,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::config::StoreConfig;
    use crate::store::filter::KnownFilter;

    fn build(ids: &[ChunkId], w: &mut ChunkWriter) -> ContentRef {
        build_hits(ids, w, |_| false)
    }

    /// A tree over `ids`, those for which `hit` holds pushed as filter hits.
    fn build_hits(
        ids: &[ChunkId],
        w: &mut ChunkWriter,
        hit: impl Fn(&ChunkId) -> bool,
    ) -> ContentRef {
        let mut t = TreeBuilder::new(16, 64);
        for id in ids {
            let put = Put {
                id: *id,
                len: 4096,
                hit: hit(id),
            };
            t.push(w, put).expect("push");
        }
        t.finish(w).expect("finish")
    }

    fn ids(n: usize, salt: u8) -> Vec<ChunkId> {
        (0..n)
            .map(|i| ChunkId::of(&[&(i as u64).to_le_bytes()[..], &[salt]].concat()))
            .collect()
    }

    fn writer(dir: &std::path::Path) -> ChunkWriter {
        writer_knowing(dir, KnownFilter::default())
    }

    fn writer_knowing(dir: &std::path::Path, known: KnownFilter) -> ChunkWriter {
        ChunkWriter::new(
            &crate::storage::Fs::default(),
            dir.to_path_buf(),
            &StoreConfig::new_default(0),
            known,
        )
    }

    /// Reads a finished writer's tree back from its packs, without an index.
    fn flatten(
        packs: &crate::store::reader::PackFiles,
        locs: &std::collections::HashMap<ChunkId, crate::store::pack::ChunkLoc>,
        id: &ChunkId,
        height: u8,
        out: &mut Vec<ChunkId>,
    ) {
        if height == 0 {
            out.push(*id);
            return;
        }
        let loc = locs.get(id).expect("node was written");
        let node = packs.read(id, loc).expect("node reads back");
        let children = decode_node(&node, height).expect("node decodes");
        for (child, _) in children {
            flatten(packs, locs, &child, height - 1, out);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any list of chunks comes back from its tree in order, with the sizes adding up.
        #[test]
        fn tree_round_trips_any_chunk_list(n in 1usize..3000, salt in 0u8..255) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut w = writer(dir.path());
            let list = ids(n, salt);
            let mut t = TreeBuilder::new(16, 64);
            for id in &list {
                t.push(&mut w, Put { id: *id, len: 7, hit: false }).expect("push");
            }
            let root = t.finish(&mut w).expect("finish");
            proptest::prop_assert_eq!(root.size, 7 * n as u64);
            let pending = w.finish().expect("packs");
            let packs = crate::store::reader::PackFiles::new(
                &crate::storage::Fs::default(),
                dir.path().to_path_buf(),
            );
            let mut out = Vec::new();
            flatten(&packs, &pending.new_chunks, &root.root, root.height, &mut out);
            proptest::prop_assert_eq!(out, list);
        }
    }

    #[test]
    fn one_chunk_is_its_own_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        let one = ids(1, 0);
        let r = build(&one, &mut w);
        assert_eq!((r.height, r.root, r.size), (0, one[0], 4096));
    }

    #[test]
    fn a_changed_leaf_dirties_one_node_per_level() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        let a = ids(20_000, 0);
        let ra = build(&a, &mut w);
        let before = w.stats.new_chunks;
        let mut b = a.clone();
        b[12_345] = ChunkId::of(b"changed");
        let rb = build(&b, &mut w);
        assert_ne!(ra.root, rb.root);
        assert_eq!(ra.height, rb.height);
        let new_nodes = w.stats.new_chunks - before;
        // One node per level, plus at most a neighbour where the changed id moved a boundary.
        assert!(
            new_nodes <= 2 * ra.height as u64,
            "{new_nodes} new nodes for height {}",
            ra.height
        );
        // Same input, same tree: nothing new.
        let again = w.stats.new_chunks;
        assert_eq!(build(&b, &mut w), rb);
        assert_eq!(w.stats.new_chunks, again);
    }

    /// Each hit left to confirm says whether it is a tree node (its entry must then be one):
    /// data hits below a changed leaf, sibling nodes of changed ones, a hit root, a reused root.
    #[test]
    fn hits_to_confirm_say_whether_they_are_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        let a = ids(5_000, 1);
        let ra = build(&a, &mut w);
        assert!(ra.height >= 2, "{ra:?}");
        let pending = w.finish().expect("finish");
        let nodes: HashSet<ChunkId> = pending.new_chunks.keys().copied().collect();
        let known = nodes.iter().chain(&a).map(|id| id.prefix()).collect();
        let mut w = writer_knowing(dir.path(), KnownFilter::new(known, HashSet::new()));
        let in_a: HashSet<ChunkId> = a.iter().copied().collect();
        let mut b = a.clone();
        b[2_345] = ChunkId::of(b"changed");
        build_hits(&b, &mut w, |id| in_a.contains(id));
        let confirm = w.confirm_list().to_vec();
        let flags: HashSet<bool> = confirm.iter().map(|e| e.1).collect();
        assert_eq!(flags.len(), 2, "both data and node hits: {}", confirm.len());
        for (id, node) in &confirm {
            assert_eq!(*node, nodes.contains(id), "{id:?}");
        }
        // Unchanged: only the root is left to confirm, as a node; so is a reused root.
        let before = w.confirm_list().len();
        assert_eq!(build_hits(&a, &mut w, |_| true), ra);
        assert_eq!(w.confirm_list()[before..], [(ra.root, true)]);
        w.reuse(&ra).expect("reuse");
        let single = ContentRef { height: 0, ..ra };
        w.reuse(&single).expect("reuse");
        assert_eq!(
            w.confirm_list()[before + 1..],
            [(ra.root, true), (ra.root, false)]
        );
    }
}
