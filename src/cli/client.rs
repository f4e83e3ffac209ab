//! The command-line client: `tokenize`, `detokenize` and `delete` over
//! mutual TLS, one result per line (or JSON).

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tonic::transport::{Channel, Endpoint};

use super::{Classify as _, CliError, Failure, say};
use crate::config::{CONFIG_FILE, Config};
use crate::grpc::code_name;
use crate::pki;
use piivault_client::{Client, ItemError, error_chain};

/// Which call to make.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// `Tokenizer/Tokenize`.
    Tokenize,
    /// `Tokenizer/Detokenize`.
    Detokenize,
    /// `Tokenizer/Delete`.
    Delete,
}

/// Arguments of the client commands.
#[derive(Debug, clap::Args)]
pub struct ItemsArgs {
    /// The collection.
    #[arg(long, short = 'c')]
    collection: String,
    /// Values (tokenize) or tokens (detokenize, delete); read one per line
    /// from stdin when none are given.
    items: Vec<String>,
    /// Print a JSON array instead of one line per item.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// How to reach and authenticate to a vault.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The vault's address, host:port.
    #[arg(long, env = "PIIVAULT_ADDR", value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The vault CA certificate (PEM).
    #[arg(long, env = "PIIVAULT_CACERT", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This caller's certificate (PEM).
    #[arg(long, env = "PIIVAULT_CLIENT_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// This caller's private key (PEM).
    #[arg(long, env = "PIIVAULT_CLIENT_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// A local vault's data directory: address and CA from it, and with
    /// `--as NAME` the certificate in DIR/clients/NAME/.
    #[arg(long, value_name = "DIR")]
    pub(super) data_dir: Option<PathBuf>,
    /// With `--data-dir`: act as this caller.
    #[arg(long = "as", value_name = "NAME", requires = "data_dir")]
    as_name: Option<String>,
    /// Deadline for the call, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn missing(what: &str, flag: &str, env: &str) -> CliError {
    CliError {
        failure: Failure::Usage,
        error: anyhow!("no {what}: pass {flag}, set {env}, or use --data-dir DIR --as NAME"),
    }
}

impl ConnectArgs {
    /// The same vault, as caller `name` of the same data directory.
    pub fn acting_as(&self, name: &str) -> Self {
        Self { as_name: Some(name.to_owned()), ..self.clone() }
    }

    /// A local data directory to read directly: `--data-dir` given, and
    /// nothing that says "connect" (`--as`, `--addr`, a certificate).
    pub fn offline_dir(&self) -> Option<&std::path::Path> {
        let online = self.as_name.is_some() || self.addr.is_some() || self.cert.is_some();
        if online { None } else { self.data_dir.as_deref() }
    }
}

/// The address and PEM credentials `args` name.
struct Resolved {
    addr: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
}

/// A client of the Tokenizer service (`clients/rust`) with the resolved
/// address and credentials, and `--timeout` as each request's deadline.
pub async fn connect(args: &ConnectArgs) -> Result<Client, CliError> {
    let resolved = resolve(args)?;
    let mut config =
        piivault_client::Config::new(resolved.addr, resolved.ca_pem, resolved.cert_pem, resolved.key_pem.to_vec());
    config.deadline = Duration::from_secs(args.timeout.max(1));
    Client::connect(config).await.map_err(client_error)
}

/// A client error as the command's error.
pub fn client_error(error: piivault_client::Error) -> CliError {
    let failure = if matches!(error, piivault_client::Error::Config(_)) { Failure::Config } else { Failure::Other };
    CliError { failure, error: error.into() }
}

