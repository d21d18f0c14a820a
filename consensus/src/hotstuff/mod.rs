//! Chained HotStuff with the two-chain commit rule and timeout certificates.

mod aggregator;
mod block_tree;
mod core;
mod election;
mod pacemaker;
mod safety;
mod types;

pub use aggregator::{ROUND_WINDOW, TimeoutAggregator, TimeoutOutcome, VoteAggregator, VoteOutcome};
pub use block_tree::{BlockTree, InsertError};
pub use core::{Config, HotStuff, Recovery};
pub use election::LeaderReputation;
pub use pacemaker::{LeaderElection, Pacemaker, RoundRobin, RoundTimer, TimeoutPolicy};
pub use safety::{Refusal, SafetyRules};
pub use types::*;

#[cfg(test)]
mod tests;
