//! The UDP sockets under QUIC endpoints.

use std::net::UdpSocket;
use std::sync::Arc;

/// Kernel send and receive buffer asked for on every endpoint's socket. QUIC on a busy
/// host receives bursts (a peer's batches, GSO trains of datagrams) faster than the
/// endpoint task is scheduled; with Linux's default 208 KiB receive buffer, 2.6% of
/// datagrams were dropped at 85,000 tx/s on a 2-core testnet, each one a retransmission
/// and a congestion-window cut. The kernel caps the size at `net.core.rmem_max` /
/// `net.core.wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A quinn endpoint on `socket`, its buffers enlarged first.
pub(crate) fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    enlarge_buffers(&socket);
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

fn enlarge_buffers(socket: &UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    // Linux reports twice what was granted (its bookkeeping share included).
    if let Ok(granted) = socket.recv_buffer_size()
        && granted < SOCKET_BUFFER_BYTES
    {
        tracing::info!(
            requested = SOCKET_BUFFER_BYTES,
            granted,
            "UDP receive buffer capped by net.core.rmem_max: bursts beyond it are dropped and \
             retransmitted (raise it, see docs/OPERATIONS.md)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_ask_for_larger_socket_buffers() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let probe = socket.try_clone().unwrap();
        let endpoint = endpoint(quinn::EndpointConfig::default(), None, socket).unwrap();
        let after = socket2::SockRef::from(&probe).recv_buffer_size().unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        // Granted: the request, or what the host's cap allows (doubled by Linux).
        match cap {
            Some(cap) if cap * 2 > before => assert!(after > before, "{before} -> {after} (cap {cap})"),
            _ => assert!(after >= before),
        }
        endpoint.close(0u32.into(), b"");
    }
}
