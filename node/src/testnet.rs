//! Local testnets: keys, committee and per-node configs in one directory, and the
//! client's view of where replicas listen.

use std::path::{Path, PathBuf};

use bulwark_consensus::ProtocolKind;
use bulwark_consensus::byzantine::Behaviours;
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
pub fn init(
    dir: &Path,
    n: usize,
    base_port: u16,
    name: &str,
    app: AppKind,
    protocol: ProtocolKind,
) -> anyhow::Result<()> {
    anyhow::ensure!(n >= 4, "a committee needs at least 4 replicas");
    anyhow::ensure!(!dir.join("committee.toml").exists(), "{} already holds a testnet", dir.display());
    std::fs::create_dir_all(dir)?;
    let keys: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate()).collect();
    let committee = Committee::from_keys(name, &keys, |i| format!("127.0.0.1:{}", ports(base_port, i).0))?;
    std::fs::write(
        dir.join("committee.toml"),
        format!(
            "# Bulwark committee: every replica and client uses the same file.\n\
             # The consensus protocol every replica runs: \"hotstuff\" or \"pbft\".\n\
             protocol = \"{protocol}\"\n{}",
            committee.to_toml()
        ),
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
            byzantine: None,
            consensus: ConsensusSection::default(),
            runtime: RuntimeSection::default(),
        };
        write_node_config(&node_config_path(dir, i), &config)?;
        client.replicas.push(ClientEndpointEntry {
            id: i as u16,
            client_address: config.client_address.clone(),
            metrics_address: config.metrics_address.clone(),
        });
    }
    std::fs::write(dir.join("client.toml"), toml::to_string(&client)?)?;
    Ok(())
}

/// Writes a testnet node config with its header comment.
pub fn write_node_config(path: &Path, config: &NodeConfig) -> anyhow::Result<()> {
    let mut text = format!("# Replica {} of a local testnet (test keys).\n", config.id);
    if config.byzantine.is_some() {
        text.push_str(
            "# TEST ONLY: `byzantine` makes this replica misbehave on purpose \
             (written by `bulwark testnet run --byzantine`).\n",
        );
    }
    text.push_str(&toml::to_string(config)?);
    std::fs::write(path, text)?;
    Ok(())
}

/// Makes exactly the replicas in `assignments` Byzantine in the testnet of `n` replicas
/// in `dir`: writes `byzantine = "..."` into their configs and removes it from every
/// other config. Refuses ids outside the testnet, an id named twice, and more than f
/// Byzantine replicas unless `force` (beyond f, safety is no longer guaranteed).
pub fn assign_byzantine(
    dir: &Path,
    n: usize,
    assignments: &[(u16, Behaviours)],
    force: bool,
) -> anyhow::Result<()> {
    check_byzantine(n, assignments, force)?;
    for i in 0..n {
        let path = node_config_path(dir, i);
        let mut config = NodeConfig::load(&path)?;
        let wanted = assignments.iter().find(|(id, _)| usize::from(*id) == i).map(|(_, b)| b.to_string());
        if config.byzantine != wanted {
            config.byzantine = wanted;
            write_node_config(&path, &config)?;
        }
    }
    Ok(())
}

/// The checks of [`assign_byzantine`], without touching any file.
pub fn check_byzantine(n: usize, assignments: &[(u16, Behaviours)], force: bool) -> anyhow::Result<()> {
    let f = n.saturating_sub(1) / 3;
    let mut seen = std::collections::BTreeSet::new();
    for (id, _) in assignments {
        anyhow::ensure!(
            usize::from(*id) < n,
            "--byzantine: replica {id} is not in this testnet (ids 0 to {})",
            n.saturating_sub(1)
        );
        anyhow::ensure!(seen.insert(*id), "--byzantine: replica {id} is named twice");
    }
    anyhow::ensure!(
        assignments.len() <= f || force,
        "--byzantine names {} replicas, but a committee of {n} tolerates only f = {f}: \
         honest replicas could diverge (add --force to run it anyway)",
        assignments.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_consensus::byzantine::parse_assignments;

    fn byzantine_of(dir: &Path, n: usize) -> Vec<Option<String>> {
        (0..n).map(|i| NodeConfig::load(&node_config_path(dir, i)).unwrap().byzantine).collect()
    }

    #[test]
    fn byzantine_assignments_are_written_replaced_and_bounded_by_f() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 7, 7000, "byz", AppKind::Kv, ProtocolKind::HotStuff).unwrap();
        let two = parse_assignments("2:equivocate,5:silent").unwrap();
        assign_byzantine(dir.path(), 7, &two, false).unwrap();
        let want = |i: usize| match i {
            2 => Some("equivocate".to_string()),
            5 => Some("silent".to_string()),
            _ => None,
        };
        assert_eq!(byzantine_of(dir.path(), 7), (0..7).map(want).collect::<Vec<_>>());
        // Every written config still loads, with the behaviours.
        let settings = NodeConfig::load(&node_config_path(dir.path(), 2))
            .unwrap()
            .settings(&node_config_path(dir.path(), 2))
            .unwrap();
        assert_eq!(settings.byzantine.map(|b| b.to_string()).as_deref(), Some("equivocate"));

        // A re-run with other assignments removes the old ones.
        assign_byzantine(dir.path(), 7, &parse_assignments("1:double-vote").unwrap(), false).unwrap();
        let now = byzantine_of(dir.path(), 7);
        assert_eq!(now.iter().flatten().count(), 1);
        assert_eq!(now[1].as_deref(), Some("double-vote"));

        // More than f = 2 is refused unless forced, and nothing is written.
        let three = parse_assignments("0:silent,3:silent,4:silent").unwrap();
        let refused = assign_byzantine(dir.path(), 7, &three, false).unwrap_err().to_string();
        assert!(refused.contains("f = 2") && refused.contains("--force"), "{refused}");
        assert_eq!(byzantine_of(dir.path(), 7), now);
        assign_byzantine(dir.path(), 7, &three, true).unwrap();
        assert_eq!(byzantine_of(dir.path(), 7).iter().flatten().count(), 3);

        let unknown = assign_byzantine(dir.path(), 7, &parse_assignments("7:silent").unwrap(), false);
        assert!(unknown.unwrap_err().to_string().contains("replica 7 is not in this testnet"));
        let twice = assign_byzantine(dir.path(), 7, &parse_assignments("1:silent,1:flood").unwrap(), false);
        assert!(twice.unwrap_err().to_string().contains("named twice"));
    }
}
