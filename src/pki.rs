//! The vault's own PKI: a CA, the server certificate, client certificates
//! for callers, and the certificate revocation list.
//!
//! Files under `D/pki/` (all 0600, the directory 0700):
//! `ca.pem`, `ca.key` (never leaves the directory), `server.pem`,
//! `server.key`, `crl.pem`, and `issued.toml`, the register of every client
//! certificate issued, which `list` and `revoke` read.
//!
//! Keys are ECDSA P-256. A client certificate carries exactly one URI SAN,
//! `spiffe://<trust-domain>/<name>`, the clientAuth extended key usage, and
//! is not a CA. Private keys are held in zeroizing strings and written only
//! to their 0600 files.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::crypto::fill_random;
use crate::datadir;
use crate::policy::CallerId;

/// The PKI directory inside a data directory.
pub const PKI_DIR: &str = "pki";
/// CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// CA private key.
pub const CA_KEY: &str = "ca.key";
/// Server certificate.
pub const SERVER_CERT: &str = "server.pem";
/// Server private key.
pub const SERVER_KEY: &str = "server.key";
/// Certificate revocation list.
pub const CRL: &str = "crl.pem";
/// Register of issued client certificates.
const REGISTER: &str = "issued.toml";

/// Validity of the CA: ten years.
const CA_DAYS: i64 = 3650;
/// Validity of the server certificate.
const SERVER_DAYS: i64 = 825;
/// How far `not_before` is set in the past, for clocks that disagree a little.
const BACKDATE: Duration = Duration::minutes(5);
/// A CRL is re-signed at least this often (`next_update`).
const CRL_DAYS: i64 = 30;
/// The `certs` commands re-sign a CRL this close to its `next_update`.
const CRL_REFRESH_DAYS: i64 = 7;

/// Errors of the PKI commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// The CA does not exist yet.
    #[error("no vault CA in {0} (run `piivault init` or `piivault certs init`)")]
    NoCa(PathBuf),
    /// Nothing matched a revoke request.
    #[error("no unrevoked certificate matches {0}")]
    NotFound(String),
    /// The register is damaged.
    #[error("{path}: {message}")]
    Register {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Bad input (a name, a number of days).
    #[error("{0}")]
    Invalid(String),
}

fn cert_error(e: impl std::fmt::Display) -> PkiError {
    PkiError::Certificate(e.to_string())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_owned(), source }
}

/// One issued client certificate, as recorded in the register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Caller name (the SPIFFE path).
    pub name: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// When it was revoked, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Register {
    #[serde(default)]
    crl_number: u64,
    #[serde(default, rename = "certificate")]
    certificates: Vec<IssuedCert>,
}

/// What a certificate to be signed by the vault CA looks like. Used by
/// `certs issue` and by tests that need deliberately wrong certificates.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Subject common name.
    pub common_name: String,
    /// URI SANs (a caller certificate has exactly one).
    pub uris: Vec<String>,
    /// DNS or IP SANs (server certificates).
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Include the clientAuth extended key usage.
    pub client_auth: bool,
    /// Include the serverAuth extended key usage.
    pub server_auth: bool,
}

impl CertSpec {
    /// A caller certificate for `caller` in `trust_domain`, valid for `days`.
    pub fn client(caller: &CallerId, trust_domain: &str, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: caller.as_str().to_owned(),
            uris: vec![caller.spiffe_id(trust_domain)],
            names: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(days)),
            client_auth: true,
            server_auth: false,
        }
    }
}

/// A freshly signed certificate and its private key.
pub struct Signed {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8). Zeroized on drop.
    pub key_pem: Zeroizing<String>,
    /// Serial number, lowercase hex.
    pub serial: String,
}

/// The vault CA, loaded from a data directory.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn random_serial() -> Result<(SerialNumber, String), PkiError> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes).map_err(cert_error)?;
    bytes[0] &= 0x7f; // positive, as DER INTEGER
    bytes[0] |= 0x01; // and never shorter than 16 bytes
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

