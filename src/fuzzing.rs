//! Entry points for the cargo-fuzz targets in `fuzz/` (cargo feature `fuzzing`; hidden, not a
//! stable API). Each function hands untrusted bytes to one of the crate's own decoders, exactly
//! as an import or a store read would, so that the fuzzers reach parsers that are `pub(crate)`.
//!
//! Errors are the expected outcome and are ignored. A function panics only where a decoder breaks
//! one of its own promises, e.g. a value it accepted does not survive encode → decode, or a chunk
//! passes the hash check although its bytes do not hash to its id. Bundle import itself needs no
//! entry point: the targets call [`crate::Memsnap::import`].

use std::path::{Path, PathBuf};

use crate::bundle::manifest::{self, BundleManifest};
use crate::manifest::agent::{AGENT_VERSION, AgentRecord};
use crate::manifest::artifact;
use crate::manifest::snapshot::{SNAPSHOT_VERSION, SnapshotRecord};
use crate::storage::Fs;
use crate::store::chunk_id::ChunkId;
use crate::store::index::{self, PackRecord};
use crate::store::pack::{self, ChunkLoc, FLAG_TREE, PackId};
use crate::store::planes;
use crate::store::reader::PackFiles;
use crate::tree;

/// Chunks of one fuzzed pack that are read and decoded (a footer may list millions).
const MAX_CHUNKS: usize = 256;

/// `manifest.json` as an import reads it: parsed and checked, then planned into snapshot entries.
/// Returns whether it was accepted. An accepted manifest must be accepted again once written back
/// as JSON, with the same plan.
pub fn bundle_manifest(bytes: &[u8]) -> bool {
    let bundle = Path::new("fuzz.tar.zst");
    let Ok(m) = BundleManifest::parse(bytes, bundle) else {
        return false;
    };
    let _ = manifest::seal(&m.artifacts);
    let Ok(planned) = crate::bundle::import::plan(&m, bundle) else {
        return false;
    };
    let again = serde_json::to_vec(&m).expect("a parsed manifest serialises");
    let m2 = BundleManifest::parse(&again, bundle).expect("a written-back manifest parses");
    let planned2 = crate::bundle::import::plan(&m2, bundle).expect("and plans");
    assert_eq!(
        planned.len(),
        planned2.len(),
        "the same plan after a round trip"
    );
    true
}

/// Where [`pack`] expects the pack `id` under `packs_dir`.
pub fn pack_path(packs_dir: &Path, id: [u8; 16]) -> PathBuf {
    PackId(id).path(packs_dir)
}

/// A pack file as prune, verify and restore read it: footer and trailer, then each listed chunk
/// read, decompressed and length-checked, tree nodes decoded. Returns the number of chunks that
/// decoded. The hash check must agree with a BLAKE3 of the decoded bytes.
pub fn pack(packs_dir: &Path, id: [u8; 16]) -> usize {
    let id = PackId(id);
    let Ok(entries) = pack::read_footer(&Fs::default(), &id.path(packs_dir)) else {
        return 0;
    };
    let files = PackFiles::new(&Fs::default(), packs_dir.to_path_buf());
    let mut decoded = 0;
    for e in entries.iter().take(MAX_CHUNKS) {
        let loc = ChunkLoc {
            pack: id,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            flags: e.flags,
        };
        // Unchecked first, so that the decoders below see bytes no fuzzer can forge a hash for.
        let Ok(raw) = files.read_checked(&e.id, &loc, false) else {
            continue;
        };
        decoded += 1;
        assert_eq!(raw.len(), e.raw_len as usize, "decode checks the length");
        let checked = files.read(&e.id, &loc);
        assert_eq!(
            checked.is_ok(),
            ChunkId::of(&raw) == e.id,
            "the hash check accepts exactly the chunks that hash to their id"
        );
        if e.flags & FLAG_TREE != 0 {
            tree_node(&raw, raw.get(1).copied().unwrap_or(1));
        }
    }
    decoded
}

/// A plane-coded chunk (store-format.md, "Plane-coded chunks") as repair's scan decodes it (its
/// raw length from its own header) and as a read does. Returns whether it decoded. What decodes
/// and the encoder takes again must decode back to the same bytes.
pub fn plane_chunk(bytes: &[u8]) -> bool {
    let Ok((n, raw)) = planes::decode_at(bytes) else {
        return false;
    };
    let raw_len = raw.len();
    // Read as an index entry names it: the same bytes.
    let mut again = vec![0u8; raw_len];
    assert_eq!(planes::decode_into(&bytes[..n], &mut again), Ok(()));
    assert_eq!(again, raw, "decoded alone and in a scan alike");
    // Export's frame of the same record: any zstd decoder reads it back to the same bytes.
    let coded =
        planes::decode_to_frame(&bytes[..n], raw_len).expect("a record that decodes frames");
    assert_eq!(
        coded.content(),
        raw,
        "the frame's content is the decoded bytes"
    );
    let back = zstd::bulk::decompress(&coded.frame, raw_len.max(1)).expect("the frame is zstd");
    assert_eq!(back, raw, "export's frame holds the decoded bytes");
    if let Some(again) = planes::encode(&raw, 0) {
        let mut back = vec![0u8; raw_len];
        assert_eq!(
            planes::decode_into(&again, &mut back),
            Ok(()),
            "an encoded chunk decodes"
        );
        assert_eq!(back, raw, "plane codec round trip");
    }
    true
}

/// A tree node (store-format.md, "Tree nodes"): what decodes must encode to the same bytes.
pub fn tree_node(bytes: &[u8], level: u8) {
    if let Ok(children) = tree::decode_node(bytes, level) {
        assert_eq!(
            tree::encode_node(level, &children),
            bytes,
            "a node decodes only from its one encoding"
        );
    }
}

