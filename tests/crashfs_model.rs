//! The crash model of `tests/support/crashfs.rs`, tested through the `Storage` trait against
//! real temporary directories.

#[path = "support/crashfs.rs"]
mod crashfs;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crashfs::{CrashFs, Fault};
use memsnap::{OpenMode, Storage, StorageFile};

const NEW: OpenMode = OpenMode::CreateNew { mode: 0o644 };

fn setup() -> (tempfile::TempDir, Arc<CrashFs>) {
    let dir = tempfile::tempdir().expect("tempdir");
    (dir, CrashFs::new())
}

/// Creates `path` through the storage with `bytes`; returns the open handle.
fn create(fs: &CrashFs, path: &Path, bytes: &[u8]) -> Box<dyn StorageFile> {
    let f = fs.open(path, NEW).expect("create");
    f.write_all_at(bytes, 0).expect("write");
    f
}

/// The real content of `path`, `None` if it does not exist.
fn content(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Crash now and put the disk back to its durable state.
fn crash_and_restore(fs: &CrashFs) {
    fs.crash();
    fs.restore_durable().expect("restore_durable");
}

/// The sorted names in a directory (real).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// 1.
#[test]
fn synced_file_without_dir_sync_is_gone() {
    let (tmp, fs) = setup();
    let p = tmp.path().join("a");
    let f = create(&fs, &p, b"hello");
    f.sync().expect("sync");
    drop(f);
    assert_eq!(content(&p).as_deref(), Some(&b"hello"[..]));
    crash_and_restore(&fs);
    assert!(!exists(&p));
}

// 2.
#[test]
fn dir_synced_without_data_sync_is_empty() {
    let (tmp, fs) = setup();
    let p = tmp.path().join("a");
    let f = create(&fs, &p, b"hello");
    fs.sync_dir(tmp.path()).expect("sync_dir");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b""[..]));
}

#[test]
fn data_and_dir_synced_survive_with_mode() {
    let (tmp, fs) = setup();
    let p = tmp.path().join("a");
    let f = fs
        .open(&p, OpenMode::CreateNew { mode: 0o640 })
        .expect("create");
    f.write_all_at(b"hello", 0).expect("write");
    f.sync().expect("sync");
    fs.sync_dir(tmp.path()).expect("sync_dir");
    // Changes after the syncs are lost; the removal too (directory not synced again).
    f.write_all_at(b"J", 0).expect("write");
    drop(f);
    fs.remove_file(&p).expect("remove");
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"hello"[..]));
    let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
}

/// A pre-existing target, then temp file written + synced and renamed over it.
fn atomic_replace(fs: &CrashFs, dir: &Path, sync_dir: bool) -> (PathBuf, PathBuf) {
    let target = dir.join("target");
    let tmp = dir.join("target.tmp");
    fs::write(&target, b"old").expect("setup");
    let f = create(fs, &tmp, b"new content");
    f.sync().expect("sync");
    drop(f);
    fs.rename(&tmp, &target).expect("rename");
    if sync_dir {
        fs.sync_dir(dir).expect("sync_dir");
    }
    assert_eq!(content(&target).as_deref(), Some(&b"new content"[..]));
    assert!(!exists(&tmp));
    (target, tmp)
}

// 3.
#[test]
fn rename_over_without_dir_sync_brings_back_old_target() {
    let (dir, fs) = setup();
    let (target, tmp) = atomic_replace(&fs, dir.path(), false);
    crash_and_restore(&fs);
    assert_eq!(content(&target).as_deref(), Some(&b"old"[..]));
    // The temp name was never durable either: the directory was not synced after its creation.
    assert!(!exists(&tmp));
}

// 3 (as the brief states it: the temp name was durable before the rename).
#[test]
fn rename_over_of_durable_temp_without_dir_sync_keeps_temp_with_synced_bytes() {
    let (dir, fs) = setup();
    let target = dir.path().join("target");
    let tmp = dir.path().join("target.tmp");
    fs::write(&target, b"old").expect("setup");
    let f = create(&fs, &tmp, b"");
    fs.sync_dir(dir.path()).expect("sync_dir"); // the temp name is durable, empty
    f.write_all_at(b"new content", 0).expect("write");
    f.sync().expect("sync");
    drop(f);
    fs.rename(&tmp, &target).expect("rename");
    crash_and_restore(&fs);
    assert_eq!(content(&target).as_deref(), Some(&b"old"[..]));
    assert_eq!(content(&tmp).as_deref(), Some(&b"new content"[..]));
}

