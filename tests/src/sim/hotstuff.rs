//! Runs the HotStuff core in the simulator.

use bulwark_consensus::hotstuff::{Block, Config, HotStuff, Record, Recovery, TimeoutPolicy};
use bulwark_consensus::{Height, Protocol as _};
use bulwark_crypto::{Committee, KeyPair, ReplicaId};

use super::{App, Harness};
use bulwark_consensus::hotstuff::ExecutionClaim;

/// Builds HotStuff replicas with deterministic test keys.
pub struct HotStuffHarness {
    committee: Committee,
    keys: Vec<KeyPair>,
    pub timeouts: TimeoutPolicy,
}

impl HotStuffHarness {
    pub fn new(nodes: usize) -> HotStuffHarness {
        let (committee, keys) =
            Committee::deterministic("bulwark-sim", nodes, 7000).unwrap_or_else(|e| panic!("committee: {e}"));
        HotStuffHarness { committee, keys, timeouts: TimeoutPolicy { base_ms: 500, max_ms: 8_000 } }
    }
}

impl Harness for HotStuffHarness {
    type P = HotStuff;

    fn committee(&self) -> &Committee {
        &self.committee
    }

    fn replica(&self, id: ReplicaId, disk: &[Record], app: &App) -> HotStuff {
        let position = self.committee.position(id).unwrap_or_default();
        let cfg = Config {
            id,
            committee: self.committee.clone(),
            key: KeyPair::from_seed(*self.keys[position].secret_bytes()),
            timeouts: self.timeouts,
            sync_batch: 32,
        };
        let mut recovery = Recovery {
            executed: ExecutionClaim { height: app.height, state_digest: app.state_digest },
            ..Recovery::default()
        };
        for record in disk {
            match record {
                Record::Safety(s) => recovery.safety = Some(s.clone()),
                Record::Block(b) => recovery.blocks.push(b.clone()),
            }
        }
        if app.height > Height(0) {
            recovery.root = recovery.blocks.iter().find(|b: &&Block| b.digest() == app.last_block).cloned();
        }
        let core = HotStuff::recover(cfg, recovery);
        debug_assert_eq!(core.id(), id);
        core
    }
}
