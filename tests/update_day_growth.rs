//! The performance issue's store-growth target for the *update day* (0.5% of the embeddings
//! rewritten in place, 0.5% deleted, scattered): memsnap must store about the changed pages, at
//! most 5% of what a store with restic's ~1 MiB content-defined chunks stores for the same day.
//! Measured in bytes on a small agent, so that it runs in CI (times are benchmarks' business).

use std::path::Path;

use anyhow::{Result, ensure};
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{AgentId, Memsnap, SnapshotRequest, SourceSpec, StoreOptions};

const PAGE: usize = 4096;
/// restic's chunker: 512 KiB minimum, 1 MiB average, 8 MiB maximum.
const RESTIC_AVG_CHUNK: usize = 1 << 20;
/// What zstd saves on this data in restic's run of benches/RESULTS.md (726 MiB for 1070).
const RESTIC_RATIO: f64 = 0.68;

/// Disk space of the store's files (allocated blocks: redb extends its index sparsely).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

#[test]
fn update_day_stores_the_changed_pages_and_at_most_5_percent_of_restic() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let agent = SampleAgent::create(
        &tmp.path().join("agent"),
        &SampleSpec::with_total_bytes(48 << 20, 7),
    )?;
    let store = Memsnap::create(tmp.path().join("store"), StoreOptions::default())?;
    let req = SnapshotRequest::new(AgentId::new("bench", "a")?)
        .sources(SourceSpec::from_root(agent.root()));
    store.snapshot(&req)?;

    let db = agent.sqlite_dir().join("vector.sqlite");
    let before = std::fs::read(&db)?;
    agent.update_day(2, 0.005)?;
    let after = std::fs::read(&db)?;
    ensure!(
        before.len() == after.len(),
        "the update day changed the file's size"
    );

    // What changed, counted two ways: 4 KiB pages (what memsnap can at best store), and the
    // 1 MiB regions holding a changed page (what ~1 MiB chunks must store again, at least).
    let changed_pages: Vec<usize> = (0..after.len() / PAGE)
        .filter(|&i| before[i * PAGE..(i + 1) * PAGE] != after[i * PAGE..(i + 1) * PAGE])
        .collect();
    let mut regions: Vec<usize> = changed_pages
        .iter()
        .map(|p| p * PAGE / RESTIC_AVG_CHUNK)
        .collect();
    regions.dedup();
    let changed_bytes = (changed_pages.len() * PAGE) as u64;
    let restic_model = (regions.len() * RESTIC_AVG_CHUNK) as f64 * RESTIC_RATIO;

    let grown_from = allocated(&tmp.path().join("store"));
    let info = store.snapshot(&req)?;
    let growth = allocated(&tmp.path().join("store")) - grown_from;
    eprintln!(
        "update day on a {} MiB vector db: {} pages changed ({changed_bytes} B) in {} MiB regions; \
         store grew {growth} B (new chunks {}, stored {} B); restic model {restic_model:.0} B; \
         ratio {:.4}",
        after.len() >> 20,
        changed_pages.len(),
        regions.len(),
        info.stats.new_chunks,
        info.stats.new_stored_bytes,
        growth as f64 / restic_model
    );
    ensure!(
        changed_pages.len() > 20,
        "the update day changed too little to measure"
    );
    // Each changed page once (zero runs compressed), plus tree nodes and index pages.
    ensure!(
        info.stats.new_raw_bytes <= changed_bytes + changed_bytes / 4 + (64 << 10),
        "stored {} B of chunks for {changed_bytes} B of changed pages",
        info.stats.new_raw_bytes
    );
    ensure!(
        (growth as f64) <= 0.05 * restic_model,
        "store grew {growth} B, more than 5% of {restic_model:.0} B"
    );
    Ok(())
}
