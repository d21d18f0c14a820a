//! Helpers shared by the transport tests: committees on free loopback ports, raw QUIC
//! peers built from the crate's own TLS configuration, and polling with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bulwark_crypto::{Committee, KeyPair, Member, ReplicaId};
use bulwark_network::identity::{Identity, replica_name};
use bulwark_network::{Inbound, NetworkConfig, NetworkCounters, ReplicaNetwork, tls};
use serde::{Deserialize, Serialize};

/// Generous: the machine may be loaded; nothing asserts on time.
pub const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    pub from: u16,
    pub seq: u64,
    pub body: Vec<u8>,
}

pub fn msg(from: ReplicaId, seq: u64, len: usize) -> Msg {
    Msg { from: from.0, seq, body: vec![seq as u8; len] }
}

/// Short timers so that reconnection happens quickly in tests.
pub fn test_config() -> NetworkConfig {
    NetworkConfig {
        max_frame_bytes: 1 << 20,
        reconnect_min_backoff: Duration::from_millis(20),
        reconnect_max_backoff: Duration::from_millis(400),
        handshake_timeout: Duration::from_secs(10),
        keep_alive_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(10),
        ..NetworkConfig::default()
    }
}

/// A committee of `n` fresh keys, each bound to a loopback UDP socket the OS picked.
pub fn committee(n: usize) -> (Committee, Vec<KeyPair>, Vec<UdpSocket>) {
    let keys: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate()).collect();
    let sockets: Vec<UdpSocket> = (0..n).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let members = keys
        .iter()
        .zip(&sockets)
        .enumerate()
        .map(|(i, (key, socket))| Member {
            id: ReplicaId(i as u16),
            public_key: key.public(),
            address: socket.local_addr().unwrap().to_string(),
        })
        .collect();
    (Committee::new("network-test", members).unwrap(), keys, sockets)
}

pub fn address(committee: &Committee, id: ReplicaId) -> SocketAddr {
    committee.member(id).unwrap().address.parse().unwrap()
}

pub async fn start(
    config: &NetworkConfig,
    committee: &Committee,
    keys: &[KeyPair],
    id: u16,
    socket: UdpSocket,
) -> (ReplicaNetwork<Msg>, Inbound<Msg>) {
    ReplicaNetwork::start_on(config.clone(), committee.clone(), ReplicaId(id), &keys[usize::from(id)], socket)
        .await
        .unwrap()
}

/// Waits until `check` holds, polling; panics with `what` after [`PATIENCE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `future` for at most [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Receives until `count` messages arrived; returns them in arrival order.
pub async fn receive(inbound: &mut Inbound<Msg>, count: usize) -> Vec<(ReplicaId, Msg)> {
    let mut got = Vec::with_capacity(count);
    within("receiving messages", async {
        while got.len() < count {
            let (from, message, _charge) = inbound.recv().await.expect("transport stopped");
            got.push((from, message));
        }
    })
    .await;
    got
}

/// A raw QUIC connection to replica `target` at `address`, presenting `identity`,
/// built with the transport's own client configuration: what a Byzantine replica (or
/// an impostor) would run.
pub async fn raw_dial(
    committee: &Committee,
    identity: &Identity,
    target: ReplicaId,
    address: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let counters = Arc::new(NetworkCounters::default());
    let config = tls::replica_client_config(&test_config(), Arc::new(committee.clone()), identity, counters)
        .map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let connecting =
        endpoint.connect_with(config, address, &replica_name(target)).map_err(|e| e.to_string())?;
    let connection = connecting.await.map_err(|e| e.to_string())?;
    Ok((endpoint, connection))
}

/// Dials with `identity` and expects the handshake to be refused: either the
/// handshake fails, or (TLS 1.3 checks the client certificate after the client is
/// done) the connection is closed right after.
pub async fn expect_refused(
    committee: &Committee,
    identity: &Identity,
    target: ReplicaId,
    address: SocketAddr,
) {
    match raw_dial(committee, identity, target, address).await {
        Err(_) => {}
        Ok((_endpoint, connection)) => {
            let reason = within("refused connection to close", connection.closed()).await;
            assert!(
                !matches!(reason, quinn::ConnectionError::LocallyClosed),
                "expected a refusal from the peer, got {reason}"
            );
        }
    }
}
