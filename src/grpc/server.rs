//! Serving: the TCP listener, TLS handshakes, per-connection identity,
//! live reload of policy and CRL, health, reflection and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::alerts::{Alerts, Subject};
use super::handshakes::{HandshakeLedger, PendingHandshakes, Refusal};
use super::limits::{Limiter, Metered};
use super::proto::admin_server::AdminServer;
use super::proto::audit_server::AuditServer;
use super::proto::tokenizer_server::TokenizerServer;
use super::{AdminService, AuditService, EdgeError, TokenizerService};
use crate::audit::{Event, Outcome};
use crate::config::{CollectionName, Config};
use crate::metrics::{Metrics, metrics};
use crate::policy::{Action, CallerId, Policy, PolicyError};
use crate::tls::{PeerCert, Revocations, ServerTls, TlsError, now_unix};
use crate::vault::Vault;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(String),
}

/// What the server knows about a connection: where it comes from and the
/// client certificate it was verified with.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The verified client certificate.
    pub cert: Arc<PeerCert>,
}

/// The state that a reload (SIGHUP) replaces: policy and TLS material.
pub struct Live {
    trust_domain: String,
    policy_path: std::path::PathBuf,
    pki_dir: std::path::PathBuf,
    collections: std::collections::BTreeSet<CollectionName>,
    policy: RwLock<Arc<Policy>>,
    tls: RwLock<Arc<ServerTls>>,
    /// The CRL in force, reloaded on its own: a broken server certificate
    /// file keeps the previous TLS configuration, never an older CRL.
    revocations: RwLock<Arc<Revocations>>,
    /// Repeated refusals.
    pub alerts: Alerts,
    limiter: Limiter,
    /// Refused handshakes beyond the first of each source and reason, for
    /// the window's summary record.
    handshakes: HandshakeLedger,
    /// Handshakes in progress per source.
    pending: Arc<PendingHandshakes>,
}

impl Live {
    /// Loads policy and TLS material named by `config`.
    pub fn load(config: &Config) -> Result<Self, ServeError> {
        let collections = config.collections.keys().cloned().collect();
        let policy = Policy::load(&config.server.policy, &collections)?;
        let tls = ServerTls::load(&config.server.pki_dir)?;
        Ok(Self {
            trust_domain: config.server.trust_domain.clone(),
            policy_path: config.server.policy.clone(),
            pki_dir: config.server.pki_dir.clone(),
            collections,
            policy: RwLock::new(Arc::new(policy)),
            revocations: RwLock::new(Arc::new(tls.revocations.clone())),
            tls: RwLock::new(Arc::new(tls)),
            alerts: Alerts::new(config.audit.alert_window, config.audit.alert_threshold),
            limiter: Limiter::default(),
            handshakes: HandshakeLedger::default(),
            pending: Arc::default(),
        })
    }

    /// Re-reads the policy and the TLS material (CRL, server certificate).
    /// A part that fails to load keeps its previous version, and the error
    /// is logged and returned; the other part is still replaced.
    pub fn reload(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        match Policy::load(&self.policy_path, &self.collections) {
            Ok(policy) => {
                *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
                tracing::info!(path = %self.policy_path.display(), "policy reloaded");
                metrics().reloaded("policy", true);
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload failed; keeping the previous policy");
                metrics().reloaded("policy", false);
                problems.push(e.to_string());
            }
        }
        // The CRL comes with the TLS material, or, when that fails to load,
        // on its own: whatever became of the rest, the newest good CRL is in
        // force.
        let revocations = match ServerTls::load(&self.pki_dir) {
            Ok(tls) => {
                let revocations = tls.revocations.clone();
                *self.tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tls);
                tracing::info!("TLS material reloaded");
                metrics().reloaded("tls", true);
                Ok(revocations)
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the previous certificates");
                metrics().reloaded("tls", false);
                if !matches!(e, TlsError::CrlExpired { .. }) {
                    problems.push(e.to_string());
                }
                Revocations::load(&self.pki_dir.join(crate::pki::CRL), now_unix())
            }
        };
        match revocations {
            Ok(revocations) => {
                let revoked = revocations.serials.len();
                *self.revocations.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(revocations);
                tracing::info!(revoked, "CRL reloaded");
                metrics().reloaded("crl", true);
            }
            Err(e) => {
                tracing::error!(alert = true, error = %e, "CRL reload failed; keeping the previous CRL until its nextUpdate");
                metrics().reloaded("crl", false);
                problems.push(e.to_string());
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// What the files `reload` reads look like now (name, size and
    /// modification time of the policy and of every file in the PKI
    /// directory): a change means a reload is due.
    pub fn files_stamp(&self) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
        let mut paths = vec![self.policy_path.clone()];
        if let Ok(entries) = std::fs::read_dir(&self.pki_dir) {
            paths.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(&path).ok();
                let (len, modified) = meta.map_or((0, None), |m| (m.len(), m.modified().ok()));
                (path, len, modified)
            })
            .collect()
    }

