//! What the fuzz targets share: a scratch store that bundles are imported into (and the check
//! that a refused import leaves it as it was), the structured bundle encoding of
//! `bundle_import_structured`, and the pack trailer fix-up of `pack`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memsnap::{ImportRequest, Memsnap, StoreOptions};
use sha2::{Digest, Sha256};

/// The throwaway age key of the nexo-memory-snapshot fixtures (tests/fixtures/.../03-age).
pub const TEST_IDENTITY: &str =
    "AGE-SECRET-KEY-193M62C6ZPA7ZEXU2W88TNY5EJYF0CWWWUP68L7LRTSUSY2QF2J7QTHZMZN\n";
pub const TEST_RECIPIENT: &str = "age1dlaac65wd8367dddxt8l4epq7muv6gx6nfkqzxmjgl9mm20sd9msy5s5ad";

/// A scratch folder in memory when the machine has one (a fuzzer writes a bundle per run).
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    match shm.is_dir() {
        true => tempfile::tempdir_in(shm),
        false => tempfile::tempdir(),
    }
    .expect("scratch folder")
}

struct World {
    dir: tempfile::TempDir,
    store: Memsnap,
}

impl World {
    fn new() -> World {
        let dir = scratch();
        fs::write(dir.path().join("identity.txt"), TEST_IDENTITY).expect("identity");
        let store = Memsnap::create(dir.path().join("store"), StoreOptions::default())
            .expect("scratch store");
        World { dir, store }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("fuzz.tar.zst")
    }
}

static WORLD: Mutex<Option<World>> = Mutex::new(None);

/// Everything in the store folder that a refused import must leave alone: each file but the
/// redb index (which an open may touch) and the lock files (created on first use, they hold the
/// holder's name) with its bytes, and the snapshots as `list` shows them.
fn store_state(w: &World) -> (BTreeMap<PathBuf, Vec<u8>>, String) {
    let root = w.dir.path().join("store");
    let mut files = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read store folder") {
            let e = e.expect("entry");
            let p = e.path();
            if e.file_type().expect("type").is_dir() {
                stack.push(p);
            } else if e.file_name() != "index.redb" && !p.starts_with(root.join("locks")) {
                let rel = p.strip_prefix(&root).expect("inside").to_path_buf();
                files.insert(rel, fs::read(&p).unwrap_or_default());
            }
        }
    }
    let list = w.store.list(None, None).expect("list");
    (files, format!("{list:?}"))
}

/// Imports `bundle` (written with a matching `.sha256`, imported with the fixtures' age
/// identity) into the scratch store. A refused import must leave the store as it was; an
/// accepted one resets the store for the next run. Returns whether the import was accepted.
pub fn import_checked(bundle: &[u8]) -> bool {
    let mut guard = WORLD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let w = guard.get_or_insert_with(World::new);
    let path = w.bundle();
    fs::write(&path, bundle).expect("write bundle");
    let mut sib = path.clone().into_os_string();
    sib.push(".sha256");
    fs::write(&sib, hex::encode(Sha256::digest(bundle))).expect("write .sha256");
    let before = store_state(w);
    let req = ImportRequest::new(&path).identity(w.dir.path().join("identity.txt"));
    match w.store.import(&req) {
        Ok(_) => {
            // Later runs start from an empty store again.
            *guard = None;
            true
        }
        Err(_) => {
            let after = store_state(w);
            assert_eq!(
                before.1, after.1,
                "a refused import changed the store's snapshots"
            );
            let changed: Vec<_> = before
                .0
                .keys()
                .chain(after.0.keys())
                .filter(|k| before.0.get(*k) != after.0.get(*k))
                .collect();
            assert!(
                changed.is_empty(),
                "a refused import changed the store: {changed:?}"
            );
            false
        }
    }
}

/// Separates the pieces of a structured bundle (see [`tar_of_pieces`]).
pub const SEP: &[u8] = b"\n\0~entry~\0\n";

/// Flag bit: set each artifact's size and digest and both seals from the pieces.
pub const FIX_DIGESTS: u8 = 1;
/// Flag bit: compress the archive as two zstd frames (import decodes them as one stream).
pub const TWO_FRAMES: u8 = 2;

