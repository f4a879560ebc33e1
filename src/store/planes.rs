//! The plane codec: a chunk whose every fourth byte is drawn from a small alphabet (a SQLite
//! page of float32 embeddings, whose sign-and-exponent bytes take ~20 values) stored with that
//! byte plane Huffman-coded, its longest zero run cut out and every other byte as it is. The
//! record is in store-format.md ("Plane-coded chunks"); this file is its only encoder and decoder.
//!
//! Per 4 KiB vector page this stores ~0.65 of the page where the zero-run frame stores 0.77:
//! zstd codes all literals of a block with one Huffman table, so the three random planes hide
//! the skew of the fourth (RESULTS.md, run 18). The plane is coded as four interleaved
//! streams so that decoding runs four independent chains of table lookups.

/// First bytes of a plane-coded chunk, then the codec's record version. No tree node (version
/// byte 1) or zstd frame starts so.
const MAGIC: [u8; 2] = *b"MP";
/// The plane holds each word's byte `phase` as it is.
const VERSION: u8 = 1;
/// The plane byte and the byte before it trade bits first (see [`pair`]): the plane then holds
/// a float's whole exponent and the byte before its sign, one skewed value instead of two
/// half-skewed ones (~0.5 bit a float less on embeddings).
const VERSION_PAIRED: u8 = 2;

/// Longest code. Decoding looks codes up in a table of `1 << MAX_LEN` entries, built per chunk.
const MAX_LEN: u32 = 11;

/// Streams the plane is dealt into, symbol `j` to stream `j % STREAMS`.
const STREAMS: usize = 4;

/// Fixed header: magic, version, phase, raw length, zero run start and length (u32 each),
/// symbol count - 1.
const HEADER: usize = 2 + 1 + 1 + 4 + 4 + 4 + 1;

/// Largest chunk the codec takes: SQLite's largest page. It bounds a stream to under 64 KiB
/// (16,384 symbols of at most 11 bits), so stream lengths are u16.
pub(crate) const MAX_CHUNK: usize = 64 << 10;

/// Why stored bytes do not decode. The reader reports it as damage to the chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot decode planes: {}", self.0)
    }
}

/// `data` plane-coded, or `None` when that would not be at least `min_saving` bytes smaller than
/// `data`.
pub(crate) fn encode(data: &[u8], min_saving: usize) -> Option<Vec<u8>> {
    encode_as(data, min_saving, None)
}

/// [`encode`], its choice of record version overridden by `paired` (tests cover both).
fn encode_as(data: &[u8], min_saving: usize, paired: Option<bool>) -> Option<Vec<u8>> {
    if data.len() < 64 || data.len() > MAX_CHUNK {
        return None;
    }
    let (zero_at, zero_len) = longest_aligned_zero_run(data);
    let segments = [&data[..zero_at], &data[zero_at + zero_len..]];
    let (phase, more_skewed) = skewed_phase(&segments)?;
    let paired = paired.unwrap_or(more_skewed);
    let kept = data.len() - zero_len;
    let n = plane_count(kept, phase);
    if n == 0 {
        // All zeros: nothing to code, and zstd does better.
        return None;
    }
    let mut plane = vec![0u8; n];
    let mut rest = vec![0u8; kept - n];
    let (mut p, mut q) = (0, 0);
    for seg in segments {
        let (dp, dq) = SPLIT[phase](seg, &mut plane[p..], &mut rest[q..]);
        p += dp;
        q += dq;
    }
    let version = match paired {
        true => {
            pair(&mut plane, &mut rest, phase);
            VERSION_PAIRED
        }
        false => VERSION,
    };
    let counts = counts(&plane);
    let lens = code_lengths(&counts);
    let bits: u64 = (0..256)
        .map(|s| u64::from(counts[s]) * u64::from(lens[s]))
        .sum();
    let symbols: Vec<u8> = (0..=255u8).filter(|&s| lens[s as usize] > 0).collect();
    let table_len = symbols.len() + symbols.len().div_ceil(2);
    // The code must pay for its table against the plane left as it is (what the zero-run frame
    // does with it).
    if table_len + 2 * STREAMS + bits.div_ceil(8) as usize >= n {
        return None;
    }
    // Each stream may end in a partial byte.
    let estimate =
        HEADER + table_len + 2 * STREAMS + bits.div_ceil(8) as usize + STREAMS + rest.len();
    if estimate + min_saving > data.len() {
        return None;
    }

    let mut out = Vec::with_capacity(estimate);
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(phase as u8);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&(zero_at as u32).to_le_bytes());
    out.extend_from_slice(&(zero_len as u32).to_le_bytes());
    out.push((symbols.len() - 1) as u8);
    out.extend_from_slice(&symbols);
    for pair in symbols.chunks(2) {
        let hi = lens[pair[0] as usize];
        let lo = pair.get(1).map_or(0, |&s| lens[s as usize]);
        out.push(hi << 4 | lo);
    }
    let codes = canonical_codes(&lens, &symbols);
    // One pass deals the codes to four writers, each with room for its share at MAX_LEN bits.
    let room = (n.div_ceil(STREAMS) * MAX_LEN as usize).div_ceil(8) + 8;
    let mut scratch = vec![0u8; STREAMS * room];
    let mut writers: Vec<BitWriter<'_>> = scratch
        .chunks_exact_mut(room)
        .map(|out| BitWriter {
            out,
            at: 0,
            acc: 0,
            n: 0,
        })
        .collect();
    let mut quads = plane.chunks_exact(STREAMS);
    for q in &mut quads {
        for (w, &b) in writers.iter_mut().zip(q) {
            let (code, len) = codes[b as usize];
            w.put(code, len);
        }
    }
    for (w, &b) in writers.iter_mut().zip(quads.remainder()) {
        let (code, len) = codes[b as usize];
        w.put(code, len);
    }
    let streams: Vec<&[u8]> = writers.into_iter().map(BitWriter::finish).collect();
    for stream in &streams {
        // At most 16,384 / 4 symbols of 11 bits: under 64 KiB (MAX_CHUNK).
        out.extend_from_slice(&(stream.len() as u16).to_le_bytes());
    }
    for stream in &streams {
        out.extend_from_slice(stream);
    }
    out.extend_from_slice(&rest);
    debug_assert!(out.len() <= estimate);
    Some(out)
}

