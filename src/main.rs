//! The `memsnap` command: a thin layer over the library. `main` prints the error chain and maps
//! errors to the documented exit codes (0 ok, 1 failure, 2 bad usage, 3 damage found).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`| head`) instead
    // of panicking on the failed write. Rust sets SIGPIPE to ignored before main.
    // SAFETY: restoring a signal's default disposition, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Restore's and export's 8 MiB read batches are short-lived: with a fixed threshold below
    // them glibc serves them by mmap and returns them at free, instead of raising its threshold
    // until they stay resident in its heaps (restore peaked 24 MB higher at 1 GiB). Above the
    // snapshot's 4 MiB batches, which the heap recycles without page faults.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any thread exists; only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 6 << 20);
    }
    cli::main()
}
