//! Opening a vault from its sealed root key, and finishing or undoing a
//! root-key rotation that was interrupted: every embedding recovers the
//! same way.
//!
//! A root-key rotation writes `root.sealed.new` before re-wrapping the keys
//! and renames it over `root.sealed` after; an interruption leaves both
//! files. Each file names the provider that sealed it, and each that opens
//! with that provider's secret is tried; the keyring decides which root key
//! is real: if it is the new one the rotation is completed (renamed into
//! place), if the old one the leftover is removed.

use std::path::PathBuf;

use super::{Vault, pending_sealed_path};
use crate::config::Config;
use crate::crypto::CryptoError;
use crate::crypto::root::{self, Provider, Unlock};
use crate::error::VaultError;

/// The secret of each root-key provider, asked for only when a sealed file
/// needs it (an interrupted rotation may leave files of two providers).
pub trait Secrets {
    /// Why a secret could not be had.
    type Error;

    /// The secret that opens files sealed by `provider`.
    fn unlock(&mut self, provider: Provider) -> Result<&Unlock, Self::Error>;
}

/// What went wrong first.
#[derive(Debug)]
pub enum UnsealError<E> {
    /// `root.sealed` cannot be read.
    Unreadable(std::io::Error),
    /// A sealed file is malformed, or does not open with its secret.
    Sealed {
        /// The file.
        path: PathBuf,
        /// Why.
        error: CryptoError,
    },
    /// The secret its provider needs could not be had.
    Secret {
        /// The file that asked for it.
        path: PathBuf,
        /// Why.
        error: E,
    },
    /// The root key opened, but the vault did not open with it.
    Vault(VaultError),
    /// The rotation's file could not be put in place or removed.
    Finish(std::io::Error),
}

/// Why no sealed root key opened the vault: the first failure, and the
/// leftover of an interrupted rotation if there is one (the other secret
/// may open it).
#[derive(Debug)]
pub struct UnsealFailure<E> {
    /// The first failure met.
    pub error: UnsealError<E>,
    /// `root.sealed.new`, if it is there.
    pub pending: Option<PathBuf>,
}

/// Opens the vault `config` names with whichever of `root.sealed` and
/// `root.sealed.new` opens it, completing or undoing an interrupted
/// root-key rotation. Returns the vault and the provider that sealed its
/// root key.
pub async fn open_sealed<S: Secrets>(
    config: &Config,
    secrets: &mut S,
) -> Result<(Vault, Provider), UnsealFailure<S::Error>> {
    let sealed_path = &config.sealed_root;
    let pending = pending_sealed_path(sealed_path);
    let fail = |error| UnsealFailure { error, pending: pending.exists().then(|| pending.clone()) };
    let sealed = std::fs::read(sealed_path).map_err(|e| fail(UnsealError::Unreadable(e)))?;
    let mut first_error = None;
    for (path, bytes) in [(sealed_path.clone(), Some(sealed)), (pending.clone(), std::fs::read(&pending).ok())] {
        let Some(bytes) = bytes else { continue };
        let provider = match root::parse_sealed(&bytes) {
            Ok(parsed) => parsed.provider,
            Err(error) => {
                first_error.get_or_insert(UnsealError::Sealed { path, error });
                continue;
            }
        };
        let unlock = match secrets.unlock(provider) {
            Ok(unlock) => unlock,
            Err(error) => {
                first_error.get_or_insert(UnsealError::Secret { path, error });
                continue;
            }
        };
        let root = match root::unseal(&bytes, unlock) {
            Ok(root) => root,
            Err(error) => {
                first_error.get_or_insert(UnsealError::Sealed { path, error });
                continue;
            }
        };
        match Vault::open(config, &root).await {
            Ok(vault) => {
                if path == pending {
                    std::fs::rename(&pending, sealed_path).map_err(|e| fail(UnsealError::Finish(e)))?;
                    tracing::warn!("completed an interrupted root-key rotation: the new sealed root key is in place");
                } else if pending.exists() {
                    std::fs::remove_file(&pending).map_err(|e| fail(UnsealError::Finish(e)))?;
                    tracing::warn!("removed the leftover of a root-key rotation that did not complete");
                }
                return Ok((vault, provider));
            }
            Err(e) => {
                first_error.get_or_insert(UnsealError::Vault(e));
            }
        }
    }
    Err(fail(first_error.unwrap_or(UnsealError::Sealed { path: sealed_path.clone(), error: CryptoError::Unseal })))
}
