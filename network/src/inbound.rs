//! The inbound side: accepting connections, authenticating the peer, and reading
//! frames from its streams.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bulwark_crypto::{Committee, ReplicaId};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::counters::{NetworkCounters, add, bump};
use crate::framing::{FrameDecoder, FrameError, decode_body};
use crate::identity::certificate_key;
use crate::peer::PeerState;
use crate::{NetworkConfig, close_code};

/// Received chunks taken from a stream per read.
const READ_CHUNKS: usize = 32;

/// Reads frames from one stream and decodes them. Any refused frame closes the whole
/// connection with a counted reason: a peer that sends one bad frame is not trusted
/// with the rest of its stream.
pub(crate) struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    max_frame_bytes: usize,
    counters: Arc<NetworkCounters>,
}

impl FrameReader {
    pub(crate) fn new(
        stream: quinn::RecvStream,
        max_frame_bytes: usize,
        counters: Arc<NetworkCounters>,
    ) -> Self {
        FrameReader { stream, decoder: FrameDecoder::new(max_frame_bytes), max_frame_bytes, counters }
    }

    /// The next message and its frame's length, or `None` when the stream ended,
    /// failed, or sent a bad frame (then `connection` is closed).
    pub(crate) async fn next<M: DeserializeOwned>(
        &mut self,
        connection: &quinn::Connection,
    ) -> Option<(M, usize)> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(body)) => match decode_body(&body, self.max_frame_bytes) {
                    Ok(message) => {
                        bump(&self.counters.messages_received);
                        return Some((message, body.len()));
                    }
                    Err(e) => return self.refuse(connection, e),
                },
                Ok(None) => {}
                Err(e) => return self.refuse(connection, e),
            }
            // Several chunks per call: one lock of the connection state per batch of
            // packets rather than per packet (small messages arrive many per packet).
            let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
            match self.stream.read_chunks(&mut chunks).await {
                Ok(Some(n)) => {
                    for chunk in &chunks[..n] {
                        add(&self.counters.bytes_received, chunk.len() as u64);
                        self.decoder.extend(chunk);
                    }
                }
                Ok(None) => {
                    if self.decoder.buffered() > 0 {
                        bump(&self.counters.frame_truncated);
                    }
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    fn refuse<M>(&self, connection: &quinn::Connection, error: FrameError) -> Option<M> {
        tracing::debug!(peer = %connection.remote_address(), %error, "closing connection");
        let code = match error {
            FrameError::TooLarge { .. } => {
                bump(&self.counters.frame_too_large);
                close_code::FRAME_TOO_LARGE
            }
            FrameError::Malformed(_) => {
                bump(&self.counters.frame_malformed);
                close_code::MALFORMED_FRAME
            }
        };
        connection.close(code.into(), error.to_string().as_bytes());
        None
    }
}

/// A received message's share of its sender's receive budget
/// ([`NetworkConfig::receive_budget_bytes`]): the length of the frame it came in. The
/// budget is given back when this is dropped, so the node keeps it with the message
/// (or what it made of it) until it is done with it.
#[derive(Debug)]
pub struct Charge(OwnedSemaphorePermit);

impl Charge {
    /// Bytes of the budget this holds.
    pub fn bytes(&self) -> usize {
        self.0.num_permits()
    }
}

/// A replica's receive budget: one per member, kept across its connections (a replica
/// that reconnects does not get a fresh budget while its earlier messages are still
/// held).
#[derive(Clone)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    /// What the smallest message is charged: the budget divided by this sender's share
    /// of the receive queue's slots, so that no sender can fill the queues (shared by
    /// all senders, bounded by count) with tiny messages either.
    min_charge: usize,
}

pub(crate) fn budgets(
    committee: &Committee,
    me: ReplicaId,
    config: &NetworkConfig,
) -> BTreeMap<ReplicaId, Budget> {
    let senders = committee.size().saturating_sub(1).max(1);
    let share = (config.receive_queue_capacity / senders).max(1);
    let total = config.receive_budget_bytes;
    committee
        .members()
        .iter()
        .filter(|m| m.id != me)
        .map(|m| (m.id, Budget { bytes: Arc::new(Semaphore::new(total)), min_charge: total / share }))
        .collect()
}

/// Takes a frame of `bytes` from `budget` (at least its minimum charge and one byte),
/// waiting (and counting the wait) while it is spent. `None` if the budget was closed.
async fn charge(budget: &Budget, bytes: usize, counters: &NetworkCounters) -> Option<Charge> {
    // Never more than the whole budget: validation keeps a frame within it (and the
    // budget within `u32`), and the minimum charge is a fraction of it.
    let permits = u32::try_from(bytes.max(budget.min_charge).max(1)).ok()?;
    if let Ok(permit) = budget.bytes.clone().try_acquire_many_owned(permits) {
        return Some(Charge(permit));
    }
    bump(&counters.receive_budget_waits);
    budget.bytes.clone().acquire_many_owned(permits).await.ok().map(Charge)
}

