//! The committee: who the replicas are, their keys and addresses, and quorum sizes.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Digest, KeyPair, PublicKey};

/// A replica's id within its committee.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct ReplicaId(pub u16);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of one chain (committee): the SHA-256 of its name. Every signature
/// covers it, so a signature made for one committee never verifies for another.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct ChainId(pub Digest);

impl ChainId {
    pub fn from_name(name: &str) -> ChainId {
        ChainId(Digest::of_parts(&[b"bulwark/chain-id/v1\0", name.as_bytes()]))
    }
}

/// One member of the committee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: ReplicaId,
    pub public_key: PublicKey,
    /// `host:port` of its replica-to-replica QUIC endpoint.
    pub address: String,
}

/// A validated committee of n ≥ 4 replicas tolerating f = ⌊(n−1)/3⌋ faults.
///
/// Quorums have n − f members (2f+1 when n = 3f+1), so any two quorums share at least
/// f+1 replicas, one of them honest.
#[derive(Clone, Debug)]
pub struct Committee {
    name: String,
    chain_id: ChainId,
    members: Vec<Member>,
    index: BTreeMap<ReplicaId, usize>,
    by_key: BTreeMap<[u8; 32], ReplicaId>,
}

/// Why a committee description was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitteeError {
    #[error("cannot read committee file {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("committee TOML is malformed: {0}")]
    Toml(String),
    #[error("chain_id must not be empty")]
    EmptyChainId,
    #[error("a committee needs at least 4 replicas (n ≥ 3f+1 with f ≥ 1), got {0}")]
    TooSmall(usize),
    #[error("a committee has at most 65535 replicas, got {0}")]
    TooLarge(usize),
    #[error("replica id {0} appears more than once")]
    DuplicateId(ReplicaId),
    #[error("replicas {0} and {1} have the same public key")]
    DuplicateKey(ReplicaId, ReplicaId),
    #[error("replicas {0} and {1} have the same address {2}")]
    DuplicateAddress(ReplicaId, ReplicaId, String),
    #[error("replica {id}: public_key is not a valid ed25519 key (64 hex characters)")]
    BadKey { id: ReplicaId },
    #[error("replica {id}: address {address:?} is not host:port")]
    BadAddress { id: ReplicaId, address: String },
}

#[derive(Serialize, Deserialize)]
struct CommitteeFile {
    chain_id: String,
    #[serde(rename = "replica")]
    replicas: Vec<MemberFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberFile {
    id: u16,
    public_key: String,
    address: String,
}

impl Committee {
    /// Builds and validates a committee.
    pub fn new(name: &str, mut members: Vec<Member>) -> Result<Committee, CommitteeError> {
        if name.trim().is_empty() {
            return Err(CommitteeError::EmptyChainId);
        }
        if members.len() < 4 {
            return Err(CommitteeError::TooSmall(members.len()));
        }
        if members.len() > usize::from(u16::MAX) {
            return Err(CommitteeError::TooLarge(members.len()));
        }
        members.sort_by_key(|m| m.id);
        let mut index = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        let mut addresses: BTreeMap<&str, ReplicaId> = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            if index.insert(m.id, i).is_some() {
                return Err(CommitteeError::DuplicateId(m.id));
            }
            if let Some(other) = by_key.insert(m.public_key.to_bytes(), m.id) {
                return Err(CommitteeError::DuplicateKey(other, m.id));
            }
            if !is_host_port(&m.address) {
                return Err(CommitteeError::BadAddress { id: m.id, address: m.address.clone() });
            }
            if let Some(other) = addresses.insert(m.address.as_str(), m.id) {
                return Err(CommitteeError::DuplicateAddress(other, m.id, m.address.clone()));
            }
        }
        Ok(Committee { name: name.to_string(), chain_id: ChainId::from_name(name), members, index, by_key })
    }

