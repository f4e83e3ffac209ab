//! The audit trail as the vault uses it: records outside a data change,
//! compliance queries, and the streaming verification.

use super::{Requester, Vault};
use crate::audit::{self, AuditRecord, Event, Head, Outcome, VerifyError};
use crate::crypto::keyring::KeyPurpose;
use crate::crypto::root as crypto_root;
use crate::error::VaultError;
use crate::store::{AuditFilter, AuditRow, CollectionId, RecordMatch, RecordRef, TokenForm};
use crate::token::{Sealed, Token, TokenKey};

impl Vault {
    /// Appends the record of a request that has no data change of its own
    /// (an audit query, a refusal). Fails closed: a caller about to answer
    /// must not answer if this fails.
    pub async fn record(&self, record: AuditRecord) -> Result<(), VaultError> {
        self.inner.store.append_audit(record).await?;
        Ok(())
    }

    /// [`Vault::record`] of a request about the token of the record that
    /// `about` names (an audit query by token): indexed under it, so that
    /// the query itself shows up when that token is looked up.
    pub async fn record_about(&self, record: AuditRecord, about: RecordMatch) -> Result<(), VaultError> {
        match about {
            RecordMatch::Of(collection, seq) => {
                self.inner.store.append_read_audit(collection, vec![seq], record).await?;
            }
            RecordMatch::Any | RecordMatch::Unissued => {
                self.inner.store.append_audit(record).await?;
            }
        }
        Ok(())
    }

    /// Records a request that failed or was refused before or inside the
    /// vault (`outcome` is the gRPC code name). Best effort: the caller
    /// already has its error; a record that cannot be written is logged.
    pub async fn audit_failure(
        &self,
        who: &Requester,
        event: Event,
        collection: &str,
        items: usize,
        outcome: Outcome,
        detail: &str,
    ) {
        let shown = if self.has_collection(collection) { collection } else { "" };
        let mut record = who.record(event, shown, items, outcome);
        record.error_code = detail.to_owned();
        if let Err(e) = self.record(record).await {
            tracing::error!(error = %e, action = event.as_str(), outcome = outcome.as_str(), "could not write the audit record of a failed request");
        }
    }

    /// Audit records matching `filter`, oldest first, at most `limit`, with
    /// their chain MACs. Reading does not verify: see [`Vault::verify_audit`].
    pub async fn query_audit(
        &self,
        filter: AuditFilter,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord, Vec<u8>)>, VaultError> {
        let rows = self.inner.store.query_audit(filter, limit).await?;
        rows.into_iter()
            .map(|row| match AuditRecord::decode(&row.record) {
                Ok((_, record)) => Ok((row.seq, record, row.mac)),
                Err(_) => Err(VaultError::Audit(VerifyError { seq: row.seq, reason: "malformed record" })),
            })
            .collect()
    }

    /// Every audit chain of the store, this node's first (one per node that
    /// ever wrote to a shared store; `main` alone otherwise).
    pub async fn audit_chains(&self) -> Result<Vec<String>, VaultError> {
        Ok(self.inner.store.audit_chains().await?)
    }

    /// Checks this vault's audit trail (this node's chain, on a store that
    /// several nodes share) against its chain; returns the head or the
    /// first bad record.
    pub async fn verify_audit(&self) -> Result<Result<Head, VerifyError>, VaultError> {
        // One at a time: a second caller is told to come back, not queued.
        let Ok(_one_at_a_time) = self.inner.verifying.try_lock() else {
            return Err(VaultError::VerifyBusy);
        };
        self.verify_chain(None).await
    }

    /// [`Vault::verify_audit`] of every chain in the store (one per node
    /// that ever wrote to a shared store), this vault's own first: each
    /// chain's name and head, or the first bad record of the first chain
    /// that has one, with that chain's name.
    pub async fn verify_every_chain(&self) -> Result<Result<Vec<(String, Head)>, (String, VerifyError)>, VaultError> {
        let Ok(_one_at_a_time) = self.inner.verifying.try_lock() else {
            return Err(VaultError::VerifyBusy);
        };
        let mut heads = Vec::new();
        for name in self.inner.store.audit_chains().await? {
            match self.verify_chain(Some(name.clone())).await? {
                Ok(head) => heads.push((name, head)),
                Err(e) => return Ok(Err((name, e))),
            }
        }
        Ok(Ok(heads))
    }

