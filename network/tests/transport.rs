//! The transport on 127.0.0.1: the "Show" points of the QUIC transport issue.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bulwark_crypto::{KeyPair, ReplicaId};
use bulwark_network::identity::{Identity, replica_name};
use bulwark_network::{NetworkConfig, ReplicaNetwork, SendError, close_code};
use common::*;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

const PER_PEER: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_in_random_start_order_exchange_all_to_all_in_order() {
    let seed: u64 = rand::random();
    println!("seed {seed} (start order and delays)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config = test_config();
    let (committee, keys, sockets) = committee(4);
    let mut sockets: Vec<_> = sockets.into_iter().map(Some).collect();
    let mut order: Vec<u16> = (0..4).collect();
    order.shuffle(&mut rng);

    let mut networks = BTreeMap::new();
    for &id in &order {
        let socket = sockets[usize::from(id)].take().unwrap();
        let (network, inbound) = start(&config, &committee, &keys, id, socket).await;
        let me = ReplicaId(id);
        // Send at once, before later peers exist: queued, delivered once connected.
        for seq in 0..PER_PEER / 2 {
            assert_eq!(network.broadcast(&msg(me, seq, 100 + seq as usize)).unwrap(), 3);
        }
        for seq in PER_PEER / 2..PER_PEER {
            for to in committee.ids().filter(|&to| to != me) {
                network.send(to, &msg(me, seq, 100 + seq as usize)).unwrap();
            }
        }
        networks.insert(id, (network, inbound));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
    }

    for (id, (network, inbound)) in networks.iter_mut() {
        let got = receive(inbound, 3 * PER_PEER as usize).await;
        let mut next: BTreeMap<ReplicaId, u64> = BTreeMap::new();
        for (sender, m) in got {
            assert_eq!(sender, ReplicaId(m.from), "authenticated sender must be the author");
            assert_ne!(sender, ReplicaId(*id));
            let expected = next.entry(sender).or_insert(0);
            assert_eq!(m.seq, *expected, "in order from {sender}");
            assert_eq!(m.body, vec![m.seq as u8; 100 + m.seq as usize]);
            *expected += 1;
        }
        assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![PER_PEER; 3]);
        let counters = network.counters().snapshot();
        assert_eq!(counters.messages_received, 3 * PER_PEER);
        assert_eq!(counters.send_dropped_queue_full, 0);
        assert_eq!(counters.frame_malformed + counters.frame_too_large, 0);
    }
    // Sending to ourselves or to a stranger is refused and counted.
    let (network, _) = &networks[&0];
    assert_eq!(
        network.send(ReplicaId(0), &msg(ReplicaId(0), 0, 1)),
        Err(SendError::UnknownPeer(ReplicaId(0)))
    );
    assert_eq!(
        network.send(ReplicaId(9), &msg(ReplicaId(0), 0, 1)),
        Err(SendError::UnknownPeer(ReplicaId(9)))
    );
    assert_eq!(network.counters().snapshot().send_dropped_unknown_peer, 2);
    let too_big = msg(ReplicaId(0), 0, 2 << 20);
    assert!(matches!(network.send(ReplicaId(1), &too_big), Err(SendError::TooLarge { .. })));
    assert_eq!(network.counters().snapshot().send_dropped_too_large, 1);
    for (_, (network, _)) in networks {
        network.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_are_refused_at_the_handshake_and_counted() {
    let config = test_config();
    let (committee, keys, mut sockets) = committee(4);
    // Replica 3's address is held by an impostor with its own key.
    let impostor_socket = sockets.pop().unwrap();
    let mut started = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        started.push(start(&config, &committee, &keys, id as u16, socket).await);
    }
    let stranger = KeyPair::generate();

    // Inbound: a key outside the committee claiming to be replica 3.
    let impostor = Identity::self_signed(&stranger, &replica_name(ReplicaId(3))).unwrap();
    expect_refused(&committee, &impostor, ReplicaId(0), address(&committee, ReplicaId(0))).await;
    eventually("unknown key counted", || {
        started[0].0.counters().snapshot().handshake_refused_unknown_key >= 1
    })
    .await;

    // Inbound: member 1's own key, claiming to be member 2.
    let liar = Identity::self_signed(&keys[1], &replica_name(ReplicaId(2))).unwrap();
    expect_refused(&committee, &liar, ReplicaId(0), address(&committee, ReplicaId(0))).await;
    eventually("wrong identity counted", || {
        started[0].0.counters().snapshot().handshake_refused_wrong_identity >= 1
    })
    .await;

    // Outbound: the impostor listens on replica 3's address; every dialer refuses it.
    let impostor_server = bulwark_network::tls::replica_server_config(
        &config,
        std::sync::Arc::new(committee.clone()),
        &Identity::self_signed(&stranger, &replica_name(ReplicaId(3))).unwrap(),
        Default::default(),
    )
    .unwrap();
    let impostor_endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(impostor_server),
        impostor_socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let acceptor = impostor_endpoint.clone();
    let impostor_task = tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            tokio::spawn(async move {
                if let Ok(connecting) = incoming.accept() {
                    let _ = connecting.await;
                }
            });
        }
    });
    eventually("dialers refuse the impostor server", || {
        let refused = |i: usize| started[i].0.counters().snapshot().handshake_refused_unknown_key;
        refused(0) >= 2 && refused(1) >= 1 && refused(2) >= 1
    })
    .await;
    assert!(started.iter().all(|(n, _)| !n.is_connected(ReplicaId(3))));

    // Nothing from the impostors reached anyone, and the honest replicas still talk.
    for (network, _) in &started {
        network.broadcast(&msg(network.id(), 0, 10)).unwrap();
    }
    for (network, inbound) in &mut started {
        let got = receive(inbound, 2).await;
        assert!(got.iter().all(|(from, m)| from.0 == m.from && *from != network.id() && from.0 < 3));
        assert_eq!(network.counters().snapshot().connections_accepted, 2);
    }
    impostor_task.abort();
    impostor_endpoint.close(0u32.into(), b"");
    for (network, _) in started {
        network.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_close_only_that_connection() {
    let config = test_config();
    // Five members: 0..=3 run the transport, 4 is Byzantine and speaks raw QUIC.
    let (committee, keys, mut sockets) = committee(5);
    let _byzantine_socket = sockets.pop();
    let mut started = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        started.push(start(&config, &committee, &keys, id as u16, socket).await);
    }
    let target = address(&committee, ReplicaId(0));
    // A Byzantine member's real key and name, so it passes the handshake.
    let byzantine = Identity::self_signed(&keys[4], &replica_name(ReplicaId(4))).unwrap();

    // A 4 GiB length prefix. Memory stays bounded: the decoder refuses the prefix
    // before buffering (unit-tested in framing.rs, where capacity is observable).
    let (_ep1, connection) = raw_dial(&committee, &byzantine, ReplicaId(0), target).await.unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    let mut frame = u32::MAX.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xAB; 1000]);
    let _ = stream.write_all(&frame).await;
    let reason = within("oversized frame closes the connection", connection.closed()).await;
    assert!(is_closed_with(&reason, close_code::FRAME_TOO_LARGE), "{reason}");
    assert_eq!(started[0].0.counters().snapshot().frame_too_large, 1);

    // A well-sized frame whose body is not a message.
    let (_ep2, connection) = raw_dial(&committee, &byzantine, ReplicaId(0), target).await.unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    let mut frame = 32u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xFF; 32]);
    let _ = stream.write_all(&frame).await;
    let reason = within("malformed frame closes the connection", connection.closed()).await;
    assert!(is_closed_with(&reason, close_code::MALFORMED_FRAME), "{reason}");
    assert_eq!(started[0].0.counters().snapshot().frame_malformed, 1);

    // Random garbage (fixed seed, so the outcome is reproducible).
    let mut garbage = vec![0u8; 64 << 10];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut garbage);
    let (_ep3, connection) = raw_dial(&committee, &byzantine, ReplicaId(0), target).await.unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    let _ = stream.write_all(&garbage).await;
    let _ = stream.finish();
    let reason = within("garbage closes the connection", connection.closed()).await;
    assert!(
        is_closed_with(&reason, close_code::FRAME_TOO_LARGE)
            || is_closed_with(&reason, close_code::MALFORMED_FRAME),
        "{reason}"
    );
    let counters = started[0].0.counters().snapshot();
    assert_eq!(counters.frame_too_large + counters.frame_malformed, 3);
    assert_eq!(counters.messages_received, 0);

    // The honest connections are unaffected.
    for (network, _) in &started {
        network.broadcast(&msg(network.id(), 1, 64)).unwrap();
    }
    for (network, inbound) in &mut started {
        let got = receive(inbound, 3).await;
        let mut senders: Vec<u16> = got
            .iter()
            .map(|(from, m)| {
                assert_eq!(from.0, m.from);
                m.from
            })
            .collect();
        senders.sort();
        let expected: Vec<u16> = (0..4).filter(|&i| i != network.id().0).collect();
        assert_eq!(senders, expected);
    }
    for (network, _) in started {
        network.shutdown().await;
    }
}

