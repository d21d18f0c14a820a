//! The deterministic simulator: n replicas of a real protocol core in one process,
//! under a seeded scheduler that owns time, the network (delay, loss, duplication,
//! reordering, partitions healing at GST), a disk per replica, crashes and restarts,
//! clients and a small deterministic application. It is generic over the protocol:
//! anything implementing [`Protocol`] runs here through a [`Harness`].

mod app;
mod checker;
mod config;
mod hotstuff;
mod network;
mod pbft;
mod runner;
mod twins;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bulwark_consensus::byzantine::Behaviours;
use bulwark_consensus::{
    Actions, Evidence, Input, LoadRequest, Outgoing, PayloadRequest, Protocol, Recipient, Round,
    StoredRecord, Time, WireMessage,
};
use bulwark_crypto::{Committee, Digest, Hasher, ReplicaId, Verified, codec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use app::{App, MAX_TXS_PER_BLOCK, Mempool, decode_payload, encode_payload};
pub use checker::{Checker, Violation};
pub use config::{ClientModel, Profile, SimConfig};
pub use hotstuff::{HotStuffHarness, ScenarioLeaders};
pub use network::{NetworkModel, Partition};
pub use pbft::PbftHarness;

pub use runner::{Faults, RunSpec, Sweep, run_hotstuff, run_hotstuff_seed, run_pbft, run_scenario, sweep};
pub use twins::{TwinsRound, TwinsScenario};

/// Builds replicas of one protocol for the simulator.
pub trait Harness {
    type P: Protocol;
    fn committee(&self) -> &Committee;
    /// A replica started fresh (empty `disk`) or restarted from what it persisted and
    /// what its application executed, honest or running `setup.byzantine`.
    fn replica(&self, setup: &ReplicaSetup<'_>, disk: &[<Self::P as Protocol>::Record], app: &App)
    -> Self::P;
    /// The round a message speaks about (Twins partitions messages by round).
    fn message_round(&self, msg: &<Self::P as Protocol>::Message) -> Option<Round>;
    /// How long the host holds a payload request while the mempool has nothing new
    /// (the node waits for transactions or its idle delay); 0 answers at once.
    fn payload_hold_ms(&self) -> u64 {
        0
    }
    /// Whether honest runs check integrity on every ordered transaction, not only on
    /// executed ones: true where honest leaders never order what is already in flight.
    fn strict_integrity(&self) -> bool {
        true
    }
}

/// The deterministic committee and keys every harness builds replicas with.
pub struct SimKeys {
    pub committee: Committee,
    keys: Vec<bulwark_crypto::KeyPair>,
}

impl SimKeys {
    pub fn new(nodes: usize) -> SimKeys {
        let (committee, keys) =
            Committee::deterministic("bulwark-sim", nodes, 7000).unwrap_or_else(|e| panic!("committee: {e}"));
        SimKeys { committee, keys }
    }

    pub fn key(&self, id: ReplicaId) -> bulwark_crypto::KeyPair {
        let position = self.committee.position(id).unwrap_or_default();
        bulwark_crypto::KeyPair::from_seed(*self.keys[position].secret_bytes())
    }

    /// `core` as `setup` says: honest, or wrapped in its Byzantine behaviours.
    pub fn deploy<P>(
        &self,
        setup: &ReplicaSetup<'_>,
        core: P,
    ) -> Box<dyn Protocol<Message = P::Message, Record = P::Record>>
    where
        P: Protocol + 'static,
        P::Message: bulwark_consensus::byzantine::Forgeable,
    {
        debug_assert_eq!(core.id(), setup.id);
        match setup.byzantine {
            None => Box::new(core),
            Some(behaviours) => {
                let forger = bulwark_consensus::byzantine::Forger::new(
                    setup.id,
                    self.key(setup.id),
                    self.committee.clone(),
                    setup.seed,
                );
                Box::new(bulwark_consensus::byzantine::Byzantine::new(core, behaviours.clone(), forger))
            }
        }
    }
}

/// Who a simulated replica instance is and how it behaves.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaSetup<'a> {
    pub id: ReplicaId,
    /// Its behaviours when it is Byzantine.
    pub byzantine: Option<&'a Behaviours>,
    /// Leaders (by position) of rounds 1..=len chosen by a Twins scenario; empty for
    /// the protocol's own leader election.
    pub leaders: &'a [usize],
    /// Drives every choice a Byzantine wrapper makes.
    pub seed: u64,
}

/// What a successful run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub blocks_committed: usize,
    pub blocks_after_gst: usize,
    pub transactions: usize,
    pub messages_delivered: u64,
    pub steps: u64,
    pub simulated_ms: u64,
    pub evidence: usize,
    pub digest_mismatches: usize,
    pub verify_failures: u64,
    /// The first few reasons messages failed verification.
    pub verify_errors: Vec<String>,
    /// Verification failures of messages honest replicas sent (must stay 0).
    pub honest_verify_failures: u64,
    /// Evidence honest replicas recorded: (observer position, evidence), the first
    /// [`EVIDENCE_KEPT`]; `evidence` counts all of it.
    pub evidence_log: Vec<(usize, Evidence)>,
    /// The longest a transaction took to commit after max(submit, GST), in ms.
    pub worst_latency_ms: u64,
    /// A hash of every event in order: equal for equal seeds.
    pub trace_digest: Digest,
}

