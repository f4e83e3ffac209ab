//! Where the secrets that open the root key come from: the passphrase, the
//! raw key, the PKCS#11 PIN; and, for each sealed root file, the secret of
//! the provider that sealed it.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use zeroize::Zeroizing;

use super::{Classify as _, CliError, Failure, PASSPHRASE_ENV, SecretArgs};
use crate::config::{Config, Pkcs11Settings, RootKeySource, SecretSource};
use crate::crypto::pkcs11::{Hsm, Pin};
use crate::crypto::root::{Passphrase, Pkcs11Unlock, Provider, RawKey, Unlock};
pub(super) use crate::secret_env::{env_has, env_secret, take_from_env};

/// The environment variables holding a secret, for [`take_from_env`]: the
/// passphrase's, those a command names itself (`extra`: `init
/// --raw-key-env`, `--pkcs11-pin-env`), and those the config of a command
/// names (the raw key's, the PIN's, the database password's).
pub(super) fn secret_variables(config: Option<&Path>, extra: &[Option<&str>]) -> Vec<String> {
    let mut names = vec![PASSPHRASE_ENV.to_owned()];
    names.extend(extra.iter().flatten().map(|s| (*s).to_owned()));
    if let Some(config) = config.and_then(|path| Config::load(path).ok()) {
        if let RootKeySource::RawKeyEnv(var) = config.root_key {
            names.push(var);
        }
        if let Some(Pkcs11Settings { pin: SecretSource::Env(var), .. }) = config.pkcs11 {
            names.push(var);
        }
        if let crate::config::StoreBackend::Postgres(pg) = config.store_backend
            && let Some(SecretSource::Env(var)) = pg.password
        {
            names.push(var);
        }
    }
    names
}

/// Reads a secret file, refusing one that group or others may read. The
/// mode is checked on the opened file, so the file checked is the file read.
pub(super) fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let unreadable = || format!("cannot read the {what} file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(unreadable).or_fail(Failure::Config)?;
    let mode = file.metadata().with_context(unreadable).or_fail(Failure::Config)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(anyhow!(
            "the {what} file {} may be read by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        ))
        .or_fail(Failure::Config);
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).with_context(unreadable).or_fail(Failure::Config)?;
    Ok(bytes)
}

/// A secret file's text ([`read_secret_file`]), which must be UTF-8.
pub(super) fn read_secret_text(path: &Path, what: &str) -> Result<Zeroizing<String>, CliError> {
    let bytes = read_secret_file(path, what)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| anyhow!("the {what} file {} is not UTF-8", path.display()))
        .or_fail(Failure::Config)?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// The PKCS#11 PIN from its file or variable.
fn read_pin(source: &SecretSource) -> Result<Pin, CliError> {
    let text = match source {
        SecretSource::File(path) => read_secret_text(path, "PKCS#11 PIN")?.to_string(),
        SecretSource::Env(var) => env_secret(var)
            .map(|v| v.to_string())
            .ok_or_else(|| anyhow!("the PKCS#11 PIN variable ${var} is not set"))
            .or_fail(Failure::Config)?,
    };
    Pin::new(text).or_fail(Failure::Config)
}

/// The token `settings` name, with its PIN read.
pub(super) fn hsm_for(settings: &Pkcs11Settings) -> Result<Arc<Hsm>, CliError> {
    Ok(Arc::new(Hsm::new(settings.module.clone(), settings.token.clone(), read_pin(&settings.pin)?)))
}

/// The passphrase: `--passphrase-file`, `PIIVAULT_PASSPHRASE`, or typed on
/// a terminal (twice if `confirm`).
pub(super) fn read_passphrase(secret: &SecretArgs, confirm: bool) -> Result<Passphrase, CliError> {
    let text = if let Some(path) = &secret.passphrase_file {
        read_secret_text(path, "passphrase")?.to_string()
    } else if let Some(text) = env_secret(PASSPHRASE_ENV) {
        text.to_string()
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("piivault passphrase: ").or_fail(Failure::Other)?;
        if confirm {
            let second = Zeroizing::new(rpassword::prompt_password("again: ").or_fail(Failure::Other)?);
            if first != *second {
                return Err(anyhow!("the passphrases do not match")).or_fail(Failure::Usage);
            }
        }
        first
    } else {
        return Err(anyhow!("no passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file")).or_fail(Failure::Usage);
    };
    Passphrase::new(text).or_fail(Failure::Usage)
}

/// A raw key from a file or variable.
fn read_raw_key(source: &RootKeySource) -> Result<RawKey, CliError> {
    match source {
        RootKeySource::RawKeyFile(path) => {
            RawKey::parse(&read_secret_file(path, "raw root key")?).or_fail(Failure::Config)
        }
        RootKeySource::RawKeyEnv(var) => {
            let text = env_secret(var)
                .ok_or_else(|| anyhow!("the raw root key variable ${var} is not set"))
                .or_fail(Failure::Config)?;
            RawKey::parse(text.as_bytes()).or_fail(Failure::Config)
        }
        RootKeySource::Passphrase | RootKeySource::Pkcs11 => Err(anyhow!(
            "root.sealed is sealed with a raw key, but config.toml names no raw key: set [root_key] provider = \"raw\" with key_file or key_env"
        ))
        .or_fail(Failure::Config),
    }
}

/// The secret a new vault is sealed with (`init`), by the configured
/// provider; for pkcs11, under the key `key_label`.
pub(super) fn unlock_for_init(
    config: &Config,
    secret: &SecretArgs,
    key_label: &str,
    confirm: bool,
) -> Result<Unlock, CliError> {
    // A new secret must be strong; an existing one is never refused.
    match &config.root_key {
        RootKeySource::Passphrase => {
            Ok(Unlock::Passphrase(read_passphrase(secret, confirm)?.strong().or_fail(Failure::Usage)?))
        }
        RootKeySource::Pkcs11 => {
            Ok(Unlock::Pkcs11(Pkcs11Unlock { hsm: configured_hsm(config)?, key_label: key_label.to_owned() }))
        }
        raw => Ok(Unlock::RawKey(read_raw_key(raw)?.strong().or_fail(Failure::Config)?)),
    }
}

/// The token of `[root_key.pkcs11]`, or a configuration error.
pub(super) fn configured_hsm(config: &Config) -> Result<Arc<Hsm>, CliError> {
    let settings = config
        .pkcs11
        .as_ref()
        .ok_or_else(|| anyhow!("config.toml has no [root_key.pkcs11] table naming the token"))
        .or_fail(Failure::Config)?;
    hsm_for(settings)
}

/// The secrets of each provider, resolved when a sealed file asks for one
/// and kept for the next (an interrupted rotation leaves two files, which
/// may come from different providers).
pub(super) struct Unlocks<'a> {
    config: &'a Config,
    secret: &'a SecretArgs,
    /// By provider: passphrase, raw, pkcs11.
    resolved: [Option<Unlock>; 3],
}

