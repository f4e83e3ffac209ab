//! The `piivault` command line.
//!
//! Exit codes (the contract in DESIGN.md): 0 ok, 64 bad usage, 78 bad
//! configuration (including a wrong passphrase or a damaged sealed root
//! file), 1 anything else; each failure is one line on stderr. Secrets come
//! from the environment, a file or the terminal, never from argv, and are
//! never echoed.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};

use crate::config::{CONFIG_FILE, Config, DATABASE_FILE, RootKeySource, SEALED_ROOT_FILE};
use crate::crypto::CryptoError;
use crate::crypto::root::{self, Passphrase, RawKey, RootKey, Unlock};
use crate::datadir;
use crate::error::VaultError;
use crate::store::StoreError;
use crate::vault::Vault;

/// Environment variable holding the passphrase that seals the root key.
pub const PASSPHRASE_ENV: &str = "PIIVAULT_PASSPHRASE";

/// piivault: a PII tokenization vault.
#[derive(Debug, Parser)]
#[command(name = "piivault", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new vault: config, sealed root key and an empty store.
    Init {
        /// The data directory to create (0700). Refused if it holds a vault.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// Seal the root key with a raw 32-byte key in this file (32 bytes or
        /// 64 hex digits) instead of a passphrase.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["raw_key_env", "passphrase_file"])]
        raw_key_file: Option<PathBuf>,
        /// Seal the root key with a raw key (64 hex digits) read from this
        /// environment variable instead of a passphrase.
        #[arg(long, value_name = "VAR", conflicts_with_all = ["raw_key_file", "passphrase_file"])]
        raw_key_env: Option<String>,
    },
    /// Unseal the root key, open the store and every data key, and report.
    /// Exits 78 if the passphrase or key is wrong or a file is damaged.
    Check {
        /// The vault's config.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Debug, clap::Args)]
struct SecretArgs {
    /// Read the passphrase from this file instead of `PIIVAULT_PASSPHRASE`.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
}

/// How a command failed, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Usage,
    Config,
    Other,
}

impl Failure {
    fn code(self) -> u8 {
        match self {
            Self::Usage => 64,
            Self::Config => 78,
            Self::Other => 1,
        }
    }
}

struct CliError {
    failure: Failure,
    error: anyhow::Error,
}

trait Classify<T> {
    fn or_fail(self, failure: Failure) -> Result<T, CliError>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn or_fail(self, failure: Failure) -> Result<T, CliError> {
        self.map_err(|e| CliError { failure, error: e.into() })
    }
}

fn store_failure(error: &StoreError) -> Failure {
    if error.is_unavailable() { Failure::Other } else { Failure::Config }
}

fn vault_failure(error: &VaultError) -> Failure {
    match error {
        VaultError::Store(e) => store_failure(e),
        VaultError::Keyring { .. } => Failure::Config,
        _ => Failure::Other,
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap prints to stdout.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("bad usage");
            report(&format!("{first} (see `piivault --help`)"));
            return ExitCode::from(Failure::Usage.code());
        }
    };
    init_logging();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .or_fail(Failure::Other)
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("{:#}", e.error));
            ExitCode::from(e.failure.code())
        }
    }
}

/// One line on stderr, whatever the error's own formatting.
fn report(message: &str) {
    let line = message.replace('\n', " ");
    let _ = writeln!(std::io::stderr().lock(), "piivault: {line}");
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIIVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init { data_dir, secret, raw_key_file, raw_key_env } => {
            let source = match (raw_key_file, raw_key_env) {
                (Some(file), _) => RootKeySource::RawKeyFile(
                    std::path::absolute(&file)
                        .with_context(|| format!("{}", file.display()))
                        .or_fail(Failure::Usage)?,
                ),
                (None, Some(var)) => RootKeySource::RawKeyEnv(var),
                (None, None) => RootKeySource::Passphrase,
            };
            init(&data_dir, &source, &secret, true).await
        }
        Command::Check { config, secret } => check(&config, &secret).await,
    }
}

