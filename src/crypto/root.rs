//! The root key and the sealed root file (`root.sealed`).
//!
//! The root key is 256 random bits that exist in clear only in memory. On
//! disk it is sealed (AES-256-GCM) under a key-encryption key that comes from
//! a root-key provider:
//!
//! - **passphrase**: Argon2id over the passphrase, with parameters and salt
//!   stored beside the sealed key in PHC form;
//! - **raw key**: 32 bytes injected by a secret manager, used directly;
//! - **pkcs11**: an AES-256 key inside a PKCS#11 token that never leaves it;
//!   the token itself does the AES-256-GCM (see [`super::pkcs11`]).
//!
//! Sealed file layout, format version 1 (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       4     magic "PVRK"
//! 4       1     format version = 0x01
//! 5       1     provider: 0x01 passphrase (Argon2id), 0x02 raw key, 0x03 pkcs11
//! 6       2     L = length of the provider parameters (0 for a raw key)
//! 8       L     parameters: for a passphrase the KDF string in PHC form,
//!               $argon2id$v=19$m=…,t=…,p=…$<salt>; for pkcs11 a PKCS#11 URI
//!               naming the token and the key, pkcs11:token=…;object=…;type=secret-key
//! 8+L     12    nonce
//! 20+L    48    AES-256-GCM(root key) ‖ tag, AAD = bytes 0 .. 8+L
//! ```
//!
//! The file records which provider sealed it and with what (never a PIN or
//! a secret), so the opener knows which secret to ask for.
//!
//! Because the header is the AAD, altering any byte of it (parameters, salt,
//! provider, version) makes the file fail to open, exactly like a wrong
//! passphrase: one opaque error.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

use super::pkcs11::{self, Hsm};
use super::{CryptoError, KEY_LEN, NONCE_LEN, SecretKey, TAG_LEN, aead_open, aead_seal};

const MAGIC: &[u8; 4] = b"PVRK";
const FORMAT_V1: u8 = 1;
const PROVIDER_PASSPHRASE: u8 = 1;
const PROVIDER_RAW: u8 = 2;
const PROVIDER_PKCS11: u8 = 3;
const FIXED_HEADER_LEN: usize = 8;
const SEALED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
const SALT_LEN: usize = 16;
/// The longest KDF string a well-formed file can hold; anything longer is
/// malformed (and is not parsed).
const MAX_KDF_STRING_LEN: usize = 256;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism (lanes).
    pub p: u32,
}

/// OWASP's current minimum for Argon2id (m = 19 MiB, t = 2, p = 1). A sealed
/// file below it is refused on load.
pub const MIN_KDF: KdfParams = KdfParams { m_kib: 19 * 1024, t: 2, p: 1 };

/// The ceiling a sealed file may ask for: 1 GiB, 16 passes, 8 lanes. A file
/// above it is refused rather than allowed to stall or exhaust the host.
pub const MAX_KDF: KdfParams = KdfParams { m_kib: 1024 * 1024, t: 16, p: 8 };

/// What `piivault init` uses: 64 MiB, 3 passes, 1 lane; well above the
/// minimum while unsealing in a fraction of a second.
pub const DEFAULT_KDF: KdfParams = KdfParams { m_kib: 64 * 1024, t: 3, p: 1 };

impl KdfParams {
    /// These parameters, if within [`MIN_KDF`]..=[`MAX_KDF`].
    pub fn check(self) -> Result<Self, CryptoError> {
        if self.m_kib < MIN_KDF.m_kib || self.t < MIN_KDF.t || self.p < MIN_KDF.p {
            return Err(CryptoError::WeakKdfParams);
        }
        if self.m_kib > MAX_KDF.m_kib || self.t > MAX_KDF.t || self.p > MAX_KDF.p {
            return Err(CryptoError::ExcessiveKdfParams);
        }
        Ok(self)
    }
}

/// The vault's root key. Wraps every data key; never written in clear.
pub struct RootKey(SecretKey);

impl RootKey {
    /// The key bytes, for wrapping and unwrapping data keys.
    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// A second handle on the same key, for the vault to keep while it is
    /// unsealed (each copy zeroizes on drop).
    pub(crate) fn duplicate(&self) -> Self {
        Self(SecretKey::from_bytes(*self.0.expose_secret()))
    }
}

