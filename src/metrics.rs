//! Prometheus metrics, served in the text exposition format on a listener
//! of their own (loopback by default; `server.metrics_listen`).
//!
//! Labels are fixed vocabularies (method, gRPC outcome, reason) or names
//! from the configuration (collection, key purpose and state): never a
//! value, a token or caller input. Counters live in one process-wide set,
//! [`metrics()`]; gauges about the store are read when scraped.

use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::vault::Vault;

/// A request's method and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `Tokenize`, `Detokenize`, `Detokenize(masked)`, `Delete`, an admin or
    /// audit method.
    pub method: &'static str,
    /// The gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub outcome: &'static str,
}

/// A method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    /// As in [`Outcome::method`].
    pub method: &'static str,
}

/// Why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// A fixed word per kind of refusal.
    pub reason: &'static str,
}

/// A part of the configuration that reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Part {
    /// `policy` or `tls`.
    pub part: &'static str,
}

/// A configured collection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectionLabel {
    /// Its name from `config.toml`.
    pub collection: String,
}

/// A root-key operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RootKeyLabels {
    /// `seal` (init, rotation) or `unseal`.
    pub operation: &'static str,
    /// `passphrase`, `raw` or `pkcs11`.
    pub provider: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Key versions of one kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The collection.
    pub collection: String,
    /// `data` or `index`.
    pub purpose: String,
    /// `primary`, `active`, `retiring`, `retired`, ...
    pub state: String,
}

