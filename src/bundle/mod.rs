//! Portable bundles: the `nexo-memory-snapshot-v1` tar.zst format (store-format.md, "Bundles"),
//! exported from the store, imported into it, verified on their own.

pub(crate) mod crypt;
pub(crate) mod export;
pub(crate) mod frames;
pub(crate) mod import;
pub(crate) mod io;
pub(crate) mod manifest;
pub(crate) mod redact;