// 4.
#[test]
fn rename_over_with_dir_sync_is_durable() {
    let (dir, fs) = setup();
    let (target, tmp) = atomic_replace(&fs, dir.path(), true);
    crash_and_restore(&fs);
    assert_eq!(content(&target).as_deref(), Some(&b"new content"[..]));
    assert!(!exists(&tmp));
    assert_eq!(names(dir.path()), ["target"]);
}

#[test]
fn rename_across_dirs_needs_both_dir_syncs() {
    let (dir, fs) = setup();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&a).expect("setup");
    fs::create_dir(&b).expect("setup");
    fs::write(a.join("f"), b"data").expect("setup");
    fs.rename(&a.join("f"), &b.join("f")).expect("rename");
    fs.sync_dir(&b).expect("sync_dir"); // the new name is durable, the removal is not
    crash_and_restore(&fs);
    assert_eq!(content(&a.join("f")).as_deref(), Some(&b"data"[..]));
    assert_eq!(content(&b.join("f")).as_deref(), Some(&b"data"[..]));

    // Now both sides.
    let fs = CrashFs::new();
    fs::remove_file(b.join("f")).expect("setup");
    fs.rename(&a.join("f"), &b.join("f")).expect("rename");
    fs.sync_dir(&a).expect("sync_dir");
    fs.sync_dir(&b).expect("sync_dir");
    crash_and_restore(&fs);
    assert!(!exists(&a.join("f")));
    assert_eq!(content(&b.join("f")).as_deref(), Some(&b"data"[..]));
}

// 5.
#[test]
fn removed_durable_file_comes_back_without_dir_sync() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    fs::write(&p, b"keep me").expect("setup");
    fs.remove_file(&p).expect("remove");
    assert!(!exists(&p));
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"keep me"[..]));

    fs.remove_file(&p).expect("remove");
    fs.sync_dir(dir.path()).expect("sync_dir");
    crash_and_restore(&fs);
    assert!(!exists(&p));
}

// 6.
#[test]
fn set_len_after_sync_is_undone() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    let f = create(&fs, &p, b"0123456789");
    f.sync().expect("sync");
    fs.sync_dir(dir.path()).expect("sync_dir");
    f.set_len(3).expect("set_len");
    assert_eq!(f.len().expect("len"), 3);
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"0123456789"[..]));
}

#[test]
fn preexisting_file_changed_in_place_is_undone_unless_synced() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    fs::write(&p, b"original").expect("setup");
    let f = fs.open(&p, OpenMode::ReadWrite).expect("open");
    f.write_all_at(b"OVERWRITTEN, LONGER", 0).expect("write");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"original"[..]));

    let f = fs
        .open(&p, OpenMode::OpenOrCreate { mode: 0o600 })
        .expect("open");
    f.write_all_at(b"O", 0).expect("write");
    f.sync().expect("sync");
    f.set_len(2).expect("set_len"); // after the sync: lost
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"Original"[..]));
}

// 7.
#[test]
fn unsynced_dir_goes_whole() {
    let (dir, fs) = setup();
    let d = dir.path().join("d");
    fs.create_dir(&d).expect("create_dir");
    fs.create_dir(&d.join("sub")).expect("create_dir");
    let f = create(&fs, &d.join("sub").join("f"), b"x");
    f.sync().expect("sync");
    fs.sync_dir(&d.join("sub")).expect("sync_dir");
    fs.sync_dir(&d).expect("sync_dir");
    drop(f);
    // Written behind the storage's back inside a directory it created: goes with it.
    fs::write(d.join("outsider"), b"y").expect("write");
    crash_and_restore(&fs);
    assert!(!exists(&d));
    assert!(names(dir.path()).is_empty());
}