/// Resolves the secret that unseals the root key for `source`.
fn unlock_for(source: &RootKeySource, secret: &SecretArgs, confirm: bool) -> Result<Unlock, CliError> {
    match source {
        RootKeySource::Passphrase => read_passphrase(secret, confirm).map(Unlock::Passphrase),
        RootKeySource::RawKeyFile(path) => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("cannot read the raw root key file {}", path.display()))
                    .or_fail(Failure::Config)?,
            );
            RawKey::parse(&bytes).map(Unlock::RawKey).or_fail(Failure::Config)
        }
        RootKeySource::RawKeyEnv(var) => {
            let text = zeroize::Zeroizing::new(
                std::env::var(var)
                    .map_err(|_| anyhow!("the raw root key variable ${var} is not set"))
                    .or_fail(Failure::Config)?,
            );
            RawKey::parse(text.as_bytes()).map(Unlock::RawKey).or_fail(Failure::Config)
        }
    }
}

fn read_passphrase(secret: &SecretArgs, confirm: bool) -> Result<Passphrase, CliError> {
    let text = if let Some(path) = &secret.passphrase_file {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the passphrase file {}", path.display()))
            .or_fail(Failure::Config)?;
        String::from_utf8(bytes).map_err(|_| anyhow!("the passphrase file is not UTF-8")).or_fail(Failure::Config)?
    } else if let Ok(text) = std::env::var(PASSPHRASE_ENV) {
        text
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("piivault passphrase: ").or_fail(Failure::Other)?;
        if confirm {
            let second = zeroize::Zeroizing::new(rpassword::prompt_password("again: ").or_fail(Failure::Other)?);
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

/// `piivault init`: creates the data directory, config, sealed root key and
/// store. Leaves nothing behind if any step fails.
async fn init(data_dir: &Path, source: &RootKeySource, secret: &SecretArgs, confirm: bool) -> Result<(), CliError> {
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
    let unlock = unlock_for(source, secret, confirm)?;
    datadir::create_private_dir(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))
        .or_fail(Failure::Other)?;

    let created = [CONFIG_FILE, SEALED_ROOT_FILE, DATABASE_FILE].map(|f| data_dir.join(f));
    let result = write_new_vault(data_dir, source, &unlock).await;
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

async fn write_new_vault(data_dir: &Path, source: &RootKeySource, unlock: &Unlock) -> Result<Vault, CliError> {
    let config_text = Config::sample(source);
    let config = Config::parse(&config_text, data_dir).or_fail(Failure::Config)?;
    datadir::write_private_file(&data_dir.join(CONFIG_FILE), config_text.as_bytes())
        .context("cannot write config.toml")
        .or_fail(Failure::Other)?;
    let (root_key, sealed) = root::create(unlock, root::DEFAULT_KDF).or_fail(Failure::Other)?;
    datadir::write_private_file(&config.sealed_root, &sealed)
        .context("cannot write root.sealed")
        .or_fail(Failure::Other)?;
    Vault::create(&config, &root_key).await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })
}

/// Loads the config and unseals the root key it names.
fn load_and_unseal(config_path: &Path, secret: &SecretArgs) -> Result<(Config, RootKey), CliError> {
    let config = Config::load(config_path).or_fail(Failure::Config)?;
    let sealed = std::fs::read(&config.sealed_root)
        .with_context(|| format!("cannot read the sealed root key {}", config.sealed_root.display()))
        .or_fail(Failure::Config)?;
    let unlock = unlock_for(&config.root_key, secret, false)?;
    let root = root::unseal(&sealed, &unlock).map_err(|e: CryptoError| CliError {
        failure: Failure::Config,
        error: anyhow::Error::new(e).context(config.sealed_root.display().to_string()),
    })?;
    Ok((config, root))
}

/// `piivault check`: proves the passphrase, the sealed root, the store and
/// every data key are in order, without serving.
async fn check(config_path: &Path, secret: &SecretArgs) -> Result<(), CliError> {
    let (config, root) = load_and_unseal(config_path, secret)?;
    let vault = Vault::open(&config, &root).await.map_err(|e| CliError {
        failure: vault_failure(&e),
        error: anyhow::Error::new(e).context(config.database.display().to_string()),
    })?;
    let counts = vault.record_counts().await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    let summary: Vec<String> = counts.iter().map(|(name, n)| format!("{name}={n}")).collect();
    let _ = writeln!(std::io::stdout().lock(), "ok: root key unsealed, store open, records: {}", summary.join(" "));
    Ok(())
}
