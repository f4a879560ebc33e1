//! Stream adapters shared by export and import: SHA-256 while reading or writing, a hard cap on
//! how much a (possibly hostile) stream may yield, and a reader over a stored artifact.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::sync::{Arc, mpsc};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::store::chunk_id::ChunkId;
use crate::store::pack::{ChunkLoc, FLAG_ZSTD};
use crate::store::reader::PackFiles;
use crate::store::stream::ChunkSource;

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
/// blocked consuming it.
fn prefetch_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
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

/// Reads a stored artifact in order, its chunks read, checked and decompressed ahead of the
/// consumer (in parallel within a batch), so that hashing or compression overlaps the reads.
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
            let read = |(id, loc): &(ChunkId, ChunkLoc)| packs.read_checked(id, loc, verify);
            // On a rayon worker (a small artifact read inline by a parallel caller), read in
            // place: a worker blocked in `install` steals more of its own pool's tasks, each of
            // which would block the same way, until the stack runs out.
            let parts: Result<Vec<_>, _> = if rayon::current_thread_index().is_some() {
                batch.iter().map(read).collect()
            } else {
                prefetch_pool().install(|| batch.par_iter().map(read).collect())
            };
            parts.map_err(|e| e.to_string())
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

/// A stored chunk for the frame writer: whether its bytes are a zstd frame, its length once
/// decompressed, and its bytes as stored.
pub(crate) type StoredChunk = (bool, u32, Vec<u8>);

/// The chunks of a stored artifact as the packs hold them (not decompressed), read ahead.
pub(crate) fn stored_chunks(packs: Arc<PackFiles>, source: ChunkSource) -> ReadAhead<StoredChunk> {
    read_ahead(source, move |batch| {
        batch
            .iter()
            .map(|(id, loc)| {
                packs
                    .read_stored(id, loc)
                    .map(|b| (loc.flags & FLAG_ZSTD != 0, loc.raw_len, b))
                    .map_err(|e| e.to_string())
            })
            .collect()
    })
}

/// SHA-256 and length of a stream, fed to `also` on the way (e.g. a secret scanner).
pub(crate) fn sha256_of(
    mut r: impl Read,
    mut also: impl FnMut(&[u8]),
) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    // Small enough that thousands of small artifacts do not each zero a large buffer.
    let mut buf = vec![0u8; 256 << 10];
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
            let (hex, n) = sha256_of(pieces(), |b| also.extend_from_slice(b)).expect("read");
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
}
