//! `CrashFs`: a [`Storage`] for tests that does every operation on the real file system and keeps
//! a model of what would survive a power loss, so that a test can "crash" at the N-th sync point
//! (or fail the N-th operation once) and then put the real disk back to exactly its durable
//! state with [`CrashFs::restore_durable`].
//!
//! Use from an integration test as `#[path = "support/crashfs.rs"] mod crashfs;`.
//!
//! # The model
//! - Inodes: directories, files and symbolic links. A directory holds its *current* entries
//!   (name → inode, mirroring the real directory) and its *durable* entries (those a crash
//!   keeps). A file holds its *durable* bytes. So a renamed directory carries its children
//!   along, in both namespaces, as on a real file system.
//! - The model is filled lazily: the first time an operation walks through a name it has not
//!   seen, it looks at the real disk, and whatever existed before `CrashFs` first looked is taken
//!   as durable. A file's bytes are read only when needed (before the first write, resize,
//!   removal or replacement through `CrashFs`); until then its durable bytes are its real ones.
//! - Names created, renamed or removed become durable only with `sync_dir` of their directory
//!   (each of the two directories of a rename, separately) or `sync_filesystem`. File bytes
//!   become durable only with `StorageFile::sync` (through any handle of that inode) or
//!   `sync_filesystem`. `CrashFs` never calls `fsync` itself: durability is the model's.
//! - Paths are taken as given (a relative one is joined to the current directory); symbolic
//!   links in the middle of a path are followed in the model the way the kernel does; the last
//!   component is not followed, except by `open` and `sync_dir`, which follow it like the OS.
//! - One file system: `sync_filesystem(p)` makes everything the model knows durable, whatever `p`.
//!
//! # Counters, crash and faults
//! Every trait call is one *operation* (except `start_writeback`, a no-op that cannot fail);
//! every `StorageFile::sync`, `sync_dir` and `sync_filesystem` is also one *sync point*. Order
//! of the checks in each call: dead? → count the op → injected fault? → (sync points) count the
//! sync → crash here? → look up the paths → real operation → update the model. The model's
//! mutex is held across all of it, so concurrent callers see one consistent order.
//! - [`CrashFs::crash_at_sync`]`(n)`: the n-th sync point (1-based) has no effect, fails, and the
//!   storage is dead: every later call fails too (opens, reads, calls on open handles).
//! - [`CrashFs::fail_op`]`(n, fault)`: the n-th operation fails once with ENOSPC or EACCES,
//!   without any effect; the storage keeps working. A faulted sync is not counted as a sync
//!   point. Calls made while dead are not counted at all.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use memsnap::{OpenMode, Storage, StorageFile};

/// The message of the error every call returns once the storage has crashed.
pub const CRASH_MESSAGE: &str = "crashfs: simulated crash";

/// Whether `e` (or what it wraps, by its text) is the simulated crash.
pub fn is_crash_error(e: &io::Error) -> bool {
    e.to_string().contains(CRASH_MESSAGE)
}

fn crashed() -> io::Error {
    io::Error::other(CRASH_MESSAGE)
}

/// An error injected by [`CrashFs::fail_op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ENOSPC`: no space left on device.
    NoSpace,
    /// `EACCES`: permission denied.
    Denied,
}

impl Fault {
    pub fn errno(self) -> i32 {
        match self {
            Fault::NoSpace => libc::ENOSPC,
            Fault::Denied => libc::EACCES,
        }
    }

    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(self.errno())
    }
}

type Ino = usize;

/// The root directory `/` is always inode 0.
const ROOT: Ino = 0;

#[derive(Debug)]
enum Node {
    Dir(DirNode),
    File(FileNode),
    Symlink(PathBuf),
}

#[derive(Debug, Default)]
struct DirNode {
    /// The entries the model knows, as they are on disk now.
    cur: BTreeMap<OsString, Ino>,
    /// The entries a crash would keep.
    dur: BTreeMap<OsString, Ino>,
    /// Names already looked up on disk (present or not). Every key of `cur` and `dur` is here.
    seen: BTreeSet<OsString>,
    /// The directory was on disk before `CrashFs` first looked, so names first found in it are
    /// durable. False for a directory made through `CrashFs` (or behind its back afterwards).
    preexisting: bool,
    /// Permission bits, put back by `restore_durable` on a directory it recreates.
    mode: u32,
}

