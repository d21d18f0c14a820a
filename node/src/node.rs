//! Starting a replica: storage, recovery, transport, client endpoint, metrics and the
//! runtime, wired together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bulwark_consensus::byzantine::{Behaviours, Byzantine, Forgeable, Forger};
use bulwark_consensus::hotstuff::{
    Block, Config, ExecutionClaim, HotStuff, LeaderReputation, Record, Recovery, TimeoutPolicy,
};
use bulwark_consensus::{Protocol, ProtocolKind, StoredRecord, pbft};
use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bulwark_network::{ClientEndpoint, NetworkConfig, NetworkError, ReplicaNetwork};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::StateMachine;
use crate::app::kv::KvStore;
use crate::app::ledger::Ledger;
use crate::executor::Executor;
use crate::metrics::{Endpoints, Metrics};
use crate::replica::{CoreRebuild, Runtime, RuntimeConfig, RuntimeError, Status, spawn_verifier};
use crate::status::StatusReport;
use crate::storage::{StorageError, Store};
use crate::wire::PeerMessage;

/// Everything one replica needs to run.
pub struct ReplicaSettings {
    pub id: ReplicaId,
    pub committee: Committee,
    pub key: KeyPair,
    pub data_dir: PathBuf,
    /// `host:port` for clients.
    pub client_address: String,
    /// `host:port` for Prometheus scrapes, if any.
    pub metrics_address: Option<String>,
    pub network: NetworkConfig,
    pub runtime: RuntimeConfig,
    pub timeouts: TimeoutPolicy,
    /// Take an application snapshot every this many blocks.
    pub snapshot_every: u64,
    /// Which application the replica runs.
    pub app: AppKind,
    /// TEST ONLY: run the core wrapped in these Byzantine behaviours (see
    /// [`crate::config::NodeConfig::byzantine`]).
    pub byzantine: Option<Behaviours>,
    /// The committee's protocol (the `protocol` key of its file).
    pub protocol: ProtocolKind,
}

/// Sequence numbers a PBFT primary keeps in flight.
pub const PBFT_PIPELINE: u64 = 8;

/// The core a replica runs: HotStuff or PBFT, honest or (test deployments) wrapped in
/// Byzantine behaviours. The choice is made once, here; the runtime cannot tell them
/// apart.
pub type Core<M, R> = Box<dyn Protocol<Message = M, Record = R> + Send>;

/// What building a core needs, apart from the store: taken from the settings once, so
/// the runtime can build the core again after installing a snapshot (as a restart
/// would).
#[derive(Clone)]
pub struct CoreSpec {
    id: ReplicaId,
    committee: Committee,
    key: Arc<KeyPair>,
    timeouts: TimeoutPolicy,
    byzantine: Option<Behaviours>,
}

impl CoreSpec {
    fn of(settings: &ReplicaSettings) -> CoreSpec {
        CoreSpec {
            id: settings.id,
            committee: settings.committee.clone(),
            key: Arc::new(KeyPair::from_seed(*settings.key.secret_bytes())),
            timeouts: settings.timeouts,
            byzantine: settings.byzantine.clone(),
        }
    }

    /// Wraps `core` in the configured Byzantine behaviours, if any. The forger's
    /// choices are seeded from the replica id, so a testnet's attack is the same on
    /// every run.
    fn wrap<P>(&self, core: P) -> Core<P::Message, P::Record>
    where
        P: Protocol + Send + 'static,
        P::Message: Forgeable,
    {
        match &self.byzantine {
            None => Box::new(core),
            Some(behaviours) => {
                let key = KeyPair::from_seed(*self.key.secret_bytes());
                let forger = Forger::new(self.id, key, self.committee.clone(), u64::from(self.id.0));
                Box::new(Byzantine::new(core, behaviours.clone(), forger))
            }
        }
    }
}

/// The applications that ship with Bulwark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Key-value store.
    #[default]
    Kv,
    /// Account ledger with signed transfers.
    Ledger,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("replica {0} is not in the committee")]
    NotAMember(ReplicaId),
    #[error("the key does not match replica {0}'s committee key")]
    WrongKey(ReplicaId),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("metrics address {address}: {reason}")]
    Metrics { address: String, reason: String },
}

