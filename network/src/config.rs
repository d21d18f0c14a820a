//! Transport configuration.

use std::time::Duration;

use bulwark_crypto::codec::MAX_DECODE_BYTES;

use crate::NetworkError;

/// Largest receive budget: a frame's charge is taken as one semaphore request, counted
/// in `u32`, from a semaphore of at most `Semaphore::MAX_PERMITS`.
const MAX_BUDGET_BYTES: usize = if (u32::MAX as usize) < tokio::sync::Semaphore::MAX_PERMITS {
    u32::MAX as usize
} else {
    tokio::sync::Semaphore::MAX_PERMITS
};

/// Limits and timers of the transport. [`NetworkConfig::default`] suits a committee on
/// a LAN or WAN; tests shrink the timers.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// Largest encoded message accepted or sent, in bytes (at most the codec's 64 MiB).
    /// A longer length prefix closes the connection before anything is buffered.
    pub max_frame_bytes: usize,
    /// Messages queued per destination replica; when full, new messages to that
    /// replica are dropped and counted (never blocks, never grows).
    pub send_queue_capacity: usize,
    /// Received messages buffered for the node; when full, readers wait (QUIC flow
    /// control then slows the senders).
    pub receive_queue_capacity: usize,
    /// Bytes of received frames each replica may have in our hands at once: a message
    /// holds its frame's length until the node drops its [`Charge`](crate::Charge),
    /// wherever it is queued. When a sender's budget is spent, its streams are not
    /// read until the node catches up (QUIC flow control then slows that sender only).
    /// At least `max_frame_bytes`.
    pub receive_budget_bytes: usize,
    /// Reconnection backoff: the first retry waits about this long...
    pub reconnect_min_backoff: Duration,
    /// ...and retries double up to this, each with random jitter (50–100% of the step).
    pub reconnect_max_backoff: Duration,
    /// A handshake not done within this is abandoned (and counted).
    pub handshake_timeout: Duration,
    /// QUIC keep-alive interval on idle connections.
    pub keep_alive_interval: Duration,
    /// A connection silent for this long is considered dead.
    pub idle_timeout: Duration,
    /// QUIC flow-control window per stream, in bytes.
    pub stream_receive_window: u64,
    /// Queued frames are coalesced into one stream write up to this many bytes.
    pub max_write_batch_bytes: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            max_frame_bytes: 8 << 20,
            send_queue_capacity: 1024,
            receive_queue_capacity: 4096,
            receive_budget_bytes: 64 << 20,
            reconnect_min_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            stream_receive_window: 4 << 20,
            max_write_batch_bytes: 256 << 10,
        }
    }
}

impl NetworkConfig {
    /// Refuses settings the transport cannot honour.
    pub fn validate(&self) -> Result<(), NetworkError> {
        let bad = |msg: String| Err(NetworkError::Config(msg));
        if self.max_frame_bytes == 0 || self.max_frame_bytes > MAX_DECODE_BYTES {
            return bad(format!(
                "max_frame_bytes must be 1..={MAX_DECODE_BYTES}, got {}",
                self.max_frame_bytes
            ));
        }
        if self.send_queue_capacity == 0 || self.receive_queue_capacity == 0 {
            return bad("queue capacities must be at least 1".into());
        }
        if self.receive_budget_bytes < self.max_frame_bytes || self.receive_budget_bytes > MAX_BUDGET_BYTES {
            return bad(format!(
                "receive_budget_bytes must be max_frame_bytes ({})..={MAX_BUDGET_BYTES}, got {}",
                self.max_frame_bytes, self.receive_budget_bytes
            ));
        }
        if self.reconnect_min_backoff.is_zero() || self.reconnect_min_backoff > self.reconnect_max_backoff {
            return bad("need 0 < reconnect_min_backoff <= reconnect_max_backoff".into());
        }
        if self.keep_alive_interval >= self.idle_timeout {
            return bad("keep_alive_interval must be shorter than idle_timeout".into());
        }
        if self.handshake_timeout.is_zero()
            || self.stream_receive_window == 0
            || self.max_write_batch_bytes == 0
        {
            return bad(
                "handshake_timeout, stream_receive_window and max_write_batch_bytes must be positive".into(),
            );
        }
        Ok(())
    }
}