    /// Parses and validates a committee from TOML text.
    pub fn from_toml(text: &str) -> Result<Committee, CommitteeError> {
        let file: CommitteeFile =
            toml::from_str(text).map_err(|e| CommitteeError::Toml(e.message().to_string()))?;
        let mut seen = HashSet::new();
        let mut members = Vec::with_capacity(file.replicas.len());
        for m in file.replicas {
            let id = ReplicaId(m.id);
            if !seen.insert(id) {
                return Err(CommitteeError::DuplicateId(id));
            }
            let public_key = m.public_key.parse().map_err(|_| CommitteeError::BadKey { id })?;
            members.push(Member { id, public_key, address: m.address });
        }
        Committee::new(&file.chain_id, members)
    }

    /// Reads and validates a committee file.
    pub fn from_file(path: &Path) -> Result<Committee, CommitteeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CommitteeError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        Committee::from_toml(&text)
    }

    /// The committee as TOML, readable by [`Committee::from_toml`].
    pub fn to_toml(&self) -> String {
        let file = CommitteeFile {
            chain_id: self.name.clone(),
            replicas: self
                .members
                .iter()
                .map(|m| MemberFile {
                    id: m.id.0,
                    public_key: m.public_key.to_string(),
                    address: m.address.clone(),
                })
                .collect(),
        };
        toml::to_string(&file).unwrap_or_default()
    }

    /// A committee of `n` replicas with deterministic keys derived from `name`, and
    /// their key pairs. Test keys: for the simulator, tests and marked local testnets.
    pub fn deterministic(
        name: &str,
        n: usize,
        base_port: u16,
    ) -> Result<(Committee, Vec<KeyPair>), CommitteeError> {
        let keys: Vec<KeyPair> = (0..n)
            .map(|i| {
                KeyPair::from_seed(
                    Digest::of_parts(&[b"bulwark/test-key", name.as_bytes(), &(i as u64).to_le_bytes()]).0,
                )
            })
            .collect();
        let committee =
            Committee::from_keys(name, &keys, |i| format!("127.0.0.1:{}", usize::from(base_port) + i))?;
        Ok((committee, keys))
    }

    /// A committee whose replica `i` (id `i`) holds `keys[i]` and listens at `address(i)`.
    pub fn from_keys(
        name: &str,
        keys: &[KeyPair],
        mut address: impl FnMut(usize) -> String,
    ) -> Result<Committee, CommitteeError> {
        let members = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Member { id: ReplicaId(i as u16), public_key: k.public(), address: address(i) })
            .collect();
        Committee::new(name, members)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn chain_id(&self) -> ChainId {
        self.chain_id
    }

    /// Number of replicas.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Faults tolerated: ⌊(n−1)/3⌋.
    pub fn max_faulty(&self) -> usize {
        (self.members.len() - 1) / 3
    }

    /// Signers needed for a quorum certificate: n − f (2f+1 when n = 3f+1).
    pub fn quorum(&self) -> usize {
        self.members.len() - self.max_faulty()
    }

    /// Matching replies that include at least one honest replica: f+1.
    pub fn validity_threshold(&self) -> usize {
        self.max_faulty() + 1
    }

    /// Members in id order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn ids(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.members.iter().map(|m| m.id)
    }

    pub fn member(&self, id: ReplicaId) -> Option<&Member> {
        self.index.get(&id).map(|&i| &self.members[i])
    }

    pub fn public_key(&self, id: ReplicaId) -> Option<&PublicKey> {
        self.member(id).map(|m| &m.public_key)
    }

    /// The position of `id` in id order (0..n), e.g. for bitmaps and leader rotation.
    pub fn position(&self, id: ReplicaId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// The replica that owns `key`, if it is a member.
    pub fn id_of_key(&self, key: &PublicKey) -> Option<ReplicaId> {
        self.by_key.get(&key.to_bytes()).copied()
    }

    pub fn contains(&self, id: ReplicaId) -> bool {
        self.index.contains_key(&id)
    }
}

fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_for(entries: &[(u16, String, &str)]) -> String {
        let mut text = String::from("chain_id = \"test\"\n");
        for (id, key, addr) in entries {
            text.push_str(&format!("[[replica]]\nid = {id}\npublic_key = \"{key}\"\naddress = \"{addr}\"\n"));
        }
        text
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|_| KeyPair::generate().public().to_string()).collect()
    }

    #[test]
    fn valid_committee_round_trips_and_has_quorums() {
        for (n, f) in [(4, 1), (5, 1), (7, 2), (10, 3)] {
            let (c, _) = Committee::deterministic("local", n, 7000).unwrap();
            assert_eq!((c.size(), c.max_faulty(), c.validity_threshold()), (n, f, f + 1));
            assert_eq!(c.quorum(), n - f);
            // Any two quorums intersect in at least f+1 replicas.
            assert!(2 * c.quorum() - n > f);
            let again = Committee::from_toml(&c.to_toml()).unwrap();
            assert_eq!(again.members(), c.members());
            assert_eq!(again.chain_id(), c.chain_id());
        }
        let (c, _) = Committee::deterministic("local", 7, 7000).unwrap();
        assert_eq!(c.quorum(), 5);
    }

    #[test]
    fn duplicate_id_is_refused() {
        let k = keys(4);
        let text = toml_for(&[
            (0, k[0].clone(), "a:1"),
            (1, k[1].clone(), "a:2"),
            (1, k[2].clone(), "a:3"),
            (3, k[3].clone(), "a:4"),
        ]);
        let err = Committee::from_toml(&text).unwrap_err();
        assert_eq!(err, CommitteeError::DuplicateId(ReplicaId(1)));
        assert!(err.to_string().contains("replica id 1 appears more than once"));
    }

    #[test]
    fn duplicate_key_and_address_are_refused() {
        let k = keys(4);
        let text = toml_for(&[
            (0, k[0].clone(), "a:1"),
            (1, k[1].clone(), "a:2"),
            (2, k[1].clone(), "a:3"),
            (3, k[3].clone(), "a:4"),
        ]);
        assert_eq!(
            Committee::from_toml(&text).unwrap_err(),
            CommitteeError::DuplicateKey(ReplicaId(1), ReplicaId(2))
        );
        let text = toml_for(&[
            (0, k[0].clone(), "a:1"),
            (1, k[1].clone(), "a:2"),
            (2, k[2].clone(), "a:2"),
            (3, k[3].clone(), "a:4"),
        ]);
        assert!(matches!(Committee::from_toml(&text).unwrap_err(), CommitteeError::DuplicateAddress(..)));
    }

    #[test]
    fn fewer_than_four_is_refused() {
        let k = keys(3);
        let text = toml_for(&[(0, k[0].clone(), "a:1"), (1, k[1].clone(), "a:2"), (2, k[2].clone(), "a:3")]);
        let err = Committee::from_toml(&text).unwrap_err();
        assert_eq!(err, CommitteeError::TooSmall(3));
        assert!(err.to_string().contains("at least 4"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let k = keys(4);
        let bad_key = toml_for(&[
            (0, "abcd".into(), "a:1"),
            (1, k[1].clone(), "a:2"),
            (2, k[2].clone(), "a:3"),
            (3, k[3].clone(), "a:4"),
        ]);
        assert_eq!(Committee::from_toml(&bad_key).unwrap_err(), CommitteeError::BadKey { id: ReplicaId(0) });
        let bad_addr = toml_for(&[
            (0, k[0].clone(), "nohost"),
            (1, k[1].clone(), "a:2"),
            (2, k[2].clone(), "a:3"),
            (3, k[3].clone(), "a:4"),
        ]);
        assert!(matches!(Committee::from_toml(&bad_addr).unwrap_err(), CommitteeError::BadAddress { .. }));
        assert!(matches!(Committee::from_toml("chain_id = 5").unwrap_err(), CommitteeError::Toml(_)));
    }
}
