//! `cargo run --release --example sample_agent -- DIR [SIZE_MIB]`: builds a deterministic sample
//! agent (memdir, four databases, state) of about SIZE_MIB MiB in DIR, for trying memsnap by
//! hand or profiling it.

use memsnap::sample::{SampleAgent, SampleSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: sample_agent DIR [SIZE_MIB]")?;
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let agent = SampleAgent::create(dir.as_ref(), &SampleSpec::with_total_bytes(mib << 20, 42))?;
    for (table, rows) in agent.row_counts()? {
        println!("{table}: {rows} rows");
    }
    Ok(())
}
