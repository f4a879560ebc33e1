//! Bundle import of a mutated valid bundle: the input is the bundle's decompressed tar as pieces
//! (`memsnap_fuzz::bundle_of_pieces`: a flags byte, then `<type><name>\n<data>` per entry),
//! which the target turns back into a tar, fixes the manifest's sizes, digests and seals to
//! match (flag 1), and recompresses, so mutations reach the checks behind zstd, tar headers and
//! SHA-256s. Same assertions as `bundle_import`: no panic, no hang, bounded memory, and a failed
//! import leaves the store unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bundle = memsnap_fuzz::bundle_of_pieces(data);
    if !bundle.is_empty() {
        memsnap_fuzz::import_checked(&bundle);
    }
});