/// The shortest new passphrase accepted, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
/// The fewest different characters a new passphrase must have.
pub const MIN_PASSPHRASE_DISTINCT: usize = 6;
/// The fewest different byte values a new raw key must have (32 random
/// bytes have about 30; fewer than 16 happens with odds below 10^-12).
pub const MIN_RAW_KEY_DISTINCT: usize = 16;

fn distinct<T: Ord>(items: impl Iterator<Item = T>) -> usize {
    items.collect::<std::collections::BTreeSet<T>>().len()
}

/// An operator's passphrase. Zeroized on drop; no `Debug`.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase; a trailing newline (as left by `echo` into a
    /// file) is removed, and an empty passphrase is refused.
    pub fn new(text: String) -> Result<Self, CryptoError> {
        super::secret_line(text).map(Self).ok_or(CryptoError::EmptyPassphrase)
    }

    /// This passphrase, if it may seal a root key: at least
    /// [`MIN_PASSPHRASE_CHARS`] characters, [`MIN_PASSPHRASE_DISTINCT`] of
    /// them different. Checked wherever a new passphrase is set; an existing
    /// one is never refused.
    pub fn strong(self) -> Result<Self, CryptoError> {
        let ok = self.0.chars().count() >= MIN_PASSPHRASE_CHARS && distinct(self.0.chars()) >= MIN_PASSPHRASE_DISTINCT;
        if ok { Ok(self) } else { Err(CryptoError::WeakPassphrase) }
    }
}

impl Passphrase {
    /// The passphrase in clear, to hand it to whoever must keep it (the dev
    /// directory's own file, a request to the server). Greppable on purpose.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

/// A raw 256-bit key-encryption key from a secret manager.
pub struct RawKey(SecretKey);

impl RawKey {
    /// Accepts exactly 32 raw bytes, or 64 hexadecimal digits (surrounding
    /// whitespace ignored). Anything else is [`CryptoError::RawKeyFormat`].
    pub fn parse(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() == KEY_LEN {
            key.copy_from_slice(bytes);
        } else {
            let text = bytes.trim_ascii();
            hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| CryptoError::RawKeyFormat)?;
        }
        Ok(Self(SecretKey::from_bytes(*key)))
    }

    /// This key, if it may seal a root key: at least
    /// [`MIN_RAW_KEY_DISTINCT`] different byte values. Checked wherever a
    /// new raw key is set.
    pub fn strong(self) -> Result<Self, CryptoError> {
        if distinct(self.0.expose_secret().iter()) >= MIN_RAW_KEY_DISTINCT {
            Ok(self)
        } else {
            Err(CryptoError::DegenerateRawKey)
        }
    }
}

/// The secret that opens a sealed root file.
pub enum Unlock {
    /// Argon2id-derived key from a passphrase.
    Passphrase(Passphrase),
    /// A raw key from a file or environment variable.
    RawKey(RawKey),
    /// A key in a PKCS#11 token.
    Pkcs11(Pkcs11Unlock),
}

/// A PKCS#11 token, and the label of the key a new sealed file is sealed
/// under. Unsealing uses the key label the file records.
pub struct Pkcs11Unlock {
    /// The token and its PIN.
    pub hsm: Arc<Hsm>,
    /// The wrapping key's label, for sealing.
    pub key_label: String,
}

/// The names of the providers, as the sealed file, the configuration and
/// the metrics spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Argon2id over a passphrase.
    Passphrase,
    /// A raw 256-bit key.
    Raw,
    /// A key in a PKCS#11 token.
    Pkcs11,
}

impl Provider {
    /// `passphrase`, `raw` or `pkcs11`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::Raw => "raw",
            Self::Pkcs11 => "pkcs11",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Self::Passphrase => PROVIDER_PASSPHRASE,
            Self::Raw => PROVIDER_RAW,
            Self::Pkcs11 => PROVIDER_PKCS11,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        [Self::Passphrase, Self::Raw, Self::Pkcs11].into_iter().find(|p| p.byte() == byte)
    }

    fn described(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::Raw => "raw key",
            Self::Pkcs11 => "PKCS#11 key",
        }
    }
}

