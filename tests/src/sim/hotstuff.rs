//! Runs the HotStuff core in the simulator, honest or wrapped in Byzantine behaviours.

use bulwark_consensus::hotstuff::{
    Block, Config, ExecutionClaim, HotStuff, LeaderElection, LeaderReputation, Message, Record, Recovery,
    RoundRobin, TimeoutPolicy,
};
use bulwark_consensus::{Height, Protocol, Round};
use bulwark_crypto::{Committee, Digest, ReplicaId};

use super::{App, Harness, ReplicaSetup, SimKeys};

/// A HotStuff replica as the simulator holds it: honest, or a Byzantine wrapper.
pub type Replica = Box<dyn Protocol<Message = Message, Record = Record>>;

/// Builds HotStuff replicas with deterministic test keys.
pub struct HotStuffHarness {
    keys: SimKeys,
    pub timeouts: TimeoutPolicy,
}

impl HotStuffHarness {
    pub fn new(nodes: usize) -> HotStuffHarness {
        HotStuffHarness { keys: SimKeys::new(nodes), timeouts: TimeoutPolicy { base_ms: 500, max_ms: 8_000 } }
    }
}

/// Leaders chosen by a Twins scenario for the first rounds, round-robin after.
#[derive(Debug)]
pub struct ScenarioLeaders {
    /// Leaders of rounds 1..=len.
    first: Vec<ReplicaId>,
    then: RoundRobin,
}

impl ScenarioLeaders {
    pub fn new(committee: &Committee, first: &[usize]) -> ScenarioLeaders {
        let ids: Vec<ReplicaId> = committee.ids().collect();
        let first = first.iter().map(|&p| ids[p % ids.len()]).collect();
        ScenarioLeaders { first, then: RoundRobin::new(committee) }
    }
}

impl LeaderElection for ScenarioLeaders {
    fn leader(&self, round: Round) -> ReplicaId {
        match round.0.checked_sub(1).and_then(|i| self.first.get(i as usize)) {
            Some(leader) => *leader,
            None => self.then.leader(round),
        }
    }
}

/// The stored chain ending at `root`, oldest first, as much of it as the leader
/// election wants (what the node reads from its store on restart).
fn committed_chain(blocks: &[Block], root: Digest, committee: &Committee) -> Vec<Block> {
    let by_digest: std::collections::BTreeMap<Digest, &Block> =
        blocks.iter().map(|b| (b.digest(), b)).collect();
    let mut chain = Vec::new();
    let mut cursor = root;
    while chain.len() < LeaderReputation::history_wanted(committee) {
        let Some(block) = by_digest.get(&cursor) else { break };
        chain.push((*block).clone());
        cursor = block.parent;
    }
    chain.reverse();
    chain
}

impl Harness for HotStuffHarness {
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
            recovery.committed = committed_chain(&recovery.blocks, app.last_block, &self.keys.committee);
            recovery.root = recovery.committed.last().cloned();
        }
        let core = if setup.leaders.is_empty() {
            HotStuff::recover(cfg, recovery)
        } else {
            let leaders = Box::new(ScenarioLeaders::new(&self.keys.committee, setup.leaders));
            HotStuff::with_leader_election(cfg, recovery, leaders)
        };
        self.keys.deploy(setup, core)
    }

    fn message_round(&self, msg: &Message) -> Option<Round> {
        msg.round()
    }
}
