//! The `pkcs11` root-key provider: the root key is sealed by an AES-256 key
//! that lives in a PKCS#11 token (an HSM, or `SoftHSM`) and never leaves it.
//!
//! - The wrapping key is a token object (`CKA_TOKEN`), private, sensitive
//!   and non-extractable; piivault creates it that way (`init`,
//!   `keys rotate-root --new-pkcs11-key-label`) or uses an existing key of
//!   that label only if it is an AES-256 key with those properties.
//! - Sealing and unsealing are `CKM_AES_GCM` operations inside the token:
//!   a random 96-bit IV from the host's CSPRNG, a 128-bit tag, and the
//!   sealed file's header as additional data, so the file layout and its
//!   tamper evidence are the same as for the other providers. GCM was chosen
//!   over the token's key-wrap mechanisms because it authenticates the
//!   header and needs the root key to be a plain byte string, not a token
//!   object; a token without `CKM_AES_GCM` is refused with a clear error.
//! - The PIN is held zeroized, is never formatted, and is handed only to
//!   `C_Login`.
//!
//! PKCS#11 allows one `C_Initialize` per module per process, so each module
//! is loaded and initialized once and kept; every operation opens its own
//! session, logs in, and closes the session (which logs out) before the
//! next one starts. Operations are serialized: the root key is needed at
//! unseal and rotation only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{KEY_LEN, NONCE_LEN, TAG_LEN};

/// Which token holds the wrapping key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token's label (`CKA_LABEL` of the token, at most 32 bytes).
    Label(String),
    /// The token's serial number.
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(label) => write!(f, "label {label:?}"),
            Self::Serial(serial) => write!(f, "serial {serial:?}"),
        }
    }
}

/// The user PIN of a token. Zeroized on drop; no `Debug`.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN; a trailing newline (as left by `echo` into a file) is
    /// removed, and an empty PIN is refused.
    pub fn new(text: String) -> Result<Self, HsmError> {
        super::secret_line(text).map(Self).ok_or(HsmError::EmptyPin)
    }
}

/// Why the token could not be used. Messages name the module, token and
/// key label, and the PKCS#11 return code; never the PIN or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The module file did not load (missing, not a PKCS#11 library).
    #[error("cannot load the PKCS#11 module {}: {reason}", module.display())]
    Module {
        /// The configured module path.
        module: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// No slot holds a token with that label or serial.
    #[error("no PKCS#11 token with {0} in the module's slots")]
    TokenNotFound(TokenSelector),
    /// The token refused the PIN.
    #[error("the PKCS#11 token refused the PIN (CKR_PIN_INCORRECT)")]
    PinIncorrect,
    /// The token locked the PIN after too many wrong tries.
    #[error("the PKCS#11 token's user PIN is locked (CKR_PIN_LOCKED)")]
    PinLocked,
    /// The PIN file or variable is empty.
    #[error("the PKCS#11 PIN is empty")]
    EmptyPin,
    /// No secret key with that label in the token.
    #[error("no AES key labelled {0:?} in the PKCS#11 token")]
    KeyNotFound(String),
    /// More than one secret key with that label.
    #[error("{count} secret keys are labelled {label:?} in the PKCS#11 token; labels must be unique")]
    KeyAmbiguous {
        /// The label.
        label: String,
        /// How many keys carry it.
        count: usize,
    },
    /// The key exists but may not seal the root key.
    #[error("the PKCS#11 key {label:?} cannot wrap the root key: {reason}")]
    KeyUnsafe {
        /// The label.
        label: String,
        /// Which property is wrong (fixed text).
        reason: &'static str,
    },
    /// The token does not do AES-GCM.
    #[error("the PKCS#11 token does not offer CKM_AES_GCM encryption and decryption")]
    NoAesGcm,
    /// The sealed file was made in another token than the configured one.
    #[error(
        "root.sealed was sealed in the PKCS#11 token {sealed_in:?}; the configuration reaches token {configured:?}"
    )]
    TokenMismatch {
        /// The token label recorded in the sealed file.
        sealed_in: String,
        /// The label of the token the configuration selects.
        configured: String,
    },
    /// A key label is empty or longer than 255 bytes.
    #[error("a PKCS#11 key label must be 1 to 255 bytes")]
    BadLabel,
    /// Any other PKCS#11 failure (token removed, device error, ...).
    #[error("PKCS#11 {0}")]
    Device(String),
}

