//! A content's data chunks with their locations, a window at a time: restore and export of an
//! artifact of any size hold at most [`Store::window`] locations (~72 bytes each) instead of one
//! per chunk of the artifact. Each window is found in an index session of its own, on a thread
//! that runs one window ahead, so other processes keep taking turns on the index meanwhile; the
//! caller holds the store lock shared, so no chunk goes away between windows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::Store;
use super::chunk_id::ChunkId;
use super::pack::ChunkLoc;
use super::reader::ChunkReader;
use super::writer::test_knob;
use crate::error::{Error, StoreError};
use crate::tree::{ContentRef, decode_node};

/// Chunk locations held at once by default: 2^18 chunks (1 GiB of 4 KiB pages, ~24 MiB of
/// locations and their sort order), in two windows (see [`FIRST_WINDOW`]). Each window walks
/// the index's chunk table once when it is a good share of it, so a smaller one costs more
/// walks.
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
            Self::Tree { store, content } => {
                ChunkStream::new(Inner::Tree(Ahead::start(store.clone(), *content)))
            }
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
    Tree(Ahead),
}

/// The first window of a content tree: small, so that its reader has chunks to work on after
/// a few thousand lookups rather than a walk of the whole index (~0.55 s for a 1 GiB database).
/// Each next window is twice as large, up to half of [`Store::window`].
const FIRST_WINDOW: usize = 4096;

/// A content tree's windows, found on a thread of their own one window ahead of the caller:
/// the next window's index session and tree reads overlap the caller's work on this one.
/// The thread waits with the window it found until the caller takes it (a rendezvous), so at
/// most two windows are held, each at most half of [`Store::window`]. Dropped, it stops the
/// thread and waits for it: no index session of the stream outlives it (the caller's store
/// lock covers them all, store-format.md, "Locks").
struct Ahead {
    rx: Option<Receiver<Result<Located, Error>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    failed: bool,
}

impl Ahead {
    fn start(store: Store, content: ContentRef) -> Self {
        let (tx, rx) = sync_channel(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let root = store.root().to_path_buf();
        let thread = std::thread::Builder::new()
            .name("memsnap-windows".into())
            .spawn(move || find_windows(&store, Cursor::new(content), &tx, &stopped));
        let (rx, thread) = match thread {
            Ok(t) => (rx, Some(t)),
            // No thread to be had: the first call reports it.
            Err(e) => {
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(Error::io(&root, e)));
                (rx, None)
            }
        };
        Self {
            rx: Some(rx),
            thread,
            stop,
            failed: false,
        }
    }

    fn next(&mut self) -> Result<Option<Located>, Error> {
        if self.failed {
            return Err(StoreError::CorruptRecord {
                what: "content tree".into(),
                message: "an earlier window of it failed".into(),
            }
            .into());
        }
        let Some(rx) = &self.rx else {
            return Ok(None);
        };
        match rx.recv() {
            Ok(Ok(w)) => Ok(Some(w)),
            Ok(Err(e)) => {
                self.failed = true;
                Err(e)
            }
            // The thread ended: after the last window, or in a panic, passed on here.
            Err(_) => {
                self.rx = None;
                if let Some(Err(panic)) = self.thread.take().map(|t| t.join()) {
                    self.failed = true;
                    std::panic::resume_unwind(panic);
                }
                Ok(None)
            }
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A thread waiting to hand a window over sees the channel closed.
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `content`'s windows in order, each located in an index session of its own, until the
/// last, a failure, or the caller's end (`stop`, or the channel closed). The session is closed
/// before each send.
fn find_windows(
    store: &Store,
    mut cursor: Cursor,
    tx: &SyncSender<Result<Located, Error>>,
    stop: &AtomicBool,
) {
    let most = (store.window / 2).max(1);
    let mut size = FIRST_WINDOW.min(most);
    while !cursor.done() && !stop.load(Ordering::Relaxed) {
        let window = (|| -> Result<Located, Error> {
            let index = store.index_for_reading()?;
            let mut reader = ChunkReader::new(&index, store.packs_dir())?;
            let mut chunks = Vec::with_capacity(size);
            cursor.fill(&mut reader, size, &mut chunks)?;
            reader.locate_lists(std::slice::from_mut(&mut chunks))?;
            Ok(Arc::new(chunks))
        })();
        // The cursor has moved past what failed: there is no going on as if the content were
        // whole.
        let failed = window.is_err();
        if tx.send(window).is_err() || failed {
            return;
        }
        size = (size * 2).min(most);
    }
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
            // The spent window goes first: with the one found ahead, two are held at most.
            (self.window, self.pos) = (Arc::new(Vec::new()), 0);
            let next = match &mut self.inner {
                Inner::Listed(l) => l.take(),
                Inner::Tree(ahead) => ahead.next()?,
            };
            match next {
                Some(w) => (self.window, self.pos) = (w, 0),
                None => return Ok(None),
            }
        }
    }
}

/// A place in a depth-first walk of a content tree: the nodes on the path from the root, each
/// with its next child. Bounded by the tree's height times a node's entries.
struct Cursor {
    root: Option<ContentRef>,
    path: Vec<Frame>,
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

    /// A content of 20,000 chunks with the window at 12,000: windows of 4096, then twice as
    /// many up to half the window, on the thread ahead; the stream yields every chunk, in
    /// order, where the writer put it.
    #[test]
    fn windows_grow_from_a_small_first_one_to_half_the_window() {
        use crate::store::writer::{insert_chunks, insert_packs};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::for_test(dir.path());
        store.window = 12_000;
        let pages: Vec<Vec<u8>> = (0..20_000u32).map(|i| i.to_le_bytes().repeat(16)).collect();
        let (content, chunks, pending) = crate::tree::store_pages_kept(&store, &pages);
        let index = store.index().expect("index");
        let tx = index.begin_write().expect("tx");
        insert_chunks(&index, &tx, pending.entries().expect("entries")).expect("insert");
        insert_packs(&index, &tx, &pending.packs).expect("packs");
        tx.commit().expect("commit");
        drop(index);

        let (tx, rx) = sync_channel(0);
        let finder = {
            let store = store.clone();
            let stop = AtomicBool::new(false);
            std::thread::spawn(move || find_windows(&store, Cursor::new(content), &tx, &stop))
        };
        let sizes: Vec<usize> = rx.iter().map(|w| w.expect("window").len()).collect();
        finder
            .join()
            .expect("the finder ends after the last window");
        assert_eq!(sizes, [4096, 6000, 6000, 3904]);

        let source = ChunkSource::Tree { store, content };
        let mut stream = source.stream();
        let mut got = Vec::new();
        while let Some(batch) = stream.next_batch(1 << 20).expect("batch") {
            got.extend(batch);
        }
        assert!(stream.next_batch(1 << 20).expect("after the end").is_none());
        assert_eq!(
            got, chunks,
            "every page's chunk, in order, where the writer put it"
        );

        // Dropped with windows still to come: the drop stops the finder and waits for it, so
        // no index session of the stream is left (the index lock is free at once).
        let mut stream = source.stream();
        assert!(stream.next_batch(4096).expect("a first batch").is_some());
        drop(stream);
        let lock = crate::lock::acquire(
            &dir.path().join("locks").join("index.lock"),
            crate::lock::Mode::Exclusive,
            std::time::Duration::ZERO,
            crate::lock::Holder::Index,
        );
        assert!(lock.is_ok(), "the index lock is free after the drop");
    }

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
