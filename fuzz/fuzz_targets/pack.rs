//! Pack reader and chunk decoding: the input (after a flags byte) is a pack file, read as
//! prune, verify and restore read packs: header, trailer, footer entries, then each listed
//! chunk read, zstd-decompressed and length-checked, and tree nodes decoded. Flag bit 1 fixes
//! the footer's BLAKE3 so mutated entries get past it. The hash check must accept exactly the
//! chunks whose bytes hash to their id; a decoded tree node must re-encode to its bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const PACK_ID: [u8; 16] = [0xab; 16];

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(memsnap_fuzz::scratch);
    let Some((&flags, pack)) = data.split_first() else {
        return;
    };
    let mut pack = pack.to_vec();
    if flags & 1 != 0 {
        memsnap_fuzz::fix_pack_checksum(&mut pack);
    }
    let path = memsnap::fuzzing::pack_path(dir.path(), PACK_ID);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, &pack).expect("write pack");
    memsnap::fuzzing::pack(dir.path(), PACK_ID);
});
