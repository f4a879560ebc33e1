//! The records that describe a snapshot: one file per on-disk record type.

pub(crate) mod agent;
pub(crate) mod artifact;
pub(crate) mod file_stats;
pub(crate) mod snapshot;
