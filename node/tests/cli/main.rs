//! End-to-end tests of the `bulwark` binary: every replica is a separate process over
//! real QUIC and RocksDB, driven through the commands an operator types.
//!
//! Each test claims its own port range ([`support::Ports`]) and temp dir, so nextest
//! can run them in parallel with everything else.

mod bench;
mod errors;
mod faults;
mod netns;
mod support;
mod testnet;
