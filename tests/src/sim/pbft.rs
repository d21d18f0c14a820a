//! Runs the PBFT core in the simulator, honest or wrapped in Byzantine behaviours.

use bulwark_consensus::hotstuff::TimeoutPolicy;
use bulwark_consensus::pbft::{Config, Message, Pbft, Record, Recovery};
use bulwark_consensus::{Height, Protocol, Round};
use bulwark_crypto::Committee;

use super::{App, Harness, ReplicaSetup, SimKeys};

/// A PBFT replica as the simulator holds it: honest, or a Byzantine wrapper.
pub type Replica = Box<dyn Protocol<Message = Message, Record = Record>>;

/// Builds PBFT replicas with deterministic test keys.
pub struct PbftHarness {
    keys: SimKeys,
    pub timeouts: TimeoutPolicy,
    pub pipeline: u64,
}

impl PbftHarness {
    pub fn new(nodes: usize) -> PbftHarness {
        PbftHarness {
            keys: SimKeys::new(nodes),
            timeouts: TimeoutPolicy { base_ms: 500, max_ms: 8_000 },
            pipeline: 4,
        }
    }
}

impl Harness for PbftHarness {
    type P = Replica;

    fn committee(&self) -> &Committee {
        &self.keys.committee
    }

    fn replica(&self, setup: &ReplicaSetup<'_>, disk: &[Record], app: &App) -> Replica {
        let id = setup.id;
        let cfg = Config {
            id,
            committee: self.keys.committee.clone(),
            key: self.keys.key(id),
            timeouts: self.timeouts,
            pipeline: self.pipeline,
        };
        let mut recovery = Recovery {
            executed: app.height,
            executed_state: app.state_digest,
            executed_log: (app.height > Height(0)).then_some(app.last_block),
            ..Recovery::default()
        };
        for record in disk {
            match record {
                Record::Safety(s) => recovery.safety = Some(s.clone()),
                other => recovery.records.push(other.clone()),
            }
        }
        self.keys.deploy(setup, Pbft::recover(cfg, recovery))
    }

    fn message_round(&self, msg: &Message) -> Option<Round> {
        msg.view()
    }

    /// Only the primary orders, so an idle one proposes an empty batch (a heartbeat
    /// that keeps the backups from changing views) after this long, not at once.
    /// A request can be ordered at two sequence numbers by honest primaries: one
    /// pre-prepared in a view whose new view left it out (it had not prepared at the
    /// replicas whose view changes were used), ordered again by the next primary,
    /// and both carried into a later view. Execution skips the second (as the node's
    /// client sessions do), so integrity is checked on what executes.
    fn strict_integrity(&self) -> bool {
        false
    }

    fn payload_hold_ms(&self) -> u64 {
        self.timeouts.base_ms * 2 / 5
    }
}
