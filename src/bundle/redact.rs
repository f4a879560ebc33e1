//! Secret redaction for exported bundles (being written).
