//! Bundle manifest parsing: `manifest.json` bytes through `BundleManifest::parse` (JSON, version
//! and format checks, ids, artifact paths, kinds, digests) and the import's plan of snapshot
//! entries (escapes, parts, folders, symlinks). An accepted manifest must be accepted again,
//! with the same plan, after it is written back as JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    memsnap::fuzzing::bundle_manifest(data);
});
