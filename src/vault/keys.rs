//! Key management: data and index key rotation, re-encryption, retiring
//! versions, and the root key (rotation, proof, the PKCS#11 token).

use std::sync::Arc;

use super::{ReencryptProgress, Requester, Vault, pending_sealed_path};
use crate::audit::{Event, Outcome};
use crate::crypto::envelope;
use crate::crypto::keyring::{self, DataKey, KeyPurpose};
use crate::crypto::root::{self as crypto_root, KdfParams, Unlock};
use crate::error::VaultError;
use crate::store::{KeyInfo, KeyState, Pending, Reencrypted};

impl Vault {
    /// The data-key versions of `collection`, oldest first, with state,
    /// live records and encryptions, then its blind-index key versions (if
    /// deterministic). Audited.
    pub async fn list_keys(&self, who: &Requester, collection: &str) -> Result<Vec<KeyInfo>, VaultError> {
        let coll = self.collection(collection)?;
        let mut keys = self.inner.store.list_keys(coll.id, KeyPurpose::Data).await?;
        keys.extend(self.inner.store.list_keys(coll.id, KeyPurpose::Index).await?);
        self.record(who.record(Event::ListKeys, collection, 0, Outcome::Ok)).await?;
        Ok(keys)
    }

    /// A new random primary data key for `collection`; older versions keep
    /// decrypting. Returns the new version.
    pub async fn rotate_data_key(&self, who: &Requester, collection: &str) -> Result<u32, VaultError> {
        self.rotate(who, collection, KeyPurpose::Data, None).await
    }

    /// A new primary blind-index key for deterministic `collection`: new
    /// values are indexed under it at once, lookups keep trying the older
    /// versions, and the index is rebuilt under it in the background (then
    /// the older versions are destroyed). Returns the new version.
    pub async fn rotate_index_key(&self, who: &Requester, collection: &str) -> Result<u32, VaultError> {
        let coll = self.collection(collection)?;
        if !coll.deterministic {
            return Err(VaultError::NotDeterministic);
        }
        let version = self.rotate(who, collection, KeyPurpose::Index, None).await?;
        let (vault, who, collection) = (self.clone(), who.clone(), collection.to_owned());
        tokio::spawn(async move {
            let rebuilt = vault.rebuild_index(&who, &collection).await;
            super::upkeep::background_ended("blind-index rebuild", &collection, rebuilt.map(|_| ()));
        });
        Ok(version)
    }

    /// Responds to a suspected leak of `version`: marks it compromised (it
    /// never encrypts again), makes a new primary, and starts re-encrypting
    /// the collection in the background. Returns the new version.
    pub async fn rotate_compromised(&self, who: &Requester, collection: &str, version: u32) -> Result<u32, VaultError> {
        let new = self.rotate(who, collection, KeyPurpose::Data, Some(version)).await?;
        tracing::warn!(
            alert = true,
            collection,
            compromised = version,
            new_primary = new,
            "key version marked compromised"
        );
        let (vault, who, collection) = (self.clone(), who.clone(), collection.to_owned());
        tokio::spawn(async move {
            let moved = vault.reencrypt(&who, &collection, super::upkeep::REENCRYPT_BATCH, &mut |_| {}).await;
            super::upkeep::background_ended("re-encryption after a compromise", &collection, moved.map(|_| ()));
        });
        Ok(new)
    }

    async fn rotate(
        &self,
        who: &Requester,
        collection: &str,
        purpose: KeyPurpose,
        compromised: Option<u32>,
    ) -> Result<u32, VaultError> {
        let coll = self.collection(collection)?;
        let _one_at_a_time = self.inner.key_ops.lock().await;
        let keys = self.inner.store.list_keys(coll.id, purpose).await?;
        if let Some(bad) = compromised
            && !keys.iter().any(|k| k.version == bad && k.state != KeyState::Retired)
        {
            return Err(VaultError::NoSuchKeyVersion(bad));
        }
        let version =
            keys.iter().map(|k| k.version).max().unwrap_or(0).checked_add(1).ok_or(VaultError::KeyConflict)?;
        let key = DataKey::generate()?;
        let wrapped = {
            let root = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            keyring::wrap(&root, purpose, collection, version, &key)?
        };
        let (event, what) = if purpose == KeyPurpose::Index {
            (Event::RotateIndexKey, "index key")
        } else {
            (Event::RotateDataKey, "data key")
        };
        let mut audit = who.record(event, collection, 0, Outcome::Ok);
        audit.error_code = match compromised {
            Some(bad) => format!("new primary version {version}; version {bad} compromised"),
            None => format!("new primary {what} version {version}"),
        };
        self.inner
            .store
            .add_primary_key(coll.id, purpose, version, wrapped, compromised, audit)
            .await
            .map_err(super::key_change)?;
        self.inner.keyring.insert(coll.id.0, purpose, version, key, true);
        tracing::info!(collection, version, "{what} rotated");
        Ok(version)
    }