/// A running replica.
pub struct RunningReplica {
    pub id: ReplicaId,
    pub client_address: SocketAddr,
    pub metrics_address: Option<SocketAddr>,
    pub status: watch::Receiver<Status>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), RuntimeError>>,
    client_endpoint: ClientEndpoint,
    metrics_task: Option<JoinHandle<()>>,
}

impl RunningReplica {
    /// Stops the replica cleanly: saves a snapshot, closes connections.
    pub async fn stop(self) -> Result<(), RuntimeError> {
        let _ = self.shutdown.send(true);
        let result = self.task.await.unwrap_or(Ok(()));
        self.client_endpoint.shutdown().await;
        if let Some(task) = self.metrics_task {
            task.abort();
        }
        result
    }

    /// Stops the replica as a crash would: no snapshot, no goodbye.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.client_endpoint.shutdown().await;
        if let Some(task) = self.metrics_task {
            task.abort();
        }
    }
}

/// Builds a HotStuff core from what the store holds and what was executed.
fn recover_hotstuff<A: StateMachine>(
    settings: &CoreSpec,
    store: &Store,
    executor: &Executor<A>,
) -> Result<HotStuff, StorageError> {
    let safety = match store.safety::<Record>()? {
        Some(Record::Safety(state)) => Some(state),
        _ => None,
    };
    let blocks: Vec<Block> = store
        .all_chain_records::<Record>()?
        .into_iter()
        .filter_map(|r| match r {
            Record::Block(b) if b.height > executor.height() => Some(b),
            _ => None,
        })
        .collect();
    // The committed chain ending at the root (the last executed block): the root, and
    // the history that seeds the leader election.
    let mut committed: Vec<Block> = Vec::new();
    if executor.height().0 > 0 {
        let wanted = LeaderReputation::history_wanted(&settings.committee);
        for record in store.chain_ending_at::<Record>(executor.last_block(), wanted)? {
            if let Record::Block(b) = record {
                committed.push(b);
            }
        }
        if committed.is_empty() {
            return Err(StorageError::Corrupt {
                cf: "chain",
                key: executor.last_block().to_string(),
                reason: "the last executed block is missing".into(),
            });
        }
        committed.reverse();
    }
    let root = committed.last().cloned();
    let cfg = Config {
        id: settings.id,
        committee: settings.committee.clone(),
        key: KeyPair::from_seed(*settings.key.secret_bytes()),
        timeouts: settings.timeouts,
        sync_batch: 64,
    };
    let recovery = Recovery {
        safety,
        root,
        executed: ExecutionClaim { height: executor.height(), state_digest: executor.state_digest() },
        blocks,
        committed,
    };
    Ok(HotStuff::recover(cfg, recovery))
}

/// Builds a PBFT core from what the store holds and what was executed.
fn recover_pbft<A: StateMachine>(
    settings: &CoreSpec,
    store: &Store,
    executor: &Executor<A>,
) -> Result<pbft::Pbft, StorageError> {
    let safety = match store.safety::<pbft::Record>()? {
        Some(pbft::Record::Safety(state)) => Some(state),
        _ => None,
    };
    let executed = executor.height();
    let oldest = executed.0.saturating_sub(pbft::LOG_INDEX_KEPT as u64);
    let records = store
        .all_chain_records::<pbft::Record>()?
        .into_iter()
        .filter(|r| r.height().is_some_and(|h| h.0 > oldest))
        .collect();
    let cfg = pbft::Config {
        id: settings.id,
        committee: settings.committee.clone(),
        key: KeyPair::from_seed(*settings.key.secret_bytes()),
        timeouts: settings.timeouts,
        pipeline: PBFT_PIPELINE,
    };
    let recovery = pbft::Recovery {
        safety,
        executed,
        executed_state: executor.state_digest(),
        executed_log: (executed.0 > 0).then(|| executor.last_block()),
        records,
    };
    Ok(pbft::Pbft::recover(cfg, recovery))
}

/// Starts a replica running the application `settings.app` names.
pub async fn start_replica(settings: ReplicaSettings) -> Result<RunningReplica, NodeError> {
    match settings.app {
        AppKind::Kv => start_with_app(settings, KvStore::default()).await,
        AppKind::Ledger => {
            let ledger = Ledger::new(settings.committee.chain_id());
            start_with_app(settings, ledger).await
        }
    }
}

