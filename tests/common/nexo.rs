//! The published `nexo-memory-snapshot` 0.1.5 as a test oracle: builds the stand-alone crate in
//! `compat/nexo-0.1.5/` (binary `nexo-compat`) once per test process and runs it.
//!
//! memsnap cannot depend on that crate (its sqlx links libsqlite3-sys 0.30, memsnap's rusqlite
//! 0.40, both `links = "sqlite3"`), so the old tool runs as a separate program:
//!
//! ```text
//! nexo-compat verify BUNDLE
//! nexo-compat restore BUNDLE --root DIR --tenant T --agent A [--identity FILE] [--dry-run]
//! nexo-compat snapshot --root DIR --tenant T --agent A [--label L] [--encrypt-to age1...] [--redact]
//! ```
//!
//! Each prints one JSON object on stdout (`VerifyReport`, `RestoreReport`, or `SnapshotMeta` plus
//! `bundle` and `sha256_file`), or exits non-zero (1; 2 for a usage error) with the error on
//! stderr. Under `--root DIR` the agent A lives at `DIR/memdir/A/` (git memdir), `DIR/sqlite/A/`
//! (`long_term`, `vector`, `concepts`, `compactions` `.sqlite`) and `DIR/state/A/`
//! (`extract_cursor.json`, `dream_run.json`); bundles the tool writes land in
//! `DIR/state-root/tenants/T/snapshots/A/`.
//!
//! The build uses its own target folder (`$CARGO_TARGET_DIR/nexo-compat`, else
//! `target/nexo-compat`): the outer `cargo test` holds the lock on the main one. The first build
//! fetches the crate's dependencies from crates.io (Cargo.lock is committed; `--locked`) and takes
//! about two minutes on two cores; later ones are no-ops.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

/// The memsnap repository (the folder of its Cargo.toml).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The bundles written by nexo-memory-snapshot 0.1.5 (copied into tests/fixtures from the shared
/// fixtures; see their README.md). Read-only: copy a bundle out with [`copy_fixture`] first.
pub fn fixtures_dir() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/nexo-memory-snapshot-0.1.5");
    assert!(
        dir.join("README.md").is_file(),
        "nexo-memory-snapshot fixtures not found at {}",
        dir.display()
    );
    dir
}

/// Copies every file of fixture folder `name` (e.g. "01-plain") into `dest` (created), writable,
/// and returns the copy of its bundle (the file ending in `.tar.zst` or `.tar.zst.age`).
pub fn copy_fixture(name: &str, dest: &Path) -> PathBuf {
    let src = fixtures_dir().join(name);
    fs::create_dir_all(dest).unwrap();
    let mut bundle = None;
    for entry in fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let entry = entry.unwrap();
        let to = dest.join(entry.file_name());
        fs::copy(entry.path(), &to).unwrap();
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644)).unwrap();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.ends_with(".tar.zst") || file_name.ends_with(".tar.zst.age") {
            assert!(bundle.is_none(), "two bundles in fixture {name}");
            bundle = Some(to);
        }
    }
    bundle.unwrap_or_else(|| panic!("no bundle in fixture {name}"))
}

/// The `nexo-compat` binary, built on first use (once per test process; every caller after a
/// failed build gets the same panic).
pub fn nexo_compat() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_nexo_compat) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn build_nexo_compat() -> Result<PathBuf, String> {
    let root = repo_root();
    let manifest = root.join("compat/nexo-0.1.5/Cargo.toml");
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir).join("nexo-compat"),
        _ => root.join("target/nexo-compat"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--locked",
        "--quiet",
        "--message-format=json-render-diagnostics",
    ])
    .arg("--manifest-path")
    .arg(&manifest)
    .arg("--target-dir")
    .arg(&target_dir)
    // From the repo root, so its .cargo/config.toml applies as for the main crate.
    .current_dir(root)
    .stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "building nexo-compat failed ({}): {cmd:?}\n{}\n\
             hint: the first build fetches nexo-memory-snapshot 0.1.5 and its dependencies from \
             crates.io (network needed once); Cargo.lock in compat/nexo-0.1.5 is used --locked",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The executable as cargo reports it: right whatever the profile, target triple or layout.
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| {
            msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "nexo-compat"
        })
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("cargo built nexo-compat but reported no executable: {cmd:?}"))
}

/// Runs `nexo-compat ARGS`: (exit code, stdout parsed as JSON or `Null`, stderr). An exit by a
/// signal counts as -1; stdout that is not JSON gives `Null` and is appended to the stderr text.
pub fn nexo(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(nexo_compat())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running nexo-compat");
    let code = out.status.code().unwrap_or(-1);
    let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            stderr.push_str(&format!("\n(stdout is not JSON: {e}): {stdout}"));
            Value::Null
        })
    };
    (code, json, stderr)
}

/// [`nexo`] that must succeed: returns the JSON, or panics with the command line and stderr.
pub fn nexo_ok(args: &[&str]) -> Value {
    let (code, json, stderr) = nexo(args);
    assert!(
        code == 0 && !json.is_null(),
        "nexo-compat {args:?} exited {code}\nstderr: {stderr}"
    );
    json
}

/// The public half of tests/fixtures/.../03-age/test-identity.txt (a throwaway test key).
pub const TEST_RECIPIENT: &str = "age1dlaac65wd8367dddxt8l4epq7muv6gx6nfkqzxmjgl9mm20sd9msy5s5ad";

/// `p` as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The old tool's restore of `bundle` as agent `tenant/agent` under `root`, asserting success.
pub fn restore(
    bundle: &Path,
    root: &Path,
    tenant: &str,
    agent: &str,
    identity: Option<&Path>,
) -> Value {
    let mut args = vec![
        "restore",
        s(bundle),
        "--root",
        s(root),
        "--tenant",
        tenant,
        "--agent",
        agent,
    ];
    if let Some(i) = identity {
        args.extend(["--identity", s(i)]);
    }
    nexo_ok(&args)
}

/// The old tool's snapshot of agent `tenant/agent` under `root`, labelled, optionally encrypted
/// to `recipient`, asserting success.
pub fn snapshot(
    root: &Path,
    tenant: &str,
    agent: &str,
    label: &str,
    recipient: Option<&str>,
) -> Value {
    let mut args = vec![
        "snapshot",
        "--root",
        s(root),
        "--tenant",
        tenant,
        "--agent",
        agent,
        "--label",
        label,
    ];
    if let Some(r) = recipient {
        args.extend(["--encrypt-to", r]);
    }
    nexo_ok(&args)
}