    /// Moves every live record of `collection` that is not under the primary
    /// version onto it, `batch` records per transaction, while traffic goes
    /// on. Resumable and idempotent: the state is the records themselves.
    /// `progress` is told after each batch.
    pub async fn reencrypt(
        &self,
        who: &Requester,
        collection: &str,
        batch: usize,
        progress: &mut (dyn FnMut(&ReencryptProgress) + Send),
    ) -> Result<ReencryptProgress, VaultError> {
        let coll = self.collection(collection)?;
        let job = self.start_job(format!("reencrypt {collection}")).await?;
        self.record(who.record(Event::Reencrypt, collection, 0, Outcome::Started)).await?;
        self.inner.store.mark_retiring(coll.id).await?;
        let mut done = ReencryptProgress::default();
        let mut after = 0;
        loop {
            job.still_held().await?;
            self.refresh_if_shared().await?;
            let primary = self.primary_version(coll, KeyPurpose::Data)?;
            let page = self
                .inner
                .store
                .records_needing(coll.id, Pending::Reencryption { primary }, after, batch.max(1))
                .await?;
            let Some(last) = page.last() else { break };
            after = last.at.seq;
            let mut moved = Vec::with_capacity(page.len());
            for record in &page {
                let text = coll.token_text(&record.at);
                let ciphertext = &record.ciphertext;
                let reopened = (|| {
                    let from = envelope::key_version(ciphertext).ok()?;
                    let value = self.open_record(coll, &text, ciphertext).ok()?;
                    let sealed = self
                        .inner
                        .keyring
                        .with_primary(coll.id.0, KeyPurpose::Data, |version, key| {
                            envelope::seal(key, version, collection, &text, value.expose_secret().as_bytes())
                                .map(|ct| (version, ct))
                        })?
                        .ok()?;
                    Some(Reencrypted {
                        seq: record.at.seq,
                        from_version: from,
                        to_version: sealed.0,
                        ciphertext: sealed.1,
                    })
                })();
                match reopened {
                    Some(record) => moved.push(record),
                    None => done.unreadable += 1,
                }
            }
            let audit = who.record(Event::Reencrypt, collection, moved.len(), Outcome::Ok);
            done.moved += self.inner.store.replace_ciphertexts(coll.id, moved, audit).await? as u64;
            progress(&done);
        }
        done.remaining = self
            .inner
            .store
            .list_keys(coll.id, KeyPurpose::Data)
            .await?
            .iter()
            .filter(|k| k.state != KeyState::Primary)
            .map(|k| k.records)
            .sum();
        tracing::info!(
            collection,
            moved = done.moved,
            unreadable = done.unreadable,
            remaining = done.remaining,
            "re-encryption finished"
        );
        Ok(done)
    }

    /// Replaces the root key: a new random root sealed under `unlock`
    /// (written beside the old sealed file first), every live wrapped key
    /// re-wrapped under it in one transaction, then the new sealed file
    /// renamed over the old one. No record is re-encrypted. Afterwards the
    /// old passphrase or raw key no longer opens the vault. An interruption
    /// at any point leaves a vault that opens with the old secret (before
    /// the transaction) or the new one (after it); see
    /// [`PENDING_SEALED_SUFFIX`].
    pub async fn rotate_root(&self, who: &Requester, unlock: &Unlock, params: KdfParams) -> Result<usize, VaultError> {
        let _one_at_a_time = self.inner.key_ops.lock().await;
        // Another running node keeps the old root in memory and would wrap
        // the keys it rotates under it: they would not open after a restart
        // with the new sealed file. One node at a time.
        let others = self.inner.store.other_writers().await?;
        if !others.is_empty() {
            return Err(VaultError::OtherNodesRunning(others));
        }
        let pending = pending_sealed_path(&self.inner.sealed_root);
        // A pending file while the vault runs is a rotation whose final
        // rename failed: it may be the only file that opens the store.
        // Never overwrite it; a restart completes or discards it.
        if pending.exists() {
            return Err(VaultError::RotationPending(pending.display().to_string()));
        }
        let (new_root, sealed) = crypto_root::create(unlock, params)?;
        crate::datadir::write_private_file(&pending, &sealed).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        let stored = self.inner.store.wrapped_keys().await?;
        let mut rewrapped = Vec::new();
        {
            let old_root = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            for mut key in stored {
                let purpose = key.purpose;
                let clear = keyring::unwrap(&old_root, purpose, &key.collection_name, key.version, &key.wrapped)
                    .map_err(|_| VaultError::Keyring {
                        collection: key.collection_name.clone(),
                        reason: "a wrapped key does not open with the current root key",
                    })?;
                key.wrapped = keyring::wrap(&new_root, purpose, &key.collection_name, key.version, &clear)?;
                rewrapped.push(key);
            }
        }
        let count = rewrapped.len();
        let mut audit = who.record(Event::RotateRootKey, "", count, Outcome::Ok);
        // The provider that seals the new root key.
        unlock.provider().as_str().clone_into(&mut audit.error_code);
        if let Err(e) = self.inner.store.rewrap_keys(rewrapped, audit).await {
            let _ = std::fs::remove_file(&pending);
            return Err(e.into());
        }
        // Committed: the database now needs the new root, in memory at once
        // (so nothing is ever wrapped under the old one again), and on disk
        // by an atomic rename. If the rename fails, the pending file holds
        // the new root and the next open completes the rotation.
        *self.inner.root.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new_root;
        std::fs::rename(&pending, &self.inner.sealed_root).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        if let Some(dir) = self.inner.sealed_root.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        tracing::warn!(
            keys = count,
            provider = unlock.provider().as_str(),
            "root key rotated; the previous secret no longer opens this vault"
        );
        Ok(count)
    }

