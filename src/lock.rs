//! Cross-process locks on files under `STORE/locks/` (`flock(2)` through std's `File::lock`).
//! The kernel frees a lock when its holder exits, even on SIGKILL, so a crash never leaves a
//! stale lock. Lock order, always: agent → store → index (see store-format.md, "Locks").

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;

const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct LockGuard {
    _file: File,
}

/// What the lock protects, for the error a caller sees when it is busy.
#[derive(Debug, Clone)]
pub(crate) enum Holder {
    Agent(String),
    Store,
    Index,
}

pub(crate) fn acquire(
    path: &Path,
    mode: Mode,
    timeout: Duration,
    holder: Holder,
) -> Result<LockGuard, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let start = Instant::now();
    loop {
        let attempt = match mode {
            Mode::Shared => file.try_lock_shared(),
            Mode::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => {
                return Ok(LockGuard { _file: file });
            }
            Err(TryLockError::WouldBlock) => {
                if start.elapsed() >= timeout {
                    return Err(match holder {
                        Holder::Agent(agent) => Error::AgentBusy {
                            agent,
                            waited: timeout,
                        },
                        Holder::Store | Holder::Index => Error::StoreBusy {
                            path: path.to_path_buf(),
                            waited: timeout,
                        },
                    });
                }
                std::thread::sleep(POLL);
            }
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}