fn ca_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("piivault CA for {trust_domain}"));
    dn.push(DnType::OrganizationName, "piivault");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_DAYS);
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_error(path))
}

/// Writes `contents` to `path` (0600), replacing an existing file atomically.
fn replace_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    datadir::write_private_file(&tmp, contents).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

impl Ca {
    /// Creates the CA in `data_dir/pki` if it does not exist, (re)issues the
    /// server certificate for `server_names` (DNS names or IP addresses),
    /// and writes an empty CRL and register if there are none.
    pub fn init(data_dir: &Path, trust_domain: &str, server_names: &[String]) -> Result<Self, PkiError> {
        let dir = data_dir.join(PKI_DIR);
        datadir::create_private_dir(&dir).map_err(io_error(&dir))?;
        if !dir.join(CA_CERT).exists() {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
            let mut params = ca_params(trust_domain);
            params.serial_number = Some(random_serial()?.0);
            let cert = params.self_signed(&key).map_err(cert_error)?;
            let key_pem = Zeroizing::new(key.serialize_pem());
            datadir::write_private_file(&dir.join(CA_KEY), key_pem.as_bytes()).map_err(io_error(&dir))?;
            datadir::write_private_file(&dir.join(CA_CERT), cert.pem().as_bytes()).map_err(io_error(&dir))?;
        }
        let ca = Self::load(data_dir)?;
        ca.issue_server(server_names)?;
        if !dir.join(REGISTER).exists() {
            ca.save_register(&Register::default())?;
        }
        if !dir.join(CRL).exists() {
            ca.write_crl(&mut ca.load_register()?)?;
        }
        Ok(ca)
    }

