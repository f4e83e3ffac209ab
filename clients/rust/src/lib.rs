//! A client for [piivault](https://github.com/piivault/piivault), the PII
//! tokenization vault: mutual TLS, automatic batching, retries with backoff
//! on idempotent calls, deadlines, typed errors, and values that never show
//! up in a `Debug`, a `Display` or an error message. Given several nodes'
//! addresses, it spreads calls over them round robin and skips a node that
//! answers UNAVAILABLE for a while.
//!
//! ```no_run
//! # async fn example() -> Result<(), piivault_client::Error> {
//! use piivault_client::{Client, Config};
//!
//! let client = Client::connect(Config::from_env()?).await?;
//! let tokens = client.tokenize("card", &["4111111111111111"]).await?;
//! let token = tokens[0].as_ref().expect("tokenized");
//! for item in client.detokenize("card", &[token]).await? {
//!     match item {
//!         Ok(revealed) => println!("{} chars", revealed.value.expose().len()),
//!         Err(e) => println!("{e}"), // NOT_FOUND, ...
//!     }
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use zeroize::Zeroizing;

#[allow(missing_docs, clippy::pedantic)] // generated code
mod proto {
    tonic::include_proto!("piivault.v1");

    // Messages that carry values: their `Debug` shows nothing of them.
    macro_rules! redacted {
        ($($t:ty),*) => {$(
            impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str(concat!(stringify!($t), " { <redacted> }"))
                }
            }
        )*};
    }
    redacted!(TokenizeRequest, DetokenizeResponse, DetokenizeResult, detokenize_result::Outcome);
}

use proto::tokenizer_client::TokenizerClient;
use proto::{delete_result, detokenize_result, tokenize_result};

/// The server's default `limits.max_items_per_call`.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// A revealed value. Its `Debug` is redacted and it has no `Display`; read
/// it with [`Value::expose`]. Zeroized when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Value(Zeroizing<String>);

impl Value {
    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Value(<redacted>)")
    }
}

/// A detokenized item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revealed {
    /// The value, or its mask for a caller granted only masked reads.
    pub value: Value,
    /// Whether `value` is masked.
    pub masked: bool,
}

/// Why one item failed while the others may have succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ItemErrorCode {
    /// Unknown, expired, deleted or another collection's token.
    NotFound,
    /// The value does not fit the collection (empty, too long, wrong shape).
    InvalidValue,
    /// The stored record cannot be read (the server raised an alert).
    Unreadable,
    /// The collection's token space is too full for new values.
    TokenSpaceExhausted,
    /// Not attempted: the request carrying it failed as a whole after other
    /// batches of the same call had succeeded (the message says why).
    BatchFailed,
    /// A code this client does not know.
    Unknown(i32),
}

impl ItemErrorCode {
    /// The code's name on the wire, without its prefix (`NOT_FOUND`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::InvalidValue => "INVALID_VALUE",
            Self::Unreadable => "UNREADABLE",
            Self::TokenSpaceExhausted => "TOKEN_SPACE_EXHAUSTED",
            Self::BatchFailed => "BATCH_FAILED",
            Self::Unknown(_) => "UNSPECIFIED",
        }
    }
}

/// One item's failure. Its message comes from the server, which never puts
/// a value in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ItemError {
    /// What went wrong.
    pub code: ItemErrorCode,
    /// The server's explanation.
    pub message: String,
}

impl ItemError {
    fn from_wire(error: proto::ItemError) -> Self {
        let code = match proto::ItemErrorCode::try_from(error.code) {
            Ok(proto::ItemErrorCode::NotFound) => ItemErrorCode::NotFound,
            Ok(proto::ItemErrorCode::InvalidValue) => ItemErrorCode::InvalidValue,
            Ok(proto::ItemErrorCode::Unreadable) => ItemErrorCode::Unreadable,
            Ok(proto::ItemErrorCode::TokenSpaceExhausted) => ItemErrorCode::TokenSpaceExhausted,
            _ => ItemErrorCode::Unknown(error.code),
        };
        Self { code, message: error.message }
    }

    fn missing() -> Self {
        Self { code: ItemErrorCode::Unknown(0), message: "the server gave no outcome for this item".into() }
    }
}

