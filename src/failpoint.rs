//! Test hooks that stop a process at a named point, as a crash (kill -9, power loss) would.
//! `MEMSNAP_FAILPOINT=name` aborts the process there (no destructor, no flush: what was not
//! durable is lost); `MEMSNAP_FAILPOINT=name:error` returns an error instead. Unset, a hit is
//! one environment lookup.

use crate::error::Error;

pub(crate) fn hit(name: &str) -> Result<(), Error> {
    let Ok(spec) = std::env::var("MEMSNAP_FAILPOINT") else {
        return Ok(());
    };
    // Point names contain ':' themselves (`restore:staged`), so only a trailing `:error` counts.
    for point in spec.split(',') {
        match point.strip_suffix(":error") {
            Some(p) if p == name => return Err(Error::FailPoint(name.to_owned())),
            None if point == name => {
                eprintln!("memsnap: failpoint {name} hit, aborting");
                std::process::abort();
            }
            _ => {}
        }
    }
    Ok(())
}