#[derive(Debug)]
struct FileNode {
    /// The bytes a crash would keep. `None`: the real file's bytes, which nothing has changed
    /// through `CrashFs` since it was first seen. Invariant: `None` only while `!dirty` and while
    /// the inode still has a current name (bytes are captured before a write, a resize, a
    /// removal or a replacement).
    durable: Option<Vec<u8>>,
    /// Written or resized through `CrashFs` since `durable` was last set.
    dirty: bool,
    /// Permission bits.
    mode: u32,
}

/// Where a path leads in the model.
struct Loc {
    /// The directory holding the last component, and that component. `None` for `/` or a path
    /// ending in `..`.
    parent: Option<(Ino, OsString)>,
    /// The real path of that directory, without symbolic links.
    parent_path: PathBuf,
    /// The inode at the path, if there is one.
    ino: Option<Ino>,
}

impl Loc {
    fn real_path(&self) -> PathBuf {
        match &self.parent {
            Some((_, name)) => self.parent_path.join(name),
            None => self.parent_path.clone(),
        }
    }
}

type Matching = (Box<dyn Fn(&str) -> bool + Send>, u64, Fault);

struct State {
    /// Indexed by inode number; inodes are never freed within an epoch.
    nodes: Vec<Node>,
    /// Bumped by `restore_durable`; a handle from an older epoch is stale.
    epoch: u64,
    ops: u64,
    syncs: u64,
    crash_at: Option<u64>,
    dead: bool,
    /// Operation number → the fault it fails with.
    faults: BTreeMap<u64, Fault>,
    /// The operation that fails: the `.1`-th (1-based) one whose description matches `.0`.
    fault_matching: Option<Matching>,
    log: Vec<String>,
}

impl State {
    fn new(epoch: u64) -> Self {
        let root = DirNode {
            preexisting: true,
            mode: fs::symlink_metadata("/").map_or(0o755, |m| m.mode() & 0o7777),
            ..DirNode::default()
        };
        State {
            nodes: vec![Node::Dir(root)],
            epoch,
            ops: 0,
            syncs: 0,
            crash_at: None,
            dead: false,
            faults: BTreeMap::new(),
            fault_matching: None,
            log: Vec::new(),
        }
    }

    // ----- counters, faults, crash -----