/// How often each byte value occurs in `plane`.
fn counts(plane: &[u8]) -> [u32; 256] {
    // Four tables: a plane repeats few values, and one table would chain its increments.
    let mut tables = [[0u32; 256]; 4];
    let mut quads = plane.chunks_exact(4);
    for q in &mut quads {
        for (t, &b) in tables.iter_mut().zip(q) {
            t[b as usize] += 1;
        }
    }
    for &b in quads.remainder() {
        tables[0][b as usize] += 1;
    }
    std::array::from_fn(|s| tables.iter().map(|t| t[s]).sum())
}

/// Version 2's transform of the plane and the rest as split: each plane byte `t` and the byte
/// before it in the chunk `u` (in the same word; for phase 0 the last byte of the word before)
/// become `t << 1 | u >> 7` and `u & 0x7f | t & 0x80`. On float32 values the plane then holds the
/// exponent and `u` the sign. A phase-0 chunk's first plane byte has no byte before it and stays.
fn pair(plane: &mut [u8], rest: &mut [u8], phase: usize) {
    PAIR[phase](plane, rest);
}

type PairFn = fn(&mut [u8], &mut [u8]);
const PAIR: [PairFn; 4] = [pair_at::<0>, pair_at::<1>, pair_at::<2>, pair_at::<3>];

/// [`pair`] for phase `P`. The byte before each plane byte is at a fixed place of the three
/// [`split`] kept of its word (of the word before, for phase 0); only the chunk's last word may
/// be partial, and it holds that byte when it holds a plane byte.
fn pair_at<const P: usize>(plane: &mut [u8], rest: &mut [u8]) {
    let (plane, at) = match P {
        0 => (plane.get_mut(1..).unwrap_or_default(), 2),
        _ => (plane, P.saturating_sub(1)),
    };
    let f = |t: &mut u8, u: &mut u8| {
        let (t0, u0) = (*t, *u);
        *t = t0 << 1 | u0 >> 7;
        *u = u0 & 0x7f | t0 & 0x80;
    };
    let mut words = rest.chunks_exact_mut(3);
    let whole = words.len().min(plane.len());
    for (t, r) in plane[..whole].iter_mut().zip(&mut words) {
        f(t, &mut r[at]);
    }
    if let (Some(t), Some(u)) = (plane.get_mut(whole), words.into_remainder().get_mut(at)) {
        f(t, u);
    }
}

/// The inverse of [`pair`], on the decoded chunk: `head` and `tail` are its bytes before and
/// after the zero run, joined as stored. In the kept bytes (`head` then `tail`, whose positions
/// keep their phase: the run is cut at multiples of 4) each plane byte but the first of all was
/// paired with the kept byte before it, so one pair may straddle the run.
fn unpair(head: &mut [u8], tail: &mut [u8], phase: usize) {
    // A pair as the low half of a little-endian u32, `u` lowest: the 9 bits from `u`'s top bit
    // up rotate right by one, which gives `t` back its low bit and `u` its top bit. Two pairs
    // (4-byte windows) to a u64: the shift moves no bit the masks keep across a window.
    const KEEP: u64 = 0xffff_007f_ffff_007f;
    let undo = |x: u64| x & KEEP | (x >> 1) & 0x7f80_0000_7f80 | (x & 0x80_0000_0080) << 8;
    // The first pair of a segment starts at `u`'s place: `phase - 1`, or 3 (the word before).
    let start = (phase + 3) % 4;
    for seg in [&mut *head, &mut *tail] {
        let Some(from) = seg.get_mut(start..) else {
            continue;
        };
        let mut twos = from.chunks_exact_mut(8);
        for w in &mut twos {
            // Always 8 bytes: one load, one store.
            let x = <[u8; 8]>::try_from(&*w).map_or(0, u64::from_le_bytes);
            w.copy_from_slice(&undo(x).to_le_bytes());
        }
        let mut ones = twos.into_remainder().chunks_mut(4);
        for w in &mut ones {
            if let [u, t, ..] = w {
                [*u, *t, ..] = undo(u64::from_le_bytes([*u, *t, 0, 0, 0, 0, 0, 0])).to_le_bytes();
            }
        }
    }
    // Phase 0: the tail's first byte is a plane byte, paired with the head's last.
    if phase == 0
        && let (Some(u), Some(t)) = (head.last_mut(), tail.first_mut())
    {
        [*u, *t, ..] = undo(u64::from_le_bytes([*u, *t, 0, 0, 0, 0, 0, 0])).to_le_bytes();
    }
}