/// Evidence entries a report keeps.
pub const EVIDENCE_KEPT: usize = 256;

/// A failed run: what, where, the last events and how to replay it.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub time: Time,
    pub violation: Violation,
    pub trace: Vec<String>,
    pub replay: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} violation at seed {} step {} (t = {} ms): {}",
            self.violation.class(),
            self.seed,
            self.step,
            self.time.0,
            self.violation
        )?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: {}", self.replay)
    }
}

enum Event<M> {
    Deliver {
        to: usize,
        from: usize,
        bytes: std::sync::Arc<Vec<u8>>,
        digest: Digest,
        _m: std::marker::PhantomData<M>,
    },
    Timer {
        node: usize,
    },
    Submit {
        tx: u64,
    },
    Crash {
        node: usize,
    },
    ArmCrash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    PayloadDue {
        node: usize,
    },
}

struct ChainEntry {
    parent: Digest,
    txs: Vec<u64>,
    /// Position of the record on the disk.
    record: usize,
}

struct Node<P: Protocol> {
    core: Option<P>,
    /// Chain records in the order persisted, and the one safety record (replaced in
    /// place, as the node's store does).
    disk: Vec<P::Record>,
    safety_at: Option<usize>,
    /// Chain records by digest, for payload exclusion and loads.
    chain: HashMap<Digest, ChainEntry>,
    app: App,
    mempool: Mempool,
    timer_at: Option<Time>,
    crash_at_next_persist: bool,
    /// A payload request held until a transaction arrives or the hold ends.
    payload_wanted: Option<PayloadRequest>,
}

const TRACE_LEN: usize = 48;
/// Verified messages kept for other receivers of the same bytes (cleared when full).
const VERIFY_CACHE_ENTRIES: usize = 4096;

/// One traced event. Messages are kept encoded and only decoded to text on failure.
enum TraceEntry {
    Text(String),
    Deliver { time: Time, from: usize, to: usize, bytes: std::sync::Arc<Vec<u8>> },
}

/// One simulation run.
pub struct Simulation<H: Harness> {
    harness: H,
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: Time,
    seq: u64,
    queue: BTreeMap<(Time, u64), Event<<H::P as Protocol>::Message>>,
    nodes: Vec<Node<H::P>>,
    /// The replica id of each instance (twins share one).
    ids: Vec<ReplicaId>,
    /// Scenario leaders of the first rounds, by position (Twins).
    leaders: Vec<usize>,
    checker: Checker,
    /// Transactions, when first submitted.
    trace: VecDeque<TraceEntry>,
    trace_hash: Hasher,
    next_liveness_check: Time,
    verify_cache: HashMap<Digest, Option<Verified<<H::P as Protocol>::Message>>>,
    /// Rotating clients: where each transaction goes next.
    client_next: HashMap<u64, usize>,
    report: SimReport,
    /// When set, checks integrity on every ordered transaction, not only fresh ones:
    /// honest leaders never re-propose what their ancestors carry.
    pub strict_integrity: bool,
}

