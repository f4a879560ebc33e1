//! `cargo run --release --example sample_agent -- DIR [SIZE_MIB | tiny]`: builds a deterministic
//! sample agent (memdir, four databases, state) of about SIZE_MIB MiB in DIR, for trying memsnap
//! by hand or profiling it. `-- DIR append|update|vacuum [SEED]` applies one of the benchmark's
//! days to an agent built before.

use memsnap::sample::{SampleAgent, SampleSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: sample_agent DIR [SIZE_MIB | tiny | append | update | vacuum]")?;
    let what = args.next();
    let seed = || -> Result<u64, Box<dyn std::error::Error>> {
        Ok(std::env::args().nth(3).map_or(Ok(1), |s| s.parse())?)
    };
    match what.as_deref() {
        Some("append") => return Ok(SampleAgent::open(dir.as_ref()).append_day(seed()?, 0.01)?),
        Some("update") => return Ok(SampleAgent::open(dir.as_ref()).update_day(seed()?, 0.005)?),
        Some("vacuum") => return Ok(SampleAgent::open(dir.as_ref()).vacuum_vectors()?),
        _ => {}
    }
    let spec = match what.as_deref() {
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