/// Decodes `stored` into `out`, whose length is the chunk's raw length.
pub(crate) fn decode_into(stored: &[u8], out: &mut [u8]) -> Result<(), Malformed> {
    let c = Coded::parse(stored)?;
    c.check(stored, out.len())?;
    c.decode_whole(out)
}

/// A plane-coded chunk as a zstd frame, and where its bytes lie in it.
pub(crate) struct PlaneFrame {
    pub(crate) frame: Vec<u8>,
    pub(crate) spans: PlaneSpans,
}

impl PlaneFrame {
    /// The chunk's bytes (the frame's content), copied out: tests compare them. Export reads
    /// them in place ([`PlaneSpans::feed`]).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn content(&self) -> Vec<u8> {
        self.spans.content(&self.frame)
    }
}

/// Where a [`PlaneFrame`]'s content lies in its frame: two raw blocks around a zero run.
pub(crate) struct PlaneSpans {
    head: std::ops::Range<usize>,
    zeros: usize,
    tail: std::ops::Range<usize>,
}

impl PlaneSpans {
    /// The content of `frame` (the frame these spans were made with), copied out.
    pub(crate) fn content(&self, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + self.zeros + self.tail.len());
        self.feed(frame, |b| out.extend_from_slice(b));
        out
    }

    /// Hands `f` the content of `frame` (the frame these spans were made with) in order.
    pub(crate) fn feed(&self, frame: &[u8], mut f: impl FnMut(&[u8])) {
        const ZEROS: [u8; 4096] = [0; 4096];
        f(frame.get(self.head.clone()).unwrap_or_default());
        let mut left = self.zeros;
        while left > 0 {
            let n = left.min(ZEROS.len());
            f(&ZEROS[..n]);
            left -= n;
        }
        f(frame.get(self.tail.clone()).unwrap_or_default());
    }
}

/// The chunk `stored` encodes, of `raw_len` bytes, as a zstd frame (RFC 8878) that any decoder
/// reads: the bytes around its zero run as raw blocks, decoded straight into the frame, the
/// run as an RLE block. For export, whose bundles hold zstd frames only.
pub(crate) fn decode_to_frame(stored: &[u8], raw_len: usize) -> Result<PlaneFrame, Malformed> {
    use crate::zstd_frames::{Block, block_header, frame_header};
    let c = Coded::parse(stored)?;
    c.check(stored, raw_len)?;
    let tail_len = raw_len - c.zero_at - c.zero_len;
    let mut out = Vec::with_capacity(raw_len - c.zero_len + 32);
    frame_header(&mut out, raw_len as u64);
    // Blocks in order, empty ones left out; the last one is marked as such. A chunk is at most
    // MAX_CHUNK bytes, under zstd's largest block.
    let blocks = [
        (Block::Raw, c.zero_at),
        (Block::Rle, c.zero_len),
        (Block::Raw, tail_len),
    ];
    let last = blocks.iter().rposition(|b| b.1 > 0).unwrap_or(0);
    // Where the head's and the tail's bytes go: an empty segment is an empty range where its
    // block would be, so the head always ends before the tail starts.
    let mut spans = [0..0, 0..0];
    for (i, &(kind, len)) in blocks.iter().enumerate() {
        if len > 0 || i == last {
            out.extend_from_slice(&block_header(kind, len, i == last));
        }
        match kind {
            Block::Rle if len > 0 || i == last => out.push(0),
            Block::Rle => {}
            Block::Raw => {
                spans[i / 2] = out.len()..out.len() + len;
                out.resize(out.len() + len, 0);
            }
        }
    }
    let [head, tail] = spans;
    let (front, back) = out.split_at_mut(head.end);
    let in_back = tail.start - head.end..tail.end - head.end;
    c.decode(&mut front[head.clone()], &mut back[in_back])?;
    Ok(PlaneFrame {
        frame: out,
        spans: PlaneSpans {
            head,
            zeros: c.zero_len,
            tail,
        },
    })
}

/// Buffers a decoding thread reuses from chunk to chunk.
struct Scratch {
    /// The lookup table of [`MAX_LEN`] bits (see [`fill_table`]).
    table: Vec<u16>,
    /// The streams, padded with zeros.
    padded: Vec<u8>,
    /// The decoded plane.
    plane: Vec<u8>,
}

/// The plane-coded chunk at the start of `bytes` (which may go on past it), decoded, and its
/// stored length: the record is self-delimiting, so repair finds it in a pack without a footer.
pub(crate) fn decode_at(bytes: &[u8]) -> Result<(usize, Vec<u8>), Malformed> {
    let c = Coded::parse(bytes)?;
    let mut out = vec![0u8; c.raw_len];
    c.decode_whole(&mut out)?;
    Ok((c.stored_len, out))
}

