//! The plane codec's decoder (store-format.md, "Plane-coded chunks"): the input is a stored
//! chunk, its raw length read from its own header. Must not panic or allocate without bound;
//! whatever decodes must survive encode → decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    memsnap::fuzzing::plane_chunk(data);
});
