//! TLS for the network boundary: the server's rustls configuration, the
//! inspection of a verified client certificate, and the client side used by
//! the command-line client.
//!
//! The server speaks TLS 1.2 and 1.3 with AEAD suites and ephemeral key
//! exchange only (the *ring* provider's suites are exactly those), and
//! requires a client certificate that chains to the vault CA, is within its
//! validity period, carries the clientAuth extended key usage and is not on
//! the CRL. Anything else fails the handshake. This module holds private
//! keys only in zeroizing buffers and never logs them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
use zeroize::Zeroizing;

use crate::pki;
use crate::policy::{CallerId, IdentityError};

/// Errors building a TLS configuration. Never contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{0}: no usable PEM content")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The CRL's `nextUpdate` has passed: whoever holds an old signed CRL
    /// could otherwise un-revoke certificates by putting it back.
    #[error("{path}: the CRL expired at {next_update} (its nextUpdate); re-sign it with `piivault certs crl`")]
    CrlExpired {
        /// The file.
        path: String,
        /// When it expired, RFC 3339.
        next_update: String,
    },
}

/// The *ring* provider, restricted to AEAD suites with ephemeral key
/// exchange (which, for *ring*, is all of its suites; listed explicitly so
/// that a future default cannot widen them).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Every PEM section of type `T` in `path`; none at all is an error.
fn pem_all<T: PemObject>(path: &Path) -> Result<Vec<T>, TlsError> {
    let bytes = read(path)?;
    let items: Vec<T> = T::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if items.is_empty() {
        return Err(TlsError::Pem(path.display().to_string()));
    }
    Ok(items)
}

/// A CRL in force: the serials it revokes and when it must be replaced.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    /// Revoked serial numbers, lowercase hex.
    pub serials: HashSet<String>,
    /// The earliest `nextUpdate` of the file's CRLs (unix seconds); `None`
    /// if none says.
    pub next_update: Option<i64>,
}

impl Revocations {
    /// Reads the CRL file at `path`; one whose `nextUpdate` is before `now`
    /// (unix seconds) is refused.
    pub fn load(path: &Path, now: i64) -> Result<Self, TlsError> {
        let mut revocations = Self::default();
        for crl in pem_all::<CertificateRevocationListDer<'static>>(path)? {
            let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                .map_err(|_| TlsError::Pem(path.display().to_string()))?;
            revocations.serials.extend(parsed.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())));
            if let Some(next) = parsed.next_update() {
                let next = next.timestamp();
                revocations.next_update = Some(revocations.next_update.map_or(next, |n| n.min(next)));
            }
        }
        revocations.check(path, now)?;
        Ok(revocations)
    }

    /// Refuses a CRL whose `nextUpdate` is before `now` (unix seconds).
    pub fn check(&self, path: &Path, now: i64) -> Result<(), TlsError> {
        match self.next_update {
            Some(next) if next < now => Err(TlsError::CrlExpired {
                path: path.display().to_string(),
                next_update: crate::pki::format_time(next),
            }),
            _ => Ok(()),
        }
    }
}

/// Now, in unix seconds.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What the server needs to accept connections, loaded from the PKI
/// directory; rebuilt on reload.
pub struct ServerTls {
    /// The rustls configuration.
    pub config: Arc<ServerConfig>,
    /// The CRL the verifier was built with (the server also reloads the
    /// CRL on its own: see `Live::reload`).
    pub revocations: Revocations,
}

impl ServerTls {
    /// Loads `ca.pem`, `server.pem`, `server.key` and `crl.pem` from
    /// `pki_dir`.
    pub fn load(pki_dir: &Path) -> Result<Self, TlsError> {
        let provider = crypto_provider();
        let mut roots = RootCertStore::empty();
        for ca in pem_all::<CertificateDer<'static>>(&pki_dir.join(pki::CA_CERT))? {
            roots.add(ca).map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let crl_path = pki_dir.join(pki::CRL);
        let revocations = Revocations::load(&crl_path, now_unix())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(pem_all(&crl_path)?)
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let key_path = pki_dir.join(pki::SERVER_KEY);
        let key_pem = Zeroizing::new(read(&key_path)?);
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Pem(key_path.display().to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem_all(&pki_dir.join(pki::SERVER_CERT))?, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.ignore_client_order = true;
        Ok(Self { config: Arc::new(config), revocations })
    }
}

/// What the server learned from a verified client certificate.
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// The caller, or why the certificate names none.
    pub identity: Result<CallerId, IdentityError>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub fingerprint: String,
    /// The end of its validity (unix seconds): checked on every request
    /// and by the connection, which closes at it.
    pub not_after: i64,
}

impl PeerCert {
    /// Inspects the end-entity certificate (DER) of a verified peer.
    pub fn inspect(der: &[u8], trust_domain: &str) -> Self {
        let fingerprint = hex::encode(Sha256::digest(der));
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self { identity: Err(IdentityError::Unparsable), serial: String::new(), fingerprint, not_after: 0 };
        };
        let serial = hex::encode(cert.raw_serial());
        let identity = match cert.subject_alternative_name() {
            Ok(Some(sans)) => {
                let uris: Vec<&str> = sans
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| if let GeneralName::URI(uri) = name { Some(*uri) } else { None })
                    .collect();
                CallerId::from_uri_sans(&uris, trust_domain)
            }
            Ok(None) => Err(IdentityError::NoUri),
            Err(_) => Err(IdentityError::Unparsable),
        };
        // The verifier takes a leaf without any extended key usage as good
        // for every purpose; a caller's certificate must say clientAuth.
        let identity = identity.and_then(|caller| match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.client_auth => Ok(caller),
            Ok(_) => Err(IdentityError::NotForClients),
            Err(_) => Err(IdentityError::Unparsable),
        });
        let not_after = cert.validity().not_after.timestamp();
        Self { identity, serial, fingerprint, not_after }
    }
}

/// Client-side TLS for talking to a vault: trusts only `ca_pem`, presents
/// `cert_pem` with `key_pem`.
pub fn client_tls(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
}
