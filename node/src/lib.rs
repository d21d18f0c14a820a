//! The Bulwark replica: runtime, RocksDB storage, mempool, execution, applications,
//! the client protocol and library, and metrics.

pub mod app;
pub mod batch_log;
pub mod bench;
pub mod client;
pub mod config;
pub mod executor;
pub mod mempool;
pub mod metrics;
pub mod node;
pub mod replica;
pub mod reply_cache;
pub mod state_transfer;
pub mod status;
pub mod storage;
pub mod testnet;
pub mod wire;

/// Hash maps and sets on the per-transaction paths (replies, sessions, the mempool, the
/// client's tallies). Their keys (client ids, sequence numbers, digests) are chosen by
/// clients and peers, so the hasher stays keyed at random per process (aHash), at a
/// fraction of the default SipHash's cost.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, ahash::RandomState>;
