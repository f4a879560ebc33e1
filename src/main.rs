//! The `memsnap` command: a thin layer over the library. `main` prints the error chain and maps
//! errors to the documented exit codes (0 ok, 1 failure, 2 bad usage, 3 damage found).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
