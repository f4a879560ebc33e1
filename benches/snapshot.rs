//! `cargo bench --bench snapshot [-- --quick | --sizes 256M,1G]`: builds a realistic agent
//! deterministically (memsnap::sample), then runs the snapshot steps of a day in an agent's life
//! through the `memsnap` binary and, when `restic` is on the PATH (`apt-get install restic`), the
//! same steps with restic, printing time, peak RSS and store growth side by side.
//! Then bundles: export, export --level 3 and `tar | zstd -3 -T0` (needs the zstd CLI) of the
//! same agent, verify-bundle, import into a fresh store and again.
//! Results are written down by hand in benches/RESULTS.md. Each size's folder is kept until the
//! run ends (see the restores for why): 256M and 1G need ~12 GB free, all three sizes ~55 GB.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use memsnap::sample::{SampleAgent, SampleSpec};

struct Step {
    name: &'static str,
    wall: f64,
    cpu: f64,
    rss_mib: f64,
    growth: u64,
}

/// Disk space used under `p` (allocated blocks, as `du`): redb extends its file sparsely, so
/// apparent lengths overstate what a commit stores.
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

/// Writes back everything dirty.
fn sync_all() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Runs a command and returns (wall s, user+sys s, max RSS MiB) of that child alone.
fn run(cmd: &mut Command) -> (f64, f64, f64) {
    // Each step starts with nothing dirty: otherwise the writeback of the step before (the other
    // tool's) lands in this one, and in whichever fsyncs (ext4 orders data before its journal
    // commit). restic never fsyncs, so its own writes are written back after it returns.
    sync_all();
    let t = Instant::now();
    // Reaped by wait4 below, which also gives this child's own rusage.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unwaited child; status and ru are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(rc, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    (t.elapsed().as_secs_f64(), cpu, ru.ru_maxrss as f64 / 1024.0)
}

/// The floor: read every file of the agent once and BLAKE3 it (what an ideal incremental
/// snapshot must at least do).
fn floor(agent: &Path) -> f64 {
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for e in walkdir(agent) {
        if let Ok(f) = std::fs::File::open(&e) {
            let _ = h.update_reader(f);
        }
    }
    std::hint::black_box(h.finalize());
    t.elapsed().as_secs_f64()
}

/// Writes `bytes` (rounded up to whole 4 KiB blocks) to `out`, opened with `O_DIRECT`, in 8 MiB
/// writes, and syncs it.
fn write_past_cache(mut out: &std::fs::File, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut buf = vec![0x5au8; (8 << 20) + 4096];
    let at = buf.as_ptr().align_offset(4096);
    let buf = &mut buf[at..at + (8 << 20)];
    let mut left = bytes.div_ceil(4096) * 4096;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.sync_data()
}

/// A restore's floor on this disk: every pack of `store` read past the page cache (four
/// readers, 1 MiB reads) while `bytes` are written past it (8 MiB writes) and synced, at once.
/// memsnap writes its packs past the cache, so its restore reads them from the disk, where
/// restic's reads the packs its backup left in the page cache. All packs are read, also the
/// chunks the restored snapshot does not use (~6% at 1 GiB after the days), so this overstates
/// the floor a little. `None` where the file system takes no `O_DIRECT`.
fn restore_floor(store: &Path, bytes: u64, scratch: &Path) -> Option<f64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let packs = walkdir(&store.join("packs"));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(scratch)
        .ok()?;
    let t = Instant::now();
    let ok = std::thread::scope(|s| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; (1 << 20) + 4096];
                    let at = buf.as_ptr().align_offset(4096);
                    let buf = &mut buf[at..at + (1 << 20)];
                    while let Some(p) =
                        packs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        let mut f = std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_DIRECT)
                            .open(p)?;
                        while f.read(buf)? > 0 {}
                    }
                    std::io::Result::Ok(())
                })
            })
            .collect();
        let written = write_past_cache(&out, bytes);
        readers
            .into_iter()
            .all(|r| r.join().is_ok_and(|r| r.is_ok()))
            && written.is_ok()
    });
    let took = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(scratch);
    ok.then_some(took)
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => out.extend(walkdir(&path)),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim().to_ascii_uppercase();
    let (num, mult) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (&s[..], 1),
    };
    num.parse::<u64>().expect("size like 256M or 1G") * mult
}

trait Tool {
    fn name(&self) -> &'static str;
    fn store(&self) -> &Path;
    fn snapshot(&self, agent: &Path) -> Command;
    fn restore(&self, target: &Path) -> Command;
    fn check(&self) -> Command;
}

struct Memsnap {
    store: PathBuf,
}

