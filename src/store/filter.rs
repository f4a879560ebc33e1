//! The filter of known chunks a snapshot or import writes against (store-format.md, "Write
//! ordering", step 1). It is held for the whole write, so it is the one part of a day
//! snapshot's memory that grows with the store: it keeps ~3.6 bytes per stored chunk.

use std::collections::HashSet;

use crate::store::chunk_id::ChunkId;
use crate::store::writer::test_knob;

/// Bits of an id kept after its bucket: an id the store lacks is a false hit with odds of at
/// most 2^-26 (the commit's exact lookup catches it: a retry).
const LOW_BITS: u32 = 26;

/// Every this many buckets, where the bucket ends is sampled.
const SAMPLE_EVERY: u64 = 256;

/// Ids the store held when the write began, as sorted keys of their top `bits + 26` bits,
/// Elias-Fano coded. The top `bits` bits (2^bits ≥ ids, so a bucket holds ~1 id) go in unary:
/// per bucket in order, a 1 bit per id, then a 0. The 26 bits after them are packed in key
/// order. That is 28-29 bits per id, where 32 bits per id and a directory of bucket offsets
/// (the filter until memsnap 0.5) took ~37.
#[derive(Default)]
pub(crate) struct KnownFilter {
    bits: u32,
    unary: Vec<u64>,
    /// Id `i`'s 26 bits after its bucket at bit `26 i` (little-endian), then 8 bytes of 0s so
    /// that every id is read as one u64.
    low: Vec<u8>,
    ids: u64,
    /// The position in `unary` of bucket `k * SAMPLE_EVERY`'s closing 0.
    samples: Vec<u64>,
    /// Ids that a failed confirmation proved absent despite a key match.
    excluded: HashSet<ChunkId>,
    /// A key tests make a false hit, as a collision would (MEMSNAP_TEST_FALSE_HIT).
    forced: Option<u64>,
}

/// Builds a [`KnownFilter`] from prefixes in ascending order (an index walk of `chunks`),
/// without holding them all.
pub(crate) struct FilterBuilder {
    filter: KnownFilter,
    /// Bits of `unary` written.
    len: u64,
    /// Buckets closed (0 bits written).
    closed: u64,
    last: Option<u64>,
    last_key: Option<u64>,
}

impl FilterBuilder {
    /// For about `n` prefixes.
    pub(crate) fn new(n: usize, excluded: HashSet<ChunkId>) -> Self {
        let ceil_log2 = match n {
            0 | 1 => 0,
            n => usize::BITS - (n - 1).leading_zeros(),
        };
        let bits = ceil_log2.clamp(1, 64 - LOW_BITS);
        let buckets = 1usize << bits;
        Self {
            filter: KnownFilter {
                bits,
                unary: Vec::with_capacity((n + buckets) / 64 + 1),
                low: Vec::with_capacity(n * LOW_BITS as usize / 8 + 9),
                ids: 0,
                samples: Vec::with_capacity(buckets / SAMPLE_EVERY as usize + 1),
                excluded,
                forced: None,
            },
            len: 0,
            closed: 0,
            last: None,
            last_key: None,
        }
    }

    /// Adds the next prefix; false if it is below the last one (the input is not sorted).
    pub(crate) fn push(&mut self, p: u64) -> bool {
        match self.last {
            Some(last) if p < last => return false,
            Some(last) if p == last => return true,
            _ => {}
        }
        self.last = Some(p);
        let key = self.filter.key(p);
        // Ids that share their top bits + 26 are one key.
        if self.last_key == Some(key) {
            return true;
        }
        self.last_key = Some(key);
        while self.closed < key >> LOW_BITS {
            self.close_bucket();
        }
        self.bit(true);
        let f = &mut self.filter;
        let at = f.ids * u64::from(LOW_BITS);
        let byte = (at / 8) as usize;
        f.low.resize(byte + 8, 0);
        let low = (key & ((1 << LOW_BITS) - 1)) << (at % 8);
        for (b, l) in f.low[byte..].iter_mut().zip(low.to_le_bytes()) {
            *b |= l;
        }
        f.ids += 1;
        true
    }

