//! The data path: tokenize, detokenize (in clear or masked), delete.

use super::{Collection, ItemResult, MAX_TOKEN_ATTEMPTS, Requester, Vault};
use crate::audit::{Event, Outcome};
use crate::crypto::keyring::{self, KeyPurpose};
use crate::crypto::{CryptoError, envelope};
use crate::error::{ItemError, VaultError};
use crate::format::{Format, Normalize, split_seq};
use crate::store::{IndexEntry, InsertOutcome, NewRecord, RecordMatch, RecordRef, TokenForm, TokenLookup};
use crate::token::{CHECK_BYTES, Sealed, Token};
use crate::value::PiiValue;

/// What a tokenize answered.
#[derive(Debug)]
pub struct Tokenized {
    /// Per value, in order: its token or what was wrong.
    pub results: Vec<ItemResult<Token>>,
    /// Values that already had a token (deterministic collections).
    pub existing: usize,
}

impl Vault {
    /// Swaps each value for a token of the collection's format: a new one,
    /// or, in a deterministic collection, the one its (normalized) value
    /// already has. Answers item by item, in order; an answer is given only
    /// once its record is durable.
    pub async fn tokenize(
        &self,
        who: &Requester,
        collection: &str,
        values: Vec<PiiValue>,
    ) -> Result<Vec<ItemResult<Token>>, VaultError> {
        Ok(self.tokenize_counted(who, collection, values).await?.results)
    }

