//! rustls and quinn configurations with committee-pinned certificate verifiers.
//!
//! How identities are claimed and checked (mutual authentication, no CA, no hostname
//! or validity-date checks):
//! - **Dialer → acceptor.** A replica dials replica `j` with the TLS server name
//!   `replica-<j>`. [`ReplicaServerVerifier`] accepts the acceptor's certificate only if
//!   its ed25519 key is the committee key of `j`.
//! - **Acceptor → dialer.** The dialer presents its own certificate, whose subject
//!   alternative name is the `replica-<i>` it claims to be. [`ReplicaClientVerifier`]
//!   looks its key up in the committee and accepts it only if the key is a member's and
//!   the certificate names that same member. The authenticated sender is the key's
//!   owner, never a name the peer chose.
//! - Both sides prove possession of the key with the TLS 1.3 handshake signature, which
//!   must be ed25519 and is checked against the same certificate key.
//!
//! Session resumption is disabled so every connection runs the full check.

use std::sync::Arc;

use bulwark_crypto::Committee;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::counters::{NetworkCounters, bump};
use crate::identity::{Identity, certificate_key, parse_replica_name, replica_name};
use crate::{NetworkConfig, NetworkError};

/// ALPN of the replica-to-replica endpoint.
pub const REPLICA_ALPN: &[u8] = b"bulwark-replica/1";
/// ALPN of the client endpoint (a separate port).
pub const CLIENT_ALPN: &[u8] = b"bulwark-client/1";

/// Connection attempts an endpoint handles at once (quinn's default is 65536).
const MAX_INCOMING_HANDSHAKES: usize = 256;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn refuse() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Handshake signature checks shared by every verifier: TLS 1.3 and ed25519 only.
#[derive(Debug)]
struct Ed25519Signatures {
    algorithms: WebPkiSupportedAlgorithms,
    counters: Arc<NetworkCounters>,
}

impl Ed25519Signatures {
    fn new(counters: Arc<NetworkCounters>) -> Self {
        Ed25519Signatures { algorithms: provider().signature_verification_algorithms, counters }
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            bump(&self.counters.handshake_refused_bad_certificate);
            return Err(rustls::Error::General("only ed25519 handshake signatures are accepted".into()));
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms).inspect_err(|_| {
            bump(&self.counters.handshake_refused_bad_certificate);
        })
    }

    fn tls12(&self) -> Result<HandshakeSignatureValid, rustls::Error> {
        bump(&self.counters.handshake_refused_bad_certificate);
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }
}

/// Checks the acceptor's certificate against the committee key of the replica dialed
/// (named by the server name `replica-<id>`).
#[derive(Debug)]
pub struct ReplicaServerVerifier {
    committee: Arc<Committee>,
    signatures: Ed25519Signatures,
}

impl ReplicaServerVerifier {
    pub fn new(committee: Arc<Committee>, counters: Arc<NetworkCounters>) -> Self {
        ReplicaServerVerifier { committee, signatures: Ed25519Signatures::new(counters) }
    }
}

