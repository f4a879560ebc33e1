//! Crash and fault walks (after redb's crash-consistency tests): the store runs on a storage
//! (`support/crashfs.rs`) that writes through to disk and keeps a model of what a power loss
//! would leave. For each of snapshot, restore (in place), import, forget and prune, a run
//! without faults counts its sync points and storage operations; then, from the same starting
//! copy each time:
//! - **crash walk**: the N-th sync does not happen and nothing after it either; the disk is put
//!   back to what was durable; the store opens (recovering what it must), `verify --read-data`
//!   passes, every snapshot committed before is listed and restores exactly, a new one is listed
//!   only whole, the live agent is the old one or the restored one, and a prune afterwards
//!   leaves a store that verifies;
//! - **fault walk**: the N-th operation fails with ENOSPC or EACCES; the error names the path and
//!   the cause, and the store is as it was: same snapshots, verifies, no temporary files, no new
//!   pack files.
//!
//! CI walks every sync point and every 7th operation. `MEMSNAP_CRASH_FULL=1` walks every
//! operation too: `MEMSNAP_CRASH_FULL=1 cargo test --release --test crash_walk`.

mod common;
#[path = "support/crashfs.rs"]
mod crashfs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::Duration;

use common::{AGENT, TENANT, Tree, assert_same_tree, tree};
use crashfs::{CrashFs, Fault};
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{
    AgentId, ExportRequest, ForgetRequest, ImportRequest, Memsnap, OsStorage, PruneRequest,
    RestoreRequest, RetentionPolicy, SnapshotRequest, SourceSpec, Storage, StoreOptions,
};

/// Small packs, so that a tiny agent writes several and their syncs interleave, and small
/// batches of filter hits, so that a snapshot or import over a known agent opens index
/// sessions to confirm them while it writes.
fn knobs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: set once, before any store is opened in this process; std serialises its own
        // environment access.
        unsafe {
            std::env::set_var("MEMSNAP_TEST_PACK_BYTES", "65536");
            std::env::set_var("MEMSNAP_TEST_CONFIRM_BATCH", "16");
        }
    });
}

fn full() -> bool {
    std::env::var_os("MEMSNAP_CRASH_FULL").is_some()
}

fn agent_id() -> AgentId {
    AgentId::new(TENANT, AGENT).expect("agent id")
}

fn open(root: &Path, storage: Arc<dyn Storage>) -> Memsnap {
    Memsnap::open(
        root.join("store"),
        StoreOptions::default()
            .lock_timeout(Duration::from_secs(5))
            .storage(storage),
    )
    .expect("the store opens")
}

fn os() -> Arc<dyn Storage> {
    Arc::new(OsStorage)
}