/// A plane-coded record's fields, checked against each other but not decoded.
struct Coded<'a> {
    phase: usize,
    /// Version 2: the plane and the rest are paired (see [`pair`]).
    paired: bool,
    raw_len: usize,
    zero_at: usize,
    zero_len: usize,
    /// The coded byte values, in increasing order, each with a length in `lens`.
    symbols: &'a [u8],
    lens: [u8; 256],
    stream_lens: [usize; STREAMS],
    streams: &'a [u8],
    rest: &'a [u8],
    stored_len: usize,
}

impl<'a> Coded<'a> {
    /// Refuses a record whose lengths differ from its index entry's.
    fn check(&self, stored: &[u8], raw_len: usize) -> Result<(), Malformed> {
        if self.raw_len != raw_len || self.stored_len != stored.len() {
            return Err(Malformed("plane chunk length does not match its entry"));
        }
        Ok(())
    }

    /// Decodes the chunk into `out`, of its raw length.
    fn decode_whole(&self, out: &mut [u8]) -> Result<(), Malformed> {
        let (head, tail) = out.split_at_mut(self.zero_at);
        let (zeros, tail) = tail.split_at_mut(self.zero_len);
        zeros.fill(0);
        self.decode(head, tail)
    }

    /// Decodes the kept bytes into `head` and `tail`, the parts of the chunk before and after
    /// its zero run.
    fn decode(&self, head: &mut [u8], tail: &mut [u8]) -> Result<(), Malformed> {
        thread_local! {
            // Per reader thread: a restore decodes ~260,000 pages a GiB.
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch {
                table: vec![0; 1 << MAX_LEN],
                padded: Vec::new(),
                plane: Vec::new(),
            });
        }
        debug_assert_eq!(head.len() + tail.len(), self.raw_len - self.zero_len);
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            fill_table(&mut scratch.table, &self.lens, self.symbols)?;
            let n = plane_count(self.raw_len - self.zero_len, self.phase);
            decode_plane(self.streams, &self.stream_lens, scratch, n)?;
            let (plane, rest) = (&scratch.plane, self.rest);
            let (mut p, mut q) = (0, 0);
            for seg in [&mut *head, &mut *tail] {
                let (dp, dq) = JOIN[self.phase](seg, &plane[p..], &rest[q..]);
                p += dp;
                q += dq;
            }
            if self.paired {
                unpair(head, tail, self.phase);
            }
            Ok(())
        })
    }

    /// Parses the record at the start of `bytes` (which may go on past it).
    fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut r = Reader(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(Malformed("not a plane-coded chunk"));
        }
        let paired = match r.u8()? {
            VERSION => false,
            VERSION_PAIRED => true,
            _ => return Err(Malformed("unknown plane codec version")),
        };
        let phase = r.u8()? as usize;
        let raw_len = r.u32()? as usize;
        let zero_at = r.u32()? as usize;
        let zero_len = r.u32()? as usize;
        if phase > 3
            || raw_len > MAX_CHUNK
            || !zero_at.is_multiple_of(4)
            || !zero_len.is_multiple_of(4)
            || zero_at
                .checked_add(zero_len)
                .is_none_or(|end| end > raw_len)
        {
            return Err(Malformed("plane header out of range"));
        }
        let count = usize::from(r.u8()?) + 1;
        let symbols = r.take(count)?;
        if symbols.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Malformed("plane symbols not in order"));
        }
        let packed = r.take(count.div_ceil(2))?;
        let mut lens = [0u8; 256];
        for (i, &s) in symbols.iter().enumerate() {
            let shift = if i % 2 == 0 { 4 } else { 0 };
            let nibble = (packed[i / 2] >> shift) & 0xf;
            if nibble == 0 || u32::from(nibble) > MAX_LEN {
                return Err(Malformed("plane code length out of range"));
            }
            lens[s as usize] = nibble;
        }
        let mut stream_lens = [0usize; STREAMS];
        for l in &mut stream_lens {
            *l = usize::from(r.u16()?);
        }
        let streams = r.take(stream_lens.iter().sum())?;
        let kept = raw_len - zero_len;
        let rest = r.take(kept - plane_count(kept, phase))?;
        Ok(Self {
            phase,
            paired,
            raw_len,
            zero_at,
            zero_len,
            symbols,
            lens,
            stream_lens,
            streams,
            rest,
            stored_len: bytes.len() - r.0.len(),
        })
    }
}

