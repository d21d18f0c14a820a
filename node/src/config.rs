//! A replica's TOML configuration, validated with errors that name the file and field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_consensus::ProtocolKind;
use bulwark_consensus::byzantine::Behaviours;
use bulwark_consensus::hotstuff::TimeoutPolicy;
use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bulwark_network::NetworkConfig;
use serde::{Deserialize, Serialize};

use crate::node::{AppKind, ReplicaSettings};
use crate::replica::RuntimeConfig;

/// `node.toml`. Relative paths are relative to the directory of the config file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This replica's id in the committee.
    pub id: u16,
    /// The committee file every replica shares.
    pub committee: PathBuf,
    /// This replica's ed25519 key file (mode 0600).
    pub key: PathBuf,
    /// Where RocksDB keeps the log, the safety state and snapshots.
    pub data_dir: PathBuf,
    /// `host:port` where clients connect (QUIC).
    pub client_address: String,
    /// `host:port` serving Prometheus metrics on `/metrics`; omit to disable.
    #[serde(default)]
    pub metrics_address: Option<String>,
    /// Must be true to run with keys marked as test keys (local testnets only).
    #[serde(default)]
    pub test_keys: bool,
    /// The replicated application: "kv" (default) or "ledger".
    #[serde(default)]
    pub app: AppKind,
    /// TEST ONLY. Runs this replica as a deliberately malicious one: its honest core
    /// wrapped in the named Byzantine behaviours (`equivocate`, `silent`, `double-vote`,
    /// ..., several joined with `+`; see `bulwark_consensus::byzantine`). Refused
    /// unless `test_keys = true`, so a production replica can never be configured to
    /// misbehave. `bulwark testnet run --byzantine ID:BEHAVIOUR` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<String>,
    #[serde(default)]
    pub consensus: ConsensusSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusSection {
    /// First round timeout; doubles with each failed round.
    pub base_timeout_ms: u64,
    /// Longest round timeout.
    pub max_timeout_ms: u64,
}

impl Default for ConsensusSection {
    fn default() -> Self {
        ConsensusSection { base_timeout_ms: 1000, max_timeout_ms: 10_000 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Most transactions per block.
    pub max_batch_txs: usize,
    /// How long an idle leader waits for transactions before proposing an empty block.
    pub idle_proposal_delay_ms: u64,
    /// Pending transactions kept before clients are told to back off.
    pub mempool_max_txs: usize,
    /// Application snapshot interval, in blocks. Replicas offer their latest snapshot
    /// to lagging peers, who need f + 1 identical offers: use one value per committee.
    pub snapshot_every: u64,
    /// A replica more than this many blocks behind a snapshot f + 1 peers offer
    /// installs it instead of replaying the blocks.
    pub state_transfer_lag: u64,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        let runtime = RuntimeConfig::default();
        RuntimeSection {
            max_batch_txs: runtime.max_batch_txs,
            idle_proposal_delay_ms: runtime.idle_proposal_delay.as_millis() as u64,
            mempool_max_txs: runtime.mempool_max_txs,
            snapshot_every: 4000,
            state_transfer_lag: runtime.state_transfer_lag,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("config file {path}: field `{field}`: {reason}")]
    Field { path: String, field: &'static str, reason: String },
}

/// The protocol a committee file names (`protocol = "hotstuff"` or `"pbft"` at its top;
/// HotStuff when absent). The rest of the file is the committee itself.
pub fn committee_protocol(path: &Path) -> Result<ProtocolKind, String> {
    #[derive(serde::Deserialize)]
    struct ProtocolKey {
        #[serde(default)]
        protocol: ProtocolKind,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key: ProtocolKey =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    Ok(key.protocol)
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Invalid { path: path.display().to_string(), reason: e.to_string() })
    }

    /// The data directory of the config file at `path` (relative paths are resolved
    /// against the file's directory).
    pub fn data_dir(&self, path: &Path) -> PathBuf {
        path.parent().unwrap_or(Path::new(".")).join(&self.data_dir)
    }

    /// Resolves paths, loads the committee and the key, and checks they fit together.
    pub fn settings(&self, path: &Path) -> Result<ReplicaSettings, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let file = path.display().to_string();
        let field =
            |field: &'static str, reason: String| ConfigError::Field { path: file.clone(), field, reason };
        let committee = Committee::from_file(&base.join(&self.committee))
            .map_err(|e| field("committee", e.to_string()))?;
        let protocol = committee_protocol(&base.join(&self.committee)).map_err(|e| field("committee", e))?;
        let id = ReplicaId(self.id);
        let member = committee
            .member(id)
            .ok_or_else(|| field("id", format!("replica {id} is not in the committee")))?;
        let (key, test_key) =
            KeyPair::read_key_file(&base.join(&self.key)).map_err(|e| field("key", e.to_string()))?;
        if test_key && !self.test_keys {
            return Err(field(
                "key",
                "is a test key (not secret); set `test_keys = true` only for local testnets".into(),
            ));
        }
        if member.public_key != key.public() {
            return Err(field("key", format!("does not match replica {id}'s public key in the committee")));
        }
        if self.consensus.base_timeout_ms == 0
            || self.consensus.max_timeout_ms < self.consensus.base_timeout_ms
        {
            return Err(field("consensus", "need 0 < base_timeout_ms <= max_timeout_ms".into()));
        }
        if self.runtime.max_batch_txs == 0 || self.runtime.mempool_max_txs == 0 {
            return Err(field("runtime", "batch and mempool sizes must be positive".into()));
        }
        let byzantine = match &self.byzantine {
            None => None,
            Some(_) if !self.test_keys => {
                return Err(field(
                    "byzantine",
                    "a deliberately malicious replica is for test deployments only (needs `test_keys = true`)"
                        .into(),
                ));
            }
            Some(text) => Some(text.parse::<Behaviours>().map_err(|e| field("byzantine", e.to_string()))?),
        };
        Ok(ReplicaSettings {
            id,
            protocol,
            committee,
            key,
            data_dir: self.data_dir(path),
            client_address: self.client_address.clone(),
            metrics_address: self.metrics_address.clone(),
            network: NetworkConfig::default(),
            runtime: RuntimeConfig {
                max_batch_txs: self.runtime.max_batch_txs,
                idle_proposal_delay: Duration::from_millis(self.runtime.idle_proposal_delay_ms),
                mempool_max_txs: self.runtime.mempool_max_txs,
                state_transfer_lag: self.runtime.state_transfer_lag,
                ..RuntimeConfig::default()
            },
            timeouts: TimeoutPolicy {
                base_ms: self.consensus.base_timeout_ms,
                max_ms: self.consensus.max_timeout_ms,
            },
            snapshot_every: self.runtime.snapshot_every,
            app: self.app,
            byzantine,
        })
    }
}
