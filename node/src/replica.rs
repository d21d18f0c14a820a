//! The replica runtime: drives a protocol core with verified messages, timers and
//! payloads, and carries out its actions in order: persist (synced) before sending,
//! execute commits, answer clients.
//!
//! Transactions travel in batches: each replica seals its clients' transactions into
//! batches and sends them to every peer; block payloads name batches by digest. A
//! message whose payload names a batch this replica lacks is held, and the batch
//! fetched (from the sender, then from everyone), before the core sees the message, so
//! the core never votes for, stores or commits a block whose transactions this replica
//! cannot execute; batches are written to the store with the first record naming them.
//!
//! Threads: the core, storage and execution run on one tokio task (their order is the
//! protocol's order); signature verification, batch hashing and decoding run on their
//! own thread, so the core never waits on crypto; the transport runs on the tokio
//! runtime.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulwark_consensus::{
    Actions, CommittedBlock, Event, Height, Input, Outgoing, PayloadRequest, Protocol, Recipient, Round,
    StoredRecord, Time, WireMessage,
};
use bulwark_crypto::{Committee, Digest, ReplicaId, Verified, codec};
use bulwark_network::{Charge, ClientRequest, ReplicaNetwork, ReplySender};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::FastMap;
use crate::app::{StateMachine, Transaction};
use crate::executor::{Executor, checked_batch};
use crate::mempool::{Admission, BatchAdmission, Mempool, MempoolLimits};
use crate::metrics::{Metrics, label};
use crate::reply_cache::ReplyCache;
use crate::state_transfer::{ChunkOutcome, Fetch, Received, StateTransfer};
use crate::storage::{StorageError, Store, StoredSnapshot};
use crate::wire::{
    MAX_BLOCK_BATCHES, MAX_FETCH_BATCHES, MAX_OP_BYTES, Outcome, PeerMessage, Rejection, Replies, Reply,
    Request, RequestKind, SNAPSHOT_CHUNK_BYTES, SnapshotChunk, SnapshotFetch, SnapshotInfo, batch_digest,
    client_id_of, decode_batch, decode_block_payload, encode_block_payload, is_keyed_client_id,
    snapshot_digest,
};

/// How the runtime batches and paces.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Most transactions per batch.
    pub max_batch_txs: usize,
    /// A batch is sealed at this many encoded bytes ...
    pub batch_bytes: usize,
    /// ... or this long after its first transaction (or at once when this replica
    /// leads and wants a payload).
    pub batch_delay: Duration,
    /// Most batches one block orders ...
    pub max_block_batches: usize,
    /// ... and most batch bytes.
    pub max_block_bytes: usize,
    /// When the mempool is empty, a leader waits this long for transactions before it
    /// proposes an empty block (so an idle committee does not spin).
    pub idle_proposal_delay: Duration,
    /// This replica's own pending transactions, in count and bytes.
    pub mempool_max_txs: usize,
    pub mempool_max_bytes: usize,
    /// Pending bytes of the batches of one peer (a flooding peer's extra batches are
    /// refused).
    pub peer_batch_quota_bytes: usize,
    /// Replies kept to answer retries of executed requests.
    pub reply_cache: usize,
    /// A replica whose executed height is more than this many blocks below a snapshot
    /// `f + 1` peers offer installs that snapshot instead of replaying the blocks.
    pub state_transfer_lag: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_batch_txs: 4000,
            batch_bytes: 512 << 10,
            batch_delay: Duration::from_millis(5),
            max_block_batches: 2048,
            max_block_bytes: 8 << 20,
            idle_proposal_delay: Duration::from_millis(50),
            mempool_max_txs: 200_000,
            mempool_max_bytes: 256 << 20,
            peer_batch_quota_bytes: 128 << 20,
            reply_cache: 100_000,
            state_transfer_lag: 1024,
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

type Req = ClientRequest<Request, Replies>;
type CoreInput<P> = Input<<P as Protocol>::Message, <P as Protocol>::Record>;

/// A chain record whose payload is not executed yet: its parent, the height it is
/// about, and the batches it orders.
type InFlight = (Digest, Height, Vec<Digest>);

/// How often held messages, batch fetches and unexecuted own batches are looked after.
const MAINTENANCE: Duration = Duration::from_millis(100);
/// A missing batch is asked from every peer (not only the sender) after this long.
const FETCH_FROM_ALL_AFTER: Duration = Duration::from_millis(300);
/// The same batch is not asked for again sooner than this.
const FETCH_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// A message whose batches did not arrive in this long is dropped (counted).
const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// Most messages held at once (and a 1/n share of it per sender); beyond that new ones
/// are dropped (counted).
const MAX_HELD: usize = 1024;
/// A message naming more missing batches than this is dropped, not held (a sync answer
/// of 64 blocks of small batches can name tens of thousands; a replica that far behind
/// gets them through smaller answers after its fetches catch up).
const MAX_MISSING_PER_MESSAGE: usize = 32_768;
/// Missing batch digests over all held messages, at most (bounds the memory a Byzantine
/// sender's invented digests can take).
const MAX_MISSING_HELD: usize = 65_536;
/// Batch digests looked up for one peer per second, at most.
const SERVE_DIGESTS_PER_SECOND: usize = 4096;
/// This replica's own unexecuted batches are sent again after this long (a peer whose
/// queue was full may have missed one, and a PBFT primary only orders what it holds).
const RESEND_OWN_AFTER: Duration = Duration::from_secs(5);
/// Own batches re-sent per maintenance tick, at most.
const RESEND_PER_TICK: usize = 4;
/// Per peer per second: at most this many snapshot bytes served.
const SERVE_SNAPSHOT_BYTES_PER_SECOND: usize = 64 << 20;
/// How often a replica offers its snapshot to its peers.
const OFFER_EVERY: Duration = Duration::from_secs(1);
/// Largest chain record accepted with a fetched snapshot (with a chunk, it stays below
/// the transport's 8 MiB frame limit).
const MAX_ANCHOR_BYTES: usize = 4 << 20;
/// Snapshot chunks are not served to a peer whose send queue holds this many messages.
const MAX_QUEUED_FOR_SERVING: usize = 64;
/// Bytes of batches served to one peer per second (fetches are answered, not floods).
const SERVE_BYTES_PER_SECOND: usize = 64 << 20;
/// Client ids with a reply session, at most; sessions per client id, at most.
const MAX_SESSIONS: usize = 100_000;
const MAX_SESSIONS_PER_CLIENT: usize = 4;
/// Client ids one connection may receive replies for.
const MAX_SESSIONS_PER_CONNECTION: usize = 64;
/// Replies per frame (each carries at most one operation's result, and operations are
/// at most `MAX_OP_BYTES`, so a frame stays far below the frame limit).
const MAX_REPLIES_PER_FRAME: usize = 32;