impl<'a> Unlocks<'a> {
    pub(super) fn new(config: &'a Config, secret: &'a SecretArgs) -> Self {
        Self { config, secret, resolved: [None, None, None] }
    }

    fn slot(provider: Provider) -> usize {
        match provider {
            Provider::Passphrase => 0,
            Provider::Raw => 1,
            Provider::Pkcs11 => 2,
        }
    }

    /// The token, if one was used to unseal.
    pub(super) fn hsm(&self) -> Option<Arc<Hsm>> {
        match &self.resolved[Self::slot(Provider::Pkcs11)] {
            Some(Unlock::Pkcs11(unlock)) => Some(unlock.hsm.clone()),
            _ => None,
        }
    }
}

impl crate::vault::unseal::Secrets for Unlocks<'_> {
    type Error = CliError;

    /// The secret for `provider`, read on first use.
    fn unlock(&mut self, provider: Provider) -> Result<&Unlock, CliError> {
        let slot = Self::slot(provider);
        if self.resolved[slot].is_none() {
            let unlock = match provider {
                Provider::Passphrase => Unlock::Passphrase(read_passphrase(self.secret, false)?),
                Provider::Raw => Unlock::RawKey(read_raw_key(&self.config.root_key)?),
                Provider::Pkcs11 => {
                    Unlock::Pkcs11(Pkcs11Unlock { hsm: configured_hsm(self.config)?, key_label: String::new() })
                }
            };
            self.resolved[slot] = Some(unlock);
        }
        self.resolved[slot].as_ref().ok_or_else(|| unreachable!("resolved above"))
    }
}

/// Where the PKCS#11 settings of `init` come from.
#[derive(Debug, clap::Args)]
#[allow(clippy::struct_field_names)] // the fields are the flags' names
pub(super) struct Pkcs11InitArgs {
    /// Seal the root key in a PKCS#11 token: the module (library) path,
    /// e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "FILE", requires = "pkcs11_token_label", conflicts_with_all = ["raw_key_file", "raw_key_env", "passphrase_file"])]
    pub pkcs11_module: Option<PathBuf>,
    /// The token's label.
    #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
    pub pkcs11_token_label: Option<String>,
    /// A file (mode 0600) holding the token's user PIN.
    #[arg(long, value_name = "FILE", requires = "pkcs11_module", conflicts_with = "pkcs11_pin_env")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN (removed from the
    /// environment once read).
    #[arg(long, value_name = "VAR", requires = "pkcs11_module")]
    pub pkcs11_pin_env: Option<String>,
    /// The label of the AES key that seals the root key: used if the token
    /// holds one (it must be sensitive and non-extractable), else created.
    #[arg(long, value_name = "LABEL", default_value = "piivault-root", requires = "pkcs11_module")]
    pub pkcs11_key_label: String,
}
