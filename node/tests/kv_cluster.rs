//! In-process clusters over real QUIC on 127.0.0.1 with RocksDB in temp dirs.

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_consensus::ProtocolKind;
use bulwark_consensus::hotstuff::TimeoutPolicy;
use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bulwark_network::{NetworkConfig, NetworkError};
use bulwark_node::app::kv::{KvOp, KvResult};
use bulwark_node::client::Client;
use bulwark_node::node::{AppKind, NodeError, ReplicaSettings, RunningReplica, start_replica};
use bulwark_node::replica::RuntimeConfig;

struct Cluster {
    app: AppKind,
    protocol: ProtocolKind,
    committee: Committee,
    keys: Vec<KeyPair>,
    dirs: Vec<tempfile::TempDir>,
    client_ports: Vec<u16>,
    runtime: RuntimeConfig,
    timeouts: TimeoutPolicy,
    snapshot_every: u64,
    replicas: Vec<Option<RunningReplica>>,
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

fn settings(c: &Cluster, i: usize) -> ReplicaSettings {
    ReplicaSettings {
        id: ReplicaId(i as u16),
        committee: c.committee.clone(),
        key: KeyPair::from_seed(*c.keys[i].secret_bytes()),
        data_dir: c.dirs[i].path().to_path_buf(),
        client_address: format!("127.0.0.1:{}", c.client_ports[i]),
        metrics_address: Some("127.0.0.1:0".into()),
        network: NetworkConfig {
            reconnect_max_backoff: Duration::from_millis(500),
            ..NetworkConfig::default()
        },
        runtime: c.runtime.clone(),
        timeouts: c.timeouts,
        snapshot_every: c.snapshot_every,
        app: c.app,
        byzantine: None,
        protocol: c.protocol,
    }
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_app(n, AppKind::Kv).await
    }

    async fn start_app(n: usize, app: AppKind) -> Cluster {
        Cluster::start_with(n, app, ProtocolKind::HotStuff).await
    }

    /// Ports are picked free and bound moments later, so a test running beside this
    /// one may take one in between: a cluster whose port was taken is built again with
    /// new ones (a few times).
    async fn start_with(n: usize, app: AppKind, protocol: ProtocolKind) -> Cluster {
        // Short round timeouts: with round-robin leaders, a crashed replica's rounds each
        // cost one timeout.
        let timeouts = TimeoutPolicy { base_ms: 300, max_ms: 1200 };
        Cluster::start_tuned(n, app, protocol, RuntimeConfig::default(), timeouts, 50).await
    }

    async fn start_tuned(
        n: usize,
        app: AppKind,
        protocol: ProtocolKind,
        runtime: RuntimeConfig,
        timeouts: TimeoutPolicy,
        snapshot_every: u64,
    ) -> Cluster {
        let mut attempt = 0;
        loop {
            match Cluster::try_start(n, app, protocol, runtime.clone(), timeouts, snapshot_every).await {
                Ok(cluster) => return cluster,
                Err(NodeError::Network(NetworkError::Bind { address, reason })) if attempt < 5 => {
                    eprintln!("port {address} taken ({reason}); new ports");
                    attempt += 1;
                }
                Err(e) => panic!("replica starts: {e}"),
            }
        }
    }

