//! Stream adapters shared by export and import: SHA-256 while reading or writing, a hard cap on
//! how much a (possibly hostile) stream may yield, and a reader over a stored artifact.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::sync::{Arc, mpsc};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::store::chunk_id::ChunkId;
use crate::store::pack::{ChunkLoc, FLAG_ZSTD, FLAGS_ENCODED};
use crate::store::reader::{PackFiles, damaged};
use crate::store::stream::{ChunkSource, PIECE_BYTES, byte_batches};

pub(crate) struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    pub(crate) bytes: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub(crate) fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes per block handed to an [`OffThread`] writer, and blocks in flight.
const OFF_THREAD_BLOCK: usize = 1 << 20;
const OFF_THREAD_DEPTH: usize = 2;

/// A writer whose work (export: the bundle's SHA-256 and the file's write calls, ~40% of its
/// CPU samples) runs on a thread of its own, a block at a time, beside the code producing the
/// bytes. An error of the inner writer is returned by the next call after it happened, and at
/// the latest by [`OffThread::finish`]; dropped unfinished, it waits for the thread.
pub(crate) struct OffThread<W: Write + Send + 'static> {
    block: Vec<u8>,
    full: Option<mpsc::SyncSender<Vec<u8>>>,
    /// Written blocks coming back, so that the steady state allocates nothing.
    empty: mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> OffThread<W> {
    pub(crate) fn new(mut inner: W) -> io::Result<Self> {
        let (full, blocks) = mpsc::sync_channel::<Vec<u8>>(OFF_THREAD_DEPTH);
        let (give_back, empty) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("memsnap-writer".into())
            .spawn(move || {
                for mut b in blocks {
                    inner.write_all(&b)?;
                    b.clear();
                    let _ = give_back.send(b);
                }
                inner.flush()?;
                Ok(inner)
            })?;
        Ok(Self {
            block: Vec::with_capacity(OFF_THREAD_BLOCK),
            full: Some(full),
            empty,
            thread: Some(thread),
        })
    }

    /// Hands the block over; a closed channel means the thread stopped on an error.
    fn send(&mut self) -> io::Result<()> {
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(OFF_THREAD_BLOCK));
        let block = std::mem::replace(&mut self.block, next);
        let sent = match &self.full {
            Some(tx) => tx.send(block).is_ok(),
            None => false,
        };
        match sent {
            true => Ok(()),
            false => Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the writer thread stopped before the end"))),
        }
    }

    /// Closes the channel and waits for the thread: the inner writer, or its error.
    fn join(&mut self) -> io::Result<W> {
        self.full = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked"))),
            None => Err(io::Error::other("the writer failed earlier")),
        }
    }

    /// Writes what is left and returns the inner writer once every byte reached it.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for OffThread<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(OFF_THREAD_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == OFF_THREAD_BLOCK {
            self.send()?;
        }
        Ok(n)
    }

    /// Hands the partial block over without waiting for it to be written ([`finish`] waits).
    ///
    /// [`finish`]: OffThread::finish
    fn flush(&mut self) -> io::Result<()> {
        match self.block.is_empty() {
            true => Ok(()),
            false => self.send(),
        }
    }
}

impl<W: Write + Send + 'static> Drop for OffThread<W> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// SHA-256 of everything read through it. Shared state so that the hash of the raw bundle file
/// can be taken after the decompressor and tar reader that own the reader are done.
pub(crate) struct HashReader<R> {
    inner: R,
    state: Rc<HashState>,
}

#[derive(Default)]
pub(crate) struct HashState {
    hasher: std::cell::RefCell<Sha256>,
    pub(crate) bytes: Cell<u64>,
}

impl HashState {
    pub(crate) fn hex(&self) -> String {
        hex::encode(self.hasher.borrow().clone().finalize())
    }
}

impl<R: Read> HashReader<R> {
    pub(crate) fn new(inner: R) -> (Self, Rc<HashState>) {
        let state = Rc::new(HashState::default());
        (
            Self {
                inner,
                state: state.clone(),
            },
            state,
        )
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.borrow_mut().update(&buf[..n]);
        self.state.bytes.set(self.state.bytes.get() + n as u64);
        Ok(n)
    }
}