    /// Loads the CA of `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = data_dir.join(PKI_DIR);
        if !dir.join(CA_CERT).exists() {
            return Err(PkiError::NoCa(dir));
        }
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_pem = Zeroizing::new(read(&dir.join(CA_KEY))?);
        let key = KeyPair::from_pem(&key_pem).map_err(cert_error)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_error)?;
        Ok(Self { dir, cert_pem, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a certificate described by `spec` with a fresh P-256 key.
    pub fn sign(&self, spec: &CertSpec) -> Result<Signed, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.clone());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        for uri in &spec.uris {
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().map_err(cert_error)?));
        }
        for name in &spec.names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(cert_error)?),
            });
        }
        if spec.client_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.server_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        Ok(Signed { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()), serial: serial_hex })
    }

    fn issue_server(&self, server_names: &[String]) -> Result<(), PkiError> {
        if server_names.is_empty() {
            return Err(PkiError::Invalid("the server certificate needs at least one name".into()));
        }
        let now = OffsetDateTime::now_utc();
        let signed = self.sign(&CertSpec {
            common_name: server_names[0].clone(),
            uris: Vec::new(),
            names: server_names.to_vec(),
            not_before: now - BACKDATE,
            not_after: now + Duration::days(SERVER_DAYS),
            client_auth: false,
            server_auth: true,
        })?;
        replace_private(&self.dir.join(SERVER_KEY), signed.key_pem.as_bytes())?;
        replace_private(&self.dir.join(SERVER_CERT), signed.cert_pem.as_bytes())
    }

    /// Issues a caller certificate for `caller`, valid for `days`, writes
    /// `cert.pem` and `key.pem` (0600) into `out_dir` (0700), records it in
    /// the register, and returns the record.
    pub fn issue(
        &self,
        caller: &CallerId,
        trust_domain: &str,
        days: u32,
        out_dir: &Path,
    ) -> Result<IssuedCert, PkiError> {
        if !(1..=3650).contains(&days) {
            return Err(PkiError::Invalid(format!("--days must be between 1 and 3650, got {days}")));
        }
        let spec = CertSpec::client(caller, trust_domain, days);
        let signed = self.sign(&spec)?;
        datadir::create_private_dir(out_dir).map_err(io_error(out_dir))?;
        replace_private(&out_dir.join("key.pem"), signed.key_pem.as_bytes())?;
        replace_private(&out_dir.join("cert.pem"), signed.cert_pem.as_bytes())?;
        let record = IssuedCert {
            name: caller.as_str().to_owned(),
            serial: signed.serial,
            not_before: spec.not_before.unix_timestamp(),
            not_after: spec.not_after.unix_timestamp(),
            revoked_at: None,
        };
        let mut register = self.load_register()?;
        register.certificates.push(record.clone());
        self.save_register(&register)?;
        Ok(record)
    }

    /// Revokes every unrevoked certificate whose name or serial is
    /// `selector`, re-signs `crl.pem`, and returns what was revoked.
    pub fn revoke(&self, selector: &str) -> Result<Vec<IssuedCert>, PkiError> {
        let mut register = self.load_register()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let selector_lower = selector.to_ascii_lowercase();
        let mut revoked = Vec::new();
        for cert in &mut register.certificates {
            if cert.revoked_at.is_none() && (cert.name == selector || cert.serial == selector_lower) {
                cert.revoked_at = Some(now);
                revoked.push(cert.clone());
            }
        }
        if revoked.is_empty() {
            return Err(PkiError::NotFound(selector.to_owned()));
        }
        self.write_crl(&mut register)?;
        self.save_register(&register)?;
        Ok(revoked)
    }

    /// Every certificate issued, oldest first.
    pub fn list(&self) -> Result<Vec<IssuedCert>, PkiError> {
        Ok(self.load_register()?.certificates)
    }

    /// Re-signs `crl.pem` (valid for 30 days) if `force`, or if it is
    /// missing, unreadable, or due: its `nextUpdate` within a week. Every
    /// `certs` command calls it, so a vault whose PKI is used never serves
    /// an expired CRL. Returns the new `nextUpdate` (unix seconds) if it
    /// re-signed.
    pub fn refresh_crl(&self, force: bool) -> Result<Option<i64>, PkiError> {
        let now = OffsetDateTime::now_utc();
        let current = crate::tls::Revocations::load(&self.dir.join(CRL), i64::MIN).ok().and_then(|r| r.next_update);
        let due = (now + Duration::days(CRL_REFRESH_DAYS)).unix_timestamp();
        if !force && current.is_some_and(|next| next > due) {
            return Ok(None);
        }
        let next_update = now + Duration::days(CRL_DAYS);
        self.write_crl_until(&mut self.load_register()?, next_update)?;
        Ok(Some(next_update.unix_timestamp()))
    }

    /// The CRL for the register as it stands, valid until `next_update`,
    /// PEM, not written anywhere (tests make stale ones with it).
    pub fn sign_crl(&self, next_update: OffsetDateTime) -> Result<String, PkiError> {
        let mut register = self.load_register()?;
        register.crl_number += 1;
        self.crl_pem(&register, next_update)
    }

    fn write_crl(&self, register: &mut Register) -> Result<(), PkiError> {
        self.write_crl_until(register, OffsetDateTime::now_utc() + Duration::days(CRL_DAYS))
    }

    fn write_crl_until(&self, register: &mut Register, next_update: OffsetDateTime) -> Result<(), PkiError> {
        register.crl_number += 1;
        let pem = self.crl_pem(register, next_update)?;
        // The register keeps the CRL number, so none is ever reused.
        self.save_register(register)?;
        replace_private(&self.dir.join(CRL), pem.as_bytes())
    }

    fn crl_pem(&self, register: &Register, next_update: OffsetDateTime) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for cert in register.certificates.iter().filter(|c| c.revoked_at.is_some()) {
            let serial = hex::decode(&cert.serial).map_err(|_| PkiError::Register {
                path: self.dir.join(REGISTER),
                message: format!("serial {:?} is not hexadecimal", cert.serial),
            })?;
            let at = cert.revoked_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).unwrap_or(now);
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
        let crl = CertificateRevocationListParams {
            this_update: (now - BACKDATE).min(next_update - Duration::seconds(1)),
            next_update,
            crl_number: SerialNumber::from(register.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .map_err(cert_error)?;
        crl.pem().map_err(cert_error)
    }

    fn load_register(&self) -> Result<Register, PkiError> {
        let path = self.dir.join(REGISTER);
        if !path.exists() {
            return Ok(Register::default());
        }
        toml::from_str(&read(&path)?).map_err(|e| PkiError::Register { path, message: e.message().to_owned() })
    }

    fn save_register(&self, register: &Register) -> Result<(), PkiError> {
        let mut text = String::from("# Client certificates issued by this vault's CA. Written by `piivault certs`.\n");
        let body = toml::to_string(register)
            .map_err(|e| PkiError::Register { path: self.dir.join(REGISTER), message: e.to_string() })?;
        let _ = write!(text, "{body}");
        replace_private(&self.dir.join(REGISTER), text.as_bytes())
    }
}

