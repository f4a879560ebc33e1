//! `nexo-compat`: the verify, restore and snapshot of the published `nexo-memory-snapshot` 0.1.5
//! behind a small CLI, so memsnap's tests can check that memsnap reads what that tool wrote and
//! writes what that tool accepts.
//!
//! ```text
//! nexo-compat verify BUNDLE
//! nexo-compat restore BUNDLE --root DIR --tenant T --agent A [--identity FILE] [--dry-run]
//! nexo-compat snapshot --root DIR --tenant T --agent A [--label L] [--encrypt-to age1...] [--redact]
//! ```
//!
//! Every result is one JSON object on stdout; an error is a non-zero exit (1, or 2 for a usage
//! error) with its text on stderr.
//!
//! The layout under `--root DIR`, for agent A (the tool's `DefaultPathResolver` plus our
//! `StateProvider`):
//!
//! - `DIR/memdir/A/`          the git memdir (`.git/` and the memory files)
//! - `DIR/sqlite/A/*.sqlite`  `long_term`, `vector`, `concepts`, `compactions`
//! - `DIR/state/A/*.json`     `extract_cursor.json`, `dream_run.json`
//! - `DIR/state-root/`        the tool's own state root: bundles it writes land in
//!   `tenants/T/snapshots/A/<uuid>.tar.zst[.age]` (+ `.sha256`), and restore stages there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use nexo_memory_snapshot::local_fs::LocalFsSnapshotter;
use nexo_memory_snapshot::state_capture::StateProvider;
use nexo_memory_snapshot::{
    AgentId, DecryptionIdentity, EncryptionKey, MemorySnapshotter, RestoreRequest, SnapshotError,
    SnapshotRequest,
};
use serde_json::Value;

const USAGE: &str = "usage:
  nexo-compat verify BUNDLE
  nexo-compat restore BUNDLE --root DIR --tenant T --agent A [--identity FILE] [--dry-run]
  nexo-compat snapshot --root DIR --tenant T --agent A [--label L] [--encrypt-to age1...] [--redact]";

/// Keeps the two state artifacts as `<dir>/<agent>/<key>.json`; a missing file captures as
/// "no such state" (the bundle then has no artifact for it).
struct JsonFileState {
    dir: PathBuf,
}

impl JsonFileState {
    fn path(&self, agent_id: &AgentId, key: &str) -> PathBuf {
        self.dir.join(agent_id).join(format!("{key}.json"))
    }

    fn read(&self, agent_id: &AgentId, key: &str) -> Result<Option<Value>, SnapshotError> {
        let path = self.path(agent_id, key);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SnapshotError::Io(e)),
        }
    }

    fn write(&self, agent_id: &AgentId, key: &str, value: &Value) -> Result<(), SnapshotError> {
        let path = self.path(agent_id, key);
        std::fs::create_dir_all(path.parent().expect("state file has a parent"))?;
        // The same bytes the tool puts in the bundle (`to_vec_pretty` of the value).
        std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
        Ok(())
    }
}

#[async_trait]
impl StateProvider for JsonFileState {
    async fn capture_extract_cursor(
        &self,
        agent_id: &AgentId,
    ) -> Result<Option<Value>, SnapshotError> {
        self.read(agent_id, "extract_cursor")
    }

    async fn capture_last_dream_run(
        &self,
        agent_id: &AgentId,
    ) -> Result<Option<Value>, SnapshotError> {
        self.read(agent_id, "dream_run")
    }

    async fn restore_extract_cursor(
        &self,
        agent_id: &AgentId,
        value: Value,
    ) -> Result<(), SnapshotError> {
        self.write(agent_id, "extract_cursor", &value)
    }

    async fn restore_dream_run(
        &self,
        agent_id: &AgentId,
        value: Value,
    ) -> Result<(), SnapshotError> {
        self.write(agent_id, "dream_run", &value)
    }
}

fn snapshotter(root: &Path) -> Result<LocalFsSnapshotter> {
    LocalFsSnapshotter::builder()
        .state_root(root.join("state-root"))
        .memdir_root(root.join("memdir"))
        .sqlite_root(root.join("sqlite"))
        .state_provider(Arc::new(JsonFileState {
            dir: root.join("state"),
        }))
        .build()
        .context("building LocalFsSnapshotter")
}