fn device(e: Pkcs11Error) -> HsmError {
    match e {
        Pkcs11Error::Pkcs11(RvError::PinIncorrect, _) => HsmError::PinIncorrect,
        Pkcs11Error::Pkcs11(RvError::PinLocked, _) => HsmError::PinLocked,
        // The cryptoki error names the function and the return code only.
        other => HsmError::Device(other.to_string()),
    }
}

/// A token and the PIN that opens it: everything the provider needs but
/// the key label.
pub struct Hsm {
    module: PathBuf,
    token: TokenSelector,
    pin: Pin,
}

/// Whether [`Hsm::prepare_key`] made the key or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Generated in the token just now.
    Created,
    /// An existing key of that label, checked.
    Existing,
}

/// One initialized context per module path, for the life of the process.
fn context(module: &Path) -> Result<Pkcs11, HsmError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let load_error = |reason: String| HsmError::Module { module: module.to_owned(), reason };
    if !module.is_file() {
        return Err(load_error("no such file".into()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| load_error(e.to_string()))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(|e| load_error(e.to_string()))?;
    contexts.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

/// Serializes token operations in this process (see the module docs).
static OPERATION: Mutex<()> = Mutex::new(());

/// An open, logged-in session on the configured token.
struct Opened {
    session: Session,
    slot: Slot,
    token_label: String,
}

impl Hsm {
    /// A provider for `token` in the PKCS#11 library `module`. Nothing is
    /// loaded until it is used.
    pub fn new(module: PathBuf, token: TokenSelector, pin: Pin) -> Self {
        Self { module, token, pin }
    }

    /// The same module and token, opened with `pin` (to prove a PIN).
    #[must_use]
    pub fn with_pin(&self, pin: Pin) -> Self {
        Self { module: self.module.clone(), token: self.token.clone(), pin }
    }

    fn open(&self, ctx: &Pkcs11, read_write: bool) -> Result<Opened, HsmError> {
        let slots = ctx.get_slots_with_token().map_err(device)?;
        let mut found = None;
        for slot in slots {
            let info = ctx.get_token_info(slot).map_err(device)?;
            let matches = match &self.token {
                TokenSelector::Label(label) => info.label().trim_end() == label,
                TokenSelector::Serial(serial) => info.serial_number().trim_end() == serial,
            };
            if matches {
                found = Some((slot, info.label().trim_end().to_owned()));
                break;
            }
        }
        let (slot, token_label) = found.ok_or_else(|| HsmError::TokenNotFound(self.token.clone()))?;
        let session = if read_write { ctx.open_rw_session(slot) } else { ctx.open_ro_session(slot) }.map_err(device)?;
        let pin = AuthPin::from(self.pin.0.as_str());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(device(e)),
        }
        Ok(Opened { session, slot, token_label })
    }

    /// Runs `f` on a fresh logged-in session; the session closes (and logs
    /// out) after it.
    fn with_session<T>(
        &self,
        read_write: bool,
        f: impl FnOnce(&Pkcs11, &Opened) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let _one_at_a_time = OPERATION.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ctx = context(&self.module)?;
        let opened = self.open(&ctx, read_write)?;
        let result = f(&ctx, &opened);
        drop(opened);
        result
    }

    /// Finds the key `label` and checks it may seal the root key, or, if no
    /// key has that label, generates one in the token: AES-256, token
    /// object, private, sensitive, never extractable.
    pub fn prepare_key(&self, label: &str) -> Result<KeyOrigin, HsmError> {
        check_label(label)?;
        self.with_session(true, |ctx, opened| prepare_key(ctx, opened, label).map(|(_, origin)| origin))
    }

    /// AES-GCM in the token, in one session (one login: a PKCS#11 module
    /// may write its token's state at each login): the key `label` is found
    /// and checked or created ([`Hsm::prepare_key`]), `aad` is built from
    /// the token's label, and `plaintext` is sealed with `iv`. Returns the
    /// AAD and ciphertext ‖ tag.
    pub(crate) fn seal<E: From<HsmError>>(
        &self,
        label: &str,
        iv: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: impl FnOnce(&str) -> Result<Vec<u8>, E>,
    ) -> Result<(Vec<u8>, Vec<u8>), E> {
        check_label(label)?;
        self.with_session(true, |ctx, opened| {
            let (key, _) = prepare_key(ctx, opened, label)?;
            let header = match aad(&opened.token_label) {
                Ok(header) => header,
                Err(e) => return Ok(Err(e)),
            };
            let mut iv = *iv;
            let params = GcmParams::new(&mut iv, &header, (TAG_LEN as u64 * 8).into()).map_err(device)?;
            let sealed = opened.session.encrypt(&Mechanism::AesGcm(params), key, plaintext).map_err(device)?;
            if sealed.len() != plaintext.len() + TAG_LEN {
                return Err(HsmError::Device("AES-GCM returned an unexpected length".into()));
            }
            Ok(Ok((header, sealed)))
        })?
    }

    /// The label of the token the configuration selects, checked against
    /// `sealed_in`, then AES-GCM decryption under key `label`. An
    /// authentication failure is `Ok(None)`: the caller reports it as the
    /// one opaque unseal error.
    pub(crate) fn unseal(
        &self,
        sealed_in: &str,
        label: &str,
        iv: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, HsmError> {
        self.with_session(false, |ctx, opened| {
            if opened.token_label != sealed_in {
                return Err(HsmError::TokenMismatch {
                    sealed_in: sealed_in.to_owned(),
                    configured: opened.token_label.clone(),
                });
            }
            check_mechanism(ctx, opened.slot)?;
            let key = find_key(&opened.session, label)?;
            let mut iv = *iv;
            let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into()).map_err(device)?;
            match opened.session.decrypt(&Mechanism::AesGcm(params), key, sealed) {
                Ok(plain) => Ok(Some(Zeroizing::new(plain))),
                Err(Pkcs11Error::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::GeneralError,
                    _,
                )) => Ok(None),
                Err(e) => Err(device(e)),
            }
        })
    }
}

