//! Index value decoding: the first byte picks what the rest is decoded as, as the store reads
//! it from index.redb or a manifest tree: 0 snapshot record, 1 artifact entry stream, 2 agent
//! record, 3 pack record, 4 store config, 5 `chunks` value, 6 tree node (bincode behind a
//! version byte; store-format.md, "The index"). Must not panic or allocate without bound, and
//! whatever decodes must round-trip through its encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&tag, bytes)) = data.split_first() {
        memsnap::fuzzing::index_value(tag, bytes);
    }
});
