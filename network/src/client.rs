//! The client endpoint: a separate QUIC endpoint (its own port, ALPN
//! [`tls::CLIENT_ALPN`]) where non-members send requests and read replies.
//!
//! A client checks the replica's certificate against the committee, like a replica
//! does. A client may present a self-signed certificate for its own ed25519 key; the
//! node then sees that key as the client's identity ([`ClientId::key`]), proved by the
//! TLS handshake signature. Each bidirectional stream is one session: requests go up,
//! replies come down, both as frames of the same format as between replicas.

use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bulwark_crypto::{Committee, KeyPair, PublicKey, ReplicaId};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::counters::{NetworkCounters, add, bump};
use crate::framing::encode_frame;
use crate::identity::{EndpointKind, Identity, certificate_key, endpoint_config, replica_name};
use crate::inbound::{FrameReader, handshake, peer_certificate};
use crate::peer::coalesce_small_frames;
use crate::{NetworkConfig, NetworkError, SendError, close_code, tls};

/// Who sent a client request: the client's key if it presented one, and a number
/// unique to its connection on this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub key: Option<PublicKey>,
    pub connection: u64,
}

/// One request from a client, with the way back to it.
pub struct ClientRequest<Req, Resp> {
    pub client: ClientId,
    pub request: Req,
    pub reply: ReplySender<Resp>,
}

/// Sends replies down the session a request came from. Cheap to clone; bounded: a
/// client that does not read has its replies dropped (and counted), never buffered
/// without bound.
pub struct ReplySender<Resp> {
    queue: mpsc::Sender<Bytes>,
    max_frame_bytes: usize,
    counters: Arc<NetworkCounters>,
    _reply: PhantomData<fn(Resp)>,
}

impl<Resp> Clone for ReplySender<Resp> {
    fn clone(&self) -> Self {
        ReplySender {
            queue: self.queue.clone(),
            max_frame_bytes: self.max_frame_bytes,
            counters: self.counters.clone(),
            _reply: PhantomData,
        }
    }
}

impl<Resp: Serialize> ReplySender<Resp> {
    /// Whether the client's session is gone (its replies would be dropped).
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Queues `reply` for the client (a `Resp`, or anything `Resp` borrows as that
    /// encodes the same, such as a slice of a `Vec`). Never blocks.
    pub fn send<R>(&self, reply: &R) -> Result<(), SendError>
    where
        Resp: std::borrow::Borrow<R>,
        R: Serialize + ?Sized,
    {
        let frame = encode_frame(reply, self.max_frame_bytes).inspect_err(|e| match e {
            SendError::TooLarge { .. } => bump(&self.counters.send_dropped_too_large),
            _ => bump(&self.counters.send_dropped_encode_failed),
        })?;
        self.queue.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                bump(&self.counters.send_dropped_queue_full);
                SendError::ReplyQueueFull
            }
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }
}

/// A replica's client endpoint.
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    counters: Arc<NetworkCounters>,
    task: JoinHandle<()>,
}

impl ClientEndpoint {
    /// Binds `address` (`host:port`) and serves clients there; see
    /// [`ClientEndpoint::start`].
    pub async fn bind<Req, Resp>(
        config: NetworkConfig,
        me: ReplicaId,
        key: &KeyPair,
        address: &str,
    ) -> Result<(Self, mpsc::Receiver<ClientRequest<Req, Resp>>), NetworkError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let resolved = crate::peer::resolve(address)
            .await
            .map_err(|reason| NetworkError::Address { address: address.to_string(), reason })?;
        let socket = std::net::UdpSocket::bind(resolved)
            .map_err(|e| NetworkError::Bind { address: address.to_string(), reason: e.to_string() })?;
        Self::start(config, me, key, socket).await
    }

    /// Serves clients on `socket` as replica `me` (whose committee key is `key`).
    pub async fn start<Req, Resp>(
        config: NetworkConfig,
        me: ReplicaId,
        key: &KeyPair,
        socket: std::net::UdpSocket,
    ) -> Result<(Self, mpsc::Receiver<ClientRequest<Req, Resp>>), NetworkError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        config.validate()?;
        let counters = Arc::new(NetworkCounters::default());
        let identity = Identity::self_signed(key, &replica_name(me))?;
        let server = tls::client_server_config(&config, &identity, counters.clone())?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| NetworkError::Bind { address: format!("{socket:?}"), reason: e.to_string() })?;
        let endpoint =
            crate::socket::endpoint(endpoint_config(key, EndpointKind::Client), Some(server), socket)
                .map_err(|e| NetworkError::Bind { address: local_addr.to_string(), reason: e.to_string() })?;
        let (deliver, requests) = mpsc::channel(config.receive_queue_capacity);
        let task =
            tokio::spawn(accept_clients::<Req, Resp>(endpoint.clone(), config, counters.clone(), deliver));
        Ok((ClientEndpoint { endpoint, local_addr, counters, task }, requests))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn counters(&self) -> &Arc<NetworkCounters> {
        &self.counters
    }

    /// Closes every client connection and stops accepting.
    pub async fn shutdown(self) {
        self.task.abort();
        self.endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}

impl Drop for ClientEndpoint {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
    }
}

