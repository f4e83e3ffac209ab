//! `config.toml`: one checked [`Config`], loaded once and passed explicitly.
//!
//! Everything is validated here, at load, with an error that names the key
//! (and the collection) at fault; code that holds a `Config` never checks it
//! again. This module reads no secrets: a passphrase or raw key is resolved
//! by the command line from the source the config names.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::format::{CARD_DIGITS, Format, Luhn, MAX_PRESERVED_LEN, MIN_TOKEN_SPACE, Mask, Normalize};
use crate::token::TokenPrefix;

/// Name of the configuration file inside a data directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Default name of the sealed root key inside a data directory.
pub const SEALED_ROOT_FILE: &str = "root.sealed";
/// Default name of the database inside a data directory.
pub const DATABASE_FILE: &str = "vault.db";

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (line and key).
        message: String,
    },
    /// A key has a value outside what piivault accepts.
    #[error("{key}: {problem}")]
    Invalid {
        /// The dotted key, e.g. `collections.card.prefix`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// A collection name: 1 to 64 characters of `a-z`, `0-9` and `_`, starting
/// with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CollectionName(String);

impl CollectionName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CollectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string that is not a valid collection name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a collection name is 1 to 64 characters of a-z, 0-9 and _, starting with a letter")]
pub struct BadCollectionName;

impl FromStr for CollectionName {
    type Err = BadCollectionName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = s.bytes();
        let ok = (1..=64).contains(&s.len())
            && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok { Ok(Self(s.to_owned())) } else { Err(BadCollectionName) }
    }
}

/// Where the secret that unseals the root key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKeySource {
    /// A passphrase (`PIIVAULT_PASSPHRASE`, `--passphrase-file`, or a prompt).
    Passphrase,
    /// A raw 32-byte key in a file (32 bytes, or 64 hex digits).
    RawKeyFile(PathBuf),
    /// A raw key as 64 hex digits in an environment variable.
    RawKeyEnv(String),
    /// A key in a PKCS#11 token (`[root_key.pkcs11]`).
    Pkcs11,
}

impl RootKeySource {
    /// The provider this source belongs to.
    pub fn provider(&self) -> crate::crypto::root::Provider {
        use crate::crypto::root::Provider;
        match self {
            Self::Passphrase => Provider::Passphrase,
            Self::RawKeyFile(_) | Self::RawKeyEnv(_) => Provider::Raw,
            Self::Pkcs11 => Provider::Pkcs11,
        }
    }
}

/// Where a secret (a PIN) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (owner-only; a trailing newline is ignored).
    File(PathBuf),
    /// An environment variable, removed from the environment once read.
    Env(String),
}

impl Pkcs11Settings {
    /// These settings as the `[root_key.pkcs11]` table of a config file.
    fn table(&self) -> String {
        use crate::crypto::pkcs11::TokenSelector;
        let token = match &self.token {
            TokenSelector::Label(label) => format!("token_label = {}", toml_string(label)),
            TokenSelector::Serial(serial) => format!("token_serial = {}", toml_string(serial)),
        };
        let pin = match &self.pin {
            SecretSource::File(path) => format!("pin_file = {}", toml_string(&path.to_string_lossy())),
            SecretSource::Env(var) => format!("pin_env = {}", toml_string(var)),
        };
        let module = toml_string(&self.module.to_string_lossy());
        format!("\n\n[root_key.pkcs11]\nmodule = {module}\n{token}\n{pin}")
    }
}

/// `[root_key.pkcs11]`: how to reach the token that holds the wrapping key.
/// Needed when `provider = "pkcs11"`, and to rotate the root key into a
/// token from another provider. Which key in the token seals the root is
/// recorded in `root.sealed`, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 library (`/usr/lib/softhsm/libsofthsm2.so`, a vendor's).
    pub module: PathBuf,
    /// The token, by label or serial.
    pub token: crate::crypto::pkcs11::TokenSelector,
    /// The user PIN.
    pub pin: SecretSource,
}

/// Per-request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most items (values or tokens) in one call.
    pub max_items_per_call: usize,
    /// Largest value in bytes (UTF-8).
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_items_per_call: 1000, max_value_bytes: 4096 }
    }
}

/// Which store backend holds the records (`[store] backend`), and where.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreBackend {
    /// One SQLite file (`[store] path`, formerly `[vault] database`).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database that several nodes may share.
    Postgres(PostgresSettings),
}

/// `[store] backend = "postgres"`: where the database is and how this node
/// signs in. The password is never in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// The connection URL (`postgresql://user@host:port/database`), without
    /// a password.
    pub url: String,
    /// Where the password is read from, if the server asks for one.
    pub password: Option<SecretSource>,
    /// The CA that signed the database server's certificate: TLS to the
    /// database, with the server's name verified, is required when set.
    pub ca_file: Option<PathBuf>,
    /// This node's name: the audit chain it writes (one per node).
    pub node: String,
}

impl StoreBackend {
    /// The database file, for the SQLite backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite { path } => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

/// Names the store for operators: its backend and where it is (never a
/// credential).
impl std::fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite { path } => write!(f, "{}", path.display()),
            Self::Postgres(pg) => write!(f, "{} (node {})", pg.url, pg.node),
        }
    }
}

/// How often, by default, a node of a shared store rereads the keys
/// besides the database's notifications (`store.key_refresh_interval_s`).
pub const DEFAULT_KEY_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Store tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Read connections in the pool.
    pub read_connections: usize,
    /// Most write requests committed in one transaction.
    pub max_group_commit: usize,
    /// How often expired records are purged.
    pub purge_interval: std::time::Duration,
    /// Most expired records purged per transaction.
    pub purge_batch: usize,
    /// Token-index entries of the audit trail gathered into one sorted
    /// block of the searchable index (behind the write path).
    pub audit_index_block: usize,
    /// On a store that several nodes share: how often the keys are reread,
    /// besides when the database tells of a change.
    pub key_refresh_interval: std::time::Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            read_connections: 4,
            max_group_commit: 256,
            purge_interval: std::time::Duration::from_mins(1),
            purge_batch: 500,
            audit_index_block: 16_384,
            key_refresh_interval: DEFAULT_KEY_REFRESH_INTERVAL,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The network service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// SPIFFE trust domain of callers: identities are
    /// `spiffe://<trust_domain>/<name>`.
    pub trust_domain: String,
    /// Names (DNS or IP) the server certificate is issued for.
    pub server_names: Vec<String>,
    /// The grants file.
    pub policy: PathBuf,
    /// The PKI directory (`ca.pem`, `server.pem`, `server.key`, `crl.pem`).
    pub pki_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: std::time::Duration,
    /// How often the server checks collections for automatic key rotation.
    pub key_check_interval: std::time::Duration,
    /// Open connections (TLS handshakes included) at most; more are closed
    /// at accept.
    pub max_connections: usize,
    /// Concurrent requests (HTTP/2 streams) per connection at most.
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings on idle connections this often; a peer that does not
    /// answer within 20 s is disconnected.
    pub keepalive_interval: std::time::Duration,
    /// How often policy.toml and pki/ are checked for changes (reloaded
    /// like on SIGHUP).
    pub reload_check_interval: std::time::Duration,
    /// A data request (tokenize, detokenize, delete) that has not answered
    /// within this is cancelled (`DEADLINE_EXCEEDED`).
    pub request_timeout: std::time::Duration,
    /// A connection older than this is asked to go away (HTTP/2 GOAWAY;
    /// requests in flight get 30 s more), so that clients reconnect and
    /// present their current certificate.
    pub max_connection_age: std::time::Duration,
    /// Where Prometheus metrics are served over plain HTTP (`None`: not at
    /// all).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where committed audit records are also written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSetting {
    /// Nowhere (the database only).
    None,
    /// Standard output.
    Stdout,
    /// Appended to a file, reopened on SIGHUP.
    File(PathBuf),
}

