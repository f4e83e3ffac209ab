//! The edge, before any request body is read: authentication, the request
//! rate limit and a first authorization run here, as a tower layer in
//! front of every piivault service, so that a caller without a grant (or
//! without a valid certificate, or over its rate) is refused without the
//! server buffering or decoding what it sent. [`DeadlineLayer`] gives every
//! request a server-side deadline.
//!
//! Health and reflection pass through: they carry nothing (and the
//! connection itself is authenticated and re-checked, see `server`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;

use super::call::Call;
use super::server::{ConnInfo, Live};
use crate::audit::Event;
use crate::policy::Action;
use crate::vault::Vault;

/// Set on a request the edge admitted: its rate limit is already applied.
#[derive(Debug, Clone, Copy)]
pub struct Admitted;

/// What the edge knows of a method from its path: its name (for logs and
/// metrics), its audit event, and the actions any of which it needs.
struct Route {
    method: &'static str,
    event: Event,
    actions: &'static [Action],
}

/// Every piivault method, by its HTTP/2 path.
fn route(path: &str) -> Option<Route> {
    let (method, event, actions): (&'static str, Event, &'static [Action]) = match path {
        "/piivault.v1.Tokenizer/Tokenize" => ("Tokenize", Event::Tokenize, &[Action::Tokenize]),
        "/piivault.v1.Tokenizer/Detokenize" => {
            ("Detokenize", Event::Detokenize, &[Action::Detokenize, Action::DetokenizeMasked])
        }
        "/piivault.v1.Tokenizer/Delete" => ("Delete", Event::Delete, &[Action::Delete]),
        "/piivault.v1.Audit/Query" => ("AuditQuery", Event::AuditQuery, &[Action::Audit]),
        "/piivault.v1.Audit/Verify" => ("AuditVerify", Event::AuditVerify, &[Action::Audit]),
        "/piivault.v1.Admin/Backup" => ("Backup", Event::Backup, &[Action::Backup]),
        "/piivault.v1.Admin/RotateRootKey" => ("RotateRootKey", Event::RotateRootKey, &[Action::RotateRoot]),
        "/piivault.v1.Admin/ListKeys" => ("ListKeys", Event::ListKeys, &[Action::Admin]),
        "/piivault.v1.Admin/RotateDataKey" => ("RotateDataKey", Event::RotateDataKey, &[Action::Admin]),
        "/piivault.v1.Admin/RotateIndexKey" => ("RotateIndexKey", Event::RotateIndexKey, &[Action::Admin]),
        "/piivault.v1.Admin/Reencrypt" => ("Reencrypt", Event::Reencrypt, &[Action::Admin]),
        "/piivault.v1.Admin/RetireKeyVersion" => ("RetireKeyVersion", Event::RetireKeyVersion, &[Action::Admin]),
        "/piivault.v1.Admin/ReloadPolicy" => ("ReloadPolicy", Event::ReloadPolicy, &[Action::Admin]),
        // Health, reflection, and unknown methods (UNIMPLEMENTED, without
        // reading a body).
        _ => return None,
    };
    Some(Route { method, event, actions })
}

/// The layer: wraps the routes.
#[derive(Clone)]
pub struct EdgeLayer {
    live: Arc<Live>,
    vault: Vault,
}

impl EdgeLayer {
    /// Checks requests against `live` and records refusals in `vault`.
    pub fn new(live: Arc<Live>, vault: Vault) -> Self {
        Self { live, vault }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner, live: self.live.clone(), vault: self.vault.clone() }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    live: Arc<Live>,
    vault: Vault,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Edge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one that serves.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (live, vault) = (self.live.clone(), self.vault.clone());
        Box::pin(async move {
            let Some(route) = route(request.uri().path()) else { return inner.call(request).await };
            let conn = request.extensions().get::<ConnInfo>().cloned();
            let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let mut call = Call::begin(route.method, route.event, conn.as_ref(), request_id.as_deref(), "", 0);
            if let Err(failure) = call.admit_early(&live, conn.as_ref(), route.actions) {
                let status = call.finish(&vault, &live, Err::<(), _>(failure)).await.err();
                return Ok(status.unwrap_or_else(|| Status::internal("refused")).into_http());
            }
            request.extensions_mut().insert(Admitted);
            inner.call(request).await
        })
    }
}

/// Gives every data request (the `Tokenizer` service) a server-side
/// deadline: one that has not answered by then is dropped and answered
/// `DEADLINE_EXCEEDED`. Dropping one is safe: a write already queued commits
/// with its audit record, and a read's values never leave. Admin and audit
/// operations are not cut off part-way (a root rotation or a backup dropped
/// half done would leave state behind); they need grants that are given to
/// operators.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer(pub Duration);

/// The paths the deadline applies to.
const DEADLINE_SERVICE: &str = "/piivault.v1.Tokenizer/";

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, deadline: self.0 }
    }
}

/// The service [`DeadlineLayer`] makes.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    deadline: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let (answer, deadline) = (self.inner.call(request), self.deadline);
        if !path.starts_with(DEADLINE_SERVICE) {
            return Box::pin(answer);
        }
        Box::pin(async move {
            if let Ok(answer) = tokio::time::timeout(deadline, answer).await {
                return answer;
            }
            tracing::warn!(path, "request over the server's deadline: cancelled");
            Ok(Status::deadline_exceeded("the request did not finish within the server's deadline").into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_over_the_deadline_is_answered_deadline_exceeded() {
        let slow = tower::service_fn(|request: http::Request<()>| async move {
            let wait = if request.uri().path().ends_with("/Slow") { 120 } else { 1 };
            tokio::time::sleep(Duration::from_secs(wait)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut service = DeadlineLayer(Duration::from_mins(1)).layer(slow);
        let status = |response: &http::Response<tonic::body::Body>| {
            response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
        };
        let request = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let fast = service.ready().await.unwrap().call(request("/piivault.v1.Tokenizer/Fast")).await.unwrap();
        assert_eq!(status(&fast), None, "answered in time: the inner answer, untouched");
        let slow = service.ready().await.unwrap().call(request("/piivault.v1.Tokenizer/Slow")).await.unwrap();
        assert_eq!(status(&slow).as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        // An admin operation is never cut off part-way.
        let backup = service.ready().await.unwrap().call(request("/piivault.v1.Admin/Slow")).await.unwrap();
        assert_eq!(status(&backup), None);
    }
}
