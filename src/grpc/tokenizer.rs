//! The `piivault.v1.Tokenizer` service.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::proto::tokenizer_server::Tokenizer;
use super::proto::{self, delete_result, detokenize_result, tokenize_result};
use super::server::{ConnInfo, Live};
use super::{Failure, code_name, item_error};
use crate::policy::{Action, CallerId};
use crate::value::PiiValue;
use crate::vault::Vault;

/// Serves `Tokenizer` for one vault.
pub struct TokenizerService {
    vault: Vault,
    live: Arc<Live>,
}

impl TokenizerService {
    /// A service answering from `vault`, deciding access with `live`.
    pub fn new(vault: Vault, live: Arc<Live>) -> Self {
        Self { vault, live }
    }
}

/// The one log line every RPC leaves: caller, method, collection, item
/// count, outcome and latency. Never a value.
struct RpcLog {
    method: &'static str,
    started: Instant,
    caller: Option<CallerId>,
    collection: Option<String>,
    items: usize,
    peer: Option<std::net::SocketAddr>,
}

impl RpcLog {
    fn start<T>(method: &'static str, request: &Request<T>, items: usize) -> Self {
        let peer = request.extensions().get::<ConnInfo>().map(|c| c.peer);
        Self { method, started: Instant::now(), caller: None, collection: None, items, peer }
    }

    fn finish<T>(self, result: Result<T, Failure>) -> Result<T, Status> {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let caller = self.caller.as_ref().map_or("-", CallerId::as_str);
        // Only a configured collection's name is logged: the field is caller
        // input, and a misbehaving client could put anything in it.
        let collection = self.collection.as_deref().unwrap_or("-");
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        match result {
            Ok(value) => {
                tracing::info!(
                    caller,
                    method = self.method,
                    collection,
                    items = self.items,
                    outcome = "OK",
                    latency_ms,
                    peer,
                    "rpc"
                );
                Ok(value)
            }
            Err(failure) => {
                let status = Status::from(failure);
                let outcome = code_name(status.code());
                tracing::info!(
                    caller,
                    method = self.method,
                    collection,
                    items = self.items,
                    outcome,
                    latency_ms,
                    peer,
                    "rpc"
                );
                Err(status)
            }
        }
    }
}

impl TokenizerService {
    fn admit<T>(
        &self,
        log: &mut RpcLog,
        request: &Request<T>,
        actions: &[Action],
        collection: &str,
    ) -> Result<Action, Failure> {
        if self.vault.has_collection(collection) {
            log.collection = Some(collection.to_owned());
        }
        let caller = self.live.authenticate(request.extensions().get::<ConnInfo>())?;
        let action = self.live.authorize(&caller, actions, collection);
        log.caller = Some(caller);
        Ok(action?)
    }
}

#[tonic::async_trait]
impl Tokenizer for TokenizerService {
    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let mut log = RpcLog::start("Tokenize", &request, request.get_ref().values.len());
        let result = async {
            self.admit(&mut log, &request, &[Action::Tokenize], &request.get_ref().collection)?;
            let proto::TokenizeRequest { collection, values } = request.into_inner();
            let values = values.into_iter().map(PiiValue::new).collect();
            let results = self.vault.tokenize(&collection, values).await?;
            let results = results
                .into_iter()
                .map(|r| proto::TokenizeResult {
                    outcome: Some(match r {
                        Ok(token) => tokenize_result::Outcome::Token(token.into_string()),
                        Err(e) => tokenize_result::Outcome::Error(item_error(&e)),
                    }),
                })
                .collect();
            Ok(Response::new(proto::TokenizeResponse { results }))
        }
        .await;
        log.finish(result)
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let mut log = RpcLog::start("Detokenize", &request, request.get_ref().tokens.len());
        let result = async {
            let action = self.admit(
                &mut log,
                &request,
                &[Action::Detokenize, Action::DetokenizeMasked],
                &request.get_ref().collection,
            )?;
            let masked = action == Action::DetokenizeMasked;
            if masked {
                log.method = "Detokenize(masked)";
            }
            let proto::DetokenizeRequest { collection, tokens } = request.into_inner();
            let results = if masked {
                self.vault.detokenize_masked(&collection, tokens).await?
            } else {
                self.vault.detokenize(&collection, tokens).await?
            };
            let results = results
                .into_iter()
                .map(|r| match r {
                    Ok(value) => proto::DetokenizeResult {
                        outcome: Some(detokenize_result::Outcome::Value(value.expose_secret().to_owned())),
                        masked,
                    },
                    Err(e) => proto::DetokenizeResult {
                        outcome: Some(detokenize_result::Outcome::Error(item_error(&e))),
                        masked: false,
                    },
                })
                .collect();
            Ok(Response::new(proto::DetokenizeResponse { results }))
        }
        .await;
        log.finish(result)
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let mut log = RpcLog::start("Delete", &request, request.get_ref().tokens.len());
        let result = async {
            self.admit(&mut log, &request, &[Action::Delete], &request.get_ref().collection)?;
            let proto::DeleteRequest { collection, tokens } = request.into_inner();
            let results = self.vault.delete(&collection, tokens).await?;
            let results = results
                .into_iter()
                .map(|r| proto::DeleteResult {
                    outcome: Some(match r {
                        Ok(()) => delete_result::Outcome::Deleted(true),
                        Err(e) => delete_result::Outcome::Error(item_error(&e)),
                    }),
                })
                .collect();
            Ok(Response::new(proto::DeleteResponse { results }))
        }
        .await;
        log.finish(result)
    }
}
