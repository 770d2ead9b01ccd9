//! Sealpost crate (scaffold).
