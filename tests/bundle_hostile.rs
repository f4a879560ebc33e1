//! Hostile bundles: every way store-format.md ("Bundles (export and import)", "What a reader
//! refuses") says a bundle from another machine can be bad, fed to `import`, `restore --bundle`
//! and `verify-bundle`. Each case starts from a real exported bundle, changes one thing with the
//! builder below, and checks the exit code, that the message names the problem, that the store is
//! exactly as it was (files but for index.redb, packs, `list`, `verify --read-data`) and that the
//! live agent was not touched.
//!
//! Tests whose doc comment starts "Regression" pin bugs these tests found, since fixed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};

// =============================================================================================
// The bundle builder: take a bundle apart (manifest JSON + tar entries), change it, put it back
// =============================================================================================

mod builder {
    use std::fs;
    use std::io::Read;
    use std::path::{Path, PathBuf};

    use serde_json::{Value, json};
    use sha2::{Digest, Sha256};

    pub fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// `BUNDLE.sha256`, the sibling checksum file.
    pub fn sibling(bundle: &Path) -> PathBuf {
        let mut s = bundle.as_os_str().to_owned();
        s.push(".sha256");
        PathBuf::from(s)
    }

    /// Writes `bytes` as the bundle and a matching `.sha256` beside it (hex, no newline, as
    /// memsnap writes it).
    pub fn write_with_sibling(bundle: &Path, bytes: &[u8]) {
        fs::write(bundle, bytes).expect("write bundle");
        fs::write(sibling(bundle), sha256_hex(bytes)).expect("write .sha256");
    }

    /// Copies a bundle and its sibling to `to`.
    pub fn copy_bundle(from: &Path, to: &Path) {
        fs::copy(from, to).expect("copy bundle");
        fs::copy(sibling(from), sibling(to)).expect("copy .sha256");
    }

    pub fn decompress(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .expect("zstd")
            .read_to_end(&mut out)
            .expect("decompress");
        out
    }

    pub fn compress(plain: &[u8]) -> Vec<u8> {
        zstd::encode_all(plain, 3).expect("zstd compress")
    }

    // Tar type flags.
    pub const REGULAR: u8 = b'0';
    pub const HARD_LINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR_DEVICE: u8 = b'3';
    pub const DIRECTORY: u8 = b'5';
    pub const FIFO: u8 = b'6';

    /// One tar entry, written by hand so that anything can be said in it (`..`, absolute names,
    /// links, devices), which `tar::Builder` refuses to write.
    #[derive(Clone, Debug)]
    pub struct Entry {
        pub name: Vec<u8>,
        pub kind: u8,
        pub link: Vec<u8>,
        pub data: Vec<u8>,
        /// The header's size field, when it is to lie about `data`.
        pub header_size: Option<u64>,
        /// PAX records (`x` header) written before the entry.
        pub pax: Vec<(String, String)>,
    }

    impl Entry {
        pub fn file(name: &str, data: &[u8]) -> Entry {
            Entry {
                name: name.as_bytes().to_vec(),
                kind: REGULAR,
                link: Vec::new(),
                data: data.to_vec(),
                header_size: None,
                pax: Vec::new(),
            }
        }

        pub fn special(name: &str, kind: u8, link: &str) -> Entry {
            Entry {
                kind,
                link: link.as_bytes().to_vec(),
                ..Entry::file(name, b"")
            }
        }
    }

    /// A 512-byte GNU header as memsnap writes them (mode 0600, mtime 0, uid/gid 0), with the
    /// name and link bytes put in place directly and the checksum fixed afterwards.
    fn header(name: &[u8], kind: u8, link: &[u8], size: u64) -> tar::Header {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "long names go in records"
        );
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        if kind == CHAR_DEVICE {
            // /dev/null.
            h.set_device_major(1).expect("device major");
            h.set_device_minor(3).expect("device minor");
        }
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        h
    }

    fn push_block_padded(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    /// Appends one entry (with GNU long-name/long-link records and PAX records as needed).
    pub fn push_entry(out: &mut Vec<u8>, e: &Entry) {
        if !e.pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &e.pax {
                // "LEN key=value\n", LEN counting itself.
                let rest = format!(" {k}={v}\n");
                let mut len = rest.len() + 1;
                while format!("{len}{rest}").len() != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len}{rest}").as_bytes());
            }
            let h = header(b"././@PaxHeader", b'x', b"", body.len() as u64);
            out.extend_from_slice(h.as_bytes());
            push_block_padded(out, &body);
        }
        for (bytes, flag) in [(&e.link, b'K'), (&e.name, b'L')] {
            if bytes.len() > 100 {
                let mut body = bytes.clone();
                body.push(0);
                let h = header(b"././@LongLink", flag, b"", body.len() as u64);
                out.extend_from_slice(h.as_bytes());
                push_block_padded(out, &body);
            }
        }
        let cut = |b: &[u8]| b[..b.len().min(100)].to_vec();
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        let h = header(&cut(&e.name), e.kind, &cut(&e.link), size);
        out.extend_from_slice(h.as_bytes());
        push_block_padded(out, &e.data);
    }

    /// The end-of-archive marker.
    pub fn push_end(out: &mut Vec<u8>) {
        out.extend(std::iter::repeat_n(0u8, 1024));
    }

    /// A bundle taken apart: the manifest (JSON, or raw bytes that replace it) and the other
    /// entries in archive order.
    #[derive(Clone)]
    pub struct Bundle {
        pub manifest: Value,
        /// Written instead of the JSON manifest (e.g. bytes that are not JSON).
        pub manifest_raw: Option<Vec<u8>>,
        /// Where manifest.json goes among the entries (0: first, as it must).
        pub manifest_pos: usize,
        pub entries: Vec<Entry>,
        /// Keep `bundle_sha256` and `memsnap.extra_sha256` as they are instead of recomputing
        /// them on write (for the seal cases).
        pub keep_seals: bool,
    }

    impl Bundle {
        /// Reads a plain (not encrypted) bundle.
        pub fn read(path: &Path) -> Bundle {
            let plain = decompress(&fs::read(path).expect("read bundle"));
            let mut a = tar::Archive::new(plain.as_slice());
            let mut entries = Vec::new();
            for e in a.entries().expect("tar entries") {
                let mut e = e.expect("tar entry");
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read entry");
                entries.push(Entry {
                    name: e.path_bytes().into_owned(),
                    kind: e.header().entry_type().as_byte(),
                    link: e
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default(),
                    data,
                    header_size: None,
                    pax: Vec::new(),
                });
            }
            let first = entries.remove(0);
            assert_eq!(
                first.name, b"manifest.json",
                "a real bundle starts with its manifest"
            );
            Bundle {
                manifest: serde_json::from_slice(&first.data).expect("manifest JSON"),
                manifest_raw: None,
                manifest_pos: 0,
                entries,
                keep_seals: false,
            }
        }

        pub fn artifacts(&self) -> Vec<Value> {
            let mut all = self.manifest["artifacts"]
                .as_array()
                .expect("artifacts")
                .clone();
            if let Some(x) = self.manifest["memsnap"]["extra_artifacts"].as_array() {
                all.extend(x.iter().cloned());
            }
            all
        }

        /// A manifest artifact (nexo's or memsnap's extra ones) by its path in the bundle.
        pub fn artifact_mut(&mut self, path: &str) -> &mut Value {
            let m = &mut self.manifest;
            let in_main = m["artifacts"]
                .as_array()
                .expect("artifacts")
                .iter()
                .any(|a| a["path_in_bundle"] == path);
            let list = if in_main {
                &mut m["artifacts"]
            } else {
                &mut m["memsnap"]["extra_artifacts"]
            };
            list.as_array_mut()
                .expect("artifact list")
                .iter_mut()
                .find(|a| a["path_in_bundle"] == path)
                .unwrap_or_else(|| panic!("no artifact {path} in the manifest"))
        }

        pub fn artifacts_mut(&mut self) -> &mut Vec<Value> {
            self.manifest["artifacts"]
                .as_array_mut()
                .expect("artifacts")
        }

        pub fn memsnap_entries_mut(&mut self) -> &mut Vec<Value> {
            self.manifest["memsnap"]["entries"]
                .as_array_mut()
                .expect("memsnap.entries")
        }

        pub fn position(&self, name: &str) -> usize {
            self.entries
                .iter()
                .position(|e| e.name == name.as_bytes())
                .unwrap_or_else(|| panic!("no tar entry {name}"))
        }

        pub fn entry_mut(&mut self, name: &str) -> &mut Entry {
            let i = self.position(name);
            &mut self.entries[i]
        }

        /// The first artifact whose bundle path starts with `prefix`.
        pub fn first_artifact(&self, prefix: &str) -> String {
            self.artifacts()
                .iter()
                .map(|a| a["path_in_bundle"].as_str().expect("path").to_owned())
                .find(|p| p.starts_with(prefix))
                .unwrap_or_else(|| panic!("no artifact under {prefix}"))
        }

        /// Adds a memdir file consistently: the artifact (with its digest), the memsnap entry
        /// and the tar entry (at the end).
        pub fn add_memdir_file(&mut self, path: &str, data: &[u8]) {
            let bundle_path = format!("memory_files/{path}");
            self.artifacts_mut().push(json!({
                "path_in_bundle": bundle_path,
                "kind": "memory_file",
                "size_bytes": data.len(),
                "sha256": sha256_hex(data),
            }));
            self.memsnap_entries_mut().push(json!({
                "part": "memdir", "path": path, "kind": "file", "mode": 0o644,
                "mtime_ns": 0, "bundle_path": bundle_path,
            }));
            self.entries.push(Entry::file(&bundle_path, data));
        }

        /// Recomputes both seals from the artifact digests.
        pub fn reseal(&mut self) {
            let seal = |list: &Value| {
                let mut h = Sha256::new();
                for a in list.as_array().expect("artifact list") {
                    h.update(a["sha256"].as_str().expect("sha256").as_bytes());
                }
                hex::encode(h.finalize())
            };
            self.manifest["bundle_sha256"] = seal(&self.manifest["artifacts"]).into();
            if self.manifest["memsnap"].is_object() {
                let extra = self.manifest["memsnap"]["extra_artifacts"].clone();
                self.manifest["memsnap"]["extra_sha256"] = seal(&extra).into();
            }
        }

        /// The tar archive, end marker included.
        pub fn tar(&self) -> Vec<u8> {
            let mut m = self.clone();
            if !m.keep_seals {
                m.reseal();
            }
            let manifest = Entry::file(
                "manifest.json",
                &m.manifest_raw
                    .clone()
                    .unwrap_or_else(|| serde_json::to_vec_pretty(&m.manifest).expect("JSON")),
            );
            let mut all = m.entries.clone();
            all.insert(m.manifest_pos.min(all.len()), manifest);
            let mut out = Vec::new();
            for e in &all {
                push_entry(&mut out, e);
            }
            push_end(&mut out);
            out
        }

        /// Writes the bundle (tar → zstd) and a matching `.sha256`.
        pub fn write(&self, path: &Path) {
            write_with_sibling(path, &compress(&self.tar()));
        }
    }

    /// A zstd frame of `blocks` RLE blocks of 128 KiB zeros: 4 bytes for every 128 KiB inflated,
    /// so a terabyte of zeros fits in 32 MiB.
    pub fn rle_zero_frame(blocks: u64) -> Vec<u8> {
        const BLOCK: u32 = 128 << 10;
        // Magic; frame header descriptor 0 (no content size, no checksum, window descriptor
        // follows); window 2^(10+7) = 128 KiB.
        let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
        out.reserve(blocks as usize * 4);
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            // Block header: last bit, type 1 (RLE), size (the repeat count) in bits 3-23.
            let h = last | (1 << 1) | (BLOCK << 3);
            out.extend_from_slice(&h.to_le_bytes()[..3]);
            out.push(0);
        }
        out
    }
}