/// Formats unix seconds as RFC 3339 UTC (for listings).
pub fn format_time(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use x509_parser::prelude::*;

    use super::*;

    #[test]
    fn client_certificates_carry_one_spiffe_uri_and_client_auth_only() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path(), "vault.test", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let caller: CallerId = "writer".parse().unwrap();
        let out = tmp.path().join("clients/writer");
        let record = ca.issue(&caller, "vault.test", 30, &out).unwrap();
        assert_eq!(record.name, "writer");
        assert_eq!(record.serial.len(), 32);
        let pem = std::fs::read(out.join("cert.pem")).unwrap();
        let (_, pem) = parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
            .collect();
        assert_eq!(uris, ["spiffe://vault.test/writer"]);
        assert_eq!(sans.value.general_names.len(), 1);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        assert_eq!(hex::encode(cert.raw_serial()), record.serial);
        assert_eq!(cert.validity().not_after.timestamp(), record.not_after);
        assert_eq!(std::fs::metadata(out.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(tmp.path().join("pki/ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(ca.list().unwrap(), vec![record]);
    }

    #[test]
    fn revoking_lists_the_serial_in_the_crl() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path(), "vault.test", &["localhost".into()]).unwrap();
        let caller: CallerId = "reader".parse().unwrap();
        let a = ca.issue(&caller, "vault.test", 30, &tmp.path().join("a")).unwrap();
        let b = ca.issue(&caller, "vault.test", 30, &tmp.path().join("b")).unwrap();
        let revoked = ca.revoke(&a.serial.to_ascii_uppercase()).unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, a.serial);
        let crl_pem = std::fs::read(tmp.path().join("pki/crl.pem")).unwrap();
        let (_, pem) = parse_x509_pem(&crl_pem).unwrap();
        let (_, crl) = parse_x509_crl(&pem.contents).unwrap();
        let serials: Vec<String> = crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        assert_eq!(serials, std::slice::from_ref(&a.serial));
        // By name: revokes what is left under that name.
        let by_name = ca.revoke("reader").unwrap();
        assert_eq!(by_name.iter().map(|c| c.serial.clone()).collect::<Vec<_>>(), [b.serial]);
        assert!(matches!(ca.revoke("reader"), Err(PkiError::NotFound(_))));
        assert!(ca.list().unwrap().iter().all(|c| c.revoked_at.is_some()));
    }

    #[test]
    fn init_keeps_an_existing_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Ca::init(tmp.path(), "vault.test", &["localhost".into()]).unwrap();
        let again = Ca::init(tmp.path(), "vault.test", &["vault.example".into()]).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
        assert!(Ca::init(tmp.path(), "vault.test", &[]).is_err());
    }
}