impl<H: Harness> Simulation<H> {
    pub fn new(harness: H, cfg: SimConfig) -> Self {
        let members: Vec<ReplicaId> = harness.committee().ids().collect();
        let instances = cfg.twins.as_ref().map_or(cfg.nodes, |t| t.instances(cfg.nodes));
        let member_of = |i: usize| cfg.twins.as_ref().map_or(i, |t| t.member_of(cfg.nodes, i));
        let ids: Vec<ReplicaId> = (0..instances).map(|i| members[member_of(i)]).collect();
        let faulty = cfg.faulty();
        let honest = (0..instances).filter(|i| !faulty.contains(&member_of(*i))).collect();
        let leaders = cfg.twins.as_ref().map(|t| t.leaders()).unwrap_or_default();
        let nodes = (0..instances)
            .map(|_| Node {
                core: None,
                disk: Vec::new(),
                safety_at: None,
                chain: HashMap::new(),
                app: App::default(),
                mempool: Mempool::default(),
                timer_at: None,
                crash_at_next_persist: false,
                payload_wanted: None,
            })
            .collect();
        let checker = Checker { honest, ..Checker::default() };
        // Byzantine leaders may order again what their ancestors carry: then only what
        // is actually executed twice is an integrity violation.
        let strict_integrity = harness.strict_integrity() && cfg.byzantine.is_empty() && cfg.twins.is_none();
        Simulation {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            harness,
            now: Time(0),
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            ids,
            leaders,
            checker,
            trace: VecDeque::new(),
            trace_hash: Hasher::new(),
            next_liveness_check: Time(0),
            verify_cache: HashMap::new(),
            client_next: HashMap::new(),
            report: SimReport { seed: cfg.seed, ..SimReport::default() },
            strict_integrity,
            cfg,
        }
    }

    fn schedule(&mut self, at: Time, event: Event<<H::P as Protocol>::Message>) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn note(&mut self, line: String) {
        self.trace_hash.update(line.as_bytes());
        self.push_trace(TraceEntry::Text(line));
    }

