//! Argument parsing, output (human or `--json`), progress bars and exit codes.

mod demo;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use memsnap::{
    AgentId, ExportRequest, ForgetRequest, ImportRequest, Memsnap, PruneRequest, RepairRequest,
    RestoreRequest, RetentionPolicy, SnapshotRequest, SourceSpec, StoreOptions,
};

use output::Out;

#[derive(Parser)]
#[command(
    name = "memsnap",
    version,
    about = "Deduplicating point-in-time snapshots of an AI agent's memory"
)]
pub(crate) struct Cli {
    /// The store folder (default: $MEMSNAP_STORE, else ~/.local/share/memsnap).
    #[arg(long, global = true, env = "MEMSNAP_STORE")]
    store: Option<PathBuf>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Seconds to wait for an agent another process is working on.
    #[arg(long, global = true, default_value_t = 30.0)]
    lock_timeout: f64,
    /// Chunk locations restore, export and verify hold at once (~72 bytes each): less memory
    /// for more passes over the index.
    #[arg(long, global = true, env = "MEMSNAP_WINDOW_CHUNKS",
          default_value_t = StoreOptions::default().window_chunks as u64,
          value_parser = clap::value_parser!(u64).range(1..), value_name = "CHUNKS")]
    window_chunks: u64,
    /// Append one JSON line per lifecycle event (created, restored, deleted, ...) to FILE.
    #[arg(long, global = true, env = "MEMSNAP_EVENTS", value_name = "FILE")]
    events: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct AgentArgs {
    /// With --agent: the agent the snapshot must belong to.
    #[arg(long, requires = "agent")]
    tenant: Option<String>,
    #[arg(long, requires = "tenant")]
    agent: Option<String>,
}

impl AgentArgs {
    fn agent_id(&self) -> Result<Option<AgentId>, memsnap::Error> {
        match (&self.tenant, &self.agent) {
            (Some(t), Some(a)) => Ok(Some(AgentId::new(t, a)?)),
            _ => Ok(None),
        }
    }
}

#[derive(Args, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KeepArgs {
    #[arg(long)]
    keep_last: Option<u32>,
    #[arg(long)]
    keep_hourly: Option<u32>,
    #[arg(long)]
    keep_daily: Option<u32>,
    #[arg(long)]
    keep_weekly: Option<u32>,
    #[arg(long)]
    keep_monthly: Option<u32>,
    #[arg(long)]
    keep_yearly: Option<u32>,
    /// Keep what was taken within this long before the agent's newest snapshot (1y2m3w4d5h).
    #[arg(long)]
    keep_within: Option<String>,
    /// Keep snapshots with this label (repeatable).
    #[arg(long = "keep-label")]
    #[serde(default)]
    keep_label: Vec<String>,
}

impl KeepArgs {
    fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_within.is_none()
            && self.keep_label.is_empty()
    }

    fn policy(&self) -> anyhow::Result<RetentionPolicy> {
        let mut p = RetentionPolicy::default();
        p.keep_last = self.keep_last;
        p.keep_hourly = self.keep_hourly;
        p.keep_daily = self.keep_daily;
        p.keep_weekly = self.keep_weekly;
        p.keep_monthly = self.keep_monthly;
        p.keep_yearly = self.keep_yearly;
        p.keep_within_ms = self
            .keep_within
            .as_deref()
            .map(|d| {
                memsnap::parse_duration(d).map_err(|e| anyhow::anyhow!("--keep-within {d:?}: {e}"))
            })
            .transpose()?;
        p.keep_labels = self.keep_label.clone();
        Ok(p)
    }
}

fn read_policy(path: &std::path::Path) -> anyhow::Result<KeepArgs> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read policy {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("policy {}: {e}", path.display()))
}