impl Unlock {
    /// Which provider this secret belongs to.
    pub fn provider(&self) -> Provider {
        match self {
            Self::Passphrase(_) => Provider::Passphrase,
            Self::RawKey(_) => Provider::Raw,
            Self::Pkcs11(_) => Provider::Pkcs11,
        }
    }
}

/// Creates a new random root key and seals it under `unlock`.
///
/// `params` is only used for a passphrase; it must lie within
/// [`MIN_KDF`]..=[`MAX_KDF`].
pub fn create(unlock: &Unlock, params: KdfParams) -> Result<(RootKey, Vec<u8>), CryptoError> {
    let root = RootKey(SecretKey::generate()?);
    let sealed = seal(&root, unlock, params)?;
    Ok((root, sealed))
}

/// Counts a root-key operation in the metrics, by provider and outcome.
fn observed<T>(operation: &'static str, provider: Provider, result: Result<T, CryptoError>) -> Result<T, CryptoError> {
    crate::metrics::metrics().root_key_operation(operation, provider.as_str(), result.is_ok());
    result
}

/// Seals an existing root key under `unlock` with a fresh salt and nonce
/// (used to change the passphrase without touching any data key).
pub fn seal(root: &RootKey, unlock: &Unlock, params: KdfParams) -> Result<Vec<u8>, CryptoError> {
    let mut salt = [0u8; SALT_LEN];
    super::fill_random(&mut salt)?;
    let nonce = super::random_nonce()?;
    observed("seal", unlock.provider(), seal_with(root, unlock, params, &salt, &nonce))
}

fn seal_with(
    root: &RootKey,
    unlock: &Unlock,
    params: KdfParams,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, CryptoError> {
    // The header (the AAD) for the provider's parameter string.
    let header = |params: &str| -> Result<Vec<u8>, CryptoError> {
        let len = u16::try_from(params.len()).map_err(|_| CryptoError::Kdf)?;
        let mut out = Vec::with_capacity(FIXED_HEADER_LEN + params.len() + SEALED_KEY_LEN);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_V1);
        out.push(unlock.provider().byte());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(params.as_bytes());
        Ok(out)
    };
    let (mut out, sealed) = if let Unlock::Pkcs11(unlock) = unlock {
        // One token session: the key is found (or made) and checked, the
        // token's label goes into the header, and the token seals.
        unlock.hsm.seal(&unlock.key_label, nonce, root.expose_secret(), |token| {
            header(&pkcs11::uri(token, &unlock.key_label))
        })?
    } else {
        let kdf_string = if let Unlock::Passphrase(_) = unlock {
            let params = params.check()?;
            let salt = SaltString::encode_b64(salt).map_err(|_| CryptoError::Kdf)?;
            format!("$argon2id$v=19$m={},t={},p={}${}", params.m_kib, params.t, params.p, salt.as_str())
        } else {
            String::new()
        };
        let out = header(&kdf_string)?;
        let kek = key_encryption_key(unlock, &kdf_string)?;
        let sealed = aead_seal(kek.expose_secret(), nonce, &out, root.expose_secret())?;
        (out, sealed)
    };
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// A sealed root file taken apart, before any secret is used. Its `Debug`
/// shows the provider and its parameters only, never the sealed bytes.
pub struct SealedRoot<'a> {
    /// Which provider sealed it.
    pub provider: Provider,
    /// The Argon2id parameters (passphrase files only), within
    /// [`MIN_KDF`]..=[`MAX_KDF`].
    pub kdf: Option<KdfParams>,
    /// The token label and key label (pkcs11 files only).
    pub pkcs11: Option<(String, String)>,
    header: &'a [u8],
    kdf_string: &'a str,
    nonce: &'a [u8; NONCE_LEN],
    sealed: &'a [u8],
}

impl std::fmt::Debug for SealedRoot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRoot")
            .field("provider", &self.provider)
            .field("kdf", &self.kdf)
            .field("pkcs11", &self.pkcs11)
            .finish_non_exhaustive()
    }
}