/// Fails once more than the limit has been read: a decompression bomb stops at the limit, not
/// at the disk's end. The limit can be raised once the manifest says how much is coming.
pub(crate) struct LimitReader<R> {
    inner: R,
    pub(crate) limit: Rc<Cell<u64>>,
    read: u64,
}

pub(crate) const LIMIT_MSG: &str = "memsnap-bundle-size-limit";

impl<R: Read> LimitReader<R> {
    pub(crate) fn new(inner: R, limit: u64) -> (Self, Rc<Cell<u64>>) {
        let limit = Rc::new(Cell::new(limit));
        (
            Self {
                inner,
                limit: limit.clone(),
                read: 0,
            },
            limit,
        )
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.limit.get().saturating_sub(self.read);
        if left == 0 {
            // One byte more tells a stream that ends exactly at the limit from one that goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(LIMIT_MSG)),
            };
        }
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Bytes per batch the reader thread sends, and batches in flight.
const PREFETCH_BATCH: u64 = 4 << 20;
const PREFETCH_DEPTH: usize = 4;
/// Reader threads of their own: a prefetch must never wait for a pool whose threads are
/// blocked consuming it. Twice the cores, as restore's: a read past the page cache holds its
/// thread until the disk answers.
fn prefetch_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2 * std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name(|i| format!("memsnap-prefetch-{i}"))
            .build()
            .unwrap_or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            })
    })
}

/// Artifacts up to this size are read on the caller's thread.
const SMALL: u64 = 1 << 20;

/// A stored artifact's chunks, read in order in batches of about [`PREFETCH_BATCH`] bytes by
/// `read` (which gets one batch of chunk locations and returns their items), on a thread of its
/// own ahead of the consumer, or at once on the caller's thread when the artifact is small. A
/// large artifact's locations come a window at a time ([`ChunkSource`]).
fn read_ahead<T: Send + 'static>(
    source: ChunkSource,
    read: impl Fn(&[(ChunkId, ChunkLoc)]) -> Result<Vec<T>, String> + Send + 'static,
) -> ReadAhead<T> {
    let (tx, rx) = mpsc::sync_channel(PREFETCH_DEPTH);
    if let ChunkSource::Listed(chunks) = &source
        && source.size() <= SMALL
    {
        // Not worth a thread: one batch and the end, which the channel holds.
        if tx.send(read(chunks).map(Some)).is_ok() {
            let _ = tx.send(Ok(None));
        }
        return ReadAhead { rx, thread: None };
    }
    let thread = std::thread::spawn(move || {
        let mut stream = source.stream();
        loop {
            let batch = match stream.next_batch(PREFETCH_BATCH) {
                Ok(Some(b)) => read(&b),
                Ok(None) => {
                    let _ = tx.send(Ok(None));
                    return;
                }
                Err(e) => Err(e.to_string()),
            };
            let failed = batch.is_err();
            // A send fails only when the consumer was dropped: stop reading.
            if tx.send(batch.map(Some)).is_err() || failed {
                return;
            }
        }
    });
    ReadAhead {
        rx,
        thread: Some(thread),
    }
}

