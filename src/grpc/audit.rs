//! The `piivault.v1.Audit` service: compliance queries and verification.
//! Needs the `audit` grant; every call is itself on the record, and nothing
//! is answered unless that record was written.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Failure;
use super::call::Call;
use super::proto::audit_server::Audit;
use super::proto::{self, AuditEvent};
use super::server::Live;
use crate::audit::{AuditRecord, Event, Outcome};
use crate::policy::Action;
use crate::store::{AuditFilter, RecordMatch};
use crate::vault::Vault;

/// Records sent per page of a query stream.
const PAGE: usize = 500;

/// Serves `Audit` for one vault.
pub struct AuditService {
    vault: Vault,
    live: Arc<Live>,
}

impl AuditService {
    /// A service answering from `vault`, deciding access with `live`.
    pub fn new(vault: Vault, live: Arc<Live>) -> Self {
        Self { vault, live }
    }
}

fn optional(text: String) -> Option<String> {
    if text.is_empty() { None } else { Some(text) }
}

/// The wire form of a record.
pub fn event(chain: &str, seq: u64, record: AuditRecord, mac: &[u8]) -> AuditEvent {
    AuditEvent {
        chain: chain.to_owned(),
        seq,
        at_micros: record.at_micros,
        caller: record.caller,
        action: record.action,
        collection: record.collection,
        items: record.items,
        tokens: record.tokens,
        outcome: record.outcome,
        error_code: record.error_code,
        request_id: record.request_id,
        peer: record.peer,
        mac: hex::encode(mac),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<AuditEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Audit for AuditService {
    type QueryStream = EventStream;

    async fn query(&self, request: Request<proto::AuditQueryRequest>) -> Result<Response<EventStream>, Status> {
        let mut call = Call::start("AuditQuery", Event::AuditQuery, &request, "", 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Audit])?;
            let q = request.into_inner();
            let token = optional(q.token);
            let mut filter = AuditFilter {
                record: RecordMatch::Any,
                caller: optional(q.caller),
                action: optional(q.action),
                collection: optional(q.collection),
                outcome: optional(q.outcome),
                since: (q.since_micros != 0).then_some(q.since_micros),
                until: (q.until_micros != 0).then_some(q.until_micros),
                after_seq: 0,
                chain: None,
            };
            let only = optional(q.chain);
            let limit = if q.limit == 0 { usize::MAX } else { usize::try_from(q.limit).unwrap_or(usize::MAX) };
            // The auditor's own query goes on the record first (with the
            // token it asked about, if the vault ever issued it: the field
            // is free text, and a format-preserving token looks like the
            // value it stands for): no record, no answer.
            let collection = filter.collection.as_deref().filter(|c| self.vault.has_collection(c)).unwrap_or("");
            let mut record = call.who.record(Event::AuditQuery, collection, 0, Outcome::Ok);
            if let Some(token) = &token {
                filter.record = match self.vault.locate_issued(token).await? {
                    Some((issued, at)) => {
                        record.tokens.push(issued);
                        at
                    }
                    None => RecordMatch::Unissued,
                };
            }
            self.vault.record_about(record, filter.record).await?;
            let chains = match only {
                Some(chain) => vec![chain],
                None => self.vault.audit_chains().await?,
            };
            let (tx, rx) = tokio::sync::mpsc::channel(PAGE);
            let vault = self.vault.clone();
            // Every node's chain, this node's first, each in its order.
            tokio::spawn(async move {
                let mut left = limit;
                for chain in chains {
                    let mut filter = AuditFilter { chain: Some(chain.clone()), ..filter.clone() };
                    while left > 0 {
                        let page = match vault.query_audit(filter.clone(), PAGE.min(left)).await {
                            Ok(page) => page,
                            Err(e) => {
                                tracing::error!(error = %e, "audit query failed");
                                let _ = tx.send(Err(Status::unavailable("the audit trail cannot be read"))).await;
                                return;
                            }
                        };
                        let Some((last, _, _)) = page.last() else { break };
                        filter.after_seq = *last;
                        left = left.saturating_sub(page.len());
                        let short = page.len() < PAGE;
                        for (seq, record, mac) in page {
                            if tx.send(Ok(event(&chain, seq, record, &mac))).await.is_err() {
                                return;
                            }
                        }
                        if short {
                            break;
                        }
                    }
                }
            });
            let stream: EventStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok::<_, Failure>(Response::new(stream))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn verify(
        &self,
        request: Request<proto::AuditVerifyRequest>,
    ) -> Result<Response<proto::AuditVerifyResponse>, Status> {
        let mut call = Call::start("AuditVerify", Event::AuditVerify, &request, "", 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Audit])?;
            let verdict = self.vault.verify_audit().await?;
            let outcome = if verdict.is_ok() { "OK" } else { "BROKEN" };
            let mut record = call.who.record(Event::AuditVerify, "", 0, Outcome::Ok);
            outcome.clone_into(&mut record.error_code);
            self.vault.record(record).await?;
            Ok::<_, Failure>(Response::new(match verdict {
                Ok(head) => proto::AuditVerifyResponse {
                    ok: true,
                    records: head.seq,
                    head_mac: hex::encode(head.mac),
                    first_bad_seq: 0,
                    reason: String::new(),
                },
                Err(e) => proto::AuditVerifyResponse {
                    ok: false,
                    records: e.seq.saturating_sub(1),
                    head_mac: String::new(),
                    first_bad_seq: e.seq,
                    reason: e.reason.to_owned(),
                },
            }))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }
}
