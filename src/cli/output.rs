//! Human and JSON output. JSON field names are the library's serde names (documented in
//! README.md, "JSON output"); human output is for reading at a glance.

use std::path::Path;

use memsnap::{
    BundleVerifyReport, CheckStatus, ExportReport, ForgetReport, ImportReport, PruneReport,
    RepairReport, RestoreReport, SnapshotDetails, SnapshotInfo, VerifyReport,
};

pub(crate) struct Out {
    json: bool,
    quiet: bool,
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC.
pub(crate) fn utc(ms: i64) -> String {
    memsnap::format_utc(ms)
}

impl Out {
    pub(crate) fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    fn emit<T: serde::Serialize>(&self, value: &T) -> bool {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("memsnap: cannot encode JSON output: {e}"),
            }
        }
        self.json || self.quiet
    }

    pub(crate) fn error(&self, e: &anyhow::Error) {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        let mut msg = chain.join(": caused by: ");
        // thiserror's `#[error(transparent)]` and `{source}` in messages repeat the cause.
        if chain.len() > 1 && chain[0].contains(&chain[1]) {
            msg = chain[0].clone();
        }
        if self.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("memsnap: error: {msg}");
    }

    pub(crate) fn init(&self, path: &Path) {
        if !self.emit(&serde_json::json!({ "store": path })) {
            println!("store ready at {}", path.display());
        }
    }

    pub(crate) fn snapshot(&self, i: &SnapshotInfo) {
        if self.emit(i) {
            return;
        }
        println!("{}", i.id);
        println!(
            "snapshot of {}/{}: {} artifacts, {} read, {} new stored ({} of {} chunks new), {:.2} s",
            i.tenant,
            i.agent,
            i.artifacts,
            bytes(i.stats.bytes_read),
            bytes(i.stats.new_stored_bytes),
            i.stats.new_chunks,
            i.stats.chunks,
            i.stats.duration_ms as f64 / 1000.0
        );
        if !i.absent.is_empty() {
            println!("absent (recorded as such): {}", i.absent.join(", "));
        }
    }

    pub(crate) fn list(&self, list: &[SnapshotInfo]) {
        if self.emit(&list) {
            return;
        }
        if list.is_empty() {
            println!("no snapshots");
            return;
        }
        println!(
            "{:<36}  {:<19}  {:<24}  {:>10}  {:>10}  LABEL",
            "ID", "CREATED (UTC)", "AGENT", "SIZE", "NEW"
        );
        for i in list {
            println!(
                "{:<36}  {:<19}  {:<24}  {:>10}  {:>10}  {}",
                i.id,
                utc(i.created_at_ms),
                format!("{}/{}", i.tenant, i.agent),
                bytes(i.logical_bytes),
                bytes(i.stats.new_stored_bytes),
                i.label.as_deref().unwrap_or("")
            );
        }
    }

    pub(crate) fn show(&self, d: &SnapshotDetails) {
        if self.emit(d) {
            return;
        }
        let i = &d.info;
        println!("snapshot   {}", i.id);
        println!("agent      {}/{}", i.tenant, i.agent);
        println!(
            "created    {} UTC by {}",
            utc(i.created_at_ms),
            i.created_by
        );
        if let Some(l) = &i.label {
            println!("label      {l}");
        }
        if let Some(p) = &i.parent {
            println!("parent     {p}");
        }
        if let Some(g) = &i.git {
            println!(
                "git HEAD   {} {} ({})",
                &g.head_oid, g.head_subject, g.head_author
            );
        }
        for (db, v) in &i.schema_versions {
            println!("schema     {db} user_version={v}");
        }
        println!(
            "size       {} in {} artifacts; {} new when taken",
            bytes(i.logical_bytes),
            i.artifacts,
            bytes(i.stats.new_stored_bytes)
        );
        for a in &i.absent {
            println!("absent     {a}");
        }
        println!();
        for e in &d.entries {
            println!(
                "{:<7} {:<8} {:>10}  {:o}  {}",
                e.part,
                e.kind,
                bytes(e.size),
                e.mode,
                e.path
            );
        }
    }

    pub(crate) fn restore(&self, r: &RestoreReport) {
        if self.emit(r) {
            return;
        }
        let p = &r.plan;
        let verb = if r.dry_run {
            "would restore"
        } else {
            "restored"
        };
        println!(
            "{verb} {}/{} to snapshot {}",
            p.tenant, p.agent, p.snapshot_id
        );
        println!(
            "  memdir  {}: {} entries, {} changed, {} removed",
            p.memdir,
            p.memdir_entries,
            p.memdir_changed.len(),
            p.memdir_removed.len()
        );
        for (db, action) in &p.databases {
            println!("  sqlite  {db}: {action}");
        }
        println!(
            "  state   {}: {} written, {} removed",
            p.state_dir,
            p.state_written.len(),
            p.state_removed.len()
        );
        if r.dry_run {
            for f in p.memdir_changed.iter().take(20) {
                println!("    changed  {f}");
            }
            for f in p.memdir_removed.iter().take(20) {
                println!("    removed  {f}");
            }
            println!("nothing was changed (--dry-run)");
        } else {
            match &r.pre_snapshot_id {
                Some(id) => println!("undo with: memsnap restore {id}"),
                None => println!("no pre-restore snapshot was taken"),
            }
            println!("{:.2} s", r.duration_ms as f64 / 1000.0);
        }
    }

    pub(crate) fn export(&self, r: &ExportReport) {
        if self.emit(r) {
            return;
        }
        println!(
            "exported snapshot {} of {}/{} to {}",
            r.snapshot_id,
            r.tenant,
            r.agent,
            r.bundle.display()
        );
        println!(
            "  {} artifacts, {} → {} in {:.2} s",
            r.artifacts,
            bytes(r.logical_bytes),
            bytes(r.bundle_bytes),
            r.duration_ms as f64 / 1000.0
        );
        println!("  sha256 {} ({})", r.sha256, r.sha256_file.display());
        if !r.encrypted_to.is_empty() {
            println!("  encrypted with age to {}", r.encrypted_to.join(", "));
        }
        if let Some(d) = &r.redaction {
            let total: u64 = d.per_rule.values().sum();
            println!("  redacted {total} secret(s)");
            for (rule, n) in &d.per_rule {
                println!("    {rule}: {n}");
            }
            for (artifact, rules) in &d.per_artifact {
                let list: Vec<String> = rules.iter().map(|(r, n)| format!("{r} {n}")).collect();
                println!("    in {artifact}: {}", list.join(", "));
            }
            if d.git_excluded {
                println!(
                    "  the memdir's .git folder (history) was left out: history cannot be redacted in place"
                );
            }
        }
    }

    pub(crate) fn import(&self, r: &ImportReport) {
        if self.emit(r) {
            return;
        }
        let i = &r.snapshot;
        if r.already_present {
            println!(
                "snapshot {} of {}/{} is already in the store",
                i.id, i.tenant, i.agent
            );
            return;
        }
        println!(
            "imported snapshot {} of {}/{} (written by {}{})",
            i.id,
            i.tenant,
            i.agent,
            r.written_by,
            if r.encrypted { ", encrypted" } else { "" }
        );
        println!(
            "  {} artifacts, {}; stored {} new in {:.2} s",
            i.artifacts,
            bytes(i.logical_bytes),
            bytes(i.stats.new_stored_bytes),
            r.duration_ms as f64 / 1000.0
        );
    }

    pub(crate) fn restore_bundle(&self, i: &ImportReport, r: &RestoreReport) {
        #[derive(serde::Serialize)]
        struct J<'a> {
            import: &'a ImportReport,
            restore: &'a RestoreReport,
        }
        if self.emit(&J {
            import: i,
            restore: r,
        }) {
            return;
        }
        self.import(i);
        self.restore(r);
    }

    pub(crate) fn verify_bundle(&self, r: &BundleVerifyReport) {
        #[derive(serde::Serialize)]
        struct J<'a> {
            ok: bool,
            complete: bool,
            #[serde(flatten)]
            report: &'a BundleVerifyReport,
        }
        if self.emit(&J {
            ok: r.ok(),
            complete: r.complete(),
            report: r,
        }) {
            return;
        }
        let mark = |s: CheckStatus| match s {
            CheckStatus::Ok => "ok        ",
            CheckStatus::Failed => "FAILED    ",
            CheckStatus::NotChecked => "not checked",
        };
        println!(
            "bundle {}{}",
            r.bundle.display(),
            if r.encrypted { " (age-encrypted)" } else { "" }
        );
        if let (Some(id), Some(t), Some(a)) = (&r.snapshot_id, &r.tenant, &r.agent) {
            println!(
                "  snapshot {id} of {t}/{a}, written by {}",
                r.written_by.as_deref().unwrap_or("?")
            );
        }
        for c in &r.checks {
            println!("  {} {}: {}", mark(c.status), c.name, c.detail);
        }
        let bad: Vec<_> = r
            .artifacts
            .iter()
            .filter(|a| a.status == CheckStatus::Failed)
            .collect();
        if !r.artifacts.is_empty() {
            println!(
                "  {} artifacts: {} ok, {} failed",
                r.artifacts.len(),
                r.artifacts.len() - bad.len(),
                bad.len()
            );
        }
        for a in bad {
            println!("  FAILED     {}: {}", a.path, a.detail);
        }
        println!(
            "{}",
            match (r.ok(), r.complete()) {
                (true, true) => "bundle ok",
                (true, false) => "no damage found in what could be checked",
                (false, _) => "bundle DAMAGED",
            }
        );
    }

    pub(crate) fn pinned(&self, i: &SnapshotInfo, pinned: bool) {
        if self.emit(&serde_json::json!({ "id": i.id, "pinned": pinned })) {
            return;
        }
        println!(
            "{} snapshot {} of {}/{}",
            if pinned { "pinned" } else { "unpinned" },
            i.id,
            i.tenant,
            i.agent
        );
    }

    pub(crate) fn forget(&self, r: &ForgetReport) {
        if self.emit(r) {
            return;
        }
        for g in &r.groups {
            println!("{}/{}:", g.tenant, g.agent);
            for d in &g.decisions {
                let short = d.id.get(..8).unwrap_or(&d.id);
                if d.keep {
                    println!(
                        "  keep    {short}  {}  ({})",
                        utc(d.created_at_ms),
                        d.reasons.join(", ")
                    );
                } else {
                    println!("  forget  {short}  {}", utc(d.created_at_ms));
                }
            }
        }
        println!(
            "{} {} snapshot(s), kept {}{}",
            if r.dry_run { "would forget" } else { "forgot" },
            r.forgotten,
            r.kept,
            if r.dry_run {
                " (--dry-run: nothing changed)"
            } else {
                "; run `memsnap prune` to free their space"
            }
        );
    }

    pub(crate) fn prune(&self, r: &PruneReport) {
        if self.emit(r) {
            return;
        }
        println!(
            "{} snapshots, {} chunks of which {} unused, in {} packs",
            r.snapshots, r.chunks, r.chunks_unused, r.packs
        );
        println!(
            "  packs: {} deleted, {} rewritten ({} copied into {} new), {} orphaned files",
            r.packs_deleted,
            r.packs_rewritten,
            bytes(r.bytes_copied),
            r.packs_written,
            r.packs_orphaned
        );
        println!(
            "{} {} of {}; {} unused left below the threshold",
            if r.dry_run { "would free" } else { "freed" },
            bytes(r.bytes_freed),
            bytes(r.bytes_before),
            bytes(r.bytes_unused_after)
        );
    }

    pub(crate) fn verify(&self, r: &VerifyReport) {
        #[derive(serde::Serialize)]
        struct J<'a> {
            ok: bool,
            #[serde(flatten)]
            report: &'a VerifyReport,
        }
        if self.emit(&J {
            ok: r.ok(),
            report: r,
        }) {
            return;
        }
        let what = if r.read_data {
            "read and hashed"
        } else {
            "located"
        };
        println!(
            "{} snapshots, {} chunks {what} ({})",
            r.snapshots_checked,
            r.chunks_checked,
            bytes(r.bytes_checked)
        );
        if r.ok() {
            println!("no damage found");
            return;
        }
        for d in &r.damaged {
            let chunk = match (d.chunk.is_empty(), d.pack.is_empty()) {
                (true, _) => String::new(),
                (false, true) => format!(" chunk {}", d.chunk),
                (false, false) => format!(" chunk {} in pack {}", d.chunk, d.pack),
            };
            println!(
                "DAMAGED snapshot {} artifact {}{chunk}: {}",
                d.snapshot, d.artifact, d.problem
            );
        }
        for p in &r.damaged_packs {
            println!("DAMAGED {p}");
        }
        for id in &r.intact_snapshots {
            println!("intact snapshot {id}");
        }
        println!(
            "{} damaged snapshot(s), {} intact; `memsnap repair` rebuilds the index from the \
             packs (a snapshot whose chunks are gone stays damaged)",
            r.damaged_snapshots.len(),
            r.intact_snapshots.len()
        );
    }

    pub(crate) fn repair(&self, r: &RepairReport) {
        if self.emit(r) {
            return;
        }
        let would = if r.dry_run { "would be " } else { "" };
        if !r.index_readable {
            println!("the old index is unreadable:");
        }
        for p in &r.index_problems {
            println!("  index: {p}");
        }
        println!(
            "{} packs read; {} chunks indexed: {} {would}added, {} {would}removed (no intact copy), {} {would}moved",
            r.packs, r.chunks, r.chunks_added, r.chunks_removed, r.chunks_moved
        );
        for p in &r.packs_missing {
            println!("MISSING pack {p}");
        }
        for p in &r.packs_salvaged {
            println!(
                "SALVAGED pack {p}: damaged footer; its readable chunks {would}copied into a new pack, the file {would}moved to damaged/"
            );
        }
        for c in &r.chunks_damaged {
            println!(
                "DAMAGED chunk {} in pack {}: {} (not indexed: the next snapshot holding these bytes stores them again)",
                c.chunk, c.pack, c.problem
            );
        }
        if r.tree_flags_cleared > 0 {
            println!(
                "{} tree nodes with an incomplete subtree {would}marked plain",
                r.tree_flags_cleared
            );
        }
        for id in &r.snapshots_recovered {
            println!("RECOVERED snapshot {id}");
        }
        for l in &r.lost {
            println!("LOST {l}");
        }
        for d in &r.damaged_snapshots {
            println!(
                "DAMAGED snapshot {}: {} chunks missing, in {}",
                d.snapshot,
                d.missing_chunks,
                d.artifacts.join(", ")
            );
        }
        println!(
            "{} snapshots kept, {} recovered: {} intact, {} damaged",
            r.snapshots_kept,
            r.snapshots_recovered.len(),
            r.intact_snapshots.len(),
            r.damaged_snapshots.len()
        );
        if let Some(b) = &r.backup {
            println!("the old index is kept as {}", b.display());
        }
        if r.dry_run {
            println!("dry run: nothing was changed");
        }
    }

    pub(crate) fn delete(&self, i: &SnapshotInfo) {
        if !self.emit(&serde_json::json!({ "deleted": i })) {
            println!("deleted snapshot {} of {}/{}", i.id, i.tenant, i.agent);
        }
    }

    pub(crate) fn diff(&self, r: &memsnap::DiffReport) {
        if self.emit(r) {
            return;
        }
        let short = |s: &str| s.chars().take(8).collect::<String>();
        println!(
            "diff {} ({} UTC) -> {} ({} UTC)",
            short(&r.a.id),
            utc(r.a.created_at_ms),
            short(&r.b.id),
            utc(r.b.created_at_ms)
        );
        if r.identical {
            println!("no change");
            return;
        }
        let s = &r.summary;
        println!(
            "artifacts: {} added, {} removed, {} changed, {} unchanged; {} of new data",
            s.artifacts_added,
            s.artifacts_removed,
            s.artifacts_changed,
            s.artifacts_unchanged,
            bytes(s.bytes_changed)
        );
        if !r.databases.is_empty() {
            println!("\ndatabases ({} differ):", r.databases.len());
            for d in &r.databases {
                println!("  {} ({})", d.name, d.change);
                for t in &d.tables {
                    println!(
                        "    {}: +{} -{} ~{} rows",
                        t.name, t.rows_added, t.rows_removed, t.rows_changed
                    );
                }
                for c in &d.schema_changes {
                    println!("    schema: {} {} {}", c.kind, c.name, c.change);
                }
            }
        }
        if let Some(g) = &r.git {
            let head = |h: &Option<String>| h.as_deref().map(short).unwrap_or("-".into());
            println!(
                "\ngit: {} -> {}: {} commits, {} files changed, +{} -{}",
                head(&g.a_head),
                head(&g.b_head),
                g.commits.len(),
                g.files_changed,
                g.insertions,
                g.deletions
            );
            for c in &g.commits {
                println!("  {} {}", short(&c.oid), c.subject);
            }
            if let Some(n) = &g.note {
                println!("  ({n})");
            }
        }
        let n = &r.notes;
        if !(n.added.is_empty() && n.removed.is_empty() && n.changed.is_empty()) {
            println!(
                "\nnotes: {} added, {} removed, {} changed",
                n.added.len(),
                n.removed.len(),
                n.changed.len()
            );
            n.added.iter().for_each(|p| println!("  + {p}"));
            n.removed.iter().for_each(|p| println!("  - {p}"));
            for c in &n.changed {
                println!("  ~ {}", c.path);
                if let Some(p) = &c.patch {
                    for l in p.lines() {
                        println!("    {l}");
                    }
                }
            }
            if let Some(note) = &n.note {
                println!("  ({note})");
            }
        }
        if !r.state.is_empty() {
            println!("\nstate: {} files differ", r.state.len());
            let show = |v: &Option<serde_json::Value>| match v {
                Some(v) => v.to_string(),
                None => "(absent)".into(),
            };
            for st in &r.state {
                println!("  {} ({})", st.name, st.change);
                for f in &st.fields {
                    println!("    {}: {} -> {}", f.path, show(&f.old), show(&f.new));
                }
                if let Some(note) = &st.note {
                    println!("    ({note})");
                }
            }
        }
    }

    pub(crate) fn line(&self, s: &str) {
        if !self.json && !self.quiet {
            println!("{s}");
        }
    }

    pub(crate) fn stats(&self, r: &memsnap::StatsReport) {
        if self.emit(r) {
            return;
        }
        let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
        let s = &r.store;
        println!(
            "store: {} snapshots of {} agents, {} logical ({} newest), {} stored in {} packs",
            s.snapshots,
            s.agents,
            bytes(s.logical_bytes),
            bytes(s.latest_logical_bytes),
            bytes(s.stored_bytes),
            s.packs
        );
        println!(
            "       {} chunks ({} unused, {}; prune --max-unused 0 frees {}), dedup {}, compression {}",
            s.chunks,
            s.chunks_unused,
            bytes(s.unused_bytes),
            bytes(s.reclaimable_bytes),
            ratio(s.dedup_ratio),
            ratio(s.compression_ratio)
        );
        if r.agents.is_empty() {
            return;
        }
        println!(
            "{:<24}  {:>5}  {:>10}  {:>10}  {:>10}  {:>7}  {:>7}",
            "AGENT", "SNAPS", "LOGICAL", "NEWEST", "STORED", "DEDUP", "COMPR"
        );
        for a in &r.agents {
            println!(
                "{:<24}  {:>5}  {:>10}  {:>10}  {:>10}  {:>7}  {:>7}",
                format!("{}/{}", a.tenant, a.agent),
                a.snapshots,
                bytes(a.logical_bytes),
                bytes(a.latest_logical_bytes),
                bytes(a.stored_bytes),
                ratio(a.dedup_ratio),
                ratio(a.compression_ratio)
            );
        }
    }
}

/// A progress bar on stderr (only used when stderr is a terminal).
pub(crate) struct Bar {
    bar: indicatif::ProgressBar,
}

impl Bar {
    pub(crate) fn new() -> Self {
        let bar = indicatif::ProgressBar::hidden();
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        Self { bar }
    }
}

impl memsnap::Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_message(phase.to_owned());
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
