//! Bulwark's QUIC transport.