/// The key `label`, checked, or generated if the token has none by that
/// label (see [`Hsm::prepare_key`]).
fn prepare_key(ctx: &Pkcs11, opened: &Opened, label: &str) -> Result<(ObjectHandle, KeyOrigin), HsmError> {
    check_mechanism(ctx, opened.slot)?;
    match find_key(&opened.session, label) {
        Ok(key) => Ok((key, KeyOrigin::Existing)),
        Err(HsmError::KeyNotFound(_)) => {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen((KEY_LEN as u64).into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            opened.session.generate_key(&Mechanism::AesKeyGen, &template).map_err(device)?;
            find_key(&opened.session, label).map(|key| (key, KeyOrigin::Created))
        }
        Err(e) => Err(e),
    }
}

fn check_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > 255 { Err(HsmError::BadLabel) } else { Ok(()) }
}

fn check_mechanism(ctx: &Pkcs11, slot: Slot) -> Result<(), HsmError> {
    match ctx.get_mechanism_info(slot, MechanismType::AES_GCM) {
        Ok(info) if info.encrypt() && info.decrypt() => Ok(()),
        Ok(_) | Err(Pkcs11Error::Pkcs11(RvError::MechanismInvalid, _)) => Err(HsmError::NoAesGcm),
        Err(e) => Err(device(e)),
    }
}

