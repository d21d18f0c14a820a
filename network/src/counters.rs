//! Counters for everything the transport refused, dropped or did, for the node to
//! publish as metrics. Every refusal reason has its own counter.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter on a cache line of its own: the sending and receiving tasks of every
/// connection add to their counters on whichever core they run, and counters sharing a
/// line made each add a cache-line transfer (1.5% of the machine at 100,000 tx/s).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Counter(AtomicU64);

impl std::ops::Deref for Counter {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, shared by the transport's tasks. Monotonic; read them with
        /// [`NetworkCounters::snapshot`].
        #[derive(Debug, Default)]
        pub struct NetworkCounters {
            $( $(#[$doc])* pub $name: Counter, )*
        }

        /// A point-in-time copy of [`NetworkCounters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct CounterSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl NetworkCounters {
            /// Reads every counter (each one atomically; not all at one instant).
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl CounterSnapshot {
            /// `(name, value)` for every counter, in a fixed order: what a metrics
            /// exporter iterates over.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }
    };
}

counters! {
    /// Handshakes refused: the peer's certificate key belongs to no committee member.
    handshake_refused_unknown_key,
    /// Handshakes refused: the peer's key is a member's, but not the one of the replica
    /// it claimed to be (server name or certificate name).
    handshake_refused_wrong_identity,
    /// Handshakes refused: the certificate is not X.509 with an ed25519 key, or the
    /// handshake signature is not ed25519 or does not verify.
    handshake_refused_bad_certificate,
    /// Handshakes that did not complete for any reason (including the refusals above,
    /// refusals by the peer, timeouts and unreachable peers), inbound and outbound.
    handshake_failed,
    /// Inbound connections authenticated and accepted.
    connections_accepted,
    /// Outbound connections established.
    connections_established,
    /// Established connections (either direction) that ended.
    connections_lost,
    /// Outbound connection attempts, including retries.
    connect_attempts,
    /// Inbound frames whose length prefix exceeded the maximum frame size; the
    /// connection was closed.
    frame_too_large,
    /// Inbound frames that the codec refused; the connection was closed.
    frame_malformed,
    /// Inbound streams that ended in the middle of a frame.
    frame_truncated,
    /// Inbound connections closed because the same replica connected again (the
    /// newest connection from a replica wins; see `ReplicaNetwork`).
    connections_replaced,
    /// Messages dropped because the destination's send queue was full.
    send_dropped_queue_full,
    /// Messages not sent because their encoding exceeds the maximum frame size.
    send_dropped_too_large,
    /// Messages not sent because they could not be encoded.
    send_dropped_encode_failed,
    /// Messages addressed to a replica that is not in the committee (or to ourselves).
    send_dropped_unknown_peer,
    /// Messages written to a stream.
    messages_sent,
    /// Messages received, authenticated and decoded.
    messages_received,
    /// Received messages that waited because their sender's receive budget
    /// ([`NetworkConfig::receive_budget_bytes`](crate::NetworkConfig)) was held by
    /// messages the node had not finished with; the stream was not read meanwhile.
    receive_budget_waits,
    /// Frame bytes written (length prefixes included).
    bytes_sent,
    /// Frame bytes received (length prefixes included).
    bytes_received,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