/// Why a whole call failed. Messages come from the server (which never puts
/// a value in them) or from this client (which does not either).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller is not granted this action on this collection (or the
    /// collection does not exist: the server does not say which).
    #[error("PERMISSION_DENIED: {0}")]
    PermissionDenied(String),
    /// The caller's certificate names no caller, or was revoked.
    #[error("UNAUTHENTICATED: {0}")]
    Unauthenticated(String),
    /// A malformed request (for example, no items).
    #[error("INVALID_ARGUMENT: {0}")]
    InvalidArgument(String),
    /// A limit: the caller's rate or detokenize quota, the message size, or
    /// a full token space.
    #[error("RESOURCE_EXHAUSTED: {0}")]
    ResourceExhausted(String),
    /// The vault cannot serve now (retried for idempotent calls first).
    #[error("UNAVAILABLE: {0}")]
    Unavailable(String),
    /// The call's deadline passed.
    #[error("DEADLINE_EXCEEDED: {0}")]
    DeadlineExceeded(String),
    /// Another gRPC status.
    #[error("{code:?}: {message}")]
    Status {
        /// The status code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// No connection could be made (address, TLS, the server's certificate).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why, as the transport says.
        reason: String,
    },
    /// Missing or unreadable settings.
    #[error("client configuration: {0}")]
    Config(String),
    /// The server answered with a different number of results than items.
    #[error("the server answered {got} results for {sent} items")]
    Protocol {
        /// Items sent.
        sent: usize,
        /// Results received.
        got: usize,
    },
}

impl Error {
    fn from_status(status: &Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::ResourceExhausted => Self::ResourceExhausted(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            code => Self::Status { code, message },
        }
    }
}

/// How to reach the vault, and how calls behave.
#[derive(Clone)]
pub struct Config {
    addr: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
    /// Items per request at most; larger inputs are split (default: the
    /// server's default limit, 1000). Lowered automatically when the server
    /// says its limit is lower.
    pub max_batch: usize,
    /// Deadline of each request (default 30 s).
    pub deadline: Duration,
    /// Retries of an idempotent request (detokenize, delete) answered
    /// UNAVAILABLE (default 3).
    pub retries: u32,
    /// The first retry waits up to this long, doubling each time, with full
    /// jitter (default 100 ms).
    pub backoff: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("key_pem", &"<redacted>")
            .field("max_batch", &self.max_batch)
            .field("deadline", &self.deadline)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

impl Config {
    /// `addr` (`host:port`, or several nodes' addresses separated by
    /// commas), the vault CA and this caller's certificate and key, all PEM.
    pub fn new(addr: impl Into<String>, ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        Self {
            addr: addr.into(),
            ca_pem,
            cert_pem,
            key_pem: Zeroizing::new(key_pem),
            max_batch: DEFAULT_MAX_BATCH,
            deadline: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(100),
        }
    }

    /// The same, from PEM files.
    pub fn from_files(addr: impl Into<String>, ca: &Path, cert: &Path, key: &Path) -> Result<Self, Error> {
        Ok(Self::new(addr, read(ca, "CA certificate")?, read(cert, "certificate")?, read(key, "key")?))
    }

    /// From `PIIVAULT_ADDR`, `PIIVAULT_CACERT`, `PIIVAULT_CLIENT_CERT` and
    /// `PIIVAULT_CLIENT_KEY` (the last three are file paths), as the
    /// `piivault` command line reads them.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Config::from_env`], with the variables looked up by `lookup`.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let var = |name: &str| lookup(name).ok_or_else(|| Error::Config(format!("{name} is not set")));
        let (ca, cert, key) = (var("PIIVAULT_CACERT")?, var("PIIVAULT_CLIENT_CERT")?, var("PIIVAULT_CLIENT_KEY")?);
        Self::from_files(var("PIIVAULT_ADDR")?, Path::new(&ca), Path::new(&cert), Path::new(&key))
    }
}

/// How long a node that answered UNAVAILABLE (or could not be reached) is
/// skipped while another node is up.
pub const NODE_DOWN_FOR: Duration = Duration::from_secs(5);

/// A connection to a vault: one per node. Cheap to clone; clones share the
/// connections.
#[derive(Clone)]
pub struct Client {
    nodes: Arc<[Node]>,
    next: Arc<AtomicUsize>,
    settings: Arc<Settings>,
}

struct Node {
    client: TokenizerClient<Channel>,
    /// Skipped until then.
    down_until: Mutex<Option<Instant>>,
}

impl Node {
    fn is_up(&self, now: Instant) -> bool {
        self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none_or(|until| until <= now)
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Instant::now() + NODE_DOWN_FOR);
    }
}

struct Settings {
    max_batch: AtomicUsize,
    deadline: Duration,
    retries: u32,
    backoff: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("max_batch", &self.settings.max_batch).finish_non_exhaustive()
    }
}

/// The server's refusal of an oversized request names its limit:
/// "the request has N items; the limit is M".
fn server_limit(status: &Status) -> Option<usize> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    status.message().rsplit_once("the limit is ")?.1.trim().parse().ok().filter(|m| *m > 0)
}

/// A random duration in `[0, ceiling]` (full jitter).
fn jitter(ceiling: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return ceiling;
    }
    let fraction = f64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])) / f64::from(u32::MAX);
    ceiling.mul_f64(fraction)
}