/// Checks the layout of a sealed root file, and its KDF string (PHC form,
/// parameters within bounds, salt long enough) without running the KDF:
/// everything [`unseal`] checks before it uses a secret.
pub fn parse_sealed(file: &[u8]) -> Result<SealedRoot<'_>, CryptoError> {
    let fixed = file.get(..FIXED_HEADER_LEN).ok_or(CryptoError::MalformedSealed)?;
    if &fixed[..4] != MAGIC {
        return Err(CryptoError::MalformedSealed);
    }
    if fixed[4] != FORMAT_V1 {
        return Err(CryptoError::UnsupportedSealedVersion(fixed[4]));
    }
    let provider = Provider::from_byte(fixed[5]).ok_or(CryptoError::MalformedSealed)?;
    let kdf_len = usize::from(u16::from_be_bytes([fixed[6], fixed[7]]));
    if kdf_len > MAX_KDF_STRING_LEN
        || file.len() != FIXED_HEADER_LEN + kdf_len + SEALED_KEY_LEN
        || (provider == Provider::Raw) != (kdf_len == 0)
    {
        return Err(CryptoError::MalformedSealed);
    }
    let (header, rest) = file.split_at(FIXED_HEADER_LEN + kdf_len);
    let kdf_string = std::str::from_utf8(&header[FIXED_HEADER_LEN..]).map_err(|_| CryptoError::MalformedSealed)?;
    let kdf = if provider == Provider::Passphrase { Some(parse_kdf_string(kdf_string)?.0) } else { None };
    let pkcs11 = match provider {
        Provider::Pkcs11 => Some(pkcs11::parse_uri(kdf_string).ok_or(CryptoError::MalformedSealed)?),
        _ => None,
    };
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::MalformedSealed)?;
    Ok(SealedRoot { provider, kdf, pkcs11, header, kdf_string, nonce, sealed })
}

/// Opens a sealed root file. A wrong secret and an altered file give the same
/// [`CryptoError::Unseal`]; a file that is not in the layout at all gives
/// [`CryptoError::MalformedSealed`].
pub fn unseal(file: &[u8], unlock: &Unlock) -> Result<RootKey, CryptoError> {
    let parsed = parse_sealed(file)?;
    if parsed.provider != unlock.provider() {
        return Err(CryptoError::WrongUnlockKind {
            expected: parsed.provider.described(),
            given: unlock.provider().described(),
        });
    }
    observed("unseal", parsed.provider, unseal_parsed(&parsed, unlock))
}

fn unseal_parsed(parsed: &SealedRoot<'_>, unlock: &Unlock) -> Result<RootKey, CryptoError> {
    let plain = if let (Unlock::Pkcs11(unlock), Some((token, key))) = (unlock, &parsed.pkcs11) {
        unlock.hsm.unseal(token, key, parsed.nonce, parsed.header, parsed.sealed)?.ok_or(CryptoError::Unseal)?
    } else {
        let kek = key_encryption_key(unlock, parsed.kdf_string)?;
        aead_open(kek.expose_secret(), parsed.nonce, parsed.header, parsed.sealed).map_err(|_| CryptoError::Unseal)?
    };
    let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().map_err(|_| CryptoError::Unseal)?;
    Ok(RootKey(SecretKey::from_bytes(bytes)))
}

/// The key that seals the root key: Argon2id(passphrase) or the raw key.
fn key_encryption_key(unlock: &Unlock, kdf_string: &str) -> Result<SecretKey, CryptoError> {
    match unlock {
        Unlock::RawKey(raw) => Ok(SecretKey::from_bytes(*raw.0.expose_secret())),
        // The key stays in the token; sealing and unsealing go through it.
        Unlock::Pkcs11(_) => Err(CryptoError::Kdf),
        Unlock::Passphrase(passphrase) => {
            let (params, salt) = parse_kdf_string(kdf_string)?;
            let argon = Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN)).map_err(|_| CryptoError::Kdf)?,
            );
            let mut kek = Zeroizing::new([0u8; KEY_LEN]);
            argon
                .hash_password_into(passphrase.0.as_bytes(), &salt, kek.as_mut_slice())
                .map_err(|_| CryptoError::Kdf)?;
            Ok(SecretKey::from_bytes(*kek))
        }
    }
}

