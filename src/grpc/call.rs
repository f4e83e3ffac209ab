//! One RPC in progress: identity, log line and audit record of a failure,
//! shared by every service.

use std::time::Instant;

use tonic::{Request, Status};

use super::server::{ConnInfo, Live};
use super::{Failure, code_name};
use crate::policy::Action;
use crate::vault::{Requester, Vault};

/// One RPC in progress: who asked, from where, and what for. It leaves one
/// log line and, when the call fails, one audit record (successful calls
/// are recorded by the vault in the same transaction as their effect).
/// Never a value.
pub(super) struct Call {
    pub(super) method: &'static str,
    action: &'static str,
    started: Instant,
    pub(super) who: Requester,
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
    pub(super) fn start<T>(
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
    pub(super) fn admit<T>(
        &mut self,
        live: &Live,
        request: &Request<T>,
        actions: &[Action],
    ) -> Result<Action, Failure> {
        let caller = live.authenticate(request.extensions().get::<ConnInfo>())?;
        caller.as_str().clone_into(&mut self.who.caller);
        self.authenticated = true;
        let action = live.authorize(&caller, actions, &self.collection)?;
        self.action = action.as_str();
        Ok(action)
    }

    pub(super) async fn finish<T>(self, vault: &Vault, live: &Live, result: Result<T, Failure>) -> Result<T, Status> {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let (result, outcome) = match result {
            Ok(value) => (Ok(value), "OK"),
            Err(failure) => {
                let detail = failure.to_string();
                let status = Status::from(failure);
                let outcome = code_name(status.code());
                if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
                    let peer_ip = self.who.peer.rsplit_once(':').map_or(self.who.peer.as_str(), |(ip, _)| ip);
                    let subject = if self.authenticated { self.who.caller.as_str() } else { peer_ip };
                    live.alerts.note(subject, "refused requests");
                }
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
