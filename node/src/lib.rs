//! The Bulwark replica: runtime, RocksDB storage, mempool, execution, applications,
//! the client protocol and library, and metrics.

pub mod app;
pub mod bench;
pub mod client;
pub mod config;
pub mod executor;
pub mod mempool;
pub mod metrics;
pub mod node;
pub mod replica;
pub mod state_transfer;
pub mod status;
pub mod storage;
pub mod testnet;
pub mod wire;
