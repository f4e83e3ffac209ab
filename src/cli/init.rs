//! `piivault init` and `piivault check`: a new vault, and proof that one opens.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;

use anyhow::{Context as _, anyhow};

use super::{
    Classify as _, CliError, Failure, SecretArgs, Unseal, load_config, open_vault, say, secrets, vault_failure,
};
use crate::config::{CONFIG_FILE, Config, DATABASE_FILE, RootKeySource, SEALED_ROOT_FILE};
use crate::crypto::root::{self, Passphrase, Unlock};
use crate::datadir;
use crate::pki::Ca;
use crate::policy::EMPTY_POLICY;
use crate::vault::Vault;

/// The new passphrase of a root-key rotation: from `--new-passphrase-file`,
/// or typed twice on a terminal. Never from argv or the environment (which
/// holds the old one).
pub(super) fn read_new_passphrase(secret: &SecretArgs) -> Result<Passphrase, CliError> {
    if secret.passphrase_file.is_none() && !std::io::stdin().is_terminal() {
        return Err(anyhow!("no new passphrase: pass --new-passphrase-file or run on a terminal"))
            .or_fail(Failure::Usage);
    }
    let text = if let Some(path) = &secret.passphrase_file {
        secrets::read_secret_text(path, "new passphrase")?.to_string()
    } else {
        let first = rpassword::prompt_password("new passphrase: ").or_fail(Failure::Other)?;
        let second = zeroize::Zeroizing::new(rpassword::prompt_password("again: ").or_fail(Failure::Other)?);
        if first != *second {
            return Err(anyhow!("the passphrases do not match")).or_fail(Failure::Usage);
        }
        first
    };
    Passphrase::new(text).and_then(Passphrase::strong).or_fail(Failure::Usage)
}

/// What `init` seals a new vault with.
pub(super) struct NewVault {
    pub(super) source: RootKeySource,
    pub(super) pkcs11: Option<crate::config::Pkcs11Settings>,
    /// The PKCS#11 key that seals the root key (pkcs11 only).
    pub(super) key_label: String,
    /// The PostgreSQL database to keep the records in, instead of a file.
    pub(super) postgres: Option<crate::config::PostgresSettings>,
}

/// `piivault init`: creates the data directory, config, sealed root key and
/// store. Leaves nothing behind if any step fails.
pub(super) async fn init(data_dir: &Path, new: &NewVault, secret: &SecretArgs, confirm: bool) -> Result<(), CliError> {
    for name in [CONFIG_FILE, SEALED_ROOT_FILE, DATABASE_FILE] {
        let existing = data_dir.join(name);
        if existing.exists() {
            return Err(anyhow!(
                "{} already holds a vault ({} exists); refusing to overwrite it",
                data_dir.display(),
                existing.display()
            ))
            .or_fail(Failure::Config);
        }
    }
    let config_text = Config::sample(&new.source, new.pkcs11.as_ref(), new.postgres.as_ref());
    let config = Config::parse(&config_text, data_dir).or_fail(Failure::Config)?;
    let unlock = secrets::unlock_for_init(&config, secret, &new.key_label, confirm)?;
    datadir::create_private_dir(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))
        .or_fail(Failure::Other)?;

    let created = [CONFIG_FILE, SEALED_ROOT_FILE, DATABASE_FILE].map(|f| data_dir.join(f));
    let result = write_new_vault(&config, &config_text, &unlock).await;
    if result.is_err() {
        for path in &created {
            let _ = std::fs::remove_file(path);
        }
    }
    let vault = result?;
    let names = vault.collection_names().join(", ");
    drop(vault);
    let _ =
        writeln!(std::io::stdout().lock(), "initialised a new vault in {} (collections: {names})", data_dir.display());
    Ok(())
}

pub(super) async fn write_new_vault(config: &Config, config_text: &str, unlock: &Unlock) -> Result<Vault, CliError> {
    let data_dir = config.data_dir.as_path();
    datadir::write_private_file(&data_dir.join(CONFIG_FILE), config_text.as_bytes())
        .context("cannot write config.toml")
        .or_fail(Failure::Other)?;
    let origin = match unlock {
        Unlock::Pkcs11(hsm) => Some(hsm.hsm.prepare_key(&hsm.key_label).or_fail(Failure::Config)?),
        _ => None,
    };
    let (root_key, sealed) = root::create(unlock, root::DEFAULT_KDF).or_fail(Failure::Config)?;
    datadir::write_private_file(&config.sealed_root, &sealed)
        .context("cannot write root.sealed")
        .or_fail(Failure::Other)?;
    datadir::write_private_file(&config.server.policy, EMPTY_POLICY.as_bytes())
        .context("cannot write policy.toml")
        .or_fail(Failure::Other)?;
    Ca::init(data_dir, &config.server.trust_domain, &config.server.server_names).or_fail(Failure::Other)?;
    let vault =
        Vault::create(config, &root_key).await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    if let (Unlock::Pkcs11(hsm), Some(origin)) = (unlock, origin) {
        let how = match origin {
            crate::crypto::pkcs11::KeyOrigin::Created => "created in the token (sensitive, never extractable)",
            crate::crypto::pkcs11::KeyOrigin::Existing => "found in the token and checked",
        };
        say(&format!("root key sealed by the PKCS#11 key {:?}, {how}", hsm.key_label));
    }
    Ok(vault)
}

/// `piivault check`: proves the passphrase, the sealed root, the store and
/// every data key are in order, without serving.
pub(super) async fn check(config_path: &Path, secret: &SecretArgs) -> Result<(), CliError> {
    let config = load_config(config_path)?;
    let vault = open_vault(&config, secret, Unseal::Recorded).await?;
    let counts = vault.record_counts().await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    let summary: Vec<String> = counts.iter().map(|(name, n)| format!("{name}={n}")).collect();
    say(&format!("ok: root key unsealed, store open, records: {}", summary.join(" ")));
    Ok(())
}