/// The parsed command line: positional arguments, `--key value` options, `--flag` switches.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    fn parse(raw: Vec<String>, takes_value: &[&str], switches: &[&str]) -> Result<Args> {
        let mut args = Args {
            positional: Vec::new(),
            options: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = raw.into_iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if takes_value.contains(&name) {
                    let v = it
                        .next()
                        .with_context(|| format!("--{name} needs a value"))?;
                    args.options.push((name.to_string(), v));
                } else if switches.contains(&name) {
                    args.flags.push(name.to_string());
                } else {
                    bail!("unknown option --{name}");
                }
            } else {
                args.positional.push(a);
            }
        }
        Ok(args)
    }

    fn opt(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn req(&self, name: &str) -> Result<&str> {
        self.opt(name)
            .with_context(|| format!("--{name} is required"))
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    fn one_positional(&self, what: &str) -> Result<PathBuf> {
        match self.positional.as_slice() {
            [one] => Ok(PathBuf::from(one)),
            [] => bail!("missing {what}"),
            more => bail!("expected one {what}, got {}", more.len()),
        }
    }

    fn no_positional(&self) -> Result<()> {
        if let Some(p) = self.positional.first() {
            bail!("unexpected argument {p:?}");
        }
        Ok(())
    }
}

/// An error in the command line itself (exit 2) rather than in the operation (exit 1).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Usage(format!("{e:#}")))
}

async fn run(argv: Vec<String>) -> Result<Value> {
    let mut argv = argv.into_iter();
    let Some(cmd) = argv.next() else {
        return Err(usage(anyhow::anyhow!("missing subcommand")));
    };
    let rest: Vec<String> = argv.collect();
    match cmd.as_str() {
        "verify" => {
            let a = Args::parse(rest, &[], &[]).map_err(usage)?;
            let bundle = a.one_positional("BUNDLE").map_err(usage)?;
            // verify reads only the bundle and its sibling `.sha256`; the roots are unused.
            let s = snapshotter(Path::new("/nonexistent-nexo-compat-root"))?;
            let report = s.verify(&bundle).await.context("verify")?;
            Ok(serde_json::to_value(report)?)
        }
        "restore" => {
            let a = Args::parse(rest, &["root", "tenant", "agent", "identity"], &["dry-run"])
                .map_err(usage)?;
            let bundle = a.one_positional("BUNDLE").map_err(usage)?;
            let root = PathBuf::from(a.req("root").map_err(usage)?);
            let tenant = a.req("tenant").map_err(usage)?;
            let agent = a.req("agent").map_err(usage)?;
            let mut req = RestoreRequest::new(agent, tenant, bundle);
            req.auto_pre_snapshot = false;
            req.dry_run = a.flag("dry-run");
            req.decrypt = a
                .opt("identity")
                .map(|p| DecryptionIdentity::AgeIdentityFile(PathBuf::from(p)));
            let report = snapshotter(&root)?.restore(req).await.context("restore")?;
            Ok(serde_json::to_value(report)?)
        }
        "snapshot" => {
            let a = Args::parse(
                rest,
                &["root", "tenant", "agent", "label", "encrypt-to"],
                &["redact"],
            )
            .map_err(usage)?;
            a.no_positional().map_err(usage)?;
            let root = PathBuf::from(a.req("root").map_err(usage)?);
            let tenant = a.req("tenant").map_err(usage)?;
            let agent = a.req("agent").map_err(usage)?;
            let mut req = SnapshotRequest::cli(agent, tenant);
            // `SnapshotRequest::cli` turns redaction on; here it is opt-in.
            req.redact_secrets = a.flag("redact");
            req.label = a.opt("label").map(str::to_string);
            req.encrypt = a
                .opt("encrypt-to")
                .map(|r| EncryptionKey::AgePublicKey(r.to_string()));
            let meta = snapshotter(&root)?
                .snapshot(req)
                .await
                .context("snapshot")?;
            let mut sibling = meta.bundle_path.clone().into_os_string();
            sibling.push(".sha256");
            let mut out = serde_json::to_value(&meta)?;
            let obj = out.as_object_mut().expect("SnapshotMeta is an object");
            obj.insert(
                "bundle".into(),
                Value::from(meta.bundle_path.display().to_string()),
            );
            obj.insert(
                "sha256_file".into(),
                Value::from(PathBuf::from(sibling).display().to_string()),
            );
            Ok(out)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        other => Err(usage(anyhow::anyhow!("unknown subcommand {other:?}"))),
    }
}

/// The error and its causes, `: `-separated, leaving out a cause that the message before it
/// already quotes (the tool's errors embed their source: "io: X" caused by "X").
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(argv).await {
        Ok(v) => println!("{v}"),
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("nexo-compat: {}\n{USAGE}", error_text(&e));
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("nexo-compat: {}", error_text(&e));
            std::process::exit(1);
        }
    }
}