use builder::{Bundle, Entry};

// =============================================================================================
// The world: an agent, a store holding its snapshot, a real bundle of it
// =============================================================================================

struct World {
    f: Fixture,
    id: String,
    /// The genuine bundle, as `memsnap export` wrote it (never modified).
    bundle: PathBuf,
    /// The live agent right after the snapshot, and its full image.
    live: Tree,
    image: AgentImage,
}

impl World {
    fn new() -> World {
        World::with_export(&[])
    }

    fn with_export(extra: &[&str]) -> World {
        let f = Fixture::new();
        // A state document nexo-memory-snapshot has no kind for: an extra artifact, under the
        // second seal (`memsnap.extra_sha256`).
        fs::write(
            f.agent.state_dir().join("notes.json"),
            br#"{"note":"extra"}"#,
        )
        .expect("write extra state document");
        let id = f.snapshot_id();
        fs::create_dir_all(f.path("bundles")).expect("mkdir bundles");
        let name = if extra.contains(&"--encrypt-to") {
            "genuine.tar.zst.age"
        } else {
            "genuine.tar.zst"
        };
        let bundle = f.path(&format!("bundles/{name}"));
        f.cmd()
            .args(["export", &id, "--out"])
            .arg(&bundle)
            .args(extra)
            .json();
        assert!(
            builder::sibling(&bundle).is_file(),
            "export wrote the .sha256"
        );
        let image = AgentImage::capture(&f.agent);
        let live = tree(f.agent.root(), true);
        World {
            f,
            id,
            bundle,
            live,
            image,
        }
    }

    /// A path for a crafted bundle.
    fn out(&self, name: &str) -> PathBuf {
        self.f.path(&format!("bundles/{name}"))
    }

    /// The genuine bundle taken apart.
    fn parsed(&self) -> Bundle {
        Bundle::read(&self.bundle)
    }

    /// The genuine bundle taken apart, under a snapshot id the store does not hold: a crafted
    /// bundle that got through the checks would be committed as a new snapshot (and be seen by
    /// `list`), not be taken for the snapshot the store already has.
    fn crafted(&self) -> Bundle {
        let mut b = self.parsed();
        b.manifest["snapshot_id"] = CRAFTED_ID.into();
        b
    }

    /// Captures what must not change.
    fn before(&self) -> Before {
        Before {
            files: store_files(&self.f.store),
            list: self.f.list(),
        }
    }
}

const CRAFTED_ID: &str = "0badc0de-0000-4000-8000-000000000001";

struct Before {
    files: BTreeMap<String, Vec<u8>>,
    list: Vec<Value>,
}

fn assert_store_unchanged(w: &World, before: &Before, what: &str) {
    let after = store_files(&w.f.store);
    let differ: Vec<&String> = before
        .files
        .keys()
        .chain(after.keys())
        .filter(|n| before.files.get(*n) != after.get(*n))
        .collect();
    assert!(differ.is_empty(), "{what}: the store changed: {differ:?}");
    let packs = |m: &BTreeMap<String, Vec<u8>>| -> Vec<String> {
        m.keys()
            .filter(|k| k.starts_with("packs/"))
            .cloned()
            .collect()
    };
    assert_eq!(packs(&after), packs(&before.files), "{what}: pack files");
    assert_eq!(w.f.list(), before.list, "{what}: `list --json`");
    let v = w.f.cmd().args(["verify", "--read-data"]).run();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{what}: `verify --read-data`\n{v}"
    );
}

fn assert_agent_unchanged(w: &World, what: &str) {
    assert_agent_tree_unchanged(w.live.clone(), &w.f.agent, &format!("{what}: live agent"));
    assert_no_restore_leftovers(&w.f.agent);
}