    /// Whether `unlock` opens the sealed root file on disk to the root key
    /// this vault runs with: the proof an online root rotation asks for.
    /// A wrong secret is `Ok(false)`; a token that cannot be used is an
    /// error.
    pub fn opens_current_root(&self, unlock: &Unlock) -> Result<bool, VaultError> {
        let file = std::fs::read(&self.inner.sealed_root).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        match crypto_root::unseal(&file, unlock) {
            Ok(opened) => {
                let current = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(bool::from(subtle::ConstantTimeEq::ct_eq(
                    opened.expose_secret().as_slice(),
                    current.expose_secret().as_slice(),
                )))
            }
            Err(crate::crypto::CryptoError::Hsm(
                e @ (crate::crypto::pkcs11::HsmError::PinIncorrect | crate::crypto::pkcs11::HsmError::PinLocked),
            )) => {
                tracing::warn!(error = %e, "root rotation refused: the current PIN was not accepted");
                Ok(false)
            }
            Err(e @ crate::crypto::CryptoError::Hsm(_)) => Err(e.into()),
            Err(_) => Ok(false),
        }
    }

    /// Keeps `hsm` for root-key rotations into the PKCS#11 token (the first
    /// call wins).
    pub fn attach_hsm(&self, hsm: Arc<crate::crypto::pkcs11::Hsm>) {
        let _ = self.inner.hsm.set(hsm);
    }

    /// The PKCS#11 token attached with [`Vault::attach_hsm`].
    pub fn hsm(&self) -> Option<Arc<crate::crypto::pkcs11::Hsm>> {
        self.inner.hsm.get().cloned()
    }

    /// Destroys `version` of `collection`'s data key: refused while any
    /// record is sealed under it, and for the primary.
    pub async fn retire_key_version(&self, who: &Requester, collection: &str, version: u32) -> Result<(), VaultError> {
        let coll = self.collection(collection)?;
        let _one_at_a_time = self.inner.key_ops.lock().await;
        let mut audit = who.record(Event::RetireKeyVersion, collection, 0, Outcome::Ok);
        audit.error_code = format!("version {version}");
        self.inner.store.retire_key(coll.id, version, audit).await?.map_err(VaultError::RetireRefused)?;
        self.inner.keyring.remove(coll.id.0, KeyPurpose::Data, version);
        tracing::info!(collection, version, "data key version retired and destroyed");
        Ok(())
    }

    /// [`Vault::refresh_keys`] on a store that other nodes share; nothing on
    /// one this process owns.
    pub(crate) async fn refresh_if_shared(&self) -> Result<(), VaultError> {
        if self.inner.store.capabilities().shared {
            self.refresh_keys().await?;
        }
        Ok(())
    }

    /// Brings the keyring in step with the store, for a store that other
    /// nodes change too: versions rotated in elsewhere are unwrapped and
    /// the store's primary becomes this node's; versions retired elsewhere
    /// are forgotten; a version marked compromised elsewhere stops being
    /// the primary here. Returns how many versions changed.
    pub async fn refresh_keys(&self) -> Result<usize, VaultError> {
        let stored = self.inner.store.load_keys().await?;
        let root = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let keyring = &self.inner.keyring;
        let mut changed = 0;
        for key in &stored {
            let (collection, purpose, version) = (key.collection.0, key.purpose, key.version);
            let known = keyring.with_version(collection, purpose, version, |_| ()).is_some();
            if !super::is_loaded(&self.inner.collections, key) {
                if known && key.state == KeyState::Retired {
                    keyring.remove(collection, purpose, version);
                    changed += 1;
                }
                continue;
            }
            let primary_here = keyring.with_primary(collection, purpose, |v, _| v) == Some(version);
            if known && primary_here == (key.state == KeyState::Primary) {
                continue;
            }
            if !known || key.state == KeyState::Primary {
                super::load_key(keyring, &root, key)?;
                changed += 1;
            }
        }
        if changed > 0 {
            tracing::info!(versions = changed, "keys changed through another node are in force here");
        }
        Ok(changed)
    }

    /// Key versions per collection, purpose and state, with live records
    /// (for metrics; not audited: it reveals counts, never a value).
    pub async fn key_summary(&self) -> Result<Vec<crate::store::KeySummary>, VaultError> {
        Ok(self.inner.store.key_summary().await?)
    }
}
