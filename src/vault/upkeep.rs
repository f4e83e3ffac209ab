//! Upkeep: the background work a serving vault does (automatic rotation,
//! the expiry purge, blind-index rebuilds) and the online backup.

use super::{INDEX_BATCH, Requester, Vault};
use crate::audit::{Event, Outcome};
use crate::config::Config;
use crate::crypto::keyring::{self, KeyPurpose};
use crate::error::VaultError;
use crate::store::{KeyState, Pending};

/// A background job running on this node, holding its lease: the lease
/// (and the node's claim) end when it is dropped.
pub(crate) struct RunningJob {
    vault: Vault,
    name: String,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.vault.inner.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.name);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, name) = (self.vault.inner.store.clone(), std::mem::take(&mut self.name));
            runtime.spawn(async move {
                if let Err(e) = store.release_lease(&name).await {
                    // The lease ends with the session anyway.
                    tracing::warn!(error = %e, job = %name, "cannot give a background job's lease up");
                }
            });
        }
    }
}

impl RunningJob {
    /// Whether this node still holds the job's lease: checked before each
    /// batch, so a node that lost its database session (and the lease with
    /// it) stops rather than race the node that took the job over.
    pub(super) async fn still_held(&self) -> Result<(), VaultError> {
        if self.vault.inner.store.hold_lease(&self.name).await? {
            Ok(())
        } else {
            tracing::warn!(job = %self.name, "another node took this background job over; stopping it here");
            Err(VaultError::JobRunning { job: self.name.clone(), here: false })
        }
    }
}