/// The structured input of `bundle_import_structured`: a flags byte, then pieces separated by
/// [`SEP`], each `<tar type flag><name>\n<data>`. The first piece is normally `manifest.json`.
/// Returns the bundle: a GNU tar of the pieces, zstd-compressed. With [`FIX_DIGESTS`] the
/// manifest (when it is JSON) is made to agree with the pieces, so that a mutation of an
/// artifact's bytes or of a manifest field reaches the checks behind the digests.
pub fn bundle_of_pieces(input: &[u8]) -> Vec<u8> {
    let Some((&flags, rest)) = input.split_first() else {
        return Vec::new();
    };
    let mut pieces: Vec<(u8, Vec<u8>, Vec<u8>)> = split(rest, SEP)
        .into_iter()
        .filter_map(|p| {
            let (&kind, p) = p.split_first()?;
            let nl = p.iter().position(|b| *b == b'\n').unwrap_or(p.len());
            let data = p.get(nl + 1..).unwrap_or_default();
            Some((kind, p[..nl].to_vec(), data.to_vec()))
        })
        .collect();
    if flags & FIX_DIGESTS != 0 {
        fix_manifest(&mut pieces);
    }
    let tar = tar_of_pieces(&pieces);
    if flags & TWO_FRAMES != 0 {
        let (a, b) = tar.split_at(tar.len() / 2);
        let mut out = zstd::encode_all(a, 1).expect("zstd");
        out.extend(zstd::encode_all(b, 1).expect("zstd"));
        out
    } else {
        zstd::encode_all(tar.as_slice(), 1).expect("zstd")
    }
}

fn split<'a>(mut bytes: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(at) = bytes.windows(sep.len()).position(|w| w == sep) {
        out.push(&bytes[..at]);
        bytes = &bytes[at + sep.len()..];
    }
    out.push(bytes);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn fix_manifest(pieces: &mut [(u8, Vec<u8>, Vec<u8>)]) {
    let data: BTreeMap<Vec<u8>, (u64, String)> = pieces
        .iter()
        .map(|(_, n, d)| (n.clone(), (d.len() as u64, sha256_hex(d))))
        .collect();
    let Some(m) = pieces.iter_mut().find(|p| p.1 == b"manifest.json") else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&m.2) else {
        return;
    };
    let fix = |list: Option<&mut serde_json::Value>| -> Option<String> {
        let list = list?.as_array_mut()?;
        let mut seal = Sha256::new();
        for a in list.iter_mut() {
            let found = a
                .get("path_in_bundle")
                .and_then(|n| n.as_str())
                .and_then(|n| data.get(n.as_bytes()))
                .cloned();
            if let (Some(o), Some((size, sha))) = (a.as_object_mut(), found) {
                o.insert("size_bytes".into(), size.into());
                o.insert("sha256".into(), sha.into());
            }
            if let Some(s) = a.get("sha256").and_then(|s| s.as_str()) {
                seal.update(s.as_bytes());
            }
        }
        Some(hex::encode(seal.finalize()))
    };
    if let Some(s) = fix(v.get_mut("artifacts")) {
        v["bundle_sha256"] = s.into();
    }
    if let Some(s) = fix(v
        .get_mut("memsnap")
        .and_then(|x| x.get_mut("extra_artifacts")))
    {
        v["memsnap"]["extra_sha256"] = s.into();
    }
    m.2 = serde_json::to_vec(&v).expect("JSON");
}

/// A GNU tar of `(type flag, name, data)` entries, names and flags as given (long names in GNU
/// long-name records), headers as memsnap writes them (mode 0600, mtime 0, uid/gid 0).
pub fn tar_of_pieces(pieces: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, name, data) in pieces {
        if name.len() > 100 {
            let mut body = name.clone();
            body.push(0);
            push_entry(&mut out, b'L', b"././@LongLink", &body);
        }
        push_entry(&mut out, *kind, &name[..name.len().min(100)], data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn push_entry(out: &mut Vec<u8>, kind: u8, name: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    let old = h.as_old_mut();
    old.name = [0; 100];
    old.name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

/// The structured input of a real bundle's decompressed tar (for seeds): flags
/// [`FIX_DIGESTS`], then each entry as a piece.
pub fn pieces_of_tar(tar: &[u8]) -> Vec<u8> {
    let mut out = vec![FIX_DIGESTS];
    let mut archive = tar::Archive::new(tar);
    for (i, e) in archive.entries().expect("tar").enumerate() {
        let mut e = e.expect("entry");
        if i > 0 {
            out.extend_from_slice(SEP);
        }
        out.push(e.header().entry_type().as_byte());
        out.extend_from_slice(&e.path_bytes());
        out.push(b'\n');
        std::io::copy(&mut e, &mut out).expect("read entry");
    }
    out
}

/// Pack trailer layout (store-format.md, "Pack files").
const TRAILER: usize = 56;
const ENTRY: usize = 49;

/// Rewrites a pack's footer checksum to match its footer entries, when the trailer's offsets
/// fit the file, so that mutated entries reach the code behind the checksum.
pub fn fix_pack_checksum(pack: &mut [u8]) {
    let len = pack.len();
    if len < 16 + TRAILER {
        return;
    }
    let t = len - TRAILER;
    let offset = u64::from_le_bytes(pack[t..t + 8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(pack[t + 8..t + 12].try_into().expect("4 bytes")) as u64;
    let end = offset.checked_add(count * ENTRY as u64);
    if offset >= 16 && end == Some(t as u64) {
        let hash = blake3::hash(&pack[offset as usize..t]);
        pack[t + 16..t + 48].copy_from_slice(hash.as_bytes());
    }
}