/// The audit trail's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// The JSON-lines sink.
    pub sink: SinkSetting,
    /// How often the server logs the trail's head.
    pub head_log_interval: std::time::Duration,
    /// Refusals from one caller or address within this window...
    pub alert_window: std::time::Duration,
    /// ... that reach this count raise a WARN alert.
    pub alert_threshold: usize,
}

/// One collection's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionConfig {
    /// What its tokens look like (a `random` format carries the prefix).
    pub format: Format,
    /// The same (normalized) value always gets the same token.
    pub deterministic: bool,
    /// Applied to every value before it is tokenized and stored.
    pub normalize: Normalize,
    /// Records expire this long after they are written.
    pub ttl: Option<std::time::Duration>,
    /// What `detokenize_masked` shows.
    pub mask: Mask,
    /// Longest value accepted, in bytes.
    pub max_value_len: usize,
    /// Rotate the data key automatically once the primary is this old.
    pub rotate_after: Option<std::time::Duration>,
    /// Rotate the data key automatically once the primary has sealed this
    /// many records.
    pub max_encryptions: Option<u64>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory the relative paths below are resolved against (the config
    /// file's directory).
    pub data_dir: PathBuf,
    /// Which store backend holds the records, and where.
    pub store_backend: StoreBackend,
    /// The sealed root key.
    pub sealed_root: PathBuf,
    /// How the root key is unsealed.
    pub root_key: RootKeySource,
    /// The PKCS#11 token, if one is configured.
    pub pkcs11: Option<Pkcs11Settings>,
    /// Request limits.
    pub limits: Limits,
    /// Store tuning.
    pub store: StoreSettings,
    /// The network service.
    pub server: ServerSettings,
    /// The audit trail.
    pub audit: AuditSettings,
    /// Declared collections.
    pub collections: BTreeMap<CollectionName, CollectionConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    vault: RawVault,
    #[serde(default)]
    root_key: RawRootKey,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    collections: BTreeMap<String, RawCollection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    sink: Option<String>,
    head_log_interval_s: Option<i64>,
    alert_window_s: Option<i64>,
    alert_threshold: Option<i64>,
}

fn parse_audit(raw: &RawAudit, data_dir: &Path) -> Result<AuditSettings, ConfigError> {
    let sink = match raw.sink.as_deref() {
        None | Some("" | "none") => SinkSetting::None,
        Some("stdout") => SinkSetting::Stdout,
        Some(path) => SinkSetting::File(data_dir.join(path)),
    };
    let secs = |key: &str, value: Option<i64>, default: usize, max: usize| {
        bounded(key, value, default, 1, max).map(|s| std::time::Duration::from_secs(s as u64))
    };
    Ok(AuditSettings {
        sink,
        head_log_interval: secs("audit.head_log_interval_s", raw.head_log_interval_s, 300, 86_400)?,
        alert_window: secs("audit.alert_window_s", raw.alert_window_s, 60, 86_400)?,
        alert_threshold: bounded("audit.alert_threshold", raw.alert_threshold, 5, 1, 1_000_000)?,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    trust_domain: Option<String>,
    server_names: Option<Vec<String>>,
    policy: Option<PathBuf>,
    pki_dir: Option<PathBuf>,
    log_format: Option<String>,
    max_message_bytes: Option<i64>,
    handshake_timeout_ms: Option<i64>,
    key_check_interval_s: Option<i64>,
    max_connections: Option<i64>,
    max_concurrent_streams: Option<i64>,
    keepalive_interval_s: Option<i64>,
    reload_check_interval_s: Option<i64>,
    max_connection_age_s: Option<i64>,
    request_timeout_s: Option<i64>,
    metrics_listen: Option<String>,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// Default address of the metrics endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// A metrics address: `address:port`, or `none` for no metrics endpoint.
pub fn parse_metrics_listen(text: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if text == "none" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("{text:?} is neither an address:port such as {DEFAULT_METRICS_LISTEN} nor \"none\""))
}
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "piivault.local";

fn check_trust_domain(domain: &str) -> Result<String, ConfigError> {
    let ok = (1..=255).contains(&domain.len())
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(domain.to_owned())
    } else {
        Err(invalid("server.trust_domain", "must be 1 to 255 characters of a-z, 0-9, '.', '-' and '_'"))
    }
}

fn parse_server(raw: RawServer, data_dir: &Path) -> Result<ServerSettings, ConfigError> {
    let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = listen_text.parse().map_err(|_| {
        invalid("server.listen", format!("{listen_text:?} is not an address:port such as {DEFAULT_LISTEN}"))
    })?;
    let server_names = raw.server_names.unwrap_or_else(|| vec!["localhost".to_owned(), "127.0.0.1".to_owned()]);
    if server_names.is_empty() || server_names.iter().any(String::is_empty) {
        return Err(invalid("server.server_names", "list at least one non-empty DNS name or IP address"));
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(invalid(
                "server.log_format",
                format!("unknown format {other:?}; expected \"text\" or \"json\""),
            ));
        }
    };
    let handshake_ms = bounded("server.handshake_timeout_ms", raw.handshake_timeout_ms, 10_000, 100, 120_000)?;
    let metrics_listen = parse_metrics_listen(raw.metrics_listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN))
        .map_err(|problem| invalid("server.metrics_listen", problem))?;
    Ok(ServerSettings {
        metrics_listen,
        listen,
        trust_domain: check_trust_domain(raw.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))?,
        server_names,
        policy: data_dir.join(raw.policy.unwrap_or_else(|| PathBuf::from("policy.toml"))),
        pki_dir: data_dir.join(raw.pki_dir.unwrap_or_else(|| PathBuf::from("pki"))),
        log_format,
        max_message_bytes: bounded("server.max_message_bytes", raw.max_message_bytes, 8 << 20, 1024, 64 << 20)?,
        handshake_timeout: std::time::Duration::from_millis(u64::try_from(handshake_ms).unwrap_or(10_000)),
        key_check_interval: std::time::Duration::from_secs(
            u64::try_from(bounded("server.key_check_interval_s", raw.key_check_interval_s, 60, 1, 86_400)?)
                .unwrap_or(60),
        ),
        max_connections: bounded("server.max_connections", raw.max_connections, 1024, 1, 100_000)?,
        max_concurrent_streams: u32::try_from(bounded(
            "server.max_concurrent_streams",
            raw.max_concurrent_streams,
            256,
            1,
            10_000,
        )?)
        .unwrap_or(256),
        keepalive_interval: std::time::Duration::from_secs(
            u64::try_from(bounded("server.keepalive_interval_s", raw.keepalive_interval_s, 30, 1, 3600)?).unwrap_or(30),
        ),
        reload_check_interval: std::time::Duration::from_secs(
            u64::try_from(bounded("server.reload_check_interval_s", raw.reload_check_interval_s, 2, 1, 3600)?)
                .unwrap_or(2),
        ),
        request_timeout: std::time::Duration::from_secs(
            u64::try_from(bounded("server.request_timeout_s", raw.request_timeout_s, 60, 1, 3600)?).unwrap_or(60),
        ),
        max_connection_age: std::time::Duration::from_secs(
            u64::try_from(bounded("server.max_connection_age_s", raw.max_connection_age_s, 3600, 1, 604_800)?)
                .unwrap_or(3600),
        ),
    })
}