/// Every metric piivault exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by method and outcome.
    pub requests: Family<Outcome, Counter>,
    /// Request latency by method, seconds.
    pub latency: Family<Method, Histogram, fn() -> Histogram>,
    /// Requests refused for identity or grants (`unauthenticated`,
    /// `permission_denied`).
    pub denials: Family<Reason, Counter>,
    /// TLS handshakes that failed (`refused`, `timeout`, `no_client_certificate`).
    pub handshake_failures: Family<Reason, Counter>,
    /// Connections closed at accept over `server.max_connections`.
    pub connections_refused: Counter,
    /// Messages that did not decode as their method's protobuf type.
    pub malformed_messages: Counter,
    /// WARN alerts raised for repeated refusals of one caller or address.
    pub alerts: Counter,
    /// Requests refused by a caller's limits (`requests`: the rate limit;
    /// `detokenize_values`: the bulk-detokenize guard; `tokenize_values`,
    /// `delete_tokens`, `deterministic_hits`: the other quotas).
    pub rate_limited: Family<Reason, Counter>,
    /// Tokenized values of deterministic collections that already had a
    /// token (each confirms a guess about a token's value).
    pub deterministic_hits: Counter,
    /// Deleted tokens that were not found.
    pub delete_misses: Counter,
    /// Requests per group commit (one durable transaction).
    pub commit_batch: Histogram,
    /// Group commits whose joined writes (PostgreSQL: tokenizes and reads'
    /// audit records in one statement) were refused and ran one by one.
    pub joined_writes_refused: Counter,
    /// Reloads of policy or TLS material that failed (`policy`, `tls`);
    /// the previous configuration stays in force.
    pub reload_failures: Family<Part, Counter>,
    /// 1 while the last reload of that part failed, else 0.
    pub reload_failing: Family<Part, Gauge>,
    /// 1 until the root key is unsealed and the store open, then 0.
    pub sealed: Gauge,
    /// Root-key seals and unseals by provider and outcome.
    pub root_key_operations: Family<RootKeyLabels, Counter>,
    /// Live tokens per collection (read when scraped).
    tokens: Family<CollectionLabel, Gauge>,
    /// Key versions per collection, purpose and state (read when scraped).
    key_versions: Family<KeyLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to ~4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("piivault");
        let metrics = Self {
            registry: Registry::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            denials: Family::default(),
            handshake_failures: Family::default(),
            connections_refused: Counter::default(),
            malformed_messages: Counter::default(),
            alerts: Counter::default(),
            rate_limited: Family::default(),
            deterministic_hits: Counter::default(),
            delete_misses: Counter::default(),
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            joined_writes_refused: Counter::default(),
            reload_failures: Family::default(),
            reload_failing: Family::default(),
            sealed: Gauge::default(),
            root_key_operations: Family::default(),
            tokens: Family::default(),
            key_versions: Family::default(),
        };
        registry.register("requests", "gRPC requests by method and outcome", metrics.requests.clone());
        registry.register("request_duration_seconds", "gRPC request latency", metrics.latency.clone());
        registry.register("denials", "requests refused for identity or grants", metrics.denials.clone());
        registry.register("tls_handshake_failures", "failed TLS handshakes", metrics.handshake_failures.clone());
        registry.register(
            "connections_refused",
            "connections closed at accept over server.max_connections",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "malformed_messages",
            "messages that did not decode as their method's protobuf type (answered INVALID_ARGUMENT)",
            metrics.malformed_messages.clone(),
        );
        registry.register("alerts", "alerts raised for repeated refusals", metrics.alerts.clone());
        registry.register("rate_limited", "requests refused by a caller's limits", metrics.rate_limited.clone());
        registry.register(
            "deterministic_hits",
            "tokenized values of deterministic collections that already had a token",
            metrics.deterministic_hits.clone(),
        );
        registry.register("delete_misses", "deleted tokens that were not found", metrics.delete_misses.clone());
        registry.register(
            "store_commit_batch_requests",
            "requests per group commit (one durable transaction)",
            metrics.commit_batch.clone(),
        );
        registry.register(
            "store_joined_writes_refused",
            "group commits whose joined writes were refused and ran one by one",
            metrics.joined_writes_refused.clone(),
        );
        registry.register(
            "reload_failures",
            "failed reloads of policy or TLS material",
            metrics.reload_failures.clone(),
        );
        registry.register(
            "reload_failing",
            "1 while the last reload of policy or TLS material failed",
            metrics.reload_failing.clone(),
        );
        registry.register("sealed", "1 until the root key is unsealed and the store open", metrics.sealed.clone());
        registry.register(
            "root_key_operations",
            "root-key seals and unseals by provider (passphrase, raw, pkcs11) and outcome",
            metrics.root_key_operations.clone(),
        );
        registry.register("tokens", "live tokens per collection", metrics.tokens.clone());
        registry.register(
            "key_versions",
            "key versions per collection, purpose and state",
            metrics.key_versions.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts one finished request.
    pub fn request(&self, method: &'static str, outcome: &'static str, latency: Duration) {
        self.requests.get_or_create(&Outcome { method, outcome }).inc();
        self.latency.get_or_create(&Method { method }).observe(latency.as_secs_f64());
    }

    /// Counts one event of kind `reason` in `family`.
    pub fn count(family: &Family<Reason, Counter>, reason: &'static str) {
        family.get_or_create(&Reason { reason }).inc();
    }

    /// Counts one root-key seal or unseal.
    pub fn root_key_operation(&self, operation: &'static str, provider: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.root_key_operations.get_or_create(&RootKeyLabels { operation, provider, outcome }).inc();
    }

    /// Notes how a reload of `part` (`policy` or `tls`) went.
    pub fn reloaded(&self, part: &'static str, ok: bool) {
        let part = Part { part };
        if !ok {
            self.reload_failures.get_or_create(&part).inc();
        }
        self.reload_failing.get_or_create(&part).set(i64::from(!ok));
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// How long store gauges read at one scrape are served to the next ones.
const STORE_GAUGES_TTL: Duration = Duration::from_secs(10);

/// What the metrics endpoint serves from: the vault once it is open.
#[derive(Clone, Default)]
pub struct Exporter {
    vault: Arc<OnceLock<Vault>>,
    refreshed: Arc<Mutex<Option<Instant>>>,
}

impl Exporter {
    /// Starts the exporter sealed: `sealed` is 1 until [`Exporter::unsealed`].
    pub fn new() -> Self {
        metrics().sealed.set(1);
        Self::default()
    }

    /// The vault is open: gauges about the store from now on.
    pub fn unsealed(&self, vault: Vault) {
        let _ = self.vault.set(vault);
        metrics().sealed.set(0);
    }

    /// Reads the store gauges (at most every few seconds), then renders every
    /// metric in the Prometheus text format.
    pub async fn render(&self) -> String {
        if let Some(vault) = self.vault.get() {
            let due = {
                let mut refreshed = self.refreshed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let due = refreshed.is_none_or(|at| at.elapsed() >= STORE_GAUGES_TTL);
                if due {
                    *refreshed = Some(Instant::now());
                }
                due
            };
            if due {
                refresh_store_gauges(vault).await;
            }
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &metrics().registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }
}

async fn refresh_store_gauges(vault: &Vault) {
    let m = metrics();
    match vault.key_summary().await {
        Ok(summary) => {
            m.tokens.clear();
            m.key_versions.clear();
            for row in summary {
                let labels = KeyLabels {
                    collection: row.collection.clone(),
                    purpose: row.purpose.as_str().to_owned(),
                    state: row.state.as_str().to_owned(),
                };
                m.key_versions.get_or_create(&labels).set(i64::try_from(row.versions).unwrap_or(i64::MAX));
                if labels.purpose == "data" {
                    m.tokens
                        .get_or_create(&CollectionLabel { collection: row.collection })
                        .inc_by(i64::try_from(row.live).unwrap_or(i64::MAX));
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "metrics: cannot read key and token counts"),
    }
}

/// Serves `GET /metrics` on `listener` (until the task is dropped).
pub async fn serve(listener: tokio::net::TcpListener, exporter: Exporter) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let exporter = exporter.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    exporter.render().await,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
