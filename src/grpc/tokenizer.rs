//! The `piivault.v1.Tokenizer` service.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::proto::tokenizer_server::Tokenizer;
use super::proto::{self, delete_result, detokenize_result, tokenize_result};
use super::server::{ConnInfo, Live};
use super::{Failure, code_name, item_error};
use crate::policy::Action;
use crate::value::PiiValue;
use crate::vault::{Requester, Vault};

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

/// One RPC in progress: who asked, from where, and what for. It leaves one
/// log line and, when the call fails, one audit record (successful calls
/// are recorded by the vault in the same transaction as their effect).
/// Never a value.
struct Call {
    method: &'static str,
    action: &'static str,
    started: Instant,
    who: Requester,
    authenticated: bool,
    collection: String,
    items: usize,
}

/// Request ids longer than this, or with other characters than
/// `[A-Za-z0-9._-]`, are replaced by a fresh one.
const MAX_REQUEST_ID: usize = 64;

fn request_id<T>(request: &Request<T>) -> String {
    let given = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).filter(|id| {
        !id.is_empty()
            && id.len() <= MAX_REQUEST_ID
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    });
    given.map_or_else(
        || {
            let mut bytes = [0u8; 8];
            // A failing CSPRNG leaves a zero id; the record is still written.
            let _ = crate::crypto::fill_random(&mut bytes);
            hex::encode(bytes)
        },
        str::to_owned,
    )
}

impl Call {
    fn start<T>(
        method: &'static str,
        action: &'static str,
        request: &Request<T>,
        collection: &str,
        items: usize,
    ) -> Self {
        let peer = request.extensions().get::<ConnInfo>().map(|c| c.peer.to_string()).unwrap_or_default();
        Self {
            method,
            action,
            started: Instant::now(),
            who: Requester { caller: String::new(), peer, request_id: request_id(request) },
            authenticated: false,
            collection: collection.to_owned(),
            items,
        }
    }

    /// Authenticates and authorizes; from here on the caller is known to the
    /// log line and the audit record.
    fn admit<T>(&mut self, live: &Live, request: &Request<T>, actions: &[Action]) -> Result<Action, Failure> {
        let caller = live.authenticate(request.extensions().get::<ConnInfo>())?;
        caller.as_str().clone_into(&mut self.who.caller);
        self.authenticated = true;
        let action = live.authorize(&caller, actions, &self.collection)?;
        self.action = action.as_str();
        Ok(action)
    }

    async fn finish<T>(self, vault: &Vault, result: Result<T, Failure>) -> Result<T, Status> {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let (result, outcome) = match result {
            Ok(value) => (Ok(value), "OK"),
            Err(failure) => {
                let detail = failure.to_string();
                let status = Status::from(failure);
                let outcome = code_name(status.code());
                vault.audit_failure(&self.who, self.action, &self.collection, self.items, outcome, &detail).await;
                (Err(status), outcome)
            }
        };
        let caller = if self.authenticated { self.who.caller.as_str() } else { "-" };
        // Only a configured collection's name is logged: the field is caller
        // input, and a misbehaving client could put anything in it.
        let collection = if vault.has_collection(&self.collection) { self.collection.as_str() } else { "-" };
        tracing::info!(
            caller,
            method = self.method,
            collection,
            items = self.items,
            outcome,
            latency_ms,
            peer = %self.who.peer,
            request_id = %self.who.request_id,
            "rpc"
        );
        result
    }
}

#[tonic::async_trait]
impl Tokenizer for TokenizerService {
    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Tokenize", "tokenize", &request, &body.collection, body.values.len());
        let result = async {
            call.admit(&self.live, &request, &[Action::Tokenize])?;
            let proto::TokenizeRequest { collection, values } = request.into_inner();
            let values = values.into_iter().map(PiiValue::new).collect();
            let results = self.vault.tokenize(&call.who, &collection, values).await?;
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
        call.finish(&self.vault, result).await
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Detokenize", "detokenize", &request, &body.collection, body.tokens.len());
        let result = async {
            let action = call.admit(&self.live, &request, &[Action::Detokenize, Action::DetokenizeMasked])?;
            let masked = action == Action::DetokenizeMasked;
            if masked {
                call.method = "Detokenize(masked)";
            }
            let proto::DetokenizeRequest { collection, tokens } = request.into_inner();
            let results = if masked {
                self.vault.detokenize_masked(&call.who, &collection, tokens).await?
            } else {
                self.vault.detokenize(&call.who, &collection, tokens).await?
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
        call.finish(&self.vault, result).await
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Delete", "delete", &request, &body.collection, body.tokens.len());
        let result = async {
            call.admit(&self.live, &request, &[Action::Delete])?;
            let proto::DeleteRequest { collection, tokens } = request.into_inner();
            let results = self.vault.delete(&call.who, &collection, tokens).await?;
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
        call.finish(&self.vault, result).await
    }
}