/// What a refusal must look like.
struct Expect<'a> {
    /// Exit code of `import` and `restore --bundle`.
    code: i32,
    /// Words the error on stderr contains (case-insensitive).
    words: &'a [&'a str],
    /// Exit code of `verify-bundle`, and words of its report or error (stdout and stderr).
    verify_code: i32,
    verify_words: &'a [&'a str],
}

fn contains_all(haystack: &str, words: &[&str]) -> bool {
    let h = haystack.to_lowercase();
    words.iter().all(|w| h.contains(&w.to_lowercase()))
}

/// Runs `import BUNDLE`, `restore --bundle BUNDLE` (both with `args`) and `verify-bundle BUNDLE`
/// (with `verify_args`) and checks the outcome of each and that nothing changed.
fn assert_refused(
    w: &World,
    case: &str,
    bundle: &Path,
    args: &[&str],
    verify_args: &[&str],
    e: &Expect,
) {
    let before = w.before();

    let out = w.f.cmd().arg("import").arg(bundle).args(args).run();
    assert_eq!(
        out.status.code(),
        Some(e.code),
        "[{case}] import: exit code\n{out}"
    );
    assert!(
        out.stderr.starts_with("memsnap: error: ") && contains_all(&out.stderr, e.words),
        "[{case}] import: the error names the problem ({:?})\n{out}",
        e.words
    );
    assert_store_unchanged(w, &before, &format!("[{case}] after import"));
    assert_agent_unchanged(w, &format!("[{case}] after import"));

    let out =
        w.f.cmd()
            .args(["restore", "--bundle"])
            .arg(bundle)
            .args(args)
            .run();
    assert_eq!(
        out.status.code(),
        Some(e.code),
        "[{case}] restore --bundle: exit code\n{out}"
    );
    assert!(
        contains_all(&out.stderr, e.words),
        "[{case}] restore --bundle: the error names the problem ({:?})\n{out}",
        e.words
    );
    assert_store_unchanged(w, &before, &format!("[{case}] after restore --bundle"));
    assert_agent_unchanged(w, &format!("[{case}] after restore --bundle"));
    w.image
        .assert_matches(&w.f.agent, &format!("[{case}] after restore --bundle"));

    let out =
        w.f.cmd()
            .arg("verify-bundle")
            .arg(bundle)
            .args(verify_args)
            .run();
    assert_eq!(
        out.status.code(),
        Some(e.verify_code),
        "[{case}] verify-bundle: exit code\n{out}"
    );
    let both = format!("{}\n{}", out.stdout, out.stderr);
    assert!(
        contains_all(&both, e.verify_words),
        "[{case}] verify-bundle says what is wrong ({:?})\n{out}",
        e.verify_words
    );
    assert_store_unchanged(w, &before, &format!("[{case}] after verify-bundle"));
}

