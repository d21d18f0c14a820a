//! Typed errors of the transport.

use bulwark_crypto::ReplicaId;
use bulwark_crypto::codec::CodecError;

/// The transport could not be set up, or a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("replica {0} is not in the committee")]
    NotAMember(ReplicaId),
    #[error("the key pair given is not replica {0}'s committee key")]
    KeyMismatch(ReplicaId),
    #[error("cannot resolve address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot bind {address}: {reason}")]
    Bind { address: String, reason: String },
    #[error("cannot build the certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connection: {0}")]
    Connection(String),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(CodecError),
    #[error("the connection was closed")]
    Closed,
}

/// A message was not queued. Every variant is also counted in the transport's counters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("replica {0} is not a peer (not in the committee, or ourselves)")]
    UnknownPeer(ReplicaId),
    #[error("send queue to replica {0} is full; message dropped")]
    QueueFull(ReplicaId),
    #[error("reply queue to the client is full; reply dropped")]
    ReplyQueueFull,
    #[error("encoded message of {len} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("message could not be encoded: {0}")]
    Encode(CodecError),
    #[error("the transport is shut down")]
    Closed,
}
