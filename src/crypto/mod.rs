//! Cryptography: the root key, the keyring of wrapped data keys, and the
//! record envelope.
//!
//! This module owns every byte of key material. It never logs, never formats
//! a key, and every decryption failure leaves it as one opaque error: callers
//! learn that something failed, never which byte or which check.

pub mod envelope;
pub mod keyring;
pub mod pkcs11;
pub mod root;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use zeroize::Zeroizing;

/// Length in bytes of every symmetric key piivault uses (AES-256, HMAC-SHA256).
pub const KEY_LEN: usize = 32;
/// Length in bytes of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length in bytes of an AES-GCM authentication tag.
pub const TAG_LEN: usize = 16;

/// Errors of the cryptographic layer. Messages are fixed text: they never
/// carry key material, plaintext, or a hint about which byte failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The operating system's CSPRNG did not answer.
    #[error("the operating system's random number generator failed")]
    Rng,
    /// Any failure to decrypt or authenticate: wrong key, altered or moved
    /// ciphertext, truncation, unknown format. Deliberately one variant.
    #[error("decryption failed")]
    Decrypt,
    /// AES-GCM refused to encrypt (only possible for absurd input sizes).
    #[error("encryption failed")]
    Encrypt,
    /// The sealed root key did not open: wrong passphrase or raw key, or the
    /// sealed file was altered.
    #[error("cannot unseal the root key: wrong passphrase or key, or the sealed root file was altered")]
    Unseal,
    /// The sealed root file is not in the expected layout.
    #[error("the sealed root file is malformed or truncated")]
    MalformedSealed,
    /// The sealed root file was written by a newer format.
    #[error("the sealed root file has format version {0}; this build reads version 1")]
    UnsupportedSealedVersion(u8),
    /// The sealed root file asks for Argon2id parameters below the floor.
    #[error(
        "the sealed root file's Argon2id parameters are below the minimum (m={} KiB, t={}, p={})",
        root::MIN_KDF.m_kib, root::MIN_KDF.t, root::MIN_KDF.p
    )]
    WeakKdfParams,
    /// The sealed root file asks for Argon2id parameters above the ceiling
    /// (a file crafted to exhaust memory or time at startup).
    #[error(
        "the sealed root file's Argon2id parameters exceed the maximum (m={} KiB, t={}, p={})",
        root::MAX_KDF.m_kib, root::MAX_KDF.t, root::MAX_KDF.p
    )]
    ExcessiveKdfParams,
    /// The sealed root file was sealed by another kind of provider.
    #[error("the sealed root file is sealed with a {expected}, but a {given} was supplied")]
    WrongUnlockKind {
        /// What the file needs.
        expected: &'static str,
        /// What was supplied.
        given: &'static str,
    },
    /// A raw root key of the wrong size or encoding.
    #[error("a raw root key must be exactly 32 bytes, or 64 hexadecimal digits")]
    RawKeyFormat,
    /// An empty passphrase.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// Argon2id failed to run with the given parameters.
    #[error("root key derivation failed")]
    Kdf,
    /// A new passphrase below the floor (length and distinct characters).
    #[error(
        "the passphrase is too weak: use at least {} characters with at least {} different ones",
        root::MIN_PASSPHRASE_CHARS,
        root::MIN_PASSPHRASE_DISTINCT
    )]
    WeakPassphrase,
    /// A new raw key with too few distinct bytes to be random (all zeros, a
    /// repeated byte, a short pattern).
    #[error(
        "the raw key is degenerate (fewer than {} different bytes): generate it with a CSPRNG",
        root::MIN_RAW_KEY_DISTINCT
    )]
    DegenerateRawKey,
    /// The PKCS#11 token could not seal or unseal (never the PIN or a key
    /// in the message).
    #[error(transparent)]
    Hsm(#[from] pkcs11::HsmError),
}

/// A 256-bit secret key. Zeroized on drop; implements neither `Debug`,
/// `Clone`, `Display` nor `Serialize`, so it cannot leak through a format
/// string or be copied by accident.
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Takes ownership of raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Self(Zeroizing::new([0u8; KEY_LEN]));
        fill_random(key.0.as_mut_slice())?;
        Ok(key)
    }

    /// The raw key bytes. Every use is a deliberate, greppable exposure.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Rng)
}

/// A random AES-GCM nonce.
pub(crate) fn random_nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    Ok(nonce)
}

/// AES-256-GCM encryption; returns `ciphertext ‖ tag`.
pub(crate) fn aead_seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
        .encrypt(Nonce::from_slice(nonce), Payload { msg: plaintext, aad })
        .map_err(|_| CryptoError::Encrypt)
}

/// A secret typed or kept in a file: a trailing newline (as left by `echo`
/// into a file) is removed; `None` if nothing is left.
pub(crate) fn secret_line(mut text: String) -> Option<Zeroizing<String>> {
    while text.ends_with('\n') || text.ends_with('\r') {
        text.pop();
    }
    let text = Zeroizing::new(text);
    (!text.is_empty()).then_some(text)
}

/// AES-256-GCM decryption of `ciphertext ‖ tag`; any failure is
/// [`CryptoError::Decrypt`].
pub(crate) fn aead_open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Decrypt)
}

/// Unambiguous concatenation for AAD and HKDF info: each part is preceded by
/// its length as a big-endian `u16`, so `("ab", "c")` and `("a", "bc")` never
/// encode alike. Parts longer than `u16::MAX` cannot occur (collection names
/// and tokens are bounded far below); they are refused (`None`) rather than
/// truncated.
pub(crate) fn bind(out: &mut Vec<u8>, parts: &[&[u8]]) -> Option<()> {
    for part in parts {
        let len = u16::try_from(part.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part);
    }
    Some(())
}