fn copy_tree(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs")
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

fn snapshot(m: &Memsnap, root: &Path, label: &str) -> memsnap::Result<memsnap::SnapshotInfo> {
    m.snapshot(
        &SnapshotRequest::new(agent_id())
            .sources(SourceSpec::from_root(root.join("agent")))
            .label(label),
    )
}

/// label → snapshot id, for the snapshots listed.
fn labels(m: &Memsnap) -> BTreeMap<String, String> {
    m.list(None, None)
        .expect("list")
        .into_iter()
        .map(|i| (i.label.unwrap_or_default(), i.id))
        .collect()
}

/// What a restore of snapshot `id` into an empty folder writes (modes, sizes, bytes, links).
fn restored_image(m: &Memsnap, id: &str, scratch: &Path) -> Tree {
    let target = scratch.join(format!("restored-{id}"));
    m.restore(&RestoreRequest::new(id).agent(agent_id()).target(&target))
        .unwrap_or_else(|e| panic!("snapshot {id} restores: {e}"));
    let t = tree(&target, false);
    let _ = std::fs::remove_dir_all(&target);
    t
}

/// The live agent's memory as a restore sets it: the memdir and state trees, and each
/// database's rows (a restore into a live database goes through SQLite, so its bytes may differ).
#[derive(Debug, PartialEq)]
struct LiveImage {
    memdir: Tree,
    state: Tree,
    rows: BTreeMap<String, i64>,
    head: Option<String>,
}

fn live_image(root: &Path) -> LiveImage {
    let agent = SampleAgent::open(&root.join("agent"));
    LiveImage {
        memdir: tree(&agent.memdir(), false),
        state: tree(&agent.state_dir(), false),
        rows: agent.row_counts().expect("row counts"),
        head: agent.git_head().expect("git head"),
    }
}

fn pack_files(root: &Path) -> BTreeSet<PathBuf> {
    walkdir::WalkDir::new(root.join("store/packs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(root).expect("below").to_path_buf())
        .collect()
}

/// Temporary files a finished or failed operation must not leave in the store.
fn store_leftovers(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root.join("store"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy();
            (e.depth() == 2 && e.path().parent() == Some(&root.join("store/tmp")))
                || name.contains(".tmp-")
        })
        .map(|e| e.path().to_path_buf())
        .collect()
}

type Op = dyn Fn(&Memsnap, &Path) -> memsnap::Result<()>;

/// One walk: a starting folder (`template/{store,agent}` plus whatever the operation needs) and
/// what each listed snapshot must restore to.
struct Walk {
    name: &'static str,
    template: PathBuf,
    /// label → image of every snapshot the store may list, before or after the operation.
    images: BTreeMap<String, Tree>,
    /// Labels that must be listed whatever happens (committed before, not the operation's to
    /// remove).
    must: BTreeSet<String>,
    /// Labels listed before the operation.
    before: BTreeSet<String>,
    /// Labels listed after it succeeded (set by the clean run).
    after: std::cell::RefCell<BTreeSet<String>>,
    /// For a restore into the live agent: it is one of these afterwards.
    live: Option<(LiveImage, LiveImage)>,
    /// For an export: the bundle it writes, relative to the walk's folder.
    bundle: Option<&'static str>,
    op: Box<Op>,
}

struct Tally {
    crashes: u64,
    faults: u64,
    failed: u64,
    /// Failed, yet the commit is visible (a failed sync of the index after its commit record).
    visible: u64,
}

impl Walk {
    fn fresh(&self, scratch: &Path, n: u64) -> PathBuf {
        let root = scratch.join(format!("{}-{n}", self.name));
        copy_tree(&self.template, &root);
        root
    }

    /// The store after whatever happened to it: opens, verifies, lists only whole snapshots it
    /// may list (all it must), and each restores to its image; a prune then leaves it verifying.
    fn check(&self, root: &Path, what: &str) -> BTreeSet<String> {
        // Opening finishes or rolls back an interrupted restore.
        let m = open(root, os());
        let agent = SampleAgent::open(&root.join("agent"));
        common::assert_no_restore_leftovers(&agent);
        common::assert_databases_intact(&agent);
        let journals: Vec<_> = walkdir::WalkDir::new(root.join("store/journal"))
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().to_path_buf())
            .collect();
        assert!(journals.is_empty(), "{what}: journals left: {journals:?}");
        let report = m.verify(None, None, true).expect("verify runs");
        assert!(report.ok(), "{what}: verify --read-data: {report:?}");
        let listed = labels(&m);
        for l in &self.must {
            assert!(
                listed.contains_key(l),
                "{what}: snapshot {l:?} lost: {listed:?}"
            );
        }
        for (label, id) in &listed {
            let image = self
                .images
                .get(label)
                .unwrap_or_else(|| panic!("{what}: unexpected snapshot {label:?}"));
            assert_same_tree(
                image,
                &restored_image(&m, id, root),
                &format!("{what}: snapshot {label:?}"),
            );
        }
        if let Some((old, new)) = &self.live {
            let now = live_image(root);
            if &now != old && &now != new {
                let differs = |o: &LiveImage| {
                    let mut d = Vec::new();
                    if o.memdir != now.memdir {
                        d.push("memdir");
                    }
                    if o.state != now.state {
                        d.push("state");
                    }
                    if o.rows != now.rows {
                        d.push("rows");
                    }
                    if o.head != now.head {
                        d.push("git HEAD");
                    }
                    d.join(", ")
                };
                if old.memdir != now.memdir {
                    assert_same_tree(&new.memdir, &now.memdir, &format!("{what}: memdir"));
                }
                panic!(
                    "{what}: the live agent is neither the old one (differs in {}) nor the \
                     restored one (differs in {})",
                    differs(old),
                    differs(new)
                );
            }
        }
        m.prune(&PruneRequest::default())
            .unwrap_or_else(|e| panic!("{what}: prune after: {e}"));
        let report = m.verify(None, None, true).expect("verify runs");
        assert!(report.ok(), "{what}: verify after prune: {report:?}");
        listed.into_keys().collect()
    }

    /// An export's bundle is whole (it passes verify-bundle) or absent; after a failure that
    /// was no crash, neither it nor a temporary file is left in its folder.
    fn check_bundle(&self, root: &Path, what: &str, failed_cleanly: bool) {
        let Some(rel) = self.bundle else { return };
        let bundle = root.join(rel);
        if bundle.exists() {
            assert!(!failed_cleanly, "{what}: failed, yet the bundle is there");
            let report = memsnap::verify_bundle(&bundle, None)
                .unwrap_or_else(|e| panic!("{what}: verify-bundle: {e}"));
            assert!(report.ok(), "{what}: verify-bundle: {report:?}");
        }
        if failed_cleanly {
            let dir = bundle.parent().expect("a folder");
            let left: Vec<_> = std::fs::read_dir(dir)
                .expect("the bundle's folder")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert!(
                left.is_empty(),
                "{what}: left in the bundle's folder: {left:?}"
            );
        }
    }

    fn run(&self, scratch: &Path) -> Tally {
        // A clean run: how many sync points and operations there are to walk.
        let root = self.fresh(scratch, 0);
        let fs = CrashFs::new();
        let m = open(&root, fs.clone());
        fs.reset().expect("reset");
        (self.op)(&m, &root).unwrap_or_else(|e| panic!("{}: clean run: {e}", self.name));
        let (syncs, ops) = (fs.syncs(), fs.ops());
        drop(m);
        *self.after.borrow_mut() = self.check(&root, &format!("{}: clean run", self.name));
        self.check_bundle(&root, &format!("{}: clean run", self.name), false);
        if let Some(rel) = self.bundle {
            assert!(
                root.join(rel).exists(),
                "{}: clean run wrote no bundle",
                self.name
            );
        }
        std::fs::remove_dir_all(&root).expect("clean up");
        assert!(syncs > 0, "{}: the operation syncs nothing", self.name);
        eprintln!("{}: {syncs} sync points, {ops} operations", self.name);

        let mut tally = Tally {
            crashes: 0,
            faults: 0,
            failed: 0,
            visible: 0,
        };
        for n in 1..=syncs {
            let root = self.fresh(scratch, n);
            let fs = CrashFs::new();
            let m = open(&root, fs.clone());
            fs.reset().expect("reset");
            fs.crash_at_sync(n);
            let result = (self.op)(&m, &root);
            drop(m);
            let log = fs.op_log();
            let tail = log[log.len().saturating_sub(6)..].join("\n    ");
            let what = format!(
                "{}: crash at sync {n}/{syncs}, after\n    {tail}\n",
                self.name
            );
            assert!(
                fs.is_crashed() || result.is_ok(),
                "{what}: failed without a crash: {result:?}"
            );
            fs.restore_durable().expect("back to the durable state");
            self.check(&root, &what);
            self.check_bundle(&root, &what, false);
            std::fs::remove_dir_all(&root).expect("clean up");
            tally.crashes += 1;
        }

        let step = if full() { 1 } else { 7 };
        let packs_before = pack_files(&self.template);
        for n in (1..=ops).step_by(step) {
            let root = self.fresh(scratch, n);
            let fs = CrashFs::new();
            let m = open(&root, fs.clone());
            fs.reset().expect("reset");
            let fault = if n % 2 == 0 {
                Fault::NoSpace
            } else {
                Fault::Denied
            };
            fs.fail_op(n, fault);
            let result = (self.op)(&m, &root);
            let log = fs.op_log();
            let faulted = log
                .iter()
                .find(|l| l.contains("=> fault"))
                .cloned()
                .unwrap_or_default();
            drop(m);
            let what = format!(
                "{}: {fault:?} at operation {n}/{ops} ({faulted})",
                self.name
            );
            tally.faults += 1;
            match result {
                Ok(()) => {
                    // Only redb's bookkeeping when a session closes (its allocator state and
                    // header) may fail unseen: redb ignores it, and the next open repairs. So
                    // may the open behind a read-ahead hint of `index.redb` (only a hint), and
                    // the removal of a finished operation's scratch folder in the store's
                    // `tmp/`: the next one of its kind sweeps it. (A run may do fewer
                    // operations than the counting run, so the fault may not have fired.)
                    let scratch_removal =
                        faulted.contains(" remove_dir_all ") && faulted.contains("/store/tmp/");
                    assert!(
                        faulted.is_empty() || faulted.contains("index.redb") || scratch_removal,
                        "{what}: the operation succeeded, the failure was swallowed"
                    );
                    self.check(&root, &what);
                    self.check_bundle(&root, &what, false);
                }
                Err(e) => {
                    tally.failed += 1;
                    let msg = e.to_string();
                    let cause = match fault {
                        Fault::NoSpace => "No space left on device",
                        Fault::Denied => "Permission denied",
                    };
                    assert!(
                        msg.contains(cause) && msg.contains(&*root.to_string_lossy()),
                        "{what}: the error names neither the cause nor the path: {msg}"
                    );
                    let left = store_leftovers(&root);
                    assert!(left.is_empty(), "{what}: left behind {left:?}");
                    self.check_bundle(&root, &what, true);
                    // A failed sync of the index after its commit record was written leaves
                    // the commit visible (and perhaps durable): the one case where a failed
                    // operation may have happened, its packs rightly kept. Anywhere else,
                    // nothing changed.
                    let m = open(&root, os());
                    let listed: BTreeSet<String> = labels(&m).into_keys().collect();
                    let committed = faulted.contains(" sync ")
                        && faulted.contains("index.redb")
                        && listed == *self.after.borrow();
                    // No pack file that the index does not name, unless the failure was a
                    // removal of a pack (prune deleting old packs after its commit), or a
                    // commit visible but not proven durable (prune keeps the packs it replaced:
                    // after a crash the old index may name them again; a later prune frees them).
                    let orphans = orphans(&m);
                    drop(m);
                    assert!(
                        orphans == 0
                            || (faulted.contains("remove_file") && faulted.contains("/packs/"))
                            || (committed && self.name == "prune"),
                        "{what}: {orphans} pack files left that the index does not name"
                    );
                    tally.visible += u64::from(committed);
                    if committed && matches!(self.name, "snapshot" | "import") {
                        assert!(
                            msg.contains("may be gone after a crash"),
                            "{what}: a commit that failed to sync says so: {msg}"
                        );
                    }
                    if self.live.is_none() && !committed {
                        assert_eq!(listed, self.before, "{what}: the snapshots changed");
                        if self.name != "prune" {
                            let packs = pack_files(&root);
                            let new: Vec<_> = packs.difference(&packs_before).collect();
                            assert!(new.is_empty(), "{what}: new pack files left: {new:?}");
                        }
                    }
                    self.check(&root, &what);
                }
            }
            std::fs::remove_dir_all(&root).expect("clean up");
        }
        eprintln!(
            "{}: {} crashes walked, {} faults injected ({} failed cleanly, {} of them after \
             a visible commit)",
            self.name, tally.crashes, tally.faults, tally.failed, tally.visible
        );
        tally
    }
}

/// Puts `two.tar.zst` in `template`: a bundle of snapshot "two", taken in a throwaway copy.
fn bundle_of_two(b: &Base, template: &Path) {
    let probe = b.dir.join("probe");
    copy_tree(template, &probe);
    let m = open(&probe, os());
    let two = snapshot(&m, &probe, "two").expect("two");
    m.export(&ExportRequest::new(two.id, template.join("two.tar.zst")))
        .expect("export");
    drop(m);
    std::fs::remove_dir_all(&probe).expect("clean up");
}

/// Takes snapshot "two" in `template`, then forgets "one": what prune has to work on.
fn two_only(template: &Path) {
    let m = open(template, os());
    snapshot(&m, template, "two").expect("two");
    m.forget(&ForgetRequest::new(RetentionPolicy::default().keep_last(1)))
        .expect("forget");
}

/// `template/` with a tiny agent and a store holding snapshot "one"; the agent has changed
/// since (an append day). Returns the images of "one" and of the changed agent ("two", taken
/// in a throwaway copy).
struct Base {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    one: Tree,
    two: Tree,
}

fn base() -> Base {
    knobs();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    let template = dir.join("template");
    let agent = SampleAgent::create(&template.join("agent"), &SampleSpec::tiny()).expect("agent");
    let m = Memsnap::create(template.join("store"), StoreOptions::default()).expect("store");
    let one = snapshot(&m, &template, "one").expect("snapshot one");
    agent.append_day(1, 0.2).expect("append day");
    let one = restored_image(&m, &one.id, &dir);
    let probe = dir.join("probe");
    copy_tree(&template, &probe);
    let m2 = open(&probe, os());
    let two = snapshot(&m2, &probe, "two").expect("snapshot two");
    let two = restored_image(&m2, &two.id, &dir);
    std::fs::remove_dir_all(&probe).expect("clean up");
    Base {
        _tmp: tmp,
        dir,
        one,
        two,
    }
}

fn images(b: &Base, labels: &[&str]) -> BTreeMap<String, Tree> {
    labels
        .iter()
        .map(|l| {
            let t = match *l {
                "one" => b.one.clone(),
                _ => b.two.clone(),
            };
            (l.to_string(), t)
        })
        .collect()
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

#[test]
fn snapshot_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let walk = Walk {
        name: "snapshot",
        template: b.dir.join("template"),
        images: images(&b, &["one", "two"]),
        must: set(&["one"]),
        after: Default::default(),
        before: set(&["one"]),
        live: None,
        bundle: None,
        op: Box::new(|m, root| snapshot(m, root, "two").map(|_| ())),
    };
    walk.run(&b.dir);
}

#[test]
fn restore_in_place_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let template = b.dir.join("template");
    // The live agent before, and as snapshot "one" restored in place.
    let old = live_image(&template);
    let probe = b.dir.join("probe");
    copy_tree(&template, &probe);
    let id = labels(&open(&template, os()))
        .remove("one")
        .expect("one is listed");
    let restore_one = move |m: &Memsnap, root: &Path| -> memsnap::Result<()> {
        m.restore(
            &RestoreRequest::new(id.clone())
                .agent(agent_id())
                .sources(SourceSpec::from_root(root.join("agent")))
                .pre_snapshot(false),
        )
        .map(|_| ())
    };
    restore_one(&open(&probe, os()), &probe).expect("restore one");
    let new = live_image(&probe);
    assert_ne!(old, new, "the agent changed since snapshot one");
    let walk = Walk {
        name: "restore",
        template,
        images: images(&b, &["one"]),
        must: set(&["one"]),
        after: Default::default(),
        before: set(&["one"]),
        live: Some((old, new)),
        bundle: None,
        op: Box::new(restore_one),
    };
    walk.run(&b.dir);
}

