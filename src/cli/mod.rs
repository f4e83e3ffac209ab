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

use crate::config::{CONFIG_FILE, Config, LogFormat, RootKeySource};
use crate::crypto::root::{self};
use crate::error::VaultError;
use crate::store::StoreError;
use crate::vault::Vault;

mod audit;
mod bench;
mod certs;
mod client;
mod init;
mod keys;
mod secrets;
mod serve;

use audit::AuditCommand;
use certs::CertsCommand;
use init::NewVault;
use keys::KeysCommand;
use serve::{DEV_PASSPHRASE_FILE, MetricsAddr};

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
        #[command(flatten)]
        pkcs11: secrets::Pkcs11InitArgs,
        #[command(flatten)]
        postgres: PostgresInitArgs,
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
    /// Serve the vault over gRPC with mutual TLS. SIGHUP reloads the policy
    /// and the CRL; SIGTERM or SIGINT stop it gracefully.
    Serve {
        /// The vault's config.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// Serve Prometheus metrics here instead of `server.metrics_listen`
        /// (`none`: no metrics endpoint).
        #[arg(long, value_name = "ADDR", value_parser = MetricsAddr::parse)]
        metrics_listen: Option<MetricsAddr>,
    },
    /// One command to a working development vault on 127.0.0.1: creates the
    /// data directory if needed (sample collections, callers writer, reader,
    /// support, admin and auditor with certificates), then serves.
    /// DEVELOPMENT ONLY: the passphrase is kept in clear in the directory.
    Dev {
        /// The data directory, created if missing, reused otherwise.
        #[arg(long, value_name = "DIR", default_value = "./piivault-dev")]
        data_dir: PathBuf,
        /// Address to listen on (port 0 picks a free port). Recorded in
        /// DIR/dev-address while serving, so that `--data-dir DIR --as NAME`
        /// finds the vault without `--addr`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Serve Prometheus metrics here (default in dev: a free loopback
        /// port, printed at start; `none`: no metrics endpoint).
        #[arg(long, value_name = "ADDR", value_parser = MetricsAddr::parse)]
        metrics_listen: Option<MetricsAddr>,
    },
    /// Manage caller certificates issued by the vault CA.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Online key management, as a caller with the `admin` grant.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check and read the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Swap values for tokens: one per line on stdin (values given as
    /// arguments are visible to every local user in /proc).
    Tokenize(client::ItemsArgs),
    /// Swap tokens back for values (tokens as arguments, or one per line on stdin).
    Detokenize(client::ItemsArgs),
    /// Delete the values behind tokens.
    Delete(client::ItemsArgs),
    /// Load-test a running vault over mutual TLS: seed N tokens, run one
    /// operation from many concurrent callers for a bounded time, report
    /// throughput, latency percentiles, errors and (with --server-pid) the
    /// server's CPU per request and peak RSS.
    Bench(bench::BenchArgs),
    /// The store itself: moving a vault to another backend.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Copy the whole store from a running vault, consistently, while
    /// traffic continues (as an admin). Restore: stop the vault, put the
    /// file in place as vault.db (no -wal or -shm beside it), start it with
    /// the same root.sealed and passphrase.
    Backup {
        /// Where to write the copy (must not exist; written 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a SQLite vault's whole store into an empty PostgreSQL database:
    /// every token, key version and audit record, from one snapshot of the
    /// file (the vault may serve meanwhile; what it writes after the
    /// snapshot is not copied). Then point the vault's config at the
    /// database (the command prints the `[store]` lines) and start it.
    Copy {
        /// The SQLite vault's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        postgres: PostgresInitArgs,
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
        VaultError::Keyring { .. } | VaultError::FormatChanged { .. } => Failure::Config,
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
    // Secrets in the environment leave it before any thread exists.
    let named_by_flags = match &cli.command {
        Command::Init { pkcs11, raw_key_env, postgres, .. } => {
            [pkcs11.pkcs11_pin_env.as_deref(), raw_key_env.as_deref(), postgres.postgres_password_env.as_deref()]
        }
        Command::Store { command: StoreCommand::Copy { postgres, .. } } => {
            [None, None, postgres.postgres_password_env.as_deref()]
        }
        _ => [None, None, None],
    };
    secrets::take_from_env(secrets::secret_variables(config_path_of(&cli.command).as_deref(), &named_by_flags));
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

/// The config file a command opens a vault with, if any.
fn config_path_of(command: &Command) -> Option<PathBuf> {
    match command {
        Command::Serve { config, .. } | Command::Check { config, .. } => Some(config.clone()),
        Command::Keys { command: KeysCommand::RotateRoot { connect, .. } } => {
            connect.offline_dir().map(|dir| dir.join(CONFIG_FILE))
        }
        Command::Audit { command: AuditCommand::Verify { data_dir, .. } } => Some(data_dir.join(CONFIG_FILE)),
        Command::Audit { command: AuditCommand::Query { connect, .. } | AuditCommand::Export { connect, .. } } => {
            connect.offline_dir().map(|dir| dir.join(CONFIG_FILE))
        }
        _ => None,
    }
}

/// One line on stderr, whatever the error's own formatting.
fn report(message: &str) {
    let line = message.replace('\n', " ");
    let _ = writeln!(std::io::stderr().lock(), "piivault: {line}");
}

fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIIVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Prints one line on stdout (the command's result).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run(command: Command) -> Result<(), CliError> {
    let serving = matches!(command, Command::Serve { .. } | Command::Dev { .. });
    if !serving {
        init_logging("warn", LogFormat::Text);
    }
    match command {
        Command::Init { data_dir, secret, raw_key_file, raw_key_env, pkcs11, postgres } => {
            let absolute = |file: &Path| {
                std::path::absolute(file).with_context(|| format!("{}", file.display())).or_fail(Failure::Usage)
            };
            let hsm = match (&pkcs11.pkcs11_module, &pkcs11.pkcs11_token_label) {
                (Some(module), Some(label)) => Some(crate::config::Pkcs11Settings {
                    module: absolute(module)?,
                    token: crate::crypto::pkcs11::TokenSelector::Label(label.clone()),
                    pin: match (&pkcs11.pkcs11_pin_file, &pkcs11.pkcs11_pin_env) {
                        (Some(file), _) => crate::config::SecretSource::File(absolute(file)?),
                        (None, Some(var)) => crate::config::SecretSource::Env(var.clone()),
                        (None, None) => {
                            return Err(anyhow!("--pkcs11-module needs --pkcs11-pin-file or --pkcs11-pin-env"))
                                .or_fail(Failure::Usage);
                        }
                    },
                }),
                _ => None,
            };
            let source = match (raw_key_file, raw_key_env, &hsm) {
                (Some(file), _, _) => RootKeySource::RawKeyFile(absolute(&file)?),
                (None, Some(var), _) => RootKeySource::RawKeyEnv(var),
                (None, None, Some(_)) => RootKeySource::Pkcs11,
                (None, None, None) => RootKeySource::Passphrase,
            };
            let postgres = postgres.settings(absolute)?;
            let new = NewVault { source, pkcs11: hsm, key_label: pkcs11.pkcs11_key_label, postgres };
            init::init(&data_dir, &new, &secret, true).await
        }
        Command::Check { config, secret } => init::check(&config, &secret).await,
        Command::Serve { config, secret, metrics_listen } => serve::serve(&config, &secret, metrics_listen).await,
        Command::Dev { data_dir, listen, metrics_listen } => serve::dev(&data_dir, listen, metrics_listen).await,
        Command::Certs { command } => certs::certs(command),
        Command::Audit { command } => audit::audit(command).await,
        Command::Keys { command } => keys::keys(command).await,
        Command::Tokenize(args) => client::run(client::Op::Tokenize, args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Backup { out, connect } => keys::backup(&out, &connect).await,
        Command::Store { command: StoreCommand::Copy { data_dir, postgres } } => {
            let absolute = |file: &Path| {
                std::path::absolute(file).with_context(|| format!("{}", file.display())).or_fail(Failure::Usage)
            };
            let Some(settings) = postgres.settings(absolute)? else {
                return Err(CliError { failure: Failure::Usage, error: anyhow::anyhow!("give --postgres-url") });
            };
            store_copy(&data_dir, &settings)
        }
        Command::Detokenize(args) => client::run(client::Op::Detokenize, args).await,
        Command::Delete(args) => client::run(client::Op::Delete, args).await,
    }
}

/// `init` into a PostgreSQL database instead of a SQLite file.
#[derive(clap::Args, Debug)]
pub struct PostgresInitArgs {
    /// Keep the records in this PostgreSQL database, which must be empty:
    /// `postgresql://user@host:port/database`, without a password.
    #[arg(long, value_name = "URL")]
    postgres_url: Option<String>,
    /// The database password, from this file (0600).
    #[arg(long, value_name = "FILE", requires = "postgres_url", conflicts_with = "postgres_password_env")]
    postgres_password_file: Option<PathBuf>,
    /// The database password, from this environment variable.
    #[arg(long, value_name = "VAR", requires = "postgres_url")]
    postgres_password_env: Option<String>,
    /// Require TLS to the database, its certificate signed by this CA.
    #[arg(long, value_name = "FILE", requires = "postgres_url")]
    postgres_ca_file: Option<PathBuf>,
    /// This node's name: the audit chain it writes. Every node on one
    /// database has its own.
    #[arg(long, value_name = "NAME", requires = "postgres_url", default_value = crate::config::DEFAULT_NODE)]
    node: String,
}

impl PostgresInitArgs {
    /// The `[store]` settings these flags give, if any (paths made absolute).
    fn settings(
        self,
        absolute: impl Fn(&Path) -> Result<PathBuf, CliError>,
    ) -> Result<Option<crate::config::PostgresSettings>, CliError> {
        let Some(url) = self.postgres_url else { return Ok(None) };
        let password = match (self.postgres_password_file, self.postgres_password_env) {
            (Some(file), _) => Some(crate::config::SecretSource::File(absolute(&file)?)),
            (None, Some(var)) => Some(crate::config::SecretSource::Env(var)),
            (None, None) => None,
        };
        let ca_file = self.postgres_ca_file.as_deref().map(absolute).transpose()?;
        Ok(Some(crate::config::PostgresSettings { url, password, ca_file, node: self.node }))
    }
}

/// `piivault store copy`: the SQLite store of the vault in `data_dir` into
/// the database `settings` name; prints what moved and the `[store]`
/// lines that serve from it.
fn store_copy(data_dir: &Path, settings: &crate::config::PostgresSettings) -> Result<(), CliError> {
    let config = load_config(&data_dir.join(crate::config::CONFIG_FILE))?;
    let crate::config::StoreBackend::Sqlite { path } = &config.store_backend else {
        return Err(CliError {
            failure: Failure::Usage,
            error: anyhow::anyhow!("this vault's store is not a SQLite file: nothing to copy"),
        });
    };
    let copied = crate::store::postgres::copy_from_sqlite(path, settings)
        .map_err(|e| CliError { failure: store_failure(&e), error: anyhow::Error::new(e).context("store copy") })?;
    say(&format!(
        "copied {} records, {} key versions and {} audit records into the database (audit chain {})",
        copied.rows("records"),
        copied.rows("keys") + copied.rows("vault_keys"),
        copied.rows("audit"),
        settings.node
    ));
    say(&format!(
        "to serve from it, stop the vault, replace the [store] table of {} with these lines, and start it:\n[store]\n{}",
        data_dir.join(crate::config::CONFIG_FILE).display(),
        settings.table_lines()
    ));
    Ok(())
}

/// Loads a config file (exit 78 when it is wrong).
fn load_config(config_path: &Path) -> Result<Config, CliError> {
    Config::load(config_path).or_fail(Failure::Config)
}

/// Unseals the root key named by `config` and opens the vault.
///
/// An interrupted root-key rotation is completed or undone by
/// [`crate::vault::unseal::open_sealed`]. An unseal that serves
/// or changes the vault is recorded on the audit trail, with its provider
/// ([`Unseal::Recorded`]); the read-only audit commands do not write to the
/// trail they read.
async fn open_vault(config: &Config, secret: &SecretArgs, unseal: Unseal) -> Result<Vault, CliError> {
    use crate::vault::unseal::UnsealError;
    let mut unlocks = secrets::Unlocks::new(config, secret);
    match crate::vault::unseal::open_sealed(config, &mut unlocks).await {
        Ok((vault, provider)) => unsealed(config, vault, provider, &unlocks, unseal).await,
        Err(failure) => {
            let at = |path: &Path, error: anyhow::Error| CliError {
                failure: Failure::Config,
                error: error.context(path.display().to_string()),
            };
            let mut error = match failure.error {
                UnsealError::Unreadable(e) => CliError {
                    failure: Failure::Config,
                    error: anyhow::Error::new(e)
                        .context(format!("cannot read the sealed root key {}", config.sealed_root.display())),
                },
                UnsealError::Sealed { path, error } => at(&path, error.into()),
                UnsealError::Secret { path, error } => at(&path, error.error),
                UnsealError::Vault(e) => CliError {
                    failure: vault_failure(&e),
                    error: anyhow::Error::new(e).context(config.store_backend.to_string()),
                },
                UnsealError::Finish(e) => CliError { failure: Failure::Other, error: e.into() },
            };
            if let Some(pending) = failure.pending {
                error.error = error.error.context(format!(
                    "an interrupted root-key rotation left {}: try the other (old or new) secret",
                    pending.display()
                ));
            }
            Err(error)
        }
    }
}

/// Whether opening a vault puts the unseal on its audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unseal {
    /// Serving, checking, or changing keys.
    Recorded,
    /// Reading the audit trail offline.
    ReadOnly,
}

/// After an unseal: the token kept for rotations, the audit record, and a
/// warning when config.toml names another provider than root.sealed.
async fn unsealed(
    config: &Config,
    vault: Vault,
    provider: root::Provider,
    unlocks: &secrets::Unlocks<'_>,
    unseal: Unseal,
) -> Result<Vault, CliError> {
    let hsm = match (unlocks.hsm(), &config.pkcs11) {
        (Some(hsm), _) => Some(hsm),
        (None, Some(_)) => Some(secrets::configured_hsm(config)?),
        (None, None) => None,
    };
    if let Some(hsm) = hsm {
        vault.attach_hsm(hsm);
    }
    let configured = config.root_key.provider();
    if configured != provider {
        tracing::warn!(
            sealed_by = provider.as_str(),
            configured = configured.as_str(),
            "root.sealed is sealed by another provider than [root_key] provider names (after a rotation between providers): update config.toml"
        );
    }
    if unseal == Unseal::Recorded {
        vault.record_unseal(provider).await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    }
    Ok(vault)
}

/// The secret for an offline command on `data_dir`: as given, or a dev
/// vault's own passphrase file.
fn offline_secret(data_dir: &Path, secret: SecretArgs) -> SecretArgs {
    let dev = data_dir.join(DEV_PASSPHRASE_FILE);
    if secret.passphrase_file.is_none() && !secrets::env_has(PASSPHRASE_ENV) && dev.exists() {
        SecretArgs { passphrase_file: Some(dev) }
    } else {
        secret
    }
}

/// Opens a local vault for an offline audit command.
async fn open_offline(data_dir: &Path, secret: SecretArgs, unseal: Unseal) -> Result<Vault, CliError> {
    let secret = offline_secret(data_dir, secret);
    let config = load_config(&data_dir.join(CONFIG_FILE))?;
    open_vault(&config, &secret, unseal).await
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// clap checks the whole definition (unique names, conflicts, ...) here
    /// instead of panicking at run time.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Audit filters name actions and outcomes the trail can hold: a typo
    /// is a usage error, not an empty answer.
    #[test]
    fn audit_filters_take_known_names_only() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["piivault", "audit", "query", "--data-dir", "/d"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|_| ()).map_err(|e| e.kind())
        };
        assert_eq!(parse(&["--action", "detokenize_masked", "--outcome", "PERMISSION_DENIED"]), Ok(()));
        assert_eq!(parse(&["--action", "detokenise"]), Err(clap::error::ErrorKind::InvalidValue));
        assert_eq!(parse(&["--outcome", "ok"]), Err(clap::error::ErrorKind::InvalidValue));
        for event in crate::audit::Event::ALL {
            assert_eq!(crate::audit::Event::parse(event.as_str()), Some(*event));
        }
        for outcome in crate::audit::Outcome::ALL {
            assert_eq!(crate::audit::Outcome::parse(outcome.as_str()), Some(*outcome));
        }
    }
}