/// The phase whose bytes are the most skewed (most pairs of equal bytes), from every fourth
/// word of the segments, and whether that phase's plane is more skewed paired (see [`pair`]);
/// `None` when even that phase is too flat to pay for a code table (under ~128 equally likely
/// values' worth of skew), as random bytes are.
fn skewed_phase(segments: &[&[u8]; 2]) -> Option<(usize, bool)> {
    let mut hist = [[0u16; 256]; 4];
    let mut n = 0u32;
    for seg in segments {
        for word in seg.chunks_exact(16) {
            for p in 0..4 {
                hist[p][word[p] as usize] += 1;
            }
            n += 1;
        }
    }
    // Pairs of equal bytes: over all pairs, an unbiased estimate of the chance that two bytes
    // are equal (1/256 for random bytes, ~0.17 for exponent bytes).
    let skew = |h: &[u16; 256]| {
        h.iter()
            .map(|&c| u32::from(c) * u32::from(c.saturating_sub(1)))
            .sum::<u32>()
    };
    let phase = (0..4).max_by_key(|&p| skew(&hist[p]))?;
    let pairs = u64::from(n) * u64::from(n.saturating_sub(1));
    if u64::from(skew(&hist[phase])) * 128 < pairs {
        return None;
    }
    // The same words paired, the first of each 16 bytes but the segment's first for phase 0.
    let mut paired = [0u16; 256];
    for seg in segments {
        for (i, word) in seg.chunks_exact(16).enumerate() {
            let prev = match phase {
                0 if i == 0 => continue,
                0 => seg[16 * i - 1],
                p => word[p - 1],
            };
            paired[usize::from(word[phase] << 1 | prev >> 7)] += 1;
        }
    }
    Some((phase, skew(&paired) > skew(&hist[phase])))
}

/// Moves a segment's bytes between the chunk and (plane, rest); returns how many of each.
type SplitFn = fn(&[u8], &mut [u8], &mut [u8]) -> (usize, usize);
type JoinFn = fn(&mut [u8], &[u8], &[u8]) -> (usize, usize);

/// [`split`] for each phase.
const SPLIT: [SplitFn; 4] = [split::<0>, split::<1>, split::<2>, split::<3>];

/// Copies byte `P` of each word of `seg` to `plane` and the others to `rest`, which have room
/// for them. Returns how many of each it wrote.
fn split<const P: usize>(seg: &[u8], plane: &mut [u8], rest: &mut [u8]) -> (usize, usize) {
    let words = seg.len() / 4;
    // Whole words through fixed-size pieces, so that the copies need no per-byte checks.
    for ((word, p), r) in seg
        .chunks_exact(4)
        .zip(plane.iter_mut())
        .zip(rest.chunks_exact_mut(3))
    {
        *p = word[P];
        let others = others::<P>();
        r.copy_from_slice(&[word[others[0]], word[others[1]], word[others[2]]]);
    }
    let (mut p, mut q) = (words, 3 * words);
    for (i, &b) in seg[4 * words..].iter().enumerate() {
        if i == P {
            plane[p] = b;
            p += 1;
        } else {
            rest[q] = b;
            q += 1;
        }
    }
    (p, q)
}

/// The positions in a word other than `P`, in order.
const fn others<const P: usize>() -> [usize; 3] {
    match P {
        0 => [1, 2, 3],
        1 => [0, 2, 3],
        2 => [0, 1, 3],
        _ => [0, 1, 2],
    }
}

/// [`join`] for each phase.
const JOIN: [JoinFn; 4] = [join::<0>, join::<1>, join::<2>, join::<3>];

/// Fills `seg`: byte `P` of each word from `plane`, the others from `rest`, which hold enough
/// (the caller checked the lengths). Returns how many of each it used.
fn join<const P: usize>(seg: &mut [u8], plane: &[u8], rest: &[u8]) -> (usize, usize) {
    let words = seg.len() / 4;
    for ((word, &p), r) in seg
        .chunks_exact_mut(4)
        .zip(plane.iter())
        .zip(rest.chunks_exact(3))
    {
        let others = others::<P>();
        word[P] = p;
        word[others[0]] = r[0];
        word[others[1]] = r[1];
        word[others[2]] = r[2];
    }
    let (mut p, mut q) = (words, 3 * words);
    for (i, b) in seg[4 * words..].iter_mut().enumerate() {
        if i == P {
            *b = plane[p];
            p += 1;
        } else {
            *b = rest[q];
            q += 1;
        }
    }
    (p, q)
}

/// The `n` plane symbols from their four streams into `scratch.plane`, read in turn so that
/// the four chains of lookups overlap.
fn decode_plane(
    streams: &[u8],
    lens: &[usize; STREAMS],
    scratch: &mut Scratch,
    n: usize,
) -> Result<(), Malformed> {
    // One copy padded with zeros: every window is one unaligned load. A stream read past its
    // end sees the next one's bytes, which `end` catches.
    let padded = &mut scratch.padded;
    padded.clear();
    padded.extend_from_slice(streams);
    padded.extend_from_slice(&[0; 8]);
    let mut at = [0usize; STREAMS];
    let mut end = [0usize; STREAMS];
    let mut start = 0;
    for k in 0..STREAMS {
        at[k] = start * 8;
        start += lens[k];
        end[k] = start * 8;
    }
    let last = end[STREAMS - 1];
    let table: &[u16; 1 << MAX_LEN] = scratch
        .table
        .as_slice()
        .try_into()
        .map_err(|_| Malformed("plane table of the wrong size"))?;
    let mut unassigned = false;
    // Every position is at most `last` when read (so that a damaged stream reads padding, not
    // out of bounds): checked per group of four, as a group reads each stream once.
    let mut symbol = |from: usize| {
        let b = &padded[from / 8..from / 8 + 8];
        let word = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let e = table[(word << (from % 8) >> (64 - MAX_LEN)) as usize];
        unassigned |= e >> 8 == 0;
        (e as u8, usize::from(e >> 8))
    };
    let plane = &mut scratch.plane;
    plane.clear();
    plane.resize(n, 0);
    let mut groups = plane.chunks_exact_mut(STREAMS);
    for group in &mut groups {
        if at.iter().any(|&a| a > last) {
            break;
        }
        for (slot, at) in group.iter_mut().zip(at.iter_mut()) {
            let (s, len) = symbol(*at);
            *slot = s;
            *at += len;
        }
    }
    for (slot, at) in groups.into_remainder().iter_mut().zip(at.iter_mut()) {
        let (s, len) = symbol((*at).min(last));
        *slot = s;
        *at += len;
    }
    if unassigned {
        return Err(Malformed("plane stream holds an unassigned code"));
    }
    if (0..STREAMS).any(|k| at[k] > end[k]) {
        return Err(Malformed("plane stream too short"));
    }
    Ok(())
}

