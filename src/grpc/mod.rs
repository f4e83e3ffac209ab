//! The network edge: gRPC over mutual TLS.
//!
//! Thin by design: decode, authenticate (the caller is the URI SAN of the
//! verified client certificate, nothing else), authorize through the policy,
//! call the transport-free [`Vault`](crate::Vault), and map errors to gRPC
//! statuses in exactly one place ([`status_of`]). It knows nothing about
//! keys or SQL, and it never logs a value.

mod admin;
pub mod alerts;
mod audit;
mod call;
pub mod codec;
pub mod edge;
pub mod handshakes;
pub mod limits;
pub mod proto;
pub mod server;
mod tokenizer;

pub use admin::AdminService;
pub use audit::AuditService;
pub use tokenizer::TokenizerService;

use tonic::{Code, Status};

use crate::audit::Outcome;
use crate::error::{ItemError, ItemErrorCode, VaultError};

/// The answer to both an unknown collection and an ungranted one, so that a
/// caller cannot tell which collections exist.
pub const DENIED: &str = "permission denied for this collection";

/// Why a request was refused before reaching the vault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// No usable identity (see the message).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not granted this action on this collection (or the
    /// collection does not exist).
    #[error("{DENIED}")]
    Denied,
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The system is not in a state that allows the operation.
    #[error("{0}")]
    Precondition(String),
    /// The caller's request rate limit (policy) is reached.
    #[error("this caller's request rate limit is reached; retry later")]
    RateLimited,
    /// The request would take the caller over one of its quotas (the
    /// bulk-detokenize guard, tokenized values, deletes, deterministic hits).
    #[error("this caller may {} at most {max_values} {} per {window_s} s; the limit is reached", kind.verb(), kind.noun())]
    Quota {
        /// Which quota.
        kind: limits::Metered,
        /// Values per window.
        max_values: u64,
        /// The window, seconds.
        window_s: u64,
    },
}

/// The single mapping from everything the edge and the core can fail with
/// to a gRPC status. Messages are fixed text; causes go to the server log.
pub fn status_of(error: &Failure) -> Status {
    match error {
        Failure::Edge(EdgeError::Unauthenticated(message)) => Status::unauthenticated(message.clone()),
        Failure::Edge(EdgeError::Denied) | Failure::Vault(VaultError::UnknownCollection) => {
            Status::permission_denied(DENIED)
        }
        Failure::Edge(EdgeError::InvalidArgument(message)) => Status::invalid_argument(message.clone()),
        Failure::Vault(VaultError::EmptyRequest) => Status::invalid_argument("the request has no items"),
        Failure::Edge(e @ (EdgeError::RateLimited | EdgeError::Quota { .. })) => {
            Status::resource_exhausted(e.to_string())
        }
        Failure::Vault(
            e @ (VaultError::TooManyItems { .. } | VaultError::TokenSpaceFull { .. } | VaultError::VerifyBusy),
        ) => Status::resource_exhausted(e.to_string()),
        Failure::Vault(
            e @ (VaultError::RetireRefused(_)
            | VaultError::NoSuchKeyVersion(_)
            | VaultError::NotDeterministic
            | VaultError::RotationPending(_)
            | VaultError::OtherNodesRunning(_)),
        ) => Status::failed_precondition(e.to_string()),
        Failure::Vault(e @ (VaultError::KeyConflict | VaultError::JobRunning { .. })) => Status::aborted(e.to_string()),
        Failure::Vault(VaultError::Crypto(
            crate::crypto::CryptoError::WeakKdfParams | crate::crypto::CryptoError::EmptyPassphrase,
        )) => Status::invalid_argument("the new secret is not acceptable"),
        // Names the module, token, key label and PKCS#11 return code only.
        Failure::Vault(VaultError::Crypto(crate::crypto::CryptoError::Hsm(e))) => {
            Status::failed_precondition(format!("the PKCS#11 token failed: {e}"))
        }
        Failure::Edge(EdgeError::Precondition(message)) => Status::failed_precondition(message.clone()),
        Failure::Vault(VaultError::Store(e)) if e.is_unavailable() => {
            Status::unavailable("the vault's store is unavailable; retry later")
        }
        // What this store backend cannot do at all (a file backup of
        // PostgreSQL): the message names it and what to use instead.
        Failure::Vault(VaultError::Store(e @ crate::store::StoreError::Unsupported(_))) => {
            Status::unimplemented(e.to_string())
        }
        Failure::Vault(_) => Status::internal("internal error; the cause is in the server log"),
    }
}