    fn bit(&mut self, one: bool) {
        let (word, bit) = ((self.len / 64) as usize, self.len % 64);
        if word == self.filter.unary.len() {
            self.filter.unary.push(0);
        }
        if one {
            self.filter.unary[word] |= 1 << bit;
        }
        self.len += 1;
    }

    fn close_bucket(&mut self) {
        if self.closed.is_multiple_of(SAMPLE_EVERY) {
            self.filter.samples.push(self.len);
        }
        self.bit(false);
        self.closed += 1;
    }

    pub(crate) fn finish(mut self) -> KnownFilter {
        while self.closed < 1 << self.filter.bits {
            self.close_bucket();
        }
        if let Some(p) = test_knob("MEMSNAP_TEST_FALSE_HIT") {
            self.filter.forced = Some(self.filter.key(p));
        }
        self.filter
    }
}

impl KnownFilter {
    /// From prefixes in any order (tests).
    #[cfg(test)]
    pub(crate) fn new(mut prefixes: Vec<u64>, excluded: HashSet<ChunkId>) -> Self {
        prefixes.sort_unstable();
        let mut b = FilterBuilder::new(prefixes.len(), excluded);
        for p in prefixes {
            b.push(p);
        }
        b.finish()
    }

    /// The top `bits + 26` bits of prefix `p`: its bucket, then its low bits.
    fn key(&self, p: u64) -> u64 {
        p >> (64 - self.bits - LOW_BITS)
    }

    fn bit(&self, i: u64) -> bool {
        let word = self.unary.get((i / 64) as usize).copied().unwrap_or(0);
        word >> (i % 64) & 1 == 1
    }

    /// The position of bucket `b`'s closing 0 (the `b`-th 0, counted from 0).
    fn bucket_end(&self, b: u64) -> Option<u64> {
        let at = *self.samples.get((b / SAMPLE_EVERY) as usize)?;
        let mut need = b % SAMPLE_EVERY;
        if need == 0 {
            return Some(at);
        }
        let mut w = (at + 1) / 64;
        let mut zeros = !*self.unary.get(w as usize)? & (!0u64 << ((at + 1) % 64));
        loop {
            let n = u64::from(zeros.count_ones());
            if n >= need {
                for _ in 1..need {
                    zeros &= zeros - 1;
                }
                return Some(w * 64 + u64::from(zeros.trailing_zeros()));
            }
            need -= n;
            w += 1;
            zeros = !*self.unary.get(w as usize)?;
        }
    }

    fn low(&self, i: u64) -> Option<u64> {
        if i >= self.ids {
            return None;
        }
        let at = i * u64::from(LOW_BITS);
        let byte = usize::try_from(at / 8).ok()?;
        let word: [u8; 8] = self.low.get(byte..byte + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(word) >> (at % 8) & ((1 << LOW_BITS) - 1))
    }

    pub(crate) fn probably_has(&self, id: &ChunkId) -> bool {
        if self.samples.is_empty() {
            return false;
        }
        let key = self.key(id.prefix());
        (self.forced == Some(key) || self.holds(key)) && !self.excluded.contains(id)
    }

    /// Whether an id with this key was pushed.
    fn holds(&self, key: u64) -> bool {
        let (bucket, low) = (key >> LOW_BITS, key & ((1 << LOW_BITS) - 1));
        let Some(end) = self.bucket_end(bucket) else {
            return false;
        };
        // The bucket's ids are the 1s just before its closing 0, the last of them numbered
        // end - bucket - 1 (every bit before it is an id or one of `bucket` 0s), their low bits
        // ascending.
        let mut i = end - bucket;
        for _ in (0..end).rev().take_while(|&at| self.bit(at)) {
            i -= 1;
            match self.low(i) {
                Some(l) if l > low => {}
                l => return l == Some(low),
            }
        }
        false
    }

    /// Ids held (those sharing a key count once).
    #[cfg(test)]
    pub(crate) fn ids(&self) -> usize {
        self.ids as usize
    }