#[test]
fn import_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let template = b.dir.join("template");
    bundle_of_two(&b, &template);
    let walk = Walk {
        name: "import",
        template,
        images: images(&b, &["one", "two"]),
        must: set(&["one"]),
        after: Default::default(),
        before: set(&["one"]),
        live: None,
        bundle: None,
        op: Box::new(|m, root| {
            m.import(&ImportRequest::new(root.join("two.tar.zst")))
                .map(|_| ())
        }),
    };
    walk.run(&b.dir);
}

/// Export only reads the store; what it writes is the bundle and its `.sha256`, through the
/// same storage, so their writes, syncs and renames are walked too.
#[test]
fn export_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let template = b.dir.join("template");
    std::fs::create_dir(template.join("out")).expect("out");
    let walk = Walk {
        name: "export",
        template,
        images: images(&b, &["one"]),
        must: set(&["one"]),
        after: Default::default(),
        before: set(&["one"]),
        live: None,
        bundle: Some("out/one.tar.zst"),
        op: Box::new(|m, root| {
            let req = ExportRequest::new("latest", root.join("out/one.tar.zst")).agent(agent_id());
            m.export(&req).map(|_| ())
        }),
    };
    walk.run(&b.dir);
}

/// `template/` holds "one" and "two"; forget keeps the last.
#[test]
fn forget_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let template = b.dir.join("template");
    snapshot(&open(&template, os()), &template, "two").expect("two");
    let walk = Walk {
        name: "forget",
        template,
        images: images(&b, &["one", "two"]),
        must: set(&["two"]),
        after: Default::default(),
        before: set(&["one", "two"]),
        live: None,
        bundle: None,
        op: Box::new(|m, _| {
            m.forget(&ForgetRequest::new(RetentionPolicy::default().keep_last(1)))
                .map(|_| ())
        }),
    };
    walk.run(&b.dir);
}

