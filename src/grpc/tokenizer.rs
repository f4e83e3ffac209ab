//! The `piivault.v1.Tokenizer` service.

use std::sync::Arc;
use tonic::{Request, Response, Status};

use super::call::Call;
use super::item_error;
use super::limits::Metered;
use super::proto::tokenizer_server::Tokenizer;
use super::proto::{self, delete_result, detokenize_result, tokenize_result};
use super::server::Live;
use crate::audit::Event;
use crate::policy::Action;
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

#[tonic::async_trait]
impl Tokenizer for TokenizerService {
    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Tokenize", Event::Tokenize, &request, &body.collection, body.values.len());
        let (body_collection, call_items) = (body.collection.clone(), body.values.len());
        let result = async {
            call.admit(&self.live, &request, &[Action::Tokenize])?;
            call.limit(&self.live, Metered::Tokenize)?;
            let deterministic = self.vault.is_deterministic(&body_collection);
            if deterministic {
                self.live.limit_deterministic_hits(call.caller()?, call_items)?;
            }
            let proto::TokenizeRequest { collection, values } = request.into_inner();
            let values = values.into_iter().map(PiiValue::new).collect();
            let tokenized = self.vault.tokenize_counted(&call.who, &collection, values).await?;
            if deterministic {
                self.live.count_deterministic_hits(call.caller()?, tokenized.existing);
            }
            let results = tokenized.results;
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
        call.finish(&self.vault, &self.live, result).await
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Detokenize", Event::Detokenize, &request, &body.collection, body.tokens.len());
        let result = async {
            let action = call.admit(&self.live, &request, &[Action::Detokenize, Action::DetokenizeMasked])?;
            let masked = action == Action::DetokenizeMasked;
            if masked {
                call.method = "Detokenize(masked)";
            }
            call.limit(&self.live, Metered::Detokenize)?;
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
        call.finish(&self.vault, &self.live, result).await
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let body = request.get_ref();
        let mut call = Call::start("Delete", Event::Delete, &request, &body.collection, body.tokens.len());
        let result = async {
            call.admit(&self.live, &request, &[Action::Delete])?;
            call.limit(&self.live, Metered::Delete)?;
            let proto::DeleteRequest { collection, tokens } = request.into_inner();
            let results = self.vault.delete(&call.who, &collection, tokens).await?;
            let misses = results.iter().filter(|r| matches!(r, Err(crate::error::ItemError::NotFound))).count();
            self.live.count_delete_misses(call.caller()?, misses);
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
        call.finish(&self.vault, &self.live, result).await
    }
}
