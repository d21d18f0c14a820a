//! Bulwark's QUIC transport (quinn + rustls).
//!
//! - [`ReplicaNetwork`]: the replica-to-replica transport the node runtime drives:
//!   [`ReplicaNetwork::send`], [`ReplicaNetwork::broadcast`], and a stream of
//!   `(authenticated sender, message, charge)` ([`Inbound`]; the [`Charge`] holds the
//!   message's share of its sender's receive budget until the node drops it). Generic
//!   over the message type; it knows nothing of the protocol.
//! - [`ClientEndpoint`] / [`ClientConnection`]: a separate endpoint (its own port and
//!   ALPN) for clients, which are not committee members and may identify themselves by
//!   an ed25519 key.
//! - [`tls`]: the committee-pinned certificate verifiers; [`identity`]: self-signed
//!   certificates for committee keys; [`framing`]: length-prefixed frames with a
//!   maximum size; [`NetworkCounters`]: every refusal and drop, for metrics.
//!
//! Every byte from the network is untrusted: frames are bounded before anything is
//! buffered, decoded only through [`bulwark_crypto::codec`] with the frame limit, and a
//! bad frame closes its connection with a counted reason, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod backoff;
mod client;
mod config;
mod counters;
mod error;
pub mod framing;
pub mod identity;
mod inbound;
mod peer;
mod replica;
mod socket;
pub mod tls;

pub use client::{ClientConnection, ClientEndpoint, ClientId, ClientRequest, ReplySender};
pub use config::NetworkConfig;
pub use counters::{Counter, CounterSnapshot, NetworkCounters};
pub use error::{NetworkError, SendError};
pub use inbound::Charge;
pub use replica::{Inbound, ReplicaNetwork};

/// QUIC application error codes this transport closes connections with.
pub mod close_code {
    /// Orderly shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// A frame's length prefix exceeded the maximum frame size.
    pub const FRAME_TOO_LARGE: u32 = 1;
    /// A frame did not decode.
    pub const MALFORMED_FRAME: u32 = 2;
    /// The peer's identity was refused after the handshake.
    pub const REFUSED: u32 = 3;
    /// A newer authenticated connection from the same replica replaced this one.
    pub const REPLACED: u32 = 4;
}
