//! piivault: a PII tokenization vault.
//!
//! Application services send personal data and get back random tokens; the
//! values live only here, encrypted under envelope-wrapped data keys. See
//! `DESIGN.md` for the architecture and `SECURITY.md` for the threat model.
//!
//! Layout, by domain: [`token`] (formats), [`crypto`] (root key, keyring,
//! record envelope), [`store`] (one interface; the SQLite backend, group commit), [`vault`] (the core,
//! transport-free), [`config`], [`error`], [`cli`].

#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod format;
pub mod fuzz;
pub mod grpc;
pub mod metrics;
pub mod pki;
pub mod policy;
mod secret_env;
pub mod store;
pub mod tls;
pub mod token;
pub mod value;
pub mod vault;

pub use config::{CollectionName, Config};
pub use error::{ItemError, ItemErrorCode, VaultError};
pub use token::Token;
pub use value::PiiValue;
pub use vault::Vault;