/// Parses `$argon2id$v=19$m=…,t=…,p=…$<salt>` and checks the parameters
/// against the floor and the ceiling before any work is done.
fn parse_kdf_string(kdf_string: &str) -> Result<(KdfParams, Vec<u8>), CryptoError> {
    let phc = PasswordHash::new(kdf_string).map_err(|_| CryptoError::MalformedSealed)?;
    if phc.algorithm.as_str() != "argon2id" || phc.version != Some(19) || phc.hash.is_some() {
        return Err(CryptoError::MalformedSealed);
    }
    let get = |name: &str| phc.params.get_decimal(name).ok_or(CryptoError::MalformedSealed);
    if phc.params.iter().count() != 3 {
        return Err(CryptoError::MalformedSealed);
    }
    let params = KdfParams { m_kib: get("m")?, t: get("t")?, p: get("p")? }.check()?;
    let salt = phc.salt.ok_or(CryptoError::MalformedSealed)?;
    let mut buf = [0u8; 64];
    let salt = salt.decode_b64(&mut buf).map_err(|_| CryptoError::MalformedSealed)?;
    if salt.len() < SALT_LEN {
        return Err(CryptoError::MalformedSealed);
    }
    Ok((params, salt.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passphrase(text: &str) -> Unlock {
        Unlock::Passphrase(Passphrase::new(text.to_owned()).unwrap())
    }

    #[test]
    fn round_trip_passphrase_and_raw() {
        let unlock = passphrase("correct horse battery staple");
        let (root, file) = create(&unlock, MIN_KDF).unwrap();
        let parsed = format!("{:?}", parse_sealed(&file).unwrap());
        assert!(parsed.starts_with("SealedRoot { provider: Passphrase, kdf: Some("), "{parsed}");
        assert!(!parsed.contains("sealed") && !parsed.contains("nonce"), "{parsed}");
        let opened = unseal(&file, &unlock).unwrap();
        assert_eq!(root.expose_secret(), opened.expose_secret());

        let raw = Unlock::RawKey(RawKey::parse(&[7u8; 32]).unwrap());
        let (root, file) = create(&raw, MIN_KDF).unwrap();
        assert_eq!(file.len(), FIXED_HEADER_LEN + SEALED_KEY_LEN);
        assert_eq!(unseal(&file, &raw).unwrap().expose_secret(), root.expose_secret());
    }

    #[test]
    fn wrong_secret_is_one_opaque_error() {
        let (_, file) = create(&passphrase("one"), MIN_KDF).unwrap();
        assert!(matches!(unseal(&file, &passphrase("two")), Err(CryptoError::Unseal)));
        let raw = |b| Unlock::RawKey(RawKey::parse(&[b; 32]).unwrap());
        let (_, file) = create(&raw(1), MIN_KDF).unwrap();
        assert!(matches!(unseal(&file, &raw(2)), Err(CryptoError::Unseal)));
        assert!(matches!(
            unseal(&file, &passphrase("one")),
            Err(CryptoError::WrongUnlockKind { expected: "raw key", given: "passphrase" })
        ));
    }

    #[test]
    fn weak_and_excessive_parameters_are_refused_when_sealing() {
        let unlock = passphrase("p");
        let weak = KdfParams { m_kib: MIN_KDF.m_kib - 1, ..MIN_KDF };
        assert!(matches!(create(&unlock, weak), Err(CryptoError::WeakKdfParams)));
        let huge = KdfParams { t: MAX_KDF.t + 1, ..MIN_KDF };
        assert!(matches!(create(&unlock, huge), Err(CryptoError::ExcessiveKdfParams)));
    }

    /// A pkcs11 file's layout is parsed (and refused when its URI is not
    /// one piivault writes) without touching a token.
    #[test]
    fn pkcs11_files_name_token_and_key() {
        let file = |uri: &str| {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&[FORMAT_V1, PROVIDER_PKCS11]);
            out.extend_from_slice(&u16::try_from(uri.len()).unwrap().to_be_bytes());
            out.extend_from_slice(uri.as_bytes());
            out.extend_from_slice(&[7; SEALED_KEY_LEN]);
            out
        };
        let good = file("pkcs11:token=piivault;object=root%20v2;type=secret-key");
        let parsed = parse_sealed(&good).unwrap();
        assert_eq!(parsed.provider, Provider::Pkcs11);
        assert_eq!(parsed.pkcs11, Some(("piivault".into(), "root v2".into())));
        assert_eq!(parsed.kdf, None);
        assert!(format!("{parsed:?}").contains("pkcs11: Some((\"piivault\", \"root v2\"))"));
        for bad in ["", "pkcs11:token=piivault", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA"] {
            assert!(matches!(parse_sealed(&file(bad)), Err(CryptoError::MalformedSealed)), "{bad}");
        }
        let raw = Unlock::RawKey(RawKey::parse(&[1u8; 32]).unwrap());
        assert!(matches!(
            unseal(&good, &raw),
            Err(CryptoError::WrongUnlockKind { expected: "PKCS#11 key", given: "raw key" })
        ));
    }

    #[test]
    fn raw_key_formats() {
        assert!(RawKey::parse(&[0u8; 32]).is_ok());
        let hex64 = "ab".repeat(32);
        let parsed = RawKey::parse(format!("  {hex64}\n").as_bytes()).unwrap();
        assert_eq!(parsed.0.expose_secret(), &[0xab; 32]);
        assert!(matches!(RawKey::parse(&[0u8; 31]), Err(CryptoError::RawKeyFormat)));
        assert!(matches!(RawKey::parse("zz".repeat(32).as_bytes()), Err(CryptoError::RawKeyFormat)));
        assert!(matches!(RawKey::parse(b""), Err(CryptoError::RawKeyFormat)));
    }

    #[test]
    fn weak_passphrases_and_degenerate_raw_keys_are_refused_as_new_secrets() {
        let strong = |text: &str| Passphrase::new(text.to_owned()).unwrap().strong().is_ok();
        assert!(!strong("a"));
        assert!(!strong("short pass"), "10 characters");
        assert!(!strong("aaaaaaaaaaaaaaaaaaaa"), "one character, repeated");
        assert!(!strong("abababababab"));
        assert!(strong("correct horse battery staple"));
        assert!(strong("ünïcödé-pâss"), "characters, not bytes");
        let raw = |bytes: &[u8]| RawKey::parse(bytes).unwrap().strong().is_ok();
        assert!(!raw(&[0; 32]));
        assert!(!raw(&[0x42; 32]));
        assert!(!raw(&[1, 2, 3, 4].repeat(8)));
        assert!(raw(&(0u8..32).collect::<Vec<_>>()));
        let random: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).unwrap().wrapping_mul(97).wrapping_add(13));
        assert!(raw(&random));
    }

    #[test]
    fn passphrase_trims_newline_and_refuses_empty() {
        assert!(matches!(Passphrase::new("\n".into()), Err(CryptoError::EmptyPassphrase)));
        assert_eq!(Passphrase::new("abc\r\n".into()).unwrap().0.as_str(), "abc");
    }

    /// The known-answer vector in `tests/vectors/root_sealed_v1.toml` is
    /// exactly what this code produces for fixed inputs: a change to the
    /// format breaks this test.
    #[test]
    fn known_answer_vector_is_reproduced() {
        let file: toml::Table = toml::from_str(include_str!("../../tests/vectors/root_sealed_v1.toml")).unwrap();
        let fields = |name: &str| file["passphrase"][name].as_str().unwrap().to_owned();
        let root = RootKey(SecretKey::from_bytes(hex::decode(fields("root_key")).unwrap().try_into().unwrap()));
        let unlock = passphrase(&fields("passphrase"));
        let salt: [u8; SALT_LEN] = hex::decode(fields("salt")).unwrap().try_into().unwrap();
        let nonce: [u8; NONCE_LEN] = hex::decode(fields("nonce")).unwrap().try_into().unwrap();
        let sealed = seal_with(&root, &unlock, MIN_KDF, &salt, &nonce).unwrap();
        assert_eq!(hex::encode(&sealed), fields("sealed"));
        assert_eq!(unseal(&sealed, &unlock).unwrap().expose_secret(), root.expose_secret());

        let raw = |name: &str| file["raw"][name].as_str().unwrap().to_owned();
        let raw_unlock = Unlock::RawKey(RawKey::parse(raw("raw_key").as_bytes()).unwrap());
        let sealed = seal_with(&root, &raw_unlock, MIN_KDF, &salt, &nonce).unwrap();
        assert_eq!(hex::encode(&sealed), raw("sealed"));
        assert_eq!(hex::encode(unseal(&sealed, &raw_unlock).unwrap().expose_secret()), raw("root_key"));
    }
}