impl Vault {
    /// Starts background job `name` on this node: refused while it runs
    /// here already, or on another node that holds its lease.
    pub(crate) async fn start_job(&self, name: String) -> Result<RunningJob, VaultError> {
        if !self.inner.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone()) {
            return Err(VaultError::JobRunning { job: name, here: true });
        }
        let job = RunningJob { vault: self.clone(), name };
        if self.inner.store.hold_lease(&job.name).await? {
            Ok(job)
        } else {
            Err(VaultError::JobRunning { job: job.name.clone(), here: false })
        }
    }

    /// Indexes every live record of deterministic `collection` under the
    /// primary index key (moving it off older versions), `INDEX_BATCH` per
    /// transaction while traffic goes on, then destroys the index-key
    /// versions nothing uses any more. Resumable: the state is the index
    /// itself. Returns how many records were (re)indexed.
    pub async fn rebuild_index(&self, who: &Requester, collection: &str) -> Result<u64, VaultError> {
        let coll = self.collection(collection)?;
        if !coll.deterministic {
            return Err(VaultError::NotDeterministic);
        }
        let job = self.start_job(format!("reindex {collection}")).await?;
        let mut done = 0u64;
        let mut after = 0;
        loop {
            job.still_held().await?;
            // A key rotated through another node is indexed under at once.
            self.refresh_if_shared().await?;
            let primary = self.primary_version(coll, KeyPurpose::Index)?;
            let page = self
                .inner
                .store
                .records_needing(coll.id, Pending::Indexing { version: primary }, after, INDEX_BATCH)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.at.seq;
            let mut entries = Vec::with_capacity(page.len());
            for record in &page {
                // An unreadable record was alerted by open_record; it keeps
                // its old entry (if any) and is retried next time.
                let Ok(value) = self.open_record(coll, &coll.token_text(&record.at), &record.ciphertext) else {
                    continue;
                };
                let value = coll.normalize.apply(value);
                let digest = self
                    .inner
                    .keyring
                    .with_version(coll.id.0, KeyPurpose::Index, primary, |key| {
                        let form = coll.index_form(primary, value.expose_secret());
                        keyring::blind_index(key, coll.name.as_str(), form.as_bytes())
                    })
                    .ok_or_else(|| coll.no_primary(KeyPurpose::Index))??;
                entries.push((record.at.seq, digest));
            }
            let audit = who.record(Event::Reindex, collection, entries.len(), Outcome::Ok);
            done += self.inner.store.index_records(coll.id, primary, entries, audit).await? as u64;
        }
        let retired = self
            .inner
            .store
            .retire_unused_index_keys(coll.id, who.record(Event::RetireIndexKeys, collection, 0, Outcome::Ok))
            .await?;
        for version in &retired {
            self.inner.keyring.remove(coll.id.0, KeyPurpose::Index, *version);
        }
        tracing::info!(collection, indexed = done, retired = ?retired, "blind index rebuilt");
        Ok(done)
    }

    /// Starts what was left unfinished, by a previous run of this node or
    /// by another node that stopped: a blind-index rebuild of each
    /// deterministic collection that has records not indexed under its
    /// primary index key (after an index-key rotation, a crash, or a
    /// collection made deterministic), and the re-encryption of each
    /// collection that still has records under a compromised data-key
    /// version. A job that runs already (here, or on a node that holds its
    /// lease) is left to it.
    pub async fn resume_background_work(&self) -> Result<(), VaultError> {
        self.refresh_if_shared().await?;
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            let data_keys = self.inner.store.list_keys(coll.id, KeyPurpose::Data).await?;
            if data_keys.iter().any(|k| k.state == KeyState::Compromised && k.records > 0) {
                let (vault, name) = (self.clone(), name.clone());
                tokio::spawn(async move {
                    let resumed =
                        vault.reencrypt(&Requester::named("(resumed)"), &name, REENCRYPT_BATCH, &mut |_| {}).await;
                    background_ended("re-encryption of a compromised key version", &name, resumed.map(|_| ()));
                });
            }
            if !coll.deterministic {
                continue;
            }
            let primary = self.primary_version(coll, KeyPurpose::Index)?;
            let unindexed =
                self.inner.store.records_needing(coll.id, Pending::Indexing { version: primary }, 0, 1).await?;
            let retiring = self
                .inner
                .store
                .list_keys(coll.id, KeyPurpose::Index)
                .await?
                .iter()
                .any(|k| !matches!(k.state, KeyState::Primary | KeyState::Retired));
            if unindexed.is_empty() && !retiring {
                continue;
            }
            let vault = self.clone();
            tokio::spawn(async move {
                let resumed = vault.rebuild_index(&Requester::named("(resumed)"), &name).await;
                background_ended("blind-index rebuild", &name, resumed.map(|_| ()));
            });
        }
        Ok(())
    }

    /// Erases the records of every collection with a `ttl` that have
    /// expired, `batch` per transaction, each batch audited. Returns how
    /// many.
    pub async fn purge_expired(&self, batch: usize) -> Result<u64, VaultError> {
        let who = Requester::named("(expiry)");
        let now = crate::store::now_micros();
        let mut purged = 0u64;
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            if coll.ttl.is_none() {
                continue;
            }
            loop {
                let audit = who.record(Event::Purge, &name, 0, Outcome::Ok);
                let n = self.inner.store.purge_expired(coll.id, now, batch.max(1), audit, coll.renderer()).await?;
                purged += n as u64;
                if n < batch.max(1) {
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::info!(purged, "expired records purged");
        }
        Ok(purged)
    }

    /// Rotates the data key of every collection whose primary has reached
    /// its configured age (`rotate_after`) or count (`max_encryptions`).
    /// Returns the collections rotated, with their new versions.
    pub async fn rotate_due(&self) -> Result<Vec<(String, u32)>, VaultError> {
        let now = crate::store::now_micros();
        let mut rotated = Vec::new();
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            if coll.rotate_after.is_none() && coll.max_encryptions.is_none() {
                continue;
            }
            let keys = self.inner.store.list_keys(coll.id, KeyPurpose::Data).await?;
            let Some(primary) = keys.iter().find(|k| k.state == KeyState::Primary) else { continue };
            let age = std::time::Duration::from_micros(u64::try_from(now - primary.created_at).unwrap_or(0));
            let reason = match (coll.rotate_after, coll.max_encryptions) {
                (Some(limit), _) if age >= limit => "age",
                (_, Some(limit)) if primary.encryptions >= limit => "encryptions",
                _ => continue,
            };
            let version = self.rotate_data_key(&Requester::named("(automatic rotation)"), &name).await?;
            tracing::info!(collection = %name, version, reason, "automatic data-key rotation");
            rotated.push((name, version));
        }
        Ok(rotated)
    }

    /// Writes a consistent copy of the whole store, taken while traffic goes
    /// on, to a new private file the store names; returns its path (the
    /// caller streams it out, then removes it). Audited before it starts:
    /// no record, no backup.
    pub async fn backup(&self, who: &Requester) -> Result<std::path::PathBuf, VaultError> {
        if !self.inner.store.capabilities().file_backup {
            return Err(crate::store::StoreError::Unsupported("copy itself into a backup file").into());
        }
        self.record(who.record(Event::Backup, "", 0, Outcome::Started)).await?;
        let (dest, taken) = self.inner.store.backup().await?;
        // What left: its size and how many values it holds (fail closed:
        // no record, no copy).
        let mut done = who.record(Event::Backup, "", usize::try_from(taken.records).unwrap_or(usize::MAX), Outcome::Ok);
        done.error_code = format!("bytes={}", taken.bytes);
        if let Err(e) = self.record(done).await {
            let _ = std::fs::remove_file(&dest);
            return Err(e);
        }
        tracing::info!(pages = taken.pages, bytes = taken.bytes, records = taken.records, "store backup taken");
        Ok(dest)
    }

    /// Whether other nodes share this vault's store.
    pub fn store_is_shared(&self) -> bool {
        self.inner.store.capabilities().shared
    }

    /// Adds this node's per-caller quota use to the store and answers the
    /// other nodes' ([`crate::store::Store::share_quota_use`]).
    pub async fn share_quota_use(
        &self,
        used: Vec<crate::store::QuotaUse>,
        since_minute: i64,
    ) -> Result<Vec<crate::store::QuotaUse>, VaultError> {
        Ok(self.inner.store.share_quota_use(used, since_minute).await?)
    }

    /// Live records per collection name.
    pub async fn record_counts(&self) -> Result<Vec<(String, u64)>, VaultError> {
        let counts = self.inner.store.record_counts().await?;
        let mut out: Vec<(String, u64)> = self
            .inner
            .collections
            .values()
            .map(|c| (c.name.to_string(), counts.iter().find(|(id, _)| *id == c.id).map_or(0, |(_, n)| *n)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Starts the background work of a serving vault, until the returned
    /// tasks are aborted: automatic key rotation (checked every
    /// `server.key_check_interval`), the expiry purge (`store.purge_*`),
    /// resuming unfinished index rebuilds, the audit head log line
    /// (`audit.head_log_interval`) and, on a store that other nodes share,
    /// picking up their key changes when told and every
    /// `store.key_refresh_interval` ([`KEY_REFRESH_INTERVAL`]). Every
    /// embedding that serves runs it.
    pub fn spawn_background(&self, config: &Config) -> Vec<tokio::task::JoinHandle<()>> {
        let rotation_vault = self.clone();
        let key_check = config.server.key_check_interval;
        let shared = self.inner.store.capabilities().shared;
        let auto_rotation = tokio::spawn(async move {
            loop {
                tokio::time::sleep(key_check).await;
                // One node checks for the whole store (the one that holds
                // the lease; another takes it over if that one stops).
                let checked = match rotation_vault.inner.store.hold_lease(ROTATION_JOB).await {
                    Ok(true) => rotation_vault.rotate_due().await.map(|_| ()),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = checked {
                    tracing::error!(error = %e, "automatic key rotation check failed");
                }
            }
        });
        let purge_vault = self.clone();
        let (purge_every, purge_batch) = (config.store.purge_interval, config.store.purge_batch);
        let purger = tokio::spawn(async move {
            loop {
                let purged = match purge_vault.inner.store.hold_lease(PURGE_JOB).await {
                    Ok(true) => purge_vault.purge_expired(purge_batch).await.map(|_| ()),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = purged {
                    tracing::error!(error = %e, "purging expired records failed; retrying at the next interval");
                }
                tokio::time::sleep(purge_every).await;
            }
        });
        // Finding unfinished work scans the collections: in the background,
        // not before the server answers. On a shared store, again every
        // key-check interval: the work of a node that stopped is taken over.
        let resume_vault = self.clone();
        let resume = tokio::spawn(async move {
            loop {
                if let Err(e) = resume_vault.resume_background_work().await {
                    tracing::error!(error = %e, "cannot resume background work (re-encryption, blind-index rebuilds)");
                }
                if !shared {
                    break;
                }
                tokio::time::sleep(key_check).await;
            }
        });
        let head_vault = self.clone();
        let interval = config.audit.head_log_interval;
        let head_logger = tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(interval).await;
                match head_vault.audit_head().await {
                    Ok(head) if last != Some(head.seq) => {
                        tracing::info!(seq = head.seq, mac = %hex::encode(head.mac), "audit trail head");
                        last = Some(head.seq);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read the audit trail head"),
                }
            }
        });
        let mut tasks = vec![auto_rotation, purger, resume, head_logger];
        if shared {
            let refresh_vault = self.clone();
            let every = config.store.key_refresh_interval;
            let changes = self.inner.store.key_changes();
            tasks.push(tokio::spawn(async move {
                loop {
                    // At once when the database tells of a key change, and
                    // every interval in case a notification was lost.
                    match &changes {
                        Some(told) => {
                            let _ = tokio::time::timeout(every, told.notified()).await;
                        }
                        None => tokio::time::sleep(every).await,
                    }
                    if let Err(e) = refresh_vault.refresh_keys().await {
                        tracing::error!(error = %e, "cannot read the keys that other nodes may have changed");
                    }
                }
            }));
        }
        tasks
    }
}

/// How soon, at the latest, a key rotated, retired or marked compromised
/// through another node is in force on this one (a shared store, by
/// default: `store.key_refresh_interval_s`). The database's notification
/// makes it sooner.
pub const KEY_REFRESH_INTERVAL: std::time::Duration = crate::config::DEFAULT_KEY_REFRESH_INTERVAL;

/// The lease of the automatic-rotation check.
const ROTATION_JOB: &str = "rotation";

/// The lease of the expiry purge.
const PURGE_JOB: &str = "purge";

/// Records per transaction of a re-encryption the vault starts itself.
pub(crate) const REENCRYPT_BATCH: usize = 500;

/// Logs how background job `what` of `collection` ended: a job that runs
/// elsewhere already is no failure.
pub(crate) fn background_ended(what: &str, collection: &str, ended: Result<(), VaultError>) {
    match ended {
        Ok(()) => {}
        Err(e @ VaultError::JobRunning { .. }) => tracing::debug!(collection, reason = %e, "{what} left to its runner"),
        Err(e) => tracing::error!(error = %e, collection, "{what} stopped; it resumes at the next check or start"),
    }
}