    fn push_trace(&mut self, entry: TraceEntry) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(entry);
    }

    fn trace_lines(&self) -> Vec<String> {
        let limit = <<H::P as Protocol>::Message as WireMessage>::MAX_ENCODED_BYTES;
        self.trace
            .iter()
            .map(|entry| match entry {
                TraceEntry::Text(line) => line.clone(),
                TraceEntry::Deliver { time, from, to, bytes } => {
                    match codec::decode::<<H::P as Protocol>::Message>(bytes, limit) {
                        Ok(msg) => format!("t={} deliver {from}->{to} {:?}", time.0, Summary(&msg)),
                        Err(e) => format!("t={} deliver {from}->{to} undecodable: {e}", time.0),
                    }
                }
            })
            .collect()
    }

    fn fail(&self, violation: Violation) -> Box<SimFailure> {
        Box::new(SimFailure {
            seed: self.cfg.seed,
            step: self.report.steps,
            time: self.now,
            violation,
            trace: self.trace_lines(),
            replay: self.cfg.replay_command(),
        })
    }

    /// Runs the scenario to the end; `Err` on the first violated invariant.
    pub fn run(mut self) -> Result<SimReport, Box<SimFailure>> {
        self.setup();
        while let Some(((at, _), event)) = self.queue.pop_first() {
            self.now = at;
            self.report.steps += 1;
            self.dispatch(event).map_err(|v| self.fail(v))?;
            if self.now >= self.next_liveness_check {
                self.next_liveness_check = self.now.plus_millis(100);
                let gst = self.cfg.network.gst;
                if let Some((tx, deadline)) = self.checker.overdue(self.now, gst, self.cfg.liveness_bound_ms)
                {
                    let detail = format!("tx {tx} not committed by t = {} ms (GST {} ms)", deadline.0, gst.0);
                    return Err(self.fail(Violation::Liveness { detail }));
                }
            }
            if self.finished() {
                break;
            }
            if self.now > self.cfg.max_time {
                let detail = format!(
                    "only {} blocks committed after GST by t = {} ms (need {})",
                    self.checker.blocks_after(self.cfg.network.gst),
                    self.now.0,
                    self.cfg.min_blocks_after_gst
                );
                return Err(self.fail(Violation::Liveness { detail }));
            }
        }
        self.report.blocks_committed = self.checker.log.len();
        self.report.blocks_after_gst = self.checker.blocks_after(self.cfg.network.gst);
        self.report.transactions = self.checker.committed_tx.len();
        self.report.worst_latency_ms = self.checker.worst_latency(self.cfg.network.gst);
        self.report.simulated_ms = self.now.0;
        self.report.trace_digest = self.trace_hash.clone().finalize();
        Ok(self.report)
    }

    fn finished(&self) -> bool {
        self.now > self.cfg.submit_until
            && self.checker.committed_tx.len() == self.cfg.transactions
            && self.checker.blocks_after(self.cfg.network.gst) >= self.cfg.min_blocks_after_gst
    }

    fn setup(&mut self) {
        for node in 0..self.nodes.len() {
            self.schedule(Time(0), Event::Restart { node });
        }
        for tx in 0..self.cfg.transactions as u64 {
            let at = Time(self.rng.gen_range(0..self.cfg.submit_until.0));
            self.schedule(at, Event::Submit { tx });
        }
        for (node, down, up) in self.cfg.crashes.clone() {
            let armed = self.rng.gen_bool(0.5);
            self.schedule(down, if armed { Event::ArmCrash { node } } else { Event::Crash { node } });
            self.schedule(down.plus_millis(200), Event::Crash { node });
            self.schedule(up.max(down.plus_millis(201)), Event::Restart { node });
        }
        if let Some((down, up)) = self.cfg.whole_committee_restart {
            for node in 0..self.nodes.len() {
                // Crash right after the next persist (a vote durable but not sent), or
                // 200 ms later at the latest.
                self.schedule(down, Event::ArmCrash { node });
                self.schedule(down.plus_millis(200), Event::Crash { node });
                self.schedule(up.max(down.plus_millis(201)), Event::Restart { node });
            }
        }
    }

    fn dispatch(&mut self, event: Event<<H::P as Protocol>::Message>) -> Result<(), Violation> {
        match event {
            Event::Deliver { to, from, bytes, digest, .. } => {
                if self.nodes[to].core.is_none() {
                    return Ok(());
                }
                // Verification is pure: a broadcast is decoded and checked once, and each
                // receiver gets a copy of the verified message.
                let verified = match self.verify_cache.get(&digest) {
                    Some(known) => known.clone(),
                    None => {
                        let checked = self.decode_and_verify(&bytes);
                        if self.verify_cache.len() >= VERIFY_CACHE_ENTRIES {
                            self.verify_cache.clear();
                        }
                        self.verify_cache.insert(digest, checked.clone());
                        checked
                    }
                };
                let Some(msg) = verified else {
                    self.count_verify_failure(from);
                    return Ok(());
                };
                self.report.messages_delivered += 1;
                self.trace_hash
                    .update(&self.now.0.to_le_bytes())
                    .update(&[from as u8, to as u8])
                    .update(digest.as_bytes());
                self.push_trace(TraceEntry::Deliver { time: self.now, from, to, bytes });
                let from = self.ids[from];
                self.step(to, Input::Message { from, msg })
            }
            Event::Timer { node } => {
                if self.nodes[node].timer_at != Some(self.now) || self.nodes[node].core.is_none() {
                    return Ok(());
                }
                self.nodes[node].timer_at = None;
                self.note(format!("t={} timer {node}", self.now.0));
                self.step(node, Input::Timeout)
            }
            Event::Submit { tx } => {
                if self.checker.committed_tx.contains_key(&tx) {
                    return Ok(());
                }
                self.checker.submitted.entry(tx).or_insert(self.now);
                let targets: Vec<usize> = match self.cfg.clients {
                    config::ClientModel::RandomReplica => vec![self.rng.gen_range(0..self.nodes.len())],
                    config::ClientModel::Rotating { fanout } => {
                        let instances = self.nodes.len();
                        let start = match self.client_next.get(&tx) {
                            Some(next) => *next,
                            None => self.rng.gen_range(0..instances),
                        };
                        self.client_next.insert(tx, (start + fanout) % instances);
                        (0..fanout.min(instances)).map(|i| (start + i) % instances).collect()
                    }
                };
                for &node in &targets {
                    if self.nodes[node].core.is_some() && !self.nodes[node].app.executed.contains(&tx) {
                        self.nodes[node].mempool.add(tx);
                    }
                }
                self.note(format!("t={} submit tx {tx} to {targets:?}", self.now.0));
                let retry = self.now.plus_millis(self.cfg.client_retry_ms);
                self.schedule(retry, Event::Submit { tx });
                for node in targets {
                    self.answer_held_payload(node, false)?;
                }
                Ok(())
            }
            Event::PayloadDue { node } => self.answer_held_payload(node, true),
            Event::ArmCrash { node } => {
                self.nodes[node].crash_at_next_persist = self.nodes[node].core.is_some();
                Ok(())
            }
            Event::Crash { node } => {
                self.crash(node);
                Ok(())
            }
            Event::Restart { node } => {
                if self.nodes[node].core.is_some() {
                    return Ok(());
                }
                let member = self.harness.committee().position(self.ids[node]).unwrap_or(node);
                let setup = ReplicaSetup {
                    id: self.ids[node],
                    byzantine: self.cfg.byzantine.iter().find(|(b, _)| *b == member).map(|(_, b)| b),
                    leaders: &self.leaders,
                    seed: self.cfg.seed ^ ((node as u64) << 32),
                };
                let core = self.harness.replica(&setup, &self.nodes[node].disk, &self.nodes[node].app);
                self.nodes[node].core = Some(core);
                self.note(format!("t={} start {node} at height {}", self.now.0, self.nodes[node].app.height));
                self.step(node, Input::Start)
            }
        }
    }

    fn decode_and_verify(&mut self, bytes: &[u8]) -> Option<Verified<<H::P as Protocol>::Message>> {
        let limit = <<H::P as Protocol>::Message as WireMessage>::MAX_ENCODED_BYTES;
        let result = codec::decode::<<H::P as Protocol>::Message>(bytes, limit)
            .map_err(|e| format!("decode: {e}"))
            .and_then(|msg| Verified::check(msg, self.harness.committee()).map_err(|e| e.to_string()));
        match result {
            Ok(verified) => Some(verified),
            Err(reason) => {
                if self.report.verify_errors.len() < 8 {
                    self.report.verify_errors.push(reason);
                }
                None
            }
        }
    }

    fn count_verify_failure(&mut self, from: usize) {
        self.report.verify_failures += 1;
        if self.checker.honest.contains(&from) {
            self.report.honest_verify_failures += 1;
        }
    }

    fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.core.take().is_some() {
            n.mempool.clear();
            n.timer_at = None;
            n.crash_at_next_persist = false;
            n.payload_wanted = None;
            self.note(format!("t={} crash {node}", self.now.0));
        }
    }

    /// Feeds one input and carries out the actions, and whatever inputs they lead to.
    fn step(
        &mut self,
        node: usize,
        input: Input<<H::P as Protocol>::Message, <H::P as Protocol>::Record>,
    ) -> Result<(), Violation> {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let now = self.now;
            let Some(core) = self.nodes[node].core.as_mut() else { return Ok(()) };
            let actions = catch_unwind(AssertUnwindSafe(|| core.handle(now, input)))
                .map_err(|panic| Violation::Crash { replica: node, message: panic_message(&panic) })?;
            self.apply(node, actions, &mut inputs)?;
        }
        if let Some(core) = self.nodes[node].core.as_ref() {
            let deadline = core.next_deadline();
            if let Some(at) = deadline
                && self.nodes[node].timer_at != Some(at)
            {
                self.nodes[node].timer_at = Some(at.max(self.now));
                self.schedule(at.max(self.now), Event::Timer { node });
            }
        }
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        node: usize,
        actions: Actions<<H::P as Protocol>::Message, <H::P as Protocol>::Record>,
        inputs: &mut VecDeque<Input<<H::P as Protocol>::Message, <H::P as Protocol>::Record>>,
    ) -> Result<(), Violation> {
        // 1. Persist, durably, before anything leaves.
        let persisted = !actions.persist.is_empty();
        for record in actions.persist {
            let n = &mut self.nodes[node];
            match record.chain_link() {
                Some((digest, parent)) => {
                    let txs = record.payload().map(decode_payload).unwrap_or_default();
                    n.chain.insert(digest, ChainEntry { parent, txs, record: n.disk.len() });
                    n.disk.push(record);
                }
                None => match n.safety_at {
                    Some(at) => n.disk[at] = record,
                    None => {
                        n.safety_at = Some(n.disk.len());
                        n.disk.push(record);
                    }
                },
            }
        }
        if persisted && self.nodes[node].crash_at_next_persist {
            self.crash(node);
            inputs.clear();
            return Ok(());
        }
        // 2. Send.
        for Outgoing { to, msg } in actions.send {
            self.send(node, to, &msg);
        }
        // 3. Execute commits in order.
        for block in actions.commit {
            let app = &mut self.nodes[node].app;
            if block.height <= app.height {
                continue; // re-derived after a restart: executed already
            }
            let previous = app.height;
            let ordered = decode_payload(&block.payload);
            let execution = app.execute(&block);
            let state_digest = app.state_digest;
            for tx in &execution.txs {
                self.nodes[node].mempool.remove(*tx);
            }
            let checked = if self.strict_integrity { ordered } else { execution.txs };
            self.checker.on_execute(
                node,
                previous,
                block.height,
                block.digest,
                state_digest,
                &checked,
                self.now,
            )?;
            self.note(format!(
                "t={} {node} executed height {} ({} txs)",
                self.now.0,
                block.height,
                checked.len()
            ));
            inputs.push_back(Input::Executed { height: block.height, state_digest });
        }
        // 4. Payloads and loads.
        if let Some(request) = actions.want_payload {
            let payload = self.payload_for(node, request);
            let hold = self.harness.payload_hold_ms();
            if hold == 0 || !decode_payload(&payload).is_empty() {
                inputs.push_back(Input::Payload { round: request.round, payload });
            } else {
                self.nodes[node].payload_wanted = Some(request);
                self.schedule(self.now.plus_millis(hold), Event::PayloadDue { node });
            }
        }
        for request in actions.load {
            let records = self.load(node, request);
            inputs.push_back(Input::Loaded { request, records });
        }
        if self.checker.honest.contains(&node) {
            self.report.evidence += actions.evidence.len();
            for evidence in actions.evidence {
                if self.report.evidence_log.len() < EVIDENCE_KEPT {
                    self.report.evidence_log.push((node, evidence));
                }
            }
        }
        self.report.digest_mismatches += actions
            .events
            .iter()
            .filter(|e| matches!(e, bulwark_consensus::Event::StateDigestMismatch { .. }))
            .count();
        Ok(())
    }

    fn send(&mut self, node: usize, to: Recipient, msg: &<H::P as Protocol>::Message) {
        let Ok(bytes) = codec::encode(msg) else { return };
        let digest = Digest::of(&bytes);
        let bytes = std::sync::Arc::new(bytes);
        let sender = self.ids[node];
        let targets: Vec<usize> = match to {
            Recipient::One(id) => (0..self.nodes.len()).filter(|&n| self.ids[n] == id).collect(),
            Recipient::AllOthers => (0..self.nodes.len()).filter(|&n| self.ids[n] != sender).collect(),
        };
        let round = if self.cfg.twins.is_some() { self.harness.message_round(msg) } else { None };
        for target in targets {
            if let Some(twins) = &self.cfg.twins
                && !twins.delivers(node, target, round, self.now)
            {
                continue;
            }
            for at in self.cfg.network.deliveries(&mut self.rng, self.now, node, target) {
                let event = Event::Deliver {
                    to: target,
                    from: node,
                    bytes: bytes.clone(),
                    digest,
                    _m: std::marker::PhantomData,
                };
                self.schedule(at, event);
            }
        }
    }

    /// Answers a held payload request: when the hold ends (`due`), or as soon as the
    /// mempool has something to order.
    fn answer_held_payload(&mut self, node: usize, due: bool) -> Result<(), Violation> {
        let Some(request) = self.nodes[node].payload_wanted else { return Ok(()) };
        let payload = self.payload_for(node, request);
        if !due && decode_payload(&payload).is_empty() {
            return Ok(());
        }
        self.nodes[node].payload_wanted = None;
        self.step(node, Input::Payload { round: request.round, payload })
    }

    /// A payload from the mempool, leaving out what `parent`'s uncommitted ancestors
    /// and the executed log already ordered.
    fn payload_for(&mut self, node: usize, request: PayloadRequest) -> bulwark_consensus::Payload {
        let n = &self.nodes[node];
        let mut exclude: BTreeSet<u64> = n.app.executed.clone();
        let mut cursor = request.parent;
        while cursor != n.app.last_block {
            let Some(entry) = n.chain.get(&cursor) else { break };
            exclude.extend(entry.txs.iter().copied());
            cursor = entry.parent;
        }
        encode_payload(&n.mempool.take(&exclude))
    }

    fn load(&self, node: usize, request: LoadRequest) -> Vec<<H::P as Protocol>::Record> {
        let n = &self.nodes[node];
        let mut out = Vec::new();
        let mut cursor = request.key;
        while out.len() < request.max as usize {
            let Some(entry) = n.chain.get(&cursor) else { break };
            out.push(n.disk[entry.record].clone());
            cursor = entry.parent;
        }
        out
    }
}

struct Summary<'a, M>(&'a M);

impl<M: fmt::Debug> fmt::Debug for Summary<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = format!("{:?}", self.0);
        let cut: String = text.chars().take(120).collect();
        f.write_str(&cut)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}
