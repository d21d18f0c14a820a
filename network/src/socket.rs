//! The UDP sockets under QUIC endpoints.

use std::net::UdpSocket;
use std::sync::{Arc, Once};

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
    // Linux reports twice what it granted (its bookkeeping share included).
    const REPORTED: usize = if cfg!(target_os = "linux") { 2 } else { 1 } * SOCKET_BUFFER_BYTES;
    static CAPPED: Once = Once::new();
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let (recv, send) = (socket.recv_buffer_size(), socket.send_buffer_size());
    if let (Ok(recv), Ok(send)) = (recv, send)
        && (recv < REPORTED || send < REPORTED)
    {
        // Once per process (a client makes an endpoint per connection).
        CAPPED.call_once(|| {
            tracing::info!(
                requested = SOCKET_BUFFER_BYTES,
                recv_granted = recv / (REPORTED / SOCKET_BUFFER_BYTES),
                send_granted = send / (REPORTED / SOCKET_BUFFER_BYTES),
                "UDP buffers capped by net.core.rmem_max/wmem_max: bursts beyond them are \
                 dropped and retransmitted (raise them, see docs/OPERATIONS.md)"
            );
        });
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
