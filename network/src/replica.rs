//! The replica-to-replica transport the node runtime drives.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::counters::{NetworkCounters, bump};
use crate::framing::encode_frame;
use crate::identity::{EndpointKind, Identity, endpoint_config, replica_name};
use crate::inbound::Charge;
use crate::peer::{Dialer, PeerState, resolve};
use crate::{NetworkConfig, NetworkError, SendError, close_code, inbound, tls};

/// Messages received from other replicas: `(authenticated sender, message, charge)`, in
/// order per sender connection. The sender id is the committee member whose key the
/// peer proved in the handshake; the [`Charge`] holds the message's share of that
/// sender's receive budget until it is dropped.
pub type Inbound<M> = mpsc::Receiver<(ReplicaId, M, Charge)>;

/// How long shutdown waits for closing connections to drain (the peers have been told
/// at once; this only lets the close frames be retransmitted if lost).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

struct Peer {
    queue: mpsc::Sender<Bytes>,
    state: Arc<PeerState>,
}

/// A replica's endpoint in the committee's network.
///
/// Topology: every replica dials every other one and sends only on the connection it
/// dialed (one long-lived unidirectional stream); it receives only on connections the
/// others dialed. Two connections per pair, no tie-breaking when both dial at once, and
/// a restarted replica is simply dialed again.
///
/// Inbound, the newest authenticated connection from a replica replaces its previous
/// one (counted in `connections_replaced`): an honest replica has one at a time, and
/// this bounds what any one key can make us hold.
///
/// Sending never blocks: each peer has a bounded queue drained by its own task; when
/// the queue is full the message is dropped and counted ([`SendError::QueueFull`]).
/// Delivery is at most once and in order per connection: messages queued while a peer
/// is down are sent after reconnection while they fit in the queue; those in flight
/// when a connection fails may be lost.
pub struct ReplicaNetwork<M> {
    me: ReplicaId,
    max_frame_bytes: usize,
    peers: BTreeMap<ReplicaId, Peer>,
    counters: Arc<NetworkCounters>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    _message: PhantomData<fn(M) -> M>,
}

