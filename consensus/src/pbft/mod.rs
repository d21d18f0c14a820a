//! Castro–Liskov PBFT with signatures: pre-prepare, prepare and commit with 2f+1
//! matching messages, a watermark window with pipelining, checkpoints with garbage
//! collection and state transfer, and view changes whose new-view message every backup
//! re-checks against the view changes it carries.
//!
//! It implements the same [`Protocol`](crate::Protocol) trait as HotStuff and shares
//! its payload, commit, evidence and signature-set types; what is PBFT's own (orders,
//! prepared and commit certificates, checkpoints, view changes) lives here.

mod core;
mod types;

pub use core::{Config, LOG_INDEX_KEPT, Pbft, Recovery};
pub use types::*;

#[cfg(test)]
mod tests;