/// `[store] backend` and where it keeps its data (`path`, or the earlier
/// `[vault] database`).
fn parse_backend(raw: &RawStore, vault_database: Option<&Path>, data_dir: &Path) -> Result<StoreBackend, ConfigError> {
    match raw.backend.as_deref() {
        None | Some("sqlite") => {
            if vault_database.is_some() && raw.path.is_some() {
                return Err(invalid(
                    "store.path",
                    "the database is named twice (store.path and vault.database); keep store.path",
                ));
            }
            let path = raw.path.as_deref().or(vault_database).unwrap_or(Path::new(DATABASE_FILE));
            Ok(StoreBackend::Sqlite { path: data_dir.join(path) })
        }
        Some("postgres") => parse_postgres(raw, data_dir).map(StoreBackend::Postgres),
        Some(other) => {
            Err(invalid("store.backend", format!("unknown backend {other:?}; expected \"sqlite\" or \"postgres\"")))
        }
    }
}

/// The `[store]` keys of the PostgreSQL backend.
fn parse_postgres(raw: &RawStore, data_dir: &Path) -> Result<PostgresSettings, ConfigError> {
    if raw.path.is_some() {
        return Err(invalid("store.path", "the postgres backend has no file; give store.url"));
    }
    let url = raw.url.clone().ok_or_else(|| invalid("store.url", "the postgres backend needs a connection URL"))?;
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| invalid("store.url", "not a PostgreSQL connection URL (postgresql://user@host:port/database)"))?;
    if config.get_password().is_some() {
        return Err(invalid(
            "store.url",
            "holds a password; keep it out of config.toml (store.password_file or store.password_env)",
        ));
    }
    if config.get_user().is_none() {
        return Err(invalid("store.url", "names no user (postgresql://user@host/database)"));
    }
    let password = match (&raw.password_file, &raw.password_env) {
        (Some(file), None) => Some(SecretSource::File(data_dir.join(file))),
        (None, Some(var)) if !var.is_empty() => Some(SecretSource::Env(var.clone())),
        (None, None) => None,
        _ => return Err(invalid("store.password_file", "give at most one of password_file and password_env")),
    };
    let node = raw.node.clone().unwrap_or_else(|| DEFAULT_NODE.to_owned());
    if node.is_empty() || node.len() > 64 || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("store.node", "1-64 letters, digits, '-' or '_'"));
    }
    Ok(PostgresSettings { url, password, ca_file: raw.ca_file.as_ref().map(|f| data_dir.join(f)), node })
}

impl PostgresSettings {
    /// These settings as `[store]` lines of a config file.
    pub fn table_lines(&self) -> String {
        let mut lines = vec![
            "# \"postgres\": one database that several nodes share; each node has its own name.".to_owned(),
            "backend = \"postgres\"".to_owned(),
            format!("url = {}", toml_string(&self.url)),
            format!("node = {}", toml_string(&self.node)),
        ];
        match &self.password {
            Some(SecretSource::File(path)) => {
                lines.push(format!("password_file = {}", toml_string(&path.to_string_lossy())));
            }
            Some(SecretSource::Env(var)) => lines.push(format!("password_env = {}", toml_string(var))),
            None => {}
        }
        if let Some(ca) = &self.ca_file {
            lines.push(format!("ca_file = {}", toml_string(&ca.to_string_lossy())));
        }
        lines.join("\n")
    }

    /// The `[store]` backend lines of a sample config: these settings, or
    /// the SQLite file's without them.
    fn sample_lines(postgres: Option<&Self>) -> String {
        postgres.map_or_else(
            || format!("# \"sqlite\": one file, one process.\nbackend = \"sqlite\"\npath = \"{DATABASE_FILE}\""),
            Self::table_lines,
        )
    }
}