impl<M: Serialize + DeserializeOwned + Send + 'static> ReplicaNetwork<M> {
    /// Binds replica `me`'s committee address and starts connecting to every other
    /// member. `key` must be `me`'s committee key.
    pub async fn start(
        config: NetworkConfig,
        committee: Committee,
        me: ReplicaId,
        key: &KeyPair,
    ) -> Result<(Self, Inbound<M>), NetworkError> {
        let address = committee.member(me).ok_or(NetworkError::NotAMember(me))?.address.clone();
        let resolved = resolve(&address)
            .await
            .map_err(|reason| NetworkError::Address { address: address.clone(), reason })?;
        let socket = std::net::UdpSocket::bind(resolved)
            .map_err(|e| NetworkError::Bind { address: address.clone(), reason: e.to_string() })?;
        Self::start_on(config, committee, me, key, socket).await
    }

    /// Like [`ReplicaNetwork::start`], on a socket the caller bound (for example to
    /// `0.0.0.0:port`, or to a port picked by the OS in tests).
    pub async fn start_on(
        config: NetworkConfig,
        committee: Committee,
        me: ReplicaId,
        key: &KeyPair,
        socket: std::net::UdpSocket,
    ) -> Result<(Self, Inbound<M>), NetworkError> {
        config.validate()?;
        let expected = committee.public_key(me).ok_or(NetworkError::NotAMember(me))?;
        if *expected != key.public() {
            return Err(NetworkError::KeyMismatch(me));
        }
        let committee = Arc::new(committee);
        let counters = Arc::new(NetworkCounters::default());
        let identity = Identity::self_signed(key, &replica_name(me))?;
        let server = tls::replica_server_config(&config, committee.clone(), &identity, counters.clone())?;
        let client = tls::replica_client_config(&config, committee.clone(), &identity, counters.clone())?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| NetworkError::Bind { address: format!("{socket:?}"), reason: e.to_string() })?;
        let mut endpoint =
            crate::socket::endpoint(endpoint_config(key, EndpointKind::Replica), Some(server), socket)
                .map_err(|e| NetworkError::Bind { address: local_addr.to_string(), reason: e.to_string() })?;
        endpoint.set_default_client_config(client);

        let mut peers = BTreeMap::new();
        let mut tasks = Vec::new();
        for member in committee.members().iter().filter(|m| m.id != me) {
            let (queue, queued) = mpsc::channel(config.send_queue_capacity);
            let state = Arc::new(PeerState::default());
            let dialer = Dialer {
                endpoint: endpoint.clone(),
                id: member.id,
                address: member.address.clone(),
                config: config.clone(),
                counters: counters.clone(),
                state: state.clone(),
            };
            tasks.push(tokio::spawn(dialer.run(queued)));
            peers.insert(member.id, Peer { queue, state });
        }
        let (deliver, inbound) = mpsc::channel(config.receive_queue_capacity);
        let states = peers.iter().map(|(id, peer)| (*id, peer.state.clone())).collect();
        tasks.push(tokio::spawn(inbound::accept_replicas::<M>(
            endpoint.clone(),
            committee.clone(),
            me,
            config.clone(),
            counters.clone(),
            deliver,
            states,
        )));
        let network = ReplicaNetwork {
            me,
            max_frame_bytes: config.max_frame_bytes,
            peers,
            counters,
            endpoint,
            local_addr,
            tasks,
            _message: PhantomData,
        };
        Ok((network, inbound))
    }

    /// Queues `message` for replica `to`. Never blocks; see [`SendError`] for why a
    /// message is not queued (each reason is also counted). There is no loopback: a
    /// message to ourselves is refused ([`SendError::UnknownPeer`]); the node hands its
    /// own messages to its core directly.
    pub fn send(&self, to: ReplicaId, message: &M) -> Result<(), SendError> {
        let Some(peer) = self.peers.get(&to) else {
            bump(&self.counters.send_dropped_unknown_peer);
            return Err(SendError::UnknownPeer(to));
        };
        let frame = self.encode(message)?;
        self.enqueue(to, peer, frame)
    }

    /// Queues `message` for every other replica, encoding it once. Returns how many
    /// peers it was queued for; a full queue drops it for that peer only (counted).
    pub fn broadcast(&self, message: &M) -> Result<usize, SendError> {
        let frame = self.encode(message)?;
        Ok(self.peers.iter().filter(|(id, peer)| self.enqueue(**id, peer, frame.clone()).is_ok()).count())
    }

    fn encode(&self, message: &M) -> Result<Bytes, SendError> {
        encode_frame(message, self.max_frame_bytes).inspect_err(|e| match e {
            SendError::TooLarge { .. } => bump(&self.counters.send_dropped_too_large),
            _ => bump(&self.counters.send_dropped_encode_failed),
        })
    }

    fn enqueue(&self, to: ReplicaId, peer: &Peer, frame: Bytes) -> Result<(), SendError> {
        match peer.queue.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.send_dropped_queue_full);
                bump(&peer.state.dropped_queue_full);
                Err(SendError::QueueFull(to))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.me
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live counters (clone the `Arc` to export them as metrics).
    pub fn counters(&self) -> &Arc<NetworkCounters> {
        &self.counters
    }

    /// Messages waiting in the send queue of `peer` (never more than the capacity).
    pub fn queue_len(&self, peer: ReplicaId) -> Option<usize> {
        self.peers.get(&peer).map(|p| p.queue.max_capacity() - p.queue.capacity())
    }

    /// Messages to `peer` dropped because its queue was full.
    pub fn dropped(&self, peer: ReplicaId) -> Option<u64> {
        self.peers.get(&peer).map(|p| p.state.dropped_queue_full.load(Ordering::Relaxed))
    }

    /// Whether the outbound connection to `peer` is currently up.
    pub fn is_connected(&self, peer: ReplicaId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.state.connected.load(Ordering::Relaxed))
    }

    /// Closes every connection and stops the transport's tasks; waits briefly for the
    /// peers to be told. The socket is released once this returns.
    pub async fn shutdown(mut self) {
        self.stop();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.wait_idle()).await;
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    fn stop(&mut self) {
        self.peers.clear();
        for task in &self.tasks {
            task.abort();
        }
        self.endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
    }
}

impl<M> Drop for ReplicaNetwork<M> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
    }
}
