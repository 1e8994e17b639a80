//! Identities: ed25519 keys (ed25519-dalek). A client is known by its public key; the
//! coordinator's key is pinned by clients.

use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};

/// An ed25519 public key: the identity of a client or coordinator on the wire. Serialised as
/// its 32 bytes in binary formats (postcard, the wire) and as lower-case hex in text ones
/// (JSON: the round log, status reports).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// The binary form of [`PublicKey`] (what its derived serialisation was).
#[derive(Serialize, Deserialize)]
#[serde(rename = "PublicKey")]
struct WireKey([u8; 32]);

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            WireKey(self.0).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            PublicKey::from_hex(&s).map_err(serde::de::Error::custom)
        } else {
            Ok(PublicKey(WireKey::deserialize(d)?.0))
        }
    }
}

impl PublicKey {
    /// Lower-case hex, the form used in configs, logs and as the aggregation client id.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let bytes = hex::decode(s.trim()).map_err(|e| ProtocolError::malformed("public key", e))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ProtocolError::malformed("public key", "expected 32 bytes"))?;
        Ok(PublicKey(arr))
    }

    /// Verifies `sig` over `msg`; false for keys that are not valid curve points.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        VerifyingKey::from_bytes(&self.0)
            .map(|k| k.verify(msg, &Signature::from_bytes(sig)).is_ok())
            .unwrap_or(false)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}…)", &self.to_hex()[..12])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({:?})", self.public())
    }
}

impl Identity {
    /// The identity with this 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A fresh identity from the operating system's randomness.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| ProtocolError::malformed("randomness", e))?;
        Ok(Self::from_seed(seed))
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// A 32-byte key for `purpose`, derived from the secret seed (BLAKE3's key derivation):
    /// the same across restarts, independent of the signing key and of other purposes.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(purpose, &self.key.to_bytes())
    }

    /// Writes the secret seed as hex to `path`, readable by the owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path)?;
        f.write_all(hex::encode(self.key.to_bytes()).as_bytes())?;
        f.sync_all()
    }

    /// Reads a key written by [`Identity::save`]; the error names the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ProtocolError::Unreadable {
            what: "identity key",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let bytes = hex::decode(text.trim()).map_err(|e| {
            ProtocolError::malformed("identity key", format!("{}: {e}", path.display()))
        })?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| {
            ProtocolError::malformed(
                "identity key",
                format!("{}: expected 32 bytes", path.display()),
            )
        })?;
        Ok(Self::from_seed(seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_its_bytes_on_the_wire_and_hex_in_json() {
        let k = Identity::from_seed([7; 32]).public();
        // The wire form is what the derived serialisation of `PublicKey([u8; 32])` was.
        assert_eq!(postcard::to_stdvec(&k).unwrap(), k.0.to_vec());
        assert_eq!(postcard::from_bytes::<PublicKey>(&k.0).unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{}\"", k.to_hex()));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
        let bad = serde_json::from_str::<PublicKey>("\"abc\"").unwrap_err();
        assert!(bad.to_string().contains("public key"), "{bad}");
    }

    #[test]
    fn a_missing_key_file_is_named_as_unreadable_and_a_bad_one_as_malformed() {
        let dir = std::env::temp_dir().join(format!("fedtune-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("coordinator.id");
        let e = Identity::load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with("reading identity key") && e.contains("coordinator.id"),
            "{e}"
        );
        assert!(!e.contains("malformed"), "{e}");
        let bad = dir.join("bad.id");
        std::fs::write(&bad, "zz").unwrap();
        let e = Identity::load(&bad).unwrap_err().to_string();
        assert!(
            e.contains("malformed identity key") && e.contains("bad.id"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn derived_keys_are_stable_and_separate_purposes() {
        let id = Identity::from_seed([9; 32]);
        assert_eq!(
            id.derive_key("a"),
            Identity::from_seed([9; 32]).derive_key("a")
        );
        assert_ne!(id.derive_key("a"), id.derive_key("b"));
        assert_ne!(
            id.derive_key("a"),
            Identity::from_seed([8; 32]).derive_key("a")
        );
    }
}