/// How many of `len` kept bytes sit at positions `phase` mod 4. The zero run is cut at
/// multiples of 4, so positions keep their phase.
fn plane_count(len: usize, phase: usize) -> usize {
    len / 4 + usize::from(len % 4 > phase)
}

/// The longest zero run of at least 16 bytes (`zstd_frames::find_zero_runs`), cut inward to
/// multiples of 4, as (start, length); (0, 0) when there is none.
fn longest_aligned_zero_run(data: &[u8]) -> (usize, usize) {
    crate::zstd_frames::find_zero_runs(data)
        .into_iter()
        .map(|(s, e)| (s.next_multiple_of(4), e / 4 * 4))
        .filter(|(s, e)| e > s)
        .max_by_key(|(s, e)| (e - s, std::cmp::Reverse(*s)))
        .map_or((0, 0), |(s, e)| (s, e - s))
}

/// Huffman code lengths (0 for absent symbols), none over [`MAX_LEN`]: rebuilt from flattened
/// counts until they fit. A lone symbol gets length 1.
fn code_lengths(counts: &[u32; 256]) -> [u8; 256] {
    let mut c = *counts;
    loop {
        let lens = huffman_lengths(&c);
        if lens.iter().all(|&l| u32::from(l) <= MAX_LEN) {
            return lens;
        }
        for x in c.iter_mut().filter(|x| **x > 0) {
            *x = (*x >> 1).max(1);
        }
    }
}

/// Unlimited Huffman code lengths by the two-queue method over the symbols sorted by count.
fn huffman_lengths(counts: &[u32; 256]) -> [u8; 256] {
    let mut lens = [0u8; 256];
    // Leaves sorted by count, as (count, symbol); nodes 0..n are the leaves, internal nodes
    // follow in the order they are made, which is also nondecreasing weight, so two queues give
    // the two lightest in O(1).
    let mut leaves = [(0u32, 0u8); 256];
    let mut n = 0;
    for (s, &c) in counts.iter().enumerate() {
        if c > 0 {
            leaves[n] = (c, s as u8);
            n += 1;
        }
    }
    let leaves = &mut leaves[..n];
    match n {
        0 => return lens,
        1 => {
            lens[leaves[0].1 as usize] = 1;
            return lens;
        }
        _ => {}
    }
    leaves.sort_unstable();
    let mut weight = [0u64; 511];
    let mut parent = [0u16; 511];
    for (w, &(c, _)) in weight.iter_mut().zip(leaves.iter()) {
        *w = u64::from(c);
    }
    let (mut leaf, mut inner) = (0, n);
    for made in n..2 * n - 1 {
        let mut pick = || {
            let take_leaf = leaf < n && (inner >= made || weight[leaf] <= weight[inner]);
            if take_leaf {
                leaf += 1;
                leaf - 1
            } else {
                inner += 1;
                inner - 1
            }
        };
        let (a, b) = (pick(), pick());
        weight[made] = weight[a] + weight[b];
        parent[a] = made as u16;
        parent[b] = made as u16;
    }
    // Depths from the root (the last node) down: a parent is always made after its children.
    let mut depth = [0u8; 511];
    for i in (0..2 * n - 2).rev() {
        depth[i] = depth[parent[i] as usize].saturating_add(1);
    }
    for (i, &(_, s)) in leaves.iter().enumerate() {
        lens[s as usize] = depth[i];
    }
    lens
}

/// The first canonical code of each length for `lens` of `symbols` (those with a length,
/// 1..=[`MAX_LEN`], in increasing order; Kraft sum at most 1), as deflate computes them:
/// symbols by (length, value) then take the codes of their length in turn, each the previous
/// one plus one, shifted left when the length grows.
fn first_codes(lens: &[u8; 256], symbols: &[u8]) -> [u32; MAX_LEN as usize + 1] {
    let mut per_len = [0u32; MAX_LEN as usize + 1];
    for &s in symbols {
        per_len[lens[s as usize] as usize] += 1;
    }
    let mut next = [0u32; MAX_LEN as usize + 1];
    let mut code = 0u32;
    for len in 1..=MAX_LEN as usize {
        code = (code + per_len[len - 1]) << 1;
        next[len] = code;
    }
    next
}

