//! The inbound side: accepting connections, authenticating the peer, and reading
//! frames from its streams.

use std::sync::Arc;

use bulwark_crypto::{Committee, ReplicaId};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::counters::{NetworkCounters, add, bump};
use crate::framing::{FrameDecoder, FrameError, decode_body};
use crate::identity::certificate_key;
use crate::{NetworkConfig, close_code};

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

    /// The next message, or `None` when the stream ended, failed, or sent a bad frame
    /// (then `connection` is closed).
    pub(crate) async fn next<M: DeserializeOwned>(&mut self, connection: &quinn::Connection) -> Option<M> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(body)) => match decode_body(&body, self.max_frame_bytes) {
                    Ok(message) => {
                        bump(&self.counters.messages_received);
                        return Some(message);
                    }
                    Err(e) => return self.refuse(connection, e),
                },
                Ok(None) => {}
                Err(e) => return self.refuse(connection, e),
            }
            match self.stream.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => {
                    add(&self.counters.bytes_received, chunk.bytes.len() as u64);
                    self.decoder.extend(&chunk.bytes);
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

/// Accepts replica connections until the endpoint closes.
pub(crate) async fn accept_replicas<M: DeserializeOwned + Send + 'static>(
    endpoint: quinn::Endpoint,
    committee: Arc<Committee>,
    me: ReplicaId,
    config: NetworkConfig,
    counters: Arc<NetworkCounters>,
    deliver: mpsc::Sender<(ReplicaId, M)>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (committee, config, counters, deliver) =
            (committee.clone(), config.clone(), counters.clone(), deliver.clone());
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
            serve_replica(connection, peer, config, counters, deliver).await;
        });
    }
}

/// Reads every unidirectional stream the peer opens (at most a few at once, by the
/// transport parameters) and delivers its messages in stream order.
async fn serve_replica<M: DeserializeOwned + Send + 'static>(
    connection: quinn::Connection,
    peer: ReplicaId,
    config: NetworkConfig,
    counters: Arc<NetworkCounters>,
    deliver: mpsc::Sender<(ReplicaId, M)>,
) {
    while let Ok(stream) = connection.accept_uni().await {
        let mut reader = FrameReader::new(stream, config.max_frame_bytes, counters.clone());
        let (connection, deliver) = (connection.clone(), deliver.clone());
        tokio::spawn(async move {
            while let Some(message) = reader.next::<M>(&connection).await {
                if deliver.send((peer, message)).await.is_err() {
                    return;
                }
            }
        });
    }
    bump(&counters.connections_lost);
}