impl ServerCertVerifier for ReplicaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let counters = &self.signatures.counters;
        let Some(key) = certificate_key(end_entity) else {
            bump(&counters.handshake_refused_bad_certificate);
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        let expected = parse_replica_name(server_name).and_then(|id| self.committee.public_key(id));
        if expected == Some(&key) {
            return Ok(ServerCertVerified::assertion());
        }
        if self.committee.id_of_key(&key).is_some() {
            bump(&counters.handshake_refused_wrong_identity);
        } else {
            bump(&counters.handshake_refused_unknown_key);
        }
        Err(refuse())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Checks a dialing replica's certificate: its key must be a committee member's and the
/// certificate must name that member (`replica-<id>`).
#[derive(Debug)]
pub struct ReplicaClientVerifier {
    committee: Arc<Committee>,
    signatures: Ed25519Signatures,
}

impl ReplicaClientVerifier {
    pub fn new(committee: Arc<Committee>, counters: Arc<NetworkCounters>) -> Self {
        ReplicaClientVerifier { committee, signatures: Ed25519Signatures::new(counters) }
    }
}

impl ClientCertVerifier for ReplicaClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let counters = &self.signatures.counters;
        let Some(key) = certificate_key(end_entity) else {
            bump(&counters.handshake_refused_bad_certificate);
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        let Some(id) = self.committee.id_of_key(&key) else {
            bump(&counters.handshake_refused_unknown_key);
            return Err(refuse());
        };
        let claims_own_id = rustls::server::ParsedCertificate::try_from(end_entity).is_ok_and(|parsed| {
            ServerName::try_from(replica_name(id))
                .is_ok_and(|name| rustls::client::verify_server_name(&parsed, &name).is_ok())
        });
        if !claims_own_id {
            bump(&counters.handshake_refused_wrong_identity);
            return Err(refuse());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The client endpoint's verifier: a client certificate is optional; if one is
/// presented it must carry an ed25519 key (the client's identity), proved by the
/// handshake signature. Clients are not committee members.
#[derive(Debug)]
pub struct ClientKeyVerifier {
    signatures: Ed25519Signatures,
}

impl ClientKeyVerifier {
    pub fn new(counters: Arc<NetworkCounters>) -> Self {
        ClientKeyVerifier { signatures: Ed25519Signatures::new(counters) }
    }
}

impl ClientCertVerifier for ClientKeyVerifier {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if certificate_key(end_entity).is_none() {
            bump(&self.signatures.counters.handshake_refused_bad_certificate);
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Which way streams flow on a connection, for its transport parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRole {
    /// Replica acceptor: the peer may open a few unidirectional streams, no others.
    ReplicaAcceptor,
    /// Replica dialer: the peer may open no stream at all.
    ReplicaDialer,
    /// Client endpoint (either side): one bidirectional stream per session.
    Client,
}

/// The RTT assumed before the first sample (see [`transport_config`]).
const INITIAL_RTT: std::time::Duration = std::time::Duration::from_millis(100);

/// QUIC transport parameters from the configuration.
pub fn transport_config(
    config: &NetworkConfig,
    role: StreamRole,
) -> Result<quinn::TransportConfig, NetworkError> {
    let invalid = |what: &str| NetworkError::Config(format!("{what} is out of range for QUIC"));
    let mut transport = quinn::TransportConfig::default();
    let (uni, bidi) = match role {
        StreamRole::ReplicaAcceptor => (4u32, 0u32),
        StreamRole::ReplicaDialer => (0, 0),
        StreamRole::Client => (0, 4),
    };
    transport
        .max_concurrent_uni_streams(uni.into())
        .max_concurrent_bidi_streams(bidi.into())
        .keep_alive_interval(Some(config.keep_alive_interval))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|_| invalid("idle_timeout"))?,
        ))
        // Before the first RTT sample, loss detection assumes this RTT. quinn's default
        // (333 ms) put the first retransmission of a handshake packet ~1 s out, so a
        // replica dialing a peer whose socket was not bound yet (a committee starting
        // together) connected ~1 s late, its first proposal missed the first round's
        // timeout and every fresh committee began with a view change. A spurious early
        // retransmission on a long path costs one small packet.
        .initial_rtt(INITIAL_RTT)
        .stream_receive_window(
            quinn::VarInt::from_u64(config.stream_receive_window)
                .map_err(|_| invalid("stream_receive_window"))?,
        );
    Ok(transport)
}

fn tls_server(
    verifier: Arc<dyn ClientCertVerifier>,
    identity: &Identity,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, NetworkError> {
    let tls = |e: rustls::Error| NetworkError::Tls(e.to_string());
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.certificate.clone()], identity.private_key.clone_key())
        .map_err(tls)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn tls_client(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<&Identity>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, NetworkError> {
    let tls = |e: rustls::Error| NetworkError::Tls(e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(vec![identity.certificate.clone()], identity.private_key.clone_key())
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn quinn_server(
    tls: rustls::ServerConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, NetworkError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| NetworkError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config.migration(false);
    // Handshakes in progress at once; more are refused by quinn before any crypto.
    config.max_incoming(MAX_INCOMING_HANDSHAKES);
    Ok(config)
}

fn quinn_client(
    tls: rustls::ClientConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, NetworkError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| NetworkError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The replica endpoint's server side: accepts only committee members (see the module
/// documentation).
pub fn replica_server_config(
    config: &NetworkConfig,
    committee: Arc<Committee>,
    identity: &Identity,
    counters: Arc<NetworkCounters>,
) -> Result<quinn::ServerConfig, NetworkError> {
    let verifier = Arc::new(ReplicaClientVerifier::new(committee, counters));
    quinn_server(
        tls_server(verifier, identity, REPLICA_ALPN)?,
        transport_config(config, StreamRole::ReplicaAcceptor)?,
    )
}

/// The configuration a replica dials other replicas with (server name `replica-<id>`),
/// presenting `identity`.
pub fn replica_client_config(
    config: &NetworkConfig,
    committee: Arc<Committee>,
    identity: &Identity,
    counters: Arc<NetworkCounters>,
) -> Result<quinn::ClientConfig, NetworkError> {
    let verifier = Arc::new(ReplicaServerVerifier::new(committee, counters));
    quinn_client(
        tls_client(verifier, Some(identity), REPLICA_ALPN)?,
        transport_config(config, StreamRole::ReplicaDialer)?,
    )
}

/// The client endpoint's server side: any client, optionally identified by its key.
pub fn client_server_config(
    config: &NetworkConfig,
    identity: &Identity,
    counters: Arc<NetworkCounters>,
) -> Result<quinn::ServerConfig, NetworkError> {
    let verifier = Arc::new(ClientKeyVerifier::new(counters));
    quinn_server(tls_server(verifier, identity, CLIENT_ALPN)?, transport_config(config, StreamRole::Client)?)
}

/// The configuration a client dials a replica's client endpoint with: the replica is
/// checked against the committee; the client presents `identity` if it has one.
pub fn client_client_config(
    config: &NetworkConfig,
    committee: Arc<Committee>,
    identity: Option<&Identity>,
    counters: Arc<NetworkCounters>,
) -> Result<quinn::ClientConfig, NetworkError> {
    let verifier = Arc::new(ReplicaServerVerifier::new(committee, counters));
    quinn_client(tls_client(verifier, identity, CLIENT_ALPN)?, transport_config(config, StreamRole::Client)?)
}