/// `template/` holds "two" only ("one" forgotten): prune deletes packs and rewrites the ones
/// "two" shares with "one".
#[test]
fn prune_survives_a_crash_at_every_sync_and_a_fault_at_every_operation() {
    let b = base();
    let template = b.dir.join("template");
    two_only(&template);
    let walk = Walk {
        name: "prune",
        template,
        images: images(&b, &["two"]),
        must: set(&["two"]),
        after: Default::default(),
        before: set(&["two"]),
        live: None,
        bundle: None,
        op: Box::new(|m, _| {
            m.prune(&PruneRequest::default().max_unused_percent(0.0))
                .map(|report| {
                    assert!(
                        report.packs_rewritten + report.packs_deleted > 0,
                        "{report:?}"
                    );
                })
        }),
    };
    walk.run(&b.dir);
}

/// Runs `op` on a copy of `template` once per sync of `index.redb` that a clean run makes, the
/// k-th of them failing with ENOSPC (matched by place, not by count), and hands each result to
/// `check` with the store reopened on the plain file system (and verified first); `check` says
/// whether the operation's commit is visible. Exactly one failing sync (the one after the commit
/// record) must leave the commit visible.
fn walk_index_syncs(
    dir: &Path,
    template: &Path,
    op: impl Fn(&Memsnap, &Path) -> memsnap::Result<()>,
    mut check: impl FnMut(memsnap::Result<()>, &Memsnap, &Path) -> bool,
) {
    let is_index_sync = |what: &str| what.starts_with("sync ") && what.ends_with("index.redb");
    let count = {
        let root = dir.join("count");
        copy_tree(template, &root);
        let fs = CrashFs::new();
        let m = open(&root, fs.clone());
        fs.reset().expect("reset");
        op(&m, &root).expect("clean run");
        drop(m);
        std::fs::remove_dir_all(&root).expect("clean up");
        fs.op_log()
            .iter()
            .filter_map(|l| l.split_once(' ').map(|(_, what)| what.to_owned()))
            .filter(|what| is_index_sync(what))
            .count() as u64
    };
    assert!(count > 0, "the operation syncs its index");
    let mut visible = 0;
    for k in 1..=count {
        let root = dir.join(format!("sync-{k}"));
        copy_tree(template, &root);
        let fs = CrashFs::new();
        let m = open(&root, fs.clone());
        fs.reset().expect("reset");
        fs.fail_matching(k, Fault::NoSpace, is_index_sync);
        let result = op(&m, &root);
        drop(m);
        let m = open(&root, os());
        assert!(m.verify(None, None, true).expect("verify").ok(), "sync {k}");
        visible += u32::from(check(result, &m, &root));
        drop(m);
        std::fs::remove_dir_all(&root).expect("clean up");
    }
    assert_eq!(
        visible, 1,
        "exactly one index sync follows the commit record"
    );
}