impl Tool for Memsnap {
    fn name(&self) -> &'static str {
        "memsnap"
    }
    fn store(&self) -> &Path {
        &self.store
    }
    fn snapshot(&self, agent: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
        c.args(["-q", "--store"]).arg(&self.store);
        c.args(["snapshot", "--tenant", "bench", "--agent", "a", "--source"])
            .arg(agent);
        c
    }
    fn restore(&self, target: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
        c.args(["-q", "--store"]).arg(&self.store);
        c.args([
            "restore", "latest", "--tenant", "bench", "--agent", "a", "--target",
        ])
        .arg(target);
        c
    }
    fn check(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
        c.args(["-q", "--store"]).arg(&self.store);
        c.args(["verify", "--read-data"]);
        c
    }
}

struct Restic {
    repo: PathBuf,
}

impl Restic {
    fn cmd(&self) -> Command {
        let mut c = Command::new("restic");
        c.arg("-r").arg(&self.repo).args(["-q", "--no-cache"]);
        c.env("RESTIC_PASSWORD", "bench");
        c
    }
}

impl Tool for Restic {
    fn name(&self) -> &'static str {
        "restic"
    }
    fn store(&self) -> &Path {
        &self.repo
    }
    fn snapshot(&self, agent: &Path) -> Command {
        let mut c = self.cmd();
        c.arg("backup").arg(agent);
        c
    }
    fn restore(&self, target: &Path) -> Command {
        let mut c = self.cmd();
        c.args(["restore", "latest", "--target"]).arg(target);
        c
    }
    fn check(&self) -> Command {
        let mut c = self.cmd();
        c.args(["check", "--read-data"]);
        c
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<u64> = if args.iter().any(|a| a == "--quick") {
        vec![32 << 20]
    } else if let Some(i) = args.iter().position(|a| a == "--sizes") {
        args.get(i + 1)
            .map(|s| s.split(',').map(parse_size).collect())
            .unwrap_or_default()
    } else {
        vec![256 << 20, 1 << 30]
    };
    let have_restic = Command::new("restic")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_restic {
        eprintln!("restic not found: install it (apt-get install restic) to compare side by side");
    }
    let base = std::env::var_os("MEMSNAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("memsnap-bench-{}", std::process::id()));
    for size in sizes {
        bench_size(&base, size, have_restic);
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn bench_size(base: &Path, size: u64, have_restic: bool) {
    let dir = base.join(format!("{}M", size >> 20));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let agent_dir = dir.join("agent");
    let t = Instant::now();
    let agent =
        SampleAgent::create(&agent_dir, &SampleSpec::with_total_bytes(size, 42)).expect("sample");
    let agent_bytes = du(&agent_dir);
    println!(
        "\n## agent of {} MiB ({} MiB on disk, built in {:.1} s)",
        size >> 20,
        agent_bytes >> 20,
        t.elapsed().as_secs_f64()
    );

    let mut tools: Vec<Box<dyn Tool>> = vec![Box::new(Memsnap {
        store: dir.join("memsnap-store"),
    })];
    if have_restic {
        let repo = dir.join("restic-repo");
        let r = Restic { repo };
        let mut init = r.cmd();
        init.arg("init");
        run(&mut init);
        tools.push(Box::new(r));
    }
    let mut results: Vec<Vec<Step>> = tools.iter().map(|_| Vec::new()).collect();
    let mut floors = Vec::new();
    type Change = Box<dyn Fn(&SampleAgent)>;
    let days: [(&str, Change); 5] = [
        ("first", Box::new(|_| {})),
        (
            "append day",
            Box::new(|a| a.append_day(1, 0.01).expect("append")),
        ),
        (
            "update day",
            Box::new(|a| a.update_day(2, 0.005).expect("update")),
        ),
        (
            "vacuum day",
            Box::new(|a| a.vacuum_vectors().expect("vacuum")),
        ),
        ("unchanged", Box::new(|_| {})),
    ];
    for (name, change) in &days {
        change(&agent);
        floors.push(floor(&agent_dir));
        for (tool, res) in tools.iter().zip(results.iter_mut()) {
            let before = du(tool.store());
            let (wall, cpu, rss) = run(&mut tool.snapshot(&agent_dir));
            res.push(Step {
                name,
                wall,
                cpu,
                rss_mib: rss,
                growth: du(tool.store()) - before,
            });
        }
    }
    // No file is removed before a run's last restore (the run's folder goes at its end: start
    // the next run at least 6 minutes later). On ext4 without a journal (this VM's root file
    // system) every file create steps over the free inodes of its group deleted in the last
    // 60 s, or 360 s once creates have dirtied their inode table block (`recently_deleted` in the
    // kernel's `find_inode_bit`), one buffer lookup each. A restore of the memdir's ~4,200 files
    // after the other tool's restore was removed took 2-5x as long, nearly all system time.
    // Written and removed before the restores: one file, so no create below pays for it.
    let restored_bytes: u64 = walkdir(&agent_dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    sync_all();
    floors.push(
        restore_floor(tools[0].store(), restored_bytes, &dir.join("restore-floor"))
            .unwrap_or(f64::NAN),
    );
    let targets: Vec<PathBuf> = tools
        .iter()
        .map(|tool| dir.join(format!("restore-{}", tool.name())))
        .collect();
    for ((tool, res), target) in tools.iter().zip(results.iter_mut()).zip(&targets) {
        let (wall, cpu, rss) = run(&mut tool.restore(target));
        res.push(Step {
            name: "restore",
            wall,
            cpu,
            rss_mib: rss,
            growth: 0,
        });
        let (wall, cpu, rss) = run(&mut tool.check());
        res.push(Step {
            name: "verify --read-data",
            wall,
            cpu,
            rss_mib: rss,
            growth: 0,
        });
    }
    // Only their databases, for the disk: a few inodes.
    for target in &targets {
        let _ = std::fs::remove_dir_all(target.join("sqlite"));
    }

    println!(
        "| step | floor s | memsnap s | cpu s | RSS MiB | growth | x floor |{}",
        if have_restic {
            " restic s | restic growth | time ratio | growth ratio |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if have_restic { "---|---|---|---|" } else { "" }
    );
    for (i, m) in results[0].iter().enumerate() {
        let fl = floors.get(i).copied().filter(|f| f.is_finite());
        let mut line = format!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {} | {} |",
            m.name,
            fl.map(|f| format!("{f:.2}")).unwrap_or_else(|| "-".into()),
            m.wall,
            m.cpu,
            m.rss_mib,
            human(m.growth),
            fl.map(|f| format!("{:.1}", m.wall / f))
                .unwrap_or_else(|| "-".into()),
        );
        if have_restic {
            let r = &results[1][i];
            line += &format!(
                " {:.2} | {} | {:.2} | {} |",
                r.wall,
                human(r.growth),
                m.wall / r.wall,
                if r.growth > 0 {
                    format!("{:.3}", m.growth as f64 / r.growth as f64)
                } else {
                    "-".into()
                }
            );
        }
        println!("{line}");
    }
    println!(
        "\nfloor: cat + BLAKE3 of the agent's files (snapshot steps); for restore, the store's \
         packs read and the agent's bytes written and synced past the page cache, at once"
    );
    bench_bundles(&dir, &agent_dir, &dir.join("memsnap-store"));
}

/// Export of the last snapshot (default framing and `--level 3`) against `tar | zstd -3 -T0` of
/// the same agent folder, then verify-bundle, an import into a fresh store and a re-import.
fn bench_bundles(dir: &Path, agent_dir: &Path, store: &Path) {
    let memsnap = |store: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
        c.args(["-q", "--store"]).arg(store);
        c
    };
    let framed = dir.join("framed.tar.zst");
    let whole = dir.join("whole.tar.zst");
    let reference = dir.join("reference.tar.zst");
    let fresh = dir.join("import-store");
    let mut rows: Vec<(&str, (f64, f64, f64), u64)> = Vec::new();
    let latest = ["latest", "--tenant", "bench", "--agent", "a", "--out"];
    let mut c = memsnap(store);
    c.arg("export").args(latest).arg(&framed);
    rows.push(("export", run(&mut c), du(&framed)));
    let mut c = memsnap(store);
    c.arg("export")
        .args(latest)
        .arg(&whole)
        .args(["--level", "3"]);
    rows.push(("export --level 3", run(&mut c), du(&whole)));
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "tar cf - -C '{}' . | zstd -3 -T0 -q -o '{}'",
        agent_dir.display(),
        reference.display()
    ));
    rows.push(("tar + zstd -3 -T0", run(&mut c), du(&reference)));
    let mut c = memsnap(store);
    c.arg("verify-bundle").arg(&framed);
    rows.push(("verify-bundle", run(&mut c), 0));
    let mut c = memsnap(&fresh);
    c.arg("import").arg(&framed);
    rows.push(("import (fresh store)", run(&mut c), du(&fresh)));
    let mut c = memsnap(&fresh);
    c.arg("import").arg(&framed);
    rows.push(("import again", run(&mut c), 0));
    println!("\n| bundle step | wall s | cpu s | RSS MiB | bytes |\n|---|---|---|---|---|");
    for (name, (wall, cpu, rss), bytes) in rows {
        println!(
            "| {name} | {wall:.2} | {cpu:.2} | {rss:.0} | {} |",
            if bytes > 0 { human(bytes) } else { "-".into() }
        );
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