/// Everything a request can fail with, before or inside the vault.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Refused at the edge.
    #[error(transparent)]
    Edge(#[from] EdgeError),
    /// Failed in the core.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl From<Failure> for Status {
    fn from(failure: Failure) -> Self {
        status_of(&failure)
    }
}

/// The audit outcome of a call that ended with `code`.
pub fn outcome(code: Code) -> Outcome {
    match code {
        Code::Ok => Outcome::Ok,
        Code::Cancelled => Outcome::Cancelled,
        Code::Unknown => Outcome::Unknown,
        Code::InvalidArgument => Outcome::InvalidArgument,
        Code::DeadlineExceeded => Outcome::DeadlineExceeded,
        Code::NotFound => Outcome::NotFound,
        Code::AlreadyExists => Outcome::AlreadyExists,
        Code::PermissionDenied => Outcome::PermissionDenied,
        Code::ResourceExhausted => Outcome::ResourceExhausted,
        Code::FailedPrecondition => Outcome::FailedPrecondition,
        Code::Aborted => Outcome::Aborted,
        Code::OutOfRange => Outcome::OutOfRange,
        Code::Unimplemented => Outcome::Unimplemented,
        Code::Internal => Outcome::Internal,
        Code::Unavailable => Outcome::Unavailable,
        Code::DataLoss => Outcome::DataLoss,
        Code::Unauthenticated => Outcome::Unauthenticated,
    }
}

/// The name of a gRPC status code, as logs, metrics and audit records
/// spell it.
pub fn code_name(code: Code) -> &'static str {
    outcome(code).as_str()
}

/// A per-item error as it goes on the wire.
pub fn item_error(error: &ItemError) -> proto::ItemError {
    let code = match error.code() {
        ItemErrorCode::NotFound => proto::ItemErrorCode::NotFound,
        ItemErrorCode::InvalidValue => proto::ItemErrorCode::InvalidValue,
        ItemErrorCode::Unreadable => proto::ItemErrorCode::Unreadable,
        ItemErrorCode::TokenSpaceExhausted => proto::ItemErrorCode::TokenSpaceExhausted,
    };
    proto::ItemError { code: code.into(), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn unknown_and_ungranted_collections_look_the_same() {
        let unknown = status_of(&Failure::Vault(VaultError::UnknownCollection));
        let denied = status_of(&Failure::Edge(EdgeError::Denied));
        assert_eq!((unknown.code(), unknown.message()), (denied.code(), denied.message()));
        assert_eq!(unknown.code(), Code::PermissionDenied);
    }

    #[test]
    fn each_failure_has_its_code() {
        let cases = [
            (Failure::Vault(VaultError::EmptyRequest), Code::InvalidArgument),
            (Failure::Vault(VaultError::TooManyItems { got: 2, max: 1 }), Code::ResourceExhausted),
            (Failure::Vault(VaultError::Store(StoreError::Full)), Code::Unavailable),
            (Failure::Vault(VaultError::Store(StoreError::Closed)), Code::Unavailable),
            (Failure::Vault(VaultError::Store(StoreError::NotAVault)), Code::Internal),
            (Failure::Vault(VaultError::Store(StoreError::Unsupported("copy itself"))), Code::Unimplemented),
            (Failure::Vault(VaultError::Store(StoreError::Unreachable)), Code::Unavailable),
            (Failure::Edge(EdgeError::Unauthenticated("x".into())), Code::Unauthenticated),
            (Failure::Edge(EdgeError::InvalidArgument("x".into())), Code::InvalidArgument),
            (Failure::Edge(EdgeError::RateLimited), Code::ResourceExhausted),
            (
                Failure::Edge(EdgeError::Quota { kind: limits::Metered::Detokenize, max_values: 5, window_s: 60 }),
                Code::ResourceExhausted,
            ),
        ];
        for (failure, code) in cases {
            assert_eq!(status_of(&failure).code(), code, "{failure:?}");
        }
        let status = status_of(&Failure::Vault(VaultError::TooManyItems { got: 1001, max: 1000 }));
        assert_eq!(status.message(), "the request has 1001 items; the limit is 1000");
    }
}