/// Pack files that the index of the store `m` does not name.
fn orphans(m: &Memsnap) -> u64 {
    m.prune(&PruneRequest::default().dry_run(true))
        .expect("prune --dry-run")
        .packs_orphaned
}

/// The check, for [`walk_index_syncs`], of an operation that commits snapshot "two" as a
/// snapshot does (a snapshot, an import). The sync that follows the commit record leaves "two"
/// listed and whole, and says that it may be gone after a crash; any other leaves the store as
/// it was: "one" alone, and no pack file the index does not name.
fn two_committed_or_nothing(b: &Base) -> impl FnMut(memsnap::Result<()>, &Memsnap, &Path) -> bool {
    move |result, m, root| {
        let listed = labels(m);
        match result {
            Err(e) if e.to_string().contains("may be gone after a crash") => {
                let id = listed.get("two").expect("two is listed");
                assert_same_tree(&b.two, &restored_image(m, id, root), "two");
                true
            }
            Err(e) => {
                assert!(e.to_string().contains("No space left on device"), "{e}");
                assert_eq!(listed.into_keys().collect::<Vec<_>>(), ["one"], "{e}");
                assert_eq!(orphans(m), 0, "{e}: pack files left behind");
                false
            }
            // A sync when an index session closes: redb ignores its failure.
            Ok(()) => false,
        }
    }
}

