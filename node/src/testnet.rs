//! Local testnets: keys, committee and per-node configs in one directory, and the
//! client's view of where replicas listen.

use std::path::{Path, PathBuf};

use bulwark_crypto::{Committee, KeyPair};
use serde::{Deserialize, Serialize};

use crate::config::{ConsensusSection, NodeConfig, RuntimeSection};
use crate::node::AppKind;

/// Where a client finds the replicas: `client.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub committee: PathBuf,
    #[serde(rename = "replica")]
    pub replicas: Vec<ClientEndpointEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEndpointEntry {
    pub id: u16,
    pub client_address: String,
    #[serde(default)]
    pub metrics_address: Option<String>,
}

/// Port layout of a local testnet from `base`: replicas `base + i`, clients
/// `base + 100 + i`, metrics `base + 200 + i`.
pub fn ports(base: u16, i: usize) -> (u16, u16, u16) {
    let i = i as u16;
    (base + i, base + 100 + i, base + 200 + i)
}

pub fn node_config_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{i}.toml"))
}

/// Writes a testnet of `n` replicas into `dir` (which must not hold one yet): test keys
/// (marked), `committee.toml`, `node{i}.toml` and `client.toml`.
pub fn init(dir: &Path, n: usize, base_port: u16, name: &str, app: AppKind) -> anyhow::Result<()> {
    anyhow::ensure!(n >= 4, "a committee needs at least 4 replicas");
    anyhow::ensure!(!dir.join("committee.toml").exists(), "{} already holds a testnet", dir.display());
    std::fs::create_dir_all(dir)?;
    let keys: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate()).collect();
    let committee = Committee::from_keys(name, &keys, |i| format!("127.0.0.1:{}", ports(base_port, i).0))?;
    std::fs::write(
        dir.join("committee.toml"),
        format!("# Bulwark committee: every replica and client uses the same file.\n{}", committee.to_toml()),
    )?;
    let mut client = ClientConfig { committee: "committee.toml".into(), replicas: Vec::new() };
    for (i, key) in keys.iter().enumerate() {
        let (_, client_port, metrics_port) = ports(base_port, i);
        key.write_test_key_file(&dir.join(format!("node{i}.key")))?;
        let config = NodeConfig {
            id: i as u16,
            committee: "committee.toml".into(),
            key: format!("node{i}.key").into(),
            data_dir: format!("data/node{i}").into(),
            client_address: format!("127.0.0.1:{client_port}"),
            metrics_address: Some(format!("127.0.0.1:{metrics_port}")),
            test_keys: true,
            app,
            consensus: ConsensusSection::default(),
            runtime: RuntimeSection::default(),
        };
        std::fs::write(
            node_config_path(dir, i),
            format!("# Replica {i} of a local testnet (test keys).\n{}", toml::to_string(&config)?),
        )?;
        client.replicas.push(ClientEndpointEntry {
            id: i as u16,
            client_address: config.client_address.clone(),
            metrics_address: config.metrics_address.clone(),
        });
    }
    std::fs::write(dir.join("client.toml"), toml::to_string(&client)?)?;
    Ok(())
}
