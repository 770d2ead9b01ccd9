//! The Sealpost benchmark: a load generator ([`load`]), a STARTTLS sink ([`sink`]), a bench CA
//! ([`ca`]), Postfix and Sealpost set-ups ([`postfix`], [`relay`]) and the runner that measures
//! them side by side ([`runner`]). The bench domains' DNS server is the test harness's.

pub mod ca;
pub mod client;
pub mod error;
pub mod load;
pub mod mix;
pub mod postfix;
pub mod prefill;
pub mod procfs;
pub mod relay;
pub mod report;
pub mod runner;
pub mod sink;
pub mod stats;
pub mod stream;

pub use error::BenchError;
