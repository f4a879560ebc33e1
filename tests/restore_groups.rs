//! Restore writes files under 1 MiB (a memdir's notes) a group at a time, in parallel, and sets
//! each one's mode and mtime through its open handle where the storage can (the OS) or by path
//! where it cannot (a storage that does not say it can). Hundreds of notes in several folders,
//! with shared and empty contents, read-only and executable modes, and large files between
//! them, must come back exactly as they were through both.

mod common;
#[path = "support/crashfs.rs"]
mod crashfs;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use common::{AGENT, TENANT, assert_same_tree, tree};
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{
    AgentId, Memsnap, OsStorage, RestoreRequest, SnapshotRequest, SourceSpec, Storage, StoreOptions,
};

/// More notes than two groups hold, so that groups end both full and part full.
const NOTES: u64 = 700;

/// A tiny sample agent with [`NOTES`] more notes under `memdir/many/`.
fn agent_with_many_notes(root: &Path) -> SampleAgent {
    let agent = SampleAgent::create(&root.join("agent"), &SampleSpec::tiny()).expect("agent");
    let many = agent.memdir().join("many");
    for i in 0..NOTES {
        let dir = many.join(format!("d{}", i % 7));
        fs::create_dir_all(&dir).expect("mkdir");
        let body: Vec<u8> = match i % 5 {
            // The same bytes in many notes: one chunk, read for each of them.
            0 => b"# Shared\n\nthe same note\n".to_vec(),
            1 => Vec::new(),
            // Just under the size restore writes past the page cache, now and then.
            2 if i % 100 == 2 => pseudo_random(i, (1 << 20) - 1),
            // Large enough to be written on its own, between groups of notes.
            3 if i % 150 == 3 => pseudo_random(i, (1 << 20) + 4097 * i as usize),
            _ => pseudo_random(i, (i as usize * 997) % 60_000),
        };
        let path = dir.join(format!("note-{i}.md"));
        fs::write(&path, &body).expect("write note");
        let mode = [0o444, 0o640, 0o755][i as usize % 3];
        let file = fs::File::options().write(true).open(&path).expect("open");
        file.set_modified(UNIX_EPOCH + Duration::new(1_700_000_000 + i * 61, (i * 7919) as u32))
            .expect("mtime");
        drop(file);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    fs::set_permissions(many.join("d6"), fs::Permissions::from_mode(0o555)).expect("chmod dir");
    agent
}

/// `len` bytes that differ from note to note and do not compress away.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut xof = h.finalize_xof();
    out.resize(len, 0);
    xof.fill(&mut out);
    out
}

/// Snapshots the agent into a store on `storage`, restores it into an empty folder and checks
/// the memdir against the original: every entry's bytes, mode and mtime.
fn restores_exactly(storage: Arc<dyn Storage>, what: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = agent_with_many_notes(tmp.path());
    let m = Memsnap::create(
        tmp.path().join("store"),
        StoreOptions::default().storage(storage),
    )
    .expect("store");
    let id = AgentId::new(TENANT, AGENT).expect("id");
    let snap = m
        .snapshot(&SnapshotRequest::new(id.clone()).sources(SourceSpec::from_root(agent.root())))
        .expect("snapshot");
    let target = tmp.path().join("restored");
    m.restore(&RestoreRequest::new(&snap.id).agent(id).target(&target))
        .expect("restore");
    let expected = tree(&agent.memdir(), true);
    assert!(
        expected.len() as u64 > NOTES,
        "{what}: the agent has its notes"
    );
    assert_same_tree(&expected, &tree(&target.join("memdir"), true), what);
}

#[test]
fn notes_restore_with_their_bytes_modes_and_mtimes_through_the_open_file() {
    restores_exactly(
        Arc::new(OsStorage),
        "modes and mtimes set through the open file",
    );
}

#[test]
fn notes_restore_with_their_bytes_modes_and_mtimes_by_path() {
    // CrashFs passes every call through, but does not set modes and mtimes itself.
    restores_exactly(crashfs::CrashFs::new(), "modes and mtimes set by path");
}