impl Client {
    /// Connects (TLS handshake included) within the configured deadline, to
    /// every node named. With several, it is enough that one answers: the
    /// others are tried again when their turn comes.
    pub async fn connect(config: Config) -> Result<Self, Error> {
        let addrs: Vec<&str> = config.addr.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
        if addrs.is_empty() {
            return Err(Error::Config("no vault address".into()));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&config.ca_pem))
            .identity(Identity::from_pem(&config.cert_pem, &*config.key_pem));
        let mut nodes = Vec::with_capacity(addrs.len());
        let mut first_error = None;
        for addr in &addrs {
            let connect_error = |reason: String| Error::Connect { addr: (*addr).to_owned(), reason };
            let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|_| Error::Config(format!("{addr:?} is not a host:port")))?
                .tls_config(tls.clone())
                .map_err(|e| connect_error(error_chain(&e)))?
                .connect_timeout(config.deadline)
                .timeout(config.deadline);
            let (channel, down) = match endpoint.connect().await {
                Ok(channel) => (channel, None),
                Err(e) => {
                    first_error.get_or_insert_with(|| connect_error(error_chain(&e)));
                    (endpoint.connect_lazy(), Some(Instant::now() + NODE_DOWN_FOR))
                }
            };
            let client =
                TokenizerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
            nodes.push(Node { client, down_until: Mutex::new(down) });
        }
        if let Some(error) = first_error.filter(|_| nodes.iter().all(|n| !n.is_up(Instant::now()))) {
            return Err(error);
        }
        Ok(Self {
            nodes: nodes.into(),
            next: Arc::new(AtomicUsize::new(0)),
            settings: Arc::new(Settings {
                max_batch: AtomicUsize::new(config.max_batch.max(1)),
                deadline: config.deadline,
                retries: config.retries,
                backoff: config.backoff,
            }),
        })
    }

    /// The node for the next call: the next in turn that is not being
    /// skipped (the next in turn if every node is).
    fn pick(&self) -> &Node {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let n = self.nodes.len();
        (0..n).map(|i| &self.nodes[(start + i) % n]).find(|node| node.is_up(now)).unwrap_or(&self.nodes[start % n])
    }

    /// The largest batch this client sends now.
    pub fn max_batch(&self) -> usize {
        self.settings.max_batch.load(Ordering::Relaxed)
    }

    /// Swaps each value for a token, item by item and in order. Not retried
    /// (a retry after a lost answer could store the value twice).
    pub async fn tokenize<S: AsRef<str>>(
        &self,
        collection: &str,
        values: &[S],
    ) -> Result<Vec<Result<String, ItemError>>, Error> {
        self.batched(values, false, |mut client, items| async move {
            let request = proto::TokenizeRequest { collection: collection.to_owned(), values: items };
            let results = client.tokenize(request).await?.into_inner().results;
            Ok(results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(tokenize_result::Outcome::Token(token)) => Ok(token),
                    Some(tokenize_result::Outcome::Error(e)) => Err(ItemError::from_wire(e)),
                    None => Err(ItemError::missing()),
                })
                .collect())
        })
        .await
    }

    /// Reads each token's value (or its mask), item by item and in order.
    /// Retried on UNAVAILABLE.
    pub async fn detokenize<S: AsRef<str>>(
        &self,
        collection: &str,
        tokens: &[S],
    ) -> Result<Vec<Result<Revealed, ItemError>>, Error> {
        self.batched(tokens, true, |mut client, items| async move {
            let request = proto::DetokenizeRequest { collection: collection.to_owned(), tokens: items };
            let results = client.detokenize(request).await?.into_inner().results;
            Ok(results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(detokenize_result::Outcome::Value(value)) => {
                        Ok(Revealed { value: Value(Zeroizing::new(value)), masked: r.masked })
                    }
                    Some(detokenize_result::Outcome::Error(e)) => Err(ItemError::from_wire(e)),
                    None => Err(ItemError::missing()),
                })
                .collect())
        })
        .await
    }

    /// Deletes each token's value, item by item and in order. Retried on
    /// UNAVAILABLE (deleting twice answers `NOT_FOUND` the second time).
    pub async fn delete<S: AsRef<str>>(
        &self,
        collection: &str,
        tokens: &[S],
    ) -> Result<Vec<Result<(), ItemError>>, Error> {
        self.batched(tokens, true, |mut client, items| async move {
            let request = proto::DeleteRequest { collection: collection.to_owned(), tokens: items };
            let results = client.delete(request).await?.into_inner().results;
            Ok(results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(delete_result::Outcome::Deleted(true)) => Ok(()),
                    Some(delete_result::Outcome::Error(e)) => Err(ItemError::from_wire(e)),
                    Some(delete_result::Outcome::Deleted(false)) | None => Err(ItemError::missing()),
                })
                .collect())
        })
        .await
    }

    /// Sends `items` in batches of at most `max_batch`, in order, each with
    /// the deadline and (if `idempotent`) retries on UNAVAILABLE. A refusal
    /// naming a lower server limit lowers `max_batch` and re-splits. When a
    /// batch fails as a whole after earlier ones succeeded, its items and
    /// the rest are answered `BatchFailed` instead of losing the earlier
    /// results; when the first one fails, the call fails.
    async fn batched<S, T, F, Fut>(
        &self,
        items: &[S],
        idempotent: bool,
        call: F,
    ) -> Result<Vec<Result<T, ItemError>>, Error>
    where
        S: AsRef<str>,
        F: Fn(TokenizerClient<Channel>, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Result<T, ItemError>>, Status>>,
    {
        let mut out = Vec::with_capacity(items.len());
        while out.len() < items.len() {
            let size = self.max_batch().min(items.len() - out.len());
            let batch: Vec<String> = items[out.len()..out.len() + size].iter().map(|s| s.as_ref().to_owned()).collect();
            match self.with_retries(idempotent, batch, &call).await {
                Ok(results) if results.len() == size => out.extend(results),
                Ok(results) => return Err(Error::Protocol { sent: size, got: results.len() }),
                Err(status) => {
                    if let Some(limit) = server_limit(&status).filter(|limit| *limit < size) {
                        self.settings.max_batch.store(limit, Ordering::Relaxed);
                        continue;
                    }
                    let error = Error::from_status(&status);
                    if out.is_empty() {
                        return Err(error);
                    }
                    let failed = ItemError { code: ItemErrorCode::BatchFailed, message: error.to_string() };
                    out.resize_with(items.len(), || Err(failed.clone()));
                }
            }
        }
        Ok(out)
    }

    async fn with_retries<T, F, Fut>(&self, idempotent: bool, batch: Vec<String>, call: &F) -> Result<T, Status>
    where
        F: Fn(TokenizerClient<Channel>, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            let deadline = self.settings.deadline;
            let node = self.pick();
            let result = match tokio::time::timeout(deadline, call(node.client.clone(), batch.clone())).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {deadline:?}"))),
            };
            match result {
                Err(status) if status.code() == Code::Unavailable => {
                    node.mark_down();
                    if !idempotent || attempt >= self.settings.retries {
                        return Err(status);
                    }
                    // Another node that is up is tried at once; when none
                    // is, the retry waits.
                    if !self.nodes.iter().any(|n| n.is_up(Instant::now())) {
                        let ceiling = self.settings.backoff.saturating_mul(1 << attempt.min(16));
                        tokio::time::sleep(jitter(ceiling)).await;
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// An error and its sources, joined by `: ` (transport errors keep the
/// useful part, such as a TLS alert, in their sources).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_keys_never_show() {
        let value = Value(Zeroizing::new("4111111111111111".into()));
        let revealed = Revealed { value: value.clone(), masked: false };
        assert_eq!(format!("{revealed:?}"), "Revealed { value: Value(<redacted>), masked: false }");
        assert_eq!(value.expose(), "4111111111111111");
        let config = Config::new("localhost:7443", b"ca".to_vec(), b"cert".to_vec(), b"SECRET KEY".to_vec());
        assert!(!format!("{config:?}").contains("SECRET"));
        let request = proto::TokenizeRequest { collection: "card".into(), values: vec!["4111111111111111".into()] };
        assert_eq!(format!("{request:?}"), "TokenizeRequest { <redacted> }");
    }

    #[test]
    fn statuses_map_to_typed_errors() {
        assert!(matches!(Error::from_status(&Status::permission_denied("x")), Error::PermissionDenied(m) if m == "x"));
        assert!(matches!(Error::from_status(&Status::unauthenticated("x")), Error::Unauthenticated(_)));
        assert!(matches!(Error::from_status(&Status::invalid_argument("x")), Error::InvalidArgument(_)));
        assert!(matches!(Error::from_status(&Status::resource_exhausted("x")), Error::ResourceExhausted(_)));
        assert!(matches!(Error::from_status(&Status::unavailable("x")), Error::Unavailable(_)));
        assert!(matches!(Error::from_status(&Status::internal("x")), Error::Status { code: Code::Internal, .. }));
        let too_big = Status::resource_exhausted("the request has 1001 items; the limit is 250");
        assert_eq!(server_limit(&too_big), Some(250));
        assert_eq!(server_limit(&Status::resource_exhausted("rate limit")), None);
        assert_eq!(server_limit(&Status::internal("the limit is 5")), None);
    }

    #[test]
    fn jitter_stays_under_its_ceiling() {
        let ceiling = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..200).map(|_| jitter(ceiling)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        assert!(draws.iter().any(|d| *d < ceiling / 2) && draws.iter().any(|d| *d > ceiling / 2));
    }
}