#[test]
fn synced_dir_chain_survives() {
    let (dir, fs) = setup();
    let d = dir.path().join("d");
    fs.create_dir(&d).expect("create_dir");
    fs.sync_dir(dir.path()).expect("sync_dir");
    let f = create(&fs, &d.join("f"), b"x");
    f.sync().expect("sync");
    fs.sync_dir(&d).expect("sync_dir");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&d.join("f")).as_deref(), Some(&b"x"[..]));
}

#[test]
fn removed_empty_dir_comes_back_without_sync() {
    let (dir, fs) = setup();
    let d = dir.path().join("d");
    fs::create_dir(&d).expect("setup");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).expect("chmod");
    fs.remove_dir(&d).expect("remove_dir");
    crash_and_restore(&fs);
    let m = fs::metadata(&d).expect("d is back");
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
}

/// The restore swap: a pre-existing live directory (with a nested tree the storage never saw)
/// is moved aside and a staged one, made and synced through the storage, takes its name.
struct Swap {
    live: PathBuf,
    staged: PathBuf,
    aside: PathBuf,
}

fn swap(fs: &CrashFs, root: &Path, sync_parent: bool) -> Swap {
    let s = Swap {
        live: root.join("live"),
        staged: root.join("staged"),
        aside: root.join("live.old"),
    };
    fs::create_dir_all(s.live.join("deep/er")).expect("setup");
    fs::write(s.live.join("a"), b"old a").expect("setup");
    fs::write(s.live.join("deep/er/b"), b"old b").expect("setup");
    std::os::unix::fs::symlink("deep/er/b", s.live.join("link")).expect("setup");

    fs.create_dir(&s.staged).expect("create_dir");
    let f = create(fs, &s.staged.join("a"), b"new a");
    f.sync().expect("sync");
    drop(f);
    fs.sync_dir(&s.staged).expect("sync_dir");
    fs.sync_dir(root).expect("sync_dir"); // the staged directory is durable

    fs.rename(&s.live, &s.aside).expect("rename aside");
    fs.rename(&s.staged, &s.live).expect("rename in");
    if sync_parent {
        fs.sync_dir(root).expect("sync_dir");
    }
    assert_eq!(content(&s.live.join("a")).as_deref(), Some(&b"new a"[..]));
    assert_eq!(
        content(&s.aside.join("deep/er/b")).as_deref(),
        Some(&b"old b"[..])
    );
    s
}

// 8.
#[test]
fn dir_swap_without_parent_sync_is_undone() {
    let (dir, fs) = setup();
    let s = swap(&fs, dir.path(), false);
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["live", "staged"]);
    assert_eq!(names(&s.live), ["a", "deep", "link"]);
    assert_eq!(content(&s.live.join("a")).as_deref(), Some(&b"old a"[..]));
    assert_eq!(
        content(&s.live.join("deep/er/b")).as_deref(),
        Some(&b"old b"[..])
    );
    assert_eq!(
        fs::read_link(s.live.join("link")).expect("link"),
        Path::new("deep/er/b")
    );
    assert_eq!(names(&s.staged), ["a"]);
    assert_eq!(content(&s.staged.join("a")).as_deref(), Some(&b"new a"[..]));
}

// 8.
#[test]
fn dir_swap_with_parent_sync_is_durable() {
    let (dir, fs) = setup();
    let s = swap(&fs, dir.path(), true);
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["live", "live.old"]);
    assert_eq!(names(&s.live), ["a"]);
    assert_eq!(content(&s.live.join("a")).as_deref(), Some(&b"new a"[..]));
    assert_eq!(
        content(&s.aside.join("deep/er/b")).as_deref(),
        Some(&b"old b"[..])
    );
    assert_eq!(content(&s.aside.join("a")).as_deref(), Some(&b"old a"[..]));
}

