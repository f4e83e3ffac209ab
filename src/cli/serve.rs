//! `piivault serve` and `piivault dev`: the server, its signals and its
//! periodic work.

use std::path::Path;

use anyhow::{Context as _, anyhow};

use super::init::{NewVault, init};
use super::{Classify as _, CliError, Failure, SecretArgs, Unseal, init_logging, load_config, open_vault, say};
use crate::config::{CONFIG_FILE, Config, LogFormat, RootKeySource};
use crate::datadir;
use crate::grpc::server::{self as grpc_server, Live};
use crate::pki::Ca;
use crate::policy::CallerId;
use crate::vault::Vault;

/// The signals a server handles, registered before it announces that it is
/// listening: a signal that arrives earlier would otherwise take its default
/// action and kill the process.
pub(super) struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Completes on SIGTERM or SIGINT.
pub(super) async fn termination(
    mut terminate: tokio::signal::unix::Signal,
    mut interrupt: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}

/// `--metrics-listen`: an address, or none at all.
#[derive(Debug, Clone, Copy)]
pub(super) struct MetricsAddr(Option<std::net::SocketAddr>);

impl MetricsAddr {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        crate::config::parse_metrics_listen(text).map(Self)
    }
}

/// Where to listen, when the command line says otherwise than the config.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ListenOverride {
    grpc: Option<std::net::SocketAddr>,
    metrics: Option<MetricsAddr>,
}

/// Opens the vault, binds, and serves until SIGTERM/SIGINT; SIGHUP reloads
/// policy and CRL. `on_ready` is told the bound address. The metrics
/// endpoint comes up first, saying `sealed 1` until the vault is open.
pub(super) async fn run_server(
    config: &Config,
    secret: &SecretArgs,
    listen: ListenOverride,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), CliError> {
    // Policy and TLS material first: a configuration error stops the start
    // before the store is touched.
    let live = std::sync::Arc::new(Live::load(config).or_fail(Failure::Config)?);
    let exporter = crate::metrics::Exporter::new();
    let metrics_task = match listen.metrics.map_or(config.server.metrics_listen, |m| m.0) {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr} (server.metrics_listen)"))
                .or_fail(Failure::Other)?;
            let bound = listener.local_addr().or_fail(Failure::Other)?;
            if !bound.ip().is_loopback() {
                tracing::warn!(%bound, "metrics are served on a non-loopback address, over plain HTTP");
            }
            say(&format!("piivault: metrics on http://{bound}/metrics"));
            let exporter = exporter.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, exporter).await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            }))
        }
    };
    let vault = open_vault(config, secret, Unseal::Recorded).await?;
    exporter.unsealed(vault.clone());
    let listener = grpc_server::bind(listen.grpc.unwrap_or(config.server.listen)).await.or_fail(Failure::Other)?;
    let addr = listener.local_addr().or_fail(Failure::Other)?;
    let Signals { mut hangup, terminate, interrupt } = Signals::register().or_fail(Failure::Other)?;
    let reloader = live.clone();
    let sink_vault = vault.clone();
    let hangups = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading policy and TLS material");
            sink_vault.reopen_audit_sink();
            let _ = reloader.reload();
        }
    });
    let upkeep = spawn_upkeep(config, &vault, &live);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        termination(terminate, interrupt).await;
        let _ = stop.send(true);
    });
    tracing::info!(%addr, collections = %vault.collection_names().join(","), "serving");
    on_ready(addr);
    let signalled = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let serving = grpc_server::serve(config, vault, live, listener, signalled(stopping.clone()));
    let drain_deadline = async {
        signalled(stopping).await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    let served = tokio::select! {
        served = serving => served,
        () = drain_deadline => {
            tracing::warn!("connections still open {} s after the stop signal; closing them", SHUTDOWN_DRAIN.as_secs());
            Ok(())
        }
    };
    hangups.abort();
    for task in upkeep.into_iter().chain(metrics_task) {
        task.abort();
    }
    served.or_fail(Failure::Other)?;
    tracing::info!("stopped");
    Ok(())
}

/// The server's periodic work, until aborted: reloading changed policy and
/// TLS files, and the vault's own background work
/// ([`Vault::spawn_background`]).
pub(super) fn spawn_upkeep(
    config: &Config,
    vault: &Vault,
    live: &std::sync::Arc<Live>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // The same reload when policy.toml or a file in pki/ changes, without
    // a signal (a watcher by polling: no platform-specific notification).
    let reload_live = live.clone();
    let watch_every = config.server.reload_check_interval;
    let file_watch = tokio::spawn(async move {
        let mut last = reload_live.files_stamp();
        loop {
            tokio::time::sleep(watch_every).await;
            let now = reload_live.files_stamp();
            if now != last {
                tracing::info!("policy or TLS files changed: reloading");
                let _ = reload_live.reload();
                last = now;
            }
        }
    });
    let mut jobs = vault.spawn_background(config);
    jobs.push(file_watch);
    if vault.store_is_shared() {
        // Per-caller quotas hold across the nodes: each shares its use.
        let (share_live, share_vault) = (live.clone(), vault.clone());
        jobs.push(tokio::spawn(async move {
            let mut failing = false;
            loop {
                match share_live.exchange_quota_use(&share_vault).await {
                    Ok(()) if failing => {
                        tracing::info!("quota use is shared with the other nodes again");
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::error!(error = %e, "cannot share quota use with the other nodes; retrying");
                        failing = true;
                    }
                    Ok(()) | Err(_) => {}
                }
                tokio::time::sleep(crate::grpc::limits::SHARE_INTERVAL).await;
            }
        }));
    }
    jobs
}

