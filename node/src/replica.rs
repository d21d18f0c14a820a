//! The replica runtime: drives a protocol core with verified messages, timers and
//! payloads, and carries out its actions in order: persist (synced) before sending,
//! execute commits, answer clients.
//!
//! Threads: the core, storage and execution run on one tokio task (their order is the
//! protocol's order); signature verification runs on its own thread, so the core never
//! waits on crypto; the transport runs on the tokio runtime.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_consensus::{
    Actions, Event, Height, Input, Outgoing, PayloadRequest, Protocol, Recipient, Round, StoredRecord, Time,
};
use bulwark_crypto::{Committee, Digest, ReplicaId, Verified};
use bulwark_network::{ClientRequest, ReplicaNetwork, ReplySender};
use tokio::sync::{mpsc, watch};

use crate::app::{StateMachine, Transaction};
use crate::executor::Executor;
use crate::mempool::{Admission, Mempool};
use crate::metrics::{Metrics, label};
use crate::storage::{StorageError, Store};
use crate::wire::{
    MAX_BATCH_BYTES, MAX_OP_BYTES, Outcome, Rejection, Reply, Request, RequestKind, client_id_of,
    decode_batch, encode_batch,
};

/// How the runtime batches and paces.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Most transactions per block.
    pub max_batch_txs: usize,
    /// When the mempool is empty, a leader waits this long for transactions before it
    /// proposes an empty block (so an idle committee does not spin).
    pub idle_proposal_delay: Duration,
    pub mempool_max_txs: usize,
    pub mempool_max_bytes: usize,
    /// Replies kept to answer retries of executed requests.
    pub reply_cache: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_batch_txs: 4000,
            idle_proposal_delay: Duration::from_millis(50),
            mempool_max_txs: 200_000,
            mempool_max_bytes: 256 << 20,
            reply_cache: 100_000,
        }
    }
}

/// What `status` shows about a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub round: Round,
    pub leader: Option<ReplicaId>,
    pub height: Height,
    pub state_digest: Digest,
    pub evidence: u64,
    /// Evidence recorded, by offender.
    pub evidence_against: BTreeMap<ReplicaId, u64>,
    /// Peers whose connection from this replica is up (checked every second).
    pub peers_connected: usize,
    /// The Byzantine behaviours this replica runs (test deployments only).
    pub byzantine: Option<String>,
    /// The state digests of the last executed heights (newest last), so replicas can
    /// be compared at one height.
    pub recent_digests: VecDeque<(Height, Digest)>,
}

/// Heights kept in [`Status::recent_digests`].
const RECENT_DIGESTS: usize = 256;

/// How often the gauges kept elsewhere (peer connections and queues, storage size) are
/// refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

type Req = ClientRequest<Request, Reply>;

/// A chain record whose payload is not executed yet: its parent, the height it is
/// about, and the (client, sequence) keys it orders.
type InFlight = (Digest, Height, Vec<(u64, u64)>);