/// The one secret key labelled `label`, checked: AES-256, sensitive, not
/// extractable, allowed to encrypt and decrypt.
fn find_key(session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
    let template = [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())];
    let found = session.find_objects(&template).map_err(device)?;
    let key = match found.as_slice() {
        [] => return Err(HsmError::KeyNotFound(label.to_owned())),
        [key] => *key,
        many => return Err(HsmError::KeyAmbiguous { label: label.to_owned(), count: many.len() }),
    };
    let wanted = [
        AttributeType::KeyType,
        AttributeType::ValueLen,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
    ];
    let attributes = session.get_attributes(key, &wanted).map_err(device)?;
    let (mut aes, mut len, mut sensitive, mut extractable, mut encrypt, mut decrypt) =
        (false, 0usize, false, true, false, false);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(kind) => aes = kind == KeyType::AES,
            Attribute::ValueLen(n) => len = n.into(),
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            Attribute::Encrypt(v) => encrypt = v,
            Attribute::Decrypt(v) => decrypt = v,
            _ => {}
        }
    }
    let unsafe_key = |reason| Err(HsmError::KeyUnsafe { label: label.to_owned(), reason });
    if !aes || len != KEY_LEN {
        return unsafe_key("it is not an AES-256 key");
    }
    if extractable {
        return unsafe_key("it is extractable (CKA_EXTRACTABLE is true)");
    }
    if !sensitive {
        return unsafe_key("it is not sensitive (CKA_SENSITIVE is false)");
    }
    if !encrypt || !decrypt {
        return unsafe_key("it may not encrypt and decrypt");
    }
    Ok(key)
}

/// The provider parameters a sealed file records: a PKCS#11 URI (RFC 7512)
/// naming the token and the key, e.g.
/// `pkcs11:token=piivault;object=piivault-root;type=secret-key`.
pub(crate) fn uri(token_label: &str, key_label: &str) -> String {
    format!("pkcs11:token={};object={};type=secret-key", pct_encode(token_label), pct_encode(key_label))
}

/// The token and key labels of a URI written by [`uri`]; `None` for
/// anything else.
pub(crate) fn parse_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("pkcs11:")?;
    let mut parts = rest.split(';');
    let token = pct_decode(parts.next()?.strip_prefix("token=")?)?;
    let key = pct_decode(parts.next()?.strip_prefix("object=")?)?;
    (parts.next()? == "type=secret-key" && parts.next().is_none() && !key.is_empty()).then_some((token, key))
}

fn pct_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn pct_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if bytes[i].is_ascii_alphanumeric() || b"-._~".contains(&bytes[i]) {
            out.push(bytes[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uri_names_token_and_key() {
        assert_eq!(uri("piivault", "piivault-root"), "pkcs11:token=piivault;object=piivault-root;type=secret-key");
        assert_eq!(uri("my token", "root;v2"), "pkcs11:token=my%20token;object=root%3Bv2;type=secret-key");
        assert_eq!(parse_uri(&uri("my token", "root;v2")), Some(("my token".into(), "root;v2".into())));
        for bad in [
            "",
            "pkcs11:token=a;object=b",
            "pkcs11:object=b;token=a;type=secret-key",
            "pkcs11:token=a;object=;type=secret-key",
            "pkcs11:token=a b;object=c;type=secret-key",
            "pkcs11:token=%zz;object=c;type=secret-key",
            "pkcs11:token=a;object=c;type=secret-key;x=y",
        ] {
            assert_eq!(parse_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn pin_trims_newline_and_refuses_empty() {
        assert!(matches!(Pin::new("\r\n".into()), Err(HsmError::EmptyPin)));
        assert_eq!(Pin::new("1234\n".into()).unwrap().0.as_str(), "1234");
    }

    #[test]
    fn a_missing_module_is_named() {
        let hsm = Hsm::new(
            "/nonexistent/libpkcs11.so".into(),
            TokenSelector::Label("t".into()),
            Pin::new("1".into()).unwrap(),
        );
        let e = hsm.prepare_key("k").unwrap_err();
        assert_eq!(e.to_string(), "cannot load the PKCS#11 module /nonexistent/libpkcs11.so: no such file");
    }

    proptest! {
        #[test]
        fn uri_round_trips(token in "\\PC{0,32}", key in "\\PC{1,64}") {
            prop_assert_eq!(parse_uri(&uri(&token, &key)), Some((token, key)));
        }
    }
}