async fn accept_clients<Req, Resp>(
    endpoint: quinn::Endpoint,
    config: NetworkConfig,
    counters: Arc<NetworkCounters>,
    deliver: mpsc::Sender<ClientRequest<Req, Resp>>,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let next_connection = Arc::new(AtomicU64::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let (config, counters, deliver, next_connection) =
            (config.clone(), counters.clone(), deliver.clone(), next_connection.clone());
        tokio::spawn(async move {
            let Some(connection) = handshake(incoming, &config, &counters).await else {
                return;
            };
            bump(&counters.connections_accepted);
            let client = ClientId {
                key: peer_certificate(&connection).and_then(|cert| certificate_key(&cert)),
                connection: next_connection.fetch_add(1, Ordering::Relaxed),
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                let (queue, queued) = mpsc::channel(config.send_queue_capacity);
                tokio::spawn(write_replies(send, queued, counters.clone()));
                let reply = ReplySender {
                    queue,
                    max_frame_bytes: config.max_frame_bytes,
                    counters: counters.clone(),
                    _reply: PhantomData,
                };
                let mut reader = FrameReader::new(recv, config.max_frame_bytes, counters.clone());
                let (connection, deliver) = (connection.clone(), deliver.clone());
                tokio::spawn(async move {
                    while let Some((request, _)) = reader.next::<Req>(&connection).await {
                        let request = ClientRequest { client, request, reply: reply.clone() };
                        if deliver.send(request).await.is_err() {
                            return;
                        }
                    }
                });
            }
            bump(&counters.connections_lost);
        });
    }
}

/// Replies queued while a write is in progress go out together in one write.
const MAX_REPLY_FRAMES_PER_WRITE: usize = 512;

async fn write_replies(
    mut send: quinn::SendStream,
    mut queued: mpsc::Receiver<Bytes>,
    counters: Arc<NetworkCounters>,
) {
    let mut batch = Vec::with_capacity(64);
    while queued.recv_many(&mut batch, MAX_REPLY_FRAMES_PER_WRITE).await > 0 {
        let (frames, len) = (batch.len() as u64, batch.iter().map(|f| f.len() as u64).sum());
        coalesce_small_frames(&mut batch);
        if send.write_all_chunks(&mut batch).await.is_err() {
            return;
        }
        batch.clear();
        add(&counters.messages_sent, frames);
        add(&counters.bytes_sent, len);
    }
    let _ = send.finish();
}

/// A client's session with one replica's client endpoint.
pub struct ClientConnection<Req, Resp> {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    max_frame_bytes: usize,
    counters: Arc<NetworkCounters>,
    _messages: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Serialize, Resp: DeserializeOwned> ClientConnection<Req, Resp> {
    /// Connects to replica `replica`'s client endpoint at `address`, checking that it
    /// holds that replica's committee key; presents `key` as the client's identity if
    /// given.
    pub async fn connect(
        config: NetworkConfig,
        committee: &Committee,
        replica: ReplicaId,
        address: SocketAddr,
        key: Option<&KeyPair>,
    ) -> Result<Self, NetworkError> {
        config.validate()?;
        let counters = Arc::new(NetworkCounters::default());
        let identity = key.map(|key| Identity::self_signed(key, "client")).transpose()?;
        let client = tls::client_client_config(
            &config,
            Arc::new(committee.clone()),
            identity.as_ref(),
            counters.clone(),
        )?;
        let local: SocketAddr = match address {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = std::net::UdpSocket::bind(local)
            .and_then(|socket| crate::socket::endpoint(quinn::EndpointConfig::default(), None, socket))
            .map_err(|e| NetworkError::Bind { address: local.to_string(), reason: e.to_string() })?;
        let connect_error = |reason: String| NetworkError::Connect { address: address.to_string(), reason };
        let connecting = endpoint
            .connect_with(client, address, &replica_name(replica))
            .map_err(|e| connect_error(e.to_string()))?;
        let connection = match tokio::time::timeout(config.handshake_timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                bump(&counters.handshake_failed);
                return Err(connect_error(e.to_string()));
            }
            Err(_) => {
                bump(&counters.handshake_failed);
                return Err(connect_error("handshake timed out".into()));
            }
        };
        let (send, recv) = connection.open_bi().await.map_err(|e| NetworkError::Connection(e.to_string()))?;
        let reader = FrameReader::new(recv, config.max_frame_bytes, counters.clone());
        Ok(ClientConnection {
            endpoint,
            connection,
            send,
            reader,
            max_frame_bytes: config.max_frame_bytes,
            counters,
            _messages: PhantomData,
        })
    }

    /// Sends one request (waits for flow control, not for a reply).
    pub async fn send(&mut self, request: &Req) -> Result<(), NetworkError> {
        self.send_many(std::slice::from_ref(request)).await
    }

    /// Sends requests in order in one stream write (waits for flow control, not for
    /// replies).
    pub async fn send_many(&mut self, requests: &[Req]) -> Result<(), NetworkError> {
        let mut frames = Vec::with_capacity(requests.len());
        for request in requests {
            frames.push(encode_frame(request, self.max_frame_bytes).map_err(|e| match e {
                SendError::TooLarge { len, limit } => NetworkError::FrameTooLarge { len: len as u64, limit },
                SendError::Encode(e) => NetworkError::Malformed(e),
                _ => NetworkError::Closed,
            })?);
        }
        let (count, len) = (frames.len() as u64, frames.iter().map(|f| f.len() as u64).sum());
        coalesce_small_frames(&mut frames);
        self.send.write_all_chunks(&mut frames).await.map_err(|e| NetworkError::Connection(e.to_string()))?;
        add(&self.counters.messages_sent, count);
        add(&self.counters.bytes_sent, len);
        Ok(())
    }

    /// The next reply. A malformed or oversized reply closes the session.
    pub async fn recv(&mut self) -> Result<Resp, NetworkError> {
        self.reader.next(&self.connection).await.map(|(reply, _)| reply).ok_or(NetworkError::Closed)
    }

    pub fn counters(&self) -> &Arc<NetworkCounters> {
        &self.counters
    }

    /// Closes the session.
    pub async fn close(self) {
        self.connection.close(close_code::SHUTDOWN.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
