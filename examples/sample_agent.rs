//! `cargo run --release --example sample_agent -- DIR [SIZE_MIB | tiny]`: builds a deterministic sample
//! agent (memdir, four databases, state) of about SIZE_MIB MiB in DIR, for trying memsnap by
//! hand or profiling it.

use memsnap::sample::{SampleAgent, SampleSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: sample_agent DIR [SIZE_MIB]")?;
    let spec = match args.next().as_deref() {
        // The agent the tests use.
        Some("tiny") => SampleSpec::tiny(),
        Some(s) => SampleSpec::with_total_bytes(s.parse::<u64>()? << 20, 42),
        None => SampleSpec::with_total_bytes(64 << 20, 42),
    };
    let agent = SampleAgent::create(dir.as_ref(), &spec)?;
    for (table, rows) in agent.row_counts()? {
        println!("{table}: {rows} rows");
    }
    Ok(())
}