/// Starts a replica of the committee's protocol running `app`.
pub async fn start_with_app<A: StateMachine>(
    settings: ReplicaSettings,
    app: A,
) -> Result<RunningReplica, NodeError> {
    let member = settings.committee.member(settings.id).ok_or(NodeError::NotAMember(settings.id))?;
    if member.public_key != settings.key.public() {
        return Err(NodeError::WrongKey(settings.id));
    }
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|e| StorageError::Open { path: settings.data_dir.clone(), reason: e.to_string() })?;
    let store = Store::open(&settings.data_dir, settings.committee.chain_id())?;
    let mut executor = Executor::new(app, settings.snapshot_every);
    let spec = CoreSpec::of(&settings);
    match settings.protocol {
        ProtocolKind::HotStuff => {
            executor.recover::<Record>(&store)?;
            // HotStuff restarts from the block it executed last: a snapshot installed
            // from peers must come with that block.
            let rebuild = CoreRebuild {
                needs_anchor: true,
                build: Box::new(move |store, executor| {
                    Ok(spec.wrap(recover_hotstuff(&spec, store, executor)?))
                }),
            };
            let core = (rebuild.build)(&store, &executor)?;
            launch(settings, store, executor, core, rebuild).await
        }
        ProtocolKind::Pbft => {
            executor.recover::<pbft::Record>(&store)?;
            let rebuild = CoreRebuild {
                needs_anchor: false,
                build: Box::new(move |store, executor| Ok(spec.wrap(recover_pbft(&spec, store, executor)?))),
            };
            let core = (rebuild.build)(&store, &executor)?;
            launch(settings, store, executor, core, rebuild).await
        }
    }
}