    /// [`Vault::tokenize`], also saying how many values already had a token
    /// (deterministic collections): each such answer confirms a guess about
    /// a token's value, so callers count them against a quota.
    pub async fn tokenize_counted(
        &self,
        who: &Requester,
        collection: &str,
        values: Vec<PiiValue>,
    ) -> Result<Tokenized, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(values.len())?;
        let (values, mut results): (Vec<PiiValue>, Vec<Option<ItemResult<Token>>>) = values
            .into_iter()
            .map(|v| {
                let (value, problem) = prepare_value(&coll.normalize, coll.max_value_len, &coll.format, v);
                (value, problem.map(Err))
            })
            .unzip();
        // Only values that will be tokenized count against the space.
        coll.check_space(&who.caller, values.iter().zip(&results).filter(|(_, r)| r.is_none()).map(|(v, _)| v))?;
        let mut pending: Vec<usize> = (0..values.len()).filter(|&i| results[i].is_none()).collect();
        let mut existing = 0;
        let audit = who.record(Event::Tokenize, collection, values.len(), Outcome::Ok);
        if pending.is_empty() {
            // Nothing to store, but the request is still on the record.
            self.inner.store.append_audit(audit.clone()).await?;
        }
        let expires_at = coll
            .ttl
            .map(|ttl| crate::store::now_micros().saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)));
        let indexes: Vec<Option<IndexEntry>> = if coll.deterministic {
            values.iter().map(|v| self.index_entry(coll, v).map(Some)).collect::<Result<_, _>>()?
        } else {
            values.iter().map(|_| None).collect()
        };

        for _ in 0..MAX_TOKEN_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(pending.len());
            let mut tokens = Vec::with_capacity(pending.len());
            let mut made = Vec::with_capacity(pending.len());
            let shapes: Vec<u32> = pending.iter().map(|&i| coll.format.shape_of(values[i].expose_secret())).collect();
            let places = coll.take_places(self.inner.store.as_ref(), &shapes).await?;
            let key = coll.token_key.as_ref().ok_or_else(|| coll.no_primary(KeyPurpose::Token))?;
            let mut again = Vec::new();
            for (&i, seq) in pending.iter().zip(places) {
                let value = values[i].expose_secret();
                let (token, form) = if let Format::Random { prefix } = &coll.format {
                    // The record's place, sealed with 64 random bits.
                    let mut check = [0u8; CHECK_BYTES];
                    self.inner.tokens.fill(&mut check)?;
                    (key.seal(prefix, Sealed { seq, check }), TokenForm::Sealed(check))
                } else {
                    let Some(token) = coll.format.shaped_token(key, value, split_seq(seq).1) else {
                        results[i] = Some(Err(ItemError::TokenSpaceExhausted));
                        continue;
                    };
                    if token.as_str() == value {
                        // Never the value itself: the next number.
                        again.push(i);
                        continue;
                    }
                    // Stored (and bound to its ciphertext) in canonical
                    // form; answered in the caller's writing.
                    let stored = coll.format.canonical(token.as_str()).into_owned();
                    (token, TokenForm::Shaped(stored))
                };
                let at = RecordRef { seq, token: form };
                let stored = coll.token_text(&at);
                let (key_version, ciphertext) = self
                    .inner
                    .keyring
                    .with_primary(coll.id.0, KeyPurpose::Data, |version, key| {
                        envelope::seal(key, version, coll.name.as_str(), &stored, value.as_bytes())
                            .map(|ct| (version, ct))
                    })
                    .ok_or_else(|| coll.no_primary(KeyPurpose::Data))??;
                records.push(NewRecord { at, key_version, ciphertext, expires_at, index: indexes[i].clone() });
                tokens.push(token);
                made.push(i);
            }
            if records.is_empty() {
                pending = again;
                continue;
            }
            // A conflict: this node's data key was retired, marked
            // compromised or is being emptied through another node.
            let store = &self.inner.store;
            let inserted = store.insert_records(coll.id, records, audit.clone(), coll.renderer()).await;
            let outcomes = inserted.map_err(super::key_change)?;
            let mut retry = again;
            for ((i, token), outcome) in made.into_iter().zip(tokens).zip(outcomes) {
                match outcome {
                    InsertOutcome::Inserted => results[i] = Some(Ok(token)),
                    InsertOutcome::Existing(at) => {
                        existing += 1;
                        let token = coll.token_text(&at);
                        // The value's token, in the writing of this request.
                        let rendered = coll.format.render(&token, values[i].expose_secret());
                        results[i] =
                            Some(rendered.and_then(|t| coll.format.parse_token(&t)).ok_or(ItemError::Unreadable));
                    }
                    InsertOutcome::Collision => retry.push(i),
                }
            }
            if !retry.is_empty() {
                tracing::debug!(collection = %coll.name, collisions = retry.len(), "tokens issued before this scheme or equal to their values; taking the next numbers");
            }
            pending = retry;
        }
        if !pending.is_empty() {
            tracing::warn!(collection = %coll.name, items = pending.len(), "no free token after {MAX_TOKEN_ATTEMPTS} numbers");
        }
        let results = results.into_iter().map(|r| r.unwrap_or(Err(ItemError::TokenSpaceExhausted))).collect();
        Ok(Tokenized { results, existing })
    }

    /// The version of `coll`'s primary `purpose` key.
    pub(super) fn primary_version(&self, coll: &Collection, purpose: KeyPurpose) -> Result<u32, VaultError> {
        self.inner
            .keyring
            .with_primary(coll.id.0, purpose, |version, _| version)
            .ok_or_else(|| coll.no_primary(purpose))
    }

    /// The blind index of a normalized value: its digest under every live
    /// index-key version, primary first.
    pub(super) fn index_entry(&self, coll: &Collection, value: &PiiValue) -> Result<IndexEntry, VaultError> {
        let lookups = self
            .inner
            .keyring
            .map_versions(coll.id.0, KeyPurpose::Index, |version, key| {
                let form = coll.index_form(version, value.expose_secret());
                keyring::blind_index(key, coll.name.as_str(), form.as_bytes()).map(|d| (version, d))
            })
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let &(version, digest) = lookups.first().ok_or_else(|| coll.no_primary(KeyPurpose::Index))?;
        Ok(IndexEntry { version, digest, lookups })
    }

    /// Swaps each token back for its value. Unknown, deleted, malformed and
    /// other collections' tokens all answer [`ItemError::NotFound`]. No value
    /// is returned before the audit record of this read is durable.
    pub async fn detokenize(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        self.reveal(who, collection, tokens, false).await
    }

    /// [`Vault::detokenize`], with each value masked by [`mask`].
    pub async fn detokenize_masked(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        self.reveal(who, collection, tokens, true).await
    }

    async fn reveal(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
        masked: bool,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let found = self.inner.store.get_records(coll.id, lookups).await?;
        // A record sealed through another node under a key version this one
        // has not loaded yet: the keyring is brought up to date first.
        let unknown_key = |r: &crate::store::StoredRecord| {
            envelope::key_version(&r.ciphertext)
                .is_ok_and(|v| self.inner.keyring.with_version(coll.id.0, KeyPurpose::Data, v, |_| ()).is_none())
        };
        if self.inner.store.capabilities().shared && found.iter().flatten().any(unknown_key) {
            self.refresh_keys().await?;
        }
        let mut found = found.into_iter();
        let mut revealed = Vec::new();
        let mut seqs = Vec::new();
        let results: Vec<ItemResult<PiiValue>> = parsed
            .into_iter()
            .map(|token| {
                let token = token.ok_or(ItemError::NotFound)?;
                let record = found.next().flatten().ok_or(ItemError::NotFound)?;
                let text = record.at.token.into_text(token.as_str());
                let value = self.open_record(coll, &text, &record.ciphertext)?;
                revealed.push(text);
                seqs.push(record.at.seq);
                Ok(if masked { coll.mask.apply(&value) } else { value })
            })
            .collect();
        let event = if masked { Event::DetokenizeMasked } else { Event::Detokenize };
        let mut audit = who.record(event, collection, tokens.len(), Outcome::Ok);
        audit.tokens = revealed;
        // Fail closed: if this record cannot be written, no value leaves.
        self.inner.store.append_read_audit(coll.id, seqs, audit).await?;
        Ok(results)
    }

    pub(super) fn open_record(&self, coll: &Collection, token: &str, ciphertext: &[u8]) -> ItemResult<PiiValue> {
        let opened = envelope::key_version(ciphertext).and_then(|version| {
            self.inner
                .keyring
                .with_version(coll.id.0, KeyPurpose::Data, version, |key| {
                    envelope::open(key, coll.name.as_str(), token, ciphertext)
                })
                .unwrap_or(Err(CryptoError::Decrypt))
        });
        let unreadable = || {
            tracing::error!(
                alert = true,
                collection = %coll.name,
                token,
                "stored record failed to decrypt: corruption, tampering, or a missing key version"
            );
            ItemError::Unreadable
        };
        let mut plain = opened.map_err(|_| unreadable())?;
        match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(value) => Ok(PiiValue::new(value)),
            Err(not_utf8) => {
                zeroize::Zeroize::zeroize(&mut not_utf8.into_bytes());
                Err(unreadable())
            }
        }
    }

    /// Deletes the records behind tokens: `Ok(())` for each live token
    /// deleted, [`ItemError::NotFound`] otherwise. A deleted token is never
    /// issued again.
    pub async fn delete(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<()>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let audit = who.record(Event::Delete, collection, tokens.len(), Outcome::Ok);
        let deleted = self.inner.store.delete_records(coll.id, lookups, audit).await?;
        let mut deleted = deleted.into_iter();
        Ok(parsed
            .into_iter()
            .map(|token| match token {
                Some(_) if deleted.next() == Some(true) => Ok(()),
                _ => Err(ItemError::NotFound),
            })
            .collect())
    }

    /// Where `token` is, if this vault ever issued it (in any served
    /// collection): the form in which it is on the audit trail (as
    /// stored: for a shaped token written with separators, its canonical
    /// form) and the audit filter that finds the records involving it.
    pub async fn locate_issued(&self, token: &str) -> Result<Option<(String, RecordMatch)>, VaultError> {
        if token.is_empty() || token.len() > crate::token::MAX_TOKEN_LEN {
            return Ok(None);
        }
        let mut names: Vec<&String> = self.inner.collections.keys().collect();
        names.sort();
        for name in names {
            let coll = &self.inner.collections[name];
            let Some(parsed) = coll.format.parse_token(token) else { continue };
            if let Some(at) = self.inner.store.locate_record(coll.id, coll.lookup(&parsed)).await? {
                return Ok(Some((coll.token_text(&at), RecordMatch::Of(coll.id, at.seq))));
            }
        }
        Ok(None)
    }
}

