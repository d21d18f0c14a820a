//! A replica's QUIC identity: a self-signed certificate for its committee ed25519 key.
//!
//! There is no CA. A certificate is only a container for an ed25519 public key (and the
//! name `replica-<id>` the holder claims); what makes it trusted is that the key is the
//! committee's key for that id, checked by the verifiers in [`crate::tls`].

use bulwark_crypto::{KeyPair, PublicKey, ReplicaId};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use zeroize::Zeroizing;

use crate::NetworkError;

/// PKCS#8 v1 `PrivateKeyInfo` for an Ed25519 key (RFC 8410), up to the 32-byte seed.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// DER `SubjectPublicKeyInfo` of an Ed25519 key (RFC 8410), up to the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

const NAME_PREFIX: &str = "replica-";

/// The TLS name a replica claims and is dialed by: `replica-<id>`.
pub fn replica_name(id: ReplicaId) -> String {
    format!("{NAME_PREFIX}{}", id.0)
}

/// The replica id in a TLS server name of the form `replica-<id>`, if it is one.
pub fn parse_replica_name(name: &ServerName<'_>) -> Option<ReplicaId> {
    match name {
        ServerName::DnsName(dns) => {
            let digits = dns.as_ref().strip_prefix(NAME_PREFIX)?;
            // Refuse "+3", "03" and the like: one name per id.
            if digits.starts_with('+') || (digits.len() > 1 && digits.starts_with('0')) {
                return None;
            }
            digits.parse::<u16>().ok().map(ReplicaId)
        }
        _ => None,
    }
}

/// A certificate and its private key, ready for rustls.
#[derive(Debug)]
pub struct Identity {
    pub certificate: CertificateDer<'static>,
    pub private_key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { certificate: self.certificate.clone(), private_key: self.private_key.clone_key() }
    }
}

impl Identity {
    /// A self-signed certificate for `key`, naming the holder `name` (for a replica,
    /// [`replica_name`]; for a client, anything).
    pub fn self_signed(key: &KeyPair, name: &str) -> Result<Identity, NetworkError> {
        let seed = key.secret_bytes();
        let mut pkcs8 = Zeroizing::new(Vec::with_capacity(48));
        pkcs8.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
        pkcs8.extend_from_slice(seed.as_ref());
        let der = PrivatePkcs8KeyDer::from(pkcs8.as_slice());
        let rc_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(|e| NetworkError::Certificate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![name.to_string()])
            .map_err(|e| NetworkError::Certificate(e.to_string()))?;
        let cert = params.self_signed(&rc_key).map_err(|e| NetworkError::Certificate(e.to_string()))?;
        Ok(Identity {
            certificate: cert.der().clone(),
            private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec())),
        })
    }
}

/// Which endpoint of a replica a stateless-reset key is for.
#[derive(Clone, Copy, Debug)]
pub enum EndpointKind {
    Replica,
    Client,
}

/// The endpoint configuration of a replica. Its QUIC stateless-reset key, and the key
/// that marks its connection ids as its own, are derived from its secret key instead
/// of drawn at random, so that after a crash and restart on the same address the new
/// process recognizes the connection ids its peers still use for the old one and
/// resets those connections (RFC 9000 §10.3): the peers reconnect at once instead of
/// waiting for the idle timeout. Only the holder of the secret key can derive them.
pub fn endpoint_config(key: &KeyPair, kind: EndpointKind) -> quinn::EndpointConfig {
    let label: &[u8] = match kind {
        EndpointKind::Replica => b"bulwark/quic-stateless-reset/replica/v1\0",
        EndpointKind::Client => b"bulwark/quic-stateless-reset/client/v1\0",
    };
    let seed = key.secret_bytes();
    let derive =
        |purpose: &[u8]| Zeroizing::new(bulwark_crypto::Digest::of_parts(&[label, purpose, seed.as_ref()]).0);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derive(b"reset").as_ref());
    let cid_bytes = derive(b"connection-id");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid_bytes[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(reset_key));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

/// The ed25519 public key a certificate carries, or `None` if it is not a well-formed
/// X.509 certificate holding a valid (not small-order) ed25519 key.
pub fn certificate_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).ok()?;
    spki_key(parsed.subject_public_key_info().as_ref())
}

fn spki_key(spki: &[u8]) -> Option<PublicKey> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    if key.len() != 32 {
        return None;
    }
    PublicKey::from_bytes(key).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_committee_key() {
        let key = KeyPair::generate();
        let identity = Identity::self_signed(&key, &replica_name(ReplicaId(3))).unwrap();
        assert_eq!(certificate_key(&identity.certificate), Some(key.public()));
    }

    #[test]
    fn replica_names_round_trip_and_odd_names_are_refused() {
        for id in [0u16, 7, 65535] {
            let name = ServerName::try_from(replica_name(ReplicaId(id))).unwrap();
            assert_eq!(parse_replica_name(&name), Some(ReplicaId(id)));
        }
        for bad in ["replica-03", "replica-70000", "node-1", "replica-1x", "replica-+1"] {
            if let Ok(name) = ServerName::try_from(bad.to_string()) {
                assert_eq!(parse_replica_name(&name), None, "{bad}");
            }
        }
        let ip = ServerName::try_from("127.0.0.1").unwrap();
        assert_eq!(parse_replica_name(&ip), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(certificate_key(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])), None);
        assert_eq!(certificate_key(&CertificateDer::from(Vec::new())), None);
    }
}