/// Each symbol's canonical code and length (see [`first_codes`]).
fn canonical_codes(lens: &[u8; 256], symbols: &[u8]) -> [(u32, u32); 256] {
    let mut next = first_codes(lens, symbols);
    let mut codes = [(0u32, 0u32); 256];
    for &s in symbols {
        let l = lens[s as usize] as usize;
        codes[s as usize] = (next[l], l as u32);
        next[l] += 1;
    }
    codes
}

/// Fills `table` (`1 << MAX_LEN` entries) for lookups of [`MAX_LEN`] bits: entry = symbol |
/// length << 8, length 0 where no code starts. Refuses lengths whose codes would not fit
/// (Kraft sum over 1). A complete code overwrites every entry, so only an incomplete one (a lone
/// symbol, or damage) clears the table first. Per decoded chunk: no per-symbol array.
fn fill_table(table: &mut [u16], lens: &[u8; 256], symbols: &[u8]) -> Result<(), Malformed> {
    let kraft: u32 = symbols
        .iter()
        .map(|&s| 1u32 << (MAX_LEN - u32::from(lens[s as usize])))
        .sum();
    if kraft > 1 << MAX_LEN {
        return Err(Malformed("plane code lengths oversubscribed"));
    }
    if kraft < 1 << MAX_LEN {
        table.fill(0);
    }
    let mut next = first_codes(lens, symbols);
    for &s in symbols {
        let len = u32::from(lens[s as usize]);
        let code = &mut next[len as usize];
        let shift = MAX_LEN - len;
        let start = (*code << shift) as usize;
        *code += 1;
        table[start..start + (1 << shift)].fill(u16::from(s) | (len as u16) << 8);
    }
    Ok(())
}