/// The usual expectation of a damaged or refused bundle: exit 3 everywhere.
fn damage<'a>(words: &'a [&'a str], verify_words: &'a [&'a str]) -> Expect<'a> {
    Expect {
        code: 3,
        words,
        verify_code: 3,
        verify_words,
    }
}

// =============================================================================================
// 0. Positive control: the genuine bundle, and the builder's rebuild of it, are accepted
// =============================================================================================

#[test]
fn control_the_untouched_bundle_and_its_rebuild_import_fine() {
    let w = World::new();

    let v = w.f.cmd().arg("verify-bundle").arg(&w.bundle).json();
    assert_eq!(
        v["ok"], true,
        "[control] verify-bundle of the genuine bundle\n{v:#}"
    );
    assert_eq!(v["complete"], true, "[control] verify-bundle\n{v:#}");

    // Into the store that holds the snapshot: already there, nothing added.
    let before = w.before();
    let imp = w.f.cmd().arg("import").arg(&w.bundle).json();
    assert_eq!(imp["already_present"], true, "[control] import\n{imp:#}");
    assert_store_unchanged(&w, &before, "[control] re-import of the genuine bundle");

    // The builder's rebuild (hand-written tar, recomputed seals and .sha256) is a valid bundle:
    // what the cases below refuse is what they change, not the builder.
    let rebuilt = w.out("rebuilt.tar.zst");
    w.parsed().write(&rebuilt);
    let v = w.f.cmd().arg("verify-bundle").arg(&rebuilt).json();
    assert_eq!(
        v["ok"], true,
        "[control] verify-bundle of the rebuild\n{v:#}"
    );
    let store2 = w.f.path("store2");
    let imp = TestCommand::new(&store2).arg("import").arg(&rebuilt).json();
    assert_eq!(
        imp["already_present"], false,
        "[control] rebuild into a new store\n{imp:#}"
    );
    let orig = w.f.cmd().args(["show", &w.id]).json();
    let copy = TestCommand::new(&store2).args(["show", &w.id]).json();
    assert_eq!(
        orig["entries"], copy["entries"],
        "[control] same snapshot content"
    );

    // And under a new id, into the store that has the agent: a second snapshot appears, and
    // `restore --bundle` of it brings back the same agent.
    let fresh = w.out("fresh-id.tar.zst");
    w.crafted().write(&fresh);
    let r = w.f.cmd().args(["restore", "--bundle"]).arg(&fresh).json();
    assert_eq!(
        r["import"]["snapshot"]["id"], CRAFTED_ID,
        "[control] restore --bundle\n{r:#}"
    );
    assert!(
        w.f.list_ids().contains(&CRAFTED_ID.to_owned()),
        "[control] list"
    );
    w.image.assert_matches(
        &w.f.agent,
        "[control] after restore --bundle of the rebuild",
    );
}

// =============================================================================================
// 1-3. Damage in transit: flipped bits, truncation, the .sha256 file
// =============================================================================================

/// The words of a refusal of a file whose first bytes are not a bundle's.
const NOT_A_BUNDLE: &[&str] = &[
    "not a memsnap or nexo-memory-snapshot bundle",
    "neither zstd",
];
/// The words of damage the .sha256 file reveals.
const SHA_MISMATCH: &[&str] = &["damaged", "does not match the .sha256 file"];

#[test]
fn case_01_a_flipped_bit_anywhere_is_refused() {
    let w = World::new();
    let genuine = fs::read(&w.bundle).expect("read bundle");
    let len = genuine.len();
    let offsets = [
        (0, 0x01),
        (2, 0x80),
        (5, 0x04),
        (64, 0x10),
        (len / 4, 0x01),
        (len / 2, 0x20),
        (3 * len / 4, 0x08),
        (len - 5, 0x02),
        (len - 1, 0x40),
    ];
    for (offset, bit) in offsets {
        let case = format!("case 1: bit {bit:#04x} flipped at byte {offset} of {len}");
        let b = w.out(&format!("flip-{offset}.tar.zst"));
        let mut bytes = genuine.clone();
        bytes[offset] ^= bit;
        fs::write(&b, &bytes).expect("write");
        // The ORIGINAL .sha256 travels with it.
        fs::copy(builder::sibling(&w.bundle), builder::sibling(&b)).expect("copy .sha256");
        let e = if offset < 4 {
            damage(NOT_A_BUNDLE, NOT_A_BUNDLE)
        } else {
            damage(SHA_MISMATCH, &[".sha256 file"])
        };
        assert_refused(&w, &case, &b, &[], &[], &e);
    }
}

#[test]
fn case_02_a_truncated_file_is_refused() {
    let w = World::new();
    let genuine = fs::read(&w.bundle).expect("read bundle");
    let len = genuine.len();
    for cut in [1, 3, 4, 10, 100, 4096, len / 2, len - 4, len - 1] {
        let case = format!("case 2: truncated to {cut} of {len} bytes");
        let b = w.out(&format!("cut-{cut}.tar.zst"));
        fs::write(&b, &genuine[..cut]).expect("write");
        fs::copy(builder::sibling(&w.bundle), builder::sibling(&b)).expect("copy .sha256");
        let e = if cut < 4 {
            damage(NOT_A_BUNDLE, NOT_A_BUNDLE)
        } else {
            damage(SHA_MISMATCH, &[".sha256 file"])
        };
        assert_refused(&w, &case, &b, &[], &[], &e);
    }
}

#[test]
fn case_03_a_missing_wrong_or_garbage_sha256_file_is_refused() {
    let w = World::new();

    let case = "case 3: no .sha256 beside the bundle";
    let b = w.out("no-sibling.tar.zst");
    fs::copy(&w.bundle, &b).expect("copy");
    let e = damage(
        &["has no checksum file", ".sha256"],
        &["file sha256", "missing"],
    );
    assert_refused(&w, case, &b, &[], &[], &e);

    let case = "case 3: a .sha256 with another file's digest";
    let b = w.out("wrong-sibling.tar.zst");
    builder::copy_bundle(&w.bundle, &b);
    fs::write(
        builder::sibling(&b),
        builder::sha256_hex(b"some other file"),
    )
    .expect("write");
    let e = damage(
        &["damaged", "file sha256", "the .sha256 file says"],
        &["FAILED", "file sha256", "the .sha256 file says"],
    );
    assert_refused(&w, case, &b, &[], &[], &e);

    let case = "case 3: a .sha256 holding garbage";
    let b = w.out("garbage-sibling.tar.zst");
    builder::copy_bundle(&w.bundle, &b);
    fs::write(builder::sibling(&b), "hello, I am not a digest\n").expect("write");
    let e = damage(
        &["does not hold a SHA-256 hex digest"],
        &["does not hold a SHA-256 hex digest"],
    );
    assert_refused(&w, case, &b, &[], &[], &e);

    let case = "case 3: an empty .sha256";
    let b = w.out("empty-sibling.tar.zst");
    builder::copy_bundle(&w.bundle, &b);
    fs::write(builder::sibling(&b), "").expect("write");
    assert_refused(&w, case, &b, &[], &[], &e);
}

// =============================================================================================
// 4. Artifacts that do not match the manifest (the sibling hash is consistent); the seals
// =============================================================================================

#[test]
fn case_04_an_artifact_whose_bytes_do_not_match_its_sha256_is_refused() {
    let w = World::new();
    let base = w.crafted();
    let targets = [
        "memory_files/MEMORY.md".to_owned(),
        "sqlite/vector.sqlite".to_owned(),
        "state/dream_run.json".to_owned(),
        "state/notes.json".to_owned(),
        base.first_artifact("git/objects/"),
    ];
    for (i, target) in targets.iter().enumerate() {
        let case = format!("case 4: {target} changed, same size, manifest digest kept");
        let mut b = base.clone();
        let data = &mut b.entry_mut(target).data;
        // Past any header: the change is only visible to the digest.
        let at = data.len() * 2 / 3;
        data[at] ^= 0x01;
        let path = w.out(&format!("artifact-{i}.tar.zst"));
        b.write(&path);
        let words = ["damaged", target, "SHA-256", "the manifest says"];
        let verify_words = ["FAILED", target, "the manifest says"];
        assert_refused(&w, &case, &path, &[], &[], &damage(&words, &verify_words));
    }
}

#[test]
fn case_04_a_manifest_altered_without_its_seal_is_refused() {
    let w = World::new();
    let base = w.crafted();
    // The nexo seal (bundle_sha256) or memsnap's (extra_sha256), whichever covers the artifact.
    let seal_words: &[&str] = &["damaged", "seal", "the manifest was altered"];
    let verify_words: &[&str] = &["FAILED", "seal", "altered"];

    for target in ["memory_files/MEMORY.md", "state/notes.json"] {
        let case = format!("case 4: {target} replaced and its digest updated, seal kept");
        let mut b = base.clone();
        let new = b"# Replaced\n\nby someone else\n".to_vec();
        b.entry_mut(target).data = new.clone();
        let a = b.artifact_mut(target);
        a["size_bytes"] = new.len().into();
        a["sha256"] = builder::sha256_hex(&new).into();
        b.keep_seals = true;
        let path = w.out(&format!("seal-{}.tar.zst", target.replace('/', "-")));
        b.write(&path);
        assert_refused(
            &w,
            &case,
            &path,
            &[],
            &[],
            &damage(seal_words, verify_words),
        );
    }

    for field in ["bundle_sha256", "extra_sha256"] {
        let case = format!("case 4: {field} alone replaced");
        let mut b = base.clone();
        let zero = "0".repeat(64);
        if field == "bundle_sha256" {
            b.manifest["bundle_sha256"] = zero.into();
        } else {
            b.manifest["memsnap"]["extra_sha256"] = zero.into();
        }
        b.keep_seals = true;
        let path = w.out(&format!("seal-{field}.tar.zst"));
        b.write(&path);
        assert_refused(
            &w,
            &case,
            &path,
            &[],
            &[],
            &damage(seal_words, verify_words),
        );
    }
}

/// A database artifact whose digest is right but whose bytes are no SQLite database (no header,
/// or a size that is not a multiple of its page size): store-format.md lists both among what a
/// reader refuses. `import` and `restore --bundle` do.
#[test]
fn case_04_a_database_artifact_that_is_not_a_database_is_refused_by_import() {
    let w = World::new();
    let base = w.crafted();
    let db = "sqlite/compactions.sqlite";
    for (what, change) in [
        ("text instead of a database", 0),
        ("100 bytes past the last page", 1),
    ] {
        let case = format!("case 4: {db}, {what}, digests consistent");
        let mut b = base.clone();
        let e = b.entry_mut(db);
        if change == 0 {
            let n = e.data.len();
            e.data = b"not a database\n"
                .iter()
                .copied()
                .cycle()
                .take(n)
                .collect();
        } else {
            e.data.extend(std::iter::repeat_n(0u8, 100));
        }
        let data = e.data.clone();
        let a = b.artifact_mut(db);
        a["size_bytes"] = data.len().into();
        a["sha256"] = builder::sha256_hex(&data).into();
        let path = w.out(&format!("not-a-db-{change}.tar.zst"));
        b.write(&path);
        let before = w.before();
        for cmd in [vec!["import"], vec!["restore", "--bundle"]] {
            let out = w.f.cmd().args(&cmd).arg(&path).run();
            assert_eq!(
                out.status.code(),
                Some(3),
                "[{case}] {cmd:?}: exit code\n{out}"
            );
            assert!(
                contains_all(&out.stderr, &["damaged", db, "is not a SQLite database"]),
                "[{case}] {cmd:?}: the error names the problem\n{out}"
            );
            assert_store_unchanged(&w, &before, &format!("[{case}] {cmd:?}"));
            assert_agent_unchanged(&w, &format!("[{case}] {cmd:?}"));
        }
    }
}

/// Regression (src/bundle/import.rs, `verify_bundle` runs `read_pass` with `NullSink`, which never
/// looks at a database's header): `verify-bundle` says "bundle ok" (exit 0) for a bundle whose
/// database artifact is not a SQLite database, which `import` refuses with exit 3 (previous
/// test). verify-bundle is the command that is meant to tell whether a bundle will import.
/// Expected: exit 3 and the artifact named as not a database.
#[test]
fn case_04_verify_bundle_passes_a_database_artifact_that_import_refuses() {
    let w = World::new();
    let mut b = w.crafted();
    let db = "sqlite/compactions.sqlite";
    let e = b.entry_mut(db);
    let n = e.data.len();
    e.data = b"not a database\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect();
    let data = e.data.clone();
    b.artifact_mut(db)["sha256"] = builder::sha256_hex(&data).into();
    let path = w.out("not-a-db.tar.zst");
    b.write(&path);
    let out = w.f.cmd().arg("verify-bundle").arg(&path).run();
    assert_eq!(
        out.status.code(),
        Some(3),
        "[case 4: {db} not a database] verify-bundle must find what import refuses\n{out}"
    );
    assert!(
        contains_all(
            &format!("{}{}", out.stdout, out.stderr),
            &[db, "not a SQLite database"]
        ),
        "[case 4: {db} not a database] verify-bundle names the artifact\n{out}"
    );
}

/// Regression (src/bundle/import.rs, `read_pass`): a wrong `memsnap.extra_sha256` (the seal of the
/// extra artifacts) is reported as "bundle_sha256 does not match the artifact digests", naming
/// the other seal, which is intact. Expected: the message names extra_sha256.
#[test]
fn case_04_a_wrong_extra_seal_is_reported_as_the_other_seal() {
    let w = World::new();
    let mut b = w.crafted();
    b.manifest["memsnap"]["extra_sha256"] = "0".repeat(64).into();
    b.keep_seals = true;
    let path = w.out("extra-seal.tar.zst");
    b.write(&path);
    let out = w.f.cmd().arg("import").arg(&path).run();
    assert_eq!(
        out.status.code(),
        Some(3),
        "[case 4: extra_sha256 replaced]\n{out}"
    );
    assert!(
        out.stderr.contains("extra_sha256"),
        "[case 4: extra_sha256 replaced] the message names the seal that is wrong\n{out}"
    );
}

/// Regression (src/bundle/import.rs, `explain`): when the file does not match its `.sha256`, the
/// error wraps the first `Damaged` error in a second one, so the message says "bundle X is
/// damaged" twice and ends with "nothing was imported or restored (fetch the bundle again)"
/// twice. Expected: each said once.
#[test]
fn case_01_the_damage_message_repeats_itself() {
    let w = World::new();
    let mut bytes = fs::read(&w.bundle).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let path = w.out("flip.tar.zst");
    fs::write(&path, &bytes).expect("write");
    fs::copy(builder::sibling(&w.bundle), builder::sibling(&path)).expect("copy .sha256");
    let out = w.f.cmd().arg("import").arg(&path).run();
    assert_eq!(out.status.code(), Some(3), "[case 1: flipped bit]\n{out}");
    for phrase in ["is damaged", "nothing was imported or restored"] {
        assert_eq!(
            out.stderr.matches(phrase).count(),
            1,
            "[case 1: flipped bit] {phrase:?} once in the message\n{out}"
        );
    }
}

// =============================================================================================
// 5. Another tenant or agent than asked
// =============================================================================================

/// Asking for the wrong agent is the caller's mistake, not damage: exit 1, and `verify-bundle`
/// (which asks for no agent) finds nothing wrong but says whose bundle it is.
#[test]
fn case_05_a_bundle_of_another_tenant_or_agent_than_asked_is_refused() {
    let w = World::new();
    for (tenant, agent) in [("acme", "bob"), ("other", "ana")] {
        let case = format!("case 5: acme/ana's bundle asked as {tenant}/{agent}");
        let asked = format!("{tenant}/{agent}");
        let e = Expect {
            code: 1,
            words: &["holds agent acme/ana", &asked, "--tenant/--agent"],
            verify_code: 0,
            verify_words: &["of acme/ana", "bundle ok"],
        };
        assert_refused(
            &w,
            &case,
            &w.bundle,
            &["--tenant", tenant, "--agent", agent],
            &[],
            &e,
        );
    }

    let case = "case 5: a manifest naming evil/mallory, asked as acme/ana";
    let mut b = w.crafted();
    b.manifest["tenant"] = "evil".into();
    b.manifest["agent_id"] = "mallory".into();
    let path = w.out("mallory.tar.zst");
    b.write(&path);
    let e = Expect {
        code: 1,
        words: &["holds agent evil/mallory", "not acme/ana"],
        verify_code: 0,
        verify_words: &["of evil/mallory", "bundle ok"],
    };
    assert_refused(
        &w,
        case,
        &path,
        &["--tenant", "acme", "--agent", "ana"],
        &[],
        &e,
    );
}

// =============================================================================================
// 6. Entries that are not plain relative regular files
// =============================================================================================

#[test]
fn case_06_unsafe_paths_links_devices_and_folders_in_the_archive_are_refused() {
    use builder::{CHAR_DEVICE, DIRECTORY, FIFO, HARD_LINK, SYMLINK};
    let w = World::new();
    let base = w.crafted();
    let long_dotdot = format!("memory_files/{}../../../../escape.md", "deep/".repeat(25));
    let mut pax_dotdot = Entry::file("memory_files/innocent.md", b"# hi\n");
    pax_dotdot.pax = vec![("path".into(), "../../pax-escape.md".into())];
    // (case, entry, first: right after the manifest instead of at the end, words)
    let cases: Vec<(&str, Entry, bool, Vec<&str>)> = vec![
        (
            "`..` inside memory_files/",
            Entry::file("memory_files/../../escape.md", b"owned\n"),
            false,
            vec![
                "refused",
                "memory_files/../../escape.md",
                "`..` path component",
            ],
        ),
        (
            "`..` first, right after the manifest",
            Entry::file("../escape.md", b"owned\n"),
            true,
            vec!["refused", "`..` path component"],
        ),
        (
            "`..` in a GNU long name",
            Entry::file(&long_dotdot, b"owned\n"),
            false,
            vec!["refused", "`..` path component"],
        ),
        (
            "`..` in a PAX path record",
            pax_dotdot,
            false,
            vec!["refused", "../../pax-escape.md", "`..` path component"],
        ),
        (
            "an absolute path",
            Entry::file("/tmp/memsnap-hostile-escape.md", b"owned\n"),
            false,
            vec!["refused", "/tmp/memsnap-hostile-escape.md", "absolute path"],
        ),
        (
            "a symlink entry",
            Entry::special("memory_files/link.md", SYMLINK, "/etc/passwd"),
            false,
            vec![
                "refused",
                "memory_files/link.md",
                "a symlink",
                "regular files only",
            ],
        ),
        (
            "a hard-link entry",
            Entry::special("memory_files/hard.md", HARD_LINK, "/etc/shadow"),
            false,
            vec![
                "refused",
                "memory_files/hard.md",
                "a hard link",
                "regular files only",
            ],
        ),
        (
            "a character device entry",
            Entry::special("memory_files/null", CHAR_DEVICE, ""),
            false,
            vec!["refused", "memory_files/null", "a device file"],
        ),
        (
            "a directory entry",
            Entry::special("memory_files/topics/", DIRECTORY, ""),
            false,
            vec!["refused", "memory_files/topics", "a directory entry"],
        ),
        (
            "a FIFO entry",
            Entry::special("memory_files/fifo", FIFO, ""),
            true,
            vec!["refused", "memory_files/fifo", "a FIFO"],
        ),
    ];
    for (i, (what, entry, first, words)) in cases.into_iter().enumerate() {
        let case = format!("case 6: {what}");
        let mut b = base.clone();
        if first {
            b.entries.insert(0, entry);
        } else {
            b.entries.push(entry);
        }
        let path = w.out(&format!("entry-{i}.tar.zst"));
        b.write(&path);
        assert_refused(&w, &case, &path, &[], &[], &damage(&words, &words));
    }

    // The classic: a listed artifact's name as a symlink to a file outside, instead of the file.
    let case = "case 6: memory_files/MEMORY.md as a symlink to /etc/passwd";
    let mut b = base.clone();
    let i = b.position("memory_files/MEMORY.md");
    b.entries[i] = Entry::special("memory_files/MEMORY.md", SYMLINK, "/etc/passwd");
    let path = w.out("entry-listed-symlink.tar.zst");
    b.write(&path);
    let words = ["refused", "memory_files/MEMORY.md", "a symlink"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}

// =============================================================================================
// 7. Entries and manifest artifacts that do not pair up one to one
// =============================================================================================

#[test]
fn case_07_unlisted_missing_and_duplicate_entries_are_refused() {
    let w = World::new();
    let base = w.crafted();
    let memory = "memory_files/MEMORY.md";

    let case = "case 7: an entry the manifest does not list";
    let mut b = base.clone();
    b.entries.push(Entry::file(
        "memory_files/smuggled.md",
        b"# not in the manifest\n",
    ));
    let path = w.out("unlisted.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "memory_files/smuggled.md",
        "not listed in the manifest",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: a manifest artifact missing from the archive";
    let mut b = base.clone();
    let i = b.position(memory);
    b.entries.remove(i);
    let path = w.out("missing.tar.zst");
    b.write(&path);
    let words = ["damaged", memory, "missing from the archive"];
    let verify_words = ["FAILED", memory, "missing from the archive"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &verify_words));

    let case = "case 7: the same entry twice (identical)";
    let mut b = base.clone();
    let copy = b.entry_mut(memory).clone();
    b.entries.push(copy);
    let path = w.out("twice.tar.zst");
    b.write(&path);
    let words = ["refused", memory, "appears twice in the archive"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: the same entry twice, the second with other bytes";
    let mut b = base.clone();
    let mut copy = b.entry_mut(memory).clone();
    copy.data.iter_mut().for_each(|c| *c = b'x');
    b.entries.push(copy);
    let path = w.out("twice-other.tar.zst");
    b.write(&path);
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: a second manifest.json entry";
    let mut b = base.clone();
    b.entries.push(Entry::file("manifest.json", b"{}"));
    let path = w.out("second-manifest.tar.zst");
    b.write(&path);
    let words = ["refused", "manifest.json", "a second manifest"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: the manifest lists the same path twice";
    let mut b = base.clone();
    let a = b.artifact_mut(memory).clone();
    b.artifacts_mut().push(a);
    let path = w.out("listed-twice.tar.zst");
    b.write(&path);
    let words = ["refused", memory, "listed twice in the manifest"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: the same path in artifacts and memsnap.extra_artifacts";
    let mut b = base.clone();
    let mut a = b.artifact_mut("state/notes.json").clone();
    a["kind"] = "state_dream_run".into();
    a["path_in_bundle"] = "state/dream_run.json".into();
    let dream = b.artifact_mut("state/dream_run.json").clone();
    let mut extra = dream.clone();
    extra["kind"] = "state".into();
    b.manifest["memsnap"]["extra_artifacts"]
        .as_array_mut()
        .expect("extra")
        .push(extra);
    let path = w.out("listed-twice-extra.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "state/dream_run.json",
        "listed twice in the manifest",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: memsnap.entries lists one path twice";
    let mut b = base.clone();
    let entries = b.memsnap_entries_mut();
    let dup = entries
        .iter()
        .find(|e| e["bundle_path"] == memory)
        .expect("MEMORY.md entry")
        .clone();
    entries.push(dup);
    let path = w.out("entry-listed-twice.tar.zst");
    b.write(&path);
    let words = ["refused", "MEMORY.md", "listed twice"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 7: an artifact (in the archive too) that no entry uses";
    let mut b = base.clone();
    b.add_memdir_file("orphan.md", b"# orphan\n");
    b.memsnap_entries_mut().pop();
    let path = w.out("orphan.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "memory_files/orphan.md",
        "an artifact no entry uses",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}

// =============================================================================================
// 8. Decompression bombs and oversized declarations
// =============================================================================================

/// Bytes below `dir`, all files.
fn du(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn case_08a_an_entry_larger_than_the_manifest_says_is_refused() {
    let w = World::new();
    let base = w.crafted();
    let memory = "memory_files/MEMORY.md";

    let case = "case 8a: tar size larger than size_bytes, the real bytes present";
    let mut b = base.clone();
    b.entry_mut(memory)
        .data
        .extend(std::iter::repeat_n(b'A', 1 << 20));
    let path = w.out("bigger.tar.zst");
    b.write(&path);
    let words = ["refused", memory, "the archive says", "the manifest"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 8a: a database entry 8 MiB larger than size_bytes";
    let mut b = base.clone();
    b.entry_mut("sqlite/vector.sqlite")
        .data
        .extend(std::iter::repeat_n(0u8, 8 << 20));
    let path = w.out("bigger-db.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "sqlite/vector.sqlite",
        "the archive says",
        "the manifest",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    // The header's size field agrees with the manifest; a PAX record (which tar readers obey)
    // says the entry is 1 MiB longer, and those bytes are there.
    let case = "case 8a: a PAX size record larger than the header's and the manifest's";
    let mut b = base.clone();
    let e = b.entry_mut(memory);
    let declared = e.data.len() as u64;
    e.data.extend(std::iter::repeat_n(b'A', 1 << 20));
    e.header_size = Some(declared);
    e.pax = vec![("size".into(), e.data.len().to_string())];
    let path = w.out("pax-size.tar.zst");
    b.write(&path);
    let words = [memory];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}

#[test]
fn case_08b_a_bomb_after_the_archive_is_cut_early() {
    let w = World::new();
    let base = w.crafted();
    let words: &[&str] = &["refused", "larger than the manifest declares"];
    let tmpdir = w.f.path("tmpdir");
    fs::create_dir_all(&tmpdir).expect("mkdir tmpdir");

    // 200 MiB of zeros compressed in the same zstd frame, right after the tar's end.
    let case = "case 8b: 200 MiB of zeros after the archive, same frame";
    let mut plain = base.tar();
    plain.extend(std::iter::repeat_n(0u8, 200 << 20));
    let bytes = builder::compress(&plain);
    drop(plain);
    assert!(
        bytes.len() < 4 << 20,
        "the bomb compresses to {} bytes",
        bytes.len()
    );
    let path = w.out("bomb-200m.tar.zst");
    builder::write_with_sibling(&path, &bytes);
    assert_refused(&w, case, &path, &[], &[], &damage(words, words));

    // A second zstd frame of 1 TiB of zeros (RLE blocks: 32 MiB on disk). Inflating it at
    // 10 GB/s would take nearly two minutes: the reader must stop at the manifest's sizes.
    let case = "case 8b: a 1 TiB zero frame after the archive";
    let mut bytes = builder::compress(&base.tar());
    bytes.extend(builder::rle_zero_frame(1 << 23));
    let path = w.out("bomb-1t.tar.zst");
    builder::write_with_sibling(&path, &bytes);
    drop(bytes);
    let store_bytes = du(&w.f.store);
    let before = w.before();
    for cmd in [
        vec!["import"],
        vec!["restore", "--bundle"],
        vec!["verify-bundle"],
    ] {
        let started = std::time::Instant::now();
        let out =
            w.f.cmd()
                .env("TMPDIR", tmpdir.to_str().expect("utf-8 tmp"))
                .args(&cmd)
                .arg(&path)
                .run();
        let took = started.elapsed();
        assert_eq!(
            out.status.code(),
            Some(3),
            "[{case}] {cmd:?}: exit code\n{out}"
        );
        assert!(
            contains_all(&out.stderr, words),
            "[{case}] {cmd:?}: the error names the problem\n{out}"
        );
        assert!(
            took < std::time::Duration::from_secs(30),
            "[{case}] {cmd:?} took {took:?}: it inflated the bomb instead of stopping early"
        );
        assert_eq!(
            fs::read_dir(&tmpdir).expect("ls tmpdir").count(),
            0,
            "[{case}] {cmd:?}: temporary files left in $TMPDIR"
        );
        assert!(
            du(&w.f.store) <= store_bytes + (1 << 20),
            "[{case}] {cmd:?}: the store grew from {store_bytes} to {} bytes",
            du(&w.f.store)
        );
        assert_store_unchanged(&w, &before, &format!("[{case}] {cmd:?}"));
        assert_agent_unchanged(&w, &format!("[{case}] {cmd:?}"));
    }

    // Well under the slack, but more than 64 KiB after the end: smuggled data.
    let case = "case 8b: 1 MiB of data after the archive's end";
    let mut plain = base.tar();
    plain.extend((0..1u32 << 20).map(|i| (i % 251) as u8));
    let path = w.out("trailing.tar.zst");
    builder::write_with_sibling(&path, &builder::compress(&plain));
    let words = ["refused", "bytes after the end of the archive"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}

#[test]
fn case_08c_a_manifest_declaring_more_than_the_size_limit_is_refused() {
    let w = World::new();
    let base = w.crafted();
    let words: &[&str] = &[
        "refused",
        "manifest.json",
        "more than the 1099511627776-byte limit",
    ];

    let case = "case 8c: one artifact declaring 1 TiB + 1 byte";
    let mut b = base.clone();
    b.artifact_mut("sqlite/vector.sqlite")["size_bytes"] = ((1u64 << 40) + 1).into();
    let path = w.out("declares-1t.tar.zst");
    b.write(&path);
    assert_refused(&w, case, &path, &[], &[], &damage(words, words));

    let case = "case 8c: many artifacts adding up to more than 1 TiB";
    let mut b = base.clone();
    for a in b.artifacts_mut().iter_mut() {
        a["size_bytes"] = (1u64 << 35).into();
    }
    let path = w.out("declares-sum.tar.zst");
    b.write(&path);
    assert_refused(&w, case, &path, &[], &[], &damage(words, words));
}

/// Regression (src/bundle/import.rs, `read_pass`): the declared size is
/// `manifest.all_artifacts().map(|a| a.size_bytes).sum()`, unchecked. Two artifacts declaring
/// `u64::MAX` bytes overflow it: a debug build panics ("attempt to add with overflow", exit 101,
/// no message), a release build wraps around to a small number and passes the 1 TiB limit (the
/// entry-size check refuses the bundle later, with a less helpful message). Expected: exit 3,
/// "more than the ...-byte limit" (checked_add / saturating sum).
#[test]
fn case_08c_sizes_summing_past_u64_max_overflow_the_size_check() {
    let w = World::new();
    let case = "case 8c: sizes summing past u64::MAX";
    let mut b = w.crafted();
    b.artifact_mut("sqlite/vector.sqlite")["size_bytes"] = u64::MAX.into();
    b.artifact_mut("sqlite/long_term.sqlite")["size_bytes"] = u64::MAX.into();
    let path = w.out("declares-overflow.tar.zst");
    b.write(&path);
    let words: &[&str] = &["refused", "manifest.json", "byte limit"];
    assert_refused(&w, case, &path, &[], &[], &damage(words, words));
}

// =============================================================================================
// 9. Encrypted bundles: wrong and missing identities
// =============================================================================================

const RECIPIENT: &str = "age1dlaac65wd8367dddxt8l4epq7muv6gx6nfkqzxmjgl9mm20sd9msy5s5ad";

fn fixture_identity() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nexo-memory-snapshot-0.1.5/03-age/test-identity.txt")
}

fn encrypt_to(recipient: &age::x25519::Recipient, plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let r: &dyn age::Recipient = recipient;
    let enc = age::Encryptor::with_recipients(std::iter::once(r)).expect("encryptor");
    let mut out = Vec::new();
    let mut wr = enc.wrap_output(&mut out).expect("age stream");
    wr.write_all(plain).expect("encrypt");
    wr.finish().expect("finish");
    out
}

#[test]
fn case_09_a_wrong_or_missing_identity_is_refused() {
    use age::secrecy::ExposeSecret;
    let w = World::with_export(&["--encrypt-to", RECIPIENT]);
    let keys = w.f.path("keys");
    fs::create_dir_all(&keys).expect("mkdir");
    let other = age::x25519::Identity::generate();
    let wrong = keys.join("other-identity.txt");
    fs::write(&wrong, format!("{}\n", other.to_string().expose_secret())).expect("write key");
    let garbage = keys.join("garbage-identity.txt");
    fs::write(&garbage, "this is not a key\n").expect("write");
    let right = fixture_identity();

    // Sanity: the right identity opens it.
    let v =
        w.f.cmd()
            .arg("verify-bundle")
            .arg(&w.bundle)
            .arg("--identity")
            .arg(&right)
            .json();
    assert_eq!(
        (v["ok"].clone(), v["complete"].clone()),
        (json!(true), json!(true)),
        "{v:#}"
    );

    let case = "case 9: an encrypted bundle without --identity";
    let e = Expect {
        code: 1,
        words: &["age-encrypted", "pass --identity"],
        verify_code: 0,
        verify_words: &["age-encrypted", "not checked", "--identity"],
    };
    assert_refused(&w, case, &w.bundle, &[], &[], &e);

    let case = "case 9: an encrypted bundle with another identity";
    let wrong_s = wrong.to_str().expect("utf-8");
    let e = Expect {
        code: 1,
        words: &["none of the keys", "other-identity.txt", "other recipients"],
        verify_code: 1,
        verify_words: &["none of the keys", "other-identity.txt"],
    };
    assert_refused(
        &w,
        case,
        &w.bundle,
        &["--identity", wrong_s],
        &["--identity", wrong_s],
        &e,
    );

    let case = "case 9: an identity file that does not exist";
    let missing = keys.join("no-such-identity.txt");
    let missing_s = missing.to_str().expect("utf-8");
    let e = Expect {
        code: 1,
        words: &["cannot use identity file", "no-such-identity.txt"],
        verify_code: 1,
        verify_words: &["cannot use identity file", "no-such-identity.txt"],
    };
    assert_refused(
        &w,
        case,
        &w.bundle,
        &["--identity", missing_s],
        &["--identity", missing_s],
        &e,
    );

    let case = "case 9: an identity file holding no key";
    let garbage_s = garbage.to_str().expect("utf-8");
    let e = Expect {
        code: 1,
        words: &["cannot use identity file", "garbage-identity.txt"],
        verify_code: 1,
        verify_words: &["cannot use identity file", "garbage-identity.txt"],
    };
    assert_refused(
        &w,
        case,
        &w.bundle,
        &["--identity", garbage_s],
        &["--identity", garbage_s],
        &e,
    );

    // With the right identity, damage and hostile content inside the encryption are refused
    // as in a plain bundle.
    let right_s = right.to_str().expect("utf-8");
    let case = "case 9: a flipped bit in an encrypted bundle, right identity";
    let mut bytes = fs::read(&w.bundle).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let path = w.out("flipped.tar.zst.age");
    fs::write(&path, &bytes).expect("write");
    fs::copy(builder::sibling(&w.bundle), builder::sibling(&path)).expect("copy .sha256");
    let e = damage(SHA_MISMATCH, &["damaged"]);
    assert_refused(
        &w,
        case,
        &path,
        &["--identity", right_s],
        &["--identity", right_s],
        &e,
    );

    let case = "case 9: a symlink entry inside an encrypted bundle, right identity";
    // Build a plain crafted bundle from a plain export of the same snapshot, then encrypt it.
    let plain_bundle = w.f.path("bundles/plain.tar.zst");
    w.f.cmd()
        .args(["export", &w.id, "--out"])
        .arg(&plain_bundle)
        .json();
    let mut b = Bundle::read(&plain_bundle);
    b.manifest["snapshot_id"] = CRAFTED_ID.into();
    b.entries.push(Entry::special(
        "memory_files/link.md",
        builder::SYMLINK,
        "/etc/passwd",
    ));
    let recipient: age::x25519::Recipient = RECIPIENT.parse().expect("recipient");
    let path = w.out("symlink.tar.zst.age");
    builder::write_with_sibling(&path, &encrypt_to(&recipient, &builder::compress(&b.tar())));
    let words = ["refused", "memory_files/link.md", "a symlink"];
    assert_refused(
        &w,
        case,
        &path,
        &["--identity", right_s],
        &["--identity", right_s],
        &damage(&words, &words),
    );
}

// =============================================================================================
// 10. A newer format
// =============================================================================================

/// A bundle from a newer memsnap is not damaged: this memsnap is too old. Exit 1 ("failure", not
/// "damage found"), and the message says to upgrade.
#[test]
fn case_10_a_bundle_of_a_newer_format_asks_to_upgrade_memsnap() {
    let w = World::new();
    let base = w.crafted();
    type Change = fn(&mut Value);
    let cases: [(&str, Change, &[&str]); 5] = [
        (
            "manifest_version 2",
            |m| m["manifest_version"] = 2.into(),
            &["manifest version 2", "upgrade memsnap"],
        ),
        (
            "manifest_version 2 with a layout this memsnap does not know",
            |m| {
                m["manifest_version"] = 2.into();
                let arts = m.as_object_mut().expect("object").remove("artifacts");
                m["files_v2"] = arts.expect("artifacts");
            },
            &["manifest version 2", "upgrade memsnap"],
        ),
        (
            "bundle_format nexo-memory-snapshot-v2",
            |m| m["bundle_format"] = "nexo-memory-snapshot-v2".into(),
            &["bundle format nexo-memory-snapshot-v2", "upgrade memsnap"],
        ),
        (
            "memsnap.version 2",
            |m| m["memsnap"]["version"] = 2.into(),
            &["memsnap bundle section version 2", "upgrade memsnap"],
        ),
        (
            "schema_versions.manifest 2",
            |m| m["schema_versions"]["manifest"] = 2.into(),
            &["manifest schema version 2", "upgrade memsnap"],
        ),
    ];
    for (i, (what, change, words)) in cases.into_iter().enumerate() {
        let case = format!("case 10: {what}");
        let mut b = base.clone();
        change(&mut b.manifest);
        b.keep_seals = true;
        let path = w.out(&format!("newer-{i}.tar.zst"));
        b.write(&path);
        let e = Expect {
            code: 1,
            words,
            verify_code: 1,
            verify_words: words,
        };
        assert_refused(&w, &case, &path, &[], &[], &e);
    }
}

// =============================================================================================
// 11. Not a bundle at all
// =============================================================================================

#[test]
fn case_11_files_that_are_not_bundles_are_refused() {
    let w = World::new();
    let base = w.crafted();

    for (what, bytes) in [
        (
            "a text file",
            b"# my notes\n\nnot a bundle at all\n".to_vec(),
        ),
        ("an empty file", Vec::new()),
    ] {
        let case = format!("case 11: {what}");
        let path = w.out(&format!("{}.tar.zst", what.replace(' ', "-")));
        builder::write_with_sibling(&path, &bytes);
        assert_refused(
            &w,
            &case,
            &path,
            &[],
            &[],
            &damage(NOT_A_BUNDLE, NOT_A_BUNDLE),
        );
    }

    let case = "case 11: manifest.json second";
    let mut b = base.clone();
    b.manifest_pos = 1;
    let path = w.out("manifest-second.tar.zst");
    b.write(&path);
    let words = [
        "not a memsnap or nexo-memory-snapshot bundle",
        "its first entry is",
        "not manifest.json",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 11: manifest.json last";
    let mut b = base.clone();
    b.manifest_pos = usize::MAX;
    let path = w.out("manifest-last.tar.zst");
    b.write(&path);
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 11: manifest.json is not JSON";
    let mut b = base.clone();
    b.manifest_raw = Some(b"{ \"manifest_version\": 1, this is not json".to_vec());
    let path = w.out("manifest-not-json.tar.zst");
    b.write(&path);
    let words = ["damaged", "manifest.json is not valid JSON"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 11: manifest.json is JSON without the bundle fields";
    let mut b = base.clone();
    b.manifest_raw = Some(br#"{"hello": "world"}"#.to_vec());
    let path = w.out("manifest-no-fields.tar.zst");
    b.write(&path);
    let words = ["damaged", "manifest.json does not have the bundle fields"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 11: zstd of text, not of a tar";
    let path = w.out("zstd-text.tar.zst");
    builder::write_with_sibling(&path, &builder::compress(&b"hello world\n".repeat(100)));
    let words = ["damaged", "cannot read the archive"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 11: an empty tar";
    let mut plain = Vec::new();
    builder::push_end(&mut plain);
    let path = w.out("empty-tar.tar.zst");
    builder::write_with_sibling(&path, &builder::compress(&plain));
    let words = ["damaged", "the archive is empty"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}

// =============================================================================================
// 12. Memory files inside .git; entries under a symlink
// =============================================================================================

#[test]
fn case_12_a_memory_file_inside_git_or_under_a_symlink_is_refused() {
    let w = World::new();
    let base = w.crafted();
    let hook = b"[core]\n\tfsmonitor = touch /tmp/memsnap-pwned\n";

    let case = "case 12: a memory_files/.git/config artifact";
    let mut b = base.clone();
    b.add_memdir_file(".git/config", hook);
    let path = w.out("git-config.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "memory_files/.git/config",
        "a memory file inside .git",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    // The same in a nexo-memory-snapshot bundle (no memsnap section): paths map straight to the
    // memdir, so memory_files/.git/config would land on .git/config.
    let case = "case 12: memory_files/.git/config in a bundle without the memsnap section";
    let mut b = base.clone();
    b.manifest
        .as_object_mut()
        .expect("object")
        .remove("memsnap");
    let i = b.position("state/notes.json");
    b.entries.remove(i);
    b.artifacts_mut().push(json!({
        "path_in_bundle": "memory_files/.git/config",
        "kind": "memory_file",
        "size_bytes": hook.len(),
        "sha256": builder::sha256_hex(hook),
    }));
    b.entries
        .push(Entry::file("memory_files/.git/config", hook));
    let path = w.out("git-config-nexo.tar.zst");
    b.write(&path);
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 12: evil -> /tmp a symlink entry, evil/x.md a file";
    let mut b = base.clone();
    b.memsnap_entries_mut().push(json!({
        "part": "memdir", "path": "evil", "kind": "symlink", "mode": 0o777,
        "mtime_ns": 0, "target": "/tmp",
    }));
    b.add_memdir_file("evil/x.md", b"# written through the symlink\n");
    let path = w.out("under-symlink.tar.zst");
    b.write(&path);
    let words = ["refused", "evil/x.md", "lies under a symlink or a file"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    let case = "case 12: a file entry under a file entry (MEMORY.md/x.md)";
    let mut b = base.clone();
    b.add_memdir_file("MEMORY.md/x.md", b"# under a file\n");
    let path = w.out("under-file.tar.zst");
    b.write(&path);
    let words = [
        "refused",
        "MEMORY.md/x.md",
        "lies under a symlink or a file",
    ];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));

    for (i, (what, entry, words)) in [
        (
            "a memsnap dir entry ../outside",
            json!({"part": "memdir", "path": "../outside", "kind": "dir", "mode": 0o755, "mtime_ns": 0}),
            vec!["refused", "../outside", "`..` path component"],
        ),
        (
            "a memsnap symlink entry at an absolute path",
            json!({"part": "memdir", "path": "/tmp/evil", "kind": "symlink", "mode": 0o777,
                   "mtime_ns": 0, "target": "x"}),
            vec!["refused", "/tmp/evil", "absolute path"],
        ),
        (
            "a memsnap state entry in a sub-folder",
            json!({"part": "state", "path": "sub/x.json", "kind": "file", "mode": 0o644,
                   "mtime_ns": 0, "bundle_path": "state/sub/x.json"}),
            vec!["refused", "sub/x.json"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let case = format!("case 12: {what}");
        let mut b = base.clone();
        b.memsnap_entries_mut().push(entry);
        let path = w.out(&format!("entry-meta-{i}.tar.zst"));
        b.write(&path);
        assert_refused(&w, &case, &path, &[], &[], &damage(&words, &words));
    }

    let case = "case 12: a file entry whose folder is not listed";
    let mut b = base.clone();
    b.add_memdir_file("ghost/x.md", b"# no folder\n");
    let path = w.out("no-folder.tar.zst");
    b.write(&path);
    let words = ["refused", "ghost/x.md", "its folder is not listed"];
    assert_refused(&w, case, &path, &[], &[], &damage(&words, &words));
}