/// The consumer's end of [`read_ahead`]. The reader thread says where the artifact ends: a
/// thread that stops without saying so (a panic) is an error, never a short artifact. Dropped,
/// it stops the thread and waits for it, so that no index session outlives the operation.
pub(crate) struct ReadAhead<T> {
    rx: mpsc::Receiver<Result<Option<Vec<T>>, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T> ReadAhead<T> {
    /// The next batch; `None` at the artifact's end.
    pub(crate) fn next_batch(&mut self) -> Result<Option<Vec<T>>, String> {
        match self.rx.recv() {
            Ok(r) => r,
            Err(_) => Err("the thread reading the store ahead stopped before the end".into()),
        }
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        // Closing the channel fails the thread's next send, which ends it.
        let (_, closed) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, closed));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `read` over the pieces of `batch` (about [`PIECE_BYTES`] each), in parallel on the
/// prefetch pool, or in place on a rayon worker (a small artifact read inline by a parallel
/// caller): a worker blocked in `install` steals more of its own pool's tasks, each of which
/// would block the same way, until the stack runs out.
fn by_pieces<T: Send>(
    batch: &[(ChunkId, ChunkLoc)],
    read: impl Fn(&[(ChunkId, ChunkLoc)]) -> Result<T, StoreError> + Sync + Send,
) -> Result<Vec<T>, String> {
    let pieces: Vec<_> = byte_batches(batch, PIECE_BYTES).collect();
    let parts: Result<Vec<_>, _> = match rayon::current_thread_index() {
        Some(_) => pieces.into_iter().map(read).collect(),
        None => prefetch_pool().install(|| pieces.into_par_iter().map(&read).collect()),
    };
    parts.map_err(|e| e.to_string())
}

/// Reads a stored artifact in order, its chunks read (a call per pack run), checked and
/// decompressed ahead of the consumer, in parallel within a batch, so that hashing or
/// compression overlaps the reads.
pub(crate) struct StoredReader {
    ahead: ReadAhead<Vec<u8>>,
    parts: std::vec::IntoIter<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl StoredReader {
    pub(crate) fn new(packs: Arc<PackFiles>, source: ChunkSource, verify: bool) -> Self {
        let ahead = read_ahead(source, move |batch| {
            by_pieces(batch, |piece| {
                packs.check_sizes(piece)?;
                let len = piece.iter().map(|(_, l)| l.raw_len as usize).sum();
                let mut buf = vec![0u8; len];
                packs.read_into(piece, &mut buf, verify).map(|()| buf)
            })
        });
        Self {
            ahead,
            parts: Vec::new().into_iter(),
            current: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if let Some(next) = self.parts.next() {
                self.current = next;
                self.pos = 0;
                continue;
            }
            if self.done {
                return Ok(0);
            }
            match self.ahead.next_batch().map_err(io::Error::other)? {
                Some(batch) => self.parts = batch.into_iter(),
                None => self.done = true,
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A stored chunk for the frame writer.
pub(crate) struct StoredChunk {
    /// `bytes` is a zstd frame (else the chunk's raw bytes).
    pub(crate) frame: bool,
    /// The chunk's length once decoded.
    pub(crate) raw_len: u32,
    /// As the packs hold it; a plane-coded chunk as a frame of its decoded bytes.
    pub(crate) bytes: Vec<u8>,
    /// Where the decoded bytes of a frame are, when they were asked for.
    plain: Plain,
}

enum Plain {
    /// Not asked for, or `bytes` themselves (not a frame).
    Bytes,
    /// A zstd frame's, decoded.
    Decoded(Vec<u8>),
    /// A plane-coded chunk's: in its frame, around its zero run. Not copied out: a copy beside
    /// every frame was the largest part of an export's peak memory.
    InFrame(crate::store::planes::PlaneSpans),
}

impl StoredChunk {
    /// Hands `f` the chunk's bytes in order: `bytes` unless it is a frame, then what
    /// [`stored_chunks`] decoded (nothing, when it was not asked to check).
    pub(crate) fn feed(&self, mut f: impl FnMut(&[u8])) {
        match (&self.plain, self.frame) {
            (Plain::Decoded(p), _) => f(p),
            (Plain::InFrame(s), _) => s.feed(&self.bytes, f),
            (Plain::Bytes, false) => f(&self.bytes),
            (Plain::Bytes, true) => {}
        }
    }

    /// What [`StoredChunk::feed`] hands on, in one piece: a plane-coded frame's content is
    /// copied out for the time of its BLAKE3 check. (Hashed piece by piece it took ~10% more of
    /// an export's CPU: BLAKE3 takes a page's 1 KiB blocks in parallel only when given whole.)
    fn whole(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.plain {
            Plain::InFrame(spans) => spans.content(&self.bytes).into(),
            Plain::Decoded(p) => p.into(),
            Plain::Bytes if self.frame => (&[][..]).into(),
            Plain::Bytes => (&self.bytes[..]).into(),
        }
    }
}

/// The chunks of a stored artifact as the packs hold them (not decompressed; plane-coded ones as
/// frames), read ahead. With `check`, each is also decoded and checked against its BLAKE3 id,
/// its content kept beside it: for an export that reads the store once.
pub(crate) fn stored_chunks(
    packs: Arc<PackFiles>,
    source: ChunkSource,
    check: bool,
) -> ReadAhead<StoredChunk> {
    read_ahead(source, move |batch| {
        let pieces = by_pieces(batch, |piece| {
            let stored = packs.read_stored_runs(piece)?;
            // `read_stored_runs` gives one buffer per chunk asked for, or an error.
            debug_assert_eq!(stored.len(), piece.len());
            piece
                .iter()
                .zip(stored)
                .map(|((id, loc), b)| {
                    let raw_len = loc.raw_len;
                    let (frame, bytes, plain) = match loc.flags & FLAGS_ENCODED {
                        0 => (false, b, Plain::Bytes),
                        FLAG_ZSTD if check => {
                            let plain = packs.decoded(id, loc, &b)?;
                            (true, b, Plain::Decoded(plain))
                        }
                        FLAG_ZSTD => (true, b, Plain::Bytes),
                        // A bundle holds zstd frames only: a plane-coded page goes as a frame
                        // of raw blocks and its zero run (store-format.md, "Plane-coded
                        // chunks").
                        _ => {
                            let coded = crate::store::planes::decode_to_frame(&b, raw_len as usize)
                                .map_err(|e| damaged(id, &packs.path(&loc.pack), e.to_string()))?;
                            let crate::store::planes::PlaneFrame { frame, spans } = coded;
                            let plain = match check {
                                true => Plain::InFrame(spans),
                                false => Plain::Bytes,
                            };
                            (true, frame, plain)
                        }
                    };
                    let chunk = StoredChunk {
                        frame,
                        raw_len,
                        bytes,
                        plain,
                    };
                    if check {
                        // As `read_into` checks them: a raw chunk of another length than its
                        // entry says would put the tar stream out of step.
                        packs.check(id, loc, &chunk.whole(), true)?;
                    }
                    Ok(chunk)
                })
                .collect::<Result<Vec<StoredChunk>, StoreError>>()
        })?;
        Ok(pieces.into_iter().flatten().collect())
    })
}

/// SHA-256 and length of a stream of about `size` bytes, fed to `also` on the way (e.g. a
/// secret scanner).
pub(crate) fn sha256_of(
    mut r: impl Read,
    size: u64,
    mut also: impl FnMut(&[u8]),
) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    // Sized to the stream: a 1 GiB agent's ~4,200 small artifacts each zeroed 256 KiB.
    let len = size.saturating_add(1).clamp(4 << 10, 256 << 10) as usize;
    let mut buf = vec![0u8; len];
    let mut n_total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        also(&buf[..n]);
        n_total += n as u64;
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// Bytes a [`sha256_of_file`] read asks for, and reads in flight.
const READ_BACK_BLOCK: usize = 4 << 20;
const READ_BACK_DEPTH: usize = 2;

/// SHA-256 of the first `len` bytes of `file`, read front to back on a thread of its own ahead
/// of the hashing, past the page cache where the storage allows (a file just written past it
/// is not in the cache, and a cached read would only copy it in).
pub(crate) fn sha256_of_file(
    file: &dyn crate::storage::StorageFile,
    len: u64,
    progress: &dyn crate::ops::Progress,
) -> io::Result<String> {
    use crate::storage::aligned_start;
    file.read_direct();
    std::thread::scope(|s| {
        // Made inside the scope: whichever side stops (or panics) drops its ends, so the other
        // never waits on a channel no one serves.
        let (tx, rx) = mpsc::sync_channel::<io::Result<(Vec<u8>, usize, usize)>>(READ_BACK_DEPTH);
        let (give_back, empty) = mpsc::channel::<Vec<u8>>();
        let reader = s.spawn(move || {
            let mut at = 0u64;
            while at < len {
                let mut buf = empty.try_recv().unwrap_or_default();
                let start = aligned_start(&mut buf, READ_BACK_BLOCK);
                let read = file
                    .read_at(&mut buf[start..start + READ_BACK_BLOCK], at)
                    .and_then(|n| match n {
                        0 => Err(io::ErrorKind::UnexpectedEof.into()),
                        n => Ok(n.min((len - at) as usize)),
                    });
                let failed = read.is_err();
                if let Ok(n) = read {
                    at += n as u64;
                }
                if tx.send(read.map(|n| (buf, start, n))).is_err() || failed {
                    return;
                }
            }
        });
        let mut h = Sha256::new();
        let mut got = 0u64;
        let hashed = (|| {
            while got < len {
                let (buf, start, n) = rx.recv().map_err(|_| {
                    io::Error::other("the thread reading the bundle back stopped")
                })??;
                h.update(&buf[start..start + n]);
                got += n as u64;
                progress.advance(n as u64);
                let _ = give_back.send(buf);
            }
            Ok(())
        })();
        drop(rx);
        let joined = reader
            .join()
            .map_err(|_| io::Error::other("the thread reading the bundle back panicked"));
        hashed.and(joined)?;
        Ok(hex::encode(h.finalize()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields its bytes in pieces of the given sizes (cycled), like a decompressor or a socket.
    struct Pieces<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        i: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let want = self.sizes[self.i % self.sizes.len()].max(1);
            self.i += 1;
            let n = want.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The SHA-256s taken while streaming (reader, writer, `sha256_of`), whatever the
        /// read and write sizes, are the one-shot digest of the whole.
        #[test]
        fn streaming_sha256_is_the_one_shot_digest(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000),
            sizes in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            let one_shot = hex::encode(Sha256::digest(&data));
            let pieces = || Pieces { data: &data, sizes: sizes.clone(), i: 0 };

            let (mut r, state) = HashReader::new(pieces());
            io::copy(&mut r, &mut io::sink()).expect("read");
            proptest::prop_assert_eq!(state.hex(), one_shot.clone());
            proptest::prop_assert_eq!(state.bytes.get(), data.len() as u64);

            let mut w = HashWriter::new(Vec::new());
            let mut rest = data.as_slice();
            for n in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (a, b) = rest.split_at((*n).min(rest.len()));
                w.write_all(a).expect("write");
                rest = b;
            }
            let (out, hex, n) = w.finish();
            proptest::prop_assert_eq!((&out, hex, n), (&data, one_shot.clone(), data.len() as u64));

            let mut also = Vec::new();
            let (hex, n) = sha256_of(pieces(), data.len() as u64, |b| also.extend_from_slice(b)).expect("read");
            proptest::prop_assert_eq!((hex, n), (one_shot, data.len() as u64));
            proptest::prop_assert_eq!(also, data);
        }
    }
}

#[cfg(test)]
mod read_ahead_tests {
    use super::*;
    use crate::store::pack::PackId;

    #[test]
    fn a_reader_thread_that_dies_is_an_error_not_the_end() {
        let loc = ChunkLoc {
            pack: PackId([0; 16]),
            offset: 0,
            stored_len: 1 << 20,
            raw_len: 1 << 20,
            flags: 0,
        };
        // More than SMALL: read on a thread of its own, which panics.
        let source = ChunkSource::Listed(Arc::new(vec![(ChunkId([1; 32]), loc); 3]));
        let mut ahead = read_ahead::<u8>(source, |_| panic!("reader thread dies"));
        assert!(ahead.next_batch().is_err());
    }

    /// A plane-coded chunk goes out as a frame whose content is hashed in place: the bytes fed
    /// on are the page's, and a page that is not its id's is refused naming its pack.
    #[test]
    fn a_plane_coded_chunk_is_checked_and_fed_from_its_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::for_test(dir.path());
        // Floats around a zero run: the frame holds raw blocks on both sides of it.
        let floats = |seed| crate::store::planes::tests::vector_page(seed, 0)[1016..4088].to_vec();
        let (a, b) = (floats(7), floats(8));
        let mut page = a[..1536].to_vec();
        page.resize(2048, 0);
        page.extend_from_slice(&a[1536..]);
        page.extend_from_slice(&b[..512]);
        let (_, chunks, _pending) = crate::tree::store_pages_kept(&store, &[page.clone()]);
        let (id, loc) = chunks[0];
        assert_eq!(loc.flags & FLAGS_ENCODED, crate::store::pack::FLAG_PLANES);
        let packs = Arc::new(PackFiles::new(&store.fs, store.packs_dir()));
        let read = |id: ChunkId| {
            let source = ChunkSource::Listed(Arc::new(vec![(id, loc)]));
            stored_chunks(packs.clone(), source, true).next_batch()
        };

        let batch = read(id).expect("read").expect("a batch");
        let chunk = &batch[0];
        assert!(chunk.frame);
        let mut fed = Vec::new();
        chunk.feed(|b| fed.extend_from_slice(b));
        assert_eq!(fed, page);
        assert_eq!(&*chunk.whole(), &page[..]);

        let Err(err) = read(ChunkId::of(b"another page")) else {
            panic!("a page that is not its id's was read");
        };
        assert!(err.contains("does not match its hash"), "{err}");
        assert!(
            err.contains(&packs.path(&loc.pack).display().to_string()),
            "{err}"
        );
    }
}

#[cfg(test)]
mod off_thread_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Takes `room` bytes, then fails as a full disk does; says when it is dropped.
    struct Disk {
        data: Vec<u8>,
        room: usize,
        dropped: Arc<AtomicBool>,
        panics: bool,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            assert!(!self.panics, "the disk's driver panics");
            if self.data.len() + buf.len() > self.room {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.data.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn disk(room: usize) -> (Disk, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let d = Disk {
            data: Vec::new(),
            room,
            dropped: dropped.clone(),
            panics: false,
        };
        (d, dropped)
    }

    /// 3.5 blocks of numbered bytes, in writes of odd sizes.
    fn write_pattern(w: &mut impl Write) -> io::Result<Vec<u8>> {
        let data: Vec<u8> = (0..OFF_THREAD_BLOCK * 7 / 2)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut rest = data.as_slice();
        for n in [1usize, 4095, 300_001, 7, OFF_THREAD_BLOCK + 3]
            .iter()
            .cycle()
        {
            if rest.is_empty() {
                break;
            }
            let (a, b) = rest.split_at((*n).min(rest.len()));
            w.write_all(a)?;
            rest = b;
        }
        Ok(data)
    }

    #[test]
    fn blocks_reach_the_inner_writer_whole_and_in_order() {
        let (d, _) = disk(usize::MAX);
        let mut w = OffThread::new(HashWriter::new(d)).expect("thread");
        let data = write_pattern(&mut w).expect("write");
        w.flush().expect("flush");
        let (d, hex, n) = w.finish().expect("finish").finish();
        assert_eq!(n, data.len() as u64);
        assert_eq!(hex, hex::encode(Sha256::digest(&data)));
        assert!(d.data == data, "the bytes differ");
    }

    #[test]
    fn the_inner_writers_error_comes_back_and_nothing_hangs() {
        // Fails inside the second block: while the producer is still writing, or at the end.
        let (d, dropped) = disk(OFF_THREAD_BLOCK + 10);
        let mut w = OffThread::new(d).expect("thread");
        let e = match write_pattern(&mut w) {
            Err(e) => e,
            Ok(_) => w.finish().err().expect("a full disk is an error"),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the writer thread still runs"
        );
    }

    #[test]
    fn a_panic_on_the_writer_thread_is_an_error() {
        let (mut d, _) = disk(usize::MAX);
        d.panics = true;
        let mut w = OffThread::new(d).expect("thread");
        w.write_all(b"one block").expect("buffered");
        let e = w.finish().err().expect("the thread panicked");
        assert!(e.to_string().contains("panicked"), "{e}");
    }

    #[test]
    fn dropped_unfinished_it_waits_for_its_thread() {
        let (d, dropped) = disk(usize::MAX);
        let mut w = OffThread::new(d).expect("thread");
        write_pattern(&mut w).expect("write");
        drop(w);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the writer thread outlived the writer"
        );
    }
}
