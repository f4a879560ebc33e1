//! A content's data chunks with their locations, a window at a time: restore and export of an
//! artifact of any size hold at most [`Store::window`] locations (~72 bytes each) instead of one
//! per chunk of the artifact. Each window is found in an index session of its own, so other
//! processes keep taking turns on the index meanwhile; the caller holds the store lock shared,
//! so no chunk goes away between windows.

use std::sync::Arc;

use super::Store;
use super::chunk_id::ChunkId;
use super::pack::ChunkLoc;
use super::reader::ChunkReader;
use super::writer::test_knob;
use crate::error::{Error, StoreError};
use crate::tree::{ContentRef, decode_node};

/// Chunk locations held at once by default: 2^18 chunks (1 GiB of 4 KiB pages, ~24 MiB of
/// locations and their sort order). Each window walks the index's chunk table once when it
/// is a good share of it, so a smaller one costs more walks.
pub(crate) const DEFAULT_WINDOW: usize = 1 << 18;

/// A run of a content's data chunks, in order, with their locations.
pub(crate) type Located = Arc<Vec<(ChunkId, ChunkLoc)>>;

/// Where to get a content's chunk list from, as often as needed (export reads an artifact
/// twice): a list resolved up front, for small contents, or the tree itself.
#[derive(Clone)]
pub(crate) enum ChunkSource {
    Listed(Located),
    Tree { store: Store, content: ContentRef },
}

/// Contents up to this size are resolved up front, all in one index session (a memdir's
/// thousands of notes); larger ones a window at a time.
fn listed_max() -> u64 {
    static MAX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| test_knob("MEMSNAP_TEST_LISTED_MAX").unwrap_or(8 << 20))
}

/// At most this many chunks are listed up front in all: a window, but no fewer than 2^16 (a
/// tiny window must not cost a session per note).
fn listed_total(window: usize) -> u64 {
    test_knob("MEMSNAP_TEST_LISTED_TOTAL").unwrap_or((window as u64).max(1 << 16))
}

impl ChunkSource {
    pub(crate) fn size(&self) -> u64 {
        match self {
            Self::Listed(l) => l.iter().map(|(_, loc)| u64::from(loc.raw_len)).sum(),
            Self::Tree { content, .. } => content.size,
        }
    }

    pub(crate) fn stream(&self) -> ChunkStream {
        match self {
            Self::Listed(l) => ChunkStream::new(Inner::Listed(Some(l.clone()))),
            Self::Tree { store, content } => ChunkStream::new(Inner::Tree(Box::new((
                store.clone(),
                Cursor::new(*content),
            )))),
        }
    }
}

/// The windows of one content, in order, and the place in the current one.
pub(crate) struct ChunkStream {
    inner: Inner,
    window: Located,
    pos: usize,
}

enum Inner {
    Listed(Option<Located>),
    Tree(Box<(Store, Cursor)>),
}

impl ChunkStream {
    fn new(inner: Inner) -> Self {
        Self {
            inner,
            window: Arc::new(Vec::new()),
            pos: 0,
        }
    }

    /// The next chunks, located, about `bytes` raw bytes of them (from the current window or
    /// the next); `None` after the last, and on every call after that.
    pub(crate) fn next_batch(
        &mut self,
        bytes: u64,
    ) -> Result<Option<Vec<(ChunkId, ChunkLoc)>>, Error> {
        loop {
            if let Some(batch) = byte_batches(&self.window[self.pos..], bytes).next() {
                self.pos += batch.len();
                return Ok(Some(batch.to_vec()));
            }
            // The spent window goes first: two at once would double the peak.
            (self.window, self.pos) = (Arc::new(Vec::new()), 0);
            match self.next_window()? {
                Some(w) => (self.window, self.pos) = (w, 0),
                None => return Ok(None),
            }
        }
    }

    /// The next run of the content's data chunks, located; `None` after the last.
    fn next_window(&mut self) -> Result<Option<Located>, Error> {
        match &mut self.inner {
            Inner::Listed(l) => Ok(l.take()),
            Inner::Tree(tree) => {
                let (store, cursor) = &mut **tree;
                if cursor.failed {
                    return Err(StoreError::CorruptRecord {
                        what: "content tree".into(),
                        message: "an earlier window of it failed".into(),
                    }
                    .into());
                }
                if cursor.done() {
                    return Ok(None);
                }
                let mut window = || -> Result<Vec<(ChunkId, ChunkLoc)>, Error> {
                    let index = store.index_for_reading()?;
                    let mut reader = ChunkReader::new(&index, store.packs_dir())?;
                    let mut chunks = Vec::new();
                    cursor.fill(&mut reader, store.window.max(1), &mut chunks)?;
                    reader.locate_lists(std::slice::from_mut(&mut chunks))?;
                    Ok(chunks)
                };
                // The cursor has moved past what failed: asked again, it must not go on as if
                // the stream were whole.
                let w = window().inspect_err(|_| cursor.failed = true)?;
                Ok(Some(Arc::new(w)))
            }
        }
    }
}

