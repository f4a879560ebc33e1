//! Writes the seed corpora of every fuzz target into `fuzz/corpus/<target>/` (or the folder
//! given as the first argument): the nexo-memory-snapshot fixture bundles, bundles exported from
//! a small sample agent (plain and age-encrypted), their manifests and decompressed tars (as
//! structured inputs), the packs of the sample store and of tests/fixtures/store-v1, and the
//! index values of both stores. Deterministic but for ids and times; run from `fuzz/`:
//! `cargo run --example seeds`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{AgentId, ExportRequest, Memsnap, SnapshotRequest, SourceSpec, StoreOptions};

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.parent().expect("project root");
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("corpus"));
    let dir = |t: &str| {
        let d = out.join(t);
        fs::create_dir_all(&d).expect("mkdir corpus");
        d
    };
    let scratch = tempfile::tempdir().expect("tempdir");

    // Bundles: the fixtures as nexo-memory-snapshot wrote them, and memsnap's own exports.
    let fixtures = root.join("tests/fixtures/nexo-memory-snapshot-0.1.5");
    let mut bundles: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, file) in [
        (
            "nexo-plain",
            "01-plain/efd286e6-c21a-4a87-9c78-d93d4ce499db.tar.zst",
        ),
        (
            "nexo-age",
            "03-age/6b2e2ced-4fe7-4cf9-9ddf-5e0242e70535.tar.zst.age",
        ),
        (
            "nexo-after-change",
            "04-plain-after-change/849c2e56-ecb0-419a-be60-5d722cd7cb75.tar.zst",
        ),
    ] {
        bundles.push((
            name.into(),
            fs::read(fixtures.join(file)).expect("fixture bundle"),
        ));
    }
    let spec = SampleSpec {
        seed: 1,
        notes: 6,
        commits: 2,
        memories: 10,
        vectors: 4,
        concepts: 3,
        compactions: 1,
    };
    let agent = SampleAgent::create(&scratch.path().join("agent"), &spec).expect("sample agent");
    let store_dir = scratch.path().join("store");
    let store = Memsnap::create(&store_dir, StoreOptions::default()).expect("store");
    let id = AgentId::new("acme", "ana").expect("agent id");
    let req = SnapshotRequest::new(id).sources(SourceSpec::from_root(agent.root()));
    let first = store.snapshot(&req).expect("snapshot");
    agent.append_day(2, 0.2).expect("agent changes");
    let second = store
        .snapshot(&req.clone().label("day-2"))
        .expect("snapshot");
    for (name, snap, encrypt) in [
        ("sample-plain", &first.id, false),
        ("sample-day2", &second.id, false),
        ("sample-age", &second.id, true),
    ] {
        let path = scratch.path().join(format!("{name}.bundle"));
        let mut req = ExportRequest::new(snap.clone(), &path);
        if encrypt {
            req = req.encrypt_to(memsnap_fuzz::TEST_RECIPIENT);
        }
        store.export(&req).expect("export");
        bundles.push((name.into(), fs::read(&path).expect("bundle")));
    }
    for (name, bytes) in &bundles {
        fs::write(dir("bundle_import").join(name), bytes).expect("seed");
        if name.ends_with("age") {
            continue;
        }
        let mut tar = Vec::new();
        zstd::stream::read::Decoder::new(bytes.as_slice())
            .expect("zstd")
            .read_to_end(&mut tar)
            .expect("decompress");
        let pieces = memsnap_fuzz::pieces_of_tar(&tar);
        fs::write(dir("bundle_import_structured").join(name), &pieces).expect("seed");
        let manifest = tar::Archive::new(tar.as_slice())
            .entries()
            .expect("tar")
            .next()
            .expect("first entry")
            .map(|mut e| {
                let mut m = Vec::new();
                e.read_to_end(&mut m).map(|_| m)
            })
            .expect("entry")
            .expect("manifest");
        fs::write(dir("bundle_manifest").join(name), manifest).expect("seed");
    }

    // Packs, with flags byte 1 (fix the footer checksum after mutation).
    let v1 = scratch.path().join("store-v1");
    copy_tree(&root.join("tests/fixtures/store-v1"), &v1);
    for (name, store) in [("sample", &store_dir), ("store-v1", &v1)] {
        for (i, pack) in files_under(&store.join("packs")).iter().enumerate() {
            let mut seed = vec![1u8];
            seed.extend(fs::read(pack).expect("pack"));
            fs::write(dir("pack").join(format!("{name}-{i}")), seed).expect("seed");
            for (j, chunk) in memsnap::fuzzing::plane_seeds(pack, 8).iter().enumerate() {
                fs::write(dir("planes").join(format!("{name}-{i}-{j}")), chunk).expect("seed");
            }
        }
        let values = memsnap::fuzzing::index_seeds(store).expect("index values");
        for (i, v) in values.iter().enumerate() {
            fs::write(dir("index_records").join(format!("{name}-{i}")), v).expect("seed");
        }
    }
    println!("seed corpora written to {}", out.display());
}

fn files_under(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(d).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).expect("inside"));
        fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        fs::copy(&f, &dest).expect("copy");
    }
}