/// What the verifier thread hands the runtime.
pub enum Inbound<M> {
    /// A core message whose signatures verified.
    Message(ReplicaId, Verified<M>),
    /// A batch that decodes, with the digest the receiver computed.
    Batch {
        from: ReplicaId,
        digest: Digest,
        bytes: Bytes,
        /// Its transactions (sharing `bytes`).
        txs: Vec<Transaction>,
    },
    FetchBatches {
        from: ReplicaId,
        digests: Vec<Digest>,
    },
    SnapshotOffer(ReplicaId, SnapshotInfo),
    SnapshotQuery(ReplicaId),
    SnapshotFetch(ReplicaId, SnapshotFetch),
    SnapshotChunk(ReplicaId, SnapshotChunk),
}

/// Builds the core again from the store and the executor, as a restart would: used
/// after a snapshot fetched from peers is installed.
pub struct CoreRebuild<P, A: StateMachine> {
    /// Whether the core restarts from the chain record of the last executed block
    /// (HotStuff), which must then come with a fetched snapshot.
    pub needs_anchor: bool,
    #[allow(clippy::type_complexity)]
    pub build: Box<dyn Fn(&Store, &Executor<A>) -> Result<P, StorageError> + Send>,
}

/// A durable snapshot this replica serves to lagging peers.
struct Offer {
    info: SnapshotInfo,
    state: Vec<u8>,
    /// The encoded chain record of the snapshot's block (empty if the store has none).
    anchor: Vec<u8>,
    /// When a chunk of it was last served: a snapshot being fetched is kept.
    served_at: std::sync::Mutex<Option<Instant>>,
}

/// The snapshots this replica serves, newest last: its latest, the one before, and any
/// older one a peer fetched from in the last few seconds (a transfer under way when new
/// snapshots are taken can finish), at most [`OFFERS_KEPT`].
type SharedOffer = Arc<std::sync::Mutex<VecDeque<Arc<Offer>>>>;
const OFFERS_KEPT: usize = 4;
/// An older snapshot served within this long is kept.
const OFFER_PINNED_FOR: Duration = Duration::from_secs(10);

/// A message waiting for the batches its payload names.
struct Held<M> {
    from: ReplicaId,
    msg: Verified<M>,
    missing: HashSet<Digest>,
    since: Instant,
    /// When its missing batches were last asked for, and whether from every peer.
    asked_at: Instant,
    asked_all: bool,
}

