//! The vault's errors: whole-request failures ([`VaultError`]) and per-item
//! failures ([`ItemError`]).
//!
//! Both carry fixed text only. A value never appears in either; a token may
//! appear in server logs (tokens are not PII) but not in these messages.

use crate::crypto::CryptoError;
use crate::store::StoreError;

/// A whole request failed; no item was processed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The collection is not declared in the configuration.
    #[error("unknown collection")]
    UnknownCollection,
    /// The request carried no items.
    #[error("the request has no items")]
    EmptyRequest,
    /// The request carried more items than `limits.max_items_per_call`.
    #[error("the request has {got} items; the limit is {max}")]
    TooManyItems {
        /// Items in the request.
        got: usize,
        /// The configured limit.
        max: usize,
    },
    /// The store failed (disk full, read-only, locked, shut down, corrupt).
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    /// A cryptographic operation failed outside any single item (the
    /// CSPRNG, or a key that does not unwrap at startup).
    #[error("cryptographic failure: {0}")]
    Crypto(#[from] CryptoError),
    /// A key version cannot be retired (see the reason).
    #[error("cannot retire the key version: {0}")]
    RetireRefused(crate::store::RetireRefused),
    /// The collection has no live key version with this number.
    #[error("the collection has no key version {0} (or it is retired)")]
    NoSuchKeyVersion(u32),
    /// Another key operation on the same collection changed the keyring
    /// meanwhile; retry.
    #[error("a concurrent key operation changed the keyring; retry")]
    KeyConflict,
    /// A root-key rotation's new sealed file is still waiting beside the old
    /// one; another rotation would put the store's only key file at risk.
    #[error(
        "{0} is present: an earlier root-key rotation did not complete; restart the vault (the start completes or discards it) before rotating again"
    )]
    RotationPending(String),
    /// Other nodes run on the shared store: a root-key rotation would leave
    /// them with the old root key in memory and the old sealed file.
    #[error(
        "other nodes are running on this store ({}): stop them, rotate the root key through one node, then copy its sealed root file to every other node before starting it",
        .0.join(", ")
    )]
    OtherNodesRunning(Vec<String>),
    /// Another audit verification is running (one at a time).
    #[error("an audit verification is already running; retry when it has finished")]
    VerifyBusy,
    /// A background job (a collection's re-encryption or index rebuild)
    /// runs already, on this node or on another one that holds its lease.
    #[error("{}", if *here {
        format!("background job `{job}` is already running on this node; it finishes by itself")
    } else {
        format!("background job `{job}` is running on another node; it finishes there, or on this node if that one stops")
    })]
    JobRunning {
        /// The job's lease name.
        job: String,
        /// Whether it runs on this node.
        here: bool,
    },
    /// The sealed root file cannot be written or put in place.
    #[error("the sealed root key cannot be written: {0}")]
    SealedRoot(String),
    /// The audit sink cannot be opened.
    #[error("the audit sink cannot be opened: {0}")]
    Sink(String),
    /// The audit trail failed verification.
    #[error("audit trail: {0}")]
    Audit(crate::audit::VerifyError),
    /// The configuration changes what a collection's tokens look like.
    #[error(
        "collection {collection} issues {stored} tokens; the configuration says {configured}, and the tokens already issued would stop answering (restore the collection's format, or declare a new collection)"
    )]
    FormatChanged {
        /// The collection.
        collection: String,
        /// The kind recorded with it.
        stored: String,
        /// The kind the configuration gives.
        configured: String,
    },
    /// An index-key operation on a collection that is not deterministic.
    #[error("the collection is not deterministic: it has no blind index")]
    NotDeterministic,
    /// The collection holds a tenth of its token space: new values are
    /// refused before its tokens become easy to guess.
    #[error("the collection has issued {issued} of its {space} possible tokens; new values are refused")]
    TokenSpaceFull {
        /// Tokens issued (live, expired or deleted: none is reissued).
        issued: u64,
        /// The format's token space at its shortest value.
        space: u128,
    },
    /// A collection's keys could not be loaded at startup.
    #[error("the keyring of collection {collection} cannot be loaded: {reason}")]
    Keyring {
        /// The collection.
        collection: String,
        /// Why (fixed text).
        reason: &'static str,
    },
}

impl VaultError {
    /// Whether this failure is already on the audit trail: the store wrote
    /// its record in the same transaction as the check that refused (a key
    /// version that cannot be retired). The caller must not record it again.
    pub fn is_on_record(&self) -> bool {
        matches!(self, Self::RetireRefused(_))
    }
}

/// Machine-readable code of a per-item error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ItemErrorCode {
    /// Unknown, deleted, foreign-collection or malformed token: one answer
    /// for all, so a caller learns nothing about other collections.
    NotFound,
    /// The value is empty or longer than the limit.
    InvalidValue,
    /// The stored record exists but does not decrypt (corruption or a lost
    /// key); logged as an alert on the server.
    Unreadable,
    /// No token is left for the value's shape (its sequence is used up, or
    /// the shape's space is below the floor).
    TokenSpaceExhausted,
}

/// Why one item of a batch failed. The rest of the batch is unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    /// See [`ItemErrorCode::NotFound`].
    #[error("token not found")]
    NotFound,
    /// The value is the empty string.
    #[error("the value is empty")]
    EmptyValue,
    /// The value is nothing but whitespace.
    #[error("the value is blank (whitespace only)")]
    BlankValue,
    /// The value exceeds `limits.max_value_bytes`.
    #[error("the value is longer than {max} bytes")]
    ValueTooLong {
        /// The limit.
        max: usize,
    },
    /// The value does not fit the collection's format (fixed text only).
    #[error(transparent)]
    Misfit(#[from] crate::format::Misfit),
    /// See [`ItemErrorCode::Unreadable`].
    #[error("the stored record cannot be read")]
    Unreadable,
    /// See [`ItemErrorCode::TokenSpaceExhausted`].
    #[error("no unused token is left for this value's shape")]
    TokenSpaceExhausted,
}

impl ItemError {
    /// The machine-readable code.
    pub fn code(&self) -> ItemErrorCode {
        match self {
            Self::NotFound => ItemErrorCode::NotFound,
            Self::EmptyValue | Self::BlankValue | Self::ValueTooLong { .. } | Self::Misfit(_) => {
                ItemErrorCode::InvalidValue
            }
            Self::Unreadable => ItemErrorCode::Unreadable,
            Self::TokenSpaceExhausted => ItemErrorCode::TokenSpaceExhausted,
        }
    }
}