    /// Starts one operation: fails if the storage is dead or a fault is due for it.
    fn begin(&mut self, what: String) -> io::Result<()> {
        if self.dead {
            return Err(crashed());
        }
        self.ops += 1;
        let n = self.ops;
        let mut fault = self.faults.remove(&n);
        if let Some((matches, left, f)) = &mut self.fault_matching
            && matches(&what)
        {
            *left -= 1;
            if *left == 0 {
                fault = Some(*f);
                self.fault_matching = None;
            }
        }
        self.log.push(match fault {
            Some(f) => format!("#{n} {what} => fault {f:?}"),
            None => format!("#{n} {what}"),
        });
        match fault {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    /// Starts one operation that is a sync point: also the place where the crash happens.
    fn begin_sync(&mut self, what: String) -> io::Result<()> {
        self.begin(what)?;
        self.syncs += 1;
        if self.crash_at == Some(self.syncs) {
            self.dead = true;
            if let Some(line) = self.log.last_mut() {
                line.push_str(" => CRASH");
            }
            return Err(crashed());
        }
        Ok(())
    }

    // ----- inodes -----

    fn add(&mut self, node: Node) -> Ino {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn dir_mut(&mut self, ino: Ino) -> &mut DirNode {
        match &mut self.nodes[ino] {
            Node::Dir(d) => d,
            other => panic!("crashfs: inode {ino} is not a directory: {other:?}"),
        }
    }

    /// Gives `name` in `dir` the current inode `ino` (replacing what it named).
    fn link(&mut self, dir: Ino, name: &OsStr, ino: Ino) {
        let d = self.dir_mut(dir);
        d.seen.insert(name.to_owned());
        d.cur.insert(name.to_owned(), ino);
    }

    fn unlink(&mut self, dir: Ino, name: &OsStr) {
        self.dir_mut(dir).cur.remove(name);
    }

    /// Keeps a file's durable bytes in the model before its real bytes change or go away:
    /// `read` yields its present real bytes.
    fn capture(&mut self, ino: Ino, read: impl FnOnce() -> io::Result<Vec<u8>>) -> io::Result<()> {
        if let Node::File(f) = &mut self.nodes[ino]
            && f.durable.is_none()
        {
            f.durable = Some(read()?);
        }
        Ok(())
    }

    /// The sync of one inode: a directory's entries, or a file's bytes (`read` yields them);
    /// and its permission bits as they are now (`mode`, when known: a `chmod` made outside the
    /// storage, as restore does, is durable from the next sync on).
    fn sync_inode(
        &mut self,
        ino: Ino,
        mode: Option<u32>,
        read: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        match &mut self.nodes[ino] {
            Node::Dir(d) => {
                d.dur = d.cur.clone();
                d.mode = mode.unwrap_or(d.mode);
            }
            Node::File(f) => {
                f.mode = mode.unwrap_or(f.mode);
                // Not dirty: the real bytes are the durable ones already.
                if f.dirty {
                    f.durable = Some(read()?);
                    f.dirty = false;
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ----- looking paths up -----

    /// The inode `name` names in directory `dir` (real path `dir_path`), looking on disk when
    /// the model has no current entry for it.
    fn lookup(&mut self, dir: Ino, dir_path: &Path, name: &OsStr) -> io::Result<Option<Ino>> {
        let Node::Dir(d) = &self.nodes[dir] else {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        };
        if let Some(&ino) = d.cur.get(name) {
            return Ok(Some(ino));
        }
        // First sight in a directory that predates us: what is there is durable. Anything else
        // found on disk appeared behind our back (after we looked): current only.
        let durable = d.preexisting && !d.seen.contains(name);
        let path = dir_path.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                self.dir_mut(dir).seen.insert(name.to_owned());
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mode = meta.mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink(fs::read_link(&path)?)
        } else if meta.is_dir() {
            Node::Dir(DirNode {
                preexisting: durable,
                mode,
                ..DirNode::default()
            })
        } else {
            Node::File(FileNode {
                durable: None,
                dirty: false,
                mode,
            })
        };
        let ino = self.add(node);
        self.link(dir, name, ino);
        if durable {
            self.dir_mut(dir).dur.insert(name.to_owned(), ino);
        }
        Ok(Some(ino))
    }

    /// Walks `path` in the model from `/`, following symbolic links except (unless
    /// `follow_last`) the last component.
    fn resolve(&mut self, path: &Path, follow_last: bool) -> io::Result<Loc> {
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()?.join(path)
        };
        // Components still to walk, the next one last.
        let mut todo = components(&path);
        todo.reverse();
        // The directories walked into below `/`, with their names.
        let mut walked: Vec<(Ino, OsString)> = Vec::new();
        let mut hops = 0;
        loop {
            let dir = walked.last().map_or(ROOT, |w| w.0);
            let dir_path = walked
                .iter()
                .fold(PathBuf::from("/"), |p, (_, name)| p.join(name));
            let Some(name) = todo.pop() else {
                return Ok(Loc {
                    parent: None,
                    parent_path: dir_path,
                    ino: Some(dir),
                });
            };
            if name == ".." {
                walked.pop();
                continue;
            }
            let last = todo.is_empty();
            let ino = match self.lookup(dir, &dir_path, &name)? {
                Some(ino) => ino,
                None if last => {
                    return Ok(Loc {
                        parent: Some((dir, name)),
                        parent_path: dir_path,
                        ino: None,
                    });
                }
                None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            };
            match &self.nodes[ino] {
                Node::Symlink(target) if !last || follow_last => {
                    hops += 1;
                    if hops > 40 {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    if target.is_absolute() {
                        walked.clear();
                    }
                    let mut more = components(target);
                    more.reverse();
                    todo.extend(more);
                }
                Node::Dir(_) if !last => walked.push((ino, name)),
                _ if !last => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                _ => {
                    return Ok(Loc {
                        parent: Some((dir, name)),
                        parent_path: dir_path,
                        ino: Some(ino),
                    });
                }
            }
        }
    }

    /// Looks up everything under directory `ino` (real path `path`) on disk, so that the model
    /// knows the whole tree before it moves (a crash may need it back where it was).
    fn learn_subtree(&mut self, ino: Ino, path: &Path) -> io::Result<()> {
        for entry in fs::read_dir(path)? {
            let name = entry?.file_name();
            if let Some(child) = self.lookup(ino, path, &name)?
                && matches!(self.nodes[child], Node::Dir(_))
            {
                self.learn_subtree(child, &path.join(&name))?;
            }
        }
        Ok(())
    }

    /// Every path the current (or durable) namespace reaches from `/`, parents before children
    /// (`Path`'s order is by components, so a subtree is contiguous and follows its root).
    fn tree(&self, durable: bool) -> BTreeMap<PathBuf, Ino> {
        let mut out = BTreeMap::new();
        let mut above = vec![ROOT];
        self.walk(ROOT, Path::new("/"), durable, &mut above, &mut out);
        out
    }

    fn walk(
        &self,
        dir: Ino,
        path: &Path,
        durable: bool,
        above: &mut Vec<Ino>,
        out: &mut BTreeMap<PathBuf, Ino>,
    ) {
        let Node::Dir(d) = &self.nodes[dir] else {
            return;
        };
        for (name, &ino) in if durable { &d.dur } else { &d.cur } {
            let p = path.join(name);
            out.insert(p.clone(), ino);
            // A durable namespace can, in theory, hold a directory inside itself (renames in
            // opposite directions, each synced on one side only): do not loop.
            if matches!(self.nodes[ino], Node::Dir(_)) && !above.contains(&ino) {
                above.push(ino);
                self.walk(ino, &p, durable, above, out);
                above.pop();
            }
        }
    }

    /// Everything current becomes durable: all entries, all file bytes.
    fn make_all_durable(&mut self) -> io::Result<()> {
        self.sync_inode(ROOT, None, || Ok(Vec::new()))?; // a directory: reads nothing
        for (path, ino) in self.tree(false) {
            let mode = fs::symlink_metadata(&path).ok().map(|m| m.mode() & 0o7777);
            self.sync_inode(ino, mode, || fs::read(&path))?;
        }
        Ok(())
    }

    // ----- restore -----

    /// Rewrites the real disk to the durable state, for every path the model knows.
    fn restore(&mut self) -> io::Result<()> {
        let durable = self.tree(true);
        let current = self.tree(false);

        // 1. What is on disk now and has no place in the durable state: current names that are
        //    not durable, and the directories whose durable inode is another one (with all under
        //    them). A file stays when the durable state has a file there: its bytes get fixed.
        let mut removals: Vec<&PathBuf> = Vec::new();
        let mut kept: BTreeSet<&PathBuf> = BTreeSet::new();
        for (p, &ci) in &current {
            if removals.last().is_some_and(|r| p.starts_with(r)) {
                continue;
            }
            let keep = match (
                &self.nodes[ci],
                durable.get(p).map(|&d| (d, &self.nodes[d])),
            ) {
                (Node::Dir(_), Some((d, Node::Dir(_)))) => d == ci,
                (Node::File(_), Some((_, Node::File(_)))) => true,
                (Node::Symlink(t), Some((_, Node::Symlink(u)))) => t == u,
                _ => false,
            };
            if keep {
                kept.insert(p);
            } else {
                removals.push(p);
            }
        }

        // 2. Before removing anything: read the bytes of every durable file that the model has
        //    not captured and that is not going to stay where it is (it is still somewhere on
        //    disk under a current name, by the invariant of `FileNode::durable`).
        let mut now_at: HashMap<Ino, &PathBuf> = HashMap::new();
        for (p, &ci) in &current {
            now_at.entry(ci).or_insert(p);
        }
        for (p, &di) in &durable {
            let in_place = kept.contains(p) && current.get(p) == Some(&di);
            if let Node::File(f) = &mut self.nodes[di]
                && f.durable.is_none()
                && !in_place
            {
                let from = now_at.get(&di).ok_or_else(|| {
                    io::Error::other(format!(
                        "crashfs: the durable bytes of {} are lost",
                        p.display()
                    ))
                })?;
                f.durable = Some(fs::read(from)?);
            }
        }

        // 3. Remove, each subtree whole (`removals` holds no path under another).
        for p in removals {
            remove_real(p)?;
        }

        // 4. Create what is missing, parents first; fix file bytes.
        for (p, &di) in &durable {
            match &self.nodes[di] {
                Node::Dir(_) => match fs::symlink_metadata(p) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_real(p)?;
                        fs::create_dir(p)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(p)?,
                    Err(e) => return Err(e),
                },
                // Not captured: still in place with its durable bytes (step 2).
                Node::File(FileNode { durable: None, .. }) => {}
                Node::File(FileNode {
                    durable: Some(bytes),
                    mode,
                    ..
                }) => write_if_different(p, bytes, *mode)?,
                Node::Symlink(target) => {
                    if fs::read_link(p).ok().as_ref() != Some(target) {
                        remove_real(p)?;
                        std::os::unix::fs::symlink(target, p)?;
                    }
                }
            }
        }

        // 5. Directory permission bits last, children first (a read-only directory could not
        //    have been filled).
        for (p, &di) in durable.iter().rev() {
            if let Node::Dir(d) = &self.nodes[di]
                && fs::symlink_metadata(p)?.mode() & 0o7777 != d.mode
            {
                fs::set_permissions(p, fs::Permissions::from_mode(d.mode))?;
            }
        }
        Ok(())
    }
}

/// The components of `path` to walk: names, and `..` as the name `..`.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Removes whatever is at `path` (a whole tree for a directory, not following links); nothing
/// there is fine.
fn remove_real(path: &Path) -> io::Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Makes `path` a file with exactly `bytes` and permission bits `mode`, leaving it untouched
/// (mtime included) when it already is.
fn write_if_different(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {
            if fs::read(path)? == bytes {
                if m.mode() & 0o7777 != mode {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
                }
                return Ok(());
            }
            fs::remove_file(path)?;
        }
        Ok(_) => remove_real(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// All of a file's bytes, read through its descriptor (which follows renames).
fn read_fd(file: &fs::File) -> io::Result<Vec<u8>> {
    let mut out = vec![0; file.metadata()?.len() as usize];
    let n = read_full_at(file, &mut out, 0)?;
    out.truncate(n);
    // It may have grown since the stat (another thread of the code under test).
    let mut buf = [0u8; 64 << 10];
    loop {
        match read_full_at(file, &mut buf, out.len() as u64)? {
            0 => return Ok(out),
            k => out.extend_from_slice(&buf[..k]),
        }
    }
}

/// Reads at `offset` until `buf` is full or the file ends.
fn read_full_at(file: &fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic elsewhere (a failed assertion in a test thread) must not hide the model.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A write-through storage with a durability model, crash and fault injection. Share it as
/// `Arc<CrashFs>` (it is `Arc<dyn Storage>` for the library).
pub struct CrashFs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for CrashFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("CrashFs")
            .field("ops", &st.ops)
            .field("syncs", &st.syncs)
            .field("crash_at", &st.crash_at)
            .field("dead", &st.dead)
            .field("inodes", &st.nodes.len())
            .finish()
    }
}

impl CrashFs {
    /// A storage that knows nothing yet: everything it first meets on disk counts as durable.
    pub fn new() -> Arc<Self> {
        Arc::new(CrashFs {
            state: Arc::new(Mutex::new(State::new(0))),
        })
    }

    /// The `n`-th sync point (1-based, counted since `new`, `reset` or `restore_durable`) does
    /// not take effect, and the storage is dead from it on. Replaces an earlier setting.
    pub fn crash_at_sync(&self, n: u64) {
        lock(&self.state).crash_at = Some(n);
    }

    /// Crashes now, between two operations: every later call fails.
    pub fn crash(&self) {
        lock(&self.state).dead = true;
    }

    /// Whether the storage has crashed.
    pub fn is_crashed(&self) -> bool {
        lock(&self.state).dead
    }

    /// The `n`-th operation (1-based, counted like [`CrashFs::ops`]) fails once with `fault`,
    /// without effect. Several can be armed at once.
    pub fn fail_op(&self, n: u64, fault: Fault) {
        lock(&self.state).faults.insert(n, fault);
    }

    /// The `k`-th operation (1-based) whose description (as in [`CrashFs::op_log`], without
    /// its number) satisfies `matches` fails once with `fault`: a fault at a place rather than
    /// at a count, which thread timing can shift.
    pub fn fail_matching(
        &self,
        k: u64,
        fault: Fault,
        matches: impl Fn(&str) -> bool + Send + 'static,
    ) {
        lock(&self.state).fault_matching = Some((Box::new(matches), k, fault));
    }

    /// Disarms the crash and the faults not yet fired.
    pub fn disarm(&self) {
        let mut st = lock(&self.state);
        st.crash_at = None;
        st.faults.clear();
        st.fault_matching = None;
    }

    /// Operations so far (since `new`, `reset` or `restore_durable`), the faulted ones and the
    /// crashing sync included; calls made while dead are not counted.
    pub fn ops(&self) -> u64 {
        lock(&self.state).ops
    }

    /// Sync points reached so far, the crashing one included (so after `crash_at_sync(n)` fires,
    /// `syncs() == n`). After a run without crash, crashing at each of `1..=syncs()` walks every
    /// sync point of that run.
    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// One line per operation, as `#N what path [=> fault X | => CRASH]`. Handle operations
    /// name the path the file was opened at.
    pub fn op_log(&self) -> Vec<String> {
        lock(&self.state).log.clone()
    }

    /// Everything on disk now counts as durable (as after `sync_filesystem`, without counting
    /// it); counters, log, crash and faults are cleared and the storage is alive. Open handles
    /// stay valid. For "setup done, now count from here".
    pub fn reset(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.make_all_durable()?;
        st.ops = 0;
        st.syncs = 0;
        st.crash_at = None;
        st.dead = false;
        st.faults.clear();
        st.fault_matching = None;
        st.log.clear();
        Ok(())
    }

    /// After a crash (or at any time): rewrites the real disk to exactly the durable state of
    /// every path the model knows. Names that are not durable go (directories whole), durable
    /// names that are missing come back (parents first), files get their durable bytes and
    /// permission bits (a file already right is left untouched). Paths the model never saw are
    /// left alone. Then the model starts afresh, as from [`CrashFs::new`]: counters zero, alive,
    /// no crash or fault armed; handles opened before are stale and fail (the crashed process
    /// is gone), so the same `CrashFs` serves the next step.
    pub fn restore_durable(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.restore()?;
        let epoch = st.epoch + 1;
        *st = State::new(epoch);
        Ok(())
    }

    /// Shared by the name operations: dead/fault checks, then the model's view of `path`.
    fn start(
        &self,
        what: String,
        path: &Path,
        follow_last: bool,
    ) -> io::Result<(MutexGuard<'_, State>, Loc)> {
        let mut st = lock(&self.state);
        st.begin(what)?;
        let loc = st.resolve(path, follow_last)?;
        Ok((st, loc))
    }
}

fn mode_name(mode: OpenMode) -> String {
    match mode {
        OpenMode::Read => "read".into(),
        OpenMode::ReadWrite => "rw".into(),
        OpenMode::CreateNew { mode } => format!("create-new {mode:o}"),
        OpenMode::OpenOrCreate { mode } => format!("open-or-create {mode:o}"),
        other => format!("{other:?}"),
    }
}

/// Opens like `OsStorage` does; also tells whether the file was created, and with which bits.
fn open_real(path: &Path, mode: OpenMode) -> io::Result<(fs::File, Option<u32>)> {
    let create = |bits: u32| -> io::Result<fs::File> {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(bits)
            .open(path)?;
        Ok(f)
    };
    // Created with `mode` less the umask, as `OsStorage` (and open(2)) does: the bits it got.
    let bits_of = |f: &fs::File| f.metadata().map(|m| m.mode() & 0o7777);
    let existing = |write: bool| fs::OpenOptions::new().read(true).write(write).open(path);
    Ok(match mode {
        OpenMode::Read => (existing(false)?, None),
        OpenMode::ReadWrite => (existing(true)?, None),
        OpenMode::CreateNew { mode } => {
            let f = create(mode)?;
            let bits = bits_of(&f)?;
            (f, Some(bits))
        }
        OpenMode::OpenOrCreate { mode } => match create(mode) {
            Ok(f) => {
                let bits = bits_of(&f)?;
                (f, Some(bits))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (existing(true)?, None),
            Err(e) => return Err(e),
        },
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("crashfs: open mode {other:?}"),
            ));
        }
    })
}

impl Storage for CrashFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let what = format!("open({}) {}", mode_name(mode), path.display());
        let (mut st, loc) = self.start(what, path, true)?;
        let (file, created) = open_real(path, mode)?;
        let ino = match (created, loc.ino, &loc.parent) {
            // New file: a current name only; its durable bytes are none until it is synced.
            (Some(bits), _, Some((dir, name))) => {
                let ino = st.add(Node::File(FileNode {
                    durable: Some(Vec::new()),
                    dirty: false,
                    mode: bits,
                }));
                st.link(*dir, name, ino);
                ino
            }
            (None, Some(ino), _) => ino,
            // Opened a file that appeared behind our back after we looked: current only.
            (_, _, Some((dir, name))) => {
                let mode = file.metadata()?.mode() & 0o7777;
                let ino = st.add(Node::File(FileNode {
                    durable: None,
                    dirty: false,
                    mode,
                }));
                st.link(*dir, name, ino);
                ino
            }
            // Only `/` or a path ending in `..` has no parent: a directory, never created here.
            (_, _, None) => unreachable!("crashfs: created a file at a path without parent"),
        };
        Ok(Box::new(CrashFile {
            state: Arc::clone(&self.state),
            epoch: st.epoch,
            file,
            ino,
            path: path.to_path_buf(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let what = format!("rename {} -> {}", from.display(), to.display());
        let (mut st, src) = self.start(what, from, false)?;
        let dst = st.resolve(to, false)?;
        let same = src.ino.is_some() && src.ino == dst.ino;
        if let (Some(si), false) = (src.ino, same) {
            // A moving directory takes its whole tree along: know all of it first, so that a
            // crash can bring it back where it was durable.
            if matches!(st.nodes[si], Node::Dir(_)) {
                st.learn_subtree(si, &src.real_path())?;
            }
            // The replaced file loses its name: keep its durable bytes.
            if let Some(di) = dst.ino {
                st.capture(di, || fs::read(dst.real_path()))?;
            }
        }
        fs::rename(from, to)?;
        if let (Some(si), Some((sd, sn)), Some((dd, dn)), false) =
            (src.ino, &src.parent, &dst.parent, same)
        {
            st.unlink(*sd, sn);
            st.link(*dd, dn, si);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let what = format!("remove_file {}", path.display());
        let (mut st, loc) = self.start(what, path, false)?;
        if let Some(ino) = loc.ino {
            st.capture(ino, || fs::read(loc.real_path()))?;
        }
        fs::remove_file(path)?;
        if let Some((dir, name)) = &loc.parent {
            st.unlink(*dir, name);
        }
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let what = format!("create_dir {}", path.display());
        let (mut st, loc) = self.start(what, path, false)?;
        fs::create_dir(path)?;
        if let Some((dir, name)) = &loc.parent {
            let mode = fs::symlink_metadata(path)?.mode() & 0o7777;
            let ino = st.add(Node::Dir(DirNode {
                preexisting: false,
                mode,
                ..DirNode::default()
            }));
            st.link(*dir, name, ino);
        }
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let what = format!("remove_dir {}", path.display());
        let (mut st, loc) = self.start(what, path, false)?;
        fs::remove_dir(path)?;
        if let Some((dir, name)) = &loc.parent {
            st.unlink(*dir, name);
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let what = format!("remove_dir_all {}", path.display());
        let (mut st, loc) = self.start(what, path, false)?;
        if let Some(ino) = loc.ino
            && matches!(st.nodes[ino], Node::Dir(_))
        {
            // The whole tree loses its names: know all of it, and keep the durable bytes of
            // its files, so that a crash before the parent is synced brings it back.
            let real = loc.real_path();
            st.learn_subtree(ino, &real)?;
            let mut below = BTreeMap::new();
            st.walk(ino, &real, false, &mut vec![ino], &mut below);
            for (p, i) in below {
                if matches!(st.nodes[i], Node::File(_)) {
                    st.capture(i, || fs::read(&p))?;
                }
            }
        }
        fs::remove_dir_all(path)?;
        if let Some((dir, name)) = &loc.parent {
            st.unlink(*dir, name);
        }
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        let what = format!("symlink {} -> {}", link.display(), target.display());
        let (mut st, loc) = self.start(what, link, false)?;
        std::os::unix::fs::symlink(target, link)?;
        if let Some((dir, name)) = &loc.parent {
            let ino = st.add(Node::Symlink(target.to_path_buf()));
            st.link(*dir, name, ino);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.begin_sync(format!("sync_dir {}", dir.display()))?;
        let loc = st.resolve(dir, true)?;
        // Fails as the OS would (missing, not permitted); no real fsync: the model is the disk.
        fs::File::open(dir)?;
        let ino = loc
            .ino
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let mode = fs::symlink_metadata(dir).ok().map(|m| m.mode() & 0o7777);
        st.sync_inode(ino, mode, || fs::read(loc.real_path()))
    }

    fn sync_filesystem(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.begin_sync(format!("sync_filesystem {}", path.display()))?;
        fs::File::open(path)?;
        st.make_all_durable()
    }
}

/// A file opened through [`CrashFs`]: the real descriptor, and the inode it is in the model.
struct CrashFile {
    state: Arc<Mutex<State>>,
    /// The `State::epoch` it was opened in.
    epoch: u64,
    file: fs::File,
    ino: Ino,
    /// Where it was opened (for the log only: the file may have been renamed since).
    path: PathBuf,
}

impl fmt::Debug for CrashFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashFile")
            .field("path", &self.path)
            .field("ino", &self.ino)
            .finish()
    }
}

impl CrashFile {
    /// Starts one operation on this handle (`sync` tells a sync point).
    fn begin(&self, what: &str, sync: bool) -> io::Result<MutexGuard<'_, State>> {
        let mut st = lock(&self.state);
        if st.dead {
            return Err(crashed());
        }
        if st.epoch != self.epoch {
            return Err(io::Error::other(format!(
                "crashfs: {} was opened before restore_durable (stale handle)",
                self.path.display()
            )));
        }
        let what = format!("{what} {}", self.path.display());
        if sync {
            st.begin_sync(what)?;
        } else {
            st.begin(what)?;
        }
        Ok(st)
    }

    /// Before the bytes change: keep the durable ones, and mark the file dirty.
    fn will_change(&self, st: &mut State) -> io::Result<()> {
        st.capture(self.ino, || read_fd(&self.file))?;
        if let Node::File(f) = &mut st.nodes[self.ino] {
            f.dirty = true;
        }
        Ok(())
    }
}

impl StorageFile for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let _st = self.begin(&format!("read @{offset}+{}", buf.len()), false)?;
        read_full_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.begin(&format!("write @{offset}+{}", buf.len()), false)?;
        self.will_change(&mut st)?;
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        let _st = self.begin("len", false)?;
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.begin(&format!("set_len {len}"), false)?;
        self.will_change(&mut st)?;
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.begin("sync", true)?;
        let mode = self.file.metadata().ok().map(|m| m.mode() & 0o7777);
        st.sync_inode(self.ino, mode, || read_fd(&self.file))
    }

    fn start_writeback(&self, _offset: u64, _len: u64) {}
}