#[test]
fn dir_swap_then_removal_of_old_without_sync() {
    let (dir, fs) = setup();
    let s = swap(&fs, dir.path(), true);
    // Remove the old tree (files first, as the library's remove_any does); not synced.
    fs.remove_file(&s.aside.join("deep/er/b")).expect("rm");
    fs.remove_dir(&s.aside.join("deep/er")).expect("rmdir");
    fs.remove_dir(&s.aside.join("deep")).expect("rmdir");
    fs.remove_file(&s.aside.join("link")).expect("rm");
    fs.remove_file(&s.aside.join("a")).expect("rm");
    fs.remove_dir(&s.aside).expect("rmdir");
    crash_and_restore(&fs);
    assert_eq!(
        content(&s.aside.join("deep/er/b")).as_deref(),
        Some(&b"old b"[..])
    );
    assert_eq!(content(&s.live.join("a")).as_deref(), Some(&b"new a"[..]));

    // The removal of the top directory synced, the inside not: all of it gone all the same.
    let fs = CrashFs::new();
    fs.remove_file(&s.aside.join("deep/er/b")).expect("rm");
    fs.remove_dir(&s.aside.join("deep/er")).expect("rmdir");
    fs.remove_dir(&s.aside.join("deep")).expect("rmdir");
    fs.remove_file(&s.aside.join("link")).expect("rm");
    fs.remove_file(&s.aside.join("a")).expect("rm");
    fs.remove_dir(&s.aside).expect("rmdir");
    fs.sync_dir(dir.path()).expect("sync_dir");
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["live"]);
}

#[test]
fn synced_entries_of_a_renamed_dir_follow_its_durable_name() {
    // The directory's own entries are synced after the rename, the rename itself is not: the
    // entries are durable under the directory's old (durable) name.
    let (dir, fs) = setup();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&a).expect("setup");
    fs.rename(&a, &b).expect("rename");
    let f = create(&fs, &b.join("f"), b"x");
    f.sync().expect("sync");
    fs.sync_dir(&b).expect("sync_dir");
    drop(f);
    crash_and_restore(&fs);
    assert!(!exists(&b));
    assert_eq!(content(&a.join("f")).as_deref(), Some(&b"x"[..]));
}

#[test]
fn file_at_its_durable_path_inside_a_replaced_dir_keeps_its_bytes() {
    // The file is at the same path as durably, but in another directory inode that restore
    // removes whole: its bytes must be taken before.
    let (dir, fs) = setup();
    let (p, old) = (dir.path().join("p"), dir.path().join("p.old"));
    fs::create_dir(&p).expect("setup");
    fs::write(p.join("f"), b"f bytes").expect("setup");
    fs.rename(&p, &old).expect("rename");
    fs.create_dir(&p).expect("create_dir");
    fs.rename(&old.join("f"), &p.join("f")).expect("rename");
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["p"]);
    assert_eq!(content(&p.join("f")).as_deref(), Some(&b"f bytes"[..]));
}

// 9.
#[test]
fn sync_filesystem_makes_everything_durable() {
    let (dir, fs) = setup();
    let root = dir.path();
    fs::write(root.join("gone"), b"g").expect("setup");
    fs::write(root.join("moved"), b"m").expect("setup");
    fs.create_dir(&root.join("d")).expect("create_dir");
    let f = create(&fs, &root.join("d/f"), b"f");
    let g = create(&fs, &root.join("g"), b"g1");
    g.write_all_at(b"2", 1).expect("write");
    fs.remove_file(&root.join("gone")).expect("rm");
    fs.rename(&root.join("moved"), &root.join("d/moved"))
        .expect("rename");
    fs.symlink(Path::new("d/f"), &root.join("l"))
        .expect("symlink");
    fs.sync_filesystem(root).expect("syncfs");
    // After it, not durable again.
    f.write_all_at(b"F", 0).expect("write");
    fs.remove_file(&root.join("g")).expect("rm");
    drop((f, g));
    crash_and_restore(&fs);
    assert_eq!(names(root), ["d", "g", "l"]);
    assert_eq!(names(&root.join("d")), ["f", "moved"]);
    assert_eq!(content(&root.join("d/f")).as_deref(), Some(&b"f"[..]));
    assert_eq!(content(&root.join("d/moved")).as_deref(), Some(&b"m"[..]));
    assert_eq!(content(&root.join("g")).as_deref(), Some(&b"g2"[..]));
    assert_eq!(fs::read_link(root.join("l")).expect("l"), Path::new("d/f"));
}

