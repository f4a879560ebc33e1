//! `memsnap demo`: builds a sample agent and walks through snapshot, change, snapshot, diff,
//! verify, restore, export and import of a bundle, forget and prune, printing what each step did
//! and cost.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{
    AgentId, ExportRequest, ForgetRequest, ImportRequest, PruneRequest, RestoreRequest,
    RetentionPolicy, SnapshotRequest, SourceSpec,
};

use super::output::bytes;
use super::{Cli, Out};

const MARKER: &str = ".memsnap-demo";

pub(crate) fn run(cli: &Cli, dir: &Path, out: &Out) -> anyhow::Result<ExitCode> {
    // Bad options are refused before the demo folder is touched.
    super::opts(cli)?;
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !dir.join(MARKER).exists() {
            anyhow::bail!(
                "{} exists and is not a memsnap demo folder: pass --dir with a new folder",
                dir.display()
            );
        }
        // A previous demo: start over.
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the old demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        b"created by memsnap demo; safe to delete\n",
    )?;
    let agent_dir = dir.join("agent");
    let store = match &cli.store {
        Some(s) => s.clone(),
        None => dir.join("store"),
    };

    out.line(&format!(
        "1. creating a sample agent in {}",
        agent_dir.display()
    ));
    let sample = SampleAgent::create(&agent_dir, &SampleSpec::demo())?;
    let counts0 = sample.row_counts()?;
    let head0 = sample.git_head()?;
    for (table, n) in &counts0 {
        out.line(&format!("     {table}: {n} rows"));
    }
    out.line(&format!(
        "     git HEAD {}",
        head0.as_deref().unwrap_or("-")
    ));

    let m = super::open_at(cli, &store, true)?;
    let id = AgentId::new("demo", "ana")?;
    let snap = |label: &str| -> anyhow::Result<memsnap::SnapshotInfo> {
        let req = SnapshotRequest::new(id.clone())
            .sources(SourceSpec::from_root(&agent_dir))
            .label(label)
            .created_by("memsnap demo");
        let info = m.snapshot(&req)?;
        out.line(&format!(
            "     {} ({}): {} read, {} new in the store, {:.2} s",
            info.id,
            label,
            bytes(info.stats.bytes_read),
            bytes(info.stats.new_stored_bytes),
            info.stats.duration_ms as f64 / 1000.0
        ));
        Ok(info)
    };

    out.line(&format!(
        "2. first snapshot into the store {}",
        store.display()
    ));
    let first = snap("first")?;

    out.line("3. a day of agent work: 1% new vectors, 0.5% rewritten, 0.5% deleted, notes edited and committed");
    sample.append_day(1, 0.01)?;
    sample.update_day(2, 0.005)?;
    out.line(&format!(
        "     git HEAD now {}",
        sample.git_head()?.as_deref().unwrap_or("-")
    ));

    out.line("4. second snapshot: only the changed pages and notes are stored");
    let second = snap("after a day")?;

    out.line("5. unchanged re-snapshot: costs almost nothing");
    snap("unchanged")?;

    out.line("6. diff of the first two snapshots: what the day really changed");
    let d = m.diff(&first.id, &second.id, Some(&id), false)?;
    for db in &d.databases {
        for t in &db.tables {
            out.line(&format!(
                "     {}.{}: +{} -{} ~{} rows",
                db.name, t.name, t.rows_added, t.rows_removed, t.rows_changed
            ));
        }
    }
    if let Some(g) = &d.git {
        out.line(&format!(
            "     git: {} commit(s), {} file(s), +{} -{} lines",
            g.commits.len(),
            g.files_changed,
            g.insertions,
            g.deletions
        ));
    }
    out.line(&format!(
        "     {} of new chunk data",
        bytes(d.summary.bytes_changed)
    ));

    out.line("7. verify --read-data: every chunk re-read and re-hashed");
    let report = m.verify(None, None, true)?;
    out.line(&format!(
        "     {} snapshots, {} chunks, {}: {}",
        report.snapshots_checked,
        report.chunks_checked,
        bytes(report.bytes_checked),
        if report.ok() {
            "no damage"
        } else {
            "DAMAGE FOUND"
        }
    ));

    out.line(&format!(
        "8. restore the agent to the first snapshot {}",
        first.id
    ));
    let restored = m.restore(&RestoreRequest::new(first.id.clone()).agent(id.clone()))?;
    let counts1 = sample.row_counts()?;
    let head1 = sample.git_head()?;
    let same = counts1 == counts0 && head1 == head0;
    out.line(&format!(
        "     rows and git HEAD equal to the first snapshot's: {}",
        if same { "yes" } else { "NO" }
    ));
    if let Some(pre) = &restored.pre_snapshot_id {
        out.line(&format!(
            "     undo with: memsnap --store {} restore {pre}",
            store.display()
        ));
    }

    out.line("9. export the second snapshot as a portable bundle, check it, import it elsewhere");
    let bundle = dir.join(format!("{}.tar.zst", second.id));
    let exported = m.export(&ExportRequest::new(second.id.as_str(), &bundle).agent(id.clone()))?;
    let checked = memsnap::verify_bundle(&bundle, None)?;
    out.line(&format!(
        "     {}: {} in {:.2} s; verify-bundle: {}",
        bundle.display(),
        bytes(exported.bundle_bytes),
        exported.duration_ms as f64 / 1000.0,
        if checked.ok() { "ok" } else { "DAMAGED" }
    ));
    let other = super::open_at(cli, &dir.join("other-store"), true)?;
    let imported = other.import(&ImportRequest::new(&bundle))?;
    out.line(&format!(
        "     imported into {}: {} stored",
        dir.join("other-store").display(),
        bytes(imported.snapshot.stats.new_stored_bytes)
    ));

    out.line("10. forget all but the newest two snapshots of the agent, then prune");
    let forgot = m.forget(&ForgetRequest::new(RetentionPolicy::default().keep_last(2)))?;
    let pruned = m.prune(&PruneRequest::default())?;
    let stats = m.stats(None, None)?;
    out.line(&format!(
        "     forgot {}, kept {}; prune freed {}; the store holds {} for {} of snapshots",
        forgot.forgotten,
        forgot.kept,
        bytes(pruned.bytes_freed),
        bytes(stats.store.stored_bytes),
        bytes(stats.store.logical_bytes)
    ));
    let after_gc = m.verify(None, None, true)?;

    out.line("");
    out.line(&format!(
        "second snapshot stored {} for {} of memory; try: memsnap --store {} list",
        bytes(second.stats.new_stored_bytes),
        bytes(second.logical_bytes),
        store.display()
    ));
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "store": store,
                "agent_dir": agent_dir,
                "first": first.id,
                "second": second.id,
                "verify_ok": report.ok() && after_gc.ok(),
                "bundle": bundle,
                "bundle_ok": checked.ok(),
                "restored_equal": same,
                "pre_restore_snapshot": restored.pre_snapshot_id,
            })
        );
    }
    if !(same && report.ok() && after_gc.ok() && checked.ok()) {
        anyhow::bail!("the demo found a problem (see above)");
    }
    Ok(ExitCode::SUCCESS)
}
