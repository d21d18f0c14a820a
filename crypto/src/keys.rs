//! ed25519 key pairs, public keys, signatures and key files.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::CryptoError;

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKey(VerifyingKey);

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(ed25519_dalek::Signature);

/// An ed25519 key pair. The secret is zeroized on drop and never printed.
pub struct KeyPair {
    signing: SigningKey,
}

impl PublicKey {
    /// Parses the 32-byte compressed form; refuses points that are not on the curve.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::MalformedPublicKey)?;
        match VerifyingKey::from_bytes(&array) {
            // A small-order key would let its holder make signatures that verify for
            // many messages: never accept one.
            Ok(key) if !key.is_weak() => Ok(PublicKey(key)),
            _ => Err(CryptoError::MalformedPublicKey),
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Verifies `signature` over exactly `message` (no domain added: see `signing`).
    /// Uses strict verification (no small-order keys, canonical encodings).
    pub fn verify_raw(&self, message: &[u8], signature: &Signature) -> Result<(), CryptoError> {
        self.0.verify_strict(message, &signature.0).map_err(|_| CryptoError::BadSignature)
    }

    pub(crate) fn inner(&self) -> &VerifyingKey {
        &self.0
    }

    /// Batch-verifies `signatures[i]` by `keys[i]` over exactly `messages[i]`. True only
    /// if every signature verifies (check one by one to find which did not).
    pub fn verify_batch_raw(keys: &[PublicKey], messages: &[Vec<u8>], signatures: &[Signature]) -> bool {
        if keys.len() != messages.len() || keys.len() != signatures.len() {
            return false;
        }
        if keys.is_empty() {
            return true;
        }
        let messages: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
        let signatures: Vec<ed25519_dalek::Signature> = signatures.iter().map(|s| s.0).collect();
        let keys: Vec<VerifyingKey> = keys.iter().map(|k| k.0).collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &hex::encode(self.0.as_bytes())[..8])
    }
}

impl FromStr for PublicKey {
    type Err = CryptoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s.trim()).map_err(|_| CryptoError::MalformedPublicKey)?;
        PublicKey::from_bytes(&bytes)
    }
}

impl Signature {
    /// Parses a 64-byte signature; anything shorter or longer is `MalformedSignature`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        ed25519_dalek::Signature::from_slice(bytes)
            .map(Signature)
            .map_err(|_| CryptoError::MalformedSignature { len: bytes.len() })
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        self.0.to_bytes()
    }

    pub(crate) fn inner(&self) -> &ed25519_dalek::Signature {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", &hex::encode(&self.0.to_bytes()[..4]))
    }
}

impl KeyPair {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> Self {
        KeyPair { signing: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    /// A key pair from a 32-byte seed. Deterministic: for tests, the simulator and
    /// the marked test keys of local testnets only.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        KeyPair { signing: SigningKey::from_bytes(&seed) }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// Signs exactly `message` (no domain added: see `signing`).
    pub fn sign_raw(&self, message: &[u8]) -> Signature {
        Signature(self.signing.sign(message))
    }

    /// The 32-byte secret seed. Handle with care: this is the replica's identity.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// Writes the key pair to `path` with mode 0600. Refuses to overwrite a file.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyFileError> {
        self.write_key_file(path, false)
    }

    /// Writes a key marked as a test key: nodes refuse it unless their config says
    /// `test_keys = true`. For local testnets whose keys are not secret.
    pub fn write_test_key_file(&self, path: &Path) -> Result<(), KeyFileError> {
        self.write_key_file(path, true)
    }

    fn write_key_file(&self, path: &Path, test_key: bool) -> Result<(), KeyFileError> {
        let err = |kind| KeyFileError { path: path.to_path_buf(), kind };
        let marker = if test_key {
            "# TEST KEY for local testnets only: not secret, refused unless test_keys = true.\ntest_key = true\n"
        } else {
            ""
        };
        let text = Zeroizing::new(format!(
            "# Bulwark ed25519 key pair. Secret: never share this file.\n{marker}\
             public_key = \"{}\"\nsecret_key = \"{}\"\n",
            self.public(),
            hex::encode(self.secret_bytes().as_ref())
        ));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(KeyFileErrorKind::Io(e.to_string())))?;
        file.write_all(text.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(|e| err(KeyFileErrorKind::Io(e.to_string())))
    }

    /// Reads a key pair written by [`KeyPair::write_file`]. Refuses a file that group or
    /// others can read or write, a malformed file, and one whose public key does not
    /// match its secret.
    pub fn read_file(path: &Path) -> Result<Self, KeyFileError> {
        Self::read_key_file(path).map(|(pair, _)| pair)
    }

