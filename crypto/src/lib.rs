//! Cryptography and encoding shared by every Bulwark crate.
//!
//! - [`KeyPair`], [`PublicKey`], [`Signature`]: ed25519 (ed25519-dalek), key files;
//! - SHA-256 digests: [`Digest`];
//! - [`Signed`], [`Verified`], [`Domain`]: domain-separated signing, where a verified
//!   value can only be built by checking its signature;
//! - [`QuorumSignatures`]: quorum certificate signature sets with batch verification;
//! - [`Committee`]: the replicas, their keys and addresses, quorum sizes;
//! - [`codec`]: the one wire and storage encoding, with bounded decoding.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod codec;
mod committee;
mod digest;
mod keys;
mod quorum;
mod signing;

pub use committee::{ChainId, Committee, CommitteeError, Member, ReplicaId};
pub use digest::{Digest, DigestParseError, Hasher};
pub use keys::{KeyFileError, KeyFileErrorKind, KeyPair, PublicKey, Signature};
pub use quorum::QuorumSignatures;
pub use signing::{Domain, Signed, SignedKind, Verified, Verify, signing_bytes};

/// Why a signature, key or signature set was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("signature does not verify")]
    BadSignature,
    #[error("signature by replica {0} does not verify")]
    BadSignatureFrom(ReplicaId),
    #[error("a signature is 64 bytes, got {len}")]
    MalformedSignature { len: usize },
    #[error("not a valid ed25519 public key")]
    MalformedPublicKey,
    #[error("replica {0} is not in the committee")]
    UnknownSigner(ReplicaId),
    #[error("replica {0} signed more than once")]
    DuplicateSigner(ReplicaId),
    #[error("{got} signers, a quorum needs {need}")]
    InsufficientSigners { got: usize, need: usize },
}
