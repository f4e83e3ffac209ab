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
use crate::grpc::proto::tokenizer_client::TokenizerClient;
use crate::grpc::proto::{self, delete_result, detokenize_result, tokenize_result};
use crate::pki;

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
    data_dir: Option<PathBuf>,
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

/// Connects with the resolved address and credentials.
pub async fn connect(args: &ConnectArgs) -> Result<TokenizerClient<Channel>, CliError> {
    let channel = channel(args).await?;
    Ok(TokenizerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// A TLS channel to the vault with the resolved address and credentials.
pub async fn channel(args: &ConnectArgs) -> Result<Channel, CliError> {
    let dir_config = match &args.data_dir {
        Some(dir) => Some(Config::load(&dir.join(CONFIG_FILE)).or_fail(Failure::Config)?),
        None => None,
    };
    let from_dir = |file: &str| {
        let (dir, name) = (args.data_dir.as_ref()?, args.as_name.as_ref()?);
        Some(dir.join("clients").join(name).join(file))
    };
    let addr = args
        .addr
        .clone()
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
    let key_pem = zeroize::Zeroizing::new(read(&key)?);
    let tls = crate::tls::client_tls(&read(&ca)?, &read(&cert)?, &key_pem);
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

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn item_code(error: &proto::ItemError) -> &'static str {
    let name = proto::ItemErrorCode::try_from(error.code).unwrap_or(proto::ItemErrorCode::Unspecified).as_str_name();
    name.strip_prefix("ITEM_ERROR_CODE_").unwrap_or(name)
}

/// One printed result.
enum Line {
    Ok(serde_json::Value, String),
    Failed(serde_json::Value, String),
}

fn failed(error: Option<&proto::ItemError>) -> Line {
    let (code, message) = error.map_or(("UNSPECIFIED", ""), |e| (item_code(e), e.message.as_str()));
    Line::Failed(
        serde_json::json!({ "error": { "code": code, "message": message } }),
        format!("error: {code}: {message}"),
    )
}

/// Runs one client command.
pub async fn run(op: Op, args: ItemsArgs) -> Result<(), CliError> {
    let items = if args.items.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<Vec<_>, _>>().or_fail(Failure::Other)?
    } else {
        args.items
    };
    let mut client = connect(&args.connect).await?;
    let collection = args.collection;
    let status = |s: tonic::Status| status_error(&s);
    let lines: Vec<Line> = match op {
        Op::Tokenize => {
            let response =
                client.tokenize(proto::TokenizeRequest { collection, values: items }).await.map_err(status)?;
            response
                .into_inner()
                .results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(tokenize_result::Outcome::Token(token)) => {
                        Line::Ok(serde_json::json!({ "token": token }), token)
                    }
                    Some(tokenize_result::Outcome::Error(e)) => failed(Some(&e)),
                    None => failed(None),
                })
                .collect()
        }
        Op::Detokenize => {
            let response =
                client.detokenize(proto::DetokenizeRequest { collection, tokens: items }).await.map_err(status)?;
            response
                .into_inner()
                .results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(detokenize_result::Outcome::Value(value)) => {
                        Line::Ok(serde_json::json!({ "value": value, "masked": r.masked }), value)
                    }
                    Some(detokenize_result::Outcome::Error(e)) => failed(Some(&e)),
                    None => failed(None),
                })
                .collect()
        }
        Op::Delete => {
            let response = client.delete(proto::DeleteRequest { collection, tokens: items }).await.map_err(status)?;
            response
                .into_inner()
                .results
                .into_iter()
                .map(|r| match r.outcome {
                    Some(delete_result::Outcome::Deleted(true)) => {
                        Line::Ok(serde_json::json!({ "deleted": true }), "deleted".to_owned())
                    }
                    Some(delete_result::Outcome::Error(e)) => failed(Some(&e)),
                    Some(delete_result::Outcome::Deleted(false)) | None => failed(None),
                })
                .collect()
        }
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
