//! zstd frames (RFC 8878) built by hand from raw and RLE blocks, for bytes that zstd's own
//! encoder would not shrink further: any zstd decoder reads them, so what holds them stays plain
//! zstd. Two users: the store's chunks whose bytes are random apart from zero runs (a SQLite page
//! of one float32 embedding and its free space), whose runs become RLE blocks
//! ([`zero_runs`]: zstd's fastest level finds the same runs at ~2x the CPU, much of it building
//! entropy tables its raw literals then do not use; benches/stages.rs); and an export's
//! incompressible chunks, as raw frames (bundle/frames.rs).

/// zstd frame magic, little endian.
pub(crate) const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest block a frame may hold (RFC 8878, Block_Maximum_Size).
pub(crate) const MAX_BLOCK: usize = 128 << 10;

/// Zero runs shorter than this stay in the raw block around them: an RLE block and the raw
/// block after it cost 7 header bytes. Any run this long holds an aligned zero word.
const MIN_RUN: usize = 16;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Block {
    Raw = 0,
    Rle = 1,
}

/// Appends the magic number and the header of a single-segment frame (no window descriptor)
/// of `len` content bytes, without checksum or dictionary.
pub(crate) fn frame_header(out: &mut Vec<u8>, len: u64) {
    out.extend_from_slice(&MAGIC);
    const SINGLE_SEGMENT: u8 = 1 << 5;
    match len {
        0..=255 => out.extend_from_slice(&[SINGLE_SEGMENT, len as u8]),
        256..=65_791 => {
            out.push(SINGLE_SEGMENT | 1 << 6);
            out.extend_from_slice(&((len - 256) as u16).to_le_bytes());
        }
        _ if len <= u32::MAX as u64 => {
            out.push(SINGLE_SEGMENT | 2 << 6);
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        _ => {
            out.push(SINGLE_SEGMENT | 3 << 6);
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
}

/// The header of a block of `len` content bytes (at most [`MAX_BLOCK`]).
pub(crate) fn block_header(kind: Block, len: usize, last: bool) -> [u8; 3] {
    let h = (len as u32) << 3 | (kind as u32) << 1 | last as u32;
    let b = h.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// `data` as one frame whose zero runs of [`MIN_RUN`] bytes or more are RLE blocks and the rest
/// raw blocks; `None` if it has no such run.
pub(crate) fn zero_runs(data: &[u8]) -> Option<Vec<u8>> {
    let runs = find_zero_runs(data);
    if runs.is_empty() {
        return None;
    }
    let zeros: usize = runs.iter().map(|r| r.1 - r.0).sum();
    let mut out = Vec::with_capacity(data.len() - zeros + 16 + 7 * runs.len());
    frame_header(&mut out, data.len() as u64);
    // Where the last block header starts: it gets the Last_Block bit once all are written.
    let mut last = 0;
    let mut put = |out: &mut Vec<u8>, kind: Block, bytes: &[u8]| {
        for piece in bytes.chunks(MAX_BLOCK) {
            last = out.len();
            out.extend_from_slice(&block_header(kind, piece.len(), false));
            match kind {
                Block::Rle => out.push(0),
                Block::Raw => out.extend_from_slice(piece),
            }
        }
    };
    let mut at = 0;
    for &(start, end) in &runs {
        put(&mut out, Block::Raw, &data[at..start]);
        put(&mut out, Block::Rle, &data[start..end]);
        at = end;
    }
    put(&mut out, Block::Raw, &data[at..]);
    out[last] |= 1;
    Some(out)
}

/// The zero runs of at least [`MIN_RUN`] bytes, as (start, end): found from the aligned zero
/// words each must contain, so that other bytes are passed over a word at a time.
pub(crate) fn find_zero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    let word = |i: usize| {
        data.get(i..i + 8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    while let Some(w) = word(i) {
        if w != 0 {
            i += 8;
            continue;
        }
        let mut start = i;
        while start > 0 && data[start - 1] == 0 {
            start -= 1;
        }
        let mut end = i + 8;
        while word(end) == Some(0) {
            end += 8;
        }
        while end < data.len() && data[end] == 0 {
            end += 1;
        }
        // A run met through its first word is not met again: `start` never passes the end of
        // the run before, since that one was extended over every zero after it.
        if end - start >= MIN_RUN {
            runs.push((start, end));
        }
        i = end.next_multiple_of(8);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(frame: &[u8], len: usize) -> Vec<u8> {
        zstd::bulk::decompress(frame, len.max(1)).expect("a valid zstd frame")
    }

    /// A page of one embedding: random bytes, then its free space.
    #[test]
    fn a_page_with_free_space_is_a_raw_and_an_rle_block() {
        let mut s = 7u64;
        let mut page: Vec<u8> = (0..3072)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8 | 1
            })
            .collect();
        page.resize(4096, 0);
        let frame = zero_runs(&page).expect("a zero run");
        // Magic 4, header 3, raw block 3 + 3072, RLE block 3 + 1.
        assert_eq!(frame.len(), 4 + 3 + 3 + 3072 + 4);
        assert_eq!(decode(&frame, 4096), page);
        assert_eq!(zero_runs(&page[..3072]), None, "no zero run");
    }

    /// The bytes of a small frame, written out by hand from RFC 8878: a changed encoder shows
    /// here before it shows in a store.
    #[test]
    fn a_small_frame_is_laid_out_as_the_rfc_says() {
        let mut data = vec![1, 2, 3];
        data.extend([0; 16]);
        data.push(4);
        let expected = [
            &[0x28, 0xb5, 0x2f, 0xfd][..], // magic
            &[0x20, 20],                   // single segment, content size 20 in one byte
            &[3 << 3, 0, 0, 1, 2, 3],      // raw block of 3
            &[16 << 3 | 1 << 1, 0, 0, 0],  // RLE block of 16 zeros
            &[1 << 3 | 1, 0, 0, 4],        // last block: raw, 1 byte
        ]
        .concat();
        assert_eq!(zero_runs(&data).expect("a run"), expected);
        assert_eq!(decode(&expected, 20), data);
    }

    /// Runs at the edges, runs just under and at the minimum, content sizes at each frame
    /// header width, and blocks over the maximum all decode back.
    #[test]
    fn edges_and_sizes_decode_back() {
        for len in [16, 255, 256, 300, 65_791, 65_792, 300_000] {
            let mut data = vec![0u8; len];
            assert_eq!(decode(&zero_runs(&data).expect("all zeros"), len), data);
            for (i, b) in data.iter_mut().enumerate() {
                if (i / 20) % 2 == 0 {
                    *b = (i % 251) as u8 + 1;
                }
            }
            if let Some(f) = zero_runs(&data) {
                assert_eq!(decode(&f, len), data, "len {len}");
            }
        }
        let mut data = vec![9u8; 64];
        data[10..25].fill(0);
        assert_eq!(zero_runs(&data), None, "15 zeros stay raw");
        data[10..26].fill(0);
        assert!(zero_runs(&data).is_some(), "16 zeros are a run");
    }

    proptest! {
        /// Any bytes with zero runs come back from any zstd decoder, and every run of
        /// `MIN_RUN` zeros is taken out.
        #[test]
        fn any_content_round_trips(
            parts in proptest::collection::vec((any::<u8>(), 0usize..300, any::<bool>()), 1..40)
        ) {
            let mut data = Vec::new();
            for (b, n, zero) in parts {
                data.extend(std::iter::repeat_n(if zero { 0 } else { b | 1 }, n));
            }
            let runs: usize = find_zero_runs(&data).iter().map(|r| r.1 - r.0).sum();
            let longest = data.split(|&b| b != 0).map(<[u8]>::len).max().unwrap_or(0);
            prop_assert_eq!(runs > 0, longest >= MIN_RUN);
            if let Some(f) = zero_runs(&data) {
                prop_assert_eq!(decode(&f, data.len()), data.clone());
                prop_assert!(f.len() <= data.len() - runs + 16 + 7 * find_zero_runs(&data).len());
            }
        }
    }
}