    /// Bytes held, beside `excluded`.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.unary.capacity() * 8 + self.low.capacity() + self.samples.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_takes_sorted_prefixes_once_each() {
        let mut b = FilterBuilder::new(3, HashSet::new());
        assert!(b.push(5) && b.push(5) && b.push(u64::MAX));
        assert!(!b.push(7), "out of order");
        let f = b.finish();
        assert_eq!(f.ids(), 2);
        assert!(f.probably_has(&ChunkId([0xff; 32])));
    }

    #[test]
    fn finds_every_prefix_and_few_others() {
        let ids: Vec<ChunkId> = (0..5000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        let f = KnownFilter::new(ids.iter().map(|i| i.prefix()).collect(), HashSet::new());
        assert!(ids.iter().all(|i| f.probably_has(i)));
        let others = (5000..10000u32)
            .filter(|i| f.probably_has(&ChunkId::of(&i.to_le_bytes())))
            .count();
        assert_eq!(others, 0);
        assert!(!KnownFilter::default().probably_has(&ids[0]));
        let edge = KnownFilter::new(vec![0, u64::MAX], HashSet::new());
        assert!(edge.probably_has(&ChunkId([0; 32])));
        assert!(edge.probably_has(&ChunkId([0xff; 32])));
        assert!(!edge.probably_has(&ChunkId([0x80; 32])));
        let empty = KnownFilter::new(Vec::new(), HashSet::new());
        assert!(!empty.probably_has(&ids[0]));
        let mut excluded = HashSet::new();
        excluded.insert(ids[7]);
        let f = KnownFilter::new(ids.iter().map(|i| i.prefix()).collect(), excluded);
        assert!(!f.probably_has(&ids[7]) && f.probably_has(&ids[8]));
    }

    fn id_of_prefix(p: u64) -> ChunkId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&p.to_be_bytes());
        ChunkId(id)
    }

    /// Crowded buckets (long runs of 1s across words and samples), empty stretches, and keys
    /// one apart: every held prefix is found, and a key no prefix has is not.
    #[test]
    fn crowded_and_empty_buckets_answer_exactly_by_key() {
        let n = 20_000u64;
        // The bucket is the top 15 bits (2^15 ≥ 20,000), the key those and 26 more.
        let shift = 64 - 15 - LOW_BITS;
        let mut prefixes: Vec<u64> = (0..3000).map(|i| i << shift).collect(); // bucket 0
        prefixes.extend((0..3000u64).map(|i| (7 << (64 - 15)) | (i * 2) << shift));
        prefixes.extend((1..=(n - 6000)).map(|i| u64::MAX - ((i * 999_983) << shift)));
        let f = KnownFilter::new(prefixes.clone(), HashSet::new());
        assert_eq!(f.bits, 15);
        assert_eq!(f.ids(), prefixes.len());
        for p in &prefixes {
            assert!(f.probably_has(&id_of_prefix(*p)), "{p:x}");
            // Bits below the key do not matter.
            assert!(f.probably_has(&id_of_prefix(*p | ((1 << shift) - 1))));
        }
        let held: HashSet<u64> = prefixes.iter().map(|p| p >> shift).collect();
        for key in [
            3000u64,
            3001,
            (7 << 26) | 1,
            (7 << 26) | 5999,
            (7 << 26) | 6000,
            1 << 26,
        ]
        .into_iter()
        .chain((0..2000).map(|i| (u64::MAX >> shift) - i))
        {
            let hit = f.probably_has(&id_of_prefix(key << shift));
            assert_eq!(hit, held.contains(&key), "{key:x}");
        }
    }

    #[test]
    fn keeps_about_three_and_a_half_bytes_per_id() {
        let n = 300_000u32;
        let prefixes: Vec<u64> = (0..n)
            .map(|i| ChunkId::of(&i.to_le_bytes()).prefix())
            .collect();
        let f = KnownFilter::new(prefixes, HashSet::new());
        let per_id = f.heap_bytes() as f64 / f64::from(n);
        assert!(per_id < 3.7, "{per_id} bytes per id");
        let false_hits = (n..n + 200_000)
            .filter(|i| f.probably_has(&ChunkId::of(&i.to_le_bytes())))
            .count();
        assert!(false_hits <= 1, "{false_hits} false hits in 200,000");
    }
}