#[derive(Subcommand)]
enum Command {
    /// Create the store (optional: the first command that writes creates it).
    Init,
    /// Snapshot an agent's memory.
    Snapshot {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent: String,
        /// DIR holding memdir/, sqlite/ and state/ (may contain {tenant} and {agent}).
        #[arg(long, conflicts_with_all = ["memdir", "sqlite_dir", "state_dir"])]
        source: Option<PathBuf>,
        #[arg(long, requires_all = ["sqlite_dir", "state_dir"])]
        memdir: Option<PathBuf>,
        #[arg(long, requires_all = ["memdir", "state_dir"])]
        sqlite_dir: Option<PathBuf>,
        #[arg(long, requires_all = ["memdir", "sqlite_dir"])]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value = "cli")]
        created_by: String,
    },
    /// List snapshots, oldest first.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
    /// What changed between two snapshots: artifacts, database rows and schemas, git commits,
    /// notes and state fields.
    Diff {
        /// The older snapshot (id, unique prefix, or `latest`).
        a: String,
        /// The newer snapshot.
        b: String,
        #[command(flatten)]
        who: AgentArgs,
        /// Show a unified diff of each changed note.
        #[arg(long)]
        patch: bool,
    },
    /// Sizes, deduplication and compression, per agent and for the whole store.
    Stats {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// Print the Prometheus text exposition format instead (store gauges and counters).
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// Show one snapshot and its artifacts.
    Show {
        snap: String,
        #[command(flatten)]
        who: AgentArgs,
    },
    /// Restore an agent (or a --target folder) to a snapshot, or straight from a bundle.
    Restore {
        /// The snapshot (id, unique prefix, or `latest`); not with --bundle.
        #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
        snap: Option<String>,
        #[command(flatten)]
        who: AgentArgs,
        /// Restore from this bundle: it is checked whole and imported into the store first.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// age identity file for an encrypted bundle.
        #[arg(long, requires = "bundle")]
        identity: Option<PathBuf>,
        /// Restore into this empty folder (memdir/, sqlite/, state/) instead of the live agent.
        #[arg(long, conflicts_with = "source")]
        target: Option<PathBuf>,
        /// The agent's folder (memdir/, sqlite/, state/), when the store does not know it yet
        /// (a snapshot imported from another host).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Print the plan and change nothing (not with --bundle, which imports first: check a
        /// bundle with verify-bundle).
        #[arg(long, conflicts_with = "bundle")]
        dry_run: bool,
        /// Skip the automatic pre-restore snapshot (the restore cannot then be undone).
        #[arg(long)]
        no_pre_snapshot: bool,
    },
    /// Check that every chunk of the snapshots is present (and, with --read-data, intact).
    Verify {
        snap: Option<String>,
        #[command(flatten)]
        who: AgentArgs,
        #[arg(long)]
        read_data: bool,
    },
    /// Write a snapshot as a portable bundle (tar.zst + .sha256), readable by
    /// nexo-memory-snapshot and by memsnap on another host.
    Export {
        snap: String,
        #[command(flatten)]
        who: AgentArgs,
        /// The bundle file to write (it must not exist); PATH.sha256 is written beside it.
        #[arg(long)]
        out: PathBuf,
        /// Encrypt the bundle to this age recipient (age1...); repeat for several.
        #[arg(long = "encrypt-to", value_name = "RECIPIENT")]
        encrypt_to: Vec<String>,
        /// Remove secrets (API keys, tokens, private keys, passwords) from the exported copy.
        #[arg(long)]
        redact: bool,
        /// Extra redaction rules (TOML: [[rule]] id = "...", pattern = '...').
        #[arg(long, requires = "redact", value_name = "FILE")]
        redact_rules: Option<PathBuf>,
        /// Recompress the whole bundle at this zstd level (1-22): a few percent smaller, several
        /// times slower. By default each chunk keeps the store's compression.
        #[arg(long)]
        level: Option<i32>,
    },
    /// Add a bundle's snapshot to the store (checked whole first; stores only what is new).
    Import {
        bundle: PathBuf,
        /// age identity file for an encrypted bundle.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Refuse the bundle unless it holds this agent.
        #[command(flatten)]
        who: AgentArgs,
    },
    /// Check a bundle on its own: file hash, manifest, seal, every artifact.
    VerifyBundle {
        bundle: PathBuf,
        /// age identity file, to check inside an encrypted bundle.
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Pin a snapshot: forget and delete leave it alone.
    Pin {
        snap: String,
        #[command(flatten)]
        who: AgentArgs,
    },
    /// Unpin a snapshot.
    Unpin {
        snap: String,
        #[command(flatten)]
        who: AgentArgs,
    },
    /// Remove snapshot records by a retention policy (restic's rules; buckets in UTC). The newest
    /// snapshot of each agent and pinned ones always stay. Space is freed by `prune`.
    Forget {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// A TOML policy file (keys as the options: keep-last = 7, keep-within = "30d", ...);
        /// default: policy.toml in the store, when no --keep-* option is given.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print the plan (what goes, what stays and why) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Free the space of chunks no snapshot references.
    Prune {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rewrite a pack when more than this percent of it is unused.
        #[arg(long, default_value_t = 10.0)]
        max_unused: f64,
    },
    /// Rebuild the index from the pack files (after `verify` found damage, or when index.redb
    /// is unreadable). Keeps every snapshot record the index still holds; the old index file is
    /// kept beside the new one.
    Repair {
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a snapshot record (its unique chunks are freed by a later prune).
    Delete {
        snap: String,
        #[command(flatten)]
        who: AgentArgs,
    },
    /// Create a sample agent and walk through snapshot, change, snapshot, verify, restore.
    Demo {
        /// Folder for the sample agent and (unless --store is given) its store.
        #[arg(long, default_value = "memsnap-demo")]
        dir: PathBuf,
    },
}

pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMSNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
    let out = Out::new(cli.json, cli.quiet);
    match run(&cli, &out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// A combination of arguments clap cannot express: exit code 2, like clap's own.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<memsnap::Error>() {
        Some(
            memsnap::Error::InvalidName { .. }
            | memsnap::Error::SnapshotSpecTooShort { .. }
            | memsnap::Error::LatestNeedsAgent
            | memsnap::Error::NoSource { .. }
            | memsnap::Error::UnknownLocation { .. }
            | memsnap::Error::EmptyPolicy,
        ) => 2,
        Some(memsnap::Error::Bundle(b)) if b.is_damage() => 3,
        // Every command that meets a damaged index reports damage, not a failure of its own.
        Some(memsnap::Error::Store(memsnap::StoreError::IndexDamaged { .. })) => 3,
        _ => 1,
    }
}

/// A missing bundle is refused before the store is opened: a typo must not create a store.
fn bundle_exists(bundle: &std::path::Path) -> anyhow::Result<()> {
    if !bundle.is_file() {
        anyhow::bail!(
            "bundle {} does not exist (or is not a file)",
            bundle.display()
        );
    }
    Ok(())
}

fn store_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.store {
        return Ok(p.clone());
    }
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local").join("share"),
            None => anyhow::bail!("no store given: pass --store DIR or set MEMSNAP_STORE"),
        },
    };
    Ok(base.join("memsnap"))
}

