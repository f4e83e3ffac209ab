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

use crate::config::{CONFIG_FILE, Config, DATABASE_FILE, LogFormat, RootKeySource, SEALED_ROOT_FILE};
use crate::crypto::root::{self, Passphrase, RawKey, Unlock};
use crate::datadir;
use crate::error::VaultError;
use crate::grpc::server::{self as grpc_server, Live};
use crate::pki::{self, Ca};
use crate::policy::{CallerId, EMPTY_POLICY};
use crate::store::StoreError;
use crate::vault::Vault;

mod bench;
mod client;
mod secrets;

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
enum AuditCommand {
    /// Verify the whole HMAC chain offline; exits 1 naming the first bad
    /// record. With `--expect-head SEQ:MAC` (from an earlier `audit head`,
    /// kept elsewhere) a truncated trail is detected too.
    Verify {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A head recorded earlier: the trail must still contain it.
        #[arg(long, value_name = "SEQ:MAC")]
        expect_head: Option<String>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Records matching the filters, oldest first (needs the `audit` grant
    /// online; reads the file with `--data-dir DIR` alone).
    Query {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Most records to print.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Every record, as JSON lines.
    Export {
        /// Output format.
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        format: String,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Print the head of the trail (`SEQ:MAC`) for anchoring elsewhere.
    Head {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Key versions (data keys, then blind-index keys) with state, live
    /// records (index entries) and encryptions.
    List {
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// A new primary data key for a collection; older versions keep
    /// decrypting.
    Rotate {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// A version suspected leaked: marked compromised (never encrypts
        /// again), replaced by a new primary, and re-encryption starts.
        #[arg(long, value_name = "VERSION")]
        compromised: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// A new primary blind-index key for a deterministic collection; the
    /// index is rebuilt under it in the background while lookups go on,
    /// then the older index keys are destroyed.
    RotateIndex {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// Move a collection's records onto the primary version, in batches,
    /// while traffic continues. Safe to interrupt and run again.
    Reencrypt {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// Records per transaction.
        #[arg(long, default_value_t = 500)]
        batch: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// Replace the root key: a new one sealed under a new passphrase (or raw
    /// key), every wrapped key re-wrapped at once; the old passphrase stops
    /// working. Online as an admin, or offline on a stopped vault with
    /// `--data-dir DIR` alone (the old passphrase from `PIIVAULT_PASSPHRASE`,
    /// `--passphrase-file` or the terminal).
    RotateRoot {
        /// Read the new passphrase from this file (else prompted twice).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Seal the new root key with a raw key (32 bytes or 64 hex digits)
        /// from this file. Then set `[root_key] provider = "raw"` with
        /// `key_file` or `key_env` in config.toml before the next start.
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_raw_key_file: Option<PathBuf>,
        /// Seal the new root key in the PKCS#11 token of `[root_key.pkcs11]`
        /// (the server's, online) under the AES key with this label: used
        /// if the token holds it (sensitive, non-extractable), else created.
        #[arg(long, value_name = "LABEL", conflicts_with_all = ["new_passphrase_file", "new_raw_key_file"])]
        new_pkcs11_key_label: Option<String>,
        /// Online, for a vault sealed with a raw key: the current one, as
        /// proof (a passphrase-sealed vault's proof is the passphrase, from
        /// `PIIVAULT_PASSPHRASE`, `--passphrase-file` or a dev directory).
        #[arg(long, value_name = "FILE", conflicts_with = "current_pkcs11_pin_file")]
        current_raw_key_file: Option<PathBuf>,
        /// Online, for a vault sealed in a PKCS#11 token: a file holding the
        /// token's user PIN, as proof.
        #[arg(long, value_name = "FILE")]
        current_pkcs11_pin_file: Option<PathBuf>,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Destroy a version's wrapped key (refused while records use it).
    Retire {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// The version to destroy (`--version` is the program's own version).
        #[arg(long, value_name = "N")]
        key_version: u32,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
}

#[derive(Debug, clap::Args)]
struct AuditFilterArgs {
    /// Records involving this token.
    #[arg(long)]
    token: Option<String>,
    /// Records of this caller.
    #[arg(long)]
    caller: Option<String>,
    /// Records of this action (`tokenize`, `detokenize`,
    /// `detokenize_masked`, `delete`, `audit_query`, `handshake`, ...).
    #[arg(long)]
    action: Option<String>,
    /// Records on this collection.
    #[arg(long)]
    collection: Option<String>,
    /// Records with this outcome (`OK`, `PERMISSION_DENIED`,
    /// `UNAUTHENTICATED`, `REFUSED`, ...).
    #[arg(long)]
    outcome: Option<String>,
    /// Records at or after this time (RFC 3339, e.g. 2026-11-29T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
}

/// RFC 3339 to unix microseconds.
fn parse_time(text: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time such as 2026-11-29T14:00:00Z"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).map_err(|_| "time out of range".to_owned())
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the vault CA if missing and (re)issue the server certificate.
    Init {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// DNS names or IP addresses for the server certificate (repeat the
        /// flag); default: `server.server_names` from config.toml.
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
    },
    /// Issue a certificate for caller NAME: spiffe://<trust-domain>/NAME.
    Issue {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The caller's name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Days of validity.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Where to write cert.pem and key.pem (default DIR/clients/NAME).
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
    },
    /// Revoke certificates by caller name or serial; writes pki/crl.pem.
    /// Send SIGHUP to a running server to apply it.
    Revoke {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A caller name (revokes all its certificates) or a serial number.
        #[arg(value_name = "NAME_OR_SERIAL")]
        selector: String,
    },
    /// List issued certificates.
    List {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
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
        Command::Init { pkcs11, raw_key_env, .. } => [pkcs11.pkcs11_pin_env.as_deref(), raw_key_env.as_deref()],
        _ => [None, None],
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
        Command::Init { data_dir, secret, raw_key_file, raw_key_env, pkcs11 } => {
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
            let new = NewVault { source, pkcs11: hsm, key_label: pkcs11.pkcs11_key_label };
            init(&data_dir, &new, &secret, true).await
        }
        Command::Check { config, secret } => check(&config, &secret).await,
        Command::Serve { config, secret, metrics_listen } => serve(&config, &secret, metrics_listen).await,
        Command::Dev { data_dir, listen, metrics_listen } => dev(&data_dir, listen, metrics_listen).await,
        Command::Certs { command } => certs(command),
        Command::Audit { command } => audit(command).await,
        Command::Keys { command } => keys(command).await,
        Command::Tokenize(args) => client::run(client::Op::Tokenize, args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Backup { out, connect } => backup(&out, &connect).await,
        Command::Detokenize(args) => client::run(client::Op::Detokenize, args).await,
        Command::Delete(args) => client::run(client::Op::Delete, args).await,
    }
}

/// The new passphrase of a root-key rotation: from `--new-passphrase-file`,
/// or typed twice on a terminal. Never from argv or the environment (which
/// holds the old one).
fn read_new_passphrase(secret: &SecretArgs) -> Result<Passphrase, CliError> {
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
struct NewVault {
    source: RootKeySource,
    pkcs11: Option<crate::config::Pkcs11Settings>,
    /// The PKCS#11 key that seals the root key (pkcs11 only).
    key_label: String,
}

/// `piivault init`: creates the data directory, config, sealed root key and
/// store. Leaves nothing behind if any step fails.
async fn init(data_dir: &Path, new: &NewVault, secret: &SecretArgs, confirm: bool) -> Result<(), CliError> {
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
    let config_text = Config::sample(&new.source, new.pkcs11.as_ref());
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

async fn write_new_vault(config: &Config, config_text: &str, unlock: &Unlock) -> Result<Vault, CliError> {
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

/// `piivault check`: proves the passphrase, the sealed root, the store and
/// every data key are in order, without serving.
async fn check(config_path: &Path, secret: &SecretArgs) -> Result<(), CliError> {
    let config = load_config(config_path)?;
    let vault = open_vault(&config, secret, Unseal::Recorded).await?;
    let counts = vault.record_counts().await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    let summary: Vec<String> = counts.iter().map(|(name, n)| format!("{name}={n}")).collect();
    say(&format!("ok: root key unsealed, store open, records: {}", summary.join(" ")));
    Ok(())
}

/// The signals a server handles, registered before it announces that it is
/// listening: a signal that arrives earlier would otherwise take its default
/// action and kill the process.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Completes on SIGTERM or SIGINT.
async fn termination(mut terminate: tokio::signal::unix::Signal, mut interrupt: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}

/// `--metrics-listen`: an address, or none at all.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<std::net::SocketAddr>);

impl MetricsAddr {
    fn parse(text: &str) -> Result<Self, String> {
        crate::config::parse_metrics_listen(text).map(Self)
    }
}

/// Where to listen, when the command line says otherwise than the config.
#[derive(Debug, Clone, Copy, Default)]
struct ListenOverride {
    grpc: Option<std::net::SocketAddr>,
    metrics: Option<MetricsAddr>,
}

/// Opens the vault, binds, and serves until SIGTERM/SIGINT; SIGHUP reloads
/// policy and CRL. `on_ready` is told the bound address. The metrics
/// endpoint comes up first, saying `sealed 1` until the vault is open.
async fn run_server(
    config: &Config,
    secret: &SecretArgs,
    listen: ListenOverride,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), CliError> {
    // Policy and TLS material first: a configuration error stops the start
    // before the store is touched.
    let live = std::sync::Arc::new(Live::load(config).or_fail(Failure::Config)?);
    let exporter = crate::metrics::Exporter::new();
    let metrics_task = match listen.metrics.map_or(config.server.metrics_listen, |m| m.0) {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr} (server.metrics_listen)"))
                .or_fail(Failure::Other)?;
            let bound = listener.local_addr().or_fail(Failure::Other)?;
            if !bound.ip().is_loopback() {
                tracing::warn!(%bound, "metrics are served on a non-loopback address, over plain HTTP");
            }
            say(&format!("piivault: metrics on http://{bound}/metrics"));
            let exporter = exporter.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, exporter).await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            }))
        }
    };
    let vault = open_vault(config, secret, Unseal::Recorded).await?;
    exporter.unsealed(vault.clone());
    let listener = grpc_server::bind(listen.grpc.unwrap_or(config.server.listen)).await.or_fail(Failure::Other)?;
    let addr = listener.local_addr().or_fail(Failure::Other)?;
    let Signals { mut hangup, terminate, interrupt } = Signals::register().or_fail(Failure::Other)?;
    let reloader = live.clone();
    let sink_vault = vault.clone();
    let hangups = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading policy and TLS material");
            sink_vault.reopen_audit_sink();
            let _ = reloader.reload();
        }
    });
    let upkeep = spawn_upkeep(config, &vault, &live);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        termination(terminate, interrupt).await;
        let _ = stop.send(true);
    });
    tracing::info!(%addr, collections = %vault.collection_names().join(","), "serving");
    on_ready(addr);
    let signalled = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let serving = grpc_server::serve(config, vault, live, listener, signalled(stopping.clone()));
    let drain_deadline = async {
        signalled(stopping).await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    let served = tokio::select! {
        served = serving => served,
        () = drain_deadline => {
            tracing::warn!("connections still open {} s after the stop signal; closing them", SHUTDOWN_DRAIN.as_secs());
            Ok(())
        }
    };
    hangups.abort();
    for task in upkeep.into_iter().chain(metrics_task) {
        task.abort();
    }
    served.or_fail(Failure::Other)?;
    tracing::info!("stopped");
    Ok(())
}

/// The server's periodic work, until aborted: reloading changed policy and
/// TLS files, and the vault's own background work
/// ([`Vault::spawn_background`]).
fn spawn_upkeep(config: &Config, vault: &Vault, live: &std::sync::Arc<Live>) -> Vec<tokio::task::JoinHandle<()>> {
    // The same reload when policy.toml or a file in pki/ changes, without
    // a signal (a watcher by polling: no platform-specific notification).
    let reload_live = live.clone();
    let watch_every = config.server.reload_check_interval;
    let file_watch = tokio::spawn(async move {
        let mut last = reload_live.files_stamp();
        loop {
            tokio::time::sleep(watch_every).await;
            let now = reload_live.files_stamp();
            if now != last {
                tracing::info!("policy or TLS files changed: reloading");
                let _ = reload_live.reload();
                last = now;
            }
        }
    });
    let mut jobs = vault.spawn_background(config);
    jobs.push(file_watch);
    jobs
}

/// How long requests in flight get to finish after SIGTERM/SIGINT.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// `piivault serve`.
async fn serve(config_path: &Path, secret: &SecretArgs, metrics: Option<MetricsAddr>) -> Result<(), CliError> {
    let config = load_config(config_path)?;
    init_logging("info", config.server.log_format);
    let listen = ListenOverride { grpc: None, metrics };
    run_server(&config, secret, listen, |addr| say(&format!("piivault: listening on {addr}"))).await
}

/// Dev mode's passphrase file: the one place a passphrase is ever stored.
const DEV_PASSPHRASE_FILE: &str = "dev-passphrase";

/// The callers dev mode creates, with their grants.
const DEV_POLICY: &str = "\
# Development policy written by `piivault dev`. Anything not granted is denied.
[callers.writer]
tokenize = [\"*\"]
delete = [\"*\"]

[callers.reader]
detokenize = [\"*\"]

[callers.support]
detokenize_masked = [\"*\"]

[callers.admin]
admin = true
backup = true
rotate_root = true

[callers.auditor]
audit = true
";

/// `piivault dev`.
async fn dev(
    data_dir: &Path,
    listen: Option<std::net::SocketAddr>,
    metrics: Option<MetricsAddr>,
) -> Result<(), CliError> {
    init_logging("info", LogFormat::Text);
    let passphrase_path = data_dir.join(DEV_PASSPHRASE_FILE);
    let config_path = data_dir.join(CONFIG_FILE);
    if !config_path.exists() {
        let mut bytes = zeroize::Zeroizing::new([0u8; 24]);
        crate::crypto::fill_random(bytes.as_mut_slice()).or_fail(Failure::Other)?;
        let passphrase = zeroize::Zeroizing::new(hex::encode(bytes.as_slice()));
        let secret = SecretArgs { passphrase_file: Some(passphrase_path.clone()) };
        datadir::create_private_dir(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))
            .or_fail(Failure::Other)?;
        datadir::write_private_file(&passphrase_path, passphrase.as_bytes())
            .context("cannot write the dev passphrase")
            .or_fail(Failure::Other)?;
        let new = NewVault { source: RootKeySource::Passphrase, pkcs11: None, key_label: String::new() };
        init(data_dir, &new, &secret, false).await?;
        let config = Config::load(&config_path).or_fail(Failure::Config)?;
        let ca = Ca::load(data_dir).or_fail(Failure::Other)?;
        for name in ["writer", "reader", "support", "admin", "auditor"] {
            let caller: CallerId = name.parse().or_fail(Failure::Other)?;
            ca.issue(&caller, &config.server.trust_domain, 365, &data_dir.join("clients").join(name))
                .or_fail(Failure::Other)?;
        }
        let policy = &config.server.policy;
        std::fs::remove_file(policy).or_fail(Failure::Other)?;
        datadir::write_private_file(policy, DEV_POLICY.as_bytes()).or_fail(Failure::Other)?;
    } else if !passphrase_path.exists() {
        return Err(anyhow!(
            "{} holds a vault that `piivault dev` did not create (no {DEV_PASSPHRASE_FILE}); use `piivault serve`",
            data_dir.display()
        ))
        .or_fail(Failure::Config);
    }
    tracing::warn!(
        "DEVELOPMENT MODE: the passphrase is stored in clear in {}. Never put real personal data in this vault.",
        passphrase_path.display()
    );
    let secret = SecretArgs { passphrase_file: Some(passphrase_path) };
    let config = load_config(&config_path)?;
    let exe = std::env::current_exe().map_or_else(|_| "piivault".to_owned(), |p| p.display().to_string());
    let dir = data_dir.display().to_string();
    let address_file = data_dir.join(datadir::DEV_ADDRESS_FILE);
    // Metrics on a free port unless asked otherwise, so that two dev
    // vaults on one machine never collide; the address is printed.
    let metrics = metrics.or(Some(MetricsAddr(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))))));
    let served = run_server(&config, &secret, ListenOverride { grpc: listen, metrics }, |addr| {
        // Where the client finds this vault given only --data-dir.
        let _ = std::fs::remove_file(&address_file);
        if let Err(e) = datadir::write_private_file(&address_file, format!("{addr}\n").as_bytes()) {
            tracing::warn!(error = %e, "cannot record the dev vault's address; clients need --addr");
        }
        say(&format!("piivault: listening on {addr}"));
        say(&format!(
            "\npiivault dev is serving {dir} on {addr} (DEVELOPMENT ONLY; Ctrl-C stops it).\n\
             Try, from another shell:\n\
             \n  echo 4111111111111111 | {exe} tokenize --data-dir {dir} --as writer --collection card\n\
             \n  {exe} detokenize --data-dir {dir} --as reader --collection card <token from above>\n\
             \n  {exe} detokenize --data-dir {dir} --as support --collection card <token>   # masked\n\
             \nCallers and their certificates: {dir}/clients/{{writer,reader,support,admin,auditor}}; vault CA: {dir}/pki/ca.pem\n"
        ));
    })
    .await;
    let _ = std::fs::remove_file(&address_file);
    served
}

/// What `keys rotate-root` seals the new root key with.
enum NewRoot {
    /// A new passphrase, from this file or typed twice.
    Passphrase(Option<PathBuf>),
    /// A raw key from this file.
    RawKeyFile(PathBuf),
    /// The key of this label in the configured PKCS#11 token.
    Pkcs11(String),
}

/// What an online `keys rotate-root` proves the current secret with.
enum CurrentSecret {
    /// The passphrase (`--passphrase-file`, `PIIVAULT_PASSPHRASE`, a dev
    /// directory's, or typed).
    Passphrase,
    /// The raw key in this file.
    RawKeyFile(PathBuf),
    /// The PKCS#11 user PIN in this file.
    PinFile(PathBuf),
}

/// `piivault keys rotate-root`: offline on a stopped vault's directory, or
/// online through the Admin service with proof of the current secret. The
/// new provider may differ from the old one (passphrase, raw key, PKCS#11),
/// in both directions.
async fn rotate_root(
    target: NewRoot,
    proof: CurrentSecret,
    connect: &client::ConnectArgs,
    secret: SecretArgs,
) -> Result<(), CliError> {
    use crate::grpc::proto::{self, admin_client::AdminClient};
    let read_raw = |path: &Path| secrets::read_secret_file(path, "new raw key");
    let count = if let Some(dir) = connect.offline_dir() {
        let vault = open_offline(dir, secret, Unseal::Recorded).await?;
        let unlock = match &target {
            NewRoot::RawKeyFile(path) => {
                Unlock::RawKey(RawKey::parse(&read_raw(path)?).and_then(RawKey::strong).or_fail(Failure::Usage)?)
            }
            NewRoot::Passphrase(file) => {
                Unlock::Passphrase(read_new_passphrase(&SecretArgs { passphrase_file: file.clone() })?)
            }
            NewRoot::Pkcs11(label) => Unlock::Pkcs11(root::Pkcs11Unlock {
                hsm: vault
                    .hsm()
                    .ok_or_else(|| anyhow!("config.toml has no [root_key.pkcs11] table naming the token"))
                    .or_fail(Failure::Config)?,
                key_label: label.clone(),
            }),
        };
        let who = crate::vault::Requester::named("(offline rotate-root)");
        let count = vault
            .rotate_root(&who, &unlock, root::DEFAULT_KDF)
            .await
            .map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
        // A dev directory keeps its passphrase beside the vault:
        // keep it in step, or `piivault dev` could not start again.
        let dev_file = dir.join(DEV_PASSPHRASE_FILE);
        if let (Unlock::Passphrase(p), true) = (&unlock, dev_file.exists()) {
            std::fs::remove_file(&dev_file).or_fail(Failure::Other)?;
            datadir::write_private_file(&dev_file, p.expose_secret().as_bytes()).or_fail(Failure::Other)?;
        }
        count
    } else {
        let mut request = proto::RotateRootKeyRequest::default();
        match &target {
            NewRoot::RawKeyFile(path) => {
                request.new_raw_key_hex = String::from_utf8_lossy(read_raw(path)?.trim_ascii()).into_owned();
            }
            NewRoot::Passphrase(file) => read_new_passphrase(&SecretArgs { passphrase_file: file.clone() })?
                .expose_secret()
                .clone_into(&mut request.new_passphrase),
            NewRoot::Pkcs11(label) => request.new_pkcs11_key_label.clone_from(label),
        }
        match proof {
            CurrentSecret::RawKeyFile(path) => {
                let key = secrets::read_secret_file(&path, "current raw key")?;
                request.current_raw_key_hex = String::from_utf8_lossy(key.trim_ascii()).into_owned();
            }
            CurrentSecret::PinFile(path) => {
                let pin = secrets::read_secret_file(&path, "current PKCS#11 PIN")?;
                String::from_utf8_lossy(&pin)
                    .trim_end_matches(['\r', '\n'])
                    .clone_into(&mut request.current_pkcs11_pin);
            }
            CurrentSecret::Passphrase => {
                let secret = match &connect.data_dir {
                    Some(dir) => offline_secret(dir, secret),
                    None => secret,
                };
                secrets::read_passphrase(&secret, false)?.expose_secret().clone_into(&mut request.current_passphrase);
            }
        }
        let mut admin = AdminClient::new(client::channel(connect).await?);
        let count =
            admin.rotate_root_key(request).await.map_err(|s| client::status_error(&s))?.into_inner().keys_rewrapped;
        usize::try_from(count).unwrap_or(usize::MAX)
    };
    let sealed_by = match target {
        NewRoot::Passphrase(_) => "a passphrase".to_owned(),
        NewRoot::RawKeyFile(_) => "a raw key".to_owned(),
        NewRoot::Pkcs11(label) => format!("the PKCS#11 key {label:?}"),
    };
    say(&format!(
        "root key rotated: {count} keys re-wrapped, sealed by {sealed_by}; the old secret no longer opens this vault"
    ));
    Ok(())
}

/// Prints `keys list` output: a table, or JSON.
fn print_keys(listed: &crate::grpc::proto::ListKeysResponse, json: bool) {
    if json {
        let value: Vec<serde_json::Value> = listed
            .collections
            .iter()
            .flat_map(|c| {
                c.versions.iter().map(|v| {
                    serde_json::json!({
                        "collection": c.collection, "purpose": v.purpose, "version": v.version, "state": v.state,
                        "created_at_micros": v.created_at_micros, "records": v.records, "encryptions": v.encryptions,
                    })
                })
            })
            .collect();
        say(&serde_json::Value::Array(value).to_string());
    } else {
        say(&format!(
            "{:<16} {:<7} {:>7} {:<12} {:<20} {:>10} {:>12}",
            "COLLECTION", "PURPOSE", "VERSION", "STATE", "CREATED", "RECORDS", "ENCRYPTIONS"
        ));
        for c in &listed.collections {
            for v in &c.versions {
                say(&format!(
                    "{:<16} {:<7} {:>7} {:<12} {:<20} {:>10} {:>12}",
                    c.collection,
                    v.purpose,
                    v.version,
                    v.state,
                    crate::pki::format_time(v.created_at_micros / 1_000_000),
                    v.records,
                    v.encryptions
                ));
            }
        }
    }
}

/// `piivault backup`: streams a backup from the server into `out`, then
/// checks the copy is a whole piivault store.
async fn backup(out: &Path, connect: &client::ConnectArgs) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut admin = crate::grpc::proto::admin_client::AdminClient::new(client::channel(connect).await?)
        .max_decoding_message_size(8 << 20);
    let mut stream =
        admin.backup(crate::grpc::proto::BackupRequest {}).await.map_err(|s| client::status_error(&s))?.into_inner();
    crate::datadir::create_private_empty_file(out)
        .with_context(|| format!("cannot create {}", out.display()))
        .or_fail(Failure::Usage)?;
    let written = async {
        let mut file = std::fs::OpenOptions::new().write(true).open(out).or_fail(Failure::Other)?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| client::status_error(&s))? {
            file.write_all(&chunk.data).or_fail(Failure::Other)?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all().or_fail(Failure::Other)?;
        crate::store::check_backup(out).or_fail(Failure::Other)?;
        Ok::<_, CliError>(bytes)
    }
    .await;
    match written {
        Ok(bytes) => {
            say(&format!(
                "backup written to {}: {bytes} bytes, integrity ok; restoring it needs this vault's root.sealed and passphrase",
                out.display()
            ));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

/// `piivault keys …`: the Admin service as a client.
async fn keys(command: KeysCommand) -> Result<(), CliError> {
    use crate::grpc::proto::{self, admin_client::AdminClient};
    let failed = |s: tonic::Status| client::status_error(&s);
    match command {
        KeysCommand::List { collection, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::ListKeysRequest { collection: collection.unwrap_or_default() };
            let listed = admin.list_keys(request).await.map_err(failed)?.into_inner();
            print_keys(&listed, json);
        }
        KeysCommand::Rotate { collection, compromised, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::RotateDataKeyRequest {
                collection: collection.clone(),
                compromised_version: compromised.unwrap_or(0),
            };
            let version = admin.rotate_data_key(request).await.map_err(failed)?.into_inner().version;
            if json {
                say(&serde_json::json!({ "collection": collection, "version": version }).to_string());
            } else {
                say(&format!(
                    "{collection}: version {version} is now primary; run `piivault keys reencrypt --collection {collection}` to move older records onto it"
                ));
            }
        }
        KeysCommand::RotateIndex { collection, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::RotateIndexKeyRequest { collection: collection.clone() };
            let version = admin.rotate_index_key(request).await.map_err(failed)?.into_inner().version;
            if json {
                say(&serde_json::json!({ "collection": collection, "index_version": version }).to_string());
            } else {
                say(&format!(
                    "{collection}: index key version {version} is now primary; the index is being rebuilt in the background"
                ));
            }
        }
        KeysCommand::Reencrypt { collection, batch, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::ReencryptRequest { collection: collection.clone(), batch_size: batch };
            let mut stream = admin.reencrypt(request).await.map_err(failed)?.into_inner();
            while let Some(p) = stream.message().await.map_err(failed)? {
                if json {
                    say(&serde_json::json!({
                        "moved": p.moved, "unreadable": p.unreadable, "remaining": p.remaining, "done": p.done,
                    })
                    .to_string());
                } else if p.done {
                    say(&format!(
                        "{collection}: re-encryption done: {} moved, {} unreadable, {} still under older versions",
                        p.moved, p.unreadable, p.remaining
                    ));
                } else {
                    say(&format!("{collection}: {} moved", p.moved));
                }
            }
        }
        KeysCommand::RotateRoot {
            new_passphrase_file,
            new_raw_key_file,
            new_pkcs11_key_label,
            current_raw_key_file,
            current_pkcs11_pin_file,
            connect,
            secret,
        } => {
            let target = match (new_raw_key_file, new_pkcs11_key_label) {
                (Some(file), _) => NewRoot::RawKeyFile(file),
                (None, Some(label)) => NewRoot::Pkcs11(label),
                (None, None) => NewRoot::Passphrase(new_passphrase_file),
            };
            let proof = match (current_raw_key_file, current_pkcs11_pin_file) {
                (Some(file), _) => CurrentSecret::RawKeyFile(file),
                (None, Some(file)) => CurrentSecret::PinFile(file),
                (None, None) => CurrentSecret::Passphrase,
            };
            rotate_root(target, proof, &connect, secret).await?;
        }
        KeysCommand::Retire { collection, key_version: version, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            admin
                .retire_key_version(proto::RetireKeyVersionRequest { collection: collection.clone(), version })
                .await
                .map_err(failed)?;
            say(&format!("{collection}: version {version} retired; its wrapped key is destroyed"));
        }
    }
    Ok(())
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

/// `piivault audit query` and `export`: from a server as an auditor, or
/// from a data directory offline.
async fn audit_read(
    filter: crate::store::AuditFilter,
    limit: Option<u64>,
    json: bool,
    connect: &client::ConnectArgs,
    secret: SecretArgs,
) -> Result<(), CliError> {
    let print = |seq: u64, record: crate::audit::AuditRecord, mac: &[u8]| {
        if json {
            say(&record.to_json(seq, mac).to_string());
        } else {
            say(&format!(
                "{seq:>8} {} {:<12} {:<18} {:<10} items={:<4} {:<18} {}",
                crate::pki::format_time(record.at_micros / 1_000_000),
                if record.caller.is_empty() { "-" } else { &record.caller },
                record.action,
                if record.collection.is_empty() { "-" } else { &record.collection },
                record.items,
                record.outcome,
                record.tokens.join(","),
            ));
        }
    };
    if let Some(dir) = connect.offline_dir() {
        let vault = open_offline(dir, secret, Unseal::ReadOnly).await?;
        let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let records = vault
            .query_audit(filter, limit)
            .await
            .map_err(|e| CliError { failure: Failure::Other, error: e.into() })?;
        for (seq, record, mac) in records {
            print(seq, record, &mac);
        }
        return Ok(());
    }
    let channel = client::channel(connect).await?;
    let request = crate::grpc::proto::AuditQueryRequest {
        token: filter.token.unwrap_or_default(),
        caller: filter.caller.unwrap_or_default(),
        action: filter.action.unwrap_or_default(),
        collection: filter.collection.unwrap_or_default(),
        outcome: filter.outcome.unwrap_or_default(),
        since_micros: filter.since.unwrap_or(0),
        until_micros: filter.until.unwrap_or(0),
        limit: limit.unwrap_or(0),
    };
    let mut stream = crate::grpc::proto::audit_client::AuditClient::new(channel)
        .query(request)
        .await
        .map_err(|s| client::status_error(&s))?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(|s| client::status_error(&s))? {
        let mac = hex::decode(&event.mac).unwrap_or_default();
        let record = crate::audit::AuditRecord {
            at_micros: event.at_micros,
            caller: event.caller,
            action: event.action,
            collection: event.collection,
            items: event.items,
            tokens: event.tokens,
            outcome: event.outcome,
            error_code: event.error_code,
            request_id: event.request_id,
            peer: event.peer,
        };
        print(event.seq, record, &mac);
    }
    Ok(())
}

/// `piivault audit …`.
async fn audit(command: AuditCommand) -> Result<(), CliError> {
    let (data_dir, secret, expect, verify) = match command {
        AuditCommand::Verify { data_dir, expect_head, secret } => (data_dir, secret, Some(expect_head), true),
        AuditCommand::Head { data_dir, secret } => (data_dir, secret, None, false),
        AuditCommand::Query { filter, limit, json, connect, secret } => {
            let filter = crate::store::AuditFilter {
                token: filter.token,
                caller: filter.caller,
                action: filter.action,
                collection: filter.collection,
                outcome: filter.outcome,
                since: filter.since,
                until: filter.until,
                after_seq: 0,
            };
            return audit_read(filter, limit, json, &connect, secret).await;
        }
        AuditCommand::Export { format: _, connect, secret } => {
            return audit_read(crate::store::AuditFilter::default(), None, true, &connect, secret).await;
        }
    };
    let expected = match expect.flatten() {
        Some(text) => {
            let parsed =
                text.split_once(':').and_then(|(seq, mac)| Some((seq.parse::<u64>().ok()?, mac.to_ascii_lowercase())));
            Some(parsed.ok_or_else(|| CliError {
                failure: Failure::Usage,
                error: anyhow!("--expect-head takes SEQ:MAC, as printed by `piivault audit head`"),
            })?)
        }
        None => None,
    };
    let vault = open_offline(&data_dir, secret, Unseal::ReadOnly).await?;
    let verified = vault.verify_audit().await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    let head = verified.map_err(|e| CliError { failure: Failure::Other, error: anyhow!("audit trail broken: {e}") })?;
    let mac = hex::encode(head.mac);
    if let Some((seq, expected_mac)) = expected {
        if head.seq < seq {
            return Err(anyhow!("audit trail truncated: it ends at record {} but record {seq} was anchored", head.seq))
                .or_fail(Failure::Other);
        }
        // The chain verified, so the stored MAC of the anchored record is
        // the chain's own.
        let anchored = vault.audit_mac(seq).await.map_err(|e| CliError { failure: Failure::Other, error: e.into() })?;
        if anchored.as_deref() != Some(expected_mac.as_str()) {
            return Err(anyhow!("audit trail diverges from the anchored head at record {seq}")).or_fail(Failure::Other);
        }
    }
    if verify {
        say(&format!("ok: {} records, head {}:{mac}", head.seq, head.seq));
    } else {
        say(&format!("{}:{mac}", head.seq));
    }
    Ok(())
}
fn certs(command: CertsCommand) -> Result<(), CliError> {
    let load_config = |dir: &Path| Config::load(&dir.join(CONFIG_FILE)).or_fail(Failure::Config);
    match command {
        CertsCommand::Init { data_dir, server_names } => {
            let config = load_config(&data_dir)?;
            let names = if server_names.is_empty() { config.server.server_names.clone() } else { server_names };
            Ca::init(&data_dir, &config.server.trust_domain, &names).or_fail(Failure::Other)?;
            say(&format!("vault CA ready; server certificate issued for {}", names.join(", ")));
        }
        CertsCommand::Issue { data_dir, name, days, out } => {
            let config = load_config(&data_dir)?;
            let caller: CallerId = name.parse().or_fail(Failure::Usage)?;
            let ca = Ca::load(&data_dir).or_fail(Failure::Config)?;
            let out = out.unwrap_or_else(|| data_dir.join("clients").join(caller.as_str()));
            let issued = ca.issue(&caller, &config.server.trust_domain, days, &out).map_err(|e| CliError {
                failure: if matches!(e, pki::PkiError::Invalid(_)) { Failure::Usage } else { Failure::Other },
                error: e.into(),
            })?;
            say(&format!(
                "issued {} for {} (serial {}, valid until {}) in {}",
                out.join("cert.pem").display(),
                caller.spiffe_id(&config.server.trust_domain),
                issued.serial,
                pki::format_time(issued.not_after),
                out.display()
            ));
        }
        CertsCommand::Revoke { data_dir, selector } => {
            let ca = Ca::load(&data_dir).or_fail(Failure::Config)?;
            let revoked = ca.revoke(&selector).map_err(|e| CliError {
                failure: if matches!(e, pki::PkiError::NotFound(_)) { Failure::Usage } else { Failure::Other },
                error: e.into(),
            })?;
            for cert in revoked {
                say(&format!("revoked {} (serial {})", cert.name, cert.serial));
            }
            say("pki/crl.pem updated; send SIGHUP to a running server to apply it");
        }
        CertsCommand::List { data_dir, json } => {
            let ca = Ca::load(&data_dir).or_fail(Failure::Config)?;
            let list = ca.list().or_fail(Failure::Other)?;
            if json {
                say(&serde_json::to_string_pretty(&list).or_fail(Failure::Other)?);
            } else {
                say(&format!("{:<24} {:<32} {:<20} {}", "NAME", "SERIAL", "NOT AFTER", "STATUS"));
                for cert in list {
                    let status = cert
                        .revoked_at
                        .map_or_else(|| "valid".to_owned(), |t| format!("revoked {}", pki::format_time(t)));
                    say(&format!(
                        "{:<24} {:<32} {:<20} {status}",
                        cert.name,
                        cert.serial,
                        pki::format_time(cert.not_after)
                    ));
                }
            }
        }
    }
    Ok(())
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
}