    fn tls(&self) -> Arc<ServerTls> {
        self.tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn revocations(&self) -> Arc<Revocations> {
        self.revocations.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Who is calling: the caller named by the connection's verified client
    /// certificate, provided that certificate has not expired or been
    /// revoked since the handshake, and the CRL that says so is in date.
    pub fn authenticate(&self, conn: Option<&ConnInfo>) -> Result<CallerId, EdgeError> {
        let conn = conn.ok_or_else(|| EdgeError::Unauthenticated("no client certificate".into()))?;
        let caller = conn.cert.identity.clone().map_err(|e| EdgeError::Unauthenticated(e.to_string()))?;
        self.still_valid(&conn.cert)?;
        Ok(caller)
    }

    /// Whether a certificate verified at the handshake still stands now:
    /// not expired, not revoked by the CRL in force, and that CRL not past
    /// its `nextUpdate` (fail closed: without a current CRL, revocation
    /// cannot be checked).
    fn still_valid(&self, cert: &PeerCert) -> Result<(), EdgeError> {
        let now = now_unix();
        if cert.not_after < now {
            return Err(EdgeError::Unauthenticated("the client certificate has expired".into()));
        }
        let revocations = self.revocations();
        if revocations.serials.contains(&cert.serial) {
            return Err(EdgeError::Unauthenticated("the client certificate has been revoked".into()));
        }
        match revocations.next_update {
            Some(next) if next < now => Err(EdgeError::Precondition(format!(
                "revocation cannot be checked: the server's CRL expired at {} (its nextUpdate); the operator must re-sign it",
                crate::pki::format_time(next)
            ))),
            _ => Ok(()),
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the policy grants `caller` any of `actions` at all (on some
    /// collection, or globally): what the edge can know before the body
    /// names the collection.
    pub fn grants_any(&self, caller: &CallerId, actions: &[Action]) -> bool {
        let policy = self.policy();
        actions.iter().any(|action| policy.grants_anywhere(caller, *action))
    }

    /// The one authorization decision: the first of `actions` the policy
    /// grants `caller` on `collection`.
    pub fn authorize(&self, caller: &CallerId, actions: &[Action], collection: &str) -> Result<Action, EdgeError> {
        let policy = self.policy();
        actions.iter().copied().find(|action| policy.allows(caller, *action, Some(collection))).ok_or(EdgeError::Denied)
    }

    /// Shares this node's quota use with the other nodes of `vault`'s
    /// store, and takes theirs in ([`Limiter::exchange`]).
    pub async fn exchange_quota_use(&self, vault: &crate::vault::Vault) -> Result<(), crate::error::VaultError> {
        self.limiter.exchange(vault).await
    }

    /// One request by `caller`, under its request rate limit. A refusal is
    /// counted and, repeated, raises an alert; it is not audited (a flood of
    /// refusals must not become a flood of writes).
    pub fn limit_request(&self, caller: &CallerId) -> Result<(), EdgeError> {
        let rate = self.policy().limits(caller).requests;
        if self.limiter.request(caller, rate, std::time::Instant::now()) {
            return Ok(());
        }
        Metrics::count(&metrics().rate_limited, "requests");
        self.alerts.note(&Subject::caller(caller.as_str()), "rate-limited requests");
        Err(EdgeError::RateLimited)
    }

    /// `values` of `kind` by `caller`, under its quota of that kind. A
    /// refusal is counted and logged as an alert (and audited by the call);
    /// a refused request uses none of the quota.
    pub fn limit(&self, caller: &CallerId, kind: Metered, values: usize) -> Result<(), EdgeError> {
        let quota = kind.quota(&self.policy().limits(caller));
        self.limiter
            .take(caller, kind, values, quota, std::time::Instant::now())
            .map_err(|quota| Self::quota_refusal(caller, kind, values, quota))
    }

    /// Refuses a request of a deterministic collection when `caller` has
    /// used up its quota of deterministic hits: what is counted only once
    /// the vault has answered ([`Live::count_deterministic_hits`]).
    pub fn limit_deterministic_hits(&self, caller: &CallerId, values: usize) -> Result<(), EdgeError> {
        let kind = Metered::DeterministicHits;
        let quota = kind.quota(&self.policy().limits(caller));
        match quota {
            Some(quota) if self.limiter.exhausted(caller, kind, Some(quota), std::time::Instant::now()) => {
                Err(Self::quota_refusal(caller, kind, values, quota))
            }
            _ => Ok(()),
        }
    }

    /// Counts `hits`: tokenized values of a deterministic collection that
    /// already had a token (each one confirms a guess about a token's
    /// value). Filling the quota raises an alert at once.
    pub fn count_deterministic_hits(&self, caller: &CallerId, hits: usize) {
        if hits == 0 {
            return;
        }
        metrics().deterministic_hits.inc_by(u64::try_from(hits).unwrap_or(u64::MAX));
        let kind = Metered::DeterministicHits;
        let quota = kind.quota(&self.policy().limits(caller));
        if self.limiter.count(caller, kind, hits, quota, std::time::Instant::now()) {
            tracing::warn!(alert = true, caller = %caller, hits, "deterministic-hit quota reached: this caller's tokenizes of deterministic collections are refused until its window frees");
        }
    }

    /// Counts `misses`: tokens a delete did not find. Guessing short shaped
    /// tokens shows as misses, alerted like refused requests.
    pub fn count_delete_misses(&self, caller: &CallerId, misses: usize) {
        if misses == 0 {
            return;
        }
        metrics().delete_misses.inc_by(u64::try_from(misses).unwrap_or(u64::MAX));
        self.alerts.note_many(&Subject::caller(caller.as_str()), "deletes of unknown tokens", misses);
    }

    /// Ends the window of refused handshakes: one audit record per source
    /// and reason that had more than its first, with how many more (in
    /// `items`). Best effort, like every failure record.
    pub async fn record_handshake_summaries(&self, vault: &Vault) {
        for (source, reason, more) in self.handshakes.drain() {
            let who = crate::vault::Requester { caller: String::new(), peer: source, request_id: String::new() };
            let detail = format!("{reason} (summary: {more} more refused in the window)");
            let items = usize::try_from(more).unwrap_or(usize::MAX);
            vault.audit_failure(&who, Event::Handshake, "", items, Outcome::Refused, &detail).await;
        }
    }

    fn quota_refusal(caller: &CallerId, kind: Metered, values: usize, quota: crate::policy::Quota) -> EdgeError {
        Metrics::count(&metrics().rate_limited, kind.label());
        let (max_values, window_s) = (quota.max_values, quota.window.as_secs());
        tracing::warn!(
            alert = true,
            caller = %caller,
            quota = kind.label(),
            requested = values,
            max_values,
            window_s,
            "per-caller quota: request refused"
        );
        EdgeError::Quota { kind, max_values, window_s }
    }
}

/// A TLS connection whose client certificate has been verified, carrying
/// what was learned from it into every request's extensions.
struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    info: ConnInfo,
    /// This connection's place under `server.max_connections`, given back
    /// when the connection closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Until the peer's first bytes after the handshake (the HTTP/2
    /// preface) arrive: when they must have. A peer that completes TLS and
    /// then says nothing would otherwise hold its connection slot forever
    /// (HTTP/2 keepalive only starts once HTTP/2 has).
    first_bytes_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How often the connection checks that its certificate still stands
    /// (not expired, not revoked): one that no longer does is closed, even
    /// while idle.
    recheck: tokio::time::Interval,
    live: Arc<Live>,
}

/// Requests one connection may have the server read and decode at once
/// (the others wait, their bytes held back by HTTP/2 flow control): with
/// `max_message_bytes`, what one connection can make the server buffer.
pub const DECODING_PER_CONNECTION: usize = 16;

/// How long requests in flight on a connection past its maximum age may
/// still run before it is closed.
const CONNECTION_AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How often an open connection re-checks its certificate.
const CONNECTION_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Connected for AuthenticatedStream {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.recheck.poll_tick(cx).is_ready() {
            if let Err(e) = self.live.still_valid(&self.info.cert) {
                tracing::warn!(peer = %self.info.peer, reason = %e, "connection closed: its client certificate no longer stands");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "client certificate no longer valid",
                )));
            }
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.first_bytes_deadline.is_none() {
            return read;
        }
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                self.first_bytes_deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.first_bytes_deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    tracing::warn!(peer = %self.info.peer, "connection closed: nothing sent after the TLS handshake");
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")))
                }
                _ => Poll::Pending,
            },
            ready @ Poll::Ready(_) => ready,
        }
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, runs each TLS handshake (bounded in time) on
/// its own task, and hands verified connections to the gRPC server.
fn accept_loop(
    listener: TcpListener,
    live: Arc<Live>,
    vault: Vault,
    settings: &crate::config::ServerSettings,
) -> ReceiverStream<Result<AuthenticatedStream, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let handshake_timeout = settings.handshake_timeout;
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    tokio::spawn(async move {
        loop {
            // Once the gRPC server stops taking connections (shutdown), stop
            // accepting them: the listener closes with this task.
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the cap, the connection is closed before any TLS work. Not
            // audited: that would turn a connection flood into a write flood;
            // logged, and counted towards an alert for the address.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "connection refused: server.max_connections reached");
                metrics().connections_refused.inc();
                live.alerts.note(&Subject::peer(peer.ip()), "connections over the cap");
                drop(tcp);
                continue;
            };
            // One address may have only so many handshakes in progress: a
            // peer that opens connections and says nothing cannot hold
            // every slot until the handshake timeout.
            let Some(pending) = live.pending.enter(Subject::peer(peer.ip())) else {
                tracing::debug!(%peer, "connection refused: too many handshakes in progress from this address");
                Metrics::count(&metrics().handshake_failures, "too_many_pending");
                live.alerts.note(&Subject::peer(peer.ip()), "connections over the per-address cap");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(live.tls().config.clone());
            let tx = tx.clone();
            let trust_domain = live.trust_domain.clone();
            let (live, vault) = (live.clone(), vault.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(pending);
                match handshake {
                    Ok(Ok(stream)) => {
                        let Some(der) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
                            tracing::warn!(%peer, "TLS handshake completed without a client certificate; dropped");
                            Metrics::count(&metrics().handshake_failures, "no_client_certificate");
                            return;
                        };
                        let cert = PeerCert::inspect(der.as_ref(), &trust_domain);
                        if let Err(problem) = &cert.identity {
                            tracing::warn!(
                                %peer, fingerprint = %cert.fingerprint, reason = %problem,
                                "client certificate names no caller; its requests will be refused"
                            );
                        }
                        let info = ConnInfo { peer, cert: Arc::new(cert) };
                        let first_bytes_deadline = Some(Box::pin(tokio::time::sleep(handshake_timeout)));
                        let mut recheck = tokio::time::interval_at(
                            tokio::time::Instant::now() + CONNECTION_RECHECK,
                            CONNECTION_RECHECK,
                        );
                        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let stream = AuthenticatedStream {
                            inner: stream,
                            info,
                            _slot: slot,
                            first_bytes_deadline,
                            recheck,
                            live: live.clone(),
                        };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        Metrics::count(&metrics().handshake_failures, "refused");
                        let reason = e.to_string();
                        if refused(&live, &vault, peer, &reason).await == Refusal::First {
                            tracing::warn!(%peer, error = %reason, "TLS handshake refused");
                        } else {
                            tracing::debug!(%peer, error = %reason, "TLS handshake refused");
                        }
                    }
                    Err(_) => {
                        Metrics::count(&metrics().handshake_failures, "timeout");
                        if refused(&live, &vault, peer, "handshake timed out").await == Refusal::First {
                            tracing::warn!(%peer, "TLS handshake timed out");
                        } else {
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How long a peer has to answer an HTTP/2 keepalive ping.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A refused handshake counts towards an alert for its address; the first
/// of its source and reason in a window goes on the record (and the log at
/// WARN) at once, the rest into the window's summary
/// ([`Live::record_handshake_summaries`]), so that junk connections flood
/// neither the trail nor the log.
async fn refused(live: &Live, vault: &Vault, peer: SocketAddr, reason: &str) -> Refusal {
    let source = Subject::peer(peer.ip());
    live.alerts.note(&source, "failed TLS handshakes");
    let refusal = live.handshakes.note(&source, reason);
    if refusal == Refusal::First {
        let who = crate::vault::Requester { caller: String::new(), peer: peer.to_string(), request_id: String::new() };
        vault.audit_failure(&who, Event::Handshake, "", 1, Outcome::Refused, reason).await;
    }
    refusal
}

/// Rewrites tonic's answer to an oversized message (`OUT_OF_RANGE`, "decoded
/// message length too large") into `RESOURCE_EXHAUSTED` with a clear message.
fn oversized_message_status<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // grpc-message is percent-encoded on the wire.
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the message is larger than the server's max_message_bytes"),
        );
    }
    response
}

/// Binds the listen address. Separate from [`serve`] so that a caller can
/// learn the bound port (`127.0.0.1:0`) before serving.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// Serves `vault` on `listener` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish, and returns.
pub async fn serve(
    config: &Config,
    vault: Vault,
    live: Arc<Live>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max = config.server.max_message_bytes;
    let audit = AuditServer::new(AuditService::new(vault.clone(), live.clone()));
    let admin = AdminServer::new(AdminService::new(vault.clone(), live.clone()));
    let audit_vault = vault.clone();
    let tokenizer = TokenizerServer::new(TokenizerService::new(vault, live.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TokenizerServer<TokenizerService>>().await;
    health.set_serving::<AuditServer<AuditService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(super::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    // Refused handshakes beyond each window's first per source and reason
    // go on the record as one summary per window, and once more at the end.
    let (summary_live, summary_vault, window) = (live.clone(), audit_vault.clone(), config.audit.alert_window);
    let summaries = tokio::spawn(async move {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + window, window);
        loop {
            every.tick().await;
            summary_live.record_handshake_summaries(&summary_vault).await;
        }
    });
    let (final_live, final_vault) = (live.clone(), audit_vault.clone());
    let edge = super::edge::EdgeLayer::new(live.clone(), audit_vault.clone());
    let incoming = accept_loop(listener, live, audit_vault, &config.server);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.server.max_concurrent_streams))
        // Requests decoded at once per connection: with the message size
        // cap, what one connection can make the server buffer.
        .concurrency_limit_per_connection(DECODING_PER_CONNECTION)
        .http2_keepalive_interval(Some(config.server.keepalive_interval))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(config.server.max_connection_age)
        .max_connection_age_grace(CONNECTION_AGE_GRACE)
        .layer(tower::util::MapResponseLayer::new(oversized_message_status))
        .layer(edge)
        .layer(super::edge::DeadlineLayer(config.server.request_timeout))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tokenizer)
        .add_service(audit)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ServeError::Transport(e.to_string()));
    summaries.abort();
    final_live.record_handshake_summaries(&final_vault).await;
    served
}