/// How long requests in flight get to finish after SIGTERM/SIGINT.
pub(super) const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// `piivault serve`.
pub(super) async fn serve(
    config_path: &Path,
    secret: &SecretArgs,
    metrics: Option<MetricsAddr>,
) -> Result<(), CliError> {
    let config = load_config(config_path)?;
    init_logging("info", config.server.log_format);
    let listen = ListenOverride { grpc: None, metrics };
    run_server(&config, secret, listen, |addr| say(&format!("piivault: listening on {addr}"))).await
}

/// Dev mode's passphrase file: the one place a passphrase is ever stored.
pub(super) const DEV_PASSPHRASE_FILE: &str = "dev-passphrase";

/// The callers dev mode creates, with their grants.
pub(super) const DEV_POLICY: &str = "\
# Development policy written by `piivault dev`. Anything not granted is denied.
[callers.writer]
tokenize = [\"*\"]
delete = [\"*\"]

[callers.reader]
detokenize = [\"*\"]

[callers.support]
detokenize_masked = [\"*\"]

[callers.admin]
admin = true
backup = true
rotate_root = true

[callers.auditor]
audit = true
";

/// `piivault dev`.
pub(super) async fn dev(
    data_dir: &Path,
    listen: Option<std::net::SocketAddr>,
    metrics: Option<MetricsAddr>,
) -> Result<(), CliError> {
    init_logging("info", LogFormat::Text);
    let passphrase_path = data_dir.join(DEV_PASSPHRASE_FILE);
    let config_path = data_dir.join(CONFIG_FILE);
    if !config_path.exists() {
        let mut bytes = zeroize::Zeroizing::new([0u8; 24]);
        crate::crypto::fill_random(bytes.as_mut_slice()).or_fail(Failure::Other)?;
        let passphrase = zeroize::Zeroizing::new(hex::encode(bytes.as_slice()));
        let secret = SecretArgs { passphrase_file: Some(passphrase_path.clone()) };
        datadir::create_private_dir(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))
            .or_fail(Failure::Other)?;
        datadir::write_private_file(&passphrase_path, passphrase.as_bytes())
            .context("cannot write the dev passphrase")
            .or_fail(Failure::Other)?;
        let new =
            NewVault { source: RootKeySource::Passphrase, pkcs11: None, key_label: String::new(), postgres: None };
        init(data_dir, &new, &secret, false).await?;
        let config = Config::load(&config_path).or_fail(Failure::Config)?;
        let ca = Ca::load(data_dir).or_fail(Failure::Other)?;
        for name in ["writer", "reader", "support", "admin", "auditor"] {
            let caller: CallerId = name.parse().or_fail(Failure::Other)?;
            ca.issue(&caller, &config.server.trust_domain, 365, &data_dir.join("clients").join(name))
                .or_fail(Failure::Other)?;
        }
        let policy = &config.server.policy;
        std::fs::remove_file(policy).or_fail(Failure::Other)?;
        datadir::write_private_file(policy, DEV_POLICY.as_bytes()).or_fail(Failure::Other)?;
    } else if !passphrase_path.exists() {
        return Err(anyhow!(
            "{} holds a vault that `piivault dev` did not create (no {DEV_PASSPHRASE_FILE}); use `piivault serve`",
            data_dir.display()
        ))
        .or_fail(Failure::Config);
    }
    tracing::warn!(
        "DEVELOPMENT MODE: the passphrase is stored in clear in {}. Never put real personal data in this vault.",
        passphrase_path.display()
    );
    let secret = SecretArgs { passphrase_file: Some(passphrase_path) };
    let config = load_config(&config_path)?;
    let exe = std::env::current_exe().map_or_else(|_| "piivault".to_owned(), |p| p.display().to_string());
    let dir = data_dir.display().to_string();
    let address_file = data_dir.join(datadir::DEV_ADDRESS_FILE);
    // Metrics on a free port unless asked otherwise, so that two dev
    // vaults on one machine never collide; the address is printed.
    let metrics = metrics.or(Some(MetricsAddr(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))))));
    let served = run_server(&config, &secret, ListenOverride { grpc: listen, metrics }, |addr| {
        // Where the client finds this vault given only --data-dir.
        let _ = std::fs::remove_file(&address_file);
        if let Err(e) = datadir::write_private_file(&address_file, format!("{addr}\n").as_bytes()) {
            tracing::warn!(error = %e, "cannot record the dev vault's address; clients need --addr");
        }
        say(&format!("piivault: listening on {addr}"));
        say(&format!(
            "\npiivault dev is serving {dir} on {addr} (DEVELOPMENT ONLY; Ctrl-C stops it).\n\
             Try, from another shell:\n\
             \n  echo 4111111111111111 | {exe} tokenize --data-dir {dir} --as writer --collection card\n\
             \n  {exe} detokenize --data-dir {dir} --as reader --collection card <token from above>\n\
             \n  {exe} detokenize --data-dir {dir} --as support --collection card <token>   # masked\n\
             \nCallers and their certificates: {dir}/clients/{{writer,reader,support,admin,auditor}}; vault CA: {dir}/pki/ca.pem\n"
        ));
    })
    .await;
    let _ = std::fs::remove_file(&address_file);
    served
}