#[test]
fn symlinks_follow_their_directory() {
    let (dir, fs) = setup();
    let (l1, l2) = (dir.path().join("l1"), dir.path().join("l2"));
    std::os::unix::fs::symlink("old-target", &l1).expect("setup");
    fs.symlink(Path::new("new-target"), &l2).expect("symlink");
    fs.remove_file(&l1).expect("remove");
    crash_and_restore(&fs);
    assert_eq!(fs::read_link(&l1).expect("l1"), Path::new("old-target"));
    assert!(!exists(&l2));

    fs.symlink(Path::new("new-target"), &l2).expect("symlink");
    fs.sync_dir(dir.path()).expect("sync_dir");
    crash_and_restore(&fs);
    assert_eq!(fs::read_link(&l2).expect("l2"), Path::new("new-target"));
}

#[test]
fn symlinked_directory_in_the_path_is_followed() {
    let (dir, fs) = setup();
    let real = dir.path().join("real");
    fs::create_dir(&real).expect("setup");
    std::os::unix::fs::symlink("real", dir.path().join("via")).expect("setup");
    let via = dir.path().join("via");
    let f = create(&fs, &via.join("f"), b"x");
    f.sync().expect("sync");
    drop(f);
    let g = create(&fs, &via.join("g"), b"y");
    drop(g);
    fs.sync_dir(&via).expect("sync_dir"); // syncs `real`, through the link
    fs.remove_file(&real.join("g")).expect("rm"); // the same file by its real path
    crash_and_restore(&fs);
    assert_eq!(names(&real), ["f", "g"]);
    assert_eq!(content(&real.join("f")).as_deref(), Some(&b"x"[..]));
    assert_eq!(content(&real.join("g")).as_deref(), Some(&b""[..]));
    assert!(
        fs::symlink_metadata(&via)
            .expect("via")
            .file_type()
            .is_symlink()
    );
}

#[test]
fn handle_follows_its_file_across_renames() {
    let (dir, fs) = setup();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let f = create(&fs, &a, b"one");
    fs.rename(&a, &b).expect("rename");
    f.write_all_at(b"two", 0).expect("write");
    f.sync().expect("sync");
    fs.sync_dir(dir.path()).expect("sync_dir");
    let mut buf = [0u8; 8];
    assert_eq!(f.read_at(&mut buf, 0).expect("read"), 3);
    assert_eq!(&buf[..3], b"two");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["b"]);
    assert_eq!(content(&b).as_deref(), Some(&b"two"[..]));
}

#[test]
fn sync_of_a_replaced_file_still_counts_under_its_durable_name() {
    // The handle's file lost its name to a rename (not yet durable); its sync still makes its
    // bytes durable, and a crash brings that name back with them.
    let (dir, fs) = setup();
    let (a, t) = (dir.path().join("a"), dir.path().join("t"));
    fs::write(&a, b"v1").expect("setup");
    fs::write(&t, b"other").expect("setup");
    let f = fs.open(&a, OpenMode::ReadWrite).expect("open");
    fs.rename(&t, &a).expect("rename");
    f.write_all_at(b"v2", 0).expect("write");
    f.sync().expect("sync");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&a).as_deref(), Some(&b"v2"[..]));
    assert_eq!(content(&t).as_deref(), Some(&b"other"[..]));
}

#[test]
fn restore_leaves_unseen_and_unchanged_paths_alone() {
    let (dir, fs) = setup();
    let seen = dir.path().join("seen");
    fs::write(&seen, b"s").expect("setup");
    let before = fs::metadata(&seen)
        .expect("stat")
        .modified()
        .expect("mtime");
    let f = fs.open(&seen, OpenMode::Read).expect("open");
    drop(f);
    let t = create(&fs, &dir.path().join("new"), b"n");
    drop(t);
    fs::write(dir.path().join("unseen"), b"u").expect("write");
    std::thread::sleep(std::time::Duration::from_millis(20));
    crash_and_restore(&fs);
    assert_eq!(names(dir.path()), ["seen", "unseen"]);
    let after = fs::metadata(&seen)
        .expect("stat")
        .modified()
        .expect("mtime");
    assert_eq!(before, after, "an unchanged file is not rewritten");
}