    async fn try_start(
        n: usize,
        app: AppKind,
        protocol: ProtocolKind,
        runtime: RuntimeConfig,
        timeouts: TimeoutPolicy,
        snapshot_every: u64,
    ) -> Result<Cluster, NodeError> {
        let keys: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate()).collect();
        let committee =
            Committee::from_keys("kv-cluster-test", &keys, |_| format!("127.0.0.1:{}", free_udp_port()))
                .expect("committee");
        let mut cluster = Cluster {
            app,
            protocol,
            committee,
            keys,
            dirs: (0..n).map(|_| tempfile::tempdir().expect("tempdir")).collect(),
            client_ports: (0..n).map(|_| free_udp_port()).collect(),
            runtime,
            timeouts,
            snapshot_every,
            replicas: Vec::new(),
        };
        for i in 0..n {
            match start_replica(settings(&cluster, i)).await {
                Ok(replica) => cluster.replicas.push(Some(replica)),
                Err(e) => {
                    for replica in cluster.replicas.into_iter().flatten() {
                        replica.kill().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(cluster)
    }

    fn endpoints(&self) -> Vec<(ReplicaId, SocketAddr)> {
        (0..self.client_ports.len())
            .map(|i| {
                (ReplicaId(i as u16), format!("127.0.0.1:{}", self.client_ports[i]).parse().expect("addr"))
            })
            .collect()
    }

    async fn client(&self) -> Client {
        let config = NetworkConfig::default();
        let mut client =
            Client::connect(&self.committee, &self.endpoints(), None, config).await.expect("client");
        client.timeout = Duration::from_secs(30);
        client
    }

    /// Every running replica has the same state digest at the heights they all recently
    /// executed.
    fn assert_same_digests(&self) {
        let histories: Vec<_> =
            self.replicas.iter().flatten().map(|r| r.status.borrow().recent_digests.clone()).collect();
        for other in &histories[1..] {
            for (height, digest) in other {
                if let Some((_, ours)) = histories[0].iter().find(|(h, _)| h == height) {
                    assert_eq!(ours, digest, "digests differ at height {height}");
                }
            }
        }
    }

    /// Starts replica `i` again, waiting for its ports to be free (a replica killed a
    /// moment ago may still hold them).
    async fn restart(&mut self, i: usize) {
        let mut last = None;
        for _ in 0..150 {
            match start_replica(settings(self, i)).await {
                Ok(replica) => {
                    self.replicas[i] = Some(replica);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("replica {i} did not restart: {last:?}");
    }

    async fn stop(self) {
        for replica in self.replicas.into_iter().flatten() {
            let _ = replica.stop().await;
        }
    }
}

fn put(i: usize) -> Vec<u8> {
    KvOp::Put { key: format!("key-{i:05}").into_bytes(), value: format!("value-{i}").into_bytes() }.encode()
}

fn get(i: usize) -> Vec<u8> {
    KvOp::Get { key: format!("key-{i:05}").into_bytes() }.encode()
}

async fn write_then_read(n: usize, keys: usize, protocol: ProtocolKind) {
    let cluster = Cluster::start_with(n, AppKind::Kv, protocol).await;
    let mut client = cluster.client().await;
    for i in 0..keys {
        client.submit(put(i)).await;
    }
    for _ in 0..keys {
        let certified = client.next_certified().await.expect("f+1 replies").expect("not rejected");
        assert_eq!(KvResult::decode(&certified.result), Some(KvResult::Done));
        assert!(certified.replicas.len() > cluster.committee.max_faulty());
    }
    let mut reads = std::collections::HashMap::new();
    for i in 0..keys {
        let sequence = client.submit(get(i)).await;
        reads.insert(sequence, i);
    }
    for _ in 0..keys {
        let certified = client.next_certified().await.expect("f+1 replies").expect("not rejected");
        let i = reads[&certified.sequence];
        assert_eq!(
            KvResult::decode(&certified.result),
            Some(KvResult::Value(Some(format!("value-{i}").into_bytes())))
        );
    }
    // A local read from one replica, marked with its height.
    let (height, bytes) = client.read_local(ReplicaId(0), get(7)).await.expect("local read");
    assert!(height.0 > 0);
    assert_eq!(KvResult::decode(&bytes), Some(KvResult::Value(Some(b"value-7".to_vec()))));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_replicas_write_and_read_1000_keys() {
    write_then_read(4, 1000, ProtocolKind::HotStuff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pbft_four_replicas_write_and_read_1000_keys() {
    write_then_read(4, 1000, ProtocolKind::Pbft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seven_replicas_write_and_read_1000_keys() {
    write_then_read(7, 1000, ProtocolKind::HotStuff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_replica_catches_up_to_the_same_state() {
    restarted_replica_catches_up(ProtocolKind::HotStuff, 3).await;
}

/// PBFT: kill the primary of view 0 under load; a view change replaces it, writes go
/// on, and the restarted replica catches up (state transfer) to the same digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pbft_a_killed_primary_is_replaced_and_catches_up_after_restart() {
    restarted_replica_catches_up(ProtocolKind::Pbft, 0).await;
}

async fn restarted_replica_catches_up(protocol: ProtocolKind, victim: usize) {
    let mut cluster = Cluster::start_with(4, AppKind::Kv, protocol).await;
    let mut client = cluster.client().await;
    for i in 0..100 {
        client.execute(put(i)).await.expect("write");
        if i == 30 {
            // Crash the victim (no clean shutdown) while writes go on.
            cluster.replicas[victim].take().expect("running").kill().await;
        }
    }
    let replica = start_replica(settings(&cluster, victim)).await.expect("restart");
    cluster.replicas[victim] = Some(replica);
    let other = (victim + 1) % 4;
    // The restarted replica must reach the others' height with the same digest.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        client.execute(put(1_000)).await.expect("write");
        let statuses: Vec<_> = cluster.replicas.iter().flatten().map(|r| r.status.borrow().clone()).collect();
        let target = statuses[other].height;
        if statuses[victim].height >= target {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica {victim} did not catch up: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Compare digests at the heights both replicas executed recently.
    let history =
        |i: usize| cluster.replicas[i].as_ref().expect("running").status.borrow().recent_digests.clone();
    let (ours, theirs) = (history(victim), history(other));
    let common: Vec<_> = ours.iter().filter(|entry| theirs.contains(entry)).collect();
    let heights: std::collections::HashSet<_> = theirs.iter().map(|(h, _)| *h).collect();
    for (height, digest) in &ours {
        if heights.contains(height) {
            assert!(theirs.contains(&(*height, *digest)), "digest differs at height {height}");
        }
    }
    assert!(!common.is_empty(), "no common height observed");
    let restarted = cluster.replicas[victim].as_ref().expect("running");
    eprintln!("restarted replica's batch events: {}", batch_events(restarted));
    // No acknowledged write was lost: all 200 keys read back through consensus.
    for i in (0..100).step_by(7) {
        let certified = client.execute(get(i)).await.expect("read");
        assert_eq!(
            KvResult::decode(&certified.result),
            Some(KvResult::Value(Some(format!("value-{i}").into_bytes())))
        );
    }
    cluster.stop().await;
}

/// A replica down for hundreds of blocks installs a snapshot that f + 1 peers offer
/// (instead of replaying every block), reaches the others' digests, serves the keys
/// written while it was down from its own state, and restarts from the installed
/// snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_far_behind_installs_a_snapshot_from_its_peers() {
    replica_far_behind_installs_a_snapshot(ProtocolKind::HotStuff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pbft_a_replica_far_behind_installs_a_snapshot_from_its_peers() {
    replica_far_behind_installs_a_snapshot(ProtocolKind::Pbft).await;
}

async fn replica_far_behind_installs_a_snapshot(protocol: ProtocolKind) {
    const VICTIM: usize = 3;
    const LAG: u64 = 300;
    // The others build a long chain fast while the victim is down: idle leaders propose
    // at once, and the dead leader's rounds cost little.
    let runtime = RuntimeConfig { idle_proposal_delay: Duration::from_millis(1), ..RuntimeConfig::default() };
    let timeouts = TimeoutPolicy { base_ms: 60, max_ms: 600 };
    // Snapshots every 50 blocks at 100+ blocks a second would replace each other faster
    // than offers travel (the default snapshots every 4,000, at up to a few hundred a second).
    let mut cluster = Cluster::start_tuned(4, AppKind::Kv, protocol, runtime, timeouts, 400).await;
    let started = std::time::Instant::now();
    let mut client = cluster.client().await;
    client.execute(put(0)).await.expect("write");
    cluster.replicas[VICTIM].take().expect("running").kill().await;
    let height = |c: &Cluster, i: usize| c.replicas[i].as_ref().expect("running").status.borrow().height;
    let mut written = 1;
    // HotStuff: more blocks than its orphan pool (1,024), so block-by-block catch-up is
    // slow; PBFT: beyond its 8,192-entry log index, so only a snapshot can help.
    let gap = if protocol == ProtocolKind::Pbft { 9000 } else { 2000 };
    while height(&cluster, 0).0 < gap {
        client.execute(put(written)).await.expect("write");
        written += 1;
    }
    eprintln!("{:?}: the others are at height {}", started.elapsed(), height(&cluster, 0));
    let (target, written_before) = (height(&cluster, 0), written);
    let mut victim = settings(&cluster, VICTIM);
    victim.runtime.state_transfer_lag = LAG;
    cluster.replicas[VICTIM] = Some(start_replica(victim).await.expect("restart"));
    // Installed at least once, and past the height the others had when it restarted
    // (the idle cluster runs flat out, so "level with them" would be a race).
    let installed = |c: &Cluster| snapshot_events(c, VICTIM).contains("transfer_installed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !(installed(&cluster) && height(&cluster, VICTIM) >= target) {
        client.execute(put(written)).await.expect("write");
        written += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot installed and caught up: {}",
            snapshot_events(&cluster, VICTIM)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{:?}: victim's snapshot events: {}", started.elapsed(), snapshot_events(&cluster, VICTIM));
    cluster.assert_same_digests();
    // Keys written while it was down are in its own state.
    let mut reader = cluster.client().await;
    for i in (1..written_before).step_by(37) {
        let (_, result) = reader.read_local(ReplicaId(VICTIM as u16), get(i)).await.expect("local read");
        assert_eq!(KvResult::decode(&result), Some(KvResult::Value(Some(format!("value-{i}").into_bytes()))));
    }
    // A crash after the install restarts from the installed snapshot (or a later one).
    let before = height(&cluster, VICTIM);
    cluster.replicas[VICTIM].take().expect("running").kill().await;
    cluster.restart(VICTIM).await;
    assert!(height(&cluster, VICTIM) >= before, "restarted below where it was");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while height(&cluster, VICTIM).0 < before.0 + 100 {
        client.execute(put(written)).await.expect("write");
        written += 1;
        assert!(tokio::time::Instant::now() < deadline, "no progress after the second restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.assert_same_digests();
    cluster.stop().await;
}

fn snapshot_events(cluster: &Cluster, i: usize) -> String {
    metric_lines(cluster.replicas[i].as_ref().expect("running"), "bulwark_snapshots_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_client_input_gets_clear_errors_and_changes_nothing() {
    use bulwark_network::ClientConnection;
    use bulwark_node::wire::{MAX_OP_BYTES, Outcome, Rejection, Replies, Request, RequestKind, client_id_of};

    let cluster = Cluster::start(4).await;
    let endpoints = cluster.endpoints();
    let connect = |key: Option<KeyPair>| {
        let committee = cluster.committee.clone();
        let (replica, address) = endpoints[0];
        async move {
            ClientConnection::<Request, Replies>::connect(
                NetworkConfig::default(),
                &committee,
                replica,
                address,
                key.as_ref(),
            )
            .await
            .expect("connect")
        }
    };

    // Oversized operation: refused before ordering.
    let mut raw = connect(None).await;
    let big =
        Request { client: 7, sequence: 1, kind: RequestKind::Ordered, op: vec![0; MAX_OP_BYTES + 1].into() };
    raw.send(&big).await.expect("send");
    let reply = raw.recv().await.expect("reply").remove(0);
    assert_eq!(
        reply.outcome,
        Outcome::Rejected(Rejection::TooLarge { len: MAX_OP_BYTES + 1, limit: MAX_OP_BYTES })
    );

    // A client that presented a key cannot speak for another client id.
    let key = KeyPair::generate();
    let mut keyed = connect(Some(KeyPair::from_seed(*key.secret_bytes()))).await;
    let forged = Request {
        client: client_id_of(&key.public()) ^ 1,
        sequence: 1,
        kind: RequestKind::Ordered,
        op: put(1).into(),
    };
    keyed.send(&forged).await.expect("send");
    assert!(matches!(
        keyed.recv().await.expect("reply").remove(0).outcome,
        Outcome::Rejected(Rejection::WrongClientId { .. })
    ));

    // A malformed operation is ordered and refused identically by every replica.
    let mut client = cluster.client().await;
    let certified = client.execute(vec![0xde, 0xad, 0xbe, 0xef]).await.expect("f+1 replies");
    assert!(matches!(KvResult::decode(&certified.result), Some(KvResult::Invalid(_))));

    // A replayed request executes once: the replay gets the original reply.
    let replica0 = cluster.replicas[0].as_ref().expect("running");
    let caught_up = |height| async move {
        while replica0.status.borrow().height < height {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let first = client.execute(put(42)).await.expect("write");
    caught_up(first.height).await;
    let executed_before = replica0.metrics.transactions_executed.get();
    let replay = Request {
        client: client.id(),
        sequence: first.sequence,
        kind: RequestKind::Ordered,
        op: put(42).into(),
    };
    raw.send(&replay).await.expect("send");
    let reply = 'found: loop {
        for reply in raw.recv().await.expect("replies") {
            if reply.sequence == first.sequence {
                break 'found reply;
            }
        }
    };
    assert_eq!(reply.height, first.height, "the replay is answered from the original execution");
    // Later traffic commits; the replayed request is not executed again anywhere.
    let last = client.execute(put(43)).await.expect("write");
    caught_up(last.height).await;
    let executed_after = replica0.metrics.transactions_executed.get();
    assert_eq!(executed_after, executed_before + 1, "only put(43) executed");

    // Every replica has the same digest at the heights they share.
    cluster.assert_same_digests();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_transfers_from_concurrent_clients_conserve_supply() {
    use bulwark_node::app::ledger::{LedgerOp, LedgerResult, OPENING_BALANCE};
    use bulwark_node::client::ClientError;

    let cluster = Cluster::start_app(4, AppKind::Ledger).await;
    let chain = cluster.committee.chain_id();
    let owners: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
    let mut setup = cluster.client().await;
    for owner in &owners {
        let opened =
            setup.execute(LedgerOp::Open { owner: owner.public().to_bytes() }.encode()).await.expect("open");
        assert_eq!(
            LedgerResult::decode(&opened.result),
            Some(LedgerResult::Opened { balance: OPENING_BALANCE })
        );
    }
    let publics: Vec<_> = owners.iter().map(|k| k.public()).collect();
    let mut tasks = Vec::new();
    for (i, owner) in owners.iter().enumerate() {
        let mut client = cluster.client().await;
        let key = KeyPair::from_seed(*owner.secret_bytes());
        let to = publics[(i + 1) % publics.len()];
        tasks.push(tokio::spawn(async move {
            for nonce in 0..15u64 {
                let op = LedgerOp::signed_transfer(&key, chain, &to, 10 + nonce, nonce);
                let done = client.execute(op.encode()).await.expect("transfer");
                assert!(matches!(LedgerResult::decode(&done.result), Some(LedgerResult::Transferred { .. })));
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    // A transfer signed by the wrong key is refused before ordering, with a clear error.
    let forged = LedgerOp::signed_transfer(&owners[1], chain, &publics[2], 1, 0);
    let LedgerOp::Transfer { signature, .. } = forged else { unreachable!() };
    let real = LedgerOp::signed_transfer(&owners[0], chain, &publics[2], 1, 15);
    let LedgerOp::Transfer { transfer, .. } = real else { unreachable!() };
    let err = setup.execute(LedgerOp::Transfer { transfer, signature }.encode()).await.unwrap_err();
    assert!(matches!(err, ClientError::Rejected(_)), "{err}");
    // Balances agree (f+1 matching replies) and the supply is conserved.
    let mut total = 0u64;
    for public in &publics {
        let reply =
            setup.execute(LedgerOp::Balance { owner: public.to_bytes() }.encode()).await.expect("balance");
        let Some(LedgerResult::Balance(Some(balance))) = LedgerResult::decode(&reply.result) else {
            panic!("no balance")
        };
        total += balance;
    }
    assert_eq!(total, 3 * OPENING_BALANCE);
    cluster.assert_same_digests();
    cluster.stop().await;
}

/// A replica's batch counters, for the log of a test.
fn batch_events(replica: &RunningReplica) -> String {
    metric_lines(replica, "bulwark_batches_total")
}

/// A replica's metric lines of one family, joined (for logs and assertions).
fn metric_lines(replica: &RunningReplica, family: &str) -> String {
    replica.metrics.render().lines().filter(|l| l.starts_with(family)).collect::<Vec<_>>().join(", ")
}