fn opts(cli: &Cli) -> anyhow::Result<StoreOptions> {
    // A day is more than any wait worth having, and keeps deadline arithmetic far from overflow.
    if !(0.0..=86_400.0).contains(&cli.lock_timeout) {
        anyhow::bail!("--lock-timeout must be a number of seconds from 0 to 86400");
    }
    Ok(StoreOptions::default()
        .lock_timeout(Duration::from_secs_f64(cli.lock_timeout))
        .window_chunks(usize::try_from(cli.window_chunks).unwrap_or(usize::MAX)))
}

fn progress(cli: &Cli) -> Arc<dyn memsnap::Progress> {
    if cli.json || cli.quiet || !std::io::stderr().is_terminal() {
        Arc::new(memsnap::NoProgress)
    } else {
        Arc::new(output::Bar::new())
    }
}

fn open(cli: &Cli, create: bool) -> anyhow::Result<Memsnap> {
    open_at(cli, &store_path(cli)?, create)
}

/// The store at `path` with the command line's options, progress bar and event file.
fn open_at(cli: &Cli, path: &std::path::Path, create: bool) -> anyhow::Result<Memsnap> {
    let m = if create {
        Memsnap::create(path, opts(cli)?)?
    } else {
        Memsnap::open(path, opts(cli)?)?
    };
    let m = m.with_progress(progress(cli));
    Ok(match &cli.events {
        Some(p) => m.with_events(Arc::new(memsnap::JsonLinesPublisher::new(p))),
        None => m,
    })
}