/// One value as the index stores it, chosen by `tag`: 0 a snapshot record, 1 an artifact entry
/// stream (a snapshot's manifest), 2 an agent record, 3 a pack record, 4 the store config, 5 a
/// `chunks` value, 6 a tree node. Whatever decodes must decode again, equal, after encoding.
pub fn index_value(tag: u8, bytes: &[u8]) {
    match tag % 7 {
        0 => round_trip::<SnapshotRecord>(SNAPSHOT_VERSION, bytes, "snapshot"),
        1 => {
            if let Ok(entries) = artifact::decode_entries(bytes) {
                let again = artifact::encode_entries(&entries).expect("decoded entries encode");
                let back = artifact::decode_entries(&again).expect("re-encoded entries decode");
                assert_eq!(back, entries, "entry stream round trip");
            }
        }
        2 => round_trip::<AgentRecord>(AGENT_VERSION, bytes, "agent"),
        3 => round_trip::<PackRecord>(1, bytes, "pack record"),
        4 => {
            if let Ok(config) = crate::store::decode_config(Path::new("index.redb"), bytes) {
                let again = index::encode_record(1, &config, "config").expect("config encodes");
                let back = crate::store::decode_config(Path::new("index.redb"), &again);
                assert_eq!(back.ok(), Some(config), "store config round trip");
            }
        }
        5 => {
            if let Ok(b) = <&[u8; 33]>::try_from(bytes) {
                assert_eq!(
                    &ChunkLoc::decode(b).encode(),
                    b,
                    "chunk location round trip"
                );
            }
        }
        _ => tree_node(bytes, bytes.get(1).copied().unwrap_or(1)),
    }
}

fn round_trip<T>(version: u8, bytes: &[u8], what: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = index::decode_record::<T>(version, bytes, what) {
        let again = index::encode_record(version, &value, what).expect("a decoded record encodes");
        let back = index::decode_record::<T>(version, &again, what).expect("and decodes again");
        assert_eq!(back, value, "{what} round trip");
    }
}

/// Seeds for [`plane_chunk`]: the stored bytes of up to `max` plane-coded chunks of a pack file.
pub fn plane_seeds(pack_path: &Path, max: usize) -> Vec<Vec<u8>> {
    let Ok(entries) = pack::read_footer(&Fs::default(), pack_path) else {
        return Vec::new();
    };
    let Ok(bytes) = std::fs::read(pack_path) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|e| e.flags & pack::FLAG_PLANES != 0)
        .filter_map(|e| {
            let at = usize::try_from(e.offset).ok()?;
            bytes
                .get(at..at.checked_add(e.stored_len as usize)?)
                .map(<[u8]>::to_vec)
        })
        .take(max)
        .collect()
}

/// Seeds for [`index_value`] from a real store: `tag` then the bytes, for every value of the
/// `meta` (config), `packs`, `snapshots` and `agents` tables, a few `chunks` values, and each
/// snapshot's entry stream and tree nodes.
pub fn index_seeds(store_root: &Path) -> Result<Vec<Vec<u8>>, crate::Error> {
    use redb::ReadableTable;

    let store = crate::store::Store::open(
        store_root,
        std::time::Duration::from_secs(30),
        Fs::default(),
    )?;
    let ix = store.index()?;
    let tx = ix.begin_read()?;
    let err = ix.err();
    let mut out = Vec::new();
    let tagged = |tag: u8, bytes: &[u8]| [&[tag][..], bytes].concat();
    let meta = tx.open_table(index::META).map_err(|e| err(e.into()))?;
    if let Some(v) = meta.get("config").map_err(|e| err(e.into()))? {
        out.push(tagged(4, v.value()));
    }
    for (tag, table) in [(0, index::SNAPSHOTS), (2, index::AGENTS)] {
        let t = tx.open_table(table).map_err(|e| err(e.into()))?;
        for row in t.iter().map_err(|e| err(e.into()))? {
            let (_, v) = row.map_err(|e| err(e.into()))?;
            out.push(tagged(tag, v.value()));
        }
    }
    let packs = tx.open_table(index::PACKS).map_err(|e| err(e.into()))?;
    for row in packs.iter().map_err(|e| err(e.into()))?.take(4) {
        let (_, v) = row.map_err(|e| err(e.into()))?;
        out.push(tagged(3, v.value()));
    }
    let chunks = tx.open_table(index::CHUNKS).map_err(|e| err(e.into()))?;
    for row in chunks.iter().map_err(|e| err(e.into()))?.take(4) {
        let (_, v) = row.map_err(|e| err(e.into()))?;
        out.push(tagged(5, v.value()));
    }
    let records = crate::ops::all_records(&ix, &tx)?;
    let mut reader = crate::store::reader::ChunkReader::new(&ix, store.packs_dir())?;
    for record in records {
        let (mut stream, mut nodes) = (Vec::new(), Vec::new());
        tree::walk(
            &mut reader,
            &record.manifest,
            true,
            &mut |id, is_data, data| {
                let data = data?;
                match is_data {
                    true => stream.extend_from_slice(&data),
                    false => nodes.push(*id),
                }
                Ok(())
            },
        )?;
        let roots = artifact::decode_entries(&stream)?
            .into_iter()
            .filter_map(|e| e.content)
            .filter(|c| c.height > 0)
            .map(|c| c.root);
        nodes.extend(roots);
        out.push(tagged(1, &stream));
        for id in nodes.iter().take(8) {
            out.push(tagged(6, &reader.read(id)?));
        }
    }
    Ok(out)
}