// 10.
#[test]
fn crash_at_sync_stops_everything() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    fs.crash_at_sync(2);
    let f = create(&fs, &p, b"one");
    f.sync().expect("sync 1 takes effect");
    f.write_all_at(b"two", 0).expect("write");
    let e = f.sync().expect_err("sync 2 crashes");
    assert!(crashfs::is_crash_error(&e), "{e}");
    assert!(fs.is_crashed());
    assert_eq!(fs.syncs(), 2);
    let ops = fs.ops();
    assert_eq!(ops, 5, "{:#?}", fs.op_log()); // open, write, sync, write, sync
    assert!(fs.op_log().last().expect("log").ends_with("=> CRASH"));

    // Everything fails now: handle calls, reads, opens, names, syncs.
    let mut buf = [0u8; 4];
    assert!(f.read_at(&mut buf, 0).is_err());
    assert!(f.len().is_err());
    assert!(f.write_all_at(b"x", 0).is_err());
    assert!(f.set_len(0).is_err());
    assert!(f.sync().is_err());
    assert!(fs.open(&p, OpenMode::Read).is_err());
    assert!(fs.create_dir(&dir.path().join("d")).is_err());
    assert!(fs.rename(&p, &dir.path().join("g")).is_err());
    assert!(fs.remove_file(&p).is_err());
    assert!(fs.sync_dir(dir.path()).is_err());
    assert!(fs.sync_filesystem(dir.path()).is_err());
    assert!(!exists(&dir.path().join("d")), "no effect after the crash");
    assert_eq!(fs.ops(), ops, "calls after the crash are not counted");
    assert_eq!(fs.syncs(), 2);

    // The file name was never synced: gone. Fresh counters, alive, old handle stale.
    fs.restore_durable().expect("restore");
    assert!(!exists(&p));
    assert!(!fs.is_crashed());
    assert_eq!((fs.ops(), fs.syncs()), (0, 0));
    assert!(fs.op_log().is_empty());
    let e = f.len().expect_err("stale");
    assert!(e.to_string().contains("stale"), "{e}");
    let g = create(&fs, &p, b"again");
    g.sync().expect("no crash armed any more");
}

/// The crash walk, as a test of the library would do it: run a step once to count its sync
/// points, then once per sync point with a crash there, checking the invariant after restore.
#[test]
fn crash_walk_of_an_atomic_replace() {
    fn step(fs: &CrashFs, dir: &Path) -> io::Result<()> {
        let (tmp, target) = (dir.join("t.tmp"), dir.join("t"));
        let f = fs.open(&tmp, NEW)?;
        f.write_all_at(b"new", 0)?;
        f.sync()?;
        drop(f);
        fs.rename(&tmp, &target)?;
        fs.sync_dir(dir)
    }
    let (dir, fs) = setup();
    let target = dir.path().join("t");
    fs::write(&target, b"old").expect("setup");
    step(&fs, dir.path()).expect("step");
    let n = fs.syncs();
    assert_eq!(n, 2);
    let mut seen = Vec::new();
    for k in 1..=n + 1 {
        fs::write(&target, b"old").expect("setup");
        let fs = CrashFs::new();
        fs.crash_at_sync(k);
        let r = step(&fs, dir.path());
        assert_eq!(r.is_err(), k <= n, "crash at {k}");
        fs.restore_durable().expect("restore");
        let got = content(&target).expect("target always exists");
        assert!(got == b"old" || got == b"new", "crash at {k}: {got:?}");
        assert_eq!(names(dir.path()), ["t"], "crash at {k}");
        seen.push(got);
    }
    assert_eq!(seen, [b"old".to_vec(), b"old".to_vec(), b"new".to_vec()]);
}