    /// Verifies chain `name` (`None`: this vault's own).
    async fn verify_chain(&self, name: Option<String>) -> Result<Result<Head, VerifyError>, VaultError> {
        let mut chain = audit::Chain::new();
        let mut filter = AuditFilter { chain: name.clone(), ..AuditFilter::default() };
        loop {
            let page = self.inner.store.query_audit(filter.clone(), VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            filter.after_seq = last.seq;
            for row in &page {
                // The chain first: at one record, a broken chain is the
                // finding; columns that disagree with an intact record next.
                if let Err(e) = chain.push(&self.inner.audit_key, row.seq, &row.record, &row.mac) {
                    return Ok(Err(e));
                }
                if !self.columns_match(row) {
                    return Ok(Err(VerifyError { seq: row.seq, reason: "query columns do not match the record" }));
                }
            }
        }
        // The searchable index, built from the entries just checked.
        if let Some(seq) = self.inner.store.check_token_index(name).await? {
            return Ok(Err(VerifyError { seq, reason: "the token index disagrees with the trail" }));
        }
        Ok(Ok(chain.head()))
    }

    /// Puts an unseal by `provider` on the audit trail (action `unseal`,
    /// the provider as its code). Fails closed: a vault that cannot record
    /// its unseal does not serve.
    pub async fn record_unseal(&self, provider: crypto_root::Provider) -> Result<(), VaultError> {
        let mut record = Requester::named("(startup)").record(Event::Unseal, "", 0, Outcome::Ok);
        provider.as_str().clone_into(&mut record.error_code);
        self.record(record).await?;
        tracing::info!(provider = provider.as_str(), "root key unsealed");
        Ok(())
    }

    /// Reopens a file audit sink (SIGHUP, after log rotation).
    pub fn reopen_audit_sink(&self) {
        if let Some(sink) = &self.inner.sink {
            sink.reopen();
        }
    }

    /// The last committed audit record's number and MAC.
    pub async fn audit_head(&self) -> Result<Head, VaultError> {
        Ok(self.inner.store.audit_head().await?)
    }

    /// The stored MAC of audit record `seq` (hex), if it exists.
    pub async fn audit_mac(&self, seq: u64) -> Result<Option<String>, VaultError> {
        let after = AuditFilter { after_seq: seq.saturating_sub(1), ..AuditFilter::default() };
        let rows = self.inner.store.query_audit(after, 1).await?;
        Ok(rows.into_iter().find(|r| r.seq == seq).map(|r| hex::encode(r.mac)))
    }

    /// Audit records with `seq > after`, in order, at most `limit`, decoded.
    /// A row that does not decode is returned as an error naming it.
    pub async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>, VaultError> {
        let after = AuditFilter { after_seq: after, ..AuditFilter::default() };
        Ok(self.query_audit(after, limit).await?.into_iter().map(|(seq, record, _)| (seq, record)).collect())
    }
}

/// Records per page of an audit verification: what it holds in memory at
/// most (a record lists at most `max_items_per_call` tokens).
const VERIFY_PAGE: usize = 256;

impl Vault {
    /// Whether the query columns and the token index of `row` say what its
    /// (MAC-protected) record says.
    fn columns_match(&self, row: &AuditRow) -> bool {
        AuditRecord::decode(&row.record).is_ok_and(|(_, r)| {
            r.at_micros == row.at
                && r.caller == row.caller
                && r.action == row.action
                && r.collection == row.collection
                && r.outcome == row.outcome
                && self.index_matches(&r.tokens, &row.indexed)
        })
    }

    /// Whether the token index lists exactly the records of the tokens in
    /// `tokens`: a kept text (shaped, or issued before tokens located
    /// their records) equal to the token, or a sealed token that
    /// opens (under its collection's token key) to the record's place and
    /// random half. Each token is opened once per collection listed (a
    /// record of a bulk call lists thousands).
    fn index_matches(&self, tokens: &[String], indexed: &[(CollectionId, RecordRef)]) -> bool {
        use std::collections::HashMap;
        let mut recorded: Vec<&String> = tokens.iter().collect();
        recorded.sort();
        recorded.dedup();
        if recorded.len() != indexed.len() {
            return false;
        }
        // What each entry names, counted: as many tokens as entries must
        // each take one.
        let mut texts: HashMap<&str, usize> = HashMap::new();
        let mut sealed: HashMap<(CollectionId, Sealed), usize> = HashMap::new();
        for (collection, at) in indexed {
            match &at.token {
                TokenForm::Text(text) | TokenForm::Shaped(text) => *texts.entry(text.as_str()).or_default() += 1,
                TokenForm::Sealed(check) => {
                    *sealed.entry((*collection, Sealed { seq: at.seq, check: *check })).or_default() += 1;
                }
            }
        }
        let mut collections: Vec<CollectionId> = sealed.keys().map(|(c, _)| *c).collect();
        collections.sort_by_key(|c| c.0);
        collections.dedup();
        let keys: Vec<(CollectionId, TokenKey)> =
            collections.into_iter().filter_map(|c| self.token_key(c).map(|key| (c, key))).collect();
        let take = |left: Option<&mut usize>| match left {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        recorded.into_iter().all(|token| {
            if take(texts.get_mut(token.as_str())) {
                return true;
            }
            let Ok(parsed) = token.parse::<Token>() else { return false };
            keys.iter().any(|(collection, key)| {
                key.open(&parsed).is_some_and(|opened| take(sealed.get_mut(&(*collection, opened))))
            })
        })
    }

    /// The primary token key of `collection`, scheduled.
    fn token_key(&self, collection: CollectionId) -> Option<TokenKey> {
        self.inner
            .keyring
            .with_primary(collection.0, KeyPurpose::Token, |_, key| TokenKey::new(key.expose_secret()).ok())
            .flatten()
    }
}