/// Writes codes most significant bit first into a slice with room for them; the last byte is
/// padded with zero bits.
struct BitWriter<'a> {
    out: &'a mut [u8],
    at: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitWriter<'a> {
    fn put(&mut self, code: u32, len: u32) {
        self.acc = self.acc << len | u64::from(code);
        self.n += len;
        if self.n >= 32 {
            self.n -= 32;
            let word = ((self.acc >> self.n) as u32).to_be_bytes();
            self.out[self.at..self.at + 4].copy_from_slice(&word);
            self.at += 4;
        }
    }

    /// The bytes written.
    fn finish(mut self) -> &'a [u8] {
        while self.n >= 8 {
            self.n -= 8;
            self.out[self.at] = (self.acc >> self.n) as u8;
            self.at += 1;
        }
        if self.n > 0 {
            self.out[self.at] = (self.acc << (8 - self.n)) as u8;
            self.at += 1;
        }
        &self.out[..self.at]
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("plane chunk too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(stored: &[u8], raw_len: usize) -> Result<Vec<u8>, Malformed> {
        // Dirty, as the reader's reused buffers are.
        let mut out = vec![0xa5; raw_len];
        decode_into(stored, &mut out).map(|()| out)
    }

    /// A SQLite-like page: a header, zeros, then 768 float32 values of a unit vector at an
    /// offset that is not a multiple of 4.
    pub(crate) fn vector_page(seed: u64, misalign: usize) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..8].copy_from_slice(&[13, 0, 0, 0, 1, 0x0f, 0xf0, 0]);
        let mut x = seed | 1;
        let start = 4096 - 3072 - 8 + misalign;
        for i in 0..768 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Sum of uniforms: roughly normal, scaled like a component of a unit vector.
            let u = (0..4)
                .map(|k| ((x >> (k * 16)) & 0xffff) as f32 / 65536.0)
                .sum::<f32>();
            let v = (u - 2.0) * 0.06;
            page[start + i * 4..start + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        page
    }

    #[test]
    fn a_vector_page_round_trips_at_about_two_thirds_of_its_size() {
        for misalign in 0..4 {
            let page = vector_page(7 + misalign as u64, misalign);
            let stored = encode(&page, 0).expect("a vector page is plane-coded");
            assert!(
                stored.len() < 4096 * 70 / 100,
                "misalign {misalign}: {} bytes",
                stored.len()
            );
            assert_eq!(decode(&stored, page.len()).as_deref(), Ok(&page[..]));
            // Paired: each exponent coded whole. On these near-normal values that saves ~0.1
            // bit a float over version 1 (on the sample agent's, whose largest exponent is
            // even, ~0.5). Version 1 still decodes: stores of format 4 hold it.
            assert_eq!(stored[2], VERSION_PAIRED, "misalign {misalign}");
            let v1 = encode_as(&page, 0, Some(false)).expect("version 1");
            assert_eq!(v1[2], VERSION);
            assert!(
                stored.len() + 8 <= v1.len(),
                "misalign {misalign}: {} against {}",
                stored.len(),
                v1.len()
            );
            assert_eq!(decode(&v1, page.len()).as_deref(), Ok(&page[..]));
        }
    }

    /// Export's frames: any zstd decoder reads them back to the chunk, with or without a zero
    /// run, at either end.
    #[test]
    fn a_plane_coded_chunk_becomes_a_standard_zstd_frame() {
        let mut pages = vec![vector_page(3, 1), vector_page(4, 2)];
        pages[1][..1024].fill(0);
        pages.push(pages[0][1024..].to_vec());
        // Floats, then zeros to the end of the page.
        let mut floats_first = pages[0][1024..].to_vec();
        floats_first.resize(4096, 0);
        pages.push(floats_first);
        let mut no_run = vector_page(5, 0);
        no_run[..8].fill(1);
        no_run[8..1024]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 7) as u8 + 1);
        pages.push(no_run);
        for page in pages {
            let stored = encode(&page, 0).expect("coded");
            let coded = decode_to_frame(&stored, page.len()).expect("frame");
            assert_eq!(coded.content(), page);
            let frame = coded.frame;
            assert_eq!(
                zstd::bulk::decompress(&frame, page.len()).expect("zstd"),
                page
            );
            assert!(frame.len() <= page.len() + 16, "{}", frame.len());
            assert!(decode_to_frame(&stored, page.len() + 1).is_err());
        }
    }

    #[test]
    fn random_bytes_and_small_chunks_are_left_to_other_encodings() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(encode(&random, 0), None);
        assert_eq!(encode(&[1u8; 63], 0), None);
        assert_eq!(encode(&[0u8; 4096], 0), None, "no plane to code");
        assert_eq!(encode(&vec![0u8; MAX_CHUNK + 1], 0), None);
        let page = vector_page(1, 0);
        assert_eq!(encode(&page, 4096), None, "a saving it cannot make");
    }

    #[test]
    fn one_symbol_and_skewed_counts_beyond_the_longest_code_round_trip() {
        // A plane of one value, and one whose counts follow a Fibonacci series (the worst case
        // for code length), so the lengths must be limited.
        let one: Vec<u8> = (0..4096)
            .map(|i| if i % 4 == 2 { 0x3d } else { (i * 7) as u8 })
            .collect();
        let stored = encode(&one, 0).expect("coded");
        assert_eq!(decode(&stored, one.len()).as_deref(), Ok(&one[..]));

        let mut fib = vec![1usize, 1];
        while fib.len() < 20 {
            let n = fib.len();
            fib.push(fib[n - 1] + fib[n - 2]);
        }
        let mut plane: Vec<u8> = Vec::new();
        for (s, &c) in fib.iter().enumerate() {
            plane.extend(std::iter::repeat_n(s as u8, c));
        }
        let mut data = Vec::new();
        for (i, &p) in plane.iter().enumerate() {
            data.extend_from_slice(&[p, (i * 31) as u8, (i * 17 + 3) as u8, (i >> 3) as u8]);
        }
        data.truncate(MAX_CHUNK);
        let mut counts = [0u32; 256];
        for &p in &plane {
            counts[p as usize] += 1;
        }
        assert!(
            huffman_lengths(&counts)
                .iter()
                .any(|&l| u32::from(l) > MAX_LEN)
        );
        let stored = encode(&data, 0).expect("coded");
        assert_eq!(decode(&stored, data.len()).as_deref(), Ok(&data[..]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes whose plane is skewed enough to be coded come back exactly.
        #[test]
        fn what_is_encoded_decodes_to_itself(
            plane in prop::collection::vec(prop::sample::select(vec![0x3bu8, 0x3c, 0x3d, 0xbc, 0xbd, 0x00]), 16..2000),
            noise in prop::collection::vec(any::<u8>(), 6000),
            zeros in 0usize..1500,
            zeros_at in 0usize..1000,
            tail in 0usize..4,
            paired in prop::option::of(any::<bool>()),
        ) {
            let mut data = Vec::new();
            for (i, &p) in plane.iter().enumerate() {
                data.extend_from_slice(&[noise[3 * i], noise[3 * i + 1], p, noise[3 * i + 2]]);
            }
            let at = zeros_at.min(data.len());
            data.splice(at..at, std::iter::repeat_n(0u8, zeros));
            data.extend_from_slice(&noise[..tail]);
            if let Some(stored) = encode_as(&data, 0, paired) {
                let coded = decode_to_frame(&stored, data.len()).expect("frame");
                prop_assert_eq!(&coded.content(), &data);
                let frame = coded.frame;
                prop_assert_eq!(&zstd::bulk::decompress(&frame, data.len()).expect("zstd"), &data);
                prop_assert_eq!(decode(&stored, data.len()), Ok(data));
            }
        }

        /// Damaged stored bytes are refused or decode to something else, never panic.
        #[test]
        fn damaged_bytes_never_panic(seed in any::<u64>(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
            let page = vector_page(seed, (seed % 4) as usize);
            let mut stored = encode_as(&page, 0, Some(seed % 8 < 4)).expect("coded");
            for (at, x) in flips {
                let n = stored.len();
                stored[at % n] ^= x | 1;
            }
            let _ = decode(&stored, page.len());
            let _ = decode(&stored[..cut % stored.len()], page.len());
            let _ = decode(&stored, cut % 70_000);
            let _ = decode_to_frame(&stored, page.len());
            let _ = decode_to_frame(&stored, cut % 70_000);
        }
    }
}