/// The node name of a PostgreSQL store whose `[store] node` is not set.
pub const DEFAULT_NODE: &str = "main";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVault {
    database: Option<PathBuf>,
    sealed_root: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRootKey {
    provider: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    pkcs11: Option<RawPkcs11>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    module: Option<PathBuf>,
    token_label: Option<String>,
    token_serial: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
}

fn parse_pkcs11(raw: RawPkcs11, data_dir: &Path) -> Result<Pkcs11Settings, ConfigError> {
    use crate::crypto::pkcs11::TokenSelector;
    let key = "root_key.pkcs11";
    let module = raw.module.ok_or_else(|| invalid(key, "module (the PKCS#11 library's path) is required"))?;
    let token = match (raw.token_label, raw.token_serial) {
        (Some(label), None) if !label.is_empty() && label.len() <= 32 => TokenSelector::Label(label),
        (None, Some(serial)) if !serial.is_empty() && serial.len() <= 16 => TokenSelector::Serial(serial),
        _ => {
            return Err(invalid(
                key,
                "needs exactly one of token_label (1-32 bytes) or token_serial (1-16 characters)",
            ));
        }
    };
    let pin = match (raw.pin_file, raw.pin_env) {
        (Some(file), None) => SecretSource::File(data_dir.join(file)),
        (None, Some(var)) if !var.is_empty() => SecretSource::Env(var),
        _ => return Err(invalid(key, "needs exactly one of pin_file or pin_env")),
    };
    Ok(Pkcs11Settings { module: data_dir.join(module), token, pin })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_items_per_call: Option<i64>,
    max_value_bytes: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<String>,
    path: Option<PathBuf>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    ca_file: Option<PathBuf>,
    node: Option<String>,
    read_connections: Option<i64>,
    max_group_commit: Option<i64>,
    purge_interval_s: Option<i64>,
    purge_batch: Option<i64>,
    audit_index_block: Option<i64>,
    key_refresh_interval_s: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCollection {
    prefix: Option<String>,
    rotate_after: Option<String>,
    max_encryptions: Option<i64>,
    format: Option<String>,
    keep_first: Option<i64>,
    keep_last: Option<i64>,
    min_len: Option<i64>,
    luhn: Option<String>,
    keep_country_code: Option<bool>,
    keep_domain: Option<bool>,
    deterministic: Option<bool>,
    normalize: Option<OneOrMany>,
    ttl: Option<String>,
    mask: Option<String>,
    max_value_len: Option<i64>,
}

/// `normalize = "lowercase"` or `normalize = ["trim", "lowercase"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            Self::One(one) => vec![one.as_str()],
            Self::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

/// Options that only some formats take: the key and the formats.
const FORMAT_OPTIONS: [(&str, &[&str]); 7] = [
    ("prefix", &["random"]),
    ("keep_first", &["card"]),
    ("keep_last", &["digits", "alphanumeric", "card"]),
    ("min_len", &["digits", "alphanumeric", "card"]),
    ("luhn", &["card"]),
    ("keep_country_code", &["digits"]),
    ("keep_domain", &["email"]),
];

fn duration_setting(key: &str, text: Option<&String>) -> Result<Option<std::time::Duration>, ConfigError> {
    text.map(|text| {
        parse_duration(text).ok_or_else(|| {
            invalid(key, format!("{text:?} is not a duration such as \"90d\", \"12h\", \"30m\" or \"45s\""))
        })
    })
    .transpose()
}

/// A collection's format, normalization, mask and lengths, checked against
/// each other and against the token-space floor.
#[allow(clippy::too_many_lines)] // one check per option, in the order documented
fn parse_collection(
    key: &str,
    name: &str,
    raw: &RawCollection,
    limits: &Limits,
) -> Result<(Format, Normalize, Mask, usize), ConfigError> {
    let format_name = raw.format.as_deref().unwrap_or("random");
    let given: [(&str, bool); 7] = [
        ("prefix", raw.prefix.is_some()),
        ("keep_first", raw.keep_first.is_some()),
        ("keep_last", raw.keep_last.is_some()),
        ("min_len", raw.min_len.is_some()),
        ("luhn", raw.luhn.is_some()),
        ("keep_country_code", raw.keep_country_code.is_some()),
        ("keep_domain", raw.keep_domain.is_some()),
    ];
    for ((option, formats), (_, set)) in FORMAT_OPTIONS.iter().zip(given) {
        if set && !formats.contains(&format_name) {
            return Err(invalid(
                format!("{key}.{option}"),
                format!("{option} does not apply to format = {format_name:?} (only to {})", formats.join(", ")),
            ));
        }
    }
    let count = |option: &str, value: Option<i64>| -> Result<usize, ConfigError> {
        value.map_or(Ok(0), |n| {
            usize::try_from(n).ok().filter(|n| *n <= MAX_PRESERVED_LEN).ok_or_else(|| {
                invalid(format!("{key}.{option}"), format!("must be between 0 and {MAX_PRESERVED_LEN}, got {n}"))
            })
        })
    };
    let keep_last = count("keep_last", raw.keep_last)?;
    let format = match format_name {
        "random" => {
            let prefix_text = raw.prefix.clone().unwrap_or_else(|| name.to_owned());
            let prefix: TokenPrefix = prefix_text.parse().map_err(|_| {
                invalid(
                    format!("{key}.prefix"),
                    "a token prefix is 1 to 8 characters of a-z and 0-9 (set one explicitly when the collection name is not)",
                )
            })?;
            Format::Random { prefix }
        }
        "digits" | "alphanumeric" => {
            let min_len = match raw.min_len {
                None => keep_last + 6,
                Some(_) => count("min_len", raw.min_len)?,
            };
            if min_len == 0 {
                return Err(invalid(format!("{key}.min_len"), "must be at least 1"));
            }
            if format_name == "digits" {
                Format::Digits { keep_last, min_len, keep_country_code: raw.keep_country_code.unwrap_or(false) }
            } else {
                Format::Alphanumeric { keep_last, min_len }
            }
        }
        "card" => {
            let luhn = match raw.luhn.as_deref() {
                None => Luhn::Invalid,
                Some(text) => Luhn::parse(text).ok_or_else(|| {
                    invalid(
                        format!("{key}.luhn"),
                        format!("unknown rule {text:?}; expected \"valid\", \"invalid\" or \"any\""),
                    )
                })?,
            };
            let min_len = match raw.min_len {
                None => *CARD_DIGITS.start(),
                Some(n) => usize::try_from(n).ok().filter(|n| CARD_DIGITS.contains(n)).ok_or_else(|| {
                    invalid(
                        format!("{key}.min_len"),
                        format!("a card number has {} to {} digits, got {n}", CARD_DIGITS.start(), CARD_DIGITS.end()),
                    )
                })?,
            };
            Format::Card { keep_first: count("keep_first", raw.keep_first)?, keep_last, min_len, luhn }
        }
        "ssn" => Format::Ssn,
        "email" => Format::Email { keep_domain: raw.keep_domain.unwrap_or(true) },
        other => {
            return Err(invalid(
                format!("{key}.format"),
                format!("unknown format {other:?}; expected random, digits, alphanumeric, card, ssn or email"),
            ));
        }
    };
    let space = format.token_space();
    if space < MIN_TOKEN_SPACE {
        return Err(invalid(
            key,
            format!(
                "format {format_name:?} leaves {space} possible tokens for its shortest value ({} letters and digits); at least {MIN_TOKEN_SPACE} are needed (keep fewer characters, or raise min_len)",
                format.min_slots()
            ),
        ));
    }

    let normalize = match &raw.normalize {
        None => Normalize::default(),
        Some(steps) => Normalize::parse(steps.items()).map_err(|e| invalid(format!("{key}.normalize"), e))?,
    };
    if normalize.digits_only && matches!(format, Format::Email { .. } | Format::Alphanumeric { .. }) {
        return Err(invalid(format!("{key}.normalize"), format!("digits_only contradicts format = {format_name:?}")));
    }

    let mask = match raw.mask.as_deref() {
        None => Mask::default_for(&format),
        Some(text) => Mask::parse(text).ok_or_else(|| {
            invalid(
                format!("{key}.mask"),
                format!(
                    "unknown mask {text:?}; expected \"full\", \"email\", \"last:N\", \"first:N\" or \"first:N,last:M\""
                ),
            )
        })?,
    };
    if mask == Mask::Email && !matches!(format, Format::Email { .. } | Format::Random { .. }) {
        return Err(invalid(format!("{key}.mask"), format!("the email mask contradicts format = {format_name:?}")));
    }

    let ceiling =
        if format.preserves_shape() { limits.max_value_bytes.min(MAX_PRESERVED_LEN) } else { limits.max_value_bytes };
    let max_value_len = match raw.max_value_len {
        None => ceiling,
        Some(n) => usize::try_from(n).ok().filter(|n| (1..=ceiling).contains(n)).ok_or_else(|| {
            invalid(
                format!("{key}.max_value_len"),
                format!("must be between 1 and {ceiling} bytes for format = {format_name:?}, got {n}"),
            )
        })?,
    };
    Ok((format, normalize, mask, max_value_len))
}

/// `90d`, `12h`, `30m`, `45s`: a whole number and a unit.
pub(crate) fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(seconds))
}

fn bounded(key: &str, value: Option<i64>, default: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    usize::try_from(value)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| invalid(key, format!("must be between {min} and {max}, got {value}")))
}

