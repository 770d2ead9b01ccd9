//! Errors that stop the delivery engine from starting (never the outcome of one delivery).

/// A failure to set up delivery.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The DNS resolver could not be configured.
    #[error("cannot configure the DNS resolver: {0}")]
    Resolver(String),
    /// The trust anchors could not be loaded.
    #[error("cannot load delivery.trust_anchors: {0}")]
    Trust(#[from] sealpost_policy::PolicyError),
    /// A `policies.NAME.pins` entry is not 64 hex digits.
    #[error("policies.{policy}.pins: {pin:?} is not a SHA-256 fingerprint (64 hex digits)")]
    BadPin {
        /// The policy's name.
        policy: String,
        /// The entry as written.
        pin: String,
    },
}