pub struct Runtime<P: Protocol, A: StateMachine> {
    me: ReplicaId,
    core: P,
    store: Arc<Store>,
    snapshots: Option<SnapshotWriter>,
    network: ReplicaNetwork<PeerMessage<P::Message>>,
    executor: Executor<A>,
    mempool: Mempool,
    cfg: RuntimeConfig,
    started: Instant,
    metrics: Arc<Metrics>,
    status: watch::Sender<Status>,
    /// The other replicas, for the per-peer gauges.
    peers: Vec<ReplicaId>,
    /// Where each client's replies go: its sessions (connection number, sender).
    sessions: FastMap<u64, Vec<(u64, ReplySender<Replies>)>>,
    /// Sessions per connection number, and when closed sessions were last dropped.
    per_connection: HashMap<u64, usize>,
    sessions_pruned: Instant,
    replies: ReplyCache,
    /// Batches of stored, not yet executed blocks: digest -> (parent, height, batches).
    pending_chain: HashMap<Digest, InFlight>,
    /// A payload request waiting for transactions (or for the idle delay).
    payload_wanted: Option<(PayloadRequest, Instant)>,
    held: VecDeque<Held<P::Message>>,
    /// Batches asked for, and when.
    fetching: HashMap<Digest, Instant>,
    /// Per peer: the start of its serving window, and the bytes served and digests
    /// looked up in it.
    served: HashMap<ReplicaId, (Instant, usize, usize)>,
    rebuild: CoreRebuild<P, A>,
    transfer: StateTransfer,
    offer: SharedOffer,
    offer_sent: Instant,
    /// Per peer: the start of its snapshot serving window and the bytes served in it.
    snapshot_served: HashMap<ReplicaId, (Instant, usize)>,
    /// When each peer's query for our offer was last answered.
    offer_answered: HashMap<ReplicaId, Instant>,
    /// Set while a snapshot is being fetched (read by the verifier thread).
    transferring: Arc<AtomicBool>,
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
        network: ReplicaNetwork<PeerMessage<P::Message>>,
        executor: Executor<A>,
        cfg: RuntimeConfig,
        metrics: Arc<Metrics>,
        status: watch::Sender<Status>,
        peers: Vec<ReplicaId>,
        rebuild: CoreRebuild<P, A>,
    ) -> Self {
        let store = Arc::new(store);
        let offer = SharedOffer::default();
        let snapshots = Some(SnapshotWriter::spawn(store.clone(), metrics.clone(), offer.clone()));
        // f + 1 identical offers vouch for a snapshot (n = peers + 1, f = (n - 1) / 3).
        let transfer = StateTransfer::new(peers.len() / 3 + 1, cfg.state_transfer_lag);
        let mempool = Mempool::new(
            me,
            MempoolLimits {
                max_txs: cfg.mempool_max_txs,
                max_bytes: cfg.mempool_max_bytes,
                batch_txs: cfg.max_batch_txs,
                batch_bytes: cfg.batch_bytes,
                batch_delay: cfg.batch_delay,
                peer_quota_bytes: cfg.peer_batch_quota_bytes,
            },
        );
        let reply_cache = cfg.reply_cache;
        Runtime {
            me,
            core,
            store,
            snapshots,
            network,
            executor,
            mempool,
            cfg,
            started: Instant::now(),
            metrics,
            status,
            peers,
            sessions: FastMap::default(),
            per_connection: HashMap::new(),
            sessions_pruned: Instant::now(),
            replies: ReplyCache::new(reply_cache),
            pending_chain: HashMap::new(),
            payload_wanted: None,
            held: VecDeque::new(),
            fetching: HashMap::new(),
            served: HashMap::new(),
            rebuild,
            transfer,
            offer,
            offer_sent: Instant::now(),
            snapshot_served: HashMap::new(),
            offer_answered: HashMap::new(),
            transferring: Arc::default(),
        }
    }

    /// The flag [`spawn_verifier`] reads: set while a snapshot is being fetched.
    pub fn transferring(&self) -> Arc<AtomicBool> {
        self.transferring.clone()
    }

    fn now(&self) -> Time {
        Time(self.started.elapsed().as_millis() as u64)
    }

    /// Runs until `shutdown` fires. `inbound` carries verified replica messages and
    /// batches (see [`spawn_verifier`]), `clients` the client requests.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<(Inbound<P::Message>, Charge)>,
        mut clients: mpsc::Receiver<Req>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<ReplicaNetwork<PeerMessage<P::Message>>, RuntimeError> {
        self.step(Input::Start)?;
        // A replica that was down may be far behind: ask for snapshot offers now.
        let _ = self.network.broadcast(&PeerMessage::SnapshotQuery);
        let mut gauges = tokio::time::interval(GAUGE_REFRESH);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintenance = tokio::time::interval(MAINTENANCE);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.core.next_deadline().map(|t| self.started + Duration::from_millis(t.0));
            let payload_deadline = self.payload_wanted.as_ref().map(|(_, at)| *at);
            let wake = [deadline, payload_deadline, self.mempool.seal_deadline()].into_iter().flatten().min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Deadlines first: a stream of inbound messages must not starve timeouts.
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = sleep => {
                    let now = Instant::now();
                    if self.mempool.seal_deadline().is_some_and(|at| at <= now) {
                        self.mempool.seal(now);
                        self.send_sealed();
                    }
                    self.answer_payload(true)?;
                    if self.core.next_deadline().is_some_and(|d| d <= self.now()) {
                        self.step(Input::Timeout)?;
                    }
                }
                _ = gauges.tick() => self.refresh_gauges(),
                _ = maintenance.tick() => self.maintain()?,
                // The charge is given back once the message is handled.
                Some((message, _charge)) = inbound.recv() => self.on_inbound(message)?,
                Some(request) = clients.recv() => {
                    self.on_client(request);
                    // Take whatever else is queued before stepping the core again.
                    while let Ok(request) = clients.try_recv() {
                        self.on_client(request);
                    }
                    self.send_sealed();
                    self.answer_payload(false)?;
                }
            }
        }
        // The last snapshot is written after any still being written in the background.
        if let Some(writer) = self.snapshots.take() {
            tokio::task::block_in_place(|| writer.finish());
        }
        let snapshot = self.executor.snapshot();
        tokio::task::block_in_place(|| self.store.save_snapshot(&snapshot()))?;
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
        // 1. Durable before anything leaves (a vote never precedes its safety state),
        //    with the batches the records name that the store does not hold yet.
        let mut new_batches = Vec::new();
        let mut seen = HashSet::new();
        for record in &actions.persist {
            let Some(payload) = record.payload() else { continue };
            let batches = decode_block_payload(&payload.0);
            for digest in &batches {
                if let Some(batch) = self.mempool.batch(digest)
                    && !batch.persisted
                    && seen.insert(*digest)
                {
                    new_batches.push((*digest, batch.bytes.clone()));
                }
            }
            if let (Some((digest, parent)), Some(height)) = (record.chain_link(), record.height())
                && height > self.executor.height()
            {
                self.pending_chain.insert(digest, (parent, height, batches));
            }
        }
        // Shared buffers (`Bytes`): nothing is copied until the batch log's write.
        let refs: Vec<(Digest, &[u8])> = new_batches.iter().map(|(d, b)| (*d, b.as_ref())).collect();
        // A step with nothing to store skips `block_in_place` (it hands the worker's
        // other tasks off) and stays out of the write-time histogram.
        if !actions.persist.is_empty() || !refs.is_empty() {
            let started = Instant::now();
            tokio::task::block_in_place(|| self.store.persist_with_batches(&actions.persist, &refs))?;
            self.metrics.persist_seconds.observe(started.elapsed().as_secs_f64());
        }
        for (digest, _) in &new_batches {
            self.mempool.mark_persisted(digest);
        }
        // 2. Send.
        for Outgoing { to, msg } in actions.send {
            let msg = PeerMessage::Consensus(msg);
            let _ = match to {
                Recipient::One(id) => self.network.send(id, &msg).map(|_| 1),
                Recipient::AllOthers => self.network.broadcast(&msg),
            };
        }
        // 3. Execute, in log order, and answer clients.
        for block in actions.commit {
            if let Some(input) = self.execute(&block)? {
                inputs.push_back(input);
            }
        }
        self.metrics.mempool_depth.set(self.mempool.len() as i64);
        self.metrics.pending_batches.set(self.mempool.pending_batches() as i64);
        // 4. Payloads and loads.
        if let Some(request) = actions.want_payload {
            self.payload_wanted = Some((request, Instant::now() + self.cfg.idle_proposal_delay));
            if let Some(input) = self.take_payload(false) {
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

    /// Executes one committed block (if it is the next one) and answers its clients;
    /// returns the core's [`Input::Executed`].
    fn execute(&mut self, block: &CommittedBlock) -> Result<Option<CoreInput<P>>, RuntimeError> {
        if !self.executor.is_next(block) {
            return Ok(None);
        }
        let batches = decode_block_payload(&block.payload.0);
        let mut txs = Vec::new();
        for digest in &batches {
            txs.extend(self.batch_transactions(digest, block.height)?);
        }
        let Some(outcome) = self.executor.execute(block, txs) else { return Ok(None) };
        for digest in batches {
            self.mempool.executed(digest);
        }
        tokio::task::block_in_place(|| self.store.append_log(block.height, block.digest))?;
        self.metrics.blocks_committed.inc();
        self.metrics.height.set(outcome.height.0 as i64);
        self.metrics.transactions_executed.inc_by(outcome.executed.len() as u64);
        self.metrics.duplicate_transactions.inc_by(outcome.duplicates as u64);
        // Frames of a client's replies in this block; then the replies move into the
        // cache (it answers retries) without a copy.
        let mut by_client: FastMap<u64, Replies> = FastMap::default();
        for (tx, receipt) in outcome.executed {
            by_client.entry(tx.client).or_default().push(Reply {
                client: tx.client,
                sequence: tx.sequence,
                replica: self.me,
                height: outcome.height,
                outcome: Outcome::Executed(receipt.0),
            });
        }
        for (client, replies) in by_client {
            for frame in replies.chunks(MAX_REPLIES_PER_FRAME) {
                for (_, sender) in self.sessions.get(&client).into_iter().flatten() {
                    let _ = sender.send(frame);
                }
            }
            self.replies.remember(client, replies);
        }
        // What the executed log covers is no longer in flight (abandoned forks too).
        let executed = self.executor.height();
        self.pending_chain.retain(|_, (_, height, _)| *height > executed);
        if self.executor.snapshot_due()
            && let Some(writer) = &self.snapshots
        {
            writer.submit(Box::new(self.executor.snapshot()));
        }
        self.report_executed(outcome.height, outcome.state_digest);
        Ok(Some(Input::Executed { height: outcome.height, state_digest: outcome.state_digest }))
    }

    /// Shows `(height, state_digest)` as the executed state in the status.
    fn report_executed(&self, height: Height, state_digest: Digest) {
        self.status.send_modify(|s| {
            s.height = height;
            s.state_digest = state_digest;
            s.recent_digests.push_back((height, state_digest));
            if s.recent_digests.len() > RECENT_DIGESTS {
                s.recent_digests.pop_front();
            }
        });
    }

    /// The transactions of a batch a committed block (at `height`) names: taken from
    /// the mempool (decoded when the batch arrived or was sealed), decoded from its
    /// bytes there (a block naming a batch twice), or read from the store.
    fn batch_transactions(
        &mut self,
        digest: &Digest,
        height: Height,
    ) -> Result<Vec<Transaction>, StorageError> {
        if let Some(txs) = self.mempool.take_transactions(digest) {
            return Ok(txs);
        }
        if let Some(batch) = self.mempool.batch(digest)
            && let Some(txs) = decode_batch(&batch.bytes)
        {
            return Ok(txs);
        }
        checked_batch(digest, self.store.batch(digest)?, height)
    }

    fn on_inbound(&mut self, inbound: Inbound<P::Message>) -> Result<(), RuntimeError> {
        match inbound {
            // While a snapshot is fetched the core is far behind and useless: its
            // messages are dropped (as if lost) rather than caught up on block by block.
            Inbound::Message(..) if self.transfer.in_progress().is_some() => {
                self.metrics.snapshots.get_or_create(&label("event", "message_dropped_in_transfer")).inc();
                Ok(())
            }
            Inbound::Message(from, msg) => self.deliver_or_hold(from, msg),
            Inbound::Batch { from, digest, bytes, txs } => {
                let solicited = self.fetching.contains_key(&digest);
                let admission = self.mempool.add_batch(from, digest, bytes, Some(txs), solicited);
                let event = match admission {
                    BatchAdmission::Stored => "received",
                    BatchAdmission::Known => "received_known",
                    BatchAdmission::OverQuota => "refused_over_quota",
                };
                self.metrics.batches.get_or_create(&label("event", event)).inc();
                if admission == BatchAdmission::OverQuota {
                    return Ok(());
                }
                self.fetching.remove(&digest);
                self.release_held(digest)?;
                self.answer_payload(false)
            }
            Inbound::FetchBatches { from, digests } => {
                self.serve_batches(from, &digests);
                Ok(())
            }
            Inbound::SnapshotOffer(from, info) => {
                self.transfer.on_offer(from, info);
                // A restarted replica learns here how far behind it is: start a
                // transfer now rather than at the next tick, while block-by-block
                // catch-up races it.
                self.poll_state_transfer(Instant::now());
                Ok(())
            }
            Inbound::SnapshotQuery(from) => {
                let now = Instant::now();
                let last = self.offer_answered.insert(from, now);
                if last.is_none_or(|at| now.duration_since(at) >= OFFER_EVERY) {
                    let offer = self.latest_offer();
                    if let Some(info) = offer {
                        let _ = self.network.send(from, &PeerMessage::SnapshotOffer(info));
                    }
                }
                Ok(())
            }
            Inbound::SnapshotFetch(from, fetch) => {
                self.serve_snapshot(from, fetch);
                Ok(())
            }
            Inbound::SnapshotChunk(from, chunk) => {
                match self.transfer.on_chunk(from, chunk, Instant::now()) {
                    ChunkOutcome::Ignored => {
                        self.metrics.snapshots.get_or_create(&label("event", "chunk_ignored")).inc();
                        Ok(())
                    }
                    ChunkOutcome::Progress(fetches) => {
                        self.send_snapshot_fetches(fetches);
                        Ok(())
                    }
                    ChunkOutcome::Corrupt => {
                        self.metrics.snapshots.get_or_create(&label("event", "transfer_corrupt")).inc();
                        tracing::warn!(
                            "fetched snapshot bytes do not match the vouched digest; fetching again"
                        );
                        Ok(())
                    }
                    ChunkOutcome::Complete(received) => self.install_snapshot(received),
                }
            }
        }
    }

    /// The newest snapshot this replica offers.
    fn latest_offer(&self) -> Option<SnapshotInfo> {
        self.offer.lock().ok().and_then(|offers| offers.back().map(|o| o.info))
    }

    fn send_snapshot_fetches(&mut self, fetches: Vec<Fetch>) {
        for fetch in fetches {
            let _ = self.network.send(fetch.to, &PeerMessage::SnapshotFetch(fetch.request));
        }
    }

    /// Answers a peer's request for bytes of the snapshot this replica offers, within
    /// a per-peer byte budget.
    fn serve_snapshot(&mut self, from: ReplicaId, fetch: SnapshotFetch) {
        let offer = self.offer.lock().ok().and_then(|offers| {
            offers
                .iter()
                .find(|o| {
                    o.info.height == fetch.height
                        && o.info.digest == fetch.digest
                        && fetch.offset < o.info.size
                })
                .cloned()
        });
        let Some(offer) = offer else {
            self.metrics.snapshots.get_or_create(&label("event", "fetch_not_offered")).inc();
            return;
        };
        let now = Instant::now();
        let window = self.snapshot_served.entry(from).or_insert((now, 0));
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        // A peer that does not read its chunks gets no more than a few queued.
        if self.network.queue_len(from).unwrap_or(0) >= MAX_QUEUED_FOR_SERVING {
            self.metrics.snapshots.get_or_create(&label("event", "serve_queue_full")).inc();
            return;
        }
        let start = fetch.offset as usize;
        let end = (start + SNAPSHOT_CHUNK_BYTES).min(offer.state.len());
        if window.1 + (end - start) > SERVE_SNAPSHOT_BYTES_PER_SECOND {
            self.metrics.snapshots.get_or_create(&label("event", "serve_over_budget")).inc();
            return;
        }
        window.1 += end - start;
        if let Ok(mut at) = offer.served_at.lock() {
            *at = Some(now);
        }
        let chunk = SnapshotChunk {
            height: offer.info.height,
            digest: offer.info.digest,
            offset: fetch.offset,
            bytes: offer.state[start..end].to_vec(),
            anchor: if start == 0 { offer.anchor.clone() } else { Vec::new() },
        };
        if self.network.send(from, &PeerMessage::SnapshotChunk(chunk)).is_ok() {
            self.metrics.snapshots.get_or_create(&label("event", "chunk_served")).inc();
        }
    }

    /// Installs a snapshot fetched from peers (its bytes match the digest `f + 1` of
    /// them vouch for): the application state and sessions, durably with its block,
    /// then a core built from the store as after a restart.
    fn install_snapshot(&mut self, received: Received) -> Result<(), RuntimeError> {
        let info = received.info;
        if info.height <= self.executor.height() {
            return Ok(());
        }
        // Only a protocol that restarts from it stores the block's record (it is checked
        // against the vouched block digest; nothing else vouches for other records).
        let anchor = codec::decode::<P::Record>(&received.anchor, MAX_ANCHOR_BYTES).ok().filter(|r| {
            self.rebuild.needs_anchor && r.chain_link().is_some_and(|(digest, _)| digest == info.block)
        });
        if self.rebuild.needs_anchor && anchor.is_none() {
            self.metrics.snapshots.get_or_create(&label("event", "transfer_refused_anchor")).inc();
            tracing::warn!(height = %info.height, sources = ?received.sources, "refused a fetched snapshot: its block's record is missing or wrong");
            self.transfer.refused(info.digest, &received.sources);
            return Ok(());
        }
        let Received { state, anchor: _, sources, .. } = received;
        let snapshot =
            StoredSnapshot { height: info.height, block: info.block, state_digest: info.state_digest, state };
        if let Err(reason) = tokio::task::block_in_place(|| self.executor.install(&snapshot)) {
            self.metrics.snapshots.get_or_create(&label("event", "transfer_refused_state")).inc();
            tracing::warn!(height = %info.height, ?sources, %reason, "refused a fetched snapshot");
            self.transfer.refused(info.digest, &sources);
            return Ok(());
        }
        // A snapshot of the old state still being written must not land after this.
        if let Some(writer) = self.snapshots.take() {
            tokio::task::block_in_place(|| writer.finish());
        }
        tokio::task::block_in_place(|| self.store.install_snapshot(&snapshot, anchor.as_ref()))?;
        self.snapshots =
            Some(SnapshotWriter::spawn(self.store.clone(), self.metrics.clone(), self.offer.clone()));
        self.core = tokio::task::block_in_place(|| (self.rebuild.build)(&self.store, &self.executor))?;
        self.pending_chain.clear();
        self.payload_wanted = None;
        self.transferring.store(false, Ordering::Relaxed);
        self.metrics.snapshots.get_or_create(&label("event", "transfer_installed")).inc();
        self.metrics.height.set(info.height.0 as i64);
        tracing::info!(height = %info.height, state_digest = %info.state_digest, bytes = info.size, "installed a snapshot from peers");
        self.report_executed(info.height, info.state_digest);
        self.step(Input::Start)
    }

    /// Whether this replica holds the batch (pending, or in the store).
    fn has_batch(&self, digest: &Digest) -> bool {
        self.mempool.contains(digest)
            || self.mempool.was_executed(digest)
            || self.store.has_batch(digest).unwrap_or(false)
    }

    /// Feeds a message to the core if this replica holds every batch it names;
    /// otherwise holds it and fetches them.
    fn deliver_or_hold(&mut self, from: ReplicaId, msg: Verified<P::Message>) -> Result<(), RuntimeError> {
        let missing: HashSet<Digest> = msg
            .payloads()
            .into_iter()
            .flat_map(decode_block_payload)
            .filter(|d| !self.has_batch(d))
            .collect();
        if missing.is_empty() {
            return self.step(Input::Message { from, msg });
        }
        let from_sender = self.held.iter().filter(|h| h.from == from).count();
        let missing_held: usize = self.held.iter().map(|h| h.missing.len()).sum();
        let dropped = if self.held.len() >= MAX_HELD || from_sender >= MAX_HELD / (self.peers.len() + 1) {
            Some("held_full_dropped")
        } else if missing.len() > MAX_MISSING_PER_MESSAGE || missing_held + missing.len() > MAX_MISSING_HELD {
            Some("held_too_many_missing")
        } else {
            None
        };
        if let Some(event) = dropped {
            self.metrics.batches.get_or_create(&label("event", event)).inc();
            return Ok(());
        }
        let ask: Vec<Digest> = missing.iter().copied().collect();
        self.fetch(Recipient::One(from), &ask);
        let now = Instant::now();
        self.held.push_back(Held { from, msg, missing, since: now, asked_at: now, asked_all: false });
        self.metrics.held_messages.set(self.held.len() as i64);
        Ok(())
    }

    /// Asks `to` for the batches among `digests` not asked for recently.
    fn fetch(&mut self, to: Recipient, digests: &[Digest]) {
        let now = Instant::now();
        let ask: Vec<Digest> = digests
            .iter()
            .filter(|d| match (to, self.fetching.get(*d)) {
                (Recipient::One(_), Some(at)) => now.duration_since(*at) >= FETCH_AGAIN_AFTER,
                _ => true,
            })
            .copied()
            .collect();
        for chunk in ask.chunks(MAX_FETCH_BATCHES) {
            let msg = PeerMessage::FetchBatches(chunk.to_vec());
            let _ = match to {
                Recipient::One(id) => self.network.send(id, &msg).map(|_| 1),
                Recipient::AllOthers => self.network.broadcast(&msg),
            };
            self.metrics.batches.get_or_create(&label("event", "fetch_requested")).inc_by(chunk.len() as u64);
        }
        for digest in ask {
            self.fetching.insert(digest, now);
        }
    }

    /// Delivers the held messages that `digest` completes, in the order they came.
    fn release_held(&mut self, digest: Digest) -> Result<(), RuntimeError> {
        let mut ready = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            let held = &mut self.held[i];
            held.missing.remove(&digest);
            if held.missing.is_empty() {
                if let Some(held) = self.held.remove(i) {
                    ready.push(held);
                }
            } else {
                i += 1;
            }
        }
        self.metrics.held_messages.set(self.held.len() as i64);
        for Held { from, msg, .. } in ready {
            self.step(Input::Message { from, msg })?;
        }
        Ok(())
    }

    /// Answers a peer's fetch with the batches this replica holds, within a per-peer
    /// byte budget.
    fn serve_batches(&mut self, from: ReplicaId, digests: &[Digest]) {
        let now = Instant::now();
        let window = self.served.entry(from).or_insert((now, 0, 0));
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0, 0);
        }
        if window.2 + digests.len() > SERVE_DIGESTS_PER_SECOND {
            self.metrics.batches.get_or_create(&label("event", "serve_over_budget")).inc();
            return;
        }
        window.2 += digests.len();
        for digest in digests.iter().take(MAX_FETCH_BATCHES) {
            let bytes = match self.mempool.batch(digest) {
                Some(batch) => Some(batch.bytes.clone()),
                None => self.store.batch(digest).ok().flatten().map(Bytes::from),
            };
            let Some(bytes) = bytes else { continue };
            let window = self.served.entry(from).or_insert((now, 0, 0));
            if window.1 + bytes.len() > SERVE_BYTES_PER_SECOND {
                self.metrics.batches.get_or_create(&label("event", "serve_over_budget")).inc();
                return;
            }
            window.1 += bytes.len();
            if self.network.send(from, &PeerMessage::Batch(bytes)).is_ok() {
                self.metrics.batches.get_or_create(&label("event", "served")).inc();
            }
        }
    }

    /// Periodic: asks every peer for batches the sender did not provide, drops held
    /// messages whose batches never came, and re-sends own unexecuted batches.
    fn maintain(&mut self) -> Result<(), RuntimeError> {
        let now = Instant::now();
        let mut ask_all = Vec::new();
        for held in self.held.iter_mut() {
            // Every peer after a short wait, then again every little while (an answer
            // can be lost to a full queue or a peer's serving budget).
            let wait = if held.asked_all { FETCH_AGAIN_AFTER } else { FETCH_FROM_ALL_AFTER };
            if now.duration_since(held.asked_at) >= wait {
                held.asked_all = true;
                held.asked_at = now;
                ask_all.extend(held.missing.iter().copied());
            }
        }
        if !ask_all.is_empty() {
            ask_all.sort();
            ask_all.dedup();
            self.fetch(Recipient::AllOthers, &ask_all);
        }
        let before = self.held.len();
        self.held.retain(|h| now.duration_since(h.since) < HOLD_LIMIT);
        let expired = before - self.held.len();
        if expired > 0 {
            self.metrics.batches.get_or_create(&label("event", "held_expired")).inc_by(expired as u64);
            tracing::warn!(expired, "dropped messages whose batches never arrived");
        }
        self.metrics.held_messages.set(self.held.len() as i64);
        self.fetching.retain(|_, at| now.duration_since(*at) < HOLD_LIMIT);
        self.maintain_state_transfer(now);
        let named: HashSet<Digest> =
            self.pending_chain.values().flat_map(|(_, _, b)| b.iter().copied()).collect();
        for bytes in self.mempool.due_for_resend(now, RESEND_OWN_AFTER, &named, RESEND_PER_TICK) {
            let _ = self.network.broadcast(&PeerMessage::Batch(bytes.clone()));
            self.metrics.batches.get_or_create(&label("event", "resent")).inc();
        }
        Ok(())
    }

    /// Offers this replica's snapshot to its peers now and then, and starts or moves on
    /// a transfer of one when this replica is far behind.
    fn maintain_state_transfer(&mut self, now: Instant) {
        if now.duration_since(self.offer_sent) >= OFFER_EVERY {
            self.offer_sent = now;
            let offer = self.latest_offer();
            if let Some(info) = offer {
                let _ = self.network.broadcast(&PeerMessage::SnapshotOffer(info));
            }
        }
        self.poll_state_transfer(now);
    }

    /// Starts a transfer when a vouched snapshot is far enough ahead, or moves one on.
    fn poll_state_transfer(&mut self, now: Instant) {
        let before = self.transfer.in_progress();
        let fetches = self.transfer.poll(now, self.executor.height());
        if let Some(info) = self.transfer.in_progress()
            && before != Some(info)
        {
            self.metrics.snapshots.get_or_create(&label("event", "transfer_started")).inc();
            tracing::info!(height = %info.height, executed = %self.executor.height(), bytes = info.size, "far behind: fetching a snapshot that f + 1 peers offer");
        }
        self.send_snapshot_fetches(fetches);
        self.transferring.store(self.transfer.in_progress().is_some(), Ordering::Relaxed);
    }

    /// Sends the batches sealed since the last call to every peer.
    fn send_sealed(&mut self) {
        for (_, bytes) in self.mempool.take_sealed() {
            let _ = self.network.broadcast(&PeerMessage::Batch(bytes.clone()));
            self.metrics.batches.get_or_create(&label("event", "sealed")).inc();
        }
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
        let memory = self.store.memory();
        for (kind, bytes) in [
            ("memtables", memory.memtables),
            ("table_readers", memory.table_readers),
            ("block_cache", memory.block_cache),
        ] {
            self.metrics
                .storage_memory
                .get_or_create(&label("kind", kind))
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
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
                    tracing::info!(%round, %leader, "entered a round by timeout (view change)");
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

    /// Answers a waiting payload request if there are batches to order, or if
    /// `idle_due` and its idle delay passed.
    fn answer_payload(&mut self, idle_due: bool) -> Result<(), RuntimeError> {
        if let Some(input) = self.take_payload(idle_due) {
            self.step(input)?;
        }
        Ok(())
    }

    /// The payload for a waiting request: this replica's open transactions are sealed
    /// at once (a leader does not wait out the batch delay), then the oldest pending
    /// batches that the chain being extended does not order yet. `None` while there is
    /// nothing to order and the idle delay has not passed (or `idle_due` is false).
    fn take_payload(&mut self, idle_due: bool) -> Option<CoreInput<P>> {
        let (request, at) = self.payload_wanted?;
        let now = Instant::now();
        if self.mempool.open_transactions() > 0 {
            self.mempool.seal(now);
            self.send_sealed();
        }
        let mut exclude = HashSet::new();
        let mut cursor = request.parent;
        while cursor != self.executor.last_block() {
            let Some((parent, _, batches)) = self.pending_chain.get(&cursor) else { break };
            exclude.extend(batches.iter().copied());
            cursor = *parent;
        }
        let max_batches = self.cfg.max_block_batches.min(MAX_BLOCK_BATCHES);
        let batches = self.mempool.select(&exclude, max_batches, self.cfg.max_block_bytes);
        if batches.is_empty() && !(idle_due && now >= at) {
            return None;
        }
        self.payload_wanted = None;
        Some(Input::Payload { round: request.round, payload: encode_block_payload(&batches) })
    }

    fn reject(&self, sender: &ReplySender<Replies>, request: &Request, rejection: Rejection, reason: &str) {
        self.metrics.refused_requests.get_or_create(&label("reason", reason)).inc();
        let reply = Reply {
            client: request.client,
            sequence: request.sequence,
            replica: self.me,
            height: self.executor.height(),
            outcome: Outcome::Rejected(rejection),
        };
        let _ = sender.send(&vec![reply]);
    }

    /// Remembers that `client`'s replies go (also) to this session. Returns false if
    /// no session can be added (too many clients, or too many ids on this connection).
    fn register_session(&mut self, client: u64, connection: u64, sender: &ReplySender<Replies>) -> bool {
        if self.sessions.get(&client).is_some_and(|s| s.iter().any(|(c, _)| *c == connection)) {
            return true;
        }
        if self.per_connection.get(&connection).copied().unwrap_or(0) >= MAX_SESSIONS_PER_CONNECTION {
            return false;
        }
        if !self.sessions.contains_key(&client) && self.sessions.len() >= MAX_SESSIONS {
            // Full: drop closed sessions, at most once a second.
            if self.sessions_pruned.elapsed() >= Duration::from_secs(1) {
                self.sessions_pruned = Instant::now();
                let mut gone = Vec::new();
                self.sessions.retain(|_, sessions| {
                    drop_closed(sessions, &mut gone);
                    !sessions.is_empty()
                });
                for c in gone {
                    self.release_connection(c);
                }
            }
            if self.sessions.len() >= MAX_SESSIONS {
                return false;
            }
        }
        let mut evicted = Vec::new();
        let sessions = self.sessions.entry(client).or_default();
        drop_closed(sessions, &mut evicted);
        if sessions.len() >= MAX_SESSIONS_PER_CLIENT {
            evicted.push(sessions.remove(0).0);
        }
        sessions.push((connection, sender.clone()));
        *self.per_connection.entry(connection).or_default() += 1;
        for c in evicted {
            self.release_connection(c);
        }
        true
    }

    fn release_connection(&mut self, connection: u64) {
        if let Some(count) = self.per_connection.get_mut(&connection) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_connection.remove(&connection);
            }
        }
    }

    fn on_client(&mut self, incoming: Req) {
        let ClientRequest { client, request, reply } = incoming;
        if request.op.len() > MAX_OP_BYTES {
            let rejection = Rejection::TooLarge { len: request.op.len(), limit: MAX_OP_BYTES };
            return self.reject(&reply, &request, rejection, "too_large");
        }
        // A keyed connection speaks only for its key's id; a keyless one only for ids
        // outside the keyed half of the id space (so it cannot read or take over a
        // keyed client's replies).
        let id_ok = match client.key {
            Some(key) => client_id_of(&key) == request.client,
            None => !is_keyed_client_id(request.client),
        };
        if !id_ok {
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
                let _ = reply.send(&vec![answer]);
            }
            RequestKind::Subscribe => {
                if !self.register_session(request.client, client.connection, &reply) {
                    self.reject(&reply, &request, Rejection::Busy, "too_many_sessions");
                }
            }
            RequestKind::Ordered => {
                if let Err(reason) = self.executor.app().admit(&request.op) {
                    return self.reject(&reply, &request, Rejection::Malformed(reason), "invalid_operation");
                }
                let key = (request.client, request.sequence);
                if let Some(done) = self.replies.get(request.client, request.sequence) {
                    let _ = reply.send(std::slice::from_ref(done));
                    return;
                }
                if self.executor.too_old(request.client, request.sequence)
                    || self.executor.was_executed(request.client, request.sequence)
                {
                    // Too old for the session window, or executed with its reply no
                    // longer cached: nothing to re-send.
                    return self.reject(
                        &reply,
                        &request,
                        Rejection::TooOld { sequence: request.sequence },
                        "replay",
                    );
                }
                if !self.register_session(request.client, client.connection, &reply) {
                    return self.reject(&reply, &request, Rejection::Busy, "too_many_sessions");
                }
                let tx = Transaction { client: request.client, sequence: request.sequence, op: request.op };
                match self.mempool.add(tx, Instant::now()) {
                    Admission::Accepted => {
                        self.metrics.batch_transactions.inc();
                    }
                    Admission::Duplicate => {}
                    Admission::Full => self.reject(&reply, &request_header(key), Rejection::Busy, "busy"),
                }
            }
        }
    }
}

