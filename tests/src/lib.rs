//! The deterministic simulator and cross-crate tests.
//!
//! [`sim`] runs a whole committee of real protocol cores in one process under a seeded
//! scheduler that owns time, the network and each replica's disk. One `u64` seed drives
//! every choice; a failure prints the seed and the command that replays it. [`cli`] is
//! the runner's command line, shared by the `sim` binary and `bulwark sim`.

pub mod cli;
pub mod sim;