/// The one failure after which a snapshot may be visible, made deterministic: each sync of
/// `index.redb` in turn fails ([`two_committed_or_nothing`]); exactly one follows the commit
/// record.
#[test]
fn a_snapshot_whose_index_sync_fails_after_the_commit_record_says_so() {
    let b = base();
    walk_index_syncs(
        &b.dir,
        &b.dir.join("template"),
        |m, root| snapshot(m, root, "two").map(|_| ()),
        two_committed_or_nothing(&b),
    );
}

/// The same for an import, which commits through the snapshot's code.
#[test]
fn an_import_whose_index_sync_fails_after_the_commit_record_says_so() {
    let b = base();
    let template = b.dir.join("template");
    bundle_of_two(&b, &template);
    walk_index_syncs(
        &b.dir,
        &template,
        |m, root| {
            m.import(&ImportRequest::new(root.join("two.tar.zst")))
                .map(|_| ())
        },
        two_committed_or_nothing(&b),
    );
}

/// Prune's switch commit, each index sync failing in turn: before the commit record, the store
/// is as it was (same pack files); after it, the switch is visible and the packs it replaced
/// are kept (an older index may name them again after a crash) for the next prune to free.
/// "two" restores exactly either way, and a prune run again leaves a store that verifies.
#[test]
fn a_prune_whose_index_sync_fails_keeps_every_pack_an_index_may_name() {
    let b = base();
    let template = b.dir.join("template");
    two_only(&template);
    let packs_before = pack_files(&template);
    walk_index_syncs(
        &b.dir,
        &template,
        |m, _| {
            m.prune(&PruneRequest::default().max_unused_percent(0.0))
                .map(|_| ())
        },
        |result, m, root| {
            let id = labels(m).remove("two").expect("two is listed");
            assert_same_tree(&b.two, &restored_image(m, &id, root), "snapshot two");
            let mut visible = false;
            if let Err(e) = &result {
                assert!(e.to_string().contains("No space left on device"), "{e}");
                let kept = pack_files(root);
                visible = orphans(m) > 0;
                if visible {
                    assert!(
                        kept.is_superset(&packs_before),
                        "{e}: a replaced pack was deleted"
                    );
                } else {
                    assert_eq!(
                        kept, packs_before,
                        "{e}: the failed prune changed the packs"
                    );
                }
            }
            m.prune(&PruneRequest::default().max_unused_percent(0.0))
                .expect("prune again");
            assert_eq!(orphans(m), 0, "the second prune freed what the first left");
            visible
        },
    );
}