    /// Like [`KeyPair::read_file`], also telling whether the file is marked as a test
    /// key ([`KeyPair::write_test_key_file`]).
    pub fn read_key_file(path: &Path) -> Result<(Self, bool), KeyFileError> {
        let err = |kind| KeyFileError { path: path.to_path_buf(), kind };
        let meta = fs::metadata(path).map_err(|e| err(KeyFileErrorKind::Io(e.to_string())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(KeyFileErrorKind::Permissions { mode }));
        }
        let text =
            Zeroizing::new(fs::read_to_string(path).map_err(|e| err(KeyFileErrorKind::Io(e.to_string())))?);
        let file: KeyFileContents =
            toml::from_str(&text).map_err(|e| err(KeyFileErrorKind::Malformed(e.message().to_string())))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(file.secret_key.trim(), seed.as_mut())
            .map_err(|_| err(KeyFileErrorKind::Malformed("secret_key is not 64 hex characters".into())))?;
        let pair = KeyPair::from_seed(*seed);
        let public: PublicKey = file
            .public_key
            .parse()
            .map_err(|_| err(KeyFileErrorKind::Malformed("public_key is not a valid ed25519 key".into())))?;
        if public != pair.public() {
            return Err(err(KeyFileErrorKind::Mismatch));
        }
        Ok((pair, file.test_key))
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({:?})", self.public())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileContents {
    public_key: String,
    secret_key: String,
    #[serde(default)]
    test_key: bool,
}

/// A key file could not be written or used; names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("key file {}: {kind}", path.display())]
pub struct KeyFileError {
    pub path: PathBuf,
    pub kind: KeyFileErrorKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileErrorKind {
    #[error("{0}")]
    Io(String),
    #[error("mode {mode:04o} lets group or others access the secret key; run `chmod 600` on it")]
    Permissions { mode: u32 },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("public_key does not belong to secret_key")]
    Mismatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_raw_and_wrong_key() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        let sig = a.sign_raw(b"hello");
        assert_eq!(a.public().verify_raw(b"hello", &sig), Ok(()));
        assert_eq!(b.public().verify_raw(b"hello", &sig), Err(CryptoError::BadSignature));
        assert_eq!(a.public().verify_raw(b"hellO", &sig), Err(CryptoError::BadSignature));
    }

    #[test]
    fn truncated_signature_is_malformed() {
        let sig = KeyPair::generate().sign_raw(b"x").to_bytes();
        assert_eq!(Signature::from_bytes(&sig[..63]), Err(CryptoError::MalformedSignature { len: 63 }));
        assert!(Signature::from_bytes(&sig).is_ok());
    }

    #[test]
    fn key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let pair = KeyPair::generate();
        pair.write_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(KeyPair::read_file(&path).unwrap().public(), pair.public());
        // Never overwrites.
        assert!(pair.write_file(&path).is_err());
        assert!(!KeyPair::read_key_file(&path).unwrap().1);
        let test_path = dir.path().join("test.key");
        pair.write_test_key_file(&test_path).unwrap();
        assert!(KeyPair::read_key_file(&test_path).unwrap().1, "marked as a test key");
    }

    #[test]
    fn world_readable_key_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.key");
        KeyPair::generate().write_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyPair::read_file(&path).unwrap_err();
        assert_eq!(err.kind, KeyFileErrorKind::Permissions { mode: 0o644 });
        let text = err.to_string();
        assert!(text.contains("open.key") && text.contains("0644") && text.contains("chmod 600"), "{text}");
    }

    #[test]
    fn corrupted_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let path = dir.path().join(name);
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            path
        };
        let pair = KeyPair::generate();
        let good_secret = hex::encode(pair.secret_bytes().as_ref());
        let cases = [
            write("garbage.key", "\u{1}\u{2} not toml"),
            write("short.key", &format!("public_key = \"{}\"\nsecret_key = \"abcd\"\n", pair.public())),
            write("badpub.key", &format!("public_key = \"zz\"\nsecret_key = \"{good_secret}\"\n")),
        ];
        for path in cases {
            let err = KeyPair::read_file(&path).unwrap_err();
            assert!(matches!(err.kind, KeyFileErrorKind::Malformed(_)), "{err}");
        }
        let other = KeyPair::generate().public();
        let mismatch =
            write("mismatch.key", &format!("public_key = \"{other}\"\nsecret_key = \"{good_secret}\"\n"));
        assert_eq!(KeyPair::read_file(&mismatch).unwrap_err().kind, KeyFileErrorKind::Mismatch);
    }
}