pub struct Runtime<P: Protocol, A: StateMachine> {
    me: ReplicaId,
    core: P,
    store: Store,
    network: ReplicaNetwork<P::Message>,
    executor: Executor<A>,
    mempool: Mempool,
    cfg: RuntimeConfig,
    started: Instant,
    metrics: Arc<Metrics>,
    status: watch::Sender<Status>,
    /// The other replicas, for the per-peer gauges.
    peers: Vec<ReplicaId>,
    /// Where to send the reply of each pending request.
    waiting: HashMap<(u64, u64), Vec<ReplySender<Reply>>>,
    replies: HashMap<(u64, u64), Reply>,
    reply_order: VecDeque<(u64, u64)>,
    /// Transaction keys of stored, not yet executed blocks: digest -> (parent, keys).
    pending_chain: HashMap<Digest, InFlight>,
    /// A payload request waiting for transactions (or for the idle delay).
    payload_wanted: Option<(PayloadRequest, Instant)>,
}

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl<P, A> Runtime<P, A>
where
    P: Protocol + Send + 'static,
    A: StateMachine,
{
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: ReplicaId,
        core: P,
        store: Store,
        network: ReplicaNetwork<P::Message>,
        executor: Executor<A>,
        cfg: RuntimeConfig,
        metrics: Arc<Metrics>,
        status: watch::Sender<Status>,
        peers: Vec<ReplicaId>,
    ) -> Self {
        let mempool = Mempool::new(cfg.mempool_max_txs, cfg.mempool_max_bytes);
        Runtime {
            me,
            core,
            store,
            network,
            executor,
            mempool,
            cfg,
            started: Instant::now(),
            metrics,
            status,
            peers,
            waiting: HashMap::new(),
            replies: HashMap::new(),
            reply_order: VecDeque::new(),
            pending_chain: HashMap::new(),
            payload_wanted: None,
        }
    }

    fn now(&self) -> Time {
        Time(self.started.elapsed().as_millis() as u64)
    }

    /// Runs until `shutdown` fires. `inbound` carries verified replica messages (see
    /// [`spawn_verifier`]), `clients` the client requests.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<(ReplicaId, Verified<P::Message>)>,
        mut clients: mpsc::Receiver<Req>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<ReplicaNetwork<P::Message>, RuntimeError> {
        self.step(Input::Start)?;
        let mut gauges = tokio::time::interval(GAUGE_REFRESH);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.core.next_deadline().map(|t| self.started + Duration::from_millis(t.0));
            let payload_deadline = self.payload_wanted.as_ref().map(|(_, at)| *at);
            let wake = [deadline, payload_deadline].into_iter().flatten().min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = gauges.tick() => self.refresh_gauges(),
                Some((from, msg)) = inbound.recv() => self.step(Input::Message { from, msg })?,
                Some(request) = clients.recv() => {
                    self.on_client(request);
                    // Take whatever else is queued before stepping the core again.
                    while let Ok(request) = clients.try_recv() {
                        self.on_client(request);
                    }
                    self.answer_payload(false)?;
                }
                _ = sleep => {
                    self.answer_payload(true)?;
                    if self.core.next_deadline().is_some_and(|d| d <= self.now()) {
                        self.step(Input::Timeout)?;
                    }
                }
            }
        }
        let snapshot = self.executor.snapshot();
        self.store.save_snapshot(&snapshot)?;
        Ok(self.network)
    }

    /// Feeds one input and everything it leads to.
    fn step(&mut self, input: Input<P::Message, P::Record>) -> Result<(), RuntimeError> {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let now = self.now();
            let actions = self.core.handle(now, input);
            self.apply(actions, &mut inputs)?;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        actions: Actions<P::Message, P::Record>,
        inputs: &mut VecDeque<Input<P::Message, P::Record>>,
    ) -> Result<(), RuntimeError> {
        // 1. Durable before anything leaves (a vote never precedes its safety state).
        tokio::task::block_in_place(|| self.store.persist(&actions.persist))?;
        for record in &actions.persist {
            if let (Some((digest, parent)), Some(payload), Some(height)) =
                (record.chain_link(), record.payload(), record.height())
                && height > self.executor.height()
            {
                let keys = decode_batch(payload).iter().map(|t| (t.client, t.sequence)).collect();
                self.pending_chain.insert(digest, (parent, height, keys));
            }
        }
        // 2. Send.
        for Outgoing { to, msg } in actions.send {
            let _ = match to {
                Recipient::One(id) => self.network.send(id, &msg).map(|_| 1),
                Recipient::AllOthers => self.network.broadcast(&msg),
            };
        }
        // 3. Execute, in log order, and answer clients.
        for block in actions.commit {
            let Some(outcome) = self.executor.execute(&block) else { continue };
            tokio::task::block_in_place(|| self.store.append_log(block.height, block.digest))?;
            self.metrics.blocks_committed.inc();
            self.metrics.height.set(outcome.height.0 as i64);
            self.metrics.transactions_executed.inc_by(outcome.executed.len() as u64);
            self.metrics.duplicate_transactions.inc_by(outcome.duplicates as u64);
            let mut done = HashSet::new();
            for (tx, receipt) in outcome.executed {
                let key = (tx.client, tx.sequence);
                done.insert(key);
                let reply = Reply {
                    client: tx.client,
                    sequence: tx.sequence,
                    replica: self.me,
                    height: outcome.height,
                    outcome: Outcome::Executed(receipt.0),
                };
                for sender in self.waiting.remove(&key).unwrap_or_default() {
                    let _ = sender.send(&reply);
                }
                self.remember_reply(key, reply);
            }
            self.mempool.remove_executed(&done);
            // What the executed log covers is no longer in flight (abandoned forks too).
            let executed = self.executor.height();
            self.pending_chain.retain(|_, (_, height, _)| *height > executed);
            if self.executor.snapshot_due() {
                let snapshot = self.executor.snapshot();
                tokio::task::block_in_place(|| self.store.save_snapshot(&snapshot))?;
            }
            self.status.send_modify(|s| {
                s.height = outcome.height;
                s.state_digest = outcome.state_digest;
                s.recent_digests.push_back((outcome.height, outcome.state_digest));
                if s.recent_digests.len() > RECENT_DIGESTS {
                    s.recent_digests.pop_front();
                }
            });
            inputs.push_back(Input::Executed { height: outcome.height, state_digest: outcome.state_digest });
        }
        self.metrics.mempool_depth.set(self.mempool.len() as i64);
        // 4. Payloads and loads.
        if let Some(request) = actions.want_payload {
            self.payload_wanted = Some((request, Instant::now() + self.cfg.idle_proposal_delay));
            if !self.mempool.is_empty()
                && let Some(input) = self.take_payload()
            {
                inputs.push_back(input);
            }
        }
        for request in actions.load {
            let records = tokio::task::block_in_place(|| {
                self.store.chain_ending_at(request.key, request.max as usize)
            })?;
            inputs.push_back(Input::Loaded { request, records });
        }
        // 5. Evidence and events.
        for evidence in actions.evidence {
            self.metrics.evidence.inc();
            let labels = vec![
                ("offender".to_string(), evidence.offender.to_string()),
                ("kind".to_string(), format!("{:?}", evidence.kind)),
            ];
            self.metrics.evidence_against.get_or_create(&labels).inc();
            tracing::warn!(offender = %evidence.offender, round = %evidence.round, kind = ?evidence.kind, "misbehaviour evidence");
            self.status.send_modify(|s| {
                s.evidence += 1;
                *s.evidence_against.entry(evidence.offender).or_default() += 1;
            });
        }
        for event in actions.events {
            self.on_event(event);
        }
        Ok(())
    }

    fn refresh_gauges(&mut self) {
        let connected = self.peers.iter().filter(|p| self.network.is_connected(**p)).count();
        self.metrics.peers_connected.set(connected as i64);
        for peer in &self.peers {
            let labels = label("peer", &peer.to_string());
            let queued = self.network.queue_len(*peer).unwrap_or(0);
            self.metrics.peer_queue_depth.get_or_create(&labels).set(queued as i64);
            let dropped = self.network.dropped(*peer).unwrap_or(0);
            let counter = self.metrics.peer_queue_dropped.get_or_create(&labels);
            counter.inc_by(dropped.saturating_sub(counter.get()));
        }
        self.metrics.storage_bytes.set(i64::try_from(self.store.size_bytes()).unwrap_or(i64::MAX));
        self.status.send_if_modified(|s| {
            let changed = s.peers_connected != connected;
            s.peers_connected = connected;
            changed
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::EnteredRound { round, leader, via_timeout } => {
                self.metrics.round.set(round.0 as i64);
                self.metrics.leader.set(i64::from(leader.0));
                if via_timeout {
                    self.metrics.view_changes.inc();
                }
                self.status.send_modify(|s| {
                    s.round = round;
                    s.leader = Some(leader);
                });
            }
            Event::QuorumCertificate { .. } => {
                self.metrics.quorum_certificates.inc();
            }
            Event::TimeoutCertificate { .. } => {
                self.metrics.timeout_certificates.inc();
            }
            Event::StateDigestMismatch { height, ours, claimed, proposer } => {
                self.metrics.digest_mismatches.inc();
                tracing::error!(%height, %ours, %claimed, %proposer, "execution diverged from a proposer's claim");
            }
            Event::Refused { reason, .. } => {
                self.metrics.refused_messages.get_or_create(&label("reason", reason)).inc();
            }
            Event::SyncRequested { .. } => {}
        }
    }

    /// Answers a waiting payload request if there are transactions, or if `idle_due`
    /// and its idle delay passed.
    fn answer_payload(&mut self, idle_due: bool) -> Result<(), RuntimeError> {
        let Some((_, at)) = self.payload_wanted else { return Ok(()) };
        if self.mempool.is_empty() && !(idle_due && Instant::now() >= at) {
            return Ok(());
        }
        if let Some(input) = self.take_payload() {
            self.step(input)?;
        }
        Ok(())
    }

    fn take_payload(&mut self) -> Option<Input<P::Message, P::Record>> {
        let (request, _) = self.payload_wanted.take()?;
        // Leave out what the chain being extended already orders.
        let mut exclude = HashSet::new();
        let mut cursor = request.parent;
        while cursor != self.executor.last_block() {
            let Some((parent, _, keys)) = self.pending_chain.get(&cursor) else { break };
            exclude.extend(keys.iter().copied());
            cursor = *parent;
        }
        let batch: Vec<Transaction> = self.mempool.batch(&exclude, self.cfg.max_batch_txs, MAX_BATCH_BYTES);
        self.metrics.batch_transactions.inc_by(batch.len() as u64);
        Some(Input::Payload { round: request.round, payload: encode_batch(&batch) })
    }

    fn reject(&self, sender: &ReplySender<Reply>, request: &Request, rejection: Rejection, reason: &str) {
        self.metrics.refused_requests.get_or_create(&label("reason", reason)).inc();
        let reply = Reply {
            client: request.client,
            sequence: request.sequence,
            replica: self.me,
            height: self.executor.height(),
            outcome: Outcome::Rejected(rejection),
        };
        let _ = sender.send(&reply);
    }

    fn on_client(&mut self, incoming: Req) {
        let ClientRequest { client, request, reply } = incoming;
        if request.op.len() > MAX_OP_BYTES {
            let rejection = Rejection::TooLarge { len: request.op.len(), limit: MAX_OP_BYTES };
            return self.reject(&reply, &request, rejection, "too_large");
        }
        if let Some(key) = client.key
            && client_id_of(&key) != request.client
        {
            let rejection = Rejection::WrongClientId { claimed: request.client };
            return self.reject(&reply, &request, rejection, "wrong_client_id");
        }
        match request.kind {
            RequestKind::LocalRead => {
                let outcome = match self.executor.app().query(&request.op) {
                    Ok(result) => Outcome::Read(result),
                    Err(e) => {
                        return self.reject(
                            &reply,
                            &request,
                            Rejection::Malformed(e.to_string()),
                            "malformed_query",
                        );
                    }
                };
                let answer = Reply {
                    client: request.client,
                    sequence: request.sequence,
                    replica: self.me,
                    height: self.executor.height(),
                    outcome,
                };
                let _ = reply.send(&answer);
            }
            RequestKind::Ordered => {
                if let Err(reason) = self.executor.app().admit(&request.op) {
                    return self.reject(&reply, &request, Rejection::Malformed(reason), "invalid_operation");
                }
                let key = (request.client, request.sequence);
                if let Some(done) = self.replies.get(&key) {
                    let _ = reply.send(done);
                    return;
                }
                if self.executor.too_old(request.client, request.sequence) {
                    return self.reject(
                        &reply,
                        &request,
                        Rejection::TooOld { sequence: request.sequence },
                        "replay",
                    );
                }
                if self.executor.was_executed(request.client, request.sequence) {
                    // Executed, but its reply is no longer cached: nothing to re-send.
                    return self.reject(
                        &reply,
                        &request,
                        Rejection::TooOld { sequence: request.sequence },
                        "replay",
                    );
                }
                let tx = Transaction {
                    client: request.client,
                    sequence: request.sequence,
                    op: request.op.clone(),
                };
                match self.mempool.add(tx) {
                    Admission::Accepted | Admission::Duplicate => {
                        let senders = self.waiting.entry(key).or_default();
                        if senders.len() < 4 {
                            senders.push(reply);
                        }
                    }
                    Admission::Full => self.reject(&reply, &request, Rejection::Busy, "busy"),
                }
            }
        }
    }

    fn remember_reply(&mut self, key: (u64, u64), reply: Reply) {
        if self.replies.insert(key, reply).is_none() {
            self.reply_order.push_back(key);
        }
        while self.reply_order.len() > self.cfg.reply_cache {
            if let Some(old) = self.reply_order.pop_front() {
                self.replies.remove(&old);
            }
        }
    }
}

/// Verifies replica messages on a thread of its own (signatures and digests never run
/// on the core's task). Messages that fail are counted by reason and dropped.
pub fn spawn_verifier<M>(
    mut raw: mpsc::Receiver<(ReplicaId, M)>,
    committee: Arc<Committee>,
    metrics: Arc<Metrics>,
) -> mpsc::Receiver<(ReplicaId, Verified<M>)>
where
    M: bulwark_consensus::WireMessage,
{
    let (verified_tx, verified_rx) = mpsc::channel(4096);
    std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || {
            while let Some((from, msg)) = raw.blocking_recv() {
                match Verified::check(msg, &committee) {
                    Ok(verified) => {
                        if verified_tx.blocking_send((from, verified)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%from, error = %e, "message failed verification");
                        metrics.refused_messages.get_or_create(&label("reason", "verification_failed")).inc();
                    }
                }
            }
        })
        .ok();
    verified_rx
}
