//! One RPC in progress: identity, log line and audit record of a failure,
//! shared by every service.

use std::time::Instant;

use tonic::{Request, Status};

use super::alerts::Subject;
use super::limits::Metered;
use super::server::{ConnInfo, Live};
use super::{EdgeError, Failure};
use crate::audit::{Event, Outcome};
use crate::metrics::{Metrics, metrics};
use crate::policy::{Action, CallerId};
use crate::vault::{Requester, Vault};

/// One RPC in progress: who asked, from where, and what for. It leaves one
/// log line and, when the call fails, one audit record (successful calls
/// are recorded by the vault in the same transaction as their effect).
/// Never a value.
pub(super) struct Call {
    pub(super) method: &'static str,
    event: Event,
    started: Instant,
    pub(super) who: Requester,
    caller: Option<CallerId>,
    collection: String,
    items: usize,
}

/// How long a refusal by the rate limit is held before it is sent: 0.5 s
/// plus up to 1 s at random. A client that floods with many requests in
/// flight then waits on its own refusals instead of having them answered as
/// fast as it can send (each answer costs the server TLS and HTTP/2 work
/// that other callers need), and the random part spreads its retries out
/// instead of letting them arrive together. The held call keeps no request
/// body and no place in the store's queue; HTTP/2's
/// `max_concurrent_streams` bounds how many one connection can have held.
fn rate_limit_hold() -> std::time::Duration {
    let mut jitter = [0u8; 2];
    // A failing CSPRNG leaves no jitter; the hold still applies.
    let _ = crate::crypto::fill_random(&mut jitter);
    std::time::Duration::from_millis(500 + u64::from(u16::from_le_bytes(jitter) % 1000))
}

/// Request ids longer than this, or with other characters than
/// `[A-Za-z0-9._-]`, are replaced by a fresh one.
const MAX_REQUEST_ID: usize = 64;

fn request_id(given: Option<&str>) -> String {
    let given = given.filter(|id| {
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
        event: Event,
        request: &Request<T>,
        collection: &str,
        items: usize,
    ) -> Self {
        let given = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok());
        Self::begin(method, event, request.extensions().get::<ConnInfo>(), given, collection, items)
    }

    /// [`Call::start`] from what the edge sees before the body is read: the
    /// connection and the request id header.
    pub(super) fn begin(
        method: &'static str,
        event: Event,
        conn: Option<&ConnInfo>,
        request_id_header: Option<&str>,
        collection: &str,
        items: usize,
    ) -> Self {
        let peer = conn.map(|c| c.peer.to_string()).unwrap_or_default();
        Self {
            method,
            event,
            started: Instant::now(),
            who: Requester { caller: String::new(), peer, request_id: request_id(request_id_header) },
            caller: None,
            collection: collection.to_owned(),
            items,
        }
    }

    /// What the edge checks before a request's body is read (and so before
    /// it is buffered or decoded): the caller is authenticated, within its
    /// request rate, and holds at least one of `actions` somewhere. The
    /// collection is checked once the body is decoded ([`Call::admit`]).
    pub(super) fn admit_early(
        &mut self,
        live: &Live,
        conn: Option<&ConnInfo>,
        actions: &[Action],
    ) -> Result<(), Failure> {
        let caller = live.authenticate(conn)?;
        caller.as_str().clone_into(&mut self.who.caller);
        let caller = self.caller.insert(caller);
        live.limit_request(caller)?;
        if live.grants_any(caller, actions) { Ok(()) } else { Err(EdgeError::Denied.into()) }
    }

    /// Authenticates, applies the caller's request rate limit, and
    /// authorizes; from here on the caller is known to the log line and the
    /// audit record. The rate limit comes before the grants: refusing is
    /// work too (an audit record each).
    pub(super) fn admit<T>(
        &mut self,
        live: &Live,
        request: &Request<T>,
        actions: &[Action],
    ) -> Result<Action, Failure> {
        let caller = live.authenticate(request.extensions().get::<ConnInfo>())?;
        caller.as_str().clone_into(&mut self.who.caller);
        let caller = self.caller.insert(caller);
        // The edge applied the rate limit before the body was read.
        if request.extensions().get::<super::edge::Admitted>().is_none() {
            live.limit_request(caller)?;
        }
        let action = live.authorize(caller, actions, &self.collection)?;
        // A detokenize call on the masked grant is recorded as such.
        if action == Action::DetokenizeMasked {
            self.event = Event::DetokenizeMasked;
        }
        Ok(action)
    }

    /// The admitted caller.
    pub(super) fn caller(&self) -> Result<&CallerId, Failure> {
        Ok(self.caller.as_ref().ok_or_else(|| EdgeError::Unauthenticated("no caller".into()))?)
    }

    /// Applies the caller's quota of `kind` to this call's items.
    pub(super) fn limit(&self, live: &Live, kind: Metered) -> Result<(), Failure> {
        Ok(live.limit(self.caller()?, kind, self.items)?)
    }

    pub(super) async fn finish<T>(self, vault: &Vault, live: &Live, result: Result<T, Failure>) -> Result<T, Status> {
        let latency = self.started.elapsed();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        let authenticated = self.caller.is_some();
        let rate_limited = matches!(&result, Err(Failure::Edge(EdgeError::RateLimited)));
        let (result, outcome) = match result {
            Ok(value) => (Ok(value), Outcome::Ok),
            Err(failure) => {
                let on_record = matches!(&failure, Failure::Vault(e) if e.is_on_record());
                let detail = failure.to_string();
                let status = Status::from(failure);
                let outcome = super::outcome(status.code());
                let denial = match status.code() {
                    tonic::Code::PermissionDenied => Some("permission_denied"),
                    tonic::Code::Unauthenticated => Some("unauthenticated"),
                    _ => None,
                };
                if let Some(reason) = denial {
                    Metrics::count(&metrics().denials, reason);
                    let peer = self.who.peer.parse::<std::net::SocketAddr>().ok();
                    let subject = match (authenticated, peer) {
                        (false, Some(peer)) => Subject::peer(peer.ip()),
                        _ => Subject::caller(&self.who.caller),
                    };
                    live.alerts.note(&subject, "refused requests");
                }
                // Refusals by the rate limit are counted, not audited: see
                // `Live::limit_request`. A refusal the store recorded with
                // its check is not recorded twice.
                if !rate_limited && !on_record {
                    vault.audit_failure(&self.who, self.event, &self.collection, self.items, outcome, &detail).await;
                }
                (Err(status), outcome)
            }
        };
        let outcome = outcome.as_str();
        metrics().request(self.method, outcome, latency);
        let caller = if authenticated { self.who.caller.as_str() } else { "-" };
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
        if rate_limited {
            tokio::time::sleep(rate_limit_hold()).await;
        }
        result
    }
}