/// The certificates the peer presented, if any.
pub(crate) fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// Completes an incoming handshake within the configured time, counting failures.
pub(crate) async fn handshake(
    incoming: quinn::Incoming,
    config: &NetworkConfig,
    counters: &NetworkCounters,
) -> Option<quinn::Connection> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(_) => {
            bump(&counters.handshake_failed);
            return None;
        }
    };
    match tokio::time::timeout(config.handshake_timeout, connecting).await {
        Ok(Ok(connection)) => Some(connection),
        _ => {
            bump(&counters.handshake_failed);
            None
        }
    }
}

/// The live inbound connection of each replica. An honest replica dials us over one
/// connection at a time, so a new authenticated connection from the same replica
/// (after it restarted, or after a path failure it noticed first) replaces the old
/// one. This also bounds what one replica's key can make us hold: one connection, a
/// few streams, each buffering at most one frame.
#[derive(Default)]
struct LiveConnections {
    next_token: u64,
    by_peer: BTreeMap<ReplicaId, (u64, quinn::Connection)>,
}

impl LiveConnections {
    fn lock(live: &Mutex<LiveConnections>) -> std::sync::MutexGuard<'_, LiveConnections> {
        live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Accepts replica connections until the endpoint closes.
pub(crate) async fn accept_replicas<M: DeserializeOwned + Send + 'static>(
    endpoint: quinn::Endpoint,
    committee: Arc<Committee>,
    me: ReplicaId,
    config: NetworkConfig,
    counters: Arc<NetworkCounters>,
    deliver: mpsc::Sender<(ReplicaId, M, Charge)>,
    peers: BTreeMap<ReplicaId, Arc<PeerState>>,
) {
    let live = Arc::new(Mutex::new(LiveConnections::default()));
    let peers = Arc::new(peers);
    let budgets = Arc::new(budgets(&committee, me, &config));
    while let Some(incoming) = endpoint.accept().await {
        let (committee, config, counters, deliver, live, peers, budgets) = (
            committee.clone(),
            config.clone(),
            counters.clone(),
            deliver.clone(),
            live.clone(),
            peers.clone(),
            budgets.clone(),
        );
        tokio::spawn(async move {
            let Some(connection) = handshake(incoming, &config, &counters).await else {
                return;
            };
            // The verifier already checked the key; this maps it to its owner.
            let peer = peer_certificate(&connection)
                .and_then(|cert| certificate_key(&cert))
                .and_then(|key| committee.id_of_key(&key));
            let peer = match peer {
                Some(peer) if peer != me => peer,
                Some(_) => {
                    bump(&counters.handshake_refused_wrong_identity);
                    connection.close(close_code::REFUSED.into(), b"that is my own key");
                    return;
                }
                None => {
                    bump(&counters.handshake_refused_bad_certificate);
                    connection.close(close_code::REFUSED.into(), b"no committee certificate");
                    return;
                }
            };
            bump(&counters.connections_accepted);
            // It is up (again): our own dialer to it stops waiting out its backoff.
            if let Some(state) = peers.get(&peer).filter(|s| !s.connected.load(Ordering::Relaxed)) {
                state.redial.notify_one();
            }
            let token = {
                let mut live = LiveConnections::lock(&live);
                let token = live.next_token;
                live.next_token += 1;
                if let Some((_, old)) = live.by_peer.insert(peer, (token, connection.clone())) {
                    bump(&counters.connections_replaced);
                    old.close(close_code::REPLACED.into(), b"replaced by a newer connection");
                }
                token
            };
            let Some(budget) = budgets.get(&peer).cloned() else { return };
            serve_replica(connection, peer, budget, config, counters, deliver).await;
            let mut live = LiveConnections::lock(&live);
            if live.by_peer.get(&peer).is_some_and(|(t, _)| *t == token) {
                live.by_peer.remove(&peer);
            }
        });
    }
}

/// Reads every unidirectional stream the peer opens (at most a few at once, by the
/// transport parameters) and delivers its messages in stream order, each charged to
/// the peer's receive `budget`. A stream's reader ends with its connection, so a
/// message read but waiting for budget or queue space is not kept past it (a replica
/// reconnecting again and again would otherwise leave such messages behind, outside
/// its budget).
async fn serve_replica<M: DeserializeOwned + Send + 'static>(
    connection: quinn::Connection,
    peer: ReplicaId,
    budget: Budget,
    config: NetworkConfig,
    counters: Arc<NetworkCounters>,
    deliver: mpsc::Sender<(ReplicaId, M, Charge)>,
) {
    while let Ok(stream) = connection.accept_uni().await {
        let mut reader = FrameReader::new(stream, config.max_frame_bytes, counters.clone());
        let (connection, deliver, budget, counters) =
            (connection.clone(), deliver.clone(), budget.clone(), counters.clone());
        tokio::spawn(async move {
            let read = async {
                while let Some((message, bytes)) = reader.next::<M>(&connection).await {
                    let Some(charge) = charge(&budget, bytes, &counters).await else { return };
                    if deliver.send((peer, message, charge)).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = connection.closed() => {}
                _ = read => {}
            }
        });
    }
    bump(&counters.connections_lost);
}