// 11.
#[test]
fn fail_op_has_no_effect_and_fires_once() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    let f = create(&fs, &p, b"abc");
    fs.fail_op(fs.ops() + 1, Fault::NoSpace);
    let e = f.write_all_at(b"XYZ", 0).expect_err("ENOSPC");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(content(&p).as_deref(), Some(&b"abc"[..]));
    f.write_all_at(b"XYZ", 0).expect("works again");
    assert_eq!(content(&p).as_deref(), Some(&b"XYZ"[..]));
    assert!(!fs.is_crashed());
    assert!(
        fs.op_log()[2].contains("fault NoSpace"),
        "{:#?}",
        fs.op_log()
    );

    // EACCES on a rename, a create_dir and an open.
    let n = fs.ops();
    fs.fail_op(n + 1, Fault::Denied);
    fs.fail_op(n + 2, Fault::Denied);
    fs.fail_op(n + 3, Fault::Denied);
    let q = dir.path().join("g");
    let e = fs.rename(&p, &q).expect_err("EACCES");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    let e = fs.create_dir(&dir.path().join("d")).expect_err("EACCES");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    let e = fs.open(&q, NEW).expect_err("EACCES");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    assert_eq!(names(dir.path()), ["f"]);
    assert_eq!(fs.ops(), n + 3);
}

#[test]
fn faulted_sync_is_no_sync_point_and_makes_nothing_durable() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    let f = create(&fs, &p, b"abc");
    fs.sync_dir(dir.path()).expect("sync_dir");
    assert_eq!(fs.syncs(), 1);
    fs.fail_op(fs.ops() + 1, Fault::NoSpace);
    let e = f.sync().expect_err("ENOSPC");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(fs.syncs(), 1);
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b""[..]));
}

#[test]
fn reset_makes_the_present_durable_and_zeroes_counters() {
    let (dir, fs) = setup();
    let p = dir.path().join("f");
    let f = create(&fs, &p, b"setup");
    fs.crash_at_sync(1);
    fs.reset().expect("reset");
    assert_eq!((fs.ops(), fs.syncs()), (0, 0));
    f.write_all_at(b"S", 0).expect("handles stay valid");
    f.sync().expect("no crash armed");
    drop(f);
    crash_and_restore(&fs);
    assert_eq!(content(&p).as_deref(), Some(&b"Setup"[..]));
}

// 12.
#[test]
fn concurrent_writers() {
    const THREADS: usize = 4;
    const FILES: usize = 25;
    let (dir, fs) = setup();
    let run = |fs: Arc<CrashFs>| -> Vec<Vec<PathBuf>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let fs = Arc::clone(&fs);
                    let root = dir.path().to_path_buf();
                    s.spawn(move || {
                        // Only the files whose every step returned Ok.
                        let mut done = Vec::new();
                        for i in 0..FILES {
                            let p = root.join(format!("t{t}-{i}"));
                            let r = (|| -> io::Result<()> {
                                let f = fs.open(&p, NEW)?;
                                f.write_all_at(p.to_string_lossy().as_bytes(), 0)?;
                                f.sync()?;
                                fs.sync_dir(&root)
                            })();
                            if r.is_err() {
                                break;
                            }
                            done.push(p);
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        })
    };

    let all = run(Arc::clone(&fs));
    assert_eq!(fs.syncs(), (THREADS * FILES * 2) as u64);
    crash_and_restore(&fs);
    for p in all.iter().flatten() {
        assert_eq!(content(p).expect("durable"), p.to_string_lossy().as_bytes());
    }
    assert_eq!(names(dir.path()).len(), THREADS * FILES);

    // With a crash in the middle: every completed file is whole, any other is missing, empty
    // or whole (never a torn write here: each is one write).
    for name in names(dir.path()) {
        fs::remove_file(dir.path().join(name)).expect("clean");
    }
    let fs = CrashFs::new();
    fs.crash_at_sync((THREADS * FILES) as u64);
    let done = run(Arc::clone(&fs));
    assert!(fs.is_crashed());
    fs.restore_durable().expect("restore");
    for p in done.iter().flatten() {
        assert_eq!(content(p).expect("durable"), p.to_string_lossy().as_bytes());
    }
    for name in names(dir.path()) {
        let p = dir.path().join(name);
        let got = content(&p).expect("read");
        assert!(got.is_empty() || got == p.to_string_lossy().as_bytes());
    }
}