/// Runs a recovered core: transport, verification, client endpoint, metrics and the
/// runtime.
async fn launch<A, M, R>(
    settings: ReplicaSettings,
    store: Store,
    executor: Executor<A>,
    core: Core<M, R>,
    rebuild: CoreRebuild<Core<M, R>, A>,
) -> Result<RunningReplica, NodeError>
where
    A: StateMachine,
    M: bulwark_consensus::WireMessage + Sync,
    R: StoredRecord,
{
    tracing::info!(replica = %settings.id, protocol = %settings.protocol, height = %executor.height(), "recovered");
    if let Some(behaviours) = &settings.byzantine {
        tracing::warn!(replica = %settings.id, %behaviours, "TEST ONLY: this replica runs Byzantine behaviours");
    }

    let metrics = Arc::new(Metrics::default());
    let byzantine = settings.byzantine.as_ref().map(|b| b.to_string());
    if let Some(behaviours) = &byzantine {
        metrics.byzantine.get_or_create(&crate::metrics::label("behaviours", behaviours)).set(1);
    }
    let recovered = Status {
        byzantine: byzantine.clone(),
        height: executor.height(),
        state_digest: executor.state_digest(),
        ..Status::default()
    };
    let (status_tx, status) = watch::channel(recovered);
    let committee = Arc::new(settings.committee.clone());
    let (network, raw_inbound) = ReplicaNetwork::<PeerMessage<M>>::start(
        settings.network.clone(),
        settings.committee.clone(),
        settings.id,
        &settings.key,
    )
    .await?;
    let (client_endpoint, clients) =
        ClientEndpoint::bind(settings.network.clone(), settings.id, &settings.key, &settings.client_address)
            .await?;
    let client_address = client_endpoint.local_addr();

    let network_counters = network.counters().clone();
    let client_counters = client_endpoint.counters().clone();
    let (metrics_address, metrics_task) = match &settings.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| NodeError::Metrics { address: address.clone(), reason: e.to_string() })?;
            let local = listener.local_addr().ok();
            let m = metrics.clone();
            let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                Metrics::sync_counters(&m.network, "event", &network_counters.snapshot().entries());
                Metrics::sync_counters(&m.client_network, "event", &client_counters.snapshot().entries());
            });
            let (m, watched, id, peers) =
                (metrics.clone(), status.clone(), settings.id, settings.committee.size() - 1);
            let status_json: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                let report = StatusReport::new(id, &watched.borrow(), &m, peers);
                serde_json::to_string(&report).unwrap_or_default()
            });
            let endpoints = Endpoints { metrics: metrics.clone(), refresh, status: status_json };
            (local, Some(tokio::spawn(crate::metrics::serve(listener, endpoints))))
        }
        None => (None, None),
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let peers = settings.committee.ids().filter(|p| *p != settings.id).collect();
    let runtime = Runtime::new(
        settings.id,
        core,
        store,
        network,
        executor,
        settings.runtime,
        metrics.clone(),
        status_tx,
        peers,
        rebuild,
    );
    let inbound = spawn_verifier(raw_inbound, committee, metrics.clone(), runtime.transferring());
    let task = tokio::spawn(async move {
        let network = runtime.run(inbound, clients, shutdown_rx).await?;
        network.shutdown().await;
        Ok(())
    });
    Ok(RunningReplica {
        id: settings.id,
        client_address,
        metrics_address,
        status,
        metrics,
        shutdown,
        task,
        client_endpoint,
        metrics_task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_consensus::hotstuff::{Message, Proposal, QuorumCert};
    use bulwark_consensus::{Input, Payload, Protocol, Round, Time};
    use bulwark_crypto::Verified;

    fn settings(committee: &Committee, keys: &[KeyPair], id: u16, dir: &std::path::Path) -> ReplicaSettings {
        ReplicaSettings {
            id: ReplicaId(id),
            committee: committee.clone(),
            key: KeyPair::from_seed(*keys[id as usize].secret_bytes()),
            data_dir: dir.to_path_buf(),
            client_address: "127.0.0.1:0".into(),
            metrics_address: None,
            network: NetworkConfig::default(),
            runtime: crate::replica::RuntimeConfig::default(),
            timeouts: TimeoutPolicy { base_ms: 1000, max_ms: 8000 },
            snapshot_every: 10,
            app: AppKind::Kv,
            byzantine: None,
            protocol: ProtocolKind::HotStuff,
        }
    }

    /// Crash between persisting the safety state and sending the vote: the store holds
    /// the vote's safety record, the vote never left. After a restart from RocksDB the
    /// replica must not vote for a different block in that round.
    #[test]
    fn a_crash_after_persisting_a_vote_never_leads_to_a_second_vote() {
        let (committee, keys) = Committee::deterministic("crash-vote", 4, 7000).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&committee, &keys, 3, dir.path());
        let genesis = Block::genesis(&committee);
        let block = |payload: u8| Block {
            round: Round(1),
            height: bulwark_consensus::Height(1),
            parent: genesis.digest(),
            justify: QuorumCert::genesis(&committee),
            author: ReplicaId(1),
            executed: ExecutionClaim::default(),
            payload: Payload(vec![payload]),
        };
        let proposal = |b: Block| {
            let msg = Message::Proposal(Proposal::new(b, &keys[1], &committee, None));
            Verified::check(msg, &committee).unwrap()
        };
        {
            let store = Store::open(dir.path(), committee.chain_id()).unwrap();
            let executor = Executor::new(KvStore::default(), 10);
            let mut core = recover_hotstuff(&CoreSpec::of(&s), &store, &executor).unwrap();
            core.handle(Time(0), Input::Start);
            let actions =
                core.handle(Time(1), Input::Message { from: ReplicaId(1), msg: proposal(block(1)) });
            assert!(actions.send.iter().any(|o| matches!(o.msg, Message::Vote(_))), "it votes");
            store.persist(&actions.persist).unwrap();
            // Crash: the store is dropped, the vote is never sent.
        }
        let store = Store::open(dir.path(), committee.chain_id()).unwrap();
        let executor = Executor::new(KvStore::default(), 10);
        let mut core = recover_hotstuff(&CoreSpec::of(&s), &store, &executor).unwrap();
        core.handle(Time(0), Input::Start);
        let again = core.handle(Time(1), Input::Message { from: ReplicaId(1), msg: proposal(block(2)) });
        assert!(!again.send.iter().any(|o| matches!(o.msg, Message::Vote(_))), "no second vote in round 1");
    }
}