/// A place in a depth-first walk of a content tree: the nodes on the path from the root, each
/// with its next child. Bounded by the tree's height times a node's entries.
struct Cursor {
    root: Option<ContentRef>,
    path: Vec<Frame>,
    failed: bool,
}

/// A node on the cursor's path: its entries, the next one to visit and their height.
struct Frame {
    children: Vec<(ChunkId, u64)>,
    next: usize,
    height: u8,
}

impl Cursor {
    fn new(root: ContentRef) -> Self {
        Self {
            root: Some(root),
            path: Vec::new(),
            failed: false,
        }
    }

    fn done(&self) -> bool {
        self.root.is_none() && self.path.is_empty()
    }

    /// Appends the next data chunk ids to `out` (not located yet), up to `max` of them, reading
    /// tree nodes on the way (through `reader`, which checks them).
    fn fill(
        &mut self,
        reader: &mut ChunkReader<'_>,
        max: usize,
        out: &mut Vec<(ChunkId, ChunkLoc)>,
    ) -> Result<(), Error> {
        let mut read = |id: &ChunkId, height: u8| -> Result<Frame, Error> {
            Ok(Frame {
                children: decode_node(&reader.read(id)?, height)?,
                next: 0,
                height: height - 1,
            })
        };
        if let Some(root) = self.root.take() {
            if root.height == 0 {
                out.push((root.root, ChunkLoc::UNSET));
            } else {
                self.path.push(read(&root.root, root.height)?);
            }
        }
        while out.len() < max {
            let Some(frame) = self.path.last_mut() else {
                break;
            };
            let Some((id, _)) = frame.children.get(frame.next).copied() else {
                self.path.pop();
                continue;
            };
            frame.next += 1;
            if frame.height == 0 {
                out.push((id, ChunkLoc::UNSET));
            } else {
                let h = frame.height;
                self.path.push(read(&id, h)?);
            }
        }
        // A node's last child taken: leave no spent frame behind, so that `done` is exact.
        while self.path.last().is_some_and(|f| f.next == f.children.len()) {
            self.path.pop();
        }
        Ok(())
    }
}

/// A source for each of `contents`: the small ones resolved here, in `reader`'s session and in
/// one pass over the index (up to about a window of them); the others left to be streamed a
/// window at a time.
pub(crate) fn plan(
    reader: &mut ChunkReader<'_>,
    store: &Store,
    contents: &[Option<&ContentRef>],
) -> Result<Vec<Option<ChunkSource>>, Error> {
    // Listed up to about a window in all (a chunk per 4 KiB at most, a note is one): past that,
    // small contents are streamed too, a session each, so that memory stays bounded.
    let total = listed_total(store.window);
    let mut listed = 0u64;
    let small: Vec<Option<&ContentRef>> = contents
        .iter()
        .map(|c| {
            c.filter(|c| {
                let chunks = c.size.div_ceil(4096).max(1);
                let fits = c.size <= listed_max() && listed + chunks <= total;
                listed += u64::from(fits) * chunks;
                fits
            })
        })
        .collect();
    let listed = reader.resolve_all(&small)?;
    Ok(contents
        .iter()
        .zip(small.iter().zip(listed))
        .map(|(c, (s, list))| match (c, s) {
            (_, Some(_)) => Some(ChunkSource::Listed(Arc::new(list))),
            (Some(c), None) => Some(ChunkSource::Tree {
                store: store.clone(),
                content: **c,
            }),
            (None, None) => None,
        })
        .collect())
}

/// Bytes of chunks that one task of a reading pool reads: each piece is read a call per pack
/// run ([`PackFiles::read_into`](crate::store::reader::PackFiles::read_into)).
pub(crate) const PIECE_BYTES: u64 = 1 << 20;

/// Consecutive runs of `chunks` of about `bytes` raw bytes each.
pub(crate) fn byte_batches(
    chunks: &[(ChunkId, ChunkLoc)],
    bytes: u64,
) -> impl Iterator<Item = &[(ChunkId, ChunkLoc)]> {
    let mut rest = chunks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut sum = 0u64;
        let n = rest
            .iter()
            .position(|(_, l)| {
                sum += u64::from(l.raw_len);
                sum >= bytes
            })
            .map_or(rest.len(), |i| i + 1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window that fails (here: the tree's root is in no pack) fails again when asked once
    /// more, instead of ending the stream as if the content were whole.
    #[test]
    fn a_failed_window_fails_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::for_test(dir.path());
        let source = ChunkSource::Tree {
            store,
            content: ContentRef {
                size: 1 << 20,
                height: 2,
                root: ChunkId([7; 32]),
            },
        };
        let mut stream = source.stream();
        let first = stream
            .next_batch(1 << 20)
            .expect_err("a missing root fails");
        assert!(
            first.to_string().contains(&ChunkId([7; 32]).hex()),
            "{first}"
        );
        let again = stream.next_batch(1 << 20).expect_err("and fails again");
        assert!(again.to_string().contains("earlier window"), "{again}");
    }
}