impl Config {
    /// Reads and checks `path`; relative paths inside resolve against its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self::parse(&text, &dir).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_owned(), message },
            other => other,
        })
    }

    /// Checks configuration text; relative paths resolve against `data_dir`.
    pub fn parse(text: &str, data_dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from(CONFIG_FILE), message: one_line(&e.to_string()) })?;
        let resolve = |p: Option<PathBuf>, default: &str| data_dir.join(p.unwrap_or_else(|| PathBuf::from(default)));

        let pkcs11 = raw.root_key.pkcs11.map(|p| parse_pkcs11(p, data_dir)).transpose()?;
        let root_key = match (raw.root_key.provider.as_deref(), raw.root_key.key_file, raw.root_key.key_env) {
            (None | Some("passphrase"), None, None) => RootKeySource::Passphrase,
            (Some("raw"), Some(file), None) => RootKeySource::RawKeyFile(data_dir.join(file)),
            (Some("raw"), None, Some(var)) if !var.is_empty() => RootKeySource::RawKeyEnv(var),
            (Some("raw"), _, _) => {
                return Err(invalid("root_key", "provider = \"raw\" needs exactly one of key_file or key_env"));
            }
            (Some("pkcs11"), None, None) if pkcs11.is_some() => RootKeySource::Pkcs11,
            (Some("pkcs11"), None, None) => {
                return Err(invalid("root_key", "provider = \"pkcs11\" needs a [root_key.pkcs11] table"));
            }
            (Some("passphrase" | "pkcs11"), _, _) => {
                return Err(invalid("root_key", "key_file and key_env only apply to provider = \"raw\""));
            }
            (None, _, _) => return Err(invalid("root_key.provider", "required with key_file or key_env")),
            (Some(other), _, _) => {
                return Err(invalid(
                    "root_key.provider",
                    format!("unknown provider {other:?}; expected \"passphrase\", \"raw\" or \"pkcs11\""),
                ));
            }
        };

        let limits = Limits {
            max_items_per_call: bounded("limits.max_items_per_call", raw.limits.max_items_per_call, 1000, 1, 100_000)?,
            max_value_bytes: bounded("limits.max_value_bytes", raw.limits.max_value_bytes, 4096, 1, 1 << 20)?,
        };
        let store = parse_store_settings(&raw.store)?;

        let store_backend = parse_backend(&raw.store, raw.vault.database.as_deref(), data_dir)?;

        let server = parse_server(raw.server, data_dir)?;
        let audit = parse_audit(&raw.audit, data_dir)?;

        let mut collections = BTreeMap::new();
        let mut prefixes = BTreeMap::new();
        for (name, settings) in raw.collections {
            let key = format!("collections.{name}");
            let parsed: CollectionName = name.parse().map_err(|e: BadCollectionName| invalid(&key, e.to_string()))?;
            let (format, normalize, mask, max_value_len) = parse_collection(&key, &name, &settings, &limits)?;
            if let Format::Random { prefix } = &format
                && let Some(other) = prefixes.insert(prefix.as_str().to_owned(), name.clone())
            {
                return Err(invalid(
                    format!("{key}.prefix"),
                    format!("prefix {:?} is already used by collection {other:?}", prefix.as_str()),
                ));
            }
            let rotate_after = duration_setting(&format!("{key}.rotate_after"), settings.rotate_after.as_ref())?;
            let ttl = duration_setting(&format!("{key}.ttl"), settings.ttl.as_ref())?;
            let max_encryptions = match settings.max_encryptions {
                None => None,
                Some(n) => Some(u64::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                    invalid(format!("{key}.max_encryptions"), format!("must be a positive number, got {n}"))
                })?),
            };
            collections.insert(
                parsed,
                CollectionConfig {
                    format,
                    deterministic: settings.deterministic.unwrap_or(false),
                    normalize,
                    ttl,
                    mask,
                    max_value_len,
                    rotate_after,
                    max_encryptions,
                },
            );
        }
        if collections.is_empty() {
            return Err(invalid("collections", "declare at least one collection"));
        }

        Ok(Self {
            data_dir: data_dir.to_owned(),
            store_backend,
            sealed_root: resolve(raw.vault.sealed_root, SEALED_ROOT_FILE),
            root_key,
            pkcs11,
            limits,
            store,
            server,
            audit,
            collections,
        })
    }

    /// The `config.toml` that `piivault init` writes: the sample collections
    /// and every default spelled out.
    pub fn sample(
        root_key: &RootKeySource,
        pkcs11: Option<&Pkcs11Settings>,
        postgres: Option<&PostgresSettings>,
    ) -> String {
        let mut root = match root_key {
            RootKeySource::Passphrase => {
                "provider = \"passphrase\"   # from PIIVAULT_PASSPHRASE or --passphrase-file".to_owned()
            }
            RootKeySource::RawKeyFile(path) => {
                format!("provider = \"raw\"\nkey_file = {}", toml_string(&path.to_string_lossy()))
            }
            RootKeySource::RawKeyEnv(var) => format!("provider = \"raw\"\nkey_env = {}", toml_string(var)),
            RootKeySource::Pkcs11 => "provider = \"pkcs11\"   # the key it uses is recorded in root.sealed".to_owned(),
        };
        if let Some(p) = pkcs11 {
            root.push_str(&p.table());
        }
        let backend = PostgresSettings::sample_lines(postgres);
        format!(
            "# piivault configuration. Relative paths resolve against this file's directory.\n\
             \n\
             [vault]\n\
             sealed_root = \"{SEALED_ROOT_FILE}\"\n\
             \n\
             [root_key]\n\
             {root}\n\
             \n\
             [limits]\n\
             max_items_per_call = 1000\n\
             max_value_bytes = 4096\n\
             \n\
             [store]\n\
             {backend}\n\
             read_connections = 4\n\
             max_group_commit = 256\n\
             # \"Who saw token T\" is indexed behind the write path, this many entries at a time.\n\
             audit_index_block = 16384\n\
             # Expired records (collections with a ttl) are purged this often, in batches.\n\
             purge_interval_s = 60\n\
             purge_batch = 500\n\
             \n\
             [server]\n\
             listen = \"{DEFAULT_LISTEN}\"\n\
             # Callers are spiffe://<trust_domain>/<name>, from their client certificate.\n\
             trust_domain = \"{DEFAULT_TRUST_DOMAIN}\"\n\
             server_names = [\"localhost\", \"127.0.0.1\"]\n\
             policy = \"policy.toml\"\n\
             pki_dir = \"pki\"\n\
             log_format = \"text\"          # or \"json\"\n\
             max_message_bytes = 8388608\n\
             handshake_timeout_ms = 10000\n\
             max_connections = 1024          # more are closed at accept\n\
             max_concurrent_streams = 256    # requests in flight per connection\n\
             keepalive_interval_s = 30       # HTTP/2 pings; no answer within 20 s closes\n\
             reload_check_interval_s = 2     # policy.toml and pki/ changes reload (as SIGHUP does)\n\
             max_connection_age_s = 3600     # older connections are asked to reconnect (GOAWAY)\n\
             request_timeout_s = 60          # a data request not answered by then: DEADLINE_EXCEEDED\n\
             # Prometheus metrics over plain HTTP (no values, no tokens): keep it on\n\
             # loopback or a private network; \"none\" turns it off.\n\
             metrics_listen = \"{DEFAULT_METRICS_LISTEN}\"\n\
             # How often collections are checked for automatic key rotation.\n\
             key_check_interval_s = 60\n\
             \n\
             [audit]\n\
             # Also write each committed record as a JSON line: \"stdout\", a file path\n\
             # (reopened on SIGHUP), or \"none\". The database stays the source of truth.\n\
             sink = \"none\"\n\
             head_log_interval_s = 300\n\
             # Refusals from one caller or address within the window that reach the\n\
             # threshold raise a WARN alert.\n\
             alert_window_s = 60\n\
             alert_threshold = 5\n\
             \n\
             # Collections. format: random (default, <prefix>_<22 random characters>),\n\
             # digits, alphanumeric, card, ssn or email (tokens shaped like the value; see\n\
             # the README). Optional: deterministic = true (same value, same token),\n\
             # normalize = [\"trim\", \"lowercase\"], ttl = \"30d\", mask = \"last:4\",\n\
             # max_value_len = 64, and rotate_after = \"90d\" / max_encryptions = 1000000000\n\
             # to rotate the data key automatically.\n\
             [collections.card]\n\
             format = \"card\"                # 12 to 19 digits, grouped as printed or not\n\
             keep_last = 4\n\
             luhn = \"invalid\"            # tokens never pass the Luhn check\n\
             \n\
             [collections.ssn]\n\
             format = \"ssn\"                 # tokens use area 900-999: never a valid SSN\n\
             deterministic = true           # 078-05-1120 and 078051120 get one token\n\
             \n\
             [collections.email]\n\
             format = \"email\"\n\
             deterministic = true\n\
             normalize = [\"trim\", \"lowercase\"]\n\
             \n\
             [collections.phone]\n\
             format = \"digits\"\n\
             min_len = 9                   # the token space is counted per length, from the shortest\n\
             keep_country_code = true      # +44 20 7946 0958 keeps +44\n\
             \n\
             [collections.name]\n\
             format = \"random\"\n\
             prefix = \"name\"\n\
             normalize = [\"trim\"]\n"
        )
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// TOML errors span several lines (a source excerpt with a caret); the
/// exit-code contract wants one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `[store]` tuning, each setting within its bounds.
fn parse_store_settings(raw: &RawStore) -> Result<StoreSettings, ConfigError> {
    Ok(StoreSettings {
        read_connections: bounded("store.read_connections", raw.read_connections, 4, 1, 64)?,
        max_group_commit: bounded("store.max_group_commit", raw.max_group_commit, 256, 1, 10_000)?,
        audit_index_block: bounded("store.audit_index_block", raw.audit_index_block, 16_384, 1, 16 << 20)?,
        purge_interval: std::time::Duration::from_secs(bounded(
            "store.purge_interval_s",
            raw.purge_interval_s,
            60,
            1,
            86_400,
        )? as u64),
        purge_batch: bounded("store.purge_batch", raw.purge_batch, 500, 1, 100_000)?,
        key_refresh_interval: std::time::Duration::from_secs(bounded(
            "store.key_refresh_interval_s",
            raw.key_refresh_interval_s,
            2, // DEFAULT_KEY_REFRESH_INTERVAL
            1,
            3600,
        )? as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/data"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn sample_config_parses_with_defaults() {
        use crate::crypto::pkcs11::TokenSelector;
        let config = parse(&Config::sample(&RootKeySource::Passphrase, None, None)).unwrap();
        let names: Vec<_> = config.collections.keys().map(CollectionName::as_str).collect();
        assert_eq!(names, ["card", "email", "name", "phone", "ssn"]);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.store, StoreSettings::default());
        assert_eq!(config.store_backend, StoreBackend::Sqlite { path: "/data/vault.db".into() });
        assert_eq!(config.sealed_root, Path::new("/data/root.sealed"));
        assert_eq!(config.root_key, RootKeySource::Passphrase);
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.server.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert_eq!(config.server.policy, Path::new("/data/policy.toml"));
        assert_eq!(config.server.pki_dir, Path::new("/data/pki"));
        assert_eq!(config.server.log_format, LogFormat::Text);
        assert_eq!(config.server.max_message_bytes, 8 << 20);
        assert_eq!(config.server.handshake_timeout, std::time::Duration::from_secs(10));
        assert_eq!(config.server.server_names, ["localhost", "127.0.0.1"]);
        assert_eq!(config.server.metrics_listen.map(|a| a.to_string()).as_deref(), Some(DEFAULT_METRICS_LISTEN));
        let off = parse("[server]\nmetrics_listen = \"none\"\n[collections.a]\n").unwrap();
        assert_eq!(off.server.metrics_listen, None);
        assert_eq!(
            err("[server]\nmetrics_listen = \"9464\"\n[collections.a]\n"),
            "server.metrics_listen: \"9464\" is neither an address:port such as 127.0.0.1:9464 nor \"none\""
        );

        let raw = parse(&Config::sample(&RootKeySource::RawKeyEnv("KEY".into()), None, None)).unwrap();
        assert_eq!(raw.root_key, RootKeySource::RawKeyEnv("KEY".into()));
        let raw = parse(&Config::sample(&RootKeySource::RawKeyFile("k.bin".into()), None, None)).unwrap();
        assert_eq!(raw.root_key, RootKeySource::RawKeyFile("/data/k.bin".into()));

        let hsm = Pkcs11Settings {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: TokenSelector::Label("piivault".into()),
            pin: SecretSource::File("hsm.pin".into()),
        };
        let parsed = parse(&Config::sample(&RootKeySource::Pkcs11, Some(&hsm), None)).unwrap();
        assert_eq!(parsed.root_key, RootKeySource::Pkcs11);
        assert_eq!(
            parsed.pkcs11,
            Some(Pkcs11Settings { pin: SecretSource::File("/data/hsm.pin".into()), ..hsm.clone() })
        );
        let by_serial = Pkcs11Settings {
            token: TokenSelector::Serial("5f3a".into()),
            pin: SecretSource::Env("PIN".into()),
            ..hsm.clone()
        };
        // A token configured beside another provider, for a rotation into it.
        let beside = parse(&Config::sample(&RootKeySource::Passphrase, Some(&by_serial), None)).unwrap();
        assert_eq!((beside.root_key, beside.pkcs11), (RootKeySource::Passphrase, Some(by_serial)));
    }

    #[test]
    fn postgres_settings_are_checked() {
        let store = |body: &str| format!("[store]\nbackend = \"postgres\"\n{body}\n[collections.a]\n");
        let config = parse(&store(
            "url = \"postgresql://piivault@db:5432/vault\"\npassword_file = \"pg.pw\"\nca_file = \"pg-ca.pem\"\nnode = \"node-a\"",
        ))
        .unwrap();
        assert_eq!(
            config.store_backend,
            StoreBackend::Postgres(PostgresSettings {
                url: "postgresql://piivault@db:5432/vault".into(),
                password: Some(SecretSource::File("/data/pg.pw".into())),
                ca_file: Some("/data/pg-ca.pem".into()),
                node: "node-a".into(),
            })
        );
        assert_eq!(config.store_backend.to_string(), "postgresql://piivault@db:5432/vault (node node-a)");
        // The sample config of a postgres vault says the same.
        let StoreBackend::Postgres(settings) = &config.store_backend else { panic!("not postgres") };
        let sample = parse(&Config::sample(&RootKeySource::Passphrase, None, Some(settings))).unwrap();
        assert_eq!(sample.store_backend, config.store_backend);
        let plain = parse(&store("url = \"postgresql://piivault@db/vault\"\npassword_env = \"PG_PW\"")).unwrap();
        let StoreBackend::Postgres(plain) = plain.store_backend else { panic!("not postgres") };
        assert_eq!(
            (plain.password, plain.ca_file, plain.node.as_str()),
            (Some(SecretSource::Env("PG_PW".into())), None, DEFAULT_NODE)
        );
        assert_eq!(err(&store("")), "store.url: the postgres backend needs a connection URL");
        assert_eq!(
            err(&store("url = \"postgresql://piivault:hunter2@db/vault\"")),
            "store.url: holds a password; keep it out of config.toml (store.password_file or store.password_env)"
        );
        assert_eq!(
            err(&store("url = \"postgresql://db/vault\"")),
            "store.url: names no user (postgresql://user@host/database)"
        );
        assert_eq!(
            err(&store("url = \"postgresql://u@db/v\"\npassword_file = \"f\"\npassword_env = \"E\"")),
            "store.password_file: give at most one of password_file and password_env"
        );
        assert_eq!(
            err(&store("url = \"postgresql://u@db/v\"\nnode = \"a b\"")),
            "store.node: 1-64 letters, digits, '-' or '_'"
        );
        assert_eq!(
            err(&store("url = \"postgresql://u@db/v\"\npath = \"v.db\"")),
            "store.path: the postgres backend has no file; give store.url"
        );
    }

    #[test]
    fn pkcs11_settings_are_checked() {
        let table = |body: &str| format!("[root_key]\nprovider = \"pkcs11\"\n{body}\n[collections.a]\n");
        assert_eq!(err(&table("")), "root_key: provider = \"pkcs11\" needs a [root_key.pkcs11] table");
        let section = "[root_key.pkcs11]\nmodule = \"/m.so\"\n";
        assert_eq!(
            err(&table(&format!("{section}pin_env = \"P\"\n"))),
            "root_key.pkcs11: needs exactly one of token_label (1-32 bytes) or token_serial (1-16 characters)"
        );
        assert_eq!(
            err(&table(&format!("{section}token_label = \"{}\"\npin_env = \"P\"\n", "x".repeat(33)))),
            "root_key.pkcs11: needs exactly one of token_label (1-32 bytes) or token_serial (1-16 characters)"
        );
        assert_eq!(
            err(&table(&format!("{section}token_label = \"t\"\npin_env = \"P\"\npin_file = \"f\"\n"))),
            "root_key.pkcs11: needs exactly one of pin_file or pin_env"
        );
        assert_eq!(
            err(&table("[root_key.pkcs11]\ntoken_label = \"t\"\npin_env = \"P\"\n")),
            "root_key.pkcs11: module (the PKCS#11 library's path) is required"
        );
        assert!(
            err(&table(&format!("{section}token_label = \"t\"\npin = \"1234\"\n"))).contains("unknown field `pin`")
        );
    }

    #[test]
    fn default_prefix_is_the_collection_name() {
        let config = parse("[collections.iban]\n").unwrap();
        let (name, settings) = config.collections.iter().next().unwrap();
        assert_eq!(name.as_str(), "iban");
        assert_eq!(settings.format, Format::Random { prefix: "iban".parse().unwrap() });
        assert_eq!(settings.mask, Mask::Keep { first: 0, last: 4 });
        assert!(!settings.deterministic);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err(""), "collections: declare at least one collection");
        assert_eq!(
            err("[collections.Card]\n"),
            "collections.Card: a collection name is 1 to 64 characters of a-z, 0-9 and _, starting with a letter"
        );
        assert!(err("[collections.national_id]\n").starts_with("collections.national_id.prefix: "));
        assert_eq!(
            err("[collections.a]\nprefix=\"x\"\n[collections.b]\nprefix=\"x\"\n"),
            "collections.b.prefix: prefix \"x\" is already used by collection \"a\""
        );
        assert_eq!(
            err("[limits]\nmax_items_per_call = 0\n[collections.a]\n"),
            "limits.max_items_per_call: must be between 1 and 100000, got 0"
        );
        assert_eq!(
            err("[store]\nbackend = \"mysql\"\n[collections.a]\n"),
            "store.backend: unknown backend \"mysql\"; expected \"sqlite\" or \"postgres\""
        );
        assert_eq!(
            err("[vault]\ndatabase = \"a.db\"\n[store]\npath = \"b.db\"\n[collections.a]\n"),
            "store.path: the database is named twice (store.path and vault.database); keep store.path"
        );
        // A configuration written by an earlier release names the file in
        // [vault]; it still works.
        let earlier = parse("[vault]\ndatabase = \"old.db\"\n[collections.a]\n").unwrap();
        assert_eq!(earlier.store_backend, StoreBackend::Sqlite { path: "/data/old.db".into() });
        let current = parse("[store]\nbackend = \"sqlite\"\npath = \"/srv/v.db\"\n[collections.a]\n").unwrap();
        assert_eq!(current.store_backend, StoreBackend::Sqlite { path: "/srv/v.db".into() });
        assert_eq!(
            err("[store]\nread_connections = -1\n[collections.a]\n"),
            "store.read_connections: must be between 1 and 64, got -1"
        );
        assert_eq!(
            err("[root_key]\nprovider = \"hsm\"\n[collections.a]\n"),
            "root_key.provider: unknown provider \"hsm\"; expected \"passphrase\", \"raw\" or \"pkcs11\""
        );
        assert_eq!(
            err("[root_key]\nprovider = \"raw\"\n[collections.a]\n"),
            "root_key: provider = \"raw\" needs exactly one of key_file or key_env"
        );
        assert_eq!(
            err("[server]\nlisten = \"localhost\"\n[collections.a]\n"),
            "server.listen: \"localhost\" is not an address:port such as 127.0.0.1:7443"
        );
        assert!(err("[server]\ntrust_domain = \"Bad Domain\"\n[collections.a]\n").starts_with("server.trust_domain: "));
        assert!(err("[server]\nlog_format = \"xml\"\n[collections.a]\n").starts_with("server.log_format: "));
        let unknown = err("[collections.a]\ncolour = 1\n");
        assert!(unknown.contains("unknown field `colour`"), "{unknown}");
        assert!(!unknown.contains('\n'));
    }

    #[test]
    fn rotation_settings() {
        let config = parse("[collections.a]\nrotate_after = \"90d\"\nmax_encryptions = 1000\n").unwrap();
        let a = config.collections.values().next().unwrap();
        assert_eq!(a.rotate_after, Some(std::time::Duration::from_hours(90 * 24)));
        assert_eq!(a.max_encryptions, Some(1000));
        assert_eq!(parse_duration("12h"), Some(std::time::Duration::from_hours(12)));
        assert_eq!(parse_duration("45s"), Some(std::time::Duration::from_secs(45)));
        for bad in ["", "d", "0d", "90", "1w", "-1d", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert!(err("[collections.a]\nrotate_after = \"soon\"\n").starts_with("collections.a.rotate_after: "));
        assert_eq!(
            err("[collections.a]\nmax_encryptions = 0\n"),
            "collections.a.max_encryptions: must be a positive number, got 0"
        );
    }

    #[test]
    fn collection_formats() {
        let config = parse(&Config::sample(&RootKeySource::Passphrase, None, None)).unwrap();
        let get = |name: &str| config.collections.iter().find(|(n, _)| n.as_str() == name).unwrap().1.clone();
        assert_eq!(get("card").format, Format::Card { keep_first: 0, keep_last: 4, min_len: 12, luhn: Luhn::Invalid });
        assert_eq!(get("ssn").format, Format::Ssn);
        assert!(get("ssn").deterministic);
        let email = get("email");
        assert_eq!(email.format, Format::Email { keep_domain: true });
        assert!(email.deterministic);
        assert_eq!(email.normalize, Normalize::parse(["trim", "lowercase"]).unwrap());
        assert_eq!(email.mask, Mask::Email);
        assert_eq!(email.max_value_len, 256);
        assert_eq!(get("phone").format, Format::Digits { keep_last: 0, min_len: 9, keep_country_code: true });
        assert_eq!(get("name").format, Format::Random { prefix: "name".parse().unwrap() });
        assert_eq!(get("name").max_value_len, 4096);

        let one = parse(
            "[collections.iban]\nformat = \"alphanumeric\"\nkeep_last = 4\nmin_len = 15\nnormalize = \"uppercase\"\n\
             ttl = \"1h\"\nmask = \"first:2,last:4\"\nmax_value_len = 34\n",
        )
        .unwrap();
        let iban = one.collections.values().next().unwrap();
        assert_eq!(iban.format, Format::Alphanumeric { keep_last: 4, min_len: 15 });
        assert_eq!(iban.ttl, Some(std::time::Duration::from_hours(1)));
        assert_eq!(iban.mask, Mask::Keep { first: 2, last: 4 });
        assert_eq!(iban.max_value_len, 34);
        assert_eq!(iban.normalize.case, Some(crate::format::Case::Upper));
    }

    #[test]
    fn collection_format_refusals() {
        let cases = [
            // A token space too small to be safe, with its size.
            (
                "format = \"card\"\nkeep_first = 6\nkeep_last = 4\nluhn = \"valid\"\nmin_len = 16",
                "collections.c: format \"card\" leaves 100000 possible tokens for its shortest value (16 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            // Counted at the shortest card number accepted: 12 digits by default.
            (
                "format = \"card\"\nkeep_first = 6\nkeep_last = 4",
                "collections.c: format \"card\" leaves 90 possible tokens for its shortest value (12 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            (
                "format = \"card\"\nkeep_first = 8\nkeep_last = 4\nmin_len = 18",
                "collections.c: format \"card\" leaves 900000 possible tokens for its shortest value (18 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            ("format = \"card\"\nmin_len = 11", "collections.c.min_len: a card number has 12 to 19 digits, got 11"),
            (
                "format = \"digits\"\nmin_len = 4",
                "collections.c: format \"digits\" leaves 10000 possible tokens for its shortest value (4 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            (
                "format = \"digits\"\nkeep_last = 4\nmin_len = 9",
                "collections.c: format \"digits\" leaves 100000 possible tokens for its shortest value (9 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            (
                "format = \"digits\"\nmin_len = 8\nkeep_country_code = true",
                "collections.c: format \"digits\" leaves 100000 possible tokens for its shortest value (8 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)",
            ),
            (
                "format = \"card\"\nkeep_country_code = true",
                "collections.c.keep_country_code: keep_country_code does not apply to format = \"card\" (only to digits)",
            ),
            (
                "format = \"ssn\"\nmin_len = 9",
                "collections.c.min_len: min_len does not apply to format = \"ssn\" (only to digits, alphanumeric, card)",
            ),
            // Unknown names.
            (
                "format = \"fpe\"",
                "collections.c.format: unknown format \"fpe\"; expected random, digits, alphanumeric, card, ssn or email",
            ),
            (
                "format = \"card\"\nluhn = \"maybe\"",
                "collections.c.luhn: unknown rule \"maybe\"; expected \"valid\", \"invalid\" or \"any\"",
            ),
            (
                "normalize = [\"nfc\"]",
                "collections.c.normalize: unknown step \"nfc\"; expected trim, lowercase, uppercase or digits_only",
            ),
            (
                "mask = \"middle:2\"",
                "collections.c.mask: unknown mask \"middle:2\"; expected \"full\", \"email\", \"last:N\", \"first:N\" or \"first:N,last:M\"",
            ),
            // Contradictions.
            (
                "format = \"digits\"\nprefix = \"c\"",
                "collections.c.prefix: prefix does not apply to format = \"digits\" (only to random)",
            ),
            (
                "format = \"digits\"\nluhn = \"valid\"",
                "collections.c.luhn: luhn does not apply to format = \"digits\" (only to card)",
            ),
            (
                "keep_last = 4",
                "collections.c.keep_last: keep_last does not apply to format = \"random\" (only to digits, alphanumeric, card)",
            ),
            (
                "format = \"digits\"\nkeep_first = 2",
                "collections.c.keep_first: keep_first does not apply to format = \"digits\" (only to card)",
            ),
            (
                "format = \"card\"\nkeep_domain = true",
                "collections.c.keep_domain: keep_domain does not apply to format = \"card\" (only to email)",
            ),
            (
                "normalize = [\"lowercase\", \"uppercase\"]",
                "collections.c.normalize: lowercase and uppercase contradict each other",
            ),
            (
                "format = \"email\"\nnormalize = \"digits_only\"",
                "collections.c.normalize: digits_only contradicts format = \"email\"",
            ),
            ("format = \"card\"\nmask = \"email\"", "collections.c.mask: the email mask contradicts format = \"card\""),
            (
                "format = \"email\"\nmax_value_len = 1000",
                "collections.c.max_value_len: must be between 1 and 256 bytes for format = \"email\", got 1000",
            ),
            (
                "ttl = \"forever\"",
                "collections.c.ttl: \"forever\" is not a duration such as \"90d\", \"12h\", \"30m\" or \"45s\"",
            ),
        ];
        for (settings, expected) in cases {
            assert_eq!(err(&format!("[collections.c]\n{settings}\n")), expected, "{settings}");
        }
    }

    #[test]
    fn collection_names() {
        for ok in ["a", "card", "national_id", "a1"] {
            assert!(ok.parse::<CollectionName>().is_ok());
        }
        for bad in ["", "1a", "_a", "Card", "a-b", "a b", &"a".repeat(65)] {
            assert!(bad.parse::<CollectionName>().is_err(), "{bad:?}");
        }
    }
}