fn run(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Init => {
            let m = open(cli, true)?;
            out.init(&m.path());
        }
        Command::Snapshot {
            tenant,
            agent,
            source,
            memdir,
            sqlite_dir,
            state_dir,
            label,
            created_by,
        } => {
            let id = AgentId::new(tenant, agent)?;
            let mut req = SnapshotRequest::new(id).created_by(created_by.clone());
            if let Some(dir) = source {
                req = req.sources(SourceSpec::from_root(dir));
            } else if let (Some(m), Some(s), Some(st)) = (memdir, sqlite_dir, state_dir) {
                req = req.sources(SourceSpec {
                    memdir: m.clone(),
                    sqlite_dir: s.clone(),
                    state_dir: st.clone(),
                });
            }
            if let Some(l) = label {
                req = req.label(l.clone());
            }
            let m = open(cli, true)?;
            let info = m.snapshot(&req)?;
            out.snapshot(&info);
        }
        Command::List { tenant, agent } => {
            let m = open(cli, false)?;
            out.list(&m.list(tenant.as_deref(), agent.as_deref())?);
        }
        Command::Diff { a, b, who, patch } => {
            let m = open(cli, false)?;
            out.diff(&m.diff(a, b, who.agent_id()?.as_ref(), *patch)?);
        }
        Command::Stats {
            tenant,
            agent,
            prometheus,
        } => {
            let m = open(cli, false)?;
            let report = m.stats(tenant.as_deref(), agent.as_deref())?;
            if *prometheus {
                // One short-lived process: its own counters are zero; the store gauges are not.
                print!(
                    "# memsnap stats: store gauges; operation counters are this process's (zero)\n{}",
                    m.metrics().text_with_store(&report)
                );
            } else {
                out.stats(&report);
            }
        }
        Command::Show { snap, who } => {
            let m = open(cli, false)?;
            out.show(&m.show(snap, who.agent_id()?.as_ref())?);
        }
        Command::Restore {
            snap,
            who,
            bundle,
            identity,
            target,
            source,
            dry_run,
            no_pre_snapshot,
        } => {
            // clap skips `requires = "bundle"` when SNAP (which conflicts with --bundle) is given.
            if identity.is_some() && bundle.is_none() {
                return Err(UsageError("--identity goes with --bundle".into()).into());
            }
            let mut req = RestoreRequest::new(snap.clone().unwrap_or_default())
                .dry_run(*dry_run)
                .pre_snapshot(!no_pre_snapshot);
            if let Some(a) = who.agent_id()? {
                req = req.agent(a);
            }
            if let Some(t) = target {
                req = req.target(t.clone());
            }
            if let Some(dir) = source {
                req = req.sources(SourceSpec::from_root(dir));
            }
            match bundle {
                Some(b) => {
                    bundle_exists(b)?;
                    let m = open(cli, true)?;
                    let mut imp = ImportRequest::new(b.clone());
                    if let Some(i) = identity {
                        imp = imp.identity(i.clone());
                    }
                    let (imported, restored) = m.restore_bundle(&imp, &req)?;
                    out.restore_bundle(&imported, &restored);
                }
                None => {
                    let m = open(cli, false)?;
                    out.restore(&m.restore(&req)?);
                }
            }
        }
        Command::Verify {
            snap,
            who,
            read_data,
        } => {
            let m = open(cli, false)?;
            let report = m.verify(snap.as_deref(), who.agent_id()?.as_ref(), *read_data)?;
            out.verify(&report);
            if !report.ok() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Export {
            snap,
            who,
            out: path,
            encrypt_to,
            redact,
            redact_rules,
            level,
        } => {
            let m = open(cli, false)?;
            let mut req = ExportRequest::new(snap.clone(), path.clone()).redact(*redact);
            if let Some(l) = level {
                req = req.level(*l);
            }
            for r in encrypt_to {
                req = req.encrypt_to(r.clone());
            }
            if let Some(r) = redact_rules {
                req = req.redact_rules(r.clone());
            }
            if let Some(a) = who.agent_id()? {
                req = req.agent(a);
            }
            out.export(&m.export(&req)?);
        }
        Command::Import {
            bundle,
            identity,
            who,
        } => {
            bundle_exists(bundle)?;
            let m = open(cli, true)?;
            let mut req = ImportRequest::new(bundle.clone());
            if let Some(i) = identity {
                req = req.identity(i.clone());
            }
            if let Some(a) = who.agent_id()? {
                req = req.agent(a);
            }
            out.import(&m.import(&req)?);
        }
        Command::VerifyBundle { bundle, identity } => {
            let report = memsnap::verify_bundle(bundle, identity.as_deref())?;
            out.verify_bundle(&report);
            if !report.ok() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Pin { snap, who } => {
            let m = open(cli, false)?;
            let info = m.pin(snap, who.agent_id()?.as_ref())?;
            out.pinned(&info, true);
        }
        Command::Unpin { snap, who } => {
            let m = open(cli, false)?;
            let info = m.unpin(snap, who.agent_id()?.as_ref())?;
            out.pinned(&info, false);
        }
        Command::Forget {
            tenant,
            agent,
            keep,
            policy,
            dry_run,
        } => {
            let m = open(cli, false)?;
            let keep = match (policy, keep.is_empty()) {
                (Some(p), _) => read_policy(p)?,
                (None, true) if m.path().join("policy.toml").is_file() => {
                    read_policy(&m.path().join("policy.toml"))?
                }
                _ => keep.clone(),
            };
            let mut req = ForgetRequest::new(keep.policy()?).dry_run(*dry_run);
            if let Some(t) = tenant {
                req = req.tenant(t.clone());
            }
            if let Some(a) = agent {
                req = req.agent(a.clone());
            }
            out.forget(&m.forget(&req)?);
        }
        Command::Prune {
            dry_run,
            max_unused,
        } => {
            if !(0.0..=100.0).contains(max_unused) {
                anyhow::bail!("--max-unused must be a percentage from 0 to 100");
            }
            let m = open(cli, false)?;
            let req = PruneRequest::default()
                .dry_run(*dry_run)
                .max_unused_percent(*max_unused);
            out.prune(&m.prune(&req)?);
        }
        Command::Repair { dry_run } => {
            let path = store_path(cli)?;
            let report = Memsnap::repair(
                &path,
                opts(cli)?,
                &RepairRequest::default().dry_run(*dry_run),
                progress(cli).as_ref(),
            )?;
            out.repair(&report);
        }
        Command::Delete { snap, who } => {
            let m = open(cli, false)?;
            out.delete(&m.delete(snap, who.agent_id()?.as_ref())?);
        }
        Command::Demo { dir } => {
            return demo::run(cli, dir, out);
        }
    }
    Ok(ExitCode::SUCCESS)
}