fn resolve(args: &ConnectArgs) -> Result<Resolved, CliError> {
    let dir_config = match &args.data_dir {
        Some(dir) => Some(Config::load(&dir.join(CONFIG_FILE)).or_fail(Failure::Config)?),
        None => None,
    };
    let from_dir = |file: &str| {
        let (dir, name) = (args.data_dir.as_ref()?, args.as_name.as_ref()?);
        Some(dir.join("clients").join(name).join(file))
    };
    // A running dev vault records where it listens (`dev --listen`).
    let addr = args
        .addr
        .clone()
        .or_else(|| args.data_dir.as_deref().and_then(crate::datadir::dev_address))
        .or_else(|| dir_config.as_ref().map(|c| c.server.listen.to_string()))
        .ok_or_else(|| missing("address", "--addr", "PIIVAULT_ADDR"))?;
    let ca = args
        .ca
        .clone()
        .or_else(|| dir_config.as_ref().map(|c| c.server.pki_dir.join(pki::CA_CERT)))
        .ok_or_else(|| missing("CA certificate", "--ca", "PIIVAULT_CACERT"))?;
    let cert = args
        .cert
        .clone()
        .or_else(|| from_dir("cert.pem"))
        .ok_or_else(|| missing("client certificate", "--cert", "PIIVAULT_CLIENT_CERT"))?;
    let key = args
        .key
        .clone()
        .or_else(|| from_dir("key.pem"))
        .ok_or_else(|| missing("client key", "--key", "PIIVAULT_CLIENT_KEY"))?;
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display())).or_fail(Failure::Config)
    };
    let key_pem = super::secrets::read_secret_file(&key, "client key")?;
    Ok(Resolved { addr, ca_pem: read(&ca)?, cert_pem: read(&cert)?, key_pem })
}

/// A TLS channel to the vault with the resolved address and credentials
/// (for the Admin and Audit services).
pub async fn channel(args: &ConnectArgs) -> Result<Channel, CliError> {
    let Resolved { addr, ca_pem, cert_pem, key_pem } = resolve(args)?;
    let tls = crate::tls::client_tls(&ca_pem, &cert_pem, &key_pem);
    let timeout = Duration::from_secs(args.timeout.max(1));
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("{addr:?} is not a host:port"))
        .or_fail(Failure::Usage)?
        .tls_config(tls)
        .or_fail(Failure::Config)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to {addr}: {}", error_chain(&e)))
        .or_fail(Failure::Other)?;
    Ok(channel)
}

/// A whole-request failure as one line: the code, the message, and for a
/// transport failure (say, a TLS alert from the server) its cause.
pub fn status_error(s: &tonic::Status) -> CliError {
    let cause = std::error::Error::source(s).map(|e| format!(": {}", error_chain(e))).unwrap_or_default();
    CliError { failure: Failure::Other, error: anyhow!("{}: {}{cause}", code_name(s.code()), s.message()) }
}

/// One printed result.
enum Line {
    Ok(serde_json::Value, String),
    Failed(serde_json::Value, String),
}

/// Each item's result as a printed line.
fn lines<T>(results: Vec<Result<T, ItemError>>, ok: impl Fn(T) -> (serde_json::Value, String)) -> Vec<Line> {
    results
        .into_iter()
        .map(|r| match r {
            Ok(done) => {
                let (json, text) = ok(done);
                Line::Ok(json, text)
            }
            Err(e) => {
                let (code, message) = (e.code.as_str(), e.message.as_str());
                Line::Failed(
                    serde_json::json!({ "error": { "code": code, "message": message } }),
                    format!("error: {code}: {message}"),
                )
            }
        })
        .collect()
}

/// Runs one client command.
pub async fn run(op: Op, args: ItemsArgs) -> Result<(), CliError> {
    let items = if args.items.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<Vec<_>, _>>().or_fail(Failure::Other)?
    } else {
        args.items
    };
    let client = connect(&args.connect).await?;
    let collection = args.collection.as_str();
    let lines: Vec<Line> = match op {
        Op::Tokenize => lines(client.tokenize(collection, &items).await.map_err(client_error)?, |token| {
            (serde_json::json!({ "token": token }), token)
        }),
        Op::Detokenize => lines(client.detokenize(collection, &items).await.map_err(client_error)?, |revealed| {
            let value = revealed.value.expose().to_owned();
            (serde_json::json!({ "value": value, "masked": revealed.masked }), value)
        }),
        Op::Delete => lines(client.delete(collection, &items).await.map_err(client_error)?, |()| {
            (serde_json::json!({ "deleted": true }), "deleted".to_owned())
        }),
    };
    let total = lines.len();
    let failures = lines.iter().filter(|l| matches!(l, Line::Failed(..))).count();
    if args.json {
        let array: Vec<serde_json::Value> = lines.into_iter().map(|(Line::Ok(j, _) | Line::Failed(j, _))| j).collect();
        say(&serde_json::Value::Array(array).to_string());
    } else {
        for line in lines {
            let (Line::Ok(_, text) | Line::Failed(_, text)) = line;
            say(&text);
        }
    }
    if failures > 0 {
        return Err(anyhow!("{failures} of {total} items failed")).or_fail(Failure::Other);
    }
    Ok(())
}
