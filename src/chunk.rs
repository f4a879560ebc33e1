//! Where chunks are cut. Both rules are part of the store format: changing either changes
//! every chunk id and defeats deduplication against existing data, so they are pinned by the
//! golden tests below (fastcdc 4.0.0 once changed its cut points silently).
//! - Files: FastCDC v2020, normalisation level 1, sizes from the store config.
//! - SQLite databases: whole pages, grouped up to `sqlite_min_chunk` bytes (store-format.md).

use std::io::Read;

use crate::store::config::StoreConfig;

pub(crate) fn file_chunker<R: Read>(
    reader: R,
    config: &StoreConfig,
) -> fastcdc::v2020::StreamCDC<R> {
    fastcdc::v2020::StreamCDC::new(
        reader,
        config.cdc_min as usize,
        config.cdc_avg as usize,
        config.cdc_max as usize,
    )
}

/// Bytes per SQLite chunk: one page, or as many whole pages as make `sqlite_min_chunk`.
pub(crate) fn sqlite_chunk_len(page_size: u32, config: &StoreConfig) -> usize {
    let page = page_size.max(1) as usize;
    let min = config.sqlite_min_chunk as usize;
    page * min.div_ceil(page).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: seeded data whose bytes do not depend on any crate's RNG.
    fn seeded(len: usize, mut s: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn cuts(data: &[u8]) -> Vec<u64> {
        let config = StoreConfig::new_default(0);
        file_chunker(data, &config)
            .map(|c| c.expect("in-memory read").offset)
            .collect()
    }

    #[test]
    fn default_chunker_parameters_are_pinned() {
        let c = StoreConfig::new_default(0);
        assert_eq!((c.cdc_min, c.cdc_avg, c.cdc_max), (4096, 16384, 65536));
        assert_eq!(
            (c.sqlite_min_chunk, c.tree_fanout, c.tree_max_entries),
            (4096, 16, 64)
        );
    }

    #[test]
    fn golden_fastcdc_cut_points_on_seeded_data() {
        let data = seeded(256 * 1024, 0x6d65_6d73_6e61_7031);
        let got = cuts(&data);
        let golden: Vec<u64> = GOLDEN.to_vec();
        assert_eq!(
            got, golden,
            "FastCDC cut points changed: this breaks dedup with every existing store"
        );
    }

    #[test]
    fn cut_points_resynchronise_after_an_insert() {
        let data = seeded(512 * 1024, 7);
        let mut edited = data.clone();
        edited.splice(100_000..100_000, [1u8, 2, 3]);
        let a = cuts(&data);
        let b: Vec<u64> = cuts(&edited)
            .into_iter()
            .map(|o| if o > 100_000 { o - 3 } else { o })
            .collect();
        let shared = a.iter().filter(|o| b.contains(o)).count();
        assert!(
            shared + 3 >= a.len(),
            "only {shared} of {} cut points survived",
            a.len()
        );
    }

    #[test]
    fn sqlite_chunks_are_whole_pages_of_at_least_4_kib() {
        let c = StoreConfig::new_default(0);
        assert_eq!(sqlite_chunk_len(512, &c), 4096);
        assert_eq!(sqlite_chunk_len(1024, &c), 4096);
        assert_eq!(sqlite_chunk_len(4096, &c), 4096);
        assert_eq!(sqlite_chunk_len(8192, &c), 8192);
        assert_eq!(sqlite_chunk_len(65536, &c), 65536);
    }

    /// Seeded bytes, made compressible (four letters) when `text` is set.
    fn sample(len: usize, seed: u64, text: bool) -> Vec<u8> {
        let mut data = seeded(len, seed);
        if text {
            data.iter_mut().for_each(|b| *b = b'a' + *b % 4);
        }
        data
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// FastCDC's chunks are the input, back to back: contiguous offsets, nothing lost or
        /// repeated, every chunk within the configured sizes (the last may be shorter).
        #[test]
        fn fastcdc_chunks_concatenate_to_the_input(
            len in 0usize..300_000,
            seed: u64,
            text: bool,
            small: bool,
        ) {
            let data = sample(len, seed, text);
            let mut config = StoreConfig::new_default(0);
            if small {
                (config.cdc_min, config.cdc_avg, config.cdc_max) = (64, 256, 1024);
            }
            let chunks: Vec<_> = file_chunker(data.as_slice(), &config)
                .map(|c| c.expect("in-memory read"))
                .collect();
            let mut joined = Vec::with_capacity(len);
            for (i, c) in chunks.iter().enumerate() {
                proptest::prop_assert_eq!(c.offset, joined.len() as u64);
                proptest::prop_assert!(c.data.len() <= config.cdc_max as usize);
                if i + 1 < chunks.len() {
                    proptest::prop_assert!(c.data.len() >= config.cdc_min as usize);
                }
                joined.extend_from_slice(&c.data);
            }
            proptest::prop_assert_eq!(joined, data);
        }

        /// A page-aligned chunk is whole pages and at least `sqlite_min_chunk` bytes, and the
        /// smallest such: one page fewer would fall short.
        #[test]
        fn sqlite_chunks_are_the_fewest_whole_pages_that_reach_the_minimum(
            page_log in 9u32..17,
            min in 1u32..200_000,
        ) {
            let page = 1u32 << page_log;
            let mut config = StoreConfig::new_default(0);
            config.sqlite_min_chunk = min;
            let len = sqlite_chunk_len(page, &config);
            proptest::prop_assert_eq!(len % page as usize, 0);
            proptest::prop_assert!(len >= min as usize);
            proptest::prop_assert!(len == page as usize || len - (page as usize) < min as usize);
        }
    }

    const GOLDEN: [u64; 15] = [
        0, 12398, 30117, 35617, 56701, 72005, 101019, 113652, 132322, 161117, 187103, 191943,
        210721, 228969, 252590,
    ];
}
