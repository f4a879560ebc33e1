//! Bundle import of arbitrary bytes: the file as `memsnap import` reads it (age, zstd, tar,
//! manifest, artifacts), with a matching `.sha256` and the fixtures' age identity, into a
//! scratch store. Must not panic, hang or grow without bound, and an import that fails must
//! leave the store exactly as it was (files, pack files, listed snapshots).
//! Seeds: the nexo-memory-snapshot fixture bundles (plain and age) and sample-agent exports.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    memsnap_fuzz::import_checked(data);
});