type SnapshotJob = Box<dyn FnOnce() -> StoredSnapshot + Send>;

/// Encodes and writes snapshots on a thread of its own, one at a time, so execution
/// never waits for a snapshot. One due while the previous one is still being written is
/// skipped (counted): the next one covers it, and recovery replays the log after
/// whichever is stored.
struct SnapshotWriter {
    jobs: std::sync::mpsc::SyncSender<SnapshotJob>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl SnapshotWriter {
    /// Also publishes each written snapshot (and, first, the stored one) in `offer`.
    fn spawn(store: Arc<Store>, metrics: Arc<Metrics>, offer: SharedOffer) -> SnapshotWriter {
        let (jobs, queued) = std::sync::mpsc::sync_channel::<SnapshotJob>(0);
        let m = metrics.clone();
        let publish = move |store: &Store, snapshot: StoredSnapshot| {
            let anchor = store.chain_record_bytes(&snapshot.block).ok().flatten().unwrap_or_default();
            let info = SnapshotInfo {
                height: snapshot.height,
                block: snapshot.block,
                state_digest: snapshot.state_digest,
                size: snapshot.state.len() as u64,
                digest: snapshot_digest(&snapshot.state),
            };
            if let Ok(mut offers) = offer.lock() {
                offers.retain(|o| o.info.height < info.height);
                let now = Instant::now();
                let newest = offers.len().saturating_sub(1);
                let pinned = |o: &Offer| {
                    o.served_at
                        .lock()
                        .ok()
                        .and_then(|at| *at)
                        .is_some_and(|at| now.duration_since(at) < OFFER_PINNED_FOR)
                };
                let mut kept: VecDeque<Arc<Offer>> = offers
                    .drain(..)
                    .enumerate()
                    .filter(|(i, o)| *i == newest || pinned(o))
                    .map(|(_, o)| o)
                    .collect();
                kept.push_back(Arc::new(Offer {
                    info,
                    state: snapshot.state,
                    anchor,
                    served_at: Default::default(),
                }));
                while kept.len() > OFFERS_KEPT {
                    kept.pop_front();
                }
                *offers = kept;
            }
        };
        let thread = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || {
                // Encoding and hashing a large state takes a core for a while, and every
                // replica snapshots at the same height: at the lowest CPU priority this
                // waits for idle CPU instead of stalling the consensus path on a busy
                // machine (where all replicas share the cores, rounds stopped for about
                // a second at each snapshot height).
                if let Err(e) = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min) {
                    tracing::debug!(error = ?e, "could not lower the snapshot thread's priority");
                }
                if let Ok(Some(snapshot)) = store.snapshot() {
                    publish(&store, snapshot);
                }
                for job in queued {
                    let snapshot = job();
                    match store.save_snapshot(&snapshot) {
                        Ok(()) => {
                            m.snapshots.get_or_create(&label("event", "written")).inc();
                            publish(&store, snapshot);
                        }
                        Err(e) => {
                            m.snapshots.get_or_create(&label("event", "failed")).inc();
                            tracing::error!(height = %snapshot.height, error = %e, "writing a snapshot failed");
                        }
                    }
                }
            })
            .ok();
        SnapshotWriter { jobs, thread, metrics }
    }

    fn submit(&self, job: SnapshotJob) {
        if self.jobs.try_send(job).is_err() {
            self.metrics.snapshots.get_or_create(&label("event", "skipped_busy")).inc();
        }
    }

    /// Waits for the snapshot being written, if any.
    fn finish(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Removes the closed sessions of one client, noting their connection numbers.
fn drop_closed(sessions: &mut Vec<(u64, ReplySender<Replies>)>, gone: &mut Vec<u64>) {
    sessions.retain(|(connection, sender)| {
        let open = !sender.is_closed();
        if !open {
            gone.push(*connection);
        }
        open
    });
}

/// A request carrying only its identity (for rejections after the operation moved).
fn request_header((client, sequence): (u64, u64)) -> Request {
    Request { client, sequence, kind: RequestKind::Ordered, op: Bytes::new() }
}

/// Verifies replica messages on a thread of its own (signatures, batch digests and
/// decoding never run on the core's task). Messages that fail are counted by reason
/// and dropped.
///
/// While `transferring` is set (a snapshot is being fetched; see
/// [`Runtime::transferring`]) consensus messages are dropped unverified: the runtime
/// would drop them anyway, and verifying them would delay the snapshot's chunks queued
/// behind them.
///
/// Each message keeps its [`Charge`] (its share of the sender's receive budget) until
/// the runtime has handled it, so what a peer can make this replica hold in both queues
/// is bounded in bytes, not only in count.
pub fn spawn_verifier<M>(
    mut raw: bulwark_network::Inbound<PeerMessage<M>>,
    committee: Arc<Committee>,
    metrics: Arc<Metrics>,
    transferring: Arc<AtomicBool>,
) -> mpsc::Receiver<(Inbound<M>, Charge)>
where
    M: WireMessage,
{
    let (verified_tx, verified_rx) = mpsc::channel(4096);
    let refuse = move |reason: &str| metrics.refused_messages.get_or_create(&label("reason", reason)).inc();
    std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || {
            while let Some((from, msg, charge)) = raw.blocking_recv() {
                let inbound = match msg {
                    PeerMessage::Consensus(_) if transferring.load(Ordering::Relaxed) => {
                        refuse("dropped_in_state_transfer");
                        continue;
                    }
                    PeerMessage::Consensus(msg) => match Verified::check(msg, &committee) {
                        Ok(verified) => Inbound::Message(from, verified),
                        Err(e) => {
                            tracing::debug!(%from, error = %e, "message failed verification");
                            refuse("verification_failed");
                            continue;
                        }
                    },
                    PeerMessage::Batch(bytes) => {
                        // Decoded once, here (no copy per transaction), and taken by
                        // execution.
                        let Some(txs) = decode_batch(&bytes) else {
                            refuse("malformed_batch");
                            continue;
                        };
                        Inbound::Batch { from, digest: batch_digest(&bytes), bytes, txs }
                    }
                    PeerMessage::FetchBatches(mut digests) => {
                        if digests.len() > MAX_FETCH_BATCHES {
                            refuse("oversized_fetch");
                            digests.truncate(MAX_FETCH_BATCHES);
                        }
                        Inbound::FetchBatches { from, digests }
                    }
                    PeerMessage::SnapshotOffer(info) => Inbound::SnapshotOffer(from, info),
                    PeerMessage::SnapshotQuery => Inbound::SnapshotQuery(from),
                    PeerMessage::SnapshotFetch(fetch) => Inbound::SnapshotFetch(from, fetch),
                    PeerMessage::SnapshotChunk(chunk) => {
                        if chunk.bytes.len() > SNAPSHOT_CHUNK_BYTES || chunk.anchor.len() > MAX_ANCHOR_BYTES {
                            refuse("oversized_snapshot_chunk");
                            continue;
                        }
                        Inbound::SnapshotChunk(from, chunk)
                    }
                };
                if verified_tx.blocking_send((inbound, charge)).is_err() {
                    break;
                }
            }
        })
        .ok();
    verified_rx
}
