//! Property tests through the public API: a bundle exported from a store and imported into
//! another gives the same snapshot (id, names, label, time, git, schema versions, and every
//! entry's part, path, kind, mode, size and BLAKE3), for random small agents with the odd
//! corners a real memory has (non-UTF-8 names, symlinks, empty files, a database and a state
//! document nexo-memory-snapshot has no kind for), plain and age-encrypted.
//! Chunking, hashing, content trees and age are property-tested where they live (unit tests).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use age::secrecy::ExposeSecret;
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{
    AgentId, ExportRequest, ImportRequest, Memsnap, SnapshotRequest, SourceSpec, StoreOptions,
};
use proptest::prelude::*;

/// The odd corners, picked by `extras` bits.
fn add_extras(agent: &SampleAgent, extras: u8, seed: u64) {
    let memdir = agent.memdir();
    if extras & 1 != 0 {
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9 100%.md");
        fs::write(memdir.join(name), format!("latin-1 name {seed}")).expect("odd name");
    }
    if extras & 2 != 0 {
        std::os::unix::fs::symlink("MEMORY.md", memdir.join("link.md")).expect("symlink");
        fs::write(memdir.join("empty.md"), b"").expect("empty file");
    }
    if extras & 4 != 0 {
        let db = rusqlite::Connection::open(agent.sqlite_dir().join("notes.db")).expect("db");
        db.execute_batch(&format!(
            "PRAGMA user_version = 7; CREATE TABLE t(x); INSERT INTO t VALUES ({seed});"
        ))
        .expect("extra database");
    }
    if extras & 8 != 0 {
        let doc = format!(r#"{{"seed": {seed}, "note": "extra"}}"#);
        fs::write(agent.state_dir().join("notes.json"), doc).expect("extra state");
    }
}

/// Exports `id` from `a`, imports it into `b`, and compares what `show` says of both.
fn export_import(dir: &Path, a: &Memsnap, id: &str, encrypt: bool) {
    let out = dir.join("bundle.tar.zst");
    let mut export = ExportRequest::new(id, &out);
    let mut import = ImportRequest::new(&out);
    if encrypt {
        let key = age::x25519::Identity::generate();
        let file = dir.join("key.txt");
        fs::write(&file, key.to_string().expose_secret()).expect("key file");
        export = export.encrypt_to(key.to_public().to_string());
        import = import.identity(&file);
    }
    a.export(&export).expect("export");
    let b = Memsnap::create(dir.join("store-b"), StoreOptions::default()).expect("store b");
    let report = b.import(&import).expect("import");
    assert!(!report.already_present);

    let (x, y) = (
        a.show(id, None).expect("show a"),
        b.show(id, None).expect("show b"),
    );
    let key = |d: &memsnap::SnapshotDetails| {
        let i = &d.info;
        (
            (
                i.id.clone(),
                i.tenant.clone(),
                i.agent.clone(),
                i.label.clone(),
            ),
            (i.created_at_ms, i.created_by.clone(), i.git.clone()),
            (i.schema_versions.clone(), i.absent.clone()),
            (i.artifacts, i.logical_bytes),
        )
    };
    assert_eq!(key(&y), key(&x), "snapshot fields");
    let entries = |d: &memsnap::SnapshotDetails| {
        d.entries
            .iter()
            .map(|e| {
                let e = (&e.part, &e.path, &e.kind, e.mode, e.size, &e.blake3);
                format!("{e:?}")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(entries(&y), entries(&x), "entries");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// Export → import keeps the snapshot: its manifest fields and every entry.
    #[test]
    fn export_then_import_gives_the_same_snapshot(
        seed in 0u64..1000,
        notes in 1usize..6,
        memories in 0usize..8,
        vectors in 0usize..4,
        extras in 0u8..16,
        encrypt: bool,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = SampleSpec {
            seed,
            notes,
            commits: 1 + (seed % 2) as usize,
            memories,
            vectors,
            concepts: 2,
            compactions: 1,
        };
        let agent = SampleAgent::create(&dir.path().join("agent"), &spec).expect("agent");
        add_extras(&agent, extras, seed);
        let a = Memsnap::create(dir.path().join("store-a"), StoreOptions::default())
            .expect("store a");
        let req = SnapshotRequest::new(AgentId::new("acme", "ana").expect("names"))
            .sources(SourceSpec::from_root(agent.root()))
            .label(format!("p-{seed}"));
        let info = a.snapshot(&req).expect("snapshot");
        export_import(dir.path(), &a, &info.id, encrypt);
    }
}