fn is_closed_with(reason: &quinn::ConnectionError, code: u32) -> bool {
    matches!(reason, quinn::ConnectionError::ApplicationClosed(close) if close.error_code == code.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shut_down_and_restarted_peer_is_reconnected() {
    let config = test_config();
    let (committee, keys, sockets) = committee(4);
    let mut started = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        started.push(Some(start(&config, &committee, &keys, id as u16, socket).await));
    }
    let from = ReplicaId(0);
    let victim = ReplicaId(3);
    started[0].as_ref().unwrap().0.send(victim, &msg(from, 0, 8)).unwrap();
    let got = receive(&mut started[3].as_mut().unwrap().1, 1).await;
    assert_eq!(got[0].0, from);

    // Stop replica 3 (it tells its peers) and bring it back on the same address.
    let (victim_network, _) = started[3].take().unwrap();
    victim_network.shutdown().await;
    let addr = address(&committee, victim);
    let socket = within("rebinding the same address", async {
        loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(socket) => return socket,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let (restarted, mut inbound) = start(&config, &committee, &keys, 3, socket).await;

    // Messages sent while the old connection is being found dead may be lost (at most
    // once); keep sending until the restarted replica hears from replica 0.
    let sender = &started[0].as_ref().unwrap().0;
    let mut seq = 1;
    let got = within("restarted replica receives from replica 0", async {
        loop {
            let _ = sender.send(victim, &msg(from, seq, 8));
            seq += 1;
            tokio::select! {
                got = inbound.recv() => match got {
                    Some((sender_id, m, _)) if sender_id == from => return m,
                    Some(_) => {}
                    None => panic!("transport stopped"),
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    assert!(got.seq >= 1);
    assert!(sender.counters().snapshot().connections_established >= 4);
    eventually("replica 0 sees replica 3 connected", || sender.is_connected(victim)).await;

    // And the restarted replica's own sends get through.
    restarted.send(from, &msg(victim, 99, 8)).unwrap();
    let inbound0 = &mut started[0].as_mut().unwrap().1;
    within("replica 0 hears the restarted replica", async {
        loop {
            let (sender_id, m, _) = inbound0.recv().await.unwrap();
            if sender_id == victim && m.seq == 99 {
                return;
            }
        }
    })
    .await;
    restarted.shutdown().await;
    for (network, _) in started.into_iter().flatten() {
        network.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_stops_reading_does_not_stall_the_others() {
    const CAPACITY: usize = 32;
    let config = NetworkConfig {
        send_queue_capacity: CAPACITY,
        receive_queue_capacity: 4,
        stream_receive_window: 128 << 10,
        ..test_config()
    };
    let (committee, keys, sockets) = committee(4);
    let mut started = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        started.push(start(&config, &committee, &keys, id as u16, socket).await);
    }
    let me = ReplicaId(0);
    let stalled = ReplicaId(3);
    eventually("replica 0 connected to all", || {
        let n = &started[0].0;
        committee.ids().filter(|&id| id != me).all(|id| n.is_connected(id))
    })
    .await;

    // Replica 3 never reads its inbound queue. Flood it: flow control stops the
    // writer, the queue fills to its bound, the rest is dropped and counted.
    let (first, others) = started.split_at_mut(1);
    let network = &first[0].0;
    let mut refused = 0;
    for seq in 0..1000 {
        match network.send(stalled, &msg(me, seq, 16 << 10)) {
            Ok(()) => {}
            Err(SendError::QueueFull(id)) => {
                assert_eq!(id, stalled);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(network.queue_len(stalled).unwrap() <= CAPACITY);
    }
    assert!(refused > 0);
    eventually("queue to the stalled peer at its bound", || network.queue_len(stalled) == Some(CAPACITY))
        .await;
    assert_eq!(network.send(stalled, &msg(me, 1000, 16)), Err(SendError::QueueFull(stalled)));
    let dropped = network.dropped(stalled).unwrap();
    assert_eq!(dropped, refused + 1);
    assert_eq!(network.counters().snapshot().send_dropped_queue_full, dropped);

    // Meanwhile replicas 1 and 2 get everything, in order.
    for seq in 0..CAPACITY as u64 {
        network.send(ReplicaId(1), &msg(me, seq, 1024)).unwrap();
        network.send(ReplicaId(2), &msg(me, seq, 1024)).unwrap();
    }
    for peer in [1, 2] {
        let got = receive(&mut others[peer - 1].1, CAPACITY).await;
        let seqs: Vec<u64> = got
            .iter()
            .map(|(from, m)| {
                assert_eq!(*from, me);
                m.seq
            })
            .collect();
        assert_eq!(seqs, (0..CAPACITY as u64).collect::<Vec<_>>());
    }
    assert_eq!(network.dropped(ReplicaId(1)), Some(0));
    assert_eq!(network.queue_len(stalled), Some(CAPACITY));
    for (network, _) in started {
        network.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_from_a_replica_replaces_its_old_one() {
    let config = test_config();
    let (committee, keys, mut sockets) = committee(4);
    let _raw_socket = sockets.pop();
    let (network, mut inbound) = start(&config, &committee, &keys, 0, sockets.remove(0)).await;
    let identity = Identity::self_signed(&keys[3], &replica_name(ReplicaId(3))).unwrap();
    let target = address(&committee, ReplicaId(0));
    let (_ep1, first) = raw_dial(&committee, &identity, ReplicaId(0), target).await.unwrap();
    // The acceptor registers a connection once it is authenticated: wait for it.
    eventually("first connection accepted", || network.counters().snapshot().connections_accepted >= 1).await;
    let (_ep2, second) = raw_dial(&committee, &identity, ReplicaId(0), target).await.unwrap();
    let reason = within("old connection replaced", first.closed()).await;
    assert!(is_closed_with(&reason, close_code::REPLACED), "{reason}");
    assert_eq!(network.counters().snapshot().connections_replaced, 1);

    // The newest connection works, and its sender is authenticated as replica 3.
    let mut stream = second.open_uni().await.unwrap();
    let frame = bulwark_network::framing::encode_frame(&msg(ReplicaId(3), 5, 10), 1 << 20).unwrap();
    stream.write_all(&frame).await.unwrap();
    let got = receive(&mut inbound, 1).await;
    assert_eq!(got[0].0, ReplicaId(3));
    assert_eq!(got[0].1.seq, 5);
    network.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_replica_restarted_on_the_same_address_is_reconnected_at_once() {
    // The idle timeout is far beyond the test's patience: only the restarted process's
    // stateless reset can tell replica 0 that its old connection is dead.
    let config = NetworkConfig { idle_timeout: Duration::from_secs(300), ..test_config() };
    let (committee, keys, mut sockets) = committee(4);
    let victim_socket = sockets.pop().unwrap();
    let mut started = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        started.push(start(&config, &committee, &keys, id as u16, socket).await);
    }
    let victim = ReplicaId(3);

    // Replica 3 runs in its own runtime so it can crash: shutting that runtime down
    // stops its tasks without a close frame reaching anyone.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
    let victim_thread = {
        let (config, committee, key) =
            (config.clone(), committee.clone(), KeyPair::from_seed(*keys[3].secret_bytes()));
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let (network, mut inbound, first) = runtime.block_on(async {
                let (network, mut inbound) =
                    ReplicaNetwork::<Msg>::start_on(config, committee, victim, &key, victim_socket)
                        .await
                        .unwrap();
                let first = receive(&mut inbound, 1).await;
                (network, inbound, first)
            });
            ready_tx.send(first[0].0).unwrap();
            crash_rx.recv().unwrap();
            runtime.shutdown_background();
            drop((network, inbound.try_recv()));
        })
    };
    started[0].0.send(victim, &msg(ReplicaId(0), 0, 8)).unwrap();
    assert_eq!(within("replica 3 up", ready_rx).await.unwrap(), ReplicaId(0));
    crash_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || victim_thread.join().unwrap()).await.unwrap();

    let addr = address(&committee, victim);
    let socket = within("rebinding the same address", async {
        loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(socket) => return socket,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let (restarted, mut inbound) = start(&config, &committee, &keys, 3, socket).await;
    let sender = &started[0].0;
    let mut seq = 1;
    within("restarted replica receives from replica 0", async {
        loop {
            let _ = sender.send(victim, &msg(ReplicaId(0), seq, 8));
            seq += 1;
            tokio::select! {
                got = inbound.recv() => if got.unwrap().0 == ReplicaId(0) { return },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    assert!(sender.counters().snapshot().connections_lost >= 1);
    restarted.shutdown().await;
    for (network, _) in started {
        network.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_comes_up_is_dialed_at_once_not_after_the_backoff() {
    // Replica 0 gives up on the silent replica 3 quickly and then waits at least 5 s
    // before dialing it again; replica 3 coming up and dialing 0 cuts that wait short.
    let config = NetworkConfig {
        handshake_timeout: Duration::from_millis(300),
        reconnect_min_backoff: Duration::from_secs(10),
        reconnect_max_backoff: Duration::from_secs(60),
        ..test_config()
    };
    let (committee, keys, mut sockets) = committee(4);
    let late_socket = sockets.pop().unwrap();
    let (network, _inbound) = start(&config, &committee, &keys, 0, sockets.remove(0)).await;
    network.send(ReplicaId(3), &msg(ReplicaId(0), 7, 8)).unwrap();
    eventually("replica 0's first dial of 3 failed", || network.counters().snapshot().handshake_failed >= 1)
        .await;
    let (late, mut inbound) = start(&config, &committee, &keys, 3, late_socket).await;
    let up = std::time::Instant::now();
    let got = receive(&mut inbound, 1).await;
    assert_eq!((got[0].0, got[0].1.seq), (ReplicaId(0), 7));
    assert!(up.elapsed() < Duration::from_secs(3), "reached only after {:?}", up.elapsed());
    late.shutdown().await;
    network.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_make_the_node_hold_more_than_its_receive_budget() {
    // Replica 1 floods replica 0, whose node keeps every message it received (as a node
    // that stopped draining would): what replica 0 holds from it stays within the budget.
    const BUDGET: usize = 1 << 20;
    const LEN: usize = 100 << 10;
    const SENT: u64 = 40;
    let config = NetworkConfig { receive_budget_bytes: BUDGET, ..test_config() };
    let (committee, keys, mut sockets) = committee(4);
    let (receiver, mut inbound) = start(&config, &committee, &keys, 0, sockets.remove(0)).await;
    let (sender, _) = start(&config, &committee, &keys, 1, sockets.remove(0)).await;
    for seq in 0..SENT {
        sender.send(ReplicaId(0), &msg(ReplicaId(1), seq, LEN)).unwrap();
    }
    let mut held = Vec::new();
    within("the budget's worth of messages", async {
        while held.len() < BUDGET / LEN {
            held.push(inbound.recv().await.unwrap());
        }
    })
    .await;
    // Whatever else arrives, what is held never exceeds the budget; the rest waits.
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(500), inbound.recv()).await {
        held.push(next);
    }
    let charged: usize = held.iter().map(|(_, _, charge)| charge.bytes()).sum();
    assert!(charged <= BUDGET && held.len() < SENT as usize, "{} messages, {charged} bytes", held.len());
    assert!(receiver.counters().snapshot().receive_budget_waits >= 1);

    // Once the node is done with them, the rest arrives, in order.
    let mut seqs: Vec<u64> = held.drain(..).map(|(_, m, _)| m.seq).collect();
    let rest = receive(&mut inbound, SENT as usize - seqs.len()).await;
    seqs.extend(rest.iter().map(|(_, m)| m.seq));
    assert_eq!(seqs, (0..SENT).collect::<Vec<_>>());
    sender.shutdown().await;
    receiver.shutdown().await;
}

#[test]
fn a_receive_budget_below_the_frame_limit_is_refused() {
    let config = NetworkConfig { receive_budget_bytes: (1 << 20) - 1, ..test_config() };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("receive_budget_bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_messages_cannot_take_more_than_their_senders_share_of_the_queue() {
    // The receive queue holds 30 messages shared by 3 senders: each message is charged
    // at least a tenth of its sender's budget, so a flood of tiny messages from replica
    // 1 that the node keeps holds at most 10 slots.
    let config = NetworkConfig { receive_queue_capacity: 30, ..test_config() };
    let (committee, keys, mut sockets) = committee(4);
    let (receiver, mut inbound) = start(&config, &committee, &keys, 0, sockets.remove(0)).await;
    let (sender, _) = start(&config, &committee, &keys, 1, sockets.remove(0)).await;
    for seq in 0..25 {
        sender.send(ReplicaId(0), &msg(ReplicaId(1), seq, 8)).unwrap();
    }
    let mut held = Vec::new();
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(500), inbound.recv()).await {
        held.push(next);
    }
    assert_eq!(held.len(), 10, "a tenth of the budget each");
    assert!(receiver.counters().snapshot().receive_budget_waits >= 1);
    held.clear();
    let rest = receive(&mut inbound, 10).await;
    assert_eq!(rest[0].1.seq, 10, "the rest follows in order");
    sender.shutdown().await;
    receiver.shutdown().await;
}