/// What tokenizing does to a value before anything is stored: normalizes
/// it, then checks that it is not empty, at most `max_len` bytes, and of
/// `format`. The normalized value, and what is wrong with it if anything.
pub fn prepare_value(
    normalize: &Normalize,
    max_len: usize,
    format: &Format,
    value: PiiValue,
) -> (PiiValue, Option<ItemError>) {
    let value = normalize.apply(value);
    let problem = match value.len() {
        0 => Some(ItemError::EmptyValue),
        _ if value.expose_secret().trim().is_empty() => Some(ItemError::BlankValue),
        n if n > max_len => Some(ItemError::ValueTooLong { max: max_len }),
        _ => format.check_value(value.expose_secret()).err().map(Into::into),
    };
    (value, problem)
}

/// Parses each token for `coll`; returns, per input, the parsed token (or
/// `None` when it is not one `coll`'s format can have issued) and the list
/// of token strings worth looking up, in the same order as the `Some`s.
fn parse_tokens(coll: &Collection, tokens: &[String]) -> (Vec<Option<Token>>, Vec<TokenLookup>) {
    let parsed: Vec<Option<Token>> = tokens.iter().map(|t| coll.format.parse_token(t)).collect();
    let lookups = parsed.iter().flatten().map(|t| coll.lookup(t)).collect();
    (parsed, lookups)
}