/// A failing read of this machine is never taken for damage in the store: a pack read that
/// fails (EACCES), wherever it falls (a manifest, a tree node or a leaf in pass 1, a data chunk
/// in pass 2, a footer), stops verify with an error naming its cause.
#[test]
fn a_failing_pack_read_stops_verify_instead_of_reporting_damage() {
    let b = base();
    let root = b.dir.join("template");
    let is_pack_read = |what: &str| what.starts_with("read @") && what.ends_with(".pack");
    let reads = {
        let fs = CrashFs::new();
        let m = open(&root, fs.clone());
        fs.reset().expect("reset");
        assert!(m.verify(None, None, true).expect("clean verify").ok());
        fs.op_log()
            .iter()
            .filter_map(|l| l.split_once(' ').map(|(_, what)| what.to_owned()))
            .filter(|what| is_pack_read(what))
            .count() as u64
    };
    assert!(reads > 20, "{reads} pack reads");
    // Every one of the first reads (manifests and tree nodes come first), then a spread.
    let ks: BTreeSet<u64> = (1..=20)
        .chain((1..=reads).step_by((reads / 40).max(1) as usize))
        .collect();
    let mut stopped = 0;
    for k in ks {
        let fs = CrashFs::new();
        let m = open(&root, fs.clone());
        fs.reset().expect("reset");
        fs.fail_matching(k, Fault::Denied, is_pack_read);
        let result = m.verify(None, None, true);
        let fired = fs.op_log().iter().any(|l| l.contains("=> fault"));
        match result {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("Permission denied") && msg.contains(".pack"),
                    "read {k}: {msg}"
                );
                stopped += 1;
            }
            Ok(r) => assert!(!fired && r.ok(), "read {k}: {r:?}"),
        }
    }
    assert!(stopped > 20, "{stopped} faults stopped verify");
}
